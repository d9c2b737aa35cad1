//! oidc-edge publishes a Kubernetes cluster's service-account issuer to the internet: the
//! OIDC discovery document and the JWKS that AWS IAM, GCP, Azure and Vault fetch to verify
//! projected service-account tokens.
//!
//! # Layout
//!
//! - [`cli`]: the command line; [`config`]: the file format and its validation;
//! - [`issuer`]: the issuer URL and the generated discovery document;
//! - [`jwks`]: the pipeline fetch → validate → merge → publish → persist;
//! - [`http`]: the public router (host + path routing, caching headers);
//! - [`server`]: binds listeners and spawns every task; [`supervisor`]: watches them;
//!   [`shutdown`]: signals;
//!   [`telemetry`]: logging.
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
pub mod http;
pub mod issuer;
pub mod jwks;
pub mod listener;
pub mod metrics;
pub mod relying_party;
pub mod render;
pub mod server;
pub mod signals;
pub mod state;
pub mod supervisor;
pub mod systemd;
pub mod telemetry;
#[cfg(test)]
mod tests;
pub mod tls;
