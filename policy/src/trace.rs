//! Answers "may A reach B on this port, and which rule decides?" and "what does a policy change
//! open or close?" from the compiled map, through [`Compiled::decide`]: the kernel's own merge.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use agent_common::{
    icmp_type_port, DIRECTION_EGRESS, DIRECTION_INGRESS, IDENTITY_WORLD, MAX_LEARNED_SELECTORS,
    PORT_ANY, PROTO_ANY, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    REMOTE_ISOLATION, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY, VERDICT_REDIRECT,
};
use ipnet::IpNet;
use serde_json::json;

use super::compile::{compile_observed, isolation_key, lookup_keys, Contribution};
use super::fqdn::FqdnSelector;
use super::port::icmp_type_of;
use super::{
    protocol_name, verdict_name, CompileError, Compiled, Decision, PolicySet, RuleIds, WorkloadInfo,
};

/// One end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint<'a> {
    Workload(&'a WorkloadInfo),
    /// An address that is no workload's.
    Address(IpAddr),
    /// Any address ward knows nothing about: no workload's, and outside every CIDR of the
    /// policies (the world identity); what a DNS name may resolve to.
    World,
}

impl<'a> Endpoint<'a> {
    /// A workload name, a workload's SPIFFE ID, or an IP address.
    pub fn resolve(text: &str, workloads: &'a [WorkloadInfo]) -> Result<Endpoint<'a>, String> {
        if let Ok(addr) = text.parse::<IpAddr>() {
            let addr = addr.to_canonical();
            let owner = workloads
                .iter()
                .find(|w| w.addresses.iter().any(|a| a.to_canonical() == addr));
            return Ok(owner.map_or(Endpoint::Address(addr), Endpoint::Workload));
        }
        let found = workloads
            .iter()
            .find(|w| w.name == text)
            .or_else(|| workloads.iter().find(|w| w.spiffe_id == text));
        found.map(Endpoint::Workload).ok_or_else(|| {
            format!("`{text}` is not a workload name, a workload's SPIFFE ID, or an IP address")
        })
    }

    fn identity(&self, compiled: &Compiled, workloads: &[WorkloadInfo]) -> u32 {
        match self {
            Endpoint::Workload(w) => w.identity,
            Endpoint::Address(addr) => compiled.remote_identity(*addr, workloads),
            Endpoint::World => IDENTITY_WORLD,
        }
    }

    pub fn is_workload(&self) -> bool {
        matches!(self, Endpoint::Workload(_))
    }
}

impl fmt::Display for Endpoint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Workload(w) => f.write_str(&w.name),
            Endpoint::Address(addr) => write!(f, "{addr}"),
            Endpoint::World => f.write_str("any address"),
        }
    }
}

/// The check of one side of a connection: egress at the source, or ingress at the destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leg {
    pub direction: u8,
    /// The workload whose policy is checked.
    pub local: String,
    pub local_identity: u32,
    pub remote_identity: u32,
    /// Egress to an address learned from a DNS name: the name.
    pub learned_from: Option<String>,
    /// The DNS-name selectors (identities) the name is decided as, as the kernel holds them for
    /// the address (at most [`MAX_LEARNED_SELECTORS`]).
    pub selectors: Vec<u32>,
    /// Whether the kernel went on to the selectors: no rule decided the address by its identity.
    pub by_name: bool,
    pub decision: Decision,
    /// Every rule contribution the kernel's lookups for this leg read.
    pub matches: Vec<Contribution>,
}

