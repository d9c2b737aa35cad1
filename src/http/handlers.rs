//! The one public handler. It reads a pre-rendered snapshot and copies out reference-counted
//! bytes: no lock, no document rendering, no waiting on a refresh. The request body is never
//! read.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use http::header::{
    ACCESS_CONTROL_ALLOW_ORIGIN, ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ETAG, HOST,
    IF_NONE_MATCH, RETRY_AFTER, USER_AGENT, X_CONTENT_TYPE_OPTIONS,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};

use super::headers::{self, none_match};
use super::{App, Doc, Route};

/// Sent with 503 before an issuer's first good key set: a short wait, then ask again.
const RETRY_AFTER_SECS: HeaderValue = HeaderValue::from_static("5");

pub async fn serve_document(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    req_headers: HeaderMap,
) -> Response {
    let (route, response) = answer(&app, &method, &uri, &req_headers);
    app.site.count(route, response.status());
    if app.site.access_log() {
        let host = req_headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        // The User-Agent too: how an operator finds the string a relying party sends, to
        // name it in [relying_parties.user_agents].
        let user_agent = req_headers
            .get(USER_AGENT)
            .map(|a| String::from_utf8_lossy(a.as_bytes()));
        tracing::info!(
            target: "oidc_edge::access",
            %method,
            host,
            path = uri.path(),
            status = response.status().as_u16(),
            user_agent = user_agent.as_deref().unwrap_or(""),
            "request"
        );
    }
    response
}

fn answer(
    app: &App,
    method: &Method,
    uri: &Uri,
    req_headers: &HeaderMap,
) -> (Option<Route>, Response) {
    let host = uri.host().or_else(|| {
        req_headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(strip_port)
    });
    let Some(route) = app.site.route(host, uri.path()) else {
        return (None, plain(StatusCode::NOT_FOUND, "not found\n"));
    };
    if method != Method::GET && method != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response.headers_mut().insert(ALLOW, headers::ALLOW);
        return (Some(route), response);
    }
    let Some(snapshot) = app.store.get(route.issuer) else {
        // Never an empty key set: a relying party would cache "no keys" (DESIGN §3).
        let mut response = plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "no key set has been published yet\n",
        );
        response.headers_mut().insert(RETRY_AFTER, RETRY_AFTER_SECS);
        return (Some(route), response);
    };
    let doc = match route.doc {
        Doc::Discovery => &snapshot.discovery,
        Doc::Jwks => &snapshot.jwks,
    };

    let not_modified = req_headers
        .get(IF_NONE_MATCH)
        .is_some_and(|inm| none_match(inm.as_bytes(), &doc.etag));
    let (status, body) = if not_modified {
        (StatusCode::NOT_MODIFIED, Body::empty())
    } else if method == Method::HEAD {
        (StatusCode::OK, Body::empty())
    } else {
        (StatusCode::OK, Body::from(doc.body.clone()))
    };
    // Relying-party fetch tracking: a GET only, since a HEAD receives no keys.
    if method == Method::GET
        && let Some(agent) = req_headers.get(USER_AGENT)
    {
        app.site
            .observe_fetch(route, agent.as_bytes(), status, &doc.etag, &snapshot.kids);
    }
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, doc.content_type.clone());
    if status == StatusCode::OK {
        h.insert(CONTENT_LENGTH, HeaderValue::from(doc.body.len()));
    }
    h.insert(CACHE_CONTROL, doc.cache_control.clone());
    h.insert(ETAG, doc.etag.clone());
    h.insert(X_CONTENT_TYPE_OPTIONS, headers::NOSNIFF);
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, headers::ANY_ORIGIN);
    (Some(route), response)
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, headers::TEXT_PLAIN);
    h.insert(CACHE_CONTROL, headers::NO_STORE);
    h.insert(X_CONTENT_TYPE_OPTIONS, headers::NOSNIFF);
    response
}

/// `host:port` → `host`; `[v6]:port` → `[v6]`.
fn strip_port(authority: &str) -> &str {
    match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => &authority[..i],
        _ => authority,
    }
}

/// `301` to `https://<host><path>` for a configured host; 404 otherwise.
pub fn redirect(
    hosts: &[String],
    https_port: Option<u16>,
    uri: &Uri,
    req_headers: &HeaderMap,
) -> Response {
    let host = req_headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(strip_port)
        .map(str::to_ascii_lowercase);
    let Some(host) = host.filter(|h| hosts.iter().any(|known| known == h)) else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = match https_port {
        Some(port) => format!("https://{host}:{port}{path}"),
        None => format!("https://{host}{path}"),
    };
    let mut response = plain(StatusCode::MOVED_PERMANENTLY, "moved to https\n");
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(http::header::LOCATION, value);
    }
    response
}

/// The key authorization of a pending HTTP-01 challenge (RFC 8555 §8.3).
pub fn http01(resolver: &crate::tls::acme::AcmeResolver, token: &str) -> Response {
    match resolver.http01_key_auth(token) {
        Some(key_auth) => {
            let mut response = Response::new(Body::from(key_auth));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            response
        }
        None => plain(StatusCode::NOT_FOUND, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("oidc.example.com"), "oidc.example.com");
        assert_eq!(strip_port("oidc.example.com:8080"), "oidc.example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
