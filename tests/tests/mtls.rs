//! The mTLS tunnel between nodes: real `ward` agents (one per network namespace) and a real
//! `ward-control` signing the workloads' certificates; real clients (curl, nc, openssl) in the
//! workloads' cgroups. Node A runs `client` and `intruder`, node B runs `db` on B's address.

mod support;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use support::*;

use ward_tests::{peer, Background, Capture, Cluster, Peer, Placement, Workload};

const A: usize = 0;
const B: usize = 1;
const MARKER: &str = "WARD-PAYLOAD-MARKER-7f3a9c";

/// `db` admits `client` at `ports`, through the tunnel only.
fn db_requires_mtls(ports: &[u16]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|p| format!("{{port: {p}, protocol: TCP}}"))
        .collect();
    policy(
        "db-mtls",
        &format!(
            "  selector:\n    labels: {{app: db}}\n  ingress:\n    - name: from-client\n      from:\n        - labels: {{app: client}}\n      ports: [{}]\n      mtls: required\n",
            ports.join(", ")
        ),
    )
}

/// `intruder` sends its own connections to `db` through the tunnel (its own egress rule).
fn intruder_uses_the_tunnel() -> String {
    policy(
        "intruder-tls",
        "  selector:\n    labels: {app: intruder}\n  egress:\n    - name: to-db\n      to:\n        - labels: {app: db}\n      mtls: required\n",
    )
}

struct Setup {
    cluster: Cluster,
    peer: Peer,
    /// `client`'s own address on node A.
    client_address: IpAddr,
}

impl Setup {
    fn new(tag: &str, plane_args: &[&str]) -> Self {
        Setup::with_intruder(tag, plane_args, Workload::new("intruder"))
    }

    /// [`Setup::new`] with `intruder` as node A's second workload.
    fn with_intruder(tag: &str, plane_args: &[&str], intruder: Workload) -> Self {
        let peer = peer!();
        let mut cluster = Cluster::new(tag, 2, &[], plane_args);
        cluster.node_mut(A).enable_tunnel();
        cluster.node_mut(B).enable_tunnel();
        let client_address = cluster.node_mut(A).add_address();
        cluster.node(A).workload("client");
        cluster.node(A).workload("intruder");
        cluster.node(B).workload("db");
        let db_address = cluster.node(B).address().to_string();
        cluster
            .node_mut(B)
            .start(&[Workload::new("db").address(&db_address)]);
        let intruder_id = intruder.spiffe_id();
        cluster.node_mut(A).start(&[
            Workload::new("client").address(&client_address.to_string()),
            intruder,
        ]);
        for node in cluster.nodes() {
            node.wait_known(0, 3, 2);
        }
        for (node, id) in [
            (A, ward_tests::spiffe_id("client")),
            (A, intruder_id),
            (B, ward_tests::spiffe_id("db")),
        ] {
            let ward = cluster.node(node).ward();
            wait_until(&format!("{id}'s certificate"), event_timeout() * 4, || {
                ward.lines()
                    .iter()
                    .any(|l| l.contains("workload certificate installed") && l.contains(&id))
            });
        }
        Setup {
            cluster,
            peer,
            client_address,
        }
    }

    fn placement(&self, node: usize, workload: &str) -> Placement {
        self.cluster.node(node).workload(workload)
    }

    fn db(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.cluster.node(B).address(), port)
    }

    fn apply(&self, file: &str, yaml: &str) {
        let version = self.cluster.apply_policy(file, yaml);
        self.cluster.wait_everywhere(&[A, B], &version);
    }

    /// An `nc` listener in `db` that prints what it receives.
    fn nc_listener(&self, port: u16) -> Background {
        let db = self.placement(B, "db");
        let listener = Background::spawn(
            "nc-listen",
            db.command("nc", &["-l", "-N", "-p", &port.to_string()]),
            false,
        );
        std::thread::sleep(Duration::from_millis(300));
        listener
    }
}

