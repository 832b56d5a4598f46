//! The agent's configuration, parsed once into typed values. Every bad value is an error naming the
//! file, the field and the reason.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::policy::NamedPort;

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ward";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    /// Not YAML, or not a configuration; `line` is where the text goes wrong, when known.
    #[error("{}{}: {reason}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Parse {
        file: PathBuf,
        line: Option<usize>,
        reason: String,
    },
    #[error("{file}: field `{field}`: {reason}")]
    Field {
        file: PathBuf,
        field: String,
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    trust_domain: String,
    cgroup_root: Option<PathBuf>,
    pin_dir: Option<PathBuf>,
    #[serde(default)]
    policies: Vec<PathBuf>,
    host_addresses: Option<RawHostAddresses>,
    admin_socket: Option<PathBuf>,
    metrics_address: Option<String>,
    flow_log: Option<PathBuf>,
    #[serde(default)]
    namespaces: BTreeMap<String, RawNamespace>,
    #[serde(default)]
    workloads: RawWorkloads,
    control_plane: Option<crate::control::ControlPlaneConfig>,
    tunnel: Option<RawTunnel>,
    dns: Option<RawDns>,
    unmapped_cgroups: Option<String>,
    #[serde(default)]
    services: Vec<RawService>,
}

/// `services:`: virtual addresses translated to backends at `connect()`, as Kubernetes Services
/// are (local mode; a control plane that reads a cluster sends the cluster's).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawService {
    name: String,
    namespace: Option<String>,
    #[serde(rename = "clusterIPs")]
    cluster_ips: Vec<String>,
    session_affinity: Option<String>,
    #[serde(default)]
    ports: Vec<RawServicePort>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServicePort {
    #[serde(default)]
    name: String,
    port: i64,
    protocol: Option<String>,
    #[serde(default)]
    backends: Vec<String>,
}

/// `unmappedCgroups:`: what the kernel does with traffic of a cgroup below the cgroup root that
/// neither it nor any ancestor maps to a workload (a pod's cgroup before the agent has mapped it).
/// A new child cgroup of a mapped workload is that workload either way: the kernel climbs to the
/// nearest mapped ancestor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnmappedCgroups {
    /// Untouched, as if ward were not there.
    #[default]
    Allow,
    /// Refused (fail closed).
    Deny,
}

impl UnmappedCgroups {
    /// The value of the kernel's settings map.
    pub fn kernel_value(self) -> u8 {
        match self {
            UnmappedCgroups::Allow => agent_common::UNMAPPED_ALLOW,
            UnmappedCgroups::Deny => agent_common::UNMAPPED_DENY,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTunnel {
    listen: Option<String>,
    advertise: Option<String>,
    outbound_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDns {
    proxy_port: Option<u16>,
    min_ttl_seconds: Option<u32>,
    max_ttl_seconds: Option<u32>,
    max_learned: Option<usize>,
    #[serde(default)]
    only_policy_names: bool,
}

/// `dns:`: the DNS proxy that learns the addresses of the names egress rules allow (`fqdn`,
/// `fqdnPattern`). It listens while a policy names DNS names; only the DNS of workloads whose rules
/// name DNS names is sent to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    /// Loopback port of the proxy (UDP and TCP, `127.0.0.1` and `::1`) in the agent's network
    /// namespace and in each workload's own.
    pub proxy_port: u16,
    /// A learned address counts at least this long, whatever the answer's TTL (clients cache
    /// answers past a short TTL), and at most `max_ttl`.
    pub min_ttl: std::time::Duration,
    pub max_ttl: std::time::Duration,
    /// The most (workload, address) pairs held; past it the one expiring first is evicted.
    pub max_learned: usize,
    /// A workload gets answers only for the names its egress rules name (`REFUSED` otherwise).
    pub only_policy_names: bool,
}

pub const DEFAULT_DNS_PROXY_PORT: u16 = 15053;
pub const DEFAULT_DNS_MIN_TTL_SECONDS: u32 = 60;
pub const DEFAULT_DNS_MAX_TTL_SECONDS: u32 = 86_400;

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            proxy_port: DEFAULT_DNS_PROXY_PORT,
            min_ttl: std::time::Duration::from_secs(DEFAULT_DNS_MIN_TTL_SECONDS.into()),
            max_ttl: std::time::Duration::from_secs(DEFAULT_DNS_MAX_TTL_SECONDS.into()),
            max_learned: (agent_common::MAX_LEARNED / 2) as usize,
            only_policy_names: false,
        }
    }
}

