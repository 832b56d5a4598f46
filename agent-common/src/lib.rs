//! The ABI shared by ward's kernel programs and its user space.
//!
//! Every struct here crosses the kernel/user boundary through a BPF map or the ring buffer, so each
//! is `#[repr(C)]`, has explicit padding and a size assert. A change of layout bumps
//! [`ABI_VERSION`] and the version suffix of the map that holds it.
#![no_std]

/// Recorded in the state map and in every map name (`ward_<map>_v<ABI>`): a layout change bumps it,
/// so an upgraded agent builds a complete new set of maps beside the old one and switches the
/// programs over in place (see `docs/operations.md`). The `abi-next` feature builds the next layout
/// (a larger [`StateValue`]) so upgrade tests run against a real layout change.
#[cfg(not(feature = "abi-next"))]
pub const ABI_VERSION: u32 = 2;
#[cfg(feature = "abi-next")]
pub const ABI_VERSION: u32 = 3;

/// Numeric workload identity. The values below 256 are reserved; `ward_policy::identity` holds
/// the ranges of the allocated ones (workloads, then CIDRs).
pub type IdentityId = u32;
/// In a policy key: any remote identity.
pub const IDENTITY_ANY: IdentityId = 0;
/// This host's own addresses (and loopback) when no local listener names the workload behind them.
pub const IDENTITY_HOST: IdentityId = 1;
/// An address ward knows nothing about.
pub const IDENTITY_WORLD: IdentityId = 2;

/// Identities of DNS-name selectors (`fqdn`, `fqdnPattern` peers): one per distinct selector of a
/// policy set, named in policy keys like any peer. An address is never one; the connect hook
/// decides an address a workload learned from a name ([`LearnedValue`]) as each selector the name
/// matched.
pub const FIRST_FQDN_SELECTOR: IdentityId = 0xF000_0000;
pub const LAST_FQDN_SELECTOR: IdentityId = 0xF0FF_FFFF;
/// Identities that name a DNS name in verdict records: `FIRST_FQDN_NAME + id` of the name in the
/// DNS-name map. Never in a policy key.
pub const FIRST_FQDN_NAME: IdentityId = 0xF100_0000;
/// The largest name id (20 bits: the kernel carries it in a decision's spare bits).
pub const MAX_FQDN_NAME_ID: u32 = 0x000F_FFFF;
pub const LAST_FQDN_NAME: IdentityId = FIRST_FQDN_NAME + MAX_FQDN_NAME_ID;

/// In a policy key: the entry that says a local identity is selected (isolated) in a direction.
/// Its value names the default-deny rules of the selecting policies.
pub const REMOTE_ISOLATION: IdentityId = u32::MAX;

pub const DIRECTION_INGRESS: u8 = 0;
pub const DIRECTION_EGRESS: u8 = 1;
/// In a policy key: `local_identity`'s connections to `remote_identity` at `port` must go through
/// the mTLS tunnel, because the destination's ingress rule `allow_rule` requires it. The key
/// `(local, REMOTE_ISOLATION, PORT_ANY, PROTO_ANY)` in this direction is present when `local`
/// has any such demand, so the connect hook pays one lookup when it has none.
pub const DIRECTION_MTLS: u8 = 2;

/// In a policy key: any protocol (only with `port == PORT_ANY`).
pub const PROTO_ANY: u8 = 0;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;
pub const PROTO_UDPLITE: u8 = 136;
/// In a policy key of [`PROTO_ICMP`] or [`PROTO_ICMPV6`], the port stands for the message type:
/// `ICMP_TYPE_PORT_BASE + type`, so that type 0 (echo reply) is not [`PORT_ANY`].
pub const ICMP_TYPE_PORT_BASE: u16 = 0x100;

/// The policy-key port of an ICMP or ICMPv6 message type.
pub const fn icmp_type_port(icmp_type: u8) -> u16 {
    ICMP_TYPE_PORT_BASE + icmp_type as u16
}
/// In a policy key: any port.
pub const PORT_ANY: u16 = 0;

