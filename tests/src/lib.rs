//! Harness for ward's privileged end-to-end tests: real cgroups, network namespaces, real
//! processes and the real `ward` binary.
//!
//! Every helper owns what it creates and removes it on drop, panics included, so tests can run in
//! parallel and leave the machine as they found it. A test that cannot run (not root, no `ward`
//! binary, no cgroup v2) fails with a message saying why; it never passes by skipping.

pub mod agent;
pub mod cgroups;
pub mod cluster;
pub mod netns;
pub mod peer;
pub mod prerequisites;
pub mod process;
pub mod verdicts;

pub use agent::{run_with_config, spiffe_id, Reload, Ward, WardOptions, Workload};
pub use cgroups::{cgroup2_mount, TestCgroups};
pub use cluster::{Cluster, Node};
pub use netns::{Netns, TwoNodes};
pub use peer::{outcomes_of, Attempts, Listener, Outcome, Peer, Protocol};
pub use prerequisites::{control_bin, require_privileges, require_root, unique_name, ward_bin};
pub use process::{run, Background, Finished, Placement};
pub use verdicts::{find_verdict, parse_verdicts, Verdict, VerdictQuery};

/// The peer binary of this crate, located through the path cargo gives integration tests.
///
/// A macro because `CARGO_BIN_EXE_*` exists only while the integration test itself compiles.
#[macro_export]
macro_rules! peer {
    () => {
        $crate::Peer::new(env!("CARGO_BIN_EXE_ward-test-peer"))
    };
}
