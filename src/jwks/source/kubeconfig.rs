//! Reading a kubeconfig (e.g. k3s's `/etc/rancher/k3s/k3s.yaml`) into the apiserver client
//! settings oidc-edge needs: the server URL, the CA to pin, and how to authenticate.
//!
//! Only static credentials are supported. Exec plugins and auth providers would make a public
//! server run arbitrary commands or talk to a cloud login flow; they are refused with a message
//! that says what to use instead.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use super::apiserver::{ApiAuth, ApiserverSource, Pem, Secret};
use crate::display::{redacted_text, redacted_url};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Kubeconfig {
    #[serde(default)]
    clusters: Vec<Named<Cluster>>,
    #[serde(default)]
    contexts: Vec<Named<Context>>,
    #[serde(default)]
    users: Vec<Named<User>>,
    current_context: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "context", alias = "user")]
    value: T,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Cluster {
    server: String,
    certificate_authority: Option<PathBuf>,
    certificate_authority_data: Option<String>,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
    /// Refused (L14): reqwest verifies and sends SNI for the URL's host only.
    tls_server_name: Option<String>,
    /// Refused (L14): key fetches never go through a proxy.
    proxy_url: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Context {
    cluster: String,
    user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct User {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<PathBuf>,
    client_certificate: Option<PathBuf>,
    client_certificate_data: Option<String>,
    client_key: Option<PathBuf>,
    client_key_data: Option<String>,
    exec: Option<serde_norway::Value>,
    auth_provider: Option<serde_norway::Value>,
    username: Option<String>,
}

/// Parses `yaml` (read from `path`) and resolves `context` (default: `current-context`).
pub fn parse(yaml: &str, path: &Path, context: Option<&str>) -> Result<ApiserverSource, String> {
    let config: Kubeconfig =
        serde_norway::from_str(yaml).map_err(|e| format!("not a kubeconfig: {e}"))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.join(p)
        }
    };

    let context_name = match context {
        Some(name) => name.to_owned(),
        None => config
            .current_context
            .clone()
            .filter(|c| !c.is_empty())
            .ok_or("has no current-context; set context = \"…\"")?,
    };
    let ctx = &config
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .ok_or_else(|| format!("has no context {context_name:?}"))?
        .value;
    let cluster = &config
        .clusters
        .iter()
        .find(|c| c.name == ctx.cluster)
        .ok_or_else(|| {
            format!(
                "context {context_name:?} names cluster {:?}, which is not defined",
                ctx.cluster
            )
        })?
        .value;
    let default_user = User::default();
    let (user_name, user) = match &ctx.user {
        Some(name) => (
            name.as_str(),
            &config
                .users
                .iter()
                .find(|u| &u.name == name)
                .ok_or_else(|| {
                    format!("context {context_name:?} names user {name:?}, which is not defined")
                })?
                .value,
        ),
        None => ("", &default_user),
    };

    // The server is shown with its user info cut out, and user info is refused: the server
    // URL names the source in every log line and in /status (M5).
    let shown = redacted_text(&cluster.server);
    let server = url::Url::parse(&cluster.server).map_err(|e| {
        format!(
            "cluster {:?} server {shown:?} is not a URL: {e}",
            ctx.cluster
        )
    })?;
    if !server.username().is_empty() || server.password().is_some() {
        return Err(format!(
            "cluster {:?} server {:?} must not contain user info (user:password@): it would be shown in logs, /status and metrics",
            ctx.cluster,
            redacted_url(&server)
        ));
    }
    if server.scheme() != "https" {
        return Err(format!(
            "cluster {:?} server {shown:?} is not https",
            ctx.cluster
        ));
    }
    if cluster.insecure_skip_tls_verify {
        return Err(format!(
            "cluster {:?} sets insecure-skip-tls-verify; oidc-edge always verifies the apiserver against its CA",
            ctx.cluster
        ));
    }
    // L14: both change where or how the connection is made; ignoring them would give a
    // confusing certificate-name error or a connection that bypasses the operator's proxy.
    // Verifying against another name than the URL's host would need a hand-built rustls
    // verifier and resolver under reqwest; the certificate's names (k3s --tls-san) cover it.
    if cluster.tls_server_name.is_some() {
        return Err(format!(
            "cluster {:?} sets tls-server-name, which oidc-edge does not support: \
             use a server URL whose host is in the apiserver's certificate \
             (k3s: --tls-san), or kind = \"apiserver\"",
            ctx.cluster
        ));
    }
    if cluster.proxy_url.is_some() {
        return Err(format!(
            "cluster {:?} sets proxy-url; oidc-edge connects to apiservers directly and never through a proxy",
            ctx.cluster
        ));
    }
    let ca = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(data), _) => Pem::Inline(decode(data, "certificate-authority-data")?),
        (None, Some(file)) => Pem::File(resolve(file)),
        (None, None) => {
            return Err(format!(
                "cluster {:?} has no certificate-authority(-data); oidc-edge pins the cluster CA and does not use system roots",
                ctx.cluster
            ));
        }
    };

    if user.exec.is_some() {
        return Err(format!(
            "user {user_name:?} uses an exec plugin, which oidc-edge does not run; \
             use a kubeconfig with a token, tokenFile or client certificate, or kind = \"apiserver\" with token_file"
        ));
    }
    if user.auth_provider.is_some() {
        return Err(format!(
            "user {user_name:?} uses an auth-provider, which oidc-edge does not support; \
             use a token, tokenFile or client certificate"
        ));
    }
    if user.username.is_some() {
        return Err(format!(
            "user {user_name:?} uses basic auth, which kube-apiserver no longer accepts"
        ));
    }
    let cert = match (&user.client_certificate_data, &user.client_certificate) {
        (Some(data), _) => Some(Pem::Inline(decode(data, "client-certificate-data")?)),
        (None, Some(file)) => Some(Pem::File(resolve(file))),
        (None, None) => None,
    };
    let key = match (&user.client_key_data, &user.client_key) {
        (Some(data), _) => Some(Pem::Inline(decode(data, "client-key-data")?)),
        (None, Some(file)) => Some(Pem::File(resolve(file))),
        (None, None) => None,
    };
    let auth = match (cert, key, &user.token, &user.token_file) {
        (Some(cert), Some(key), _, _) => ApiAuth::ClientCert { cert, key },
        (Some(_), None, _, _) | (None, Some(_), _, _) => {
            return Err(format!(
                "user {user_name:?} has a client certificate or key without the other"
            ));
        }
        // L14: as client-go, the file wins over an inline token: it is what rotates.
        (None, None, _, Some(file)) => ApiAuth::TokenFile(resolve(file)),
        (None, None, Some(token), None) => ApiAuth::Token(Secret(token.clone())),
        (None, None, None, None) => ApiAuth::Anonymous,
    };
    Ok(ApiserverSource {
        origin: format!("kubeconfig {} (context {context_name:?})", path.display()),
        server,
        ca,
        auth,
        kubeconfig: Some((path.to_owned(), context.map(str::to_owned))),
    })
}

