//! The bot with the real cartoon pipeline behind it (a random-weights style `test`), against
//! the fake Discord. Included with `#[path]` by the test files that need it (it uses
//! `common`).

use std::path::Path;
use std::sync::Arc;

use toonbot::bot::{self, BotConfig, RunningBot, Token};
use toonbot::cartoon::Cartoonizer;
use toonbot::jobs::CartoonRenderer;

use crate::common;
use crate::support::discord::FakeDiscord;

/// Installs style `test` under `dir/styles` and starts the bot, its database in `dir`, once
/// it has connected to the fake Discord.
pub async fn real_pipeline_bot(dir: &Path) -> (Arc<FakeDiscord>, RunningBot) {
    common::install_random_style(&dir.join("styles"), "test");
    let config = common::config_with_styles(&dir.join("styles"), "test");
    let cartoonizer = Cartoonizer::load(&config, &candle_core::Device::Cpu).unwrap();
    let renderer = CartoonRenderer::new(cartoonizer, config.limits.clone(), "test".into());
    let fake = FakeDiscord::start().await;
    let bot_config = BotConfig {
        database: dir.join("toonbot.sqlite").into(),
        allowed_cdn_hosts: vec!["127.0.0.1".into()],
        api_proxy: Some(fake.base.clone()),
        ..BotConfig::default()
    };
    let bot = bot::start(
        bot_config,
        Token::new("test-token"),
        Arc::new(renderer),
        None,
    )
    .await
    .unwrap();
    fake.wait_ready(1).await;
    (fake, bot)
}
