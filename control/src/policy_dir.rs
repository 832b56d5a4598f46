//! The policy directory: every `*.yaml`/`*.yml` file in it (not hidden, not in subdirectories,
//! read in name order, like the agent), split into documents, one POLICY resource per document.
//!
//! The control plane cannot link the agent's policy compiler (that lives in the `ward` binary), so
//! it checks what it can on its own: each document is YAML, a mapping, of a kind ward accepts,
//! with a non-empty `metadata.name` unique in the directory. Semantic errors (a bad selector, an
//! unknown field) are the agent's to find: it NACKs the update, the control plane logs the error,
//! and every agent keeps the policy it had. Anything this module refuses is refused whole: the
//! previous set stays served.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_yaml::Value;
use ward_proto::{resource::Body, Policy, Resource};

pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
pub const MAX_TOTAL_BYTES: u64 = 256 * 1024 * 1024;
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

const WARD_API_VERSION: &str = "ward.dev/v1";
const WARD_KIND: &str = "Policy";
const K8S_API_VERSION: &str = "networking.k8s.io/v1";
const K8S_KIND: &str = "NetworkPolicy";

/// Editors and `git checkout` write in several steps: the directory is read once it has been quiet
/// this long...
pub const SETTLE: Duration = Duration::from_millis(50);
/// ...or after this long at most, so a steady trickle of writes cannot hold changes back.
pub const SETTLE_MAX: Duration = Duration::from_millis(500);

/// One problem, naming the file, the document and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocumentError {
    pub file: PathBuf,
    /// 1-based; `None` for problems with the whole file.
    pub document: Option<usize>,
    pub reason: String,
}

