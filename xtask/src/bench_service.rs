//! `cargo xtask bench service`: connections per second and connect latency to a Service's
//! cluster IP translated by ward (at `connect()`/`sendmsg()`), against the same client reaching a
//! backend's pod IP with no programs attached and with ward, and against kube-proxy-style
//! nftables DNAT of the cluster IP (no ward), at each number of backends, interleaved in one run.
//!
//! Everything happens in a network namespace of its own: an interface holds the backends'
//! addresses (10.97.x.y/32) and a route sends 10.96.0.0/16 (the cluster IP) to it, where an
//! untranslated packet goes nowhere. One server in the "server" workload cgroup listens on
//! 0.0.0.0 and so answers on every backend address; the client runs in the "client" workload
//! cgroup. The client loop, the server, the agent and the table are `bench connect`'s.

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    bench::{self, median, per_connection, prog_stats, BpfStats, Measurement, Row},
    loopback::{self, Transport, DENIED_PORT, SERVER_PORT},
    probe, setup,
    sys::{self, heading, CgroupTree, Children},
    ward::{self, Ward},
};

const NETNS: &str = "ward-bench-svc";
const CGROUP_ROOT: &str = "ward-bench-svc";
const NFT_TABLE: &str = "ward_bench_svc";
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// The Service port the backends serve on [`SERVER_PORT`], which the client may reach.
const SERVICE_PORT: u16 = 80;
/// A Service port whose backend port ([`DENIED_PORT`]) the client's policy does not allow.
const DENIED_SERVICE_PORT: u16 = 81;
/// Backends of one Service port that ward takes (`agent_common::MAX_SERVICE_BACKENDS`).
const MAX_BACKENDS: usize = 4096;

#[derive(clap::Args)]
pub struct ServiceArgs {
    /// Measuring time per variant, transport, backend count and round.
    #[arg(long, default_value = "5")]
    seconds: f64,
    /// Backends of the Service, comma separated; one table each.
    #[arg(long, value_delimiter = ',', default_value = "10,1000")]
    backends: Vec<usize>,
    /// Transports, comma separated: tcp4, udp4 (a new socket per exchange of one datagram and
    /// its echo). IPv4 only.
    #[arg(long, value_delimiter = ',', default_value = "tcp4,udp4")]
    transports: Vec<Transport>,
    #[command(flatten)]
    run: bench::RoundArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// Nothing attached, the client connects to a backend's address.
    Baseline,
    WardPodIp,
    WardClusterIp,
    NftDnat,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Self::Baseline => "no programs, pod IP",
            Self::WardPodIp => "ward, pod IP",
            Self::WardClusterIp => "ward, cluster IP",
            Self::NftDnat => "nftables DNAT, cluster IP",
        }
    }

    fn is_ward(self) -> bool {
        matches!(self, Self::WardPodIp | Self::WardClusterIp)
    }

    /// Where the client connects.
    fn target(self) -> SocketAddr {
        match self {
            Self::Baseline | Self::WardPodIp => SocketAddrV4::new(backend(0), SERVER_PORT),
            Self::WardClusterIp | Self::NftDnat => SocketAddrV4::new(CLUSTER_IP, SERVICE_PORT),
        }
        .into()
    }
}

/// Backend `i`'s address.
fn backend(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 97, (i / 200) as u8, (i % 200 + 1) as u8)
}

