//! Training jobs on their own streams, so that a fine-tune (minutes to hours) never holds up
//! a sticker (DESIGN.md §6b):
//!
//! - **Stream** `{PREFIX}_TRAINING`, subjects `{prefix}.train.{guild}`, work-queue retention,
//!   one message per subject (discard-new-per-subject): a server has one pack queued or
//!   training at a time, whichever gateway took the upload. The message is the caller's
//!   payload: keys, not blobs; files (uploaded archives, trained styles, preview grids) go to
//!   the object store `{prefix}_packs`.
//! - **Consumer** `trainers`: a trainer takes one job at a time and holds its lease while the
//!   job runs, far past `ack_wait`; a trainer that dies leaves the job to another after the
//!   lease, one that stops hands it on at once. Attempts are counted beside the job (object
//!   `attempts.{sequence}`), a clean stop not counted: a job whose training failed, or whose
//!   trainers died, `max_failures` times goes to `{prefix}.dead.train`.
//! - **Stream** `{PREFIX}_TRAINING_NEWS`, subjects `{prefix}.train-news.{guild}`: what runs
//!   report (progress, previews, warnings, ends) for the responders, which take them one at a
//!   time, in order (consumer `training-responders`). Preview grids wait in the object store
//!   `{prefix}_previews`, kept as long as the news.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, message::AckKind, object_store::ObjectStore, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncReadExt;

use super::{
    dead_letter_stream, ensure_stream, holding_lease, object_store, read_object, retry_delay,
    JetStreamConfig,
};

const TRAINERS: &str = "trainers";
const NEWS_READERS: &str = "training-responders";
/// Clean stops (deploys, restarts) a job may see besides its failures before it is set aside
/// anyway: a bound that holds even where its attempts could not be counted.
const CLEAN_STOPS_ALLOWED: u64 = 20;
/// How long a cancel waits for the trainer's answer.
const CANCEL_WAIT: Duration = Duration::from_secs(5);
/// How long news waits for a responder.
const NEWS_KEPT: Duration = Duration::from_secs(24 * 3600);

/// Why a training job was not queued.
#[derive(Debug, thiserror::Error)]
pub enum TrainingSubmitError {
    /// The server already has a pack queued or training.
    #[error("this server already has a pack queued or training")]
    Busy,
    /// The broker failed; holds what it said.
    #[error("the training queue is unavailable: {0}")]
    Unavailable(String),
}

/// Queues training jobs, takes them, and carries what the runs report. Cheap to clone.
#[derive(Clone)]
pub struct TrainingQueue {
    config: JetStreamConfig,
    js: jetstream::Context,
    jobs: stream::Stream,
    news: stream::Stream,
    files: ObjectStore,
    previews: ObjectStore,
}

