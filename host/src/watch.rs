//! Following files a program reads: [`Watcher::changed`] returns once something read through a
//! watched path changed and the writing has settled.
//!
//! Each watched path is followed through inotify on its directory, so a file that is replaced
//! (written elsewhere and renamed over), moved out, deleted or created is seen as well as one
//! written in place. A Kubernetes ConfigMap volume shows its files as symlinks through `..data`
//! (`policy.yaml -> ..data/policy.yaml`, `..data -> ..2026_01_01_00_00_00.1234`) and updates them
//! all at once by renaming a new `..data` over the old: a watched file, or an entry of a watched
//! directory, that is a symlink through the renamed entry counts as changed.
use std::{
    collections::HashMap,
    ffi::{OsStr, OsString},
    path::{Component, Path, PathBuf},
    time::Duration,
};

use futures_util::StreamExt as _;
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask};
use tokio::time::Instant;

/// Editors and `git checkout` write in several steps, microseconds to a few milliseconds apart
/// (only completed writes are events: close after writing, rename, create, delete): a change is
/// reported once the watched paths have been quiet this long...
pub const SETTLE: Duration = Duration::from_millis(20);
/// ...or after this long at most, so a steady trickle of writes cannot hold changes back.
pub const SETTLE_MAX: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("watching {path}: {source}")]
    Add {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading file change events: {0}")]
    Events(std::io::Error),
    #[error("the file change event stream ended")]
    Ended,
}

/// Which entries of a watched directory the caller reads.
pub type EntryFilter = fn(&OsStr) -> bool;

/// Every entry of a directory.
pub fn every_entry(_: &OsStr) -> bool {
    true
}

enum Interest {
    /// One file of the directory, by name.
    File(OsString),
    /// The directory's entries that pass the filter.
    Entries(EntryFilter),
}

struct WatchedDir {
    path: PathBuf,
    interests: Vec<Interest>,
}

/// Watches files and directories; see the module documentation.
pub struct Watcher {
    inotify: Option<Inotify>,
    events: Option<EventStream<Vec<u8>>>,
    dirs: HashMap<WatchDescriptor, WatchedDir>,
    settle: Duration,
    settle_max: Duration,
    /// A change seen and not reported yet: report it once quiet, or at the deadline.
    settling: Option<Settling>,
}

#[derive(Clone, Copy)]
struct Settling {
    quiet_at: Instant,
    deadline: Instant,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dirs: Vec<&Path> = self.dirs.values().map(|d| d.path.as_path()).collect();
        f.debug_struct("Watcher")
            .field("dirs", &dirs)
            .field("settle", &self.settle)
            .field("settle_max", &self.settle_max)
            .finish_non_exhaustive()
    }
}

const MASK: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF);

impl Watcher {
    pub fn new() -> Result<Self, WatchError> {
        let inotify = Inotify::init().map_err(|source| WatchError::Add {
            path: PathBuf::from("(inotify)"),
            source,
        })?;
        Ok(Watcher {
            inotify: Some(inotify),
            events: None,
            dirs: HashMap::new(),
            settle: SETTLE,
            settle_max: SETTLE_MAX,
            settling: None,
        })
    }

    /// Other settling times than [`SETTLE`] and [`SETTLE_MAX`].
    pub fn with_settle(mut self, quiet: Duration, max: Duration) -> Self {
        self.settle = quiet;
        self.settle_max = max;
        self
    }

