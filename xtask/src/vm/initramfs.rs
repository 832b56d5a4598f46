//! The guest's initramfs: busybox, the init script and the few modules that reach the host's
//! file system (virtio-pci, 9p, overlay), as a gzip'd cpio "newc" archive written here, so that
//! building it needs neither root nor cpio.

use std::{collections::HashSet, fs, io::Write as _, path::Path, process::Command};

use anyhow::{bail, Context as _, Result};
use flate2::{write::GzEncoder, Compression};

use super::kernel::{self, Kernel};
use crate::sys::output;

/// PID 1 of the guest.
pub const INIT: &str = include_str!("../../vm/init");
/// The statically linked busybox of Debian's busybox-static.
const BUSYBOX: &str = "/bin/busybox";
/// What the guest loads before it can mount its root. Their dependencies come from modprobe;
/// whatever the kernel has built in is skipped.
const BOOT_MODULES: [&str; 4] = ["virtio_pci", "9pnet_virtio", "9p", "overlay"];

pub fn build(kernel: &Kernel, out: &Path) -> Result<()> {
    let mut archive = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "modules"] {
        archive.dir(dir);
    }
    // The kernel opens /dev/console for PID 1's stdio before init can mount devtmpfs.
    archive.char_device("dev/console", 5, 1);
    archive.file("init", 0o755, INIT.as_bytes());
    let busybox = fs::read(BUSYBOX)
        .with_context(|| format!("reading {BUSYBOX} (Debian package busybox-static)"))?;
    archive.file("bin/busybox", 0o755, &busybox);

    let mut order = String::new();
    for path in module_paths(kernel)? {
        let data = kernel::read_module(Path::new(&path))?;
        let file = Path::new(&path)
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("module path {path}"))?;
        let name = file
            .trim_end_matches(".xz")
            .trim_end_matches(".zst")
            .to_owned();
        archive.file(&format!("modules/{name}"), 0o644, &data);
        order.push_str(&name);
        order.push('\n');
    }
    archive.file("modules/order", 0o644, order.as_bytes());

    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(&archive.finish())?;
    fs::write(out, gz.finish()?).with_context(|| format!("writing {}", out.display()))
}

/// The module files to insmod, dependencies first, each once.
fn module_paths(kernel: &Kernel) -> Result<Vec<String>> {
    let mut text = String::new();
    for module in BOOT_MODULES {
        text += &output(Command::new("modprobe").arg("-d").arg(&kernel.root).args([
            "-S",
            &kernel.release,
            "--show-depends",
            module,
        ]))
        .with_context(|| format!("resolving module {module} of {}", kernel.release))?;
    }
    let paths = insmod_paths(&text);
    if paths.is_empty() && !text.contains("builtin") {
        bail!("modprobe resolved no modules for {BOOT_MODULES:?}: {text}");
    }
    Ok(paths)
}

/// `insmod /path/x.ko.xz` lines of `modprobe --show-depends`, in order, without repeats.
fn insmod_paths(show_depends: &str) -> Vec<String> {
    let mut seen = HashSet::new();
    show_depends
        .lines()
        .filter_map(|l| l.strip_prefix("insmod "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|p| seen.insert(p.to_string()))
        .map(str::to_owned)
        .collect()
}

/// A cpio archive in the "newc" format the kernel unpacks.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    next_inode: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 2, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | permissions, 1, (0, 0), data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, 1, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, links: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_inode += 1;
        let name_size = name.len() as u32 + 1;
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            links,
            0, // mtime: fixed, so equal inputs give equal archives
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name_size,
            0, // check
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_come_in_dependency_order_once() {
        let text = "insmod /k/lib/modules/v/kernel/net/9p/9pnet.ko.xz \ninsmod /k/lib/modules/v/kernel/net/9p/9pnet_virtio.ko.xz \nbuiltin virtio_pci\ninsmod /k/lib/modules/v/kernel/fs/netfs/netfs.ko.xz \ninsmod /k/lib/modules/v/kernel/net/9p/9pnet.ko.xz \ninsmod /k/lib/modules/v/kernel/fs/9p/9p.ko.xz \n";
        assert_eq!(
            insmod_paths(text),
            [
                "/k/lib/modules/v/kernel/net/9p/9pnet.ko.xz",
                "/k/lib/modules/v/kernel/net/9p/9pnet_virtio.ko.xz",
                "/k/lib/modules/v/kernel/fs/netfs/netfs.ko.xz",
                "/k/lib/modules/v/kernel/fs/9p/9p.ko.xz",
            ]
        );
    }

    #[test]
    fn cpio_entries_follow_the_newc_layout() {
        let mut archive = Cpio::default();
        archive.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = archive.finish();
        let header = std::str::from_utf8(&bytes[..110]).expect("ASCII header");
        assert_eq!(&header[..6], "070701");
        assert_eq!(
            &header[6 + 8..6 + 16],
            "000081ed",
            "mode: regular file 0755"
        );
        assert_eq!(&header[6 + 6 * 8..6 + 7 * 8], "0000000a", "file size");
        assert_eq!(&header[6 + 11 * 8..6 + 12 * 8], "00000005", "name size");
        // 110 + "init\0" = 115, padded to 116; then the 10 data bytes padded to 12.
        assert_eq!(&bytes[110..115], b"init\0");
        assert_eq!(&bytes[116..126], b"#!/bin/sh\n");
        assert_eq!(&bytes[128..134], b"070701");
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
        assert_eq!(bytes.len() % 4, 0);
    }
}
