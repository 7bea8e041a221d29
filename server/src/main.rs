//! `idemgate-server serve`: see `idemgate-server --help`.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser;
use idemgate_server::config::{check_filter_config, ConfigCommand};
use idemgate_server::{serve, shutdown_signal, Cli, Command};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Config(ConfigCommand::Check { file }) => match check_filter_config(&file) {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("idemgate-server: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Keys { client, command } => {
            cli_exit(idemgate_server::cli::keys(&client, command).await)
        }
        Command::Purge { client, args } => {
            cli_exit(idemgate_server::cli::bulk(&client, args).await)
        }
        Command::Stats { client } => cli_exit(idemgate_server::cli::stats(&client).await),
        Command::Serve(mut args) => {
            args.admin_token = std::env::var("IDEMGATE_ADMIN_TOKEN").ok();
            let config = match args.validate() {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("idemgate-server: {err}");
                    return ExitCode::from(2);
                }
            };
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                "idemgate-server starting"
            );
            match serve(config, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("{err}");
                    eprintln!("idemgate-server: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn cli_exit(result: Result<(), idemgate_server::cli::CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("idemgate-server: {err}");
            ExitCode::FAILURE
        }
    }
}
