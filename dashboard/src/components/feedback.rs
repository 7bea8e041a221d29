//! Loading, empty and error states.

use leptos::prelude::*;

/// A placeholder while data loads.
#[component]
pub fn Loading(
    /// What is loading.
    #[prop(into, default = "Loading…".into())]
    text: String,
) -> impl IntoView {
    view! { <p class="loading" aria-busy="true">{text}</p> }
}

/// The fallback of an `ErrorBoundary`: every error, with what to do.
#[component]
pub fn ErrorPanel(
    /// Errors caught by the boundary.
    errors: ArcRwSignal<Errors>,
) -> impl IntoView {
    view! {
        <div class="error" role="alert">
            <strong>"Could not load this view."</strong>
            <ul>
                {move || {
                    errors
                        .get()
                        .into_iter()
                        .map(|(_, e)| view! { <li>{e.to_string()}</li> })
                        .collect_view()
                }}
            </ul>
            <p class="hint">"It refreshes on its own; if the problem stays, check the server log."</p>
        </div>
    }
}

/// A message for an empty list, with a hint on what to do.
#[component]
pub fn Empty(
    /// What is empty.
    #[prop(into)]
    title: String,
    /// What to do about it.
    #[prop(into)]
    hint: String,
) -> impl IntoView {
    view! {
        <div class="empty">
            <strong>{title}</strong>
            <p>{hint}</p>
        </div>
    }
}
