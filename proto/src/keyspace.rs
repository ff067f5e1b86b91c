//! Key → slot: the rule that decides which shard owns a key. Client and node must compute it the
//! same way, so it lives with the wire contract.
//!
//! `slot = crc16(tag(key)) % SLOT_COUNT`, where `tag(key)` is the part between the first `{` and
//! the next `}` when that part is non-empty (Redis Cluster's hash-tag rule), else the whole key.
//! Keys that share a tag (`{user:42}:name`, `{user:42}:cart`) always share a slot, so an atomic
//! batch over them stays in one shard.

/// Number of hash slots in the key space.
pub const SLOT_COUNT: u32 = 4096;

/// CRC-16/XMODEM, the checksum Redis Cluster uses for its slots.
const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM);

/// The part of `key` that is hashed: the first non-empty `{...}` section, else the whole key.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The slot of `key`, in `0..SLOT_COUNT`.
pub fn slot_of(key: &[u8]) -> u32 {
    u32::from(CRC16.checksum(hash_tag(key))) % SLOT_COUNT
}

/// Slot ranges for `shards` shards: shard `i` (1-based) owns `[start, end)`. The split is as even
/// as integer division allows, and the ranges cover every slot exactly once.
pub fn slot_ranges(shards: u32) -> Vec<(u32, u32)> {
    (0..shards)
        .map(|i| (i * SLOT_COUNT / shards, (i + 1) * SLOT_COUNT / shards))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tag_takes_first_non_empty_braces() {
        assert_eq!(hash_tag(b"{user:42}:name"), b"user:42");
        assert_eq!(hash_tag(b"cart:{user:42}"), b"user:42");
        assert_eq!(hash_tag(b"a{b}{c}"), b"b");
        // Empty tag or unclosed brace: the whole key is hashed.
        assert_eq!(hash_tag(b"{}user"), b"{}user");
        assert_eq!(hash_tag(b"{user"), b"{user");
        assert_eq!(hash_tag(b"plain"), b"plain");
        // Only the first `{` counts, even if its tag is empty.
        assert_eq!(hash_tag(b"{}{x}"), b"{}{x}");
    }

    #[test]
    fn keys_sharing_a_tag_share_a_slot() {
        assert_eq!(slot_of(b"{user:42}:name"), slot_of(b"{user:42}:cart"));
        assert_eq!(slot_of(b"{user:42}:name"), slot_of(b"user:42"));
    }

    #[test]
    fn slot_matches_redis_cluster_crc16() {
        // Redis: CLUSTER KEYSLOT foo = 12182 (crc16 % 16384); 12182 % 4096 = 3990.
        assert_eq!(u32::from(CRC16.checksum(b"foo")) % 16384, 12182);
        assert_eq!(slot_of(b"foo"), 12182 % SLOT_COUNT);
    }

    #[test]
    fn slot_ranges_cover_every_slot_once() {
        for shards in [1, 3, 7, 8, 64, 4096] {
            let ranges = slot_ranges(shards);
            assert_eq!(ranges.len() as u32, shards);
            assert_eq!(ranges[0].0, 0);
            assert_eq!(ranges.last().unwrap().1, SLOT_COUNT);
            for w in ranges.windows(2) {
                assert_eq!(w[0].1, w[1].0);
                assert!(w[0].0 < w[0].1);
            }
        }
    }
}
