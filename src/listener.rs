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
use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
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
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use crate::clock::{instant_at, now_ms};
use crate::config::Limits;
use crate::metrics::{ConnectionCloseLabels, Metrics};

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

/// How long the accept loop waits, at the cap, for a slot after each of its two attempts to
/// make room; it never waits longer than twice this (H1).
const MAKE_ROOM_WAIT: Duration = Duration::from_millis(250);

/// At the cap, what counts as "long" for a connection to be given up first: a response that
/// made no progress (or a blocked write) for this long, an idle keep-alive connection, a
/// handshake or first request still unfinished. A real client's handshake, request and
/// response take a few round trips; our documents fit in one TCP and HTTP/2 window, so
/// hyper hands them to the kernel at once.
const LONG_AT_CAP: Duration = Duration::from_millis(250);

/// At the cap, how long a connection asked to close gracefully gets before it is dropped
/// (a responsive client needs a round trip; its answers in flight must not be cut).
const CLOSING_AT_CAP: Duration = Duration::from_secs(1);

/// At the cap, a connection that has sent nothing for this long goes first. Shorter than
/// [`LONG_AT_CAP`]: a real client's first bytes leave with its connection.
const SILENT_AT_CAP: Duration = Duration::from_millis(100);

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
            family: metrics.connections_closed.clone(),
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

/// Serves `router` on `listener` until `cancel` fires, then lets open connections finish
/// their requests for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    transport: Transport,
    limits: Limits,
    closes: CloseCounters,
    cancel: CancellationToken,
    grace: Duration,
) {
    let name = closes.listener;
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

/// How far [`Connections::make_room`] may go, one round after the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Round {
    /// Only connections silent, stalled or idle for long, or asked to close and still open.
    Old,
    /// Also proven ones that are busy (a legitimate response is handed to the kernel within
    /// microseconds) or idle, however young.
    Proven,
    /// Also those still in their handshake or first request, however young.
    Any,
}

/// At the cap: asks a connection to make room and waits for its slot, in three rounds of at
/// most [`MAKE_ROOM_WAIT`] each (see [`Round`]); a round that finds nobody to ask goes on at
/// once, except before the last: killing handshakes under way as fast as new ones arrive
/// would let no one finish, so the young get a moment to make their request first. `None`:
/// no slot in time (or shutdown), and the new connection is closed: the accept loop never
/// hangs (H1).
async fn make_room(
    connections: &Connections,
    permits: &Arc<Semaphore>,
    closes: &CloseCounters,
    cancel: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    for round in [Round::Old, Round::Proven, Round::Any] {
        match connections.make_room(round) {
            Some(closed) => {
                closes.count(Closed::MakeRoom);
                debug!(
                    listener = closes.listener,
                    closed, "at max_connections: made room"
                );
            }
            None if round == Round::Old => continue,
            None => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            permit = tokio::time::timeout(MAKE_ROOM_WAIT, Arc::clone(permits).acquire_owned()) => {
                if let Ok(permit) = permit {
                    return Some(permit.expect("the semaphore is never closed"));
                }
            }
        }
    }
    None
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

/// Every open connection of one listener, so that a full listener can make room. Closed
/// first: the oldest of those that have sent nothing; then the oldest of those still in the
/// TLS handshake or their first headers; then the proven one whose last activity is oldest:
/// gracefully when it is idle, at once when its response has stalled or it is already
/// closing. A real client sends its first bytes at once and a request within a round trip or
/// two, so a flood of silent or stalled connections never pushes it out, and idle keep-alive
/// connections give way to new clients.
#[derive(Debug, Default)]
struct Connections {
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
    /// Fired to make room gracefully (a proven, idle connection).
    make_room: CancellationToken,
    /// Fired to close at once (to make room, or when a graceful close takes too long).
    kill: CancellationToken,
    /// Set at the first request.
    proven: AtomicBool,
    /// When a graceful close began, in ms of [`crate::clock`]; 0 while none has.
    closing_ms: AtomicU64,
    /// The connection's writes stalled for `send_timeout` ([`SendTimeout`]).
    send_timed_out: AtomicBool,
    /// Responses produced and not yet fully handed to the connection.
    in_flight: AtomicU32,
    /// When a write started to block ([`SendTimeout`]), in ms of [`crate::clock`]; 0 when none is.
    write_blocked_ms: AtomicU64,
    /// When a request last started or a response was last sent (or the connection opened),
    /// in ms of [`crate::clock`].
    last_activity_ms: AtomicU64,
}

/// What a connection's timer found.
#[derive(Debug, PartialEq, Eq)]
enum Check {
    Wait,
    /// Close gracefully.
    Close,
    /// Drop at once.
    Abort(Closed),
}

/// How a proven connection gives way at the cap, best candidates first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    /// Its response stalled: dropped at once.
    Drop,
    /// Idle for long: closed gracefully.
    Close,
    /// Not in the first round: busy, dropped.
    LastDrop,
    /// Asked to close, and still open: dropped at once.
    Closing,
    /// Not in the first round: idle, closed.
    LastClose,
}

