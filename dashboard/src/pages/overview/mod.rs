//! Overview: counters per window, replay-rate and conflict charts, store health, keys in
//! flight. Polls `/api/stats` and `/api/health` every few seconds.

use std::time::Duration;

use idemgate_protocol::admin::{
    Counters, Health, RedisSafety, SafetyLevel, StatsResponse, StatsWindow,
};
use leptos::prelude::*;

use crate::api::{use_api, ApiError};
use crate::components::charts::{ConflictsChart, ReplayRateChart};
use crate::components::feedback::{ErrorPanel, Loading};
use crate::components::time::Time;
use crate::format::percent;

/// How often the overview refreshes, milliseconds.
pub const REFRESH_MS: u64 = 3_000;

/// One counter row: label, explanation, accessor.
type Row = (&'static str, &'static str, fn(&Counters) -> u64);

const ROWS: [Row; 9] = [
    ("Executions", "claims that ran the upstream", |c| {
        c.executions
    }),
    ("Replays", "stored responses replayed to retries", |c| {
        c.replays
    }),
    (
        "In-flight conflicts",
        "409: the key was still executing",
        |c| c.in_flight_conflicts,
    ),
    (
        "Mismatches",
        "422: the key was reused with another request",
        |c| c.mismatches,
    ),
    (
        "Rejections",
        "400/401/413: missing or malformed key, body too large",
        |c| c.rejections,
    ),
    ("Expirations", "records or locks that expired", |c| {
        c.expirations
    }),
    ("Purges", "records purged by operators", |c| c.purges),
    ("Store errors", "store calls that failed", |c| {
        c.store_errors
    }),
    (
        "Fail-open passes",
        "forwarded unprotected because the store failed",
        |c| c.fail_open_passes,
    ),
];

/// Which window the charts show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Win {
    Minute,
    Hour,
    Day,
}

impl Win {
    fn pick(self, s: &StatsResponse) -> StatsWindow {
        match self {
            Win::Minute => s.minute.clone(),
            Win::Hour => s.hour.clone(),
            Win::Day => s.day.clone(),
        }
    }
}

/// Repeats `tick` every `ms` while the calling component is mounted.
pub fn every(ms: u64, tick: RwSignal<u64>) {
    if let Ok(h) = set_interval_with_handle(
        move || {
            let _ = tick.try_update(|t| *t += 1);
        },
        Duration::from_millis(ms),
    ) {
        on_cleanup(move || h.clear());
    }
}

/// The overview page.
#[component]
pub fn OverviewPage() -> impl IntoView {
    let api = use_api();
    let tick = RwSignal::new(0u64);
    every(REFRESH_MS, tick);
    let stats = LocalResource::new(move || {
        tick.track();
        async move { api.stats().await }
    });
    let health = LocalResource::new(move || {
        tick.track();
        async move { api.health().await }
    });
    let win = RwSignal::new(Win::Minute);

    view! {
        <h1>"Overview"</h1>
        <Transition fallback=|| view! { <Loading text="Loading statistics…" /> }>
            <ErrorBoundary fallback=|errors| view! { <ErrorPanel errors /> }>
                {move || Suspend::new(async move {
                    // Health first: when Redis is down the stats may fail too, and the
                    // store card says why.
                    let h = health.await;
                    let s = stats.await;
                    let cards = match h {
                        Ok(h) => view! { <HealthCards health=h /> }.into_any(),
                        Err(e) => view! { <div class="card stat error">{e.to_string()}</div> }.into_any(),
                    };
                    let s = s?;
                    Ok::<_, ApiError>(view! { <StatsView stats=s win cards /> })
                })}
            </ErrorBoundary>
        </Transition>
    }
}

#[component]
fn HealthCards(health: Health) -> impl IntoView {
    let up = health.redis == "up";
    let latency = health
        .redis_latency_ms
        .map(|l| format!("{l:.1} ms"))
        .unwrap_or_else(|| "–".to_owned());
    let (safety, tone, label, summary) = safety_summary(health.redis_safety.as_ref());
    let messages = health
        .redis_safety
        .map(|s| s.messages)
        .unwrap_or_default()
        .into_iter()
        .map(|m| view! { <li>{m}</li> })
        .collect_view();
    view! {
        <div class="card stat" id="store-health" data-redis=health.redis.clone() data-safety=safety>
            <span class="label">"Store (Redis)"</span>
            <span class=if up { "value ok" } else { "value bad" }>{if up { "reachable" } else { "DOWN" }}</span>
            <span class="hint">
                {if up {
                    format!("PING {latency} · idemgate-server {}", health.version)
                } else {
                    "Redis does not answer: requests on fail-closed routes get 503; check Redis and the server log.".to_owned()
                }}
            </span>
            <span class="hint" id="store-safety">
                <span class=format!("badge tone-{tone}")>{label}</span>" "{summary}
            </span>
            <ul class="hint safety-messages">{messages}</ul>
        </div>
    }
}

