//! The file format as serde reads it: unknown keys are errors, nothing is checked yet.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) issuers: Vec<RawIssuer>,
    pub(super) http: Option<RawHttp>,
    pub(super) https: Option<RawHttps>,
    pub(super) limits: Option<RawLimits>,
    pub(super) admin: Option<RawAdmin>,
    pub(super) state: Option<RawState>,
    pub(super) log: Option<RawLog>,
    pub(super) relying_parties: Option<RawRelyingParties>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRelyingParties {
    pub(super) forget_after: Option<String>,
    /// Family name → `User-Agent` substrings.
    #[serde(default)]
    pub(super) user_agents: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIssuer {
    pub(super) issuer: String,
    pub(super) jwks_path: Option<String>,
    pub(super) jwks_content_type: Option<String>,
    pub(super) cache_max_age: Option<String>,
    pub(super) key_retention: Option<String>,
    pub(super) max_keys: Option<usize>,
    #[serde(default)]
    pub(super) sources: Vec<RawSource>,
    #[serde(default)]
    pub(super) publish: Vec<RawPublish>,
    #[serde(default)]
    pub(super) push: Vec<RawPush>,
    pub(super) selftest: Option<RawSelfTest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPush {
    pub(super) url: Option<String>,
    pub(super) token_file: Option<PathBuf>,
    pub(super) service_account: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) connect_to: Option<String>,
    pub(super) interval: Option<String>,
    pub(super) timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSelfTest {
    pub(super) service_account: String,
    pub(super) audience: Option<String>,
    pub(super) interval: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) connect_to: Option<String>,
    pub(super) readiness: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPublish {
    pub(super) to: String,
    pub(super) endpoint: Option<String>,
    pub(super) region: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) access_key_id_file: Option<PathBuf>,
    pub(super) secret_access_key_file: Option<PathBuf>,
    pub(super) role_arn: Option<String>,
    pub(super) web_identity_token_file: Option<PathBuf>,
    pub(super) sts_endpoint: Option<String>,
    pub(super) account: Option<String>,
    pub(super) account_key_file: Option<PathBuf>,
    pub(super) sas_token_file: Option<PathBuf>,
    pub(super) public_url: Option<String>,
    pub(super) timeout: Option<String>,
}

impl RawPublish {
    /// The store-specific keys that are set, for "not used by s3:// targets" errors.
    pub(super) fn set_keys(&self) -> Vec<&'static str> {
        [
            ("region", self.region.is_some()),
            ("access_key_id_file", self.access_key_id_file.is_some()),
            (
                "secret_access_key_file",
                self.secret_access_key_file.is_some(),
            ),
            ("role_arn", self.role_arn.is_some()),
            (
                "web_identity_token_file",
                self.web_identity_token_file.is_some(),
            ),
            ("sts_endpoint", self.sts_endpoint.is_some()),
            ("account", self.account.is_some()),
            ("account_key_file", self.account_key_file.is_some()),
            ("sas_token_file", self.sas_token_file.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    pub(super) kind: String,
    pub(super) path: Option<PathBuf>,
    pub(super) url: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) token_file: Option<PathBuf>,
    pub(super) client_cert_file: Option<PathBuf>,
    pub(super) client_key_file: Option<PathBuf>,
    pub(super) kubeconfig: Option<PathBuf>,
    pub(super) context: Option<String>,
    pub(super) refresh_interval: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) audience: Option<String>,
    pub(super) subject: Option<String>,
    pub(super) allow_tokens_without_jti: Option<bool>,
}

impl RawSource {
    /// The kind-specific keys that are set, for "not used by this kind" errors.
    pub(super) fn set_keys(&self) -> Vec<&'static str> {
        [
            ("path", self.path.is_some()),
            ("url", self.url.is_some()),
            ("ca_file", self.ca_file.is_some()),
            ("token_file", self.token_file.is_some()),
            ("client_cert_file", self.client_cert_file.is_some()),
            ("client_key_file", self.client_key_file.is_some()),
            ("kubeconfig", self.kubeconfig.is_some()),
            ("context", self.context.is_some()),
            ("audience", self.audience.is_some()),
            ("subject", self.subject.is_some()),
            (
                "allow_tokens_without_jti",
                self.allow_tokens_without_jti.is_some(),
            ),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    pub(super) listen: String,
    pub(super) redirect_to_https: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttps {
    pub(super) listen: String,
    pub(super) hsts: Option<bool>,
    pub(super) acme: Option<RawAcme>,
    pub(super) files: Option<RawFiles>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAcme {
    pub(super) domains: Option<Vec<String>>,
    #[serde(default)]
    pub(super) contact: Vec<String>,
    pub(super) directory: Option<String>,
    pub(super) directory_ca_file: Option<PathBuf>,
    pub(super) challenge: Option<String>,
    pub(super) step_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFiles {
    pub(super) cert_file: PathBuf,
    pub(super) key_file: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) handshake_timeout: Option<String>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) h2_max_concurrent_streams: Option<u32>,
    pub(super) max_header_bytes: Option<usize>,
    pub(super) idle_timeout: Option<String>,
    pub(super) send_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<String>,
    pub(super) allow_remote: Option<bool>,
    pub(super) max_staleness: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    pub(super) dir: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<String>,
    pub(super) level: Option<String>,
    pub(super) access: Option<bool>,
}
