//! The repository's Kubernetes manifests as the API server reads them: the admission rules its
//! OpenAPI schema does not carry, and the container runtime flags a pod spec stands for, so a
//! test can run the image the way a node would.

use std::path::Path;

use serde_json::Value;

/// Every document of a (multi-document) YAML file.
pub fn documents(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The document of `kind` named `name`.
pub fn find<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name:?} in the manifests"))
}

/// The container `name` of a workload's pod template.
pub fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    pod_spec(workload)["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name:?} in {}", workload["metadata"]["name"]))
}

pub fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

/// Linux capability names as a pod spec writes them (no `CAP_` prefix; containerd and CRI-O
/// refuse a name the kernel does not have).
const CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYSLOG",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "WAKE_ALARM",
];

/// k8s.io/api core/v1 HostPathType values.
const HOST_PATH_TYPES: &[&str] = &[
    "",
    "DirectoryOrCreate",
    "Directory",
    "FileOrCreate",
    "File",
    "Socket",
    "CharDevice",
    "BlockDevice",
];

const PROPAGATIONS: &[&str] = &["None", "HostToContainer", "Bidirectional"];

fn text(value: &Value) -> Option<&str> {
    value.as_str()
}

fn list(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

/// What the API server (pkg/apis/core/validation) or the container runtime refuses in a
/// workload's pod template beyond the OpenAPI schema, one message per violation:
/// - `mountPropagation: Bidirectional` only in a privileged container; the value is one of
///   None, HostToContainer, Bidirectional;
/// - `allowPrivilegeEscalation: false` with neither `privileged: true` nor `CAP_SYS_ADMIN` added;
/// - capability names the kernel has, written without `CAP_` (`ALL` too);
/// - a hostPath `type` among the HostPathType values;
/// - every volumeMount names a volume of the pod;
/// - an AppArmor `Localhost` profile names its profile;
/// - the workload's `selector.matchLabels` are among its pod template's labels;
/// - a `Recreate` Deployment strategy carries no `rollingUpdate`;
/// - (the kubelet) `runAsNonRoot: true` comes with a non-zero `runAsUser` in the pod's or the
///   container's security context, since ward's image sets no user the kubelet could check;
/// - (the kubelet) a probe's named port is one of the container's ports.
pub fn api_server_violations(workload: &Value) -> Vec<String> {
    let spec = pod_spec(workload);
    let mut violations = workload_violations(workload);
    let volumes = list(&spec["volumes"]);
    for volume in volumes {
        if let Some(host_path) = volume.get("hostPath") {
            let kind = text(&host_path["type"]).unwrap_or("");
            if !HOST_PATH_TYPES.contains(&kind) {
                violations.push(format!(
                    "volume {}: hostPath type {kind:?} is not one of {HOST_PATH_TYPES:?}",
                    volume["name"]
                ));
            }
        }
    }
    for container in list(&spec["initContainers"])
        .iter()
        .chain(list(&spec["containers"]))
    {
        let name = &container["name"];
        let context = &container["securityContext"];
        let privileged = context["privileged"] == true;
        let caps = &context["capabilities"];
        for cap in list(&caps["add"]).iter().chain(list(&caps["drop"])) {
            let cap = text(cap).unwrap_or("");
            if cap != "ALL" && !CAPABILITIES.contains(&cap) {
                violations.push(format!(
                    "container {name}: capability {cap:?} is not a Linux capability name \
                     (written without CAP_)"
                ));
            }
        }
        if context["allowPrivilegeEscalation"] == false {
            if privileged {
                violations.push(format!(
                    "container {name}: allowPrivilegeEscalation: false with privileged: true"
                ));
            }
            if list(&caps["add"]).iter().any(|c| c == "CAP_SYS_ADMIN") {
                violations.push(format!(
                    "container {name}: allowPrivilegeEscalation: false with CAP_SYS_ADMIN added"
                ));
            }
        }
        let run_as_non_root = context["runAsNonRoot"]
            .as_bool()
            .or(spec["securityContext"]["runAsNonRoot"].as_bool());
        let run_as_user = context["runAsUser"]
            .as_u64()
            .or(spec["securityContext"]["runAsUser"].as_u64());
        if run_as_non_root == Some(true) && run_as_user.is_none_or(|u| u == 0) {
            violations.push(format!(
                "container {name}: runAsNonRoot needs a non-zero runAsUser (the image sets no user)"
            ));
        }
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let probe = &container[probe];
            let port = ["httpGet", "tcpSocket", "grpc"]
                .iter()
                .find_map(|handler| text(&probe[handler]["port"]));
            if let Some(port) = port {
                if !list(&container["ports"]).iter().any(|p| p["name"] == port) {
                    violations.push(format!(
                        "container {name}: a probe's port {port:?} names no port of the container"
                    ));
                }
            }
        }
        if context["appArmorProfile"]["type"] == "Localhost"
            && context["appArmorProfile"]["localhostProfile"].is_null()
        {
            violations.push(format!(
                "container {name}: a Localhost AppArmor profile needs localhostProfile"
            ));
        }
        for mount in list(&container["volumeMounts"]) {
            let volume = &mount["name"];
            if !volumes.iter().any(|v| v["name"] == *volume) {
                violations.push(format!(
                    "container {name}: volumeMount {volume} names no volume of the pod"
                ));
            }
            let Some(propagation) = text(&mount["mountPropagation"]) else {
                continue;
            };
            if !PROPAGATIONS.contains(&propagation) {
                violations.push(format!(
                    "container {name}: mountPropagation {propagation:?} is not one of \
                     {PROPAGATIONS:?}"
                ));
            }
            if propagation == "Bidirectional" && !privileged {
                violations.push(format!(
                    "container {name}: volumeMount {volume}: Bidirectional mount propagation \
                     is available only to privileged containers"
                ));
            }
        }
    }
    violations
}

