//! The bot end to end: the real serenity client against a fake Discord on 127.0.0.1, with a
//! test renderer. Asserts on what the bot sends to Discord.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::discord::{
    FakeDiscord, APP_ID, DM_CHANNEL_ID, GUILD_ID, PERM_ALL_TEXT, PERM_CREATE_EXPRESSIONS,
};
use support::harness::{
    assert_immediate_ephemeral, assert_late_ephemeral, png_info, Harness, EPHEMERAL, MEMBER, T,
};
use support::renderer::{photo, Trigger, AVATAR_SIZE, STICKER_SIZE};
use toonbot::bot::{self, BotConfig};
use toonbot::jobs::OutputKind;

const USER: u64 = 5000;

/// Every test's log output, at TRACE level with the bot's `LOG_DIRECTIVES` (installed once,
/// before any bot runs, so that the token check sees everything serenity, reqwest and the bot
/// log).
#[derive(Clone, Default)]
struct LogBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A harness, with the logs captured.
async fn harness(tweak: impl FnOnce(&mut BotConfig)) -> Harness {
    logs();
    Harness::new(tweak).await
}

fn logs() -> &'static LogBuffer {
    static LOGS: std::sync::OnceLock<LogBuffer> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = LogBuffer::default();
        let writer = buffer.clone();
        let mut filter = tracing_subscriber::EnvFilter::new("trace");
        for directive in bot::LOG_DIRECTIVES {
            filter = filter.add_directive(directive.parse().unwrap());
        }
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        buffer
    })
}

#[tokio::test]
async fn cartoon_defers_then_edits_the_response_with_one_file_per_face() {
    let h = harness(|_| {}).await;
    h.renderer.set_delay(Duration::from_millis(300));
    let token = h.cartoon(USER, photo(2, Trigger::Normal, 1), None, Some("both"));

    let callback = h.callback(&token).await;
    assert_eq!(callback.callback_type(), Some(5), "deferred");
    assert_eq!(callback.flags() & EPHEMERAL, 0, "the results are public");
    assert_eq!(callback.authorization.as_deref(), Some("Bot test-token"));

    let result = h.result(&token).await;
    let render = &h.renderer.log()[0];
    assert!(
        callback.at < render.finished,
        "deferred before the render finished"
    );
    let names: Vec<_> = result
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
            "face2-avatar.png"
        ]
    );
    for f in &result.files {
        assert!(f.field.starts_with("files["), "{}", f.field);
        let (w, hgt, alpha) = png_info(&f.bytes);
        if f.filename.as_deref().unwrap().contains("sticker") {
            assert_eq!((w, hgt, alpha), (STICKER_SIZE, STICKER_SIZE, true));
        } else {
            assert_eq!((w, hgt), (AVATAR_SIZE, AVATAR_SIZE));
        }
    }
    let json = result.json.as_ref().unwrap();
    assert_eq!(json["attachments"].as_array().unwrap().len(), 4);
    assert!(result.content().contains("2 faces"), "{}", result.content());
    assert!(result.content().contains("/sticker add"));
    assert_eq!(result.flags() & EPHEMERAL, 0);

    // Options: defaults (no preset), render on a worker thread.
    assert_eq!(render.output, OutputKind::Both);
    assert!(render.outline && !render.round_avatar);
    assert!(render.thread.starts_with("toonbot-render-"));

    // Recorded in the jobs table.
    let job = h.finished_job(USER).await;
    assert_eq!(
        (job.status.as_str(), job.faces, job.source.as_str()),
        ("done", Some(2), "slash")
    );
    assert_eq!(job.style.as_deref(), Some("classic"));
    assert!(job.render_ms.unwrap() >= 300.0);
    assert_eq!(job.reply, None);
}

#[tokio::test]
async fn photo_output_and_explicit_style() {
    let h = harness(|_| {}).await;
    let token = h.cartoon(
        USER,
        photo(1, Trigger::Normal, 2),
        Some("ink"),
        Some("photo"),
    );
    let result = h.result(&token).await;
    assert_eq!(result.files.len(), 1);
    assert_eq!(result.files[0].filename.as_deref(), Some("photo.png"));
    assert_eq!(png_info(&result.files[0].bytes).0, 64);
    assert!(result.content().contains("**ink**"));
    assert!(
        !result.content().contains("/sticker add"),
        "no sticker to add"
    );
    assert_eq!(h.renderer.log()[0].style.as_deref(), Some("ink"));
}

