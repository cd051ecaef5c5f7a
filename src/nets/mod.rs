//! candle network definitions, one network per file.

pub mod tf_ops;
