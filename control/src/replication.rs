//! What a replica shares with the others through the store ([`crate::etcd_store`]): it starts
//! from what the store holds, applies every change the others make, and writes the records of
//! the nodes whose streams it holds, each attached to a lease it keeps alive while the node's
//! stream lasts. A node gone from every replica for longer than its lease is deleted by etcd,
//! and every replica's IP cache loses its workloads.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    etcd_store::{Change, EtcdStore, NodeRecord, StoreError},
    hub::Hub,
};

/// How long a replica waits before it tries a broken watch again.
const RETRY: Duration = Duration::from_secs(1);
/// How often a replica checks that the store answers, and how long each check may take.
const PROBE: Duration = Duration::from_secs(1);
/// A replica whose store has not answered for this long stops serving.
pub const CUT_OFF_AFTER: Duration = Duration::from_secs(3);

/// Reads what the store holds into `hub`, makes `hub` allocate through the store, and follows
/// the store from then on. Fails when the store cannot be read, so a replica never starts on a
/// partial view.
pub async fn start(hub: Arc<Hub>, store: EtcdStore, lease: Duration) -> Result<(), StoreError> {
    hub.share(store.clone());
    let revision = load(&hub, &store).await?;
    let written = Written::default();
    let rewatch = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(follow(
        hub.clone(),
        store.clone(),
        revision,
        written.clone(),
        rewatch.clone(),
    ));
    tokio::spawn(write_nodes(hub.clone(), store.clone(), lease, written));
    tokio::spawn(probe(hub, store, rewatch));
    Ok(())
}

/// Stops serving while the store does not answer (for [`CUT_OFF_AFTER`]), so agents move to a
/// replica that can reach it; once it answers again, reads it whole, watches it afresh, and
/// serves again.
async fn probe(hub: Arc<Hub>, store: EtcdStore, rewatch: Arc<tokio::sync::Notify>) {
    let mut answered = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(PROBE).await;
        match store.probe(PROBE).await {
            Ok(()) => {
                answered = tokio::time::Instant::now();
                if hub.is_cut_off() {
                    if let Err(e) = load(&hub, &store).await {
                        tracing::warn!(error = %e, "reading the shared store again");
                        continue;
                    }
                    rewatch.notify_one();
                    hub.set_cut_off(false);
                    tracing::warn!("the shared store answers again; serving agents again");
                }
            }
            Err(e) => {
                if !hub.is_cut_off() && answered.elapsed() >= CUT_OFF_AFTER {
                    hub.set_cut_off(true);
                    tracing::error!(
                        error = %e,
                        silent_s = answered.elapsed().as_secs_f64(),
                        "cut off from the shared store: ending every agent stream and serving none until it answers (agents move to another replica)"
                    );
                }
            }
        }
    }
}

/// The record this replica last wrote of each node whose stream it holds.
type Written = Arc<Mutex<BTreeMap<String, NodeRecord>>>;

/// Applies everything the store holds (a node it no longer holds is removed, unless its stream
/// is here); returns its revision.
async fn load(hub: &Hub, store: &EtcdStore) -> Result<i64, StoreError> {
    let snapshot = store.load().await?;
    let connected = hub.connected_nodes();
    for node in hub.registered_nodes() {
        if !snapshot.nodes.contains_key(&node) && !connected.contains(&node) {
            apply_node(hub, &node, None);
        }
    }
    for reason in &snapshot.malformed {
        tracing::error!(%reason, "malformed record in the shared store left out");
    }
    let (identities, nodes) = (snapshot.identities.len(), snapshot.nodes.len());
    hub.adopt_identities(snapshot.identities);
    apply_revoked(hub, snapshot.revoked, "shared store read");
    for (node, record) in snapshot.nodes {
        apply_node(hub, &node, Some(record));
    }
    tracing::info!(
        identities,
        nodes,
        revision = snapshot.revision,
        "read the shared store"
    );
    Ok(snapshot.revision)
}

/// The source name of the store's revocations ([`crate::apply_revocations`]).
const REVOKED_IN_STORE: &str = "shared store";

/// Puts in force the store's revocation entries (canonical), with the revocation file's.
fn apply_revoked(hub: &Hub, entries: BTreeSet<String>, reason: &str) {
    let mut revocations = crate::revocation::Revocations::default();
    for entry in entries {
        match entry.strip_prefix("node ") {
            Some(node) => revocations.nodes.insert(node.to_owned()),
            None => revocations.serials.insert(entry),
        };
    }
    crate::apply_revocations(hub, REVOKED_IN_STORE, revocations, reason);
}

fn apply_node(hub: &Hub, node: &str, record: Option<NodeRecord>) {
    let deleted = record.is_none();
    for refusal in hub.apply_node_record(node, record) {
        tracing::warn!(
            node,
            workload = refusal.workload,
            reason = refusal.reason,
            "workload of another replica's node left out"
        );
    }
    if deleted {
        tracing::info!(
            node,
            "node record deleted from the shared store (lease expired or node revoked); its workloads leave the IP cache"
        );
    }
}

