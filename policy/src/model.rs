//! The validated form both policy languages are turned into, and how it matches workloads.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use agent_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use ipnet::IpNet;
use serde::Deserialize;

use super::diagnostics::{FieldPath, Findings};
use super::fqdn::FqdnSelector;
use super::{Mode, RuleAction, WorkloadInfo};

/// The label every Kubernetes namespace carries with its own name; the only namespace label ward
/// knows, since namespaces come from the workload definitions.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The peers of a rule of `direction`, which ingress rules write in `from` and egress rules in
/// `to`, with the name of that field; the other field is an error.
pub fn rule_peers<T>(
    direction: &str,
    from: Option<T>,
    to: Option<T>,
    path: &FieldPath,
    findings: &mut Findings,
) -> (Option<T>, &'static str) {
    let (peer_field, wrong_field, peers, wrong) = if direction == "ingress" {
        ("from", "to", from, to)
    } else {
        ("to", "from", to, from)
    };
    if wrong.is_some() {
        findings.error(
            &path.key(wrong_field),
            format!("{direction} rules name their peers with `{peer_field}`"),
        );
    }
    (peers, peer_field)
}

/// Whether `name` is a valid port name, as Kubernetes checks a container port's (an IANA service
/// name): 1 to 15 lowercase letters, digits and single inner dashes, with at least one letter.
pub fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().any(|c| c.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// Parsed, validated policies in load order (file, then document).
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    pub policies: Vec<Policy>,
    /// Things the documents say that ward accepts but a reviewer should look at.
    pub warnings: Vec<super::PolicyWarning>,
}

impl PolicySet {
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Policy names in load order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.policies.iter().map(|p| p.name.as_str())
    }

    /// The peers of every rule, in load order.
    fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.policies
            .iter()
            .flat_map(|p| p.rules())
            .flat_map(|(_, r)| r.peers.iter().flatten())
    }

    /// Every distinct CIDR and except prefix, in order.
    pub fn prefixes(&self) -> std::collections::BTreeSet<IpNet> {
        let mut prefixes = std::collections::BTreeSet::new();
        for peer in self.peers() {
            if let Peer::Cidr { net, except } = peer {
                prefixes.insert(*net);
                prefixes.extend(except.iter().copied());
            }
        }
        prefixes
    }

    /// Every distinct DNS-name selector, in order.
    pub fn fqdn_selectors(&self) -> std::collections::BTreeSet<&FqdnSelector> {
        let selectors = self.peers().filter_map(|peer| match peer {
            Peer::Fqdn(selector) => Some(selector),
            _ => None,
        });
        selectors.collect()
    }
}

/// Where a policy came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub document: usize,
    /// First line of the document's content.
    pub line: usize,
}

#[derive(Clone, Debug)]
pub struct Policy {
    /// Unique in a set; `namespace/name` for a NetworkPolicy.
    pub name: String,
    pub origin: Origin,
    pub mode: Mode,
    pub selector: WorkloadSelector,
    /// `Some` (even empty) isolates the selected workloads in that direction.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    /// The directions this policy isolates, with their rules.
    pub fn directions(&self) -> impl Iterator<Item = (u8, &[Rule])> {
        [
            (agent_common::DIRECTION_INGRESS, &self.ingress),
            (agent_common::DIRECTION_EGRESS, &self.egress),
        ]
        .into_iter()
        .filter_map(|(direction, rules)| Some((direction, rules.as_deref()?)))
    }

    pub fn rules_mut(&mut self) -> impl Iterator<Item = &mut Rule> {
        self.ingress
            .iter_mut()
            .chain(self.egress.iter_mut())
            .flatten()
    }

    pub fn rules(&self) -> impl Iterator<Item = (u8, &Rule)> {
        self.directions()
            .flat_map(|(direction, rules)| rules.iter().map(move |r| (direction, r)))
    }
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    /// Path of the rule in its document, for diagnostics.
    pub field: FieldPath,
    /// Line of the rule in its file, filled in by the loader.
    pub line: Option<usize>,
    pub action: RuleAction,
    /// `None`: any peer.
    pub peers: Option<Vec<Peer>>,
    /// `None`: every protocol and port.
    pub ports: Option<Vec<PortMatch>>,
    pub mtls: bool,
}