/// The rules of a workload itself rather than of its pod template.
fn workload_violations(workload: &Value) -> Vec<String> {
    let mut violations = Vec::new();
    let labels = &workload["spec"]["template"]["metadata"]["labels"];
    if let Some(selector) = workload["spec"]["selector"]["matchLabels"].as_object() {
        for (key, value) in selector {
            if labels[key] != *value {
                violations.push(format!(
                    "selector {key}={value} does not match the pod template's labels {labels}"
                ));
            }
        }
    }
    let strategy = &workload["spec"]["strategy"];
    if strategy["type"] == "Recreate" && !strategy["rollingUpdate"].is_null() {
        violations.push("a Recreate strategy carries no rollingUpdate".to_owned());
    }
    violations
}

/// What an RBAC role grants, one `<apiGroup>/<resource>: <verb>` a line (the core group is
/// empty: `/pods: get`), sorted. A wildcard stays `*`, and `resourceNames` or
/// `nonResourceURLs` show up as such, so comparing with an expected list catches every widening.
pub fn rbac_grants(role: &Value) -> Vec<String> {
    let mut grants = Vec::new();
    for rule in list(&role["rules"]) {
        for url in list(&rule["nonResourceURLs"]) {
            grants.push(format!("nonResourceURL {url}"));
        }
        let names = list(&rule["resourceNames"]);
        for group in list(&rule["apiGroups"]) {
            for resource in list(&rule["resources"]) {
                for verb in list(&rule["verbs"]) {
                    let (group, resource, verb) = (
                        text(group).unwrap_or("?"),
                        text(resource).unwrap_or("?"),
                        text(verb).unwrap_or("?"),
                    );
                    let limited = if names.is_empty() {
                        String::new()
                    } else {
                        format!(" (resourceNames {})", Value::from(names.to_vec()))
                    };
                    grants.push(format!("{group}/{resource}: {verb}{limited}"));
                }
            }
        }
    }
    grants.sort();
    grants.dedup();
    grants
}

fn push(args: &mut Vec<String>, items: &[&str]) {
    args.extend(items.iter().map(|s| (*s).to_owned()));
}

/// What stands in for a volume the test provides itself (a ConfigMap's content, say).
/// What the downward API gives a pod `podman_run_args` runs: `spec.nodeName`...
pub const POD_NODE_NAME: &str = "podman-node";
/// ...and `metadata.uid`.
pub const POD_UID: &str = "00000000-0000-4000-8000-0000000000aa";

pub struct Provided<'a> {
    pub volume: &'a str,
    pub host_path: &'a Path,
}

