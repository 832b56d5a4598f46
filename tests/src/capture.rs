//! A packet capture on a link of the test's own namespaces: an `AF_PACKET` socket opened inside
//! the namespace (by a thread that enters it), recording every frame until stopped. What
//! `tcpdump -i <link>` would see, without needing tcpdump.
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};
use std::thread::JoinHandle;

pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    /// Starts capturing on interface `link` of namespace `netns` and returns once the socket is
    /// open.
    pub fn start(netns: &str, link: &str) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (netns, link, flag) = (netns.to_owned(), link.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            let fd =
                open(&netns, &link).unwrap_or_else(|e| panic!("capture on {netns}/{link}: {e}"));
            ready_tx.send(()).expect("the starter waits");
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65_536];
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: `buf` is valid for its length; `fd` is an open socket.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            // SAFETY: closing the socket this thread opened.
            unsafe { libc::close(fd) };
            frames
        });
        ready_rx
            .recv()
            .expect("the capture thread opens its socket");
        Capture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns every frame seen.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("finished once")
            .join()
            .expect("the capture thread does not panic")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn open(netns: &str, link: &str) -> std::io::Result<i32> {
    use std::os::fd::AsRawFd as _;
    let ns = std::fs::File::open(format!("/var/run/netns/{netns}"))?;
    // SAFETY: moves only this thread into the namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let name = std::ffi::CString::new(link).expect("no NUL in a link name");
    // SAFETY: valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a zeroed sockaddr_ll is valid; the fields are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = index as i32;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: pointers to live values of the sizes given.
    unsafe {
        if libc::bind(
            fd,
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    Ok(fd)
}

/// Whether `needle` occurs in any frame.
pub fn contains(frames: &[Vec<u8>], needle: &[u8]) -> bool {
    frames
        .iter()
        .any(|f| f.windows(needle.len()).any(|w| w == needle))
}

/// Frames of IPv4 TCP segments with `port` as source or destination port and a payload.
pub fn tcp_payloads(frames: &[Vec<u8>], port: u16) -> Vec<&[u8]> {
    frames
        .iter()
        .filter_map(|f| {
            // Ethernet (14), IPv4 with IHL, TCP with data offset.
            if f.len() < 14 + 20 + 20 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 6 {
                return None;
            }
            let ip = &f[14..];
            let l4 = &ip[usize::from(ip[0] & 0x0f) * 4..];
            let (src, dst) = (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            );
            let payload = &l4[usize::from(l4[12] >> 4) * 4..];
            ((src == port || dst == port) && !payload.is_empty()).then_some(payload)
        })
        .collect()
}
