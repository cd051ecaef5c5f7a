//! The bot split into roles over a real `nats-server` (skipped with a message where it is not
//! installed; `.ci/run` installs it): a gateway that loads no models and takes `/cartoon` from
//! the fake Discord, a render worker on the test renderer, and responders that answer. The
//! gateway and the responders share the database: a SQLite file, and in one run PostgreSQL
//! (`tests/common/postgres.rs`; skipped, saying so, where there is none).

mod common;
#[path = "support/packs.rs"]
mod packs;
mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::discord::{FakeDiscord, Recorded, APP_ID, CHANNEL_ID, DM_CHANNEL_ID, GUILD_ID};
use support::harness::{png_info, MEMBER};
use support::renderer::{photo, TestRenderer, Trigger, STYLES};
use support::trainer::TestTrainer;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use toonbot::bot::{
    self, Backend, BotConfig, CartoonRequest, Delivery, Overrides, ReplyTarget, Resolved,
    RunningBot, ShardRange, Token,
};
use toonbot::cartoon::styles::StyleRegistry;
use toonbot::config::StylePackConfig;
use toonbot::jobs::loadtest::LocalNatsServer;
use toonbot::jobs::{
    run_workers, JetStreamConfig, JetStreamQueue, OutputKind, RenderRequest, Renderer,
    StyleCatalog, TrainingQueue,
};
use toonbot::store::{now_ms, Database, JobSource, NewJob, Store, StyleStatus};
use toonbot::stylepack::{
    install_published_styles, train_from_queue, GatewayPacks, PackSetup, StylePacks,
};

const T: Duration = Duration::from_secs(20);

fn nats_server() -> Option<LocalNatsServer> {
    if Command::new("nats-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED the role tests: nats-server is not on the PATH (.ci/run installs it)");
        return None;
    }
    Some(LocalNatsServer::start(Path::new("nats-server")).expect("starting nats-server"))
}

/// A broker, a worker on the test renderer, a gateway on the fake Discord, and responders
/// started on demand.
struct Roles {
    fake: Arc<FakeDiscord>,
    renderer: Arc<TestRenderer>,
    jetstream: JetStreamConfig,
    config: BotConfig,
    gateway: Option<RunningBot>,
    _worker: watch::Sender<bool>,
    _broker: LocalNatsServer,
    _dir: tempfile::TempDir,
}

/// A trainer task and its stop switch.
struct Trainer {
    task: JoinHandle<anyhow::Result<()>>,
    stop: watch::Sender<bool>,
}

impl Trainer {
    async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(packs::SLOW, self.task)
            .await
            .expect("the trainer stops")
            .unwrap()
            .expect("the trainer ran");
    }
}

/// A responder task and its stop switch.
struct Responder {
    task: JoinHandle<anyhow::Result<()>>,
    stop: oneshot::Sender<()>,
}

impl Roles {
    async fn start(shards: Option<ShardRange>) -> Option<Self> {
        Self::start_on(shards, None).await
    }

    /// [`Roles::start`] with the database at `database` (else a SQLite file).
    async fn start_on(shards: Option<ShardRange>, database: Option<Database>) -> Option<Self> {
        let broker = nats_server()?;
        let mut jetstream = JetStreamConfig::new(broker.url());
        // Short, so that a dead responder's hand-off moves on quickly.
        jetstream.ack_wait = Duration::from_secs(1);
        let renderer = Arc::new(TestRenderer::new());
        let (worker, stopped) = watch::channel(false);
        let (config_w, renderer_w) = (jetstream.clone(), Arc::clone(&renderer));
        tokio::spawn(async move {
            run_workers(&config_w, renderer_w as Arc<dyn Renderer>, 1, stopped)
                .await
                .expect("the worker runs");
        });
        let catalog = published_catalog(&jetstream).await;
        let queue = JetStreamQueue::connect(&jetstream, catalog.style_version())
            .await
            .unwrap();
        let fake = FakeDiscord::start().await;
        let dir = tempfile::tempdir().unwrap();
        let config = BotConfig {
            database: database.unwrap_or_else(|| dir.path().join("toonbot.sqlite").into()),
            allowed_cdn_hosts: vec!["127.0.0.1".into()],
            api_proxy: Some(fake.base.clone()),
            max_photo_bytes: 100_000,
            progress_interval_ms: 20,
            ..BotConfig::default()
        };
        let stylepacks = GatewayPacks {
            queue: TrainingQueue::connect(&jetstream).await.unwrap(),
            config: packs::pack_config(dir.path()),
            default_base: "classic".into(),
        };
        let gateway = bot::start_backend(
            config.clone(),
            Token::new("test-token"),
            Backend::Gateway {
                queue,
                catalog,
                shards,
                stylepacks: Some(stylepacks),
            },
        )
        .await
        .unwrap();
        fake.wait_ready(1).await;
        Some(Self {
            fake,
            renderer,
            jetstream,
            config,
            gateway: Some(gateway),
            _worker: worker,
            _broker: broker,
            _dir: dir,
        })
    }

