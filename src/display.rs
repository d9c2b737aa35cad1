//! How URLs and errors are shown in logs, `/status` and messages: user info cut out of URLs
//! (M5), and an error's causes on one line.

/// `url` with any user info shown as `***` (M5). Config refuses user info in source URLs;
/// everything that names a URL in a log line, `/status` or an error goes through this anyway,
/// so that a credential that slips past validation is still never printed.
pub fn redacted_url(url: &url::Url) -> String {
    if url.username().is_empty() && url.password().is_none() {
        return url.to_string();
    }
    let mut shown = url.clone();
    // Both fail only for URLs without a host, which have no user info to hide.
    let _ = shown.set_password(None);
    let _ = shown.set_username("***");
    shown.to_string()
}

/// Text meant to be a URL, with anything between `://` and the last `@` of the authority
/// replaced by `***`: for messages about text that may not even parse as a URL (M5).
pub fn redacted_text(text: &str) -> String {
    let Some(scheme_end) = text.find("://") else {
        return text.to_owned();
    };
    let start = scheme_end + 3;
    let rest = &text[start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_len].rfind('@') {
        Some(at) => format!("{}***{}", &text[..start], &rest[at..]),
        None => text.to_owned(),
    }
}

/// An error and its causes on one line: reqwest hides the useful part ("invalid peer
/// certificate: UnknownIssuer") in the source chain.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_is_cut_out_of_urls_and_url_like_text() {
        let url = url::Url::parse("https://user:S3CRET@h.example:8443/p").expect("url");
        assert_eq!(redacted_url(&url), "https://***@h.example:8443/p");
        let url = url::Url::parse("https://S3CRET@h.example/").expect("url");
        assert_eq!(redacted_url(&url), "https://***@h.example/");
        let url = url::Url::parse("https://h.example/a@b").expect("url");
        assert_eq!(redacted_url(&url), "https://h.example/a@b");
        assert_eq!(
            redacted_text("https://u:S3CRET@x@h:99999/a@b?c@d"),
            "https://***@h:99999/a@b?c@d"
        );
        assert_eq!(redacted_text("https://h/a@b"), "https://h/a@b");
        assert_eq!(redacted_text("not a url @ all"), "not a url @ all");
    }
}
