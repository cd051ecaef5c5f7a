//! A bot under test: the real serenity client against the fake Discord, with the test
//! renderer (and optionally style packs), restartable on the same database.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use toonbot::bot::{self, BotConfig, RunningBot, Token};
use toonbot::stylepack::PackSetup;

use super::discord::{FakeDiscord, Recorded, APP_ID, PERM_ALL_TEXT};
use super::renderer::TestRenderer;

/// How long any one expected request may take.
pub const T: Duration = Duration::from_secs(10);
pub const EPHEMERAL: u64 = 64;
/// A member without special permissions.
pub const MEMBER: Option<u64> = Some(PERM_ALL_TEXT);

pub struct Harness {
    pub fake: Arc<FakeDiscord>,
    pub renderer: Arc<TestRenderer>,
    pub config: BotConfig,
    /// Style packs, for each start of the bot.
    pub stylepacks: Option<PackSetup>,
    bot: Option<RunningBot>,
    readies: u64,
    pub dir: tempfile::TempDir,
}

impl Harness {
    /// A bot with the test renderer and no style packs, its database in a new folder.
    pub async fn new(tweak: impl FnOnce(&mut BotConfig)) -> Self {
        Self::start_with(
            tempfile::tempdir().unwrap(),
            TestRenderer::new(),
            None,
            tweak,
        )
        .await
    }

    /// A bot with its database in `dir`, and the given renderer and style packs.
    pub async fn start_with(
        dir: tempfile::TempDir,
        renderer: TestRenderer,
        stylepacks: Option<PackSetup>,
        tweak: impl FnOnce(&mut BotConfig),
    ) -> Self {
        let fake = FakeDiscord::start().await;
        let mut config = BotConfig {
            database: dir.path().join("toonbot.sqlite").into(),
            allowed_cdn_hosts: vec!["127.0.0.1".into()],
            api_proxy: Some(fake.base.clone()),
            max_photo_bytes: 100_000,
            progress_interval_ms: 20,
            ..BotConfig::default()
        };
        tweak(&mut config);
        let mut h = Self {
            fake,
            renderer: Arc::new(renderer),
            config,
            stylepacks,
            bot: None,
            readies: 0,
            dir,
        };
        h.start().await;
        h
    }

    /// Starts a bot instance (again) on the same database and fake Discord.
    pub async fn start(&mut self) {
        let renderer = Arc::clone(&self.renderer) as Arc<dyn toonbot::jobs::Renderer>;
        let bot = bot::start(
            self.config.clone(),
            Token::new("test-token"),
            renderer,
            self.stylepacks.clone(),
        )
        .await
        .unwrap();
        self.bot = Some(bot);
        self.readies += 1;
        self.fake.wait_ready(self.readies).await;
        let n = self.readies as usize;
        // Commands registered once per READY.
        let deadline = tokio::time::Instant::now() + T;
        while self
            .fake
            .requests()
            .iter()
            .filter(|r| r.is("PUT", &format!("/applications/{APP_ID}/commands")))
            .count()
            < n
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "commands registered"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn stop(&mut self) {
        self.bot.take().unwrap().shutdown().await;
    }

    pub fn bot(&self) -> &RunningBot {
        self.bot.as_ref().unwrap()
    }

    /// Injects `/cartoon` with a hosted photo; returns the interaction token.
    pub fn cartoon(
        &self,
        user: u64,
        image: Vec<u8>,
        style: Option<&str>,
        output: Option<&str>,
    ) -> String {
        let attachment = self.fake.attachment("photo.png", "image/png", image, None);
        self.cartoon_with(user, attachment, style, output)
    }

    pub fn cartoon_with(
        &self,
        user: u64,
        attachment: Value,
        style: Option<&str>,
        output: Option<&str>,
    ) -> String {
        let token = format!("tok{}", self.fake.next_id());
        let data = FakeDiscord::cartoon_data(&attachment, style, output);
        self.fake.dispatch(
            "INTERACTION_CREATE",
            self.fake.command(&token, user, MEMBER, data),
        );
        token
    }

    pub fn command(&self, user: u64, member: Option<u64>, data: Value) -> String {
        let token = format!("tok{}", self.fake.next_id());
        self.fake.dispatch(
            "INTERACTION_CREATE",
            self.fake.command(&token, user, member, data),
        );
        token
    }

    pub async fn wait(&self, what: &str, pred: impl Fn(&Recorded) -> bool) -> Recorded {
        self.fake.wait_for(what, T, pred).await
    }

    /// The user's latest job, once it has ended (it is recorded after the reply is sent).
    pub async fn finished_job(&self, user: u64) -> toonbot::store::JobRecord {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let job = self.bot().store().recent_jobs(user, 1).await.unwrap().pop();
            if let Some(job) = job.filter(|j| j.finished_at.is_some()) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the job ended in time"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The interaction's callback (its first answer).
    pub async fn callback(&self, token: &str) -> Recorded {
        self.wait("the interaction callback", |r| {
            r.method == "POST" && r.path.ends_with(&format!("/{token}/callback"))
        })
        .await
    }

    /// The edit of the original response that carries files.
    pub async fn result(&self, token: &str) -> Recorded {
        let path = format!("/webhooks/{APP_ID}/{token}/messages/@original");
        self.wait("the results", |r| {
            r.is("PATCH", &path) && !r.files.is_empty()
        })
        .await
    }

    /// An ephemeral follow-up (an error after the deferral).
    pub async fn ephemeral_followup(&self, token: &str) -> Recorded {
        let path = format!("/webhooks/{APP_ID}/{token}");
        self.wait("an ephemeral follow-up", |r| r.is("POST", &path))
            .await
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.renderer.open_gate();
    }
}

/// Decodes a PNG part: (width, height, has alpha).
pub fn png_info(bytes: &[u8]) -> (u32, u32, bool) {
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    let img =
        image::load_from_memory_with_format(bytes, image::ImageFormat::Png).expect("a valid PNG");
    (img.width(), img.height(), img.color().has_alpha())
}

/// Asserts an immediate ephemeral answer (no deferral) containing `needle`.
pub async fn assert_immediate_ephemeral(h: &Harness, token: &str, needle: &str) {
    let cb = h.callback(token).await;
    assert_eq!(cb.callback_type(), Some(4), "answered at once");
    assert_eq!(cb.flags() & EPHEMERAL, EPHEMERAL, "ephemeral");
    assert!(
        cb.content().contains(needle),
        "{:?} in {:?}",
        needle,
        cb.content()
    );
}

/// Asserts a deferral followed by the public response's deletion and an ephemeral follow-up.
pub async fn assert_late_ephemeral(h: &Harness, token: &str, needle: &str) {
    assert_eq!(h.callback(token).await.callback_type(), Some(5));
    let followup = h.ephemeral_followup(token).await;
    assert_eq!(followup.flags() & EPHEMERAL, EPHEMERAL, "ephemeral");
    assert!(
        followup.content().contains(needle),
        "{:?} in {:?}",
        needle,
        followup.content()
    );
    let original = format!("/webhooks/{APP_ID}/{token}/messages/@original");
    assert!(
        h.fake.requests().iter().any(|r| r.is("DELETE", &original)),
        "the public 'thinking' reply is removed"
    );
    assert!(!h
        .fake
        .requests()
        .iter()
        .any(|r| r.is("PATCH", &original) && !r.files.is_empty()));
}
