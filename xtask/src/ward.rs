//! The agent as a child process of the demo and the benchmark: started with its log in a file,
//! waited for until ready, stopped with SIGTERM so it detaches and removes its pins.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::sys;

pub struct Ward {
    child: Option<Child>,
    log: PathBuf,
}

impl Ward {
    pub fn start(bin: &Path, config: &Path, log: &Path) -> Result<Self> {
        let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--log-format", "text", "--config"])
            .arg(config)
            // Colour codes would split `key=value` pairs apart in the log file.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        println!("$ {} >{} 2>&1 &", sys::show(&cmd), log.display());
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Self {
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_len(&self) -> u64 {
        fs::metadata(&self.log).map_or(0, |m| m.len())
    }

    pub fn log_since(&self, offset: u64) -> String {
        let text = fs::read(&self.log).unwrap_or_default();
        strip_ansi(&String::from_utf8_lossy(
            text.get(offset as usize..).unwrap_or_default(),
        ))
    }

    /// Waits for the line that says the programs are attached.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let log = self.log_since(0);
            if log.lines().any(says_ready) {
                println!("ward is ready ({:.1} s)", start.elapsed().as_secs_f64());
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .map(Child::try_wait)
                .transpose()?
                .flatten()
            {
                bail!(
                    "ward exited ({status}) before it was ready; its log:\n{}",
                    tail(&log, 40)
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "ward did not say `ready` within {timeout:?}; its log:\n{}",
                    tail(&log, 40)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.take() {
            Some(mut child) => Ok(Some(sys::terminate(&mut child, Duration::from_secs(15))?)),
            None => Ok(None),
        }
    }
}

impl Drop for Ward {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("warning: stopping ward: {e:#}");
        }
    }
}

pub(crate) fn says_ready(line: &str) -> bool {
    line.split(|c: char| !c.is_ascii_alphanumeric())
        .any(|word| word == "ready")
}

/// Removes terminal colour sequences (`ESC [ ... letter`), in case the log has them anyway.
pub(crate) fn strip_ansi(text: &str) -> String {
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

/// The ward binary to run: `$WARD_BIN` if set (as for the privileged tests), else a fresh
/// release build.
pub fn binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("WARD_BIN") {
        println!("using WARD_BIN={}", Path::new(&bin).display());
        return Ok(PathBuf::from(bin));
    }
    sys::heading("build ward");
    sys::run(sys::cargo().args(["build", "--release", "-p", "ward-agent", "--bins"]))?;
    Ok(sys::target_dir().join("release/ward"))
}

/// The control plane to run: `$WARD_CONTROL_BIN` if set, else a fresh release build.
pub fn control_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("WARD_CONTROL_BIN") {
        println!("using WARD_CONTROL_BIN={}", Path::new(&bin).display());
        return Ok(PathBuf::from(bin));
    }
    sys::heading("build ward-control");
    sys::run(sys::cargo().args(["build", "--release", "-p", "ward-control", "--bins"]))?;
    Ok(sys::target_dir().join("release/ward-control"))
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

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
