//! `cargo xtask bench connect`: connections per second and connect latency over loopback from a
//! client workload to an allowed port of a server workload, over TCP/IPv4, TCP/IPv6 and UDP/IPv4,
//! with no programs attached, with ward enforcing a policy of N entries that isolates the
//! client's egress and the server's ingress, and with nftables holding the same policy,
//! interleaved in one run. Also `bench tunnel` and `bench mtls`, which run bench targets.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    agent_log::logged_entries,
    loopback::{self, nft_cgroup_path, Policy, Transport, DENIED_PORT, NFT_TABLE, SERVER_PORT},
    probe, setup,
    sys::{self, heading, CgroupTree, Children},
    ward::{self, Ward},
};

const CGROUP_ROOT: &str = "ward-bench";
/// A cgroup beside the workloads' that no workload claims.
const OUTSIDER: &str = "outsider";
/// The variant with no programs attached, in which every cgroup must reach the denied port.
const BASELINE: &str = "baseline";
/// ward running with a policy that isolates neither workload.
const UNISOLATED: &str = "unisolated";
/// The variant of [`ConnectArgs::floor`].
const FLOOR: &str = "floor";

/// What the load benchmarks (connect, service, dns) share: rounds, where their files go, and
/// the kernel's BPF statistics.
#[derive(clap::Args)]
pub struct RoundArgs {
    /// Rounds: the variants take turns in each round and the tables show medians, so a
    /// neighbour's burst of CPU use does not decide a comparison.
    #[arg(long, default_value = "3")]
    pub rounds: usize,
    /// Where to keep the generated configuration, policies, rulesets and logs.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Also report the time ward's kernel programs take per connection (or query), from
    /// kernel.bpf_stats_enabled, which itself costs a little per program run: bench connect
    /// turns it on only for an extra measurement of each ward build after the rounds, so its
    /// rates are measured without it; bench service and dns keep it on for the whole run.
    #[arg(long)]
    pub bpf_stats: bool,
}

impl RoundArgs {
    /// `--work-dir`, or `target/<default>`, created.
    pub fn work_dir(&self, default: &str) -> Result<PathBuf> {
        let work = self
            .work_dir
            .clone()
            .unwrap_or_else(|| sys::target_dir().join(default));
        fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        Ok(work)
    }
}

#[derive(clap::Args)]
pub struct ConnectArgs {
    /// Measuring time per variant, transport, size and round.
    #[arg(long, default_value = "5")]
    seconds: f64,
    /// Policy sizes (entries in the compiled policy), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
    sizes: Vec<usize>,
    /// Transports, comma separated: tcp4 (127.0.0.1), tcp6 (::1), udp4 (127.0.0.1; a new socket
    /// per exchange of one datagram and its echo).
    #[arg(long, value_delimiter = ',', default_value = "tcp4,tcp6,udp4")]
    transports: Vec<Transport>,
    #[command(flatten)]
    run: RoundArgs,
    /// Another build of ward (e.g. the previous release) measured in the same rounds as the
    /// variant "ward (other)", so a change is compared before and after in one run.
    #[arg(long)]
    compare_with: Option<PathBuf>,
    /// Also measure ward with a policy that isolates neither workload, as the variant
    /// "ward (open)": its programs attached and run, nothing decided. What ward costs before any
    /// decision, beside what the isolated rows cost (with `--bpf-stats`, its kernel time too;
    /// with `--compare-with`, the other build's as "ward (other, open)").
    #[arg(long)]
    unisolated: bool,
    /// Also measure a build of ward whose kernel programs return at once (the agent's `floor`
    /// feature), as the variant "ward (floor)", with the isolating policy: what attaching the
    /// programs costs before any of their work, the least any build of them can cost.
    #[arg(long)]
    floor: bool,
}

#[derive(clap::Args)]
pub struct TunnelArgs {
    /// Measuring time per timed phase.
    #[arg(long, default_value = "3")]
    seconds: f64,
    /// Concurrent tunneled connections for the RSS and CPU measure.
    #[arg(long, default_value = "1000")]
    connections: usize,
    /// MiB sent for the single-stream throughput.
    #[arg(long, default_value = "512")]
    mib: usize,
}

