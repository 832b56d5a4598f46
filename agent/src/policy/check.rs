//! `ward policy check`: the warnings about risky policy, and the report in text, JSON and SARIF.

use std::collections::BTreeMap;
use std::path::PathBuf;

use agent_common::{PolicyKey, IDENTITY_ANY, PORT_ANY, PROTO_ANY};
use serde_json::{json, Value};

use super::compile::{compile_observed, policy_key, Slot};
use super::model::{Peer, Policy, Rule};
use super::{
    direction_name, CompileError, Compiled, Location, Mode, PolicyError, PolicySet, PolicyWarning, RuleAction,
    RuleIds, RuleInfo, WarningKind, WorkloadInfo,
};

/// What `check` looks for beyond validity.
pub(crate) struct LintOptions<'a> {
    /// Without workloads, the checks that need them (selects nothing, shadowed) are skipped.
    pub workloads: Option<&'a [WorkloadInfo]>,
    /// Audit-mode policies from files under these paths are warned about; empty: every file.
    pub production_paths: &'a [PathBuf],
}

fn location(policy: &Policy, line: Option<usize>) -> Location {
    Location {
        file: policy.origin.file.clone(),
        line: line.or(Some(policy.origin.line)),
        document: Some(policy.origin.document),
        policy: Some(policy.name.clone()),
    }
}

fn rule_warning(policy: &Policy, rule: &Rule, kind: WarningKind, message: String) -> PolicyWarning {
    PolicyWarning { location: location(policy, rule.line), field: rule.field.to_string(), kind, message }
}

pub(crate) fn lint(set: &PolicySet, options: &LintOptions<'_>) -> Result<Vec<PolicyWarning>, CompileError> {
    let mut warnings = Vec::new();
    for policy in &set.policies {
        let in_production = options.production_paths.is_empty()
            || options.production_paths.iter().any(|p| policy.origin.file.starts_with(p));
        if policy.mode == Mode::Audit && in_production {
            let message = "audit mode: whatever this policy would refuse passes".to_owned();
            let (kind, field) = (WarningKind::AuditMode, "spec.mode".to_owned());
            warnings.push(PolicyWarning { location: location(policy, None), field, kind, message });
        }
        if options.workloads.is_some_and(|ws| !ws.iter().any(|w| policy.selector.matches(w))) {
            let message = "selects no workload of the configuration".to_owned();
            let (kind, field) = (WarningKind::SelectsNothing, "spec".to_owned());
            warnings.push(PolicyWarning { location: location(policy, None), field, kind, message });
        }
        for (direction, rule) in policy.rules() {
            if let Some(peer) = open_peer(rule) {
                let message = format!("allows {peer} on every port ({})", direction_name(direction));
                warnings.push(rule_warning(policy, rule, WarningKind::OpenRule, message));
            }
        }
    }
    if let Some(workloads) = options.workloads {
        let (compiled, shadowed) = shadowed_rules(set, workloads)?;
        for (rule, by) in shadowed {
            let (info, by) = (&compiled.rules[&rule], &compiled.rules[&by]);
            if let Some((policy, rule)) = find_rule(set, info) {
                let message = format!("shadowed: every connection it allows is denied by {}/{}", by.policy, by.rule);
                warnings.push(rule_warning(policy, rule, WarningKind::Shadowed, message));
            }
        }
    }
    Ok(warnings)
}

/// The peer of an allow rule on every port that is anyone: no `from`/`to`, or a `/0` CIDR.
fn open_peer(rule: &Rule) -> Option<String> {
    if rule.action != RuleAction::Allow || rule.ports.is_some() {
        return None;
    }
    let Some(peers) = &rule.peers else { return Some("any peer".into()) };
    peers.iter().find_map(|peer| match peer {
        Peer::Cidr { net, .. } if net.prefix_len() == 0 => Some(net.to_string()),
        _ => None,
    })
}

pub(crate) fn find_rule<'a>(set: &'a PolicySet, info: &RuleInfo) -> Option<(&'a Policy, &'a Rule)> {
    let policy = set.policies.iter().find(|p| p.name == info.policy)?;
    let rule = policy.rules().find(|(d, r)| *d == info.direction && r.name == info.rule)?.1;
    Some((policy, rule))
}

/// Allow rules every entry of which a deny rule overrides, each with one such deny rule.
fn shadowed_rules(set: &PolicySet, workloads: &[WorkloadInfo]) -> Result<(Compiled, Vec<(u32, u32)>), CompileError> {
    let mut allows: BTreeMap<u32, Vec<(PolicyKey, Slot)>> = BTreeMap::new();
    let compiled = compile_observed(set, workloads, &mut RuleIds::new(), &mut |c| {
        if matches!(c.slot, Slot::Allow | Slot::AuditAllow) {
            allows.entry(c.rule).or_default().push((c.key, c.slot));
        }
    })?;
    let shadowed = allows.into_iter().filter_map(|(rule, keys)| {
        let denies: Option<Vec<u32>> = keys.iter().map(|(key, slot)| covering_deny(&compiled, key, *slot)).collect();
        Some((rule, *denies?.first()?))
    });
    let shadowed = shadowed.collect();
    Ok((compiled, shadowed))
}

