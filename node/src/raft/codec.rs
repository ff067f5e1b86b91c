//! One encoding for everything openraft hands us to store or send: bincode (v2, standard
//! config) over serde. Both ends run the same pinned openraft, so its serde shape is stable
//! between them.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Encodes `v`. Encoding our own types cannot fail; a failure is a bug and panics loudly.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).expect("bincode encoding")
}

/// Decodes a value written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> std::io::Result<T> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
