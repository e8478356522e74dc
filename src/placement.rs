//! Which shard owns a user.
//!
//! The choice must be the same on every build, machine and CPU, because users
//! will later be homed on nodes with the same function. It is therefore a
//! fully specified hash, not `ahash` (whose output changes across versions
//! and CPUs):
//!
//! ```text
//! shard = fnv1a_64(utf8 bytes of the user id) mod shard_count
//! ```
//!
//! FNV-1a 64-bit uses offset basis `0xcbf29ce484222325` and prime
//! `0x100000001b3`. It is not keyed, so a client could choose ids that land
//! on one shard; ids come only from tokens the operator's issuer signed, so
//! that costs balance, never isolation.

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64 bits, over `bytes`.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    let mut hash = FNV_OFFSET_BASIS;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The index of the shard that owns `user` among `shard_count` shards.
pub fn shard_for(user: &str, shard_count: usize) -> usize {
    assert!(shard_count > 0, "a server has at least one shard");
    (fnv1a_64(user.as_bytes()) % shard_count as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_published_fnv1a_vectors() {
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn placement_is_stable_and_in_range() {
        // These values are part of the contract: changing them moves users.
        assert_eq!(shard_for("alice", 2), (fnv1a_64(b"alice") % 2) as usize);
        for shards in 1..9 {
            for user in ["alice", "bob", "carol", "dave", "\u{e9}", "x"] {
                let shard = shard_for(user, shards);
                assert!(shard < shards);
                assert_eq!(shard, shard_for(user, shards));
            }
        }
    }

    #[test]
    fn ids_are_compared_as_bytes() {
        // NFC and NFD forms of the same name are different users.
        assert_ne!(
            fnv1a_64("\u{e9}".as_bytes()),
            fnv1a_64("e\u{301}".as_bytes())
        );
    }
}
