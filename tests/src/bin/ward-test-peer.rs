//! A tiny network peer for ward's privileged tests, with real sockets and plain-text output.
//!
//! ```text
//! ward-test-peer listen tcp|udp ADDR:PORT [--http | --stream]
//! ward-test-peer connect tcp|udp ADDR:PORT [--count N] [--timeout-ms T] [--send MSG]
//!                [--connected] [--interval-ms I] [--stop-file PATH]
//! ward-test-peer probe tcp|udp ADDR:PORT... [--timeout-ms T]
//! ward-test-peer stream tcp ADDR:PORT --stop-file PATH
//! ```
//!
//! `listen` prints `listening <bound address>` once bound (so port 0 works), then one line per
//! accepted connection (`accepted <peer>`) or datagram (`datagram <peer> <payload>`), and answers
//! each with a short line. `connect` prints one line per attempt: `ok`, `eperm`, `timeout`,
//! `refused` or `error <errno>`, and exits 0 whatever the outcomes, so the caller judges them.
//! With `--stop-file` it keeps going after `--count` attempts until the file exists, which lets a
//! test hold traffic running across an event of its choosing. `probe` makes one attempt to each
//! address, all at once, and prints `<address> <outcome>` per address as each ends.
//!
//! `listen tcp --stream` writes a small chunk to each accepted connection every millisecond until
//! it closes. `stream` connects to such a listener, prints `connected`, reads until the stop file
//! exists and then prints `streamed reads=N bytes=B max_gap_ms=G`, where G is the longest time
//! between two reads; if the stream ends or fails first it prints `ended <reason>` and fails.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: ward-test-peer listen tcp|udp ADDR:PORT [--http | --stream]\n       \
    ward-test-peer connect tcp|udp ADDR:PORT [--count N] [--timeout-ms T] [--send MSG] \
    [--connected] [--interval-ms I] [--stop-file PATH]\n       \
    ward-test-peer probe tcp|udp ADDR:PORT... [--timeout-ms T]\n       \
    ward-test-peer stream tcp ADDR:PORT --stop-file PATH";

/// What a listener does with each accepted TCP connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    Line,
    Http,
    Stream,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Tcp,
    Udp,
}

struct ConnectOptions {
    count: u64,
    timeout: Duration,
    message: String,
    connected: bool,
    interval: Duration,
    stop_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ward-test-peer: {message}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let [mode, protocol, addr, rest @ ..] = args else {
        return Err("missing arguments".into());
    };
    let protocol = match protocol.as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => return Err(format!("unknown protocol {other:?}")),
    };
    if mode == "probe" {
        return probe(protocol, &args[2..]);
    }
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("bad address {addr:?}: {e}"))?;
    match mode.as_str() {
        "listen" => {
            let answer = match rest {
                [] => Answer::Line,
                [flag] if flag == "--http" => Answer::Http,
                [flag] if flag == "--stream" && protocol == Protocol::Tcp => Answer::Stream,
                _ => return Err(format!("unexpected arguments {rest:?}")),
            };
            match protocol {
                Protocol::Tcp => listen_tcp(addr, answer),
                Protocol::Udp => listen_udp(addr),
            }
            .map_err(|e| format!("listen on {addr}: {e}"))
        }
        "connect" => {
            let options = parse_connect_options(rest)?;
            connect(protocol, addr, &options);
            Ok(())
        }
        "stream" => {
            let [flag, stop_file] = rest else {
                return Err(format!("stream needs --stop-file PATH, not {rest:?}"));
            };
            if protocol != Protocol::Tcp || flag != "--stop-file" {
                return Err("stream: tcp ADDR:PORT --stop-file PATH".into());
            }
            read_stream(addr, Path::new(stop_file))
        }
        other => Err(format!("unknown mode {other:?}")),
    }
}

