mod admin;
mod app;
mod cgroups;
mod cli;
mod config;
mod control;
mod events;
mod flows;
mod identity;
mod kernel;
mod logging;
mod metrics;
mod paths;
mod policy;
mod status;
mod tunnel;

fn main() -> std::process::ExitCode {
    cli::main()
}
