//! Reusable views.

pub mod badges;
pub mod charts;
pub mod confirm;
pub mod feedback;
pub mod time;
