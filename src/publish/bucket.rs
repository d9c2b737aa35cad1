//! One target's bucket, through object_store: the write protocol that never breaks a relying
//! party. Per document, JWKS first: look at what the bucket holds (one HEAD), write only what
//! differs, read the written object back and compare it with what `serve` answers.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use aws_lc_rs::digest;
use object_store::aws::{
    AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsCredential, AwsCredentialProvider,
};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, AttributeValue, Attributes, BackoffConfig, Certificate, ClientOptions,
    CredentialProvider, GetOptions, ObjectStore as _, PutMode, PutOptions, PutPayload, RetryConfig,
};

use super::target::{Credentials, PublishTarget};
use crate::display::error_chain;
use crate::jwks::store::Document;

/// The user metadata key that carries the SHA-256 of the body (`x-amz-meta-sha256`). An ETag
/// is the body's MD5 only for some uploads (not multipart, not SSE-KMS), so change detection
/// reads this instead (s3-publish-facts §4).
const SHA256_METADATA: &str = "sha256";

/// The signing region when neither the target nor the environment names one.
const DEFAULT_REGION: &str = "us-east-1";

/// Retries of one failed request (a 5xx, a reset connection) within the target's timeout;
/// the next publish attempt retries the rest.
const MAX_RETRIES: usize = 2;

/// A bucket prefix, opened with its credentials.
#[derive(Debug)]
pub struct Bucket {
    target: PublishTarget,
    store: AmazonS3,
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
}

impl Bucket {
    /// Opens the target's bucket with the credentials its settings or the environment give.
    /// Nothing goes on the network yet.
    pub fn open(target: &PublishTarget) -> anyhow::Result<Self> {
        let to = &target.to;
        let mut options = ClientOptions::new()
            .with_timeout(target.timeout)
            .with_connect_timeout(target.timeout.min(Duration::from_secs(5)));
        if let Some(path) = &target.ca_file {
            let pem = std::fs::read(path)
                .with_context(|| format!("{to}: cannot read ca_file {}", path.display()))?;
            let certs = Certificate::from_pem_bundle(&pem)
                .map_err(|e| anyhow!("{to}: ca_file {}: {e}", path.display()))?;
            for cert in certs {
                options = options.with_root_certificate(cert);
            }
        }
        let region = target
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| DEFAULT_REGION.to_owned());
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&target.bucket)
            .with_region(region)
            // Path style (`endpoint/bucket/key`) works on S3, R2, B2 and self-hosted stores
            // alike, and keeps dotted bucket names inside the certificate's name.
            .with_virtual_hosted_style_request(false)
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: MAX_RETRIES,
                retry_timeout: target.timeout,
            });
        if let Some(endpoint) = &target.endpoint {
            options = options.with_allow_http(endpoint.scheme() == "http");
            builder = builder.with_endpoint(endpoint.as_str().trim_end_matches('/'));
        }
        // Before the credentials: the STS client takes the same roots and timeouts.
        builder = builder.with_client_options(options);
        let store = with_credentials(builder, to, &target.credentials)?
            .build()
            .map_err(|e| anyhow!("{to}: {}", one_line(&e.to_string())))?;
        Ok(Self {
            target: target.clone(),
            store,
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
        Ok(synced)
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

fn with_credentials(
    builder: AmazonS3Builder,
    to: &str,
    credentials: &Credentials,
) -> anyhow::Result<AmazonS3Builder> {
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map(|text| text.trim().to_owned())
            .with_context(|| format!("{to}: cannot read {what} {}", path.display()))
    };
    // object_store's own exchange (it re-reads the token file, caches the credentials until
    // shortly before they expire), wrapped so that its failures say they are the exchange:
    // its errors only name "POST REDACTED".
    let web_identity = |builder: AmazonS3Builder, role: &str, token: &str, sts: Option<&str>| {
        let mut exchange = builder
            .clone()
            .with_config(AmazonS3ConfigKey::RoleArn, role)
            .with_config(AmazonS3ConfigKey::WebIdentityTokenFile, token)
            .with_config(AmazonS3ConfigKey::RoleSessionName, "oidc-edge-publish");
        if let Some(sts) = sts {
            exchange = exchange.with_config(AmazonS3ConfigKey::StsEndpoint, sts);
        }
        let exchange = exchange
            .build()
            .map_err(|e| anyhow!("{to}: {}", one_line(&e.to_string())))?;
        let sts = sts.map_or_else(|| "the regional AWS STS".to_owned(), str::to_owned);
        anyhow::Ok(builder.with_credentials(Arc::new(WebIdentityExchange {
            inner: Arc::clone(exchange.credentials()),
            what: format!("AssumeRoleWithWebIdentity of {role} with {token} at {sts}"),
        })))
    };
    Ok(match credentials {
        Credentials::KeyFiles {
            access_key_id,
            secret_access_key,
        } => builder
            .with_access_key_id(read("access_key_id_file", access_key_id)?)
            .with_secret_access_key(read("secret_access_key_file", secret_access_key)?),
        Credentials::WebIdentity {
            role_arn,
            token_file,
            sts_endpoint,
        } => web_identity(
            builder,
            role_arn,
            &token_file.to_string_lossy(),
            sts_endpoint.as_ref().map(url::Url::as_str),
        )?,
        Credentials::Environment => {
            if let (Some(id), Some(secret)) =
                (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
            {
                let builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret);
                match env("AWS_SESSION_TOKEN") {
                    Some(token) => builder.with_token(token),
                    None => builder,
                }
            } else if let (Some(role), Some(token)) =
                (env("AWS_ROLE_ARN"), env("AWS_WEB_IDENTITY_TOKEN_FILE"))
            {
                let sts = env("AWS_ENDPOINT_URL_STS");
                web_identity(builder, &role, &token, sts.as_deref())?
            } else {
                bail!(
                    "{to}: no credentials: set access_key_id_file and secret_access_key_file or \
                     role_arn and web_identity_token_file in the target, or AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY, or AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE in the \
                     environment (the instance metadata service is never asked)"
                );
            }
        }
    })
}

/// The web-identity credential provider, its failures labelled as the exchange they are.
#[derive(Debug)]
struct WebIdentityExchange {
    inner: AwsCredentialProvider,
    /// `AssumeRoleWithWebIdentity of ROLE with TOKEN_FILE at STS`: never the token itself.
    what: String,
}

#[async_trait::async_trait]
impl CredentialProvider for WebIdentityExchange {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        self.inner
            .get_credential()
            .await
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: format!("{}: {}", self.what, error_chain(&e)).into(),
            })
    }
}

/// A non-empty environment variable.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `url: error: causes` on one line: a store's error carries its XML body, with newlines,
/// and reqwest keeps the useful part ("operation timed out", "Connection refused") in the
/// source chain.
fn at(url: &str, error: &object_store::Error) -> anyhow::Error {
    anyhow!("{url}: {}", one_line(&error_chain(error)))
}

fn one_line(text: &str) -> String {
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
