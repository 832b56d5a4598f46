//! The load generator and servers of ward's tunnel benchmarks: request/response latency,
//! single-stream throughput, connection rate, many concurrent connections, and the CPU and RSS of
//! other processes. Shared by `tunnel/benches/tunnel.rs` (loopback) and `tests/benches/mtls.rs`
//! (two nodes as network namespaces, through the kernel's redirect).
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// Bytes of a request, and of its echo.
pub const MESSAGE: usize = 64;

/// Lets this process hold `wanted` descriptors (up to the hard limit).
pub fn raise_fd_limit(wanted: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            let wanted = (wanted as libc::rlim_t).min(limit.rlim_max);
            if limit.rlim_cur < wanted {
                limit.rlim_cur = wanted;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// User plus system CPU time of `pid` so far.
pub fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which may hold spaces), from field 3 on.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_micros(ticks * 1_000_000 / hz.max(1))
}

/// Echoes every connection back, at `addr`.
pub async fn echo_server(addr: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Reads to end of stream, then answers with the number of bytes read.
pub async fn sink_server(addr: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = tcp.write_all(&total.to_be_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

pub async fn connect(addr: SocketAddr) -> TcpStream {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    tcp
}

pub async fn round_trip(tcp: &mut TcpStream, message: &[u8], echo: &mut [u8]) {
    tcp.write_all(message).await.expect("write");
    tcp.read_exact(echo).await.expect("read echo");
}

/// p50 and p99 of small request/response round trips on one connection.
pub async fn latency(addr: SocketAddr, seconds: f64) -> (Duration, Duration, usize) {
    let mut tcp = connect(addr).await;
    let message = [0x5au8; MESSAGE];
    let mut echo = [0u8; MESSAGE];
    for _ in 0..1000 {
        round_trip(&mut tcp, &message, &mut echo).await;
    }
    let mut samples = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let start = Instant::now();
        round_trip(&mut tcp, &message, &mut echo).await;
        samples.push(start.elapsed());
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    (at(0.50), at(0.99), samples.len())
}

/// MiB/s of one connection sending `mib` MiB to the sink, until the sink confirmed them.
pub async fn throughput(addr: SocketAddr, mib: usize) -> f64 {
    let mut tcp = connect(addr).await;
    let chunk = vec![0xa5u8; 256 * 1024];
    let start = Instant::now();
    for _ in 0..mib * 4 {
        tcp.write_all(&chunk).await.expect("write");
    }
    tcp.shutdown().await.expect("shutdown");
    let mut count = [0u8; 8];
    tcp.read_exact(&mut count).await.expect("sink's count");
    let elapsed = start.elapsed();
    assert_eq!(
        u64::from_be_bytes(count),
        (mib * 1024 * 1024) as u64,
        "the sink must receive every byte"
    );
    mib as f64 / elapsed.as_secs_f64()
}

/// New connections a second, each carrying one small round trip, from 16 clients at once.
pub async fn connection_rate(addr: SocketAddr, seconds: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let done = done.clone();
            tokio::spawn(async move {
                let mut echo = [0u8; 1];
                while Instant::now() < end {
                    let mut tcp = connect(addr).await;
                    round_trip(&mut tcp, b"x", &mut echo).await;
                    drop(tcp);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("worker");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

pub async fn open_many(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for batch in 0..n.div_ceil(100) {
        let count = 100.min(n - batch * 100);
        let opened: Vec<_> = (0..count)
            .map(|_| {
                tokio::spawn(async move {
                    let mut tcp = connect(addr).await;
                    let mut echo = [0u8; MESSAGE];
                    round_trip(&mut tcp, &[1u8; MESSAGE], &mut echo).await;
                    tcp
                })
            })
            .collect();
        for task in opened {
            conns.push(task.await.expect("open"));
        }
    }
    conns
}

/// Every connection makes `rounds` round trips, all connections at once.
pub async fn exercise(conns: Vec<TcpStream>, rounds: usize) -> Vec<TcpStream> {
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut tcp| {
            tokio::spawn(async move {
                let mut echo = [0u8; MESSAGE];
                for _ in 0..rounds {
                    round_trip(&mut tcp, &[2u8; MESSAGE], &mut echo).await;
                }
                tcp
            })
        })
        .collect();
    let mut conns = Vec::new();
    for task in tasks {
        conns.push(task.await.expect("exercise"));
    }
    conns
}

pub fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}
