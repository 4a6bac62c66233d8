//! Loopback addresses and ports for the processes of one test.
//!
//! External processes (PostgreSQL, the real binaries) bind their own
//! sockets, so the fixture cannot bind first and pass the listener; it picks
//! a port that is free right now and the fixtures that use it retry with
//! another port when it was taken in between. Ports are picked at random
//! below Linux's ephemeral range (32768-60999), so they do not collide with
//! the source ports of outgoing connections, and at random so that tests
//! running in parallel processes rarely pick the same one.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

const PORT_RANGE_START: u16 = 15_000;
const PORT_RANGE_END: u16 = 32_000;

/// A TCP port on 127.0.0.1 that nothing listens on at the time of the call.
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let port =
            PORT_RANGE_START + (random_u64() % u64::from(PORT_RANGE_END - PORT_RANGE_START)) as u16;
        if TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).is_ok() {
            return port;
        }
    }
    // The range is crowded; let the kernel choose.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("bind a TCP socket on 127.0.0.1 to find a free port");
    listener
        .local_addr()
        .expect("read the local address of a bound socket")
        .port()
}

/// A random number from the standard library's per-process random keys;
/// good enough to spread port choices, and no dependency.
fn random_u64() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Hands out distinct loopback addresses 127.0.0.2, 127.0.0.3, ... so that
/// each agent of a test connects from its own source address, and a test can
/// tell agents apart (or cut one off) by address. All of 127.0.0.0/8 is
/// routed to the loopback interface on Linux, so no setup is needed.
#[derive(Debug)]
pub struct LoopbackAddresses {
    next: u32,
}

impl LoopbackAddresses {
    pub fn new() -> Self {
        Self {
            next: u32::from(Ipv4Addr::new(127, 0, 0, 2)),
        }
    }

    /// The next unused address. Skips the .0 and .255 host parts, which
    /// look like network and broadcast addresses in logs.
    pub fn next_address(&mut self) -> Ipv4Addr {
        self.next()
            .expect("ran out of loopback addresses in 127.0.0.0/8")
    }
}

impl Default for LoopbackAddresses {
    fn default() -> Self {
        Self::new()
    }
}

impl Iterator for LoopbackAddresses {
    type Item = Ipv4Addr;

    fn next(&mut self) -> Option<Ipv4Addr> {
        loop {
            let candidate = Ipv4Addr::from(self.next);
            if candidate.octets()[0] != 127 {
                return None;
            }
            self.next += 1;
            let last = candidate.octets()[3];
            if last != 0 && last != 255 {
                return Some(candidate);
            }
        }
    }
}