/// The legs of a connection, in the order the packet meets them: only workloads have policy.
/// With `learned_from`, the source learned the destination's address from that DNS name.
fn legs(
    compiled: &Compiled,
    workloads: &[WorkloadInfo],
    from: Endpoint<'_>,
    to: Endpoint<'_>,
    learned_from: Option<&str>,
    protocol: u8,
    port: u16,
) -> Vec<Leg> {
    let sides = [(DIRECTION_EGRESS, from, to), (DIRECTION_INGRESS, to, from)];
    let local_sides = sides
        .into_iter()
        .filter_map(|(direction, local, remote)| match local {
            Endpoint::Workload(w) => Some((direction, w, remote)),
            Endpoint::Address(_) | Endpoint::World => None,
        });
    local_sides
        .map(|(direction, local, remote)| {
            let remote_identity = remote.identity(compiled, workloads);
            let learned_from = learned_from.filter(|_| direction == DIRECTION_EGRESS);
            let mut selectors = learned_from.map_or_else(Vec::new, |name| {
                compiled.fqdn_identities(local.identity, &[name])
            });
            selectors.truncate(MAX_LEARNED_SELECTORS);
            let mut decision =
                compiled.decide(local.identity, remote_identity, direction, protocol, port);
            let by_name = learned_from.is_some()
                && compiled.decides_by_name(local.identity, direction, &decision);
            if by_name {
                decision = compiled.decide_learned(
                    local.identity,
                    remote_identity,
                    &selectors,
                    direction,
                    protocol,
                    port,
                );
            }
            // As the connect hook: the destination's ingress rule may require the tunnel.
            if direction == DIRECTION_EGRESS
                && protocol == agent_common::PROTO_TCP
                && decision.verdict != VERDICT_DENY
            {
                if let Some(rule) =
                    compiled.mtls_demand(local.identity, remote_identity, protocol, port)
                {
                    if decision.verdict != VERDICT_REDIRECT {
                        decision = Decision {
                            verdict: VERDICT_REDIRECT,
                            rule,
                            isolated: true,
                            settled: true,
                            selector: None,
                        };
                    }
                }
            }
            Leg {
                direction,
                local: local.name.clone(),
                local_identity: local.identity,
                remote_identity,
                learned_from: learned_from.map(str::to_owned),
                selectors,
                by_name,
                decision,
                matches: Vec::new(),
            }
        })
        .collect()
}

/// Severity order for combining legs: the strictest leg decides.
fn severity(verdict: u8) -> u8 {
    match verdict {
        VERDICT_DENY => 3,
        VERDICT_AUDIT => 2,
        VERDICT_REDIRECT => 1,
        _ => 0,
    }
}

/// The verdict of a whole connection and the leg that decided it (`None`: no leg is isolated).
pub fn combine(legs: &[Leg]) -> (u8, Option<&Leg>) {
    let deciding = legs
        .iter()
        .filter(|l| l.decision.isolated)
        .rev()
        .max_by_key(|l| severity(l.decision.verdict));
    (
        deciding.map_or(VERDICT_ALLOW, |l| l.decision.verdict),
        deciding,
    )
}

/// A traced connection.
#[derive(Debug)]
pub struct Trace {
    pub compiled: Compiled,
    pub legs: Vec<Leg>,
}

/// Traces `from → to` on `protocol`/`port`, listing the contributions behind every lookup.
pub fn trace(
    set: &PolicySet,
    workloads: &[WorkloadInfo],
    from: Endpoint<'_>,
    to: Endpoint<'_>,
    protocol: u8,
    port: u16,
) -> Result<Trace, CompileError> {
    traced(set, workloads, from, to, None, protocol, port)
}

/// [`trace`] of a connection from `from` to an address it learned from the DNS name `name`
/// (`to`: that address, or [`Endpoint::World`] for any address no rule names otherwise), decided
/// as the connect hook decides learned addresses ([`Compiled::decide_learned`]).
pub fn trace_learned(
    set: &PolicySet,
    workloads: &[WorkloadInfo],
    from: Endpoint<'_>,
    to: Endpoint<'_>,
    name: &str,
    protocol: u8,
    port: u16,
) -> Result<Trace, CompileError> {
    let name = super::fqdn::normalize(name);
    traced(set, workloads, from, to, Some(&name), protocol, port)
}

fn traced(
    set: &PolicySet,
    workloads: &[WorkloadInfo],
    from: Endpoint<'_>,
    to: Endpoint<'_>,
    learned_from: Option<&str>,
    protocol: u8,
    port: u16,
) -> Result<Trace, CompileError> {
    let mut rule_ids = RuleIds::new();
    let compiled = super::compile(set, workloads, &mut rule_ids)?;
    let mut legs = legs(&compiled, workloads, from, to, learned_from, protocol, port);
    // Which keys a leg reads is known only now; a second compilation with the same ids shows
    // which rules put something there.
    let mut wanted: BTreeMap<_, usize> = BTreeMap::new();
    for (i, leg) in legs.iter().enumerate() {
        let by_name = leg.selectors.iter().filter(|_| leg.by_name);
        for remote in [leg.remote_identity].iter().chain(by_name) {
            let keys = lookup_keys(leg.local_identity, *remote, leg.direction, protocol, port);
            wanted.extend(keys.into_iter().map(|key| (key, i)));
        }
        wanted.insert(isolation_key(leg.local_identity, leg.direction), i);
    }
    compile_observed(set, workloads, &mut rule_ids, &mut |c| {
        if let Some(&i) = wanted.get(&c.key) {
            legs[i].matches.push(*c);
        }
    })?;
    for leg in &mut legs {
        leg.matches
            .sort_by_key(|c| (c.key.remote_identity == REMOTE_ISOLATION, c.slot, c.rule));
        leg.matches.dedup();
    }
    Ok(Trace { compiled, legs })
}

