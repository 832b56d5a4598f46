//! Errors and warnings about policy documents, each pointing at a file, line, document and field.

use std::fmt;
use std::path::PathBuf;

/// Where a diagnostic points.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based line in `file`.
    pub line: Option<usize>,
    /// 1-based position of the document in its file.
    pub document: Option<usize>,
    /// `metadata.name` of the document, when it has one (`namespace/name` for NetworkPolicy).
    pub policy: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(document) = self.document {
            write!(f, ": document {document}")?;
            if let Some(policy) = &self.policy {
                write!(f, " ({policy})")?;
            }
        }
        Ok(())
    }
}

/// One reason a policy document was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {}{reason}", field_prefix(field))]
pub struct PolicyError {
    pub location: Location,
    /// Path of the offending field, e.g. `spec.ingress[0].ports[1].endPort`; empty for the file
    /// or document as a whole.
    pub field: String,
    pub reason: String,
}

/// Every error found while loading; nothing of a set with errors is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// What a warning is about; its `code` names the check in JSON and SARIF output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WarningKind {
    /// An allow rule open to any peer, or to `0.0.0.0/0` / `::/0` / every DNS name, on every
    /// port.
    OpenRule,
    /// A policy that selects no workload of the configuration.
    SelectsNothing,
    /// An allow rule every entry of which a deny rule overrides.
    Shadowed,
    /// A policy in audit mode in a production path.
    AuditMode,
    /// Something in the document that ward accepts but does not enforce as written.
    NotEnforced,
    /// A document that isolates nothing, or a section that has no effect.
    NoEffect,
}

impl WarningKind {
    pub const ALL: [WarningKind; 6] = [
        WarningKind::OpenRule,
        WarningKind::SelectsNothing,
        WarningKind::Shadowed,
        WarningKind::AuditMode,
        WarningKind::NotEnforced,
        WarningKind::NoEffect,
    ];

    pub fn code(self) -> &'static str {
        match self {
            WarningKind::OpenRule => "open-rule",
            WarningKind::SelectsNothing => "selects-nothing",
            WarningKind::Shadowed => "shadowed-rule",
            WarningKind::AuditMode => "audit-mode",
            WarningKind::NotEnforced => "not-enforced",
            WarningKind::NoEffect => "no-effect",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            WarningKind::OpenRule => "allow rule open to any peer on every port",
            WarningKind::SelectsNothing => "policy selects no workload",
            WarningKind::Shadowed => "allow rule overridden by a deny rule everywhere it applies",
            WarningKind::AuditMode => "policy in audit mode lets everything through",
            WarningKind::NotEnforced => "part of a document that ward does not enforce as written",
            WarningKind::NoEffect => "part of a document that has no effect",
        }
    }
}

/// Something ward accepts but a reviewer should look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyWarning {
    pub location: Location,
    pub field: String,
    pub kind: WarningKind,
    pub message: String,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (location, field, message) = (&self.location, field_prefix(&self.field), &self.message);
        write!(f, "{location}: {field}{message} [{}]", self.kind.code())
    }
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

/// A field's path inside a document, kept as segments so its line can be found again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(Vec<Segment>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

impl FieldPath {
    pub fn key(&self, key: &str) -> FieldPath {
        let mut path = self.clone();
        path.0.push(Segment::Key(key.to_owned()));
        path
    }

    pub fn index(&self, index: usize) -> FieldPath {
        let mut path = self.clone();
        path.0.push(Segment::Index(index));
        path
    }

    pub fn segments(&self) -> &[Segment] {
        &self.0
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => write!(f, "{key}")?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// Problems found in one document, before they are given a location.
#[derive(Debug, Default)]
pub struct Findings {
    pub errors: Vec<(FieldPath, String)>,
    pub warnings: Vec<(FieldPath, WarningKind, String)>,
}

impl Findings {
    pub fn error(&mut self, path: &FieldPath, reason: impl Into<String>) {
        self.errors.push((path.clone(), reason.into()));
    }

    pub fn warn(&mut self, path: &FieldPath, kind: WarningKind, message: impl Into<String>) {
        self.warnings.push((path.clone(), kind, message.into()));
    }
}
