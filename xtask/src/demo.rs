//! `cargo xtask demo`: ward on the built-in example in examples/demo. Three workloads (web,
//! client, intruder) in cgroups of their own; ward enforces examples/demo/policy.yaml, and the
//! demo makes connections and shows, for each, what the client saw and what ward logged.

use std::{
    fs,
    net::SocketAddr,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    probe, setup,
    sys::{self, heading, CgroupTree, Children},
    ward::{self, Ward},
};

const WORKLOADS: [&str; 3] = ["web", "client", "intruder"];
const WEB: &str = "127.0.0.1:8080";
const WEB_ADMIN: &str = "127.0.0.1:8081";
const HOST_SERVICE: &str = "127.0.0.1:9090";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection's verdict lines may take to be logged (allowed flows: up to the agent's
/// one-second reading of the kernel's counts).
const VERDICT_WAIT: Duration = Duration::from_millis(2500);

struct Connection {
    from: &'static str,
    to: &'static str,
    addr: &'static str,
    expect: i32,
    /// (verdict, policy) pairs ward must log for it.
    verdicts: &'static [(&'static str, &'static str)],
    why: &'static str,
}

const CONNECTIONS: &[Connection] = &[
    Connection {
        from: "client",
        to: "web",
        addr: WEB,
        expect: probe::CONNECTED,
        verdicts: &[("allow", "client-egress"), ("allow", "web-ingress")],
        why: "client-egress/to-web lets it out, web-ingress/from-client lets it in",
    },
    Connection {
        from: "client",
        to: "web's admin port",
        addr: WEB_ADMIN,
        expect: probe::REFUSED_EPERM,
        verdicts: &[("deny", "client-egress")],
        why: "the explicit deny client-egress/no-web-admin beats the allow of to-web",
    },
    Connection {
        from: "client",
        to: "a host service",
        addr: HOST_SERVICE,
        expect: probe::REFUSED_EPERM,
        verdicts: &[("deny", "client-egress")],
        why: "client is default-deny for egress and no rule allows this",
    },
    Connection {
        from: "intruder",
        to: "a host service",
        addr: HOST_SERVICE,
        expect: probe::CONNECTED,
        verdicts: &[("audit", "intruder-watch")],
        why: "intruder-watch would drop it, but it is in audit mode",
    },
    Connection {
        from: "intruder",
        to: "web",
        addr: WEB,
        expect: probe::TIMED_OUT,
        verdicts: &[("audit", "intruder-watch"), ("deny", "web-ingress")],
        why: "audited on the way out, then dropped at web's ingress: web never sees it",
    },
];

