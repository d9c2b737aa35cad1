//! Validation of a fetched JWK set: a pure function from bytes to the public keys we may publish.
//!
//! Two kinds of verdict:
//! - the whole fetch is [`Rejected`] (not a JWK set, a private member anywhere, conflicting kids,
//!   nothing usable left): the caller keeps its last good set;
//! - single keys are [`Dropped`] with a reason (weak, unknown type, malformed): the caller warns
//!   and publishes the rest.
//!
//! Keys that are published but bend a rule a strict relying party may enforce come back as
//! [`NonMinimal`] notes, for the caller to warn about.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

use super::PublicJwk;

/// D-5: members that only private or symmetric keys carry (RFC 7518 §6.2.2, §6.3.2, §6.4.1).
pub const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];
pub use crate::relying_party::MIN_RSA_BITS;
/// Larger moduli buy nothing and cost every relying party verification time.
pub const MAX_RSA_BITS: usize = 8192;

/// S5: the longest kid we publish. Kubernetes kids are 43 characters (K-5, base64url of a
/// SHA-256); other IdPs use hex digests, base64 thumbprints or short words. A longer kid is a
/// broken or hostile upstream, and would otherwise reach every log line and `/status`.
pub const MAX_KID_BYTES: usize = 256;
/// S5: `kty`, `use`, `crv` and `alg` are names from short fixed lists (the longest is
/// "Ed25519"); anything longer is left out without being echoed.
pub const MAX_NAME_BYTES: usize = 32;

/// A JWK set that passed validation: keys sorted by kid, plus the keys that were left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    pub keys: Vec<PublicJwk>,
    pub dropped: Vec<Dropped>,
    /// Published keys whose RSA integers carry leading zero octets (S4, D-11), by kid.
    pub non_minimal: Vec<NonMinimal>,
}

/// S4, D-11: an RSA key whose `n` or `e` has leading zero octets. RFC 7518 §2 says a
/// Base64urlUInt "MUST utilize the minimum number of octets", so a strict relying party may
/// refuse the key; most decode it fine. It is published as the source wrote it anyway:
/// re-encoding would change its bytes against upstream and against every replica that
/// fetched the same set. The caller warns, once per key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonMinimal {
    pub kid: String,
    /// Each member with its count of leading zero octets, `n` before `e`.
    pub members: Vec<(&'static str, usize)>,
}

impl fmt::Display for NonMinimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kid {:?}: ", self.kid)?;
        for (i, (member, zeros)) in self.members.iter().enumerate() {
            let plural = if *zeros == 1 { "" } else { "s" };
            let and = if i == 0 { "" } else { " and " };
            write!(
                f,
                "{and}\"{member}\" has {zeros} leading zero octet{plural}"
            )?;
        }
        f.write_str(
            "; Base64urlUInt must use the fewest octets (D-11, RFC 7518 §2). Published as the \
             source wrote it, since re-encoding would change its bytes; a strict relying party \
             may refuse this key",
        )
    }
}

/// A key left out of the published set, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Position in the fetched `keys` array.
    pub index: usize,
    pub kid: Option<String>,
    pub reason: String,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kid {
            Some(kid) => write!(f, "key {} (kid {kid:?}): {}", self.index, self.reason),
            None => write!(f, "key {}: {}", self.index, self.reason),
        }
    }
}

/// Why a whole fetch was refused; the last good set stays published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("not valid JSON: {0}")]
    NotJson(String),
    #[error("not a JWK set: the top level is not a JSON object")]
    NotAnObject,
    #[error("not a JWK set: no \"keys\" array")]
    NoKeysArray,
    #[error(
        "PRIVATE KEY MATERIAL: key {index}{} carries the private member {member:?}; \
         the whole set is refused and nothing from it is published (D-5)",
        kid.as_ref().map(|k| format!(" (kid {k:?})")).unwrap_or_default()
    )]
    PrivateMember {
        index: usize,
        kid: Option<String>,
        member: &'static str,
    },
    #[error("kid {0:?} names two different keys (RFC 7517 §4.5)")]
    ConflictingKid(String),
    #[error("no usable public key: {}", describe_dropped(.0))]
    NoUsableKey(Vec<Dropped>),
}

fn describe_dropped(dropped: &[Dropped]) -> String {
    if dropped.is_empty() {
        return "the set is empty".to_owned();
    }
    let all: Vec<String> = dropped.iter().map(ToString::to_string).collect();
    all.join("; ")
}

