//! The coordinator's TLS accept loop, which feeds tonic, and the limits that
//! keep clients without a certificate cheap: anyone who can reach the port
//! can open connections, so the work they can cause is bounded before any
//! of it reaches a gRPC handler or the audit log.
//!
//! - At most `max_handshakes` handshakes run at once. The accept loop waits
//!   for a free slot (the kernel's backlog holds the rest), so a fleet
//!   reconnecting after a restart slows down instead of being refused.
//! - At most `max_anonymous_connections` connections without a client
//!   certificate are open at once (enrollment is the only call they may
//!   make); one more is closed right after its handshake, and reported.
//! - A connection without a client certificate lives at most
//!   `anonymous_lifetime`: enrollment is one short call.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Sleep;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Completed handshakes waiting for tonic to pick them up.
const ACCEPT_QUEUE_LEN: usize = 64;

/// Called with the peer and the reason of each refused or failed handshake,
/// and of each connection closed by a limit. Called from the accept path:
/// it must not block.
pub type HandshakeRefusedCallback = Arc<dyn Fn(SocketAddr, &str) + Send + Sync>;

/// Bounds on what clients can make the accept loop do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncomingLimits {
    /// TLS handshakes in progress at once.
    pub max_handshakes: usize,
    /// Connections without a client certificate open at once.
    pub max_anonymous_connections: usize,
    /// How long a connection without a client certificate may stay open.
    pub anonymous_lifetime: Duration,
}

impl Default for IncomingLimits {
    fn default() -> Self {
        IncomingLimits {
            max_handshakes: 64,
            max_anonymous_connections: 32,
            anonymous_lifetime: Duration::from_secs(60),
        }
    }
}

/// A connection whose handshake completed: the TLS stream, and for a
/// client without a certificate, its slot among the anonymous connections
/// and the deadline after which reads fail (tonic then closes it).
pub struct ServerStream {
    inner: TlsStream<TcpStream>,
    anonymous: Option<AnonymousSlot>,
}

struct AnonymousSlot {
    _permit: OwnedSemaphorePermit,
    deadline: Pin<Box<Sleep>>,
}

impl ServerStream {
    /// Whether the client presented no certificate.
    pub fn is_anonymous(&self) -> bool {
        self.anonymous.is_some()
    }
}

impl Connected for ServerStream {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(slot) = &mut self.anonymous
            && slot.deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "a connection without a client certificate outlived its lifetime",
            )));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts TCP connections, runs each TLS handshake in its own task (so a
/// slow client cannot stall the others) within `limits`, and yields the
/// completed streams for `tonic::transport::Server::serve_with_incoming`.
/// A refused handshake, or a connection closed by a limit, is logged,
/// reported to `on_refused` and dropped. The stream ends when `shutdown`
/// fires.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
    limits: IncomingLimits,
    on_refused: Option<HandshakeRefusedCallback>,
) -> ReceiverStream<Result<ServerStream, io::Error>> {
    let (sender, receiver) = mpsc::channel(ACCEPT_QUEUE_LEN);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
    let anonymous = Arc::new(Semaphore::new(limits.max_anonymous_connections.max(1)));
    tokio::spawn(async move {
        loop {
            // A free handshake slot first: while every slot is taken, new
            // connections wait in the kernel's backlog.
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = handshakes.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let sender = sender.clone();
            let on_refused = on_refused.clone();
            let anonymous = anonymous.clone();
            tokio::spawn(async move {
                let refuse = |reason: &str| {
                    if let Some(callback) = &on_refused {
                        callback(peer, reason);
                    }
                };
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(permit);
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::info!(%peer, %error, "TLS handshake refused");
                        refuse(&error.to_string());
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let slot = if stream.get_ref().1.peer_certificates().is_none() {
                    match anonymous.try_acquire_owned() {
                        Ok(permit) => Some(AnonymousSlot {
                            _permit: permit,
                            deadline: Box::pin(tokio::time::sleep(limits.anonymous_lifetime)),
                        }),
                        Err(_) => {
                            tracing::info!(%peer, "too many connections without a client certificate; closed");
                            refuse("too many connections without a client certificate are open");
                            return;
                        }
                    }
                } else {
                    None
                };
                let _ = sender
                    .send(Ok(ServerStream {
                        inner: stream,
                        anonymous: slot,
                    }))
                    .await;
            });
        }
    });
    ReceiverStream::new(receiver)
}
