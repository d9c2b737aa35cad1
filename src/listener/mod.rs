//! The public accept loop, for plain HTTP and for TLS: our own, because a server facing the
//! internet needs limits that `axum::serve` does not set (crates-and-acme §4, gotcha 7):
//!
//! - a TLS handshake deadline, so a client that connects and sends nothing is dropped;
//! - a header deadline, which hyper also applies while an HTTP/1.1 keep-alive connection idles;
//! - a cap on open connections, so a flood of stalled clients cannot exhaust the process; at
//!   the cap a silent, stalled or idle connection makes room for the new one (`connections.rs`);
//! - an idle limit, since HTTP/2 has none of its own;
//! - a cap on concurrent HTTP/2 streams and on header size (431 beyond it).
//!
//! TLS-ALPN-01 validation handshakes (`acme-tls/1`) are answered with the challenge
//! certificate and closed; every other handshake gets the serving configuration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

use crate::metrics::{ConnectionCloseLabels, Metrics};

mod bind;
mod connections;
mod send_timeout;
#[cfg(test)]
mod tests;

pub use self::bind::{listen, listen_or_take};
use self::connections::{Check, ConnState, Connections, Entry, InFlight, InFlightBody, make_room};
use self::send_timeout::SendTimeout;

/// Limits of the public listeners (DESIGN §3): what a hostile client can hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A TLS client must finish its handshake within this.
    pub handshake_timeout: Duration,
    /// A request's headers must arrive within this; also the HTTP/1.1 keep-alive idle time.
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub h2_max_concurrent_streams: u32,
    /// Larger request headers get 431 (HTTP/1.1) or a stream reset (HTTP/2).
    pub max_header_bytes: usize,
    /// A connection on which no request has started for this long is closed gracefully
    /// (HTTP/2 has no idle limit of its own).
    pub idle_timeout: Duration,
    /// A response that makes no progress for this long (the client stopped reading, or holds
    /// an HTTP/2 window at zero) ends its connection, as nginx's `send_timeout`; also how long
    /// a connection closing gracefully may take before it is dropped.
    pub send_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
            h2_max_concurrent_streams: 64,
            max_header_bytes: 16 * 1024,
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(10),
        }
    }
}

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

/// Hyper answers headers that arrive too slowly with 408; our own first-request deadline comes
/// this much later, so that the 408 is sent before the connection is dropped.
const FIRST_REQUEST_SLACK: Duration = Duration::from_millis(500);

/// Why the server closed a connection, as counted in
/// `oidc_edge_connections_closed_by_limit_total{listener,reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Sent nothing, or did not finish the TLS handshake, within `handshake_timeout`.
    Handshake,
    /// No request started within `header_read_timeout` of the connection opening (silence
    /// after TLS, a partial HTTP/2 preface).
    FirstRequest,
    /// A response made no progress for `send_timeout` (a client that stopped reading).
    SendTimeout,
    /// A graceful close (idle, making room, shutdown) did not finish within `send_timeout`.
    CloseDeadline,
    /// Idle for `idle_timeout`: closed gracefully.
    Idle,
    /// Closed to make room for a new connection at `max_connections`.
    MakeRoom,
    /// At the cap, no connection gave way within the bound: the new one was refused.
    Refused,
}

impl Closed {
    fn label(self) -> &'static str {
        match self {
            Self::Handshake => "handshake_timeout",
            Self::FirstRequest => "first_request_timeout",
            Self::SendTimeout => "send_timeout",
            Self::CloseDeadline => "close_deadline",
            Self::Idle => "idle_timeout",
            Self::MakeRoom => "make_room",
            Self::Refused => "refused_at_cap",
        }
    }
}

/// Counts [`Closed`] reasons of one listener.
#[derive(Debug, Clone)]
pub struct CloseCounters {
    listener: &'static str,
    family: Family<ConnectionCloseLabels, Counter>,
}

impl CloseCounters {
    pub fn new(listener: &'static str, metrics: &Metrics) -> Self {
        Self {
            listener,
            family: metrics.connections_closed(),
        }
    }

    fn count(&self, reason: Closed) {
        self.family
            .get_or_create(&ConnectionCloseLabels {
                listener: self.listener,
                reason: reason.label(),
            })
            .inc();
    }
}

/// One bound listener with what it serves and how, ready to run: the shape of hickory-dns's
/// `register_listener(listener, timeout, …)`.
#[derive(Debug)]
pub struct PublicListener {
    pub name: &'static str,
    pub listener: TcpListener,
    pub router: Router,
    pub transport: Transport,
    pub limits: Limits,
}

