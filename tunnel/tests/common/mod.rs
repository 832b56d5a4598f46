//! Two agents on loopback: an outbound side (node A, workload CLIENT) and an inbound side
//! (node B, workload SERVER, an echo server), each with its own certificate store and trust.
#![allow(dead_code)] // each test binary uses a part of the harness

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use ward_tunnel::{
    inbound::Verdict, test_helpers::TestCa, Authorizer, Copied, Denied, Inbound, InboundConfig,
    InboundEvent, Outbound, OutboundConfig, OutboundRequest, Refusal, SpiffeId, SvidStore,
    TrustStore, TunnelError,
};

pub const TRUST_DOMAIN: &str = "example.org";
pub const CLIENT: &str = "spiffe://example.org/ns/a/sa/client";
pub const SERVER: &str = "spiffe://example.org/ns/b/sa/server";
pub const LIFETIME: Duration = Duration::from_secs(3600);

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("test SPIFFE ID")
}

/// The inbound agent's policy and workload table, and a record of its verdicts.
#[derive(Default)]
pub struct TestAuthorizer {
    pub local: Mutex<HashMap<SocketAddr, SpiffeId>>,
    pub allowed_peers: Mutex<HashSet<SpiffeId>>,
    pub events: Mutex<Vec<InboundEvent>>,
}

impl Authorizer for TestAuthorizer {
    fn local_workload(&self, destination: SocketAddr) -> Option<SpiffeId> {
        self.local.lock().expect("lock").get(&destination).cloned()
    }

    fn authorize(
        &self,
        peer: &SpiffeId,
        _claimed: Option<u32>,
        workload: &SpiffeId,
        _destination: SocketAddr,
    ) -> Result<u32, Denied> {
        if self.allowed_peers.lock().expect("lock").contains(peer) {
            Ok(0)
        } else {
            Err(Denied {
                reason: format!("no ingress rule of {workload} allows {peer}"),
            })
        }
    }

    fn record(&self, event: &InboundEvent) {
        self.events.lock().expect("lock").push(event.clone());
    }
}

impl TestAuthorizer {
    pub fn refusals(&self) -> Vec<Refusal> {
        self.events
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|e| match &e.verdict {
                Verdict::Refused(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    /// Waits up to 5 s for a refusal that `matches`, and returns it.
    pub async fn refusal(&self, what: &str, matches: impl Fn(&Refusal) -> bool) -> Refusal {
        for _ in 0..500 {
            if let Some(r) = self.refusals().into_iter().find(|r| matches(r)) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "the inbound side never refused {what}; refusals: {:?}",
            self.refusals()
        );
    }
}

pub struct Harness {
    pub ca: TestCa,
    pub client_svids: Arc<SvidStore>,
    pub client_trust: Arc<TrustStore>,
    pub server_svids: Arc<SvidStore>,
    pub server_trust: Arc<TrustStore>,
    pub outbound: Arc<Outbound>,
    pub authorizer: Arc<TestAuthorizer>,
    pub inbound_addr: SocketAddr,
    pub echo_addr: SocketAddr,
    outbound_listener: TcpListener,
}

pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

impl Harness {
    pub async fn new() -> Harness {
        Harness::with_config(InboundConfig::default()).await
    }

    pub async fn with_config(config: InboundConfig) -> Harness {
        let ca = TestCa::new(TRUST_DOMAIN);
        let client_svids = SvidStore::new();
        client_svids.insert(ca.issue(CLIENT, LIFETIME).svid());
        let server_svids = SvidStore::new();
        server_svids.insert(ca.issue(SERVER, LIFETIME).svid());
        let client_trust = TrustStore::new(TRUST_DOMAIN, &[ca.cert_der()]).expect("trust");
        let server_trust = TrustStore::new(TRUST_DOMAIN, &[ca.cert_der()]).expect("trust");
        let echo_addr = echo_server().await;
        let authorizer = Arc::new(TestAuthorizer::default());
        authorizer
            .local
            .lock()
            .expect("lock")
            .insert(echo_addr, id(SERVER));
        authorizer
            .allowed_peers
            .lock()
            .expect("lock")
            .insert(id(CLIENT));
        let inbound = Inbound::new(
            server_svids.clone(),
            server_trust.clone(),
            authorizer.clone(),
            config,
        )
        .expect("inbound");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind inbound");
        let inbound_addr = listener.local_addr().expect("addr");
        tokio::spawn(inbound.serve(listener));
        let outbound = Outbound::new(
            client_svids.clone(),
            client_trust.clone(),
            OutboundConfig::default(),
        );
        let outbound_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind outbound");
        Harness {
            ca,
            client_svids,
            client_trust,
            server_svids,
            server_trust,
            outbound,
            authorizer,
            inbound_addr,
            echo_addr,
            outbound_listener,
        }
    }

    pub fn request(&self) -> OutboundRequest {
        OutboundRequest {
            source: id(CLIENT),
            source_identity: 0,
            destination: self.echo_addr,
            destination_id: id(SERVER),
            peer_agent: self.inbound_addr,
            rule: 0,
        }
    }

    /// A workload's connection as the outbound listener accepts it, carried by `outbound`.
    pub async fn connect_with(
        &self,
        outbound: &Arc<Outbound>,
        request: OutboundRequest,
    ) -> (TcpStream, JoinHandle<Result<Copied, TunnelError>>) {
        let addr = self.outbound_listener.local_addr().expect("addr");
        let (workload, accepted) = tokio::join!(TcpStream::connect(addr), async {
            self.outbound_listener.accept().await
        });
        let workload = workload.expect("the workload's connect() succeeds at once");
        let (accepted, _) = accepted.expect("accept");
        let outbound = outbound.clone();
        let carried = tokio::spawn(async move { outbound.carry(accepted, &request).await });
        (workload, carried)
    }

    pub async fn connect(&self) -> (TcpStream, JoinHandle<Result<Copied, TunnelError>>) {
        self.connect_with(&self.outbound, self.request()).await
    }

    /// An outbound agent presenting `cert_pem`/`key_pem` for its workload, trusting this CA.
    pub fn attacker(&self, svid: ward_tunnel::Svid) -> Arc<Outbound> {
        let svids = SvidStore::new();
        svids.insert(svid);
        let trust = TrustStore::new(TRUST_DOMAIN, &[self.ca.cert_der()]).expect("trust");
        Outbound::new(svids, trust, OutboundConfig::default())
    }
}

/// Sends `message` and reads the echo.
pub async fn round_trip(tcp: &mut TcpStream, message: &[u8]) {
    tcp.write_all(message).await.expect("write to the tunnel");
    let mut echo = vec![0u8; message.len()];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut echo))
        .await
        .expect("echo within 10 s")
        .expect("read the echo");
    assert_eq!(echo, message, "the tunnel must return what was sent");
}

/// The workload's side of a refused tunnel: reset or closed, never carried.
pub async fn assert_reset(mut tcp: TcpStream) {
    let _ = tcp.write_all(b"hello").await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("the refused connection ends within 10 s");
    match read {
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "expected a reset, got {e}"
        ),
        Ok(n) => panic!("a refused tunnel must be reset, but read {n} bytes (0 = clean close)"),
    }
}
