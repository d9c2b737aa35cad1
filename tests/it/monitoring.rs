//! The alert rules and the Grafana dashboard in `deploy/monitoring/`, against a real Prometheus
//! (Debian's `prometheus`, installed by scripts/test) scraping two real oidc-edge processes.
//! `promtool test rules` (scripts/monitoring-test) proves each rule's logic on synthetic
//! series; only a real scrape proves the metric names the rules and the panels use are the
//! ones the binary exports, which is how the seeds' setups broke silently: an alert on a name
//! that no longer exists never fires.
//!
//! The two processes are set up so that every metric has a series, since a family with no
//! series is not exported at all: A serves certificate files that expire in 10 days, fetches
//! from an apiserver that signs for another issuer and from a file that is missing, cannot
//! write its state file, self-tests with a TokenRequest that fails, and has a connection
//! closed by the handshake deadline; B runs ACME
//! against a directory nobody listens on, so it has ACME events and no certificate. What the
//! rules then say about them is asserted too, alert by alert.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use oidc_edge::jwks::persist::StateFile;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt as _;

use crate::support::clients::client;
use crate::support::config::{ISSUER, Source, TestConfig};
use crate::support::fake_apiserver::{FakeApiserver, K3S_DEFAULT_ISSUER};
use crate::support::pebble::free_tcp_port;
use crate::support::pki::Pki;
use crate::support::process::Binary;
use crate::support::{HTTPS_DOMAIN, K3S, Scratch, repo_path};

const RULES: &str = "deploy/monitoring/oidc-edge.rules.yml";
const DASHBOARD: &str = "deploy/monitoring/oidc-edge-dashboard.json";
/// The scrape job name the rules' `up` alerts expect (README "Monitoring").
const JOB: &str = "oidc-edge";
const TOKEN: &str = "monitoring-test-token";
const DAY: Duration = Duration::from_secs(86_400);

/// A Prometheus server in the foreground, stopped by its PID on drop, also when the test fails.
struct Prometheus {
    child: Child,
    base: String,
    scratch: Scratch,
}

