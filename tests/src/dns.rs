//! DNS-aware egress under test: a node namespace, where the agent and the workloads that share
//! its namespace run, joined to a peer namespace holding the resolvers and the servers behind the
//! names; pods in namespaces of their own, routed through the node; a resolver configuration per
//! client, bind-mounted over /etc/resolv.conf in a private mount namespace; dnsmasq, dig and the
//! agent's metrics.
//!
//! Every address lives inside the lab's namespaces (`<n>` is the [`TwoNodes`] subnet): the node
//! is `10.231.<n>.100`, the peer `10.231.<n>.1` and each host added with
//! [`DnsLab::add_server_host`], with IPv6 twins `fd00:231:<n>::<h>`. The peer also owns every
//! address of `10.78.0.0/15` and `fd00:78::/32`, routed to it by the node, so that answers naming
//! hundreds of distinct addresses lead somewhere. Pod `k` is `10.234.<n>.<4k + 2>/30` and
//! `fd00:234:<n>:<k>::2/64`; its gateway is the node's end of its veth (`.4k + 1`, `::1`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Background, Finished, Netns, Placement, TestCgroups, TwoNodes, Ward, WardOptions};

/// Where the agent serves its metrics, inside the node's namespace.
pub const METRICS_PORT: u16 = 9464;
/// The agent's DNS proxy port (its default).
pub const PROXY_PORT: u16 = 15053;
/// The log line of an agent that opened its proxy inside a workload's network namespace.
pub const PROXY_IN_POD: &str = "DNS proxy listening in the workload's network namespace";
/// The log line of an agent that adopted the learned addresses an earlier one pinned.
pub const ADOPTED: &str = "adopted the addresses workloads learned from DNS before this start";

/// The node, the peer, the pods and the lab's cgroup subtree and files.
pub struct DnsLab {
    pods: Vec<Netns>,
    pub nodes: TwoNodes,
    pub cgroups: TestCgroups,
    dir: PathBuf,
    subnet: u8,
}

/// A pod: a network namespace of its own, joined to the node, and a workload cgroup whose
/// processes run in it.
pub struct Pod {
    pub netns: String,
    pub v4: IpAddr,
    pub v6: IpAddr,
    /// Where the pod's processes run.
    pub placement: Placement,
    /// A process in the pod's cgroup and namespace (its sandbox), from which the agent finds the
    /// namespace.
    sandbox: Option<Background>,
}

impl Pod {
    /// Starts the pod's sandbox; see [`Pod::wait_for_proxy`].
    pub fn start(&mut self) {
        let sleep = self.placement.command("sleep", &["3600"]);
        self.sandbox = Some(Background::spawn("pod sandbox", sleep, false));
    }

    /// Waits until `ward` says it opened its DNS proxy in the namespace of `workload` (the pod's
    /// sandbox must run); from then on the pod's DNS goes through the proxy.
    pub fn wait_for_proxy(&self, ward: &Ward, from: usize, workload: &str) {
        assert!(self.sandbox.is_some(), "the pod's sandbox is not running");
        ward.wait_for_log(
            from,
            crate::scaled(Duration::from_secs(10)),
            &format!("saying it opened the DNS proxy in {workload}'s namespace"),
            |line| line.contains(PROXY_IN_POD) && line.contains(&format!("\"{workload}\"")),
        );
    }
}

