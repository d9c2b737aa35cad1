//! `oidc-edge publish` against a real S3 store (SeaweedFS, which checks SigV4), with a tap in
//! front of it that records what the publisher sends (support/s3tap.rs).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use crate::support::config::TestConfig;
use crate::support::process::Binary;
use crate::support::real::{BUCKET, Bins, Seaweed};
use crate::support::s3tap::{Mode, S3Tap, Seen, puts};
use crate::support::{K3S, PRIVATE_RSA, ROTATED, Scratch, bin, kids};

const JWKS_KEY: &str = "site/openid/v1/jwks";
const DISCOVERY_KEY: &str = "site/.well-known/openid-configuration";

/// SeaweedFS behind a tap, and a scratch dir with a publisher's keys in files.
struct Store {
    tap: S3Tap,
    seaweed: Seaweed,
    scratch: Scratch,
}

impl Store {
    async fn start(bins: &Bins) -> Self {
        // No STS exchange here: the issuer bridge is never used.
        let unused_issuer = "127.0.0.1:9".parse().expect("addr");
        let seaweed = Seaweed::start(bins, unused_issuer, "").await;
        let scratch = Scratch::new();
        // A trailing newline, as `echo` and most secret files have: it must not count.
        scratch.write("key-id", &format!("{}\n", seaweed.publisher.access_key_id));
        scratch.write("secret", &seaweed.publisher.secret_access_key);
        scratch.write("jwks.json", K3S);
        Self {
            tap: S3Tap::start(seaweed.s3),
            seaweed,
            scratch,
        }
    }

    /// The target `s3://docs/site` through the tap, with the publisher's key files.
    fn target(&self) -> toml::Table {
        let mut target = toml::Table::new();
        for (key, value) in [
            ("to", format!("s3://{BUCKET}/site")),
            ("endpoint", self.tap.url()),
            ("access_key_id_file", "key-id".to_owned()),
            ("secret_access_key_file", "secret".to_owned()),
            ("timeout", "2s".to_owned()),
        ] {
            target.insert(key.to_owned(), value.into());
        }
        target
    }

    /// The default config (file source `jwks.json`) with `target`.
    fn config(&self, target: toml::Table) -> PathBuf {
        TestConfig::file_source("1s")
            .publish(target)
            .write(&self.scratch)
    }

    /// `oidc-edge publish --once` on `config`, with no AWS variables from the test's
    /// environment.
    fn publish_once(&self, config: &std::path::Path) -> Output {
        Command::new(bin())
            .args(["publish", "--once", "--config"])
            .arg(config)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .output()
            .expect("run oidc-edge publish")
    }

    async fn object(&self, key: &str) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
        self.seaweed.object(key).await
    }
}

