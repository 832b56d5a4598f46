//! Where each local workload's processes run: in the agent's own network namespace, or in one of
//! their own (a pod). Features that serve workloads from inside their namespace (the tunnel's
//! listeners, the DNS proxy) look here.
use std::{net::IpAddr, path::PathBuf};

use ward_host::netns::{self, Netns, NetnsId};
use ward_tunnel::SpiffeId;

/// A local workload and the cgroup directories (absolute) its processes run in.
pub struct Placement {
    pub workload: String,
    pub spiffe_id: SpiffeId,
    pub addresses: Vec<IpAddr>,
    pub cgroups: Vec<PathBuf>,
}

/// Where a workload's processes run, as the last look found it.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// In the agent's own namespace: the node's listeners serve it.
    Host,
    /// In a namespace of its own.
    Pod(NetnsId),
    /// No process yet: looked for again at the next pass.
    Nothing,
    /// Could not be told (out of descriptors, say): whatever serves it stays as it is.
    Unknown,
}

/// The namespace of the first process found in `cgroups` (the cgroup directories of one
/// workload; a pod's processes live in its containers' cgroups below the pod's).
pub fn find(cgroups: &[PathBuf], host: NetnsId) -> (Found, Option<Netns>) {
    for dir in cgroups {
        let pid = match netns::first_process(dir) {
            Ok(Some(pid)) => pid,
            Ok(None) => continue,
            Err(_) => return (Found::Unknown, None),
        };
        let ns = match Netns::of_process(pid) {
            Ok(ns) => ns,
            // A process that exited between the two reads: try the next cgroup.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOENT)
                    || e.raw_os_error() == Some(libc::ESRCH) =>
            {
                continue
            }
            Err(_) => return (Found::Unknown, None),
        };
        if ns.id() == host {
            return (Found::Host, None);
        }
        return (Found::Pod(ns.id()), Some(ns));
    }
    (Found::Nothing, None)
}
