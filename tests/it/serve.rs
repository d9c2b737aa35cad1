//! Serving from file sources: the demo, file refresh, refused key sets, rotation grace, and
//! persistence across SIGKILL. What needs the process (SIGKILL, resource limits) runs the
//! binary; the rest, log lines included, runs in process.

use std::time::Duration;

use oidc_edge::jwks::persist::StateFile;

use crate::support::clients::{assert_not_published_yet, builder, client, get};
use crate::support::config::TestConfig;
use crate::support::inprocess::InProcess;
use crate::support::process::Binary;
use crate::support::{
    K3S, OCT, PRIVATE_RSA, ROTATED, RSA_1024, Scratch, eventually, fixture_kids, kids, repo_path,
};

const ISSUER: &str = "https://oidc.example.com";

fn union(a: &str, b: &str) -> Vec<String> {
    let mut all = fixture_kids(a);
    all.extend(fixture_kids(b));
    all.sort();
    all.dedup();
    all
}

#[tokio::test]
async fn the_demo_config_serves_both_documents_as_relying_parties_expect() {
    // The demo itself, with only its port and state directory moved into a scratch dir, and
    // its admin listener (the default 127.0.0.1:9090) moved to port 0.
    let scratch = Scratch::new();
    let demo = std::fs::read_to_string(repo_path("config/demo.toml")).expect("demo config");
    assert!(demo.contains("listen = \"127.0.0.1:8080\""));
    assert!(!demo.contains("[admin]"));
    scratch.write(
        "demo-jwks.json",
        &std::fs::read_to_string(repo_path("config/demo-jwks.json")).expect("jwks"),
    );
    let config = scratch.write(
        "demo.toml",
        &(demo
            .replace("127.0.0.1:8080", "127.0.0.1:0")
            .replace("../target/demo-state", "state")
            + "\n[admin]\nlisten = \"127.0.0.1:0\"\n"),
    );
    let server = InProcess::start(&config).await;
    let http = client();

    for (path, expect_kids) in [
        ("/.well-known/openid-configuration", false),
        ("/openid/v1/jwks", true),
    ] {
        let response = http.get(server.url(path)).send().await.expect("GET");
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], "application/json");
        let etag = response.headers()["etag"]
            .to_str()
            .expect("ascii")
            .to_owned();
        let body = response.text().await.expect("body");
        if expect_kids {
            assert_eq!(kids(&body), fixture_kids(K3S));
        } else {
            let doc: serde_json::Value = serde_json::from_str(&body).expect("json");
            assert_eq!(doc["issuer"], ISSUER);
            assert_eq!(doc["jwks_uri"], "https://oidc.example.com/openid/v1/jwks");
            assert_eq!(
                doc["authorization_endpoint"],
                "urn:kubernetes:programmatic_authorization"
            );
            assert_eq!(
                doc["response_types_supported"],
                serde_json::json!(["id_token"])
            );
            assert_eq!(
                doc["subject_types_supported"],
                serde_json::json!(["public"])
            );
            assert_eq!(
                doc["id_token_signing_alg_values_supported"],
                serde_json::json!(["ES256", "RS256"])
            );
        }
        let cached = http
            .get(server.url(path))
            .header("if-none-match", &etag)
            .send()
            .await
            .expect("GET");
        assert_eq!(cached.status(), 304);
        let post = http
            .post(server.url(path))
            .body("x")
            .send()
            .await
            .expect("POST");
        assert_eq!(post.status(), 405);
        assert_eq!(post.headers()["allow"], "GET, HEAD");
    }
    for path in ["/.well-known/openid-configuration/", "/nope"] {
        assert_eq!(get(&server.url(path)).await.0, 404, "{path}");
    }
    // HTTP/1.1 and HTTP/2 (prior knowledge, as on a TLS connection with ALPN h2) agree.
    let h2 = builder().http2_prior_knowledge().build().expect("client");
    let response = h2
        .get(server.url("/openid/v1/jwks"))
        .send()
        .await
        .expect("h2 GET");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_private_key_in_the_file_is_never_served_and_the_log_says_why() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let server = InProcess::start(&TestConfig::file_source("50ms").write(&scratch)).await;
    let (status, good) = get(&server.url("/openid/v1/jwks")).await;
    assert_eq!(status, 200);

    scratch.replace("jwks.json", PRIVATE_RSA);
    let line = server.wait_for_log("PRIVATE KEY MATERIAL");
    assert!(
        line.contains("key set refused; still serving the last good set"),
        "{line}"
    );
    assert!(line.contains("carries the private member \"d\""), "{line}");
    let (status, served) = get(&server.url("/openid/v1/jwks")).await;
    assert_eq!(status, 200);
    assert_eq!(served, good, "the last good set, byte for byte");
    for member in ["\"d\"", "\"p\"", "\"q\"", "\"dp\"", "\"dq\"", "\"qi\""] {
        assert!(!served.contains(member));
    }
}

