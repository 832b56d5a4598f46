//! `cargo xtask vm-test`: the privileged suite on the kernels ward's users run.
//!
//! For each Debian kernel of the matrix (6.1, 6.12) it downloads the image package once
//! (cached under `target/vm-kernels/`), boots it in QEMU with the host's root shared read-only,
//! runs the privileged test executables inside as root, then records how many instructions the
//! kernel's verifier processed for each of ward's programs. `host` runs the same on this machine's
//! kernel. A kernel panic, a hang, a missing result or a run that tested nothing is a failure.

mod guest;
mod initramfs;
mod kernel;
mod report;
mod verifier;

use std::{
    fs::{self, File},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use self::{
    guest::{Ending, Job, Verdict},
    kernel::Kernel,
    report::{Row, TestCounts},
};
use crate::sys::{self, heading};

#[derive(clap::Args)]
pub struct Args {
    /// The kernel to test on: a Debian kernel booted in QEMU, this machine's own, both Debian
    /// kernels (`vms`), or all three.
    #[arg(long, value_enum, required_unless_present = "verifier_record")]
    kernel: Option<KernelChoice>,
    /// Seconds a guest (or the host run) may take before it counts as hung. The suite takes
    /// about 20 to 25 minutes in an emulated guest on a 2-core machine; this leaves room for a
    /// busy machine without letting a hang hold CI for long.
    #[arg(long, default_value = "1800")]
    timeout: u64,
    /// Run only the quick subset of the suite (one test per area); a filter after `--` wins.
    #[arg(long)]
    quick: bool,
    /// Boot the guests side by side (on two cores under TCG this saves little and makes the
    /// timing-sensitive tests flaky).
    #[arg(long)]
    parallel: bool,
    /// Test the harness itself: boot guests that exit non-zero, panic and hang, and one that
    /// passes; succeed only if each is judged so.
    #[arg(long, conflicts_with_all = ["quick", "filter"])]
    self_test: bool,
    /// Inside the guest: write the verifier record of a briefly started ward to FILE.
    #[arg(long, hide = true, value_name = "FILE", conflicts_with = "kernel")]
    verifier_record: Option<PathBuf>,
    /// libtest filter and options for the test executables.
    #[arg(last = true)]
    filter: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KernelChoice {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    Host,
    /// Both Debian kernels: what `cargo xtask test` adds to its run on the host.
    Vms,
    All,
}

/// The quick subset: a filter matching one test per area (loopback, cgroups, namespaces, tools)
/// for a fast look at a kernel under TCG.
const QUICK_FILTER: &[&str] = &[
    "peer_speaks_tcp_and_udp_over_loopback",
    "two_nodes_reach_each_other",
];

/// Tests whose subject is not the kernel, left out of the guests (they run on the host's kernel
/// with the rest of `cargo xtask test`): the agent's threading under a large apply, which
/// measures CPU per thread (TCG's emulation of the tunnel's TLS swamps it), and the tunnel's
/// user-space decisions (authorization, revocation, rotation, TLS with openssl), whose kernel
/// side (redirect, delivery mark, plaintext refusal) the first mtls test covers in the guests...
const HOST_ONLY: &[&str] = &[
    "a_tunneled_stream_does_not_wait_for_a_large_policy_apply",
    "an_identity_the_policy_does_not_allow_is_refused_by_the_receiving_agent",
    "a_workload_with_an_allowed_spiffe_id_but_other_labels_is_refused_by_the_receiving_agent",
    "a_revoked_certificate_is_refused_and_an_agent_replaces_its_own_at_once",
    "certificate_rotation_does_not_break_a_long_lived_connection",
    "openssl_s_client_with_a_workload_certificate_completes_a_handshake_with_the_inbound_port",
    // DNS-aware egress: the guests run the name admitted over UDP and TCP (the redirect, the
    // proxy's lookup of the socket, the learned decision, recvmsg showing the resolver) on both
    // kernels; what else the proxy does with answers, bounds and restarts is user space.
    "a_learned_address_is_refused_once_its_bounded_ttl_is_over",
    "a_cname_chain_and_a_pattern_admit_the_names_they_match_and_no_others",
    "policy_reloads_keep_the_learned_addresses_of_the_names_they_still_name",
    "names_that_share_an_address_each_keep_their_rule",
    "a_resolver_on_loopback_is_proxied_like_any_other",
    "ipv6_resolver_and_aaaa_answers_admit_ipv6_connections",
    "a_restart_keeps_learned_names_and_never_admits_a_name_it_did_not_learn",
    "a_restart_with_a_lower_max_learned_holds_no_more_than_it",
    "answers_a_resolver_should_not_give_teach_nothing_they_should_not",
    "bad_queries_resolvers_not_allowed_and_queries_the_kernel_did_not_send_are_refused",
    "a_query_straight_to_the_proxy_from_a_port_a_workload_used_is_refused",
    "a_resolver_that_closes_tcp_after_each_answer_still_answers_every_query",
    "only_policy_names_refuses_names_outside_the_policy",
    "bursts_under_the_default_open_file_limit_lose_no_query_unaccounted",
    "ten_thousand_names_stay_within_max_learned_and_a_burst_is_bounded_in_flight",
];
/// ...and the test files of the control plane's distribution between nodes, whose kernel side
/// the single-node files cover, of deployment (the image, the manifests, the systemd units), and
/// of the stand-in Kubernetes API server against kube-rs (no kernel in it at all), of
/// ward-control reading a cluster (whose kernel side is the control-plane mode's), and of the
/// tunnel's listeners inside pods (the agent's; the redirect they serve, keyed by the namespace's
/// cookie, and the certificate gate are the first mtls test's in the guests).
const HOST_ONLY_FILES: &[&str] = &[
    "multinode",
    "deploy",
    "kube_api",
    "kubernetes_cluster",
    "kubernetes_services",
    "mtls_pods",
];

/// A guest's libtest arguments: the filter, and `--skip` for each of [`HOST_ONLY`].
fn guest_filter(filter: &[String]) -> Vec<String> {
    let mut args = filter.to_vec();
    for test in HOST_ONLY {
        args.extend(["--skip".to_owned(), (*test).to_owned()]);
    }
    args
}

/// Whether a test executable (`<file>-<hash>`) runs in the guests: not one of [`HOST_ONLY_FILES`].
fn runs_in_guests(executable: &Path) -> bool {
    let name = executable
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    !HOST_ONLY_FILES
        .iter()
        .any(|file| name.rsplit_once('-').is_some_and(|(stem, _)| stem == *file))
}

pub fn run(args: &Args) -> Result<()> {
    if let Some(out) = &args.verifier_record {
        return verifier::record(out);
    }
    let choice = args.kernel.expect("clap requires --kernel");
    sys::require_root(
        "vm-test",
        "the suite creates cgroups and network namespaces and loads eBPF programs",
    )?;
    let lines: Vec<kernel::Line> = match choice {
        KernelChoice::V6_1 => vec![kernel::V6_1],
        KernelChoice::V6_12 => vec![kernel::V6_12],
        KernelChoice::Host => vec![],
        KernelChoice::Vms | KernelChoice::All => vec![kernel::V6_1, kernel::V6_12],
    };
    if !lines.is_empty() {
        heading("vm-test: host packages");
        host_packages()?;
    }
    let mut kernels = Vec::new();
    for line in lines {
        heading(&format!("vm-test: kernel {}", line.label));
        kernels.push(kernel::prepare(line)?);
    }
    let timeout = Duration::from_secs(args.timeout);
    if args.self_test {
        if kernels.is_empty() {
            bail!("--self-test boots guests: choose --kernel 6.1, 6.12 or all");
        }
        heading("vm-test: build");
        return self_test(&kernels, stage_binaries()?);
    }

    heading("vm-test: build");
    let staged = stage_binaries()?;
    let filter: Vec<String> = if args.filter.is_empty() && args.quick {
        QUICK_FILTER.iter().map(|s| s.to_string()).collect()
    } else {
        args.filter.clone()
    };

    let mut rows = Vec::new();
    if matches!(choice, KernelChoice::Host | KernelChoice::All) {
        heading("vm-test: host kernel");
        // The host runs the whole suite, the deploy tests among them: they inspect and run the
        // image `cargo xtask test` builds (unoptimised, as there).
        let image = crate::image::build(true)?;
        rows.push(run_on_host(&staged, &filter, &image, timeout)?);
    }
    let guest_staged = Staged {
        tests: staged
            .tests
            .iter()
            .filter(|t| runs_in_guests(t))
            .cloned()
            .collect(),
        ..staged.clone()
    };
    let jobs: Vec<(&Kernel, Job)> = kernels
        .iter()
        .map(|kernel| {
            let prefix = if kernels.len() > 1 && args.parallel {
                format!("[{}] ", kernel.line.label)
            } else {
                String::new()
            };
            let job = Job {
                kernel,
                script: suite_script(
                    &guest_staged,
                    &guest_filter(&filter),
                    1,
                    GUEST_TIME_SCALE,
                    Path::new("/vmtest"),
                ),
                work_dir: sys::target_dir().join("vm-test").join(&kernel.release),
                timeout,
                prefix,
                require_tests: true,
            };
            (kernel, job)
        })
        .collect();
    if !jobs.is_empty() {
        heading(&format!(
            "vm-test: {} guest(s), {}",
            jobs.len(),
            if !args.parallel || jobs.len() == 1 {
                "one after another"
            } else {
                "side by side"
            }
        ));
    }
    let runs: Vec<Result<guest::Run>> = if !args.parallel {
        jobs.iter().map(|(_, job)| guest::run(job)).collect()
    } else {
        thread::scope(|scope| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|(_, job)| scope.spawn(|| guest::run(job)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a guest runner panicked"))
                .collect()
        })
    };
    for ((kernel, _), run) in jobs.iter().zip(runs) {
        rows.push(match run {
            Ok(run) => row_of_run(kernel, run),
            Err(e) => Row {
                kernel: kernel.line.label.to_owned(),
                release: kernel.release.clone(),
                package_version: kernel.version.clone(),
                counts: TestCounts::default(),
                outcome: format!("FAILED: {e:#}"),
                duration: Duration::ZERO,
                verifier: Err("the guest did not run".to_owned()),
            },
        });
    }

    report::print_summary(&rows);
    report::print_verifier_table(&rows);
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| r.outcome != "ok")
        .map(|r| r.kernel.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("the suite failed on kernel(s) {}", failed.join(", "));
    }
    println!("\nvm-test: passed on {} kernel(s)", rows.len());
    Ok(())
}

fn row_of_run(kernel: &Kernel, run: guest::Run) -> Row {
    let release = fs::read_to_string(run.results.join("kernel-release"))
        .map(|r| r.trim().to_owned())
        .unwrap_or_else(|_| format!("{} (not reported)", kernel.release));
    let verifier = read_verifier_record(&run.results);
    let mut outcome = outcome(&run.verdict);
    if !run.verdict.passed() && run.counts.failed == 0 && verifier.is_err() {
        outcome += "; ward did not load (see the verifier record)";
    }
    Row {
        kernel: kernel.line.label.to_owned(),
        release,
        package_version: kernel.version.clone(),
        counts: run.counts,
        outcome,
        duration: run.duration,
        verifier,
    }
}

fn outcome(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Pass => "ok".to_owned(),
        Verdict::Fail(why) => format!("FAILED: {why}"),
    }
}

