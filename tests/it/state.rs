//! The persisted state across restarts and what readiness makes of it: confirmations (M3),
//! reused kids (L8).

use std::time::{Duration, SystemTime};

use oidc_edge::jwks::persist::StateFile;

use crate::support::clients::get;
use crate::support::config::TestConfig;
use crate::support::inprocess::InProcess;
use crate::support::{K3S, ROTATED, Scratch, eventually, kids};

const ISSUER: &str = "https://oidc.example.com";

/// A file source read every `interval`, with `[admin] max_staleness`.
fn config_with_staleness(
    scratch: &Scratch,
    interval: &str,
    max_staleness: &str,
) -> std::path::PathBuf {
    TestConfig::file_source(interval)
        .set("admin.max_staleness", max_staleness)
        .write(scratch)
}

/// The `/status` document of the admin listener at `admin`.
async fn status(admin: std::net::SocketAddr) -> serde_json::Value {
    let (code, body) = get(&format!("http://{admin}/status")).await;
    assert_eq!(code, 200);
    serde_json::from_str(&body).expect("status JSON")
}

#[tokio::test]
async fn a_healthy_file_source_keeps_the_issuer_ready_past_max_staleness() {
    // M3: an unchanged file is the source confirming the published set.
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let server = InProcess::start(&config_with_staleness(&scratch, "50ms", "2s")).await;
    let readyz = server.admin_url("/readyz");
    eventually("ready", || async { get(&readyz).await.0 == 200 }).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(get(&readyz).await, (200, "ready\n".to_owned()));
    let confirmed = status(server.admin).await["issuers"][0]["confirmed_at"]
        .as_u64()
        .expect("confirmed_at");
    let now = oidc_edge::jwks::unix_now();
    assert!(now - confirmed <= 1, "confirmed {} s ago", now - confirmed);
}

#[tokio::test]
async fn a_restart_reports_the_persisted_confirmation_not_the_file_mtime() {
    // M3: the state file carries its confirmation time; its mtime is the last write, and a
    // restored backup may have any mtime at all.
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let config = config_with_staleness(&scratch, "50ms", "1h");
    let server = InProcess::start(&config).await;
    let file = StateFile::new(&scratch.path("state"), ISSUER);
    eventually("the state file", || async { file.path().exists() }).await;
    drop(server);
    let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(file.path())
        .expect("open state")
        .set_modified(two_days_ago)
        .expect("set mtime");
    scratch.replace("jwks.json", "garbage");

    let restarted = InProcess::start(&config).await;
    restarted.wait_for_log("serving the persisted key set");
    assert_eq!(
        get(&restarted.admin_url("/readyz")).await,
        (200, "ready\n".to_owned())
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(file.path()).expect("read state")).expect("json");
    let persisted = doc["confirmed_at"]
        .as_u64()
        .expect("confirmed_at in the state file");
    let now = oidc_edge::jwks::unix_now();
    assert!(now - persisted < 60, "persisted {} s ago", now - persisted);
    assert_eq!(
        status(restarted.admin).await["issuers"][0]["confirmed_at"].as_u64(),
        Some(persisted)
    );
}

#[tokio::test]
async fn a_state_file_of_format_1_loads_as_never_confirmed() {
    // M3: a file written before confirmations were persisted says nothing about them: the
    // issuer serves its keys but is not confirmed, whatever the mtime.
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let config = config_with_staleness(&scratch, "50ms", "1h");
    let server = InProcess::start(&config).await;
    let file = StateFile::new(&scratch.path("state"), ISSUER);
    eventually("the state file", || async { file.path().exists() }).await;
    drop(server);
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(file.path()).expect("read")).expect("json");
    let map = doc.as_object_mut().expect("object");
    map.remove("confirmed_at");
    map.insert("format".into(), 1.into());
    for entry in map["keys"].as_array_mut().expect("keys") {
        entry.as_object_mut().expect("entry").remove("sources");
    }
    std::fs::write(file.path(), serde_json::to_vec(&doc).expect("json")).expect("write");
    scratch.replace("jwks.json", "garbage");

    let restarted = InProcess::start(&config).await;
    restarted.wait_for_log("serving the persisted key set");
    let (code, body) = get(&restarted.url("/openid/v1/jwks")).await;
    assert_eq!((code, kids(&body).len()), (200, 2));
    assert_eq!(
        get(&restarted.admin_url("/readyz")).await,
        (
            503,
            format!("not ready: {ISSUER}: key set never confirmed by a source\n")
        )
    );
    assert!(status(restarted.admin).await["issuers"][0]["confirmed_at"].is_null());
}

