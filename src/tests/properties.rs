//! Property tests for the parsers that read untrusted or hand-written input, other than JWKS
//! validation (whose properties live in `jwks::validate::tests`): the configuration file, the
//! kubeconfig, the issuer URL, and the doctor's readers of what a public site answers.
//!
//! `PROPTEST_CASES` sets the number of cases (256 by default); the long run in the session
//! note is `PROPTEST_CASES=200000 cargo test --release --lib properties`.
//!
//! The generators build inputs from the real schemas (known keys, values of every type), so
//! that cases reach validation instead of stopping at the syntax error of random text.

use std::path::Path;

use base64::Engine as _;
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::check::{self, Report};
use crate::config::Config;
use crate::issuer::Issuer;
use crate::jwks::source::SourceKind;
use crate::jwks::validate::PRIVATE_MEMBERS;
use crate::relying_party::Target;

/// Short strings that are often meaningful somewhere in the schema, and arbitrary ones.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "https://oidc.example.com",
            "https://oidc.example.com/",
            "https://oidc.example.com/cluster-a",
            "http://oidc.example.com",
            "https://127.0.0.1:6443",
            "https://[::1]:6443/",
            "127.0.0.1:0",
            "[::1]:0",
            "0.0.0.0:9090",
            "10s",
            "0s",
            "1ms",
            "3h",
            "99999999999999999999s",
            "file",
            "apiserver",
            "kubeconfig",
            "in-cluster",
            "url",
            "json",
            "text",
            "debug",
            "tls-alpn-01",
            "http-01",
            "/openid/v1/jwks",
            "jwks.json",
            "/nonexistent/file",
            "",
        ])
        .prop_map(str::to_owned),
        "\\PC{0,16}",
    ]
}

fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        4 => text().prop_map(toml::Value::String),
        1 => any::<i64>().prop_map(toml::Value::Integer),
        1 => (0i64..100_000).prop_map(toml::Value::Integer),
        1 => any::<bool>().prop_map(toml::Value::Boolean),
        1 => any::<f64>().prop_map(toml::Value::Float),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop::collection::vec(inner, 0..3).prop_map(toml::Value::Array)
    })
}

/// The value a key of the schema usually holds: a string, unless it is one of the integer,
/// boolean or list keys.
fn typed_value(key: &'static str) -> BoxedStrategy<toml::Value> {
    match key {
        "max_keys" | "max_connections" | "h2_max_concurrent_streams" | "max_header_bytes" => {
            prop_oneof![4 => 1i64..5000, 1 => any::<i64>()]
                .prop_map(toml::Value::Integer)
                .boxed()
        }
        "redirect_to_https" | "hsts" | "allow_remote" | "access" => {
            any::<bool>().prop_map(toml::Value::Boolean).boxed()
        }
        "domains" | "contact" => prop::collection::vec(text().prop_map(toml::Value::String), 0..3)
            .prop_map(toml::Value::Array)
            .boxed(),
        _ => {
            let usual: &'static [&'static str] = match key {
                "issuer" => &[
                    "https://oidc.example.com",
                    "https://oidc.example.com/a",
                    "https://b.example.org/",
                ],
                "listen" => &["127.0.0.1:0", "[::1]:0", "0.0.0.0:0"],
                "kind" => &["file", "apiserver", "kubeconfig", "in-cluster", "url"],
                "path" | "ca_file" | "token_file" | "kubeconfig" | "cert_file" | "key_file" => {
                    &["jwks.json", "/nonexistent/file"]
                }
                "url" | "directory" => &["https://127.0.0.1:6443", "https://acme.example/dir"],
                "dir" => &["state"],
                "jwks_path" => &["/openid/v1/jwks", "/keys"],
                "jwks_content_type" => &["application/json", "application/jwk-set+json"],
                "challenge" => &["tls-alpn-01", "http-01"],
                "format" => &["json", "text"],
                "level" => &["info", "debug"],
                "refresh_interval"
                | "timeout"
                | "cache_max_age"
                | "key_retention"
                | "max_staleness"
                | "handshake_timeout"
                | "header_read_timeout"
                | "idle_timeout"
                | "send_timeout" => &["1s", "10m", "0s", "2h"],
                _ => &[],
            };
            if usual.is_empty() {
                text().prop_map(toml::Value::String).boxed()
            } else {
                prop_oneof![
                    4 => prop::sample::select(usual).prop_map(|s| toml::Value::String(s.to_owned())),
                    1 => text().prop_map(toml::Value::String),
                ]
                .boxed()
            }
        }
    }
}

