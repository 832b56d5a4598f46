//! Deployment as shipped: the OCI image `cargo xtask image` builds, the DaemonSet that runs it
//! (schema, API-server rules, and the image run with podman the way the manifest runs it), the
//! control plane's Deployment (schema, API-server rules, a least-privilege ClusterRole), and
//! the systemd units (`systemd-analyze verify`, and each binary run under its unit's sandbox).
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use ward_tests::kubernetes::{self, Provided};
use ward_tests::systemd::{self, Sandbox, Unit};
use ward_tests::{
    peer, require_root, run, unique_name, ward_bin, Finished, Outcome, Placement, Protocol,
    TestCgroups,
};

mod support;
use support::*;

/// The Kubernetes release whose OpenAPI schema the manifests must pass.
const KUBERNETES_VERSION: &str = "1.33.0";

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_owned()
}

fn daemonset_file() -> PathBuf {
    repository().join("deploy/kubernetes/daemonset.yaml")
}

fn control_plane_file() -> PathBuf {
    repository().join("deploy/kubernetes/control-plane.yaml")
}

/// The control plane as three replicas on etcd; replaces control-plane.yaml's Deployment.
fn control_plane_etcd_file() -> PathBuf {
    repository().join("deploy/kubernetes/control-plane-etcd.yaml")
}

fn crd_file() -> PathBuf {
    repository().join("deploy/kubernetes/crd.yaml")
}

fn unit_file(name: &str) -> PathBuf {
    repository().join("deploy/systemd").join(name)
}

fn timeout() -> Duration {
    ward_tests::scaled(Duration::from_secs(60))
}

