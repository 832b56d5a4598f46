//! Kubernetes `networking.k8s.io/v1` NetworkPolicy, accepted as written and turned into the same
//! form as ward's own policies. Namespaces and pod labels are those of the workload definitions;
//! a namespace's only label is `kubernetes.io/metadata.name`.

use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::diagnostics::{FieldPath, Findings};
use super::model::{
    check_name, cidr_peer, is_port_name, label_selector, parse_protocol, port_range, rule_peers,
    ExpressionDoc, LabelSelector, NamespaceMatch, Origin, Peer, Policy, PortMatch, Rule,
    WorkloadSelector,
};
use super::{Mode, RuleAction, WarningKind};

pub const API_VERSION: &str = "networking.k8s.io/v1";
pub const KIND: &str = "NetworkPolicy";
const DEFAULT_NAMESPACE: &str = "default";

/// The unique name of a NetworkPolicy in a policy set.
pub fn policy_name(namespace: Option<&str>, name: &str) -> String {
    format!("{}/{name}", namespace.unwrap_or(DEFAULT_NAMESPACE))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicyDoc {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: ObjectMeta,
    spec: SpecDoc,
    /// `kubectl get -o yaml` writes it; it carries nothing ward uses.
    #[serde(default, rename = "status")]
    _status: Option<IgnoredAny>,
}

/// Kubernetes object metadata: labels, annotations, uid and the rest are accepted and ignored.
#[derive(Debug, Deserialize)]
struct ObjectMeta {
    name: String,
    namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SpecDoc {
    pod_selector: Option<LabelSelectorDoc>,
    policy_types: Option<Vec<String>>,
    ingress: Option<Vec<RuleDoc>>,
    egress: Option<Vec<RuleDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LabelSelectorDoc {
    match_labels: Option<BTreeMap<String, String>>,
    match_expressions: Option<Vec<ExpressionDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    from: Option<Vec<PeerDoc>>,
    to: Option<Vec<PeerDoc>>,
    ports: Option<Vec<PortDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PeerDoc {
    pod_selector: Option<LabelSelectorDoc>,
    namespace_selector: Option<LabelSelectorDoc>,
    ip_block: Option<IpBlockDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IpBlockDoc {
    cidr: String,
    except: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortDoc {
    protocol: Option<String>,
    port: Option<IntOrString>,
    end_port: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(i64),
    String(String),
}

pub fn convert(doc: NetworkPolicyDoc, origin: Origin, findings: &mut Findings) -> Policy {
    let root = FieldPath::default();
    let spec = root.key("spec");
    let namespace = doc
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(DEFAULT_NAMESPACE)
        .to_owned();
    check_name(
        &doc.metadata.name,
        &root.key("metadata").key("name"),
        findings,
    );
    let labels = match doc.spec.pod_selector {
        Some(selector) => labels(selector, &spec.key("podSelector"), findings),
        None => {
            findings.error(
                &spec,
                "podSelector is missing; `podSelector: {}` selects every pod of the namespace",
            );
            LabelSelector::default()
        }
    };
    // Kubernetes defaulting: no policyTypes means Ingress, plus Egress when there are egress rules.
    let types = match doc.spec.policy_types.filter(|t| !t.is_empty()) {
        Some(types) => types,
        None if doc.spec.egress.as_ref().is_some_and(|e| !e.is_empty()) => {
            vec!["Ingress".into(), "Egress".into()]
        }
        None => vec!["Ingress".into()],
    };
    for (i, kind) in types.iter().enumerate() {
        if kind != "Ingress" && kind != "Egress" {
            findings.error(
                &spec.key("policyTypes").index(i),
                format!("`{kind}` is not Ingress or Egress"),
            );
        }
    }
    let mut direction = |rules: Option<Vec<RuleDoc>>, name: &str, kind: &str| {
        let path = spec.key(name);
        let isolated = types.iter().any(|t| t == kind);
        if !isolated && rules.as_ref().is_some_and(|r| !r.is_empty()) {
            findings.warn(
                &path,
                WarningKind::NoEffect,
                format!("ignored: policyTypes does not list {kind}"),
            );
        }
        let rules = rules.unwrap_or_default().into_iter().enumerate();
        let rules =
            rules.map(|(i, rule_doc)| rule(rule_doc, name, &path.index(i), &namespace, findings));
        isolated.then(|| rules.collect())
    };
    let ingress = direction(doc.spec.ingress, "ingress", "Ingress");
    let egress = direction(doc.spec.egress, "egress", "Egress");
    Policy {
        name: policy_name(Some(&namespace), &doc.metadata.name),
        origin,
        mode: Mode::Enforce,
        selector: WorkloadSelector {
            labels,
            spiffe_id: None,
            namespace: NamespaceMatch::Exact(namespace),
        },
        ingress,
        egress,
    }
}

fn labels(doc: LabelSelectorDoc, path: &FieldPath, findings: &mut Findings) -> LabelSelector {
    label_selector(doc.match_labels, doc.match_expressions, path, findings)
}

fn rule(
    doc: RuleDoc,
    direction: &str,
    path: &FieldPath,
    namespace: &str,
    findings: &mut Findings,
) -> Rule {
    let (peers, peer_field) = rule_peers(direction, doc.from, doc.to, path, findings);
    // Absent and empty lists both mean "every peer" and "every port" in NetworkPolicy.
    let peers = peers.filter(|p| !p.is_empty()).map(|docs| {
        let peers = docs.into_iter().enumerate();
        let path = path.key(peer_field);
        peers
            .filter_map(|(i, d)| peer(d, &path.index(i), namespace, findings))
            .collect()
    });
    let ports = doc.ports.filter(|p| !p.is_empty()).map(|docs| {
        let ports = docs.into_iter().enumerate();
        ports
            .filter_map(|(i, d)| port(d, &path.key("ports").index(i), findings))
            .collect()
    });
    Rule {
        name: path.to_string().trim_start_matches("spec.").to_owned(),
        field: path.clone(),
        line: None,
        action: RuleAction::Allow,
        peers,
        ports,
        mtls: false,
    }
}

fn peer(doc: PeerDoc, path: &FieldPath, namespace: &str, findings: &mut Findings) -> Option<Peer> {
    let pods = doc
        .pod_selector
        .map(|s| labels(s, &path.key("podSelector"), findings));
    let namespaces = doc
        .namespace_selector
        .map(|s| labels(s, &path.key("namespaceSelector"), findings));
    match (doc.ip_block, pods, namespaces) {
        (Some(block), None, None) => cidr_peer(
            &block.cidr,
            block.except.as_deref().unwrap_or_default(),
            true,
            &path.key("ipBlock"),
            findings,
        ),
        (Some(_), _, _) => {
            findings.error(
                path,
                "ipBlock cannot be combined with podSelector or namespaceSelector",
            );
            None
        }
        (None, None, None) => {
            findings.error(
                path,
                "an empty peer: give podSelector, namespaceSelector or ipBlock",
            );
            None
        }
        (None, pods, namespaces) => Some(Peer::Workloads(WorkloadSelector {
            labels: pods.unwrap_or_default(),
            spiffe_id: None,
            // A podSelector alone selects pods of the policy's own namespace.
            namespace: namespaces.map_or_else(
                || NamespaceMatch::Exact(namespace.to_owned()),
                NamespaceMatch::Labels,
            ),
        })),
    }
}

fn port(doc: PortDoc, path: &FieldPath, findings: &mut Findings) -> Option<PortMatch> {
    let protocol = parse_protocol(
        doc.protocol.as_deref(),
        &["TCP", "UDP", "SCTP"],
        &path.key("protocol"),
        findings,
    );
    match (doc.port, doc.end_port) {
        (None, Some(_)) => {
            findings.error(&path.key("endPort"), "endPort needs port");
            None
        }
        (None, None) => protocol.map(PortMatch::Protocol),
        (Some(IntOrString::Int(port)), end_port) => {
            let range = port_range(
                protocol.unwrap_or(agent_common::PROTO_TCP),
                port,
                end_port,
                path,
                findings,
            );
            protocol.and(range)
        }
        (Some(IntOrString::String(name)), Some(_)) => {
            findings.error(
                &path.key("endPort"),
                format!("endPort needs a numbered port, not the named port `{name}`"),
            );
            None
        }
        (Some(IntOrString::String(name)), None) if name.parse::<i64>().is_ok() => {
            findings.error(
                &path.key("port"),
                format!("port \"{name}\" is quoted: write numbered ports as numbers"),
            );
            None
        }
        (Some(IntOrString::String(name)), None) if !is_port_name(&name) => {
            findings.error(
                &path.key("port"),
                format!("`{name}` is not a port name: 1 to 15 lowercase letters, digits and single inner dashes, with at least one letter"),
            );
            None
        }
        // Resolved per destination pod, against the `ports` of its workload definition.
        (Some(IntOrString::String(name)), None) => {
            protocol.map(|protocol| PortMatch::Named { protocol, name })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::{parse, PolicyErrors, WarningKind};

    fn network_policy(metadata: &str, spec: &str) -> String {
        format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n{metadata}\nspec:\n{spec}\n")
    }

    #[test]
    fn kubectl_output_is_accepted_as_it_is() {
        let metadata = "  name: web\n  namespace: shop\n  uid: 6b1c\n  resourceVersion: \"42\"\n  labels: {team: a}\n  annotations: {note: x}";
        let text = network_policy(metadata, "  podSelector: {}\n  policyTypes: [Ingress]")
            + "status: {}\n";
        let set = parse(Path::new("np.yaml"), &text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            set.names().collect::<Vec<_>>(),
            ["shop/web"],
            "named <namespace>/<name>"
        );
        assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    }

    #[test]
    fn invalid_documents_name_the_field() {
        let cases = [
            ("  podSelector: {}\n  policyTypes: [Ingress, Sideways]", "spec.policyTypes[1]", "not Ingress or Egress"),
            ("  podselector: {}", "spec", "unknown field `podselector`"),
            ("  policyTypes: [Ingress]", "spec", "podSelector is missing"),
            ("  podSelector: {}\n  ingress:\n    - from:\n        - ipBlock: {cidr: 10.0.0.0/8}\n          podSelector: {}", "spec.ingress[0].from[0]", "cannot be combined"),
            ("  podSelector: {}\n  ingress:\n    - from:\n        - {}", "spec.ingress[0].from[0]", "empty peer"),
            ("  podSelector: {}\n  ingress:\n    - ports:\n        - {port: 80, endPort: 79}", "spec.ingress[0].ports[0].endPort", "below port 80"),
            ("  podSelector: {}\n  ingress:\n    - ports:\n        - {port: http, endPort: 90}", "spec.ingress[0].ports[0].endPort", "named port `http`"),
            ("  podSelector: {}\n  ingress:\n    - ports:\n        - {port: \"80\"}", "spec.ingress[0].ports[0].port", "quoted"),
            ("  podSelector: {}\n  ingress:\n    - ports:\n        - {port: Web_Port}", "spec.ingress[0].ports[0].port", "not a port name"),
            ("  podSelector: {}\n  egress:\n    - to:\n        - ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}", "spec.egress[0].to[0].ipBlock.except[0]", "does not lie inside"),
            ("  podSelector:\n    matchExpressions: [{key: a, operator: Exists, values: [b]}]", "spec.podSelector.matchExpressions[0].values", "takes no values"),
            // NetworkPolicy has no ICMP: ward's own policy names it.
            ("  podSelector: {}\n  ingress:\n    - ports:\n        - {protocol: ICMP}", "spec.ingress[0].ports[0].protocol", "not one of TCP, UDP, SCTP"),
            ("  podSelector: {}\n  egress:\n    - ports:\n        - {protocol: ICMPv6, port: 8}", "spec.egress[0].ports[0].protocol", "not one of TCP, UDP, SCTP"),
            ("  podSelector: {}\n  ingress:\n    - ports:\n        - {protocol: ICMP, icmpType: 8}", "spec.ingress[0].ports[0]", "unknown field `icmpType`"),
        ];
        for (spec, field, reason) in cases {
            let text = network_policy("  name: p", spec);
            let PolicyErrors(errors) = parse(Path::new("np.yaml"), &text).expect_err(field);
            assert_eq!(errors.len(), 1, "{errors:#?}");
            assert_eq!(errors[0].field, field, "{}", errors[0]);
            assert!(
                errors[0].reason.contains(reason),
                "{} should say {reason:?}",
                errors[0]
            );
        }
    }

    #[test]
    fn what_ward_cannot_enforce_as_written_is_a_warning() {
        let spec = "  podSelector: {}\n  policyTypes: [Egress]\n  ingress:\n    - {}\n  egress:\n    - to:\n        - ipBlock: {cidr: 10.0.0.1/8}\n      ports:\n        - {port: http}\n        - {protocol: SCTP, port: 9}";
        let set = parse(Path::new("np.yaml"), &network_policy("  name: p", spec))
            .unwrap_or_else(|e| panic!("{e}"));
        let warnings: Vec<_> = set
            .warnings
            .iter()
            .map(|w| (w.field.as_str(), w.kind))
            .collect();
        assert_eq!(
            warnings,
            [
                ("spec.ingress", WarningKind::NoEffect),
                (
                    "spec.egress[0].to[0].ipBlock.cidr",
                    WarningKind::NotEnforced
                ),
            ],
            "SCTP is enforced, so it is no warning: {:#?}",
            set.warnings
        );
        assert!(
            set.warnings.iter().all(|w| w.location.line.is_some()),
            "warnings carry lines: {:#?}",
            set.warnings
        );
    }

    #[test]
    fn sctp_ports_compile_to_sctp_keys() {
        use agent_common::{PORT_ANY, PROTO_SCTP};

        use crate::testing::workload;
        use crate::{compile, RuleIds};

        let spec = "  podSelector: {}\n  ingress:\n    - ports:\n        - {protocol: SCTP, port: 9}\n        - {protocol: sctp}";
        let set = parse(
            Path::new("np.yaml"),
            &network_policy("  name: p\n  namespace: x", spec),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(set.warnings.is_empty(), "{:#?}", set.warnings);
        let mut pod = workload(300, "a", &[("app", "a")], &["10.0.0.1"]);
        pod.namespace = Some("x".into());
        let compiled = compile(&set, &[pod], &mut RuleIds::new()).expect("compiles");
        let mut ports: Vec<(u8, u16)> = compiled
            .entries
            .keys()
            .filter(|k| k.protocol == PROTO_SCTP)
            .map(|k| (k.protocol, k.port))
            .collect();
        ports.sort();
        assert_eq!(ports, [(PROTO_SCTP, PORT_ANY), (PROTO_SCTP, 9)]);
    }
}