impl Rule {
    /// Whether a peer of the rule is a DNS name.
    pub fn names_fqdn(&self) -> bool {
        self.peers
            .iter()
            .flatten()
            .any(|peer| matches!(peer, Peer::Fqdn(_)))
    }
}

#[derive(Clone, Debug)]
pub enum Peer {
    Workloads(WorkloadSelector),
    Cidr {
        net: IpNet,
        except: Vec<IpNet>,
    },
    /// Addresses the local workload learned from DNS names: never a workload by its labels or
    /// addresses, and never an address by itself.
    Fqdn(FqdnSelector),
}

impl Peer {
    /// Whether this CIDR peer takes in every address of `prefix`.
    pub fn covers_prefix(&self, prefix: &IpNet) -> bool {
        match self {
            Peer::Cidr { net, except } => {
                net.contains(prefix) && !except.iter().any(|e| e.contains(prefix))
            }
            Peer::Workloads(_) | Peer::Fqdn(_) => false,
        }
    }

    pub fn covers_address(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        match self {
            Peer::Cidr { net, except } => {
                net.contains(&addr) && !except.iter().any(|e| e.contains(&addr))
            }
            Peer::Workloads(_) | Peer::Fqdn(_) => false,
        }
    }

    /// Whether the peer selects this workload: by its labels and identity, or by one of its
    /// addresses.
    pub fn selects(&self, workload: &WorkloadInfo) -> bool {
        match self {
            Peer::Workloads(selector) => selector.matches(workload),
            Peer::Cidr { .. } => workload.addresses.iter().any(|a| self.covers_address(*a)),
            Peer::Fqdn(_) => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortMatch {
    /// Every port of a protocol.
    Protocol(u8),
    Range {
        protocol: u8,
        first: u16,
        last: u16,
    },
    /// A NetworkPolicy port given by name: the destination workload's port of that name and
    /// protocol, if it has one.
    Named {
        protocol: u8,
        name: String,
    },
    /// ICMP or ICMPv6 ([`PROTO_ICMP`], [`PROTO_ICMPV6`]): one message type, or every type.
    Icmp {
        protocol: u8,
        icmp_type: Option<u8>,
    },
}

impl PortMatch {
    /// The (protocol, port) a named port stands for at `destination`.
    pub fn resolve_named(&self, destination: &WorkloadInfo) -> Option<(u8, u16)> {
        let PortMatch::Named { protocol, name } = self else {
            return None;
        };
        let found = destination
            .ports
            .iter()
            .find(|p| p.name == *name && p.protocol == *protocol);
        found.map(|p| (p.protocol, p.port))
    }
}

/// Selects workloads: every part given must match.
#[derive(Clone, Debug, Default)]
pub struct WorkloadSelector {
    pub labels: LabelSelector,
    pub spiffe_id: Option<SpiffeMatch>,
    pub namespace: NamespaceMatch,
}

impl WorkloadSelector {
    pub fn matches(&self, workload: &WorkloadInfo) -> bool {
        self.labels.matches(&workload.labels)
            && self
                .spiffe_id
                .as_ref()
                .is_none_or(|s| s.matches(&workload.spiffe_id))
            && self.namespace.matches(workload)
    }
}

#[derive(Clone, Debug, Default)]
pub enum NamespaceMatch {
    #[default]
    Any,
    Exact(String),
    /// A Kubernetes namespaceSelector, evaluated on the namespace's labels and its name label; a
    /// workload without a namespace matches none.
    Labels(LabelSelector),
}

impl NamespaceMatch {
    fn matches(&self, workload: &WorkloadInfo) -> bool {
        match (self, workload.namespace.as_deref()) {
            (NamespaceMatch::Any, _) => true,
            (NamespaceMatch::Exact(want), Some(ns)) => want == ns,
            (NamespaceMatch::Labels(selector), Some(ns)) => {
                let mut labels = workload.namespace_labels.clone();
                labels.insert(NAMESPACE_NAME_LABEL.to_owned(), ns.to_owned());
                selector.matches(&labels)
            }
            (_, None) => false,
        }
    }
}

/// Kubernetes label selector semantics: `matchLabels` equality and `matchExpressions`, ANDed.
#[derive(Clone, Debug, Default)]
pub struct LabelSelector {
    pub equal: BTreeMap<String, String>,
    pub expressions: Vec<Expression>,
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.equal.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|e| e.matches(labels))
    }
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One entry of `matchExpressions`, as written in both languages.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpressionDoc {
    key: String,
    operator: Operator,
    values: Option<Vec<String>>,
}

#[derive(Clone, Debug)]
pub struct Expression {
    key: String,
    operator: Operator,
    values: Vec<String>,
}

impl Expression {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A label selector from its two parts; `path` is the selector's own path.
pub fn label_selector(
    equal: Option<BTreeMap<String, String>>,
    expressions: Option<Vec<ExpressionDoc>>,
    path: &FieldPath,
    findings: &mut Findings,
) -> LabelSelector {
    let mut selector = LabelSelector {
        equal: equal.unwrap_or_default(),
        expressions: Vec::new(),
    };
    for (i, doc) in expressions.into_iter().flatten().enumerate() {
        let path = path.key("matchExpressions").index(i);
        if doc.key.is_empty() {
            findings.error(&path.key("key"), "key must not be empty");
        }
        let values = doc.values.unwrap_or_default();
        match doc.operator {
            Operator::In | Operator::NotIn if values.is_empty() => findings.error(
                &path.key("values"),
                format!("operator {:?} needs at least one value", doc.operator),
            ),
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => findings.error(
                &path.key("values"),
                format!("operator {:?} takes no values", doc.operator),
            ),
            _ => {}
        }
        selector.expressions.push(Expression {
            key: doc.key,
            operator: doc.operator,
            values,
        });
    }
    selector
}

/// `spiffeId` in a selector: an exact ID, or every ID below a path written `…/*`.
#[derive(Clone, Debug)]
pub enum SpiffeMatch {
    Exact(String),
    /// Keeps the trailing `/`.
    Prefix(String),
}

impl SpiffeMatch {
    pub fn parse(text: &str) -> Result<SpiffeMatch, String> {
        let Some(rest) = text.strip_prefix("spiffe://") else {
            return Err(format!(
                "`{text}` is not a SPIFFE ID: it must start with spiffe://"
            ));
        };
        let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if domain.is_empty() {
            return Err(format!("`{text}` has no trust domain"));
        }
        let valid_domain = domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c));
        if !valid_domain {
            return Err(format!(
                "`{text}`: trust domain `{domain}` may hold only lowercase letters, digits, `-`, `.`, `_`"
            ));
        }
        if let Some(prefix) = text.strip_suffix('*') {
            if !prefix.ends_with('/') || prefix[..prefix.len() - 1].contains('*') {
                return Err(format!(
                    "`{text}`: `*` is allowed only as the last path segment (`…/*`)"
                ));
            }
            return Ok(SpiffeMatch::Prefix(prefix.to_owned()));
        }
        if path.contains('*') {
            return Err(format!(
                "`{text}`: `*` is allowed only as the last path segment (`…/*`)"
            ));
        }
        Ok(SpiffeMatch::Exact(text.to_owned()))
    }

    fn matches(&self, id: &str) -> bool {
        match self {
            SpiffeMatch::Exact(want) => want == id,
            SpiffeMatch::Prefix(prefix) => id.starts_with(prefix.as_str()),
        }
    }
}

/// A CIDR with its exceptions. `lenient` truncates host bits (with a warning) where a strict
/// parser refuses them, as Kubernetes does.
pub fn cidr_peer(
    cidr: &str,
    except: &[String],
    lenient: bool,
    path: &FieldPath,
    findings: &mut Findings,
) -> Option<Peer> {
    let net = parse_cidr(cidr, lenient, &path.key("cidr"), findings)?;
    let mut nets = Vec::new();
    for (i, text) in except.iter().enumerate() {
        let path = path.key("except").index(i);
        let Some(e) = parse_cidr(text, lenient, &path, findings) else {
            continue;
        };
        if net.contains(&e) {
            nets.push(e);
        } else {
            findings.error(&path, format!("except {e} does not lie inside cidr {net}"));
        }
    }
    Some(Peer::Cidr { net, except: nets })
}

fn parse_cidr(
    text: &str,
    lenient: bool,
    path: &FieldPath,
    findings: &mut Findings,
) -> Option<IpNet> {
    let net: IpNet = match text.parse() {
        Ok(net) => net,
        Err(_) => {
            let hint = if text.parse::<IpAddr>().is_ok() {
                " (add a prefix length, e.g. /32)"
            } else {
                ""
            };
            findings.error(path, format!("`{text}` is not a CIDR{hint}"));
            return None;
        }
    };
    let exact = net.trunc();
    if exact != net {
        let message = format!("`{text}` has host bits set; it means {exact}");
        if lenient {
            findings.warn(path, super::WarningKind::NotEnforced, message);
        } else {
            findings.error(path, message);
            return None;
        }
    }
    Some(exact)
}

/// `protocol` of a port entry, TCP when absent; `allowed` lists the protocol names the language
/// accepts, matched without regard to case.
pub fn parse_protocol(
    text: Option<&str>,
    allowed: &[&str],
    path: &FieldPath,
    findings: &mut Findings,
) -> Option<u8> {
    let Some(text) = text else {
        return Some(PROTO_TCP);
    };
    let protocol = match text.to_ascii_uppercase().as_str() {
        "TCP" => PROTO_TCP,
        "UDP" => PROTO_UDP,
        "SCTP" => PROTO_SCTP,
        "ICMP" => PROTO_ICMP,
        "ICMPV6" => PROTO_ICMPV6,
        _ => 0,
    };
    if protocol == 0 || !allowed.iter().any(|a| a.eq_ignore_ascii_case(text)) {
        findings.error(
            path,
            format!("protocol `{text}` is not one of {}", allowed.join(", ")),
        );
        return None;
    }
    Some(protocol)
}

/// Whether a protocol's port field holds an ICMP message type instead of a port.
pub fn is_icmp(protocol: u8) -> bool {
    protocol == PROTO_ICMP || protocol == PROTO_ICMPV6
}

/// `icmpType` of an ICMP or ICMPv6 port entry: a message type from 0 to 255.
pub fn icmp_type(value: i64, path: &FieldPath, findings: &mut Findings) -> Option<u8> {
    let valid = u8::try_from(value).ok();
    if valid.is_none() {
        findings.error(path, format!("icmpType {value} is outside 0-255"));
    }
    valid
}

/// A numbered port entry: `port` alone, or `port` to `endPort`.
pub fn port_range(
    protocol: u8,
    port: i64,
    end_port: Option<i64>,
    path: &FieldPath,
    findings: &mut Findings,
) -> Option<PortMatch> {
    let check = |value: i64, field: &str, findings: &mut Findings| {
        let valid = u16::try_from(value).ok().filter(|v| *v != 0);
        if valid.is_none() {
            findings.error(
                &path.key(field),
                format!("{field} {value} is outside 1-65535"),
            );
        }
        valid
    };
    let first = check(port, "port", findings);
    let last = match end_port {
        Some(end) => check(end, "endPort", findings),
        None => first,
    };
    let (first, last) = (first?, last?);
    if last < first {
        findings.error(
            &path.key("endPort"),
            format!("endPort {last} is below port {first}"),
        );
        return None;
    }
    Some(PortMatch::Range {
        protocol,
        first,
        last,
    })
}

/// Names of policies and rules: they appear in verdict lines and logs.
pub fn check_name(name: &str, path: &FieldPath, findings: &mut Findings) {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !valid {
        findings.error(
            path,
            format!(
                "`{name}` is not a valid name: use letters, digits, `-`, `_`, `.` (starting with a letter or digit, at most 253)"
            ),
        );
    }
}