pub fn run(args: &ServiceArgs) -> Result<()> {
    sys::require_root(
        "bench service",
        "it creates a network namespace and cgroups, loads eBPF programs and nftables",
    )?;
    if args.backends.is_empty()
        || args.transports.is_empty()
        || args.seconds <= 0.0
        || args.run.rounds == 0
    {
        bail!("need at least one backend count, one transport, one round and a positive --seconds");
    }
    if let Some(n) = args.backends.iter().find(|&&n| n == 0 || n > MAX_BACKENDS) {
        bail!("--backends {n}: a Service port holds 1 to {MAX_BACKENDS} backends");
    }
    if args.transports.contains(&Transport::Tcp6) {
        bail!("bench service measures IPv4 only (tcp4, udp4)");
    }
    let seconds = args.seconds;
    setup::run()?;
    sys::output(Command::new("nft").arg("--version"))
        .context("nft is needed (`cargo xtask setup` installs it)")?;
    let ward_bin = ward::binary()?;
    let work = args.run.work_dir("ward-bench-service")?;

    heading("network namespace and workloads");
    let most = args.backends.iter().copied().max().unwrap_or(1);
    let _netns = Netns::create(most, &work)?;
    let mount = sys::cgroup2_mount()?;
    let cgroups = CgroupTree::create(&mount, CGROUP_ROOT, &["client", "server"])?;
    fs::write(work.join("policy.yaml"), POLICY)?;

    let mut rows = Vec::new();
    let mut kernel_time = Vec::new();
    let _stats = args.run.bpf_stats.then(BpfStats::enable).transpose()?;
    for &n in &args.backends {
        let config = work.join(format!("ward-{n}.yaml"));
        fs::write(&config, ward_config(n))?;
        let nft_file = work.join(format!("dnat-{n}.nft"));
        fs::write(&nft_file, nft_dnat(n))?;
        for &transport in &args.transports {
            heading(&format!("{transport}, {n} backends"));
            let mut runs: [Vec<Measurement>; 4] = Default::default();
            for round in 1..=args.run.rounds {
                println!("round {round} of {}", args.run.rounds);
                let last = round == args.run.rounds;
                runs[0].push(measure(&cgroups, Variant::Baseline, transport, seconds)?);

                let log = work.join(format!("ward-{transport}-{n}.log"));
                let mut agent = Ward::start(&ward_bin, &config, &log)?;
                agent.wait_ready(Duration::from_secs(300))?;
                for (i, variant) in [(1, Variant::WardPodIp), (2, Variant::WardClusterIp)] {
                    let before = prog_stats(agent.pid());
                    let m = measure(&cgroups, variant, transport, seconds)?;
                    if args.run.bpf_stats && last {
                        let after = prog_stats(agent.pid());
                        let per_conn = per_connection(&before, &after, m.total_conns);
                        println!("kernel programs per connection: {per_conn}");
                        kernel_time.push((transport, n, variant.label(), per_conn));
                    }
                    runs[i].push(m);
                }
                if let Some(status) = agent.stop()? {
                    println!("{} exited ({status})", ward_bin.display());
                }

                let dnat = Dnat::load(&nft_file)?;
                let m = measure(&cgroups, Variant::NftDnat, transport, seconds);
                dnat.delete()?;
                runs[3].push(m?);
            }
            let variants = [
                Variant::Baseline,
                Variant::WardPodIp,
                Variant::WardClusterIp,
                Variant::NftDnat,
            ];
            for (variant, runs) in variants.into_iter().zip(&runs) {
                rows.push(Row {
                    transport,
                    size: n,
                    variant: variant.label(),
                    entries: None,
                    m: median(runs),
                });
            }
        }
    }
    drop(cgroups);

    heading(&format!(
        "results (median of {} rounds of {seconds} s)",
        args.run.rounds
    ));
    for &n in &args.backends {
        let of_n: Vec<Row> = rows.iter().filter(|r| r.size == n).cloned().collect();
        println!("\n{n} backends:");
        print!("{}", bench::table(&of_n, "backends"));
    }
    println!(
        "\npod IP: {} directly; cluster IP: {CLUSTER_IP}:{SERVICE_PORT}, the Service's port to \
         the backends' {SERVER_PORT} (ward: translated at connect()/sendmsg(); nftables: DNAT in \
         an output nat chain, a random backend by numgen as kube-proxy's nftables mode). \
         ward isolates the client's egress (the server workload, which owns every backend \
         address, on {SERVER_PORT}).\nconns/s and p50/p99: TCP connect() (handshake) on a new \
         socket; UDP: a new socket binds, connects, sends one datagram and receives the echo.\n\
         slow: connects that waited for a SYN retransmit (>= 100 ms); Δ: against no programs, \
         pod IP at the same transport and backend count",
        Variant::Baseline.target()
    );
    if !kernel_time.is_empty() {
        println!("\nward's kernel programs per connection (runs x ns per run), last round:");
        for (transport, n, variant, per_conn) in &kernel_time {
            println!("  {transport} {n:>5} backends, {variant:<16}: {per_conn}");
        }
    }
    println!("\nconfigurations, rulesets and logs: {}", work.display());
    Ok(())
}

/// xtask in the `who` workload cgroup and the benchmark's network namespace.
fn xtask_at(cgroups: &CgroupTree, who: &str) -> Result<Command> {
    let mut cmd = sys::xtask_in_cgroup(&cgroups.path(who))?;
    sys::enter_netns(&mut cmd, NETNS)?;
    Ok(cmd)
}

