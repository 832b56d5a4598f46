//! One agent's stream: the xDS-style exchange of updates, ACKs and NACKs, and the agent's reports.
//!
//! At most one batch is in flight per stream: the next is computed from what the agent has ACKed
//! once the previous one is answered. A version an agent NACKed alone is not sent to it again;
//! it receives the next version instead. A NACK of a batch of several types does not tell which
//! type was at fault, so the types are then sent one at a time until each is answered alone.
use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use futures_util::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tonic::Status;
use ward_proto::{agent_message::Kind, AgentMessage, ResourceType, ServerMessage, Update};

use crate::{
    ca::PeerNode,
    hub::Hub,
    limits::{self, TokenBucket},
    resources::Delta,
};

struct InFlight {
    nonce: String,
    versions: BTreeMap<ResourceType, String>,
    size: usize,
}

/// Splits a batch into messages of about [`limits::CHUNK_BYTES`]; all but the last have `more`.
pub fn chunk(
    batch: &[(ResourceType, Delta)],
    nonce: &str,
    chunk_bytes: usize,
) -> Vec<ServerMessage> {
    let mut messages = Vec::new();
    let mut current = ServerMessage::default();
    let mut size = 0usize;
    let header = |kind: ResourceType, delta: &Delta| Update {
        r#type: kind as i32,
        version: delta.version.clone(),
        nonce: nonce.into(),
        base_version: delta.base_version.clone(),
        replace: delta.replace,
        resources: Vec::new(),
        removed: Vec::new(),
    };
    for (kind, delta) in batch {
        current.updates.push(header(*kind, delta));
        let mut flush = |current: &mut ServerMessage, size: &mut usize| {
            let mut full = std::mem::take(current);
            full.more = true;
            messages.push(full);
            current.updates.push(header(*kind, delta));
            *size = 0;
        };
        for resource in &delta.resources {
            let len = prost::Message::encoded_len(resource.as_ref()) + 8;
            if size > 0 && size + len > chunk_bytes {
                flush(&mut current, &mut size);
            }
            let update = current.updates.last_mut().expect("an update is open");
            update.resources.push(resource.as_ref().clone());
            size += len;
        }
        for name in &delta.removed {
            let len = name.len() + 4;
            if size > 0 && size + len > chunk_bytes {
                flush(&mut current, &mut size);
            }
            let update = current.updates.last_mut().expect("an update is open");
            update.removed.push(name.clone());
            size += len;
        }
    }
    messages.push(current);
    messages
}

/// Why a replica cut off from the shared store ends or refuses a stream.
const CUT_OFF: &str =
    "this control plane replica cannot reach its shared store; another replica serves";

pub struct Session {
    hub: Arc<Hub>,
    peer: PeerNode,
    out: mpsc::Sender<Result<ServerMessage, Status>>,
    acked: BTreeMap<ResourceType, Option<String>>,
    nacked: BTreeMap<ResourceType, String>,
    isolate: bool,
    in_flight: Option<InFlight>,
    nonce: u64,
    bucket: TokenBucket,
    chunk_bytes: usize,
}

fn kind_of(raw: i32) -> Result<ResourceType, Status> {
    match ResourceType::try_from(raw) {
        Ok(ResourceType::Unspecified) | Err(_) => Err(Status::invalid_argument(format!(
            "unknown resource type {raw}"
        ))),
        Ok(kind) => Ok(kind),
    }
}

/// Checks `Hello.tunnel_address`: empty (no tunnel), or `ip:port` with an IP literal (IPv6 in
/// brackets) and a port from 1 to 65535. Anything else refuses the stream.
pub fn check_tunnel_address(address: &str) -> Result<(), Status> {
    if address.is_empty() {
        return Ok(());
    }
    match address.parse::<std::net::SocketAddr>() {
        Ok(parsed) if parsed.port() != 0 => Ok(()),
        _ => Err(Status::invalid_argument(format!(
            "Hello.tunnel_address {:?} is not an IP address and port (1-65535), such as \
             10.0.0.1:4430 or [fd00::1]:4430",
            limits::truncate(address, 120)
        ))),
    }
}

