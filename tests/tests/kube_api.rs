//! kube-rs's watcher, the client ward-control watches the Kubernetes API with, against the
//! stand-in API server: the stand-in speaks the protocol the way kube expects it, through the
//! recoveries a real API server puts a client through (a restart, a compaction), and with the
//! Services and EndpointSlices ward-control builds SERVICE resources from. Needs no root.

use std::pin::pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Config, ResourceExt};
use serde_json::{json, Value};
use ward_tests::{unique_name, KubeApi};

fn pod(name: &str, uid: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "apps", "uid": uid, "labels": {"app": name}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "main", "image": "example/app:1"}]},
    })
}

/// A kube client configured the way an operator's kubeconfig would configure it.
async fn client_of(api: &KubeApi) -> Client {
    let path = std::env::temp_dir().join(format!("{}.kubeconfig", unique_name("kube-api")));
    api.write_kubeconfig(&path);
    let kubeconfig = Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("kube reads {}: {e}", path.display()));
    std::fs::remove_file(&path).unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("kube takes the kubeconfig: {e}"));
    Client::try_from(config).unwrap_or_else(|e| panic!("a kube client: {e}"))
}

/// What the watcher yields, as names: `Init`, `InitApply p`, `InitDone`, `Apply p`, `Delete p`,
/// or the error with its HTTP code (`WatchError 410`, `WatchStartFailed 503`).
async fn next(
    api: &KubeApi,
    stream: &mut (impl Stream<Item = watcher::Result<Event<Pod>>> + Unpin),
) -> String {
    let item = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap_or_else(|_| {
            let requests = api.requests();
            panic!("the watcher yielded nothing for 10 s; requests so far: {requests:#?}")
        })
        .expect("a watcher never ends");
    match item {
        Ok(Event::Init) => "Init".into(),
        Ok(Event::InitApply(p)) => format!("InitApply {}", p.name_any()),
        Ok(Event::InitDone) => "InitDone".into(),
        Ok(Event::Apply(p)) => format!("Apply {}", p.name_any()),
        Ok(Event::Delete(p)) => format!("Delete {}", p.name_any()),
        Err(watcher::Error::WatchError(status)) => format!("WatchError {}", status.code),
        Err(watcher::Error::WatchStartFailed(kube::Error::Api(status))) => {
            format!("WatchStartFailed {}", status.code)
        }
        Err(e) => panic!("the watcher failed: {e}"),
    }
}

async fn expect(
    api: &KubeApi,
    stream: &mut (impl Stream<Item = watcher::Result<Event<Pod>>> + Unpin),
    expected: &[&str],
) {
    for want in expected {
        assert_eq!(next(api, stream).await, *want);
    }
}

/// The index of the first request after `after` that starts with `prefix` and contains `part`.
fn request_index(api: &KubeApi, after: usize, prefix: &str, part: &str) -> usize {
    let requests = api.requests();
    requests
        .iter()
        .enumerate()
        .skip(after)
        .find(|(_, r)| r.starts_with(prefix) && r.contains(part))
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("no request {prefix}…{part}… after #{after}: {requests:#?}"))
}

const LIST: &str = "GET /api/v1/pods?";

#[tokio::test]
async fn kube_watcher_lists_watches_resumes_and_relists_against_the_stand_in() {
    let api = KubeApi::start();
    api.apply(pod("web", "11111111-1111-1111-1111-111111111111"));
    api.apply(pod("db", "22222222-2222-2222-2222-222222222222"));
    let pods: Api<Pod> = Api::all(client_of(&api).await);
    let mut stream = pin!(watcher::watcher(pods, watcher::Config::default()));

    // The initial list, sorted as the stand-in keeps them (namespace, then name).
    expect(
        &api,
        &mut stream,
        &["Init", "InitApply db", "InitApply web", "InitDone"],
    )
    .await;
    let listed = request_index(&api, 0, LIST, "");
    assert!(
        !api.requests()[listed].contains("watch="),
        "the watcher lists first: {:#?}",
        api.requests()
    );

    api.apply(pod("cache", "33333333-3333-3333-3333-333333333333"));
    expect(&api, &mut stream, &["Apply cache"]).await;
    api.delete("v1", "Pod", Some("apps"), "web");
    expect(&api, &mut stream, &["Delete web"]).await;
    let first_watch = request_index(&api, listed, LIST, "watch=true");
    assert!(
        api.requests()[first_watch].contains("resourceVersion=2"),
        "{:#?}",
        api.requests()
    );

    // An API server restart: the watch ends and resumes from the last revision seen (4).
    api.cut_watches();
    api.apply(pod("queue", "44444444-4444-4444-4444-444444444444"));
    expect(&api, &mut stream, &["Apply queue"]).await;
    let resumed = request_index(&api, first_watch + 1, LIST, "watch=true");
    assert!(
        api.requests()[resumed].contains("resourceVersion=4"),
        "{:#?}",
        api.requests()
    );

    // A compaction past the watcher's revision (5; the Namespace takes 6), then a restart: the
    // resumed watch gets 410 Expired and the watcher lists again.
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}}));
    api.compact_and_cut_watches();
    expect(
        &api,
        &mut stream,
        &[
            "WatchError 410",
            "Init",
            "InitApply cache",
            "InitApply db",
            "InitApply queue",
            "InitDone",
        ],
    )
    .await;
    let expired = request_index(&api, resumed + 1, LIST, "resourceVersion=5");
    assert!(
        api.requests()[expired].contains("watch=true"),
        "{:#?}",
        api.requests()
    );
    let relisted = request_index(&api, expired + 1, LIST, "");
    assert!(
        !api.requests()[relisted].contains("watch="),
        "a list follows the 410: {:#?}",
        api.requests()
    );

    api.apply(pod("late", "55555555-5555-5555-5555-555555555555"));
    expect(&api, &mut stream, &["Apply late"]).await;
    let rewatched = request_index(&api, relisted + 1, LIST, "watch=true");
    assert!(
        api.requests()[rewatched].contains("resourceVersion=6"),
        "{:#?}",
        api.requests()
    );

    // An API server answering errors. 503 (like 429 and 504) kube's client retries by itself
    // (Config::default_retry): the watcher sees nothing of it, and resumes from 7.
    api.fail_next(1, 503);
    api.cut_watches();
    api.delete("v1", "Pod", Some("apps"), "late");
    expect(&api, &mut stream, &["Delete late"]).await;
    let unavailable = request_index(&api, rewatched + 1, LIST, "resourceVersion=7");
    let retried = request_index(&api, unavailable + 1, LIST, "resourceVersion=7");
    assert!(
        api.requests()[retried].contains("watch=true"),
        "{:#?}",
        api.requests()
    );
    // Any other error reaches the watcher, which tries again from the same revision (8).
    api.fail_next(1, 500);
    api.cut_watches();
    expect(&api, &mut stream, &["WatchStartFailed 500"]).await;
    api.apply(pod("last", "66666666-6666-6666-6666-666666666666"));
    expect(&api, &mut stream, &["Apply last"]).await;
    let failed = request_index(&api, retried + 1, LIST, "resourceVersion=8");
    request_index(&api, failed + 1, LIST, "resourceVersion=8");
}

