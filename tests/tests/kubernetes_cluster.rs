//! ward on a Kubernetes cluster: the real `ward-control --kubernetes` reads Namespaces, Pods,
//! NetworkPolicies and ward's Policies from the API, and real agents with
//! `workloads: fromControlPlane` enforce their node's pods, found by UID among cgroups laid out
//! as kubelet lays them out (cgroupfs driver on one node, systemd driver on the other), each node
//! in a network namespace of its own and pods in network namespaces of their own, routed between
//! the nodes as a CNI plugin routes them (see `ward_tests::cluster`).
//!
//! The API server is a STAND-IN (`ward_tests::kube_api`): no package provides a Kubernetes API
//! server on these machines. It speaks the API's list/watch protocol (resourceVersion, watch
//! events, bookmarks, `410 Gone`) over HTTP, from objects the test puts in.

mod support;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;
use ward_control::token_review::AUDIENCE;
use ward_tests::{
    kube_api::KubeApi, peer, received_by, scaled, Cluster, Listener, Outcome, Peer, Placement,
    Protocol,
};

const A: usize = 0;
const B: usize = 1;
const WEB_UID: &str = "3f1c2a4e-0000-4000-8000-00000000a001";
const OTHER_UID: &str = "3f1c2a4e-0000-4000-8000-00000000a002";
const CLIENT_UID: &str = "3f1c2a4e-0000-4000-8000-00000000b001";
/// The agents' service account, as deploy/kubernetes/daemonset.yaml names it (ward-control's
/// default `--agent-service-account`).
const AGENTS: &str = "ward-system/ward";

fn namespace(name: &str, team: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, "team": team}},
    })
}