#[tokio::test]
async fn weak_and_symmetric_keys_are_dropped_with_a_warning() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", RSA_1024);
    let server = InProcess::start(&TestConfig::file_source("50ms").write(&scratch)).await;
    let line = server.wait_for_log("RSA modulus is 1024 bits");
    assert!(
        line.contains("WARN") && line.contains("key left out: key 0 (kid "),
        "{line}"
    );
    let (status, served) = get(&server.url("/openid/v1/jwks")).await;
    assert_eq!(status, 200);
    let strong = kids(RSA_1024)[1].clone();
    assert_eq!(kids(&served), std::slice::from_ref(&strong));

    scratch.replace("jwks.json", OCT);
    let line = server.wait_for_log("symmetric (\"oct\") keys are never published");
    assert!(line.contains("WARN"), "{line}");
    let (_, served) = get(&server.url("/openid/v1/jwks")).await;
    assert_eq!(kids(&served), [strong]);
    assert!(!served.contains("oct") && !served.contains("HS256"));
}

#[tokio::test]
async fn an_empty_or_malformed_file_keeps_the_last_good_set() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let server = InProcess::start(&TestConfig::file_source("50ms").write(&scratch)).await;
    let (_, good) = get(&server.url("/openid/v1/jwks")).await;
    for (contents, reason) in [
        ("", "not valid JSON: EOF while parsing"),
        ("{\"keys\":[]}", "no usable public key: the set is empty"),
        ("{\"keys\": [{\"kty\": \"RSA\"", "not valid JSON"),
        ("[1,2]", "not a JWK set: the top level is not a JSON object"),
    ] {
        scratch.replace("jwks.json", contents);
        server.wait_for_log(reason);
        let (status, served) = get(&server.url("/openid/v1/jwks")).await;
        assert_eq!(
            (status, served.as_str()),
            (200, good.as_str()),
            "{contents:?}"
        );
    }
    // A missing file is a fetch failure too, not an outage of what is served.
    std::fs::remove_file(scratch.path("jwks.json")).expect("remove");
    server.wait_for_log("fetch failed; still serving the last good set");
    assert_eq!(get(&server.url("/openid/v1/jwks")).await, (200, good));
}

#[tokio::test]
async fn a_rotation_publishes_the_new_key_and_keeps_the_old_one_for_the_retention() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let config = TestConfig::file_source("50ms")
        .set("issuers.0.key_retention", "2s")
        .write(&scratch);
    let server = InProcess::start(&config).await;
    let url = server.url("/openid/v1/jwks");
    scratch.replace("jwks.json", ROTATED);
    let both = union(K3S, ROTATED);
    eventually("the new key", || async { kids(&get(&url).await.1) == both }).await;
    let discovery = get(&server.url("/.well-known/openid-configuration"))
        .await
        .1;
    assert!(discovery.contains(r#""id_token_signing_alg_values_supported":["ES256","RS256"]"#));
    eventually("the old key to drop after 2 s", || async {
        kids(&get(&url).await.1) == fixture_kids(ROTATED)
    })
    .await;
}

#[tokio::test]
async fn with_no_good_set_yet_it_answers_503_and_recovers_by_itself() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", "not json");
    let server = InProcess::start(&TestConfig::file_source("50ms").write(&scratch)).await;
    server.wait_for_log("key set refused");
    assert_not_published_yet(&server.url("/openid/v1/jwks")).await;
    scratch.replace("jwks.json", K3S);
    let url = server.url("/openid/v1/jwks");
    eventually("recovery", || async { get(&url).await.0 == 200 }).await;
    assert_eq!(kids(&get(&url).await.1), fixture_kids(K3S));
}

