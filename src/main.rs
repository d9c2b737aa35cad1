//! `oidc-edge`: parse the command line, load the configuration, run.

use std::process::ExitCode;

use clap::Parser as _;
use oidc_edge::cli::{Cli, Command};
use oidc_edge::config::Config;
use oidc_edge::{server::Server, shutdown, telemetry};

/// sysexits.h `EX_USAGE`: bad command line or configuration.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let (Command::Serve(args) | Command::CheckConfig(args)) = &cli.command;
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("oidc-edge: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match cli.command {
        Command::CheckConfig(_) => {
            #[allow(clippy::print_stdout)]
            {
                println!("{config}");
            }
            ExitCode::SUCCESS
        }
        Command::Serve(_) => {
            telemetry::init(&config.log);
            match serve(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("oidc-edge: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    // Before any thread exists: taking the sockets clears LISTEN_FDS from the environment.
    let activated = oidc_edge::systemd::take_activated_listeners(
        config.http.is_some(),
        config.https.is_some(),
    )?;
    // One process-wide crypto provider, before any TLS config is built (crates-and-acme §2).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let server = Server::bind_activated(config, activated).await?;
        server.run(shutdown::terminate()).await
    })
}
