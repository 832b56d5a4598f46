//! The kernel's side of the mTLS tunnel, as the agent's tunnel sees it: where the connect hook
//! redirects connections (`ward_tunnel`), where they were going (`ward_redir`), and the marks
//! that let the agent's delivery of a verified connection past the ingress check (`ward_conn`).
//! Opened from the pins, so the tunnel's tasks hold their own handles.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use agent_common::{
    map_names, ConnectingValue, FlowKey, OriginalDst, RedirectKey, TunnelConfig,
    CONNECTING_FLAG_TUNNEL, PROTO_TCP,
};
use aya::maps::{Array, HashMap, Map, MapData};

use super::{flow_key, map_err, pinned, KernelError};

pub struct TunnelMaps {
    config: Array<MapData, TunnelConfig>,
    redirects: HashMap<MapData, RedirectKey, OriginalDst>,
    connecting: HashMap<MapData, FlowKey, ConnectingValue>,
    certified: HashMap<MapData, u32, u32>,
}

impl TunnelMaps {
    pub fn open(pin_dir: &Path) -> Result<TunnelMaps, KernelError> {
        Ok(TunnelMaps {
            config: pinned(pin_dir, map_names::TUNNEL, Map::Array)?,
            redirects: pinned(pin_dir, map_names::REDIRECTS, Map::LruHashMap)?,
            connecting: pinned(pin_dir, map_names::CONNECTING, Map::LruHashMap)?,
            certified: pinned(pin_dir, map_names::CERTIFIED, Map::HashMap)?,
        })
    }

    /// Points the connect hook at the outbound listener on loopback `port`, or (with `None`)
    /// makes it refuse what needs the tunnel.
    pub fn set_outbound(&mut self, port: Option<u16>) -> Result<(), KernelError> {
        let config = match port {
            Some(port) => TunnelConfig {
                ip4: u32::from_ne_bytes(Ipv4Addr::LOCALHOST.octets()),
                ip6: words(Ipv6Addr::LOCALHOST),
                port,
                enabled: 1,
                _pad: 0,
            },
            None => TunnelConfig::default(),
        };
        self.config
            .set(0, config, 0)
            .map_err(map_err(map_names::TUNNEL))
    }

    /// Where the connection the outbound listener accepted from `workload` (its end) at
    /// `listener` in the network namespace of cookie `netns` was going, removed from the map.
    pub fn take_redirect(
        &mut self,
        workload: SocketAddr,
        listener: SocketAddr,
        netns: u64,
    ) -> Option<OriginalDst> {
        let key = RedirectKey {
            flow: flow_key(workload, listener, PROTO_TCP),
            netns,
        };
        let original = self.redirects.get(&key, 0).ok()?;
        let _ = self.redirects.remove(&key);
        Some(original)
    }

    /// The local identities whose certificate the agent holds, as the kernel has them.
    pub fn certified(&self) -> Vec<u32> {
        self.certified.keys().filter_map(Result::ok).collect()
    }

    /// Lets the connect hook redirect the connections of local identity `identity` (its
    /// certificate is held), or (`false`) refuses them.
    pub fn set_certified(&mut self, identity: u32, held: bool) -> Result<(), KernelError> {
        let result = if held {
            self.certified.insert(identity, 1, 0)
        } else {
            match self.certified.remove(&identity) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                r => r,
            }
        };
        result.map_err(map_err(map_names::CERTIFIED))
    }

    /// Lets the connection from `from` to the local workload at `to` past the ingress check as
    /// coming from workload `identity`, whose certificate the tunnel verified.
    pub fn mark_delivery(
        &mut self,
        from: SocketAddr,
        to: SocketAddr,
        identity: u32,
    ) -> Result<(), KernelError> {
        let value = ConnectingValue {
            identity,
            flags: CONNECTING_FLAG_TUNNEL,
            cookie: 0,
        };
        self.connecting
            .insert(flow_key(from, to, PROTO_TCP), value, 0)
            .map_err(map_err(map_names::CONNECTING))
    }

    pub fn unmark_delivery(&mut self, from: SocketAddr, to: SocketAddr) {
        let _ = self.connecting.remove(&flow_key(from, to, PROTO_TCP));
    }
}

/// An IPv6 address as `bpf_sock_addr.user_ip6` holds it.
fn words(a: Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
    })
}

/// The original destination of a redirected connection.
pub fn original_destination(o: &OriginalDst) -> SocketAddr {
    let ip = Ipv6Addr::from(o.addr);
    let ip = match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    };
    SocketAddr::new(ip, o.port)
}
