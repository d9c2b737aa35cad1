//! Bad configurations are refused with one line naming the file and the key (the table runs
//! in process, through `Config::load`); `check-config` exits 64 with that line, and 0 for
//! good ones.

use std::path::Path;

use oidc_edge::config::Config;

use crate::support::pki::Pki;
use crate::support::process::run;
use crate::support::{Scratch, repo_path};

const ISSUER: &str = "[[issuers]]\nissuer = \"https://oidc.example.com\"\n";
const SOURCE: &str = "  [[issuers.sources]]\n  kind = \"file\"\n  path = \"jwks.json\"\n";
const HTTP: &str = "[http]\nlisten = \"127.0.0.1:8080\"\n";

fn valid_with(issuer_extra: &str, source_extra: &str, rest: &str) -> String {
    format!("{ISSUER}{issuer_extra}\n{SOURCE}{source_extra}\n{HTTP}{rest}")
}

/// The valid file-source issuer with one `[[issuers.publish]]` target of `keys`, and no
/// listener (a publisher serves nothing itself).
fn publish(keys: &str) -> String {
    format!(
        "{ISSUER}{SOURCE}  [[issuers.publish]]\n  {}\n",
        keys.replace('\n', "\n  ")
    )
}

/// A config whose one source is `kind = "push"` with `keys` (the last table: more sources
/// may follow).
fn push(keys: &str) -> String {
    format!("{HTTP}{ISSUER}  [[issuers.sources]]\n  kind = \"push\"\n{keys}\n")
}

/// A config whose one source is `kind = "apiserver"` with `keys`.
fn apiserver(keys: &str) -> String {
    format!("{ISSUER}  [[issuers.sources]]\n  kind = \"apiserver\"\n{keys}\n{HTTP}")
}

