//! `oidc-edge healthcheck [URL]`: one GET of the admin listener's `/readyz` (or of URL); exit
//! 0 on a 2xx answer, 1 otherwise with one line on stderr naming the URL and what went wrong.
//!
//! The scratch image has no shell or curl, so this is its HEALTHCHECK, as Traefik and others
//! ship one. It runs every 30 s, so it does only that: no logging, no worker threads, no
//! proxy (an HTTP(S)_PROXY in the container must not turn a local probe into a remote one), no
//! redirects (a probe that ends somewhere else says nothing about this server), and no host
//! but this one unless `--allow-remote`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context as _, anyhow, bail};
use tokio::time::Instant;
use url::{Host, Url};

use crate::cli::HealthcheckArgs;
use crate::config::Config;
use crate::display::{error_chain, redacted_text, redacted_url};

/// The most of a body's first line the message quotes: `/readyz` puts every reason on one
/// line, and a long one would flood the health log of the container engine.
const MAX_LINE_CHARS: usize = 300;
/// The most of the body read to find that line.
const MAX_BODY_BYTES: usize = 4096;

/// Runs the check; `Ok` is the line to print on success, `Err` the line that says why not.
pub async fn run(args: &HealthcheckArgs) -> anyhow::Result<String> {
    if args.timeout.is_zero() {
        bail!("--timeout: a check that must answer in no time always fails; give more than zero");
    }
    // One deadline for everything that can wait: resolving a name, connecting, the answer.
    let deadline = Instant::now() + args.timeout;
    let within = humantime::format_duration(args.timeout);
    let target = match &args.url {
        Some(url) => Target::from_url(url, args.allow_remote, deadline).await?,
        None => Target::admin(&Config::load(&args.config)?)?,
    };
    let shown = target.shown();
    tokio::time::timeout_at(deadline, get(&target))
        .await
        .unwrap_or_else(|_| Err(anyhow!("no answer within {within}")))
        .map_err(|e| anyhow!("GET {shown}: {e:#}"))
}

/// The GET itself: `Ok` says what answered 2xx, `Err` what went wrong.
async fn get(target: &Target) -> anyhow::Result<String> {
    let mut client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        // Mozilla's roots compiled in, as every other fetch: the image has no CA bundle.
        .tls_backend_preconfigured(crate::jwks::source::remote::public_tls())
        .user_agent(concat!("oidc-edge-healthcheck/", env!("CARGO_PKG_VERSION")));
    if let Some((name, addrs)) = &target.pinned {
        // The addresses that were checked are the ones connected to: no second resolution.
        client = client.resolve_to_addrs(name, addrs);
    }
    let mut response = client
        .build()
        .context("cannot build the HTTP client")?
        .get(target.url.clone())
        .send()
        .await
        .map_err(|e| anyhow!(describe(&e)))?;
    let status = response.status();
    let said = match first_line(&mut response).await {
        line if line.is_empty() => String::new(),
        line => format!(": {line}"),
    };
    if status.is_success() {
        Ok(format!("GET {}: {status}{said}\n", target.shown()))
    } else {
        bail!("{status}{said}")
    }
}

/// Where this host reaches the config's admin listener: `admin.listen`, a wildcard address
/// replaced by the loopback address of its family. Port 0 is refused: only `serve`'s log
/// names the port it became.
pub(crate) fn admin_address(config: &Config) -> anyhow::Result<SocketAddr> {
    let listen = config.admin.listen;
    if listen.port() == 0 {
        bail!(
            "{}: admin.listen: {listen} has port 0, which serve replaces with a free port \
             that only its log names; give the healthcheck that URL",
            config.file.display()
        );
    }
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(SocketAddr::new(ip, listen.port()))
}

/// What to GET, and where it came from.
#[derive(Debug, PartialEq)]
struct Target {
    url: Url,
    /// For a URL on a host name: the name and the loopback addresses it resolved to.
    pinned: Option<(String, Vec<SocketAddr>)>,
    /// For the config's admin listener: the file, so that a failure says where to look.
    config: Option<std::path::PathBuf>,
}