impl TrainingQueue {
    /// Connects to the broker (waiting for it) and creates what is missing.
    pub async fn connect(config: &JetStreamConfig) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(&config.url)
            .await
            .with_context(|| format!("connecting to {}", config.url))?;
        let js = jetstream::new(client);
        let upper = config.prefix.to_uppercase();
        let jobs = ensure_stream(
            &js,
            stream::Config {
                name: format!("{upper}_TRAINING"),
                subjects: vec![format!("{}.train.*", config.prefix)],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                max_messages_per_subject: 1,
                discard: stream::DiscardPolicy::New,
                discard_new_per_subject: true,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            },
        )
        .await
        .context("creating the training stream")?;
        let news = ensure_stream(
            &js,
            stream::Config {
                name: format!("{upper}_TRAINING_NEWS"),
                subjects: vec![format!("{}.train-news.*", config.prefix)],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                max_age: NEWS_KEPT,
                ..Default::default()
            },
        )
        .await
        .context("creating the training news stream")?;
        dead_letter_stream(&js, config).await?;
        let files = object_store(&js, config, "packs", Duration::ZERO)
            .await
            .context("creating the pack store")?;
        let previews = object_store(&js, config, "previews", NEWS_KEPT)
            .await
            .context("creating the preview store")?;
        jobs.get_or_create_consumer(
            TRAINERS,
            consumer::pull::Config {
                durable_name: Some(TRAINERS.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait,
                // The attempts are counted beside the job: clean stops are not failures.
                max_deliver: -1,
                ..Default::default()
            },
        )
        .await
        .context("creating the trainer consumer")?;
        news.get_or_create_consumer(
            NEWS_READERS,
            consumer::pull::Config {
                durable_name: Some(NEWS_READERS.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait,
                // One at a time, so that a run's news is told in order.
                max_ack_pending: 1,
                max_deliver: 5,
                ..Default::default()
            },
        )
        .await
        .context("creating the training news consumer")?;
        Ok(Self {
            config: config.clone(),
            js,
            jobs,
            news,
            files,
            previews,
        })
    }

    fn guild_subject(&self, guild: u64) -> String {
        format!("{}.train.{guild}", self.config.prefix)
    }

    /// Whether `guild` has a job queued or training.
    pub async fn is_busy(&self, guild: u64) -> Result<bool, TrainingSubmitError> {
        let mut subjects = self
            .jobs
            .info_with_subjects(self.guild_subject(guild))
            .await
            .map_err(|e| TrainingSubmitError::Unavailable(e.to_string()))?;
        let mut busy = false;
        while let Some(Ok((_, count))) = subjects.next().await {
            busy |= count > 0;
        }
        Ok(busy)
    }

    /// Queues a job for `guild` (`payload` is the caller's). Refused with
    /// [`TrainingSubmitError::Busy`] while the guild has one.
    pub async fn submit(&self, guild: u64, payload: Vec<u8>) -> Result<(), TrainingSubmitError> {
        let sent = async {
            self.js
                .publish(self.guild_subject(guild), Bytes::from(payload))
                .await?
                .await
        }
        .await;
        let Err(e) = sent else { return Ok(()) };
        let text = e.to_string();
        Err(if text.contains("per subject") {
            TrainingSubmitError::Busy
        } else {
            TrainingSubmitError::Unavailable(text)
        })
    }

    /// Takes `guild`'s job out of the queue (one no trainer has started: a started one is
    /// cancelled through its trainer); its payload, or `None` when there was none.
    pub async fn withdraw(&self, guild: u64) -> anyhow::Result<Option<Vec<u8>>> {
        let subject = self.guild_subject(guild);
        let message = match self.jobs.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => message,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None)
            }
            Err(e) => return Err(e).context("reading the queued job"),
        };
        self.jobs
            .purge()
            .filter(subject)
            .await
            .context("taking the job out of the queue")?;
        self.remove_file(&attempts_key(message.sequence)).await;
        Ok(Some(message.payload.to_vec()))
    }

    /// The jobs for this trainer, one at a time.
    pub async fn jobs(&self) -> anyhow::Result<TrainingJobs> {
        let consumer: consumer::PullConsumer = self
            .jobs
            .get_consumer(TRAINERS)
            .await
            .map_err(|e| anyhow::anyhow!("opening the trainer consumer: {e}"))?;
        // The lease the first process to create the consumer chose.
        let lease = consumer.cached_info().config.ack_wait;
        Ok(TrainingJobs {
            queue: self.clone(),
            consumer,
            lease,
        })
    }

    /// Tells the responders something about a run of `guild`'s (the payload is the caller's).
    pub async fn tell(&self, guild: u64, news: Vec<u8>) -> anyhow::Result<()> {
        let subject = format!("{}.train-news.{guild}", self.config.prefix);
        self.js
            .publish(subject, Bytes::from(news))
            .await?
            .await
            .context("telling the responders")?;
        Ok(())
    }

    /// The news for this responder process, in order.
    pub async fn news(&self) -> anyhow::Result<TrainingNews> {
        let consumer: consumer::PullConsumer = self
            .news
            .get_consumer(NEWS_READERS)
            .await
            .map_err(|e| anyhow::anyhow!("opening the training news consumer: {e}"))?;
        let lease = consumer.cached_info().config.ack_wait;
        let messages = consumer.messages().await.context("taking training news")?;
        Ok(TrainingNews { messages, lease })
    }

    /// Keeps a file (an archive, a trained style, a preview grid) under `key`.
    pub async fn put_file(&self, key: &str, bytes: &[u8]) -> anyhow::Result<()> {
        self.files
            .put(key, &mut &bytes[..])
            .await
            .with_context(|| format!("storing {key}"))?;
        Ok(())
    }

    /// A file kept with [`Self::put_file`].
    pub async fn file(&self, key: &str) -> Result<Vec<u8>, String> {
        read_object(&self.files, key, key).await
    }

    /// Removes a file kept with [`Self::put_file`] (absent files are fine).
    pub async fn remove_file(&self, key: &str) {
        let _ = self.files.delete(key).await;
    }

    /// The files kept whose keys start with `prefix`: each key and its content's digest.
    pub async fn file_keys(&self, prefix: &str) -> anyhow::Result<Vec<(String, String)>> {
        let mut list = self.files.list().await.context("listing the pack store")?;
        let mut keys = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.context("listing the pack store")?;
            if !info.deleted && info.name.starts_with(prefix) {
                keys.push((info.name, info.digest.unwrap_or_default()));
            }
        }
        Ok(keys)
    }

    /// Keeps a preview grid for the responders under `key` (as long as the news).
    pub async fn put_preview(&self, key: &str, png: &[u8]) -> anyhow::Result<()> {
        self.previews
            .put(key, &mut &png[..])
            .await
            .with_context(|| format!("storing {key}"))?;
        Ok(())
    }

    /// A preview grid kept with [`Self::put_preview`].
    pub async fn preview(&self, key: &str) -> Result<Vec<u8>, String> {
        read_object(&self.previews, key, "preview").await
    }

    /// Removes a preview grid kept with [`Self::put_preview`].
    pub async fn remove_preview(&self, key: &str) {
        let _ = self.previews.delete(key).await;
    }

    fn cancel_subject(&self, guild: u64) -> String {
        format!("{}.train-cancel.{guild}", self.config.prefix)
    }

    /// Asks the trainer of `guild`'s running pack, for `user`, to stop it at its next step:
    /// the pack's name, or `None` when no trainer runs one of the guild's packs.
    pub async fn cancel(&self, guild: u64, user: u64) -> anyhow::Result<Option<String>> {
        let client = self.js.client();
        let request = client.request(self.cancel_subject(guild), Bytes::from(user.to_string()));
        match tokio::time::timeout(CANCEL_WAIT, request).await {
            Ok(Ok(reply)) => Ok(serde_json::from_slice(&reply.payload)?),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(None),
            Ok(Err(e)) => Err(e).context("asking the trainer to cancel"),
            Err(_) => anyhow::bail!("the trainer did not answer the cancel"),
        }
    }

    /// The cancels asked for `guild` while this trainer runs its pack ([`Self::cancel`]);
    /// none come where the broker could not be asked.
    pub async fn cancel_requests(&self, guild: u64) -> CancelRequests {
        let client = self.js.client();
        let subscriber = client.subscribe(self.cancel_subject(guild)).await;
        if let Err(e) = &subscriber {
            tracing::warn!("listening for cancels: {e}");
        }
        CancelRequests {
            client,
            subscriber: subscriber.ok(),
        }
    }
}