/// A pod of namespace `shop`, label `app`, address `ip` (none yet when empty). Every pod runs
/// as the namespace's `default` service account, as most pods of a cluster do: one SPIFFE ID,
/// told apart by their labels.
fn pod(name: &str, uid: &str, node: &str, app: &str, ip: &str) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "shop", "uid": uid,
            // Differs between a Deployment's ReplicaSets: not part of the identity.
            "labels": {"app": app, "pod-template-hash": format!("{name}-1")},
        },
        "spec": {
            "nodeName": node, "serviceAccountName": "default",
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

/// ward's own Policy `client-egress` (cluster-scoped, as the CRD holds it): `app: client` may
/// reach only `app: <to>`.
fn ward_policy(to: &str) -> Value {
    json!({
        "apiVersion": "ward.dev/v1", "kind": "Policy",
        "metadata": {"name": "client-egress"},
        "spec": {
            "selector": {"labels": {"app": "client"}},
            "egress": [{"name": "to-app", "to": [{"labels": {"app": to}}]}],
        },
    })
}

/// Two nodes under `ward-control --kubernetes` and the stand-in API server, which holds
/// namespace `shop` (team a) and its pods: `web` (in node A's namespace, on node A's own
/// address) and `other` (in a pod network namespace of its own) on node A, under the cgroupfs
/// driver, each with a listener; `client` on node B (in a pod network namespace of its own),
/// under the systemd driver. The agents are not started.
struct Shop {
    peer: Peer,
    cluster: Cluster,
    api: KubeApi,
    web: Listener,
    other: Listener,
    client: Placement,
    client_ip: IpAddr,
}

impl Shop {
    fn new(tag: &str) -> Self {
        let peer = peer!();
        let (mut cluster, api) = Cluster::kubernetes(tag, 2);
        // Node B's agent joins with its pod's service account token, as the DaemonSet's agents
        // do; node A's with a one-time join token.
        let node_b = cluster.node(B);
        let token = api.issue_token(AGENTS, AUDIENCE, &node_b.name);
        std::fs::write(node_b.token_file(), token).expect("write node B's token");
        let (other_netns, other_ip) = cluster.pod_network(A);
        let (client_netns, client_ip) = cluster.pod_network(B);
        let web_ip = cluster.node(A).address();
        let node_a = cluster.node(A);
        let web = peer.listen(
            Protocol::Tcp,
            &format!("{web_ip}:0"),
            &node_a.workload(&format!("kubepods/burstable/pod{WEB_UID}/ctr-web")),
        );
        let other = peer.listen(
            Protocol::Tcp,
            &format!("{other_ip}:0"),
            &node_a
                .workload(&format!("kubepods/besteffort/pod{OTHER_UID}/ctr-other"))
                .in_netns(&other_netns),
        );
        let client = cluster
            .node(B)
            .workload(&format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-1.scope",
                CLIENT_UID.replace('-', "_")
            ))
            .in_netns(&client_netns);
        let shop = Shop {
            peer,
            cluster,
            api,
            web,
            other,
            client,
            client_ip,
        };
        shop.api.apply(namespace("shop", "a"));
        let a = shop.node(A);
        shop.api
            .apply(pod("web", WEB_UID, &a, "web", &web_ip.to_string()));
        shop.api
            .apply(pod("other", OTHER_UID, &a, "other", &other_ip.to_string()));
        shop.api.apply(shop.client_pod("client"));
        shop
    }

    fn node(&self, index: usize) -> String {
        self.cluster.node(index).name.clone()
    }

    /// The client pod, labelled `app: <app>`.
    fn client_pod(&self, app: &str) -> Value {
        pod(
            "client",
            CLIENT_UID,
            &self.node(B),
            app,
            &self.client_ip.to_string(),
        )
    }

    /// Starts both agents with `workloads: fromControlPlane` and `config`, node B's with `args`
    /// too, and waits until both know the three pods (three label sets, three addresses)
    /// and `identities` more.
    fn start(&mut self, config: &str, args_b: &[&str], identities: u64) {
        self.cluster.start_from_cluster(A, config, &[]);
        self.cluster.start_from_cluster(B, config, args_b);
        for index in [A, B] {
            self.cluster.node(index).wait_known(0, 3 + identities, 3);
        }
    }

    /// Connects from `at` to `to` until the outcome is `expected` (a change reaches the kernel
    /// some time after the API change), for at most 20 s; returns how long it took.
    fn until_from(&self, at: &Placement, to: &Listener, expected: Outcome, what: &str) -> Duration {
        let start = Instant::now();
        loop {
            let (outcome, _) = attempt(&self.peer, Protocol::Tcp, to.addr, at, &[]);
            if outcome == expected {
                return start.elapsed();
            }
            if start.elapsed() > ward_tests::scaled(Duration::from_secs(20)) {
                let agents: Vec<String> = self
                    .cluster
                    .nodes()
                    .iter()
                    .filter(|n| n.is_running())
                    .map(|n| format!("{}:\n{}", n.name, n.ward().log().tail(40)))
                    .collect();
                panic!(
                    "{what}: still {outcome:?}, not {expected:?}, 20 s after the change\n\
                     ward-control:\n{}\n{}",
                    self.cluster.plane.logs(),
                    agents.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// [`Shop::until_from`] the client.
    fn until(&self, to: &Listener, expected: Outcome, what: &str) -> Duration {
        self.until_from(&self.client, to, expected, what)
    }

    /// Asserts the client's outcome to `to` now and for 2 s: nothing the cluster did changes it.
    fn stays(&self, to: &Listener, expected: Outcome, what: &str) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            let (outcome, _) = attempt(&self.peer, Protocol::Tcp, to.addr, &self.client, &[]);
            assert_eq!(outcome, expected, "{what}");
        }
    }

    /// Waits for ward-control's refusal of object `source` and returns the Warning Event it
    /// posted on the object.
    fn refusal(&self, source: &str, kind: &str) -> Value {
        let plane = &self.cluster.plane;
        assert!(
            plane.wait_for_log(source, ward_tests::scaled(Duration::from_secs(10))),
            "ward-control names the object it refused; log:\n{}",
            plane.logs()
        );
        // The Event is posted after the line is logged.
        let deadline = Instant::now() + ward_tests::scaled(Duration::from_secs(10));
        let event = loop {
            let events = self.api.events();
            if let Some(event) = events.iter().find(|e| e["regarding"]["kind"] == kind) {
                break event.clone();
            }
            assert!(
                Instant::now() < deadline,
                "an Event on the {kind}; events: {events:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["regarding"]["name"], "client-egress");
        event
    }
}

#[test]
fn pods_labels_namespaces_and_network_policies_from_the_api_are_enforced_by_their_nodes() {
    let mut shop = Shop::new("k8s");
    shop.api.apply(client_egress(to_app("web")));
    shop.start("", &[], 0);
    let status = shop.cluster.node(B).ward().status();
    assert!(
        status.contains("shop/client"),
        "node B's agent reports the pod it found; status:\n{status}"
    );
    shop.until(
        &shop.web,
        Outcome::Ok,
        "client to web, allowed by the NetworkPolicy",
    );
    shop.until(&shop.other, Outcome::Eperm, "client to other, not allowed");

    // The client's labels change: the policy selects it no more.
    shop.api.apply(shop.client_pod("client-v2"));
    let relabelled = shop.until(&shop.other, Outcome::Ok, "client relabelled: not isolated");
    shop.api.apply(shop.client_pod("client"));
    shop.until(
        &shop.other,
        Outcome::Eperm,
        "client labelled back: isolated again",
    );

    // The NetworkPolicy changes, then selects by namespace labels.
    shop.api.apply(client_egress(to_app("other")));
    let changed = shop.until(&shop.other, Outcome::Ok, "policy now allows other");
    // What the API's change to its enforcement takes (the loop tries every 10 ms, so up to that
    // much more): ward-control's 20 ms settle, the stream, the agent's compile and write.
    eprintln!(
        "API change -> kernel: pod relabelled {:.0} ms, NetworkPolicy changed {:.0} ms",
        relabelled.as_secs_f64() * 1e3,
        changed.as_secs_f64() * 1e3
    );
    shop.until(&shop.web, Outcome::Eperm, "policy no longer allows web");
    let team_a = json!({"namespaceSelector": {"matchLabels": {"team": "a"}}});
    shop.api.apply(client_egress(team_a));
    shop.until(&shop.web, Outcome::Ok, "namespace team=a allowed");
    shop.api.apply(namespace("shop", "b"));
    shop.until(&shop.web, Outcome::Eperm, "namespace relabelled team=b");

    // The watches are cut and the history compacted (the next watch gets 410 Gone and lists
    // again): nothing changes meanwhile, and a change made then arrives.
    shop.api.apply(client_egress(to_app("web")));
    shop.until(&shop.web, Outcome::Ok, "policy allows web again");
    let before = shop.api.requests().len();
    shop.api.compact_and_cut_watches();
    shop.stays(
        &shop.web,
        Outcome::Ok,
        "web stays allowed while the watches are down",
    );
    shop.stays(
        &shop.other,
        Outcome::Eperm,
        "other stays refused while the watches are down",
    );
    shop.api.delete("v1", "Pod", Some("shop"), "web");
    shop.until(
        &shop.web,
        Outcome::Eperm,
        "web's pod deleted: its address is nobody's",
    );
    let requests = shop.api.requests();
    let relisted = requests[before..]
        .iter()
        .any(|r| r.starts_with("GET /api/v1/pods") && !r.contains("watch=true"));
    assert!(
        relisted,
        "the pods were listed again after the 410; requests: {:?}",
        &requests[before..]
    );

    // The API server answers errors and drops the watches: the watches retry, each failing one
    // is logged once, and nothing changes meanwhile.
    let mark = shop.cluster.plane.logs().len();
    shop.api.fail_next(6, 500);
    shop.api.cut_watches();
    shop.stays(
        &shop.other,
        Outcome::Eperm,
        "other stays refused while the API answers errors",
    );
    let log = shop.cluster.plane.logs();
    let failures = log[mark..].matches("Kubernetes watch failed").count();
    assert!(
        // At most once for each of the six watches.
        (1..=6).contains(&failures),
        "each failing watch is logged once, not {failures} times; log:\n{log}"
    );

    // The NetworkPolicy is deleted: the client is isolated no more.
    shop.api.delete(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        Some("shop"),
        "client-egress",
    );
    shop.until(&shop.other, Outcome::Ok, "no policy selects the client");
}

#[test]
fn an_agent_joins_with_its_pods_service_account_token_only_as_its_own_node() {
    let mut shop = Shop::new("k8s-join");
    let (a, b) = (shop.node(A), shop.node(B));
    let token_file = shop.cluster.node(A).token_file().to_owned();
    let refusals = [
        (
            shop.api.issue_token(AGENTS, AUDIENCE, &b),
            "the token's pod runs on node \"node-b\"",
        ),
        (
            shop.api
                .issue_token(AGENTS, "https://kubernetes.default.svc", &a),
            "does not accept the service account token",
        ),
        (
            shop.api.issue_token("shop/default", AUDIENCE, &a),
            "not the agents' service account",
        ),
    ];
    for (i, (token, reason)) in refusals.into_iter().enumerate() {
        std::fs::write(&token_file, token).expect("write node A's token");
        if i == 0 {
            shop.cluster.start_from_cluster(A, "", &[]);
        }
        let refused = shop
            .cluster
            .plane
            .wait_for_log(reason, Duration::from_secs(30));
        assert!(
            refused,
            "ward-control refuses node A's join: {reason}\n{}",
            shop.cluster.plane.logs()
        );
    }
    std::fs::write(&token_file, shop.api.issue_token(AGENTS, AUDIENCE, &a))
        .expect("write node A's token");
    shop.cluster.node(A).wait_known(0, 3, 3);
    let reviews = shop.api.requests();
    assert!(
        reviews
            .iter()
            .any(|r| r == "POST /apis/authentication.k8s.io/v1/tokenreviews?"
                || r == "POST /apis/authentication.k8s.io/v1/tokenreviews"),
        "ward-control asked the API server: {reviews:?}"
    );
}

#[test]
fn a_network_policy_that_does_not_compile_is_refused_and_changes_nothing() {
    let mut shop = Shop::new("k8s-bad");
    shop.api.apply(client_egress(to_app("web")));
    shop.start("", &[], 0);
    shop.until(&shop.web, Outcome::Ok, "client to web allowed");

    // A port that is no port: the API server's schema would refuse it; ward must too.
    let mut bad = client_egress(to_app("other"));
    bad["spec"]["egress"][0]["ports"] = json!([{"port": 70000}]);
    shop.api.apply(bad);
    // Its owners see why, on the object: a Warning Event naming the field.
    let event = shop.refusal("networkpolicies/shop/client-egress", "NetworkPolicy");
    let note = event["note"].as_str().unwrap_or_default();
    assert!(note.contains("ports") && note.contains("70000"), "{note}");
    shop.stays(
        &shop.web,
        Outcome::Ok,
        "the previous version stays in force",
    );
    shop.stays(&shop.other, Outcome::Eperm, "the refused version is not");
}

#[test]
fn ward_policy_objects_are_enforced_and_a_bad_one_is_refused_with_an_event() {
    let mut shop = Shop::new("k8s-crd");
    shop.api.apply(ward_policy("web"));
    shop.start("", &[], 0);
    shop.until(&shop.web, Outcome::Ok, "the Policy allows web");
    shop.until(&shop.other, Outcome::Eperm, "and nothing else");

    // A field the policy language does not have: refused, the previous version stays.
    let mut bad = ward_policy("other");
    bad["spec"]["egress"][0]["bogus"] = true.into();
    shop.api.apply(bad);
    let event = shop.refusal("policies/client-egress", "Policy");
    assert!(
        event["note"].as_str().unwrap_or_default().contains("bogus"),
        "{event:#}"
    );
    shop.stays(
        &shop.other,
        Outcome::Eperm,
        "the bad version is not in force",
    );
    shop.stays(&shop.web, Outcome::Ok, "the previous version is");

    // Fixed: in force.
    shop.api.apply(ward_policy("other"));
    shop.until(&shop.other, Outcome::Ok, "the fixed Policy allows other");
    shop.until(&shop.web, Outcome::Eperm, "and no longer web");
}

#[test]
fn with_unmapped_cgroups_denied_a_pod_talks_only_once_its_node_maps_it_and_host_network_pods_are_the_hosts(
) {
    const STRANGER_UID: &str = "3f1c2a4e-0000-4000-8000-00000000b002";
    const LATE_UID: &str = "3f1c2a4e-0000-4000-8000-00000000b003";
    const HOST_UID: &str = "3f1c2a4e-0000-4000-8000-00000000b004";
    const AGENT_UID: &str = "3f1c2a4e-0000-4000-8000-00000000b005";
    let mut shop = Shop::new("k8s-start");
    let node_b = shop.node(B);
    let mut host_pod = pod("proxy", HOST_UID, &node_b, "proxy", "");
    host_pod["spec"]["hostNetwork"] = true.into();
    shop.api.apply(host_pod);
    // Node B's agent is told its own pod, as the DaemonSet tells it (WARD_POD_UID from the
    // downward API). The host-network pod has no identity of its own.
    shop.start("unmappedCgroups: deny\n", &["--pod-uid", AGENT_UID], 0);
    let on_b = |cgroup: String| shop.cluster.node(B).workload(&cgroup);

    // A pod cgroup nobody told the agent about is refused, whatever it connects to.
    let stranger = on_b(format!("kubepods/besteffort/pod{STRANGER_UID}/c"));
    let (outcome, _) = attempt(&shop.peer, Protocol::Tcp, shop.web.addr, &stranger, &[]);
    assert_eq!(outcome, Outcome::Eperm, "an unmapped pod cgroup is refused");
    // A host-network pod is the host's: not refused once its cgroup is mapped (the cgroup is
    // new; until the agent sees it, it is as unmapped as any).
    let host = on_b(format!("kubepods/besteffort/pod{HOST_UID}/c"));
    shop.until_from(&host, &shop.web, Outcome::Ok, "a host-network pod");
    // Nor is the agent's own pod, which the API has not told it about.
    let agent = on_b(format!("kubepods/besteffort/pod{AGENT_UID}/c"));
    shop.until_from(&agent, &shop.web, Outcome::Ok, "the agent's own pod");
    // Once the API has the pod, its node maps the cgroup that was already there.
    shop.api
        .apply(pod("stranger", STRANGER_UID, &node_b, "stranger", ""));
    shop.until_from(
        &stranger,
        &shop.web,
        Outcome::Ok,
        "the pod is mapped once the API has it",
    );

    // As kubelet does it: the pod is on the node in the API, then its cgroup is created. From
    // the cgroup's creation to the first connection the kernel allows:
    let mark = shop.cluster.node(B).ward().log_len();
    shop.api.apply(pod("late", LATE_UID, &node_b, "late", ""));
    shop.cluster
        .node(B)
        .wait_applied(mark, "", ward_tests::scaled(Duration::from_secs(20)));
    let created = Instant::now();
    let late = on_b(format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-2.scope",
        LATE_UID.replace('-', "_")
    ));
    let mut refused = 0;
    loop {
        let (outcome, _) = attempt(&shop.peer, Protocol::Tcp, shop.web.addr, &late, &[]);
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
}

/// A Service of namespace `shop`: `ips` its cluster IPs, `ports` (name, port, protocol).
fn service(name: &str, ips: &[&str], ports: &[(&str, u16, &str)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "port": p, "targetPort": n, "protocol": proto}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"clusterIP": ips[0], "clusterIPs": ips, "ports": ports, "type": "ClusterIP"},
    })
}

/// The EndpointSlice `<service>-<family>` of Service `service`: `endpoints` (pod name, address,
/// ready), `ports` (name, port, protocol).
fn endpoint_slice(
    service: &str,
    family: &str,
    endpoints: &[(&str, IpAddr, bool)],
    ports: &[(&str, u16, &str)],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(pod, address, ready)| {
            json!({
                "addresses": [address.to_string()],
                "conditions": {"ready": ready},
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod},
            })
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-{}", family.to_lowercase()), "namespace": "shop",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": family,
        "endpoints": endpoints,
        "ports": ports,
    })
}

