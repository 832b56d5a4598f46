//! The tunnel's listeners inside workloads' own network namespaces (pods), as Istio's ztunnel
//! opens them: for each local workload whose processes run in a namespace other than the agent's,
//! the outbound listener on that namespace's loopback (where the connect hook redirects, so the
//! redirect stays inside the pod) and an inbound HBONE listener at each of the workload's
//! addresses (where peers reach it directly, presenting its certificate without SNI). No
//! iptables, no change to the pod. A workload's namespace is found from its cgroups' processes;
//! its listeners close when the workload, or its namespace, goes.
use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use tokio::task::JoinHandle;
use ward_host::netns::{Netns, NetnsId};
use ward_tunnel::SpiffeId;

use crate::placement::Placement;

/// One workload's own namespace, with the tasks that serve its listeners.
pub struct InPod {
    pub workload: String,
    pub spiffe_id: SpiffeId,
    pub addresses: Vec<IpAddr>,
    pub netns: Arc<Netns>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for InPod {
    fn drop(&mut self) {
        // Aborting a serving task drops its listener; connections already accepted go on in
        // their own tasks until they end (or the namespace goes).
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Binds the listeners of one pod inside its namespace: the outbound listener on loopback
/// (IPv4, and IPv6 where the pod has it) at `outbound_port`, the inbound one at each of
/// `addresses` on `inbound_port`. All or nothing: an error names what failed.
pub fn bind(
    ns: &Netns,
    outbound_port: u16,
    inbound_port: u16,
    addresses: &[IpAddr],
) -> io::Result<(Vec<std::net::TcpListener>, Vec<std::net::TcpListener>)> {
    let listen = |address: SocketAddr| {
        let listener = std::net::TcpListener::bind(address)
            .map_err(|e| io::Error::new(e.kind(), format!("binding {address}: {e}")))?;
        listener.set_nonblocking(true)?;
        Ok::<_, io::Error>(listener)
    };
    let addresses = addresses.to_vec();
    ns.run(move || {
        let mut outbound = vec![listen(SocketAddr::new(
            Ipv4Addr::LOCALHOST.into(),
            outbound_port,
        ))?];
        // A pod without IPv6 has no ::1; its IPv6 connections (to none) need no listener.
        if let Ok(v6) = listen(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), outbound_port)) {
            outbound.push(v6);
        }
        let inbound = addresses
            .iter()
            .map(|a| listen(SocketAddr::new(*a, inbound_port)))
            .collect::<io::Result<Vec<_>>>()?;
        Ok((outbound, inbound))
    })
}

impl InPod {
    pub fn new(placement: &Placement, netns: Arc<Netns>, tasks: Vec<JoinHandle<()>>) -> InPod {
        InPod {
            workload: placement.workload.clone(),
            spiffe_id: placement.spiffe_id.clone(),
            addresses: placement.addresses.clone(),
            netns,
            tasks,
        }
    }

    /// Whether `placement` still fits these listeners (same certificate, same addresses).
    pub fn serves(&self, placement: &Placement) -> bool {
        self.spiffe_id == placement.spiffe_id && self.addresses == placement.addresses
    }
}

/// The pods' namespaces the tunnel serves, by namespace.
pub type Pods = BTreeMap<NetnsId, InPod>;
