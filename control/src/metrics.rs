//! ward-control's Prometheus metrics, liveness and readiness, served over plain HTTP
//! (`--metrics-listen`): `/metrics`, `/healthz` and `/readyz`.
//!
//! Events (a policy version recorded, a set refused, a webhook POST given up) are counted where
//! they happen, in [`counters`]; what the control plane holds (nodes, lagging nodes, identities,
//! streams, whether it is cut off from its store) is read from the hub at each scrape.
use std::sync::{Arc, LazyLock};

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};

use crate::hub::Hub;

/// The counters of this process's events.
pub struct Counters {
    /// Policy history versions this replica recorded (each one "policy changed" event).
    pub policy_changes: Counter,
    /// Policy sets refused whole (the previous set stays served).
    pub policy_refusals: Counter,
    /// History records whose webhook POST failed every attempt, or found the queue full.
    pub webhook_failures: Counter,
    /// Store calls tried again after a transport failure.
    pub store_retries: Counter,
}

static COUNTERS: LazyLock<Counters> = LazyLock::new(|| Counters {
    policy_changes: Counter::default(),
    policy_refusals: Counter::default(),
    webhook_failures: Counter::default(),
    store_retries: Counter::default(),
});

pub fn counters() -> &'static Counters {
    &COUNTERS
}

/// The metrics text now (OpenMetrics).
pub fn render(hub: &Hub) -> String {
    let mut registry = Registry::with_prefix("ward_control");
    let c = counters();
    registry.register(
        "policy_changes",
        "Policy history versions this replica recorded (one \"policy changed\" event each)",
        c.policy_changes.clone(),
    );
    registry.register(
        "policy_refusals",
        "Policy sets refused whole; the previous set stayed served",
        c.policy_refusals.clone(),
    );
    registry.register(
        "webhook_failures",
        "History records the webhook did not take (every attempt failed, or the queue was full)",
        c.webhook_failures.clone(),
    );
    registry.register(
        "store_retries",
        "Store (etcd) calls tried again after a transport failure",
        c.store_retries.clone(),
    );
    let status = crate::node_status::of(hub);
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: i64| {
        let g: Gauge = Gauge::default();
        g.set(value);
        registry.register(name, help, g);
    };
    let count = |f: &dyn Fn(&crate::node_status::NodeStatus) -> bool| {
        status.nodes.iter().filter(|n| f(n)).count() as i64
    };
    gauge(
        &mut registry,
        "policy_history_version",
        "The policy history version served (0: none recorded)",
        status.served_history_version.unwrap_or(0) as i64,
    );
    gauge(
        &mut registry,
        "nodes",
        "Nodes seen: connected to this replica, or known from the shared store",
        count(&|_| true),
    );
    gauge(
        &mut registry,
        "nodes_connected",
        "Nodes whose agent has a stream to this replica",
        count(&|n| n.connected),
    );
    gauge(
        &mut registry,
        "nodes_lagging",
        "Nodes not enforcing the policy version served (`ward-control status` names them)",
        count(&|n| n.lagging),
    );
    gauge(
        &mut registry,
        "agent_streams",
        "Agent streams this replica serves",
        hub.sessions() as i64,
    );
    gauge(
        &mut registry,
        "identities",
        "Workload identities numbered",
        hub.len(ward_proto::ResourceType::Identity) as i64,
    );
    gauge(
        &mut registry,
        "revoked_certificates",
        "Certificate serial numbers revoked",
        hub.revoked().len() as i64,
    );
    gauge(
        &mut registry,
        "store_cut_off",
        "1 while this replica cannot reach its store (etcd) and refuses agents",
        i64::from(hub.is_cut_off()),
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("encoding to a String cannot fail");
    out
}

/// Serves `/metrics`, `/healthz` (the process answers) and `/readyz` (it serves agents: not cut
/// off from its store, not shutting down) until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, hub: Arc<Hub>) -> std::io::Result<()> {
    use axum::{http::StatusCode, routing::get};
    let (metrics_hub, ready_hub) = (hub.clone(), hub);
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let hub = metrics_hub.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        render(&hub),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let hub = ready_hub.clone();
                async move {
                    if hub.is_closing() {
                        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
                    } else if hub.is_cut_off() {
                        (StatusCode::SERVICE_UNAVAILABLE, "cut off from the store\n")
                    } else {
                        (StatusCode::OK, "ready\n")
                    }
                }
            }),
        );
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    }
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_name_what_the_hub_holds() {
        let hub = Hub::new(crate::registry::Registry::new("example.org"), "PEM", 1);
        let text = render(&hub);
        for family in [
            "ward_control_policy_changes_total",
            "ward_control_policy_refusals_total",
            "ward_control_nodes_lagging 0",
            "ward_control_store_cut_off 0",
            "ward_control_policy_history_version 0",
        ] {
            assert!(text.contains(family), "{family} missing from:\n{text}");
        }
        hub.set_cut_off(true);
        assert!(render(&hub).contains("ward_control_store_cut_off 1"));
    }
}
