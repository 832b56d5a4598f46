//! kube-rs's watcher, the client ward-control watches the Kubernetes API with, against the
//! stand-in API server: the stand-in speaks the protocol the way kube expects it, through the
//! recoveries a real API server puts a client through (a restart, a compaction). Needs no root.

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
    api.compact();
    api.cut_watches();
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
