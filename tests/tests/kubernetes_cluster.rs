//! ward on a Kubernetes cluster: the real `ward-control --kubernetes` reads Namespaces, Pods and
//! NetworkPolicies from the API, and real agents with `workloads: fromControlPlane` enforce their
//! node's pods, found by UID among cgroups laid out as kubelet lays them out (cgroupfs driver on
//! one node, systemd driver on the other), each node in a network namespace of its own.
//!
//! The API server is a STAND-IN (`ward_tests::kube_api`): no package provides a Kubernetes API
//! server on these machines. It speaks the API's list/watch protocol (resourceVersion, watch
//! events, bookmarks, `410 Gone`) over HTTP, from objects the test puts in.

mod support;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;
use ward_tests::{peer, Cluster, Outcome, Peer, Placement, Protocol};

const A: usize = 0;
const B: usize = 1;
const WEB_UID: &str = "3f1c2a4e-0000-4000-8000-00000000a001";
const OTHER_UID: &str = "3f1c2a4e-0000-4000-8000-00000000a002";
const CLIENT_UID: &str = "3f1c2a4e-0000-4000-8000-00000000b001";

fn namespace(name: &str, team: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, "team": team}},
    })
}

fn pod(name: &str, uid: &str, node: &str, app: &str, ip: &str) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "shop", "uid": uid,
            // Differs between a Deployment's ReplicaSets: not part of the identity.
            "labels": {"app": app, "pod-template-hash": format!("{name}-1")},
        },
        "spec": {
            "nodeName": node, "serviceAccountName": name,
            "containers": [{"name": "main", "image": "example", "ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    });
    if ip.is_empty() {
        // Scheduled, no address yet.
        pod["status"] = json!({"phase": "Pending"});
    }
    pod
}

/// The NetworkPolicy `shop/client-egress`: pods `app: client` may reach only `to`.
fn client_egress(to: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "client-egress", "namespace": "shop"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "client"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [to]}],
        },
    })
}

fn to_app(app: &str) -> Value {
    json!({"podSelector": {"matchLabels": {"app": app}}})
}

