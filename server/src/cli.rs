//! The operator CLI (filled in below).
