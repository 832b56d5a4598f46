//! The DNS proxy of DNS-aware egress (`fqdn` and `fqdnPattern` peers). The kernel's connect and
//! sendmsg hooks send the DNS (UDP and TCP, port 53) of workloads whose egress rules name DNS
//! names here, to a loopback port in the workload's own network namespace (a pod's, or the
//! agent's). The proxy forwards each query, unchanged, to the resolver the workload asked (from
//! inside that namespace, so a pod's resolver is the one it sees), reads the answer, installs the
//! answered addresses for that workload ([`learned`]) and only then returns the answer, unchanged.
//!
//! What it refuses: a query the kernel did not send (it cannot know where it was going), with
//! `dns.onlyPolicyNames` a name the workload's policy does not name (`REFUSED`), and a query it
//! cannot read (`FORMERR`). An answer that is not the answer to the query (another id or
//! question) is ignored; one that cannot be read, or none within 2 s, is `SERVFAIL` with nothing
//! learned. A flood is bounded: at most 1,024 queries in flight, the rest dropped.
//!
//! With no agent running nothing listens on the proxy's port, and the hooks send DNS to the
//! resolver the workload named: it is answered, and only the addresses learned before count.
mod learned;
mod message;

use std::{
    collections::BTreeMap,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_common::{OriginalDst, PROTO_TCP, PROTO_UDP};
use anyhow::Context as _;
use hickory_proto::op::ResponseCode;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Semaphore, TryAcquireError},
    task::JoinHandle,
};
use ward_host::netns::{self, Netns, NetnsId};

use learned::Learnt;
pub use learned::{boot_ns, name_of, Learned};

use crate::{
    config::DnsSettings,
    kernel::{dns::DnsMaps, tunnel::original_destination},
    metrics::{DnsQueryLabels, Metrics},
    placement::{self, Placement},
};

/// How long the resolver has to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries in flight at most; more are dropped (a client asks again).
const MAX_IN_FLIGHT: usize = 1024;
/// How old a query's record may be when the proxy reads it (as it takes the datagram from its
/// socket): the packet left microseconds before, unless the proxy is swamped. Older, it names
/// nobody: a process that sends from a port a workload used is not that workload.
const FRESH_UDP: Duration = Duration::from_millis(250);
/// A connection may wait in the accept queue longer.
const FRESH_TCP: Duration = Duration::from_secs(5);
/// The largest DNS message (TCP's length prefix; a UDP datagram's payload).
const MAX_MESSAGE: usize = 65_535;

/// What the proxy's tasks share.
struct Shared {
    learned: Arc<Learned>,
    maps: Mutex<DnsMaps>,
    only_policy_names: bool,
    metrics: Arc<Metrics>,
    in_flight: Arc<Semaphore>,
}

/// The network namespace a listener serves: the agent's own (`None`), or a pod's, where the
/// proxy's sockets to resolvers are made too. `cookie` is what the kernel files queries under.
#[derive(Clone)]
struct Place {
    netns: Option<Arc<Netns>>,
    cookie: u64,
}

/// The listeners' tasks of one namespace; they stop when this is dropped.
struct Serving(Vec<JoinHandle<()>>);

