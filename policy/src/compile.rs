//! Compilation of a policy set into the kernel's policy map, and the kernel's decision mirrored.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use agent_common::{
    icmp_type_port, PolicyKey, PolicyValue, DIRECTION_EGRESS, DIRECTION_INGRESS, DIRECTION_MTLS,
    IDENTITY_ANY, IDENTITY_WORLD, MAX_LEARNED_SELECTORS, MAX_POLICY_ENTRIES, POLICY_FLAGS_ABSENT,
    POLICY_FLAG_FQDN, POLICY_FLAG_MTLS, POLICY_FLAG_NO_ANY_PORT, POLICY_FLAG_NO_ANY_PROTOCOL,
    POLICY_FLAG_NO_ANY_REMOTE, PORT_ANY, PROTO_ANY, REMOTE_ISOLATION, VERDICT_ALLOW, VERDICT_AUDIT,
    VERDICT_DENY, VERDICT_REDIRECT,
};
use ipnet::IpNet;

use super::fqdn::{self, FqdnSelector};
use super::identity::{
    self, FIRST_CIDR, FIRST_FQDN_SELECTOR, FIRST_WORKLOAD, LAST_FQDN_SELECTOR, LAST_WORKLOAD,
};
use super::model::{Peer, Policy, PolicySet, PortMatch, Rule};
use super::ward::DEFAULT_DENY;
use super::{Decision, Mode, RuleAction, RuleInfo, WorkloadInfo};

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("policy {policy}, rule {rule}: the policy map would need more than {limit} entries")]
    TooManyEntries {
        policy: String,
        rule: String,
        limit: u32,
    },
    #[error("workload {name}: identity {identity:#x} is outside the workload range {FIRST_WORKLOAD:#x}..={LAST_WORKLOAD:#x}")]
    WorkloadIdentity { name: String, identity: u32 },
    #[error("DNS-name selector {selector}: every identity of the range {FIRST_FQDN_SELECTOR:#x}..={LAST_FQDN_SELECTOR:#x} was handed out")]
    FqdnSelectorIdentity { selector: String },
}

impl CompileError {
    /// The policy the error is about, if one.
    pub fn policy(&self) -> Option<&str> {
        match self {
            CompileError::TooManyEntries { policy, .. } => Some(policy),
            CompileError::WorkloadIdentity { .. } | CompileError::FqdnSelectorIdentity { .. } => {
                None
            }
        }
    }
}

/// Hands out rule ids, CIDR identities and DNS-name selector identities, and gives the same rule
/// (policy, direction, rule name), the same prefix and the same selector the same id in every
/// compilation, so a recompile changes only the entries whose meaning changed. Ids are never
/// reused within one allocator.
#[derive(Clone, Debug)]
pub struct RuleIds {
    rules: HashMap<(String, u8, String), u32>,
    next_rule: u32,
    cidrs: BTreeMap<IpNet, u32>,
    next_cidr: u32,
    fqdn_selectors: BTreeMap<FqdnSelector, u32>,
    next_fqdn_selector: u32,
}

impl Default for RuleIds {
    fn default() -> Self {
        RuleIds {
            rules: HashMap::new(),
            next_rule: agent_common::rule_ids::FIRST,
            cidrs: BTreeMap::new(),
            next_cidr: FIRST_CIDR,
            fqdn_selectors: BTreeMap::new(),
            next_fqdn_selector: FIRST_FQDN_SELECTOR,
        }
    }
}

impl RuleIds {
    pub fn new() -> Self {
        Self::default()
    }

    fn rule(&mut self, policy: &str, direction: u8, rule: &str) -> u32 {
        let next = &mut self.next_rule;
        *self
            .rules
            .entry((policy.to_owned(), direction, rule.to_owned()))
            .or_insert_with(|| {
                *next += 1;
                *next - 1
            })
    }

    fn cidr(&mut self, net: IpNet) -> u32 {
        let next = &mut self.next_cidr;
        *self.cidrs.entry(net).or_insert_with(|| {
            *next += 1;
            *next - 1
        })
    }

    fn fqdn_selector(&mut self, selector: &FqdnSelector) -> Result<u32, CompileError> {
        if let Some(id) = self.fqdn_selectors.get(selector) {
            return Ok(*id);
        }
        let id = self.next_fqdn_selector;
        if id > LAST_FQDN_SELECTOR {
            let selector = selector.to_string();
            return Err(CompileError::FqdnSelectorIdentity { selector });
        }
        self.next_fqdn_selector += 1;
        self.fqdn_selectors.insert(selector.clone(), id);
        Ok(id)
    }
}