impl PublicListener {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `cancel` fires, then lets open connections finish their requests for at
    /// most `grace`.
    pub async fn serve(self, metrics: &Metrics, cancel: CancellationToken, grace: Duration) {
        let PublicListener {
            name,
            listener,
            router,
            transport,
            limits,
        } = self;
        let closes = CloseCounters::new(name, metrics);
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
                // At the cap: make room, so that stalled or idle clients cannot keep real ones out
                // however many they open. A bounded wait: the accept loop must never hang (H1).
                Err(_) => match make_room(&connections, &permits, &closes, &cancel).await {
                    Some(permit) => permit,
                    None if cancel.is_cancelled() => break,
                    None => {
                        closes.count(Closed::Refused);
                        warn!(listener = name, %peer, "at max_connections and no connection gave way: refused a new one");
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let entry = connections.admit();
            let service = tracked_service(router.clone(), &entry.state);
            let (builder, transport, cancel, closes) = (
                Arc::clone(&builder),
                transport.clone(),
                cancel.clone(),
                closes.clone(),
            );
            tracker.spawn(async move {
            let _permit = permit;
            let closed = serve_connection(tcp, &transport, &builder, service, &entry, limits, &cancel).await;
            if let Some(reason) = closed {
                closes.count(reason);
                debug!(listener = closes.listener, %peer, reason = reason.label(), "connection closed by a limit");
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
}

/// The router as one connection's service: each request marks the connection proven and
/// active, each response body is counted in flight until hyper has sent it (drops it).
fn tracked_service(
    router: Router,
    state: &Arc<ConnState>,
) -> TowerToHyperService<
    impl tower::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<InFlightBody>,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + 'static,
> {
    let (started, sent) = (Arc::clone(state), Arc::clone(state));
    TowerToHyperService::new(
        router
            .map_request(move |request: http::Request<hyper::body::Incoming>| {
                started.request_started();
                request
            })
            .map_response(move |response: axum::response::Response| {
                let guard = InFlight::new(Arc::clone(&sent));
                response.map(|body| InFlightBody {
                    body,
                    _guard: guard,
                })
            }),
    )
}

/// One connection from accept to close; `Some` when a limit closed it.
async fn serve_connection<S>(
    tcp: TcpStream,
    transport: &Transport,
    builder: &Builder<TokioExecutor>,
    service: S,
    entry: &Entry,
    limits: Limits,
    cancel: &CancellationToken,
) -> Option<Closed>
where
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<InFlightBody>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let state = &entry.state;
    let handshake_until = tokio::time::Instant::now() + limits.handshake_timeout;
    let io = tokio::select! {
        io = open(tcp, transport, handshake_until, entry) => io,
        () = state.kill.cancelled() => return Some(Closed::MakeRoom),
        () = cancel.cancelled() => return None,
    };
    let Some(io) = io else {
        return Some(Closed::Handshake);
    };
    // L3: after TLS (or the first byte), silence or a partial HTTP/2 preface would otherwise
    // be held until idle_timeout; hyper's own header timeout covers HTTP/1.1 only.
    let first_request_by =
        tokio::time::Instant::now() + limits.header_read_timeout + FIRST_REQUEST_SLACK;
    let io = SendTimeout::new(io, limits.send_timeout, Arc::clone(state));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut close_by = None;
    loop {
        let wake = close_by.unwrap_or_else(|| state.next_check(&limits, first_request_by));
        let graceful = tokio::select! {
            _ = conn.as_mut() => {
                return state.send_timed_out.load(Ordering::Relaxed).then_some(Closed::SendTimeout);
            }
            () = state.kill.cancelled() => return Some(Closed::MakeRoom),
            () = cancel.cancelled(), if close_by.is_none() => None,
            () = state.make_room.cancelled(), if close_by.is_none() => None,
            () = tokio::time::sleep_until(wake) => {
                if close_by.is_some() {
                    return Some(Closed::CloseDeadline);
                }
                match state.check(&limits, first_request_by) {
                    Check::Wait => continue,
                    Check::Abort(reason) => return Some(reason),
                    Check::Close => Some(Closed::Idle),
                }
            }
        };
        if let Some(reason) = graceful {
            // Counted here: the connection may still finish cleanly.
            debug!(reason = reason.label(), "closing gracefully");
        }
        // HTTP/2: GOAWAY, then open streams finish; HTTP/1.1: after the response. Bounded: a
        // client that never reads the rest must not hold the slot (H1).
        state.start_closing();
        conn.as_mut().graceful_shutdown();
        close_by = Some(tokio::time::Instant::now() + limits.send_timeout);
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
