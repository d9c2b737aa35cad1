//! oidc-edge publishes a Kubernetes cluster's service-account issuer to the internet: the
//! OIDC discovery document and the JWKS that AWS IAM, GCP, Azure and Vault fetch to verify
//! projected service-account tokens.
//!
//! # Layout
//!
//! The core, from keys to served bytes:
//!
//! - [`issuer`]: the issuer URL, kept byte-exact; its public paths and the discovery document;
//! - [`jwks`]: the keys' path: sources → validate → merge → publish (snapshots) → persist;
//! - [`http`]: the public router (host, then path) and the headers every answer carries;
//! - [`listener`]: the public accept loop and its limits (deadlines, connection cap, eviction);
//! - [`tls`]: certificates for the HTTPS listener, from ACME or hot-reloaded PEM files.
//!
//! Operations, what keeps the core running and observable:
//!
//! - [`admin`]: the admin listener, loopback by default (`/livez`, `/readyz`, `/metrics`, …);
//! - [`metrics`]: the Prometheus registry, counters created up front so requests never lock;
//! - [`signals`]: SIGTERM/SIGINT stop, SIGHUP refreshes (and reloads certificates), watchdog;
//! - [`supervisor`]: the long-lived tasks, named and watched; one that dies stops the process;
//! - [`systemd`]: socket activation and `sd_notify`, both no-ops outside systemd;
//! - [`telemetry`]: logging to stderr as text or JSON lines;
//! - [`state`]: the private state directory and crash-safe file writes;
//! - [`clock`]: a monotonic millisecond clock for state kept in atomics;
//! - [`display`]: URLs and errors as logs and messages show them (credentials cut out).
//!
//! Commands, and what they are configured with:
//!
//! - [`config`]: reads and checks the configuration file, nothing else;
//! - [`cli`]: the command line, which selects a config and a command;
//! - [`server`]: `serve`'s composition root: `bind` builds and binds, `run` spawns and drains;
//! - [`render`]: `render`, the documents written as files through `serve`'s own pipeline;
//! - [`check`]: `check`, the doctor, which fetches a site as relying parties do and reports;
//! - [`aws`]: `aws`, the provider command and trust policy to paste into AWS;
//! - [`healthcheck`]: `healthcheck`, one GET of `/readyz`: the container image's HEALTHCHECK;
//! - [`relying_party`]: what AWS, GCP and Azure accept, read by both `serve` and `check`;
//! - [`docs`]: `completions` and `man`, generated from [`cli`]'s definitions.
//!
//! Tests that span several modules (the property tests) live in `src/tests/`, built for tests
//! only; a module's own tests stay beside it.
//!
//! The two published documents live in one immutable snapshot per issuer behind an `ArcSwap`
//! ([`jwks::store`]): requests never lock or render.

pub mod admin;
pub mod aws;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod display;
pub mod docs;
pub mod healthcheck;
pub mod http;
pub mod issuer;
pub mod jwks;
pub mod listener;
pub mod metrics;
pub mod publish;
pub mod push;
pub mod relying_party;
pub mod render;
pub mod roots;
pub mod rotation;
pub mod selftest;
pub mod server;
pub mod signals;
pub mod state;
pub mod supervisor;
pub mod systemd;
pub mod telemetry;
#[cfg(test)]
mod tests;
pub mod tls;
pub mod trust;
