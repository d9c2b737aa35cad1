//! systemd integration, checked with systemd's own tools: the unit files pass
//! `systemd-analyze verify` silently and reach their exposure targets, `sd_notify` messages
//! arrive on a test-owned `NOTIFY_SOCKET`, and `systemd-socket-activate` passes a listening
//! socket the server serves on.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::clients::get;
use crate::support::config::TestConfig;
use crate::support::pebble::free_tcp_port;
use crate::support::process::Binary;
use crate::support::{K3S, Scratch, bin, fixture_kids, kids, repo_path};

/// Copies the units to `dir` with `ExecStart=` pointing at the built binary (verify fails on a
/// missing executable).
fn units_in(dir: &Path) -> Vec<PathBuf> {
    [
        "oidc-edge.service",
        "oidc-edge.socket",
        "oidc-edge-activated.service",
    ]
    .iter()
    .map(|name| {
        let text = std::fs::read_to_string(repo_path(&format!("systemd/{name}"))).expect("unit");
        assert!(
            name.ends_with(".socket") || text.contains("ExecStart=/usr/local/bin/oidc-edge serve")
        );
        let path = dir.join(name);
        std::fs::write(&path, text.replace("/usr/local/bin/oidc-edge", bin())).expect("write");
        path
    })
    .collect()
}

#[test]
fn units_pass_systemd_analyze_verify_without_a_word() {
    let scratch = Scratch::new();
    let units = units_in(scratch.dir.path());
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .expect("systemd-analyze (package systemd)");
    // A misspelt key only warns and still exits 0: demand silence too.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.is_empty(), "{said}");
}

/// The overall exposure systemd-analyze computes, checked against `threshold` (tenths).
fn exposure(unit: &Path, threshold: u32) -> String {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--threshold={threshold}"))
        .arg(unit)
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_default()
        .to_owned();
    assert!(out.status.success(), "over {threshold}: {overall}\n{text}");
    overall
}

#[test]
fn units_reach_their_exposure_targets() {
    let scratch = Scratch::new();
    let units = units_in(scratch.dir.path());
    let bound = exposure(&units[0], 14);
    let activated = exposure(&units[2], 11);
    println!("systemd-analyze security: {bound} / {activated}");
}

#[test]
fn sd_notify_ready_watchdog_and_stopping() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let socket_path = scratch.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut server = Binary::start_with_env(
        &TestConfig::file_source("1s").write(&scratch),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().expect("utf-8")),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let count =
        |messages: &[String], needle: &str| messages.iter().filter(|m| m.contains(needle)).count();
    let mut messages: Vec<String> = Vec::new();
    while count(&messages, "READY=1") == 0 {
        messages.push(recv());
    }
    let ready = messages
        .iter()
        .find(|m| m.contains("READY=1"))
        .expect("ready");
    assert!(ready.contains("STATUS=serving 1 issuer(s)"), "{messages:?}");
    // Listeners are bound before READY=1.
    assert_eq!(
        crate::support::block_on(get(&server.url("/openid/v1/jwks"))).0,
        200
    );
    let pings_before = count(&messages, "WATCHDOG=1");
    let started = Instant::now();
    while count(&messages, "WATCHDOG=1") < pings_before + 3 {
        messages.push(recv());
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "pings every 100 ms"
    );
    server.signal("TERM");
    while count(&messages, "STOPPING=1") == 0 {
        messages.push(recv());
    }
    assert_eq!(server.wait_exit(Duration::from_secs(15)), Some(0));
}

#[test]
fn a_socket_passed_by_systemd_is_served_and_nothing_is_bound() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    // 192.0.2.1 (TEST-NET-1) is not on this machine: binding it would fail, so a served
    // request proves the passed socket is used.
    let config = TestConfig::new()
        .source(crate::support::config::Source::file("jwks.json"))
        .set("http.listen", "192.0.2.1:8080")
        .write(&scratch);
    let port = free_tcp_port();
    let mut child = Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{port}"), "--fdname=http"])
        .arg(bin())
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (package systemd)");
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        // The first connection makes systemd-socket-activate exec oidc-edge with the socket.
        match crate::support::block_on(async {
            crate::support::clients::client()
                .get(url("/openid/v1/jwks"))
                .send()
                .await?
                .text()
                .await
        }) {
            Ok(body) if body.starts_with("{\"keys\"") => break body,
            _ => {}
        }
        assert!(Instant::now() < deadline, "no answer on the passed socket");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(kids(&body), fixture_kids(K3S));
    let (status, _) = crate::support::block_on(get(&url("/.well-known/openid-configuration")));
    assert_eq!(status, 200);
    let _ = child.kill();
    let _ = child.wait();
}