#[tokio::test]
async fn errors_are_ephemeral_and_say_what_to_do() {
    let h = harness(|_| {}).await;

    // Declared type: not an image.
    let a = h
        .fake
        .attachment("notes.txt", "text/plain", b"hello".to_vec(), None);
    assert_immediate_ephemeral(
        &h,
        &h.cartoon_with(USER, a, None, None),
        "PNG, JPEG or WebP",
    )
    .await;
    // Declared size over the limit.
    let a = h.fake.attachment(
        "big.png",
        "image/png",
        photo(1, Trigger::Normal, 3),
        Some(5_000_000),
    );
    assert_immediate_ephemeral(&h, &h.cartoon_with(USER, a, None, None), "too large").await;
    // A host that is not allowed.
    let mut a = h
        .fake
        .attachment("x.png", "image/png", photo(1, Trigger::Normal, 4), None);
    a["url"] = json!("https://example.com/x.png");
    assert_immediate_ephemeral(
        &h,
        &h.cartoon_with(USER, a, None, None),
        "uploaded to Discord",
    )
    .await;
    // A style that is not installed.
    let token = h.cartoon(USER, photo(1, Trigger::Normal, 5), Some("nope"), None);
    assert_immediate_ephemeral(&h, &token, "no style called `nope`").await;

    // Declared small, but the download is over the limit.
    let a = h
        .fake
        .attachment("liar.png", "image/png", vec![0u8; 200_000], Some(1000));
    assert_late_ephemeral(&h, &h.cartoon_with(USER, a, None, None), "too large").await;
    // Declared PNG, but not decodable: the renderer says so.
    let a = h
        .fake
        .attachment("fake.png", "image/png", b"not a png at all".to_vec(), None);
    assert_late_ephemeral(
        &h,
        &h.cartoon_with(USER, a, None, None),
        "isn't a photo I can read",
    )
    .await;
    // No face.
    assert_late_ephemeral(
        &h,
        &h.cartoon(USER, photo(0, Trigger::Normal, 6), None, None),
        "couldn't find a face",
    )
    .await;
    // Too many pixels (the renderer's decode limit).
    assert_late_ephemeral(
        &h,
        &h.cartoon(USER, photo(1, Trigger::TooLarge, 7), None, None),
        "too large",
    )
    .await;
    // The renderer panics: an internal error, and the queue goes on.
    assert_late_ephemeral(
        &h,
        &h.cartoon(USER, photo(1, Trigger::Panic, 8), None, None),
        "went wrong on my side",
    )
    .await;
    let token = h.cartoon(USER, photo(1, Trigger::Normal, 9), None, None);
    h.result(&token).await;

    h.finished_job(USER).await;
    let jobs = h.bot().store().recent_jobs(USER, 20).await.unwrap();
    let errors: Vec<_> = jobs
        .iter()
        .rev()
        .map(|j| (j.status.as_str(), j.error.as_deref()))
        .collect();
    assert_eq!(
        errors,
        [
            ("failed", Some("not_an_image")),
            ("failed", Some("no_face")),
            ("failed", Some("too_large")),
            ("failed", Some("internal")),
            ("done", None)
        ]
    );
}

#[tokio::test]
async fn queue_bound_and_per_user_limit_answer_ephemerally_and_positions_are_shown() {
    let h = harness(|c| {
        c.queue_capacity = 1;
        c.per_user_limit = 1;
    })
    .await;
    h.renderer.close_gate();
    let first = h.cartoon(1, photo(1, Trigger::Normal, 1), None, None);
    h.callback(&first).await;
    let deadline = tokio::time::Instant::now() + T;
    while h.renderer.active() == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Same user again: over the per-user limit.
    assert_immediate_ephemeral(
        &h,
        &h.cartoon(1, photo(1, Trigger::Normal, 2), None, None),
        "already have 1 photo",
    )
    .await;
    // Another user: queued, and told their position.
    let second = h.cartoon(2, photo(1, Trigger::Normal, 3), None, None);
    let original = format!("/webhooks/{APP_ID}/{second}/messages/@original");
    let progress = h
        .wait("a queue position", |r| {
            r.is("PATCH", &original) && r.content().contains("next in the queue")
        })
        .await;
    assert!(progress.files.is_empty());
    // A third user: the queue (capacity 1) is full.
    assert_immediate_ephemeral(
        &h,
        &h.cartoon(3, photo(1, Trigger::Normal, 4), None, None),
        "queue is full",
    )
    .await;
    // Slow enough renders for the "drawing" progress edit to show.
    h.renderer.set_delay(Duration::from_millis(200));
    h.renderer.open_gate();
    h.result(&first).await;
    h.result(&second).await;
    assert!(h
        .fake
        .requests()
        .iter()
        .any(|r| r.is("PATCH", &original) && r.content().contains("Drawing")));
}

