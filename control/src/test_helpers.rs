//! A real `ward-control` process for tests: started on a loopback port with its own policy
//! directory, state directory and token file, killed when dropped. Used by this crate's
//! integration tests and by the privileged multi-node tests (which pass the binary's path).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use ward_host::process::{Capture, Process};

pub struct ControlPlaneOptions {
    /// The `ward-control` binary.
    pub binary: PathBuf,
    /// A directory of the test's own; policy/, state/, tokens and control.log go in it.
    pub root: PathBuf,
    /// `127.0.0.1:0` picks a free port; multi-node tests listen on a veth address.
    pub listen: SocketAddr,
    pub trust_domain: String,
    /// `--node-cert-lifetime`, e.g. `1h` or `3s`.
    pub node_cert_lifetime: String,
    pub extra_args: Vec<String>,
    /// A network namespace (`ip netns` name) to run in, entered with `nsenter --net` (which
    /// execs, so the process is the control plane itself).
    pub netns: Option<String>,
    /// The state directory, when not `root/state` (two control planes sharing one).
    pub state_dir: Option<PathBuf>,
}

impl ControlPlaneOptions {
    pub fn new(binary: impl Into<PathBuf>, root: impl Into<PathBuf>) -> Self {
        ControlPlaneOptions {
            binary: binary.into(),
            root: root.into(),
            listen: "127.0.0.1:0".parse().expect("loopback address"),
            trust_domain: "example.org".into(),
            node_cert_lifetime: "1h".into(),
            extra_args: Vec::new(),
            netns: None,
            state_dir: None,
        }
    }
}

pub struct ControlPlane {
    process: Option<Process>,
    opts: ControlPlaneOptions,
    /// Where it listens (the real port when asked for port 0).
    pub address: SocketAddr,
}

impl ControlPlane {
    pub fn policy_dir(&self) -> PathBuf {
        self.opts.root.join("policy")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.opts
            .state_dir
            .clone()
            .unwrap_or_else(|| self.opts.root.join("state"))
    }

    pub fn token_file(&self) -> PathBuf {
        self.opts.root.join("tokens")
    }

    /// The CA certificate agents trust (`caFile`): in `--ca-dir` when given.
    pub fn ca_file(&self) -> PathBuf {
        self.arg("--ca-dir")
            .map_or_else(|| self.state_dir(), PathBuf::from)
            .join("ca.pem")
    }

