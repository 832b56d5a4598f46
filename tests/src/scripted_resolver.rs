//! A DNS server on port 53 (UDP and TCP) in a test's network namespace that answers as the test
//! says, including as no real resolver would: wrong ids, records of names nobody asked for,
//! oversized or unreadable answers, answers held back. The test gives a function from each query
//! to what to send back ([`Reply`]); messages are made with hickory-proto.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::str::FromStr as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::op::{MessageType, OpCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
pub use hickory_proto::rr::RecordType;
use hickory_proto::rr::{Name, RData, Record};

use crate::Netns;

/// How a query came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// One step of what the server does with a query, in order.
#[derive(Clone, Debug)]
pub enum Reply {
    /// Sends these bytes as a message (over TCP with its length prefix).
    Send(Vec<u8>),
    /// Waits before the next step; other queries are served meanwhile.
    Wait(Duration),
    /// Closes the TCP connection (as a server may after each answer); nothing over UDP.
    Close,
}

type Handler = dyn Fn(&Message, Transport) -> Vec<Reply> + Send + Sync;

/// The running server; stopped when dropped.
pub struct ScriptedResolver {
    pub addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl ScriptedResolver {
    /// Serves `ip`:53 in `netns` (the address must be one of the namespace's) with `handler`.
    /// Queries that cannot be read are not answered.
    pub fn start(
        netns: &Netns,
        ip: IpAddr,
        handler: impl Fn(&Message, Transport) -> Vec<Reply> + Send + Sync + 'static,
    ) -> Self {
        let addr = SocketAddr::new(ip, 53);
        // Sockets belong to the namespace they were made in, whichever thread serves them.
        let (udp, tcp) = netns.run_inside(|| {
            let udp = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
            let tcp = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
            (udp, tcp)
        });
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("a read timeout");
        tcp.set_nonblocking(true).expect("a non-blocking listener");
        let handler: Arc<Handler> = Arc::new(handler);
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let udp_thread = {
            let (handler, queries, stop) = (handler.clone(), queries.clone(), stop.clone());
            std::thread::spawn(move || serve_udp(&udp, &handler, &queries, &stop))
        };
        let tcp_thread = {
            let (queries, stop) = (queries.clone(), stop.clone());
            std::thread::spawn(move || serve_tcp(&tcp, &handler, &queries, &stop))
        };
        ScriptedResolver {
            addr,
            queries,
            stop,
            threads: vec![udp_thread, tcp_thread],
        }
    }

    /// How many readable queries it has received.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for ScriptedResolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve_udp(socket: &UdpSocket, handler: &Arc<Handler>, queries: &AtomicUsize, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65_535];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        queries.fetch_add(1, Ordering::Relaxed);
        let replies = handler(&query, Transport::Udp);
        let send = move |replies: Vec<Reply>, socket: &UdpSocket| {
            for reply in replies {
                match reply {
                    Reply::Send(bytes) => {
                        let _ = socket.send_to(&bytes, peer);
                    }
                    Reply::Wait(pause) => std::thread::sleep(pause),
                    Reply::Close => {}
                }
            }
        };
        if replies.iter().any(|r| matches!(r, Reply::Wait(_))) {
            let socket = socket.try_clone().expect("a clone of the UDP socket");
            std::thread::spawn(move || send(replies, &socket));
        } else {
            send(replies, socket);
        }
    }
}

fn serve_tcp(
    listener: &TcpListener,
    handler: &Arc<Handler>,
    queries: &Arc<AtomicUsize>,
    stop: &Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (handler, queries, stop) = (handler.clone(), queries.clone(), stop.clone());
                std::thread::spawn(move || serve_connection(stream, &handler, &queries, &stop));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn serve_connection(
    mut stream: TcpStream,
    handler: &Arc<Handler>,
    queries: &AtomicUsize,
    stop: &AtomicBool,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    while !stop.load(Ordering::Relaxed) {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).is_err() {
            return;
        }
        let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut message).is_err() {
            return;
        }
        let Ok(query) = Message::from_vec(&message) else {
            continue;
        };
        queries.fetch_add(1, Ordering::Relaxed);
        for reply in handler(&query, Transport::Tcp) {
            match reply {
                Reply::Send(bytes) => {
                    let len = u16::try_from(bytes.len()).expect("a message fits TCP's prefix");
                    let mut framed = len.to_be_bytes().to_vec();
                    framed.extend_from_slice(&bytes);
                    if stream.write_all(&framed).is_err() {
                        return;
                    }
                }
                Reply::Wait(pause) => std::thread::sleep(pause),
                Reply::Close => return,
            }
        }
    }
}

/// The asked name, lowercase, without the final dot.
pub fn asked_name(query: &Message) -> String {
    let name = query
        .queries
        .first()
        .map(|q| q.name().to_ascii())
        .unwrap_or_default()
        .to_ascii_lowercase();
    name.strip_suffix('.').unwrap_or(&name).to_owned()
}

/// The asked record type (`A` when the query asks nothing).
pub fn asked_type(query: &Message) -> RecordType {
    query
        .queries
        .first()
        .map_or(RecordType::A, |q| q.query_type())
}

/// An empty answer to `query`: its id and question, `NOERROR`, recursion desired and available.
pub fn answer_to(query: &Message) -> Message {
    let mut answer = Message::response(query.metadata.id, OpCode::Query);
    answer.metadata.message_type = MessageType::Response;
    answer.metadata.recursion_desired = query.metadata.recursion_desired;
    answer.metadata.recursion_available = true;
    answer.metadata.authoritative = true;
    for question in &query.queries {
        answer.add_query(question.clone());
    }
    answer
}

pub fn encode(message: &Message) -> Vec<u8> {
    message.to_vec().expect("a message the test made encodes")
}

/// `text` as a DNS name (the final dot optional).
pub fn name(text: &str) -> Name {
    Name::from_str(&format!("{}.", text.trim_end_matches('.')))
        .unwrap_or_else(|e| panic!("{text:?} is no DNS name: {e}"))
}

pub fn a(owner: &str, ttl: u32, address: Ipv4Addr) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A(address)))
}

pub fn aaaa(owner: &str, ttl: u32, address: Ipv6Addr) -> Record {
    Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(address)))
}

pub fn cname(owner: &str, ttl: u32, target: &str) -> Record {
    Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
}
