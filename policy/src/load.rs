//! Reading policy files: finding them, splitting them into documents, and turning every problem
//! into a diagnostic with its file, line, document and field.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::diagnostics::{FieldPath, Findings, Location, PolicyError, PolicyErrors, PolicyWarning};
use super::model::{Origin, PolicySet};
use super::yaml::{self, Node, Value};
use super::{k8s, ward};

/// Loads every policy document of `paths`: files, or directories whose `*.yaml` and `*.yml`
/// files (not hidden, not in subdirectories) are read in name order. Reports every error found.
///
/// For enforcement: rules carry no line; diagnostics use [`Report::load`].
pub fn load(paths: &[PathBuf]) -> Result<PolicySet, PolicyErrors> {
    Report::load_with(paths, false).into_result()
}

/// Parses the documents of one text, named `source` in diagnostics.
// The agent reads files; texts from elsewhere come from the tests and the fuzz target (fuzz/).
#[allow(dead_code)]
pub fn parse(source: &Path, text: &str) -> Result<PolicySet, PolicyErrors> {
    let mut report = Report {
        rule_lines: true,
        ..Report::default()
    };
    report.add_text(source, text);
    report.into_result()
}

/// Parses documents that come one by one with a name each (the control plane's policies: one
/// document per policy, named by it); diagnostics name the document by `name`. Rules carry no
/// line, as with [`load`].
pub fn parse_documents<'a>(
    documents: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<PolicySet, PolicyErrors> {
    let mut report = Report::default();
    for (name, text) in documents {
        report.add_text(Path::new(name), text);
    }
    report.into_result()
}

/// The documents [`parse_documents_cached`] parsed last time, by name, so that a change to one
/// policy among thousands parses that one only.
#[derive(Debug, Default)]
pub struct DocumentCache {
    documents: HashMap<String, (String, PolicySet)>,
}

/// [`parse_documents`], reusing what `cache` holds for documents whose text has not changed.
pub fn parse_documents_cached<'a>(
    cache: &mut DocumentCache,
    documents: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<PolicySet, PolicyErrors> {
    let mut parsed_now = HashMap::new();
    let mut set = PolicySet::default();
    let mut errors = Vec::new();
    // Policy name → the document that defined it first.
    let mut names: HashMap<String, String> = HashMap::new();
    for (name, text) in documents {
        let parsed = match cache.documents.remove(name) {
            Some((cached, parsed)) if cached == text => parsed,
            _ => match parse_documents([(name, text)]) {
                Ok(parsed) => parsed,
                Err(e) => {
                    errors.extend(e.0);
                    continue;
                }
            },
        };
        for policy in &parsed.policies {
            if let Some(first) = names.insert(policy.name.clone(), name.to_owned()) {
                errors.push(PolicyError {
                    location: Location {
                        file: PathBuf::from(name),
                        ..Location::default()
                    },
                    field: "metadata.name".into(),
                    reason: format!(
                        "duplicate policy name `{}`; first defined in {first}",
                        policy.name
                    ),
                });
            }
        }
        set.policies.extend(parsed.policies.iter().cloned());
        set.warnings.extend(parsed.warnings.iter().cloned());
        parsed_now.insert(name.to_owned(), (text.to_owned(), parsed));
    }
    cache.documents = parsed_now;
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(PolicyErrors(errors))
    }
}

/// Everything loading found: the valid policies, the errors and the warnings.
#[derive(Debug, Default)]
pub struct Report {
    pub set: PolicySet,
    pub errors: Vec<PolicyError>,
    /// Where each policy name was first defined.
    names: HashMap<String, Location>,
    /// Whether to give each rule its line (for diagnostics).
    rule_lines: bool,
}

impl Report {
    /// Every policy of `paths`, each rule with its line, for diagnostics.
    pub fn load(paths: &[PathBuf]) -> Report {
        Self::load_with(paths, true)
    }

