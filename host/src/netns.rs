//! Network namespaces: which one a process is in (from `/proc/<pid>/ns/net`), and sockets made
//! inside one. A socket belongs to the namespace of the thread that created it and stays there, so
//! [`Netns::run`] creates it on a short-lived thread that entered the namespace (`setns(2)`), and
//! the socket is then used from any thread.
use std::{
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::Path,
};

/// What tells two namespaces apart: the device and inode of their `nsfs` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

/// A network namespace, held open (it lives as long as this handle, even with no process in it).
#[derive(Debug)]
pub struct Netns {
    file: File,
    id: NetnsId,
}

impl Netns {
    /// The namespace of the calling thread.
    pub fn current() -> io::Result<Netns> {
        Netns::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// The namespace of process `pid`.
    pub fn of_process(pid: u32) -> io::Result<Netns> {
        Netns::open(&Path::new("/proc").join(pid.to_string()).join("ns/net"))
    }

    fn open(path: &Path) -> io::Result<Netns> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        Ok(Netns {
            id: NetnsId {
                dev: meta.dev(),
                ino: meta.ino(),
            },
            file,
        })
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// Runs `f` on a thread of its own that entered this namespace: sockets `f` creates belong
    /// to it. The thread ends with `f`, so no other work ever runs in the namespace by mistake.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("ward-netns".into())
                .stack_size(64 * 1024)
                .spawn_scoped(scope, || {
                    // SAFETY: setns on this thread only, with a descriptor this handle keeps open.
                    if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    f()
                })?
                .join()
                .map_err(|_| io::Error::other("the namespace thread panicked"))?
        })
    }
}

/// The first process of cgroup `dir` (its own processes, not its descendants'), if it has one
/// (a cgroup that is gone has none); `Err` when it cannot be read (out of descriptors, say).
pub fn first_process(dir: &Path) -> io::Result<Option<u32>> {
    let procs = match std::fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(procs) => procs,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(procs.lines().find_map(|l| l.trim().parse().ok()))
}

/// The socket's network namespace cookie (`SO_NETNS_COOKIE`, Linux 5.14): what the kernel's
/// `bpf_get_netns_cookie` returns for sockets of that namespace.
pub fn socket_netns_cookie(socket: &impl std::os::fd::AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer and its length match; the descriptor is the caller's open socket.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_namespace_is_the_processs_and_sockets_made_in_it_stay_there() {
        let here = Netns::current().expect("own namespace");
        let process = Netns::of_process(std::process::id()).expect("process namespace");
        assert_eq!(here.id(), process.id());
        let listener = here
            .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a socket made on the namespace thread");
        let own = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        assert_eq!(
            socket_netns_cookie(&listener).expect("cookie"),
            socket_netns_cookie(&own).expect("cookie")
        );
        assert_eq!(
            first_process(Path::new("/nonexistent")).expect("gone"),
            None
        );
    }
}
