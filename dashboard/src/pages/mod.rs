//! One module per area of the dashboard.

pub mod events;
pub mod keys;
pub mod overview;
pub mod purge;
pub mod signin;