    fn load_with(paths: &[PathBuf], rule_lines: bool) -> Report {
        let mut report = Report {
            rule_lines,
            ..Report::default()
        };
        for file in report.policy_files(paths) {
            match std::fs::read_to_string(&file) {
                Ok(text) => report.add_text(&file, &text),
                Err(e) => report.file_error(&file, format!("cannot read: {e}")),
            }
        }
        report
    }

    pub fn into_result(self) -> Result<PolicySet, PolicyErrors> {
        if self.errors.is_empty() {
            Ok(self.set)
        } else {
            Err(PolicyErrors(self.errors))
        }
    }

    fn file_error(&mut self, file: &Path, reason: String) {
        let location = Location {
            file: file.to_owned(),
            ..Location::default()
        };
        self.errors.push(PolicyError {
            location,
            field: String::new(),
            reason,
        });
    }

    fn policy_files(&mut self, paths: &[PathBuf]) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for path in paths {
            if !path.is_dir() {
                if path.exists() {
                    files.push(path.clone());
                } else {
                    self.file_error(path, "no such file or directory".into());
                }
                continue;
            }
            let entries = match std::fs::read_dir(path) {
                Ok(entries) => entries,
                Err(e) => {
                    self.file_error(path, format!("cannot read directory: {e}"));
                    continue;
                }
            };
            let mut found: Vec<PathBuf> = entries
                .filter_map(|entry| Some(entry.ok()?.path()))
                .filter(|p| p.is_file() && is_policy_file_name(p))
                .collect();
            found.sort();
            files.extend(found);
        }
        files
    }

    pub fn add_text(&mut self, file: &Path, text: &str) {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (index, document) in split_documents(text).into_iter().enumerate() {
            let location = Location {
                file: file.to_owned(),
                line: Some(document.content_line),
                document: Some(index + 1),
                policy: None,
            };
            self.add_document(&document, location);
        }
    }

    fn add_document(&mut self, document: &Document<'_>, mut location: Location) {
        let tree = match yaml::parse(document.text) {
            Ok(tree) => tree,
            Err(e) => return self.errors.push(yaml_error(e, location, document)),
        };
        if !matches!(tree.value, Value::Map(_)) {
            let reason =
                "a policy document is a mapping with apiVersion, kind, metadata and spec".into();
            return self.errors.push(PolicyError {
                location,
                field: String::new(),
                reason,
            });
        }
        let text_of = |key: &str| tree.get(key).and_then(Node::as_str);
        let metadata = |key: &str| {
            tree.get("metadata")
                .and_then(|m| m.get(key))
                .and_then(Node::as_str)
        };
        let (api_version, kind) = (text_of("apiVersion"), text_of("kind"));
        let is_network_policy = api_version == Some(k8s::API_VERSION) && kind == Some(k8s::KIND);
        location.policy = metadata("name").map(|name| match is_network_policy {
            true => k8s::policy_name(metadata("namespace"), name),
            false => name.to_owned(),
        });
        let origin = Origin {
            file: location.file.clone(),
            document: location.document.unwrap_or_default(),
            line: document.content_line,
        };
        let mut findings = Findings::default();
        let policy = match (api_version, kind) {
            (Some(ward::API_VERSION), Some(ward::KIND)) => yaml::typed(document.text, &tree)
                .map(|doc| ward::convert(doc, origin, &mut findings)),
            _ if is_network_policy => yaml::typed(document.text, &tree)
                .map(|doc| k8s::convert(doc, origin, &mut findings)),
            _ => {
                let (field, found) = match api_version {
                    Some(ward::API_VERSION) | Some(k8s::API_VERSION) => ("kind", kind),
                    _ => ("apiVersion", api_version),
                };
                let found = found.map_or("nothing".to_owned(), |f| format!("`{f}`"));
                let reason = format!(
                    "expected {} {} or {} {}, found {found}",
                    ward::API_VERSION,
                    ward::KIND,
                    k8s::API_VERSION,
                    k8s::KIND
                );
                let path = FieldPath::default().key(field);
                location.line = locate(&tree, document, &path).or(location.line);
                return self.errors.push(PolicyError {
                    location,
                    field: field.into(),
                    reason,
                });
            }
        };
        let mut policy = match policy {
            Ok(policy) => policy,
            Err(e) => return self.errors.push(yaml_error(e, location, document)),
        };
        let at = |path: &FieldPath| Location {
            line: locate(&tree, document, path).or(location.line),
            ..location.clone()
        };
        for (path, reason) in &findings.errors {
            self.errors.push(PolicyError {
                location: at(path),
                field: path.to_string(),
                reason: reason.clone(),
            });
        }
        for (path, kind, message) in findings.warnings {
            let warning = PolicyWarning {
                location: at(&path),
                field: path.to_string(),
                kind,
                message,
            };
            self.set.warnings.push(warning);
        }
        let name_path = FieldPath::default().key("metadata").key("name");
        if let Some(first) = self.names.get(&policy.name) {
            let reason = format!(
                "duplicate policy name `{}`; first defined at {first}",
                policy.name
            );
            self.errors.push(PolicyError {
                location: at(&name_path),
                field: name_path.to_string(),
                reason,
            });
            return;
        }
        self.names.insert(policy.name.clone(), location);
        if findings.errors.is_empty() {
            if self.rule_lines {
                for rule in policy.rules_mut() {
                    rule.line = locate(&tree, document, &rule.field);
                }
            }
            self.set.policies.push(policy);
        }
    }
}

