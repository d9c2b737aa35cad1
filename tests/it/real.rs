//! The walkthrough of the shared seed (k3s issuer → hosted discovery and JWKS → AWS STS
//! `AssumeRoleWithWebIdentity` → S3), with real parts instead of fakes: a Kubernetes 1.20
//! kube-apiserver signs the service-account tokens, oidc-edge (in process) publishes its keys
//! over HTTPS for `https://oidc.example.test`, and SeaweedFS's STS fetches that discovery
//! document and JWKS to verify the tokens, then its S3 takes the temporary credentials.
//! How SeaweedFS reaches `oidc.example.test` without a port is in `support/real.rs`.
//!
//! The apiserver keeps k3s's own API audiences (facts §4), so a token minted without
//! `--audience sts.amazonaws.com` carries the cluster's audiences, the mistake the seed warns
//! about; oidc-edge reads the apiserver with such a token, as a reader SA bound to
//! `system:service-account-issuer-discovery`, never with one STS would take.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::clients::{get, trusting};
use crate::support::inprocess::InProcess;
use crate::support::metrics::{metric, scrape};
use crate::support::pki::Pki;
use crate::support::real::sigv4::Credentials;
use crate::support::real::{
    BUCKET, Bins, Cluster, ISSUER, ISSUER_HOST, LISTER, LISTER_NAMESPACE, READER, READER_NAMESPACE,
    STS_AUDIENCE, SaKey, Seaweed, StsError, claims, kid, serve_https,
};
use crate::support::{Scratch, kids};

/// The whole chain, dropped front to back: SeaweedFS before the oidc-edge its bridge
/// reaches, oidc-edge before the apiserver it reads.
struct Walkthrough {
    seaweed: Seaweed,
    server: InProcess,
    cluster: Cluster,
    pki: Pki,
    scratch: Scratch,
}

impl Walkthrough {
    /// An apiserver for [`ISSUER`] signing with `key`; the reader SA, `s3-lister` and `other`;
    /// oidc-edge reading the apiserver every second and serving HTTPS with a certificate for
    /// `oidc.example.test` from a test CA; SeaweedFS trusting that CA.
    async fn start(bins: &Bins, key: &SaKey) -> Self {
        let cluster = Cluster::start(bins, ISSUER, &[key], key).await;
        let reader_token = cluster.bound_reader_token().await;
        for sa in [LISTER, "other"] {
            cluster.create_service_account(LISTER_NAMESPACE, sa).await;
        }
        let scratch = Scratch::new();
        let pki = Pki::new("oidc-edge real-parts test CA");
        let server = serve_https(&cluster, ISSUER, &reader_token, &pki, &scratch).await;
        let seaweed = Seaweed::start(bins, server.https(), &pki.ca_pem).await;
        Self {
            seaweed,
            server,
            cluster,
            pki,
            scratch,
        }
    }

