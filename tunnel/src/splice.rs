//! Copies bytes between a TCP connection and an HTTP/2 stream, both ways, with back-pressure:
//! data read from the stream is acknowledged to the peer (flow-control capacity released) only
//! once the TCP side took it, and TCP is read only while the stream has send capacity. A
//! half-close (FIN one way, END_STREAM the other) is carried through.
use std::future::poll_fn;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::AsyncWriteExt as _,
    net::{tcp::WriteHalf, TcpStream},
};

/// Bytes read from the TCP side at once, at most.
const CHUNK: usize = 64 * 1024;

/// What a finished connection carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// From the TCP side into the tunnel.
    pub sent: u64,
    /// From the tunnel to the TCP side.
    pub received: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("local connection: {0}")]
    Tcp(#[from] std::io::Error),
    #[error("tunnel stream: {0}")]
    Stream(#[from] h2::Error),
    #[error("tunnel stream closed by the peer")]
    StreamClosed,
}

/// Carries `tcp` over the stream until both directions are done. On an error the TCP connection
/// is reset rather than closed, so its workload sees the failure, and the stream is reset too
/// (h2 resets a stream whose handles are dropped before it ended).
pub async fn splice(
    tcp: &mut TcpStream,
    send: SendStream<Bytes>,
    received: impl std::future::Future<Output = Result<RecvStream, SpliceError>>,
) -> Result<Copied, SpliceError> {
    let result = {
        let (read, write) = tcp.split();
        let read = read.as_ref();
        tokio::try_join!(tcp_to_stream(read, send), async {
            stream_to_tcp(received.await?, write).await
        })
    };
    match result {
        Ok((sent, received)) => Ok(Copied { sent, received }),
        Err(e) => {
            let _ = tcp.set_zero_linger();
            Err(e)
        }
    }
}

async fn tcp_to_stream(tcp: &TcpStream, mut send: SendStream<Bytes>) -> Result<u64, SpliceError> {
    let mut total = 0u64;
    loop {
        // Wait for data before taking a buffer, so that an idle connection holds none.
        tcp.readable().await?;
        let mut buf = BytesMut::with_capacity(CHUNK);
        match tcp.try_read_buf(&mut buf) {
            Ok(0) => {
                send.send_data(Bytes::new(), true)?;
                return Ok(total);
            }
            Ok(n) => {
                total += n as u64;
                send_all(&mut send, buf.freeze()).await?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
}

async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), SpliceError> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(granted) => granted?,
            None => return Err(SpliceError::StreamClosed),
        };
        if granted > 0 {
            send.send_data(data.split_to(granted.min(data.len())), false)?;
        }
    }
    Ok(())
}

async fn stream_to_tcp(mut recv: RecvStream, mut tcp: WriteHalf<'_>) -> Result<u64, SpliceError> {
    let mut total = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        tcp.write_all(&chunk).await?;
        total += chunk.len() as u64;
        recv.flow_control().release_capacity(chunk.len())?;
    }
    // Trailers or not, the peer ended its side: so does the local connection.
    tcp.shutdown().await?;
    Ok(total)
}
