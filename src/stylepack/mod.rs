//! Style packs: a server admin's archive of cartoon faces becomes a style of that server.
//!
//! [`archive::read_pack`] checks an uploaded archive without trusting it.

pub mod archive;
