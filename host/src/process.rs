//! Child processes that run beside the caller (an agent, a control plane, a listener): their
//! output captured line by line (and copied to a log file if asked), waited for by a line,
//! stopped with a signal and a grace period before SIGKILL, and killed when dropped.
use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {label} ({command}): {source}")]
    Spawn {
        label: String,
        command: String,
        source: std::io::Error,
    },
    #[error("cannot create the log file {file} of {label}: {source}")]
    Log {
        label: String,
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("waiting for {label}: {source}")]
    Wait {
        label: String,
        source: std::io::Error,
    },
    #[error(
        "{label} printed no line {what} before its output ended (it exited); its output:\n{tail}"
    )]
    ExitedEarly {
        label: String,
        what: String,
        tail: String,
    },
    #[error("{label} printed no line {what} within {timeout:?}; its output:\n{tail}")]
    NoLine {
        label: String,
        what: String,
        timeout: Duration,
        tail: String,
    },
    #[error("{label} survived SIGKILL")]
    Unkillable { label: String },
}

/// What to do with a process's output besides keeping its lines.
#[derive(Debug, Default)]
pub struct Capture {
    /// Copies every line to this file, stdout and stderr interleaved as they come.
    pub log_file: Option<PathBuf>,
    /// Appends to the log file rather than starting it afresh (a process restarted in a test).
    pub append: bool,
    /// Keeps stderr lines with a `stderr: ` prefix.
    pub mark_stderr: bool,
}

impl Capture {
    pub fn lines() -> Self {
        Capture::default()
    }

    pub fn log_file(path: impl Into<PathBuf>) -> Self {
        Capture {
            log_file: Some(path.into()),
            ..Capture::default()
        }
    }

    pub fn appending(mut self) -> Self {
        self.append = true;
        self
    }

    pub fn mark_stderr(mut self) -> Self {
        self.mark_stderr = true;
        self
    }
}

/// Output lines shared between reader threads and the caller.
#[derive(Clone, Default)]
pub struct Lines {
    inner: Arc<(Mutex<LineState>, Condvar)>,
}

#[derive(Default)]
struct LineState {
    lines: Vec<String>,
    open_streams: usize,
}

type LogSink = Option<Arc<Mutex<File>>>;

