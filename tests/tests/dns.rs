//! DNS-aware egress (`fqdn` and `fqdnPattern` peers) against real resolvers and real clients.
//!
//! Each test builds a lab (`ward_tests::dns::DnsLab`): the agent runs in a node namespace; one
//! client workload shares that namespace (`host-client`, its resolver configuration bind-mounted
//! in a mount namespace of its own) and one is a pod in a namespace of its own routed through the
//! node (`pod-client`); a peer namespace holds the resolver (dnsmasq, or a scripted stand-in) and
//! an HTTP server on port 8080 behind every name. Clients resolve with glibc (`getent`, `curl`)
//! and dig and connect to what they got.

mod support;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::*;

use ward_tests::dns::{
    self, dig, dns_client, flood_summary, many_v4, metric, rss_kib, DnsLab, Dnsmasq, Pod, ADOPTED,
    PROXY_PORT,
};
use ward_tests::scripted_resolver::{
    self as scripted, Message, Query, RecordType, Reply, ResponseCode, ScriptedResolver, Transport,
};
use ward_tests::{
    outcomes_of, parse_verdicts, peer, scaled, Background, Finished, Listener, Outcome, Peer,
    Placement, Protocol, Verdict, VerdictQuery, Ward, Workload,
};

/// The port of the HTTP server behind every name.
const PORT: u16 = 8080;
const HOST_CLIENT: &str = "host-client";
const POD_CLIENT: &str = "pod-client";
const POLICY: &str = "client-egress";

/// A lab with both clients and the HTTP server; the resolver and the agent are each test's.
struct Setup {
    peer: Peer,
    _http: Listener,
    pod: Pod,
    host: Placement,
    lab: DnsLab,
}

impl Setup {
    /// The lab, with the peer holding hosts `server_hosts` besides host 1.
    fn new(tag: &str, server_hosts: &[u8]) -> Setup {
        ward_tests::require_programs(&[("dig", "bind9-dnsutils"), ("dnsmasq", "dnsmasq-base")]);
        let peer = peer!();
        let mut lab = DnsLab::new(tag);
        for host in server_hosts {
            lab.add_server_host(*host);
        }
        let http = peer.listen_http(
            &format!("[::]:{PORT}"),
            &Placement::host().in_netns(lab.peer().name()),
        );
        let host = lab.workload(HOST_CLIENT);
        let pod = lab.pod(POD_CLIENT);
        Setup {
            peer,
            _http: http,
            pod,
            host,
            lab,
        }
    }

    /// Each client with its workload's name.
    fn clients(&self) -> [(&'static str, &Placement); 2] {
        [(HOST_CLIENT, &self.host), (POD_CLIENT, &self.pod.placement)]
    }

    /// Starts the agent, then the pod, and waits until the agent serves DNS in the pod.
    fn start(&mut self, policy: &str, dns: &str, args: &[&str]) -> Ward {
        let workloads = [
            Workload::new(HOST_CLIENT).label("app", "client"),
            Workload::new(POD_CLIENT).label("app", "client"),
        ];
        let ward = self.lab.start_ward(&workloads, policy, dns, args);
        self.pod.start();
        self.pod.wait_for_proxy(&ward, 0, POD_CLIENT);
        ward
    }

    /// A resolver configuration naming `server` (and `options`), retrying after a second.
    fn resolv(&self, server: IpAddr, options: &str) -> PathBuf {
        let label = format!("{server}{options}").replace([':', ' '], "_");
        self.lab.resolv_conf(
            &label,
            &format!("nameserver {server}\noptions timeout:1 attempts:2 {options}\n"),
        )
    }

    /// The addresses `getent <database> <name>` gives in `at`, in order, without repeats.
    fn getent(&self, at: &Placement, resolv: &Path, database: &str, name: &str) -> Vec<IpAddr> {
        let done = self.lab.resolving(at, resolv, "getent", &[database, name]);
        assert!(
            done.status.success(),
            "getent {database} {name} failed: {done:?}"
        );
        let mut addresses: Vec<IpAddr> = Vec::new();
        for line in done.stdout.lines() {
            let address = line
                .split_whitespace()
                .next()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("getent printed {line:?}"));
            if !addresses.contains(&address) {
                addresses.push(address);
            }
        }
        addresses
    }

    fn curl(&self, at: &Placement, resolv: &Path, args: &[&str]) -> Finished {
        let mut full = vec!["-sS", "--max-time", "5"];
        full.extend_from_slice(args);
        self.lab.resolving(at, resolv, "curl", &full)
    }

    /// One TCP connection from `at` to `to`.
    fn connect(&self, at: &Placement, to: SocketAddr) -> Outcome {
        self.peer
            .connect(Protocol::Tcp, to, at, &["--timeout-ms", "2000"])
            .only()
            .clone()
    }

    /// Panics with the agent's log unless a connection from `who` to `address` port 8080 comes
    /// to `want`.
    fn expect(&self, who: &str, address: IpAddr, want: Outcome, ward: &Ward, when: &str) {
        self.expect_at(who, SocketAddr::new(address, PORT), want, ward, when);
    }

    fn expect_at(&self, who: &str, to: SocketAddr, want: Outcome, ward: &Ward, when: &str) {
        let got = self.connect(self.placement(who), to);
        assert_eq!(
            got,
            want,
            "{who} to {to} {when}; ward log:\n{}",
            ward.log().tail(60)
        );
    }

    fn placement(&self, who: &str) -> &Placement {
        match who {
            HOST_CLIENT => &self.host,
            POD_CLIENT => &self.pod.placement,
            other => panic!("no client {other}"),
        }
    }
}

/// The policy of every test's clients: DNS to `resolvers` (port 53, UDP and TCP; to any peer when
/// there are none), then `rules`.
fn client_policy(resolvers: &[IpAddr], rules: &str) -> String {
    let to: Vec<String> = resolvers
        .iter()
        .map(|r| {
            let bits = if r.is_ipv4() { 32 } else { 128 };
            format!("{{cidr: \"{r}/{bits}\"}}")
        })
        .collect();
    let to = if to.is_empty() {
        String::new()
    } else {
        format!("      to: [{}]\n", to.join(", "))
    };
    let dns = format!(
        "    - name: dns\n{to}      ports: [{{port: 53, protocol: UDP}}, {{port: 53, protocol: TCP}}]\n"
    );
    client_egress(POLICY, &(dns + rules))
}

/// An allow rule to port 8080 of `peers` (`fqdn: ...`, `fqdnPattern: "..."`).
fn name_rule(rule: &str, peers: &[String]) -> String {
    let to: Vec<String> = peers.iter().map(|p| format!("{{{p}}}")).collect();
    format!(
        "    - name: {rule}\n      to: [{}]\n      ports: [{{port: {PORT}}}]\n",
        to.join(", ")
    )
}

fn fqdn(name: &str) -> String {
    format!("fqdn: {name}")
}

fn pattern(pattern: &str) -> String {
    format!("fqdnPattern: \"{pattern}\"")
}

/// dnsmasq's record of `name` with `addresses` and `ttl`.
fn host_record(name: &str, addresses: &[IpAddr], ttl: u32) -> String {
    let addresses: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
    format!("--host-record={name},{},{ttl}", addresses.join(","))
}

fn source(who: &str) -> String {
    format!("workload/{who}")
}

