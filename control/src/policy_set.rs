//! The policy set the control plane serves: the policy directory read by ward-policy's loader
//! (the files, documents, names and diagnostics of `ward policy check`), compiled for every node
//! of the registry before it is served, one POLICY resource per document.
//!
//! A set with any error is refused whole and the previous set stays served. What the control
//! plane adds to the loader is control-specific: limits on what it reads and serves.
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use ward_policy::{
    check::compile_error, compile_with_peers, load::Report, CompileError, Location, PolicyError,
    PolicySet, RuleIds, WorkloadInfo,
};
use ward_proto::{resource::Body, Policy, Resource};

pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
pub const MAX_TOTAL_BYTES: u64 = 256 * 1024 * 1024;
/// One document is one resource, sent in one message.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// A valid policy directory: its policies, and the POLICY resources that serve them.
#[derive(Debug, Default)]
pub struct ReadSet {
    pub set: PolicySet,
    /// By policy name (ward: `metadata.name`; NetworkPolicy: `namespace/name`).
    pub resources: BTreeMap<String, Resource>,
    /// Every file and cluster object read, with the SHA-256 of its text (hex), in reading order.
    pub sources: Vec<crate::history::SourceDigest>,
}

fn file_error(file: &Path, document: Option<usize>, reason: String) -> PolicyError {
    PolicyError {
        location: Location {
            file: file.to_owned(),
            document,
            ..Location::default()
        },
        field: String::new(),
        reason,
    }
}

/// A policy document read from a Kubernetes cluster (a NetworkPolicy object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterDocument {
    /// Where it is: `networkpolicies/<namespace>/<name>`; diagnostics name it as they name files.
    pub source: String,
    pub yaml: String,
    /// Its last writer ([`crate::history::SourceDigest::writer`]), if the API server says.
    pub writer: Option<String>,
}

/// Reads the directory, and the documents read from the cluster, into policies and POLICY
/// resources, or every error found.
pub fn read(dir: &Path, cluster: &[ClusterDocument]) -> Result<ReadSet, Vec<PolicyError>> {
    let mut report = Report::default();
    let files = ward_policy::load::policy_files(&mut report, &[dir.to_owned()]);
    let mut documents: HashMap<(PathBuf, usize), String> = HashMap::new();
    let mut total = 0u64;
    let mut sources = Vec::new();
    for file in files {
        let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        total += size;
        if size > MAX_FILE_BYTES {
            let reason = format!("larger than {MAX_FILE_BYTES} bytes");
            report.errors.push(file_error(&file, None, reason));
            continue;
        }
        if total > MAX_TOTAL_BYTES {
            let reason = format!("the directory holds more than {MAX_TOTAL_BYTES} bytes of policy");
            report.errors.push(file_error(&file, None, reason));
            break;
        }
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                report
                    .errors
                    .push(file_error(&file, None, format!("cannot read: {e}")));
                continue;
            }
        };
        // Relative to the directory, so replicas that mount it elsewhere name it alike.
        let name = file.strip_prefix(dir).unwrap_or(&file);
        sources.push(crate::history::SourceDigest {
            source: name.display().to_string(),
            sha256: crate::sha256_hex(&text),
            writer: None,
        });
        add_text(&mut report, &mut documents, &file, &text);
    }
    for document in cluster {
        sources.push(crate::history::SourceDigest {
            source: document.source.clone(),
            sha256: crate::sha256_hex(&document.yaml),
            writer: document.writer.clone(),
        });
        add_text(
            &mut report,
            &mut documents,
            Path::new(&document.source),
            &document.yaml,
        );
    }
    if !report.errors.is_empty() {
        return Err(report.errors);
    }
    let mut resources = BTreeMap::new();
    for policy in &report.set.policies {
        let origin = &policy.origin;
        let yaml = documents
            .remove(&(origin.file.clone(), origin.document))
            .expect("every policy comes from a document of a file read");
        let file = origin
            .file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let resource = Resource {
            name: policy.name.clone(),
            body: Some(Body::Policy(Policy {
                yaml,
                source: format!("{file}#{}", origin.document),
            })),
        };
        resources.insert(policy.name.clone(), resource);
    }
    Ok(ReadSet {
        set: report.set,
        resources,
        sources,
    })
}

