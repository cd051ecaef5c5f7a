//! The render queue over NATS JetStream, for bots that run as several processes (DESIGN.md
//! §6b): gateways submit, workers render, and nothing but keys travels in messages.
//!
//! - **Stream** `{prefix}_RENDERS`, subjects `{prefix}.render.{user}`, work-queue retention:
//!   a job's message stays until a worker acks it. `max_messages_per_subject` with
//!   discard-new-per-subject is the per-user cap across processes; `max_messages` the
//!   capacity (queued and running jobs).
//! - **Key-value** `{prefix}_jobs`: one record per job, keyed by the request's [`CacheKey`],
//!   so that an identical request attaches to the job (and, once done, to its result) instead
//!   of rendering again. Every change is a compare-and-set on the record's revision: a job
//!   finishes once even when a worker thought dead comes back.
//! - **Object stores** `{prefix}_photos` (by image hash) and `{prefix}_results` (by job key).
//! - **Consumer** `renderers`: one message at a time per worker; the lease (`ack_wait`) is
//!   extended while a render runs; a renderer fault is retried after a growing delay, and a
//!   job that has failed `max_failures` times (crashes included) goes to
//!   `{prefix}.dead.render` with a clear error for its user.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_nats::jetstream::{
    self, consumer, kv,
    message::AckKind,
    object_store::{self, ObjectStore},
    stream, Context,
};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

mod catalog;
mod handoff;
mod training;

pub use catalog::StyleCatalog;
pub use handoff::{Handoff, Handoffs};
pub use training::{
    CancelRequest, CancelRequests, NewsItem, TrainingJob, TrainingJobEnd, TrainingJobs,
    TrainingNews, TrainingQueue, TrainingSubmitError,
};

use super::{
    image_hash, CacheKey, FileKind, JobHandle, JobOutcome, JobStatus, RenderError, RenderOutput,
    RenderRequest, RenderedFile, Renderer, SubmitError,
};

/// Where the broker is and how its queue behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct JetStreamConfig {
    /// `nats://host:port`.
    pub url: String,
    /// Names every stream, bucket and subject (`toonbot` by default): several bots, or
    /// tests, can share one server.
    pub prefix: String,
    /// Jobs queued or running in all; more are refused with `QueueFull`.
    pub capacity: usize,
    /// Jobs one user may have queued or running at once.
    pub per_user_limit: usize,
    /// How long a worker holds a job without a sign of life before it goes to another.
    pub ack_wait: Duration,
    /// Failed attempts (renderer faults, worker crashes) before a job is set aside.
    pub max_failures: u32,
    /// How long a finished job's record and result are kept (and identical requests served
    /// from them).
    pub keep_results: Duration,
}

impl JetStreamConfig {
    /// Defaults for a broker at `url`.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
            prefix: "toonbot".into(),
            capacity: 64,
            per_user_limit: 3,
            ack_wait: Duration::from_secs(30),
            max_failures: 3,
            keep_results: Duration::from_secs(3600),
        }
    }

    fn stream(&self) -> String {
        format!("{}_RENDERS", self.prefix.to_uppercase())
    }

    fn user_subject(&self, user: u64) -> String {
        format!("{}.render.{user}", self.prefix)
    }

    fn dead_letter_subject(&self) -> String {
        format!("{}.dead.render", self.prefix)
    }

    fn reply_subject(&self) -> String {
        format!("{}.reply", self.prefix)
    }
}

/// A job's state in the key-value store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum JobState {
    Queued,
    Running,
    /// Rendered: the result is in the results store under the job's key.
    Done,
    /// Ended with the user's error (no face, not an image, ...), or set aside.
    Failed,
    Cancelled,
}

/// The job record, one per [`CacheKey`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct JobRecord {
    state: JobState,
    user: u64,
    /// The job message's stream sequence (its place in the queue).
    seq: u64,
    submitted_ms: u64,
    wait_ms: f64,
    render_ms: f64,
    /// Deliveries so far (1 on the first attempt).
    deliveries: u64,
    error: Option<StoredError>,
}

/// A [`RenderError`] as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredError {
    code: String,
    message: String,
    available: Vec<String>,
}

