//! The app's core services: the signed-in session and the live event stream. The HTTP
//! client is [`crate::api`].

pub mod live;
pub mod session;
