//! `cargo xtask bench control`: how fast the control plane's policy reaches the kernel of every
//! node, how long a new agent takes to receive a large policy whole, what the control plane
//! and the agents hold in memory with many identities, and how long an agent takes to resume on
//! another replica when its replica dies, for each store of the control plane in one run.
//!
//! Stores: `dir`, one real `ward-control` on loopback with its state directory (the baseline);
//! `etcd`, one etcd member and two `ward-control` replicas sharing it, watching the same policy
//! directory. Several real agents ("nodes", each with its own cgroup subtree, pin directory and
//! state directory) on this machine; with two replicas, node i lists replica i % 2 first. No
//! traffic is sent.
//!
//! "Applied in the kernel" is the agent's `control plane state applied` log line, which it
//! writes after its kernel map write returned; the line carries the versions it applied, so
//! each change is matched to its own line: the version that the node's replica (the one it last
//! logged `connected to the control plane` to) logged for the change, since every replica has
//! its own version epoch. Latency is that line's timestamp minus the moment just before the
//! policy file was renamed into the control plane's directory (one clock).

use std::{
    fmt::{self, Write as _},
    fs,
    io::Write as _,
    net::{TcpListener, TcpStream},
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
/// How long a node whose replica was killed gets to connect to another one and get its state.
const RESUME_WAIT: Duration = Duration::from_secs(60);
/// `ward-control` replicas sharing the etcd store.
const ETCD_REPLICAS: usize = 2;
/// The files `ward-control init-ca` writes, which every replica on etcd needs.
const CA_FILES: [&str; 3] = ["ca.pem", "ca-key.pem", "trust-domain"];

/// Where a control plane keeps identity numbers, nodes, join tokens and revocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Store {
    /// One `ward-control` and its state directory.
    Dir,
    /// Two `ward-control` replicas sharing one etcd member.
    Etcd,
}

impl fmt::Display for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Store::Dir => "dir",
            Store::Etcd => "etcd",
        })
    }
}

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
    /// Rules a new agent receives whole in the resync measurement (with the first store only).
    #[arg(long, default_value = "100000")]
    resync_rules: usize,
    /// New agents timed in the resync measurement (0: no resync measurement).
    #[arg(long, default_value = "3")]
    resyncs: usize,
    /// Stores measured in turn, comma separated: dir (one ward-control and its state directory,
    /// the baseline) and etcd (one etcd member and two replicas; also times agents resuming on
    /// the other replica once one is killed).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "dir,etcd")]
    stores: Vec<Store>,
    /// Where to keep configurations, policies, state and logs.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// What the measurements of every store share.