fn dns_settings(raw: RawDns) -> Result<DnsSettings, (&'static str, String)> {
    let defaults = DnsSettings::default();
    let proxy_port = raw.proxy_port.unwrap_or(defaults.proxy_port);
    if proxy_port == 0 || proxy_port == 53 {
        return Err((
            "proxyPort",
            format!("{proxy_port} cannot be the proxy's port"),
        ));
    }
    let min = raw.min_ttl_seconds.unwrap_or(DEFAULT_DNS_MIN_TTL_SECONDS);
    let max = raw
        .max_ttl_seconds
        .unwrap_or(DEFAULT_DNS_MAX_TTL_SECONDS.max(min));
    if min == 0 {
        return Err(("minTtlSeconds", "must be at least 1".into()));
    }
    if max < min {
        return Err((
            "maxTtlSeconds",
            format!("{max} is below minTtlSeconds {min}"),
        ));
    }
    let max_learned = raw.max_learned.unwrap_or(defaults.max_learned);
    if max_learned == 0 || max_learned > defaults.max_learned {
        return Err((
            "maxLearned",
            format!("must be between 1 and {}", defaults.max_learned),
        ));
    }
    Ok(DnsSettings {
        proxy_port,
        min_ttl: std::time::Duration::from_secs(min.into()),
        max_ttl: std::time::Duration::from_secs(max.into()),
        max_learned,
        only_policy_names: raw.only_policy_names,
    })
}

/// `tunnel:`: the mTLS tunnel that carries connections whose rule says `mtls: required`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelSettings {
    /// Where peers' agents connect (TLS 1.3, mutual), default `0.0.0.0:15008`.
    pub listen: std::net::SocketAddr,
    /// What peers dial, announced to the control plane; default `listen` unless that is a
    /// wildcard address.
    pub advertise: std::net::SocketAddr,
    /// Loopback port the connect hook redirects workloads' connections to (127.0.0.1 and ::1).
    pub outbound_port: u16,
}