#[tokio::test]
async fn sigkill_while_persisting_never_loses_the_last_good_set() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let config = TestConfig::file_source("5ms").write(&scratch);
    let both = union(K3S, ROTATED);
    for round in 0..6 {
        let server = Binary::start(&config);
        // Each flip changes the ledger (a key vanishes or returns), so each one is persisted.
        let flips = 20 + round * 7;
        for i in 0..flips {
            scratch.replace("jwks.json", if i % 2 == 0 { ROTATED } else { K3S });
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        server.kill();

        // The source is broken now: only the persisted state can answer.
        scratch.replace("jwks.json", "garbage");
        let mut restarted = Binary::start(&config);
        let (status, body) = get(&restarted.url("/openid/v1/jwks")).await;
        assert_eq!(
            status, 200,
            "round {round}: served at once after the restart"
        );
        let served = kids(&body);
        assert!(
            !served.is_empty() && served.iter().all(|k| both.contains(k)),
            "round {round}: {served:?}"
        );
        restarted.wait_for_log("serving the persisted key set");
        assert_eq!(restarted.count_log("corrupt"), 0, "{:?}", restarted.log());
        restarted.kill();
        scratch.replace("jwks.json", K3S);
    }
}

#[tokio::test]
async fn a_corrupt_state_file_is_reported_and_ignored() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", "garbage");
    let state = scratch.path("state");
    std::fs::create_dir(&state).expect("mkdir");
    let file = StateFile::new(&state, ISSUER);
    let private_state = format!(
        r#"{{"format":1,"issuer":"{ISSUER}","keys":[{{"vanished_at":null,"jwk":{}}}]}}"#,
        serde_json::to_string(
            &serde_json::from_str::<serde_json::Value>(PRIVATE_RSA).expect("json")["keys"][1]
        )
        .expect("json")
    );
    for (contents, reason) in [
        ("{\"format\":1,", "EOF while parsing"),
        (private_state.as_str(), "PRIVATE KEY MATERIAL"),
    ] {
        std::fs::write(file.path(), contents).expect("write state");
        let server = InProcess::start(&TestConfig::file_source("50ms").write(&scratch)).await;
        let line = server.wait_for_log("is corrupt and is ignored");
        assert!(line.contains("ERROR") && line.contains(reason), "{line}");
        assert_eq!(get(&server.url("/openid/v1/jwks")).await.0, 503);
        drop(server);
    }
}

#[tokio::test]
async fn access_logs_are_off_by_default_and_one_line_per_request_when_on() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let config = TestConfig::file_source("1s");
    let quiet = InProcess::start(&config.write(&scratch)).await;
    assert_eq!(get(&quiet.url("/openid/v1/jwks")).await.0, 200);
    quiet.wait_for_log("published key set");
    assert_eq!(quiet.count_log("oidc_edge::access"), 0);
    drop(quiet);

    let server = InProcess::start(&config.set("log.access", true).write(&scratch)).await;
    assert_eq!(get(&server.url("/openid/v1/jwks")).await.0, 200);
    assert_eq!(get(&server.url("/nope")).await.0, 404);
    let line = server.wait_for_log("path=\"/nope\"");
    assert!(
        line.contains("oidc_edge::access")
            && line.contains("method=GET")
            && line.contains("status=404"),
        "{line}"
    );
    let line = server.wait_for_log("path=\"/openid/v1/jwks\"");
    assert!(line.contains("status=200"), "{line}");
    // The User-Agent too: how an operator learns what a relying party sends, to name it in
    // [relying_parties.user_agents].
    let agent = crate::support::clients::builder()
        .user_agent("AWS Security Token Service")
        .build()
        .expect("client");
    let url = server.url("/.well-known/openid-configuration");
    assert_eq!(agent.get(&url).send().await.expect("GET").status(), 200);
    let line = server.wait_for_log("path=\"/.well-known/openid-configuration\"");
    assert!(
        line.contains("status=200 user_agent=\"AWS Security Token Service\""),
        "{line}"
    );
}

/// systemd and most shells start services at a soft 1024 open files; the server raises its
/// soft limit to the hard one at start, so that `max_connections` can be reached.
#[tokio::test]
async fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let config = TestConfig::file_source("1h").write(&scratch);
    let mut command = std::process::Command::new("sh");
    command
        .args(["-c", "ulimit -Sn 256 && exec \"$0\" serve --config \"$1\""])
        .arg(crate::support::bin())
        .arg(&config);
    let server = Binary::spawn(command, &config, &[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).expect("limits");
    let open_files: Vec<u64> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files")
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(open_files.len(), 2, "{limits}");
    assert!(
        open_files[1] > 256,
        "hard limit {} leaves nothing to raise",
        open_files[1]
    );
    assert_eq!(
        open_files[0], open_files[1],
        "soft limit not raised: {limits}"
    );
}