/// (what, config text, expected message after "<file>: "; `DIR` and `JWKS_PATH` stand for the
/// scratch directory and its JWKS file).
fn bad_configs() -> Vec<(&'static str, String, &'static str)> {
    vec![
        (
            "toml syntax",
            "[[issuers]\n".to_owned(),
            "unclosed array table, expected `]` (line 1, column 11)",
        ),
        (
            "unknown top-level key",
            valid_with("", "", "[admn]\nlisten = \"x\"\n"),
            "admn: unknown field `admn`, expected one of `issuers`, `http`, `https`, `limits`, `admin`, `state`, `log`, `relying_parties` (line 10, column 2)",
        ),
        (
            "unknown issuer key",
            valid_with("jwks_pth = \"/keys\"", "", ""),
            "issuers[0].jwks_pth: unknown field `jwks_pth`, expected one of `issuer`, `jwks_path`, `jwks_content_type`, `cache_max_age`, `key_retention`, `max_keys`, `sources`, `publish`, `push`, `selftest` (line 3, column 1)",
        ),
        (
            "wrong type",
            valid_with("max_keys = \"ten\"", "", ""),
            "issuers[0].max_keys: invalid type: string \"ten\", expected usize (line 3, column 12)",
        ),
        (
            "no issuers",
            HTTP.to_owned(),
            "issuers: at least one [[issuers]] table is required",
        ),
        (
            "http issuer",
            valid_with("", "", "").replace("https://", "http://"),
            "issuers[0].issuer: \"http://oidc.example.com\" must use https (A-1, D-1)",
        ),
        (
            "issuer with port",
            valid_with("", "", "").replace("example.com\"", "example.com:8443\""),
            "issuers[0].issuer: \"https://oidc.example.com:8443\" must not contain a port, not even :443 (A-1)",
        ),
        (
            "issuer with default port",
            valid_with("", "", "").replace("example.com\"", "example.com:443\""),
            "issuers[0].issuer: \"https://oidc.example.com:443\" must not contain a port, not even :443 (A-1)",
        ),
        (
            "issuer with query",
            valid_with("", "", "").replace("example.com\"", "example.com/?cluster=a\""),
            "issuers[0].issuer: \"https://oidc.example.com/?cluster=a\" must not contain a query (A-1, D-1)",
        ),
        (
            "issuer with fragment",
            valid_with("", "", "").replace("example.com\"", "example.com/#a\""),
            "issuers[0].issuer: \"https://oidc.example.com/#a\" must not contain a fragment (D-1)",
        ),
        (
            "issuer not canonical",
            valid_with("", "", "").replace("oidc.example", "OIDC.example"),
            "issuers[0].issuer: \"https://OIDC.example.com\" is not in canonical form; write it as \"https://oidc.example.com/\" (lowercase host, no dot segments or needless escapes)",
        ),
        (
            "two issuers on one URL",
            format!(
                "{}{ISSUER}{SOURCE}",
                valid_with("", "", "")
                    .replace("https://oidc.example.com", "https://oidc.example.com/")
            ),
            "issuers[1]: https://oidc.example.com/.well-known/openid-configuration is also served by issuers[0] (https://oidc.example.com/)",
        ),
        (
            "jwks_path on another issuer's discovery path",
            format!(
                "{}[[issuers]]\nissuer = \"https://oidc.example.com/b\"\njwks_path = \"/.well-known/openid-configuration\"\n{SOURCE}",
                valid_with("", "", "")
            ),
            "issuers[1]: https://oidc.example.com/.well-known/openid-configuration is also served by issuers[0] (https://oidc.example.com)",
        ),
        (
            "relative jwks_path",
            valid_with("jwks_path = \"keys\"", "", ""),
            "issuers[0].jwks_path: \"keys\" must start with '/'",
        ),
        (
            "bad duration",
            valid_with("key_retention = \"soon\"", "", ""),
            "issuers[0].key_retention: \"soon\" is not a duration like \"60s\" or \"24h\": expected number at 0",
        ),
        (
            "zero refresh interval",
            valid_with("", "  refresh_interval = \"0s\"", ""),
            "issuers[0].sources[0].refresh_interval: must be longer than zero",
        ),
        (
            "zero idle timeout",
            valid_with("", "", "[limits]\nidle_timeout = \"0s\""),
            "limits.idle_timeout: must be longer than zero",
        ),
        // L11: every duration is bounded; a huge one used to panic inside a task, a tiny one
        // to spin.
        (
            "refresh interval of a nanosecond",
            valid_with("", "  refresh_interval = \"1ns\"", ""),
            "issuers[0].sources[0].refresh_interval: \"1ns\" is not from 1ms to 24h",
        ),
        (
            "refresh interval over a day",
            valid_with("", "  refresh_interval = \"25h\"", ""),
            "issuers[0].sources[0].refresh_interval: \"25h\" is not from 1ms to 24h",
        ),
        (
            "fetch timeout over 5 minutes",
            valid_with("", "  timeout = \"6m\"", ""),
            "issuers[0].sources[0].timeout: \"6m\" is not from 100ms to 5m",
        ),
        (
            "fetch timeout of a microsecond",
            valid_with("", "  timeout = \"1us\"", ""),
            "issuers[0].sources[0].timeout: \"1us\" is not from 100ms to 5m",
        ),
        (
            "key retention over 30 days",
            valid_with("key_retention = \"31days\"", "", ""),
            "issuers[0].key_retention: \"31days\" is not from 1s to 30days",
        ),
        (
            "huge handshake timeout",
            valid_with("", "", "[limits]\nhandshake_timeout = \"500000000years\""),
            "limits.handshake_timeout: \"500000000years\" is not from 1s to 5m",
        ),
        (
            "sub-second header read timeout",
            valid_with("", "", "[limits]\nheader_read_timeout = \"500ms\""),
            "limits.header_read_timeout: \"500ms\" is not from 1s to 5m",
        ),
        (
            "idle timeout over an hour",
            valid_with("", "", "[limits]\nidle_timeout = \"2h\""),
            "limits.idle_timeout: \"2h\" is not from 1s to 1h",
        ),
        (
            "sub-second max staleness",
            valid_with("", "", "[admin]\nmax_staleness = \"10ms\""),
            "admin.max_staleness: \"10ms\" is not from 1s to 30days",
        ),
        (
            "max_keys over the AWS limit",
            valid_with("max_keys = 101", "", ""),
            "issuers[0].max_keys: 101 is not from 1 to 100 (AWS and Azure use at most 100 keys, A-9, Z-4)",
        ),
        (
            "cache max-age too long",
            valid_with("cache_max_age = \"2h\"", "", ""),
            "issuers[0].cache_max_age: must be at most 1h (X-3)",
        ),
        (
            "bad jwks content type",
            valid_with("jwks_content_type = \"text/json\"", "", ""),
            "issuers[0].jwks_content_type: \"text/json\" is not \"application/json\" or \"application/jwk-set+json\"",
        ),
        (
            "no sources",
            format!("{ISSUER}{HTTP}"),
            "issuers[0].sources: at least one [[issuers.sources]] table is required",
        ),
        (
            "unknown source kind",
            valid_with("", "", "").replace("kind = \"file\"", "kind = \"s3\""),
            "issuers[0].sources[0].kind: \"s3\" is not one of \"apiserver\", \"kubeconfig\", \"in-cluster\", \"file\", \"url\", \"push\"",
        ),
        (
            "push target without a token",
            format!("{ISSUER}{SOURCE}  [[issuers.push]]\n  interval = \"1m\"\n"),
            "issuers[0].push[0].token_file: a push needs a token: token_file (a projected token) or service_account (TokenRequest)",
        ),
        (
            "push target with both tokens",
            format!("{ISSUER}{SOURCE}  [[issuers.push]]\n  token_file = \"t\"\n  service_account = \"a/b\"\n"),
            "issuers[0].push[0].token_file: use either token_file (a projected token) or service_account (TokenRequest), not both",
        ),
        (
            "push target minting without an apiserver source",
            format!("{ISSUER}{SOURCE}  [[issuers.push]]\n  service_account = \"oidc-edge/pusher\"\n"),
            "issuers[0].push[0].service_account: needs an apiserver, kubeconfig or in-cluster source: its credentials mint the tokens (TokenRequest)",
        ),
        (
            "push target with a service account that is no NAMESPACE/NAME",
            format!("{ISSUER}{SOURCE}  [[issuers.push]]\n  service_account = \"pusher\"\n"),
            "issuers[0].push[0].service_account: \"pusher\" is not NAMESPACE/NAME",
        ),
        (
            "push target over plain HTTP",
            format!("{ISSUER}{SOURCE}  [[issuers.push]]\n  token_file = \"t\"\n  url = \"http://oidc.example.com/.oidc-edge/v1/jwks\"\n"),
            "issuers[0].push[0].url: \"http://oidc.example.com/.oidc-edge/v1/jwks\" must use https: a push carries a bearer token, which must not cross the network readable",
        ),
        (
            "push source without subject",
            push("  audience = \"https://oidc.example.com/.oidc-edge/v1/jwks\""),
            "issuers[0].sources[0].subject: is required for kind = \"push\"",
        ),
        (
            "push source without audience",
            push("  subject = \"system:serviceaccount:oidc-edge:pusher\""),
            "issuers[0].sources[0].audience: is required for kind = \"push\"",
        ),
        (
            "push source with a subject that is no service account",
            push("  audience = \"a\"\n  subject = \"admin\""),
            "issuers[0].sources[0].subject: \"admin\" is not a service account's token subject (system:serviceaccount:NAMESPACE:NAME)",
        ),
        (
            "two push sources",
            format!(
                "{}{}",
                push("  audience = \"a\"\n  subject = \"system:serviceaccount:a:b\""),
                "[[issuers.sources]]\nkind = \"push\"\naudience = \"a\"\nsubject = \"system:serviceaccount:a:c\"\n"
            ),
            "issuers[0].sources[1].kind: an issuer has at most one push source",
        ),
        (
            "a push key on a file source",
            valid_with("", "  subject = \"system:serviceaccount:a:b\"", ""),
            "issuers[0].sources[0].subject: is not used by kind = \"file\"",
        ),
        (
            "file source without path",
            valid_with("", "", "").replace("  path = \"jwks.json\"\n", ""),
            "issuers[0].sources[0].path: is required for kind = \"file\"",
        ),
        (
            "unknown source key",
            valid_with("", "  intervall = \"5s\"", ""),
            "issuers[0].sources[0].intervall: unknown field `intervall`, expected one of `kind`, `path`, `url`, `ca_file`, `token_file`, `client_cert_file`, `client_key_file`, `kubeconfig`, `context`, `refresh_interval`, `timeout`, `audience`, `subject`, `allow_tokens_without_jti` (line 7, column 3)",
        ),
        (
            "a key of another kind",
            valid_with("", "  token_file = \"token\"", ""),
            "issuers[0].sources[0].token_file: is not used by kind = \"file\"",
        ),
        (
            "apiserver without a CA",
            apiserver("url = \"https://10.0.0.10:6443\""),
            "issuers[0].sources[0].ca_file: is required for kind = \"apiserver\"",
        ),
        (
            "apiserver over http",
            apiserver("url = \"http://10.0.0.10:6443\"\nca_file = \"jwks.json\""),
            "issuers[0].sources[0].url: \"http://10.0.0.10:6443\" must use https: keys are fetched over TLS only",
        ),
        (
            "CA file without a certificate",
            apiserver("url = \"https://10.0.0.10:6443\"\nca_file = \"jwks.json\""),
            "issuers[0].sources[0].ca_file: JWKS_PATH contains no PEM certificate",
        ),
        (
            "token and client certificate together",
            apiserver(
                "url = \"https://10.0.0.10:6443\"\nca_file = \"ca.pem\"\ntoken_file = \"t\"\nclient_cert_file = \"c\"\nclient_key_file = \"k\"",
            ),
            "issuers[0].sources[0].token_file: use either token_file or client_cert_file + client_key_file, not both",
        ),
        (
            "missing kubeconfig",
            apiserver("").replace(
                "kind = \"apiserver\"",
                "kind = \"kubeconfig\"\nkubeconfig = \"absent.yaml\"",
            ),
            "issuers[0].sources[0].kubeconfig: cannot read DIR/absent.yaml: No such file or directory (os error 2)",
        ),
        (
            "bad listen address",
            valid_with("", "", "").replace("127.0.0.1:8080", "localhost"),
            "http.listen: \"localhost\" is not an address like 127.0.0.1:8080: invalid socket address syntax",
        ),
        (
            "no listener",
            format!("{ISSUER}{SOURCE}"),
            "http: no listener is configured: add [http] with listen = \"…\", or [https], or an [[issuers.publish]] or [[issuers.push]] target",
        ),
        (
            "https without certificates",
            valid_with("", "", "[https]\nlisten = \"127.0.0.1:8443\"\n"),
            "https: needs [https.acme] (Let's Encrypt) or [https.files] (certificate files)",
        ),
        (
            "acme contact that is not mailto",
            valid_with(
                "",
                "",
                "[https]\nlisten = \"127.0.0.1:8443\"\n[https.acme]\ncontact = [\"ops@example.com\"]\n",
            ),
            "https.acme.contact: \"ops@example.com\" must be a mailto: URL, like \"mailto:ops@example.com\"",
        ),
        (
            "acme dns-01",
            valid_with(
                "",
                "",
                "[https]\nlisten = \"127.0.0.1:8443\"\n[https.acme]\nchallenge = \"dns-01\"\n",
            ),
            "https.acme.challenge: \"dns-01\" is not \"tls-alpn-01\" or \"http-01\" (rustls-acme has no dns-01)",
        ),
        (
            "acme for an IP address",
            valid_with(
                "",
                "",
                "[https]\nlisten = \"127.0.0.1:8443\"\n[https.acme]\ndomains = [\"10.0.0.1\"]\n",
            ),
            "https.acme.domains: \"10.0.0.1\" is not a lowercase DNS name (punycode for international names)",
        ),
        (
            "acme step timeout above an hour",
            valid_with(
                "",
                "",
                "[https]\nlisten = \"127.0.0.1:8443\"\n[https.acme]\nstep_timeout = \"2h\"\n",
            ),
            "https.acme.step_timeout: must be between \"1s\" and \"1h\"",
        ),
        (
            "certificate file that is not PEM",
            valid_with(
                "",
                "",
                "[https]\nlisten = \"127.0.0.1:8443\"\n[https.files]\ncert_file = \"jwks.json\"\nkey_file = \"jwks.json\"\n",
            ),
            "https.files: JWKS_PATH: no PEM certificate",
        ),
        (
            "redirect without https",
            valid_with("", "", "").replace(
                "listen = \"127.0.0.1:8080\"",
                "listen = \"127.0.0.1:8080\"\nredirect_to_https = true",
            ),
            "http.redirect_to_https: needs an [https] listener to redirect to",
        ),
        (
            "public admin listener",
            valid_with("", "", "[admin]\nlisten = \"0.0.0.0:9090\"\n"),
            "admin.listen: 0.0.0.0:9090 is not a loopback address; the admin endpoints are not for the internet (set allow_remote = true to bind it anyway, e.g. inside a container)",
        ),
        (
            "publish to a URL that is not s3",
            publish("to = \"https://bucket.example.com/site\""),
            "issuers[0].publish[0].to: \"https://bucket.example.com/site\": scheme \"https\" is not \"s3\" (s3://bucket/prefix) or \"az\" (az://container/prefix)",
        ),
        (
            "publish an s3 key on an azure target",
            publish("to = \"az://$web/site\"\nregion = \"auto\""),
            "issuers[0].publish[0].region: is not used by az:// targets",
        ),
        (
            "publish an azure key on an s3 target",
            publish("to = \"s3://bucket\"\naccount_key_file = \"jwks.json\""),
            "issuers[0].publish[0].account_key_file: is not used by s3:// targets",
        ),
        (
            "publish to a bucket with a port",
            publish("to = \"s3://bucket:9000/site\""),
            "issuers[0].publish[0].to: \"s3://bucket:9000/site\": the bucket URL takes no user, password or port; the store's address goes in endpoint",
        ),
        (
            "publish with a dot segment",
            publish("to = \"s3://bucket/a/../b\""),
            "issuers[0].publish[0].to: \"s3://bucket/a/../b\": the prefix has an empty, \".\" or \"..\" segment",
        ),
        (
            "publish endpoint with a path",
            publish("to = \"s3://bucket\"\nendpoint = \"https://store.example.com/bucket\""),
            "issuers[0].publish[0].endpoint: \"https://store.example.com/bucket\" must be a bare origin, like https://host:port, with no path or query",
        ),
        (
            "publish endpoint with a password",
            publish("to = \"s3://bucket\"\nendpoint = \"https://key:SECRET@store.example.com\""),
            "issuers[0].publish[0].endpoint: \"https://***@store.example.com\" must not contain user info (user:password@): it would be shown in logs and /status",
        ),
        (
            "publish with half a key pair",
            publish("to = \"s3://bucket\"\naccess_key_id_file = \"jwks.json\""),
            "issuers[0].publish[0].secret_access_key_file: is required with access_key_id_file",
        ),
        (
            "publish with keys and web identity",
            publish(
                "to = \"s3://bucket\"\naccess_key_id_file = \"jwks.json\"\nsecret_access_key_file = \"jwks.json\"\nrole_arn = \"arn:aws:iam::1:role/r\"\nweb_identity_token_file = \"jwks.json\"",
            ),
            "issuers[0].publish[0].role_arn: set either access_key_id_file and secret_access_key_file, or role_arn and web_identity_token_file, not both",
        ),
        (
            "publish with an http STS",
            publish(
                "to = \"s3://bucket\"\nrole_arn = \"arn:aws:iam::1:role/r\"\nweb_identity_token_file = \"jwks.json\"\nsts_endpoint = \"http://sts.example.com\"",
            ),
            "issuers[0].publish[0].sts_endpoint: \"http://sts.example.com\" must use https: keys are fetched over TLS only",
        ),
        (
            "publish key file missing",
            publish(
                "to = \"s3://bucket\"\naccess_key_id_file = \"nope\"\nsecret_access_key_file = \"jwks.json\"",
            ),
            "issuers[0].publish[0].access_key_id_file: cannot read DIR/nope: No such file or directory (os error 2)",
        ),
        (
            "two targets writing the same object",
            format!(
                "{}  [[issuers.publish]]\n  to = \"s3://bucket/site\"\n",
                publish("to = \"s3://bucket/site/\"")
            ),
            "issuers[0].publish[1].to: s3://bucket/site/.well-known/openid-configuration is also written by issuers[0].publish[0]",
        ),
        (
            "self-test without an apiserver source",
            valid_with("", "", "").replace(
                "  [[issuers.sources]]",
                "  [issuers.selftest]\n  service_account = \"default/checker\"\n  [[issuers.sources]]",
            ),
            "issuers[0].selftest: needs an apiserver, kubeconfig or in-cluster source: its credentials mint the tokens (TokenRequest)",
        ),
        (
            "self-test service account without a namespace",
            apiserver(
                "  url = \"https://127.0.0.1:6443\"\n  ca_file = \"ca.pem\"\n  [issuers.selftest]\n  service_account = \"checker\"",
            ),
            "issuers[0].selftest.service_account: \"checker\" is not NAMESPACE/NAME",
        ),
        (
            "unknown relying_parties key",
            valid_with("", "", "[relying_parties]\nforget = \"1d\"\n"),
            "relying_parties.forget: unknown field `forget`, expected `forget_after` or `user_agents` (line 11, column 1)",
        ),
        (
            "relying-party family name",
            valid_with("", "", "[relying_parties.user_agents]\nAWS = [\"AWS\"]\n"),
            "relying_parties.user_agents.AWS: is not a family name: 1 to 32 lowercase letters, digits, '-' or '_'",
        ),
        (
            "relying-party patterns not a list",
            valid_with("", "", "[relying_parties.user_agents]\nvault = \"Vault/\"\n"),
            "relying_parties.user_agents.vault: invalid type: string \"Vault/\", expected a sequence (line 11, column 9)",
        ),
        (
            "empty relying-party pattern",
            valid_with("", "", "[relying_parties.user_agents]\nvault = [\"Vault/\", \"\"]\n"),
            "relying_parties.user_agents.vault[1]: \"\" is not a User-Agent substring: 1 to 256 printable ASCII characters",
        ),
        (
            "relying-party record kept too briefly",
            valid_with("", "", "[relying_parties]\nforget_after = \"30s\"\n"),
            "relying_parties.forget_after: \"30s\" is not from 1m to 90days",
        ),
        (
            "bad log format",
            valid_with("", "", "[log]\nformat = \"xml\"\n"),
            "log.format: \"xml\" is not \"text\" or \"json\"",
        ),
    ]
}