pub const DEFAULT_TUNNEL_PORT: u16 = 15008;
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamespace {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// `workloads:`: a list, or the keyword `fromControlPlane`. Not `#[serde(untagged)]`, which
/// would hide what is wrong inside a listed workload behind "did not match any variant".
#[derive(Debug)]
enum RawWorkloads {
    Keyword(String),
    List(Vec<RawWorkload>),
}

impl<'de> Deserialize<'de> for RawWorkloads {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawWorkloads;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of workloads or \"fromControlPlane\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawWorkloads, E> {
                Ok(RawWorkloads::Keyword(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<RawWorkloads, A::Error> {
                let list =
                    Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
                Ok(RawWorkloads::List(list))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Default for RawWorkloads {
    fn default() -> Self {
        RawWorkloads::List(Vec::new())
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawHostAddresses {
    Keyword(String),
    List(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawWorkload {
    name: String,
    spiffe_id: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    cgroups: Vec<PathBuf>,
    #[serde(default)]
    systemd_units: Vec<String>,
    #[serde(default)]
    pod_uids: Vec<String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    ports: Vec<RawPort>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    name: String,
    port: i64,
    protocol: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostAddresses {
    /// Ask the kernel for this host's addresses.
    Auto,
    List(Vec<IpAddr>),
}

/// What `ward run`'s command line adds to the configuration file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunFlags {
    /// `--control-plane`: host:port of ward-control.
    pub address: Option<String>,
    /// `--node-name` / `WARD_NODE_NAME`.
    pub node_name: Option<String>,
    /// `--pod-uid` / `WARD_POD_UID`: the agent's own pod.
    pub pod_uid: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadConfig {
    pub name: String,
    pub spiffe_id: String,
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Relative to the cgroup root.
    pub cgroups: Vec<PathBuf>,
    pub systemd_units: Vec<String>,
    pub pod_uids: Vec<String>,
    pub addresses: Vec<IpAddr>,
    /// Named ports, for NetworkPolicy ports given by name.
    pub ports: Vec<NamedPort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub file: PathBuf,
    pub trust_domain: String,
    /// As written: absolute, or relative to the cgroup v2 mount; `None` is the mount itself.
    pub cgroup_root: Option<PathBuf>,
    pub pin_dir: PathBuf,
    /// Resolved against the configuration file's directory.
    pub policies: Vec<PathBuf>,
    pub host_addresses: HostAddresses,
    /// Unix socket of the admin API; default `/run/<pin dir name>/admin.sock`.
    pub admin_socket: PathBuf,
    /// Where `/metrics` is served; off unless set.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// A file that receives every flow record as a JSON line.
    pub flow_log: Option<PathBuf>,
    /// Labels of the Kubernetes namespaces the workloads name, by namespace.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub workloads: Vec<WorkloadConfig>,
    /// `workloads: fromControlPlane`: this node's pods come from a control plane that reads the
    /// cluster, and are matched to kubelet's pod cgroups by UID.
    pub workloads_from_control_plane: bool,
    /// The agent's own pod (`ward run --pod-uid`): its cgroup is the host's, so that
    /// `unmappedCgroups: deny` never refuses the agent itself.
    pub own_pod_uid: Option<String>,
    /// Policy, identities and the IP cache come from this control plane instead of `policies`.
    pub control_plane: Option<crate::control::ControlPlaneConfig>,
    /// The mTLS tunnel (control-plane mode only: workload certificates come from there).
    pub tunnel: Option<TunnelSettings>,
    /// The DNS proxy of DNS-aware egress.
    pub dns: DnsSettings,
    /// Traffic of cgroups below the root that no workload maps; default allow.
    pub unmapped_cgroups: UnmappedCgroups,
    /// Services of the configuration (local mode).
    pub services: Vec<crate::policy::service::Service>,
}

impl Config {
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Self::parse(file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = ward_policy::yaml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            line: e.line,
            reason: match e.path.segments() {
                [] => e.message,
                _ => format!("{}: {}", e.path, e.message),
            },
        })?;
        let field = |field: String, reason: String| ConfigError::Field {
            file: file.to_owned(),
            field,
            reason,
        };
        if !is_dns_label_list(&raw.trust_domain) {
            return Err(field(
                "trustDomain".into(),
                format!(
                    "{:?} is not a trust domain (lowercase letters, digits, '-', '.')",
                    raw.trust_domain
                ),
            ));
        }
        let base = file.parent().unwrap_or(Path::new("."));
        let pin_dir = raw.pin_dir.unwrap_or_else(|| DEFAULT_PIN_DIR.into());
        if !pin_dir.is_absolute() {
            return Err(field(
                "pinDir".into(),
                format!("{} is not an absolute path", pin_dir.display()),
            ));
        }
        let host_addresses = match raw.host_addresses {
            None => HostAddresses::Auto,
            Some(RawHostAddresses::Keyword(k)) if k == "auto" => HostAddresses::Auto,
            Some(RawHostAddresses::Keyword(k)) => {
                return Err(field(
                    "hostAddresses".into(),
                    format!("{k:?}: expected \"auto\" or a list of addresses"),
                ))
            }
            Some(RawHostAddresses::List(list)) => HostAddresses::List(
                list.iter()
                    .enumerate()
                    .map(|(i, a)| {
                        parse_addr(a).map_err(|r| field(format!("hostAddresses[{i}]"), r))
                    })
                    .collect::<Result<_, _>>()?,
            ),
        };
        let admin_socket = match raw.admin_socket {
            Some(p) if p.is_absolute() => p,
            Some(p) => {
                return Err(field(
                    "adminSocket".into(),
                    format!("{} is not an absolute path", p.display()),
                ))
            }
            None => crate::paths::default_admin_socket(&pin_dir),
        };
        let unmapped_cgroups = match raw.unmapped_cgroups.as_deref() {
            None | Some("allow") => UnmappedCgroups::Allow,
            Some("deny") => UnmappedCgroups::Deny,
            Some(other) => {
                return Err(field(
                    "unmappedCgroups".into(),
                    format!("{other:?}: expected \"allow\" or \"deny\""),
                ))
            }
        };
        let metrics_address = raw
            .metrics_address
            .map(|a| {
                a.parse().map_err(|_| {
                    field(
                        "metricsAddress".into(),
                        format!("{a:?} is not an address:port"),
                    )
                })
            })
            .transpose()?;
        let mut namespaces = BTreeMap::new();
        for (namespace, ns) in raw.namespaces {
            let name_label = ns.labels.get(crate::policy::NAMESPACE_NAME_LABEL);
            if name_label.is_some_and(|value| *value != namespace) {
                return Err(field(
                    format!(
                        "namespaces.{namespace}.labels.{}",
                        crate::policy::NAMESPACE_NAME_LABEL
                    ),
                    "is always the namespace's own name".into(),
                ));
            }
            namespaces.insert(namespace, ns.labels);
        }
        let mut names = BTreeSet::new();
        let (raw_workloads, workloads_from_control_plane) = match raw.workloads {
            RawWorkloads::List(list) => (list, false),
            RawWorkloads::Keyword(k) if k == "fromControlPlane" => {
                if raw.control_plane.is_none() {
                    return Err(field(
                        "workloads".into(),
                        "fromControlPlane needs controlPlane: (a control plane that reads a \
                         Kubernetes cluster)"
                            .into(),
                    ));
                }
                (Vec::new(), true)
            }
            RawWorkloads::Keyword(k) => {
                return Err(field(
                    "workloads".into(),
                    format!("{k:?}: expected \"fromControlPlane\" or a list of workloads"),
                ))
            }
        };
        let mut workloads = Vec::with_capacity(raw_workloads.len());
        for (i, w) in raw_workloads.into_iter().enumerate() {
            let at = |sub: &str| format!("workloads[{i}].{sub}");
            if w.name.is_empty() || w.name.contains(char::is_whitespace) {
                return Err(field(
                    at("name"),
                    format!("{:?} must be non-empty without spaces", w.name),
                ));
            }
            if !names.insert(w.name.clone()) {
                return Err(field(
                    at("name"),
                    format!("workload {:?} is defined twice", w.name),
                ));
            }
            let spiffe_id = match w.spiffe_id {
                Some(id) => {
                    let prefix = format!("spiffe://{}/", raw.trust_domain);
                    if !id.starts_with(&prefix) || id.len() == prefix.len() {
                        return Err(field(
                            at("spiffeId"),
                            format!(
                                "{id:?} is not a SPIFFE ID in trust domain {:?}",
                                raw.trust_domain
                            ),
                        ));
                    }
                    id
                }
                None => format!("spiffe://{}/workload/{}", raw.trust_domain, w.name),
            };
            for (j, c) in w.cgroups.iter().enumerate() {
                if c.is_absolute()
                    || c.components()
                        .any(|p| !matches!(p, std::path::Component::Normal(_)))
                {
                    return Err(field(
                        format!("workloads[{i}].cgroups[{j}]"),
                        format!("{} must be a relative path below cgroupRoot", c.display()),
                    ));
                }
            }
            for (j, u) in w.systemd_units.iter().enumerate() {
                if u.contains('/') || !u.contains('.') {
                    return Err(field(
                        format!("workloads[{i}].systemdUnits[{j}]"),
                        format!("{u:?} is not a unit name such as nginx.service"),
                    ));
                }
            }
            for (j, u) in w.pod_uids.iter().enumerate() {
                if u.len() < 8
                    || !u
                        .chars()
                        .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
                {
                    return Err(field(
                        format!("workloads[{i}].podUids[{j}]"),
                        format!("{u:?} is not a pod UID"),
                    ));
                }
            }
            let addresses = w
                .addresses
                .iter()
                .enumerate()
                .map(|(j, a)| {
                    parse_addr(a).map_err(|r| field(format!("workloads[{i}].addresses[{j}]"), r))
                })
                .collect::<Result<_, _>>()?;
            let mut ports: Vec<NamedPort> = Vec::with_capacity(w.ports.len());
            for (j, p) in w.ports.into_iter().enumerate() {
                let port =
                    named_port(p).map_err(|(sub, r)| field(at(&format!("ports[{j}]{sub}")), r))?;
                if ports.iter().any(|q| q.name == port.name) {
                    return Err(field(
                        at(&format!("ports[{j}].name")),
                        format!("port name {:?} is given twice", port.name),
                    ));
                }
                ports.push(port);
            }
            workloads.push(WorkloadConfig {
                name: w.name,
                spiffe_id,
                namespace: w.namespace,
                labels: w.labels,
                cgroups: w.cgroups,
                systemd_units: w.systemd_units,
                pod_uids: w.pod_uids,
                addresses,
                ports,
            });
        }
        let control_plane = match raw.control_plane {
            None => None,
            Some(_) if !raw.policies.is_empty() => {
                return Err(field(
                    "policies".into(),
                    "must be empty with controlPlane: policy comes from the control plane".into(),
                ))
            }
            Some(mut cp) => {
                cp.join_token_file = cp.join_token_file.map(|p| base.join(p));
                cp.ca_file = base.join(&cp.ca_file);
                check_control_plane(file, &cp)?;
                Some(cp)
            }
        };
        if control_plane.is_some() && !raw.services.is_empty() {
            return Err(field(
                "services".into(),
                "must be empty with controlPlane: Services come from the control plane".into(),
            ));
        }
        let mut services: Vec<crate::policy::service::Service> = Vec::new();
        for (i, raw) in raw.services.into_iter().enumerate() {
            let service =
                service(raw).map_err(|(sub, r)| field(format!("services[{i}]{sub}"), r))?;
            if services.iter().any(|s| s.key() == service.key()) {
                return Err(field(
                    format!("services[{i}].name"),
                    format!("Service {} is defined twice", service.key()),
                ));
            }
            services.push(service);
        }
        let tunnel = match raw.tunnel {
            None => None,
            Some(_) if control_plane.is_none() => {
                return Err(field(
                    "tunnel".into(),
                    "needs controlPlane: workload certificates come from the control plane".into(),
                ))
            }
            Some(t) => Some(tunnel_settings(t).map_err(|(f, r)| field(format!("tunnel.{f}"), r))?),
        };
        let dns = match raw.dns {
            None => DnsSettings::default(),
            Some(d) => dns_settings(d).map_err(|(f, r)| field(format!("dns.{f}"), r))?,
        };
        Ok(Config {
            control_plane,
            tunnel,
            dns,
            unmapped_cgroups,
            file: file.to_owned(),
            trust_domain: raw.trust_domain,
            cgroup_root: raw.cgroup_root,
            pin_dir,
            policies: raw.policies.iter().map(|p| base.join(p)).collect(),
            host_addresses,
            admin_socket,
            metrics_address,
            flow_log: raw.flow_log.map(|p| base.join(p)),
            namespaces,
            workloads,
            workloads_from_control_plane,
            own_pod_uid: None,
            services,
        })
    }
}

/// A Service of the configuration, or the field below it that is wrong and why.
fn service(raw: RawService) -> Result<crate::policy::service::Service, (String, String)> {
    use crate::policy::service::{protocol_number, Backend, Service, ServicePort};
    let cluster_ips = raw
        .cluster_ips
        .iter()
        .enumerate()
        .map(|(i, a)| parse_addr(a).map_err(|r| (format!(".clusterIPs[{i}]"), r)))
        .collect::<Result<_, _>>()?;
    let client_ip_affinity = match raw.session_affinity.as_deref() {
        None | Some("None") => false,
        Some("ClientIP") => true,
        Some(other) => {
            return Err((
                ".sessionAffinity".into(),
                format!("{other:?}: expected \"None\" or \"ClientIP\""),
            ))
        }
    };
    let mut ports = Vec::with_capacity(raw.ports.len());
    for (i, p) in raw.ports.into_iter().enumerate() {
        let at = |sub: &str| format!(".ports[{i}]{sub}");
        let port = u16::try_from(p.port).ok().filter(|p| *p != 0).ok_or((
            at(".port"),
            format!("{} is not a port from 1 to 65535", p.port),
        ))?;
        let protocol = protocol_number(p.protocol.as_deref().unwrap_or("TCP")).ok_or((
            at(".protocol"),
            format!(
                "{:?} is not TCP, UDP or SCTP",
                p.protocol.unwrap_or_default()
            ),
        ))?;
        let mut backends = Vec::with_capacity(p.backends.len());
        for (j, text) in p.backends.iter().enumerate() {
            let address = text.parse::<std::net::SocketAddr>().map_err(|_| {
                (
                    at(&format!(".backends[{j}]")),
                    format!("{text:?} is not address:port ([address]:port for IPv6)"),
                )
            })?;
            backends.push(Backend {
                address: address.ip(),
                port: address.port(),
                pod: None,
            });
        }
        backends.sort();
        backends.dedup();
        ports.push(ServicePort {
            name: p.name,
            port,
            protocol,
            backends,
        });
    }
    let service = Service {
        namespace: raw.namespace.unwrap_or_else(|| "default".into()),
        name: raw.name,
        cluster_ips,
        ports,
        client_ip_affinity,
    };
    match service.invalid() {
        Some(reason) => Err((String::new(), reason)),
        None => Ok(service),
    }
}

fn tunnel_settings(raw: RawTunnel) -> Result<TunnelSettings, (&'static str, String)> {
    let address = |f: &'static str, text: &str| {
        text.parse::<std::net::SocketAddr>()
            .map_err(|_| (f, format!("{text:?} is not ip:port")))
    };
    let listen = match &raw.listen {
        Some(text) => address("listen", text)?,
        None => std::net::SocketAddr::from(([0, 0, 0, 0], DEFAULT_TUNNEL_PORT)),
    };
    let advertise = match &raw.advertise {
        Some(text) => address("advertise", text)?,
        None if listen.ip().is_unspecified() => {
            return Err((
                "advertise",
                format!("required when listen is {listen}: the address peers' agents dial"),
            ))
        }
        None => listen,
    };
    if advertise.ip().is_unspecified() || advertise.port() == 0 {
        return Err(("advertise", format!("{advertise} cannot be dialled")));
    }
    let outbound_port = raw.outbound_port.unwrap_or(DEFAULT_OUTBOUND_PORT);
    if outbound_port == 0 {
        return Err(("outboundPort", "must not be 0".into()));
    }
    Ok(TunnelSettings {
        listen,
        advertise,
        outbound_port,
    })
}

/// A named port, checked as Kubernetes checks a container port's name (an IANA service name);
/// an error names the field below the port (`.name`, `.port`, `.protocol`).
fn named_port(raw: RawPort) -> Result<NamedPort, (&'static str, String)> {
    NamedPort::parse(raw.name, raw.port, raw.protocol.as_deref())
}

/// Turns the section's own check into an error naming the file and the field.
fn check_control_plane(
    file: &Path,
    cp: &crate::control::ControlPlaneConfig,
) -> Result<(), ConfigError> {
    cp.validate().map_err(|e| match e {
        crate::control::ControlError::Field { field, reason } => ConfigError::Field {
            file: file.to_owned(),
            field: format!("controlPlane.{field}"),
            reason,
        },
        other => ConfigError::Parse {
            file: file.to_owned(),
            line: None,
            reason: other.to_string(),
        },
    })
}

impl Config {
    /// `ward run --control-plane ADDR`: the address from the command line, everything else from
    /// the file's `controlPlane:` section, which must be there.
    /// Applies `ward run`'s flags: `--control-plane` and `--node-name` over the file's
    /// `controlPlane:` (and checks that the node has a name), `--pod-uid`.
    pub fn apply_run_flags(&mut self, flags: &RunFlags) -> Result<(), ConfigError> {
        self.own_pod_uid = flags.pod_uid.clone().filter(|uid| !uid.is_empty());
        let Some(cp) = self.control_plane.as_mut() else {
            if flags.address.is_some() {
                return Err(ConfigError::Field {
                    file: self.file.clone(),
                    field: "controlPlane".into(),
                    reason: "--control-plane needs a controlPlane: section (caFile, stateDir, joinTokenFile)".into(),
                });
            }
            return Ok(());
        };
        if let Some(address) = &flags.address {
            cp.address = address.clone();
        }
        if let Some(name) = &flags.node_name {
            cp.node_name = name.clone();
        }
        if cp.node_name.is_empty() {
            return Err(ConfigError::Field {
                file: self.file.clone(),
                field: "controlPlane.nodeName".into(),
                reason: "not set: set it here, or give ward run --node-name (WARD_NODE_NAME, e.g. \
                         spec.nodeName from Kubernetes' downward API)"
                    .into(),
            });
        }
        check_control_plane(&self.file, cp)
    }
}

fn parse_addr(text: &str) -> Result<IpAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an IP address"))
}

fn is_dns_label_list(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/ward/ward.yaml"), text)
    }

    #[test]
    fn full_config_parses_with_defaults_and_relative_paths() {
        let c = parse(
            "trustDomain: example.org\npolicies: [policies/]\nworkloads:\n  - name: web\n    labels: {app: web}\n    cgroups: [demo/web]\n    addresses: [10.0.0.1, 'fd00::1']\n",
        )
        .expect("valid config");
        assert_eq!(c.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(c.policies, vec![PathBuf::from("/etc/ward/policies/")]);
        assert_eq!(c.host_addresses, HostAddresses::Auto);
        assert_eq!(
            c.workloads[0].spiffe_id,
            "spiffe://example.org/workload/web"
        );
        assert_eq!(c.workloads[0].addresses.len(), 2);
        assert!(c.workloads[0].ports.is_empty());
    }

    #[test]
    fn unmapped_cgroups_default_to_allow_and_map_to_the_kernel_values() {
        let c = parse("trustDomain: example.org\n").expect("valid config");
        assert_eq!(c.unmapped_cgroups, UnmappedCgroups::Allow);
        let c = parse("trustDomain: example.org\nunmappedCgroups: deny\n").expect("valid config");
        assert_eq!(c.unmapped_cgroups, UnmappedCgroups::Deny);
        let c = parse("trustDomain: example.org\nunmappedCgroups: allow\n").expect("valid config");
        assert_eq!(c.unmapped_cgroups, UnmappedCgroups::Allow);
        assert_eq!(
            (
                UnmappedCgroups::Allow.kernel_value(),
                UnmappedCgroups::Deny.kernel_value()
            ),
            (agent_common::UNMAPPED_ALLOW, agent_common::UNMAPPED_DENY)
        );
        let e = parse("trustDomain: example.org\nunmappedCgroups: block\n")
            .expect_err("not a value")
            .to_string();
        assert!(
            e.contains("`unmappedCgroups`") && e.contains("\"allow\" or \"deny\""),
            "names the field and the allowed values: {e}"
        );
    }

    #[test]
    fn services_parse_and_every_bad_field_is_named() {
        let c = parse(
            "trustDomain: example.org\nservices:\n  - name: db\n    clusterIPs: [10.96.0.20, 'fd00:96::20']\n    sessionAffinity: ClientIP\n    ports: [{name: sql, port: 5432, backends: ['10.0.0.6:15432', '10.0.0.5:15432', '[fd00::5]:15432']}]\n",
        )
        .expect("valid config");
        let db = &c.services[0];
        assert_eq!(db.key(), "default/db");
        assert!(db.client_ip_affinity);
        let backends: Vec<String> = db.ports[0]
            .backends
            .iter()
            .map(|b| std::net::SocketAddr::new(b.address, b.port).to_string())
            .collect();
        assert_eq!(
            backends,
            ["10.0.0.5:15432", "10.0.0.6:15432", "[fd00::5]:15432"],
            "sorted"
        );
        for (text, field, reason) in [
            (
                "clusterIPs: [10.96.0.999]",
                "services[0].clusterIPs[0]",
                "not an IP",
            ),
            (
                "clusterIPs: [10.96.0.1], ports: [{port: 0}]",
                "services[0].ports[0].port",
                "not a port",
            ),
            (
                "clusterIPs: [10.96.0.1], ports: [{port: 53, protocol: ICMP}]",
                "services[0].ports[0].protocol",
                "not TCP",
            ),
            (
                "clusterIPs: [10.96.0.1], ports: [{port: 53, backends: [10.0.0.1]}]",
                "services[0].ports[0].backends[0]",
                "address:port",
            ),
            (
                "clusterIPs: [10.96.0.1, 10.96.0.2]",
                "services[0]",
                "one address per family",
            ),
            (
                "clusterIPs: [10.96.0.1], sessionAffinity: sticky",
                "services[0].sessionAffinity",
                "ClientIP",
            ),
        ] {
            let text = format!("trustDomain: example.org\nservices:\n  - {{name: db, {text}}}\n");
            match parse(&text) {
                Err(ConfigError::Field {
                    field: f,
                    reason: r,
                    ..
                }) => {
                    assert_eq!(f, field, "{text}");
                    assert!(r.contains(reason), "{text}: {r}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        let cp =
            "controlPlane: {address: '10.0.0.1:7443', nodeName: n, caFile: ca.pem, stateDir: /s}\n";
        let both = format!(
            "trustDomain: example.org\n{cp}services: [{{name: db, clusterIPs: [10.96.0.1]}}]\n"
        );
        assert!(
            matches!(parse(&both), Err(ConfigError::Field { field, .. }) if field == "services")
        );
    }

    #[test]
    fn named_ports_parse_with_tcp_by_default() {
        let c = parse(
            "trustDomain: example.org\nworkloads:\n  - name: web\n    ports: [{name: http, port: 8080}, {name: dns, port: 53, protocol: UDP}]\n",
        )
        .expect("valid config");
        let ports: Vec<_> = c.workloads[0]
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.protocol, p.port))
            .collect();
        assert_eq!(
            ports,
            [
                ("http", agent_common::PROTO_TCP, 8080),
                ("dns", agent_common::PROTO_UDP, 53)
            ]
        );
    }

    #[test]
    fn workloads_may_come_from_a_control_plane_only() {
        let cp =
            "controlPlane: {address: '10.0.0.1:7443', nodeName: n, caFile: ca.pem, stateDir: /s}\n";
        let c = parse(&format!(
            "trustDomain: example.org\nworkloads: fromControlPlane\n{cp}"
        ))
        .expect("valid config");
        assert!(c.workloads_from_control_plane && c.workloads.is_empty());
        let e = parse("trustDomain: example.org\nworkloads: fromControlPlane\n")
            .expect_err("no control plane");
        assert!(
            e.to_string().contains("workloads") && e.to_string().contains("controlPlane"),
            "{e}"
        );
        let e = parse(&format!(
            "trustDomain: example.org\nworkloads: fromKubelet\n{cp}"
        ))
        .expect_err("unknown keyword");
        assert!(e.to_string().contains("fromKubelet"), "{e}");
    }

    #[test]
    fn control_plane_section_resolves_files_and_takes_the_address_flag() {
        let mut c = parse(
            "trustDomain: example.org\ncontrolPlane:\n  address: 10.0.0.1:7443\n  nodeName: node-a\n  caFile: ca.pem\n  joinTokenFile: token\n  stateDir: /var/lib/ward/control\n",
        )
        .expect("valid config");
        let cp = c.control_plane.as_ref().expect("section");
        assert_eq!(cp.ca_file, PathBuf::from("/etc/ward/ca.pem"));
        assert_eq!(cp.join_token_file, Some(PathBuf::from("/etc/ward/token")));
        let address = |a: &str| RunFlags {
            address: Some(a.into()),
            ..RunFlags::default()
        };
        c.apply_run_flags(&address("10.9.9.9:7443"))
            .expect("valid address");
        assert_eq!(
            c.control_plane.as_ref().expect("section").address,
            "10.9.9.9:7443"
        );
        let e = c.apply_run_flags(&address("nope")).unwrap_err();
        assert!(e.to_string().contains("controlPlane.address"), "{e}");
        let mut local = parse("trustDomain: example.org\n").expect("valid config");
        local
            .apply_run_flags(&RunFlags::default())
            .expect("no flags, local mode");
        let e = local.apply_run_flags(&address("a:1")).unwrap_err();
        assert!(e.to_string().contains("`controlPlane`"), "{e}");
    }

    #[test]
    fn the_node_name_may_come_from_the_command_line_only() {
        let text = "trustDomain: example.org\ncontrolPlane: {address: 'a:1', caFile: ca.pem, stateDir: /s}\n";
        let mut c = parse(text).expect("no nodeName yet is not an error");
        let e = c.apply_run_flags(&RunFlags::default()).unwrap_err();
        assert!(
            e.to_string().contains("controlPlane.nodeName")
                && e.to_string().contains("--node-name"),
            "{e}"
        );
        let named = |n: &str| RunFlags {
            node_name: Some(n.into()),
            ..RunFlags::default()
        };
        let e = c.apply_run_flags(&named("Node_A")).unwrap_err();
        assert!(e.to_string().contains("nodeName"), "{e}");
        c.apply_run_flags(&named("node-a")).expect("named");
        assert_eq!(c.control_plane.expect("section").node_name, "node-a");
    }

    #[test]
    fn dns_section_defaults_and_bounds() {
        let c = parse("trustDomain: example.org\n").expect("valid");
        assert_eq!(c.dns, DnsSettings::default());
        let c = parse("trustDomain: example.org\ndns: {proxyPort: 5353, minTtlSeconds: 2, maxTtlSeconds: 10, maxLearned: 100, onlyPolicyNames: true}\n").expect("valid");
        assert_eq!(c.dns.proxy_port, 5353);
        assert_eq!(c.dns.min_ttl, std::time::Duration::from_secs(2));
        assert_eq!(c.dns.max_ttl, std::time::Duration::from_secs(10));
        assert_eq!(c.dns.max_learned, 100);
        assert!(c.dns.only_policy_names);
        let unknown = parse("trustDomain: example.org\ndns: {upstream: 1.1.1.1}\n")
            .expect_err("unknown field");
        assert!(
            unknown
                .to_string()
                .contains("dns: unknown field `upstream`"),
            "{unknown}"
        );
    }

    #[test]
    fn tunnel_section_defaults_to_its_ports_and_dials_the_listen_address() {
        let c = parse(
            "trustDomain: example.org\ncontrolPlane: {address: 'a:1', nodeName: a, caFile: ca.pem, stateDir: /s}\ntunnel: {listen: '10.0.0.1:15008'}\n",
        )
        .expect("valid config");
        let t = c.tunnel.expect("section");
        assert_eq!(t.advertise, t.listen);
        assert_eq!(t.outbound_port, DEFAULT_OUTBOUND_PORT);
        let c = parse(
            "trustDomain: example.org\ncontrolPlane: {address: 'a:1', nodeName: a, caFile: ca.pem, stateDir: /s}\ntunnel: {advertise: '10.0.0.1:4430'}\n",
        )
        .expect("valid config");
        let t = c.tunnel.expect("section");
        assert_eq!(t.listen.port(), DEFAULT_TUNNEL_PORT);
        assert_eq!(t.advertise.to_string(), "10.0.0.1:4430");
    }

    #[test]
    fn unknown_field_is_an_error_naming_it() {
        let e = parse("trustDomain: example.org\nworkloads:\n  - name: web\n    cgroup: [x]\n")
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("/etc/ward/ward.yaml") && msg.contains("cgroup"),
            "{msg}"
        );
    }

    #[test]
    fn parse_errors_name_their_line_and_field() {
        let cases = [
            ("trustDomain: example.org\nworkloads:\n  - name: [web]\n", "/etc/ward/ward.yaml:3: workloads[0].name: invalid type: sequence, expected a string"),
            ("trustDomain: example.org\n\npinDirr: /x\n", "/etc/ward/ward.yaml:3: unknown field `pinDirr`"),
            ("trustDomain: example.org\npolicies: [a\n", "/etc/ward/ward.yaml:2"),
        ];
        for (text, start) in cases {
            let msg = parse(text).expect_err(text).to_string();
            assert!(msg.starts_with(start), "{text:?}: {msg}");
        }
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            ("trustDomain: Example.org\n", "trustDomain"),
            ("trustDomain: example.org\npinDir: relative\n", "pinDir"),
            ("trustDomain: example.org\nhostAddresses: [nope]\n", "hostAddresses[0]"),
            ("trustDomain: example.org\nmetricsAddress: localhost\n", "metricsAddress"),
            ("trustDomain: example.org\nadminSocket: admin.sock\n", "adminSocket"),
            ("trustDomain: example.org\nunmappedCgroups: refuse\n", "unmappedCgroups"),
            ("trustDomain: example.org\nunmappedCgroups: Deny\n", "unmappedCgroups"),
            ("trustDomain: example.org\nworkloads: [{name: a, addresses: [300.1.1.1]}]\n", "workloads[0].addresses[0]"),
            ("trustDomain: example.org\nworkloads: [{name: a}, {name: a}]\n", "workloads[1].name"),
            ("trustDomain: example.org\nworkloads: [{name: a, spiffeId: 'spiffe://other.org/x'}]\n", "workloads[0].spiffeId"),
            ("trustDomain: example.org\nworkloads: [{name: a, cgroups: [../x]}]\n", "workloads[0].cgroups[0]"),
            ("trustDomain: example.org\nworkloads: [{name: a, systemdUnits: [nginx]}]\n", "workloads[0].systemdUnits[0]"),
            ("trustDomain: example.org\nnamespaces: {x: {labels: {kubernetes.io/metadata.name: y}}}\n", "namespaces.x.labels.kubernetes.io/metadata.name"),
            ("trustDomain: example.org\nworkloads: [{name: a, ports: [{name: HTTP, port: 80}]}]\n", "workloads[0].ports[0].name"),
            ("trustDomain: example.org\nworkloads: [{name: a, ports: [{name: '8080', port: 80}]}]\n", "workloads[0].ports[0].name"),
            ("trustDomain: example.org\nworkloads: [{name: a, ports: [{name: http, port: 0}]}]\n", "workloads[0].ports[0].port"),
            ("trustDomain: example.org\nworkloads: [{name: a, ports: [{name: http, port: 80, protocol: tcp}]}]\n", "workloads[0].ports[0].protocol"),
            ("trustDomain: example.org\nworkloads: [{name: a, ports: [{name: http, port: 80}, {name: http, port: 81}]}]\n", "workloads[0].ports[1].name"),
            ("trustDomain: example.org\ncontrolPlane: {address: nope, nodeName: a, caFile: ca.pem, stateDir: /s}\n", "controlPlane.address"),
            ("trustDomain: example.org\ncontrolPlane: {address: 'a:1', nodeName: a, caFile: ca.pem, stateDir: s}\n", "controlPlane.stateDir"),
            ("trustDomain: example.org\npolicies: [p/]\ncontrolPlane: {address: 'a:1', nodeName: a, caFile: ca.pem, stateDir: /s}\n", "policies"),
            ("trustDomain: example.org\ntunnel: {listen: '10.0.0.1:15008'}\n", "tunnel"),
            ("trustDomain: example.org\ncontrolPlane: {address: 'a:1', nodeName: a, caFile: ca.pem, stateDir: /s}\ntunnel: {}\n", "tunnel.advertise"),
            ("trustDomain: example.org\ncontrolPlane: {address: 'a:1', nodeName: a, caFile: ca.pem, stateDir: /s}\ntunnel: {listen: 'node-a:15008'}\n", "tunnel.listen"),
            ("trustDomain: example.org\ncontrolPlane: {address: 'a:1', nodeName: a, caFile: ca.pem, stateDir: /s}\ntunnel: {listen: '10.0.0.1:15008', outboundPort: 0}\n", "tunnel.outboundPort"),
            ("trustDomain: example.org\ndns: {proxyPort: 53}\n", "dns.proxyPort"),
            ("trustDomain: example.org\ndns: {minTtlSeconds: 0}\n", "dns.minTtlSeconds"),
            ("trustDomain: example.org\ndns: {minTtlSeconds: 60, maxTtlSeconds: 30}\n", "dns.maxTtlSeconds"),
            ("trustDomain: example.org\ndns: {maxLearned: 0}\n", "dns.maxLearned"),
            ("trustDomain: example.org\ndns: {maxLearned: 1000000}\n", "dns.maxLearned"),
        ];
        for (text, field) in cases {
            let msg = parse(text).expect_err(text).to_string();
            assert!(msg.contains(&format!("`{field}`")), "{text:?} gave {msg}");
        }
    }
}
