//! The inference pipeline: photo in, per-face cartoons, stickers and avatars out.

pub mod compose;
pub mod styles;
