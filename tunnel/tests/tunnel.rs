//! The tunnel carrying connections: both ways, many at once over one session, across a
//! certificate rotation, resuming for a repeat peer, with back-pressure.
mod common;

use std::{sync::atomic::Ordering, time::Duration};

use common::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use ward_tunnel::{inbound::Verdict, TunnelError};

#[tokio::test]
async fn connection_is_carried_both_ways_and_half_close_passes_through() {
    let h = Harness::new().await;
    let (mut tcp, carried) = h.connect().await;
    // Sent before the tunnel is open: the workload's connect() already succeeded.
    round_trip(&mut tcp, b"first bytes").await;
    round_trip(&mut tcp, &vec![7u8; 1 << 20]).await;
    tcp.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    tcp.read_to_end(&mut rest)
        .await
        .expect("the echo server's FIN reaches the workload");
    assert!(
        rest.is_empty(),
        "nothing after the echo: {} bytes",
        rest.len()
    );
    let copied = carried
        .await
        .expect("task")
        .expect("the tunnel ends cleanly");
    let expected = (1 << 20) + 11;
    assert_eq!((copied.sent, copied.received), (expected, expected));
    // The inbound side recorded the carried connection with the verified identity.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let events = h.authorizer.events.lock().expect("lock").clone();
    let carried = events
        .iter()
        .find(|e| matches!(e.verdict, Verdict::Carried(_)))
        .expect("a Carried event");
    assert_eq!(carried.peer.as_ref(), Some(&id(CLIENT)));
    assert_eq!(carried.destination, Some(h.echo_addr));
}

#[tokio::test]
async fn many_concurrent_connections_share_one_tls_session() {
    let h = Harness::new().await;
    let mut conns = Vec::new();
    for _ in 0..200 {
        conns.push(h.connect().await);
    }
    let mut tasks = Vec::new();
    for (i, (mut tcp, carried)) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let message = format!("connection {i}");
            for _ in 0..5 {
                round_trip(&mut tcp, message.as_bytes()).await;
            }
            tcp.shutdown().await.expect("shutdown");
            carried.await.expect("task").expect("carried")
        }));
    }
    for task in tasks {
        let copied = task.await.expect("connection task");
        assert_eq!(copied.sent, copied.received);
    }
    let stats = h.outbound.stats();
    assert_eq!(
        stats.full_handshakes.load(Ordering::Relaxed)
            + stats.resumed_handshakes.load(Ordering::Relaxed),
        1,
        "200 connections between the same two workloads ride one TLS session"
    );
    assert_eq!(stats.streams.load(Ordering::Relaxed), 200);
}

#[tokio::test]
async fn repeat_peer_resumes_the_tls_session() {
    let h = Harness::new().await;
    let (mut tcp, _carried) = h.connect().await;
    round_trip(&mut tcp, b"one").await;
    // The session closes (say the peer agent restarted its listener's sessions): the next
    // connection must handshake again, and resumes with the ticket it received.
    h.outbound.drop_sessions();
    drop(tcp);
    let (mut tcp, _carried) = h.connect().await;
    round_trip(&mut tcp, b"two").await;
    let stats = h.outbound.stats();
    assert_eq!(stats.full_handshakes.load(Ordering::Relaxed), 1);
    assert_eq!(
        stats.resumed_handshakes.load(Ordering::Relaxed),
        1,
        "the second session must be resumed"
    );
}

#[tokio::test]
async fn rotation_keeps_long_lived_connections_and_new_ones_present_the_new_certificate() {
    let h = Harness::new().await;
    let (mut long_lived, _carried) = h.connect().await;
    round_trip(&mut long_lived, b"before rotation").await;
    let old_client = h.client_svids.get(&id(CLIENT)).expect("client SVID");
    // Both workloads' certificates are renewed.
    h.client_svids
        .insert(h.ca.issue(CLIENT, LIFETIME).svid())
        .expect("replaced the old certificate");
    h.server_svids
        .insert(h.ca.issue(SERVER, LIFETIME).svid())
        .expect("replaced the old certificate");
    round_trip(&mut long_lived, b"after rotation").await;
    // Revoking the old client certificate proves that new connections present the new one
    // (the old would be refused).
    h.server_trust.revoke(old_client.serial().clone());
    let (mut fresh, _carried) = h.connect().await;
    round_trip(&mut fresh, b"new certificate").await;
    assert_eq!(
        h.outbound.stats().full_handshakes.load(Ordering::Relaxed),
        2,
        "the rotation opened a new session"
    );
    // The connection opened before the rotation is still being carried.
    round_trip(&mut long_lived, b"still there").await;
}

