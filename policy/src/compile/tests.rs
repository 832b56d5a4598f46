use std::collections::BTreeMap;
use std::net::IpAddr;

use agent_common::*;

use super::*;
use crate::direction_name;
use crate::testing::{policy, set, workload};

const WEB: u32 = 300;
const CLIENT: u32 = 301;
const DB: u32 = 302;
const OTHER: u32 = 303;

fn workloads() -> Vec<WorkloadInfo> {
    vec![
        workload(WEB, "web", &[("app", "web")], &["10.0.0.2", "fd00::2"]),
        workload(CLIENT, "client", &[("app", "client")], &["10.0.0.3"]),
        workload(DB, "db", &[("app", "db")], &["10.1.0.4", "fd00:1::4"]),
        workload(OTHER, "other", &[("app", "other")], &[]),
    ]
}

fn compiled(yaml: &str) -> Compiled {
    compile(&set(yaml), &workloads(), &mut RuleIds::new())
        .unwrap_or_else(|e| panic!("does not compile: {e}"))
}

/// The id of a rule, looked up by policy and rule name.
fn rule_id(compiled: &Compiled, policy: &str, rule: &str) -> u32 {
    let found = compiled
        .rules
        .iter()
        .find(|(_, info)| info.policy == policy && info.rule == rule);
    found
        .map(|(id, _)| *id)
        .unwrap_or_else(|| panic!("no rule {policy}/{rule} in {:?}", compiled.rules))
}

fn verdict(
    compiled: &Compiled,
    local: u32,
    remote: u32,
    direction: u8,
    protocol: u8,
    port: u16,
) -> (u8, u32) {
    let decision = compiled.decide(local, remote, direction, protocol, port);
    (decision.verdict, decision.rule)
}

const IN: u8 = DIRECTION_INGRESS;
const OUT: u8 = DIRECTION_EGRESS;
const TCP: u8 = PROTO_TCP;
const UDP: u8 = PROTO_UDP;

#[test]
fn small_policy_compiles_to_exact_entries() {
    let compiled = compiled(&policy(
        "web-ingress",
        "  selector: {labels: {app: web}}\n  ingress:\n    - name: from-client\n      from: [{labels: {app: client}}]\n      ports: [{port: 8080}]",
    ));
    let expected = BTreeMap::from([
        (
            super::isolation_key(WEB, IN),
            PolicyValue {
                deny_rule: 1,
                // Its only rule names a peer and a port: every other lookup could only miss.
                flags: POLICY_FLAGS_ABSENT,
                ..Default::default()
            },
        ),
        (
            super::policy_key(WEB, CLIENT, IN, TCP, 8080),
            PolicyValue {
                allow_rule: 2,
                ..Default::default()
            },
        ),
    ]);
    assert_eq!(compiled.entries, expected, "entries of web-ingress");
    let names: Vec<_> = compiled
        .rules
        .iter()
        .map(|(id, i)| (*id, i.rule.as_str(), i.action))
        .collect();
    assert_eq!(
        names,
        [
            (1, "default-deny", RuleAction::DefaultDeny),
            (2, "from-client", RuleAction::Allow)
        ]
    );
    assert!(
        compiled.prefixes.is_empty(),
        "no CIDR in use: {:?}",
        compiled.prefixes
    );
    assert_eq!(
        verdict(&compiled, WEB, CLIENT, IN, TCP, 8080),
        (VERDICT_ALLOW, 2),
        "client may reach web:8080"
    );
    assert_eq!(
        verdict(&compiled, WEB, CLIENT, IN, TCP, 8081),
        (VERDICT_DENY, 1),
        "other port is default-denied"
    );
    assert_eq!(
        verdict(&compiled, WEB, DB, IN, TCP, 8080),
        (VERDICT_DENY, 1),
        "db is not a peer"
    );
}

#[test]
fn absent_peers_and_ports_are_wildcards() {
    let compiled = compiled(&policy(
        "wild",
        "  selector: {labels: {app: web}}\n  ingress:\n    - name: anything\n    - name: dns\n      from: [{labels: {app: db}}]\n      ports: [{protocol: UDP}]\n  egress:\n    - name: any-udp-53\n      ports: [{port: 53, protocol: UDP}]",
    ));
    let anything = rule_id(&compiled, "wild", "anything");
    assert_eq!(
        compiled.entries[&super::policy_key(WEB, IDENTITY_ANY, IN, PROTO_ANY, PORT_ANY)].allow_rule,
        anything
    );
    assert_eq!(
        verdict(&compiled, WEB, IDENTITY_WORLD, IN, TCP, 1),
        (VERDICT_ALLOW, anything),
        "any peer, any port"
    );
    let dns = rule_id(&compiled, "wild", "dns");
    assert_eq!(
        compiled.entries[&super::policy_key(WEB, DB, IN, UDP, PORT_ANY)].allow_rule,
        dns
    );
    assert_eq!(
        verdict(&compiled, WEB, DB, IN, UDP, 5353),
        (VERDICT_ALLOW, dns),
        "specific key comes first"
    );
    let any_53 = rule_id(&compiled, "wild", "any-udp-53");
    assert_eq!(
        verdict(&compiled, WEB, DB, OUT, UDP, 53),
        (VERDICT_ALLOW, any_53),
        "any remote on udp/53"
    );
    let egress_deny = compiled
        .rules
        .iter()
        .find(|(_, i)| i.direction == OUT && i.action == RuleAction::DefaultDeny);
    assert_eq!(
        verdict(&compiled, WEB, DB, OUT, TCP, 53).0,
        VERDICT_DENY,
        "tcp/53 is not allowed"
    );
    assert_eq!(
        verdict(&compiled, WEB, DB, OUT, TCP, 53).1,
        *egress_deny.expect("egress default deny").0
    );
}

