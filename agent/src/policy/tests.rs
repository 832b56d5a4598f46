//! Every policy example the project ships must load and compile.

use std::path::{Path, PathBuf};

use super::compile::tests::workload;
use super::{compile, load, parse, RuleIds, WorkloadInfo};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate is in the workspace")
        .to_owned()
}

/// Workloads the examples talk about.
pub(crate) fn example_workloads() -> Vec<WorkloadInfo> {
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
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (number, line) in markdown.lines().enumerate() {
        match &mut current {
            None if line.trim_end() == "```yaml" => current = Some((number + 2, String::new())),
            Some(_) if line.starts_with("```") => blocks.extend(current.take()),
            Some((_, text)) => *text += &format!("{line}\n"),
            None => {}
        }
    }
    blocks
        .into_iter()
        .filter(|(_, text)| text.starts_with("apiVersion:"))
        .collect()
}

#[test]
fn every_policy_example_of_the_docs_loads_and_compiles() {
    let path = repo_root().join("docs/policy.md");
    let markdown =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let blocks = yaml_blocks(&markdown);
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
