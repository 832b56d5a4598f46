//! The kernel's side of DNS-aware egress, as the agent's DNS proxy sees it: where the hooks send
//! DNS (`ward_dnsprx`), where a redirected query was going (`ward_redir`), the addresses learned
//! from answers (`ward_dnsaddr`) and the names they came from (`ward_dnsname`). Opened from the
//! pins, so the proxy's tasks hold their own handles; the learned addresses and names stay pinned
//! across agent restarts.
use std::{net::SocketAddr, path::Path, time::Duration};

use agent_common::{
    map_names, DnsFlow, DnsName, DnsProxyConfig, LearnedKey, LearnedValue, OriginalDst,
    RedirectKey, MAX_DNS_NAME,
};
use aya::maps::{Array, HashMap, Map, MapData};

use super::{flow_key, ignore_missing, map_err, pinned, KernelError};

pub struct DnsMaps {
    config: Array<MapData, DnsProxyConfig>,
    flows: HashMap<MapData, RedirectKey, DnsFlow>,
    learned: HashMap<MapData, LearnedKey, LearnedValue>,
    names: HashMap<MapData, u32, DnsName>,
}

impl DnsMaps {
    pub fn open(pin_dir: &Path) -> Result<DnsMaps, KernelError> {
        Ok(DnsMaps {
            config: pinned(pin_dir, map_names::DNS_PROXY, Map::Array)?,
            flows: pinned(pin_dir, map_names::DNS_FLOWS, Map::LruHashMap)?,
            learned: pinned(pin_dir, map_names::LEARNED, Map::HashMap)?,
            names: pinned(pin_dir, map_names::DNS_NAMES, Map::HashMap)?,
        })
    }

    /// Points the hooks at the proxy on loopback `port`, or (with `None`) sends DNS where it goes.
    pub fn set_proxy(&mut self, port: Option<u16>) -> Result<(), KernelError> {
        let config = DnsProxyConfig {
            port: port.unwrap_or(0),
            enabled: u8::from(port.is_some()),
            _pad: [0; 5],
        };
        self.config
            .set(0, config, 0)
            .map_err(map_err(map_names::DNS_PROXY))
    }

    /// Where the query from `workload` to the proxy at `proxy` (`protocol`, in the namespace of
    /// cookie `netns`) was going, if its packet left less than `fresh` ago: a record that old
    /// names nobody (a process that later sends from the same port is not that workload). A TCP
    /// connection's record is taken; a UDP socket's stays, as every datagram refreshes it (glibc
    /// sends its A and AAAA queries from one socket at once).
    pub fn redirect(
        &mut self,
        workload: SocketAddr,
        proxy: SocketAddr,
        protocol: u8,
        netns: u64,
        fresh: Duration,
    ) -> Option<OriginalDst> {
        let key = RedirectKey {
            flow: flow_key(workload, proxy, protocol),
            netns,
        };
        let flow = self.flows.get(&key, 0).ok()?;
        if protocol == agent_common::PROTO_TCP {
            let _ = self.flows.remove(&key);
        }
        let age = crate::dns::boot_ns().saturating_sub(flow.filed_ns);
        (u128::from(age) <= fresh.as_nanos()).then_some(flow.original)
    }

    pub fn set_learned(&mut self, key: LearnedKey, value: LearnedValue) -> Result<(), KernelError> {
        self.learned
            .insert(key, value, 0)
            .map_err(map_err(map_names::LEARNED))
    }

    pub fn remove_learned(&mut self, key: &LearnedKey) -> Result<(), KernelError> {
        ignore_missing(self.learned.remove(key)).map_err(map_err(map_names::LEARNED))
    }

    /// Every learned entry the kernel holds (both generation bits).
    pub fn learned(&self) -> Vec<(LearnedKey, LearnedValue)> {
        self.learned.iter().filter_map(Result::ok).collect()
    }

    pub fn set_name(&mut self, id: u32, name: &str) -> Result<(), KernelError> {
        let mut value = DnsName::default();
        let bytes = name.as_bytes();
        let len = bytes.len().min(MAX_DNS_NAME);
        value.name[..len].copy_from_slice(&bytes[..len]);
        value.len = len as u16;
        self.names
            .insert(id, value, 0)
            .map_err(map_err(map_names::DNS_NAMES))
    }

    pub fn remove_name(&mut self, id: u32) -> Result<(), KernelError> {
        ignore_missing(self.names.remove(&id)).map_err(map_err(map_names::DNS_NAMES))
    }

    /// Every name the kernel holds, by id (a name that is not UTF-8 is left out).
    pub fn names(&self) -> Vec<(u32, String)> {
        self.names
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(id, n)| {
                let len = usize::from(n.len).min(MAX_DNS_NAME);
                Some((id, String::from_utf8(n.name[..len].to_vec()).ok()?))
            })
            .collect()
    }
}