impl std::fmt::Display for DocumentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.document {
            Some(d) => write!(f, "{} (document {d}): {}", self.file.display(), self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

fn is_policy_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// Splits a YAML stream at `---` lines, like the agent; returns each document's text.
pub fn split_documents(text: &str) -> Vec<&str> {
    let mut documents = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end();
        let is_separator =
            bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t") || bare == "...";
        if is_separator {
            documents.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    documents.push(&text[start..]);
    documents
        .into_iter()
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// The unique name of a policy document, as the agent names it.
fn document_name(text: &str) -> Result<String, String> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(format!("larger than {MAX_DOCUMENT_BYTES} bytes"));
    }
    let value: Value = serde_yaml::from_str(text).map_err(|e| format!("not YAML: {e}"))?;
    let Value::Mapping(map) = &value else {
        return Err(
            "a policy document is a mapping with apiVersion, kind, metadata and spec".into(),
        );
    };
    let text_of = |key: &str| map.get(key).and_then(Value::as_str);
    let metadata = |key: &str| {
        map.get("metadata")
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
    };
    let name = metadata("name")
        .filter(|n| !n.trim().is_empty())
        .ok_or("metadata.name: required")?;
    match (text_of("apiVersion"), text_of("kind")) {
        (Some(WARD_API_VERSION), Some(WARD_KIND)) => Ok(name.into()),
        (Some(K8S_API_VERSION), Some(K8S_KIND)) => Ok(format!(
            "{}/{name}",
            metadata("namespace").unwrap_or("default")
        )),
        (api, kind) => Err(format!(
            "expected {WARD_API_VERSION} {WARD_KIND} or {K8S_API_VERSION} {K8S_KIND}, found {} {}",
            api.unwrap_or("(no apiVersion)"),
            kind.unwrap_or("(no kind)")
        )),
    }
}

/// [`document_name`] of the documents of the last read, so that a change to one file among many
/// parses that file only (parsing is most of a read: about 100 ms for 10,000 rules).
fn cached_document_name(
    seen: &mut std::collections::HashMap<String, Result<String, String>>,
    last: &std::collections::HashMap<String, Result<String, String>>,
    text: &str,
) -> Result<String, String> {
    let name = match last.get(text) {
        Some(name) => name.clone(),
        None => document_name(text),
    };
    seen.insert(text.to_owned(), name.clone());
    name
}

type NameCache = std::sync::Mutex<std::collections::HashMap<String, Result<String, String>>>;
static NAMES: std::sync::OnceLock<NameCache> = std::sync::OnceLock::new();

/// Reads the directory into POLICY resources, or every problem found.
pub fn read(dir: &Path) -> Result<BTreeMap<String, Resource>, Vec<DocumentError>> {
    let cache = NAMES.get_or_init(Default::default);
    let mut last = cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut seen = std::collections::HashMap::new();
    let read = read_with(dir, &mut seen, &last);
    *last = seen;
    read
}

fn read_with(
    dir: &Path,
    seen: &mut std::collections::HashMap<String, Result<String, String>>,
    last: &std::collections::HashMap<String, Result<String, String>>,
) -> Result<BTreeMap<String, Resource>, Vec<DocumentError>> {
    let whole = |file: &Path, reason: String| DocumentError {
        file: file.to_owned(),
        document: None,
        reason,
    };
    let entries = std::fs::read_dir(dir)
        .map_err(|e| vec![whole(dir, format!("cannot read the policy directory: {e}"))])?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| is_policy_file(p) && p.is_file())
        .collect();
    files.sort();
    let mut errors = Vec::new();
    let mut resources = BTreeMap::new();
    let mut first_seen: BTreeMap<String, String> = BTreeMap::new();
    let mut total = 0u64;
    for file in files {
        let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        total += size;
        if size > MAX_FILE_BYTES {
            errors.push(whole(&file, format!("larger than {MAX_FILE_BYTES} bytes")));
            continue;
        }
        if total > MAX_TOTAL_BYTES {
            errors.push(whole(
                &file,
                format!("the directory holds more than {MAX_TOTAL_BYTES} bytes of policy"),
            ));
            break;
        }
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                errors.push(whole(&file, format!("cannot read: {e}")));
                continue;
            }
        };
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let short = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (index, document) in split_documents(text).into_iter().enumerate() {
            let at = DocumentError {
                file: file.clone(),
                document: Some(index + 1),
                reason: String::new(),
            };
            let source = format!("{short}#{}", index + 1);
            match cached_document_name(seen, last, document) {
                Err(reason) => errors.push(DocumentError { reason, ..at }),
                Ok(name) => {
                    if let Some(first) = first_seen.get(&name) {
                        errors.push(DocumentError {
                            reason: format!("policy {name:?} is already defined in {first}"),
                            ..at
                        });
                        continue;
                    }
                    first_seen.insert(name.clone(), source.clone());
                    resources.insert(
                        name.clone(),
                        Resource {
                            name,
                            body: Some(Body::Policy(Policy {
                                yaml: document.to_owned(),
                                source,
                            })),
                        },
                    );
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(resources)
    } else {
        Err(errors)
    }
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

    #[test]
    fn documents_split_at_separator_lines_only() {
        let text = "# comment only\n---\na: 1\n--- # next\nb: '---'\n---\n\n...\n";
        let docs = split_documents(text);
        assert_eq!(docs, ["a: 1\n", "b: '---'\n"]);
    }

    #[test]
    fn each_document_is_one_resource_named_like_the_agent_names_it() {
        let tmp = dir_with(&[
            ("a.yaml", &format!("{WEB}---\n{NETPOL}")),
            (".hidden.yaml", "garbage: ["),
            ("notes.txt", "garbage: ["),
        ]);
        let set = read(tmp.path()).expect("valid directory");
        assert_eq!(set.keys().collect::<Vec<_>>(), ["demo/deny", "web"]);
        let Some(Body::Policy(p)) = &set["web"].body else {
            panic!("a policy body")
        };
        assert_eq!(p.yaml, format!("{WEB}"));
        assert_eq!(p.source, "a.yaml#1");
    }

    #[test]
    fn every_problem_is_reported_with_file_and_document() {
        let tmp = dir_with(&[
            ("a.yaml", WEB),
            ("b.yaml", &format!("{WEB}---\nkind: Other\nmetadata: {{name: x}}\n---\n[1, 2]\n---\nkey: [unclosed\n")),
        ]);
        let errors = read(tmp.path()).expect_err("invalid directory");
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 4, "{text:#?}");
        assert!(
            text[0].contains("b.yaml (document 1)")
                && text[0].contains("already defined in a.yaml#1")
        );
        assert!(text[1].contains("document 2") && text[1].contains("expected ward.dev/v1 Policy"));
        assert!(text[2].contains("document 3") && text[2].contains("mapping"));
        assert!(text[3].contains("document 4") && text[3].contains("not YAML"));
    }

    #[test]
    fn oversized_files_are_refused() {
        let big = format!("{WEB}# {}\n", "x".repeat(MAX_FILE_BYTES as usize));
        let tmp = dir_with(&[("big.yaml", &big)]);
        let errors = read(tmp.path()).expect_err("too big");
        assert!(errors[0].reason.contains("larger than"), "{errors:?}");
    }

    #[test]
    fn a_missing_directory_is_an_error_not_an_empty_set() {
        let errors = read(Path::new("/nonexistent/ward-policies")).expect_err("missing");
        assert!(errors[0]
            .reason
            .contains("cannot read the policy directory"));
    }
}
