//! Bad input and attacks on the inbound listener: each is refused, the refusal names the reason,
//! and a tunnel that was open meanwhile keeps working (as does a new one).
mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_rustls::{
    rustls::{self, pki_types::ServerName, version::TLS12, ClientConfig},
    TlsConnector,
};
use ward_tunnel::{server_name_for, test_helpers::TestCa, InboundConfig, Refusal, TunnelError};

/// A tunnel open before the attack, to be checked after it.
async fn bystander(h: &Harness) -> TcpStream {
    let (mut tcp, _carried) = h.connect().await;
    round_trip(&mut tcp, b"before the attack").await;
    tcp
}

async fn others_unaffected(h: &Harness, mut bystander: TcpStream) {
    round_trip(&mut bystander, b"after the attack").await;
    let (mut fresh, _carried) = h.connect().await;
    round_trip(&mut fresh, b"a new tunnel").await;
}

/// An attacker's outbound agent presenting `svid` tries to reach the echo server.
async fn attack_with(h: &Harness, svid: ward_tunnel::Svid, source: &str) -> TunnelError {
    let attacker = h.attacker(svid);
    let mut request = h.request();
    request.source = id(source);
    let (tcp, carried) = h.connect_with(&attacker, request).await;
    assert_reset(tcp).await;
    carried
        .await
        .expect("task")
        .expect_err("the attacker's tunnel must fail")
}

/// The source agent's error (its verdict event's reason) names the TLS alert it received.
fn assert_alert(err: &TunnelError) {
    assert!(
        matches!(err, TunnelError::Session { reason, .. } | TunnelError::Handshake { reason, .. }
            if reason.contains("alert")),
        "the source side must name the peer's TLS alert, got {err}"
    );
}

fn handshake_refusal_containing(what: &'static str) -> impl Fn(&Refusal) -> bool {
    move |r| matches!(r, Refusal::Handshake { reason } if reason.to_lowercase().contains(what))
}

#[tokio::test]
async fn certificate_of_another_trust_domain_is_refused() {
    let h = Harness::new().await;
    let before = bystander(&h).await;
    // Signed by the trusted CA, but naming a foreign trust domain.
    let evil = "spiffe://evil.org/ns/a/sa/client";
    let err = attack_with(&h, h.ca.issue(evil, LIFETIME).svid(), evil).await;
    assert_alert(&err);
    let refusal = h
        .authorizer
        .refusal(
            "the foreign trust domain",
            handshake_refusal_containing("trust domain"),
        )
        .await;
    assert!(refusal.to_string().contains("evil.org"), "{refusal}");
    others_unaffected(&h, before).await;
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let h = Harness::new().await;
    let before = bystander(&h).await;
    let err = attack_with(&h, h.ca.issue_expired(CLIENT).svid(), CLIENT).await;
    assert_alert(&err);
    h.authorizer
        .refusal(
            "the expired certificate",
            handshake_refusal_containing("expired"),
        )
        .await;
    others_unaffected(&h, before).await;
}

#[tokio::test]
async fn revoked_certificate_is_refused() {
    let h = Harness::new().await;
    let before = bystander(&h).await;
    let issued = h.ca.issue(CLIENT, LIFETIME);
    h.server_trust.revoke(issued.serial.clone());
    let err = attack_with(&h, issued.svid(), CLIENT).await;
    assert_alert(&err);
    h.authorizer
        .refusal(
            "the revoked certificate",
            handshake_refusal_containing("revoked"),
        )
        .await;
    others_unaffected(&h, before).await;
}

#[tokio::test]
async fn certificate_revoked_after_the_handshake_opens_no_new_stream() {
    let h = Harness::new().await;
    let (mut first, _carried) = h.connect().await;
    round_trip(&mut first, b"pooled session").await;
    let serial = h
        .client_svids
        .get(&id(CLIENT))
        .expect("client SVID")
        .serial()
        .clone();
    h.server_trust.revoke(serial);
    // The pooled session is reused; the inbound side checks the revocation list per stream.
    let (second, carried) = h.connect().await;
    assert_reset(second).await;
    let err = carried.await.expect("task").expect_err("refused");
    assert!(
        matches!(&err, TunnelError::Refused { status: 401, reason, .. } if reason.contains("revoked")),
        "expected a 401 naming the revocation, got {err}"
    );
    h.authorizer
        .refusal(
            "the revoked peer's stream",
            |r| matches!(r, Refusal::PeerCertificate { reason } if reason.contains("revoked")),
        )
        .await;
}

#[tokio::test]
async fn valid_certificate_whose_identity_policy_does_not_allow_is_refused() {
    let h = Harness::new().await;
    let before = bystander(&h).await;
    let other = "spiffe://example.org/ns/a/sa/not-allowed";
    let err = attack_with(&h, h.ca.issue(other, LIFETIME).svid(), other).await;
    assert!(
        matches!(&err, TunnelError::Refused { status: 401, reason, .. } if reason.contains("not-allowed")),
        "the source agent's error must carry the 401 and the reason, got {err}"
    );
    let refusal = h
        .authorizer
        .refusal("the identity policy does not allow", |r| {
            matches!(r, Refusal::Denied { .. })
        })
        .await;
    assert!(refusal.to_string().contains(other), "{refusal}");
    others_unaffected(&h, before).await;
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let h = Harness::new().await;
    let before = bystander(&h).await;
    let rogue = TestCa::new(TRUST_DOMAIN);
    // Same SPIFFE ID as the allowed client, but from a CA outside the trust bundle.
    let err = attack_with(&h, rogue.issue(CLIENT, LIFETIME).svid(), CLIENT).await;
    assert_alert(&err);
    h.authorizer
        .refusal("the foreign CA", |r| {
            matches!(r, Refusal::Handshake { reason }
                if reason.contains("not signed by a CA of the trust bundle"))
        })
        .await;
    others_unaffected(&h, before).await;
}

