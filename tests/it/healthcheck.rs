//! `oidc-edge healthcheck`, the container image's HEALTHCHECK: the real binary against a real
//! server's admin listener. Exit 0 and one line on stdout when `/readyz` answers 2xx; exit 1
//! and one line on stderr naming the URL otherwise (a 503 with its reason, nothing listening,
//! no answer in time, a remote host, a config whose admin port is not known, a private CA).

use std::net::{SocketAddr, TcpListener};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::support::config::TestConfig;
use crate::support::inprocess::InProcess;
use crate::support::pki::Pki;
use crate::support::process::run;
use crate::support::{K3S, Scratch};

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).expect("utf-8 stderr")
}

/// `healthcheck ARGS`: its exit code, stdout and stderr.
fn healthcheck(args: &[&str]) -> (Option<i32>, String, String) {
    let out = run(&[&["healthcheck"], args].concat());
    (out.status.code(), stdout(&out), stderr(&out))
}

/// A second config file for the healthcheck, the server's own but for `admin.listen`: the
/// server binds port 0, and the healthcheck reads the port it got from here.
fn config_with_admin(scratch: &Scratch, config: TestConfig, listen: &str) -> String {
    let text = config
        .set("admin.listen", listen)
        .set("admin.allow_remote", true)
        .text();
    let path = scratch.write("healthcheck.toml", &text);
    path.to_str().expect("utf-8").to_owned()
}

/// An address nothing listens on: bound for a moment, then released.
fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

#[tokio::test]
async fn a_ready_server_is_healthy_through_its_config_or_a_url() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let config = TestConfig::file_source("1s");
    let server = InProcess::start(&config.write(&scratch)).await;
    let admin = server.admin;

    let file = config_with_admin(&scratch, config.clone(), &admin.to_string());
    assert_eq!(
        healthcheck(&["--config", &file]),
        (
            Some(0),
            format!("GET http://{admin}/readyz (admin.listen of {file}): 200 OK: ready\n"),
            String::new()
        )
    );
    // A wildcard admin address (the image's 0.0.0.0:9090) is asked on loopback.
    let wildcard = format!("0.0.0.0:{}", admin.port());
    let file = config_with_admin(&scratch, config, &wildcard);
    assert_eq!(
        healthcheck(&["--config", &file]),
        (
            Some(0),
            format!("GET http://{admin}/readyz (admin.listen of {file}): 200 OK: ready\n"),
            String::new()
        )
    );
    // A URL on a name is resolved once and connected to only if every address is loopback.
    let url = format!("http://localhost:{}/readyz", admin.port());
    assert_eq!(
        healthcheck(&[&url]),
        (
            Some(0),
            format!("GET {url}: 200 OK: ready\n"),
            String::new()
        )
    );
}

#[tokio::test]
async fn a_server_that_is_not_ready_is_unhealthy_with_the_status_and_reason() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", "not json");
    let server = InProcess::start(&TestConfig::file_source("1s").write(&scratch)).await;
    let url = server.admin_url("/readyz");
    assert_eq!(
        healthcheck(&[&url]),
        (
            Some(1),
            String::new(),
            format!(
                "oidc-edge: GET {url}: 503 Service Unavailable: not ready: \
                 https://oidc.example.com: no key set published yet\n"
            )
        )
    );
    // Any status but 2xx fails, with no body to quote here.
    let missing = server.admin_url("/nope");
    assert_eq!(
        healthcheck(&[&missing]),
        (
            Some(1),
            String::new(),
            format!("oidc-edge: GET {missing}: 404 Not Found\n")
        )
    );
}

#[test]
fn nothing_listening_is_unhealthy_naming_the_url_and_the_config_key() {
    let scratch = Scratch::new();
    let addr = closed_port();
    let file = config_with_admin(&scratch, TestConfig::file_source("1s"), &addr.to_string());
    assert_eq!(
        healthcheck(&["--config", &file]),
        (
            Some(1),
            String::new(),
            format!(
                "oidc-edge: GET http://{addr}/readyz (admin.listen of {file}): cannot connect: \
                 Connection refused (os error 111)\n"
            )
        )
    );
}

/// A listener that accepts connections (the kernel's backlog does) but never answers: the
/// check gives up at `--timeout`, not at the container engine's own timeout.
#[test]
fn no_answer_within_the_timeout_is_unhealthy() {
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/readyz", silent.local_addr().expect("addr"));
    let started = Instant::now();
    assert_eq!(
        healthcheck(&["--timeout", "300ms", &url]),
        (
            Some(1),
            String::new(),
            format!("oidc-edge: GET {url}: no answer within 300ms\n")
        )
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
    drop(silent);
}

/// An https URL is verified against the roots compiled into the binary, as in the image,
/// which has no CA bundle: a private CA is not among them.
#[tokio::test]
async fn https_trusts_only_the_compiled_in_public_roots() {
    let scratch = Scratch::new();
    let pki = Pki::new("test private CA");
    let config = TestConfig::https_files(&scratch, &pki.server_for(&["localhost"]));
    let server = InProcess::start(&config.write(&scratch)).await;
    let url = format!("https://localhost:{}/openid/v1/jwks", server.https().port());
    assert_eq!(
        healthcheck(&[&url]),
        (
            Some(1),
            String::new(),
            format!(
                "oidc-edge: GET {url}: cannot connect: invalid peer certificate: UnknownIssuer\n"
            )
        )
    );
}

#[test]
fn a_remote_url_is_refused_without_allow_remote() {
    assert_eq!(
        healthcheck(&["http://192.0.2.1:9090/readyz"]),
        (
            Some(1),
            String::new(),
            "oidc-edge: http://192.0.2.1:9090/readyz: 192.0.2.1 is not a loopback address; the \
             healthcheck asks only this host unless --allow-remote is given\n"
                .to_owned()
        )
    );
}

/// `serve` replaces port 0 with a free port that only its log names: there is nothing the
/// healthcheck could ask, and it says which file and key to look at.
#[test]
fn a_config_whose_admin_port_is_not_known_is_unhealthy_naming_file_and_key() {
    let scratch = Scratch::new();
    let file = TestConfig::file_source("1s").write(&scratch);
    let file = file.to_str().expect("utf-8");
    assert_eq!(
        healthcheck(&["--config", file]),
        (
            Some(1),
            String::new(),
            format!(
                "oidc-edge: {file}: admin.listen: 127.0.0.1:0 has port 0, which serve replaces \
                 with a free port that only its log names; give the healthcheck that URL\n"
            )
        )
    );
    let missing = scratch.path("absent.toml");
    let missing = missing.to_str().expect("utf-8");
    assert_eq!(
        healthcheck(&["--config", missing]),
        (
            Some(1),
            String::new(),
            format!(
                "oidc-edge: {missing}: cannot read the configuration file: No such file or \
                 directory (os error 2)\n"
            )
        )
    );
}

/// A zero timeout could never pass; a timeout that is not a duration is a usage error (64).
#[test]
fn the_timeout_is_a_duration_above_zero() {
    assert_eq!(
        healthcheck(&["--timeout", "0s", "http://127.0.0.1:9090/readyz"]),
        (
            Some(1),
            String::new(),
            "oidc-edge: --timeout: a check that must answer in no time always fails; give more \
             than zero\n"
                .to_owned()
        )
    );
    let (code, out, err) = healthcheck(&["--timeout", "soon"]);
    assert_eq!((code, out.as_str()), (Some(64), ""));
    assert!(
        err.starts_with("error: invalid value 'soon' for '--timeout <DURATION>': "),
        "{err}"
    );
}
