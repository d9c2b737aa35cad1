//! `oidc-edge`: parse the command line, load the configuration, run.

use std::process::ExitCode;

use clap::Parser as _;
use oidc_edge::cli::{AwsCommand, CheckArgs, Cli, Command, RotationCommand};
use oidc_edge::config::Config;
use oidc_edge::{aws, check, docs, render, server::Server, signals, telemetry};

/// sysexits.h `EX_USAGE`: bad command line or configuration.
const EX_USAGE: u8 = 64;
/// `check` found a rule a relying party would fail.
const EXIT_CHECK_FAILED: u8 = 2;

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
    // One process-wide crypto provider, before any TLS config is built (crates-and-acme §2).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match cli.command {
        Command::Serve(args) => {
            let Some(config) = load(&args.config) else {
                return ExitCode::from(EX_USAGE);
            };
            if config.http.is_none() && config.https.is_none() {
                eprintln!(
                    "oidc-edge: {}: http: no listener is configured; this configuration only \
                     publishes to buckets or pushes to an edge: run `oidc-edge publish` or `oidc-edge push`",
                    config.file.display()
                );
                return ExitCode::from(EX_USAGE);
            }
            telemetry::init(&config.log);
            log_warnings(&config);
            exit(serve(config))
        }
        Command::Publish(args) => outbound(&args, "publish", |i| i.publish.is_empty()),
        Command::Push(args) => outbound(&args, "push", |i| i.push.is_empty()),
        Command::CheckConfig(args) => match load(&args.config) {
            Some(config) => {
                for warning in &config.warnings {
                    eprintln!("oidc-edge: warning: {warning}");
                }
                print(&format!("{config}\n"));
                ExitCode::SUCCESS
            }
            None => ExitCode::from(EX_USAGE),
        },
        Command::Render(args) => {
            let Some(config) = load(&args.config) else {
                return ExitCode::from(EX_USAGE);
            };
            telemetry::init(&config.log);
            log_warnings(&config);
            let options = render::Options {
                out: args.out,
                layout: args.layout,
            };
            exit(block_on(async {
                let objects = render::render(&config, &options).await?;
                for object in objects {
                    print(&format!(
                        "{} ({})\n",
                        options.out.join(&object.key).display(),
                        object.content_type
                    ));
                }
                Ok(())
            }))
        }
        Command::Healthcheck(args) => {
            exit(block_on(oidc_edge::healthcheck::run(&args)).map(|ok| print(&ok)))
        }
        Command::Check(args) => match block_on(check::run(&check_options(&args))) {
            Ok(report) => {
                if args.json {
                    print(&format!(
                        "{}\n",
                        serde_json::to_string_pretty(&report).expect("report serialises")
                    ));
                } else {
                    print(&report.table());
                }
                if report.failed() {
                    ExitCode::from(EXIT_CHECK_FAILED)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => exit(Err(e)),
        },
        Command::Trust(args) => {
            let Some(config) = load(&args.config) else {
                return ExitCode::from(EX_USAGE);
            };
            exit(oidc_edge::trust::run(&config, &args.issuer, &args.jwks).map(|s| print(&s)))
        }
        Command::Rotation {
            command: RotationCommand::Status(args),
        } => {
            let options = oidc_edge::rotation::Options {
                admin: args.admin,
                config: args.config,
                issuer: args.issuer,
                token_lifetime: args.token_lifetime,
            };
            exit(block_on(oidc_edge::rotation::run(&options)).map(|report| print(&report)))
        }
        Command::Aws { command } => exit(match command {
            AwsCommand::Provider {
                issuer,
                ca_file,
                audience,
                connect_to,
            } => block_on(async {
                let ca = ca_file.as_ref().map(std::fs::read).transpose()?;
                print(&aws::provider_command(&issuer, &audience, ca.as_deref(), connect_to).await?);
                Ok(())
            }),
            AwsCommand::TrustPolicy {
                issuer,
                account_id,
                namespace,
                service_account,
                audience,
            } => aws::trust_policy(
                &issuer,
                &account_id,
                &namespace,
                &service_account,
                &audience,
            )
            .map(|p| {
                if let Some(note) = &p.note {
                    eprintln!("oidc-edge: note: {note}");
                }
                print(&p.policy);
            }),
        }),
        Command::Completions { shell } => exit(
            docs::completions(shell, &mut std::io::stdout().lock()).map_err(anyhow::Error::from),
        ),
        Command::Man { dir: None } => {
            exit(docs::man_page(&mut std::io::stdout().lock()).map_err(anyhow::Error::from))
        }
        Command::Man { dir: Some(dir) } => exit(
            docs::man_pages(&dir)
                .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))
                .map(|pages| {
                    for page in pages {
                        print(&format!("{}\n", page.display()));
                    }
                }),
        ),
    }
}

