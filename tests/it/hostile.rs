//! A hostile or broken upstream (issue 9's corpus): whatever the apiserver sends, the last
//! good set stays published byte for byte, the log names the reason, and memory stays bounded
//! (bodies are capped at 1 MiB and never decompressed).

use std::time::Duration;

use serde_json::json;

use crate::support::clients::get;
use crate::support::config::TestConfig;
use crate::support::fake_apiserver::{FakeApiserver, Mode};
use crate::support::inprocess::InProcess;
use crate::support::metrics::{metric, proc_status_kib, scrape};
use crate::support::process::Binary;
use crate::support::{K3S, Scratch, eventually};

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

/// The refreshes of the fake's new mode are all counted as `result`: the metric names the
/// kind of failure.
async fn assert_counted_only(server: &Binary, result: &str, what: &str) {
    const RESULTS: [&str; 5] = [
        "ok",
        "unchanged",
        "fetch_error",
        "rejected",
        "merge_rejected",
    ];
    let counts = || async {
        let scrape = scrape(server.admin).await;
        RESULTS.map(|r| metric(&scrape, "oidc_edge_refreshes_total", &[("result", r)]))
    };
    // Windows of 300 ms (six refreshes) until one counts `result` and nothing else: the
    // first windows may still see the previous case's last refresh.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let before = counts().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = counts().await;
        let moved: Vec<&str> = RESULTS
            .iter()
            .zip(before.iter().zip(after))
            .filter(|(_, (before, after))| after > *before)
            .map(|(name, _)| *name)
            .collect();
        if moved == [result] {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: refreshes counted as {moved:?}, expected only {result}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_upstream_never_changes_what_is_served() {
    let mut fake = FakeApiserver::start(K3S, ISSUER, TOKEN).await;
    let scratch = Scratch::new();
    let config = TestConfig::new()
        .source(
            fake.source_in(&scratch, TOKEN)
                .set("refresh_interval", "50ms")
                .set("timeout", "500ms"),
        )
        .write(&scratch);
    let mut server = Binary::start(&config);
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
    // (what, how the fake answers, the reason the log gives, the refresh result counted)
    let cases: Vec<(&str, Mode, &str, &str)> = vec![
        (
            "deeply nested JSON",
            Mode::Body(format!("{{\"keys\":{}", "[".repeat(100_000))),
            "recursion limit exceeded",
            "rejected",
        ),
        (
            "invalid UTF-8",
            Mode::Raw(b"{\"keys\":[{\"kid\":\"\xff\xfe\"}]}".to_vec(), Vec::new()),
            "not valid JSON",
            "rejected",
        ),
        (
            "one kid, two keys",
            Mode::Body(json!({ "keys": [rsa, conflicting] }).to_string()),
            "names two different keys",
            "rejected",
        ),
        (
            "numbers where strings belong",
            Mode::Body(json!({ "keys": [numeric] }).to_string()),
            "\"kid\" is not a string",
            "rejected",
        ),
        (
            "2000 keys",
            Mode::Body(json!({ "keys": thousands }).to_string()),
            "more than max_keys = 100",
            "merge_rejected",
        ),
        (
            "a gzip body, which is never decompressed",
            Mode::Raw(
                gzip_stored(K3S.as_bytes()),
                vec![("content-encoding".into(), "gzip".into())],
            ),
            "not valid JSON",
            "rejected",
        ),
        (
            "an endless 4 MiB body",
            Mode::Raw(vec![b' '; 4 << 20], Vec::new()),
            "is larger than 1048576 bytes",
            "fetch_error",
        ),
        (
            "a redirect to another host",
            Mode::Redirect("https://attacker.example/jwks".into()),
            "redirects are never followed",
            "fetch_error",
        ),
    ];
    for (what, mode, reason, result) in cases {
        fake.set(|s| s.mode = mode);
        assert_counted_only(&server, result, what).await;
        let line = server.wait_for_log(reason);
        assert!(
            line.contains("still serving the last good set") || line.contains("key left out"),
            "{what}: {line}"
        );
        assert_eq!(get(&url).await, (200, good.clone()), "{what}");
    }
    // A certificate from the pinned CA, but for another name: refused like any TLS failure.
    fake.set(|s| s.mode = Mode::Normal);
    let other_name = fake.pki.server_for(&["attacker.example"]);
    fake.serve_certificate(&other_name).await;
    assert_counted_only(&server, "fetch_error", "another name").await;
    let line = server.wait_for_log("certificate not valid for name");
    assert!(line.contains("still serving the last good set"), "{line}");
    assert_eq!(get(&url).await, (200, good.clone()), "another name");

    // Bodies are capped at 1 MiB and dropped after each refusal: memory stays bounded.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_after = proc_status_kib(server.pid(), "VmRSS");
    println!("hostile upstream: RSS {rss_before} KiB before, {rss_after} KiB after the corpus");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
}

/// A private member in any key of the set, first or last, refuses the whole set: the log
/// names the key and the member, and the last good set stays published byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_member_in_any_position_refuses_the_whole_set() {
    let fake = FakeApiserver::start(K3S, ISSUER, TOKEN).await;
    let scratch = Scratch::new();
    let config = TestConfig::new()
        .source(
            fake.source_in(&scratch, TOKEN)
                .set("refresh_interval", "50ms"),
        )
        .write(&scratch);
    let server = InProcess::start(&config).await;
    let url = server.url("/openid/v1/jwks");
    eventually("keys", || async { get(&url).await.0 == 200 }).await;
    let (_, good) = get(&url).await;
    let k3s: serde_json::Value = serde_json::from_str(K3S).expect("json");
    let keys = k3s["keys"].as_array().expect("keys").clone();
    for member in oidc_edge::jwks::validate::PRIVATE_MEMBERS {
        for index in [0, keys.len() - 1] {
            let mut set = keys.clone();
            set[index][member] = json!("c2VjcmV0LXByaXZhdGUtdmFsdWU");
            let kid = set[index]["kid"].as_str().expect("kid").to_owned();
            // The previous set is still refused on every refresh: look only at new lines,
            // for this key and member.
            let before = server.log().len();
            fake.set(|s| s.mode = Mode::Body(json!({ "keys": set }).to_string()));
            let expected = format!(
                "PRIVATE KEY MATERIAL: key {index} (kid {kid:?}) carries the private member {member:?}"
            );
            let refusal = || {
                server.log()[before..]
                    .iter()
                    .find(|l| l.contains(&expected))
                    .cloned()
            };
            eventually(&expected, || async { refusal().is_some() }).await;
            let line = refusal().expect("line");
            assert!(!line.contains("c2VjcmV0LXByaXZhdGUtdmFsdWU"), "{line}");
            assert_eq!(
                get(&url).await,
                (200, good.clone()),
                "{member} in key {index}"
            );
        }
    }
}