/// Checks one document read from the cluster on its own, as `ward policy check` checks a file.
pub fn check_document(document: &ClusterDocument) -> Result<(), Vec<PolicyError>> {
    let mut report = Report::default();
    add_text(
        &mut report,
        &mut HashMap::new(),
        Path::new(&document.source),
        &document.yaml,
    );
    if report.errors.is_empty() {
        Ok(())
    } else {
        Err(report.errors)
    }
}

/// Adds the documents of one file's text to the report, keeping each document's text.
fn add_text(
    report: &mut Report,
    documents: &mut HashMap<(PathBuf, usize), String>,
    file: &Path,
    text: &str,
) {
    for (number, document) in ward_policy::load::documents(text) {
        if document.len() > MAX_DOCUMENT_BYTES {
            let reason = format!("larger than {MAX_DOCUMENT_BYTES} bytes");
            report.errors.push(file_error(file, Some(number), reason));
        }
        documents.insert((file.to_owned(), number), document.to_owned());
    }
    report.add_text(file, text);
}

/// A policy set that does not compile for the workloads of a node.
#[derive(Debug)]
pub struct NodeError {
    /// Empty when no node is registered.
    pub node: String,
    pub error: PolicyError,
}

/// Compiles `set` for every node as its agent compiles it: the node's workloads local, every
/// other workload identity a peer with its addresses. `nodes` holds each node's workloads with
/// their identities (see [`crate::registry::Registry::workload_infos`]). The first error is
/// located at the policy it is about, as `ward policy check` locates it.
pub fn compile(
    set: &PolicySet,
    nodes: &BTreeMap<String, Vec<WorkloadInfo>>,
) -> Result<(), Box<NodeError>> {
    if nodes.is_empty() {
        return compile_with_peers(set, &[], &[], &mut RuleIds::new())
            .map(drop)
            .map_err(|e| node_error(String::new(), set, &e));
    }
    // One peer per SPIFFE ID, with the addresses of every workload that has it.
    let mut identities: BTreeMap<&str, WorkloadInfo> = BTreeMap::new();
    for w in nodes.values().flatten() {
        let peer = identities
            .entry(&w.spiffe_id)
            .or_insert_with(|| WorkloadInfo {
                name: w.spiffe_id.clone(),
                addresses: Vec::new(),
                ..w.clone()
            });
        peer.addresses.extend(&w.addresses);
    }
    for (node, workloads) in nodes {
        let peers: Vec<WorkloadInfo> = identities
            .iter()
            .filter(|(id, _)| !workloads.iter().any(|w| w.spiffe_id == **id))
            .map(|(_, peer)| peer.clone())
            .collect();
        compile_with_peers(set, workloads, &peers, &mut RuleIds::new())
            .map_err(|e| node_error(node.clone(), set, &e))?;
    }
    Ok(())
}