/// The policy map's content for one policy set and set of workloads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Every key has `generation == 0`; the writer sets it.
    pub entries: BTreeMap<PolicyKey, PolicyValue>,
    /// The LPM IP cache: the CIDR identity of every CIDR and except prefix of the set. May hold
    /// `0.0.0.0/0 → IDENTITY_WORLD` so that an IPv6 prefix such as `::/0` never catches IPv4
    /// addresses once they are mapped to `::ffff:a.b.c.d`.
    pub prefixes: BTreeMap<IpNet, u32>,
    /// Every rule of the set, including those that produced no entry.
    pub rules: BTreeMap<u32, RuleInfo>,
    /// The identity of every DNS-name selector of the set.
    pub fqdn: BTreeMap<FqdnSelector, u32>,
}

/// One rule's contribution to one map entry, before merging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Contribution {
    pub key: PolicyKey,
    pub slot: Slot,
    pub rule: u32,
    /// [`ALLOW_FLAGS`] go with the rule into the allow slot; the others (the isolation entry's
    /// `POLICY_FLAG_FQDN`) are the entry's, whichever rule holds a slot.
    pub flags: u32,
}

/// The flags of [`PolicyValue`] that describe the rule in its allow slot.
pub const ALLOW_FLAGS: u32 = POLICY_FLAG_MTLS;

/// A field of [`PolicyValue`] that holds a rule id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Slot {
    Deny,
    Allow,
    AuditDeny,
    AuditAllow,
}

impl Slot {
    fn of(mode: Mode, action: RuleAction) -> Slot {
        match (mode, action) {
            (Mode::Enforce, RuleAction::Allow) => Slot::Allow,
            (Mode::Enforce, _) => Slot::Deny,
            (Mode::Audit, RuleAction::Allow) => Slot::AuditAllow,
            (Mode::Audit, _) => Slot::AuditDeny,
        }
    }

    const ALL: [Slot; 4] = [Slot::Deny, Slot::Allow, Slot::AuditDeny, Slot::AuditAllow];

    fn get(self, value: &PolicyValue) -> u32 {
        let mut value = *value;
        *self.field(&mut value)
    }

    fn field(self, value: &mut PolicyValue) -> &mut u32 {
        match self {
            Slot::Deny => &mut value.deny_rule,
            Slot::Allow => &mut value.allow_rule,
            Slot::AuditDeny => &mut value.audit_deny_rule,
            Slot::AuditAllow => &mut value.audit_allow_rule,
        }
    }
}

pub fn policy_key(local: u32, remote: u32, direction: u8, protocol: u8, port: u16) -> PolicyKey {
    PolicyKey {
        local_identity: local,
        remote_identity: remote,
        port,
        protocol,
        direction,
        ..PolicyKey::default()
    }
}

pub fn isolation_key(local: u32, direction: u8) -> PolicyKey {
    policy_key(local, REMOTE_ISOLATION, direction, PROTO_ANY, PORT_ANY)
}

/// The keys the kernel looks up for a query, in the order it merges them.
pub fn lookup_keys(
    local: u32,
    remote: u32,
    direction: u8,
    protocol: u8,
    port: u16,
) -> [PolicyKey; 6] {
    let ports = [
        (protocol, port),
        (protocol, PORT_ANY),
        (PROTO_ANY, PORT_ANY),
    ];
    let key = |i: usize| {
        let (protocol, port) = ports[i % 3];
        policy_key(
            local,
            if i < 3 { remote } else { IDENTITY_ANY },
            direction,
            protocol,
            port,
        )
    };
    std::array::from_fn(key)
}

