//! `cargo xtask test`: every check CI runs, in order, with one summary at the end.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use crate::{
    image, setup,
    sys::{self, heading},
};

pub fn run(test_threads: Option<usize>, vms: bool, filter: &[String]) -> Result<()> {
    sys::require_root(
        "test",
        "the privileged suite creates cgroups, network namespaces and loads eBPF programs",
    )?;
    setup::run()?;
    let threads = test_threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let mut steps = Steps::default();

    steps.run(
        "rustfmt",
        sys::cargo().args(["fmt", "--all", "--", "--check"]),
    );
    // agent-ebpf is `no_std`/`no_main` for the BPF target and cannot be built for the host;
    // it is linted for its own target with the toolchain that builds it.
    steps.run(
        "clippy (user space)",
        sys::cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "agent-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    );
    steps.run(
        "clippy (kernel)",
        sys::cargo().args([
            "+nightly",
            "clippy",
            "-p",
            "agent-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]),
    );
    steps.run(
        "unit tests",
        sys::cargo().arg("test").arg("--").args(filter),
    );
    // The multi-node tests run the real control plane beside the agents.
    let built = steps.run(
        "build ward and ward-control",
        sys::cargo().args(["build", "-p", "ward-agent", "-p", "ward-control", "--bins"]),
    );
    // The upgrade test runs a build with the next kernel map layout against this one's pins.
    let next_dir = sys::target_dir().join("abi-next");
    let built_next = steps.run(
        "build ward (abi-next)",
        &mut sys::build_ward_with_feature("abi-next", &next_dir),
    );
    if built {
        // Policy as code: the repository's own example policies pass the same check users run.
        steps.run(
            "policy check",
            Command::new(sys::target_dir().join("debug/ward")).args([
                "policy",
                "check",
                "--strict",
                "examples/policies",
            ]),
        );
    }
    // The deploy tests inspect and run the image. Unoptimised: the musl release build would be
    // most of the step's time, and those tests are about the image, not the code's speed.
    // Without it the image tests fail and say so; the others still run.
    steps.run(
        "image (debug)",
        Command::new(std::env::current_exe()?).args(["image", "--debug"]),
    );
    if built && built_next {
        let ward = sys::target_dir().join("debug/ward");
        steps.run(
            "privileged tests",
            sys::cargo()
                .env("WARD_IMAGE", image::archive(true))
                .env("WARD_KUBERNETES_VALIDATE", setup::validator())
                .env("WARD_BIN", &ward)
                .env(
                    "WARD_CONTROL_BIN",
                    sys::target_dir().join("debug/ward-control"),
                )
                .env("WARD_BIN_ABI_NEXT", next_dir.join("debug/ward"))
                .args(["test", "-p", "ward-tests", "--"])
                .arg(format!("--test-threads={threads}"))
                .args(filter),
        );
    } else {
        steps.skip("privileged tests", "ward or ward-control did not build");
    }
    // The README's first command: the built-in example, whose every connection must behave and
    // be logged as its policy says.
    if !built {
        steps.skip("demo", "ward did not build");
    } else if !filter.is_empty() {
        steps.skip("demo", "a test filter was given");
    } else {
        steps.run("demo", Command::new(std::env::current_exe()?).arg("demo"));
    }
    if !vms {
        steps.skip("kernel matrix", "--skip-vms");
    } else if built && built_next {
        // The same suite on the oldest and the newest Debian kernel ward supports, one guest
        // after the other (side by side, two emulated CPUs on two cores only make timing worse).
        steps.run(
            "kernel matrix",
            Command::new(std::env::current_exe()?)
                .args(["vm-test", "--kernel", "vms", "--"])
                .args(filter),
        );
    } else {
        steps.skip("kernel matrix", "ward did not build");
    }

    heading("summary");
    for step in &steps.0 {
        println!(
            "  {:<20} {:<8} {:>7.1} s",
            step.name,
            step.outcome,
            step.took.as_secs_f64()
        );
    }
    let failed: Vec<&str> = steps
        .0
        .iter()
        .filter(|s| s.outcome != "ok")
        .map(|s| s.name)
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} steps did not pass: {}",
            failed.len(),
            steps.0.len(),
            failed.join(", ")
        );
    }
    println!("all {} steps passed", steps.0.len());
    Ok(())
}

struct Step {
    name: &'static str,
    outcome: &'static str,
    took: Duration,
}

/// Steps keep going after a failure, so one run reports every broken check.
#[derive(Default)]
struct Steps(Vec<Step>);

impl Steps {
    fn run(&mut self, name: &'static str, cmd: &mut Command) -> bool {
        heading(name);
        let start = Instant::now();
        let result = sys::run(cmd);
        if let Err(e) = &result {
            eprintln!("{name}: {e:#}");
        }
        let outcome = if result.is_ok() { "ok" } else { "FAILED" };
        self.0.push(Step {
            name,
            outcome,
            took: start.elapsed(),
        });
        result.is_ok()
    }

    fn skip(&mut self, name: &'static str, why: &str) {
        heading(name);
        eprintln!("{name}: not run: {why}");
        self.0.push(Step {
            name,
            outcome: "NOT RUN",
            took: Duration::ZERO,
        });
    }
}
