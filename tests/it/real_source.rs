//! The `apiserver` source against a real Kubernetes 1.20 kube-apiserver on a real etcd
//! (`support/real.rs`, built by `tests/real/setup`): the happy path and everything that
//! depends on what the apiserver really answers, the bearer token it really takes, its
//! `Accept` negotiation, its discovery document and its RBAC. Outages, hangs, 500s, drips,
//! garbage and wrong CAs stay on the fake (`apiserver.rs`, `support/FAKE_APISERVER.md`),
//! because a real apiserver cannot be made to produce them.
//!
//! Like `real.rs`, every test skips when the binaries are missing and `OIDC_EDGE_SKIP_REAL=1`.
//! oidc-edge runs in process and reads the apiserver as the service account
//! `oidc-edge/oidc-edge`, with a TokenRequest token in its `token_file`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use oidc_edge::jwks::source::remote::JWKS_ACCEPT;

use crate::support::clients::{assert_not_published_yet, get, trusting};
use crate::support::config::{Source, TestConfig};
use crate::support::fake_apiserver::{FakeApiserver, K3S_DEFAULT_ISSUER};
use crate::support::inprocess::InProcess;
use crate::support::real::{
    API_AUDIENCES, Bins, Cluster, ISSUER, READER, READER_NAMESPACE, STS_AUDIENCE, SaKey, claims,
    kid,
};
use crate::support::{K3S, Scratch, kids};

const READER_USER: &str = "system:serviceaccount:oidc-edge:oidc-edge";

/// The first of the apiserver's own audiences, the one a projected token for talking to the
/// apiserver carries (`serviceAccountToken.audience` left at its default).
fn api_audience() -> &'static str {
    API_AUDIENCES.split(',').next().expect("an audience")
}

/// A real apiserver signing for `cluster_issuer` with `key`, with the reader service account.
async fn cluster(bins: &Bins, cluster_issuer: &str, key: &SaKey) -> Cluster {
    let cluster = Cluster::start(bins, cluster_issuer, &[key], key).await;
    cluster.create_reader().await;
    cluster
}

/// A scratch dir with the apiserver's certificate in `apiserver-ca.pem` and `token` in
/// `token`, and a config of oidc-edge for [`ISSUER`], reading the apiserver every 100 ms.
fn config(cluster: &Cluster, token: &str) -> (Scratch, TestConfig) {
    let scratch = Scratch::new();
    scratch.write("apiserver-ca.pem", &cluster.ca_pem);
    // A trailing newline, as `kubectl create token > token` leaves.
    scratch.write("token", &format!("{token}\n"));
    let config = TestConfig::new().set("issuers.0.issuer", ISSUER).source(
        Source::new("apiserver")
            .set("url", cluster.url())
            .set("ca_file", "apiserver-ca.pem")
            .set("token_file", "token")
            .set("refresh_interval", "100ms")
            .set("timeout", "5s"),
    );
    (scratch, config)
}

/// The `/status` entry of the only source.
async fn source_status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = get(&format!("http://{admin}/status")).await;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    status["issuers"][0]["sources"][0].clone()
}

/// Polls `check` every 50 ms for up to 30 s (the apiserver shares two cores with the suite).
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The kids oidc-edge serves; none while it is not 200.
async fn served_kids(server: &InProcess) -> Vec<String> {
    let (status, body) = get(&server.url("/openid/v1/jwks")).await;
    if status == 200 {
        kids(&body)
    } else {
        Vec::new()
    }
}

/// What an apiserver answered to one request: status, `Content-Type`, `Cache-Control`, and
/// the `kind`, `status`, `message`, `reason` and `code` of its body when it is a `Status`.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    content_type: String,
    cache_control: String,
    status_object: Option<[String; 5]>,
    body: String,
}

async fn ask(http: &reqwest::Client, url: &str, token: &str, accept: &str) -> Answer {
    let response = http
        .get(url)
        .bearer_auth(token)
        .header("accept", accept)
        .send()
        .await
        .expect("GET");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().expect("ASCII").to_owned())
            .unwrap_or_default()
    };
    let (content_type, cache_control) = (header("content-type"), header("cache-control"));
    let status = response.status().as_u16();
    let body = response.text().await.expect("body");
    let status_object = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .filter(|v| v["kind"] == "Status")
        .map(|v| {
            ["kind", "status", "message", "reason", "code"].map(|field| match &v[field] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        });
    Answer {
        status,
        content_type,
        cache_control,
        status_object,
        body,
    }
}

fn status_object(fields: [&str; 5]) -> Option<[String; 5]> {
    Some(fields.map(str::to_owned))
}