/// Every table of the configuration schema and its keys.
const SCHEMA: &[(&str, &[&str])] = &[
    (
        "issuers[0]",
        &[
            "issuer",
            "jwks_path",
            "jwks_content_type",
            "cache_max_age",
            "key_retention",
            "max_keys",
        ],
    ),
    (
        "issuers[0].sources[0]",
        &[
            "kind",
            "path",
            "url",
            "ca_file",
            "token_file",
            "client_cert_file",
            "client_key_file",
            "kubeconfig",
            "context",
            "refresh_interval",
            "timeout",
        ],
    ),
    ("http", &["listen", "redirect_to_https"]),
    ("https", &["listen", "hsts"]),
    (
        "https.acme",
        &[
            "domains",
            "contact",
            "directory",
            "directory_ca_file",
            "challenge",
        ],
    ),
    ("https.files", &["cert_file", "key_file"]),
    (
        "limits",
        &[
            "handshake_timeout",
            "header_read_timeout",
            "max_connections",
            "h2_max_concurrent_streams",
            "max_header_bytes",
            "idle_timeout",
            "send_timeout",
        ],
    ),
    ("admin", &["listen", "allow_remote", "max_staleness"]),
    ("state", &["dir"]),
    ("log", &["format", "level", "access"]),
];

/// One change to a valid document.
#[derive(Debug, Clone)]
enum Edit {
    /// Sets `table.key` (creating the table) to a value.
    Set(&'static str, &'static str, toml::Value),
    Remove(&'static str, &'static str),
    /// Adds a copy of the first issuer (same issuer: a duplicate).
    CopyIssuer,
}

fn edit() -> impl Strategy<Value = Edit> {
    let key = prop::sample::select(SCHEMA)
        .prop_flat_map(|(table, keys)| (Just(table), prop::sample::select(keys)));
    prop_oneof![
        12 => key.clone().prop_flat_map(|(table, key)| {
            prop_oneof![9 => typed_value(key), 1 => toml_value()]
                .prop_map(move |value| Edit::Set(table, key, value))
        }),
        4 => key.prop_map(|(table, key)| Edit::Remove(table, key)),
        2 => Just(Edit::CopyIssuer),
        1 => prop::sample::select(SCHEMA).prop_map(|(table, _)| Edit::Set(table, "no_such_key", toml::Value::Boolean(true))),
    ]
}

/// The table at `path` ("issuers[0].sources[0]", "https.acme"), created when missing.
fn table_at<'a>(doc: &'a mut toml::Table, path: &str) -> &'a mut toml::Table {
    let mut table = doc;
    for part in path.split('.') {
        let entry = if let Some(array) = part.strip_suffix("[0]") {
            let tables = table
                .entry(array)
                .or_insert_with(|| toml::Value::Array(Vec::new()));
            if tables.as_array().is_none_or(|items| items.is_empty()) {
                *tables = toml::Value::Array(vec![toml::Value::Table(toml::Table::new())]);
            }
            &mut tables.as_array_mut().expect("an array")[0]
        } else {
            table
                .entry(part)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        };
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        table = entry.as_table_mut().expect("a table");
    }
    table
}