/// Whether `ward` refused a peer for its certificate (not for what it did after the handshake:
/// `openssl s_client` sends no HTTP/2, which is refused too).
fn refused_a_certificate(ward: &ward_tests::Ward) -> bool {
    ward.lines().iter().any(|l| {
        l.contains("inbound tunnel refused")
            && (l.contains("TLS handshake failed") || l.contains("peer certificate refused"))
    })
}

/// Whether `listener` (an [`Setup::nc_listener`]) printed [`MARKER`].
fn received_marker(listener: &Background) -> bool {
    listener
        .lines()
        .snapshot()
        .iter()
        .any(|l| l.contains(MARKER))
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_client_reaches_a_workload_on_another_node_only_through_the_tunnel() {
    let setup = Setup::new("mtls-carry", &[]);
    let db = setup.placement(B, "db");
    let http = setup.peer.listen_http("0.0.0.0:0", &db);
    let nc_port = 7301;
    setup.apply("db.yaml", &db_requires_mtls(&[http.port(), nc_port]));
    let client = setup.placement(A, "client");

    // curl in the client: connect() succeeds at once and the response comes through the tunnel.
    let url = format!("http://{}/", setup.db(http.port()));
    let curl = tool(&client, "curl", &["-sS", "--max-time", "10", &url]);
    assert!(
        curl.status.success(),
        "curl through the tunnel: {curl:?}\nnode A:\n{}\nnode B:\n{}",
        setup.cluster.node(A).ward().log().tail(60),
        setup.cluster.node(B).ward().log().tail(60)
    );

    // nc with a marker, under a capture of the bridge between the nodes.
    let listener = setup.nc_listener(nc_port);
    // Node A's port on the bridge: every frame between the nodes crosses it.
    let capture = Capture::start(setup.cluster.hub.name(), "p0");
    let script = format!(
        "printf '%s\\n' '{MARKER}' | nc -N -w 5 {} {nc_port}",
        setup.cluster.node(B).address()
    );
    let sent = tool(&client, "sh", &["-c", &script]);
    assert!(sent.status.success(), "nc through the tunnel: {sent:?}");
    wait_until("the marker at db", event_timeout(), || {
        received_marker(&listener)
    });
    assert_only_tls_between_nodes(&capture.finish(), MARKER, nc_port);

    // The same connection in plaintext, from the client's own address but outside the
    // workload (so nothing redirects it), to db's listener that is still open: db's kernel
    // refuses it.
    let plain = format!(
        "printf x | nc -v -N -w 2 -s {} {} {} 2>&1",
        setup.client_address,
        setup.cluster.node(B).address(),
        http.port()
    );
    let refused = tool(&setup.cluster.node(A).host(), "sh", &["-c", &plain]);
    assert!(
        !refused.status.success(),
        "plaintext to an mtls port must fail: {refused:?}"
    );
    let b = setup.cluster.node(B).ward();
    let start = Instant::now();
    while !log_has(b, 0, "plaintext refused") {
        assert!(
            start.elapsed() < event_timeout(),
            "no plaintext refusal on node B ({refused:?}):\n{}",
            b.log().tail(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_identity_the_policy_does_not_allow_is_refused_by_the_receiving_agent() {
    let setup = Setup::new("mtls-deny", &[]);
    let port = 7302;
    setup.apply("db.yaml", &db_requires_mtls(&[port]));
    setup.apply("intruder.yaml", &intruder_uses_the_tunnel());
    let _listener = setup.nc_listener(port);
    let intruder = setup.placement(A, "intruder");
    let script = format!(
        "printf x | nc -N -w 5 {} {port}",
        setup.cluster.node(B).address()
    );
    // connect() succeeds (it is redirected to the local agent); then the tunnel is refused and
    // the connection reset.
    let _ = tool(&intruder, "sh", &["-c", &script]);
    let b = setup.cluster.node(B).ward();
    let a = setup.cluster.node(A).ward();
    let intruder_id = ward_tests::spiffe_id("intruder");
    wait_until(
        "node B's refusal naming the intruder",
        event_timeout(),
        || {
            b.lines()
                .iter()
                .any(|l| l.contains("inbound tunnel refused") && l.contains(&intruder_id))
        },
    );
    // The source's verdict names the rule that sent the connection through the tunnel, the
    // destination workload and the receiving agent's reason.
    let db_id = ward_tests::spiffe_id("db");
    wait_until(
        "node A's verdict naming rule and reason",
        event_timeout(),
        || {
            a.lines().iter().any(|l| {
                l.contains("mtls:")
                    && l.contains("denied by policy")
                    && l.contains(r#""rule":"to-db""#)
                    && l.contains(&db_id)
            })
        },
    );
}

#[test]
fn a_workload_with_an_allowed_spiffe_id_but_other_labels_is_refused_by_the_receiving_agent() {
    // `intruder` shares `client`'s SPIFFE ID (and so its certificate), as the pods of one
    // service account do, but not its labels: it is another identity, which db's policy does
    // not admit. Its agent names that identity in the tunnel request; the receiving agent checks
    // it is one of the certificate's and decides on it.
    let setup = Setup::with_intruder(
        "mtls-labels",
        &[],
        Workload::new("intruder").spiffe_id_of("client"),
    );
    let port = 7303;
    setup.apply("db.yaml", &db_requires_mtls(&[port]));
    setup.apply("intruder.yaml", &intruder_uses_the_tunnel());
    let listener = setup.nc_listener(port);
    let b = setup.cluster.node(B).ward();
    let script = format!(
        "printf '%s\\n' '{MARKER}' | nc -N -w 5 {} {port}",
        setup.cluster.node(B).address()
    );
    let _ = tool(&setup.placement(A, "intruder"), "sh", &["-c", &script]);
    wait_until("node B's refusal by policy", event_timeout(), || {
        b.lines().iter().any(|l| {
            l.contains("inbound tunnel refused")
                && l.contains("denies")
                && l.contains(&ward_tests::spiffe_id("client"))
        })
    });
    assert!(
        !received_marker(&listener),
        "the intruder's bytes reached db"
    );
    // The client, with the same certificate and its own labels, is admitted.
    drop(listener);
    let listener = setup.nc_listener(port);
    let sent = tool(&setup.placement(A, "client"), "sh", &["-c", &script]);
    assert!(sent.status.success(), "nc through the tunnel: {sent:?}");
    wait_until("the client's marker at db", event_timeout(), || {
        received_marker(&listener)
    });
}

#[test]
fn a_revoked_certificate_is_refused_and_an_agent_replaces_its_own_at_once() {
    let setup = Setup::new("mtls-revoke", &[]);
    let port = 7304;
    setup.apply("db.yaml", &db_requires_mtls(&[port]));
    let http = setup
        .peer
        .listen_http(&format!("0.0.0.0:{port}"), &setup.placement(B, "db"));
    let client = setup.placement(A, "client");
    let url = format!("http://{}/", setup.db(http.port()));
    let curl = |when: &str| {
        let done = tool(&client, "curl", &["-sS", "--max-time", "10", &url]);
        assert!(done.status.success(), "{when}: {done:?}");
    };
    curl("before the revocation");

    // A stolen copy: a certificate for `client` outside its agent, accepted until revoked.
    let stolen = OpensslCert::new(&setup.cluster.plane, "client");
    let b = setup.cluster.node(B).ward();
    assert!(s_client(&stolen, &setup).contains("Verify return code: 0 (ok)"));
    assert!(
        !refused_a_certificate(b),
        "refused before the revocation:\n{}",
        b.log().tail(10)
    );

    // The serial of the certificate node A's agent holds for `client`, as it logged it.
    let client_id = ward_tests::spiffe_id("client");
    let a = setup.cluster.node(A).ward();
    let installed = |a: &ward_tests::Ward| -> Vec<String> {
        a.lines()
            .iter()
            .filter(|l| l.contains("workload certificate installed") && l.contains(&client_id))
            .filter_map(|l| {
                serde_json::from_str::<serde_json::Value>(l).ok()?["serial"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect()
    };
    let held = installed(a)
        .last()
        .cloned()
        .expect("the client's certificate was installed");

    let state_dir = setup.cluster.plane.state_dir();
    let revoke = tool(
        &Placement::host(),
        &ward_tests::control_bin().to_string_lossy(),
        &[
            "revoke",
            "--state-dir",
            &state_dir.to_string_lossy(),
            &stolen.serial,
            &held,
        ],
    );
    assert!(revoke.status.success(), "ward-control revoke: {revoke:?}");
    for node in [A, B] {
        let ward = setup.cluster.node(node).ward();
        wait_until("the revocation at every agent", event_timeout(), || {
            log_has(ward, 0, "tunnel revocation list replaced")
        });
    }

    // The stolen certificate is refused by the receiving agent, naming the revocation.
    let _ = s_client(&stolen, &setup);
    wait_until(
        "node B's refusal naming the revocation",
        event_timeout(),
        || {
            b.lines()
                .iter()
                .any(|l| l.contains("inbound tunnel refused") && l.contains("revoked"))
        },
    );
    // Node A replaced its revoked certificate at once; the client carries on with the new one.
    wait_until("a new certificate for the client", event_timeout(), || {
        installed(a).last() != Some(&held)
    });
    curl("with the new certificate");
}

#[test]
fn certificate_rotation_does_not_break_a_long_lived_connection() {
    // Certificates live 6 s: renewed every 3 s, several times during the connection. nc's idle
    // timeout is generous: under CPU emulation a loaded guest can stall for seconds, and nc
    // ending on its timeout looks like success.
    let setup = Setup::new("mtls-rotate", &["--workload-cert-lifetime", "6s"]);
    let port = 7303;
    setup.apply("db.yaml", &db_requires_mtls(&[port]));
    let listener = setup.nc_listener(port);
    let client = setup.placement(A, "client");
    let script = format!(
        "for i in $(seq 1 20); do echo line-$i; sleep 0.5; done | nc -N -w 30 {} {port}",
        setup.cluster.node(B).address()
    );
    let sent = tool(&client, "sh", &["-c", &script]);
    assert!(sent.status.success(), "the long-lived connection: {sent:?}");
    wait_until("all 20 lines at db", event_timeout(), || {
        listener
            .lines()
            .snapshot()
            .iter()
            .any(|l| l.contains("line-20"))
    });
    let received = listener.lines().snapshot();
    for i in 1..=20 {
        assert!(
            received.iter().any(|l| l.trim() == format!("line-{i}")),
            "line-{i} missing: {received:?}"
        );
    }
    let client_id = ward_tests::spiffe_id("client");
    let installed = setup
        .cluster
        .node(A)
        .ward()
        .lines()
        .iter()
        .filter(|l| l.contains("workload certificate installed") && l.contains(&client_id))
        .count();
    assert!(
        installed >= 3,
        "the client's certificate was renewed during the connection ({installed} installed)"
    );
}

/// `openssl s_client` from node A to node B's tunnel port, asking for `db`, with `cert`; its
/// whole output.
fn s_client(cert: &OpensslCert, setup: &Setup) -> String {
    let db_id = ward_tunnel::SpiffeId::parse(&ward_tests::spiffe_id("db")).expect("an ID");
    let ca = setup.cluster.plane.ca_file();
    let script = format!(
            "echo | openssl s_client -connect {} -servername {} -cert {} -key {} -CAfile {} -alpn h2 -tls1_3 2>&1",
            setup.cluster.node(B).tunnel_address(),
            ward_tunnel::server_name_for(&db_id),
            cert.dir.join("cert.pem").display(),
            cert.dir.join("key.pem").display(),
            ca.display(),
        );
    tool(&setup.cluster.node(A).host(), "sh", &["-c", &script])
        .stdout_lines()
        .join("\n")
}

#[test]
fn openssl_s_client_with_a_workload_certificate_completes_a_handshake_with_the_inbound_port() {
    let setup = Setup::new("mtls-openssl", &[]);
    let out = s_client(&OpensslCert::new(&setup.cluster.plane, "client"), &setup);
    assert!(out.contains("TLSv1.3"), "not TLS 1.3:\n{out}");
    assert!(
        out.contains("Verify return code: 0 (ok)"),
        "db's certificate did not verify:\n{out}"
    );
    assert!(
        !refused_a_certificate(setup.cluster.node(B).ward()),
        "node B refused a valid workload certificate:\n{}",
        setup.cluster.node(B).ward().log().tail(20)
    );
}

/// About 100,000 policy entries on each node, none of them on the stream's path: `db` (node B)
/// admits `client` and `intruder` (node A) admits `client` on 50,000 ports, TCP and UDP.
fn bulk_policy() -> String {
    let admits = |name: &str, app: &str| {
        policy(
            name,
            &format!(
                "  selector:\n    labels: {{app: {app}}}\n  ingress:\n    - name: bulk\n      from:\n        - labels: {{app: client}}\n      ports:\n        - {{port: 10000, endPort: 59999, protocol: TCP}}\n        - {{port: 10000, endPort: 59999, protocol: UDP}}\n"
            ),
        )
    };
    format!(
        "{}---\n{}",
        admits("db-bulk", "db"),
        admits("intruder-bulk", "intruder")
    )
}

/// A number field of a JSON log line.
fn number(line: &str, key: &str) -> f64 {
    let value: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    value[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key} in {line}"))
}

/// CPU time (user and system, in clock ticks) of each thread of process `pid`, by thread id, with
/// the thread's name.
fn thread_cpu(pid: i32) -> std::collections::BTreeMap<u32, (String, u64)> {
    let tasks = format!("/proc/{pid}/task");
    std::fs::read_dir(&tasks)
        .unwrap_or_else(|e| panic!("{tasks}: {e}"))
        .filter_map(|entry| {
            let tid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("{tasks}/{tid}/stat")).ok()?;
            let (head, rest) = stat.rsplit_once(") ")?;
            let name = head.split_once(" (")?.1.to_owned();
            let fields: Vec<&str> = rest.split(' ').collect();
            // After the name: state is field 3, utime 14 and stime 15.
            let ticks =
                fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
            Some((tid, (name, ticks)))
        })
        .collect()
}

/// The thread that used the most CPU time between two [`thread_cpu`] readings, of those whose
/// name `matches`: its name and the time in ms.
fn busiest_thread(
    before: &std::collections::BTreeMap<u32, (String, u64)>,
    after: &std::collections::BTreeMap<u32, (String, u64)>,
    matches: impl Fn(&str) -> bool,
) -> (String, f64) {
    // SAFETY: sysconf only reads a system constant.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    after
        .iter()
        .filter(|(_, (name, _))| matches(name))
        .map(|(tid, (name, ticks))| {
            let used = ticks - before.get(tid).map_or(0, |(_, t)| *t);
            (name.clone(), used as f64 * 1e3 / ticks_per_second)
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_default()
}

/// A stream through the tunnel (a chunk every millisecond from `db` on node B to `client` on
/// node A) while both agents apply about 100,000 policy entries from the control plane: the
/// stream never stops, its longest gap between reads is shorter than either apply's map writes,
/// and the apply's CPU time is spent on a thread of its own, not on the runtime that carries the
/// tunnel's connections.
#[test]
fn a_tunneled_stream_does_not_wait_for_a_large_policy_apply() {
    let setup = Setup::new("mtls-stream", &[]);
    let port = 7305;
    setup.apply("db.yaml", &db_requires_mtls(&[port]));
    let db = setup.placement(B, "db");
    let _listener = setup.peer.listen_stream(&format!("0.0.0.0:{port}"), &db);
    let stop = setup.cluster.node(A).state_dir().join("stop-stream");
    let stream = setup
        .peer
        .stream(setup.db(port), &setup.placement(A, "client"), &stop);
    stream.wait_for_line(0, event_timeout(), "`connected`", |l| l == "connected");
    // Streaming before the apply too, so the longest gap covers the whole of it.
    std::thread::sleep(Duration::from_millis(500));

    let pids = [A, B].map(|node| setup.cluster.node(node).ward().pid());
    let cpu_before = pids.map(thread_cpu);
    let marks = setup.cluster.log_marks();
    let version = setup.cluster.apply_policy("bulk.yaml", &bulk_policy());
    let cpu_after = pids.map(thread_cpu);
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&stop, "").expect("stop file");
    let (_, summary) = stream.wait_for_line(0, event_timeout(), "the stream's summary", |l| {
        l.starts_with("streamed ") || l.starts_with("ended ")
    });
    assert!(
        summary.starts_with("streamed "),
        "the tunneled stream stopped during the apply: {summary}\nnode A:\n{}\nnode B:\n{}",
        setup.cluster.node(A).ward().log().tail(40),
        setup.cluster.node(B).ward().log().tail(40)
    );
    let max_gap_ms: f64 = summary
        .split_once("max_gap_ms=")
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no max_gap_ms in {summary:?}"));

    // Each node's apply of the new version, as its agent logged it.
    let mut applies = Vec::new();
    for (node, mark) in [A, B].into_iter().zip(&marks[..]) {
        let ward = setup.cluster.node(node).ward();
        let lines = ward.lines();
        let state = setup
            .cluster
            .node(node)
            .wait_applied(*mark, &version, event_timeout());
        let applied = lines[*mark..]
            .iter()
            .find(|l| l.contains("policy applied") && l.contains("control plane"))
            .unwrap_or_else(|| panic!("no `policy applied` line on node {node}"));
        let entries = number(applied, "entries");
        assert!(
            entries >= 100_000.0,
            "node {node} applied {entries} entries, not a large policy"
        );
        let (duration_ms, total_ms) = (number(applied, "duration_ms"), number(&state, "total_ms"));
        // Compiling and writing take CPU time on the thread that does them, which is not one of
        // the runtime that carries connections (its threads carry the stream and the update).
        // tokio names its worker and blocking threads `tokio-rt-worker` (`tokio-runtime-w` before).
        let (_, runtime_ms) = busiest_thread(&cpu_before[node], &cpu_after[node], |name| {
            name.starts_with("tokio-r")
        });
        let (busiest, busiest_ms) = busiest_thread(&cpu_before[node], &cpu_after[node], |_| true);
        println!(
            "node {node}: {entries} entries written in {duration_ms:.1} ms, compiled and applied in {total_ms:.1} ms; CPU meanwhile: {busiest_ms:.0} ms on thread {busiest}, at most {runtime_ms:.0} ms on a thread of the connections' runtime"
        );
        assert!(
            !busiest.starts_with("tokio-r"),
            "node {node}: the apply ran on a thread of the connections' runtime ({busiest}, {busiest_ms:.0} ms CPU)"
        );
        applies.push(duration_ms);
    }
    let shortest = applies.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "longest gap between reads of the tunneled stream: {max_gap_ms:.1} ms; shortest map write: {shortest:.1} ms; {summary}"
    );
    assert!(
        max_gap_ms < shortest,
        "the stream stalled for {max_gap_ms:.1} ms, as long as a map write ({shortest:.1} ms): it waited for it"
    );
}