/// The kernel's verdict from the isolation entry (`None`: not isolated) and the merged value of
/// the lookups.
fn verdict_of(isolation: Option<PolicyValue>, v: &PolicyValue) -> Decision {
    let Some(iso) = isolation else {
        return Decision {
            verdict: VERDICT_ALLOW,
            rule: 0,
            isolated: false,
            settled: false,
            selector: None,
        };
    };
    let decision = |verdict, rule| Decision {
        verdict,
        rule,
        isolated: true,
        settled: v.deny_rule != 0 || v.allow_rule != 0,
        selector: None,
    };
    if v.deny_rule != 0 {
        decision(VERDICT_DENY, v.deny_rule)
    } else if iso.deny_rule != 0 && v.allow_rule == 0 {
        decision(VERDICT_DENY, iso.deny_rule)
    } else if v.audit_deny_rule != 0 {
        decision(VERDICT_AUDIT, v.audit_deny_rule)
    } else if iso.audit_deny_rule != 0 && v.allow_rule == 0 && v.audit_allow_rule == 0 {
        decision(VERDICT_AUDIT, iso.audit_deny_rule)
    } else if v.allow_rule != 0 && v.flags & POLICY_FLAG_MTLS != 0 {
        decision(VERDICT_REDIRECT, v.allow_rule)
    } else if v.allow_rule != 0 {
        decision(VERDICT_ALLOW, v.allow_rule)
    } else {
        decision(VERDICT_ALLOW, v.audit_allow_rule)
    }
}

/// Compiles `set` for `workloads`. Fails without partial output if the map would overflow.
pub fn compile(
    set: &PolicySet,
    workloads: &[WorkloadInfo],
    rule_ids: &mut RuleIds,
) -> Result<Compiled, CompileError> {
    compile_with_peers(set, workloads, &[], rule_ids)
}

/// [`compile`] for this node's `workloads`, with `peers` (workloads of other nodes, known from
/// the control plane) as further identities that rules may name as remotes. Peers are never
/// policy subjects here: their own node enforces their policy.
pub fn compile_with_peers(
    set: &PolicySet,
    workloads: &[WorkloadInfo],
    peers: &[WorkloadInfo],
    rule_ids: &mut RuleIds,
) -> Result<Compiled, CompileError> {
    compile_inner(set, workloads, peers, rule_ids, &mut |_| {})
}

/// [`compile`], showing every contribution to `observe` as it is merged.
pub fn compile_observed(
    set: &PolicySet,
    workloads: &[WorkloadInfo],
    rule_ids: &mut RuleIds,
    observe: &mut dyn FnMut(&Contribution),
) -> Result<Compiled, CompileError> {
    compile_inner(set, workloads, &[], rule_ids, observe)
}

fn compile_inner(
    set: &PolicySet,
    workloads: &[WorkloadInfo],
    peers: &[WorkloadInfo],
    rule_ids: &mut RuleIds,
    observe: &mut dyn FnMut(&Contribution),
) -> Result<Compiled, CompileError> {
    if let Some(w) = workloads
        .iter()
        .find(|w| !identity::is_workload(w.identity))
    {
        return Err(CompileError::WorkloadIdentity {
            name: w.name.clone(),
            identity: w.identity,
        });
    }
    let mut compiled = Compiled::default();
    for net in set.prefixes() {
        compiled.prefixes.insert(net, rule_ids.cidr(net));
    }
    for selector in set.fqdn_selectors() {
        let id = rule_ids.fqdn_selector(selector)?;
        compiled.fqdn.insert(selector.clone(), id);
    }
    let mapped_v4 = IpNet::V6("::ffff:0:0/96".parse().expect("valid prefix"));
    let any_v4 = IpNet::V4(ipnet::Ipv4Net::default());
    if compiled.prefixes.keys().any(|p| p.contains(&mapped_v4))
        && !compiled.prefixes.contains_key(&any_v4)
    {
        compiled.prefixes.insert(any_v4, IDENTITY_WORLD);
    }
    for policy in &set.policies {
        let locals: BTreeSet<u32> = workloads
            .iter()
            .filter(|w| policy.selector.matches(w))
            .map(|w| w.identity)
            .collect();
        for (direction, rules) in policy.directions() {
            let info = |rule: &str, action, mtls| RuleInfo {
                policy: policy.name.clone(),
                rule: rule.to_owned(),
                action,
                mode: policy.mode,
                mtls,
                source: policy.origin.file.clone(),
                direction,
            };
            let default_deny = rule_ids.rule(&policy.name, direction, DEFAULT_DENY);
            compiled.rules.insert(
                default_deny,
                info(DEFAULT_DENY, RuleAction::DefaultDeny, false),
            );
            let slot = Slot::of(policy.mode, RuleAction::Deny);
            // The connect hook sends this workload's DNS to the proxy and counts the addresses
            // it learned there.
            let flags = if rules.iter().any(Rule::names_fqdn) {
                POLICY_FLAG_FQDN
            } else {
                0
            };
            for &local in &locals {
                let contribution = Contribution {
                    key: isolation_key(local, direction),
                    slot,
                    rule: default_deny,
                    flags,
                };
                compiled.merge(&contribution, observe, policy, DEFAULT_DENY)?;
            }
            for rule in rules {
                let id = rule_ids.rule(&policy.name, direction, &rule.name);
                compiled
                    .rules
                    .insert(id, info(&rule.name, rule.action, rule.mtls));
                if locals.is_empty() {
                    continue;
                }
                let slot = Slot::of(policy.mode, rule.action);
                let flags = if rule.mtls { POLICY_FLAG_MTLS } else { 0 };
                let remotes = compiled.remotes(rule, workloads, peers);
                let ports = port_keys(rule);
                let mut keys = Vec::new();
                for &local in &locals {
                    for &remote in &remotes {
                        keys.extend(ports.iter().map(|&(protocol, port)| {
                            policy_key(local, remote, direction, protocol, port)
                        }));
                    }
                    keys.extend(named_port_keys(rule, local, direction, &remotes, workloads));
                }
                for key in keys {
                    let contribution = Contribution {
                        key,
                        slot,
                        rule: id,
                        flags,
                    };
                    compiled.merge(&contribution, observe, policy, &rule.name)?;
                }
            }
        }
    }
    for policy in &set.policies {
        compiled.mtls_demands(policy, workloads, peers, rule_ids, observe)?;
    }
    compiled.mark_absent_lookups();
    Ok(compiled)
}