fn parse_connect_options(mut rest: &[String]) -> Result<ConnectOptions, String> {
    let mut options = ConnectOptions {
        count: 1,
        timeout: Duration::from_millis(2000),
        message: "ping".into(),
        connected: false,
        interval: Duration::ZERO,
        stop_file: None,
    };
    let number = |flag: &str, value: Option<&String>| -> Result<u64, String> {
        value
            .ok_or_else(|| format!("{flag} needs a value"))?
            .parse()
            .map_err(|e| format!("{flag}: {e}"))
    };
    while let [flag, tail @ ..] = rest {
        rest = tail;
        match flag.as_str() {
            "--connected" => options.connected = true,
            "--count" => {
                options.count = number(flag, rest.first())?;
                rest = &rest[1..];
            }
            "--timeout-ms" => {
                options.timeout = Duration::from_millis(number(flag, rest.first())?);
                rest = &rest[1..];
            }
            "--interval-ms" => {
                options.interval = Duration::from_millis(number(flag, rest.first())?);
                rest = &rest[1..];
            }
            "--send" => {
                options.message = rest.first().ok_or("--send needs a value")?.clone();
                rest = &rest[1..];
            }
            "--stop-file" => {
                options.stop_file = Some(rest.first().ok_or("--stop-file needs a value")?.into());
                rest = &rest[1..];
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if options.timeout.is_zero() {
        return Err("--timeout-ms must be positive".into());
    }
    Ok(options)
}

/// `probe`: the addresses, then connect options; one attempt to each address, in parallel.
fn probe(protocol: Protocol, args: &[String]) -> Result<(), String> {
    let split = args
        .iter()
        .position(|a| a.starts_with("--"))
        .unwrap_or(args.len());
    let (addrs, rest) = args.split_at(split);
    let targets: Vec<SocketAddr> = addrs
        .iter()
        .map(|a| a.parse().map_err(|e| format!("bad address {a:?}: {e}")))
        .collect::<Result<_, _>>()?;
    let options = parse_connect_options(rest)?;
    std::thread::scope(|scope| {
        for &target in &targets {
            let options = &options;
            scope.spawn(move || say(&format!("{target} {}", attempt(protocol, target, options))));
        }
    });
    Ok(())
}

fn listen_tcp(addr: SocketAddr, answer: Answer) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    say(&format!("listening {}", listener.local_addr()?));
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            // A client that gave up before accept() is not the listener's failure.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e),
        };
        say(&format!("accepted {peer}"));
        // Replies are best effort: a client that only probes (nc -z) closes at once.
        let _ = match answer {
            Answer::Line => answer_line(stream),
            Answer::Http => answer_http(stream),
            Answer::Stream => {
                std::thread::spawn(move || write_stream(stream));
                Ok(())
            }
        };
    }
}

