//! The difference between two sorted maps: what a map that holds one must be given to hold the
//! other. Pure; the generation writer turns it into map writes.
use std::{cmp::Ordering, collections::BTreeMap};

/// What turns one map into another: keys to write (added, or with a new value), keys to remove.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Changes<'a, K, V> {
    pub written: Vec<(&'a K, &'a V)>,
    pub removed: Vec<&'a K>,
}

impl<K, V> Changes<'_, K, V> {
    pub fn is_empty(&self) -> bool {
        self.written.is_empty() && self.removed.is_empty()
    }
}

/// The changes from `from` to `to`, in one walk over both (each in key order).
pub(super) fn between<'a, K: Ord, V: PartialEq>(
    from: &'a BTreeMap<K, V>,
    to: &'a BTreeMap<K, V>,
) -> Changes<'a, K, V> {
    let mut changes = Changes {
        written: Vec::new(),
        removed: Vec::new(),
    };
    if std::ptr::eq(from, to) {
        return changes;
    }
    let mut old = from.iter().peekable();
    let mut new = to.iter().peekable();
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(&(key, _)), None) => {
                changes.removed.push(key);
                old.next();
            }
            (None, Some(&entry)) => {
                changes.written.push(entry);
                new.next();
            }
            (Some(&(old_key, old_value)), Some(&(new_key, new_value))) => {
                match old_key.cmp(new_key) {
                    Ordering::Less => {
                        changes.removed.push(old_key);
                        old.next();
                    }
                    Ordering::Greater => {
                        changes.written.push((new_key, new_value));
                        new.next();
                    }
                    Ordering::Equal => {
                        if old_value != new_value {
                            changes.written.push((new_key, new_value));
                        }
                        old.next();
                        new.next();
                    }
                }
            }
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(u32, u32)]) -> BTreeMap<u32, u32> {
        entries.iter().copied().collect()
    }

    fn owned(changes: &Changes<'_, u32, u32>) -> (Vec<(u32, u32)>, Vec<u32>) {
        (
            changes.written.iter().map(|(k, v)| (**k, **v)).collect(),
            changes.removed.iter().map(|k| **k).collect(),
        )
    }

    /// Applies `changes` to `from` as the writer does to a map: removals, then writes.
    fn applied(from: &BTreeMap<u32, u32>, changes: &Changes<'_, u32, u32>) -> BTreeMap<u32, u32> {
        let mut result = from.clone();
        for key in &changes.removed {
            result.remove(*key);
        }
        for (key, value) in &changes.written {
            result.insert(**key, **value);
        }
        result
    }

    #[test]
    fn equal_maps_need_no_change() {
        let a = map(&[(1, 10), (2, 20)]);
        let b = a.clone();
        assert_eq!(owned(&between(&a, &b)), (vec![], vec![]));
        assert_eq!(owned(&between(&a, &a)), (vec![], vec![]));
    }

    #[test]
    fn added_changed_and_dropped_keys_are_told_apart() {
        let from = map(&[(1, 10), (2, 20), (4, 40), (6, 60)]);
        let to = map(&[(2, 20), (3, 30), (4, 41), (7, 70)]);
        let changes = between(&from, &to);
        assert_eq!(
            owned(&changes),
            (vec![(3, 30), (4, 41), (7, 70)], vec![1, 6]),
            "3 and 7 are new, 4 has a new value, 1 and 6 are gone; 2 is unchanged"
        );
        assert_eq!(applied(&from, &changes), to);
    }

    #[test]
    fn from_or_to_nothing_is_everything() {
        let empty = BTreeMap::new();
        let full = map(&[(1, 10), (2, 20), (3, 30)]);
        assert_eq!(
            owned(&between(&empty, &full)),
            (vec![(1, 10), (2, 20), (3, 30)], vec![])
        );
        assert_eq!(owned(&between(&full, &empty)), (vec![], vec![1, 2, 3]));
    }

    #[test]
    fn one_change_in_a_large_map_is_one_write() {
        let from: BTreeMap<u32, u32> = (0..100_000).map(|k| (k * 2, k)).collect();
        let mut to = from.clone();
        to.insert(77_777, 1);
        assert_eq!(owned(&between(&from, &to)), (vec![(77_777, 1)], vec![]));
        to.remove(&77_777);
        to.remove(&50_000);
        assert_eq!(owned(&between(&from, &to)), (vec![], vec![50_000]));
    }

    #[test]
    fn applying_the_changes_gives_the_target_for_many_pairs() {
        // Pairs drawn from a small key and value space, so that every kind of change occurs.
        let mut seed = 0x2545_f491_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for _ in 0..500 {
            let mut random_map = || -> BTreeMap<u32, u32> {
                let len = next() % 12;
                (0..len).map(|_| (next() % 16, next() % 3)).collect()
            };
            let (from, to) = (random_map(), random_map());
            let changes = between(&from, &to);
            assert_eq!(applied(&from, &changes), to, "from {from:?} to {to:?}");
            for key in &changes.removed {
                assert!(!to.contains_key(*key), "{key} removed but kept in {to:?}");
            }
            for (key, value) in &changes.written {
                assert_ne!(from.get(*key), Some(*value), "{key} written unchanged");
            }
        }
    }
}
