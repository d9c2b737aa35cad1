//! What one `[[issuers.publish]]` table says: a bucket (or container) prefix that receives the
//! issuer's two documents, where the store is, and how to authenticate to it.

use std::path::PathBuf;
use std::time::Duration;

/// One object-storage prefix that gets an issuer's documents, as `serve` would answer them.
#[derive(Debug, Clone)]
pub struct PublishTarget {
    /// `s3://bucket/prefix` or `az://container/prefix` as written in the config: the target's
    /// name in every message.
    pub to: String,
    /// The bucket (S3) or container (Azure Blob; `$web` for a static website).
    pub bucket: String,
    /// The key prefix, without a leading or trailing `/`; empty for the bucket's root.
    pub prefix: String,
    /// The store's API endpoint (R2, B2, a self-hosted store, Azurite); `None` is the cloud's
    /// own (AWS S3, `https://<account>.blob.core.windows.net`).
    pub endpoint: Option<url::Url>,
    /// A CA bundle for the store and its token exchange, beside the system roots.
    pub ca_file: Option<PathBuf>,
    /// One request to the store, the retries of a failed one included.
    pub timeout: Duration,
    /// Where relying parties fetch the documents (a CDN, a custom domain): each is fetched
    /// from there after publishing, and a difference is reported.
    pub public_url: Option<url::Url>,
    pub store: Store,
}

/// The kind of store, with what only that kind has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// S3 and the S3-compatible stores (R2, B2, MinIO, SeaweedFS, Garage).
    S3 {
        /// The signing region; R2 takes `auto` (s3-publish-facts §3). `None`: `AWS_REGION`,
        /// else `AWS_DEFAULT_REGION`, else `us-east-1`, when the publisher starts.
        region: Option<String>,
        credentials: S3Credentials,
    },
    /// Azure Blob Storage.
    Azure {
        /// The storage account; `None`: `AZURE_STORAGE_ACCOUNT_NAME` when the publisher starts.
        account: Option<String>,
        credentials: AzureCredentials,
    },
}

/// How an S3 publisher authenticates, as the platform hands credentials out. The instance
/// metadata service is never asked: a publisher with no credentials fails with a message
/// that names what it looked for, instead of hanging on a link-local address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum S3Credentials {
    /// Two files holding the access key id and the secret (a Kubernetes Secret volume,
    /// systemd's `LoadCredential=`), read at start.
    KeyFiles {
        access_key_id: PathBuf,
        secret_access_key: PathBuf,
    },
    /// `AssumeRoleWithWebIdentity` with a token file: the federation this project enables, so
    /// a publisher pod needs no long-lived key once its issuer is trusted. The token file is
    /// read again at every exchange (kubelet rotates projected tokens).
    WebIdentity {
        role_arn: String,
        token_file: PathBuf,
        /// `None`: `https://sts.<region>.amazonaws.com`.
        sts_endpoint: Option<url::Url>,
    },
    /// Whatever the environment holds when the publisher starts: `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`), else `AWS_ROLE_ARN` and
    /// `AWS_WEB_IDENTITY_TOKEN_FILE` (and `AWS_ENDPOINT_URL_STS`).
    Environment,
}

/// How an Azure Blob publisher authenticates; never the instance metadata service either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AzureCredentials {
    /// A file holding the storage account key, read at start.
    AccountKeyFile(PathBuf),
    /// A file holding a SAS token (`sv=…&sig=…`), read at start.
    SasTokenFile(PathBuf),
    /// Whatever the environment holds when the publisher starts: `AZURE_STORAGE_ACCOUNT_KEY`,
    /// else `AZURE_STORAGE_SAS_TOKEN`, else workload identity as the AKS webhook injects it
    /// (`AZURE_CLIENT_ID`, `AZURE_TENANT_ID`, `AZURE_FEDERATED_TOKEN_FILE`).
    Environment,
}

/// What a request to the store may take, retries included, unless the target says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl PublishTarget {
    /// The object key of a document served at `path` (`/openid/v1/jwks`).
    pub fn key(&self, path: &str) -> String {
        let path = path.trim_start_matches('/');
        if self.prefix.is_empty() {
            path.to_owned()
        } else {
            format!("{}/{path}", self.prefix)
        }
    }

    /// Where the store is and how the publisher authenticates, for `check-config`; never a
    /// secret (files are named, not read).
    pub fn describe(&self) -> String {
        let endpoint = self
            .endpoint
            .as_ref()
            .map_or_else(String::new, |e| format!("at {e}; "));
        let credentials = match &self.store {
            Store::S3 { credentials, .. } => match credentials {
                S3Credentials::KeyFiles { access_key_id, .. } => {
                    format!("keys from {} and its pair", access_key_id.display())
                }
                S3Credentials::WebIdentity {
                    role_arn,
                    token_file,
                    ..
                } => format!("web identity {role_arn} with {}", token_file.display()),
                S3Credentials::Environment => "credentials from the environment".to_owned(),
            },
            Store::Azure { credentials, .. } => match credentials {
                AzureCredentials::AccountKeyFile(path) => {
                    format!("account key from {}", path.display())
                }
                AzureCredentials::SasTokenFile(path) => format!("SAS from {}", path.display()),
                AzureCredentials::Environment => "credentials from the environment".to_owned(),
            },
        };
        let public = self
            .public_url
            .as_ref()
            .map_or_else(String::new, |u| format!("; checked at {u}"));
        format!("{endpoint}{credentials}{public}")
    }

    /// `s3://bucket/key` or `az://container/key`, for messages.
    pub fn object_url(&self, key: &str) -> String {
        let scheme = match self.store {
            Store::S3 { .. } => "s3",
            Store::Azure { .. } => "az",
        };
        format!("{scheme}://{}/{key}", self.bucket)
    }
}