impl DnsLab {
    pub fn new(tag: &str) -> Self {
        crate::require_privileges();
        let nodes = TwoNodes::new(tag);
        let IpAddr::V4(node) = nodes.v4(100) else {
            unreachable!("v4 is IPv4")
        };
        let subnet = node.octets()[2];
        nodes.client.sysctl("net.ipv4.ip_forward", "1");
        nodes.client.sysctl("net.ipv6.conf.all.forwarding", "1");
        nodes
            .server
            .ip(&["route", "add", "local", "10.78.0.0/15", "dev", "lo"]);
        nodes
            .server
            .ip(&["-6", "route", "add", "local", "fd00:78::/32", "dev", "lo"]);
        let peer4 = nodes.v4(1).to_string();
        let peer6 = nodes.v6(1).to_string();
        nodes
            .client
            .ip(&["route", "add", "10.78.0.0/15", "via", &peer4]);
        nodes
            .client
            .ip(&["-6", "route", "add", "fd00:78::/32", "via", &peer6]);
        let (node4, node6) = (nodes.v4(100).to_string(), nodes.v6(100).to_string());
        nodes.server.ip(&[
            "route",
            "add",
            &format!("10.234.{subnet}.0/24"),
            "via",
            &node4,
        ]);
        nodes.server.ip(&[
            "-6",
            "route",
            "add",
            &format!("fd00:234:{subnet:x}::/48"),
            "via",
            &node6,
        ]);
        let dir = std::env::temp_dir().join(crate::unique_name(&format!("{tag}-dns")));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        DnsLab {
            pods: Vec::new(),
            cgroups: TestCgroups::new(tag),
            nodes,
            dir,
            subnet,
        }
    }

    /// The node's namespace: the agent's, and that of the workloads that share it.
    pub fn node(&self) -> &str {
        self.nodes.client.name()
    }

    /// The peer's namespace, where resolvers and servers run.
    pub fn peer(&self) -> &Netns {
        &self.nodes.server
    }

    /// Host `host` of the node–peer link (on the peer unless it is 100).
    pub fn v4(&self, host: u8) -> IpAddr {
        self.nodes.v4(host)
    }

    pub fn v6(&self, host: u8) -> IpAddr {
        self.nodes.v6(host)
    }

    /// Gives the peer host number `host` (IPv4 and IPv6).
    pub fn add_server_host(&self, host: u8) {
        self.nodes.add_server_host(host);
    }

    /// A process placement in workload cgroup `cgroup` (created) in the node's namespace.
    pub fn workload(&self, cgroup: &str) -> Placement {
        Placement::cgroup(self.cgroups.create(cgroup)).in_netns(self.node())
    }

    /// A placement in the node's namespace outside every workload (no policy applies).
    pub fn outside(&self) -> Placement {
        Placement::host().in_netns(self.node())
    }

