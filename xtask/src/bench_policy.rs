//! `cargo xtask bench policy`: how long a one-rule change to a local policy file takes to be in
//! force in the kernel with policies of N entries, what the agent holds in memory while it
//! reloads, and how long `ward policy check` takes on generated policy sets of many rules.
//!
//! One real agent (release build) with the client and server workloads of `bench connect` and
//! its policy generator ([`loopback::Policy`]). Each change replaces the policy file atomically
//! (temporary file, rename) with one port added to, or removed from, the client's rule towards
//! the server. "In force" is the agent's `policy applied` line (logged after the kernel map write
//! returned and the generation switched) with a new generation and the new policy's entry count;
//! the latency is that line's timestamp minus the moment just before the file was replaced (one
//! clock). After every change the admin socket's status must name that generation, and a real
//! connection from the client to the changed port must pass (added) or be refused (removed).

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    agent_log::Applied,
    loopback::{self, Policy, Transport, SERVER_PORT},
    probe, setup,
    stats::{median_f64, millis, ms, percentile},
    sys::{self, heading, CgroupTree, Children},
    ward::{self, Ward},
};

const CGROUP_ROOT: &str = "ward-bench-policy";
/// The port each change adds to or removes from the client's rule; the server admits it always.
const CHANGED_PORT: u16 = 18082;
const WAIT: Duration = Duration::from_secs(300);
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(20);

#[derive(clap::Args)]
pub struct PolicyArgs {
    /// Policy sizes (entries in the compiled policy), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,100000")]
    sizes: Vec<usize>,
    /// One-rule changes per size: a port added to the client's rule, then removed, and so on.
    #[arg(long, default_value = "20")]
    changes: usize,
    /// Rule counts of the generated policy sets `ward policy check` is timed on.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,2200")]
    check_rules: Vec<usize>,
    /// Runs of `ward policy check` per set; the table shows the median.
    #[arg(long, default_value = "3")]
    check_runs: usize,
    /// Where to keep the configuration, policies and logs.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

pub fn run(args: &PolicyArgs) -> Result<()> {
    sys::require_root("bench policy", "it creates cgroups and loads eBPF programs")?;
    if args.sizes.is_empty() || args.changes == 0 || args.check_runs == 0 {
        bail!("need at least one size, one change and one run of `ward policy check`");
    }
    if args.check_rules.contains(&0) {
        bail!("--check-rules: a policy set needs at least one rule");
    }
    setup::run()?;
    let ward_bin = ward::binary()?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| sys::target_dir().join("ward-bench-policy"));
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    heading("workloads");
    let mount = sys::cgroup2_mount()?;
    let cgroups = CgroupTree::create(&mount, CGROUP_ROOT, &["client", "server"])?;
    fs::write(
        work.join("ward.yaml"),
        loopback::ward_config(CGROUP_ROOT, "policy.yaml"),
    )?;
    let mut rows = Vec::new();
    for &size in &args.sizes {
        rows.push(changes_at(&ward_bin, &work, &cgroups, size, args.changes)?);
    }
    drop(cgroups);

    let mut checks = Vec::new();
    for &rules in &args.check_rules {
        heading(&format!("ward policy check, {rules} rules"));
        checks.push(time_check(&ward_bin, &work, rules, args.check_runs)?);
    }

    heading("results");
    print!("{}", changes_table(&rows, args.changes));
    print!("\n{}", checks_table(&checks, args.check_runs));
    println!("\nlogs and policies: {}", work.display());
    Ok(())
}

/// What one size's run measured.
struct ChangeRow {
    entries: usize,
    /// Per change: file replaced → `policy applied`.
    latencies: Vec<Duration>,
    /// Per change, as the agent timed it: reading and compiling the policy (`compile_ms`), the
    /// write up to the switch that put it in force (`enforced_ms`), the whole write with the
    /// other generation brought up to date (`duration_ms`).
    compile_ms: Vec<f64>,
    enforced_ms: Vec<f64>,
    write_ms: Vec<f64>,
    /// The largest VmRSS of the samples taken during the changes, and how many were taken.
    rss_during: (u64, usize),
    /// (VmRSS, VmHWM) after the last change.
    after: Option<(u64, u64)>,
}

/// Starts the agent on a policy of `size` entries and times `changes` one-rule changes.
/// Time for the agent to write its second generation in full after start.
const START_CATCH_UP: Duration = Duration::from_secs(2);

