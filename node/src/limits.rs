//! Input limits. Every request is checked here before anything is proposed, so a rejected request
//! writes nothing and its error names the limit it broke.

use crate::error::KvError;

/// Configurable size limits (defaults from the API contract).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest key in bytes (default 4 KiB).
    pub max_key_bytes: usize,
    /// Largest value in bytes (default 1 MiB).
    pub max_value_bytes: usize,
    /// Most operations in one batch (default 128).
    pub max_batch_ops: usize,
    /// Largest gRPC message in bytes (default 4 MiB).
    pub max_message_bytes: usize,
}

/// Most items (batches or reads) in one `MultiBatch` or `MultiGet` call: stops a caller from
/// starting thousands of proposals or reads with one message.
pub const MAX_MULTI_ITEMS: usize = 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 4 << 10,
            max_value_bytes: 1 << 20,
            max_batch_ops: 128,
            max_message_bytes: 4 << 20,
        }
    }
}

impl Limits {
    /// A key must be non-empty and at most `max_key_bytes`.
    pub fn check_key(&self, key: &[u8]) -> Result<(), KvError> {
        if key.is_empty() {
            return Err(KvError::InvalidArgument("key is empty".into()));
        }
        if key.len() > self.max_key_bytes {
            return Err(KvError::InvalidArgument(format!(
                "key is {} bytes, the limit is {}",
                key.len(),
                self.max_key_bytes
            )));
        }
        Ok(())
    }

    /// A value may be empty, and at most `max_value_bytes`.
    pub fn check_value(&self, value: &[u8]) -> Result<(), KvError> {
        if value.len() > self.max_value_bytes {
            return Err(KvError::InvalidArgument(format!(
                "value is {} bytes, the limit is {}",
                value.len(),
                self.max_value_bytes
            )));
        }
        Ok(())
    }

    /// A batch holds 1..=`max_batch_ops` operations.
    pub fn check_batch_len(&self, ops: usize) -> Result<(), KvError> {
        if ops == 0 {
            return Err(KvError::InvalidArgument("batch is empty".into()));
        }
        if ops > self.max_batch_ops {
            return Err(KvError::InvalidArgument(format!(
                "batch has {ops} operations, the limit is {}",
                self.max_batch_ops
            )));
        }
        Ok(())
    }

    /// A `MultiBatch` or `MultiGet` call holds 1..=[`MAX_MULTI_ITEMS`] items (`what`: "batches"
    /// or "reads").
    pub fn check_multi_len(&self, items: usize, what: &str) -> Result<(), KvError> {
        if items == 0 {
            return Err(KvError::InvalidArgument(format!(
                "the call holds no {what}"
            )));
        }
        if items > MAX_MULTI_ITEMS {
            return Err(KvError::InvalidArgument(format!(
                "the call holds {items} {what}, the limit is {MAX_MULTI_ITEMS}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_reject_with_a_reason() {
        let l = Limits::default();
        assert!(l.check_key(b"k").is_ok());
        let msg = |e: KvError| e.to_string();
        assert!(msg(l.check_key(b"").unwrap_err()).contains("empty"));
        assert!(msg(l.check_key(&vec![b'k'; 4097]).unwrap_err()).contains("4097"));
        assert!(l.check_key(&vec![b'k'; 4096]).is_ok());
        assert!(l.check_value(b"").is_ok());
        assert!(msg(l.check_value(&vec![0; (1 << 20) + 1]).unwrap_err()).contains("limit"));
        assert!(l.check_batch_len(128).is_ok());
        assert!(l.check_batch_len(129).is_err());
        assert!(l.check_batch_len(0).is_err());
        assert!(l.check_multi_len(1, "reads").is_ok());
        assert!(msg(l.check_multi_len(0, "batches").unwrap_err()).contains("no batches"));
        assert!(msg(l.check_multi_len(1025, "reads").unwrap_err()).contains("1024"));
    }
}
