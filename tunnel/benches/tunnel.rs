//! `cargo xtask bench tunnel` (or `cargo bench -p ward-tunnel --bench tunnel`): plain TCP against
//! the mTLS tunnel on loopback, measured in one run. The two agents (outbound and inbound) run as
//! child processes of this binary, so that their RSS and CPU time are their own; the workloads
//! (load generator, echo and sink servers) run in this process.
//!
//! Options: `--seconds S` (per timed phase, default 3), `--connections N` (concurrent tunneled
//! connections for the RSS/CPU phase, default 1000), `--bytes MIB` (throughput, default 512).
use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};

use ward_tunnel::load::*;
use ward_tunnel::{
    test_helpers::TestCa, Authorizer, Denied, Inbound, InboundConfig, OriginalDestinations,
    Outbound, OutboundConfig, OutboundRequest, SpiffeId, Svid, SvidStore, TrustStore,
};

const TRUST_DOMAIN: &str = "bench.example";
const CLIENT: &str = "spiffe://bench.example/ns/bench/sa/client";
const SERVER: &str = "spiffe://bench.example/ns/bench/sa/server";

struct Options {
    seconds: f64,
    connections: usize,
    mib: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("agent") {
        return agent(&args[1..]);
    }
    let mut options = Options {
        seconds: 3.0,
        connections: 1000,
        mib: 512,
    };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let mut value = |name: &str| {
            rest.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
                .clone()
        };
        match arg.as_str() {
            "--seconds" => options.seconds = value(arg).parse().expect("--seconds: a number"),
            "--connections" => {
                options.connections = value(arg).parse().expect("--connections: a count")
            }
            "--bytes" => options.mib = value(arg).parse().expect("--bytes: MiB"),
            // What cargo bench passes to every bench binary.
            "--bench" => {}
            other => panic!("unknown option {other:?}; use --seconds, --connections, --bytes"),
        }
    }
    raise_fd_limit(options.connections * 4 + 256);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run(options));
}

// ---------------------------------------------------------------------------------------------
// The agents (child processes)

/// `agent inbound DIR DEST...` or `agent outbound DIR PEER DEST...`; prints one
/// `listening <dest> <addr>` line per listener, then serves until killed.
fn agent(args: &[String]) {
    let role = args[0].clone();
    let dir = PathBuf::from(&args[1]);
    let rest: Vec<String> = args[2..].to_vec();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async move {
            let read = |name: &str| {
                std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
            };
            let roots = TrustStore::parse_pem_bundle(&read("ca.pem")).expect("bundle");
            let trust = TrustStore::new(TRUST_DOMAIN, &roots).expect("trust");
            let svids = SvidStore::new();
            let addrs = |list: &[String]| -> Vec<SocketAddr> {
                list.iter().map(|a| a.parse().expect("address")).collect()
            };
            match role.as_str() {
                "inbound" => {
                    svids.insert(
                        Svid::from_pem(&read("server.pem"), &read("server-key.pem")).expect("svid"),
                    );
                    let authorizer = Arc::new(LocalWorkloads(addrs(&rest)));
                    let inbound = Inbound::new(svids, trust, authorizer, InboundConfig::default())
                        .expect("inbound");
                    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                    println!("listening inbound {}", listener.local_addr().expect("addr"));
                    inbound.serve(listener).await;
                }
                "outbound" => {
                    svids.insert(
                        Svid::from_pem(&read("client.pem"), &read("client-key.pem")).expect("svid"),
                    );
                    let peer_agent: SocketAddr = rest[0].parse().expect("peer address");
                    let outbound = Outbound::new(svids, trust, OutboundConfig::default());
                    for destination in addrs(&rest[1..]) {
                        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                        println!(
                            "listening {destination} {}",
                            listener.local_addr().expect("addr")
                        );
                        let request = OutboundRequest {
                            source: id(CLIENT),
                            source_identity: 0,
                            destination,
                            destination_id: id(SERVER),
                            peer_agent,
                            rule: 0,
                        };
                        tokio::spawn(outbound.clone().serve(listener, Arc::new(Fixed(request))));
                    }
                    std::future::pending::<()>().await;
                }
                other => panic!("unknown agent role {other}"),
            }
        });
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("SPIFFE ID")
}