#[tokio::test]
async fn a_destination_that_does_not_read_pushes_back_instead_of_filling_memory() {
    let h = Harness::new().await;
    // A destination that accepts and never reads.
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let sink_addr = sink.local_addr().expect("addr");
    let held = tokio::spawn(async move { sink.accept().await.expect("accept") });
    h.authorizer
        .local
        .lock()
        .expect("lock")
        .insert(sink_addr, id(SERVER));
    let mut request = h.request();
    request.destination = sink_addr;
    let (mut tcp, _carried) = h.connect_with(&h.outbound, request).await;
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0usize;
    while let Ok(result) =
        tokio::time::timeout(Duration::from_millis(500), tcp.write_all(&chunk)).await
    {
        result.expect("write");
        written += chunk.len();
        assert!(
            written < 256 << 20,
            "256 MiB went into a tunnel whose destination reads nothing"
        );
    }
    // Socket buffers on the four hops plus one stream window: a few MiB, not unbounded.
    assert!(
        written < 64 << 20,
        "{written} bytes accepted before the writer was pushed back"
    );
    drop(held);
}

#[tokio::test]
async fn a_source_without_a_certificate_has_its_connection_reset_with_the_reason() {
    let h = Harness::new().await;
    let mut request = h.request();
    request.source = id("spiffe://example.org/ns/a/sa/unknown");
    let (tcp, carried) = h.connect_with(&h.outbound, request).await;
    assert_reset(tcp).await;
    let err = carried.await.expect("task").expect_err("no certificate");
    assert!(
        matches!(err, TunnelError::NoCertificate { .. }),
        "expected NoCertificate, got {err}"
    );
    assert!(err.to_string().contains("unknown"), "{err}");
}

#[tokio::test]
async fn replacing_the_trust_bundle_ends_sessions_of_the_removed_ca_but_not_open_streams() {
    let h = Harness::new().await;
    let (mut long_lived, _carried) = h.connect().await;
    round_trip(&mut long_lived, b"before the new bundle").await;
    let new_ca = ward_tunnel::test_helpers::TestCa::new(TRUST_DOMAIN);
    h.server_trust
        .replace_bundle(&[new_ca.cert_der()])
        .expect("new bundle");
    // The session gets a GOAWAY; the next connection opens a new session, which resumes and
    // is refused: the client's certificate is from a CA no longer in the bundle.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (refused, carried) = h.connect().await;
    assert_reset(refused).await;
    let err = carried.await.expect("task").expect_err("refused");
    assert!(
        matches!(&err, TunnelError::Session { .. } | TunnelError::Broken(_)),
        "{err}"
    );
    h.authorizer
        .refusal("a resumed session from the removed CA", |r| {
            matches!(r, ward_tunnel::Refusal::PeerCertificate { reason }
                if reason.contains("not signed by a CA of the trust bundle"))
        })
        .await;
    assert_eq!(
        h.outbound
            .stats()
            .resumed_handshakes
            .load(Ordering::Relaxed),
        1,
        "the refused session was a resumption"
    );
    // A stream opened before the change runs to its end.
    round_trip(&mut long_lived, b"after the new bundle").await;
    // A workload certified by the new CA is accepted.
    let svids = ward_tunnel::SvidStore::new();
    svids.insert(new_ca.issue(CLIENT, LIFETIME).svid());
    let outbound = ward_tunnel::Outbound::new(
        svids,
        h.client_trust.clone(),
        ward_tunnel::OutboundConfig::default(),
    );
    let (mut fresh, _carried) = h.connect_with(&outbound, h.request()).await;
    round_trip(&mut fresh, b"new CA").await;
}

#[tokio::test]
async fn an_idle_session_is_closed_and_the_next_connection_resumes() {
    let h = Harness::with_config(ward_tunnel::InboundConfig {
        idle_timeout: Duration::from_millis(300),
        ..ward_tunnel::InboundConfig::default()
    })
    .await;
    let handshakes = |h: &Harness| {
        let stats = h.outbound.stats();
        (
            stats.full_handshakes.load(Ordering::Relaxed),
            stats.resumed_handshakes.load(Ordering::Relaxed),
        )
    };
    // A session carrying a connection is not idle, however long the connection is quiet.
    let (mut quiet, carried) = h.connect().await;
    round_trip(&mut quiet, b"then silence").await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    round_trip(&mut quiet, b"still carried").await;
    let (mut second, _carried) = h.connect().await;
    round_trip(&mut second, b"same session").await;
    assert_eq!(handshakes(&h), (1, 0), "one session so far");
    drop(second);
    quiet.shutdown().await.expect("shutdown");
    carried.await.expect("task").expect("carried to its end");
    // Now idle: closed by the inbound side; the next connection resumes.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (mut third, _carried) = h.connect().await;
    round_trip(&mut third, b"after idle").await;
    assert_eq!(
        handshakes(&h),
        (1, 1),
        "the idle session was closed and resumed"
    );
}
