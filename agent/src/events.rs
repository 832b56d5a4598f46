//! Verdicts from the kernel, logged as one structured line each that names the workloads, the
//! policy and the rule that decided: refusals and audits as they come through the ring buffer,
//! allowed flows from the per-CPU counts the kernel keeps, read every [`COUNT_PERIOD`] (one
//! record per flow and period, with how many connections or datagram flows it counted).
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, RwLock},
    time::Duration,
};

use agent_common::{
    reasons, FlowCountKey, VerdictEvent, DIRECTION_EGRESS, IDENTITY_HOST, IDENTITY_WORLD,
    PROTO_ANY, VERDICT_NO_TUNNEL,
};
use aya::maps::{MapData, PerCpuHashMap, RingBuf};
use tokio::io::{unix::AsyncFd, Interest};

use crate::{
    flows::{FlowHub, FlowRecord},
    metrics::{Metrics, VerdictLabels},
    policy::{self, Compiled, RuleInfo, WorkloadInfo},
};

/// What user space knows to turn numbers in events into names; replaced on every policy apply.
#[derive(Default)]
pub struct Names {
    rules: BTreeMap<u32, RuleInfo>,
    /// identity → (display name, workload name if it is one)
    identities: BTreeMap<u32, (String, Option<String>)>,
    /// A Service's cluster IP (mapped) and port → `<namespace>/<name>`.
    services: BTreeMap<([u8; 16], u16), String>,
}

pub type SharedNames = Arc<RwLock<Names>>;

impl Names {
    pub fn new(
        compiled: &Compiled,
        workloads: &[WorkloadInfo],
        services: &BTreeMap<([u8; 16], u16), String>,
    ) -> Self {
        let mut identities = BTreeMap::new();
        for (net, id) in &compiled.prefixes {
            identities.insert(*id, (net.to_string(), None));
        }
        for w in workloads {
            identities.insert(w.identity, (w.spiffe_id.clone(), Some(w.name.clone())));
        }
        Names {
            rules: compiled.rules.clone(),
            identities,
            services: services.clone(),
        }
    }

    /// The display name of identity `id` (a SPIFFE ID, a prefix, `world`, `host`) and its
    /// workload's name: a local workload's own, a peer's SPIFFE ID; empty for no workload.
    pub fn identity(&self, id: u32) -> (String, String) {
        match (id, self.identities.get(&id)) {
            (_, Some((name, workload))) => (name.clone(), workload.clone().unwrap_or_default()),
            (IDENTITY_WORLD, None) => ("world".into(), String::new()),
            (IDENTITY_HOST, None) => ("host".into(), String::new()),
            (id, None) => match crate::dns::name_of(id) {
                Some(name) => (format!("dns:{name}"), String::new()),
                None => (format!("identity:{id}"), String::new()),
            },
        }
    }

    /// The Service a translated call went to (`<namespace>/<name>`, or its cluster IP and port
    /// when no longer known); empty when the call went to no Service.
    fn service(&self, addr: [u8; 16], port: u16, family: u8) -> String {
        if addr == [0; 16] {
            return String::new();
        }
        match self.services.get(&(addr, port)) {
            Some(name) => name.clone(),
            None => match address(addr, family) {
                Some(IpAddr::V6(a)) => format!("[{a}]:{port}"),
                Some(a) => format!("{a}:{port}"),
                None => String::new(),
            },
        }
    }
}

fn parse(bytes: &[u8]) -> Option<VerdictEvent> {
    (bytes.len() >= std::mem::size_of::<VerdictEvent>())
        // SAFETY: long enough, and every bit pattern is a valid `VerdictEvent`.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<VerdictEvent>()) })
}

