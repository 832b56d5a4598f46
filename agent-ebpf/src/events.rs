//! Verdicts to user space: refusals and audits as events, rate-limited per flow so a flood cannot
//! drown the agent; allowed flows as per-CPU counts the agent reads periodically, so an allowed
//! connection never wakes user space.
use agent_common::*;

use crate::maps::{count, EVENTS, EVENT_LIMITS, FLOW_COUNTS};

/// Counts one allowed flow (its first packet or its `connect()`).
#[inline(always)]
pub fn tally(flow: &FlowCountKey) {
    match FLOW_COUNTS.get_ptr_mut(flow) {
        // SAFETY: this CPU's slot of a per-CPU value; only programs on this CPU write it.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = FLOW_COUNTS.insert(flow, 1, 0);
        }
    }
}

#[inline(always)]
fn within_budget(flow: &EventLimitKey, now: u64) -> bool {
    match EVENT_LIMITS.get_ptr_mut(flow) {
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
            let _ = EVENT_LIMITS.insert(flow, fresh, 0);
            true
        }
    }
}

/// Emits one verdict event for `flow` if its budget allows. The event is written in place in the
/// ring buffer (never built on the stack: the 512-byte stack of older kernels counts every
/// frame): `flow`'s fields first (its port as the remote port), then `fill` sets the rest.
#[inline(always)]
pub fn emit(flow: &EventLimitKey, rule: u32, fill: impl FnOnce(&mut VerdictEvent)) {
    let now = crate::context::now_ns();
    if !within_budget(flow, now) {
        count(counters::EVENTS_SHED);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<VerdictEvent>(0) else {
        count(counters::EVENTS_LOST);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, writable VerdictEvent; zeroing makes every field
    // (padding included) initialised before a reference is taken.
    let ev = unsafe {
        core::ptr::write_bytes(ev, 0, 1);
        &mut *ev
    };
    ev.timestamp_ns = now;
    ev.local_identity = flow.local_identity;
    ev.remote_identity = flow.remote_identity;
    ev.rule = rule;
    ev.remote_addr = flow.remote_addr;
    ev.remote_port = flow.port;
    ev.protocol = flow.protocol;
    ev.direction = flow.direction;
    ev.verdict = flow.verdict;
    fill(ev);
    entry.submit(0);
}