/// The store card's safety line: (wire status, badge tone, badge label, one sentence).
fn safety_summary(s: Option<&RedisSafety>) -> (&'static str, &'static str, &'static str, String) {
    let Some(s) = s else {
        return (
            "unchecked",
            "info",
            "not checked yet",
            "the server checks the Redis settings at start and every minute".to_owned(),
        );
    };
    let restarts = if s.restarts > 0 {
        format!(" · {} restart(s) or failover(s) seen", s.restarts)
    } else {
        String::new()
    };
    let (status, tone, label, text) = match s.status {
        SafetyLevel::Ok => (
            "ok",
            "ok",
            "settings ok",
            "noeviction and AOF on every master",
        ),
        SafetyLevel::CannotVerify => (
            "cannot_verify",
            "warn",
            "cannot verify",
            "Redis refuses CONFIG: eviction and persistence are unknown",
        ),
        SafetyLevel::Warning => ("warning", "warn", "warning", "a restart can forget records"),
        SafetyLevel::Unsafe => (
            "unsafe",
            "bad",
            "unsafe",
            "Redis can evict records: a retry may execute twice",
        ),
    };
    (status, tone, label, format!("{text}{restarts}"))
}

#[component]
fn StatsView(stats: StatsResponse, win: RwSignal<Win>, cards: AnyView) -> impl IntoView {
    let in_flight = stats
        .in_flight_now
        .map(|n| n.to_string())
        .unwrap_or_else(|| "–".to_owned());
    let windows = [
        ("Last minute", stats.minute.clone()),
        ("Last hour", stats.hour.clone()),
        ("Last day", stats.day.clone()),
    ];
    let header = windows
        .iter()
        .map(|(label, _)| view! { <th class="num">{*label}</th> })
        .collect_view();
    let rows = ROWS
        .iter()
        .map(|(label, hint, get)| {
            let cells = windows
                .iter()
                .map(|(_, w)| view! { <td class="num">{get(&w.totals).to_string()}</td> })
                .collect_view();
            view! {
                <tr>
                    <th scope="row" title=*hint>{*label}</th>
                    {cells}
                </tr>
            }
        })
        .collect_view();
    let rates = windows
        .iter()
        .map(|(_, w)| view! { <td class="num">{percent(w.replay_rate)}</td> })
        .collect_view();
    let m = &stats.minute.totals;
    let conflicts = (m.in_flight_conflicts + m.mismatches).to_string();
    let conflict_hint = format!(
        "{} in flight (409) · {} mismatched (422)",
        m.in_flight_conflicts, m.mismatches
    );
    let chart_stats = stats.clone();
    let window = Signal::derive(move || win.get().pick(&chart_stats));
    let generated = stats.generated_ms;
    view! {
        <section class="cards">
            {cards}
            <div class="card stat" id="in-flight-now">
                <span class="label">"Keys in flight now"</span>
                <a class="value" href="/keys?state=in_flight" title="List the keys in flight">{in_flight}</a>
                <span class="hint">"executing upstream (or waiting for their lock to expire)"</span>
            </div>
            <div class="card stat" id="unknown-outcomes-day">
                <span class="label">"Unknown outcomes, last day"</span>
                <a class="value" href="/keys?state=unknown" title="List the keys whose outcome is unknown">{stats.day.totals.unknown_outcomes.to_string()}</a>
                <span class="hint">"the client or Envoy gave up after the request left; retries get 409"</span>
            </div>
            <div class="card stat">
                <span class="label">"Replay rate, last minute"</span>
                <span class="value">{percent(stats.minute.replay_rate)}</span>
                <span class="hint">"replays / (replays + executions)"</span>
            </div>
            <div class="card stat" id="conflicts-minute">
                <span class="label">"Conflicts, last minute"</span>
                <span class="value">{conflicts}</span>
                <span class="hint">{conflict_hint}</span>
            </div>
        </section>
        <section class="card">
            <div class="section-head">
                <h2>"Over time"</h2>
                <div class="segmented" role="group" aria-label="Chart window">
                    <button class:active=move || win.get() == Win::Minute on:click=move |_| win.set(Win::Minute)>"Minute"</button>
                    <button class:active=move || win.get() == Win::Hour on:click=move |_| win.set(Win::Hour)>"Hour"</button>
                    <button class:active=move || win.get() == Win::Day on:click=move |_| win.set(Win::Day)>"Day"</button>
                </div>
            </div>
            <div class="charts">
                <figure>
                    <figcaption>"Replay rate"</figcaption>
                    <ReplayRateChart window />
                </figure>
                <figure>
                    <figcaption>
                        "Conflicts: " <span class="legend conflict">"409 in flight"</span> " "
                        <span class="legend mismatch">"422 mismatch"</span>
                    </figcaption>
                    <ConflictsChart window />
                </figure>
            </div>
        </section>
        <section class="card">
            <h2>"Counters"</h2>
            <div class="table-wrap">
                <table id="counters" class="counters">
                    <thead>
                        <tr>
                            <th></th>
                            {header}
                        </tr>
                    </thead>
                    <tbody>
                        {rows}
                        <tr class="rate">
                            <th scope="row" title="replays / (replays + executions)">"Replay rate"</th>
                            {rates}
                        </tr>
                    </tbody>
                </table>
            </div>
            <p class="muted small">"Read at " <Time ms=generated /> "; refreshes every 3 s."</p>
        </section>
    }
}
