//! `cargo xtask demo`: the gateway in front of the demo API, the dashboard with a fresh
//! admin token, demo traffic flowing, and curl lines to try.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use idemgate_e2e::traffic::Traffic;
use idemgate_e2e::{Component, FixedPorts, Stack, StackOptions};

/// Start Redis, idemgate-server (with the dashboard), the demo upstream and Envoy with
/// envoy/demo-filter.json, and send demo traffic.
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
    /// Do not send demo traffic (by default a background generator sends new keys,
    /// retries, concurrent duplicates, conflicting reuses and a few malformed keys).
    #[arg(long)]
    no_traffic: bool,
}

/// A random admin token: 32 hex digits from the OS's random source.
///
/// # Errors
/// `/dev/urandom` cannot be read.
pub fn random_token() -> Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for the admin token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
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
    let token = random_token()?;
    let dashboard = crate::build::dashboard_dir();
    let token_file = write_token_file(&token)?;
    let opts = StackOptions {
        ports: FixedPorts {
            gateway: args.gateway_port,
            admin: args.dashboard_port,
            ..FixedPorts::default()
        },
        cancel: Some(Arc::clone(&cancel)),
        // The server reads IDEMGATE_DASHBOARD_DIR (--dashboard-dir) and
        // IDEMGATE_ADMIN_TOKEN_FILE (--admin-token-file, lines `label token`).
        server_env: vec![
            (
                "IDEMGATE_DASHBOARD_DIR".into(),
                dashboard.display().to_string(),
            ),
            (
                "IDEMGATE_ADMIN_TOKEN_FILE".into(),
                token_file.display().to_string(),
            ),
        ],
        ..StackOptions::demo()
    };
    let mut stack = Stack::start(opts).context("starting the demo stack (logs in target/demo/)")?;
    if !dashboard.join("index.html").is_file() {
        eprintln!(
            "xtask demo: warning: {} has no built dashboard; run `cargo xtask build`",
            dashboard.display()
        );
    }
    print_banner(&stack, &token);
    let traffic = (!args.no_traffic).then(|| Traffic::start(stack.gateway_url()));
    if traffic.is_some() {
        println!("demo traffic is flowing (--no-traffic turns it off).");
    }
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
    if let Some(t) = traffic {
        let counts = t.stop();
        let summary: Vec<String> = counts.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        eprintln!(
            "xtask demo: demo traffic answers by status: {}",
            summary.join(", ")
        );
    }
    drop(stack);
    Ok(code)
}

/// Writes `target/demo-admin-tokens` (`admin <token>`, owner-only) for the server's
/// `--admin-token-file`. Outside `target/demo/`, which the stack truncates at start.
fn write_token_file(token: &str) -> Result<std::path::PathBuf> {
    let path = idemgate_e2e::workspace_root().join("target/demo-admin-tokens");
    std::fs::write(
        &path,
        format!("# written by cargo xtask demo\nadmin {token}\n"),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(path)
}

fn print_banner(stack: &Stack, token: &str) {
    let gw = stack.gateway_url();
    let h = "-H 'Authorization: Bearer tenant-a' -H 'Content-Type: application/json'";
    println!("gateway   {gw}");
    println!("upstream  {}", stack.upstream_url());
    println!("dashboard {}/  (admin token: {token})", stack.admin_url());
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
    println!(
        "# 6. the client times out (1 s) while the payment takes 2.5 s; the upstream call goes on"
    );
    println!("#    (detached route), and a retry after it finished gets the first execution's 201, replayed");
    let timeout = format!(
        "-X POST {gw}/v1/payments {h} -H 'Idempotency-Key: demo-3' -H 'x-demo-delay-ms: 2500' -d '{{\"amount\":3000,\"currency\":\"eur\"}}'"
    );
    println!("curl -s --max-time 1 {timeout}; echo \"curl exit $? (timed out)\"; sleep 2.5; curl -i {timeout}");
    println!("# what the upstream executed: counts per path, and each request with its key");
    println!("curl -s {}/__upstream/executions", stack.upstream_url());
    println!("curl -s {}/__upstream/requests", stack.upstream_url());
    println!();
    println!("Ctrl-C stops everything.");
}
