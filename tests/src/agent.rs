//! The `ward` agent under test: its configuration, its process and its log.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use crate::cgroups::TestCgroups;
use crate::peer::Protocol;
use crate::process::{run, Background, Finished, Lines};
use crate::verdicts::{find_verdict, Verdict, VerdictQuery};

/// The trust domain of every test configuration.
pub const TRUST_DOMAIN: &str = "ward.test";

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const RELOAD_TIMEOUT: Duration = Duration::from_secs(20);
/// A reload is triggered twice (file change and SIGHUP); after the first outcome line, outcomes
/// that follow within this quiet time belong to the same reload.
const RELOAD_SETTLE: Duration = Duration::from_millis(750);

/// One entry of the configuration's `workloads`.
#[derive(Clone, Debug)]
pub struct Workload {
    pub name: String,
    /// The Kubernetes namespace of a pod; NetworkPolicy selects only workloads that have one.
    pub namespace: Option<String>,
    pub labels: Vec<(String, String)>,
    /// Paths relative to the cgroup root.
    pub cgroups: Vec<String>,
    pub addresses: Vec<String>,
    /// Named ports: (name, protocol, port).
    pub ports: Vec<(String, Protocol, u16)>,
    /// The workload whose SPIFFE ID it has (its own name's when `None`).
    pub spiffe_of: Option<String>,
}

impl Workload {
    /// A workload recognised by the cgroup of its own name, labelled `app: <name>`.
    pub fn new(name: &str) -> Self {
        Workload {
            name: name.to_owned(),
            namespace: None,
            labels: vec![("app".to_owned(), name.to_owned())],
            cgroups: vec![name.to_owned()],
            addresses: Vec::new(),
            ports: Vec::new(),
            spiffe_of: None,
        }
    }

    /// Gives it the SPIFFE ID of workload `other` (as the pods of one service account share
    /// one), keeping its own labels.
    pub fn spiffe_id_of(mut self, other: &str) -> Self {
        self.spiffe_of = Some(other.to_owned());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.retain(|(k, _)| k != key);
        self.labels.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_owned());
        self
    }

    pub fn address(mut self, address: &str) -> Self {
        self.addresses.push(address.to_owned());
        self
    }

    /// A named port, as a pod's container port, which NetworkPolicy ports may name.
    pub fn named_port(mut self, name: &str, protocol: Protocol, port: u16) -> Self {
        self.ports.push((name.to_owned(), protocol, port));
        self
    }

    /// The SPIFFE ID ward derives for it (`spiffe://<trustDomain>/workload/<name>`).
    pub fn spiffe_id(&self) -> String {
        spiffe_id(self.spiffe_of.as_deref().unwrap_or(&self.name))
    }
}

/// The SPIFFE ID ward derives for a workload named `name` without an explicit one.
pub fn spiffe_id(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/workload/{name}")
}

/// What a reload came to.
#[derive(Debug)]
pub struct Reload {
    pub applied: bool,
    /// Every `policy applied` / `policy rejected` line the reload produced.
    pub outcome_lines: Vec<String>,
}

/// How to start a `ward run`: [`Ward::start`] and its siblings cover the common cases.
#[derive(Clone, Debug, Default)]
pub struct WardOptions<'a> {
    /// The content of the policy file the configuration lists; `None` lists no policy file
    /// (control-plane mode).
    pub policy: Option<&'a str>,
    /// Extra `ward run` arguments.
    pub args: &'a [&'a str],
    /// Extra top-level configuration lines (YAML), e.g. a `controlPlane:` section.
    pub config_extra: String,
    /// The network namespace (`ip netns` name) ward runs in: a "node" of a multi-node test.
    pub netns: Option<String>,
}

/// A running `ward run`, stopped with SIGTERM on drop; its pin and configuration directories are
/// removed after it stops.
pub struct Ward {
    process: Background,
    dir: PathBuf,
    config_file: PathBuf,
    policy_file: PathBuf,
    pin_dir: PathBuf,
    reloads: usize,
    cgroup_root: PathBuf,
    has_policy_file: bool,
    config_extra: String,
    netns: Option<String>,
}

