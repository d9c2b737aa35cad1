//! The integration tests: one binary, one module per area.

// The harness (its parts are listed in `support/mod.rs`).
mod support; // scratch dirs, fixtures, the binary and the in-process server, clients, configs

// The tests.
mod abuse; // hostile clients at scale: an ordinary client keeps its 200s, memory bounded
mod acme; // ACME against Pebble: issuance, renewal, restart, cache
mod admin; // admin endpoints, metrics, status, SIGHUP and SIGTERM
mod apiserver; // sources over real TLS against the fake apiserver
mod chaos; // upstream flapping and rotating while clients poll: nothing fails
mod cli_docs; // man pages under man-db and groff, shell completions
mod config; // the table of bad configurations, and check-config's exit codes
mod doctor; // check, tokens, render, aws provider and trust-policy
mod healthcheck; // the image's HEALTHCHECK: ready, not ready, nothing listening, refusals
mod hostile; // a hostile upstream: last good set kept, memory bounded
mod http; // the public router without sockets: routing, headers, conditional requests
mod monitoring; // the alert rules and dashboard against a real Prometheus scraping oidc-edge
mod proxy; // behind nginx terminating TLS: byte-identical documents
mod publish; // publish to a real S3 store (SeaweedFS): writes, order, failures, R2 headers
mod real; // the k3s → oidc-edge → STS → S3 walkthrough with a real apiserver and SeaweedFS
mod real_source; // the apiserver source against a real kube-apiserver: formats, Accept, RBAC, tokens
mod selftest; // the self-test: TokenRequest on a real apiserver, checked as AWS would
mod serve; // serving: the demo, file refresh, refused sets, persistence across SIGKILL
mod state; // the state file across restarts: confirmations, reused kids
mod systemd; // unit files under systemd-analyze, sd_notify, socket activation
mod tls; // HTTPS with certificate files, listener limits, redirects
mod verifiers; // Envoy and mod_oauth2 verify real tokens against what oidc-edge publishes
