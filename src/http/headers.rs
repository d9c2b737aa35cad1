//! Header values and the conditional-request rules, in one place.

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderValue;

pub const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");
pub const JWK_SET_JSON: HeaderValue = HeaderValue::from_static("application/jwk-set+json");
pub const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
pub const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
/// D-7: the discovery endpoint SHOULD support CORS; the documents are public.
pub const ANY_ORIGIN: HeaderValue = HeaderValue::from_static("*");
pub const ALLOW: HeaderValue = HeaderValue::from_static("GET, HEAD");
pub const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

/// A strong validator over the exact bytes: the first 128 bits of their SHA-256, base64url.
/// The same bytes give the same ETag on every replica.
pub fn strong_etag(body: &[u8]) -> HeaderValue {
    let hash = digest::digest(&digest::SHA256, body);
    let tag = format!("\"{}\"", URL_SAFE_NO_PAD.encode(&hash.as_ref()[..16]));
    HeaderValue::from_str(&tag).expect("base64url and quotes are valid header text")
}

/// `Cache-Control: public, max-age=N`.
pub fn cache_control(max_age_secs: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("public, max-age={max_age_secs}"))
        .expect("digits are valid header text")
}

/// RFC 9110 §13.1.2: `If-None-Match` uses the weak comparison, so `W/"x"` matches `"x"`,
/// and `*` matches any current representation.
pub fn none_match(if_none_match: &[u8], etag: &HeaderValue) -> bool {
    let current = strip_weak(etag.as_bytes());
    if_none_match
        .split(|b| *b == b',')
        .map(|t| t.trim_ascii())
        .any(|t| t == b"*" || strip_weak(t) == current)
}

fn strip_weak(tag: &[u8]) -> &[u8] {
    tag.strip_prefix(b"W/").unwrap_or(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_is_strong_quoted_and_stable() {
        let a = strong_etag(b"{\"keys\":[]}");
        assert_eq!(a, strong_etag(b"{\"keys\":[]}"));
        assert_ne!(a, strong_etag(b"{\"keys\":[ ]}"));
        let s = a.to_str().expect("ascii");
        assert!(s.starts_with('"') && s.ends_with('"') && !s.starts_with("W/"));
        assert_eq!(s.len(), 24);
    }

    #[test]
    fn if_none_match_uses_the_weak_comparison_over_a_list() {
        let tag = HeaderValue::from_static("\"abc\"");
        assert!(none_match(b"\"abc\"", &tag));
        assert!(none_match(b"W/\"abc\"", &tag));
        assert!(none_match(b"\"x\", \"abc\"", &tag));
        assert!(none_match(b"*", &tag));
        assert!(!none_match(b"\"abcd\"", &tag));
        assert!(!none_match(b"abc", &tag));
        assert!(!none_match(b"", &tag));
    }
}
