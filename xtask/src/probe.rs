//! The programs the demo and the benchmarks run inside workload cgroups (hidden subcommands of
//! xtask, which re-executes itself after joining the cgroup), and the parent's side of starting
//! them.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    stats,
    sys::{self, Children},
};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to accept TCP connections on (repeatable).
    #[arg(long, required_unless_present = "udp")]
    listen: Vec<SocketAddr>,
    /// Address to echo UDP datagrams on (repeatable).
    #[arg(long)]
    udp: Vec<SocketAddr>,
    /// Written to each connection before it is closed.
    #[arg(long, default_value = "")]
    greeting: String,
}

/// Accepts connections on every TCP address, writes the greeting and closes; sends every UDP
/// datagram back to its sender. Prints `listening` once every socket is bound, which is what
/// the parent waits for.
pub fn serve(args: &ServeArgs) -> Result<()> {
    let listeners = args
        .listen
        .iter()
        .map(|addr| {
            let listener =
                TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
            // std listens with a backlog of 128: a client in a tight loop fills that whenever
            // this process is off the CPU for a moment, and each dropped SYN costs it a 1 s
            // retransmit. listen() again only raises the backlog (capped by somaxconn).
            // SAFETY: the fd is a bound, listening socket owned by `listener`.
            if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
                return Err(std::io::Error::last_os_error()).context("raising the backlog");
            }
            Ok(listener)
        })
        .collect::<Result<Vec<_>>>()?;
    let datagram_sockets = args
        .udp
        .iter()
        .map(|addr| UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}")))
        .collect::<Result<Vec<_>>>()?;
    println!("listening");
    std::io::stdout().flush()?;
    let greeting = args.greeting.as_bytes();
    std::thread::scope(|scope| {
        for listener in &listeners {
            scope.spawn(move || {
                // A client that reset its connection before the accept is not an error here.
                for mut stream in listener.incoming().flatten() {
                    let _ = stream.write_all(greeting);
                }
            });
        }
        for socket in &datagram_sockets {
            scope.spawn(move || {
                if socket
                    .local_addr()
                    .is_ok_and(|a| a.ip() == Ipv4Addr::UNSPECIFIED)
                {
                    echo_from_destination(socket);
                }
                let mut buf = [0u8; 2048];
                // A sender gone before the echo (ECONNREFUSED on a later call) is not an error.
                loop {
                    if let Ok((len, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(&buf[..len], from);
                    }
                }
            });
        }
    });
    Ok(())
}

/// Echoes every datagram on an IPv4 socket bound to 0.0.0.0 from the address it was sent to
/// (IP_PKTINFO), as a server on each address would: a reply from another local address is not
/// the one a connected client (or conntrack's DNAT) waits for. Returns only when IP_PKTINFO
/// cannot be set.
fn echo_from_destination(socket: &UdpSocket) {
    use std::{mem::size_of, ptr};
    let fd = socket.as_raw_fd();
    let on: libc::c_int = 1;
    // SAFETY: the fd is open for the socket's lifetime; the option value is a valid c_int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return;
    }
    let mut buf = [0u8; 2048];
    // u64s: cmsg headers need their alignment.
    let mut control = [0u64; 16];
    loop {
        // SAFETY: every pointer in `msg` points at a local buffer of the length given, alive for
        // the calls; CMSG_* walk only the control buffer the kernel filled (or the one written
        // here, sized by CMSG_SPACE).
        unsafe {
            let mut from: libc::sockaddr_storage = std::mem::zeroed();
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_name = (&mut from as *mut libc::sockaddr_storage).cast();
            msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = size_of::<[u64; 16]>() as _;
            let len = libc::recvmsg(fd, &mut msg, 0);
            if len < 0 {
                continue;
            }
            let mut to = None;
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_PKTINFO {
                    let info: libc::in_pktinfo = ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                    to = Some(info.ipi_addr);
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            (*msg.msg_iov).iov_len = len as usize;
            msg.msg_flags = 0;
            match to {
                Some(addr) => {
                    control = [0; 16];
                    let space = libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32);
                    msg.msg_control = control.as_mut_ptr().cast();
                    msg.msg_controllen = space as _;
                    let cmsg = libc::CMSG_FIRSTHDR(&msg);
                    (*cmsg).cmsg_level = libc::IPPROTO_IP;
                    (*cmsg).cmsg_type = libc::IP_PKTINFO;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as _;
                    let info = libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: addr,
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
                }
                None => {
                    msg.msg_control = ptr::null_mut();
                    msg.msg_controllen = 0;
                }
            }
            // A sender gone before the echo is not an error.
            let _ = libc::sendmsg(fd, &msg, 0);
        }
    }
}

