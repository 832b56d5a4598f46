//! `cargo xtask bench control`: how fast the control plane's policy reaches the kernel of every
//! node, how long a new agent takes to receive a large policy whole, and what the control plane
//! and the agents hold in memory with many identities.
//!
//! One real `ward-control` on loopback and several real agents ("nodes", each with its own
//! cgroup subtree, pin directory and state directory) on this machine. No traffic is sent.
//!
//! "Applied in the kernel" is the agent's `control plane state applied` log line, which it
//! writes after its kernel map write returned; the line carries the versions it applied, so
//! each change is matched to its own line. Latency is that line's timestamp minus the moment
//! just before the policy file was renamed into the control plane's directory (one clock).

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _, Result};
use ward_host::process::{Capture, Process};

use crate::{
    agent_log::{field, timestamp},
    setup,
    stats::{median_f64, millis, ms, percentile},
    sys::{self, heading, CgroupTree},
    ward::{self, Ward},
};

const TRUST_DOMAIN: &str = "bench.example.org";
/// Rules per policy file: the control plane refuses files above 4 MiB.
const RULES_PER_FILE: usize = 2000;
/// Rule 0's port in the timed changes: `CHANGED_PORT + change`, above every other rule's port.
const CHANGED_PORT: usize = 60_000;
const WAIT: Duration = Duration::from_secs(300);

