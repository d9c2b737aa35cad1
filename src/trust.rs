//! `oidc-edge trust`: the operator's word on which keys a cluster has, the one step of a push
//! setup that never comes from the network. Run once at setup (the seeds' own
//! `kubectl get --raw /openid/v1/jwks`) and after an abrupt key change the edge refused.
//!
//! It validates the file and drops it into the issuer's trust inbox in the state directory;
//! the push source takes it at its next fetch (its `refresh_interval`, at once on SIGHUP, or
//! at the next start) and it becomes the set the cluster is taken to list: served, and
//! trusted to sign pushes. Keys it no longer lists are kept for rotation grace, not trusted.

use std::path::Path;

use anyhow::Context as _;

use crate::config::Config;
use crate::jwks::persist::StateFile;
use crate::jwks::source::SourceKind;
use crate::jwks::source::push::trust_inbox;
use crate::jwks::validate::validate;

/// Validates `jwks_file` and puts it in `issuer`'s trust inbox; returns what to tell the
/// operator.
pub fn run(config: &Config, issuer: &str, jwks_file: &Path) -> anyhow::Result<String> {
    let Some(cfg) = config
        .issuers
        .iter()
        .find(|i| i.endpoint.issuer.as_str() == issuer)
    else {
        let known: Vec<&str> = config
            .issuers
            .iter()
            .map(|i| i.endpoint.issuer.as_str())
            .collect();
        anyhow::bail!(
            "{}: no issuer {issuer:?} (configured: {})",
            config.file.display(),
            known.join(", ")
        );
    };
    if !cfg
        .sources
        .iter()
        .any(|s| matches!(s.kind, SourceKind::Push(_)))
    {
        anyhow::bail!(
            "{}: issuer {issuer} has no push source (kind = \"push\"): only pushes are authenticated by trusted keys",
            config.file.display()
        );
    }
    let body =
        std::fs::read(jwks_file).with_context(|| format!("cannot read {}", jwks_file.display()))?;
    let valid =
        validate(&body).map_err(|e| anyhow::anyhow!("{}: refused: {e}", jwks_file.display()))?;
    for dropped in &valid.dropped {
        eprintln!(
            "oidc-edge: warning: {}: key left out: {dropped}",
            jwks_file.display()
        );
    }
    crate::state::create_state_dir(&config.state_dir)
        .with_context(|| format!("state directory {}", config.state_dir.display()))?;
    let inbox = trust_inbox(StateFile::new(&config.state_dir, issuer).path());
    // Readable by the service's own user: `trust` runs as root beside a service with a
    // DynamicUser, and the keys are public anyway.
    crate::state::write_public(&inbox, &body)
        .with_context(|| format!("cannot write {}", inbox.display()))?;
    let kids: Vec<&str> = valid.keys.iter().map(|k| k.kid.as_str()).collect();
    Ok(format!(
        "trusted for {issuer}: kids {}\n\
         written to {}; a running server takes it within the push source's refresh_interval, \
         at once on SIGHUP (systemctl reload oidc-edge), or at its next start\n",
        kids.join(", "),
        inbox.display()
    ))
}
