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
    let mut passed = Vec::with_capacity(fds.len());
    for index in 0..fds.len() {
        let listener = fds
            .take_tcp_listener(index)
            .with_context(|| {
                format!("passed socket {index} (LISTEN_FDS) is not a listening TCP socket")
            })?
            .with_context(|| format!("passed socket {index} (LISTEN_FDS) is missing"))?;
        passed.push((names.get(index).cloned(), listener));
    }
    assign(passed, want_http, want_https)
}

/// Gives the passed sockets (with their `FileDescriptorName=`, in `LISTEN_FDS` order) to the
/// listeners.
fn assign(
    passed: Vec<(Option<String>, TcpListener)>,
    want_http: bool,
    want_https: bool,
) -> anyhow::Result<Activated> {
    let mut activated = Activated::default();
    let mut unnamed = Vec::new();
    for (index, (name, listener)) in passed.into_iter().enumerate() {
        // L12: with `Accept=yes` systemd passes connected sockets; accept() on them would fail
        // every 100 ms for ever. SO_ACCEPTCONN says whether listen() was called.
        let is_listener = socket2::SockRef::from(&listener)
            .is_listener()
            .with_context(|| format!("passed socket {index} (LISTEN_FDS): SO_ACCEPTCONN"))?;
        if !is_listener {
            bail!(
                "passed socket {index} (LISTEN_FDS) is not listening (SO_ACCEPTCONN): use Accept=no in the .socket unit"
            );
        }
        let slot = match name.as_deref() {
            Some("http") if want_http => &mut activated.http,
            Some("https") if want_https => &mut activated.https,
            Some(name @ ("http" | "https")) => {
                bail!("a socket named {name:?} was passed but [{name}] is not configured")
            }
            _ => {
                unnamed.push(listener);
                continue;
            }
        };
        // L12: one .socket unit gives all its ListenStream=s the same FileDescriptorName=; the
        // second socket used to replace (and close) the first in silence.
        if slot.is_some() {
            bail!(
                "two passed sockets are named {:?} (FileDescriptorName=); give each socket unit its own name",
                name.unwrap_or_default()
            );
        }
        *slot = Some(listener);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn listening() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").expect("bind")
    }

    fn port(listener: &TcpListener) -> u16 {
        listener.local_addr().expect("addr").port()
    }

    #[test]
    fn named_and_unnamed_sockets_go_to_their_listeners() {
        let (a, b) = (listening(), listening());
        let (pa, pb) = (port(&a), port(&b));
        let activated =
            assign(vec![(None, a), (Some("http".into()), b)], true, true).expect("assigned");
        assert_eq!(activated.https.as_ref().map(port), Some(pa));
        assert_eq!(activated.http.as_ref().map(port), Some(pb));
    }

    /// L12: one `.socket` unit names all its `ListenStream=`s alike. The second socket used to
    /// replace (and close) the first in silence.
    #[test]
    fn two_sockets_with_the_same_name_are_refused() {
        let err = assign(
            vec![
                (Some("https".into()), listening()),
                (Some("https".into()), listening()),
            ],
            true,
            true,
        )
        .expect_err("duplicate name");
        assert_eq!(
            err.to_string(),
            "two passed sockets are named \"https\" (FileDescriptorName=); give each socket unit its own name"
        );
    }

    /// L12: a socket that is not listening (`Accept=yes` passes connected sockets) is refused
    /// at start, not retried by the accept loop every 100 ms.
    #[test]
    fn a_socket_that_is_not_listening_is_refused() {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        let err = assign(vec![(None, TcpListener::from(socket))], false, true)
            .expect_err("not listening");
        assert_eq!(
            err.to_string(),
            "passed socket 0 (LISTEN_FDS) is not listening (SO_ACCEPTCONN): use Accept=no in the .socket unit"
        );
    }
}
