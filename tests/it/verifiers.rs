//! Independent relying parties verify real tokens against what oidc-edge publishes (shared
//! notes real-parts.md §3): a Kubernetes 1.20 kube-apiserver signs TokenRequest tokens,
//! oidc-edge (in process) publishes its keys over HTTPS, and Envoy's `jwt_authn` (JWKS only)
//! and Apache's mod_oauth2 (discovery, then JWKS) fetch them through the public URL and decide.
//! How they reach `oidc.example.test` is in `support/real/relying.rs`.
//!
//! Each is configured as its documentation says for a Kubernetes issuer: the issuer, the
//! audience `sts.amazonaws.com`, and the URL oidc-edge publishes. The refusals use tokens that
//! differ from the accepted one in one respect: the audience (minted by the same apiserver
//! without `--audience`), the issuer (the path added or removed, signed with the published key
//! itself), or the key (one oidc-edge never published, under its own kid or the published one).

use std::net::SocketAddr;

use crate::support::clients::trusting;
use crate::support::inprocess::InProcess;
use crate::support::metrics::{metric, scrape};
use crate::support::pki::Pki;
use crate::support::real::relying::{Apache, Envoy, RelyingBins};
use crate::support::real::{
    Bins, Cluster, ISSUER, ISSUER_HOST, LISTER, LISTER_NAMESPACE, STS_AUDIENCE, SaKey, claims, kid,
    serve_https,
};
use crate::support::{Scratch, kids};

/// An apiserver for `issuer`, oidc-edge publishing it over HTTPS; dropped front to back.
struct Published {
    server: InProcess,
    cluster: Cluster,
    pki: Pki,
    _scratch: Scratch,
    issuer: String,
}

impl Published {
    async fn start(bins: &Bins, issuer: &str, key: &SaKey) -> Self {
        // The apiserver's `--service-account-issuer` is the issuer as relying parties know it,
        // path included: it is the `iss` of every token (facts §1).
        let cluster = Cluster::start(bins, issuer, &[key], key).await;
        let reader_token = cluster.bound_reader_token().await;
        cluster
            .create_service_account(LISTER_NAMESPACE, LISTER)
            .await;
        let scratch = Scratch::new();
        let pki = Pki::new("oidc-edge relying-party test CA");
        let server = serve_https(&cluster, issuer, &reader_token, &pki, &scratch).await;
        Self {
            server,
            cluster,
            pki,
            _scratch: scratch,
            issuer: issuer.to_owned(),
        }
    }

    fn https(&self) -> SocketAddr {
        self.server.https()
    }

    /// The issuer's path (`""` or `/cluster-a`).
    fn prefix(&self) -> &str {
        self.issuer
            .strip_prefix(&format!("https://{ISSUER_HOST}"))
            .expect("issuer on oidc.example.test")
    }

