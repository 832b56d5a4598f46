//! Every map of ward's kernel side. All are pinned by name so a restarted agent adopts them and the
//! kernel keeps enforcing while no agent runs.
use agent_common::{
    BackendKey, CgroupValue, ConnectingValue, EventLimitKey, EventLimitValue, FlowCountKey,
    FlowKey, IpcacheKey, IpcacheLpmData, IpcacheValue, ListenerKey, ListenerValue, OriginalDst,
    PolicyKey, PolicyValue, RedirectKey, ServiceAddr, ServiceKey, ServiceSocketKey, ServiceValue,
    Settings, SocketOwner, StateValue, TunnelConfig, UdpFlowValue, *,
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};

/// A map whose kernel name carries the ABI version, so a layout change never reuses old pins.
/// The attribute needs literals: the build fails unless they are the `agent_common::map_names`
/// constant of the same name (which holds them to the kernel's 15 bytes).
macro_rules! versioned_map {
    ($v1:literal, $v2:literal, pub static $name:ident: $ty:ty = $init:expr;) => {
        #[cfg_attr(not(feature = "abi-next"), map(name = $v1))]
        #[cfg_attr(feature = "abi-next", map(name = $v2))]
        pub static $name: $ty = $init;
        const _: () = assert!(
            same_name(
                map_names::$name,
                if cfg!(feature = "abi-next") { $v2 } else { $v1 }
            ),
            concat!(
                "the kernel name of ",
                stringify!($name),
                " is not map_names::",
                stringify!($name)
            )
        );
    };
}

versioned_map!(
    "ward_cgroup_v2",
    "ward_cgroup_v3",
    pub static CGROUPS: HashMap<u64, CgroupValue> = HashMap::pinned(MAX_CGROUPS, BPF_F_NO_PREALLOC);
);

versioned_map!(
    "ward_policy_v2",
    "ward_policy_v3",
    pub static POLICY: HashMap<PolicyKey, PolicyValue> =
        HashMap::pinned(MAX_POLICY_MAP, BPF_F_NO_PREALLOC);
);

versioned_map!(
    "ward_ipcache_v2",
    "ward_ipcache_v3",
    pub static IPCACHE: HashMap<IpcacheKey, IpcacheValue> =
        HashMap::pinned(MAX_IPCACHE, BPF_F_NO_PREALLOC);
);

versioned_map!(
    "ward_iplpm_v2",
    "ward_iplpm_v3",
    pub static IPCACHE_LPM: LpmTrie<IpcacheLpmData, IpcacheValue> =
        LpmTrie::pinned(MAX_IPCACHE_PREFIXES, 0);
);

versioned_map!(
    "ward_svc_v2",
    "ward_svc_v3",
    pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
        HashMap::pinned(MAX_SERVICE_FRONTENDS, BPF_F_NO_PREALLOC);
);

versioned_map!(
    "ward_backend_v2",
    "ward_backend_v3",
    pub static BACKENDS: HashMap<BackendKey, ServiceAddr> =
        HashMap::pinned(MAX_SERVICE_BACKENDS_TOTAL, BPF_F_NO_PREALLOC);
);

versioned_map!(
    "ward_svcsock_v2",
    "ward_svcsock_v3",
    pub static SERVICE_SOCKETS: LruHashMap<ServiceSocketKey, ServiceAddr> =
        LruHashMap::pinned(MAX_SERVICE_SOCKETS, 0);
);

versioned_map!(
    "ward_state_v2",
    "ward_state_v3",
    pub static STATE: Array<StateValue> = Array::pinned(1, 0);
);

versioned_map!(
    "ward_conn_v2",
    "ward_conn_v3",
    pub static CONNECTING: LruHashMap<FlowKey, ConnectingValue> =
        LruHashMap::pinned(MAX_CONNECTING, 0);
);

versioned_map!(
    "ward_listen_v2",
    "ward_listen_v3",
    pub static LISTENERS: LruHashMap<ListenerKey, ListenerValue> =
        LruHashMap::pinned(MAX_LISTENERS, 0);
);

/// [`map_names::SOCKET_OWNERS`]: one [`SocketOwner`] in each bound socket's own storage. A
/// BTF map (socket storage has no other kind), pinned by the agent under its fixed name.
#[btf_map(name = "ward_sockowner")]
pub static SOCKET_OWNERS: SkStorage<SocketOwner> = SkStorage::new();
const _: () = assert!(
    same_name(map_names::SOCKET_OWNERS, "ward_sockowner"),
    "the kernel name of SOCKET_OWNERS is not map_names::SOCKET_OWNERS"
);

versioned_map!(
    "ward_redir_v2",
    "ward_redir_v3",
    pub static REDIRECTS: LruHashMap<RedirectKey, OriginalDst> =
        LruHashMap::pinned(MAX_REDIRECTS, 0);
);

versioned_map!(
    "ward_certd_v2",
    "ward_certd_v3",
    pub static CERTIFIED: HashMap<u32, u32> = HashMap::pinned(MAX_CERTIFIED, BPF_F_NO_PREALLOC);
);

