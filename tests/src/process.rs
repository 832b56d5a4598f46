//! Processes placed in a cgroup and a network namespace, with their output captured line by line.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use ward_host::process::Lines;
use ward_host::process::{Capture, Process};

/// Where a process runs: a cgroup (so ward sees it as a workload) and a network namespace.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    pub cgroup: Option<PathBuf>,
    pub netns: Option<String>,
}

impl Placement {
    /// The test's own cgroup and network namespace.
    pub fn host() -> Self {
        Placement::default()
    }

    pub fn cgroup(path: impl Into<PathBuf>) -> Self {
        Placement {
            cgroup: Some(path.into()),
            netns: None,
        }
    }

    pub fn in_netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    /// A command that joins the placement before `exec`, so that every socket the program
    /// creates belongs to the cgroup from the start (a socket's cgroup is fixed at creation).
    pub fn command<S: AsRef<std::ffi::OsStr>>(
        &self,
        program: impl AsRef<Path>,
        args: &[S],
    ) -> Command {
        let mut command = Command::new(program.as_ref());
        command.args(args);
        let procs = self.cgroup.as_ref().map(|cgroup| {
            let path = cgroup.join("cgroup.procs");
            CString::new(path.as_os_str().as_bytes()).expect("cgroup path without NUL")
        });
        let netns = self.netns.as_ref().map(|name| {
            let path = Path::new("/run/netns").join(name);
            File::open(&path).unwrap_or_else(|e| panic!("open netns {}: {e}", path.display()))
        });
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
        // calls (open, write, close, setns) on values prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                if let Some(procs) = &procs {
                    join_cgroup(procs)?;
                }
                if let Some(netns) = &netns {
                    if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        command
    }
}

/// Writes "0" (the writing process itself) into a cgroup.procs file; fork-safe.
fn join_cgroup(procs: &CString) -> std::io::Result<()> {
    // SAFETY: procs is a valid NUL-terminated path; the fd is closed on every path.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        if written != 1 {
            return Err(error);
        }
    }
    Ok(())
}

/// A long-running process (a listener, an agent, a client loop) killed when dropped: the
/// [`Process`] of ward-host, failing the test with a message where it returns an error.
pub struct Background {
    process: Process,
}

impl Background {
    /// Spawns `command` with stdout and stderr captured; stderr lines are kept with a
    /// `stderr: ` prefix only when `mark_stderr` is set.
    pub fn spawn(label: &str, command: Command, mark_stderr: bool) -> Self {
        let capture = if mark_stderr {
            Capture::lines().mark_stderr()
        } else {
            Capture::lines()
        };
        let process = Process::spawn(label, command, capture).unwrap_or_else(|e| panic!("{e}"));
        Background { process }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.process.pid()).expect("pid fits i32")
    }

    pub fn lines(&self) -> &Lines {
        self.process.lines()
    }

    /// Waits for a line matching `predicate` from index `from` on; panics with the captured
    /// output when none comes within `timeout` or the process ends first.
    pub fn wait_for_line(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        predicate: impl FnMut(&str) -> bool,
    ) -> (usize, String) {
        self.process
            .wait_for_line(from, timeout, what, predicate)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn signal(&self, signal: i32) {
        self.process.signal(signal);
    }

    /// The exit status once the process has ended, waiting at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process
            .wait_exit(timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Whether the process has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        self.process.has_exited()
    }

    /// Signals the process to stop (`signal`), then kills it after `grace`.
    pub fn stop(&mut self, signal: i32, grace: Duration) -> ExitStatus {
        self.process
            .stop(signal, grace)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A process run to completion.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn stdout_lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

/// Runs `command` to completion; kills it and panics if it outlives `timeout`.
pub fn run(label: &str, mut command: Command, timeout: Duration) -> Finished {
    let started = Instant::now();
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {label} ({command:?}): {e}"));
    let read_all = |mut stream: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stream.read_to_string(&mut text);
            text
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = read_all(Box::new(child.stderr.take().expect("piped stderr")));
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < timeout => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{label} did not finish within {timeout:?}");
            }
            Err(e) => panic!("wait for {label}: {e}"),
        }
    };
    let elapsed = started.elapsed();
    Finished {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
        elapsed,
    }
}
