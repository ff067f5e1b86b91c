//! The values the operations take and give back: records, scan pages and options, CAS
//! outcomes, batch operations.

use bytes::Bytes;
use strata_proto::v1::{self as pb, Consistency};

/// A stored value and its version (the log index that last wrote it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The key (filled by scans).
    pub key: Bytes,
    /// The value.
    pub value: Bytes,
    /// Version: the log index of the write that produced this value.
    pub version: u64,
}

/// One page of a scan: records in key order, and whether the range holds keys past them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// The records, in key order.
    pub records: Vec<Record>,
    /// Keys past the last record remain in the range: [`ScanPage::next_start`] gives the `start`
    /// of the next page.
    pub more: bool,
}

impl ScanPage {
    /// Where the next page of the same range starts (just after this page's last key), or `None`
    /// when this page ends the range.
    pub fn next_start(&self) -> Option<Bytes> {
        let last = self.records.last().filter(|_| self.more)?;
        Some([last.key.as_ref(), &[0]].concat().into())
    }
}

/// The result of a compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasOutcome {
    /// Whether the comparison held and the write applied.
    pub succeeded: bool,
    /// On success the new version (0 after a delete); on mismatch the current one (0 = absent).
    pub version: u64,
    /// On mismatch, the current value.
    pub current_value: Option<Bytes>,
}

/// One operation of an atomic batch.
#[derive(Debug, Clone)]
pub enum BatchOp {
    /// Set a key.
    Put(Bytes, Bytes),
    /// Remove a key.
    Delete(Bytes),
}

impl From<BatchOp> for pb::BatchOp {
    fn from(op: BatchOp) -> pb::BatchOp {
        match op {
            BatchOp::Put(key, value) => pb::BatchOp {
                key,
                value,
                delete: false,
            },
            BatchOp::Delete(key) => pb::BatchOp {
                key,
                value: Bytes::new(),
                delete: true,
            },
        }
    }
}

/// What a scan covers.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Only keys with this prefix.
    pub prefix: Bytes,
    /// Inclusive lower bound (empty: none).
    pub start: Bytes,
    /// Exclusive upper bound (empty: none).
    pub end: Bytes,
    /// Most records returned (0: the server default, 1000). A node answers at most 10 000 per
    /// shard; a larger limit gives a page that ends early, with [`ScanPage::more`] set.
    pub limit: u32,
    /// Read consistency.
    pub consistency: Consistency,
}
