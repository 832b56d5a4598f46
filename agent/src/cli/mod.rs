//! Command line: parses arguments, sets up logging and dispatches.

mod policy;
use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    admin::{self, Reply, Request},
    app,
    config::DEFAULT_PIN_DIR,
    flows::{FlowFilter, FlowRecord},
    logging, paths,
    status::Status,
};

#[derive(Parser)]
#[command(
    name = "ward",
    version,
    about = "Workload network policy enforced in the Linux kernel"
)]
pub(crate) struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log level or filter (RUST_LOG syntax).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Where the running agent listens.
#[derive(Args)]
struct AdminArgs {
    /// The agent's admin socket (default: the one of the default pin directory).
    #[arg(long)]
    admin_socket: Option<PathBuf>,
}

impl AdminArgs {
    fn path(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| paths::default_admin_socket(DEFAULT_PIN_DIR.as_ref()))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: attach the kernel programs and enforce the configured policy.
    Run {
        /// Agent configuration (see docs/configuration.md).
        #[arg(long)]
        config: PathBuf,
        /// On SIGTERM, leave the programs attached so the kernel keeps enforcing the last policy.
        #[arg(long)]
        keep_enforcing: bool,
        /// host:port of ward-control; overrides controlPlane.address of the configuration, whose
        /// controlPlane: section gives the rest (see docs/control-plane.md).
        #[arg(long, value_name = "ADDR")]
        control_plane: Option<String>,
        /// This node's name for the control plane; overrides controlPlane.nodeName. On
        /// Kubernetes, set WARD_NODE_NAME from the downward API (spec.nodeName).
        #[arg(long, value_name = "NAME", env = "WARD_NODE_NAME")]
        node_name: Option<String>,
        /// The agent's own pod UID (WARD_POD_UID, from the downward API's metadata.uid): its
        /// cgroup is the host's, so that `unmappedCgroups: deny` never refuses the agent.
        #[arg(long, value_name = "UID", env = "WARD_POD_UID")]
        pod_uid: Option<String>,
    },
    /// Show the running agent's state: kernel, programs, policy, workloads, map usage.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show verdicts as the kernel makes them: recent ones, then live with --follow.
    Flows {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        follow: bool,
        /// Source workload name, SPIFFE ID or address.
        #[arg(long)]
        from: Option<String>,
        /// Destination workload name, SPIFFE ID or address, or a Service (`<namespace>/<name>`).
        #[arg(long)]
        to: Option<String>,
        /// allow, deny or audit.
        #[arg(long)]
        verdict: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Change the running agent's log level (RUST_LOG syntax).
    LogLevel {
        #[command(flatten)]
        admin: AdminArgs,
        level: String,
    },

    /// Check, trace and diff policy without a kernel.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Remove the programs, links and maps an agent left pinned.
    Uninstall {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn flow_line(r: &FlowRecord) -> String {
    let name = |workload: &str, id: &str| {
        if workload.is_empty() {
            id.to_string()
        } else {
            workload.to_string()
        }
    };
    // An allowed flow's record stands for every connection of its reading.
    let count = if r.count > 1 {
        format!(" count={}", r.count)
    } else {
        String::new()
    };
    // A connection to a Service's cluster IP names it; the destination is the backend.
    let service = if r.service.is_empty() {
        String::new()
    } else {
        format!(" service={}", r.service)
    };
    format!(
        "{:<7} {:<7} {} -> {} {}:{}/{}  policy={} rule={}{count}{service}",
        r.verdict,
        r.direction,
        name(&r.src_workload, &r.src),
        name(&r.dst_workload, &r.dst),
        r.dst_addr,
        r.dst_port,
        r.protocol,
        r.policy,
        r.rule
    )
}

async fn client(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Status { admin, json } => {
            let mut lines = admin::request(&admin.path(), &Request::Status).await?;
            let line = lines
                .next_line()
                .await?
                .ok_or_else(|| anyhow::anyhow!("the agent closed the connection"))?;
            if let Ok(reply) = serde_json::from_str::<Reply>(&line) {
                anyhow::bail!("{}", reply.error.unwrap_or_default());
            }
            let status: Status = serde_json::from_str(&line)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{status}");
            }
        }
        Command::Flows {
            admin,
            follow,
            from,
            to,
            verdict,
            json,
        } => {
            let request = Request::Flows {
                follow,
                filter: FlowFilter { from, to, verdict },
            };
            let mut lines = admin::request(&admin.path(), &request).await?;
            while let Some(line) = lines.next_line().await? {
                match serde_json::from_str::<FlowRecord>(&line) {
                    Ok(_) if json => println!("{line}"),
                    Ok(r) => println!("{}", flow_line(&r)),
                    Err(_) => {
                        let reply: Reply = serde_json::from_str(&line)?;
                        anyhow::bail!("{}", reply.error.unwrap_or_default());
                    }
                }
            }
        }
        Command::LogLevel { admin, level } => {
            let mut lines = admin::request(
                &admin.path(),
                &Request::LogLevel {
                    level: level.clone(),
                },
            )
            .await?;
            let line = lines
                .next_line()
                .await?
                .ok_or_else(|| anyhow::anyhow!("the agent closed the connection"))?;
            let reply: Reply = serde_json::from_str(&line)?;
            if !reply.ok {
                anyhow::bail!("{}", reply.error.unwrap_or_default());
            }
            println!("log level set to {level}");
        }
        _ => unreachable!("not a client command"),
    }
    Ok(())
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_agent = matches!(cli.command, Command::Run { .. });
    if let Err(e) = logging::init(cli.log_format == LogFormat::Json, &cli.log_level) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Run {
            config,
            keep_enforcing,
            control_plane,
            node_name,
            pod_uid,
        } => runtime().and_then(|rt| {
            rt.block_on(app::run(app::RunOptions {
                config,
                keep_enforcing,
                control_plane: crate::config::RunFlags {
                    address: control_plane,
                    node_name,
                    pod_uid,
                },
            }))
        }),
        Command::Uninstall { pin_dir } => app::uninstall(&pin_dir),
        Command::Policy { command } => {
            return policy::run(command).unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            })
        }

        command => runtime().and_then(|rt| rt.block_on(client(command))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_agent => {
            tracing::error!(error = %format!("{e:#}"), "ward stopped");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
