//! toonbot: photos in, cartoon stickers and avatars out.

#![deny(missing_docs)]

pub mod bench;
pub mod bot;
pub mod cartoon;
pub mod cli;
pub mod config;
pub mod face;
pub mod imageops;
pub mod jobs;
pub mod kernels;
pub mod metrics;
pub mod nets;
pub mod rng;
pub mod store;
pub mod stylepack;
pub mod train;

/// Sets `RAYON_NUM_THREADS` to the physical core count (candle's default) when it is unset;
/// call it first thing in `main`, before any thread starts. candle reads the thread count
/// before every matrix product, and without the variable it counts the cores again from
/// `/proc/cpuinfo` each time: about 8 % of a CPU training step. The rayon pool then uses
/// the same count.
pub fn settle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", num_cpus::get_physical().to_string());
    }
}

/// The peak resident memory (`VmHWM`) of process `pid` (`"self"` for this one), in MiB,
/// from `/proc`; `None` where that cannot be read.
pub fn peak_memory_mib(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Lowercase hex SHA-256 of `bytes`: the identity of a photo or of a style's weights.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
