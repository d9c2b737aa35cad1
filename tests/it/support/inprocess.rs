//! oidc-edge in this process, through the seam the composition root was built for:
//! `Server::bind` on 127.0.0.1:0, the addresses read from the bound sockets (not from a log
//! line), then `Server::run` until the handle is stopped or dropped.
//!
//! The server runs on a runtime of its own, on its own thread, as the binary would in its
//! own process. The tests block at times (std sockets read to the end, reader threads
//! joined, `std::thread::sleep`): on the test's runtime, that would stall the server under
//! test, and on a current-thread runtime deadlock it.
//!
//! Stopping mirrors the binary harness. [`InProcess::stop`] is SIGTERM: `run`'s shutdown
//! future resolves and the drain is awaited, while the test's runtime keeps its clients
//! answering. A drop is SIGKILL: the server's runtime is dropped, which closes every socket
//! at once, and the drop waits for that. A graceful drain on drop would wait out the 10 s
//! grace whenever the test holds a kept-alive connection, since a drop blocks the test's
//! runtime and its clients cannot answer the server's GOAWAY.
//!
//! The server's log is captured as the binary's stderr is: every thread of its runtime (the
//! workers, the blocking pool, and the thread that calls `block_on`) has, as its default,
//! the subscriber `telemetry::init` would install for the config, writing into a [`Log`].
//! The test's own threads log nowhere, so two servers in one test keep their lines apart.

use std::net::SocketAddr;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use oidc_edge::config::Config;
use oidc_edge::server::Server;
use tokio::sync::oneshot;
use tracing_subscriber::util::SubscriberInitExt as _;

use super::clients::get;
use super::eventually;
use super::log::Log;

/// A running in-process server; dropping it stops it at once, [`InProcess::stop`] drains it.
pub struct InProcess {
    /// The plain HTTP listener.
    pub addr: SocketAddr,
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// Sent to resolve `run`'s shutdown future: the graceful stop.
    shutdown: Option<oneshot::Sender<()>>,
    /// Sent or dropped to abandon `run` and drop the server's runtime: the abrupt stop.
    abort: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    log: Log,
}

impl InProcess {
    /// Loads `config` as `serve --config` would and starts it.
    pub async fn start(config: &Path) -> Self {
        let config = Config::load(config).unwrap_or_else(|e| panic!("{e}"));
        Self::run(config).await
    }

    /// Binds and runs `config`; returns once every source has finished its first fetch.
    ///
    /// That wait is what the binary harness got from timing alone: its sources started before
    /// the listeners logged their addresses, and reading two log lines took long enough for
    /// a first fetch. Waiting on `/status` makes it a condition, not luck; a test that looks
    /// at the server before its first fetch cannot use this harness.
    async fn run(config: Config) -> Self {
        super::install_crypto_provider();
        let log = Log::default();
        let dispatch = log.dispatch(&config.log);
        let (bound_tx, bound_rx) = oneshot::channel();
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let (abort, abort_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("oidc-edge in process".to_owned())
            .spawn(move || {
                let _logging = dispatch.clone().set_default();
                // What `serve` logs before the server starts (main.rs `log_warnings`).
                for warning in &config.warnings {
                    tracing::warn!(target: "oidc_edge", "{warning}");
                }
                // Two workers, as the binary has on this 2-core machine.
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    // For the thread's whole life, which ends with the runtime.
                    .on_thread_start(move || std::mem::forget(dispatch.clone().set_default()))
                    .build()
                    .expect("runtime");
                let result = runtime.block_on(async move {
                    let server = match Server::bind(config).await {
                        Ok(server) => server,
                        Err(e) => {
                            let _ = bound_tx.send(Err(format!("{e:#}")));
                            return Ok(());
                        }
                    };
                    let addrs = (server.http_addr(), server.https_addr(), server.admin_addr());
                    let _ = bound_tx.send(Ok(addrs));
                    tokio::select! {
                        ended = server.run(async {
                            let _ = shutdown_rx.await;
                        }) => ended,
                        _ = abort_rx => Ok(()),
                    }
                });
                // Drops every task still running (all of them after an abort), which closes
                // their sockets. A state write in `spawn_blocking` gets 1 s to finish; it is
                // atomic, so one cut short leaves the previous file, as after a SIGKILL.
                runtime.shutdown_timeout(Duration::from_secs(1));
                result
            })
            .expect("server thread");
        let (http, https, admin) = bound_rx
            .await
            .expect("the server thread answers")
            .unwrap_or_else(|e| panic!("Server::bind: {e}"));
        let server = Self {
            addr: http.expect("the test configs have an [http] listener"),
            https,
            admin,
            shutdown: Some(shutdown),
            abort: Some(abort),
            thread: Some(thread),
            log,
        };
        server.first_fetches().await;
        server
    }

    /// Waits until every source of every issuer has a success or a failure on `/status`.
    async fn first_fetches(&self) {
        let url = self.admin_url("/status");
        eventually("every source's first fetch", || async {
            let (code, body) = get(&url).await;
            let status: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
            code == 200
                && status["issuers"]
                    .as_array()
                    .expect("issuers")
                    .iter()
                    .flat_map(|issuer| issuer["sources"].as_array().expect("sources"))
                    .all(|source| {
                        !source["last_success"].is_null() || !source["last_error_at"].is_null()
                    })
        })
        .await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The HTTPS listener; panics when the config has none.
    pub fn https(&self) -> SocketAddr {
        self.https.expect("an [https] listener")
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lines()
    }

    /// Waits up to 10 s for a log line containing `needle` and returns it.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let thread = self.thread.as_ref().expect("running");
        self.log.wait_for(needle, || {
            thread.is_finished().then(|| "stopped".to_owned())
        })
    }

    /// Counts log lines containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log.count(needle)
    }

    /// Shuts down as on SIGTERM, waits for the drain, and asserts that `run` ended without
    /// an error.
    pub async fn stop(mut self) {
        let _ = self.shutdown.take().expect("running").send(());
        let thread = self.thread.take().expect("running");
        let ended = tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("join task");
        ended
            .expect("the server thread did not panic")
            .expect("Server::run ends without an error");
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        drop(self.abort.take());
        if let Some(thread) = self.thread.take() {
            let ended = thread.join();
            // A failing test is already unwinding: its own message matters more.
            if !std::thread::panicking() {
                ended
                    .expect("the server thread did not panic")
                    .expect("Server::run ends without an error");
            }
        }
    }
}
