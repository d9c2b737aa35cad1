//! One target's bucket, through object_store: the write protocol that never breaks a relying
//! party. Per document, JWKS first: look at what the bucket holds (one HEAD), write only what
//! differs, read the written object back and compare it with what `serve` answers.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use aws_lc_rs::digest;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, AttributeValue, Attributes, BackoffConfig, ClientOptions, GetOptions, ObjectStore,
    PutMode, PutOptions, PutPayload, RetryConfig,
};

use super::connector::PublicRoots;
use super::target::{PublishTarget, Store};
use crate::display::error_chain;
use crate::jwks::store::Document;

/// The user metadata key that carries the SHA-256 of the body (`x-amz-meta-sha256`). An ETag
/// is the body's MD5 only for some uploads (not multipart, not SSE-KMS), so change detection
/// reads this instead (s3-publish-facts §4).
const SHA256_METADATA: &str = "sha256";

/// Retries of one failed request (a 5xx, a reset connection) within the target's timeout;
/// the next publish attempt retries the rest.
const MAX_RETRIES: usize = 2;

/// A bucket prefix, opened with its credentials.
#[derive(Debug)]
pub struct Bucket {
    target: PublishTarget,
    store: Arc<dyn ObjectStore>,
    /// Fetches `public_url` as a relying party would: no proxy, no redirects, Mozilla's
    /// roots (and ca_file).
    public: Option<(url::Url, reqwest::Client)>,
}

/// What one document needs in the bucket.
#[derive(Debug)]
pub struct Wanted<'a> {
    /// The path `serve` answers it at, e.g. `/openid/v1/jwks`.
    pub path: &'a str,
    pub document: &'a Document,
}

/// What a sync did: the object URLs written, in order, and those already right.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Synced {
    pub written: Vec<String>,
    pub unchanged: Vec<String>,
    /// How the target's `public_url` differs from what the bucket holds, one line per
    /// document (empty: the same bytes and content type, or no `public_url`).
    pub public_differences: Vec<String>,
}

/// What a relying party allows a fetch (AWS's budget, A-7 in relying-party-rules).
const PUBLIC_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

