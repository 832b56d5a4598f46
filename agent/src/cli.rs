//! Command line: parses arguments, sets up logging and dispatches.
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{app, config::DEFAULT_PIN_DIR};

#[derive(Parser)]
#[command(name = "ward", version, about = "Workload network policy enforced in the Linux kernel")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log level or filter (RUST_LOG syntax).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    },
    /// Remove the programs, links and maps an agent left pinned.
    Uninstall {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

fn init_logging(format: LogFormat, level: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| format!("--log-level {level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
    Ok(())
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(cli.log_format, &cli.log_level) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Run { config, keep_enforcing } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(app::run(app::RunOptions { config, keep_enforcing }))),
        Command::Uninstall { pin_dir } => app::uninstall(&pin_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "ward stopped");
            ExitCode::FAILURE
        }
    }
}
