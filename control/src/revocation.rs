//! Revoked workload certificates: the file `<state-dir>/revoked` (one serial number a line, in
//! the canonical form `Serial`'s `Display` gives: lowercase hexadecimal bytes separated by ':'),
//! appended to by `ward-control revoke` and served in the TRUST_BUNDLE's `revoked_serials`.
//!
//! The file is read whole or not at all: a malformed line refuses the whole file, and the
//! revocation list in force stays as it was.
use std::{
    collections::BTreeSet,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
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
    #[error("{0} (a serial number is hexadecimal, with or without ':', as `openssl x509 -serial` prints it)")]
    Serial(String),
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

/// The serials of a revocation file's text; blank lines and lines starting with `#` are skipped.
/// The first malformed line refuses the whole text, naming `file` and the line number.
pub fn parse(file: &Path, text: &str) -> Result<BTreeSet<String>, RevocationError> {
    let mut serials = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let serial = canonical_serial(line).map_err(|reason| RevocationError::Line {
            file: file.to_owned(),
            line: i + 1,
            reason,
        })?;
        serials.insert(serial);
    }
    Ok(serials)
}

/// Reads `file`; a missing file revokes nothing.
pub fn read(file: &Path) -> Result<BTreeSet<String>, RevocationError> {
    match std::fs::read_to_string(file) {
        Ok(text) => parse(file, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(source) => Err(RevocationError::Io {
            file: file.to_owned(),
            source,
        }),
    }
}

/// What [`append`] did with each serial it was given, in canonical form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Appended {
    pub added: Vec<String>,
    pub already: Vec<String>,
}

/// Appends `serials` to `file` (created 0600), skipping those it already lists. Every serial is
/// checked first: one malformed serial appends nothing.
pub fn append(file: &Path, serials: &[String]) -> Result<Appended, RevocationError> {
    let mut wanted = Vec::with_capacity(serials.len());
    for text in serials {
        wanted.push(canonical_serial(text).map_err(RevocationError::Serial)?);
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
            .filter_map(|l| canonical_serial(l).ok())
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
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(file)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
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
        let good = parse(file, "# revoked by ops\n4a:0b\n\nABCD\n4a0b\n").expect("valid");
        assert_eq!(good, BTreeSet::from(["4a:0b".into(), "ab:cd".into()]));
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
        assert!(read(&file).expect("missing is empty").is_empty());
        let first = append(&file, &["4A:0B".into(), "cd".into()]).expect("append");
        assert_eq!(first.added, ["4a:0b", "cd"]);
        assert!(first.already.is_empty());
        let mode = std::fs::metadata(&file).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = append(&file, &["4a0b".into(), "ef".into(), "EF".into()]).expect("append");
        assert_eq!(again.added, ["ef"]);
        assert_eq!(again.already, ["4a:0b"]);
        assert_eq!(
            std::fs::read_to_string(&file).expect("read"),
            "4a:0b\ncd\nef\n"
        );
        let bad = append(&file, &["01".into(), "zz".into()]).expect_err("malformed");
        assert!(bad.to_string().contains("zz"), "{bad}");
        assert_eq!(read(&file).expect("valid").len(), 3, "nothing appended");
    }
}
