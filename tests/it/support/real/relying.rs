//! Two relying parties that verify tokens against what oidc-edge publishes, written by others
//! and configured as their users would (shared notes real-parts.md §3):
//! - Envoy's `jwt_authn` filter, given the issuer, the audiences and a `remote_jwks` URI (it
//!   does no discovery);
//! - Apache httpd with mod_oauth2, given the discovery URL (`OAuth2TokenVerify metadata`), which
//!   it follows to the `jwks_uri`; it does not compare `iss` by itself, so its users add
//!   `Require oauth2_claim iss:…` beside `aud:…` (real-parts §3).
//!
//! Both fetch `https://oidc.example.test/…` for real, with TLS verified against the test CA,
//! without any global change:
//! - Envoy runs on the machine's loopback: its upstream cluster is oidc-edge's HTTPS listener
//!   (127.0.0.1, its port), with SNI `oidc.example.test`, the test CA as `trusted_ca` and the SAN
//!   checked. That is how Envoy is configured in production too (a cluster per upstream; the URI
//!   only gives the Host and path), so nothing is bent for the test.
//! - mod_oauth2 fetches through libcurl, whose address comes from the resolver (liboauth2 has no
//!   resolve override), so httpd runs in namespaces of its own, as SeaweedFS does (see
//!   `support/real.rs`): a private `/etc/hosts`, port 443 of its own loopback relayed to
//!   oidc-edge, and the test CA bind-mounted over Debian's CA bundle, which libcurl reads by
//!   default. Its listener comes back through a Unix socket to 127.0.0.1 port 0 on the test's side.
//!
//! Both run in the foreground with their own configuration, logs and PID file in a temporary
//! directory, and are killed by PID when their handle drops, also when a test fails.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{Bridge, ISSUER_HOST, Proc, find_parts, wait_for};
use crate::support::pebble::free_tcp_port;

/// The binaries of the relying parties.
#[derive(Debug, Clone)]
pub struct RelyingBins {
    pub envoy: PathBuf,
    pub apache2: PathBuf,
    pub mod_oauth2: PathBuf,
}

impl RelyingBins {
    /// The binaries, or `None` (after saying so) when one is missing and
    /// `OIDC_EDGE_SKIP_REAL=1`; a missing one otherwise fails the test, naming `tests/real/setup`.
    pub fn find() -> Option<Self> {
        let [envoy, apache2, mod_oauth2] = find_parts(
            "relying parties",
            [
                "OIDC_EDGE_ENVOY",
                "OIDC_EDGE_APACHE2",
                "OIDC_EDGE_MOD_OAUTH2",
            ],
            &[],
        )?;
        Some(Self {
            envoy,
            apache2,
            mod_oauth2,
        })
    }
}

/// An answer of a relying party: status and body.
pub type Answer = (u16, String);