fn read_verifier_record(results: &Path) -> Result<std::collections::BTreeMap<String, u32>, String> {
    match fs::read_to_string(results.join("verifier.txt")) {
        Ok(text) => verifier::parse(&text),
        Err(_) => Err("not written (the run stopped before it)".to_owned()),
    }
}

/// What QEMU, the guest's initramfs and the kernel cache need.
fn host_packages() -> Result<()> {
    const PACKAGES: [&str; 4] = [
        "qemu-system-x86",
        "qemu-system-data",
        "busybox-static",
        "kmod",
    ];
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Status}\n"])
        .args(PACKAGES)
        .output()
        .context("running dpkg-query (is this a Debian machine?)")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = PACKAGES
        .into_iter()
        .filter(|p| !listed.lines().any(|l| l == format!("{p} installed")))
        .collect();
    if missing.is_empty() {
        println!("present: {}", PACKAGES.join(" "));
        return Ok(());
    }
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing);
        cmd
    };
    if sys::run(&mut install()).is_err() {
        sys::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .arg("update"),
        )?;
        sys::run(&mut install())?;
    }
    Ok(())
}

/// The binaries every kernel of one run tests, copied out of `target/debug` so that a build
/// running meanwhile cannot change them between kernels.
#[derive(Clone)]
struct Staged {
    ward: PathBuf,
    /// ward built with the next map layout, for the upgrade test.
    ward_abi_next: PathBuf,
    /// The control plane, for the multi-node tests.
    control: PathBuf,
    /// The tests' peer (listener and client); staged too, so a rebuild on the host while a guest
    /// runs cannot pull it from under the tests.
    peer: PathBuf,
    xtask: PathBuf,
    tests: Vec<PathBuf>,
}

