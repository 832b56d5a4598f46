//! Operating ward: restarts and upgrades with no enforcement gap, the admin socket, a flood of
//! denied connections, and the `ward status` / `ward flows` outputs shown in docs/operations.md.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ward_tests::{
    peer, run, ward_bin, Background, Outcome, Peer, Placement, Protocol, TestCgroups, Ward,
    Workload,
};

mod support;
use support::*;

/// Runs the `ward` CLI against a running agent's admin socket.
fn ward_cli(ward: &Ward, args: &[&str]) -> ward_tests::Finished {
    let mut c = std::process::Command::new(ward_bin());
    c.args(args).arg("--admin-socket").arg(ward.admin_socket());
    run("ward", c, ward_tests::scaled(Duration::from_secs(10)))
}

/// Clients connecting every 4 ms until `stop` exists (at most ~20 s).
fn steady_load(peer: &Peer, to: SocketAddr, at: &Placement, stop: &Path) -> Vec<Background> {
    let stop = stop.to_string_lossy().into_owned();
    let args = [
        "--count",
        "5000",
        "--interval-ms",
        "4",
        "--timeout-ms",
        "3000",
        "--stop-file",
        &stop,
    ];
    (0..2)
        .map(|_| peer.connect_background(Protocol::Tcp, to, at, &args))
        .collect()
}

/// Runs `interrupt` while clients connect to an allowed and a denied port, and asserts that not one
/// allowed attempt was refused and not one denied attempt admitted, before, during and after.
fn assert_no_wrong_verdict_across(tag: &str, interrupt: impl FnOnce(&mut Ward)) -> Ward {
    let peer = peer!();
    let cgroups = TestCgroups::new(tag);
    let client = Placement::cgroup(cgroups.create("client"));
    let open = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let closed = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let policy = client_egress("client-egress", &allow_tcp("allow-open", open.port()));
    let mut ward = Ward::start_with_args(
        &cgroups,
        &[Workload::new("client")],
        &policy,
        &["--keep-enforcing"],
    );
    let stop = StopFile::new(tag);
    let mut allowed = steady_load(&peer, open.addr, &client, &stop.0);
    let mut denied = steady_load(&peer, closed.addr, &client, &stop.0);
    wait_started(&allowed);
    wait_started(&denied);
    std::thread::sleep(Duration::from_millis(300));
    interrupt(&mut ward);
    std::thread::sleep(Duration::from_millis(500));
    stop.stop();
    let allowed = finish_load(&mut allowed);
    let denied = finish_load(&mut denied);
    eprintln!(
        "{tag}: allowed port {}, denied port {}",
        tally(&allowed),
        tally(&denied)
    );
    let wrong_allowed = allowed.iter().filter(|o| **o != Outcome::Ok).count();
    let wrong_denied = denied.iter().filter(|o| **o != Outcome::Eperm).count();
    assert!(
        allowed.len() >= 100 && denied.len() >= 100,
        "too few attempts ran: {} / {}",
        allowed.len(),
        denied.len()
    );
    assert_eq!(
        (wrong_allowed, wrong_denied),
        (0, 0),
        "wrong verdicts: allowed port {}, denied port {}; log:\n{}",
        tally(&allowed),
        tally(&denied),
        ward.log().tail(60)
    );
    assert_eq!(closed.received(), 0, "the denied listener saw connections");
    ward
}

#[test]
fn kill_dash_nine_and_restart_never_give_a_wrong_verdict() {
    assert_no_wrong_verdict_across("kill9", |ward| {
        ward.kill();
        // No agent at all for a while: the kernel alone enforces.
        std::thread::sleep(Duration::from_millis(400));
        let ready = ward.respawn(&ward_bin(), &["--keep-enforcing"]);
        assert!(
            ready.contains("Adopted"),
            "the restarted agent did not adopt the pinned links: {ready}"
        );
    });
}

/// The same build with the next map layout (`--features abi-next`), built by `cargo xtask test`.
fn abi_next_bin() -> PathBuf {
    let path = std::env::var_os("WARD_BIN_ABI_NEXT").map(PathBuf::from).unwrap_or_else(|| {
        panic!("PRIVILEGED TEST NOT RUN: set WARD_BIN_ABI_NEXT to a ward built with --features abi-next (cargo xtask test does)")
    });
    assert!(
        path.is_file(),
        "PRIVILEGED TEST NOT RUN: WARD_BIN_ABI_NEXT={} does not exist",
        path.display()
    );
    path
}

