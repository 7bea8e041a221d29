//! The live event stream (`GET /api/events`, server-sent events) shared by every page.
//!
//! One `EventSource` per signed-in tab. Events arrive as named SSE events (`event:
//! <kind>`), so a listener is registered per [`EventKind`]. The last stream id seen is
//! kept: the browser's own reconnects send it as `Last-Event-ID`, and when the browser
//! gives up (the connection is closed, e.g. the server answered an error while restarting)
//! the stream is reopened with backoff and `?last_event_id=`, so nothing is missed or shown
//! twice. The connection state is visible in the header.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::time::Duration;

use idemgate_protocol::admin::Event;
use leptos::prelude::*;
use wasm_bindgen::closure::Closure;
use wasm_bindgen::JsCast as _;

use crate::api::events_url;
use crate::format::{kind_name, stream_id_cmp, ALL_KINDS};

/// How many events the feed keeps (newest first); older ones are dropped.
pub const HISTORY: usize = 500;
/// Longest wait between two reconnection attempts, milliseconds.
pub const MAX_BACKOFF_MS: u64 = 10_000;

/// State of the live connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Not signed in.
    Off,
    /// First connection in progress.
    Connecting,
    /// Receiving events.
    Live,
    /// Lost; trying again.
    Reconnecting,
}

impl ConnState {
    /// Label shown in the header.
    pub fn label(self) -> &'static str {
        match self {
            ConnState::Off => "offline",
            ConnState::Connecting => "connecting",
            ConnState::Live => "live",
            ConnState::Reconnecting => "reconnecting",
        }
    }
}

/// The live stream's state and history, shared through context. Cheap to copy.
#[derive(Debug, Clone, Copy)]
pub struct Live {
    /// Connection state.
    pub state: RwSignal<ConnState>,
    /// The last [`HISTORY`] events, newest first.
    pub events: RwSignal<VecDeque<Event>>,
    /// Events received since the page loaded.
    pub received: RwSignal<u64>,
    /// The newest event (pages react to it to refresh what they show).
    pub latest: RwSignal<Option<Event>>,
    /// Stream id of the newest event, for resuming.
    pub last_id: RwSignal<Option<String>>,
    /// Events whose data could not be read.
    pub bad_events: RwSignal<u64>,
}

impl Default for Live {
    fn default() -> Self {
        Self::new()
    }
}

struct Conn {
    source: web_sys::EventSource,
    _listeners: Vec<Closure<dyn FnMut(web_sys::Event)>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.source.close();
    }
}

thread_local! {
    static CONN: RefCell<Option<Conn>> = const { RefCell::new(None) };
    /// Bumped by every start/stop: timers of an older generation do nothing.
    static GENERATION: Cell<u64> = const { Cell::new(0) };
    static ATTEMPT: Cell<u32> = const { Cell::new(0) };
}

impl Live {
    /// An idle stream (call [`Live::start`] once signed in).
    pub fn new() -> Self {
        Self {
            state: RwSignal::new(ConnState::Off),
            events: RwSignal::new(VecDeque::new()),
            received: RwSignal::new(0),
            latest: RwSignal::new(None),
            last_id: RwSignal::new(None),
            bad_events: RwSignal::new(0),
        }
    }

    /// (Re)connects with `token`, resuming after the last event seen.
    pub fn start(self, token: String) {
        let generation = GENERATION.with(|g| {
            g.set(g.get() + 1);
            g.get()
        });
        ATTEMPT.with(|a| a.set(0));
        self.state.set(ConnState::Connecting);
        self.open(token, generation);
    }

    /// Closes the stream (sign-out).
    pub fn stop(self) {
        GENERATION.with(|g| g.set(g.get() + 1));
        // Dropped from a signal effect, never from inside one of the stream's listeners.
        let old = CONN.with(|c| c.borrow_mut().take());
        drop(old);
        self.state.set(ConnState::Off);
    }

