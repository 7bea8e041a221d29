//! Keys: the record table with filters, cursor paging and live rows.

pub mod detail;

use std::time::Duration;

use idemgate_protocol::admin::{KeyListQuery, KeyPage, KeySummary};
use leptos::prelude::*;
use leptos_router::components::A;
use leptos_router::hooks::use_query_map;

use crate::api::{use_api, ApiError};
use crate::components::badges::StateBadge;
use crate::components::feedback::{Empty, ErrorPanel, Loading};
use crate::components::time::{use_now, Time};
use crate::core::live::use_live;
use crate::format::{
    encode_component, expires_in, parse_state, query_string, short_scope, state_name,
};
use crate::pages::overview::every;

/// Rows per page.
pub const PAGE_SIZE: u32 = 50;
/// Fallback refresh of the table when no event arrives, milliseconds.
pub const REFRESH_MS: u64 = 5_000;
/// Shortest gap between two event-driven refreshes, milliseconds.
pub const LIVE_THROTTLE_MS: u64 = 700;

/// Replaces the address bar's URL without navigating (the filters live in signals; the
/// URL only makes a reload or a shared link show the same filter).
fn replace_url(url: &str) {
    if let Some(h) = web_sys::window().and_then(|w| w.history().ok()) {
        let _ = h.replace_state_with_url(&wasm_bindgen::JsValue::NULL, "", Some(url));
    }
}

/// A filter a table cell can set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterField {
    /// The scope hash.
    Scope,
    /// The route name.
    Route,
}

/// Client route of a key's detail page. The key travels as base64url (`k=`): a key may
/// itself contain `%XX`, which a percent-encoded query value would let the router decode
/// a second time and so name another record.
pub fn detail_href(scope: &str, key: &str) -> String {
    format!(
        "/key?scope={}&k={}",
        encode_component(scope),
        crate::format::key_param(key)
    )
}

/// Calls `bump` at most once per `LIVE_THROTTLE_MS` while `trigger` keeps firing.
pub fn throttled(tick: RwSignal<u64>) -> impl Fn() + Copy + 'static {
    let pending = StoredValue::new(false);
    move || {
        if pending.try_get_value().unwrap_or(true) {
            return;
        }
        pending.set_value(true);
        set_timeout(
            move || {
                let _ = pending.try_update_value(|p| *p = false);
                let _ = tick.try_update(|t| *t += 1);
            },
            Duration::from_millis(LIVE_THROTTLE_MS),
        );
    }
}

/// The keys page.
#[component]
pub fn KeysPage() -> impl IntoView {
    let api = use_api();
    let live = use_live();
    // Form fields (initialised from the URL, e.g. `/keys?state=in_flight`), and the filter
    // applied to the listing.
    let url = use_query_map().get_untracked();
    let from_url = |name: &str| RwSignal::new(url.get(name).unwrap_or_default());
    let state = from_url("state");
    let route = from_url("route");
    let scope = from_url("scope");
    let prefix = from_url("prefix");
    let applied = RwSignal::new(KeyListQuery::default());
    // Cursors of the pages before the current one; the current cursor is the last.
    let cursors = RwSignal::new(Vec::<String>::new());
    let tick = RwSignal::new(0u64);
    every(REFRESH_MS, tick);
    let refresh = throttled(tick);
    // Any event about a key may change a row or add one: refresh (throttled).
    Effect::new(move |_| {
        if live
            .latest
            .with(|e| e.as_ref().is_some_and(|e| e.key.is_some()))
        {
            refresh();
        }
    });

    let page = LocalResource::new(move || {
        tick.track();
        let mut q = applied.get();
        q.cursor = cursors.with(|c| c.last().cloned());
        q.limit = Some(PAGE_SIZE);
        async move { api.keys(&q).await }
    });

    let apply = move || {
        let text = |s: RwSignal<String>| {
            let v = s.get_untracked().trim().to_owned();
            (!v.is_empty()).then_some(v)
        };
        let q = KeyListQuery {
            state: parse_state(&state.get_untracked()),
            route: text(route),
            scope: text(scope),
            prefix: text(prefix),
            ..KeyListQuery::default()
        };
        // Keep the URL in step, so a reload or a shared link shows the same filter.
        let qs = query_string(&[
            ("state", q.state.map(|s| state_name(s).to_owned())),
            ("route", q.route.clone()),
            ("scope", q.scope.clone()),
            ("prefix", q.prefix.clone()),
        ]);
        replace_url(&format!("/keys{qs}"));
        applied.set(q);
        cursors.set(Vec::new());
    };
    apply();
    // Clicking a scope or route in the table filters by it.
    let filter_by = Callback::new(move |(field, value): (FilterField, String)| {
        match field {
            FilterField::Scope => scope.set(value),
            FilterField::Route => route.set(value),
        }
        apply();
    });
    let clear = move |_| {
        for s in [state, route, scope, prefix] {
            s.set(String::new());
        }
        apply();
    };
    let filtered = move || applied.with(|q| *q != KeyListQuery::default());

    view! {
        <h1>"Keys"</h1>
        <form
            class="filters card"
            id="key-filters"
            on:submit=move |ev| {
                ev.prevent_default();
                apply();
            }
        >
            <label>
                "State"
                <select
                    id="filter-state"
                    prop:value=move || state.get()
                    on:change=move |ev| {
                        state.set(event_target_value(&ev));
                        apply();
                    }
                >
                    <option value="">"any"</option>
                    <option value="in_flight">"in flight"</option>
                    <option value="completed">"completed"</option>
                    <option value="unknown">"outcome unknown"</option>
                </select>
            </label>
            <label>
                "Route"
                <input id="filter-route" type="text" placeholder="payments" prop:value=move || route.get() on:input=move |ev| route.set(event_target_value(&ev)) />
            </label>
            <label>
                "Scope hash"
                <input id="filter-scope" type="text" placeholder="global or 64 hex" prop:value=move || scope.get() on:input=move |ev| scope.set(event_target_value(&ev)) />
            </label>
            <label>
                "Key prefix"
                <input id="filter-prefix" type="text" placeholder="order-" prop:value=move || prefix.get() on:input=move |ev| prefix.set(event_target_value(&ev)) />
            </label>
            <div class="filter-actions">
                <button class="btn primary" type="submit" id="filter-apply">"Apply"</button>
                <button class="btn" type="button" on:click=clear>"Clear"</button>
            </div>
        </form>
        <section class="card">
            <Transition fallback=|| view! { <Loading text="Loading keys…" /> }>
                <ErrorBoundary fallback=|errors| view! { <ErrorPanel errors /> }>
                    {move || Suspend::new(async move {
                        let p = page.await?;
                        Ok::<_, ApiError>(view! { <KeyTable page=p cursors filtered=Signal::derive(filtered) filter_by /> })
                    })}
                </ErrorBoundary>
            </Transition>
        </section>
    }
}

