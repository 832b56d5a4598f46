//! `ward policy check`: the warnings about risky policy, and the report in text, JSON and SARIF.

use std::collections::BTreeMap;
use std::path::PathBuf;

use agent_common::{PolicyKey, IDENTITY_ANY, PORT_ANY, PROTO_ANY};
use serde_json::{json, Value};

use super::compile::{compile_observed, policy_key, Slot};
use super::model::{Peer, Policy, Rule};
use super::{
    direction_name, CompileError, Compiled, Location, Mode, PolicyError, PolicySet, PolicyWarning,
    RuleAction, RuleIds, RuleInfo, WarningKind, WorkloadInfo,
};

/// What `check` looks for beyond validity.
pub struct LintOptions<'a> {
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
    PolicyWarning {
        location: location(policy, rule.line),
        field: rule.field.to_string(),
        kind,
        message,
    }
}

/// A warning about a whole policy, at its `field`.
fn policy_warning(policy: &Policy, kind: WarningKind, field: &str, message: &str) -> PolicyWarning {
    PolicyWarning {
        location: location(policy, None),
        field: field.to_owned(),
        kind,
        message: message.to_owned(),
    }
}

pub fn lint(
    set: &PolicySet,
    options: &LintOptions<'_>,
) -> Result<Vec<PolicyWarning>, CompileError> {
    let mut warnings = Vec::new();
    for policy in &set.policies {
        let in_production = options.production_paths.is_empty()
            || options
                .production_paths
                .iter()
                .any(|p| policy.origin.file.starts_with(p));
        if policy.mode == Mode::Audit && in_production {
            warnings.push(policy_warning(
                policy,
                WarningKind::AuditMode,
                "spec.mode",
                "audit mode: whatever this policy would refuse passes",
            ));
        }
        if options
            .workloads
            .is_some_and(|ws| !ws.iter().any(|w| policy.selector.matches(w)))
        {
            warnings.push(policy_warning(
                policy,
                WarningKind::SelectsNothing,
                "spec",
                "selects no workload of the configuration",
            ));
        }
        for (direction, rule) in policy.rules() {
            if let Some(peer) = open_peer(rule) {
                let message = format!(
                    "allows {peer} on every port ({})",
                    direction_name(direction)
                );
                warnings.push(rule_warning(policy, rule, WarningKind::OpenRule, message));
            }
        }
    }
    if let Some(workloads) = options.workloads {
        let (compiled, shadowed) = shadowed_rules(set, workloads)?;
        for (rule, by) in shadowed {
            let (info, by) = (&compiled.rules[&rule], &compiled.rules[&by]);
            if let Some((policy, rule)) = find_rule(set, info) {
                let message = format!(
                    "shadowed: every connection it allows is denied by {}/{}",
                    by.policy, by.rule
                );
                warnings.push(rule_warning(policy, rule, WarningKind::Shadowed, message));
            }
        }
    }
    Ok(warnings)
}

/// The peer of an allow rule on every port that is anyone: no `from`/`to`, a `/0` CIDR, or the
/// DNS-name pattern `*`.
fn open_peer(rule: &Rule) -> Option<String> {
    if rule.action != RuleAction::Allow || rule.ports.is_some() {
        return None;
    }
    let Some(peers) = &rule.peers else {
        return Some("any peer".into());
    };
    peers.iter().find_map(|peer| match peer {
        Peer::Cidr { net, .. } if net.prefix_len() == 0 => Some(net.to_string()),
        Peer::Fqdn(selector) if selector.matches_every_name() => {
            Some(format!("every DNS name ({selector})"))
        }
        _ => None,
    })
}

pub fn find_rule<'a>(set: &'a PolicySet, info: &RuleInfo) -> Option<(&'a Policy, &'a Rule)> {
    let policy = set.policies.iter().find(|p| p.name == info.policy)?;
    let rule = policy
        .rules()
        .find(|(d, r)| *d == info.direction && r.name == info.rule)?
        .1;
    Some((policy, rule))
}

