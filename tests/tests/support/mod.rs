//! Policy snippets, client helpers and background load shared by the privileged test files.
// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ward_tests::{
    outcomes_of, run, Background, Finished, Listener, Outcome, Peer, Placement, Protocol, Ward,
};

/// Refusal by the kernel is immediate; a dropped SYN would take a retransmission timeout (1 s).
/// (Stretched under CPU emulation, where starting the client alone can take a second.)
pub fn at_once() -> Duration {
    ward_tests::scaled(Duration::from_secs(1))
}

pub fn event_timeout() -> Duration {
    ward_tests::scaled(Duration::from_secs(10))
}

pub fn socket(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}")
        .parse()
        .expect("a literal socket address")
}

/// One policy document: `spec_body` is the YAML below `spec:` (already indented by 2).
pub fn policy(name: &str, spec_body: &str) -> String {
    format!("apiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: {name}\nspec:\n{spec_body}")
}

/// An egress policy for `app: client` with the given rules (YAML list items indented by 4).
pub fn client_egress(name: &str, rules: &str) -> String {
    policy(
        name,
        &format!("  selector:\n    labels: {{app: client}}\n  egress:\n{rules}"),
    )
}

pub fn allow_tcp(rule: &str, port: u16) -> String {
    format!("    - name: {rule}\n      ports: [{{port: {port}, protocol: TCP}}]\n")
}

pub fn deny_tcp(rule: &str, port: u16) -> String {
    format!(
        "    - name: {rule}\n      action: deny\n      ports: [{{port: {port}, protocol: TCP}}]\n"
    )
}

/// One attempt with the peer client; returns its outcome and how long the whole run took.
pub fn attempt(
    peer: &Peer,
    protocol: Protocol,
    to: SocketAddr,
    at: &Placement,
    extra: &[&str],
) -> (Outcome, Duration) {
    let attempts = peer.connect(protocol, to, at, extra);
    (attempts.only().clone(), attempts.elapsed)
}

/// Asserts the outcome of an [`attempt`] at `what`; returns how long it took.
fn expect(
    expected: Outcome,
    (outcome, elapsed): (Outcome, Duration),
    what: &str,
    ward: &Ward,
) -> Duration {
    assert_eq!(
        outcome,
        expected,
        "{what} must give {expected:?}; ward log:\n{}",
        ward.log().tail(100)
    );
    elapsed
}

pub fn assert_allowed(
    peer: &Peer,
    protocol: Protocol,
    to: SocketAddr,
    at: &Placement,
    ward: &Ward,
    extra: &[&str],
) {
    let what = format!("{protocol:?} {extra:?} to {to}");
    expect(
        Outcome::Ok,
        attempt(peer, protocol, to, at, extra),
        &what,
        ward,
    );
}

pub fn assert_refused_at_once(
    peer: &Peer,
    protocol: Protocol,
    to: SocketAddr,
    at: &Placement,
    ward: &Ward,
    extra: &[&str],
) {
    let what = format!("{protocol:?} {extra:?} to {to}");
    let elapsed = expect(
        Outcome::Eperm,
        attempt(peer, protocol, to, at, extra),
        &what,
        ward,
    );
    assert!(
        elapsed < at_once(),
        "refusal of {to} took {elapsed:?}, not at once"
    );
}

/// curl from `at` to `url`: the address its socket reports as the peer (`getpeername()`, which a
/// Service's translation keeps at the cluster IP), or why it failed.
pub fn curl_peer(at: &Placement, url: &str) -> Result<String, String> {
    let args = [
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{remote_ip}",
        "--max-time",
        "3",
        url,
    ];
    let finished = tool(at, "curl", &args);
    if finished.status.success() {
        Ok(finished.stdout.trim().to_owned())
    } else {
        Err(format!(
            "curl {url}: {}: {}",
            finished.status,
            finished.stderr.trim()
        ))
    }
}

/// A command line tool run in `at`, to completion.
pub fn tool(at: &Placement, program: &str, args: &[&str]) -> Finished {
    run(program, at.command(program, args), Duration::from_secs(30))
}

pub fn log_has(ward: &Ward, from: usize, needle: &str) -> bool {
    ward.lines()[from..]
        .iter()
        .any(|line| line.contains(needle))
}

/// Clients looping against `to` from `at` until `stop_file` exists.
pub fn start_load(
    peer: &Peer,
    to: SocketAddr,
    at: &Placement,
    clients: usize,
    stop_file: &Path,
) -> Vec<Background> {
    let stop = stop_file.to_string_lossy().into_owned();
    (0..clients)
        .map(|_| {
            peer.connect_background(
                Protocol::Tcp,
                to,
                at,
                &[
                    "--count",
                    "150",
                    "--interval-ms",
                    "4",
                    "--timeout-ms",
                    "5000",
                    "--stop-file",
                    &stop,
                ],
            )
        })
        .collect()
}