    /// `path` under the issuer from oidc-edge's HTTPS listener, as `https://oidc.example.test`.
    async fn public(&self, path: &str) -> (u16, String) {
        let http = trusting(&self.pki.ca_pem)
            .resolve(ISSUER_HOST, self.https())
            .build()
            .expect("client");
        let url = format!(
            "https://{ISSUER_HOST}:{}{}{path}",
            self.https().port(),
            self.prefix()
        );
        let response = http.get(url).send().await.expect("GET");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// Requests oidc-edge answered with 200 for `document` (`discovery`, `jwks`).
    async fn served(&self, document: &str) -> f64 {
        let scrape = scrape(self.server.admin).await;
        metric(
            &scrape,
            "oidc_edge_http_requests_total",
            &[
                ("issuer", self.issuer.as_str()),
                ("document", document),
                ("code", "200"),
            ],
        )
    }
}

/// The tokens each relying party is shown.
struct Tokens {
    /// From the apiserver, audience `sts.amazonaws.com`: accepted.
    good: String,
    /// From the apiserver, its own audiences (no `--audience`).
    other_audience: String,
    /// The good token's claims with another `iss`, signed by the published key under its kid:
    /// the same host with the path differing (`/cluster-a` added, or removed), the mistake a
    /// path-prefixed issuer invites.
    other_issuer: String,
    /// The good token's claims signed by a key oidc-edge never published, under that key's kid.
    unpublished_key: String,
    /// The same, under the published kid: the signature does not verify with the published key.
    published_kid: String,
}

/// `claims` signed by `key`, under `kid`.
fn sign(key: &SaKey, kid: &str, claims: &serde_json::Value) -> String {
    // The header as Kubernetes writes it: alg and kid, no typ.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    header.typ = None;
    let signer =
        jsonwebtoken::EncodingKey::from_rsa_pem(key.private_pem.as_bytes()).expect("RSA key");
    jsonwebtoken::encode(&header, claims, &signer).expect("sign")
}

impl Tokens {
    async fn mint(published: &Published, key: &SaKey) -> Self {
        let cluster = &published.cluster;
        let good = cluster
            .token(LISTER_NAMESPACE, LISTER, &[STS_AUDIENCE])
            .await;
        let good_claims = claims(&good);
        assert_eq!(good_claims["iss"], published.issuer.as_str());
        assert_eq!(good_claims["aud"], serde_json::json!([STS_AUDIENCE]));
        assert_eq!(kid(&good), key.kid);
        let other_audience = cluster.token(LISTER_NAMESPACE, LISTER, &[]).await;
        assert_eq!(
            claims(&other_audience)["aud"],
            serde_json::json!(["https://kubernetes.default.svc.cluster.local", "k3s"])
        );
        let mut forged = good_claims.clone();
        forged["iss"] = if published.prefix().is_empty() {
            format!("{ISSUER}/cluster-a")
        } else {
            ISSUER.to_owned()
        }
        .into();
        let other_issuer = sign(key, &key.kid, &forged);
        let foreign = SaKey::generate();
        let unpublished_key = sign(&foreign, &foreign.kid, &good_claims);
        let published_kid = sign(&foreign, &key.kid, &good_claims);
        Self {
            good,
            other_audience,
            other_issuer,
            unpublished_key,
            published_kid,
        }
    }
}

/// Envoy and mod_oauth2 against oidc-edge publishing `issuer`.
async fn both_verify(issuer: &str) {
    let Some(bins) = Bins::find() else { return };
    let Some(relying) = RelyingBins::find() else {
        return;
    };
    let key = SaKey::generate();
    let published = Published::start(&bins, issuer, &key).await;
    let prefix = published.prefix().to_owned();

    // What oidc-edge publishes for this issuer, at the issuer's path.
    let (status, discovery) = published.public("/.well-known/openid-configuration").await;
    assert_eq!(status, 200, "{discovery}");
    let discovery: serde_json::Value = serde_json::from_str(&discovery).expect("JSON");
    let jwks_uri = format!("https://{ISSUER_HOST}{prefix}/openid/v1/jwks");
    assert_eq!(discovery["issuer"], issuer);
    assert_eq!(discovery["jwks_uri"], jwks_uri.as_str());
    let (status, jwks) = published.public("/openid/v1/jwks").await;
    assert_eq!((status, kids(&jwks)), (200, vec![key.kid.clone()]));
    let tokens = Tokens::mint(&published, &key).await;

    // Envoy: JWKS only (remote_jwks.http_uri), issuer and audiences in the provider.
    let envoy = Envoy::start(
        &relying,
        issuer,
        STS_AUDIENCE,
        &jwks_uri,
        published.https(),
        &published.pki.ca_pem,
    )
    .await;
    let jwks_before = published.served("jwks").await;
    assert_eq!(
        envoy.get(Some(&tokens.good)).await,
        (200, "verified\n".to_owned()),
        "{}",
        envoy.log()
    );
    assert_eq!(published.served("jwks").await - jwks_before, 1.0);
    let refused = [
        (None, 401, "Jwt is missing"),
        (
            Some(&tokens.other_audience),
            403,
            "Audiences in Jwt are not allowed",
        ),
        (
            Some(&tokens.other_issuer),
            401,
            "Jwt issuer is not configured",
        ),
        (
            Some(&tokens.unpublished_key),
            401,
            "Jwks doesn't have key to match kid or alg from Jwt",
        ),
        (Some(&tokens.published_kid), 401, "Jwt verification fails"),
    ];
    for (token, status, body) in refused {
        assert_eq!(
            envoy.get(token.map(String::as_str)).await,
            (status, body.to_owned()),
            "{}",
            envoy.log()
        );
    }
    drop(envoy);

    // mod_oauth2: discovery, then the jwks_uri it names; iss and aud by `Require oauth2_claim`.
    let discovery_url = format!("{issuer}/.well-known/openid-configuration");
    let apache = Apache::start(
        &relying,
        issuer,
        STS_AUDIENCE,
        &discovery_url,
        published.https(),
        &published.pki.ca_pem,
    )
    .await;
    let before = (
        published.served("discovery").await,
        published.served("jwks").await,
    );
    let (status, body) = apache.get(Some(&tokens.good)).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "verified\n"),
        "{}",
        apache.log()
    );
    assert!(apache.issuer_connections() >= 1);
    assert_eq!(published.served("discovery").await - before.0, 1.0);
    assert_eq!(published.served("jwks").await - before.1, 1.0);
    // httpd answers every refusal with the same 401 page; its error log says which step
    // refused: authorization (the `Require oauth2_claim` lines) for a verified token with
    // another audience or issuer, the signature check for another key under the published
    // kid, and nothing at this log level for a missing token or an unknown kid.
    let authz = [
        "AH01631: user system:serviceaccount:default:s3-lister: authorization failure \
                  for \"/ok\": ",
    ];
    // OpenSSL's reason depends on the forged signature: as a number it is larger than the
    // published modulus about half the time.
    let signature = [
        "_oauth2_jose_jwt_verify_jwk: cjose_jws_verify failed: [jws.c:968 \
         _cjose_jws_verify_sig_rs error:02000072:rsa routines::padding check failed]",
        "_oauth2_jose_jwt_verify_jwk: cjose_jws_verify failed: [jws.c:968 \
         _cjose_jws_verify_sig_rs error:02000084:rsa routines::data too large for modulus]",
    ];
    for (what, token, logged) in [
        ("no token", None, None),
        (
            "another audience",
            Some(&tokens.other_audience),
            Some(&authz[..]),
        ),
        (
            "another issuer",
            Some(&tokens.other_issuer),
            Some(&authz[..]),
        ),
        ("an unpublished key", Some(&tokens.unpublished_key), None),
        (
            "another key under the published kid",
            Some(&tokens.published_kid),
            Some(&signature[..]),
        ),
    ] {
        let lines_before = apache.error_log().len();
        let (status, _) = apache.get(token.map(String::as_str)).await;
        assert_eq!(status, 401, "{what}\n{}", apache.log());
        let new_lines = apache.error_log().split_off(lines_before);
        let messages: Vec<&str> = new_lines
            .iter()
            .map(|line| line.split_once("] ").map_or("", |(_, rest)| rest))
            .map(|rest| rest.rsplit_once("] ").map_or(rest, |(_, message)| message))
            .collect();
        match logged {
            None => assert_eq!(messages, Vec::<&str>::new(), "{what}"),
            Some(expected) => assert!(
                !messages.is_empty() && messages.iter().all(|m| expected.contains(m)),
                "{what}: {new_lines:#?}"
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_mod_oauth2_accept_a_real_token_for_a_plain_issuer_and_refuse_another_audience_issuer_or_key()
 {
    both_verify(ISSUER).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_mod_oauth2_accept_a_real_token_for_a_path_prefixed_issuer_and_refuse_another_audience_issuer_or_key()
 {
    both_verify(&format!("{ISSUER}/cluster-a")).await;
}
