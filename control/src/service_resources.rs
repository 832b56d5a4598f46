//! SERVICE resources from a cluster's Services and EndpointSlices (`ward-control --kubernetes`):
//! what the agents translate a cluster IP and port to.
//!
//! Every Service with a cluster IP is one resource, `<namespace>/<name>`, the same for every
//! agent. A Service port's backends are the ready endpoints of the Service's EndpointSlices (those
//! labelled `kubernetes.io/service-name: <name>` in its namespace), on the port the slice gives
//! the Service port's name. The agent refuses a SERVICE update whole when one resource breaks its
//! rules ([`model::Service::invalid`]), so everything odd in one object is left out here, named
//! in a [`Problem`], and never costs the other objects their resources: an address that does not
//! parse is skipped, a port ward cannot translate is left out, a Service that cannot be read is.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::EndpointSlice,
};
use kube::core::DynamicObject;
use ward_policy::service::{self as model, MAX_BACKENDS};
use ward_proto::{resource::Body, Resource};

/// The label the EndpointSlice controller (and any other that manages slices for a Service) puts
/// on each slice: the name of the Service it serves.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

const SERVICE: &str = "Service";

/// Something in the cluster's objects that ward leaves out or cuts short. The caller logs each
/// once; `kind` and `object` (`<namespace>/<name>`) name the Service or EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub kind: &'static str,
    pub object: String,
    pub what: String,
}

/// The SERVICE resources by name, and what was left out building them.
#[derive(Debug, Default)]
pub struct Built {
    pub resources: BTreeMap<String, Resource>,
    pub problems: BTreeSet<Problem>,
}

/// The object as `K`, or why it cannot be read as one. The watches hold untyped objects so that
/// one object kube cannot read as a Service fails that object alone, not the whole list (a list
/// that fails to decode is a watch that never lists, and then nothing is ever published).
pub fn typed<K: serde::de::DeserializeOwned>(
    kind: &'static str,
    key: &str,
    object: &DynamicObject,
) -> Result<K, Problem> {
    let problem = |e: serde_json::Error| Problem {
        kind,
        object: key.to_owned(),
        what: format!("cannot be read, left out: {e}"),
    };
    let value = serde_json::to_value(object).map_err(problem)?;
    serde_json::from_value(value).map_err(problem)
}