/// `podman run` flags for container `name` of a workload's pod template, as a kubelet would run
/// it: host namespaces, capabilities, the security context, the mounts (hostPath with its
/// propagation, emptyDir as tmpfs, a [`Provided`] volume bound from the test's file or directory,
/// read-only as the mount says), the environment (literal values, and the downward API's
/// [`POD_NODE_NAME`] and [`POD_UID`]) and the container's arguments after `image`.
///
/// Panics on a volume, profile or host namespace it does not translate, so such a manifest
/// change cannot go untested.
pub fn podman_run_args(
    workload: &Value,
    name: &str,
    image: &str,
    provided: &[Provided<'_>],
) -> Vec<String> {
    let spec = pod_spec(workload);
    let container = container(workload, name);
    let mut args: Vec<String> = Vec::new();
    if spec["hostNetwork"] == true {
        push(&mut args, &["--network", "host"]);
    }
    if spec["hostPID"] == true {
        push(&mut args, &["--pid", "host"]);
    }
    for unsupported in ["hostIPC", "shareProcessNamespace"] {
        assert!(
            spec[unsupported].is_null(),
            "podman_run_args does not translate {unsupported}"
        );
    }
    let context = &container["securityContext"];
    if context["privileged"] == true {
        push(&mut args, &["--privileged"]);
    }
    if context["allowPrivilegeEscalation"] == false {
        push(&mut args, &["--security-opt", "no-new-privileges"]);
    }
    if context["readOnlyRootFilesystem"] == true {
        // A kubelet adds no tmpfs of its own to a read-only root.
        push(&mut args, &["--read-only", "--read-only-tmpfs=false"]);
    }
    if let Some(user) = context["runAsUser"].as_u64() {
        args.extend(["--user".to_owned(), user.to_string()]);
    }
    match text(&context["appArmorProfile"]["type"]) {
        None | Some("RuntimeDefault") => {}
        Some("Unconfined") => push(&mut args, &["--security-opt", "apparmor=unconfined"]),
        Some(other) => panic!("podman_run_args does not translate appArmorProfile {other}"),
    }
    match text(&context["seccompProfile"]["type"]) {
        // podman's default profile is the runtime default.
        None | Some("RuntimeDefault") => {}
        Some("Unconfined") => push(&mut args, &["--security-opt", "seccomp=unconfined"]),
        Some(other) => panic!("podman_run_args does not translate seccompProfile {other}"),
    }
    let caps = &context["capabilities"];
    for (flag, key) in [("--cap-drop", "drop"), ("--cap-add", "add")] {
        for cap in list(&caps[key]) {
            args.extend([
                flag.to_owned(),
                text(cap).expect("a capability name").to_owned(),
            ]);
        }
    }
    for env in list(&container["env"]) {
        let name = text(&env["name"]).expect("an env name");
        let field = text(&env["valueFrom"]["fieldRef"]["fieldPath"]);
        let value = match (text(&env["value"]), field) {
            (Some(value), None) => value,
            (None, Some("spec.nodeName")) => POD_NODE_NAME,
            (None, Some("metadata.uid")) => POD_UID,
            _ => panic!("podman_run_args does not translate env {name}: {env}"),
        };
        args.extend(["--env".to_owned(), format!("{name}={value}")]);
    }
    let volumes = list(&spec["volumes"]);
    for mount in list(&container["volumeMounts"]) {
        let volume_name = text(&mount["name"]).expect("a volumeMount name");
        let path = text(&mount["mountPath"]).expect("a mountPath");
        let read_only = mount["readOnly"] == true;
        let volume = volumes
            .iter()
            .find(|v| v["name"] == volume_name)
            .unwrap_or_else(|| panic!("volumeMount {volume_name} names no volume"));
        if let Some(given) = provided.iter().find(|p| p.volume == volume_name) {
            let mode = if read_only { "ro" } else { "rw" };
            args.extend([
                "--volume".to_owned(),
                format!("{}:{path}:{mode}", given.host_path.display()),
            ]);
        } else if let Some(host_path) = volume.get("hostPath") {
            let propagation = match text(&mount["mountPropagation"]).unwrap_or("None") {
                "None" => "rprivate",
                "HostToContainer" => "rslave",
                "Bidirectional" => "rshared",
                other => panic!("mountPropagation {other}"),
            };
            let mode = if read_only { "ro" } else { "rw" };
            args.extend([
                "--volume".to_owned(),
                format!(
                    "{}:{path}:{mode},{propagation}",
                    text(&host_path["path"]).expect("a hostPath path")
                ),
            ]);
        } else if volume.get("emptyDir").is_some() {
            args.extend([
                "--mount".to_owned(),
                format!("type=tmpfs,destination={path},tmpfs-mode=0755"),
            ]);
        } else {
            panic!("podman_run_args does not translate volume {volume}; provide it");
        }
    }
    if let Some(command) = container["command"].as_array() {
        let entrypoint: Vec<&str> = command.iter().filter_map(text).collect();
        args.extend([
            "--entrypoint".to_owned(),
            serde_json::to_string(&entrypoint).expect("JSON"),
        ]);
    }
    args.push(image.to_owned());
    args.extend(
        list(&container["args"])
            .iter()
            .map(|a| text(a).expect("string args").to_owned()),
    );
    args
}