fn decode(data: &str, field: &str) -> Result<Vec<u8>, String> {
    STANDARD
        .decode(data.trim())
        .map_err(|e| format!("{field} is not base64: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const K3S_YAML: &str = "apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: Q0E=
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {}
users:
- name: default
  user:
    client-certificate-data: Q0VSVA==
    client-key-data: S0VZ
";

    fn parse_k3s(yaml: &str) -> Result<ApiserverSource, String> {
        parse(yaml, Path::new("/etc/rancher/k3s/k3s.yaml"), None)
    }

    #[test]
    fn k3s_kubeconfig_gives_server_ca_and_client_certificate() {
        let source = parse_k3s(K3S_YAML).expect("valid");
        assert_eq!(source.server.as_str(), "https://127.0.0.1:6443/");
        assert_eq!(source.ca, Pem::Inline(b"CA".to_vec()));
        assert_eq!(
            source.auth,
            ApiAuth::ClientCert {
                cert: Pem::Inline(b"CERT".to_vec()),
                key: Pem::Inline(b"KEY".to_vec())
            }
        );
        assert_eq!(
            source.origin,
            "kubeconfig /etc/rancher/k3s/k3s.yaml (context \"default\")"
        );
    }

    #[test]
    fn token_file_and_ca_file_resolve_against_the_kubeconfig_directory() {
        let yaml = K3S_YAML
            .replace(
                "certificate-authority-data: Q0E=",
                "certificate-authority: ca.crt",
            )
            .replace(
                "    client-certificate-data: Q0VSVA==\n    client-key-data: S0VZ\n",
                "    tokenFile: token\n",
            );
        let source = parse_k3s(&yaml).expect("valid");
        assert_eq!(
            source.ca,
            Pem::File(PathBuf::from("/etc/rancher/k3s/ca.crt"))
        );
        assert_eq!(
            source.auth,
            ApiAuth::TokenFile(PathBuf::from("/etc/rancher/k3s/token"))
        );
    }

    #[test]
    fn refuses_what_oidc_edge_will_not_do_with_a_reason() {
        let exec = K3S_YAML.replace(
            "    client-certificate-data: Q0VSVA==\n    client-key-data: S0VZ\n",
            "    exec:\n      command: aws\n      apiVersion: client.authentication.k8s.io/v1beta1\n",
        );
        let cases = [
            (
                exec.as_str(),
                "user \"default\" uses an exec plugin, which oidc-edge does not run",
            ),
            (
                &*K3S_YAML.replace(
                    "certificate-authority-data: Q0E=",
                    "insecure-skip-tls-verify: true",
                ),
                "sets insecure-skip-tls-verify",
            ),
            (
                &*K3S_YAML.replace("    certificate-authority-data: Q0E=\n", ""),
                "has no certificate-authority(-data)",
            ),
            (
                &*K3S_YAML.replace("https://127", "http://127"),
                "is not https",
            ),
            (
                &*K3S_YAML.replace("current-context: default", "current-context: other"),
                "has no context \"other\"",
            ),
            (
                &*K3S_YAML.replace("    client-key-data: S0VZ\n", ""),
                "a client certificate or key without the other",
            ),
            ("- not a map", "not a kubeconfig"),
            (
                &*K3S_YAML.replace("https://127", "https://admin:S3CRET@127"),
                "cluster \"default\" server \"https://***@127.0.0.1:6443/\" must not contain user info (user:password@)",
            ),
            (
                &*K3S_YAML.replace(
                    "https://127.0.0.1:6443",
                    "https://admin:S3CRET@127.0.0.1:99999",
                ),
                "cluster \"default\" server \"https://***@127.0.0.1:99999\" is not a URL: invalid port number",
            ),
        ];
        for (yaml, expected) in cases {
            let err = parse_k3s(yaml).expect_err(expected);
            assert!(err.contains(expected), "{err}");
            assert!(!err.contains("S3CRET"), "{err}");
        }
    }

    /// L14: client-go reads tokenFile when both are set (a stale inline token would 401).
    #[test]
    fn token_file_wins_over_an_inline_token() {
        let yaml = K3S_YAML.replace(
            "    client-certificate-data: Q0VSVA==\n    client-key-data: S0VZ\n",
            "    token: stale-inline-token\n    tokenFile: token\n",
        );
        let source = parse_k3s(&yaml).expect("valid");
        assert_eq!(
            source.auth,
            ApiAuth::TokenFile(PathBuf::from("/etc/rancher/k3s/token"))
        );
    }

    /// L14: settings that change where or how oidc-edge connects are refused by name rather
    /// than silently ignored.
    #[test]
    fn tls_server_name_and_proxy_url_are_refused_by_name() {
        let cases = [
            (
                "    tls-server-name: kubernetes.default.svc\n",
                "cluster \"default\" sets tls-server-name, which oidc-edge does not support: \
                 use a server URL whose host is in the apiserver's certificate \
                 (k3s: --tls-san), or kind = \"apiserver\"",
            ),
            (
                "    proxy-url: http://proxy.example:3128\n",
                "cluster \"default\" sets proxy-url; oidc-edge connects to apiservers directly and never through a proxy",
            ),
        ];
        for (line, expected) in cases {
            let yaml = K3S_YAML.replace(
                "    server: https://127.0.0.1:6443\n",
                &format!("    server: https://127.0.0.1:6443\n{line}"),
            );
            assert_eq!(parse_k3s(&yaml).expect_err(expected), expected);
        }
    }

    #[test]
    fn an_explicit_context_wins_over_current_context() {
        let yaml = K3S_YAML.replace("current-context: default", "current-context: missing");
        let source = parse(&yaml, Path::new("k.yaml"), Some("default")).expect("valid");
        assert_eq!(source.origin, "kubeconfig k.yaml (context \"default\")");
    }
}
