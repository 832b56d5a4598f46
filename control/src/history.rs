//! The history of the policy sets the control plane served: `<state-dir>/policy-history.jsonl`,
//! one JSON record a line, appended (and synced) each time a different set is accepted. A record
//! says when, why (start, file change, cluster change), from what (each file's and cluster
//! object's SHA-256, the git commit when the policy directory is in a git checkout) and what
//! changed in access (`ward policy diff` of the previous set and the new one, for the workloads
//! registered then). `ward-control history` and `ward-control show` print it.
use std::{
    collections::BTreeMap,
    io::BufRead as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use ward_policy::{PolicySet, WorkloadInfo};

/// The history file's name in the state directory.
pub const HISTORY_FILE: &str = "policy-history.jsonl";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// 1, 2, 3 … in the order the sets were served.
    pub version: u64,
    /// Seconds since the Unix epoch, and the same in UTC for people.
    pub unix_time: i64,
    pub time: String,
    /// Why the set was read: `start`, `file change`, `cluster change`.
    pub reason: String,
    /// The POLICY resource set version agents receive (and report as enforced).
    pub served: String,
    pub policies: usize,
    pub sources: Vec<SourceDigest>,
    /// The commit checked out in the policy directory's git repository, if it is in one.
    pub git_commit: Option<String>,
    /// The access diff from the previous version; `None` for the first set after a start, whose
    /// predecessor is not known.
    pub diff: Option<Diff>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceDigest {
    /// A file's path, or a cluster object's `<kind>/<namespace>/<name>`.
    pub source: String,
    pub sha256: String,
    /// A cluster object's last writer: the manager of its most recent managed-fields entry
    /// (`kubectl-client-side-apply`, `argocd-controller`, ...), as the API server records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
}

/// Whether two sets of sources hold the same texts (their last writers aside: an object applied
/// again unchanged by another client is no new version).
pub fn same_sources(a: &[SourceDigest], b: &[SourceDigest]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(a, b)| a.source == b.source && a.sha256 == b.sha256)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diff {
    pub gained: usize,
    pub lost: usize,
    pub changed: usize,
    /// As `ward policy diff` prints it.
    pub text: String,
    /// As `ward policy diff --format json` prints it.
    pub json: serde_json::Value,
    /// Why the diff was not computed (too many workloads, or a set that does not compile for
    /// them); the counts are then zero and mean nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// Above this many registered workloads the control plane records no access diff: it compares
/// every pair of endpoints, and at 10,000 workloads that takes minutes. `ward policy diff` on
/// the two versions' files computes it offline.
pub const MAX_DIFF_WORKLOADS: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}:{line}: not a history record: {reason}")]
    Record {
        file: PathBuf,
        line: usize,
        reason: String,
    },
}

/// Appends a record for each new set served; remembers what the last one held.
#[derive(Debug)]
pub struct Writer {
    file: PathBuf,
    last: Option<(u64, Vec<SourceDigest>)>,
    /// Whether a set was recorded (or found already recorded) since this process started: only
    /// then is the previous set in memory to diff against.
    since_start: bool,
    /// Where each new record is also sent.
    webhook: Option<crate::webhook::Webhook>,
    /// The history version of each POLICY version served since the start.
    served: Arc<Mutex<BTreeMap<String, u64>>>,
    /// With replicas, the history is the shared store's (one numbering for all), not the file:
    /// records are queued for [`append_shared`], which appends them in order.
    shared: Option<tokio::sync::mpsc::UnboundedSender<Record>>,
}

/// What [`Writer::record`] is told of a set just served.
pub struct Served<'a> {
    pub reason: &'a str,
    pub served: String,
    pub policies: usize,
    pub sources: &'a [SourceDigest],
    pub dir: &'a Path,
    /// The access diff from the set served before, computed by the caller ([`diff`]) when
    /// [`Writer::wants_diff`] said so: not under the hub's lock.
    pub diff: Option<Diff>,
}

impl Writer {
    /// Reads `file` to continue its numbering.
    pub fn open(file: PathBuf) -> Result<Writer, HistoryError> {
        let last = read(&file)?.pop().map(|r| (r.version, r.sources));
        Ok(Writer {
            file,
            last,
            since_start: false,
            webhook: None,
            served: Arc::default(),
            shared: None,
        })
    }

    /// Records in `store`'s shared history instead of the file, from a task of its own (started
    /// here, in the runtime), which also sends the webhook.
    #[must_use]
    pub fn shared(mut self, store: crate::etcd_store::EtcdStore) -> Writer {
        let (queue, records) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(append_shared(
            store,
            records,
            self.served.clone(),
            self.webhook.take(),
        ));
        self.shared = Some(queue);
        self
    }

