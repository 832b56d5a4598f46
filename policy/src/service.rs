//! Kubernetes Services as ward translates them: a cluster IP and port stand for a set of ready
//! backends, and a connection to it is decided on the backend it is translated to. The control
//! plane builds these from Services and their EndpointSlices; the agent writes them into the
//! kernel's service maps; `ward policy trace --to <namespace>/<service>` answers for each backend.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The most backends one port of one cluster IP (so of one family) has in the kernel; the
/// control plane keeps the first ones in address order and logs the rest.
pub const MAX_BACKENDS: usize = agent_common::MAX_SERVICE_BACKENDS as usize;

/// One Service with a cluster IP.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// One per family at most.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `sessionAffinity: ClientIP`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub client_ip_affinity: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub port: u16,
    /// `agent_common::PROTO_TCP`, `PROTO_UDP` or `PROTO_SCTP`.
    pub protocol: u8,
    /// Ready backends, sorted, at most [`MAX_BACKENDS`].
    pub backends: Vec<Backend>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    pub address: IpAddr,
    pub port: u16,
    /// `<namespace>/<name>` of the pod behind it, when the EndpointSlice names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

impl Service {
    /// `<namespace>/<name>`: how resources, verdict records and `ward policy trace` name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// What is wrong with it, if anything: the agent refuses such a resource whole.
    pub fn invalid(&self) -> Option<String> {
        if self.namespace.is_empty() || self.name.is_empty() {
            return Some("a Service needs a namespace and a name".into());
        }
        if self.cluster_ips.len() > 2
            || self.cluster_ips.iter().filter(|ip| ip.is_ipv4()).count() > 1
            || self.cluster_ips.iter().filter(|ip| ip.is_ipv6()).count() > 1
        {
            return Some(format!(
                "clusterIPs {:?}: at most one address per family",
                self.cluster_ips
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.ports {
            let what = format!("port {:?} ({}/{})", p.name, p.port, p.protocol);
            if p.port == 0 {
                return Some(format!("{what}: port 0"));
            }
            if ![
                agent_common::PROTO_TCP,
                agent_common::PROTO_UDP,
                agent_common::PROTO_SCTP,
            ]
            .contains(&p.protocol)
            {
                return Some(format!("{what}: protocol is not TCP, UDP or SCTP"));
            }
            if !seen.insert((p.port, p.protocol)) {
                return Some(format!("{what}: the same port and protocol twice"));
            }
            // The kernel's limit is per frontend: per cluster IP, so per family.
            for v4 in [true, false] {
                let family = p
                    .backends
                    .iter()
                    .filter(|b| b.address.is_ipv4() == v4)
                    .count();
                if family > MAX_BACKENDS {
                    return Some(format!(
                        "{what}: {family} {} backends, more than the limit of {MAX_BACKENDS}",
                        if v4 { "IPv4" } else { "IPv6" }
                    ));
                }
            }
            if let Some(b) = p.backends.iter().find(|b| b.port == 0) {
                return Some(format!("{what}: backend {} has port 0", b.address));
            }
        }
        None
    }

    /// The frontends it has in the kernel: each cluster IP with each port, and the backends of
    /// that IP's family (a connection keeps its family).
    pub fn frontends(&self) -> impl Iterator<Item = (IpAddr, &ServicePort, Vec<&Backend>)> + '_ {
        self.cluster_ips.iter().flat_map(move |ip| {
            self.ports.iter().map(move |p| {
                let backends = p
                    .backends
                    .iter()
                    .filter(|b| b.address.is_ipv4() == ip.is_ipv4())
                    .collect();
                (*ip, p, backends)
            })
        })
    }
}

/// The protocol name of a Service port (`TCP`, `UDP`, `SCTP`), or `None`.
pub fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "" | "TCP" => Some(agent_common::PROTO_TCP),
        "UDP" => Some(agent_common::PROTO_UDP),
        "SCTP" => Some(agent_common::PROTO_SCTP),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Service {
        Service {
            namespace: "shop".into(),
            name: "db".into(),
            cluster_ips: vec![
                "10.96.0.10".parse().unwrap(),
                "fd00:96::10".parse().unwrap(),
            ],
            ports: vec![ServicePort {
                name: "sql".into(),
                port: 5432,
                protocol: agent_common::PROTO_TCP,
                backends: vec![
                    Backend {
                        address: "10.233.1.2".parse().unwrap(),
                        port: 15432,
                        pod: Some("shop/db-0".into()),
                    },
                    Backend {
                        address: "fd00:233::2".parse().unwrap(),
                        port: 15432,
                        pod: Some("shop/db-0".into()),
                    },
                ],
            }],
            client_ip_affinity: false,
        }
    }

    #[test]
    fn each_cluster_ip_gets_the_backends_of_its_family() {
        let db = db();
        let frontends: Vec<_> = db
            .frontends()
            .map(|(ip, p, b)| (ip, p.port, b.iter().map(|b| b.address).collect::<Vec<_>>()))
            .collect();
        assert_eq!(
            frontends,
            vec![
                (
                    "10.96.0.10".parse().unwrap(),
                    5432,
                    vec!["10.233.1.2".parse().unwrap()]
                ),
                (
                    "fd00:96::10".parse().unwrap(),
                    5432,
                    vec!["fd00:233::2".parse().unwrap()]
                ),
            ]
        );
        assert_eq!(db.invalid(), None);
        assert_eq!(db.key(), "shop/db");
    }

    #[test]
    fn bad_services_are_named() {
        let mut two_v4 = db();
        two_v4.cluster_ips = vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
        assert!(two_v4.invalid().unwrap().contains("one address per family"));
        let mut too_many = db();
        too_many.ports[0].backends = (0..=MAX_BACKENDS)
            .map(|i| Backend {
                address: IpAddr::from([10, 1, (i >> 8) as u8, i as u8]),
                port: 1,
                pod: None,
            })
            .collect();
        assert!(too_many.invalid().unwrap().contains("more than the limit"));
        let mut twice = db();
        twice.ports.push(twice.ports[0].clone());
        assert!(twice.invalid().unwrap().contains("twice"));
    }
}
