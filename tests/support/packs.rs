//! Style packs against the real bot: a [`Packs`] harness (the bot with style packs, the real
//! face pipeline preparing them, a test trainer) and pack archives to upload. Included with
//! `#[path]` by the test files that need it.
#![allow(dead_code)]

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use image::{Rgb, RgbImage};
use serde_json::{json, Value};
use toonbot::cartoon::styles::StyleRegistry;
use toonbot::config::StylePackConfig;
use toonbot::face::FacePipeline;
use toonbot::stylepack::PackSetup;
use zip::write::SimpleFileOptions;

use crate::common;
use crate::support;
use crate::support::discord::{
    FakeDiscord, Recorded, CHANNEL_ID, GUILD_ID, PERM_ALL_TEXT, PERM_MANAGE_GUILD,
};
use crate::support::harness::{Harness, EPHEMERAL};
use crate::support::trainer::TestTrainer;

pub const ADMIN: u64 = 6000;
pub const USER: u64 = 6001;
pub const ADMIN_PERMS: Option<u64> = Some(PERM_ALL_TEXT | PERM_MANAGE_GUILD);
pub const STEPS: u32 = 6;
pub const PREVIEW_EVERY: u32 = 2;
/// Preparing a pack runs the face pipeline on every image; training steps are short.
pub const SLOW: Duration = Duration::from_secs(60);

/// The face pipeline, loaded once for all tests.
pub fn faces() -> Arc<FacePipeline> {
    static FACES: OnceLock<Arc<FacePipeline>> = OnceLock::new();
    FACES
        .get_or_init(|| {
            let config = common::config_with_styles(Path::new("unused"), "classic");
            Arc::new(FacePipeline::load(&config, &candle_core::Device::Cpu).unwrap())
        })
        .clone()
}

pub fn pack_config(dir: &Path) -> StylePackConfig {
    StylePackConfig {
        dir: dir.join("packs"),
        max_zip_bytes: 5_000_000,
        max_entry_bytes: 1_000_000,
        max_total_bytes: 10_000_000,
        max_image_pixels: 1024 * 1024,
        steps: STEPS,
        preview_every: PREVIEW_EVERY,
        // The drawn test faces are too plain for the face detector to find in most of them;
        // the landscape test sets the share back.
        min_face_share: 0.0,
        ..StylePackConfig::default()
    }
}

pub struct Packs {
    pub h: Harness,
    pub trainer: Arc<TestTrainer>,
}

impl Packs {
    /// A bot with style packs: the base style `classic` (random generator weights) shipped,
    /// trained styles in `<dir>/styles`, which the renderer also draws with.
    pub async fn start(
        trainer: TestTrainer,
        tweak: impl FnOnce(&mut toonbot::bot::BotConfig),
    ) -> Self {
        Self::start_with_packs(trainer, |_| {}, tweak).await
    }

    /// [`Packs::start`] with `packs` changing the `[stylepacks]` settings.
    pub async fn start_with_packs(
        trainer: TestTrainer,
        packs: impl FnOnce(&mut StylePackConfig),
        tweak: impl FnOnce(&mut toonbot::bot::BotConfig),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        common::install_random_style(&dir.path().join("shipped"), "classic");
        let trainer = Arc::new(trainer);
        let mut config = pack_config(dir.path());
        packs(&mut config);
        let h = Self::harness(dir, config, Arc::clone(&trainer) as _, tweak).await;
        Self { h, trainer }
    }

    /// A bot whose packs train with `trainer`, from the styles in `<dir>/shipped`.
    pub async fn harness(
        dir: tempfile::TempDir,
        config: StylePackConfig,
        trainer: Arc<dyn toonbot::stylepack::StyleTrainer>,
        tweak: impl FnOnce(&mut toonbot::bot::BotConfig),
    ) -> Harness {
        let trained = dir.path().join("styles");
        let setup = PackSetup {
            config,
            registry: StyleRegistry::new(dir.path().join("shipped"), &trained),
            default_base: "classic".into(),
            faces: faces(),
            trainer: Some(trainer),
        };
        let renderer = support::renderer::TestRenderer::with_styles_dir(&trained);
        Harness::start_with(dir, renderer, Some(setup), tweak).await
    }

    pub fn packs_dir(&self) -> PathBuf {
        self.h.dir.path().join("packs")
    }

    pub fn trained_dir(&self) -> PathBuf {
        self.h.dir.path().join("styles")
    }

    /// `/stylepack upload file:<zip> name:<name> [base]`; returns the interaction token.
    pub fn upload(
        &self,
        perms: Option<u64>,
        zip: Vec<u8>,
        name: &str,
        base: Option<&str>,
    ) -> String {
        let interaction = self.upload_interaction(perms, zip, name, base);
        let token = interaction["token"].as_str().unwrap().to_string();
        self.h.fake.dispatch("INTERACTION_CREATE", interaction);
        token
    }

    pub fn upload_interaction(
        &self,
        perms: Option<u64>,
        zip: Vec<u8>,
        name: &str,
        base: Option<&str>,
    ) -> Value {
        upload_interaction(&self.h.fake, perms, zip, name, base)
    }

