//! The issuer URL, validated once and kept byte-exact, and the two public paths it answers.
//!
//! Relying parties compare `issuer` with the URL they were given and with the tokens' `iss`
//! code point by code point (D-6, A-2), so the configured string is what we publish: never a
//! re-serialised form of it.

pub mod discovery;
pub mod endpoint;

use std::fmt;

use url::Url;

/// Path of the discovery document below the issuer (D-3, K-1).
pub const DISCOVERY_SUFFIX: &str = "/.well-known/openid-configuration";
/// Default JWKS path below the issuer, where kube-apiserver serves it (K-1).
pub const DEFAULT_JWKS_SUFFIX: &str = "/openid/v1/jwks";
/// Where pushes go, below the issuer (issue 18).
pub const PUSH_SUFFIX: &str = "/.oidc-edge/v1/jwks";
/// IAM accepts provider URLs of at most 255 characters.
const MAX_ISSUER_LEN: usize = 255;

/// A service-account issuer URL that every relying party accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issuer {
    raw: String,
    host: String,
    /// The path with one terminating `/` removed (D-3): `""` for `https://h` and `https://h/`.
    prefix: String,
}

/// Why an issuer URL was refused. The messages complete "issuer …".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssuerError {
    #[error(
        "{0:?} has leading or trailing white space; relying parties compare it byte for byte (Z-2)"
    )]
    Whitespace(String),
    #[error("{0:?} is not a URL: {1}")]
    NotAUrl(String, url::ParseError),
    #[error("{0:?} must use https (A-1, D-1)")]
    NotHttps(String),
    #[error("{0:?} must not contain a port, not even :443 (A-1)")]
    Port(String),
    #[error("{0:?} must not contain a user name or password")]
    UserInfo(String),
    #[error("{0:?} must not contain a query (A-1, D-1)")]
    Query(String),
    #[error("{0:?} must not contain a fragment (D-1)")]
    Fragment(String),
    #[error(
        "{0:?} is not in canonical form; write it as {1:?} (lowercase host, no dot segments or needless escapes)"
    )]
    NotCanonical(String, String),
    #[error("{0:?} is longer than {MAX_ISSUER_LEN} characters (A-1)")]
    TooLong(String),
}

impl Issuer {
    pub fn parse(raw: &str) -> Result<Self, IssuerError> {
        let owned = || raw.to_owned();
        if raw.trim() != raw {
            return Err(IssuerError::Whitespace(owned()));
        }
        let url = Url::parse(raw).map_err(|e| IssuerError::NotAUrl(owned(), e))?;
        if url.scheme() != "https" {
            return Err(IssuerError::NotHttps(owned()));
        }
        // `Url` forgets a default port, so look at the authority as written.
        let authority = raw["https://".len()..]
            .split(['/', '?', '#'])
            .next()
            .unwrap_or_default();
        if authority.contains('@') {
            return Err(IssuerError::UserInfo(owned()));
        }
        let host_and_port = authority.rsplit(']').next().unwrap_or(authority);
        if host_and_port.contains(':') {
            return Err(IssuerError::Port(owned()));
        }
        if url.query().is_some() {
            return Err(IssuerError::Query(owned()));
        }
        if url.fragment().is_some() {
            return Err(IssuerError::Fragment(owned()));
        }
        let canonical = url.as_str();
        let bare_root = url.path() == "/" && canonical.strip_suffix('/') == Some(raw);
        if canonical != raw && !bare_root {
            return Err(IssuerError::NotCanonical(owned(), canonical.to_owned()));
        }
        if raw.len() > MAX_ISSUER_LEN {
            return Err(IssuerError::TooLong(owned()));
        }
        let path = url.path();
        let prefix = path.strip_suffix('/').unwrap_or(path).to_owned();
        let host = url.host_str().unwrap_or_default().to_owned();
        Ok(Self {
            raw: raw.to_owned(),
            host,
            prefix,
        })
    }

    /// The issuer exactly as configured.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The lowercase host name requests are routed by.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `<issuer without one trailing '/'>/.well-known/openid-configuration` (D-3).
    pub fn discovery_path(&self) -> String {
        format!("{}{DISCOVERY_SUFFIX}", self.prefix)
    }

    /// F-1: the path a client asks that builds `<issuer>/.well-known/openid-configuration` by
    /// string concatenation, when the issuer ends in '/': `//.well-known/…` for `https://h/`,
    /// `/a//.well-known/…` for `https://h/a/`. F-1 recommends answering discovery there as well.
    /// `None` for an issuer without a trailing '/', where concatenation gives the D-3 path.
    pub fn concatenated_discovery_path(&self) -> Option<String> {
        self.raw
            .ends_with('/')
            .then(|| format!("{}/{DISCOVERY_SUFFIX}", self.prefix))
    }

    /// `<issuer path>/openid/v1/jwks`, where kube-apiserver serves its JWKS.
    pub fn default_jwks_path(&self) -> String {
        format!("{}{DEFAULT_JWKS_SUFFIX}", self.prefix)
    }

    /// `<issuer path>/.oidc-edge/v1/jwks`: where an issuer with a push source takes `PUT`s of
    /// its key set (issue 18). Under the issuer's path, so that a proxy that forwards the
    /// issuer forwards its pushes; under a dot-directory no cluster publishes anything in.
    pub fn push_path(&self) -> String {
        format!("{}{PUSH_SUFFIX}", self.prefix)
    }