/// Applies the store's changes after `revision`, watching again after a break and reading
/// everything again when the store has compacted past what was seen. This replica is the
/// authority on the nodes whose streams it holds: a change to one of their records that is not
/// what it wrote (its lease ran out while the store was unreachable, say) is written again.
async fn follow(
    hub: Arc<Hub>,
    store: EtcdStore,
    mut revision: i64,
    written: Written,
    rewatch: Arc<tokio::sync::Notify>,
) {
    loop {
        let mut watch = match store.watch(revision).await {
            Ok(watch) => watch,
            Err(e) => {
                tracing::warn!(error = %e, "watching the shared store; retrying");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                message = watch.message() => message,
                // The store was unreachable and has been read whole again: this watch may be
                // on a connection that died meanwhile.
                () = rewatch.notified() => break,
            };
            let answer = match message {
                Ok(Some(answer)) => answer,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "the shared store's watch broke; watching again");
                    break;
                }
            };
            if let Some(header) = answer.header() {
                revision = revision.max(header.revision());
            }
            let (changes, canceled) = store.changes(&answer);
            // The identities of one answer (a transaction allocates many) are adopted at once,
            // before the records that may use them: the served sets are derived once an answer.
            let (identities, changes): (Vec<_>, Vec<_>) = changes
                .into_iter()
                .partition(|c| matches!(c, Ok(Change::Identity { .. })));
            hub.adopt_identities(
                identities
                    .into_iter()
                    .filter_map(|c| match c {
                        Ok(Change::Identity { key, number }) => Some((key, number)),
                        _ => None,
                    })
                    .collect(),
            );
            for change in changes {
                match change {
                    Ok(Change::Identity { .. }) => {}
                    Ok(Change::Node { node, record }) => {
                        if hub.connected_nodes().contains(&node) {
                            let mut written = written.lock().expect("written lock poisoned");
                            if written.get(&node) != record.as_ref() {
                                written.remove(&node);
                                hub.recheck_registry();
                            }
                        } else {
                            apply_node(&hub, &node, record)
                        }
                    }
                    Ok(Change::Revoked { entry, present }) => {
                        let mut revoked = hub.revocations_of(REVOKED_IN_STORE);
                        let (set, name) = match entry.strip_prefix("node ") {
                            Some(node) => (&mut revoked.nodes, node.to_owned()),
                            None => (&mut revoked.serials, entry),
                        };
                        if present {
                            set.insert(name);
                        } else {
                            set.remove(&name);
                        }
                        crate::apply_revocations(
                            &hub,
                            REVOKED_IN_STORE,
                            revoked,
                            "shared store change",
                        );
                    }
                    Err(reason) => {
                        tracing::error!(%reason, "malformed record in the shared store left out")
                    }
                }
            }
            if canceled {
                tracing::warn!(
                    compacted = answer.compact_revision(),
                    "the shared store compacted past this replica's view; reading it again"
                );
                loop {
                    match load(&hub, &store).await {
                        Ok(now) => {
                            revision = now;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reading the shared store; retrying");
                            tokio::time::sleep(RETRY).await;
                        }
                    }
                }
                break;
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// A lease this replica keeps alive for a node whose stream it holds.
struct Held {
    lease: i64,
    keeper: tokio::task::JoinHandle<()>,
}

/// Writes the record of each node whose stream this replica holds when it changes, attached to
/// the node's lease; stops keeping a lease alive when the node's stream ends (the record then
/// lives `lease` longer, unless the node comes back to some replica); deletes a revoked node's.
async fn write_nodes(hub: Arc<Hub>, store: EtcdStore, lease: Duration, written: Written) {
    let mut registry = hub.subscribe_registry();
    let (mut status, _) = hub.subscribe_status();
    let mut held: BTreeMap<String, Held> = BTreeMap::new();
    let mut retry = false;
    loop {
        tokio::select! {
            changed = registry.changed() => if changed.is_err() { return },
            changed = status.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RETRY), if retry => {}
        }
        retry = false;
        if hub.follows_cluster() {
            // The cluster says where workloads run; every replica reads it.
            continue;
        }
        let connected = hub.connected_nodes();
        held.retain(|node, h| {
            let keep = connected.contains(node);
            if !keep {
                h.keeper.abort();
            }
            keep
        });
        let revoked: Vec<String> = written
            .lock()
            .expect("written lock poisoned")
            .keys()
            .filter(|node| hub.node_revoked(node))
            .cloned()
            .collect();
        for node in revoked {
            match store.delete_node(&node).await {
                Ok(()) => {
                    written.lock().expect("written lock poisoned").remove(&node);
                }
                Err(e) => {
                    retry = true;
                    tracing::error!(node, error = %e, "deleting a revoked node's record");
                }
            }
        }
        for node in connected {
            // An acknowledged version whose history number is not appended yet: look again.
            retry |= hub.enforces_unnumbered(&node);
            let record = hub.node_record(&node);
            let same = written.lock().expect("written lock poisoned").get(&node) == Some(&record);
            if same && held.contains_key(&node) {
                continue;
            }
            let lease_id = match held.get(&node) {
                Some(h) => h.lease,
                None => match store.grant(lease).await {
                    Ok(id) => {
                        let keeper = store.keep_alive(id, lease);
                        held.insert(node.clone(), Held { lease: id, keeper });
                        id
                    }
                    Err(e) => {
                        retry = true;
                        tracing::error!(node, error = %e, "leasing the node's record in the shared store");
                        continue;
                    }
                },
            };
            match store.put_node(&node, &record, lease_id).await {
                Ok(()) => {
                    written
                        .lock()
                        .expect("written lock poisoned")
                        .insert(node, record);
                }
                Err(e) => {
                    // A record too large stays so until the node reports again: not retried.
                    if matches!(e, StoreError::TooLarge { .. }) {
                        written
                            .lock()
                            .expect("written lock poisoned")
                            .insert(node.clone(), record);
                    } else {
                        retry = true;
                    }
                    tracing::error!(node, error = %e, "writing the node's record to the shared store");
                }
            }
        }
    }
}