#[tokio::test]
async fn plaintext_to_the_inbound_port_is_refused() {
    let h = Harness::new().await;
    let before = bystander(&h).await;
    let mut plain = TcpStream::connect(h.inbound_addr).await.expect("connect");
    plain
        .write_all(
            format!(
                "CONNECT {} HTTP/1.1\r\nHost: {}\r\n\r\n",
                h.echo_addr, h.echo_addr
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf))
        .await
        .expect("the inbound side closes a plaintext connection");
    assert!(
        !String::from_utf8_lossy(&buf).contains("200"),
        "plaintext must not open a tunnel"
    );
    h.authorizer
        .refusal("plaintext", |r| matches!(r, Refusal::Handshake { .. }))
        .await;
    others_unaffected(&h, before).await;
}

#[tokio::test]
async fn tls_1_2_to_the_inbound_port_is_refused() {
    let h = Harness::new().await;
    let before = bystander(&h).await;
    let issued = h.ca.issue(CLIENT, LIFETIME);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(h.ca.cert_der()).expect("root");
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&TLS12])
            .expect("TLS 1.2")
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from(
                    issued.svid().certified_key().cert[0].to_vec(),
                )],
                ward_tunnel::test_helpers::key_der(&issued.key_pem),
            )
            .expect("client cert");
    let tcp = TcpStream::connect(h.inbound_addr).await.expect("connect");
    let name = ServerName::try_from(server_name_for(&id(SERVER))).expect("name");
    let result = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await;
    assert!(result.is_err(), "a TLS 1.2 handshake must fail");
    h.authorizer
        .refusal("TLS 1.2", handshake_refusal_containing("incompatible"))
        .await;
    others_unaffected(&h, before).await;
}

#[tokio::test]
async fn destination_that_is_not_a_local_workload_is_refused() {
    let h = Harness::new().await;
    let before = bystander(&h).await;
    // A listening address on the node that is no workload's: the agent must not become an
    // open proxy to it.
    let not_a_workload = echo_server().await;
    let mut request = h.request();
    request.destination = not_a_workload;
    let (tcp, carried) = h.connect_with(&h.outbound, request).await;
    assert_reset(tcp).await;
    let err = carried.await.expect("task").expect_err("refused");
    assert!(
        matches!(&err, TunnelError::Refused { status: 400, .. }),
        "expected 400, got {err}"
    );
    h.authorizer
        .refusal(
            "a non-local destination",
            |r| matches!(r, Refusal::NotLocal { destination } if *destination == not_a_workload),
        )
        .await;
    others_unaffected(&h, before).await;
}

#[tokio::test]
async fn destination_of_another_workload_than_the_session_names_is_refused() {
    let h = Harness::new().await;
    // A second local workload, whose address a session for SERVER must not reach.
    let other_addr = echo_server().await;
    h.authorizer
        .local
        .lock()
        .expect("lock")
        .insert(other_addr, id("spiffe://example.org/ns/b/sa/other"));
    let mut request = h.request();
    request.destination = other_addr;
    let (tcp, carried) = h.connect_with(&h.outbound, request).await;
    assert_reset(tcp).await;
    let err = carried.await.expect("task").expect_err("refused");
    assert!(
        matches!(&err, TunnelError::Refused { status: 400, .. }),
        "expected 400, got {err}"
    );
    h.authorizer
        .refusal("another workload's address", |r| {
            matches!(r, Refusal::WrongWorkload { .. })
        })
        .await;
}

#[tokio::test]
async fn slowloris_peer_is_dropped_and_does_not_hold_up_others() {
    let h = Harness::with_config(InboundConfig {
        handshake_timeout: Duration::from_millis(500),
        ..InboundConfig::default()
    })
    .await;
    let before = bystander(&h).await;
    // A TLS ClientHello record header, then one byte at a time.
    let mut slow = TcpStream::connect(h.inbound_addr).await.expect("connect");
    let dribble = tokio::spawn(async move {
        let hello = [
            0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        for byte in hello.iter().cycle().take(40) {
            if slow.write_all(&[*byte]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut buf = [0u8; 1];
        matches!(slow.read(&mut buf).await, Ok(0) | Err(_))
    });
    // While the slow peer dribbles, other tunnels open and carry.
    others_unaffected(&h, before).await;
    h.authorizer
        .refusal("the slow peer", |r| {
            matches!(r, Refusal::HandshakeTimeout { .. })
        })
        .await;
    assert!(
        dribble.await.expect("task"),
        "the slow peer's connection must be closed"
    );
}
