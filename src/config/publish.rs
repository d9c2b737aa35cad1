//! Validation of `[[issuers.publish]]`: the bucket URL, the store's endpoint, and credentials
//! that are complete before anything runs; and of `[[issuers.push]]`, the edges a cluster
//! pushes to.

use std::collections::HashMap;
use std::path::PathBuf;

use super::raw::{RawPublish, RawPush};
use super::validate::{PUBLISH_TIMEOUT_BOUNDS, Validator};
use super::{ConfigError, IssuerConfig};
use crate::display::redacted_text;
use crate::issuer::Issuer;
use crate::jwks::source::{SourceConfig, SourceKind};
use crate::publish::edge::{DEFAULT_PUSH_INTERVAL, EdgeTarget, PushToken};
use crate::publish::target::{
    AzureCredentials, DEFAULT_TIMEOUT, PublishTarget, S3Credentials, Store,
};

impl Validator<'_> {
    pub(super) fn publish_target(
        &self,
        key: &str,
        raw: RawPublish,
    ) -> Result<PublishTarget, ConfigError> {
        let to_key = format!("{key}.to");
        let shown = redacted_text(&raw.to);
        let url = url::Url::parse(&raw.to)
            .map_err(|e| self.err(&to_key, format!("{shown:?} is not a URL: {e}")))?;
        let azure = match url.scheme() {
            "s3" => false,
            "az" => true,
            other => {
                return Err(self.err(
                    &to_key,
                    format!("{shown:?}: scheme {other:?} is not \"s3\" (s3://bucket/prefix) or \"az\" (az://container/prefix)"),
                ));
            }
        };
        let allowed: &[&str] = if azure {
            &["account", "account_key_file", "sas_token_file"]
        } else {
            &[
                "region",
                "access_key_id_file",
                "secret_access_key_file",
                "role_arn",
                "web_identity_token_file",
                "sts_endpoint",
            ]
        };
        if let Some(extra) = raw.set_keys().into_iter().find(|k| !allowed.contains(k)) {
            return Err(self.err(
                format!("{key}.{extra}"),
                format!("is not used by {}:// targets", url.scheme()),
            ));
        }
        let bucket = url.host_str().unwrap_or_default().to_owned();
        if bucket.is_empty() {
            return Err(self.err(&to_key, format!("{shown:?} names no bucket or container")));
        }
        if !url.username().is_empty() || url.password().is_some() || url.port().is_some() {
            return Err(self.err(
                &to_key,
                format!("{shown:?}: the bucket URL takes no user, password or port; the store's address goes in endpoint"),
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(self.err(
                &to_key,
                format!("{shown:?} must not contain a query or fragment"),
            ));
        }
        let prefix = url.path().trim_matches('/').to_owned();
        // Checked on the text as written: the URL parser already dropped dot segments.
        let written = raw.to.splitn(4, '/').nth(3).unwrap_or_default();
        let written = written.trim_matches('/');
        if !written.is_empty()
            && written
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(self.err(
                &to_key,
                format!("{shown:?}: the prefix has an empty, \".\" or \"..\" segment"),
            ));
        }

        let endpoint = raw
            .endpoint
            .as_deref()
            .map(|text| self.store_url(&format!("{key}.endpoint"), text, azure))
            .transpose()?;
        if raw.region.as_deref().is_some_and(|r| r.trim().is_empty()) {
            return Err(self.err(format!("{key}.region"), "must not be empty"));
        }
        let region = raw.region.clone();
        let ca_file = self.ca_file(key, raw.ca_file.as_deref())?;
        let store = if azure {
            Store::Azure {
                account: raw.account.clone(),
                credentials: self.azure_credentials(key, &raw)?,
            }
        } else {
            Store::S3 {
                region,
                credentials: self.s3_credentials(key, &raw)?,
            }
        };
        let public_url = raw
            .public_url
            .as_deref()
            .map(|text| self.store_url(&format!("{key}.public_url"), text, false))
            .transpose()?;
        let timeout = self.bounded_duration(
            &format!("{key}.timeout"),
            raw.timeout,
            DEFAULT_TIMEOUT,
            PUBLISH_TIMEOUT_BOUNDS,
        )?;
        Ok(PublishTarget {
            to: raw.to,
            bucket,
            prefix,
            endpoint,
            ca_file,
            store,
            public_url,
            timeout,
        })
    }

    fn azure_credentials(
        &self,
        key: &str,
        raw: &RawPublish,
    ) -> Result<AzureCredentials, ConfigError> {
        if raw.account.as_deref().is_some_and(|a| a.trim().is_empty()) {
            return Err(self.err(format!("{key}.account"), "must not be empty"));
        }
        match (&raw.account_key_file, &raw.sas_token_file) {
            (Some(_), Some(_)) => Err(self.err(
                format!("{key}.sas_token_file"),
                "set either account_key_file or sas_token_file, not both",
            )),
            (Some(path), None) => {
                let path = self.resolve(path);
                self.readable(&format!("{key}.account_key_file"), &path)?;
                Ok(AzureCredentials::AccountKeyFile(path))
            }
            (None, Some(path)) => {
                let path = self.resolve(path);
                self.readable(&format!("{key}.sas_token_file"), &path)?;
                Ok(AzureCredentials::SasTokenFile(path))
            }
            (None, None) => Ok(AzureCredentials::Environment),
        }
    }

    fn s3_credentials(&self, key: &str, raw: &RawPublish) -> Result<S3Credentials, ConfigError> {
        let files = (
            raw.access_key_id_file.as_ref(),
            raw.secret_access_key_file.as_ref(),
        );
        let web = (raw.role_arn.as_ref(), raw.web_identity_token_file.as_ref());
        let pair = |(a, b): (&str, &str), (x, y): (bool, bool)| match (x, y) {
            (true, false) => Err(self.err(format!("{key}.{b}"), format!("is required with {a}"))),
            (false, true) => Err(self.err(format!("{key}.{a}"), format!("is required with {b}"))),
            _ => Ok(()),
        };
        pair(
            ("access_key_id_file", "secret_access_key_file"),
            (files.0.is_some(), files.1.is_some()),
        )?;
        pair(
            ("role_arn", "web_identity_token_file"),
            (web.0.is_some(), web.1.is_some()),
        )?;
        if raw.sts_endpoint.is_some() && web.0.is_none() {
            return Err(self.err(
                format!("{key}.sts_endpoint"),
                "is only used with role_arn and web_identity_token_file",
            ));
        }
        match (files, web) {
            ((Some(_), _), (Some(_), _)) => Err(self.err(
                format!("{key}.role_arn"),
                "set either access_key_id_file and secret_access_key_file, or role_arn and web_identity_token_file, not both",
            )),
            ((Some(id), Some(secret)), _) => {
                let (id, secret) = (self.resolve(id), self.resolve(secret));
                self.readable(&format!("{key}.access_key_id_file"), &id)?;
                self.readable(&format!("{key}.secret_access_key_file"), &secret)?;
                Ok(S3Credentials::KeyFiles {
                    access_key_id: id,
                    secret_access_key: secret,
                })
            }
            (_, (Some(role_arn), Some(token_file))) => {
                let token_file: PathBuf = self.resolve(token_file);
                // A projected token may not be written yet when the pod starts (L13).
                self.file_to_come_for(
                    &format!("{key}.web_identity_token_file"),
                    &token_file,
                    "publishing to this target fails",
                )?;
                let sts_endpoint = raw
                    .sts_endpoint
                    .as_deref()
                    .map(|text| self.https_url(&format!("{key}.sts_endpoint"), text))
                    .transpose()?;
                Ok(S3Credentials::WebIdentity {
                    role_arn: role_arn.clone(),
                    token_file,
                    sts_endpoint,
                })
            }
            _ => Ok(S3Credentials::Environment),
        }
    }

    /// An `http(s)://host[:port][/]` URL of a store, with no user info; with `path`, also a
    /// path (Azure's path-style endpoints end with the account: Azurite, Azure Stack).
    fn store_url(&self, key: &str, text: &str, path: bool) -> Result<url::Url, ConfigError> {
        let shown = redacted_text(text);
        let url = url::Url::parse(text)
            .map_err(|e| self.err(key, format!("{shown:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(self.err(key, format!("{shown:?} must use https (or http)")));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(self.err(
                key,
                format!("{shown:?} must not contain user info (user:password@): it would be shown in logs and /status"),
            ));
        }
        if url.query().is_some() || url.fragment().is_some() || (url.path() != "/" && !path) {
            return Err(self.err(
                key,
                format!(
                    "{shown:?} must be a bare origin, like https://host:port, with no path or query"
                ),
            ));
        }
        Ok(url)
    }

    /// Two targets must never write the same object: the last writer would win, and one
    /// issuer's relying parties would get another's keys.
    pub(super) fn publish_keys_are_unique(
        &self,
        issuers: &[IssuerConfig],
    ) -> Result<(), ConfigError> {
        let mut seen: HashMap<(Option<&str>, &str, String), (usize, usize)> = HashMap::new();
        for (i, cfg) in issuers.iter().enumerate() {
            for (t, target) in cfg.publish.iter().enumerate() {
                let endpoint = target.endpoint.as_ref().map(url::Url::as_str);
                for path in [&cfg.endpoint.discovery_path, &cfg.endpoint.jwks_path] {
                    let object = target.key(path);
                    let place = (endpoint, target.bucket.as_str(), object.clone());
                    if let Some((oi, ot)) = seen.insert(place, (i, t))
                        && (oi, ot) != (i, t)
                    {
                        return Err(self.err(
                            format!("issuers[{i}].publish[{t}].to"),
                            format!(
                                "{} is also written by issuers[{oi}].publish[{ot}]",
                                target.object_url(&object)
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Validator<'_> {
    /// `[[issuers.push]]` of `issuer`: where its keys are pushed, with which token.
    pub(super) fn push_target(
        &self,
        key: &str,
        raw: RawPush,
        issuer: &Issuer,
        sources: &[SourceConfig],
    ) -> Result<EdgeTarget, ConfigError> {
        let url_key = format!("{key}.url");
        let url = match raw.url.as_deref() {
            // Issue 18: over TLS only; a bearer token in plain text could be replayed.
            Some(text) if text.starts_with("http://") => {
                return Err(self.err(
                    &url_key,
                    format!(
                        "{:?} must use https: a push carries a bearer token, which must not cross the network readable",
                        redacted_text(text)
                    ),
                ));
            }
            Some(text) => self.https_url(&url_key, text)?,
            None => url::Url::parse(&issuer.url_for(&issuer.push_path()))
                .map_err(|e| self.err(&url_key, format!("the issuer's push URL: {e}")))?,
        };
        let token = match (raw.token_file, raw.service_account) {
            (Some(path), None) => {
                let path = self.resolve(&path);
                self.file_to_come_for(
                    &format!("{key}.token_file"),
                    &path,
                    "pushes fail until it does",
                )?;
                PushToken::File(path)
            }
            (None, Some(account)) => {
                let sa_key = format!("{key}.service_account");
                let (namespace, service_account) = self.service_account(&sa_key, &account)?;
                let source = sources
                    .iter()
                    .find(|s| matches!(s.kind, SourceKind::Apiserver(_)))
                    .ok_or_else(|| {
                        self.err(
                            &sa_key,
                            "needs an apiserver, kubeconfig or in-cluster source: its credentials mint the tokens (TokenRequest)",
                        )
                    })?;
                PushToken::Request {
                    source: Box::new(source.clone()),
                    namespace: namespace.to_owned(),
                    service_account: service_account.to_owned(),
                }
            }
            (Some(_), Some(_)) => {
                return Err(self.err(
                    format!("{key}.token_file"),
                    "use either token_file (a projected token) or service_account (TokenRequest), not both",
                ));
            }
            (None, None) => {
                return Err(self.err(
                    format!("{key}.token_file"),
                    "a push needs a token: token_file (a projected token) or service_account (TokenRequest)",
                ));
            }
        };
        let ca_file = self.ca_file(key, raw.ca_file.as_deref())?;
        let connect_to = self.connect_to(key, raw.connect_to)?;
        let interval = self.bounded_duration(
            &format!("{key}.interval"),
            raw.interval,
            DEFAULT_PUSH_INTERVAL,
            super::validate::PUSH_INTERVAL_BOUNDS,
        )?;
        let timeout = self.bounded_duration(
            &format!("{key}.timeout"),
            raw.timeout,
            DEFAULT_TIMEOUT,
            PUBLISH_TIMEOUT_BOUNDS,
        )?;
        Ok(EdgeTarget {
            url,
            token,
            ca_file,
            connect_to,
            interval,
            timeout,
        })
    }
}