fn address(raw: [u8; 16], family: u8) -> Option<IpAddr> {
    if raw == [0; 16] {
        return None;
    }
    let v6 = Ipv6Addr::from(raw);
    Some(match (family, v6.to_ipv4_mapped()) {
        (4, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    })
}

fn record(names: &Names, ev: &VerdictEvent, count: u64) -> FlowRecord {
    let (local, local_workload) = names.identity(ev.local_identity);
    let (remote, remote_workload) = names.identity(ev.remote_identity);
    let show = |raw| address(raw, ev.family).map_or_else(|| "-".to_string(), |a| a.to_string());
    let egress = ev.direction == DIRECTION_EGRESS;
    let (src, src_workload, dst, dst_workload) = if egress {
        (local, local_workload, remote, remote_workload)
    } else {
        (remote, remote_workload, local, local_workload)
    };
    let (src_addr, dst_addr, dst_port) = if egress {
        (show(ev.local_addr), show(ev.remote_addr), ev.remote_port)
    } else {
        (show(ev.remote_addr), show(ev.local_addr), ev.local_port)
    };
    let (policy, rule) = match names.rules.get(&ev.rule) {
        Some(r) => (r.policy.clone(), r.rule.clone()),
        None => ("-".into(), "-".into()),
    };
    FlowRecord {
        time: timestamp(),
        verdict: policy::verdict_name(ev.verdict).into(),
        direction: policy::direction_name(ev.direction).into(),
        policy,
        rule,
        src,
        src_workload,
        dst,
        dst_workload,
        src_addr,
        dst_addr,
        // An ICMP message's "port" is its type.
        dst_port: policy::icmp_type_of(ev.protocol, dst_port).map_or(dst_port, u16::from),
        protocol: protocol_name(ev.protocol),
        reason: match (ev.verdict, ev.reason) {
            (VERDICT_NO_TUNNEL, reasons::NONE) if egress => {
                "mtls required: this node runs no tunnel".into()
            }
            (VERDICT_NO_TUNNEL, reasons::NONE) => "mtls required: plaintext refused".into(),
            (_, reason) => reason_text(reason).into(),
        },
        service: names.service(ev.service_addr, ev.service_port, ev.family),
        count,
    }
}

/// A counted flow as the event the kernel would have sent for it (its ephemeral port 0).
fn counted_event(key: &FlowCountKey) -> VerdictEvent {
    VerdictEvent {
        local_identity: key.local_identity,
        remote_identity: key.remote_identity,
        rule: key.rule,
        local_port: key.local_port,
        remote_port: key.remote_port,
        local_addr: key.local_addr,
        remote_addr: key.remote_addr,
        family: key.family,
        protocol: key.protocol,
        direction: key.direction,
        verdict: key.verdict,
        service_addr: key.service_addr,
        service_port: key.service_port,
        ..Default::default()
    }
}

/// The protocol as flow records name it: policy's name, or the number of one policy cannot name
/// (`unparsed` for a packet the kernel could not parse).
fn protocol_name(protocol: u8) -> String {
    match (protocol, policy::protocol_name(protocol)) {
        (PROTO_ANY, _) => "unparsed".into(),
        (other, "other") => format!("ip-proto-{other}"),
        (_, name) => name.into(),
    }
}

/// Why the kernel refused a packet no rule decided (fail closed).
fn reason_text(reason: u8) -> &'static str {
    match reason {
        reasons::NONE => "",
        reasons::PROTOCOL => "fail closed: a protocol no rule can allow",
        reasons::HEADER_CHAIN => "fail closed: IPv6 extension-header chain too long to walk",
        reasons::MALFORMED => "fail closed: malformed or truncated header",
        reasons::FRAGMENT => "fail closed: fragment without a transport header",
        reasons::UNMAPPED_CGROUP => "fail closed: cgroup not mapped to a workload yet",
        reasons::ICMP_ERROR => "fail closed: ICMP error about no allowed flow",
        reasons::NO_BACKEND => "the Service has no ready backend",
        reasons::NO_CERTIFICATE => "mtls: the agent holds no certificate for this workload yet",
        _ => "fail closed",
    }
}

/// Seconds since the epoch with microseconds, as flow records carry it.
pub fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:06}", now.as_secs(), now.subsec_micros())
}

/// The verdict log line of a flow record.
pub fn log(r: &FlowRecord) {
    tracing::info!(
        target: "ward::verdict",
        verdict = %r.verdict,
        direction = %r.direction,
        policy = %r.policy,
        rule = %r.rule,
        src = %r.src,
        src_workload = %r.src_workload,
        dst = %r.dst,
        dst_workload = %r.dst_workload,
        src_addr = %r.src_addr,
        dst_addr = %r.dst_addr,
        dst_port = r.dst_port,
        protocol = %r.protocol,
        reason = %r.reason,
        service = %r.service,
        count = r.count,
        "verdict"
    );
}

/// One verdict record to the log, the metrics and `ward flows`.
fn publish(r: FlowRecord, hub: &FlowHub, metrics: &Metrics) {
    log(&r);
    metrics
        .verdict_events
        .get_or_create(&VerdictLabels {
            direction: r.direction.clone(),
            verdict: r.verdict.clone(),
            policy: r.policy.clone(),
        })
        .inc_by(r.count);
    hub.publish(r);
}

/// How often the allowed-flow counts are read.
pub const COUNT_PERIOD: Duration = Duration::from_secs(1);

/// The allowed-flow counts as last read, to report what each flow added since.
#[derive(Default)]
struct Tally {
    seen: BTreeMap<FlowCountKey, u64>,
}

impl Tally {
    /// Takes one reading (each flow's total over all CPUs) and returns what each flow added since
    /// the last. A flow the kernel evicted and counted again starts over, so a total below the last
    /// one is all new; flows gone from the reading are forgotten.
    fn update(
        &mut self,
        reading: impl IntoIterator<Item = (FlowCountKey, u64)>,
    ) -> Vec<(FlowCountKey, u64)> {
        let mut added = Vec::new();
        let mut now = BTreeMap::new();
        for (key, total) in reading {
            let before = self.seen.get(&key).copied().unwrap_or(0);
            let delta = if total >= before {
                total - before
            } else {
                total
            };
            if delta > 0 {
                added.push((key, delta));
            }
            now.insert(key, total);
        }
        self.seen = now;
        added
    }
}

