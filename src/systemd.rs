//! systemd integration: socket activation (`LISTEN_FDS`, `LISTEN_FDNAMES`), and `sd_notify`
//! readiness, stopping and watchdog messages. Both do nothing outside systemd.
//!
//! With socket activation the service binds nothing itself, so it needs no capability at all
//! to serve on port 443 (packaging-facts: exposure 1.1 instead of 1.4).

use std::net::TcpListener;
use std::time::Duration;

use anyhow::{Context as _, bail};
use listenfd::ListenFd;
use sd_notify::NotifyState;
use tracing::warn;

/// The public listeners the service manager passed in.
#[derive(Debug, Default)]
pub struct Activated {
    pub http: Option<TcpListener>,
    pub https: Option<TcpListener>,
}

/// Takes the passed sockets. Sockets named `http` or `https` (`FileDescriptorName=`) go to
/// that listener; unnamed ones go, in order, to `[https]` then `[http]` as configured.
///
/// Call it before any thread starts: it clears `LISTEN_PID` and `LISTEN_FDS`, as
/// sd_listen_fds(3) asks, so that children do not inherit them.
pub fn take_activated_listeners(want_http: bool, want_https: bool) -> anyhow::Result<Activated> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut fds = ListenFd::from_env();
    let mut activated = Activated::default();
    let mut unnamed = Vec::new();
    for index in 0..fds.len() {
        let listener = fds
            .take_tcp_listener(index)
            .with_context(|| {
                format!("passed socket {index} (LISTEN_FDS) is not a listening TCP socket")
            })?
            .with_context(|| format!("passed socket {index} (LISTEN_FDS) is missing"))?;
        match names.get(index).map(String::as_str) {
            Some("http") if want_http => activated.http = Some(listener),
            Some("https") if want_https => activated.https = Some(listener),
            Some(name @ ("http" | "https")) => {
                bail!("a socket named {name:?} was passed but [{name}] is not configured")
            }
            _ => unnamed.push(listener),
        }
    }
    let mut unnamed = unnamed.into_iter();
    if want_https && activated.https.is_none() {
        activated.https = unnamed.next();
    }
    if want_http && activated.http.is_none() {
        activated.http = unnamed.next();
    }
    if unnamed.next().is_some() {
        bail!("more sockets were passed (LISTEN_FDS) than there are listeners to give them to");
    }
    Ok(activated)
}

/// `READY=1`: every listener is bound and serving.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1`: draining has begun.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// The interval to send `WATCHDOG=1` at, when the unit sets `WatchdogSec=`: half the timeout,
/// as sd_watchdog_enabled(3) advises.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

pub fn watchdog_ping() {
    notify(&[NotifyState::Watchdog]);
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "sd_notify failed");
    }
}
