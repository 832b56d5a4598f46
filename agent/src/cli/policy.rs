//! `ward policy check | trace | diff`: the policy toolchain for people and CI.

use std::path::PathBuf;
use std::process::ExitCode;

use agent_common::{
    IDENTITY_ANY, IDENTITY_WORLD, PORT_ANY, PROTO_ANY, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP, REMOTE_ISOLATION, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
    VERDICT_REDIRECT,
};
use anyhow::{bail, Context as _};
use clap::{Subcommand, ValueEnum};
use serde_json::json;

use ward_policy::check::{compile_error, find_rule, lint, CheckReport, LintOptions};
use ward_policy::compile::{Contribution, Slot};
use ward_policy::load::Report;
use ward_policy::trace::{
    combine, diff, diff_human, diff_json, trace, trace_learned, Endpoint, Leg,
};
use ward_policy::{
    direction_name, load, protocol_name, verdict_name, Compiled, FqdnSelector, Location, PolicySet,
    PolicyWarning, PortArg, WarningKind, WorkloadInfo,
};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate policy documents and warn about risky policy; for CI.
    ///
    /// Exit status: 0 clean, 1 errors, 2 warnings with --strict.
    Check {
        /// Policy files or directories; default: the `policies` of --config.
        paths: Vec<PathBuf>,
        /// Agent configuration; its workloads enable the checks that need them (a policy that
        /// selects nothing, a rule shadowed by a deny).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = CheckFormat::Human)]
        format: CheckFormat,
        /// Exit with status 2 when there are warnings.
        #[arg(long)]
        strict: bool,
        /// Warn about audit-mode policies only in files under this path (repeatable); by default
        /// every audit-mode policy is warned about.
        #[arg(long = "production-path", value_name = "PATH")]
        production_paths: Vec<PathBuf>,
    },
    /// Whether one endpoint may reach another on a port, and every rule that takes part.
    ///
    /// Uses the same compiled map the agent writes to the kernel, and the kernel's decision.
    Trace {
        /// Source: a workload name, a workload's SPIFFE ID, or an IP address.
        #[arg(long)]
        from: String,
        /// Destination: a workload name, a workload's SPIFFE ID, an IP address, or a Service
        /// (`<namespace>/<name>`).
        #[arg(long, required_unless_present = "to_name")]
        to: Option<String>,
        /// The source learned the destination's address from this DNS name (through the agent's
        /// DNS proxy): decide it as the kernel decides learned addresses. Without --to: any
        /// address of the name that no rule names otherwise.
        #[arg(long, value_name = "NAME")]
        to_name: Option<String>,
        /// `<port>/<tcp|udp|sctp>`, e.g. 8080/tcp (the protocol defaults to tcp), or
        /// `<type>/<icmp|icmpv6>` for an ICMP message type, e.g. 8/icmp (echo request).
        #[arg(long)]
        port: PortArg,
        /// Agent configuration: the workloads, and the policies when no paths are given.
        #[arg(long)]
        config: PathBuf,
        /// Policy files or directories; default: the `policies` of --config.
        paths: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
        /// Exit with status 1 unless this is the verdict (`allow` includes mTLS redirects).
        #[arg(long, value_enum)]
        expect: Option<Expect>,
    },
    /// Which connections between workloads (and the address ranges policies name) gain or lose
    /// access from one policy version to another.
    Diff {
        /// Policy file or directory before the change.
        old: PathBuf,
        /// Policy file or directory after the change.
        new: PathBuf,
        /// Agent configuration: the workloads.
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CheckFormat {
    Human,
    Json,
    Sarif,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Human,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Expect {
    Allow,
    Deny,
    Audit,
    Redirect,
}

/// Whether the replies of an admitted flow of this kind pass both sides whatever their policy:
/// TCP, UDP and SCTP, and ICMP echo requests.
fn has_replies(port: PortArg) -> bool {
    match port.icmp_type() {
        Some(icmp_type) => {
            let echo_request = if port.protocol == PROTO_ICMP { 8 } else { 128 };
            icmp_type == echo_request
        }
        None => matches!(port.protocol, PROTO_TCP | PROTO_UDP | PROTO_SCTP),
    }
}

/// The line trace prints about replies.
const REPLIES_PASS: &str = "replies: pass (never refused by either side's policy)";

pub fn run(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Check {
            paths,
            config,
            format,
            strict,
            production_paths,
        } => {
            let workloads = config.as_deref().map(workloads).transpose()?;
            let paths = policy_paths(paths, config.as_deref())?;
            let report = check(
                &paths,
                workloads.as_ref().map(|(_, w)| w.as_slice()),
                &production_paths,
            );
            match format {
                CheckFormat::Human => print!("{}", report.human()),
                CheckFormat::Json => println!("{:#}", report.json()),
                CheckFormat::Sarif => println!("{:#}", report.sarif()),
            }
            let code = match (report.errors.is_empty(), report.warnings.is_empty()) {
                (false, _) => 1,
                (true, false) if strict => 2,
                _ => 0,
            };
            Ok(ExitCode::from(code))
        }
        PolicyCommand::Trace {
            from,
            to,
            to_name,
            port,
            config,
            paths,
            format,
            expect,
        } => {
            let context = TraceContext::load(&config, &paths)?;
            let workloads = &context.workloads;
            let resolve =
                |text: &str| Endpoint::resolve(text, workloads).map_err(anyhow::Error::msg);
            let from = resolve(&from)?;
            let to_name = to_name
                .map(|name| FqdnSelector::parse_name(&name).map(|s| s.text().to_owned()))
                .transpose()
                .map_err(|e| anyhow::anyhow!("--to-name: {e}"))?;
            if to_name.is_some() && !from.is_workload() {
                bail!("--to-name: {from} is no workload of the configuration; only a workload's connections are decided by the names it looked up");
            }
            let targets = match (&to, &to_name) {
                (None, _) => vec![(None, Endpoint::World, port)],
                (Some(to), Some(_)) => vec![(None, resolve(to)?, port)],
                // A Service (`<namespace>/<name>`): each of its backends on the port, as the
                // kernel translates a connection to its cluster IP.
                (Some(to), None) => match resolve(to) {
                    Ok(to) => vec![(None, to, port)],
                    Err(e) => context.backends(to, port, workloads).ok_or(e)??,
                },
            };
            let mut verdicts = Vec::new();
            let mut json_out = Vec::new();
            for (via, to, port) in targets {
                if !from.is_workload() && !to.is_workload() {
                    bail!("neither {from} nor {to} is a workload of the configuration: no policy of this node applies");
                }
                let (set, protocol) = (&context.set, port.protocol);
                let traced = match &to_name {
                    Some(name) => {
                        trace_learned(set, workloads, from, to, name, protocol, port.port)?
                    }
                    None => trace(set, workloads, from, to, protocol, port.port)?,
                };
                let view = TraceView {
                    set: &context.set,
                    workloads,
                    compiled: &traced.compiled,
                };
                verdicts.push(combine(&traced.legs).0);
                match format {
                    Format::Human => {
                        if let Some(via) = &via {
                            println!("{via}:");
                        }
                        print!("{}", view.human(from, to, port, &traced.legs));
                    }
                    Format::Json => {
                        let mut one = view.json(from, to, port, &traced.legs);
                        if let Some(via) = via {
                            one["service"] = json!(via);
                        }
                        json_out.push(one);
                    }
                }
            }
            if format == Format::Json {
                let service = to.as_deref().is_some_and(|to| to.contains('/'));
                match json_out.as_slice() {
                    [one] if verdicts.len() == 1 && !service => println!("{one:#}"),
                    _ => println!("{:#}", serde_json::Value::Array(json_out)),
                }
            }
            // With a Service, every backend must give the expected verdict.
            let expected = expect.is_none_or(|e| {
                verdicts.iter().all(|&verdict| match e {
                    Expect::Allow => verdict == VERDICT_ALLOW || verdict == VERDICT_REDIRECT,
                    Expect::Deny => verdict == VERDICT_DENY,
                    Expect::Audit => verdict == VERDICT_AUDIT,
                    Expect::Redirect => verdict == VERDICT_REDIRECT,
                })
            });
            Ok(if expected {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        PolicyCommand::Diff {
            old,
            new,
            config,
            format,
        } => {
            let (_, workloads) = workloads(&config)?;
            let (old, new) = (load_set(&[old])?, load_set(&[new])?);
            let changes = diff(&old, &new, &workloads)?;
            match format {
                Format::Human => print!("{}", diff_human(&changes)),
                Format::Json => println!("{:#}", diff_json(&changes)),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What `ward policy trace` judges by: the policies, every workload it knows, and the Services.
struct TraceContext {
    set: PolicySet,
    workloads: Vec<WorkloadInfo>,
    services: Vec<crate::policy::service::Service>,
}

impl TraceContext {
    /// From the configuration (its workloads and Services) and `paths` (default: the
    /// configuration's policies). An agent with a control plane adds what it last applied from
    /// it: the cluster's pods (this node's and, as workloads with their own policy, every other
    /// node's), the Services, and the control plane's policies unless `paths` are given.
    fn load(config_path: &std::path::Path, paths: &[PathBuf]) -> anyhow::Result<Self> {
        let config = crate::config::Config::load(config_path)?;
        let remote = config
            .control_plane
            .as_ref()
            .and_then(crate::control::load_last_applied);
        let Some(state) = remote else {
            let set = load_set(if paths.is_empty() {
                &config.policies
            } else {
                paths
            })?;
            let workloads = crate::identity::workload_infos(&config);
            return Ok(TraceContext {
                set,
                workloads,
                services: config.services,
            });
        };
        let set = if paths.is_empty() {
            crate::policy::parse_documents_cached(
                &mut Default::default(),
                state.policies.iter().map(|(n, y)| (n.as_str(), y.as_str())),
            )?
        } else {
            load_set(paths)?
        };
        let desired = crate::desired::Desired::build(
            config,
            Some(&state),
            &mut crate::policy::RuleIds::new(),
            &mut Default::default(),
        )?;
        let mut workloads = desired.workloads;
        workloads.extend(desired.peers);
        // A backend on another node whose identity this node's pods share has no entry of its
        // own above (its identity is a local workload's): it gets one, named by its pod, with the
        // identity the IP cache gives it, as the kernel sees it.
        let mut named = Vec::new();
        for backend in state
            .services
            .iter()
            .flat_map(|s| &s.ports)
            .flat_map(|p| &p.backends)
        {
            let owned = workloads.iter().chain(&named).any(|w: &WorkloadInfo| {
                w.addresses
                    .iter()
                    .any(|a| a.to_canonical() == backend.address.to_canonical())
            });
            let identity = state.ipcache.iter().find(|(a, _)| *a == backend.address);
            let template =
                identity.and_then(|(_, id)| workloads.iter().find(|w| w.identity == *id));
            if let (false, Some(template)) = (owned, template) {
                named.push(WorkloadInfo {
                    name: backend
                        .pod
                        .clone()
                        .unwrap_or_else(|| backend.address.to_string()),
                    addresses: vec![backend.address],
                    ..template.clone()
                });
            }
        }
        workloads.extend(named);
        Ok(TraceContext {
            set,
            workloads,
            services: state.services,
        })
    }

    /// The backends of Service `name` (`<namespace>/<name>`) on `port`, each named by the
    /// Service, cluster IP and backend; `None` when no Service has that name.
    #[allow(clippy::type_complexity)]
    fn backends<'w>(
        &self,
        name: &str,
        port: PortArg,
        workloads: &'w [WorkloadInfo],
    ) -> Option<anyhow::Result<Vec<(Option<String>, Endpoint<'w>, PortArg)>>> {
        let service = self.services.iter().find(|s| s.key() == name)?;
        let mut targets = Vec::new();
        for (ip, p, backends) in service.frontends() {
            if p.port != port.port || p.protocol != port.protocol {
                continue;
            }
            let frontend = std::net::SocketAddr::new(ip, p.port);
            if backends.is_empty() {
                println!(
                    "Service {name} {frontend}/{}: no ready backend: refused",
                    protocol_name(p.protocol)
                );
            }
            for b in backends {
                let to = Endpoint::resolve(&b.address.to_string(), workloads)
                    .expect("an address always resolves");
                let backend = std::net::SocketAddr::new(b.address, b.port);
                let pod = b
                    .pod
                    .as_deref()
                    .map(|p| format!(" (pod {p})"))
                    .unwrap_or_default();
                let via = format!("Service {name} {frontend} -> backend {backend}{pod}");
                let port = PortArg {
                    protocol: p.protocol,
                    port: b.port,
                };
                targets.push((Some(via), to, port));
            }
        }
        if targets.is_empty()
            && !service
                .ports
                .iter()
                .any(|p| p.port == port.port && p.protocol == port.protocol)
        {
            return Some(Err(anyhow::anyhow!(
                "Service {name} has no port {port}; its ports: {}",
                service
                    .ports
                    .iter()
                    .map(|p| PortArg {
                        protocol: p.protocol,
                        port: p.port
                    }
                    .to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Some(Ok(targets))
    }
}

/// The configuration's policy paths and workloads.
fn workloads(config: &std::path::Path) -> anyhow::Result<(Vec<PathBuf>, Vec<WorkloadInfo>)> {
    let config = crate::config::Config::load(config)?;
    let workloads = crate::identity::workload_infos(&config);
    Ok((config.policies, workloads))
}

fn policy_paths(
    paths: Vec<PathBuf>,
    config: Option<&std::path::Path>,
) -> anyhow::Result<Vec<PathBuf>> {
    match (paths.is_empty(), config) {
        (false, _) => Ok(paths),
        (true, Some(config)) => Ok(crate::config::Config::load(config)?.policies),
        (true, None) => bail!("give policy files or directories, or --config"),
    }
}

fn load_set(paths: &[PathBuf]) -> anyhow::Result<PolicySet> {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    load(paths).with_context(|| format!("policy {} is invalid", names.join(", ")))
}

/// Loads and lints; compile failures (such as an overflowing map) become errors of the report.
pub(crate) fn check(
    paths: &[PathBuf],
    workloads: Option<&[WorkloadInfo]>,
    production_paths: &[PathBuf],
) -> CheckReport {
    let Report {
        set, mut errors, ..
    } = Report::load(paths);
    let mut warnings = set.warnings.clone();
    if set.is_empty() && errors.is_empty() {
        // A mistyped path must not let CI pass on nothing.
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        let location = Location {
            file: paths.first().cloned().unwrap_or_default(),
            ..Location::default()
        };
        let message = format!("no policy documents in {}", names.join(", "));
        warnings.push(PolicyWarning {
            location,
            field: String::new(),
            kind: WarningKind::NoEffect,
            message,
        });
    }
    match lint(
        &set,
        &LintOptions {
            workloads,
            production_paths,
        },
    ) {
        Ok(found) => warnings.extend(found),
        Err(e) => errors.push(compile_error(&set, &e)),
    }
    CheckReport {
        policies: set.names().map(str::to_owned).collect(),
        errors,
        warnings,
    }
}

/// Renders traces, naming identities and rules as the policies do.
struct TraceView<'a> {
    set: &'a PolicySet,
    workloads: &'a [WorkloadInfo],
    compiled: &'a Compiled,
}

impl TraceView<'_> {
    fn identity(&self, id: u32) -> String {
        match id {
            IDENTITY_ANY => "any".into(),
            IDENTITY_WORLD => "world".into(),
            _ => self
                .workloads
                .iter()
                .find(|w| w.identity == id)
                .map(|w| w.name.clone())
                .or_else(|| {
                    let prefix = self.compiled.prefixes.iter().find(|(_, i)| **i == id);
                    prefix.map(|(net, _)| net.to_string())
                })
                .or_else(|| self.compiled.fqdn_selector(id).map(ToString::to_string))
                .unwrap_or_else(|| format!("identity {id}")),
        }
    }

    fn rule(&self, id: u32) -> String {
        self.compiled.rules.get(&id).map_or_else(
            || format!("rule {id}"),
            |r| format!("{}/{}", r.policy, r.rule),
        )
    }

    fn source(&self, id: u32) -> String {
        let Some(info) = self.compiled.rules.get(&id) else {
            return String::new();
        };
        let line = find_rule(self.set, info).and_then(|(p, r)| r.line.or(Some(p.origin.line)));
        let line = line.or_else(|| {
            self.set
                .policies
                .iter()
                .find(|p| p.name == info.policy)
                .map(|p| p.origin.line)
        });
        format!(
            "{}{}",
            info.source.display(),
            line.map(|l| format!(":{l}")).unwrap_or_default()
        )
    }

    fn slot(contribution: &Contribution) -> &'static str {
        match (
            contribution.key.remote_identity == REMOTE_ISOLATION,
            contribution.slot,
        ) {
            (true, Slot::Deny) => "isolates (enforce)",
            (true, _) => "isolates (audit)",
            (false, Slot::Deny) => "deny",
            (false, Slot::Allow) => "allow",
            (false, Slot::AuditDeny) => "audit deny",
            (false, Slot::AuditAllow) => "audit allow",
        }
    }

    fn key(&self, contribution: &Contribution) -> String {
        let key = contribution.key;
        if key.remote_identity == REMOTE_ISOLATION {
            return String::new();
        }
        let port = match (key.protocol, key.port) {
            (PROTO_ANY, _) => "any port".to_owned(),
            (protocol @ (PROTO_ICMP | PROTO_ICMPV6), PORT_ANY) => {
                format!("{} any type", protocol_name(protocol))
            }
            (protocol, PORT_ANY) => format!("{}/any", protocol_name(protocol)),
            (protocol, port) => PortArg { protocol, port }.to_string(),
        };
        format!("peer {}, {port}", self.identity(key.remote_identity))
    }

    fn human(&self, from: Endpoint<'_>, to: Endpoint<'_>, port: PortArg, legs: &[Leg]) -> String {
        let (verdict, deciding) = combine(legs);
        let mut out = format!(
            "{from} -> {} {port}: {}\n",
            Self::destination(to, legs),
            verdict_name(verdict).to_uppercase()
        );
        out += &match deciding {
            Some(leg) => format!(
                "  decided by {}{} ({} of {}) at {}\n",
                self.rule(leg.decision.rule),
                self.decided_as(leg)
                    .map(|s| format!(" as {s}"))
                    .unwrap_or_default(),
                direction_name(leg.direction),
                leg.local,
                self.source(leg.decision.rule)
            ),
            None => "  no policy isolates either side: untouched\n".to_owned(),
        };
        if verdict != VERDICT_DENY && has_replies(port) {
            out += &format!("  {REPLIES_PASS}\n");
        }
        for leg in legs {
            let (direction, peer) = (
                direction_name(leg.direction),
                if leg.direction == 0 { "from" } else { "to" },
            );
            let (local, local_id) = (&leg.local, leg.local_identity);
            let (remote, remote_id) = (self.identity(leg.remote_identity), leg.remote_identity);
            out += &format!("  {direction} of {local} (identity {local_id}) {peer} {remote} (identity {remote_id}): ");
            if !leg.decision.isolated {
                out += &format!("not isolated for {direction}: allowed\n");
                continue;
            }
            out += &format!(
                "{} by {}\n",
                verdict_name(leg.decision.verdict),
                self.rule(leg.decision.rule)
            );
            if let Some(learned) = self.learned(leg) {
                out += &format!("    {learned}\n");
            }
            for c in &leg.matches {
                let (rule, slot, key, source) = (
                    self.rule(c.rule),
                    Self::slot(c),
                    self.key(c),
                    self.source(c.rule),
                );
                out += &format!("    {rule:<32} {slot:<19} {key:<32} {source}\n");
            }
        }
        out
    }

    /// The destination as a trace names it: with the DNS name its address was learned from.
    fn destination(to: Endpoint<'_>, legs: &[Leg]) -> String {
        match (legs.iter().find_map(|l| l.learned_from.as_deref()), to) {
            (Some(name), Endpoint::World) => format!("any address learned from {name}"),
            (Some(name), to) => format!("{to} (learned from {name})"),
            (None, to) => to.to_string(),
        }
    }

    /// The DNS-name selector a leg's learned address was decided as, if one decided.
    fn decided_as(&self, leg: &Leg) -> Option<String> {
        leg.decision.selector.map(|s| self.identity(s))
    }

    /// How a leg's learned address was decided: as which selector of its name, or why not.
    fn learned(&self, leg: &Leg) -> Option<String> {
        let name = leg.learned_from.as_deref()?;
        if !self.compiled.uses_fqdn(leg.local_identity) {
            let local = &leg.local;
            return Some(format!(
                "learned from {name}: the egress rules of {local} name no DNS names"
            ));
        }
        if leg.selectors.is_empty() {
            return Some(format!(
                "learned from {name}, which no rule of {} names",
                leg.local
            ));
        }
        let selectors: Vec<String> = leg.selectors.iter().map(|s| self.identity(*s)).collect();
        let how = match (leg.by_name, self.decided_as(leg)) {
            (true, Some(selector)) => format!("decided as {selector}"),
            (true, None) => "no rule decides it at this port".to_owned(),
            (false, _) => "a rule decides the address itself, before its name".to_owned(),
        };
        Some(format!(
            "learned from {name}, as {}: {how}",
            selectors.join(", ")
        ))
    }

    fn json(
        &self,
        from: Endpoint<'_>,
        to: Endpoint<'_>,
        port: PortArg,
        legs: &[Leg],
    ) -> serde_json::Value {
        let (verdict, deciding) = combine(legs);
        let (to_text, learned_from) = (
            Self::destination(to, legs),
            legs.iter().find_map(|l| l.learned_from.clone()),
        );
        let rule = |id: u32| {
            let info = self.compiled.rules.get(&id);
            json!({ "id": id, "policy": info.map(|i| &i.policy), "rule": info.map(|i| &i.rule), "source": self.source(id) })
        };
        let legs: Vec<_> = legs
            .iter()
            .map(|leg| {
                let matches: Vec<_> = leg
                    .matches
                    .iter()
                    .map(|c| json!({ "rule": rule(c.rule), "effect": Self::slot(c), "key": self.key(c) }))
                    .collect();
                json!({
                    "direction": direction_name(leg.direction),
                    "workload": leg.local,
                    "localIdentity": leg.local_identity,
                    "remoteIdentity": leg.remote_identity,
                    "remote": self.identity(leg.remote_identity),
                    "learnedFrom": leg.learned_from,
                    "selectors": leg.selectors.iter().map(|s| json!({ "identity": s, "selector": self.identity(*s) })).collect::<Vec<_>>(),
                    "byName": leg.by_name,
                    "isolated": leg.decision.isolated,
                    "verdict": verdict_name(leg.decision.verdict),
                    "rule": leg.decision.isolated.then(|| rule(leg.decision.rule)),
                    "decidedAs": self.decided_as(leg),
                    "matches": matches,
                })
            })
            .collect();
        json!({
            "from": from.to_string(),
            "to": to_text,
            "toName": learned_from,
            "protocol": protocol_name(port.protocol),
            "port": if port.icmp_type().is_some() { None } else { Some(port.port) },
            "icmpType": port.icmp_type(),
            "verdict": verdict_name(verdict),
            "replies": (verdict != VERDICT_DENY && has_replies(port)).then_some("pass"),
            "decidedBy": deciding.map(|leg| rule(leg.decision.rule)),
            "decidedAs": deciding.and_then(|leg| self.decided_as(leg)),
            "legs": legs,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use agent_common::icmp_type_port;

    use super::*;

    #[test]
    fn diff_prints_what_the_docs_show() {
        use ward_policy::testing::{diff_example, fenced_blocks, policy_docs, web_client_db};
        let (old, new) = diff_example();
        let changes = diff(&old, &new, &web_client_db()).expect("diff");
        // docs/policy.md shows this diff (its TCP lines) as `ward policy diff` prints it.
        let printed = diff_human(&changes);
        let shown = fenced_blocks(&policy_docs(), "")
            .into_iter()
            .map(|(_, text)| text)
            .find(|text| text.starts_with("+ client -> db"))
            .expect("docs/policy.md shows a diff");
        for line in shown.lines() {
            assert!(
                printed.lines().any(|l| l == line),
                "docs/policy.md shows {line:?}; ward policy diff prints:\n{printed}"
            );
        }
    }

    #[test]
    fn diff_names_icmp_types() {
        use ward_policy::testing::{db_ingress, web_client_db};
        let old = db_ingress("    - from: [{labels: {app: web}}]\n      ports: [{port: 5432}]");
        let new = db_ingress(
            "    - from: [{labels: {app: web}}]\n      ports: [{port: 5432}, {protocol: ICMP, icmpType: 8}, {protocol: ICMPv6}]",
        );
        let changes = diff(&old, &new, &web_client_db()).expect("diff");
        let printed = diff_human(&changes);
        assert_eq!(
            printed,
            "+ web -> db icmp type 8: deny -> allow\n+ web -> db icmpv6/every type: deny -> allow\n2 changes: 2 gain access, 0 lose access\n"
        );
    }

    #[test]
    fn every_ward_command_of_the_docs_parses() {
        use clap::Parser;
        let mut commands = 0;
        for (first, block) in
            ward_policy::testing::fenced_blocks(&ward_policy::testing::policy_docs(), "sh")
        {
            for (offset, text) in block.lines().enumerate() {
                let text = text.split(" #").next().unwrap_or_default();
                let command = text.split(" > ").next().unwrap_or_default().trim();
                if !command.starts_with("ward ") {
                    continue;
                }
                commands += 1;
                if let Err(e) = crate::cli::Cli::try_parse_from(command.split_whitespace()) {
                    panic!(
                        "docs/policy.md:{}: `{command}` is not a valid command:\n{e}",
                        first + offset
                    );
                }
            }
        }
        assert!(
            commands >= 5,
            "docs/policy.md shows check and trace commands; found {commands}"
        );
    }

    /// A configuration of the workloads the example policies talk about, in a fresh directory.
    fn example_config(dir: &Path) -> PathBuf {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
        let workload = |name: &str, namespace: &str, app: &str, address: &str| {
            format!("  - name: {name}\n    spiffeId: spiffe://example.org/ns/{namespace}/sa/{name}\n    namespace: {namespace}\n    labels: {{app: {app}}}\n    cgroups: [{name}]\n    addresses: [{address}]\n")
        };
        let mut config = format!(
            "trustDomain: example.org\npolicies: [{}]\nhostAddresses: auto\nworkloads:\n",
            examples.display()
        );
        for (name, namespace, app, address) in [
            ("frontend", "shop", "frontend", "10.200.0.2"),
            ("api", "shop", "api", "10.200.0.3"),
            ("postgres", "shop", "postgres", "10.200.0.4"),
            ("prometheus", "monitoring", "prometheus", "10.200.1.2"),
            ("backup", "backup", "pg-backup", "10.200.2.2"),
        ] {
            config += &workload(name, namespace, app, address);
        }
        // The postgres Service: port 80 of its cluster IP is postgres's 5432.
        config += "services:\n  - {name: postgres, namespace: shop, clusterIPs: [10.96.0.50], ports: [{port: 80, backends: ['10.200.0.4:5432']}]}\n";
        std::fs::create_dir_all(dir).expect("create temp dir");
        let file = dir.join("ward.yaml");
        std::fs::write(&file, config).expect("write config");
        file
    }

    fn trace_command(
        config: &Path,
        from: &str,
        to: &str,
        port: &str,
        expect: Expect,
    ) -> PolicyCommand {
        PolicyCommand::Trace {
            from: from.into(),
            to: Some(to.into()),
            to_name: None,
            port: port.parse().expect("port"),
            config: config.to_owned(),
            paths: Vec::new(),
            format: Format::Human,
            expect: Some(expect),
        }
    }

    fn status(command: PolicyCommand) -> ExitCode {
        run(command).unwrap_or_else(|e| panic!("{e:#}"))
    }

    #[test]
    fn commands_answer_with_their_exit_status() {
        let dir = std::env::temp_dir().join(format!("ward-policy-cli-{}", std::process::id()));
        let config = example_config(&dir);
        let check = |paths: Vec<PathBuf>, config: Option<PathBuf>, strict| PolicyCommand::Check {
            paths,
            config,
            format: CheckFormat::Human,
            strict,
            production_paths: Vec::new(),
        };
        assert_eq!(
            status(check(Vec::new(), Some(config.clone()), true)),
            ExitCode::SUCCESS,
            "examples are clean"
        );
        let bad = dir.join("bad.yaml");
        std::fs::write(&bad, "apiVersion: ward.dev/v1\nkind: Policy\nmetadata: {name: b}\nspec: {selector: {}, ingress: [{ports: [{port: 0}]}]}\n").expect("write");
        assert_eq!(
            status(check(vec![bad.clone()], None, false)),
            ExitCode::from(1),
            "errors exit 1"
        );
        std::fs::write(&bad, "apiVersion: ward.dev/v1\nkind: Policy\nmetadata: {name: b}\nspec: {mode: audit, selector: {}, ingress: []}\n").expect("write");
        assert_eq!(
            status(check(vec![bad.clone()], None, false)),
            ExitCode::SUCCESS,
            "warnings pass without --strict"
        );
        assert_eq!(
            status(check(vec![bad.clone()], None, true)),
            ExitCode::from(2),
            "warnings exit 2 with --strict"
        );
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).expect("create empty dir");
        let nothing = status(check(vec![empty], None, true));
        assert_eq!(
            nothing,
            ExitCode::from(2),
            "no documents at all is a warning"
        );

        let trace = |from, to, port, expect| status(trace_command(&config, from, to, port, expect));
        assert_eq!(
            trace("frontend", "api", "8080/tcp", Expect::Redirect),
            ExitCode::SUCCESS,
            "mtls: required"
        );
        assert_eq!(
            trace("frontend", "api", "8080/tcp", Expect::Allow),
            ExitCode::SUCCESS,
            "a redirect is allowed"
        );
        assert_eq!(
            trace("frontend", "postgres", "5432", Expect::Deny),
            ExitCode::SUCCESS,
            "frontend may only reach api"
        );
        assert_eq!(
            trace("api", "postgres", "5432/tcp", Expect::Allow),
            ExitCode::SUCCESS,
            "NetworkPolicy admits api"
        );
        // A Service: each backend, at the port the Service's port maps to.
        assert_eq!(
            trace("api", "shop/postgres", "80/tcp", Expect::Allow),
            ExitCode::SUCCESS,
            "api reaches postgres through its Service"
        );
        assert_eq!(
            trace("frontend", "shop/postgres", "80/tcp", Expect::Deny),
            ExitCode::SUCCESS,
            "frontend may not, through the Service either"
        );
        let no_port = run(trace_command(
            &config,
            "api",
            "shop/postgres",
            "5432/tcp",
            Expect::Allow,
        ));
        let error = format!("{:#}", no_port.expect_err("the Service has no port 5432"));
        assert!(error.contains("has no port tcp/5432"), "{error}");
        assert_eq!(
            trace(
                "10.66.1.1",
                "spiffe://example.org/ns/shop/sa/frontend",
                "443/tcp",
                Expect::Deny
            ),
            ExitCode::SUCCESS,
            "legacy network denied"
        );
        assert_eq!(
            trace("198.51.100.1", "frontend", "443/tcp", Expect::Deny),
            ExitCode::from(1),
            "the public may reach frontend"
        );
        assert!(
            run(trace_command(&config, "nobody", "api", "80", Expect::Allow)).is_err(),
            "unknown endpoints are errors"
        );

        let diff = PolicyCommand::Diff {
            old: Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies"),
            new: bad,
            config: config.clone(),
            format: Format::Json,
        };
        assert_eq!(status(diff), ExitCode::SUCCESS, "diff reports and succeeds");
        std::fs::remove_dir_all(&dir).expect("remove temp dir");
    }

    #[test]
    fn trace_to_a_dns_name_runs_from_the_command_line() {
        use clap::Parser;

        let dir = std::env::temp_dir().join(format!("ward-policy-cli-dns-{}", std::process::id()));
        let config = example_config(&dir);
        let policies = dir.join("dns.yaml");
        std::fs::write(&policies, ward_policy::testing::policy("frontend-out", "  selector: {labels: {app: frontend}}\n  egress:\n    - name: payments\n      to: [{fqdn: api.payments.example}]\n      ports: [{port: 443}]")).expect("write");
        let to_name = |from: &str, to: Option<&str>, name: &str, expect| PolicyCommand::Trace {
            from: from.into(),
            to: to.map(str::to_owned),
            to_name: Some(name.into()),
            port: "443/tcp".parse().expect("port"),
            config: config.clone(),
            paths: vec![policies.clone()],
            format: Format::Human,
            expect: Some(expect),
        };
        assert_eq!(
            status(to_name(
                "frontend",
                None,
                "API.payments.example.",
                Expect::Allow
            )),
            ExitCode::SUCCESS,
            "any address of the name"
        );
        assert_eq!(
            status(to_name(
                "frontend",
                Some("192.0.2.1"),
                "api.payments.example",
                Expect::Allow
            )),
            ExitCode::SUCCESS,
            "this address of the name"
        );
        assert_eq!(
            status(to_name(
                "frontend",
                Some("192.0.2.1"),
                "www.payments.example",
                Expect::Deny
            )),
            ExitCode::SUCCESS,
            "another name"
        );
        let refused = |command| format!("{:#}", run(command).expect_err("refused"));
        let error = refused(to_name("frontend", None, "a..example", Expect::Allow));
        assert!(
            error.contains("--to-name: `a..example` has an empty label"),
            "{error}"
        );
        let error = refused(to_name(
            "192.0.2.9",
            None,
            "api.payments.example",
            Expect::Allow,
        ));
        assert!(error.contains("no workload"), "{error}");
        std::fs::remove_dir_all(&dir).expect("remove temp dir");

        let parse = |args: &str| crate::cli::Cli::try_parse_from(args.split_whitespace());
        assert!(
            parse("ward policy trace --config w.yaml --from a --to-name x.example --port 443")
                .is_ok()
        );
        assert!(
            parse("ward policy trace --config w.yaml --from a --port 443").is_err(),
            "--to or --to-name"
        );
    }

    #[test]
    fn trace_to_a_dns_name_names_the_selector_that_decides() {
        use ward_policy::testing::{policy, set, web_client_db};

        let set = set(&(policy(
            "client-out",
            "  selector: {labels: {app: client}}\n  egress:\n    - name: payments\n      to: [{fqdn: api.payments.example}, {fqdnPattern: '*.example.com'}]\n      ports: [{port: 443}]\n    - name: partners\n      to: [{cidr: 198.51.100.0/24}]",
        ) + &policy(
            "web-out",
            "  selector: {labels: {app: web}}\n  egress:\n    - to: [{labels: {app: db}}]",
        )));
        let workloads = web_client_db();
        let (web, client) = (
            Endpoint::Workload(&workloads[0]),
            Endpoint::Workload(&workloads[1]),
        );
        let shown_from = |from, to, name, port| {
            let traced =
                trace_learned(&set, &workloads, from, to, name, PROTO_TCP, port).expect("trace");
            let view = TraceView {
                set: &set,
                workloads: &workloads,
                compiled: &traced.compiled,
            };
            let port = PortArg {
                protocol: PROTO_TCP,
                port,
            };
            let json = view.json(from, to, port, &traced.legs);
            (view.human(from, to, port, &traced.legs), json)
        };
        let shown = |to, name, port| shown_from(client, to, name, port);
        let (human, json) = shown(Endpoint::World, "api.payments.example", 443);
        assert!(
            human.starts_with("client -> any address learned from api.payments.example tcp/443: ALLOW\n  decided by client-out/payments as fqdn:api.payments.example (egress of client) at test.yaml:"),
            "{human}"
        );
        assert!(
            human.contains("\n    learned from api.payments.example, as fqdn:api.payments.example: decided as fqdn:api.payments.example\n"),
            "{human}"
        );
        assert!(
            human.contains("peer fqdn:api.payments.example, tcp/443"),
            "the selector's entry, named by its selector: {human}"
        );
        assert_eq!(
            (&json["to"], &json["toName"], &json["decidedAs"]),
            (
                &json!("any address learned from api.payments.example"),
                &json!("api.payments.example"),
                &json!("fqdn:api.payments.example")
            ),
            "{json:#}"
        );
        let address = Endpoint::Address("192.0.2.1".parse().expect("address"));
        let (human, json) = shown(address, "www.example.com", 80);
        assert!(
            human.starts_with("client -> 192.0.2.1 (learned from www.example.com) tcp/80: DENY\n"),
            "{human}"
        );
        assert!(
            human.contains("learned from www.example.com, as fqdnPattern:*.example.com: no rule decides it at this port"),
            "{human}"
        );
        assert_eq!(
            json["legs"][0]["selectors"][0]["selector"],
            json!("fqdnPattern:*.example.com")
        );
        let (human, _) = shown(address, "example.org", 443);
        assert!(
            human.contains("learned from example.org, which no rule of client names"),
            "{human}"
        );
        let partner = Endpoint::Address("198.51.100.7".parse().expect("address"));
        let (human, _) = shown(partner, "api.payments.example", 443);
        assert!(
            human.contains(
                "as fqdn:api.payments.example: a rule decides the address itself, before its name"
            ) && human.contains("decided by client-out/partners (egress"),
            "{human}"
        );
        let (human, _) = shown_from(web, Endpoint::World, "api.payments.example", 443);
        assert!(
            human.contains(
                "learned from api.payments.example: the egress rules of web name no DNS names"
            ),
            "{human}"
        );
    }

    #[test]
    fn port_arguments() {
        assert_eq!(
            "53/udp".parse(),
            Ok(PortArg {
                protocol: PROTO_UDP,
                port: 53
            })
        );
        assert_eq!(
            "8080".parse(),
            Ok(PortArg {
                protocol: PROTO_TCP,
                port: 8080
            })
        );
        let parsed = |text: &str| text.parse::<PortArg>().map(|p| (p.protocol, p.port));
        assert_eq!(parsed("9/sctp"), Ok((PROTO_SCTP, 9)));
        assert_eq!(parsed("8/icmp"), Ok((PROTO_ICMP, icmp_type_port(8))));
        assert_eq!(parsed("0/ICMP"), Ok((PROTO_ICMP, icmp_type_port(0))));
        assert_eq!(
            parsed("128/icmpv6"),
            Ok((PROTO_ICMPV6, icmp_type_port(128)))
        );
        for bad in [
            "0/tcp",
            "70000/udp",
            "256/icmp",
            "-1/icmpv6",
            "80/gre",
            "echo/icmp",
        ] {
            assert!(parsed(bad).is_err(), "{bad} is refused");
        }
        let shown = |text: &str| text.parse::<PortArg>().expect(text).to_string();
        assert_eq!(
            [
                shown("8080"),
                shown("9/sctp"),
                shown("8/icmp"),
                shown("135/icmpv6")
            ],
            ["tcp/8080", "sctp/9", "icmp type 8", "icmpv6 type 135"]
        );
    }

    #[test]
    fn trace_shows_icmp_types_and_that_replies_pass() {
        use ward_policy::testing::{policy, set, workload};

        let yaml = policy(
            "web",
            "  selector: {labels: {app: web}}\n  ingress:\n    - name: ping\n      from: [{labels: {app: client}}]\n      ports: [{protocol: ICMP, icmpType: 8}, {port: 8080}]",
        );
        let set = set(&yaml);
        let workloads = [
            workload(300, "web", &[("app", "web")], &["10.0.0.2"]),
            workload(301, "client", &[("app", "client")], &["10.0.0.3"]),
        ];
        let (web, client) = (
            Endpoint::Workload(&workloads[0]),
            Endpoint::Workload(&workloads[1]),
        );
        let shown = |port: &str| {
            let port: PortArg = port.parse().expect("port");
            let traced =
                trace(&set, &workloads, client, web, port.protocol, port.port).expect("trace");
            let view = TraceView {
                set: &set,
                workloads: &workloads,
                compiled: &traced.compiled,
            };
            let json = view.json(client, web, port, &traced.legs);
            (view.human(client, web, port, &traced.legs), json)
        };
        let replies = format!("\n  {REPLIES_PASS}\n");
        let (echo, json) = shown("8/icmp");
        assert!(
            echo.starts_with("client -> web icmp type 8: ALLOW\n"),
            "{echo}"
        );
        assert!(
            echo.contains(&replies),
            "an allowed echo's reply passes:\n{echo}"
        );
        assert!(
            echo.contains("web/ping") && echo.contains("peer client, icmp type 8"),
            "{echo}"
        );
        assert_eq!(
            (
                &json["protocol"],
                &json["icmpType"],
                &json["port"],
                &json["replies"]
            ),
            (&json!("icmp"), &json!(8), &json!(null), &json!("pass"))
        );
        let (tcp, json) = shown("8080/tcp");
        assert!(tcp.starts_with("client -> web tcp/8080: ALLOW\n"), "{tcp}");
        assert!(tcp.contains(&replies), "{tcp}");
        assert_eq!(
            (&json["port"], &json["icmpType"]),
            (&json!(8080), &json!(null))
        );
        let (other_type, json) = shown("13/icmp");
        assert!(
            other_type.starts_with("client -> web icmp type 13: DENY\n"),
            "{other_type}"
        );
        assert!(!other_type.contains("replies:"), "{other_type}");
        assert_eq!(json["replies"], json!(null));
        let (refused, _) = shown("8/icmpv6");
        assert!(
            refused.starts_with("client -> web icmpv6 type 8: DENY\n")
                && !refused.contains("replies:"),
            "ICMP and ICMPv6 are distinct: {refused}"
        );
    }
}
