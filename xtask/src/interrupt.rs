//! Ctrl-C during `cargo xtask demo`: finish the current step, then stop
//! everything and clean up, instead of dying with servers left behind.
//!
//! Handlers for SIGINT, SIGTERM and SIGHUP (tokio's, installed from a small
//! runtime on a thread of its own) set a flag that the demo checks between
//! steps; a second signal exits at once. Handlers, unlike a blocked signal
//! mask, are not inherited by the processes the demo starts: `exec` resets
//! them, so the coordinator and the agent still stop on SIGTERM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

/// Whether an interrupt arrived.
#[derive(Debug, Clone)]
pub struct Interrupts {
    received: Arc<AtomicBool>,
}

impl Interrupts {
    /// Installs the handlers; returns once they are in place.
    pub fn install() -> anyhow::Result<Interrupts> {
        let received = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&received);
        let (installed_sender, installed) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = installed_sender.send(Err(anyhow::Error::from(error)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let streams = (
                        signal(SignalKind::interrupt()),
                        signal(SignalKind::terminate()),
                        signal(SignalKind::hangup()),
                    );
                    let (mut interrupt, mut terminate, mut hangup) = match streams {
                        (Ok(interrupt), Ok(terminate), Ok(hangup)) => {
                            (interrupt, terminate, hangup)
                        }
                        (Err(error), _, _) | (_, Err(error), _) | (_, _, Err(error)) => {
                            let _ = installed_sender.send(Err(anyhow::Error::from(error)));
                            return;
                        }
                    };
                    let _ = installed_sender.send(Ok(()));
                    loop {
                        let name = tokio::select! {
                            _ = interrupt.recv() => "SIGINT",
                            _ = terminate.recv() => "SIGTERM",
                            _ = hangup.recv() => "SIGHUP",
                        };
                        if flag.swap(true, Ordering::SeqCst) {
                            eprintln!(
                                "\n{name} again: exiting at once; processes and directories may \
                                 be left behind"
                            );
                            std::process::exit(130);
                        }
                        eprintln!(
                            "\n{name}: stopping after the current step and cleaning up (again to \
                             exit at once)"
                        );
                    }
                });
            })
            .context("start the signal thread")?;
        installed
            .recv()
            .context("the signal thread stopped before installing its handlers")?
            .context("install handlers for SIGINT, SIGTERM and SIGHUP")?;
        Ok(Interrupts { received })
    }

    /// An error once an interrupt arrived, so `?` unwinds the demo and the
    /// fixtures' destructors stop everything.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.received.load(Ordering::SeqCst), "interrupted");
        Ok(())
    }
}