/// (a) and (d): why oidc-edge sends `Accept: application/jwk-set+json, application/json`
/// (`JWKS_ACCEPT`): the real apiserver's `/openid/v1/jwks` (`pkg/routes/openidmetadata.go`)
/// offers only `application/jwk-set+json` and answers 406 to `application/json` alone, which
/// is what most HTTP clients send. The fake must answer oidc-edge's requests the same way, or
/// the fault-injection tests on it prove nothing; that is checked here too, field by field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_apiserver_answers_406_to_accept_application_json_alone_and_oidc_edge_gets_its_keys_with_a_bearer_token()
 {
    let Some(bins) = Bins::find() else { return };
    let key = SaKey::generate();
    let cluster = cluster(&bins, ISSUER, &key).await;
    let token = cluster.token(READER_NAMESPACE, READER, &[]).await;
    let http = trusting(&cluster.ca_pem).build().expect("client");
    let jwks = format!("{}/openid/v1/jwks", cluster.url());
    let discovery = format!("{}/.well-known/openid-configuration", cluster.url());

    let json_only = ask(&http, &jwks, &token, "application/json").await;
    let not_acceptable = Answer {
        status: 406,
        content_type: "application/json".to_owned(),
        cache_control: "no-cache, private".to_owned(),
        status_object: status_object([
            "Status",
            "Failure",
            "406: Not Acceptable",
            "NotAcceptable",
            "406",
        ]),
        body: json_only.body.clone(),
    };
    assert_eq!(json_only, not_acceptable);
    let ok = ask(&http, &jwks, &token, JWKS_ACCEPT).await;
    assert_eq!(
        (
            ok.status,
            ok.content_type.as_str(),
            ok.cache_control.as_str()
        ),
        (200, "application/jwk-set+json", "public, max-age=3600")
    );
    assert_eq!(kids(&ok.body), vec![key.kid.clone()]);
    let doc = ask(&http, &discovery, &token, "application/json").await;
    assert_eq!(
        (
            doc.status,
            doc.content_type.as_str(),
            doc.cache_control.as_str()
        ),
        (200, "application/json", "public, max-age=3600")
    );
    assert_eq!(
        doc.body,
        format!(
            r#"{{"issuer":"{ISSUER}","jwks_uri":"{jwks}","response_types_supported":["id_token"],"subject_types_supported":["public"],"id_token_signing_alg_values_supported":["RS256"]}}"#
        )
    );
    let unknown = ask(&http, &jwks, "not-a-token", JWKS_ACCEPT).await;
    let unauthorized = Answer {
        status: 401,
        content_type: "application/json".to_owned(),
        cache_control: "no-cache, private".to_owned(),
        status_object: status_object(["Status", "Failure", "Unauthorized", "Unauthorized", "401"]),
        body: unknown.body.clone(),
    };
    assert_eq!(unknown, unauthorized);

    // The fake answers the same requests alike (bodies aside: its keys are fixtures).
    let fake_token = "eyJhbGciOiJSUzI1NiJ9.fake.sig";
    let fake = FakeApiserver::start(K3S, ISSUER, fake_token).await;
    let fake_http = trusting(&fake.pki.ca_pem).build().expect("client");
    let fake_jwks = format!("{}/openid/v1/jwks", fake.url());
    for (real, (token, accept)) in [
        (not_acceptable, (fake_token, "application/json")),
        (unauthorized, ("not-a-token", JWKS_ACCEPT)),
    ] {
        let answer = ask(&fake_http, &fake_jwks, token, accept).await;
        assert_eq!(
            Answer {
                body: answer.body.clone(),
                ..real
            },
            answer
        );
    }
    let fake_ok = ask(&fake_http, &fake_jwks, fake_token, JWKS_ACCEPT).await;
    assert_eq!(
        (
            fake_ok.status,
            fake_ok.content_type.as_str(),
            fake_ok.cache_control.as_str()
        ),
        (200, "application/jwk-set+json", "public, max-age=3600")
    );
    drop(fake);

    // oidc-edge, with that token in its token_file, publishes exactly the apiserver's key.
    let (scratch, config) = config(&cluster, &token);
    let server = InProcess::start(&config.write(&scratch)).await;
    until("the apiserver's key", || async {
        served_kids(&server).await == vec![key.kid.clone()]
    })
    .await;
    let source = source_status(server.admin).await;
    assert_eq!(
        (
            &source["healthy"],
            &source["last_error"],
            &source["upstream_issuer"],
            &source["issuer_mismatch"],
        ),
        (
            &serde_json::json!(true),
            &serde_json::Value::Null,
            &serde_json::json!(ISSUER),
            &serde_json::json!(false),
        )
    );
    assert_eq!(server.count_log("issuer mismatch"), 0);
}

