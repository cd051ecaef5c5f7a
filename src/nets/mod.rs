//! candle network definitions, one network per file.

pub mod backbone;
pub mod discriminator;
pub mod face_detector;
pub mod face_embedder;
pub mod generator;
pub mod inception;
pub mod landmarks68;
pub mod layers;
pub mod projected_discriminator;
pub mod segmenter;
pub mod tf_layers;
