//! `demo-upstream --listen 127.0.0.1:PORT`: the demo payments/orders API
//! (see [`idemgate_e2e::upstream`]). Stops gracefully on SIGINT and SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use idemgate_e2e::upstream::{app, AppState};

/// The demo upstream: a payments/orders API whose side effects are countable.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:8081.
    #[arg(long, env = "IDEMGATE_UPSTREAM_LISTEN")]
    listen: SocketAddr,
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}

async fn run(args: Args) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "demo-upstream listening on http://{}",
        listener.local_addr()?
    );
    axum::serve(listener, app(AppState::default()))
        .with_graceful_shutdown(shutdown_signal())
        .await
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo-upstream: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo-upstream: {e}");
            ExitCode::FAILURE
        }
    }
}