/// Starts the server (after the variant is in force), shows that the variant works and, for
/// ward, that it enforces, then runs the client loop.
fn measure(
    cgroups: &CgroupTree,
    variant: Variant,
    transport: Transport,
    seconds: f64,
) -> Result<Measurement> {
    let label = variant.label();
    let udp = transport.is_udp();
    let listen = if udp { "--udp" } else { "--listen" };
    let mut children = Children::default();
    let mut server = xtask_at(cgroups, "server")?;
    server.args(["serve", listen, &format!("0.0.0.0:{SERVER_PORT}")]);
    server.args([listen, &format!("0.0.0.0:{DENIED_PORT}")]);
    probe::start_listener(&mut children, &mut server, "the benchmark server")?;

    let attempt = |addr: SocketAddr, timeout_ms: u64| -> Result<(bool, String)> {
        let (code, said) = probe::connect_with(
            xtask_at(cgroups, "client")?,
            addr,
            udp,
            Duration::from_millis(timeout_ms),
        )?;
        Ok((code == probe::CONNECTED, said))
    };
    let target = variant.target();
    let (works, said) = attempt(target, 2000)?;
    if !works {
        bail!("{transport}, {label}: the client cannot reach {target}: {said}");
    }
    let denied_pod: SocketAddr = SocketAddrV4::new(backend(0), DENIED_PORT).into();
    let denied_service: SocketAddr = SocketAddrV4::new(CLUSTER_IP, DENIED_SERVICE_PORT).into();
    match variant {
        Variant::Baseline => {
            // Nothing enforces, and nothing translates: the cluster IP leads nowhere.
            let (passed, said) = attempt(denied_pod, 500)?;
            if !passed {
                bail!("{transport}: with no programs attached the client cannot reach {denied_pod}: {said}");
            }
            let (passed, said) = attempt(Variant::WardClusterIp.target(), 300)?;
            if passed {
                bail!(
                    "{transport}: with no programs attached {} answered ({said}): the bench's \
                     namespace is not as it should be",
                    Variant::WardClusterIp.target()
                );
            }
        }
        _ if variant.is_ward() => {
            for denied in [denied_pod, denied_service] {
                let (passed, _) = attempt(denied, 500)?;
                if passed {
                    bail!("{transport}, {label}: the client reached {denied}, which its policy does not allow: ward is not enforcing");
                }
            }
        }
        _ => {}
    }

    print!("{label:<25} {transport} measuring {seconds} s ... ");
    bench::run_client(
        xtask_at(cgroups, "client")?,
        target,
        transport,
        seconds,
        label,
    )
}

/// The client may reach the server workload (every backend address) on the backends' port, in
/// either protocol; nothing else.
const POLICY: &str = "apiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: bench-client-egress\n\
spec:\n  selector:\n    labels: {app: bench-client}\n  egress:\n    - name: to-server\n      \
to: [{labels: {app: bench-server}}]\n      ports: [{port: 18080, protocol: TCP}, {port: 18080, protocol: UDP}]\n";

/// The agent's configuration with `n` backends: both workloads (the server owns every backend
/// address) and the Service `bench/db` on both protocols.
fn ward_config(n: usize) -> String {
    let addresses: Vec<String> = (0..n).map(|i| backend(i).to_string()).collect();
    let backends: Vec<String> = (0..n)
        .map(|i| format!("\"{}:{SERVER_PORT}\"", backend(i)))
        .collect();
    let backends = backends.join(", ");
    let denied = format!("\"{}:{DENIED_PORT}\"", backend(0));
    // `bench connect`'s configuration, the server workload last: its addresses follow.
    let mut y = loopback::ward_config(CGROUP_ROOT, "policy.yaml");
    let _ = write!(
        y,
        "\x20   addresses: [{}]\n\
         services:\n\
         \x20 - name: db\n\
         \x20   namespace: bench\n\
         \x20   clusterIPs: [{CLUSTER_IP}]\n\
         \x20   ports:\n",
        addresses.join(", ")
    );
    for protocol in ["TCP", "UDP"] {
        let lower = protocol.to_lowercase();
        let _ = writeln!(
            y,
            "      - {{name: http-{lower}, port: {SERVICE_PORT}, protocol: {protocol}, backends: [{backends}]}}"
        );
        let _ = writeln!(
            y,
            "      - {{name: denied-{lower}, port: {DENIED_SERVICE_PORT}, protocol: {protocol}, backends: [{denied}]}}"
        );
    }
    y
}

/// kube-proxy's nftables mode for the same Service, `n` backends: the output nat chain jumps to
/// `services`, a verdict map by (address, protocol, port) sends the cluster IP to the Service's
/// chain, which picks an endpoint chain with `numgen random mod n vmap`; each endpoint chain
/// DNATs to its backend. kube-proxy's masquerade marks (for traffic from outside the cluster or a
/// pod reaching itself) and its filter chains (reject without endpoints, firewall) are left
/// out: they do not apply to this client.
fn nft_dnat(n: usize) -> String {
    let mut t = format!("table ip {NFT_TABLE} {{\n");
    for proto in ["tcp", "udp"] {
        for i in 0..n {
            let _ = writeln!(
                t,
                "  chain endpoint-{proto}-{i} {{\n    meta l4proto {proto} dnat to {}:{SERVER_PORT}\n  }}",
                backend(i)
            );
        }
        let endpoints: Vec<String> = (0..n)
            .map(|i| format!("{i} : goto endpoint-{proto}-{i}"))
            .collect();
        let _ = writeln!(
            t,
            "  chain service-bench-db-{proto} {{\n    numgen random mod {n} vmap {{ {} }}\n  }}",
            endpoints.join(", ")
        );
    }
    let _ = write!(
        t,
        "  map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    \
         elements = {{ {CLUSTER_IP} . tcp . {SERVICE_PORT} : goto service-bench-db-tcp, \
         {CLUSTER_IP} . udp . {SERVICE_PORT} : goto service-bench-db-udp }}\n  }}\n  \
         chain services {{\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }}\n  \
         chain nat-output {{\n    type nat hook output priority -100; policy accept;\n    \
         jump services\n  }}\n}}\n"
    );
    t
}