/// A valid document (one issuer, a file source, plain HTTP) with up to four edits: a value of
/// any type for any key, a key removed, a second issuer, an unknown key. So each check of the
/// validator is reached, alone or with others.
fn config_document() -> impl Strategy<Value = toml::Table> {
    prop::collection::vec(edit(), 0..5).prop_map(|edits| {
        let mut doc: toml::Table = toml::from_str(
            "[[issuers]]\nissuer = \"https://oidc.example.com\"\n[[issuers.sources]]\nkind = \"file\"\npath = \"jwks.json\"\n\
             [http]\nlisten = \"127.0.0.1:0\"\n[state]\ndir = \"state\"\n",
        )
        .expect("base document");
        for edit in edits {
            match edit {
                Edit::Set(table, key, value) => {
                    table_at(&mut doc, table).insert(key.to_owned(), value);
                }
                Edit::Remove(table, key) => {
                    table_at(&mut doc, table).remove(key);
                }
                Edit::CopyIssuer => {
                    if let Some(toml::Value::Array(issuers)) = doc.get_mut("issuers")
                        && let Some(first) = issuers.first().cloned()
                    {
                        issuers.push(first);
                    }
                }
            }
        }
        doc
    })
}

/// A k3s kubeconfig (as `/etc/rancher/k3s/k3s.yaml`, client certificate and key inline), then
/// up to four edits: a member removed, or set to another name, a bad value or another type;
/// a token, an exec plugin or a password added. The token and the client key are marked so
/// that leaks can be looked for.
fn kubeconfig_document() -> impl Strategy<Value = Value> {
    let b64 = |text: &str| json!(base64::engine::general_purpose::STANDARD.encode(text));
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let base = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "default", "cluster": { "server": "https://127.0.0.1:6443", "certificate-authority-data": b64(pem) } }],
        "contexts": [{ "name": "default", "context": { "cluster": "default", "user": "default" } }],
        "users": [{ "name": "default", "user": { "client-certificate-data": b64(pem), "client-key-data": b64(SECRET_KEY) } }],
        "current-context": "default",
    });
    let names = || {
        vec![
            json!("default"),
            json!("k3s"),
            json!(""),
            json!(7),
            Value::Null,
        ]
    };
    let edits: Vec<(&'static str, &'static str, Vec<Value>)> = vec![
        ("", "current-context", names()),
        ("", "clusters", vec![json!([]), json!({})]),
        ("", "users", vec![json!([]), json!("x")]),
        ("/clusters/0", "name", names()),
        (
            "/clusters/0/cluster",
            "server",
            vec![
                json!("http://127.0.0.1:6443"),
                json!("https://[::1]:6443/prefix"),
                // M5: a password in the server URL is refused and never shown.
                json!(format!("https://admin:{SECRET_TOKEN}@127.0.0.1:6443")),
                json!(format!("https://admin:{SECRET_TOKEN}@127.0.0.1:99999")),
                json!("127.0.0.1:6443"),
                json!(6443),
                json!(""),
            ],
        ),
        (
            "/clusters/0/cluster",
            "certificate-authority-data",
            vec![json!("not base64 !"), json!(["a list"]), b64("")],
        ),
        (
            "/clusters/0/cluster",
            "certificate-authority",
            vec![json!("/nonexistent/ca.crt"), json!("relative/ca.crt")],
        ),
        (
            "/clusters/0/cluster",
            "insecure-skip-tls-verify",
            vec![json!(true), json!("yes")],
        ),
        ("/contexts/0", "name", names()),
        ("/contexts/0/context", "cluster", names()),
        ("/contexts/0/context", "user", names()),
        ("/users/0", "name", names()),
        (
            "/users/0/user",
            "token",
            vec![json!(SECRET_TOKEN), json!(12)],
        ),
        (
            "/users/0/user",
            "tokenFile",
            vec![json!("/nonexistent/token"), json!("token")],
        ),
        (
            "/users/0/user",
            "client-certificate-data",
            vec![json!("not base64 !"), json!({})],
        ),
        (
            "/users/0/user",
            "client-key-data",
            vec![json!("not base64 !"), json!(SECRET_TOKEN)],
        ),
        (
            "/users/0/user",
            "client-key",
            vec![json!("/nonexistent/client.key")],
        ),
        (
            "/users/0/user",
            "exec",
            vec![json!({ "command": "aws", "args": [SECRET_TOKEN] })],
        ),
        (
            "/users/0/user",
            "auth-provider",
            vec![json!({ "name": "gcp", "config": { "access-token": SECRET_TOKEN } })],
        ),
        ("/users/0/user", "username", vec![json!("admin")]),
        ("/users/0/user", "password", vec![json!(SECRET_TOKEN)]),
    ];
    let edit = prop::sample::select(edits).prop_flat_map(|(parent, member, values)| {
        (
            Just(parent),
            Just(member),
            prop::option::weighted(0.8, prop::sample::select(values)),
        )
    });
    prop::collection::vec(edit, 0..5).prop_map(move |edits| {
        let mut doc = base.clone();
        for (parent, member, value) in edits {
            if let Some(Value::Object(object)) = doc.pointer_mut(parent) {
                match value {
                    Some(value) => object.insert(member.to_owned(), value),
                    None => object.remove(member),
                };
            }
        }
        doc
    })
}