/// The keys of a rule's named ports for one local workload. A name stands for the port of the
/// destination: for ingress the local workload, for egress each workload the rule's peers select
/// (every workload when it names no peers); a destination without that name gets no key, and
/// neither does an address outside the workloads.
fn named_port_keys(
    rule: &Rule,
    local: u32,
    direction: u8,
    remotes: &BTreeSet<u32>,
    workloads: &[WorkloadInfo],
) -> Vec<PolicyKey> {
    let named: Vec<&PortMatch> = rule
        .ports
        .iter()
        .flatten()
        .filter(|p| matches!(p, PortMatch::Named { .. }))
        .collect();
    if named.is_empty() {
        return Vec::new();
    }
    let resolved = |destination: &WorkloadInfo| -> BTreeSet<(u8, u16)> {
        named
            .iter()
            .filter_map(|p| p.resolve_named(destination))
            .collect()
    };
    let mut keys = Vec::new();
    if direction == agent_common::DIRECTION_INGRESS {
        for destination in workloads.iter().filter(|w| w.identity == local) {
            for (protocol, port) in resolved(destination) {
                keys.extend(
                    remotes
                        .iter()
                        .map(|&remote| policy_key(local, remote, direction, protocol, port)),
                );
            }
        }
    } else {
        let selected = |w: &WorkloadInfo| {
            rule.peers
                .as_ref()
                .is_none_or(|peers| peers.iter().any(|peer| peer.selects(w)))
        };
        for destination in workloads.iter().filter(|w| selected(w)) {
            keys.extend(resolved(destination).into_iter().map(|(protocol, port)| {
                policy_key(local, destination.identity, direction, protocol, port)
            }));
        }
    }
    keys
}

/// The (protocol, port) pairs of a rule's numbered ports and ICMP types (an ICMP type's port is
/// [`icmp_type_port`] of it).
fn port_keys(rule: &Rule) -> BTreeSet<(u8, u16)> {
    let Some(ports) = &rule.ports else {
        return BTreeSet::from([(PROTO_ANY, PORT_ANY)]);
    };
    let mut keys = BTreeSet::new();
    for port in ports {
        match *port {
            PortMatch::Protocol(protocol) => {
                keys.insert((protocol, PORT_ANY));
            }
            PortMatch::Range {
                protocol,
                first,
                last,
            } => keys.extend((first..=last).map(|p| (protocol, p))),
            PortMatch::Icmp {
                protocol,
                icmp_type,
            } => {
                keys.insert((protocol, icmp_type.map_or(PORT_ANY, icmp_type_port)));
            }
            PortMatch::Named { .. } => {}
        }
    }
    keys
}