    /// The history version of the POLICY version `served`, if served since the start.
    pub fn version_of(&self, served: &str) -> Option<u64> {
        self.served
            .lock()
            .expect("served lock poisoned")
            .get(served)
            .copied()
    }

    /// Sends every new record to `webhook` too.
    #[must_use]
    pub fn with_webhook(mut self, webhook: Option<crate::webhook::Webhook>) -> Writer {
        self.webhook = webhook;
        self
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Whether the next record carries an access diff (not the first set since the start,
    /// whose predecessor is not known).
    pub fn wants_diff(&self) -> bool {
        self.since_start
    }

    /// Records `served` unless its sources are those of the last record (a set read again, as
    /// at a restart, is no new version). Returns the record written.
    pub fn record(&mut self, served: &Served<'_>) -> Result<Option<Record>, HistoryError> {
        let sources = served.sources.to_vec();
        let first_since_start = !std::mem::replace(&mut self.since_start, true);
        if let Some((version, last)) = self.last.as_ref().filter(|_| self.shared.is_none()) {
            if same_sources(last, &sources) {
                self.served
                    .lock()
                    .expect("served lock poisoned")
                    .insert(served.served.clone(), *version);
                return Ok(None);
            }
        }
        let diff = if first_since_start {
            None
        } else {
            served.diff.clone()
        };
        let now = time::OffsetDateTime::now_utc();
        let record = Record {
            version: self.last.as_ref().map_or(1, |(v, _)| v + 1),
            unix_time: now.unix_timestamp(),
            time: now.to_string(),
            reason: served.reason.to_owned(),
            served: served.served.clone(),
            policies: served.policies,
            sources,
            git_commit: git_commit(served.dir),
            diff,
        };
        if let Some(queue) = &self.shared {
            // Numbered by the store; logged and sent once appended.
            let _ = queue.send(record);
            return Ok(None);
        }
        append(&self.file, &record)?;
        self.last = Some((record.version, record.sources.clone()));
        self.served
            .lock()
            .expect("served lock poisoned")
            .insert(record.served.clone(), record.version);
        if let Some(webhook) = &self.webhook {
            webhook.send(&record);
        }
        Ok(Some(record))
    }
}

/// Appends the records queued by a shared [`Writer`] to the store's history, in order, each
/// until it is written (a replica that cannot reach the store keeps them until it can); logs
/// and sends each one that is a new version.
async fn append_shared(
    store: crate::etcd_store::EtcdStore,
    mut records: tokio::sync::mpsc::UnboundedReceiver<Record>,
    served: Arc<Mutex<BTreeMap<String, u64>>>,
    webhook: Option<crate::webhook::Webhook>,
) {
    while let Some(mut record) = records.recv().await {
        let appended = loop {
            match store.record_history(&mut record).await {
                Ok(appended) => break appended,
                Err(e) => {
                    tracing::error!(error = %e, served = record.served, "the shared policy history could not be written; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        served
            .lock()
            .expect("served lock poisoned")
            .insert(record.served.clone(), record.version);
        if appended {
            log_recorded(&record);
            if let Some(webhook) = &webhook {
                webhook.send(&record);
            }
        }
    }
}

/// The structured event of a new history version, with its access diff's counts
/// (`ward-control show` prints the diff).
pub fn log_recorded(record: &Record) {
    crate::metrics::counters().policy_changes.inc();
    let counted = record.diff.as_ref().filter(|d| d.skipped.is_none());
    tracing::info!(
        reason = record.reason,
        history_version = record.version,
        served = record.served,
        policies = record.policies,
        gained = counted.map(|d| d.gained),
        lost = counted.map(|d| d.lost),
        changed = counted.map(|d| d.changed),
        git_commit = record.git_commit.as_deref().unwrap_or("-"),
        sources = record.sources.len(),
        "policy changed"
    );
}

/// The access diff between two sets for `workloads`, or (in `skipped`) why it was not computed.
pub fn diff(old: &PolicySet, new: &PolicySet, workloads: &[WorkloadInfo]) -> Diff {
    let skipped = |reason: String| Diff {
        gained: 0,
        lost: 0,
        changed: 0,
        text: format!("the diff was not computed: {reason}\n"),
        json: serde_json::json!({ "skipped": reason }),
        skipped: Some(reason),
    };
    if workloads.len() > MAX_DIFF_WORKLOADS {
        return skipped(format!(
            "{} workloads are registered, more than {MAX_DIFF_WORKLOADS}; run `ward policy diff` on the two versions' sources",
            workloads.len()
        ));
    }
    match ward_policy::trace::diff(old, new, workloads) {
        Ok(changes) => Diff {
            gained: changes.iter().filter(|c| c.gains()).count(),
            lost: changes.iter().filter(|c| c.loses()).count(),
            changed: changes.len(),
            text: ward_policy::trace::diff_human(&changes),
            json: ward_policy::trace::diff_json(&changes),
            skipped: None,
        },
        Err(e) => skipped(e.to_string()),
    }
}

/// Every record of `file`, oldest first; a missing file has none. A malformed line is an error
/// naming it: the history is evidence, and a reader must not skip what it cannot read.
pub fn read(file: &Path) -> Result<Vec<Record>, HistoryError> {
    let io = |source| HistoryError::Io {
        file: file.to_owned(),
        source,
    };
    let f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut records = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        records.push(
            serde_json::from_str(&line).map_err(|e| HistoryError::Record {
                file: file.to_owned(),
                line: i + 1,
                reason: e.to_string(),
            })?,
        );
    }
    Ok(records)
}

/// Appends `record` as one line and syncs it.
pub fn append(file: &Path, record: &Record) -> Result<(), HistoryError> {
    let io = |source| HistoryError::Io {
        file: file.to_owned(),
        source,
    };
    let mut line = serde_json::to_string(record).expect("a record serializes");
    line.push('\n');
    ward_host::atomic::append(file, line.as_bytes(), 0o600).map_err(io)
}

/// The commit checked out in the git repository `dir` is in (`HEAD`, followed through a
/// branch's loose or packed ref), read from the repository's files: nodes need no git.
pub fn git_commit(dir: &Path) -> Option<String> {
    let dir = dir.canonicalize().ok()?;
    let git_dir = dir.ancestors().find_map(|d| {
        let dot_git = d.join(".git");
        if dot_git.is_dir() {
            return Some(dot_git);
        }
        // A worktree or submodule: `.git` is a file naming the directory.
        let text = std::fs::read_to_string(&dot_git).ok()?;
        let named = text.strip_prefix("gitdir:")?.trim();
        Some(d.join(named))
    })?;
    let head = std::fs::read_to_string(git_dir.join("HEAD")).ok()?;
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref:").map(str::trim) else {
        return is_commit(head).then(|| head.to_owned());
    };
    // A worktree's refs live in the common directory.
    let common = std::fs::read_to_string(git_dir.join("commondir"))
        .map(|c| git_dir.join(c.trim()))
        .unwrap_or_else(|_| git_dir.clone());
    for base in [&git_dir, &common] {
        if let Ok(text) = std::fs::read_to_string(base.join(reference)) {
            let commit = text.trim();
            if is_commit(commit) {
                return Some(commit.to_owned());
            }
        }
    }
    let packed = std::fs::read_to_string(common.join("packed-refs")).ok()?;
    packed.lines().find_map(|line| {
        let (commit, name) = line.split_once(' ')?;
        (name.trim() == reference && is_commit(commit)).then(|| commit.to_owned())
    })
}

fn is_commit(text: &str) -> bool {
    matches!(text.len(), 40 | 64) && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `ward-control history`'s table.
pub fn table(records: &[Record]) -> String {
    let mut out = format!(
        "{:>7}  {:<26}  {:<14}  {:>8}  {:>6}  {:>6}  {}\n",
        "version", "time (UTC)", "reason", "policies", "gained", "lost", "git commit"
    );
    for r in records {
        let counted = r.diff.as_ref().filter(|d| d.skipped.is_none());
        let (gained, lost) = counted.map_or(("-".into(), "-".into()), |d| {
            (d.gained.to_string(), d.lost.to_string())
        });
        out += &format!(
            "{:>7}  {:<26}  {:<14}  {:>8}  {:>6}  {:>6}  {}\n",
            r.version,
            r.time,
            r.reason,
            r.policies,
            gained,
            lost,
            r.git_commit
                .as_deref()
                .map_or("-", |c| &c[..12.min(c.len())])
        );
    }
    out
}

/// `ward-control show`'s text for one record.
pub fn show(record: &Record) -> String {
    let mut out = format!(
        "version {}\ntime {} (unix {})\nreason {}\nserved {}\npolicies {}\ngit commit {}\nsources:\n",
        record.version,
        record.time,
        record.unix_time,
        record.reason,
        record.served,
        record.policies,
        record.git_commit.as_deref().unwrap_or("-"),
    );
    for s in &record.sources {
        out += &format!("  {}  {}", s.sha256, s.source);
        if let Some(writer) = &s.writer {
            out += &format!("  (last written by {writer})");
        }
        out.push('\n');
    }
    match &record.diff {
        Some(diff) => {
            out += &format!(
                "access diff from version {}:\n{}",
                record.version - 1,
                diff.text
            )
        }
        None => out += "access diff: not known (the first set after a start)\n",
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_commit_follows_head_through_loose_and_packed_refs() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let git = tmp.path().join(".git");
        std::fs::create_dir_all(git.join("refs/heads")).expect("refs");
        let policy = tmp.path().join("policy");
        std::fs::create_dir_all(&policy).expect("policy dir");
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        std::fs::write(git.join("HEAD"), "ref: refs/heads/main\n").expect("HEAD");
        std::fs::write(
            git.join("packed-refs"),
            format!("# pack-refs\n{b} refs/heads/main\n"),
        )
        .expect("packed");
        assert_eq!(git_commit(&policy), Some(b.clone()), "packed");
        std::fs::write(git.join("refs/heads/main"), format!("{a}\n")).expect("loose");
        assert_eq!(git_commit(&policy), Some(a.clone()), "a loose ref wins");
        std::fs::write(git.join("HEAD"), format!("{b}\n")).expect("detached");
        assert_eq!(git_commit(&policy), Some(b), "detached HEAD");
        let elsewhere = tempfile::tempdir().expect("temp dir");
        assert_eq!(git_commit(elsewhere.path()), None);
    }

    #[test]
    fn records_round_trip_and_a_malformed_line_is_named() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let file = tmp.path().join(HISTORY_FILE);
        assert!(read(&file).expect("missing").is_empty());
        let record = Record {
            version: 1,
            unix_time: 0,
            time: "1970-01-01 0:00:00.0 +00:00:00".into(),
            reason: "start".into(),
            served: "v1".into(),
            policies: 1,
            sources: vec![SourceDigest {
                source: "web.yaml".into(),
                sha256: "00".into(),
                writer: None,
            }],
            git_commit: None,
            diff: None,
        };
        append(&file, &record).expect("append");
        assert_eq!(read(&file).expect("read"), [record]);
        std::fs::write(&file, "{not json\n").expect("write");
        let err = read(&file).expect_err("malformed");
        assert!(
            err.to_string().contains(":1: not a history record"),
            "{err}"
        );
    }

    #[test]
    fn no_diff_is_computed_past_the_workload_bound_and_the_record_says_why() {
        let workloads: Vec<WorkloadInfo> = (0..=MAX_DIFF_WORKLOADS as u32)
            .map(|i| WorkloadInfo {
                identity: 256 + i,
                name: format!("w{i}"),
                spiffe_id: format!("spiffe://x/w{i}"),
                ..WorkloadInfo::default()
            })
            .collect();
        let started = std::time::Instant::now();
        let d = diff(&PolicySet::default(), &PolicySet::default(), &workloads);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let reason = d.skipped.expect("skipped");
        assert!(reason.contains("ward policy diff"), "{reason}");
        let d = diff(
            &PolicySet::default(),
            &PolicySet::default(),
            &workloads[..2],
        );
        assert_eq!((d.skipped, d.changed), (None, 0));
    }

    #[test]
    fn an_unchanged_text_from_another_writer_is_no_new_version() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut writer = Writer::open(tmp.path().join(HISTORY_FILE)).expect("open");
        let source = |sha256: &str, writer: &str| SourceDigest {
            source: "networkpolicies/shop/db".into(),
            sha256: sha256.into(),
            writer: Some(writer.into()),
        };
        let mut record = |sources: &[SourceDigest]| {
            writer
                .record(&Served {
                    reason: "cluster change",
                    served: format!("v-{}", sources[0].sha256),
                    policies: 1,
                    sources,
                    dir: tmp.path(),
                    diff: None,
                })
                .expect("recorded")
        };
        let first = record(&[source("00", "kubectl-client-side-apply")]).expect("a version");
        assert_eq!(
            first.sources[0].writer.as_deref(),
            Some("kubectl-client-side-apply")
        );
        assert!(record(&[source("00", "argocd-controller")]).is_none());
        let changed = record(&[source("01", "argocd-controller")]).expect("a version");
        assert_eq!(changed.version, 2);
    }
}