impl Drop for Serving {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

pub struct DnsProxy {
    port: u16,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    host_netns: NetnsId,
    /// The listeners in the agent's own namespace.
    host: Option<Serving>,
    pods: BTreeMap<NetnsId, Serving>,
    /// The namespace each workload was last found in.
    by_workload: BTreeMap<String, NetnsId>,
    /// Why opening a pod's listeners, or the agent's, last failed (logged once per reason).
    failed: BTreeMap<NetnsId, String>,
    host_failed: Option<String>,
}

impl DnsProxy {
    /// Adopts the learned addresses pinned by an earlier agent. The proxy listens, and the hooks
    /// send DNS to it, only while a policy generation names DNS names ([`Learned`] follows the
    /// generations, [`DnsProxy::place`] opens and closes the listeners).
    pub async fn start(
        settings: &DnsSettings,
        pin_dir: &Path,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<DnsProxy> {
        let learned = Learned::open(pin_dir, settings, metrics.clone())?;
        let shared = Arc::new(Shared {
            learned,
            maps: Mutex::new(DnsMaps::open(pin_dir)?),
            only_policy_names: settings.only_policy_names,
            metrics,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        });
        let runtime = tokio::runtime::Handle::current();
        let host_netns = Netns::current().context("the agent's network namespace")?;
        let learned = shared.learned.clone();
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                learned.expire();
            }
        });
        Ok(DnsProxy {
            port: settings.proxy_port,
            shared,
            runtime,
            host_netns: host_netns.id(),
            host: None,
            pods: BTreeMap::new(),
            by_workload: BTreeMap::new(),
            failed: BTreeMap::new(),
            host_failed: None,
        })
    }

    /// The learned addresses, which follow the policy generations.
    pub fn learned(&self) -> Arc<Learned> {
        self.shared.learned.clone()
    }

    /// Opens the proxy's listeners in the agent's namespace and inside workloads' own network
    /// namespaces, to match where their processes run now, while policy names DNS names; closes
    /// them all when it no longer does. A listener that cannot be opened (its port taken) is
    /// tried again at every pass: meanwhile the hooks find no proxy of ward's there, and DNS goes
    /// to the resolver asked, unlearned.
    pub fn place(&mut self, placements: &[Placement]) {
        if !self.shared.learned.names_in_policy() {
            if self.host.take().is_some() {
                tracing::info!("DNS proxy closed: no policy names DNS names");
            }
            self.pods.clear();
            self.failed.clear();
            self.by_workload.clear();
            return;
        }
        if self.host.is_none() {
            let opened = bind(self.port).and_then(|(udp, tcp)| {
                let place = Place {
                    netns: None,
                    cookie: listener_cookie(&udp)?,
                };
                serve(&self.runtime, udp, tcp, place, &self.shared)
            });
            match opened {
                Ok(serving) => {
                    tracing::info!(port = self.port, "DNS proxy listening");
                    self.host = Some(serving);
                    self.host_failed = None;
                }
                Err(e) => {
                    let error = format!("dns.proxyPort {}: {e}", self.port);
                    if self.host_failed.as_ref() != Some(&error) {
                        tracing::error!(error, "opening the DNS proxy; DNS of workloads whose policy names DNS names goes to their resolvers unlearned until it opens (tried every pass)");
                        self.host_failed = Some(error);
                    }
                }
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for placement in placements {
            let (found, ns) = placement::find(&placement.cgroups, self.host_netns);
            if found == placement::Found::Unknown {
                // Kept as they are until the workload can be looked at again.
                seen.extend(self.by_workload.get(&placement.workload).copied());
                continue;
            }
            let (placement::Found::Pod(id), Some(ns)) = (found, ns) else {
                continue;
            };
            self.by_workload.insert(placement.workload.clone(), id);
            seen.insert(id);
            if self.pods.contains_key(&id) {
                continue;
            }
            let ns = Arc::new(ns);
            let opened = ns.run(|| bind(self.port)).and_then(|(udp, tcp)| {
                let place = Place {
                    netns: Some(ns.clone()),
                    cookie: listener_cookie(&udp)?,
                };
                serve(&self.runtime, udp, tcp, place, &self.shared)
            });
            match opened {
                Ok(serving) => {
                    tracing::info!(
                        workload = placement.workload,
                        port = self.port,
                        "DNS proxy listening in the workload's network namespace"
                    );
                    self.failed.remove(&id);
                    self.pods.insert(id, serving);
                }
                Err(e) => {
                    let error = e.to_string();
                    if self.failed.get(&id) != Some(&error) {
                        tracing::warn!(workload = placement.workload, error, "opening the DNS proxy in the workload's network namespace; its DNS goes to its resolver unlearned until it opens (tried every pass)");
                        self.failed.insert(id, error);
                    }
                }
            }
        }
        self.pods.retain(|id, _| seen.contains(id));
        self.failed.retain(|id, _| seen.contains(id));
        self.by_workload.retain(|_, id| seen.contains(id));
    }
}

/// The proxy's sockets on loopback `port` in the calling thread's namespace: UDP and TCP, on
/// `127.0.0.1` and (where the namespace has it) `::1`.
fn bind(port: u16) -> io::Result<(Vec<std::net::UdpSocket>, Vec<std::net::TcpListener>)> {
    let named = |address: SocketAddr, e: io::Error| {
        io::Error::new(e.kind(), format!("binding {address}: {e}"))
    };
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
        let address = SocketAddr::new(ip, port);
        let (u, t) = match (
            std::net::UdpSocket::bind(address),
            std::net::TcpListener::bind(address),
        ) {
            (Ok(u), Ok(t)) => (u, t),
            // No ::1 in this namespace: IPv6 DNS has nowhere to go but its resolver.
            (Err(_), _) | (_, Err(_)) if ip.is_ipv6() => continue,
            (Err(e), _) | (_, Err(e)) => return Err(named(address, e)),
        };
        u.set_nonblocking(true)?;
        t.set_nonblocking(true)?;
        udp.push(u);
        tcp.push(t);
    }
    Ok((udp, tcp))
}

