//! What the running kernel offers of what ward needs, probed at start so an old or stripped-down
//! kernel gets one precise message instead of a verifier dump.
use std::fmt;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};

const PROGRAMS: [(ProgramType, &str); 3] = [
    (ProgramType::CgroupSock, "program type cgroup_sock"),
    (ProgramType::CgroupSockAddr, "program type cgroup_sock_addr"),
    (ProgramType::CgroupSkb, "program type cgroup_skb"),
];

const MAPS: [(MapType, &str); 7] = [
    (MapType::Hash, "map type hash"),
    (MapType::LruHash, "map type lru_hash"),
    (MapType::LpmTrie, "map type lpm_trie"),
    (MapType::Array, "map type array"),
    (MapType::PerCpuArray, "map type percpu_array"),
    (MapType::RingBuf, "map type ringbuf"),
    (MapType::SkStorage, "map type sk_storage"),
];

/// `(program type, helper, "type: helper")` for every helper a program of that type calls.
macro_rules! helpers {
    ($($program:ident $name:literal: $($helper:ident),+;)+) => {
        &[$($((
            ProgramType::$program,
            BpfHelper::$helper,
            concat!($name, ": ", stringify!($helper)),
        ),)+)+]
    };
}

/// Every helper ward's programs call (map lookups and updates aside, which every type has), by
/// program type: a kernel that lacks one would otherwise refuse the program with a verifier log.
const HELPERS: &[(ProgramType, BpfHelper, &str)] = helpers! {
    CgroupSock "cgroup_sock": BPF_FUNC_get_current_cgroup_id, BPF_FUNC_sk_storage_get;
    CgroupSockAddr "cgroup_sock_addr": BPF_FUNC_get_current_cgroup_id, BPF_FUNC_get_socket_cookie,
        BPF_FUNC_get_netns_cookie, BPF_FUNC_ringbuf_reserve, BPF_FUNC_ktime_get_ns,
        BPF_FUNC_sk_lookup_tcp, BPF_FUNC_sk_lookup_udp, BPF_FUNC_sk_storage_get;
    CgroupSkb "cgroup_skb": BPF_FUNC_skb_cgroup_id, BPF_FUNC_skb_load_bytes,
        BPF_FUNC_get_socket_cookie, BPF_FUNC_ringbuf_reserve, BPF_FUNC_ktime_get_ns,
        BPF_FUNC_sk_lookup_tcp, BPF_FUNC_sk_cgroup_id;
};

/// The oldest kernel ward is tested on (`cargo xtask vm-test --kernel 6.1`).
pub const MINIMUM_KERNEL: &str = "6.1";

pub struct Features {
    pub release: String,
    present: Vec<&'static str>,
    missing: Vec<&'static str>,
}

pub fn probe() -> Features {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    let mut present = Vec::new();
    let mut missing = Vec::new();
    let programs = PROGRAMS
        .iter()
        .map(|(t, name)| (is_program_supported(*t).unwrap_or(false), *name));
    let maps = MAPS
        .iter()
        .map(|(t, name)| (is_map_supported(*t).unwrap_or(false), *name));
    let helpers = HELPERS
        .iter()
        .map(|(t, helper, name)| (is_helper_supported(*t, *helper).unwrap_or(false), *name));
    for (supported, name) in programs.chain(maps).chain(helpers) {
        if supported {
            present.push(name)
        } else {
            missing.push(name)
        }
    }
    Features {
        release,
        present,
        missing,
    }
}

impl Features {
    pub fn missing(&self) -> &[&'static str] {
        &self.missing
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Linux {}: {} of {} needed features",
            self.release,
            self.present.len(),
            self.present.len() + self.missing.len()
        )?;
        if !self.missing.is_empty() {
            write!(f, ", missing {}", self.missing.join(", "))?;
        }
        Ok(())
    }
}