/// The SERVICE resources of `services` with the backends `slices` give them.
pub fn build<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Built {
    let mut built = Built::default();
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let (Some(namespace), Some(service)) = (
            slice.metadata.namespace.clone(),
            slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL)),
        ) else {
            continue;
        };
        by_service
            .entry((namespace, service.clone()))
            .or_default()
            .push(slice);
    }
    for service in services {
        let (Some(namespace), Some(name)) = (&service.metadata.namespace, &service.metadata.name)
        else {
            continue;
        };
        let key = format!("{namespace}/{name}");
        let slices = by_service
            .get(&(namespace.clone(), name.clone()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let Some(service) = service_model(&key, service, slices, &mut built.problems) else {
            continue;
        };
        // Everything above keeps to the agent's rules; this is the last word, so that the agent
        // never refuses the whole update for one Service.
        if let Some(reason) = service.invalid() {
            built.problems.insert(Problem {
                kind: SERVICE,
                object: key,
                what: format!("left out, the agent would refuse it: {reason}"),
            });
            continue;
        }
        built.resources.insert(
            key.clone(),
            Resource {
                name: key,
                body: Some(Body::Service(to_proto(&service))),
            },
        );
    }
    built
}

/// The Service as ward translates it; `None` for one without a cluster IP (headless,
/// ExternalName, not allocated yet), which nothing translates.
fn service_model(
    key: &str,
    service: &Service,
    slices: &[&EndpointSlice],
    problems: &mut BTreeSet<Problem>,
) -> Option<model::Service> {
    let mut problem = |what: String| {
        problems.insert(Problem {
            kind: SERVICE,
            object: key.to_owned(),
            what,
        });
    };
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let texts: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    if texts.contains(&"None") {
        // Headless: names resolve to the pods themselves.
        return None;
    }
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    for text in texts.iter().filter(|t| !t.is_empty()) {
        match text.parse::<IpAddr>() {
            Err(_) => problem(format!("cluster IP {text:?} is not an address, left out")),
            Ok(ip) if cluster_ips.iter().any(|c| c.is_ipv4() == ip.is_ipv4()) => problem(format!(
                "cluster IP {ip} is a second address of its family, left out"
            )),
            Ok(ip) => cluster_ips.push(ip),
        }
    }
    if cluster_ips.is_empty() {
        return None;
    }
    let mut ports: Vec<model::ServicePort> = Vec::new();
    for port in spec.ports.iter().flatten() {
        let name = port.name.clone().unwrap_or_default();
        let protocol_name = port.protocol.as_deref().unwrap_or("TCP");
        let Some(protocol) = model::protocol_number(protocol_name) else {
            problem(format!(
                "port {name:?} ({}/{protocol_name}): not TCP, UDP or SCTP, left out",
                port.port
            ));
            continue;
        };
        let Some(number) = u16::try_from(port.port).ok().filter(|p| *p != 0) else {
            problem(format!(
                "port {name:?}: {} is not a port from 1 to 65535, left out",
                port.port
            ));
            continue;
        };
        if ports
            .iter()
            .any(|p| p.port == number && p.protocol == protocol)
        {
            problem(format!(
                "port {name:?} ({number}/{protocol_name}): the same port and protocol as an earlier one, left out"
            ));
            continue;
        }
        let backends = backends(port, slices, &mut problem);
        ports.push(model::ServicePort {
            name,
            port: number,
            protocol,
            backends,
        });
    }
    Some(model::Service {
        namespace: service.metadata.namespace.clone().unwrap_or_default(),
        name: service.metadata.name.clone().unwrap_or_default(),
        cluster_ips,
        ports,
        client_ip_affinity: spec.session_affinity.as_deref() == Some("ClientIP"),
    })
}

/// The ready backends of one Service port: sorted by address and port, each once, at most
/// [`MAX_BACKENDS`] of each family (a cluster IP is translated to backends of its own family
/// only, so the limit holds for each).
fn backends(
    port: &ServicePort,
    slices: &[&EndpointSlice],
    problem: &mut impl FnMut(String),
) -> Vec<model::Backend> {
    let name = port.name.as_deref().unwrap_or_default();
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    let what = format!("port {name:?} ({}/{protocol})", port.port);
    let mut found: BTreeMap<(IpAddr, u16), Option<String>> = BTreeMap::new();
    let mut matched = false;
    let mut unmatched_with_endpoints = false;
    for slice in slices {
        let slice_name = slice.metadata.name.as_deref().unwrap_or_default();
        if slice.address_type == "FQDN" {
            continue;
        }
        let same = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == name
                && p.protocol.as_deref().unwrap_or("TCP") == protocol
        });
        let Some(slice_port) = same else {
            unmatched_with_endpoints |= slice.endpoints.as_ref().is_some_and(|e| !e.is_empty());
            continue;
        };
        matched = true;
        let Some(number) = slice_port
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            problem(format!(
                "{what}: EndpointSlice {slice_name} gives no port from 1 to 65535 ({:?}), its endpoints left out",
                slice_port.port
            ));
            continue;
        };
        let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
        for endpoint in slice.endpoints.iter().flatten() {
            // Absent counts as ready, as the API says.
            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let pod = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    let pod_namespace = r.namespace.as_deref().unwrap_or(namespace);
                    Some(format!("{pod_namespace}/{}", r.name.as_deref()?))
                });
            for text in &endpoint.addresses {
                match text.parse::<IpAddr>() {
                    Ok(address) => {
                        found
                            .entry((address, number))
                            .or_insert_with(|| pod.clone());
                    }
                    Err(_) => problem(format!(
                        "{what}: EndpointSlice {slice_name} has {text:?}, not an address, left out"
                    )),
                }
            }
        }
    }
    if !matched && unmatched_with_endpoints {
        problem(format!(
            "{what}: no EndpointSlice has a port of this name and protocol, so it has no backends"
        ));
    }
    let (mut v4, mut v6) = (0usize, 0usize);
    let mut backends = Vec::with_capacity(found.len().min(2 * MAX_BACKENDS));
    for ((address, port), pod) in found {
        let count = if address.is_ipv4() { &mut v4 } else { &mut v6 };
        *count += 1;
        if *count <= MAX_BACKENDS {
            backends.push(model::Backend { address, port, pod });
        }
    }
    for (family, count) in [("IPv4", v4), ("IPv6", v6)] {
        if count > MAX_BACKENDS {
            problem(format!(
                "{what}: {count} ready {family} backends, more than the limit of {MAX_BACKENDS}; the {} last in address order left out",
                count - MAX_BACKENDS
            ));
        }
    }
    backends
}

