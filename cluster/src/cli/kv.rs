//! `strata get | put | del | scan | cas`.

use std::io::{IsTerminal, Read, Write};

use anyhow::Context;
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
    /// Print only the value, byte for byte, with nothing added (for binary values and scripts:
    /// `strata get photo:1 --raw > photo.jpg`); ignores `-o`. A missing key is an error.
    #[arg(long)]
    pub raw: bool,
}

/// `strata put`.
#[derive(Args, Debug)]
pub struct PutArgs {
    /// The key.
    pub key: String,
    /// The value. Without it, the value is read from standard input, byte for byte
    /// (`strata put photo:1 < photo.jpg`).
    pub value: Option<String>,
}

/// Most bytes `strata put` reads from standard input. Nodes refuse values over their
/// `max_value_bytes` (1 MiB by default) anyway; this only keeps `strata put k < /dev/zero` from
/// filling the memory before the node can say so.
const MAX_STDIN_VALUE_BYTES: u64 = 256 << 20;

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
    if a.raw {
        let Some(r) = r else {
            anyhow::bail!("key {} not found", a.key);
        };
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&r.value)?;
        stdout.flush()?;
        return Ok(());
    }
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
    let value = match &a.value {
        Some(v) => Bytes::from(v.clone()),
        None => value_from_stdin()?,
    };
    let client = cli.client().await?;
    let version = client.put(a.key.clone(), value).await?;
    let out = WriteOut {
        key: a.key.clone(),
        version,
    };
    emit(cli.output, &out, &["KEY", "VERSION"], |o| {
        vec![vec![o.key.clone(), o.version.to_string()]]
    })
}

/// The whole of standard input, refused when it is a terminal: a user who left out the value
/// by mistake gets told so instead of a command that seems to hang.
fn value_from_stdin() -> anyhow::Result<Bytes> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        anyhow::bail!("no value given: pass it after the key, or pipe it on standard input");
    }
    read_value(stdin.lock(), MAX_STDIN_VALUE_BYTES)
}

/// All of `input`, or an error naming `limit` if there is more.
fn read_value(input: impl Read, limit: u64) -> anyhow::Result<Bytes> {
    let mut value = Vec::new();
    input
        .take(limit + 1)
        .read_to_end(&mut value)
        .context("read the value from standard input")?;
    if value.len() as u64 > limit {
        anyhow::bail!("the value on standard input is over {limit} bytes");
    }
    Ok(Bytes::from(value))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_read_from_input_keeps_every_byte() {
        let bytes = b"a\0b\n\xff".to_vec();
        assert_eq!(read_value(&bytes[..], 5).unwrap(), Bytes::from(bytes));
        assert_eq!(read_value(&b""[..], 5).unwrap(), Bytes::new());
    }

    #[test]
    fn a_value_over_the_input_limit_is_refused() {
        let err = read_value(&b"123456"[..], 5).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the value on standard input is over 5 bytes"
        );
    }
}
