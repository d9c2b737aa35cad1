//! The real `oidc-edge` binary, for what only a process shows: the command line and exit
//! codes, signals, sd_notify, SIGKILL, resource limits, memory and its environment. Its
//! stderr is captured line by line; it is killed by its PID when its handle drops.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::bin;
use super::log::Log;

/// Runs `oidc-edge ARGS` to completion.
pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("OIDC_EDGE_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run oidc-edge")
}

/// A running `oidc-edge serve`, killed on drop.
pub struct Binary {
    child: Child,
    /// The plain HTTP listener, as logged.
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    log: Log,
}

impl Binary {
    pub fn start(config: &Path) -> Self {
        Self::start_with_env(config, &[])
    }

    /// Starts with extra environment variables (the pod environment of `in-cluster`).
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(bin());
        command.args(["serve", "--config"]).arg(config);
        Self::spawn(command, config, env)
    }

    /// Starts `oidc-edge publish --config CONFIG`, which binds only its admin listener (`addr`
    /// is left unbound).
    pub fn start_publisher(config: &Path) -> Self {
        Self::start_outbound("publish", config)
    }

    /// Starts `oidc-edge SUBCOMMAND --config CONFIG` for a command that binds only its admin
    /// listener (`publish`, `push`).
    pub fn start_outbound(subcommand: &str, config: &Path) -> Self {
        let mut command = Command::new(bin());
        command.args([subcommand, "--config"]).arg(config);
        Self::spawn_listening(command, config, &[], false)
    }

    /// Starts `command`, an `oidc-edge` command that binds only its admin listener (`push`,
    /// `publish`), with `env`.
    pub fn spawn_outbound(command: Command, config: &Path, env: &[(&str, &str)]) -> Self {
        Self::spawn_listening(command, config, env, false)
    }

    /// Starts `command`, which must exec `oidc-edge serve --config CONFIG` (e.g. through
    /// `sh -c`).
    pub fn spawn(command: Command, config: &Path, env: &[(&str, &str)]) -> Self {
        Self::spawn_listening(command, config, env, true)
    }

    /// Starts `command`; waits for the plain HTTP listener when `http`, and for the admin one.
    fn spawn_listening(
        mut command: Command,
        config: &Path,
        env: &[(&str, &str)],
        http: bool,
    ) -> Self {
        assert_admin_on_port_0(config);
        let mut child = command
            .env_remove("RUST_LOG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn oidc-edge");
        let stderr = child.stderr.take().expect("stderr");
        let log = Log::default();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.push(line);
            }
        });
        let unbound = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut server = Self {
            child,
            addr: unbound,
            admin: unbound,
            log,
        };
        if http {
            server.addr = server.listening("http");
        }
        server.admin = server.listening("admin");
        server
    }

    /// The address a listener logged (`http`, `https`, `admin`): a process has no other way
    /// to tell which port 0 became.
    pub fn listening(&mut self, listener: &str) -> SocketAddr {
        let line = self.wait_for_log(&format!("listening listener=\"{listener}\""));
        let addr = line.split("addr=").nth(1).expect("addr=").trim();
        addr.parse().expect("socket address")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. "TERM", "HUP") to the server by its PID.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits up to `limit` for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "still running after {limit:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lines()
    }

    /// Waits up to 10 s for a log line containing `needle` and returns it.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        let child = &mut self.child;
        self.log.wait_for(needle, || {
            let status = child.try_wait().ok().flatten()?;
            Some(format!("exited with {status}"))
        })
    }

    /// Counts log lines containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log.count(needle)
    }

    /// SIGKILL by PID, as a crash or the OOM killer would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Without `[admin] listen`, oidc-edge binds 127.0.0.1:9090, which every test would share.
/// The harness does not add it behind the test's back: the config builder writes it, and a
/// hand-written config states it.
fn assert_admin_on_port_0(config: &Path) {
    let text = std::fs::read_to_string(config).expect("config");
    let table: toml::Table = text.parse().expect("config is TOML");
    let listen = table
        .get("admin")
        .and_then(|admin| admin.get("listen"))
        .and_then(toml::Value::as_str);
    assert_eq!(
        listen,
        Some("127.0.0.1:0"),
        "{}: state [admin] listen = \"127.0.0.1:0\"",
        config.display()
    );
}