    /// A new pod whose processes run in workload cgroup `cgroup` (created); its sandbox is not
    /// started ([`Pod::start`]).
    pub fn pod(&mut self, cgroup: &str) -> Pod {
        let k = u8::try_from(self.pods.len()).expect("few pods");
        assert!(k < 63, "at most 63 pods a lab");
        let n = self.subnet;
        let pod = Netns::new(&format!("pod{k}"));
        let port = format!("pod{k}");
        pod.veth("eth0", &port, self.node());
        let gateway4 = format!("10.234.{n}.{}", 4 * k + 1);
        let gateway6 = format!("fd00:234:{n:x}:{k:x}::1");
        let v4: IpAddr = format!("10.234.{n}.{}", 4 * k + 2)
            .parse()
            .expect("an IPv4 address");
        let v6: IpAddr = format!("fd00:234:{n:x}:{k:x}::2")
            .parse()
            .expect("an IPv6 address");
        let node = &self.nodes.client;
        node.ip(&["addr", "add", &format!("{gateway4}/30"), "dev", &port]);
        node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{gateway6}/64"),
            "dev",
            &port,
            "nodad",
        ]);
        node.ip(&["link", "set", &port, "up"]);
        pod.ip(&["addr", "add", &format!("{v4}/30"), "dev", "eth0"]);
        pod.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        pod.ip(&["link", "set", "eth0", "up"]);
        pod.ip(&["route", "add", "default", "via", &gateway4]);
        pod.ip(&["-6", "route", "add", "default", "via", &gateway6]);
        let placement = Placement::cgroup(self.cgroups.create(cgroup)).in_netns(pod.name());
        let netns = pod.name().to_owned();
        self.pods.push(pod);
        Pod {
            netns,
            v4,
            v6,
            placement,
            sandbox: None,
        }
    }

    /// Starts the agent in the node's namespace with `workloads` and `policy`, its metrics on
    /// [`METRICS_PORT`] and `dns` as its `dns:` section (a YAML flow mapping such as
    /// `{minTtlSeconds: 2}`), and waits for `ready`.
    pub fn start_ward(
        &self,
        workloads: &[crate::Workload],
        policy: &str,
        dns: &str,
        args: &[&str],
    ) -> Ward {
        Ward::launch(
            &self.cgroups,
            workloads,
            WardOptions {
                policy: Some(policy),
                args,
                config_extra: format!("metricsAddress: 127.0.0.1:{METRICS_PORT}\ndns: {dns}\n"),
                netns: Some(self.node().to_owned()),
            },
        )
    }

    /// A resolver configuration file with `text`.
    pub fn resolv_conf(&self, label: &str, text: &str) -> PathBuf {
        let path = self.dir.join(format!("resolv-{label}.conf"));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// `program args` in `at` with `resolv_conf` as its /etc/resolv.conf (bind-mounted in a
    /// mount namespace of its own, as `ip netns exec` does with /etc/netns/<name>/resolv.conf).
    pub fn with_resolver(
        &self,
        at: &Placement,
        resolv_conf: &Path,
        program: &str,
        args: &[&str],
    ) -> Command {
        let mut full: Vec<String> = vec![
            "-m".into(),
            "sh".into(),
            "-c".into(),
            "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"".into(),
            resolv_conf.to_string_lossy().into_owned(),
            program.into(),
        ];
        full.extend(args.iter().map(|a| (*a).to_owned()));
        at.command("unshare", &full)
    }

    /// [`DnsLab::with_resolver`] run to completion.
    pub fn resolving(
        &self,
        at: &Placement,
        resolv_conf: &Path,
        program: &str,
        args: &[&str],
    ) -> Finished {
        let command = self.with_resolver(at, resolv_conf, program, args);
        crate::run(program, command, crate::scaled(Duration::from_secs(30)))
    }

    /// The agent's metrics (Prometheus text), scraped from outside every workload.
    pub fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{METRICS_PORT}/metrics");
        let command = self
            .outside()
            .command("curl", &["-sS", "--max-time", "5", &url]);
        let scraped = crate::run(
            "curl /metrics",
            command,
            crate::scaled(Duration::from_secs(10)),
        );
        assert!(scraped.status.success(), "scraping {url}: {scraped:?}");
        scraped.stdout
    }
}

impl Drop for DnsLab {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("ward-tests: remove {}: {e}", self.dir.display());
            }
        }
    }
}

/// The sum of the samples of every metric line that starts with `prefix` (a name, or a name and
/// the start of its labels).
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One answer record as dig prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DigRecord {
    pub name: String,
    pub ttl: u32,
    pub kind: String,
    pub data: String,
}

/// What dig printed: the status of the answer it got (none when it got none) and its answer
/// section.
#[derive(Debug)]
pub struct Dig {
    pub status: Option<String>,
    pub answers: Vec<DigRecord>,
    pub finished: Finished,
}

impl Dig {
    /// The addresses of the answer section (A and AAAA records).
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.answers
            .iter()
            .filter(|r| r.kind == "A" || r.kind == "AAAA")
            .filter_map(|r| r.data.parse().ok())
            .collect()
    }

    pub fn parse(finished: Finished) -> Dig {
        let status = finished.stdout.lines().find_map(|line| {
            let (_, rest) = line.split_once("status: ")?;
            Some(rest.split(',').next()?.trim().to_owned())
        });
        let mut answers = Vec::new();
        let mut in_answer = false;
        for line in finished.stdout.lines() {
            if line.starts_with(";; ANSWER SECTION") {
                in_answer = true;
                continue;
            }
            if in_answer && (line.trim().is_empty() || line.starts_with(';')) {
                in_answer = false;
            }
            if !in_answer {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let [name, ttl, _class, kind, data @ ..] = fields.as_slice() {
                answers.push(DigRecord {
                    name: name.trim_end_matches('.').to_owned(),
                    ttl: ttl.parse().unwrap_or_default(),
                    kind: (*kind).to_owned(),
                    data: data.join(" ").trim_end_matches('.').to_owned(),
                });
            }
        }
        Dig {
            status,
            answers,
            finished,
        }
    }
}

