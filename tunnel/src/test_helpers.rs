//! A test CA (rcgen) that issues workload certificates the way the control plane does: ECDSA
//! P-256, the SPIFFE ID as the only URI SAN, client and server use, a short lifetime.
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::{identity::Serial, svid::Svid};

pub struct TestCa {
    pub trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

/// A workload certificate as files would hold it, and as the store takes it.
pub struct IssuedSvid {
    pub chain_pem: String,
    pub key_pem: String,
    pub serial: Serial,
}

impl IssuedSvid {
    pub fn svid(&self) -> Svid {
        Svid::from_pem(&self.chain_pem, &self.key_pem).expect("a test SVID is usable")
    }
}

fn serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's random source works");
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

impl TestCa {
    pub fn new(trust_domain: &str) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("test CA ({trust_domain})"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = OffsetDateTime::now_utc() - Duration::from_secs(3600);
        params.not_after = OffsetDateTime::now_utc() + Duration::from_secs(24 * 3600);
        params.serial_number = Some(serial());
        let cert = params.self_signed(&key).expect("CA certificate");
        let cert_pem = cert.pem();
        let issuer = Issuer::new(params, key);
        TestCa {
            trust_domain: trust_domain.into(),
            issuer,
            cert_der: cert.der().clone(),
            cert_pem,
        }
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `spiffe_id`, valid from an hour ago for `lifetime` from now.
    pub fn issue(&self, spiffe_id: &str, lifetime: Duration) -> IssuedSvid {
        let now = OffsetDateTime::now_utc();
        self.issue_between(spiffe_id, now - Duration::from_secs(3600), now + lifetime)
    }

    /// A certificate that expired a minute ago.
    pub fn issue_expired(&self, spiffe_id: &str) -> IssuedSvid {
        let now = OffsetDateTime::now_utc();
        self.issue_between(
            spiffe_id,
            now - Duration::from_secs(7200),
            now - Duration::from_secs(60),
        )
    }

    /// Signs the key of `csr_pem` for `spiffe_id`, as the control plane's `SignWorkload` does.
    pub fn sign_csr(&self, spiffe_id: &str, csr_pem: &str, lifetime: Duration) -> String {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).expect("a valid CSR");
        let now = OffsetDateTime::now_utc();
        let mut params = workload_params(spiffe_id, now - Duration::from_secs(60), now + lifetime);
        params.serial_number = Some(serial());
        params
            .signed_by(&csr.public_key, &self.issuer)
            .expect("workload certificate")
            .pem()
    }

    pub fn issue_between(
        &self,
        spiffe_id: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> IssuedSvid {
        let key = KeyPair::generate().expect("workload key");
        let mut params = workload_params(spiffe_id, not_before, not_after);
        let serial_number = serial();
        params.serial_number = Some(serial_number.clone());
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("workload certificate");
        IssuedSvid {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: Serial::from_bytes(serial_number.as_ref()),
        }
    }
}

fn workload_params(
    spiffe_id: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        spiffe_id.try_into().expect("a SPIFFE ID is an IA5 string"),
    )];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    params.use_authority_key_identifier_extension = true;
    params
}

/// The PKCS#8 DER of a PEM key, for APIs that take one.
pub fn key_der(key_pem: &str) -> PrivateKeyDer<'static> {
    let key = KeyPair::from_pem(key_pem).expect("PEM key");
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}