    /// The public https URL of `path` on the issuer's host.
    pub fn url_for(&self, path: &str) -> String {
        format!("https://{}{path}", self.host)
    }
}

impl fmt::Display for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Checks a configured absolute path (such as `jwks_path`): it must be what an https URL on the
/// issuer host would carry byte for byte, so that the published `jwks_uri` is the path we route.
pub fn check_path(issuer: &Issuer, path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with '/'"));
    }
    let url = issuer.url_for(path);
    match Url::parse(&url) {
        Ok(parsed)
            if parsed.as_str() == url
                && parsed.query().is_none()
                && parsed.fragment().is_none() =>
        {
            Ok(())
        }
        Ok(parsed) if parsed.query().is_some() || parsed.fragment().is_some() => {
            Err(format!("{path:?} must not contain a query or fragment"))
        }
        Ok(parsed) => Err(format!(
            "{path:?} is not in canonical form; write it as {:?}",
            parsed.path()
        )),
        Err(e) => Err(format!("{path:?} is not a valid URL path: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_issuer_keeps_its_bytes_and_routes_at_the_root() {
        for raw in ["https://oidc.example.com", "https://oidc.example.com/"] {
            let issuer = Issuer::parse(raw).expect(raw);
            assert_eq!(issuer.as_str(), raw);
            assert_eq!(issuer.host(), "oidc.example.com");
            assert_eq!(issuer.discovery_path(), "/.well-known/openid-configuration");
            assert_eq!(issuer.default_jwks_path(), "/openid/v1/jwks");
            assert_eq!(
                issuer.url_for(&issuer.default_jwks_path()),
                "https://oidc.example.com/openid/v1/jwks"
            );
        }
    }

    #[test]
    fn path_prefixed_issuer_drops_one_trailing_slash_for_discovery() {
        let issuer = Issuer::parse("https://edge.example.com/cluster-a/").expect("valid");
        assert_eq!(
            issuer.discovery_path(),
            "/cluster-a/.well-known/openid-configuration"
        );
        let issuer = Issuer::parse("https://edge.example.com/cluster/identifier").expect("valid");
        assert_eq!(
            issuer.default_jwks_path(),
            "/cluster/identifier/openid/v1/jwks"
        );
    }

    #[test]
    fn concatenation_on_a_trailing_slash_gives_a_double_slash_path() {
        let cases = [
            ("https://oidc.example.com", None),
            (
                "https://oidc.example.com/",
                Some("//.well-known/openid-configuration"),
            ),
            ("https://edge.example.com/cluster-a", None),
            (
                "https://edge.example.com/cluster-a/",
                Some("/cluster-a//.well-known/openid-configuration"),
            ),
        ];
        for (raw, want) in cases {
            let issuer = Issuer::parse(raw).expect(raw);
            assert_eq!(
                issuer.concatenated_discovery_path().as_deref(),
                want,
                "{raw}"
            );
        }
    }

    #[test]
    fn refuses_what_relying_parties_refuse() {
        type IsExpected = fn(&IssuerError) -> bool;
        let cases: &[(&str, IsExpected)] = &[
            ("http://oidc.example.com", |e| {
                matches!(e, IssuerError::NotHttps(_))
            }),
            ("https://oidc.example.com:8443", |e| {
                matches!(e, IssuerError::Port(_))
            }),
            ("https://oidc.example.com:443", |e| {
                matches!(e, IssuerError::Port(_))
            }),
            ("https://[::1]:443/x", |e| matches!(e, IssuerError::Port(_))),
            ("https://u@oidc.example.com", |e| {
                matches!(e, IssuerError::UserInfo(_))
            }),
            ("https://oidc.example.com/?a=b", |e| {
                matches!(e, IssuerError::Query(_))
            }),
            ("https://oidc.example.com?", |e| {
                matches!(e, IssuerError::Query(_))
            }),
            ("https://oidc.example.com/#x", |e| {
                matches!(e, IssuerError::Fragment(_))
            }),
            ("https://OIDC.example.com", |e| {
                matches!(e, IssuerError::NotCanonical(..))
            }),
            ("https://oidc.example.com/a/../b", |e| {
                matches!(e, IssuerError::NotCanonical(..))
            }),
            (" https://oidc.example.com", |e| {
                matches!(e, IssuerError::Whitespace(_))
            }),
            ("oidc.example.com", |e| {
                matches!(e, IssuerError::NotAUrl(..))
            }),
        ];
        for (raw, is_expected) in cases {
            let err = Issuer::parse(raw).expect_err(raw);
            assert!(is_expected(&err), "{raw}: {err}");
        }
        let long = format!("https://oidc.example.com/{}", "a".repeat(240));
        assert!(matches!(Issuer::parse(&long), Err(IssuerError::TooLong(_))));
    }

    #[test]
    fn ipv6_host_without_port_is_accepted() {
        let issuer = Issuer::parse("https://[2001:db8::1]").expect("valid");
        assert_eq!(issuer.host(), "[2001:db8::1]");
    }

    #[test]
    fn configured_paths_must_be_canonical() {
        let issuer = Issuer::parse("https://oidc.example.com").expect("valid");
        assert!(check_path(&issuer, "/keys").is_ok());
        assert!(check_path(&issuer, "keys").is_err());
        assert!(check_path(&issuer, "/keys?x=1").is_err());
        assert!(check_path(&issuer, "/a/../keys").is_err());
        assert!(check_path(&issuer, "/a b").is_err());
    }
}
