//! The openraft type configuration and the commands a shard's log carries.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// Strata's openraft type configuration: u64 node ids, peer addresses as node data.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = openraft::BasicNode,
);

/// A write, as proposed to a shard's log.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// The writing client; with `sequence` it identifies the write for de-duplication.
    pub client_id: u64,
    /// The client's sequence number for this write; a retry reuses it.
    pub sequence: u64,
    /// Every sequence below this one has finished on the client: its saved outcome can go.
    pub acked_below: u64,
    /// What to do.
    pub op: Op,
}

/// The operation of a [`Command`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Put {
        /// Key.
        key: Bytes,
        /// Value.
        value: Bytes,
    },
    /// Remove `key`.
    Delete {
        /// Key.
        key: Bytes,
    },
    /// If `key`'s version is `expected_version` (0 = absent), set it to `new_value` (or delete it
    /// when `None`).
    Cas {
        /// Key.
        key: Bytes,
        /// Version the key must have; 0 means "absent".
        expected_version: u64,
        /// New value, or `None` to delete.
        new_value: Option<Bytes>,
    },
    /// Apply every op atomically.
    Batch {
        /// The ops, applied in order.
        ops: Vec<BatchOp>,
    },
}

/// One operation of a batch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum BatchOp {
    /// Set a key.
    Put {
        /// Key.
        key: Bytes,
        /// Value.
        value: Bytes,
    },
    /// Remove a key.
    Delete {
        /// Key.
        key: Bytes,
    },
}

/// The result of applying one log entry. Saved per (client, sequence) so that a retry gets the
/// same answer without applying twice.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A put applied at `version`.
    Put {
        /// The new version (the entry's log index).
        version: u64,
    },
    /// A delete applied.
    Delete {
        /// Whether the key existed.
        existed: bool,
        /// The log index of the delete.
        version: u64,
    },
    /// A compare-and-set was evaluated.
    Cas {
        /// Whether the comparison held (and the write applied).
        succeeded: bool,
        /// New version on success (0 after a delete); current version on mismatch.
        version: u64,
        /// Current value on mismatch.
        current_value: Option<Bytes>,
    },
    /// A batch applied at `version`.
    Batch {
        /// The log index of the batch.
        version: u64,
    },
    /// The sequence is older than what the client acknowledged: not applied.
    Stale,
    /// A blank or membership entry (no client waits for it).
    None,
}

/// Short form for openraft's logs: the request id and the operation kind, never the value.
impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.op {
            Op::Put { .. } => "put",
            Op::Delete { .. } => "delete",
            Op::Cas { .. } => "cas",
            Op::Batch { .. } => "batch",
        };
        write!(f, "{kind}#{}:{}", self.client_id, self.sequence)
    }
}
