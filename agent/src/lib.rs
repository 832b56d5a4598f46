//! The ward agent as a library: the `ward` binary (`main.rs`) only calls [`cli::main`]; the
//! control plane's tests drive [`control`], the agent's own control-plane client.

mod admin;
mod app;
mod cgroups;
pub mod cli;
mod config;
pub mod control;
mod desired;
mod dns;
mod enforcer;
mod events;
mod flows;
mod identity;
mod kernel;
mod logging;
mod metrics;
mod paths;
mod placement;
use ward_policy as policy;
mod status;
mod tunnel;