#[derive(clap::Args)]
pub struct ControlArgs {
    /// Agents that receive every change.
    #[arg(long, default_value = "3")]
    nodes: usize,
    /// Rule counts of the propagation runs, comma separated (at most 59,999).
    #[arg(long, value_delimiter = ',', default_value = "10,10000")]
    sizes: Vec<usize>,
    /// Timed single-rule changes per size.
    #[arg(long, default_value = "40")]
    changes: usize,
    /// Identities (workloads spread over the nodes) for the memory measurement.
    #[arg(long, default_value = "10000")]
    identities: usize,
    /// Rules a new agent receives whole in the resync measurement.
    #[arg(long, default_value = "100000")]
    resync_rules: usize,
    /// New agents timed in the resync measurement.
    #[arg(long, default_value = "3")]
    resyncs: usize,
    /// Where to keep configurations, policies, state and logs.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

pub fn run(args: &ControlArgs) -> Result<()> {
    sys::require_root(
        "bench control",
        "it creates cgroups and loads eBPF programs",
    )?;
    if args.nodes == 0
        || args.changes == 0
        || args.changes * args.sizes.len() > 5000
        || args.sizes.iter().any(|&s| s >= CHANGED_PORT)
    {
        bail!("need a node, 1 to 5000 changes in all, and sizes below {CHANGED_PORT}");
    }
    setup::run()?;
    let ward_bin = ward::binary()?;
    let control_bin = ward::control_binary()?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| sys::target_dir().join("ward-bench-control"));
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("emptying {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    heading("control plane and nodes");
    let mount = sys::cgroup2_mount()?;
    let node_names: Vec<String> = (0..args.nodes).map(|i| format!("node-{i}")).collect();
    let resync_names: Vec<String> = (0..args.resyncs).map(|i| format!("resync-{i}")).collect();
    let children: Vec<String> = node_names
        .iter()
        .chain(&resync_names)
        .map(|n| format!("{n}/client"))
        .collect();
    let child_refs: Vec<&str> = children.iter().map(String::as_str).collect();
    let cgroups = CgroupTree::create(&mount, "ward-bench-control", &child_refs)?;
    let mut plane = Plane::start(&control_bin, &work)?;
    // Every write changes rule 0's port, so every write is a new policy version.
    let mut change = 0;
    let first_size = args.sizes.first().copied().unwrap_or(10);
    write_rules(&plane.policy_dir(), first_size, change)?;
    let first = plane.settled_version(0)?;
    let mut nodes = Vec::new();
    for name in &node_names {
        nodes.push(Node::start(&ward_bin, &work, &cgroups, &plane, name)?);
    }
    for node in &nodes {
        node.wait_applied(0, &first, WAIT)?;
    }

    let mut rows = Vec::new();
    for &size in &args.sizes {
        heading(&format!("propagation, {size} rules"));
        let mark = plane.log_len();
        let marks: Vec<u64> = nodes.iter().map(|n| n.ward.log_len()).collect();
        change += 1;
        write_rules(&plane.policy_dir(), size, change)?;
        let version = plane.settled_version(mark)?;
        for (node, mark) in nodes.iter().zip(&marks) {
            node.wait_applied(*mark, &version, WAIT)?;
        }
        let mut everywhere = Vec::new();
        let mut per_node = Vec::new();
        let mut apply = Vec::new();
        let mut at_plane = Vec::new();
        for _ in 0..args.changes {
            let marks: Vec<u64> = nodes.iter().map(|n| n.ward.log_len()).collect();
            let plane_mark = plane.log_len();
            change += 1;
            let written = SystemTime::now();
            write_file_of_rule_zero(&plane.policy_dir(), size, change)?;
            let (version, served) = plane.next_version(plane_mark)?;
            if let Some(served) = served {
                at_plane.push(served.duration_since(written).unwrap_or_default());
            }
            let mut slowest = Duration::ZERO;
            for (node, mark) in nodes.iter().zip(&marks) {
                let (line, apply_ms) = node.wait_applied(*mark, &version, WAIT)?;
                let at = timestamp(&line).context("an applied line without a timestamp")?;
                let took = at.duration_since(written).unwrap_or_default();
                slowest = slowest.max(took);
                per_node.push(took);
                apply.extend(apply_ms);
            }
            everywhere.push(slowest);
        }
        println!(
            "{} changes: on every node p50 {:.1} ms, p99 {:.1} ms",
            args.changes,
            ms(percentile(&everywhere, 50)),
            ms(percentile(&everywhere, 99))
        );
        rows.push(Row {
            rules: size,
            everywhere,
            per_node,
            at_plane,
            apply_ms: apply,
        });
    }

    heading(&format!("{} identities", args.identities));
    let per_node = args.identities.div_ceil(args.nodes);
    let started = Instant::now();
    let marks: Vec<u64> = nodes.iter().map(|n| n.ward.log_len()).collect();
    for (i, node) in nodes.iter().enumerate() {
        let count = per_node.min(args.identities.saturating_sub(i * per_node));
        node.set_filler_workloads(i, count)?;
    }
    // Every filler workload and the nodes' shared `client`.
    let want = args.identities + 1;
    for (node, mark) in nodes.iter().zip(&marks) {
        node.wait_identities(*mark, want, WAIT)?;
    }
    let converged = started.elapsed();
    println!(
        "every node applied {want} identities {:.1} s after the configurations changed",
        converged.as_secs_f64()
    );
    let plane_rss = sys::memory_kib(plane.pid());
    let agent_rss: Vec<Option<(u64, u64)>> = nodes
        .iter()
        .map(|n| sys::memory_kib(n.ward.pid()))
        .collect();

    heading(&format!("full resync of {} rules", args.resync_rules));
    let mark = plane.log_len();
    let marks: Vec<u64> = nodes.iter().map(|n| n.ward.log_len()).collect();
    change += 1;
    write_rules(&plane.policy_dir(), args.resync_rules, change)?;
    let version = plane.settled_version(mark)?;
    for (node, mark) in nodes.iter().zip(&marks) {
        node.wait_applied(*mark, &version, WAIT)?;
    }
    let mut resyncs = Vec::new();
    for name in &resync_names {
        let node = Node::start(&ward_bin, &work, &cgroups, &plane, name)?;
        let (applied, apply_ms) = node.wait_applied(0, &version, WAIT)?;
        let log = node.ward.log_since(0);
        let connected = log
            .lines()
            .find(|l| l.contains("connected to the control plane"))
            .and_then(timestamp)
            .context("no `connected to the control plane` line")?;
        let applied_at = timestamp(&applied).context("an applied line without a timestamp")?;
        let took = applied_at.duration_since(connected).unwrap_or_default();
        let rss = sys::memory_kib(node.ward.pid());
        println!(
            "{name}: connected → applied {:.0} ms (kernel write {:.0} ms)",
            ms(took),
            apply_ms.unwrap_or(f64::NAN)
        );
        resyncs.push((took, apply_ms, rss));
    }
    drop(nodes);
    plane.stop()?;
    drop(cgroups);

    heading("results");
    print!(
        "{}",
        report(args, &rows, &resyncs, plane_rss, &agent_rss, converged)
    );
    println!("\nlogs, policies and state: {}", work.display());
    Ok(())
}

struct Row {
    rules: usize,
    /// Per change: until the last node had it.
    everywhere: Vec<Duration>,
    per_node: Vec<Duration>,
    /// Until the control plane logged the new version (its 50 ms debounce included).
    at_plane: Vec<Duration>,
    /// The agents' kernel map writes (`policy applied duration_ms`).
    apply_ms: Vec<f64>,
}

type Rss = Option<(u64, u64)>;

fn report(
    args: &ControlArgs,
    rows: &[Row],
    resyncs: &[(Duration, Option<f64>, Rss)],
    plane_rss: Rss,
    agent_rss: &[Rss],
    converged: Duration,
) -> String {
    let mut out = format!(
        "propagation: policy file renamed into the control plane's directory → `control plane \
         state applied` (logged after the kernel map write) on each of {} nodes; {} single-rule \
         changes per size\n",
        args.nodes, args.changes
    );
    let _ = writeln!(
        out,
        "{:>7}  {:>14} {:>14} {:>14} {:>14} {:>16} {:>16}",
        "rules",
        "all nodes p50",
        "all nodes p99",
        "one node p50",
        "one node p99",
        "ctl plane p50",
        "kernel write p50"
    );
    for row in rows {
        let mut apply = millis(&row.apply_ms);
        apply.sort();
        let _ = writeln!(
            out,
            "{:>7}  {:>11.1} ms {:>11.1} ms {:>11.1} ms {:>11.1} ms {:>13.1} ms {:>13.1} ms",
            row.rules,
            ms(percentile(&row.everywhere, 50)),
            ms(percentile(&row.everywhere, 99)),
            ms(percentile(&row.per_node, 50)),
            ms(percentile(&row.per_node, 99)),
            ms(percentile(&row.at_plane, 50)),
            ms(percentile(&apply, 50)),
        );
    }
    let _ = writeln!(
        out,
        "target: p99 under 100 ms for a single change. ctl plane: file renamed → ward-control \
         logged the new version (its 50 ms debounce included); kernel write: the agent's \
         `policy applied duration_ms` (the changed entries into the standby generation, its 20 ms \
         settle, the same changes into the previous one)"
    );
    let times: Vec<Duration> = resyncs.iter().map(|r| r.0).collect();
    let _ = writeln!(
        out,
        "\nfull resync of {} rules (plus {} identities) to a new agent, `connected to the control \
         plane` → `control plane state applied`, {} agents: p50 {:.0} ms, max {:.0} ms; kernel \
         write p50 {:.0} ms",
        args.resync_rules,
        args.identities + 1,
        resyncs.len(),
        ms(percentile(&times, 50)),
        ms(percentile(&times, 100)),
        median_f64(resyncs.iter().filter_map(|r| r.1).collect()),
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    let _ = writeln!(
        out,
        "\nmemory at {} identities (and {} rules), {:.1} s to converge:",
        args.identities + 1,
        args.sizes.last().copied().unwrap_or(0),
        converged.as_secs_f64()
    );
    match plane_rss {
        Some((rss, hwm)) => {
            let _ = writeln!(
                out,
                "  ward-control   RSS {:>7.1} MiB (peak {:.1} MiB)",
                mib(rss),
                mib(hwm)
            );
        }
        None => {
            let _ = writeln!(out, "  ward-control   had exited");
        }
    }
    for (i, rss) in agent_rss.iter().enumerate() {
        if let Some((rss, hwm)) = rss {
            let _ = writeln!(
                out,
                "  ward node-{i:<4} RSS {:>7.1} MiB (peak {:.1} MiB)",
                mib(*rss),
                mib(*hwm)
            );
        }
    }
    for (i, (_, _, rss)) in resyncs.iter().enumerate() {
        if let Some((rss, hwm)) = rss {
            let _ = writeln!(
                out,
                "  ward resync-{i:<2} RSS {:>7.1} MiB (peak {:.1} MiB) with {} rules",
                mib(*rss),
                mib(*hwm),
                args.resync_rules
            );
        }
    }
    out
}

/// The running `ward-control`, stopped on drop.
struct Plane {
    process: Option<Process>,
    bin: PathBuf,
    dir: PathBuf,
    address: String,
}

impl Plane {
    fn start(bin: &Path, work: &Path) -> Result<Self> {
        let dir = work.join("plane");
        fs::create_dir_all(dir.join("policy"))?;
        fs::write(dir.join("tokens"), "")?;
        let mut cmd = Command::new(bin);
        cmd.arg("--policy-dir")
            .arg(dir.join("policy"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--token-file")
            .arg(dir.join("tokens"))
            .args(["--listen", "127.0.0.1:0", "--trust-domain", TRUST_DOMAIN]);
        println!(
            "$ {} >{} 2>&1",
            sys::show(&cmd),
            dir.join("control.log").display()
        );
        let process = Process::spawn(
            "ward-control",
            cmd,
            Capture::log_file(dir.join("control.log")),
        )?;
        let (_, line) = process.wait_for_line(
            0,
            Duration::from_secs(30),
            "saying `listening on <address>`",
            |line| line.starts_with("listening on "),
        )?;
        let address = line.trim_start_matches("listening on ").trim();
        Ok(Plane {
            address: address.to_owned(),
            process: Some(process),
            bin: bin.to_owned(),
            dir,
        })
    }

    fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Process::pid)
    }

    fn policy_dir(&self) -> PathBuf {
        self.dir.join("policy")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("control.log")).unwrap_or_default()
    }

    fn log_len(&self) -> u64 {
        ward_host::process::file_len(&self.dir.join("control.log"))
    }

    /// The policy versions served after log offset `mark`, with when.
    fn versions_since(&self, mark: u64) -> Vec<(String, Option<SystemTime>)> {
        let log = self.log();
        log.get(mark as usize..)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("policy set updated"))
            .filter_map(|l| Some((field(l, "version")?.to_owned(), timestamp(l))))
            .collect()
    }

