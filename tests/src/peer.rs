//! Driving the `ward-test-peer` binary: listeners and clients with parsed outcomes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::process::{run, Background, Placement};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    fn arg(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// What one connection attempt of the peer client came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Eperm,
    Timeout,
    Refused,
    Error(String),
}

impl Outcome {
    pub fn parse(line: &str) -> Self {
        match line.trim() {
            "ok" => Outcome::Ok,
            "eperm" => Outcome::Eperm,
            "timeout" => Outcome::Timeout,
            "refused" => Outcome::Refused,
            other => Outcome::Error(other.to_owned()),
        }
    }
}

/// The outcomes of one client run, with the time the whole run took.
#[derive(Debug)]
pub struct Attempts {
    pub outcomes: Vec<Outcome>,
    pub elapsed: Duration,
    pub stderr: String,
}

impl Attempts {
    pub fn count(&self, outcome: &Outcome) -> usize {
        self.outcomes.iter().filter(|o| *o == outcome).count()
    }

    /// The single outcome of a one-attempt run.
    pub fn only(&self) -> &Outcome {
        match self.outcomes.as_slice() {
            [one] => one,
            _ => panic!("expected exactly one attempt, got {self:?}"),
        }
    }
}

/// The peer binary (see `src/bin/ward-test-peer.rs`); build one with [`crate::peer!`].
#[derive(Clone, Debug)]
pub struct Peer {
    bin: PathBuf,
}

/// A running listener; dropping it kills it.
pub struct Listener {
    pub process: Background,
    pub addr: SocketAddr,
}

impl Listener {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many connections (TCP) or datagrams (UDP) it has received so far.
    pub fn received(&self) -> usize {
        self.process
            .lines()
            .snapshot()
            .iter()
            .filter(|line| is_receipt(line))
            .count()
    }

    /// Waits until it has received `count` connections or datagrams in all; panics with its
    /// output after `timeout`.
    pub fn wait_received(&self, count: usize, timeout: Duration) {
        let mut seen = 0;
        self.process
            .wait_for_line(0, timeout, &format!("for receipt #{count}"), |line| {
                seen += usize::from(is_receipt(line));
                seen >= count
            });
    }
}

