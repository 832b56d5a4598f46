//! The mTLS tunnel for workloads in network namespaces of their own, as pods are on a cluster:
//! real `ward` agents (one per node namespace) and a real `ward-control`; each pod is a network
//! namespace joined to its node Calico-style (`Cluster::pod_network`) with a long-running
//! process (its sandbox) in the workload's cgroup, from which the agent finds the namespace.
//! Node A runs the `client` pod, node B the `db` pod. A standard HBONE client (HTTP/2 CONNECT
//! over mutual TLS 1.3, no server name, no ward header) reaches `db` at its own address.

mod support;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use support::*;

use ward_tests::{
    cluster::{v6, TUNNEL_PORT},
    peer, Background, Capture, Cluster, Peer, Placement, Workload,
};

const A: usize = 0;
const B: usize = 1;
const MARKER: &str = "WARD-POD-MARKER-51c0de";
const LISTENERS_OPENED: &str = "tunnel listeners opened in the workload's network namespace";

/// `db` admits pods labelled `app: client` at `port`, through the tunnel only.
fn db_requires_mtls(port: u16) -> String {
    policy(
        "db-mtls",
        &format!(
            "  selector:\n    labels: {{app: db}}\n  ingress:\n    - name: from-client\n      from:\n        - labels: {{app: client}}\n      ports: [{{port: {port}, protocol: TCP}}]\n      mtls: required\n"
        ),
    )
}

/// A pod: its namespace, address and the placement of its processes.
struct Pod {
    netns: String,
    address: IpAddr,
    placement: Placement,
    /// The sandbox: a process in the pod's cgroup and namespace while the pod lives.
    sandbox: Option<Background>,
}

impl Pod {
    fn new(cluster: &mut Cluster, node: usize, cgroup: &str) -> Pod {
        let (netns, address) = cluster.pod_network(node);
        let placement = cluster.node(node).workload(cgroup).in_netns(&netns);
        Pod {
            netns,
            address,
            placement,
            sandbox: None,
        }
    }

    fn workload(&self, name: &str) -> Workload {
        Workload::new(name)
            .address(&self.address.to_string())
            .address(&v6(self.address).to_string())
    }

    /// Starts the pod's sandbox: from now on its namespace can be found from its cgroup.
    fn start(&mut self) {
        let sleep = self.placement.command("sleep", &["3600"]);
        self.sandbox = Some(Background::spawn("pod-sandbox", sleep, false));
    }

    /// Ends the pod's processes (its sandbox).
    fn stop(&mut self) {
        self.sandbox = None;
    }
}

struct Setup {
    cluster: Cluster,
    peer: Peer,
    client: Pod,
    db: Pod,
    /// More pods on node A, of workloads labelled `app: client` (`Setup::new`'s `extra_a`).
    extra: Vec<Pod>,
}

impl Setup {
    /// Both nodes with a tunnel; `client` on A and `db` on B declared, their pods made; the
    /// agents started. The pods' sandboxes are not started: [`Setup::start_pods`].
    fn new(tag: &str, extra_a: &[&str]) -> Setup {
        let peer = peer!();
        let mut cluster = Cluster::new(tag, 2, &[], &[]);
        cluster.node_mut(A).enable_tunnel();
        cluster.node_mut(B).enable_tunnel();
        let client = Pod::new(&mut cluster, A, "client");
        let db = Pod::new(&mut cluster, B, "db");
        let extra: Vec<Pod> = extra_a
            .iter()
            .map(|name| Pod::new(&mut cluster, A, name))
            .collect();
        cluster.node_mut(B).start(&[db.workload("db")]);
        let mut a = vec![client.workload("client")];
        for (pod, name) in extra.iter().zip(extra_a) {
            a.push(pod.workload(name).label("app", "client"));
        }
        cluster.node_mut(A).start(&a);
        Setup {
            cluster,
            peer,
            client,
            db,
            extra,
        }
    }

    /// Starts both pods' sandboxes and waits until each agent has opened its pod's listeners
    /// and holds its certificate.
    fn start_pods(&mut self) {
        self.client.start();
        self.db.start();
        for (node, name) in [(A, "client"), (B, "db")] {
            let ward = self.cluster.node(node).ward();
            let id = ward_tests::spiffe_id(name);
            wait_until(&format!("{name}'s listeners"), event_timeout() * 4, || {
                ward.lines()
                    .iter()
                    .any(|l| l.contains(LISTENERS_OPENED) && l.contains(name))
            });
            wait_until(
                &format!("{name}'s certificate"),
                event_timeout() * 4,
                || {
                    ward.lines()
                        .iter()
                        .any(|l| l.contains("workload certificate installed") && l.contains(&id))
                },
            );
        }
    }

    fn apply(&self, yaml: &str) {
        let version = self.cluster.apply_policy("db.yaml", yaml);
        self.cluster.wait_everywhere(&[A, B], &version);
    }