/// `cargo xtask bench tunnel`: the bench target of ward-tunnel (`tunnel/benches/tunnel.rs`),
/// built optimized, which runs both agents as child processes and prints the table.
pub fn tunnel(args: &TunnelArgs) -> Result<()> {
    if args.seconds <= 0.0 || args.connections == 0 || args.mib == 0 {
        bail!("--seconds, --connections and --mib must be positive");
    }
    sys::run(sys::cargo().args([
        "bench",
        "-p",
        "ward-tunnel",
        "--bench",
        "tunnel",
        "--",
        "--seconds",
        &args.seconds.to_string(),
        "--connections",
        &args.connections.to_string(),
        "--bytes",
        &args.mib.to_string(),
    ]))
}

/// `cargo xtask bench mtls`: the tunnel end to end between two nodes (network namespaces with
/// real agents, the kernel's redirect and a real control plane) against plain TCP between the same
/// namespaces (`tests/benches/mtls.rs`), with release builds of ward and ward-control.
pub fn mtls(args: &TunnelArgs) -> Result<()> {
    sys::require_root(
        "bench mtls",
        "it creates network namespaces and cgroups and loads eBPF programs",
    )?;
    if args.seconds <= 0.0 || args.connections == 0 || args.mib == 0 {
        bail!("--seconds, --connections and --mib must be positive");
    }
    setup::run()?;
    let ward_bin = ward::binary()?;
    let control_bin = ward::control_binary()?;
    sys::run(
        sys::cargo()
            .env("WARD_BIN", &ward_bin)
            .env("WARD_CONTROL_BIN", &control_bin)
            .args(["bench", "-p", "ward-tests", "--bench", "mtls", "--"])
            .args(["--seconds", &args.seconds.to_string()])
            .args(["--connections", &args.connections.to_string()])
            .args(["--mib", &args.mib.to_string()]),
    )
}

