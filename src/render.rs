//! `oidc-edge render`: the seed workflows, automated. The configured sources are fetched once
//! through the same validation and merge as `serve`, and the documents are written as files,
//! byte-identical to what `serve` answers, plus what the host needs to serve them with the
//! right headers: `_headers` for Cloudflare Pages, or an object manifest for S3.
//!
//! L6: each issuer goes through `serve`'s own pipeline, driven once: restore the ledger from
//! `[state] dir`, refresh every source, save the ledger back. So a key that vanished upstream
//! stays published for `key_retention` across renders (cron, CI) as it does in `serve`
//! (X-6, Z-9), and the bytes are `serve`'s by construction, not by a second copy of the merge.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use serde::Serialize;

use crate::config::Config;
use crate::http::headers;
use crate::jwks::refresh::IssuerRuntime;
use crate::jwks::store::{Document, DocumentStore};
use crate::metrics::Metrics;
use crate::state::{create_state_dir, write_public};

/// What `render` writes besides the documents, for the host that serves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// A Cloudflare Pages `_headers` file.
    Pages,
    /// An S3 object manifest, `s3-objects.json`.
    S3,
}

/// Where and how to write.
#[derive(Debug, Clone)]
pub struct Options {
    pub out: PathBuf,
    pub layout: Layout,
}

/// One written object and the headers it must be served with.
#[derive(Debug, Clone, Serialize)]
pub struct Object {
    /// Path below the output directory, without a leading `/`.
    pub key: String,
    pub content_type: String,
    pub cache_control: String,
}

impl Object {
    /// The object at `path` holding `doc`, with `doc`'s own headers.
    fn new(path: &str, doc: &Document) -> Self {
        let text = |v: &http::HeaderValue| v.to_str().expect("our headers are ASCII").to_owned();
        Self {
            key: path.trim_start_matches('/').to_owned(),
            content_type: text(&doc.content_type),
            cache_control: text(&doc.cache_control),
        }
    }
}

/// Fetches every source once and writes the tree under `options.out`. Several hosts each get
/// a directory named after the host (a Pages site or bucket per host).
///
/// Any failing source, refused set or refused merge fails the render before that issuer's
/// files are touched, so the files already published stay the last good ones. So does a
/// state file that cannot be written: the next render would otherwise drop retained keys.
pub async fn render(config: &Config, options: &Options) -> anyhow::Result<Vec<Object>> {
    let out = &options.out;
    let mut hosts: Vec<&str> = config
        .issuers
        .iter()
        .map(|i| i.endpoint.issuer.host())
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    let per_host = hosts.len() > 1;
    create_state_dir(&config.state_dir)?;
    let store = Arc::new(DocumentStore::new(config.issuers.len()));
    let metrics = Arc::new(Metrics::new());
    let mut written: Vec<(PathBuf, Object)> = Vec::new();
    for (index, cfg) in config.issuers.iter().enumerate() {
        let endpoint = &cfg.endpoint;
        let snapshot = IssuerRuntime::refreshed_snapshot(
            index,
            endpoint,
            cfg.keys,
            &cfg.sources,
            &config.state_dir,
            &store,
            &metrics,
        )
        .await?;
        let base = if per_host {
            out.join(endpoint.issuer.host())
        } else {
            out.to_owned()
        };
        for (path, doc) in [
            (&endpoint.discovery_path, &snapshot.discovery),
            (&endpoint.jwks_path, &snapshot.jwks),
        ] {
            let object = Object::new(path, doc);
            let file = base.join(&object.key);
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            write_public(&file, &doc.body)
                .with_context(|| format!("cannot write {}", file.display()))?;
            written.push((base.clone(), object));
        }
    }
    let mut bases: Vec<&PathBuf> = written.iter().map(|(b, _)| b).collect();
    bases.dedup();
    for base in bases {
        let objects: Vec<&Object> = written
            .iter()
            .filter(|(b, _)| b == base)
            .map(|(_, o)| o)
            .collect();
        match options.layout {
            Layout::Pages => {
                let file = base.join("_headers");
                write_public(&file, pages_headers(&objects).as_bytes())
                    .with_context(|| format!("cannot write {}", file.display()))?;
            }
            Layout::S3 => {
                let file = base.join("s3-objects.json");
                let mut json = serde_json::to_vec_pretty(&objects).expect("objects serialise");
                json.push(b'\n');
                write_public(&file, &json)
                    .with_context(|| format!("cannot write {}", file.display()))?;
            }
        }
    }
    Ok(written.into_iter().map(|(_, o)| o).collect())
}