impl From<&RenderError> for StoredError {
    fn from(e: &RenderError) -> Self {
        let (message, available) = match e {
            RenderError::TooLarge(m) | RenderError::Internal(m) => (m.clone(), Vec::new()),
            RenderError::StyleMissing { name, available } => (name.clone(), available.clone()),
            _ => (String::new(), Vec::new()),
        };
        Self {
            code: e.code().into(),
            message,
            available,
        }
    }
}

impl From<StoredError> for RenderError {
    fn from(e: StoredError) -> Self {
        match e.code.as_str() {
            "not_an_image" => Self::NotAnImage,
            "too_large" => Self::TooLarge(e.message),
            "no_face" => Self::NoFace,
            "style_missing" => Self::StyleMissing {
                name: e.message,
                available: e.available,
            },
            "no_style_installed" => Self::NoStyleInstalled,
            _ => Self::Internal(e.message),
        }
    }
}

/// The job message: keys only.
#[derive(Debug, Serialize, Deserialize)]
struct JobMessage {
    key: String,
    photo: String,
    style: Option<String>,
    output: super::OutputKind,
    outline: bool,
    round_avatar: bool,
}

/// The header of a stored result; the files' bytes follow it in order.
#[derive(Serialize, Deserialize)]
struct StoredOutput {
    files: Vec<(String, FileKind, usize)>,
    faces: usize,
    faces_found: usize,
    style: String,
    timings_ms: Vec<(String, f64)>,
}