#[tokio::test]
async fn a_kid_that_comes_back_with_other_key_material_is_a_loud_error() {
    // L8: the new material is published (relying parties look keys up by kid, A-11, and a set
    // must not name two keys with one kid, D-9), and the operator hears about it.
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let server = InProcess::start(&TestConfig::file_source("50ms").write(&scratch)).await;
    let url = server.url("/openid/v1/jwks");
    eventually("first keys", || async { get(&url).await.0 == 200 }).await;
    // The RSA key of the rotated set under the kid of the first set's RSA key.
    let k3s: serde_json::Value = serde_json::from_str(K3S).expect("json");
    let rotated: serde_json::Value = serde_json::from_str(ROTATED).expect("json");
    let old_rsa = k3s["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["kty"] == "RSA")
        .expect("rsa")
        .clone();
    let mut new_rsa = rotated["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["kty"] == "RSA" && k["n"] != old_rsa["n"])
        .expect("other rsa")
        .clone();
    new_rsa["kid"] = old_rsa["kid"].clone();
    let kid = old_rsa["kid"].as_str().expect("kid").to_owned();
    scratch.replace(
        "jwks.json",
        &serde_json::json!({ "keys": [new_rsa] }).to_string(),
    );
    let line = server.wait_for_log("now names different key material");
    assert!(line.contains("ERROR") && line.contains(&kid), "{line}");
    eventually("the new material", || async {
        let (_, body) = get(&url).await;
        let set: serde_json::Value = serde_json::from_str(&body).expect("json");
        set["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .any(|k| k["kid"] == kid.as_str() && k["n"] == new_rsa["n"])
    })
    .await;
    assert_eq!(
        server.count_log("now names different key material"),
        1,
        "logged once"
    );
}

/// Issue 20's per-key lifecycle in `/status`: after an upstream rotation, the key that left
/// shows when it vanished and until when it stays published (`key_retention` later), the new
/// one when it was first seen; a restart keeps every time (they are in the state file).
#[tokio::test]
async fn each_key_shows_its_lifecycle_and_a_restart_keeps_it() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let config = TestConfig::file_source("50ms")
        .set("issuers.0.key_retention", "2h")
        .write(&scratch);
    let server = InProcess::start(&config).await;
    let started = oidc_edge::jwks::unix_now();
    eventually("the first set", || async {
        status(server.admin).await["issuers"][0]["keys"]
            .as_array()
            .is_some_and(|k| !k.is_empty())
    })
    .await;
    scratch.replace("jwks.json", ROTATED);
    let gone: Vec<String> = kids(K3S)
        .into_iter()
        .filter(|k| !kids(ROTATED).contains(k))
        .collect();
    let new: Vec<String> = kids(ROTATED)
        .into_iter()
        .filter(|k| !kids(K3S).contains(k))
        .collect();
    assert!(!gone.is_empty() && !new.is_empty(), "the fixtures rotate");
    let lifecycle = |doc: &serde_json::Value, kid: &str| {
        doc["issuers"][0]["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .find(|k| k["kid"] == kid)
            .cloned()
            .unwrap_or_else(|| panic!("no {kid} in {doc:#}"))
    };
    let admin = server.admin;
    let gone_kid = gone[0].clone();
    eventually("the old key vanished", || {
        let gone_kid = gone_kid.clone();
        async move { lifecycle(&status(admin).await, &gone_kid)["vanished_at"].is_u64() }
    })
    .await;
    let before = status(server.admin).await;
    let old = lifecycle(&before, &gone[0]);
    let vanished = old["vanished_at"].as_u64().expect("vanished_at");
    assert_eq!(old["retiring_until"].as_u64(), Some(vanished + 7200));
    assert_eq!(old["last_seen_at"], serde_json::Value::Null);
    let first_old = old["first_seen_at"].as_u64().expect("first_seen_at");
    assert!(first_old >= started - 1 && first_old <= vanished);
    let fresh = lifecycle(&before, &new[0]);
    assert_eq!(fresh["first_seen_at"].as_u64(), Some(vanished));
    assert_eq!(fresh["vanished_at"], serde_json::Value::Null);
    assert!(
        fresh["last_seen_at"]
            .as_u64()
            .is_some_and(|t| t >= vanished)
    );
    // The same times as metrics, one series per published kid.
    let scrape = crate::support::metrics::scrape(server.admin).await;
    let metric = |name: &str, kid: &str| {
        crate::support::metrics::metric(&scrape, name, &[("issuer", ISSUER), ("kid", kid)])
    };
    assert_eq!(
        metric("oidc_edge_key_retiring_until_seconds", &gone[0]),
        (vanished + 7200) as f64
    );
    assert_eq!(
        metric("oidc_edge_key_first_seen_seconds", &new[0]),
        vanished as f64
    );
    assert_eq!(
        metric("oidc_edge_key_first_seen_seconds", &gone[0]),
        first_old as f64
    );
    drop(server);

    let restarted = InProcess::start(&config).await;
    let after = status(restarted.admin).await;
    for kid in [&gone[0], &new[0]] {
        let (was, is) = (lifecycle(&before, kid), lifecycle(&after, kid));
        for field in ["first_seen_at", "vanished_at", "retiring_until"] {
            assert_eq!(was[field], is[field], "{kid}: {field}");
        }
    }

    // `rotation status` reads them and times the next step: the new key signs an hour
    // after it was published (max-age is only 5 min); the old one's tokens may be in use for
    // the token lifetime + max-age + 5 min after it left, inside key_retention here.
    let time = |secs: u64| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs))
            .to_string()
    };
    // A fetch that says it is AWS STS (records live in memory, so after the restart): each
    // key then says AWS saw it, the question `rotation status` answers for issue 20.
    let aws = crate::support::clients::builder()
        .user_agent("AWS Security Token Service")
        .build()
        .expect("client");
    let answer = aws
        .get(restarted.url("/openid/v1/jwks"))
        .send()
        .await
        .expect("GET");
    assert_eq!(answer.status(), 200);
    let out = crate::support::process::run(&[
        "rotation",
        "status",
        "--admin",
        &format!("http://{}", restarted.admin),
        "--token-lifetime",
        "1h",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(
        lines[0],
        format!("issuer {ISSUER} (max-age 300s, key_retention 2h, token lifetime 1h)")
    );
    assert!(
        lines.contains(
            &format!(
                "  {}  publishing  published since {}; safe to sign with from {}",
                new[0],
                time(vanished),
                time(vanished + 3600)
            )
            .as_str()
        ),
        "{report}"
    );
    assert!(
        lines.contains(
            &format!(
                "  {}  retiring    no source lists it since {}; tokens it signed may be in use until {}; published until {}",
                gone[0],
                time(vanished),
                time(vanished + 3600 + 300 + 300),
                time(vanished + 7200)
            )
            .as_str()
        ),
        "{report}"
    );
    for kid in [&new[0], &gone[0]] {
        let at = lines
            .iter()
            .position(|l| l.starts_with(&format!("  {kid}  ")))
            .expect("the key's line");
        // Fetched within the last seconds: "0s" or "1s" ago.
        assert!(
            lines[at + 1].starts_with("      aws last fetched the JWKS ")
                && lines[at + 1].ends_with("s ago and saw this key"),
            "{report}"
        );
    }
    assert!(!report.contains("no relying party's fetch"), "{report}");
}
