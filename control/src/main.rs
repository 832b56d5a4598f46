//! `ward-control`: the control plane's command line.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ward_control::{parse_duration, Options, DEFAULT_TRUST_DOMAIN};

#[derive(Parser)]
#[command(
    name = "ward-control",
    version,
    about = "ward's control plane: serves policy, identities and the IP cache to ward agents over mTLS gRPC",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Directory of policy files (*.yaml, *.yml), watched for changes.
    #[arg(long, required = false)]
    policy_dir: Option<PathBuf>,
    /// Address to serve gRPC on.
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: std::net::SocketAddr,
    /// Where the CA, used join tokens and the workload registry are kept (created 0700).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Where the CA's files are (ca.pem, ca-key.pem, optionally trust-domain) when they are not
    /// in --state-dir: a directory every replica mounts, such as a Kubernetes Secret made from
    /// `init-ca`'s files. Read only; the CA is never created there.
    #[arg(long, value_name = "DIR")]
    ca_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at /metrics, liveness at /healthz and readiness at /readyz
    /// (ready: serving, not cut off from etcd) over plain HTTP on this address.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// One-time join tokens, one a line, optionally followed by the node name it is bound to.
    /// Re-read at every join. Without it, nodes cannot join.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// SPIFFE trust domain of node and workload identities.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Lifetime of node certificates (e.g. 1h, 30m); agents renew at half of it.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    node_cert_lifetime: std::time::Duration,
    /// How long after a node's join its certificates may reach, however often renewed (e.g. 30d,
    /// 12h); past it the node must join again (a service account token does so by itself, a join
    /// token must be a new one).
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    node_cert_max_age: std::time::Duration,
    /// Lifetime of workload certificates (e.g. 1h, 10m); agents renew at half of it. A revoked
    /// certificate is refused by agents at once; this bounds how long a leaked key is useful
    /// when nobody revokes it.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    workload_cert_lifetime: std::time::Duration,
    /// A node without a stream for this long (e.g. 1h, 90s) is removed and its workloads leave
    /// every agent's IP cache; it re-registers when it connects again.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    node_lease: std::time::Duration,
    /// Extra DNS name or address for the serving certificate (repeatable). It always carries
    /// "ward-control", which agents verify by default.
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// Read workloads (pods), NetworkPolicies and Services from a Kubernetes cluster: in a pod,
    /// its service account's; elsewhere --kubeconfig, KUBECONFIG or ~/.kube/config. Agents with
    /// `workloads: fromControlPlane` enforce their node's pods.
    #[arg(long)]
    kubernetes: bool,
    /// The kubeconfig of the cluster --kubernetes reads.
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// With --kubernetes, agents may join with a token of this service account
    /// (`<namespace>/<name>`) projected for audience "ward-control" and bound to their node,
    /// which the API server reviews, instead of a join token. Empty: join tokens only.
    #[arg(long, requires = "kubernetes", default_value = "ward-system/ward")]
    agent_service_account: String,
    /// POST each new policy history version (JSON, as `ward-control show --json` prints it) to
    /// this http:// or https:// URL, for alerting; bounded, it never holds a policy push.
    #[arg(long, value_name = "URL")]
    history_webhook: Option<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// Where the replicas' shared store is.
#[derive(clap::Args)]
struct EtcdArgs {
    /// The etcd members (`http://host:port` or `https://host:port`, comma-separated) through
    /// which replicas share identity numbers, nodes, spent join tokens, revocations and the
    /// policy history. Every replica needs the same CA files, in its --state-dir or --ca-dir (see
    /// `init-ca`).
    #[arg(long, value_delimiter = ',', value_name = "URL")]
    etcd_endpoints: Vec<String>,
    /// The CA of the etcd members' serving certificates (https endpoints).
    #[arg(long, requires = "etcd_endpoints", value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// This replica's client certificate for etcd (with --etcd-key).
    #[arg(long, requires_all = ["etcd_endpoints", "etcd_key"], value_name = "FILE")]
    etcd_cert: Option<PathBuf>,
    /// This replica's client key for etcd.
    #[arg(long, requires = "etcd_cert", value_name = "FILE")]
    etcd_key: Option<PathBuf>,
}

impl EtcdArgs {
    fn options(self) -> Option<ward_control::etcd_store::EtcdOptions> {
        (!self.etcd_endpoints.is_empty()).then_some(ward_control::etcd_store::EtcdOptions {
            endpoints: self.etcd_endpoints,
            ca_file: self.etcd_ca,
            cert_file: self.etcd_cert,
            key_file: self.etcd_key,
        })
    }
}

