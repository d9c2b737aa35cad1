//! What the relying parties (AWS, GCP, Azure, go-oidc) accept, in one place.

/// A-9, Z-4: AWS and Azure use at most 100 keys; more is never useful.
pub const MAX_KEYS: usize = 100;
