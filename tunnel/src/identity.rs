//! SPIFFE IDs and what the tunnel reads from an X.509 SVID: the SPIFFE ID in the URI SAN, the
//! serial number (for revocation) and the end of validity.
use std::{
    fmt,
    str::FromStr,
    time::{Duration, SystemTime},
};

use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

/// The longest SPIFFE ID accepted, as the SPIFFE specification recommends.
const MAX_ID_LEN: usize = 2048;
const MAX_TRUST_DOMAIN_LEN: usize = 255;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("SPIFFE ID {id:?} refused: {reason}")]
    BadId { id: String, reason: &'static str },
    #[error("certificate refused: {reason}")]
    BadCertificate { reason: String },
    #[error("SPIFFE ID {id} is not in trust domain {trust_domain}")]
    WrongTrustDomain { id: String, trust_domain: String },
}

/// A SPIFFE ID (`spiffe://<trust domain>/<path>`), validated as the SPIFFE specification says.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    /// Where the path starts in `id` (the length of `spiffe://<trust domain>`).
    path_start: usize,
}

impl SpiffeId {
    pub fn parse(id: &str) -> Result<SpiffeId, IdentityError> {
        let refuse = |reason| {
            Err(IdentityError::BadId {
                id: id.chars().take(200).collect(),
                reason,
            })
        };
        if id.len() > MAX_ID_LEN {
            return refuse("longer than 2048 bytes");
        }
        let Some(rest) = id.strip_prefix("spiffe://") else {
            return refuse("does not start with spiffe://");
        };
        let (trust_domain, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        if trust_domain.is_empty() {
            return refuse("the trust domain is empty");
        }
        if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
            return refuse("the trust domain is longer than 255 bytes");
        }
        if !trust_domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        }) {
            return refuse(
                "the trust domain may hold only lowercase letters, digits, '.', '-' and '_' \
                 (no port, user or upper case)",
            );
        }
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                if segment.is_empty() {
                    return refuse("the path has an empty segment or a trailing '/'");
                }
                if segment == "." || segment == ".." {
                    return refuse("the path has a '.' or '..' segment");
                }
                if !segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
                {
                    return refuse(
                        "the path may hold only letters, digits, '.', '-', '_' and '/' \
                         (no query, fragment or percent-encoding)",
                    );
                }
            }
        }
        Ok(SpiffeId {
            id: id.to_owned(),
            path_start: "spiffe://".len() + trust_domain.len(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.id["spiffe://".len()..self.path_start]
    }

    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// Refuses an ID outside `trust_domain`.
    pub fn require_trust_domain(&self, trust_domain: &str) -> Result<(), IdentityError> {
        if self.trust_domain() == trust_domain {
            Ok(())
        } else {
            Err(IdentityError::WrongTrustDomain {
                id: self.id.clone(),
                trust_domain: trust_domain.into(),
            })
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

/// A certificate serial number as its DER content bytes (big-endian, as the certificate holds it).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

impl Serial {
    pub fn from_bytes(bytes: &[u8]) -> Serial {
        // DER may carry a leading zero byte to keep the number positive; it names the same serial.
        let start = bytes
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(bytes.len().saturating_sub(1));
        Serial(bytes[start..].to_vec())
    }

    /// Hexadecimal, with or without ':' separators (as `openssl x509 -serial` prints it).
    pub fn from_hex(hex: &str) -> Result<Serial, IdentityError> {
        let digits: String = hex.chars().filter(|&c| c != ':').collect();
        let bad = |reason: &str| IdentityError::BadCertificate {
            reason: format!("serial {hex:?}: {reason}"),
        };
        if digits.is_empty() || digits.len() > 40 {
            return Err(bad("must have 1 to 20 bytes"));
        }
        let padded = if digits.len() % 2 == 1 {
            format!("0{digits}")
        } else {
            digits
        };
        let bytes = (0..padded.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&padded[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| bad("not hexadecimal"))?;
        Ok(Serial::from_bytes(&bytes))
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

/// What the tunnel needs from a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// `None` for a CA certificate without a SPIFFE URI SAN.
    pub spiffe_id: Option<SpiffeId>,
    pub serial: Serial,
    pub not_after: SystemTime,
    pub not_before: SystemTime,
}

/// Reads the SPIFFE ID, serial and validity of a DER certificate. An X.509 SVID carries exactly
/// one URI SAN, the SPIFFE ID; a certificate with several URI SANs is refused, since which one
/// names the workload would be ambiguous.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, IdentityError> {
    let bad = |reason: String| IdentityError::BadCertificate { reason };
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| bad(format!("cannot parse: {e}")))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the certificate".into()));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(format!("bad subject alternative names: {e}")))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    let spiffe_id = match uris.as_slice() {
        [] => None,
        [uri] => Some(SpiffeId::parse(uri)?),
        _ => return Err(bad(format!("{} URI SANs; an SVID has one", uris.len()))),
    };
    let time = |seconds: i64| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or_default())
    };
    Ok(CertInfo {
        spiffe_id,
        serial: Serial::from_bytes(cert.raw_serial()),
        not_after: time(cert.validity().not_after.timestamp()),
        not_before: time(cert.validity().not_before.timestamp()),
    })
}

/// The SPIFFE ID of a workload certificate: refused when it has none.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, IdentityError> {
    cert_info(der)?
        .spiffe_id
        .ok_or_else(|| IdentityError::BadCertificate {
            reason: "no SPIFFE ID (URI SAN)".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_split_into_trust_domain_and_path() {
        let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").expect("valid ID");
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/ns/default/sa/web");
        assert_eq!(id.to_string(), "spiffe://example.org/ns/default/sa/web");
        let bare = SpiffeId::parse("spiffe://example.org").expect("a trust domain alone is valid");
        assert_eq!((bare.trust_domain(), bare.path()), ("example.org", ""));
        assert!(id.require_trust_domain("example.org").is_ok());
        assert!(matches!(
            id.require_trust_domain("other.org"),
            Err(IdentityError::WrongTrustDomain { .. })
        ));
    }

    #[test]
    fn malformed_spiffe_ids_are_refused_with_the_reason() {
        for (bad, reason) in [
            ("https://example.org/a", "spiffe://"),
            ("spiffe:///a", "empty"),
            ("spiffe://Example.org/a", "lowercase"),
            ("spiffe://example.org:443/a", "port"),
            ("spiffe://user@example.org/a", "user"),
            ("spiffe://example.org/a//b", "empty segment"),
            ("spiffe://example.org/a/", "trailing"),
            ("spiffe://example.org/a/../b", "'..'"),
            ("spiffe://example.org/a?x=1", "query"),
            ("spiffe://example.org/a%20b", "percent"),
        ] {
            let err = SpiffeId::parse(bad).expect_err(bad).to_string();
            assert!(err.contains(reason), "{bad}: {err} should mention {reason}");
        }
        assert!(SpiffeId::parse(&format!("spiffe://example.org/{}", "a".repeat(2100))).is_err());
    }

    #[test]
    fn serials_read_the_same_from_hex_and_der_bytes() {
        assert_eq!(
            Serial::from_hex("00:4A:bc").expect("hex"),
            Serial::from_bytes(&[0x4a, 0xbc])
        );
        assert_eq!(Serial::from_bytes(&[0, 0x4a]).to_string(), "4a");
        assert!(Serial::from_hex("xyz").is_err());
        assert!(Serial::from_hex("").is_err());
    }
}
