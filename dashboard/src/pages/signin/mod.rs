//! Sign-in with the admin token.

use leptos::prelude::*;
use leptos::task::spawn_local;

use crate::api::{Api, ApiError};
use crate::core::session::use_session;

/// The sign-in page: the token is checked against the server before it is kept (in
/// `sessionStorage`, for this browser tab only).
#[component]
pub fn SignInPage() -> impl IntoView {
    let session = use_session();
    let api = Api::new(session);
    let token = RwSignal::new(String::new());
    let error = RwSignal::new(None::<String>);
    let busy = RwSignal::new(false);

    let submit = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        let t = token.get_untracked().trim().to_owned();
        if t.is_empty() {
            error.set(Some("Enter the admin token.".to_owned()));
            return;
        }
        busy.set(true);
        error.set(None);
        spawn_local(async move {
            let result = api.check_token(&t).await;
            let _ = busy.try_set(false);
            match result {
                Ok(()) => session.sign_in(t),
                Err(ApiError::Unauthorized) => {
                    let _ = error.try_set(Some(
                        "Wrong token: the server refused it (401). Use the admin token the server was started with — `cargo xtask demo` prints it; in production it comes from IDEMGATE_ADMIN_TOKEN or --admin-token-file.".to_owned(),
                    ));
                }
                Err(e) => {
                    let _ = error.try_set(Some(e.to_string()));
                }
            }
        });
    };

    view! {
        <main class="signin">
            <form class="card" on:submit=submit>
                <h1>"idemgate"</h1>
                <p class="muted">"Operator dashboard. Sign in with the admin token; it is kept for this browser tab only."</p>
                {move || session.notice.get().map(|n| view! { <p class="notice" id="signin-notice">{n}</p> })}
                <label for="token">"Admin token"</label>
                <input
                    id="token"
                    type="password"
                    autocomplete="current-password"
                    autofocus
                    prop:value=move || token.get()
                    on:input=move |ev| token.set(event_target_value(&ev))
                />
                {move || error.get().map(|e| view! { <p class="error" role="alert" id="signin-error">{e}</p> })}
                <button id="sign-in" class="btn primary" type="submit" disabled=move || busy.get()>
                    {move || if busy.get() { "Checking…" } else { "Sign in" }}
                </button>
            </form>
        </main>
    }
}
