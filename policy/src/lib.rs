//! Network policy: the YAML languages ward accepts (its own `ward.dev/v1` Policy and Kubernetes
//! `networking.k8s.io/v1` NetworkPolicy), their validation, and their compilation into the
//! entries of the kernel's policy map.
//!
//! [`load`] turns files into a validated [`PolicySet`] (or every error found), [`compile`] turns
//! a set plus the node's workloads into [`Compiled`] map entries, and [`Compiled::decide`] answers
//! a query exactly as the kernel does, so `ward policy trace` and enforcement cannot disagree.

pub mod check;
pub mod compile;
pub mod diagnostics;
pub mod fqdn;
pub mod identity;
mod k8s;
pub mod load;
pub mod model;
mod port;
pub mod service;
pub mod trace;
mod ward;
pub mod yaml;

/// What the fuzz target (fuzz/) runs on every input; the unit tests replay the corpus through it.
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::IpAddr;

pub use compile::{compile, compile_with_peers, CompileError, Compiled, RuleIds};
// A glob, so that names the binary does not use yet (PolicyErrors) stay part of the API.
pub use diagnostics::*;
pub use fqdn::FqdnSelector;
// A glob, so that `parse` (used by tests and fuzz/ only) stays part of the API.
pub use load::*;
pub use model::{is_port_name, PolicySet, NAMESPACE_NAME_LABEL};
pub use port::{icmp_type_of, PortArg};
/// A ward Policy's `spec` as written, for its JSON schema (ward-control's
/// CustomResourceDefinition is generated from it).
#[cfg(feature = "schema")]
pub use ward::SpecDoc as PolicySpec;

/// What the policy compiler needs to know about one workload of the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadInfo {
    /// Numeric identity, in the workload range ([`identity::WORKLOADS`]).
    pub identity: u32,
    pub name: String,
    pub spiffe_id: String,
    pub namespace: Option<String>,
    /// Labels of its namespace from the configuration's `namespaces` (NetworkPolicy
    /// namespaceSelectors see these plus `kubernetes.io/metadata.name`).
    pub namespace_labels: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub addresses: Vec<IpAddr>,
    /// Named ports (a pod's container ports), which NetworkPolicy ports may name.
    pub ports: Vec<NamedPort>,
}

impl WorkloadInfo {
    /// The key its identity number is allocated for ([`identity::key`]).
    pub fn key(&self) -> String {
        identity::key(&self.spiffe_id, self.namespace.as_deref(), &self.labels)
    }
}

/// A port a workload names, as a Kubernetes container port does.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NamedPort {
    pub name: String,
    /// `agent_common::PROTO_TCP`, `PROTO_UDP` or `PROTO_SCTP`.
    pub protocol: u8,
    pub port: u16,
}

impl NamedPort {
    /// A container port as written (`protocol` `None` is TCP), or the field (`.name`, `.port`,
    /// `.protocol`) that is wrong and why.
    pub fn parse(
        name: String,
        port: i64,
        protocol: Option<&str>,
    ) -> Result<NamedPort, (&'static str, String)> {
        if !model::is_port_name(&name) {
            return Err((
                ".name",
                format!(
                    "{name:?} is not a port name: 1 to 15 lowercase letters, digits and single \
                     inner dashes, with at least one letter"
                ),
            ));
        }
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or((".port", format!("{port} is not a port from 1 to 65535")))?;
        let protocol = match protocol.unwrap_or("TCP") {
            "TCP" => agent_common::PROTO_TCP,
            "UDP" => agent_common::PROTO_UDP,
            "SCTP" => agent_common::PROTO_SCTP,
            other => return Err((".protocol", format!("{other:?} is not TCP, UDP or SCTP"))),
        };
        Ok(NamedPort {
            name,
            protocol,
            port,
        })
    }
}

/// `mode` of a policy.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    /// Traffic the policy would drop passes and is reported as audit.
    Audit,
}

/// What a rule does when it matches.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Allow,
    Deny,
    /// The implicit rule of a policy that isolates its workloads in a direction.
    #[serde(skip_deserializing)]
    DefaultDeny,
}

/// Describes one rule id found in the compiled map, so a verdict can name its policy and rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    pub policy: String,
    /// The rule's `name`, `ingress[<index>]`/`egress[<index>]`, or `default-deny`.
    pub rule: String,
    pub action: RuleAction,
    pub mode: Mode,
    pub mtls: bool,
    pub source: std::path::PathBuf,
    /// [`agent_common::DIRECTION_INGRESS`] or [`agent_common::DIRECTION_EGRESS`].
    pub direction: u8,
}

/// The kernel's answer to one query; see [`Compiled::decide`] and [`Compiled::decide_learned`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// One of `agent_common::VERDICT_*`.
    pub verdict: u8,
    /// The deciding rule; 0 when the local workload is not isolated in that direction.
    pub rule: u32,
    pub isolated: bool,
    /// An enforcing rule (allow or deny) for the remote (or any remote) at the port matched: no
    /// DNS name the address was learned from can change the verdict. Only a decision not settled
    /// goes on to the DNS-name selectors of a learned address.
    pub settled: bool,
    /// The DNS-name selector identity a learned address was decided as, when one decided.
    pub selector: Option<u32>,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        })
    }
}

impl std::fmt::Display for RuleAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RuleAction::Allow => "allow",
            RuleAction::Deny => "deny",
            RuleAction::DefaultDeny => "default-deny",
        })
    }
}

/// `ingress` or `egress`.
pub fn direction_name(direction: u8) -> &'static str {
    if direction == agent_common::DIRECTION_EGRESS {
        "egress"
    } else {
        "ingress"
    }
}

/// `allow`, `deny`, `audit` or `redirect`.
pub fn verdict_name(verdict: u8) -> &'static str {
    match verdict {
        agent_common::VERDICT_ALLOW => "allow",
        agent_common::VERDICT_DENY => "deny",
        agent_common::VERDICT_AUDIT => "audit",
        agent_common::VERDICT_REDIRECT => "redirect",
        agent_common::VERDICT_NO_TUNNEL => "deny",
        _ => "unknown",
    }
}

/// A protocol as ward names it in output: `tcp`, `udp`, `sctp`, `icmp`, `icmpv6`, `udplite`, `any`.
pub fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        agent_common::PROTO_TCP => "tcp",
        agent_common::PROTO_UDP => "udp",
        agent_common::PROTO_SCTP => "sctp",
        agent_common::PROTO_ICMP => "icmp",
        agent_common::PROTO_ICMPV6 => "icmpv6",
        agent_common::PROTO_UDPLITE => "udplite",
        agent_common::PROTO_ANY => "any",
        _ => "other",
    }
}