    /// The first policy version served after log offset `mark`, with when.
    fn next_version(&self, mark: u64) -> Result<(String, Option<SystemTime>)> {
        let start = Instant::now();
        loop {
            if let Some(v) = self.versions_since(mark).into_iter().next() {
                return Ok(v);
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "ward-control served no new policy; its log:\n{}",
                    ward::tail(&self.log(), 30)
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The last policy version served after `mark`, once no other followed for a second (after
    /// writing many files, which the control plane may read in several goes).
    fn settled_version(&self, mark: u64) -> Result<String> {
        self.next_version(mark)?;
        let mut seen = self.versions_since(mark).len();
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_secs(1) {
            thread::sleep(Duration::from_millis(50));
            let now = self.versions_since(mark).len();
            if now != seen {
                seen = now;
                quiet_since = Instant::now();
            }
        }
        let (version, _) = self
            .versions_since(mark)
            .pop()
            .expect("one version at least");
        Ok(version)
    }

    fn new_token(&self, node: &str) -> Result<String> {
        let out = sys::output(
            Command::new(&self.bin)
                .args(["new-token", "--node", node, "--token-file"])
                .arg(self.dir.join("tokens")),
        )?;
        Ok(out.trim().to_owned())
    }

    fn stop(&mut self) -> Result<()> {
        if let Some(mut process) = self.process.take() {
            process.stop(libc::SIGTERM, Duration::from_secs(10))?;
        }
        Ok(())
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("warning: stopping ward-control: {e:#}");
        }
    }
}

/// One agent in control-plane mode.
struct Node {
    ward: Ward,
    config: PathBuf,
    base_config: String,
}

impl Node {
    fn start(
        bin: &Path,
        work: &Path,
        cgroups: &CgroupTree,
        plane: &Plane,
        name: &str,
    ) -> Result<Self> {
        let dir = work.join(name);
        fs::create_dir_all(&dir)?;
        let token = dir.join("token");
        fs::write(&token, plane.new_token(name)?)?;
        let base_config = format!(
            "trustDomain: {TRUST_DOMAIN}\n\
             cgroupRoot: {root}\n\
             pinDir: /sys/fs/bpf/ward-bench-{name}\n\
             hostAddresses: [127.0.0.1]\n\
             controlPlane:\n  address: \"{address}\"\n  nodeName: {name}\n  \
             joinTokenFile: {token}\n  caFile: {ca}\n  stateDir: {state}\n\
             workloads:\n  - name: client\n    labels: {{app: client}}\n    cgroups: [client]\n",
            root = cgroups.path(name).display(),
            address = plane.address,
            token = token.display(),
            ca = plane.dir.join("state/ca.pem").display(),
            state = dir.join("state").display(),
        );
        let config = dir.join("ward.yaml");
        fs::write(&config, &base_config)?;
        let mut ward = Ward::start(bin, &config, &dir.join("ward.log"))?;
        ward.wait_ready(WAIT)?;
        Ok(Node {
            ward,
            config,
            base_config,
        })
    }

    /// Waits for the `control plane state applied` line with `version`; returns it with the
    /// kernel write time of the `policy applied` line just before it.
    fn wait_applied(
        &self,
        mark: u64,
        version: &str,
        timeout: Duration,
    ) -> Result<(String, Option<f64>)> {
        let start = Instant::now();
        loop {
            let log = self.ward.log_since(mark);
            let lines: Vec<&str> = log.lines().collect();
            if let Some(i) = lines
                .iter()
                .position(|l| l.contains("control plane state applied") && l.contains(version))
            {
                let apply_ms = lines[..i]
                    .iter()
                    .rev()
                    .find(|l| l.contains("policy applied"))
                    .and_then(|l| field(l, "duration_ms")?.parse().ok());
                return Ok((lines[i].to_owned(), apply_ms));
            }
            if start.elapsed() > timeout {
                bail!(
                    "the agent did not apply policy version {version} within {timeout:?}; its log:\n{}",
                    ward::tail(&self.ward.log_since(0), 30)
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn wait_identities(&self, mark: u64, want: usize, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let reached = self.ward.log_since(mark).lines().any(|l| {
                l.contains("control plane state applied")
                    && field(l, "identities").and_then(|n| n.parse::<usize>().ok()) >= Some(want)
            });
            if reached {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "the agent did not apply {want} identities within {timeout:?}; its log:\n{}",
                    ward::tail(&self.ward.log_since(0), 30)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Adds `count` workloads with an address each to the configuration and reloads (SIGHUP).
    fn set_filler_workloads(&self, node: usize, count: usize) -> Result<()> {
        let mut config = self.base_config.clone();
        for i in 0..count {
            let _ = writeln!(
                config,
                "  - {{name: filler-{node}-{i}, labels: {{app: filler}}, addresses: [10.{}.{}.{}]}}",
                100 + node,
                i / 256,
                i % 256
            );
        }
        let staging = self.config.with_extension("tmp~");
        fs::write(&staging, config)?;
        fs::rename(&staging, &self.config)?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child.
        unsafe { libc::kill(self.ward.pid() as i32, libc::SIGHUP) };
        Ok(())
    }
}

/// Writes `rules` rules of the `app: client` egress policy, in files of [`RULES_PER_FILE`]
/// rules, and removes files beyond them; rule 0 has port `CHANGED_PORT + change`.
fn write_rules(dir: &Path, rules: usize, change: usize) -> Result<()> {
    let files = rules.div_ceil(RULES_PER_FILE).max(1);
    // File 0 (which the timed changes rewrite) last.
    for file in (0..files).rev() {
        write_policy_file(dir, file, rules, change)?;
    }
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let index = path
            .file_stem()
            .and_then(|s| s.to_str()?.strip_prefix("bench-")?.parse::<usize>().ok());
        if index.is_some_and(|i| i >= files) {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

fn write_file_of_rule_zero(dir: &Path, rules: usize, change: usize) -> Result<()> {
    write_policy_file(dir, 0, rules, change)
}

/// Policy file `file` of a set of `rules` rules: rules `file * RULES_PER_FILE ..`, each one
/// (protocol, port) for any remote, so each is one kernel map entry.
fn write_policy_file(dir: &Path, file: usize, rules: usize, change: usize) -> Result<()> {
    let mut yaml = format!(
        "apiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: bench-{file}\nspec:\n  \
         selector:\n    labels: {{app: client}}\n  egress:\n"
    );
    let first = file * RULES_PER_FILE;
    for rule in first..rules.min(first + RULES_PER_FILE) {
        let (protocol, port) = match rule {
            0 => ("TCP", CHANGED_PORT + change),
            r if r < 65_535 => ("TCP", r),
            r => ("UDP", r - 65_534),
        };
        let _ = writeln!(
            yaml,
            "    - name: r{rule}\n      ports: [{{port: {port}, protocol: {protocol}}}]"
        );
    }
    let path = dir.join(format!("bench-{file:03}.yaml"));
    let staging = dir.join(format!(".bench-{file:03}.tmp"));
    fs::write(&staging, yaml)?;
    fs::rename(&staging, &path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_split_into_files_below_the_control_planes_limit() {
        let dir = std::env::temp_dir().join(format!("ward-bench-rules-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        write_rules(&dir, 100_000, 3).expect("written");
        let files: Vec<_> = fs::read_dir(&dir).expect("dir").flatten().collect();
        assert_eq!(files.len(), 50);
        let rules: usize = files
            .iter()
            .map(|f| {
                fs::read_to_string(f.path())
                    .expect("file")
                    .matches("- name: r")
                    .count()
            })
            .sum();
        assert_eq!(rules, 100_000);
        assert!(files
            .iter()
            .all(|f| f.metadata().expect("metadata").len() < 4 << 20));
        let first = fs::read_to_string(dir.join("bench-000.yaml")).expect("file 0");
        assert!(first.contains("port: 60003, protocol: TCP"), "{first:.300}");
        write_rules(&dir, 10, 0).expect("written");
        assert_eq!(fs::read_dir(&dir).expect("dir").count(), 1);
        let _ = fs::remove_dir_all(&dir);
    }
}
