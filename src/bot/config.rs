//! How the `[bot]` config section maps onto the job queue.

pub use crate::config::BotConfig;
use crate::jobs::QueueConfig;

impl BotConfig {
    /// The job queue's settings: capacity, per-user limit, workers and cache size.
    pub fn queue_config(&self) -> QueueConfig {
        QueueConfig {
            capacity: self.queue_capacity,
            per_user_limit: self.per_user_limit,
            workers: self.workers,
            cache_entries: self.cache_entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_section_gives_defaults_and_unknown_keys_are_errors() {
        let c: BotConfig = toml::from_str("").unwrap();
        assert_eq!(c, BotConfig::default());
        let c: BotConfig =
            toml::from_str("queue_capacity = 5\nallowed_cdn_hosts = [\"127.0.0.1\"]").unwrap();
        assert_eq!(c.queue_capacity, 5);
        assert_eq!(c.allowed_cdn_hosts, ["127.0.0.1"]);
        assert!(toml::from_str::<BotConfig>("token = \"x\"").is_err());
    }
}
