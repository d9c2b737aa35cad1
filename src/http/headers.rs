//! Header values and the conditional-request rules, in one place.

use http::HeaderValue;

pub const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
pub const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
/// D-7: the discovery endpoint SHOULD support CORS; the documents are public.
pub const ANY_ORIGIN: HeaderValue = HeaderValue::from_static("*");
pub const ALLOW: HeaderValue = HeaderValue::from_static("GET, HEAD");
pub const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
/// A push endpoint takes only PUT.
pub const ALLOW_PUT: HeaderValue = HeaderValue::from_static("PUT");
/// RFC 6750 §3: a push without a usable token is told to bring one.
pub const BEARER: HeaderValue = HeaderValue::from_static("Bearer");
/// HSTS on every HTTPS answer: once a browser has used https, it never falls back.
pub const HSTS: HeaderValue = HeaderValue::from_static("max-age=31536000");

/// Adds `Strict-Transport-Security` to every answer of the HTTPS router.
pub fn with_hsts(router: axum::Router) -> axum::Router {
    router.layer(axum::middleware::map_response(
        |mut response: axum::response::Response| async move {
            response
                .headers_mut()
                .insert(http::header::STRICT_TRANSPORT_SECURITY, HSTS);
            response
        },
    ))
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