/// A deny rule that every query reading `key` also reads, so it always wins over the allow there.
fn covering_deny(compiled: &Compiled, key: &PolicyKey, slot: Slot) -> Option<u32> {
    let ports: &[(u8, u16)] = match (key.protocol, key.port) {
        (PROTO_ANY, _) => &[(PROTO_ANY, PORT_ANY)],
        (protocol, PORT_ANY) => &[(protocol, PORT_ANY), (PROTO_ANY, PORT_ANY)],
        (protocol, port) => &[(protocol, port), (protocol, PORT_ANY), (PROTO_ANY, PORT_ANY)],
    };
    let remotes = [key.remote_identity, IDENTITY_ANY];
    let keys = remotes.into_iter().flat_map(|r| ports.iter().map(move |(p, port)| (r, *p, *port)));
    keys.filter_map(|(remote, protocol, port)| {
        compiled.entries.get(&policy_key(key.local_identity, remote, key.direction, protocol, port))
    })
    .find_map(|value| {
        let audit_deny = if slot == Slot::AuditAllow { value.audit_deny_rule } else { 0 };
        [value.deny_rule, audit_deny].into_iter().find(|r| *r != 0)
    })
}

/// The outcome of a check run.
pub(crate) struct CheckReport {
    pub policies: usize,
    pub errors: Vec<PolicyError>,
    pub warnings: Vec<PolicyWarning>,
}

impl CheckReport {
    pub fn human(&self) -> String {
        let mut out = String::new();
        for error in &self.errors {
            out += &format!("error: {error}\n");
        }
        for warning in &self.warnings {
            out += &format!("warning: {warning}\n");
        }
        let (errors, warnings) = (self.errors.len(), self.warnings.len());
        out + &format!("{} policies, {errors} errors, {warnings} warnings\n", self.policies)
    }

    pub fn json(&self) -> Value {
        let errors: Vec<Value> = self.errors.iter().map(|e| diagnostic(&e.location, &e.field, &e.reason, None)).collect();
        let warnings = self.warnings.iter().map(|w| diagnostic(&w.location, &w.field, &w.message, Some(w.kind.code())));
        json!({ "policies": self.policies, "errors": errors, "warnings": warnings.collect::<Vec<_>>() })
    }

    /// SARIF 2.1.0, which CI systems show inline on the changed lines.
    pub fn sarif(&self) -> Value {
        let result = |rule_id: &str, level: &str, location: &Location, field: &str, message: &str| {
            let text = if field.is_empty() { message.to_owned() } else { format!("{field}: {message}") };
            let mut physical = json!({ "artifactLocation": { "uri": uri(location) } });
            if let Some(line) = location.line {
                physical["region"] = json!({ "startLine": line });
            }
            json!({ "ruleId": rule_id, "level": level, "message": { "text": text }, "locations": [{ "physicalLocation": physical }] })
        };
        let errors = self.errors.iter().map(|e| result("invalid-policy", "error", &e.location, &e.field, &e.reason));
        let warnings = self.warnings.iter().map(|w| result(w.kind.code(), "warning", &w.location, &w.field, &w.message));
        let mut rules = vec![json!({ "id": "invalid-policy", "shortDescription": { "text": "policy document ward refuses" } })];
        rules.extend(WarningKind::ALL.map(|k| json!({ "id": k.code(), "shortDescription": { "text": k.description() } })));
        json!({
            "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
            "version": "2.1.0",
            "runs": [{
                "tool": { "driver": {
                    "name": "ward",
                    "version": env!("CARGO_PKG_VERSION"),
                    "informationUri": "https://github.com/ward-dev/ward",
                    "rules": rules,
                } },
                "results": errors.chain(warnings).collect::<Vec<_>>(),
            }],
        })
    }
}

fn diagnostic(location: &Location, field: &str, message: &str, code: Option<&str>) -> Value {
    let mut value = json!({
        "file": location.file,
        "line": location.line,
        "document": location.document,
        "policy": location.policy,
        "field": field,
        "message": message,
    });
    if let Some(code) = code {
        value["code"] = json!(code);
    }
    value
}

/// A relative URI for a path as given, with forward slashes.
fn uri(location: &Location) -> String {
    let path = location.file.to_string_lossy().replace('\\', "/");
    path.strip_prefix("./").unwrap_or(&path).to_owned()
}
