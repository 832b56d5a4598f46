//! The benchmarks' two workloads on loopback, a client and a server in cgroups of their own: the
//! transports they talk over, their addresses and ports, the agent configuration that names them,
//! and the policy of N entries that isolates them, written for ward and for nftables.

use std::{
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::Result;

/// The port the client may reach on the server.
pub const SERVER_PORT: u16 = 18080;
/// Listened on but not allowed: each variant must refuse it, or it is not enforcing.
pub const DENIED_PORT: u16 = 18081;
/// Filler peers come from ranges set aside for benchmarks (198.18.0.0/15, RFC 2544;
/// 2001:2::/48, RFC 5180); no traffic goes to them.
const FILLER_PORT: u16 = 20000;
const FILLER_PORTS_PER_PEER: usize = 1000;
/// The client's egress isolation, the server's ingress isolation.
const ISOLATION_ENTRIES: usize = 2;
pub const NFT_TABLE: &str = "ward_bench";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// TCP over 127.0.0.1.
    Tcp4,
    /// TCP over ::1.
    Tcp6,
    /// UDP over 127.0.0.1: a new socket connects, sends one datagram and receives the echo.
    Udp4,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp4 => "tcp4",
            Self::Tcp6 => "tcp6",
            Self::Udp4 => "udp4",
        })
    }
}

impl Transport {
    pub fn is_udp(self) -> bool {
        self == Self::Udp4
    }

    fn loopback(self) -> IpAddr {
        match self {
            Self::Tcp4 | Self::Udp4 => Ipv4Addr::LOCALHOST.into(),
            Self::Tcp6 => Ipv6Addr::LOCALHOST.into(),
        }
    }

    /// The server's address at `port`.
    pub fn server(self, port: u16) -> SocketAddr {
        SocketAddr::new(self.loopback(), port)
    }

    /// The protocol as a ward policy names it.
    fn ward_protocol(self) -> &'static str {
        if self.is_udp() {
            "UDP"
        } else {
            "TCP"
        }
    }

    /// (address match, set element type, layer-4 match) in nft's words.
    fn nft_words(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Tcp4 => ("ip", "ipv4_addr", "tcp"),
            Self::Tcp6 => ("ip6", "ipv6_addr", "tcp"),
            Self::Udp4 => ("ip", "ipv4_addr", "udp"),
        }
    }

    /// Filler peer `i`, of this transport's address family.
    fn filler_peer(self, i: usize) -> IpAddr {
        let n = i + 1;
        match self {
            Self::Tcp4 | Self::Udp4 => {
                Ipv4Addr::new(198, 18, (n / 256) as u8, (n % 256) as u8).into()
            }
            Self::Tcp6 => Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, n as u16).into(),
        }
    }
}

/// The agent configuration with both workloads, their cgroups below `<cgroup mount>/<root>`,
/// the pins in `/sys/fs/bpf/<root>` and the policy in `policy_file` beside it.
pub fn ward_config(root: &str, policy_file: &str) -> String {
    format!(
        "trustDomain: bench.example.org\n\
         cgroupRoot: {root}\n\
         pinDir: /sys/fs/bpf/{root}\n\
         policies: [{policy_file}]\n\
         hostAddresses: auto\n\
         workloads:\n\
         \x20 - name: bench-client\n\
         \x20   labels: {{app: bench-client}}\n\
         \x20   cgroups: [client]\n\
         \x20 - name: bench-server\n\
         \x20   labels: {{app: bench-server}}\n\
         \x20   cgroups: [server]\n"
    )
}

/// A policy that selects neither workload: ward's programs run, and decide nothing.
pub const UNISOLATED_POLICY: &str = "apiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  \
     name: bench-nobody\nspec:\n  selector:\n    labels: {app: bench-nobody}\n  egress: []\n";

/// The client's egress and the server's ingress, both isolated: the client may reach the
/// server's ports in `client_ports`, the server admits the client on `server_ports`, and filler
/// peers bring the compiled policy to about the requested number of entries (one per isolation,
/// one per allowed server port, one per filler peer and port).
pub struct Policy {
    transport: Transport,
    /// Ports allowed per filler peer.
    filler: Vec<usize>,
    client_ports: Vec<u16>,
    server_ports: Vec<u16>,
}

impl Policy {
    pub fn new(size: usize, transport: Transport) -> Self {
        let mut left = size.saturating_sub(ISOLATION_ENTRIES + 2);
        let mut filler = Vec::new();
        while left > 0 {
            let ports = left.min(FILLER_PORTS_PER_PEER);
            filler.push(ports);
            left -= ports;
        }
        Self {
            transport,
            filler,
            client_ports: vec![SERVER_PORT],
            server_ports: vec![SERVER_PORT],
        }
    }

