//! The public accept loop, for plain HTTP and for TLS: our own, because a server facing the
//! internet needs limits that `axum::serve` does not set (crates-and-acme §4, gotcha 7):
//!
//! - a TLS handshake deadline, so a client that connects and sends nothing is dropped;
//! - a header deadline, which hyper also applies while an HTTP/1.1 keep-alive connection idles;
//! - a cap on open connections, so a flood of stalled clients cannot exhaust the process; at
//!   the cap the oldest connection that has not sent a request yet makes room for the new one;
//! - a cap on concurrent HTTP/2 streams and on header size (431 beyond it).
//!
//! TLS-ALPN-01 validation handshakes (`acme-tls/1`) are answered with the challenge
//! certificate and closed; every other handshake gets the serving configuration.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use crate::config::Limits;

/// How connections on one listener are wrapped.
#[derive(Debug, Clone)]
pub enum Transport {
    Plain,
    Tls(Arc<TlsTransport>),
}

#[derive(Debug)]
pub struct TlsTransport {
    /// The serving configuration: ALPN h2 and http/1.1, TLS 1.2 and 1.3.
    pub config: Arc<ServerConfig>,
    /// Answers TLS-ALPN-01 validation handshakes when ACME is on.
    pub acme_challenge: Option<Arc<ServerConfig>>,
}

/// Serves `router` on `listener` until `cancel` fires, then lets open connections finish
/// their requests for at most `grace`.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    router: Router,
    transport: Transport,
    limits: Limits,
    cancel: CancellationToken,
    grace: Duration,
) {
    let builder = Arc::new(http_builder(&limits));
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let unproven = Arc::new(Unproven::default());
    loop {
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // At the cap: close the oldest connection that has not sent a request yet,
                // so stalled clients cannot keep real ones out however many they open. When
                // every connection is serving requests, this one waits for a slot instead
                // (and the kernel backlog holds the next ones).
                if unproven.evict_oldest() {
                    debug!(
                        listener = name,
                        "at max_connections: closed the oldest connection without a request"
                    );
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    permit = Arc::clone(&permits).acquire_owned() => permit.expect("the semaphore is never closed"),
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        let probation = Arc::new(unproven.admit());
        let (builder, transport, watcher) =
            (Arc::clone(&builder), transport.clone(), graceful.watcher());
        let service = {
            let probation = Arc::clone(&probation);
            TowerToHyperService::new(router.clone().map_request(
                move |request: http::Request<hyper::body::Incoming>| {
                    probation.passed();
                    request
                },
            ))
        };
        let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let evicted = probation.evicted.clone();
            let connection = async {
                // A connection that sends nothing is closed at the handshake deadline on
                // either listener; its first byte moves it behind the silent ones.
                let mut first = [0u8; 1];
                match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
                    Ok(Ok(1..)) => probation.heard(),
                    _ => return,
                }
                match transport {
                    Transport::Plain => {
                        let conn = builder.serve_connection(TokioIo::new(tcp), service);
                        let _ = watcher.watch(conn.into_owned()).await;
                    }
                    Transport::Tls(tls) => {
                        let Some(stream) = tls_handshake(tcp, &tls, deadline).await else {
                            debug!(%peer, "TLS handshake not completed");
                            return;
                        };
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        let _ = watcher.watch(conn.into_owned()).await;
                    }
                }
            };
            tokio::select! {
                () = connection => {}
                () = evicted.cancelled() => debug!(%peer, "closed to make room"),
            }
        });
    }
    drop(listener);
    info!(listener = name, "draining open connections");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            listener = name,
            ?grace,
            "connections still open at the end of the grace period"
        );
    }
}

/// The connections that have not sent a complete request yet, in two queues, oldest first:
/// those that have sent nothing at all, then those still in the TLS handshake or their first
/// headers. A full listener closes the oldest silent one to make room, and only when none is
/// left the oldest of the others. A real client sends its first bytes at once and leaves both
/// queues within a round trip or two, so a flood of silent connections never pushes it out.
#[derive(Debug, Default)]
struct Unproven {
    next: AtomicU64,
    queues: Mutex<Queues>,
}

#[derive(Debug, Default)]
struct Queues {
    silent: BTreeMap<u64, CancellationToken>,
    speaking: BTreeMap<u64, CancellationToken>,
}

impl Unproven {
    fn admit(self: &Arc<Self>) -> Probation {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evicted = CancellationToken::new();
        self.lock().silent.insert(id, evicted.clone());
        Probation {
            id,
            evicted,
            passed: AtomicBool::new(false),
            list: Arc::clone(self),
        }
    }