pub fn run(args: &ConnectArgs) -> Result<()> {
    sys::require_root(
        "bench connect",
        "it creates cgroups, loads eBPF programs and nftables",
    )?;
    if args.sizes.is_empty()
        || args.transports.is_empty()
        || args.seconds <= 0.0
        || args.run.rounds == 0
    {
        bail!("need at least one size, one transport, one round and a positive --seconds");
    }
    let seconds = args.seconds;
    setup::run()?;
    let ward_bin = ward::binary()?;
    let floor_bin = if args.floor {
        Some(floor_binary()?)
    } else {
        None
    };
    let work = args.run.work_dir("ward-bench")?;

    heading("workloads");
    let mount = sys::cgroup2_mount()?;
    let cgroups = CgroupTree::create(&mount, CGROUP_ROOT, &["client", "server", OUTSIDER])?;
    let client_cgroup = cgroups.path("client");
    let level = client_cgroup.strip_prefix(&mount)?.components().count();
    let nft_client = nft_cgroup_path(&mount, &client_cgroup)?;
    let nft_server = nft_cgroup_path(&mount, &cgroups.path("server"))?;
    let nft = NftTable::new()?;
    let config = work.join("ward.yaml");
    fs::write(&config, loopback::ward_config(CGROUP_ROOT, "policy.yaml"))?;
    let open_config = work.join("ward-open.yaml");
    fs::write(
        &open_config,
        loopback::ward_config(CGROUP_ROOT, "policy-open.yaml"),
    )?;
    fs::write(work.join("policy-open.yaml"), loopback::UNISOLATED_POLICY)?;

    let mut rows = Vec::new();
    let mut memory = Vec::new();
    let mut kernel_time = Vec::new();
    for &size in &args.sizes {
        for &transport in &args.transports {
            heading(&format!("{transport}, policy size {size}"));
            let policy = Policy::new(size, transport);
            fs::write(work.join("policy.yaml"), policy.ward_yaml())?;
            let nft_rules = policy.nft(&nft_client, &nft_server, level);
            let nft_file = work.join(format!("policy-{transport}.nft"));
            fs::write(&nft_file, &nft_rules)?;

            let (mut base, mut with_ward, mut with_nft) = (Vec::new(), Vec::new(), Vec::new());
            let (mut with_other, mut with_open, mut with_other_open, mut with_floor) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut entries = None;
            for round in 1..=args.run.rounds {
                println!("round {round} of {}", args.run.rounds);
                let last = round == args.run.rounds;
                base.push(measure(&cgroups, transport, seconds, BASELINE)?);

                let log = format!("ward-{transport}-{size}");
                let run = measure_agent(
                    &ward_bin, &config, &log, &cgroups, transport, seconds, "ward",
                )?;
                entries = run.entries;
                if last {
                    memory.push((transport, size, run.memory));
                }
                with_ward.push(run.m);

                if let Some(other) = &args.compare_with {
                    let log = format!("ward-other-{transport}-{size}");
                    let run =
                        measure_agent(other, &config, &log, &cgroups, transport, seconds, "ward")?;
                    with_other.push(run.m);
                }

                if args.unisolated {
                    let mut builds = vec![("ward-open", &ward_bin, &mut with_open)];
                    if let Some(other) = &args.compare_with {
                        builds.push(("ward-other-open", other, &mut with_other_open));
                    }
                    for (name, bin, runs) in builds {
                        let log = format!("{name}-{transport}-{size}");
                        let run = measure_agent(
                            bin,
                            &open_config,
                            &log,
                            &cgroups,
                            transport,
                            seconds,
                            UNISOLATED,
                        )?;
                        runs.push(run.m);
                    }
                }

                if let Some(floor) = &floor_bin {
                    let log = format!("ward-floor-{transport}-{size}");
                    let run =
                        measure_agent(floor, &config, &log, &cgroups, transport, seconds, FLOOR)?;
                    with_floor.push(run.m);
                }

                nft.load(&nft_file)?;
                let m = measure(&cgroups, transport, seconds, "nftables");
                nft.delete()?;
                with_nft.push(m?);
            }
            if args.run.bpf_stats {
                // Its own measurement: the statistics slow every program run a little, and the
                // rates above are measured without them.
                println!("kernel program statistics");
                let _stats = BpfStats::enable()?;
                let builds = std::iter::once((&ward_bin, &config, "ward", "ward", ""))
                    .chain(
                        args.compare_with
                            .iter()
                            .map(|other| (other, &config, "ward-other", "ward", " (other build)")),
                    )
                    .chain(args.unisolated.then_some((
                        &ward_bin,
                        &open_config,
                        "ward-open",
                        UNISOLATED,
                        " (open)",
                    )));
                for (bin, config, name, variant, label) in builds {
                    let log = format!("{name}-stats-{transport}-{size}");
                    let run =
                        measure_agent(bin, config, &log, &cgroups, transport, seconds, variant)?;
                    kernel_time.push((transport, size, run.kernel_time(label)));
                }
            }
            match entries {
                Some(n) => println!("ward wrote {n} policy entries"),
                None => println!("ward's log names no entry count (looked for `entries=N`)"),
            }
            let mut row = |variant, entries, runs: &[Measurement]| {
                rows.push(Row {
                    transport,
                    size,
                    variant,
                    entries,
                    m: median(runs),
                });
            };
            row("no programs", None, &base);
            row("ward", entries, &with_ward);
            if !with_other.is_empty() {
                row("ward (other)", entries, &with_other);
            }
            if !with_open.is_empty() {
                row("ward (open)", None, &with_open);
            }
            if !with_other_open.is_empty() {
                row("ward (other, open)", None, &with_other_open);
            }
            if !with_floor.is_empty() {
                row("ward (floor)", entries, &with_floor);
            }
            row("nftables", Some(policy.entries()), &with_nft);
        }
    }
    drop(cgroups);

    heading(&format!(
        "results (median of {} rounds of {seconds} s)",
        args.run.rounds
    ));
    print!("{}", table(&rows, "size"));
    println!(
        "isolated: the client's egress and the server's ingress. conns/s and p50/p99: TCP \
         connect() (handshake) on a new socket; UDP: a new socket binds, connects, sends one \
         datagram and receives the echo.\nslow: connects that waited for a SYN retransmit \
         (>= 100 ms); Δ: against no programs at the same transport and size"
    );
    if args.unisolated {
        println!("ward (open): ward running with a policy that isolates neither workload");
    }
    if args.floor {
        println!(
            "ward (floor): a build of ward whose kernel programs return at once, with the same \
             policy: what attaching them costs"
        );
    }
    println!("\nward's memory once the policy was in force (after the measurement):");
    for (transport, size, kib) in memory {
        match kib {
            Some((rss, hwm)) => println!(
                "  {transport} size {size:>7}: RSS {:.1} MiB (peak {:.1} MiB)",
                rss as f64 / 1024.0,
                hwm as f64 / 1024.0
            ),
            None => println!("  {transport} size {size:>7}: ward had exited"),
        }
    }
    if !kernel_time.is_empty() {
        println!("\nward's kernel programs per connection (runs x ns per run), measured after the rounds with the statistics on:");
        for &transport in &args.transports {
            println!("  {transport}:");
            for (_, size, per_conn) in kernel_time.iter().filter(|k| k.0 == transport) {
                println!("    size {size:>7}: {per_conn}");
            }
        }
    }
    println!("\nlogs, policies and rulesets: {}", work.display());
    Ok(())
}

