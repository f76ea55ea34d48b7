//! Graceful shutdown as a named concept: one [`Shutdown`] is triggered once (by a signal, or
//! by an embedder) and every part of the server waits on it.
//!
//! The order is fixed by `server.rs`: stop accepting RPCs and finish those in flight, stop
//! every entity after its mailbox drains, close the store (sync the journal, checkpoint).

use tokio_util::sync::CancellationToken;

/// A shutdown signal that can be triggered once and awaited many times.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Begins shutdown. Triggering again does nothing.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether shutdown has begun.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once shutdown has begun.
    pub async fn triggered(&self) {
        self.token.cancelled().await
    }

    /// Triggers this shutdown on SIGTERM or SIGINT (Ctrl-C).
    pub fn trigger_on_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let shutdown = self.clone();
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
                _ = shutdown.triggered() => return,
            };
            tracing::info!(signal = name, "shutting down");
            shutdown.trigger();
        });
        Ok(())
    }
}
