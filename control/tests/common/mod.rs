//! What both control-plane test files need to speak to the real binary as a bare client.
#![allow(dead_code, reason = "each test file uses what it needs")]
use std::{path::Path, time::Duration};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use ward_control::test_helpers::{ControlPlane, ControlPlaneOptions};
use ward_proto::{control_client::ControlClient, JoinRequest};

pub const WEB: &str = "apiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: web\nspec:\n  selector: {labels: {app: web}}\n  ingress: []\n";
pub const WAIT: Duration = Duration::from_secs(10);

/// The real `ward-control` in `tmp`, serving policy `web`, with `configure`'s options.
pub fn start_plane(tmp: &Path, configure: impl FnOnce(&mut ControlPlaneOptions)) -> ControlPlane {
    let mut opts = ControlPlaneOptions::new(env!("CARGO_BIN_EXE_ward-control"), tmp);
    configure(&mut opts);
    std::fs::create_dir_all(tmp.join("policy")).expect("policy dir");
    std::fs::write(tmp.join("policy/web.yaml"), WEB).expect("initial policy");
    ControlPlane::start(opts)
}

pub fn tls(plane: &ControlPlane, identity: Option<(&str, &str)>, ca_pem: Option<&str>) -> Endpoint {
    let ca = std::fs::read_to_string(plane.ca_file()).expect("CA file");
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem.map_or(ca, str::to_owned)))
        .domain_name("ward-control");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{}", plane.address))
        .expect("uri")
        .tls_config(tls)
        .expect("tls config")
        .connect_timeout(Duration::from_secs(5))
}

pub async fn channel(plane: &ControlPlane, identity: Option<(&str, &str)>) -> Channel {
    tls(plane, identity, None)
        .connect()
        .await
        .expect("TLS connection")
}

pub fn csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    (key.serialize_pem(), csr)
}

pub async fn join(
    plane: &ControlPlane,
    node: &str,
    token: &str,
) -> Result<(String, String), tonic::Status> {
    let (key, csr_pem) = csr();
    let response = ControlClient::new(channel(plane, None).await)
        .join(JoinRequest {
            token: token.into(),
            node: node.into(),
            csr_pem,
        })
        .await?
        .into_inner();
    Ok((response.cert_pem, key))
}

pub async fn joined(plane: &ControlPlane, node: &str) -> (String, String) {
    join(plane, node, &plane.new_token(None))
        .await
        .expect("join")
}
