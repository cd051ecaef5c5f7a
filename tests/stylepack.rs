//! Style packs end to end: the real bot against the fake Discord, the real face pipeline
//! preparing the packs, a test trainer writing real style folders, and the test renderer
//! drawing with the installed styles. Every refused upload must leave no file and no row.
//! The upload-to-publish and the cancel-resume-restart runs also run with the bot's database on
//! PostgreSQL (`tests/common/postgres.rs`; skipped, saying so, where there is none).

mod common;
#[path = "support/packs.rs"]
mod packs;
mod support;

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use common::postgres;
use image::{Rgb, RgbImage};
use serde_json::json;
use support::discord::{FakeDiscord, Recorded, CHANNEL_ID, GUILD_ID};
use support::harness::{assert_immediate_ephemeral, png_info, Harness, MEMBER};
use support::trainer::{TestTrainer, EVAL};
use toonbot::config::{PackRecipe, StylePackConfig};
use toonbot::store::{Database, RunStatus, StyleStatus};
use toonbot::stylepack::archive::PackImage;
use toonbot::stylepack::prepare;
use zip::write::SimpleFileOptions;

use packs::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_trains_with_progress_previews_and_eval_then_publish_lets_members_use_it() {
    upload_train_publish(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_train_publish_on_postgres() {
    if let Some(pg) = postgres::database("upload_train_publish_on_postgres").await {
        upload_train_publish(Some(Database::Postgres(pg.url().into()))).await;
    }
}

/// Sets the bot's database to `database`, when given (else its SQLite file).
fn on(database: Option<Database>) -> impl FnOnce(&mut toonbot::bot::BotConfig) {
    move |config| {
        if let Some(database) = database {
            config.database = database;
        }
    }
}

async fn upload_train_publish(database: Option<Database>) {
    let p = Packs::start(TestTrainer::new(Duration::from_millis(60)), on(database)).await;
    let zip = pack_zip(
        12,
        &[
            ("faces/", vec![]),
            ("notes.txt", b"my cartoons".to_vec()),
            ("__MACOSX/faces/._00.png", vec![0; 8]),
            ("faces/.DS_Store", vec![0; 8]),
        ],
    );
    let token = p.upload(ADMIN_PERMS, zip, "Anime", None);

    // Accepted: what was kept, held out and skipped, in the ephemeral answer.
    let answer = p.upload_answer(&token, "images accepted").await;
    for needle in [
        "**anime**: 12 images accepted, 10 to train on and 2 kept aside",
        "Skipped 3 files",
        "`notes.txt`: not a PNG, JPEG or WebP image",
        "`__MACOSX/faces/._00.png`: macOS metadata",
        "`faces/.DS_Store`: hidden file",
        "training from **classic**",
    ] {
        assert!(answer.contains(needle), "{needle:?} in {answer}");
    }

    // One progress message, edited with step, losses, images/s and time left; previews every 2 steps;
    // then the evaluation with the last preview.
    let done = p
        .wait_post("the evaluation", |r| {
            r.content().contains("ready as a draft")
        })
        .await;
    for needle in [
        "of its 12 images, the others were centre-cropped",
        "KID×100 4.25 ± 0.50",
        "identity 0.71",
        "2 held-out images",
        "/stylepack publish name:anime",
    ] {
        assert!(
            done.content().contains(needle),
            "{needle:?} in {}",
            done.content()
        );
    }
    assert_eq!(done.files.len(), 1);
    assert_eq!(done.files[0].filename.as_deref(), Some("anime-preview.png"));
    assert_eq!(png_info(&done.files[0].bytes).0, 96);

    let posts = p.channel_posts();
    let started: Vec<&Recorded> = posts
        .iter()
        .filter(|r| r.method == "POST" && r.content().contains("🧪 Training **anime**"))
        .collect();
    assert_eq!(started.len(), 1, "one progress message");
    let edits: Vec<&Recorded> = posts.iter().filter(|r| r.method == "PATCH").collect();
    let edited: std::collections::BTreeSet<&str> = edits.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        edited.len(),
        1,
        "all edits go to the progress message: {edited:?}"
    );
    assert!(
        edits[0]
            .content()
            .contains("Preparing the cartoon faces of **anime**: "),
        "{}",
        edits[0].content()
    );
    let progress = edits
        .iter()
        .find(|r| r.content().contains(" left"))
        .expect("a progress edit with the time left");
    for needle in [
        "step ",
        "/6 (",
        "losses g_adv",
        "cycle 0.500",
        "20.0 images/s",
    ] {
        assert!(
            progress.content().contains(needle),
            "{needle:?} in {}",
            progress.content()
        );
    }
    assert!(edits
        .last()
        .unwrap()
        .content()
        .contains("✅ **anime** trained from **classic**: 6 steps"));
    let previews: Vec<String> = posts
        .iter()
        .filter(|r| r.method == "POST" && r.content().contains("🖼️ **anime** at step"))
        .map(|r| r.files[0].filename.clone().unwrap())
        .collect();
    assert_eq!(
        previews,
        ["anime-step2.png", "anime-step4.png", "anime-step6.png"]
    );

    // Recorded: the run with its timings, the draft with its evaluation, the progress message.
    let store = p.h.bot().store();
    let style = store.guild_style("anime").await.unwrap().unwrap();
    assert_eq!(style.status, StyleStatus::Draft);
    assert_eq!(
        (style.images, style.held_out, style.base.as_str()),
        (10, 2, "classic")
    );
    assert!(style.faces_found.is_some());
    let prepared = walk(&p.packs_dir());
    let count = |dir: &str| {
        prepared
            .iter()
            .filter(|f| f.parent().unwrap().ends_with(dir))
            .count()
    };
    assert_eq!((count("train"), count("held_out")), (10, 2));
    let face = prepared
        .iter()
        .find(|f| f.parent().unwrap().ends_with("train"))
        .unwrap();
    assert_eq!(image::image_dimensions(face).unwrap(), (256, 256));
    assert_eq!(style.eval.unwrap().kid_x100_mean, EVAL.kid_x100_mean);
    let run = store.latest_run("anime").await.unwrap().unwrap();
    assert_eq!(
        (run.status, run.step, run.total_steps),
        (RunStatus::Done, 6, 6)
    );
    assert!(run.train_ms >= 6.0 * 60.0, "{}", run.train_ms);
    assert!(run.eval_ms.is_some() && run.finished_at.is_some());
    assert_eq!(run.losses[1], ("cycle".to_string(), 0.5));
    let message_path = edited.into_iter().next().unwrap();
    assert!(message_path.ends_with(&run.message_id.unwrap().to_string()));

    // A draft is nobody's style yet.
    let token = p.h.cartoon(
        USER,
        support::renderer::photo(1, support::renderer::Trigger::Normal, 1),
        Some("anime"),
        None,
    );
    assert_immediate_ephemeral(&p.h, &token, "no style called `anime`").await;

    // Published: the members of this server draw with it.
    assert_immediate_ephemeral(
        &p.h,
        &p.admin("publish", Some("anime")),
        "Published **anime**",
    )
    .await;
    assert!(p
        .trained_dir()
        .join("anime/generator.safetensors")
        .is_file());
    let token = p.h.cartoon(
        USER,
        support::renderer::photo(1, support::renderer::Trigger::Normal, 2),
        Some("anime"),
        Some("sticker"),
    );
    let result = p.h.result(&token).await;
    assert!(
        result.content().contains("style **anime**"),
        "{}",
        result.content()
    );
    assert_eq!(
        p.h.renderer.log().last().unwrap().style.as_deref(),
        Some("anime")
    );

    // The server's style choices include it; a DM's do not.
    let choices = autocomplete(&p.h, MEMBER, "an").await;
    assert_eq!(choices, ["anime"]);
    assert!(autocomplete(&p.h, None, "")
        .await
        .iter()
        .all(|c| c != "anime"));
    let token = p.h.command(
        USER,
        None,
        FakeDiscord::cartoon_data(
            &p.h.fake.attachment(
                "me.png",
                "image/png",
                support::renderer::photo(1, support::renderer::Trigger::Normal, 3),
                None,
            ),
            Some("anime"),
            None,
        ),
    );
    assert_immediate_ephemeral(&p.h, &token, "no style called `anime`").await;
    let styles = p.h.command(
        USER,
        MEMBER,
        json!({ "id": "903", "name": "styles", "type": 1 }),
    );
    let listed = p.h.callback(&styles).await;
    assert!(
        listed.content().contains("**anime**"),
        "{}",
        listed.content()
    );

    // `/stylepack list`, and every admin action audited.
    let list = p.h.callback(&p.admin("list", None)).await;
    assert!(
        list.content()
            .contains("**anime** — published, from **classic** on 10 images"),
        "{}",
        list.content()
    );
    let audit = store.audit_log(GUILD_ID).await.unwrap();
    let actions: Vec<(u64, &str)> = audit
        .iter()
        .rev()
        .map(|(u, a, _, _)| (*u, a.as_str()))
        .collect();
    assert_eq!(
        actions,
        [(ADMIN, "stylepack_upload"), (ADMIN, "stylepack_publish")]
    );
    assert!(audit
        .iter()
        .all(|(_, _, detail, at)| detail.contains("name=anime") && *at > 0));

    // Deleted: gone from disk, the database and the style choices.
    assert_immediate_ephemeral(
        &p.h,
        &p.admin("delete", Some("anime")),
        "Deleted the style pack **anime**",
    )
    .await;
    assert!(!p.trained_dir().join("anime").exists());
    assert!(walk(&p.packs_dir()).is_empty());
    assert!(store.guild_style("anime").await.unwrap().is_none());
    assert!(autocomplete(&p.h, MEMBER, "an").await.is_empty());
    assert_eq!(
        store.audit_log(GUILD_ID).await.unwrap()[0].1,
        "stylepack_delete"
    );
}

/// The style choices autocomplete offers for `/cartoon style:<typed>`.
async fn autocomplete(h: &Harness, perms: Option<u64>, typed: &str) -> Vec<String> {
    let data = json!({ "id": "900", "name": "cartoon", "type": 1, "options": [{ "name": "style", "type": 3, "value": typed, "focused": true }] });
    let token = format!("tok{}", h.fake.next_id());
    let mut interaction = h.fake.command(&token, USER, perms, data);
    interaction["type"] = json!(4);
    h.fake.dispatch("INTERACTION_CREATE", interaction);
    let cb = h.callback(&token).await;
    cb.json.as_ref().unwrap()["data"]["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["value"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_keeps_the_checkpoint_resume_continues_and_a_restart_resumes() {
    cancel_resume_restart(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_resume_restart_on_postgres() {
    if let Some(pg) = postgres::database("cancel_resume_restart_on_postgres").await {
        cancel_resume_restart(Some(Database::Postgres(pg.url().into()))).await;
    }
}

async fn cancel_resume_restart(database: Option<Database>) {
    let mut p = Packs::start(TestTrainer::new(Duration::from_millis(10)), on(database)).await;
    p.trainer.hold_before(3);
    let token = p.upload(ADMIN_PERMS, pack_zip(10, &[]), "ink2", Some("classic"));
    p.upload_answer(&token, "images accepted").await;
    let trainer = Arc::clone(&p.trainer);
    tokio::task::spawn_blocking(move || trainer.wait_holding(3))
        .await
        .unwrap();

    // Cancelled while training: the checkpoint (step 2) stays.
    assert_immediate_ephemeral(&p.h, &p.admin("cancel", None), "Stopping **ink2**").await;
    p.wait_post("the cancel", |r| {
        r.content().contains("cancelled at step 2/6")
    })
    .await;
    let store = p.h.bot().store();
    let style = store.guild_style("ink2").await.unwrap().unwrap();
    assert_eq!(style.status, StyleStatus::Cancelled);
    let run = store.latest_run("ink2").await.unwrap().unwrap();
    assert_eq!((run.status, run.step), (RunStatus::Cancelled, 2));
    assert!(walk(&p.packs_dir())
        .iter()
        .any(|f| f.ends_with("work/checkpoint.txt")));
    assert_immediate_ephemeral(&p.h, &p.admin("cancel", None), "Nothing is training").await;
    assert_immediate_ephemeral(&p.h, &p.admin("publish", Some("ink2")), "is cancelled").await;

    // Resumed from the checkpoint, then the bot restarts mid-training.
    p.trainer.hold_before(5);
    assert_immediate_ephemeral(
        &p.h,
        &p.admin("resume", Some("ink2")),
        "again from its last checkpoint",
    )
    .await;
    let trainer = Arc::clone(&p.trainer);
    tokio::task::spawn_blocking(move || trainer.wait_holding(5))
        .await
        .unwrap();
    p.h.stop().await;
    let run = p.stored_run("ink2").await;
    assert_eq!(
        (run.status, run.step),
        (RunStatus::Running, 4),
        "left running for the restart"
    );
    let message = run.message_id.unwrap();
    p.trainer.release();
    p.h.start().await;

    // The restart resumed it from step 4, editing the same progress message, to the end.
    let edited = format!("/channels/{CHANNEL_ID}/messages/{message}");
    p.h.fake
        .wait_for("the resumed run's end", SLOW, |r| {
            r.is("PATCH", &edited) && r.content().contains("trained from **classic**: 6 steps")
        })
        .await;
    p.wait_post("the evaluation", |r| {
        r.content().contains("**ink2** is ready as a draft")
    })
    .await;
    assert_eq!(p.trainer.starts(), [0, 2, 4]);
    let store = p.h.bot().store();
    assert_eq!(
        store.guild_style("ink2").await.unwrap().unwrap().status,
        StyleStatus::Draft
    );
    let run = store.latest_run("ink2").await.unwrap().unwrap();
    assert_eq!((run.status, run.step), (RunStatus::Done, 6));
    let actions: Vec<String> = store
        .audit_log(GUILD_ID)
        .await
        .unwrap()
        .into_iter()
        .rev()
        .map(|a| a.1)
        .collect();
    assert_eq!(
        actions,
        ["stylepack_upload", "stylepack_cancel", "stylepack_resume"]
    );
}

impl Packs {
    /// A pack's latest run, read from the database while the bot is stopped.
    async fn stored_run(&self, name: &str) -> toonbot::store::TrainingRun {
        let store = toonbot::store::Store::connect(&self.h.config.database)
            .await
            .unwrap();
        let run = store.latest_run(name).await.unwrap().unwrap();
        store.close().await;
        run
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_preparing_prepares_again_and_trains() {
    let mut p = Packs::start(TestTrainer::new(Duration::ZERO), |_| {}).await;
    let token = p.upload(ADMIN_PERMS, pack_zip(10, &[]), "early", None);
    p.upload_answer(&token, "images accepted").await;
    // Preparing runs the face pipeline on ten images: the bot stops in the middle of it.
    p.h.stop().await;
    let run = p.stored_run("early").await;
    assert_eq!(run.status, RunStatus::Running);
    p.h.start().await;
    p.wait_post("the evaluation", |r| {
        r.content().contains("**early** is ready as a draft")
    })
    .await;
    let store = p.h.bot().store();
    let style = store.guild_style("early").await.unwrap().unwrap();
    assert_eq!(style.status, StyleStatus::Draft);
    assert!(style.faces_found.is_some());
    let run = store.latest_run("early").await.unwrap().unwrap();
    assert_eq!((run.status, run.step), (RunStatus::Done, STEPS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_training_says_so_and_can_be_resumed() {
    let p = Packs::start(TestTrainer::new(Duration::ZERO), |_| {}).await;
    p.trainer.fail_after(3);
    let token = p.upload(ADMIN_PERMS, pack_zip(10, &[]), "flaky", None);
    p.upload_answer(&token, "images accepted").await;
    p.wait_post("the failure", |r| {
        r.content().contains("❌ Training **flaky** failed")
    })
    .await;
    let store = p.h.bot().store();
    let run = store.latest_run("flaky").await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert!(run.error.unwrap().contains("test failure after step 3"));
    p.trainer.stop_failing();
    assert_immediate_ephemeral(&p.h, &p.admin("resume", Some("flaky")), "again").await;
    p.wait_post("the evaluation", |r| {
        r.content().contains("**flaky** is ready as a draft")
    })
    .await;
    assert_eq!(p.trainer.starts(), [0, 3]);
}

/// A made-up landscape (sky, hills, a sun), different for each `i`: no face in it.
fn landscape(i: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(160, 120, |x, y| {
        let hill = 60.0 + 25.0 * ((x as f32 / (10.0 + 4.0 * i as f32)) + i as f32).sin();
        let (sun_x, sun_y) = ((20 + i * 37 % 120) as f32, (15 + i * 13 % 40) as f32);
        let sun = (x as f32 - sun_x).powi(2) + (y as f32 - sun_y).powi(2) < 150.0;
        if sun {
            Rgb([255, 220, 90])
        } else if (y as f32) < hill {
            Rgb([90, 150 + (y % 40) as u8, 230])
        } else {
            let grass = (x * 31 + y * 17 + i * 101).wrapping_mul(2_654_435_761) >> 27;
            Rgb([40 + grass as u8, 120 + (i * 9 % 60) as u8, 50])
        }
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_of_landscapes_is_refused_before_the_first_step() {
    let p = Packs::start_with_packs(
        TestTrainer::default(),
        |c| c.min_face_share = StylePackConfig::default().min_face_share,
        |_| {},
    )
    .await;
    let views: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| (format!("views/{i:02}.png"), landscape(i)))
        .collect();
    let token = p.upload(ADMIN_PERMS, zip_of(&views), "views", None);
    p.upload_answer(&token, "images accepted").await;
    let refusal = p
        .wait_post("the refusal", |r| {
            r.content().contains("❌ **views** was not trained")
        })
        .await;
    assert!(
        refusal
            .content()
            .contains("a face was found in only 0 of its 10 images"),
        "{}",
        refusal.content()
    );
    assert!(p.trainer.starts().is_empty(), "no step was trained");
    let store = p.h.bot().store();
    let run = store.latest_run("views").await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert!(run.error.unwrap().contains("a face was found in only 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_over_the_style_spread_trains_with_a_warning() {
    // Every pack spreads more than 0: the warning's path, whatever the images.
    let p = Packs::start_with_packs(
        TestTrainer::new(Duration::ZERO),
        |c| c.max_style_spread = 0.0,
        |_| {},
    )
    .await;
    let token = p.upload(ADMIN_PERMS, pack_zip(10, &[]), "mixed", None);
    p.upload_answer(&token, "images accepted").await;
    let warning = p
        .wait_post("the warning", |r| {
            r.method == "POST" && r.content().contains("⚠️ The images of **mixed**")
        })
        .await;
    assert!(
        warning
            .content()
            .contains("several different styles (style spread "),
        "{}",
        warning.content()
    );
    p.wait_post("the evaluation", |r| {
        r.content().contains("**mixed** is ready as a draft")
    })
    .await;
}

// --- bad input: a clear ephemeral answer, and nothing left behind ---------------------------

async fn refused(p: &Packs, zip: Vec<u8>, needle: &str) -> String {
    let token = p.upload(ADMIN_PERMS, zip, "pack", None);
    let answer = p.upload_answer(&token, needle).await;
    p.assert_nothing_left().await;
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_zip_is_refused() {
    let p = Packs::start(TestTrainer::default(), |_| {}).await;
    refused(&p, cartoon(1), "isn't a zip archive").await;
    refused(&p, b"PK\x03\x04 not really".to_vec(), "isn't a zip archive").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_zip_is_refused() {
    let p = Packs::start(TestTrainer::default(), |_| {}).await;
    let mut zip = pack_zip(12, &[]);
    // Set the "encrypted" flag (general purpose bit 0) on every entry, in both headers.
    for at in 0..zip.len() - 4 {
        match &zip[at..at + 4] {
            [0x50, 0x4b, 0x03, 0x04] => zip[at + 6] |= 1,
            [0x50, 0x4b, 0x01, 0x02] => zip[at + 8] |= 1,
            _ => {}
        }
    }
    refused(&p, zip, "That archive is encrypted (`faces/00.png`)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zip_slip_entry_is_refused() {
    let p = Packs::start(TestTrainer::default(), |_| {}).await;
    for evil in [
        "../../etc/evil.png",
        "/tmp/evil.png",
        "faces\\..\\..\\evil.png",
        "C:/evil.png",
    ] {
        let answer = refused(&p, pack_zip(12, &[(evil, cartoon(99))]), "leads outside").await;
        assert!(answer.contains(&format!("`{evil}`")), "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zip_bomb_is_refused() {
    let p = Packs::start(TestTrainer::default(), |_| {}).await;
    // 50 MB of zeros, deflated to about 50 KB.
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let deflated =
        SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in faces_entries(12) {
        zip.start_file(name, deflated).unwrap();
        zip.write_all(&bytes).unwrap();
    }
    zip.start_file("faces/huge.png", deflated).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..50 {
        zip.write_all(&zeros).unwrap();
    }
    let zip = zip.finish().unwrap().into_inner();
    assert!(zip.len() < 200_000);
    refused(&p, zip, "`faces/huge.png` expands to more than 1.0 MB").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_images_or_ten_thousand_are_refused() {
    let p = Packs::start(TestTrainer::default(), |_| {}).await;
    let answer = refused(
        &p,
        zip_of(&[("readme.txt".into(), b"hi".to_vec())]),
        "0 usable images",
    )
    .await;
    assert!(
        answer.contains("`readme.txt`: not a PNG, JPEG or WebP image"),
        "{answer}"
    );
    refused(&p, zip_of(&[]), "0 usable images").await;

    let tiny = {
        let mut out = Cursor::new(Vec::new());
        RgbImage::from_pixel(1, 1, Rgb([9, 9, 9]))
            .write_to(&mut out, image::ImageFormat::Png)
            .unwrap();
        out.into_inner()
    };
    let many: Vec<(String, Vec<u8>)> = (0..10_000)
        .map(|i| (format!("{i}.png"), tiny.clone()))
        .collect();
    refused(
        &p,
        zip_of(&many),
        "10000 files; a style pack may have at most 2000 files and 500 images",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_image_files_are_listed_and_too_few_images_refused() {
    let p = Packs::start(TestTrainer::default(), |_| {}).await;
    let zip = pack_zip(
        9,
        &[
            ("cv.pdf", b"%PDF-1.4".to_vec()),
            ("anim.gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec()),
            ("broken.png", b"\x89PNG\r\n\x1a\n broken".to_vec()),
        ],
    );
    let answer = refused(&p, zip, "9 usable images; a style pack needs at least 10").await;
    for needle in [
        "Skipped 3 files",
        "`cv.pdf`: not a PNG, JPEG or WebP image",
        "`anim.gif`: not a PNG, JPEG or WebP image",
        "`broken.png`: damaged",
    ] {
        assert!(answer.contains(needle), "{needle:?} in {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_may_upload() {
    let p = Packs::start(TestTrainer::default(), |c| c.admin_role_id = Some(777)).await;
    let token = p.upload(MEMBER, pack_zip(12, &[]), "pack", None);
    assert_immediate_ephemeral(
        &p.h,
        &token,
        "Only members with **Manage Server** (or the bot's admin role) can manage style packs",
    )
    .await;
    p.assert_nothing_left().await;
    for sub in ["list", "cancel"] {
        let token = p.h.command(
            USER,
            MEMBER,
            FakeDiscord::sub_command_data("stylepack", sub, json!([])),
        );
        assert_immediate_ephemeral(&p.h, &token, "Manage Server").await;
    }
    // The admin role is enough (the upload gets past the check, to the name check).
    let mut interaction = p.upload_interaction(MEMBER, pack_zip(12, &[]), "Not valid!", None);
    interaction["member"]["roles"] = json!(["777"]);
    let token = interaction["token"].as_str().unwrap().to_string();
    p.h.fake.dispatch("INTERACTION_CREATE", interaction);
    assert_immediate_ephemeral(&p.h, &token, "can't be a style name").await;
    p.assert_nothing_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_style_name_is_refused() {
    let p = Packs::start(TestTrainer::default(), |_| {}).await;
    // An installed style.
    let token = p.upload(ADMIN_PERMS, pack_zip(12, &[]), "classic", None);
    assert_immediate_ephemeral(&p.h, &token, "There's already a style called `classic`").await;
    p.assert_nothing_left().await;
    // Another pack (a draft once trained).
    let token = p.upload(ADMIN_PERMS, pack_zip(10, &[]), "mine", None);
    p.upload_answer(&token, "images accepted").await;
    p.wait_post("the evaluation", |r| {
        r.content().contains("**mine** is ready")
    })
    .await;
    let before = p.leftovers().await;
    let token = p.upload(ADMIN_PERMS, pack_zip(12, &[]), "mine", None);
    assert_immediate_ephemeral(&p.h, &token, "There's already a style called `mine`").await;
    // A base that does not exist.
    let token = p.upload(ADMIN_PERMS, pack_zip(12, &[]), "other", Some("nope"));
    assert_immediate_ephemeral(&p.h, &token, "no style called `nope` to start from").await;
    assert_eq!(p.leftovers().await, before);
    assert_eq!(p.trainer.starts(), [0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_while_another_pack_trains_is_refused() {
    let p = Packs::start(TestTrainer::default(), |_| {}).await;
    p.trainer.hold_before(1);
    let token = p.upload(ADMIN_PERMS, pack_zip(10, &[]), "first", None);
    p.upload_answer(&token, "images accepted").await;
    let trainer = Arc::clone(&p.trainer);
    tokio::task::spawn_blocking(move || trainer.wait_holding(1))
        .await
        .unwrap();
    let before = p.leftovers().await;

    let token = p.upload(ADMIN_PERMS, pack_zip(12, &[]), "second", None);
    assert_immediate_ephemeral(
        &p.h,
        &token,
        "**first** is still being trained on this server",
    )
    .await;
    // From another server, the first pack's name is not told.
    let mut interaction = p.upload_interaction(ADMIN_PERMS, pack_zip(12, &[]), "third", None);
    interaction["guild_id"] = json!("301");
    let token = interaction["token"].as_str().unwrap().to_string();
    p.h.fake.dispatch("INTERACTION_CREATE", interaction);
    assert_immediate_ephemeral(&p.h, &token, "training another server's style").await;
    assert_eq!(p.leftovers().await, before);
    assert!(p
        .h
        .bot()
        .store()
        .guild_styles(301)
        .await
        .unwrap()
        .is_empty());

    p.trainer.release();
    p.wait_post("the evaluation", |r| {
        r.content().contains("**first** is ready")
    })
    .await;
    assert_eq!(p.trainer.starts(), [0]);
}

/// Real cartoon faces from `../shared/data`: the face pipeline aligns those it finds (all of
/// photo2cartoon's, some anime ones); no prepared image is blank, even where the portrait
/// segmenter (trained on photos) finds no figure.
#[test]
fn real_cartoon_faces_are_aligned_where_found_and_never_blanked() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let limits = toonbot::config::Limits {
        max_bytes: 10_000_000,
        max_pixels: 10_000_000,
    };
    for (set, least_found) in [("cartoons/p2c/train", 7), ("anime/s2a/train", 1)] {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(data.join(set))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        let images: Vec<PackImage> = paths
            .iter()
            .take(8)
            .map(|p| PackImage {
                entry: p.display().to_string(),
                bytes: std::fs::read(p).unwrap(),
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        prepare::save_originals(&images, dir.path()).unwrap();
        let started = std::time::Instant::now();
        let prepared = prepare::prepare_pack(
            &faces(),
            &limits,
            dir.path(),
            10,
            &|_, _| {},
            &AtomicBool::new(false),
        )
        .unwrap()
        .unwrap();
        eprintln!(
            "{set}: {prepared:?} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        assert_eq!((prepared.train, prepared.held_out), (6, 2));
        assert!(prepared.faces_found >= least_found, "{set}: {prepared:?}");
        for file in walk(dir.path())
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "png"))
        {
            let img = image::open(file).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), (256, 256));
            let mean =
                img.as_raw().iter().map(|&v| f64::from(v)).sum::<f64>() / img.as_raw().len() as f64;
            assert!(mean < 250.0, "{} is blank ({mean:.1})", file.display());
        }
    }
}

/// A fine-tunable base style in `dir`: photo2cartoon's generators (fresh weights) with small
/// discriminators, and its training state recording `photos`.
fn tiny_finetunable_base(dir: &Path, photos: &Path) {
    use toonbot::train::model::{NetConfig, Ugatit};
    let spec = toonbot::train::RunSpec {
        size: 32,
        net: NetConfig {
            ndf: 4,
            global_layers: 4,
            local_layers: 3,
            ..NetConfig::photo2cartoon()
        },
        ..toonbot::train::RunSpec::photo2cartoon(photos.to_path_buf(), "unused".into(), 1)
    };
    let model = Ugatit::new(spec.net, spec.freeze, 0, &candle_core::Device::Cpu).unwrap();
    let manifest = toonbot::cartoon::styles::StyleManifest {
        description: "fresh weights, for tests".into(),
        base: None,
        steps: Some(0),
    };
    toonbot::train::style::install(
        dir,
        &model,
        toonbot::train::style::WeightsDtype::F32,
        &manifest,
        Some((0, &spec)),
    )
    .unwrap();
}

/// A bot whose style packs train with the real [`CandleTrainer`] and `recipe` at `size` px for
/// 2 steps, from a fine-tunable `classic` with fresh weights, on 3 real aligned photos.
struct CandleRun {
    p: Packs,
    config: toonbot::config::Config,
    aligned: Vec<PathBuf>,
}

impl CandleRun {
    async fn start(recipe: PackRecipe, size: usize) -> Option<Self> {
        let data = common::shared_data()?;
        let dir = tempfile::tempdir().unwrap();
        let photos = dir.path().join("photos");
        std::fs::create_dir_all(&photos).unwrap();
        let mut aligned = walk(&data.join("photos/p2c-aligned/test"));
        aligned.sort();
        for from in &aligned[..3] {
            std::fs::copy(from, photos.join(from.file_name().unwrap())).unwrap();
        }
        tiny_finetunable_base(&dir.path().join("shipped/classic"), &photos);
        let mut config = common::config_with_styles(&dir.path().join("styles"), "classic");
        config.stylepacks = StylePackConfig {
            recipe,
            photos,
            size,
            eval_photos: 2,
            steps: 2,
            preview_every: 1,
            ..pack_config(dir.path())
        };
        let trainer = toonbot::stylepack::finetuner::CandleTrainer::new(
            &config,
            faces(),
            &candle_core::Device::Cpu,
        );
        let h = Packs::harness(dir, config.stylepacks.clone(), Arc::new(trainer), |_| {}).await;
        // Not used: the candle trainer trains.
        let p = Packs {
            h,
            trainer: Arc::new(TestTrainer::default()),
        };
        Some(Self { p, config, aligned })
    }

    /// Uploads a 10-image pack as `blobs` and waits for its draft; a failed run panics with
    /// the run's error.
    async fn train(&self) -> Recorded {
        self.p.upload(ADMIN_PERMS, pack_zip(10, &[]), "blobs", None);
        let done = self
            .p
            .h
            .fake
            .wait_for("the trained draft", Duration::from_secs(600), |r| {
                r.content().contains("ready as a draft") || r.content().contains("failed")
            })
            .await;
        if !done.content().contains("ready as a draft") {
            let run = self.p.h.bot().store().latest_run("blobs").await.unwrap();
            panic!("{}\n{:?}", done.content(), run.and_then(|r| r.error));
        }
        done
    }

    /// Checks the draft's evaluation (KID where the Inception weights are present), that the
    /// progress edit at the last step shows `losses`, and that the run is recorded as done.
    async fn check_draft(&self, done: &Recorded, losses: &[&str]) {
        let inception = self
            .config
            .models
            .dir
            .join("inception.safetensors")
            .is_file();
        let expected = if inception {
            "**KID×100 "
        } else {
            "The evaluation failed"
        };
        let store = self.p.h.bot().store();
        let style = store.guild_style("blobs").await.unwrap().unwrap();
        assert!(
            done.content().contains(expected),
            "{}\n{:?}",
            done.content(),
            style.eval_error
        );
        let posts = self.p.channel_posts();
        let progress = posts
            .iter()
            .find(|r| r.method == "PATCH" && r.content().contains("step 2/2"))
            .expect("a progress edit at the last step");
        for needle in losses.iter().chain(&["images/s"]) {
            assert!(
                progress.content().contains(needle),
                "{needle:?} in {}",
                progress.content()
            );
        }
        assert_eq!(style.eval.is_some(), inception);
        let run = store.latest_run("blobs").await.unwrap().unwrap();
        assert_eq!((run.status, run.step), (RunStatus::Done, 2));
    }
}

/// The real trainer behind the bot with photo2cartoon's recipe: a pack fine-tunes `classic`
/// for 2 steps at 32 px with progress, previews and (where the Inception weights are present)
/// KID; the published style then cartoonises a real photo through the real pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_candle_trainer_fine_tunes_a_pack_that_the_cartoonizer_then_uses() {
    let Some(run) = CandleRun::start(PackRecipe::Photo2cartoon, 32).await else {
        return;
    };
    let done = run.train().await;
    let grid = &done.files[0].bytes;
    assert_eq!(png_info(grid).0, 3 * 32, "photos | cartoons | cycle");
    run.check_draft(&done, &["losses G ", "cycle ", "face-id "])
        .await;
    let (p, config, aligned) = (&run.p, &run.config, &run.aligned);
    let device = candle_core::Device::Cpu;

    assert_immediate_ephemeral(
        &p.h,
        &p.admin("publish", Some("blobs")),
        "Published **blobs**",
    )
    .await;
    let styles_dir = p.trained_dir();
    let manifest = std::fs::read_to_string(styles_dir.join("blobs/style.toml")).unwrap();
    assert!(
        manifest.contains("base = \"classic\"") && manifest.contains("steps = 2"),
        "{manifest}"
    );
    let cartoonizer = toonbot::cartoon::Cartoonizer::load(config, &device).unwrap();
    let selfie = std::fs::read(&aligned[3]).unwrap();
    let options = toonbot::cartoon::compose::ComposeOptions::default();
    let result = cartoonizer
        .cartoonize_bytes(&selfie, &config.limits, Some("blobs"), options)
        .unwrap();
    assert_eq!((result.style.as_str(), result.faces.len()), ("blobs", 1));
    assert_eq!(result.faces[0].sticker.dimensions(), (320, 320));
}

/// The bot's default, the fast recipe, through the real trainer: 2 steps at 128 px (the
/// smallest the projected discriminator takes) from a base with fresh weights, with its losses
/// in the progress edits, a preview and the evaluation, at the recipe's batch and learning rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_candle_trainer_fine_tunes_a_pack_with_the_fast_recipe() {
    let Some(run) = CandleRun::start(PackRecipe::Fast, 128).await else {
        return;
    };
    let done = run.train().await;
    let grid = &done.files[0].bytes;
    assert_eq!(png_info(grid).0, 3 * 128, "photos | base style | new style");
    run.check_draft(&done, &["losses G ", "anchor ", "face-id "])
        .await;
    // The recipe's measured settings (docs/training.md): batch 2 and the pack learning rate.
    let work = run.p.packs_dir().join(format!("{GUILD_ID}/blobs/work"));
    let spec = toonbot::train::pack::run::checkpointed_spec(&work)
        .unwrap()
        .expect("the run's checkpoint");
    assert_eq!(spec.batch, 2);
    assert_eq!(spec.lr_g, toonbot::train::pack::PACK_LR);
}

/// The real binary as a trainer and render worker of a split bot (`serve --role worker --work
/// both`, DESIGN.md §6b): a pack a gateway checked and queued (the library's `PackIntake`,
/// as `serve --role gateway` runs it) is fine-tuned by the real candle trainer (photo2cartoon's
/// step, 2 steps at 32 px) into a draft; published from the gateway side, the same process
/// installs it for rendering, its catalog offers it, and a render queued with it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_trains_a_queued_pack_and_renders_with_it_once_published() {
    use toonbot::jobs::{
        loadtest::LocalNatsServer, JetStreamConfig, JetStreamQueue, OutputKind, RenderRequest,
        StyleCatalog, TrainingQueue,
    };
    use toonbot::stylepack::{GatewayPacks, PackIntake, QueuedPack, Requester};
    let Some(data) = common::shared_data() else {
        return;
    };
    if std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: nats-server is not on the PATH (.ci/run installs it)");
        return;
    }
    let broker = LocalNatsServer::start(Path::new("nats-server")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    let mut aligned = walk(&data.join("photos/p2c-aligned/test"));
    aligned.sort();
    for from in &aligned[..3] {
        std::fs::copy(from, photos.join(from.file_name().unwrap())).unwrap();
    }
    let styles = dir.path().join("styles");
    tiny_finetunable_base(&styles.join("classic"), &photos);
    let database = dir.path().join("toonbot.sqlite");
    let store = toonbot::store::Store::connect(&Database::from(database.clone()))
        .await
        .unwrap();
    let packs_config = StylePackConfig {
        recipe: PackRecipe::Photo2cartoon,
        photos: photos.clone(),
        size: 32,
        eval_photos: 2,
        steps: 2,
        preview_every: 1,
        ..pack_config(dir.path())
    };
    let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
    let env = [
        ("TOONBOT_STYLES__DIR", styles.display().to_string()),
        ("TOONBOT_BOT__DATABASE", database.display().to_string()),
        ("TOONBOT_BOT__WORKERS", "1".into()),
        (
            "TOONBOT_STYLEPACKS__DIR",
            packs_config.dir.display().to_string(),
        ),
        ("TOONBOT_STYLEPACKS__PHOTOS", photos.display().to_string()),
        ("TOONBOT_STYLEPACKS__RECIPE", "photo2cartoon".into()),
        ("TOONBOT_STYLEPACKS__SIZE", "32".into()),
        ("TOONBOT_STYLEPACKS__STEPS", "2".into()),
        ("TOONBOT_STYLEPACKS__EVAL_PHOTOS", "2".into()),
        ("TOONBOT_STYLEPACKS__PREVIEW_EVERY", "1".into()),
        ("TOONBOT_STYLEPACKS__MIN_FACE_SHARE", "0".into()),
    ];
    let mut worker = std::process::Command::new(env!("CARGO_BIN_EXE_toonbot"))
        .args([
            "serve",
            "--role",
            "worker",
            "--work",
            "both",
            "--nats",
            broker.url(),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting the worker process");
    let worker_log = || std::fs::read_to_string(dir.path().join("worker.log")).unwrap();
    let jetstream = JetStreamConfig::new(broker.url());
    let offered = |name: &'static str| {
        let jetstream = jetstream.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            loop {
                let catalog = StyleCatalog::follow(&jetstream).await.unwrap();
                if catalog.styles().iter().any(|s| s.name == name) {
                    return catalog;
                }
                assert!(tokio::time::Instant::now() < deadline, "{name} offered");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    offered("classic").await;
    let intake = PackIntake::new(
        GatewayPacks {
            queue: TrainingQueue::connect(&jetstream).await.unwrap(),
            config: packs_config,
            default_base: "classic".into(),
        },
        store.clone(),
    );
    let installed = vec!["classic".to_string()];
    let base = intake
        .check(&installed, GUILD_ID, "blobs", None)
        .await
        .unwrap();
    let by = Requester {
        user_id: ADMIN,
        channel_id: CHANNEL_ID,
    };
    let pack = QueuedPack::upload(GUILD_ID, "blobs", Some(base), by);
    let queued = intake.queue(pack, pack_zip(10, &[])).await.unwrap();
    assert_eq!((queued.train, queued.held_out), (8, 2));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let style = store.guild_style("blobs").await.unwrap();
        match style.map(|s| s.status) {
            Some(StyleStatus::Draft) => break,
            Some(StyleStatus::Failed | StyleStatus::Cancelled) => {
                let run = store.latest_run("blobs").await.unwrap();
                panic!("{:?}\n{}", run.and_then(|r| r.error), worker_log());
            }
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "trained in time:\n{}",
            worker_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let run = store.latest_run("blobs").await.unwrap().unwrap();
    assert_eq!((run.status, run.step), (RunStatus::Done, 2));
    // The row says draft a moment before the trainer has put the style on the broker.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = intake.publish(GUILD_ID, ADMIN, "blobs").await {
        assert!(tokio::time::Instant::now() < deadline, "published: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let catalog = offered("blobs").await;
    assert!(styles.join("blobs/generator.safetensors").is_file());
    let queue = JetStreamQueue::connect(&jetstream, catalog.style_version())
        .await
        .unwrap();
    let photo = std::fs::read(data.join("samples/groups/sample1.jpg")).unwrap();
    let request = RenderRequest {
        image: photo,
        style: Some("blobs".into()),
        output: OutputKind::Sticker,
        outline: false,
        round_avatar: false,
    };
    let handle = queue.submit(1, request).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(120), handle.wait())
        .await
        .expect("rendered in time")
        .expect("not cancelled");
    let output = outcome.result.expect("rendered");
    assert_eq!(output.style, "blobs");
    assert!(output.faces >= 1);
    worker.kill().unwrap();
    worker.wait().unwrap();
}
