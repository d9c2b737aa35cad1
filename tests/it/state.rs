//! The persisted state across restarts and what readiness makes of it: confirmations (M3).

use std::time::{Duration, SystemTime};

use oidc_edge::jwks::persist::StateFile;

use crate::support::{K3S, Scratch, Server, eventually, get, kids};

const ISSUER: &str = "https://oidc.example.com";

/// `scratch.config(interval)` with `[admin] max_staleness`.
fn config_with_staleness(
    scratch: &Scratch,
    interval: &str,
    max_staleness: &str,
) -> std::path::PathBuf {
    let config = scratch.config(interval);
    let text = std::fs::read_to_string(&config).expect("read");
    scratch.write(
        "config.toml",
        &format!("{text}[admin]\nlisten = \"127.0.0.1:0\"\nmax_staleness = \"{max_staleness}\"\n"),
    )
}

async fn status(server: &Server) -> serde_json::Value {
    let (code, body) = get(&server.admin_url("/status")).await;
    assert_eq!(code, 200);
    serde_json::from_str(&body).expect("status JSON")
}

#[tokio::test]
async fn a_healthy_file_source_keeps_the_issuer_ready_past_max_staleness() {
    // M3: an unchanged file is the source confirming the published set.
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let server = Server::start(&config_with_staleness(&scratch, "50ms", "2s"));
    let readyz = server.admin_url("/readyz");
    eventually("ready", || async { get(&readyz).await.0 == 200 }).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(get(&readyz).await, (200, "ready\n".to_owned()));
    let confirmed = status(&server).await["issuers"][0]["confirmed_at"]
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
    let server = Server::start(&config);
    let file = StateFile::new(&scratch.path("state"), ISSUER);
    eventually("the state file", || async { file.path().exists() }).await;
    server.kill();
    let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(file.path())
        .expect("open state")
        .set_modified(two_days_ago)
        .expect("set mtime");
    scratch.replace("jwks.json", "garbage");

    let mut restarted = Server::start(&config);
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
        status(&restarted).await["issuers"][0]["confirmed_at"].as_u64(),
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
    let server = Server::start(&config);
    let file = StateFile::new(&scratch.path("state"), ISSUER);
    eventually("the state file", || async { file.path().exists() }).await;
    server.kill();
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

    let mut restarted = Server::start(&config);
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
    assert!(status(&restarted).await["issuers"][0]["confirmed_at"].is_null());
}
