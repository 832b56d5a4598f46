//! The store several ward-control replicas share: etcd, through its v3 API.
//!
//! Everything lives under `/ward/<trust-domain>/`:
//! - `identities/<identity key>` → the number allocated to it, and `numbers/<number>` → the key.
//!   Both are created in one transaction that requires both absent, so two replicas can never
//!   give one key two numbers or one number two keys.
//! - `nodes/<node>` → what the node reported (JSON, [`NodeRecord`]), attached to a lease the
//!   replica holding the node's stream keeps alive: when the node is gone for longer than its
//!   lease, etcd deletes the record and every replica's IP cache loses its workloads.
//! - `tokens/<sha256 of a join token>` → the node that spent it, created only if absent.
//! - `history/v/<version>` → a policy history record (JSON, [`crate::history::Record`]), and
//!   `history/last` → the last version and its sources: one numbering for every replica, each
//!   policy set recorded once whichever replicas served it.
//! - `revoked/<entry>`: a revoked workload certificate serial, or `node <name>`
//!   (`ward-control revoke --etcd-endpoints`); every replica serves them with its own revocation
//!   file's.
//!
//! The CA's key is not in the store: every replica reads the same CA files (a mounted secret).
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::Duration,
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use serde::{Deserialize, Serialize};

use crate::registry::WorkloadRecord;

/// Identity keys allocated in one transaction (two comparisons and two writes each: within
/// etcd's default limit of 128 operations of each kind).
pub const ALLOCATION_BATCH: usize = 32;

/// How long one store call may take before the replica treats the store as unreachable.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd {endpoints}: {source}")]
    Connect {
        endpoints: String,
        source: etcd_client::Error,
    },
    #[error("etcd: {0}")]
    Call(#[from] etcd_client::Error),
    #[error("etcd: no answer within {}s", CALL_TIMEOUT.as_secs())]
    Timeout,
    #[error("{file}: {source}")]
    TlsFile {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("etcd: every workload identity number is taken")]
    Exhausted,
    #[error("etcd: the record of node {node} takes {bytes} bytes compressed, more than {MAX_RECORD_BYTES} (etcd refuses requests above --max-request-bytes, 1.5 MiB by default)")]
    TooLarge { node: String, bytes: usize },
}

/// The largest node record written (compressed), below etcd's default request limit.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// The largest node record read back (uncompressed): a record that inflates past it is refused.
const MAX_RECORD_JSON_BYTES: u64 = 64 * 1024 * 1024;

/// A node record as stored: gzipped JSON (a node's workloads repeat the same fields, so 10,000
/// of them fit well within etcd's request limit).
fn encode_record(record: &NodeRecord) -> Vec<u8> {
    use std::io::Write as _;
    let json = serde_json::to_vec(record).expect("a node record serializes");
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder
        .write_all(&json)
        .and_then(|()| encoder.finish())
        .expect("compressing into memory")
}

/// A stored node record: gzipped JSON, or plain JSON (as an operator may write it by hand).
fn decode_record(bytes: &[u8]) -> Result<NodeRecord, String> {
    use std::io::Read as _;
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return serde_json::from_slice(bytes).map_err(|e| e.to_string());
    }
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_RECORD_JSON_BYTES + 1)
        .read_to_end(&mut json)
        .map_err(|e| format!("not gzip: {e}"))?;
    if json.len() as u64 > MAX_RECORD_JSON_BYTES {
        return Err(format!("inflates past {MAX_RECORD_JSON_BYTES} bytes"));
    }
    serde_json::from_slice(&json).map_err(|e| e.to_string())
}