/// A tool the deploy tests need, which `cargo xtask setup` installs.
fn tool(program: &str, args: &[&str]) -> Finished {
    let mut command = Command::new(program);
    command.args(args);
    assert!(
        which(program),
        "PRIVILEGED TEST NOT RUN: {program} is not installed; run `cargo xtask setup`"
    );
    run(program, command, timeout() * 5)
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn assert_success(what: &str, finished: &Finished) {
    assert!(
        finished.status.success(),
        "{what} failed ({}):\n{}\n{}",
        finished.status,
        finished.stdout,
        finished.stderr
    );
}

// ---- The DaemonSet -------------------------------------------------------------------------

#[test]
fn the_manifests_pass_the_kubernetes_openapi_schema() {
    let validator = std::env::var_os("WARD_KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME");
            Path::new(&home).join(".local/share/ward/venv/bin/kubernetes-validate")
        });
    assert!(
        validator.is_file(),
        "PRIVILEGED TEST NOT RUN: no kubernetes-validate at {}; run `cargo xtask setup` (or set \
         WARD_KUBERNETES_VALIDATE)",
        validator.display()
    );
    let manifests: Vec<PathBuf> = std::fs::read_dir(repository().join("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(!manifests.is_empty(), "no manifests in deploy/kubernetes");
    let mut command = Command::new(&validator);
    command
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(&manifests);
    let finished = run("kubernetes-validate", command, timeout());
    eprintln!("{}{}", finished.stdout, finished.stderr);
    assert_success("kubernetes-validate --strict", &finished);
    let passed = finished.stdout.matches(" passed for resource ").count()
        + finished.stderr.matches(" passed for resource ").count();
    let documents: usize = manifests
        .iter()
        .map(|m| kubernetes::documents(m).len())
        .sum();
    assert_eq!(passed, documents, "not every document was validated");
}

#[test]
fn the_daemonset_obeys_the_api_server_rules_the_schema_leaves_out() {
    let documents = kubernetes::documents(&daemonset_file());
    let daemonset = kubernetes::find(&documents, "DaemonSet", "ward");
    let violations = kubernetes::api_server_violations(daemonset);
    assert!(
        violations.is_empty(),
        "the API server would refuse the DaemonSet:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_api_server_rules_catch_what_the_api_server_refuses() {
    let documents = kubernetes::documents(&daemonset_file());
    let mut daemonset = kubernetes::find(&documents, "DaemonSet", "ward").clone();
    let spec = &mut daemonset["spec"]["template"]["spec"];
    let container = &mut spec["containers"][0];
    container["volumeMounts"][0]["mountPropagation"] = "Bidirectional".into();
    container["volumeMounts"][1]["name"] = "no-such-volume".into();
    container["securityContext"]["capabilities"]["add"] =
        serde_json::json!(["CAP_SYS_ADMIN", "BPF", "NET_FLY"]);
    spec["volumes"][0]["hostPath"]["type"] = "Dir".into();
    let violations = kubernetes::api_server_violations(&daemonset).join("\n");
    for expected in [
        "Bidirectional mount propagation is available only to privileged containers",
        "volumeMount \"no-such-volume\" names no volume",
        "capability \"CAP_SYS_ADMIN\" is not a Linux capability name",
        "capability \"NET_FLY\" is not a Linux capability name",
        "allowPrivilegeEscalation: false with CAP_SYS_ADMIN added",
        "hostPath type \"Dir\"",
    ] {
        assert!(
            violations.contains(expected),
            "expected {expected:?} among:\n{violations}"
        );
    }
    // Bidirectional is the API server's to allow a privileged container.
    let container = &mut daemonset["spec"]["template"]["spec"]["containers"][0];
    container["securityContext"] = serde_json::json!({"privileged": true});
    assert!(
        !kubernetes::api_server_violations(&daemonset)
            .iter()
            .any(|v| v.contains("Bidirectional")),
        "Bidirectional propagation is allowed to a privileged container"
    );
}

#[test]
fn the_daemonset_runs_the_image_cargo_xtask_image_tags() {
    let documents = kubernetes::documents(&daemonset_file());
    let daemonset = kubernetes::find(&documents, "DaemonSet", "ward");
    let image = &kubernetes::container(daemonset, "ward")["image"];
    assert_eq!(
        image.as_str(),
        Some(format!("ghcr.io/ward-dev/ward:{}", env!("CARGO_PKG_VERSION")).as_str()),
        "the DaemonSet's image is not the one `cargo xtask image` tags (xtask/src/image.rs)"
    );
}

// ---- The control plane's Deployment --------------------------------------------------------

/// What ward-control does with the API under --kubernetes, and nothing more: read what it
/// watches, post Events on what it refuses.
const CONTROL_PLANE_GRANTS: &[&str] = &[
    "/namespaces: get",
    "/namespaces: list",
    "/namespaces: watch",
    "/pods: get",
    "/pods: list",
    "/pods: watch",
    "/services: list",
    "/services: watch",
    "authentication.k8s.io/tokenreviews: create",
    "discovery.k8s.io/endpointslices: list",
    "discovery.k8s.io/endpointslices: watch",
    "events.k8s.io/events: create",
    "events.k8s.io/events: patch",
    "networking.k8s.io/networkpolicies: get",
    "networking.k8s.io/networkpolicies: list",
    "networking.k8s.io/networkpolicies: watch",
    "ward.dev/policies: get",
    "ward.dev/policies: list",
    "ward.dev/policies: watch",
];

#[test]
fn the_policy_crd_is_what_ward_control_generates_from_the_policy_types() {
    let mut command = Command::new(ward_tests::control_bin());
    command.arg("crd");
    let finished = run("ward-control crd", command, timeout());
    assert_success("ward-control crd", &finished);
    let shipped = std::fs::read_to_string(crd_file()).expect("crd.yaml");
    if std::env::var_os("WARD_UPDATE_DOCS").is_some() && shipped != finished.stdout {
        std::fs::write(crd_file(), &finished.stdout).expect("write crd.yaml");
        return;
    }
    assert!(
        shipped == finished.stdout,
        "deploy/kubernetes/crd.yaml is not what `ward-control crd` prints; regenerate it \
         (WARD_UPDATE_DOCS=1 runs this test to write it)"
    );
    let crd = &kubernetes::documents(&crd_file())[0];
    assert_eq!(crd["spec"]["scope"], "Cluster");
    assert_eq!(crd["metadata"]["name"], "policies.ward.dev");
}

#[test]
fn the_control_plane_obeys_the_api_server_rules_the_schema_leaves_out() {
    let documents = kubernetes::documents(&control_plane_file());
    let deployment = kubernetes::find(&documents, "Deployment", "ward-control");
    let replicas = kubernetes::documents(&control_plane_etcd_file());
    let etcd_deployment = kubernetes::find(&replicas, "Deployment", "ward-control");
    for (file, deployment) in [
        ("control-plane.yaml", deployment),
        ("control-plane-etcd.yaml", etcd_deployment),
    ] {
        let violations = kubernetes::api_server_violations(deployment);
        assert!(
            violations.is_empty(),
            "the API server would refuse {file}'s Deployment:\n{}",
            violations.join("\n")
        );
    }
    // The replicas on etcd replace the single one: same pods for the Service, the same
    // service account; each file its flags reads is in a volume it mounts.
    assert_eq!(
        etcd_deployment["spec"]["template"]["metadata"]["labels"],
        deployment["spec"]["template"]["metadata"]["labels"]
    );
    assert_eq!(
        kubernetes::pod_spec(etcd_deployment)["serviceAccountName"],
        kubernetes::pod_spec(deployment)["serviceAccountName"]
    );
    let container = kubernetes::container(etcd_deployment, "ward-control");
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("an argument"))
        .collect();
    let mounts = container["volumeMounts"].as_array().expect("volumeMounts");
    for flag in ["--ca-dir", "--etcd-ca", "--etcd-cert", "--etcd-key"] {
        let at = args.iter().position(|a| *a == flag).expect(flag);
        let path = args[at + 1];
        assert!(
            mounts
                .iter()
                .any(|m| path.starts_with(m["mountPath"].as_str().expect("mountPath"))),
            "{flag} {path} is in no volume the container mounts"
        );
    }
    let budget = kubernetes::find(&replicas, "PodDisruptionBudget", "ward-control");
    assert_eq!(
        budget["spec"]["selector"]["matchLabels"],
        etcd_deployment["spec"]["selector"]["matchLabels"]
    );
    // The Service reaches the Deployment's pods, on a port the container names.
    let service = kubernetes::find(&documents, "Service", "ward-control");
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"].as_object().expect("a selector") {
        assert_eq!(&pod_labels[key], value, "the Service selects {key}={value}");
    }
    let container = kubernetes::container(deployment, "ward-control");
    let ports = container["ports"].as_array().expect("container ports");
    for port in service["spec"]["ports"].as_array().expect("service ports") {
        assert!(
            ports.iter().any(|p| p["name"] == port["targetPort"]),
            "the Service's targetPort {} names no port of the container",
            port["targetPort"]
        );
    }
    // The pod runs as the service account the ClusterRole is bound to.
    let binding = kubernetes::find(&documents, "ClusterRoleBinding", "ward-control");
    assert_eq!(binding["roleRef"]["name"], "ward-control");
    let account = &kubernetes::pod_spec(deployment)["serviceAccountName"];
    kubernetes::find(
        &documents,
        "ServiceAccount",
        account.as_str().expect("a service account"),
    );
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": account,
                             "namespace": deployment["metadata"]["namespace"]}])
    );
}

