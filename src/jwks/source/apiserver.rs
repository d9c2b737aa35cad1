//! How to reach a kube-apiserver: its URL, the CA to pin and the credentials, as the config
//! names them directly, through a kubeconfig, or from the pod's environment.

use std::fmt;
use std::path::PathBuf;

/// How to reach one apiserver. Its CA is always pinned: it is private (K3-3), and trusting
/// system roots would let any public certificate for that name serve us keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiserverSource {
    /// What logs call it: `apiserver`, `kubeconfig <path> (context …)`, `in-cluster`.
    pub origin: String,
    pub server: url::Url,
    pub ca: Pem,
    pub auth: ApiAuth,
    /// The kubeconfig file and context this was read from, read again when the file changes:
    /// k3s rewrites its inline client certificate when it rotates it (L1).
    pub kubeconfig: Option<(PathBuf, Option<String>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAuth {
    /// Anonymous discovery (needs `system:unauthenticated` bound to the discovery role, K-7).
    Anonymous,
    /// A bearer token file, re-read on every fetch: projected tokens rotate (K-8).
    TokenFile(PathBuf),
    /// A bearer token written in a kubeconfig.
    Token(Secret),
    /// A client certificate and key (k3s admin kubeconfig style).
    ClientCert { cert: Pem, key: Pem },
}

impl ApiAuth {
    pub(crate) fn describe(&self) -> String {
        match self {
            ApiAuth::Anonymous => "anonymous".to_owned(),
            ApiAuth::TokenFile(path) => format!("token file {}", path.display()),
            ApiAuth::Token(_) => "kubeconfig token".to_owned(),
            ApiAuth::ClientCert { .. } => "client certificate".to_owned(),
        }
    }
}

/// PEM from a file, or inline (kubeconfig `*-data`).
#[derive(Clone, PartialEq, Eq)]
pub enum Pem {
    File(PathBuf),
    Inline(Vec<u8>),
}

impl Pem {
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        match self {
            Pem::File(path) => std::fs::read(path),
            Pem::Inline(bytes) => Ok(bytes.clone()),
        }
    }
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pem::File(path) => write!(f, "Pem::File({})", path.display()),
            // May be a private key: never in a log line.
            Pem::Inline(bytes) => write!(f, "Pem::Inline({} bytes)", bytes.len()),
        }
    }
}

/// A secret string whose Debug form is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where Kubernetes mounts a pod's service-account credentials.
pub const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
