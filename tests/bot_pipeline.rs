//! The bot with the real cartoon pipeline behind it (the generator has random weights),
//! against the fake Discord: a group photo in, one sticker and one avatar per face out.

mod common;
#[path = "support/pipeline.rs"]
mod pipeline;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pipeline::real_pipeline_bot;
use support::discord::{FakeDiscord, APP_ID, PERM_ALL_TEXT};
use toonbot::cartoon::compose::STICKER_MAX_BYTES;
use toonbot::cartoon::Cartoonizer;
use toonbot::jobs::{CartoonRenderer, JobQueue, OutputKind, QueueConfig, RenderRequest};

const USER: u64 = 7000;
const EPHEMERAL: u64 = 64;
/// Generous: three faces through the full-size generator on a loaded 2-core CPU.
const RENDER_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread")]
async fn a_group_photo_gets_a_sticker_and_avatar_per_face_through_discord() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (fake, bot) = real_pipeline_bot(dir.path()).await;

    let photo = std::fs::read(data.join("samples/groups/sample1.jpg")).unwrap();
    let attachment = fake.attachment("group.jpg", "image/jpeg", photo, None);
    let token = format!("tok{}", fake.next_id());
    let sent = Instant::now();
    fake.dispatch(
        "INTERACTION_CREATE",
        fake.command(
            &token,
            USER,
            Some(PERM_ALL_TEXT),
            FakeDiscord::cartoon_data(&attachment, None, Some("both")),
        ),
    );
    let callback = fake
        .wait_for("the deferral", Duration::from_secs(10), |r| {
            r.method == "POST" && r.path.ends_with(&format!("/{token}/callback"))
        })
        .await;
    assert_eq!(callback.callback_type(), Some(5));
    let original = format!("/webhooks/{APP_ID}/{token}/messages/@original");
    let result = fake
        .wait_for("the results", RENDER_TIMEOUT, |r| {
            r.is("PATCH", &original) && !r.files.is_empty()
        })
        .await;
    eprintln!(
        "interaction to reply with 3 faces: {:.1} s",
        sent.elapsed().as_secs_f64()
    );
    let names: Vec<String> = result
        .files
        .iter()
        .map(|f| f.filename.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "face1-sticker.png",
            "face1-avatar.png",
            "face2-sticker.png",
            "face2-avatar.png",
            "face3-sticker.png",
            "face3-avatar.png"
        ]
    );
    for file in &result.files {
        let img =
            image::load_from_memory_with_format(&file.bytes, image::ImageFormat::Png).unwrap();
        if file.filename.as_deref().unwrap().contains("sticker") {
            assert_eq!((img.width(), img.height()), (320, 320));
            assert!(img.color().has_alpha());
            assert!(file.bytes.len() < STICKER_MAX_BYTES);
        } else {
            assert_eq!((img.width(), img.height()), (512, 512));
        }
    }

    // A street scene: the asker alone is told there is no face.
    let street = std::fs::read(data.join("samples/no-face/prague.jpg")).unwrap();
    let attachment = fake.attachment("street.jpg", "image/jpeg", street, None);
    let token = format!("tok{}", fake.next_id());
    fake.dispatch(
        "INTERACTION_CREATE",
        fake.command(
            &token,
            USER,
            Some(PERM_ALL_TEXT),
            FakeDiscord::cartoon_data(&attachment, None, None),
        ),
    );
    let followup_path = format!("/webhooks/{APP_ID}/{token}");
    let followup = fake
        .wait_for("the no-face answer", RENDER_TIMEOUT, |r| {
            r.is("POST", &followup_path)
        })
        .await;
    assert_eq!(followup.flags() & EPHEMERAL, EPHEMERAL);
    assert!(
        followup.content().to_lowercase().contains("face"),
        "{}",
        followup.content()
    );
    bot.shutdown().await;
}

/// A style deleted and published again under the same name (as `/stylepack delete` then a
/// new pack's publish do) must not be answered from the results of the old one.
#[tokio::test(flavor = "multi_thread")]
async fn a_style_replaced_under_its_name_is_rendered_again_not_served_from_the_cache() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let styles = dir.path().join("styles");
    common::install_random_style(&styles, "pack");
    let config = common::config_with_styles(&styles, "pack");
    let cartoonizer = Cartoonizer::load(&config, &candle_core::Device::Cpu).unwrap();
    let renderer = CartoonRenderer::new(cartoonizer, config.limits.clone(), "pack".into());
    let queue = JobQueue::new(Arc::new(renderer), QueueConfig::default());
    let request = RenderRequest {
        image: std::fs::read(data.join("photos/celeba/000127.jpg")).unwrap(),
        style: Some("pack".into()),
        output: OutputKind::Sticker,
        outline: false,
        round_avatar: false,
    };
    let render = |request: RenderRequest| {
        let handle = queue.submit(USER, request).unwrap();
        async move {
            let outcome = tokio::time::timeout(RENDER_TIMEOUT, handle.wait())
                .await
                .expect("rendered in time")
                .expect("not cancelled");
            let output = outcome.result.expect("rendered");
            (outcome.cached, output.files[0].png.clone())
        }
    };

    let (cached, first) = render(request.clone()).await;
    assert!(!cached);
    let (cached, again) = render(request.clone()).await;
    assert!(cached, "the same photo and style is served from the cache");
    assert_eq!(again, first);

    std::fs::remove_dir_all(styles.join("pack")).unwrap();
    common::install_random_style(&styles, "pack");
    let (cached, replaced) = render(request).await;
    assert!(
        !cached,
        "the new style's weights are rendered, not the old results served"
    );
    assert_ne!(replaced, first, "the new style's own cartoon");
}
