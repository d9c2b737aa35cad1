use serde_json::json;

use super::*;

const K3S: &str = include_str!("../../../tests/fixtures/jwks/k3s.json");
const RSA_1024: &str = include_str!("../../../tests/fixtures/jwks/rsa-1024.json");
const PRIVATE_RSA: &str = include_str!("../../../tests/fixtures/jwks/private-rsa.json");
const OCT: &str = include_str!("../../../tests/fixtures/jwks/oct.json");

fn k3s_key(index: usize) -> Value {
    let set: Value = serde_json::from_str(K3S).expect("fixture parses");
    set["keys"][index].clone()
}

fn set_of(keys: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({ "keys": keys })).expect("serialises")
}

fn one_key_dropped_for(key: Value) -> String {
    match validate(&set_of(vec![key, k3s_key(0)])) {
        Ok(v) => {
            assert_eq!(v.keys.len(), 1, "the good key stays");
            assert_eq!(v.dropped.len(), 1, "{v:?}");
            v.dropped[0].reason.clone()
        }
        Err(e) => panic!("expected a dropped key, got rejection: {e}"),
    }
}

#[test]
fn k3s_set_passes_and_is_sorted_by_kid_with_members_in_publish_order() {
    let v = validate(K3S.as_bytes()).expect("valid");
    assert!(v.dropped.is_empty());
    assert_eq!(v.keys.len(), 2);
    assert!(v.keys[0].kid < v.keys[1].kid);
    let rendered = String::from_utf8(crate::jwks::render_jwks(&v.keys).to_vec()).expect("utf-8");
    let rsa = v.keys.iter().find(|k| k.kty == "RSA").expect("rsa");
    assert!(rendered.contains(&format!(
        r#"{{"kty":"RSA","use":"sig","kid":"{}","alg":"RS256","n":"{}","e":"AQAB"}}"#,
        rsa.kid,
        rsa.n.as_deref().expect("n")
    )));
    let ec = v.keys.iter().find(|k| k.kty == "EC").expect("ec");
    assert!(rendered.contains(&format!(
        r#"{{"kty":"EC","use":"sig","kid":"{}","alg":"ES256","crv":"P-256","x":"{}","y":"{}"}}"#,
        ec.kid,
        ec.x.as_deref().expect("x"),
        ec.y.as_deref().expect("y")
    )));
}

#[test]
fn key_order_in_the_source_does_not_change_the_output() {
    let forward = validate(&set_of(vec![k3s_key(0), k3s_key(1)])).expect("valid");
    let backward = validate(&set_of(vec![k3s_key(1), k3s_key(0)])).expect("valid");
    assert_eq!(forward, backward);
}

