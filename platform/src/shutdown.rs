//! Graceful shutdown: one token, cancelled on SIGTERM or SIGINT, handed to every task.

use tokio_util::sync::CancellationToken;

/// Resolves on the first SIGTERM (Kubernetes, `kafkify down`) or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM; only Ctrl-C will stop the process");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, finishing in-flight work"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, finishing in-flight work"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A token that is cancelled when the process is asked to stop.
pub fn token() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    tokio::spawn(async move {
        signal().await;
        child.cancel();
    });
    token
}
