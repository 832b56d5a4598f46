//! The agent's mTLS tunnel (`tunnel:` in the configuration): runs `ward-tunnel`'s outbound and
//! inbound listeners for this node's workloads, keeps their certificates fresh through the
//! control plane, and answers the tunnel's questions from the agent's state: where a redirected
//! connection was going (the connect hook's map), which local workload an address is, and
//! whether a verified peer may reach it (the compiled ingress policy). Every refusal becomes a
//! flow record naming the reason, local workloads by name and remote ones by SPIFFE ID, as the
//! kernel's verdict records name them. Workloads in network namespaces of their own (pods) get
//! listeners inside them ([`pods`]).
mod pods;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex, RwLock},
};

use agent_common::{DIRECTION_EGRESS, DIRECTION_INGRESS, PROTO_TCP, VERDICT_DENY};
use anyhow::Context as _;
use tokio::{net::TcpListener, task::JoinHandle};
use ward_host::netns::{Netns, NetnsId};
use ward_tunnel::{
    Authorizer, Copied, DeliveryFuture, Denied, Inbound, InboundConfig, InboundEvent,
    OriginalDestinations, Outbound, OutboundConfig, OutboundRequest, Presenting, Serial, SpiffeId,
    SvidStore, TrustStore, TunnelError, Verdict,
};

use crate::{
    config::TunnelSettings,
    control::{ControlPlaneConfig, RemoteState, WorkloadSigner},
    events::SharedNames,
    flows::{FlowHub, FlowRecord},
    kernel::tunnel::{original_destination, TunnelMaps},
    placement::{self, Placement},
    policy::{self, Compiled, WorkloadInfo},
};

/// What the tunnel's tasks read of the agent's state; replaced whole at every apply.
#[derive(Default)]
struct View {
    compiled: Arc<Compiled>,
    /// Every identity the agent knows (this node's and the peers'), by SPIFFE ID (one ID may
    /// have several: its workloads' label sets differ) and by number.
    by_spiffe_id: HashMap<SpiffeId, Vec<u32>>,
    by_identity: HashMap<u32, SpiffeId>,
    /// This node's workloads by address: SPIFFE ID and identity.
    local: HashMap<IpAddr, (SpiffeId, u32)>,
    /// Every identity of this node's workloads (with or without an address), by SPIFFE ID.
    local_identities: Vec<(SpiffeId, u32)>,
    /// Address → the tunnel of the node that owns it.
    tunnels: HashMap<IpAddr, SocketAddr>,
}

/// The tunnel as the enforcer owns it.
pub struct Tunnel {
    settings: TunnelSettings,
    view: Arc<RwLock<View>>,
    svids: Arc<SvidStore>,
    trust: Arc<TrustStore>,
    outbound: Arc<Outbound>,
    signer: Arc<WorkloadSigner>,
    /// The renewal task of each local workload's certificate.
    renewals: BTreeMap<SpiffeId, JoinHandle<()>>,
    /// The trust bundle and revocations in force.
    bundle: (String, Vec<String>),
    /// The runtime the tunnel serves on, where renewals run too: [`Tunnel::update`] is called
    /// from the enforcer's thread.
    runtime: tokio::runtime::Handle,
    glue: Arc<Glue>,
    /// The agent's own network namespace; workloads elsewhere get listeners of their own.
    host_netns: NetnsId,
    pods: pods::Pods,
    /// Why opening a pod's listeners last failed, by namespace (logged once).
    failed: BTreeMap<NetnsId, String>,
}

/// The answers the tunnel asks of the agent, shared by its tasks.
struct Glue {
    view: Arc<RwLock<View>>,
    maps: Arc<Mutex<TunnelMaps>>,
    flows: Arc<FlowHub>,
    /// How verdict records name identities (local workloads by name, peers by SPIFFE ID).
    names: SharedNames,
    /// The network namespace of each address of a workload in a pod of its own: deliveries to
    /// it are made from inside.
    pod_netns: RwLock<HashMap<IpAddr, Arc<Netns>>>,
    /// The local identities the connect hook may redirect (their certificate is held), as the
    /// kernel has them.
    certified: Mutex<BTreeSet<u32>>,
}

