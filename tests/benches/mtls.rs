//! `cargo xtask bench mtls`: the mTLS tunnel end to end between two nodes (network namespaces
//! with real `ward` agents and a real `ward-control`), against plain TCP between the same
//! namespaces, in one run. The client workload on node A connects to `db` on node B; in the plain
//! phase db's policy admits it without mTLS (the kernel's L4 check only), in the tunnel phase the
//! same rule says `mtls: required`, so every connection goes through A's connect hook, A's agent,
//! TLS 1.3 between the agents, and B's agent. It runs twice: with both workloads in their nodes'
//! network namespaces, then with each in a pod of its own (a network namespace joined to its
//! node, where the agents open the tunnel's listeners); the second run also measures node A's
//! agent with `--pods` more pods each holding its listeners.
//!
//! This binary is three programs: the orchestrator (no arguments but options), `serve` (the echo
//! and sink servers, in db's cgroup on node B) and `load` (the load generator, in the client's
//! cgroup on node A, printing its figures as one JSON line).
//!
//! Options: `--seconds S` (per timed phase, default 3), `--connections N` (concurrent tunneled
//! connections for the agents' RSS and CPU, default 1000), `--mib M` (throughput, default 256),
//! `--pods N` (idle pods with listeners for the memory figure, default 100).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ward_tests::{cluster::v6, Background, Cluster, Netns, Placement, Workload};
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
    pods: usize,
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
        pods: 100,
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
            "--pods" => options.pods = value().parse().expect("--pods: a count"),
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

