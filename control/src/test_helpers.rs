//! A real `ward-control` process for tests: started on a loopback port (or in a network
//! namespace) with its own policy directory, state directory and token file, killed when
//! dropped. Used by this crate's integration tests and by the privileged multi-node tests (which
//! pass the binary's path). Also real etcd members, and the network namespaces the replica tests
//! place members and replicas in.
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
        let mut command = in_netns(self.opts.netns.as_deref(), &self.opts.binary);
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
/// cluster, each on a host of a [`Network`], with their data in the test's directory; killed
/// when dropped.
pub struct Etcd {
    members: Vec<Member>,
    /// `http://<member>:2379,...`, what `--etcd-endpoints` takes.
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
    /// Certificates for members at `addresses`.
    fn create(dir: &Path, addresses: &[String]) -> EtcdTls {
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
        let (server_cert, server_key) =
            leaf(addresses.to_vec(), ExtendedKeyUsagePurpose::ServerAuth);
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
    /// Its host's address on the [`Network`].
    ip: std::net::IpAddr,
    /// Its host's network namespace.
    netns: String,
}

/// The ports every member listens on, at its host's address.
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

impl Etcd {
    /// One member on each of `hosts` of `network` (each in its host's namespace, on ports
    /// 2379 and 2380 of the host's address), speaking TLS and requiring client certificates
    /// when `tls`.
    pub fn on(dir: &Path, network: &Network, hosts: &[usize], tls: bool) -> Etcd {
        let members: Vec<Member> = hosts
            .iter()
            .enumerate()
            .map(|(i, host)| Member {
                process: None,
                name: format!("member-{i}"),
                ip: network.address(*host),
                netns: network.host(*host).to_owned(),
            })
            .collect();
        let addresses: Vec<String> = members.iter().map(|m| m.ip.to_string()).collect();
        let tls = tls.then(|| EtcdTls::create(dir, &addresses));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = members
            .iter()
            .map(|m| format!("{scheme}://{}:{CLIENT_PORT}", m.ip))
            .collect::<Vec<_>>()
            .join(",");
        let initial = members
            .iter()
            .map(|m| format!("{}=http://{}:{PEER_PORT}", m.name, m.ip))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            members,
            endpoint,
            tls,
        };
        // Members of a new cluster wait for each other: start them all, then wait for each.
        let processes: Vec<Process> = (0..hosts.len())
            .map(|i| etcd.spawn(dir, i, &initial))
            .collect();
        for (i, process) in processes.into_iter().enumerate() {
            etcd.wait(i);
            etcd.members[i].process = Some(process);
        }
        etcd
    }

    /// The files a replica needs to reach members that speak TLS.
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    /// How many members there are.
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// The client URL of member `i`.
    pub fn member(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{CLIENT_PORT}", self.members[i].ip)
    }