impl Tunnel {
    /// Binds the listeners, points the connect hook at the outbound one and starts serving.
    pub async fn start(
        settings: TunnelSettings,
        control_plane: &ControlPlaneConfig,
        trust_domain: &str,
        pin_dir: &Path,
        flows: Arc<FlowHub>,
        names: SharedNames,
    ) -> anyhow::Result<Tunnel> {
        // Until the control plane sends its trust bundle, its CA file is the bundle: the same CA
        // signs node and workload certificates.
        let ca_pem = std::fs::read_to_string(&control_plane.ca_file)
            .with_context(|| format!("reading {}", control_plane.ca_file.display()))?;
        let roots = TrustStore::parse_pem_bundle(&ca_pem)
            .with_context(|| format!("{}", control_plane.ca_file.display()))?;
        let trust = TrustStore::new(trust_domain, &roots).context("tunnel trust")?;
        let svids = SvidStore::new();
        let view = Arc::new(RwLock::new(View::default()));
        let inbound_listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("tunnel.listen: binding {}", settings.listen))?;
        let outbound_v4 = TcpListener::bind(("127.0.0.1", settings.outbound_port))
            .await
            .with_context(|| {
                format!(
                    "tunnel.outboundPort: binding 127.0.0.1:{}",
                    settings.outbound_port
                )
            })?;
        let outbound_v6 = match TcpListener::bind(("::1", settings.outbound_port)).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::warn!(port = settings.outbound_port, error = %e, "no IPv6 loopback: IPv6 connections that need the tunnel will fail");
                None
            }
        };
        let maps = TunnelMaps::open(pin_dir)?;
        let glue = Arc::new(Glue {
            view: view.clone(),
            certified: Mutex::new(maps.certified().into_iter().collect()),
            maps: Arc::new(Mutex::new(maps)),
            flows,
            names,
            pod_netns: RwLock::default(),
        });
        // The connect hook redirects a workload only once its certificate is here.
        let mut changes = svids.changes();
        tokio::spawn({
            let (glue, svids) = (glue.clone(), svids.clone());
            async move {
                while changes.changed().await.is_ok() {
                    glue.sync_certified(&svids);
                }
            }
        });
        let inbound = Inbound::new(
            svids.clone(),
            trust.clone(),
            glue.clone(),
            InboundConfig::default(),
        )
        .context("tunnel inbound")?;
        tokio::spawn(inbound.serve(inbound_listener));
        let outbound = Outbound::new(svids.clone(), trust.clone(), OutboundConfig::default());
        for listener in std::iter::once(outbound_v4).chain(outbound_v6) {
            tokio::spawn(outbound.clone().serve(listener, glue.clone()));
        }
        glue.maps
            .lock()
            .expect("tunnel maps lock poisoned")
            .set_outbound(Some(settings.outbound_port))?;
        tracing::info!(listen = %settings.listen, advertise = %settings.advertise, outbound_port = settings.outbound_port, "mTLS tunnel serving");
        Ok(Tunnel {
            settings,
            view,
            svids,
            trust,
            outbound,
            signer: Arc::new(WorkloadSigner::new(control_plane.clone())),
            renewals: BTreeMap::new(),
            bundle: (ca_pem, Vec::new()),
            runtime: tokio::runtime::Handle::current(),
            glue,
            host_netns: Netns::current()
                .context("reading the agent's network namespace")?
                .id(),
            pods: pods::Pods::new(),
            failed: BTreeMap::new(),
        })
    }

    /// Takes in a newly applied state: workloads, peers, policy, the IP cache's tunnels, the
    /// trust bundle and revocations. Starts and stops certificate renewal with the workloads.
    pub fn update(
        &mut self,
        workloads: &[WorkloadInfo],
        peers: &[WorkloadInfo],
        compiled: Arc<Compiled>,
        remote: Option<&RemoteState>,
    ) {
        let mut view = View {
            compiled,
            ..View::default()
        };
        for w in peers.iter().chain(workloads) {
            if let Ok(id) = SpiffeId::parse(&w.spiffe_id) {
                if view.by_identity.insert(w.identity, id.clone()).is_none() {
                    view.by_spiffe_id.entry(id).or_default().push(w.identity);
                }
            }
        }
        let mut local_ids = Vec::new();
        for w in workloads {
            let Ok(id) = SpiffeId::parse(&w.spiffe_id) else {
                tracing::warn!(
                    workload = w.name,
                    spiffe_id = w.spiffe_id,
                    "not a valid SPIFFE ID: the tunnel cannot carry this workload's connections"
                );
                continue;
            };
            for a in &w.addresses {
                view.local
                    .insert(a.to_canonical(), (id.clone(), w.identity));
                view.tunnels
                    .insert(a.to_canonical(), self.settings.advertise);
            }
            view.local_identities.push((id.clone(), w.identity));
            local_ids.push(id);
        }
        if let Some(remote) = remote {
            for (address, tunnel) in &remote.tunnels {
                view.tunnels
                    .entry(address.to_canonical())
                    .or_insert(*tunnel);
            }
            self.update_trust(remote);
        }
        *self.view.write().expect("tunnel view lock poisoned") = view;
        self.glue.sync_certified(&self.svids);
        self.renewals.retain(|id, task| {
            let keep = local_ids.contains(id);
            if !keep {
                task.abort();
                self.svids.remove(id);
                self.outbound.forget_source(id);
                tracing::info!(spiffe_id = %id, "workload left: its certificate is dropped");
            }
            keep
        });
        for id in local_ids {
            let (svids, signer) = (self.svids.clone(), self.signer.clone());
            self.renewals.entry(id.clone()).or_insert_with(|| {
                self.runtime
                    .spawn(ward_tunnel::renewal::keep_fresh(svids, signer, id))
            });
        }
    }

    /// Opens and closes the listeners inside workloads' own network namespaces to match where
    /// their processes run now (`placements`: every local workload with its cgroups). Returns
    /// whether the set of workloads with listeners of their own changed (the control plane is
    /// told: peers reach those at their own addresses).
    pub fn place(&mut self, placements: &[Placement]) -> bool {
        let before = self.in_pod();
        let mut seen = BTreeSet::new();
        for placement in placements {
            let (found, netns) = placement::find(&placement.cgroups, self.host_netns);
            if found == placement::Found::Unknown {
                // Kept as they are until the workload can be looked at again.
                let kept = self
                    .pods
                    .iter()
                    .filter(|(_, pod)| pod.workload == placement.workload);
                seen.extend(kept.map(|(id, _)| *id));
                continue;
            }
            let (placement::Found::Pod(id), Some(netns)) = (found, netns) else {
                continue;
            };
            seen.insert(id);
            if self.pods.get(&id).is_some_and(|pod| pod.serves(placement)) {
                continue;
            }
            self.pods.remove(&id);
            match self.open_in_pod(placement, netns) {
                Ok(pod) => {
                    tracing::info!(workload = placement.workload, addresses = ?placement.addresses, outbound_port = self.settings.outbound_port, inbound_port = self.settings.listen.port(), "tunnel listeners opened in the workload's network namespace");
                    self.pods.insert(id, pod);
                }
                // Tried again at the next pass (an address the pod does not have yet, say);
                // logged as a warning once per namespace and reason, not at every pass.
                Err(e) => {
                    let error = format!("{e:#}");
                    if self.failed.get(&id) == Some(&error) {
                        tracing::debug!(
                            workload = placement.workload,
                            error,
                            "opening the tunnel's listeners in the workload's network namespace"
                        );
                    } else {
                        tracing::warn!(workload = placement.workload, error, "opening the tunnel's listeners in the workload's network namespace; trying again every pass");
                        self.failed.insert(id, error);
                    }
                }
            }
        }
        self.failed
            .retain(|id, _| seen.contains(id) && !self.pods.contains_key(id));
        self.pods.retain(|id, pod| {
            let keep = seen.contains(id);
            if !keep {
                tracing::info!(
                    workload = pod.workload,
                    "tunnel listeners in the workload's network namespace closed"
                );
            }
            keep
        });
        *self
            .glue
            .pod_netns
            .write()
            .expect("tunnel namespaces lock poisoned") = self
            .pods
            .values()
            .flat_map(|pod| {
                pod.addresses
                    .iter()
                    .map(|a| (a.to_canonical(), pod.netns.clone()))
            })
            .collect();
        self.in_pod() != before
    }

    /// The workloads with listeners of their own, with the port of their inbound listener.
    pub fn in_pod(&self) -> BTreeMap<String, u16> {
        let port = self.settings.listen.port();
        self.pods
            .values()
            .map(|pod| (pod.workload.clone(), port))
            .collect()
    }

    fn open_in_pod(&self, placement: &Placement, netns: Netns) -> anyhow::Result<pods::InPod> {
        let (outbound, inbound) = pods::bind(
            &netns,
            self.settings.outbound_port,
            self.settings.listen.port(),
            &placement.addresses,
        )?;
        let _entered = self.runtime.enter();
        let listener = TcpListener::from_std;
        let mut tasks = Vec::new();
        for l in outbound {
            let serve = self.outbound.clone().serve(listener(l)?, self.glue.clone());
            tasks.push(self.runtime.spawn(serve));
        }
        let inbound_side = Inbound::presenting(
            self.svids.clone(),
            self.trust.clone(),
            self.glue.clone(),
            InboundConfig::default(),
            Presenting::Workload(placement.spiffe_id.clone()),
        )
        .context("tunnel inbound")?;
        for l in inbound {
            tasks.push(self.runtime.spawn(inbound_side.clone().serve(listener(l)?)));
        }
        Ok(pods::InPod::new(placement, Arc::new(netns), tasks))
    }

    fn update_trust(&mut self, remote: &RemoteState) {
        let next = (remote.trust_bundle.clone(), remote.revoked_serials.clone());
        if next == self.bundle {
            return;
        }
        if !next.0.is_empty() && next.0 != self.bundle.0 {
            let replaced = TrustStore::parse_pem_bundle(&next.0)
                .map_err(|e| e.to_string())
                .and_then(|roots| self.trust.replace_bundle(&roots).map_err(|e| e.to_string()));
            if let Err(e) = replaced {
                tracing::error!(
                    error = e,
                    "the control plane's trust bundle is unusable; the previous one stays"
                );
                return;
            }
            tracing::info!("tunnel trust bundle replaced");
        }
        let serials: Vec<Serial> = next
            .1
            .iter()
            .filter_map(|s| Serial::from_hex(s).ok())
            .collect();
        if next.1 != self.bundle.1 {
            tracing::info!(revoked = serials.len(), "tunnel revocation list replaced");
        }
        // A revoked certificate of this node's own workloads is replaced at once.
        for (id, task) in &mut self.renewals {
            if self
                .svids
                .get(id)
                .is_some_and(|svid| serials.contains(svid.serial()))
            {
                tracing::warn!(spiffe_id = %id, "this workload's certificate was revoked; obtaining a new one");
                task.abort();
                self.svids.remove(id);
                self.outbound.forget_source(id);
                *task = self.runtime.spawn(ward_tunnel::renewal::keep_fresh(
                    self.svids.clone(),
                    self.signer.clone(),
                    id.clone(),
                ));
            }
        }
        self.trust.set_revoked(serials);
        // New connections handshake again under the new trust; open streams go on, and the
        // inbound side re-checks revocation on every stream.
        self.outbound.drop_sessions();
        self.bundle = next;
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        for task in self.renewals.values() {
            task.abort();
        }
    }
}