/// What each of `listeners` has received, once their receipts add up to `total` or after
/// `timeout`. A connection counts as made once its handshake completes; a listener reports it
/// when it accepts it, which may come later.
pub fn received_by(listeners: &[&Listener], total: usize, timeout: Duration) -> Vec<usize> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let received: Vec<usize> = listeners.iter().map(|l| l.received()).collect();
        if received.iter().sum::<usize>() >= total || std::time::Instant::now() >= deadline {
            return received;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_receipt(line: &str) -> bool {
    line.starts_with("accepted ") || line.starts_with("datagram ")
}

impl Peer {
    /// The peer at `$WARD_TEST_PEER` if set, else at `built` (the path cargo built it at), else
    /// next to the running test executable (where a test runner that copies binaries, such as
    /// the VM harness, puts it).
    pub fn new(built: impl Into<PathBuf>) -> Self {
        let built = built.into();
        if let Some(path) = std::env::var_os("WARD_TEST_PEER") {
            let bin = PathBuf::from(path);
            assert!(
                bin.is_file(),
                "WARD_TEST_PEER={} is not a file",
                bin.display()
            );
            return Peer { bin };
        }
        if built.is_file() {
            return Peer { bin: built };
        }
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.join("ward-test-peer")));
        match beside {
            Some(bin) if bin.is_file() => Peer { bin },
            _ => panic!(
                "PRIVILEGED TEST NOT RUN: no ward-test-peer binary at {} nor next to the test \
                 executable; set WARD_TEST_PEER to its path",
                built.display()
            ),
        }
    }

    /// Starts a listener on `addr` (port 0 picks a free one) and waits until it is bound.
    pub fn listen(&self, protocol: Protocol, addr: &str, placement: &Placement) -> Listener {
        self.listen_with(protocol, addr, placement, &[])
    }

    /// A TCP listener that answers each connection with a minimal HTTP response, for curl.
    pub fn listen_http(&self, addr: &str, placement: &Placement) -> Listener {
        self.listen_with(Protocol::Tcp, addr, placement, &["--http"])
    }

    /// A TCP listener that writes a small chunk to each connection every millisecond.
    pub fn listen_stream(&self, addr: &str, placement: &Placement) -> Listener {
        self.listen_with(Protocol::Tcp, addr, placement, &["--stream"])
    }

    /// Reads the stream of a [`Peer::listen_stream`] listener at `addr` until `stop_file`
    /// exists; it prints `connected` once connected and then, when stopped,
    /// `streamed reads=N bytes=B max_gap_ms=G` (G: the longest time between two reads).
    pub fn stream(&self, addr: SocketAddr, placement: &Placement, stop_file: &Path) -> Background {
        let args = [
            "stream".to_owned(),
            "tcp".to_owned(),
            addr.to_string(),
            "--stop-file".to_owned(),
            stop_file.display().to_string(),
        ];
        Background::spawn(
            &format!("peer stream {addr}"),
            placement.command(&self.bin, &args),
            true,
        )
    }

    fn listen_with(
        &self,
        protocol: Protocol,
        addr: &str,
        placement: &Placement,
        extra: &[&str],
    ) -> Listener {
        let mut args = vec!["listen", protocol.arg(), addr];
        args.extend_from_slice(extra);
        let label = format!("listener {} {addr}", protocol.arg());
        let process = Background::spawn(&label, placement.command(&self.bin, &args), true);
        let (_, line) = process.wait_for_line(
            0,
            crate::scaled(Duration::from_secs(10)),
            "`listening`",
            |l| l.starts_with("listening "),
        );
        let addr = line["listening ".len()..]
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{label}: bad bound address in {line:?}: {e}"));
        Listener { process, addr }
    }

    /// Runs the client to completion: `connect <protocol> <addr> <options...>`.
    pub fn connect(
        &self,
        protocol: Protocol,
        addr: SocketAddr,
        placement: &Placement,
        options: &[&str],
    ) -> Attempts {
        let command = placement.command(&self.bin, &self.connect_args(protocol, addr, options));
        let finished = run(
            &format!("peer connect {} {addr}", protocol.arg()),
            command,
            crate::scaled(Duration::from_secs(300)),
        );
        assert!(
            finished.status.success(),
            "peer client failed ({}): {}",
            finished.status,
            finished.stderr
        );
        Attempts {
            outcomes: finished.stdout.lines().map(Outcome::parse).collect(),
            elapsed: finished.elapsed,
            stderr: finished.stderr,
        }
    }

    /// Starts the client without waiting; read its outcomes later with [`outcomes_of`].
    pub fn connect_background(
        &self,
        protocol: Protocol,
        addr: SocketAddr,
        placement: &Placement,
        options: &[&str],
    ) -> Background {
        let args = self.connect_args(protocol, addr, options);
        Background::spawn(
            &format!("peer connect {} {addr}", protocol.arg()),
            placement.command(&self.bin, &args),
            true,
        )
    }

    /// One attempt to each of `targets` from `placement`, all at once (`--timeout-ms` and the
    /// other client options in `options`); the outcomes in the order of `targets`.
    pub fn probe(
        &self,
        protocol: Protocol,
        targets: &[SocketAddr],
        placement: &Placement,
        options: &[&str],
    ) -> Vec<Outcome> {
        let mut args = vec!["probe".to_owned(), protocol.arg().to_owned()];
        args.extend(targets.iter().map(SocketAddr::to_string));
        args.extend(options.iter().map(|o| (*o).to_owned()));
        let label = format!(
            "peer probe {} of {} addresses",
            protocol.arg(),
            targets.len()
        );
        let finished = run(
            &label,
            placement.command(&self.bin, &args),
            Duration::from_secs(60),
        );
        assert!(
            finished.status.success(),
            "{label} failed ({}): {}",
            finished.status,
            finished.stderr
        );
        let mut by_target = std::collections::HashMap::new();
        for line in finished.stdout.lines() {
            let (addr, outcome) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("{label}: unexpected line {line:?}"));
            let addr: SocketAddr = addr
                .parse()
                .unwrap_or_else(|e| panic!("{label}: bad address in {line:?}: {e}"));
            by_target.insert(addr, Outcome::parse(outcome));
        }
        targets
            .iter()
            .map(|t| {
                by_target
                    .remove(t)
                    .unwrap_or_else(|| panic!("{label}: no outcome for {t}: {}", finished.stdout))
            })
            .collect()
    }

    fn connect_args(&self, protocol: Protocol, addr: SocketAddr, options: &[&str]) -> Vec<String> {
        let mut args = vec![
            "connect".to_owned(),
            protocol.arg().to_owned(),
            addr.to_string(),
        ];
        args.extend(options.iter().map(|o| (*o).to_owned()));
        args
    }
}

/// The outcomes a background client printed (stderr lines, marked, are left out).
pub fn outcomes_of(client: &Background) -> Vec<Outcome> {
    client
        .lines()
        .snapshot()
        .iter()
        .filter(|line| !line.starts_with("stderr: "))
        .map(|line| Outcome::parse(line))
        .collect()
}