#[test]
fn deny_beats_allow_of_other_policies_and_of_more_specific_keys() {
    let yaml = policy(
        "allow",
        "  selector: {labels: {app: web}}\n  ingress:\n    - name: client-8080\n      from: [{labels: {app: client}}]\n      ports: [{port: 8080}]\n    - name: all",
    ) + &policy(
        "deny",
        "  selector: {labels: {app: web}}\n  ingress:\n    - name: no-client\n      action: deny\n      from: [{labels: {app: client}}]\n      ports: [{port: 8080}, {port: 9000}]\n    - name: no-one-on-22\n      action: deny\n      ports: [{port: 22}]",
    );
    let compiled = compiled(&yaml);
    let no_client = rule_id(&compiled, "deny", "no-client");
    let no_one = rule_id(&compiled, "deny", "no-one-on-22");
    assert_eq!(
        verdict(&compiled, WEB, CLIENT, IN, TCP, 8080),
        (VERDICT_DENY, no_client),
        "deny of another policy, same key"
    );
    assert_eq!(
        verdict(&compiled, WEB, CLIENT, IN, TCP, 22),
        (VERDICT_DENY, no_one),
        "wildcard deny beats specific allow"
    );
    assert_eq!(
        verdict(&compiled, WEB, DB, IN, TCP, 9000),
        (VERDICT_ALLOW, rule_id(&compiled, "allow", "all")),
        "deny only names client"
    );
}

#[test]
fn audit_mode_semantics() {
    let audit_only = policy("audit", "  mode: audit\n  selector: {labels: {app: web}}\n  ingress:\n    - name: client\n      from: [{labels: {app: client}}]");
    let enforce_allow = policy("enforce", "  selector: {labels: {app: web}}\n  ingress:\n    - name: db\n      from: [{labels: {app: db}}]");
    let audit_deny = policy("audit-deny", "  mode: audit\n  selector: {labels: {app: web}}\n  ingress:\n    - name: no-db\n      action: deny\n      from: [{labels: {app: db}}]");

    let compiled_audit = compiled(&audit_only);
    let audit_default = rule_id(&compiled_audit, "audit", "default-deny");
    assert_eq!(
        compiled_audit.entries[&super::isolation_key(WEB, IN)].audit_deny_rule,
        audit_default
    );
    assert_eq!(
        verdict(&compiled_audit, WEB, DB, IN, TCP, 80),
        (VERDICT_AUDIT, audit_default),
        "audit policy alone audits"
    );
    let client = rule_id(&compiled_audit, "audit", "client");
    assert_eq!(
        verdict(&compiled_audit, WEB, CLIENT, IN, TCP, 80),
        (VERDICT_ALLOW, client),
        "audit allow passes quietly"
    );

    let both = compiled(&(audit_only.clone() + &enforce_allow));
    let db = rule_id(&both, "enforce", "db");
    assert_eq!(
        verdict(&both, WEB, DB, IN, TCP, 80),
        (VERDICT_ALLOW, db),
        "enforce allow + audit isolation allows"
    );
    let enforce_default = rule_id(&both, "enforce", "default-deny");
    assert_eq!(
        verdict(&both, WEB, CLIENT, IN, TCP, 80),
        (VERDICT_DENY, enforce_default),
        "enforce isolation without enforce allow denies even though audit allows"
    );

    let audited_deny = compiled(&(enforce_allow + &audit_deny));
    let no_db = rule_id(&audited_deny, "audit-deny", "no-db");
    assert_eq!(
        verdict(&audited_deny, WEB, DB, IN, TCP, 80),
        (VERDICT_AUDIT, no_db),
        "audit deny over enforce allow audits"
    );
}

#[test]
fn cidr_peers_select_prefixes_and_workload_addresses_outside_excepts() {
    let yaml = policy(
        "egress",
        "  selector: {labels: {app: web}}\n  egress:\n    - name: tens\n      to: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}, {cidr: 'fd00::/8', except: ['fd00:1::/32']}]\n      ports: [{port: 443}]",
    ) + &policy(
        "more",
        "  selector: {labels: {app: db}}\n  ingress:\n    - from: [{cidr: 10.1.2.0/24}, {cidr: 10.3.0.0/16}]",
    );
    let compiled = compiled(&yaml);
    let id = |net: &str| compiled.prefixes[&net.parse::<IpNet>().expect("test prefix")];
    let ids: Vec<u32> = [
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/24",
        "10.3.0.0/16",
        "fd00::/8",
        "fd00:1::/32",
    ]
    .map(id)
    .to_vec();
    assert!(
        ids.iter().all(|i| *i >= crate::identity::FIRST_CIDR),
        "CIDR identities in their range: {ids:?}"
    );
    assert_eq!(
        compiled.prefixes.len(),
        6,
        "one identity per prefix: {:?}",
        compiled.prefixes
    );
    let tens = rule_id(&compiled, "egress", "tens");
    let allowed: Vec<u32> = compiled
        .entries
        .iter()
        .filter(|(k, v)| k.local_identity == WEB && v.allow_rule == tens)
        .map(|(k, _)| k.remote_identity)
        .collect();
    let expected = vec![
        WEB,
        CLIENT,
        id("10.0.0.0/8"),
        id("10.3.0.0/16"),
        id("fd00::/8"),
    ];
    assert_eq!(allowed, expected, "web's and client's addresses are inside, db's in the except; 10.3/16 lies inside, 10.1.2/24 in the except");
    let ws = workloads();
    let remote =
        |addr: &str| compiled.remote_identity(addr.parse::<IpAddr>().expect("test address"), &ws);
    assert_eq!(remote("10.0.0.3"), CLIENT, "workload address first");
    assert_eq!(
        remote("::ffff:10.0.0.3"),
        CLIENT,
        "mapped addresses are canonical"
    );
    assert_eq!(remote("10.9.9.9"), id("10.0.0.0/8"));
    assert_eq!(remote("10.1.2.9"), id("10.1.2.0/24"), "longest prefix");
    assert_eq!(remote("10.1.3.9"), id("10.1.0.0/16"));
    assert_eq!(remote("fd00:1::9"), id("fd00:1::/32"));
    assert_eq!(remote("8.8.8.8"), IDENTITY_WORLD);
    for (addr, expected) in [
        ("10.9.9.9", VERDICT_ALLOW),
        ("10.3.0.1", VERDICT_ALLOW),
        ("fd00:2::1", VERDICT_ALLOW),
        ("10.1.3.9", VERDICT_DENY),
        ("10.1.2.9", VERDICT_DENY),
        ("fd00:1::9", VERDICT_DENY),
        ("8.8.8.8", VERDICT_DENY),
        ("10.1.0.4", VERDICT_DENY),
    ] {
        assert_eq!(
            verdict(&compiled, WEB, remote(addr), OUT, TCP, 443).0,
            expected,
            "web to {addr}:443"
        );
    }
}

