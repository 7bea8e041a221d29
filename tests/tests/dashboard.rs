//! The dashboard in a real headless Chromium (Debian `chromium` + `chromium-driver`),
//! driven over WebDriver (fantoccini), against a full stack: Envoy with the filter, the
//! server serving the built dashboard with an admin token, Redis and the demo upstream.
//!
//! Scenario: a bad token is refused with a message; sign in; a POST with an
//! Idempotency-Key through the gateway appears on the Keys page; a retry raises its replay
//! count without a reload; its detail page purges it through the confirmation dialog; it
//! is gone from the Keys page and a `purged` event is in the Events feed. Screenshots of
//! every page go to `target/dashboard-screenshots/`.
//!
//! Skips (with a message) only when chromium or chromedriver is missing AND
//! `IDEMGATE_REQUIRE_BROWSER` is unset; `cargo xtask test` sets it, so CI always runs it.
//! Needs `cargo xtask build` (it builds the dashboard into `target/dashboard/`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use fantoccini::{Client, ClientBuilder, Locator};
use idemgate_e2e::bins::find_on_path;
use idemgate_e2e::process::Proc;
use idemgate_e2e::traffic::Traffic;
use idemgate_e2e::{
    demo_filter_config, free_port, wait_until, workspace_root, Component, Stack, StackOptions,
};
use serde_json::json;

const REQUIRE_ENV: &str = "IDEMGATE_REQUIRE_BROWSER";
const WAIT: Duration = Duration::from_secs(20);
const TENANT: &str = "Bearer tenant-dashboard";

/// Chromium and chromedriver, when both are installed.
fn browser_bins() -> Option<(PathBuf, PathBuf)> {
    let chrome = ["chromium", "chromium-browser"]
        .iter()
        .find_map(|n| find_on_path(n))?;
    let driver = find_on_path("chromedriver")?;
    Some((chrome, driver))
}

/// chromedriver plus the Chromium it starts; stopped (session closed, driver terminated,
/// any leftover browser process of this profile killed) on drop.
struct Browser {
    driver: Option<Proc>,
    profile: PathBuf,
}

impl Browser {
    fn start(driver_bin: &Path, dir: &Path, port: u16) -> Result<Self> {
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile)?;
        let mut cmd = Command::new(driver_bin);
        cmd.arg(format!("--port={port}"));
        let driver = Proc::spawn("chromedriver", cmd, &dir.join("chromedriver.log"))?;
        let status = idemgate_e2e::Client::new(format!("http://127.0.0.1:{port}"));
        wait_until("chromedriver answers /status", 20_000, || {
            Ok(status.get("/status").send()?.status == 200)
        })?;
        Ok(Self {
            driver: Some(driver),
            profile,
        })
    }

    /// Kills browser processes started with this test's own profile directory (a
    /// safety net when the WebDriver session could not be closed).
    fn kill_leftovers(&self) {
        let marker = format!("--user-data-dir={}", self.profile.display());
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&marker) {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(mut d) = self.driver.take() {
            d.terminate(5_000);
        }
        self.kill_leftovers();
    }
}

fn screenshots_dir() -> PathBuf {
    workspace_root().join("target/dashboard-screenshots")
}

async fn shot(c: &Client, name: &str) -> Result<()> {
    let png = c.screenshot().await?;
    let path = screenshots_dir().join(format!("{name}.png"));
    std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("screenshot: {}", path.display());
    Ok(())
}

async fn find(c: &Client, css: &str) -> Result<fantoccini::elements::Element> {
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Css(css))
        .await
        .with_context(|| format!("waiting for `{css}`"))
}