/// The route's source address towards `destination`, as a connect would pick it (no packet).
fn source_towards(destination: SocketAddr) -> std::io::Result<IpAddr> {
    let unspecified: SocketAddr = match destination {
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let probe = std::net::UdpSocket::bind(unspecified)?;
    probe.connect(destination)?;
    Ok(probe.local_addr()?.ip())
}

/// One end of a refused tunneled connection, as far as it is known.
#[derive(Clone, Copy, Default)]
struct End<'a> {
    identity: Option<u32>,
    spiffe_id: Option<&'a SpiffeId>,
    address: Option<SocketAddr>,
}

impl Glue {
    fn publish(&self, record: FlowRecord) {
        crate::events::log(&record);
        self.flows.publish(record);
    }

    /// Brings the kernel's list of local identities with a certificate in line with `svids`:
    /// the connect hook redirects only those.
    fn sync_certified(&self, svids: &SvidStore) {
        let held: BTreeSet<u32> = {
            let view = self.view.read().expect("tunnel view lock poisoned");
            let held = svids.identities();
            view.local_identities
                .iter()
                .filter(|(id, _)| held.contains(id))
                .map(|(_, identity)| *identity)
                .collect()
        };
        let mut certified = self.certified.lock().expect("certified lock poisoned");
        let mut maps = self.maps.lock().expect("tunnel maps lock poisoned");
        for (identity, set) in held
            .difference(&certified)
            .map(|i| (*i, true))
            .chain(certified.difference(&held).map(|i| (*i, false)))
            .collect::<Vec<_>>()
        {
            match maps.set_certified(identity, set) {
                Ok(()) if set => {
                    certified.insert(identity);
                    tracing::debug!(
                        identity,
                        "certificate held: the connect hook redirects this identity"
                    );
                }
                Ok(()) => {
                    certified.remove(&identity);
                }
                Err(e) => {
                    tracing::error!(identity, error = %e, "updating the kernel's list of certified identities")
                }
            }
        }
    }

