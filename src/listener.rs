//! The public accept loop, for plain HTTP and for TLS: our own, because a server facing the
//! internet needs limits that `axum::serve` does not set (crates-and-acme §4, gotcha 7):
//!
//! - a TLS handshake deadline, so a client that connects and sends nothing is dropped;
//! - a header deadline, which hyper also applies while an HTTP/1.1 keep-alive connection idles;
//! - a cap on open connections, so a flood of stalled clients cannot exhaust the process; at
//!   the cap a silent, stalled or idle connection makes room for the new one ([`Connections`]);
//! - an idle limit, since HTTP/2 has none of its own;
//! - a cap on concurrent HTTP/2 streams and on header size (431 beyond it).
//!
//! TLS-ALPN-01 validation handshakes (`acme-tls/1`) are answered with the challenge
//! certificate and closed; every other handshake gets the serving configuration.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
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
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let connections = Arc::new(Connections::default());
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
                // At the cap: make room, so that stalled or idle clients cannot keep real
                // ones out however many they open. When every connection is busy, this one
                // waits for a slot (and the kernel backlog holds the next ones).
                if let Some(closed) = connections.make_room() {
                    debug!(listener = name, closed, "at max_connections: made room");
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    permit = Arc::clone(&permits).acquire_owned() => permit.expect("the semaphore is never closed"),
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        let entry = connections.admit();
        let service = {
            let (state, connections) = (Arc::clone(&entry.state), Arc::clone(&connections));
            TowerToHyperService::new(router.clone().map_request(
                move |request: http::Request<hyper::body::Incoming>| {
                    connections.request_started(&state);
                    request
                },
            ))
        };
        let (builder, transport, cancel) =
            (Arc::clone(&builder), transport.clone(), cancel.clone());
        let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
        tracker.spawn(async move {
            let _permit = permit;
            let state = &entry.state;
            let io = tokio::select! {
                io = open(tcp, &transport, deadline, &entry) => io,
                () = state.make_room.cancelled() => None,
                () = cancel.cancelled() => None,
            };
            let Some(io) = io else {
                debug!(%peer, "closed before a request: deadline, protocol error or making room");
                return;
            };
            let conn = builder.serve_connection(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            let mut closing = false;
            loop {
                let idle_until = entry.connections.idle_deadline(state, limits.idle_timeout);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    () = cancel.cancelled(), if !closing => {}
                    () = state.make_room.cancelled(), if !closing => {
                        if !state.proven.load(Ordering::Relaxed) {
                            return;
                        }
                    }
                    () = tokio::time::sleep_until(idle_until), if !closing => {
                        if entry.connections.idle_deadline(state, limits.idle_timeout) > tokio::time::Instant::now() {
                            continue;
                        }
                    }
                }
                // HTTP/2: GOAWAY, then open streams finish; HTTP/1.1: after the response.
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        });
    }
    drop(listener);
    info!(listener = name, "draining open connections");
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            listener = name,
            ?grace,
            "connections still open at the end of the grace period"
        );
    }
}

/// Waits for the first byte (a connection that sends nothing is closed at the handshake
/// deadline on either listener), then completes the TLS handshake if there is one.
async fn open(
    tcp: TcpStream,
    transport: &Transport,
    deadline: tokio::time::Instant,
    entry: &Entry,
) -> Option<Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>> {
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
        Ok(Ok(1..)) => entry.heard(),
        _ => return None,
    }
    match transport {
        Transport::Plain => Some(Either::Left(tcp)),
        Transport::Tls(tls) => tls_handshake(tcp, tls, deadline).await.map(Either::Right),
    }
}

/// Every open connection of one listener, so that a full listener can make room. Closed
/// first: the oldest of those that have sent nothing; then the oldest of those still in the
/// TLS handshake or their first headers; then, gracefully, the one idle the longest. A real
/// client sends its first bytes at once and a request within a round trip or two, so a flood
/// of silent or stalled connections never pushes it out, and idle keep-alive connections
/// give way to new clients.
#[derive(Debug)]
struct Connections {
    /// The clock of `last_request_ms`.
    epoch: std::time::Instant,
    next: AtomicU64,
    queues: Mutex<Queues>,
}

#[derive(Debug, Default)]
struct Queues {
    silent: BTreeMap<u64, Arc<ConnState>>,
    speaking: BTreeMap<u64, Arc<ConnState>>,
    proven: HashMap<u64, Arc<ConnState>>,
}

#[derive(Debug)]
struct ConnState {
    id: u64,
    /// Fired to make room: closes an unproven connection at once, a proven one gracefully.
    make_room: CancellationToken,
    /// Set at the first request.
    proven: AtomicBool,
    /// When the last request started (or the connection opened), in ms since `epoch`.
    last_request_ms: AtomicU64,
}

/// A connection's place in [`Connections`], left when its task ends.
#[derive(Debug)]
struct Entry {
    state: Arc<ConnState>,
    connections: Arc<Connections>,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            epoch: std::time::Instant::now(),
            next: AtomicU64::new(0),
            queues: Mutex::default(),
        }
    }
}