fn node_error(node: String, set: &PolicySet, error: &CompileError) -> Box<NodeError> {
    let error = compile_error(set, error);
    Box::new(NodeError { node, error })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "apiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: web\nspec:\n  selector: {}\n  ingress: []\n";
    const NETPOL: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny\n  namespace: demo\nspec:\n  podSelector: {}\n";

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().expect("temp dir");
        for (name, text) in files {
            std::fs::write(tmp.path().join(name), text).expect("write policy");
        }
        tmp
    }

    fn errors(dir: &Path) -> Vec<String> {
        let errors = read(dir, &[]).expect_err("invalid directory");
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn each_document_is_one_resource_named_like_the_agent_names_it() {
        let tmp = dir_with(&[
            ("a.yaml", &format!("{WEB}---\n{NETPOL}")),
            (".hidden.yaml", "garbage: ["),
            ("notes.txt", "garbage: ["),
        ]);
        let read = read(tmp.path(), &[]).expect("valid directory");
        assert_eq!(
            read.resources.keys().collect::<Vec<_>>(),
            ["demo/deny", "web"]
        );
        assert_eq!(read.set.names().collect::<Vec<_>>(), ["web", "demo/deny"]);
        let Some(Body::Policy(p)) = &read.resources["web"].body else {
            panic!("a policy body")
        };
        assert_eq!((p.yaml.as_str(), p.source.as_str()), (WEB, "a.yaml#1"));
        let Some(Body::Policy(p)) = &read.resources["demo/deny"].body else {
            panic!("a policy body")
        };
        assert_eq!(p.source, "a.yaml#2");
        let served = ward_policy::parse_documents([("demo/deny", p.yaml.as_str())])
            .expect("the served text parses as the agent parses it");
        assert_eq!(served.names().collect::<Vec<_>>(), ["demo/deny"]);
    }

    #[test]
    fn every_problem_is_reported_as_the_check_reports_it() {
        let tmp = dir_with(&[
            ("a.yaml", WEB),
            ("b.yaml", &format!("{WEB}---\nkind: Other\nmetadata: {{name: x}}\n---\n[1, 2]\n---\nkey: [unclosed\n---\n{}", WEB.replace("web", "bad").replace("ingress: []", "ingress: [{bogus: 1}]"))),
        ]);
        let text = errors(tmp.path());
        let b = tmp.path().join("b.yaml");
        let check = Report::load(&[b]);
        assert_eq!(text.len(), 5, "{text:#?}");
        assert!(
            text[0].contains("b.yaml:4: document 1 (web)")
                && text[0].contains("duplicate policy name `web`"),
            "{text:#?}"
        );
        assert_eq!(
            text[1..],
            check
                .errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()[..],
            "the same diagnostics as `ward policy check`"
        );
        assert!(
            text[4].contains("document 5 (bad)") && text[4].contains("bogus"),
            "{text:#?}"
        );
    }

    #[test]
    fn oversized_files_are_refused() {
        let big = format!("{WEB}# {}\n", "x".repeat(MAX_FILE_BYTES as usize));
        let tmp = dir_with(&[("big.yaml", &big)]);
        let text = errors(tmp.path());
        assert!(text[0].contains("big.yaml: larger than"), "{text:?}");
    }

    #[test]
    fn a_missing_directory_is_an_error_not_an_empty_set() {
        let text = errors(Path::new("/nonexistent/ward-policies"));
        assert!(text[0].contains("no such file or directory"), "{text:?}");
    }

    #[test]
    fn sets_are_compiled_for_each_node_with_the_others_as_peers() {
        let workload = |identity, app: &str, address: &str| WorkloadInfo {
            identity,
            name: app.into(),
            spiffe_id: format!("spiffe://example.org/{app}"),
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            addresses: vec![address.parse().expect("address")],
            ..WorkloadInfo::default()
        };
        let nodes = BTreeMap::from([
            ("a".to_string(), vec![workload(300, "web", "10.0.0.1")]),
            ("b".to_string(), vec![workload(301, "db", "10.0.0.2")]),
        ]);
        let set =
            ward_policy::parse_documents([("db", &*WEB.replace("web", "db"))]).expect("valid");
        compile(&set, &nodes).expect("compiles");
        compile(&set, &BTreeMap::new()).expect("compiles without nodes");
        let mut outside = nodes.clone();
        outside.get_mut("b").expect("node b")[0].identity = ward_policy::identity::FIRST_CIDR;
        let failed = compile(&set, &outside).expect_err("not a workload identity");
        assert_eq!(failed.node, "b");
        let reason = &failed.error.reason;
        assert!(reason.contains("outside the workload range"), "{reason}");
    }

    #[test]
    fn a_registry_that_outgrows_the_set_makes_it_fail_to_compile() {
        use crate::registry::Registry;
        let web = |i: usize| ward_proto::Workload {
            name: format!("w{i}"),
            spiffe_id: format!("spiffe://example.org/w{i}"),
            labels: [(
                "app".to_string(),
                if i == 0 { "web" } else { "db" }.to_string(),
            )]
            .into(),
            ..ward_proto::Workload::default()
        };
        let ports: Vec<String> = (1..=100).map(|p| format!("{{port: {p}}}")).collect();
        let yaml = WEB
            .replace("selector: {}", "selector: {labels: {app: web}}")
            .replace(
                "ingress: []",
                &format!(
                    "ingress: [{{from: [{{labels: {{}}}}], ports: [{}]}}]",
                    ports.join(", ")
                ),
            );
        let set = ward_policy::parse_documents([("web", yaml.as_str())]).expect("valid");
        let mut registry = Registry::new("example.org");
        registry.report("a", vec![web(0)]).expect("report");
        registry
            .report("b", (1..100).map(web).collect())
            .expect("report");
        compile(&set, &registry.workload_infos()).expect("100 peers x 100 ports fit");
        registry
            .report("b", (1..3000).map(web).collect())
            .expect("report");
        let failed = compile(&set, &registry.workload_infos()).expect_err("too many entries");
        assert_eq!(failed.node, "a", "{}", failed.error);
        assert!(
            failed.error.to_string().contains(
                "(web): policy web, rule ingress[0]: the policy map would need more than"
            ),
            "{}",
            failed.error
        );
    }
}
