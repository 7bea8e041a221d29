//! The admin token, kept in `sessionStorage` only (gone when the browser tab closes).

use leptos::prelude::*;

/// `sessionStorage` key holding the admin token.
pub const TOKEN_KEY: &str = "idemgate.admin_token";

fn storage() -> Option<web_sys::Storage> {
    web_sys::window()?.session_storage().ok()?
}

/// The signed-in state, shared through context. Cheap to copy.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    /// The admin token; `None` when signed out.
    pub token: RwSignal<Option<String>>,
    /// Why the user was signed out (shown on the sign-in page), e.g. a refused token.
    pub notice: RwSignal<Option<String>>,
}

impl Session {
    /// Reads the token saved in `sessionStorage` (if any).
    pub fn load() -> Self {
        let saved = storage()
            .and_then(|s| s.get_item(TOKEN_KEY).ok().flatten())
            .filter(|t| !t.is_empty());
        Self {
            token: RwSignal::new(saved),
            notice: RwSignal::new(None),
        }
    }

    /// The current token, without tracking.
    pub fn token(&self) -> Option<String> {
        self.token.get_untracked()
    }

    /// Saves a token the server accepted.
    pub fn sign_in(&self, token: String) {
        if let Some(s) = storage() {
            // A browser that refuses storage keeps the token in memory only.
            let _ = s.set_item(TOKEN_KEY, &token);
        }
        self.notice.set(None);
        self.token.set(Some(token));
    }

    /// Forgets the token; `notice` says why (shown on the sign-in page).
    pub fn sign_out(&self, notice: Option<String>) {
        if let Some(s) = storage() {
            let _ = s.remove_item(TOKEN_KEY);
        }
        self.notice.set(notice);
        self.token.set(None);
    }
}

/// The [`Session`] from context (provided by [`crate::app::App`]); a fresh one loaded from
/// storage when missing.
pub fn use_session() -> Session {
    use_context::<Session>().unwrap_or_else(Session::load)
}