    fn gateway(&self) -> &RunningBot {
        self.gateway.as_ref().unwrap()
    }

    async fn queue(&self) -> JetStreamQueue {
        let catalog = published_catalog(&self.jetstream).await;
        JetStreamQueue::connect(&self.jetstream, catalog.style_version())
            .await
            .unwrap()
    }

    async fn responder(&self) -> Responder {
        let queue = self.queue().await;
        let (stop, stopped) = oneshot::channel::<()>();
        let training = TrainingQueue::connect(&self.jetstream).await.unwrap();
        let task = tokio::spawn(bot::respond(
            self.config.clone(),
            Token::new("test-token"),
            queue,
            training,
            async move {
                let _ = stopped.await;
            },
        ));
        Responder { task, stop }
    }

    /// `/cartoon` with a one-face photo, asking for stickers; returns the interaction token.
    fn cartoon(&self, user: u64, style: Option<&str>) -> String {
        let image = photo(1, Trigger::Normal, user as u32);
        let attachment = self.fake.attachment("photo.png", "image/png", image, None);
        let token = format!("tok{}", self.fake.next_id());
        let data = FakeDiscord::cartoon_data(&attachment, style, Some("sticker"));
        self.fake.dispatch(
            "INTERACTION_CREATE",
            self.fake.command(&token, user, MEMBER, data),
        );
        token
    }

    /// A trainer process's part (`--work train`): style packs on the roles' database, trained
    /// by `trainer` from `classic` (random weights) in `<dir>/shipped`, in `<dir>/packs`.
    async fn trainer(&self, trainer: &Arc<TestTrainer>) -> Trainer {
        self.trainer_in(trainer, "packs").await
    }

    /// [`Roles::trainer`] keeping its packs in `<dir>/<folder>` (another machine's disk).
    async fn trainer_in(&self, trainer: &Arc<TestTrainer>, folder: &str) -> Trainer {
        self.trainer_with(Some(Arc::clone(trainer) as _), folder)
            .await
    }

    /// [`Roles::trainer_in`] with `trainer` (`None`: a host that cannot train).
    async fn trainer_with(
        &self,
        trainer: Option<Arc<dyn toonbot::stylepack::StyleTrainer>>,
        folder: &str,
    ) -> Trainer {
        let dir = self._dir.path();
        if !dir.join("shipped/classic").exists() {
            common::install_random_style(&dir.join("shipped"), "classic");
        }
        let setup = PackSetup {
            config: StylePackConfig {
                dir: dir.join(folder),
                ..packs::pack_config(dir)
            },
            registry: StyleRegistry::new(dir.join("shipped"), dir.join("styles")),
            default_base: "classic".into(),
            faces: packs::faces(),
            trainer,
        };
        let store = Store::connect(&self.config.database).await.unwrap();
        let training = TrainingQueue::connect(&self.jetstream).await.unwrap();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(train_from_queue(
            StylePacks::new(setup, store),
            training,
            Duration::from_millis(20),
            stopped,
        ));
        Trainer { task, stop }
    }

    /// `/stylepack upload` of `images` drawn faces as `name`; the interaction token.
    fn upload(&self, name: &str, images: u32) -> String {
        let zip = packs::zip_of(&packs::faces_entries(images));
        let interaction =
            packs::upload_interaction(&self.fake, packs::ADMIN_PERMS, zip, name, None);
        let token = interaction["token"].as_str().unwrap().to_string();
        self.fake.dispatch("INTERACTION_CREATE", interaction);
        token
    }