/// The `nft` table of the nftables variant, deleted on drop.
struct NftTable;

impl NftTable {
    fn new() -> Result<Self> {
        sys::output(Command::new("nft").arg("--version"))
            .context("nft is needed (`cargo xtask setup` installs it)")?;
        let table = Self;
        table.delete()?;
        Ok(table)
    }

    fn load(&self, rules: &Path) -> Result<()> {
        println!("$ nft -f {}", rules.display());
        sys::output(Command::new("nft").arg("-f").arg(rules)).map(drop)
    }

    fn delete(&self) -> Result<()> {
        let tables = sys::output(Command::new("nft").args(["list", "tables"]))?;
        if tables
            .lines()
            .any(|t| t.trim() == format!("table inet {NFT_TABLE}"))
        {
            sys::output(Command::new("nft").args(["delete", "table", "inet", NFT_TABLE]))?;
        }
        Ok(())
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!("warning: deleting nftables table {NFT_TABLE}: {e:#}");
        }
    }
}

#[derive(Clone)]
pub struct Measurement {
    pub conns_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Connects that waited for a SYN retransmit: the run was disturbed.
    pub slow: u64,
    /// Connects made, warm-up included.
    pub total_conns: u64,
}

/// One agent's measurement: the connection rate with it in force, and what it cost.
struct AgentRun {
    m: Measurement,
    entries: Option<usize>,
    memory: Option<(u64, u64)>,
    before: BTreeMap<u32, (String, u64, u64)>,
    after: BTreeMap<u32, (String, u64, u64)>,
}

impl AgentRun {
    /// Its kernel programs' time per connection, measured with the kernel's BPF statistics on.
    fn kernel_time(&self, label: &str) -> String {
        let per_conn = per_connection(&self.before, &self.after, self.m.total_conns);
        println!("kernel programs per connection{label}: {per_conn}");
        format!("{per_conn}{label}")
    }
}

/// Starts `bin` with the benchmark's configuration `config` (its log beside it, named after
/// `log`), measures with it in force as `variant` ([`measure`]), and stops it.
fn measure_agent(
    bin: &Path,
    config: &Path,
    log: &str,
    cgroups: &CgroupTree,
    transport: Transport,
    seconds: f64,
    variant: &str,
) -> Result<AgentRun> {
    let log = config.with_file_name(format!("{log}.log"));
    // A floor build runs only when told (the agent's `FLOOR_BUILD_VAR`).
    let env: &[(&str, &str)] = if variant == FLOOR {
        &[("WARD_FLOOR_BUILD", "1")]
    } else {
        &[]
    };
    let mut agent = Ward::start_with_env(bin, config, &log, env)?;
    agent.wait_ready(Duration::from_secs(300))?;
    let entries = logged_entries(&agent.log_since(0));
    let before = prog_stats(agent.pid());
    let m = measure(cgroups, transport, seconds, variant)?;
    let after = prog_stats(agent.pid());
    let memory = sys::memory_kib(agent.pid());
    if let Some(status) = agent.stop()? {
        println!("{} exited ({status})", bin.display());
    }
    Ok(AgentRun {
        m,
        entries,
        memory,
        before,
        after,
    })
}

