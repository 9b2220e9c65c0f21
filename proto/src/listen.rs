//! Accepting TCP connections on a port every pod of the cluster can reach (the HTTP endpoints,
//! the coordinator's gRPC): at most a fixed number of connections at once (the rest wait in the
//! kernel's backlog), and accept errors (EMFILE, ENFILE, ENOBUFS: they repeat until something
//! closes) waited out with a growing delay instead of retried in a loop that spins a core and
//! floods the log.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use backon::BackoffBuilder as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The first and the longest wait after a failed accept.
const FIRST_RETRY: Duration = Duration::from_millis(10);
const LONGEST_RETRY: Duration = Duration::from_secs(1);

/// A listening socket that hands out at most `max_connections` connections at once.
pub struct Listener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    /// What listens, for the log ("HTTP", "gRPC").
    what: &'static str,
}

/// An accepted connection; its slot is given back when it is dropped.
pub struct Connection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Listener {
    pub fn new(inner: TcpListener, max_connections: usize, what: &'static str) -> Self {
        Self { inner, slots: Arc::new(Semaphore::new(max_connections.max(1))), what }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// The next connection, once a slot is free. Never fails: an accept error is logged and
    /// tried again after a delay that grows while the errors go on (10 ms to 1 s).
    pub async fn accept(&self) -> Connection {
        // The semaphore is never closed, so this waits for a slot and nothing else.
        let slot = match self.slots.clone().acquire_owned().await {
            Ok(slot) => slot,
            Err(_) => return std::future::pending().await,
        };
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(FIRST_RETRY)
            .with_max_delay(LONGEST_RETRY)
            .without_max_times()
            .build();
        loop {
            match self.inner.accept().await {
                Ok((stream, _)) => return Connection { stream, _slot: slot },
                Err(e) => {
                    let delay = delays.next().unwrap_or(LONGEST_RETRY);
                    tracing::warn!(server = self.what, error = %e, retry_in_ms = delay.as_millis() as u64,
                        "accepting a connection failed");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The connections as a stream, for servers that take one (tonic).
    pub fn incoming(self) -> impl futures_util::Stream<Item = io::Result<Connection>> + Send + 'static {
        futures_util::stream::unfold(self, |listener| async move {
            let connection = listener.accept().await;
            Some((Ok(connection), listener))
        })
    }
}

impl AsyncRead for Connection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn connections_past_the_cap_wait_until_one_closes() {
        let listener = Listener::new(TcpListener::bind("127.0.0.1:0").await.unwrap(), 2, "test");
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let first = listener.accept().await;
        let _second = listener.accept().await;
        let third = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(third.is_err(), "a third connection is not handed out while two are open");
        drop(first);
        let mut third = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await.unwrap();
        // The connection handed out is the one the client sees.
        let mut client = clients.into_iter().nth(2).unwrap();
        client.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        third.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
    }
}