pub fn run() -> Result<()> {
    sys::require_root("demo", "it creates cgroups and loads eBPF programs")?;
    setup::run()?;
    let ward_bin = ward::binary()?;
    let example = sys::workspace_root().join("examples/demo");
    let work = sys::target_dir().join("ward-demo");
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    heading("workloads");
    let mount = sys::cgroup2_mount()?;
    println!("cgroup v2 is mounted at {}", mount.display());
    // Drop order (reverse of declaration) stops ward, then the listeners, then removes cgroups.
    let cgroups = CgroupTree::create(&mount, "ward-demo", &WORKLOADS)?;
    let mut listeners = Children::default();

    let policy = example.join("policy.yaml");
    heading(&format!("policy ({})", policy.display()));
    print!(
        "{}",
        fs::read_to_string(&policy).with_context(|| format!("reading {}", policy.display()))?
    );

    heading("start ward");
    let mut ward = Ward::start(
        &ward_bin,
        &example.join("ward.yaml"),
        &work.join("ward.log"),
    )?;
    ward.wait_ready(Duration::from_secs(60))?;

    heading("listeners");
    let mut web = sys::xtask_in_cgroup(&cgroups.path("web"))?;
    web.args([
        "serve",
        "--listen",
        WEB,
        "--listen",
        WEB_ADMIN,
        "--greeting",
        "hello from web",
    ]);
    probe::start_listener(&mut listeners, &mut web, "web (in its cgroup)")?;
    println!("listening: web (in its cgroup)");
    let mut host = Command::new(std::env::current_exe()?);
    host.args([
        "serve",
        "--listen",
        HOST_SERVICE,
        "--greeting",
        "hello from the host",
    ]);
    probe::start_listener(&mut listeners, &mut host, "a host service no workload owns")?;
    println!("listening: a host service no workload owns");

    heading("connections");
    let mut results = Vec::new();
    for (i, conn) in CONNECTIONS.iter().enumerate() {
        println!("\n[{}] {} -> {} ({})", i + 1, conn.from, conn.to, conn.addr);
        println!("    policy: {}", conn.why);
        let offset = ward.log_len();
        let addr: SocketAddr = conn.addr.parse()?;
        let (code, said) =
            probe::connect_from(&cgroups.path(conn.from), addr, false, CONNECT_TIMEOUT)?;
        println!("    {}: {said}", conn.from);
        // Refusals and audits reach the log at once, through a ring buffer and the agent's event
        // task; allowed flows come from the kernel's per-CPU counts, which the agent reads every
        // second: wait for the lines this connection should give, up to VERDICT_WAIT.
        let started = Instant::now();
        thread::sleep(Duration::from_millis(300));
        let logged: Vec<String> = loop {
            let logged: Vec<String> = ward
                .log_since(offset)
                .lines()
                .filter(|l| l.contains("verdict="))
                .map(str::to_owned)
                .collect();
            let complete = conn
                .verdicts
                .iter()
                .all(|(verdict, policy)| logged.iter().any(|l| names(l, verdict, policy)));
            if complete || started.elapsed() >= VERDICT_WAIT {
                break logged;
            }
            thread::sleep(Duration::from_millis(50));
        };
        // A retransmitted SYN is decided (and logged) again: say so once, with a count.
        let mut briefs: Vec<(String, usize)> = Vec::new();
        for line in &logged {
            match briefs.last_mut() {
                Some((last, n)) if *last == brief(line) => *n += 1,
                _ => briefs.push((brief(line), 1)),
            }
        }
        for (line, n) in briefs {
            let times = if n > 1 {
                format!(" (x{n})")
            } else {
                String::new()
            };
            println!("    ward: {line}{times}");
        }
        if logged.is_empty() {
            println!("    ward: (no verdict line)");
        }
        let missing: Vec<String> = conn
            .verdicts
            .iter()
            .filter(|(verdict, policy)| !logged.iter().any(|l| names(l, verdict, policy)))
            .map(|(verdict, policy)| format!("{verdict} by {policy}"))
            .collect();
        let mut problems = Vec::new();
        if code != conn.expect {
            problems.push(format!("expected it to {}", outcome(conn.expect)));
        }
        if !missing.is_empty() {
            problems.push(format!("no verdict line for {}", missing.join(", ")));
        }
        results.push((conn, code, problems));
    }

    heading("stop ward");
    match ward.stop()? {
        Some(status) => println!("ward exited ({status})"),
        None => println!("ward had already exited"),
    }
    listeners.kill_all();
    drop(cgroups);

    heading("summary");
    println!(
        "  {:<3} {:<9} {:<17} {:<11} {:<11} check",
        "#", "from", "to", "expected", "got"
    );
    for (i, (conn, code, problems)) in results.iter().enumerate() {
        let check = if problems.is_empty() {
            "ok".to_owned()
        } else {
            problems.join("; ")
        };
        let (expected, got) = (outcome(conn.expect), outcome(*code));
        println!(
            "  {:<3} {:<9} {:<17} {expected:<11} {got:<11} {check}",
            i + 1,
            conn.from,
            conn.to
        );
    }
    println!("full log of ward: {}", work.join("ward.log").display());
    let wrong = results
        .iter()
        .filter(|(_, _, problems)| !problems.is_empty())
        .count();
    if wrong > 0 {
        bail!(
            "{wrong} of {} connections did not behave as the policy says",
            results.len()
        );
    }
    println!(
        "all {} connections behaved as the policy says",
        results.len()
    );
    Ok(())
}

/// A verdict line as `DENY egress by client-egress/no-web-admin: client -> web :8081`; the
/// line as it is if it lacks those fields.
fn brief(line: &str) -> String {
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .filter(|v| !v.is_empty())
    };
    let peer = |workload: &str, identity: &str| field(workload).or(field(identity)).unwrap_or("?");
    match (
        field("verdict"),
        field("direction"),
        field("policy"),
        field("rule"),
    ) {
        (Some(verdict), Some(direction), Some(policy), Some(rule)) => format!(
            "{} {direction} by {policy}/{rule}: {} -> {} :{}",
            verdict.to_uppercase(),
            peer("src_workload", "src"),
            peer("dst_workload", "dst"),
            field("dst_port").unwrap_or("?"),
        ),
        _ => line.to_owned(),
    }
}

fn names(line: &str, verdict: &str, policy: &str) -> bool {
    let line = line.to_ascii_lowercase();
    line.contains(&format!("verdict={verdict}")) && line.contains(&format!("policy={policy}"))
}

fn outcome(code: i32) -> &'static str {
    match code {
        probe::CONNECTED => "connect",
        probe::REFUSED_EPERM => "get EPERM",
        probe::TIMED_OUT => "time out",
        _ => "fail",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_lines_read_as_sentences() {
        let line =
            "2026-11-23T10:50:11Z INFO ward::verdict: verdict verdict=audit direction=egress \
                    policy=intruder-watch rule=default-deny src=spiffe://x/intruder \
                    src_workload=intruder dst=host dst_workload= dst_port=9090 protocol=tcp";
        assert_eq!(
            brief(line),
            "AUDIT egress by intruder-watch/default-deny: intruder -> host :9090"
        );
        assert!(names(line, "audit", "intruder-watch"));
        assert!(!names(line, "deny", "intruder-watch"));
        assert_eq!(brief("INFO ward: ready"), "INFO ward: ready");
    }
}