fn is_policy_file_name(path: &Path) -> bool {
    path.file_name().is_some_and(is_policy_file)
}

/// Whether a directory entry of this name is a policy file: `*.yaml` or `*.yml`, not hidden
/// (editors' temporary files and a ConfigMap's `..data` are hidden).
pub fn is_policy_file(name: &std::ffi::OsStr) -> bool {
    let name = name.to_str().unwrap_or_default();
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// One YAML document of a file.
struct Document<'a> {
    text: &'a str,
    /// Lines of the file before `text`.
    line_offset: usize,
    /// 1-based line of the document's first content.
    content_line: usize,
}

/// Splits a file at its `---` and `...` markers. A marker at the start of a line always ends a
/// document in YAML (not even a block scalar may hold one), so this split is exact and lets each
/// document fail on its own. Documents without content are left out.
fn split_documents(text: &str) -> Vec<Document<'_>> {
    let is_marker = |line: &str, marker: &str| {
        line.strip_prefix(marker)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
    };
    let mut documents = Vec::new();
    let (mut start, mut start_line, mut content_line) = (0, 0, None);
    let mut offset = 0;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    for (number, line) in lines.iter().enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let (starts, ends) = (is_marker(bare, "---"), is_marker(bare, "..."));
        if starts || ends {
            if let Some(content_line) = content_line.take() {
                documents.push(Document {
                    text: &text[start..offset],
                    line_offset: start_line,
                    content_line,
                });
            }
            // A `---` line belongs to the document it opens, and may hold content itself.
            (start, start_line) = if starts {
                (offset, number)
            } else {
                (offset + line.len(), number + 1)
            };
        }
        let content = if starts {
            &bare[3..]
        } else if ends {
            ""
        } else {
            bare
        };
        let content = content.trim();
        if content_line.is_none() && !content.is_empty() && !content.starts_with('#') {
            content_line = Some(number + 1);
        }
        offset += line.len();
    }
    if let Some(content_line) = content_line {
        documents.push(Document {
            text: &text[start..],
            line_offset: start_line,
            content_line,
        });
    }
    documents
}

/// A YAML error of a document as a diagnostic.
fn yaml_error(error: yaml::Error, mut location: Location, document: &Document<'_>) -> PolicyError {
    if let Some(line) = error.line {
        location.line = Some((line + document.line_offset).max(document.content_line));
    }
    PolicyError {
        location,
        field: error.path.to_string(),
        reason: error.message,
    }
}