/// Cancels asked of a trainer ([`TrainingQueue::cancel_requests`]).
pub struct CancelRequests {
    client: async_nats::Client,
    subscriber: Option<async_nats::Subscriber>,
}

impl CancelRequests {
    /// The next cancel; never ends while the subscription lasts.
    pub async fn next(&mut self) -> Option<CancelRequest> {
        let Some(subscriber) = self.subscriber.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            let message = subscriber.next().await?;
            let Some(user_id) = std::str::from_utf8(&message.payload)
                .ok()
                .and_then(|u| u.parse().ok())
            else {
                continue;
            };
            return Some(CancelRequest {
                client: self.client.clone(),
                user_id,
                reply: message.reply,
            });
        }
    }
}

/// One cancel asked of a trainer.
pub struct CancelRequest {
    client: async_nats::Client,
    /// The user who asked.
    pub user_id: u64,
    reply: Option<async_nats::Subject>,
}

impl CancelRequest {
    /// Answers with the cancelled pack's name, or `None` when nothing was cancelled.
    pub async fn answer(self, name: Option<String>) {
        let Some(reply) = self.reply else { return };
        let payload = serde_json::to_vec(&name).expect("a name serialises");
        if let Err(e) = self.client.publish(reply, Bytes::from(payload)).await {
            tracing::warn!("answering a cancel: {e}");
        }
    }
}

