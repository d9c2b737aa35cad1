//! Push (issue 18): a cluster no public host can reach pushes its key set to a public edge.
//! The edge is the real binary over real TLS (a test CA); tokens are signed with P-256 keys
//! made here, in Kubernetes' claim shape. Every refusal is asserted with its status and its
//! exact reason, and the served JWKS with its bytes, before and after.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::support::clients;
use crate::support::config::{ISSUER, Source, TestConfig};
use crate::support::pki::Pki;
use crate::support::process::{Binary, run};
use crate::support::signer::{ClusterKey, jwks, token_claims};
use crate::support::{Scratch, kids};

const PUSH_PATH: &str = "/.oidc-edge/v1/jwks";
const AUDIENCE: &str = "https://oidc.example.com/.oidc-edge/v1/jwks";
const SUBJECT: &str = "system:serviceaccount:oidc-edge:pusher";

/// A public edge with a push source for [`ISSUER`], HTTPS on a test CA beside the plain
/// listener of the default shape.
struct Edge {
    scratch: Scratch,
    pki: Pki,
    config: PathBuf,
    server: Binary,
    https: SocketAddr,
}

fn push_source() -> Source {
    Source::new("push")
        .set("audience", AUDIENCE)
        .set("subject", SUBJECT)
        .set("refresh_interval", "1s")
}

impl Edge {
    fn start() -> Self {
        Self::start_with(&["oidc.example.com"], push_source())
    }

    /// An edge whose certificate names `names`, with `source` as its push source.
    fn start_with(names: &[&str], source: Source) -> Self {
        let scratch = Scratch::new();
        let pki = Pki::new("push test CA");
        let leaf = pki.server_for(names);
        scratch.write("cert.pem", &leaf.cert_pem);
        scratch.write("key.pem", &leaf.key_pem);
        let config = TestConfig::new()
            .source(source)
            .set("https.listen", "127.0.0.1:0")
            .set("https.files.cert_file", "cert.pem")
            .set("https.files.key_file", "key.pem")
            .write(&scratch);
        let (server, https) = Self::serve(&config);
        Self {
            scratch,
            pki,
            config,
            server,
            https,
        }
    }

    fn serve(config: &std::path::Path) -> (Binary, SocketAddr) {
        let mut server = Binary::start(config);
        let https = server.listening("https");
        (server, https)
    }

    fn restart(&mut self) {
        self.server.signal("TERM");
        assert_eq!(self.server.wait_exit(Duration::from_secs(15)), Some(0));
        (self.server, self.https) = Self::serve(&self.config);
    }

    fn client(&self) -> reqwest::Client {
        clients::https_client(&self.pki.ca_pem, self.https)
            .build()
            .expect("client")
    }

    /// PUTs `body` with `token` (none: no Authorization) over HTTPS; status and text.
    async fn push(&self, token: Option<&str>, body: &str) -> (u16, String) {
        let mut request = self
            .client()
            .put(clients::https_url(self.https, PUSH_PATH))
            .body(body.to_owned());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("push");
        let status = response.status().as_u16();
        (status, response.text().await.expect("text"))
    }

    /// The served JWKS: status and body.
    async fn jwks(&self) -> (u16, String) {
        let response = self
            .client()
            .get(clients::https_url(self.https, "/openid/v1/jwks"))
            .send()
            .await
            .expect("GET");
        let status = response.status().as_u16();
        (status, response.text().await.expect("text"))
    }