/// Connects from `at` until the outcome is `expected` (the change reaches the kernel some time
/// after the API change), for at most 20 s; returns how long it took.
fn until(
    cluster: &Cluster,
    peer: &Peer,
    to: SocketAddr,
    at: &Placement,
    expected: Outcome,
    what: &str,
) -> Duration {
    let start = Instant::now();
    loop {
        let (outcome, _) = attempt(peer, Protocol::Tcp, to, at, &[]);
        if outcome == expected {
            return start.elapsed();
        }
        if start.elapsed() > ward_tests::scaled(Duration::from_secs(20)) {
            let agents: Vec<String> = cluster
                .nodes()
                .iter()
                .filter(|n| n.is_running())
                .map(|n| format!("{}:\n{}", n.name, n.ward().log().tail(40)))
                .collect();
            panic!(
                "{what}: still {outcome:?}, not {expected:?}, 20 s after the change\n\
                 ward-control:\n{}\n{}",
                cluster.plane.logs(),
                agents.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts `outcome` now and for a while: nothing the cluster did changes it.
fn stays(peer: &Peer, to: SocketAddr, at: &Placement, expected: Outcome, what: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let (outcome, _) = attempt(peer, Protocol::Tcp, to, at, &[]);
        assert_eq!(outcome, expected, "{what}");
    }
}

#[test]
fn pods_labels_namespaces_and_network_policies_from_the_api_are_enforced_by_their_nodes() {
    let peer = peer!();
    let (mut cluster, api) = Cluster::kubernetes("k8s", 2);
    let (node_a, node_b) = (cluster.node(A).name.clone(), cluster.node(B).name.clone());
    let web_ip = cluster.node(A).address();
    let other_ip = cluster.node_mut(A).add_address();
    let client_ip = cluster.node(B).address();

    // Pod cgroups as kubelet makes them: cgroupfs driver on node A, systemd driver on node B.
    let web_cgroup = format!("kubepods/burstable/pod{WEB_UID}/ctr-web");
    let other_cgroup = format!("kubepods/besteffort/pod{OTHER_UID}/ctr-other");
    let client_cgroup = format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-1.scope",
        CLIENT_UID.replace('-', "_")
    );
    let web = peer.listen(
        Protocol::Tcp,
        &format!("{web_ip}:0"),
        &cluster.node(A).workload(&web_cgroup),
    );
    let other = peer.listen(
        Protocol::Tcp,
        &format!("{other_ip}:0"),
        &cluster.node(A).workload(&other_cgroup),
    );
    let client = cluster.node(B).workload(&client_cgroup);

    api.apply(namespace("shop", "a"));
    api.apply(pod("web", WEB_UID, &node_a, "web", &web_ip.to_string()));
    api.apply(pod(
        "other",
        OTHER_UID,
        &node_a,
        "other",
        &other_ip.to_string(),
    ));
    api.apply(pod(
        "client",
        CLIENT_UID,
        &node_b,
        "client",
        &client_ip.to_string(),
    ));
    api.apply(client_egress(to_app("web")));
    cluster.start_from_cluster(A, "", &[]);
    cluster.start_from_cluster(B, "", &[]);
    // Three service accounts, three pod addresses.
    for index in [A, B] {
        cluster.node(index).wait_known(0, 3, 3);
    }
    let status = cluster.node(B).ward().status();
    assert!(
        status.contains("shop/client"),
        "node B's agent reports the pod it found; status:\n{status}"
    );

    until(
        &cluster,
        &peer,
        web.addr,
        &client,
        Outcome::Ok,
        "client to web, allowed by the NetworkPolicy",
    );
    until(
        &cluster,
        &peer,
        other.addr,
        &client,
        Outcome::Eperm,
        "client to other, not allowed",
    );

    // The client's labels change: the policy selects it no more.
    api.apply(pod(
        "client",
        CLIENT_UID,
        &node_b,
        "client-v2",
        &client_ip.to_string(),
    ));
    until(
        &cluster,
        &peer,
        other.addr,
        &client,
        Outcome::Ok,
        "client relabelled: not isolated",
    );
    api.apply(pod(
        "client",
        CLIENT_UID,
        &node_b,
        "client",
        &client_ip.to_string(),
    ));
    until(
        &cluster,
        &peer,
        other.addr,
        &client,
        Outcome::Eperm,
        "client labelled back: isolated again",
    );

    // The NetworkPolicy changes, then selects by namespace labels.
    api.apply(client_egress(to_app("other")));
    until(
        &cluster,
        &peer,
        other.addr,
        &client,
        Outcome::Ok,
        "policy now allows other",
    );
    until(
        &cluster,
        &peer,
        web.addr,
        &client,
        Outcome::Eperm,
        "policy no longer allows web",
    );
    api.apply(client_egress(
        json!({"namespaceSelector": {"matchLabels": {"team": "a"}}}),
    ));
    until(
        &cluster,
        &peer,
        web.addr,
        &client,
        Outcome::Ok,
        "namespace team=a allowed",
    );
    api.apply(namespace("shop", "b"));
    until(
        &cluster,
        &peer,
        web.addr,
        &client,
        Outcome::Eperm,
        "namespace relabelled team=b",
    );

    // The watches are cut and the history compacted (the next watch gets 410 Gone and lists
    // again): nothing changes meanwhile, and a change made then arrives.
    api.apply(client_egress(to_app("web")));
    until(
        &cluster,
        &peer,
        web.addr,
        &client,
        Outcome::Ok,
        "policy allows web again",
    );
    let before = api.requests().len();
    api.compact();
    api.cut_watches();
    stays(
        &peer,
        web.addr,
        &client,
        Outcome::Ok,
        "web stays allowed while the watches are down",
    );
    stays(
        &peer,
        other.addr,
        &client,
        Outcome::Eperm,
        "other stays refused while the watches are down",
    );
    api.delete("v1", "Pod", Some("shop"), "web");
    until(
        &cluster,
        &peer,
        web.addr,
        &client,
        Outcome::Eperm,
        "web's pod deleted: its address is nobody's",
    );
    let relisted = api.requests()[before..]
        .iter()
        .any(|r| r.starts_with("GET /api/v1/pods") && !r.contains("watch=true"));
    assert!(
        relisted,
        "the pods were listed again after the 410; requests: {:?}",
        &api.requests()[before..]
    );

    // The API server answers errors and drops the watches: the watches retry, each failing kind
    // is logged once, and nothing changes meanwhile.
    let mark = cluster.plane.logs().len();
    api.fail_next(6, 500);
    api.cut_watches();
    stays(
        &peer,
        other.addr,
        &client,
        Outcome::Eperm,
        "other stays refused while the API answers errors",
    );
    let failures = cluster.plane.logs()[mark..]
        .matches("Kubernetes watch failed")
        .count();
    assert!(
        // At most once for each of the four watches.
        (1..=4).contains(&failures),
        "each failing watch is logged once, not {failures} times; log:\n{}",
        cluster.plane.logs()
    );

    // The NetworkPolicy is deleted: the client is isolated no more.
    api.delete(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        Some("shop"),
        "client-egress",
    );
    until(
        &cluster,
        &peer,
        other.addr,
        &client,
        Outcome::Ok,
        "no policy selects the client",
    );
    assert!(web.received() + other.received() > 0);
}

#[test]
fn a_network_policy_that_does_not_compile_is_refused_and_changes_nothing() {
    let peer = peer!();
    let (mut cluster, api) = Cluster::kubernetes("k8s-bad", 2);
    let node_a = cluster.node(A).name.clone();
    let node_b = cluster.node(B).name.clone();
    let web_ip = cluster.node(A).address();
    let client_ip = cluster.node(B).address();
    let web_cgroup = format!("kubepods/burstable/pod{WEB_UID}/ctr-web");
    let client_cgroup = format!("kubepods/burstable/pod{CLIENT_UID}/ctr-client");
    let web = peer.listen(
        Protocol::Tcp,
        &format!("{web_ip}:0"),
        &cluster.node(A).workload(&web_cgroup),
    );
    let client = cluster.node(B).workload(&client_cgroup);
    api.apply(namespace("shop", "a"));
    api.apply(pod("web", WEB_UID, &node_a, "web", &web_ip.to_string()));
    api.apply(pod(
        "client",
        CLIENT_UID,
        &node_b,
        "client",
        &client_ip.to_string(),
    ));
    api.apply(client_egress(to_app("web")));
    cluster.start_from_cluster(A, "", &[]);
    cluster.start_from_cluster(B, "", &[]);
    for index in [A, B] {
        cluster.node(index).wait_known(0, 2, 2);
    }
    until(
        &cluster,
        &peer,
        web.addr,
        &client,
        Outcome::Ok,
        "client to web allowed",
    );

    // A port that is no port: the API server's schema would refuse it; ward must too.
    let mut bad = client_egress(to_app("nobody"));
    bad["spec"]["egress"][0]["ports"] = json!([{"port": 70000}]);
    api.apply(bad);
    let logged = cluster.plane.wait_for_log(
        "NetworkPolicy refused",
        ward_tests::scaled(Duration::from_secs(10)),
    );
    assert!(
        logged,
        "ward-control says it refused the object; log:\n{}",
        cluster.plane.logs()
    );
    assert!(
        cluster
            .plane
            .logs()
            .contains("networkpolicies/shop/client-egress"),
        "the refusal names the object; log:\n{}",
        cluster.plane.logs()
    );
    stays(
        &peer,
        web.addr,
        &client,
        Outcome::Ok,
        "the previous version stays in force",
    );
    // Its owners see why, on the object: a Warning Event naming the field.
    let events = api.events();
    let event = events
        .iter()
        .find(|e| e["regarding"]["name"] == "client-egress")
        .unwrap_or_else(|| panic!("an Event on the NetworkPolicy; events: {events:#?}"));
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["kind"], "NetworkPolicy");
    let note = event["note"].as_str().unwrap_or_default();
    assert!(note.contains("ports") && note.contains("70000"), "{note}");
}

#[test]
fn with_unmapped_cgroups_denied_a_pod_talks_only_once_its_node_maps_it_and_host_network_pods_are_the_hosts(
) {
    const STRANGER_UID: &str = "3f1c2a4e-0000-4000-8000-00000000b002";
    const LATE_UID: &str = "3f1c2a4e-0000-4000-8000-00000000b003";
    const HOST_UID: &str = "3f1c2a4e-0000-4000-8000-00000000b004";
    const AGENT_UID: &str = "3f1c2a4e-0000-4000-8000-00000000b005";
    let peer = peer!();
    let (mut cluster, api) = Cluster::kubernetes("k8s-start", 2);
    let (node_a, node_b) = (cluster.node(A).name.clone(), cluster.node(B).name.clone());
    let web_ip = cluster.node(A).address();
    let web = peer.listen(
        Protocol::Tcp,
        &format!("{web_ip}:0"),
        &cluster
            .node(A)
            .workload(&format!("kubepods/burstable/pod{WEB_UID}/ctr-web")),
    );
    api.apply(namespace("shop", "a"));
    api.apply(pod("web", WEB_UID, &node_a, "web", &web_ip.to_string()));
    let mut host_pod = pod("proxy", HOST_UID, &node_b, "proxy", "");
    host_pod["spec"]["hostNetwork"] = true.into();
    api.apply(host_pod);
    // The agent's own pod, as the DaemonSet gives it (WARD_POD_UID from the downward API).
    cluster.start_from_cluster(A, "unmappedCgroups: deny\n", &[]);
    cluster.start_from_cluster(B, "unmappedCgroups: deny\n", &["--pod-uid", AGENT_UID]);
    for index in [A, B] {
        cluster.node(index).wait_known(0, 1, 1);
    }

    // A pod cgroup nobody told the agent about is refused, whatever it connects to.
    let stranger = cluster
        .node(B)
        .workload(&format!("kubepods/besteffort/pod{STRANGER_UID}/c"));
    let (outcome, _) = attempt(&peer, Protocol::Tcp, web.addr, &stranger, &[]);
    assert_eq!(outcome, Outcome::Eperm, "an unmapped pod cgroup is refused");
    // A host-network pod is the host's: not refused once its cgroup is mapped (the cgroup is
    // new; until the agent sees it, it is as unmapped as any).
    let host = cluster
        .node(B)
        .workload(&format!("kubepods/besteffort/pod{HOST_UID}/c"));
    until(
        &cluster,
        &peer,
        web.addr,
        &host,
        Outcome::Ok,
        "a host-network pod",
    );
    // Nor is the agent's own pod, which the API has not told it about.
    let agent = cluster
        .node(B)
        .workload(&format!("kubepods/besteffort/pod{AGENT_UID}/c"));
    until(
        &cluster,
        &peer,
        web.addr,
        &agent,
        Outcome::Ok,
        "the agent's own pod",
    );
    // Once the API has the pod, its node maps the cgroup that was already there.
    api.apply(pod("stranger", STRANGER_UID, &node_b, "stranger", ""));
    until(
        &cluster,
        &peer,
        web.addr,
        &stranger,
        Outcome::Ok,
        "the pod is mapped once the API has it",
    );

    // As kubelet does it: the pod is on the node in the API, then its cgroup is created. From
    // the cgroup's creation to the first connection the kernel allows:
    let mark = cluster.node(B).ward().log_len();
    api.apply(pod("late", LATE_UID, &node_b, "late", ""));
    cluster
        .node(B)
        .wait_applied(mark, "", ward_tests::scaled(Duration::from_secs(20)));
    let cgroup = format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-2.scope",
        LATE_UID.replace('-', "_")
    );
    let created = Instant::now();
    let late = cluster.node(B).workload(&cgroup);
    let mut refused = 0;
    loop {
        let (outcome, _) = attempt(&peer, Protocol::Tcp, web.addr, &late, &[]);
        match outcome {
            Outcome::Ok => break,
            Outcome::Eperm => refused += 1,
            other => panic!("the new pod's connection: {other:?}"),
        }
        assert!(
            created.elapsed() < ward_tests::scaled(Duration::from_secs(20)),
            "the new pod's cgroup was not mapped within 20 s"
        );
    }
    eprintln!(
        "pod cgroup created -> first allowed connection: {:.1} ms ({refused} refused before)",
        created.elapsed().as_secs_f64() * 1e3
    );
    assert!(web.received() > 0);
}