fn changes_at(
    bin: &Path,
    work: &Path,
    cgroups: &CgroupTree,
    size: usize,
    changes: usize,
) -> Result<ChangeRow> {
    heading(&format!("{size} entries: {changes} one-rule changes"));
    let mut policy = Policy::new(size, Transport::Tcp4);
    policy.admit_on_server(CHANGED_PORT);
    let file = work.join("policy.yaml");
    write_policy(&file, &policy)?;
    let mut agent = Ward::start(
        bin,
        &work.join("ward.yaml"),
        &work.join(format!("ward-{size}.log")),
    )?;
    agent.wait_ready(WAIT)?;
    let first = wait_applied(&agent, 0, None, policy.entries())?;
    // The admin socket is /run/<name of pinDir>/admin.sock; the pin directory is named so.
    let admin_socket = Path::new("/run").join(CGROUP_ROOT).join("admin.sock");
    confirm_status(&admin_socket, &first)?;
    println!(
        "policy in force: generation {}, {} entries",
        first.generation, first.entries
    );

    let mut children = Children::default();
    let server = Transport::Tcp4.server(SERVER_PORT);
    let changed = Transport::Tcp4.server(CHANGED_PORT);
    let mut serve = sys::xtask_in_cgroup(&cgroups.path("server"))?;
    serve.args(["serve", "--listen", &server.to_string()]);
    serve.args(["--listen", &changed.to_string()]);
    probe::start_listener(&mut children, &mut serve, "the benchmark server")?;
    let client = cgroups.path("client");
    confirm_verdict(&client, server, true)?;
    confirm_verdict(&client, changed, policy.client_allows(CHANGED_PORT))?;

    // The agent's first apply wrote one generation; it writes the other in full in the
    // background (at 100,000 entries about a quarter of a second). Changes are measured in steady
    // state, after it.
    thread::sleep(START_CATCH_UP);
    let sampler = RssSampler::start(agent.pid());
    let mut latencies = Vec::new();
    let (mut compile_ms, mut enforced_ms, mut write_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut generation = first.generation;
    for _ in 0..changes {
        policy.toggle_client_port(CHANGED_PORT);
        let mark = agent.log_len();
        let replaced = SystemTime::now();
        write_policy(&file, &policy)?;
        let applied = wait_applied(&agent, mark, Some(generation), policy.entries())?;
        let took = applied.at.duration_since(replaced).unwrap_or_default();
        confirm_status(&admin_socket, &applied)?;
        let allowed = policy.client_allows(CHANGED_PORT);
        confirm_verdict(&client, changed, allowed)?;
        println!(
            "port {CHANGED_PORT} {}: generation {} ({} entries) in force after {:.1} ms \
             (kernel write {:.1} ms); connection {}",
            if allowed { "added" } else { "removed" },
            applied.generation,
            applied.entries,
            ms(took),
            applied.write_ms.unwrap_or(f64::NAN),
            if allowed { "passes" } else { "refused" },
        );
        generation = applied.generation;
        latencies.push(took);
        compile_ms.extend(applied.compile_ms);
        enforced_ms.extend(applied.enforced_ms);
        write_ms.extend(applied.write_ms);
    }
    let rss_during = sampler.stop();
    let after = sys::memory_kib(agent.pid());
    if let Some(status) = agent.stop()? {
        println!("{} exited ({status})", bin.display());
    }
    Ok(ChangeRow {
        entries: first.entries,
        latencies,
        compile_ms,
        enforced_ms,
        write_ms,
        rss_during,
        after,
    })
}

/// Replaces the policy file as an editor or a ConfigMap update does: the whole file at once.
fn write_policy(file: &Path, policy: &Policy) -> Result<()> {
    ward_host::atomic::write(file, policy.ward_yaml().as_bytes(), 0o644)
        .with_context(|| format!("replacing {}", file.display()))
}

/// Waits for a line that says a generation is in force ([`Applied`]) after log offset `mark`,
/// with a generation other than `previous` and `entries` entries (so a late repeat of the
/// previous apply is not taken for this one). A refused reload ends the wait with its log line.
fn wait_applied(agent: &Ward, mark: u64, previous: Option<u32>, entries: usize) -> Result<Applied> {
    let start = Instant::now();
    loop {
        let log = agent.log_since(mark);
        if let Some(applied) = Applied::all(&log)
            .into_iter()
            .find(|a| Some(a.generation) != previous && a.entries == entries)
        {
            return Ok(applied);
        }
        if let Some(refused) = log.lines().find(|l| l.contains("policy rejected")) {
            bail!("the agent refused the changed policy: {refused}");
        }
        if start.elapsed() > WAIT {
            bail!(
                "the agent applied no policy of {entries} entries within {WAIT:?}; its log:\n{}",
                ward::tail(&agent.log_since(0), 30)
            );
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Asks the agent's admin socket for its status (as `ward status --json` does) and checks that
/// the policy in force is `applied`'s generation with its entry count.
fn confirm_status(socket: &Path, applied: &Applied) -> Result<()> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the admin socket {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(b"{\"request\":\"status\"}\n")?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .context("reading the agent's status")?;
    let status: serde_json::Value = serde_json::from_str(&reply)
        .with_context(|| format!("the agent's status is not JSON: {reply:?}"))?;
    let policy = &status["policy"];
    let (generation, entries) = (policy["generation"].as_u64(), policy["entries"].as_u64());
    if generation != Some(applied.generation.into()) || entries != Some(applied.entries as u64) {
        bail!(
            "the agent logged generation {} with {} entries, but its status says generation \
             {generation:?} with {entries:?} entries",
            applied.generation,
            applied.entries
        );
    }
    Ok(())
}

/// A real connection from the client's cgroup to `addr`: it must pass when `allowed`, else be
/// refused by the client's egress (EPERM from `connect()`).
fn confirm_verdict(client: &Path, addr: std::net::SocketAddr, allowed: bool) -> Result<()> {
    let (code, said) = probe::connect_from(client, addr, false, Duration::from_millis(500))?;
    let expected = if allowed {
        probe::CONNECTED
    } else {
        probe::REFUSED_EPERM
    };
    if code != expected {
        let wanted = if allowed { "pass" } else { "be refused" };
        bail!("a connection to {addr} should {wanted} under the policy in force, but: {said}");
    }
    Ok(())
}

/// Samples a process's VmRSS every [`RSS_SAMPLE_EVERY`] on a thread of its own.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<(u64, usize)>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let (mut largest, mut samples) = (0, 0);
            while !stopped.load(Ordering::Relaxed) {
                if let Some((rss, _)) = sys::memory_kib(pid) {
                    largest = largest.max(rss);
                    samples += 1;
                }
                thread::sleep(RSS_SAMPLE_EVERY);
            }
            (largest, samples)
        });
        Self { stop, thread }
    }

    /// The largest VmRSS seen (KiB) and the number of samples.
    fn stop(self) -> (u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn changes_table(rows: &[ChangeRow], changes: usize) -> String {
    let mut out = format!(
        "one-rule changes ({changes} per size): policy file replaced (rename) → `policy applied` \
         with the new generation (logged after the kernel write; includes the agent's wait for \
         the file to settle and its compile), from {}s after the agent started (its second \
         generation's full write at start is done by then)\n",
        START_CATCH_UP.as_secs()
    );
    let _ = writeln!(
        out,
        "{:>8}  {:>9} {:>9} {:>9} {:>12} {:>13} {:>12} {:>12} {:>15} {:>13} {:>13}",
        "entries",
        "p50",
        "p99",
        "max",
        "compile p50",
        "enforced p50",
        "write p50",
        "write max",
        "RSS max during",
        "RSS after",
        "peak (HWM)"
    );
    for row in rows {
        let writes = millis(&row.write_ms);
        let (after, hwm) = row
            .after
            .map_or((f64::NAN, f64::NAN), |(rss, hwm)| (mib(rss), mib(hwm)));
        let _ = writeln!(
            out,
            "{:>8}  {:>6.1} ms {:>6.1} ms {:>6.1} ms {:>9.1} ms {:>10.1} ms {:>9.1} ms {:>9.1} ms {:>11.1} MiB {:>9.1} MiB {:>9.1} MiB",
            row.entries,
            ms(percentile(&row.latencies, 50)),
            ms(percentile(&row.latencies, 99)),
            ms(percentile(&row.latencies, 100)),
            ms(percentile(&millis(&row.compile_ms), 50)),
            ms(percentile(&millis(&row.enforced_ms), 50)),
            ms(percentile(&writes, 50)),
            ms(percentile(&writes, 100)),
            mib(row.rss_during.0),
            after,
            hwm,
        );
    }
    let _ = writeln!(
        out,
        "As the agent times them: compile, reading and compiling the policy (`compile_ms`); \
         enforced, its kernel write up to the one-write switch that puts the change in force \
         (`enforced_ms`); write, the whole apply up to the switch and its bookkeeping \
         (`duration_ms`; the previous generation is brought up to date 20 ms later, when no \
         program reads it, off this path). The rest of p50 is mostly the agent's 20 ms wait for \
         the file to settle. RSS max during: the \
         largest of {} VmRSS samples taken every {} ms while the changes ran; peak: VmHWM since \
         the agent started. p99 is nearest rank: with fewer than 100 changes it is the max. \
         Every change was confirmed by the admin socket's status (same \
         generation) and a connection to the changed port (passes when added, refused when \
         removed).",
        rows.iter().map(|r| r.rss_during.1).sum::<usize>(),
        RSS_SAMPLE_EVERY.as_millis()
    );
    out
}

/// One generated policy set and how long `ward policy check` took on it.
struct CheckRow {
    rules: usize,
    policies: usize,
    files: usize,
    workloads: usize,
    runs: Vec<Duration>,
    /// The check's own summary line (`N policies, 0 errors, W warnings`).
    summary: String,
}

/// Writes a generated set of `rules` rules with its configuration and times `runs` runs of
/// `ward policy check --config <its configuration> <its directory>`.
fn time_check(bin: &Path, work: &Path, rules: usize, runs: usize) -> Result<CheckRow> {
    let set = CheckSet::new(rules);
    let dir = work.join(format!("check-{rules}"));
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    let policies = dir.join("policies");
    fs::create_dir_all(&policies).with_context(|| format!("creating {}", policies.display()))?;
    fs::write(dir.join("ward.yaml"), &set.config)?;
    for (i, file) in set.files.iter().enumerate() {
        fs::write(policies.join(format!("team-{i:02}.yaml")), file)?;
    }
    let mut cmd = Command::new(bin);
    cmd.args(["policy", "check", "--config"])
        .arg(dir.join("ward.yaml"))
        .arg(&policies);
    println!("$ {}", sys::show(&cmd));
    let mut times = Vec::new();
    let mut summary = String::new();
    for _ in 0..runs {
        let start = Instant::now();
        let out = cmd
            .output()
            .with_context(|| format!("cannot start `{}`", sys::show(&cmd)))?;
        let took = start.elapsed();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        summary = said.lines().last().unwrap_or_default().trim().to_owned();
        if !out.status.success() || check_errors(&summary) != Some(0) {
            bail!(
                "`ward policy check` found the generated set of {rules} rules invalid ({}):\n{}{}",
                out.status,
                ward::tail(&said, 20),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        println!("{:.0} ms: {summary}", ms(took));
        times.push(took);
    }
    Ok(CheckRow {
        rules,
        policies: set.policies,
        files: set.files.len(),
        workloads: set.workloads,
        runs: times,
        summary,
    })
}

/// The error count of the check's summary line `N policies, E errors, W warnings`.
fn check_errors(summary: &str) -> Option<usize> {
    summary
        .split(", ")
        .find_map(|part| part.strip_suffix(" errors")?.parse().ok())
}

fn checks_table(rows: &[CheckRow], runs: usize) -> String {
    let mut out = format!(
        "`ward policy check --config` (release build) on generated policy sets, median of {runs} \
         runs (wall time, process start included)\n"
    );
    let _ = writeln!(
        out,
        "{:>6} {:>9} {:>6} {:>10} {:>11} {:>11}  summary",
        "rules", "policies", "files", "workloads", "median", "max"
    );
    for row in rows {
        let millis: Vec<f64> = row.runs.iter().map(|d| ms(*d)).collect();
        let _ = writeln!(
            out,
            "{:>6} {:>9} {:>6} {:>10} {:>8.1} ms {:>8.1} ms  {}",
            row.rules,
            row.policies,
            row.files,
            row.workloads,
            median_f64(millis),
            ms(percentile(&row.runs, 100)),
            row.summary
        );
    }
    out.push_str("`ward policy check` prints no compiled entry count; the summary is its own.\n");
    out
}

/// A policy set as several teams write one for a cluster of many services: one file per team,
/// policies that select one service each by labels and namespace, rules that admit or reach
/// other services by labels and namespace with lists of ports (a few short ranges, DNS over UDP
/// and TCP), and now and then a CIDR peer; with the agent configuration naming every service.
struct CheckSet {
    config: String,
    files: Vec<String>,
    policies: usize,
    workloads: usize,
}

const NAMESPACES: usize = 8;
const RULES_PER_POLICY: usize = 5;
const POLICIES_PER_FILE: usize = 50;

impl CheckSet {
    fn new(rules: usize) -> Self {
        let policies = rules.div_ceil(RULES_PER_POLICY);
        let workloads = (rules / 10).max(10);
        let files = (policies / POLICIES_PER_FILE).clamp(3, 64).min(policies);
        let service = |w: usize| {
            format!(
                "{{labels: {{app: svc-{w}}}, namespace: ns-{}}}",
                w % NAMESPACES
            )
        };

        let mut config = String::from("trustDomain: bench.example.org\nworkloads:\n");
        for w in 0..workloads {
            let tier = ["web", "api", "db"][w % 3];
            let _ = writeln!(
                config,
                "  - name: svc-{w}\n    namespace: ns-{}\n    labels: {{app: svc-{w}, tier: {tier}}}\n    \
                 addresses: [10.{}.{}.{}]",
                w % NAMESPACES,
                10 + w / 65_536,
                w / 256 % 256,
                w % 256
            );
        }

        let mut docs = vec![String::new(); files];
        let mut rule = 0;
        for p in 0..policies {
            let selected = p % workloads;
            let (mut ingress, mut egress) = (String::new(), String::new());
            for _ in 0..RULES_PER_POLICY.min(rules - rule) {
                let peer = if rule % 10 == 9 {
                    format!("{{cidr: 192.0.{}.0/24}}", rule / 10 % 256)
                } else {
                    service((selected + 1 + rule * 7) % workloads)
                };
                let ports = match rule % 4 {
                    0 => "[{port: 8080}, {port: 8443}, {port: 9090}]",
                    1 => "[{port: 5432}]",
                    2 => "[{port: 7000, endPort: 7003}]",
                    _ => "[{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]",
                };
                let (list, key) = if rule % 2 == 0 {
                    (&mut ingress, "from")
                } else {
                    (&mut egress, "to")
                };
                let _ = write!(
                    list,
                    "    - name: r{rule}\n      {key}: [{peer}]\n      ports: {ports}\n"
                );
                rule += 1;
            }
            let doc = &mut docs[p % files];
            let _ = write!(
                doc,
                "---\napiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: p-{p}\nspec:\n  \
                 selector:\n    labels: {{app: svc-{selected}}}\n    namespace: ns-{}\n",
                selected % NAMESPACES
            );
            for (section, rules) in [("ingress", &ingress), ("egress", &egress)] {
                if !rules.is_empty() {
                    let _ = write!(doc, "  {section}:\n{rules}");
                }
            }
        }
        Self {
            config,
            files: docs,
            policies,
            workloads,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_sets_have_the_requested_rules_in_several_files() {
        for rules in [1, 100, 1000, 2200] {
            let set = CheckSet::new(rules);
            let written: usize = set
                .files
                .iter()
                .map(|f| f.matches("- name: r").count())
                .sum();
            assert_eq!(written, rules, "rules in the set of {rules}");
            let policies: usize = set
                .files
                .iter()
                .map(|f| f.matches("kind: Policy").count())
                .sum();
            assert_eq!(policies, set.policies);
            assert_eq!(set.config.matches("- name: svc-").count(), set.workloads);
        }
        let set = CheckSet::new(2200);
        assert_eq!(
            (set.policies, set.workloads, set.files.len()),
            (440, 220, 8)
        );
        let all = set.files.concat();
        assert_eq!(all.matches("cidr:").count(), 220);
        assert!(all.contains("protocol: UDP") && all.contains("endPort: 7003"));
        assert!(all.contains("namespace: ns-7"));
    }

    #[test]
    fn check_summaries_give_their_error_count() {
        assert_eq!(check_errors("440 policies, 0 errors, 0 warnings"), Some(0));
        assert_eq!(check_errors("3 policies, 2 errors, 1 warnings"), Some(2));
        assert_eq!(check_errors("error: no such file"), None);
    }
}