impl Target {
    /// `/readyz` on the config's `admin.listen` (its default 127.0.0.1:9090 when the file has
    /// no `[admin]`, as `serve` binds). A wildcard address is asked on the loopback address of
    /// its family; any other is an address of this host, which `serve` binds, so it is asked
    /// as it is, `--allow-remote` or not.
    fn admin(config: &Config) -> anyhow::Result<Self> {
        let url = Url::parse(&format!("http://{}/readyz", admin_address(config)?))
            .expect("a socket address makes a URL");
        Ok(Self {
            url,
            pinned: None,
            config: Some(config.file.clone()),
        })
    }

    /// `text`, refused unless http or https and, without `allow_remote`, on a loopback host.
    async fn from_url(text: &str, allow_remote: bool, deadline: Instant) -> anyhow::Result<Self> {
        let url =
            Url::parse(text).map_err(|e| anyhow!("{}: not a URL: {e}", redacted_text(text)))?;
        let shown = redacted_url(&url);
        if !matches!(url.scheme(), "http" | "https") {
            bail!("{shown}: the scheme must be http or https");
        }
        let refused = |what: &str| {
            anyhow!(
                "{shown}: {what} not a loopback address; the healthcheck asks only this host \
                 unless --allow-remote is given"
            )
        };
        let mut target = Self {
            url: url.clone(),
            pinned: None,
            config: None,
        };
        match url.host() {
            _ if allow_remote => {}
            Some(Host::Ipv4(ip)) if ip.is_loopback() => {}
            Some(Host::Ipv6(ip)) if ip.to_canonical().is_loopback() => {}
            Some(Host::Ipv4(ip)) => return Err(refused(&format!("{ip} is"))),
            Some(Host::Ipv6(ip)) => return Err(refused(&format!("{ip} is"))),
            Some(Host::Domain(name)) => {
                let port = url
                    .port_or_known_default()
                    .expect("http and https have one");
                let lookup = tokio::net::lookup_host((name, port));
                let addrs: Vec<SocketAddr> = tokio::time::timeout_at(deadline, lookup)
                    .await
                    .map_err(|_| anyhow!("{shown}: {name} not resolved in time"))?
                    .map_err(|e| anyhow!("{shown}: cannot resolve {name}: {e}"))?
                    .collect();
                if let Some(remote) = addrs.iter().find(|a| !a.ip().to_canonical().is_loopback()) {
                    return Err(refused(&format!(
                        "{name} resolves to {}, which is",
                        remote.ip()
                    )));
                }
                target.pinned = Some((name.to_owned(), addrs));
            }
            None => bail!("{shown}: the URL has no host"),
        }
        Ok(target)
    }

    /// The URL as messages show it, with where it came from.
    fn shown(&self) -> String {
        let url = redacted_url(&self.url);
        match &self.config {
            Some(file) => format!("{url} (admin.listen of {})", file.display()),
            None => url,
        }
    }
}

/// A failed request in a few words. reqwest's own message only repeats the URL: what
/// happened is in its causes, and for a connection, in the innermost one ("Connection
/// refused (os error 111)").
fn describe(error: &reqwest::Error) -> String {
    let Some(cause) = std::error::Error::source(error) else {
        return error.to_string();
    };
    if error.is_connect() {
        let mut innermost = cause;
        while let Some(next) = innermost.source() {
            innermost = next;
        }
        format!("cannot connect: {innermost}")
    } else {
        error_chain(cause)
    }
}

