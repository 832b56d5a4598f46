//! Numeric identities: the ranges the kernel's maps use, and how a workload gets its number.
//!
//! Identities below [`FIRST_WORKLOAD`] are reserved (`agent_common::IDENTITY_ANY`, `_HOST`,
//! `_WORLD`); workloads get numbers in `FIRST_WORKLOAD..=LAST_WORKLOAD`, the CIDRs of policy
//! rules from [`FIRST_CIDR`] up, and their DNS-name selectors ([`crate::FqdnSelector`]) numbers
//! in [`FQDN_SELECTORS`].
//!
//! An identity is what a policy can tell apart: a SPIFFE ID with a namespace and a set of labels
//! ([`key`]). Workloads that share all three share a number; the pods of one Kubernetes service
//! account with different labels get one number each (and one certificate, the SPIFFE ID's).
//! A number is a hash of its key, so the same key gets the same number on every start and every
//! node without coordination; a collision moves the later key to the next free number. The
//! agent (local mode) and the control plane both allocate with [`allocate`].

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
/// The first identity of a DNS-name selector, far above the CIDRs.
pub const FIRST_FQDN_SELECTOR: u32 = agent_common::FIRST_FQDN_SELECTOR;
/// The last identity of a DNS-name selector.
pub const LAST_FQDN_SELECTOR: u32 = agent_common::LAST_FQDN_SELECTOR;
/// Every identity of a DNS-name selector.
pub const FQDN_SELECTORS: RangeInclusive<u32> = FIRST_FQDN_SELECTOR..=LAST_FQDN_SELECTOR;

/// Whether `identity` is in the workload range.
pub fn is_workload(identity: u32) -> bool {
    WORKLOADS.contains(&identity)
}

/// The identity key of a workload: its SPIFFE ID alone when it has no namespace and no labels;
/// otherwise the SPIFFE ID, the namespace and each `label=value` in label order, separated by
/// spaces (which no SPIFFE ID holds), with `%`, ` ` and `=` inside a namespace, label or value
/// percent-encoded. So the key is readable and two different workloads never share one.
pub fn key(spiffe_id: &str, namespace: Option<&str>, labels: &BTreeMap<String, String>) -> String {
    fn escaped(text: &str, out: &mut String) {
        for c in text.chars() {
            match c {
                '%' => out.push_str("%25"),
                ' ' => out.push_str("%20"),
                '=' => out.push_str("%3D"),
                c => out.push(c),
            }
        }
    }
    let mut out = spiffe_id.to_string();
    if let Some(namespace) = namespace {
        // The one part without a bare `=`.
        out.push(' ');
        escaped(namespace, &mut out);
    }
    for (label, value) in labels {
        out.push(' ');
        escaped(label, &mut out);
        out.push('=');
        escaped(value, &mut out);
    }
    out
}

/// The number `key` ([`key`]) gets when nothing else holds it: FNV-1a of its bytes into the
/// range.
pub fn preferred(key: &str) -> u32 {
    let hash = key.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    FIRST_WORKLOAD + hash % span()
}

fn span() -> u32 {
    LAST_WORKLOAD - FIRST_WORKLOAD + 1
}

/// The number of a new key: its [`preferred`] number, or the next one upwards (wrapping around
/// the range) that `taken` does not hold.
///
/// # Panics
/// When every number of the range is taken (16 million workload identities).
pub fn allocate(key: &str, taken: impl Fn(u32) -> bool) -> u32 {
    let mut identity = preferred(key);
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

/// Numbers for a set of keys allocated together, collisions resolved in key order, so the
/// result does not depend on the order the keys come in.
pub fn allocate_all(keys: impl IntoIterator<Item = String>) -> BTreeMap<String, u32> {
    let ids: BTreeSet<String> = keys.into_iter().collect();
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
    fn a_key_tells_namespaces_and_label_sets_apart_and_reads_as_written() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let id = "spiffe://x/ns/shop/sa/default";
        assert_eq!(key(id, None, &BTreeMap::new()), id);
        assert_eq!(
            key(id, Some("shop"), &labels(&[("tier", "fe"), ("app", "web")])),
            "spiffe://x/ns/shop/sa/default shop app=web tier=fe"
        );
        // Texts that would read alike unescaped stay apart.
        let keys = [
            key(id, Some("a=b"), &BTreeMap::new()),
            key(id, None, &labels(&[("a", "b")])),
            key(id, None, &labels(&[("a", "b c=d")])),
            key(id, None, &labels(&[("a", "b"), ("c", "d")])),
            key(id, Some("a"), &labels(&[("b", "")])),
            key(id, None, &labels(&[("a b", "")])),
        ];
        let distinct: BTreeSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "{keys:?}");
    }

    #[test]
    fn the_ranges_follow_the_reserved_identities() {
        use agent_common::{IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD, REMOTE_ISOLATION};
        assert!([IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD]
            .iter()
            .all(|r| *r < FIRST_WORKLOAD));
        assert_eq!((FIRST_WORKLOAD, FIRST_CIDR), (256, 0x0100_0000));
        assert!(!is_workload(FIRST_CIDR) && !is_workload(FIRST_WORKLOAD - 1));
        assert!(FIRST_CIDR < FIRST_FQDN_SELECTOR && !FQDN_SELECTORS.contains(&REMOTE_ISOLATION));
        assert!(!FQDN_SELECTORS.contains(&agent_common::FIRST_FQDN_NAME));
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
