//! The idemgate dashboard. Until the dashboard issue lands, the server serves a static
//! placeholder page (`server/assets/placeholder.html`) on the admin listener.