/// Map sizes. The policy map holds two generations at once during an update.
pub const MAX_POLICY_ENTRIES: u32 = 262_144;
pub const MAX_POLICY_MAP: u32 = 2 * MAX_POLICY_ENTRIES;
pub const MAX_CGROUPS: u32 = 65_536;
pub const MAX_IPCACHE: u32 = 2 * 65_536;
pub const MAX_IPCACHE_PREFIXES: u32 = 2 * 16_384;
pub const MAX_CONNECTING: u32 = 65_536;
pub const MAX_LISTENERS: u32 = 65_536;
pub const MAX_UDP_FLOWS: u32 = 65_536;
pub const MAX_EVENT_LIMITS: u32 = 65_536;
/// Allowed flows counted per CPU between two reads by the agent (least recently used go first).
pub const MAX_FLOW_COUNTS: u32 = 8_192;
pub const MAX_REDIRECTS: u32 = 65_536;
/// Local identities whose workload certificate the agent holds (the tunnel's redirect needs one).
pub const MAX_CERTIFIED: u32 = 65_536;
pub const EVENTS_RING_BYTES: u32 = 1 << 22;
/// Frontends (cluster IP, port, protocol) and backends in the service maps, for two generations.
pub const MAX_SERVICE_FRONTENDS: u32 = 2 * 32_768;
pub const MAX_SERVICE_BACKENDS_TOTAL: u32 = 2 * 131_072;
/// The most backends one frontend has.
pub const MAX_SERVICE_BACKENDS: u32 = 4_096;
/// Sockets translated to a backend, whose replies and `getpeername()` show the cluster IP.
pub const MAX_SERVICE_SOCKETS: u32 = 65_536;
/// (workload, address) pairs learned from DNS answers, for two generations.
pub const MAX_LEARNED: u32 = 2 * 65_536;
/// Names learned addresses came from.
pub const MAX_DNS_NAMES: u32 = 65_536;
/// Sockets sent to the agent (DNS to the proxy, connections to the tunnel) whose packets have
/// not yet filed them.
pub const MAX_REDIRECTED_SOCKETS: u32 = 65_536;

/// Per-flow event budget: at most this many verdict events per flow key and window.
pub const EVENT_BURST: u32 = 8;
pub const EVENT_WINDOW_NS: u64 = 1_000_000_000;

/// Map names as the kernel and the pin directory see them (at most 15 bytes).
pub mod map_names {
    macro_rules! names {
        ($v:literal) => {
            pub const VERSION_SUFFIX: &str = concat!("_v", $v);
            pub const CGROUPS: &str = concat!("ward_cgroup_v", $v);
            pub const POLICY: &str = concat!("ward_policy_v", $v);
            pub const IPCACHE: &str = concat!("ward_ipcache_v", $v);
            pub const IPCACHE_LPM: &str = concat!("ward_iplpm_v", $v);
            pub const STATE: &str = concat!("ward_state_v", $v);
            pub const CONNECTING: &str = concat!("ward_conn_v", $v);
            pub const LISTENERS: &str = concat!("ward_listen_v", $v);
            pub const UDP_FLOWS: &str = concat!("ward_udpflow_v", $v);
            pub const EVENT_LIMITS: &str = concat!("ward_evlimit_v", $v);
            pub const EVENTS: &str = concat!("ward_events_v", $v);
            pub const FLOW_COUNTS: &str = concat!("ward_flowcnt_v", $v);
            pub const COUNTERS: &str = concat!("ward_counter_v", $v);
            pub const REDIRECTS: &str = concat!("ward_redir_v", $v);
            pub const TUNNEL: &str = concat!("ward_tunnel_v", $v);
            pub const SETTINGS: &str = concat!("ward_setting_v", $v);
            pub const SERVICES: &str = concat!("ward_svc_v", $v);
            pub const BACKENDS: &str = concat!("ward_backend_v", $v);
            pub const SERVICE_SOCKETS: &str = concat!("ward_svcsock_v", $v);
            pub const CERTIFIED: &str = concat!("ward_certd_v", $v);
            pub const LEARNED: &str = concat!("ward_dnsaddr_v", $v);
            pub const DNS_NAMES: &str = concat!("ward_dnsname_v", $v);
            pub const DNS_PROXY: &str = concat!("ward_dnsprx_v", $v);
            pub const REDIRECTED_SOCKETS: &str = concat!("ward_rdsock_v", $v);
            pub const DNS_FLOWS: &str = concat!("ward_dnsflow_v", $v);
            /// Pins of maps that earlier agents of this ABI had and this one has not: removed
            /// once the agent has attached (pins of other ABI versions are removed in any case).
            /// Sockets were tagged by cookie (`socks`) and their binder recorded (`owner`) for
            /// sockops, which is gone; the tunnel's and the DNS proxy's sockets now share one
            /// record (`rdsock`, was `origdst` and `dnssock`).
            pub const RETIRED: [&str; 4] = [
                concat!("ward_socks_v", $v),
                concat!("ward_owner_v", $v),
                concat!("ward_origdst_v", $v),
                concat!("ward_dnssock_v", $v),
            ];
        };
    }
    /// The workload each socket was bound by, kept with the socket itself (socket storage, freed
    /// with it). Its name carries no ABI version: the kernel cannot list a socket storage map's
    /// entries, so an agent of another ABI could not carry them over, and its layout (one
    /// [`crate::SocketOwner`]) must never change.
    pub const SOCKET_OWNERS: &str = "ward_sockowner";
    /// Every map, for checks over all of them.
    pub const ALL: [&str; 25] = [
        CGROUPS,
        POLICY,
        IPCACHE,
        IPCACHE_LPM,
        STATE,
        CONNECTING,
        LISTENERS,
        UDP_FLOWS,
        EVENT_LIMITS,
        EVENTS,
        FLOW_COUNTS,
        COUNTERS,
        REDIRECTS,
        TUNNEL,
        SETTINGS,
        SERVICES,
        BACKENDS,
        SERVICE_SOCKETS,
        CERTIFIED,
        LEARNED,
        DNS_NAMES,
        DNS_PROXY,
        REDIRECTED_SOCKETS,
        DNS_FLOWS,
        SOCKET_OWNERS,
    ];
    #[cfg(not(feature = "abi-next"))]
    names!("2");
    #[cfg(feature = "abi-next")]
    names!("3");
}

