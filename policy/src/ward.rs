//! ward's own policy language, `apiVersion: ward.dev/v1`, `kind: Policy`.

use std::collections::{BTreeMap, BTreeSet};

use agent_common::PROTO_TCP;
use serde::Deserialize;

use super::diagnostics::{FieldPath, Findings};
use super::fqdn::FqdnSelector;
use super::model::{
    check_name, cidr_peer, icmp_type, is_icmp, label_selector, parse_protocol, port_range,
    rule_peers, ExpressionDoc, NamespaceMatch, Origin, Peer, Policy, PortMatch, Rule, SpiffeMatch,
    WorkloadSelector,
};
use super::{Mode, RuleAction, WarningKind};

pub const API_VERSION: &str = "ward.dev/v1";
pub const KIND: &str = "Policy";
/// The name of every policy's implicit rule; no rule may take it.
pub const DEFAULT_DENY: &str = "default-deny";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyDoc {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: MetadataDoc,
    spec: SpecDoc,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetadataDoc {
    name: String,
    /// Accepted for tooling; ward does not use them.
    #[serde(default, rename = "labels")]
    _labels: BTreeMap<String, String>,
    #[serde(default, rename = "annotations")]
    _annotations: BTreeMap<String, String>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecDoc {
    mode: Option<Mode>,
    selector: Option<SelectorDoc>,
    ingress: Option<Vec<RuleDoc>>,
    egress: Option<Vec<RuleDoc>>,
}

/// A workload selector; as a peer it may instead hold a CIDR or a DNS name.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SelectorDoc {
    labels: Option<BTreeMap<String, String>>,
    match_expressions: Option<Vec<ExpressionDoc>>,
    spiffe_id: Option<String>,
    namespace: Option<String>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PeerDoc {
    labels: Option<BTreeMap<String, String>>,
    match_expressions: Option<Vec<ExpressionDoc>>,
    spiffe_id: Option<String>,
    namespace: Option<String>,
    cidr: Option<String>,
    except: Option<Vec<String>>,
    /// Egress allow rules only: addresses the workload learned from this DNS name.
    fqdn: Option<String>,
    /// Egress allow rules only: addresses the workload learned from a name of this shape, where
    /// `*` stands for one or more characters within one label (`*` alone: any name).
    fqdn_pattern: Option<String>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    name: Option<String>,
    action: Option<RuleAction>,
    from: Option<Vec<PeerDoc>>,
    to: Option<Vec<PeerDoc>>,
    ports: Option<Vec<PortDoc>>,
    mtls: Option<Mtls>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortDoc {
    port: Option<i64>,
    end_port: Option<i64>,
    protocol: Option<String>,
    /// ICMP and ICMPv6 only: the message type (8 echo request, 128 ICMPv6 echo request).
    icmp_type: Option<i64>,
}

/// The protocols a `ports` entry of a ward policy may name.
const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP", "ICMP", "ICMPv6"];

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mtls {
    Required,
    Disabled,
}

pub fn convert(doc: PolicyDoc, origin: Origin, findings: &mut Findings) -> Policy {
    let root = FieldPath::default();
    let spec = root.key("spec");
    check_name(
        &doc.metadata.name,
        &root.key("metadata").key("name"),
        findings,
    );
    let selector = match doc.spec.selector {
        Some(selector) => workload_selector(selector, &spec.key("selector"), findings),
        None => {
            findings.error(
                &spec,
                "selector is missing; `selector: {}` selects every workload",
            );
            WorkloadSelector::default()
        }
    };
    let mut rules = |docs: Option<Vec<RuleDoc>>, direction: &str| {
        let docs = docs?;
        let mut names = BTreeSet::new();
        let path = spec.key(direction);
        let rules = docs
            .into_iter()
            .enumerate()
            .map(|(i, d)| rule(d, direction, i, &path, &mut names, findings));
        Some(rules.collect())
    };
    let (ingress, egress) = (
        rules(doc.spec.ingress, "ingress"),
        rules(doc.spec.egress, "egress"),
    );
    if ingress.is_none() && egress.is_none() {
        findings.warn(
            &spec,
            WarningKind::NoEffect,
            "neither ingress nor egress: this policy isolates nothing and allows nothing",
        );
    }
    Policy {
        name: doc.metadata.name,
        origin,
        mode: doc.spec.mode.unwrap_or(Mode::Enforce),
        selector,
        ingress,
        egress,
    }
}

fn workload_selector(
    doc: SelectorDoc,
    path: &FieldPath,
    findings: &mut Findings,
) -> WorkloadSelector {
    let spiffe_id = doc.spiffe_id.and_then(|text| {
        SpiffeMatch::parse(&text)
            .map_err(|reason| findings.error(&path.key("spiffeId"), reason))
            .ok()
    });
    WorkloadSelector {
        labels: label_selector(doc.labels, doc.match_expressions, path, findings),
        spiffe_id,
        namespace: doc
            .namespace
            .map_or(NamespaceMatch::Any, NamespaceMatch::Exact),
    }
}

fn rule(
    doc: RuleDoc,
    direction: &str,
    index: usize,
    parent: &FieldPath,
    names: &mut BTreeSet<String>,
    findings: &mut Findings,
) -> Rule {
    let path = parent.index(index);
    let name = match doc.name {
        Some(name) => {
            let name_path = path.key("name");
            check_name(&name, &name_path, findings);
            if name == DEFAULT_DENY {
                findings.error(
                    &name_path,
                    format!("`{DEFAULT_DENY}` is the name of the policy's implicit rule"),
                );
            }
            name
        }
        None => format!("{direction}[{index}]"),
    };
    if !names.insert(name.clone()) {
        findings.error(
            &path.key("name"),
            format!("another {direction} rule of this policy is named `{name}`"),
        );
    }
    let action = doc.action.unwrap_or(RuleAction::Allow);
    let (peers, peer_field) = rule_peers(direction, doc.from, doc.to, &path, findings);
    let peers_path = path.key(peer_field);
    if peers.as_ref().is_some_and(Vec::is_empty) {
        findings.error(
            &peers_path,
            format!("an empty list matches no peer; leave `{peer_field}` out to match any peer"),
        );
    }
    let peers = peers.map(|docs| {
        let peers = docs.into_iter().enumerate();
        peers
            .filter_map(|(i, d)| peer(d, direction, action, &peers_path.index(i), findings))
            .collect()
    });
    let ports = doc.ports.map(|docs| {
        let ports = docs.into_iter().enumerate();
        ports
            .filter_map(|(i, d)| port(d, &path.key("ports").index(i), findings))
            .collect()
    });
    let mtls = doc.mtls == Some(Mtls::Required);
    if mtls && action == RuleAction::Deny {
        findings.error(
            &path.key("mtls"),
            "mtls: required applies to allow rules only",
        );
    }
    let rule = Rule {
        name,
        field: path,
        line: None,
        action,
        peers,
        ports,
        mtls,
    };
    if mtls && rule.names_fqdn() {
        findings.error(
            &rule.field.key("mtls"),
            "mtls: required does not apply to DNS-name peers (fqdn, fqdnPattern): the tunnel \
             carries connections between workloads",
        );
    }
    rule
}

fn peer(
    doc: PeerDoc,
    direction: &str,
    action: RuleAction,
    path: &FieldPath,
    findings: &mut Findings,
) -> Option<Peer> {
    let selector = SelectorDoc {
        labels: doc.labels,
        match_expressions: doc.match_expressions,
        spiffe_id: doc.spiffe_id,
        namespace: doc.namespace,
    };
    let has_selector = selector.labels.is_some()
        || selector.match_expressions.is_some()
        || selector.spiffe_id.is_some()
        || selector.namespace.is_some();
    if doc.fqdn.is_some() || doc.fqdn_pattern.is_some() {
        if has_selector || doc.cidr.is_some() || doc.except.is_some() {
            findings.error(path, "a peer is either a DNS name (fqdn, fqdnPattern) or a cidr or a workload selector (labels, matchExpressions, spiffeId, namespace), not both");
            return None;
        }
        return dns_name_peer(
            doc.fqdn,
            doc.fqdn_pattern,
            direction,
            action,
            path,
            findings,
        );
    }
    match doc.cidr {
        Some(_) if has_selector => {
            findings.error(path, "a peer is either a cidr or a workload selector (labels, matchExpressions, spiffeId, namespace), not both");
            None
        }
        Some(cidr) => cidr_peer(
            &cidr,
            doc.except.as_deref().unwrap_or_default(),
            false,
            path,
            findings,
        ),
        None if doc.except.is_some() => {
            findings.error(&path.key("except"), "except needs a cidr");
            None
        }
        None if !has_selector => {
            findings.error(
                path,
                "an empty peer: give labels, matchExpressions, spiffeId, namespace, cidr, fqdn or fqdnPattern",
            );
            None
        }
        None => Some(Peer::Workloads(workload_selector(selector, path, findings))),
    }
}

/// An `fqdn` or `fqdnPattern` peer: of an egress allow rule only.
fn dns_name_peer(
    fqdn: Option<String>,
    fqdn_pattern: Option<String>,
    direction: &str,
    action: RuleAction,
    path: &FieldPath,
    findings: &mut Findings,
) -> Option<Peer> {
    let (field, parsed) = match (fqdn, fqdn_pattern) {
        (Some(_), Some(_)) => {
            findings.error(path, "a peer is either an fqdn or an fqdnPattern, not both");
            return None;
        }
        (Some(name), None) => ("fqdn", FqdnSelector::parse_name(&name)),
        (None, Some(pattern)) => ("fqdnPattern", FqdnSelector::parse_pattern(&pattern)),
        (None, None) => return None,
    };
    let path = path.key(field);
    if direction == "ingress" {
        findings.error(
            &path,
            format!(
                "{field} names egress peers only: a connection's source is an address, not a name"
            ),
        );
        return None;
    }
    if action != RuleAction::Allow {
        findings.error(
            &path,
            format!("{field} belongs in allow rules only: an address learned from a name is allowed by it, never denied"),
        );
        return None;
    }
    parsed
        .map_err(|reason| findings.error(&path, reason))
        .ok()
        .map(Peer::Fqdn)
}

fn port(doc: PortDoc, path: &FieldPath, findings: &mut Findings) -> Option<PortMatch> {
    let protocol = parse_protocol(
        doc.protocol.as_deref(),
        PROTOCOLS,
        &path.key("protocol"),
        findings,
    );
    if let Some(protocol) = protocol.filter(|p| is_icmp(*p)) {
        return icmp_port(doc, protocol, path, findings);
    }
    if let (Some(value), Some(_)) = (doc.icmp_type, protocol) {
        let reason = match &doc.protocol {
            None => "icmpType needs `protocol: ICMP` or `protocol: ICMPv6`".to_owned(),
            Some(text) => format!("icmpType applies to ICMP and ICMPv6 only, not to {text}"),
        };
        findings.error(
            &path.key("icmpType"),
            format!("{reason} (icmpType {value})"),
        );
    }
    // With an unknown protocol or a misplaced icmpType, the ports are still checked so that every
    // error is reported, but the entry is dropped.
    let protocol = protocol.filter(|_| doc.icmp_type.is_none());
    match (doc.port, doc.end_port) {
        (None, Some(_)) => {
            findings.error(&path.key("endPort"), "endPort needs port");
            None
        }
        (None, None) => protocol.map(PortMatch::Protocol),
        (Some(port), end_port) => {
            let range = port_range(
                protocol.unwrap_or(PROTO_TCP),
                port,
                end_port,
                path,
                findings,
            );
            protocol.and(range)
        }
    }
}

/// An ICMP or ICMPv6 entry: `icmpType` for one message type, nothing for every type; ports do not
/// apply.
fn icmp_port(
    doc: PortDoc,
    protocol: u8,
    path: &FieldPath,
    findings: &mut Findings,
) -> Option<PortMatch> {
    let name = doc.protocol.as_deref().unwrap_or_default();
    let mut valid = true;
    for (field, given) in [("port", doc.port), ("endPort", doc.end_port)] {
        if given.is_some() {
            findings.error(
                &path.key(field),
                format!("{field} does not apply to {name}: give icmpType for one message type, or leave it out for every type"),
            );
            valid = false;
        }
    }
    let icmp_type = match doc.icmp_type {
        Some(value) => Some(icmp_type(value, &path.key("icmpType"), findings)?),
        None => None,
    };
    valid.then_some(PortMatch::Icmp {
        protocol,
        icmp_type,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::{parse, PolicyError};

    const HEAD: &str = "apiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: p\nspec:\n";

    fn errors(text: &str) -> Vec<PolicyError> {
        match parse(Path::new("bad.yaml"), text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(errors) => errors.0,
        }
    }

    /// Each case is a spec whose line marked `# <-` holds the error.
    #[test]
    fn each_validation_error_names_file_line_document_and_field() {
        let cases = [
            ("  selector: {}\n  ingres: [] # <-", "spec", "unknown field `ingres`"),
            ("  mode: enforcing # <-\n  selector: {}", "spec.mode", "unknown variant `enforcing`"),
            ("  selector: {}\n  ingress:\n    - from:\n        - cidr: 10.0.0.0/33 # <-", "spec.ingress[0].from[0].cidr", "not a CIDR"),
            ("  selector: {}\n  ingress:\n    - from:\n        - cidr: 10.0.0.1/8 # <-", "spec.ingress[0].from[0].cidr", "host bits"),
            ("  selector: {}\n  ingress:\n    - from:\n        - cidr: 10.0.0.0/8\n          except:\n            - 11.0.0.0/16 # <-", "spec.ingress[0].from[0].except[0]", "does not lie inside"),
            ("  selector: {}\n  ingress:\n    - ports:\n        - port: 0 # <-", "spec.ingress[0].ports[0].port", "outside 1-65535"),
            ("  selector: {}\n  ingress:\n    - ports:\n        - port: 70000 # <-", "spec.ingress[0].ports[0].port", "outside 1-65535"),
            ("  selector: {}\n  ingress:\n    - ports:\n        - port: 80\n        - port: 90\n          endPort: 85 # <-", "spec.ingress[0].ports[1].endPort", "endPort 85 is below port 90"),
            ("  selector: {}\n  egress:\n    - ports:\n        - endPort: 85 # <-", "spec.egress[0].ports[0].endPort", "endPort needs port"),
            ("  selector: {}\n  ingress:\n    - ports:\n        - protocol: GRE # <-", "spec.ingress[0].ports[0].protocol", "protocol `GRE` is not one of TCP, UDP, SCTP, ICMP, ICMPv6"),
            ("  selector: {}\n  ingress:\n    - ports:\n        - {protocol: ICMP, port: 8} # <-", "spec.ingress[0].ports[0].port", "port does not apply to ICMP"),
            ("  selector: {}\n  egress:\n    - ports:\n        - {protocol: icmpv6, endPort: 9} # <-", "spec.egress[0].ports[0].endPort", "endPort does not apply to icmpv6"),
            ("  selector: {}\n  ingress:\n    - ports:\n        - {protocol: ICMP, icmpType: 256} # <-", "spec.ingress[0].ports[0].icmpType", "icmpType 256 is outside 0-255"),
            ("  selector: {}\n  ingress:\n    - ports:\n        - {protocol: ICMPv6, icmpType: -1} # <-", "spec.ingress[0].ports[0].icmpType", "icmpType -1 is outside 0-255"),
            ("  selector: {}\n  ingress:\n    - ports:\n        - {protocol: ICMP, icmpType: echo} # <-", "spec.ingress[0].ports[0].icmpType", "invalid type"),
            ("  selector: {}\n  ingress:\n    - ports:\n        - {port: 80, icmpType: 8} # <-", "spec.ingress[0].ports[0].icmpType", "icmpType needs `protocol: ICMP`"),
            ("  selector: {}\n  ingress:\n    - ports:\n        - {protocol: UDP, icmpType: 8} # <-", "spec.ingress[0].ports[0].icmpType", "not to UDP"),
            ("  selector: {}\n  egress:\n    - ports:\n        - {protocol: SCTP, port: 9, icmpType: 3} # <-", "spec.egress[0].ports[0].icmpType", "not to SCTP"),
            ("  selector: {}\n  egress:\n    - ports:\n        - {protocol: tcp, icmpType: 3} # <-", "spec.egress[0].ports[0].icmpType", "ICMP and ICMPv6 only, not to tcp"),
            ("  selector:\n    matchExpressions:\n      - key: app\n        operator: Equals # <-", "spec.selector.matchExpressions[0].operator", "unknown variant `Equals`"),
            ("  selector:\n    matchExpressions:\n      - key: app\n        operator: In\n        values: [] # <-", "spec.selector.matchExpressions[0].values", "needs at least one value"),
            ("  selector:\n    matchExpressions:\n      - key: app\n        operator: Exists\n        values: [a] # <-", "spec.selector.matchExpressions[0].values", "takes no values"),
            ("  selector: {}\n  ingress:\n    - from:\n        - {} # <-", "spec.ingress[0].from[0]", "an empty peer"),
            ("  selector: {}\n  ingress:\n    - from:\n        - cidr: 10.0.0.0/8 # <-\n          labels: {app: a}", "spec.ingress[0].from[0]", "not both"),
            ("  selector: {}\n  ingress:\n    - from:\n        - except: [10.0.0.0/8] # <-", "spec.ingress[0].from[0].except", "except needs a cidr"),
            ("  selector:\n    spiffeId: example.org/web # <-", "spec.selector.spiffeId", "must start with spiffe://"),
            ("  selector:\n    spiffeId: spiffe://example.org/ns/*/sa # <-", "spec.selector.spiffeId", "last path segment"),
            ("  selector: {}\n  ingress:\n    - action: drop # <-", "spec.ingress[0].action", "unknown variant `drop`"),
            ("  selector: {}\n  ingress:\n    - action: deny\n      mtls: required # <-", "spec.ingress[0].mtls", "allow rules only"),
            ("  selector: {}\n  ingress:\n    - mtls: maybe # <-", "spec.ingress[0].mtls", "unknown variant `maybe`"),
            // Unmarked: the error is at the `spec:` line.
            ("  ingress: []", "spec", "selector is missing"),
            ("  selector: {}\n  egress:\n    - from: # <-\n        - labels: {app: a}", "spec.egress[0].from", "name their peers with `to`"),
            ("  selector: {}\n  ingress:\n    - from: [] # <-", "spec.ingress[0].from", "matches no peer"),
            ("  selector: {}\n  ingress:\n    - name: a\n    - name: a # <-", "spec.ingress[1].name", "another ingress rule"),
            ("  selector: {}\n  ingress:\n    - name: default-deny # <-", "spec.ingress[0].name", "implicit rule"),
            ("  selector: {}\n  ingress:\n    - name: has space # <-", "spec.ingress[0].name", "not a valid name"),
            ("  selector: {}\n  ingress:\n    - ports:\n        - port: http # <-", "spec.ingress[0].ports[0].port", "invalid type"),
            ("  selector: {}\n  egress:\n    - to:\n        - fqdn: '' # <-", "spec.egress[0].to[0].fqdn", "an empty DNS name"),
            ("  selector: {}\n  egress:\n    - to:\n        - fqdn: api..example # <-", "spec.egress[0].to[0].fqdn", "an empty label"),
            ("  selector: {}\n  egress:\n    - to:\n        - fqdn: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.example # <-", "spec.egress[0].to[0].fqdn", "a label has at most 63"),
            ("  selector: {}\n  egress:\n    - to:\n        - fqdn: api.example/v1 # <-", "spec.egress[0].to[0].fqdn", "`/` is not allowed"),
            ("  selector: {}\n  egress:\n    - to:\n        - fqdn: '*.example' # <-", "spec.egress[0].to[0].fqdn", "belongs in an fqdnPattern"),
            ("  selector: {}\n  egress:\n    - to:\n        - fqdnPattern: '*.exa?mple' # <-", "spec.egress[0].to[0].fqdnPattern", "`?` is not allowed"),
            ("  selector: {}\n  ingress:\n    - from:\n        - fqdn: api.example # <-", "spec.ingress[0].from[0].fqdn", "egress peers only"),
            ("  selector: {}\n  egress:\n    - to:\n        - fqdn: api.example # <-\n          cidr: 10.0.0.0/8", "spec.egress[0].to[0]", "not both"),
            ("  selector: {}\n  egress:\n    - to:\n        - fqdnPattern: '*.example' # <-\n          labels: {app: a}", "spec.egress[0].to[0]", "not both"),
            ("  selector: {}\n  egress:\n    - to:\n        - fqdn: api.example # <-\n          fqdnPattern: '*.example'", "spec.egress[0].to[0]", "an fqdn or an fqdnPattern"),
            ("  selector: {}\n  egress:\n    - action: deny\n      to:\n        - fqdn: api.example # <-", "spec.egress[0].to[0].fqdn", "allow rules only"),
            ("  mode: audit\n  selector: {}\n  egress:\n    - action: deny\n      to:\n        - fqdnPattern: '*.example' # <-", "spec.egress[0].to[0].fqdnPattern", "allow rules only"),
            ("  selector: {}\n  egress:\n    - to:\n        - fqdn: api.example\n      mtls: required # <-", "spec.egress[0].mtls", "DNS-name peers"),
        ];
        for (spec, field, reason) in cases {
            // A valid document first, so the failing one is the second.
            let text = format!(
                "{HEAD}  selector: {{}}\n---\n{}",
                HEAD.replace("name: p", "name: q")
            ) + spec
                + "\n";
            let marked = text.lines().position(|l| l.ends_with("# <-"));
            let line = marked
                .or_else(|| {
                    text.lines()
                        .collect::<Vec<_>>()
                        .iter()
                        .rposition(|l| *l == "spec:")
                })
                .expect("a spec line")
                + 1;
            let errors = errors(&text);
            let error = &errors[0];
            assert_eq!(errors.len(), 1, "one error for {field}: {errors:#?}");
            assert_eq!(error.field, field, "field of {error}");
            assert!(
                error.reason.contains(reason),
                "reason of {error} should contain {reason:?}"
            );
            let location = &error.location;
            assert_eq!(
                (location.file.as_path(), location.line, location.document),
                (Path::new("bad.yaml"), Some(line), Some(2)),
                "{error}"
            );
            assert_eq!(location.policy.as_deref(), Some("q"), "{error}");
            let shown = error.to_string();
            assert!(
                shown.starts_with(&format!("bad.yaml:{line}: document 2 (q): {field}: ")),
                "display: {shown}"
            );
        }
    }

    #[test]
    fn every_error_of_every_document_is_reported() {
        let text = format!(
            "{HEAD}  selector: {{}}\n  ingress:\n    - ports: [{{port: 0}}, {{port: 5, endPort: 4}}]\n      from: [{{cidr: nope}}]\n---\n{HEAD}  selector: {{}}\n---\n[not, a, mapping]\n"
        );
        let errors = errors(&text);
        let found: Vec<_> = errors
            .iter()
            .map(|e| (e.location.document, e.field.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (Some(1), "spec.ingress[0].from[0].cidr"),
                (Some(1), "spec.ingress[0].ports[0].port"),
                (Some(1), "spec.ingress[0].ports[1].endPort"),
                (Some(2), "metadata.name"),
                (Some(3), ""),
            ],
            "{errors:#?}"
        );
        assert!(
            errors[3]
                .reason
                .contains("duplicate policy name `p`; first defined at bad.yaml:1"),
            "{}",
            errors[3]
        );
    }

    #[test]
    fn dns_name_peers_parse_normalized_beside_other_peers() {
        use crate::model::Peer;
        use crate::FqdnSelector;

        let text = format!(
            "{HEAD}  mode: audit\n  selector: {{}}\n  egress:\n    - to:\n        - fqdn: API.Payments.Example.\n        - fqdnPattern: '*.Example.com'\n        - cidr: 10.0.0.0/8\n      ports: [{{port: 443}}]\n"
        );
        let set = parse(Path::new("p.yaml"), &text).unwrap_or_else(|e| panic!("{e}"));
        let rule = &set.policies[0].egress.as_ref().expect("egress")[0];
        let selectors: Vec<String> = rule
            .peers
            .iter()
            .flatten()
            .filter_map(|peer| match peer {
                Peer::Fqdn(selector) => Some(selector.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(
            selectors,
            ["fqdn:api.payments.example", "fqdnPattern:*.example.com"]
        );
        assert!(rule.names_fqdn() && rule.peers.as_ref().is_some_and(|p| p.len() == 3));
        assert_eq!(
            set.fqdn_selectors()
                .into_iter()
                .cloned()
                .collect::<Vec<_>>(),
            [
                FqdnSelector::Name("api.payments.example".into()),
                FqdnSelector::Pattern("*.example.com".into())
            ]
        );
    }

    #[test]
    fn icmp_and_sctp_ports_parse_case_insensitively() {
        use agent_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP};

        use crate::model::PortMatch;

        let text = format!(
            "{HEAD}  selector: {{}}\n  ingress:\n    - ports:\n        - {{protocol: ICMP}}\n        - {{protocol: icmp, icmpType: 8}}\n        - {{protocol: ICMPv6, icmpType: 128}}\n        - {{protocol: icmpV6, icmpType: 0}}\n        - {{protocol: SCTP, port: 9}}\n        - {{protocol: sctp}}\n"
        );
        let set = parse(Path::new("p.yaml"), &text).unwrap_or_else(|e| panic!("{e}"));
        assert!(set.warnings.is_empty(), "{:#?}", set.warnings);
        let rules = set.policies[0].ingress.as_ref().expect("ingress");
        let icmp = |protocol, icmp_type| PortMatch::Icmp {
            protocol,
            icmp_type,
        };
        assert_eq!(
            rules[0].ports.as_deref().expect("ports"),
            [
                icmp(PROTO_ICMP, None),
                icmp(PROTO_ICMP, Some(8)),
                icmp(PROTO_ICMPV6, Some(128)),
                icmp(PROTO_ICMPV6, Some(0)),
                PortMatch::Range {
                    protocol: PROTO_SCTP,
                    first: 9,
                    last: 9
                },
                PortMatch::Protocol(PROTO_SCTP),
            ]
        );
    }
}
