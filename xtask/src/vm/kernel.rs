//! Debian kernels for the VM matrix: resolved through apt, downloaded once into
//! `target/vm-kernels/<release>/`, and the uncompressed `vmlinux` cut out of the bzImage.

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::sys::{self, output};

/// A kernel line of the matrix and the Debian meta package that follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Line {
    /// What `--kernel` calls it.
    pub label: &'static str,
    /// Depends on the newest concrete image of the line.
    meta_package: &'static str,
    /// The concrete image must be this line's (a newer Debian release moves the meta package on).
    release_prefix: &'static str,
}

pub const V6_1: Line = Line {
    label: "6.1",
    meta_package: "linux-image-amd64",
    release_prefix: "6.1.",
};

pub const V6_12: Line = Line {
    label: "6.12",
    meta_package: "linux-image-6.12-amd64",
    release_prefix: "6.12.",
};

/// A downloaded, unpacked kernel package.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub line: Line,
    /// `uname -r` of the kernel, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// The exact Debian package version, e.g. `6.1.192-2`.
    pub version: String,
    /// The `dpkg -x`'d package.
    pub root: PathBuf,
    pub vmlinux: PathBuf,
}

impl Kernel {
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

pub fn cache_dir() -> PathBuf {
    sys::target_dir().join("vm-kernels")
}

/// The newest image of `line` that apt knows, downloaded and unpacked unless the cache has it.
pub fn prepare(line: Line) -> Result<Kernel> {
    let (package, version) = match resolve(line) {
        Ok(found) => found,
        Err(first) => {
            // Package lists that are missing or too old to name the image: refresh once.
            println!(
                "kernel {}: {first:#}; refreshing the package lists",
                line.label
            );
            sys::run(apt_get().arg("update"))?;
            resolve(line)?
        }
    };
    let release = package
        .strip_prefix("linux-image-")
        .expect("resolve returns linux-image-* packages")
        .to_owned();
    let dir = cache_dir().join(&release);
    let kernel = Kernel {
        line,
        release: release.clone(),
        version: version.clone(),
        root: dir.join("root"),
        vmlinux: dir.join("vmlinux"),
    };
    let record = dir.join("package");
    let recorded = format!("{package} {version}\n");
    if fs::read_to_string(&record).is_ok_and(|r| r == recorded) && kernel.vmlinux.is_file() {
        println!(
            "kernel {}: {package} {version} (cached in {})",
            line.label,
            dir.display()
        );
        return Ok(kernel);
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing stale {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    sys::run(
        apt_get()
            .current_dir(&dir)
            .args(["download", &format!("{package}={version}")]),
    )?;
    let deb = fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))?;
    sys::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&kernel.root))?;
    fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    // The package ships no modules.dep (its postinst makes it): modprobe needs one, on the host
    // to resolve the initramfs's modules and in the guest to autoload veth and friends.
    sys::run(
        Command::new("depmod")
            .arg("-b")
            .arg(&kernel.root)
            .arg(&release),
    )?;
    let bz_image = kernel.root.join("boot").join(format!("vmlinuz-{release}"));
    let image = fs::read(&bz_image).with_context(|| format!("reading {}", bz_image.display()))?;
    let vmlinux = extract_vmlinux(&image)
        .with_context(|| format!("extracting vmlinux from {}", bz_image.display()))?;
    fs::write(&kernel.vmlinux, vmlinux)
        .with_context(|| format!("writing {}", kernel.vmlinux.display()))?;
    // Written last: its presence says everything above completed.
    fs::write(&record, recorded).with_context(|| format!("writing {}", record.display()))?;
    println!(
        "kernel {}: {package} {version} (downloaded into {})",
        line.label,
        dir.display()
    );
    Ok(kernel)
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// The concrete image package of `line` and its candidate version, from apt's local lists.
fn resolve(line: Line) -> Result<(String, String)> {
    let depends = output(Command::new("apt-cache").args(["depends", line.meta_package]))?;
    let package = image_dependency(&depends, line)?;
    let policy = output(Command::new("apt-cache").args(["policy", &package]))?;
    let version = candidate(&policy)
        .with_context(|| format!("apt knows no installable version of {package}"))?;
    Ok((package, version))
}

/// The `linux-image-<line>*-amd64` package among `apt-cache depends` output; never a `-cloud`
/// flavour, which lacks the 9p file system the guest's root comes over.
fn image_dependency(depends: &str, line: Line) -> Result<String> {
    let wanted = format!("linux-image-{}", line.release_prefix);
    depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with(&wanted) && p.ends_with("-amd64") && !p.contains("-cloud"))
        .map(str::to_owned)
        .with_context(|| {
            format!(
                "{} depends on no {wanted}*-amd64 image (apt-cache depends said: {})",
                line.meta_package,
                depends.trim()
            )
        })
}

fn candidate(policy: &str) -> Option<String> {
    policy
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .find(|v| *v != "(none)")
        .map(str::to_owned)
}

