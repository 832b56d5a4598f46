//! Any text in, no panic out: see `agent/src/policy/fuzzing.rs`, which the agent's unit tests
//! also run on every input of the committed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The policy module as the agent compiles it; only its parsing and compilation run here, so
// what the rest of the agent uses of it (the CLI, the configuration's port names) goes unused.
#[allow(dead_code, unused_imports)]
#[path = "../../agent/src/policy/mod.rs"]
mod policy;

#[path = "../../agent/src/policy/fuzzing.rs"]
mod fuzzing;

/// Stand-ins for the agent modules `policy::cli` names; the fuzz target never runs the CLI.
mod config {
    pub struct Config {
        pub policies: Vec<std::path::PathBuf>,
    }

    impl Config {
        pub fn load(_: &std::path::Path) -> std::io::Result<Config> {
            Err(std::io::ErrorKind::Unsupported.into())
        }
    }
}

mod identity {
    pub fn workload_infos(
        _: &crate::config::Config,
    ) -> std::io::Result<Vec<crate::policy::WorkloadInfo>> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

fuzz_target!(|data: &[u8]| fuzzing::parse_compile_decide(data));
