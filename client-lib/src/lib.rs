//! elector client library.

pub mod codec;
pub mod protocol;
