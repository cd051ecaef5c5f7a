//! candle network definitions, one network per file.

pub mod cpu_ops;
pub mod discriminator;
pub mod face_detector;
pub mod face_embedder;
pub mod generator;
pub mod inception;
pub mod landmarks68;
pub mod layers;
pub mod segmenter;
pub mod tf_ops;
pub mod train_ops;
