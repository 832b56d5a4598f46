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
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use ward_tunnel::{
    test_helpers::TestCa, Authorizer, Denied, Inbound, InboundConfig, OriginalDestinations,
    Outbound, OutboundConfig, OutboundRequest, SpiffeId, Svid, SvidStore, TrustStore,
};

const TRUST_DOMAIN: &str = "bench.example";
const CLIENT: &str = "spiffe://bench.example/ns/bench/sa/client";
const SERVER: &str = "spiffe://bench.example/ns/bench/sa/server";
const MESSAGE: usize = 64;

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

fn raise_fd_limit(wanted: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            let wanted = (wanted as libc::rlim_t).min(limit.rlim_max);
            if limit.rlim_cur < wanted {
                limit.rlim_cur = wanted;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }
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
                            destination,
                            destination_id: id(SERVER),
                            peer_agent,
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

    fn authorize(&self, peer: &SpiffeId, _: &SpiffeId, _: SocketAddr) -> Result<(), Denied> {
        if peer.as_str() == CLIENT {
            Ok(())
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

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// User plus system CPU time of `pid` so far.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which may hold spaces), from field 3 on.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_micros(ticks * 1_000_000 / hz.max(1))
}

// ---------------------------------------------------------------------------------------------
// The workloads

async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Reads to end of stream, then answers with the number of bytes read.
async fn sink_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = tcp.write_all(&total.to_be_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    tcp
}

async fn round_trip(tcp: &mut TcpStream, message: &[u8], echo: &mut [u8]) {
    tcp.write_all(message).await.expect("write");
    tcp.read_exact(echo).await.expect("read echo");
}

/// p50 and p99 of small request/response round trips on one connection.
async fn latency(addr: SocketAddr, seconds: f64) -> (Duration, Duration, usize) {
    let mut tcp = connect(addr).await;
    let message = [0x5au8; MESSAGE];
    let mut echo = [0u8; MESSAGE];
    for _ in 0..1000 {
        round_trip(&mut tcp, &message, &mut echo).await;
    }
    let mut samples = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let start = Instant::now();
        round_trip(&mut tcp, &message, &mut echo).await;
        samples.push(start.elapsed());
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    (at(0.50), at(0.99), samples.len())
}

/// MiB/s of one connection sending `mib` MiB to the sink, until the sink confirmed them.
async fn throughput(addr: SocketAddr, mib: usize) -> f64 {
    let mut tcp = connect(addr).await;
    let chunk = vec![0xa5u8; 256 * 1024];
    let start = Instant::now();
    for _ in 0..mib * 4 {
        tcp.write_all(&chunk).await.expect("write");
    }
    tcp.shutdown().await.expect("shutdown");
    let mut count = [0u8; 8];
    tcp.read_exact(&mut count).await.expect("sink's count");
    let elapsed = start.elapsed();
    assert_eq!(
        u64::from_be_bytes(count),
        (mib * 1024 * 1024) as u64,
        "the sink must receive every byte"
    );
    mib as f64 / elapsed.as_secs_f64()
}

/// New connections a second, each carrying one small round trip, from 16 clients at once.
async fn connection_rate(addr: SocketAddr, seconds: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let done = done.clone();
            tokio::spawn(async move {
                let mut echo = [0u8; 1];
                while Instant::now() < end {
                    let mut tcp = connect(addr).await;
                    round_trip(&mut tcp, b"x", &mut echo).await;
                    drop(tcp);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("worker");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

async fn open_many(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for batch in 0..n.div_ceil(100) {
        let count = 100.min(n - batch * 100);
        let opened: Vec<_> = (0..count)
            .map(|_| {
                tokio::spawn(async move {
                    let mut tcp = connect(addr).await;
                    let mut echo = [0u8; MESSAGE];
                    round_trip(&mut tcp, &[1u8; MESSAGE], &mut echo).await;
                    tcp
                })
            })
            .collect();
        for task in opened {
            conns.push(task.await.expect("open"));
        }
    }
    conns
}

/// Every connection makes `rounds` round trips, all connections at once.
async fn exercise(conns: Vec<TcpStream>, rounds: usize) -> Vec<TcpStream> {
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut tcp| {
            tokio::spawn(async move {
                let mut echo = [0u8; MESSAGE];
                for _ in 0..rounds {
                    round_trip(&mut tcp, &[2u8; MESSAGE], &mut echo).await;
                }
                tcp
            })
        })
        .collect();
    let mut conns = Vec::new();
    for task in tasks {
        conns.push(task.await.expect("exercise"));
    }
    conns
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
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
    let echo = echo_server().await;
    let sink = sink_server().await;
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
    row(
        "agent RSS, idle: outbound + inbound",
        "-".into(),
        format!("{:.1} MiB", (idle_rss.0 + idle_rss.1) as f64 / 1024.0),
        format!(
            "{:.1} + {:.1}",
            idle_rss.0 as f64 / 1024.0,
            idle_rss.1 as f64 / 1024.0
        ),
    );
    row(
        &format!("agent RSS, {n} open tunneled connections: out + in"),
        "-".into(),
        format!("{:.1} MiB", (rss.0 + rss.1) as f64 / 1024.0),
        format!(
            "{:.1} + {:.1}",
            rss.0 as f64 / 1024.0,
            rss.1 as f64 / 1024.0
        ),
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
