//! toonbot: photos in, cartoon stickers and avatars out.

pub mod cartoon;
pub mod cli;
pub mod config;
pub mod face;
pub mod imageops;
pub mod nets;