struct LocalWorkloads(Vec<SocketAddr>);

impl Authorizer for LocalWorkloads {
    fn local_workload(&self, destination: SocketAddr) -> Option<SpiffeId> {
        self.0.contains(&destination).then(|| id(SERVER))
    }

    fn authorize(
        &self,
        peer: &SpiffeId,
        _: Option<u32>,
        _: &SpiffeId,
        _: SocketAddr,
    ) -> Result<u32, Denied> {
        if peer.as_str() == CLIENT {
            Ok(0)
        } else {
            Err(Denied {
                reason: format!("{peer} is not allowed"),
            })
        }
    }
}

/// Without the kernel's redirect, each outbound listener stands for one original destination.
struct Fixed(OutboundRequest);

impl OriginalDestinations for Fixed {
    fn lookup(&self, _: &TcpStream, _: SocketAddr) -> Result<OutboundRequest, String> {
        Ok(self.0.clone())
    }
}

struct Agent {
    child: Child,
    listening: Vec<(String, SocketAddr)>,
}

impl Agent {
    fn start(dir: &Path, role: &str, args: &[String], listeners: usize) -> Agent {
        let mut child = Command::new(std::env::current_exe().expect("own binary"))
            .arg("agent")
            .arg(role)
            .arg(dir)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start an agent");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut listening = Vec::new();
        while listening.len() < listeners {
            let line = lines
                .next()
                .expect("the agent says where it listens")
                .expect("read");
            let mut words = line.split_whitespace().skip(1);
            let name = words.next().expect("name").to_string();
            let addr = words.next().expect("address").parse().expect("address");
            listening.push((name, addr));
        }
        Agent { child, listening }
    }