/// The benchmark's network namespace, deleted on drop (with its interfaces and nftables).
struct Netns;

impl Netns {
    /// `lo` up; `svc0` (a veth pair with `svc1`) with the addresses of `backends` backends;
    /// 10.96.0.0/16 routed to `svc0`, so a cluster IP nothing translates goes nowhere.
    fn create(backends: usize, work: &Path) -> Result<Self> {
        if Path::new("/run/netns").join(NETNS).exists() {
            println!("removing network namespace {NETNS} left by an earlier run");
            sys::output(Command::new("ip").args(["netns", "del", NETNS]))?;
        }
        sys::run(Command::new("ip").args(["netns", "add", NETNS]))?;
        let netns = Self;
        // A veth pair rather than a dummy interface, which not every kernel has (a pair's other
        // end has no address, so nothing answers for the cluster IP).
        let mut batch = String::from(
            "link set lo up\nlink add svc0 type veth peer name svc1\nlink set svc0 up\n\
             link set svc1 up\nroute add 10.96.0.0/16 dev svc0\n",
        );
        for i in 0..backends {
            let _ = writeln!(batch, "addr add {}/32 dev svc0", backend(i));
        }
        let file = work.join("netns.batch");
        fs::write(&file, batch)?;
        sys::run(Command::new("ip").args(["-n", NETNS, "-batch"]).arg(&file))?;
        println!(
            "{NETNS}: lo, svc0 with {} to {}, 10.96.0.0/16 via svc0",
            backend(0),
            backend(backends - 1)
        );
        Ok(netns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match sys::output(Command::new("ip").args(["netns", "del", NETNS])) {
            Ok(_) => println!("removed network namespace {NETNS}"),
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }
}

/// The nftables DNAT variant's table in the namespace, deleted on drop.
struct Dnat {
    loaded: bool,
}

impl Dnat {
    fn load(rules: &Path) -> Result<Self> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", NETNS, "nft", "-f"]).arg(rules);
        println!("$ {}", sys::show(&cmd));
        sys::output(&mut cmd)?;
        Ok(Self { loaded: true })
    }

    fn delete(mut self) -> Result<()> {
        self.loaded = false;
        sys::output(Command::new("ip").args([
            "netns", "exec", NETNS, "nft", "delete", "table", "ip", NFT_TABLE,
        ]))
        .map(drop)
    }
}

impl Drop for Dnat {
    fn drop(&mut self) {
        if self.loaded {
            let _ = Command::new("ip")
                .args([
                    "netns", "exec", NETNS, "nft", "delete", "table", "ip", NFT_TABLE,
                ])
                .output();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_have_distinct_addresses() {
        let all: std::collections::BTreeSet<Ipv4Addr> = (0..MAX_BACKENDS).map(backend).collect();
        assert_eq!(all.len(), MAX_BACKENDS);
        assert_eq!(backend(0), Ipv4Addr::new(10, 97, 0, 1));
        assert_eq!(backend(200), Ipv4Addr::new(10, 97, 1, 1));
    }

    #[test]
    fn configuration_has_the_service_on_both_protocols() {
        let y = ward_config(3);
        assert!(
            y.contains("addresses: [10.97.0.1, 10.97.0.2, 10.97.0.3]"),
            "{y}"
        );
        assert!(y.contains(
            "{name: http-tcp, port: 80, protocol: TCP, backends: [\"10.97.0.1:18080\", \"10.97.0.2:18080\", \"10.97.0.3:18080\"]}"
        ));
        assert!(y.contains(
            "{name: denied-udp, port: 81, protocol: UDP, backends: [\"10.97.0.1:18081\"]}"
        ));
    }

    #[test]
    fn dnat_picks_one_endpoint_chain_per_backend() {
        let t = nft_dnat(3);
        assert!(t.contains("numgen random mod 3 vmap { 0 : goto endpoint-tcp-0, 1 : goto endpoint-tcp-1, 2 : goto endpoint-tcp-2 }"));
        assert!(t.contains("meta l4proto udp dnat to 10.97.0.3:18080"));
        assert!(t.contains("10.96.0.20 . tcp . 80 : goto service-bench-db-tcp"));
        assert_eq!(t.matches("chain endpoint-").count(), 6);
    }
}