impl ConnState {
    /// On every request: one clock read and two stores, no lock (DESIGN §3). A proven
    /// connection moves to `proven` when `make_room` next meets it.
    fn request_started(&self) {
        self.last_activity_ms.store(now_ms(), Ordering::Relaxed);
        self.proven.store(true, Ordering::Relaxed);
    }

    fn start_closing(&self) {
        let _ = self
            .closing_ms
            .compare_exchange(0, now_ms(), Ordering::Relaxed, Ordering::Relaxed);
    }

    fn activity(&self) -> u64 {
        self.last_activity_ms.load(Ordering::Relaxed)
    }

    /// How long the connection has been waiting on its client, when it is: a write blocked
    /// since then, or a response in flight since its last activity.
    fn busy_for(&self, now: u64) -> Option<u64> {
        let blocked = self.write_blocked_ms.load(Ordering::Relaxed);
        let since = if blocked != 0 {
            blocked
        } else if self.in_flight.load(Ordering::Relaxed) > 0 {
            self.activity()
        } else {
            return None;
        };
        Some(now.saturating_sub(since))
    }

    fn stalled(&self, now: u64, limit: Duration) -> bool {
        self.busy_for(now)
            .is_some_and(|age| age >= limit.as_millis() as u64)
    }

    /// At the cap: which proven connection to give up first, and how. `None`: not now.
    fn at_cap(&self, now: u64, round: Round) -> Option<(Rank, u64)> {
        let busy_for = self.busy_for(now);
        let busy = busy_for.is_some();
        let age = busy_for.unwrap_or_else(|| now.saturating_sub(self.activity()));
        let long = age >= LONG_AT_CAP.as_millis() as u64;
        let closing = self.closing_ms.load(Ordering::Relaxed);
        let rank = if busy && long {
            Rank::Drop
        } else if closing != 0 {
            // Asked to close gracefully (an HTTP/2 GOAWAY takes a PING round trip, an answer
            // may be under way): it gets CLOSING_AT_CAP in every round, then it is dropped,
            // but only when nothing stalled or idle is left.
            if now.saturating_sub(closing) < CLOSING_AT_CAP.as_millis() as u64 {
                return None;
            }
            Rank::Closing
        } else if long {
            Rank::Close
        } else if round == Round::Old {
            return None;
        } else if busy {
            Rank::LastDrop
        } else {
            Rank::LastClose
        };
        Some((rank, age))
    }

    /// The next moment [`ConnState::check`] can change its answer.
    fn next_check(
        &self,
        limits: &Limits,
        first_request_by: tokio::time::Instant,
    ) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        if !self.proven.load(Ordering::Relaxed) {
            // Nothing wakes this timer at the first request: look again by the time the first
            // deadline after it could be due.
            let soonest = limits.send_timeout.min(limits.idle_timeout);
            return first_request_by.min(now + soonest);
        }
        let at = self.activity();
        let send = instant_at(at, limits.send_timeout);
        let idle = instant_at(at, limits.idle_timeout);
        // A response that starts while we sleep towards the idle deadline is checked at most
        // send_timeout late: wake at both.
        if send > now { send.min(idle) } else { idle }
    }

    fn check(&self, limits: &Limits, first_request_by: tokio::time::Instant) -> Check {
        if !self.proven.load(Ordering::Relaxed) {
            return if tokio::time::Instant::now() >= first_request_by {
                Check::Abort(Closed::FirstRequest)
            } else {
                Check::Wait
            };
        }
        let now = now_ms();
        if self.stalled(now, limits.send_timeout) {
            Check::Abort(Closed::SendTimeout)
        } else if now.saturating_sub(self.activity()) >= limits.idle_timeout.as_millis() as u64 {
            Check::Close
        } else {
            Check::Wait
        }
    }
}

