//! `cargo xtask bench dns`: DNS-aware egress. DNS query latency through the agent's DNS proxy
//! against the same query sent straight to the resolver (with no programs attached, and with ward
//! for a workload whose policy names no DNS name), and the connection rate to an address learned
//! from a DNS answer against a CIDR-allowed one, interleaved in one run.
//!
//! Everything happens in a network namespace of its own: one end of a veth pair holds the
//! resolver's address (a real dnsmasq, answering `api.bench.example` with the learned address),
//! the learned address, a CIDR-allowed one and one no rule names; one server, in a cgroup no
//! workload maps, listens on `0.0.0.0`. The agent runs in the node's namespace and opens its
//! proxy inside the bench's, as it does in a pod's, while a process of the client workload lives
//! there. The DNS client and dnsmasq run on two different CPUs, so each query crosses CPUs in
//! every variant alike. The connection loop and its table are `bench connect`'s; the DNS client
//! is here.

use std::{
    fmt::{self, Write as _},
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    str::FromStr as _,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use hickory_proto::{
    op::{Message, MessageType, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};

use crate::{
    bench::{self, median, per_connection, prog_stats, BpfStats, Measurement, Row},
    loopback::{Transport, SERVER_PORT},
    probe, setup, stats,
    sys::{self, heading, CgroupTree, Children, Netns},
    ward::{self, Ward},
};

const NETNS: &str = "ward-bench-dns";
const CGROUP_ROOT: &str = "ward-bench-dns";
const DNSMASQ: &str = "/usr/sbin/dnsmasq";
/// The name the client workload's policy allows, and the resolver's only record.
const NAME: &str = "api.bench.example";
const RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 2);
/// What [`NAME`] resolves to: allowed only once learned from an answer.
const LEARNED: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 3);
/// Allowed by a CIDR rule.
const CIDR_ALLOWED: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 4);
/// Named by no rule.
const UNLISTED: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 5);
/// The agent's default proxy port, taken unless something on this node holds it.
const PROXY_PORT: u16 = 15053;
/// Longer than any run, so the learned address lasts through the measurements.
const MIN_TTL_SECONDS: u32 = 3600;
/// The resolver's answer TTL (below the minimum: the agent's clamp decides).
const ANSWER_TTL_SECONDS: u32 = 300;
/// How long one query may wait for its answer before it counts as lost.
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(clap::Args)]
pub struct DnsArgs {
    /// Measuring time per variant, transport and round.
    #[arg(long, default_value = "2")]
    seconds: f64,
    /// How DNS is asked, comma separated: udp (glibc's way: a new socket connects to the resolver,
    /// sends one A query and receives the answer), tcp (a new connection per query).
    #[arg(long, value_delimiter = ',', default_value = "udp,tcp")]
    transports: Vec<DnsTransport>,
    #[command(flatten)]
    run: bench::RoundArgs,
}

/// The DNS client run inside a workload's cgroup (`cargo xtask bench dns-client`, hidden).
#[derive(clap::Args)]
pub struct ClientArgs {
    resolver: SocketAddr,
    /// Asked for its A records.
    #[arg(long)]
    name: String,
    /// An address every answer must hold.
    #[arg(long)]
    expect: Ipv4Addr,
    /// A new TCP connection per query instead of a new UDP socket.
    #[arg(long)]
    tcp: bool,
    /// Ask in a loop for this long after a short warm-up and report; without it, ask once.
    #[arg(long)]
    seconds: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DnsTransport {
    Udp,
    Tcp,
}

impl fmt::Display for DnsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        })
    }
}

/// Where a workload's DNS goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lookup {
    /// Nothing attached: straight to the resolver.
    Baseline,
    /// ward attached, a workload whose policy names no DNS name: not redirected.
    WardDirect,
    /// ward attached, the workload whose policy names [`NAME`]: through the proxy.
    WardProxy,
}

impl Lookup {
    const ALL: [Self; 3] = [Self::Baseline, Self::WardDirect, Self::WardProxy];

    fn label(self) -> &'static str {
        match self {
            Self::Baseline => "no programs, direct",
            Self::WardDirect => "ward, direct",
            Self::WardProxy => "ward, through the proxy",
        }
    }

    /// The workload cgroup the client runs in.
    fn cgroup(self) -> &'static str {
        match self {
            Self::WardDirect => "direct",
            Self::Baseline | Self::WardProxy => "client",
        }
    }
}

/// Where the client workload connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reach {
    /// Nothing attached, to the learned address.
    Baseline,
    WardCidr,
    WardLearned,
}

impl Reach {
    const ALL: [Self; 3] = [Self::Baseline, Self::WardCidr, Self::WardLearned];

    fn label(self) -> &'static str {
        match self {
            Self::Baseline => "no programs",
            Self::WardCidr => "ward, CIDR-allowed",
            Self::WardLearned => "ward, learned from DNS",
        }
    }

    fn target(self) -> SocketAddr {
        let address = match self {
            Self::Baseline | Self::WardLearned => LEARNED,
            Self::WardCidr => CIDR_ALLOWED,
        };
        SocketAddrV4::new(address, SERVER_PORT).into()
    }
}