/// Kernel program names (the ELF symbols), one per attach point.
pub mod program_names {
    pub const CONNECT4: &str = "ward_connect4";
    pub const CONNECT6: &str = "ward_connect6";
    pub const SENDMSG4: &str = "ward_sendmsg4";
    pub const SENDMSG6: &str = "ward_sendmsg6";
    pub const INGRESS: &str = "ward_ingress";
    pub const POST_BIND4: &str = "ward_postbind4";
    pub const POST_BIND6: &str = "ward_postbind6";
    pub const EGRESS: &str = "ward_egress";
    pub const RECVMSG4: &str = "ward_recvmsg4";
    pub const RECVMSG6: &str = "ward_recvmsg6";
    pub const GETPEERNAME4: &str = "ward_getpeer4";
    pub const GETPEERNAME6: &str = "ward_getpeer6";
    /// In attach order: a reply's source is translated back before a socket can be translated to
    /// a backend.
    pub const ALL: [&str; 12] = [
        POST_BIND4,
        POST_BIND6,
        RECVMSG4,
        RECVMSG6,
        GETPEERNAME4,
        GETPEERNAME6,
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        INGRESS,
        EGRESS,
    ];
    /// Programs earlier agents attached and this one does not: their pinned links are removed
    /// once this agent's programs are attached. `ward_sockops` named listeners and filed tunnel
    /// connections; the bind, connect and egress packet programs do that now.
    pub const RETIRED: [&str; 1] = ["ward_sockops"];
}

/// The kernel keeps 15 bytes of a program's or map's name (`BPF_OBJ_NAME_LEN` less its NUL): a
/// longer one would show truncated in `bpftool`, the verifier record and `ward status`, and a
/// map's would lose its ABI version there.
pub const KERNEL_NAME_MAX: usize = 15;

/// Whether every name fits [`KERNEL_NAME_MAX`].
const fn fit_the_kernel(names: &[&str]) -> bool {
    let mut i = 0;
    while i < names.len() {
        if names[i].len() > KERNEL_NAME_MAX {
            return false;
        }
        i += 1;
    }
    true
}

const _: () = assert!(
    fit_the_kernel(&program_names::ALL),
    "program name over 15 bytes"
);
const _: () = assert!(fit_the_kernel(&map_names::ALL), "map name over 15 bytes");

/// Whether two names are the same, at compile time: the kernel crate asserts with it that each
/// map's ELF name is the one in [`map_names`].
pub const fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Value of the cgroup map, keyed by cgroup id (`u64`, the cgroup directory's inode number).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupValue {
    pub identity: IdentityId,
    pub _pad: u32,
}

