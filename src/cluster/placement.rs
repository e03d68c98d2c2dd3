//! Rendezvous (highest random weight) placement.
//!
//! Every member gets a weight for every chunk: the first 8 bytes of
//! `SHA-256(node id || chunk id)`. Ranking members by weight, highest first,
//! gives each chunk its own order of preference over the cluster. A chunk's
//! owners are the first R members of that order that are not known to be
//! down. Any node computes this alone, and when a member joins or leaves,
//! only the chunks that member ranks in the top R for change owners.

use sha2::{Digest, Sha256};

use crate::crypto::ChunkId;

/// The weight of `node_id` for `chunk`.
pub fn weight(node_id: &str, chunk: &ChunkId) -> u64 {
    let mut h = Sha256::new();
    h.update(node_id.as_bytes());
    h.update([0u8]); // separator: ("ab", "c...") and ("a", "bc...") must differ
    h.update(chunk.0);
    let digest = h.finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("SHA-256 has 32 bytes"))
}

/// `members` ordered by preference for `chunk`, highest weight first; ties
/// (astronomically unlikely) break on the node id so every node agrees.
pub fn rank<'a>(chunk: &ChunkId, members: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut weighted: Vec<(u64, &str)> =
        members.into_iter().map(|m| (weight(m, chunk), m)).collect();
    weighted.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    weighted.into_iter().map(|(_, m)| m).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chunk(n: u32) -> ChunkId {
        let mut raw = [0u8; 20];
        raw[..4].copy_from_slice(&n.to_be_bytes());
        ChunkId(raw)
    }

    #[test]
    fn ranking_is_a_deterministic_permutation() {
        let members = ["a", "b", "c", "d"];
        let r1 = rank(&chunk(1), members);
        let r2 = rank(&chunk(1), ["d", "c", "b", "a"]);
        assert_eq!(r1, r2, "input order does not matter");
        let mut sorted = r1.clone();
        sorted.sort();
        assert_eq!(sorted, members);
    }

    #[test]
    fn load_spreads_over_members() {
        let members = ["n1", "n2", "n3", "n4", "n5"];
        let mut first = std::collections::HashMap::new();
        for i in 0..5000 {
            *first.entry(rank(&chunk(i), members)[0]).or_insert(0) += 1;
        }
        for m in members {
            let n = first[m];
            assert!(
                (800..1200).contains(&n),
                "{m} is first for {n} of 5000 chunks"
            );
        }
    }

    proptest! {
        #[test]
        fn removing_a_member_moves_only_its_chunks(c in any::<u32>(), r in 1usize..4) {
            let all = ["n1", "n2", "n3", "n4", "n5"];
            let before: Vec<_> = rank(&chunk(c), all).into_iter().take(r).collect();
            let gone = "n3";
            let after: Vec<_> = rank(&chunk(c), all.into_iter().filter(|m| *m != gone))
                .into_iter().take(r).collect();
            if !before.contains(&gone) {
                prop_assert_eq!(before, after);
            } else {
                // Survivors keep their copies; one new owner joins.
                for m in before.iter().filter(|m| **m != gone) {
                    prop_assert!(after.contains(m));
                }
            }
        }
    }
}