    /// How verdict records name an end: by identity when known (a local workload by its name, a
    /// peer by its SPIFFE ID), else by the SPIFFE ID its certificate proves, else by the local
    /// workload at its address.
    fn name(&self, end: End) -> (String, String) {
        let identity = end.identity.or_else(|| {
            let address = end.address?.ip().to_canonical();
            let view = self.view.read().expect("tunnel view lock poisoned");
            view.local.get(&address).map(|(_, identity)| *identity)
        });
        if let Some(identity) = identity {
            let (name, workload) = self
                .names
                .read()
                .expect("names lock poisoned")
                .identity(identity);
            if !workload.is_empty() {
                return (name, workload);
            }
        }
        match end.spiffe_id {
            Some(id) => (id.to_string(), id.to_string()),
            None => ("-".into(), "-".into()),
        }
    }

    /// A flow record for a tunnel refusal.
    fn refusal(
        &self,
        direction: u8,
        source: End,
        destination: End,
        rule: u32,
        reason: String,
    ) -> FlowRecord {
        let (policy, rule) = {
            let view = self.view.read().expect("tunnel view lock poisoned");
            view.compiled
                .rules
                .get(&rule)
                .map_or(("-".into(), "-".into()), |r| {
                    (r.policy.clone(), r.rule.clone())
                })
        };
        let (src, src_workload) = self.name(source);
        let (dst, dst_workload) = self.name(destination);
        let show = |end: End| {
            end.address
                .map_or_else(|| "-".into(), |a| a.ip().to_string())
        };
        FlowRecord {
            time: crate::events::timestamp(),
            verdict: policy::verdict_name(VERDICT_DENY).into(),
            direction: policy::direction_name(direction).into(),
            policy,
            rule,
            src,
            src_workload,
            dst,
            dst_workload,
            src_addr: show(source),
            dst_addr: show(destination),
            dst_port: destination.address.map_or(0, |d| d.port()),
            protocol: "tcp".into(),
            reason: format!("mtls: {reason}"),
            service: String::new(),
            count: 1,
        }
    }
}