#[tokio::test]
async fn identical_requests_are_served_from_the_cache() {
    let h = harness(|_| {}).await;
    let image = photo(1, Trigger::Normal, 42);
    let first = h.cartoon(USER, image.clone(), None, Some("sticker"));
    let a = h.result(&first).await;
    let second = h.cartoon(USER + 1, image.clone(), None, Some("sticker"));
    let b = h.result(&second).await;
    assert_eq!(h.renderer.calls(), 1, "rendered once");
    assert_eq!(a.files[0].bytes, b.files[0].bytes);
    assert!(b.content().contains("ready-made"), "{}", b.content());
    // Different options: rendered again.
    let third = h.cartoon(USER, image, None, Some("avatar"));
    h.result(&third).await;
    assert_eq!(h.renderer.calls(), 2);
    assert!(h.finished_job(USER + 1).await.cached);
}

#[tokio::test]
async fn presets_persist_across_a_restart_and_apply() {
    let mut h = harness(|_| {}).await;
    let set = FakeDiscord::sub_command_data(
        "preset",
        "set",
        json!([
            { "name": "style", "type": 3, "value": "ink" },
            { "name": "output", "type": 3, "value": "sticker" },
            { "name": "outline", "type": 5, "value": false },
        ]),
    );
    let token = h.command(USER, MEMBER, set);
    assert_immediate_ephemeral(&h, &token, "Saved").await;
    // A style that does not exist is refused.
    let bad = FakeDiscord::sub_command_data(
        "preset",
        "set",
        json!([{ "name": "style", "type": 3, "value": "nope" }]),
    );
    assert_immediate_ephemeral(&h, &h.command(USER, MEMBER, bad), "no style called `nope`").await;

    h.stop().await;
    h.start().await;

    let show = FakeDiscord::sub_command_data("preset", "show", json!([]));
    let token = h.command(USER, MEMBER, show.clone());
    let cb = h.callback(&token).await;
    assert!(
        cb.content()
            .contains("style **ink**, output **sticker**, outline **off**"),
        "{}",
        cb.content()
    );

    // The preset applies to /cartoon without options.
    let token = h.cartoon(USER, photo(2, Trigger::Normal, 1), None, None);
    let result = h.result(&token).await;
    assert_eq!(result.files.len(), 2, "stickers only");
    let render = &h.renderer.log()[0];
    assert_eq!(
        (render.style.as_deref(), render.output, render.outline),
        (Some("ink"), OutputKind::Sticker, false)
    );

    let reset = FakeDiscord::sub_command_data("preset", "reset", json!([]));
    assert_immediate_ephemeral(&h, &h.command(USER, MEMBER, reset), "forgotten").await;
    let token = h.command(USER, MEMBER, show);
    assert!(h
        .callback(&token)
        .await
        .content()
        .contains("no defaults yet"));
}

