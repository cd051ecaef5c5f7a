//! CPU kernels and tensor operations the networks in [`crate::nets`] are built from, apart
//! from the network definitions. Each is tested against candle's own op (or PyTorch's
//! values) in its file; none of them depends on a network.
//!
//! - [`cpu_ops`]: fused inference fast paths on NCHW `f32` (convolutions with their padding,
//!   norms and activations folded in; pools; affine).
//! - [`train_ops`]: training-time operations with gradients (im2col + GEMM convolution and
//!   its backward, instance norm, frozen depthwise convolution, reflection padding).
//! - [`tf_ops`]: operations with TensorFlow's semantics for the imported TF Lite / TF.js
//!   networks (`SAME` padding, depthwise as shifted views, PReLU, legacy bilinear resize).

pub mod cpu_ops;
pub mod tf_ops;
pub mod train_ops;