/// (b) F-1: a cluster still signing for the default issuer. The apiserver's own discovery
/// document names it, and oidc-edge reports both values, once, while publishing the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_apiserver_signing_for_another_issuer_is_reported_in_status_and_the_log() {
    let Some(bins) = Bins::find() else { return };
    let key = SaKey::generate();
    let cluster = cluster(&bins, K3S_DEFAULT_ISSUER, &key).await;
    let token = cluster.token(READER_NAMESPACE, READER, &[]).await;
    assert_eq!(claims(&token)["iss"], K3S_DEFAULT_ISSUER);
    let (scratch, config) = config(&cluster, &token);
    let server = InProcess::start(&config.write(&scratch)).await;
    let line = server.wait_for_log("issuer mismatch");
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains(&format!(
            "issuer mismatch: the cluster signs tokens for \"{K3S_DEFAULT_ISSUER}\", not \
             \"{ISSUER}\"; relying parties will refuse them; set \
             --service-account-issuer={ISSUER} on the apiserver (F-1)"
        )),
        "{line}"
    );
    until("the keys", || async {
        served_kids(&server).await == vec![key.kid.clone()]
    })
    .await;
    let source = source_status(server.admin).await;
    assert_eq!(
        (
            &source["healthy"],
            &source["upstream_issuer"],
            &source["issuer_mismatch"],
        ),
        (
            &serde_json::json!(true),
            &serde_json::json!(K3S_DEFAULT_ISSUER),
            &serde_json::json!(true),
        )
    );
    // Reported once, not on every refresh.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.count_log("issuer mismatch"), 1);
}

/// (c) K-7: a service account without `system:service-account-issuer-discovery`. Kubernetes
/// 1.20 binds that role to every service account (the bootstrap binding of the same name, to
/// the group `system:serviceaccounts`); a cluster that removed it, as hardened ones do,
/// answers 403, and `/status` says which role to bind. Binding it, as the README's step does,
/// restores the reads without touching oidc-edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_the_issuer_discovery_role_gets_403_and_status_names_the_role_to_bind() {
    let Some(bins) = Bins::find() else { return };
    let key = SaKey::generate();
    let cluster = cluster(&bins, ISSUER, &key).await;
    let token = cluster.token(READER_NAMESPACE, READER, &[]).await;
    let admin = trusting(&cluster.ca_pem).build().expect("client");
    let binding = format!(
        "{}/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/system:service-account-issuer-discovery",
        cluster.url()
    );
    let (status, body) = cluster
        .get("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/system:service-account-issuer-discovery")
        .await;
    assert_eq!(status, 200, "{body}");
    let bootstrap: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        bootstrap["subjects"],
        serde_json::json!([{"kind": "Group", "apiGroup": "rbac.authorization.k8s.io",
            "name": "system:serviceaccounts"}])
    );
    let deleted = admin
        .delete(&binding)
        .bearer_auth(&cluster.admin_token)
        .send()
        .await
        .expect("DELETE");
    assert_eq!(deleted.status(), 200);

    // The apiserver itself, once its RBAC cache has seen the deletion.
    let http = trusting(&cluster.ca_pem).build().expect("client");
    let jwks = format!("{}/openid/v1/jwks", cluster.url());
    let forbidden = Answer {
        status: 403,
        content_type: "application/json".to_owned(),
        cache_control: "no-cache, private".to_owned(),
        status_object: status_object([
            "Status",
            "Failure",
            &format!("forbidden: User \"{READER_USER}\" cannot get path \"/openid/v1/jwks\""),
            "Forbidden",
            "403",
        ]),
        body: String::new(),
    };
    until("the apiserver to answer 403", || async {
        let answer = ask(&http, &jwks, &token, JWKS_ACCEPT).await;
        answer.status == 403
            && Answer {
                body: String::new(),
                ..answer
            } == forbidden
    })
    .await;

    let (scratch, config) = config(&cluster, &token);
    let server = InProcess::start(&config.write(&scratch)).await;
    let expected = format!(
        "GET {jwks}: answered 403 Forbidden; the identity may not read the discovery \
         endpoints: bind it to the ClusterRole system:service-account-issuer-discovery (K-7)"
    );
    let source = source_status(server.admin).await;
    assert_eq!(
        (&source["healthy"], &source["last_error"]),
        (&serde_json::json!(false), &serde_json::json!(expected))
    );
    assert_not_published_yet(&server.url("/openid/v1/jwks")).await;

    cluster
        .bind_cluster_role(
            "oidc-edge-issuer-discovery",
            "system:service-account-issuer-discovery",
            READER_NAMESPACE,
            READER,
        )
        .await;
    until("the keys after the binding", || async {
        served_kids(&server).await == vec![key.kid.clone()]
    })
    .await;
    assert_eq!(
        source_status(server.admin).await["healthy"],
        serde_json::json!(true)
    );
}