impl Compiled {
    /// Marks each isolation entry with the [`POLICY_FLAGS_ABSENT`] of its workload and
    /// direction: the shapes of key (any remote, a protocol's any port, any protocol) that none
    /// of their entries has. The kernel skips the lookups of those shapes, which could only miss
    /// ([`agent_common::lookup_skipped`]): a workload whose rules name peers and ports pays two
    /// lookups per decision instead of seven. The flags are part of the isolation entry's value,
    /// written with it in the same generation, so they always describe the entries beside them.
    fn mark_absent_lookups(&mut self) {
        let mut present: BTreeMap<(u32, u8), u32> = BTreeMap::new();
        for key in self.entries.keys() {
            if key.remote_identity == REMOTE_ISOLATION {
                continue;
            }
            let mut shapes = 0;
            if key.remote_identity == IDENTITY_ANY {
                shapes |= POLICY_FLAG_NO_ANY_REMOTE;
            }
            if key.protocol == PROTO_ANY {
                shapes |= POLICY_FLAG_NO_ANY_PROTOCOL;
            } else if key.port == PORT_ANY {
                shapes |= POLICY_FLAG_NO_ANY_PORT;
            }
            *present
                .entry((key.local_identity, key.direction))
                .or_default() |= shapes;
        }
        for (key, value) in &mut self.entries {
            if key.remote_identity == REMOTE_ISOLATION {
                let present = present
                    .get(&(key.local_identity, key.direction))
                    .copied()
                    .unwrap_or(0);
                value.flags =
                    (value.flags & !POLICY_FLAGS_ABSENT) | (POLICY_FLAGS_ABSENT & !present);
            }
        }
    }

    /// Merges one contribution; of two rules for the same field the lower id stays.
    fn merge(
        &mut self,
        contribution: &Contribution,
        observe: &mut dyn FnMut(&Contribution),
        policy: &Policy,
        rule: &str,
    ) -> Result<(), CompileError> {
        observe(contribution);
        let value = self.entries.entry(contribution.key).or_default();
        let field = contribution.slot.field(value);
        if *field == 0 || contribution.rule < *field {
            *field = contribution.rule;
            if contribution.slot == Slot::Allow {
                value.flags = (value.flags & !ALLOW_FLAGS) | (contribution.flags & ALLOW_FLAGS);
            }
        }
        value.flags |= contribution.flags & !ALLOW_FLAGS;
        if self.entries.len() > MAX_POLICY_ENTRIES as usize {
            let (policy, rule) = (policy.name.clone(), rule.to_owned());
            return Err(CompileError::TooManyEntries {
                policy,
                rule,
                limit: MAX_POLICY_ENTRIES,
            });
        }
        Ok(())
    }

    /// The remote identities a rule names: workloads by selector or address, CIDR prefixes, and
    /// DNS-name selectors.
    fn remotes(
        &self,
        rule: &Rule,
        workloads: &[WorkloadInfo],
        other_nodes: &[WorkloadInfo],
    ) -> BTreeSet<u32> {
        let Some(peers) = &rule.peers else {
            return BTreeSet::from([IDENTITY_ANY]);
        };
        let mut remotes = BTreeSet::new();
        for peer in peers {
            remotes.extend(
                workloads
                    .iter()
                    .chain(other_nodes)
                    .filter(|w| peer.selects(w))
                    .map(|w| w.identity),
            );
            match peer {
                Peer::Cidr { .. } => {
                    let prefixes = self
                        .prefixes
                        .iter()
                        .filter(|(net, id)| **id != IDENTITY_WORLD && peer.covers_prefix(net));
                    remotes.extend(prefixes.map(|(_, id)| *id));
                }
                Peer::Fqdn(selector) => remotes.extend(self.fqdn.get(selector)),
                Peer::Workloads(_) => {}
            }
        }
        remotes
    }