struct Bench {
    ward_bin: PathBuf,
    control_bin: PathBuf,
    work: PathBuf,
    cgroups: CgroupTree,
    node_names: Vec<String>,
    resync_names: Vec<String>,
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
    let mut stores = args.stores.clone();
    stores.dedup();
    if stores.is_empty() || stores.len() != args.stores.len() {
        bail!("--stores: dir, etcd or both, each once");
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

    heading("cgroups");
    let mount = sys::cgroup2_mount()?;
    let node_names: Vec<String> = (0..args.nodes).map(|i| format!("node-{i}")).collect();
    let resync_names: Vec<String> = (0..args.resyncs).map(|i| format!("resync-{i}")).collect();
    let children: Vec<String> = node_names
        .iter()
        .chain(&resync_names)
        .map(|n| format!("{n}/client"))
        .collect();
    let child_refs: Vec<&str> = children.iter().map(String::as_str).collect();
    let bench = Bench {
        cgroups: CgroupTree::create(&mount, "ward-bench-control", &child_refs)?,
        ward_bin,
        control_bin,
        work,
        node_names,
        resync_names,
    };
    let mut runs = Vec::new();
    for (i, &store) in args.stores.iter().enumerate() {
        runs.push(measure_store(args, &bench, store, i == 0)?);
    }
    let Bench { work, cgroups, .. } = bench;
    drop(cgroups);

    heading("results");
    print!("{}", report(args, &runs));
    println!("\nlogs, policies and state: {}", work.display());
    Ok(())
}

/// Everything measured with one store.
struct StoreRun {
    store: Store,
    rows: Vec<Row>,
    /// From the configurations' change until every node applied every identity.
    converged: Duration,
    /// Per replica, at that moment.
    plane_rss: Vec<(String, Rss)>,
    agent_rss: Vec<Rss>,
    /// Empty unless this store measured the resync.
    resyncs: Vec<Resync>,
    /// With more than one replica: the nodes of the replica that was killed.
    resumed: Option<Vec<Resumed>>,
}

/// Propagation, identities, the resync (if `resync`) and, with replicas, the resume after one
/// of them is killed, with the control plane of `store` and a fresh set of nodes.
fn measure_store(
    args: &ControlArgs,
    bench: &Bench,
    store: Store,
    resync: bool,
) -> Result<StoreRun> {
    let work = bench.work.join(store.to_string());
    heading(&format!("{store} store: control plane and nodes"));
    let mut planes = Planes::start(store, &bench.control_bin, &work)?;
    // Every write changes rule 0's port, so every write is a new policy version.
    let mut change = 0;
    let first_size = args.sizes.first().copied().unwrap_or(10);
    let first = write_settled(&planes, &[], first_size, change)?;
    let mut nodes = Vec::new();
    for (i, name) in bench.node_names.iter().enumerate() {
        nodes.push(Node::start(bench, &work, &planes, i, name)?);
    }
    for node in &nodes {
        node.wait_applied(0, &first, WAIT)?;
    }

    let mut rows = Vec::new();
    for &size in &args.sizes {
        heading(&format!("{store} store: propagation, {size} rules"));
        change += 1;
        write_settled(&planes, &nodes, size, change)?;
        let row = propagation(args, &planes, &nodes, size, &mut change)?;
        println!(
            "{} changes: on every node p50 {:.1} ms, p99 {:.1} ms",
            args.changes,
            ms(percentile(&row.everywhere, 50)),
            ms(percentile(&row.everywhere, 99))
        );
        rows.push(row);
    }

    heading(&format!("{store} store: {} identities", args.identities));
    let converged = set_identities(args, &nodes)?;
    let plane_rss = planes.rss();
    let agent_rss: Vec<Rss> = nodes
        .iter()
        .map(|n| sys::memory_kib(n.ward.pid()))
        .collect();

    let resyncs = if resync && !bench.resync_names.is_empty() {
        heading(&format!(
            "{store} store: full resync of {} rules",
            args.resync_rules
        ));
        change += 1;
        let version = write_settled(&planes, &nodes, args.resync_rules, change)?;
        measure_resyncs(bench, &work, &planes, &version)?
    } else {
        Vec::new()
    };
    let resumed = if planes.replicas.len() > 1 {
        heading(&format!("{store} store: resume after replica 0 is killed"));
        Some(measure_resume(&mut planes, &nodes)?)
    } else {
        None
    };
    drop(nodes);
    planes.stop()?;
    Ok(StoreRun {
        store,
        rows,
        converged,
        plane_rss,
        agent_rss,
        resyncs,
        resumed,
    })
}

/// Writes `rules` rules and waits until every one of `nodes` applied the version its replica
/// settled on; returns the versions, one per replica.
fn write_settled(
    planes: &Planes,
    nodes: &[Node],
    rules: usize,
    change: usize,
) -> Result<Vec<String>> {
    let plane_marks = planes.log_lens();
    let marks = log_lens(nodes);
    write_rules(&planes.policy_dir, rules, change)?;
    let versions = planes.settled_versions(&plane_marks)?;
    for (node, mark) in nodes.iter().zip(&marks) {
        node.wait_applied(*mark, &versions, WAIT)?;
    }
    Ok(versions)
}

/// `args.changes` timed single-rule changes to a set of `size` rules.
fn propagation(
    args: &ControlArgs,
    planes: &Planes,
    nodes: &[Node],
    size: usize,
    change: &mut usize,
) -> Result<Row> {
    let mut row = Row {
        store: planes.store,
        rules: size,
        everywhere: Vec::new(),
        per_node: Vec::new(),
        at_plane: Vec::new(),
        apply_ms: Vec::new(),
    };
    for _ in 0..args.changes {
        let marks = log_lens(nodes);
        let plane_marks = planes.log_lens();
        *change += 1;
        let written = SystemTime::now();
        write_file_of_rule_zero(&planes.policy_dir, size, *change)?;
        let served = planes.next_versions(&plane_marks)?;
        row.at_plane.extend(
            served.iter().filter_map(|(_, at)| {
                Some(at.as_ref()?.duration_since(written).unwrap_or_default())
            }),
        );
        let versions: Vec<String> = served.into_iter().map(|(v, _)| v).collect();
        let mut slowest = Duration::ZERO;
        for (node, mark) in nodes.iter().zip(&marks) {
            let (line, apply_ms) = node.wait_applied(*mark, &versions, WAIT)?;
            let at = timestamp(&line).context("an applied line without a timestamp")?;
            let took = at.duration_since(written).unwrap_or_default();
            slowest = slowest.max(took);
            row.per_node.push(took);
            row.apply_ms.extend(apply_ms);
        }
        row.everywhere.push(slowest);
    }
    Ok(row)
}

/// Gives the nodes `args.identities` workloads in all; the time until every node applied them.
fn set_identities(args: &ControlArgs, nodes: &[Node]) -> Result<Duration> {
    let per_node = args.identities.div_ceil(nodes.len());
    let started = Instant::now();
    let marks = log_lens(nodes);
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
    Ok(converged)
}

/// A new agent that received the whole policy.
struct Resync {
    /// `connected to the control plane` → `control plane state applied`.
    took: Duration,
    apply_ms: Option<f64>,
    rss: Rss,
}

/// Starts the resync agents one after the other; each must apply `versions` (of its replica).
fn measure_resyncs(
    bench: &Bench,
    work: &Path,
    planes: &Planes,
    versions: &[String],
) -> Result<Vec<Resync>> {
    let mut resyncs = Vec::new();
    for (i, name) in bench.resync_names.iter().enumerate() {
        let node = Node::start(bench, work, planes, i, name)?;
        let (applied, apply_ms) = node.wait_applied(0, versions, WAIT)?;
        let connected = node
            .ward
            .log_since(0)
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
        resyncs.push(Resync {
            took,
            apply_ms,
            rss,
        });
    }
    Ok(resyncs)
}

/// A node whose replica was killed; `None` where it did not get there within [`RESUME_WAIT`].
struct Resumed {
    /// Kill → `connected to the control plane` (to another replica).
    connected: Option<Duration>,
    /// Kill → `control plane update applied` after it (the state from the new replica merged,
    /// written to the kernel if it differed, saved).
    applied: Option<Duration>,
    /// Whether a `control plane state applied` line (a kernel write) came in between.
    kernel_write: bool,
}

/// SIGKILLs replica 0 and times every node that was connected to it until it is connected to
/// another replica and has its state.
fn measure_resume(planes: &mut Planes, nodes: &[Node]) -> Result<Vec<Resumed>> {
    let on_first: Vec<(&Node, u64)> = nodes
        .iter()
        .filter(|n| n.replica() == Some(0))
        .map(|n| (n, n.ward.log_len()))
        .collect();
    if on_first.is_empty() {
        bail!("no node is connected to replica 0");
    }
    let killed = planes.kill(0)?;
    let since_kill = |line: &str| {
        let at = timestamp(line).context("a log line without a timestamp")?;
        Ok::<_, anyhow::Error>(at.duration_since(killed).unwrap_or_default())
    };
    let mut resumed = Vec::new();
    for (node, mark) in on_first {
        let mut result = Resumed {
            connected: None,
            applied: None,
            kernel_write: false,
        };
        let outcome = (|| {
            let connected =
                node.wait_line(mark, None, "connected to the control plane", RESUME_WAIT)?;
            result.connected = Some(since_kill(&connected)?);
            let applied = node.wait_line(
                mark,
                Some(&connected),
                "control plane update applied",
                RESUME_WAIT,
            )?;
            result.applied = Some(since_kill(&applied)?);
            result.kernel_write = node
                .ward
                .log_since(mark)
                .lines()
                .skip_while(|l| *l != connected)
                .take_while(|l| *l != applied)
                .any(|l| l.contains("control plane state applied"));
            println!(
                "{}: kill → connected to {} in {:.0} ms, state merged in {:.0} ms (kernel write: {})",
                node.name,
                field(&connected, "address").unwrap_or("?"),
                ms(result.connected.unwrap_or_default()),
                ms(result.applied.unwrap_or_default()),
                if result.kernel_write { "yes" } else { "no" }
            );
            Ok::<_, anyhow::Error>(())
        })();
        if let Err(e) = outcome {
            println!("warning: {}: {e:#}", node.name);
        }
        resumed.push(result);
    }
    Ok(resumed)
}

struct Row {
    store: Store,
    rules: usize,
    /// Per change: until the last node had it.
    everywhere: Vec<Duration>,
    per_node: Vec<Duration>,
    /// Until the control plane logged the new version (its 50 ms debounce included), per
    /// replica.
    at_plane: Vec<Duration>,
    /// The agents' kernel map writes (`policy applied duration_ms`).
    apply_ms: Vec<f64>,
}

type Rss = Option<(u64, u64)>;

fn report(args: &ControlArgs, runs: &[StoreRun]) -> String {
    let mut out = format!(
        "propagation: policy file renamed into the control plane's directory → `control plane \
         state applied` (logged after the kernel map write) with the version of the node's own \
         replica, on each of {} nodes; {} single-rule changes per size. Stores: dir = one \
         ward-control and its state directory (the baseline); etcd = {ETCD_REPLICAS} replicas on \
         one etcd member watching the same policy directory, node i connected to replica \
         i % {ETCD_REPLICAS}\n",
        args.nodes, args.changes
    );
    let _ = writeln!(
        out,
        "{:>5} {:>7}  {:>14} {:>14} {:>14} {:>14} {:>16} {:>16}",
        "store",
        "rules",
        "all nodes p50",
        "all nodes p99",
        "one node p50",
        "one node p99",
        "ctl plane p50",
        "kernel write p50"
    );
    for &size in &args.sizes {
        for row in runs
            .iter()
            .flat_map(|r| &r.rows)
            .filter(|r| r.rules == size)
        {
            let mut apply = millis(&row.apply_ms);
            apply.sort();
            let _ = writeln!(
                out,
                "{:>5} {:>7}  {:>11.1} ms {:>11.1} ms {:>11.1} ms {:>11.1} ms {:>13.1} ms {:>13.1} ms",
                row.store.to_string(),
                row.rules,
                ms(percentile(&row.everywhere, 50)),
                ms(percentile(&row.everywhere, 99)),
                ms(percentile(&row.per_node, 50)),
                ms(percentile(&row.per_node, 99)),
                ms(percentile(&row.at_plane, 50)),
                ms(percentile(&apply, 50)),
            );
        }
    }
    let _ = writeln!(
        out,
        "target: p99 under 100 ms for a single change. ctl plane: file renamed → ward-control \
         logged the new version (its 50 ms debounce included; each replica counted); kernel \
         write: the agent's `policy applied duration_ms` (the changed entries into the standby \
         generation, its 20 ms settle, the same changes into the previous one)"
    );
    if args.resyncs == 0 {
        let _ = writeln!(out, "\nfull resync: not measured (--resyncs 0)");
    }
    for run in runs.iter().filter(|r| !r.resyncs.is_empty()) {
        let times: Vec<Duration> = run.resyncs.iter().map(|r| r.took).collect();
        let _ = writeln!(
            out,
            "\nfull resync of {} rules (plus {} identities) to a new agent, `connected to the \
             control plane` → `control plane state applied`, {} agents, measured once, with the \
             {} store (the first of --stores): p50 {:.0} ms, max {:.0} ms; kernel write p50 \
             {:.0} ms",
            args.resync_rules,
            args.identities + 1,
            run.resyncs.len(),
            run.store,
            ms(percentile(&times, 50)),
            ms(percentile(&times, 100)),
            median_f64(run.resyncs.iter().filter_map(|r| r.apply_ms).collect()),
        );
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let memory = |out: &mut String, label: &str, rss: &Rss, suffix: &str| {
        let _ = match rss {
            Some((rss, hwm)) => writeln!(
                out,
                "  {label:<26} RSS {:>7.1} MiB (peak {:.1} MiB){suffix}",
                mib(*rss),
                mib(*hwm)
            ),
            None => writeln!(out, "  {label:<26} had exited"),
        };
    };
    for run in runs {
        let _ = writeln!(
            out,
            "\nmemory at {} identities (and {} rules), {} store, {:.1} s to converge:",
            args.identities + 1,
            args.sizes.last().copied().unwrap_or(0),
            run.store,
            run.converged.as_secs_f64()
        );
        for (name, rss) in &run.plane_rss {
            memory(&mut out, name, rss, "");
        }
        for (i, rss) in run.agent_rss.iter().enumerate() {
            memory(&mut out, &format!("ward node-{i}"), rss, "");
        }
        let with = format!(" with {} rules", args.resync_rules);
        for (i, resync) in run.resyncs.iter().enumerate() {
            memory(&mut out, &format!("ward resync-{i}"), &resync.rss, &with);
        }
    }
    for run in runs {
        let Some(resumed) = &run.resumed else {
            continue;
        };
        let connected: Vec<Duration> = resumed.iter().filter_map(|r| r.connected).collect();
        let applied: Vec<Duration> = resumed.iter().filter_map(|r| r.applied).collect();
        let _ = writeln!(
            out,
            "\nresume, {} store: replica 0 SIGKILLed; of its {} nodes, {} logged `connected to the \
             control plane` (to the other replica) within {} s of the kill: p50 {:.0} ms, max \
             {:.0} ms; {} then logged `control plane update applied` (the other replica's state \
             merged): p50 {:.0} ms, max {:.0} ms after the kill; {} of them wrote the kernel \
             (`control plane state applied`)",
            run.store,
            resumed.len(),
            connected.len(),
            RESUME_WAIT.as_secs(),
            ms(percentile(&connected, 50)),
            ms(percentile(&connected, 100)),
            applied.len(),
            ms(percentile(&applied, 50)),
            ms(percentile(&applied, 100)),
            resumed.iter().filter(|r| r.kernel_write).count(),
        );
    }
    out
}

/// The control plane of one store, stopped on drop: one `ward-control` (dir), or an etcd member
/// and [`ETCD_REPLICAS`] replicas on it (etcd), every replica watching `policy_dir`.
struct Planes {
    store: Store,
    /// Declared before `etcd`, so dropped (stopped) before it.
    replicas: Vec<Plane>,
    etcd: Option<Etcd>,
    bin: PathBuf,
    policy_dir: PathBuf,
}

impl Planes {
    fn start(store: Store, bin: &Path, work: &Path) -> Result<Self> {
        let policy_dir = work.join("policy");
        fs::create_dir_all(&policy_dir)
            .with_context(|| format!("creating {}", policy_dir.display()))?;
        let mut planes = Planes {
            store,
            replicas: Vec::new(),
            etcd: None,
            bin: bin.to_owned(),
            policy_dir,
        };
        match store {
            Store::Dir => {
                let plane = Plane::start(
                    bin,
                    "ward-control",
                    &work.join("plane"),
                    &planes.policy_dir,
                    &[],
                )?;
                planes.replicas.push(plane);
            }
            Store::Etcd => {
                let etcd = Etcd::start(&work.join("etcd"))?;
                let endpoint = etcd.endpoint.clone();
                planes.etcd = Some(etcd);
                // One CA, created once and copied to every replica.
                let ca = work.join("ca");
                sys::run(
                    Command::new(bin)
                        .arg("init-ca")
                        .arg("--state-dir")
                        .arg(&ca)
                        .args(["--trust-domain", TRUST_DOMAIN]),
                )?;
                for i in 0..ETCD_REPLICAS {
                    let dir = work.join(format!("replica-{i}"));
                    let state = dir.join("state");
                    fs::create_dir_all(&state)
                        .with_context(|| format!("creating {}", state.display()))?;
                    for file in CA_FILES {
                        fs::copy(ca.join(file), state.join(file))
                            .with_context(|| format!("copying {file} to {}", state.display()))?;
                    }
                    let plane = Plane::start(
                        bin,
                        &format!("ward-control replica-{i}"),
                        &dir,
                        &planes.policy_dir,
                        &["--etcd-endpoints", &endpoint],
                    )?;
                    planes.replicas.push(plane);
                }
            }
        }
        Ok(planes)
    }

    /// The replicas' addresses for node `index`: replica `index % replicas` first, then the
    /// others in turn.
    fn addresses_for(&self, index: usize) -> String {
        let n = self.replicas.len();
        (0..n)
            .map(|step| self.replicas[(index + step) % n].address.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The CA certificate agents trust (the same in every replica).
    fn ca_file(&self) -> PathBuf {
        self.replicas[0].dir.join("state/ca.pem")
    }

    fn log_lens(&self) -> Vec<u64> {
        self.replicas.iter().map(Plane::log_len).collect()
    }

    /// Per replica, the first policy version it served after its mark, with when.
    fn next_versions(&self, marks: &[u64]) -> Result<Vec<(String, Option<SystemTime>)>> {
        self.replicas
            .iter()
            .zip(marks)
            .map(|(plane, mark)| plane.next_version(*mark))
            .collect()
    }

    /// Per replica, the version it settled on after its mark.
    fn settled_versions(&self, marks: &[u64]) -> Result<Vec<String>> {
        self.replicas
            .iter()
            .zip(marks)
            .map(|(plane, mark)| plane.settled_version(*mark))
            .collect()
    }

    fn rss(&self) -> Vec<(String, Rss)> {
        self.replicas
            .iter()
            .map(|p| (p.name.clone(), sys::memory_kib(p.pid())))
            .collect()
    }

    /// A join token for `node`, in every replica's token file: the agent joins through
    /// whichever replica answers first.
    fn new_token(&self, node: &str) -> Result<String> {
        let out = sys::output(
            Command::new(&self.bin)
                .args(["new-token", "--node", node, "--token-file"])
                .arg(self.replicas[0].tokens()),
        )?;
        let token = out.trim().to_owned();
        for plane in &self.replicas[1..] {
            let file = plane.tokens();
            fs::OpenOptions::new()
                .append(true)
                .open(&file)
                .and_then(|mut f| writeln!(f, "{token} {node}"))
                .with_context(|| format!("writing {}", file.display()))?;
        }
        Ok(token)
    }

    /// SIGKILLs replica `i`; returns the moment just before.
    fn kill(&mut self, i: usize) -> Result<SystemTime> {
        let plane = &mut self.replicas[i];
        println!("$ kill -KILL {}  # {}", plane.pid(), plane.name);
        let at = SystemTime::now();
        plane.kill()?;
        Ok(at)
    }

    fn stop(&mut self) -> Result<()> {
        for plane in &mut self.replicas {
            plane.stop()?;
        }
        if let Some(etcd) = &mut self.etcd {
            etcd.stop()?;
        }
        Ok(())
    }
}

/// One running `ward-control`, stopped on drop.
struct Plane {
    process: Option<Process>,
    /// `ward-control` or `ward-control replica-<i>`, for messages.
    name: String,
    dir: PathBuf,
    address: String,
}

impl Plane {
    /// Starts `bin` with its state, token file and log in `dir`, and `extra` arguments.
    fn start(
        bin: &Path,
        name: &str,
        dir: &Path,
        policy_dir: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::write(dir.join("tokens"), "")?;
        let mut cmd = Command::new(bin);
        cmd.arg("--policy-dir")
            .arg(policy_dir)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--token-file")
            .arg(dir.join("tokens"))
            .args(["--listen", "127.0.0.1:0", "--trust-domain", TRUST_DOMAIN])
            .args(extra);
        println!(
            "$ {} >{} 2>&1 &",
            sys::show(&cmd),
            dir.join("control.log").display()
        );
        let process = Process::spawn(name, cmd, Capture::log_file(dir.join("control.log")))?;
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
            name: name.to_owned(),
            dir: dir.to_owned(),
        })
    }

    fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Process::pid)
    }