    /// The server also admits the client on `port`; the client's egress decides alone whether
    /// a connection to it passes.
    pub fn admit_on_server(&mut self, port: u16) {
        self.server_ports.push(port);
    }

    /// Adds `port` to the client's one rule towards the server, or removes it: one entry.
    pub fn toggle_client_port(&mut self, port: u16) {
        match self.client_ports.iter().position(|&p| p == port) {
            Some(i) => {
                self.client_ports.remove(i);
            }
            None => self.client_ports.push(port),
        }
    }

    pub fn client_allows(&self, port: u16) -> bool {
        self.client_ports.contains(&port)
    }

    pub fn entries(&self) -> usize {
        ISOLATION_ENTRIES
            + self.client_ports.len()
            + self.server_ports.len()
            + self.filler.iter().sum::<usize>()
    }

    fn port_list(&self, ports: &[u16]) -> String {
        let protocol = self.transport.ward_protocol();
        let items: Vec<String> = ports
            .iter()
            .map(|p| format!("{{port: {p}, protocol: {protocol}}}"))
            .collect();
        format!("[{}]", items.join(", "))
    }

    pub fn ward_yaml(&self) -> String {
        let protocol = self.transport.ward_protocol();
        let mut y = format!(
            "apiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: bench-client-egress\n\
             spec:\n  selector:\n    labels: {{app: bench-client}}\n  egress:\n\
             \x20   - name: to-server\n      to: [{{labels: {{app: bench-server}}}}]\n\
             \x20     ports: {}\n",
            self.port_list(&self.client_ports)
        );
        for (i, ports) in self.filler.iter().enumerate() {
            let last = FILLER_PORT as usize + ports - 1;
            let prefix = if self.transport == Transport::Tcp6 {
                128
            } else {
                32
            };
            let _ = write!(
                y,
                "    - name: filler-{i}\n      to: [{{cidr: \"{}/{prefix}\"}}]\n      \
                 ports: [{{port: {FILLER_PORT}, endPort: {last}, protocol: {protocol}}}]\n",
                self.transport.filler_peer(i)
            );
        }
        let _ = write!(
            y,
            "---\napiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: bench-server-ingress\n\
             spec:\n  selector:\n    labels: {{app: bench-server}}\n  ingress:\n\
             \x20   - name: from-client\n      from: [{{labels: {{app: bench-client}}}}]\n\
             \x20     ports: {}\n",
            self.port_list(&self.server_ports)
        );
        y
    }

    /// The same policy as a careful nftables user writes it: in each direction one rule selects
    /// the workload's cgroup (the socket's, looked up on input) and one hash-set lookup keyed by
    /// address and port decides; everything else of that workload is dropped. Ranges are spelled
    /// out as elements so the set holds as many entries as ward's map (and stays a hash, not an
    /// interval set). No conntrack: like ward, every packet is decided on its own.
    pub fn nft(&self, client_cgroup: &str, server_cgroup: &str, level: usize) -> String {
        let (family, addr_type, l4) = self.transport.nft_words();
        let loopback = self.transport.loopback();
        let element = |addr: IpAddr, port: usize| format!("{addr} . {port}");
        let mut egress: Vec<String> = self
            .client_ports
            .iter()
            .map(|&p| element(loopback, p.into()))
            .collect();
        for (i, ports) in self.filler.iter().enumerate() {
            let peer = self.transport.filler_peer(i);
            egress.extend(
                (FILLER_PORT as usize..FILLER_PORT as usize + ports).map(|p| element(peer, p)),
            );
        }
        let ingress: Vec<String> = self
            .server_ports
            .iter()
            .map(|&p| element(loopback, p.into()))
            .collect();
        format!(
            "table inet {NFT_TABLE} {{\n  \
               set client_egress {{\n    type {addr_type} . inet_service\n    \
                 elements = {{ {} }}\n  }}\n  \
               set server_ingress {{\n    type {addr_type} . inet_service\n    \
                 elements = {{ {} }}\n  }}\n  \
               chain output {{\n    type filter hook output priority filter; policy accept;\n    \
                 socket cgroupv2 level {level} \"{client_cgroup}\" jump client_egress\n  }}\n  \
               chain client_egress {{\n    {family} daddr . {l4} dport @client_egress accept\n    \
                 drop\n  }}\n  \
               chain input {{\n    type filter hook input priority filter; policy accept;\n    \
                 socket cgroupv2 level {level} \"{server_cgroup}\" jump server_ingress\n  }}\n  \
               chain server_ingress {{\n    {family} saddr . {l4} dport @server_ingress accept\n    \
                 drop\n  }}\n}}\n",
            egress.join(",\n      "),
            ingress.join(", "),
        )
    }
}

