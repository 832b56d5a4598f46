//! One guest: QEMU (TCG) boots a Debian kernel with the host's root shared read-only, runs a
//! shell command as root and is judged by what it leaves in its results directory. Only a
//! recorded exit code of 0 with at least one test passed is a pass; a panic, a hang, a crash
//! before the result is written or a run that tested nothing are failures.

use std::{
    fs::{self, File},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{initramfs, kernel::Kernel, report::TestCounts};
use crate::sys;

const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// What a guest is asked to do.
pub struct Job<'a> {
    pub kernel: &'a Kernel,
    /// Shell script the guest runs as root from its results directory (as /vmtest/cmd.sh).
    pub script: String,
    /// Where the run's files go; emptied first.
    pub work_dir: PathBuf,
    pub timeout: Duration,
    /// Printed in front of every console line, so parallel guests can be told apart.
    pub prefix: String,
    /// Whether a run that passed no test counts as a pass (only for the harness's self-test).
    pub require_tests: bool,
}

/// How a guest ended, as far as the host can tell.
#[derive(Debug, Default)]
pub struct Ending {
    pub timed_out: bool,
    /// The guest's own record of its command's exit code (the `rc` file), if it wrote one.
    pub recorded_rc: Option<String>,
    /// The first line that tells of a kernel panic or oops, if any.
    pub panic_line: Option<String>,
    pub counts: TestCounts,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(String),
}

impl Verdict {
    pub fn passed(&self) -> bool {
        *self == Verdict::Pass
    }
}

pub struct Run {
    pub verdict: Verdict,
    pub counts: TestCounts,
    pub duration: Duration,
    pub results: PathBuf,
}

pub fn judge(ending: &Ending, timeout: Duration, require_tests: bool) -> Verdict {
    if let Some(line) = &ending.panic_line {
        return Verdict::Fail(format!("the guest kernel crashed: {line}"));
    }
    if ending.timed_out {
        return Verdict::Fail(format!(
            "the guest did not finish within {} s (hang, or raise --timeout)",
            timeout.as_secs()
        ));
    }
    let Some(rc) = &ending.recorded_rc else {
        return Verdict::Fail(
            "the guest wrote no exit code: it stopped before its command finished \
             (init failed or the kernel died; see the console output above)"
                .to_owned(),
        );
    };
    match rc.trim().parse::<i32>() {
        Ok(0) => {}
        Ok(code) => return Verdict::Fail(format!("the guest's command exited with {code}")),
        Err(_) => return Verdict::Fail(format!("the guest recorded a malformed exit code {rc:?}")),
    }
    if ending.counts.failed > 0 {
        return Verdict::Fail(format!(
            "{} test(s) failed although the command exited 0",
            ending.counts.failed
        ));
    }
    if require_tests && ending.counts.passed == 0 {
        return Verdict::Fail("no test ran (does the filter match any test?)".to_owned());
    }
    Verdict::Pass
}

pub fn run(job: &Job) -> Result<Run> {
    let start = Instant::now();
    let results = job.work_dir.join("results");
    if job.work_dir.exists() {
        fs::remove_dir_all(&job.work_dir)
            .with_context(|| format!("emptying {}", job.work_dir.display()))?;
    }
    fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;
    let initrd = job.work_dir.join("initramfs.cpio.gz");
    initramfs::build(job.kernel, &initrd)?;
    fs::write(results.join("cmd.sh"), &job.script)?;

    let mut cmd = qemu_command(job.kernel, &initrd, &results);
    let console_path = job.work_dir.join("console.log");
    println!("{}$ {}", job.prefix, sys::show(&cmd));
    let mut children = sys::Children::default();
    let child = children.spawn(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    let panic_line = Arc::new(Mutex::new(None::<String>));
    let mut console = File::create(&console_path)?;
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let prefix = job.prefix.clone();
        let panic_line = Arc::clone(&panic_line);
        let mut console = console.try_clone().expect("duplicating a file handle");
        thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\r', '\n']);
                println!("{prefix}{line}");
                let _ = writeln!(console, "{line}");
                if is_crash(line) {
                    panic_line
                        .lock()
                        .expect("no panics while held")
                        .get_or_insert_with(|| line.to_owned());
                }
            }
        })
    })
    .collect();
    let status = sys::wait_timeout(child, job.timeout)?;
    let timed_out = status.is_none();
    if timed_out {
        println!(
            "{}vm-test: no result after {} s: stopping the guest",
            job.prefix,
            job.timeout.as_secs()
        );
        children.kill_all();
    }
    for reader in readers {
        let _ = reader.join();
    }
    console.flush()?;

    let output = fs::read_to_string(results.join("output.log"))
        .or_else(|_| fs::read_to_string(&console_path))
        .unwrap_or_default();
    let ending = Ending {
        timed_out,
        recorded_rc: fs::read_to_string(results.join("rc")).ok(),
        panic_line: panic_line.lock().expect("readers are done").take(),
        counts: TestCounts::from_libtest(&output),
    };
    Ok(Run {
        verdict: judge(&ending, job.timeout, job.require_tests),
        counts: ending.counts,
        duration: start.elapsed(),
        results,
    })
}

