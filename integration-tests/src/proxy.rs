//! A TCP proxy on loopback that a test can cut, to put a network fault
//! between two real processes (an agent and its coordinator).
//!
//! It listens on `127.0.0.1:0` and forwards every connection, bytes as they
//! come, to a target address. It does not look inside: TLS goes through
//! untouched, so a client that dials the proxy at `127.0.0.1` still checks
//! the server's certificate for `127.0.0.1`.
//!
//! Faults, each until [`TcpProxy::restore`]:
//! - [`TcpProxy::cut`]: every open connection is closed at once (both
//!   sides see the socket close), and new connections are closed as soon
//!   as they are accepted. Like a firewall that rejects, or a peer host
//!   that reboots.
//! - [`TcpProxy::blackhole`]: every connection stays open but nothing is
//!   forwarded any more, in either direction, and new connections are
//!   accepted and then left silent. Like a cable pulled out: only the
//!   endpoints' own timeouts and keepalives can notice.
//!
//! [`TcpProxy::restore`] closes whatever a fault left behind and forwards
//! new connections again.
//!
//! The proxy runs on its own thread and tokio runtime, so sync tests can
//! use it. Dropping it stops it and closes every connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forwards in both directions.
    Forward,
    /// Closes every connection.
    Cut,
    /// Holds every connection open and forwards nothing.
    Blackhole,
}

/// A running proxy; see the module documentation.
#[derive(Debug)]
pub struct TcpProxy {
    address: SocketAddr,
    target: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    accepted: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpProxy {
    /// Starts a proxy on `127.0.0.1:0` that forwards to `target`.
    pub fn start(target: SocketAddr) -> TcpProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind the TCP proxy to a free loopback port");
        listener
            .set_nonblocking(true)
            .expect("make the proxy listener non-blocking");
        let address = listener.local_addr().expect("the proxy's address");
        let (mode, _) = watch::channel(ProxyMode::Forward);
        let accepted = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = {
            let mode = mode.clone();
            let accepted = accepted.clone();
            std::thread::Builder::new()
                .name(format!("tcp-proxy-{}", address.port()))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .expect("the TCP proxy's runtime");
                    runtime.block_on(serve(listener, target, mode, accepted, stopped));
                    // Dropping the runtime drops every connection task,
                    // which closes their sockets.
                    runtime.shutdown_background();
                })
                .expect("start the TCP proxy thread")
        };
        TcpProxy {
            address,
            target,
            mode,
            accepted,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Where clients connect: `127.0.0.1:PORT`.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Where the proxy forwards to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// How many connections the proxy has accepted so far (forwarded or
    /// not): proof that a client goes through it.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn mode(&self) -> ProxyMode {
        *self.mode.borrow()
    }

    /// Closes every connection now and every new one until
    /// [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.mode.send_replace(ProxyMode::Cut);
    }

    /// Stops forwarding on every connection, old and new, without closing
    /// any, until [`TcpProxy::restore`].
    pub fn blackhole(&self) {
        self.mode.send_replace(ProxyMode::Blackhole);
    }

    /// Ends a fault: closes the connections it left open, and forwards new
    /// connections again.
    pub fn restore(&self) {
        self.mode.send_replace(ProxyMode::Forward);
    }

    /// Applies `mode` (one of the above).
    pub fn set_mode(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    target: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    accepted: Arc<AtomicU64>,
    mut stopped: oneshot::Receiver<()>,
) {
    let listener = TcpListener::from_std(listener).expect("register the proxy listener with tokio");
    loop {
        let client = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(_) => continue,
            },
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(connection(client, target, mode.subscribe()));
    }
}

/// One client's connection, from its accept to its close.
async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    mut mode: watch::Receiver<ProxyMode>,
) {
    let current = *mode.borrow_and_update();
    match current {
        ProxyMode::Cut => return,
        ProxyMode::Blackhole => {
            // Held silent until the fault ends, then closed.
            let _ = mode.wait_for(|m| *m != ProxyMode::Blackhole).await;
            return;
        }
        ProxyMode::Forward => {}
    }
    let Ok(mut server) = TcpStream::connect(target).await else {
        // The target is down: the client sees its connection close, as it
        // would see a refusal without the proxy.
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let fault = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
        fault = mode.wait_for(|m| *m != ProxyMode::Forward) => match fault {
            Ok(fault) => *fault,
            // The proxy is stopping.
            Err(_) => return,
        },
    };
    if fault == ProxyMode::Blackhole {
        // Keep both sockets open and unread until the fault ends.
        let _ = mode.wait_for(|m| *m != ProxyMode::Blackhole).await;
    }
    // Returning drops both sockets: the connection is closed.
}