const SECRET_TOKEN: &str = "K10-property-test-token-value";
const SECRET_KEY: &str =
    "-----BEGIN EC PRIVATE KEY-----\nproperty-test-private-key\n-----END EC PRIVATE KEY-----\n";

/// A discovery document: the members relying parties read, with values of any type.
fn discovery_document() -> impl Strategy<Value = Value> {
    let value = prop_oneof![
        text().prop_map(Value::String),
        Just(json!(["RS256"])),
        Just(json!([])),
        Just(json!(["public"])),
        any::<i64>().prop_map(|n| json!(n)),
        Just(Value::Null),
        Just(json!({})),
    ];
    prop::collection::btree_map(
        prop::sample::select(vec![
            "issuer",
            "jwks_uri",
            "response_types_supported",
            "subject_types_supported",
            "id_token_signing_alg_values_supported",
            "authorization_endpoint",
        ]),
        value,
        0..7,
    )
    .prop_map(|members| {
        Value::Object(
            members
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        )
    })
}

/// A key of any shape: public members of the right or wrong type, sometimes a private one.
fn any_key() -> impl Strategy<Value = Value> {
    let member = prop_oneof![
        prop::sample::select(vec![
            "RSA", "EC", "OKP", "oct", "P-256", "Ed25519", "RS256", "ES256", "EdDSA", "sig", "enc",
            "AQAB", "AAAA", "k1"
        ])
        .prop_map(|s| json!(s)),
        "[A-Za-z0-9_-]{0,400}".prop_map(Value::String),
        any::<i64>().prop_map(|n| json!(n)),
        Just(json!(["verify"])),
        Just(Value::Null),
    ];
    let names: Vec<&'static str> = [
        "kty", "kid", "use", "alg", "n", "e", "crv", "x", "y", "key_ops", "x5c",
    ]
    .into_iter()
    .chain(PRIVATE_MEMBERS.iter().copied())
    .collect();
    prop::collection::btree_map(prop::sample::select(names), member, 0..8).prop_map(|members| {
        Value::Object(
            members
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        )
    })
}