/// Waits until the publisher's `/status` at `admin` contains `needle`.
async fn status_shows(admin: &str, what: &str, needle: &str) {
    crate::support::eventually(what, || async {
        let (_, body) = crate::support::clients::get(admin).await;
        body.contains(needle)
    })
    .await;
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The R2 trap (s3-publish-facts §3): R2 answers 501 to `x-amz-checksum-*` headers and
/// refuses a second checksum beside Content-MD5; a publisher must send neither.
fn assert_no_checksum_headers(seen: &[Seen]) {
    for request in seen {
        for (name, _) in &request.headers {
            assert!(
                !name.starts_with("x-amz-checksum-")
                    && name != "x-amz-sdk-checksum-algorithm"
                    && name != "content-md5",
                "{} {} sent {name}",
                request.method,
                request.path
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_once_writes_serves_bytes_jwks_first_then_nothing_then_only_what_rotated() {
    let Some(bins) = Bins::find() else { return };
    let store = Store::start(&bins).await;
    let config = store.config(store.target());

    // First run: both objects, the JWKS first.
    let out = store.publish_once(&config);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("s3://{BUCKET}/{JWKS_KEY}: written\ns3://{BUCKET}/{DISCOVERY_KEY}: written\n")
    );
    let seen = store.tap.take();
    assert_eq!(
        puts(&seen),
        [
            format!("PUT /{BUCKET}/{JWKS_KEY}"),
            format!("PUT /{BUCKET}/{DISCOVERY_KEY}")
        ]
    );
    assert_no_checksum_headers(&seen);
    let put = seen.iter().find(|s| s.method == "PUT").expect("a PUT");
    assert_eq!(put.header("content-type"), Some("application/json"));
    assert_eq!(put.header("cache-control"), Some("public, max-age=300"));
    assert_eq!(
        put.header("x-amz-meta-sha256").map(str::len),
        Some(64),
        "{put:?}"
    );

    // What the bucket holds is what `serve` answers on the same config and state.
    let mut serve_config = TestConfig::file_source("1s");
    serve_config = serve_config.set("state.dir", "state");
    let serve_path = store.scratch.write("serve.toml", &serve_config.text());
    let server = Binary::start(&serve_path);
    let http = crate::support::clients::client();
    for (key, path) in [
        (JWKS_KEY, "/openid/v1/jwks"),
        (DISCOVERY_KEY, "/.well-known/openid-configuration"),
    ] {
        let served = http.get(server.url(path)).send().await.expect("GET");
        let served_headers = served.headers().clone();
        let served_body = served.bytes().await.expect("body").to_vec();
        let (status, headers, body) = store.object(key).await;
        assert_eq!(status, 200, "{key}: {}", text(&body));
        assert_eq!(body, served_body, "{key}");
        for name in ["content-type", "cache-control"] {
            assert_eq!(headers.get(name), served_headers.get(name), "{key}: {name}");
        }
    }
    drop(server);

    // Second run: nothing to write, no PUT at all.
    let out = store.publish_once(&config);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("s3://{BUCKET}/{JWKS_KEY}: unchanged\ns3://{BUCKET}/{DISCOVERY_KEY}: unchanged\n")
    );
    assert_eq!(puts(&store.tap.take()), Vec::<String>::new());

    // A rotation upstream: only the JWKS changes (same algorithms, same discovery document),
    // and the key that left upstream stays published for key_retention, across processes.
    store.scratch.replace("jwks.json", ROTATED);
    let out = store.publish_once(&config);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("s3://{BUCKET}/{JWKS_KEY}: written\ns3://{BUCKET}/{DISCOVERY_KEY}: unchanged\n")
    );
    let seen = store.tap.take();
    assert_eq!(puts(&seen), [format!("PUT /{BUCKET}/{JWKS_KEY}")]);
    assert_no_checksum_headers(&seen);
    let (_, _, body) = store.object(JWKS_KEY).await;
    let mut want = kids(K3S);
    want.extend(kids(ROTATED));
    want.sort();
    want.dedup();
    let mut got = kids(&text(&body));
    got.sort();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_set_is_never_written_and_the_bucket_keeps_the_last_good_one() {
    let Some(bins) = Bins::find() else { return };
    let store = Store::start(&bins).await;
    let config = store.config(store.target());
    let out = store.publish_once(&config);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let (_, _, good) = store.object(JWKS_KEY).await;
    store.tap.take();

    store.scratch.replace("jwks.json", PRIVATE_RSA);
    let out = store.publish_once(&config);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("PRIVATE KEY MATERIAL"),
        "the refusal says why: {stderr}"
    );
    assert_eq!(text(&out.stdout), "");
    assert!(
        store.tap.take().is_empty(),
        "not even a HEAD went to the store"
    );
    let (status, _, body) = store.object(JWKS_KEY).await;
    assert_eq!((status, body), (200, good));
}

/// What the store does wrong (the tap's mode and the target keys changed), and a piece of
/// the one line the publisher must say about it.
type Case = (
    &'static str,
    Mode,
    Vec<(&'static str, String)>,
    &'static str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_failures_are_one_line_naming_the_object_and_the_next_run_recovers() {
    let Some(bins) = Bins::find() else { return };
    let store = Store::start(&bins).await;
    let closed = crate::support::pebble::free_tcp_port();
    store.scratch.write("wrong-secret", "not-the-secret");
    let cases: [Case; 5] = [
        (
            "bad credentials",
            Mode::Pass,
            vec![("secret_access_key_file", "wrong-secret".to_owned())],
            "403 Forbidden",
        ),
        (
            "a missing bucket",
            Mode::Pass,
            vec![("to", "s3://no-such-bucket/site".to_owned())],
            "s3://no-such-bucket/site/openid/v1/jwks",
        ),
        (
            "an unreachable endpoint",
            Mode::Pass,
            vec![("endpoint", format!("http://127.0.0.1:{closed}"))],
            "error sending request",
        ),
        (
            "a 500",
            Mode::Fail500,
            vec![],
            "after 2 retries, max_retries: 2, retry_timeout: 2s - Server returned non-2xx status code: 500 Internal Server Error",
        ),
        ("a hang", Mode::Hang, vec![], "timed out"),
    ];
    for (what, mode, changes, reason) in cases {
        let mut target = store.target();
        for (key, value) in changes {
            target.insert(key.to_owned(), value.into());
        }
        let config = store.config(target);
        store.tap.set_mode(mode);
        let started = std::time::Instant::now();
        let out = store.publish_once(&config);
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(1), "{what}: {}", text(&out.stderr));
        let stderr = text(&out.stderr);
        let line = stderr
            .lines()
            .find(|l| l.starts_with("oidc-edge: s3://"))
            .unwrap_or_else(|| panic!("{what}: no line naming the object: {stderr}"));
        assert!(line.contains(reason), "{what}: {line}");
        assert!(line.contains("openid/v1/jwks"), "{what}: {line}");
        assert_eq!(text(&out.stdout), "", "{what}");
        // Bounded by the target's timeout (2 s per request, retries included): never a hang.
        assert!(
            took < std::time::Duration::from_secs(30),
            "{what}: {took:?}"
        );
        // Nothing partial: the discovery document is never written before the JWKS.
        let (status, _, _) = store.object(DISCOVERY_KEY).await;
        assert_eq!(status, 404, "{what}");
        store.tap.set_mode(Mode::Pass);
    }
    // The store recovers: the next run publishes.
    let out = store.publish_once(&store.config(store.target()));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let (status, _, body) = store.object(DISCOVERY_KEY).await;
    assert_eq!(status, 200, "{}", text(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_long_running_publisher_follows_a_rotation_and_reports_each_target() {
    let Some(bins) = Bins::find() else { return };
    let store = Store::start(&bins).await;
    // A publisher only: no [http], so nothing public is bound.
    let mut config = TestConfig::file_source("100ms").publish(store.target());
    config = config.remove("http");
    let path = config.write(&store.scratch);
    let publisher = Binary::start_publisher(&path);

    let holds = |want: Vec<String>| {
        let store = &store;
        async move {
            let (status, _, body) = store.object(JWKS_KEY).await;
            status == 200 && {
                let mut got = kids(&text(&body));
                got.sort();
                got == want
            }
        }
    };
    let mut want = kids(K3S);
    want.sort();
    crate::support::eventually("the bucket holds the first key set", || holds(want.clone())).await;
    // The JWKS is written before the discovery document, so the discovery document may
    // still be on its way when the JWKS is seen.
    crate::support::eventually("the bucket holds the discovery document", || async {
        store.object(DISCOVERY_KEY).await.0 == 200
    })
    .await;
    // And the attempt ends with a read-back of each: the store must not fail before the
    // publisher has recorded it (a loaded CI machine saw the read-back fail, and the first
    // set counted as an error).
    let admin = publisher.admin_url("/status");
    status_shows(
        &admin,
        "the publisher records the first set",
        "\"last_success_at\": 1",
    )
    .await;

    // The store fails while a rotation comes in: the status says so, by target; the bucket
    // keeps the first set, whole.
    store.tap.set_mode(Mode::Fail500);
    store.scratch.replace("jwks.json", ROTATED);
    status_shows(
        &admin,
        "the status reports the failing store",
        "500 Internal Server Error",
    )
    .await;
    assert!(holds(want.clone()).await);

    // The store recovers: the rotation reaches the bucket without a restart, the old key
    // retained.
    store.tap.set_mode(Mode::Pass);
    want.extend(kids(ROTATED));
    want.sort();
    want.dedup();
    crate::support::eventually("the bucket holds the rotated set", || holds(want.clone())).await;
    // The run reports after it has looked at the discovery document too, a moment after the
    // JWKS is visible in the bucket.
    status_shows(
        &admin,
        "the status reports the recovered target",
        "\"last_error\": null",
    )
    .await;

    let (_, status) = crate::support::clients::get(&admin).await;
    let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    let target = &status["publish"][0];
    assert_eq!(target["issuer"], crate::support::config::ISSUER);
    assert_eq!(target["to"], format!("s3://{BUCKET}/site"));
    assert_eq!(target["last_error"], serde_json::Value::Null, "{status:#}");
    assert_eq!(
        target["last_written"],
        serde_json::json!([format!("s3://{BUCKET}/{JWKS_KEY}")])
    );
    assert!(target["last_success_at"].as_u64().is_some(), "{status:#}");
    let scrape = crate::support::metrics::scrape(publisher.admin).await;
    let labels = [
        ("issuer", crate::support::config::ISSUER),
        ("target", "s3://docs/site"),
    ];
    let count = |result| {
        crate::support::metrics::metric(
            &scrape,
            "oidc_edge_publishes_total",
            &[labels[0], labels[1], ("result", result)],
        )
    };
    assert_eq!(count("written"), 2.0, "the first set, then the rotation");
    assert!(count("error") >= 1.0);
    // Both documents first, then the JWKS alone.
    let objects =
        crate::support::metrics::metric(&scrape, "oidc_edge_published_objects_total", &labels);
    assert_eq!(objects, 3.0);

    // A restart while the source is down loses nothing: the persisted set (with the retained
    // key) is what the new process publishes, and the bucket is left as it is.
    let mut publisher = publisher;
    publisher.signal("TERM");
    assert_eq!(
        publisher.wait_exit(std::time::Duration::from_secs(15)),
        Some(0)
    );
    std::fs::remove_file(store.scratch.path("jwks.json")).expect("the source goes away");
    store.tap.take();
    let restarted = Binary::start_publisher(&path);
    let admin = restarted.admin_url("/status");
    status_shows(
        &admin,
        "the restarted publisher checks the bucket",
        "\"last_success_at\": 1",
    )
    .await;
    assert!(holds(want.clone()).await);
    assert_eq!(puts(&store.tap.take()), Vec::<String>::new());
}

/// `serve` with a target keeps the bucket as a warm standby beside its own listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_a_target_keeps_the_bucket_in_step_too() {
    let Some(bins) = Bins::find() else { return };
    let store = Store::start(&bins).await;
    let config = store.config(store.target());
    let server = Binary::start(&config);
    let (status, body) = crate::support::clients::get(&server.url("/openid/v1/jwks")).await;
    assert_eq!(status, 200);
    crate::support::eventually("the bucket holds what serve answers", || {
        let (store, body) = (&store, body.clone());
        async move {
            let (status, _, held) = store.object(JWKS_KEY).await;
            status == 200 && held == body.as_bytes()
        }
    })
    .await;
}

#[test]
fn serve_refuses_a_config_that_only_publishes_and_publish_one_without_targets() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    let mut target = toml::Table::new();
    target.insert("to".to_owned(), "s3://bucket".into());
    let only_publishes = TestConfig::file_source("1s")
        .publish(target)
        .remove("http")
        .write(&scratch);
    let out = crate::support::process::run(&[
        "serve",
        "--config",
        only_publishes.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        text(&out.stderr),
        format!(
            "oidc-edge: {}: http: no listener is configured; this configuration only publishes to buckets or pushes to an edge: run `oidc-edge publish` or `oidc-edge push`\n",
            only_publishes.display()
        )
    );

    let serves = scratch.write("serve.toml", &TestConfig::file_source("1s").text());
    let out = crate::support::process::run(&[
        "publish",
        "--once",
        "--config",
        serves.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        text(&out.stderr),
        format!(
            "oidc-edge: {}: issuers: no issuer has an [[issuers.publish]] target\n",
            serves.display()
        )
    );
}

/// Web identity end to end: the publisher pod's projected token (a real kube-apiserver's,
/// audience `sts.amazonaws.com`) buys S3 credentials from SeaweedFS's STS, which verifies it
/// against the issuer's published documents, as AWS STS would; then the publisher writes with
/// those credentials. No long-lived key anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_buys_its_s3_credentials_with_a_service_account_token_of_the_real_cluster() {
    use crate::support::pki::Pki;
    use crate::support::real::{
        Cluster, ISSUER, LISTER, LISTER_NAMESPACE, ROLE_ARN, STS_AUDIENCE, SaKey, serve_https,
    };
    use crate::support::s3tap::TlsFront;

    let Some(bins) = Bins::find() else { return };
    let key = SaKey::generate();
    let cluster = Cluster::start(&bins, ISSUER, &[&key], &key).await;
    let reader_token = cluster.bound_reader_token().await;
    cluster
        .create_service_account(LISTER_NAMESPACE, LISTER)
        .await;
    let scratch = Scratch::new();
    let pki = Pki::new("oidc-edge publish test CA");
    // oidc-edge serves the issuer publicly, so that STS can verify tokens (the bootstrap).
    let server = serve_https(&cluster, ISSUER, &reader_token, &pki, &scratch).await;
    let seaweed = Seaweed::start(&bins, server.https(), &pki.ca_pem).await;
    let sts = TlsFront::start(seaweed.s3, &pki.server_for(&["127.0.0.1"])).await;

    // The publisher pod: the cluster's keys through the apiserver source, and a projected
    // token for STS, with a trailing newline as files made by hand have.
    let token = cluster
        .token(LISTER_NAMESPACE, LISTER, &[STS_AUDIENCE])
        .await;
    scratch.write("aws-token", &format!("{token}\n"));
    scratch.write("test-ca.pem", &pki.ca_pem);
    let mut target = toml::Table::new();
    for (k, v) in [
        ("to", format!("s3://{BUCKET}/cluster")),
        ("endpoint", format!("http://{}", seaweed.s3)),
        ("role_arn", ROLE_ARN.to_owned()),
        ("web_identity_token_file", "aws-token".to_owned()),
        ("sts_endpoint", format!("https://{}", sts.addr)),
        ("ca_file", "test-ca.pem".to_owned()),
    ] {
        target.insert(k.to_owned(), v.into());
    }
    let config = TestConfig::new()
        .remove("http")
        .set("issuers.0.issuer", ISSUER)
        .source(
            crate::support::config::Source::new("apiserver")
                .set("url", cluster.url())
                .set("ca_file", "apiserver-ca.pem")
                .set("token_file", "token"),
        )
        .set("state.dir", "publisher-state")
        .publish(target);
    let path = scratch.write("publisher.toml", &config.text());
    let out = Command::new(bin())
        .args(["publish", "--once", "--config"])
        .arg(&path)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .expect("run oidc-edge publish");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\nSeaweedFS: {}",
        text(&out.stderr),
        seaweed.log()
    );
    assert_eq!(
        text(&out.stdout),
        format!(
            "s3://{BUCKET}/cluster/openid/v1/jwks: written\ns3://{BUCKET}/cluster/.well-known/openid-configuration: written\n"
        )
    );
    let (status, _, body) = seaweed.object("cluster/openid/v1/jwks").await;
    assert_eq!(status, 200);
    assert_eq!(kids(&text(&body)), vec![key.kid.clone()]);
    assert!(
        seaweed.issuer_connections() > 0,
        "STS fetched the issuer's documents to verify the token"
    );

    // The trust is Mozilla's roots plus ca_file, never the system store (L9: the scratch image
    // has none): with the test CA only in SSL_CERT_FILE, STS's certificate is refused.
    let no_ca_path = scratch.write(
        "publisher-no-ca.toml",
        &config
            .clone()
            .remove_key("issuers.0.publish.0.ca_file")
            .text(),
    );
    std::fs::remove_dir_all(scratch.path("publisher-state")).expect("fresh state");
    let out = Command::new(bin())
        .args(["publish", "--once", "--config"])
        .arg(&no_ca_path)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("SSL_CERT_FILE", scratch.path("test-ca.pem"))
        .output()
        .expect("run oidc-edge publish");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");

    // A token STS refuses (another audience) fails with STS's reason, naming the object.
    let wrong = cluster.token(LISTER_NAMESPACE, LISTER, &[]).await;
    scratch.replace("aws-token", &wrong);
    std::fs::remove_dir_all(scratch.path("publisher-state")).expect("fresh state");
    let (_, _, before) = seaweed.object("cluster/openid/v1/jwks").await;
    let out = Command::new(bin())
        .args(["publish", "--once", "--config"])
        .arg(&path)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .expect("run oidc-edge publish");
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "oidc-edge: s3://{BUCKET}/cluster/openid/v1/jwks: "
        )) && stderr.contains("AssumeRoleWithWebIdentity"),
        "{stderr}"
    );
    assert!(!stderr.contains(&wrong), "the token never reaches the log");
    let (_, _, after) = seaweed.object("cluster/openid/v1/jwks").await;
    assert_eq!(before, after);
}