/// A release build of ward with the `floor` feature (kernel programs that return at once), in a
/// target directory of its own so that it never stands in for the real build.
fn floor_binary() -> Result<PathBuf> {
    heading("build ward (floor)");
    let dir = sys::target_dir().join("floor");
    sys::run(sys::build_ward_with_feature("floor", &dir).arg("--release"))?;
    Ok(dir.join("release/ward"))
}

#[derive(Clone)]
pub struct Row {
    pub transport: Transport,
    pub size: usize,
    pub variant: &'static str,
    pub entries: Option<usize>,
    pub m: Measurement,
}

/// Starts the server (after the variant is in force, so ward sees it start listening), checks
/// that the denied port is refused, then runs the client loop.
fn measure(
    cgroups: &CgroupTree,
    transport: Transport,
    seconds: f64,
    variant: &str,
) -> Result<Measurement> {
    let (server, denied) = (
        transport.server(SERVER_PORT).to_string(),
        transport.server(DENIED_PORT).to_string(),
    );
    let listen = if transport.is_udp() {
        "--udp"
    } else {
        "--listen"
    };
    let mut children = Children::default();
    let mut server_cmd = sys::xtask_in_cgroup(&cgroups.path("server"))?;
    server_cmd.args(["serve", listen, &server, listen, &denied]);
    probe::start_listener(&mut children, &mut server_cmd, "the benchmark server")?;

    let client = cgroups.path("client");
    // Each side's isolation on its own: the client's egress refuses the denied port, and the
    // server's ingress refuses it to a process that is no workload (whose egress nothing limits).
    for (from, isolation) in [
        ("client", "the client's egress"),
        (OUTSIDER, "the server's ingress"),
    ] {
        let (code, said) = probe::connect_from(
            &cgroups.path(from),
            transport.server(DENIED_PORT),
            transport.is_udp(),
            Duration::from_millis(500),
        )?;
        let enforcing = code != probe::CONNECTED;
        let open = match variant {
            BASELINE => Some("no programs attached"),
            UNISOLATED => Some("ward isolating neither workload"),
            FLOOR => Some("ward's programs returning at once"),
            _ => None,
        };
        if let (Some(open), true) = (open, enforcing) {
            bail!("{transport}: with {open} the {from} cgroup cannot reach {denied}: {said}");
        }
        if open.is_none() && !enforcing {
            bail!(
                "{transport}: under {variant} the {from} cgroup reached {denied}: {isolation} is \
                 not in force"
            );
        }
    }

    print!("{variant:<9} {transport} measuring {seconds} s ... ");
    run_client(
        sys::xtask_in_cgroup(&client)?,
        transport.server(SERVER_PORT),
        transport,
        seconds,
        variant,
    )
}

/// Runs the `bench-client` loop against `target` with `cmd` (xtask placed where the client
/// belongs: its cgroup, perhaps a network namespace) and returns what it measured.
pub fn run_client(
    mut cmd: Command,
    target: SocketAddr,
    transport: Transport,
    seconds: f64,
    variant: &str,
) -> Result<Measurement> {
    let mut children = Children::default();
    cmd.args([
        "bench-client",
        &target.to_string(),
        "--seconds",
        &seconds.to_string(),
    ])
    .stdout(Stdio::piped());
    if transport.is_udp() {
        cmd.arg("--udp");
    }
    let report = report_line(&mut children, &mut cmd, seconds)
        .with_context(|| format!("{variant}: the client (a connect hung?)"))?;
    let m = parse_report(&report)
        .with_context(|| format!("{variant}, {transport} to {target}: client said {report:?}"))?;
    println!(
        "{:.0} conns/s, p50 {:.1} µs, p99 {:.1} µs",
        m.conns_per_sec, m.p50_us, m.p99_us
    );
    if m.slow > 0 {
        println!(
            "warning: {} connects took 100 ms or more (a busy CPU?)",
            m.slow
        );
    }
    Ok(m)
}

/// Turns on the kernel's run-time accounting of BPF programs; restores the setting on drop.
pub struct BpfStats(String);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> Result<Self> {
        let previous =
            fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS}"))?;
        Ok(Self(previous))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, self.0.trim());
    }
}

