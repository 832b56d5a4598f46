use std::path::Path;

use agent_common::*;

use super::*;
use crate::compile::Slot;
use crate::testing::{
    conformance_table, diff_example, policy, set, web_client_db, workload, ConformanceTable,
};
use crate::{parse, NamedPort};

/// Pods a, b, c in namespaces x, y, z, as the conformance file describes them.
fn pods(conformance: &ConformanceTable) -> Vec<WorkloadInfo> {
    let mut pods = Vec::new();
    for (n, namespace) in ["x", "y", "z"].into_iter().enumerate() {
        for (p, name) in ["a", "b", "c"].into_iter().enumerate() {
            let address = format!("10.0.{n}.{}", p + 1);
            let mut pod = workload(
                300 + pods.len() as u32,
                &format!("{namespace}/{name}"),
                &[("pod", name)],
                &[&address],
            );
            pod.namespace = Some(namespace.into());
            pod.namespace_labels = conformance
                .namespace_labels
                .get(namespace)
                .cloned()
                .unwrap_or_default();
            let ports = conformance.container_ports.get(name).into_iter().flatten();
            pod.ports = ports
                .map(|p| NamedPort {
                    name: p.name.clone(),
                    protocol: match p.protocol.as_deref() {
                        Some("UDP") => PROTO_UDP,
                        _ => PROTO_TCP,
                    },
                    port: p.port,
                })
                .collect();
            pods.push(pod);
        }
    }
    pods
}

