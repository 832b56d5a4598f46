//! cgroup v2 subtrees owned by one test.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Mount points and filesystem types listed in a `/proc/<pid>/mountinfo` text.
pub fn mounts(mountinfo: &str) -> impl Iterator<Item = (PathBuf, &str)> {
    mountinfo.lines().filter_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mount_point = before.split(' ').nth(4)?;
        let fstype = after.split(' ').next()?;
        Some((PathBuf::from(unescape_mount_path(mount_point)), fstype))
    })
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 mount point: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid.
pub fn cgroup2_mount() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let mount = mounts(&mountinfo)
        .find(|(_, fstype)| *fstype == "cgroup2")
        .map(|(point, _)| point);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_yields_points_and_types_with_escapes_decoded() {
        let text = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                    50 31 0:40 / /mnt/with\\040space rw shared:5 - tmpfs tmpfs rw\n";
        let found: Vec<_> = mounts(text).collect();
        assert_eq!(
            found,
            vec![
                (PathBuf::from("/sys/fs/cgroup/unified"), "cgroup2"),
                (PathBuf::from("/mnt/with space"), "tmpfs"),
            ]
        );
    }
}
