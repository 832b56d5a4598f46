//! A foreign TLS stack against the inbound port: Debian's `openssl s_client` with a valid
//! workload certificate completes the handshake and, speaking HTTP/2 by hand, opens a CONNECT
//! stream through which the echo server answers; TLS 1.2 and a missing certificate are refused.
mod common;

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use common::*;
use ward_tunnel::{inbound::Verdict, server_name_for, Refusal};

fn openssl_available() {
    let found = Command::new("openssl")
        .arg("version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "these tests need the openssl command line tool: apt-get install -y openssl"
    );
}

/// Runs `openssl s_client` with `args`, feeding `input` and keeping stdin open for `linger`
/// (s_client closes the connection at end of input).
async fn s_client(args: &[String], input: Vec<u8>, linger: Duration) -> Output {
    let args = args.to_vec();
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut child = Command::new("openssl")
            .arg("s_client")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run openssl s_client");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&input).expect("write to s_client");
        std::thread::sleep(linger);
        drop(stdin);
        child.wait_with_output().expect("s_client output")
    })
    .await
    .expect("s_client task")
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write PEM file");
    path.display().to_string()
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("small frame")
        .to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The HTTP/2 client preface, an empty SETTINGS, `CONNECT <destination>` on stream 1 and a DATA
/// frame carrying `payload`, written without any HTTP/2 library.
fn connect_by_hand(destination: &str, payload: &[u8]) -> Vec<u8> {
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(0x4, 0, 0, &[]));
    // HPACK literals with indexed names: :method (static index 2), :authority (1).
    let mut headers = vec![0x42, 7];
    headers.extend_from_slice(b"CONNECT");
    headers.push(0x41);
    headers.push(u8::try_from(destination.len()).expect("short authority"));
    headers.extend_from_slice(destination.as_bytes());
    bytes.extend(frame(0x1, 0x4, 1, &headers));
    bytes.extend(frame(0x0, 0, 1, payload));
    bytes
}

#[tokio::test]
async fn openssl_with_a_workload_certificate_completes_the_handshake_and_reaches_the_workload() {
    openssl_available();
    let h = Harness::new().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let issued = h.ca.issue(CLIENT, LIFETIME);
    let args = vec![
        "-connect".into(),
        h.inbound_addr.to_string(),
        "-servername".into(),
        server_name_for(&id(SERVER)),
        "-cert".into(),
        write(dir.path(), "cert.pem", &issued.chain_pem),
        "-key".into(),
        write(dir.path(), "key.pem", &issued.key_pem),
        "-CAfile".into(),
        write(dir.path(), "ca.pem", h.ca.cert_pem()),
        "-verify_return_error".into(),
        "-alpn".into(),
        "h2".into(),
    ];
    let payload = b"ping-through-openssl";
    let out = s_client(
        &args,
        connect_by_hand(&h.echo_addr.to_string(), payload),
        Duration::from_millis(1500),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("TLSv1.3"),
        "s_client must negotiate TLS 1.3:\n{stdout}"
    );
    assert!(
        stdout.contains("Verify return code: 0 (ok)"),
        "s_client must verify the inbound side's workload certificate:\n{stdout}"
    );
    assert!(
        stdout.contains("ping-through-openssl"),
        "the echo server's answer must come back through the CONNECT stream:\n{stdout}"
    );
    assert!(
        h.authorizer.refusals().is_empty(),
        "nothing refused: {:?}",
        h.authorizer.refusals()
    );
    // The stream ends when s_client goes; the verdict names the verified identity.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = h.authorizer.events.lock().expect("lock").clone();
    assert!(
        events
            .iter()
            .any(|e| e.peer.as_ref() == Some(&id(CLIENT))
                && !matches!(e.verdict, Verdict::Refused(_))),
        "a verdict for {CLIENT}: {events:?}"
    );
}

#[tokio::test]
async fn openssl_with_tls_1_2_is_refused() {
    openssl_available();
    let h = Harness::new().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let issued = h.ca.issue(CLIENT, LIFETIME);
    let args = vec![
        "-connect".into(),
        h.inbound_addr.to_string(),
        "-servername".into(),
        server_name_for(&id(SERVER)),
        "-cert".into(),
        write(dir.path(), "cert.pem", &issued.chain_pem),
        "-key".into(),
        write(dir.path(), "key.pem", &issued.key_pem),
        "-tls1_2".into(),
    ];
    let out = s_client(&args, Vec::new(), Duration::from_millis(200)).await;
    assert!(
        !out.status.success(),
        "a TLS 1.2 handshake must fail:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let refusal = h
        .authorizer
        .refusal(
            "TLS 1.2 from openssl",
            |r| matches!(r, Refusal::Handshake { reason } if reason.contains("TLS 1.3")),
        )
        .await;
    assert!(
        refusal.to_string().contains("does not speak TLS 1.3"),
        "{refusal}"
    );
}

#[tokio::test]
async fn openssl_without_a_client_certificate_is_refused() {
    openssl_available();
    let h = Harness::new().await;
    let args = vec![
        "-connect".into(),
        h.inbound_addr.to_string(),
        "-servername".into(),
        server_name_for(&id(SERVER)),
        "-alpn".into(),
        "h2".into(),
    ];
    let out = s_client(
        &args,
        connect_by_hand(&h.echo_addr.to_string(), b"no certificate"),
        Duration::from_millis(500),
    )
    .await;
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("no certificate"),
        "nothing may be carried without a client certificate"
    );
    h.authorizer
        .refusal("a client without a certificate", |r| {
            matches!(r, Refusal::Handshake { reason } if reason.contains("certificate is required"))
        })
        .await;
}