    fn addr(&self, name: &str) -> SocketAddr {
        self.listening
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no listener {name}"))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn run(options: Options) {
    let dir = std::env::temp_dir().join(format!("ward-tunnel-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("work dir");
    let ca = TestCa::new(TRUST_DOMAIN);
    let lifetime = Duration::from_secs(3600);
    let client = ca.issue(CLIENT, lifetime);
    let server = ca.issue(SERVER, lifetime);
    for (name, contents) in [
        ("ca.pem", ca.cert_pem()),
        ("client.pem", client.chain_pem.as_str()),
        ("client-key.pem", client.key_pem.as_str()),
        ("server.pem", server.chain_pem.as_str()),
        ("server-key.pem", server.key_pem.as_str()),
    ] {
        std::fs::write(dir.join(name), contents).expect("write PEM");
    }
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    let echo = echo_server(loopback).await;
    let sink = sink_server(loopback).await;
    let destinations = [echo.to_string(), sink.to_string()];
    let inbound = Agent::start(&dir, "inbound", &destinations, 1);
    let mut outbound_args = vec![inbound.addr("inbound").to_string()];
    outbound_args.extend(destinations.iter().cloned());
    let outbound = Agent::start(&dir, "outbound", &outbound_args, 2);
    let (tunnel_echo, tunnel_sink) = (
        outbound.addr(&echo.to_string()),
        outbound.addr(&sink.to_string()),
    );
    let idle_rss = (rss_kib(outbound.pid()), rss_kib(inbound.pid()));
    let secs = options.seconds;
    println!(
        "ward-tunnel bench: loopback, {} s per timed phase, both agents in their own processes \
         (2 tokio workers each), load generator and servers in this one",
        secs
    );

    // Interleaved so that a neighbour's burst of CPU use does not favour one side.
    let plain_latency = latency(echo, secs).await;
    let tunnel_latency = latency(tunnel_echo, secs).await;
    let plain_rate = connection_rate(echo, secs).await;
    let tunnel_rate = connection_rate(tunnel_echo, secs).await;
    let plain_mibs = throughput(sink, options.mib).await;
    let tunnel_mibs = throughput(tunnel_sink, options.mib).await;

    let n = options.connections;
    let conns = open_many(tunnel_echo, n).await;
    let rss = (rss_kib(outbound.pid()), rss_kib(inbound.pid()));
    let cpu_before = (cpu(outbound.pid()), cpu(inbound.pid()));
    let rounds = 10;
    let start = Instant::now();
    let conns = exercise(conns, rounds).await;
    let wall = start.elapsed();
    let cpu_used = (
        cpu(outbound.pid()) - cpu_before.0,
        cpu(inbound.pid()) - cpu_before.1,
    );
    drop(conns);

    let added = |plain: Duration, tunnel: Duration| {
        format!(
            "+{:.1} µs",
            (tunnel.as_secs_f64() - plain.as_secs_f64()) * 1e6
        )
    };
    println!();
    println!(
        "| {:<52} | {:>12} | {:>12} | {:>12} |",
        "measure", "plain TCP", "tunnel", "difference"
    );
    println!("|{:-<54}|{:-<14}|{:-<14}|{:-<14}|", "", "", "", "");
    let row = |name: &str, plain: String, tunnel: String, diff: String| {
        println!("| {name:<52} | {plain:>12} | {tunnel:>12} | {diff:>12} |");
    };
    row(
        &format!(
            "request/response p50 ({MESSAGE} B, {} samples)",
            tunnel_latency.2
        ),
        micros(plain_latency.0),
        micros(tunnel_latency.0),
        added(plain_latency.0, tunnel_latency.0),
    );
    row(
        &format!("request/response p99 ({MESSAGE} B)"),
        micros(plain_latency.1),
        micros(tunnel_latency.1),
        added(plain_latency.1, tunnel_latency.1),
    );
    row(
        &format!("single-stream throughput ({} MiB)", options.mib),
        format!("{plain_mibs:.0} MiB/s"),
        format!("{tunnel_mibs:.0} MiB/s"),
        format!("{:.0} %", tunnel_mibs / plain_mibs * 100.0),
    );
    row(
        "new connections/s (16 clients, 1 round trip each)",
        format!("{plain_rate:.0}"),
        format!("{tunnel_rate:.0}"),
        format!("{:.0} %", tunnel_rate / plain_rate * 100.0),
    );
    let rss_row = |what: &str, (out, inb): (u64, u64)| {
        let mib = |kib: u64| kib as f64 / 1024.0;
        row(
            what,
            "-".into(),
            format!("{:.1} MiB", mib(out + inb)),
            format!("{:.1} + {:.1}", mib(out), mib(inb)),
        );
    };
    rss_row("agent RSS, idle: outbound + inbound", idle_rss);
    rss_row(
        &format!("agent RSS, {n} open tunneled connections: out + in"),
        rss,
    );
    let trips = (n * rounds) as f64;
    row(
        &format!("agent CPU, {n} conns x {rounds} round trips: out + in"),
        "-".into(),
        format!(
            "{:.0} %",
            (cpu_used.0 + cpu_used.1).as_secs_f64() / wall.as_secs_f64() * 100.0
        ),
        format!(
            "{:.1}+{:.1} µs/rt",
            cpu_used.0.as_secs_f64() * 1e6 / trips,
            cpu_used.1.as_secs_f64() * 1e6 / trips
        ),
    );
    println!(
        "\nCPU % is of one core over the {:.2} s the {n} connections took for {rounds} round trips each.",
        wall.as_secs_f64()
    );
    drop((outbound, inbound));
    let _ = std::fs::remove_dir_all(&dir);
}
