//! What the relying parties (AWS IAM/STS, GCP workload identity federation, Azure Entra)
//! accept, in one place: the server refuses to publish what they would refuse (`config`,
//! `jwks::validate`) and the doctor (`check`) reports it. Each fact carries its rule ID in
//! `notes/relying-party-rules.md`; change a limit here, and both sides follow.

use std::time::Duration;

/// A relying party whose rules `check` applies. No doc comments on the variants: clap would
/// print them as help for `--target`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Aws,
    Gcp,
    Azure,
}

impl Target {
    pub const ALL: [Self; 3] = [Self::Aws, Self::Gcp, Self::Azure];

    /// The name a report and `--target` use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Aws => "aws",
            Self::Gcp => "gcp",
            Self::Azure => "azure",
        }
    }

    /// The signing algorithms it accepts (A-10, G-6, Z-5).
    pub fn accepted_algs(self) -> &'static [&'static str] {
        match self {
            // RSA or ECDSA, each with SHA-256/384/512; no EdDSA, no PS*.
            Self::Aws => &["RS256", "RS384", "RS512", "ES256", "ES384", "ES512"],
            // G-6: "Must be RS256 or ES256".
            Self::Gcp => &["RS256", "ES256"],
            // Z-5: RS256 only; ES256 is refused in practice (AADSTS5002738).
            Self::Azure => &["RS256"],
        }
    }

    /// The rule that says which algorithms it accepts.
    pub fn alg_rule(self) -> &'static str {
        match self {
            Self::Aws => "A-10",
            Self::Gcp => "G-6",
            Self::Azure => "Z-5",
        }
    }
}

/// D-12: RSA keys used with RS256/384/512 must be at least 2048 bits (RFC 7518 §3.3; AWS
/// documents no size and follows it, A-10).
pub const MIN_RSA_BITS: usize = 2048;

/// AWS uses at most 100 RSA keys and 100 EC keys.
pub const AWS_MAX_KEYS_PER_TYPE: usize = 100;
/// Z-4: Entra stores only the first 100 signing keys it downloads.
pub const AZURE_MAX_KEYS: usize = 100;
/// A-9, Z-4: AWS and Azure use at most 100 keys; more is never useful. Azure's limit counts
/// every key and AWS's only one type, so Azure's is the one that binds.
pub const MAX_KEYS_LIMIT: usize = AZURE_MAX_KEYS;
/// G-4: an uploaded JWKS holds at most 8 keys (a downloaded one has no limit).
pub const GCP_MAX_UPLOADED_KEYS: usize = 8;

/// AWS gives up after 5 s for both documents together.
pub const AWS_FETCH_LIMIT: Duration = Duration::from_secs(5);

/// STS allows five minutes of clock skew either way; the doctor allows every relying
/// party the same.
pub const CLOCK_SKEW_SECS: i64 = 300;
/// STS refuses shorter tokens.
pub const AWS_MIN_TOKEN_CHARS: usize = 4;
/// STS refuses longer tokens.
pub const AWS_MAX_TOKEN_CHARS: usize = 20_000;
/// G-7: GCP refuses tokens whose `exp - iat` is longer (its guide's 24 h, stricter than the
/// API reference's 48 h).
pub const GCP_MAX_LIFETIME_SECS: i64 = 24 * 3600;

#[cfg(test)]
mod tests {
    use clap::ValueEnum as _;

    use super::Target;

    /// A report names a target as `--target` spells it, and `ALL` is every one of them.
    #[test]
    fn report_names_are_the_command_line_names() {
        assert_eq!(Target::value_variants(), &Target::ALL);
        for target in Target::ALL {
            let value = target.to_possible_value().expect("no target is hidden");
            assert_eq!(value.get_name(), target.name());
        }
    }
}