versioned_map!(
    "ward_dnsaddr_v2",
    "ward_dnsaddr_v3",
    pub static LEARNED: HashMap<LearnedKey, LearnedValue> =
        HashMap::pinned(MAX_LEARNED, BPF_F_NO_PREALLOC);
);

versioned_map!(
    "ward_dnsname_v2",
    "ward_dnsname_v3",
    pub static DNS_NAMES: HashMap<u32, DnsName> = HashMap::pinned(MAX_DNS_NAMES, BPF_F_NO_PREALLOC);
);

versioned_map!(
    "ward_dnsprx_v2",
    "ward_dnsprx_v3",
    pub static DNS_PROXY: Array<DnsProxyConfig> = Array::pinned(1, 0);
);

versioned_map!(
    "ward_rdsock_v2",
    "ward_rdsock_v3",
    pub static REDIRECTED_SOCKETS: LruHashMap<u64, RedirectedSocket> =
        LruHashMap::pinned(MAX_REDIRECTED_SOCKETS, 0);
);

versioned_map!(
    "ward_dnsflow_v2",
    "ward_dnsflow_v3",
    pub static DNS_FLOWS: LruHashMap<RedirectKey, DnsFlow> =
        LruHashMap::pinned(MAX_REDIRECTED_SOCKETS, 0);
);

versioned_map!(
    "ward_tunnel_v2",
    "ward_tunnel_v3",
    pub static TUNNEL: Array<TunnelConfig> = Array::pinned(1, 0);
);

versioned_map!(
    "ward_udpflow_v2",
    "ward_udpflow_v3",
    pub static UDP_FLOWS: LruHashMap<FlowKey, UdpFlowValue> = LruHashMap::pinned(MAX_UDP_FLOWS, 0);
);

versioned_map!(
    "ward_evlimit_v2",
    "ward_evlimit_v3",
    pub static EVENT_LIMITS: LruHashMap<EventLimitKey, EventLimitValue> =
        LruHashMap::pinned(MAX_EVENT_LIMITS, 0);
);

versioned_map!(
    "ward_events_v2",
    "ward_events_v3",
    pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);
);

versioned_map!(
    "ward_flowcnt_v2",
    "ward_flowcnt_v3",
    pub static FLOW_COUNTS: LruPerCpuHashMap<FlowCountKey, u64> =
        LruPerCpuHashMap::pinned(MAX_FLOW_COUNTS, 0);
);

versioned_map!(
    "ward_counter_v2",
    "ward_counter_v3",
    pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counters::COUNT, 0);
);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, written only by programs on this CPU.
        unsafe { *c += 1 };
    }
}

/// The policy generation in force. Map keys carry its low bit.
#[inline(always)]
pub fn generation() -> u32 {
    match STATE.get(0) {
        Some(s) => s.generation,
        None => 0,
    }
}

/// Whether the generation in force has Services: otherwise no call needs a service-map lookup.
#[inline(always)]
pub fn has_services() -> bool {
    match STATE.get(0) {
        Some(s) => s.flags & STATE_FLAG_SERVICES != 0,
        None => false,
    }
}

/// Where connections that must go through the mTLS tunnel are redirected, if a tunnel runs.
#[inline(always)]
pub fn tunnel() -> Option<TunnelConfig> {
    TUNNEL.get(0).copied().filter(|t| t.enabled != 0)
}

/// Whether the agent holds the workload certificate of local identity `identity`.
#[inline(always)]
pub fn certified(identity: u32) -> bool {
    // SAFETY: only tested for presence.
    unsafe { CERTIFIED.get(identity) }.is_some()
}

/// Identity of a local cgroup, if it belongs to a workload.
#[inline(always)]
pub fn cgroup_identity(cgroup_id: u64) -> Option<u32> {
    // SAFETY: the value is copied out before the program can be preempted.
    unsafe { CGROUPS.get(cgroup_id) }.map(|v| v.identity)
}

versioned_map!(
    "ward_setting_v2",
    "ward_setting_v3",
    pub static SETTINGS: Array<Settings> = Array::pinned(1, 0);
);

/// The workload a cgroup belongs to: its own mapping, else that of its nearest mapped ancestor
/// (`ancestor(level)` gives the id of the cgroup's ancestor at that level, 0 past its depth), so
/// a new child of a workload's cgroup is that workload from its first syscall.
#[inline(always)]
pub fn workload(cgroup_id: u64, ancestor: impl Fn(i32) -> u64) -> Option<u32> {
    if let Some(identity) = cgroup_identity(cgroup_id) {
        return Some(identity);
    }
    let mut level = MAX_CGROUP_DEPTH as i32;
    while level > 0 {
        let id = ancestor(level);
        if id != 0 && id != cgroup_id {
            if let Some(identity) = cgroup_identity(id) {
                return Some(identity);
            }
        }
        level -= 1;
    }
    None
}

/// Whether traffic of a cgroup that no workload maps is refused (`unmappedCgroups: deny`): any
/// cgroup below the root the programs are attached to.
#[inline(always)]
pub fn unmapped_refused(cgroup_id: u64) -> bool {
    match SETTINGS.get(0) {
        Some(s) => s.unmapped == UNMAPPED_DENY && s.root_cgroup != cgroup_id,
        None => false,
    }
}
