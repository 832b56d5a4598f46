//! Services as the kernel's service and backend maps hold them: each cluster IP with each port is
//! a frontend, its backends of the same family fill slots `0..count`. Built once per apply from
//! the control plane's Services; the generation writer writes only what differs.
use std::collections::BTreeMap;

use agent_common::{
    BackendKey, ServiceAddr, ServiceKey, ServiceValue, MAX_SERVICE_BACKENDS_TOTAL,
    MAX_SERVICE_FRONTENDS, SERVICE_FLAG_CLIENT_AFFINITY,
};

use super::mapped;
use crate::policy::service::Service;

/// The frontends and backends of one generation, keyed with generation bit 0.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ServiceTable {
    pub frontends: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<BackendKey, ServiceAddr>,
    /// Frontend (mapped address, port) → `<namespace>/<name>`, for verdict records.
    pub names: BTreeMap<([u8; 16], u16), String>,
}

impl ServiceTable {
    /// The table for `services` (each valid, as the control-plane state checks). A frontend two
    /// Services claim goes to the first by name, and what does not fit the maps (one generation's
    /// half) is left out; both are logged.
    pub fn new(services: &[Service]) -> ServiceTable {
        let mut table = ServiceTable::default();
        for service in services {
            for (ip, port, backends) in service.frontends() {
                let key = ServiceKey {
                    addr: mapped(ip),
                    port: port.port,
                    protocol: port.protocol,
                    generation: 0,
                };
                if let Some(owner) = table.names.get(&(key.addr, key.port)) {
                    if table.frontends.contains_key(&key) {
                        tracing::warn!(
                            service = %service.key(), owner = %owner, address = %ip, port = port.port,
                            "two Services claim one cluster IP and port; the first keeps it"
                        );
                        continue;
                    }
                }
                if table.frontends.len() >= (MAX_SERVICE_FRONTENDS / 2) as usize
                    || table.backends.len() + backends.len()
                        > (MAX_SERVICE_BACKENDS_TOTAL / 2) as usize
                {
                    tracing::warn!(
                        service = %service.key(), address = %ip, port = port.port,
                        "the service maps are full; this cluster IP and port is not translated"
                    );
                    continue;
                }
                for (slot, backend) in backends.iter().enumerate() {
                    table.backends.insert(
                        BackendKey {
                            service: key,
                            slot: slot as u32,
                        },
                        ServiceAddr {
                            addr: mapped(backend.address),
                            port: backend.port,
                            _pad: [0; 2],
                        },
                    );
                }
                let flags = if service.client_ip_affinity {
                    SERVICE_FLAG_CLIENT_AFFINITY
                } else {
                    0
                };
                table.frontends.insert(
                    key,
                    ServiceValue {
                        count: backends.len() as u32,
                        flags,
                    },
                );
                table.names.insert((key.addr, key.port), service.key());
            }
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use agent_common::{PROTO_TCP, PROTO_UDP};

    use super::*;
    use crate::policy::service::{Backend, ServicePort};

    fn service(name: &str, ip: &str, backends: &[&str]) -> Service {
        Service {
            namespace: "shop".into(),
            name: name.into(),
            cluster_ips: vec![ip.parse().unwrap()],
            ports: vec![
                ServicePort {
                    name: "dns".into(),
                    port: 53,
                    protocol: PROTO_UDP,
                    backends: backends
                        .iter()
                        .map(|a| Backend {
                            address: a.parse().unwrap(),
                            port: 5353,
                            pod: None,
                        })
                        .collect(),
                },
                ServicePort {
                    name: "dns-tcp".into(),
                    port: 53,
                    protocol: PROTO_TCP,
                    backends: vec![],
                },
            ],
            client_ip_affinity: true,
        }
    }

    #[test]
    fn each_port_is_a_frontend_with_its_backends_in_slots() {
        let table = ServiceTable::new(&[service("dns", "10.96.0.10", &["10.1.0.1", "10.1.0.2"])]);
        let udp = ServiceKey {
            addr: mapped("10.96.0.10".parse().unwrap()),
            port: 53,
            protocol: PROTO_UDP,
            generation: 0,
        };
        assert_eq!(
            table.frontends[&udp],
            ServiceValue {
                count: 2,
                flags: SERVICE_FLAG_CLIENT_AFFINITY
            }
        );
        let tcp = ServiceKey {
            protocol: PROTO_TCP,
            ..udp
        };
        assert_eq!(
            table.frontends[&tcp].count, 0,
            "no backend: refused at once"
        );
        assert_eq!(table.backends.len(), 2);
        assert_eq!(
            table.backends[&BackendKey {
                service: udp,
                slot: 1
            }]
                .addr,
            mapped("10.1.0.2".parse().unwrap())
        );
        assert_eq!(table.names[&(udp.addr, 53)], "shop/dns");
    }

    #[test]
    fn a_frontend_two_services_claim_stays_with_the_first() {
        let table = ServiceTable::new(&[
            service("a", "10.96.0.10", &["10.1.0.1"]),
            service("b", "10.96.0.10", &["10.1.0.9"]),
        ]);
        assert_eq!(table.frontends.len(), 2);
        assert_eq!(table.backends.len(), 1);
        assert!(table.names.values().all(|n| n == "shop/a"));
    }
}
