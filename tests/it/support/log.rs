//! A server's log, line by line, for both harnesses: the binary's stderr as it reads it, or
//! what an in-process server's `tracing` events become through the subscriber the binary
//! installs (`telemetry::init`), formatted the same way and written here instead of to stderr.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oidc_edge::telemetry::{LogConfig, LogFormat};
use tracing::Dispatch;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The lines logged so far; clones share them.
#[derive(Debug, Clone, Default)]
pub struct Log {
    lines: Arc<Mutex<Vec<String>>>,
}

impl Log {
    pub fn push(&self, line: String) {
        self.lines.lock().expect("log lock").push(line);
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("log lock").clone()
    }

    /// Counts the lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits up to 10 s for a line containing `needle` and returns it. `ended` says how the
    /// server ended, if it did: a server that can no longer log fails the wait at once.
    pub fn wait_for(&self, needle: &str, mut ended: impl FnMut() -> Option<String>) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            if let Some(how) = ended() {
                panic!(
                    "oidc-edge {how} before logging {needle:?}:\n{}",
                    self.lines().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "no log line {needle:?} in:\n{}",
                self.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The subscriber `telemetry::init` installs for `config`, writing here: the same filter
    /// (`RUST_LOG` aside, which the binary harness removes too) and the same format, without
    /// colours as on a stderr that is not a terminal.
    pub fn dispatch(&self, config: &LogConfig) -> Dispatch {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(&config.level))
            .with_writer(self.clone());
        match config.format {
            LogFormat::Text => Dispatch::new(builder.with_ansi(false).finish()),
            LogFormat::Json => Dispatch::new(builder.json().flatten_event(true).finish()),
        }
    }
}

impl<'a> MakeWriter<'a> for Log {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            log: self.clone(),
            bytes: Vec::new(),
        }
    }
}

/// One event's output (the formatter writes each event whole, then drops the writer), split
/// into lines as the binary harness reads stderr.
#[derive(Debug)]
pub struct LineWriter {
    log: Log,
    bytes: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.bytes.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.bytes);
        for line in text.lines() {
            self.log.push(line.to_owned());
        }
    }
}