#[test]
fn the_control_planes_cluster_role_grants_only_what_ward_control_uses() {
    let documents = kubernetes::documents(&control_plane_file());
    let role = kubernetes::find(&documents, "ClusterRole", "ward-control");
    let grants = kubernetes::rbac_grants(role);
    assert!(
        !grants
            .iter()
            .any(|g| g.contains("secrets") || g.contains('*')),
        "the ClusterRole grants secrets or a wildcard: {grants:#?}"
    );
    assert_eq!(grants, CONTROL_PLANE_GRANTS, "the ClusterRole's grants");
    assert_eq!(
        documents
            .iter()
            .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
            .count(),
        1,
        "one role, the one checked here"
    );
}

#[test]
fn the_cluster_role_check_catches_a_wider_grant() {
    let documents = kubernetes::documents(&control_plane_file());
    let mut role = kubernetes::find(&documents, "ClusterRole", "ward-control").clone();
    let rules = role["rules"].as_array_mut().expect("rules");
    rules[0]["verbs"]
        .as_array_mut()
        .expect("verbs")
        .push("delete".into());
    rules.push(serde_json::json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}));
    rules.push(
        serde_json::json!({"apiGroups": ["*"], "resources": ["pods"], "verbs": ["*"],
                                  "resourceNames": ["p"]}),
    );
    rules.push(serde_json::json!({"nonResourceURLs": ["/metrics"], "verbs": ["get"]}));
    let grants = kubernetes::rbac_grants(&role);
    for expected in [
        "/pods: delete",
        "/secrets: get",
        "*/pods: * (resourceNames [\"p\"])",
        "nonResourceURL \"/metrics\"",
    ] {
        assert!(
            grants.iter().any(|g| g == expected),
            "expected {expected:?} among {grants:#?}"
        );
    }
}