#[test]
fn trace_follows_the_networkpolicy_conformance_table() {
    let conformance = conformance_table();
    assert!(
        conformance.scenarios.len() >= 40,
        "the table covers the documented semantics"
    );
    let pods = pods(&conformance);
    for scenario in &conformance.scenarios {
        let name = &scenario.name;
        let set =
            parse(Path::new(name), &scenario.policies).unwrap_or_else(|e| panic!("{name}: {e}"));
        let port: crate::PortArg = scenario
            .port
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let rows: Vec<Vec<char>> = scenario
            .reachability
            .lines()
            .map(|line| {
                line.split_once(':')
                    .expect("row label")
                    .1
                    .chars()
                    .filter(|c| ".X".contains(*c))
                    .collect()
            })
            .collect();
        assert!(
            rows.len() == 9 && rows.iter().all(|r| r.len() == 9),
            "{name}: a 9x9 matrix"
        );
        let mut wrong = Vec::new();
        for (i, from) in pods.iter().enumerate() {
            for (j, to) in pods.iter().enumerate() {
                if i == j {
                    continue;
                }
                let traced = trace(
                    &set,
                    &pods,
                    Endpoint::Workload(from),
                    Endpoint::Workload(to),
                    port.protocol,
                    port.port,
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
                let got = if combine(&traced.legs).0 == VERDICT_DENY {
                    'X'
                } else {
                    '.'
                };
                if got != rows[i][j] {
                    wrong.push(format!(
                        "{} -> {}: expected {}, traced {got}",
                        from.name, to.name, rows[i][j]
                    ));
                }
            }
        }
        assert!(wrong.is_empty(), "scenario {name:?}:\n{}", wrong.join("\n"));
    }
}

#[test]
fn trace_lists_every_matching_rule_and_the_deciding_leg() {
    let yaml = policy(
        "web",
        "  selector: {labels: {app: web}}\n  ingress:\n    - name: from-client\n      from: [{labels: {app: client}}]\n      ports: [{port: 8080}]\n    - name: anyone\n      ports: [{protocol: TCP}]",
    ) + &policy("client-out", "  selector: {labels: {app: client}}\n  egress:\n    - name: no-web\n      action: deny\n      to: [{cidr: 10.0.0.0/24}]");
    let (set, ws) = (set(&yaml), web_client_db());
    let (client, web) = (Endpoint::Workload(&ws[1]), Endpoint::Workload(&ws[0]));
    let traced = trace(&set, &ws, client, web, PROTO_TCP, 8080).expect("trace");
    let names = |leg: &Leg| -> Vec<(String, Slot)> {
        leg.matches
            .iter()
            .map(|c| (traced.compiled.rules[&c.rule].rule.clone(), c.slot))
            .collect()
    };
    assert_eq!(traced.legs.len(), 2, "egress of client, ingress of web");
    assert_eq!(
        traced.legs[0].decision.verdict, VERDICT_DENY,
        "client's egress deny"
    );
    assert_eq!(
        names(&traced.legs[0]),
        [
            ("no-web".to_owned(), Slot::Deny),
            ("default-deny".to_owned(), Slot::Deny)
        ]
    );
    let ingress = &traced.legs[1];
    assert_eq!(
        ingress.decision.verdict, VERDICT_ALLOW,
        "web would admit the client"
    );
    let expected = [
        ("from-client".to_owned(), Slot::Allow),
        ("anyone".to_owned(), Slot::Allow),
        ("default-deny".to_owned(), Slot::Deny),
    ];
    assert_eq!(
        names(ingress),
        expected,
        "both allow rules and the isolation are listed"
    );
    let (verdict, deciding) = combine(&traced.legs);
    assert_eq!(
        (verdict, deciding.map(|l| l.direction)),
        (VERDICT_DENY, Some(DIRECTION_EGRESS)),
        "the deny decides"
    );

    let outsider = Endpoint::resolve("192.0.2.7", &ws).expect("an address resolves");
    assert_eq!(
        outsider,
        Endpoint::Address("192.0.2.7".parse().expect("address"))
    );
    let traced = trace(&set, &ws, outsider, web, PROTO_TCP, 22).expect("trace");
    assert_eq!(traced.legs.len(), 1, "only the workload side has policy");
    assert_eq!(combine(&traced.legs).0, VERDICT_ALLOW, "anyone on tcp");
}

#[test]
fn trace_shows_the_redirect_a_destinations_mtls_rule_demands_of_its_source() {
    let yaml = policy(
        "web-tls",
        "  selector: {labels: {app: web}}\n  ingress:\n    - name: tls\n      from: [{labels: {app: client}}]\n      ports: [{port: 443}]\n      mtls: required",
    );
    let (set, ws) = (set(&yaml), web_client_db());
    let (client, web) = (Endpoint::Workload(&ws[1]), Endpoint::Workload(&ws[0]));
    let traced = trace(&set, &ws, client, web, PROTO_TCP, 443).expect("trace");
    let egress = &traced.legs[0];
    assert_eq!(egress.direction, DIRECTION_EGRESS);
    assert_eq!(
        (egress.decision.verdict, egress.decision.isolated),
        (VERDICT_REDIRECT, true),
        "client has no egress policy, yet the connect hook redirects it"
    );
    assert_eq!(traced.compiled.rules[&egress.decision.rule].rule, "tls");
    let traced = trace(&set, &ws, client, web, PROTO_UDP, 443).expect("trace");
    assert!(
        !traced.legs[0].decision.isolated,
        "the tunnel carries TCP only"
    );
}

/// Client may reach api.payments.example and `*.example.com` on 443, and never 203.0.113.0/24.
fn dns_egress() -> PolicySet {
    set(&policy(
        "client-out",
        "  selector: {labels: {app: client}}\n  egress:\n    - name: payments\n      to: [{fqdn: api.payments.example}, {fqdnPattern: '*.example.com'}]\n      ports: [{port: 443}]\n    - name: no-testnet\n      action: deny\n      to: [{cidr: 203.0.113.0/24}]",
    ))
}

#[test]
fn trace_decides_an_address_learned_from_a_name_as_the_name() {
    let (set, ws) = (dns_egress(), web_client_db());
    let client = Endpoint::Workload(&ws[1]);
    let address = |a: &str| Endpoint::Address(a.parse().expect("address"));
    let learned = |to, name, port| {
        trace_learned(&set, &ws, client, to, name, PROTO_TCP, port).expect("trace")
    };
    let traced = learned(address("192.0.2.10"), "API.Payments.Example.", 443);
    let leg = &traced.legs[0];
    let api = traced.compiled.fqdn[&crate::FqdnSelector::Name("api.payments.example".into())];
    assert_eq!(
        (
            leg.learned_from.as_deref(),
            leg.selectors.as_slice(),
            leg.by_name
        ),
        (Some("api.payments.example"), [api].as_slice(), true)
    );
    assert_eq!(
        (leg.decision.verdict, leg.decision.selector),
        (VERDICT_ALLOW, Some(api)),
        "allowed as fqdn:api.payments.example"
    );
    assert_eq!(traced.compiled.rules[&leg.decision.rule].rule, "payments");
    let read: Vec<(u32, Slot)> = leg
        .matches
        .iter()
        .map(|c| (c.key.remote_identity, c.slot))
        .collect();
    assert_eq!(
        read,
        [(api, Slot::Allow), (REMOTE_ISOLATION, Slot::Deny)],
        "the selector's entry is among what the kernel reads"
    );

    let other_port = learned(address("192.0.2.10"), "api.payments.example", 80);
    assert_eq!(
        (
            other_port.legs[0].decision.verdict,
            other_port.legs[0].decision.selector
        ),
        (VERDICT_DENY, None)
    );
    let denied = learned(address("203.0.113.9"), "api.payments.example", 443);
    let leg = &denied.legs[0];
    assert_eq!(
        (leg.decision.verdict, leg.by_name),
        (VERDICT_DENY, false),
        "the deny of the address decides before its name"
    );
    assert_eq!(denied.compiled.rules[&leg.decision.rule].rule, "no-testnet");

    let any = learned(Endpoint::World, "www.example.com", 443);
    assert_eq!(
        (any.legs.len(), combine(&any.legs).0),
        (1, VERDICT_ALLOW),
        "any address of a name the pattern matches"
    );
    let unnamed = learned(Endpoint::World, "a.b.example.com", 443);
    assert!(
        unnamed.legs[0].selectors.is_empty(),
        "two labels for one `*`"
    );
    assert_eq!(combine(&unnamed.legs).0, VERDICT_DENY);

    let plain = trace(&set, &ws, client, address("192.0.2.10"), PROTO_TCP, 443).expect("trace");
    assert_eq!(
        (
            plain.legs[0].learned_from.as_deref(),
            combine(&plain.legs).0
        ),
        (None, VERDICT_DENY),
        "without the name, only the isolation decides"
    );
    let to_web = learned(Endpoint::Workload(&ws[0]), "www.example.com", 443);
    assert_eq!(
        (to_web.legs.len(), to_web.legs[1].learned_from.as_deref()),
        (2, None),
        "a name resolving to a workload: its ingress still decides, by address"
    );
}

#[test]
fn diff_shows_a_changed_dns_name() {
    let old = dns_egress();
    let new = set(&policy(
        "client-out",
        "  selector: {labels: {app: client}}\n  egress:\n    - name: payments\n      to: [{fqdn: api2.payments.example}, {fqdnPattern: '*.example.com'}]\n      ports: [{port: 443}, {port: 8443}]\n    - name: no-testnet\n      action: deny\n      to: [{cidr: 203.0.113.0/24}]",
    ));
    let changes = diff(&old, &new, &web_client_db()).expect("diff");
    assert_eq!(
        diff_human(&changes),
        "- client -> api.payments.example tcp/443: allow -> deny\n+ client -> api2.payments.example tcp/443,8443: deny -> allow\n+ client -> *.example.com tcp/8443: deny -> allow\n3 changes: 2 gain access, 1 lose access\n",
        "{changes:#?}"
    );
    assert!(diff(&old, &old, &web_client_db()).expect("diff").is_empty());
}

#[test]
fn endpoints_resolve_by_name_spiffe_id_and_address() {
    let ws = web_client_db();
    let by = |text: &str| Endpoint::resolve(text, &ws).map(|e| e.to_string());
    assert_eq!(by("db"), Ok("db".into()));
    assert_eq!(
        by("spiffe://example.org/ns/demo/sa/client"),
        Ok("client".into())
    );
    assert_eq!(
        by("10.1.0.4"),
        Ok("db".into()),
        "a workload's address is the workload"
    );
    assert_eq!(
        by("::ffff:10.1.0.4"),
        Ok("db".into()),
        "mapped addresses too"
    );
    assert!(
        by("nobody").is_err_and(|e| e.contains("`nobody`")),
        "unknown names are refused"
    );
}

#[test]
fn diff_reports_gained_and_lost_access_with_port_ranges() {
    let (old, new) = diff_example();
    let changes = diff(&old, &new, &web_client_db()).expect("diff");
    type Summary<'a> = (&'a str, &'a str, u8, Vec<(u16, u16)>, bool, u8, u8);
    let summary: Vec<Summary<'_>> = changes
        .iter()
        .map(|c| {
            (
                c.from.as_str(),
                c.to.as_str(),
                c.protocol,
                c.ports.clone(),
                c.other_ports,
                c.before,
                c.after,
            )
        })
        .collect();
    let (allow, deny, tcp, udp) = (VERDICT_ALLOW, VERDICT_DENY, PROTO_TCP, PROTO_UDP);
    assert_eq!(
        summary,
        [
            ("client", "db", tcp, vec![(5432, 5432)], false, deny, allow),
            ("client", "db", tcp, vec![(9000, 9002)], false, allow, deny),
            ("192.168.0.0/16", "db", tcp, vec![], true, deny, allow),
            ("192.168.0.0/16", "db", udp, vec![], true, deny, allow),
            (
                "192.168.0.0/16",
                "db",
                PROTO_SCTP,
                vec![],
                true,
                deny,
                allow
            ),
            // An IPv4 range speaks ICMP, not ICMPv6.
            (
                "192.168.0.0/16",
                "db",
                PROTO_ICMP,
                vec![],
                true,
                deny,
                allow
            ),
        ],
        "{changes:#?}"
    );
    assert!(
        diff(&new, &new, &web_client_db()).expect("diff").is_empty(),
        "no change, no difference"
    );
}

#[test]
fn free_address_avoids_more_specific_prefixes() {
    let net = |s: &str| s.parse::<IpNet>().expect("prefix");
    let taken = [
        net("10.0.0.0/9"),
        net("10.128.0.0/10"),
        net("10.192.0.0/32"),
    ];
    assert_eq!(
        free_address(net("10.0.0.0/8"), &taken),
        Some("10.192.0.1".parse().expect("address"))
    );
    assert_eq!(
        free_address(net("10.0.0.0/8"), &[net("10.0.0.0/9"), net("10.128.0.0/9")]),
        None,
        "fully covered"
    );
}