/// Key of the policy map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub local_identity: IdentityId,
    /// [`IDENTITY_ANY`], a concrete identity, or [`REMOTE_ISOLATION`].
    pub remote_identity: IdentityId,
    /// Host byte order; [`PORT_ANY`] for all ports.
    pub port: u16,
    pub protocol: u8,
    pub direction: u8,
    /// Low bit of the policy generation this entry belongs to (see [`StateValue`]).
    pub generation: u8,
    pub _pad: [u8; 3],
}

/// Value of the policy map. Each field holds the id of a rule that matches the key, 0 for none;
/// the kernel merges the values of the exact and wildcard lookups (deny wins, enforce before audit).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub deny_rule: u32,
    pub allow_rule: u32,
    pub audit_deny_rule: u32,
    pub audit_allow_rule: u32,
    /// [`POLICY_FLAG_MTLS`] when `allow_rule` requires mutual TLS; on an isolation entry,
    /// [`POLICY_FLAG_FQDN`] and the [`POLICY_FLAGS_ABSENT`].
    pub flags: u32,
}

pub const POLICY_FLAG_MTLS: u32 = 1;
/// On an egress isolation entry (`remote_identity == REMOTE_ISOLATION`): the local workload's
/// egress rules name DNS names, so its DNS goes through the agent's proxy and the addresses it
/// learned there count ([`LearnedKey`]).
pub const POLICY_FLAG_FQDN: u32 = 2;
/// On an isolation entry: no entry of its workload and direction names [`IDENTITY_ANY`] as the
/// remote, so a decision skips those lookups. The `NO_*` flags say what is absent, never what is
/// present: an entry without them (an older agent's) only makes the kernel look everything up.
pub const POLICY_FLAG_NO_ANY_REMOTE: u32 = 4;
/// On an isolation entry: no entry of its workload and direction is a protocol's any port
/// (`PORT_ANY` with a protocol).
pub const POLICY_FLAG_NO_ANY_PORT: u32 = 8;
/// On an isolation entry: no entry of its workload and direction but the isolation entry itself
/// is any protocol (`PROTO_ANY`).
pub const POLICY_FLAG_NO_ANY_PROTOCOL: u32 = 16;
/// The `NO_*` flags: which lookups of a decision find nothing (the policy compiler's last pass).
pub const POLICY_FLAGS_ABSENT: u32 =
    POLICY_FLAG_NO_ANY_REMOTE | POLICY_FLAG_NO_ANY_PORT | POLICY_FLAG_NO_ANY_PROTOCOL;

/// Whether a decision skips a lookup under its isolation entry's `flags`: the lookup of the
/// `n`th port key of a remote (0: the port, 1: the protocol's any port, 2: any protocol), of
/// [`IDENTITY_ANY`] when `any_remote`. Only lookups that cannot find an entry are skipped.
#[inline(always)]
pub const fn lookup_skipped(flags: u32, any_remote: bool, n: usize) -> bool {
    (any_remote && flags & POLICY_FLAG_NO_ANY_REMOTE != 0)
        || (n == 1 && flags & POLICY_FLAG_NO_ANY_PORT != 0)
        || (n == 2 && flags & POLICY_FLAG_NO_ANY_PROTOCOL != 0)
}

/// The most name selectors one learned address is decided as (a name matched by more selectors of
/// one workload's policy keeps the first ones, in selector order).
pub const MAX_LEARNED_SELECTORS: usize = 4;

/// Key of the learned-address map: an address (IPv4 mapped) a workload's DNS answer gave, in one
/// generation (the selector identities follow the policy generation).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LearnedKey {
    pub generation: u8,
    pub _pad: [u8; 3],
    pub local_identity: IdentityId,
    pub addr: [u8; 16],
}

/// Value of the learned-address map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnedValue {
    /// `CLOCK_BOOTTIME` (the kernel's `bpf_ktime_get_boot_ns`) after which the address no longer
    /// counts: the answer's TTL within the agent's bounds.
    pub expires_ns: u64,
    /// The name selectors it is decided as, 0 past the last.
    pub selectors: [IdentityId; MAX_LEARNED_SELECTORS],
    /// The names it was learned from, most recent first, as verdict records name them
    /// ([`FIRST_FQDN_NAME`] + id); 0 past the last.
    pub names: [IdentityId; MAX_LEARNED_NAMES],
}

