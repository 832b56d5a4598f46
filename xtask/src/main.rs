//! Developer commands for ward: `cargo xtask setup | test | demo | bench | vm-test | image`.
//!
//! The hidden subcommands are the small programs that `demo` and `bench` run inside workload
//! cgroups (xtask re-executes itself), so no extra tool has to be installed for them.

mod agent_log;
mod bench;
mod bench_control;
mod bench_dns;
mod bench_policy;
mod bench_service;
mod demo;
mod image;
mod loopback;
mod probe;
mod setup;
mod stats;
mod sys;
mod test_suite;
mod vm;
mod ward;

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Developer commands for ward")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what this machine lacks to build and test ward (idempotent; needs root).
    Setup,
    /// Run every check CI runs: setup, fmt, clippy, unit tests, the privileged suite.
    Test {
        /// Threads for the privileged suite (default: number of CPUs).
        #[arg(long)]
        test_threads: Option<usize>,
        /// Leave out the kernel matrix (the privileged suite in QEMU on Debian's 6.1 and 6.12
        /// kernels, about 10 minutes) for a quicker local run. CI never passes this.
        #[arg(long)]
        skip_vms: bool,
        /// Test name filter, passed to the unit tests, the privileged suite and the kernel matrix.
        #[arg(last = true)]
        filter: Vec<String>,
    },
    /// Run ward on a built-in example: three workloads, allowed, denied and audited connections.
    Demo,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        bench: BenchCommand,
    },
    /// The privileged suite on Debian's 6.1 and 6.12 kernels (QEMU) and this machine's kernel.
    VmTest(vm::Args),
    /// The OCI image of ward and ward-control (static binaries, no base image), saved as an OCI
    /// archive under target/image/ and tagged with the crate version.
    Image(image::Args),
    #[command(hide = true)]
    Serve(probe::ServeArgs),
    #[command(hide = true)]
    Connect {
        addr: SocketAddr,
        #[arg(long, default_value = "2000")]
        timeout_ms: u64,
        /// One UDP datagram and its echo instead of a TCP connection.
        #[arg(long)]
        udp: bool,
    },
    #[command(hide = true)]
    BenchClient {
        addr: SocketAddr,
        #[arg(long)]
        seconds: f64,
        /// One UDP datagram exchange per new socket instead of a TCP connection.
        #[arg(long)]
        udp: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Connections per second and connect latency over loopback (TCP4, TCP6, UDP4; the client's
    /// egress and the server's ingress isolated): no programs, ward, nftables.
    Connect(bench::ConnectArgs),
    /// The mTLS tunnel against plain TCP on loopback: latency, throughput, connection rate,
    /// agent RSS and CPU with many connections (no root needed).
    Tunnel(bench::TunnelArgs),
    /// The mTLS tunnel end to end between two nodes (network namespaces, real agents and control
    /// plane, the kernel's redirect) against plain TCP between the same namespaces.
    Mtls(bench::TunnelArgs),
    /// Policy changes on one agent: one-rule change latency (p50/p99) and RSS during reloads at
    /// 1,000 and 100,000 entries; `ward policy check` time on 100, 1,000 and 2,200 rules.
    Policy(bench_policy::PolicyArgs),
    /// Control plane: policy propagation to every node's kernel (p50/p99) for 10 and 10,000
    /// rules, a full resync of 100,000 rules, memory at 10,000 identities.
    Control(bench_control::ControlArgs),
    /// Services: connections per second and connect latency to a cluster IP translated by ward,
    /// against a pod IP directly (no programs, ward) and kube-proxy-style nftables DNAT, at 10
    /// and 1,000 backends (TCP4, UDP4; in a network namespace of its own).
    Service(bench_service::ServiceArgs),
    /// DNS-aware egress: DNS query latency (p50/p99) through ward's DNS proxy against straight
    /// to the resolver (no programs, ward), and connections per second to an address learned
    /// from a DNS answer against a CIDR-allowed one (in a network namespace of its own, with
    /// dnsmasq as the resolver).
    Dns(bench_dns::DnsArgs),
    #[command(hide = true)]
    DnsClient(bench_dns::ClientArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Test {
            test_threads,
            skip_vms,
            filter,
        } => test_suite::run(test_threads, !skip_vms, &filter),
        Command::Demo => demo::run(),
        Command::Bench {
            bench: BenchCommand::Connect(args),
        } => bench::run(&args),
        Command::Bench {
            bench: BenchCommand::Tunnel(args),
        } => bench::tunnel(&args),
        Command::Bench {
            bench: BenchCommand::Mtls(args),
        } => bench::mtls(&args),
        Command::Bench {
            bench: BenchCommand::Policy(args),
        } => bench_policy::run(&args),
        Command::Bench {
            bench: BenchCommand::Control(args),
        } => bench_control::run(&args),
        Command::Bench {
            bench: BenchCommand::Service(args),
        } => bench_service::run(&args),
        Command::Bench {
            bench: BenchCommand::Dns(args),
        } => bench_dns::run(&args),
        Command::Bench {
            bench: BenchCommand::DnsClient(args),
        } => bench_dns::client(&args),
        Command::VmTest(args) => vm::run(&args),
        Command::Image(args) => image::run(&args),
        Command::Serve(args) => probe::serve(&args),
        Command::Connect {
            addr,
            timeout_ms,
            udp,
        } => probe::connect(addr, udp, Duration::from_millis(timeout_ms)),
        Command::BenchClient { addr, seconds, udp } => probe::bench_client(addr, udp, seconds),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
