//! elector client library.

pub mod protocol;
