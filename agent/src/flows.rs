//! Flow records: one per verdict event, fanned out to the log, `ward flows` subscribers, the recent
//! history, an optional JSON-lines file for a log shipper, and the metrics.
use std::{collections::VecDeque, io::Write as _, path::Path, sync::Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// How many records `ward flows` without `--follow` can show.
const HISTORY: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub time: String,
    pub verdict: String,
    pub direction: String,
    pub policy: String,
    pub rule: String,
    pub src: String,
    pub src_workload: String,
    pub dst: String,
    pub dst_workload: String,
    pub src_addr: String,
    pub dst_addr: String,
    pub dst_port: u16,
    pub protocol: String,
    /// Why, when the verdict alone does not say (a tunnel refusal).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The Service (`<namespace>/<name>`) whose cluster IP the source connected to; `dst` is the
    /// backend it was translated to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
    /// How many connections (or datagram flows) the record stands for: allowed flows are counted
    /// in the kernel and reported once per reading; an event is one.
    #[serde(default = "one")]
    pub count: u64,
}

fn one() -> u64 {
    1
}

/// `ward flows` filters; every field that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowFilter {
    /// Workload name, SPIFFE ID or address of the source.
    pub from: Option<String>,
    /// Workload name, SPIFFE ID or address of the destination, or the Service (`<namespace>/
    /// <name>`) a translated connection went to.
    pub to: Option<String>,
    pub verdict: Option<String>,
}

impl FlowFilter {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        let side = |want: &Option<String>, id: &str, workload: &str, addr: &str| {
            want.as_deref()
                .is_none_or(|w| w == id || w == workload || w == addr)
        };
        // A Service names the destination as well as its backend does.
        side(&self.from, &r.src, &r.src_workload, &r.src_addr)
            && (side(&self.to, &r.dst, &r.dst_workload, &r.dst_addr)
                || self.to.as_deref() == Some(r.service.as_str()))
            && self.verdict.as_deref().is_none_or(|v| v == r.verdict)
    }
}

pub struct FlowHub {
    live: broadcast::Sender<FlowRecord>,
    history: Mutex<VecDeque<FlowRecord>>,
    file: Option<Mutex<std::fs::File>>,
}

impl FlowHub {
    pub fn new(flow_log: Option<&Path>) -> std::io::Result<Self> {
        let file = match flow_log {
            Some(path) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                Some(Mutex::new(f))
            }
            None => None,
        };
        Ok(FlowHub {
            live: broadcast::channel(4096).0,
            history: Mutex::new(VecDeque::new()),
            file,
        })
    }

    pub fn publish(&self, record: FlowRecord) {
        if let Some(file) = &self.file {
            let mut line = serde_json::to_vec(&record).expect("flow records serialize");
            line.push(b'\n');
            if let Err(e) = file.lock().expect("flow log lock").write_all(&line) {
                tracing::warn!(error = %e, "writing the flow log failed");
            }
        }
        {
            let mut history = self.history.lock().expect("flow history lock");
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(record.clone());
        }
        // No subscriber is not an error.
        let _ = self.live.send(record);
    }

    pub fn recent(&self, filter: &FlowFilter) -> Vec<FlowRecord> {
        self.history
            .lock()
            .expect("flow history lock")
            .iter()
            .filter(|r| filter.matches(r))
            .cloned()
            .collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<FlowRecord> {
        self.live.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(verdict: &str) -> FlowRecord {
        FlowRecord {
            time: "t".into(),
            verdict: verdict.into(),
            direction: "egress".into(),
            policy: "p".into(),
            rule: "r".into(),
            src: "spiffe://x/a".into(),
            src_workload: "a".into(),
            dst: "spiffe://x/b".into(),
            dst_workload: "b".into(),
            src_addr: "-".into(),
            dst_addr: "10.0.0.2".into(),
            dst_port: 80,
            protocol: "tcp".into(),
            reason: String::new(),
            service: String::new(),
            count: 1,
        }
    }

    #[test]
    fn filters_match_by_workload_spiffe_id_address_and_verdict() {
        let r = record("deny");
        let f = |from: Option<&str>, to: Option<&str>, verdict: Option<&str>| FlowFilter {
            from: from.map(Into::into),
            to: to.map(Into::into),
            verdict: verdict.map(Into::into),
        };
        assert!(f(None, None, None).matches(&r));
        assert!(f(Some("a"), Some("10.0.0.2"), Some("deny")).matches(&r));
        assert!(f(Some("spiffe://x/a"), Some("b"), None).matches(&r));
        assert!(!f(Some("b"), None, None).matches(&r));
        assert!(!f(None, None, Some("allow")).matches(&r));
        let via = FlowRecord {
            service: "shop/db".into(),
            ..record("allow")
        };
        assert!(
            f(None, Some("shop/db"), None).matches(&via),
            "by its Service"
        );
        assert!(f(None, Some("b"), None).matches(&via), "and by its backend");
        assert!(!f(None, Some("shop/db"), None).matches(&r));
    }

    #[test]
    fn history_is_bounded_and_file_gets_json_lines() {
        let path = std::env::temp_dir().join(format!("ward-flows-{}.jsonl", std::process::id()));
        let hub = FlowHub::new(Some(&path)).expect("hub");
        for _ in 0..HISTORY + 5 {
            hub.publish(record("allow"));
        }
        assert_eq!(hub.recent(&FlowFilter::default()).len(), HISTORY);
        let text = std::fs::read_to_string(&path).expect("flow log");
        std::fs::remove_file(&path).expect("cleanup");
        assert_eq!(text.lines().count(), HISTORY + 5);
        let first: FlowRecord =
            serde_json::from_str(text.lines().next().expect("a line")).expect("json");
        assert_eq!(first, record("allow"));
    }
}