/// A pod of `shop` with addresses `ips` (the first is `podIP`).
fn pod_with_ips(name: &str, uid: &str, node: &str, app: &str, ips: &[IpAddr]) -> Value {
    let mut pod = pod(name, uid, node, app, &ips[0].to_string());
    pod["status"]["podIPs"] = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    pod
}

/// Tries `f` every 50 ms until it gives `Some`, for at most 20 s.
fn eventually<T>(shop: &Shop, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(value) => return value,
            Err(last) if start.elapsed() > ward_tests::scaled(Duration::from_secs(20)) => {
                let agents: Vec<String> = shop
                    .cluster
                    .nodes()
                    .iter()
                    .filter(|n| n.is_running())
                    .map(|n| format!("{}:\n{}", n.name, n.ward().log().tail(30)))
                    .collect();
                panic!(
                    "{what}: not after 20 s; last: {last}\nward-control:\n{}\n{}",
                    shop.cluster.plane.logs(),
                    agents.join("\n")
                );
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `getent hosts <name>` from `at` with `resolver` as the only name server (a resolv.conf
/// bind-mounted in a mount namespace of the command's own): glibc's resolver, which connects a
/// UDP socket to the name server and takes only replies from that address.
fn getent(
    at: &Placement,
    dir: &std::path::Path,
    resolver: &str,
    name: &str,
) -> Result<String, String> {
    let resolv = dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {resolver}\noptions timeout:1 attempts:1\n"),
    )
    .expect("write resolv.conf");
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec getent hosts {name}",
        resolv.display()
    );
    let finished = ward_tests::run(
        &format!("getent hosts {name}"),
        at.command("unshare", &["-m", "sh", "-c", &script]),
        Duration::from_secs(10),
    );
    if finished.status.success() {
        Ok(finished.stdout.trim().to_owned())
    } else {
        Err(format!(
            "{}: {}{}",
            finished.status, finished.stdout, finished.stderr
        ))
    }
}

#[test]
fn a_client_pod_reaches_a_services_ready_backends_by_cluster_ip_and_policy_judges_each_backend() {
    use ward_tests::cluster::v6;
    const DB0_UID: &str = "3f1c2a4e-0000-4000-8000-00000000c001";
    const DB1_UID: &str = "3f1c2a4e-0000-4000-8000-00000000c002";
    const DNS_UID: &str = "3f1c2a4e-0000-4000-8000-00000000c003";
    let mut shop = Shop::new("k8s-svc");
    let (a, b) = (shop.node(A), shop.node(B));
    // Backends in pod namespaces of their own: db-0 on node A, db-1 on node B (the client's),
    // each serving HTTP and echoing UDP on IPv4 and IPv6; the resolver, dnsmasq, on node A.
    let mut db = Vec::new();
    for (name, uid, node) in [("db-0", DB0_UID, A), ("db-1", DB1_UID, B)] {
        let (netns, ip) = shop.cluster.pod_network(node);
        let ips = [ip, IpAddr::V6(v6(ip))];
        let cgroup = if node == A {
            format!("kubepods/besteffort/pod{uid}/ctr-db")
        } else {
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-db.scope",
                uid.replace('-', "_")
            )
        };
        let at = shop.cluster.node(node).workload(&cgroup).in_netns(&netns);
        let listeners: Vec<Listener> = ips
            .iter()
            .flat_map(|ip| {
                [
                    shop.peer
                        .listen_http(&SocketAddr::new(*ip, 8080).to_string(), &at),
                    shop.peer
                        .listen(Protocol::Udp, &SocketAddr::new(*ip, 5353).to_string(), &at),
                ]
            })
            .collect();
        let node_name = shop.node(node);
        shop.api
            .apply(pod_with_ips(name, uid, &node_name, "db", &ips));
        db.push((name, ips, listeners));
    }
    let (dns_netns, dns_ip) = shop.cluster.pod_network(A);
    let dns_at = shop
        .cluster
        .node(A)
        .workload(&format!("kubepods/besteffort/pod{DNS_UID}/ctr-dns"))
        .in_netns(&dns_netns);
    let mut dnsmasq = ward_tests::Background::spawn(
        "dnsmasq",
        dns_at.command(
            "dnsmasq",
            &[
                "--keep-in-foreground".to_string(),
                "--log-facility=-".into(),
                "--conf-file=/dev/null".into(),
                "--no-resolv".into(),
                "--no-hosts".into(),
                "--user=root".into(),
                "--pid-file=".into(),
                "--bind-interfaces".into(),
                format!("--listen-address={dns_ip}"),
                "--host-record=db.shop.test,10.96.0.20".into(),
            ],
        ),
        false,
    );
    shop.api
        .apply(pod("dns", DNS_UID, &a, "dns", &dns_ip.to_string()));
    let _ = &b;

    // The client may reach the db and dns pods only, and nothing may reach it (default deny
    // ingress: the resolver's answers come in as replies to its own datagrams).
    let mut policy = client_egress(to_app("db"));
    policy["spec"]["policyTypes"] = json!(["Egress", "Ingress"]);
    policy["spec"]["egress"] = json!([{"to": [to_app("db"), to_app("dns")]}]);
    shop.api.apply(policy);
    let db_ports = [("http", 80, "TCP"), ("echo", 7, "UDP")];
    let backend_ports = [("http", 8080, "TCP"), ("echo", 5353, "UDP")];
    shop.api
        .apply(service("db", &["10.96.0.20", "fd00:96::20"], &db_ports));
    let slices = |ready1: bool| {
        [("IPv4", 0), ("IPv6", 1)].map(|(family, i)| {
            endpoint_slice(
                "db",
                family,
                &[("db-0", db[0].1[i], true), ("db-1", db[1].1[i], ready1)],
                &backend_ports,
            )
        })
    };
    for slice in slices(true) {
        shop.api.apply(slice);
    }
    // web: a backend the client may not reach, in node A's own namespace.
    shop.api
        .apply(service("web", &["10.96.0.30"], &[("http", 80, "TCP")]));
    let web_ip = shop.cluster.node(A).address();
    shop.api.apply(endpoint_slice(
        "web",
        "IPv4",
        &[("web", web_ip, true)],
        &[("http", shop.web.port(), "TCP")],
    ));
    shop.api.apply(service(
        "dns",
        &["10.96.0.10"],
        &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
    ));
    shop.api.apply(endpoint_slice(
        "dns",
        "IPv4",
        &[("dns", dns_ip, true)],
        &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
    ));
    // empty: no ready backend at all.
    shop.api
        .apply(service("empty", &["10.96.0.40"], &[("http", 80, "TCP")]));
    shop.cluster.start_from_cluster(A, "", &[]);
    shop.cluster.start_from_cluster(B, "", &[]);

    // curl through the cluster IP, IPv4 and IPv6: the socket's peer is the cluster IP.
    let client = shop.client.clone();
    for url in ["http://10.96.0.20/", "http://[fd00:96::20]/"] {
        let peer = eventually(&shop, &format!("curl {url} from the client"), || {
            curl_peer(&client, url)
        });
        let host = url.trim_start_matches("http://").trim_end_matches('/');
        assert_eq!(
            peer,
            host.trim_matches(['[', ']']),
            "getpeername() shows the cluster IP"
        );
    }
    // Every connection reaches a backend, and both backends get some.
    let backends: Vec<&Listener> = db.iter().map(|(_, _, l)| &l[0]).collect();
    let before: usize = backends.iter().map(|l| l.received()).sum();
    let many = shop.peer.connect(
        Protocol::Tcp,
        "10.96.0.20:80".parse().unwrap(),
        &client,
        &["--count", "40"],
    );
    assert_eq!(many.count(&Outcome::Ok), 40, "{many:?}");
    let served = received_by(&backends, before + 40, scaled(Duration::from_secs(10)));
    assert!(
        served.iter().all(|n| *n > 0),
        "both db pods served: {served:?}"
    );

    // UDP, connected and unconnected, IPv4 and IPv6: the reply comes from the cluster IP.
    for target in ["10.96.0.20:7", "[fd00:96::20]:7"] {
        for connected in [true, false] {
            let mut options = vec!["--timeout-ms", "2000"];
            if connected {
                options.push("--connected");
            }
            let (outcome, _) = attempt(
                &shop.peer,
                Protocol::Udp,
                target.parse().unwrap(),
                &client,
                &options,
            );
            assert_eq!(outcome, Outcome::Ok, "udp {target} connected={connected}");
        }
    }

    // glibc's resolver through the resolver's cluster IP, to dnsmasq in its pod.
    let dir = shop
        .cluster
        .node(B)
        .state_dir()
        .parent()
        .unwrap()
        .to_owned();
    let answer = eventually(&shop, "getent hosts db.shop.test", || {
        getent(&client, &dir, "10.96.0.10", "db.shop.test")
    });
    assert!(answer.starts_with("10.96.0.20"), "{answer}");

    // A Service whose backend the client may not reach: refused at once, and the verdict names
    // the Service and the backend.
    let (outcome, elapsed) = attempt(
        &shop.peer,
        Protocol::Tcp,
        "10.96.0.30:80".parse().unwrap(),
        &client,
        &[],
    );
    assert_eq!(outcome, Outcome::Eperm, "web's backend is not allowed");
    assert!(elapsed < Duration::from_secs(2), "at once, not {elapsed:?}");
    let node_b = shop.cluster.node(B).ward();
    let named = node_b.log().wait_for(0, Duration::from_secs(10), |l| {
        l.contains("\"verdict\":\"deny\"")
            && l.contains("\"service\":\"shop/web\"")
            && l.contains(&format!("\"dst_addr\":\"{web_ip}\""))
    });
    assert!(
        named.is_some(),
        "the deny names the Service and the backend:\n{}",
        node_b.log().tail(30)
    );
    // No ready backend: refused at once.
    let (outcome, elapsed) = attempt(
        &shop.peer,
        Protocol::Tcp,
        "10.96.0.40:80".parse().unwrap(),
        &client,
        &[],
    );
    assert_eq!(outcome, Outcome::Refused, "a Service without backends");
    assert!(elapsed < Duration::from_secs(2), "at once, not {elapsed:?}");

    // A workload in node A's own namespace (web, not isolated) uses the Service too.
    let web_at = shop
        .cluster
        .node(A)
        .workload(&format!("kubepods/burstable/pod{WEB_UID}/ctr-web"));
    eventually(&shop, "curl db from web", || {
        curl_peer(&web_at, "http://10.96.0.20/")
    });

    // db-1 leaves the EndpointSlices: no new connection reaches it.
    for slice in slices(false) {
        shop.api.apply(slice);
    }
    eventually(&shop, "db-1 gets no new connections", || {
        let before = db[1].2[0].received();
        let run = shop.peer.connect(
            Protocol::Tcp,
            "10.96.0.20:80".parse().unwrap(),
            &client,
            &["--count", "20"],
        );
        let after = db[1].2[0].received();
        if run.count(&Outcome::Ok) == 20 && after == before {
            Ok(())
        } else {
            Err(format!("{run:?}; db-1 received {} more", after - before))
        }
    });

    // `ward policy trace` on node B answers for each backend of a Service, from the state the
    // agent applied: db-0 is still a backend (allowed), web's backend is not allowed.
    let config = shop.cluster.node(B).ward().config_file().to_owned();
    let trace = |to: &str, expect: &str| {
        let mut command = std::process::Command::new(ward_tests::ward_bin());
        command
            .args(["policy", "trace", "--config"])
            .arg(&config)
            .args([
                "--from",
                "shop/client",
                "--to",
                to,
                "--port",
                "80/tcp",
                "--expect",
                expect,
            ]);
        let finished = ward_tests::run(&format!("trace to {to}"), command, Duration::from_secs(30));
        assert!(
            finished.status.success(),
            "trace to {to} must say {expect}: {}{}",
            finished.stdout,
            finished.stderr
        );
        finished.stdout
    };
    let db_trace = trace("shop/db", "allow");
    assert!(
        db_trace.contains(&format!("{}:8080 (pod shop/db-0)", db[0].1[0])),
        "{db_trace}"
    );
    assert!(
        !db_trace.contains("(pod shop/db-1)"),
        "db-1 left: {db_trace}"
    );
    trace("shop/web", "deny");
    dnsmasq.stop(libc::SIGTERM, Duration::from_secs(2));
}
