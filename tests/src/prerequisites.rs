//! What every privileged test needs before it starts, checked loudly.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

/// Fails the test unless it runs as root with a `ward` binary at hand, and makes sure bpffs is
/// mounted (as `cargo xtask setup` does) so that ward's pin directory can exist.
pub fn require_privileges() {
    require_root();
    ward_bin();
    static BPFFS: Once = Once::new();
    BPFFS.call_once(mount_bpffs_if_absent);
}

/// Fails the test unless it runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "PRIVILEGED TEST NOT RUN: ward's end-to-end tests need root (cgroups, bpffs, network \
         namespaces, eBPF); run them as root, e.g. `sudo -E cargo test -p ward-tests`"
    );
}

/// Fails the test unless each of `programs` is on `PATH`; each comes with the Debian package
/// `cargo xtask setup` installs it from, named in the message.
pub fn require_programs(programs: &[(&str, &str)]) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for (program, package) in programs {
        let found = std::env::split_paths(&path).any(|dir| dir.join(program).is_file());
        assert!(
            found,
            "PRIVILEGED TEST NOT RUN: {program} is not installed (Debian package {package}); run \
             `cargo xtask setup`"
        );
    }
}

/// The `ward` binary under test: `$WARD_BIN`, else `target/debug/ward` of this workspace.
pub fn ward_bin() -> PathBuf {
    workspace_bin("ward", "WARD_BIN", "ward-agent")
}

/// The `ward-control` binary: `$WARD_CONTROL_BIN`, else `target/debug/ward-control`.
pub fn control_bin() -> PathBuf {
    workspace_bin("ward-control", "WARD_CONTROL_BIN", "ward-control")
}

/// Binary `name` of package `package`: `$<variable>`, else next to the test executable's
/// profile directory (test executables live in target/<profile>/deps/), else next to the test
/// executable itself (where a runner that copies binaries, such as the VM harness, puts it).
fn workspace_bin(name: &str, variable: &str, package: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(variable) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "PRIVILEGED TEST NOT RUN: {variable}={} is not a file",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().expect("the test executable's own path");
    let in_profile = exe
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|dir| dir == "deps"))
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join(name));
    let beside = exe.parent().map(|dir| dir.join(name));
    match [in_profile, beside]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
    {
        Some(path) => path,
        None => panic!(
            "PRIVILEGED TEST NOT RUN: no {name} binary; build it (`cargo build -p {package}`) or \
             set {variable} to its absolute path (looked next to {})",
            exe.display()
        ),
    }
}

/// `ward-test-<tag>-<pid>`, plus a counter when a process asks for the same tag twice, so that
/// parallel tests and leftover state of an earlier run never collide.
pub fn unique_name(tag: &str) -> String {
    static SEQUENCE: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id();
    match SEQUENCE.fetch_add(1, Ordering::Relaxed) {
        0 => format!("ward-test-{tag}-{pid}"),
        n => format!("ward-test-{tag}-{pid}-{n}"),
    }
}

fn mount_bpffs_if_absent() {
    let mounts = ward_host::mountinfo::read().unwrap_or_else(|e| panic!("{e}"));
    let mounted = ward_host::mountinfo::mount_points(&mounts, "bpf")
        .any(|point| point == std::path::Path::new("/sys/fs/bpf"));
    if mounted {
        return;
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .expect("run mount");
    assert!(
        status.success(),
        "PRIVILEGED TEST NOT RUN: bpffs is not mounted at /sys/fs/bpf and mounting it failed \
         ({status}); run `cargo xtask setup`"
    );
}
