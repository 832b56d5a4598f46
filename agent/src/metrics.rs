//! Prometheus metrics: kernel verdict counters (exact), verdict events by policy, shed and lost
//! events, map fill levels, policy apply latency; served over HTTP at `/metrics`.
use std::{net::SocketAddr, sync::Arc, sync::Mutex};

use agent_common::{
    counters, DIRECTION_EGRESS, DIRECTION_INGRESS, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
};
use aya::maps::{MapData, PerCpuArray};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub direction: String,
    pub verdict: String,
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KernelVerdictLabels {
    direction: &'static str,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

struct KernelCounters {
    map: PerCpuArray<MapData, u64>,
    seen: [u64; counters::COUNT as usize],
}

pub struct Metrics {
    registry: Registry,
    pub verdict_events: Family<VerdictLabels, Counter>,
    kernel_verdicts: Family<KernelVerdictLabels, Counter>,
    events_shed: Counter,
    events_lost: Counter,
    pub map_entries: Family<MapLabels, Gauge>,
    pub map_capacity: Family<MapLabels, Gauge>,
    pub policy_apply_seconds: Histogram,
    pub policy_apply_failures: Counter,
    pub policy_generation: Gauge,
    /// DNS queries the proxy answered, by result (`forwarded`, `refused`, `failed`, `malformed`).
    pub dns_queries: Family<DnsQueryLabels, Counter>,
    pub dns_learned: Gauge,
    pub dns_names: Gauge,
    pub dns_learned_evictions: Counter,
    kernel: Option<Mutex<KernelCounters>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsQueryLabels {
    pub result: &'static str,
}

impl Metrics {
    pub fn new(kernel_counters: Option<PerCpuArray<MapData, u64>>) -> Self {
        let mut registry = Registry::with_prefix("ward");
        let m = Metrics {
            verdict_events: Family::default(),
            kernel_verdicts: Family::default(),
            events_shed: Counter::default(),
            events_lost: Counter::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            policy_apply_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            policy_apply_failures: Counter::default(),
            policy_generation: Gauge::default(),
            dns_queries: Family::default(),
            dns_learned: Gauge::default(),
            dns_names: Gauge::default(),
            dns_learned_evictions: Counter::default(),
            kernel: kernel_counters.map(|map| {
                Mutex::new(KernelCounters {
                    map,
                    seen: [0; counters::COUNT as usize],
                })
            }),
            registry: Registry::default(),
        };
        registry.register(
            "verdicts",
            "Verdicts the kernel made, by direction and verdict (exact)",
            m.kernel_verdicts.clone(),
        );
        registry.register(
            "verdict_events",
            "Verdicts reported to user space, by policy: every allowed flow (counted in the kernel), refusals and audits as events (rate-limited per flow)",
            m.verdict_events.clone(),
        );
        registry.register(
            "events_shed",
            "Verdict events not reported because their flow was over its budget",
            m.events_shed.clone(),
        );
        registry.register(
            "events_lost",
            "Verdict events lost because the ring buffer was full",
            m.events_lost.clone(),
        );
        registry.register(
            "map_entries",
            "Entries in a kernel map",
            m.map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Maximum entries of a kernel map",
            m.map_capacity.clone(),
        );
        registry.register(
            "policy_apply_seconds",
            "Time to write a policy generation into the kernel",
            m.policy_apply_seconds.clone(),
        );
        registry.register(
            "policy_apply_failures",
            "Policy reloads and control-plane updates refused (bad policy or kernel error)",
            m.policy_apply_failures.clone(),
        );
        registry.register(
            "policy_generation",
            "Policy generation in force",
            m.policy_generation.clone(),
        );
        registry.register(
            "dns_queries",
            "DNS queries the DNS proxy handled, by result",
            m.dns_queries.clone(),
        );
        registry.register(
            "dns_learned_addresses",
            "(workload, address) pairs learned from DNS answers and held",
            m.dns_learned.clone(),
        );
        registry.register(
            "dns_learned_names",
            "DNS names the held learned addresses came from",
            m.dns_names.clone(),
        );
        registry.register(
            "dns_learned_evictions",
            "Learned addresses evicted because dns.maxLearned was reached",
            m.dns_learned_evictions.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Brings the kernel's per-CPU counters into the registry, then encodes everything.
    pub fn render(&self) -> String {
        if let Some(kernel) = &self.kernel {
            let mut k = kernel.lock().expect("kernel counters lock");
            let mut read = |index: u32| -> u64 {
                let total: u64 = k.map.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0);
                let delta = total.saturating_sub(k.seen[index as usize]);
                k.seen[index as usize] = total;
                delta
            };
            for (direction, dname) in [(DIRECTION_INGRESS, "ingress"), (DIRECTION_EGRESS, "egress")]
            {
                for (verdict, vname) in [
                    (VERDICT_ALLOW, "allow"),
                    (VERDICT_DENY, "deny"),
                    (VERDICT_AUDIT, "audit"),
                ] {
                    let delta = read(counters::verdict(direction, verdict));
                    self.kernel_verdicts
                        .get_or_create(&KernelVerdictLabels {
                            direction: dname,
                            verdict: vname,
                        })
                        .inc_by(delta);
                }
            }
            self.events_shed.inc_by(read(counters::EVENTS_SHED));
            self.events_lost.inc_by(read(counters::EVENTS_LOST));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding to a String cannot fail");
        out
    }

    pub fn set_map(&self, map: &'static str, entries: usize, capacity: u32) {
        self.map_entries
            .get_or_create(&MapLabels { map })
            .set(entries as i64);
        self.map_capacity
            .get_or_create(&MapLabels { map })
            .set(i64::from(capacity));
    }
}

/// Serves `GET /metrics` until the agent stops.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics at /metrics");
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_encodes_prefixed_families() {
        let m = Metrics::new(None);
        m.verdict_events
            .get_or_create(&VerdictLabels {
                direction: "egress".into(),
                verdict: "deny".into(),
                policy: "p".into(),
            })
            .inc();
        m.set_map("ward_policy_v2", 3, 10);
        let text = m.render();
        assert!(
            text.contains(
                r#"ward_verdict_events_total{direction="egress",verdict="deny",policy="p"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"ward_map_entries{map="ward_policy_v2"} 3"#),
            "{text}"
        );
    }
}