/// (e) The credential as a pod gets it: a projected-style TokenRequest token with an explicit
/// audience and an expiry, which the kubelet replaces in the file before it expires. The file
/// is read again for every fetch: a replacement the apiserver refuses (a token for STS, whose
/// audience is not one of the apiserver's) shows at once as 401 in `/status` while the last
/// good set stays published, and a renewed token is used at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projected_token_is_read_again_from_the_token_file_whenever_it_changes() {
    let Some(bins) = Bins::find() else { return };
    let key = SaKey::generate();
    let cluster = cluster(&bins, ISSUER, &key).await;
    let first = cluster
        .token(READER_NAMESPACE, READER, &[api_audience()])
        .await;
    let claims_first = claims(&first);
    assert_eq!(
        (&claims_first["aud"], &claims_first["sub"]),
        (
            &serde_json::json!([api_audience()]),
            &serde_json::json!(READER_USER)
        )
    );
    assert_eq!(
        claims_first["exp"].as_u64().expect("exp") - claims_first["iat"].as_u64().expect("iat"),
        3600
    );
    assert_eq!(kid(&first), key.kid);
    let (scratch, config) = config(&cluster, &first);
    let server = InProcess::start(&config.write(&scratch)).await;
    until("the keys", || async {
        served_kids(&server).await == vec![key.kid.clone()]
    })
    .await;
    let (_, good) = get(&server.url("/openid/v1/jwks")).await;

    // The workload's STS token by mistake: same account, wrong audience for the apiserver.
    let for_sts = cluster
        .token(READER_NAMESPACE, READER, &[STS_AUDIENCE])
        .await;
    scratch.replace("token", &format!("{for_sts}\n"));
    let unauthorized = format!(
        "GET {}/openid/v1/jwks: answered 401 Unauthorized; the apiserver refused the \
         credentials (token or client certificate)",
        cluster.url()
    );
    until("the STS token to be refused", || async {
        let source = source_status(server.admin).await;
        source["healthy"] == false && source["last_error"] == unauthorized.as_str()
    })
    .await;
    assert_eq!(
        get(&server.url("/openid/v1/jwks")).await,
        (200, good.clone())
    );

    // The kubelet's renewal: a new token, the same audience. A 1.20 token has no `jti`, so
    // two minted in the same second are the same bytes: mint until `iat` has moved on.
    let renewed = loop {
        let token = cluster
            .token(READER_NAMESPACE, READER, &[api_audience()])
            .await;
        if token != first {
            break token;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(claims(&renewed)["iat"].as_u64() > claims_first["iat"].as_u64());
    scratch.replace("token", &format!("{renewed}\n"));
    until("the renewed token to be used", || async {
        source_status(server.admin).await["healthy"] == true
    })
    .await;
    assert_eq!(get(&server.url("/openid/v1/jwks")).await, (200, good));
}

/// A staged rotation on the real apiserver, as `--service-account-key-file` is meant to be
/// used: the new public key beside the old, then the new key signs, then the old public key
/// leaves. oidc-edge publishes the new key as soon as the apiserver does and keeps the old
/// one for `key_retention` (1 s here) after the apiserver dropped it. Its own token is renewed
/// before the old key leaves (README: an old-key token is refused from then on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_appear_at_start_and_follow_a_staged_rotation_of_a_real_apiserver_with_grace() {
    let Some(bins) = Bins::find() else { return };
    let (old, new) = (SaKey::generate(), SaKey::generate());
    let mut cluster = cluster(&bins, ISSUER, &old).await;
    let token = cluster.token(READER_NAMESPACE, READER, &[]).await;
    let (scratch, config) = config(&cluster, &token);
    let config = config.set("issuers.0.key_retention", "1s");
    let server = InProcess::start(&config.write(&scratch)).await;
    until("the old key", || async {
        served_kids(&server).await == vec![old.kid.clone()]
    })
    .await;

    let mut both = vec![old.kid.clone(), new.kid.clone()];
    both.sort();
    cluster.restart(&[&old, &new], &new).await;
    until("new and old keys", || async {
        let mut kids = served_kids(&server).await;
        kids.sort();
        kids == both
    })
    .await;
    let renewed = cluster.token(READER_NAMESPACE, READER, &[]).await;
    assert_eq!(kid(&renewed), new.kid);
    scratch.replace("token", &format!("{renewed}\n"));

    cluster.restart(&[&new], &new).await;
    until("the old key to drop after 1 s", || async {
        served_kids(&server).await == vec![new.kid.clone()]
    })
    .await;
    assert_eq!(
        source_status(server.admin).await["healthy"],
        serde_json::json!(true)
    );
}