/// One run of the DNS client loop, or the medians of several.
#[derive(Clone, Debug, PartialEq)]
struct Lookups {
    queries_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// Queries with no answer within [`QUERY_TIMEOUT`] (left out of the latencies).
    lost: u64,
    /// Queries answered, warm-up included.
    total: u64,
}

struct DnsRow {
    transport: DnsTransport,
    lookup: Lookup,
    m: Lookups,
}

pub fn run(args: &DnsArgs) -> Result<()> {
    sys::require_root(
        "bench dns",
        "it creates a network namespace and cgroups, runs dnsmasq and loads eBPF programs",
    )?;
    if args.transports.is_empty() || args.seconds <= 0.0 || args.run.rounds == 0 {
        bail!("need at least one transport, one round and a positive --seconds");
    }
    let seconds = args.seconds;
    setup::run()?;
    if !Path::new(DNSMASQ).exists() {
        bail!("{DNSMASQ} is needed (`cargo xtask setup` installs dnsmasq-base)");
    }
    let ward_bin = ward::binary()?;
    let work = args.run.work_dir("ward-bench-dns")?;

    heading("network namespace, resolver and workloads");
    let _netns = Netns::create(NETNS, &netns_batch(), &work.join("netns.batch"))?;
    println!(
        "{NETNS}: lo, dns0 with {RESOLVER} (the resolver), {LEARNED} ({NAME}), {CIDR_ALLOWED} \
         (CIDR-allowed), {UNLISTED} (no rule)"
    );
    let mount = sys::cgroup2_mount()?;
    let cgroups = CgroupTree::create(
        &mount,
        CGROUP_ROOT,
        &["client", "direct", "server", "resolver"],
    )?;
    let cpus = two_cpus();
    match cpus {
        Some((client, resolver)) => {
            println!("the DNS client runs on CPU {client}, the resolver on CPU {resolver}")
        }
        None => println!("warning: fewer than two CPUs: the DNS client and the resolver share one"),
    }
    let mut children = Children::default();
    start_resolver(&mut children, &cgroups, &work, cpus.map(|c| c.1))?;
    let client_cpu = cpus.map(|c| c.0);
    let mut server = in_bench(&cgroups, "server")?;
    server.args(["serve", "--listen", &format!("0.0.0.0:{SERVER_PORT}")]);
    probe::start_listener(&mut children, &mut server, "the benchmark server")?;
    // The agent opens its proxy in the namespace of a workload's processes while it has one.
    let mut resident = sys::in_cgroup(&cgroups.path("client"), "sleep");
    resident.arg("infinity");
    sys::enter_netns(&mut resident, NETNS)?;
    children.spawn(&mut resident)?;
    wait_for_resolver(&cgroups)?;

    let proxy_port = free_port(PROXY_PORT)?;
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port(0)?));
    let config = work.join("ward.yaml");
    fs::write(&config, ward_config(proxy_port, metrics))?;
    fs::write(work.join("policy.yaml"), POLICY)?;
    let pins = Pins::clear(Path::new("/sys/fs/bpf").join(CGROUP_ROOT))?;

    let mut lookups: Vec<[Vec<Lookups>; 3]> =
        args.transports.iter().map(|_| Default::default()).collect();
    let mut conns: [Vec<Measurement>; 3] = Default::default();
    let mut kernel_time = Vec::new();
    let _stats = args.run.bpf_stats.then(BpfStats::enable).transpose()?;
    for round in 1..=args.run.rounds {
        heading(&format!("round {round} of {}", args.run.rounds));
        let last = round == args.run.rounds;
        for target in [LEARNED, CIDR_ALLOWED, UNLISTED] {
            expect_connect(
                &cgroups,
                "client",
                target,
                true,
                "with no programs attached",
            )?;
        }
        for (i, &transport) in args.transports.iter().enumerate() {
            let m = measure_lookups(&cgroups, Lookup::Baseline, transport, seconds, client_cpu)?;
            lookups[i][0].push(m);
        }
        conns[0].push(measure_connects(&cgroups, Reach::Baseline, seconds)?);

        let log = work.join(format!("ward-{round}.log"));
        let mut agent = Ward::start(&ward_bin, &config, &log)?;
        agent.wait_ready(Duration::from_secs(300))?;
        wait_for_proxy(&agent)?;
        // The learned address is refused until the workload resolves the name.
        expect_connect(&cgroups, "client", LEARNED, false, "before resolving")?;
        expect_connect(&cgroups, "client", CIDR_ALLOWED, true, "by its CIDR rule")?;
        expect_connect(&cgroups, "client", UNLISTED, false, "named by no rule")?;
        expect_connect(&cgroups, "direct", UNLISTED, false, "named by no rule")?;
        for lookup in [Lookup::WardDirect, Lookup::WardProxy] {
            for (i, &transport) in args.transports.iter().enumerate() {
                let forwarded = proxy_forwarded(metrics)?;
                let before = prog_stats(agent.pid());
                let m = measure_lookups(&cgroups, lookup, transport, seconds, client_cpu)?;
                let after = prog_stats(agent.pid());
                check_proxy_forwarded(
                    lookup,
                    transport,
                    &m,
                    proxy_forwarded(metrics)?.saturating_sub(forwarded),
                )?;
                if args.run.bpf_stats && last {
                    let per_query = per_connection(&before, &after, m.total);
                    println!("kernel programs per query: {per_query}");
                    kernel_time.push((format!("{transport} query, {}", lookup.label()), per_query));
                }
                lookups[i][lookup as usize].push(m);
            }
        }
        expect_connect(
            &cgroups,
            "client",
            LEARNED,
            true,
            "once resolved through the proxy",
        )?;
        for reach in [Reach::WardCidr, Reach::WardLearned] {
            let before = prog_stats(agent.pid());
            let m = measure_connects(&cgroups, reach, seconds)?;
            if args.run.bpf_stats && last {
                let per_conn = per_connection(&before, &prog_stats(agent.pid()), m.total_conns);
                println!("kernel programs per connection: {per_conn}");
                kernel_time.push((format!("tcp4 connection, {}", reach.label()), per_conn));
            }
            conns[reach as usize].push(m);
        }
        if let Some(status) = agent.stop()? {
            println!("{} exited ({status})", ward_bin.display());
        }
    }
    drop(pins);
    children.kill_all();
    drop(cgroups);

    heading(&format!(
        "results (median of {} rounds of {seconds} s)",
        args.run.rounds
    ));
    let mut rows = Vec::new();
    for (&transport, runs) in args.transports.iter().zip(&lookups) {
        for (lookup, runs) in Lookup::ALL.into_iter().zip(runs) {
            rows.push(DnsRow {
                transport,
                lookup,
                m: median_lookups(runs),
            });
        }
    }
    println!("\nDNS queries, A {NAME} from the client workload:");
    print!("{}", lookup_table(&rows));
    let placement = match cpus {
        Some((client, resolver)) => {
            format!("the client on CPU {client}, dnsmasq on CPU {resolver}")
        }
        None => "the client and dnsmasq where the scheduler puts them".to_owned(),
    };
    println!(
        "direct: to the resolver, dnsmasq at {RESOLVER}:53 (with ward: from a workload whose \
         policy allows the resolver but names no DNS name); through the proxy: from the workload \
         whose policy names {NAME}, redirected to the agent's proxy on 127.0.0.1:{proxy_port} in \
         the bench's namespace, which forwards the query to the resolver and installs the \
         answer's address before returning it.\n\
         udp: a new socket connects, sends one A query and receives the answer (glibc's way); \
         tcp: a new connection per query. One query at a time ({placement}), so queries/s is \
         the inverse of the mean latency.\n\
         lost: queries with no answer within {QUERY_TIMEOUT:?}; Δ: against no programs, direct, \
         at the same transport (the latencies in µs)"
    );
    let rows: Vec<Row> = Reach::ALL
        .into_iter()
        .zip(&conns)
        .map(|(reach, runs)| Row {
            transport: Transport::Tcp4,
            size: 0,
            variant: reach.label(),
            entries: None,
            m: median(runs),
        })
        .collect();
    println!("\nTCP connections from the client workload:");
    print!("{}", bench::table(&rows, ""));
    println!(
        "learned from DNS: {LEARNED}:{SERVER_PORT}, allowed by the rule naming {NAME} once \
         resolved through the proxy (minTtlSeconds {MIN_TTL_SECONDS}); CIDR-allowed: \
         {CIDR_ALLOWED}:{SERVER_PORT}, allowed by a CIDR rule; no programs: \
         {LEARNED}:{SERVER_PORT} with nothing attached.\nconns/s and p50/p99: TCP connect() \
         (handshake) on a new socket. slow: connects that waited for a SYN retransmit \
         (>= 100 ms); Δ: against no programs"
    );
    if !kernel_time.is_empty() {
        println!("\nward's kernel programs (runs x ns per run), last round:");
        for (what, per) in &kernel_time {
            println!("  {what:<42}: {per}");
        }
    }
    println!("\nconfiguration, policy and logs: {}", work.display());
    Ok(())
}

