//! Helpers for the tests of the library and of its users: a policy set from YAML, a ward policy
//! document, a workload, the project's policy docs and the NetworkPolicy conformance table.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{parse, PolicySet, WorkloadInfo};

/// Parses `yaml` as one file's policy documents; panics with the errors when it does not load.
pub fn set(yaml: &str) -> PolicySet {
    parse(Path::new("test.yaml"), yaml)
        .unwrap_or_else(|e| panic!("policy does not load:\n{e}\n---\n{yaml}"))
}

/// A ward policy document named `name` with the given spec lines (indented by two).
pub fn policy(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: ward.dev/v1\nkind: Policy\nmetadata: {{name: {name}}}\nspec:\n{spec}\n"
    )
}

/// The policy set of one policy `db`, selecting `app: db`, with the given ingress rules
/// (indented by four).
pub fn db_ingress(rules: &str) -> PolicySet {
    set(&policy(
        "db",
        &format!("  selector: {{labels: {{app: db}}}}\n  ingress:\n{rules}"),
    ))
}

/// A change of the `db` policy, before and after: client gains 5432 but loses 9000-9002, and
/// 192.168.0.0/16 gains every port.
pub fn diff_example() -> (PolicySet, PolicySet) {
    let old = db_ingress(
        "    - from: [{labels: {app: web}}]\n      ports: [{port: 5432}]\n    - from: [{labels: {app: client}}]\n      ports: [{port: 9000, endPort: 9002}]",
    );
    let new = db_ingress(
        "    - from: [{labels: {app: web}}, {labels: {app: client}}]\n      ports: [{port: 5432}]\n    - from: [{cidr: 192.168.0.0/16}]",
    );
    (old, new)
}

/// The workloads web, client and db of the examples.
pub fn web_client_db() -> Vec<WorkloadInfo> {
    vec![
        workload(300, "web", &[("app", "web")], &["10.0.0.2"]),
        workload(301, "client", &[("app", "client")], &["10.0.0.3"]),
        workload(302, "db", &[("app", "db")], &["10.1.0.4"]),
    ]
}

pub fn workload(
    identity: u32,
    name: &str,
    labels: &[(&str, &str)],
    addresses: &[&str],
) -> WorkloadInfo {
    WorkloadInfo {
        identity,
        name: name.into(),
        spiffe_id: format!("spiffe://example.org/ns/demo/sa/{name}"),
        namespace: Some("demo".into()),
        namespace_labels: BTreeMap::new(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        addresses: addresses
            .iter()
            .map(|a| a.parse().expect("test address"))
            .collect(),
        ports: Vec::new(),
    }
}

/// The workspace root: the policy crate's parent directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the policy crate is in the workspace")
        .to_owned()
}

/// The fenced blocks of a Markdown text whose opening fence is "```" followed by exactly `info`,
/// each with the line number of its first line.
pub fn fenced_blocks(markdown: &str, info: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(bool, usize, String)> = None;
    for (number, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_end();
        match &mut open {
            None => {
                if let Some(rest) = trimmed.strip_prefix("```") {
                    open = Some((rest == info, number + 2, String::new()));
                }
            }
            Some(_) if trimmed.starts_with("```") => {
                if let Some((true, first, text)) = open.take() {
                    blocks.push((first, text));
                }
            }
            Some((_, _, text)) => *text += &format!("{line}\n"),
        }
    }
    blocks
}

pub fn policy_docs() -> String {
    let path = repo_root().join("docs/policy.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The Kubernetes NetworkPolicy conformance table (`src/testdata/networkpolicy-conformance.yaml`):
/// pods a, b, c in namespaces x, y, z, and scenarios with their expected reachability.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConformanceTable {
    /// By pod name, the same in every namespace.
    pub container_ports: BTreeMap<String, Vec<ContainerPort>>,
    /// By namespace; ward's configuration gives them as `namespaces.<name>.labels`.
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    pub scenarios: Vec<Scenario>,
}

#[derive(Deserialize)]
pub struct ContainerPort {
    pub name: String,
    pub port: u16,
    pub protocol: Option<String>,
}

#[derive(Deserialize)]
pub struct Scenario {
    pub name: String,
    pub port: String,
    pub policies: String,
    pub reachability: String,
}

/// The conformance table, parsed.
pub fn conformance_table() -> ConformanceTable {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/testdata/networkpolicy-conformance.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read the conformance table {}: {e}", path.display()));
    crate::yaml::from_str(&text)
        .unwrap_or_else(|e| panic!("the conformance table {}: {e}", path.display()))
}