#[tokio::test]
async fn a_restart_reports_unfinished_jobs() {
    let mut h = harness(|_| {}).await;
    h.renderer.close_gate();
    let token = h.cartoon(USER, photo(1, Trigger::Normal, 1), None, None);
    h.callback(&token).await;
    let deadline = tokio::time::Instant::now() + T;
    while h.renderer.active() == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The bot goes away mid-render (the job's row stays `running`).
    h.stop().await;
    h.start().await;
    let original = format!("/webhooks/{APP_ID}/{token}/messages/@original");
    let told = h
        .wait("the interrupted notice", |r| {
            r.is("PATCH", &original) && r.content().contains("restarted")
        })
        .await;
    assert!(told.content().contains("send the photo again"));
    let jobs = h.bot().store().recent_jobs(USER, 1).await.unwrap();
    assert_eq!(
        (jobs[0].status.as_str(), jobs[0].error.as_deref()),
        ("interrupted", Some("restart"))
    );
}

#[tokio::test]
async fn cartoonize_menu_on_a_message_with_a_photo() {
    let h = harness(|_| {}).await;
    let attachment = h
        .fake
        .attachment("pic.jpg", "image/png", photo(1, Trigger::Normal, 1), None);
    let message = h
        .fake
        .message(USER + 7, 400, "look at us", vec![attachment]);
    let id = message["id"].as_str().unwrap().to_string();
    let data = json!({ "id": "902", "name": "Cartoonize", "type": 3, "target_id": id, "resolved": { "messages": { id.clone(): message } } });
    let token = h.command(USER, MEMBER, data);
    assert_eq!(h.callback(&token).await.callback_type(), Some(5));
    let result = h.result(&token).await;
    assert_eq!(result.files.len(), 2);
    assert_eq!(h.finished_job(USER).await.source, "menu");

    // A message without a photo.
    let message = h.fake.message(USER + 7, 400, "no photo here", vec![]);
    let id = message["id"].as_str().unwrap().to_string();
    let data = json!({ "id": "902", "name": "Cartoonize", "type": 3, "target_id": id, "resolved": { "messages": { id.clone(): message } } });
    assert_immediate_ephemeral(&h, &h.command(USER, MEMBER, data), "no photo attached").await;
}

#[tokio::test]
async fn a_photo_sent_in_dm_gets_the_results() {
    let h = harness(|_| {}).await;
    let attachment = h
        .fake
        .attachment("me.png", "image/png", photo(1, Trigger::Normal, 1), None);
    let message = h.fake.message(USER, DM_CHANNEL_ID, "", vec![attachment]);
    h.fake.dispatch("MESSAGE_CREATE", message.clone());
    let messages = format!("/channels/{DM_CHANNEL_ID}/messages");
    let progress = h
        .wait("the DM progress message", |r| r.is("POST", &messages))
        .await;
    assert_eq!(
        progress.json.as_ref().unwrap()["message_reference"]["message_id"],
        message["id"]
    );
    let result = h
        .wait("the DM results", |r| {
            r.method == "PATCH" && r.path.starts_with(&messages) && !r.files.is_empty()
        })
        .await;
    let names: Vec<_> = result
        .files
        .iter()
        .map(|f| f.filename.clone().unwrap())
        .collect();
    assert_eq!(names, ["face1-sticker.png", "face1-avatar.png"]);
    assert_eq!(
        png_info(&result.files[0].bytes),
        (STICKER_SIZE, STICKER_SIZE, true)
    );
    assert!(
        !result.content().contains("/sticker add"),
        "no server stickers from DMs"
    );
    assert_eq!(h.finished_job(USER).await.source, "dm");

    // Text only: the bot explains itself. A non-image file: it says what it needs.
    h.fake.dispatch(
        "MESSAGE_CREATE",
        h.fake.message(USER, DM_CHANNEL_ID, "hi?", vec![]),
    );
    h.wait("the DM help", |r| {
        r.is("POST", &messages) && r.content().contains("Send me a photo")
    })
    .await;
    let doc = h
        .fake
        .attachment("cv.pdf", "application/pdf", b"%PDF".to_vec(), None);
    h.fake.dispatch(
        "MESSAGE_CREATE",
        h.fake.message(USER, DM_CHANNEL_ID, "", vec![doc]),
    );
    h.wait("the DM error", |r| {
        r.is("POST", &messages) && r.content().contains("PNG, JPEG or WebP")
    })
    .await;
    // Its own messages are ignored.
    let mut own = h
        .fake
        .message(support::discord::BOT_ID, DM_CHANNEL_ID, "x", vec![]);
    own["author"]["bot"] = json!(true);
    h.fake.dispatch("MESSAGE_CREATE", own);
}

#[tokio::test]
async fn sticker_add_uploads_the_latest_sticker_with_permission_checks() {
    let mut h = harness(|_| {}).await;
    let add = |name: &str| {
        FakeDiscord::sub_command_data(
            "sticker",
            "add",
            json!([{ "name": "name", "type": 3, "value": name }]),
        )
    };
    let can_add = Some(PERM_ALL_TEXT | PERM_CREATE_EXPRESSIONS);

    // Nothing made yet.
    assert_immediate_ephemeral(
        &h,
        &h.command(USER, can_add, add("me")),
        "Make a sticker first",
    )
    .await;
    let token = h.cartoon(USER, photo(2, Trigger::Normal, 1), None, Some("sticker"));
    let result = h.result(&token).await;

    // The user lacks the permission.
    assert_immediate_ephemeral(
        &h,
        &h.command(USER, MEMBER, add("me")),
        "Create Expressions",
    )
    .await;

    // Uploaded: ephemeral deferral, then the multipart upload, then the answer.
    let token = h.command(USER, can_add, add("me cartoon"));
    let cb = h.callback(&token).await;
    assert_eq!(
        (cb.callback_type(), cb.flags() & EPHEMERAL),
        (Some(5), EPHEMERAL)
    );
    let upload = h
        .wait("the sticker upload", |r| {
            r.is("POST", &format!("/guilds/{GUILD_ID}/stickers"))
        })
        .await;
    assert_eq!(
        upload.fields.get("name").map(String::as_str),
        Some("me cartoon")
    );
    assert_eq!(upload.fields.get("tags").map(String::as_str), Some("🙂"));
    assert_eq!(upload.files.len(), 1);
    assert_eq!(upload.files[0].field, "file");
    assert_eq!(
        upload.files[0].bytes, result.files[0].bytes,
        "face 1's sticker"
    );
    assert_eq!(
        png_info(&upload.files[0].bytes),
        (STICKER_SIZE, STICKER_SIZE, true)
    );
    let original = format!("/webhooks/{APP_ID}/{token}/messages/@original");
    let done = h
        .wait("the sticker answer", |r| r.is("PATCH", &original))
        .await;
    assert!(
        done.content().contains("Added the sticker **me cartoon**"),
        "{}",
        done.content()
    );

    // The latest result outlives a restart of the bot (it is kept in SQLite).
    h.stop().await;
    h.start().await;
    h.command(USER, can_add, add("after restart"));
    let upload = h
        .wait("the sticker upload after a restart", |r| {
            r.is("POST", &format!("/guilds/{GUILD_ID}/stickers"))
                && r.fields.get("name").map(String::as_str) == Some("after restart")
        })
        .await;
    assert_eq!(
        upload.files[0].bytes, result.files[0].bytes,
        "face 1's sticker, from before the restart"
    );

    // The guild's sticker slots are full.
    h.fake
        .fail_stickers(400, 30039, "Maximum number of stickers reached (5)");
    let token = h.command(USER, can_add, add("again"));
    let original = format!("/webhooks/{APP_ID}/{token}/messages/@original");
    let full = h
        .wait("the slots-full answer", |r| r.is("PATCH", &original))
        .await;
    assert!(
        full.content().contains("sticker slots are full"),
        "{}",
        full.content()
    );

    // A face that the result does not have.
    let face3 = FakeDiscord::sub_command_data(
        "sticker",
        "add",
        json!([{ "name": "name", "type": 3, "value": "x3" }, { "name": "face", "type": 4, "value": 3 }]),
    );
    assert_immediate_ephemeral(&h, &h.command(USER, can_add, face3), "pick face 1 to 2").await;
}

#[tokio::test]
async fn styles_are_listed_with_previews() {
    let h = harness(|_| {}).await;
    let token = h.command(
        USER,
        MEMBER,
        json!({ "id": "903", "name": "styles", "type": 1 }),
    );
    let cb = h.callback(&token).await;
    assert_eq!(
        (cb.callback_type(), cb.flags() & EPHEMERAL),
        (Some(4), EPHEMERAL)
    );
    assert!(
        cb.content().contains("**classic** (default)") && cb.content().contains("**ink**"),
        "{}",
        cb.content()
    );
    assert_eq!(cb.files.len(), 1, "one style has a preview");
    assert_eq!(png_info(&cb.files[0].bytes).0, 64);
    let embeds = cb
        .json
        .as_ref()
        .unwrap()
        .pointer("/data/embeds")
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        embeds[0]["image"]["url"],
        "attachment://preview-classic.png"
    );
}