#[test]
fn ipv6_default_route_does_not_catch_ipv4() {
    let compiled = compiled(&policy(
        "v6",
        "  selector: {labels: {app: web}}\n  egress:\n    - to: [{cidr: '::/0'}]",
    ));
    assert_eq!(
        compiled
            .prefixes
            .get(&"0.0.0.0/0".parse::<IpNet>().expect("prefix")),
        Some(&IDENTITY_WORLD),
        "guard prefix"
    );
    let ws = workloads();
    let v4 = compiled.remote_identity("1.2.3.4".parse().expect("address"), &ws);
    let v6 = compiled.remote_identity("2001:db8::1".parse().expect("address"), &ws);
    assert_eq!(v4, IDENTITY_WORLD, "IPv4 stays world");
    assert_eq!(
        verdict(&compiled, WEB, v4, OUT, TCP, 80).0,
        VERDICT_DENY,
        "::/0 does not allow IPv4"
    );
    assert_eq!(
        verdict(&compiled, WEB, v6, OUT, TCP, 80).0,
        VERDICT_ALLOW,
        "::/0 allows IPv6"
    );
}

#[test]
fn port_ranges_expand_to_one_entry_per_port() {
    let compiled = compiled(&policy(
        "range",
        "  selector: {labels: {app: web}}\n  ingress:\n    - from: [{labels: {app: client}}]\n      ports: [{port: 9000, endPort: 9002, protocol: UDP}, {port: 9001, protocol: UDP}]",
    ));
    let ports: Vec<(u8, u16)> = compiled
        .entries
        .keys()
        .filter(|k| k.remote_identity == CLIENT)
        .map(|k| (k.protocol, k.port))
        .collect();
    assert_eq!(
        ports,
        [(UDP, 9000), (UDP, 9001), (UDP, 9002)],
        "one entry per port of the range"
    );
    assert_eq!(
        verdict(&compiled, WEB, CLIENT, IN, UDP, 9003).0,
        VERDICT_DENY,
        "past the range"
    );
    assert_eq!(
        verdict(&compiled, WEB, CLIENT, IN, TCP, 9001).0,
        VERDICT_DENY,
        "other protocol"
    );
}

#[test]
fn icmp_types_and_sctp_compile_to_their_protocol_keys() {
    let compiled = compiled(&policy(
        "ping",
        "  selector: {labels: {app: web}}\n  ingress:\n    - name: echo\n      from: [{labels: {app: client}}]\n      ports: [{protocol: ICMP, icmpType: 8}, {protocol: ICMPv6, icmpType: 128}, {protocol: ICMP, icmpType: 0}]\n    - name: any-icmp\n      from: [{labels: {app: db}}]\n      ports: [{protocol: icmp}, {protocol: SCTP, port: 9}, {protocol: SCTP}]",
    ));
    let keys = |remote: u32| -> Vec<(u8, u16)> {
        let keys = compiled.entries.keys();
        let keys = keys.filter(|k| k.remote_identity == remote && k.direction == IN);
        keys.map(|k| (k.protocol, k.port)).collect()
    };
    assert_eq!(
        keys(CLIENT),
        [
            (PROTO_ICMP, ICMP_TYPE_PORT_BASE),
            (PROTO_ICMP, ICMP_TYPE_PORT_BASE + 8),
            (PROTO_ICMPV6, ICMP_TYPE_PORT_BASE + 128),
        ],
        "one key per type, echo reply (0) is not PORT_ANY"
    );
    assert_eq!(
        keys(DB),
        [(PROTO_ICMP, PORT_ANY), (132, PORT_ANY), (132, 9)],
        "every ICMP type; SCTP is protocol 132"
    );
    let (echo, any_icmp) = (
        rule_id(&compiled, "ping", "echo"),
        rule_id(&compiled, "ping", "any-icmp"),
    );
    let icmp = |t: u8| icmp_type_port(t);
    assert_eq!(
        verdict(&compiled, WEB, CLIENT, IN, PROTO_ICMP, icmp(8)),
        (VERDICT_ALLOW, echo)
    );
    assert_eq!(
        verdict(&compiled, WEB, CLIENT, IN, PROTO_ICMPV6, icmp(128)),
        (VERDICT_ALLOW, echo)
    );
    assert_eq!(
        verdict(&compiled, WEB, CLIENT, IN, PROTO_ICMP, icmp(13)).0,
        VERDICT_DENY,
        "a type the rule does not name"
    );
    assert_eq!(
        verdict(&compiled, WEB, CLIENT, IN, PROTO_ICMPV6, icmp(8)).0,
        VERDICT_DENY,
        "ICMP and ICMPv6 are distinct protocols"
    );
    assert_eq!(
        verdict(&compiled, WEB, DB, IN, PROTO_ICMP, icmp(13)),
        (VERDICT_ALLOW, any_icmp),
        "every ICMP type"
    );
    assert_eq!(
        verdict(&compiled, WEB, DB, IN, PROTO_ICMPV6, icmp(128)).0,
        VERDICT_DENY,
        "{{protocol: ICMP}} is not ICMPv6"
    );
    assert_eq!(
        verdict(&compiled, WEB, DB, IN, PROTO_SCTP, 5000),
        (VERDICT_ALLOW, any_icmp)
    );
    assert_eq!(
        verdict(&compiled, WEB, DB, IN, PROTO_UDPLITE, 9).0,
        VERDICT_DENY,
        "a protocol no rule names is refused"
    );
}

#[test]
fn a_rule_without_ports_matches_icmp_too() {
    let compiled = compiled(&policy(
        "open",
        "  selector: {labels: {app: web}}\n  ingress:\n    - name: from-client\n      from: [{labels: {app: client}}]",
    ));
    let rule = rule_id(&compiled, "open", "from-client");
    for (protocol, port) in [
        (PROTO_ICMP, icmp_type_port(8)),
        (PROTO_ICMPV6, icmp_type_port(128)),
        (PROTO_SCTP, 9),
        (PROTO_UDPLITE, 9),
    ] {
        assert_eq!(
            verdict(&compiled, WEB, CLIENT, IN, protocol, port),
            (VERDICT_ALLOW, rule),
            "protocol {protocol}"
        );
    }
    assert_eq!(
        verdict(&compiled, WEB, DB, IN, PROTO_ICMP, icmp_type_port(8)).0,
        VERDICT_DENY,
        "isolated: ICMP from a peer no rule names is refused"
    );
}