/// Where the control plane's state is: a state directory, or the replicas' shared store.
#[derive(clap::Args)]
struct StateFrom {
    /// The control plane's state directory.
    #[arg(long, required_unless_present = "etcd_endpoints")]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// The trust domain of the replicas (with --etcd-endpoints).
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
}

#[derive(Subcommand)]
enum Command {
    /// Appends a new random join token to a token file and prints it.
    NewToken {
        #[arg(long)]
        token_file: PathBuf,
        /// Only this node may join with the token.
        #[arg(long)]
        node: Option<String>,
    },
    /// Prints the CustomResourceDefinition of ward's Policy (deploy/kubernetes/crd.yaml), which
    /// --kubernetes reads next to NetworkPolicies.
    Crd,
    /// Creates the CA in a state directory (if it has none) without serving: the files every
    /// replica of a control plane on etcd reads (ca.pem, ca-key.pem, trust-domain).
    InitCa {
        /// Where to create it (0700).
        #[arg(long)]
        state_dir: PathBuf,
        /// SPIFFE trust domain of node and workload identities.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Prints the CA certificate (PEM) agents trust (`controlPlane.caFile`); the control plane
    /// creates it at its first start.
    CaCert {
        /// The control plane's state directory.
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Lists the nodes and the policy version each enforces, as the running control plane last
    /// wrote it, and names the nodes that lag behind what it serves.
    Status {
        /// The control plane's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Lists every policy set the control plane served: version, time, reason, the number of
    /// policies, the access gained and lost, the git commit.
    History {
        #[command(flatten)]
        from: StateFrom,
        /// Print the records as JSON (one array).
        #[arg(long)]
        json: bool,
    },
    /// Prints one version of the policy history: its sources with their SHA-256 and its access
    /// diff from the version before, as `ward policy diff` prints it.
    Show {
        #[command(flatten)]
        from: StateFrom,
        /// Print the record as JSON.
        #[arg(long)]
        json: bool,
        version: u64,
    },
    /// Revokes workload certificates by serial number (hexadecimal, with or without ':', as
    /// `openssl x509 -serial` or the control plane's "workload certificate signed" log prints
    /// it). A running control plane sends the new list to every agent within about a second.
    ///
    /// With `--node <name>`, revokes a node: its stream ends, its certificate no longer renews or
    /// gets workload certificates, it cannot join again while the revocation stands, and its
    /// workloads leave every agent's IP cache.
    ///
    /// With `--etcd-endpoints`, the revocation is written to the replicas' shared store, and
    /// every replica serves it; without it, the entries are appended to the `revoked` file of
    /// --state-dir.
    Revoke {
        #[command(flatten)]
        from: StateFrom,
        /// A node to revoke (repeatable).
        #[arg(long = "node", value_name = "NAME")]
        nodes: Vec<String>,
        #[arg(value_name = "SERIAL", required_unless_present = "nodes")]
        serials: Vec<String>,
    },
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn new_token(file: &std::path::Path, node: Option<&str>) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(node) = node {
        ward_control::ca::check_node_name(node)?;
    }
    let token = ward_control::tokens::generate();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("opening {}", file.display()))?;
    let line = match node {
        Some(node) => format!("{token} {node}\n"),
        None => format!("{token}\n"),
    };
    f.write_all(line.as_bytes())
        .with_context(|| format!("writing {}", file.display()))?;
    println!("{token}");
    Ok(())
}

async fn history_of(from: StateFrom) -> anyhow::Result<Vec<ward_control::history::Record>> {
    if let Some(etcd) = from.etcd.options() {
        let store = ward_control::etcd_store::EtcdStore::connect(&etcd, &from.trust_domain).await?;
        return Ok(store.history().await?);
    }
    let state_dir = from
        .state_dir
        .context("--state-dir or --etcd-endpoints is required")?;
    if !state_dir.is_dir() {
        anyhow::bail!(
            "{}: not a directory; give the control plane's --state-dir",
            state_dir.display()
        );
    }
    Ok(ward_control::history::read(
        &state_dir.join(ward_control::history::HISTORY_FILE),
    )?)
}

/// Writes revocation `entries` to the replicas' shared store.
async fn revoke_shared(
    etcd: &ward_control::etcd_store::EtcdOptions,
    trust_domain: &str,
    entries: &[String],
) -> anyhow::Result<()> {
    let mut canonical = Vec::with_capacity(entries.len());
    for entry in entries {
        canonical.push(
            ward_control::revocation::canonical_entry(entry)
                .map_err(|reason| anyhow::anyhow!("{entry:?}: {reason}"))?,
        );
    }
    let store = ward_control::etcd_store::EtcdStore::connect(etcd, trust_domain).await?;
    for (entry, new) in canonical.iter().zip(store.revoke(&canonical).await?) {
        if new {
            println!("revoked {entry}");
        } else {
            println!("already revoked {entry}");
        }
    }
    Ok(())
}

fn revoke(state_dir: &std::path::Path, entries: &[String]) -> anyhow::Result<()> {
    if !state_dir.is_dir() {
        anyhow::bail!(
            "{}: not a directory; give the control plane's --state-dir",
            state_dir.display()
        );
    }
    let file = state_dir.join(ward_control::state_dir::REVOKED_FILE);
    let done = ward_control::revocation::append(&file, entries)?;
    for entry in &done.added {
        println!("revoked {entry}");
    }
    for entry in &done.already {
        println!("already revoked {entry}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::NewToken { token_file, node }) => {
            return new_token(&token_file, node.as_deref())
        }
        Some(Command::Revoke {
            from,
            serials,
            nodes,
        }) => {
            let entries: Vec<String> = serials
                .iter()
                .cloned()
                .chain(nodes.iter().map(|node| format!("node {node}")))
                .collect();
            return match (from.etcd.options(), from.state_dir) {
                (Some(etcd), _) => revoke_shared(&etcd, &from.trust_domain, &entries).await,
                (None, Some(state_dir)) => revoke(&state_dir, &entries),
                (None, None) => unreachable!("clap requires --state-dir without --etcd-endpoints"),
            };
        }
        Some(Command::Status { state_dir, json }) => {
            let status = ward_control::node_status::read(&state_dir).map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", ward_control::node_status::table(&status));
            }
            return Ok(());
        }
        Some(Command::History { from, json }) => {
            let records = history_of(from).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&records)?);
            } else {
                print!("{}", ward_control::history::table(&records));
            }
            return Ok(());
        }
        Some(Command::Show {
            from,
            json,
            version,
        }) => {
            let records = history_of(from).await?;
            let Some(record) = records.iter().find(|r| r.version == version) else {
                anyhow::bail!(
                    "no version {version} in the policy history ({} versions)",
                    records.len()
                );
            };
            if json {
                println!("{}", serde_json::to_string_pretty(record)?);
            } else {
                print!("{}", ward_control::history::show(record));
            }
            return Ok(());
        }
        Some(Command::Crd) => {
            print!("{}", ward_control::crd::manifest());
            return Ok(());
        }
        Some(Command::InitCa {
            state_dir,
            trust_domain,
        }) => {
            let state = ward_control::state_dir::StateDir::open(&state_dir)?;
            ward_control::ca::Ca::load_or_create(
                &state,
                &trust_domain,
                ward_control::DEFAULT_NODE_CERT_LIFETIME,
            )?;
            println!("{}", state.ca_cert().display());
            return Ok(());
        }
        Some(Command::CaCert { state_dir }) => {
            let file = state_dir.join(ward_control::state_dir::CA_CERT_FILE);
            let pem = std::fs::read_to_string(&file).with_context(|| {
                format!(
                    "reading {}: give the control plane's --state-dir, after its first start",
                    file.display()
                )
            })?;
            print!("{pem}");
            return Ok(());
        }
        None => {}
    }
    let args = cli.serve;
    init_logging(&args.log_format);
    let opts = Options {
        policy_dir: args.policy_dir.context("--policy-dir is required")?,
        listen: args.listen,
        state_dir: args.state_dir.context("--state-dir is required")?,
        ca_dir: args.ca_dir,
        metrics_listen: args.metrics_listen,
        token_file: args.token_file,
        trust_domain: args.trust_domain,
        node_cert_lifetime: args.node_cert_lifetime,
        node_cert_max_age: args.node_cert_max_age,
        history_webhook: args.history_webhook,
        workload_cert_lifetime: args.workload_cert_lifetime,
        server_names: args.server_names,
        node_lease: args.node_lease,
        kubernetes: args.kubernetes.then_some(ward_control::KubernetesOptions {
            kubeconfig: args.kubeconfig,
            agent_service_account: Some(args.agent_service_account)
                .filter(|account| !account.is_empty()),
        }),
        etcd: args.etcd.options(),
    };
    // Every agent holds a connection; agents and joins beyond 1,024 must not fail for descriptors.
    match ward_host::rlimit::raise_open_files() {
        Ok((before, after)) if before != after => {
            tracing::info!(before, after, "raised the open file limit")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
    };
    ward_control::run(opts, shutdown).await?;
    Ok(())
}
