//! Every open connection of one listener, and how a full listener makes room (H1).

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::clock::{instant_at, now_ms};

use super::{CloseCounters, Closed, Limits};

/// How long the accept loop waits, at the cap, for a slot after each of its two attempts to
/// make room; it never waits longer than twice this (H1).
pub(super) const MAKE_ROOM_WAIT: Duration = Duration::from_millis(250);

/// At the cap, what counts as "long" for a connection to be given up first: a response that
/// made no progress (or a blocked write) for this long, an idle keep-alive connection, a
/// handshake or first request still unfinished. A real client's handshake, request and
/// response take a few round trips; our documents fit in one TCP and HTTP/2 window, so
/// hyper hands them to the kernel at once.
pub(super) const LONG_AT_CAP: Duration = Duration::from_millis(250);

/// At the cap, how long a connection asked to close gracefully gets before it is dropped
/// (a responsive client needs a round trip; its answers in flight must not be cut).
pub(super) const CLOSING_AT_CAP: Duration = Duration::from_secs(1);

/// At the cap, a connection that has sent nothing for this long goes first. Shorter than
/// [`LONG_AT_CAP`]: a real client's first bytes leave with its connection.
pub(super) const SILENT_AT_CAP: Duration = Duration::from_millis(100);

/// How far [`Connections::make_room`] may go, one round after the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Round {
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
pub(super) async fn make_room(
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

/// Every open connection of one listener, so that a full listener can make room. Closed
/// first: the oldest of those that have sent nothing; then the proven one whose response
/// stalled the longest, at once; then the oldest of those still in the TLS handshake or
/// their first headers; then the proven one whose last activity is oldest: gracefully when
/// it is idle, at once when it is already closing. A real client sends its first bytes at
/// once and a request within a round trip or two, so a flood of silent or stalled
/// connections never pushes it out, and idle keep-alive connections give way to new clients.
#[derive(Debug, Default)]
pub(super) struct Connections {
    pub(super) next: AtomicU64,
    pub(super) queues: Mutex<Queues>,
}

#[derive(Debug, Default)]
pub(super) struct Queues {
    pub(super) silent: BTreeMap<u64, Arc<ConnState>>,
    pub(super) speaking: BTreeMap<u64, Arc<ConnState>>,
    pub(super) proven: HashMap<u64, Arc<ConnState>>,
}

#[derive(Debug)]
pub(super) struct ConnState {
    pub(super) id: u64,
    /// Fired to make room gracefully (a proven, idle connection).
    pub(super) make_room: CancellationToken,
    /// Fired to close at once (to make room, or when a graceful close takes too long).
    pub(super) kill: CancellationToken,
    /// Set at the first request.
    pub(super) proven: AtomicBool,
    /// When a graceful close began, in ms of [`crate::clock`]; 0 while none has.
    pub(super) closing_ms: AtomicU64,
    /// The connection's writes stalled for `send_timeout` ([`SendTimeout`]).
    pub(super) send_timed_out: AtomicBool,
    /// Responses produced and not yet fully handed to the connection.
    pub(super) in_flight: AtomicU32,
    /// When a write started to block ([`SendTimeout`]), in ms of [`crate::clock`]; 0 when none is.
    pub(super) write_blocked_ms: AtomicU64,
    /// When a request last started or a response was last sent (or the connection opened),
    /// in ms of [`crate::clock`].
    pub(super) last_activity_ms: AtomicU64,
}

/// What a connection's timer found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Check {
    Wait,
    /// Close gracefully.
    Close,
    /// Drop at once.
    Abort(Closed),
}

/// How a proven connection gives way at the cap, best candidates first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Rank {
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
    pub(super) fn request_started(&self) {
        self.last_activity_ms.store(now_ms(), Ordering::Relaxed);
        self.proven.store(true, Ordering::Relaxed);
    }

    pub(super) fn start_closing(&self) {
        let _ = self
            .closing_ms
            .compare_exchange(0, now_ms(), Ordering::Relaxed, Ordering::Relaxed);
    }

    pub(super) fn activity(&self) -> u64 {
        self.last_activity_ms.load(Ordering::Relaxed)
    }

    /// How long the connection has been waiting on its client, when it is: a write blocked
    /// since then, or a response in flight since its last activity.
    pub(super) fn busy_for(&self, now: u64) -> Option<u64> {
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

    pub(super) fn stalled(&self, now: u64, limit: Duration) -> bool {
        self.busy_for(now)
            .is_some_and(|age| age >= limit.as_millis() as u64)
    }

    /// At the cap: which proven connection to give up first, and how. `None`: not now.
    pub(super) fn at_cap(&self, now: u64, round: Round) -> Option<(Rank, u64)> {
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
    pub(super) fn next_check(
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

    pub(super) fn check(&self, limits: &Limits, first_request_by: tokio::time::Instant) -> Check {
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
pub(super) struct InFlight(Arc<ConnState>);

impl InFlight {
    pub(super) fn new(state: Arc<ConnState>) -> Self {
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
pub(super) struct InFlightBody {
    pub(super) body: axum::body::Body,
    pub(super) _guard: InFlight,
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

/// A connection's place in [`Connections`], left when its task ends.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) state: Arc<ConnState>,
    pub(super) connections: Arc<Connections>,
}

impl Connections {
    pub(super) fn admit(self: &Arc<Self>) -> Entry {
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
    /// `None` when none should. In order: the oldest that has sent nothing; the proven one
    /// whose response stalled the longest; the oldest still in its handshake or first
    /// request; then the proven one idle or closing the longest (see [`Rank`]). In the first
    /// round each only when it has been so for long.
    pub(super) fn make_room(&self, round: Round) -> Option<&'static str> {
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
        // A scan, but only at the cap: requests never pay for keeping an order. A connection
        // stays here until it is gone, so one that was asked to close and has not is met
        // again, and then dropped (H1); one already dropped whose task has not yet ended is
        // not asked again.
        let victim = proven
            .values()
            .filter(|s| !s.kill.is_cancelled())
            .filter_map(|s| s.at_cap(now, round).map(|(rank, age)| (rank, age, s)))
            .min_by_key(|&(rank, age, _)| (rank, std::cmp::Reverse(age)));
        // A response stalled for long goes before a handshake or first request unfinished for
        // as long: ours fit in one window, while a real client a round trip of 250 ms away (or
        // on a loaded host) is still in its handshake then.
        if round == Round::Old
            && !matches!(victim, Some((Rank::Drop, ..)))
            && let Some(state) = oldest(speaking, LONG_AT_CAP)
        {
            state.kill.cancel();
            return Some("without a request");
        }
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

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        // The queues stay consistent even if a holder panicked: every operation is one call.
        self.queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Entry {
    /// The first bytes arrived: behind the silent ones.
    pub(super) fn heard(&self) {
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
