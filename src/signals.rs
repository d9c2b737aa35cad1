//! Unix signals and systemd's watchdog: SIGTERM and SIGINT stop the server, SIGHUP refreshes
//! every source at once (and reloads certificate files), and the watchdog is pinged while no
//! refresh is stuck.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::metrics::Metrics;
use crate::supervisor::Heartbeats;
use crate::systemd;
use crate::tls::files::FileCerts;

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

/// What SIGHUP does: wake every source's refresh, and reload certificate files even when
/// their stamps did not change.
#[derive(Debug)]
pub struct Hangup {
    pub refresh_now: watch::Sender<()>,
    pub certs: Option<Arc<FileCerts>>,
    pub metrics: Arc<Metrics>,
}

impl Hangup {
    /// Installs the handler now (so that a SIGHUP right after start is not fatal), and returns
    /// the task that answers it until `cancel` fires.
    pub fn install(
        self,
        cancel: CancellationToken,
    ) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
        let mut hangup =
            signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
        Ok(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    Some(()) = hangup.recv() => {
                        info!(signal = "SIGHUP", "refreshing every source now");
                        self.refresh_now.send_replace(());
                        if let Some(certs) = &self.certs {
                            certs.reload_logged(&self.metrics, true);
                        }
                    }
                }
            }
        })
    }
}

/// L5: pings systemd's watchdog every `interval` while no refresh is stuck, so that a hung
/// disk or lock gets the process restarted rather than serving stale keys "alive".
pub async fn watchdog(interval: Duration, heartbeats: Arc<Heartbeats>, cancel: CancellationToken) {
    let mut was_stuck = Vec::new();
    loop {
        let stuck = heartbeats.stuck();
        if stuck.is_empty() {
            systemd::watchdog_ping();
        } else if stuck != was_stuck {
            error!(sources = ?stuck, "a refresh is stuck; no more watchdog pings, for systemd to restart oidc-edge");
        }
        was_stuck = stuck;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