#[test]
fn unselected_workloads_and_directions_are_untouched() {
    let compiled = compiled(&policy(
        "web",
        "  selector: {labels: {app: web}}\n  ingress: []",
    ));
    let untouched = Decision {
        verdict: VERDICT_ALLOW,
        rule: 0,
        isolated: false,
        settled: false,
        selector: None,
    };
    assert_eq!(
        compiled.decide(DB, WEB, IN, TCP, 80),
        untouched,
        "db is selected by no policy"
    );
    assert_eq!(
        compiled.decide(WEB, DB, OUT, TCP, 80),
        untouched,
        "web's egress is not isolated"
    );
    let isolated = compiled.decide(WEB, DB, IN, TCP, 80);
    assert!(
        isolated.isolated && isolated.verdict == VERDICT_DENY && !isolated.settled,
        "ingress: [] isolates, and only the isolation decides: {isolated:?}"
    );
}

#[test]
fn rule_ids_and_cidr_identities_are_stable_across_recompiles() {
    let first = policy("a", "  selector: {labels: {app: web}}\n  ingress:\n    - name: one\n      from: [{cidr: 10.0.0.0/8}]\n    - name: two");
    let second = policy("new", "  selector: {labels: {app: db}}\n  egress:\n    - to: [{cidr: 192.168.0.0/16}]")
        + &policy("a", "  selector: {labels: {app: web}}\n  ingress:\n    - name: two\n    - name: three\n      from: [{cidr: 10.0.0.0/8}]\n    - name: one");
    let mut ids = RuleIds::new();
    let before = compile(&set(&first), &workloads(), &mut ids).expect("first compiles");
    let after = compile(&set(&second), &workloads(), &mut ids).expect("second compiles");
    for rule in ["one", "two", "default-deny"] {
        assert_eq!(
            rule_id(&before, "a", rule),
            rule_id(&after, "a", rule),
            "rule a/{rule} keeps its id"
        );
    }
    let net: IpNet = "10.0.0.0/8".parse().expect("prefix");
    assert_eq!(
        before.prefixes[&net], after.prefixes[&net],
        "10.0.0.0/8 keeps its identity"
    );
    let known: Vec<u32> = before.rules.keys().copied().collect();
    assert!(
        !known.contains(&rule_id(&after, "a", "three")),
        "a new rule gets a new id"
    );
    let again = compile(&set(&second), &workloads(), &mut ids).expect("second compiles again");
    assert_eq!(
        after, again,
        "recompiling the same input gives the same result"
    );
}

#[test]
fn mtls_redirects_and_lower_rule_id_keeps_the_field() {
    let yaml = policy(
        "first",
        "  selector: {labels: {app: web}}\n  ingress:\n    - name: tls\n      from: [{labels: {app: client}}]\n      ports: [{port: 443}]\n      mtls: required",
    ) + &policy("second", "  selector: {labels: {app: web}}\n  ingress:\n    - name: plain\n      from: [{labels: {app: client}}]\n      ports: [{port: 443}, {port: 80}]");
    let compiled = compiled(&yaml);
    let tls = rule_id(&compiled, "first", "tls");
    assert!(
        tls < rule_id(&compiled, "second", "plain"),
        "ids follow load order"
    );
    let entry = compiled.entries[&super::policy_key(WEB, CLIENT, IN, TCP, 443)];
    assert_eq!(
        (entry.allow_rule, entry.flags),
        (tls, POLICY_FLAG_MTLS),
        "lower id and its flags stay"
    );
    assert_eq!(
        verdict(&compiled, WEB, CLIENT, IN, TCP, 443),
        (VERDICT_REDIRECT, tls),
        "mtls: required redirects"
    );
    assert_eq!(
        verdict(&compiled, WEB, CLIENT, IN, TCP, 80).0,
        VERDICT_ALLOW,
        "plain rule does not redirect"
    );
}

#[test]
fn an_ingress_rule_that_requires_mtls_makes_its_sources_use_the_tunnel() {
    let yaml = policy(
        "web-tls",
        "  selector: {labels: {app: web}}\n  ingress:\n    - name: tls\n      from: [{labels: {app: client}}]\n      ports: [{port: 443}]\n      mtls: required",
    );
    let compiled = compiled(&yaml);
    let tls = rule_id(&compiled, "web-tls", "tls");
    assert_eq!(
        compiled.mtls_demand(CLIENT, WEB, TCP, 443),
        Some(tls),
        "the client, not isolated for egress, still goes through the tunnel"
    );
    assert_eq!(
        compiled.mtls_demand(CLIENT, WEB, TCP, 80),
        None,
        "other ports stay plain"
    );
    assert_eq!(
        compiled.mtls_demand(WEB, CLIENT, TCP, 443),
        None,
        "only towards the destination"
    );
    assert!(
        compiled
            .entries
            .contains_key(&super::isolation_key(CLIENT, DIRECTION_MTLS)),
        "the connect hook's one-lookup gate is there"
    );
    assert!(
        !compiled
            .entries
            .contains_key(&super::isolation_key(WEB, DIRECTION_MTLS)),
        "a workload the rule does not admit pays nothing"
    );
}

#[test]
fn too_many_entries_is_refused_naming_the_rule() {
    let compiled = compile(
        &set(&policy("huge", "  selector: {}\n  ingress:\n    - name: everything\n      from: [{labels: {}}]\n      ports: [{port: 1, endPort: 65535}]")),
        &workloads(),
        &mut RuleIds::new(),
    );
    match compiled {
        Err(CompileError::TooManyEntries { policy, rule, .. }) => {
            assert_eq!((policy.as_str(), rule.as_str()), ("huge", "everything"))
        }
        other => panic!("expected TooManyEntries, got {other:?}"),
    }
}

#[test]
fn workload_identity_outside_its_range_is_refused() {
    let mut ws = workloads();
    ws[0].identity = crate::identity::FIRST_CIDR;
    let result = compile(
        &set(&policy("p", "  selector: {}\n  ingress: []")),
        &ws,
        &mut RuleIds::new(),
    );
    assert!(
        matches!(result, Err(CompileError::WorkloadIdentity { ref name, .. }) if name == "web"),
        "{result:?}"
    );
}