/// Waits for every client to finish and returns all their outcomes.
pub fn finish_load(clients: &mut [Background]) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for client in clients.iter_mut() {
        let status = client
            .wait_exit(Duration::from_secs(120))
            .expect("a load client finishes");
        assert!(
            status.success(),
            "load client failed: {:?}",
            client.lines().snapshot()
        );
        outcomes.extend(outcomes_of(client));
    }
    outcomes
}

pub fn wait_started(clients: &[Background]) {
    for client in clients {
        client.wait_for_line(0, Duration::from_secs(20), "with a first outcome", |_| true);
    }
}

pub struct StopFile(pub PathBuf);

impl StopFile {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.stop", ward_tests::unique_name(tag)));
        let _ = std::fs::remove_file(&path);
        StopFile(path)
    }

    pub fn stop(&self) {
        std::fs::write(&self.0, "stop").expect("create the stop file");
    }
}

impl Drop for StopFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Asserts that load kept its verdicts `during` something: every attempt on the allowed port
/// connected, every one on the closed port was refused with `EPERM` and the closed listener saw
/// nothing.
pub fn assert_load_verdicts(
    during: &str,
    allowed: &[Outcome],
    denied: &[Outcome],
    closed: &Listener,
    ward: &Ward,
) {
    assert!(
        allowed.iter().all(|o| *o == Outcome::Ok) && denied.iter().all(|o| *o == Outcome::Eperm),
        "wrong verdicts {during}: allowed port {}, closed port {}; log:\n{}",
        tally(allowed),
        tally(denied),
        ward.log().tail(100)
    );
    assert_eq!(
        closed.received(),
        0,
        "the closed listener saw connections {during}"
    );
}

pub fn tally(outcomes: &[Outcome]) -> String {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for outcome in outcomes {
        let key = format!("{outcome:?}");
        match kinds.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => kinds.push((key, 1)),
        }
    }
    format!("{kinds:?}")
}

/// A workload certificate made with openssl and signed with the control plane's CA key: what
/// a peer holding a valid certificate (or a stolen one) presents.
pub struct OpensslCert {
    pub dir: PathBuf,
    pub serial: String,
}

impl OpensslCert {
    pub fn new(plane: &ward_control::test_helpers::ControlPlane, workload: &str) -> OpensslCert {
        let dir = std::env::temp_dir().join(ward_tests::unique_name("mtls-openssl"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let state = plane.state_dir();
        std::fs::write(
            dir.join("ext.cnf"),
            format!(
                "subjectAltName=URI:{}\nextendedKeyUsage=clientAuth\n",
                ward_tests::spiffe_id(workload)
            ),
        )
        .expect("ext");
        let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
        let (key, csr, cert, ext) = (
            path("key.pem"),
            path("csr.pem"),
            path("cert.pem"),
            path("ext.cnf"),
        );
        let (ca, ca_key) = (
            state.join("ca.pem").to_string_lossy().into_owned(),
            state.join("ca-key.pem").to_string_lossy().into_owned(),
        );
        let steps: [Vec<&str>; 3] = [
            vec![
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                "/O=ward-test",
            ],
            vec![
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
            vec!["x509", "-noout", "-serial", "-in", &cert],
        ];
        let mut serial = String::new();
        for args in steps {
            let made = tool(&Placement::host(), "openssl", &args);
            assert!(made.status.success(), "openssl {args:?}: {made:?}");
            if let Some(s) = made.stdout.trim().strip_prefix("serial=") {
                serial = s.to_owned();
            }
        }
        OpensslCert { dir, serial }
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
}

impl Drop for OpensslCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a capture of the link between two nodes shows when a connection to `port` went through
/// the tunnel: `marker` (sent on it) never in plaintext, traffic on the tunnel port made only of
/// TLS records, nothing to `port` itself.
pub fn assert_only_tls_between_nodes(frames: &[Vec<u8>], marker: &str, port: u16) {
    use ward_tests::{capture, cluster::TUNNEL_PORT};
    assert!(
        !capture::contains(frames, marker.as_bytes()),
        "the marker crossed the link in plaintext"
    );
    let tunnel = capture::tcp_payloads(frames, TUNNEL_PORT);
    assert!(
        !tunnel.is_empty(),
        "no tunnel traffic among {} captured frames",
        frames.len()
    );
    assert!(
        tunnel.iter().all(|p| matches!(p[0], 0x14..=0x17)),
        "every payload on the tunnel port is a TLS record"
    );
    assert!(
        capture::tcp_payloads(frames, port).is_empty(),
        "nothing went to db's port directly"
    );
}