/// Validates a fetched JWK set (DESIGN §4 "Validate").
pub fn validate(body: &[u8]) -> Result<Validated, Rejected> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| Rejected::NotJson(e.to_string()))?;
    let Value::Object(top) = value else {
        return Err(Rejected::NotAnObject);
    };
    let Some(Value::Array(raw_keys)) = top.get("keys") else {
        return Err(Rejected::NoKeysArray);
    };

    // A private member anywhere refuses everything: a source that leaks one key may leak more,
    // and the operator must hear about it rather than see a quietly smaller set.
    for (index, raw) in raw_keys.iter().enumerate() {
        if let Value::Object(members) = raw
            && let Some(member) = PRIVATE_MEMBERS
                .into_iter()
                .find(|m| members.contains_key(*m))
        {
            let kid = echoable_kid(members.get("kid"));
            return Err(Rejected::PrivateMember { index, kid, member });
        }
    }

    let mut by_kid: BTreeMap<String, PublicJwk> = BTreeMap::new();
    let mut dropped = Vec::new();
    let mut non_minimal = Vec::new();
    for (index, raw) in raw_keys.iter().enumerate() {
        match public_key(raw) {
            Ok(jwk) => match by_kid.get(&jwk.kid) {
                Some(seen) if *seen == jwk => {}
                Some(_) => return Err(Rejected::ConflictingKid(jwk.kid)),
                None => {
                    non_minimal.extend(non_minimal_integers(&jwk));
                    by_kid.insert(jwk.kid.clone(), jwk);
                }
            },
            Err(reason) => dropped.push(Dropped {
                index,
                kid: echoable_kid(raw.get("kid")),
                reason,
            }),
        }
    }
    if by_kid.is_empty() {
        return Err(Rejected::NoUsableKey(dropped));
    }
    non_minimal.sort_by(|a, b| a.kid.cmp(&b.kid));
    Ok(Validated {
        keys: by_kid.into_values().collect(),
        dropped,
        non_minimal,
    })
}

/// S4: the leading zero octets of an accepted RSA key's `n` and `e`, if any.
fn non_minimal_integers(jwk: &PublicJwk) -> Option<NonMinimal> {
    let members: Vec<(&'static str, usize)> = [("n", &jwk.n), ("e", &jwk.e)]
        .into_iter()
        .filter_map(|(member, text)| {
            // Accepted keys decode (`required_b64`); a value that did not counts as minimal.
            let bytes = URL_SAFE_NO_PAD.decode(text.as_deref()?).ok()?;
            let zeros = bytes.iter().take_while(|b| **b == 0).count();
            (zeros > 0).then_some((member, zeros))
        })
        .collect();
    (!members.is_empty()).then(|| NonMinimal {
        kid: jwk.kid.clone(),
        members,
    })
}

/// Builds the allow-listed public key from one JWK, or says why it is left out.
fn public_key(raw: &Value) -> Result<PublicJwk, String> {
    let Value::Object(members) = raw else {
        return Err("not a JSON object".to_owned());
    };
    let kid = string_member(members, "kid")?.ok_or("has no \"kid\" (A-11)")?;
    if kid.is_empty() {
        return Err("has an empty \"kid\"".to_owned());
    }
    check_bounds("kid", kid, MAX_KID_BYTES)?;
    let kty = name_member(members, "kty")?.ok_or("has no \"kty\"")?;
    match name_member(members, "use")? {
        None | Some("sig") => {}
        Some(other) => return Err(format!("\"use\" is {other:?}, not \"sig\" (A-11)")),
    }
    let alg = name_member(members, "alg")?;
    let mut jwk = PublicJwk {
        kty: kty.to_owned(),
        use_: "sig".to_owned(),
        kid: kid.to_owned(),
        alg: alg.map(str::to_owned),
        n: None,
        e: None,
        crv: None,
        x: None,
        y: None,
    };
    let allowed_algs: &[&str] = match kty {
        "RSA" => {
            let n = required_b64(members, "n")?;
            let e = required_b64(members, "e")?;
            check_rsa(&n.1, &e.1)?;
            jwk.n = Some(n.0.to_owned());
            jwk.e = Some(e.0.to_owned());
            &["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
        }
        "EC" => {
            let crv = name_member(members, "crv")?.ok_or("EC key has no \"crv\"")?;
            let (len, alg) = match crv {
                "P-256" => (32, "ES256"),
                "P-384" => (48, "ES384"),
                "P-521" => (66, "ES512"),
                other => return Err(format!("EC curve {other:?} is not supported")),
            };
            let x = required_b64(members, "x")?;
            let y = required_b64(members, "y")?;
            // L9, RFC 7518 §6.2.1.2: coordinates are full-length octet strings.
            for (name, bytes) in [("x", &x.1), ("y", &y.1)] {
                if bytes.len() != len {
                    return Err(format!(
                        "EC {crv} \"{name}\" is {} bytes, must be {len} (RFC 7518 §6.2.1)",
                        bytes.len()
                    ));
                }
            }
            check_ec_point(crv, &x.1, &y.1)?;
            jwk.crv = Some(crv.to_owned());
            jwk.x = Some(x.0.to_owned());
            jwk.y = Some(y.0.to_owned());
            return check_alg(jwk, &[alg]);
        }
        "OKP" => {
            let crv = name_member(members, "crv")?.ok_or("OKP key has no \"crv\"")?;
            if crv != "Ed25519" {
                return Err(format!(
                    "OKP curve {crv:?} is not a signing curve we publish"
                ));
            }
            let x = required_b64(members, "x")?;
            if x.1.len() != 32 {
                return Err(format!("Ed25519 \"x\" is {} bytes, must be 32", x.1.len()));
            }
            jwk.crv = Some(crv.to_owned());
            jwk.x = Some(x.0.to_owned());
            &["EdDSA", "Ed25519"]
        }
        "oct" => return Err("symmetric (\"oct\") keys are never published (D-5)".to_owned()),
        other => return Err(format!("key type {other:?} is not supported")),
    };
    check_alg(jwk, allowed_algs)
}

fn check_alg(jwk: PublicJwk, allowed: &[&str]) -> Result<PublicJwk, String> {
    match jwk.alg.as_deref() {
        Some(alg) if !allowed.contains(&alg) => Err(format!(
            "\"alg\" {alg:?} does not fit a {} key (expected one of {})",
            jwk.kty,
            allowed.join(", ")
        )),
        _ => Ok(jwk),
    }
}

/// A point off the curve (or the point at infinity) verifies no signature: relying parties
/// refuse such a key or, worse, some accept it and fail every token later. aws-lc checks the
/// point as SEC 1 (uncompressed) for the curve.
fn check_ec_point(crv: &str, x: &[u8], y: &[u8]) -> Result<(), String> {
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED, ECDSA_P521_SHA512_FIXED, ParsedPublicKey,
        VerificationAlgorithm,
    };
    let algorithm: &'static dyn VerificationAlgorithm = match crv {
        "P-256" => &ECDSA_P256_SHA256_FIXED,
        "P-384" => &ECDSA_P384_SHA384_FIXED,
        _ => &ECDSA_P521_SHA512_FIXED,
    };
    let point = [&[0x04][..], x, y].concat();
    ParsedPublicKey::new(algorithm, &point)
        .map(drop)
        .map_err(|_| format!("EC {crv} point (\"x\", \"y\") is not on the curve"))
}