/// Allow rules every entry of which a deny rule overrides, each with one such deny rule.
fn shadowed_rules(
    set: &PolicySet,
    workloads: &[WorkloadInfo],
) -> Result<(Compiled, Vec<(u32, u32)>), CompileError> {
    let mut allows: BTreeMap<u32, Vec<(PolicyKey, Slot)>> = BTreeMap::new();
    let compiled = compile_observed(set, workloads, &mut RuleIds::new(), &mut |c| {
        if matches!(c.slot, Slot::Allow | Slot::AuditAllow) {
            allows.entry(c.rule).or_default().push((c.key, c.slot));
        }
    })?;
    let shadowed = allows.into_iter().filter_map(|(rule, keys)| {
        let denies: Option<Vec<u32>> = keys
            .iter()
            .map(|(key, slot)| covering_deny(&compiled, key, *slot))
            .collect();
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
        (protocol, port) => &[
            (protocol, port),
            (protocol, PORT_ANY),
            (PROTO_ANY, PORT_ANY),
        ],
    };
    let remotes = [key.remote_identity, IDENTITY_ANY];
    let keys = remotes
        .into_iter()
        .flat_map(|r| ports.iter().map(move |(p, port)| (r, *p, *port)));
    keys.filter_map(|(remote, protocol, port)| {
        compiled.entries.get(&policy_key(
            key.local_identity,
            remote,
            key.direction,
            protocol,
            port,
        ))
    })
    .find_map(|value| {
        let audit_deny = if slot == Slot::AuditAllow {
            value.audit_deny_rule
        } else {
            0
        };
        [value.deny_rule, audit_deny].into_iter().find(|r| *r != 0)
    })
}

/// The outcome of a check run.
pub struct CheckReport {
    /// Names of the valid policies.
    pub policies: Vec<String>,
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
        out + &format!(
            "{} policies, {errors} errors, {warnings} warnings\n",
            self.policies.len()
        )
    }

    pub fn json(&self) -> Value {
        let errors: Vec<Value> = self
            .errors
            .iter()
            .map(|e| diagnostic(&e.location, &e.field, &e.reason, None))
            .collect();
        let warnings = self
            .warnings
            .iter()
            .map(|w| diagnostic(&w.location, &w.field, &w.message, Some(w.kind.code())));
        json!({ "policies": self.policies, "errors": errors, "warnings": warnings.collect::<Vec<_>>() })
    }

    /// SARIF 2.1.0, which CI systems show inline on the changed lines.
    pub fn sarif(&self) -> Value {
        let result = |rule_id: &str,
                      level: &str,
                      location: &Location,
                      field: &str,
                      message: &str| {
            let text = if field.is_empty() {
                message.to_owned()
            } else {
                format!("{field}: {message}")
            };
            let mut physical = json!({ "artifactLocation": { "uri": uri(location) } });
            if let Some(line) = location.line {
                physical["region"] = json!({ "startLine": line });
            }
            json!({ "ruleId": rule_id, "level": level, "message": { "text": text }, "locations": [{ "physicalLocation": physical }] })
        };
        let errors = self
            .errors
            .iter()
            .map(|e| result("invalid-policy", "error", &e.location, &e.field, &e.reason));
        let warnings = self
            .warnings
            .iter()
            .map(|w| result(w.kind.code(), "warning", &w.location, &w.field, &w.message));
        let mut rules = vec![
            json!({ "id": "invalid-policy", "shortDescription": { "text": "policy document ward refuses" } }),
        ];
        rules.extend(
            WarningKind::ALL.map(
                |k| json!({ "id": k.code(), "shortDescription": { "text": k.description() } }),
            ),
        );
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

/// A compile error as a diagnostic: located at the policy it is about, if one.
pub fn compile_error(set: &PolicySet, error: &CompileError) -> PolicyError {
    let policy = set
        .policies
        .iter()
        .find(|p| error.policy() == Some(p.name.as_str()));
    PolicyError {
        location: policy.map_or_else(Location::default, |p| location(p, None)),
        field: String::new(),
        reason: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::parse;
    use crate::testing::{policy, workload};

    fn warnings(
        yaml: &str,
        workloads: Option<&[WorkloadInfo]>,
        production: &[PathBuf],
    ) -> Vec<(String, WarningKind)> {
        let set = parse(Path::new("policies/p.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"));
        let options = LintOptions {
            workloads,
            production_paths: production,
        };
        let found = lint(&set, &options).unwrap_or_else(|e| panic!("{e}"));
        found
            .into_iter()
            .map(|w| {
                (
                    format!("{}:{}", w.location.policy.unwrap_or_default(), w.field),
                    w.kind,
                )
            })
            .collect()
    }

    #[test]
    fn risky_policy_is_warned_about() {
        let ws = [
            workload(300, "web", &[("app", "web")], &["10.0.0.2"]),
            workload(301, "db", &[("app", "db")], &[]),
        ];
        let yaml = policy("open", "  selector: {labels: {app: web}}\n  ingress:\n    - name: anyone\n    - name: internet\n      from: [{cidr: 0.0.0.0/0}]\n    - name: fine\n      from: [{cidr: 0.0.0.0/0}]\n      ports: [{port: 443}]")
            + &policy("nobody", "  selector: {labels: {app: gone}}\n  ingress: []")
            + &policy("trial", "  mode: audit\n  selector: {labels: {app: db}}\n  egress: []")
            + &policy("shadow", "  selector: {labels: {app: db}}\n  ingress:\n    - name: web-in\n      from: [{labels: {app: web}}]\n      ports: [{port: 5432}]\n    - name: partly\n      from: [{labels: {app: web}}]\n      ports: [{port: 5432}, {port: 6432, protocol: UDP}]\n    - name: no-web\n      action: deny\n      from: [{cidr: 10.0.0.0/24}]\n      ports: [{protocol: TCP}]");
        assert_eq!(
            warnings(&yaml, Some(&ws), &[]),
            [
                ("open:spec.ingress[0]".to_owned(), WarningKind::OpenRule),
                ("open:spec.ingress[1]".to_owned(), WarningKind::OpenRule),
                ("nobody:spec".to_owned(), WarningKind::SelectsNothing),
                ("trial:spec.mode".to_owned(), WarningKind::AuditMode),
                ("shadow:spec.ingress[0]".to_owned(), WarningKind::Shadowed),
            ],
            "the web-in rule is shadowed by no-web; partly still opens udp/6432"
        );
        let without_config = warnings(&yaml, None, &[PathBuf::from("prod")]);
        assert_eq!(
            without_config.len(),
            2,
            "no workloads: only the open rules; audit outside prod: {without_config:?}"
        );
        let in_prod = warnings(&yaml, None, &[PathBuf::from("policies")]);
        assert!(
            in_prod.contains(&("trial:spec.mode".to_owned(), WarningKind::AuditMode)),
            "{in_prod:?}"
        );
    }

    #[test]
    fn every_dns_name_on_every_port_is_an_open_rule_and_names_can_be_shadowed() {
        let ws = [workload(300, "web", &[("app", "web")], &["10.0.0.2"])];
        let yaml = policy("names", "  selector: {}\n  egress:\n    - name: anything\n      to: [{fqdnPattern: '*'}]\n    - name: one\n      to: [{fqdn: api.example}]\n    - name: tls-anywhere\n      to: [{fqdnPattern: '*'}]\n      ports: [{port: 443}]\n    - name: no-smtp\n      action: deny\n      ports: [{port: 25}]\n    - name: mail\n      to: [{fqdnPattern: 'smtp.*.example'}]\n      ports: [{port: 25}]");
        assert_eq!(
            warnings(&yaml, Some(&ws), &[]),
            [
                ("names:spec.egress[0]".to_owned(), WarningKind::OpenRule),
                ("names:spec.egress[4]".to_owned(), WarningKind::Shadowed),
            ]
        );
        let set = parse(Path::new("p.yaml"), &yaml).unwrap_or_else(|e| panic!("{e}"));
        let options = LintOptions {
            workloads: None,
            production_paths: &[],
        };
        let found = lint(&set, &options).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            found[0].message,
            "allows every DNS name (fqdnPattern:*) on every port (egress)"
        );
    }

    #[test]
    fn report_formats_carry_every_location() {
        let location = Location {
            file: "./p/a.yaml".into(),
            line: Some(7),
            document: Some(2),
            policy: Some("x".into()),
        };
        let report = CheckReport {
            policies: vec!["x".into(), "y".into(), "z".into()],
            errors: vec![PolicyError {
                location: location.clone(),
                field: "spec.mode".into(),
                reason: "bad".into(),
            }],
            warnings: vec![PolicyWarning {
                location,
                field: String::new(),
                kind: WarningKind::AuditMode,
                message: "audit".into(),
            }],
        };
        assert_eq!(
            report.human(),
            "error: ./p/a.yaml:7: document 2 (x): spec.mode: bad\nwarning: ./p/a.yaml:7: document 2 (x): audit [audit-mode]\n3 policies, 1 errors, 1 warnings\n"
        );
        let json = report.json();
        assert_eq!(
            (
                json["errors"][0]["line"].as_u64(),
                json["errors"][0]["field"].as_str()
            ),
            (Some(7), Some("spec.mode")),
            "{json}"
        );
        assert_eq!(
            json["warnings"][0]["code"].as_str(),
            Some("audit-mode"),
            "{json}"
        );
        let sarif = report.sarif();
        let results = &sarif["runs"][0]["results"];
        assert_eq!(sarif["version"].as_str(), Some("2.1.0"));
        assert_eq!(
            (results[0]["level"].as_str(), results[1]["ruleId"].as_str()),
            (Some("error"), Some("audit-mode")),
            "{sarif}"
        );
        let physical = &results[0]["locations"][0]["physicalLocation"];
        assert_eq!(
            (
                physical["artifactLocation"]["uri"].as_str(),
                physical["region"]["startLine"].as_u64()
            ),
            (Some("p/a.yaml"), Some(7))
        );
        let rule_ids: Vec<_> = sarif["runs"][0]["tool"]["driver"]["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .map(|r| r["id"].clone())
            .collect();
        assert_eq!(
            rule_ids.len(),
            1 + WarningKind::ALL.len(),
            "every result's rule is described: {rule_ids:?}"
        );
    }
}
