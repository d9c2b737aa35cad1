//! The S3 client for a target: S3 itself and the S3-compatible stores (R2, B2, MinIO,
//! SeaweedFS, Garage), with credentials resolved here so that a missing one is named.

use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, AwsCredential, AwsCredentialProvider};
use object_store::{ClientOptions, CredentialProvider, ObjectStore, RetryConfig};

use super::bucket::{env, one_line};
use super::connector::PublicRoots;
use super::target::{PublishTarget, S3Credentials};
use crate::display::error_chain;

/// The signing region when neither the target nor the environment names one.
const DEFAULT_REGION: &str = "us-east-1";

/// The target's bucket. No checksum header is ever added (object_store sends none): R2
/// refuses `x-amz-checksum-*` (s3-publish-facts §3); the payload's SHA-256 is signed.
pub(super) fn open(
    target: &PublishTarget,
    region: Option<&str>,
    credentials: &S3Credentials,
    options: ClientOptions,
    retry: RetryConfig,
    connector: PublicRoots,
) -> anyhow::Result<Arc<dyn ObjectStore>> {
    let to = &target.to;
    let region = region
        .map(str::to_owned)
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| DEFAULT_REGION.to_owned());
    let mut builder = AmazonS3Builder::new()
        .with_http_connector(connector)
        .with_bucket_name(&target.bucket)
        .with_region(region)
        // Path style (`endpoint/bucket/key`) works on S3, R2, B2 and self-hosted stores
        // alike, and keeps dotted bucket names inside the certificate's name.
        .with_virtual_hosted_style_request(false)
        .with_retry(retry)
        // Before the credentials: the STS client takes the same roots and timeouts.
        .with_client_options(options);
    if let Some(endpoint) = &target.endpoint {
        builder = builder.with_endpoint(endpoint.as_str().trim_end_matches('/'));
    }
    let store = with_credentials(builder, to, credentials)?
        .build()
        .map_err(|e| anyhow!("{to}: {}", one_line(&e.to_string())))?;
    Ok(Arc::new(store))
}

fn with_credentials(
    builder: AmazonS3Builder,
    to: &str,
    credentials: &S3Credentials,
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
        S3Credentials::KeyFiles {
            access_key_id,
            secret_access_key,
        } => builder
            .with_access_key_id(read("access_key_id_file", access_key_id)?)
            .with_secret_access_key(read("secret_access_key_file", secret_access_key)?),
        S3Credentials::WebIdentity {
            role_arn,
            token_file,
            sts_endpoint,
        } => web_identity(
            builder,
            role_arn,
            &token_file.to_string_lossy(),
            sts_endpoint.as_ref().map(url::Url::as_str),
        )?,
        S3Credentials::Environment => {
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