#[tokio::test]
async fn server_settings_need_manage_server_and_set_the_default_style() {
    let h = harness(|_| {}).await;
    let data = json!({ "id": "904", "name": "server-settings", "type": 1, "options": [{ "name": "style", "type": 3, "value": "ink" }] });
    assert_immediate_ephemeral(&h, &h.command(USER, MEMBER, data.clone()), "Manage Server").await;
    let admin = Some(PERM_ALL_TEXT | support::discord::PERM_MANAGE_GUILD);
    assert_immediate_ephemeral(&h, &h.command(USER, admin, data), "style **ink**").await;
    // The guild default applies to members without a preset style.
    let token = h.cartoon(USER + 1, photo(1, Trigger::Normal, 1), None, None);
    h.result(&token).await;
    assert_eq!(h.renderer.log()[0].style.as_deref(), Some("ink"));
    assert_eq!(h.bot().store().audit_log(GUILD_ID).await.unwrap().len(), 1);
}

#[tokio::test]
async fn commands_are_registered_on_ready() {
    let h = harness(|_| {}).await;
    // Gateway: the token, and only the DIRECT_MESSAGES intent (no privileged intents).
    let identify = &h.fake.identifies()[0];
    assert_eq!(identify["token"], "Bot test-token");
    assert_eq!(identify["intents"], 1 << 12);
    let put = h
        .fake
        .requests()
        .into_iter()
        .find(|r| r.is("PUT", &format!("/applications/{APP_ID}/commands")))
        .unwrap();
    let commands = put.json.unwrap();
    let names: Vec<&str> = commands
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "cartoon",
            "Cartoonize",
            "preset",
            "styles",
            "sticker",
            "server-settings",
            "stylepack"
        ]
    );
    // /stylepack: server only, Manage Server by default, one sub command per action.
    let stylepack = &commands[6];
    assert_eq!(stylepack["contexts"], json!([0]));
    assert_eq!(stylepack["default_member_permissions"], "32");
    let subs: Vec<&str> = stylepack["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        subs,
        ["upload", "cancel", "resume", "publish", "delete", "list"]
    );
    assert_eq!(stylepack["options"][0]["options"][0]["type"], 11, "a file");
    let cartoon = &commands[0];
    assert_eq!(
        cartoon["options"][0]["type"], 11,
        "photo is an attachment option"
    );
    assert_eq!(cartoon["options"][0]["required"], true);
    assert_eq!(commands[1]["type"], 3, "Cartoonize is a message command");
    // Style autocomplete answers with the installed styles.
    let data = json!({ "id": "900", "name": "cartoon", "type": 1, "options": [{ "name": "style", "type": 3, "value": "i", "focused": true }] });
    let token = format!("tok{}", h.fake.next_id());
    let mut interaction = h.fake.command(&token, USER, MEMBER, data);
    interaction["type"] = json!(4);
    h.fake.dispatch("INTERACTION_CREATE", interaction);
    let cb = h.callback(&token).await;
    assert_eq!(cb.callback_type(), Some(8));
    let choices = cb
        .json
        .as_ref()
        .unwrap()
        .pointer("/data/choices")
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        choices
            .iter()
            .map(|c| c["value"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["classic", "ink"]
    );
}

#[tokio::test]
async fn one_log_line_per_job_with_timings_and_never_the_token() {
    let h = harness(|_| {}).await;
    let user = USER + 99;
    let token = h.cartoon(user, photo(1, Trigger::Normal, 1), None, None);
    h.result(&token).await;
    h.finished_job(user).await;
    let mine = " job job=";
    let user_field = format!(" user={user} ");
    // The job's line is written just after its end is stored: wait for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = String::from_utf8(logs().0.lock().unwrap().clone()).unwrap();
        let written = text
            .lines()
            .any(|l| l.contains(mine) && l.contains(&user_field));
        if written || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let leaks: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("test-token"))
        .take(5)
        .collect();
    assert!(
        leaks.is_empty(),
        "the bot token never reaches the logs: {leaks:#?}"
    );
    let job_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(mine) && l.contains(&user_field))
        .collect();
    assert_eq!(job_lines.len(), 1, "{job_lines:?}");
    println!("{}", job_lines[0]);
    for field in [
        "status=done",
        "faces=1",
        "queue_ms=",
        "render_ms=",
        "total_ms=",
        "source=\"slash\"",
    ] {
        assert!(job_lines[0].contains(field), "{field} in {}", job_lines[0]);
    }
}