#[test]
fn the_api_server_rules_catch_what_the_kubelet_refuses_of_the_control_plane() {
    let documents = kubernetes::documents(&control_plane_file());
    let mut deployment = kubernetes::find(&documents, "Deployment", "ward-control").clone();
    deployment["spec"]["selector"]["matchLabels"]["tier"] = "control".into();
    deployment["spec"]["strategy"]["rollingUpdate"] = serde_json::json!({"maxSurge": 1});
    let spec = &mut deployment["spec"]["template"]["spec"];
    spec["securityContext"]["runAsUser"] = 0.into();
    spec["containers"][0]["livenessProbe"]["tcpSocket"]["port"] = "http".into();
    let violations = kubernetes::api_server_violations(&deployment).join("\n");
    for expected in [
        "selector tier=\"control\" does not match",
        "a Recreate strategy carries no rollingUpdate",
        "runAsNonRoot needs a non-zero runAsUser",
        "a probe's port \"http\" names no port of the container",
    ] {
        assert!(
            violations.contains(expected),
            "expected {expected:?} among:\n{violations}"
        );
    }
}

#[test]
fn the_control_plane_runs_ward_control_from_the_image_cargo_xtask_image_tags() {
    for file in [control_plane_file(), control_plane_etcd_file()] {
        let documents = kubernetes::documents(&file);
        let deployment = kubernetes::find(&documents, "Deployment", "ward-control");
        let container = kubernetes::container(deployment, "ward-control");
        assert_eq!(
            container["image"].as_str(),
            Some(format!("ghcr.io/ward-dev/ward:{}", env!("CARGO_PKG_VERSION")).as_str()),
            "the Deployment's image is not the one `cargo xtask image` tags (xtask/src/image.rs)"
        );
        // The image's entrypoint is ward and it sets no PATH: the binary by its path in the image.
        assert_eq!(
            container["command"],
            serde_json::json!(["/usr/local/bin/ward-control"])
        );
    }
}

// ---- The image -----------------------------------------------------------------------------

/// The OCI archive of `cargo xtask image` under test.
fn image_archive() -> PathBuf {
    let path = std::env::var_os("WARD_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "PRIVILEGED TEST NOT RUN: set WARD_IMAGE to the OCI archive `cargo xtask image` \
             wrote (cargo xtask test builds one with `cargo xtask image --debug`)"
            )
        });
    assert!(
        path.is_file(),
        "PRIVILEGED TEST NOT RUN: WARD_IMAGE={} does not exist",
        path.display()
    );
    path
}

fn skopeo_inspect(archive: &Path, extra: &[&str]) -> Value {
    let location = format!("oci-archive:{}", archive.display());
    let mut args = vec!["inspect"];
    args.extend(extra);
    args.push(&location);
    let finished = tool("skopeo", &args);
    assert_success("skopeo inspect", &finished);
    serde_json::from_str(&finished.stdout).expect("skopeo prints JSON")
}