/// Client's egress: api.payments.example and `*.example.com` on 443, a partner range on 443 and
/// 80, and a deny of 203.0.113.0/24; db names other.example.
fn dns_policies() -> String {
    policy(
        "client-out",
        "  selector: {labels: {app: client}}\n  egress:\n    - name: payments\n      to: [{fqdn: api.payments.example}, {fqdnPattern: '*.example.com'}]\n      ports: [{port: 443}]\n    - name: partners\n      to: [{cidr: 198.51.100.0/24}]\n      ports: [{port: 443}, {port: 80}]\n    - name: no-testnet\n      action: deny\n      to: [{cidr: 203.0.113.0/24}]",
    ) + &policy(
        "db-out",
        "  mode: audit\n  selector: {labels: {app: db}}\n  egress:\n    - name: other\n      to: [{fqdn: other.example}, {fqdn: api.payments.example}]",
    )
}

fn fqdn_id(compiled: &Compiled, selector: &str) -> u32 {
    let found = compiled
        .fqdn
        .iter()
        .find(|(s, _)| s.to_string() == selector);
    found
        .map(|(_, id)| *id)
        .unwrap_or_else(|| panic!("no selector {selector} in {:?}", compiled.fqdn))
}

#[test]
fn dns_names_compile_to_selector_identities_and_flag_the_egress_isolation() {
    let compiled = compiled(&dns_policies());
    let (api, pattern, other) = (
        fqdn_id(&compiled, "fqdn:api.payments.example"),
        fqdn_id(&compiled, "fqdnPattern:*.example.com"),
        fqdn_id(&compiled, "fqdn:other.example"),
    );
    assert_eq!(compiled.fqdn.len(), 3, "one identity a distinct selector");
    assert!(
        compiled
            .fqdn
            .values()
            .all(|id| crate::identity::FQDN_SELECTORS.contains(id)),
        "{:?}",
        compiled.fqdn
    );
    let payments = rule_id(&compiled, "client-out", "payments");
    for selector in [api, pattern] {
        let entry = compiled.entries[&super::policy_key(CLIENT, selector, OUT, TCP, 443)];
        assert_eq!(
            entry,
            PolicyValue {
                allow_rule: payments,
                ..Default::default()
            }
        );
    }
    let audited = compiled.entries[&super::policy_key(DB, other, OUT, PROTO_ANY, PORT_ANY)];
    assert_eq!(
        (audited.allow_rule, audited.audit_allow_rule),
        (0, rule_id(&compiled, "db-out", "other")),
        "an audit policy's allow"
    );
    let isolation = |local| compiled.entries[&super::isolation_key(local, OUT)];
    assert_eq!(
        isolation(CLIENT),
        PolicyValue {
            deny_rule: rule_id(&compiled, "client-out", "default-deny"),
            flags: POLICY_FLAG_FQDN | (isolation(CLIENT).flags & POLICY_FLAGS_ABSENT),
            ..Default::default()
        }
    );
    assert_eq!(
        isolation(DB).flags & POLICY_FLAG_FQDN,
        POLICY_FLAG_FQDN,
        "audit mode names names too"
    );
    assert!(compiled.uses_fqdn(CLIENT) && compiled.uses_fqdn(DB));
    assert!(
        !compiled.uses_fqdn(WEB),
        "web's egress is not even isolated"
    );
}

#[test]
fn the_fqdn_flag_survives_merging_with_policies_without_names() {
    let plain = policy(
        "a-plain",
        "  selector: {labels: {app: client}}\n  egress:\n    - to: [{labels: {app: web}}]",
    );
    let named = policy(
        "b-named",
        "  selector: {labels: {app: client}}\n  egress:\n    - to: [{fqdn: api.payments.example}]",
    );
    for yaml in [plain.clone() + &named, named.clone() + &plain] {
        let compiled = compiled(&yaml);
        let isolation = compiled.entries[&super::isolation_key(CLIENT, OUT)];
        assert_eq!(
            (isolation.deny_rule, isolation.flags & POLICY_FLAG_FQDN),
            (
                rule_id(&compiled, "a-plain", "default-deny").min(rule_id(
                    &compiled,
                    "b-named",
                    "default-deny"
                )),
                POLICY_FLAG_FQDN
            ),
            "the lower default-deny holds the slot, the flag stays:\n{yaml}"
        );
    }
    let without = compiled(&plain);
    let with_names = compiled(&(plain.clone() + &named));
    assert!(!without.uses_fqdn(CLIENT));
    let mut flag_only = without.clone();
    flag_only
        .entries
        .get_mut(&super::isolation_key(CLIENT, OUT))
        .expect("isolation entry")
        .flags |= POLICY_FLAG_FQDN;
    assert_ne!(
        without, flag_only,
        "the flag is part of a compile's equality"
    );
    assert_ne!(without, with_names);
}

#[test]
fn selector_identities_are_stable_and_their_range_is_bounded() {
    let mut ids = RuleIds::new();
    let first = compile(&set(&dns_policies()), &workloads(), &mut ids).expect("compiles");
    let renamed = dns_policies().replace("other.example", "new.example");
    let second = compile(&set(&renamed), &workloads(), &mut ids).expect("compiles");
    assert_eq!(
        fqdn_id(&first, "fqdn:api.payments.example"),
        fqdn_id(&second, "fqdn:api.payments.example"),
        "the same selector keeps its identity"
    );
    assert!(
        !first
            .fqdn
            .values()
            .any(|id| *id == fqdn_id(&second, "fqdn:new.example")),
        "a new selector gets a new identity"
    );
    let mut ids = RuleIds::new();
    ids.next_fqdn_selector = crate::identity::LAST_FQDN_SELECTOR;
    let result = compile(&set(&dns_policies()), &workloads(), &mut ids);
    assert!(
        matches!(result, Err(CompileError::FqdnSelectorIdentity { .. })),
        "three selectors do not fit in the last identity: {result:?}"
    );
}