/// A response counted in flight while hyper holds its body: an HTTP/2 response whose client
/// keeps the window at zero is never polled to its end, so its connection is stalled.
#[derive(Debug)]
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn new(state: Arc<ConnState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.last_activity_ms.store(now_ms(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that marks its connection active when hyper is done with it.
#[derive(Debug)]
pub struct InFlightBody {
    body: axum::body::Body,
    _guard: InFlight,
}

impl hyper::body::Body for InFlightBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// nginx's `send_timeout` for one connection: a write or flush that stays blocked for
/// `limit` fails, which ends the connection (an HTTP/1.1 client that pipelines requests and
/// never reads the answers, an HTTP/2 client that stops reading the socket).
#[derive(Debug)]
struct SendTimeout<IO> {
    io: IO,
    limit: Duration,
    /// Armed while a write is blocked.
    blocked: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
    state: Arc<ConnState>,
}

impl<IO> SendTimeout<IO> {
    fn new(io: IO, limit: Duration, state: Arc<ConnState>) -> Self {
        Self {
            io,
            limit,
            blocked: None,
            armed: false,
            state,
        }
    }

    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            if self.armed {
                self.armed = false;
                self.state.write_blocked_ms.store(0, Ordering::Relaxed);
            }
            return polled;
        }
        let deadline = tokio::time::Instant::now() + self.limit;
        let timer = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
            self.state
                .write_blocked_ms
                .store(now_ms(), Ordering::Relaxed);
        }
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.state.send_timed_out.store(true, Ordering::Relaxed);
                Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()))
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for SendTimeout<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for SendTimeout<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

/// A connection's place in [`Connections`], left when its task ends.
#[derive(Debug)]
struct Entry {
    state: Arc<ConnState>,
    connections: Arc<Connections>,
}

impl Connections {
    fn admit(self: &Arc<Self>) -> Entry {
        let state = Arc::new(ConnState {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            make_room: CancellationToken::new(),
            kill: CancellationToken::new(),
            proven: AtomicBool::new(false),
            closing_ms: AtomicU64::new(0),
            send_timed_out: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
            write_blocked_ms: AtomicU64::new(0),
            last_activity_ms: AtomicU64::new(now_ms()),
        });
        self.lock().silent.insert(state.id, Arc::clone(&state));
        Entry {
            state,
            connections: Arc::clone(self),
        }
    }

    /// Signals the connection that should make room in `round`, and says which kind it was;
    /// `None` when none should. In order: the oldest that has sent nothing; the oldest still
    /// in its handshake or first request; then the proven one stalled, idle or closing the
    /// longest (see [`Rank`]). In the first round each only when it has been so for long.
    fn make_room(&self, round: Round) -> Option<&'static str> {
        let now = now_ms();
        let mut queues = self.lock();
        let Queues {
            silent,
            speaking,
            proven,
        } = &mut *queues;
        // Connections proven since they were queued move on first: no request pays for that.
        let mut move_proven = |queue: &mut BTreeMap<u64, Arc<ConnState>>| {
            queue.retain(|&id, state| {
                let stays = !state.proven.load(Ordering::Relaxed);
                if !stays {
                    proven.insert(id, Arc::clone(state));
                }
                stays
            });
        };
        move_proven(silent);
        move_proven(speaking);
        // Under a flood of new connections, one accepted a moment ago may not have been read
        // yet: the silent and the speaking are spared until they are old, or the last round.
        let oldest = |queue: &mut BTreeMap<u64, Arc<ConnState>>, least: Duration| {
            let (&id, state) = queue.first_key_value()?;
            let old = now.saturating_sub(state.activity()) >= least.as_millis() as u64;
            (old || round == Round::Any)
                .then(|| queue.remove(&id))
                .flatten()
        };
        if let Some(state) = oldest(silent, SILENT_AT_CAP) {
            state.kill.cancel();
            return Some("silent");
        }
        if round == Round::Old
            && let Some(state) = oldest(speaking, LONG_AT_CAP)
        {
            state.kill.cancel();
            return Some("without a request");
        }
        // A scan, but only at the cap: requests never pay for keeping an order. A connection
        // stays here until it is gone, so one that was asked to close and has not is met
        // again, and then dropped (H1).
        let victim = proven
            .values()
            .filter_map(|s| s.at_cap(now, round).map(|(rank, age)| (rank, age, s)))
            .min_by_key(|&(rank, age, _)| (rank, std::cmp::Reverse(age)));
        match victim {
            Some((Rank::Close | Rank::LastClose, _, state)) => {
                state.start_closing();
                state.make_room.cancel();
                Some("idle the longest")
            }
            Some((_, _, state)) => {
                state.kill.cancel();
                Some("stalled or closing")
            }
            None => {
                let state = oldest(speaking, LONG_AT_CAP)?;
                state.kill.cancel();
                Some("without a request")
            }
        }
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

