mod app;
mod cgroups;
mod cli;
mod config;
mod events;
mod identity;
mod kernel;
mod paths;
mod policy;

fn main() -> std::process::ExitCode {
    cli::main()
}