    /// The [`DIRECTION_MTLS`] entries of `policy`: each enforced ingress rule that requires mTLS
    /// makes this node's workloads it admits go through the tunnel to every workload (of any
    /// node) the policy selects, at the rule's ports. Sources are named by identity; CIDR peers
    /// never speak through a tunnel, and named ports are not resolved here.
    fn mtls_demands(
        &mut self,
        policy: &Policy,
        workloads: &[WorkloadInfo],
        peers: &[WorkloadInfo],
        rule_ids: &mut RuleIds,
        observe: &mut dyn FnMut(&Contribution),
    ) -> Result<(), CompileError> {
        if policy.mode != Mode::Enforce {
            return Ok(());
        }
        let Some(rules) = policy
            .directions()
            .find(|(d, _)| *d == DIRECTION_INGRESS)
            .map(|(_, r)| r)
        else {
            return Ok(());
        };
        let destinations: Vec<u32> = workloads
            .iter()
            .chain(peers)
            .filter(|w| policy.selector.matches(w))
            .map(|w| w.identity)
            .collect();
        if destinations.is_empty() {
            return Ok(());
        }
        for rule in rules
            .iter()
            .filter(|r| r.mtls && r.action == RuleAction::Allow)
        {
            let id = rule_ids.rule(&policy.name, DIRECTION_INGRESS, &rule.name);
            let admitted = self.remotes(rule, workloads, peers);
            let sources = workloads
                .iter()
                .map(|w| w.identity)
                .filter(|i| admitted.contains(i) || admitted.contains(&IDENTITY_ANY));
            let ports = port_keys(rule);
            for source in sources {
                let mut keys = vec![isolation_key(source, DIRECTION_MTLS)];
                for &destination in &destinations {
                    keys.extend(ports.iter().map(|&(protocol, port)| {
                        policy_key(source, destination, DIRECTION_MTLS, protocol, port)
                    }));
                }
                for key in keys {
                    let contribution = Contribution {
                        key,
                        slot: Slot::Allow,
                        rule: id,
                        flags: POLICY_FLAG_MTLS,
                    };
                    self.merge(&contribution, observe, policy, &rule.name)?;
                }
            }
        }
        Ok(())
    }

    /// The rule that makes `local`'s connections to `remote` at `port` go through the tunnel
    /// because the destination requires it, as the connect hook looks it up.
    pub fn mtls_demand(&self, local: u32, remote: u32, protocol: u8, port: u16) -> Option<u32> {
        self.entries.get(&isolation_key(local, DIRECTION_MTLS))?;
        // The kernel reads only the lookups naming `remote`: a demand names its destination.
        lookup_keys(local, remote, DIRECTION_MTLS, protocol, port)[..3]
            .iter()
            .find_map(|key| self.entries.get(key).map(|v| v.allow_rule))
    }

    /// The map fields the kernel would merge for a query: the isolation entry, and the merged
    /// value of the six lookups.
    pub fn lookup(
        &self,
        local: u32,
        remote: u32,
        direction: u8,
        protocol: u8,
        port: u16,
    ) -> (Option<PolicyValue>, PolicyValue) {
        let isolation = self.entries.get(&isolation_key(local, direction)).copied();
        let keys = lookup_keys(local, remote, direction, protocol, port);
        (isolation, self.merged(keys.iter()))
    }