/// A change of verdict between two policy sets for one connection, on some of its ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub from: String,
    pub to: String,
    pub protocol: u8,
    /// Port ranges named by some rule; with `other_ports` and no ranges: every port.
    pub ports: Vec<(u16, u16)>,
    /// Whether the ports no rule names changed too.
    pub other_ports: bool,
    pub before: u8,
    pub after: u8,
}

impl Change {
    /// Whether the connection can now be made where it could not before.
    pub fn gains(&self) -> bool {
        self.before == VERDICT_DENY
    }

    pub fn loses(&self) -> bool {
        self.after == VERDICT_DENY
    }
}

/// Every connection between the workloads, between them and the address ranges the policies
/// name, and from them to the DNS names the policies name, whose verdict differs between `old`
/// and `new`.
pub fn diff(
    old: &PolicySet,
    new: &PolicySet,
    workloads: &[WorkloadInfo],
) -> Result<Vec<Change>, CompileError> {
    let mut rule_ids = RuleIds::new();
    let old = super::compile(old, workloads, &mut rule_ids)?;
    let new = super::compile(new, workloads, &mut rule_ids)?;
    // Each with the DNS name its address was learned from: names are destinations only.
    let mut endpoints: Vec<(String, Endpoint<'_>, Option<String>)> = workloads
        .iter()
        .map(|w| (w.name.clone(), Endpoint::Workload(w), None))
        .collect();
    endpoints.extend(
        external_endpoints(&old, &new, workloads)
            .into_iter()
            .map(|(name, endpoint)| (name, endpoint, None)),
    );
    endpoints.extend(
        learned_endpoints(&old, &new)
            .into_iter()
            .map(|(name, learned_from)| (name, Endpoint::World, Some(learned_from))),
    );
    let named_ports = named_ports(&old, &new);
    let mut changes = Vec::new();
    for (from_name, from, from_learned) in &endpoints {
        for (to_name, to, learned_from) in &endpoints {
            if from_name == to_name
                || from_learned.is_some()
                || !(from.is_workload() || to.is_workload())
            {
                continue;
            }
            for protocol in protocols(from, to) {
                let named = |e: &Endpoint<'_>, direction| match e {
                    Endpoint::Workload(w) => named_ports.get(&(w.identity, direction, protocol)),
                    Endpoint::Address(_) | Endpoint::World => None,
                };
                let mut ports: BTreeSet<u16> = named(from, DIRECTION_EGRESS)
                    .into_iter()
                    .flatten()
                    .copied()
                    .collect();
                ports.extend(named(to, DIRECTION_INGRESS).into_iter().flatten());
                // ICMP keys name message types: the other ports are the other types.
                let other = if protocol == PROTO_ICMP || protocol == PROTO_ICMPV6 {
                    (0..=u8::MAX)
                        .map(icmp_type_port)
                        .find(|p| !ports.contains(p))
                } else {
                    (1..=u16::MAX).find(|p| !ports.contains(p))
                };
                let verdict = |compiled: &Compiled, port: u16| {
                    let learned_from = learned_from.as_deref();
                    let legs = legs(
                        compiled,
                        workloads,
                        *from,
                        *to,
                        learned_from,
                        protocol,
                        port,
                    );
                    combine(&legs).0
                };
                let probes = ports
                    .iter()
                    .map(|p| (Some(*p), *p))
                    .chain(other.map(|o| (None, o)));
                // One change per (before, after), with the ports it holds.
                let mut groups: Vec<Change> = Vec::new();
                for (port, probe) in probes {
                    let (before, after) = (verdict(&old, probe), verdict(&new, probe));
                    if before == after {
                        continue;
                    }
                    let i = groups
                        .iter()
                        .position(|c| (c.before, c.after) == (before, after))
                        .unwrap_or_else(|| {
                            let (from, to) = (from_name.clone(), to_name.clone());
                            groups.push(Change {
                                from,
                                to,
                                protocol,
                                ports: Vec::new(),
                                other_ports: false,
                                before,
                                after,
                            });
                            groups.len() - 1
                        });
                    let change = &mut groups[i];
                    match (port, change.ports.last_mut()) {
                        (None, _) => change.other_ports = true,
                        (Some(p), Some((_, end))) if end.checked_add(1) == Some(p) => *end = p,
                        (Some(p), _) => change.ports.push((p, p)),
                    }
                }
                for change in &mut groups {
                    let named: usize = change
                        .ports
                        .iter()
                        .map(|(first, last)| usize::from(last - first) + 1)
                        .sum();
                    if change.other_ports && named == ports.len() {
                        change.ports.clear();
                    }
                }
                changes.extend(groups);
            }
        }
    }
    Ok(changes)
}