#[test]
fn the_image_is_one_layer_with_ward_as_entrypoint_and_its_version_labelled() {
    require_root();
    let archive = image_archive();
    let manifest = skopeo_inspect(&archive, &[]);
    eprintln!("{manifest:#}");
    let layers = manifest["Layers"].as_array().expect("Layers");
    assert_eq!(layers.len(), 1, "one layer, no base image: {layers:?}");
    assert_eq!(manifest["Os"], "linux");
    assert_eq!(manifest["Architecture"], "amd64");
    let labels = &manifest["Labels"];
    let version = labels["org.opencontainers.image.version"]
        .as_str()
        .expect("a version label");
    assert!(
        version == env!("CARGO_PKG_VERSION")
            || version == format!("{}-debug", env!("CARGO_PKG_VERSION")),
        "version label {version}"
    );
    assert_eq!(
        labels["org.opencontainers.image.source"],
        "https://github.com/ward-dev/ward"
    );
    assert!(labels["org.opencontainers.image.revision"].is_string());
    let config = skopeo_inspect(&archive, &["--config"]);
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/ward"])
    );
}

/// The image in podman's store; loaded once per test process.
fn loaded_image() -> String {
    static LOADED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            let archive = image_archive();
            let finished = tool("podman", &["load", "--input", &archive.to_string_lossy()]);
            assert_success("podman load", &finished);
            finished
                .stdout
                .lines()
                .find_map(|l| l.strip_prefix("Loaded image: "))
                .unwrap_or_else(|| panic!("podman load named no image: {}", finished.stdout))
                .trim()
                .to_owned()
        })
        .clone()
}

/// A podman container, removed on drop with what its agent pinned.
struct Container {
    name: String,
    pin_dir: PathBuf,
}

impl Container {
    fn podman(&self, args: &[&str]) -> Finished {
        tool("podman", args)
    }

    fn logs(&self) -> String {
        let finished = self.podman(&["logs", &self.name]);
        format!("{}{}", finished.stdout, finished.stderr)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "--force", "--time", "10", &self.name])
            .output();
        let _ = Command::new(ward_bin())
            .arg("uninstall")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .output();
        if let Some(parent) = self.pin_dir.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

/// podman flags about this machine, not about the pod: resource limits the runtime can set
/// without `CAP_SYS_RESOURCE` (a test container may lack it; podman's defaults raise NOFILE, and
/// podman lowers its own NPROC to 32768, which crun and runc inherit), and runc where cgroup v2
/// is the hybrid layout's `unified` mount (crun refuses hybrid hosts whose v2 has controllers).
fn podman_flags_for_this_machine() -> Vec<String> {
    let limit = |resource| {
        let mut value = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the struct it is given.
        let ok = unsafe { libc::getrlimit(resource, &mut value) } == 0;
        assert!(ok, "getrlimit: {}", std::io::Error::last_os_error());
        value
    };
    let files = limit(libc::RLIMIT_NOFILE);
    let processes = limit(libc::RLIMIT_NPROC).rlim_max.min(32768);
    let mut flags = vec![
        "--ulimit".to_owned(),
        format!("nofile={}:{}", files.rlim_cur, files.rlim_max),
        "--ulimit".to_owned(),
        format!("nproc={processes}:{processes}"),
    ];
    if ward_tests::cgroup2_mount() != Path::new("/sys/fs/cgroup") {
        flags.extend(["--runtime".to_owned(), "runc".to_owned()]);
    }
    flags
}

/// The DaemonSet's ConfigMap `ward.yaml`, pointed at the test's cgroups, pin directory and
/// workloads; what it leaves alone stays as shipped. There is no control plane here: the
/// workloads are listed and the policy is read from `policies/` beside the configuration
/// (tests/tests/kubernetes_cluster.rs runs `workloads: fromControlPlane` against ward-control).
fn shipped_config(documents: &[Value], cgroups: &TestCgroups, pin_dir: &Path) -> String {
    let config_map = kubernetes::find(documents, "ConfigMap", "ward-config");
    let text = config_map["data"]["ward.yaml"].as_str().expect("ward.yaml");
    let mut config: Value = serde_saphyr::from_str(text).expect("the ConfigMap's ward.yaml");
    config["cgroupRoot"] = cgroups.root().to_string_lossy().as_ref().into();
    config["pinDir"] = pin_dir.to_string_lossy().as_ref().into();
    assert_eq!(config["workloads"], "fromControlPlane", "as shipped");
    config["workloads"] = serde_json::json!([
        {"name": "client", "labels": {"app": "client"}, "cgroups": ["client"]}
    ]);
    config
        .as_object_mut()
        .expect("a mapping")
        .remove("controlPlane")
        .expect("shipped with a control plane");
    config["policies"] = serde_json::json!(["policies/"]);
    // JSON is YAML.
    serde_json::to_string_pretty(&config).expect("JSON")
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool, context: impl Fn() -> String) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout(),
            "{what} within {:?}:\n{}",
            timeout(),
            context()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// podman with the flags the pod spec stands for (tests/src/kubernetes.rs), plus what this