/// A result as one object: the header's length (u32 LE), the header as JSON, the files.
fn encode_output(output: &RenderOutput) -> Vec<u8> {
    let header = StoredOutput {
        files: output
            .files
            .iter()
            .map(|f| (f.name.clone(), f.kind, f.png.len()))
            .collect(),
        faces: output.faces,
        faces_found: output.faces_found,
        style: output.style.clone(),
        timings_ms: output.timings_ms.clone(),
    };
    let header = serde_json::to_vec(&header).expect("a result header serialises");
    let mut out = (header.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    for file in &output.files {
        out.extend_from_slice(&file.png);
    }
    out
}

fn decode_output(bytes: &[u8]) -> Result<RenderOutput, String> {
    let bad = || "a stored result is damaged".to_string();
    let len = u32::from_le_bytes(
        bytes
            .get(..4)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    let body = &bytes[4..];
    let header: StoredOutput =
        serde_json::from_slice(body.get(..len as usize).ok_or_else(bad)?).map_err(|_| bad())?;
    let mut rest = &body[len as usize..];
    let mut files = Vec::new();
    for (name, kind, size) in header.files {
        let png = rest.get(..size).ok_or_else(bad)?.to_vec();
        rest = &rest[size..];
        files.push(RenderedFile { name, kind, png });
    }
    Ok(RenderOutput {
        files,
        faces: header.faces,
        faces_found: header.faces_found,
        style: header.style,
        timings_ms: header.timings_ms,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> SubmitError {
    SubmitError::Unavailable(format!("{what}: {e}"))
}

/// The broker's handles shared by submitters and workers.
struct Broker {
    config: JetStreamConfig,
    js: Context,
    stream: stream::Stream,
    jobs: kv::Store,
    photos: ObjectStore,
    results: ObjectStore,
    /// The workers' style catalog ([`StyleCatalog`]).
    styles: ObjectStore,
    replies: stream::Stream,
}

impl Broker {
    /// Connects and creates what is missing (streams, bucket, object stores, consumer).
    async fn connect(config: &JetStreamConfig) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(&config.url)
            .await
            .with_context(|| format!("connecting to {}", config.url))?;
        let js = jetstream::new(client);
        let stream = ensure_stream(
            &js,
            stream::Config {
                name: config.stream(),
                subjects: vec![format!("{}.render.*", config.prefix)],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                max_messages: config.capacity as i64,
                max_messages_per_subject: config.per_user_limit.max(1) as i64,
                discard: stream::DiscardPolicy::New,
                discard_new_per_subject: true,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            },
        )
        .await
        .context("creating the render stream")?;
        let replies = ensure_stream(
            &js,
            stream::Config {
                name: format!("{}_REPLIES", config.prefix.to_uppercase()),
                subjects: vec![config.reply_subject()],
                retention: stream::RetentionPolicy::WorkQueue,
                // A reply is no use once its job's record is gone.
                max_age: config.keep_results,
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            },
        )
        .await
        .context("creating the reply stream")?;
        dead_letter_stream(&js, config).await?;
        // The bucket's stream as `create_key_value` would make it: that call first asks for
        // the account's limits, an answer this client cannot read from a 2.9 server.
        let bucket = format!("{}_jobs", config.prefix);
        ensure_stream(
            &js,
            stream::Config {
                name: format!("KV_{bucket}"),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                max_age: config.keep_results,
                storage: stream::StorageType::File,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: stream::DiscardPolicy::New,
                num_replicas: 1,
                ..Default::default()
            },
        )
        .await
        .context("creating the jobs bucket")?;
        let jobs = js
            .get_key_value(&bucket)
            .await
            .context("opening the jobs bucket")?;
        let photos = object_store(&js, config, "photos", config.keep_results)
            .await
            .context("creating the photo store")?;
        let results = object_store(&js, config, "results", config.keep_results)
            .await
            .context("creating the result store")?;
        let styles = object_store(&js, config, "styles", Duration::ZERO)
            .await
            .context("creating the style catalog store")?;
        stream
            .get_or_create_consumer(
                "renderers",
                consumer::pull::Config {
                    durable_name: Some("renderers".into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: config.ack_wait,
                    // One more delivery than failures allowed: the last one only sets the job
                    // aside, so that a job that kills its worker is set aside too.
                    max_deliver: i64::from(config.max_failures) + 1,
                    ..Default::default()
                },
            )
            .await
            .context("creating the render consumer")?;
        Ok(Self {
            config: config.clone(),
            js,
            stream,
            jobs,
            photos,
            results,
            styles,
            replies,
        })
    }

    /// The job's record and its revision; `Ok(None)` when there is none (or it is not one
    /// of ours), an error when the broker could not say.
    async fn record(&self, key: &str) -> Result<Option<(JobRecord, u64)>, kv::EntryError> {
        let Some(entry) = self.jobs.entry(key).await? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        Ok(serde_json::from_slice(&entry.value)
            .ok()
            .map(|record| (record, entry.revision)))
    }

    /// Replaces the record at `revision`; `None` when it changed in between.
    async fn update(&self, key: &str, record: &JobRecord, revision: u64) -> Option<u64> {
        let value = Bytes::from(serde_json::to_vec(record).expect("a job record serialises"));
        self.jobs.update(key, value, revision).await.ok()
    }

    /// Writes a job's last record over `revision`. True once the record has moved on from
    /// `revision`, by this write or another's (a worker that lost its lease and came back);
    /// false when the broker did not take the write (restarting, unreachable): acking the
    /// job's message then would leave its record running with nothing left to finish it.
    async fn finish(&self, key: &str, record: &JobRecord, revision: u64) -> bool {
        if self.update(key, record, revision).await.is_some() {
            return true;
        }
        match self.record(key).await {
            Ok(Some((_, now))) => now != revision,
            Ok(None) => true,
            Err(_) => false,
        }
    }

    async fn consumer(&self) -> anyhow::Result<consumer::Consumer<consumer::pull::Config>> {
        self.stream
            .get_consumer("renderers")
            .await
            .map_err(|e| anyhow::anyhow!(e))
    }
}

/// The stream of `config`, created when missing. Processes starting together may race to
/// create it (the server then refuses all but one): the loser finds it on a second look.
async fn ensure_stream(js: &Context, config: stream::Config) -> anyhow::Result<stream::Stream> {
    let mut tries = 0;
    loop {
        match js.get_or_create_stream(config.clone()).await {
            Ok(stream) => return Ok(stream),
            Err(e) if tries < 3 => {
                tracing::debug!("creating stream {}: {e}; looking again", config.name);
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100 * tries)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The stream of set-aside jobs, `{prefix}.dead.>`, kept a week for the host to look at.
async fn dead_letter_stream(js: &Context, config: &JetStreamConfig) -> anyhow::Result<()> {
    ensure_stream(
        js,
        stream::Config {
            name: format!("{}_DEAD", config.prefix.to_uppercase()),
            subjects: vec![format!("{}.dead.>", config.prefix)],
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(7 * 24 * 3600),
            ..Default::default()
        },
    )
    .await
    .context("creating the dead-letter stream")?;
    Ok(())
}

/// The object store `{prefix}_{name}`, created when missing; objects older than `max_age`
/// (zero: none) are removed.
async fn object_store(
    js: &Context,
    config: &JetStreamConfig,
    name: &str,
    max_age: Duration,
) -> anyhow::Result<ObjectStore> {
    let bucket = format!("{}_{name}", config.prefix);
    match js.get_object_store(&bucket).await {
        Ok(store) => Ok(store),
        Err(_) => Ok(js
            .create_object_store(object_store::Config {
                bucket,
                max_age,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await?),
    }
}

/// What identifies a style's weights ([`Renderer::style_version`]): part of a job's key.
pub type StyleVersion = Arc<dyn Fn(Option<&str>) -> Option<String> + Send + Sync>;

/// Submits renders to JetStream and follows them; the renders run on [`JetStreamWorker`]s,
/// in this process or others. Cheap to clone.
#[derive(Clone)]
pub struct JetStreamQueue {
    broker: Arc<Broker>,
    style_version: StyleVersion,
}

impl JetStreamQueue {
    /// Connects to the broker (waiting for it) and sets up its streams and stores.
    pub async fn connect(
        config: &JetStreamConfig,
        style_version: StyleVersion,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            broker: Arc::new(Broker::connect(config).await?),
            style_version,
        })
    }

    /// Whether `user` could submit a job now: under the per-user cap and the capacity.
    pub async fn check_admission(&self, user: u64) -> Result<(), SubmitError> {
        let config = &self.broker.config;
        // One request: the stream's state and this user's subject count.
        let mut subjects = self
            .broker
            .stream
            .info_with_subjects(config.user_subject(user))
            .await
            .map_err(|e| unavailable("the queue", e))?;
        if subjects.info.state.messages as usize >= config.capacity {
            return Err(SubmitError::QueueFull {
                capacity: config.capacity,
            });
        }
        let mut in_flight = 0;
        while let Some(Ok((_, count))) = subjects.next().await {
            in_flight += count;
        }
        let limit = config.per_user_limit.max(1);
        if in_flight >= limit {
            return Err(SubmitError::UserLimit { limit });
        }
        Ok(())
    }

    /// Submits a render for `user`: attaches to the identical job when there is one (queued,
    /// running, or done and kept), else stores the photo and queues the job.
    pub async fn submit(
        &self,
        user: u64,
        request: RenderRequest,
    ) -> Result<JobHandle, SubmitError> {
        let broker = &self.broker;
        let version = (self.style_version)(request.style.as_deref());
        let key = CacheKey::of(&request, version.as_deref()).hex();
        let existing = broker
            .record(&key)
            .await
            .map_err(|e| unavailable("reading the job", e))?;
        if let Some((record, _)) = &existing {
            // A record still without its place after 10 s lost its message (the broker went
            // away during the submission): queue it again.
            let unpublished = record.state == JobState::Queued
                && record.seq == 0
                && now_ms().saturating_sub(record.submitted_ms) > 10_000;
            let live = matches!(
                record.state,
                JobState::Queued | JobState::Running | JobState::Done
            );
            if live && !unpublished {
                return Ok(self.follow(key, record.seq, true));
            }
        }
        self.check_admission(user).await?;
        let photo = image_hash(&request.image);
        if broker.photos.info(&photo).await.is_err() {
            broker
                .photos
                .put(photo.as_str(), &mut request.image.as_slice())
                .await
                .map_err(|e| unavailable("storing the photo", e))?;
        }
        let record = JobRecord {
            state: JobState::Queued,
            user,
            seq: 0,
            submitted_ms: now_ms(),
            wait_ms: 0.0,
            render_ms: 0.0,
            deliveries: 0,
            error: None,
        };
        let value = Bytes::from(serde_json::to_vec(&record).expect("a job record serialises"));
        let revision = match &existing {
            Some((_, revision)) => broker.jobs.update(&key, value, *revision).await,
            None => broker.jobs.create(&key, value).await.map_err(|e| {
                kv::UpdateError::with_source(kv::UpdateErrorKind::Other, e.to_string())
            }),
        };
        let Ok(revision) = revision else {
            // Another submitter queued the same job in between.
            let seq = broker
                .record(&key)
                .await
                .ok()
                .flatten()
                .map_or(0, |(r, _)| r.seq);
            return Ok(self.follow(key, seq, true));
        };
        let message = JobMessage {
            key: key.clone(),
            photo,
            style: request.style,
            output: request.output,
            outline: request.outline,
            round_avatar: request.round_avatar,
        };
        let payload = Bytes::from(serde_json::to_vec(&message).expect("a job message serialises"));
        let published = async {
            broker
                .js
                .send_publish(
                    broker.config.user_subject(user),
                    jetstream::message::PublishMessage::build()
                        .payload(payload)
                        .message_id(format!("{key}.{revision}")),
                )
                .await?
                .await
        }
        .await;
        let ack = match published {
            Ok(ack) => ack,
            Err(e) => {
                let refused = JobRecord {
                    state: JobState::Cancelled,
                    ..record
                };
                broker.update(&key, &refused, revision).await;
                let text = e.to_string();
                return Err(if text.contains("per subject") {
                    SubmitError::UserLimit {
                        limit: broker.config.per_user_limit.max(1),
                    }
                } else if text.contains("maximum messages") {
                    SubmitError::QueueFull {
                        capacity: broker.config.capacity,
                    }
                } else {
                    unavailable("queueing the job", text)
                });
            }
        };
        let queued = JobRecord {
            seq: ack.sequence,
            ..record
        };
        // A worker may have taken the job already; its record then says more than this one.
        broker.update(&key, &queued, revision).await;
        Ok(self.follow(key, ack.sequence, false))
    }

    /// A handle fed by a task that follows the job's record (and, while it waits, its place
    /// in the queue) until it ends.
    fn follow(&self, key: String, seq: u64, shared: bool) -> JobHandle {
        let (tx, rx) = watch::channel(JobStatus::Queued {
            position: 1,
            waiting: 1,
        });
        tokio::spawn(follow_job(Arc::clone(&self.broker), key.clone(), tx));
        JobHandle {
            id: seq,
            rx,
            shared,
            canceller: super::Canceller::JetStream {
                queue: self.clone(),
                key,
            },
        }
    }

    /// Cancels the job `key` if it is still queued.
    pub(super) async fn cancel(&self, key: &str) -> bool {
        let broker = &self.broker;
        let Ok(Some((record, revision))) = broker.record(key).await else {
            return false;
        };
        if record.state != JobState::Queued {
            return false;
        }
        let cancelled = JobRecord {
            state: JobState::Cancelled,
            ..record
        };
        if broker.update(key, &cancelled, revision).await.is_none() {
            return false;
        }
        // The worker that takes the message anyway skips it.
        let _ = broker.stream.delete_message(record.seq).await;
        true
    }
}

/// Translates the job's record into [`JobStatus`] until the job ends; follows the broker
/// through reconnections (a watch resumes at the current value).
async fn follow_job(broker: Arc<Broker>, key: String, tx: watch::Sender<JobStatus>) {
    // Each waiting job asks the broker for its place: once a second keeps that cheap.
    let mut position_every = tokio::time::interval(Duration::from_secs(1));
    // The record while the job waits: its place in the stream is all a tick needs.
    let mut waiting: Option<JobRecord> = None;
    loop {
        let Ok(mut updates) = broker.jobs.watch_with_history(&key).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            let record = tokio::select! {
                entry = updates.next() => match entry {
                    Some(Ok(entry)) if entry.operation == kv::Operation::Put => {
                        serde_json::from_slice::<JobRecord>(&entry.value).ok()
                    }
                    Some(Ok(_)) => {
                        tx.send_replace(gone());
                        return;
                    }
                    _ => break,
                },
                // Nobody follows the job here any more (a gateway handed it over).
                _ = tx.closed() => return,
                _ = position_every.tick() => {
                    if let Some(record) = &waiting {
                        publish_position(&broker, record, &tx).await;
                    }
                    continue;
                }
            };
            let Some(record) = record else { continue };
            waiting = None;
            let status = match record.state {
                JobState::Queued => {
                    publish_position(&broker, &record, &tx).await;
                    waiting = Some(record);
                    continue;
                }
                JobState::Running => JobStatus::Running,
                JobState::Cancelled => JobStatus::Cancelled,
                JobState::Failed => JobStatus::Done(JobOutcome {
                    result: Err(record
                        .error
                        .clone()
                        .map(RenderError::from)
                        .unwrap_or_else(|| RenderError::Internal("the job failed".into()))),
                    cached: false,
                    wait_ms: record.wait_ms,
                    render_ms: record.render_ms,
                }),
                JobState::Done => JobStatus::Done(JobOutcome {
                    result: fetch_result(&broker, &key).await.map(Arc::new),
                    cached: false,
                    wait_ms: record.wait_ms,
                    render_ms: record.render_ms,
                }),
            };
            let ended = matches!(status, JobStatus::Done(_) | JobStatus::Cancelled);
            tx.send_replace(status);
            if ended {
                return;
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// The end of a job whose record was removed (it expired) before it ended here.
fn gone() -> JobStatus {
    JobStatus::Done(JobOutcome {
        result: Err(RenderError::Internal(
            "the job's record expired before it was answered".into(),
        )),
        cached: false,
        wait_ms: 0.0,
        render_ms: 0.0,
    })
}

/// A queued job's place: messages before it that no worker has taken yet, plus one.
async fn publish_position(broker: &Broker, record: &JobRecord, tx: &watch::Sender<JobStatus>) {
    // Getting the consumer fetches its state: that is the one request needed.
    let Ok(consumer) = broker.consumer().await else {
        return;
    };
    let info = consumer.cached_info();
    let taken = info.delivered.stream_sequence;
    let position = record.seq.saturating_sub(taken).max(1) as usize;
    let waiting = (info.num_pending as usize).max(position);
    tx.send_if_modified(|s| match s {
        JobStatus::Queued {
            position: p,
            waiting: w,
        } if *p == position && *w == waiting => false,
        _ => {
            *s = JobStatus::Queued { position, waiting };
            true
        }
    });
}

/// An object's bytes; errors say what was being fetched.
async fn read_object(store: &ObjectStore, name: &str, what: &str) -> Result<Vec<u8>, String> {
    let mut object = store
        .get(name)
        .await
        .map_err(|e| format!("fetching the {what}: {e}"))?;
    let mut bytes = Vec::new();
    object
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| format!("fetching the {what}: {e}"))?;
    Ok(bytes)
}

async fn fetch_result(broker: &Broker, key: &str) -> Result<RenderOutput, RenderError> {
    let bytes = read_object(&broker.results, key, "result")
        .await
        .map_err(RenderError::Internal)?;
    decode_output(&bytes).map_err(|e| RenderError::Internal(format!("fetching the result: {e}")))
}

/// Takes render jobs from the broker one at a time and runs them on a renderer.
pub struct JetStreamWorker {
    broker: Broker,
    renderer: Arc<dyn Renderer>,
}

impl JetStreamWorker {
    /// Connects to the broker (waiting for it).
    pub async fn connect(
        config: &JetStreamConfig,
        renderer: Arc<dyn Renderer>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            broker: Broker::connect(config).await?,
            renderer,
        })
    }

    /// Renders jobs until `stop` turns true (after the job in hand) or the broker is gone
    /// for good.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let consumer = self.broker.consumer().await?;
        // The consumer's lease, which the first process to create it chose, not this one's.
        let lease = consumer.cached_info().config.ack_wait;
        while !*stop.borrow() {
            let batch = consumer
                .fetch()
                .max_messages(1)
                .expires(Duration::from_millis(500))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!("fetching a render job: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
            };
            while let Some(message) = batch.next().await {
                match message {
                    Ok(message) => self.handle(message, lease).await,
                    Err(e) => tracing::warn!("receiving a render job: {e}"),
                }
            }
        }
        Ok(())
    }

    async fn handle(&self, message: jetstream::Message, lease: Duration) {
        let broker = &self.broker;
        let (deliveries, seq) = match message.info() {
            Ok(info) => (info.delivered.max(1) as u64, info.stream_sequence),
            Err(_) => (1, 0),
        };
        let job: JobMessage = match serde_json::from_slice(&message.payload) {
            Ok(job) => job,
            Err(e) => {
                tracing::warn!("dropping a malformed render job {seq}: {e}");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let max_failures = u64::from(broker.config.max_failures);
        // The submitter writes the job's place into its record just after queueing it: a
        // worker that loses that race reads the record again.
        let mut conflicts = 0;
        let (running, revision) = loop {
            let record = broker.record(&job.key).await;
            let Ok(found) = record else {
                // The broker is unwell: leave the job for later rather than lose it.
                let _ = message.ack_with(AckKind::Nak(Some(retry_delay(1)))).await;
                return;
            };
            let Some((record, revision)) = found else {
                let _ = message.ack().await;
                return;
            };
            if !matches!(record.state, JobState::Queued | JobState::Running) {
                let _ = message.ack().await;
                return;
            }
            if deliveries > max_failures {
                self.set_aside(&message, &job, record, revision).await;
                return;
            }
            let running = JobRecord {
                state: JobState::Running,
                seq,
                wait_ms: now_ms().saturating_sub(record.submitted_ms) as f64,
                deliveries,
                ..record
            };
            if let Some(revision) = broker.update(&job.key, &running, revision).await {
                break (running, revision);
            }
            conflicts += 1;
            if conflicts == 10 {
                let _ = message.ack_with(AckKind::Nak(Some(retry_delay(1)))).await;
                return;
            }
        };
        let started = std::time::Instant::now();
        let result = match read_object(&broker.photos, &job.photo, "photo").await {
            Ok(image) => {
                let request = RenderRequest {
                    image,
                    style: job.style.clone(),
                    output: job.output,
                    outline: job.outline,
                    round_avatar: job.round_avatar,
                };
                self.render_holding_lease(&message, request, lease).await
            }
            Err(e) => Err(RenderError::Internal(e)),
        };
        let render_ms = started.elapsed().as_secs_f64() * 1000.0;
        let ended = match result {
            Ok(output) => {
                let bytes = encode_output(&output);
                if let Err(e) = broker
                    .results
                    .put(job.key.as_str(), &mut bytes.as_slice())
                    .await
                {
                    tracing::warn!("storing result {}: {e}", job.key);
                    let _ = message
                        .ack_with(AckKind::Nak(Some(retry_delay(deliveries))))
                        .await;
                    return;
                }
                JobRecord {
                    state: JobState::Done,
                    render_ms,
                    ..running
                }
            }
            Err(RenderError::Internal(e)) => {
                tracing::warn!("render job {} failed ({deliveries}): {e}", job.key);
                if deliveries >= max_failures {
                    self.set_aside(&message, &job, running, revision).await;
                } else {
                    let _ = message
                        .ack_with(AckKind::Nak(Some(retry_delay(deliveries))))
                        .await;
                }
                return;
            }
            Err(user_error) => JobRecord {
                state: JobState::Failed,
                render_ms,
                error: Some(StoredError::from(&user_error)),
                ..running
            },
        };
        // Only the holder of the latest revision finishes the job: a worker that lost its
        // lease and came back finds the record moved on.
        if broker.finish(&job.key, &ended, revision).await {
            let _ = message.ack().await;
        } else {
            tracing::warn!(
                "recording the end of job {}: the broker did not take it",
                job.key
            );
            let _ = message
                .ack_with(AckKind::Nak(Some(retry_delay(deliveries))))
                .await;
        }
    }

    /// Renders on a blocking thread, telling the broker every third of the `lease` that the
    /// job is still in hand.
    async fn render_holding_lease(
        &self,
        message: &jetstream::Message,
        request: RenderRequest,
        lease: Duration,
    ) -> Result<RenderOutput, RenderError> {
        let renderer = Arc::clone(&self.renderer);
        let render = tokio::task::spawn_blocking(move || {
            catch_unwind(AssertUnwindSafe(|| renderer.render(&request)))
                .unwrap_or_else(|_| Err(RenderError::Internal("the renderer panicked".into())))
        });
        holding_lease(message, lease, render)
            .await
            .unwrap_or_else(|e| Err(RenderError::Internal(e.to_string())))
    }

    /// Ends a job that failed too often: its user gets an error that says so, and the job
    /// goes to the dead-letter subject for the host to look at.
    async fn set_aside(
        &self,
        message: &jetstream::Message,
        job: &JobMessage,
        record: JobRecord,
        revision: u64,
    ) {
        let broker = &self.broker;
        let failures = broker.config.max_failures;
        let failed = JobRecord {
            state: JobState::Failed,
            error: Some(StoredError::from(&RenderError::Internal(format!(
                "this photo failed {failures} times and was set aside"
            )))),
            ..record
        };
        if !broker.finish(&job.key, &failed, revision).await {
            let _ = message.ack_with(AckKind::Nak(Some(retry_delay(1)))).await;
            return;
        }
        let payload = Bytes::from(serde_json::to_vec(job).expect("a job message serialises"));
        if let Ok(ack) = broker
            .js
            .publish(broker.config.dead_letter_subject(), payload)
            .await
        {
            let _ = ack.await;
        }
        let _ = message.ack_with(AckKind::Term).await;
    }
}

/// Runs `count` workers on `renderer` (each one job at a time) until `stop` turns true;
/// each finishes the job in hand first. Publishes the renderer's styles for the gateways
/// ([`StyleCatalog`]) meanwhile.
pub async fn run_workers(
    config: &JetStreamConfig,
    renderer: Arc<dyn Renderer>,
    count: usize,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let catalog = Broker::connect(config).await?;
    let catalog_renderer = Arc::clone(&renderer);
    let catalog_stop = stop.clone();
    let mut tasks = vec![tokio::spawn(async move {
        catalog::publish_while_running(&catalog, catalog_renderer.as_ref(), catalog_stop).await;
        Ok(())
    })];
    for _ in 0..count.max(1) {
        let worker = JetStreamWorker::connect(config, Arc::clone(&renderer)).await?;
        tasks.push(tokio::spawn(worker.run(stop.clone())));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Runs `work` while telling the broker every third of the `lease` that `message` is still in
/// hand, so that it goes to no one else however long `work` takes.
async fn holding_lease<T>(
    message: &jetstream::Message,
    lease: Duration,
    work: impl std::future::Future<Output = T>,
) -> T {
    let mut work = std::pin::pin!(work);
    let mut ticks = tokio::time::interval((lease / 3).max(Duration::from_millis(100)));
    ticks.tick().await;
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticks.tick() => {
                let _ = message.ack_with(AckKind::Progress).await;
            }
        }
    }
}

/// The delay before retrying a job after its `deliveries`-th attempt failed.
fn retry_delay(deliveries: u64) -> Duration {
    Duration::from_millis(200 << deliveries.min(6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_round_trip_through_their_stored_form() {
        let output = RenderOutput {
            files: vec![
                RenderedFile {
                    name: "face1-sticker.png".into(),
                    kind: FileKind::Sticker,
                    png: vec![1, 2, 3],
                },
                RenderedFile {
                    name: "face1-avatar.png".into(),
                    kind: FileKind::Avatar,
                    png: vec![9; 1000],
                },
            ],
            faces: 1,
            faces_found: 2,
            style: "p2c".into(),
            timings_ms: vec![("detect".into(), 1.5)],
        };
        let bytes = encode_output(&output);
        assert_eq!(decode_output(&bytes).unwrap(), output);
        assert!(decode_output(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_output(&[1, 0]).is_err());
    }

    #[test]
    fn render_errors_survive_the_record() {
        for e in [
            RenderError::NotAnImage,
            RenderError::TooLarge("41 MP".into()),
            RenderError::NoFace,
            RenderError::StyleMissing {
                name: "ink".into(),
                available: vec!["p2c".into()],
            },
            RenderError::NoStyleInstalled,
            RenderError::Internal("set aside".into()),
        ] {
            assert_eq!(RenderError::from(StoredError::from(&e)), e);
        }
    }

    #[test]
    fn retries_wait_longer_each_time() {
        assert!(retry_delay(1) < retry_delay(2));
        assert_eq!(retry_delay(50), retry_delay(6));
    }
}
