//! `ward run`: wires the agent's parts together and owns start-up and shutdown.
//!
//! Two kinds of work, on two kinds of thread. The data runtime (the command line's tokio
//! runtime) carries what must answer at once: the tunnel's connections, the admin socket,
//! metrics, verdict events, the control-plane client and the signal handlers. The enforcer
//! ([`Enforcer`]) does everything that compiles policy or writes the kernel's maps, which can
//! take seconds: at start-up on the runtime's blocking pool, then on its own thread (see
//! [`crate::enforcer`]). They talk through channels only, so no connection waits for an apply.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    admin, control,
    dns::DnsProxy,
    enforcer::{Command, Enforcer, Inputs},
    events,
    flows::FlowHub,
    kernel::Datapath,
    metrics,
    tunnel::Tunnel,
};

pub struct RunOptions {
    pub config: PathBuf,
    pub keep_enforcing: bool,
    /// `--control-plane` and `--node-name`, over the configuration's `controlPlane:`.
    pub control_plane: crate::config::RunFlags,
}

fn preflight() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("ward run loads kernel programs and needs root (CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON); run it as root, e.g. with sudo");
    }
    // The tunnel holds two sockets per carried connection: use what the hard limit allows.
    if let Err(e) = ward_host::rlimit::raise_open_files() {
        tracing::warn!(error = %e, "cannot raise the open file limit");
    }
    Ok(())
}

/// Signal handlers, installed before anything is attached so a signal at any time after start
/// takes the orderly way out.
struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}

/// Runs blocking start-up work (compiling, loading programs, writing maps) on the runtime's
/// blocking pool rather than on a worker that carries connections.
async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .context("start-up work panicked")?
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    preflight()?;
    let Signals {
        mut hangup,
        mut terminate,
        mut interrupt,
    } = Signals::install()?;
    let (config_file, control_plane) = (opts.config.clone(), opts.control_plane.clone());
    let mut enforcer = off_runtime(move || Enforcer::start(config_file, control_plane)).await?;
    let config = enforcer.config().clone();
    let hub = std::sync::Arc::new(
        FlowHub::new(config.flow_log.as_deref()).context("opening the flow log")?,
    );
    let tunnel = match (&config.tunnel, &config.control_plane) {
        (Some(settings), Some(cp)) => Some(
            Tunnel::start(
                settings.clone(),
                cp,
                &config.trust_domain,
                &config.pin_dir,
                hub.clone(),
                enforcer.names(),
            )
            .await?,
        ),
        _ => None,
    };
    let dns = DnsProxy::start(&config.dns, &config.pin_dir, enforcer.metrics()).await?;
    let (mut enforcer, verdicts) = off_runtime(move || {
        let verdicts = enforcer.attach(tunnel, dns)?;
        Ok((enforcer, verdicts))
    })
    .await?;

    let metrics = enforcer.metrics();
    events::count_flows(
        verdicts.flow_counts,
        enforcer.names(),
        hub.clone(),
        metrics.clone(),
    )
    .context("starting the thread that reads allowed-flow counts")?;
    let (names, event_hub, event_metrics) = (enforcer.names(), hub.clone(), metrics.clone());
    let ring = verdicts.events;
    tokio::spawn(async move {
        if let Err(e) = events::run(ring, names, event_hub, event_metrics).await {
            tracing::error!(error = %e, "reading verdict events stopped");
        }
    });
    let (status_tx, status_rx) = mpsc::channel(8);
    let admin_listener = admin::bind(&config.admin_socket)
        .with_context(|| format!("binding the admin socket {}", config.admin_socket.display()))?;
    tokio::spawn(admin::serve(admin_listener, hub, status_tx));
    if let Some(addr) = config.metrics_address {
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, metrics).await {
                tracing::error!(%addr, error = %e, "metrics endpoint stopped");
            }
        });
    }

    let tunnel_address = config.tunnel.as_ref().map(|t| t.advertise);
    let updates = config.control_plane.clone().map(|cp_config| {
        let reports = enforcer.reports();
        let (updates_tx, updates_rx) = mpsc::channel(1);
        // Retries everything itself with backoff; returns when the agent stops, or at once on a
        // bad configuration, which leaves the agent enforcing what it has.
        tokio::spawn(async move {
            if let Err(e) = control::run(cp_config, tunnel_address, reports, updates_tx).await {
                tracing::error!(error = %e, "control plane client stopped");
            }
        });
        updates_rx
    });

    let (commands, commands_rx) = mpsc::channel(1);
    let mut finished = enforcer
        .spawn(Inputs {
            commands: commands_rx,
            status_requests: status_rx,
            updates,
        })
        .context("starting the enforcer's thread")?;
    let ended = loop {
        tokio::select! {
            // A reload already waiting covers this one too.
            _ = hangup.recv() => { let _ = commands.try_send(Command::Reload("SIGHUP")); }
            _ = terminate.recv() => break None,
            _ = interrupt.recv() => break None,
            ended = &mut finished => break Some(ended),
        }
    };
    // Stops the enforcer after what it is doing, an apply included.
    drop(commands);
    let (enforcer, served) = match ended {
        Some(ended) => ended,
        None => finished.await,
    }
    .context("the enforcer's thread panicked")?;

    let _ = std::fs::remove_file(&config.admin_socket);
    if let Some(dir) = config.admin_socket.parent() {
        // Only if empty: the directory may be shared with other files.
        let _ = std::fs::remove_dir(dir);
    }
    if opts.keep_enforcing {
        tracing::info!(pin_dir = %config.pin_dir.display(), "stopping; programs stay attached and keep enforcing the last policy");
    } else {
        enforcer.detach_and_unpin().context("detaching")?;
        tracing::info!("stopped; programs detached and pins removed");
    }
    served
}

/// `ward uninstall`: removes everything an agent left pinned.
pub fn uninstall(pin_dir: &Path) -> anyhow::Result<()> {
    preflight()?;
    if !pin_dir.exists() {
        println!("nothing pinned at {}", pin_dir.display());
        return Ok(());
    }
    let dp = Datapath::load(pin_dir)?;
    dp.detach_and_unpin()
        .with_context(|| format!("removing {}", pin_dir.display()))?;
    println!(
        "removed ward's programs, links and maps from {}",
        pin_dir.display()
    );
    Ok(())
}