/// L13: a JWKS file that is absent at a restart (a volume not mounted yet) is not a config
/// error. The persisted set is served at once, the source's fetches fail with a warning naming
/// the file, and the keys follow the file once it appears.
#[tokio::test]
async fn a_file_source_missing_at_restart_serves_the_persisted_set_until_it_appears() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let config = TestConfig::file_source("50ms").write(&scratch);
    let server = InProcess::start(&config).await;
    let state = StateFile::new(&scratch.path("state"), ISSUER);
    eventually("the key set to be persisted", || async {
        state.path().exists()
    })
    .await;
    drop(server);

    std::fs::remove_file(scratch.path("jwks.json")).expect("remove");
    let restarted = InProcess::start(&config).await;
    let url = restarted.url("/openid/v1/jwks");
    let (status, body) = get(&url).await;
    assert_eq!(status, 200, "served at once after the restart");
    assert_eq!(kids(&body), fixture_kids(K3S));
    let line = restarted.wait_for_log("fetch failed; still serving the last good set");
    assert!(
        line.contains(&format!(
            "{}: No such file or directory",
            scratch.path("jwks.json").display()
        )),
        "{line}"
    );
    scratch.replace("jwks.json", ROTATED);
    let both = union(K3S, ROTATED);
    eventually("the keys of the file that appeared", || async {
        kids(&get(&url).await.1) == both
    })
    .await;
}

#[tokio::test]
async fn non_minimal_rsa_integers_are_published_verbatim_and_warned_about_once_per_key() {
    // S4, D-11: Base64urlUInt must use the fewest octets, but re-encoding would change the
    // bytes relative to upstream (X-1), so the key is published as written and the operator
    // is told once, naming the kid and the members.
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut set: serde_json::Value = serde_json::from_str(K3S).expect("fixture");
    let rsa = &mut set["keys"][0];
    assert_eq!(rsa["kty"], "RSA");
    let kid = rsa["kid"].as_str().expect("kid").to_owned();
    let n = URL_SAFE_NO_PAD
        .decode(rsa["n"].as_str().expect("n"))
        .expect("base64url");
    let padded = URL_SAFE_NO_PAD.encode([&[0u8][..], &n].concat());
    rsa["n"] = serde_json::json!(padded);
    rsa["e"] = serde_json::json!("AAABAAE");
    let scratch = Scratch::new();
    scratch.write("jwks.json", &set.to_string());
    let server = InProcess::start(&TestConfig::file_source("50ms").write(&scratch)).await;
    let line = server.wait_for_log("leading zero");
    assert!(line.contains(" WARN "), "{line}");
    assert!(
        line.contains(&format!(
            "kid {kid:?}: \"n\" has 1 leading zero octet and \"e\" has 2 leading zero octets; \
             Base64urlUInt must use the fewest octets (D-11, RFC 7518 §2). Published as the \
             source wrote it, since re-encoding would change its bytes; a strict relying party \
             may refuse this key"
        )),
        "{line}"
    );
    let (status, served) = get(&server.url("/openid/v1/jwks")).await;
    assert_eq!(status, 200);
    assert!(
        served.contains(&format!(
            "\"kid\":\"{kid}\",\"alg\":\"RS256\",\"n\":\"{padded}\",\"e\":\"AAABAAE\"}}"
        )),
        "{served}"
    );

    // The source keeps listing the key (and adds one): no second warning for it.
    let rotated: serde_json::Value = serde_json::from_str(ROTATED).expect("fixture");
    set["keys"]
        .as_array_mut()
        .expect("keys")
        .push(rotated["keys"][0].clone());
    scratch.replace("jwks.json", &set.to_string());
    let new_kid = rotated["keys"][0]["kid"].as_str().expect("kid").to_owned();
    eventually("the added key", || async {
        kids(&get(&server.url("/openid/v1/jwks")).await.1).contains(&new_kid)
    })
    .await;
    assert_eq!(server.count_log("leading zero"), 1, "{:#?}", server.log());
}
