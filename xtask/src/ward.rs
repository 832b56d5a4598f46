//! The agent as a child process of the demo and the benchmark: started with its log in a file,
//! waited for until ready, stopped with SIGTERM so it detaches and removes its pins.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
pub use ward_host::process::tail;
use ward_host::process::{says_ready, strip_ansi, Capture, Process};

use crate::sys;

pub struct Ward {
    process: Option<Process>,
    log: PathBuf,
}

impl Ward {
    pub fn start(bin: &Path, config: &Path, log: &Path) -> Result<Self> {
        Self::start_with_env(bin, config, log, &[])
    }

    /// [`Ward::start`] with these variables set for it.
    pub fn start_with_env(
        bin: &Path,
        config: &Path,
        log: &Path,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--log-format", "text", "--config"])
            .arg(config)
            // Colour codes would split `key=value` pairs apart in the log file.
            .env("NO_COLOR", "1")
            .envs(env.iter().copied());
        println!("$ {} >{} 2>&1 &", sys::show(&cmd), log.display());
        let process = Process::spawn("ward", cmd, Capture::log_file(log))?;
        Ok(Self {
            process: Some(process),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Process::pid)
    }

    pub fn log_len(&self) -> u64 {
        ward_host::process::file_len(&self.log)
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
        let process = self.process.as_mut().context("ward was stopped")?;
        process.wait_for_line(0, timeout, "saying `ready`", |line| {
            says_ready(&strip_ansi(line))
        })?;
        println!("ward is ready ({:.1} s)", start.elapsed().as_secs_f64());
        Ok(())
    }

    pub fn stop(&mut self) -> Result<Option<ExitStatus>> {
        match self.process.take() {
            Some(mut process) => Ok(Some(process.stop(libc::SIGTERM, Duration::from_secs(15))?)),
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

/// The ward binary to run: `$WARD_BIN` if set (as for the privileged tests), else a fresh
/// release build.
pub fn binary() -> Result<PathBuf> {
    release_binary("WARD_BIN", "ward-agent", "ward")
}

/// The control plane to run: `$WARD_CONTROL_BIN` if set, else a fresh release build.
pub fn control_binary() -> Result<PathBuf> {
    release_binary("WARD_CONTROL_BIN", "ward-control", "ward-control")
}

/// The binary named by the environment variable `var` if set, else `bin` from a fresh release
/// build of `package`.
fn release_binary(var: &str, package: &str, bin: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(var) {
        println!("using {var}={}", Path::new(&path).display());
        return Ok(PathBuf::from(path));
    }
    sys::heading(&format!("build {bin}"));
    sys::run(sys::cargo().args(["build", "--release", "-p", package, "--bins"]))?;
    Ok(sys::target_dir().join("release").join(bin))
}
