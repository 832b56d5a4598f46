//! Every policy example the project ships must load and compile.

use std::path::{Path, PathBuf};

use super::{compile, load, parse, RuleIds, WorkloadInfo};
use crate::testing::{fenced_blocks, policy_docs, repo_root, workload};
use crate::yaml::{Node, Value};

/// Workloads the examples talk about.
pub fn example_workloads() -> Vec<WorkloadInfo> {
    let mut workloads = vec![
        workload(300, "frontend", &[("app", "frontend")], &["10.200.0.2"]),
        workload(
            301,
            "api",
            &[("app", "api")],
            &["10.200.0.3", "fd00:200::3"],
        ),
        workload(302, "postgres", &[("app", "postgres")], &["10.200.0.4"]),
        workload(303, "prometheus", &[("app", "prometheus")], &["10.200.1.2"]),
        workload(304, "pg-backup", &[("app", "pg-backup")], &["10.200.2.2"]),
        workload(
            305,
            "web",
            &[("app", "web"), ("tier", "front")],
            &["10.0.0.2"],
        ),
        workload(306, "client", &[("app", "client")], &["10.0.0.3"]),
        workload(307, "payments", &[("app", "payments")], &["10.200.0.7"]),
        workload(308, "checkout", &[("app", "checkout")], &["10.200.0.8"]),
        workload(309, "legacy", &[("app", "legacy")], &[]),
    ];
    let namespaces = [
        "shop",
        "shop",
        "shop",
        "monitoring",
        "backup",
        "demo",
        "demo",
        "shop",
        "shop",
        "demo",
    ];
    for (w, namespace) in workloads.iter_mut().zip(namespaces) {
        w.namespace = Some(namespace.into());
        w.spiffe_id = format!("spiffe://example.org/ns/{namespace}/sa/{}", w.name);
    }
    workloads
}

/// The ```yaml blocks of a Markdown text that are policy documents, with their first line.
fn yaml_blocks(markdown: &str) -> Vec<(usize, String)> {
    fenced_blocks(markdown, "yaml")
        .into_iter()
        .filter(|(_, text)| text.starts_with("apiVersion:"))
        .collect()
}

#[test]
fn every_policy_example_of_the_docs_loads_and_compiles() {
    let blocks = yaml_blocks(&policy_docs());
    assert!(
        blocks.len() >= 9,
        "docs/policy.md shows an example per feature; found {}",
        blocks.len()
    );
    let workloads = example_workloads();
    for (line, text) in blocks {
        let source = PathBuf::from(format!("docs/policy.md:{line}"));
        let set = parse(&source, &text)
            .unwrap_or_else(|e| panic!("example at {}:\n{e}", source.display()));
        assert!(
            set.warnings.is_empty(),
            "example at {} warns: {:?}",
            source.display(),
            set.warnings
        );
        let compiled = compile(&set, &workloads, &mut RuleIds::new());
        let compiled = compiled.unwrap_or_else(|e| panic!("example at {}: {e}", source.display()));
        assert!(
            !compiled.entries.is_empty(),
            "example at {} selects an example workload",
            source.display()
        );
    }
}

fn fuzz_corpus() -> Vec<(PathBuf, Vec<u8>)> {
    let dir = repo_root().join("fuzz/corpus/policy_parse");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|entry| {
            let path = entry.expect("a corpus entry").path();
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, data)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_fuzz_corpus_input_passes_the_fuzz_target() {
    let corpus = fuzz_corpus();
    assert!(
        corpus.len() >= 40,
        "fuzz/corpus/policy_parse holds a real corpus; found {} files",
        corpus.len()
    );
    let mut failed = Vec::new();
    for (path, data) in &corpus {
        if std::panic::catch_unwind(|| super::fuzzing::parse_compile_decide(data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "the fuzz target panics on {} corpus input(s) (each panic is printed above):\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn the_fuzz_corpus_holds_every_docs_example_and_conformance_scenario() {
    let corpus: Vec<String> = fuzz_corpus()
        .into_iter()
        .filter_map(|(_, data)| String::from_utf8(data).ok())
        .collect();
    let docs = policy_docs();
    let table = crate::yaml::parse(include_str!("testdata/networkpolicy-conformance.yaml"))
        .expect("the conformance table parses");
    let Some(Value::Seq(scenarios)) = table.get("scenarios").map(|s| &s.value) else {
        panic!("the conformance table has scenarios");
    };
    let mut wanted: Vec<(String, String)> = yaml_blocks(&docs)
        .into_iter()
        .map(|(line, text)| (format!("docs/policy.md:{line}"), text))
        .collect();
    for scenario in scenarios {
        let field = |key: &str| scenario.get(key).and_then(Node::as_str).expect(key);
        let policies = field("policies");
        if !policies.is_empty() {
            let name = field("name");
            wanted.push((
                format!("conformance scenario {name:?}"),
                policies.to_owned(),
            ));
        }
    }
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, text)| !corpus.iter().any(|c| c.trim() == text.trim()))
        .map(|(what, _)| what.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "fuzz/corpus/policy_parse lacks (add each as a file):\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_example_policies_load_and_compile_together() {
    let dir = repo_root().join("examples/policies");
    let set = load(&[dir]).unwrap_or_else(|e| panic!("examples/policies:\n{e}"));
    assert!(
        set.names().count() >= 5,
        "examples/policies holds a small realistic set: {:?}",
        set.names().collect::<Vec<_>>()
    );
    assert!(
        set.warnings.is_empty(),
        "examples/policies warns: {:?}",
        set.warnings
    );
    let compiled =
        compile(&set, &example_workloads(), &mut RuleIds::new()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !compiled.entries.is_empty(),
        "the examples select the example workloads"
    );
}

#[test]
fn the_docs_validation_error_is_the_one_ward_gives() {
    let shown = fenced_blocks(&policy_docs(), "")
        .into_iter()
        .map(|(_, text)| text)
        .find(|text| text.contains(": document "))
        .expect("docs/policy.md shows a validation error");
    let file = "apiVersion: ward.dev/v1\nkind: Policy\nmetadata: {name: web-egress}\nspec:\n  selector: {labels: {app: web}}\n  egress: []\n---\napiVersion: ward.dev/v1\nkind: Policy\nmetadata: {name: web-ingress}\nspec:\n  selector: {labels: {app: web}}\n  ingress:\n    - ports: [{port: 80}, {port: 90, endPort: 80}]\n";
    let errors = parse(Path::new("policies/web.yaml"), file).expect_err("endPort below port");
    let said: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    assert_eq!(said, [shown.trim()], "docs/policy.md shows another error");
}