/// The first line of the body, from at most `MAX_BODY_BYTES`, control characters replaced
/// (the text comes from whoever answers, and ends up on a terminal or in a health log).
async fn first_line(response: &mut reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < MAX_BODY_BYTES && !body.contains(&b'\n') {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_BODY_BYTES)]);
    text.lines()
        .next()
        .unwrap_or_default()
        .trim()
        .chars()
        .take(MAX_LINE_CHARS)
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    fn config(admin: &str) -> Config {
        let text = format!(
            "[[issuers]]\nissuer = \"https://oidc.example.com\"\n\
             [[issuers.sources]]\nkind = \"file\"\npath = \"jwks.json\"\n\
             [http]\nlisten = \"127.0.0.1:8080\"\n{admin}"
        );
        Config::from_toml_str(&text, Path::new("/etc/oidc-edge/config.toml")).expect("valid")
    }

    async fn from_url(text: &str, allow_remote: bool) -> anyhow::Result<Target> {
        let deadline = Instant::now() + Duration::from_secs(3);
        Target::from_url(text, allow_remote, deadline).await
    }

    fn admin_url(admin: &str) -> String {
        Target::admin(&config(admin))
            .expect("a target")
            .url
            .to_string()
    }

    /// Without `[admin]`, `serve` binds 127.0.0.1:9090, so that is what is asked; wildcard
    /// addresses are asked on their family's loopback address.
    #[test]
    fn the_admin_url_follows_what_serve_binds() {
        assert_eq!(admin_url(""), "http://127.0.0.1:9090/readyz");
        let remote =
            |listen: &str| format!("[admin]\nlisten = \"{listen}\"\nallow_remote = true\n");
        assert_eq!(
            admin_url(&remote("0.0.0.0:9091")),
            "http://127.0.0.1:9091/readyz"
        );
        assert_eq!(admin_url(&remote("[::]:9092")), "http://[::1]:9092/readyz");
        assert_eq!(
            admin_url(&remote("10.1.2.3:9093")),
            "http://10.1.2.3:9093/readyz"
        );
        assert_eq!(
            admin_url("[admin]\nlisten = \"[::1]:9094\"\n"),
            "http://[::1]:9094/readyz"
        );
        let target = Target::admin(&config("")).expect("a target");
        assert_eq!(
            target.shown(),
            "http://127.0.0.1:9090/readyz (admin.listen of /etc/oidc-edge/config.toml)"
        );
    }

    #[tokio::test]
    async fn only_loopback_hosts_without_allow_remote() {
        for ok in [
            "http://127.0.0.1:9090/readyz",
            "http://127.8.9.10/readyz",
            "https://[::1]:8443/x",
            "http://[::ffff:127.0.0.1]/",
        ] {
            let target = from_url(ok, false).await.expect(ok);
            assert_eq!(target.pinned, None, "{ok}");
        }
        assert_eq!(
            from_url("http://192.0.2.1:9090/readyz", false)
                .await
                .expect_err("remote")
                .to_string(),
            "http://192.0.2.1:9090/readyz: 192.0.2.1 is not a loopback address; the \
             healthcheck asks only this host unless --allow-remote is given"
        );
        assert_eq!(
            from_url("http://[2001:db8::1]/", false)
                .await
                .expect_err("remote")
                .to_string(),
            "http://[2001:db8::1]/: 2001:db8::1 is not a loopback address; the healthcheck \
             asks only this host unless --allow-remote is given"
        );
        let remote = from_url("http://192.0.2.1:9090/readyz", true)
            .await
            .expect("allowed");
        assert_eq!(remote.url.as_str(), "http://192.0.2.1:9090/readyz");
        assert_eq!(
            from_url("ftp://127.0.0.1/", false)
                .await
                .expect_err("scheme")
                .to_string(),
            "ftp://127.0.0.1/: the scheme must be http or https"
        );
        // User info never reaches a message (M5).
        assert_eq!(
            from_url("http://user:S3CRET@192.0.2.1/", false)
                .await
                .expect_err("remote")
                .to_string(),
            "http://***@192.0.2.1/: 192.0.2.1 is not a loopback address; the healthcheck \
             asks only this host unless --allow-remote is given"
        );
        assert_eq!(
            from_url("127.0.0.1:9090/readyz", false)
                .await
                .expect_err("no scheme")
                .to_string(),
            "127.0.0.1:9090/readyz: not a URL: relative URL without a base"
        );
    }

    /// A name is resolved once, every address must be loopback, and those are connected to.
    #[tokio::test]
    async fn a_host_name_is_pinned_to_its_loopback_addresses() {
        let target = from_url("http://localhost:9090/readyz", false)
            .await
            .expect("localhost is loopback");
        let (name, addrs) = target.pinned.expect("pinned");
        assert_eq!(name, "localhost");
        assert!(!addrs.is_empty());
        assert!(
            addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 9090),
            "{addrs:?}"
        );
    }
}