/// The namespace cookie of the listeners (all made in one namespace), as the kernel files queries.
fn listener_cookie(udp: &[std::net::UdpSocket]) -> io::Result<u64> {
    netns::socket_netns_cookie(&udp[0])
}

/// Starts serving the sockets of one namespace.
fn serve(
    runtime: &tokio::runtime::Handle,
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
    place: Place,
    shared: &Arc<Shared>,
) -> io::Result<Serving> {
    let _entered = runtime.enter();
    let mut tasks = Vec::new();
    for socket in udp {
        let socket = Arc::new(UdpSocket::from_std(socket)?);
        tasks.push(runtime.spawn(serve_udp(socket, place.clone(), shared.clone())));
    }
    for listener in tcp {
        let listener = TcpListener::from_std(listener)?;
        tasks.push(runtime.spawn(serve_tcp(listener, place.clone(), shared.clone())));
    }
    Ok(Serving(tasks))
}

fn count(shared: &Shared, result: &'static str) {
    shared
        .metrics
        .dns_queries
        .get_or_create(&DnsQueryLabels { result })
        .inc();
}

async fn serve_udp(socket: Arc<UdpSocket>, place: Place, shared: Arc<Shared>) {
    let Ok(local) = socket.local_addr() else {
        return;
    };
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                tracing::debug!(error = %e, "DNS proxy: receiving");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Read at once: the record is fresh only now.
        let original = shared.redirect(peer, local, PROTO_UDP, place.cookie);
        let Ok(permit) = shared.in_flight_permit() else {
            count(&shared, "dropped");
            continue;
        };
        let query = buf[..n].to_vec();
        let (socket, place, shared) = (socket.clone(), place.clone(), shared.clone());
        tokio::spawn(async move {
            let mut upstream = Upstream::Udp;
            if let Some(answer) = answer(&query, original, &place, &shared, &mut upstream).await {
                let _ = socket.send_to(&answer, peer).await;
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(listener: TcpListener, place: Place, shared: Arc<Shared>) {
    let Ok(local) = listener.local_addr() else {
        return;
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: waiting frees some, spinning would not.
                tracing::debug!(error = %e, "DNS proxy: accepting");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Taken at once: the kernel files a connection once.
        let original = shared.redirect(peer, local, PROTO_TCP, place.cookie);
        let (place, shared) = (place.clone(), shared.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, original, &place, &shared).await {
                tracing::debug!(error = %e, "DNS proxy: a TCP client");
            }
        });
    }
}

/// One client's TCP connection: length-prefixed queries, answered in order.
async fn serve_connection(
    mut stream: TcpStream,
    original: Option<OriginalDst>,
    place: &Place,
    shared: &Arc<Shared>,
) -> io::Result<()> {
    let mut upstream = Upstream::Tcp(None);
    loop {
        let Some(query) = read_framed(&mut stream).await? else {
            return Ok(());
        };
        let Ok(permit) = shared.in_flight_permit() else {
            count(shared, "dropped");
            return Ok(());
        };
        let answer = answer(&query, original, place, shared, &mut upstream).await;
        drop(permit);
        match answer {
            Some(answer) => write_framed(&mut stream, &answer).await?,
            None => return Ok(()),
        }
    }
}

async fn read_framed(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut len)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Ok(Err(e)) => return Err(e),
        // An idle client is let go, as resolvers do.
        Err(_) => return Ok(None),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    tokio::time::timeout(UPSTREAM_TIMEOUT, stream.read_exact(&mut message))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "a message cut short"))??;
    Ok(Some(message))
}

