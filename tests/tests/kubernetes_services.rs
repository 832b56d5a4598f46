//! The real `ward-control --kubernetes` against the stand-in API server (`ward_tests::kube_api`):
//! the SERVICE resources it builds from Services and EndpointSlices, as the agent's own
//! control-plane client (`ward_agent::control`) holds them once it has checked them by the agent's
//! rules. Needs no root: no agent enforces anything here.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use ward_agent::control::{ControlPlaneConfig, RemoteState, RemoteUpdate};
use ward_control::test_helpers::{ControlPlane, ControlPlaneOptions};
use ward_tests::{control_bin, unique_name, KubeApi};

const WAIT: Duration = Duration::from_secs(20);

/// A directory of the test's own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `ward-control --kubernetes` reading `api`, with its directories in `dir`.
fn plane_reading(api: &KubeApi, dir: &Path) -> ControlPlane {
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let mut opts = ControlPlaneOptions::new(control_bin(), dir.join("plane"));
    opts.extra_args = vec![
        "--kubernetes".into(),
        "--kubeconfig".into(),
        kubeconfig.to_string_lossy().into_owned(),
    ];
    ControlPlane::start(opts)
}

/// The agent's control-plane client for node `node`, as the agent runs it.
struct Agent {
    updates: mpsc::Receiver<RemoteUpdate>,
    _reports: watch::Sender<Vec<ward_agent::control::ReportedWorkload>>,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    fn start(plane: &ControlPlane, dir: &Path, node: &str) -> Agent {
        let token_file = dir.join(format!("{node}.token"));
        std::fs::write(&token_file, plane.new_token(Some(node))).expect("write the token file");
        let cfg = ControlPlaneConfig {
            address: plane.address.to_string(),
            node_name: node.into(),
            join_token_file: Some(token_file),
            ca_file: plane.ca_file(),
            state_dir: dir.join(format!("{node}-state")),
            server_name: ward_agent::control::DEFAULT_SERVER_NAME.into(),
        };
        let (reports, reports_rx) = watch::channel(Vec::new());
        let (tx, updates) = mpsc::channel(1);
        let task = tokio::spawn(async move {
            ward_agent::control::run(cfg, None, reports_rx, tx)
                .await
                .expect("a valid configuration");
        });
        Agent {
            updates,
            _reports: reports,
            task,
        }
    }

    /// Applies (ACKs) updates until one satisfies `done`; returns that state.
    async fn until(
        &mut self,
        plane: &ControlPlane,
        what: &str,
        done: impl Fn(&RemoteState) -> bool,
    ) -> RemoteState {
        let deadline = Instant::now() + ward_tests::scaled(WAIT);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(update) = tokio::time::timeout(left, self.updates.recv()).await else {
                panic!("never reached: {what}\nward-control:\n{}", plane.logs());
            };
            let update = update.expect("the client runs");
            let state = update.state.clone();
            update
                .ack
                .send(Ok(()))
                .expect("the client waits for the answer");
            if done(&state) {
                return state;
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn service(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    })
}

/// `shop/web`'s EndpointSlice: `web-0` at 10.1.0.5 and `web-1` at 10.1.0.6, ready or not, serving
/// port `http` on 8080.
fn web_slice(web_1_ready: bool) -> Value {
    let endpoint = |address: &str, pod: &str, ready: Option<bool>| {
        let mut e = json!({"addresses": [address],
                           "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}});
        if let Some(ready) = ready {
            e["conditions"] = json!({"ready": ready});
        }
        e
    };
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-x7k2p", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [endpoint("10.1.0.5", "web-0", None),
                      endpoint("10.1.0.6", "web-1", Some(web_1_ready))],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

fn backends(state: &RemoteState, key: &str) -> Option<Vec<(String, u16, Option<String>)>> {
    let service = state.services.iter().find(|s| s.key() == key)?;
    Some(
        service
            .ports
            .iter()
            .flat_map(|p| &p.backends)
            .map(|b| (b.address.to_string(), b.port, b.pod.clone()))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_their_ready_endpoints_reach_every_agent_and_follow_the_cluster() {
    let dir = TempDir::new("k8s-services");
    let api = KubeApi::start();
    let web = json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]});
    api.apply(service("web", web));
    api.apply(web_slice(true));
    // Nothing to translate: headless.
    api.apply(service(
        "db",
        json!({"clusterIP": "None", "ports": [{"port": 5432}]}),
    ));
    // A Service kube cannot read (the API server would refuse it): left out alone.
    api.apply(service(
        "bad",
        json!({"clusterIP": "10.96.0.11", "ports": [{"port": "http"}]}),
    ));
    let plane = plane_reading(&api, &dir.0);
    let mut agent = Agent::start(&plane, &dir.0, "node-a");

    let state = agent
        .until(&plane, "shop/web with both backends", |s| {
            backends(s, "shop/web").is_some_and(|b| b.len() == 2)
        })
        .await;
    let pod = |name: &str| Some(format!("shop/{name}"));
    assert_eq!(
        backends(&state, "shop/web"),
        Some(vec![
            ("10.1.0.5".into(), 8080, pod("web-0")),
            ("10.1.0.6".into(), 8080, pod("web-1")),
        ])
    );
    let names: Vec<String> = state.services.iter().map(|s| s.key()).collect();
    assert_eq!(names, ["shop/web"], "neither headless nor unreadable");
    assert!(
        plane.wait_for_log("shop/bad", WAIT),
        "the Service it cannot read is named in the log:\n{}",
        plane.logs()
    );

    // web-1 is no longer ready: it is no backend.
    api.apply(web_slice(false));
    let state = agent
        .until(&plane, "web-1 gone from shop/web", |s| {
            backends(s, "shop/web").is_some_and(|b| b.len() == 1)
        })
        .await;
    assert_eq!(
        backends(&state, "shop/web"),
        Some(vec![("10.1.0.5".into(), 8080, pod("web-0"))])
    );

    // A new agent gets the same Services.
    let mut other = Agent::start(&plane, &dir.0, "node-b");
    other
        .until(&plane, "node-b holds shop/web", |s| {
            backends(s, "shop/web").is_some_and(|b| b.len() == 1)
        })
        .await;

    // The Service is deleted: it goes from every agent.
    api.delete("v1", "Service", Some("shop"), "web");
    agent
        .until(&plane, "shop/web gone", |s| s.services.is_empty())
        .await;
    other
        .until(&plane, "shop/web gone from node-b", |s| {
            s.services.is_empty()
        })
        .await;
}