fn quote(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

fn config_text(
    cgroup_root: &Path,
    pin_dir: &Path,
    policy_file: Option<&Path>,
    workloads: Option<&[Workload]>,
) -> String {
    let mut text = format!(
        "trustDomain: {}\ncgroupRoot: {}\npinDir: {}\n",
        quote(TRUST_DOMAIN),
        quote(&cgroup_root.to_string_lossy()),
        quote(&pin_dir.to_string_lossy()),
    );
    if let Some(policy_file) = policy_file {
        text.push_str(&format!(
            "policies:\n  - {}\n",
            quote(&policy_file.to_string_lossy())
        ));
    }
    let Some(workloads) = workloads else {
        return text;
    };
    text.push_str("workloads:\n");
    if workloads.is_empty() {
        text.push_str("  []\n");
    }
    for workload in workloads {
        let labels: Vec<String> = workload
            .labels
            .iter()
            .map(|(k, v)| format!("{}: {}", quote(k), quote(v)))
            .collect();
        let list = |items: &[String]| {
            items
                .iter()
                .map(|i| quote(i))
                .collect::<Vec<_>>()
                .join(", ")
        };
        text.push_str(&format!(
            "  - name: {}\n    labels: {{{}}}\n    cgroups: [{}]\n",
            quote(&workload.name),
            labels.join(", "),
            list(&workload.cgroups),
        ));
        if let Some(namespace) = &workload.namespace {
            text.push_str(&format!("    namespace: {}\n", quote(namespace)));
        }
        if workload.spiffe_of.is_some() {
            let id = workload.spiffe_id();
            text.push_str(&format!("    spiffeId: {}\n", quote(&id)));
        }
        if !workload.addresses.is_empty() {
            text.push_str(&format!("    addresses: [{}]\n", list(&workload.addresses)));
        }
        if !workload.ports.is_empty() {
            let ports: Vec<String> = workload
                .ports
                .iter()
                .map(|(name, protocol, port)| {
                    let protocol = match protocol {
                        Protocol::Tcp => "TCP",
                        Protocol::Udp => "UDP",
                    };
                    format!(
                        "{{name: {}, port: {port}, protocol: {protocol}}}",
                        quote(name)
                    )
                })
                .collect();
            text.push_str(&format!("    ports: [{}]\n", ports.join(", ")));
        }
    }
    text
}

/// A word on its own, so that `already` is not `ready`.
fn contains_word(line: &str, word: &str) -> bool {
    line.match_indices(word).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + word.len()..].chars().next();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

fn is_reload_outcome(line: &str) -> bool {
    line.contains("policy applied") || line.contains("policy rejected")
}

impl Ward {
    /// Writes a configuration for `cgroups` with `workloads` and `policy`, starts
    /// `ward run --config <file> --log-format json` and waits for its `ready` line.
    pub fn start(cgroups: &TestCgroups, workloads: &[Workload], policy: &str) -> Self {
        Ward::start_with_args(cgroups, workloads, policy, &[])
    }

    /// [`Ward::start`] with extra `ward run` arguments.
    pub fn start_with_args(
        cgroups: &TestCgroups,
        workloads: &[Workload],
        policy: &str,
        extra: &[&str],
    ) -> Self {
        Ward::start_with_options(cgroups, workloads, policy, extra, "")
    }

    /// [`Ward::start_with_args`] with extra top-level configuration lines (YAML).
    pub fn start_with_options(
        cgroups: &TestCgroups,
        workloads: &[Workload],
        policy: &str,
        extra: &[&str],
        config_extra: &str,
    ) -> Self {
        Ward::launch(
            cgroups,
            workloads,
            WardOptions {
                policy: Some(policy),
                args: extra,
                config_extra: config_extra.to_owned(),
                netns: None,
            },
        )
    }

    /// Writes a configuration for `cgroups` with `workloads` as `options` say, starts
    /// `ward run --config <file> --log-format json` and waits for its `ready` line.
    pub fn launch(cgroups: &TestCgroups, workloads: &[Workload], options: WardOptions<'_>) -> Self {
        Self::launch_with(cgroups, Some(workloads), options)
    }

    /// [`Ward::launch`]; `workloads` `None` writes no `workloads:` (`options.config_extra`
    /// says where they come from).
    pub fn launch_with(
        cgroups: &TestCgroups,
        workloads: Option<&[Workload]>,
        options: WardOptions<'_>,
    ) -> Self {
        crate::require_privileges();
        let name = cgroups
            .root()
            .file_name()
            .expect("cgroup root has a name")
            .to_string_lossy()
            .into_owned();
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let pin_dir = Path::new("/sys/fs/bpf").join(&name);
        let _ = std::fs::remove_dir_all(&pin_dir);
        let policy_file = dir.join("policy.yaml");
        if let Some(policy) = options.policy {
            write_file(&policy_file, policy);
        }
        let config_file = dir.join("ward.yaml");
        let listed_policy = options.policy.is_some().then_some(policy_file.as_path());
        replace_file(
            &config_file,
            &(config_text(cgroups.root(), &pin_dir, listed_policy, workloads)
                + &options.config_extra),
        );
        let command = ward_command(
            &crate::ward_bin(),
            &config_file,
            options.netns.as_deref(),
            options.args,
        );
        let ward = Ward {
            process: Background::spawn("ward", command, false),
            dir,
            config_file,
            policy_file,
            pin_dir,
            reloads: 0,
            cgroup_root: cgroups.root().to_owned(),
            has_policy_file: options.policy.is_some(),
            config_extra: options.config_extra,
            netns: options.netns,
        };
        ward.process
            .wait_for_line(0, crate::scaled(READY_TIMEOUT), "saying `ready`", |line| {
                contains_word(line, "ready")
            });
        ward
    }

    fn write_config(&self, workloads: &[Workload]) {
        let listed_policy = self.has_policy_file.then_some(self.policy_file.as_path());
        let text = config_text(
            &self.cgroup_root,
            &self.pin_dir,
            listed_policy,
            Some(workloads),
        ) + &self.config_extra;
        replace_file(&self.config_file, &text);
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// Kills ward with SIGKILL, as a crash or an OOM kill would: nothing is detached.
    pub fn kill(&mut self) {
        self.process
            .stop(libc::SIGKILL, crate::scaled(Duration::from_secs(5)));
    }

    /// Starts `bin` (this build again, or an upgrade) on this ward's configuration and pinned
    /// state after [`Ward::kill`], and waits for its `ready` line; returns that line.
    pub fn respawn(&mut self, bin: &Path, extra: &[&str]) -> String {
        self.spawn_again(bin, extra);
        self.wait_for_restart("ready")
    }

    /// [`Ward::respawn`] of this build, which replaces the policy file with `policy` as soon as
    /// ward says `starting` (it has read its policy and is loading its programs, before it
    /// watches the files).
    pub fn respawn_changing_policy(&mut self, policy: &str) -> String {
        self.spawn_again(&crate::ward_bin(), &[]);
        self.wait_for_restart("starting");
        self.write_policy(policy);
        self.wait_for_restart("ready")
    }

    fn spawn_again(&mut self, bin: &Path, extra: &[&str]) {
        let command = ward_command(bin, &self.config_file, self.netns.as_deref(), extra);
        self.process = Background::spawn("ward (respawned)", command, false);
    }

    /// The first line of the restarted ward that has `word`.
    fn wait_for_restart(&self, word: &str) -> String {
        self.process
            .wait_for_line(
                0,
                crate::scaled(READY_TIMEOUT),
                &format!("saying `{word}` after a restart"),
                |line| contains_word(line, word),
            )
            .1
    }

    pub fn lines(&self) -> Vec<String> {
        self.process.lines().snapshot()
    }

    pub fn log(&self) -> &Lines {
        self.process.lines()
    }

    pub fn log_len(&self) -> usize {
        self.process.lines().len()
    }

    pub fn policy_file(&self) -> &Path {
        &self.policy_file
    }

    pub fn config_file(&self) -> &Path {
        &self.config_file
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The admin socket ward uses by default: `/run/<pin dir name>/admin.sock`.
    pub fn admin_socket(&self) -> PathBuf {
        let name = self.pin_dir.file_name().expect("pin dir has a name");
        Path::new("/run").join(name).join("admin.sock")
    }

    /// What `ward status` prints for this agent.
    pub fn status(&self) -> String {
        let mut command = std::process::Command::new(crate::ward_bin());
        command
            .args(["status", "--admin-socket"])
            .arg(self.admin_socket());
        let finished = crate::run(
            "ward status",
            command,
            crate::scaled(Duration::from_secs(10)),
        );
        assert!(
            finished.status.success(),
            "ward status: {}",
            finished.stderr
        );
        finished.stdout
    }

    /// The first log line from index `from` on that satisfies `predicate`; panics with the log
    /// when none comes within `timeout`.
    pub fn wait_for_log(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        predicate: impl FnMut(&str) -> bool,
    ) -> String {
        self.process.wait_for_line(from, timeout, what, predicate).1
    }

    /// Panics with the log's tail unless a line so far contains `text`.
    pub fn assert_logged(&self, text: &str) {
        assert!(
            self.lines().iter().any(|l| l.contains(text)),
            "no log line says {text:?}:\n{}",
            self.log().tail(20)
        );
    }

    /// The first verdict event matching `query`, waiting up to `timeout` for it.
    pub fn wait_for_verdict(&self, query: &VerdictQuery<'_>, timeout: Duration) -> Verdict {
        let found = self
            .process
            .lines()
            .wait_for(0, timeout, |line| find_verdict(&[line], query).is_some());
        match found {
            Some((_, line)) => find_verdict(&[line], query).expect("the line just matched"),
            None => panic!(
                "ward logged no verdict matching {query:?} within {timeout:?}; log:\n{}",
                self.process.lines().tail(400)
            ),
        }
    }

    /// Replaces the policy file atomically, by rename; returns the log length before.
    fn write_policy(&mut self, policy: &str) -> usize {
        self.reloads += 1;
        let from = self.log_len();
        let staging = self.dir.join(format!(".policy-{}.tmp", self.reloads));
        write_file(&staging, policy);
        std::fs::rename(&staging, &self.policy_file)
            .unwrap_or_else(|e| panic!("replace {}: {e}", self.policy_file.display()));
        from
    }

    /// Replaces the policy file (atomically, by rename), sends SIGHUP and waits for ward to
    /// report the outcome.
    pub fn reload(&mut self, policy: &str) -> Reload {
        let from = self.write_policy(policy);
        self.process.signal(libc::SIGHUP);
        self.reload_outcome(from)
    }

    /// Rewrites the configuration with `workloads` (the rest as at start), sends SIGHUP and waits
    /// for ward to report the outcome.
    pub fn set_workloads(&mut self, workloads: &[Workload]) -> Reload {
        let from = self.log_len();
        self.write_config(workloads);
        self.process.signal(libc::SIGHUP);
        self.reload_outcome(from)
    }

    /// The `policy applied` / `policy rejected` lines of one reload, from log line `from` on.
    fn reload_outcome(&self, from: usize) -> Reload {
        let (mut index, first) = self.process.wait_for_line(
            from,
            crate::scaled(RELOAD_TIMEOUT),
            "saying `policy applied` or `policy rejected` after a reload",
            is_reload_outcome,
        );
        let mut outcome_lines = vec![first];
        while let Some((next, line)) =
            self.process
                .lines()
                .wait_for(index + 1, RELOAD_SETTLE, is_reload_outcome)
        {
            outcome_lines.push(line);
            index = next;
        }
        Reload {
            applied: outcome_lines
                .iter()
                .all(|line| line.contains("policy applied")),
            outcome_lines,
        }
    }

    /// Replaces the policy file (atomically, by rename) without a signal, so that exactly one
    /// reload follows, from ward's file watch; panics with the log unless that reload applied it.
    /// Faster than [`Ward::reload_applied`], which waits for the signal's reload to settle too.
    /// Returns the `policy applied` line.
    pub fn replace_policy(&mut self, policy: &str) -> String {
        let from = self.write_policy(policy);
        let (_, line) = self.process.wait_for_line(
            from,
            RELOAD_TIMEOUT,
            "saying `policy applied` or `policy rejected` after the policy file changed",
            is_reload_outcome,
        );
        assert!(
            line.contains("policy applied"),
            "ward did not apply a valid policy: {line}\nlog:\n{}",
            self.process.lines().tail(200)
        );
        line
    }

    /// Like [`Ward::reload`], and panics with the log unless the policy was applied.
    pub fn reload_applied(&mut self, policy: &str) {
        let reload = self.reload(policy);
        assert!(
            reload.applied,
            "ward did not apply a valid policy: {:?}\nlog:\n{}",
            reload.outcome_lines,
            self.process.lines().tail(200)
        );
    }

    /// Stops ward with SIGTERM (SIGKILL after 10 s) and returns how it exited.
    pub fn stop(&mut self) -> ExitStatus {
        self.process
            .stop(libc::SIGTERM, crate::scaled(Duration::from_secs(10)))
    }

    pub fn has_exited(&mut self) -> bool {
        self.process.has_exited()
    }
}

impl Drop for Ward {
    fn drop(&mut self) {
        self.stop();
        // ward removes its pins on SIGTERM; these catch what a crash or a kill leaves behind.
        // Removing a link's pin also detaches the program from the cgroup.
        // The admin socket's directory, /run/<pin dir name>: ward leaves it behind (empty after a
        // clean stop, with the socket after a crash). The name is this test's own.
        let admin_dir = self.admin_socket().parent().map(Path::to_path_buf);
        for dir in [Some(&self.pin_dir), Some(&self.dir), admin_dir.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("ward-tests: remove {}: {e}", dir.display());
                }
            }
        }
    }
}

/// `<bin> run --config <file> --log-format json <extra>`, in network namespace `netns` if given.
fn ward_command(bin: &Path, config_file: &Path, netns: Option<&str>, extra: &[&str]) -> Command {
    let mut args: Vec<std::ffi::OsString> = vec![
        "run".into(),
        "--config".into(),
        config_file.into(),
        "--log-format".into(),
        "json".into(),
    ];
    args.extend(extra.iter().map(Into::into));
    let placement = crate::Placement {
        cgroup: None,
        netns: netns.map(str::to_owned),
    };
    placement.command(bin, &args)
}

/// Writes `path` by renaming a new file over it, so ward never reads half a file.
fn replace_file(path: &Path, text: &str) {
    ward_host::atomic::write(path, text.as_bytes(), 0o644)
        .unwrap_or_else(|e| panic!("replace {}: {e}", path.display()));
}

fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Runs `ward run --config <file>` on `config` to completion (for configurations ward must
/// refuse); the file is `<tmp>/<unique name>/ward.yaml`.
pub fn run_with_config(tag: &str, config: &str) -> (PathBuf, Finished) {
    crate::require_privileges();
    let dir = std::env::temp_dir().join(crate::unique_name(tag));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let config_file = dir.join("ward.yaml");
    write_file(&config_file, config);
    let mut command = Command::new(crate::ward_bin());
    command.arg("run").arg("--config").arg(&config_file);
    let finished = run("ward run", command, crate::scaled(Duration::from_secs(30)));
    let _ = std::fs::remove_dir_all(&dir);
    (config_file, finished)
}

#[cfg(test)]
mod tests {
    use super::contains_word;

    #[test]
    fn ready_is_a_word_not_part_of_already() {
        assert!(contains_word(r#"{"fields":{"message":"ready"}}"#, "ready"));
        assert!(contains_word("ward ready: 6 programs attached", "ready"));
        assert!(!contains_word("cgroup already tracked", "ready"));
        assert!(!contains_word("readyness", "ready"));
    }
}