/// `lo` up; `dns0` (a veth pair with `dns1`, both in the namespace) with the resolver's, the
/// learned, the CIDR-allowed and the unlisted address.
fn netns_batch() -> String {
    let mut batch = String::from(
        "link set lo up\nlink add dns0 type veth peer name dns1\nlink set dns0 up\n\
         link set dns1 up\n",
    );
    for address in [RESOLVER, LEARNED, CIDR_ALLOWED, UNLISTED] {
        let _ = writeln!(batch, "addr add {address}/32 dev dns0");
    }
    batch
}

/// xtask in the `who` cgroup and the bench's network namespace.
fn in_bench(cgroups: &CgroupTree, who: &str) -> Result<Command> {
    let mut cmd = sys::xtask_in_cgroup(&cgroups.path(who))?;
    sys::enter_netns(&mut cmd, NETNS)?;
    Ok(cmd)
}

/// dnsmasq in the bench's namespace and the "resolver" cgroup, answering [`NAME`] from its own
/// record and nothing else; its log in the work directory.
fn start_resolver(
    children: &mut Children,
    cgroups: &CgroupTree,
    work: &Path,
    cpu: Option<usize>,
) -> Result<()> {
    let log = work.join("dnsmasq.log");
    let log_file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = sys::in_cgroup(&cgroups.path("resolver"), DNSMASQ);
    cmd.args([
        "--keep-in-foreground",
        "--log-facility=-",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--user=root",
        "--pid-file=",
        "--bind-interfaces",
    ])
    .arg(format!("--listen-address={RESOLVER}"))
    .arg(format!("--host-record={NAME},{LEARNED}"))
    .arg(format!("--local-ttl={ANSWER_TTL_SECONDS}"))
    .stdin(Stdio::null())
    .stdout(log_file.try_clone()?)
    .stderr(log_file);
    sys::enter_netns(&mut cmd, NETNS)?;
    if let Some(cpu) = cpu {
        pin(&mut cmd, cpu);
    }
    println!("$ {} >{} 2>&1 &", sys::show(&cmd), log.display());
    children.spawn(&mut cmd)?;
    Ok(())
}

