//! A confirmation dialog for destructive actions; it names what will be affected.

use leptos::prelude::*;

/// A modal confirmation. Shown while `open` is true; "Cancel" (or Escape) closes it,
/// the confirm button runs `on_confirm` and closes it.
#[component]
pub fn Confirm(
    /// Whether the dialog is shown.
    open: RwSignal<bool>,
    /// Dialog title, e.g. "Purge key?".
    #[prop(into)]
    title: Signal<String>,
    /// The text: what exactly happens (names the key).
    #[prop(into)]
    message: Signal<String>,
    /// Label of the confirm button.
    #[prop(into)]
    confirm_label: Signal<String>,
    /// Runs when confirmed.
    on_confirm: Callback<()>,
) -> impl IntoView {
    view! {
        <Show when=move || open.get()>
            <div
                class="modal-backdrop"
                on:keydown=move |ev| {
                    if ev.key() == "Escape" {
                        open.set(false);
                    }
                }
            >
                <div class="modal" role="dialog" aria-modal="true" aria-labelledby="confirm-title" id="confirm-dialog">
                    <h2 id="confirm-title">{move || title.get()}</h2>
                    <p class="confirm-message">{move || message.get()}</p>
                    <div class="actions">
                        <button id="confirm-cancel" class="btn" on:click=move |_| open.set(false) autofocus>
                            "Cancel"
                        </button>
                        <button
                            id="confirm-ok"
                            class="btn danger"
                            on:click=move |_| {
                                open.set(false);
                                on_confirm.run(());
                            }
                        >
                            {move || confirm_label.get()}
                        </button>
                    </div>
                </div>
            </div>
        </Show>
    }
}
