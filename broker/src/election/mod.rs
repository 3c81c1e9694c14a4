//! The election logic, free of I/O: the lock [`record`] format and the per-election state
//! [`machine`]. The driver that connects them to lock backends and local parties lives in
//! [`crate::elections`].

pub mod machine;
pub mod record;