impl Session {
    pub fn new(
        hub: Arc<Hub>,
        peer: PeerNode,
        out: mpsc::Sender<Result<ServerMessage, Status>>,
    ) -> Self {
        Session {
            hub,
            peer,
            out,
            acked: BTreeMap::new(),
            nacked: BTreeMap::new(),
            isolate: false,
            in_flight: None,
            nonce: 0,
            bucket: TokenBucket::new(
                limits::AGENT_MESSAGE_BURST,
                limits::AGENT_MESSAGES_PER_SECOND,
            ),
            chunk_bytes: limits::CHUNK_BYTES,
        }
    }

    #[cfg(test)]
    fn with_chunk_bytes(mut self, chunk_bytes: usize) -> Self {
        self.chunk_bytes = chunk_bytes;
        self
    }

    /// Serves the stream until the agent closes it (`Ok`) or it must be ended with a status.
    pub async fn run<S>(mut self, mut inbound: S) -> Result<(), Status>
    where
        S: Stream<Item = Result<AgentMessage, Status>> + Unpin,
    {
        let node = self.peer.node.clone();
        let hello = match tokio::time::timeout(limits::HELLO_TIMEOUT, inbound.next()).await {
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 10 s")),
            Ok(None) => return Ok(()),
            Ok(Some(Err(status))) => return Err(status),
            Ok(Some(Ok(AgentMessage {
                kind: Some(Kind::Hello(hello)),
            }))) => hello,
            Ok(Some(Ok(_))) => {
                return Err(Status::invalid_argument(
                    "the first message must be a Hello",
                ))
            }
        };
        if hello.node != node {
            return Err(Status::permission_denied(format!(
                "this certificate speaks for node {node:?}, not {:?}",
                limits::truncate(&hello.node, 253)
            )));
        }
        check_tunnel_address(&hello.tunnel_address)?;
        if self.hub.is_cut_off() {
            return Err(Status::unavailable(CUT_OFF));
        }
        for held in hello.versions.iter().take(ResourceType::ALL.len()) {
            let kind = kind_of(held.r#type)?;
            let version = (held.version.len() <= limits::MAX_VERSION_LEN
                && !held.version.is_empty())
            .then(|| held.version.clone());
            self.acked.insert(kind, version);
        }
        tracing::info!(
            node,
            agent_version = limits::truncate(&hello.agent_version, 64),
            tunnel = hello.tunnel_address,
            held = ?self.acked.iter().map(|(k, v)| (k.short_name(), v.as_deref().unwrap_or("-"))).collect::<Vec<_>>(),
            "agent connected"
        );
        let hub = self.hub.clone();
        let guard = hub.register_session(&node);
        hub.note_enforced(
            &node,
            self.acked.get(&ResourceType::Policy).cloned().flatten(),
        );
        if hub.set_tunnel(&node, &hello.tunnel_address) {
            tracing::info!(
                node,
                tunnel = hello.tunnel_address,
                "tunnel address changed; the node's IP cache entries follow"
            );
        }
        // The agent reports its workloads right after its Hello: registering them before the
        // first update means an agent that moved from another replica (or a restarted control
        // plane) is never sent a state without its own workloads.
        match tokio::time::timeout(limits::FIRST_REPORT_WAIT, inbound.next()).await {
            Err(_) => {}
            Ok(None) => return Ok(()),
            Ok(Some(Err(status))) => return Err(status),
            Ok(Some(Ok(message))) => self.handle(message).await?,
        }
        let mut replaced = guard.replaced.clone();
        let mut changes = self.hub.subscribe();
        let expiry = self
            .peer
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let expired = tokio::time::sleep(expiry);
        tokio::pin!(expired);
        loop {
            if hub.node_revoked(&node) {
                return Err(Status::permission_denied(crate::service::REVOKED_NODE));
            }
            if self.in_flight.is_none() {
                changes.mark_unchanged();
                self.send_next().await?;
            }
            tokio::select! {
                message = inbound.next() => match message {
                    None => return Ok(()),
                    Some(Err(status)) => return Err(status),
                    Some(Ok(message)) => self.handle(message).await?,
                },
                // Also while an update is in flight: what is pending is sent after its answer
                // anyway, and a change may be the node's revocation.
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Err(Status::unavailable("control plane shutting down"));
                    }
                }
                _ = replaced.changed() => {
                    return Err(Status::aborted("replaced by a newer stream from the same node"));
                }
                () = hub.closed() => {
                    return Err(Status::unavailable("control plane shutting down"));
                }
                () = hub.cut_off() => {
                    return Err(Status::unavailable(CUT_OFF));
                }
                () = &mut expired => {
                    return Err(Status::unauthenticated("client certificate expired; renew it and reconnect"));
                }
            }
        }
    }

    async fn send_next(&mut self) -> Result<(), Status> {
        let mut batch: Vec<(ResourceType, Delta)> = self
            .hub
            .deltas(&self.peer.node, &self.acked)
            .into_iter()
            .filter(|(kind, delta)| self.nacked.get(kind) != Some(&delta.version))
            .collect();
        if batch.is_empty() {
            self.isolate = false;
            return Ok(());
        }
        if self.isolate {
            batch.truncate(1);
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let messages = chunk(&batch, &nonce, self.chunk_bytes);
        tracing::debug!(
            node = self.peer.node,
            nonce,
            messages = messages.len(),
            types = ?batch.iter().map(|(k, d)| (k.short_name(), d.resources.len(), d.removed.len(), d.replace)).collect::<Vec<_>>(),
            "sending update"
        );
        self.in_flight = Some(InFlight {
            nonce,
            size: batch.len(),
            versions: batch.into_iter().map(|(k, d)| (k, d.version)).collect(),
        });
        for message in messages {
            if self.out.send(Ok(message)).await.is_err() {
                return Err(Status::cancelled("agent went away"));
            }
        }
        Ok(())
    }

    async fn handle(&mut self, message: AgentMessage) -> Result<(), Status> {
        let node = self.peer.node.clone();
        if !self.bucket.try_take() {
            tracing::warn!(
                node,
                "closing the stream: the agent sends more than {} messages a second",
                limits::AGENT_MESSAGES_PER_SECOND
            );
            return Err(Status::resource_exhausted("too many messages; slow down"));
        }
        match message.kind {
            None => Err(Status::invalid_argument("empty message")),
            Some(Kind::Hello(_)) => Err(Status::invalid_argument("Hello sent twice")),
            Some(Kind::Ack(ack)) => {
                let kind = kind_of(ack.r#type)?;
                let Some(flight) = self.answered(kind, &ack.nonce, &ack.version) else {
                    tracing::debug!(
                        node,
                        kind = kind.short_name(),
                        nonce = ack.nonce,
                        "stale ACK ignored"
                    );
                    return Ok(());
                };
                tracing::debug!(node, kind = kind.short_name(), version = ack.version, "ACK");
                if kind == ResourceType::Policy {
                    self.hub.note_enforced(&node, Some(ack.version.clone()));
                }
                self.acked.insert(kind, Some(ack.version));
                self.nacked.remove(&kind);
                self.finish(flight);
                Ok(())
            }
            Some(Kind::Nack(nack)) => {
                let kind = kind_of(nack.r#type)?;
                let Some(flight) = self.in_flight.as_ref() else {
                    tracing::debug!(node, kind = kind.short_name(), "stale NACK ignored");
                    return Ok(());
                };
                let Some(refused) = flight
                    .versions
                    .get(&kind)
                    .cloned()
                    .filter(|_| flight.nonce == nack.nonce)
                else {
                    tracing::debug!(
                        node,
                        kind = kind.short_name(),
                        nonce = nack.nonce,
                        "stale NACK ignored"
                    );
                    return Ok(());
                };
                let alone = flight.size == 1;
                tracing::warn!(
                    node,
                    kind = kind.short_name(),
                    refused_version = refused,
                    kept_version = limits::truncate(&nack.version, limits::MAX_VERSION_LEN),
                    error = limits::truncate(&nack.error, limits::MAX_LOGGED_ERROR),
                    "agent refused an update (NACK); it keeps what it had"
                );
                if alone {
                    self.nacked.insert(kind, refused);
                } else {
                    self.isolate = true;
                }
                let flight = self.in_flight.as_mut().expect("checked above");
                flight.versions.remove(&kind);
                if flight.versions.is_empty() {
                    self.in_flight = None;
                }
                Ok(())
            }
            Some(Kind::Report(report)) => {
                if report.node != node {
                    tracing::warn!(
                        node,
                        reported_for = limits::truncate(&report.node, 253),
                        "closing the stream: the agent reported workloads of another node"
                    );
                    return Err(Status::permission_denied(format!(
                        "this certificate speaks for node {node:?} only"
                    )));
                }
                let count = report.workloads.len();
                if let Err(e) = self.hub.allocate_shared(&report.workloads).await {
                    tracing::warn!(node, error = %e, "closing the stream: no identities from the shared store");
                    return Err(Status::unavailable(format!(
                        "the control plane's shared store: {e}"
                    )));
                }
                match self.hub.report(&node, report.workloads) {
                    Err(e) => {
                        tracing::warn!(node, error = %e, "closing the stream: report refused");
                        Err(Status::invalid_argument(format!("report refused: {e}")))
                    }
                    Ok(refusals) => {
                        for refusal in refusals.iter().take(10) {
                            tracing::warn!(
                                node,
                                workload = refusal.workload,
                                reason = refusal.reason,
                                "reported workload refused"
                            );
                        }
                        if refusals.len() > 10 {
                            tracing::warn!(
                                node,
                                more = refusals.len() - 10,
                                "more reported workloads refused"
                            );
                        }
                        tracing::info!(
                            node,
                            workloads = count,
                            refused = refusals.len(),
                            "report received"
                        );
                        Ok(())
                    }
                }
            }
        }
    }

    /// The in-flight batch if `nonce` and `version` answer its update of `kind`.
    fn answered(&mut self, kind: ResourceType, nonce: &str, version: &str) -> Option<ResourceType> {
        let flight = self.in_flight.as_ref()?;
        (flight.nonce == nonce && flight.versions.get(&kind).map(String::as_str) == Some(version))
            .then_some(kind)
    }

    fn finish(&mut self, kind: ResourceType) {
        if let Some(flight) = self.in_flight.as_mut() {
            flight.versions.remove(&kind);
            if flight.versions.is_empty() {
                self.in_flight = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::registry::Registry;
    use ward_proto::{
        resource::Body, Ack, Hello, Nack, Policy, Report, Resource, TypeVersion, Workload,
    };

    /// POLICY resources whose text the session does not look at.
    fn policies(items: &[(&str, &str)]) -> crate::policy_set::ReadSet {
        let resources = items
            .iter()
            .map(|(n, y)| {
                let r = Resource {
                    name: (*n).into(),
                    body: Some(Body::Policy(Policy {
                        yaml: (*y).into(),
                        source: String::new(),
                    })),
                };
                ((*n).to_string(), r)
            })
            .collect();
        crate::policy_set::ReadSet {
            resources,
            ..Default::default()
        }
    }

    fn peer(node: &str) -> PeerNode {
        PeerNode {
            node: node.into(),
            not_before: SystemTime::now(),
            not_after: SystemTime::now() + Duration::from_secs(3600),
        }
    }

    fn hello(node: &str, versions: &[(ResourceType, &str)]) -> AgentMessage {
        hello_with_tunnel(node, versions, "")
    }

    fn hello_with_tunnel(
        node: &str,
        versions: &[(ResourceType, &str)],
        tunnel: &str,
    ) -> AgentMessage {
        AgentMessage {
            kind: Some(Kind::Hello(Hello {
                node: node.into(),
                versions: versions
                    .iter()
                    .map(|(k, v)| TypeVersion {
                        r#type: *k as i32,
                        version: (*v).into(),
                    })
                    .collect(),
                agent_version: "test".into(),
                tunnel_address: tunnel.into(),
            })),
        }
    }

    fn ack(update: &Update) -> AgentMessage {
        AgentMessage {
            kind: Some(Kind::Ack(Ack {
                r#type: update.r#type,
                version: update.version.clone(),
                nonce: update.nonce.clone(),
            })),
        }
    }

    fn nack(update: &Update) -> AgentMessage {
        AgentMessage {
            kind: Some(Kind::Nack(Nack {
                r#type: update.r#type,
                version: String::new(),
                nonce: update.nonce.clone(),
                error: "policy web: bad selector".into(),
            })),
        }
    }

    /// A session running against channels, as a test agent sees it.
    struct Agent {
        to_server: mpsc::Sender<Result<AgentMessage, Status>>,
        from_server: mpsc::Receiver<Result<ServerMessage, Status>>,
        task: tokio::task::JoinHandle<Result<(), Status>>,
    }

    impl Agent {
        fn start(hub: &Arc<Hub>, node: &str, chunk_bytes: usize) -> Agent {
            let (to_server, inbound) = mpsc::channel(16);
            let (out, from_server) = mpsc::channel(16);
            let session = Session::new(hub.clone(), peer(node), out).with_chunk_bytes(chunk_bytes);
            let task =
                tokio::spawn(session.run(tokio_stream::wrappers::ReceiverStream::new(inbound)));
            Agent {
                to_server,
                from_server,
                task,
            }
        }

        async fn send(&self, message: AgentMessage) {
            self.to_server
                .send(Ok(message))
                .await
                .expect("session alive");
        }

        /// Receives one whole batch (following `more`).
        async fn batch(&mut self) -> Vec<ServerMessage> {
            let mut messages = Vec::new();
            loop {
                let message = tokio::time::timeout(Duration::from_secs(5), self.from_server.recv())
                    .await
                    .expect("a batch within 5 s")
                    .expect("session alive")
                    .expect("not an error status");
                let more = message.more;
                messages.push(message);
                if !more {
                    return messages;
                }
            }
        }

        async fn nothing_for_a_while(&mut self) {
            let got =
                tokio::time::timeout(Duration::from_millis(200), self.from_server.recv()).await;
            assert!(got.is_err(), "expected silence, got {got:?}");
        }

        async fn ended_with(self) -> Status {
            drop(self.to_server);
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("session ends")
                .expect("no panic")
                .expect_err("an error status")
        }
    }

    fn hub_with_policy() -> Arc<Hub> {
        let hub = Arc::new(Hub::new(Registry::new("example.org"), "CA PEM", 9));
        hub.set_policies(policies(&[("a", "1"), ("b", "1")]));
        hub
    }

    fn updates(batch: &[ServerMessage]) -> Vec<&Update> {
        batch.iter().flat_map(|m| m.updates.iter()).collect()
    }

    #[tokio::test]
    async fn new_agent_gets_everything_then_only_changes_after_its_ack() {
        let hub = hub_with_policy();
        let mut agent = Agent::start(&hub, "n1", limits::CHUNK_BYTES);
        agent.send(hello("n1", &[])).await;
        let batch = agent.batch().await;
        let all = updates(&batch);
        assert_eq!(all.len(), 4, "trust bundle, identity, ip cache, policy");
        assert!(all.iter().all(|u| u.replace));
        hub.set_policies(policies(&[("a", "2"), ("b", "1")]));
        agent.nothing_for_a_while().await;
        for u in &all {
            agent.send(ack(u)).await;
        }
        let next = agent.batch().await;
        let next = updates(&next);
        assert_eq!(next.len(), 1);
        assert!(!next[0].replace);
        assert_eq!(next[0].resources.len(), 1, "only a changed");
        assert_eq!(next[0].resources[0].name, "a");
    }

    #[tokio::test]
    async fn services_reach_the_agent_and_then_only_their_changes() {
        let hub = hub_with_policy();
        let service = |backend: &str| {
            let resource = Resource {
                name: "shop/web".into(),
                body: Some(Body::Service(ward_proto::Service {
                    namespace: "shop".into(),
                    name: "web".into(),
                    cluster_ips: vec!["10.96.0.10".into()],
                    ports: vec![ward_proto::ServicePort {
                        name: String::new(),
                        port: 80,
                        protocol: "TCP".into(),
                        backends: vec![ward_proto::ServiceBackend {
                            address: backend.into(),
                            port: 8080,
                            pod: "shop/web-0".into(),
                        }],
                    }],
                    client_ip_affinity: false,
                })),
            };
            std::collections::BTreeMap::from([("shop/web".to_string(), resource)])
        };
        hub.set_services(service("10.1.0.5"));
        let mut agent = Agent::start(&hub, "n1", limits::CHUNK_BYTES);
        agent.send(hello("n1", &[])).await;
        let batch = agent.batch().await;
        let all = updates(&batch);
        let services: Vec<&&Update> = all
            .iter()
            .filter(|u| u.r#type == ResourceType::Service as i32)
            .collect();
        assert_eq!(services.len(), 1, "{all:?}");
        assert_eq!(services[0].resources[0].name, "shop/web");
        for u in &all {
            agent.send(ack(u)).await;
        }
        hub.set_services(service("10.1.0.6"));
        let next = agent.batch().await;
        let next = updates(&next);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].r#type, ResourceType::Service as i32);
        assert!(!next[0].replace, "a difference");
        let Some(Body::Service(web)) = &next[0].resources[0].body else {
            panic!("a Service: {:?}", next[0])
        };
        assert_eq!(web.ports[0].backends[0].address, "10.1.0.6");
    }

    #[tokio::test]
    async fn reconnecting_agent_with_current_versions_gets_nothing() {
        let hub = hub_with_policy();
        // No WORKLOAD type: this control plane reads no cluster.
        let held: Vec<(ResourceType, String)> = ResourceType::ALL
            .into_iter()
            .filter_map(|k| Some((k, hub.version(k)?.to_string())))
            .collect();
        assert_eq!(held.len(), 4);
        let held: Vec<(ResourceType, &str)> = held.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut agent = Agent::start(&hub, "n1", limits::CHUNK_BYTES);
        agent.send(hello("n1", &held)).await;
        agent.nothing_for_a_while().await;
    }

    #[tokio::test]
    async fn a_nacked_version_is_not_resent_but_the_next_one_is() {
        let hub = hub_with_policy();
        let held: Vec<(ResourceType, String)> = [
            ResourceType::TrustBundle,
            ResourceType::Identity,
            ResourceType::Ipcache,
        ]
        .into_iter()
        .map(|k| (k, hub.version(k).expect("ready").to_string()))
        .collect();
        let held: Vec<(ResourceType, &str)> = held.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut agent = Agent::start(&hub, "n1", limits::CHUNK_BYTES);
        agent.send(hello("n1", &held)).await;
        let batch = agent.batch().await;
        let policy = updates(&batch)[0].clone();
        assert_eq!(policy.r#type, ResourceType::Policy as i32);
        agent.send(nack(&policy)).await;
        agent.nothing_for_a_while().await;
        hub.set_policies(policies(&[("a", "fixed")]));
        let batch = agent.batch().await;
        let fixed = updates(&batch)[0];
        assert!(fixed.replace, "still relative to nothing held: {fixed:?}");
        assert_eq!(fixed.resources.len(), 1);
    }

    #[tokio::test]
    async fn a_nacked_batch_of_several_types_is_retried_one_type_at_a_time() {
        let hub = hub_with_policy();
        let mut agent = Agent::start(&hub, "n1", limits::CHUNK_BYTES);
        agent.send(hello("n1", &[])).await;
        let batch = agent.batch().await;
        for u in updates(&batch) {
            agent.send(nack(u)).await;
        }
        let mut seen = Vec::new();
        for _ in 0..4 {
            let batch = agent.batch().await;
            let all = updates(&batch);
            assert_eq!(all.len(), 1, "one type at a time");
            seen.push(all[0].r#type);
            if all[0].r#type == ResourceType::Policy as i32 {
                agent.send(nack(all[0])).await;
            } else {
                agent.send(ack(all[0])).await;
            }
        }
        agent.nothing_for_a_while().await;
        seen.sort_unstable();
        assert_eq!(seen, [1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn stale_or_forged_answers_are_ignored() {
        let hub = hub_with_policy();
        let mut agent = Agent::start(&hub, "n1", limits::CHUNK_BYTES);
        agent.send(hello("n1", &[])).await;
        let batch = agent.batch().await;
        let mut forged = updates(&batch)[0].clone();
        forged.nonce = "999".into();
        agent.send(ack(&forged)).await;
        agent.send(nack(&forged)).await;
        agent.nothing_for_a_while().await;
        for u in updates(&batch) {
            agent.send(ack(u)).await;
        }
        agent.nothing_for_a_while().await;
    }

    #[tokio::test]
    async fn large_batches_are_split_and_marked() {
        let hub = Arc::new(Hub::new(Registry::new("example.org"), "CA PEM", 9));
        let big = "x".repeat(100);
        let names: Vec<String> = (0..50).map(|i| format!("p{i:02}")).collect();
        let items: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), big.as_str())).collect();
        hub.set_policies(policies(&items));
        let mut agent = Agent::start(&hub, "n1", 1000);
        agent.send(hello("n1", &[])).await;
        let batch = agent.batch().await;
        assert!(batch.len() > 4, "{} messages", batch.len());
        assert!(batch.iter().all(|m| prost::Message::encoded_len(m) < 2000));
        let policy_resources: usize = updates(&batch)
            .iter()
            .filter(|u| u.r#type == ResourceType::Policy as i32)
            .map(|u| u.resources.len())
            .sum();
        assert_eq!(policy_resources, 50);
    }

    #[tokio::test]
    async fn hello_for_another_node_is_refused() {
        let hub = hub_with_policy();
        let agent = Agent::start(&hub, "n1", limits::CHUNK_BYTES);
        agent.send(hello("n2", &[])).await;
        let status = agent.ended_with().await;
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    }

    #[tokio::test]
    async fn report_for_another_node_closes_the_stream() {
        let hub = hub_with_policy();
        let mut agent = Agent::start(&hub, "n1", limits::CHUNK_BYTES);
        agent.send(hello("n1", &[])).await;
        agent.batch().await;
        agent
            .send(AgentMessage {
                kind: Some(Kind::Report(Report {
                    node: "n2".into(),
                    workloads: vec![Workload {
                        name: "w".into(),
                        spiffe_id: "spiffe://example.org/w".into(),
                        ..Workload::default()
                    }],
                })),
            })
            .await;
        let status = agent.ended_with().await;
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(hub.len(ResourceType::Identity), 0, "nothing registered");
    }

    #[tokio::test]
    async fn a_nack_storm_closes_only_that_stream() {
        let hub = hub_with_policy();
        let mut calm = Agent::start(&hub, "calm", limits::CHUNK_BYTES);
        calm.send(hello("calm", &[])).await;
        for u in updates(&calm.batch().await) {
            calm.send(ack(u)).await;
        }
        let mut storm = Agent::start(&hub, "storm", limits::CHUNK_BYTES);
        storm.send(hello("storm", &[])).await;
        let batch = storm.batch().await;
        let first = updates(&batch)[0].clone();
        let mut closed = None;
        for _ in 0..(limits::AGENT_MESSAGE_BURST as usize + 50) {
            if storm.to_server.send(Ok(nack(&first))).await.is_err() {
                break;
            }
            if storm.task.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        // Drain whatever the storm caused, then look at how the stream ended.
        while let Ok(Some(item)) =
            tokio::time::timeout(Duration::from_secs(2), storm.from_server.recv()).await
        {
            if let Err(status) = item {
                closed = Some(status);
            }
        }
        let status = match closed {
            Some(status) => status,
            None => storm.ended_with().await,
        };
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            !calm.task.is_finished(),
            "the calm agent's stream is untouched"
        );
        hub.set_policies(policies(&[("c", "1")]));
        let next = calm.batch().await;
        assert_eq!(updates(&next)[0].resources[0].name, "c", "and still served");
    }

    #[test]
    fn tunnel_addresses_are_ip_and_port_or_nothing() {
        for good in ["", "10.0.0.1:4430", "[fd00::1]:4430", "127.0.0.1:65535"] {
            assert!(check_tunnel_address(good).is_ok(), "{good:?}");
        }
        for bad in [
            "10.0.0.1",
            "10.0.0.1:0",
            "10.0.0.1:65536",
            "node-a:4430",
            "fd00::1:4430",
            " 10.0.0.1:4430",
            "10.0.0.1:4430\n",
        ] {
            let status = check_tunnel_address(bad).expect_err(bad);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(
                status.message().contains("tunnel_address")
                    && status.message().contains(&format!("{bad:?}")),
                "{status:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_bad_tunnel_address_refuses_the_stream() {
        let hub = hub_with_policy();
        let agent = Agent::start(&hub, "n1", limits::CHUNK_BYTES);
        agent
            .send(hello_with_tunnel("n1", &[], "not-an-address"))
            .await;
        let status = agent.ended_with().await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("not-an-address"), "{status:?}");
        assert_eq!(hub.sessions(), 0, "never registered");
    }

    #[tokio::test]
    async fn a_new_tunnel_address_reaches_other_agents_as_an_ip_cache_difference() {
        let hub = hub_with_policy();
        let workload = |name: &str, address: &str| Workload {
            name: name.into(),
            spiffe_id: format!("spiffe://example.org/{name}"),
            addresses: vec![address.into()],
            ..Workload::default()
        };
        hub.report("n2", vec![workload("db", "10.0.0.2")])
            .expect("report");
        let mut watcher = Agent::start(&hub, "n1", limits::CHUNK_BYTES);
        watcher.send(hello("n1", &[])).await;
        for u in updates(&watcher.batch().await) {
            watcher.send(ack(u)).await;
        }
        let tunnel_of = |batch: &[ServerMessage]| -> Vec<(String, String, String)> {
            updates(batch)
                .iter()
                .filter(|u| u.r#type == ResourceType::Ipcache as i32)
                .flat_map(|u| &u.resources)
                .map(|r| match &r.body {
                    Some(Body::Ipcache(e)) => (e.address.clone(), e.node.clone(), e.tunnel.clone()),
                    other => panic!("not an IP cache entry: {other:?}"),
                })
                .collect()
        };

        let n2 = Agent::start(&hub, "n2", limits::CHUNK_BYTES);
        n2.send(hello_with_tunnel("n2", &[], "10.0.0.20:4430"))
            .await;
        let batch = watcher.batch().await;
        assert!(
            updates(&batch).iter().all(|u| !u.replace),
            "a difference, not the whole set"
        );
        assert_eq!(
            tunnel_of(&batch),
            [("10.0.0.2".into(), "n2".into(), "10.0.0.20:4430".into())]
        );
        for u in updates(&batch) {
            watcher.send(ack(u)).await;
        }
        drop(n2);

        // Reconnecting with the same address changes nothing; with another, the entries follow.
        let n2 = Agent::start(&hub, "n2", limits::CHUNK_BYTES);
        n2.send(hello_with_tunnel("n2", &[], "10.0.0.20:4430"))
            .await;
        watcher.nothing_for_a_while().await;
        drop(n2);
        let n2 = Agent::start(&hub, "n2", limits::CHUNK_BYTES);
        n2.send(hello_with_tunnel("n2", &[], "[fd00::20]:4431"))
            .await;
        let batch = watcher.batch().await;
        assert_eq!(
            tunnel_of(&batch),
            [("10.0.0.2".into(), "n2".into(), "[fd00::20]:4431".into())]
        );
        drop(n2);
    }

    #[test]
    fn chunks_keep_every_resource_and_removal_once() {
        let resources: Vec<Arc<Resource>> = (0..10)
            .map(|i| {
                Arc::new(Resource {
                    name: format!("r{i}"),
                    body: Some(Body::Policy(Policy {
                        yaml: "y".repeat(50),
                        source: String::new(),
                    })),
                })
            })
            .collect();
        let delta = Delta {
            version: "v".into(),
            base_version: "b".into(),
            replace: false,
            resources,
            removed: (0..30).map(|i| format!("gone{i}")).collect(),
        };
        let messages = chunk(&[(ResourceType::Policy, delta)], "7", 200);
        assert!(messages.len() > 3);
        assert!(messages[..messages.len() - 1].iter().all(|m| m.more));
        assert!(!messages.last().expect("one").more);
        let all: Vec<&Update> = messages.iter().flat_map(|m| &m.updates).collect();
        assert!(all
            .iter()
            .all(|u| u.nonce == "7" && u.version == "v" && u.base_version == "b"));
        assert_eq!(all.iter().map(|u| u.resources.len()).sum::<usize>(), 10);
        assert_eq!(all.iter().map(|u| u.removed.len()).sum::<usize>(), 30);
    }
}