/// Polls `check` (every 200 ms, up to `WAIT`) until it returns `Some`.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + WAIT;
    let mut last: String;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => last = "not yet".into(),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {WAIT:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The text of the first element matching `css`, if there is one.
async fn text_of(c: &Client, css: &str) -> Result<Option<String>> {
    match c.find(Locator::Css(css)).await {
        Ok(el) => Ok(Some(el.text().await?)),
        Err(e) if e.is_no_such_element() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn click(c: &Client, css: &str) -> Result<()> {
    find(c, css)
        .await?
        .click()
        .await
        .with_context(|| format!("clicking `{css}`"))?;
    Ok(())
}

fn pay(stack: &Stack, key: &str) -> Result<idemgate_e2e::Reply> {
    stack
        .gateway()
        .post("/v1/payments")
        .header("Authorization", TENANT)
        .header("Idempotency-Key", key)
        .json(&json!({"amount": 4200, "currency": "eur"}))
        .send()
}

async fn scenario(c: &Client, stack: &mut Stack, token: &str) -> Result<()> {
    let base = format!("{}/", stack.admin_url());
    let key = format!("dash-{}", std::process::id());
    let row = format!("tr[data-key=\"{key}\"]");
    c.set_window_size(1280, 800).await?;
    c.goto(&base).await?;

    // A wrong token is refused with a clear message.
    find(c, "#token")
        .await?
        .send_keys("not-the-admin-token-at-all")
        .await?;
    shot(c, "01-sign-in").await?;
    click(c, "#sign-in").await?;
    let msg = find(c, "#signin-error").await?.text().await?;
    if !msg.contains("Wrong token") {
        bail!("the sign-in error does not say the token is wrong: {msg:?}");
    }
    shot(c, "02-sign-in-refused").await?;

    // The right token signs in; the live stream connects.
    let input = find(c, "#token").await?;
    input.clear().await?;
    input.send_keys(token).await?;
    click(c, "#sign-in").await?;
    find(c, "#conn-state[data-state=\"live\"]").await?;
    find(c, "#counters").await?;

    // A request through the gateway shows up on the Keys page.
    let first = pay(stack, &key)?;
    if first.status != 201 {
        bail!("first POST answered {}: {}", first.status, first.text());
    }
    click(c, "header nav a[href=\"/keys\"]").await?;
    find(c, &row).await?;
    let replays_css = format!("{row} td.replays");
    let replays = text_of(c, &replays_css).await?;
    if replays.as_deref() != Some("0") {
        bail!("a fresh key shows replays {replays:?}");
    }
    shot(c, "04-keys").await?;

    // A retry is replayed; the row's count rises without a reload.
    let retry = pay(stack, &key)?;
    if retry.header("idempotent-replayed") != Some("true") {
        bail!(
            "the retry was not replayed: {} {:?}",
            retry.status,
            retry.headers
        );
    }
    eventually("the replay count reaches 1 on the Keys page", || async {
        Ok(text_of(c, &replays_css).await?.filter(|t| t == "1"))
    })
    .await?;
    shot(c, "05-keys-replayed").await?;

    // Clicking the row's scope filters by it; the URL carries the filter.
    click(c, &format!("{row} td.mono button")).await?;
    eventually("the scope filter reaches the URL", || async {
        Ok(c.current_url()
            .await?
            .query()
            .is_some_and(|q| q.contains("scope="))
            .then_some(()))
    })
    .await?;
    find(c, &row).await?;

    // Overview (after the traffic above, so its counters and charts have data).
    click(c, "header nav a[href=\"/\"]").await?;
    find(c, "#chart-replay-rate").await?;
    eventually("the overview counts the replay", || async {
        let src = c.source().await?;
        Ok(src.contains("id=\"counters\"").then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    shot(c, "03-overview").await?;

    // Detail page: everything about the key, then purge it through the confirmation.
    click(c, "header nav a[href=\"/keys\"]").await?;
    click(c, &format!("{row} td.key a")).await?;
    find(c, "#key-detail").await?;
    eventually("the detail shows 1 replay", || async {
        Ok(text_of(c, "#detail-replays").await?.filter(|t| t == "1"))
    })
    .await?;
    find(c, "#key-history tr[data-kind=\"replayed\"]").await?;
    shot(c, "06-key-detail").await?;
    click(c, "#purge").await?;
    let dialog = find(c, "#confirm-dialog").await?.text().await?;
    if !dialog.contains(&key) {
        bail!("the confirmation does not name the key {key}: {dialog:?}");
    }
    shot(c, "07-confirm-purge").await?;
    click(c, "#confirm-ok").await?;

    // Back on the Keys page: the key is gone.
    let flash = find(c, "#flash").await?.text().await?;
    if !flash.contains(&key) {
        bail!("no purge notice naming the key: {flash:?}");
    }
    eventually("the purged key leaves the Keys page", || async {
        let gone = c.find(Locator::Css(&row)).await.is_err()
            && c.find(Locator::Css("#keys-table, .empty")).await.is_ok();
        Ok(gone.then_some(()))
    })
    .await?;
    shot(c, "08-keys-after-purge").await?;

    // The Events feed has the purge.
    click(c, "header nav a[href=\"/events\"]").await?;
    find(
        c,
        &format!("#events-table tr[data-kind=\"purged\"][data-key=\"{key}\"]"),
    )
    .await?;
    find(
        c,
        &format!("#events-table tr[data-kind=\"claimed\"][data-key=\"{key}\"]"),
    )
    .await?;
    shot(c, "09-events").await?;

    // The server restarts: the feed shows it reconnecting, then live again, resumes, and
    // shows new events (without repeating old ones).
    stack.stop(Component::Server);
    find(c, "#conn-state[data-state=\"reconnecting\"]").await?;
    shot(c, "10-events-reconnecting").await?;
    stack.restart(Component::Server)?;
    find(c, "#conn-state[data-state=\"live\"]").await?;
    let key2 = format!("{key}-after-restart");
    let r = pay(stack, &key2)?;
    if r.status != 201 {
        bail!(
            "POST after the server restart answered {}: {}",
            r.status,
            r.text()
        );
    }
    find(
        c,
        &format!("#events-table tr[data-kind=\"claimed\"][data-key=\"{key2}\"]"),
    )
    .await?;
    let purged_rows = c
        .find_all(Locator::Css(&format!(
            "#events-table tr[data-kind=\"purged\"][data-key=\"{key}\"]"
        )))
        .await?
        .len();
    if purged_rows != 1 {
        bail!("after the resume the feed shows the purge {purged_rows} times");
    }

    // Bulk purge: the dry run counts before anything is deleted.
    for i in 0..3 {
        let r = pay(stack, &format!("bulk-{}-{i}", std::process::id()))?;
        if r.status != 201 {
            bail!("bulk setup POST answered {}", r.status);
        }
    }
    click(c, "header nav a[href=\"/purge\"]").await?;
    find(c, "#bulk-prefix")
        .await?
        .send_keys(&format!("bulk-{}-", std::process::id()))
        .await?;
    click(c, "#bulk-count").await?;
    let matched = find(c, "#bulk-matched").await?.text().await?;
    if matched != "3" {
        bail!("the dry run counted {matched:?}, expected 3");
    }
    shot(c, "11-bulk-purge-dry-run").await?;
    click(c, "#bulk-purge").await?;
    find(c, "#confirm-dialog").await?;
    click(c, "#confirm-ok").await?;
    let result = find(c, "#bulk-result").await?.text().await?;
    if !result.contains("Purged 3") {
        bail!("bulk purge result: {result:?}");
    }
    shot(c, "12-bulk-purge-done").await?;

    // An in-flight key: its detail offers Release lock, confirmed in a dialog naming it.
    // (Reached by a fresh page load: the session survives it, and the Keys filter comes
    // from the URL.)
    let slow_key = format!("{key}-slow");
    let slow = {
        let gw = stack.gateway();
        let k = slow_key.clone();
        std::thread::spawn(move || {
            gw.post("/v1/payments")
                .header("Authorization", TENANT)
                .header("Idempotency-Key", k)
                .header("x-demo-delay-ms", "6000")
                .json(&json!({"amount": 1, "currency": "eur"}))
                .send()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.goto(&format!("{base}keys?state=in_flight&prefix={slow_key}"))
        .await?;
    click(c, &format!("tr[data-key=\"{slow_key}\"] td.key a")).await?;
    find(c, "#key-detail[data-state=\"in_flight\"]").await?;
    shot(c, "13-key-in-flight").await?;
    click(c, "#release").await?;
    let dialog = find(c, "#confirm-dialog").await?.text().await?;
    if !dialog.contains(&slow_key) {
        bail!("the release confirmation does not name the key: {dialog:?}");
    }
    click(c, "#confirm-ok").await?;
    let flash = find(c, "#flash").await?.text().await?;
    if !flash.contains("Released") {
        bail!("no release notice: {flash:?}");
    }
    let slow = slow
        .join()
        .map_err(|_| anyhow!("the slow request thread panicked"))??;
    if slow.status != 201 {
        bail!("the slow request answered {}", slow.status);
    }

    // Keys holding `%XX` or dots name exactly their own record, and an in-flight key
    // offers no Purge (the server refuses it).
    for odd in ["pct%2Fkey", ".."] {
        let r = pay(stack, odd)?;
        if r.status != 201 {
            bail!("POST with key {odd:?} answered {}", r.status);
        }
    }
    let decoy = pay(stack, "pct/key")?;
    if decoy.status != 201 {
        bail!("POST with key pct/key answered {}", decoy.status);
    }
    for odd in ["pct%2Fkey", ".."] {
        c.goto(&format!("{base}keys")).await?;
        click(c, &format!("tr[data-key=\"{odd}\"] td.key a")).await?;
        let detail = find(c, "#key-detail[data-state=\"completed\"]").await?;
        let shown = text_of(c, "#detail-key").await?.unwrap_or_default();
        if shown != odd {
            bail!("the detail page of {odd:?} shows {shown:?}");
        }
        let _ = detail;
        if c.find(fantoccini::Locator::Css("#release")).await.is_ok() {
            bail!("a completed key offers Release lock");
        }
    }

    // A narrow window still works.
    c.set_window_size(420, 900).await?;
    click(c, "header nav a[href=\"/keys\"]").await?;
    find(c, "#key-filters").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    shot(c, "14-keys-narrow").await?;
    c.set_window_size(1280, 800).await?;

    // With the demo traffic generator running, for the screenshots of a busy gateway.
    let traffic = Traffic::start(stack.gateway_url());
    click(c, "header nav a[href=\"/\"]").await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    shot(c, "15-overview-traffic").await?;
    click(c, ".segmented button:nth-child(2)").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    shot(c, "15b-overview-traffic-hour").await?;
    click(c, "header nav a[href=\"/keys\"]").await?;
    find(c, "#keys-table").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    shot(c, "16-keys-traffic").await?;
    click(c, "header nav a[href=\"/events\"]").await?;
    find(c, "#events-table").await?;
    shot(c, "17-events-traffic").await?;
    let counts = traffic.stop();
    eprintln!("demo traffic answers by status: {counts:?}");
    if !counts.contains_key(&201) {
        bail!("the traffic generator got no 201 through the gateway: {counts:?}");
    }

    // Sign out: back to the sign-in page.
    click(c, "#sign-out").await?;
    find(c, "#token").await?;
    Ok(())
}

/// A second session with a dark colour scheme: sign in and capture the overview.
async fn dark(c: &Client, stack: &Stack, token: &str) -> Result<()> {
    c.set_window_size(1280, 800).await?;
    c.goto(&format!("{}/", stack.admin_url())).await?;
    find(c, "#token").await?.send_keys(token).await?;
    click(c, "#sign-in").await?;
    find(c, "#counters").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    shot(c, "18-overview-dark").await?;
    click(c, "header nav a[href=\"/events\"]").await?;
    find(c, "#events-table").await?;
    shot(c, "19-events-dark").await
}

async fn connect(driver_port: u16, chrome: &Path, profile: &Path, dark: bool) -> Result<Client> {
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), json!("chrome"));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chrome.display().to_string(),
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1280,800",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    if dark {
        if let Some(args) = caps
            .get_mut("goog:chromeOptions")
            .and_then(|o| o.get_mut("args"))
            .and_then(|a| a.as_array_mut())
        {
            args.push(json!("--force-dark-mode"));
            args.push(json!("--blink-settings=preferredColorScheme=0"));
        }
    }
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{driver_port}"))
        .await
        .map_err(|e| anyhow!("starting a Chromium session through chromedriver: {e}"))
}

#[test]
fn dashboard_in_headless_chromium() {
    let Some((chrome, driver_bin)) = browser_bins() else {
        if std::env::var_os(REQUIRE_ENV).is_some() {
            panic!("chromium and chromedriver are required ({REQUIRE_ENV} is set) but not on PATH; run `cargo xtask setup` (apt-get install chromium chromium-driver)");
        }
        eprintln!("SKIPPED dashboard_in_headless_chromium: chromium/chromedriver not on PATH (install: apt-get install chromium chromium-driver, or run `cargo xtask setup`); set {REQUIRE_ENV}=1 to make this a failure");
        return;
    };
    let dashboard = workspace_root().join("target/dashboard");
    assert!(
        dashboard.join("index.html").is_file() && dashboard.join("pkg").is_dir(),
        "{} has no built dashboard; run `cargo xtask build`",
        dashboard.display()
    );
    std::fs::create_dir_all(screenshots_dir()).expect("screenshot dir");
    let token = format!(
        "dash-test-token-{:016x}",
        std::process::id() as u64 * 7919 + 12345
    );
    let work = workspace_root().join(format!(
        "target/e2e/dashboard-browser-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&work).expect("work dir");
    let token_file = work.join("admin-tokens");
    std::fs::write(&token_file, format!("admin {token}\n")).expect("token file");

    let mut stack = Stack::start(StackOptions {
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
        ..StackOptions::new(
            "dashboard",
            demo_filter_config().expect("demo filter config"),
        )
    })
    .expect("stack starts");

    let driver_port = free_port().expect("free port");
    let browser = Browser::start(&driver_bin, &work, driver_port).expect("chromedriver starts");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let outcome: Result<()> = rt.block_on(async {
        let c = connect(driver_port, &chrome, &browser.profile, false).await?;
        let mut result = scenario(&c, &mut stack, &token).await;
        if result.is_ok() {
            // The dark theme, in a second browser session (fresh profile state).
            let _ = c.clone().close().await;
            let d = connect(driver_port, &chrome, &browser.profile, true).await?;
            result = dark(&d, &stack, &token).await;
            if result.is_err() {
                let _ = shot(&d, "failure-dark").await;
            }
            let closed = d.close().await;
            result?;
            return closed.map_err(|e| anyhow!("closing the browser session: {e}"));
        }
        if result.is_err() {
            let _ = shot(&c, "failure").await;
            if let Ok(src) = c.source().await {
                let _ = std::fs::write(screenshots_dir().join("failure.html"), src);
            }
        }
        // Always end the session (this quits Chromium), even after a failure.
        let closed = c.close().await;
        result?;
        closed.map_err(|e| anyhow!("closing the browser session: {e}"))
    });
    drop(browser);
    if let Err(e) = outcome {
        eprintln!(
            "chromedriver log: {}",
            work.join("chromedriver.log").display()
        );
        panic!("dashboard scenario failed: {e:#}");
    }
}