    fn spawn(&self, dir: &Path, i: usize, initial: &str) -> Process {
        let m = &self.members[i];
        let client = self.member(i);
        let peer = format!("http://{}:{PEER_PORT}", m.ip);
        let mut command = in_netns(Some(&m.netns), Path::new("etcd"));
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
        let address = SocketAddr::new(self.members[i].ip, CLIENT_PORT);
        let start = Instant::now();
        while std::net::TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "etcd member {i} did not listen on {address} within 20 s"
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

/// `program`, run in network namespace `netns` (an `ip netns` name) when given, entered with
/// `nsenter --net` (which execs, so the process is the program itself).
fn in_netns(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        None => Command::new(program),
        Some(netns) => {
            let mut command = Command::new("nsenter");
            command
                .arg(format!("--net=/run/netns/{netns}"))
                .arg("--")
                .arg(program);
            command
        }
    }
}

/// Hosts in network namespaces of their own, joined by one bridge (in a namespace of its own),
/// which the test's own namespace reaches too: host `i` is `10.231.<n>.<i + 1>`, the test
/// `10.231.<n>.254`. A link between two hosts can be cut ([`Network::cut`]) as a partition
/// would: packets dropped, nothing answered. Everything is deleted when dropped. Needs root.
pub struct Network {
    subnet: u8,
    bridge: String,
    hosts: Vec<String>,
}

impl Network {
    pub fn new(hosts: usize) -> Network {
        use std::sync::atomic::{AtomicU8, Ordering};
        static NEXT: AtomicU8 = AtomicU8::new(0);
        assert!(hosts < 250, "at most 249 hosts");
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        assert!(
            status
                .lines()
                .any(|l| l.split_whitespace().take(3).eq(["Uid:", "0", "0"])),
            "network namespaces need root (the replica tests run as root in `cargo xtask test`)"
        );
        let subnet = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}-{subnet}", std::process::id());
        let network = Network {
            subnet,
            bridge: format!("wnet-{tag}"),
            hosts: (0..hosts).map(|i| format!("wnet-{tag}-{i}")).collect(),
        };
        for ns in std::iter::once(&network.bridge).chain(&network.hosts) {
            // A leftover of a killed run with the same pid: ours to replace.
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let bridge = network.bridge.clone();
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &bridge, "link", "set", "br0", "up"]);
        let prefix = network.prefix();
        let attach = |inside: Option<&str>, link: &str, port: String, address: String| {
            // `link` in `inside` (the test's namespace when none), its peer `port` on the bridge.
            let mut add = vec!["link", "add", link, "type", "veth", "peer", "name", &port];
            add.extend(["netns", &bridge]);
            match inside {
                Some(ns) => ip(&[&["-n", ns][..], &add[..]].concat()),
                None => ip(&add),
            }
            ip(&["-n", &bridge, "link", "set", &port, "master", "br0", "up"]);
            let on = |args: &[&str]| match inside {
                Some(ns) => ip(&[&["-n", ns][..], args].concat()),
                None => ip(args),
            };
            on(&["addr", "add", &format!("{address}/24"), "dev", link]);
            on(&["link", "set", link, "up"]);
        };
        for (i, ns) in network.hosts.clone().iter().enumerate() {
            attach(
                Some(ns),
                "eth0",
                format!("p{i}"),
                format!("{prefix}.{}", i + 1),
            );
        }
        // The test's own end, named after the network so that parallel tests do not clash.
        let own = format!("wn{tag}");
        attach(None, &own, "ptest".into(), format!("{prefix}.254"));
        network
    }

    fn prefix(&self) -> String {
        format!("10.231.{}", self.subnet)
    }

    /// Host `i`'s namespace (an `ip netns` name).
    pub fn host(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// Host `i`'s address.
    pub fn address(&self, i: usize) -> std::net::IpAddr {
        format!("{}.{}", self.prefix(), i + 1)
            .parse()
            .expect("an IPv4 address")
    }

    /// Drops every packet between host `i` and `peers`, both ways, in host `i`'s namespace
    /// (nftables): connections hang as across a partition, nothing is refused.
    pub fn cut(&self, i: usize, peers: &[usize]) {
        let set = peers
            .iter()
            .map(|p| self.address(*p).to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table inet partition {{\n\
             chain output {{ type filter hook output priority 0; ip daddr {{ {set} }} drop; }}\n\
             chain input {{ type filter hook input priority 0; ip saddr {{ {set} }} drop; }}\n\
             }}\n"
        );
        let mut nft = in_netns(Some(self.host(i)), Path::new("nft"));
        nft.args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = nft.spawn().expect("running nft (apt-get install nftables)");
        std::io::Write::write_all(
            &mut child.stdin.take().expect("nft's stdin"),
            rules.as_bytes(),
        )
        .expect("writing the rules");
        let out = child.wait_with_output().expect("nft");
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Lets host `i`'s packets through again.
    pub fn heal(&self, i: usize) {
        let out = in_netns(Some(self.host(i)), Path::new("nft"))
            .args(["delete", "table", "inet", "partition"])
            .output()
            .expect("nft");
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends in it, and so their peers.
        for ns in self.hosts.iter().chain(std::iter::once(&self.bridge)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// `ip <args>`, which must succeed.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (apt-get install iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
