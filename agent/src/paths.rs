//! Every filesystem location the agent depends on: the cgroup v2 mount, the bpffs pin directory and
//! the layout inside it.
use std::path::{Path, PathBuf};

use ward_host::mountinfo;

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error(transparent)]
    Mountinfo(#[from] ward_host::mountinfo::MountinfoError),
    #[error("no cgroup v2 filesystem is mounted; mount one with `mount -t cgroup2 none /sys/fs/cgroup` (or boot with systemd.unified_cgroup_hierarchy=1)")]
    NoCgroup2,
    #[error("cgroup root {0} does not exist or is not a directory below the cgroup v2 mount {1}")]
    CgroupRoot(PathBuf, PathBuf),
    #[error("{0} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NoBpffs(PathBuf),
    #[error("cannot create pin directory {0}: {1}")]
    PinDir(PathBuf, std::io::Error),
}

/// The cgroup v2 mount: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount() -> Result<PathBuf, PathError> {
    let mounts = mountinfo::read()?;
    mountinfo::cgroup2_root(&mounts)
        .map(Path::to_owned)
        .ok_or(PathError::NoCgroup2)
}

/// The cgroup the agent attaches to, as configured (absolute or relative to the mount).
pub fn cgroup_root(configured: Option<&Path>) -> Result<PathBuf, PathError> {
    let mount = cgroup2_mount()?;
    let root = match configured {
        None => mount.clone(),
        Some(p) if p.is_absolute() => p.to_owned(),
        Some(p) => mount.join(p),
    };
    if !root.starts_with(&mount) || !root.is_dir() {
        return Err(PathError::CgroupRoot(root, mount));
    }
    Ok(root)
}

/// Checks that the pin directory is on bpffs and creates it.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<(), PathError> {
    if !mountinfo::is_on(&mountinfo::read()?, pin_dir, "bpf") {
        return Err(PathError::NoBpffs(pin_dir.to_owned()));
    }
    for dir in [pin_dir.to_owned(), links_dir(pin_dir)] {
        std::fs::create_dir_all(&dir).map_err(|e| PathError::PinDir(dir.clone(), e))?;
    }
    Ok(())
}

/// The admin socket of the agent that owns `pin_dir`: `/run/ward/admin.sock` for the default pin
/// directory, so several agents on one machine (tests, multi-node setups) never share one.
pub fn default_admin_socket(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map_or_else(|| "ward".into(), |n| n.to_string_lossy().into_owned());
    PathBuf::from("/run").join(name).join("admin.sock")
}

/// Where the cgroup links of the kernel programs are pinned.
pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_has_a_cgroup2_mount() {
        let mount = cgroup2_mount().expect("cgroup2 mounted");
        assert!(
            mount.join("cgroup.procs").exists(),
            "{} is not a cgroup2 root",
            mount.display()
        );
    }
}