/// nft resolves a cgroupv2 path relative to /sys/fs/cgroup, wherever cgroup2 is mounted (its
/// `level` counts from the cgroup2 root, though).
pub fn nft_cgroup_path(mount: &Path, cgroup: &Path) -> Result<String> {
    let below_mount = cgroup.strip_prefix(mount)?;
    let prefix = match mount.strip_prefix("/sys/fs/cgroup") {
        Ok(p) => p.to_path_buf(),
        Err(_) => Path::new("../../..").join(mount.strip_prefix("/")?),
    };
    Ok(prefix.join(below_mount).to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_have_the_requested_number_of_entries() {
        assert_eq!(Policy::new(1, Transport::Tcp4).entries(), 4);
        for transport in [Transport::Tcp4, Transport::Tcp6, Transport::Udp4] {
            assert_eq!(Policy::new(1000, transport).entries(), 1000);
            assert_eq!(Policy::new(10_000, transport).entries(), 10_000);
            assert_eq!(Policy::new(100_000, transport).entries(), 100_000);
        }
        assert_eq!(Policy::new(100_000, Transport::Tcp4).filler.len(), 100);
    }

    #[test]
    fn ward_policy_isolates_both_sides_in_the_transports_protocol() {
        let yaml = Policy::new(1000, Transport::Udp4).ward_yaml();
        assert_eq!(yaml.matches("kind: Policy").count(), 2);
        assert!(
            yaml.contains("egress:\n    - name: to-server"),
            "{yaml:.400}"
        );
        assert!(yaml.contains("ingress:\n    - name: from-client"), "{yaml}");
        assert!(!yaml.contains("protocol: TCP"));
        assert!(yaml.contains("ports: [{port: 18080, protocol: UDP}]"));
        assert!(yaml.contains("cidr: \"198.18.0.1/32\""));
        let v6 = Policy::new(1000, Transport::Tcp6).ward_yaml();
        assert!(v6.contains("cidr: \"2001:2::1/128\""), "{v6:.600}");
    }

    #[test]
    fn nft_rulesets_match_ward_entry_for_entry() {
        let nft = Policy::new(1000, Transport::Tcp4).nft("u/c", "u/s", 2);
        assert_eq!(nft.matches("198.18.0.1 . ").count(), 996);
        assert!(nft.contains("127.0.0.1 . 18080"));
        assert!(nft.contains("socket cgroupv2 level 2 \"u/c\" jump client_egress"));
        assert!(nft.contains("socket cgroupv2 level 2 \"u/s\" jump server_ingress"));
        assert!(nft.contains("ip daddr . tcp dport @client_egress accept"));
        assert!(nft.contains("ip saddr . tcp dport @server_ingress accept"));
        let v6 = Policy::new(1000, Transport::Tcp6).nft("u/c", "u/s", 2);
        assert!(v6.contains("type ipv6_addr . inet_service"));
        assert!(v6.contains("::1 . 18080") && v6.contains("2001:2::1 . 20000"));
        assert!(v6.contains("ip6 daddr . tcp dport"));
        let udp = Policy::new(10, Transport::Udp4).nft("u/c", "u/s", 2);
        assert!(udp.contains("ip daddr . udp dport") && udp.contains("ip saddr . udp dport"));
    }

    #[test]
    fn one_client_port_toggles_one_entry() {
        let mut policy = Policy::new(1000, Transport::Tcp4);
        policy.admit_on_server(18082);
        assert_eq!(policy.entries(), 1001);
        assert!(!policy.client_allows(18082));
        policy.toggle_client_port(18082);
        assert!(policy.client_allows(18082));
        assert_eq!(policy.entries(), 1002);
        assert!(policy
            .ward_yaml()
            .contains("ports: [{port: 18080, protocol: TCP}, {port: 18082, protocol: TCP}]"));
        policy.toggle_client_port(18082);
        assert_eq!(policy.entries(), 1001);
        assert!(!policy.client_allows(18082));
    }

    #[test]
    fn nft_finds_cgroups_from_sys_fs_cgroup() {
        let path = |mount: &str| {
            nft_cgroup_path(
                Path::new(mount),
                &Path::new(mount).join("ward-bench/client"),
            )
            .unwrap()
        };
        assert_eq!(path("/sys/fs/cgroup"), "ward-bench/client");
        assert_eq!(path("/sys/fs/cgroup/unified"), "unified/ward-bench/client");
        assert_eq!(path("/cg2"), "../../../cg2/ward-bench/client");
    }
}