/// Asks the resolver from the client workload until it answers (dnsmasq starts in a moment).
fn wait_for_resolver(cgroups: &CgroupTree) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (answered, said) = ask_once(cgroups, "client")?;
        if answered {
            println!("the resolver answers: {said}");
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the resolver at {RESOLVER}:53 did not answer within 10 s: {said}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// One query from the `who` workload: whether a right answer came, and what the client said.
fn ask_once(cgroups: &CgroupTree, who: &str) -> Result<(bool, String)> {
    let mut cmd = in_bench(cgroups, who)?;
    cmd.args(dns_client_args(DnsTransport::Udp));
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{}`", sys::show(&cmd)))?;
    let said = format!(
        "{} {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok((out.status.success(), said.trim().to_owned()))
}

fn dns_client_args(transport: DnsTransport) -> Vec<String> {
    let mut args = vec![
        "bench".to_owned(),
        "dns-client".to_owned(),
        SocketAddrV4::new(RESOLVER, 53).to_string(),
        "--name".to_owned(),
        NAME.to_owned(),
        "--expect".to_owned(),
        LEARNED.to_string(),
    ];
    if transport == DnsTransport::Tcp {
        args.push("--tcp".to_owned());
    }
    args
}

/// Waits for the agent's proxy to listen in the bench's namespace (its placement pass finds the
/// client workload's process there every 250 ms).
fn wait_for_proxy(agent: &Ward) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent
        .log_since(0)
        .contains("DNS proxy listening in the workload's network namespace")
    {
        if Instant::now() > deadline {
            bail!(
                "ward did not open its DNS proxy in {NETNS} within 10 s; its log ends:\n{}",
                ward::tail(&agent.log_since(0), 20)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Fails unless a TCP connection from the `who` workload to `address` on the server's port
/// connects (`allowed`) or is refused by ward with EPERM.
fn expect_connect(
    cgroups: &CgroupTree,
    who: &str,
    address: Ipv4Addr,
    allowed: bool,
    why: &str,
) -> Result<()> {
    let target = SocketAddrV4::new(address, SERVER_PORT).into();
    let (code, said) = probe::connect_with(
        in_bench(cgroups, who)?,
        target,
        false,
        Duration::from_millis(1000),
    )?;
    match (allowed, code) {
        (true, probe::CONNECTED) | (false, probe::REFUSED_EPERM) => {
            let verdict = if allowed { "connects" } else { "is refused" };
            println!("{who} to {target} {verdict} ({why})");
            Ok(())
        }
        (true, _) => bail!("{who} cannot reach {target}, which should connect ({why}): {said}"),
        (false, _) => bail!("{who} to {target} should be refused by ward ({why}): {said}"),
    }
}

/// Runs the DNS client loop for `lookup` and returns what it measured.
fn measure_lookups(
    cgroups: &CgroupTree,
    lookup: Lookup,
    transport: DnsTransport,
    seconds: f64,
    cpu: Option<usize>,
) -> Result<Lookups> {
    let label = lookup.label();
    print!("{label:<24} {transport} measuring {seconds} s ... ");
    std::io::stdout().flush()?;
    let mut children = Children::default();
    let mut cmd = in_bench(cgroups, lookup.cgroup())?;
    cmd.args(dns_client_args(transport))
        .args(["--seconds", &seconds.to_string()])
        .stdout(Stdio::piped());
    if let Some(cpu) = cpu {
        pin(&mut cmd, cpu);
    }
    let report = bench::report_line(&mut children, &mut cmd, seconds)
        .with_context(|| format!("{label}, {transport}: the DNS client"))?;
    let m = parse_lookups(&report)
        .with_context(|| format!("{label}, {transport}: the DNS client said {report:?}"))?;
    println!(
        "{:.0} queries/s, p50 {:.1} µs, p99 {:.1} µs, max {:.0} µs",
        m.queries_per_sec, m.p50_us, m.p99_us, m.max_us
    );
    if m.lost > 0 {
        println!(
            "warning: {} queries had no answer within {QUERY_TIMEOUT:?}",
            m.lost
        );
    }
    Ok(m)
}

/// The proxy's count of forwarded queries must not move for a workload that is not redirected,
/// and must count every query answered to one that is.
fn check_proxy_forwarded(
    lookup: Lookup,
    transport: DnsTransport,
    m: &Lookups,
    forwarded: u64,
) -> Result<()> {
    let label = lookup.label();
    match lookup {
        Lookup::WardDirect if forwarded > 0 => {
            bail!(
                "{label}, {transport}: the proxy forwarded {forwarded} queries of a workload \
                 whose policy names no DNS name"
            )
        }
        Lookup::WardProxy if forwarded < m.total => bail!(
            "{label}, {transport}: {} queries answered but the proxy forwarded {forwarded}: \
             some went around it",
            m.total
        ),
        _ => Ok(()),
    }
}

fn measure_connects(cgroups: &CgroupTree, reach: Reach, seconds: f64) -> Result<Measurement> {
    let label = reach.label();
    print!("{label:<24} tcp4 measuring {seconds} s ... ");
    std::io::stdout().flush()?;
    bench::run_client(
        in_bench(cgroups, "client")?,
        reach.target(),
        Transport::Tcp4,
        seconds,
        label,
    )
}

/// Two CPUs this process may run on: one for the DNS client, one for the resolver. Apart, every
/// query crosses CPUs, as it does to a resolver elsewhere; left to the scheduler, whether the two
/// happen to share a CPU decides the direct latency (25 against 57 µs on a 2-CPU VM).
fn two_cpus() -> Option<(usize, usize)> {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: a zeroed cpu_set_t is an empty set, which sched_getaffinity fills (`size` bytes at
    // most); CPU_ISSET reads indices below CPU_SETSIZE, the set's capacity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size, &mut set) != 0 {
            return None;
        }
        let mut cpus = (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set));
        Some((cpus.next()?, cpus.next()?))
    }
}

/// Makes `cmd` run on `cpu` (one of this process's, from [`two_cpus`]) only.
fn pin(cmd: &mut Command, cpu: usize) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: a zeroed cpu_set_t is an empty set; `cpu` is below CPU_SETSIZE.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        set
    };
    // SAFETY: the closure runs between fork and exec and makes one async-signal-safe system call
    // with a set it owns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The first port from `from` (0: any) that nothing on this node's loopback holds, in TCP or UDP.
fn free_port(from: u16) -> Result<u16> {
    let free = |port: u16| -> Option<u16> {
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).ok()?;
        let port = tcp.local_addr().ok()?.port();
        UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).ok()?;
        Some(port)
    };
    if from == 0 {
        return (0..10)
            .find_map(|_| free(0))
            .context("no free loopback port");
    }
    (from..from.saturating_add(100))
        .find_map(free)
        .with_context(|| format!("ports {from} to {} are all taken on loopback", from + 99))
}

/// `ward_dns_queries_total{result="forwarded"}` from the agent's metrics endpoint.
fn proxy_forwarded(metrics: SocketAddr) -> Result<u64> {
    let mut stream = TcpStream::connect_timeout(&metrics, Duration::from_secs(2))
        .with_context(|| format!("connecting to ward's metrics at {metrics}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: ward\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(forwarded_count(&text))
}

fn forwarded_count(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(r#"ward_dns_queries_total{result="forwarded"} "#)?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Removes ward's pins under the bench's pinDir: what an interrupted run left before the agent
/// starts, and on drop what an agent that did not stop cleanly left.
struct Pins(PathBuf);

impl Pins {
    fn clear(dir: PathBuf) -> Result<Self> {
        if dir.exists() {
            println!("removing {} left by an earlier run", dir.display());
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(Self(dir))
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if self.0.exists() {
            match fs::remove_dir_all(&self.0) {
                Ok(()) => println!("removed {}", self.0.display()),
                Err(e) => eprintln!("warning: removing {}: {e}", self.0.display()),
            }
        }
    }
}

/// The agent's configuration: the client workload (its policy names [`NAME`]) and the direct
/// one (its policy names no DNS name); the server is in a cgroup no workload maps.
fn ward_config(proxy_port: u16, metrics: SocketAddr) -> String {
    format!(
        "trustDomain: bench.example.org\n\
         cgroupRoot: {CGROUP_ROOT}\n\
         pinDir: /sys/fs/bpf/{CGROUP_ROOT}\n\
         policies: [policy.yaml]\n\
         hostAddresses: auto\n\
         metricsAddress: {metrics}\n\
         dns:\n\
         \x20 proxyPort: {proxy_port}\n\
         \x20 minTtlSeconds: {MIN_TTL_SECONDS}\n\
         workloads:\n\
         \x20 - name: bench-client\n\
         \x20   labels: {{app: bench-client}}\n\
         \x20   cgroups: [client]\n\
         \x20 - name: bench-direct\n\
         \x20   labels: {{app: bench-direct}}\n\
         \x20   cgroups: [direct]\n"
    )
}

/// Both workloads may ask the resolver and reach the CIDR-allowed address; the client may also
/// reach what [`NAME`] resolves to.
const POLICY: &str = "apiVersion: ward.dev/v1
kind: Policy
metadata: {name: bench-client-egress}
spec:
  selector: {labels: {app: bench-client}}
  egress:
    - name: dns
      to: [{cidr: 10.98.0.2/32}]
      ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]
    - name: api
      to: [{fqdn: api.bench.example}]
      ports: [{port: 18080}]
    - name: cidr
      to: [{cidr: 10.98.0.4/32}]
      ports: [{port: 18080}]
---
apiVersion: ward.dev/v1
kind: Policy
metadata: {name: bench-direct-egress}
spec:
  selector: {labels: {app: bench-direct}}
  egress:
    - name: dns
      to: [{cidr: 10.98.0.2/32}]
      ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]
    - name: cidr
      to: [{cidr: 10.98.0.4/32}]
      ports: [{port: 18080}]
";

fn median_lookups(runs: &[Lookups]) -> Lookups {
    let mid = |f: fn(&Lookups) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Lookups {
        queries_per_sec: mid(|m| m.queries_per_sec),
        p50_us: mid(|m| m.p50_us),
        p99_us: mid(|m| m.p99_us),
        max_us: mid(|m| m.max_us),
        lost: runs.iter().map(|m| m.lost).sum(),
        total: runs.iter().map(|m| m.total).sum(),
    }
}

/// The DNS table: a "no programs" row is the baseline of the rows of its transport after it.
fn lookup_table(rows: &[DnsRow]) -> String {
    let width = rows
        .iter()
        .map(|r| r.lookup.label().chars().count())
        .max()
        .unwrap_or(0);
    let mut out = format!(
        "{:<9}  {:<width$} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>5}\n",
        "transport",
        "variant",
        "queries/s",
        "p50 µs",
        "p99 µs",
        "max µs",
        "Δ q/s",
        "Δ p50",
        "Δ p99",
        "lost"
    );
    let mut base: Option<&Lookups> = None;
    for row in rows {
        if row.lookup == Lookup::Baseline {
            base = Some(&row.m);
        }
        let (d_rate, d_p50, d_p99) = match base {
            Some(b) if row.lookup != Lookup::Baseline => (
                format!(
                    "{:+.1}%",
                    (row.m.queries_per_sec / b.queries_per_sec - 1.0) * 100.0
                ),
                format!("{:+.1}", row.m.p50_us - b.p50_us),
                format!("{:+.1}", row.m.p99_us - b.p99_us),
            ),
            _ => ("-".into(), "-".into(), "-".into()),
        };
        let m = &row.m;
        let _ = writeln!(
            out,
            "{:<9}  {:<width$} {:>9.0} {:>8.1} {:>8.1} {:>8.0} {d_rate:>9} {d_p50:>8} {d_p99:>8} {:>5}",
            row.transport.to_string(),
            row.lookup.label(),
            m.queries_per_sec,
            m.p50_us,
            m.p99_us,
            m.max_us,
            m.lost
        );
    }
    out
}

fn parse_lookups(line: &str) -> Result<Lookups> {
    let field = bench::report_fields(line, "a query")?;
    Ok(Lookups {
        queries_per_sec: field("queries")? / field("seconds")?,
        p50_us: field("p50_ns")? / 1000.0,
        p99_us: field("p99_ns")? / 1000.0,
        max_us: field("max_ns")? / 1000.0,
        lost: field("lost")? as u64,
        total: field("total")? as u64,
    })
}

/// `cargo xtask bench dns-client`: one query (prints the answer's addresses; fails on no right
/// answer), or with `--seconds` queries in a loop after a short warm-up, one at a time, printing
/// one line: `queries=N seconds=S p50_ns=X p99_ns=Y max_ns=M lost=L total=T` (L: queries with no
/// answer within 1 s; T: answered, warm-up included) or `error=...` at the first wrong answer or
/// failed query.
pub fn client(args: &ClientArgs) -> Result<()> {
    let question = Question::new(&args.name)?;
    let mut asker = Asker {
        resolver: args.resolver,
        tcp: args.tcp,
        question,
        buf: vec![0u8; 65_535],
        next_id: std::process::id() as u16,
    };
    let Some(seconds) = args.seconds else {
        let (took, answer) = asker.ask(Duration::from_secs(2))?;
        let addresses = answer_addresses(&answer, args.expect)?;
        println!(
            "answered in {:.0} µs: {addresses}",
            took.as_secs_f64() * 1e6
        );
        return Ok(());
    };
    let warm_up = Instant::now() + Duration::from_secs_f64((seconds / 10.0).min(0.5));
    let end = warm_up + Duration::from_secs_f64(seconds);
    let mut latencies = Vec::with_capacity(1 << 20);
    let (mut measuring_since, mut lost, mut total) = (None, 0u64, 0u64);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now >= warm_up && measuring_since.is_none() {
            measuring_since = Some(now);
        }
        match asker.ask(QUERY_TIMEOUT) {
            Ok((took, answer)) => {
                if let Err(e) = answer_addresses(&answer, args.expect) {
                    println!("error={e:#}");
                    return Ok(());
                }
                total += 1;
                if measuring_since.is_some() {
                    latencies.push(took.as_nanos() as u64);
                }
            }
            Err(e) if is_timeout(&e) => lost += 1,
            Err(e) => {
                println!("error={e:#}");
                return Ok(());
            }
        }
    }
    let elapsed = measuring_since.map_or(0.0, |s| s.elapsed().as_secs_f64());
    latencies.sort_unstable();
    let pct = |p: usize| stats::percentile_of_sorted(&latencies, p);
    println!(
        "queries={} seconds={elapsed:.3} p50_ns={} p99_ns={} max_ns={} lost={lost} total={total}",
        latencies.len(),
        pct(50),
        pct(99),
        latencies.last().copied().unwrap_or(0)
    );
    Ok(())
}

fn is_timeout(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|e| {
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    })
}

/// An A query for one name, encoded once; each query gets its own id.
struct Question(Vec<u8>);

impl Question {
    fn new(name: &str) -> Result<Self> {
        let name = Name::from_str(name).with_context(|| format!("the name {name:?}"))?;
        let mut message = Message::query();
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(name, RecordType::A));
        Ok(Self(message.to_vec().context("encoding the query")?))
    }

    fn with_id(&mut self, id: u16) -> &[u8] {
        self.0[..2].copy_from_slice(&id.to_be_bytes());
        &self.0
    }
}

struct Asker {
    resolver: SocketAddr,
    tcp: bool,
    question: Question,
    buf: Vec<u8>,
    next_id: u16,
}

impl Asker {
    /// One query on a new socket (UDP: not bound, connected, as glibc asks; TCP: a new
    /// connection, the message after its two-byte length), timed from the socket's creation to
    /// the whole answer. Returns the answer, checked to answer this query.
    fn ask(&mut self, timeout: Duration) -> Result<(Duration, Message)> {
        use socket2::{Domain, Protocol, Socket, Type};
        self.next_id = self.next_id.wrapping_mul(31_421).wrapping_add(6_927);
        let id = self.next_id;
        let domain = Domain::for_address(self.resolver);
        let start = Instant::now();
        let len = if self.tcp {
            let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
            socket.connect_timeout(&self.resolver.into(), timeout)?;
            // RST on close: no TIME_WAIT socket per query, so a long loop keeps its ports.
            socket.set_linger(Some(Duration::ZERO))?;
            let mut stream = TcpStream::from(socket);
            stream.set_read_timeout(Some(timeout))?;
            let query = self.question.with_id(id);
            let mut framed = Vec::with_capacity(query.len() + 2);
            framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
            framed.extend_from_slice(query);
            stream.write_all(&framed)?;
            let mut len = [0u8; 2];
            stream.read_exact(&mut len)?;
            let len = usize::from(u16::from_be_bytes(len));
            stream.read_exact(&mut self.buf[..len])?;
            len
        } else {
            let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
            socket.connect(&self.resolver.into())?;
            let socket = UdpSocket::from(socket);
            socket.set_read_timeout(Some(timeout))?;
            socket.send(self.question.with_id(id))?;
            socket.recv(&mut self.buf)?
        };
        let took = start.elapsed();
        let answer =
            Message::from_vec(&self.buf[..len]).context("an answer that cannot be read")?;
        if answer.metadata.id != id || answer.metadata.message_type != MessageType::Response {
            bail!(
                "the answer is not to this query (id {}, asked {id})",
                answer.metadata.id
            );
        }
        Ok((took, answer))
    }
}

/// The answer's A records, which must hold `expect`.
fn answer_addresses(answer: &Message, expect: Ipv4Addr) -> Result<String> {
    if answer.metadata.response_code != ResponseCode::NoError {
        bail!("the resolver answered {}", answer.metadata.response_code);
    }
    let addresses: Vec<IpAddr> = answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect();
    if !addresses.contains(&IpAddr::V4(expect)) {
        bail!("the answer holds {addresses:?}, not {expect}");
    }
    Ok(addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_names_the_proxy_port_and_both_workloads() {
        let y = ward_config(15054, "127.0.0.1:40000".parse().unwrap());
        assert!(
            y.contains("dns:\n  proxyPort: 15054\n  minTtlSeconds: 3600\n"),
            "{y}"
        );
        assert!(y.contains("metricsAddress: 127.0.0.1:40000\n"), "{y}");
        assert!(
            y.contains("cgroups: [client]") && y.contains("cgroups: [direct]"),
            "{y}"
        );
        assert!(
            !y.contains("server"),
            "the server must be in no workload: {y}"
        );
    }

    #[test]
    fn only_the_client_policy_names_the_name_and_addresses_match_the_namespace() {
        let (client, direct) = POLICY.split_once("---\n").unwrap();
        assert!(client.contains(&format!("fqdn: {NAME}")));
        assert!(!direct.contains("fqdn"));
        for policy in [client, direct] {
            assert!(policy.contains(&format!("cidr: {RESOLVER}/32")), "{policy}");
            assert!(
                policy.contains(&format!("cidr: {CIDR_ALLOWED}/32")),
                "{policy}"
            );
            assert!(policy.contains(&format!("port: {SERVER_PORT}")), "{policy}");
            assert!(
                !policy.contains(&LEARNED.to_string()) && !policy.contains(&UNLISTED.to_string())
            );
        }
        let batch = netns_batch();
        for address in [RESOLVER, LEARNED, CIDR_ALLOWED, UNLISTED] {
            assert!(
                batch.contains(&format!("addr add {address}/32 dev dns0")),
                "{batch}"
            );
        }
    }

    #[test]
    fn a_question_asks_for_a_records_with_the_id_given() {
        let mut q = Question::new(NAME).unwrap();
        let m = Message::from_vec(q.with_id(0xbeef)).unwrap();
        assert_eq!(m.metadata.id, 0xbeef);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.queries[0].query_type(), RecordType::A);
        assert_eq!(m.queries[0].name().to_ascii(), "api.bench.example.");
    }

    #[test]
    fn answers_must_hold_the_expected_address() {
        use hickory_proto::{
            op::OpCode,
            rr::{rdata::A, Record},
        };
        let answer = |code, addr: Ipv4Addr| {
            let mut m = Message::response(7, OpCode::Query);
            m.metadata.response_code = code;
            m.add_answer(Record::from_rdata(
                Name::from_str(NAME).unwrap(),
                300,
                RData::A(A(addr)),
            ));
            m
        };
        assert_eq!(
            answer_addresses(&answer(ResponseCode::NoError, LEARNED), LEARNED).unwrap(),
            "10.98.0.3"
        );
        let wrong =
            answer_addresses(&answer(ResponseCode::NoError, UNLISTED), LEARNED).unwrap_err();
        assert!(wrong.to_string().contains("not 10.98.0.3"), "{wrong}");
        let refused =
            answer_addresses(&answer(ResponseCode::Refused, LEARNED), LEARNED).unwrap_err();
        assert!(refused.to_string().contains("Refused"), "{refused}");
    }

    #[test]
    fn client_reports_parse_and_rounds_take_medians() {
        let m = parse_lookups(
            "queries=1000 seconds=0.5 p50_ns=40000 p99_ns=90000 max_ns=400000 lost=1 total=1100\n",
        )
        .unwrap();
        assert_eq!(
            (m.queries_per_sec, m.p50_us, m.p99_us, m.max_us),
            (2000.0, 40.0, 90.0, 400.0)
        );
        assert_eq!((m.lost, m.total), (1, 1100));
        assert!(parse_lookups("error=the resolver answered REFUSED").is_err());
        let with = |rate, lost| Lookups {
            queries_per_sec: rate,
            lost,
            ..m.clone()
        };
        let med = median_lookups(&[with(3.0, 0), with(1.0, 2), with(2.0, 1)]);
        assert_eq!((med.queries_per_sec, med.lost, med.total), (2.0, 3, 3300));
    }

    #[test]
    fn the_dns_table_compares_each_transport_with_its_own_baseline() {
        let m = |rate: f64, p50: f64| Lookups {
            queries_per_sec: rate,
            p50_us: p50,
            p99_us: p50 * 2.0,
            max_us: p50 * 10.0,
            lost: 0,
            total: 1,
        };
        let rows = [
            (DnsTransport::Udp, Lookup::Baseline, m(20_000.0, 50.0)),
            (DnsTransport::Udp, Lookup::WardProxy, m(10_000.0, 100.0)),
            (DnsTransport::Tcp, Lookup::Baseline, m(5_000.0, 200.0)),
            (DnsTransport::Tcp, Lookup::WardProxy, m(4_000.0, 250.0)),
        ]
        .map(|(transport, lookup, m)| DnsRow {
            transport,
            lookup,
            m,
        });
        let table = lookup_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].contains("queries/s") && lines[0].contains("Δ p50"),
            "{table}"
        );
        assert!(
            lines[2].contains("-50.0%")
                && lines[2].contains("+50.0")
                && lines[2].contains("+100.0"),
            "{table}"
        );
        assert!(
            lines[4].contains("-20.0%") && lines[4].contains("+50.0"),
            "{table}"
        );
    }

    #[test]
    fn the_forwarded_count_is_read_from_the_metrics() {
        let text =
            "# TYPE ward_dns_queries counter\nward_dns_queries_total{result=\"refused\"} 2\n\
                    ward_dns_queries_total{result=\"forwarded\"} 1234\n";
        assert_eq!(forwarded_count(text), 1234);
        assert_eq!(forwarded_count("ward_policy_generation 3\n"), 0);
    }
}