    /// Closes the oldest silent connection, else the oldest other one on probation; false
    /// when every connection has sent a request.
    fn evict_oldest(&self) -> bool {
        let mut queues = self.lock();
        let oldest = match queues.silent.pop_first() {
            Some(oldest) => Some(oldest),
            None => queues.speaking.pop_first(),
        };
        match oldest {
            Some((_, evicted)) => {
                evicted.cancel();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        // The queues stay consistent even if a holder panicked: every operation is one call.
        self.queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One connection's place in [`Unproven`], left at its first request or when it closes.
#[derive(Debug)]
struct Probation {
    id: u64,
    evicted: CancellationToken,
    passed: AtomicBool,
    list: Arc<Unproven>,
}

impl Probation {
    /// The first bytes arrived: from the silent queue to the other one.
    fn heard(&self) {
        let mut queues = self.list.lock();
        if let Some(evicted) = queues.silent.remove(&self.id) {
            queues.speaking.insert(self.id, evicted);
        }
    }

    /// Called on every request; only the first one takes the lock.
    fn passed(&self) {
        if !self.passed.swap(true, Ordering::Relaxed) {
            let mut queues = self.list.lock();
            queues.silent.remove(&self.id);
            queues.speaking.remove(&self.id);
        }
    }
}

impl Drop for Probation {
    fn drop(&mut self) {
        self.passed();
    }
}

/// The handshake, bounded by `deadline` (the handshake timeout from the accept on). `None`: dropped (timeout,
/// protocol error, or a completed ACME validation).
async fn tls_handshake<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    tls: &TlsTransport,
    deadline: tokio::time::Instant,
) -> Option<tokio_rustls::server::TlsStream<IO>> {
    let handshake = async {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io)
            .await
            .ok()?;
        if let Some(challenge) = &tls.acme_challenge
            && rustls_acme::is_tls_alpn_challenge(&start.client_hello())
        {
            // The validation server only needs the handshake; no HTTP follows.
            let _ = start.into_stream(Arc::clone(challenge)).await;
            return None;
        }
        start.into_stream(Arc::clone(&tls.config)).await.ok()
    };
    tokio::time::timeout_at(deadline, handshake)
        .await
        .ok()
        .flatten()
}

fn http_builder(limits: &Limits) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Rapid-reset floods (CVE-2023-44487) end the connection.
        .max_pending_accept_reset_streams(Some(20))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    builder
}

/// Raises the soft open-file limit to the hard one, as Go's runtime and nginx's
/// `worker_rlimit_nofile` do: systemd and most shells start services at a soft 1024, which a
/// few hundred stalled clients on each listener would exhaust long before `max_connections`.
/// Warns when even the hard limit cannot hold every listener at its cap.
pub fn raise_open_file_limit(limits: &Limits, listeners: usize) {
    // One descriptor per connection, plus the listeners, upstream fetches, state and logs.
    let wanted = (limits.max_connections * listeners + 256) as u64;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < wanted => warn!(
            open_file_limit = limit,
            max_connections = limits.max_connections,
            listeners,
            "the open-file limit is below what limits.max_connections needs; new \
             connections will wait in the kernel backlog once it is reached"
        ),
        Ok(limit) => debug!(open_file_limit = limit, "open-file limit"),
        Err(e) => warn!(error = %e, "could not raise the open-file limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_listener_evicts_silent_connections_first_then_the_oldest_speaking_one() {
        let unproven = Arc::new(Unproven::default());
        let [speaking_old, silent_a, speaking_new, silent_b, proven] =
            std::array::from_fn(|_| unproven.admit());
        speaking_old.heard();
        speaking_new.heard();
        proven.heard();
        proven.passed();
        let candidates = [&speaking_old, &silent_a, &speaking_new, &silent_b];
        let mut order = Vec::new();
        for _ in 0..candidates.len() {
            assert!(unproven.evict_oldest());
            let evicted = candidates
                .iter()
                .find(|p| p.evicted.is_cancelled() && !order.contains(&p.id))
                .expect("one more evicted");
            order.push(evicted.id);
        }
        assert_eq!(
            order,
            [silent_a.id, silent_b.id, speaking_old.id, speaking_new.id]
        );
        // A connection that sent a request is never evicted.
        assert!(!unproven.evict_oldest());
        assert!(!proven.evicted.is_cancelled());
    }

    #[test]
    fn a_closed_connection_leaves_the_queues() {
        let unproven = Arc::new(Unproven::default());
        drop(unproven.admit());
        let heard = unproven.admit();
        heard.heard();
        drop(heard);
        assert!(!unproven.evict_oldest());
    }
}
