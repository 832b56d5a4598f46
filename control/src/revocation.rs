//! Revocations: the file `<state-dir>/revoked`, appended to by `ward-control revoke`. A line is
//! a workload certificate's serial number (in the canonical form `Serial`'s `Display` gives:
//! lowercase hexadecimal bytes separated by ':'), served in the TRUST_BUNDLE's
//! `revoked_serials`, or `node <name>`: a node whose certificate no longer opens a stream, renews
//! or gets workload certificates, which cannot join again while the line stands, and whose
//! workloads leave the registry.
//!
//! The file is read whole or not at all: a malformed line refuses the whole file, and the
//! revocation list in force stays as it was.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use ward_tunnel::{IdentityError, Serial};

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("{file}:{line}: {reason}")]
    Line {
        file: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} (a serial number is hexadecimal, with or without ':', as `openssl x509 -serial` prints it; a node is `node <name>`)")]
    Serial(String),
}

/// What the file revokes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Revocations {
    /// Workload certificates' serials, canonical.
    pub serials: BTreeSet<String>,
    /// Node names.
    pub nodes: BTreeSet<String>,
}

/// A line's canonical form: a serial as [`canonical_serial`] gives it, or `node <name>` for a
/// valid node name.
pub fn canonical_entry(text: &str) -> Result<String, String> {
    let text = text.trim();
    match text.strip_prefix("node ") {
        Some(name) => {
            let name = name.trim();
            crate::ca::check_node_name(name).map_err(|e| e.to_string())?;
            Ok(format!("node {name}"))
        }
        None => canonical_serial(text),
    }
}

/// A serial number in its canonical form, or why it is not one.
pub fn canonical_serial(text: &str) -> Result<String, String> {
    let text = text.trim();
    Serial::from_hex(text)
        .map(|s| s.to_string())
        .map_err(|e| match e {
            IdentityError::BadCertificate { reason } => reason,
            other => other.to_string(),
        })
}

/// What a revocation file's text revokes; blank lines and lines starting with `#` are skipped.
/// The first malformed line refuses the whole text, naming `file` and the line number.
pub fn parse(file: &Path, text: &str) -> Result<Revocations, RevocationError> {
    let mut revocations = Revocations::default();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let entry = canonical_entry(line).map_err(|reason| RevocationError::Line {
            file: file.to_owned(),
            line: i + 1,
            reason,
        })?;
        match entry.strip_prefix("node ") {
            Some(node) => revocations.nodes.insert(node.to_owned()),
            None => revocations.serials.insert(entry),
        };
    }
    Ok(revocations)
}

/// Reads `file`; a missing file revokes nothing.
pub fn read(file: &Path) -> Result<Revocations, RevocationError> {
    match std::fs::read_to_string(file) {
        Ok(text) => parse(file, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Revocations::default()),
        Err(source) => Err(RevocationError::Io {
            file: file.to_owned(),
            source,
        }),
    }
}

/// What [`append`] did with each entry it was given, in canonical form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Appended {
    pub added: Vec<String>,
    pub already: Vec<String>,
}

/// Appends `entries` (serials, or `node <name>`) to `file` (created 0600), skipping those it
/// already lists. Every entry is checked first: one malformed entry appends nothing.
pub fn append(file: &Path, entries: &[String]) -> Result<Appended, RevocationError> {
    let mut wanted = Vec::with_capacity(entries.len());
    for text in entries {
        wanted.push(canonical_entry(text).map_err(RevocationError::Serial)?);
    }
    let io = |source| RevocationError::Io {
        file: file.to_owned(),
        source,
    };
    // Lines already there count even if another line is malformed: the server refuses such a
    // file until it is fixed, but a serial is never listed twice.
    let existing: BTreeSet<String> = match std::fs::read_to_string(file) {
        Ok(text) => text
            .lines()
            .filter_map(|l| canonical_entry(l).ok())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => return Err(io(e)),
    };
    let mut out = Appended::default();
    let mut text = String::new();
    for serial in wanted {
        if out.added.contains(&serial) || out.already.contains(&serial) {
            // Given twice on one command line.
        } else if existing.contains(&serial) {
            out.already.push(serial);
        } else {
            text.push_str(&serial);
            text.push('\n');
            out.added.push(serial);
        }
    }
    if text.is_empty() {
        return Ok(out);
    }
    ward_host::atomic::append(file, text.as_bytes(), 0o600).map_err(io)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn serials_are_canonical_with_or_without_separators() {
        assert_eq!(canonical_serial("4A:0B:FF"), Ok("4a:0b:ff".into()));
        assert_eq!(canonical_serial("4a0bff"), Ok("4a:0b:ff".into()));
        assert_eq!(
            canonical_serial(" 00:4a "),
            Ok("4a".into()),
            "DER's leading zero"
        );
        assert!(canonical_serial("xyz").is_err());
        assert!(canonical_serial("").is_err());
        assert!(canonical_serial(&"ab".repeat(21)).is_err());
    }

    #[test]
    fn a_malformed_line_refuses_the_file_naming_the_line() {
        let file = Path::new("/state/revoked");
        let good = parse(
            file,
            "# revoked by ops\n4a:0b\n\nABCD\nnode  node-a \n4a0b\n",
        )
        .expect("valid");
        assert_eq!(
            good.serials,
            BTreeSet::from(["4a:0b".into(), "ab:cd".into()])
        );
        assert_eq!(good.nodes, BTreeSet::from(["node-a".into()]));
        assert!(
            parse(file, "node \n").is_err(),
            "a node line without a name"
        );
        assert!(
            parse(file, "node a/b\n").is_err(),
            "a node name that cannot be one"
        );
        let err = parse(file, "4a:0b\nnot-a-serial\n").expect_err("malformed");
        match &err {
            RevocationError::Line { line, .. } => assert_eq!(*line, 2),
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().starts_with("/state/revoked:2: "), "{err}");
    }

    #[test]
    fn append_creates_the_file_private_and_never_lists_a_serial_twice() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let file = tmp.path().join("revoked");
        assert_eq!(
            read(&file).expect("missing is empty"),
            Revocations::default()
        );
        let first = append(&file, &["4A:0B".into(), "cd".into()]).expect("append");
        assert_eq!(first.added, ["4a:0b", "cd"]);
        assert!(first.already.is_empty());
        let mode = std::fs::metadata(&file).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = append(
            &file,
            &[
                "4a0b".into(),
                "ef".into(),
                "EF".into(),
                "node node-a".into(),
            ],
        )
        .expect("append");
        assert_eq!(again.added, ["ef", "node node-a"]);
        assert_eq!(again.already, ["4a:0b"]);
        assert_eq!(
            std::fs::read_to_string(&file).expect("read"),
            "4a:0b\ncd\nef\nnode node-a\n"
        );
        let bad = append(&file, &["01".into(), "zz".into()]).expect_err("malformed");
        assert!(bad.to_string().contains("zz"), "{bad}");
        let read = read(&file).expect("valid");
        assert_eq!(
            (read.serials.len(), read.nodes.len()),
            (3, 1),
            "nothing appended"
        );
    }
}