impl Bucket {
    /// Opens the target's bucket with the credentials its settings or the environment give.
    /// Nothing goes on the network yet.
    pub fn open(target: &PublishTarget) -> anyhow::Result<Self> {
        let to = &target.to;
        let connect_timeout = target.timeout.min(Duration::from_secs(5));
        let mut options = ClientOptions::new()
            .with_timeout(target.timeout)
            .with_connect_timeout(connect_timeout);
        let ca = match &target.ca_file {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("{to}: cannot read ca_file {}", path.display()))?,
            ),
            None => None,
        };
        let connector =
            PublicRoots::new(ca.as_deref(), target.timeout, connect_timeout).map_err(|e| {
                let path = target
                    .ca_file
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""));
                anyhow!("{to}: ca_file {}: {e}", path.display())
            })?;
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: MAX_RETRIES,
            retry_timeout: target.timeout,
        };
        if let Some(endpoint) = &target.endpoint {
            options = options.with_allow_http(endpoint.scheme() == "http");
        }
        let public = match &target.public_url {
            Some(url) => Some((
                url.clone(),
                connector
                    .relying_party(PUBLIC_FETCH_TIMEOUT)
                    .map_err(|e| anyhow!("{to}: {e}"))?,
            )),
            None => None,
        };
        let store = match &target.store {
            Store::S3 {
                region,
                credentials,
            } => super::s3::open(
                target,
                region.as_deref(),
                credentials,
                options,
                retry,
                connector,
            )?,
            Store::Azure {
                account,
                credentials,
            } => super::azure::open(
                target,
                account.as_deref(),
                credentials,
                options,
                retry,
                connector,
            )?,
        };
        Ok(Self {
            target: target.clone(),
            store,
            public,
        })
    }

    pub fn target(&self) -> &PublishTarget {
        &self.target
    }

    /// Makes the bucket hold `documents`, in the order given (the JWKS first, so that a
    /// discovery document never points at a key set older than itself). Stops at the first
    /// failure: what follows it is left as it was, and the next attempt starts over.
    pub async fn sync(&self, documents: &[Wanted<'_>]) -> anyhow::Result<Synced> {
        let mut synced = Synced::default();
        for wanted in documents {
            let key = self.target.key(wanted.path);
            let url = self.target.object_url(&key);
            let location = ObjectPath::parse(&key).with_context(|| format!("{url}: bad key"))?;
            let doc = wanted.document;
            let attributes = attributes_of(doc);
            let current = self.attributes(&location).await.map_err(|e| at(&url, &e))?;
            if current.as_ref().is_some_and(|have| same(have, &attributes)) {
                synced.unchanged.push(url);
                continue;
            }
            let put = PutOptions {
                mode: PutMode::Overwrite,
                attributes: attributes.clone(),
                ..PutOptions::default()
            };
            self.store
                .put_opts(&location, PutPayload::from_bytes(doc.body.clone()), put)
                .await
                .map_err(|e| at(&url, &e))?;
            self.read_back(&location, &url, doc, &attributes).await?;
            synced.written.push(url);
        }
        if let Some((base, client)) = &self.public {
            for wanted in documents {
                if let Some(difference) = Self::public_difference(client, base, wanted).await {
                    synced.public_differences.push(difference);
                }
            }
        }
        Ok(synced)
    }

    /// How `base` + the document's path differs from the document, as a relying party fetches it:
    /// status, content type, bytes. A CDN may serve the previous bytes for up to `max-age` after a
    /// write, so a difference right after one is expected once, and reported for the operator to
    /// judge.
    async fn public_difference(
        client: &reqwest::Client,
        base: &url::Url,
        wanted: &Wanted<'_>,
    ) -> Option<String> {
        let url = format!("{}{}", base.as_str().trim_end_matches('/'), wanted.path);
        let response = match client.get(&url).send().await {
            Ok(response) => response,
            Err(e) => return Some(format!("{url}: {}", one_line(&error_chain(&e)))),
        };
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            return Some(format!("{url}: answers {status}, not 200 OK"));
        }
        let served_type = response.headers().get(http::header::CONTENT_TYPE).cloned();
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(e) => return Some(format!("{url}: {}", one_line(&error_chain(&e)))),
        };
        let doc = wanted.document;
        if served_type.as_ref() != Some(&doc.content_type) {
            let shown = served_type.as_ref().map_or("(none)".into(), |v| {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            });
            return Some(format!(
                "{url}: content type {shown:?}, not the {:?} the bucket holds (a CDN or bucket rule rewrites it)",
                doc.content_type.to_str().unwrap_or_default()
            ));
        }
        if body != doc.body {
            return Some(format!(
                "{url}: serves {} bytes that differ from the bucket's {} (a cache not expired yet: {})",
                body.len(),
                doc.body.len(),
                doc.cache_control.to_str().unwrap_or_default()
            ));
        }
        None
    }

    /// The attributes of the object at `location`, or `None` when there is none.
    async fn attributes(
        &self,
        location: &ObjectPath,
    ) -> Result<Option<Attributes>, object_store::Error> {
        let head = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        match self.store.get_opts(location, head).await {
            Ok(found) => Ok(Some(found.attributes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads the object just written and compares it with `doc`: a store that rewrites
    /// bodies or drops headers (a gateway, a bucket policy) is caught here, not by AWS.
    async fn read_back(
        &self,
        location: &ObjectPath,
        url: &str,
        doc: &Document,
        wanted: &Attributes,
    ) -> anyhow::Result<()> {
        let got = self
            .store
            .get_opts(location, GetOptions::default())
            .await
            .map_err(|e| at(url, &e))?;
        let attributes = got.attributes.clone();
        let body = got.bytes().await.map_err(|e| at(url, &e))?;
        if body != doc.body {
            bail!(
                "{url}: read back {} bytes that differ from the {} written",
                body.len(),
                doc.body.len()
            );
        }
        for attribute in [Attribute::ContentType, Attribute::CacheControl] {
            let (want, have) = (wanted.get(&attribute), attributes.get(&attribute));
            if want != have {
                bail!(
                    "{url}: read back {attribute:?} {:?}, not the {:?} written",
                    have.map(AsRef::<str>::as_ref).unwrap_or("(none)"),
                    want.map(AsRef::<str>::as_ref).unwrap_or("(none)"),
                );
            }
        }
        Ok(())
    }
}

/// The headers a document is served with, as object attributes, and its SHA-256.
fn attributes_of(doc: &Document) -> Attributes {
    let text = |v: &http::HeaderValue| {
        AttributeValue::from(v.to_str().expect("our headers are ASCII").to_owned())
    };
    Attributes::from_iter([
        (Attribute::ContentType, text(&doc.content_type)),
        (Attribute::CacheControl, text(&doc.cache_control)),
        (
            Attribute::Metadata(SHA256_METADATA.into()),
            AttributeValue::from(sha256_hex(&doc.body)),
        ),
    ])
}

/// Whether the object already holds the document: same body hash, same headers.
fn same(have: &Attributes, want: &Attributes) -> bool {
    want.iter().all(|(key, value)| have.get(key) == Some(value))
}

fn sha256_hex(body: &[u8]) -> String {
    digest::digest(&digest::SHA256, body)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A non-empty environment variable.
pub(super) fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `url: error: causes` on one line: a store's error carries its XML body, with newlines,
/// and reqwest keeps the useful part ("operation timed out", "Connection refused") in the
/// source chain.
fn at(url: &str, error: &object_store::Error) -> anyhow::Error {
    anyhow!("{url}: {}", one_line(&error_chain(error)))
}

pub(super) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_is_lowercase_hex_of_the_body() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn errors_are_one_line() {
        assert_eq!(
            one_line("a\n  <Error>\n\tb</Error>\n"),
            "a <Error> b</Error>"
        );
    }
}
