//! Watches the cgroup tree below the root ward attaches to, so workloads that start after ward are
//! enforced as soon as their cgroup appears.
use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use futures_util::StreamExt as _;
use inotify::{EventStream, Inotify, WatchMask};

/// cgroup id (the directory's inode number, as `bpf_get_current_cgroup_id` reports it) → path
/// relative to the root.
pub type CgroupTree = BTreeMap<u64, PathBuf>;

/// Every cgroup below `root` (the root itself excluded).
pub fn scan(root: &Path) -> std::io::Result<CgroupTree> {
    let mut out = CgroupTree::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            // A cgroup removed while we walk: it is gone, not an error.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let Ok(entry) = entry else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                let path = entry.path();
                let relative = path.strip_prefix(root).expect("below root").to_owned();
                out.insert(meta.ino(), relative);
                pending.push(path);
            }
        }
    }
    Ok(out)
}

pub struct CgroupWatcher {
    root: PathBuf,
    events: EventStream<Vec<u8>>,
}

impl CgroupWatcher {
    pub fn new(root: &Path) -> std::io::Result<Self> {
        let inotify = Inotify::init()?;
        let events = inotify.into_event_stream(vec![0u8; 64 * 1024])?;
        let watcher = CgroupWatcher {
            root: root.to_owned(),
            events,
        };
        watcher.watch_all()?;
        Ok(watcher)
    }

    /// Adds a watch on every directory of the tree (adding an existing watch is a no-op) and
    /// returns the tree. A directory created inside another before that one's watch was added
    /// raised no event, so the tree is scanned again after the watches are in place until a scan
    /// finds nothing new: every directory in the returned tree is watched.
    fn watch_all(&self) -> std::io::Result<CgroupTree> {
        let mask = WatchMask::CREATE | WatchMask::DELETE | WatchMask::ONLYDIR;
        let mut watches = self.events.watches();
        watches.add(&self.root, mask)?;
        let mut watched = CgroupTree::new();
        loop {
            let tree = scan(&self.root)?;
            if tree.keys().all(|id| watched.contains_key(id)) {
                return Ok(tree);
            }
            for (id, relative) in &tree {
                if watched.contains_key(id) {
                    continue;
                }
                match watches.add(self.root.join(relative), mask) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    r => {
                        r?;
                    }
                }
            }
            watched = tree;
        }
    }

    /// Waits until the tree changes, then returns it as it is now.
    pub async fn changed(&mut self) -> std::io::Result<CgroupTree> {
        match self.events.next().await {
            Some(event) => {
                event?;
            }
            None => return Err(std::io::Error::other("inotify stream ended")),
        }
        self.watch_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_lists_nested_directories_relative_to_the_root() {
        let root = std::env::temp_dir().join(format!("ward-scan-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::fs::create_dir_all(root.join("c")).expect("mkdir");
        let tree = scan(&root).expect("scan");
        let mut paths: Vec<_> = tree.values().cloned().collect();
        paths.sort();
        std::fs::remove_dir_all(&root).expect("cleanup");
        assert_eq!(
            paths,
            vec![PathBuf::from("a"), PathBuf::from("a/b"), PathBuf::from("c")]
        );
    }
}