    /// `path` from oidc-edge's HTTPS listener as `https://oidc.example.test`.
    async fn public(&self, path: &str) -> (u16, String) {
        let http = trusting(&self.pki.ca_pem)
            .resolve(ISSUER_HOST, self.server.https())
            .build()
            .expect("client");
        let url = format!("https://{ISSUER_HOST}:{}{path}", self.server.https().port());
        let response = http.get(url).send().await.expect("GET");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// A token for `default/sa` with `audiences` (empty: the apiserver's own).
    async fn token(&self, sa: &str, audiences: &[&str]) -> String {
        self.cluster.token(LISTER_NAMESPACE, sa, audiences).await
    }

    /// Requests oidc-edge answered with 200 for `document` (`discovery`, `jwks`).
    async fn served(&self, document: &str) -> f64 {
        let scrape = scrape(self.server.admin).await;
        metric(
            &scrape,
            "oidc_edge_http_requests_total",
            &[("issuer", ISSUER), ("document", document), ("code", "200")],
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_token_from_a_real_apiserver_buys_s3_credentials_through_what_oidc_edge_publishes()
 {
    let Some(bins) = Bins::find() else { return };
    let key = SaKey::generate();
    let walk = Walkthrough::start(&bins, &key).await;

    // oidc-edge publishes exactly the apiserver's verification key.
    let (status, apiserver_jwks) = walk.cluster.get("/openid/v1/jwks").await;
    assert_eq!(status, 200, "{apiserver_jwks}");
    assert_eq!(kids(&apiserver_jwks), vec![key.kid.clone()]);
    let (status, jwks) = walk.public("/openid/v1/jwks").await;
    assert_eq!((status, kids(&jwks)), (200, vec![key.kid.clone()]));
    let (status, discovery) = walk.public("/.well-known/openid-configuration").await;
    assert_eq!(status, 200);
    let discovery: serde_json::Value = serde_json::from_str(&discovery).expect("JSON");
    assert_eq!(discovery["issuer"], ISSUER);
    assert_eq!(
        discovery["jwks_uri"],
        format!("https://{ISSUER_HOST}/openid/v1/jwks")
    );

    // The pod's projected token: audience sts.amazonaws.com (seed §5).
    let token = walk.token(LISTER, &[STS_AUDIENCE]).await;
    let claims = claims(&token);
    assert_eq!(claims["iss"], ISSUER);
    assert_eq!(claims["aud"], serde_json::json!([STS_AUDIENCE]));
    assert_eq!(claims["sub"], "system:serviceaccount:default:s3-lister");
    assert_eq!(kid(&token), key.kid);

    let before = (walk.served("discovery").await, walk.served("jwks").await);
    let credentials = walk
        .seaweed
        .assume_role(&token)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", walk.seaweed.log()));
    // Temporary credentials, as AWS hands them out.
    assert!(
        credentials.access_key_id.starts_with("ASIA"),
        "{credentials:?}"
    );
    // SeaweedFS got the key from oidc-edge: discovery, then the jwks_uri it names.
    assert!(walk.seaweed.issuer_connections() >= 1);
    assert_eq!(walk.served("discovery").await - before.0, 1.0);
    assert_eq!(walk.served("jwks").await - before.1, 1.0);

    // `aws s3 ls` and a PUT with the session credentials.
    let list = [("list-type", "2")];
    let path = format!("/{BUCKET}");
    let (status, body) = walk
        .seaweed
        .s3(&credentials, "GET", &path, &list, b"")
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<KeyCount>0</KeyCount>"), "{body}");
    let object = format!("/{BUCKET}/from-s3-lister.txt");
    let (status, body) = walk
        .seaweed
        .s3(
            &credentials,
            "PUT",
            &object,
            &[],
            b"written with web identity\n",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = walk
        .seaweed
        .s3(&credentials, "GET", &path, &list, b"")
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<Key>from-s3-lister.txt</Key>"), "{body}");
    let (status, body) = walk
        .seaweed
        .s3(&credentials, "GET", &object, &[], b"")
        .await;
    assert_eq!(
        (status, body.as_str()),
        (200, "written with web identity\n")
    );

    // The session token is part of the signature: without it the keys are worthless.
    let stripped = Credentials {
        session_token: None,
        ..credentials
    };
    let (status, body) = walk.seaweed.s3(&stripped, "GET", &path, &list, b"").await;
    assert_eq!(status, 403, "{body}");
}

/// Asserts `result` is the STS error `(status, code, message)`.
fn assert_refused(result: Result<Credentials, StsError>, expected: (u16, &str, &str)) {
    let error = result.expect_err("STS must refuse this token");
    assert_eq!(
        (error.status, error.code.as_str(), error.message.as_str()),
        expected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_refuses_other_accounts_other_audiences_and_keys_oidc_edge_never_published() {
    let Some(bins) = Bins::find() else { return };
    let key = SaKey::generate();
    let walk = Walkthrough::start(&bins, &key).await;
    let lister = walk.token(LISTER, &[STS_AUDIENCE]).await;
    // The setup works: the refusals below are about the tokens.
    walk.seaweed
        .assume_role(&lister)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", walk.seaweed.log()));

    // Another service account of the same cluster, same key and audience: only `sub` differs
    // from the token just accepted, and the trust policy's `oidc:sub` condition refuses it.
    let other = walk.token("other", &[STS_AUDIENCE]).await;
    assert_eq!(claims(&other)["sub"], "system:serviceaccount:default:other");
    assert_refused(
        walk.seaweed.assume_role(&other).await,
        (
            403,
            "AccessDenied",
            "trust policy validation failed: trust policy denies web identity assumption",
        ),
    );

    // The right account, minted without `--audience sts.amazonaws.com`.
    let cluster_audience = walk.token(LISTER, &[]).await;
    assert_eq!(
        claims(&cluster_audience)["aud"],
        serde_json::json!(["https://kubernetes.default.svc.cluster.local", "k3s"])
    );
    assert_refused(
        walk.seaweed.assume_role(&cluster_audience).await,
        (
            400,
            "InvalidParameterValue",
            "failed to validate web identity token: invalid token audience: provider: invalid \
             token audience: token audience matches none of the configured client IDs",
        ),
    );

    // Signed by a key oidc-edge never published, with the claims of the accepted token (the
    // header as Kubernetes writes it: alg and kid, no typ). Under the key's own kid, STS
    // asks oidc-edge again (a key miss refreshes the JWKS) and still does not find it.
    let foreign = SaKey::generate();
    let forge = |kid: &str| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        header.typ = None;
        let signer = jsonwebtoken::EncodingKey::from_rsa_pem(foreign.private_pem.as_bytes())
            .expect("RSA key");
        jsonwebtoken::encode(&header, &claims(&lister), &signer).expect("sign")
    };
    let jwks_before = walk.served("jwks").await;
    assert_refused(
        walk.seaweed.assume_role(&forge(&foreign.kid)).await,
        (
            403,
            "AccessDenied",
            &format!(
                "failed to validate web identity token: token validation failed with provider \
                 for issuer https://oidc.example.test: failed to get public key: key with ID {} \
                 not found in JWKS after refresh",
                foreign.kid
            ),
        ),
    );
    assert_eq!(walk.served("jwks").await - jwks_before, 1.0);
    // Under the published kid: the signature does not verify with the published key.
    assert_refused(
        walk.seaweed.assume_role(&forge(&key.kid)).await,
        (
            400,
            "InvalidParameterValue",
            "failed to validate web identity token: invalid token format: provider: invalid \
             token format: token signature is invalid: crypto/rsa: verification error",
        ),
    );
}

/// What the client saw during the rotation.
#[derive(Debug, Default)]
struct Exchanges {
    /// Fresh tokens exchanged for credentials.
    ok: usize,
    /// Fresh tokens STS refused: must stay empty.
    refused: Vec<(String, StsError)>,
    /// TokenRequests that failed because the apiserver was restarting.
    mint_gaps: usize,
    /// The kids of the tokens exchanged, in order of first use.
    kids: Vec<String>,
}

/// The kids oidc-edge serves for the issuer, sorted.
async fn public_kids(walk_https: SocketAddr, ca_pem: &str) -> Vec<String> {
    let http = trusting(ca_pem)
        .resolve(ISSUER_HOST, walk_https)
        .build()
        .expect("client");
    let url = format!("https://{ISSUER_HOST}:{}/openid/v1/jwks", walk_https.port());
    let body = http
        .get(url)
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("body");
    let mut kids = kids(&body);
    kids.sort();
    kids
}

fn sorted(kids: &[&str]) -> Vec<String> {
    let mut kids: Vec<String> = kids.iter().map(|k| (*k).to_owned()).collect();
    kids.sort();
    kids
}

/// The `/status` entry of the walkthrough's only source.
async fn source_status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = get(&format!("http://{admin}/status")).await;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    status["issuers"][0]["sources"][0].clone()
}

/// Polls `check` every 50 ms for up to 30 s and returns how long it took.
async fn time_until<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_rotation_of_the_apiserver_key_fails_no_exchange_and_old_tokens_keep_working() {
    let Some(bins) = Bins::find() else { return };
    let (old, new) = (SaKey::generate(), SaKey::generate());
    let mut walk = Walkthrough::start(&bins, &old).await;
    // A token the workload got before the rotation, valid for an hour: it must keep working
    // after the apiserver drops the old key, because oidc-edge keeps publishing it for
    // key_retention (24 h by default, X-6).
    let early = walk.token(LISTER, &[STS_AUDIENCE]).await;
    assert_eq!(kid(&early), old.kid);

    let api = walk.cluster.api();
    let done = AtomicBool::new(false);
    let Walkthrough {
        seaweed,
        server,
        cluster,
        pki,
        scratch,
    } = &mut walk;
    let (https, admin, ca) = (server.https(), server.admin, pki.ca_pem.clone());

    // The workload: a fresh token every 100 ms, exchanged at once, as a pod whose projected
    // token the kubelet refreshes would.
    let client = async {
        let mut seen = Exchanges::default();
        while !done.load(Ordering::SeqCst) {
            match api
                .try_token(LISTER_NAMESPACE, LISTER, &[STS_AUDIENCE])
                .await
            {
                Err(_) => seen.mint_gaps += 1,
                Ok(token) => {
                    let kid = kid(&token);
                    if !seen.kids.contains(&kid) {
                        seen.kids.push(kid.clone());
                    }
                    match seaweed.assume_role(&token).await {
                        Ok(_) => seen.ok += 1,
                        Err(e) => seen.refused.push((kid, e)),
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seen
    };

    let rotation = async {
        let mut figures = Vec::new();
        // 1. The new public key beside the old one; the old key still signs.
        let start = Instant::now();
        cluster.restart(&[&old, &new], &old).await;
        let ready = start.elapsed();
        let both = sorted(&[&old.kid, &new.kid]);
        let public = time_until("oidc-edge to publish the new key", || async {
            public_kids(https, &ca).await == both
        })
        .await;
        figures.push(format!(
            "add the new public key: apiserver ready {ready:.1?} after the restart began, \
             new key public at {:.1?}",
            ready + public
        ));

        // 2. The new key signs; it has been public since step 1.
        let start = Instant::now();
        cluster.restart(&[&old, &new], &new).await;
        let ready = start.elapsed();
        let api = cluster.api();
        let signing = time_until("a token signed by the new key", || async {
            api.try_token(LISTER_NAMESPACE, LISTER, &[STS_AUDIENCE])
                .await
                .is_ok_and(|token| kid(&token) == new.kid)
        })
        .await;
        figures.push(format!(
            "sign with the new key: apiserver ready {ready:.1?} after the restart began, \
             first new-key token at {:.1?}",
            ready + signing
        ));
        // 3. The old public key leaves the apiserver; oidc-edge keeps it published.
        let start = Instant::now();
        cluster.restart(&[&new], &new).await;
        let ready = start.elapsed();
        let (status, apiserver_jwks) = cluster.get("/openid/v1/jwks").await;
        assert_eq!(
            (status, kids(&apiserver_jwks)),
            (200, vec![new.kid.clone()])
        );
        // oidc-edge's own token was signed by the old key too (as a README-style Secret token
        // would be): the apiserver now refuses it, and oidc-edge keeps its last good set.
        let unauthorized = format!(
            "GET {}/openid/v1/jwks: answered 401 Unauthorized; the apiserver refused the \
             credentials (token or client certificate)",
            cluster.url()
        );
        let refused = time_until("oidc-edge's token to be refused", || async {
            let source = source_status(admin).await;
            source["healthy"] == false && source["last_error"] == unauthorized.as_str()
        })
        .await;
        assert_eq!(public_kids(https, &ca).await, both);
        // Renewed, as the kubelet renews a projected token (the file is re-read every fetch).
        let reader = api
            .try_token(READER_NAMESPACE, READER, &[])
            .await
            .expect("reader token");
        assert_eq!(kid(&reader), new.kid);
        scratch.replace("token", &reader);
        let renewed = time_until("oidc-edge to read the apiserver again", || async {
            source_status(admin).await["healthy"] == true
        })
        .await;
        assert_eq!(public_kids(https, &ca).await, both);
        figures.push(format!(
            "drop the old public key: apiserver ready {ready:.1?} after the restart began, \
             oidc-edge's old-key token refused at {:.1?}, its renewed token read {renewed:.1?} \
             after the renewal; both keys still public (retention)",
            ready + refused
        ));
        // Let the workload run on the final configuration for a moment.
        tokio::time::sleep(Duration::from_secs(2)).await;
        done.store(true, Ordering::SeqCst);
        figures
    };

    let (seen, figures) = tokio::join!(client, rotation);
    for line in &figures {
        eprintln!("rotation: {line}");
    }
    eprintln!(
        "rotation: {} exchanges, {} refused, {} TokenRequests failed during restarts",
        seen.ok,
        seen.refused.len(),
        seen.mint_gaps
    );
    assert_eq!(seen.refused, Vec::new(), "\n{}", seaweed.log());
    assert_eq!(seen.kids, vec![old.kid.clone(), new.kid.clone()]);
    assert!(seen.ok >= 10, "{seen:?}");

    // The token minted before the rotation still buys credentials.
    seaweed
        .assume_role(&early)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
}

/// Mints a fresh `s3-lister` token every 100 ms and exchanges it at once, until STS accepts
/// one or `limit` has passed; returns the refusals seen before, and how long until the
/// acceptance (`None`: none within `limit`).
async fn exchange_until_accepted(
    api: &crate::support::real::Api,
    seaweed: &Seaweed,
    limit: Duration,
) -> (Vec<StsError>, Option<Duration>) {
    let start = Instant::now();
    let mut refused = Vec::new();
    while start.elapsed() < limit {
        if let Ok(token) = api
            .try_token(LISTER_NAMESPACE, LISTER, &[STS_AUDIENCE])
            .await
        {
            match seaweed.assume_role(&token).await {
                Ok(_) => return (refused, Some(start.elapsed())),
                Err(e) => refused.push(e),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (refused, None)
}

/// The rotation the staged one avoids (real-parts §1): the old pair removed at once. Fresh tokens
/// fail at STS until oidc-edge publishes the new key, and oidc-edge cannot read it while its own
/// service-account token is signed by the removed key; in a cluster the kubelet renews a
/// projected token at 80 % of its lifetime, not on a key change, so the test renews it as that
/// renewal would, and measures from there. The figures are printed (`--nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abrupt_rotation_refuses_new_key_tokens_until_oidc_edge_reads_the_new_key_and_keeps_the_old_key_published()
 {
    let Some(bins) = Bins::find() else { return };
    let (old, new) = (SaKey::generate(), SaKey::generate());
    let mut walk = Walkthrough::start(&bins, &old).await;
    let early = walk.token(LISTER, &[STS_AUDIENCE]).await;
    walk.seaweed
        .assume_role(&early)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", walk.seaweed.log()));
    let (https, admin, ca) = (
        walk.server.https(),
        walk.server.admin,
        walk.pki.ca_pem.clone(),
    );

    // The abrupt rotation: the apiserver restarts with only the new pair, so every token it
    // mints from now on is signed by a key nobody has published yet, and the tokens it
    // minted before, oidc-edge's own included, no longer authenticate to it.
    let start = Instant::now();
    walk.cluster.restart(&[&new], &new).await;
    let ready = start.elapsed();
    let api = walk.cluster.api();
    let unauthorized = format!(
        "GET {}/openid/v1/jwks: answered 401 Unauthorized; the apiserver refused the \
         credentials (token or client certificate)",
        walk.cluster.url()
    );
    let refused_at = time_until("oidc-edge's old-key token to be refused", || async {
        let source = source_status(admin).await;
        source["healthy"] == false && source["last_error"] == unauthorized.as_str()
    })
    .await;

    // Until oidc-edge's credential is renewed it cannot read the new key: every fresh token
    // is refused, although STS asks oidc-edge again on each unknown kid.
    let jwks_before = walk.served("jwks").await;
    let stale = Duration::from_secs(3);
    let (refused, accepted) = exchange_until_accepted(&api, &walk.seaweed, stale).await;
    assert_eq!(
        accepted, None,
        "a new-key token was accepted before oidc-edge had the key"
    );
    let not_found = StsError {
        status: 403,
        code: "AccessDenied".to_owned(),
        message: format!(
            "failed to validate web identity token: token validation failed with provider for \
             issuer https://oidc.example.test: failed to get public key: key with ID {} not \
             found in JWKS after refresh",
            new.kid
        ),
    };
    assert!(!refused.is_empty());
    assert!(refused.iter().all(|e| *e == not_found), "{refused:#?}");
    let refetched = walk.served("jwks").await - jwks_before;
    assert_eq!(refetched, refused.len() as f64);
    assert_eq!(public_kids(https, &ca).await, vec![old.kid.clone()]);

    // The renewal, as the kubelet renews a projected token (the file is re-read every fetch).
    let reader = api
        .try_token(READER_NAMESPACE, READER, &[])
        .await
        .expect("reader token");
    assert_eq!(kid(&reader), new.kid);
    walk.scratch.replace("token", &reader);
    let both = sorted(&[&old.kid, &new.kid]);
    let api_task = api.clone();
    let (published, (refused_after, accepted)) = tokio::join!(
        time_until("oidc-edge to publish the new key", || async {
            public_kids(https, &ca).await == both
        }),
        exchange_until_accepted(&api_task, &walk.seaweed, Duration::from_secs(10)),
    );
    let accepted = accepted.unwrap_or_else(|| {
        panic!(
            "no new-key token accepted within 10 s of the renewal: {refused_after:#?}\n{}",
            walk.seaweed.log()
        )
    });
    eprintln!(
        "abrupt rotation: apiserver ready {ready:.1?} after the restart began; oidc-edge's \
         old-key token refused {refused_at:.1?} later; {} fresh new-key tokens refused in {stale:?} \
         while its token was stale ({refetched} JWKS refetches by STS, each without the new key); \
         after the renewal: new key public in {published:.1?}, first new-key token accepted \
         in {accepted:.1?} ({} refused before it)",
        refused.len(),
        refused_after.len()
    );
    // Recovery within a few seconds of the renewal: one refresh_interval (1 s) for oidc-edge,
    // then STS refetches the JWKS on the unknown kid.
    assert!(accepted < Duration::from_secs(5), "{accepted:?}");
    assert!(
        refused_after.iter().all(|e| *e == not_found),
        "{refused_after:#?}"
    );

    // The old key stays published for key_retention (24 h by default, X-6), though the
    // apiserver no longer has it: the workload's pre-rotation token still buys credentials.
    let (status, apiserver_jwks) = walk.cluster.get("/openid/v1/jwks").await;
    assert_eq!(
        (status, kids(&apiserver_jwks)),
        (200, vec![new.kid.clone()])
    );
    assert_eq!(public_kids(https, &ca).await, both);
    walk.seaweed
        .assume_role(&early)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
}