impl Connections {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn admit(self: &Arc<Self>) -> Entry {
        let state = Arc::new(ConnState {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            make_room: CancellationToken::new(),
            proven: AtomicBool::new(false),
            last_request_ms: AtomicU64::new(self.now_ms()),
        });
        self.lock().silent.insert(state.id, Arc::clone(&state));
        Entry {
            state,
            connections: Arc::clone(self),
        }
    }

    /// On every request: one clock read and two stores, no lock (DESIGN §3). A proven
    /// connection moves to `proven` when `make_room` next meets it.
    fn request_started(&self, state: &ConnState) {
        state
            .last_request_ms
            .store(self.now_ms(), Ordering::Relaxed);
        state.proven.store(true, Ordering::Relaxed);
    }

    /// When the connection's idle time runs out, as the deadline a timer waits for.
    fn idle_deadline(&self, state: &ConnState, idle: Duration) -> tokio::time::Instant {
        let last = Duration::from_millis(state.last_request_ms.load(Ordering::Relaxed));
        tokio::time::Instant::from_std(self.epoch + last + idle)
    }

    /// Signals the connection to close that should make room, and says which kind it was;
    /// `None` when there are no connections at all.
    fn make_room(&self) -> Option<&'static str> {
        let mut queues = self.lock();
        let Queues {
            silent,
            speaking,
            proven,
        } = &mut *queues;
        let mut unproven = |queue: &mut BTreeMap<u64, Arc<ConnState>>| {
            while let Some((id, state)) = queue.pop_first() {
                if !state.proven.load(Ordering::Relaxed) {
                    return Some(state);
                }
                proven.insert(id, state);
            }
            None
        };
        let (kind, state) = if let Some(state) = unproven(silent) {
            ("silent", state)
        } else if let Some(state) = unproven(speaking) {
            ("without a request", state)
        } else {
            // A scan, but only at the cap: requests never pay for keeping an order.
            let idlest = proven
                .values()
                .min_by_key(|s| s.last_request_ms.load(Ordering::Relaxed))
                .map(|s| s.id)?;
            ("idle the longest", proven.remove(&idlest)?)
        };
        state.make_room.cancel();
        Some(kind)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        // The queues stay consistent even if a holder panicked: every operation is one call.
        self.queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Entry {
    /// The first bytes arrived: behind the silent ones.
    fn heard(&self) {
        let mut queues = self.connections.lock();
        if let Some(state) = queues.silent.remove(&self.state.id) {
            queues.speaking.insert(self.state.id, state);
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let mut queues = self.connections.lock();
        let id = self.state.id;
        queues.silent.remove(&id);
        queues.speaking.remove(&id);
        queues.proven.remove(&id);
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

    /// The order in which `make_room` signals the connections in `candidates`.
    fn eviction_order(connections: &Connections, candidates: &[&Entry]) -> Vec<u64> {
        let mut order = Vec::new();
        for _ in 0..candidates.len() {
            assert!(connections.make_room().is_some());
            let signalled = candidates
                .iter()
                .find(|e| e.state.make_room.is_cancelled() && !order.contains(&e.state.id))
                .expect("one more signalled");
            order.push(signalled.state.id);
        }
        order
    }

    #[test]
    fn a_full_listener_closes_silent_then_stalled_then_the_idlest_proven_connection() {
        let connections = Arc::new(Connections::default());
        let [
            proven_busy,
            speaking_old,
            silent_a,
            proven_idle,
            speaking_new,
            silent_b,
        ] = std::array::from_fn(|_| connections.admit());
        for entry in [&speaking_old, &speaking_new, &proven_busy, &proven_idle] {
            entry.heard();
        }
        connections.request_started(&proven_idle.state);
        std::thread::sleep(Duration::from_millis(5));
        connections.request_started(&proven_busy.state);
        let order = eviction_order(
            &connections,
            &[
                &proven_busy,
                &speaking_old,
                &silent_a,
                &proven_idle,
                &speaking_new,
                &silent_b,
            ],
        );
        let ids = |entries: &[&Entry]| entries.iter().map(|e| e.state.id).collect::<Vec<_>>();
        assert_eq!(
            order,
            ids(&[
                &silent_a,
                &silent_b,
                &speaking_old,
                &speaking_new,
                &proven_idle,
                &proven_busy
            ])
        );
        assert!(connections.make_room().is_none(), "nothing left to close");
    }

    #[test]
    fn a_closed_connection_leaves_every_queue() {
        let connections = Arc::new(Connections::default());
        drop(connections.admit());
        let heard = connections.admit();
        heard.heard();
        drop(heard);
        let proven = connections.admit();
        connections.request_started(&proven.state);
        drop(proven);
        assert!(connections.make_room().is_none());
    }

    #[test]
    fn each_request_moves_the_idle_deadline() {
        let connections = Arc::new(Connections::default());
        let entry = connections.admit();
        let idle = Duration::from_secs(60);
        let first = connections.idle_deadline(&entry.state, idle);
        std::thread::sleep(Duration::from_millis(5));
        connections.request_started(&entry.state);
        assert!(connections.idle_deadline(&entry.state, idle) > first);
    }
}