    /// Watches one file (which need not exist yet; its directory must).
    pub fn watch_file(&mut self, file: &Path) -> Result<(), WatchError> {
        let name = file.file_name().ok_or_else(|| WatchError::Add {
            path: file.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "names no file"),
        })?;
        let dir = match file.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        self.add(dir, Interest::File(name.to_owned()))
    }

    /// Watches the entries of a directory that `reads` accepts (by name).
    pub fn watch_dir(&mut self, dir: &Path, reads: EntryFilter) -> Result<(), WatchError> {
        self.add(dir, Interest::Entries(reads))
    }

    /// A directory's entries that `dir_reads` accepts when `path` is a directory, else the file.
    pub fn watch_path(&mut self, path: &Path, dir_reads: EntryFilter) -> Result<(), WatchError> {
        if path.is_dir() {
            self.watch_dir(path, dir_reads)
        } else {
            self.watch_file(path)
        }
    }

    fn add(&mut self, dir: &Path, interest: Interest) -> Result<(), WatchError> {
        let add_err = |source| WatchError::Add {
            path: dir.to_owned(),
            source,
        };
        let inotify = match &mut self.inotify {
            Some(inotify) => inotify,
            None => {
                return Err(add_err(std::io::Error::other(
                    "paths are added before the first wait for changes",
                )))
            }
        };
        let wd = inotify.watches().add(dir, MASK).map_err(add_err)?;
        self.dirs
            .entry(wd)
            .or_insert_with(|| WatchedDir {
                path: dir.to_owned(),
                interests: Vec::new(),
            })
            .interests
            .push(interest);
        Ok(())
    }

    /// Waits for a change to something watched, then until the paths have been quiet for the
    /// settling time (or the maximum has passed). An overflowed event queue counts as a change.
    ///
    /// Cancel-safe, for `tokio::select!`: a change seen before the future was dropped is still
    /// reported by the next call.
    pub async fn changed(&mut self) -> Result<(), WatchError> {
        if self.events.is_none() {
            let inotify = self.inotify.take().expect("inotify before its stream");
            self.events = Some(
                inotify
                    .into_event_stream(vec![0u8; 64 * 1024])
                    .map_err(WatchError::Events)?,
            );
        }
        loop {
            match self.settling {
                None => {
                    if self.next_is_relevant().await? {
                        let now = Instant::now();
                        self.settling = Some(Settling {
                            quiet_at: now + self.settle,
                            deadline: now + self.settle_max,
                        });
                    }
                }
                Some(Settling { quiet_at, deadline }) => {
                    match tokio::time::timeout_at(quiet_at.min(deadline), self.next_is_relevant())
                        .await
                    {
                        Ok(Ok(true)) => {
                            let quiet_at = Instant::now() + self.settle;
                            self.settling = Some(Settling { quiet_at, deadline });
                        }
                        Ok(Ok(false)) => {}
                        Ok(Err(e)) => return Err(e),
                        Err(_elapsed) => {
                            self.settling = None;
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    async fn next_is_relevant(&mut self) -> Result<bool, WatchError> {
        let events = self.events.as_mut().expect("event stream");
        let event = match events.next().await {
            Some(Ok(event)) => event,
            Some(Err(e)) => return Err(WatchError::Events(e)),
            None => return Err(WatchError::Ended),
        };
        if event.mask.contains(EventMask::Q_OVERFLOW) {
            return Ok(true);
        }
        let Some(dir) = self.dirs.get(&event.wd) else {
            return Ok(false);
        };
        if event
            .mask
            .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED)
        {
            return Ok(true);
        }
        Ok(event
            .name
            .as_deref()
            .is_some_and(|name| dir.is_relevant(name)))
    }
}

impl WatchedDir {
    /// Whether a change to entry `name` changes what the caller reads: the entry itself, or an
    /// entry read through it as a symlink (ConfigMap's `..data`).
    fn is_relevant(&self, name: &OsStr) -> bool {
        if self.reads(name) {
            return true;
        }
        let read_through = |entry: &OsStr| {
            std::fs::read_link(self.path.join(entry))
                .ok()
                .and_then(|target| first_relative_component(&target))
                .is_some_and(|first| first == name)
        };
        let mut names: Vec<OsString> = Vec::new();
        for interest in &self.interests {
            match interest {
                Interest::File(file) => names.push(file.clone()),
                Interest::Entries(reads) => {
                    if let Ok(entries) = std::fs::read_dir(&self.path) {
                        names.extend(
                            entries
                                .flatten()
                                .map(|e| e.file_name())
                                .filter(|entry| reads(entry)),
                        );
                    }
                }
            }
        }
        names.iter().any(|entry| read_through(entry))
    }

    fn reads(&self, name: &OsStr) -> bool {
        self.interests.iter().any(|interest| match interest {
            Interest::File(file) => file == name,
            Interest::Entries(reads) => reads(name),
        })
    }
}

/// `..data` of `..data/policy.yaml`; `None` for absolute targets and ones that leave the
/// directory (`../x`).
fn first_relative_component(target: &Path) -> Option<OsString> {
    match target.components().find(|c| *c != Component::CurDir)? {
        Component::Normal(first) => Some(first.to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    const QUICK_SETTLE: Duration = Duration::from_millis(50);
    /// How long a test waits for a change that must come; one that must not come is given
    /// [`QUIET_WAIT`].
    const CHANGE_WAIT: Duration = Duration::from_secs(5);
    const QUIET_WAIT: Duration = Duration::from_millis(300);

    fn is_yaml(name: &OsStr) -> bool {
        Path::new(name)
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml")
    }

    async fn expect_change(watcher: &mut Watcher, what: &str) {
        match tokio::time::timeout(CHANGE_WAIT, watcher.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{what}: {e}"),
            Err(_) => panic!("{what}: no change reported within {CHANGE_WAIT:?}"),
        }
    }

    async fn expect_no_change(watcher: &mut Watcher, what: &str) {
        if let Ok(result) = tokio::time::timeout(QUIET_WAIT, watcher.changed()).await {
            panic!("{what}: a change was reported ({result:?})");
        }
    }

    fn file_watcher(file: &Path) -> Watcher {
        let mut watcher = Watcher::new().expect("inotify");
        watcher.watch_file(file).expect("watch");
        watcher
    }

    /// A temporary directory holding `ward.yaml` with `text`, and a watcher of that file.
    fn watched_file(text: &str) -> (tempfile::TempDir, PathBuf, Watcher) {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("ward.yaml");
        std::fs::write(&file, text).expect("write");
        let watcher = file_watcher(&file);
        (dir, file, watcher)
    }

    fn yaml_dir_watcher(dir: &Path) -> Watcher {
        let mut watcher = Watcher::new().expect("inotify");
        watcher.watch_dir(dir, is_yaml).expect("watch");
        watcher
    }

    #[tokio::test]
    async fn a_file_written_in_place_is_a_change_and_its_neighbours_are_not() {
        let (dir, file, mut watcher) = watched_file("a");
        std::fs::write(dir.path().join("other.yaml"), "x").expect("write neighbour");
        expect_no_change(&mut watcher, "a neighbour written").await;
        std::fs::write(&file, "b").expect("write");
        expect_change(&mut watcher, "the file written").await;
    }

    #[tokio::test]
    async fn a_file_moved_in_over_the_watched_one_is_a_change() {
        let (dir, file, mut watcher) = watched_file("a");
        let outside = tempfile::tempdir_in(dir.path().parent().expect("parent")).expect("dir");
        let new = outside.path().join("new.yaml");
        std::fs::write(&new, "b").expect("write");
        std::fs::rename(&new, &file).expect("move in");
        expect_change(&mut watcher, "a file moved in").await;
    }

    #[tokio::test]
    async fn a_file_moved_out_of_a_watched_directory_is_a_change() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outside = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("allow.yaml"), "a").expect("write");
        let mut watcher = yaml_dir_watcher(dir.path());
        std::fs::rename(
            dir.path().join("allow.yaml"),
            outside.path().join("allow.yaml"),
        )
        .expect("move out");
        expect_change(&mut watcher, "a policy file moved out").await;
    }

    #[tokio::test]
    async fn a_deleted_file_is_a_change_and_entries_the_filter_refuses_are_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("allow.yaml"), "a").expect("write");
        let mut watcher = yaml_dir_watcher(dir.path());
        std::fs::write(dir.path().join("notes.txt"), "x").expect("write");
        std::fs::write(dir.path().join(".allow.yaml.swp"), "x").expect("write");
        expect_no_change(&mut watcher, "files the caller does not read").await;
        std::fs::remove_file(dir.path().join("allow.yaml")).expect("delete");
        expect_change(&mut watcher, "a policy file deleted").await;
    }

    /// What the kubelet does to a ConfigMap volume: files are symlinks through `..data`, and an
    /// update writes a new timestamped directory, points `..data_tmp` at it and renames that
    /// over `..data`.
    fn configmap(dir: &Path, version: &str, files: &[(&str, &str)]) {
        let data = dir.join(format!("..{version}"));
        std::fs::create_dir(&data).expect("data dir");
        for (name, text) in files {
            std::fs::write(data.join(name), text).expect("write");
            let link = dir.join(name);
            if link.symlink_metadata().is_err() {
                symlink(Path::new("..data").join(name), &link).expect("file link");
            }
        }
        let tmp = dir.join("..data_tmp");
        symlink(format!("..{version}"), &tmp).expect("data link");
        std::fs::rename(&tmp, dir.join("..data")).expect("swap");
    }

    #[tokio::test]
    async fn a_configmap_data_swap_changes_a_watched_file_read_through_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        configmap(dir.path(), "2026_01_01_00_00_00.1", &[("ward.yaml", "a")]);
        let file = dir.path().join("ward.yaml");
        let mut watcher = file_watcher(&file);
        configmap(dir.path(), "2026_01_01_00_01_00.2", &[("ward.yaml", "b")]);
        std::fs::remove_dir_all(dir.path().join("..2026_01_01_00_00_00.1")).expect("old data");
        expect_change(&mut watcher, "the ..data swap").await;
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "b");
    }

    #[tokio::test]
    async fn a_configmap_data_swap_changes_a_watched_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        configmap(dir.path(), "1", &[("allow.yaml", "a")]);
        let mut watcher = yaml_dir_watcher(dir.path());
        configmap(dir.path(), "2", &[("allow.yaml", "b")]);
        expect_change(&mut watcher, "the ..data swap").await;
    }

    #[tokio::test]
    async fn a_burst_of_writes_is_one_change_after_it_settles() {
        let (_dir, file, watcher) = watched_file("0");
        let mut watcher = watcher.with_settle(QUICK_SETTLE, Duration::from_secs(10));
        let writer = {
            let file = file.clone();
            std::thread::spawn(move || {
                for i in 1..=10 {
                    std::fs::write(&file, i.to_string()).expect("write");
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        expect_change(&mut watcher, "the burst").await;
        writer.join().expect("writer");
        assert_eq!(
            std::fs::read_to_string(&file).expect("read"),
            "10",
            "the change is reported only after the last write of the burst"
        );
        expect_no_change(&mut watcher, "after the burst was reported").await;
    }

    #[tokio::test]
    async fn a_steady_trickle_is_reported_after_the_maximum() {
        let (_dir, file, watcher) = watched_file("0");
        let mut watcher =
            watcher.with_settle(Duration::from_millis(200), Duration::from_millis(300));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (file, stop) = (file.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::fs::write(&file, "x").expect("write");
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        expect_change(&mut watcher, "a trickle that never pauses").await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().expect("writer");
    }

    #[tokio::test]
    async fn a_change_seen_by_a_cancelled_wait_is_reported_by_the_next() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("ward.yaml");
        let mut watcher =
            file_watcher(&file).with_settle(Duration::from_millis(300), Duration::from_secs(1));
        std::fs::write(&file, "a").expect("write");
        // As in a `select!` whose other branch fires while the watcher settles.
        let cancelled = tokio::time::timeout(Duration::from_millis(100), watcher.changed()).await;
        assert!(
            cancelled.is_err(),
            "reported before settling: {cancelled:?}"
        );
        expect_change(&mut watcher, "the change the cancelled wait saw").await;
    }

    #[test]
    fn a_missing_directory_is_named() {
        let mut watcher = Watcher::new().expect("inotify");
        let err = watcher
            .watch_dir(Path::new("/nonexistent/ward-policies"), every_entry)
            .expect_err("no such directory");
        assert!(
            err.to_string().contains("/nonexistent/ward-policies"),
            "{err}"
        );
    }
}