impl Authorizer for Glue {
    fn local_workload(&self, destination: SocketAddr) -> Option<SpiffeId> {
        let view = self.view.read().expect("tunnel view lock poisoned");
        view.local
            .get(&destination.ip().to_canonical())
            .map(|(id, _)| id.clone())
    }

    fn authorize(
        &self,
        peer: &SpiffeId,
        claimed: Option<u32>,
        workload: &SpiffeId,
        destination: SocketAddr,
    ) -> Result<u32, Denied> {
        let view = self.view.read().expect("tunnel view lock poisoned");
        let denied = |reason: String| Err(Denied { reason });
        let local = match view.local.get(&destination.ip().to_canonical()) {
            Some((id, local)) if id == workload => *local,
            _ => return denied(format!("{workload} is not a workload of this node")),
        };
        let identities = view.by_spiffe_id.get(peer).map_or(&[][..], Vec::as_slice);
        let remote = match (claimed, identities) {
            (_, []) => return denied(format!("{peer} is no workload the control plane knows")),
            (Some(claimed), _) if identities.contains(&claimed) => claimed,
            (Some(claimed), _) => {
                return denied(format!(
                    "the source agent names identity {claimed}, which is not one of {peer}'s"
                ))
            }
            (None, [only]) => *only,
            (None, _) => {
                return denied(format!(
                    "{peer} has {} identities and the source agent named none",
                    identities.len()
                ))
            }
        };
        let d = view.compiled.decide(
            local,
            remote,
            DIRECTION_INGRESS,
            PROTO_TCP,
            destination.port(),
        );
        if d.verdict == VERDICT_DENY {
            let rule = view.compiled.rules.get(&d.rule);
            return denied(match rule {
                Some(r) => format!(
                    "policy {} rule {} denies {peer} to {workload} port {}",
                    r.policy,
                    r.rule,
                    destination.port()
                ),
                None => format!(
                    "{peer} may not reach {workload} port {}",
                    destination.port()
                ),
            });
        }
        Ok(remote)
    }

