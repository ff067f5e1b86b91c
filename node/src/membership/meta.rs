//! The authoritative layout, stored in the meta group under [`LAYOUT_META_KEY`] as JSON.
//! Only the meta leader reads it for decisions (after a ReadIndex round, so it is current) and
//! replaces it with a compare-and-set on the version it read: a deposed leader's late write
//! fails instead of overwriting a newer layout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use openraft::ReadPolicy;

use crate::error::KvError;
use crate::layout::{Layout, META_GROUP};
use crate::raft::group::{ReadError, WriteError};
use crate::raft::{Command, Op, Outcome};
use crate::service::NodeState;
use crate::storage::state_machine::get;

/// Key under which the meta group stores the layout.
pub const LAYOUT_META_KEY: &[u8] = b"__strata/layout";

/// The layout as read from the meta group, with the version a replacement must match.
#[derive(Clone, Debug)]
pub struct Stamped {
    /// The layout.
    pub layout: Layout,
    /// Log index that wrote it (the CAS version).
    pub version: u64,
}

/// This process's writer identity for layout writes: a random client id and a sequence, so a
/// retried write is de-duplicated like any client write and two writers never share ids.
static WRITER: LazyLock<(u64, AtomicU64)> =
    LazyLock::new(|| (rand::random::<u64>() | 1 << 63, AtomicU64::new(1)));

/// Layout writes of this process run one at a time, so each may declare every earlier sequence
/// answered (`acked_below`) and the session table stays small.
static WRITE_SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Reads the layout on the meta leader, linearizably. Elsewhere: `NotLeader` with a hint.
pub async fn read(node: &NodeState) -> Result<Stamped, KvError> {
    let meta = node.group(META_GROUP)?;
    if !meta.is_leader() {
        return Err(node.not_leader(META_GROUP, meta.leader()));
    }
    match meta.linearize(ReadPolicy::ReadIndex).await {
        Ok(()) => {}
        Err(ReadError::NotLeader(hint)) => return Err(node.not_leader(META_GROUP, hint)),
        Err(ReadError::Unavailable(reason)) => {
            return Err(KvError::Unavailable {
                shard: META_GROUP,
                reason,
            })
        }
    }
    let record = get(&node.engine, META_GROUP, LAYOUT_META_KEY)
        .map_err(|e| KvError::Internal(format!("read layout: {e}")))?
        .ok_or_else(|| KvError::Unavailable {
            shard: META_GROUP,
            reason: "the layout is not recorded in the meta group yet".into(),
        })?;
    let layout = serde_json::from_slice(&record.value)
        .map_err(|e| KvError::Internal(format!("stored layout does not parse: {e}")))?;
    Ok(Stamped {
        layout,
        version: record.version,
    })
}

/// Replaces `old` by `new` (whose epoch is set to the next one). Fails with `Unavailable` when
/// the layout changed since `old` was read (the caller re-reads and decides again).
pub async fn replace(node: &NodeState, old: &Stamped, mut new: Layout) -> Result<Layout, KvError> {
    new.epoch = old.layout.epoch + 1;
    let value = serde_json::to_vec(&new).expect("layout serializes");
    let op = Op::Cas {
        key: LAYOUT_META_KEY.into(),
        expected_version: old.version,
        new_value: Some(value.into()),
    };
    match write(node, op).await? {
        Outcome::Cas {
            succeeded: true, ..
        } => Ok(new),
        Outcome::Cas { .. } => Err(KvError::Unavailable {
            shard: META_GROUP,
            reason: "the layout changed concurrently; retry".into(),
        }),
        other => Err(KvError::Internal(format!(
            "unexpected layout write outcome {other:?}"
        ))),
    }
}

/// Records `layout` at bootstrap, unless a layout is already stored.
pub async fn record_initial(node: &NodeState, layout: &Layout) -> Result<(), KvError> {
    let value = serde_json::to_vec(layout).expect("layout serializes");
    let op = Op::Cas {
        key: LAYOUT_META_KEY.into(),
        expected_version: 0,
        new_value: Some(value.into()),
    };
    write(node, op).await.map(|_| ())
}

/// Proposes `op` to the meta group as this process's layout writer. A write whose outcome is
/// unknown is retried with the same request id, so it applies at most once.
async fn write(node: &NodeState, op: Op) -> Result<Outcome, KvError> {
    let meta = node.group(META_GROUP)?;
    let _serial = WRITE_SERIAL.lock().await;
    let (client_id, seq) = (&WRITER.0, &WRITER.1);
    let sequence = seq.fetch_add(1, Ordering::Relaxed);
    let cmd = Command {
        client_id: *client_id,
        sequence,
        // Writes are serialized per process: everything before this one was answered.
        acked_below: sequence,
        op,
    };
    let mut last = String::new();
    for _ in 0..3 {
        match meta.write(cmd.clone()).await {
            Ok(outcome) => return Ok(outcome),
            Err(WriteError::NotLeader(hint)) => return Err(node.not_leader(META_GROUP, hint)),
            Err(WriteError::Unknown(reason)) => last = reason,
        }
    }
    Err(KvError::OutcomeUnknown {
        shard: META_GROUP,
        reason: last,
    })
}
