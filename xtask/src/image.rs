//! `cargo xtask image`: the OCI image of `ward` and `ward-control`, from this repository alone.
//!
//! The binaries are built static (musl), so the image has no base to pull: one layer with
//! `/usr/local/bin/ward` and `/usr/local/bin/ward-control`, assembled by buildah from `scratch`
//! and saved as an OCI archive under `target/image/`, tagged with the crate version, the
//! reference deploy/kubernetes/daemonset.yaml names.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};

use crate::sys::{self, heading, output};

/// Where the DaemonSet pulls the image from.
pub const REPOSITORY: &str = "ghcr.io/ward-dev/ward";
/// The Rust target of the image's binaries: static, so the image needs no libc.
pub const TARGET: &str = "x86_64-unknown-linux-musl";
const SOURCE: &str = "https://github.com/ward-dev/ward";

#[derive(clap::Args)]
pub struct Args {
    /// An unoptimised build, tagged `<version>-debug` (what `cargo xtask test` runs: the release
    /// build is the slow part and the tests are about the image, not the code's speed).
    #[arg(long)]
    pub debug: bool,
}

/// The image's tag: the crate version, `-debug` for an unoptimised build.
pub fn tag(debug: bool) -> String {
    let version = env!("CARGO_PKG_VERSION");
    if debug {
        format!("{version}-debug")
    } else {
        version.to_owned()
    }
}

/// The image reference: `ghcr.io/ward-dev/ward:<tag>`.
pub fn reference(debug: bool) -> String {
    format!("{REPOSITORY}:{}", tag(debug))
}

/// The OCI archive `cargo xtask image` writes: `target/image/ward-<tag>.oci.tar`.
pub fn archive(debug: bool) -> PathBuf {
    sys::target_dir()
        .join("image")
        .join(format!("ward-{}.oci.tar", tag(debug)))
}

pub fn run(args: &Args) -> Result<()> {
    let archive = build(args.debug)?;
    println!("image: {} in {}", reference(args.debug), archive.display());
    Ok(())
}

/// Builds the static binaries and the image; returns the archive's path.
pub fn build(debug: bool) -> Result<PathBuf> {
    heading(&format!("image: ward and ward-control for {TARGET}"));
    let mut cargo = sys::cargo();
    cargo.args([
        "build",
        "--target",
        TARGET,
        "-p",
        "ward-agent",
        "-p",
        "ward-control",
        "--bins",
    ]);
    if !debug {
        cargo.arg("--release");
    }
    sys::run(&mut cargo)?;
    let bin_dir = sys::target_dir()
        .join(TARGET)
        .join(if debug { "debug" } else { "release" });

    heading(&format!("image: {}", reference(debug)));
    let container = Container::from_scratch()?;
    for name in ["ward", "ward-control"] {
        container.copy(&bin_dir.join(name), &format!("/usr/local/bin/{name}"))?;
    }
    let revision = output(Command::new("git").args(["rev-parse", "HEAD"]))
        .map(|r| r.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let dirty = output(Command::new("git").args(["status", "--porcelain"]))
        .is_ok_and(|changes| !changes.trim().is_empty());
    let revision = if dirty {
        format!("{revision}-dirty")
    } else {
        revision
    };
    let labels = [
        ("org.opencontainers.image.title", "ward".to_owned()),
        (
            "org.opencontainers.image.description",
            "ward node agent (entrypoint) and ward-control, static binaries".to_owned(),
        ),
        ("org.opencontainers.image.version", tag(debug)),
        ("org.opencontainers.image.revision", revision),
        ("org.opencontainers.image.source", SOURCE.to_owned()),
        ("org.opencontainers.image.licenses", "Apache-2.0".to_owned()),
    ];
    let mut config = container.buildah("config");
    config
        .args(["--entrypoint", r#"["/usr/local/bin/ward"]"#])
        .args(["--cmd", r#"["run","--config","/etc/ward/ward.yaml"]"#])
        .args(["--workingdir", "/"]);
    for (key, value) in &labels {
        config.arg("--label").arg(format!("{key}={value}"));
    }
    sys::run(config.arg(&container.name))?;

    let archive = archive(debug);
    let dir = archive.parent().expect("the archive is in target/image");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // buildah appends to an existing archive's index: start from nothing.
    match std::fs::remove_file(&archive) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", archive.display()))
        }
        _ => {}
    }
    let destination = format!("oci-archive:{}:{}", archive.display(), reference(debug));
    sys::run(
        container
            .buildah("commit")
            .args(["--format", "oci", "--timestamp", "0"])
            .arg(&container.name)
            .arg(destination),
    )?;
    Ok(archive)
}

/// A buildah working container, removed on drop.
struct Container {
    name: String,
}

impl Container {
    fn from_scratch() -> Result<Self> {
        let name = format!("ward-image-{}", std::process::id());
        sys::run(Command::new("buildah").args(["from", "--name", &name, "scratch"]))
            .context("buildah is needed: run `cargo xtask setup`")?;
        Ok(Container { name })
    }

    fn buildah(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.arg(subcommand);
        cmd
    }

    fn copy(&self, from: &Path, to: &str) -> Result<()> {
        sys::run(
            self.buildah("copy")
                .args(["--chmod", "0755", &self.name])
                .arg(from)
                .arg(to),
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = output(self.buildah("rm").arg(&self.name));
    }
}