fn is_crash(line: &str) -> bool {
    [
        "Kernel panic",
        "BUG: ",
        "Oops: ",
        "general protection fault",
    ]
    .iter()
    .any(|sign| line.contains(sign))
}

fn qemu_command(kernel: &Kernel, initrd: &Path, results: &Path) -> Command {
    let share = |id: &str, path: &Path, tag: &str, readonly: bool| {
        let mut fsdev = format!("local,id={id},path={},security_model=none", path.display());
        if readonly {
            fsdev.push_str(",readonly=on");
        }
        if id == "root" {
            // The host root spans several file systems whose inode numbers may collide.
            fsdev.push_str(",multidevs=remap");
        }
        [
            "-fsdev".to_owned(),
            fsdev,
            "-device".to_owned(),
            format!("virtio-9p-pci,fsdev={id},mount_tag={tag}"),
        ]
    };
    let mut cmd = Command::new("qemu-system-x86_64");
    // KVM on these machines cannot boot Debian kernels; qboot + an uncompressed vmlinux (PVH
    // entry) boot in about 3 s under TCG.
    cmd.args(["-accel", "tcg", "-M", "q35", "-bios", QBOOT, "-cpu", "max"])
        .args(["-m", "1024", "-smp", "2"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinux)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init",
        ])
        .args(share("root", Path::new("/"), "hostroot", true))
        .args(share("mods", &kernel.modules_dir(), "kmods", true))
        .args(share("res", results, "results", false));
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(600);

    fn ended(rc: Option<&str>, passed: usize, failed: usize) -> Ending {
        Ending {
            recorded_rc: rc.map(str::to_owned),
            counts: TestCounts {
                passed,
                failed,
                ..TestCounts::default()
            },
            ..Ending::default()
        }
    }

    #[test]
    fn only_a_recorded_zero_with_tests_passed_is_a_pass() {
        assert_eq!(
            judge(&ended(Some("0\n"), 3, 0), TIMEOUT, true),
            Verdict::Pass
        );
    }

    #[test]
    fn a_missing_result_is_a_failure() {
        let verdict = judge(&ended(None, 3, 0), TIMEOUT, true);
        assert!(
            matches!(&verdict, Verdict::Fail(why) if why.contains("no exit code")),
            "{verdict:?}"
        );
    }

    #[test]
    fn a_non_zero_exit_is_a_failure() {
        let verdict = judge(&ended(Some("1\n"), 3, 1), TIMEOUT, true);
        assert!(
            matches!(&verdict, Verdict::Fail(why) if why.contains("exited with 1")),
            "{verdict:?}"
        );
        assert!(!judge(&ended(Some("garbage"), 3, 0), TIMEOUT, true).passed());
    }

    #[test]
    fn a_hang_is_a_failure_even_with_a_result() {
        let ending = Ending {
            timed_out: true,
            ..ended(Some("0"), 3, 0)
        };
        let verdict = judge(&ending, TIMEOUT, true);
        assert!(
            matches!(&verdict, Verdict::Fail(why) if why.contains("600 s")),
            "{verdict:?}"
        );
    }

    #[test]
    fn a_kernel_panic_is_a_failure_even_with_a_result() {
        let ending = Ending {
            panic_line: Some("Kernel panic - not syncing: sysrq triggered crash".to_owned()),
            ..ended(Some("0"), 3, 0)
        };
        assert!(!judge(&ending, TIMEOUT, true).passed());
    }

    #[test]
    fn a_run_that_tested_nothing_is_a_failure() {
        assert!(!judge(&ended(Some("0"), 0, 0), TIMEOUT, true).passed());
        assert!(judge(&ended(Some("0"), 0, 0), TIMEOUT, false).passed());
    }

    #[test]
    fn failed_tests_fail_the_run_whatever_the_exit_code() {
        assert!(!judge(&ended(Some("0"), 3, 1), TIMEOUT, true).passed());
    }

    #[test]
    fn crash_lines_are_recognised() {
        assert!(is_crash(
            "[    3.1] Kernel panic - not syncing: Attempted to kill init!"
        ));
        assert!(is_crash(
            "[    2.0] BUG: kernel NULL pointer dereference, address: 0"
        ));
        assert!(!is_crash("test verdicts::parse_bug_report ... ok"));
    }
}
