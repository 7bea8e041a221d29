//! Small labels: key states, event kinds, the connection state.

use idemgate_protocol::admin::{EventKind, KeyState};
use leptos::prelude::*;

use crate::core::live::{use_live, ConnState};
use crate::format::{kind_label, kind_name, kind_tone, state_label, state_name};

/// A key state as a coloured label.
#[component]
pub fn StateBadge(
    /// The state.
    state: KeyState,
) -> impl IntoView {
    let class = format!("badge state-{}", state_name(state));
    view! { <span class=class data-state=state_name(state)>{state_label(state)}</span> }
}

/// An event kind as a coloured label.
#[component]
pub fn KindBadge(
    /// The kind.
    kind: EventKind,
) -> impl IntoView {
    let class = format!("badge tone-{}", kind_tone(kind));
    view! { <span class=class data-kind=kind_name(kind)>{kind_label(kind)}</span> }
}

/// The live stream's connection state (header).
#[component]
pub fn ConnBadge() -> impl IntoView {
    let live = use_live();
    let class = move || {
        let s = live.state.get();
        format!("conn conn-{}", s.label())
    };
    let title = move || match live.state.get() {
        ConnState::Off => "Not connected to the event stream",
        ConnState::Connecting => "Connecting to the event stream",
        ConnState::Live => "Receiving live events",
        ConnState::Reconnecting => {
            "Connection lost: reconnecting; missed events are fetched on resume"
        }
    };
    view! {
        <span id="conn-state" class=class title=title data-state=move || live.state.get().label()>
            <span class="dot"></span>
            {move || live.state.get().label()}
        </span>
    }
}