/// The first verdict matching `query` whose destination address is `address`, waiting for it.
fn wait_for_verdict_to(ward: &Ward, query: &VerdictQuery<'_>, address: IpAddr) -> Verdict {
    let deadline = Instant::now() + event_timeout();
    let address = address.to_string();
    loop {
        let found = parse_verdicts(&ward.lines())
            .into_iter()
            .find(|v| query.matches(v) && v.dst_addr.as_deref() == Some(address.as_str()));
        if let Some(verdict) = found {
            return verdict;
        }
        assert!(
            Instant::now() < deadline,
            "no verdict {query:?} to {address}; log:\n{}",
            ward.log().tail(100)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ward <args>` against this agent's admin socket.
fn ward_cli(ward: &Ward, args: &[&str]) -> Finished {
    let mut command = std::process::Command::new(ward_tests::ward_bin());
    command
        .args(args)
        .arg("--admin-socket")
        .arg(ward.admin_socket());
    let done = ward_tests::run("ward", command, scaled(Duration::from_secs(10)));
    assert!(done.status.success(), "ward {args:?}: {done:?}");
    done
}

/// Waits until the agent's metrics satisfy `predicate`; returns them.
fn wait_for_metrics(lab: &DnsLab, what: &str, predicate: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + event_timeout();
    loop {
        let text = lab.metrics();
        if predicate(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "the metrics never showed {what}:\n{}",
            text.lines()
                .filter(|l| l.starts_with("ward_dns"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The `ward_dns_*` lines of the metrics, for messages.
fn dns_metrics(text: &str) -> String {
    text.lines()
        .filter(|l| l.starts_with("ward_dns"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an address literal")
}

/// The resolver (lab host 1, dnsmasq) answering `api.test.example` with host 2 and
/// `other.test.example` with host 3, for 30 s.
fn api_and_other(s: &Setup) -> (IpAddr, IpAddr, IpAddr, Dnsmasq) {
    let (resolver, api, other) = (s.lab.v4(1), s.lab.v4(2), s.lab.v4(3));
    let dnsmasq = Dnsmasq::start(
        s.lab.peer().name(),
        &[resolver],
        &[
            host_record("api.test.example", &[api], 30),
            host_record("other.test.example", &[other], 30),
        ],
        &s.lab.outside(),
    );
    (resolver, api, other, dnsmasq)
}

#[test]
fn a_name_in_the_policy_is_reachable_at_the_addresses_it_resolved_to_only() {
    let mut s = Setup::new("dns-basic", &[2, 3]);
    let (resolver, api, other, _dnsmasq) = api_and_other(&s);
    let policy = client_policy(&[resolver], &name_rule("api", &[fqdn("api.test.example")]));
    let ward = s.start(&policy, "{minTtlSeconds: 2, maxTtlSeconds: 30}", &[]);
    let resolv = s.resolv(resolver, "");

    for (who, at) in s.clients() {
        // Addresses are learned per workload: the other client's answers do not count here.
        s.expect(
            who,
            api,
            Outcome::Eperm,
            &ward,
            "before it resolved the name",
        );
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "api.test.example"),
            [api],
            "{who}: glibc's answer"
        );
        s.expect(
            who,
            api,
            Outcome::Ok,
            &ward,
            "after getent resolved api.test.example",
        );
        s.expect(
            who,
            other,
            Outcome::Eperm,
            &ward,
            "(not an address of api.test.example)",
        );
        let curl = s.curl(at, &resolv, &["http://api.test.example:8080/"]);
        assert!(
            curl.status.success() && curl.stdout == "hello\n",
            "{who}: curl to the allowed name: {curl:?}"
        );
        // The rule's ports apply to the learned address as to any peer.
        s.expect_at(
            who,
            SocketAddr::new(api, 9090),
            Outcome::Eperm,
            &ward,
            "(a port the rule does not name)",
        );
        // An IPv6 socket to the IPv4-mapped address reaches the same address.
        let mapped = |a: IpAddr| match a {
            IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), PORT),
            IpAddr::V6(_) => unreachable!("an IPv4 address"),
        };
        s.expect_at(who, mapped(api), Outcome::Ok, &ward, "(IPv4-mapped)");
        s.expect_at(who, mapped(other), Outcome::Eperm, &ward, "(IPv4-mapped)");

        // A name the policy does not name is answered, and nothing is learned from it.
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "other.test.example"),
            [other],
            "{who}: a name outside the policy is answered"
        );
        let curl = s.curl(at, &resolv, &["http://other.test.example:8080/"]);
        // curl exit 7: could not connect.
        assert_eq!(
            curl.status.code(),
            Some(7),
            "{who}: curl to a name outside the policy: {curl:?}"
        );
        s.expect(
            who,
            other,
            Outcome::Eperm,
            &ward,
            "after other.test.example was resolved",
        );

        let answer = dig(at, resolver, &["api.test.example"]);
        assert_eq!(
            answer.status.as_deref(),
            Some("NOERROR"),
            "{who}: {answer:?}"
        );
        assert_eq!(answer.addresses(), [api], "{who}: dig");
    }

    for (who, _) in s.clients() {
        let src = source(who);
        let allowed = wait_for_verdict_to(
            &ward,
            &VerdictQuery {
                verdict: Some("allow"),
                direction: Some("egress"),
                policy: Some(POLICY),
                rule: Some("api"),
                src: Some(&src),
                dst_port: Some(PORT),
                protocol: Some("tcp"),
                ..Default::default()
            },
            api,
        );
        assert_eq!(
            allowed.dst.as_deref(),
            Some("dns:api.test.example"),
            "the allowed connection names the name it was learned from: {}",
            allowed.line
        );
        let denied = wait_for_verdict_to(
            &ward,
            &VerdictQuery {
                verdict: Some("deny"),
                direction: Some("egress"),
                policy: Some(POLICY),
                src: Some(&src),
                dst_port: Some(PORT),
                ..Default::default()
            },
            other,
        );
        assert!(
            VerdictQuery {
                rule: Some("default-deny"),
                ..Default::default()
            }
            .matches(&denied),
            "the refusal names the default deny: {}",
            denied.line
        );
    }
    let flows = ward_cli(&ward, &["flows"]).stdout;
    assert!(
        flows
            .lines()
            .any(|l| l.contains("dns:api.test.example") && l.contains("api")),
        "ward flows names the learned name:\n{flows}"
    );
}

#[test]
fn a_learned_address_is_refused_once_its_bounded_ttl_is_over() {
    let mut s = Setup::new("dns-ttl", &[2, 3]);
    let (resolver, short, long) = (s.lab.v4(1), s.lab.v4(2), s.lab.v4(3));
    let _dnsmasq = Dnsmasq::start(
        s.lab.peer().name(),
        &[resolver],
        &[
            host_record("short.test.example", &[short], 1),
            host_record("long.test.example", &[long], 600),
        ],
        &s.lab.outside(),
    );
    let policy = client_policy(
        &[resolver],
        &name_rule(
            "names",
            &[fqdn("short.test.example"), fqdn("long.test.example")],
        ),
    );
    // Stretched where every process start is slower (`scaled`), so that the checks within the
    // bounds stay within them.
    let min = scaled(Duration::from_secs(2));
    let max = min + scaled(Duration::from_secs(1));
    let dns = format!(
        "{{minTtlSeconds: {}, maxTtlSeconds: {}}}",
        min.as_secs(),
        max.as_secs()
    );
    let ward = s.start(&policy, &dns, &[]);
    let resolv = s.resolv(resolver, "");

    // TTL 1 counts for minTtlSeconds, TTL 600 for maxTtlSeconds.
    let mut last_learned = Instant::now();
    for (who, at) in s.clients() {
        let asked = Instant::now();
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "short.test.example"),
            [short]
        );
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "long.test.example"),
            [long]
        );
        last_learned = Instant::now();
        s.expect(who, short, Outcome::Ok, &ward, "right after resolving");
        s.expect(who, long, Outcome::Ok, &ward, "right after resolving");
        // Past the answer's own TTL of 1 s, within minTtlSeconds.
        std::thread::sleep(
            (last_learned + Duration::from_millis(1100)).saturating_duration_since(Instant::now()),
        );
        s.expect(
            who,
            short,
            Outcome::Ok,
            &ward,
            "1.1 s after an answer with TTL 1 (within minTtlSeconds)",
        );
        assert!(
            asked.elapsed() < min,
            "{who}: the checks within minTtlSeconds took {:?}: inconclusive",
            asked.elapsed()
        );
    }
    std::thread::sleep(
        (last_learned + max + Duration::from_millis(500)).saturating_duration_since(Instant::now()),
    );
    for (who, _) in s.clients() {
        s.expect(
            who,
            short,
            Outcome::Eperm,
            &ward,
            "after minTtlSeconds, not resolved again",
        );
        s.expect(
            who,
            long,
            Outcome::Eperm,
            &ward,
            "after maxTtlSeconds, not resolved again",
        );
    }
    let text = wait_for_metrics(&s.lab, "no learned address left", |t| {
        metric(t, "ward_dns_learned_addresses") == 0.0
    });
    assert_eq!(
        metric(&text, "ward_dns_learned_names"),
        0.0,
        "{}",
        dns_metrics(&text)
    );

    // Resolving again admits it again; the answer reaches the client with its TTL unchanged.
    for (who, at) in s.clients() {
        let answer = dig(at, resolver, &["long.test.example"]);
        assert_eq!(
            answer.answers.first().map(|r| r.ttl),
            Some(600),
            "{who}: {answer:?}"
        );
        s.expect(who, long, Outcome::Ok, &ward, "after resolving it again");
    }
}

#[test]
fn a_cname_chain_and_a_pattern_admit_the_names_they_match_and_no_others() {
    let mut s = Setup::new("dns-cname", &[2, 3, 4, 5, 6, 7, 8]);
    let resolver = s.lab.v4(1);
    let (api, other, one_wild, bare_wild, deep_wild, edge) = (
        s.lab.v4(2),
        s.lab.v4(3),
        s.lab.v4(4),
        s.lab.v4(5),
        s.lab.v4(6),
        s.lab.v4(7),
    );
    let blocked = s.lab.v4(8);
    let _dnsmasq = Dnsmasq::start(
        s.lab.peer().name(),
        &[resolver],
        &[
            host_record("api.test.example", &[api], 30),
            host_record("other.test.example", &[other], 30),
            host_record("edge.test.example", &[edge], 30),
            host_record("one.wild.test.example", &[one_wild], 30),
            host_record("wild.test.example", &[bare_wild], 30),
            host_record("two.one.wild.test.example", &[deep_wild], 30),
            // An alias of a name in the policy; a name in the policy that is an alias of one
            // outside it (as a CDN answers); an alias of a name outside it.
            "--cname=alias.test.example,api.test.example".into(),
            "--cname=www.test.example,edge.test.example".into(),
            "--cname=sneaky.test.example,other.test.example".into(),
            host_record("blocked.wild.test.example", &[blocked], 30),
        ],
        &s.lab.outside(),
    );
    let rules = name_rule("api", &[fqdn("api.test.example")])
        + &name_rule("www", &[fqdn("www.test.example")])
        + &name_rule("wild", &[pattern("*.wild.test.example")])
        + &format!(
            "    - name: block-address\n      action: deny\n      to: [{{cidr: {blocked}/32}}]\n      \
             ports: [{{port: {PORT}}}]\n"
        );
    let ward = s.start(
        &client_policy(&[resolver], &rules),
        "{minTtlSeconds: 30}",
        &[],
    );
    let resolv = s.resolv(resolver, "");

    for (who, at) in s.clients() {
        // alias → api: learned under api's rule.
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "alias.test.example"),
            [api]
        );
        s.expect(
            who,
            api,
            Outcome::Ok,
            &ward,
            "after resolving an alias of api.test.example",
        );
        // www (in the policy) → edge (outside it): the chain starts at the asked name.
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "www.test.example"),
            [edge]
        );
        s.expect(
            who,
            edge,
            Outcome::Ok,
            &ward,
            "after resolving www.test.example (→ edge)",
        );
        // sneaky (outside) → other (outside): nothing.
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "sneaky.test.example"),
            [other]
        );
        s.expect(
            who,
            other,
            Outcome::Eperm,
            &ward,
            "after resolving an alias outside the policy",
        );

        // `*` is one label: neither the bare parent nor two labels deep match.
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "wild.test.example"),
            [bare_wild]
        );
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "two.one.wild.test.example"),
            [deep_wild]
        );
        s.expect(
            who,
            bare_wild,
            Outcome::Eperm,
            &ward,
            "(wild.test.example: the pattern's parent)",
        );
        s.expect(
            who,
            deep_wild,
            Outcome::Eperm,
            &ward,
            "(two labels below the pattern's parent)",
        );
        let answer = dig(at, resolver, &["One.WILD.test.example"]);
        assert_eq!(
            answer.status.as_deref(),
            Some("NOERROR"),
            "{who}: {answer:?}"
        );
        assert_eq!(answer.addresses(), [one_wild], "{who}: {answer:?}");
        s.expect(
            who,
            one_wild,
            Outcome::Ok,
            &ward,
            "after resolving one.wild.test.example (any case)",
        );
        let curl = s.curl(at, &resolv, &["http://one.wild.test.example:8080/"]);
        assert!(curl.status.success(), "{who}: {curl:?}");
        s.expect(who, bare_wild, Outcome::Eperm, &ward, "(the parent, still)");
        // A deny rule of the address itself wins over the name it was learned from.
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "blocked.wild.test.example"),
            [blocked]
        );
        s.expect(
            who,
            blocked,
            Outcome::Eperm,
            &ward,
            "(a name the pattern admits, an address a deny rule names)",
        );
    }
    for (who, _) in s.clients() {
        let src = source(who);
        let via_alias = wait_for_verdict_to(
            &ward,
            &VerdictQuery {
                verdict: Some("allow"),
                rule: Some("api"),
                src: Some(&src),
                ..Default::default()
            },
            api,
        );
        assert!(
            via_alias
                .dst
                .as_deref()
                .is_some_and(|d| d.starts_with("dns:")),
            "{}",
            via_alias.line
        );
        wait_for_verdict_to(
            &ward,
            &VerdictQuery {
                verdict: Some("allow"),
                rule: Some("wild"),
                src: Some(&src),
                dst: Some("dns:one.wild.test.example"),
                ..Default::default()
            },
            one_wild,
        );
        wait_for_verdict_to(
            &ward,
            &VerdictQuery {
                verdict: Some("deny"),
                rule: Some("block-address"),
                src: Some(&src),
                ..Default::default()
            },
            blocked,
        );
    }
}

#[test]
fn policy_reloads_keep_the_learned_addresses_of_the_names_they_still_name() {
    let mut s = Setup::new("dns-reload", &[2, 3]);
    let (resolver, api, web) = (s.lab.v4(1), s.lab.v4(2), s.lab.v4(3));
    let _dnsmasq = Dnsmasq::start(
        s.lab.peer().name(),
        &[resolver],
        &[
            host_record("api.test.example", &[api], 300),
            host_record("web.test.example", &[web], 300),
        ],
        &s.lab.outside(),
    );
    let both = name_rule("api", &[fqdn("api.test.example")])
        + &name_rule("web", &[fqdn("web.test.example")]);
    let mut ward = s.start(
        &client_policy(&[resolver], &both),
        "{minTtlSeconds: 300}",
        &[],
    );
    let resolv = s.resolv(resolver, "");
    for (who, at) in s.clients() {
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "api.test.example"),
            [api],
            "{who}"
        );
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "web.test.example"),
            [web],
            "{who}"
        );
        s.expect(who, api, Outcome::Ok, &ward, "after resolving it");
        s.expect(who, web, Outcome::Ok, &ward, "after resolving it");
    }

    // Unrelated changes, applied twice so that both generation bits hold a new policy.
    for n in 1..=2 {
        let extra = allow_tcp(&format!("unrelated-{n}"), 9000 + n);
        ward.replace_policy(&client_policy(&[resolver], &(both.clone() + &extra)));
        for (who, _) in s.clients() {
            s.expect(
                who,
                api,
                Outcome::Ok,
                &ward,
                &format!("after reload {n}, not resolved again"),
            );
            s.expect(
                who,
                web,
                Outcome::Ok,
                &ward,
                &format!("after reload {n}, not resolved again"),
            );
        }
    }
    // A policy that no longer names web.test.example: its address is refused, api's is not.
    let api_only = client_policy(&[resolver], &name_rule("api", &[fqdn("api.test.example")]));
    ward.replace_policy(&api_only);
    for (who, _) in s.clients() {
        s.expect(
            who,
            web,
            Outcome::Eperm,
            &ward,
            "after a reload that no longer names it",
        );
        s.expect(
            who,
            api,
            Outcome::Ok,
            &ward,
            "after a reload that still names it",
        );
    }
    // The same name under a pattern and another rule name: learned again, decided by the new
    // rule, named by it.
    let by_pattern = client_policy(
        &[resolver],
        &name_rule("anything-under-test", &[pattern("*.test.example")]),
    );
    ward.replace_policy(&by_pattern);
    for (who, at) in s.clients() {
        s.expect(
            who,
            api,
            Outcome::Ok,
            &ward,
            "after a reload that names it by a pattern",
        );
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "web.test.example"),
            [web],
            "{who}"
        );
        s.expect(
            who,
            web,
            Outcome::Ok,
            &ward,
            "resolved again under the pattern",
        );
        let src = source(who);
        wait_for_verdict_to(
            &ward,
            &VerdictQuery {
                verdict: Some("allow"),
                rule: Some("anything-under-test"),
                src: Some(&src),
                dst: Some("dns:api.test.example"),
                ..Default::default()
            },
            api,
        );
    }
}

#[test]
fn names_that_share_an_address_each_keep_their_rule() {
    // Virtual hosting: two names, one address (as a CDN answers), each allowed on its own port.
    let mut s = Setup::new("dns-shared", &[2]);
    let (resolver, shared) = (s.lab.v4(1), s.lab.v4(2));
    let _dnsmasq = Dnsmasq::start(
        s.lab.peer().name(),
        &[resolver],
        &[
            host_record("api.test.example", &[shared], 300),
            host_record("db.test.example", &[shared], 300),
        ],
        &s.lab.outside(),
    );
    let rules = name_rule("api", &[fqdn("api.test.example")])
        + "    - name: db\n      to: [{fqdn: db.test.example}]\n      ports: [{port: 5432}]\n";
    let ward = s.start(
        &client_policy(&[resolver], &rules),
        "{minTtlSeconds: 300}",
        &[],
    );
    let resolv = s.resolv(resolver, "");
    let db_port = SocketAddr::new(shared, 5432);
    for (who, at) in s.clients() {
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "api.test.example"),
            [shared],
            "{who}"
        );
        s.expect(
            who,
            shared,
            Outcome::Ok,
            &ward,
            "(api's port, after resolving api)",
        );
        s.expect_at(
            who,
            db_port,
            Outcome::Eperm,
            &ward,
            "(db's port, db not resolved)",
        );
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "db.test.example"),
            [shared],
            "{who}"
        );
        // Nothing listens on 5432: allowed shows as refused by the peer, not EPERM.
        s.expect_at(
            who,
            db_port,
            Outcome::Refused,
            &ward,
            "(db's port, after resolving db)",
        );
        s.expect(
            who,
            shared,
            Outcome::Ok,
            &ward,
            "(api's port: api still resolves to it, within its TTL, after db resolved to it too)",
        );
    }
}

#[test]
fn a_resolver_on_loopback_is_proxied_like_any_other() {
    // A node-local resolver (as systemd-resolved's 127.0.0.53) for the workload beside the
    // agent, and one on the pod's own loopback (as a resolver sidecar) for the pod.
    let mut s = Setup::new("dns-loopback", &[2]);
    let api = s.lab.v4(2);
    let local = ip("127.0.0.53");
    let records = [host_record("api.test.example", &[api], 300)];
    let _node_resolver = Dnsmasq::start(s.lab.node(), &[local], &records, &s.lab.outside());
    let in_pod = Placement::host().in_netns(&s.pod.netns);
    let _pod_resolver = Dnsmasq::start(&s.pod.netns, &[local], &records, &in_pod);
    let rules = name_rule("api", &[fqdn("api.test.example")]);
    // A loopback address is the host's, not a `cidr` peer: DNS is allowed to any resolver.
    let ward = s.start(&client_policy(&[], &rules), "{minTtlSeconds: 300}", &[]);
    let resolv = s.resolv(local, "");
    for (who, at) in s.clients() {
        s.expect(
            who,
            api,
            Outcome::Eperm,
            &ward,
            "before it resolved the name",
        );
        let answer = dig(at, local, &["api.test.example"]);
        assert_eq!(
            answer.status.as_deref(),
            Some("NOERROR"),
            "{who}: {answer:?}; ward log:\n{}",
            ward.log().tail(30)
        );
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "api.test.example"),
            [api],
            "{who}"
        );
        s.expect(
            who,
            api,
            Outcome::Ok,
            &ward,
            "after resolving it through a loopback resolver",
        );
        let answer = dig(at, local, &["+tcp", "api.test.example"]);
        assert_eq!(
            answer.status.as_deref(),
            Some("NOERROR"),
            "{who}: {answer:?}"
        );
    }
}

#[test]
fn dns_over_tcp_is_learned_from_dig_and_from_glibc_with_use_vc() {
    let mut s = Setup::new("dns-tcp", &[2, 3, 4, 5]);
    let (resolver, by_dig, by_glibc) = (s.lab.v4(1), s.lab.v4(2), s.lab.v4(3));
    let (first, second) = (s.lab.v4(4), s.lab.v4(5));
    let _dnsmasq = Dnsmasq::start(
        s.lab.peer().name(),
        &[resolver],
        &[
            host_record("dig.test.example", &[by_dig], 30),
            host_record("vc.test.example", &[by_glibc], 30),
            host_record("first.test.example", &[first], 30),
            host_record("second.test.example", &[second], 30),
        ],
        &s.lab.outside(),
    );
    let rules = name_rule(
        "tcp",
        &[
            fqdn("dig.test.example"),
            fqdn("vc.test.example"),
            fqdn("first.test.example"),
            fqdn("second.test.example"),
        ],
    );
    let ward = s.start(
        &client_policy(&[resolver], &rules),
        "{minTtlSeconds: 30}",
        &[],
    );
    let use_vc = s.resolv(resolver, "use-vc");
    let tcp_before = metric(
        &s.lab.metrics(),
        "ward_dns_queries_total{result=\"forwarded\"}",
    );

    for (who, at) in s.clients() {
        s.expect(
            who,
            by_dig,
            Outcome::Eperm,
            &ward,
            "before it resolved the name",
        );
        let answer = dig(at, resolver, &["+tcp", "dig.test.example"]);
        assert_eq!(
            answer.status.as_deref(),
            Some("NOERROR"),
            "{who}: {answer:?}"
        );
        assert_eq!(answer.addresses(), [by_dig], "{who}: dig +tcp");
        s.expect(
            who,
            by_dig,
            Outcome::Ok,
            &ward,
            "after dig +tcp resolved it",
        );

        s.expect(
            who,
            by_glibc,
            Outcome::Eperm,
            &ward,
            "before it resolved the name",
        );
        assert_eq!(
            s.getent(at, &use_vc, "ahostsv4", "vc.test.example"),
            [by_glibc]
        );
        s.expect(
            who,
            by_glibc,
            Outcome::Ok,
            &ward,
            "after getent with `options use-vc`",
        );
        let curl = s.curl(at, &use_vc, &["http://vc.test.example:8080/"]);
        assert!(curl.status.success(), "{who}: curl with use-vc: {curl:?}");

        // Two queries on one connection: both answers teach.
        let both = dig(
            at,
            resolver,
            &[
                "+tcp",
                "+keepopen",
                "first.test.example",
                "second.test.example",
            ],
        );
        assert_eq!(both.addresses(), [first, second], "{who}: {both:?}");
        s.expect(
            who,
            first,
            Outcome::Ok,
            &ward,
            "(first query on a TCP connection)",
        );
        s.expect(
            who,
            second,
            Outcome::Ok,
            &ward,
            "(second query on the same connection)",
        );
    }
    let text = s.lab.metrics();
    assert!(
        metric(&text, "ward_dns_queries_total{result=\"forwarded\"}") >= tcp_before + 4.0,
        "the proxy forwarded the TCP queries:\n{}",
        dns_metrics(&text)
    );
}

#[test]
fn ipv6_resolver_and_aaaa_answers_admit_ipv6_connections() {
    let mut s = Setup::new("dns-ipv6", &[2, 3, 4]);
    let resolver = s.lab.v6(1);
    let (dual4, dual6, other6) = (s.lab.v4(2), s.lab.v6(2), s.lab.v6(3));
    let tcp6 = s.lab.v6(4);
    let _dnsmasq = Dnsmasq::start(
        s.lab.peer().name(),
        &[resolver],
        &[
            host_record("dual.test.example", &[dual4, dual6], 30),
            host_record("six.test.example", &[other6], 30),
            host_record("tcp.test.example", &[tcp6], 30),
        ],
        &s.lab.outside(),
    );
    let rules = name_rule(
        "dual",
        &[fqdn("dual.test.example"), fqdn("tcp.test.example")],
    );
    // Only the IPv6 resolver is allowed.
    let ward = s.start(
        &client_policy(&[resolver], &rules),
        "{minTtlSeconds: 30}",
        &[],
    );
    let resolv = s.resolv(resolver, "");

    for (who, at) in s.clients() {
        s.expect(
            who,
            dual6,
            Outcome::Eperm,
            &ward,
            "before it resolved the name",
        );
        s.expect(
            who,
            dual4,
            Outcome::Eperm,
            &ward,
            "before it resolved the name",
        );
        // AAAA only: the IPv6 address is learned, the IPv4 one is not.
        let answer = dig(at, resolver, &["AAAA", "dual.test.example"]);
        assert_eq!(
            answer.status.as_deref(),
            Some("NOERROR"),
            "{who}: {answer:?}"
        );
        assert_eq!(answer.addresses(), [dual6], "{who}: {answer:?}");
        s.expect(
            who,
            dual6,
            Outcome::Ok,
            &ward,
            "after an AAAA answer from an IPv6 resolver",
        );
        s.expect(who, dual4, Outcome::Eperm, &ward, "(asked AAAA only)");
        s.expect(
            who,
            other6,
            Outcome::Eperm,
            &ward,
            "(not an address of dual.test.example)",
        );
        // An A answer through the IPv6 resolver teaches the IPv4 address.
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "dual.test.example"),
            [dual4]
        );
        s.expect(
            who,
            dual4,
            Outcome::Ok,
            &ward,
            "after an A answer from the IPv6 resolver",
        );
        assert_eq!(
            s.getent(at, &resolv, "ahostsv6", "dual.test.example"),
            [dual6]
        );
        let curl = s.curl(at, &resolv, &["-6", "http://dual.test.example:8080/"]);
        assert!(curl.status.success(), "{who}: curl -6: {curl:?}");
        let answer = dig(at, resolver, &["AAAA", "six.test.example"]);
        assert_eq!(
            answer.status.as_deref(),
            Some("NOERROR"),
            "{who}: {answer:?}"
        );
        assert_eq!(answer.addresses(), [other6], "{who}: {answer:?}");
        s.expect(
            who,
            other6,
            Outcome::Eperm,
            &ward,
            "after resolving a name outside the policy",
        );
        // DNS over TCP to the IPv6 resolver.
        s.expect(
            who,
            tcp6,
            Outcome::Eperm,
            &ward,
            "before it resolved the name",
        );
        let answer = dig(at, resolver, &["+tcp", "AAAA", "tcp.test.example"]);
        assert_eq!(answer.addresses(), [tcp6], "{who}: {answer:?}");
        s.expect(
            who,
            tcp6,
            Outcome::Ok,
            &ward,
            "after dig +tcp to the IPv6 resolver",
        );
        // The IPv4 address of the same resolver host is not allowed as a resolver.
        let refused = s.peer.connect(
            Protocol::Udp,
            SocketAddr::new(s.lab.v4(1), 53),
            at,
            &["--timeout-ms", "1000"],
        );
        assert_eq!(
            refused.only(),
            &Outcome::Eperm,
            "{who}: DNS to a resolver the policy does not allow"
        );
    }
    for (who, _) in s.clients() {
        let src = source(who);
        wait_for_verdict_to(
            &ward,
            &VerdictQuery {
                verdict: Some("allow"),
                rule: Some("dual"),
                src: Some(&src),
                dst: Some("dns:dual.test.example"),
                dst_port: Some(PORT),
                ..Default::default()
            },
            dual6,
        );
    }
}

/// One attempt of a client loop: when it started and ended (Unix time, ms) and curl's exit code.
#[derive(Clone, Copy, Debug)]
struct Attempt {
    start: u64,
    code: i32,
    end: u64,
}

/// The lines `<start ms> <curl exit code> <end ms>` a client loop printed.
fn loop_results(client: &Background) -> Vec<Attempt> {
    client
        .lines()
        .snapshot()
        .iter()
        .filter_map(|l| {
            let mut fields = l.split_whitespace().map(str::parse::<u64>);
            let (Some(Ok(start)), Some(Ok(code)), Some(Ok(end))) =
                (fields.next(), fields.next(), fields.next())
            else {
                return None;
            };
            Some(Attempt {
                start,
                code: i32::try_from(code).ok()?,
                end,
            })
        })
        .collect()
}

fn unix_ms() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    u64::try_from(now.expect("after 1970").as_millis()).expect("ms fit u64")
}

/// The longest time from a failed attempt to the next successful one (to the last attempt when
/// none succeeded after it), and how many attempts failed.
fn longest_failure(results: &[Attempt]) -> (Duration, usize) {
    let mut longest = 0;
    let mut failed_since = None;
    for attempt in results {
        match (attempt.code, failed_since) {
            (0, Some(since)) => {
                longest = longest.max(attempt.start - since);
                failed_since = None;
            }
            (0, None) => {}
            (_, None) => failed_since = Some(attempt.start),
            (_, Some(_)) => {}
        }
    }
    if let (Some(since), Some(last)) = (failed_since, results.last()) {
        longest = longest.max(last.end - since);
    }
    let failures = results.iter().filter(|a| a.code != 0).count();
    (Duration::from_millis(longest), failures)
}

#[test]
fn a_restart_keeps_learned_names_and_never_admits_a_name_it_did_not_learn() {
    let mut s = Setup::new("dns-restart", &[2, 3, 4, 5]);
    let (resolver, api, late, never) = (s.lab.v4(1), s.lab.v4(2), s.lab.v4(3), s.lab.v4(4));
    let kept = s.lab.v4(5);
    let _dnsmasq = Dnsmasq::start(
        s.lab.peer().name(),
        &[resolver],
        &[
            host_record("api.test.example", &[api], 60),
            host_record("late.test.example", &[late], 60),
            host_record("never.test.example", &[never], 60),
            host_record("kept.test.example", &[kept], 60),
        ],
        &s.lab.outside(),
    );
    let rules = name_rule("api", &[fqdn("api.test.example")])
        + &name_rule("kept", &[fqdn("kept.test.example")])
        + &name_rule("late", &[fqdn("late.test.example")])
        + &name_rule("never", &[fqdn("never.test.example")]);
    let mut ward = s.start(
        &client_policy(&[resolver], &rules),
        "{minTtlSeconds: 60, maxTtlSeconds: 120}",
        &["--keep-enforcing"],
    );
    let resolv = s.resolv(resolver, "");
    // Resolved once, before the restarts, and never again.
    for (who, at) in s.clients() {
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "kept.test.example"),
            [kept],
            "{who}"
        );
    }
    let stop = StopFile::new("dns-restart");
    let stop_path = stop.0.to_string_lossy().into_owned();
    // Each client resolves api.test.example and connects to it, over and over.
    let script = "while [ ! -e \"$1\" ]; do t=$(date +%s%3N); \
                  curl -4 -sS -o /dev/null --max-time 2 http://api.test.example:8080/; \
                  c=$?; echo \"$t $c $(date +%s%3N)\"; sleep 0.05; done";
    let loops: Vec<Background> = s
        .clients()
        .iter()
        .map(|(who, at)| {
            let command =
                s.lab
                    .with_resolver(at, &resolv, "sh", &["-c", script, "loop", &stop_path]);
            Background::spawn(&format!("{who} loop"), command, true)
        })
        .collect();
    // ...and others connect to never.test.example's address, which nobody resolves.
    let never_to = SocketAddr::new(never, PORT);
    let never_clients: Vec<Background> = s
        .clients()
        .iter()
        .map(|(_, at)| {
            s.peer.connect_background(
                Protocol::Tcp,
                never_to,
                at,
                &[
                    "--count",
                    "1",
                    "--interval-ms",
                    "50",
                    "--timeout-ms",
                    "1000",
                    "--stop-file",
                    &stop_path,
                ],
            )
        })
        .collect();
    for client in &loops {
        client.wait_for_line(0, scaled(Duration::from_secs(20)), "a first success", |l| {
            l.split_whitespace().nth(1) == Some("0")
        });
    }

    let mut restarts = Vec::new();
    for how in ["SIGTERM with --keep-enforcing", "SIGKILL"] {
        let down = Instant::now();
        let down_at = unix_ms();
        if how == "SIGKILL" {
            ward.kill();
        } else {
            let status = ward.stop();
            assert!(status.success(), "ward exited with {status} on SIGTERM");
        }
        // No agent: DNS goes straight to the resolver, which answers; what was learned before
        // still counts, and what is resolved now is not learned.
        for (who, at) in s.clients() {
            assert_eq!(
                s.getent(at, &resolv, "ahostsv4", "late.test.example"),
                [late],
                "{who}: DNS while no agent runs"
            );
            s.expect(
                who,
                late,
                Outcome::Eperm,
                &ward,
                &format!("resolved while no agent ran ({how})"),
            );
            s.expect(
                who,
                api,
                Outcome::Ok,
                &ward,
                &format!("learned before the agent stopped ({how})"),
            );
        }
        ward.respawn(&ward_tests::ward_bin(), &["--keep-enforcing"]);
        let took = down.elapsed();
        ward.wait_for_log(
            0,
            event_timeout(),
            "saying it adopted the learned addresses",
            |l| l.contains(ADOPTED),
        );
        s.pod.wait_for_proxy(&ward, 0, POD_CLIENT);
        for (who, _) in s.clients() {
            s.expect(
                who,
                late,
                Outcome::Eperm,
                &ward,
                &format!("resolved only while no agent ran ({how}), after the restart"),
            );
            // Adopted with its name: the restarted agent's verdict names it.
            s.expect(
                who,
                kept,
                Outcome::Ok,
                &ward,
                &format!("learned before the restart ({how}) and not since"),
            );
            let src = source(who);
            let verdict = wait_for_verdict_to(
                &ward,
                &VerdictQuery {
                    verdict: Some("allow"),
                    rule: Some("kept"),
                    src: Some(&src),
                    ..Default::default()
                },
                kept,
            );
            assert_eq!(
                verdict.dst.as_deref(),
                Some("dns:kept.test.example"),
                "{who}: the restarted agent names an adopted address by its name ({how}): {}",
                verdict.line
            );
        }
        restarts.push((how, took, down_at));
        // Let the loops go through the new agent for a while.
        std::thread::sleep(Duration::from_millis(1500));
    }
    stop.stop();
    let mut never_clients = never_clients;
    let never_outcomes: Vec<Outcome> = never_clients
        .iter_mut()
        .flat_map(|c| {
            c.wait_exit(scaled(Duration::from_secs(10)));
            outcomes_of(c)
        })
        .collect();
    let mut loops = loops;
    for client in &mut loops {
        client.wait_exit(scaled(Duration::from_secs(10)));
    }
    // Resolved through the running agent, late.test.example is admitted at last.
    for (who, at) in s.clients() {
        assert_eq!(
            s.getent(at, &resolv, "ahostsv4", "late.test.example"),
            [late]
        );
        s.expect(
            who,
            late,
            Outcome::Ok,
            &ward,
            "resolved through the restarted agent",
        );
    }

    let longest_restart = restarts
        .iter()
        .map(|(_, took, _)| *took)
        .max()
        .expect("two restarts");
    for ((who, _), client) in s.clients().iter().zip(&loops) {
        let results = loop_results(client);
        let (window, failures) = longest_failure(&results);
        // Failed attempts: curl's exit code, start and end in ms after the agent went down.
        let failed: Vec<String> = results
            .iter()
            .filter(|a| a.code != 0)
            .map(|a| {
                let (how, _, down_at) = restarts
                    .iter()
                    .rev()
                    .find(|(_, _, down_at)| *down_at <= a.start + 2000)
                    .unwrap_or(&restarts[0]);
                let after = |t: u64| i128::from(t) - i128::from(*down_at);
                format!(
                    "exit {} from {} ms to {} ms after {how}",
                    a.code,
                    after(a.start),
                    after(a.end)
                )
            })
            .collect();
        eprintln!(
            "{who}: {} attempts, {failures} failed {failed:?}, longest failure window {window:?}; \
             restarts (how, took, down at): {restarts:?}",
            results.len()
        );
        assert!(
            results.len() > 20,
            "{who}: the loop hardly ran: {:?}",
            client.lines().tail(20)
        );
        assert!(
            window <= longest_restart + scaled(Duration::from_secs(2)),
            "{who}: api.test.example was refused for {window:?}, longer than the restart \
             ({longest_restart:?}); loop:\n{}",
            client.lines().tail(60)
        );
    }
    assert!(
        !never_outcomes.is_empty() && never_outcomes.iter().all(|o| *o == Outcome::Eperm),
        "a name nobody resolved through the agent was admitted: {}",
        tally(&never_outcomes)
    );
}

/// The scripted resolver's host number on the peer.
const SCRIPTED_HOST: u8 = 53;

fn v4(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

/// How many records the oversized answer holds, and how many of them a truncated UDP answer.
const BIG_RECORDS: u32 = 300;
const BIG_OVER_UDP: usize = 20;

fn big_address(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(v4(10, 79, 4, 0)) + i)
}

/// A stand-in for a resolver that lies or breaks: no Debian resolver sends such answers on
/// purpose. By the first label of the asked name (A queries; others get an empty answer):
/// - `api`: 10.79.0.1, as any resolver would;
/// - `extra`: its own 10.79.1.1, and A records of names nobody asked (10.79.1.2 in the answer
///   section, 10.79.1.3 in the additional section), both names the policy would allow;
/// - `wrongid`: an answer with another id (10.79.2.1), one to another question with the right id
///   (10.79.2.2), then the right one (10.79.2.3);
/// - `big`: [`BIG_RECORDS`] addresses from 10.79.4.0; over UDP only the first [`BIG_OVER_UDP`],
///   marked truncated;
/// - `ttl0`: 10.79.6.1 with TTL 0;
/// - `malformed`: an answer with 10.79.7.1 cut off inside its record;
/// - anything else: NXDOMAIN.
fn hostile(query: &Message, transport: Transport) -> Vec<Reply> {
    let name = scripted::asked_name(query);
    let mut answer = scripted::answer_to(query);
    if scripted::asked_type(query) != RecordType::A {
        return vec![Reply::Send(scripted::encode(&answer))];
    }
    let label = name.split('.').next().unwrap_or_default();
    match label {
        "api" => {
            answer.add_answer(scripted::a(&name, 60, v4(10, 79, 0, 1)));
        }
        "extra" => {
            answer.add_answer(scripted::a(&name, 60, v4(10, 79, 1, 1)));
            answer.add_answer(scripted::a(
                "victim.hostile.test.example",
                60,
                v4(10, 79, 1, 2),
            ));
            answer.add_additional(scripted::a(
                "victim2.hostile.test.example",
                60,
                v4(10, 79, 1, 3),
            ));
        }
        "wrongid" => {
            let mut wrong_id = scripted::answer_to(query);
            wrong_id.metadata.id = query.metadata.id.wrapping_add(1);
            wrong_id.add_answer(scripted::a(&name, 60, v4(10, 79, 2, 1)));
            let mut other_question = scripted::answer_to(query);
            other_question.queries.clear();
            let other = "wrongq.hostile.test.example";
            other_question.add_query(Query::query(scripted::name(other), RecordType::A));
            other_question.add_answer(scripted::a(other, 60, v4(10, 79, 2, 2)));
            answer.add_answer(scripted::a(&name, 60, v4(10, 79, 2, 3)));
            return [wrong_id, other_question, answer]
                .iter()
                .map(|m| Reply::Send(scripted::encode(m)))
                .collect();
        }
        "big" => {
            let count = match transport {
                Transport::Udp => {
                    answer.metadata.truncation = true;
                    BIG_OVER_UDP as u32
                }
                Transport::Tcp => BIG_RECORDS,
            };
            for i in 0..count {
                answer.add_answer(scripted::a(&name, 60, big_address(i)));
            }
        }
        "ttl0" => {
            answer.add_answer(scripted::a(&name, 0, v4(10, 79, 6, 1)));
        }
        "malformed" => {
            answer.add_answer(scripted::a(&name, 60, v4(10, 79, 7, 1)));
            let mut bytes = scripted::encode(&answer);
            bytes.truncate(bytes.len() - 2);
            return vec![Reply::Send(bytes)];
        }
        _ => answer.metadata.response_code = ResponseCode::NXDomain,
    }
    vec![Reply::Send(scripted::encode(&answer))]
}

#[test]
fn answers_a_resolver_should_not_give_teach_nothing_they_should_not() {
    let mut s = Setup::new("dns-hostile", &[SCRIPTED_HOST]);
    let resolver = s.lab.v4(SCRIPTED_HOST);
    let _resolver = ScriptedResolver::start(s.lab.peer(), resolver, hostile);
    let rules = name_rule("hostile", &[pattern("*.hostile.test.example")]);
    let min_ttl = scaled(Duration::from_secs(2));
    let ward = s.start(
        &client_policy(&[resolver], &rules),
        &format!(
            "{{minTtlSeconds: {}, maxTtlSeconds: 60}}",
            min_ttl.as_secs()
        ),
        &[],
    );
    let ip4 = IpAddr::V4;

    let mut ttl0_learned = Vec::new();
    for (who, at) in s.clients() {
        // TTL 0 counts for minTtlSeconds: first, so that it is over by the end.
        let answer = dig(at, resolver, &["ttl0.hostile.test.example"]);
        assert_eq!(
            answer.addresses(),
            [ip4(v4(10, 79, 6, 1))],
            "{who}: {answer:?}"
        );
        ttl0_learned.push(Instant::now());
        s.expect(
            who,
            ip4(v4(10, 79, 6, 1)),
            Outcome::Ok,
            &ward,
            "right after an answer with TTL 0",
        );

        // Records of names nobody asked for are passed on, never learned.
        let answer = dig(at, resolver, &["extra.hostile.test.example"]);
        assert_eq!(
            answer.status.as_deref(),
            Some("NOERROR"),
            "{who}: {answer:?}"
        );
        s.expect(
            who,
            ip4(v4(10, 79, 1, 1)),
            Outcome::Ok,
            &ward,
            "(the asked name's address)",
        );
        s.expect(
            who,
            ip4(v4(10, 79, 1, 2)),
            Outcome::Eperm,
            &ward,
            "(an answer record of a name not asked)",
        );
        s.expect(
            who,
            ip4(v4(10, 79, 1, 3)),
            Outcome::Eperm,
            &ward,
            "(an additional record of a name not asked)",
        );

        // Answers to another id or question are not the answer, over UDP and TCP.
        for transport in ["+notcp", "+tcp"] {
            let answer = dig(at, resolver, &[transport, "wrongid.hostile.test.example"]);
            assert_eq!(
                answer.addresses(),
                [ip4(v4(10, 79, 2, 3))],
                "{who} {transport}: {answer:?}"
            );
            s.expect(
                who,
                ip4(v4(10, 79, 2, 3)),
                Outcome::Ok,
                &ward,
                "(the right answer's address)",
            );
            s.expect(
                who,
                ip4(v4(10, 79, 2, 1)),
                Outcome::Eperm,
                &ward,
                "(an answer with another id)",
            );
            s.expect(
                who,
                ip4(v4(10, 79, 2, 2)),
                Outcome::Eperm,
                &ward,
                "(an answer to another question)",
            );
        }

        // Oversized: truncated over UDP, whole over TCP (dig retries by itself); one answer
        // teaches at most 256 addresses.
        let answer = dig(at, resolver, &["big.hostile.test.example"]);
        assert_eq!(
            answer.status.as_deref(),
            Some("NOERROR"),
            "{who}: {answer:?}"
        );
        assert!(
            answer
                .finished
                .stdout
                .contains("Truncated, retrying in TCP mode"),
            "{who}: dig saw no truncated answer: {answer:?}"
        );
        assert_eq!(
            answer.addresses().len(),
            BIG_RECORDS as usize,
            "{who}: over TCP, whole"
        );
        let targets: Vec<SocketAddr> = (0..BIG_RECORDS)
            .map(|i| SocketAddr::new(ip4(big_address(i)), PORT))
            .collect();
        let outcomes = s
            .peer
            .probe(Protocol::Tcp, &targets, at, &["--timeout-ms", "3000"]);
        let (taught, beyond) = outcomes.split_at(256);
        assert!(
            taught.iter().all(|o| *o == Outcome::Ok),
            "{who}: the first 256 addresses of the answer: {}",
            tally(taught)
        );
        assert!(
            beyond.iter().all(|o| *o == Outcome::Eperm),
            "{who}: addresses past the 256 one answer teaches: {}",
            tally(beyond)
        );

        // Unreadable: SERVFAIL to the client, over UDP and TCP, and nothing learned.
        for transport in ["+notcp", "+tcp"] {
            let answer = dig(at, resolver, &[transport, "malformed.hostile.test.example"]);
            assert_eq!(
                answer.status.as_deref(),
                Some("SERVFAIL"),
                "{who} {transport}: {answer:?}"
            );
        }
        s.expect(
            who,
            ip4(v4(10, 79, 7, 1)),
            Outcome::Eperm,
            &ward,
            "(from an unreadable answer)",
        );
    }
    let text = s.lab.metrics();
    assert!(
        metric(&text, "ward_dns_queries_total{result=\"failed\"}") >= 4.0,
        "{}",
        dns_metrics(&text)
    );

    let last = *ttl0_learned.last().expect("two clients");
    std::thread::sleep(
        (last + min_ttl + Duration::from_millis(500)).saturating_duration_since(Instant::now()),
    );
    for (who, _) in s.clients() {
        s.expect(
            who,
            ip4(v4(10, 79, 6, 1)),
            Outcome::Eperm,
            &ward,
            "past minTtlSeconds after TTL 0",
        );
    }
}

#[test]
fn bad_queries_resolvers_not_allowed_and_queries_the_kernel_did_not_send_are_refused() {
    let mut s = Setup::new("dns-badq", &[SCRIPTED_HOST, 54]);
    let resolver = s.lab.v4(SCRIPTED_HOST);
    let not_allowed = s.lab.v4(54);
    let scripted = ScriptedResolver::start(s.lab.peer(), resolver, hostile);
    let _other = ScriptedResolver::start(s.lab.peer(), not_allowed, hostile);
    let rules = name_rule("hostile", &[pattern("*.hostile.test.example")]);
    let mut ward = s.start(
        &client_policy(&[resolver], &rules),
        "{minTtlSeconds: 30}",
        &[],
    );
    let resolver_text = resolver.to_string();

    for (who, at) in s.clients() {
        // Malformed queries to the allowed resolver: FORMERR (with the query's id, from the
        // resolver's address) or nothing; none reaches the resolver.
        let asked_before = scripted.queries();
        for transport in ["udp", "tcp"] {
            let sent = dns_client(at, &["malformed", &resolver_text, transport]);
            let lines = sent.stdout_lines();
            assert_eq!(lines.len(), 7, "{who} {transport}: {sent:?}");
            for line in &lines {
                let fine = line.ends_with(" none")
                    || line.ends_with(" closed")
                    || (line.contains(" rcode=1 ") && line.ends_with(&format!("from={resolver}")));
                assert!(
                    fine,
                    "{who} {transport}: {line}; ward log:\n{}",
                    ward.log().tail(30)
                );
            }
            assert!(
                lines.iter().any(|l| l.contains(" rcode=1 ")),
                "{who} {transport}: no FORMERR at all: {lines:?}"
            );
            let garbage = lines
                .iter()
                .find(|l| l.starts_with("garbage "))
                .expect("the case");
            assert!(
                !garbage.contains("rcode=") || garbage.contains(&format!("id={}", 0x1234)),
                "{who}: FORMERR carries the query's id: {garbage}"
            );
        }
        assert_eq!(
            scripted.queries(),
            asked_before,
            "{who}: a malformed query was forwarded"
        );
        let answer = dig(at, resolver, &["api.hostile.test.example"]);
        assert_eq!(
            answer.status.as_deref(),
            Some("NOERROR"),
            "{who}: the next real query: {answer:?}"
        );

        // A resolver the policy does not allow: refused at sendmsg/connect.
        for protocol in [Protocol::Udp, Protocol::Tcp] {
            let attempt = s.peer.connect(
                protocol,
                SocketAddr::new(not_allowed, 53),
                at,
                &["--timeout-ms", "1000"],
            );
            assert_eq!(
                attempt.only(),
                &Outcome::Eperm,
                "{who}: {protocol:?} DNS to {not_allowed}"
            );
        }
        for transport in ["+notcp", "+tcp"] {
            let answer = dig(at, not_allowed, &[transport, "api.hostile.test.example"]);
            assert_eq!(
                answer.status, None,
                "{who} {transport}: an answer from a resolver not allowed: {answer:?}"
            );
            assert!(
                answer
                    .finished
                    .stdout
                    .to_lowercase()
                    .contains("permission denied")
                    || answer
                        .finished
                        .stdout
                        .to_lowercase()
                        .contains("not permitted"),
                "{who} {transport}: dig to a resolver not allowed: {answer:?}"
            );
        }
    }
    assert!(
        !ward.has_exited(),
        "the agent died; log:\n{}",
        ward.log().tail(60)
    );
    let text = s.lab.metrics();
    assert!(
        metric(&text, "ward_dns_queries_total{result=\"malformed\"}") >= 1.0,
        "{}",
        dns_metrics(&text)
    );

    // Straight to the proxy's port, by processes that are no workload: REFUSED (the proxy
    // cannot know where such a query was going), in the node's namespace and in the pod's.
    let port = PROXY_PORT.to_string();
    let in_pod = Placement::host().in_netns(&s.pod.netns);
    for (where_, at) in [("node", s.lab.outside()), ("pod", in_pod)] {
        for (server, transport) in [
            ("127.0.0.1", "+notcp"),
            ("127.0.0.1", "+tcp"),
            ("::1", "+notcp"),
        ] {
            let answer = dig(
                &at,
                ip(server),
                &["-p", &port, transport, "api.hostile.test.example"],
            );
            assert_eq!(
                answer.status.as_deref(),
                Some("REFUSED"),
                "a query sent straight to the proxy in the {where_}'s namespace ({server} {transport}): {answer:?}"
            );
        }
    }
    assert!(
        !ward.has_exited(),
        "the agent died; log:\n{}",
        ward.log().tail(60)
    );
}

#[test]
fn a_query_straight_to_the_proxy_from_a_port_a_workload_used_is_refused() {
    // The kernel files where a workload's UDP query was going by the query's 4-tuple. Once the
    // workload's socket is gone, another process sending from the same port straight to the
    // proxy is no workload: REFUSED, and nothing learned for the workload.
    let mut s = Setup::new("dns-stale", &[2, 3]);
    let (resolver, asked, never_asked) = (s.lab.v4(1), s.lab.v4(2), s.lab.v4(3));
    let _dnsmasq = Dnsmasq::start(
        s.lab.peer().name(),
        &[resolver],
        &[
            host_record("asked.test.example", &[asked], 300),
            host_record("other-asked.test.example", &[never_asked], 300),
        ],
        &s.lab.outside(),
    );
    let rules = name_rule(
        "names",
        &[fqdn("asked.test.example"), fqdn("other-asked.test.example")],
    );
    let ward = s.start(
        &client_policy(&[resolver], &rules),
        "{minTtlSeconds: 300}",
        &[],
    );
    let proxy_port = PROXY_PORT.to_string();
    for (n, (who, at)) in s.clients().into_iter().enumerate() {
        let bind = format!("0.0.0.0#{}", 41_000 + n);
        let answer = dig(at, resolver, &["-b", &bind, "asked.test.example"]);
        assert_eq!(answer.addresses(), [asked], "{who}: {answer:?}");
        s.expect(
            who,
            asked,
            Outcome::Ok,
            &ward,
            "(resolved through the proxy)",
        );
        // The same port, no workload, in the workload's namespace, once the workload's record is
        // no longer fresh (the proxy takes a record only within 250 ms of its datagram).
        std::thread::sleep(std::time::Duration::from_millis(500));
        let outsider = match who {
            HOST_CLIENT => s.lab.outside(),
            _ => Placement::host().in_netns(&s.pod.netns),
        };
        let straight = dig(
            &outsider,
            ip("127.0.0.1"),
            &["-b", &bind, "-p", &proxy_port, "other-asked.test.example"],
        );
        s.expect(
            who,
            never_asked,
            Outcome::Eperm,
            &ward,
            "(asked by another process straight to the proxy, never by the workload)",
        );
        assert_eq!(
            straight.status.as_deref(),
            Some("REFUSED"),
            "a query straight to the proxy from {bind}, a port {who} sent DNS from before: \
             {straight:?}"
        );
    }
}

#[test]
fn a_resolver_that_closes_tcp_after_each_answer_still_answers_every_query() {
    // A server may close a TCP connection after each answer (RFC 7766 6.2.1); a client asking
    // again on its open connection to the proxy must still be answered.
    let mut s = Setup::new("dns-tcpclose", &[SCRIPTED_HOST]);
    let resolver = s.lab.v4(SCRIPTED_HOST);
    let _resolver = ScriptedResolver::start(s.lab.peer(), resolver, |query, transport| {
        let name = scripted::asked_name(query);
        let mut answer = scripted::answer_to(query);
        let n: u8 = name
            .split('.')
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        if scripted::asked_type(query) == RecordType::A {
            answer.add_answer(scripted::a(&name, 60, v4(10, 79, 9, n)));
        }
        let mut replies = vec![Reply::Send(scripted::encode(&answer))];
        if transport == Transport::Tcp {
            replies.push(Reply::Close);
        }
        replies
    });
    let rules = name_rule("close", &[pattern("*.close.test.example")]);
    let ward = s.start(
        &client_policy(&[resolver], &rules),
        "{minTtlSeconds: 60}",
        &[],
    );
    for (who, at) in s.clients() {
        let answers = dig(
            at,
            resolver,
            &[
                "+tcp",
                "+keepopen",
                "1.close.test.example",
                "2.close.test.example",
                "3.close.test.example",
            ],
        );
        let statuses: Vec<&str> = answers
            .finished
            .stdout
            .lines()
            .filter_map(|l| Some(l.split_once("status: ")?.1.split(',').next()?.trim()))
            .collect();
        assert_eq!(
            statuses,
            ["NOERROR", "NOERROR", "NOERROR"],
            "{who}: three queries on one TCP connection to the proxy: {answers:?}"
        );
        for n in 1..=3 {
            s.expect(
                who,
                IpAddr::V4(v4(10, 79, 9, n)),
                Outcome::Ok,
                &ward,
                "(answered over TCP)",
            );
        }
    }
}

/// `<n>.flood.test.example` is 10.78.<n / 256>.<n % 256>; `slow-<n>.flood.test.example` is
/// 10.79.200.1, answered after 1.5 s.
fn flood_resolver(query: &Message, _: Transport) -> Vec<Reply> {
    let name = scripted::asked_name(query);
    let mut answer = scripted::answer_to(query);
    let label = name.split('.').next().unwrap_or_default();
    if scripted::asked_type(query) != RecordType::A {
        return vec![Reply::Send(scripted::encode(&answer))];
    }
    if label.starts_with("slow-") {
        answer.add_answer(scripted::a(&name, 60, v4(10, 79, 200, 1)));
        return vec![
            Reply::Wait(Duration::from_millis(1500)),
            Reply::Send(scripted::encode(&answer)),
        ];
    }
    match label.parse::<u32>() {
        Ok(n) if n < 65_536 => {
            answer.add_answer(scripted::a(&name, 60, many_v4(n)));
        }
        _ => answer.metadata.response_code = ResponseCode::NXDomain,
    }
    vec![Reply::Send(scripted::encode(&answer))]
}

#[test]
fn ten_thousand_names_stay_within_max_learned_and_a_burst_is_bounded_in_flight() {
    let mut s = Setup::new("dns-flood", &[SCRIPTED_HOST]);
    let resolver = s.lab.v4(SCRIPTED_HOST);
    let _resolver = ScriptedResolver::start(s.lab.peer(), resolver, flood_resolver);
    let rules = name_rule("flood", &[pattern("*.flood.test.example")]);
    let ward = s.start(
        &client_policy(&[resolver], &rules),
        "{minTtlSeconds: 60, maxTtlSeconds: 300, maxLearned: 1000}",
        &[],
    );
    let resolver_text = resolver.to_string();
    let rss_before = rss_kib(ward.pid());
    let started = Instant::now();
    let flood = dns_client(
        &s.host,
        &[
            "flood",
            &resolver_text,
            "%d.flood.test.example",
            "0",
            "10000",
            "64",
            "3",
        ],
    );
    let took = started.elapsed();
    let summary = flood_summary(&flood);
    let rss_after = rss_kib(ward.pid());
    let text = s.lab.metrics();
    eprintln!(
        "flood: {summary:?} in {took:?}; agent RSS {rss_before} KiB -> {rss_after} KiB\n{}",
        dns_metrics(&text)
    );
    assert_eq!(
        summary["noerror"], 10_000,
        "every name answered: {summary:?}"
    );
    assert_eq!(
        summary["wrong_source"], 0,
        "answers come from the resolver asked: {summary:?}"
    );
    let learned = metric(&text, "ward_dns_learned_addresses");
    assert!(
        (900.0..=1000.0).contains(&learned),
        "learned addresses: {learned}\n{}",
        dns_metrics(&text)
    );
    assert!(
        metric(&text, "ward_dns_learned_names") <= 1000.0,
        "{}",
        dns_metrics(&text)
    );
    assert!(
        metric(&text, "ward_dns_learned_evictions_total") >= 9000.0,
        "evictions counted:\n{}",
        dns_metrics(&text)
    );
    ward.assert_logged("dns.maxLearned");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "the agent's memory grew from {rss_before} to {rss_after} KiB"
    );
    // The pair expiring first went first; the last ones learned are held.
    s.expect(
        HOST_CLIENT,
        IpAddr::V4(many_v4(0)),
        Outcome::Eperm,
        &ward,
        "(the first name, evicted)",
    );
    s.expect(
        HOST_CLIENT,
        IpAddr::V4(many_v4(9999)),
        Outcome::Ok,
        &ward,
        "(the last name learned)",
    );

    // 1,500 queries the resolver holds for 1.5 s, from the pod: at most 1,024 in flight, the
    // rest dropped; the proxy answers again afterwards.
    // Paced (two a millisecond) so that the proxy's socket never overflows: the bound under
    // test is the proxy's own.
    let udp_stats = || {
        let at = Placement::host().in_netns(&s.pod.netns);
        let snmp = ward_tests::run(
            "cat",
            at.command("cat", &["/proc/net/snmp"]),
            scaled(Duration::from_secs(5)),
        );
        snmp.stdout
            .lines()
            .filter(|l| l.starts_with("Udp:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let stats_before = udp_stats();
    let burst = dns_client(
        &s.pod.placement,
        &[
            "flood",
            &resolver_text,
            "slow-%d.flood.test.example",
            "0",
            "1500",
            "1500",
            "4",
            "2",
        ],
    );
    let burst = flood_summary(&burst);
    let text = s.lab.metrics();
    eprintln!(
        "burst: {burst:?}\n{}\nthe pod's UDP counters before and after:\n{stats_before}\n{}",
        dns_metrics(&text),
        udp_stats()
    );
    assert!(
        metric(&text, "ward_dns_queries_total{result=\"dropped\"}") > 0.0,
        "nothing dropped past 1,024 in flight ({burst:?}):\n{}",
        dns_metrics(&text)
    );
    assert!(
        burst["answered"] <= 1024,
        "more answered than may be in flight: {burst:?}"
    );
    for (who, at) in s.clients() {
        let answer = dig(at, resolver, &["12345.flood.test.example"]);
        assert_eq!(
            answer.status.as_deref(),
            Some("NOERROR"),
            "{who} after the flood: {answer:?}"
        );
        s.expect(
            who,
            IpAddr::V4(many_v4(12345)),
            Outcome::Ok,
            &ward,
            "after the flood",
        );
    }
    let text = s.lab.metrics();
    assert!(
        metric(&text, "ward_dns_learned_addresses") <= 1000.0,
        "{}",
        dns_metrics(&text)
    );
    eprintln!("agent RSS at the end: {} KiB", rss_kib(ward.pid()));
}

#[test]
fn only_policy_names_refuses_names_outside_the_policy() {
    let mut s = Setup::new("dns-only", &[2, 3]);
    let (resolver, api, other, _dnsmasq) = api_and_other(&s);
    let policy = client_policy(&[resolver], &name_rule("api", &[fqdn("api.test.example")]));
    let ward = s.start(&policy, "{onlyPolicyNames: true, minTtlSeconds: 30}", &[]);
    let resolv = s.resolv(resolver, "");

    for (who, at) in s.clients() {
        let refused = dig(at, resolver, &["other.test.example"]);
        assert_eq!(
            refused.status.as_deref(),
            Some("REFUSED"),
            "{who}: {refused:?}"
        );
        assert!(refused.answers.is_empty(), "{who}: {refused:?}");
        let getent = s
            .lab
            .resolving(at, &resolv, "getent", &["ahostsv4", "other.test.example"]);
        assert!(
            !getent.status.success(),
            "{who}: glibc resolved a refused name: {getent:?}"
        );
        // curl exit 6: could not resolve.
        let curl = s.curl(at, &resolv, &["http://other.test.example:8080/"]);
        assert_eq!(curl.status.code(), Some(6), "{who}: {curl:?}");

        let answer = dig(at, resolver, &["api.test.example"]);
        assert_eq!(
            answer.status.as_deref(),
            Some("NOERROR"),
            "{who}: {answer:?}"
        );
        assert_eq!(answer.addresses(), [api], "{who}: {answer:?}");
        s.expect(
            who,
            api,
            Outcome::Ok,
            &ward,
            "after resolving a name in the policy",
        );
        s.expect(
            who,
            other,
            Outcome::Eperm,
            &ward,
            "(a refused name's address)",
        );
    }
    let text = s.lab.metrics();
    assert!(
        metric(&text, "ward_dns_queries_total{result=\"refused\"}") >= 2.0,
        "{}",
        dns_metrics(&text)
    );
}

/// CPU time (user and system) process `pid` has used.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // After the command's parenthesis: state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// Counter `name` of the UDP line of /proc/net/snmp in network namespace `netns`.
fn udp_counter(netns: &str, name: &str) -> u64 {
    let at = Placement::host().in_netns(netns);
    let snmp = ward_tests::run(
        "cat /proc/net/snmp",
        at.command("cat", &["/proc/net/snmp"]),
        scaled(Duration::from_secs(5)),
    );
    let mut udp = snmp.stdout.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        panic!("no Udp lines in /proc/net/snmp: {snmp:?}");
    };
    let column = names
        .split_whitespace()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("no UDP counter {name}: {names}"));
    values
        .split_whitespace()
        .nth(column)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("UDP counter {name} in {values}"))
}

/// Under systemd the agent has the default soft limit of 1,024 open files (deploy/systemd sets no
/// `LimitNOFILE`), fewer than 1,024 queries in flight need (a socket to the resolver each, two
/// for TCP). A burst beyond it may fail queries, but every query is answered or counted, and the
/// proxy's listeners in the pod stay open throughout.
#[test]
fn bursts_under_the_default_open_file_limit_lose_no_query_unaccounted() {
    let mut s = Setup::new("dns-nofile", &[SCRIPTED_HOST]);
    let resolver = s.lab.v4(SCRIPTED_HOST);
    let _resolver = ScriptedResolver::start(s.lab.peer(), resolver, flood_resolver);
    let rules = name_rule("flood", &[pattern("*.flood.test.example")]);
    let mut ward = s.start(
        &client_policy(&[resolver], &rules),
        "{minTtlSeconds: 60}",
        &[],
    );
    let pid = ward.pid().to_string();
    let limited = ward_tests::run(
        "prlimit",
        Placement::host().command("prlimit", &["--pid", &pid, "--nofile=1024"]),
        scaled(Duration::from_secs(5)),
    );
    assert!(limited.status.success(), "prlimit: {limited:?}");
    let resolver_text = resolver.to_string();
    let log_from = ward.log_len();

    // UDP from the pod, paced as in the test above.
    let kernel_drops_before = udp_counter(&s.pod.netns, "RcvbufErrors");
    let dropped_before = metric(
        &s.lab.metrics(),
        "ward_dns_queries_total{result=\"dropped\"}",
    );
    let cpu_before = cpu_time(ward.pid());
    let started = Instant::now();
    let udp = dns_client(
        &s.pod.placement,
        &[
            "flood",
            &resolver_text,
            "slow-%d.flood.test.example",
            "0",
            "1500",
            "1500",
            "4",
            "2",
        ],
    );
    let (udp_cpu, udp_took) = (cpu_time(ward.pid()) - cpu_before, started.elapsed());
    let udp = flood_summary(&udp);
    let text = s.lab.metrics();
    let dropped = metric(&text, "ward_dns_queries_total{result=\"dropped\"}") - dropped_before;
    let kernel_drops = udp_counter(&s.pod.netns, "RcvbufErrors") - kernel_drops_before;
    eprintln!(
        "UDP burst: {udp:?}; dropped by the proxy {dropped}, by the kernel (RcvbufErrors) \
         {kernel_drops}; agent CPU {udp_cpu:?} in {udp_took:?}\n{}",
        dns_metrics(&text)
    );

    // TCP from the workload beside the agent: a connection each.
    let cpu_before = cpu_time(ward.pid());
    let started = Instant::now();
    let tcp = dns_client(
        &s.host,
        &[
            "tcp-flood",
            &resolver_text,
            "slow-%d.flood.test.example",
            "1100",
            "5",
        ],
    );
    let (tcp_cpu, tcp_took) = (cpu_time(ward.pid()) - cpu_before, started.elapsed());
    let tcp = flood_summary(&tcp);
    let text = s.lab.metrics();
    eprintln!(
        "TCP burst: {tcp:?}; agent CPU {tcp_cpu:?} in {tcp_took:?}\n{}",
        dns_metrics(&text)
    );
    let idle_before = cpu_time(ward.pid());
    std::thread::sleep(Duration::from_secs(1));
    eprintln!(
        "agent CPU over the second after the bursts: {:?}",
        cpu_time(ward.pid()) - idle_before
    );

    assert!(
        !ward.has_exited(),
        "the agent died; log:\n{}",
        ward.log().tail(60)
    );
    let reopened: Vec<String> = ward.lines()[log_from..]
        .iter()
        .filter(|l| l.contains(dns::PROXY_IN_POD) || l.contains("opening the DNS proxy"))
        .cloned()
        .collect();
    assert!(
        reopened.is_empty(),
        "the proxy's listeners in the pod were closed and opened again during the bursts (its \
         DNS went to the resolver unlearned meanwhile):\n{}",
        reopened.join("\n")
    );
    let unanswered = udp["sent"] - udp["answered"];
    assert!(
        unanswered as f64 <= dropped + kernel_drops as f64,
        "{unanswered} UDP queries were never answered, {dropped} of them counted as dropped and \
         {kernel_drops} lost to a full socket: {udp:?}\n{}",
        dns_metrics(&text)
    );
    for (who, at) in s.clients() {
        for transport in ["+notcp", "+tcp"] {
            let answer = dig(at, resolver, &[transport, "4242.flood.test.example"]);
            assert_eq!(
                answer.status.as_deref(),
                Some("NOERROR"),
                "{who} {transport} after the bursts: {answer:?}"
            );
        }
    }
    ward_cli(&ward, &["status"]);
}

#[test]
fn a_restart_with_a_lower_max_learned_holds_no_more_than_it() {
    let mut s = Setup::new("dns-shrink", &[SCRIPTED_HOST]);
    let resolver = s.lab.v4(SCRIPTED_HOST);
    let _resolver = ScriptedResolver::start(s.lab.peer(), resolver, flood_resolver);
    let rules = name_rule("flood", &[pattern("*.flood.test.example")]);
    let mut ward = s.start(
        &client_policy(&[resolver], &rules),
        "{minTtlSeconds: 300, maxTtlSeconds: 300, maxLearned: 1000}",
        &[],
    );
    let resolver_text = resolver.to_string();
    let flood = dns_client(
        &s.host,
        &[
            "flood",
            &resolver_text,
            "%d.flood.test.example",
            "0",
            "600",
            "64",
            "3",
        ],
    );
    assert_eq!(flood_summary(&flood)["noerror"], 600, "{flood:?}");
    let text = s.lab.metrics();
    assert_eq!(
        metric(&text, "ward_dns_learned_addresses"),
        600.0,
        "{}",
        dns_metrics(&text)
    );

    ward.kill();
    let config = std::fs::read_to_string(ward.config_file()).expect("the configuration");
    let lowered = config.replace("maxLearned: 1000", "maxLearned: 100");
    assert_ne!(config, lowered, "the configuration names maxLearned");
    std::fs::write(ward.config_file(), lowered).expect("write the configuration");
    ward.respawn(&ward_tests::ward_bin(), &[]);
    ward.wait_for_log(
        0,
        event_timeout(),
        "saying it adopted the learned addresses",
        |l| l.contains(ADOPTED),
    );
    let text = s.lab.metrics();
    eprintln!(
        "after the restart with maxLearned 100:\n{}",
        dns_metrics(&text)
    );
    // The latest learned are kept: the first ones expire first.
    s.expect(
        HOST_CLIENT,
        IpAddr::V4(many_v4(599)),
        Outcome::Ok,
        &ward,
        "(learned last, adopted)",
    );
    assert!(
        metric(&text, "ward_dns_learned_addresses") <= 100.0,
        "the restarted agent holds more learned addresses than its maxLearned of 100:\n{}",
        dns_metrics(&text)
    );
    s.expect(
        HOST_CLIENT,
        IpAddr::V4(many_v4(0)),
        Outcome::Eperm,
        &ward,
        "(learned first, past maxLearned after the restart)",
    );
}
