//! `strata get | put | del | scan | cas`.

use bytes::Bytes;
use clap::{Args, ValueEnum};
use serde::Serialize;
use strata_client::{Consistency, ScanOptions};

use super::output::{emit, show_bytes};
use super::Cli;

/// Read consistency, as a flag.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsistencyArg {
    /// ReadIndex through the leader (default).
    Linearizable,
    /// Leader lease.
    Lease,
    /// Any replica's applied state.
    Stale,
}

impl From<ConsistencyArg> for Consistency {
    fn from(c: ConsistencyArg) -> Consistency {
        match c {
            ConsistencyArg::Linearizable => Consistency::Linearizable,
            ConsistencyArg::Lease => Consistency::Lease,
            ConsistencyArg::Stale => Consistency::Stale,
        }
    }
}

/// `strata get`.
#[derive(Args, Debug)]
pub struct GetArgs {
    /// The key.
    pub key: String,
    /// Read consistency.
    #[arg(long, value_enum, default_value = "linearizable")]
    pub consistency: ConsistencyArg,
}

/// `strata put`.
#[derive(Args, Debug)]
pub struct PutArgs {
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
}

/// `strata del`.
#[derive(Args, Debug)]
pub struct DelArgs {
    /// The key.
    pub key: String,
}

/// `strata scan`.
#[derive(Args, Debug)]
pub struct ScanArgs {
    /// Only keys with this prefix.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Inclusive lower bound.
    #[arg(long, default_value = "")]
    pub start: String,
    /// Exclusive upper bound.
    #[arg(long, default_value = "")]
    pub end: String,
    /// Most keys listed.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Read consistency.
    #[arg(long, value_enum, default_value = "linearizable")]
    pub consistency: ConsistencyArg,
}

/// `strata cas`.
#[derive(Args, Debug)]
pub struct CasArgs {
    /// The key.
    pub key: String,
    /// The version the key must have now (0 = the key must not exist).
    #[arg(long)]
    pub expect_version: u64,
    /// The new value.
    #[arg(long, conflicts_with = "delete", required_unless_present = "delete")]
    pub value: Option<String>,
    /// Delete the key instead of setting it.
    #[arg(long)]
    pub delete: bool,
}

#[derive(Serialize)]
struct RecordOut {
    key: String,
    found: bool,
    value: Option<String>,
    version: Option<u64>,
}

/// Runs `strata get`.
pub async fn get(cli: &Cli, a: &GetArgs) -> anyhow::Result<()> {
    let client = cli.client().await?;
    let r = client.get_with(a.key.clone(), a.consistency.into()).await?;
    let out = RecordOut {
        key: a.key.clone(),
        found: r.is_some(),
        value: r.as_ref().map(|r| show_bytes(&r.value)),
        version: r.as_ref().map(|r| r.version),
    };
    emit(cli.output, &out, &["KEY", "VALUE", "VERSION"], |o| {
        vec![match (&o.value, o.version) {
            (Some(v), Some(ver)) => vec![o.key.clone(), v.clone(), ver.to_string()],
            _ => vec![o.key.clone(), "(not found)".into(), "-".into()],
        }]
    })
}

#[derive(Serialize)]
struct WriteOut {
    key: String,
    version: u64,
}

/// Runs `strata put`.
pub async fn put(cli: &Cli, a: &PutArgs) -> anyhow::Result<()> {
    let client = cli.client().await?;
    let version = client.put(a.key.clone(), a.value.clone()).await?;
    let out = WriteOut {
        key: a.key.clone(),
        version,
    };
    emit(cli.output, &out, &["KEY", "VERSION"], |o| {
        vec![vec![o.key.clone(), o.version.to_string()]]
    })
}

#[derive(Serialize)]
struct DelOut {
    key: String,
    existed: bool,
}

/// Runs `strata del`.
pub async fn del(cli: &Cli, a: &DelArgs) -> anyhow::Result<()> {
    let client = cli.client().await?;
    let existed = client.delete(a.key.clone()).await?;
    let out = DelOut {
        key: a.key.clone(),
        existed,
    };
    emit(cli.output, &out, &["KEY", "EXISTED"], |o| {
        vec![vec![o.key.clone(), o.existed.to_string()]]
    })
}

/// Runs `strata scan`.
pub async fn scan(cli: &Cli, a: &ScanArgs) -> anyhow::Result<()> {
    if a.limit == 0 {
        anyhow::bail!("--limit must be at least 1");
    }
    let client = cli.client().await?;
    let page = client
        .scan(ScanOptions {
            prefix: Bytes::from(a.prefix.clone()),
            start: Bytes::from(a.start.clone()),
            end: Bytes::from(a.end.clone()),
            limit: a.limit,
            consistency: a.consistency.into(),
        })
        .await?;
    if let (true, Some(last)) = (page.more, page.records.last()) {
        // On stderr, so table and JSON output on stdout stay as they are.
        eprintln!(
            "strata: more keys follow; this page ends at {0} (go on with --start {0}, which shows it again, or raise --limit)",
            show_bytes(&last.key)
        );
    }
    let out: Vec<RecordOut> = page
        .records
        .iter()
        .map(|r| RecordOut {
            key: show_bytes(&r.key),
            found: true,
            value: Some(show_bytes(&r.value)),
            version: Some(r.version),
        })
        .collect();
    emit(cli.output, &out, &["KEY", "VALUE", "VERSION"], |rows| {
        rows.iter()
            .map(|o| {
                vec![
                    o.key.clone(),
                    o.value.clone().unwrap_or_default(),
                    o.version.unwrap_or(0).to_string(),
                ]
            })
            .collect()
    })
}

#[derive(Serialize)]
struct CasOut {
    key: String,
    succeeded: bool,
    version: u64,
    current_value: Option<String>,
}

/// Runs `strata cas`. A failed comparison is reported and exits non-zero.
pub async fn cas(cli: &Cli, a: &CasArgs) -> anyhow::Result<()> {
    let client = cli.client().await?;
    let new_value = if a.delete {
        None
    } else {
        a.value.clone().map(Bytes::from)
    };
    let r = client
        .cas(a.key.clone(), a.expect_version, new_value)
        .await?;
    let out = CasOut {
        key: a.key.clone(),
        succeeded: r.succeeded,
        version: r.version,
        current_value: r.current_value.as_deref().map(show_bytes),
    };
    emit(cli.output, &out, &["KEY", "SUCCEEDED", "VERSION"], |o| {
        vec![vec![
            o.key.clone(),
            o.succeeded.to_string(),
            o.version.to_string(),
        ]]
    })?;
    if !r.succeeded {
        anyhow::bail!(
            "compare failed: {} has version {} (expected {})",
            a.key,
            r.version,
            a.expect_version
        );
    }
    Ok(())
}