/// (program type, run time in ns, runs) of each program a process holds, from its fdinfo.
pub fn prog_stats(pid: u32) -> BTreeMap<u32, (String, u64, u64)> {
    let mut progs = BTreeMap::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let info = fs::read_to_string(entry.path()).unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(kind), Some(ns), Some(runs)) = (
            field("prog_id:"),
            field("prog_type:"),
            field("run_time_ns:"),
            field("run_cnt:"),
        ) {
            let kind = match kind {
                8 => "cgroup_skb".to_owned(),
                9 => "cgroup_sock".to_owned(),
                13 => "sock_ops".to_owned(),
                18 => "cgroup_sock_addr".to_owned(),
                other => format!("type {other}"),
            };
            progs.insert(id as u32, (kind, ns, runs));
        }
    }
    progs
}

/// `sock_ops 11.5 x 198 ns + ... = 5.5 µs`: what each program type costs a connection.
pub fn per_connection(
    before: &BTreeMap<u32, (String, u64, u64)>,
    after: &BTreeMap<u32, (String, u64, u64)>,
    conns: u64,
) -> String {
    let mut by_kind: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (id, (kind, ns, runs)) in after {
        let (_, ns0, runs0) = before.get(id).cloned().unwrap_or_default();
        let sum = by_kind.entry(kind).or_default();
        sum.0 += ns - ns0;
        sum.1 += runs - runs0;
    }
    let conns = conns.max(1) as f64;
    let mut parts = Vec::new();
    let mut total_ns = 0.0;
    for (kind, (ns, runs)) in by_kind.into_iter().filter(|(_, (_, runs))| *runs > 0) {
        parts.push(format!(
            "{kind} {:.1} x {:.0} ns",
            runs as f64 / conns,
            ns as f64 / runs as f64
        ));
        total_ns += ns as f64 / conns;
    }
    format!("{} = {:.2} µs", parts.join(" + "), total_ns / 1000.0)
}

/// Medians of the rates and latencies; the slow connects of all rounds.
pub fn median(runs: &[Measurement]) -> Measurement {
    let mid = |f: fn(&Measurement) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Measurement {
        conns_per_sec: mid(|m| m.conns_per_sec),
        p50_us: mid(|m| m.p50_us),
        p99_us: mid(|m| m.p99_us),
        slow: runs.iter().map(|m| m.slow).sum(),
        total_conns: runs.iter().map(|m| m.total_conns).sum(),
    }
}

/// Runs a load generator for about `seconds` (its stdout piped) and returns its report line.
pub fn report_line(children: &mut Children, cmd: &mut Command, seconds: f64) -> Result<String> {
    let child = children.spawn(cmd)?;
    let limit = Duration::from_secs_f64(seconds + 30.0);
    if sys::wait_timeout(child, limit)?.is_none() {
        bail!("it did not finish within {limit:?}");
    }
    let mut report = String::new();
    BufReader::new(child.stdout.take().expect("stdout is piped")).read_line(&mut report)?;
    Ok(report)
}

/// The numeric fields of a load generator's report line (`name=value ...`), or the error it
/// reported (`error=...`, which failed `what`).
pub fn report_fields<'a>(line: &'a str, what: &str) -> Result<impl Fn(&str) -> Result<f64> + 'a> {
    if let Some(error) = line.trim().strip_prefix("error=") {
        bail!("{what} failed: {error}");
    }
    Ok(move |name: &str| -> Result<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .with_context(|| format!("no {name}"))?
            .parse()
            .with_context(|| format!("bad {name}"))
    })
}

fn parse_report(line: &str) -> Result<Measurement> {
    let field = report_fields(line, "a connect")?;
    Ok(Measurement {
        conns_per_sec: field("conns")? / field("seconds")?,
        p50_us: field("p50_ns")? / 1000.0,
        p99_us: field("p99_ns")? / 1000.0,
        slow: field("slow")? as u64,
        total_conns: field("total")? as u64,
    })
}