/// The most names one learned address keeps (the ones learned last).
pub const MAX_LEARNED_NAMES: usize = 4;

/// The longest DNS name in presentation form, without the final dot.
pub const MAX_DNS_NAME: usize = 253;

/// Value of the DNS-name map (key: the name's id): the names learned addresses came from, pinned
/// with them so a restarted agent can name and re-decide what the kernel holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsName {
    pub len: u16,
    pub name: [u8; MAX_DNS_NAME + 1],
}

impl Default for DnsName {
    fn default() -> Self {
        DnsName {
            len: 0,
            name: [0; MAX_DNS_NAME + 1],
        }
    }
}

/// Index 0 of the DNS proxy map: where the connect and sendmsg hooks send the DNS (port 53) of
/// workloads whose egress rules name DNS names: the agent's proxy, on loopback `port` in the
/// caller's own network namespace. Without `enabled`, or when no socket listens there (no agent
/// runs), the call goes to the resolver it names, as policy decides it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsProxyConfig {
    /// Host byte order.
    pub port: u16,
    pub enabled: u8,
    pub _pad: [u8; 5],
}

/// A socket the connect or sendmsg hook sent to the agent (its DNS to the proxy, or a connection
/// to the mTLS tunnel), keyed by socket cookie: where it was going, and its network namespace.
/// The egress packet program files it under the packet's 4-tuple ([`RedirectKey`]), where the
/// agent finds it: as a [`DnsFlow`] for the proxy, as an [`OriginalDst`] for the tunnel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectedSocket {
    pub netns: u64,
    pub original: OriginalDst,
}

/// A query on its way to the proxy, keyed by its 4-tuple and namespace ([`RedirectKey`]): where it
/// was going, and when its packet left (`CLOCK_BOOTTIME`). The proxy takes only a fresh record, so
/// a port a workload once used names nobody once its packets stop.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsFlow {
    pub original: OriginalDst,
    pub filed_ns: u64,
}

/// Key of the exact IP cache: an IPv6 address, or an IPv4 address mapped (`::ffff:a.b.c.d`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheKey {
    pub generation: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

/// Data of the LPM IP cache key: generation byte, then the (mapped) address. The prefix length
/// counts the generation's 8 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheLpmData {
    pub generation: u8,
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: IdentityId,
}

/// Index 0 of the state array: which generation of the policy, IP cache and Services is in force,
/// written in one piece at a switch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateValue {
    pub generation: u32,
    pub abi_version: u32,
    /// [`STATE_FLAG_SERVICES`] when the generation in force has Services: without it no call is
    /// looked up in the service maps.
    pub flags: u32,
    pub _pad: u32,
    #[cfg(feature = "abi-next")]
    pub reserved: [u32; 2],
}

pub const STATE_FLAG_SERVICES: u32 = 1;

impl StateValue {
    pub const fn new(generation: u32, flags: u32) -> Self {
        StateValue {
            generation,
            abi_version: ABI_VERSION,
            flags,
            _pad: 0,
            #[cfg(feature = "abi-next")]
            reserved: [0; 2],
        }
    }
}

/// Index 0 of the settings map: how the kernel treats what the agent has not described.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// The cgroup the programs are attached to (its id, the directory's inode number).
    pub root_cgroup: u64,
    /// [`UNMAPPED_ALLOW`] or [`UNMAPPED_DENY`]: traffic of a cgroup below the root that neither
    /// it nor any ancestor maps to a workload.
    pub unmapped: u8,
    pub _pad: [u8; 7],
}

pub const UNMAPPED_ALLOW: u8 = 0;
pub const UNMAPPED_DENY: u8 = 1;

/// How many cgroup levels the kernel climbs to find the nearest mapped ancestor of a cgroup the
/// agent has not mapped yet (a container started inside a pod's cgroup).
pub const MAX_CGROUP_DEPTH: u32 = 16;

/// A TCP 4-tuple as the receiving side's ingress sees it; addresses mapped to IPv6, ports in
/// host order. Local means the connecting socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Identity of the sender of a connection the agent's tunnel opens to a local workload
/// ([`CONNECTING_FLAG_TUNNEL`]), recorded by the agent. Any other connection's sender on this
/// host is found by socket lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectingValue {
    pub identity: IdentityId,
    pub flags: u32,
    pub cookie: u64,
}

