//! The command line (DESIGN §1). Only what selects a config and a command lives here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;
use crate::relying_party::Target;
use crate::render::Layout;

/// Publishes a Kubernetes service-account issuer (OIDC discovery + JWKS) to the internet.
#[derive(Debug, Parser)]
#[command(name = "oidc-edge", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the discovery document and JWKS of every configured issuer.
    Serve(ConfigArgs),
    /// Validate the configuration, print a summary and exit (0 valid, 64 invalid).
    CheckConfig(ConfigArgs),
    /// GET the admin listener's `/readyz` (or URL) once: exit 0 on a 2xx answer, 1 otherwise
    /// with the reason on standard error. The container image's HEALTHCHECK (it has no curl).
    Healthcheck(HealthcheckArgs),
    /// Fetch an issuer's documents as AWS, GCP and Azure do and check every rule they apply
    /// (exit 0 all pass, 2 any fails).
    Check(CheckArgs),
    /// Fetch the configured sources once and write the static files to publish elsewhere
    /// (Cloudflare Pages, S3), byte-identical to what `serve` answers. Like `serve`, it keeps
    /// vanished keys for `key_retention` through the state in `[state] dir`.
    Render(RenderArgs),
    /// Keep the configured buckets (`[[issuers.publish]]`) in step with the sources: the same
    /// pipeline as `serve` (validation, merge, rotation grace, state, admin endpoints) without
    /// public listeners; each target is written after every change, JWKS first, only where it
    /// differs, and read back.
    Publish(PublishArgs),
    /// Push the keys the cluster lists to a public oidc-edge (`[[issuers.push]]`), from
    /// inside a cluster no public host can reach: the same pipeline as `publish`, after every
    /// change and every `interval`, authenticated by a service-account token of the cluster
    /// that the edge checks against the keys it already publishes.
    Push(PublishArgs),
    /// Trust a cluster's key set for an issuer with a push source: the one-time bootstrap of
    /// a push setup, and the recovery after an abrupt key change the edge refused. FILE is
    /// the cluster's `kubectl get --raw /openid/v1/jwks`; a running server takes it at its
    /// next refresh, at once on SIGHUP.
    Trust(TrustArgs),
    /// Key rotation: where each published key is, and the earliest safe time for the next step.
    Rotation {
        #[command(subcommand)]
        command: RotationCommand,
    },
    /// Helpers for AWS IAM.
    Aws {
        #[command(subcommand)]
        command: AwsCommand,
    },
    /// Write the completion script for SHELL to standard output.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages: into DIR, `oidc-edge.1` and one page per subcommand
    /// (`oidc-edge-serve.1`, `oidc-edge-aws-provider.1`, ...); without DIR, the main page to
    /// standard output.
    Man {
        /// An existing directory to write the pages into.
        #[arg(value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Configuration file.
    #[arg(long, value_name = "PATH", env = "OIDC_EDGE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// Configuration file whose `admin.listen` is asked, without URL (an address of 0.0.0.0
    /// or [::] is asked on 127.0.0.1 or [::1]).
    #[arg(long, value_name = "PATH", env = "OIDC_EDGE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// The http or https URL to GET instead; no redirect is followed.
    #[arg(value_name = "URL")]
    pub url: Option<String>,
    /// Allow a URL whose host is not a loopback address.
    #[arg(long)]
    pub allow_remote: bool,
    /// The most the whole check may take (more than zero).
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The issuer URL, exactly as tokens carry it in `iss`.
    pub issuer: String,
    /// Trust this CA (PEM) instead of the public roots relying parties use.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// A token to verify against the published keys ("-" reads standard input).
    #[arg(long, value_name = "FILE")]
    pub token: Option<String>,
    /// The audience the token must carry.
    #[arg(long, value_name = "AUDIENCE")]
    pub audience: Option<String>,
    /// The relying parties whose rules apply.
    #[arg(long, value_delimiter = ',', default_value = "aws,gcp,azure")]
    pub target: Vec<Target>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Connect to this address instead of resolving the hosts (a server not in DNS yet).
    #[arg(long, value_name = "ADDR:PORT")]
    pub connect_to: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Configuration file (its sources are fetched once).
    #[arg(long, value_name = "PATH", env = "OIDC_EDGE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Directory to write the tree into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// `pages` writes a Cloudflare Pages `_headers` file; `s3` writes `s3-objects.json`.
    #[arg(long, value_enum, default_value = "pages")]
    pub layout: Layout,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Configuration file.
    #[arg(long, value_name = "PATH", env = "OIDC_EDGE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Fetch the sources and publish once, then exit: 0 when every target holds the documents
    /// (written or unchanged), 1 with one line per failure otherwise (CI, a CronJob).
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Args)]
pub struct TrustArgs {
    /// Configuration file of the edge.
    #[arg(long, value_name = "PATH", env = "OIDC_EDGE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// The issuer, exactly as configured.
    #[arg(long, value_name = "URL")]
    pub issuer: String,
    /// The cluster's JWK set (`kubectl get --raw /openid/v1/jwks > FILE`).
    #[arg(long, value_name = "FILE")]
    pub jwks: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum RotationCommand {
    /// Read a running server's `/status` and print, per key, its phase (publishing, ready,
    /// retiring) and the earliest safe time for the next step (rule X-6).
    Status(RotationStatusArgs),
}

#[derive(Debug, Args)]
pub struct RotationStatusArgs {
    /// Configuration file whose `admin.listen` is asked, without --admin.
    #[arg(long, value_name = "PATH", env = "OIDC_EDGE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// The admin listener to ask instead, e.g. http://127.0.0.1:9090.
    #[arg(long, value_name = "URL")]
    pub admin: Option<String>,
    /// Only this issuer.
    #[arg(long, value_name = "URL")]
    pub issuer: Option<String>,
    /// The longest lifetime of the tokens the cluster issues (Kubernetes' projected tokens:
    /// 1h by default; Azure Workload Identity assumes 24h).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub token_lifetime: std::time::Duration,
}

#[derive(Debug, Subcommand)]
pub enum AwsCommand {
    /// Print the `aws iam create-open-id-connect-provider` command, with the live thumbprint.
    Provider {
        /// The issuer URL.
        issuer: String,
        /// Trust this CA (PEM) instead of the public roots.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// The client id (audience) to register.
        #[arg(long, default_value = "sts.amazonaws.com")]
        audience: String,
        /// Connect to this address instead of resolving the JWKS host.
        #[arg(long, value_name = "ADDR:PORT")]
        connect_to: Option<std::net::SocketAddr>,
    },
    /// Print an IAM role trust policy for one Kubernetes service account.
    TrustPolicy {
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        account_id: String,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        #[arg(long, default_value = "sts.amazonaws.com")]
        audience: String,
    },
}
