//! `cargo xtask bench mtls`: the mTLS tunnel end to end between two nodes (network namespaces
//! with real `ward` agents and a real `ward-control`), against plain TCP between the same
//! namespaces, in one run. The client workload on node A connects to `db` on node B; in the plain
//! phase db's policy admits it without mTLS (the kernel's L4 check only), in the tunnel phase the
//! same rule says `mtls: required`, so every connection goes through A's connect hook, A's agent,
//! TLS 1.3 between the agents, and B's agent.
//!
//! This binary is three programs: the orchestrator (no arguments but options), `serve` (the echo
//! and sink servers, in db's cgroup on node B) and `load` (the load generator, in the client's
//! cgroup on node A, printing its figures as one JSON line).
//!
//! Options: `--seconds S` (per timed phase, default 3), `--connections N` (concurrent tunneled
//! connections for the agents' RSS and CPU, default 1000), `--mib M` (throughput, default 256).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ward_tests::{Background, Cluster, Placement, Workload};
use ward_tunnel::load::*;

const A: usize = 0;
const B: usize = 1;
const ECHO_PORT: u16 = 7401;
const SINK_PORT: u16 = 7402;

#[derive(Clone, Debug)]
struct Options {
    seconds: f64,
    connections: usize,
    mib: usize,
}

fn main() {
    // `cargo bench` passes `--bench`; it means nothing here.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("load") => load_mode(&args[1..]),
        _ => orchestrate(options(&args)),
    }
}

fn options(args: &[String]) -> Options {
    let mut options = Options {
        seconds: 3.0,
        connections: 1000,
        mib: 256,
    };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let mut value = || rest.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => options.seconds = value().parse().expect("--seconds: a number"),
            "--connections" => {
                options.connections = value().parse().expect("--connections: a count")
            }
            "--mib" => options.mib = value().parse().expect("--mib: a count"),
            other => panic!("unknown option {other:?}"),
        }
    }
    options
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// `serve ECHO SINK`: the servers, until killed.
fn serve(args: &[String]) {
    raise_fd_limit(65_536);
    let addr = |i: usize| -> SocketAddr { args[i].parse().expect("an address") };
    runtime().block_on(async {
        echo_server(addr(0)).await;
        sink_server(addr(1)).await;
        println!("serving");
        std::future::pending::<()>().await;
    });
}

/// `load ECHO SINK SECONDS MIB CONNECTIONS AGENT_PIDS...`: one JSON line of figures.
fn load_mode(args: &[String]) {
    raise_fd_limit(65_536);
    let echo: SocketAddr = args[0].parse().expect("echo address");
    let sink: SocketAddr = args[1].parse().expect("sink address");
    let seconds: f64 = args[2].parse().expect("seconds");
    let mib: usize = args[3].parse().expect("MiB");
    let connections: usize = args[4].parse().expect("connections");
    let agents: Vec<u32> = args[5..]
        .iter()
        .map(|p| p.parse().expect("a pid"))
        .collect();
    let figures = runtime().block_on(async {
        let (p50, p99, samples) = latency(echo, seconds).await;
        let rate = connection_rate(echo, seconds).await;
        let mibs = throughput(sink, mib).await;
        let mut figures = serde_json::json!({
            "p50_us": p50.as_secs_f64() * 1e6,
            "p99_us": p99.as_secs_f64() * 1e6,
            "samples": samples,
            "conns_per_s": rate,
            "mib_per_s": mibs,
        });
        if connections > 0 {
            let idle: Vec<u64> = agents.iter().map(|&p| rss_kib(p)).collect();
            let conns = open_many(echo, connections).await;
            let rss: Vec<u64> = agents.iter().map(|&p| rss_kib(p)).collect();
            let before: Vec<Duration> = agents.iter().map(|&p| cpu(p)).collect();
            let rounds = 10;
            let start = Instant::now();
            let conns = exercise(conns, rounds).await;
            let wall = start.elapsed();
            let used: Vec<f64> = agents
                .iter()
                .zip(&before)
                .map(|(&p, b)| (cpu(p) - *b).as_secs_f64())
                .collect();
            drop(conns);
            figures["idle_rss_kib"] = serde_json::json!(idle);
            figures["rss_kib"] = serde_json::json!(rss);
            figures["cpu_s"] = serde_json::json!(used);
            figures["wall_s"] = serde_json::json!(wall.as_secs_f64());
            figures["round_trips"] = serde_json::json!(connections * rounds);
        }
        figures
    });
    println!("{figures}");
}

fn db_policy(mtls: bool) -> String {
    format!(
        "apiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: db\nspec:\n  selector:\n    labels: {{app: db}}\n  ingress:\n    - name: from-client\n      from:\n        - labels: {{app: client}}\n      ports: [{{port: {ECHO_PORT}, protocol: TCP}}, {{port: {SINK_PORT}, protocol: TCP}}]\n{}",
        if mtls { "      mtls: required\n" } else { "" }
    )
}

fn run_load(cluster: &Cluster, options: &Options, connections: usize) -> serde_json::Value {
    let exe = std::env::current_exe().expect("this executable");
    let b = cluster.node(B).address();
    let mut args = vec![
        "load".to_string(),
        SocketAddr::new(b, ECHO_PORT).to_string(),
        SocketAddr::new(b, SINK_PORT).to_string(),
        options.seconds.to_string(),
        options.mib.to_string(),
        connections.to_string(),
    ];
    args.extend([A, B].map(|n| cluster.node(n).ward().pid().to_string()));
    let client: Placement = cluster.node(A).workload("client");
    let output = client
        .command(&exe, &args)
        .output()
        .expect("the load generator runs");
    assert!(
        output.status.success(),
        "load generator failed: {}\nnode A:\n{}\nnode B:\n{}",
        String::from_utf8_lossy(&output.stderr),
        cluster.node(A).ward().log().tail(30),
        cluster.node(B).ward().log().tail(30)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default()).expect("one JSON line of figures")
}