/// A UDP flow another host's sender started and this workload's ingress admitted (keyed like
/// the workload's own sends, see the kernel's `udp_sender_key`): its replies pass the workload's
/// egress check, and it never counts as a reply on ingress.
pub const CONNECTING_FLAG_ADMITTED: u32 = 2;

/// The connection is the agent's delivery of a tunneled connection whose source workload
/// `identity` was verified by its certificate: an `mtls: required` rule admits it, for this
/// 4-tuple only.
pub const CONNECTING_FLAG_TUNNEL: u32 = 1;

/// Index 0 of the tunnel map: where the connect hook redirects connections that must go through
/// the mTLS tunnel (the agent's outbound listener). Without `enabled` such connections are refused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelConfig {
    /// As `bpf_sock_addr.user_ip4` holds it (network byte order).
    pub ip4: u32,
    /// As `bpf_sock_addr.user_ip6` holds it (network byte order words).
    pub ip6: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub enabled: u8,
    pub _pad: u8,
}

/// A connection redirected to the tunnel: where the workload connected to, and the verdict.
/// Kept by socket cookie from the connect hook ([`RedirectedSocket`]) until the egress packet
/// program files it under the connection's 4-tuple (as [`FlowKey`], the workload's end local)
/// at its SYN, where the agent finds it on accept.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginalDst {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// 4 or 6: the family of the workload's socket.
    pub family: u8,
    pub _pad: u8,
    pub local_identity: IdentityId,
    pub remote_identity: IdentityId,
    /// The rule that requires mTLS.
    pub rule: u32,
}

/// Where the agent finds a redirected connection's [`OriginalDst`]: its 4-tuple (the workload's
/// end local) in the network namespace it was made in. Workloads in their own network namespaces
/// (pods) all connect to the same loopback address and port, so the 4-tuple alone is not unique.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RedirectKey {
    pub flow: FlowKey,
    pub netns: u64,
}

/// A local listener as earlier agents recorded it: (netns cookie, port, protocol) → identity of
/// the listening workload. Read only for a socket bound before this agent's programs were
/// attached (which has no [`SocketOwner`]); nothing writes it any more.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns: u64,
    pub port: u16,
    pub protocol: u8,
    pub _pad: [u8; 5],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerValue {
    pub identity: IdentityId,
    pub _pad: u32,
}

/// The workload that bound a TCP or UDP socket ([`IDENTITY_HOST`] for a process of no workload),
/// recorded at `bind()` in the binding task's context and kept in the socket's own storage
/// ([`map_names::SOCKET_OWNERS`]). A sender on this host that shares the socket's address finds
/// it by socket lookup and reads this. Never changes layout (see that map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketOwner {
    pub identity: IdentityId,
    pub _pad: u32,
}

/// Cached UDP ingress refusal of a flow, so its next datagrams are refused at once (an admission
/// is recorded in the connecting map, with the workload's own flows).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpFlowValue {
    pub generation: u32,
    pub rule: u32,
    pub verdict: u8,
    pub _pad: [u8; 7],
}

/// Per-flow event budget used by the kernel's rate limiter. `port` is the flow's service port
/// (the destination's), never an ephemeral one, so a flood from fresh source ports shares one
/// budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventLimitKey {
    pub local_identity: IdentityId,
    pub remote_identity: IdentityId,
    pub remote_addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    pub direction: u8,
    pub verdict: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventLimitValue {
    pub window_start_ns: u64,
    pub count: u32,
    pub _pad: u32,
}

/// An allowed flow as the kernel counts it, per CPU: no event reaches user space for it; the
/// agent reads the counts periodically. The ephemeral side's port is 0, so every connection of a
/// client to a service is one key: on egress `remote_port` is the destination's port, on ingress
/// `local_port` is the workload's own; for ICMP `remote_port` is the type's port, as in events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowCountKey {
    pub local_identity: IdentityId,
    pub remote_identity: IdentityId,
    pub rule: u32,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u8,
    pub protocol: u8,
    pub direction: u8,
    pub verdict: u8,
    /// On egress to a Service's cluster IP: that address and port (the remote is the backend it
    /// was translated to); zero otherwise.
    pub service_addr: [u8; 16],
    pub service_port: u16,
    pub _pad: [u8; 2],
}

