//! Config files for the tests, built over `toml::Table` rather than spliced from positional
//! string fragments: a test names the keys it changes (`set("limits.idle_timeout", "4s")`),
//! and everything it does not name is the one default shape below.
//!
//! The default shape binds every listener on 127.0.0.1 port 0, admin included, so that no two
//! tests ever share a port.

use std::path::PathBuf;

use super::pki::Leaf;
use super::{K3S, Scratch};

/// The issuer of the default shape.
pub const ISSUER: &str = "https://oidc.example.com";

/// A config under construction.
#[derive(Debug, Clone)]
pub struct TestConfig {
    table: toml::Table,
}

/// One `[[issuers.sources]]` table.
#[derive(Debug, Clone)]
pub struct Source(toml::Table);

impl Source {
    pub fn new(kind: &str) -> Self {
        Self(toml::Table::new()).set("kind", kind)
    }

    /// `kind = "file"` reading `path`, relative to the config file.
    pub fn file(path: &str) -> Self {
        Self::new("file").set("path", path)
    }

    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.0.insert(key.to_owned(), value.into());
        self
    }
}

impl TestConfig {
    /// The issuer [`ISSUER`] with no source yet; `[http]` and `[admin]` on 127.0.0.1:0; the
    /// state directory `state` next to the config file.
    pub fn new() -> Self {
        Self {
            table: toml::Table::new(),
        }
        .issuer(ISSUER)
        .set("http.listen", "127.0.0.1:0")
        .set("admin.listen", "127.0.0.1:0")
        .set("state.dir", "state")
    }

    /// The shape most tests use: the default with one file source reading `jwks.json` every
    /// `interval`.
    pub fn file_source(interval: &str) -> Self {
        Self::new().source(Source::file("jwks.json").set("refresh_interval", interval))
    }

    /// The default with a file source serving the `K3S` set, and an HTTPS listener on
    /// 127.0.0.1:0 with `leaf` as its certificate files. Writes `jwks.json`, `cert.pem` and
    /// `key.pem` into `scratch`.
    pub fn https_files(scratch: &Scratch, leaf: &Leaf) -> Self {
        scratch.write("jwks.json", K3S);
        scratch.write("cert.pem", &leaf.cert_pem);
        scratch.write("key.pem", &leaf.key_pem);
        Self::new()
            .source(Source::file("jwks.json"))
            .set("https.listen", "127.0.0.1:0")
            .set("https.files.cert_file", "cert.pem")
            .set("https.files.key_file", "key.pem")
    }

    /// Adds another `[[issuers]]` table; [`TestConfig::source`] and `issuers.N.*` keys then
    /// reach it.
    pub fn issuer(mut self, issuer: &str) -> Self {
        let mut table = toml::Table::new();
        table.insert("issuer".to_owned(), issuer.into());
        table.insert("sources".to_owned(), toml::Value::Array(Vec::new()));
        let issuers = self
            .table
            .entry("issuers")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        issuers
            .as_array_mut()
            .expect("issuers is an array")
            .push(table.into());
        self
    }

    /// Adds a source to the last issuer.
    pub fn source(mut self, source: Source) -> Self {
        let issuer = self.table["issuers"]
            .as_array_mut()
            .and_then(|issuers| issuers.last_mut())
            .expect("an issuer");
        issuer["sources"]
            .as_array_mut()
            .expect("sources is an array")
            .push(source.0.into());
        self
    }

    /// Removes a top-level table or key (`http`).
    pub fn remove(mut self, key: &str) -> Self {
        self.table.remove(key);
        self
    }

    /// Removes a dotted key (`issuers.0.publish.0.ca_file`), which must exist.
    pub fn remove_key(mut self, key: &str) -> Self {
        let (path, last) = key.rsplit_once('.').expect("a dotted key");
        let mut parts = path.split('.');
        let first = parts.next().expect("a part");
        let mut at = self
            .table
            .get_mut(first)
            .unwrap_or_else(|| panic!("{key}: no {first}"));
        for part in parts {
            at = match at {
                toml::Value::Array(array) => &mut array[part.parse::<usize>().expect("an index")],
                toml::Value::Table(table) => table
                    .get_mut(part)
                    .unwrap_or_else(|| panic!("{key}: no {part}")),
                _ => panic!("{key}: {part} is in neither a table nor an array"),
            };
        }
        at.as_table_mut()
            .expect("a table")
            .remove(last)
            .unwrap_or_else(|| panic!("{key} is not set"));
        self
    }

    /// Adds an `[[issuers.publish]]` target to the last issuer.
    pub fn publish(mut self, target: toml::Table) -> Self {
        let issuer = self.table["issuers"]
            .as_array_mut()
            .and_then(|issuers| issuers.last_mut())
            .and_then(toml::Value::as_table_mut)
            .expect("an issuer");
        issuer
            .entry("publish")
            .or_insert_with(|| toml::Value::Array(Vec::new()))
            .as_array_mut()
            .expect("publish is an array")
            .push(target.into());
        self
    }

    /// Sets a dotted key: `limits.idle_timeout`, `https.files.cert_file`, `issuers.0.max_keys`
    /// (after an array's name comes an index). Missing tables on the way are created.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        let parts: Vec<&str> = key.split('.').collect();
        let (last, path) = parts.split_last().expect("a key");
        let mut at = &mut self.table;
        let mut path = path.iter();
        while let Some(part) = path.next() {
            let mut entry = at.entry(*part).or_insert_with(|| toml::Table::new().into());
            if let toml::Value::Array(array) = entry {
                let index: usize = path
                    .next()
                    .and_then(|i| i.parse().ok())
                    .unwrap_or_else(|| panic!("{key}: {part} is an array: name an index"));
                entry = array
                    .get_mut(index)
                    .unwrap_or_else(|| panic!("{key}: there is no {part}.{index}"));
            }
            at = entry
                .as_table_mut()
                .unwrap_or_else(|| panic!("{key}: {part} is not a table"));
        }
        at.insert((*last).to_owned(), value.into());
        self
    }

    /// The file's text.
    pub fn text(&self) -> String {
        toml::to_string(&self.table).expect("a table serialises")
    }

    /// Writes `config.toml` into `scratch` and returns its path.
    pub fn write(&self, scratch: &Scratch) -> PathBuf {
        scratch.write("config.toml", &self.text())
    }
}