async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "message over 65,535 bytes"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

impl Shared {
    /// A place among the queries in flight, if one is free.
    fn in_flight_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, TryAcquireError> {
        self.in_flight.clone().try_acquire_owned()
    }

    fn redirect(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        protocol: u8,
        netns: u64,
    ) -> Option<OriginalDst> {
        let fresh = if protocol == PROTO_TCP {
            FRESH_TCP
        } else {
            FRESH_UDP
        };
        self.maps
            .lock()
            .expect("dns maps lock poisoned")
            .redirect(peer, local, protocol, netns, fresh)
    }
}

/// The proxy's connection to the resolver for one client: a UDP socket per query, or one TCP
/// connection per client connection, opened at its first query.
enum Upstream {
    Udp,
    Tcp(Option<(SocketAddr, TcpStream)>),
}

/// The answer to one query from a workload (`None`: nothing to send). `original` is where the
/// kernel says it was going.
async fn answer(
    bytes: &[u8],
    original: Option<OriginalDst>,
    place: &Place,
    shared: &Shared,
    upstream: &mut Upstream,
) -> Option<Vec<u8>> {
    let query = match message::parse_query(bytes) {
        Ok(query) => query,
        Err(why) => {
            count(shared, "malformed");
            tracing::debug!(reason = why, "DNS proxy: a query it cannot read");
            return message::format_error(bytes);
        }
    };
    let Some(original) = original else {
        count(shared, "refused");
        tracing::debug!(
            name = query.name,
            "DNS proxy: a query the kernel did not send here is refused"
        );
        return Some(message::error_answer(&query, ResponseCode::Refused));
    };
    let workload = original.local_identity;
    if shared.only_policy_names && !shared.learned.in_policy(workload, &[query.name.as_str()]) {
        count(shared, "refused");
        tracing::debug!(
            name = query.name,
            workload_identity = workload,
            "DNS proxy: a name the workload's policy does not name is refused (dns.onlyPolicyNames)"
        );
        return Some(message::error_answer(&query, ResponseCode::Refused));
    }
    let resolver = original_destination(&original);
    let forwarded = tokio::time::timeout(
        UPSTREAM_TIMEOUT,
        forward(bytes, &query, resolver, place, upstream),
    )
    .await
    .unwrap_or_else(|_| {
        Err(format!(
            "no answer from {resolver} within {UPSTREAM_TIMEOUT:?}"
        ))
    });
    let (raw, answer) = match forwarded {
        Ok(forwarded) => forwarded,
        Err(why) => {
            count(shared, "failed");
            tracing::debug!(name = query.name, %resolver, reason = why, "DNS proxy: the resolver gave no usable answer");
            if let Upstream::Tcp(connection) = upstream {
                *connection = None;
            }
            return Some(message::error_answer(&query, ResponseCode::ServFail));
        }
    };
    if !answer.addresses.is_empty() && message::asks_addresses(&query) {
        match shared
            .learned
            .learn(workload, &answer.chain, &answer.addresses)
        {
            Ok(Learnt::Addresses { count, ttl }) => tracing::debug!(
                name = query.name,
                chain = ?answer.chain,
                workload_identity = workload,
                addresses = count,
                ttl_s = ttl.as_secs(),
                "DNS proxy: learned"
            ),
            Ok(Learnt::NotInPolicy) => {}
            Err(e) => {
                // Never an answer whose addresses the kernel does not hold.
                count(shared, "failed");
                tracing::warn!(name = query.name, error = %e, "DNS proxy: installing the answer's addresses failed; SERVFAIL");
                return Some(message::error_answer(&query, ResponseCode::ServFail));
            }
        }
    }
    count(shared, "forwarded");
    Some(raw)
}

