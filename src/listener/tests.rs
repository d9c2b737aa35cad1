use super::connections::*;
use super::*;
use crate::clock::now_ms;

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

/// A response stalled for long is the surest sign of a client that stopped reading (our
/// documents fit in one window); a handshake or first request unfinished for as long may be
/// a real client a round trip of 250 ms away, or one on a loaded host. The stalled one goes
/// first.
#[test]
fn at_the_cap_a_stalled_response_goes_before_a_slow_handshake() {
    let connections = Arc::new(Connections::default());
    let [stalled, handshaking] = std::array::from_fn(|_| connections.admit());
    for entry in [&stalled, &handshaking] {
        entry.heard();
    }
    stalled.state.request_started();
    let _response = InFlight::new(Arc::clone(&stalled.state));
    age(&stalled, 3000);
    age(&handshaking, LONG_AT_CAP.as_millis() as u64 + 50);
    assert_eq!(
        connections.make_room(Round::Old),
        Some("stalled or closing")
    );
    assert_eq!(killed(&[&stalled, &handshaking]), [stalled.state.id]);
    drop(stalled);
    // With no stalled response left, the slow handshake goes before an idle connection.
    assert_eq!(connections.make_room(Round::Old), Some("without a request"));
    assert!(handshaking.state.kill.is_cancelled());
}

/// A connection told to go stays in the queues until its task ends, which on a loaded host
/// can take longer than a round: the next round drops the next stalled one instead of asking
/// the same one again and going on to the young.
#[test]
fn at_the_cap_a_connection_already_dropped_is_not_chosen_again() {
    let connections = Arc::new(Connections::default());
    let [first, second, fresh] = std::array::from_fn(|_| connections.admit());
    let responses = [&first, &second].map(|entry| {
        entry.heard();
        entry.state.request_started();
        InFlight::new(Arc::clone(&entry.state))
    });
    age(&first, 3000);
    age(&second, 2000);
    assert_eq!(
        connections.make_room(Round::Old),
        Some("stalled or closing")
    );
    assert_eq!(
        connections.make_room(Round::Proven),
        Some("stalled or closing")
    );
    assert_eq!(
        killed(&[&first, &second, &fresh]),
        [first.state.id, second.state.id]
    );
    drop(responses);
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