/// Key of the service map: a Service's cluster IP (IPv4 mapped) with one of its ports, in one
/// generation (the services switch with the policy and the IP cache, see [`StateValue`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub protocol: u8,
    pub generation: u8,
}

/// Value of the service map: the frontend's backends are slots `0..count` of the backend map.
/// `count == 0`: the Service has no ready backend, and a connection to it is refused at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub count: u32,
    pub flags: u32,
}

/// `sessionAffinity: ClientIP`: the backend is chosen by the client's network namespace (a pod,
/// hence its address) rather than by the socket.
pub const SERVICE_FLAG_CLIENT_AFFINITY: u32 = 1;

/// Key of the backend map: a frontend and a slot below its count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub service: ServiceKey,
    pub slot: u32,
}

/// An address (IPv4 mapped) and port (host order): a backend in the backend map, the frontend a
/// socket asked for in the service-socket map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAddr {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 2],
}

/// Key of the service-socket map: a socket translated to a backend, and that backend. Its value
/// is the frontend ([`ServiceAddr`]) that `recvmsg()` and `getpeername()` give back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceSocketKey {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Whether a verdict is counted in the flow counts rather than sent as an event: the kernel sends
/// events only for refusals and audits.
pub const fn is_counted(verdict: u8) -> bool {
    verdict == VERDICT_ALLOW || verdict == VERDICT_REDIRECT
}

pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;
/// Audit: a policy in audit mode would have denied it; it was let through.
pub const VERDICT_AUDIT: u8 = 3;
/// Allowed, and to be carried over mutual TLS.
pub const VERDICT_REDIRECT: u8 = 4;
/// Refused because the rule requires mutual TLS and the connection cannot have it: on egress this
/// node runs no tunnel; on ingress the connection did not come through the tunnel (plaintext).
pub const VERDICT_NO_TUNNEL: u8 = 5;

/// One verdict, sent to user space through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictEvent {
    pub timestamp_ns: u64,
    pub cgroup_id: u64,
    pub cookie: u64,
    pub local_identity: IdentityId,
    pub remote_identity: IdentityId,
    pub rule: u32,
    pub local_port: u16,
    pub remote_port: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// 4 or 6: the family the workload used (a v4-mapped address on a v6 socket reports 6).
    pub family: u8,
    pub protocol: u8,
    pub direction: u8,
    pub verdict: u8,
    /// Why a packet was refused without a rule ([`reasons`]); `NONE` for policy verdicts.
    pub reason: u8,
    pub _pad: [u8; 3],
    /// On egress to a Service's cluster IP: that address and port (the remote is the backend it
    /// was translated to, or zero when the Service has none); zero otherwise.
    pub service_addr: [u8; 16],
    pub service_port: u16,
    pub _pad2: [u8; 6],
}

/// Why the kernel refused a packet of an isolated workload that no rule decides: the fail-closed
/// cases, each with its own verdict record.
pub mod reasons {
    pub const NONE: u8 = 0;
    /// A protocol policy cannot name (UDP-Lite, raw IP protocols, GRE, ESP...).
    pub const PROTOCOL: u8 = 1;
    /// An IPv6 extension-header chain longer than the kernel walks.
    pub const HEADER_CHAIN: u8 = 2;
    /// A header length that points past the packet, or a truncated header.
    pub const MALFORMED: u8 = 3;
    /// A fragment without the transport header (not the first).
    pub const FRAGMENT: u8 = 4;
    /// A cgroup below the root that no workload maps yet (`unmappedCgroups: deny`).
    pub const UNMAPPED_CGROUP: u8 = 5;
    /// An ICMP error whose embedded packet belongs to no flow policy allows.
    pub const ICMP_ERROR: u8 = 6;
    /// A connection to a Service's cluster IP and port that has no ready backend.
    pub const NO_BACKEND: u8 = 7;
    /// A connection that must go through the mTLS tunnel from a workload whose certificate the
    /// agent does not hold (yet): refused rather than carried without one.
    pub const NO_CERTIFICATE: u8 = 8;
}

/// Indices into the per-CPU counter array.
pub mod counters {
    /// `base(direction, verdict)`: one counter per direction and verdict.
    pub const fn verdict(direction: u8, verdict: u8) -> u32 {
        direction as u32 * 8 + verdict as u32
    }
    pub const EVENTS_SHED: u32 = 16;
    pub const EVENTS_LOST: u32 = 17;
    pub const NO_IDENTITY: u32 = 18;
    pub const COUNT: u32 = 24;
}

