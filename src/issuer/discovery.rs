//! The discovery document we publish. It is generated from the configuration and the published
//! keys, never proxied from the apiserver, whose `jwks_uri` points at an internal address (F-10).

use bytes::Bytes;
use serde::Serialize;

/// Strict OIDC clients require an `authorization_endpoint` (D-2, F-7); this is the value EKS
/// publishes for the same purpose: there is no interactive login behind a service-account issuer.
pub const AUTHORIZATION_ENDPOINT: &str = "urn:kubernetes:programmatic_authorization";

/// Member order follows EKS's document, which every relying party here accepts.
#[derive(Debug, Serialize)]
struct DiscoveryDocument<'a> {
    issuer: &'a str,
    jwks_uri: &'a str,
    authorization_endpoint: &'a str,
    response_types_supported: [&'a str; 1],
    subject_types_supported: [&'a str; 1],
    claims_supported: [&'a str; 2],
    id_token_signing_alg_values_supported: &'a [&'a str],
}

/// Renders the compact JSON document. `algs` must be sorted, unique and non-empty: D-7 forbids
/// empty arrays, and the caller never publishes a snapshot without keys.
pub fn render(issuer: &str, jwks_uri: &str, algs: &[&str]) -> Bytes {
    debug_assert!(!algs.is_empty());
    let doc = DiscoveryDocument {
        issuer,
        jwks_uri,
        authorization_endpoint: AUTHORIZATION_ENDPOINT,
        response_types_supported: ["id_token"],
        subject_types_supported: ["public"],
        claims_supported: ["sub", "iss"],
        id_token_signing_alg_values_supported: algs,
    };
    Bytes::from(serde_json::to_vec(&doc).expect("a struct of strings always serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_eks_shaped_document_byte_for_byte() {
        let body = render(
            "https://oidc.example.com",
            "https://oidc.example.com/openid/v1/jwks",
            &["ES256", "RS256"],
        );
        assert_eq!(
            std::str::from_utf8(&body).expect("utf-8"),
            concat!(
                r#"{"issuer":"https://oidc.example.com","#,
                r#""jwks_uri":"https://oidc.example.com/openid/v1/jwks","#,
                r#""authorization_endpoint":"urn:kubernetes:programmatic_authorization","#,
                r#""response_types_supported":["id_token"],"subject_types_supported":["public"],"#,
                r#""claims_supported":["sub","iss"],"#,
                r#""id_token_signing_alg_values_supported":["ES256","RS256"]}"#
            )
        );
    }
}