    fn signalled(entry: &Entry) -> bool {
        entry.state.make_room.is_cancelled() || entry.state.kill.is_cancelled()
    }

    /// Makes `entry`'s last activity (or its admission) `ms` old.
    fn age(entry: &Entry, ms: u64) {
        entry
            .state
            .last_activity_ms
            .store(now_ms() - ms, Ordering::Relaxed);
    }

    fn killed(entries: &[&Entry]) -> Vec<u64> {
        entries
            .iter()
            .filter(|e| e.state.kill.is_cancelled())
            .map(|e| e.state.id)
            .collect()
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
            silent_new,
        ] = std::array::from_fn(|_| connections.admit());
        for entry in [&speaking_old, &speaking_new, &proven_busy, &proven_idle] {
            entry.heard();
        }
        proven_idle.state.request_started();
        proven_busy.state.request_started();
        age(&proven_idle, 5000);
        age(&proven_busy, 3000);
        age(&speaking_old, 2000);
        age(&speaking_new, 10);
        age(&silent_a, 300);
        age(&silent_b, 200);
        // Silent ones first, oldest first, at once; one that just connected is spared.
        assert_eq!(connections.make_room(Round::Old), Some("silent"));
        assert_eq!(connections.make_room(Round::Old), Some("silent"));
        assert_eq!(
            killed(&[&silent_a, &silent_b]),
            [silent_a.state.id, silent_b.state.id]
        );
        // Then a handshake or first request unfinished for long.
        assert_eq!(connections.make_room(Round::Old), Some("without a request"));
        assert!(speaking_old.state.kill.is_cancelled());
        // Then the proven one idle the longest, gracefully.
        assert_eq!(connections.make_room(Round::Old), Some("idle the longest"));
        assert!(proven_idle.state.make_room.is_cancelled());
        assert!(!proven_idle.state.kill.is_cancelled());
        // While it closes (it gets CLOSING_AT_CAP for that), the next idlest.
        assert_eq!(connections.make_room(Round::Old), Some("idle the longest"));
        assert!(proven_busy.state.make_room.is_cancelled());
        assert_eq!(
            connections.make_room(Round::Old),
            None,
            "closes get their time"
        );
        // Met again once that time has run out: dropped at once.
        let late = now_ms() - CLOSING_AT_CAP.as_millis() as u64;
        proven_idle.state.closing_ms.store(late, Ordering::Relaxed);
        assert_eq!(
            connections.make_room(Round::Old),
            Some("stalled or closing")
        );
        assert!(proven_idle.state.kill.is_cancelled());
        assert!(!proven_busy.state.kill.is_cancelled());
        drop((proven_idle, proven_busy));
        // The young ones give way only in the second round: silent, then speaking.
        assert_eq!(connections.make_room(Round::Old), None);
        assert!(!signalled(&speaking_new) && !signalled(&silent_new));
        assert_eq!(connections.make_room(Round::Proven), None);
        assert_eq!(connections.make_room(Round::Any), Some("silent"));
        assert!(silent_new.state.kill.is_cancelled());
        assert_eq!(connections.make_room(Round::Any), Some("without a request"));
        assert!(speaking_new.state.kill.is_cancelled());
    }

    #[test]
    fn at_the_cap_a_stalled_response_goes_first_and_at_once() {
        let connections = Arc::new(Connections::default());
        let [idle, stalled, fresh] = std::array::from_fn(|_| connections.admit());
        for entry in [&idle, &stalled, &fresh] {
            entry.heard();
            entry.state.request_started();
        }
        let response = InFlight::new(Arc::clone(&stalled.state));
        age(&idle, 10_000);
        age(&stalled, LONG_AT_CAP.as_millis() as u64 + 1);
        // Stalled before idle, however long idle, and dropped rather than closed gracefully.
        assert_eq!(
            connections.make_room(Round::Old),
            Some("stalled or closing")
        );
        assert!(stalled.state.kill.is_cancelled());
        assert!(!stalled.state.make_room.is_cancelled());
        assert!(!signalled(&idle));
        drop(response);
        drop(stalled);
        // A write blocked for long is stalled too, whatever the responses in flight.
        fresh
            .state
            .write_blocked_ms
            .store(now_ms() - 1000, Ordering::Relaxed);
        assert_eq!(
            connections.make_room(Round::Old),
            Some("stalled or closing")
        );
        assert!(fresh.state.kill.is_cancelled());
        drop(fresh);
        assert_eq!(connections.make_room(Round::Old), Some("idle the longest"));
    }

    #[test]
    fn young_busy_then_idle_connections_give_way_only_after_the_first_round() {
        let connections = Arc::new(Connections::default());
        let [busy, idle] = std::array::from_fn(|_| connections.admit());
        for entry in [&busy, &idle] {
            entry.heard();
            entry.state.request_started();
        }
        let _response = InFlight::new(Arc::clone(&busy.state));
        age(&busy, 100);
        age(&idle, 50);
        assert_eq!(connections.make_room(Round::Old), None);
        assert_eq!(
            connections.make_room(Round::Proven),
            Some("stalled or closing")
        );
        assert!(busy.state.kill.is_cancelled(), "the busy one, dropped");
        assert!(!signalled(&idle));
        drop(busy);
        assert_eq!(
            connections.make_room(Round::Proven),
            Some("idle the longest")
        );
        assert!(
            idle.state.make_room.is_cancelled(),
            "the idle one, gracefully"
        );
    }

    #[test]
    fn a_closed_connection_leaves_every_queue() {
        let connections = Arc::new(Connections::default());
        drop(connections.admit());
        let heard = connections.admit();
        heard.heard();
        drop(heard);
        let proven = connections.admit();
        proven.state.request_started();
        drop(proven);
        assert!(connections.make_room(Round::Any).is_none());
    }

    #[test]
    fn each_request_and_each_sent_response_moves_the_deadlines() {
        let connections = Arc::new(Connections::default());
        let entry = connections.admit();
        let limits = Limits::default();
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        entry.state.request_started();
        let first = entry.state.next_check(&limits, far);
        std::thread::sleep(Duration::from_millis(5));
        entry.state.request_started();
        assert!(entry.state.next_check(&limits, far) > first);
        let response = InFlight::new(Arc::clone(&entry.state));
        let during = entry.state.next_check(&limits, far);
        std::thread::sleep(Duration::from_millis(5));
        drop(response);
        assert!(entry.state.next_check(&limits, far) > during);
    }

    #[test]
    fn the_timer_closes_idle_connections_and_drops_stalled_ones() {
        let connections = Arc::new(Connections::default());
        let entry = connections.admit();
        let limits = Limits {
            send_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let past = tokio::time::Instant::now();
        assert_eq!(
            entry.state.check(&limits, past),
            Check::Abort(Closed::FirstRequest),
            "no request by the deadline"
        );
        entry.state.request_started();
        assert_eq!(entry.state.check(&limits, past), Check::Wait);
        let response = InFlight::new(Arc::clone(&entry.state));
        age(&entry, 5000);
        assert_eq!(entry.state.check(&limits, past), Check::Wait);
        age(&entry, 11_000);
        assert_eq!(
            entry.state.check(&limits, past),
            Check::Abort(Closed::SendTimeout),
            "a response without progress for send_timeout"
        );
        drop(response);
        age(&entry, 30_000);
        assert_eq!(
            entry.state.check(&limits, past),
            Check::Wait,
            "idle, not yet"
        );
        age(&entry, 61_000);
        assert_eq!(entry.state.check(&limits, past), Check::Close);
    }
}
