//! Push (issue 18): a cluster that no public host can reach sends its key set out to a
//! public oidc-edge, which serves it. `gate` is the edge's side (authentication by key
//! continuity, replay, the pipeline); `crate::trust` is the operator's one-time bootstrap.

pub mod gate;
