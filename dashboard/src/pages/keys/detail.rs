//! Key detail: everything the admin API knows about one record, its stored response, its
//! own event history, and Purge / Release lock behind a confirmation naming the key.

use idemgate_protocol::admin::{Event, KeyDetail, KeyState, ResponsePreview};
use leptos::prelude::*;
use leptos::task::spawn_local;
use leptos_router::hooks::{use_navigate, use_query_map};
use leptos_router::NavigateOptions;

use crate::api::{use_api, ApiError};
use crate::app::use_flash;
use crate::components::badges::{KindBadge, StateBadge};
use crate::components::confirm::Confirm;
use crate::components::feedback::{Empty, ErrorPanel, Loading};
use crate::components::time::{use_now, Time};
use crate::core::live::use_live;
use crate::format::{bytes, duration_ms, expires_in};
use crate::pages::keys::throttled;
use crate::pages::overview::every;

/// Events of the key shown in its history.
pub const HISTORY_LIMIT: u32 = 100;

/// Which action the confirmation dialog is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Purge,
    Release,
}

/// The key detail page (`/key?scope=…&k=<base64url key>`).
#[component]
pub fn KeyDetailPage() -> impl IntoView {
    let api = use_api();
    let live = use_live();
    let flash = use_flash();
    let navigate = use_navigate();
    let query = use_query_map();
    let scope = Memo::new(move |_| query.with(|q| q.get("scope").unwrap_or_default()));
    let key = Memo::new(move |_| {
        query.with(|q| {
            q.get("k")
                .and_then(|k| crate::format::key_from_param(&k))
                .unwrap_or_default()
        })
    });
    let tick = RwSignal::new(0u64);
    every(5_000, tick);
    let refresh = throttled(tick);
    Effect::new(move |_| {
        let mine = live.latest.with(|e| {
            e.as_ref().is_some_and(|e| {
                e.key.as_deref() == Some(key.get_untracked().as_str())
                    && e.scope
                        .as_deref()
                        .is_none_or(|s| s == scope.get_untracked())
            })
        });
        if mine {
            refresh();
        }
    });

    let detail = LocalResource::new(move || {
        tick.track();
        let (s, k) = (scope.get(), key.get());
        async move { api.key(&s, &k).await }
    });
    let history = LocalResource::new(move || {
        tick.track();
        let (s, k) = (scope.get(), key.get());
        async move { api.recent_events(Some(&s), Some(&k), HISTORY_LIMIT).await }
    });

    let dialog = RwSignal::new(false);
    let action = RwSignal::new(Action::Purge);
    let action_error = RwSignal::new(None::<String>);
    let busy = RwSignal::new(false);
    let ask = move |a: Action| {
        action.set(a);
        action_error.set(None);
        dialog.set(true);
    };
    let title = Signal::derive(move || match action.get() {
        Action::Purge => "Purge this key?".to_owned(),
        Action::Release => "Release this lock?".to_owned(),
    });
    let message = Signal::derive(move || {
        match action.get() {
        Action::Purge => format!(
            "Purge key \"{}\" (scope {})? Its record and stored response are deleted; the next request with this key executes again.",
            key.get(),
            scope.get()
        ),
        Action::Release => format!(
            "Release the in-flight lock or unknown outcome of key \"{}\" (scope {})? A retry executes again even if the first request is still running upstream or already took effect.",
            key.get(),
            scope.get()
        ),
    }
    });
    let confirm_label = Signal::derive(move || match action.get() {
        Action::Purge => format!("Purge {}", key.get()),
        Action::Release => format!("Release {}", key.get()),
    });
    let on_confirm = Callback::new(move |()| {
        let (s, k, a) = (
            scope.get_untracked(),
            key.get_untracked(),
            action.get_untracked(),
        );
        let navigate = navigate.clone();
        busy.set(true);
        spawn_local(async move {
            let result = match a {
                Action::Purge => api.purge_key(&s, &k).await,
                Action::Release => api.release_key(&s, &k).await,
            };
            let _ = busy.try_set(false);
            match (a, result) {
                (Action::Purge, Ok(o)) => {
                    flash.show(if o.purged {
                        format!("Purged key {k}.")
                    } else {
                        format!("Key {k} was already gone (expired or purged).")
                    });
                    navigate("/keys", NavigateOptions::default());
                }
                (Action::Release, Ok(o)) => {
                    flash.show(if o.purged {
                        format!("Released the lock of key {k}; a retry executes again.")
                    } else {
                        format!("Key {k} was not in flight any more; nothing released.")
                    });
                    let _ = tick.try_update(|t| *t += 1);
                }
                (_, Err(e)) => {
                    let _ = action_error.try_set(Some(e.to_string()));
                }
            }
        });
    });

    view! {
        <p class="crumbs"><a href="/keys">"← Keys"</a></p>
        <h1 class="key-title">"Key " <code id="detail-key">{move || key.get()}</code></h1>
        {move || action_error.get().map(|e| view! { <p class="error" role="alert">{e}</p> })}
        <Transition fallback=|| view! { <Loading text="Loading the record…" /> }>
            <ErrorBoundary fallback=|errors| view! { <ErrorPanel errors /> }>
                {move || Suspend::new(async move {
                    match detail.await {
                        Ok(d) => Ok(view! { <DetailView d ask busy /> }.into_any()),
                        Err(ApiError::NotFound(_)) => Ok(view! {
                            <div id="key-gone">
                                <Empty
                                    title="This key has no record (any more)."
                                    hint="It expired or was purged; its history below shows what happened. A new request with this key executes again."
                                />
                            </div>
                        }.into_any()),
                        Err(e) => Err(e),
                    }
                })}
            </ErrorBoundary>
        </Transition>
        <section class="card">
            <h2>"History of this key"</h2>
            <Transition fallback=|| view! { <Loading text="Loading events…" /> }>
                <ErrorBoundary fallback=|errors| view! { <ErrorPanel errors /> }>
                    {move || Suspend::new(async move {
                        let evs = history.await?;
                        Ok::<_, ApiError>(view! { <KeyHistory evs /> })
                    })}
                </ErrorBoundary>
            </Transition>
        </section>
        <Confirm open=dialog title message confirm_label on_confirm />
    }
}