/// `dig @<server> <args>` in `at` (one try, two seconds; `args` may override).
pub fn dig(at: &Placement, server: IpAddr, args: &[&str]) -> Dig {
    let mut full = vec![format!("@{server}"), "+tries=1".into(), "+time=2".into()];
    full.extend(args.iter().map(|a| (*a).to_owned()));
    let command = at.command("dig", &full);
    Dig::parse(crate::run(
        "dig",
        command,
        crate::scaled(Duration::from_secs(30)),
    ))
}

/// dnsmasq serving `options` (such as `--host-record=...`) on `listen`, in network namespace
/// `netns` (by name); stopped when
/// dropped. Names under `test.example` it does not know are NXDOMAIN, never forwarded.
pub struct Dnsmasq {
    process: Background,
    pid_file: PathBuf,
}

impl Dnsmasq {
    /// Starts it and waits until it answers on each of `listen`, asked from `probe_from`
    /// (outside every workload).
    pub fn start(
        netns: &str,
        listen: &[IpAddr],
        options: &[String],
        probe_from: &Placement,
    ) -> Self {
        let pid_file = std::env::temp_dir().join(format!("{}.pid", crate::unique_name("dnsmasq")));
        let mut args: Vec<String> = [
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--bind-interfaces",
            "--local=/test.example/",
            "--log-facility=-",
            "--log-queries",
            "--user=root",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        args.push(format!("--pid-file={}", pid_file.display()));
        // Loopback only for a resolver meant to be there (as systemd-resolved's 127.0.0.53).
        if !listen.iter().any(IpAddr::is_loopback) {
            args.push("--except-interface=lo".to_owned());
        }
        args.extend(listen.iter().map(|a| format!("--listen-address={a}")));
        args.extend(options.iter().cloned());
        let process = Background::spawn(
            "dnsmasq",
            Placement::host().in_netns(netns).command("dnsmasq", &args),
            true,
        );
        let dnsmasq = Dnsmasq { process, pid_file };
        for server in listen {
            let deadline = Instant::now() + crate::scaled(Duration::from_secs(10));
            loop {
                let probe = dig(probe_from, *server, &["+time=1", "ready.test.example"]);
                if probe.status.is_some() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "dnsmasq never answered on {server} (harness check): {:?}; dnsmasq: {}",
                    probe.finished,
                    dnsmasq.process.lines().tail(40)
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        dnsmasq
    }

    /// Its log's last `lines` lines.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.lines().tail(lines)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.process.stop(libc::SIGTERM, Duration::from_secs(2));
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// `10.78.<n / 256>.<n % 256>`: the `n`th of the addresses the peer owns, `n` below 65,536.
pub fn many_v4(n: u32) -> Ipv4Addr {
    let n = u16::try_from(n).expect("n below 65,536");
    let [high, low] = n.to_be_bytes();
    Ipv4Addr::new(10, 78, high, low)
}

/// `fd00:78::<n>`, an IPv6 address the peer owns.
pub fn many_v6(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x78, 0, 0, 0, 0, 0, n)
}

/// The resident memory of process `pid` in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in kB")
}

/// `tests/src/dns_client.py <args>` (DNS clients no library offers: a flood, malformed queries)
/// run in `at` to completion; panics when the script itself fails.
pub fn dns_client(at: &Placement, args: &[&str]) -> Finished {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/dns_client.py");
    let mut full = vec![script.to_string_lossy().into_owned()];
    full.extend(args.iter().map(|a| (*a).to_owned()));
    let label = format!("dns_client.py {}", args.join(" "));
    let finished = crate::run(
        &label,
        at.command("/usr/bin/python3", &full),
        crate::scaled(Duration::from_secs(120)),
    );
    assert!(
        finished.status.success(),
        "{label} failed ({}): {}",
        finished.status,
        finished.stderr
    );
    finished
}

/// The summary line of `dns_client.py flood`, by key.
pub fn flood_summary(finished: &Finished) -> std::collections::BTreeMap<String, u64> {
    let line = finished
        .stdout
        .lines()
        .find(|l| l.starts_with("sent="))
        .unwrap_or_else(|| panic!("no summary from dns_client.py flood: {finished:?}"));
    line.split_whitespace()
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}