    /// Where `--metrics-listen` serves /metrics, /healthz and /readyz, when given.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.arg("--metrics-listen")
            .map(|a| a.parse().expect("a --metrics-listen address"))
    }

    /// The value of `flag` among the extra arguments.
    fn arg(&self, flag: &str) -> Option<&str> {
        let args = &self.opts.extra_args;
        let at = args.iter().position(|a| a == flag)?;
        args.get(at + 1).map(String::as_str)
    }

    /// `GET path` from the metrics endpoint: the status code and the body.
    pub fn get(&self, path: &str) -> (u16, String) {
        use std::io::{Read as _, Write as _};
        let addr = self
            .metrics_address()
            .expect("started with --metrics-listen");
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("a read timeout");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .expect("sending the request");
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .expect("reading the answer");
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        (status, body.to_owned())
    }

    pub fn log_file(&self) -> PathBuf {
        self.opts.root.join("control.log")
    }

    /// Everything the control plane logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// Waits up to `timeout` for a log line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.logs().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn start(opts: ControlPlaneOptions) -> ControlPlane {
        std::fs::create_dir_all(opts.root.join("policy")).expect("creating the policy directory");
        if !opts.root.join("tokens").exists() {
            std::fs::write(opts.root.join("tokens"), "").expect("creating the token file");
        }
        let mut plane = ControlPlane {
            process: None,
            address: opts.listen,
            opts,
        };
        plane.spawn();
        plane
    }

    fn spawn(&mut self) {
        let mut command = match &self.opts.netns {
            None => Command::new(&self.opts.binary),
            Some(netns) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net=/run/netns/{netns}"))
                    .arg("--")
                    .arg(&self.opts.binary);
                command
            }
        };
        command
            .arg("--policy-dir")
            .arg(self.policy_dir())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--token-file")
            .arg(self.token_file())
            .arg("--listen")
            .arg(self.address.to_string())
            .arg("--trust-domain")
            .arg(&self.opts.trust_domain)
            .arg("--node-cert-lifetime")
            .arg(&self.opts.node_cert_lifetime)
            .args(&self.opts.extra_args)
            .env("RUST_LOG", "info,ward_control=debug");
        // A restart appends, so a test sees what both runs logged.
        let capture = Capture::log_file(self.log_file()).appending();
        let process =
            Process::spawn("ward-control", command, capture).unwrap_or_else(|e| panic!("{e}"));
        let (_, line) = process
            .wait_for_line(
                0,
                Duration::from_secs(20),
                "saying `listening on <address>`",
                |line| line.starts_with("listening on "),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        self.address = line
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line from ward-control: {line:?}"));
        self.process = Some(process);
    }

    /// Kills the process (SIGKILL: nothing is flushed or said goodbye).
    pub fn kill(&mut self) {
        // Dropping the process kills and reaps it.
        self.process = None;
    }

    /// Starts it again on the same address with the same directories.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The process's id.
    pub fn pid(&self) -> u32 {
        self.process
            .as_ref()
            .expect("ward-control is running")
            .pid()
    }

    /// Sends SIGTERM and waits up to `within` for the process to exit, then kills it. The exit
    /// status says which happened.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        const SIGTERM: i32 = 15;
        let mut process = self.process.take().expect("ward-control is running");
        process
            .stop(SIGTERM, within)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| !p.has_exited())
    }

    /// Appends a new join token (bound to `node` if given) and returns it.
    pub fn new_token(&self, node: Option<&str>) -> String {
        let token = crate::tokens::generate();
        let line = match node {
            Some(node) => format!("{token} {node}\n"),
            None => format!("{token}\n"),
        };
        let mut text = std::fs::read_to_string(self.token_file()).unwrap_or_default();
        text.push_str(&line);
        write_replacing(&self.token_file(), &text, 0o600);
        token
    }

    /// Writes a policy file the way `git checkout` or `kubectl cp` would: a new file renamed
    /// over the old one.
    pub fn write_policy(&self, file: &str, yaml: &str) {
        write_replacing(&self.policy_dir().join(file), yaml, 0o644);
    }

    pub fn remove_policy(&self, file: &str) {
        std::fs::remove_file(self.policy_dir().join(file))
            .unwrap_or_else(|e| panic!("removing policy {file}: {e}"));
    }
}

