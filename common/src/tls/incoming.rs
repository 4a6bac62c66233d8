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
//! - One client network (an IPv4 address, an IPv6 /64) gets at most
//!   `handshakes_per_network` handshakes in progress (a quarter of all, by
//!   default: enough for an operator's scripts or a fleet behind one NAT
//!   reconnecting, whose excess is closed and retries) and
//!   `anonymous_per_network` connections without a certificate: one source
//!   cannot take every slot and lock the fleet and its operators out.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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
    /// Handshakes in progress from one client network ([`client_network`]).
    pub handshakes_per_network: usize,
    /// Connections without a certificate from one client network.
    pub anonymous_per_network: usize,
}

/// The network a client address counts against: the address itself for
/// IPv4, its /64 for IPv6 (one host or site can use a whole /64, so
/// counting single IPv6 addresses would count nothing).
pub fn client_network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
    }
}

/// Counts per client network; a slot gives its count back when dropped.
#[derive(Clone, Default)]
struct PerNetwork {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

struct NetworkSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    network: IpAddr,
}

impl PerNetwork {
    /// A slot for `ip`'s network, unless it holds `max` already.
    fn try_take(&self, ip: IpAddr, max: usize) -> Option<NetworkSlot> {
        let network = client_network(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(network).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(NetworkSlot {
            counts: self.counts.clone(),
            network,
        })
    }
}

impl Drop for NetworkSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.network) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.network);
            }
        }
    }
}

impl Default for IncomingLimits {
    fn default() -> Self {
        IncomingLimits {
            max_handshakes: 64,
            max_anonymous_connections: 32,
            anonymous_lifetime: Duration::from_secs(60),
            handshakes_per_network: 16,
            anonymous_per_network: 4,
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
    _network: NetworkSlot,
    deadline: Pin<Box<Sleep>>,
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
    let handshakes_per_network = PerNetwork::default();
    let anonymous_per_network = PerNetwork::default();
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
            let Some(network_slot) =
                handshakes_per_network.try_take(peer.ip(), limits.handshakes_per_network)
            else {
                tracing::info!(%peer, "too many handshakes from one network; closed");
                if let Some(callback) = &on_refused {
                    callback(peer, "too many handshakes in progress from this network");
                }
                continue;
            };
            let anonymous_per_network = anonymous_per_network.clone();
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
                drop(network_slot);
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
                    let Some(network) =
                        anonymous_per_network.try_take(peer.ip(), limits.anonymous_per_network)
                    else {
                        tracing::info!(%peer, "too many connections without a client certificate from one network; closed");
                        refuse(
                            "too many connections without a client certificate are open from this network",
                        );
                        return;
                    };
                    match anonymous.try_acquire_owned() {
                        Ok(permit) => Some(AnonymousSlot {
                            _permit: permit,
                            _network: network,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_count_by_their_64() {
        for (ip, network) in [
            ("192.0.2.7", "192.0.2.7"),
            ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::"),
            ("2001:db8:1:2::1", "2001:db8:1:2::"),
        ] {
            assert_eq!(
                client_network(ip.parse().unwrap()),
                network.parse::<IpAddr>().unwrap(),
                "{ip}"
            );
        }
    }

    #[test]
    fn network_slots_are_counted_and_given_back() {
        let counts = PerNetwork::default();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::2".parse().unwrap();
        let other: IpAddr = "192.0.2.1".parse().unwrap();
        let first = counts.try_take(a, 2).unwrap();
        let _second = counts.try_take(same_64, 2).unwrap();
        assert!(counts.try_take(a, 2).is_none());
        assert!(counts.try_take(other, 2).is_some());
        drop(first);
        assert!(counts.try_take(same_64, 2).is_some());
    }
}