const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
const ZSTD_MAGIC: &[u8] = b"\x28\xb5\x2f\xfd";
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// The ELF kernel inside a bzImage. QEMU boots it directly (PVH), which spares the guest a
/// decompression that takes seconds under TCG. Debian compresses 6.1 with xz, 6.12 with zstd.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>> {
    for (magic, decompress) in [
        (XZ_MAGIC, decompress_xz as fn(&[u8]) -> Result<Vec<u8>>),
        (ZSTD_MAGIC, decompress_zstd),
    ] {
        // The magic may also occur by chance in the setup code before the payload.
        for offset in find_all(image, magic) {
            if let Ok(out) = decompress(&image[offset..]) {
                if out.starts_with(ELF_MAGIC) {
                    return Ok(out);
                }
            }
        }
    }
    bail!("no xz or zstd compressed ELF payload found")
}

fn find_all<'a>(haystack: &'a [u8], needle: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(move |(_, w)| *w == needle)
        .map(|(i, _)| i)
}

/// One xz stream; what follows it (the bzImage's size word) is ignored.
pub fn decompress_xz(data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    liblzma::read::XzDecoder::new(data)
        .read_to_end(&mut out)
        .context("xz")?;
    Ok(out)
}

/// One zstd frame; what follows it is ignored.
pub fn decompress_zstd(data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    ruzstd::decoding::StreamingDecoder::new(data)
        .context("zstd")?
        .read_to_end(&mut out)
        .context("zstd")?;
    Ok(out)
}

/// A kernel module's contents, decompressed (busybox's insmod takes plain `.ko` only).
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.to_string_lossy();
    if name.ends_with(".ko.xz") {
        decompress_xz(&data).with_context(|| format!("decompressing {name}"))
    } else if name.ends_with(".ko.zst") {
        decompress_zstd(&data).with_context(|| format!("decompressing {name}"))
    } else if name.ends_with(".ko") {
        Ok(data)
    } else {
        bail!("{name}: not a kernel module (.ko, .ko.xz or .ko.zst)")
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn the_line_image_is_picked_and_cloud_flavours_are_not() {
        let depends = "linux-image-6.12-amd64\n  Depends: linux-image-6.12.117+deb12-cloud-amd64\n  Depends: linux-image-6.12.117+deb12-amd64\n";
        assert_eq!(
            image_dependency(depends, V6_12).unwrap(),
            "linux-image-6.12.117+deb12-amd64"
        );
        let moved_on = "linux-image-amd64\n  Depends: linux-image-6.12.48+deb13-amd64\n";
        assert!(image_dependency(moved_on, V6_1).is_err());
        let bookworm = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            image_dependency(bookworm, V6_1).unwrap(),
            "linux-image-6.1.0-56-amd64"
        );
    }

    #[test]
    fn candidate_version_comes_from_apt_cache_policy() {
        let policy = "linux-image-6.1.0-56-amd64:\n  Installed: (none)\n  Candidate: 6.1.192-2\n  Version table:\n     6.1.192-2 500\n";
        assert_eq!(candidate(policy).as_deref(), Some("6.1.192-2"));
        assert_eq!(
            candidate("x:\n  Installed: (none)\n  Candidate: (none)\n"),
            None
        );
    }

    fn fake_elf() -> Vec<u8> {
        let mut elf = ELF_MAGIC.to_vec();
        elf.extend((0..100_000u32).map(|i| (i % 251) as u8));
        elf
    }

    /// A bzImage: setup code (with a stray magic), the payload, then the size word.
    fn fake_bz_image(payload: &[u8], stray: &[u8]) -> Vec<u8> {
        let mut image = vec![0x90; 4096];
        image.extend_from_slice(stray);
        image.extend_from_slice(&[0u8; 64]);
        image.extend_from_slice(payload);
        image.extend_from_slice(&123_456u32.to_le_bytes());
        image
    }

    #[test]
    fn vmlinux_comes_out_of_an_xz_bz_image() {
        let mut encoder = liblzma::write::XzEncoder::new(Vec::new(), 1);
        encoder.write_all(&fake_elf()).unwrap();
        let image = fake_bz_image(&encoder.finish().unwrap(), XZ_MAGIC);
        assert_eq!(
            extract_vmlinux(&image).expect("xz payload found"),
            fake_elf()
        );
    }

    #[test]
    fn vmlinux_comes_out_of_a_zstd_bz_image() {
        let compressed = ruzstd::encoding::compress_to_vec(
            fake_elf().as_slice(),
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let image = fake_bz_image(&compressed, ZSTD_MAGIC);
        assert_eq!(
            extract_vmlinux(&image).expect("zstd payload found"),
            fake_elf()
        );
    }

    #[test]
    fn an_image_without_a_payload_is_an_error() {
        assert!(extract_vmlinux(&fake_bz_image(b"plain", b"")).is_err());
    }
}
