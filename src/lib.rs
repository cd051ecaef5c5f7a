//! toonbot: photos in, cartoon stickers and avatars out.

pub mod config;
pub mod imageops;
pub mod nets;