fn stage_binaries() -> Result<Staged> {
    sys::run(sys::cargo().args(["build", "-p", "ward-agent", "-p", "ward-control", "--bins"]))?;
    // The same build directory as `cargo xtask test`'s, so the two share the work.
    let abi_next_dir = sys::target_dir().join("abi-next");
    sys::run(&mut sys::build_ward_with_feature("abi-next", &abi_next_dir))?;
    let mut cmd = sys::cargo();
    cmd.args([
        "test",
        "-p",
        "ward-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    println!("$ {}", sys::show(&cmd));
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the privileged tests failed ({})", out.status);
    }
    let mut executables = test_executables(&String::from_utf8_lossy(&out.stdout));
    executables.sort();
    if executables.is_empty() {
        bail!("cargo test -p ward-tests --no-run built no test executable");
    }

    let dir = sys::target_dir().join("vm-test/bin");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let copy = |from: &Path| -> Result<PathBuf> {
        let to = dir.join(from.file_name().context("binary without a name")?);
        fs::copy(from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        Ok(to)
    };
    let staged = Staged {
        ward: copy(&sys::target_dir().join("debug/ward"))?,
        ward_abi_next: {
            let to = dir.join("ward-abi-next");
            let from = abi_next_dir.join("debug/ward");
            fs::copy(&from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
            to
        },
        control: copy(&sys::target_dir().join("debug/ward-control"))?,
        peer: copy(&sys::target_dir().join("debug/ward-test-peer"))?,
        xtask: copy(&std::env::current_exe().context("locating the xtask binary")?)?,
        tests: executables.iter().map(|e| copy(e)).collect::<Result<_>>()?,
    };
    for test in &staged.tests {
        println!("test executable: {}", test.display());
    }
    Ok(staged)
}

/// ward built with `verifier-reject`: one of its kernel programs is refused at load.
fn build_verifier_reject_ward() -> Result<PathBuf> {
    let dir = sys::target_dir().join("verifier-reject");
    sys::run(&mut sys::build_ward_with_feature("verifier-reject", &dir))?;
    let to = sys::target_dir().join("vm-test/bin/ward-verifier-reject");
    fs::copy(dir.join("debug/ward"), &to)
        .with_context(|| format!("copying the verifier-reject ward to {}", to.display()))?;
    Ok(to)
}

/// Test executables (`profile.test`) among `cargo --message-format=json` messages.
fn test_executables(messages: &str) -> Vec<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .collect()
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// How much slower than the host a guest runs the suite: QEMU emulates the CPU (TCG), so process
/// start-up alone takes about ten times as long. The tests stretch their timing bounds by it.
const GUEST_TIME_SCALE: u32 = 5;

/// The guest's (or host's) command: the run's variables, then `vm/run-suite.sh`.
fn suite_script(
    staged: &Staged,
    filter: &[String],
    threads: usize,
    time_scale: u32,
    results: &Path,
) -> String {
    let tests: Vec<String> = staged
        .tests
        .iter()
        .map(|t| t.to_string_lossy().into_owned())
        .collect();
    let mut script = String::from("# written by cargo xtask vm-test\n");
    for (name, value) in [
        ("WARD_BIN", staged.ward.to_string_lossy().into_owned()),
        (
            "WARD_BIN_ABI_NEXT",
            staged.ward_abi_next.to_string_lossy().into_owned(),
        ),
        (
            "WARD_CONTROL_BIN",
            staged.control.to_string_lossy().into_owned(),
        ),
        ("WARD_TEST_PEER", staged.peer.to_string_lossy().into_owned()),
        ("XTASK_BIN", staged.xtask.to_string_lossy().into_owned()),
        ("TEST_EXES", tests.join(" ")),
        ("TEST_THREADS", threads.to_string()),
        ("WARD_TEST_TIME_SCALE", time_scale.to_string()),
        ("RESULTS", results.to_string_lossy().into_owned()),
    ] {
        script += &format!("{name}={}\n", shell_quote(&value));
    }
    script += "set --";
    for arg in filter {
        script += " ";
        script += &shell_quote(arg);
    }
    script += "\n";
    script += include_str!("../vm/run-suite.sh");
    script
}

/// The same suite on this machine's kernel, with as many test threads as it has CPUs, and the
/// image `image` for the tests that inspect and run it.
fn run_on_host(staged: &Staged, filter: &[String], image: &Path, timeout: Duration) -> Result<Row> {
    let start = Instant::now();
    let work_dir = sys::target_dir().join("vm-test/host");
    let results = work_dir.join("results");
    if work_dir.exists() {
        fs::remove_dir_all(&work_dir)
            .with_context(|| format!("emptying {}", work_dir.display()))?;
    }
    fs::create_dir_all(&results)?;
    let threads = thread::available_parallelism().map_or(1, |n| n.get());
    let script = results.join("cmd.sh");
    fs::write(&script, suite_script(staged, filter, threads, 1, &results))?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"exec sh "$0" 2>&1"#)
        .arg(&script)
        .current_dir(&results)
        .env("WARD_IMAGE", image)
        .env("WARD_KUBERNETES_VALIDATE", crate::setup::validator())
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    println!("$ {}", sys::show(&cmd));
    let mut children = sys::Children::default();
    let child = children.spawn(&mut cmd)?;
    let stdout = child.stdout.take().expect("piped");
    let log_path = results.join("output.log");
    let mut log = File::create(&log_path)?;
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line);
            println!("{line}");
            let _ = writeln!(log, "{line}");
        }
    });
    let status = sys::wait_timeout(child, timeout)?;
    if status.is_none() {
        children.kill_all();
    }
    let _ = reader.join();
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    let ending = Ending {
        timed_out: status.is_none(),
        recorded_rc: status.map(|s| s.code().map_or("signal".to_owned(), |c| c.to_string())),
        panic_line: None,
        counts: TestCounts::from_libtest(&output),
    };
    let release = fs::read_to_string(results.join("kernel-release"))
        .map(|r| r.trim().to_owned())
        .unwrap_or_else(|_| "(not reported)".to_owned());
    Ok(Row {
        kernel: "host".to_owned(),
        release,
        package_version: "-".to_owned(),
        counts: ending.counts,
        outcome: outcome(&guest::judge(&ending, timeout, true)),
        duration: start.elapsed(),
        verifier: read_verifier_record(&results),
    })
}