    /// `/stylepack <sub> [name]` by the admin; returns the interaction token.
    pub fn admin(&self, sub: &str, name: Option<&str>) -> String {
        let options = match name {
            Some(n) => json!([{ "name": "name", "type": 3, "value": n }]),
            None => json!([]),
        };
        self.h.command(
            ADMIN,
            ADMIN_PERMS,
            FakeDiscord::sub_command_data("stylepack", sub, options),
        )
    }

    /// The final answer to an upload: the edit of its ephemeral deferral, or an immediate
    /// ephemeral answer.
    pub async fn upload_answer(&self, token: &str, needle: &str) -> String {
        let cb = self.h.callback(token).await;
        assert_eq!(cb.flags() & EPHEMERAL, EPHEMERAL, "ephemeral");
        if cb.callback_type() == Some(4) {
            assert!(
                cb.content().contains(needle),
                "{needle:?} in {:?}",
                cb.content()
            );
            return cb.content();
        }
        assert_eq!(cb.callback_type(), Some(5));
        let original = format!(
            "/webhooks/{}/{token}/messages/@original",
            support::discord::APP_ID
        );
        let answer = self
            .h
            .fake
            .wait_for("the upload's answer", SLOW, |r| {
                r.is("PATCH", &original) && r.content().contains(needle)
            })
            .await;
        answer.content()
    }

    /// Files under the packs folder and rows about packs.
    pub async fn leftovers(&self) -> (Vec<PathBuf>, usize, usize) {
        let files = walk(&self.packs_dir());
        let store = self.h.bot().store();
        let packs = store.guild_styles(GUILD_ID).await.unwrap().len();
        let audit = store.audit_log(GUILD_ID).await.unwrap().len();
        (files, packs, audit)
    }

    pub async fn assert_nothing_left(&self) {
        assert_eq!(self.leftovers().await, (vec![], 0, 0), "no files, no rows");
        assert!(self.trainer.starts().is_empty(), "no training started");
    }

    /// The progress edits and messages the bot posted in the channel.
    pub fn channel_posts(&self) -> Vec<Recorded> {
        let messages = format!("/channels/{CHANNEL_ID}/messages");
        self.h
            .fake
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with(&messages))
            .collect()
    }

    pub async fn wait_post(&self, what: &str, pred: impl Fn(&Recorded) -> bool) -> Recorded {
        let messages = format!("/channels/{CHANNEL_ID}/messages");
        self.h
            .fake
            .wait_for(what, SLOW, |r| r.path.starts_with(&messages) && pred(r))
            .await
    }
}

/// `/stylepack upload file:<zip> name:<name> [base]` by the admin, with `perms`.
pub fn upload_interaction(
    fake: &FakeDiscord,
    perms: Option<u64>,
    zip: Vec<u8>,
    name: &str,
    base: Option<&str>,
) -> Value {
    let attachment = fake.attachment("pack.zip", "application/zip", zip, None);
    let id = attachment["id"].as_str().unwrap().to_string();
    let mut options = vec![
        json!({ "name": "file", "type": 11, "value": id }),
        json!({ "name": "name", "type": 3, "value": name }),
    ];
    if let Some(base) = base {
        options.push(json!({ "name": "base", "type": 3, "value": base }));
    }
    let data = json!({
        "id": "905", "name": "stylepack", "type": 1,
        "options": [{ "name": "upload", "type": 1, "options": options }],
        "resolved": { "attachments": { id.clone(): attachment } },
    });
    let token = format!("tok{}", fake.next_id());
    fake.command(&token, ADMIN, perms, data)
}

/// Every file under `dir` (none when it is absent).
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.push(path.clone());
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// A cartoon-ish face: a coloured disc with two eyes on white.
pub fn cartoon(i: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(96, 96, |x, y| {
        let (dx, dy) = (x as f32 - 48.0, y as f32 - 50.0);
        let eye = |ex: f32| ((x as f32 - ex).powi(2) + (y as f32 - 40.0).powi(2)) < 16.0;
        if eye(36.0) || eye(60.0) {
            Rgb([20, 20, 20])
        } else if dx * dx + dy * dy < 900.0 {
            Rgb([240, (150 + i * 7 % 100) as u8, 120])
        } else {
            // A light pattern of 12-pixel blocks drawn from `i`: each face a different picture.
            let mut block = u64::from(x / 12 + 8 * (y / 12)) ^ (u64::from(i) << 32);
            block = (block ^ (block >> 31)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            block = (block ^ (block >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            let shade = if (block ^ (block >> 32)) >> 63 == 1 {
                190
            } else {
                255
            };
            Rgb([shade, shade, shade])
        }
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

pub fn zip_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default();
    for (name, bytes) in entries {
        if name.ends_with('/') {
            zip.add_directory(name.as_str(), options).unwrap();
        } else {
            zip.start_file(name.as_str(), options).unwrap();
            zip.write_all(bytes).unwrap();
        }
    }
    zip.finish().unwrap().into_inner()
}

pub fn faces_entries(n: u32) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| (format!("faces/{i:02}.png"), cartoon(i)))
        .collect()
}

pub fn pack_zip(n: u32, extra: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut entries = faces_entries(n);
    entries.extend(extra.iter().map(|(n, b)| (n.to_string(), b.clone())));
    zip_of(&entries)
}