#[test]
fn fqdn_identities_are_the_matching_selectors_a_workloads_egress_names() {
    let compiled = compiled(&dns_policies());
    let (api, pattern, other) = (
        fqdn_id(&compiled, "fqdn:api.payments.example"),
        fqdn_id(&compiled, "fqdnPattern:*.example.com"),
        fqdn_id(&compiled, "fqdn:other.example"),
    );
    assert_eq!(
        compiled.fqdn_identities(CLIENT, &["API.payments.example."]),
        [api],
        "names are normalized"
    );
    assert_eq!(
        compiled.fqdn_identities(CLIENT, &["www.example.com", "cdn.example.com"]),
        [pattern],
        "one identity, however many names match it"
    );
    let mut both = vec![api, pattern];
    both.sort_unstable();
    assert_eq!(
        compiled.fqdn_identities(CLIENT, &["www.example.com", "api.payments.example"]),
        both,
        "ascending"
    );
    assert!(
        compiled
            .fqdn_identities(CLIENT, &["other.example", "a.b.example.com", "example.com"])
            .is_empty(),
        "db's name is not client's, and the pattern takes one label"
    );
    assert_eq!(compiled.fqdn_identities(DB, &["other.example"]), [other]);
    assert!(compiled
        .fqdn_identities(WEB, &["api.payments.example"])
        .is_empty());
    assert_eq!(
        compiled.fqdn_selector(pattern).map(ToString::to_string),
        Some("fqdnPattern:*.example.com".to_owned())
    );
}

#[test]
fn a_learned_address_is_decided_by_its_name_only_where_no_rule_decides_it() {
    let compiled = compiled(&dns_policies());
    let (api, pattern) = (
        fqdn_id(&compiled, "fqdn:api.payments.example"),
        fqdn_id(&compiled, "fqdnPattern:*.example.com"),
    );
    let rule = |name| rule_id(&compiled, "client-out", name);
    let remote =
        |addr: &str| compiled.remote_identity(addr.parse().expect("address"), &workloads());
    let learned = |addr: &str, selectors: &[u32], port| {
        compiled.decide_learned(CLIENT, remote(addr), selectors, OUT, TCP, port)
    };

    let by_name = learned("192.0.2.10", &[api], 443);
    assert_eq!(
        (
            by_name.verdict,
            by_name.rule,
            by_name.selector,
            by_name.settled
        ),
        (VERDICT_ALLOW, rule("payments"), Some(api), true),
        "allowed by its name on the rule's port"
    );
    let plain = compiled.decide(CLIENT, remote("192.0.2.10"), OUT, TCP, 443);
    assert_eq!(
        (plain.verdict, plain.rule, plain.settled),
        (VERDICT_DENY, rule("default-deny"), false),
        "the same address not learned is refused by the isolation alone"
    );
    let other_port = learned("192.0.2.10", &[api, pattern], 80);
    assert_eq!(
        (other_port.verdict, other_port.rule, other_port.selector),
        (VERDICT_DENY, rule("default-deny"), None),
        "no rule of its selectors names port 80"
    );
    let denied = learned("203.0.113.5", &[api], 443);
    assert_eq!(
        (denied.verdict, denied.rule, denied.selector),
        (VERDICT_DENY, rule("no-testnet"), None),
        "an explicit deny of the address wins over its name"
    );
    let partner = learned("198.51.100.7", &[api], 443);
    assert_eq!(
        (partner.verdict, partner.rule, partner.selector),
        (VERDICT_ALLOW, rule("partners"), None),
        "a rule that names the address decides it without the name step"
    );
    assert_eq!(
        learned("192.0.2.10", &[0, api], 443).selector,
        None,
        "0 ends the selectors"
    );
    assert_eq!(
        compiled.decide_learned(CLIENT, remote("192.0.2.10"), &[api], IN, TCP, 443),
        compiled.decide(CLIENT, remote("192.0.2.10"), IN, TCP, 443),
        "learned names count for egress only"
    );
    let audited = compiled.decide_learned(DB, remote("192.0.2.10"), &[api], OUT, TCP, 443);
    assert_eq!(
        (audited.verdict, audited.rule, audited.selector),
        (
            VERDICT_ALLOW,
            rule_id(&compiled, "db-out", "other"),
            Some(api)
        ),
        "an audit policy's allow by name"
    );
    let audited = compiled.decide_learned(DB, remote("192.0.2.10"), &[], OUT, TCP, 443);
    assert_eq!(audited.verdict, VERDICT_AUDIT, "not learned: audit");
}

#[test]
fn an_audit_rule_of_the_address_never_hides_an_allow_by_name() {
    // Enforced: the name on 443. Audited: any peer on 443, and the world on 8443.
    let compiled = compiled(&(policy(
        "client-out",
        "  selector: {labels: {app: client}}\n  egress:\n    - name: payments\n      to: [{fqdn: api.payments.example}]\n      ports: [{port: 443}]",
    ) + &policy(
        "client-audit",
        "  mode: audit\n  selector: {labels: {app: client}}\n  egress:\n    - name: anyone\n      ports: [{port: 443}]\n    - name: world\n      to: [{cidr: 0.0.0.0/0}]\n      ports: [{port: 8443}]",
    )));
    let api = fqdn_id(&compiled, "fqdn:api.payments.example");
    let remote = compiled.remote_identity("192.0.2.10".parse().expect("address"), &workloads());
    let decided = compiled.decide_learned(CLIENT, remote, &[api], OUT, TCP, 443);
    assert_eq!(
        (decided.verdict, decided.rule, decided.selector),
        (
            VERDICT_ALLOW,
            rule_id(&compiled, "client-out", "payments"),
            Some(api)
        ),
        "the audit policy's match of the address leaves the name's allow in force"
    );
    let not_learned = compiled.decide(CLIENT, remote, OUT, TCP, 443);
    assert_eq!(not_learned.verdict, VERDICT_DENY, "{not_learned:?}");
    assert!(!not_learned.settled, "an audit rule settles nothing");
    let elsewhere = compiled.decide_learned(CLIENT, remote, &[api], OUT, TCP, 8443);
    assert_eq!(
        (elsewhere.verdict, elsewhere.selector),
        (VERDICT_DENY, None),
        "the name's rule names 443 only"
    );
}