    fn tokens(&self) -> PathBuf {
        self.dir.join("tokens")
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
                    "{} served no new policy; its log:\n{}",
                    self.name,
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

    /// SIGKILL, waiting until it is gone.
    fn kill(&mut self) -> Result<()> {
        if let Some(process) = &mut self.process {
            process.kill();
            process
                .wait_exit(Duration::from_secs(10))
                .with_context(|| format!("waiting for {} to exit", self.name))?;
        }
        Ok(())
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
            eprintln!("warning: stopping {}: {e:#}", self.name);
        }
    }
}

/// One etcd member on loopback (as control/src/test_helpers.rs starts them), its data and log
/// in a directory; stopped on drop.
struct Etcd {
    process: Option<Process>,
    /// `http://127.0.0.1:<port>`, what `--etcd-endpoints` takes.
    endpoint: String,
}

impl Etcd {
    fn start(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let client_port = free_port()?;
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{}", free_port()?);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "bench"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("bench={peer}")]);
        let log = dir.join("etcd.log");
        println!("$ {} >{} 2>&1 &", sys::show(&cmd), log.display());
        let mut process = Process::spawn(
            "etcd (apt-get install etcd-server)",
            cmd,
            Capture::log_file(&log),
        )?;
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", client_port)).is_err() {
            if process.has_exited() || start.elapsed() > Duration::from_secs(20) {
                bail!(
                    "etcd did not listen on port {client_port} within 20 s; its log:\n{}",
                    process.lines().tail(30)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        println!("etcd is listening ({:.1} s)", start.elapsed().as_secs_f64());
        Ok(Etcd {
            process: Some(process),
            endpoint: client,
        })
    }

    fn stop(&mut self) -> Result<()> {
        if let Some(mut process) = self.process.take() {
            process.stop(libc::SIGTERM, Duration::from_secs(10))?;
        }
        Ok(())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("warning: stopping etcd: {e:#}");
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free loopback port")?
        .port())
}

fn log_lens(nodes: &[Node]) -> Vec<u64> {
    nodes.iter().map(|n| n.ward.log_len()).collect()
}

/// One agent in control-plane mode.
struct Node {
    name: String,
    ward: Ward,
    config: PathBuf,
    base_config: String,
    /// The control plane's replicas' addresses, by replica.
    replicas: Vec<String>,
}

impl Node {
    /// Node `index` of `planes`, with its files in `work/<name>`.
    fn start(
        bench: &Bench,
        work: &Path,
        planes: &Planes,
        index: usize,
        name: &str,
    ) -> Result<Self> {
        let dir = work.join(name);
        fs::create_dir_all(&dir)?;
        let token = dir.join("token");
        fs::write(&token, planes.new_token(name)?)?;
        let base_config = format!(
            "trustDomain: {TRUST_DOMAIN}\n\
             cgroupRoot: {root}\n\
             pinDir: /sys/fs/bpf/ward-bench-{store}-{name}\n\
             hostAddresses: [127.0.0.1]\n\
             controlPlane:\n  address: \"{address}\"\n  nodeName: {name}\n  \
             joinTokenFile: {token}\n  caFile: {ca}\n  stateDir: {state}\n\
             workloads:\n  - name: client\n    labels: {{app: client}}\n    cgroups: [client]\n",
            root = bench.cgroups.path(name).display(),
            store = planes.store,
            address = planes.addresses_for(index),
            token = token.display(),
            ca = planes.ca_file().display(),
            state = dir.join("state").display(),
        );
        let config = dir.join("ward.yaml");
        fs::write(&config, &base_config)?;
        let mut ward = Ward::start(&bench.ward_bin, &config, &dir.join("ward.log"))?;
        ward.wait_ready(WAIT)?;
        Ok(Node {
            name: name.to_owned(),
            ward,
            config,
            base_config,
            replicas: planes.replicas.iter().map(|p| p.address.clone()).collect(),
        })
    }

    /// The replica of the last `connected to the control plane` line, if any yet.
    fn replica(&self) -> Option<usize> {
        let log = self.ward.log_since(0);
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("connected to the control plane"))?;
        let address = field(line, "address")?;
        self.replicas.iter().position(|a| a == address)
    }

    /// Waits for the `control plane state applied` line with the version (of `versions`, one
    /// per replica) of the replica it is connected to; returns it with the kernel write time of
    /// the `policy applied` line just before it.
    fn wait_applied(
        &self,
        mark: u64,
        versions: &[String],
        timeout: Duration,
    ) -> Result<(String, Option<f64>)> {
        let start = Instant::now();
        loop {
            let replica = self.replica();
            if let Some(version) = replica.and_then(|r| versions.get(r)) {
                let log = self.ward.log_since(mark);
                let lines: Vec<&str> = log.lines().collect();
                if let Some(i) = lines.iter().position(|l| {
                    l.contains("control plane state applied") && l.contains(version.as_str())
                }) {
                    let apply_ms = lines[..i]
                        .iter()
                        .rev()
                        .find(|l| l.contains("policy applied"))
                        .and_then(|l| field(l, "duration_ms")?.parse().ok());
                    return Ok((lines[i].to_owned(), apply_ms));
                }
            }
            if start.elapsed() > timeout {
                let wanted = match replica {
                    Some(r) => format!("policy version {:?} of replica {r}", versions.get(r)),
                    None => "policy: it never connected to a replica".to_owned(),
                };
                bail!(
                    "{} did not apply {wanted} within {timeout:?}; its log:\n{}",
                    self.name,
                    ward::tail(&self.ward.log_since(0), 30)
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The first line with `needle` after log offset `mark` (and after the line `after`, if
    /// given).
    fn wait_line(
        &self,
        mark: u64,
        after: Option<&str>,
        needle: &str,
        timeout: Duration,
    ) -> Result<String> {
        let start = Instant::now();
        loop {
            let log = self.ward.log_since(mark);
            let mut lines = log.lines();
            if let Some(after) = after {
                lines.find(|l| *l == after);
            }
            if let Some(line) = lines.find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            if start.elapsed() > timeout {
                bail!(
                    "no `{needle}` line within {timeout:?}; its log since:\n{}",
                    ward::tail(&log, 30)
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
                    "{} did not apply {want} identities within {timeout:?}; its log:\n{}",
                    self.name,
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