#[component]
fn DetailView(
    d: KeyDetail,
    ask: impl Fn(Action) + Copy + Send + Sync + 'static,
    busy: RwSignal<bool>,
) -> impl IntoView {
    let now = use_now();
    let s = d.summary.clone();
    let in_flight = s.state == KeyState::InFlight;
    let unknown = s.state == KeyState::Unknown;
    // A stuck lock and an unknown outcome are released, never purged by accident.
    let releasable = in_flight || unknown;
    let expires = s.expires_ms;
    let status = s
        .status
        .map(|v| v.to_string())
        .unwrap_or_else(|| "–".to_owned());
    let opt_time = |ms: Option<u64>| match ms {
        Some(ms) => view! { <Time ms /> }.into_any(),
        None => view! { "–" }.into_any(),
    };
    view! {
        <div class="detail-grid">
        <section class="card detail" id="key-detail" data-state=crate::format::state_name(s.state)>
            <div class="section-head">
                <h2>"Record"</h2>
                <div class="actions">
                    // An in-flight key is never purged (the server refuses: its request may
                    // still run upstream); Release lock is the deliberate stuck-lock tool.
                    {releasable.then(|| view! {
                        <button id="release" class="btn warn" disabled=move || busy.get() on:click=move |_| ask(Action::Release)>{if unknown { "Release key" } else { "Release lock" }}</button>
                    })}
                    {(!releasable).then(|| view! {
                        <button id="purge" class="btn danger" disabled=move || busy.get() on:click=move |_| ask(Action::Purge)>"Purge"</button>
                    })}
                </div>
            </div>
            <dl class="facts">
                <dt>"State"</dt><dd><StateBadge state=s.state /></dd>
                <dt>"Scope"</dt><dd class="mono wrap">{s.scope.clone()}</dd>
                <dt>"Route"</dt><dd>{s.route.clone()}</dd>
                <dt>"Request"</dt><dd class="mono wrap">{format!("{} {}", s.method, s.path)}</dd>
                <dt>"Status"</dt><dd id="detail-status">{status}</dd>
                <dt>"Replayable"</dt><dd>{if in_flight {
                    "– (decided when the response is stored)"
                } else if unknown {
                    "no (outcome unknown: the request may have reached the upstream, nothing was stored)"
                } else if s.replayable {
                    "yes"
                } else {
                    "no (response over the size cap: retries get 409)"
                }}</dd>
                <dt>"Replays"</dt><dd id="detail-replays">{s.replays.to_string()}</dd>
                <dt>"Created"</dt><dd><Time ms=s.created_ms /></dd>
                <dt>"Completed"</dt><dd>{opt_time(s.completed_ms)}</dd>
                <dt>"Last replay"</dt><dd>{opt_time(d.last_replay_ms)}</dd>
                <dt>"Expires"</dt><dd><Time ms=expires /> " (" {move || expires_in(expires, now.get())} ")"</dd>
                <dt>"TTL when read"</dt><dd>{duration_ms(i64::try_from(d.ttl_ms).unwrap_or(i64::MAX))}</dd>
                <dt>"Lock expires"</dt><dd>{opt_time(d.lock_expires_ms)}</dd>
                <dt>"Fingerprint"</dt><dd class="mono wrap small">{d.fingerprint.clone()}</dd>
            </dl>
        </section>
        <section class="card">
            <h2>"Stored response"</h2>
            {match d.response {
                Some(r) => view! { <ResponseView r /> }.into_any(),
                None => {
                    let why = if in_flight {
                        "None yet: the request is still executing upstream."
                    } else if !s.replayable {
                        "Not stored: the response was over the size cap, only its status is kept."
                    } else {
                        "No stored response."
                    };
                    view! { <p class="muted">{why}</p> }.into_any()
                }
            }}
        </section>
        </div>
    }
}