    /// The values of `keys` merged as the kernel merges them: the first key naming a rule in a
    /// slot gives that slot (and the allow slot its flags).
    fn merged<'k>(&self, keys: impl Iterator<Item = &'k PolicyKey>) -> PolicyValue {
        let mut merged = PolicyValue::default();
        for key in keys {
            let Some(value) = self.entries.get(key) else {
                continue;
            };
            for slot in Slot::ALL {
                let (mine, theirs) = (slot.get(&merged), slot.get(value));
                if mine == 0 && theirs != 0 {
                    *slot.field(&mut merged) = theirs;
                    if slot == Slot::Allow {
                        merged.flags = value.flags;
                    }
                }
            }
        }
        merged
    }

    /// The verdict the kernel reaches for a query, field by field as it merges the map.
    pub fn decide(
        &self,
        local: u32,
        remote: u32,
        direction: u8,
        protocol: u8,
        port: u16,
    ) -> Decision {
        let (isolation, v) = self.lookup(local, remote, direction, protocol, port);
        verdict_of(isolation, &v)
    }

    /// Whether the kernel goes on to decide a learned address together with its DNS-name
    /// selectors after `decision` (of `local` in `direction`): `local`'s isolation entry there
    /// says it uses DNS names, and no enforcing rule settled the address by its own identity.
    pub fn decides_by_name(&self, local: u32, direction: u8, decision: &Decision) -> bool {
        decision.isolated && !decision.settled && self.fqdn_flag(local, direction)
    }

    /// Whether `local`'s isolation entry in `direction` carries [`POLICY_FLAG_FQDN`].
    fn fqdn_flag(&self, local: u32, direction: u8) -> bool {
        self.entries
            .get(&isolation_key(local, direction))
            .is_some_and(|iso| iso.flags & POLICY_FLAG_FQDN != 0)
    }

    /// [`Compiled::decide`] for an address `local` learned from a DNS name that matched the
    /// selector identities `selectors` ([`Compiled::fqdn_identities`]), as the connect hook does:
    /// when [`Compiled::decides_by_name`], the rules of the address and of the first
    /// [`MAX_LEARNED_SELECTORS`] selectors (0 ends them) merge as one peer's, so a rule of the
    /// address (an audit rule, a deny) and a rule of the name both count. [`Decision::selector`]
    /// names the selector whose rule decided, when the name changed the verdict.
    pub fn decide_learned(
        &self,
        local: u32,
        remote: u32,
        selectors: &[u32],
        direction: u8,
        protocol: u8,
        port: u16,
    ) -> Decision {
        let decision = self.decide(local, remote, direction, protocol, port);
        if !self.decides_by_name(local, direction, &decision) {
            return decision;
        }
        let selectors: Vec<u32> = selectors
            .iter()
            .take(MAX_LEARNED_SELECTORS)
            .take_while(|s| **s != 0)
            .copied()
            .collect();
        let own = lookup_keys(local, remote, direction, protocol, port);
        let named: Vec<PolicyKey> = selectors
            .iter()
            .flat_map(|s| lookup_keys(local, *s, direction, protocol, port)[..3].to_vec())
            .collect();
        let isolation = self.entries.get(&isolation_key(local, direction)).copied();
        let learned = verdict_of(isolation, &self.merged(own.iter().chain(&named)));
        if (learned.verdict, learned.rule) == (decision.verdict, decision.rule) {
            return decision;
        }
        let selector = selectors.iter().copied().find(|s| {
            let v = self.merged(lookup_keys(local, *s, direction, protocol, port)[..3].iter());
            Slot::ALL.iter().any(|slot| slot.get(&v) == learned.rule)
        });
        Decision {
            selector,
            ..learned
        }
    }

    /// The identities of the DNS-name selectors that match any of `names` (as a DNS answer gives
    /// them; normalized here) and that `local`'s egress policy names, ascending (one identity a
    /// selector): what an address `local` learned from those names is decided as.
    pub fn fqdn_identities(&self, local: u32, names: &[&str]) -> Vec<u32> {
        let names: Vec<String> = names.iter().map(|n| fqdn::normalize(n)).collect();
        let mut identities: Vec<u32> = self
            .fqdn
            .iter()
            .filter(|(selector, _)| names.iter().any(|n| selector.matches(n)))
            .map(|(_, id)| *id)
            .filter(|id| self.names_in_egress(local, *id))
            .collect();
        identities.sort_unstable();
        identities
    }

    /// Whether an egress entry of `local` names `remote`.
    fn names_in_egress(&self, local: u32, remote: u32) -> bool {
        let first = policy_key(local, remote, 0, 0, 0);
        let past = policy_key(local, remote.saturating_add(1), 0, 0, 0);
        self.entries
            .range(first..past)
            .any(|(key, _)| key.direction == DIRECTION_EGRESS)
    }

    /// Whether `local`'s egress rules name DNS names: its DNS goes through the agent's proxy.
    pub fn uses_fqdn(&self, local: u32) -> bool {
        self.fqdn_flag(local, DIRECTION_EGRESS)
    }

    /// The DNS-name selector of an identity.
    pub fn fqdn_selector(&self, identity: u32) -> Option<&FqdnSelector> {
        let found = self.fqdn.iter().find(|(_, id)| **id == identity);
        found.map(|(selector, _)| selector)
    }

    /// The identity the kernel gives a remote address: a workload's own address first, then the
    /// longest prefix of the LPM cache, else the world.
    pub fn remote_identity(&self, addr: IpAddr, workloads: &[WorkloadInfo]) -> u32 {
        let addr = addr.to_canonical();
        if let Some(w) = workloads
            .iter()
            .find(|w| w.addresses.iter().any(|a| a.to_canonical() == addr))
        {
            return w.identity;
        }
        let containing = self.prefixes.iter().filter(|(net, _)| net.contains(&addr));
        containing
            .max_by_key(|(net, _)| net.prefix_len())
            .map_or(IDENTITY_WORLD, |(_, id)| *id)
    }
}

#[cfg(test)]
pub mod tests;
