//! `cargo xtask setup`: installs what a fresh machine lacks to build and test ward, and skips
//! what is already there, so it is cheap to run before every build.

use std::{fs, os::unix::fs::symlink, path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::sys::{self, heading, output};

const BPF_LINKER_VERSION: &str = "0.13.0";

/// What the tests, the demo, the benchmarks and the kernel VM harness run.
const DEBIAN_PACKAGES: &[&str] = &[
    "curl",
    "netcat-openbsd",
    "openssl",
    "iproute2",
    "nftables",
    "iperf3",
    "socat",
    // The fail-closed tests: hand-made packets (tests/scripts/ward_packets.py), ping, a real DNS
    // server.
    "python3",
    "iputils-ping",
    "dnsmasq-base",
    // The DNS-aware egress tests: dig, over UDP and TCP, with the status of each answer.
    "bind9-dnsutils",
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "zstd",
    "cpio",
    "xz-utils",
    // cargo xtask image: ring's C parts for the static (musl) build; buildah assembles the image;
    // the deploy tests inspect it with skopeo and run it with podman.
    "musl-tools",
    "buildah",
    "podman",
    // podman's runtime on hybrid cgroup hosts, where crun refuses to run.
    "runc",
    "skopeo",
    // The deploy tests: `systemd-analyze verify` of the units, kubernetes-validate in a venv.
    "systemd",
    "python3-venv",
    // The policy history test keeps its policy directory in a git checkout.
    "git",
    // The control plane's replicas share etcd: the tests run real members, and the etcd
    // client's protocol files are compiled with protoc, which needs the well-known types
    // (google/protobuf/*.proto): a recommendation of protobuf-compiler only, so named here.
    "etcd-server",
    "protobuf-compiler",
    "libprotobuf-dev",
];

/// The Kubernetes OpenAPI validator the deploy tests check the manifests with, pinned.
pub const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

pub fn run() -> Result<()> {
    sys::require_root("setup", "it installs Debian packages and mounts bpffs")?;
    heading("setup: nightly toolchain components");
    nightly_components()?;
    heading(&format!("setup: bpf-linker {BPF_LINKER_VERSION}"));
    bpf_linker()?;
    heading("setup: Debian packages");
    debian_packages()?;
    heading("setup: bpffs");
    bpffs()?;
    heading(&format!("setup: Rust target {}", crate::image::TARGET));
    sys::run(sys::rust_tool("rustup").args(["target", "add", crate::image::TARGET]))?;
    heading(&format!("setup: {KUBERNETES_VALIDATE}"));
    kubernetes_validate()?;
    println!("setup: done");
    Ok(())
}

/// rust-src because the kernel programs build `core` from source; clippy to lint them.
const NIGHTLY_COMPONENTS: [&str; 2] = ["rust-src", "clippy"];

fn nightly_components() -> Result<()> {
    let rustup = || sys::rust_tool("rustup");
    let toolchains = output(rustup().args(["toolchain", "list"]))
        .context("rustup is needed: install it from https://rustup.rs")?;
    if !toolchains.lines().any(|t| t.starts_with("nightly")) {
        sys::run(rustup().args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let installed =
        output(rustup().args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    let present = |c: &str| {
        installed
            .lines()
            .any(|l| l.trim() == c || l.starts_with(&format!("{c}-")))
    };
    let missing: Vec<&str> = NIGHTLY_COMPONENTS
        .into_iter()
        .filter(|c| !present(c))
        .collect();
    if missing.is_empty() {
        println!("nightly {}: present", NIGHTLY_COMPONENTS.join(", "));
        return Ok(());
    }
    sys::run(
        rustup()
            .args(["component", "add", "--toolchain", "nightly"])
            .args(missing),
    )
}

fn bpf_linker() -> Result<()> {
    // Also fails when the binary exists but its libLLVM is gone (a nightly update renames it).
    let version = output(sys::rust_tool("bpf-linker").arg("--version")).unwrap_or_default();
    if version.split_whitespace().nth(1) == Some(BPF_LINKER_VERSION) {
        println!("{}: present", version.trim());
        return Ok(());
    }
    // bpf-linker must link the same LLVM that nightly rustc emits bitcode for. rustup ships that
    // LLVM only as a versioned shared library, so give the build an LLVM prefix whose lib/ holds
    // it under the names the build looks for.
    let sysroot = output(sys::rust_tool("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let llvm_libs: Vec<String> = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("listing {}", sysroot_lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("libLLVM.so."))
        .collect();
    let [llvm_lib] = llvm_libs.as_slice() else {
        bail!(
            "expected one libLLVM.so.* in {}, found {llvm_libs:?}",
            sysroot_lib.display()
        );
    };
    let major = llvm_major(llvm_lib)?;
    let prefix = sys::home().join(".local/share/ward/llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", llvm_lib.as_str()] {
        let link = prefix_lib.join(name);
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("replacing {}", link.display()))?;
        }
        let target = sysroot_lib.join(llvm_lib);
        symlink(&target, &link).with_context(|| format!("linking {}", link.display()))?;
        println!("{} -> {}", link.display(), target.display());
    }
    // --force: an installed bpf-linker of this version whose LLVM went away must be rebuilt.
    sys::run(sys::cargo().env("LLVM_PREFIX", &prefix).args([
        "+nightly",
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        &format!("llvm-{major}"),
        "--force",
    ]))
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` -> 22
fn llvm_major(lib: &str) -> Result<u32> {
    lib.strip_prefix("libLLVM.so.")
        .and_then(|v| v.split(['.', '-']).next())
        .and_then(|major| major.parse().ok())
        .with_context(|| format!("no LLVM major version in {lib:?}"))
}

fn debian_packages() -> Result<()> {
    // dpkg-query exits non-zero when it has never heard of a package: parse, don't trust the status.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Status}\n"])
        .args(DEBIAN_PACKAGES)
        .output()
        .context("running dpkg-query (is this a Debian machine?)")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !listed.lines().any(|l| l == format!("{p} installed")))
        .collect();
    if missing.is_empty() {
        println!("all present: {}", DEBIAN_PACKAGES.join(" "));
        return Ok(());
    }
    println!("missing: {}", missing.join(" "));
    sys::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("update"),
    )?;
    sys::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
}

/// The venv the deploy tests find kubernetes-validate in (tests/tests/deploy.rs).
pub fn validator_venv() -> std::path::PathBuf {
    sys::home().join(".local/share/ward/venv")
}

/// The kubernetes-validate the deploy tests run (`WARD_KUBERNETES_VALIDATE`).
pub fn validator() -> std::path::PathBuf {
    validator_venv().join("bin/kubernetes-validate")
}

fn kubernetes_validate() -> Result<()> {
    let venv = validator_venv();
    let pip = venv.join("bin/pip");
    let wanted = KUBERNETES_VALIDATE.replace("==", " ");
    let installed = output(Command::new(&pip).args(["show", "kubernetes-validate"]))
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("Version: ").map(str::to_owned))
        });
    if installed.is_some_and(|v| format!("kubernetes-validate {v}") == wanted) {
        println!("{wanted}: present in {}", venv.display());
        return Ok(());
    }
    sys::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    sys::run(Command::new(&pip).args(["install", "--quiet", KUBERNETES_VALIDATE]))
}

fn bpffs() -> Result<()> {
    let target = Path::new("/sys/fs/bpf");
    if ward_host::mountinfo::mount_points(&ward_host::mountinfo::read()?, "bpf")
        .any(|m| m == target)
    {
        println!("bpffs: mounted at {}", target.display());
        return Ok(());
    }
    fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    sys::run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_comes_from_the_library_name() {
        assert_eq!(
            llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly").unwrap(),
            22
        );
        assert_eq!(llvm_major("libLLVM.so.19").unwrap(), 19);
        assert!(llvm_major("libLLVM-22.so").is_err());
    }
}
