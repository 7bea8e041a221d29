//! The app root: session, live stream and clock contexts, the sign-in gate, the page
//! shell (header, navigation, notices) and the client routes.

use std::time::Duration;

use leptos::prelude::*;
use leptos::task::spawn_local;
use leptos_router::components::{Route, Router, Routes, A};
use leptos_router::path;

use crate::api::Api;
use crate::components::badges::ConnBadge;
use crate::components::time::Clock;
use crate::core::live::Live;
use crate::core::session::Session;
use crate::pages::events::EventsPage;
use crate::pages::keys::detail::KeyDetailPage;
use crate::pages::keys::KeysPage;
use crate::pages::overview::OverviewPage;
use crate::pages::purge::BulkPurgePage;
use crate::pages::signin::SignInPage;

/// How many past events seed the feed when signing in.
pub const SEED_EVENTS: u32 = 200;

/// A one-line notice shown under the header (e.g. "Purged key k-1"); shared through
/// context.
#[derive(Debug, Clone, Copy)]
pub struct Flash(pub RwSignal<Option<String>>);

impl Flash {
    /// Shows `msg` for 10 seconds (or until replaced or dismissed).
    pub fn show(self, msg: impl Into<String>) {
        let msg = msg.into();
        self.0.set(Some(msg.clone()));
        let sig = self.0;
        set_timeout(
            move || {
                if sig.try_get_untracked().flatten().as_deref() == Some(msg.as_str()) {
                    let _ = sig.try_set(None);
                }
            },
            Duration::from_secs(10),
        );
    }
}

/// The [`Flash`] notice from context.
pub fn use_flash() -> Flash {
    use_context::<Flash>().unwrap_or_else(|| Flash(RwSignal::new(None)))
}

/// The dashboard.
#[component]
pub fn App() -> impl IntoView {
    let session = Session::load();
    provide_context(session);
    let live = Live::new();
    provide_context(live);
    provide_context(Clock::start());
    let flash = Flash(RwSignal::new(None));
    provide_context(flash);

    // Signed in: seed the feed with recent history, then stream from there on.
    // Signed out: close the stream.
    let api = Api::new(session);
    Effect::new(move |_| match session.token.get() {
        Some(token) => spawn_local(async move {
            if live.events.with_untracked(|e| e.is_empty()) {
                if let Ok(recent) = api.recent_events(None, None, SEED_EVENTS).await {
                    for ev in recent.into_iter().rev() {
                        live.push(ev, String::new());
                    }
                }
            }
            if session.token.get_untracked().as_deref() == Some(token.as_str()) {
                live.start(token);
            }
        }),
        None => live.stop(),
    });

    view! {
        <Router>
            <Show when=move || session.token.get().is_some() fallback=|| view! { <SignInPage /> }>
                <Shell />
            </Show>
        </Router>
    }
}

/// Header, navigation, notices and the routed page.
#[component]
fn Shell() -> impl IntoView {
    let session = use_context::<Session>().unwrap_or_else(Session::load);
    let flash = use_flash();
    view! {
        <header class="top">
            <a class="brand" href="/">"idemgate"</a>
            <nav>
                <A href="/" exact=true>"Overview"</A>
                <A href="/keys">"Keys"</A>
                <A href="/events">"Events"</A>
                <A href="/purge">"Bulk purge"</A>
            </nav>
            <div class="right">
                <ConnBadge />
                <button id="sign-out" class="btn small" on:click=move |_| session.sign_out(Some("Signed out.".to_owned()))>
                    "Sign out"
                </button>
            </div>
        </header>
        {move || {
            flash
                .0
                .get()
                .map(|msg| {
                    view! {
                        <div class="flash" role="status" id="flash">
                            <span>{msg}</span>
                            <button class="btn small" on:click=move |_| flash.0.set(None)>"Dismiss"</button>
                        </div>
                    }
                })
        }}
        <main>
            <Routes fallback=|| view! { <NotFound /> }>
                <Route path=path!("/") view=OverviewPage />
                <Route path=path!("/keys") view=KeysPage />
                <Route path=path!("/key") view=KeyDetailPage />
                <Route path=path!("/events") view=EventsPage />
                <Route path=path!("/purge") view=BulkPurgePage />
            </Routes>
        </main>
    }
}

#[component]
fn NotFound() -> impl IntoView {
    view! {
        <section class="empty">
            <h1>"No such page"</h1>
            <p>"Use the navigation above, or go to the " <a href="/">"overview"</a> "."</p>
        </section>
    }
}