/// Cloudflare Pages' `_headers`: the seed's content types, plus the headers `serve` sends.
fn pages_headers(objects: &[&Object]) -> String {
    let (cors, nosniff) = (headers::ANY_ORIGIN, headers::NOSNIFF);
    let (cors, nosniff) = (
        cors.to_str().expect("ASCII"),
        nosniff.to_str().expect("ASCII"),
    );
    let mut text = String::new();
    for object in objects {
        let _ = write!(
            text,
            "/{}\n  Content-Type: {}\n  Cache-Control: {}\n  Access-Control-Allow-Origin: {cors}\n  X-Content-Type-Options: {nosniff}\n",
            object.key, object.content_type, object.cache_control
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::SocketAddr;
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::server::Server;

    const ISSUER_HOST: &str = "oidc.example.com";

    /// One file source, state and both listeners on port 0: the smallest `serve` that can
    /// share a config and a state dir with `render`.
    const CONFIG: &str = r#"
[[issuers]]
issuer = "https://oidc.example.com"

  [[issuers.sources]]
  kind = "file"
  path = "jwks.json"

[http]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[state]
dir = "state"
"#;

    fn fixture(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwks")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn kids(jwks: &[u8]) -> BTreeSet<String> {
        let doc: serde_json::Value = serde_json::from_slice(jwks).expect("a JWKS is JSON");
        doc["keys"]
            .as_array()
            .expect("a JWKS has keys")
            .iter()
            .map(|k| k["kid"].as_str().expect("every key has a kid").to_owned())
            .collect()
    }

    /// `_headers` read back: path → header name (lower case) → value.
    fn pages_rules(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut rules: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut path = "";
        for line in text.lines() {
            if let Some(header) = line.strip_prefix("  ") {
                assert!(!path.is_empty(), "a header follows its path");
                let (name, value) = header.split_once(": ").expect("`Name: value`");
                let headers = rules.entry(path.to_owned()).or_default();
                headers.insert(name.to_ascii_lowercase(), value.to_owned());
            } else if !line.is_empty() {
                path = line;
            }
        }
        rules
    }

    /// Waits until serve's own first fetch of the source went through the pipeline, so that
    /// what is compared below is serve's merge, not only the state it restored from render.
    async fn first_refresh_done(client: &reqwest::Client, admin: SocketAddr) {
        let url = format!("http://{admin}/status");
        for _ in 0..200 {
            let status: serde_json::Value = serde_json::from_slice(
                &client
                    .get(&url)
                    .send()
                    .await
                    .expect("admin answers")
                    .bytes()
                    .await
                    .expect("status body"),
            )
            .expect("status is JSON");
            if !status["issuers"][0]["sources"][0]["last_success"].is_null() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("serve did not refresh its source within 10 s");
    }

    #[tokio::test]
    async fn serve_answers_the_bytes_and_headers_render_wrote_with_rotated_out_keys_retained() {
        let dir = tempfile::tempdir().expect("tempdir");
        let jwks_file = dir.path().join("jwks.json");
        let (before, after) = (fixture("k3s.json"), fixture("rotated.json"));
        std::fs::write(&jwks_file, &before).expect("write jwks.json");
        let config = Config::from_toml_str(CONFIG, &dir.path().join("config.toml"))
            .expect("the config is valid");
        let options = Options {
            out: dir.path().join("site"),
            layout: Layout::Pages,
        };

        render(&config, &options).await.expect("first render");
        // The rotation: one k3s key is replaced, the other stays.
        std::fs::write(&jwks_file, &after).expect("rotate jwks.json");
        render(&config, &options).await.expect("second render");

        let endpoint = &config.issuers[0].endpoint;
        let paths = [&endpoint.discovery_path, &endpoint.jwks_path];
        let rendered: Vec<Vec<u8>> = paths
            .iter()
            .map(|p| std::fs::read(options.out.join(p.trim_start_matches('/'))).expect("rendered"))
            .collect();
        let union: BTreeSet<String> = kids(&before).union(&kids(&after)).cloned().collect();
        assert!(
            kids(&before) != kids(&after),
            "the fixtures must differ by a rotation"
        );
        // X-6, Z-9: the key k3s.json had and rotated.json lacks stays for key_retention (24 h).
        assert_eq!(kids(&rendered[1]), union);
        let headers = std::fs::read_to_string(options.out.join("_headers")).expect("_headers");
        let rules = pages_rules(&headers);

        // serve on the same config and state dir: it restores the ledger render saved, then
        // merges rotated.json (still in place) against it.
        let server = Server::bind(config.clone()).await.expect("serve binds");
        let http = server.http_addr().expect("[http] is configured");
        let admin = server.admin_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        // The issuer's own host name, as a relying party asks for it.
        let client = reqwest::Client::builder()
            .no_proxy()
            .resolve(ISSUER_HOST, http)
            .build()
            .expect("client");
        first_refresh_done(&client, admin).await;

        for (path, body) in paths.iter().zip(&rendered) {
            let url = format!("http://{ISSUER_HOST}:{}{path}", http.port());
            let response = client.get(&url).send().await.expect("serve answers");
            assert_eq!(response.status(), reqwest::StatusCode::OK, "{path}");
            let want = rules
                .get(path.as_str())
                .unwrap_or_else(|| panic!("{path} in _headers"));
            for name in ["content-type", "cache-control"] {
                assert!(want.contains_key(name), "_headers gives {path} a {name}");
            }
            for (name, value) in want {
                let got = response
                    .headers()
                    .get(name)
                    .map(|v| v.to_str().expect("ASCII"));
                assert_eq!(got, Some(value.as_str()), "{name} of {path}");
            }
            let served = response.bytes().await.expect("body");
            assert!(
                served == body.as_slice(),
                "{path}: serve's bytes differ from render's"
            );
        }

        stop.send(()).expect("the server is still running");
        running
            .await
            .expect("the server task did not panic")
            .expect("the server stopped cleanly");
    }
}