fn orchestrate(options: Options) {
    let mut cluster = Cluster::new("bench-mtls", 2, &[], &[]);
    cluster.node_mut(A).enable_tunnel();
    cluster.node_mut(B).enable_tunnel();
    // Each workload has its node's own address, the source address its connections leave with.
    let client_address = cluster.node(A).address();
    cluster.node(A).workload("client");
    let db = cluster.node(B).workload("db");
    let b = cluster.node(B).address();
    cluster
        .node_mut(B)
        .start(&[Workload::new("db").address(&b.to_string())]);
    cluster
        .node_mut(A)
        .start(&[Workload::new("client").address(&client_address.to_string())]);
    for node in cluster.nodes() {
        node.wait_known(0, 2, 2);
    }
    let exe = std::env::current_exe().expect("this executable");
    let servers = Background::spawn(
        "servers",
        db.command(
            &exe,
            &[
                "serve",
                &format!("0.0.0.0:{ECHO_PORT}"),
                &format!("0.0.0.0:{SINK_PORT}"),
            ],
        ),
        false,
    );
    servers.wait_for_line(0, Duration::from_secs(10), "the servers", |l| {
        l == "serving"
    });

    let apply = |mtls: bool| {
        let version = cluster.apply_policy("db.yaml", &db_policy(mtls));
        cluster.wait_everywhere(&[A, B], &version);
    };
    apply(false);
    let plain = run_load(&cluster, &options, 0);
    apply(true);
    // The client's certificate is installed before the first tunneled connection.
    let started = Instant::now();
    while !cluster
        .node(A)
        .ward()
        .lines()
        .iter()
        .any(|l| l.contains("workload certificate installed"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no client certificate"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let tunnel = run_load(&cluster, &options, options.connections);
    report(&options, &plain, &tunnel);
}

fn report(options: &Options, plain: &serde_json::Value, tunnel: &serde_json::Value) {
    let f = |v: &serde_json::Value, key: &str| v[key].as_f64().unwrap_or(f64::NAN);
    let list = |v: &serde_json::Value, key: &str| -> Vec<f64> {
        v[key]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default()
    };
    println!(
        "ward mTLS bench: 2 nodes (network namespaces on a bridge), real agents and control plane; \
         client on node A, echo and sink servers in db on node B; {} s per timed phase",
        options.seconds
    );
    println!();
    println!(
        "| {:<50} | {:>14} | {:>14} | {:>12} |",
        "measure", "plain TCP", "tunnel", "difference"
    );
    println!("|{:-<52}|{:-<16}|{:-<16}|{:-<14}|", "", "", "", "");
    let row = |name: &str, plain: String, tunnel: String, diff: String| {
        println!("| {name:<50} | {plain:>14} | {tunnel:>14} | {diff:>12} |");
    };
    for (key, name) in [
        ("p50_us", "request/response p50 (64 B)"),
        ("p99_us", "request/response p99 (64 B)"),
    ] {
        row(
            name,
            format!("{:.1} µs", f(plain, key)),
            format!("{:.1} µs", f(tunnel, key)),
            format!("+{:.1} µs", f(tunnel, key) - f(plain, key)),
        );
    }
    row(
        &format!("single-stream throughput ({} MiB)", options.mib),
        format!("{:.0} MiB/s", f(plain, "mib_per_s")),
        format!("{:.0} MiB/s", f(tunnel, "mib_per_s")),
        format!(
            "{:.0} %",
            f(tunnel, "mib_per_s") / f(plain, "mib_per_s") * 100.0
        ),
    );
    row(
        "new connections/s (16 clients, 1 round trip each)",
        format!("{:.0}", f(plain, "conns_per_s")),
        format!("{:.0}", f(tunnel, "conns_per_s")),
        format!(
            "{:.0} %",
            f(tunnel, "conns_per_s") / f(plain, "conns_per_s") * 100.0
        ),
    );
    let (idle, rss, cpu) = (
        list(tunnel, "idle_rss_kib"),
        list(tunnel, "rss_kib"),
        list(tunnel, "cpu_s"),
    );
    if rss.len() == 2 && idle.len() == 2 && cpu.len() == 2 {
        let mib = |k: f64| k / 1024.0;
        row(
            "agent RSS idle: node A + node B",
            "-".into(),
            format!("{:.1}+{:.1} MiB", mib(idle[0]), mib(idle[1])),
            String::new(),
        );
        row(
            &format!(
                "agent RSS, {} tunneled connections: A + B",
                options.connections
            ),
            "-".into(),
            format!("{:.1}+{:.1} MiB", mib(rss[0]), mib(rss[1])),
            String::new(),
        );
        let trips = f(tunnel, "round_trips");
        row(
            &format!(
                "agent CPU, {} conns x 10 round trips: A + B",
                options.connections
            ),
            "-".into(),
            format!(
                "{:.0}+{:.0} µs/rt",
                cpu[0] / trips * 1e6,
                cpu[1] / trips * 1e6
            ),
            format!(
                "{:.0} % core",
                (cpu[0] + cpu[1]) / f(tunnel, "wall_s") * 100.0
            ),
        );
    }
    println!();
    println!(
        "RSS is the agents' whole resident memory (maps, policy, tunnel), not the tunnel's alone."
    );
}