/// Credentials from the environment, as a CI job or a pod with a Secret in its env has them;
/// with none anywhere, a start-time error that says where it looked (never the metadata
/// service).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_come_from_the_environment_and_their_absence_is_named() {
    let Some(bins) = Bins::find() else { return };
    let store = Store::start(&bins).await;
    let mut target = store.target();
    target.remove("access_key_id_file");
    target.remove("secret_access_key_file");
    let config = store.config(target);
    let run = |env: &[(&str, &str)]| {
        Command::new(bin())
            .args(["publish", "--once", "--config"])
            .arg(&config)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .output()
            .expect("run oidc-edge publish")
    };

    let out = run(&[]);
    assert_eq!(out.status.code(), Some(1));
    // The log has it too; the last line is the one for the terminal.
    assert_eq!(
        text(&out.stderr).lines().last().map(|l| format!("{l}\n")),
        Some(format!(
            "oidc-edge: s3://{BUCKET}/site: no credentials: set access_key_id_file and \
             secret_access_key_file or role_arn and web_identity_token_file in the target, or \
             AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_ROLE_ARN and \
             AWS_WEB_IDENTITY_TOKEN_FILE in the environment (the instance metadata service is \
             never asked)\n"
        ))
    );
    assert!(store.tap.take().is_empty());

    let secret = store.seaweed.publisher.secret_access_key.clone();
    let out = run(&[
        ("AWS_ACCESS_KEY_ID", &store.seaweed.publisher.access_key_id),
        ("AWS_SECRET_ACCESS_KEY", &secret),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let (status, _, _) = store.object(JWKS_KEY).await;
    assert_eq!(status, 200);
    assert!(!text(&out.stderr).contains(&secret), "no secret in the log");
}

/// Azure Blob (a static website's `$web` container) on Azurite, which checks SharedKey
/// signatures: the same documents and headers as `serve`, the JWKS first, nothing rewritten
/// when unchanged; a wrong account key is refused with Azure's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_once_keeps_an_azure_static_website_container_in_step() {
    use crate::support::azurite::{ACCOUNT, ACCOUNT_KEY, Azurite};

    let Some(azurite) = Azurite::start() else {
        return;
    };
    azurite.create_container("$web").await;
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    scratch.write("account-key", &format!("{ACCOUNT_KEY}\n"));
    let mut target = toml::Table::new();
    for (k, v) in [
        ("to", "az://$web/site".to_owned()),
        ("endpoint", azurite.endpoint()),
        ("account", ACCOUNT.to_owned()),
        ("account_key_file", "account-key".to_owned()),
    ] {
        target.insert(k.to_owned(), v.into());
    }
    let config = TestConfig::file_source("1s")
        .set("issuers.0.jwks_content_type", "application/jwk-set+json")
        .publish(target.clone())
        .write(&scratch);
    let run = |config: &std::path::Path| {
        Command::new(bin())
            .args(["publish", "--once", "--config"])
            .arg(config)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .output()
            .expect("run oidc-edge publish")
    };

    let out = run(&config);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("az://$web/{JWKS_KEY}: written\naz://$web/{DISCOVERY_KEY}: written\n")
    );
    let server = Binary::start(
        &scratch.write(
            "serve.toml",
            &TestConfig::file_source("1s")
                .set("issuers.0.jwks_content_type", "application/jwk-set+json")
                .text(),
        ),
    );
    let http = crate::support::clients::client();
    for (key, path) in [
        (JWKS_KEY, "/openid/v1/jwks"),
        (DISCOVERY_KEY, "/.well-known/openid-configuration"),
    ] {
        let served = http.get(server.url(path)).send().await.expect("GET");
        let served_headers = served.headers().clone();
        let served_body = served.bytes().await.expect("body").to_vec();
        let (status, headers, body) = azurite.blob("$web", key).await;
        assert_eq!(status, 200, "{key}: {}", text(&body));
        assert_eq!(body, served_body, "{key}");
        for name in ["content-type", "cache-control"] {
            assert_eq!(headers.get(name), served_headers.get(name), "{key}: {name}");
        }
    }
    drop(server);

    let out = run(&config);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("az://$web/{JWKS_KEY}: unchanged\naz://$web/{DISCOVERY_KEY}: unchanged\n")
    );

    // A SAS token in a file (a leading `?` as portals copy it, and a newline) works the same.
    scratch.write(
        "sas",
        &format!("?{}\n", crate::support::azurite::account_sas()),
    );
    let mut sas_target = target.clone();
    sas_target.remove("account_key_file");
    sas_target.insert("sas_token_file".to_owned(), "sas".into());
    sas_target.insert("to".to_owned(), "az://$web/sas".into());
    let sas_config = TestConfig::file_source("1s")
        .set("issuers.0.jwks_content_type", "application/jwk-set+json")
        .publish(sas_target)
        .write(&scratch);
    let out = run(&sas_config);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let (status, _, body) = azurite.blob("$web", "sas/openid/v1/jwks").await;
    assert_eq!(status, 200, "{}", text(&body));

    // A wrong key (the right length, another value) is refused, naming the object.
    let wrong = ACCOUNT_KEY.replace('E', "F");
    scratch.write("wrong-key", &wrong);
    target.insert("account_key_file".to_owned(), "wrong-key".into());
    let wrong_config = TestConfig::file_source("1s")
        .set("issuers.0.jwks_content_type", "application/jwk-set+json")
        .publish(target)
        .write(&scratch);
    scratch.replace("jwks.json", ROTATED);
    let out = run(&wrong_config);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let line = stderr.lines().last().unwrap_or_default();
    assert!(
        line.starts_with(&format!("oidc-edge: az://$web/{JWKS_KEY}: ")) && line.contains("403"),
        "{stderr}"
    );
    assert!(!stderr.contains(&wrong), "no key in the log");
}

