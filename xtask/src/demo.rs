//! `cargo xtask demo`: the gateway in front of the demo API, with curl lines to try.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use idemgate_e2e::{Component, FixedPorts, Stack, StackOptions};

/// Start Redis, idemgate-server, the demo upstream and Envoy with envoy/demo-filter.json.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Gateway (Envoy listener) port; default: a free port.
    #[arg(long)]
    gateway_port: Option<u16>,
    /// Dashboard (server admin listener) port; default: a free port.
    #[arg(long)]
    dashboard_port: Option<u16>,
    /// Skip `setup` and `build` (use what is already built).
    #[arg(long)]
    no_build: bool,
}

/// Entry point of `cargo xtask demo`: runs until Ctrl-C or SIGTERM, then stops every
/// process it started.
///
/// # Errors
/// Setup, the build or the start fails (whatever started is stopped).
pub fn run(args: &Args) -> Result<ExitCode> {
    // Install the handler first, so a signal during the build or the start also stops
    // everything (the start polls `cancel`; dropping the stack kills its processes).
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<()>();
    {
        let cancel = Arc::clone(&cancel);
        ctrlc::set_handler(move || {
            cancel.store(true, Ordering::SeqCst);
            let _ = tx.send(());
        })
        .context("installing the Ctrl-C/SIGTERM handler")?;
    }
    if !args.no_build {
        crate::setup::run_setup()?;
        crate::build::run_build()?;
    }
    if cancel.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    let opts = StackOptions {
        ports: FixedPorts {
            gateway: args.gateway_port,
            admin: args.dashboard_port,
            ..FixedPorts::default()
        },
        cancel: Some(Arc::clone(&cancel)),
        ..StackOptions::demo()
    };
    let mut stack = Stack::start(opts).context("starting the demo stack (logs in target/demo/)")?;
    print_banner(&stack);
    // Wait for Ctrl-C / SIGTERM. If a component dies meanwhile, say which, show its log
    // and stop the rest: a half-running demo only confuses.
    let code = loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break ExitCode::SUCCESS,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some(dead) = Component::ALL.into_iter().find(|c| !stack.is_running(*c)) {
            eprintln!(
                "xtask demo: {dead} stopped unexpectedly; last lines of {}:\n{}",
                stack.log_path(dead).display(),
                stack.log_tail(dead, 40)
            );
            break ExitCode::FAILURE;
        }
    };
    eprintln!(
        "\nxtask demo: stopping (logs kept in {})",
        stack.log_dir().display()
    );
    drop(stack);
    Ok(code)
}

fn print_banner(stack: &Stack) {
    let gw = stack.gateway_url();
    let h = "-H 'Authorization: Bearer tenant-a' -H 'Content-Type: application/json'";
    println!("gateway   {gw}");
    println!("upstream  {}", stack.upstream_url());
    println!("dashboard {}", stack.admin_url());
    println!("envoy     {}", stack.envoy_admin_url());
    println!("logs      {}", stack.log_dir().display());
    println!();
    println!("# 1. first execution: 201 from the upstream, a new payment");
    println!("curl -i -X POST {gw}/v1/payments {h} -H 'Idempotency-Key: demo-1' -d '{{\"amount\":1000,\"currency\":\"eur\"}}'");
    println!("# 2. the same again: the stored 201 replayed with Idempotent-Replayed: true, nothing executed");
    println!("curl -i -X POST {gw}/v1/payments {h} -H 'Idempotency-Key: demo-1' -d '{{\"amount\":1000,\"currency\":\"eur\"}}'");
    println!(
        "# 3. 409: the same key while the first request is still running (the upstream takes 3 s)"
    );
    let slow = format!(
        "-X POST {gw}/v1/payments {h} -H 'Idempotency-Key: demo-2' -H 'x-demo-delay-ms: 3000' -d '{{\"amount\":2000,\"currency\":\"eur\"}}'"
    );
    println!("curl -s -o /dev/null -w 'first: %{{http_code}}\\n' {slow} & sleep 0.5; curl -i {slow}; wait");
    println!("# 4. 422: key demo-1 reused with another amount");
    println!("curl -i -X POST {gw}/v1/payments {h} -H 'Idempotency-Key: demo-1' -d '{{\"amount\":9999,\"currency\":\"eur\"}}'");
    println!("# 5. 400: /v1/payments requires an Idempotency-Key");
    println!("curl -i -X POST {gw}/v1/payments {h} -d '{{\"amount\":1000,\"currency\":\"eur\"}}'");
    println!("# what the upstream executed:");
    println!("curl -s {}/__upstream/executions", stack.upstream_url());
    println!();
    println!("Ctrl-C stops everything.");
}
