//! `kind = "push"`: a key set the cluster pushes to us (issue 18), for a cluster that no
//! public host can reach. Pushes arrive through the public listener and go straight into the
//! pipeline (`IssuerPipeline::accept`); what this source fetches is only the operator's
//! word: the trust inbox that `oidc-edge trust` fills, taken once and then renamed.
//!
//! Between pushes the source is idle: it neither confirms the published set nor fails, so the
//! issuer's `confirmed_at` (and `max_staleness` readiness) says when the cluster last spoke.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{FetchError, Fetched, KeySource, read_capped};

/// Who may push, checked on the bearer token of every push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushPolicy {
    /// The token's `aud` must contain this (the push URL, by convention).
    pub audience: String,
    /// The token's `sub`, byte-equal: `system:serviceaccount:NAMESPACE:NAME`.
    pub subject: String,
    /// Tokens without `jti` cannot be told from a replay; Kubernetes adds one since 1.30.
    pub allow_tokens_without_jti: bool,
}

/// The longest token lifetime a push accepts: a stolen token is worth an hour at most.
pub const MAX_PUSH_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// The trust inbox of the issuer whose state file is `state_file`: beside it, so that it is
/// in the service's private state directory.
pub fn trust_inbox(state_file: &Path) -> PathBuf {
    state_file.with_extension("trust.json")
}

/// Where a taken inbox file goes: kept, so that the operator can see what was trusted last.
fn taken(inbox: &Path) -> PathBuf {
    inbox.with_extension("json.taken")
}

/// The push source's fetcher: the trust inbox, taken once.
#[derive(Debug)]
pub struct PushInbox {
    name: String,
    inbox: PathBuf,
}

impl PushInbox {
    /// `name` is what `/status` and the logs call the source (its push URL).
    pub fn new(name: String, inbox: PathBuf) -> Self {
        Self { name, inbox }
    }

    fn take(&self) -> Result<Fetched, FetchError> {
        let err = |source| FetchError::File {
            path: self.inbox.clone(),
            source,
        };
        let mut file = match fs::File::open(&self.inbox) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Fetched::Idle),
            Err(e) => return Err(err(e)),
        };
        let body = read_capped(&mut file, &self.inbox)?;
        // Taken before it is merged: a set the pipeline refuses is logged with its reason and
        // not retried forever; `trust` validates before it writes, so that is rare.
        fs::rename(&self.inbox, taken(&self.inbox)).map_err(err)?;
        tracing::info!(inbox = %self.inbox.display(), "trusting the key set an operator gave");
        Ok(Fetched::Body {
            body,
            upstream_issuer: None,
        })
    }
}

impl KeySource for PushInbox {
    fn describe(&self) -> String {
        self.name.clone()
    }

    async fn fetch_key_set(&mut self) -> Result<Fetched, FetchError> {
        self.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_inbox_is_taken_once_and_idle_otherwise() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inbox = trust_inbox(&dir.path().join("oidc.example.com_abc.json"));
        assert_eq!(inbox, dir.path().join("oidc.example.com_abc.trust.json"));
        let mut source = PushInbox::new("push".to_owned(), inbox.clone());
        assert!(matches!(source.fetch_key_set().await, Ok(Fetched::Idle)));
        fs::write(&inbox, b"{\"keys\":[]}").expect("write");
        assert!(
            matches!(source.fetch_key_set().await, Ok(Fetched::Body { body, .. }) if body.as_ref() == b"{\"keys\":[]}")
        );
        assert!(!inbox.exists());
        assert_eq!(
            fs::read(dir.path().join("oidc.example.com_abc.trust.json.taken")).expect("kept"),
            b"{\"keys\":[]}"
        );
        assert!(matches!(source.fetch_key_set().await, Ok(Fetched::Idle)));
    }
}