/// The protocols a diff compares between two endpoints: those policy names, ICMP only where an
/// address end is IPv4 and ICMPv6 only where it is IPv6 (a workload may have both).
fn protocols(from: &Endpoint<'_>, to: &Endpoint<'_>) -> Vec<u8> {
    let family = |e: &Endpoint<'_>| match e {
        Endpoint::Address(addr) => Some(addr.is_ipv4()),
        Endpoint::Workload(_) | Endpoint::World => None,
    };
    let ipv4 = family(from).or(family(to));
    let mut protocols = vec![PROTO_TCP, PROTO_UDP, PROTO_SCTP];
    protocols.extend(
        [(PROTO_ICMP, true), (PROTO_ICMPV6, false)]
            .into_iter()
            .filter(|(_, v4)| ipv4.is_none_or(|ipv4| ipv4 == *v4))
            .map(|(protocol, _)| protocol),
    );
    protocols
}

/// The ports map keys name explicitly, per (local identity, direction, protocol).
fn named_ports(old: &Compiled, new: &Compiled) -> BTreeMap<(u32, u8, u8), BTreeSet<u16>> {
    let mut ports: BTreeMap<_, BTreeSet<u16>> = BTreeMap::new();
    for key in old.entries.keys().chain(new.entries.keys()) {
        if key.port != PORT_ANY && key.protocol != PROTO_ANY {
            ports
                .entry((key.local_identity, key.direction, key.protocol))
                .or_default()
                .insert(key.port);
        }
    }
    ports
}

/// One name for each DNS-name selector of either set, labelled as written: the name of an
/// `fqdn`, and for an `fqdnPattern` a name it matches that no `fqdn` of either set is.
fn learned_endpoints(old: &Compiled, new: &Compiled) -> Vec<(String, String)> {
    let selectors: BTreeSet<&FqdnSelector> = old.fqdn.keys().chain(new.fqdn.keys()).collect();
    let exact: BTreeSet<&str> = selectors
        .iter()
        .filter(|s| matches!(s, FqdnSelector::Name(_)))
        .map(|s| s.text())
        .collect();
    let sample = |pattern: &str| {
        // One more fill than there are names: one of them is no name's.
        let fills = (0..=exact.len()).map(|i| format!("x{i}"));
        let mut samples = fills.map(|fill| pattern.replace('*', &fill));
        samples
            .find(|name| !exact.contains(name.as_str()))
            .expect("a fill that no name takes")
    };
    selectors
        .into_iter()
        .map(|selector| match selector {
            FqdnSelector::Name(name) => (name.clone(), name.clone()),
            FqdnSelector::Pattern(pattern) => (pattern.clone(), sample(pattern)),
        })
        .collect()
}

/// One address for each range the policies tell apart: the part of every prefix that no more
/// specific prefix covers, and the rest of the world, per address family.
fn external_endpoints<'a>(
    old: &Compiled,
    new: &Compiled,
    workloads: &[WorkloadInfo],
) -> Vec<(String, Endpoint<'a>)> {
    let prefixes: BTreeSet<IpNet> = old
        .prefixes
        .keys()
        .chain(new.prefixes.keys())
        .copied()
        .collect();
    let hosts = workloads
        .iter()
        .flat_map(|w| &w.addresses)
        .map(|a| IpNet::from(a.to_canonical()));
    let taken: Vec<IpNet> = prefixes.iter().copied().chain(hosts).collect();
    let mut regions: Vec<(String, IpNet)> =
        prefixes.iter().map(|net| (net.to_string(), *net)).collect();
    let worlds = [
        ("world (IPv4)", IpNet::V4(Default::default())),
        ("world (IPv6)", IpNet::V6(Default::default())),
    ];
    regions.extend(
        worlds
            .into_iter()
            .filter(|(_, net)| !prefixes.contains(net))
            .map(|(name, net)| (name.to_owned(), net)),
    );
    let free = |(name, net): (String, IpNet)| {
        let inner: Vec<IpNet> = taken.iter().filter(|t| **t != net).copied().collect();
        Some((name, Endpoint::Address(free_address(net, &inner)?)))
    };
    regions.into_iter().filter_map(free).collect()
}

