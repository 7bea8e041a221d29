//! Events: the live feed over SSE with type filters, pause, a bounded history and the
//! connection state.

use std::collections::HashSet;

use idemgate_protocol::admin::{Event, EventKind};
use leptos::prelude::*;
use leptos_router::components::A;

use crate::components::badges::{ConnBadge, KindBadge};
use crate::components::feedback::Empty;
use crate::components::time::Time;
use crate::core::live::{use_live, ConnState, HISTORY};
use crate::format::{kind_label, kind_name, short_scope, ALL_KINDS};
use crate::pages::keys::detail_href;

/// The events page.
#[component]
pub fn EventsPage() -> impl IntoView {
    let live = use_live();
    let shown_kinds = RwSignal::new(ALL_KINDS.iter().copied().collect::<HashSet<EventKind>>());
    let key_filter = RwSignal::new(String::new());
    let paused = RwSignal::new(false);
    // While paused the table shows this snapshot; the stream keeps filling the history.
    let frozen = RwSignal::new(Vec::<Event>::new());
    let paused_at = RwSignal::new(0u64);
    let toggle_pause = move |_| {
        if paused.get_untracked() {
            paused.set(false);
        } else {
            frozen.set(live.events.with_untracked(|e| e.iter().cloned().collect()));
            paused_at.set(live.received.get_untracked());
            paused.set(true);
        }
    };
    let visible = move || {
        let kinds = shown_kinds.get();
        let needle = key_filter.get().trim().to_owned();
        let keep = |e: &&Event| {
            kinds.contains(&e.kind)
                && (needle.is_empty() || e.key.as_deref().is_some_and(|k| k.contains(&needle)))
        };
        if paused.get() {
            frozen.with(|f| f.iter().filter(keep).cloned().collect::<Vec<_>>())
        } else {
            live.events
                .with(|f| f.iter().filter(keep).cloned().collect::<Vec<_>>())
        }
    };
    let chips = ALL_KINDS
        .iter()
        .map(|kind| {
            let kind = *kind;
            let on = move || shown_kinds.with(|s| s.contains(&kind));
            view! {
                <label class="chip" class:off=move || !on()>
                    <input
                        type="checkbox"
                        data-kind=kind_name(kind)
                        prop:checked=on
                        on:change=move |_| shown_kinds.update(|s| {
                            if !s.remove(&kind) {
                                s.insert(kind);
                            }
                        })
                    />
                    {kind_label(kind)}
                </label>
            }
        })
        .collect_view();

    view! {
        <div class="section-head">
            <h1>"Events"</h1>
            <ConnBadge />
        </div>
        <section class="card filters events-filters">
            <div class="chips" role="group" aria-label="Event types">{chips}</div>
            <div class="row">
                <button class="btn small" on:click=move |_| shown_kinds.set(ALL_KINDS.iter().copied().collect())>"All types"</button>
                <button class="btn small" on:click=move |_| shown_kinds.set(HashSet::new())>"None"</button>
                <label class="inline">
                    "Key contains "
                    <input type="text" id="events-key" prop:value=move || key_filter.get() on:input=move |ev| key_filter.set(event_target_value(&ev)) />
                </label>
                <button id="pause" class="btn small" class:primary=move || paused.get() on:click=toggle_pause>
                    {move || if paused.get() { "Resume" } else { "Pause" }}
                </button>
                <button class="btn small" on:click=move |_| {
                    live.events.set(Default::default());
                    frozen.set(Vec::new());
                }>"Clear"</button>
            </div>
            <p class="muted small">
                {move || {
                    let n = live.events.with(|e| e.len());
                    let mut s = format!("{n} of the last {HISTORY} events kept");
                    if paused.get() {
                        let new = live.received.get().saturating_sub(paused_at.get());
                        s.push_str(&format!("; paused, {new} new since"));
                    }
                    if live.bad_events.get() > 0 {
                        s.push_str(&format!("; {} unreadable events skipped", live.bad_events.get()));
                    }
                    s
                }}
            </p>
        </section>
        <section class="card">
            {move || {
                let evs = visible();
                if evs.is_empty() {
                    let (title, hint) = match live.state.get() {
                        ConnState::Live if live.events.with(|e| e.is_empty()) => (
                            "Waiting for events.",
                            "Send a request with an Idempotency-Key through the gateway; it shows up here at once.",
                        ),
                        ConnState::Live => ("No event matches these filters.", "Select more event types or clear the key filter."),
                        ConnState::Off | ConnState::Connecting => ("Connecting to the event stream…", "This takes a moment."),
                        ConnState::Reconnecting => (
                            "The event stream is reconnecting.",
                            "The server may be restarting; the feed resumes where it stopped. If it stays like this, check the server.",
                        ),
                    };
                    view! { <Empty title hint /> }.into_any()
                } else {
                    view! { <EventTable evs /> }.into_any()
                }
            }}
        </section>
    }
}

#[component]
fn EventTable(evs: Vec<Event>) -> impl IntoView {
    view! {
        <div class="table-wrap">
            <table class="events" id="events-table">
                <thead>
                    <tr>
                        <th>"Time"</th>
                        <th>"What"</th>
                        <th>"Key"</th>
                        <th>"Scope"</th>
                        <th>"Route"</th>
                        <th class="num">"Status"</th>
                        <th>"Detail"</th>
                        <th>"By"</th>
                    </tr>
                </thead>
                <tbody>
                    <For each=move || evs.clone() key=|e| (e.id.clone(), e.at_ms, kind_name(e.kind)) let:e>
                        <EventRow e />
                    </For>
                </tbody>
            </table>
        </div>
    }
}

#[component]
fn EventRow(e: Event) -> impl IntoView {
    let key_cell = match (&e.scope, &e.key) {
        (Some(s), Some(k)) => {
            let href = detail_href(s, k);
            let text = k.clone();
            view! { <A href=href>{text}</A> }.into_any()
        }
        (None, Some(k)) => view! { <span>{k.clone()}</span> }.into_any(),
        _ => view! { <span class="muted">"–"</span> }.into_any(),
    };
    view! {
        <tr data-kind=kind_name(e.kind) data-key=e.key.clone().unwrap_or_default()>
            <td><Time ms=e.at_ms short=true /></td>
            <td><KindBadge kind=e.kind /></td>
            <td class="key">{key_cell}</td>
            <td class="mono" title=e.scope.clone().unwrap_or_default()>{e.scope.as_deref().map(short_scope).unwrap_or_default()}</td>
            <td>{e.route.clone().unwrap_or_default()}</td>
            <td class="num">{e.status.map(|s| s.to_string()).unwrap_or_default()}</td>
            <td class="wrap">{e.detail.clone().unwrap_or_default()}</td>
            <td>{e.actor.clone().unwrap_or_default()}</td>
        </tr>
    }
}