/// The training jobs a trainer takes.
pub struct TrainingJobs {
    queue: TrainingQueue,
    consumer: consumer::PullConsumer,
    lease: Duration,
}

impl TrainingJobs {
    /// The next job; `None` when nothing came within `wait` (or the broker did not answer).
    pub async fn next(&mut self, wait: Duration) -> Option<TrainingJob> {
        let batch = self
            .consumer
            .fetch()
            .max_messages(1)
            .expires(wait)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!("fetching a training job: {e}");
                tokio::time::sleep(wait).await;
                return None;
            }
        };
        let message = match batch.next().await? {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!("receiving a training job: {e}");
                tokio::time::sleep(wait).await;
                return None;
            }
        };
        let Ok(sequence) = message.info().map(|info| info.stream_sequence) else {
            let _ = message.ack_with(AckKind::Nak(Some(wait))).await;
            return None;
        };
        // A job is run only once its attempt is counted: a job that kills its trainers must
        // reach its limit.
        let counted = match self.queue.attempts(sequence).await {
            Ok(attempts) => self
                .queue
                .set_attempts(sequence, attempts + 1)
                .await
                .map(|()| attempts + 1),
            Err(e) => Err(e),
        };
        let attempt = match counted {
            Ok(attempt) => attempt,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "counting a training job's attempt");
                let _ = message.ack_with(AckKind::Nak(Some(wait))).await;
                return None;
            }
        };
        Some(TrainingJob {
            queue: self.queue.clone(),
            message,
            lease: self.lease,
            sequence,
            attempt,
        })
    }
}

/// Where a job's attempts are counted, by its stream sequence.
fn attempts_key(sequence: u64) -> String {
    format!("attempts.{sequence}")
}

impl TrainingQueue {
    /// The attempts counted so far; an error when the broker could not say.
    async fn attempts(&self, sequence: u64) -> anyhow::Result<u32> {
        let mut object = match self.files.get(&attempts_key(sequence)).await {
            Ok(object) => object,
            Err(e) if e.kind() == async_nats::jetstream::object_store::GetErrorKind::NotFound => {
                return Ok(0)
            }
            Err(e) => return Err(e).context("reading a job's attempts"),
        };
        let mut text = String::new();
        object
            .read_to_string(&mut text)
            .await
            .context("reading a job's attempts")?;
        Ok(text.parse().unwrap_or(0))
    }

    async fn set_attempts(&self, sequence: u64, attempts: u32) -> anyhow::Result<()> {
        self.put_file(&attempts_key(sequence), attempts.to_string().as_bytes())
            .await
    }
}

/// How a training job's work ended, for the broker.
#[derive(Debug, PartialEq, Eq)]
pub enum TrainingJobEnd {
    /// Done with (trained, refused, cancelled): the job is removed.
    Finished,
    /// This trainer stops before the job's end: the job goes to the next trainer at once.
    Interrupted,
    /// The training failed; holds why. Retried after a delay, or set aside after
    /// `max_failures` attempts.
    Failed(String),
}