#[test]
fn upgrade_to_a_changed_map_layout_never_gives_a_wrong_verdict() {
    let next = abi_next_bin();
    let ward = assert_no_wrong_verdict_across("upgrade", |ward| {
        ward.kill();
        let ready = ward.respawn(&next, &[]);
        assert!(
            ready.contains("Upgraded"),
            "the new build did not upgrade the pinned state: {ready}"
        );
    });
    let pins: Vec<String> = std::fs::read_dir(ward.pin_dir())
        .expect("pin dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ward_"))
        .collect();
    // Every map carries the new ABI version, but the socket owners' (kept with each socket,
    // which no agent can copy; its layout never changes).
    assert!(
        !pins.is_empty()
            && pins
                .iter()
                .all(|n| n.ends_with("_v3") || n == "ward_sockowner"),
        "old maps left pinned: {pins:?}"
    );
    assert!(
        pins.iter().any(|n| n == "ward_sockowner"),
        "the socket owners' map was not kept across the upgrade: {pins:?}"
    );
    ward.assert_logged("migrated socket state");
}

#[test]
fn the_admin_socket_refuses_non_root_users() {
    let cgroups = TestCgroups::new("admin");
    let ward = Ward::start(&cgroups, &[], "");
    let socket = ward.admin_socket();
    let status = |uid_args: &[&str]| {
        let mut c = std::process::Command::new("setpriv");
        c.args(uid_args)
            .arg(ward_bin())
            .args(["status", "--admin-socket"])
            .arg(&socket);
        run(
            "ward status",
            c,
            ward_tests::scaled(Duration::from_secs(10)),
        )
    };
    let root = status(&[]);
    assert!(root.status.success(), "root was refused: {}", root.stderr);
    let nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"];
    let denied_with = |reason: &str| {
        let denied = status(&nobody);
        assert!(
            !denied.status.success(),
            "a non-root user got the status: {}",
            denied.stdout
        );
        assert!(denied.stderr.contains(reason), "{}", denied.stderr);
    };
    denied_with("Permission denied");
    // Even with the file permissions opened up, the agent checks the peer's credentials itself.
    let perm = |p: &Path, mode| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("chmod")
    };
    perm(socket.parent().expect("run dir"), 0o755);
    perm(&socket, 0o777);
    denied_with("serves root only");
    ward.assert_logged("non-root user refused");
}

fn vm_rss_kib(pid: i32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("ward's /proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in kB")
}

fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn a_flood_of_denied_connections_is_shed_and_the_agent_stays_responsive() {
    let peer = peer!();
    let cgroups = TestCgroups::new("flood");
    let client = Placement::cgroup(cgroups.create("client"));
    let closed = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let metrics_port = 20000 + (std::process::id() % 20000) as u16;
    let ward = Ward::start_with_options(
        &cgroups,
        &[Workload::new("client")],
        &client_egress("client-egress", &allow_tcp("only-port-1", 1)),
        &[],
        &format!("metricsAddress: 127.0.0.1:{metrics_port}\n"),
    );
    let rss_before = vm_rss_kib(ward.pid());
    let started = Instant::now();
    let mut flood: Vec<Background> = (0..2)
        .map(|_| {
            peer.connect_background(
                Protocol::Tcp,
                closed.addr,
                &client,
                &["--count", "50000", "--timeout-ms", "1000"],
            )
        })
        .collect();
    // While the flood runs, the agent answers its admin socket promptly.
    std::thread::sleep(Duration::from_millis(300));
    let status = ward_cli(&ward, &["status", "--json"]);
    assert!(
        status.status.success() && status.elapsed < ward_tests::scaled(Duration::from_secs(2)),
        "status during the flood: {status:?}"
    );
    let outcomes = finish_load(&mut flood);
    let flood_time = started.elapsed();
    assert_eq!(outcomes.len(), 100_000, "the flood did not run in full");
    assert!(
        outcomes.iter().all(|o| *o == Outcome::Eperm),
        "a denied connection got through: {}",
        tally(&outcomes)
    );
    let scrape = run(
        "curl /metrics",
        {
            let mut c = std::process::Command::new("curl");
            c.args([
                "-sS",
                "--max-time",
                "5",
                &format!("http://127.0.0.1:{metrics_port}/metrics"),
            ]);
            c
        },
        ward_tests::scaled(Duration::from_secs(10)),
    );
    let text = scrape.stdout;
    let denied = metric(
        &text,
        "ward_verdicts_total{direction=\"egress\",verdict=\"deny\"}",
    );
    let shed = metric(&text, "ward_events_shed_total");
    let reported = metric(
        &text,
        "ward_verdict_events_total{direction=\"egress\",verdict=\"deny\"",
    );
    let rss_after = vm_rss_kib(ward.pid());
    eprintln!("flood: 100000 denied in {flood_time:?}; kernel counted {denied}, events reported {reported}, shed {shed}; agent RSS {rss_before} KiB -> {rss_after} KiB");
    assert!(
        denied >= 100_000,
        "kernel verdict counter: {denied}\n{text}"
    );
    assert!(
        shed > 0 && reported + shed >= 100_000 - 1000,
        "reported {reported}, shed {shed}\n{text}"
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "agent memory grew from {rss_before} to {rss_after} KiB"
    );
}