#[test]
fn only_the_first_learned_selectors_count() {
    let names: Vec<String> = (1..=5).map(|i| format!("n{i}.example")).collect();
    let peers = |names: &[String]| {
        let peers: Vec<String> = names.iter().map(|n| format!("{{fqdn: {n}}}")).collect();
        peers.join(", ")
    };
    let compiled = compiled(&policy(
        "client-out",
        &format!(
            "  selector: {{labels: {{app: client}}}}\n  egress:\n    - name: others\n      to: [{}]\n      ports: [{{port: 81}}]\n    - name: fifth\n      to: [{}]\n      ports: [{{port: 80}}]",
            peers(&names[..4]),
            peers(&names[4..])
        ),
    ));
    let ids: Vec<u32> = names
        .iter()
        .map(|n| fqdn_id(&compiled, &format!("fqdn:{n}")))
        .collect();
    assert_eq!(MAX_LEARNED_SELECTORS, 4);
    let decide = |selectors: &[u32]| {
        compiled
            .decide_learned(CLIENT, IDENTITY_WORLD, selectors, OUT, TCP, 80)
            .verdict
    };
    assert_eq!(decide(&ids[4..]), VERDICT_ALLOW);
    assert_eq!(
        decide(&ids),
        VERDICT_DENY,
        "the kernel holds four selectors an address"
    );
}

/// The kernel merge must give the verdicts of the policy language's plain semantics; random
/// policy sets check [`compile`] and [`Compiled::decide`] against a direct evaluation.
#[test]
fn decide_agrees_with_direct_evaluation_on_random_policies() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let workloads = vec![
        workload(300, "a1", &[("app", "a")], &["10.0.0.1"]),
        workload(301, "a2", &[("app", "a"), ("tier", "x")], &["10.1.2.5"]),
        workload(302, "b", &[("app", "b")], &["fd00::5"]),
        workload(303, "c", &[("app", "c")], &[]),
    ];
    let addresses: Vec<IpAddr> = [
        "10.0.0.77",
        "10.1.2.3",
        "10.1.9.9",
        "192.168.1.1",
        "fd00::9",
        "2001:db8::1",
    ]
    .map(|a| a.parse().expect("address"))
    .to_vec();
    let mut seen = BTreeMap::new();
    for case in 0..300 {
        let yaml = random_policies(&mut rng);
        let set = set(&yaml);
        let compiled =
            compile(&set, &workloads, &mut RuleIds::new()).expect("random policy compiles");
        let remotes = workloads
            .iter()
            .map(Remote::Workload)
            .chain(addresses.iter().map(|a| Remote::Address(*a)));
        for remote in remotes.collect::<Vec<_>>() {
            let remote_id = match remote {
                Remote::Workload(w) => w.identity,
                Remote::Address(a) => compiled.remote_identity(a, &workloads),
            };
            for local in &workloads {
                let probes = [TCP, UDP]
                    .into_iter()
                    .flat_map(|p| [80, 81, 82, 443, 8080].map(|port| (p, port)))
                    .chain([0, 8, 128].map(|t| (PROTO_ICMP, icmp_type_port(t))))
                    .chain([(PROTO_ICMPV6, icmp_type_port(128)), (PROTO_SCTP, 80)]);
                let probes: Vec<(u8, u16)> = probes.collect();
                for (direction, protocol, port) in [IN, OUT]
                    .into_iter()
                    .flat_map(|d| probes.iter().map(move |&(p, port)| (d, p, port)))
                {
                    let expected = direct(&set, local, remote, direction, protocol, port);
                    let mut got = compiled
                        .decide(local.identity, remote_id, direction, protocol, port)
                        .verdict;
                    if got == VERDICT_REDIRECT {
                        got = VERDICT_ALLOW;
                    }
                    *seen.entry(got).or_insert(0) += 1;
                    assert_eq!(
                        got,
                        expected,
                        "case {case}: {} {} {remote:?} {protocol}/{port}\n{yaml}",
                        local.name,
                        direction_name(direction)
                    );
                }
            }
        }
    }
    let kinds: Vec<u8> = seen.keys().copied().collect();
    assert_eq!(
        kinds,
        [VERDICT_ALLOW, VERDICT_DENY, VERDICT_AUDIT],
        "the cases cover every verdict: {seen:?}"
    );
}

#[derive(Clone, Copy, Debug)]
enum Remote<'a> {
    Workload(&'a WorkloadInfo),
    Address(IpAddr),
}

/// The policy language's semantics, evaluated rule by rule.
fn direct(
    set: &PolicySet,
    local: &WorkloadInfo,
    remote: Remote<'_>,
    direction: u8,
    protocol: u8,
    port: u16,
) -> u8 {
    let selecting: Vec<_> = set
        .policies
        .iter()
        .filter(|p| p.selector.matches(local))
        .filter_map(|p| Some((p.mode, p.directions().find(|(d, _)| *d == direction)?.1)))
        .collect();
    if selecting.is_empty() {
        return VERDICT_ALLOW;
    }
    let peer_matches = |peer: &Peer| match remote {
        Remote::Workload(w) => peer.selects(w),
        Remote::Address(a) => peer.covers_address(a),
    };
    let destination = match remote {
        _ if direction == DIRECTION_INGRESS => Some(local),
        Remote::Workload(w) => Some(w),
        Remote::Address(_) => None,
    };
    let port_matches = |m: &PortMatch| match *m {
        PortMatch::Protocol(p) => p == protocol,
        PortMatch::Range {
            protocol: p,
            first,
            last,
        } => p == protocol && (first..=last).contains(&port),
        PortMatch::Named { .. } => {
            destination.and_then(|d| m.resolve_named(d)) == Some((protocol, port))
        }
        PortMatch::Icmp {
            protocol: p,
            icmp_type,
        } => p == protocol && icmp_type.is_none_or(|t| icmp_type_port(t) == port),
    };
    let matched = |mode: Mode, action: RuleAction| {
        selecting
            .iter()
            .filter(|(m, _)| *m == mode)
            .flat_map(|(_, rules)| rules.iter())
            .any(|r| {
                r.action == action
                    && r.peers
                        .as_ref()
                        .is_none_or(|peers| peers.iter().any(peer_matches))
                    && r.ports
                        .as_ref()
                        .is_none_or(|ports| ports.iter().any(port_matches))
            })
    };
    let isolated = |mode: Mode| selecting.iter().any(|(m, _)| *m == mode);
    if matched(Mode::Enforce, RuleAction::Deny)
        || (isolated(Mode::Enforce) && !matched(Mode::Enforce, RuleAction::Allow))
    {
        VERDICT_DENY
    } else if matched(Mode::Audit, RuleAction::Deny)
        || (isolated(Mode::Audit)
            && !matched(Mode::Enforce, RuleAction::Allow)
            && !matched(Mode::Audit, RuleAction::Allow))
    {
        VERDICT_AUDIT
    } else {
        VERDICT_ALLOW
    }
}

