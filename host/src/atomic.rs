//! Replacing a file so that a reader or a crash sees the old contents or the new, never a mix;
//! appending to one so that what is appended survives a crash once the call returns.
use std::{
    fs::{File, OpenOptions, Permissions},
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

/// Appends `contents` to `file` (created with `mode` if missing) and syncs it before returning.
/// One `write` of the whole: lines appended by one call are never interleaved with another
/// process's appends.
pub fn append(file: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(mode)
        .open(file)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// Writes `contents` to a hidden temporary file in `file`'s directory, syncs it, gives it `mode`
/// (exactly, whatever the umask), renames it over `file` and syncs the directory, so the rename
/// itself survives a crash. The temporary file is removed if any step fails.
///
/// The temporary name starts with `.` and ends with `.tmp`, so watchers of `*.yaml` files and
/// readers of a directory that skip hidden files never see it.
pub fn write(file: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = temporary_sibling(file)?;
    let written = write_synced(&tmp, contents, mode).and_then(|()| std::fs::rename(&tmp, file));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(file.parent().filter(|p| !p.as_os_str().is_empty()))
}

fn temporary_sibling(file: &Path) -> std::io::Result<PathBuf> {
    static SEQUENCE: AtomicU32 = AtomicU32::new(0);
    let name = file.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} names no file", file.display()),
        )
    })?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(
        ".{}-{}.tmp",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    Ok(file.with_file_name(tmp))
}

fn write_synced(tmp: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(tmp)?;
    f.set_permissions(Permissions::from_mode(mode))?;
    f.write_all(contents)?;
    f.sync_all()
}

fn sync_dir(dir: Option<&Path>) -> std::io::Result<()> {
    File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    /// Writes `contents` with `mode` and checks the file holds them, with exactly that mode.
    fn write_and_check(file: &Path, contents: &[u8], mode: u32) {
        write(file, contents, mode).expect("write");
        assert_eq!(std::fs::read(file).expect("read"), contents);
        assert_eq!(mode_of(file), mode, "the mode of the last write");
    }

    fn names_in(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn replaces_the_file_with_the_mode_asked_for_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("key.pem");
        write_and_check(&file, b"one", 0o644);
        write_and_check(&file, b"two", 0o600);
        assert_eq!(names_in(dir.path()), ["key.pem"]);
    }

    #[test]
    fn the_mode_is_exact_whatever_the_umask() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_and_check(&dir.path().join("shared"), b"x", 0o666);
    }

    #[test]
    fn a_failed_write_names_the_problem_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("data");
        write_and_check(&file, b"old", 0o600);
        // A directory in the way of the rename.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(blocked.join("x").parent().expect("dir")).expect("mkdir");
        std::fs::write(blocked.join("x"), b"").expect("fill");
        assert!(write(&blocked, b"new", 0o600).is_err());
        assert_eq!(std::fs::read(&file).expect("read"), b"old");
        let leftovers = names_in(dir.path())
            .iter()
            .filter(|name| name.ends_with(".tmp"))
            .count();
        assert_eq!(leftovers, 0, "the temporary file is removed on failure");
        assert!(write(Path::new("/"), b"x", 0o600).is_err(), "no file name");
    }
}