/// Digits vary from run to run (ids, times, counts); the shape of the output must not.
fn shape(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| {
            let mut out = String::new();
            for c in l.chars() {
                if c.is_ascii_digit() {
                    if !out.ends_with('#') {
                        out.push('#');
                    }
                } else {
                    out.push(c);
                }
            }
            out.split_whitespace().collect::<Vec<_>>().join(" ")
        })
        .collect()
}

fn docs_block(doc: &str, name: &str) -> (usize, usize) {
    let begin = doc
        .find(&format!("<!-- {name}:begin"))
        .expect("begin marker");
    let begin = begin + doc[begin..].find('\n').expect("marker line") + 1;
    let end = doc.find(&format!("<!-- {name}:end")).expect("end marker");
    (begin, end)
}

#[test]
fn status_and_flows_in_operations_md_are_what_ward_prints() {
    let peer = peer!();
    let cgroups = TestCgroups::new("docs");
    let client = Placement::cgroup(cgroups.create("client"));
    let web = Placement::cgroup(cgroups.create("web"));
    // The port is chosen first and the listener opened after ward attaches: the bind hook
    // records a socket's workload when it calls bind().
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        probe.local_addr().expect("bound").port()
    };
    let spec = format!(
        "  selector:\n    labels: {{app: client}}\n  egress:\n{}",
        "    - name: to-web\n      to: [{labels: {app: web}}]\n      ports: [{port: PORT}]\n"
            .replace("PORT", &port.to_string())
    );
    let ward = Ward::start(
        &cgroups,
        &[
            Workload::new("client").label("app", "client"),
            Workload::new("web").label("app", "web"),
        ],
        &policy("client-egress", &spec),
    );
    let listener = peer.listen(Protocol::Tcp, &format!("127.0.0.1:{port}"), &web);
    assert_allowed(&peer, Protocol::Tcp, listener.addr, &client, &ward, &[]);
    // An allowed flow is counted in the kernel and reported at the agent's next reading (every
    // second); the refusal's event comes at once. Let the first be reported before the second
    // happens, so the records come in a fixed order.
    std::thread::sleep(Duration::from_millis(1500));
    let other = socket("127.0.0.1", listener.port().wrapping_add(1));
    assert_refused_at_once(&peer, Protocol::Tcp, other, &client, &ward, &[]);
    std::thread::sleep(Duration::from_millis(300));
    let ward_cmd = |args: &[&str]| {
        let done = ward_cli(&ward, args);
        assert!(done.status.success(), "ward {args:?}: {}", done.stderr);
        done.stdout
    };
    // Test-unique names (pids in paths) would make the document differ on every run.
    let unique = cgroups
        .root()
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("kernel release");
    // The cgroup v2 mount differs between hosts (hybrid: /sys/fs/cgroup/unified).
    let mount = ward_tests::cgroup2_mount().to_string_lossy().into_owned();
    let stable = |text: String| {
        text.replace(&mount, "/sys/fs/cgroup")
            .replace(&unique, "ward-docs")
            .replace(kernel.trim(), "<kernel>")
    };
    let status = stable(ward_cmd(&["status"]));
    let flows = stable(ward_cmd(&["flows"]));
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
    let mut doc = std::fs::read_to_string(&doc_path).expect("docs/operations.md");
    for (name, command, output) in [
        ("flows", "ward flows", &flows),
        ("status", "ward status", &status),
    ] {
        let (begin, end) = docs_block(&doc, name);
        let fresh = format!("```console\n# {command}\n{output}```\n");
        if std::env::var_os("WARD_UPDATE_DOCS").is_some() {
            doc.replace_range(begin..end, &fresh);
        } else {
            assert_eq!(
                shape(&doc[begin..end]),
                shape(&fresh),
                "docs/operations.md's `{command}` output is stale; run this test with WARD_UPDATE_DOCS=1"
            );
        }
    }
    if std::env::var_os("WARD_UPDATE_DOCS").is_some() {
        std::fs::write(&doc_path, doc).expect("write docs/operations.md");
    }
}
