//! Plumbing shared by the commands: running tools, mounts, cgroups and child processes, with
//! guards that clean up on every exit path so a failed run leaves nothing behind.

use std::{
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
pub use ward_host::process::wait_timeout;
use ward_host::{mountinfo, process};

pub fn workspace_root() -> PathBuf {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask_dir
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// `cargo`, through the rustup proxy so that `+nightly` works even when xtask was started by a
/// toolchain's own cargo binary.
pub fn cargo() -> Command {
    let mut cmd = rust_tool("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

/// `cargo build` of ward with one cargo feature, in a target directory of its own so the plain
/// build in `target/debug` stays what it is. The binary lands in `<target_dir>/debug/ward`.
pub fn build_ward_with_feature(feature: &str, target_dir: &Path) -> Command {
    let mut cmd = cargo();
    cmd.args(["build", "-p", "ward-agent", "--bins", "--features", feature])
        .arg("--target-dir")
        .arg(target_dir);
    cmd
}

/// A tool from `$CARGO_HOME/bin` (rustup's proxies, `cargo install`ed tools), which need not be
/// on PATH; else whatever PATH finds.
pub fn rust_tool(name: &str) -> Command {
    let installed = cargo_home().join("bin").join(name);
    Command::new(if installed.exists() {
        installed
    } else {
        PathBuf::from(name)
    })
}

pub fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
}

pub fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn require_root(command: &str, why: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask {command}` must run as root: {why}.\n\
             Run it as root, e.g. `sudo -E env \"PATH=$PATH\" cargo xtask {command}`"
        );
    }
    Ok(())
}

pub fn heading(text: &str) {
    println!("\n==> {text}");
}

/// The command line as a user would type it, for the log of what ran.
pub fn show(cmd: &Command) -> String {
    let quote = |s: &OsStr| {
        let s = s.to_string_lossy();
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
        {
            s.into_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), quote(v?))))
        .collect();
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

/// Runs a command with the terminal as its output, after printing it.
pub fn run(cmd: &mut Command) -> Result<()> {
    println!("$ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// Runs a command quietly and returns its standard output.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cgroup v2 mount: /sys/fs/cgroup on most hosts, /sys/fs/cgroup/unified on hybrid ones.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = mountinfo::read()?;
    mountinfo::cgroup2_root(&mounts).map(Path::to_owned).ok_or_else(|| {
        anyhow!("no cgroup v2 mount in /proc/self/mountinfo; mount one: `mount -t cgroup2 none /sys/fs/cgroup`")
    })
}

/// A cgroup with workload cgroups below it. Dropping it kills every process left inside and
/// removes the directories, so a run that fails half-way leaves nothing behind.
pub struct CgroupTree {
    root: PathBuf,
}

impl CgroupTree {
    /// Creates `<mount>/<name>/<child>` for each child, first removing what an interrupted
    /// earlier run may have left there.
    pub fn create(mount: &Path, name: &str, children: &[&str]) -> Result<Self> {
        let root = mount.join(name);
        if root.exists() {
            println!("removing {} left by an earlier run", root.display());
            remove_cgroup_tree(&root)?;
        }
        let tree = Self { root };
        for child in children {
            let dir = tree.path(child);
            fs::create_dir_all(&dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
        }
        println!(
            "created cgroups {}/{{{}}}",
            tree.root.display(),
            children.join(",")
        );
        Ok(tree)
    }

    pub fn path(&self, child: &str) -> PathBuf {
        self.root.join(child)
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        match remove_cgroup_tree(&self.root) {
            Ok(()) => println!("removed cgroups {}", self.root.display()),
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }
}

fn remove_cgroup_tree(root: &Path) -> Result<()> {
    // Every process in this tree was started by this command (or an interrupted earlier run of
    // it); cgroup.kill (Linux 5.14) ends the whole subtree at once.
    let kill = root.join("cgroup.kill");
    if kill.exists() {
        fs::write(&kill, "1").with_context(|| format!("writing {}", kill.display()))?;
    } else {
        for pid in cgroup_pids(root) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let events = root.join("cgroup.events");
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::read_to_string(&events).is_ok_and(|e| e.contains("populated 1")) {
        if Instant::now() > deadline {
            bail!("processes in {} did not exit within 5 s", root.display());
        }
        thread::sleep(Duration::from_millis(20));
    }
    remove_dirs(root).with_context(|| format!("removing cgroup {}", root.display()))
}

fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            pids.extend(cgroup_pids(&entry.path()));
        }
    }
    pids
}

fn remove_dirs(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_dirs(&entry.path())?;
        }
    }
    fs::remove_dir(dir)
}