/// How a replica reaches etcd.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    /// `http://host:port` or `https://host:port`, one per member.
    pub endpoints: Vec<String>,
    /// The CA that signed the members' serving certificates (for https endpoints).
    pub ca_file: Option<PathBuf>,
    /// The replica's client certificate and key, for members that require one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// One node's record in the store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    #[serde(default)]
    pub workloads: Vec<WorkloadRecord>,
    /// The tunnel address the node announced; empty when it runs none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tunnel: String,
    /// The policy history version the node's agent last acknowledged to the replica holding
    /// its stream, so that every replica's status lists every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforces: Option<u64>,
}

/// A change another replica (or this one) made, as the watch reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Identity {
        key: String,
        number: u32,
    },
    /// `None`: the record was deleted (its lease expired, or the node was revoked).
    Node {
        node: String,
        record: Option<NodeRecord>,
    },
    /// A revocation entry ([`crate::revocation::canonical_entry`]) added or (`false`) removed.
    Revoked {
        entry: String,
        present: bool,
    },
}

/// What the store holds, read at once at a revision; the malformed entries are left out and
/// named in `malformed`.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub identities: BTreeMap<String, u32>,
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Revocation entries, canonical.
    pub revoked: BTreeSet<String>,
    pub malformed: Vec<String>,
    pub revision: i64,
}

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Runs one store call (`call` makes it) within [`CALL_TIMEOUT`], again after a transport
/// failure (a member that went away: the client's channel then picks another), up to
/// [`CALL_ATTEMPTS`] times. Every call ward makes is safe to make twice: a transaction that took
/// effect the first time fails its comparisons the second, and its caller reads what is there
/// (a spent token and the history's head carry a claim of the attempt that wrote them).
async fn timed<T, F, Fut>(call: F) -> Result<T, StoreError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut attempt = 1;
    loop {
        let failed = match tokio::time::timeout(CALL_TIMEOUT, call()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) if attempt < CALL_ATTEMPTS && transient(&e) => e,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(StoreError::Timeout),
        };
        tracing::debug!(error = %failed, attempt, "store call failed; trying again");
        crate::metrics::counters().store_retries.inc();
        tokio::time::sleep(RETRY_PAUSE).await;
        attempt += 1;
    }
}

/// How many times a store call is tried when its transport fails.
const CALL_ATTEMPTS: u32 = 3;
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Whether `e` is the transport's (a member gone, a connection reset), not etcd's answer.
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        _ => false,
    }
}

fn read_file(file: &PathBuf) -> Result<String, StoreError> {
    std::fs::read_to_string(file).map_err(|source| StoreError::TlsFile {
        file: file.clone(),
        source,
    })
}