/// Runs `cmd` (a `serve` command) among `children` and waits for its `listening` line.
pub fn start_listener(children: &mut Children, cmd: &mut Command, what: &str) -> Result<()> {
    let child = children.spawn(cmd.stdout(Stdio::piped()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout is piped")).read_line(&mut line)?;
    if line.trim() != "listening" {
        bail!(
            "the listener for {what} did not start (`{}`)",
            sys::show(cmd)
        );
    }
    Ok(())
}

/// One attempt from a fresh process in `cgroup` (with `udp`: one datagram and its echo): the
/// exit code of [`connect`] and what it printed.
pub fn connect_from(
    cgroup: &Path,
    addr: SocketAddr,
    udp: bool,
    timeout: Duration,
) -> Result<(i32, String)> {
    connect_with(sys::xtask_in_cgroup(cgroup)?, addr, udp, timeout)
}

/// [`connect_from`] with `cmd`, xtask placed where the attempt is to come from (a cgroup, a
/// network namespace).
pub fn connect_with(
    mut cmd: Command,
    addr: SocketAddr,
    udp: bool,
    timeout: Duration,
) -> Result<(i32, String)> {
    cmd.args(["connect", &addr.to_string(), "--timeout-ms"])
        .arg(timeout.as_millis().to_string());
    if udp {
        cmd.arg("--udp");
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{}`", sys::show(&cmd)))?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    Ok((
        out.status.code().unwrap_or(-1),
        if err.is_empty() {
            said
        } else {
            format!("{said} {err}")
        },
    ))
}

pub const CONNECTED: i32 = 0;
pub const REFUSED_EPERM: i32 = 2;
pub const TIMED_OUT: i32 = 3;
pub const OTHER_ERROR: i32 = 4;

/// One connection attempt (with `udp`: one datagram exchange, see [`udp_exchange`]), reported as
/// one line; the exit code says what happened.
pub fn connect(addr: SocketAddr, udp: bool, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    if udp {
        let result = udp_exchange(addr, timeout);
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let code = match result {
            Ok(_) => {
                println!("answered in {ms:.1} ms");
                CONNECTED
            }
            Err(e) => report_failure(&e, ms),
        };
        std::process::exit(code)
    }
    let result = TcpStream::connect_timeout(&addr, timeout);
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let code = match result {
        Ok(stream) => {
            stream.set_read_timeout(Some(Duration::from_secs(1)))?;
            let mut reply = Vec::new();
            let _ = stream.take(256).read_to_end(&mut reply);
            let reply = String::from_utf8_lossy(&reply);
            println!(
                "connected in {ms:.1} ms; the server said {:?}",
                reply.trim()
            );
            CONNECTED
        }
        Err(e) => report_failure(&e, ms),
    };
    std::process::exit(code)
}

/// Prints why an attempt failed after `ms` and returns the exit code that says so.
fn report_failure(e: &std::io::Error, ms: f64) -> i32 {
    if e.raw_os_error() == Some(libc::EPERM) {
        println!("refused after {ms:.1} ms: {e}");
        REFUSED_EPERM
    } else if matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    ) {
        println!("no answer: gave up after {ms:.0} ms");
        TIMED_OUT
    } else {
        println!("failed after {ms:.1} ms: {e}");
        OTHER_ERROR
    }
}

/// A UDP "connection": a new socket, bound (so the receiving side can tell which workload sent
/// its datagram, see docs/datapath.md) and connected to `addr`, sends one datagram and waits up
/// to `timeout` for the echo. Returns how long that took.
pub fn udp_exchange(addr: SocketAddr, timeout: Duration) -> std::io::Result<Duration> {
    let start = Instant::now();
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send(b"ward-bench")?;
    let mut reply = [0u8; 64];
    socket.recv(&mut reply)?;
    Ok(start.elapsed())
}

/// Connects and closes in a loop for `seconds` after a short warm-up (with `udp`: one datagram
/// exchange on a new socket each time), and prints one line:
/// `conns=N seconds=S p50_ns=X p99_ns=Y slow=Z total=T` (Z: connects that took 100 ms or more,
/// i.e. a SYN was retransmitted; T: with the warm-up) or `error=...` at the first failed connect.
pub fn bench_client(addr: SocketAddr, udp: bool, seconds: f64) -> Result<()> {
    let one = || -> std::io::Result<Duration> {
        if udp {
            // On loopback with one datagram in flight nothing is lost: a missing echo is a
            // refusal or a fault, not noise.
            return udp_exchange(addr, Duration::from_secs(1)).map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    std::io::Error::new(e.kind(), "no echo within 1 s")
                }
                _ => e,
            });
        }
        let start = Instant::now();
        let stream = TcpStream::connect(addr)?;
        let took = start.elapsed();
        reset_on_close(&stream)?;
        Ok(took)
    };
    let warm_up = Instant::now() + Duration::from_secs_f64((seconds / 10.0).min(0.5));
    let mut latencies = Vec::with_capacity(1 << 20);
    let mut measuring_since = None;
    let mut total = 0u64;
    let end = Instant::now() + Duration::from_secs_f64(seconds + (seconds / 10.0).min(0.5));
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now >= warm_up && measuring_since.is_none() {
            measuring_since = Some(now);
        }
        let result = one();
        total += u64::from(result.is_ok());
        match result {
            Ok(took) if measuring_since.is_some() => latencies.push(took.as_nanos() as u64),
            Ok(_) => {}
            Err(e) => {
                println!("error={e}");
                return Ok(());
            }
        }
    }
    let elapsed = measuring_since.map_or(0.0, |s| s.elapsed().as_secs_f64());
    latencies.sort_unstable();
    let pct = |p: usize| stats::percentile_of_sorted(&latencies, p);
    let slow = latencies
        .iter()
        .rev()
        .take_while(|&&ns| ns >= 100_000_000)
        .count();
    println!(
        "conns={} seconds={elapsed:.3} p50_ns={} p99_ns={} slow={slow} total={total}",
        latencies.len(),
        pct(50),
        pct(99)
    );
    Ok(())
}

/// Linger 0: close sends RST and leaves no TIME_WAIT socket, so a long loop cannot run out of
/// ephemeral ports.
fn reset_on_close(stream: &TcpStream) -> std::io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is open for the stream's lifetime and the option value is a valid `linger`
    // of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
