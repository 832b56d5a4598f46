//! What the `policy_parse` fuzz target (`fuzz/`) does with each input: parse it as policy
//! documents, compile what loads for a few workloads, and ask the compiled map a few questions,
//! of addresses learned from a few DNS names too.
//! Any text in, no panic out. The unit tests replay the committed corpus through the same
//! function, so CI checks every corpus input without cargo-fuzz.

use std::net::IpAddr;
use std::path::Path;

use agent_common::{
    icmp_type_port, DIRECTION_EGRESS, DIRECTION_INGRESS, IDENTITY_ANY, IDENTITY_WORLD, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};

use crate as policy;

fn workloads() -> Vec<policy::WorkloadInfo> {
    let workload = |identity: u32, name: &str, namespace: &str, app: &str, address: &str| {
        policy::WorkloadInfo {
            identity,
            name: name.into(),
            spiffe_id: format!("spiffe://example.org/ns/{namespace}/sa/{name}"),
            namespace: Some(namespace.into()),
            namespace_labels: [("team".to_owned(), namespace.to_owned())].into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            addresses: vec![address.parse().expect("valid address")],
            ports: vec![policy::NamedPort {
                name: "http".into(),
                protocol: PROTO_TCP,
                port: 80,
            }],
        }
    };
    vec![
        workload(300, "web", "demo", "web", "10.0.0.2"),
        workload(301, "client", "demo", "client", "10.0.0.3"),
        workload(302, "db", "x", "db", "fd00::4"),
    ]
}

/// One fuzz input; panics on any inconsistency the compiled map must not have.
pub fn parse_compile_decide(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(set) = policy::parse(Path::new("fuzz.yaml"), text) else {
        return;
    };
    let workloads = workloads();
    let Ok(compiled) = policy::compile(&set, &workloads, &mut policy::RuleIds::new()) else {
        return;
    };
    let addresses = ["10.0.0.2", "10.1.2.3", "::1", "fd00::9"]
        .map(|a| a.parse::<IpAddr>().expect("valid address"));
    let mut remotes: Vec<u32> = addresses
        .iter()
        .map(|a| compiled.remote_identity(*a, &workloads))
        .collect();
    remotes.extend(
        workloads
            .iter()
            .map(|w| w.identity)
            .chain([IDENTITY_ANY, IDENTITY_WORLD]),
    );
    for local in &workloads {
        let selectors = compiled.fqdn_identities(local.identity, &["api.example.com", "x.example"]);
        for &remote in &remotes {
            for direction in [DIRECTION_INGRESS, DIRECTION_EGRESS] {
                for (protocol, port) in [
                    (PROTO_TCP, 80),
                    (PROTO_UDP, 53),
                    (PROTO_TCP, 65535),
                    (PROTO_SCTP, 80),
                    (PROTO_ICMP, icmp_type_port(8)),
                    (PROTO_ICMPV6, icmp_type_port(0)),
                ] {
                    let decision =
                        compiled.decide(local.identity, remote, direction, protocol, port);
                    assert!(
                        decision.isolated || decision.rule == 0,
                        "an untouched workload names no rule"
                    );
                    assert!(
                        !decision.isolated || decision.rule != 0,
                        "every verdict on an isolated workload names its rule"
                    );
                    let learned = compiled.decide_learned(
                        local.identity,
                        remote,
                        &selectors,
                        direction,
                        protocol,
                        port,
                    );
                    match learned.selector {
                        None => assert_eq!(learned, decision, "no selector decided: the address did"),
                        Some(selector) => assert!(
                            !decision.settled && selectors.contains(&selector),
                            "a learned name changes only what no enforcing rule settled, by one of its selectors"
                        ),
                    }
                }
            }
        }
    }
}
