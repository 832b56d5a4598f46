//! The mount table, from `/proc/<pid>/mountinfo` (proc(5)):
//!
//! ```text
//! 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//! (1)(2)(3)   (4)   (5)      (6)      (7)   (8) (9)    (10)         (11)
//! ```
//!
//! Mount ID, parent ID, major:minor, root, mount point, mount options, zero or more optional
//! fields ended by `-`, filesystem type, source, super options. Paths escape space, tab, newline
//! and backslash as `\ooo` octal.
use std::{
    ffi::OsString,
    os::unix::ffi::OsStringExt as _,
    path::{Path, PathBuf},
};

pub const SELF_MOUNTINFO: &str = "/proc/self/mountinfo";

#[derive(Debug, thiserror::Error)]
pub enum MountinfoError {
    #[error("cannot read {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("mountinfo line {line}: {reason}: {text:?}")]
    Line {
        line: usize,
        reason: &'static str,
        text: String,
    },
}

/// One line of mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub id: u32,
    pub parent_id: u32,
    /// `major:minor` of the device.
    pub device: String,
    /// The directory of the filesystem that forms the root of this mount (`/` unless a bind mount
    /// of a subdirectory).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub options: String,
    /// `shared:N`, `master:N`, `propagate_from:N`, `unbindable`.
    pub optional: Vec<String>,
    pub fstype: String,
    pub source: String,
    pub super_options: String,
}

/// The mounts of this process.
pub fn read() -> Result<Vec<Mount>, MountinfoError> {
    read_file(Path::new(SELF_MOUNTINFO))
}

pub fn read_file(file: &Path) -> Result<Vec<Mount>, MountinfoError> {
    let text = std::fs::read_to_string(file).map_err(|source| MountinfoError::Read {
        file: file.to_owned(),
        source,
    })?;
    parse(&text)
}

/// Parses a whole mountinfo text; a malformed line is an error naming it.
pub fn parse(text: &str) -> Result<Vec<Mount>, MountinfoError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            parse_line(line).map_err(|reason| MountinfoError::Line {
                line: i + 1,
                reason,
                text: line.to_owned(),
            })
        })
        .collect()
}

fn parse_line(line: &str) -> Result<Mount, &'static str> {
    let mut fields = line.split(' ');
    let mut next = |what| fields.next().filter(|f| !f.is_empty()).ok_or(what);
    let id = next("no mount ID")?
        .parse()
        .map_err(|_| "mount ID is not a number")?;
    let parent_id = next("no parent ID")?
        .parse()
        .map_err(|_| "parent ID is not a number")?;
    let device = next("no major:minor")?.to_owned();
    let root = unescape_path(next("no root")?);
    let mount_point = unescape_path(next("no mount point")?);
    let options = next("no mount options")?.to_owned();
    let mut optional = Vec::new();
    loop {
        match next("no `-` separator after the optional fields")? {
            "-" => break,
            field => optional.push(field.to_owned()),
        }
    }
    let fstype = next("no filesystem type")?.to_owned();
    let source = unescape(fields.next().ok_or("no mount source")?);
    let source = String::from_utf8_lossy(&source).into_owned();
    let super_options = fields.next().unwrap_or_default().to_owned();
    Ok(Mount {
        id,
        parent_id,
        device,
        root,
        mount_point,
        options,
        optional,
        fstype,
        source,
        super_options,
    })
}

fn unescape_path(field: &str) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(field)))
}

/// Decodes `\ooo` octal escapes; a backslash not followed by three octal digits stays.
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| digits.iter().all(|d| (b'0'..=b'7').contains(d)))
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok());
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
    out
}

/// Mount points of filesystems of type `fstype` (`cgroup2`, `bpf`, `tmpfs`...).
pub fn mount_points<'a>(mounts: &'a [Mount], fstype: &'a str) -> impl Iterator<Item = &'a Path> {
    mounts
        .iter()
        .filter(move |m| m.fstype == fstype)
        .map(|m| m.mount_point.as_path())
}

/// The cgroup v2 mount: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid
/// ones. The shortest path wins: the host's own mount rather than one bound into a container
/// below it.
pub fn cgroup2_root(mounts: &[Mount]) -> Option<&Path> {
    mount_points(mounts, "cgroup2").min_by_key(|p| p.as_os_str().len())
}

/// Whether `path` lies on (at or below) a mount of type `fstype`.
pub fn is_on(mounts: &[Mount], path: &Path, fstype: &str) -> bool {
    mount_points(mounts, fstype).any(|m| path.starts_with(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
31 22 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
50 22 0:40 / /mnt/with\\040space\\011tab rw master:5 propagate_from:2 - tmpfs my\\040src rw
51 22 0:41 /sub/dir /srv/bound rw - ext4 /dev/sda1 rw
60 22 0:44 / /var/lib/kubelet/x/sys/fs/cgroup rw - cgroup2 cgroup2 rw
70 22 0:45 / /sys/fs/bpf rw,relatime - bpf bpf rw,mode=700
";

    #[test]
    fn fields_are_parsed_with_optional_fields_and_escapes() {
        let mounts = parse(SAMPLE).expect("parses");
        assert_eq!(mounts.len(), 7);
        let spaced = &mounts[3];
        assert_eq!(spaced.id, 50);
        assert_eq!(spaced.parent_id, 22);
        assert_eq!(spaced.device, "0:40");
        assert_eq!(spaced.mount_point, Path::new("/mnt/with space\ttab"));
        assert_eq!(spaced.optional, ["master:5", "propagate_from:2"]);
        assert_eq!(spaced.fstype, "tmpfs");
        assert_eq!(spaced.source, "my src");
        assert_eq!(spaced.super_options, "rw");
        let bound = &mounts[4];
        assert_eq!(bound.root, Path::new("/sub/dir"));
        assert!(bound.optional.is_empty());
        assert_eq!(bound.fstype, "ext4");
    }

    #[test]
    fn escapes_decode_backslash_newline_and_leave_stray_backslashes() {
        assert_eq!(unescape(r"a\134b\012c"), b"a\\b\nc");
        assert_eq!(unescape(r"a\9b\04"), br"a\9b\04");
        assert_eq!(unescape(r"\040\040"), b"  ");
    }

    #[test]
    fn the_cgroup2_root_is_the_shortest_cgroup2_mount_point() {
        let mounts = parse(SAMPLE).expect("parses");
        assert_eq!(
            cgroup2_root(&mounts),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_root(&mounts[..2]), None);
        assert!(is_on(&mounts, Path::new("/sys/fs/bpf/ward"), "bpf"));
        assert!(!is_on(&mounts, Path::new("/sys/fs/bpfx"), "bpf"));
    }

    #[test]
    fn malformed_lines_are_named() {
        let err = parse("22 1 0:21 / /proc rw\n").expect_err("no separator");
        let text = err.to_string();
        assert!(
            text.contains("line 1") && text.contains("separator"),
            "{text}"
        );
        let err = parse("x 1 0:21 / /proc rw - proc proc rw\n").expect_err("bad id");
        assert!(err.to_string().contains("mount ID"), "{err}");
    }

    #[test]
    fn this_machine_has_a_cgroup2_mount() {
        let mounts = read().expect("read mountinfo");
        let root = cgroup2_root(&mounts).expect("cgroup2 mounted");
        assert!(
            root.join("cgroup.procs").exists(),
            "{} is not a cgroup2 root",
            root.display()
        );
    }
}