/// The results as a table; `size` names the size column (none when empty). A row whose variant
/// starts with "no programs" is the baseline of the rows after it: their Δ columns compare with it.
pub fn table(rows: &[Row], size: &str) -> String {
    let width = rows
        .iter()
        .map(|r| r.variant.chars().count())
        .max()
        .unwrap_or(0)
        .max(13);
    // Without a row that counts entries, the column is left out.
    let entries_width = if rows.iter().any(|r| r.entries.is_some()) {
        9
    } else {
        0
    };
    let size_cell = |text: &str| {
        if size.is_empty() {
            String::new()
        } else {
            format!(" {text:>7}")
        }
    };
    let mut out = format!(
        "{:<9}{}  {:<width$}{:>entries_width$} {:>10} {:>9} {:>9} {:>11} {:>9} {:>6}\n",
        "transport",
        size_cell(size),
        "variant",
        if entries_width > 0 { "entries" } else { "" },
        "conns/s",
        "p50 µs",
        "p99 µs",
        "Δ conns/s",
        "Δ p50",
        "slow"
    );
    let mut base: Option<&Measurement> = None;
    for row in rows {
        if row.variant.starts_with("no programs") {
            base = Some(&row.m);
        }
        let delta = |v: f64, b: f64| format!("{:+.1}%", (v / b - 1.0) * 100.0);
        let (d_rate, d_p50) = match base {
            Some(b) if !std::ptr::eq(b, &row.m) => (
                delta(row.m.conns_per_sec, b.conns_per_sec),
                delta(row.m.p50_us, b.p50_us),
            ),
            _ => ("-".into(), "-".into()),
        };
        let entries = match row.entries {
            _ if entries_width == 0 => String::new(),
            Some(n) => n.to_string(),
            None => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<9}{}  {:<width$}{entries:>entries_width$} {:>10.0} {:>9.1} {:>9.1} {d_rate:>11} {d_p50:>9} {:>6}",
            row.transport.to_string(),
            size_cell(&row.size.to_string()),
            row.variant, row.m.conns_per_sec, row.m.p50_us, row.m.p99_us, row.m.slow
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_summarised_by_their_medians() {
        let m = |rate, slow| Measurement {
            conns_per_sec: rate,
            p50_us: rate / 1000.0,
            p99_us: 1.0,
            slow,
            total_conns: 1,
        };
        let med = median(&[m(3000.0, 1), m(1000.0, 0), m(2000.0, 2)]);
        assert_eq!((med.conns_per_sec, med.p50_us, med.slow), (2000.0, 2.0, 3));
    }

    #[test]
    fn kernel_time_is_split_by_program_type() {
        let stats = |ns, runs| {
            BTreeMap::from([
                (7, ("sock_ops".to_owned(), ns, runs)),
                (9, ("cgroup_skb".to_owned(), ns, runs)),
            ])
        };
        assert_eq!(
            per_connection(&stats(1000, 10), &stats(21_000, 110), 10),
            "cgroup_skb 10.0 x 200 ns + sock_ops 10.0 x 200 ns = 4.00 µs"
        );
    }

    #[test]
    fn a_table_without_sizes_leaves_the_size_column_out() {
        let row = |variant, rate| Row {
            transport: Transport::Tcp4,
            size: 0,
            variant,
            entries: None,
            m: Measurement {
                conns_per_sec: rate,
                p50_us: 10.0,
                p99_us: 20.0,
                slow: 0,
                total_conns: 1,
            },
        };
        let rows = [row("no programs", 2000.0), row("ward", 1500.0)];
        let table = table(&rows, "");
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("transport  variant "), "{table}");
        assert!(lines[2].starts_with("tcp4       ward "), "{table}");
        assert!(lines[2].contains("-25.0%"), "{table}");
        assert!(super::table(&rows, "size").starts_with("transport    size  variant"));
    }

    #[test]
    fn client_reports_parse() {
        let m =
            parse_report("conns=1000 seconds=0.5 p50_ns=20000 p99_ns=41000 slow=0 total=1100\n")
                .unwrap();
        assert_eq!((m.conns_per_sec, m.p50_us, m.p99_us), (2000.0, 20.0, 41.0));
        assert!(parse_report("error=Operation not permitted (os error 1)").is_err());
    }
}