#[component]
fn ResponseView(r: ResponsePreview) -> impl IntoView {
    let headers = r
        .headers
        .iter()
        .map(|(n, v)| view! { <tr><th class="mono">{n.clone()}</th><td class="mono wrap">{v.clone()}</td></tr> })
        .collect_view();
    let note = match (r.body_preview_base64, r.truncated) {
        (true, true) => format!(
            "binary, base64 of the first bytes of {}",
            bytes(r.body_bytes)
        ),
        (true, false) => format!("binary, base64, {}", bytes(r.body_bytes)),
        (false, true) => format!("first bytes of {}", bytes(r.body_bytes)),
        (false, false) => bytes(r.body_bytes),
    };
    view! {
        <p>"Status " <strong id="response-status">{r.status.to_string()}</strong></p>
        <div class="table-wrap">
            <table class="headers"><tbody>{headers}</tbody></table>
        </div>
        <p class="muted small">"Body (" {note} ")"</p>
        <pre class="body" id="response-body">{r.body_preview.clone()}</pre>
    }
}

#[component]
fn KeyHistory(evs: Vec<Event>) -> impl IntoView {
    if evs.is_empty() {
        return view! {
            <Empty title="No events for this key." hint="Events are kept for a limited time; new ones appear here live." />
        }
        .into_any();
    }
    let rows = evs
        .into_iter()
        .map(|e| {
            view! {
                <tr data-kind=crate::format::kind_name(e.kind)>
                    <td><Time ms=e.at_ms /></td>
                    <td><KindBadge kind=e.kind /></td>
                    <td class="num">{e.status.map(|s| s.to_string()).unwrap_or_default()}</td>
                    <td class="wrap">{e.detail.clone().unwrap_or_default()}</td>
                    <td>{e.actor.clone().unwrap_or_default()}</td>
                </tr>
            }
        })
        .collect_view();
    view! {
        <div class="table-wrap">
            <table class="events" id="key-history">
                <thead><tr><th>"When"</th><th>"What"</th><th class="num">"Status"</th><th>"Detail"</th><th>"By"</th></tr></thead>
                <tbody>{rows}</tbody>
            </table>
        </div>
    }
    .into_any()
}
