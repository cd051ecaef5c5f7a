//! Test doubles shared by the bot and queue tests: a renderer that makes real PNGs, and a
//! fake Discord (REST + gateway + CDN) on 127.0.0.1.
#![allow(dead_code)]

pub mod discord;
pub mod renderer;