/// Reads the allowed-flow counts every [`COUNT_PERIOD`] until the agent stops, on a thread of its
/// own (each reading is a few syscalls per flow).
pub fn count_flows(
    counts: PerCpuHashMap<MapData, FlowCountKey, u64>,
    names: SharedNames,
    hub: Arc<FlowHub>,
    metrics: Arc<Metrics>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ward-flows".into())
        .spawn(move || {
            let mut tally = Tally::default();
            loop {
                std::thread::sleep(COUNT_PERIOD);
                let reading = counts.iter().filter_map(|entry| match entry {
                    Ok((key, per_cpu)) => Some((key, per_cpu.iter().sum::<u64>())),
                    // A flow evicted between the key and its value: counted again next time.
                    Err(_) => None,
                });
                let added = tally.update(reading);
                let names = names.read().expect("names lock poisoned");
                for (key, count) in added {
                    publish(record(&names, &counted_event(&key), count), &hub, &metrics);
                }
            }
        })
}

/// Reads the ring buffer until the agent stops.
pub async fn run(
    ring: RingBuf<MapData>,
    names: SharedNames,
    hub: Arc<FlowHub>,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd, which stays open and the same for its whole life.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let names = names.read().expect("names lock poisoned");
        while let Some(item) = ring.next() {
            let Some(ev) = parse(&item) else {
                tracing::warn!(len = item.len(), "short verdict event ignored");
                continue;
            };
            publish(record(&names, &ev, 1), &hub, &metrics);
        }
        drop(names);
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn addresses_render_in_the_family_the_workload_used() {
        let mapped = agent_common::map_v4([127, 0, 0, 1]);
        assert_eq!(address(mapped, 4), Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!(
            address(mapped, 6).map(|a| a.to_string()),
            Some("::ffff:127.0.0.1".into())
        );
        assert_eq!(address([0; 16], 4), None);
    }

    #[test]
    fn fail_closed_refusals_name_their_protocol_type_and_reason() {
        let names = Names::default();
        let refusal = |protocol, remote_port, reason| VerdictEvent {
            protocol,
            remote_port,
            reason,
            direction: DIRECTION_EGRESS,
            verdict: agent_common::VERDICT_DENY,
            ..Default::default()
        };
        let icmp = record(
            &names,
            &refusal(
                agent_common::PROTO_ICMP,
                agent_common::icmp_type_port(8),
                reasons::NONE,
            ),
            1,
        );
        assert_eq!((icmp.protocol.as_str(), icmp.dst_port), ("icmp", 8));
        let raw = record(&names, &refusal(253, 0, reasons::PROTOCOL), 1);
        assert_eq!(raw.protocol, "ip-proto-253");
        assert_eq!(raw.reason, "fail closed: a protocol no rule can allow");
        let chain = record(&names, &refusal(PROTO_ANY, 0, reasons::HEADER_CHAIN), 1);
        assert_eq!(chain.protocol, "unparsed");
        assert!(
            chain.reason.contains("extension-header chain"),
            "{}",
            chain.reason
        );
        let lite = record(
            &names,
            &refusal(agent_common::PROTO_UDPLITE, 53, reasons::PROTOCOL),
            1,
        );
        assert_eq!((lite.protocol.as_str(), lite.dst_port), ("udplite", 53));
    }

    #[test]
    fn counted_flows_report_what_they_added_since_the_last_reading() {
        let flow = |port| FlowCountKey {
            remote_port: port,
            verdict: agent_common::VERDICT_ALLOW,
            ..Default::default()
        };
        let mut tally = Tally::default();
        assert_eq!(tally.update([(flow(80), 3)]), [(flow(80), 3)]);
        assert_eq!(
            tally.update([(flow(80), 5), (flow(443), 1)]),
            [(flow(80), 2), (flow(443), 1)]
        );
        // Unchanged: nothing to report. Evicted and counted again: all of it is new.
        assert_eq!(tally.update([(flow(80), 5), (flow(443), 1)]), []);
        assert_eq!(tally.update([(flow(80), 2)]), [(flow(80), 2)]);
        // Forgotten once gone, so its return is new.
        assert_eq!(tally.update([(flow(443), 1)]), [(flow(443), 1)]);
    }

    #[test]
    fn a_counted_flow_is_recorded_like_its_event_with_its_service_port() {
        let names = Names::default();
        let ingress = FlowCountKey {
            local_port: 8080,
            remote_addr: agent_common::map_v4([10, 0, 0, 7]),
            family: 4,
            protocol: agent_common::PROTO_TCP,
            direction: agent_common::DIRECTION_INGRESS,
            verdict: agent_common::VERDICT_ALLOW,
            ..Default::default()
        };
        let r = record(&names, &counted_event(&ingress), 12);
        assert_eq!(
            (
                r.verdict.as_str(),
                r.direction.as_str(),
                r.src_addr.as_str(),
                r.dst_port,
                r.count
            ),
            ("allow", "ingress", "10.0.0.7", 8080, 12)
        );
    }

    #[test]
    fn short_records_are_not_parsed() {
        assert!(parse(&[0u8; 10]).is_none());
        assert!(parse(&[0u8; std::mem::size_of::<VerdictEvent>()]).is_some());
    }
}