    fn record(&self, event: &InboundEvent) {
        if let Verdict::Refused(refusal) = &event.verdict {
            let peer = End {
                spiffe_id: event.peer.as_ref(),
                address: Some(event.peer_addr),
                ..End::default()
            };
            let local = End {
                address: event.destination,
                ..End::default()
            };
            let record = self.refusal(DIRECTION_INGRESS, peer, local, 0, refusal.to_string());
            self.publish(record);
        }
    }

    fn connect(&self, identity: u32, destination: SocketAddr) -> DeliveryFuture {
        let pod = self
            .pod_netns
            .read()
            .expect("tunnel namespaces lock poisoned")
            .get(&destination.ip().to_canonical())
            .cloned();
        let prepared = (|| {
            let new_socket = || match destination {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
            };
            // A workload in a pod of its own is reached from inside its namespace, from its own
            // address; one in the node's namespace from the node's address towards it.
            let (socket, source) = match &pod {
                Some(netns) => (netns.run(new_socket)?, destination.ip()),
                None => (new_socket()?, source_towards(destination)?),
            };
            socket.bind(SocketAddr::new(source, 0))?;
            let from = socket.local_addr()?;
            self.maps
                .lock()
                .expect("tunnel maps lock poisoned")
                .mark_delivery(from, destination, identity)
                .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>((socket, from))
        })();
        let maps = self.maps.clone();
        Box::pin(async move {
            let (socket, from) = prepared?;
            let connected = socket.connect(destination).await;
            // The SYN has been judged (or the connect failed): the mark has served.
            maps.lock()
                .expect("tunnel maps lock poisoned")
                .unmark_delivery(from, destination);
            connected
        })
    }
}

impl OriginalDestinations for Glue {
    fn lookup(
        &self,
        local: &tokio::net::TcpStream,
        local_peer: SocketAddr,
    ) -> Result<OutboundRequest, String> {
        let listener = local.local_addr().map_err(|e| e.to_string())?;
        // The listener's namespace: the agent's, or the pod's whose loopback it listens on.
        let netns = ward_host::netns::socket_netns_cookie(local).map_err(|e| e.to_string())?;
        let original = self
            .maps
            .lock()
            .expect("tunnel maps lock poisoned")
            .take_redirect(local_peer, listener, netns)
            .ok_or("the connect hook recorded no original destination")?;
        let destination = original_destination(&original);
        let (source, destination_id, peer_agent) = {
            let view = self.view.read().expect("tunnel view lock poisoned");
            (
                view.by_identity.get(&original.local_identity).cloned(),
                view.by_identity.get(&original.remote_identity).cloned(),
                view.tunnels.get(&destination.ip().to_canonical()).copied(),
            )
        };
        let source = source
            .ok_or_else(|| format!("source identity {} is unknown", original.local_identity))?;
        let refusal = match (&destination_id, peer_agent) {
            (Some(destination_id), Some(peer_agent)) => {
                return Ok(OutboundRequest {
                    source,
                    source_identity: original.local_identity,
                    destination,
                    destination_id: destination_id.clone(),
                    peer_agent,
                    rule: original.rule,
                })
            }
            (None, _) => format!("{destination} is not a workload the control plane knows"),
            (Some(id), None) => format!("the node of {id} runs no tunnel"),
        };
        let record = self.refusal(
            DIRECTION_EGRESS,
            End {
                identity: Some(original.local_identity),
                spiffe_id: Some(&source),
                // Its end of the redirected connection is on loopback: not worth showing.
                address: None,
            },
            End {
                identity: Some(original.remote_identity),
                spiffe_id: destination_id.as_ref(),
                address: Some(destination),
            },
            original.rule,
            refusal.clone(),
        );
        self.publish(record);
        Err(refusal)
    }

    fn finished(&self, request: &OutboundRequest, result: &Result<Copied, TunnelError>) {
        if let Err(e) = result {
            let record = self.refusal(
                DIRECTION_EGRESS,
                End {
                    identity: Some(request.source_identity),
                    spiffe_id: Some(&request.source),
                    address: None,
                },
                End {
                    identity: None,
                    spiffe_id: Some(&request.destination_id),
                    address: Some(request.destination),
                },
                request.rule,
                e.to_string(),
            );
            self.publish(record);
        }
    }
}
