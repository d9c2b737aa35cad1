//! The one public handler. It reads a pre-rendered snapshot and copies out reference-counted
//! bytes: no lock, no document rendering, no waiting on a refresh. The request body is never
//! read.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::header::{
    ACCESS_CONTROL_ALLOW_ORIGIN, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE,
    ETAG, HOST, IF_NONE_MATCH, RETRY_AFTER, USER_AGENT, WWW_AUTHENTICATE, X_CONTENT_TYPE_OPTIONS,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};

use super::headers::{self, none_match};
use super::{App, Doc, Route};
use crate::jwks::source::MAX_BODY_BYTES;
use crate::metrics::PushResult;
use crate::push::gate::{PUSH_BODY_TIMEOUT, Refusal};

/// Sent with 503 before an issuer's first good key set: a short wait, then ask again.
const RETRY_AFTER_SECS: HeaderValue = HeaderValue::from_static("5");

pub async fn serve_document(State(app): State<Arc<App>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let (method, uri, req_headers) = (&parts.method, &parts.uri, &parts.headers);
    let response = if app.site.is_push_path(uri.path()) {
        push(&app, method, uri, req_headers, body).await
    } else {
        let (route, response) = answer(&app, method, uri, req_headers);
        app.site.count(route, response.status());
        response
    };
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

/// A push (issue 18): the token is checked before the body is read, so that a flood of bad
/// pushes never makes the server read a megabyte each.
async fn push(
    app: &App,
    method: &Method,
    uri: &Uri,
    req_headers: &HeaderMap,
    body: Body,
) -> Response {
    let Some(gate) = app.site.push_gate(host_of(uri, req_headers), uri.path()) else {
        return plain(
            StatusCode::NOT_FOUND,
            "no push source is configured for this issuer on this listener\n",
        );
    };
    if method != Method::PUT {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "a push is a PUT\n");
        response.headers_mut().insert(ALLOW, headers::ALLOW_PUT);
        return response;
    }
    let verified =
        match gate.authenticate(req_headers.get(AUTHORIZATION).map(HeaderValue::as_bytes)) {
            Ok(verified) => verified,
            Err(refusal) => return refused(&refusal),
        };
    let too_large = || Refusal {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        result: PushResult::bad_body,
        reason: format!("a pushed key set is at most {MAX_BODY_BYTES} bytes"),
    };
    let declared = req_headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES) {
        let refusal = too_large();
        gate.refused(&refusal);
        return refused(&refusal);
    }
    let limit = usize::try_from(MAX_BODY_BYTES).unwrap_or(usize::MAX);
    let bytes =
        match tokio::time::timeout(PUSH_BODY_TIMEOUT, axum::body::to_bytes(body, limit)).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(_)) => {
                let refusal = too_large();
                gate.refused(&refusal);
                return refused(&refusal);
            }
            Err(_) => {
                let refusal = Refusal {
                    status: StatusCode::REQUEST_TIMEOUT,
                    result: PushResult::bad_body,
                    reason: format!(
                        "the body did not arrive within {} s",
                        PUSH_BODY_TIMEOUT.as_secs()
                    ),
                };
                gate.refused(&refusal);
                return refused(&refusal);
            }
        };
    match gate.accept(&verified, bytes).await {
        Ok(text) => text_response(StatusCode::OK, text),
        Err(refusal) => refused(&refusal),
    }
}

fn refused(refusal: &Refusal) -> Response {
    let mut response = text_response(refusal.status, format!("{}\n", refusal.reason));
    if refusal.status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, headers::BEARER);
    }
    response
}

fn host_of<'a>(uri: &'a Uri, req_headers: &'a HeaderMap) -> Option<&'a str> {
    uri.host().or_else(|| {
        req_headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(strip_port)
    })
}

fn answer(
    app: &App,
    method: &Method,
    uri: &Uri,
    req_headers: &HeaderMap,
) -> (Option<Route>, Response) {
    let Some(route) = app.site.route(host_of(uri, req_headers), uri.path()) else {
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
    text_response(status, text)
}

fn text_response(status: StatusCode, text: impl Into<Body>) -> Response {
    let mut response = Response::new(text.into());
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