/// Rule ids: 0 means none; [`rule_ids::FIRST`] and up are allocated by the policy compiler.
pub mod rule_ids {
    pub const NONE: u32 = 0;
    pub const FIRST: u32 = 1;
}

/// Whether an address (as the maps hold one) is an IPv4 address, mapped to IPv6.
#[inline(always)]
pub fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff
}

/// Writes an IPv4 address (network order bytes) as an IPv4-mapped IPv6 address.
pub const fn map_v4(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<CgroupValue>() == 8);
    assert!(size_of::<PolicyKey>() == 16);
    assert!(offset_of!(PolicyKey, generation) == 12);
    assert!(size_of::<PolicyValue>() == 20);
    assert!(size_of::<IpcacheKey>() == 20);
    assert!(size_of::<IpcacheLpmData>() == 17);
    assert!(size_of::<IpcacheValue>() == 4);
    assert!(size_of::<StateValue>() == if cfg!(feature = "abi-next") { 24 } else { 16 });
    assert!(size_of::<FlowKey>() == 40);
    assert!(offset_of!(FlowKey, local_port) == 32);
    assert!(size_of::<ConnectingValue>() == 16);
    assert!(size_of::<TunnelConfig>() == 24);
    assert!(size_of::<OriginalDst>() == 32);
    assert!(size_of::<RedirectKey>() == 48);
    assert!(size_of::<ListenerKey>() == 16);
    assert!(size_of::<ListenerValue>() == 8);
    assert!(size_of::<SocketOwner>() == 8);
    assert!(size_of::<UdpFlowValue>() == 16);
    assert!(size_of::<EventLimitKey>() == 32);
    assert!(size_of::<EventLimitValue>() == 16);
    assert!(size_of::<FlowCountKey>() == 72);
    assert!(size_of::<VerdictEvent>() == 104);
    assert!(size_of::<ServiceKey>() == 20);
    assert!(size_of::<ServiceValue>() == 8);
    assert!(size_of::<BackendKey>() == 24);
    assert!(size_of::<ServiceAddr>() == 20);
    assert!(size_of::<ServiceSocketKey>() == 32);
    assert!(size_of::<LearnedKey>() == 24);
    assert!(size_of::<LearnedValue>() == 40);
    assert!(size_of::<DnsName>() == 256);
    assert!(size_of::<DnsProxyConfig>() == 8);
    assert!(size_of::<RedirectedSocket>() == 40);
    assert!(size_of::<DnsFlow>() == 40);
    assert!(offset_of!(VerdictEvent, reason) == 76);
    assert!(size_of::<Settings>() == 16);
    assert!(offset_of!(VerdictEvent, local_addr) == 40);
    assert!(offset_of!(VerdictEvent, family) == 72);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type below is `#[repr(C)]`, made only of integers and byte arrays, with its
    // padding spelled out as fields, so any bit pattern is a valid value.
    unsafe impl aya::Pod for CgroupValue {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for IpcacheKey {}
    unsafe impl aya::Pod for IpcacheLpmData {}
    unsafe impl aya::Pod for IpcacheValue {}
    unsafe impl aya::Pod for StateValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for ConnectingValue {}
    unsafe impl aya::Pod for TunnelConfig {}
    unsafe impl aya::Pod for OriginalDst {}
    unsafe impl aya::Pod for RedirectKey {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for ListenerValue {}
    unsafe impl aya::Pod for SocketOwner {}
    unsafe impl aya::Pod for UdpFlowValue {}
    unsafe impl aya::Pod for EventLimitKey {}
    unsafe impl aya::Pod for EventLimitValue {}
    unsafe impl aya::Pod for FlowCountKey {}
    unsafe impl aya::Pod for VerdictEvent {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for ServiceAddr {}
    unsafe impl aya::Pod for ServiceSocketKey {}
    unsafe impl aya::Pod for LearnedKey {}
    unsafe impl aya::Pod for LearnedValue {}
    unsafe impl aya::Pod for DnsName {}
    unsafe impl aya::Pod for DnsProxyConfig {}
    unsafe impl aya::Pod for RedirectedSocket {}
    unsafe impl aya::Pod for DnsFlow {}
}