/// A command that moves itself into `cgroup` and then executes `program`. A socket belongs to
/// the cgroup of the process that creates it, so the move has to come before the program runs.
pub fn in_cgroup(cgroup: &Path, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"echo $$ > "$0" && exec "$@""#)
        .arg(cgroup.join("cgroup.procs"))
        .arg(program);
    cmd
}

/// This program, for running its hidden subcommands inside workload cgroups.
pub fn xtask_in_cgroup(cgroup: &Path) -> Result<Command> {
    Ok(in_cgroup(
        cgroup,
        std::env::current_exe().context("locating the xtask binary")?,
    ))
}

/// Makes `cmd` join the network namespace `/run/netns/<name>` (`ip netns add`) before it
/// executes, so every socket it creates is that namespace's.
pub fn enter_netns(cmd: &mut Command, name: &str) -> Result<()> {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    let path = Path::new("/run/netns").join(name);
    let netns = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: the closure runs between fork and exec and makes one async-signal-safe system
    // call on a descriptor opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// A network namespace of a command's own (`/run/netns/<name>`), deleted on drop with its
/// interfaces, addresses and sockets.
pub struct Netns {
    name: &'static str,
}

impl Netns {
    /// Creates the namespace `name`, first deleting one an interrupted earlier run left, and
    /// runs the `ip` commands of `batch` in it (one a line, `ip -batch`, kept in `batch_file`).
    pub fn create(name: &'static str, batch: &str, batch_file: &Path) -> Result<Self> {
        if Path::new("/run/netns").join(name).exists() {
            println!("removing network namespace {name} left by an earlier run");
            output(Command::new("ip").args(["netns", "del", name]))?;
        }
        run(Command::new("ip").args(["netns", "add", name]))?;
        let netns = Self { name };
        fs::write(batch_file, batch)
            .with_context(|| format!("writing {}", batch_file.display()))?;
        run(Command::new("ip")
            .args(["-n", name, "-batch"])
            .arg(batch_file))?;
        Ok(netns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match output(Command::new("ip").args(["netns", "del", self.name])) {
            Ok(_) => println!("removed network namespace {}", self.name),
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }
}

/// Child processes that are killed and reaped when this is dropped.
#[derive(Default)]
pub struct Children(Vec<Child>);

impl Children {
    pub fn spawn(&mut self, cmd: &mut Command) -> Result<&mut Child> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", show(cmd)))?;
        self.0.push(child);
        Ok(self.0.last_mut().expect("just pushed"))
    }

    pub fn kill_all(&mut self) {
        for mut child in self.0.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// SIGTERM, then SIGKILL if the process is still there after `grace`.
pub fn terminate(child: &mut Child, grace: Duration) -> Result<ExitStatus> {
    let (status, killed) = process::terminate(child, libc::SIGTERM, grace)?;
    if killed {
        eprintln!(
            "warning: pid {} ignored SIGTERM for {grace:?}; killed it",
            child.id()
        );
    }
    Ok(status)
}

/// (VmRSS, VmHWM) of a process in KiB.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_commands_quote_what_the_shell_would_split() {
        let mut cmd = Command::new("sh");
        cmd.env("A", "1").args(["-c", "echo $$", "it's"]);
        assert_eq!(show(&cmd), r#"A=1 sh -c 'echo $$' 'it'\''s'"#);
    }
}