impl Lines {
    fn attach<R: Read + Send + 'static>(
        &self,
        stream: R,
        prefix: &'static str,
        log: LogSink,
    ) -> JoinHandle<()> {
        self.inner.0.lock().expect("lines lock").open_streams += 1;
        let lines = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Some(log) = &log {
                    // A full disk must not stop the process's output from being read.
                    let _ = writeln!(log.lock().expect("log lock"), "{line}");
                }
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

/// A running child process, killed when dropped.
pub struct Process {
    label: String,
    child: Child,
    lines: Lines,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Process {
    /// Spawns `command` with stdin closed and stdout and stderr captured.
    pub fn spawn(
        label: &str,
        mut command: Command,
        capture: Capture,
    ) -> Result<Self, ProcessError> {
        let log = match &capture.log_file {
            Some(file) => {
                let opened = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(capture.append)
                    .truncate(!capture.append)
                    .open(file)
                    .map_err(|source| ProcessError::Log {
                        label: label.to_owned(),
                        file: file.clone(),
                        source,
                    })?;
                Some(Arc::new(Mutex::new(opened)))
            }
            None => None,
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|source| ProcessError::Spawn {
            label: label.to_owned(),
            command: format!("{command:?}"),
            source,
        })?;
        let lines = Lines::default();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let stderr_prefix = if capture.mark_stderr { "stderr: " } else { "" };
        let readers = vec![
            lines.attach(stdout, "", log.clone()),
            lines.attach(stderr, stderr_prefix, log),
        ];
        Ok(Process {
            label: label.to_owned(),
            child,
            lines,
            readers,
            status: None,
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> &Lines {
        &self.lines
    }

    /// Waits for a line matching `predicate` from index `from` on; the error, when none comes
    /// within `timeout` or the process ends first, carries the last lines of its output.
    pub fn wait_for_line(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        predicate: impl FnMut(&str) -> bool,
    ) -> Result<(usize, String), ProcessError> {
        if let Some(found) = self.lines.wait_for(from, timeout, predicate) {
            return Ok(found);
        }
        let tail = self.lines.tail(400);
        if self.lines.ended() {
            return Err(ProcessError::ExitedEarly {
                label: self.label.clone(),
                what: what.to_owned(),
                tail,
            });
        }
        Err(ProcessError::NoLine {
            label: self.label.clone(),
            what: what.to_owned(),
            timeout,
            tail,
        })
    }

    /// Sends `signal` unless the process has already been reaped.
    pub fn signal(&self, signal: i32) {
        if self.status.is_none() {
            send(&self.child, signal);
        }
    }

    /// The exit status once the process has ended, waiting at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        if self.status.is_none() {
            let status =
                wait_timeout(&mut self.child, timeout).map_err(|source| ProcessError::Wait {
                    label: self.label.clone(),
                    source,
                })?;
            if status.is_some() {
                self.status = status;
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
            }
        }
        Ok(self.status)
    }

    /// Whether the process has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        self.wait_exit(Duration::ZERO).is_ok_and(|s| s.is_some())
    }

    /// Sends `signal` (SIGTERM, as a rule), then SIGKILL after `grace`.
    pub fn stop(&mut self, signal: i32, grace: Duration) -> Result<ExitStatus, ProcessError> {
        self.signal(signal);
        if let Some(status) = self.wait_exit(grace)? {
            return Ok(status);
        }
        let _ = self.child.kill();
        self.wait_exit(Duration::from_secs(10))?
            .ok_or_else(|| ProcessError::Unkillable {
                label: self.label.clone(),
            })
    }

    /// SIGKILL, without waiting.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn send(child: &Child, signal: i32) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Polls `child` until it exits or `timeout` passes.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Stops a child whose output the caller handles itself: `signal`, then SIGKILL after `grace`.
/// The second value says whether SIGKILL was needed.
pub fn terminate(
    child: &mut Child,
    signal: i32,
    grace: Duration,
) -> std::io::Result<(ExitStatus, bool)> {
    if let Some(status) = child.try_wait()? {
        return Ok((status, false));
    }
    send(child, signal);
    if let Some(status) = wait_timeout(child, grace)? {
        return Ok((status, false));
    }
    child.kill()?;
    Ok((child.wait()?, true))
}

/// Whether a log line says `ready` as a word of its own (ward's line once its programs are
/// attached), not as part of `already`.
pub fn says_ready(line: &str) -> bool {
    line.split(|c: char| !c.is_ascii_alphanumeric())
        .any(|word| word == "ready")
}

/// Removes terminal colour sequences (`ESC [ ... letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The length of a log file so far (0 when it does not exist yet).
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    /// Stops `p` with SIGTERM and checks which signal ended it.
    fn stop_ends_by(p: &mut Process, grace: Duration, signal: i32) {
        let status = p.stop(libc::SIGTERM, grace).expect("stops");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(signal)
        );
    }

    #[test]
    fn lines_are_captured_copied_to_the_log_and_waited_for() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("out.log");
        let mut p = Process::spawn(
            "talker",
            shell("echo one; echo two >&2; echo INFO ready; exec sleep 30"),
            Capture::log_file(&log).mark_stderr(),
        )
        .expect("spawn");
        let (_, line) = p
            .wait_for_line(0, Duration::from_secs(10), "saying ready", says_ready)
            .expect("ready line");
        assert_eq!(line, "INFO ready");
        // stdout and stderr are read by two threads: their lines interleave in any order.
        p.wait_for_line(0, Duration::from_secs(10), "from stderr", |l| {
            l == "stderr: two"
        })
        .expect("stderr line, marked");
        stop_ends_by(&mut p, Duration::from_secs(5), libc::SIGTERM);
        let text = std::fs::read_to_string(&log).expect("log");
        assert!(text.contains("one\n") && text.contains("two\n") && text.contains("INFO ready\n"));
    }

    #[test]
    fn a_process_that_exits_early_is_reported_with_its_output() {
        let mut p = Process::spawn(
            "quitter",
            shell("echo bad config; exit 3"),
            Capture::lines(),
        )
        .expect("spawn");
        let err = p
            .wait_for_line(0, Duration::from_secs(10), "saying ready", says_ready)
            .expect_err("never ready");
        let text = err.to_string();
        assert!(
            text.starts_with("quitter")
                && text.contains("it exited")
                && text.contains("bad config"),
            "{text}"
        );
        let status = p.wait_exit(Duration::from_secs(10)).expect("wait");
        assert_eq!(status.and_then(|s| s.code()), Some(3));
    }

    #[test]
    fn a_process_ignoring_the_signal_is_killed_after_the_grace_period() {
        let mut p = Process::spawn(
            "stubborn",
            shell("trap '' TERM; echo trapped; while :; do sleep 1; done"),
            Capture::lines(),
        )
        .expect("spawn");
        p.wait_for_line(0, Duration::from_secs(10), "trapped", |l| l == "trapped")
            .expect("trap set");
        stop_ends_by(&mut p, Duration::from_millis(200), libc::SIGKILL);
    }

    #[test]
    fn dropping_kills_the_process() {
        let p = Process::spawn("sleeper", shell("exec sleep 30"), Capture::lines()).expect("spawn");
        let pid = p.pid();
        drop(p);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} is still there after drop"
        );
    }

    #[test]
    fn ready_is_a_word_of_its_own() {
        assert!(says_ready(
            "2025-01-01T00:00:00Z INFO ward: ready pin_dir=/sys/fs/bpf/ward"
        ));
        assert!(says_ready("INFO ready"));
        assert!(!says_ready("INFO programs already attached"));
    }

    #[test]
    fn colour_codes_are_stripped() {
        let line = "\x1b[2mward\x1b[0m \x1b[3mverdict\x1b[0m\x1b[2m=\x1b[0mdeny";
        assert_eq!(strip_ansi(line), "ward verdict=deny");
    }
}