/// An address of `net` outside every prefix of `taken` that lies inside `net`.
fn free_address(net: IpNet, taken: &[IpNet]) -> Option<IpAddr> {
    let inside: Vec<IpNet> = taken.iter().filter(|t| net.contains(*t)).copied().collect();
    if inside.is_empty() {
        return Some(net.network());
    }
    if inside.contains(&net) {
        return None;
    }
    let halves = net.subnets(net.prefix_len() + 1).ok()?;
    halves
        .into_iter()
        .find_map(|half| free_address(half, &inside))
}

/// A change's port ranges, as ICMP types for ICMP and ICMPv6.
fn change_ranges(change: &Change) -> Vec<(u16, u16)> {
    let icmp = |port| icmp_type_of(change.protocol, port).map(u16::from);
    change
        .ports
        .iter()
        .map(|&(first, last)| (icmp(first).unwrap_or(first), icmp(last).unwrap_or(last)))
        .collect()
}

fn ports_text(change: &Change) -> String {
    let protocol = protocol_name(change.protocol);
    let ranges = change_ranges(change)
        .into_iter()
        .map(|(first, last)| match first == last {
            true => first.to_string(),
            false => format!("{first}-{last}"),
        });
    let ranges = ranges.collect::<Vec<_>>().join(",");
    if matches!(change.protocol, PROTO_ICMP | PROTO_ICMPV6) {
        return match (ranges.is_empty(), change.other_ports) {
            (true, _) => format!("{protocol}/every type"),
            (false, true) => format!("{protocol} type {ranges} and every other type"),
            (false, false) => format!("{protocol} type {ranges}"),
        };
    }
    match (ranges.is_empty(), change.other_ports) {
        (true, _) => format!("{protocol}/every port"),
        (false, true) => format!("{protocol}/{ranges} and every other port"),
        (false, false) => format!("{protocol}/{ranges}"),
    }
}

/// `ward policy diff`'s text: a line a change (`+` gains access, `-` loses it, `~` other), then
/// the counts.
pub fn diff_human(changes: &[Change]) -> String {
    let mut out = String::new();
    for c in changes {
        let sign = if c.gains() {
            '+'
        } else if c.loses() {
            '-'
        } else {
            '~'
        };
        let (before, after) = (verdict_name(c.before), verdict_name(c.after));
        out += &format!(
            "{sign} {} -> {} {}: {before} -> {after}\n",
            c.from,
            c.to,
            ports_text(c)
        );
    }
    let (gained, lost) = (
        changes.iter().filter(|c| c.gains()).count(),
        changes.iter().filter(|c| c.loses()).count(),
    );
    out + &format!(
        "{} changes: {gained} gain access, {lost} lose access\n",
        changes.len()
    )
}

/// `ward policy diff --format json`'s document.
pub fn diff_json(changes: &[Change]) -> serde_json::Value {
    let changes: Vec<_> = changes
        .iter()
        .map(|c| {
            let ranges: Vec<_> = change_ranges(c)
                .into_iter()
                .map(|(first, last)| json!([first, last]))
                .collect();
            let mut change = json!({
                "from": c.from,
                "to": c.to,
                "protocol": protocol_name(c.protocol),
                "ports": [],
                "otherPorts": c.other_ports,
                "before": verdict_name(c.before),
                "after": verdict_name(c.after),
                "access": if c.gains() { "gained" } else if c.loses() { "lost" } else { "changed" },
            });
            // ICMP and ICMPv6 changes name message types rather than ports.
            let icmp = matches!(c.protocol, PROTO_ICMP | PROTO_ICMPV6);
            change[if icmp { "icmpTypes" } else { "ports" }] = ranges.into();
            change
        })
        .collect();
    json!({ "changes": changes })
}

#[cfg(test)]
mod tests;