/// The line in its file of a field of a document, from the document's tree.
fn locate(tree: &Node, document: &Document<'_>, path: &FieldPath) -> Option<usize> {
    tree.line_of(path).map(|line| line + document.line_offset)
}

/// The files [`Report::load`] reads for `paths`, in the order it reads them; a path that
/// cannot be read is an error of `report`. For readers that look at each file (its size) before
/// giving its text to [`Report::add_text`].
pub fn policy_files(report: &mut Report, paths: &[PathBuf]) -> Vec<PathBuf> {
    report.policy_files(paths)
}

/// The documents of a file's text as [`Report::add_text`] splits and numbers them (from 1;
/// documents without content are left out), each with its text.
pub fn documents(text: &str) -> Vec<(usize, &str)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let documents = split_documents(text).into_iter().enumerate();
    documents.map(|(i, d)| (i + 1, d.text)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<PolicyError> {
        match parse(Path::new("p.yaml"), text) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(PolicyErrors(errors)) => errors,
        }
    }

    #[test]
    fn splits_documents_with_their_lines() {
        let text = "# head\n---\na: 1\n---\n\n# only a comment\n--- \n--- {b: 2}\n...\nc: 3\n";
        let documents = split_documents(text);
        let summary: Vec<_> = documents
            .iter()
            .map(|d| (d.text, d.line_offset, d.content_line))
            .collect();
        assert_eq!(
            summary,
            [
                ("---\na: 1\n", 1, 3),
                ("--- {b: 2}\n", 7, 8),
                ("c: 3\n", 9, 10)
            ],
            "documents of {text:?}"
        );
    }

    #[test]
    fn a_document_may_start_on_its_marker_line() {
        let text = "apiVersion: ward.dev/v1\nkind: Policy\nmetadata: {name: a}\nspec: {selector: {}}\n--- {apiVersion: ward.dev/v1, kind: Policy, metadata: {name: b},\n  spec: {selector: {}, ingress: [{ports: [{port: 0}]}]}}\n";
        let errors = errors(text);
        let found: Vec<_> = errors
            .iter()
            .map(|e| (e.location.document, e.location.line, e.field.as_str()))
            .collect();
        assert_eq!(
            found,
            [(Some(2), Some(6), "spec.ingress[0].ports[0].port")],
            "{errors:?}"
        );
    }

    #[test]
    fn syntax_error_names_file_line_and_document() {
        let text = "apiVersion: ward.dev/v1\nkind: Policy\nmetadata: {name: a}\nspec: {selector: {}}\n---\nfoo: [bar\n";
        let errors = errors(text);
        assert_eq!(errors.len(), 1, "one error expected: {errors:?}");
        let location = &errors[0].location;
        assert_eq!(
            (location.file.as_path(), location.document),
            (Path::new("p.yaml"), Some(2)),
            "{errors:?}"
        );
        assert!(
            location.line.is_some_and(|l| l >= 6),
            "line points into document 2: {errors:?}"
        );
    }

    #[test]
    fn unknown_kind_and_api_version() {
        let text = "apiVersion: ward.dev/v1\nkind: Polcy\n---\napiVersion: v2\nkind: Policy\n";
        let errors = errors(text);
        let fields: Vec<_> = errors
            .iter()
            .map(|e| (e.field.as_str(), e.location.line))
            .collect();
        assert_eq!(
            fields,
            [("kind", Some(2)), ("apiVersion", Some(4))],
            "{errors:?}"
        );
    }

    #[test]
    fn missing_path_is_not_located() {
        let text = "a:\n  b: [1, 2]\n";
        let document = &split_documents(text)[0];
        let tree = yaml::parse(document.text).expect("parses");
        let path = FieldPath::default().key("a").key("b");
        assert_eq!(
            locate(&tree, document, &path.index(1)),
            Some(2),
            "a[1] is on line 2"
        );
        assert_eq!(
            locate(&tree, document, &path.index(5)),
            None,
            "there is no a.b[5]"
        );
        assert_eq!(
            locate(&tree, document, &FieldPath::default().key("zzz")),
            None,
            "there is no zzz"
        );
    }

    #[test]
    fn named_documents_load_without_rule_lines_and_name_their_errors() {
        let doc = |name: &str, rule: &str| {
            format!("apiVersion: ward.dev/v1\nkind: Policy\nmetadata: {{name: {name}}}\nspec:\n  selector: {{}}\n  ingress:\n    - {rule}\n")
        };
        let good = doc("a", "ports: [{port: 80}]");
        let set = parse_documents([("a", good.as_str())]).expect("valid");
        let (_, rule) = set.policies[0].rules().next().expect("one rule");
        assert_eq!(rule.line, None, "enforcement does not look for lines");
        let with_lines = parse(Path::new("a"), &good).expect("valid");
        let (_, rule) = with_lines.policies[0].rules().next().expect("one rule");
        assert!(rule.line.is_some(), "diagnostics do");

        let bad = doc("b", "bogus: 1");
        let errors = parse_documents([("a", good.as_str()), ("b", bad.as_str())])
            .expect_err("b is refused")
            .to_string();
        assert!(errors.contains('b') && errors.contains("bogus"), "{errors}");
    }

    #[test]
    fn cached_documents_are_reused_only_while_their_text_is_the_same() {
        let doc = |name: &str, port: u16| {
            format!("apiVersion: ward.dev/v1\nkind: Policy\nmetadata: {{name: {name}}}\nspec:\n  selector: {{}}\n  ingress:\n    - ports: [{{port: {port}}}]\n")
        };
        let port_of = |set: &PolicySet, name: &str| {
            let policy = set
                .policies
                .iter()
                .find(|p| p.name == name)
                .expect("policy");
            format!("{:?}", policy.rules().next().expect("rule").1.ports)
        };
        let mut cache = DocumentCache::default();
        let (a, b) = (doc("a", 80), doc("b", 81));
        let first = parse_documents_cached(&mut cache, [("a", a.as_str()), ("b", b.as_str())])
            .expect("valid");
        assert_eq!(first.names().collect::<Vec<_>>(), ["a", "b"]);
        let b2 = doc("b", 82);
        let second = parse_documents_cached(&mut cache, [("a", a.as_str()), ("b", b2.as_str())])
            .expect("valid");
        assert_eq!(port_of(&second, "a"), port_of(&first, "a"));
        assert!(
            port_of(&second, "b").contains("82"),
            "{}",
            port_of(&second, "b")
        );
        let twice = doc("a", 83);
        let e = parse_documents_cached(&mut cache, [("a", a.as_str()), ("c", twice.as_str())])
            .expect_err("two documents define policy a");
        assert!(e.to_string().contains("duplicate policy name `a`"), "{e}");
        let bad = a.replace("ports:", "bogus: 1\n      ports:");
        let e = parse_documents_cached(&mut cache, [("a", bad.as_str())]).expect_err("bogus");
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn directories_load_yaml_files_in_order_and_missing_paths_fail() {
        let dir = std::env::temp_dir().join(format!("ward-policy-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let policy = |name: &str| {
            format!("apiVersion: ward.dev/v1\nkind: Policy\nmetadata: {{name: {name}}}\nspec: {{selector: {{}}, ingress: []}}\n")
        };
        for (file, name) in [
            ("b.yml", "second"),
            ("a.yaml", "first"),
            (".hidden.yaml", "x"),
            ("c.txt", "y"),
        ] {
            std::fs::write(dir.join(file), policy(name)).expect("write policy");
        }
        let set = load(std::slice::from_ref(&dir)).expect("directory loads");
        assert_eq!(
            set.names().collect::<Vec<_>>(),
            ["first", "second"],
            "yaml files in name order"
        );
        let missing = dir.join("missing.yaml");
        let errors = load(&[dir.clone(), missing.clone()])
            .expect_err("missing file is an error")
            .0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].location.file, missing, "{errors:?}");
        std::fs::remove_dir_all(&dir).expect("remove temp dir");
    }
}
