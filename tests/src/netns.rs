//! Network namespaces as "nodes", joined by veth pairs, for traffic that must leave loopback.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

/// A named network namespace (`ip netns`) with loopback up, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        crate::require_root();
        let name = crate::unique_name(tag);
        // A leftover of a killed run with the same pid: ours to replace.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let netns = Netns { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a thread inside the namespace. Threads `f` starts stay there: a server it
    /// starts listens in this namespace.
    pub fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        use std::os::fd::AsRawFd as _;
        let path = format!("/var/run/netns/{}", self.name);
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: moves only this new thread into the namespace.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        panic!("setns {path}: {}", std::io::Error::last_os_error());
                    }
                    f()
                })
                .join()
                .expect("the thread in the namespace does not panic")
        })
    }

    /// Runs `ip -n <name> <args>` and panics with its message when it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// Creates a veth pair: `name` in this namespace, `peer_name` in namespace `peer` (by name).
    pub fn veth(&self, name: &str, peer_name: &str, peer: &str) {
        self.ip(&[
            "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", peer,
        ]);
    }

    /// Sets sysctl `key` (such as `net.ipv4.ip_forward`) of this namespace to `value`.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        // /proc/sys/net shows the namespace of the thread that opens it.
        self.run_inside(|| std::fs::write(&path, value))
            .unwrap_or_else(|e| panic!("{}: write {value} to {}: {e}", self.name, path.display()));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth ends inside it.
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "ward-tests: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(e) => eprintln!("ward-tests: ip netns del {}: {e}", self.name),
        }
    }
}

fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {args:?}: {e}"));
    assert!(
        output.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// Two namespaces joined by one veth pair on 10.231.<n>.0/24 and fd00:231:<n>::/64: the client
/// node holds host number 100, the server node host number 1 (and any added with
/// [`TwoNodes::add_server_host`]).
pub struct TwoNodes {
    pub client: Netns,
    pub server: Netns,
    subnet: u8,
}

impl TwoNodes {
    pub fn new(tag: &str) -> Self {
        // The addresses live only inside the test's namespaces; the subnet number just keeps
        // parallel tests' logs apart.
        static NEXT_SUBNET: AtomicU8 = AtomicU8::new(1);
        let subnet = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed).max(1);
        let client = Netns::new(&format!("{tag}-c"));
        let server = Netns::new(&format!("{tag}-s"));
        client.veth("veth0", "veth1", &server.name);
        let nodes = TwoNodes {
            client,
            server,
            subnet,
        };
        for (netns, host) in [(&nodes.client, 100), (&nodes.server, 1)] {
            nodes.add_address(netns, host);
        }
        nodes.client.ip(&["link", "set", "veth0", "up"]);
        nodes.server.ip(&["link", "set", "veth1", "up"]);
        nodes
    }

    /// Adds host number `host` of both subnets to the server node.
    pub fn add_server_host(&self, host: u8) {
        self.add_address(&self.server, host);
    }

    pub fn v4(&self, host: u8) -> IpAddr {
        IpAddr::from([10, 231, self.subnet, host])
    }

    pub fn v6(&self, host: u8) -> IpAddr {
        IpAddr::from([
            0xfd00,
            0x231,
            u16::from(self.subnet),
            0,
            0,
            0,
            0,
            u16::from(host),
        ])
    }

    /// `10.231.<n>.0/24`
    pub fn v4_subnet(&self) -> String {
        format!("10.231.{}.0/24", self.subnet)
    }

    /// `fd00:231:<n>::/64`
    pub fn v6_subnet(&self) -> String {
        format!("fd00:231:{:x}::/64", self.subnet)
    }

    fn add_address(&self, netns: &Netns, host: u8) {
        let device = if std::ptr::eq(netns, &self.client) {
            "veth0"
        } else {
            "veth1"
        };
        let v4 = format!("{}/24", self.v4(host));
        let v6 = format!("{}/64", self.v6(host));
        netns.ip(&["addr", "add", &v4, "dev", device]);
        // nodad: the address is usable at once instead of after duplicate address detection.
        netns.ip(&["-6", "addr", "add", &v6, "dev", device, "nodad"]);
    }
}

/// One layer-2 segment: a namespace holding a bridge, and hosts in namespaces of their own, each
/// joined to the bridge by a veth pair (`eth0` on the host's side) and given its addresses.
pub struct Lan {
    switch: Netns,
    hosts: Vec<Netns>,
}

impl Lan {
    pub fn new(tag: &str) -> Self {
        let switch = Netns::new(&format!("{tag}-sw"));
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        Lan {
            switch,
            hosts: Vec::new(),
        }
    }

    /// A new host on the segment with `addresses` (each with its prefix length, such as
    /// `10.0.0.1/16`); returns its namespace's name.
    pub fn add_host(&mut self, tag: &str, addresses: &[&str]) -> String {
        let host = Netns::new(tag);
        let port = format!("h{}", self.hosts.len());
        host.veth("eth0", &port, self.switch.name());
        self.switch
            .ip(&["link", "set", &port, "master", "br0", "up"]);
        for address in addresses {
            if address.contains(':') {
                // nodad: usable at once instead of after duplicate address detection.
                host.ip(&["-6", "addr", "add", address, "dev", "eth0", "nodad"]);
            } else {
                host.ip(&["addr", "add", address, "dev", "eth0"]);
            }
        }
        host.ip(&["link", "set", "eth0", "up"]);
        let name = host.name().to_owned();
        self.hosts.push(host);
        name
    }
}
