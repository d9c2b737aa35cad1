//! The server's long-lived tasks, watched (L5 of the reliability review).
//!
//! - A task that panics, or ends before shutdown, is logged with its name and stops the
//!   process with an error: systemd (`Restart=on-failure`) or the container runtime starts a
//!   fresh one, where a vanished accept loop or source task would otherwise leave a process
//!   "alive and ready" that serves nothing or never refreshes. Connection tasks are not
//!   watched: a panic there ends that one connection only.
//! - [`Heartbeats`]: each source marks when a refresh starts and ends. The watchdog pings
//!   systemd only while no refresh has been under way for longer than its bound (a fetch is
//!   bounded by its timeout, so only a hung write or lock can exceed it).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::error;

use crate::clock::now_ms;

/// Spawns and watches the long-lived tasks; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Supervisor {
    tracker: TaskTracker,
    cancel: CancellationToken,
    failed: Arc<Failed>,
}

#[derive(Debug, Default)]
struct Failed {
    why: Mutex<Option<String>>,
    notify: Notify,
}

impl Supervisor {
    /// Fired at shutdown, or when a task failed: every task stops on it.
    pub fn cancel(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Spawns `task` under `name`. Its panic, or its end before [`Supervisor::cancel`] fires,
    /// fails the server.
    pub fn spawn(&self, name: impl Into<String>, task: impl Future<Output = ()> + Send + 'static) {
        let handle = self.tracker.spawn(task);
        let (name, this) = (name.into(), self.clone());
        self.tracker.spawn(async move {
            let why = match handle.await {
                Ok(()) if this.cancel.is_cancelled() => return,
                Ok(()) => "ended before shutdown".to_owned(),
                Err(e) if e.is_panic() => format!("panicked: {}", panic_text(e.into_panic())),
                Err(e) => format!("failed: {e}"),
            };
            error!(task = %name, "{why}; stopping, for the service manager to start a fresh process");
            this.failed
                .why
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get_or_insert(format!("task {name} {why}"));
            this.failed.notify.notify_one();
            this.cancel.cancel();
        });
    }

    /// Resolves with the reason when a task failed.
    pub async fn failure(&self) -> String {
        loop {
            let notified = self.failed.notify.notified();
            if let Some(why) = self.failure_now() {
                return why;
            }
            notified.await;
        }
    }

    fn failure_now(&self) -> Option<String> {
        self.failed
            .why
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Stops every task and waits for them at most `grace`; the failure, if one came first.
    pub async fn stop(&self, grace: Duration) -> Option<String> {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(?grace, "tasks still running at the end of the grace period");
        }
        self.failure_now()
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map_or_else(|| "(no message)".to_owned(), |s| (*s).to_owned()),
    }
}

/// When each source's refresh under way started, for the watchdog.
#[derive(Debug, Default)]
pub struct Heartbeats {
    beats: Mutex<Vec<Arc<Heartbeat>>>,
}

/// One source's: the refresh under way, if any, and how long it may take.
#[derive(Debug)]
pub struct Heartbeat {
    name: String,
    bound: Duration,
    /// When the refresh under way started, in ms of [`crate::clock`]; 0 when none is.
    busy_since: AtomicU64,
}

impl Heartbeats {
    /// A heartbeat for `name`, whose refreshes may take up to `bound`.
    pub fn register(&self, name: String, bound: Duration) -> Arc<Heartbeat> {
        let beat = Arc::new(Heartbeat {
            name,
            bound,
            busy_since: AtomicU64::new(0),
        });
        self.lock().push(Arc::clone(&beat));
        beat
    }

    /// The names of the sources whose refresh has been under way for longer than its bound.
    pub fn stuck(&self) -> Vec<String> {
        let now = now_ms();
        self.lock()
            .iter()
            .filter(|b| {
                let since = b.busy_since.load(Ordering::Relaxed);
                since != 0
                    && now.saturating_sub(since)
                        > u64::try_from(b.bound.as_millis()).unwrap_or(u64::MAX)
            })
            .map(|b| b.name.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Heartbeat>>> {
        self.beats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Heartbeat {
    /// Runs `refresh`, marked as under way.
    pub async fn beat<T>(&self, refresh: impl Future<Output = T>) -> T {
        self.busy_since.store(now_ms(), Ordering::Relaxed);
        let result = refresh.await;
        self.busy_since.store(0, Ordering::Relaxed);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_fails_the_server_with_its_name_and_message() {
        let supervisor = Supervisor::default();
        supervisor.spawn("listener https", async { panic!("boom") });
        let why = tokio::time::timeout(Duration::from_secs(5), supervisor.failure())
            .await
            .expect("a failure");
        assert_eq!(why, "task listener https panicked: boom");
        assert!(supervisor.cancel().is_cancelled(), "every other task stops");
        assert_eq!(supervisor.stop(Duration::from_secs(1)).await, Some(why));
    }

    #[tokio::test]
    async fn a_task_that_ends_before_shutdown_fails_the_server() {
        let supervisor = Supervisor::default();
        supervisor.spawn("source 0", async {});
        let why = tokio::time::timeout(Duration::from_secs(5), supervisor.failure())
            .await
            .expect("a failure");
        assert_eq!(why, "task source 0 ended before shutdown");
    }

    #[tokio::test]
    async fn tasks_that_end_at_shutdown_are_no_failure() {
        let supervisor = Supervisor::default();
        let cancel = supervisor.cancel().clone();
        supervisor.spawn("source 0", async move { cancel.cancelled().await });
        assert_eq!(supervisor.stop(Duration::from_secs(1)).await, None);
    }

    #[tokio::test]
    async fn a_refresh_under_way_past_its_bound_is_stuck() {
        let heartbeats = Heartbeats::default();
        let quick = heartbeats.register("quick".to_owned(), Duration::from_secs(60));
        let slow = heartbeats.register("hung".to_owned(), Duration::from_millis(20));
        quick.beat(async {}).await;
        let hung = tokio::spawn({
            let slow = Arc::clone(&slow);
            async move { slow.beat(std::future::pending::<()>()).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(heartbeats.stuck(), ["hung"]);
        hung.abort();
        let _ = hung.await;
        // An aborted refresh leaves its mark: the source task is gone, which the supervisor
        // reports; the watchdog keeps seeing it stuck until the process restarts.
        assert_eq!(heartbeats.stuck(), ["hung"]);
    }
}
