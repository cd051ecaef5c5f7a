//! `Config::from_toml` on arbitrary TOML text and `TOONBOT_*` environment overrides: a config
//! or an error, never a panic; relative paths always end up under the config's folder.
//!
//! The input is the TOML text, then optionally a NUL and `KEY=value` lines, each becoming the
//! variable `TOONBOT_KEY`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use toonbot::config::Config;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (toml, env) = text.split_once('\0').unwrap_or((&text, ""));
    let env = env.lines().filter_map(|line| {
        let (key, value) = line.split_once('=')?;
        Some((format!("TOONBOT_{key}"), value.to_string()))
    });
    let base = Path::new("/etc/toonbot");
    if let Ok(config) = Config::from_toml(toml, base, env) {
        assert_eq!(config.bot.max_photo_bytes, config.limits.max_bytes);
        for path in [&config.models.dir, &config.styles.dir, &config.stylepacks.dir] {
            assert!(path.is_absolute(), "{path:?} resolved against {base:?}");
        }
    }
});