/// machine needs of podman ([`podman_flags_for_this_machine`]); the probes as the kubelet runs
/// them; the policy enforced on a workload in the host's cgroups.
#[test]
fn the_image_runs_as_the_daemonset_runs_it_and_enforces_a_workloads_policy() {
    ward_tests::require_privileges();
    let image = loaded_image();
    let documents = kubernetes::documents(&daemonset_file());
    let daemonset = kubernetes::find(&documents, "DaemonSet", "ward");
    let shipped = kubernetes::container(daemonset, "ward")["image"]
        .as_str()
        .expect("image");
    assert!(
        image == shipped || image == format!("{shipped}-debug"),
        "the archive holds {image}, the DaemonSet runs {shipped}"
    );

    let peer = peer!();
    let cgroups = TestCgroups::new("image");
    let client = Placement::cgroup(cgroups.create("client"));
    let open = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let closed = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let name = unique_name("image");
    // The admin socket is /run/<pinDir name>/admin.sock: a pin directory named `ward`, as
    // shipped, puts it in the DaemonSet's /run/ward volume.
    let pin_dir = Path::new("/sys/fs/bpf").join(&name).join("ward");
    let dir = TestDir::new(&name);
    // The ConfigMap's directory, the CA's and the projected token's (unused without a control
    // plane) and the node's state directory.
    let (config_dir, ca_dir, token_dir, state_dir) = (
        dir.0.join("config"),
        dir.0.join("ca"),
        dir.0.join("token"),
        dir.0.join("state"),
    );
    let policies = config_dir.join("policies");
    for d in [&policies, &ca_dir, &token_dir, &state_dir] {
        std::fs::create_dir_all(d).expect("test directory");
    }
    let config = config_dir.join("ward.yaml");
    std::fs::write(&config, shipped_config(&documents, &cgroups, &pin_dir)).expect("config");
    std::fs::write(
        policies.join("client.yaml"),
        client_egress("client-egress", &allow_tcp("allow-open", open.port())),
    )
    .expect("policy");

    let run_args = kubernetes::podman_run_args(
        daemonset,
        "ward",
        &image,
        &[
            Provided {
                volume: "config",
                host_path: &config_dir,
            },
            Provided {
                volume: "control-ca",
                host_path: &ca_dir,
            },
            Provided {
                volume: "control-token",
                host_path: &token_dir,
            },
            Provided {
                volume: "state",
                host_path: &state_dir,
            },
        ],
    );
    let container = Container {
        name: name.clone(),
        pin_dir: pin_dir.clone(),
    };
    let host_flags = podman_flags_for_this_machine();
    let mut args = vec!["run", "--detach", "--name", &name];
    args.extend(host_flags.iter().map(String::as_str));
    args.extend(run_args.iter().map(String::as_str));
    eprintln!("podman {}", args.join(" "));
    assert_success("podman run", &container.podman(&args));

    // The startup and liveness probe: `ward status` in the container.
    let pod_container = kubernetes::container(daemonset, "ward");
    let probe: Vec<&str> = pod_container["livenessProbe"]["exec"]["command"]
        .as_array()
        .expect("an exec liveness probe")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut exec = vec!["exec", &name];
    exec.extend(&probe);
    let start = Instant::now();
    let status = loop {
        let finished = container.podman(&exec);
        if finished.status.success() {
            break finished.stdout;
        }
        assert!(
            !finished.stderr.contains("state improper"),
            "the container stopped; logs:\n{}",
            container.logs()
        );
        assert!(
            start.elapsed() < timeout(),
            "`ward status` (the liveness probe) did not succeed in the container within {:?}: \
             {finished:?}\nlogs:\n{}",
            timeout(),
            container.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("ward status in the container:\n{status}");
    assert!(
        status.contains("client"),
        "status names no workload: {status}"
    );

    // The readiness probe: the metrics endpoint on the node's network.
    let ready = &pod_container["readinessProbe"]["httpGet"];
    let addr: SocketAddr = format!(
        "{}:{}",
        ready["host"].as_str().expect("host"),
        ready["port"].as_u64().expect("port")
    )
    .parse()
    .expect("address");
    let response = http_get(addr, ready["path"].as_str().expect("path"));
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "readiness probe: {response}"
    );

    // The policy, enforced by the kernel programs the container's agent attached.
    let allowed = peer.connect(Protocol::Tcp, open.addr, &client, &[]);
    let denied = peer.connect(Protocol::Tcp, closed.addr, &client, &[]);
    let logs = container.logs();
    assert_eq!(allowed.only(), &Outcome::Ok, "allowed port; logs:\n{logs}");
    assert_eq!(denied.only(), &Outcome::Eperm, "denied port; logs:\n{logs}");
    assert_eq!(closed.received(), 0, "the denied listener saw a connection");
    wait_until(
        "the container's agent logs the deny verdict",
        || container.logs().contains("\"verdict\":\"deny\""),
        || container.logs(),
    );
}

// ---- The systemd units ---------------------------------------------------------------------

/// Runs `command` with `provided` files in place in a private mount namespace (the units'
/// binaries at /usr/local/bin, which need not exist on this machine).
fn with_files(provided: &[(&str, &Path)], command: &str) -> Finished {
    let mut script = vec!["set -eu".to_owned()];
    let mut dirs: Vec<&str> = provided
        .iter()
        .map(|(at, _)| at.rsplit_once('/').expect("absolute").0)
        .collect();
    dirs.dedup();
    for dir in dirs {
        script.push(format!("mount -t tmpfs tmpfs {dir}"));
    }
    for (at, from) in provided {
        script.push(format!("cp {} {at}", from.display()));
    }
    script.push(command.to_owned());
    let mut unshare = Command::new("unshare");
    unshare.args(["--mount", "--propagation", "private", "--", "sh", "-c"]);
    unshare.arg(script.join("\n"));
    run("unshare", unshare, timeout())
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    ward_tests::require_privileges();
    assert!(
        which("systemd-analyze"),
        "PRIVILEGED TEST NOT RUN: systemd-analyze is not installed; run `cargo xtask setup`"
    );
    let units = [unit_file("ward.service"), unit_file("ward-control.service")];
    let finished = with_files(
        &[
            ("/usr/local/bin/ward", &ward_bin()),
            ("/usr/local/bin/ward-control", &ward_tests::control_bin()),
        ],
        &format!(
            "systemd-analyze verify {} {}",
            units[0].display(),
            units[1].display()
        ),
    );
    assert_success("systemd-analyze verify", &finished);
    assert!(
        finished.stderr.trim().is_empty(),
        "systemd-analyze verify warned: {}",
        finished.stderr
    );
}

/// The unit's sandbox as tests/src/systemd.rs emulates it (and says what it cannot): read-only
/// system, the runtime directory, the capability bounding set.
#[test]
fn the_agent_serves_status_and_enforces_under_its_units_sandbox() {
    ward_tests::require_privileges();
    let unit = Unit::read(&unit_file("ward.service"));
    let exec = unit.exec_start();
    let config_at = exec
        .iter()
        .position(|w| *w == "--config")
        .and_then(|i| exec.get(i + 1))
        .expect("ExecStart passes --config");

    let peer = peer!();
    let cgroups = TestCgroups::new("unit");
    let client = Placement::cgroup(cgroups.create("client"));
    let open = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let closed = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let name = unique_name("unit");
    // Named `ward`, as the default, so the admin socket is /run/ward/admin.sock, the unit's
    // RuntimeDirectory.
    let pin_dir = Path::new("/sys/fs/bpf").join(&name).join("ward");
    let dir = TestDir::new(&name);
    let policy = dir.0.join("policy.yaml");
    std::fs::write(
        &policy,
        client_egress("client-egress", &allow_tcp("allow-open", open.port())),
    )
    .expect("policy");
    let config = dir.0.join("ward.yaml");
    std::fs::write(
        &config,
        serde_json::json!({
            "trustDomain": "ward.test",
            "cgroupRoot": cgroups.root(),
            "pinDir": pin_dir,
            "policies": ["/etc/ward/policy.yaml"],
            "workloads": [{"name": "client", "labels": {"app": "client"}, "cgroups": ["client"]}],
        })
        .to_string(),
    )
    .expect("config");

    let sandbox = Sandbox::start(
        &unit,
        &[
            systemd::Provided {
                at: exec[0],
                from: &ward_bin(),
            },
            systemd::Provided {
                at: config_at,
                from: &config,
            },
            systemd::Provided {
                at: "/etc/ward/policy.yaml",
                from: &policy,
            },
        ],
        false,
    );
    let cleanup = PinCleanup(pin_dir.clone());
    sandbox
        .process
        .wait_for_line(0, timeout(), "saying `ready`", |l| l.contains("ready"));

    let socket = sandbox.path("/run/ward/admin.sock");
    let mut status = Command::new(ward_bin());
    status.arg("status").arg("--admin-socket").arg(&socket);
    let finished = run("ward status", status, timeout());
    assert_success("ward status against the sandboxed agent", &finished);
    eprintln!("{}", finished.stdout);
    assert!(finished.stdout.contains("client"), "{}", finished.stdout);

    let allowed = peer.connect(Protocol::Tcp, open.addr, &client, &[]);
    let denied = peer.connect(Protocol::Tcp, closed.addr, &client, &[]);
    let log = sandbox.process.lines().tail(40);
    assert_eq!(allowed.only(), &Outcome::Ok, "allowed port; log:\n{log}");
    assert_eq!(denied.only(), &Outcome::Eperm, "denied port; log:\n{log}");
    drop(sandbox);
    drop(cleanup);
}

/// A test's files below the temporary directory, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        TestDir(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes what an agent started with `--keep-enforcing` left pinned.
struct PinCleanup(PathBuf);

impl Drop for PinCleanup {
    fn drop(&mut self) {
        let _ = Command::new(ward_bin())
            .arg("uninstall")
            .arg("--pin-dir")
            .arg(&self.0)
            .output();
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

#[test]
fn ward_control_serves_under_its_units_sandbox() {
    ward_tests::require_privileges();
    let unit = Unit::read(&unit_file("ward-control.service"));
    let exec = unit.exec_start();
    let argument = |flag: &str| {
        exec.iter()
            .position(|w| *w == flag)
            .and_then(|i| exec.get(i + 1))
            .copied()
            .unwrap_or_else(|| panic!("ExecStart passes {flag}"))
    };
    let dir = TestDir::new(&unique_name("control-unit"));
    let policy = dir.0.join("policy.yaml");
    std::fs::write(
        &policy,
        client_egress("client-egress", &allow_tcp("allow-web", 8080)),
    )
    .expect("policy");
    let tokens = dir.0.join("tokens");
    std::fs::write(&tokens, "").expect("token file");
    let policy_at = format!("{}/client.yaml", argument("--policy-dir"));
    // Its own network namespace: ExecStart listens on 0.0.0.0:7443.
    let sandbox = Sandbox::start(
        &unit,
        &[
            systemd::Provided {
                at: exec[0],
                from: &ward_tests::control_bin(),
            },
            systemd::Provided {
                at: &policy_at,
                from: &policy,
            },
            systemd::Provided {
                at: argument("--token-file"),
                from: &tokens,
            },
        ],
        true,
    );
    sandbox
        .process
        .wait_for_line(0, timeout(), "saying `control plane ready`", |l| {
            l.contains("control plane ready")
        });
    let state = sandbox.path(argument("--state-dir"));
    let kept: Vec<String> = std::fs::read_dir(&state)
        .unwrap_or_else(|e| panic!("{}: {e}", state.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !kept.is_empty(),
        "ward-control kept nothing in its StateDirectory"
    );
    eprintln!("state directory: {kept:?}");
    drop(sandbox);
}
