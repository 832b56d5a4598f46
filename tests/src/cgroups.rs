//! cgroup v2 subtrees owned by one test.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ward_host::mountinfo;

/// The cgroup v2 mount point: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid.
pub fn cgroup2_mount() -> PathBuf {
    let mounts = mountinfo::read().unwrap_or_else(|e| panic!("{e}"));
    let mount = mountinfo::cgroup2_root(&mounts).map(Path::to_owned);
    mount.expect(
        "PRIVILEGED TEST NOT RUN: no cgroup2 filesystem is mounted (see /proc/self/mountinfo)",
    )
}

/// `<cgroup2 mount>/ward-test-<tag>-<pid>` and the workload cgroups below it.
///
/// Dropping it kills every process left in the subtree and removes the cgroups bottom-up.
pub struct TestCgroups {
    root: PathBuf,
}

impl TestCgroups {
    pub fn new(tag: &str) -> Self {
        crate::require_root();
        let root = cgroup2_mount().join(crate::unique_name(tag));
        if root.exists() {
            // A leftover of a killed run with the same pid: it is ours to clear.
            remove_subtree(&root);
        }
        std::fs::create_dir(&root)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", root.display()));
        TestCgroups { root }
    }

    /// The subtree's root, the `cgroupRoot` of the ward under test.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The absolute path of `relative` below the root, whether or not it exists yet.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// Creates `relative` (and its parents) below the root and returns its absolute path.
    pub fn create(&self, relative: &str) -> PathBuf {
        let path = self.path(relative);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        path
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        remove_subtree(&self.root);
    }
}

fn remove_subtree(root: &Path) {
    // cgroup.kill (5.14+) reaches every process in the subtree, including ones a test forgot.
    let _ = std::fs::write(root.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while populated(root) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    remove_bottom_up(root);
}

fn populated(cgroup: &Path) -> bool {
    std::fs::read_to_string(cgroup.join("cgroup.events"))
        .map(|events| events.lines().any(|line| line == "populated 1"))
        .unwrap_or(false)
}

fn remove_bottom_up(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_bottom_up(&entry.path());
            }
        }
    }
    // Cleanup runs in Drop, often while a test panics: report, never panic again.
    if let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("ward-tests: could not remove cgroup {}: {e}", dir.display());
        }
    }
}
