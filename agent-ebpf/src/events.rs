//! Verdict events to user space, rate-limited per flow so a flood cannot drown the agent.
use agent_common::*;
use aya_ebpf::helpers::bpf_ktime_get_ns;

use crate::maps::{count, EVENTS, EVENT_LIMITS};

#[inline(always)]
fn within_budget(ev: &VerdictEvent, now: u64) -> bool {
    let key = EventLimitKey {
        local_identity: ev.local_identity,
        remote_identity: ev.remote_identity,
        remote_addr: ev.remote_addr,
        remote_port: ev.remote_port,
        protocol: ev.protocol,
        direction: ev.direction,
        verdict: ev.verdict,
        _pad: [0; 3],
    };
    match EVENT_LIMITS.get_ptr_mut(key) {
        Some(limit) => {
            // SAFETY: an LRU map value; concurrent writers can only make the budget a little
            // looser, never unbounded.
            let limit = unsafe { &mut *limit };
            if now.wrapping_sub(limit.window_start_ns) > EVENT_WINDOW_NS {
                limit.window_start_ns = now;
                limit.count = 1;
                true
            } else if limit.count < EVENT_BURST {
                limit.count += 1;
                true
            } else {
                false
            }
        }
        None => {
            let fresh = EventLimitValue {
                window_start_ns: now,
                count: 1,
                _pad: 0,
            };
            let _ = EVENT_LIMITS.insert(key, fresh, 0);
            true
        }
    }
}

#[inline(always)]
pub fn emit(mut ev: VerdictEvent) {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if !within_budget(&ev, now) {
        count(counters::EVENTS_SHED);
        return;
    }
    ev.timestamp_ns = now;
    if EVENTS.output::<VerdictEvent>(&ev, 0).is_err() {
        count(counters::EVENTS_LOST);
    }
}