#[test]
fn ward_policy_objects_are_enforced_and_a_bad_one_is_refused_with_an_event() {
    let peer = peer!();
    let (mut cluster, api) = Cluster::kubernetes("k8s-crd", 2);
    let (node_a, node_b) = (cluster.node(A).name.clone(), cluster.node(B).name.clone());
    let web_ip = cluster.node(A).address();
    let other_ip = cluster.node_mut(A).add_address();
    let client_ip = cluster.node(B).address();
    let web = peer.listen(
        Protocol::Tcp,
        &format!("{web_ip}:0"),
        &cluster
            .node(A)
            .workload(&format!("kubepods/burstable/pod{WEB_UID}/ctr-web")),
    );
    let other = peer.listen(
        Protocol::Tcp,
        &format!("{other_ip}:0"),
        &cluster
            .node(A)
            .workload(&format!("kubepods/burstable/pod{OTHER_UID}/ctr-other")),
    );
    let client = cluster
        .node(B)
        .workload(&format!("kubepods/burstable/pod{CLIENT_UID}/ctr-client"));
    api.apply(namespace("shop", "a"));
    api.apply(pod("web", WEB_UID, &node_a, "web", &web_ip.to_string()));
    api.apply(pod(
        "other",
        OTHER_UID,
        &node_a,
        "other",
        &other_ip.to_string(),
    ));
    api.apply(pod(
        "client",
        CLIENT_UID,
        &node_b,
        "client",
        &client_ip.to_string(),
    ));
    // ward's own Policy, as the CRD (deploy/kubernetes/crd.yaml) holds it: cluster-scoped.
    let ward_policy = |to: &str| {
        json!({
            "apiVersion": "ward.dev/v1", "kind": "Policy",
            "metadata": {"name": "client-egress"},
            "spec": {
                "selector": {"labels": {"app": "client"}},
                "egress": [{"name": "to-app", "to": [{"labels": {"app": to}}]}],
            },
        })
    };
    api.apply(ward_policy("web"));
    cluster.start_from_cluster(A, "", &[]);
    cluster.start_from_cluster(B, "", &[]);
    for index in [A, B] {
        cluster.node(index).wait_known(0, 3, 3);
    }
    until(
        &cluster,
        &peer,
        web.addr,
        &client,
        Outcome::Ok,
        "the Policy allows web",
    );
    until(
        &cluster,
        &peer,
        other.addr,
        &client,
        Outcome::Eperm,
        "and nothing else",
    );

    // A field the policy language does not have: refused, the previous version stays.
    let mut bad = ward_policy("other");
    bad["spec"]["egress"][0]["bogus"] = true.into();
    api.apply(bad);
    assert!(
        cluster.plane.wait_for_log(
            "policies/client-egress",
            ward_tests::scaled(Duration::from_secs(10))
        ),
        "the refusal names the object; log:\n{}",
        cluster.plane.logs()
    );
    stays(
        &peer,
        other.addr,
        &client,
        Outcome::Eperm,
        "the bad version is not in force",
    );
    stays(
        &peer,
        web.addr,
        &client,
        Outcome::Ok,
        "the previous version is",
    );
    let events = api.events();
    let event = events
        .iter()
        .find(|e| e["regarding"]["kind"] == "Policy")
        .unwrap_or_else(|| panic!("an Event on the Policy; events: {events:#?}"));
    assert!(
        event["note"].as_str().unwrap_or_default().contains("bogus"),
        "{event:#}"
    );

    // Fixed: in force.
    api.apply(ward_policy("other"));
    until(
        &cluster,
        &peer,
        other.addr,
        &client,
        Outcome::Ok,
        "the fixed Policy allows other",
    );
    until(
        &cluster,
        &peer,
        web.addr,
        &client,
        Outcome::Eperm,
        "and no longer web",
    );
}
