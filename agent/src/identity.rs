//! Workload identities: which cgroup belongs to which workload, and the stable numeric id the
//! kernel maps use for each identity (a SPIFFE ID with its namespace and labels).
use std::path::Path;

use crate::{
    config::Config,
    policy::{identity::allocate_all, WorkloadInfo},
};

/// The configured workloads with their identities, in configuration order. Workloads that share
/// a SPIFFE ID but not their namespace or labels get one number each.
pub fn workload_infos(config: &Config) -> Vec<WorkloadInfo> {
    let infos: Vec<WorkloadInfo> = config
        .workloads
        .iter()
        .map(|w| WorkloadInfo {
            identity: 0,
            name: w.name.clone(),
            spiffe_id: w.spiffe_id.clone(),
            namespace: w.namespace.clone(),
            namespace_labels: w
                .namespace
                .as_ref()
                .and_then(|ns| config.namespaces.get(ns))
                .cloned()
                .unwrap_or_default(),
            labels: w.labels.clone(),
            addresses: w.addresses.clone(),
            ports: w.ports.clone(),
        })
        .collect();
    let keys: Vec<String> = infos.iter().map(WorkloadInfo::key).collect();
    let ids = allocate_all(keys.iter().cloned());
    infos
        .into_iter()
        .zip(&keys)
        .map(|(w, key)| WorkloadInfo {
            identity: ids[key],
            ..w
        })
        .collect()
}

/// Which workload a cgroup (path relative to the cgroup root) belongs to: the first workload that
/// matches it or its nearest matching ancestor, so containers inside a pod belong to the pod.
pub fn workload_of_cgroup(config: &Config, relative: &Path) -> Option<usize> {
    let mut candidate = Some(relative);
    while let Some(path) = candidate {
        if path.as_os_str().is_empty() {
            return None;
        }
        if let Some(i) = config.workloads.iter().position(|w| matches(w, path)) {
            return Some(i);
        }
        candidate = path.parent();
    }
    None
}

fn matches(w: &crate::config::WorkloadConfig, path: &Path) -> bool {
    if w.cgroups.iter().any(|c| c == path) {
        return true;
    }
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if w.systemd_units.iter().any(|u| u == name) {
        return true;
    }
    w.pod_uids.iter().any(|uid| is_pod_cgroup(uid, name))
}

/// Whether a cgroup directory named `name` is kubelet's cgroup of pod `uid`: `pod<uid>`
/// (cgroupfs driver) or `kubepods-<qos>-pod<uid with _>.slice` (systemd driver).
fn is_pod_cgroup(uid: &str, name: &str) -> bool {
    let dashed = format!("pod{}", uid.replace('_', "-"));
    let underscored = format!("pod{}.slice", uid.replace('-', "_"));
    name == dashed || name.ends_with(&underscored)
}

/// Whether a cgroup (path relative to the cgroup root) is, or is below, the cgroup of one of
/// `pod_uids`.
pub fn in_pod_cgroup(pod_uids: &[String], relative: &Path) -> bool {
    relative.ancestors().any(|path| {
        path.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|name| pod_uids.iter().any(|uid| is_pod_cgroup(uid, name)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(Path::new("/w.yaml"), text).expect("valid config")
    }

    #[test]
    fn workloads_carry_their_namespace_labels_and_named_ports() {
        let c = config(
            "trustDomain: x\nnamespaces: {shop: {labels: {team: a}}}\nworkloads:\n  - {name: api, namespace: shop, ports: [{name: http, port: 8080}]}\n  - {name: db, namespace: store}\n  - {name: host}\n",
        );
        let infos = workload_infos(&c);
        let seen: Vec<_> = infos
            .iter()
            .map(|w| {
                let labels: Vec<_> = w.namespace_labels.iter().collect();
                let ports: Vec<_> = w.ports.iter().map(|p| (p.name.as_str(), p.port)).collect();
                (w.name.as_str(), format!("{labels:?}"), ports)
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("api", r#"[("team", "a")]"#.to_owned(), vec![("http", 8080)]),
                ("db", "[]".to_owned(), vec![]),
                ("host", "[]".to_owned(), vec![]),
            ],
            "a namespace the configuration does not list has no labels but its name"
        );
    }

    #[test]
    fn cgroups_match_by_path_unit_and_pod_uid_with_descendants() {
        let c = config(
            "trustDomain: x\nworkloads:\n  - {name: web, cgroups: [demo/web]}\n  - {name: nginx, systemdUnits: [nginx.service]}\n  - {name: pod, podUids: [3f1c2a4e-aaaa-bbbb-cccc-0123456789ab]}\n",
        );
        let of = |p: &str| workload_of_cgroup(&c, Path::new(p));
        assert_eq!(of("demo/web"), Some(0));
        assert_eq!(of("demo/web/worker"), Some(0));
        assert_eq!(of("demo"), None);
        assert_eq!(of("system.slice/nginx.service"), Some(1));
        assert_eq!(
            of("kubepods/besteffort/pod3f1c2a4e-aaaa-bbbb-cccc-0123456789ab/ctr1"),
            Some(2)
        );
        assert_eq!(
            of("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3f1c2a4e_aaaa_bbbb_cccc_0123456789ab.slice"),
            Some(2)
        );
    }

    #[test]
    fn a_shared_spiffe_id_with_other_labels_is_another_identity() {
        let c = config(
            "trustDomain: x\nworkloads:\n  - {name: a, spiffeId: 'spiffe://x/s', labels: {app: a}}\n  - {name: b, spiffeId: 'spiffe://x/s', labels: {app: b}}\n  - {name: c, spiffeId: 'spiffe://x/s', labels: {app: a}}\n",
        );
        let ids: Vec<u32> = workload_infos(&c).iter().map(|w| w.identity).collect();
        assert_ne!(ids[0], ids[1], "other labels");
        assert_eq!(ids[0], ids[2], "the same labels");
    }
}
