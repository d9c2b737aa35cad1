//! A hostile or broken upstream (issue 9's corpus): whatever the apiserver sends, the last
//! good set stays published byte for byte, the log names the reason, and memory stays bounded
//! (bodies are capped at 1 MiB and never decompressed).

use std::time::Duration;

use serde_json::json;

use crate::fake_apiserver::{FakeApiserver, Mode};
use crate::support::{K3S, Scratch, Server, eventually, get, proc_status_kib};

const ISSUER: &str = "https://oidc.example.com";
const TOKEN: &str = "hostile-test-token";

/// A gzip member holding `data` in one stored (uncompressed) deflate block: enough to see
/// whether a client decompresses, without a compression crate.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for byte in data {
            crc ^= u32::from(*byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let len = u16::try_from(data.len()).expect("one stored block");
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255, 1];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).expect("len").to_le_bytes());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_upstream_never_changes_what_is_served() {
    let fake = FakeApiserver::start(K3S, ISSUER, TOKEN).await;
    let scratch = Scratch::new();
    let config = fake.config_in(
        &scratch,
        TOKEN,
        "",
        "  refresh_interval = \"50ms\"\n  timeout = \"500ms\"",
        "",
    );
    let mut server = Server::start(&config);
    let url = server.url("/openid/v1/jwks");
    eventually("keys", || async { get(&url).await.0 == 200 }).await;
    let (_, good) = get(&url).await;
    let rss_before = proc_status_kib(server.pid(), "VmRSS");

    let k3s: serde_json::Value = serde_json::from_str(K3S).expect("json");
    let (rsa, ec) = (k3s["keys"][0].clone(), k3s["keys"][1].clone());
    let mut conflicting = ec.clone();
    conflicting["kid"] = rsa["kid"].clone();
    let mut numeric = rsa.clone();
    numeric["kid"] = json!(7);
    numeric["n"] = json!(12345);
    let thousands: Vec<serde_json::Value> = (0..2000)
        .map(|i| {
            let mut key = ec.clone();
            key["kid"] = json!(format!("k{i}"));
            key
        })
        .collect();
    let cases: Vec<(&str, Mode, &str)> = vec![
        (
            "deeply nested JSON",
            Mode::Body(format!("{{\"keys\":{}", "[".repeat(100_000))),
            "recursion limit exceeded",
        ),
        (
            "invalid UTF-8",
            Mode::Raw(b"{\"keys\":[{\"kid\":\"\xff\xfe\"}]}".to_vec(), Vec::new()),
            "not valid JSON",
        ),
        (
            "one kid, two keys",
            Mode::Body(json!({ "keys": [rsa, conflicting] }).to_string()),
            "names two different keys",
        ),
        (
            "numbers where strings belong",
            Mode::Body(json!({ "keys": [numeric] }).to_string()),
            "\"kid\" is not a string",
        ),
        (
            "2000 keys",
            Mode::Body(json!({ "keys": thousands }).to_string()),
            "more than max_keys = 100",
        ),
        (
            "a gzip body, which is never decompressed",
            Mode::Raw(
                gzip_stored(K3S.as_bytes()),
                vec![("content-encoding".into(), "gzip".into())],
            ),
            "not valid JSON",
        ),
        (
            "an endless 4 MiB body",
            Mode::Raw(vec![b' '; 4 << 20], Vec::new()),
            "is larger than 1048576 bytes",
        ),
        (
            "a redirect to another host",
            Mode::Redirect("https://attacker.example/jwks".into()),
            "redirects are never followed",
        ),
    ];
    for (what, mode, reason) in cases {
        fake.set(|s| s.mode = mode);
        let line = server.wait_for_log(reason);
        assert!(
            line.contains("still serving the last good set") || line.contains("key left out"),
            "{what}: {line}"
        );
        assert_eq!(get(&url).await, (200, good.clone()), "{what}");
    }
    // Bodies are capped at 1 MiB and dropped after each refusal: memory stays bounded.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_after = proc_status_kib(server.pid(), "VmRSS");
    println!("hostile upstream: RSS {rss_before} KiB before, {rss_after} KiB after the corpus");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
}