async fn get_with(http: &reqwest::Client, url: &str, token: Option<&str>) -> Answer {
    let mut request = http.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e:?}"));
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// Envoy with one `jwt_authn` provider for `issuer` and `audience`, answering 200 `verified`
/// behind it.
#[derive(Debug)]
pub struct Envoy {
    proc: Proc,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy; its JWKS fetches for `jwks_uri` (an `https://oidc.example.test/…` URL) go
    /// to `issuer_https`, whose certificate must chain to `ca_pem`. Waits until it answers.
    pub async fn start(
        bins: &RelyingBins,
        issuer: &str,
        audience: &str,
        jwks_uri: &str,
        issuer_https: SocketAddr,
        ca_pem: &str,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ca_pem).expect("ca.pem");
        // Pick-then-spawn, as for etcd: Envoy has no way to report a port it chose for a
        // listener.
        let port = free_tcp_port();
        let config = serde_json::json!({
            "static_resources": {
                "listeners": [{
                    "name": "in",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "in",
                            "route_config": {"virtual_hosts": [{
                                "name": "all",
                                "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, "direct_response": {
                                    "status": 200, "body": {"inline_string": "verified\n"}}}],
                            }]},
                            "http_filters": [
                                {"name": "envoy.filters.http.jwt_authn", "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                                    "providers": {"k8s": {
                                        "issuer": issuer,
                                        "audiences": [audience],
                                        "remote_jwks": {
                                            "http_uri": {"uri": jwks_uri, "cluster": "oidc_edge",
                                                "timeout": "5s"},
                                            "cache_duration": "300s",
                                        },
                                    }},
                                    "rules": [{"match": {"prefix": "/"},
                                        "requires": {"provider_name": "k8s"}}],
                                }},
                                {"name": "envoy.filters.http.router", "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                            ],
                        },
                    }]}],
                }],
                "clusters": [{
                    "name": "oidc_edge",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "load_assignment": {"cluster_name": "oidc_edge", "endpoints": [{"lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {
                            "address": issuer_https.ip().to_string(),
                            "port_value": issuer_https.port()}}}},
                    ]}]},
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        "sni": ISSUER_HOST,
                        "common_tls_context": {"validation_context": {
                            "trusted_ca": {"filename": ca.display().to_string()},
                            "match_typed_subject_alt_names": [
                                {"san_type": "DNS", "matcher": {"exact": ISSUER_HOST}}],
                        }},
                    }},
                }],
            },
        });
        let config_path = dir.path().join("envoy.json");
        std::fs::write(&config_path, config.to_string()).expect("envoy.json");
        let mut proc = Proc::spawn(
            "envoy",
            Command::new(&bins.envoy)
                .arg("-c")
                .arg(&config_path)
                .args(["--disable-hot-restart", "--concurrency", "1"])
                .args(["--log-level", "warning"]),
            &dir.path().join("envoy.log"),
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let http = crate::support::clients::client();
        let url = format!("http://{addr}/");
        wait_for(
            "Envoy to answer",
            Duration::from_secs(60),
            || proc.assert_running("answering"),
            || async { http.get(&url).send().await.ok().map(|_| ()) },
        )
        .await;
        Self {
            proc,
            addr,
            _dir: dir,
        }
    }

    /// `GET /` with `token` as the bearer token (none: no `Authorization`).
    pub async fn get(&self, token: Option<&str>) -> Answer {
        let http = crate::support::clients::client();
        get_with(&http, &format!("http://{}/", self.addr), token).await
    }

    /// The last lines of Envoy's output, for failure messages.
    pub fn log(&self) -> String {
        self.proc.tail()
    }
}

