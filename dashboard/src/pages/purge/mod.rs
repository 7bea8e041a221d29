//! Bulk purge by scope, route or key prefix: a dry run shows how many records match, then
//! the real run (confirmed, with the dry run's token) deletes them.

use idemgate_protocol::admin::{BulkPurgeOutcome, BulkPurgeRequest};
use leptos::prelude::*;
use leptos::task::spawn_local;

use crate::api::use_api;
use crate::components::confirm::Confirm;

/// What the dry run found, bound to the filter it ran with.
#[derive(Debug, Clone, PartialEq)]
struct DryRun {
    filter: BulkPurgeRequest,
    matched: u64,
    in_flight: u64,
    confirmation: String,
}

fn describe(f: &BulkPurgeRequest) -> String {
    let mut parts = Vec::new();
    if let Some(s) = &f.scope {
        parts.push(format!("scope {s}"));
    }
    if let Some(r) = &f.route {
        parts.push(format!("route {r}"));
    }
    if let Some(p) = &f.prefix {
        parts.push(format!("key prefix \"{p}\""));
    }
    parts.join(", ")
}

/// The bulk purge page.
#[component]
pub fn BulkPurgePage() -> impl IntoView {
    let api = use_api();
    let scope = RwSignal::new(String::new());
    let route = RwSignal::new(String::new());
    let prefix = RwSignal::new(String::new());
    let dry = RwSignal::new(None::<DryRun>);
    let result = RwSignal::new(None::<String>);
    let error = RwSignal::new(None::<String>);
    let busy = RwSignal::new(false);
    let dialog = RwSignal::new(false);

    let filter = move || {
        let text = |s: RwSignal<String>| {
            let v = s.get_untracked().trim().to_owned();
            (!v.is_empty()).then_some(v)
        };
        BulkPurgeRequest {
            scope: text(scope),
            route: text(route),
            prefix: text(prefix),
            dry_run: true,
            confirmation: None,
        }
    };
    // Any edit invalidates the dry run: the count must match what gets purged.
    let edited = move || {
        dry.set(None);
        result.set(None);
    };

    let count = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        let f = filter();
        error.set(None);
        result.set(None);
        if f.scope.is_none() && f.route.is_none() && f.prefix.is_none() {
            error.set(Some(
                "Give at least one of scope, route or key prefix.".to_owned(),
            ));
            return;
        }
        busy.set(true);
        spawn_local(async move {
            let r = api.bulk_purge(&f).await;
            let _ = busy.try_set(false);
            match r {
                Ok(BulkPurgeOutcome::DryRun {
                    matched,
                    in_flight,
                    confirmation,
                    ..
                }) => {
                    let _ = dry.try_set(Some(DryRun {
                        filter: f,
                        matched,
                        in_flight,
                        confirmation,
                    }));
                }
                Ok(BulkPurgeOutcome::Purged { .. }) => {
                    let _ = error.try_set(Some(
                        "The server purged instead of counting; check the server version."
                            .to_owned(),
                    ));
                }
                Err(e) => {
                    let _ = error.try_set(Some(e.to_string()));
                }
            }
        });
    };

    let on_confirm = Callback::new(move |()| {
        let Some(d) = dry.get_untracked() else {
            return;
        };
        let req = BulkPurgeRequest {
            dry_run: false,
            confirmation: Some(d.confirmation.clone()),
            ..d.filter.clone()
        };
        busy.set(true);
        spawn_local(async move {
            let r = api.bulk_purge(&req).await;
            let _ = busy.try_set(false);
            let _ = dry.try_set(None);
            match r {
                Ok(BulkPurgeOutcome::Purged {
                    purged,
                    skipped_in_flight,
                }) => {
                    let _ = result.try_set(Some(format!(
                        "Purged {purged} records matching {}; {skipped_in_flight} in flight left alone.",
                        describe(&d.filter)
                    )));
                }
                Ok(BulkPurgeOutcome::DryRun { .. }) => {
                    let _ = error.try_set(Some(
                        "The server only counted; run the count again.".to_owned(),
                    ));
                }
                Err(e) => {
                    let _ = error.try_set(Some(format!(
                        "{e} Run the count again: the confirmation may have expired."
                    )));
                }
            }
        });
    });

    let title = Signal::derive(|| "Purge these records?".to_owned());
    let message = Signal::derive(move || {
        dry.get()
            .map(|d| format!("Delete up to {} records matching {} (none claimed after the count, none in flight)? Their next requests execute again. This cannot be undone.", d.matched, describe(&d.filter)))
            .unwrap_or_default()
    });
    let confirm_label = Signal::derive(move || {
        dry.get()
            .map(|d| format!("Purge {} records", d.matched))
            .unwrap_or_default()
    });

    let field = move |id: &'static str,
                      label: &'static str,
                      hint: &'static str,
                      sig: RwSignal<String>| {
        view! {
            <label>
                {label}
                <input id=id type="text" placeholder=hint prop:value=move || sig.get() on:input=move |ev| {
                    sig.set(event_target_value(&ev));
                    edited();
                } />
            </label>
        }
    };

    view! {
        <h1>"Bulk purge"</h1>
        <p class="muted">"Delete many records at once. Filters combine with AND. First count what matches; the purge then deletes exactly that filter's records."</p>
        <form class="card filters" id="bulk-form" on:submit=count>
            {field("bulk-scope", "Scope hash", "global or 64 hex", scope)}
            {field("bulk-route", "Route", "payments", route)}
            {field("bulk-prefix", "Key prefix", "order-", prefix)}
            <div class="filter-actions">
                <button id="bulk-count" class="btn primary" type="submit" disabled=move || busy.get()>"Count matching records"</button>
            </div>
        </form>
        {move || error.get().map(|e| view! { <p class="error" role="alert" id="bulk-error">{e}</p> })}
        {move || dry.get().map(|d| {
            let n = d.matched;
            view! {
                <section class="card" id="bulk-dry-run">
                    <p><strong id="bulk-matched">{n.to_string()}</strong> {format!(" records match {}.", describe(&d.filter))}</p>
                    <p class="muted">{format!("{} in flight: a purge leaves those alone (their request may still run upstream; release a stuck lock from its key page).", d.in_flight)}</p>
                    {if n == 0 {
                        view! { <p class="muted">"Nothing to purge. Check the filter (scope is the hash shown on the Keys page, not the raw header)."</p> }.into_any()
                    } else {
                        view! { <button id="bulk-purge" class="btn danger" disabled=move || busy.get() on:click=move |_| dialog.set(true)>{format!("Purge {n} records…")}</button> }.into_any()
                    }}
                </section>
            }
        })}
        {move || result.get().map(|r| view! { <p class="flash" role="status" id="bulk-result">{r}</p> })}
        <Confirm open=dialog title message confirm_label on_confirm />
    }
}