#[test]
fn any_private_member_rejects_the_whole_set() {
    let err = validate(PRIVATE_RSA.as_bytes()).expect_err("private key");
    assert!(
        matches!(
            err,
            Rejected::PrivateMember {
                index: 1,
                member: "d",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("PRIVATE KEY MATERIAL: key 1 (kid "),
        "{err}"
    );
    for member in PRIVATE_MEMBERS {
        let mut key = k3s_key(1);
        key[member] = json!("AQAB");
        let err = validate(&set_of(vec![k3s_key(0), key])).expect_err(member);
        assert_eq!(
            err,
            Rejected::PrivateMember {
                index: 1,
                kid: k3s_key(1)["kid"].as_str().map(str::to_owned),
                member
            }
        );
    }
}

#[test]
fn private_member_on_a_key_that_would_be_dropped_still_rejects() {
    let key = json!({ "kty": "weird", "d": "AQAB" });
    let err = validate(&set_of(vec![k3s_key(0), key])).expect_err("private");
    assert!(matches!(
        err,
        Rejected::PrivateMember {
            index: 1,
            kid: None,
            member: "d"
        }
    ));
}

#[test]
fn weak_rsa_key_is_dropped_with_its_size() {
    let v = validate(RSA_1024.as_bytes()).expect("the 2048-bit key remains");
    assert_eq!(v.keys.len(), 1);
    assert_eq!(v.dropped.len(), 1);
    assert_eq!(
        v.dropped[0].reason,
        "RSA modulus is 1024 bits; relying parties need at least 2048 (D-12)"
    );
    assert_eq!(v.dropped[0].index, 0);
}

#[test]
fn oct_key_without_secret_is_dropped_and_with_secret_rejects() {
    let v = validate(OCT.as_bytes()).expect("the RSA key remains");
    assert_eq!(v.keys.len(), 1);
    assert_eq!(
        v.dropped[0].reason,
        "symmetric (\"oct\") keys are never published (D-5)"
    );
    let with_secret = json!({ "kty": "oct", "kid": "hmac-1", "k": "c2VjcmV0" });
    let err = validate(&set_of(vec![k3s_key(0), with_secret])).expect_err("secret");
    assert!(matches!(err, Rejected::PrivateMember { member: "k", .. }));
}

#[test]
fn malformed_sets_are_rejected() {
    assert!(matches!(validate(b""), Err(Rejected::NotJson(_))));
    assert!(matches!(
        validate(b"{\"keys\":["),
        Err(Rejected::NotJson(_))
    ));
    assert_eq!(validate(b"[]"), Err(Rejected::NotAnObject));
    assert_eq!(validate(b"{}"), Err(Rejected::NoKeysArray));
    assert_eq!(validate(b"{\"keys\":{}}"), Err(Rejected::NoKeysArray));
    assert_eq!(
        validate(b"{\"keys\":[]}").expect_err("empty").to_string(),
        "no usable public key: the set is empty"
    );
}

#[test]
fn a_set_of_only_bad_keys_is_rejected_with_every_reason() {
    let err = validate(&set_of(vec![json!({"kty": "RSA"}), json!(7)])).expect_err("none usable");
    assert_eq!(
        err.to_string(),
        "no usable public key: key 0: has no \"kid\" (A-11); key 1: not a JSON object"
    );
}

#[test]
fn malformed_keys_are_dropped_with_a_reason() {
    let cases: Vec<(Value, &str)> = vec![
        (json!({"kty": "RSA", "kid": ""}), "has an empty \"kid\""),
        (json!({"kid": "a"}), "has no \"kty\""),
        (json!({"kty": 1, "kid": "a"}), "\"kty\" is not a string"),
        (json!({"kty": "RSA", "kid": 5}), "\"kid\" is not a string"),
        (
            {
                let mut k = k3s_key(0);
                k["kid"] = json!("x");
                k["use"] = json!("enc");
                k
            },
            "\"use\" is \"enc\", not \"sig\" (A-11)",
        ),
        (
            {
                let mut k = k3s_key(0);
                k["kid"] = json!("x");
                k["alg"] = json!("ES256");
                k
            },
            "\"alg\" \"ES256\" does not fit a RSA key (expected one of RS256, RS384, RS512, PS256, PS384, PS512)",
        ),
        (
            {
                let mut k = k3s_key(0);
                k["kid"] = json!("x");
                k["n"] = json!("abc=");
                k
            },
            "\"n\" is not unpadded base64url: Invalid padding",
        ),
        (
            {
                let mut k = k3s_key(0);
                k["kid"] = json!("x");
                k["e"] = json!("AAE");
                k
            },
            "RSA exponent \"e\" must be an odd number from 3 to 2^64",
        ),
        (
            {
                let mut k = k3s_key(1);
                k["kid"] = json!("x");
                k["x"] = json!("AQAB");
                k
            },
            "EC P-256 \"x\" is 3 bytes, must be 32 (RFC 7518 §6.2.1)",
        ),
        (
            {
                let mut k = k3s_key(1);
                k["kid"] = json!("x");
                k["crv"] = json!("secp256k1");
                k
            },
            "EC curve \"secp256k1\" is not supported",
        ),
        (
            {
                // x of one point with y of another: full length, off the curve.
                let mut k = k3s_key(1);
                k["kid"] = json!("x");
                k["y"] = k["x"].clone();
                k
            },
            "EC P-256 point (\"x\", \"y\") is not on the curve",
        ),
        (
            {
                let mut k = k3s_key(0);
                k["kid"] = json!("x");
                let mut n = URL_SAFE_NO_PAD
                    .decode(k["n"].as_str().expect("n"))
                    .expect("b64");
                *n.last_mut().expect("byte") &= 0xfe;
                k["n"] = json!(URL_SAFE_NO_PAD.encode(n));
                k
            },
            "RSA modulus \"n\" is even: not an RSA key",
        ),
        (
            {
                let mut k = k3s_key(1);
                k["kid"] = json!("x");
                k["crv"] = json!("P-384");
                k
            },
            "EC P-384 \"x\" is 32 bytes, must be 48 (RFC 7518 §6.2.1)",
        ),
        (
            json!({"kty": "OKP", "kid": "x", "crv": "X25519", "x": "AQAB"}),
            "OKP curve \"X25519\" is not a signing curve we publish",
        ),
        (
            json!({"kty": "RSA", "kid": "x", "e": "AQAB"}),
            "has no \"n\"",
        ),
        (
            json!({"kty": "DSA", "kid": "x"}),
            "key type \"DSA\" is not supported",
        ),
    ];
    for (key, expected) in cases {
        assert_eq!(one_key_dropped_for(key.clone()), expected, "{key}");
    }
}

/// A key with `member` replaced by `value`, validated next to a good key: the reason it was
/// left out, as the refresher logs it.
fn logged_reason(member: &str, value: Value) -> String {
    let mut key = k3s_key(0);
    key[member] = value;
    let v = validate(&set_of(vec![key, k3s_key(1)])).expect("the good key stays");
    assert_eq!(v.keys.len(), 1, "{v:?}");
    assert_eq!(v.dropped.len(), 1, "{v:?}");
    v.dropped[0].to_string()
}

#[test]
fn out_of_bounds_strings_drop_the_key_without_echoing_it() {
    // S5: a compromised upstream may send megabyte strings; the warning names the member and
    // its length, never the string.
    let huge = "A".repeat(1024 * 1024);
    assert_eq!(
        logged_reason("kid", json!(huge)),
        "key 0: \"kid\" is 1048576 bytes long, more than 256"
    );
    let kid = k3s_key(0)["kid"].as_str().expect("kid").to_owned();
    for member in ["kty", "use", "alg"] {
        assert_eq!(
            logged_reason(member, json!(huge)),
            format!("key 0 (kid {kid:?}): \"{member}\" is 1048576 bytes long, more than 32")
        );
    }
    let mut ec = k3s_key(1);
    ec["crv"] = json!(huge);
    let v = validate(&set_of(vec![ec, k3s_key(0)])).expect("the good key stays");
    let ec_kid = k3s_key(1)["kid"].as_str().expect("kid").to_owned();
    assert_eq!(
        v.dropped[0].to_string(),
        format!("key 0 (kid {ec_kid:?}): \"crv\" is 1048576 bytes long, more than 32")
    );
    // Control characters and non-ASCII would garble log lines and /status.
    assert_eq!(
        logged_reason("kid", json!("a\nb")),
        "key 0: \"kid\" has a character outside printable ASCII"
    );
    assert_eq!(
        logged_reason("kid", json!("clé")),
        "key 0: \"kid\" has a character outside printable ASCII"
    );
    assert_eq!(
        logged_reason("alg", json!("RS\u{0}256")),
        format!("key 0 (kid {kid:?}): \"alg\" has a character outside printable ASCII")
    );
}

#[test]
fn kids_up_to_256_printable_characters_are_published() {
    // K-5: Kubernetes kids are 43 characters of base64url; other IdPs use hex, base64 or
    // words, all far below the bound.
    assert_eq!(k3s_key(0)["kid"].as_str().expect("kid").len(), 43);
    for kid in ["A".repeat(256), " !~ printable ASCII ~! ".to_owned()] {
        let mut key = k3s_key(0);
        key["kid"] = json!(kid);
        let v = validate(&set_of(vec![key])).expect("valid");
        assert_eq!(v.keys[0].kid, kid);
    }
    assert_eq!(
        logged_reason("kid", json!("A".repeat(257))),
        "key 0: \"kid\" is 257 bytes long, more than 256"
    );
}

#[test]
fn a_private_member_next_to_a_huge_kid_is_reported_without_the_kid() {
    let mut key = k3s_key(0);
    key["kid"] = json!("A".repeat(1024 * 1024));
    key["d"] = json!("AQAB");
    let err = validate(&set_of(vec![key]))
        .expect_err("private")
        .to_string();
    assert_eq!(
        err,
        "PRIVATE KEY MATERIAL: key 0 carries the private member \"d\"; the whole set is refused \
         and nothing from it is published (D-5)"
    );
}

#[test]
fn use_sig_is_added_and_unknown_members_are_stripped() {
    let mut key = k3s_key(0);
    let map = key.as_object_mut().expect("object");
    map.remove("use");
    map.insert("x5c".into(), json!(["MIIB"]));
    map.insert("key_ops".into(), json!(["verify"]));
    let v = validate(&set_of(vec![key])).expect("valid");
    let rendered = String::from_utf8(crate::jwks::render_jwks(&v.keys).to_vec()).expect("utf-8");
    assert!(rendered.contains(r#""use":"sig""#));
    assert!(!rendered.contains("x5c") && !rendered.contains("key_ops"));
}

#[test]
fn ed25519_keys_are_published() {
    let key = json!({"kty": "OKP", "kid": "ed", "crv": "Ed25519",
        "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
    let v = validate(&set_of(vec![key])).expect("valid");
    assert_eq!(v.keys[0].signing_alg(), "EdDSA");
}

#[test]
fn duplicate_kids_are_merged_when_identical_and_rejected_when_not() {
    let v = validate(&set_of(vec![k3s_key(0), k3s_key(0)])).expect("same key twice");
    assert_eq!(v.keys.len(), 1);
    let mut other = k3s_key(1);
    other["kid"] = k3s_key(0)["kid"].clone();
    let err = validate(&set_of(vec![k3s_key(0), other])).expect_err("conflict");
    assert!(matches!(err, Rejected::ConflictingKid(_)));
}

#[test]
fn non_minimal_rsa_integers_are_published_verbatim_and_noted() {
    // S4, D-11: leading zero octets in `n`/`e` keep the key, as written, with a note.
    assert!(
        validate(K3S.as_bytes())
            .expect("valid")
            .non_minimal
            .is_empty()
    );
    let mut key = k3s_key(0);
    assert_eq!(key["kty"], "RSA");
    let kid = key["kid"].as_str().expect("kid").to_owned();
    let n = URL_SAFE_NO_PAD
        .decode(key["n"].as_str().expect("n"))
        .expect("b64");
    let padded = URL_SAFE_NO_PAD.encode([&[0u8, 0][..], &n].concat());
    key["n"] = json!(padded);
    let v = validate(&set_of(vec![key.clone(), k3s_key(1)])).expect("valid");
    assert!(v.dropped.is_empty());
    let rsa = v.keys.iter().find(|k| k.kid == kid).expect("published");
    assert_eq!(rsa.n.as_deref(), Some(padded.as_str()), "verbatim");
    assert_eq!(
        v.non_minimal,
        [NonMinimal {
            kid: kid.clone(),
            members: vec![("n", 2)]
        }]
    );
    assert_eq!(
        v.non_minimal[0].to_string(),
        format!(
            "kid {kid:?}: \"n\" has 2 leading zero octets; Base64urlUInt must use the fewest \
             octets (D-11, RFC 7518 §2). Published as the source wrote it, since re-encoding \
             would change its bytes; a strict relying party may refuse this key"
        )
    );
    // `e` alone, and a key listed twice is noted once.
    key["n"] = k3s_key(0)["n"].clone();
    key["e"] = json!("AAEAAQ");
    let v = validate(&set_of(vec![key.clone(), key])).expect("valid");
    assert_eq!(
        v.non_minimal,
        [NonMinimal {
            kid,
            members: vec![("e", 1)]
        }]
    );
}

#[test]
fn bit_length_counts_from_the_first_set_bit() {
    assert_eq!(bit_length(&[]), 0);
    assert_eq!(bit_length(&[0, 0]), 0);
    assert_eq!(bit_length(&[0, 1]), 1);
    assert_eq!(bit_length(&[0x80, 0]), 16);
    assert_eq!(bit_length(&[0, 0x7f, 0]), 15);
}

// === properties (proptest; PROPTEST_CASES sets the count, 256 by default) ===

mod properties {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::super::{PRIVATE_MEMBERS, validate};
    use crate::jwks::render_jwks;

    fn b64(bytes: Vec<u8>) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Eight real P-256 points (random coordinates are almost never on the curve).
    fn ec_points() -> Vec<(String, String)> {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
        static POINTS: std::sync::LazyLock<Vec<(String, String)>> =
            std::sync::LazyLock::new(|| {
                (0..8)
                    .map(|_| {
                        let pair =
                            EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("key");
                        let point = pair.public_key().as_ref();
                        (b64(point[1..33].to_vec()), b64(point[33..].to_vec()))
                    })
                    .collect()
            });
        POINTS.clone()
    }

    /// A valid RSA, EC or Ed25519 key, then, three times in ten, one mutation: a private
    /// member, a missing or numeric kid, `use: enc`, a wrong `alg`, a symmetric type, a short
    /// coordinate or modulus, or an extra member. So that sets are accepted and refused alike.
    fn key() -> impl Strategy<Value = Value> {
        let kid = "[a-z0-9]{1,4}";
        let bytes =
            |range: std::ops::RangeInclusive<usize>| prop::collection::vec(any::<u8>(), range);
        let base = prop_oneof![
            (bytes(256..=300), kid).prop_map(|(mut n, kid)| {
                n[0] |= 0x80;
                json!({"kty": "RSA", "kid": kid, "alg": "RS256", "n": b64(n), "e": "AQAB"})
            }),
            (prop::sample::select(ec_points()), kid).prop_map(|((x, y), kid)| {
                json!({"kty": "EC", "kid": kid, "crv": "P-256", "x": x, "y": y})
            }),
            (bytes(32..=32), kid).prop_map(
                |(x, kid)| json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(x)})
            ),
        ];
        let mutation = prop::option::weighted(
            0.3,
            (0u8..8, prop::sample::select(PRIVATE_MEMBERS.to_vec())),
        );
        (base, mutation).prop_map(|(mut key, mutation)| {
            let m = key.as_object_mut().expect("object");
            match mutation {
                None => {}
                Some((0, private)) => {
                    m.insert(private.into(), json!("c2VjcmV0"));
                }
                Some((1, _)) => {
                    m.remove("kid");
                }
                Some((2, _)) => {
                    m.insert("kid".into(), json!(7));
                }
                Some((3, _)) => {
                    m.insert("use".into(), json!("enc"));
                }
                Some((4, _)) => {
                    m.insert("alg".into(), json!("HS256"));
                }
                Some((5, _)) => {
                    m.insert("kty".into(), json!("oct"));
                }
                Some((6, _)) => {
                    for member in ["n", "x"] {
                        if m.contains_key(member) {
                            m.insert(member.into(), json!("AQAB"));
                        }
                    }
                }
                Some(_) => {
                    m.insert("x5c".into(), json!(["MIIB"]));
                }
            }
            key
        })
    }

    /// The properties below mean something only if the generator also makes accepted sets.
    #[test]
    fn the_generator_makes_accepted_and_refused_sets() {
        use proptest::strategy::ValueTree as _;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = prop::collection::vec(key(), 1..6);
        let accepted = (0..500)
            .filter(|_| {
                let keys = strategy.new_tree(&mut runner).expect("tree").current();
                validate(&serde_json::to_vec(&json!({ "keys": keys })).expect("json")).is_ok()
            })
            .count();
        assert!((25..475).contains(&accepted), "{accepted} of 500 accepted");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = validate(&bytes);
        }

        #[test]
        fn published_sets_hold_only_allow_listed_public_members_of_input_keys(keys in prop::collection::vec(key(), 0..6)) {
            let body = serde_json::to_vec(&json!({ "keys": keys })).expect("json");
            let has_private = keys.iter().any(|k| PRIVATE_MEMBERS.iter().any(|m| k.get(*m).is_some()));
            match validate(&body) {
                Err(_) => {}
                Ok(valid) => {
                    prop_assert!(!has_private, "a set with a private member was accepted");
                    let rendered = render_jwks(&valid.keys);
                    let out: Value = serde_json::from_slice(&rendered).expect("rendered JSON");
                    let allowed = ["kty", "use", "kid", "alg", "n", "e", "crv", "x", "y"];
                    let input_kids: Vec<&Value> = keys.iter().filter_map(|k| k.get("kid")).collect();
                    for key in out["keys"].as_array().expect("keys") {
                        for member in key.as_object().expect("object").keys() {
                            prop_assert!(allowed.contains(&member.as_str()), "published member {member}");
                        }
                        prop_assert_eq!(&key["use"], "sig");
                        prop_assert!(input_kids.contains(&&key["kid"]), "kid {} was not in the input", key["kid"]);
                    }
                    // Rendering is a fixed point: what we publish validates to itself.
                    let again = validate(&rendered).expect("a published set validates");
                    prop_assert!(again.dropped.is_empty());
                    prop_assert_eq!(render_jwks(&again.keys), rendered);
                }
            }
        }
    }
}
