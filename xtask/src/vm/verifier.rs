//! The verifier-complexity record: how many instructions the running kernel's verifier
//! processed for each of ward's programs. Runs where ward runs (inside the guest, or on the
//! host), as `cargo xtask vm-test --verifier-record FILE`, and writes one `name<TAB>count` line
//! per program, or one `error<TAB>reason` line when ward could not load them.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Read},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};
use ward_host::process::{says_ready, strip_ansi};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::sys;

/// Loading and verifying the programs takes seconds under TCG; this leaves a wide margin.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

pub fn record(out: &Path) -> Result<()> {
    let result = measure();
    let text = match &result {
        Ok(counts) => counts
            .iter()
            .map(|(name, count)| format!("{name}\t{count}\n"))
            .collect(),
        Err(e) => format!("error\t{}\n", format!("{e:#}").replace('\n', " | ")),
    };
    fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
    let counts = result?;
    for (name, count) in &counts {
        println!("verifier: {name:<16} {count:>7} instructions processed");
    }
    Ok(())
}

/// Starts ward with an empty configuration, and reads the counts of the programs it holds.
fn measure() -> Result<BTreeMap<String, u32>> {
    let ward = std::env::var_os("WARD_BIN")
        .map(PathBuf::from)
        .context("WARD_BIN (the ward binary) is not set")?;
    let tag = format!("ward-verifier-record-{}", std::process::id());
    let cgroup = sys::cgroup2_mount()?.join(&tag);
    let dir = std::env::temp_dir().join(&tag);
    let pin_dir = Path::new("/sys/fs/bpf").join(&tag);
    fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = dir.join("ward.yaml");
    fs::write(
        &config,
        format!(
            "trustDomain: verifier.test\ncgroupRoot: {}\npinDir: {}\nworkloads: []\n",
            cgroup.display(),
            pin_dir.display()
        ),
    )?;
    let result = run_ward_and_count(&ward, &config);
    let _ = fs::remove_dir_all(&dir);
    if let Err(e) = fs::remove_dir(&cgroup) {
        eprintln!("warning: removing {}: {e}", cgroup.display());
    }
    result
}

fn run_ward_and_count(ward: &Path, config: &Path) -> Result<BTreeMap<String, u32>> {
    let mut cmd = Command::new(ward);
    cmd.arg("run")
        .env("NO_COLOR", "1")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut children = sys::Children::default();
    let child = children.spawn(&mut cmd)?;
    let (lines_tx, lines) = mpsc::channel();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = lines_tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(lines_tx);

    let deadline = Instant::now() + READY_TIMEOUT;
    let mut log = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let line = strip_ansi(&line);
                let ready = says_ready(&line);
                log.push(line);
                if ready {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait()?;
                bail!("ward exited ({status}) before it was ready: {}", tail(&log));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("ward was not ready after {READY_TIMEOUT:?}: {}", tail(&log));
            }
        }
    }
    let ids = program_ids(child.id())?;
    let mut counts = BTreeMap::new();
    for info in aya::programs::loaded_programs() {
        let info = info.map_err(|e| anyhow!("listing the kernel's BPF programs: {e}"))?;
        if !ids.contains(&info.id()) {
            continue;
        }
        let name = info.name_as_str().unwrap_or("?").to_owned();
        let count = info.verified_instruction_count().with_context(|| {
            format!("the kernel reports no verified instruction count for {name} (Linux < 5.16?)")
        })?;
        counts.insert(name, count);
    }
    sys::terminate(child, Duration::from_secs(20))?;
    if counts.is_empty() {
        bail!("ward was ready but holds no BPF programs");
    }
    Ok(counts)
}

/// ward's error lines if it logged any (they carry the verifier's reason), else its last lines.
fn tail(log: &[String]) -> String {
    let errors: Vec<&str> = log
        .iter()
        .filter(|l| l.contains("ERROR"))
        .map(String::as_str)
        .collect();
    if errors.is_empty() {
        log[log.len().saturating_sub(8)..].join(" | ")
    } else {
        errors.join(" | ")
    }
}

/// The ids of the BPF programs a process holds open, from its fdinfo (`prog_id:` lines), so
/// that other ward instances on the same machine do not count.
fn program_ids(pid: u32) -> Result<Vec<u32>> {
    let dir = PathBuf::from(format!("/proc/{pid}/fdinfo"));
    let mut ids = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let Ok(text) = fs::read_to_string(entry?.path()) else {
            continue; // closed in the meantime
        };
        ids.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("prog_id:"))
                .filter_map(|id| id.trim().parse::<u32>().ok()),
        );
    }
    Ok(ids)
}

/// What `record` wrote: the counts, or the reason there are none.
pub fn parse(text: &str) -> Result<BTreeMap<String, u32>, String> {
    let mut counts = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (name, value) = line.split_once('\t').unwrap_or((line, ""));
        if name == "error" {
            return Err(value.to_owned());
        }
        let count = value
            .trim()
            .parse()
            .map_err(|_| format!("malformed verifier record line {line:?}"))?;
        counts.insert(name.to_owned(), count);
    }
    if counts.is_empty() {
        return Err("empty verifier record".to_owned());
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_errors_say_why() {
        let counts = parse("ward_connect4\t812\nward_sockops\t95\n").expect("valid record");
        assert_eq!(counts["ward_connect4"], 812);
        assert_eq!(counts.len(), 2);
        assert_eq!(
            parse("error\tthe kernel refused program ward_sockops").unwrap_err(),
            "the kernel refused program ward_sockops"
        );
        assert!(parse("").is_err());
        assert!(parse("ward_ingress\tmany\n").is_err());
    }
}