/// The load generator in `client` against `db`'s servers, with both agents' pids.
fn run_load(
    cluster: &Cluster,
    options: &Options,
    connections: usize,
    (client, db): (&Placement, IpAddr),
) -> serde_json::Value {
    let exe = std::env::current_exe().expect("this executable");
    let mut args = vec![
        "load".to_string(),
        SocketAddr::new(db, ECHO_PORT).to_string(),
        SocketAddr::new(db, SINK_PORT).to_string(),
        options.seconds.to_string(),
        options.mib.to_string(),
        connections.to_string(),
    ];
    args.extend([A, B].map(|n| cluster.node(n).ward().pid().to_string()));
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

/// Waits until `ward`'s log has a line with all of `needles`.
fn wait_log(ward: &ward_tests::Ward, what: &str, needles: &[&str]) {
    let started = Instant::now();
    while !ward
        .lines()
        .iter()
        .any(|l| needles.iter().all(|n| l.contains(n)))
    {
        assert!(started.elapsed() < Duration::from_secs(30), "no {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts db's servers, then measures plain TCP (db's rule without mTLS) and the tunnel (with
/// it) from `client` to `db` at `db_address`.
fn measure(
    cluster: &Cluster,
    options: &Options,
    (client, db, db_address): (&Placement, &Placement, IpAddr),
) -> (serde_json::Value, serde_json::Value, Background) {
    let exe = std::env::current_exe().expect("this executable");
    let servers = Background::spawn(
        "servers",
        db.command(
            &exe,
            &[
                "serve",
                &format!("[::]:{ECHO_PORT}"),
                &format!("[::]:{SINK_PORT}"),
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
    let plain = run_load(cluster, options, 0, (client, db_address));
    apply(true);
    // The client's certificate is installed before the first tunneled connection.
    wait_log(
        cluster.node(A).ward(),
        "client certificate",
        &["workload certificate installed"],
    );
    let tunnel = run_load(cluster, options, options.connections, (client, db_address));
    (plain, tunnel, servers)
}

fn orchestrate(options: Options) {
    let host = {
        let mut cluster = Cluster::new("bench-mtls", 2, &[], &[]);
        cluster.node_mut(A).enable_tunnel();
        cluster.node_mut(B).enable_tunnel();
        // Each workload has its node's own address, the source address its connections leave
        // with.
        let (a, b) = (cluster.node(A).address(), cluster.node(B).address());
        let client = cluster.node(A).workload("client");
        let db = cluster.node(B).workload("db");
        cluster
            .node_mut(B)
            .start(&[Workload::new("db").address(&b.to_string())]);
        cluster
            .node_mut(A)
            .start(&[Workload::new("client").address(&a.to_string())]);
        for node in cluster.nodes() {
            node.wait_known(0, 2, 2);
        }
        let (plain, tunnel, _servers) = measure(&cluster, &options, (&client, &db, b));
        (plain, tunnel)
    };
    let (pods, idle) = in_pods(&options);
    report(&options, &host, &pods, &idle);
}

/// The same two measurements with `client` and `db` in pods of their own; then node A's agent's
/// RSS before and after `options.pods` more pods appear and get their listeners.
fn in_pods(options: &Options) -> ((serde_json::Value, serde_json::Value), (f64, f64)) {
    let mut cluster = Cluster::new("bench-mtls-pods", 2, &[], &[]);
    cluster.node_mut(A).enable_tunnel();
    cluster.node_mut(B).enable_tunnel();
    let (client_ns, a) = cluster.pod_network(A);
    let (db_ns, b) = cluster.pod_network(B);
    let client = cluster.node(A).workload("client").in_netns(&client_ns);
    let db = cluster.node(B).workload("db").in_netns(&db_ns);
    let workload = |name: &str, address: IpAddr| {
        Workload::new(name)
            .address(&address.to_string())
            .address(&v6(address).to_string())
    };
    // The idle pods: a namespace each, with an address on its loopback (not every kernel has
    // dummy interfaces; the node does not route to them: only their listeners are measured).
    let idle: Vec<(Netns, IpAddr, Placement)> = (0..options.pods)
        .map(|i| {
            let netns = Netns::new(&format!("bench-idle{i}"));
            let address = IpAddr::from([10, 234, (i / 250) as u8, (i % 250 + 1) as u8]);
            netns.ip(&["addr", "add", &format!("{address}/32"), "dev", "lo"]);
            let placement = cluster
                .node(A)
                .workload(&format!("idle{i}"))
                .in_netns(netns.name());
            (netns, address, placement)
        })
        .collect();
    cluster.node_mut(B).start(&[workload("db", b)]);
    let mut a_workloads = vec![workload("client", a)];
    a_workloads.extend(idle.iter().enumerate().map(|(i, (_, address, _))| {
        Workload::new(&format!("idle{i}")).address(&address.to_string())
    }));
    cluster.node_mut(A).start(&a_workloads);
    // The pods' sandboxes: the agents find the namespaces from them.
    let sandbox =
        |at: &Placement| Background::spawn("sandbox", at.command("sleep", &["3600"]), false);
    let _sandboxes = [sandbox(&client), sandbox(&db)];
    let listeners = "tunnel listeners opened in the workload's network namespace";
    wait_log(
        cluster.node(A).ward(),
        "client's listeners",
        &[listeners, "\"client\""],
    );
    wait_log(
        cluster.node(B).ward(),
        "db's listeners",
        &[listeners, "\"db\""],
    );
    let pods = options.pods as u64;
    for node in cluster.nodes() {
        node.wait_known(0, 2 + pods, 4 + pods);
    }
    let (plain, tunnel, _servers) = measure(&cluster, options, (&client, &db, b));

    let rss = |node: usize| rss_kib(cluster.node(node).ward().pid() as u32) as f64 / 1024.0;
    let before = rss(A);
    let _idle_sandboxes: Vec<Background> = idle.iter().map(|(_, _, at)| sandbox(at)).collect();
    let started = Instant::now();
    while cluster
        .node(A)
        .ward()
        .lines()
        .iter()
        .filter(|l| l.contains(listeners) && l.contains("idle"))
        .count()
        < options.pods
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not every idle pod got its listeners"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    ((plain, tunnel), (before, rss(A)))
}

type Pair = (serde_json::Value, serde_json::Value);

fn report(options: &Options, host: &Pair, pods: &Pair, (before, after): &(f64, f64)) {
    println!(
        "ward mTLS bench: 2 nodes (network namespaces on a bridge), real agents and control plane; \
         client on node A, echo and sink servers in db on node B; {} s per timed phase",
        options.seconds
    );
    println!();
    println!("Workloads in their nodes' network namespaces:");
    table(options, &host.0, &host.1);
    println!();
    println!("Workloads in pods of their own (the agents' listeners inside the pods):");
    table(options, &pods.0, &pods.1);
    println!();
    println!(
        "node A's agent RSS: {before:.1} MiB with the client pod's listeners (and {0} more \
         workloads' certificates), {after:.1} MiB once those {0} pods run and hold listeners: \
         {1:.1} KiB a pod",
        options.pods,
        (after - before) * 1024.0 / options.pods.max(1) as f64,
    );
    println!(
        "RSS is the agents' whole resident memory (maps, policy, tunnel), not the tunnel's alone."
    );
}

fn table(options: &Options, plain: &serde_json::Value, tunnel: &serde_json::Value) {
    let f = |v: &serde_json::Value, key: &str| v[key].as_f64().unwrap_or(f64::NAN);
    let list = |v: &serde_json::Value, key: &str| -> Vec<f64> {
        v[key]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default()
    };
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
}
