//! The integration tests: one binary, one module per area.

mod abuse; // hostile clients at scale: an ordinary client keeps its 200s, memory bounded
mod acme; // ACME against Pebble: issuance, renewal, restart, cache
mod admin; // admin endpoints, metrics, status, SIGHUP and SIGTERM
mod apiserver; // sources over real TLS against the fake apiserver
mod broken_site; // deliberately broken issuers for the doctor
mod chaos; // upstream flapping and rotating while clients poll: nothing fails
mod config; // check-config and the table of bad configurations
mod doctor; // check, tokens, render, aws provider and trust-policy
mod fake_apiserver; // a kube-apiserver stand-in with its own CA and failure modes
mod hostile; // a hostile upstream: last good set kept, memory bounded
mod http; // the public router without sockets: routing, headers, conditional requests
mod pebble; // harness: Pebble and challtestsrv on loopback
mod proxy; // behind nginx terminating TLS: byte-identical documents
mod serve; // the real binary: demo, file refresh, refused sets, persistence across SIGKILL
mod state; // the state file across restarts: confirmations, reused kids
mod support; // harness: scratch dirs, the binary on 127.0.0.1:0, an HTTP client
mod systemd; // unit files under systemd-analyze, sd_notify, socket activation
mod tls; // HTTPS with certificate files, listener limits, redirects