/// xorshift64: reproducible test cases without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

fn random_policies(rng: &mut Rng) -> String {
    let selectors = [
        "{}",
        "{labels: {app: a}}",
        "{labels: {app: b}}",
        "{matchExpressions: [{key: tier, operator: Exists}]}",
        "{labels: {app: c}}",
    ];
    let peers = [
        "{labels: {app: a}}",
        "{labels: {app: b}}",
        "{matchExpressions: [{key: app, operator: NotIn, values: [a]}]}",
        "{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}",
        "{cidr: 10.1.2.0/24}",
        "{cidr: 0.0.0.0/0}",
        "{cidr: 'fd00::/8'}",
        "{cidr: '::/0'}",
    ];
    let ports = [
        "{port: 80}",
        "{port: 80, endPort: 82}",
        "{port: 443, protocol: UDP}",
        "{protocol: UDP}",
        "{port: 8080}",
        "{protocol: ICMP, icmpType: 8}",
        "{protocol: ICMP}",
        "{protocol: ICMPv6, icmpType: 128}",
        "{protocol: SCTP, port: 80}",
    ];
    let mut yaml = String::new();
    for p in 0..1 + rng.below(4) {
        let mut spec = format!(
            "  mode: {}\n  selector: {}\n",
            rng.pick(&["enforce", "enforce", "audit"]),
            rng.pick(&selectors)
        );
        for (direction, peer_field) in [("ingress", "from"), ("egress", "to")] {
            if rng.below(3) == 0 {
                continue;
            }
            spec += &format!("  {direction}:\n");
            for _ in 0..rng.below(3) {
                spec += &format!("    - action: {}\n", rng.pick(&["allow", "allow", "deny"]));
                if rng.below(3) != 0 {
                    let list: Vec<&str> = (0..1 + rng.below(2)).map(|_| rng.pick(&peers)).collect();
                    spec += &format!("      {peer_field}: [{}]\n", list.join(", "));
                }
                if rng.below(2) == 0 {
                    let list: Vec<&str> = (0..1 + rng.below(2)).map(|_| rng.pick(&ports)).collect();
                    spec += &format!("      ports: [{}]\n", list.join(", "));
                }
            }
            if spec.ends_with(":\n") {
                spec.truncate(spec.len() - 1);
                spec += " []\n";
            }
        }
        yaml += &policy(&format!("p{p}"), spec.trim_end());
    }
    yaml
}

/// The kernel skips the lookups of key shapes an isolation entry says its workload's entries
/// never have: each skipped key must be absent, for every query, so the kernel's decision is the
/// full lookup's (which [`Compiled::decide`] makes).
#[test]
fn the_lookups_a_decision_skips_could_only_miss() {
    let shapes = [
        // A peer and a port, a peer and a protocol, a peer with no ports, any peer on a port,
        // anything, ICMP types, a CIDR, named ports, a DNS name, mTLS, audit mode.
        "  selector: {labels: {app: web}}\n  ingress:\n    - from: [{labels: {app: client}}]\n      ports: [{port: 8080}]",
        "  selector: {labels: {app: web}}\n  ingress:\n    - from: [{labels: {app: db}}]\n      ports: [{protocol: UDP}]",
        "  selector: {labels: {app: client}}\n  egress:\n    - to: [{labels: {app: web}}]",
        "  selector: {labels: {app: db}}\n  ingress:\n    - ports: [{port: 5432}]\n  egress:\n    - to: [{cidr: 10.0.0.0/8}]\n      ports: [{protocol: ICMP, icmpType: 8}]",
        "  selector: {labels: {app: other}}\n  egress:\n    - name: anything\n  ingress:\n    - from: [{labels: {app: web}}]\n      ports: [{protocol: SCTP}]",
        "  selector: {labels: {app: client}}\n  egress:\n    - to: [{fqdn: api.payments.example}]\n      ports: [{port: 443}]",
        "  selector: {labels: {app: web}}\n  egress:\n    - to: [{labels: {app: db}}]\n      ports: [{port: 5432}]\n      mtls: required",
        "  selector: {labels: {app: db}}\n  mode: audit\n  egress:\n    - action: deny\n      ports: [{protocol: TCP}]",
    ];
    let queries = [
        (TCP, 8080),
        (TCP, 443),
        (TCP, 5432),
        (UDP, 53),
        (TCP, PORT_ANY),
        (PROTO_ICMP, icmp_type_port(8)),
        (PROTO_SCTP, 9),
    ];
    let identities = [
        WEB,
        CLIENT,
        DB,
        OTHER,
        IDENTITY_WORLD,
        IDENTITY_ANY,
        0xF000_0000,
    ];
    // Each shape alone, then all of them together.
    let mut sets: Vec<String> = shapes
        .iter()
        .enumerate()
        .map(|(i, body)| policy(&format!("p{i}"), body))
        .collect();
    sets.push(sets.concat());
    let mut skipped = 0;
    for yaml in &sets {
        let compiled = compiled(yaml);
        for (key, iso) in compiled
            .entries
            .iter()
            .filter(|(k, _)| k.remote_identity == REMOTE_ISOLATION)
        {
            for remote in identities.iter().chain(compiled.fqdn.values()) {
                for (protocol, port) in queries {
                    let keys = super::lookup_keys(
                        key.local_identity,
                        *remote,
                        key.direction,
                        protocol,
                        port,
                    );
                    for (i, looked_up) in keys.iter().enumerate() {
                        if lookup_skipped(iso.flags, i >= 3, i % 3) {
                            skipped += 1;
                            assert!(
                                !compiled.entries.contains_key(looked_up),
                                "{looked_up:?} is skipped but present:\n{yaml}"
                            );
                        }
                    }
                }
            }
        }
    }
    assert!(skipped > 0, "the policies leave lookups to skip");
}