fn write_replacing(path: &Path, text: &str, mode: u32) {
    ward_host::atomic::write(path, text.as_bytes(), mode)
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Real etcd members (Debian's etcd-server, which `cargo xtask setup` installs) forming one
/// cluster on loopback ports of their own, with their data in the test's directory; killed when
/// dropped.
pub struct Etcd {
    members: Vec<Member>,
    /// `http://127.0.0.1:<port>,...`, what `--etcd-endpoints` takes.
    pub endpoint: String,
    /// With TLS: the members' certificate and key, and the CA that signed them.
    tls: Option<EtcdTls>,
}

/// The files of an etcd that speaks TLS and requires client certificates, all signed by one CA
/// the test made: what a replica's `--etcd-ca`, `--etcd-cert` and `--etcd-key` take, and the
/// members' own.
pub struct EtcdTls {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl EtcdTls {
    fn create(dir: &Path) -> EtcdTls {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).expect("CA certificate").pem();
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("CA issuer");
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("params");
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).expect("certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(
            vec!["ward-control".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let tls = EtcdTls {
            ca: dir.join("etcd-ca.pem"),
            client_cert: dir.join("etcd-client.pem"),
            client_key: dir.join("etcd-client-key.pem"),
            server_cert: dir.join("etcd-server.pem"),
            server_key: dir.join("etcd-server-key.pem"),
        };
        for (file, text) in [
            (&tls.ca, &ca_pem),
            (&tls.client_cert, &client_cert),
            (&tls.client_key, &client_key),
            (&tls.server_cert, &server_cert),
            (&tls.server_key, &server_key),
        ] {
            write_replacing(file, text, 0o600);
        }
        tls
    }
}

struct Member {
    process: Option<Process>,
    name: String,
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Etcd {
    /// One member.
    pub fn start(dir: &Path) -> Etcd {
        Etcd::cluster(dir, 1)
    }

    /// One member that speaks TLS to its clients and requires their certificates.
    pub fn start_tls(dir: &Path) -> Etcd {
        Etcd::members(dir, 1, Some(EtcdTls::create(dir)))
    }

    /// The files a replica needs to reach a member started by [`Etcd::start_tls`].
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    /// `size` members in one cluster.
    pub fn cluster(dir: &Path, size: usize) -> Etcd {
        Etcd::members(dir, size, None)
    }

    fn members(dir: &Path, size: usize, tls: Option<EtcdTls>) -> Etcd {
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                process: None,
                name: format!("member-{i}"),
                client_port: free_port(),
                peer_port: free_port(),
            })
            .collect();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = members
            .iter()
            .map(|m| format!("{scheme}://127.0.0.1:{}", m.client_port))
            .collect::<Vec<_>>()
            .join(",");
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            members,
            endpoint,
            tls,
        };
        // Members of a new cluster wait for each other: start them all, then wait for each.
        let processes: Vec<Process> = (0..size).map(|i| etcd.spawn(dir, i, &initial)).collect();
        for (i, process) in processes.into_iter().enumerate() {
            etcd.wait(i);
            etcd.members[i].process = Some(process);
        }
        etcd
    }

    /// The client URL of member `i`.
    pub fn member(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[i].client_port)
    }

    fn spawn(&self, dir: &Path, i: usize, initial: &str) -> Process {
        let m = &self.members[i];
        let client = self.member(i);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut command = Command::new("etcd");
        command
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(dir.join(format!("etcd-{}", m.name)))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(initial);
        if let Some(tls) = &self.tls {
            command
                .arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key);
        }
        let capture = Capture::log_file(dir.join(format!("etcd-{}.log", m.name))).appending();
        Process::spawn(
            "etcd (apt-get install etcd-server, or cargo xtask setup)",
            command,
            capture,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn wait(&self, i: usize) {
        let port = self.members[i].client_port;
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "etcd member {i} did not listen on port {port} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        self.members[i].process = None;
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.process = None;
        }
    }
}

/// A TCP relay on a loopback port to `target` that a test can cut, as a network partition
/// would: once cut, its connections are closed and new ones are accepted but never answered.
pub struct Partition {
    /// `127.0.0.1:<port>` to connect to instead of `target`.
    pub address: SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Partition {
    pub fn relay(target: SocketAddr) -> Partition {
        use std::sync::{atomic::Ordering, Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let address = listener.local_addr().expect("its address");
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (cut_flag, open_list) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if cut_flag.load(Ordering::SeqCst) {
                    // Held, never answered: the caller waits for its own timeout.
                    open_list.lock().expect("relay lock").push(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let mut list = open_list.lock().expect("relay lock");
                for stream in [&client, &server] {
                    if let Ok(clone) = stream.try_clone() {
                        list.push(clone);
                    }
                }
                drop(list);
                for (mut from, mut to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Partition { address, cut, open }
    }

    /// Cuts the relay: every connection through it is closed, new ones hang.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for stream in self.open.lock().expect("relay lock").drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Relays again (the connections held while cut stay unanswered).
    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