    /// `/stylepack <sub> [name]` by the admin; waits for the answer that contains `needle`.
    async fn admin(&self, sub: &str, name: Option<&str>, needle: &str) -> Recorded {
        let options = match name {
            Some(n) => serde_json::json!([{ "name": "name", "type": 3, "value": n }]),
            None => serde_json::json!([]),
        };
        let token = format!("tok{}", self.fake.next_id());
        let data = FakeDiscord::sub_command_data("stylepack", sub, options);
        let command = self
            .fake
            .command(&token, packs::ADMIN, packs::ADMIN_PERMS, data);
        self.fake.dispatch("INTERACTION_CREATE", command);
        self.wait(&format!("the answer to /stylepack {sub}"), |r| {
            r.path.contains(&token) && r.content().contains(needle)
        })
        .await
    }

    /// What the bot posted or edited in the channel.
    fn channel_posts(&self) -> Vec<Recorded> {
        let messages = format!("/channels/{CHANNEL_ID}/messages");
        self.fake
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with(&messages))
            .collect()
    }

    async fn wait_post(&self, what: &str, pred: impl Fn(&Recorded) -> bool) -> Recorded {
        let messages = format!("/channels/{CHANNEL_ID}/messages");
        self.fake
            .wait_for(what, packs::SLOW, |r| {
                r.path.starts_with(&messages) && pred(r)
            })
            .await
    }

    async fn wait(&self, what: &str, pred: impl Fn(&Recorded) -> bool) -> Recorded {
        self.fake.wait_for(what, T, pred).await
    }

    fn count(&self, pred: impl Fn(&Recorded) -> bool) -> usize {
        self.fake.requests().iter().filter(|r| pred(r)).count()
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        self.renderer.open_gate();
    }
}