/// One training job in a trainer's hands.
pub struct TrainingJob {
    queue: TrainingQueue,
    message: jetstream::Message,
    lease: Duration,
    sequence: u64,
    attempt: u32,
}

impl TrainingJob {
    /// What the submitter queued.
    pub fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    /// 1 the first time the job is taken; one more for each failed attempt and each trainer
    /// that died with it (not for trainers that stopped cleanly).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether the job failed (or killed its trainers) `max_failures` times already: it is
    /// only to be set aside ([`Self::set_aside`]).
    pub fn failed_too_often(&self) -> bool {
        let delivered = self
            .message
            .info()
            .map_or(0, |info| info.delivered.max(0) as u64);
        self.attempt > self.queue.config.max_failures
            || delivered > u64::from(self.queue.config.max_failures) + CLEAN_STOPS_ALLOWED
    }

    /// Whether a failure of this attempt sets the job aside.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.queue.config.max_failures
    }

    /// Runs `work` holding the job's lease, then settles the job as `work` says: removed,
    /// handed on at once (not counted as an attempt), or retried after a delay. A failure of
    /// the last attempt ([`Self::is_last_attempt`]) is left to the caller, who records it and
    /// then sets the job aside ([`Self::set_aside`]).
    pub async fn hold(&self, work: impl Future<Output = TrainingJobEnd>) -> TrainingJobEnd {
        let end = holding_lease(&self.message, self.lease, work).await;
        match &end {
            TrainingJobEnd::Finished => {
                if let Err(e) = self.message.double_ack().await {
                    tracing::warn!("acknowledging a training job: {e}");
                }
                self.queue.remove_file(&attempts_key(self.sequence)).await;
            }
            TrainingJobEnd::Interrupted => {
                let attempts = self.attempt.saturating_sub(1);
                if let Err(e) = self.queue.set_attempts(self.sequence, attempts).await {
                    tracing::warn!(error = %format!("{e:#}"), "uncounting a clean stop");
                }
                let _ = self.message.ack_with(AckKind::Nak(None)).await;
            }
            TrainingJobEnd::Failed(why) => {
                tracing::warn!("training job failed (attempt {}): {why}", self.attempt);
                if !self.is_last_attempt() {
                    let delay = retry_delay(u64::from(self.attempt));
                    let _ = self.message.ack_with(AckKind::Nak(Some(delay))).await;
                }
            }
        }
        end
    }

    /// Moves a job that failed too often to `{prefix}.dead.train`.
    pub async fn set_aside(self) {
        let queue = &self.queue;
        let subject = format!("{}.dead.train", queue.config.prefix);
        if let Ok(ack) = queue
            .js
            .publish(subject, self.message.payload.clone())
            .await
        {
            let _ = ack.await;
        }
        let _ = self.message.ack_with(AckKind::Term).await;
        queue.remove_file(&attempts_key(self.sequence)).await;
    }
}

/// The training news a responder takes.
pub struct TrainingNews {
    messages: consumer::pull::Stream,
    lease: Duration,
}

impl TrainingNews {
    /// The next piece of news; `None` once the broker ends the stream.
    pub async fn next(&mut self) -> Option<NewsItem> {
        loop {
            match self.messages.next().await? {
                Ok(message) => {
                    return Some(NewsItem {
                        message,
                        lease: self.lease,
                    })
                }
                Err(e) => {
                    tracing::warn!("receiving training news: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// One piece of training news.
pub struct NewsItem {
    message: jetstream::Message,
    lease: Duration,
}

impl NewsItem {
    /// What the trainer told.
    pub fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    /// Runs `tell` while telling the broker every third of the lease that the news is in
    /// hand (so that a slow channel does not get it twice), then marks it told: the next
    /// piece comes.
    pub async fn tell<T>(self, tell: impl Future<Output = T>) -> T {
        let out = holding_lease(&self.message, self.lease, tell).await;
        if let Err(e) = self.message.ack().await {
            tracing::warn!("acknowledging training news: {e}");
        }
        out
    }
}