/// `public_url`: after publishing, each document is fetched where relying parties fetch it and
/// compared with the bucket; a difference is a warning (the bucket is right, a CDN catches up
/// within max-age), in the output, `/status` and metrics, never a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_url_is_compared_with_what_the_bucket_holds() {
    let Some(bins) = Bins::find() else { return };
    let store = Store::start(&bins).await;
    // A site in front of the bucket: oidc-edge serving `jwks` with `content_type`.
    let site = |jwks: &str, content_type: &str| {
        let scratch = Scratch::new();
        scratch.write("jwks.json", jwks);
        let config = TestConfig::file_source("1s")
            .set("issuers.0.jwks_content_type", content_type)
            .write(&scratch);
        (Binary::start(&config), scratch)
    };
    let with_public = |url: String| {
        let mut target = store.target();
        target.insert("public_url".to_owned(), url.into());
        store.config(target)
    };

    let (same, _same_dir) = site(K3S, "application/json");
    let out = store.publish_once(&with_public(same.url("")));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}",
        text(&out.stderr)
    );

    let (relabelled, _relabelled_dir) = site(K3S, "application/jwk-set+json");
    let out = store.publish_once(&with_public(relabelled.url("")));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr).lines().last(),
        Some(
            format!(
                "oidc-edge: warning: {}: content type \"application/jwk-set+json\", not the \"application/json\" the bucket holds (a CDN or bucket rule rewrites it)",
                relabelled.url("/openid/v1/jwks")
            )
            .as_str()
        )
    );

    let (stale, _stale_dir) = site(ROTATED, "application/json");
    let out = store.publish_once(&with_public(stale.url("")));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let (_, served) = crate::support::clients::get(&stale.url("/openid/v1/jwks")).await;
    let want = format!(
        "oidc-edge: warning: {}: serves {} bytes that differ from the bucket's",
        stale.url("/openid/v1/jwks"),
        served.len()
    );
    assert!(text(&out.stderr).contains(&want), "{}", text(&out.stderr));

    let closed = crate::support::pebble::free_tcp_port();
    let out = store.publish_once(&with_public(format!("http://127.0.0.1:{closed}")));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!(
            "oidc-edge: warning: http://127.0.0.1:{closed}/openid/v1/jwks: "
        )),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_config_lists_each_target_and_names_no_secret() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", K3S);
    scratch.write("key-id", "AKIDSECRETISH");
    scratch.write("secret", "SUPER-SECRET");
    let mut s3 = toml::Table::new();
    for (k, v) in [
        ("to", "s3://bucket/site"),
        ("endpoint", "https://acct.r2.cloudflarestorage.com"),
        ("region", "auto"),
        ("access_key_id_file", "key-id"),
        ("secret_access_key_file", "secret"),
        ("public_url", "https://oidc.example.com"),
    ] {
        s3.insert(k.to_owned(), v.into());
    }
    let mut azure = toml::Table::new();
    azure.insert("to".to_owned(), "az://$web".into());
    azure.insert("account".to_owned(), "acct".into());
    let config = TestConfig::file_source("1s")
        .publish(s3)
        .publish(azure)
        .write(&scratch);
    let out = crate::support::process::run(&[
        "check-config",
        "--config",
        config.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "  publish[0] s3://bucket/site (at https://acct.r2.cloudflarestorage.com/; keys from {} and its pair; checked at https://oidc.example.com/)\n  publish[1] az://$web (credentials from the environment)\n",
            scratch.path("key-id").display()
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("SECRET"), "{stdout}");
}