/// What the watcher yields, as `Init`, `InitApply <name>`, `InitDone`, `Apply <name>` or
/// `Delete <name>`, for any kind.
async fn next_of<K: kube::Resource>(
    stream: &mut (impl Stream<Item = watcher::Result<Event<K>>> + Unpin),
) -> String {
    let item = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the watcher yielded something within 10 s")
        .expect("a watcher never ends");
    match item {
        Ok(Event::Init) => "Init".into(),
        Ok(Event::InitApply(o)) => format!("InitApply {}", o.name_any()),
        Ok(Event::InitDone) => "InitDone".into(),
        Ok(Event::Apply(o)) => format!("Apply {}", o.name_any()),
        Ok(Event::Delete(o)) => format!("Delete {}", o.name_any()),
        Err(e) => panic!("the watcher failed: {e}"),
    }
}

fn service(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "apps"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
    })
}

fn endpoint_slice(name: &str, service: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "apps",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": ready},
                       "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "apps"}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

#[tokio::test]
async fn kube_lists_and_watches_services_and_endpoint_slices_against_the_stand_in() {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    let api = KubeApi::start();
    api.apply(service("web"));
    api.apply(endpoint_slice("web-abc", "web", true));
    api.apply(endpoint_slice("db-abc", "db", true));
    let client = client_of(&api).await;

    let services: Api<Service> = Api::all(client.clone());
    let mut services = pin!(watcher::watcher(services, watcher::Config::default()));
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let mut slices = pin!(watcher::watcher(slices, watcher::Config::default()));
    for want in ["Init", "InitApply web", "InitDone"] {
        assert_eq!(next_of(&mut services).await, want);
    }
    for want in ["Init", "InitApply db-abc", "InitApply web-abc", "InitDone"] {
        assert_eq!(next_of(&mut slices).await, want);
    }

    // The endpoint turns not ready, the slice goes, the Service goes.
    api.apply(endpoint_slice("web-abc", "web", false));
    assert_eq!(next_of(&mut slices).await, "Apply web-abc");
    api.delete(
        "discovery.k8s.io/v1",
        "EndpointSlice",
        Some("apps"),
        "web-abc",
    );
    assert_eq!(next_of(&mut slices).await, "Delete web-abc");
    api.delete("v1", "Service", Some("apps"), "web");
    assert_eq!(next_of(&mut services).await, "Delete web");
    let requests = api.requests();
    for path in [
        "GET /api/v1/services?",
        "GET /apis/discovery.k8s.io/v1/endpointslices?",
    ] {
        assert!(
            requests
                .iter()
                .any(|r| r.starts_with(path) && r.contains("watch=true")),
            "{path}…watch=true: {requests:#?}"
        );
    }

    // What kube reads of them, and a list by the label that ties a slice to its Service.
    api.apply(endpoint_slice("web-def", "web", true));
    let in_apps: Api<EndpointSlice> = Api::namespaced(client, "apps");
    let listed = in_apps
        .list(&kube::api::ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .expect("a list of EndpointSlices");
    assert_eq!(listed.items.len(), 1);
    let slice = &listed.items[0];
    assert_eq!(slice.name_any(), "web-def");
    let endpoint = &slice.endpoints.as_ref().expect("endpoints")[0];
    assert_eq!(endpoint.addresses, ["10.1.0.5"]);
    assert_eq!(
        endpoint.conditions.as_ref().and_then(|c| c.ready),
        Some(true)
    );
    assert_eq!(
        slice.ports.as_ref().expect("ports")[0].port,
        Some(8080),
        "the port the endpoints serve on"
    );
}
