//! What the running kernel offers of what ward needs, probed at start so an old or stripped-down
//! kernel gets one precise message instead of a verifier dump.
use std::fmt;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};

const PROGRAMS: [(ProgramType, &str); 3] = [
    (ProgramType::CgroupSockAddr, "program type cgroup_sock_addr"),
    (ProgramType::CgroupSkb, "program type cgroup_skb"),
    (ProgramType::SockOps, "program type sock_ops"),
];

const MAPS: [(MapType, &str); 6] = [
    (MapType::Hash, "map type hash"),
    (MapType::LruHash, "map type lru_hash"),
    (MapType::LpmTrie, "map type lpm_trie"),
    (MapType::Array, "map type array"),
    (MapType::PerCpuArray, "map type percpu_array"),
    (MapType::RingBuf, "map type ringbuf"),
];

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
    for (supported, name) in programs.chain(maps) {
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
    pub fn missing(&self) -> Vec<&'static str> {
        self.missing.clone()
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