#[component]
fn KeyTable(
    page: KeyPage,
    cursors: RwSignal<Vec<String>>,
    filtered: Signal<bool>,
    filter_by: Callback<(FilterField, String)>,
) -> impl IntoView {
    let now = use_now();
    let next = page.next_cursor.clone();
    let has_prev = cursors.with_untracked(|c| !c.is_empty());
    let page_no = cursors.with_untracked(Vec::len) + 1;
    if page.items.is_empty() {
        let (title, hint) = if filtered.get_untracked() {
            (
                "No record matches these filters.",
                "Clear the filters, or widen them (a key prefix is case-sensitive).",
            )
        } else if has_prev {
            ("This page is empty.", "Go back to the previous page.")
        } else {
            ("No idempotency records yet.", "Records appear here as soon as a request with an Idempotency-Key goes through the gateway (a POST or PATCH on a protected route).")
        };
        return view! {
            <Empty title hint />
            <Pager has_prev next=None cursors page_no />
        }
        .into_any();
    }
    // The server pages in store order; within a page, newest first keeps rows steady.
    let mut items = page.items;
    items.sort_by(|a, b| {
        b.created_ms
            .cmp(&a.created_ms)
            .then_with(|| a.key.cmp(&b.key))
    });
    let rows = items
        .into_iter()
        .map(|k| view! { <KeyRow k now filter_by /> })
        .collect_view();
    view! {
        <div class="table-wrap">
            <table id="keys-table" class="keys">
                <thead>
                    <tr>
                        <th>"Key"</th>
                        <th>"Scope"</th>
                        <th>"Route"</th>
                        <th>"State"</th>
                        <th class="num">"Status"</th>
                        <th>"Created"</th>
                        <th>"Expires"</th>
                        <th class="num">"Replays"</th>
                    </tr>
                </thead>
                <tbody>{rows}</tbody>
            </table>
        </div>
        <Pager has_prev next cursors page_no />
    }
    .into_any()
}

#[component]
fn KeyRow(
    k: KeySummary,
    now: RwSignal<u64>,
    filter_by: Callback<(FilterField, String)>,
) -> impl IntoView {
    let (scope_full, route_name) = (k.scope.clone(), k.route.clone());
    let href = detail_href(&k.scope, &k.key);
    let expires = k.expires_ms;
    let status = k
        .status
        .map(|s| s.to_string())
        .unwrap_or_else(|| "–".to_owned());
    let key_text = k.key.clone();
    view! {
        <tr data-key=k.key.clone() data-scope=k.scope.clone()>
            <td class="key">
                <A href=href>{key_text}</A>
                <div class="sub">{format!("{} {}", k.method, k.path)}</div>
            </td>
            <td class="mono">
                <button
                    class="link"
                    title=format!("{}: show only this scope", k.scope)
                    on:click=move |_| filter_by.run((FilterField::Scope, scope_full.clone()))
                >
                    {short_scope(&k.scope)}
                </button>
            </td>
            <td>
                <button
                    class="link"
                    title="Show only this route"
                    on:click=move |_| filter_by.run((FilterField::Route, route_name.clone()))
                >
                    {k.route.clone()}
                </button>
            </td>
            <td><StateBadge state=k.state /></td>
            <td class="num status">{status}</td>
            <td><Time ms=k.created_ms /></td>
            <td class="expires">{move || expires_in(expires, now.get())}</td>
            <td class="num replays">{k.replays.to_string()}</td>
        </tr>
    }
}

#[component]
fn Pager(
    has_prev: bool,
    next: Option<String>,
    cursors: RwSignal<Vec<String>>,
    page_no: usize,
) -> impl IntoView {
    let has_next = next.is_some();
    view! {
        <div class="pager">
            <button class="btn" id="page-first" disabled=!has_prev on:click=move |_| cursors.set(Vec::new())>"First"</button>
            <button class="btn" id="page-prev" disabled=!has_prev on:click=move |_| cursors.update(|c| { c.pop(); })>"Previous"</button>
            <span class="muted">{format!("Page {page_no}")}</span>
            <button
                class="btn"
                id="page-next"
                disabled=!has_next
                on:click=move |_| {
                    if let Some(n) = next.clone() {
                        cursors.update(|c| c.push(n));
                    }
                }
            >
                "Next"
            </button>
        </div>
    }
}