/// The doctor's options from its command line; "-" names standard input, as usual.
fn check_options(args: &CheckArgs) -> check::Options {
    check::Options {
        issuer: args.issuer.clone(),
        ca_file: args.ca_file.clone(),
        token: args.token.as_ref().map(|token| match token.as_str() {
            "-" => check::TokenSource::Stdin,
            path => check::TokenSource::File(path.into()),
        }),
        audience: args.audience.clone(),
        targets: args.target.clone(),
        connect_to: args.connect_to,
    }
}

fn load(path: &std::path::Path) -> Option<Config> {
    match Config::load(path) {
        Ok(config) => Some(config),
        Err(e) => {
            eprintln!("oidc-edge: {e}");
            None
        }
    }
}

/// What the configuration leaves to fix itself (a file that may still appear, L13).
fn log_warnings(config: &Config) {
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
}

#[allow(clippy::print_stdout)]
fn print(text: &str) {
    print!("{text}");
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("oidc-edge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn block_on<T>(future: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(future)
}

/// `publish --once`: a line per target on stdout, a line per failure on stderr.
/// `publish` and `push`: `serve`'s pipeline without public listeners, for a config where
/// some issuer has a `[[issuers.TABLE]]` target (`lacks` says which do not).
fn outbound(
    args: &oidc_edge::cli::PublishArgs,
    table: &str,
    lacks: impl Fn(&oidc_edge::config::IssuerConfig) -> bool,
) -> ExitCode {
    let Some(mut config) = load(&args.config) else {
        return ExitCode::from(EX_USAGE);
    };
    if config.issuers.iter().all(lacks) {
        eprintln!(
            "oidc-edge: {}: issuers: no issuer has an [[issuers.{table}]] target",
            config.file.display()
        );
        return ExitCode::from(EX_USAGE);
    }
    telemetry::init(&config.log);
    log_warnings(&config);
    if args.once {
        return publish_once(&config);
    }
    // The buckets or the edge serve; this process binds only its admin listener.
    config.http = None;
    config.https = None;
    exit(serve(config))
}

fn publish_once(config: &Config) -> ExitCode {
    let results = match block_on(oidc_edge::server::publish_once(config)) {
        Ok(results) => results,
        Err(e) => return exit(Err(e)),
    };
    let mut failed = false;
    for (_, result) in results {
        match result {
            Ok(synced) => {
                for url in &synced.written {
                    print(&format!("{url}: written\n"));
                }
                for url in &synced.unchanged {
                    print(&format!("{url}: unchanged\n"));
                }
                // The bucket is right; what is in front of it may catch up (a CDN's max-age).
                for difference in &synced.public_differences {
                    eprintln!("oidc-edge: warning: {difference}");
                }
            }
            Err(e) => {
                failed = true;
                eprintln!("oidc-edge: {e:#}");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    // Before any thread exists: taking the sockets clears LISTEN_FDS from the environment.
    let activated = oidc_edge::systemd::take_activated_listeners(
        config.http.is_some(),
        config.https.is_some(),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let server = Server::bind_activated(config, activated).await?;
        server.run(signals::terminate()).await
    })
}