    /// Adds one event unless it was seen already (resumes may overlap).
    pub fn push(self, mut event: Event, fallback_id: String) {
        if event.id.is_empty() {
            event.id = fallback_id;
        }
        if !event.id.is_empty() {
            let seen = self.last_id.with_untracked(|last| {
                last.as_deref()
                    .is_some_and(|l| stream_id_cmp(&event.id, l).is_le())
            });
            if seen {
                return;
            }
            self.last_id.set(Some(event.id.clone()));
        }
        self.events.update(|evs| {
            evs.push_front(event.clone());
            evs.truncate(HISTORY);
        });
        self.received.update(|n| *n += 1);
        self.latest.set(Some(event));
    }

    fn current(generation: u64) -> bool {
        GENERATION.with(|g| g.get()) == generation
    }

    fn schedule_reconnect(self, token: String, generation: u64) {
        let attempt = ATTEMPT.with(|a| {
            let n = a.get();
            a.set(n.saturating_add(1));
            n
        });
        let delay_ms = 1_000u64
            .saturating_mul(1u64 << attempt.min(4))
            .min(MAX_BACKOFF_MS);
        self.state.set(ConnState::Reconnecting);
        set_timeout(
            move || {
                if Self::current(generation) {
                    self.open(token, generation);
                }
            },
            Duration::from_millis(delay_ms),
        );
    }

    fn open(self, token: String, generation: u64) {
        // Replacing the connection drops the old listeners; this runs from a timer or an
        // effect, never from inside one of those listeners.
        let old = CONN.with(|c| c.borrow_mut().take());
        drop(old);
        let url = events_url(&token, self.last_id.get_untracked().as_deref());
        let source = match web_sys::EventSource::new(&url) {
            Ok(s) => s,
            Err(_) => {
                self.schedule_reconnect(token, generation);
                return;
            }
        };
        let mut listeners: Vec<Closure<dyn FnMut(web_sys::Event)>> = Vec::new();

        let on_open = Closure::<dyn FnMut(web_sys::Event)>::new(move |_: web_sys::Event| {
            if Self::current(generation) {
                ATTEMPT.with(|a| a.set(0));
                self.state.set(ConnState::Live);
            }
        });
        let _ = source.add_event_listener_with_callback("open", on_open.as_ref().unchecked_ref());
        listeners.push(on_open);

        let es = source.clone();
        let on_error = Closure::<dyn FnMut(web_sys::Event)>::new(move |_: web_sys::Event| {
            if !Self::current(generation) {
                return;
            }
            if es.ready_state() == web_sys::EventSource::CLOSED {
                // The browser gave up (an error status, e.g. while the server restarts):
                // reopen ourselves with backoff, resuming from the last id.
                es.close();
                self.schedule_reconnect(token.clone(), generation);
            } else {
                // The browser retries on its own and sends Last-Event-ID.
                self.state.set(ConnState::Reconnecting);
            }
        });
        let _ = source.add_event_listener_with_callback("error", on_error.as_ref().unchecked_ref());
        listeners.push(on_error);

        let names = ALL_KINDS
            .iter()
            .map(|k| kind_name(*k))
            .chain(std::iter::once("message".to_owned()));
        for name in names {
            let on_event = Closure::<dyn FnMut(web_sys::Event)>::new(move |ev: web_sys::Event| {
                if !Self::current(generation) {
                    return;
                }
                let Some(msg) = ev.dyn_ref::<web_sys::MessageEvent>() else {
                    return;
                };
                let data = msg.data().as_string().unwrap_or_default();
                match serde_json::from_str::<Event>(&data) {
                    Ok(event) => self.push(event, msg.last_event_id()),
                    Err(_) => self.bad_events.update(|n| *n += 1),
                }
            });
            let _ =
                source.add_event_listener_with_callback(&name, on_event.as_ref().unchecked_ref());
            listeners.push(on_event);
        }
        CONN.with(|c| {
            *c.borrow_mut() = Some(Conn {
                source,
                _listeners: listeners,
            });
        });
    }
}

/// The [`Live`] stream from context (provided by [`crate::app::App`]).
pub fn use_live() -> Live {
    use_context::<Live>().unwrap_or_default()
}