/// Apache httpd with mod_oauth2 protecting `/ok` for `issuer` and `audience`, in namespaces of
/// its own (see the module docs).
#[derive(Debug)]
pub struct Apache {
    // Dropped in this order: the processes, then the bridges, then the directory.
    proc: Proc,
    issuer_bridge: Bridge,
    _http_bridge: Bridge,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// The port httpd listens on inside its network namespace, which has no other listener but
/// the relay on 443.
const INNER_PORT: u16 = 8080;

impl Apache {
    /// Starts httpd; its connections to `https://oidc.example.test` reach `issuer_https`, whose
    /// certificate must chain to `ca_pem`. Waits until it answers.
    pub async fn start(
        bins: &RelyingBins,
        issuer: &str,
        audience: &str,
        discovery_url: &str,
        issuer_https: SocketAddr,
        ca_pem: &str,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let write = |name: &str, text: &str| std::fs::write(d.join(name), text).expect("write");
        write("ca.pem", ca_pem);
        write("hosts", &format!("127.0.0.1 localhost {ISSUER_HOST}\n"));
        for sub in ["htdocs", "logs", "run"] {
            std::fs::create_dir(d.join(sub)).expect("dir");
        }
        write("htdocs/ok", "verified\n");
        let modules = Path::new("/usr/lib/apache2/modules");
        let module = |name: &str, file: &str| {
            format!("LoadModule {name} {}\n", modules.join(file).display())
        };
        let config = format!(
            "ServerRoot \"{root}\"\n\
             ServerName localhost\n\
             Listen 127.0.0.1:{INNER_PORT}\n\
             PidFile \"{root}/run/httpd.pid\"\n\
             DefaultRuntimeDir \"{root}/run\"\n\
             Mutex file:{root}/run default\n\
             ErrorLog \"{root}/logs/error.log\"\n\
             LogLevel warn oauth2:info\n\
             {mpm}{authn}{authz}\
             LoadModule oauth2_module {oauth2}\n\
             DocumentRoot \"{root}/htdocs\"\n\
             <Location />\n\
             \x20 AuthType oauth2\n\
             \x20 OAuth2TokenVerify metadata {discovery_url}\n\
             \x20 <RequireAll>\n\
             \x20   Require oauth2_claim iss:{issuer}\n\
             \x20   Require oauth2_claim aud:{audience}\n\
             \x20 </RequireAll>\n\
             </Location>\n",
            root = d.display(),
            mpm = module("mpm_prefork_module", "mod_mpm_prefork.so"),
            authn = module("authn_core_module", "mod_authn_core.so"),
            authz = module("authz_core_module", "mod_authz_core.so"),
            oauth2 = bins.mod_oauth2.display(),
        );
        write("httpd.conf", &config);
        // Runs as the namespace's first process: when it dies, the kernel kills the others.
        write(
            "inner.sh",
            r#"set -e
ip link set lo up
mount --bind "$D/hosts" /etc/hosts
# The test CA as the system roots: libcurl's default CA bundle on Debian.
mount --bind "$D/ca.pem" /etc/ssl/certs/ca-certificates.crt
socat TCP-LISTEN:443,bind=127.0.0.1,fork,reuseaddr "UNIX-CONNECT:$D/issuer.sock" &
socat "UNIX-LISTEN:$D/httpd.sock,fork" "TCP:127.0.0.1:$PORT" &
# httpd switches to its `User` when it runs as root, and refuses to serve as root: a nested
# user namespace without a mapping makes it an unprivileged user (its files stay readable, as
# the kernel checks the real IDs).
unshare --user -- "$APACHE2" -X -f "$D/httpd.conf" &
wait
"#,
        );
        let issuer_bridge = Bridge::unix_to_tcp(&d.join("issuer.sock"), issuer_https);
        let (http_bridge, addr) = Bridge::tcp_to_unix(&d.join("httpd.sock"));
        let mut proc = Proc::spawn(
            "apache2 (in unshare)",
            Command::new("unshare")
                .args(["--user", "--map-root-user", "--net", "--mount", "--pid"])
                .args(["--fork", "--kill-child", "--", "sh"])
                .arg(d.join("inner.sh"))
                .env("D", d)
                .env("PORT", INNER_PORT.to_string())
                .env("APACHE2", &bins.apache2),
            &d.join("apache2.log"),
        );
        let http = crate::support::clients::client();
        let url = format!("http://{addr}/ok");
        // Without a token mod_oauth2 answers 401; anything else means httpd is not up yet
        // (the relay answers a reset before).
        wait_for(
            "httpd to answer",
            Duration::from_secs(60),
            || proc.assert_running("answering"),
            || async {
                let response = http.get(&url).send().await.ok()?;
                (response.status() == 401).then_some(())
            },
        )
        .await;
        Self {
            proc,
            issuer_bridge,
            _http_bridge: http_bridge,
            addr,
            dir,
        }
    }

    /// `GET /ok` with `token` as the bearer token (none: no `Authorization`).
    pub async fn get(&self, token: Option<&str>) -> Answer {
        let http = crate::support::clients::client();
        get_with(&http, &format!("http://{}/ok", self.addr), token).await
    }

    /// Connections httpd has opened to the issuer so far.
    pub fn issuer_connections(&self) -> usize {
        self.issuer_bridge
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The lines of httpd's error log so far.
    pub fn error_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("logs/error.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The process output and httpd's error log, for failure messages.
    pub fn log(&self) -> String {
        let error_log =
            std::fs::read_to_string(self.dir.path().join("logs/error.log")).unwrap_or_default();
        format!("{}\n{error_log}", self.proc.tail())
    }
}
