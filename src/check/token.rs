//! `check --token`: verifies a service-account token against the published keys the way STS
//! does (A-12, A-13, A-14, G-7), each failure with its own message.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::Value;

use super::report::{Report, Status};
use super::rules::key_alg;
use crate::relying_party::{
    AWS_MAX_TOKEN_CHARS, AWS_MIN_TOKEN_CHARS, CLOCK_SKEW_SECS, GCP_MAX_LIFETIME_SECS, Target,
};

pub fn check(
    report: &mut Report,
    token: &str,
    keys: &[Value],
    issuer: &str,
    audience: Option<&str>,
    targets: &[Target],
) {
    if targets.contains(&Target::Aws) {
        let ok = (AWS_MIN_TOKEN_CHARS..=AWS_MAX_TOKEN_CHARS).contains(&token.len());
        report.add_for(
            "A-12",
            "token is at most 20 000 characters",
            if ok { Status::Pass } else { Status::Fail },
            format!("{} characters", token.len()),
            &[Target::Aws],
        );
    }
    let header = match jsonwebtoken::decode_header(token) {
        Ok(header) => header,
        Err(e) => {
            report.add("A-12", "token is a JWT", Status::Fail, e.to_string());
            return;
        }
    };
    let Some(kid) = header.kid.clone() else {
        report.add("A-11", "token header has a kid", Status::Fail, "no kid");
        return;
    };
    let Some(key) = keys
        .iter()
        .find(|k| k.get("kid").and_then(Value::as_str) == Some(kid.as_str()))
    else {
        report.add(
            "Z-7",
            "token kid is in the JWKS",
            Status::Fail,
            format!("unknown kid {kid:?}: the key is not published (stale JWKS, F-3)"),
        );
        // First and loudly: this one failure refuses every token the key signs, and it is
        // what a rotation that signs before it publishes, an external signer or a rebuilt
        // control plane looks like from outside.
        report.headline = Some(format!(
            "THE TOKEN'S SIGNING KEY IS NOT PUBLIC: kid {kid:?} is not in the published JWKS, so \
             every relying party refuses the tokens it signs until it is published (a rotation \
             that signs before it publishes, an external signer, a rebuilt control plane)"
        ));
        return;
    };
    report.add("Z-7", "token kid is in the JWKS", Status::Pass, kid.clone());
    let alg = format!("{:?}", header.alg);
    for target in targets {
        if !target.accepted_algs().contains(&alg.as_str()) {
            report.add_for(
                "A-10",
                "token algorithm is accepted",
                Status::Fail,
                alg.clone(),
                &[*target],
            );
        }
    }
    if key_alg(key) != alg {
        report.add(
            "A-11",
            "token alg matches the key",
            Status::Fail,
            format!("token {alg}, key {}", key_alg(key)),
        );
    }

    // The signature alone first, so that each claim below gets its own message.
    let decoding = serde_json::from_value::<Jwk>(key.clone())
        .map_err(|e| e.to_string())
        .and_then(|jwk| DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string()));
    let decoding = match decoding {
        Ok(key) => key,
        Err(e) => {
            report.add("D-9", "the published key is usable", Status::Fail, e);
            return;
        }
    };
    let mut signature_only = Validation::new(header.alg);
    signature_only.validate_exp = false;
    signature_only.validate_nbf = false;
    signature_only.validate_aud = false;
    signature_only.required_spec_claims.clear();
    let claims = match jsonwebtoken::decode::<Value>(token, &decoding, &signature_only) {
        Ok(data) => data.claims,
        Err(e) => {
            report.add(
                "A-2",
                "token signature verifies with the published key",
                Status::Fail,
                format!("{e}: tampered, or signed by another key"),
            );
            return;
        }
    };
    report.add(
        "A-2",
        "token signature verifies with the published key",
        Status::Pass,
        format!("{alg} with {kid}"),
    );

    match claims.get("iss").and_then(Value::as_str) {
        Some(iss) if iss == issuer => report.add(
            "A-2",
            "token iss is the issuer",
            Status::Pass,
            iss.to_owned(),
        ),
        Some(iss) => report.add(
            "A-2",
            "token iss is the issuer",
            Status::Fail,
            format!("iss is {iss:?}, not {issuer:?}"),
        ),
        None => report.add("A-2", "token iss is the issuer", Status::Fail, "no iss"),
    }
    let auds: Vec<&str> = match claims.get("aud") {
        Some(Value::String(aud)) => vec![aud.as_str()],
        Some(Value::Array(auds)) => auds.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    match audience {
        Some(want) if auds.contains(&want) => report.add(
            "A-14",
            "token aud includes the audience",
            Status::Pass,
            auds.join(","),
        ),
        Some(want) => report.add(
            "A-14",
            "token aud includes the audience",
            Status::Fail,
            format!("aud is {auds:?}, not {want:?}"),
        ),
        None => report.add(
            "A-14",
            "token aud (no --audience given)",
            Status::Warn,
            auds.join(","),
        ),
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let number = |name: &str| claims.get(name).and_then(Value::as_i64);
    match number("exp") {
        Some(exp) if now > exp + CLOCK_SKEW_SECS => report.add(
            "A-13",
            "token has not expired",
            Status::Fail,
            format!("expired {} s ago", now - exp),
        ),
        Some(exp) => report.add(
            "A-13",
            "token has not expired",
            Status::Pass,
            format!("expires in {} s", exp - now),
        ),
        None => report.add(
            "A-12",
            "token has an integer exp",
            Status::Fail,
            "no integer exp",
        ),
    }
    match number("iat") {
        Some(iat) if iat > now + CLOCK_SKEW_SECS => report.add(
            "A-13",
            "token iat is not in the future",
            Status::Fail,
            format!("iat {} s ahead", iat - now),
        ),
        Some(_) => {}
        None => report.add(
            "A-12",
            "token has an integer iat",
            Status::Fail,
            "no integer iat",
        ),
    }
    if let Some(nbf) = number("nbf")
        && nbf > now + CLOCK_SKEW_SECS
    {
        report.add(
            "A-13",
            "token is valid now (nbf)",
            Status::Fail,
            format!("nbf {} s ahead", nbf - now),
        );
    }
    if let (Some(exp), Some(iat)) = (number("exp"), number("iat"))
        && targets.contains(&Target::Gcp)
    {
        let lifetime = exp - iat;
        let status = if lifetime <= GCP_MAX_LIFETIME_SECS {
            Status::Pass
        } else {
            Status::Fail
        };
        report.add_for(
            "G-7",
            "token lives at most 24 h",
            status,
            format!("{lifetime} s"),
            &[Target::Gcp],
        );
    }
    report.subject = claims.get("sub").and_then(Value::as_str).map(str::to_owned);
}