    fn logs(&self) -> String {
        format!(
            "node A:\n{}\nnode B:\n{}",
            self.cluster.node(A).ward().log().tail(40),
            self.cluster.node(B).ward().log().tail(40)
        )
    }
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn url(address: IpAddr, port: u16) -> String {
    format!("http://{}/", SocketAddr::new(address, port))
}

fn curl(at: &Placement, url: &str) -> ward_tests::process::Finished {
    tool(at, "curl", &["-sS", "--max-time", "5", url])
}

#[test]
fn pods_on_two_nodes_reach_each_other_only_through_the_tunnel_at_the_pods_own_addresses() {
    let mut setup = Setup::new("mtls-pods", &[]);
    setup.start_pods();
    let http = setup.peer.listen_http("0.0.0.0:0", &setup.db.placement);
    let http6 = setup.peer.listen_http("[::]:0", &setup.db.placement);
    setup.apply(&format!(
        "{}---\n{}",
        db_requires_mtls(http.port()),
        db_requires_mtls(http6.port()).replace("db-mtls", "db-mtls6")
    ));

    // The client pod's connect() is redirected to the agent's listener on the pod's own
    // loopback, carried to db's pod at its address, port 15008: IPv4 and IPv6.
    for url in [
        url(setup.db.address, http.port()),
        url(v6(setup.db.address).into(), http6.port()),
    ] {
        let got = curl(&setup.client.placement, &url);
        assert!(
            got.status.success(),
            "curl {url}: {got:?}\n{}",
            setup.logs()
        );
    }

    // Under a capture of node A's link: only TLS, to db's own address on the tunnel port.
    let capture = Capture::start(setup.cluster.hub.name(), "p0");
    let script = format!(
        "printf '%s\\n' '{MARKER}' | curl -sS --max-time 5 --data-binary @- {}",
        url(setup.db.address, http.port())
    );
    let sent = tool(&setup.client.placement, "sh", &["-c", &script]);
    assert!(sent.status.success(), "curl with the marker: {sent:?}");
    assert_only_tls_between_nodes(&capture.finish(), MARKER, http.port());
    let b = setup.cluster.node(B).ward();
    assert!(
        log_has(b, 0, LISTENERS_OPENED)
            && !b.lines().iter().any(|l| l.contains("plaintext refused")),
        "node B: {}",
        b.log().tail(30)
    );

    // Plaintext to db's port is refused from anywhere: node A outside every workload, the
    // client's own pod outside its cgroup (nothing redirects it; its address is the client's,
    // which the rule admits through the tunnel only), db's own pod outside db's cgroup.
    let mark = b.lines().len();
    for (from, at) in [
        ("node A", setup.cluster.node(A).host()),
        (
            "client's pod",
            Placement::host().in_netns(&setup.client.netns),
        ),
        ("db's pod", Placement::host().in_netns(&setup.db.netns)),
    ] {
        let got = curl(&at, &url(setup.db.address, http.port()));
        assert!(
            !got.status.success(),
            "plaintext from {from} got through: {got:?}"
        );
    }
    let port = format!("\"dst_port\":{}", http.port());
    wait_until("node B's three refusals", event_timeout(), || {
        let refusals: Vec<String> = b.lines()[mark..]
            .iter()
            .filter(|l| l.contains("\"verdict\":\"deny\"") && l.contains(&port))
            .cloned()
            .collect();
        refusals.len() >= 3 && refusals.iter().any(|l| l.contains("plaintext refused"))
    });
}

#[test]
fn a_standard_hbone_client_without_server_name_reaches_a_pod_and_verifies_its_spiffe_id() {
    let mut setup = Setup::new("mtls-hbone", &[]);
    setup.start_pods();
    let http = setup.peer.listen_http("0.0.0.0:0", &setup.db.placement);
    setup.apply(&db_requires_mtls(http.port()));
    // A client certificate of `client`'s SPIFFE ID, signed by the control plane's CA, in the
    // hands of a client that is not ward (it names no source identity).
    let client = hbone::ClientCertificate::signed_by(&setup.cluster.plane, "client");
    let ca = std::fs::read_to_string(setup.cluster.plane.ca_file()).expect("CA file");
    let tunnel = SocketAddr::new(setup.db.address, TUNNEL_PORT);
    let db_id = ward_tests::spiffe_id("db");
    let node_a = &setup.cluster.node(A).netns;

    let request = b"GET / HTTP/1.0\r\nHost: db\r\n\r\n";
    let authority = SocketAddr::new(setup.db.address, http.port()).to_string();
    let (status, body) = hbone::connect(node_a, tunnel, &authority, &client, &ca, &db_id, request)
        .unwrap_or_else(|e| panic!("HBONE CONNECT: {e}\n{}", setup.logs()));
    assert_eq!(status, 200, "{body}\n{}", setup.logs());
    assert!(
        body.starts_with("HTTP/1."),
        "the HTTP answer came back: {body:?}"
    );

    // The server is held to the SPIFFE ID the client expects: db's pod is not `client`.
    let wrong = hbone::connect(
        node_a,
        tunnel,
        &authority,
        &client,
        &ca,
        &ward_tests::spiffe_id("client"),
        request,
    );
    assert!(
        wrong.as_ref().is_err_and(|e| e.contains("TLS")),
        "a server with another SPIFFE ID must fail verification: {wrong:?}"
    );
    // Refusal codes as HBONE peers send them: a destination the pod's listener does not serve
    // is a bad request (400); a port policy does not open is unauthorized (401).
    let elsewhere = SocketAddr::new(setup.client.address, http.port()).to_string();
    let (status, _) = hbone::connect(node_a, tunnel, &elsewhere, &client, &ca, &db_id, request)
        .expect("an answer");
    assert_eq!(status, 400, "CONNECT to another address");
    let closed = SocketAddr::new(setup.db.address, http.port() + 1).to_string();
    let (status, _) =
        hbone::connect(node_a, tunnel, &closed, &client, &ca, &db_id, request).expect("an answer");
    assert_eq!(status, 401, "CONNECT to a port policy does not open");
}

#[test]
fn a_pods_connections_are_refused_until_its_certificate_is_held_never_sent_in_plaintext() {
    let mut setup = Setup::new("mtls-pods-start", &[]);
    setup.db.start();
    let http = setup.peer.listen_http("0.0.0.0:0", &setup.db.placement);
    setup.apply(&db_requires_mtls(http.port()));
    wait_until("db's listeners", event_timeout() * 4, || {
        log_has(setup.cluster.node(B).ward(), 0, LISTENERS_OPENED)
    });
    let target = url(setup.db.address, http.port());

    // The client pod appears now: it connects at once and keeps trying until one gets through.
    let appears = |setup: &mut Setup, what: &str| {
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let got = curl(&setup.client.placement, &target);
            if got.status.success() {
                eprintln!(
                    "{what}: first tunneled connection after {:?} ({attempts} attempts)",
                    started.elapsed()
                );
                break;
            }
            assert!(
                started.elapsed() < event_timeout() * 4,
                "{what}: no connection got through: {got:?}\n{}",
                setup.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    setup.client.start();
    appears(&mut setup, "new pod");

    // A fresh start of node A's agent while the pod runs: the kernel redirects the pod's
    // connections only once the new agent holds its certificate.
    setup.cluster.node_mut(A).stop();
    setup
        .cluster
        .node_mut(A)
        .start(&[setup.client.workload("client")]);
    appears(&mut setup, "fresh agent");
    let b = setup.cluster.node(B).ward();
    assert!(
        !b.lines().iter().any(|l| l.contains("plaintext refused")),
        "a connection left the client pod in plaintext:\n{}",
        b.log().tail(30)
    );
}

#[test]
fn pods_come_and_go_while_another_pods_tunneled_connection_runs() {
    let mut setup = Setup::new("mtls-pods-churn", &["client2"]);
    let mut second = setup.extra.pop().expect("client2's pod");
    setup.start_pods();
    let listener = Background::spawn(
        "nc-listen",
        setup
            .db
            .placement
            .command("nc", &["-l", "-k", "-p", "7401"]),
        false,
    );
    std::thread::sleep(Duration::from_millis(300));
    setup.apply(&db_requires_mtls(7401));
    // A long connection from the client pod: one line now, one after the churn.
    let script = format!(
        "(echo first-{MARKER}; sleep 6; echo second-{MARKER}) | nc -N -w 10 {} 7401",
        setup.db.address
    );
    let _long = Background::spawn(
        "nc-long",
        setup.client.placement.command("sh", &["-c", &script]),
        false,
    );
    wait_until("the first line at db", event_timeout(), || {
        listener
            .lines()
            .snapshot()
            .iter()
            .any(|l| l.contains("first-"))
    });

    // A second pod appears (a workload the agent knew, with no process yet) and goes.
    let a = setup.cluster.node(A).ward();
    let mark = a.lines().len();
    second.start();
    let id = ward_tests::spiffe_id("client2");
    wait_until("client2's certificate", event_timeout() * 4, || {
        a.lines()
            .iter()
            .any(|l| l.contains("workload certificate installed") && l.contains(&id))
    });
    wait_until("client2's listeners", event_timeout() * 4, || {
        a.lines()[mark..]
            .iter()
            .any(|l| l.contains(LISTENERS_OPENED) && l.contains("client2"))
    });
    let got = tool(
        &second.placement,
        "sh",
        &[
            "-c",
            &format!("echo from-client2 | nc -N -w 5 {} 7401", setup.db.address),
        ],
    );
    assert!(
        got.status.success(),
        "client2 through the tunnel: {got:?}\n{}",
        setup.logs()
    );
    second.stop();
    wait_until("client2's listeners closed", event_timeout() * 4, || {
        a.lines()[mark..]
            .iter()
            .any(|l| l.contains("closed") && l.contains("client2"))
    });

    // The first pod's connection went on through all of it.
    wait_until("the second line at db", event_timeout() * 2, || {
        listener
            .lines()
            .snapshot()
            .iter()
            .any(|l| l.contains("second-"))
    });
    assert!(listener
        .lines()
        .snapshot()
        .iter()
        .any(|l| l.contains("from-client2")));
}

/// A standard HBONE client: HTTP/2 CONNECT over mutual TLS 1.3, no server name, no ward header.
mod hbone {
    use std::net::SocketAddr;
    use std::path::PathBuf;

    use tokio_rustls::{rustls::pki_types::ServerName, TlsConnector};
    use ward_tunnel::{SpiffeId, Svid, TrustStore};

    /// A workload certificate signed by the control plane's CA (with openssl), for a client
    /// that is not ward.
    pub struct ClientCertificate {
        chain_pem: String,
        key_pem: String,
        _files: super::OpensslCert,
    }

    impl ClientCertificate {
        pub fn signed_by(plane: &ward_control::test_helpers::ControlPlane, workload: &str) -> Self {
            let files = super::OpensslCert::new(plane, workload);
            let read = |p: PathBuf| std::fs::read_to_string(&p).expect("openssl's output");
            ClientCertificate {
                chain_pem: read(files.cert()),
                key_pem: read(files.key()),
                _files: files,
            }
        }
    }

    /// From inside network namespace `netns`: TLS to `tunnel` presenting `client`, verifying
    /// the server against `ca_pem` and SPIFFE ID `expect`; CONNECT `authority`; on 200 sends
    /// `request` and half-closes. The status and what came back (the refusal's reason when not
    /// 200), or the error.
    pub fn connect(
        netns: &ward_tests::Netns,
        tunnel: SocketAddr,
        authority: &str,
        client: &ClientCertificate,
        ca_pem: &str,
        expect: &str,
        request: &[u8],
    ) -> Result<(u16, String), String> {
        netns.run_inside(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(exchange(tunnel, authority, client, ca_pem, expect, request))
        })
    }

    async fn exchange(
        tunnel: SocketAddr,
        authority: &str,
        client: &ClientCertificate,
        ca_pem: &str,
        expect: &str,
        request: &[u8],
    ) -> Result<(u16, String), String> {
        let e = |what: &'static str| move |e: String| format!("{what}: {e}");
        let roots = TrustStore::parse_pem_bundle(ca_pem).map_err(|x| e("bundle")(x.to_string()))?;
        let trust = TrustStore::new(ward_tests::agent::TRUST_DOMAIN, &roots)
            .map_err(|x| e("trust")(x.to_string()))?;
        let svid = Svid::from_pem(&client.chain_pem, &client.key_pem)
            .map_err(|x| e("client certificate")(x.to_string()))?;
        let expected = SpiffeId::parse(expect).map_err(|x| e("SPIFFE ID")(x.to_string()))?;
        let config = ward_tunnel::tls::client_config(&svid, trust, expected)
            .map_err(|x| e("TLS configuration")(x.to_string()))?;
        let tcp = tokio::net::TcpStream::connect(tunnel)
            .await
            .map_err(|x| e("TCP")(x.to_string()))?;
        // An address as the server name: rustls sends no SNI.
        let tls = TlsConnector::from(config)
            .connect(ServerName::IpAddress(tunnel.ip().into()), tcp)
            .await
            .map_err(|x| e("TLS")(x.to_string()))?;
        let (mut h2, connection) = h2::client::handshake(tls)
            .await
            .map_err(|x| e("HTTP/2")(x.to_string()))?;
        tokio::spawn(connection);
        let connect = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .body(())
            .map_err(|x| e("request")(x.to_string()))?;
        let (response, mut send) = h2
            .send_request(connect, false)
            .map_err(|x| e("CONNECT")(x.to_string()))?;
        let response = response.await.map_err(|x| e("response")(x.to_string()))?;
        let status = response.status().as_u16();
        if status != 200 {
            let reason = response
                .headers()
                .get("ward-reason")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            return Ok((status, reason));
        }
        send.send_data(bytes::Bytes::copy_from_slice(request), true)
            .map_err(|x| e("DATA")(x.to_string()))?;
        let mut body = response.into_body();
        let mut out = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|x| e("reading")(x.to_string()))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
        }
        Ok((status, String::from_utf8_lossy(&out).into_owned()))
    }
}
