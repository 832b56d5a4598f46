//! Harness for ward's privileged end-to-end tests: real cgroups, network namespaces, real
//! processes and the real `ward` binary.
//!
//! Every helper owns what it creates and removes it on drop, panics included, so tests can run in
//! parallel and leave the machine as they found it. A test that cannot run (not root, no `ward`
//! binary, no cgroup v2) fails with a message saying why; it never passes by skipping.

pub mod agent;
pub mod capture;
pub mod cgroups;
pub mod cluster;
pub mod dns;
pub mod kube_api;
pub mod kubernetes;
pub mod netns;
pub mod peer;
pub mod prerequisites;
pub mod process;
pub mod scripted_resolver;
pub mod systemd;
pub mod verdicts;

pub use agent::{run_with_config, spiffe_id, Reload, Ward, WardOptions, Workload};
pub use capture::Capture;
pub use cgroups::{cgroup2_mount, TestCgroups};
pub use cluster::{Cluster, Node};
pub use kube_api::KubeApi;
pub use netns::{Lan, Netns, TwoNodes};
pub use peer::{outcomes_of, received_by, Attempts, Listener, Outcome, Peer, Protocol};
pub use prerequisites::{
    control_bin, require_privileges, require_programs, require_root, unique_name, ward_bin,
};
pub use process::{run, Background, Finished, Placement};
pub use verdicts::{find_verdict, parse_verdicts, Verdict, VerdictQuery};

/// `d` stretched by `WARD_TEST_TIME_SCALE` (a whole number, default 1): the kernel matrix runs the
/// suite under CPU emulation, where every process start takes several times as long. Timing
/// bounds and waits go through this, so a bound means the same thing on every machine.
pub fn scaled(d: std::time::Duration) -> std::time::Duration {
    static SCALE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let scale = *SCALE.get_or_init(|| match std::env::var("WARD_TEST_TIME_SCALE") {
        Err(_) => 1,
        Ok(v) => match v.parse::<u32>() {
            Ok(n) if n >= 1 => n,
            _ => panic!("WARD_TEST_TIME_SCALE={v:?}: expected a whole number of at least 1"),
        },
    });
    d * scale
}

/// The peer binary of this crate, located through the path cargo gives integration tests.
///
/// A macro because `CARGO_BIN_EXE_*` exists only while the integration test itself compiles.
#[macro_export]
macro_rules! peer {
    () => {
        $crate::Peer::new(env!("CARGO_BIN_EXE_ward-test-peer"))
    };
}
