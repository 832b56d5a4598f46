//! Processes placed in a cgroup and a network namespace, with their output captured line by line.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// Output lines shared between reader threads and the test.
#[derive(Clone, Default)]
pub struct Lines {
    inner: Arc<(Mutex<LineState>, Condvar)>,
}

#[derive(Default)]
struct LineState {
    lines: Vec<String>,
    open_streams: usize,
}

impl Lines {
    fn attach<R: Read + Send + 'static>(&self, stream: R, prefix: &'static str) -> JoinHandle<()> {
        self.inner.0.lock().expect("lines lock").open_streams += 1;
        let lines = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let (state, changed) = &*lines.inner;
                state
                    .lock()
                    .expect("lines lock")
                    .lines
                    .push(format!("{prefix}{line}"));
                changed.notify_all();
            }
            let (state, changed) = &*lines.inner;
            state.lock().expect("lines lock").open_streams -= 1;
            changed.notify_all();
        })
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.inner.0.lock().expect("lines lock").lines.clone()
    }

    pub fn len(&self) -> usize {
        self.inner.0.lock().expect("lines lock").lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first line at or after index `from` that satisfies `predicate`, with its index; `None`
    /// after `timeout`, or sooner once every stream has ended without such a line.
    pub fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        mut predicate: impl FnMut(&str) -> bool,
    ) -> Option<(usize, String)> {
        let deadline = Instant::now() + timeout;
        let (state, changed) = &*self.inner;
        let mut guard = state.lock().expect("lines lock");
        let mut checked = from;
        loop {
            while checked < guard.lines.len() {
                if predicate(&guard.lines[checked]) {
                    return Some((checked, guard.lines[checked].clone()));
                }
                checked += 1;
            }
            let now = Instant::now();
            if guard.open_streams == 0 || now >= deadline {
                return None;
            }
            guard = changed
                .wait_timeout(guard, deadline - now)
                .expect("lines lock")
                .0;
        }
    }

    /// Whether the process closed its output (it exited, as a rule).
    pub fn ended(&self) -> bool {
        self.inner.0.lock().expect("lines lock").open_streams == 0
    }

    /// The last `count` lines, one per line, for failure messages.
    pub fn tail(&self, count: usize) -> String {
        let lines = self.snapshot();
        let start = lines.len().saturating_sub(count);
        lines[start..].join("\n")
    }
}

/// A long-running process (a listener, an agent, a client loop) killed when dropped.
pub struct Background {
    label: String,
    child: Child,
    lines: Lines,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Background {
    /// Spawns `command` with stdout and stderr captured; stderr lines are kept with a
    /// `stderr: ` prefix only when `mark_stderr` is set.
    pub fn spawn(label: &str, mut command: Command, mark_stderr: bool) -> Self {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {label} ({command:?}): {e}"));
        let lines = Lines::default();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let readers = vec![
            lines.attach(stdout, ""),
            lines.attach(stderr, if mark_stderr { "stderr: " } else { "" }),
        ];
        Background {
            label: label.to_owned(),
            child,
            lines,
            readers,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    pub fn lines(&self) -> &Lines {
        &self.lines
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
        match self.lines.wait_for(from, timeout, predicate) {
            Some(found) => found,
            None => panic!(
                "{}: no line {what} {}; output so far:\n{}",
                self.label,
                if self.lines.ended() {
                    "before its output ended (it exited)".to_owned()
                } else {
                    format!("within {timeout:?}")
                },
                self.lines.tail(400)
            ),
        }
    }

    pub fn signal(&self, signal: i32) {
        if self.status.is_some() {
            return;
        }
        // SAFETY: kill with a pid of our own, still unreaped, child.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// The exit status once the process has ended, waiting at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.status {
                return Some(status);
            }
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.status = Some(status);
                    for reader in self.readers.drain(..) {
                        let _ = reader.join();
                    }
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(None) => return None,
                Err(e) => panic!("wait for {}: {e}", self.label),
            }
        }
    }

    /// Whether the process has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        self.wait_exit(Duration::ZERO).is_some()
    }

    /// Signals the process to stop (`signal`), then kills it after `grace`.
    pub fn stop(&mut self, signal: i32, grace: Duration) -> ExitStatus {
        self.signal(signal);
        if let Some(status) = self.wait_exit(grace) {
            return status;
        }
        let _ = self.child.kill();
        self.wait_exit(crate::scaled(Duration::from_secs(10)))
            .unwrap_or_else(|| panic!("{} survived SIGKILL", self.label))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
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