fn check_rsa(n: &[u8], e: &[u8]) -> Result<(), String> {
    let bits = bit_length(n);
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "RSA modulus is {bits} bits; relying parties need at least {MIN_RSA_BITS} (D-12)"
        ));
    }
    if bits > MAX_RSA_BITS {
        return Err(format!(
            "RSA modulus is {bits} bits, more than {MAX_RSA_BITS}"
        ));
    }
    // An RSA modulus is the product of two odd primes.
    if n.last().is_some_and(|b| b % 2 == 0) {
        return Err("RSA modulus \"n\" is even: not an RSA key".to_owned());
    }
    let e_bits = bit_length(e);
    if !(2..=64).contains(&e_bits) || e.last().is_some_and(|b| b % 2 == 0) {
        return Err("RSA exponent \"e\" must be an odd number from 3 to 2^64".to_owned());
    }
    Ok(())
}

/// The number of significant bits of a big-endian unsigned integer.
pub fn bit_length(big_endian: &[u8]) -> usize {
    match big_endian.iter().position(|b| *b != 0) {
        Some(first) => (big_endian.len() - first) * 8 - big_endian[first].leading_zeros() as usize,
        None => 0,
    }
}

fn string_member<'a>(
    members: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, String> {
    match members.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("\"{name}\" is not a string")),
    }
}

/// S5: a string member we publish or echo must be short printable ASCII. The reason names the
/// member and its length, never its text.
fn check_bounds(name: &str, text: &str, max: usize) -> Result<(), String> {
    if text.len() > max {
        return Err(format!(
            "\"{name}\" is {} bytes long, more than {max}",
            text.len()
        ));
    }
    if !text.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(format!(
            "\"{name}\" has a character outside printable ASCII"
        ));
    }
    Ok(())
}

/// `kty`, `use`, `crv` or `alg`: a string within [`MAX_NAME_BYTES`].
fn name_member<'a>(members: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, String> {
    let text = string_member(members, name)?;
    if let Some(text) = text {
        check_bounds(name, text, MAX_NAME_BYTES)?;
    }
    Ok(text)
}

/// The kid of a refused or dropped key, for the message, only when it is safe to echo (S5).
fn echoable_kid(kid: Option<&Value>) -> Option<String> {
    kid.and_then(Value::as_str)
        .filter(|kid| check_bounds("kid", kid, MAX_KID_BYTES).is_ok())
        .map(str::to_owned)
}

/// A required base64url member: its text as published and its decoded bytes.
fn required_b64<'a>(
    members: &'a Map<String, Value>,
    name: &str,
) -> Result<(&'a str, Vec<u8>), String> {
    let text = string_member(members, name)?.ok_or_else(|| format!("has no \"{name}\""))?;
    // RFC 7518 §2: base64url without padding; anything else is a mangled key.
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|e| format!("\"{name}\" is not unpadded base64url: {e}"))?;
    if bytes.is_empty() {
        return Err(format!("\"{name}\" is empty"));
    }
    Ok((text, bytes))
}

#[cfg(test)]
mod tests;
