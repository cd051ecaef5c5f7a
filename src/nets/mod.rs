//! candle network definitions, one network per file.

pub mod backbone;
pub mod cpu_ops;
pub mod discriminator;
pub mod face_detector;
pub mod face_embedder;
pub mod generator;
pub mod inception;
pub mod landmarks68;
pub mod layers;
pub mod projected_discriminator;
pub mod segmenter;
pub mod tf_ops;
pub mod train_ops;