    /// `oidc-edge trust` with `keys`, then SIGHUP so that the server takes it at once.
    async fn trust(&self, keys: &[&ClusterKey]) -> String {
        let file = self.scratch.write("cluster-jwks.json", &jwks(keys));
        let out = run(&[
            "trust",
            "--config",
            self.config.to_str().expect("utf-8"),
            "--issuer",
            ISSUER,
            "--jwks",
            file.to_str().expect("utf-8"),
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.server.signal("HUP");
        crate::support::eventually("the edge serves the trusted keys", || async {
            let (status, body) = self.jwks().await;
            status == 200 && {
                let served = kids(&body);
                keys.iter().all(|k| served.contains(&k.kid))
            }
        })
        .await;
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Waits until the served JWKS holds exactly `kids` (sorted).
    async fn serves(&self, want: &[String]) {
        crate::support::eventually("the edge serves the expected kids", || async {
            let (status, body) = self.jwks().await;
            status == 200 && {
                let mut got = kids(&body);
                got.sort();
                got == want
            }
        })
        .await;
    }

    async fn status(&self) -> Value {
        let (_, body) = clients::get(&self.server.admin_url("/status")).await;
        serde_json::from_str(&body).expect("status JSON")
    }
}

/// An agent's config in `dir`: an apiserver at `url` as its source (CA `apiserver-ca.pem`,
/// the bearer token in `token_file`), pushing every second with the `push` table.
fn agent_reading(dir: &Scratch, url: &str, token_file: &str, mut push: toml::Table) -> PathBuf {
    push.insert("interval".into(), "1s".into());
    TestConfig::new()
        .remove("http")
        .source(
            Source::new("apiserver")
                .set("url", url)
                .set("ca_file", "apiserver-ca.pem")
                .set("token_file", token_file)
                .set("refresh_interval", "1s"),
        )
        .set("issuers.0.push", toml::Value::Array(vec![push.into()]))
        .write(dir)
}

fn token(key: &ClusterKey) -> String {
    key.sign(&token_claims(ISSUER, AUDIENCE, SUBJECT, 3600))
}

fn sorted(keys: &[&ClusterKey]) -> Vec<String> {
    let mut kids: Vec<String> = keys.iter().map(|k| k.kid.clone()).collect();
    kids.sort();
    kids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_cluster_rotates_its_keys_through_pushes_alone() {
    let edge = Edge::start();
    let (old, new) = (ClusterKey::new("old"), ClusterKey::new("new"));

    // Nothing is trusted yet: no push can be authenticated, and the refusal says how to start.
    let (status, text) = edge.push(Some(&token(&old)), &jwks(&[&old])).await;
    assert_eq!(status, 403);
    assert_eq!(
        text,
        format!(
            "this edge publishes no key for {ISSUER} yet, so no push can be authenticated; trust the \
             cluster's keys once: oidc-edge trust --config {} --issuer {ISSUER} --jwks FILE, with FILE \
             from `kubectl get --raw /openid/v1/jwks` on the cluster\n",
            edge.config.display()
        )
    );
    assert_eq!(edge.jwks().await.0, 503);

    // The operator's one step.
    let said = edge.trust(&[&old]).await;
    assert!(
        said.starts_with(&format!("trusted for {ISSUER}: kids old\n")),
        "{said}"
    );

    // A staged rotation, as kube-apiserver does it with two --service-account-key-file: the new
    // key is published first (signed by the old one), then signs, then the old one goes.
    let (status, text) = edge.push(Some(&token(&old)), &jwks(&[&old, &new])).await;
    assert_eq!(
        (status, text.as_str()),
        (200, "accepted; serving kids new, old\n")
    );
    edge.serves(&sorted(&[&old, &new])).await;
    let (status, _) = edge.push(Some(&token(&new)), &jwks(&[&old, &new])).await;
    assert_eq!(status, 200);
    let (status, text) = edge.push(Some(&token(&new)), &jwks(&[&new])).await;
    assert_eq!(
        (status, text.as_str()),
        (200, "accepted; serving kids new, old\n")
    );
    // The old key stays published for rotation grace: tokens it signed still verify...
    edge.serves(&sorted(&[&old, &new])).await;
    // ...but it may no longer change the set.
    let (status, text) = edge.push(Some(&token(&old)), &jwks(&[&old])).await;
    assert_eq!(status, 403);
    assert_eq!(
        text,
        "the token is signed by kid \"old\", which this edge keeps only for rotation grace: a retired \
         key is still served but may not change the key set\n"
    );
    edge.serves(&sorted(&[&old, &new])).await;

    let status = edge.status().await;
    let push = &status["push"][0];
    assert_eq!(push["issuer"], ISSUER);
    assert_eq!(push["url"], AUDIENCE);
    assert_eq!(push["subject"], SUBJECT);
    assert_eq!(push["last_accepted_kid"], "new");
    assert!(push["last_accepted_at"].as_u64().is_some(), "{status:#}");
    assert!(
        push["last_refused"]
            .as_str()
            .is_some_and(|r| r.contains("rotation grace")),
        "{status:#}"
    );
    let scrape = crate::support::metrics::scrape(edge.server.admin).await;
    let count = |result| {
        crate::support::metrics::metric(
            &scrape,
            "oidc_edge_pushes_received_total",
            &[("issuer", ISSUER), ("result", result)],
        )
    };
    assert_eq!(count("accepted"), 3.0);
    assert_eq!(count("retired_key"), 1.0);
    assert_eq!(count("unknown_key"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refused_push_says_why_and_changes_nothing_served() {
    let edge = Edge::start();
    let (trusted, stranger) = (ClusterKey::new("trusted"), ClusterKey::new("stranger"));
    edge.trust(&[&trusted]).await;
    let (_, served) = edge.jwks().await;
    let claims = |edit: &dyn Fn(&mut Value)| {
        let mut claims = token_claims(ISSUER, AUDIENCE, SUBJECT, 3600);
        edit(&mut claims);
        trusted.sign(&claims)
    };
    let set = jwks(&[&trusted]);
    let replayed = token(&trusted);
    assert_eq!(edge.push(Some(&replayed), &set).await.0, 200);
    let with_private = {
        let mut jwk = trusted.jwk.clone();
        jwk["d"] = "c2VjcmV0".into();
        serde_json::json!({ "keys": [jwk] }).to_string()
    };
    let huge = format!("{{\"keys\":[],\"pad\":\"{}\"}}", "x".repeat(2 << 20));
    let stranger_set = jwks(&[&trusted, &stranger]);
    // (what, token, body, status, exact answer or its start)
    let cases: Vec<(&str, Option<String>, String, u16, String)> = vec![
        (
            "no token",
            None,
            set.clone(),
            401,
            "a push needs Authorization: Bearer with a service-account token of the cluster\n".into(),
        ),
        (
            "not a JWT",
            Some("not-a-jwt".into()),
            set.clone(),
            401,
            "the bearer token is not a JWT: InvalidToken\n".into(),
        ),
        (
            "a key the edge does not publish, listed in the pushed set itself",
            Some(token(&stranger)),
            stranger_set.clone(),
            403,
            format!(
                "the token is signed by kid \"stranger\", which this edge does not publish for {ISSUER}: \
                 a push is authenticated only by keys already published (an abrupt key change, a rebuilt \
                 cluster, or a forgery); if the cluster's keys were replaced on purpose, trust the new set \
                 once: oidc-edge trust --config {} --issuer {ISSUER} --jwks FILE, with FILE from `kubectl \
                 get --raw /openid/v1/jwks` on the cluster\n",
                edge.config.display()
            ),
        ),
        (
            "a forged signature",
            Some({
                let good = token(&trusted);
                let mut parts: Vec<&str> = good.split('.').collect();
                let forged = stranger.sign(&token_claims(ISSUER, AUDIENCE, SUBJECT, 3600));
                parts[2] = forged.rsplit('.').next().expect("signature");
                parts.join(".")
            }),
            set.clone(),
            401,
            "the token's signature does not verify with published key \"trusted\": InvalidSignature\n"
                .into(),
        ),
        (
            "wrong iss",
            Some(claims(&|c| c["iss"] = "https://oidc.example.com/other".into())),
            set.clone(),
            403,
            format!(
                "the token's iss is Some(\"https://oidc.example.com/other\"), not the issuer \"{ISSUER}\"\n"
            ),
        ),
        (
            "wrong aud",
            Some(claims(&|c| c["aud"] = serde_json::json!(["sts.amazonaws.com"]))),
            set.clone(),
            403,
            format!(
                "the token's aud is [\"sts.amazonaws.com\"], which does not contain the push audience \"{AUDIENCE}\"\n"
            ),
        ),
        (
            "wrong sub",
            Some(claims(&|c| c["sub"] = "system:serviceaccount:default:default".into())),
            set.clone(),
            403,
            format!(
                "the token's sub is Some(\"system:serviceaccount:default:default\"), not \"{SUBJECT}\", the only account allowed to push\n"
            ),
        ),
        (
            "expired",
            Some(claims(&|c| {
                let now = crate::support::signer::unix_now();
                c["iat"] = (now - 3000).into();
                c["nbf"] = (now - 3000).into();
                c["exp"] = (now - 600).into();
            })),
            set.clone(),
            403,
            // 600 s, or 601 when a second turned between signing and checking.
            "the token expired 60".into(),
        ),
        (
            "too long-lived",
            Some(claims(&|c| {
                let now = crate::support::signer::unix_now();
                c["exp"] = (now + 86_400).into();
            })),
            set.clone(),
            403,
            "the token lives 86400 s, more than the 3600 s a push accepts: use a projected token with \
             expirationSeconds of at most 3600\n"
                .into(),
        ),
        (
            "no jti",
            Some(claims(&|c| {
                c.as_object_mut().expect("claims").remove("jti");
            })),
            set.clone(),
            403,
            "the token has no jti, so a replay could not be told; Kubernetes adds one since 1.30 \
             (allow_tokens_without_jti = true accepts older clusters)\n"
                .into(),
        ),
        (
            "a replayed token with another body",
            Some(replayed.clone()),
            stranger_set.clone(),
            409,
            "the token with jti".into(),
        ),
        (
            "a private member",
            Some(token(&trusted)),
            with_private,
            422,
            "the pushed key set is refused: ".into(),
        ),
        (
            "a set without the signing key",
            Some(token(&trusted)),
            jwks(&[&stranger]),
            422,
            "the pushed key set does not list kid \"trusted\", which signed the push token; a cluster \
             always publishes its signing key\n"
                .into(),
        ),
        (
            "2 MiB",
            Some(token(&trusted)),
            huge,
            413,
            "a pushed key set is at most 1048576 bytes\n".into(),
        ),
    ];
    for (what, token, body, status, answer) in cases {
        let (got, text) = edge.push(token.as_deref(), &body).await;
        assert_eq!(got, status, "{what}: {text}");
        if answer.ends_with('\n') {
            assert_eq!(text, answer, "{what}");
        } else {
            assert!(text.starts_with(&answer), "{what}: {text}");
        }
        assert_eq!(edge.jwks().await, (200, served.clone()), "{what}");
    }
    // The same token and the same body again is a retry, not a replay.
    assert_eq!(edge.push(Some(&replayed), &set).await.0, 200);

    // Not offered in plain text when the edge has HTTPS: the token would cross the network
    // readable, and could be replayed with another body before the edge ever saw it.
    let plain = clients::plain_client(edge.server.addr)
        .put(format!(
            "http://oidc.example.com:{}{PUSH_PATH}",
            edge.server.addr.port()
        ))
        .bearer_auth(token(&trusted))
        .body(set.clone())
        .send()
        .await
        .expect("plain push");
    assert_eq!(plain.status().as_u16(), 404);
    assert_eq!(
        plain.text().await.expect("text"),
        "no push source is configured for this issuer on this listener\n"
    );
    // A push path takes only PUT.
    let get = edge
        .client()
        .get(clients::https_url(edge.https, PUSH_PATH))
        .send()
        .await
        .expect("GET");
    assert_eq!(get.status().as_u16(), 405);
    assert_eq!(get.headers()["allow"], "PUT");
    let status = edge.status().await;
    assert!(
        status["push"][0]["last_refused"]
            .as_str()
            .is_some_and(|r| r.starts_with("a pushed key set is at most")),
        "{status:#}"
    );
}

/// An issuer without a push source takes no push, even on an edge where another issuer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_without_a_push_source_takes_no_push() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", crate::support::K3S);
    let config = TestConfig::file_source("1s")
        .issuer("https://pushed.example.com")
        .source(push_source())
        .write(&scratch);
    let server = Binary::start(&config);
    let response = clients::plain_client(server.addr)
        .put(format!(
            "http://oidc.example.com:{}{PUSH_PATH}",
            server.addr.port()
        ))
        .bearer_auth("x")
        .body("{}")
        .send()
        .await
        .expect("push");
    assert_eq!(response.status().as_u16(), 404);
    assert_eq!(
        response.text().await.expect("text"),
        "no push source is configured for this issuer on this listener\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abrupt_key_change_is_refused_until_trusted_and_restarts_lose_nothing() {
    let mut edge = Edge::start();
    let (first, second, rebuilt) = (
        ClusterKey::new("first"),
        ClusterKey::new("second"),
        ClusterKey::new("rebuilt"),
    );
    edge.trust(&[&first]).await;
    assert_eq!(
        edge.push(Some(&token(&first)), &jwks(&[&first, &second]))
            .await
            .0,
        200
    );

    // A token issued before the restart: the new process has no record of its uses.
    let earlier = || {
        let mut claims = token_claims(ISSUER, AUDIENCE, SUBJECT, 3600);
        let iat = crate::support::signer::unix_now() - 10;
        claims["iat"] = iat.into();
        claims["nbf"] = iat.into();
        claims["exp"] = (iat + 3600).into();
        first.sign(&claims)
    };
    let (confirming, changing) = (earlier(), earlier());

    // Edge restart: the pushed set is served at once, from state, and still trusted.
    edge.restart();
    let (status, body) = edge.jwks().await;
    assert_eq!(status, 200);
    let mut got = kids(&body);
    got.sort();
    assert_eq!(got, sorted(&[&first, &second]));
    // It may confirm what is listed, never change it.
    let listed = jwks(&[&first, &second]);
    let (status, text) = edge.push(Some(&confirming), &listed).await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = edge.push(Some(&changing), &jwks(&[&first])).await;
    assert_eq!(status, 409);
    assert_eq!(
        text,
        "the token was issued before this edge started, so its earlier uses are unknown: a change \
         needs a token issued since (the kubelet renews projected tokens at 80 % of their lifetime)\n"
    );
    assert_eq!(
        edge.push(Some(&token(&second)), &jwks(&[&second])).await.0,
        200
    );

    // The cluster is rebuilt with a new key: refused, loudly, naming the command.
    let (status, text) = edge.push(Some(&token(&rebuilt)), &jwks(&[&rebuilt])).await;
    assert_eq!(status, 403);
    assert!(text.contains("oidc-edge trust --config"), "{text}");
    let logged = edge.server.wait_for_log("which this edge does not publish");
    assert!(
        logged.contains("push refused; what is served is unchanged"),
        "{logged}"
    );
    // The operator re-trusts: the new key signs pushes, the old ones stay for grace.
    let said = edge.trust(&[&rebuilt]).await;
    assert!(said.contains("kids rebuilt\n"), "{said}");
    edge.serves(&sorted(&[&first, &second, &rebuilt])).await;
    assert_eq!(
        edge.push(Some(&token(&rebuilt)), &jwks(&[&rebuilt]))
            .await
            .0,
        200
    );
    let (status, _) = edge.push(Some(&token(&second)), &jwks(&[&second])).await;
    assert_eq!(
        status, 403,
        "a key the operator did not trust again is retired"
    );
}

/// The agent in the cluster: `oidc-edge push` reading the cluster's keys (a file standing in
/// for the apiserver source) and a projected token the test replaces as the kubelet would.
struct Agent {
    scratch: Scratch,
    config: PathBuf,
    process: Binary,
}

impl Agent {
    fn start(edge: &Edge, keys: &[&ClusterKey], signer: &ClusterKey) -> Self {
        let scratch = Scratch::new();
        scratch.write("jwks.json", &jwks(keys));
        scratch.write("token", &token(signer));
        scratch.write("ca.pem", &edge.pki.ca_pem);
        let mut push = toml::Table::new();
        push.insert("token_file".into(), "token".into());
        push.insert("ca_file".into(), "ca.pem".into());
        push.insert("connect_to".into(), edge.https.to_string().into());
        push.insert("interval".into(), "1s".into());
        let config = TestConfig::file_source("100ms")
            .remove("http")
            .set("issuers.0.push", toml::Value::Array(vec![push.into()]))
            .write(&scratch);
        let process = Binary::start_outbound("push", &config);
        Self {
            scratch,
            config,
            process,
        }
    }

    /// The cluster now lists `keys`.
    fn lists(&self, keys: &[&ClusterKey]) {
        self.scratch.replace("jwks.json", &jwks(keys));
    }

    /// The kubelet replaces the projected token with a fresh one signed by `signer`.
    fn new_token(&self, signer: &ClusterKey) {
        self.scratch.replace("token", &token(signer));
    }

    async fn status_shows(&self, what: &str, needle: &str) {
        let url = self.process.admin_url("/status");
        crate::support::eventually(what, || async {
            clients::get(&url).await.1.contains(needle)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_in_the_cluster_carries_a_staged_rotation_to_the_edge() {
    let edge = Edge::start();
    let (old, new) = (ClusterKey::new("old"), ClusterKey::new("new"));
    edge.trust(&[&old]).await;
    let mut agent = Agent::start(&edge, &[&old], &old);
    agent
        .status_shows(
            "the agent's first push is accepted",
            "\"last_success_at\": 1",
        )
        .await;
    assert_eq!(edge.status().await["push"][0]["last_accepted_kid"], "old");

    // The cluster publishes a new key; the token the agent holds was already used for the
    // old set, so the edge refuses it as a replay until the kubelet brings a fresh one.
    agent.lists(&[&old, &new]);
    agent
        .status_shows(
            "the agent reports the refused replay",
            "the edge answered 409 Conflict: the token with jti",
        )
        .await;
    edge.serves(&sorted(&[&old])).await;
    agent.new_token(&old);
    edge.serves(&sorted(&[&old, &new])).await;

    // The cluster signs with the new key, then drops the old one: the edge keeps it for
    // grace, and at no step did it serve a set without the key that signs.
    agent.new_token(&new);
    agent.lists(&[&new]);
    crate::support::eventually("the edge takes the push signed by the new key", || async {
        edge.status().await["push"][0]["last_accepted_kid"] == "new"
    })
    .await;
    edge.serves(&sorted(&[&old, &new])).await;

    // The agent restarts: nothing lost, the same set pushed again and accepted.
    agent.process.signal("TERM");
    assert_eq!(agent.process.wait_exit(Duration::from_secs(15)), Some(0));
    let accepted_before = edge.status().await["push"][0]["last_accepted_at"].clone();
    agent.process = Binary::start_outbound("push", &agent.config);
    crate::support::eventually("the restarted agent pushes again", || async {
        edge.status().await["push"][0]["last_accepted_at"] != accepted_before
    })
    .await;
    edge.serves(&sorted(&[&old, &new])).await;

    let scrape = crate::support::metrics::scrape(agent.process.admin).await;
    let written = crate::support::metrics::metric(
        &scrape,
        "oidc_edge_publishes_total",
        &[
            ("issuer", ISSUER),
            ("target", AUDIENCE),
            ("result", "written"),
        ],
    );
    assert_eq!(written, 1.0, "the restarted agent's first accepted push");
}

#[test]
fn push_once_exits_with_the_edges_reason() {
    let scratch = Scratch::new();
    let stray = ClusterKey::new("stray");
    scratch.write("jwks.json", &jwks(&[&stray]));
    scratch.write("token", "");
    let mut push = toml::Table::new();
    push.insert("token_file".into(), "token".into());
    let config = TestConfig::file_source("1s")
        .remove("http")
        .set("issuers.0.push", toml::Value::Array(vec![push.into()]))
        .write(&scratch);
    let out = run(&[
        "push",
        "--once",
        "--config",
        config.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().last(),
        Some(
            format!(
                "oidc-edge: PUT {AUDIENCE}: the token file {} is empty",
                scratch.path("token").display()
            )
            .as_str()
        ),
        "{stderr}"
    );
    // `push` needs a target; `serve` without a listener names both commands.
    let serves = scratch.write("serve.toml", &TestConfig::file_source("1s").text());
    let out = run(&[
        "push",
        "--once",
        "--config",
        serves.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "oidc-edge: {}: issuers: no issuer has an [[issuers.push]] target\n",
            serves.display()
        )
    );
}

#[test]
fn check_config_shows_where_pushes_go_and_with_which_token() {
    let scratch = Scratch::new();
    let edge = TestConfig::new().source(push_source()).write(&scratch);
    let out = run(&["check-config", "--config", edge.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "  source[0]  push from {SUBJECT} (audience {AUDIENCE}) at PUT {AUDIENCE}; trust inbox checked every 1s\n"
        )),
        "{text}"
    );

    scratch.write("jwks.json", crate::support::K3S);
    scratch.write("token", "a token");
    let mut push = toml::Table::new();
    push.insert("token_file".into(), "token".into());
    push.insert("interval".into(), "30s".into());
    let agent = TestConfig::file_source("1s")
        .remove("http")
        .set("issuers.0.push", toml::Value::Array(vec![push.into()]))
        .write(&scratch);
    let out = run(&["check-config", "--config", agent.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "  push[0]    {AUDIENCE} with the token in {}, every 30s\n",
            scratch.path("token").display()
        )),
        "{text}"
    );
    // The token is a secret: its path is shown, never its contents.
    assert!(!text.contains("a token"), "{text}");

    // Or minted through TokenRequest with the apiserver source's credentials.
    scratch.write("apiserver-ca.pem", &Pki::new("apiserver CA").ca_pem);
    let mut push = toml::Table::new();
    push.insert("service_account".into(), "oidc-edge/pusher".into());
    let minting = TestConfig::new()
        .remove("http")
        .source(
            Source::new("apiserver")
                .set("url", "https://127.0.0.1:6443")
                .set("ca_file", "apiserver-ca.pem")
                .set("token_file", "token"),
        )
        .set("issuers.0.push", toml::Value::Array(vec![push.into()]))
        .write(&scratch);
    let out = run(&["check-config", "--config", minting.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "  push[0]    {AUDIENCE} with a TokenRequest token of oidc-edge/pusher, every 1m\n"
        )),
        "{text}"
    );
}

/// The whole path with a real kube-apiserver: the operator trusts what the cluster serves at
/// `/openid/v1/jwks`, the agent reads the keys from the apiserver and pushes with a token it
/// mints through TokenRequest for every push (`service_account`), and a staged rotation of
/// the apiserver's signing key (three restarts, real-parts §1) reaches the edge with no step
/// by anyone: no operator, no token replaced.
/// Debian's kube-apiserver predates `jti` (Kubernetes 1.30), so the edge allows tokens
/// without one, as it must for such a cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_apiservers_staged_rotation_reaches_the_edge_through_the_agent() {
    use crate::support::real::{Bins, Cluster, SaKey};
    let Some(bins) = Bins::find() else { return };
    let (old, new) = (SaKey::generate(), SaKey::generate());
    let mut cluster = Cluster::start(&bins, ISSUER, &[&old], &old).await;
    cluster.create_namespace("oidc-edge").await;
    cluster.create_service_account("oidc-edge", "pusher").await;

    let edge = Edge::start_with(
        &["oidc.example.com"],
        push_source().set("allow_tokens_without_jti", true),
    );
    // The seeds' one manual step, done once.
    let (status, cluster_jwks) = cluster.get("/openid/v1/jwks").await;
    assert_eq!(status, 200);
    let file = edge.scratch.write("cluster-jwks.json", &cluster_jwks);
    let out = run(&[
        "trust",
        "--config",
        edge.config.to_str().expect("utf-8"),
        "--issuer",
        ISSUER,
        "--jwks",
        file.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    edge.server.signal("HUP");
    edge.serves(std::slice::from_ref(&old.kid)).await;

    // The agent: the apiserver as its source (the admin's static token, which no key
    // rotation invalidates and which may create tokens), minting the pusher's tokens.
    let agent_dir = Scratch::new();
    agent_dir.write("apiserver-ca.pem", &cluster.ca_pem);
    agent_dir.write("admin-token", &cluster.admin_token);
    agent_dir.write("ca.pem", &edge.pki.ca_pem);
    let mut push = toml::Table::new();
    push.insert("service_account".into(), "oidc-edge/pusher".into());
    push.insert("ca_file".into(), "ca.pem".into());
    push.insert("connect_to".into(), edge.https.to_string().into());
    let agent_config = agent_reading(&agent_dir, &cluster.url(), "admin-token", push);
    let _agent = Binary::start_outbound("push", &agent_config);
    crate::support::eventually("the agent's push is accepted", || async {
        edge.status().await["push"][0]["last_accepted_kid"] == old.kid.as_str()
    })
    .await;

    let both = {
        let mut kids = vec![old.kid.clone(), new.kid.clone()];
        kids.sort();
        kids
    };
    // 1. The new key is published beside the old one, which still signs.
    cluster.restart(&[&old, &new], &old).await;
    edge.serves(&both).await;
    // 2. The new key signs, so the agent's next token is signed by it.
    cluster.restart(&[&old, &new], &new).await;
    crate::support::eventually("a push signed by the new key is accepted", || async {
        edge.status().await["push"][0]["last_accepted_kid"] == new.kid.as_str()
    })
    .await;
    // 3. The old key goes; the edge keeps it for rotation grace, and it never served a set
    // without the key that signs.
    cluster.restart(&[&new], &new).await;
    let listed_new_only = || async {
        let status = edge.status().await;
        status["issuers"][0]["keys"].as_array().is_some_and(|keys| {
            keys.iter()
                .any(|k| k["kid"] == old.kid.as_str() && k["vanished_at"].as_u64().is_some())
        })
    };
    crate::support::eventually("the old key is retired on the edge", listed_new_only).await;
    edge.serves(&both).await;
}

/// Debian's tinyproxy on 127.0.0.1, logging every CONNECT; stopped by its PID on drop.
struct Tinyproxy {
    child: std::process::Child,
    port: u16,
    log: PathBuf,
}

impl Tinyproxy {
    /// Allows CONNECT to `connect_port` only (tinyproxy's default is 443 and 563).
    fn start(scratch: &Scratch, connect_port: u16) -> Self {
        let port = crate::support::pebble::free_tcp_port();
        let log = scratch.path("tinyproxy.log");
        let config = scratch.write(
            "tinyproxy.conf",
            &format!(
                "Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 30\nMaxClients 10\n\
                 ConnectPort {connect_port}\nLogLevel Connect\nLogFile \"{}\"\n",
                log.display()
            ),
        );
        let child = std::process::Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tinyproxy (scripts/test installs it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "tinyproxy did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port, log }
    }

    /// The CONNECT requests it logged, as `host:port`.
    fn connects(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            // `CONNECT   <time> [<pid>]: Request (file descriptor 7): CONNECT host:port HTTP/1.1`
            .filter_map(|line| line.split_once("): CONNECT "))
            .map(|(_, rest)| rest.split_whitespace().next().unwrap_or("").to_owned())
            .collect()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// A pod that must leave the cluster through a proxy: HTTPS_PROXY carries the pushes (a real
/// tinyproxy sees the CONNECT to the edge), and only them: the apiserver source is reached
/// directly, never through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_go_through_https_proxy_and_the_apiserver_never_does() {
    use crate::support::fake_apiserver::FakeApiserver;
    let key = ClusterKey::new("proxied");
    // The proxy resolves the edge's name itself: `localhost` is one it can resolve.
    let edge = Edge::start_with(&["oidc.example.com", "localhost"], push_source());
    let https = edge.https;
    edge.trust(&[&key]).await;

    let fake = FakeApiserver::start(&jwks(&[&key]), ISSUER, "api-token").await;
    let agent_dir = Scratch::new();
    let proxy = Tinyproxy::start(&agent_dir, https.port());
    agent_dir.write("apiserver-ca.pem", &fake.pki.ca_pem);
    agent_dir.write("api-token", "api-token");
    agent_dir.write("push-token", &token(&key));
    agent_dir.write("edge-ca.pem", &edge.pki.ca_pem);
    let mut push = toml::Table::new();
    push.insert("token_file".into(), "push-token".into());
    push.insert("ca_file".into(), "edge-ca.pem".into());
    push.insert(
        "url".into(),
        format!("https://localhost:{}{PUSH_PATH}", https.port()).into(),
    );
    let agent_config = agent_reading(&agent_dir, &fake.url(), "api-token", push);
    let proxy_url = format!("http://127.0.0.1:{}", proxy.port);
    let mut command = std::process::Command::new(crate::support::bin());
    command.args(["push", "--config"]).arg(&agent_config);
    let env = [
        ("HTTPS_PROXY", proxy_url.as_str()),
        ("NO_PROXY", ""),
        ("no_proxy", ""),
    ];
    let _agent = Binary::spawn_outbound(command, &agent_config, &env);

    crate::support::eventually("a push through the proxy is accepted", || async {
        edge.status().await["push"][0]["last_accepted_kid"] == "proxied"
    })
    .await;
    assert!(fake.jwks_requests() > 0, "the agent read the apiserver");
    let connects = proxy.connects();
    assert!(!connects.is_empty(), "no CONNECT logged");
    let edge_target = format!("localhost:{}", https.port());
    assert!(
        connects.iter().all(|c| *c == edge_target),
        "only the edge goes through the proxy, not the apiserver at {}: {connects:?}",
        fake.addr
    );
}
