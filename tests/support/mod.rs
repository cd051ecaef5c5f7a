//! Test doubles shared by the bot and queue tests: a renderer that makes real PNGs, a trainer
//! that writes real style folders, a fake Discord (REST + gateway + CDN) on 127.0.0.1, and a
//! harness running the bot against it.
#![allow(dead_code)]

pub mod discord;
pub mod harness;
pub mod memory;
pub mod renderer;
pub mod trainer;