proptest! {
    // --- the configuration file ---

    #[test]
    fn config_text_never_panics_and_errors_name_the_file_on_one_line(text in "\\PC{0,200}") {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("oidc-edge.toml");
        if let Err(e) = Config::from_toml_str(&text, &file) {
            let message = e.to_string();
            prop_assert!(message.starts_with(&format!("{}: ", file.display())), "{message}");
            prop_assert!(!message.contains('\n'), "{message}");
        }
    }

    #[test]
    fn config_documents_never_panic_and_errors_name_the_file_on_one_line(doc in config_document()) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("jwks.json"), "{}").expect("jwks");
        let file = dir.path().join("oidc-edge.toml");
        let text = toml::to_string(&doc).expect("TOML");
        match Config::from_toml_str(&text, &file) {
            Ok(config) => {
                prop_assert!(!config.issuers.is_empty());
                prop_assert!(config.http.is_some() || config.https.is_some());
            }
            Err(e) => {
                let message = e.to_string();
                prop_assert!(message.starts_with(&format!("{}: ", file.display())), "{message}");
                prop_assert!(!message.contains('\n'), "{message}");
            }
        }
    }

    /// What is written is what is read: a valid config's issuer, path and refresh interval
    /// come back unchanged, and the issuer is a fixed point of parse and render.
    #[test]
    fn valid_configs_read_back_what_was_written(
        host in "[a-z]{1,10}(\\.[a-z]{1,10}){1,3}",
        path in prop::option::of("(/[a-z0-9-]{1,8}){1,3}"),
        millis in 1u64..86_400_000,
    ) {
        let issuer = format!("https://{host}{}", path.as_deref().unwrap_or(""));
        let text = format!(
            "[[issuers]]\nissuer = \"{issuer}\"\n[[issuers.sources]]\nkind = \"file\"\npath = \"jwks.json\"\nrefresh_interval = \"{millis}ms\"\n[http]\nlisten = \"127.0.0.1:0\"\n[state]\ndir = \"state\"\n"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("jwks.json"), "{}").expect("jwks");
        let config = Config::from_toml_str(&text, &dir.path().join("config.toml")).expect("valid");
        let read = &config.issuers[0];
        let endpoint = &read.endpoint;
        prop_assert_eq!(endpoint.issuer.as_str(), issuer.as_str());
        let reparsed = Issuer::parse(endpoint.issuer.as_str()).expect("reparse");
        prop_assert_eq!(reparsed.as_str(), endpoint.issuer.as_str());
        prop_assert_eq!(read.sources[0].refresh_interval.as_millis(), u128::from(millis));
        prop_assert_eq!(&read.sources[0].kind, &SourceKind::File { path: dir.path().join("jwks.json") });
        prop_assert!(endpoint.jwks_uri.starts_with(&format!("https://{host}/")), "{}", endpoint.jwks_uri);
    }

    // --- the issuer URL ---

    #[test]
    fn issuer_parsing_never_panics_and_is_a_fixed_point(raw in prop_oneof!["\\PC{0,40}", "https://[a-zA-Z0-9.:/?#%@-]{0,30}"]) {
        if let Ok(issuer) = Issuer::parse(&raw) {
            prop_assert!(issuer.as_str().starts_with("https://"));
            let again = Issuer::parse(issuer.as_str()).expect("an accepted issuer parses again");
            prop_assert_eq!(again.as_str(), issuer.as_str());
        }
    }

    // --- the kubeconfig ---

    #[test]
    fn kubeconfig_text_never_panics(text in "\\PC{0,200}") {
        let _ = crate::jwks::source::kubeconfig::parse(&text, Path::new("/etc/rancher/k3s/k3s.yaml"), None);
    }

    /// Never panics; accepts only an https server with a pinned CA; and the token or client
    /// key never appears in an error message or in the Debug form of what was read.
    #[test]
    fn kubeconfigs_never_panic_or_leak_credentials(doc in kubeconfig_document(), context in prop::option::of(prop::sample::select(vec!["default", "k3s", "missing"]))) {
        let yaml = serde_norway::to_string(&doc).expect("YAML");
        let key_b64 = base64::engine::general_purpose::STANDARD.encode(SECRET_KEY);
        let result = crate::jwks::source::kubeconfig::parse(&yaml, Path::new("/etc/rancher/k3s/k3s.yaml"), context);
        let shown = match &result {
            Ok(source) => {
                prop_assert_eq!(source.server.scheme(), "https");
                format!("{source:?}")
            }
            Err(message) => message.clone(),
        };
        for secret in [SECRET_TOKEN, SECRET_KEY, "property-test-private-key", key_b64.as_str()] {
            prop_assert!(!shown.contains(secret), "{shown}");
        }
    }

    // --- the doctor's readers of what a site answers ---

    #[test]
    fn discovery_reader_never_panics_and_only_follows_https(doc in discovery_document(), issuer in text()) {
        let mut report = Report::new(&issuer);
        let body = serde_json::to_vec(&doc).expect("json");
        if let Some(jwks) = check::rules::discovery_findings(&mut report, &body, &issuer) {
            prop_assert_eq!(jwks.scheme(), "https");
        }
        let _ = check::rules::discovery_findings(&mut Report::new(&issuer), &body[..body.len() / 2], &issuer);
    }

    /// Never panics; a set with a private member never passes.
    #[test]
    fn jwks_reader_never_panics_and_fails_private_keys(keys in prop::collection::vec(any_key(), 0..5), cut in any::<prop::sample::Index>()) {
        let body = serde_json::to_vec(&json!({ "keys": keys })).expect("json");
        let mut report = Report::new("https://oidc.example.com");
        check::rules::jwks_findings(&mut report, &body, &Target::ALL);
        if keys.iter().any(|k| PRIVATE_MEMBERS.iter().any(|m| k.get(*m).is_some())) {
            prop_assert!(report.failed(), "{}", report.table());
        }
        let mut truncated = Report::new("https://oidc.example.com");
        let _ = check::rules::jwks_findings(&mut truncated, &body[..cut.index(body.len() + 1)], &[Target::Aws]);
    }

    /// Arbitrary tokens, well-formed-looking or not, never panic and never verify.
    #[test]
    fn token_reader_never_panics_or_verifies_a_forgery(
        header in prop::collection::btree_map("alg|kid|typ", prop_oneof!["RS256|ES256|none|HS256|k1", "\\PC{0,8}"], 0..3),
        claims in prop::collection::btree_map("iss|sub|aud|exp|iat|nbf", prop_oneof![text().prop_map(Value::String), any::<i64>().prop_map(|n| json!(n))], 0..6),
        signature in prop::collection::vec(any::<u8>(), 0..300),
        raw in "\\PC{0,60}",
        keys in prop::collection::vec(any_key(), 0..3),
    ) {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let forged = format!(
            "{}.{}.{}",
            b64(&serde_json::to_vec(&header).expect("json")),
            b64(&serde_json::to_vec(&claims).expect("json")),
            b64(&signature)
        );
        for token in [forged.as_str(), raw.as_str()] {
            let mut report = Report::new("https://oidc.example.com");
            check::token::check(&mut report, token, &keys, "https://oidc.example.com", None, &Target::ALL);
            prop_assert!(report.failed(), "{token}: {}", report.table());
        }
    }

    #[test]
    fn certificate_readers_never_panic(chain in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..600), 0..3)) {
        let _ = check::probe::tls::chain_order(&chain);
        let _ = check::probe::tls::days_left(&chain);
        let _ = check::probe::tls::aws_thumbprint(&chain);
    }
}

/// The properties above mean something only if the generators reach both outcomes.
#[test]
fn the_generators_make_accepted_and_refused_documents() {
    use proptest::strategy::ValueTree as _;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("jwks.json"), "{}").expect("jwks");
    let file = dir.path().join("oidc-edge.toml");
    let configs = (0..500)
        .filter(|_| {
            let doc = config_document()
                .new_tree(&mut runner)
                .expect("tree")
                .current();
            Config::from_toml_str(&toml::to_string(&doc).expect("TOML"), &file).is_ok()
        })
        .count();
    let kubeconfigs = (0..500)
        .filter(|_| {
            let doc = kubeconfig_document()
                .new_tree(&mut runner)
                .expect("tree")
                .current();
            let yaml = serde_norway::to_string(&doc).expect("YAML");
            crate::jwks::source::kubeconfig::parse(&yaml, Path::new("/k.yaml"), None).is_ok()
        })
        .count();
    assert!(
        (50..450).contains(&configs),
        "{configs} of 500 configs accepted"
    );
    assert!(
        (50..450).contains(&kubeconfigs),
        "{kubeconfigs} of 500 kubeconfigs accepted"
    );
}