/// A scratch directory with the files the rows name: `jwks.json` and a CA in `ca.pem`.
fn table_scratch() -> Scratch {
    let scratch = Scratch::new();
    scratch.write("jwks.json", crate::support::K3S);
    scratch.write("ca.pem", &Pki::new("test CA").ca_pem);
    scratch
}

/// The message of a row as `Config`'s error displays it: `<file>: <key>: <message>`.
fn expected_message(scratch: &Scratch, path: &Path, expected: &str) -> String {
    let expected = expected
        .replace(
            "JWKS_PATH",
            &scratch.path("jwks.json").display().to_string(),
        )
        .replace("DIR", &scratch.dir.path().display().to_string());
    format!("{}: {expected}", path.display())
}

/// Every row, in process: loading refuses it with exactly its message. This is what
/// `check-config` and `serve` print after their `oidc-edge: ` prefix (checked through the
/// binary by the next test), without a process per row.
#[test]
fn every_bad_config_is_refused_with_its_one_line_message() {
    let scratch = table_scratch();
    let cases = bad_configs();
    assert!(cases.len() >= 15);
    let mut wrong = Vec::new();
    for (what, text, expected) in cases {
        let path = scratch.write("config.toml", &text);
        let want = expected_message(&scratch, &path, expected);
        match Config::load(&path) {
            Ok(_) => wrong.push(format!("{what}: accepted\n  want: {want}")),
            Err(e) if e.to_string() != want => {
                wrong.push(format!("{what}:\n  got:  {e}\n  want: {want}"));
            }
            Err(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Rows of three kinds (a TOML syntax error, an unknown key located by line and column, a
/// file that validation reads) through `check-config`: exit 64, nothing on stdout, and on
/// stderr the in-process message behind `oidc-edge: `, on one line.
#[test]
fn a_bad_config_exits_64_with_its_message_behind_the_program_name() {
    let scratch = table_scratch();
    let rows = [
        "toml syntax",
        "unknown issuer key",
        "CA file without a certificate",
        "unknown relying_parties key",
    ];
    let cases: Vec<_> = bad_configs()
        .into_iter()
        .filter(|(what, _, _)| rows.contains(what))
        .collect();
    assert_eq!(cases.len(), rows.len());
    for (what, text, expected) in cases {
        let path = scratch.write("config.toml", &text);
        let out = run(&["check-config", "--config", path.to_str().expect("utf-8")]);
        assert_eq!(out.status.code(), Some(64), "{what}");
        assert!(out.stdout.is_empty(), "{what}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!(
                "oidc-edge: {}\n",
                expected_message(&scratch, &path, expected)
            ),
            "{what}"
        );
    }
}

#[test]
fn missing_files_are_named() {
    let scratch = Scratch::new();
    let config = scratch.path("absent.toml");
    let out = run(&["check-config", "--config", config.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "oidc-edge: {}: cannot read the configuration file: No such file or directory (os error 2)\n",
            config.display()
        )
    );

    // L13: a missing JWKS file is no longer a config error (serve starts and serves the
    // persisted set), but check-config still names it, as a warning.
    let config = scratch.write("config.toml", &valid_with("", "", ""));
    let out = run(&["check-config", "--config", config.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "oidc-edge: warning: {}: issuers[0].sources[0].path: cannot read {}: No such file or directory (os error 2); the source's fetches fail until it appears\n",
            config.display(),
            scratch.path("jwks.json").display()
        )
    );

    // What can never work stays an error: a directory where the file should be.
    std::fs::create_dir(scratch.path("jwks.json")).expect("mkdir");
    let out = run(&["check-config", "--config", config.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "oidc-edge: {}: issuers[0].sources[0].path: {} is a directory, not a file\n",
            config.display(),
            scratch.path("jwks.json").display()
        )
    );
}

/// L13: a token file missing at start (the projected token not mounted yet) is a warning; the
/// apiserver source fails its fetches until it appears.
#[test]
fn a_missing_token_file_is_a_warning() {
    let scratch = Scratch::new();
    scratch.write("ca.pem", &Pki::new("test CA").ca_pem);
    let config = scratch.write(
        "config.toml",
        &apiserver(
            "url = \"https://10.0.0.10:6443\"\nca_file = \"ca.pem\"\ntoken_file = \"token\"",
        ),
    );
    let out = run(&["check-config", "--config", config.to_str().expect("utf-8")]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "oidc-edge: warning: {}: issuers[0].sources[0].token_file: cannot read {}: No such file or directory (os error 2); the source's fetches fail until it appears\n",
            config.display(),
            scratch.path("token").display()
        )
    );
}

#[test]
fn serve_with_a_bad_config_exits_64_before_binding() {
    let scratch = Scratch::new();
    scratch.write("jwks.json", crate::support::K3S);
    // The port is taken: had serve bound anything before validating, it would fail with 1.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let text = valid_with("max_keys = 0", "", "").replace(
        "127.0.0.1:8080",
        &taken.local_addr().expect("addr").to_string(),
    );
    let config = scratch.write("config.toml", &text);
    let out = run(&["serve", "--config", config.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("issuers[0].max_keys: 0 is not from 1 to 100")
    );
}

#[test]
fn demo_and_example_configs_are_valid() {
    for name in [
        "config/demo.toml",
        "config/example.toml",
        "config/push-edge.toml",
    ] {
        let path = repo_path(name);
        let out = run(&["check-config", "--config", path.to_str().expect("utf-8")]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.starts_with(&format!("config {}: ok\n", path.display())),
            "{stdout}"
        );
        assert!(
            stdout.contains(
                "  jwks       https://oidc.example.com/openid/v1/jwks (application/json)\n"
            )
        );
    }
}

#[test]
fn config_path_comes_from_the_environment_when_no_flag_is_given() {
    let path = repo_path("config/demo.toml");
    let out = std::process::Command::new(crate::support::bin())
        .arg("check-config")
        .env("OIDC_EDGE_CONFIG", &path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    let out = std::process::Command::new(crate::support::bin())
        .arg("check-config")
        .env_remove("OIDC_EDGE_CONFIG")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("oidc-edge: /etc/oidc-edge/config.toml: ")
    );
}

#[test]
fn usage_errors_exit_64_and_help_and_version_exit_0() {
    assert_eq!(run(&["serve", "--bogus"]).status.code(), Some(64));
    assert_eq!(run(&[]).status.code(), Some(64));
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("check-config"));
    let version = run(&["--version"]);
    assert_eq!(version.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout),
        format!("oidc-edge {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// M5: a password in a source URL would reach every log line, `/status` and this very output.
/// It is refused at config time, and the refusal never echoes it.
#[test]
fn credentials_in_source_urls_are_refused_without_being_echoed() {
    let scratch = Scratch::new();
    scratch.write("ca.pem", &Pki::new("test CA").ca_pem);
    let cases = [
        (
            format!(
                "{ISSUER}  [[issuers.sources]]\n  kind = \"url\"\n  url = \"https://user:S3CRET-PASSWORD@jwks.example.com/keys\"\n{HTTP}"
            ),
            "issuers[0].sources[0].url: \"https://***@jwks.example.com/keys\" must not contain user info (user:password@): it would be shown in logs, /status and metrics",
        ),
        (
            apiserver("url = \"https://S3CRET-PASSWORD@10.0.0.10:6443\"\nca_file = \"ca.pem\""),
            "issuers[0].sources[0].url: \"https://***@10.0.0.10:6443/\" must not contain user info (user:password@): it would be shown in logs, /status and metrics",
        ),
        (
            // Not even a URL: the user info is still cut out of the message.
            format!(
                "{ISSUER}  [[issuers.sources]]\n  kind = \"url\"\n  url = \"https://user:S3CRET-PASSWORD@jwks.example.com:99999/keys\"\n{HTTP}"
            ),
            "issuers[0].sources[0].url: \"https://***@jwks.example.com:99999/keys\" is not a URL: invalid port number",
        ),
    ];
    for (text, expected) in cases {
        let path = scratch.write("config.toml", &text);
        let out = run(&["check-config", "--config", path.to_str().expect("utf-8")]);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert_eq!(
            stderr,
            format!("oidc-edge: {}: {expected}\n", path.display())
        );
        assert!(
            !stdout.contains("S3CRET") && !stderr.contains("S3CRET"),
            "{stdout}{stderr}"
        );
    }
}