/// A chunk every millisecond until the connection closes.
fn write_stream(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    while stream.write_all(b"ward-stream-chunk").is_ok() {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `stream`: reads until `stop_file` exists, timing the gaps between reads.
fn read_stream(addr: SocketAddr, stop_file: &Path) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect to {addr}: {}", describe(&e)))?;
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    say("connected");
    let mut buffer = [0u8; 4096];
    let (mut reads, mut bytes) = (0u64, 0u64);
    let mut last = Instant::now();
    let mut max_gap = Duration::ZERO;
    loop {
        if stop_file.exists() {
            let max_gap_ms = max_gap.as_secs_f64() * 1e3;
            say(&format!(
                "streamed reads={reads} bytes={bytes} max_gap_ms={max_gap_ms:.1}"
            ));
            return Ok(());
        }
        match stream.read(&mut buffer) {
            Ok(0) => return ended("closed by the other end", reads),
            Ok(n) => {
                let now = Instant::now();
                max_gap = max_gap.max(now - last);
                last = now;
                reads += 1;
                bytes += n as u64;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return ended(&describe(&e), reads),
        }
    }
}

fn ended(reason: &str, reads: u64) -> Result<(), String> {
    say(&format!("ended {reason} after {reads} reads"));
    Err(format!("the stream ended: {reason}"))
}

fn answer_line(mut stream: TcpStream) -> io::Result<()> {
    stream.write_all(b"hello\n")
}

fn answer_http(stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    // Read the request head so that curl sees a complete exchange, not a reset.
    while reader.read_line(&mut line)? > 0 {
        if line == "\r\n" || line == "\n" {
            break;
        }
        line.clear();
    }
    (&stream).write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n")
}

fn listen_udp(addr: SocketAddr) -> io::Result<()> {
    let socket = UdpSocket::bind(addr)?;
    say(&format!("listening {}", socket.local_addr()?));
    let mut buffer = [0u8; 2048];
    loop {
        let (len, peer) = socket.recv_from(&mut buffer)?;
        let payload = String::from_utf8_lossy(&buffer[..len]);
        say(&format!("datagram {peer} {}", payload.trim_end()));
        // A reply the sender cannot receive (its socket gone) must not stop the listener.
        let _ = socket.send_to(b"pong\n", peer);
    }
}

fn connect(protocol: Protocol, addr: SocketAddr, options: &ConnectOptions) {
    let mut attempts = 0u64;
    loop {
        let stop_requested = options.stop_file.as_ref().is_some_and(|f| f.exists());
        if attempts >= options.count && (options.stop_file.is_none() || stop_requested) {
            break;
        }
        if attempts > 0 && !options.interval.is_zero() {
            std::thread::sleep(options.interval);
        }
        say(&attempt(protocol, addr, options));
        attempts += 1;
    }
}

fn attempt(protocol: Protocol, addr: SocketAddr, options: &ConnectOptions) -> String {
    match protocol {
        Protocol::Tcp => attempt_tcp(addr, options),
        Protocol::Udp if options.connected => attempt_udp_connected(addr, options),
        Protocol::Udp => attempt_udp_unconnected(addr, options),
    }
}

fn describe(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::EPERM) => "eperm".into(),
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ETIMEDOUT | libc::EAGAIN | libc::EINPROGRESS) => "timeout".into(),
        Some(errno) => format!("error {errno}"),
        None if error.kind() == io::ErrorKind::TimedOut => "timeout".into(),
        None => format!("error {error}"),
    }
}

fn attempt_tcp(addr: SocketAddr, options: &ConnectOptions) -> String {
    match TcpStream::connect_timeout(&addr, options.timeout) {
        // Reading the greeting is not required: the kernel's verdict is the connect() result.
        Ok(_stream) => "ok".into(),
        Err(e) => describe(&e),
    }
}

fn unspecified_for(addr: SocketAddr) -> SocketAddr {
    if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal address")
    } else {
        "[::]:0".parse().expect("literal address")
    }
}

/// The reply to a datagram sent to `to`: `ok`, or `wrong-source <addr>` when it came from
/// another address (as a client that checks, such as glibc's resolver, would drop it).
fn await_reply(socket: &UdpSocket, to: SocketAddr, options: &ConnectOptions) -> String {
    if let Err(e) = socket.set_read_timeout(Some(options.timeout)) {
        return describe(&e);
    }
    let mut buffer = [0u8; 512];
    match socket.recv_from(&mut buffer) {
        Ok((_, from)) if from == to => "ok".into(),
        Ok((_, from)) => format!("wrong-source {from}"),
        Err(e) => describe(&e),
    }
}

fn attempt_udp_unconnected(addr: SocketAddr, options: &ConnectOptions) -> String {
    let socket = match UdpSocket::bind(unspecified_for(addr)) {
        Ok(socket) => socket,
        Err(e) => return describe(&e),
    };
    match socket.send_to(options.message.as_bytes(), addr) {
        Ok(_) => await_reply(&socket, addr, options),
        Err(e) => describe(&e),
    }
}

fn attempt_udp_connected(addr: SocketAddr, options: &ConnectOptions) -> String {
    let socket = match UdpSocket::bind(unspecified_for(addr)) {
        Ok(socket) => socket,
        Err(e) => return describe(&e),
    };
    if let Err(e) = socket.connect(addr) {
        return describe(&e);
    }
    match socket.send(options.message.as_bytes()) {
        Ok(_) => await_reply(&socket, addr, options),
        Err(e) => describe(&e),
    }
}

/// One line, flushed at once: the harness reads these lines while the peer runs.
fn say(line: &str) {
    let mut stdout = io::stdout().lock();
    // A closed pipe means the harness is gone; nothing is left to tell.
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}
