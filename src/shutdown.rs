//! Unix signal handling for the server: SIGTERM and SIGINT stop it, SIGHUP asks for a refresh.

use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

/// Resolves on the first SIGTERM or SIGINT, and says which.
pub async fn terminate() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without handlers the default disposition still ends the process.
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "shutting down");
}
