//! The policy decision: a bounded number of O(1) lookups, independent of the number of rules.
//! User space mirrors this exactly (`Compiled::decide`), so trace and enforcement agree.
use agent_common::*;

use crate::maps::POLICY;

pub struct Decision {
    pub verdict: u8,
    pub rule: u32,
    /// False when no policy selects the local workload in this direction: it is left alone.
    pub isolated: bool,
    /// Isolated, and an enforcing rule (allow or deny) matched the remote: no DNS name the address
    /// was learned from can change the verdict.
    pub settled: bool,
    /// Isolated, and the local workload's egress rules name DNS names ([`POLICY_FLAG_FQDN`]).
    pub fqdn: bool,
}

/// Bits of [`decide_packed`]'s answer.
const PACKED_ISOLATED: u64 = 1 << 8;
const PACKED_SETTLED: u64 = 1 << 9;
const PACKED_FQDN: u64 = 1 << 10;

/// [`decide`]'s answer from [`decide_packed`]'s.
#[inline(always)]
pub fn unpack(packed: u64) -> Decision {
    Decision {
        verdict: packed as u8,
        isolated: packed & PACKED_ISOLATED != 0,
        settled: packed & PACKED_SETTLED != 0,
        fqdn: packed & PACKED_FQDN != 0,
        rule: (packed >> 32) as u32,
    }
}

/// [`decide`]'s flow argument, packed: a BPF call takes at most five arguments.
#[inline(always)]
pub fn pack_flow(direction: u8, protocol: u8, port: u16) -> u32 {
    u32::from(direction) | (u32::from(protocol) << 8) | (u32::from(port) << 16)
}

/// The key whose entry says a policy selects `local` in `direction` (and names its default-deny
/// rules); the first lookup of every decision.
#[inline(always)]
fn isolation_key(local: u32, direction: u8, gen: u8) -> PolicyKey {
    PolicyKey {
        local_identity: local,
        remote_identity: REMOTE_ISOLATION,
        port: PORT_ANY,
        protocol: PROTO_ANY,
        direction,
        generation: gen,
        _pad: [0; 3],
    }
}

/// One policy lookup; `key` is reused between lookups so the stack holds a single key.
#[inline(always)]
fn lookup(key: &PolicyKey) -> Option<PolicyValue> {
    // SAFETY: the value is copied out at once.
    unsafe { POLICY.get(key) }.copied()
}

/// The ports a rule may name for a flow to `port` over `protocol`, most specific first: the port,
/// any port of the protocol, any protocol.
#[inline(always)]
fn port_keys(port: u16, protocol: u8) -> [(u16, u8); 3] {
    [
        (port, protocol),
        (PORT_ANY, protocol),
        (PORT_ANY, PROTO_ANY),
    ]
}

/// [`lookup`] of `key` at one of [`port_keys`].
#[inline(always)]
fn lookup_at(key: &mut PolicyKey, (port, protocol): (u16, u8)) -> Option<PolicyValue> {
    key.port = port;
    key.protocol = protocol;
    lookup(key)
}

/// Merges into `v` the entries of `key`'s remote at each of [`port_keys`] not skipped under
/// the isolation entry's flags `absent`. Unrolled, with no array on the frame: the connect hook's
/// frames share 512 bytes.
#[inline(always)]
fn merge_ports(
    key: &mut PolicyKey,
    port: u16,
    protocol: u8,
    absent: u32,
    any_remote: bool,
    v: &mut PolicyValue,
) {
    if let Some(e) = lookup_at(key, (port, protocol)) {
        merge(v, &e);
    }
    if !lookup_skipped(absent, any_remote, 1) {
        if let Some(e) = lookup_at(key, (PORT_ANY, protocol)) {
            merge(v, &e);
        }
    }
    if !lookup_skipped(absent, any_remote, 2) {
        if let Some(e) = lookup_at(key, (PORT_ANY, PROTO_ANY)) {
            merge(v, &e);
        }
    }
}

#[inline(always)]
fn merge(acc: &mut PolicyValue, v: &PolicyValue) {
    if acc.deny_rule == 0 {
        acc.deny_rule = v.deny_rule;
    }
    if acc.allow_rule == 0 && v.allow_rule != 0 {
        acc.allow_rule = v.allow_rule;
        acc.flags = v.flags;
    }
    if acc.audit_deny_rule == 0 {
        acc.audit_deny_rule = v.audit_deny_rule;
    }
    if acc.audit_allow_rule == 0 {
        acc.audit_allow_rule = v.audit_allow_rule;
    }
}

/// The policy decision for one flow. The lookups run in a BPF function of their own, with its
/// own stack frame, so each caller's frame stays small.
#[inline(always)]
pub fn decide(
    local: u32,
    remote: u32,
    direction: u8,
    protocol: u8,
    port: u16,
    gen: u8,
) -> Decision {
    unpack(decide_packed(
        local,
        remote,
        pack_flow(direction, protocol, port),
        gen,
    ))
}