/// The catalog once the worker has published its styles.
async fn published_catalog(config: &JetStreamConfig) -> StyleCatalog {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let catalog = StyleCatalog::follow(config).await.unwrap();
        if !catalog.styles().is_empty() {
            return catalog;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker published its styles"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn original(token: &str) -> String {
    format!("/webhooks/{APP_ID}/{token}/messages/@original")
}

fn is_result(token: &str) -> impl Fn(&Recorded) -> bool {
    let path = original(token);
    move |r| r.is("PATCH", &path) && !r.files.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_queues_a_worker_renders_and_a_responder_answers() {
    if let Some(roles) = Roles::start(None).await {
        queue_render_answer(roles).await;
    }
}

/// The same with the gateway's and the responder's database on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_and_a_responder_share_the_job_on_postgres() {
    let test = "a_gateway_and_a_responder_share_the_job_on_postgres";
    let Some(pg) = common::postgres::database(test).await else {
        return;
    };
    let database = Database::Postgres(pg.url().to_string());
    if let Some(roles) = Roles::start_on(None, Some(database)).await {
        queue_render_answer(roles).await;
    }
}

async fn queue_render_answer(roles: Roles) {
    let responder = roles.responder().await;

    // Style names are checked against the styles the worker published: the gateway has none.
    let token = roles.cartoon(7, Some("no-such-style"));
    let refused = roles
        .wait("the style refusal", |r| {
            r.method == "POST" && r.path.ends_with(&format!("/{token}/callback"))
        })
        .await;
    assert_eq!(refused.callback_type(), Some(4), "answered at once");
    for style in STYLES {
        assert!(refused.content().contains(style), "{}", refused.content());
    }

    let token = roles.cartoon(7, Some(STYLES[1]));
    let deferred = roles
        .wait("the deferral", |r| {
            r.method == "POST" && r.path.ends_with(&format!("/{token}/callback"))
        })
        .await;
    assert_eq!(deferred.callback_type(), Some(5));
    let result = roles.wait("the results", is_result(&token)).await;
    assert_eq!(result.files.len(), 1, "one sticker");
    assert_eq!(png_info(&result.files[0].bytes), (320, 320, true));
    assert_eq!(roles.renderer.calls(), 1);
    assert_eq!(
        roles.renderer.log()[0].style.as_deref(),
        Some(STYLES[1]),
        "the worker rendered the style asked for"
    );

    // The responder recorded the job's end in the shared database.
    let job = ended_job(&roles, 7).await;
    assert_eq!(job.status, "done");
    assert_eq!(job.faces, Some(1));
    // Past another lease: the hand-off was acknowledged, nobody answers again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(roles.count(is_result(&token)), 1);
    assert!(
        roles.count(|r| r.method == "PUT" && r.path.ends_with("/commands")) >= 1,
        "the gateway of shard 0 registered the commands"
    );

    let _ = responder.stop.send(());
    responder.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_responder_that_dies_mid_answer_is_replaced_and_the_user_answered_once() {
    let Some(roles) = Roles::start(None).await else {
        return;
    };
    roles.renderer.close_gate();
    let first = roles.responder().await;
    let token = roles.cartoon(8, None);
    // The first responder shows the progress, then dies with the hand-off in hand.
    let path = original(&token);
    roles
        .wait("a progress edit", |r| {
            r.is("PATCH", &path) && r.files.is_empty()
        })
        .await;
    first.task.abort();
    let _ = first.task.await;
    let second = roles.responder().await;
    roles.renderer.open_gate();
    roles.wait("the results", is_result(&token)).await;
    // Past another lease: nobody answers again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(roles.count(is_result(&token)), 1, "answered exactly once");
    assert_eq!(roles.renderer.calls(), 1, "rendered once");
    let _ = second.stop.send(());
    second.task.await.unwrap().unwrap();
}

/// What a gateway does for `/cartoon` with a one-face photo, done by hand: the job queued
/// (unless `key` names one), its row, and the reply handed over for an interaction received
/// at `received_ms` with `token`. Returns the job's row id.
async fn hand_over(
    roles: &Roles,
    queue: &JetStreamQueue,
    user: u64,
    key: Option<&str>,
    token: &str,
    received_ms: i64,
) -> i64 {
    let image = photo(1, Trigger::Normal, user as u32);
    let options = Resolved {
        style: None,
        output: OutputKind::Sticker,
        outline: true,
        round_avatar: false,
    };
    let key = match key {
        Some(key) => key.to_string(),
        None => {
            let job = queue
                .submit(
                    user,
                    RenderRequest {
                        image: image.clone(),
                        style: None,
                        output: options.output,
                        outline: options.outline,
                        round_avatar: options.round_avatar,
                    },
                )
                .await
                .unwrap();
            job.broker_key().unwrap().to_string()
        }
    };
    let request = CartoonRequest {
        user_id: user,
        guild_id: Some(GUILD_ID),
        channel_id: CHANNEL_ID,
        source: JobSource::Slash,
        overrides: Overrides::default(),
    };
    let job_id = roles
        .gateway()
        .store()
        .insert_job(&NewJob {
            user_id: user,
            guild_id: request.guild_id,
            channel_id: CHANNEL_ID,
            source: JobSource::Slash,
            image_sha256: None,
            style: None,
            output: "sticker".into(),
            reply: None,
        })
        .await
        .unwrap();
    let delivery = Delivery {
        job_id,
        request,
        options,
        target: ReplyTarget::Interaction {
            id: 5_000 + user,
            application_id: APP_ID,
            token: token.into(),
            user,
            channel: CHANNEL_ID,
            received_ms,
        },
        key,
        shared: false,
        started_ms: received_ms,
        bytes: image.len(),
    };
    queue
        .hand_off(
            &delivery.handoff_id(),
            serde_json::to_vec(&delivery).unwrap(),
        )
        .await
        .unwrap();
    job_id
}

/// The job's row once the responder has recorded its end.
async fn ended_job(roles: &Roles, user: u64) -> toonbot::store::JobRecord {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let job = roles
            .gateway()
            .store()
            .recent_jobs(user, 1)
            .await
            .unwrap()
            .pop();
        if let Some(job) = job.filter(|j| j.finished_at.is_some()) {
            return job;
        }
        assert!(tokio::time::Instant::now() < deadline, "the job ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_after_the_interaction_token_expired_goes_to_a_dm() {
    let Some(roles) = Roles::start(None).await else {
        return;
    };
    let responder = roles.responder().await;
    let queue = roles.queue().await;
    // Received 16 minutes ago: Discord no longer accepts edits with its token.
    let received_ms = now_ms() - 16 * 60 * 1000;
    hand_over(&roles, &queue, 9, None, "expired-token", received_ms).await;

    let dm_messages = format!("/channels/{DM_CHANNEL_ID}/messages");
    let late = roles
        .wait("the late answer by DM", |r| {
            r.is("POST", &dm_messages) && !r.files.is_empty()
        })
        .await;
    assert!(
        late.content().contains(&format!("<#{CHANNEL_ID}>")),
        "{}",
        late.content()
    );
    assert_eq!(png_info(&late.files[0].bytes), (320, 320, true));
    assert_eq!(
        roles.count(|r| r.is("POST", "/users/@me/channels")),
        1,
        "one DM channel opened"
    );
    assert_eq!(
        roles.count(|r| r.path.contains("expired-token")),
        0,
        "the expired token is not used"
    );
    assert_eq!(ended_job(&roles, 9).await.status, "done");
    let _ = responder.stop.send(());
    responder.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reply_whose_job_expired_tells_the_user_instead_of_waiting_forever() {
    let Some(roles) = Roles::start(None).await else {
        return;
    };
    let responder = roles.responder().await;
    let queue = roles.queue().await;
    hand_over(&roles, &queue, 10, Some("gone"), "tok-gone", now_ms()).await;
    let followup = roles
        .wait("the error follow-up", |r| {
            r.is("POST", &format!("/webhooks/{APP_ID}/tok-gone"))
        })
        .await;
    assert_eq!(followup.flags() & 64, 64, "ephemeral");
    let job = ended_job(&roles, 10).await;
    assert_eq!(job.status, "failed");
    assert_eq!(job.error.as_deref(), Some("internal"));
    let _ = responder.stop.send(());
    responder.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_connects_its_shards_only_and_leaves_the_commands_to_shard_zero() {
    let shards: ShardRange = "1..2/2".parse().unwrap();
    let Some(roles) = Roles::start(Some(shards)).await else {
        return;
    };
    let identifies = roles.fake.identifies();
    assert_eq!(identifies.len(), 1);
    assert_eq!(identifies[0]["shard"], serde_json::json!([1, 2]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        roles.count(|r| r.method == "PUT" && r.path.ends_with("/commands")),
        0,
        "shard 0's gateway registers the commands"
    );
}

/// A pack uploaded to a gateway (no models there) is checked and queued; a trainer takes it,
/// prepares and trains it, recording the run in the shared database; a responder posts the
/// progress message, the previews and the end in the channel. Renders go on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_queues_a_pack_a_trainer_trains_it_and_a_responder_tells_the_channel() {
    let Some(roles) = Roles::start(None).await else {
        return;
    };
    let _responder = roles.responder().await;
    let test_trainer = Arc::new(TestTrainer::new(Duration::from_millis(30)));
    test_trainer.hold_before(3);
    let trainer = roles.trainer(&test_trainer).await;
    let token = roles.upload("neon", 12);
    let original = original(&token);
    let answer = roles
        .wait("the upload's answer", |r| {
            r.is("PATCH", &original) && r.content().contains("Queued to train")
        })
        .await;
    assert!(
        answer.content().contains("12 images accepted"),
        "{}",
        answer.content()
    );
    let busy = roles.upload("other", 12);
    let refused = roles
        .wait("the second upload's answer", |r| {
            r.path.contains(&busy) && r.content().contains("already has a style pack")
        })
        .await;
    assert!(refused.content().contains("one per server"));
    tokio::task::spawn_blocking({
        let t = Arc::clone(&test_trainer);
        move || t.wait_holding(3)
    })
    .await
    .unwrap();
    let sticker = roles.cartoon(41, None);
    roles
        .wait("a sticker while the pack trains", is_result(&sticker))
        .await;
    test_trainer.release();
    let end = roles
        .wait_post("the evaluation", |r| {
            r.content().contains("is ready as a draft")
        })
        .await;
    assert!(end.content().contains("KID×100 4.25"), "{}", end.content());
    assert_eq!(end.files.len(), 1, "the latest preview");
    let posts = roles.channel_posts();
    let started: Vec<_> = posts
        .iter()
        .filter(|r| r.method == "POST" && r.content().contains("neon"))
        .collect();
    assert!(
        started[0].content().contains("Training"),
        "{}",
        started[0].content()
    );
    assert!(
        posts
            .iter()
            .any(|r| r.method == "PATCH" && r.content().contains("trained from")),
        "the progress message's last edit"
    );
    assert!(
        posts.iter().filter(|r| !r.files.is_empty()).count() >= 2,
        "previews posted"
    );
    let store = Store::connect(&roles.config.database).await.unwrap();
    let style = store.guild_style("neon").await.unwrap().unwrap();
    assert_eq!(style.status, StyleStatus::Draft);
    assert_eq!(test_trainer.starts(), vec![0]);
    trainer.stop().await;

    // Published from the gateway, the style reaches a render worker's styles; deleted, it
    // goes away there too.
    let dir = roles._dir.path();
    let render_styles = dir.join("render-styles");
    let (_installer, installing) = watch::channel(false);
    tokio::spawn(install_published_styles(
        TrainingQueue::connect(&roles.jetstream).await.unwrap(),
        StyleRegistry::new(dir.join("render-shipped"), &render_styles),
        installing,
    ));
    roles
        .admin("publish", Some("neon"), "Published **neon**")
        .await;
    let installed = render_styles.join("neon");
    until_path(&installed, true).await;
    // The test trainer's style is the base's generator: the same bytes arrive.
    assert_eq!(
        std::fs::read(installed.join("generator.safetensors")).unwrap(),
        std::fs::read(dir.join("shipped/classic/generator.safetensors")).unwrap()
    );
    assert!(
        !dir.join(format!("packs/{GUILD_ID}/neon")).exists(),
        "the trainer's folder went once the draft was on the broker"
    );
    let style = store.guild_style("neon").await.unwrap().unwrap();
    assert_eq!(style.status, StyleStatus::Published);
    roles
        .admin("delete", Some("neon"), "Deleted the style pack **neon**")
        .await;
    until_path(&installed, false).await;
    assert!(store.guild_style("neon").await.unwrap().is_none());
    let training = TrainingQueue::connect(&roles.jetstream).await.unwrap();
    let left: Vec<String> = training
        .file_keys("")
        .await
        .unwrap()
        .into_iter()
        .map(|(key, _)| key)
        .filter(|key| key.contains("neon"))
        .collect();
    assert!(left.is_empty(), "files left on the broker: {left:?}");
}

/// A pack that no trainer can take on (here: trainers without a trainer installed) is tried
/// `max_failures` times, then set aside, and its uploader told in the channel; its archive
/// does not stay on the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pack_that_keeps_failing_on_the_trainers_is_set_aside_and_its_uploader_told() {
    let Some(roles) = Roles::start(None).await else {
        return;
    };
    let _responder = roles.responder().await;
    let trainer = roles.trainer_with(None, "packs").await;
    roles.upload("rust", 12);
    let told = roles
        .wait_post("the set-aside pack's news", |r| {
            r.content().contains("couldn't be trained")
        })
        .await;
    assert!(told.content().contains("set aside"), "{}", told.content());
    assert!(told.content().contains(&format!("<@{}>", packs::ADMIN)));
    let training = TrainingQueue::connect(&roles.jetstream).await.unwrap();
    let left = training.file_keys("archive.").await.unwrap();
    assert!(left.is_empty(), "{left:?}");
    assert!(!training.is_busy(GUILD_ID).await.unwrap(), "nothing queued");
    trainer.stop().await;
}

/// Waits (bounded) until `path` exists, or (`false`) is gone.
async fn until_path(path: &Path, exists: bool) {
    let deadline = tokio::time::Instant::now() + T;
    while path.exists() != exists {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} exists: {exists}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A trainer that stops mid-run leaves the pack to the next trainer, on another machine:
/// it restores the pack from the uploaded archive, prepares and trains it again, and edits
/// the same progress message. `/stylepack cancel` on a gateway reaches that trainer, and
/// `/stylepack resume` continues from its checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_packs_are_cancelled_from_a_gateway_and_taken_over_by_the_next_trainer() {
    let Some(roles) = Roles::start(None).await else {
        return;
    };
    let _responder = roles.responder().await;
    let test_trainer = Arc::new(TestTrainer::new(Duration::from_millis(30)));
    test_trainer.hold_before(3);
    let first = roles.trainer(&test_trainer).await;
    roles.upload("mint", 12);
    let wait_holding = |step: u32| {
        let t = Arc::clone(&test_trainer);
        tokio::task::spawn_blocking(move || t.wait_holding(step))
    };
    wait_holding(3).await.unwrap();
    roles
        .wait_post("the progress message", |r| {
            r.method == "POST" && r.content().contains("Training **mint**")
        })
        .await;
    first.stop().await;
    test_trainer.hold_before(4);
    let second = roles.trainer_in(&test_trainer, "other-machine").await;
    wait_holding(4).await.unwrap();
    assert_eq!(
        test_trainer.starts(),
        vec![0, 0],
        "no checkpoint on the other machine"
    );
    let restored = roles
        ._dir
        .path()
        .join(format!("other-machine/{GUILD_ID}/mint/train"));
    assert_eq!(
        std::fs::read_dir(restored).unwrap().count(),
        10,
        "prepared again"
    );
    let cancel = roles.fake.command(
        &format!("tok{}", roles.fake.next_id()),
        packs::ADMIN,
        packs::ADMIN_PERMS,
        FakeDiscord::sub_command_data("stylepack", "cancel", serde_json::json!([])),
    );
    let token = cancel["token"].as_str().unwrap().to_string();
    roles.fake.dispatch("INTERACTION_CREATE", cancel);
    roles
        .wait("the cancel's answer", |r| {
            r.path.contains(&token) && r.content().contains("Stopping **mint**")
        })
        .await;
    test_trainer.release();
    roles
        .wait_post("the cancelled end", |r| {
            r.method == "PATCH" && r.content().contains("was cancelled")
        })
        .await;
    let posts = roles.channel_posts();
    let progress_posts = posts
        .iter()
        .filter(|r| r.method == "POST" && r.content().contains("Training **mint**"))
        .count();
    assert_eq!(
        progress_posts, 1,
        "one progress message, edited by both trainers"
    );
    assert!(
        posts
            .iter()
            .any(|r| r.method == "PATCH" && r.content().contains("resumes at step")),
        "the second trainer's start edits the same message"
    );
    let store = Store::connect(&roles.config.database).await.unwrap();
    let style = store.guild_style("mint").await.unwrap().unwrap();
    assert_eq!(style.status, StyleStatus::Cancelled);

    // Resumed from the gateway: a trainer continues from the checkpoint to a draft.
    roles
        .admin("resume", Some("mint"), "Queued **mint** to train again")
        .await;
    roles
        .wait_post("the resumed pack's end", |r| {
            r.content().contains("**mint** is ready as a draft")
        })
        .await;
    let starts = test_trainer.starts();
    assert_eq!(starts.len(), 3, "{starts:?}");
    assert!(starts[2] >= 3, "from the checkpoint: {starts:?}");
    let style = store.guild_style("mint").await.unwrap().unwrap();
    assert_eq!(style.status, StyleStatus::Draft);
    second.stop().await;
}

/// `/stylepack cancel` on a gateway takes a pack no trainer has started out of the queue:
/// nothing queued or kept on the broker, no pack recorded, and the server may upload again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pack_waiting_for_a_trainer_is_cancelled_from_the_gateway() {
    let Some(roles) = Roles::start(None).await else {
        return;
    };
    let token = roles.upload("queued", 12);
    let original = original(&token);
    roles
        .wait("the upload's answer", |r| {
            r.is("PATCH", &original) && r.content().contains("Queued to train")
        })
        .await;
    roles
        .admin("cancel", None, "Took **queued** out of the training queue")
        .await;
    let training = TrainingQueue::connect(&roles.jetstream).await.unwrap();
    assert!(!training.is_busy(GUILD_ID).await.unwrap());
    assert!(training.file_keys("archive.").await.unwrap().is_empty());
    let store = Store::connect(&roles.config.database).await.unwrap();
    assert!(store.guild_style("queued").await.unwrap().is_none());
    roles.admin("cancel", None, "Nothing is training").await;
}