/// Sends the query as it came to `resolver` and waits for its answer (others are ignored).
async fn forward(
    bytes: &[u8],
    query: &message::Query,
    resolver: SocketAddr,
    place: &Place,
    upstream: &mut Upstream,
) -> Result<(Vec<u8>, message::Answer), String> {
    match upstream {
        Upstream::Udp => {
            let socket = udp_socket(place, resolver).map_err(|e| format!("socket: {e}"))?;
            socket
                .connect(resolver)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            socket.send(bytes).await.map_err(|e| format!("send: {e}"))?;
            let mut buf = vec![0u8; MAX_MESSAGE];
            loop {
                let n = socket
                    .recv(&mut buf)
                    .await
                    .map_err(|e| format!("receive: {e}"))?;
                if let Some(answer) = message::parse_answer(query, &buf[..n])? {
                    return Ok((buf[..n].to_vec(), answer));
                }
            }
        }
        Upstream::Tcp(connection) => {
            // A connection kept from an earlier query may have been closed by the resolver
            // (RFC 7766 lets it): then once more on a new one.
            let kept = connection.as_ref().is_some_and(|(to, _)| *to == resolver);
            if kept {
                let (_, stream) = connection.as_mut().expect("kept");
                if let Ok(answered) = exchange_tcp(stream, bytes, query).await {
                    return Ok(answered);
                }
            }
            *connection = None;
            let mut stream = tcp_connect(place, resolver)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let answered = exchange_tcp(&mut stream, bytes, query).await?;
            *connection = Some((resolver, stream));
            Ok(answered)
        }
    }
}

/// One query and its answer on a TCP connection to the resolver.
async fn exchange_tcp(
    stream: &mut TcpStream,
    bytes: &[u8],
    query: &message::Query,
) -> Result<(Vec<u8>, message::Answer), String> {
    write_framed(stream, bytes)
        .await
        .map_err(|e| format!("send: {e}"))?;
    loop {
        let message = read_framed(stream)
            .await
            .map_err(|e| format!("receive: {e}"))?
            .ok_or("the resolver closed the connection")?;
        if let Some(answer) = message::parse_answer(query, &message)? {
            return Ok((message, answer));
        }
    }
}

/// Runs `make` in the place's namespace (a pod's), or here.
fn in_place<T: Send>(place: &Place, make: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    match &place.netns {
        Some(ns) => ns.run(make),
        None => make(),
    }
}

fn udp_socket(place: &Place, resolver: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = if resolver.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = in_place(place, || std::net::UdpSocket::bind(any))?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

async fn tcp_connect(place: &Place, resolver: SocketAddr) -> io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(resolver);
    let socket = in_place(place, || {
        socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
    })?;
    socket.set_nonblocking(true)?;
    tokio::net::TcpSocket::from_std_stream(socket.into())
        .connect(resolver)
        .await
}
