//! candle network definitions, one network per file.

pub mod face_detector;
pub mod face_embedder;
pub mod landmarks68;
pub mod segmenter;
pub mod tf_ops;