/// The protocol's name of `number` as the SERVICE resource carries it.
fn protocol_name(number: u8) -> &'static str {
    match number {
        agent_common::PROTO_UDP => "UDP",
        agent_common::PROTO_SCTP => "SCTP",
        _ => "TCP",
    }
}

fn to_proto(service: &model::Service) -> ward_proto::Service {
    ward_proto::Service {
        namespace: service.namespace.clone(),
        name: service.name.clone(),
        cluster_ips: service
            .cluster_ips
            .iter()
            .map(ToString::to_string)
            .collect(),
        ports: service
            .ports
            .iter()
            .map(|p| ward_proto::ServicePort {
                name: p.name.clone(),
                port: p.port.into(),
                protocol: protocol_name(p.protocol).into(),
                backends: p
                    .backends
                    .iter()
                    .map(|b| ward_proto::ServiceBackend {
                        address: b.address.to_string(),
                        port: b.port.into(),
                        pod: b.pod.clone().unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect(),
        client_ip_affinity: service.client_ip_affinity,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn service(value: Value) -> Service {
        serde_json::from_value(value).expect("a Service")
    }

    fn slice(value: Value) -> EndpointSlice {
        serde_json::from_value(value).expect("an EndpointSlice")
    }

    /// `shop/db`: dual-stack, ports `sql` 5432/TCP and `dns` 53/UDP.
    fn db() -> Value {
        json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {
                "type": "ClusterIP", "clusterIP": "10.96.0.10",
                "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                "ports": [{"name": "sql", "port": 5432, "targetPort": "sql"},
                          {"name": "dns", "port": 53, "protocol": "UDP"}],
            },
        })
    }

    fn endpoint(address: &str, pod: &str, ready: Option<bool>) -> Value {
        let mut e = json!({"addresses": [address],
                           "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}});
        if let Some(ready) = ready {
            e["conditions"] = json!({"ready": ready});
        }
        e
    }

    /// A slice of `shop/db` named `name` with `endpoints`, port `sql` on 15432 and `dns` on 53.
    fn db_slice(name: &str, family: &str, endpoints: Vec<Value>) -> Value {
        json!({
            "metadata": {"name": name, "namespace": "shop",
                         "labels": {SERVICE_NAME_LABEL: "db"}},
            "addressType": family,
            "endpoints": endpoints,
            "ports": [{"name": "sql", "port": 15432, "protocol": "TCP"},
                      {"name": "dns", "port": 53, "protocol": "UDP"}],
        })
    }

    fn build_of(services: &[Value], slices: &[Value]) -> Built {
        let services: Vec<Service> = services.iter().cloned().map(service).collect();
        let slices: Vec<EndpointSlice> = slices.iter().cloned().map(slice).collect();
        build(&services, &slices)
    }

    /// The resource's Service as the agent reads it (agent/src/control/state.rs `service_of`),
    /// checked by the agent's rules.
    fn as_agent_reads_it(resource: &Resource) -> model::Service {
        let Some(Body::Service(s)) = &resource.body else {
            panic!("a Service body: {resource:?}")
        };
        let address = |t: &str| t.parse::<IpAddr>().expect("the agent parses every address");
        let port = |p: u32| {
            u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .expect("a port from 1 to 65535")
        };
        let service = model::Service {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            cluster_ips: s.cluster_ips.iter().map(|ip| address(ip)).collect(),
            ports: s
                .ports
                .iter()
                .map(|p| model::ServicePort {
                    name: p.name.clone(),
                    port: port(p.port),
                    protocol: model::protocol_number(&p.protocol)
                        .expect("a protocol the agent knows"),
                    backends: p
                        .backends
                        .iter()
                        .map(|b| model::Backend {
                            address: address(&b.address),
                            port: port(b.port),
                            pod: (!b.pod.is_empty()).then(|| b.pod.clone()),
                        })
                        .collect(),
                })
                .collect(),
            client_ip_affinity: s.client_ip_affinity,
        };
        assert_eq!(service.invalid(), None, "the agent accepts {service:?}");
        assert_eq!(service.key(), resource.name, "named as the agent expects");
        service
    }

    fn backends_of(service: &model::Service, port: &str) -> Vec<(String, u16, Option<String>)> {
        let port = service
            .ports
            .iter()
            .find(|p| p.name == port)
            .unwrap_or_else(|| panic!("port {port} in {service:?}"));
        port.backends
            .iter()
            .map(|b| (b.address.to_string(), b.port, b.pod.clone()))
            .collect()
    }

    fn has_problem(built: &Built, object: &str, part: &str) -> bool {
        built
            .problems
            .iter()
            .any(|p| p.object == object && p.what.contains(part))
    }

    #[test]
    fn a_service_gets_the_ready_endpoints_of_its_slices_on_the_slices_port() {
        let v4 = db_slice(
            "db-a",
            "IPv4",
            vec![
                endpoint("10.1.0.9", "db-1", None),
                endpoint("10.1.0.5", "db-0", Some(true)),
                endpoint("10.1.0.7", "db-2", Some(false)),
            ],
        );
        let v6 = db_slice("db-b", "IPv6", vec![endpoint("fd00::5", "db-0", None)]);
        // Another Service's slice, and one for no Service.
        let mut other = db_slice("web-a", "IPv4", vec![endpoint("10.1.0.6", "web-0", None)]);
        other["metadata"]["labels"][SERVICE_NAME_LABEL] = "web".into();
        let mut unlabelled = other.clone();
        unlabelled["metadata"]["labels"] = json!({});
        let mut with_affinity = db();
        with_affinity["spec"]["sessionAffinity"] = "ClientIP".into();
        let built = build_of(&[with_affinity], &[v4, v6, other, unlabelled]);
        assert_eq!(built.problems, BTreeSet::new());
        assert_eq!(built.resources.len(), 1);
        let db = as_agent_reads_it(&built.resources["shop/db"]);
        assert_eq!(
            db.cluster_ips,
            [
                "10.96.0.10".parse::<IpAddr>().unwrap(),
                "fd00:96::10".parse().unwrap()
            ]
        );
        assert!(db.client_ip_affinity);
        let pod = |p: &str| Some(format!("shop/{p}"));
        assert_eq!(
            backends_of(&db, "sql"),
            [
                ("10.1.0.5".to_string(), 15432, pod("db-0")),
                ("10.1.0.9".to_string(), 15432, pod("db-1")),
                ("fd00::5".to_string(), 15432, pod("db-0")),
            ],
            "sorted, the not-ready one left out"
        );
        assert_eq!(db.ports[1].protocol, agent_common::PROTO_UDP);
        assert_eq!(backends_of(&db, "dns").len(), 3);
    }

    #[test]
    fn headless_external_name_and_unallocated_services_are_none() {
        let mut headless = db();
        headless["metadata"]["name"] = "headless".into();
        headless["spec"]["clusterIP"] = "None".into();
        headless["spec"]["clusterIPs"] = json!(["None"]);
        let mut external = db();
        external["metadata"]["name"] = "external".into();
        external["spec"] = json!({"type": "ExternalName", "externalName": "db.example.org"});
        let mut unallocated = db();
        unallocated["metadata"]["name"] = "unallocated".into();
        unallocated["spec"] = json!({"ports": [{"port": 80}]});
        let mut single = db();
        single["metadata"]["name"] = "single".into();
        single["spec"]["clusterIPs"] = Value::Null;
        let built = build_of(&[headless, external, unallocated, single], &[]);
        assert_eq!(
            built.resources.keys().collect::<Vec<_>>(),
            ["shop/single"],
            "spec.clusterIP when there are no clusterIPs"
        );
        let single = as_agent_reads_it(&built.resources["shop/single"]);
        assert_eq!(
            single.cluster_ips,
            ["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(built.problems, BTreeSet::new());
    }

    #[test]
    fn an_unnamed_port_and_a_port_without_protocol_are_tcp_and_match_the_slices_unnamed_port() {
        let web = json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 80, "targetPort": 8080}]},
        });
        let slice = json!({
            "metadata": {"name": "web-x", "namespace": "shop",
                         "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.6"]}],
            "ports": [{"port": 8080}],
        });
        let built = build_of(&[web], &[slice]);
        let web = as_agent_reads_it(&built.resources["shop/web"]);
        assert_eq!(web.ports[0].protocol, agent_common::PROTO_TCP);
        assert_eq!(
            backends_of(&web, ""),
            [("10.1.0.6".to_string(), 8080, None)],
            "no targetRef: no pod"
        );
    }

    #[test]
    fn backends_are_counted_once_and_limited_for_each_family() {
        let many = |family: &str, address: &dyn Fn(usize) -> String| {
            let endpoints = (0..=MAX_BACKENDS)
                .map(|i| json!({"addresses": [address(i)]}))
                .collect();
            db_slice(&format!("db-{family}"), family, endpoints)
        };
        let v4 = many("IPv4", &|i| format!("10.1.{}.{}", i >> 8, i & 0xff));
        // The same endpoints again in another slice count once.
        let mut again = db_slice("db-again", "IPv4", vec![endpoint("10.1.0.0", "db-0", None)]);
        again["ports"] = json!([{"name": "sql", "port": 15432}]);
        let built = build_of(&[db()], &[v4, again]);
        let db = &built.resources["shop/db"];
        let model = as_agent_reads_it(db);
        let sql = backends_of(&model, "sql");
        assert_eq!(sql.len(), MAX_BACKENDS);
        assert_eq!(
            sql[0],
            ("10.1.0.0".to_string(), 15432, None),
            "the first slice's"
        );
        assert!(
            has_problem(&built, "shop/db", "the 1 last in address order left out")
                && has_problem(&built, "shop/db", "\"sql\"")
                && has_problem(&built, "shop/db", "IPv4"),
            "{:?}",
            built.problems
        );
    }

    #[test]
    fn a_dual_stack_service_has_the_backends_of_both_families() {
        let half = MAX_BACKENDS / 2;
        let v4: Vec<Value> = (0..half)
            .map(|i| json!({"addresses": [format!("10.1.{}.{}", i >> 8, i & 0xff)]}))
            .collect();
        let v6: Vec<Value> = (0..half)
            .map(|i| json!({"addresses": [format!("fd00::{i:x}")]}))
            .collect();
        let built = build_of(
            &[db()],
            &[db_slice("a", "IPv4", v4), db_slice("b", "IPv6", v6)],
        );
        let db = as_agent_reads_it(&built.resources["shop/db"]);
        assert_eq!(backends_of(&db, "sql").len(), 2 * half);
        assert_eq!(built.problems, BTreeSet::new());
    }

    #[test]
    fn a_service_the_agent_would_refuse_is_never_served() {
        // The limit of IPv4 backends reached, and one IPv6 backend more: within the limit of each
        // family. Served if the agent's rule counts the families apart, else left out and named;
        // never served for the agent to refuse the whole update.
        let v4: Vec<Value> = (0..MAX_BACKENDS)
            .map(|i| json!({"addresses": [format!("10.1.{}.{}", i >> 8, i & 0xff)]}))
            .collect();
        let v6 = vec![json!({"addresses": ["fd00::1"]})];
        let built = build_of(
            &[db()],
            &[db_slice("a", "IPv4", v4), db_slice("b", "IPv6", v6)],
        );
        match built.resources.get("shop/db") {
            Some(resource) => {
                let db = as_agent_reads_it(resource);
                assert_eq!(backends_of(&db, "sql").len(), MAX_BACKENDS + 1);
            }
            None => assert!(
                has_problem(&built, "shop/db", "left out, the agent would refuse it"),
                "{:?}",
                built.problems
            ),
        }
    }

    #[test]
    fn bad_addresses_and_portless_slice_ports_are_skipped_and_the_rest_served() {
        let mut portless = db_slice(
            "db-portless",
            "IPv4",
            vec![endpoint("10.1.0.8", "db-8", None)],
        );
        portless["ports"][0] = json!({"name": "sql", "protocol": "TCP"});
        let bad_address = db_slice(
            "db-a",
            "IPv4",
            vec![
                json!({"addresses": ["10.1.0.300", "10.1.0.5"]}),
                endpoint("10.1.0.6", "db-1", None),
            ],
        );
        let fqdn = {
            let mut s = db_slice(
                "db-fqdn",
                "FQDN",
                vec![json!({"addresses": ["db.example.org"]})],
            );
            s["ports"] = json!([{"name": "sql", "port": 5432}]);
            s
        };
        let built = build_of(&[db()], &[portless, bad_address, fqdn]);
        let db = as_agent_reads_it(&built.resources["shop/db"]);
        assert_eq!(
            backends_of(&db, "sql")
                .into_iter()
                .map(|(a, _, _)| a)
                .collect::<Vec<_>>(),
            ["10.1.0.5", "10.1.0.6"],
            "the bad address skipped, its neighbour kept; nothing of the port-less slice or the FQDN one"
        );
        assert_eq!(
            backends_of(&db, "dns").len(),
            3,
            "the port-less slice's other port is fine"
        );
        assert!(has_problem(
            &built,
            "shop/db",
            "\"10.1.0.300\", not an address"
        ));
        assert!(has_problem(&built, "shop/db", "db-portless gives no port"));
        assert_eq!(
            built.problems.len(),
            3,
            "the bad address for each port: {:?}",
            built.problems
        );
    }

    #[test]
    fn a_pod_the_cluster_does_not_have_is_still_a_backend() {
        // Pods are not looked up: the name is for the logs and `ward policy trace`.
        let slice = db_slice("db-a", "IPv4", vec![endpoint("10.1.0.5", "gone-7", None)]);
        let built = build_of(&[db()], &[slice]);
        let db = as_agent_reads_it(&built.resources["shop/db"]);
        assert_eq!(backends_of(&db, "sql")[0].2.as_deref(), Some("shop/gone-7"));
    }

    #[test]
    fn a_port_no_slice_names_is_served_without_backends() {
        let mut renamed = db_slice("db-a", "IPv4", vec![endpoint("10.1.0.5", "db-0", None)]);
        renamed["ports"][0]["name"] = "postgres".into();
        let built = build_of(&[db()], &[renamed]);
        let served = as_agent_reads_it(&built.resources["shop/db"]);
        assert!(backends_of(&served, "sql").is_empty());
        assert_eq!(backends_of(&served, "dns").len(), 1);
        assert!(has_problem(
            &built,
            "shop/db",
            "no EndpointSlice has a port of this name"
        ));
        // A Service without endpoints at all is no problem: nothing to log.
        let built = build_of(&[db()], &[]);
        assert!(built.problems.is_empty(), "{:?}", built.problems);
        assert!(backends_of(&as_agent_reads_it(&built.resources["shop/db"]), "sql").is_empty());
    }

    #[test]
    fn ports_and_cluster_ips_the_agent_would_refuse_are_left_out_alone() {
        let mut odd = db();
        odd["spec"]["clusterIPs"] = json!(["10.96.0.10", "10.96.0.11", "fd00:96::10", "bogus"]);
        odd["spec"]["ports"] = json!([
            {"name": "sql", "port": 5432},
            {"name": "again", "port": 5432, "protocol": "TCP"},
            {"name": "quic", "port": 443, "protocol": "QUIC"},
            {"name": "zero", "port": 0},
            {"name": "big", "port": 70000},
            {"name": "dns", "port": 5432, "protocol": "UDP"},
        ]);
        let slice = db_slice("db-a", "IPv4", vec![endpoint("10.1.0.5", "db-0", None)]);
        let built = build_of(&[odd], &[slice]);
        let db = as_agent_reads_it(&built.resources["shop/db"]);
        assert_eq!(db.cluster_ips.len(), 2);
        assert_eq!(
            db.ports.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["sql", "dns"],
            "the same port with another protocol is another port"
        );
        for part in [
            "10.96.0.11 is a second address of its family",
            "\"bogus\" is not an address",
            "\"again\" (5432/TCP): the same port and protocol",
            "QUIC): not TCP, UDP or SCTP",
            "\"zero\": 0 is not a port",
            "\"big\": 70000 is not a port",
        ] {
            assert!(
                has_problem(&built, "shop/db", part),
                "{part}: {:?}",
                built.problems
            );
        }
    }

    #[test]
    fn an_object_that_cannot_be_read_is_left_out_and_named() {
        let bad: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "bad", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.30", "ports": [{"port": "http"}]},
        }))
        .expect("any object is a DynamicObject");
        let problem =
            typed::<Service>("Service", "shop/bad", &bad).expect_err("a port that is no number");
        assert_eq!(
            (problem.kind, problem.object.as_str()),
            ("Service", "shop/bad")
        );
        assert!(problem.what.contains("cannot be read"), "{problem:?}");
        let mut good_value = db();
        good_value["apiVersion"] = "v1".into();
        good_value["kind"] = "Service".into();
        let good: DynamicObject = serde_json::from_value(good_value).expect("an object");
        let good: k8s_openapi::api::core::v1::Service =
            typed("Service", "shop/db", &good).expect("a Service");
        assert_eq!(
            good.spec.and_then(|s| s.cluster_ip).as_deref(),
            Some("10.96.0.10")
        );
    }
}
