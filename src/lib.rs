//! toonbot: photos in, cartoon stickers and avatars out.

pub mod bench;
pub mod bot;
pub mod cartoon;
pub mod cli;
pub mod config;
pub mod face;
pub mod imageops;
pub mod jobs;
pub mod metrics;
pub mod nets;
pub mod rng;
pub mod store;
pub mod stylepack;
pub mod train;