/// Broken guests the harness must call failures, and a good one it must call a pass: a harness
/// that cannot fail proves nothing.
fn self_test(kernels: &[Kernel], staged: Staged) -> Result<()> {
    struct Case {
        name: &'static str,
        script: String,
        timeout: Duration,
        must_pass: bool,
        /// Text the output must hold besides the verdict, so a failure counts only for the
        /// reason the case is about.
        says: Option<&'static str>,
    }
    // The real suite's first test with a ward whose programs the verifier refuses.
    let broken = Staged {
        ward: build_verifier_reject_ward()?,
        ..staged
    };
    let broken_script = suite_script(
        &broken,
        &["allowed_tcp_egress_passes".to_owned()],
        1,
        GUEST_TIME_SCALE,
        Path::new("/vmtest"),
    );
    let libtest_ok = "echo 'test vm_self_test::boots ... ok'\n\
                      echo 'test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s'\n";
    let good = format!("{libtest_ok}exit 0\n");
    let cases = [
        Case {
            name: "command exits non-zero",
            script: "echo 'test vm_self_test::broken ... FAILED'\nexit 3\n".to_owned(),
            timeout: Duration::from_secs(120),
            must_pass: false,
            says: None,
        },
        Case {
            name: "kernel panics before a result",
            script: "echo 1 > /proc/sys/kernel/sysrq\necho c > /proc/sysrq-trigger\nsleep 60\n"
                .to_owned(),
            timeout: Duration::from_secs(120),
            must_pass: false,
            says: None,
        },
        Case {
            name: "guest hangs",
            script: "sleep 100000\n".to_owned(),
            timeout: Duration::from_secs(30),
            must_pass: false,
            says: None,
        },
        Case {
            name: "command tests nothing",
            script: "exit 0\n".to_owned(),
            timeout: Duration::from_secs(120),
            must_pass: false,
            says: None,
        },
        Case {
            name: "a program the verifier refuses",
            script: broken_script,
            timeout: Duration::from_secs(300),
            must_pass: false,
            says: Some("ward_postbind4"),
        },
        Case {
            name: "good command",
            script: good,
            timeout: Duration::from_secs(120),
            must_pass: true,
            says: None,
        },
    ];
    let mut wrong = Vec::new();
    for kernel in kernels {
        for case in &cases {
            heading(&format!(
                "vm-test self-test on {}: {}",
                kernel.line.label, case.name
            ));
            let run = guest::run(&Job {
                kernel,
                script: case.script.clone(),
                work_dir: sys::target_dir()
                    .join("vm-test/self-test")
                    .join(&kernel.release),
                timeout: case.timeout,
                prefix: String::new(),
                require_tests: true,
            })?;
            let judged = outcome(&run.verdict);
            let output = fs::read_to_string(run.results.join("output.log")).unwrap_or_default();
            let right = run.verdict.passed() == case.must_pass
                && case.says.is_none_or(|text| output.contains(text));
            println!(
                "self-test {}: {}: judged {judged} ({})",
                kernel.line.label,
                case.name,
                if right { "as it must" } else { "WRONG" }
            );
            if !right {
                wrong.push(format!("{} / {}: {judged}", kernel.line.label, case.name));
            }
        }
    }
    if !wrong.is_empty() {
        bail!("the harness misjudged: {}", wrong.join("; "));
    }
    println!(
        "vm-test self-test: all {} cases judged right",
        cases.len() * kernels.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_executables_are_found_in_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"kind":["bin"]},"profile":{"test":false},"executable":"/t/debug/ward-test-peer"}
{"reason":"compiler-artifact","target":{"kind":["test"]},"profile":{"test":true},"executable":"/t/debug/deps/harness-0123"}
{"reason":"compiler-artifact","target":{"kind":["lib"]},"profile":{"test":false},"executable":null}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            test_executables(messages),
            [PathBuf::from("/t/debug/deps/harness-0123")]
        );
    }

    #[test]
    fn the_multinode_file_runs_on_the_host_only() {
        assert!(!runs_in_guests(Path::new("/t/multinode-0123abcd")));
        assert!(!runs_in_guests(Path::new("/t/kube_api-0123abcd")));
        assert!(!runs_in_guests(Path::new("/t/mtls_pods-0123abcd")));
        assert!(runs_in_guests(Path::new("/t/mtls-0123abcd")));
        assert!(runs_in_guests(Path::new("/t/enforcement-0123abcd")));
    }

    #[test]
    fn guests_skip_the_host_only_tests_after_the_filter() {
        let args = guest_filter(&["mtls".to_owned()]);
        assert_eq!(args.len(), 1 + 2 * HOST_ONLY.len());
        assert_eq!(
            args[..3],
            [
                "mtls",
                "--skip",
                "a_tunneled_stream_does_not_wait_for_a_large_policy_apply"
            ]
        );
    }

    #[test]
    fn the_suite_script_quotes_the_filter() {
        let staged = Staged {
            ward: "/t/ward".into(),
            ward_abi_next: "/t/ward-abi-next".into(),
            control: "/t/ward-control".into(),
            peer: "/t/ward-test-peer".into(),
            xtask: "/t/xtask".into(),
            tests: vec!["/t/a".into(), "/t/b".into()],
        };
        let script = suite_script(
            &staged,
            &["it's".to_owned(), "--exact".to_owned()],
            1,
            GUEST_TIME_SCALE,
            Path::new("/vmtest"),
        );
        assert!(script.contains("TEST_EXES='/t/a /t/b'\n"), "{script}");
        assert!(script.contains(r"set -- 'it'\''s' '--exact'"), "{script}");
        assert!(script.ends_with(include_str!("../vm/run-suite.sh")));
    }
}
