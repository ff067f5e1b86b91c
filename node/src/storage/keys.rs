//! Key encodings. Every key starts with the 8-byte big-endian group id, so each group's log, state
//! and data are contiguous ranges (a shard's data is one range: snapshots scan it, installs
//! delete it with one range tombstone).

use crate::layout::GroupId;

/// Column family of Raft log entries.
pub const CF_LOG: &str = "raft_log";
/// Column family of Raft vote / purge state and the node's layout.
pub const CF_STATE: &str = "raft_state";
/// Column family of user data.
pub const CF_DATA: &str = "data";
/// Column family of state-machine metadata (applied id, membership, dedup table).
pub const CF_SM: &str = "sm_meta";

/// `raft_state` tag: the vote.
pub const TAG_VOTE: u8 = b'v';
/// `raft_state` tag: the last purged log id.
pub const TAG_PURGED: u8 = b'p';
/// `sm_meta` tag: the last applied log id.
pub const TAG_APPLIED: u8 = b'a';
/// `sm_meta` tag: the last applied membership.
pub const TAG_MEMBERSHIP: u8 = b'm';
/// `sm_meta` tag: a client's de-duplication session, `client`. (Tags `d` and `f` held sessions
/// in an older format; see `sessions::legacy`.)
pub const TAG_SESSION: u8 = b's';
/// `sm_meta` tag: present while a snapshot install replaces the group's state; holds the
/// snapshot's last log id (see `install`).
pub const TAG_INSTALLING: u8 = b'i';

/// The node-wide key of the stored layout in `raft_state` (not group-prefixed: 1 byte).
pub const LAYOUT_KEY: &[u8] = b"L";

/// The node-wide key of this node's id in `raft_state`, written when a joining node is added.
pub const NODE_ID_KEY: &[u8] = b"I";

/// The node-wide key of this data directory's incarnation in `raft_state` (see
/// `raft::identity`).
pub const INCARNATION_KEY: &[u8] = b"N";

/// First byte of a peer's known incarnation in `raft_state`: `P ‖ peer id`. As a group-prefixed
/// key it would belong to a group id above 2^62, which never exists.
pub const PEER_INCARNATION_TAG: u8 = b'P';

/// `P ‖ peer id`.
pub fn peer_incarnation_key(peer: u64) -> [u8; 9] {
    let mut k = [0; 9];
    k[0] = PEER_INCARNATION_TAG;
    k[1..].copy_from_slice(&peer.to_be_bytes());
    k
}

/// `group ‖ index`.
pub fn log_key(group: GroupId, index: u64) -> [u8; 16] {
    let mut k = [0; 16];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

/// The index of a `raft_log` key.
pub fn log_index(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[8..16].try_into().expect("16-byte log key"))
}

/// `group ‖ tag`.
pub fn tag_key(group: GroupId, tag: u8) -> [u8; 9] {
    let mut k = [0; 9];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8] = tag;
    k
}

/// `group ‖ user key`.
pub fn data_key(group: GroupId, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The group's whole range in a group-prefixed column family: `[group, group + 1)`.
pub fn group_range(group: GroupId) -> ([u8; 8], [u8; 8]) {
    (group.to_be_bytes(), (group + 1).to_be_bytes())
}

/// `group ‖ TAG_SESSION ‖ client`.
pub fn session_key(group: GroupId, client: u64) -> [u8; 17] {
    let mut k = [0; 17];
    k[..9].copy_from_slice(&tag_key(group, TAG_SESSION));
    k[9..].copy_from_slice(&client.to_be_bytes());
    k
}

/// A stored record: `version ‖ value`.
pub fn encode_record(version: u64, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + value.len());
    v.extend_from_slice(&version.to_be_bytes());
    v.extend_from_slice(value);
    v
}

/// Splits a stored record into version and value.
pub fn decode_record(raw: &[u8]) -> std::io::Result<(u64, &[u8])> {
    if raw.len() < 8 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "data record shorter than its version",
        ));
    }
    let version = u64::from_be_bytes(raw[..8].try_into().expect("8 bytes"));
    Ok((version, &raw[8..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_by_group_then_index() {
        assert!(log_key(1, u64::MAX) < log_key(2, 0));
        assert!(log_key(1, 255) < log_key(1, 256));
        assert_eq!(log_index(&log_key(7, 42)), 42);
    }

    #[test]
    fn data_keys_stay_inside_their_group_range() {
        let (lo, hi) = group_range(3);
        for k in [&b""[..], b"a", &[0xff; 40]] {
            let dk = data_key(3, k);
            assert!(dk.as_slice() >= &lo[..] && dk.as_slice() < &hi[..]);
        }
        let sk = session_key(3, 9);
        assert!(sk.as_slice() >= &lo[..] && sk.as_slice() < &hi[..]);
        let rec = encode_record(5, b"v");
        assert_eq!(decode_record(&rec).unwrap(), (5, &b"v"[..]));
        assert!(decode_record(b"abc").is_err());
    }
}