impl Prometheus {
    /// Scrapes `targets` every second as job [`JOB`] and evaluates the repository's rules every
    /// second, its TSDB in a scratch directory.
    async fn start(targets: &[SocketAddr]) -> Self {
        let scratch = Scratch::new();
        let targets: Vec<String> = targets.iter().map(ToString::to_string).collect();
        // JSON is YAML: no quoting to get wrong.
        let config = json!({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [repo_path(RULES)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
        });
        let config = scratch.write("prometheus.yml", &config.to_string());
        // Prometheus cannot be told port 0 and report the port it got.
        let port = free_tcp_port();
        let log = std::fs::File::create(scratch.path("prometheus.log")).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                scratch.path("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (package prometheus)");
        let prometheus = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            scratch,
        };
        let ready = format!("{}/-/ready", prometheus.base);
        within_30s("Prometheus ready", || async {
            match client().get(&ready).send().await {
                Ok(response) if response.status() == 200 => Ok(()),
                other => Err(format!("{other:?}\n{}", prometheus.log())),
            }
        })
        .await;
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.scratch.path("prometheus.log")).unwrap_or_default()
    }

    /// The `data` of an HTTP API answer, which must be a success.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let url =
            reqwest::Url::parse_with_params(&format!("{}{path}", self.base), params).expect("url");
        let response = client().get(url).send().await.expect("Prometheus API");
        let status = response.status();
        let body: Value =
            serde_json::from_str(&response.text().await.expect("body")).expect("JSON");
        assert!(
            status == 200 && body["status"] == "success",
            "{path} {params:?}: {status} {body}"
        );
        body["data"].clone()
    }

    /// An instant query's result vector.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("/api/v1/query", &[("query", expr)]).await;
        assert_eq!(data["resultType"], "vector", "{expr}");
        data["result"].as_array().expect("result").clone()
    }

    /// Every metric name in the TSDB.
    async fn names(&self) -> BTreeSet<String> {
        strings(&self.api("/api/v1/label/__name__/values", &[]).await)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SIGTERM first so that it closes its TSDB; SIGKILL if it has not within 10 s.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strings(array: &Value) -> BTreeSet<String> {
    array
        .as_array()
        .expect("an array")
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

/// Polls `check` every 200 ms for up to 30 s (Prometheus scrapes and evaluates once a second)
/// and returns its value; on timeout, fails with its last complaint.
async fn within_30s<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) => assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The metric names a PromQL expression selects: every identifier that is not a keyword, an
/// aggregation or a function (followed by `(`), skipping label matchers `{…}`, ranges `[…]`,
/// label lists after `by`/`on`/…, strings and numbers (durations included). Not a full
/// parser, but it finds Prometheus's own names (`up`) as well as ours, and a test below pins
/// it on the shapes the rules use.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Never metric names, even with no `(` after them: operators, keywords, and aggregations
    // written `sum by (…) (…)`.
    const SKIPPED: &str = "and or unless offset bool inf nan \
        sum min max avg group stddev stdvar count count_values bottomk topk quantile";
    // Keywords followed by a list of label names.
    const LABEL_LISTS: &str = "by without on ignoring group_left group_right";
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips to the `close` matching the opener at `i`, over strings; returns the index after it.
    let skip_to = |mut i: usize, close: char| -> usize {
        let mut quote = None;
        while i < chars.len() {
            let c = chars[i];
            match quote {
                Some(_) if c == '\\' => i += 1,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
                None if c == close => return i + 1,
                None => {}
            }
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_to(i + 1, '}');
        } else if c == '[' {
            i = skip_to(i + 1, ']');
        } else if c == '"' || c == '\'' || c == '`' {
            // A string argument: skip to its closing quote.
            let mut j = i + 1;
            while j < chars.len() && chars[j] != c {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            i = j + 1;
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let opens = chars.get(next) == Some(&'(');
            if LABEL_LISTS.split_whitespace().any(|k| k == word) {
                if opens {
                    i = skip_to(next + 1, ')');
                }
            } else if !opens && !SKIPPED.split_whitespace().any(|k| k == word) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every `oidc_edge_` identifier in `text`, found by scanning alone: a cross-check of
/// [`metric_names`], so that a slip in it cannot drop one of our names unseen.
fn prefixed_names(text: &str) -> BTreeSet<String> {
    text.match_indices("oidc_edge_")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn metric_names_finds_the_selectors_of_an_expression() {
    let names = |expr: &str| -> Vec<String> { metric_names(expr).into_iter().collect() };
    assert_eq!(
        names(
            r#"sum by(job, instance) (increase(oidc_edge_refreshes_total{result=~"a|b}"}[30m])) >= 3"#
        ),
        ["oidc_edge_refreshes_total"]
    );
    assert_eq!(
        names(
            "(x_total unless x_total offset 30m) and on(job, instance) (up offset 30m == 1) or absent(y)"
        ),
        ["up", "x_total", "y"]
    );
    assert_eq!(
        names("count by (job) (a) unless on (job) b - time() < 14 * 86400"),
        ["a", "b"]
    );
    assert_eq!(
        names("a * on(job) group_left(version) b and ignoring (x) c"),
        ["a", "b", "c"]
    );
}

/// Alerts as `NAME STATE INSTANCE [source=N]`.
fn alert_lines(alerts: &Value) -> BTreeSet<String> {
    alerts["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .map(|a| {
            let labels = &a["labels"];
            let mut line = format!(
                "{} {} {}",
                labels["alertname"].as_str().expect("alertname"),
                a["state"].as_str().expect("state"),
                labels["instance"].as_str().unwrap_or("-"),
            );
            if let Some(source) = labels["source"].as_str() {
                line.push_str(&format!(" source={source}"));
            }
            line
        })
        .collect()
}

/// The `- alert: NAME` lines of the rules file: what Prometheus must have loaded.
fn alert_names_in_file() -> BTreeSet<String> {
    std::fs::read_to_string(repo_path(RULES))
        .expect("rules file")
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert:"))
        .map(|name| name.trim().to_owned())
        .collect()
}

/// The panels of a dashboard, rows' own panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        all.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            all.extend(nested);
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_finds_every_metric_the_rules_and_the_dashboard_use() {
    let started = Instant::now();

    // A: certificate files expiring in 10 days; source 0 an apiserver that signs for k3s's
    // default issuer, source 1 a file that does not exist.
    let fake = FakeApiserver::start(K3S, K3S_DEFAULT_ISSUER, TOKEN).await;
    let a = Scratch::new();
    let pki = Pki::new("monitoring test CA");
    let now = SystemTime::now();
    let leaf = pki.server_valid_between(&[HTTPS_DOMAIN], now - DAY, now + 10 * DAY);
    a.write("cert.pem", &leaf.cert_pem);
    a.write("key.pem", &leaf.key_pem);
    // A non-empty directory where the state file goes: rename(2) cannot replace it, so every
    // write of the key set fails, as on a full or read-only disk (and root ignores modes).
    let state_file = StateFile::new(&a.path("state"), ISSUER);
    std::fs::create_dir_all(state_file.path().join("blocker")).expect("blocker");
    let config = TestConfig::new()
        .source(fake.source_in(&a, TOKEN).set("refresh_interval", "1s"))
        .source(Source::file("missing.json").set("refresh_interval", "1s"))
        .set("https.listen", "127.0.0.1:0")
        .set("https.files.cert_file", "cert.pem")
        .set("https.files.key_file", "key.pem")
        .set("limits.handshake_timeout", "1s")
        // A self-test whose TokenRequest the fake apiserver does not serve: it fails.
        .set("issuers.0.selftest.service_account", "default/s3-lister")
        .set("issuers.0.selftest.interval", "1s")
        .write(&a);
    let server_a = Binary::start(&config);

    // B: ACME against a port nobody listens on, and a bucket target on a port nobody listens
    // on either.
    let b = Scratch::new();
    b.write("jwks.json", K3S);
    b.write("key-id", "AKIDMONITORING");
    b.write("secret", "not-a-secret");
    let mut target = toml::Table::new();
    for (key, value) in [
        ("to", "s3://bucket/site".to_owned()),
        ("endpoint", format!("http://127.0.0.1:{}", free_tcp_port())),
        ("access_key_id_file", "key-id".to_owned()),
        ("secret_access_key_file", "secret".to_owned()),
        ("timeout", "1s".to_owned()),
    ] {
        target.insert(key.to_owned(), value.into());
    }
    let config = TestConfig::new()
        .source(Source::file("jwks.json"))
        .publish(target)
        .set("https.listen", "127.0.0.1:0")
        .set(
            "https.acme.directory",
            format!("https://127.0.0.1:{}/directory", free_tcp_port()),
        )
        .set("https.acme.step_timeout", "2s")
        .write(&b);
    let server_b = Binary::start(&config);

    // A connection that sends nothing, closed by A's handshake deadline: the one way to give
    // oidc_edge_connections_closed_by_limit_total a series.
    let mut idle = tokio::net::TcpStream::connect(server_a.addr)
        .await
        .expect("connect");
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut [0u8; 1])).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "closed by the deadline: {closed:?}"
    );

    let prometheus = Prometheus::start(&[server_a.admin, server_b.admin]).await;
    let (instance_a, instance_b) = (server_a.admin.to_string(), server_b.admin.to_string());
    let instances = BTreeSet::from([instance_a.clone(), instance_b.clone()]);

    // Both targets scraped.
    within_30s("both targets up", || async {
        let up: BTreeMap<String, String> = prometheus
            .query(&format!("up{{job=\"{JOB}\"}}"))
            .await
            .iter()
            .map(|s| {
                let instance = s["metric"]["instance"].as_str().expect("instance");
                (
                    instance.to_owned(),
                    s["value"][1].as_str().expect("value").to_owned(),
                )
            })
            .collect();
        let want: BTreeMap<String, String> = instances
            .iter()
            .map(|i| (i.clone(), "1".to_owned()))
            .collect();
        if up == want {
            Ok(())
        } else {
            Err(format!("{up:?}"))
        }
    })
    .await;

    // The rules loaded from the repository's file, every one evaluated without an error.
    let rules = within_30s("every rule evaluated", || async {
        let data = prometheus.api("/api/v1/rules", &[]).await;
        let mut rules = Vec::new();
        for group in data["groups"].as_array().expect("groups") {
            assert_eq!(group["file"], repo_path(RULES).to_str().expect("utf-8"));
            rules.extend(group["rules"].as_array().expect("rules").iter().cloned());
        }
        for rule in &rules {
            assert_ne!(rule["health"], "err", "{rule:#}");
        }
        if rules.iter().all(|r| r["health"] == "ok") {
            Ok(rules)
        } else {
            Err(format!("{rules:#?}"))
        }
    })
    .await;
    let loaded: BTreeSet<String> = rules
        .iter()
        .map(|r| r["name"].as_str().expect("name").to_owned())
        .collect();
    assert_eq!(loaded, alert_names_in_file());
    assert_eq!(rules.len(), loaded.len(), "one rule per alert name");
    for rule in &rules {
        assert_eq!(rule["type"], "alerting", "{rule:#}");
        assert_eq!(rule["lastError"].as_str().unwrap_or(""), "", "{rule:#}");
    }

    // Every metric a rule names has series.
    let mut used = BTreeSet::new();
    for rule in &rules {
        let query = rule["query"].as_str().expect("query");
        let names = metric_names(query);
        assert!(!names.is_empty(), "{query}");
        assert!(names.is_superset(&prefixed_names(query)), "{query}");
        used.extend(names);
    }
    let seen = within_30s("every metric the rules use", || async {
        let seen = prometheus.names().await;
        let missing: Vec<&String> = used.difference(&seen).collect();
        if missing.is_empty() {
            Ok(seen)
        } else {
            Err(format!("missing {missing:?}; Prometheus has {seen:?}"))
        }
    })
    .await;

    // What the rules say about A and B: the alerts without `for` fire, the others wait.
    let want: BTreeSet<String> = [
        format!("OidcEdgeCertificateExpiresSoon firing {instance_a}"),
        format!("OidcEdgeIssuerMismatch pending {instance_a} source=0"),
        format!("OidcEdgeRefreshFailing firing {instance_a} source=1"),
        format!("OidcEdgeStateWriteFailing firing {instance_a}"),
        format!("OidcEdgeSelfTestFailing pending {instance_a}"),
        format!("OidcEdgeCertificateMissing pending {instance_b}"),
        format!("OidcEdgePublishFailing firing {instance_b}"),
    ]
    .into();
    within_30s("the alerts of A and B", || async {
        let alerts = alert_lines(&prometheus.api("/api/v1/alerts", &[]).await);
        if alerts == want {
            Ok(())
        } else {
            Err(format!("{alerts:#?}"))
        }
    })
    .await;

    // The dashboard: importable (a datasource input every panel uses), every metric it names
    // has series, and every query runs and returns data.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_path(DASHBOARD)).expect("dashboard"))
            .expect("dashboard is JSON");
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert_eq!(dashboard["__inputs"][0]["pluginId"], "prometheus");
    assert_eq!(dashboard["schemaVersion"], 39);
    assert_eq!(dashboard["id"], Value::Null);
    let datasource = json!({"type": "prometheus", "uid": "${DS_PROMETHEUS}"});
    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard) {
        assert!(ids.insert(panel["id"].as_u64().expect("id")), "{panel:#}");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"], datasource, "{panel:#}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{panel:#}");
        for target in targets {
            assert_eq!(target["datasource"], datasource, "{panel:#}");
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    // The variables take their "All" value; Grafana's own interval a span with several scrapes.
    let mut values = vec![("__rate_interval".to_owned(), "1m".to_owned())];
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        let name = variable["name"].as_str().expect("name");
        values.push((
            name.to_owned(),
            variable["allValue"].as_str().expect("allValue").to_owned(),
        ));
        // `label_values(METRIC, LABEL)`, as Grafana asks it: both instances.
        let definition = variable["definition"].as_str().expect("definition");
        let (metric, label) = definition
            .strip_prefix("label_values(")
            .and_then(|rest| rest.strip_suffix(')'))
            .and_then(|args| args.split_once(", "))
            .expect("label_values(METRIC, LABEL)");
        let found = prometheus
            .api(
                &format!("/api/v1/label/{label}/values"),
                &[("match[]", metric)],
            )
            .await;
        assert_eq!(strings(&found), instances, "{definition}");
    }
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(names.is_superset(&prefixed_names(expr)), "{expr}");
        let missing: Vec<&String> = names.difference(&seen).collect();
        assert!(missing.is_empty(), "{expr}: no series of {missing:?}");
        let mut query = expr.clone();
        for (name, value) in &values {
            query = query
                .replace(&format!("${{{name}}}"), value)
                .replace(&format!("${name}"), value);
        }
        assert!(!query.contains('$'), "an unknown variable in {expr}");
        let result = prometheus.query(&query).await;
        assert!(!result.is_empty(), "{query} returns nothing");
    }
    println!(
        "monitoring: {} rules over {} metrics, {} dashboard queries, in {:?}",
        rules.len(),
        used.len(),
        exprs.len(),
        started.elapsed()
    );
}