impl EtcdStore {
    /// Connects to the members in `opts`; the store of trust domain `trust_domain`.
    pub async fn connect(opts: &EtcdOptions, trust_domain: &str) -> Result<Self, StoreError> {
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if opts.ca_file.is_some() || opts.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &opts.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read_file(ca)?));
            }
            if let (Some(cert), Some(key)) = (&opts.cert_file, &opts.key_file) {
                tls = tls.identity(Identity::from_pem(read_file(cert)?, read_file(key)?));
            }
            connect = connect.with_tls(tls);
        }
        let endpoints = opts.endpoints.join(",");
        let client = tokio::time::timeout(
            CALL_TIMEOUT,
            Client::connect(opts.endpoints.clone(), Some(connect)),
        )
        .await
        .map_err(|_| StoreError::Timeout)?
        .map_err(|source| StoreError::Connect {
            endpoints: endpoints.clone(),
            source,
        })?;
        let store = EtcdStore {
            client,
            prefix: format!("/ward/{trust_domain}/"),
        };
        // Fail the start, not the first report, when no member answers.
        store
            .client
            .clone()
            .status()
            .await
            .map_err(|source| StoreError::Connect { endpoints, source })?;
        Ok(store)
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}/{name}", self.prefix)
    }

    async fn get(
        &self,
        key: String,
        options: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, StoreError> {
        timed(|| {
            let (mut client, key, options) = (self.client.clone(), key.clone(), options.clone());
            async move { client.get(key, options).await }
        })
        .await
    }

    async fn put(
        &self,
        key: String,
        value: Vec<u8>,
        options: Option<PutOptions>,
    ) -> Result<(), StoreError> {
        timed(|| {
            let (mut client, key, value) = (self.client.clone(), key.clone(), value.clone());
            let options = options.clone();
            async move { client.put(key, value, options).await }
        })
        .await
        .map(drop)
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        timed(|| {
            let (mut client, txn) = (self.client.clone(), txn.clone());
            async move { client.txn(txn).await }
        })
        .await
    }

    /// Everything the store holds, at one revision.
    pub async fn load(&self) -> Result<Snapshot, StoreError> {
        let response = self
            .get(self.prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut snapshot = Snapshot {
            revision: response.header().map_or(0, |h| h.revision()),
            ..Snapshot::default()
        };
        for kv in response.kvs() {
            match self.parse(kv.key(), Some(kv.value())) {
                Ok(Some(Change::Identity { key, number })) => {
                    snapshot.identities.insert(key, number);
                }
                Ok(Some(Change::Node {
                    node,
                    record: Some(record),
                })) => {
                    snapshot.nodes.insert(node, record);
                }
                Ok(Some(Change::Revoked { entry, .. })) => {
                    snapshot.revoked.insert(entry);
                }
                Ok(_) => {}
                Err(reason) => snapshot.malformed.push(reason),
            }
        }
        Ok(snapshot)
    }

    /// What a stored entry means: `Ok(None)` for entries that are not a change to apply (the
    /// number index, spent tokens), `Err` naming a malformed one.
    fn parse(&self, key: &[u8], value: Option<&[u8]>) -> Result<Option<Change>, String> {
        let key = String::from_utf8_lossy(key);
        let Some(rest) = key.strip_prefix(&self.prefix) else {
            return Ok(None);
        };
        let Some((kind, name)) = rest.split_once('/') else {
            return Ok(None);
        };
        let text = value.map(String::from_utf8_lossy);
        match kind {
            "identities" => {
                let Some(text) = text else {
                    return Err(format!(
                        "{key}: an identity was deleted; numbers never move"
                    ));
                };
                let number = text
                    .trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|n| ward_policy::identity::is_workload(*n))
                    .ok_or_else(|| format!("{key}: {text:?} is not a workload identity number"))?;
                Ok(Some(Change::Identity {
                    key: name.to_owned(),
                    number,
                }))
            }
            "nodes" => {
                let record = match value {
                    None => None,
                    Some(bytes) => Some(
                        decode_record(bytes)
                            .map_err(|e| format!("{key}: not a node record: {e}"))?,
                    ),
                };
                Ok(Some(Change::Node {
                    node: name.to_owned(),
                    record,
                }))
            }
            "revoked" => {
                let entry = crate::revocation::canonical_entry(name)
                    .map_err(|reason| format!("{key}: not a revocation: {reason}"))?;
                Ok(Some(Change::Revoked {
                    entry,
                    present: value.is_some(),
                }))
            }
            _ => Ok(None),
        }
    }

    /// Appends `record` to the shared policy history with the next version, unless the last
    /// record has the same sources (another replica recorded this set): then `record` takes that
    /// record's version and `false` is returned.
    pub async fn record_history(
        &self,
        record: &mut crate::history::Record,
    ) -> Result<bool, StoreError> {
        #[derive(Serialize, Deserialize)]
        struct Last {
            version: u64,
            sources: Vec<crate::history::SourceDigest>,
            /// Which append wrote it: a retry whose first try took effect finds its own.
            #[serde(default)]
            claim: String,
        }
        let claim = format!("{:016x}", crate::random_u64());
        let last_key = self.key("history", "last");
        loop {
            let got = self.get(last_key.clone(), None).await?;
            let (last, revision) = match got.kvs().first() {
                Some(kv) => (
                    serde_json::from_slice::<Last>(kv.value()).map_err(|e| {
                        StoreError::Call(etcd_client::Error::InvalidArgs(format!(
                            "{last_key}: not a history head: {e}"
                        )))
                    })?,
                    kv.mod_revision(),
                ),
                None => (
                    Last {
                        version: 0,
                        sources: Vec::new(),
                        claim: String::new(),
                    },
                    0,
                ),
            };
            if last.claim == claim {
                record.version = last.version;
                return Ok(true);
            }
            if last.version > 0 && crate::history::same_sources(&last.sources, &record.sources) {
                record.version = last.version;
                return Ok(false);
            }
            record.version = last.version + 1;
            let head = Last {
                version: record.version,
                sources: record.sources.clone(),
                claim: claim.clone(),
            };
            let condition = if revision == 0 {
                Compare::create_revision(last_key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(last_key.clone(), CompareOp::Equal, revision)
            };
            let txn = Txn::new().when([condition]).and_then([
                TxnOp::put(
                    self.key("history", &format!("v/{:020}", record.version)),
                    serde_json::to_string(record).expect("a record serializes"),
                    None,
                ),
                TxnOp::put(
                    last_key.clone(),
                    serde_json::to_string(&head).expect("a head serializes"),
                    None,
                ),
            ]);
            if self.txn(txn).await?.succeeded() {
                return Ok(true);
            }
        }
    }

    /// The shared policy history, oldest first. A malformed record is an error naming it.
    pub async fn history(&self) -> Result<Vec<crate::history::Record>, StoreError> {
        let prefix = self.key("history", "v/");
        let got = self
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        got.kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice(kv.value()).map_err(|e| {
                    StoreError::Call(etcd_client::Error::InvalidArgs(format!(
                        "{}: not a history record: {e}",
                        String::from_utf8_lossy(kv.key())
                    )))
                })
            })
            .collect()
    }

    /// Revokes `entries` (canonical, as [`crate::revocation::canonical_entry`] gives them) for
    /// every replica; returns whether each was new.
    pub async fn revoke(&self, entries: &[String]) -> Result<Vec<bool>, StoreError> {
        let mut added = Vec::with_capacity(entries.len());
        for entry in entries {
            let key = self.key("revoked", entry);
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, "", None)]);
            added.push(self.txn(txn).await?.succeeded());
        }
        Ok(added)
    }

    /// The number of each identity key in `keys`, allocating the ones the store does not hold
    /// yet. `taken` are numbers known to be in use; others found taken are added to it.
    ///
    /// Keys go in batches of [`ALLOCATION_BATCH`], each one transaction that requires every key
    /// and number of the batch absent; a batch that meets one already there (another replica
    /// allocated it) is done again key by key.
    pub async fn allocate(
        &self,
        keys: &[String],
        taken: &mut BTreeSet<u32>,
    ) -> Result<BTreeMap<String, u32>, StoreError> {
        let mut out = BTreeMap::new();
        for batch in keys.chunks(ALLOCATION_BATCH) {
            if taken.len() + batch.len() >= ward_policy::identity::WORKLOADS.size_hint().0 {
                return Err(StoreError::Exhausted);
            }
            let mut proposed = Vec::with_capacity(batch.len());
            for key in batch {
                let number = ward_policy::identity::allocate(key, |n| taken.contains(&n));
                taken.insert(number);
                proposed.push((key, number));
            }
            let (mut when, mut then) = (Vec::new(), Vec::new());
            for (key, number) in &proposed {
                let (by_key, by_number) = (
                    self.key("identities", key),
                    self.key("numbers", &number.to_string()),
                );
                when.push(Compare::create_revision(
                    by_key.clone(),
                    CompareOp::Equal,
                    0,
                ));
                when.push(Compare::create_revision(
                    by_number.clone(),
                    CompareOp::Equal,
                    0,
                ));
                then.push(TxnOp::put(by_key, number.to_string(), None));
                then.push(TxnOp::put(by_number, key.as_str(), None));
            }
            if self
                .txn(Txn::new().when(when).and_then(then))
                .await?
                .succeeded()
            {
                out.extend(proposed.into_iter().map(|(k, n)| (k.clone(), n)));
                continue;
            }
            for (key, number) in proposed {
                taken.remove(&number);
                out.insert(key.clone(), self.allocate_one(key, taken).await?);
            }
        }
        Ok(out)
    }

    /// The number of `key`: the one the store holds, or the first free one it takes.
    async fn allocate_one(&self, key: &str, taken: &mut BTreeSet<u32>) -> Result<u32, StoreError> {
        let by_key = self.key("identities", key);
        loop {
            if taken.len() >= ward_policy::identity::WORKLOADS.size_hint().0 {
                return Err(StoreError::Exhausted);
            }
            let number = ward_policy::identity::allocate(key, |n| taken.contains(&n));
            let by_number = self.key("numbers", &number.to_string());
            let txn = Txn::new()
                .when([
                    Compare::create_revision(by_key.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(by_number.clone(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(by_key.clone(), number.to_string(), None),
                    TxnOp::put(by_number, key, None),
                ])
                .or_else([TxnOp::get(by_key.clone(), None)]);
            let response = self.txn(txn).await?;
            // The number is taken now, by this key or another.
            taken.insert(number);
            if response.succeeded() {
                return Ok(number);
            }
            let existing = response.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            });
            if let Some(value) = existing {
                // Another replica allocated this key first: its number is the number.
                return match self.parse(by_key.as_bytes(), Some(&value)) {
                    Ok(Some(Change::Identity { number, .. })) => {
                        taken.insert(number);
                        Ok(number)
                    }
                    _ => Err(StoreError::Call(etcd_client::Error::InvalidArgs(format!(
                        "{by_key}: not a workload identity number"
                    )))),
                };
            }
            // Else the number is another key's: try the next free one.
        }
    }

    /// A lease of `ttl` (at least one second) for a node's record.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let grant = timed(|| {
            let mut client = self.client.clone();
            async move { client.lease_grant(seconds, None).await }
        })
        .await?;
        Ok(grant.id())
    }

    /// Keeps `lease` alive until the returned task is aborted or the store stops answering
    /// (then the lease runs out on its own).
    pub fn keep_alive(&self, lease: i64, ttl: Duration) -> tokio::task::JoinHandle<()> {
        let mut client = self.client.clone();
        let period = (ttl / 3).clamp(Duration::from_millis(500), Duration::from_secs(60));
        tokio::spawn(async move {
            let Ok((mut keeper, mut answers)) = client.lease_keep_alive(lease).await else {
                return;
            };
            loop {
                if keeper.keep_alive().await.is_err() {
                    return;
                }
                match tokio::time::timeout(CALL_TIMEOUT, answers.message()).await {
                    Ok(Ok(Some(answer))) if answer.ttl() > 0 => {}
                    _ => return,
                }
                tokio::time::sleep(period).await;
            }
        })
    }

    /// Writes `node`'s record, attached to `lease`.
    pub async fn put_node(
        &self,
        node: &str,
        record: &NodeRecord,
        lease: i64,
    ) -> Result<(), StoreError> {
        let value = encode_record(record);
        if value.len() > MAX_RECORD_BYTES {
            return Err(StoreError::TooLarge {
                node: node.to_owned(),
                bytes: value.len(),
            });
        }
        self.put(
            self.key("nodes", node),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
    }

    pub async fn delete_node(&self, node: &str) -> Result<(), StoreError> {
        let key = self.key("nodes", node);
        timed(|| {
            let (mut client, key) = (self.client.clone(), key.clone());
            async move { client.delete(key, None).await }
        })
        .await
        .map(drop)
    }

    /// What join token digest `digest` was spent for (`<node> <key>`), by any replica; `None`
    /// while unspent.
    pub async fn token_spent_for(&self, digest: &str) -> Result<Option<String>, StoreError> {
        let response = self.get(self.key("tokens", digest), None).await?;
        Ok(response
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// Spends join token digest `digest` for `claim` (`<node> <key>`); false when it was spent
    /// for another. A retry whose first try took effect but lost its answer, and the same join
    /// retried on another replica, find their own claim there.
    pub async fn spend_token(&self, digest: &str, claim: &str) -> Result<bool, StoreError> {
        let key = self.key("tokens", digest);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), claim, None)])
            .or_else([TxnOp::get(key, None)]);
        let response = self.txn(txn).await?;
        if response.succeeded() {
            return Ok(true);
        }
        Ok(response.op_responses().into_iter().any(|op| {
            matches!(op, TxnOpResponse::Get(get)
                if get.kvs().first().is_some_and(|kv| kv.value() == claim.as_bytes()))
        }))
    }

    /// Whether the store answers a linearizable read within `within` (a member cut off from the
    /// others' quorum does not).
    pub async fn probe(&self, within: Duration) -> Result<(), StoreError> {
        // Through the retries of any call: a member that went away is not the store cut off.
        let read = self.get(
            self.key("probe", "read"),
            Some(GetOptions::new().with_keys_only()),
        );
        match tokio::time::timeout(within, read).await {
            Ok(result) => result.map(drop),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// Watches every change after `revision`.
    pub async fn watch(&self, revision: i64) -> Result<WatchStream, StoreError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        timed(|| {
            let (mut client, options) = (self.client.clone(), options.clone());
            let prefix = self.prefix.clone();
            async move { client.watch(prefix, Some(options)).await }
        })
        .await
    }

    /// The changes of one watch answer (malformed entries as `Err`), and whether the watch was
    /// canceled (compacted past `revision`: read everything again).
    pub fn changes(
        &self,
        answer: &etcd_client::WatchResponse,
    ) -> (Vec<Result<Change, String>>, bool) {
        let mut out = Vec::new();
        for event in answer.events() {
            let Some(kv) = event.kv() else { continue };
            let value = match event.event_type() {
                EventType::Put => Some(kv.value()),
                EventType::Delete => None,
            };
            match self.parse(kv.key(), value) {
                Ok(Some(change)) => out.push(Ok(change)),
                Ok(None) => {}
                Err(reason) => out.push(Err(reason)),
            }
        }
        (out, answer.canceled())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_records_round_trip_compressed_and_10000_workloads_fit() {
        let workloads: Vec<WorkloadRecord> = (0..10_000)
            .map(|i| WorkloadRecord {
                name: format!("workload-{i}"),
                spiffe_id: format!("spiffe://cluster.local/ns/shop/sa/app-{i}"),
                namespace: Some("shop".into()),
                labels: BTreeMap::from([("app".to_string(), format!("app-{i}"))]),
                addresses: vec![std::net::IpAddr::from([
                    10,
                    1,
                    (i / 250) as u8,
                    (i % 250) as u8,
                ])],
                ..WorkloadRecord::default()
            })
            .collect();
        let record = NodeRecord {
            workloads,
            tunnel: "10.0.0.1:15008".into(),
            enforces: Some(7),
        };
        let stored = encode_record(&record);
        assert!(stored.len() < MAX_RECORD_BYTES, "{} bytes", stored.len());
        eprintln!("10,000 workloads: {} bytes compressed", stored.len());
        assert_eq!(decode_record(&stored), Ok(record));
        assert!(decode_record(b"{not json").is_err());
        assert!(decode_record(&[0x1f, 0x8b, 0, 1]).is_err());
        assert_eq!(
            decode_record(br#"{"workloads": []}"#),
            Ok(NodeRecord::default()),
            "plain JSON, as written by hand"
        );
    }
}
