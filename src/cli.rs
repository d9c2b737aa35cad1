//! The command line (DESIGN §1). Only what selects a config and a command lives here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;

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
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Configuration file.
    #[arg(long, value_name = "PATH", env = "OIDC_EDGE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}
