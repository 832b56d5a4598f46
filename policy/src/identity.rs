//! Numeric identities: the ranges the kernel's maps use, and how a SPIFFE ID gets its number.
//!
//! Identities below [`FIRST_WORKLOAD`] are reserved (`agent_common::IDENTITY_ANY`, `_HOST`,
//! `_WORLD`); workloads get numbers in `FIRST_WORKLOAD..=LAST_WORKLOAD`, and the CIDRs of policy
//! rules from [`FIRST_CIDR`] up. A workload's number is a hash of its SPIFFE ID, so the same ID
//! gets the same number on every start and every node without coordination; a collision moves
//! the later ID to the next free number. The agent (local mode) and the control plane both
//! allocate with [`allocate`].

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;

/// The first workload identity; the values below are reserved.
pub const FIRST_WORKLOAD: u32 = 256;
/// The last workload identity.
pub const LAST_WORKLOAD: u32 = 0x00FF_FFFF;
/// The first identity of the CIDR range, just above the workload range.
pub const FIRST_CIDR: u32 = LAST_WORKLOAD + 1;
/// Every workload identity.
pub const WORKLOADS: RangeInclusive<u32> = FIRST_WORKLOAD..=LAST_WORKLOAD;

/// Whether `identity` is in the workload range.
pub fn is_workload(identity: u32) -> bool {
    WORKLOADS.contains(&identity)
}

/// The number `spiffe_id` gets when nothing else holds it: FNV-1a of its bytes into the range.
pub fn preferred(spiffe_id: &str) -> u32 {
    let hash = spiffe_id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    FIRST_WORKLOAD + hash % span()
}

fn span() -> u32 {
    LAST_WORKLOAD - FIRST_WORKLOAD + 1
}

/// The number of a new SPIFFE ID: its [`preferred`] number, or the next one upwards (wrapping
/// around the range) that `taken` does not hold.
///
/// # Panics
/// When every number of the range is taken (16 million workload identities).
pub fn allocate(spiffe_id: &str, taken: impl Fn(u32) -> bool) -> u32 {
    let mut identity = preferred(spiffe_id);
    for _ in 0..span() {
        if !taken(identity) {
            return identity;
        }
        identity = if identity == LAST_WORKLOAD {
            FIRST_WORKLOAD
        } else {
            identity + 1
        };
    }
    panic!("every workload identity is taken")
}

/// Numbers for a set of SPIFFE IDs allocated together, collisions resolved in SPIFFE ID order,
/// so the result does not depend on the order the IDs come in.
pub fn allocate_all(spiffe_ids: impl IntoIterator<Item = String>) -> BTreeMap<String, u32> {
    let ids: BTreeSet<String> = spiffe_ids.into_iter().collect();
    let mut taken = BTreeSet::new();
    let mut out = BTreeMap::new();
    for id in ids {
        let identity = allocate(&id, |i| taken.contains(&i));
        taken.insert(identity);
        out.insert(id, identity);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranges_follow_the_reserved_identities() {
        use agent_common::{IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD};
        assert!([IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD]
            .iter()
            .all(|r| *r < FIRST_WORKLOAD));
        assert_eq!((FIRST_WORKLOAD, FIRST_CIDR), (256, 0x0100_0000));
        assert!(!is_workload(FIRST_CIDR) && !is_workload(FIRST_WORKLOAD - 1));
    }

    #[test]
    fn numbers_are_the_fnv1a_hash_of_the_spiffe_id() {
        // Pinned: agents and control planes of other versions must agree on every number.
        assert_eq!(preferred("spiffe://x/a"), 3_747_744);
        assert_eq!(
            preferred("spiffe://example.org/ns/demo/sa/web"),
            preferred("spiffe://example.org/ns/demo/sa/web")
        );
        assert!(WORKLOADS.contains(&preferred("")));
    }

    #[test]
    fn collisions_probe_upwards_and_wrap() {
        let id = preferred("spiffe://x/b");
        assert_eq!(allocate("spiffe://x/b", |i| i == id), id + 1);
        assert_eq!(allocate("spiffe://x/b", |i| i >= id), FIRST_WORKLOAD);
    }

    #[test]
    fn sets_allocate_the_same_whatever_the_order() {
        let a = allocate_all(["spiffe://x/a".to_string(), "spiffe://x/b".to_string()]);
        let b = allocate_all([
            "spiffe://x/b".to_string(),
            "spiffe://x/a".to_string(),
            "spiffe://x/c".to_string(),
        ]);
        assert_eq!(a["spiffe://x/a"], b["spiffe://x/a"]);
        assert_ne!(a["spiffe://x/a"], a["spiffe://x/b"]);
        assert!(b.values().all(|id| is_workload(*id)));
    }
}
