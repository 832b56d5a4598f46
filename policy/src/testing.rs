//! Helpers for the tests of the library and of its users: a policy set from YAML, a ward policy
//! document, a workload, and the project's policy docs.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