/// [`decide`]'s lookups, with the flow packed ([`pack_flow`]) and the decision packed into one
/// register: rule in the high half, the flags of [`unpack`] in bits 8 to 10, the verdict below.
#[inline(never)]
pub fn decide_packed(local: u32, remote: u32, what: u32, gen: u8) -> u64 {
    decide_as::<true>(local, remote, &[0; MAX_LEARNED_SELECTORS], what, gen)
}

/// [`decide_packed`] for a remote that is also the DNS-name selectors `names` (0 ends them):
/// the entries of all merge as one peer's. Inlined into its two callers (each a BPF function of
/// its own): one frame less in the connect hook's chain, which 6.1's verifier holds to 512
/// bytes.
///
/// `SKIP`: skip the lookups the isolation entry says can only miss ([`lookup_skipped`]). The
/// learned-address path looks everything up: there the skipping's branches took the connect
/// hook's frames past the 512 bytes 6.1's verifier allows, and learned addresses are the rare
/// case.
#[inline(always)]
pub fn decide_as<const SKIP: bool>(
    local: u32,
    remote: u32,
    names: &[u32; MAX_LEARNED_SELECTORS],
    what: u32,
    gen: u8,
) -> u64 {
    let (direction, protocol, port) = (what as u8, (what >> 8) as u8, (what >> 16) as u16);
    let mut key = isolation_key(local, direction, gen);
    let Some(iso) = lookup(&key) else {
        return u64::from(VERDICT_ALLOW);
    };
    // Lookups of shapes the workload's entries never have are skipped ([`lookup_skipped`]).
    let absent = if SKIP { iso.flags } else { 0 };
    let mut v = PolicyValue::default();
    key.remote_identity = remote;
    merge_ports(&mut key, port, protocol, absent, false, &mut v);
    if !lookup_skipped(absent, true, 0) {
        key.remote_identity = IDENTITY_ANY;
        merge_ports(&mut key, port, protocol, absent, true, &mut v);
    }
    for &name in names {
        if name == 0 {
            break;
        }
        key.remote_identity = name;
        merge_ports(&mut key, port, protocol, absent, false, &mut v);
    }
    let mut flags = PACKED_ISOLATED;
    if iso.flags & POLICY_FLAG_FQDN != 0 {
        flags |= PACKED_FQDN;
    }
    if v.deny_rule != 0 || v.allow_rule != 0 {
        flags |= PACKED_SETTLED;
    }
    let (verdict, rule) = if v.deny_rule != 0 {
        (VERDICT_DENY, v.deny_rule)
    } else if iso.deny_rule != 0 && v.allow_rule == 0 {
        (VERDICT_DENY, iso.deny_rule)
    } else if v.audit_deny_rule != 0 {
        (VERDICT_AUDIT, v.audit_deny_rule)
    } else if iso.audit_deny_rule != 0 && v.allow_rule == 0 && v.audit_allow_rule == 0 {
        (VERDICT_AUDIT, iso.audit_deny_rule)
    } else if v.allow_rule != 0 {
        let verdict = if v.flags & POLICY_FLAG_MTLS != 0 {
            VERDICT_REDIRECT
        } else {
            VERDICT_ALLOW
        };
        (verdict, v.allow_rule)
    } else {
        (VERDICT_ALLOW, v.audit_allow_rule)
    };
    (u64::from(rule) << 32) | flags | u64::from(verdict)
}

/// The rule of a destination's ingress policy that requires `local`'s connections to `remote` at
/// `port` to go through the mTLS tunnel ([`DIRECTION_MTLS`] entries). One lookup when `local`
/// has no such demand.
#[inline(always)]
pub fn mtls_demand(local: u32, remote: u32, protocol: u8, port: u16, gen: u8) -> Option<u32> {
    let mut key = isolation_key(local, DIRECTION_MTLS, gen);
    lookup(&key)?;
    key.remote_identity = remote;
    port_keys(port, protocol)
        .into_iter()
        .find_map(|at| lookup_at(&mut key, at))
        .map(|e| e.allow_rule)
}

/// Whether a policy selects `local` in `direction`: one lookup.
#[inline(never)]
pub fn isolated(local: u32, direction: u8, gen: u8) -> bool {
    lookup(&isolation_key(local, direction, gen)).is_some()
}

impl Decision {
    /// Whether the packet or call is refused: an isolated workload's deny. A rule that requires
    /// mTLS cannot be met by a packet that did not come through the tunnel.
    #[inline(always)]
    pub fn refuses(&self) -> bool {
        self.isolated && (self.verdict == VERDICT_DENY || self.verdict == VERDICT_REDIRECT)
    }
}
