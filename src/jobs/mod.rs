//! The render job queue, and the boundary with the renderer.
//!
//! [`Renderer`] is what the inference library (`cartoon`) implements: a blocking, CPU/GPU-heavy
//! `render` call plus the list of installed styles. [`JobQueue`] runs renders on dedicated worker
//! threads (never on the async runtime) with:
//! - a bound on queued jobs ([`QueueConfig::capacity`]) and on jobs in flight per user
//!   ([`QueueConfig::per_user_limit`]);
//! - fairness across users: the next job always comes from the waiting user who was served
//!   least recently (new users first), so one user's 20 photos cannot starve another's one;
//! - queue positions published to each waiting job (1 = next), recomputed on every change;
//! - a result cache keyed by (image hash, style, output options), and coalescing of an
//!   identical request that is still queued or running;
//! - isolation of failures: a renderer error or panic fails that job only.
//!
//! Nothing here knows Discord or SQLite.

mod cartoon_renderer;
mod jetstream;
pub mod loadtest;

pub use cartoon_renderer::CartoonRenderer;
pub use jetstream::{
    run_workers, CancelRequest, CancelRequests, Handoff, Handoffs, JetStreamConfig, JetStreamQueue,
    JetStreamWorker, NewsItem, StyleCatalog, StyleVersion, TrainingJob, TrainingJobEnd,
    TrainingJobs, TrainingNews, TrainingQueue, TrainingSubmitError,
};

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

// ---------------------------------------------------------------------------------------------
// The renderer boundary
// ---------------------------------------------------------------------------------------------

/// What a request produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// One 320x320 RGBA PNG sticker per face (transparent background).
    Sticker,
    /// One 512x512 PNG avatar per face.
    Avatar,
    /// A sticker and an avatar per face.
    Both,
    /// The whole photo with every face cartoonised.
    Photo,
}

impl OutputKind {
    /// Every kind, in the order the `/cartoon` command offers them as choices.
    pub const ALL: [OutputKind; 4] = [Self::Sticker, Self::Avatar, Self::Both, Self::Photo];

    /// The lowercase name used in commands, presets and the jobs table (`sticker`, `avatar`,
    /// `both`, `photo`); [`FromStr`] parses it back.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sticker => "sticker",
            Self::Avatar => "avatar",
            Self::Both => "both",
            Self::Photo => "photo",
        }
    }
}

impl fmt::Display for OutputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OutputKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown output `{s}` (sticker, avatar, both or photo)"))
    }
}

/// One render: the photo's encoded bytes (PNG, JPEG or WebP, at most the configured byte limit;
/// the renderer decodes it with its pixel limit) and the options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderRequest {
    /// The photo as sent: encoded PNG, JPEG or WebP bytes.
    pub image: Vec<u8>,
    /// A style name from [`Renderer::styles`]; `None` means the renderer's default style.
    pub style: Option<String>,
    /// Which files to produce.
    pub output: OutputKind,
    /// Draw a white outline around stickers.
    pub outline: bool,
    /// Crop avatars to a circle (transparent corners).
    pub round_avatar: bool,
}

/// What a rendered file is (addition to the brief's boundary: the bot needs to know which
/// files are stickers, for `/sticker add`, without parsing names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// A 320x320 RGBA sticker of one face.
    Sticker,
    /// A 512x512 avatar of one face.
    Avatar,
    /// The whole photo with every face cartoonised.
    Photo,
}

/// One output file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedFile {
    /// File name shown to the user, e.g. `face1-sticker.png`, `face1-avatar.png`, `photo.png`.
    pub name: String,
    /// What the file is: sticker, avatar or photo.
    pub kind: FileKind,
    /// PNG bytes: stickers 320x320 RGBA (at most 512 KiB), avatars 512x512.
    pub png: Vec<u8>,
}

/// The result of a render: files in face order (largest face first), sticker before avatar.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderOutput {
    /// The output files, in the order shown to the user.
    pub files: Vec<RenderedFile>,
    /// Faces rendered.
    pub faces: usize,
    /// Faces found: more than `faces` when the photo has more than the renderer draws.
    pub faces_found: usize,
    /// The style actually used (the default's name when the request had none).
    pub style: String,
    /// Per-stage timings, e.g. `[("decode", 12.0), ("detect", 80.5), ...]`.
    pub timings_ms: Vec<(String, f64)>,
}

/// Why a render failed. Every variant except `Internal` is the user's to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The bytes do not decode as a PNG, JPEG or WebP image.
    #[error("the file is not an image that can be read (PNG, JPEG or WebP expected)")]
    NotAnImage,
    /// The photo is over the byte or pixel limit; the message says which.
    #[error("the image is too large: {0}")]
    TooLarge(String),
    /// The face detector found no face in the photo.
    #[error("no face was found in the photo")]
    NoFace,
    /// The requested style is not installed, or its name is not a valid style name.
    #[error("there is no style named `{name}`")]
    StyleMissing {
        /// The style asked for.
        name: String,
        /// The installed styles' names, to suggest instead.
        available: Vec<String>,
    },
    /// No style at all is installed, so even the default one cannot be used.
    #[error("no cartoon style is installed")]
    NoStyleInstalled,
    /// Anything else (I/O, a model failure, a renderer panic): a bug or a broken install, not the
    /// user's doing.
    #[error("internal error: {0}")]
    Internal(String),
}

impl RenderError {
    /// A short stable code for logs and the jobs table.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotAnImage => "not_an_image",
            Self::TooLarge(_) => "too_large",
            Self::NoFace => "no_face",
            Self::StyleMissing { .. } => "style_missing",
            Self::NoStyleInstalled => "no_style_installed",
            Self::Internal(_) => "internal",
        }
    }
}

/// An installed style.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StyleInfo {
    /// The name requests use to pick the style.
    pub name: String,
    /// One line about the style, shown in the style list.
    pub description: String,
    /// Whether `render` uses this style when the request names none.
    pub is_default: bool,
    /// A small PNG showing the style, if the renderer has one.
    pub preview_png: Option<Vec<u8>>,
}

/// The inference library's side of the boundary.
pub trait Renderer: Send + Sync + 'static {
    /// Renders every face of the photo. Blocking and heavy: called only on the queue's worker
    /// threads, one call per worker at a time.
    fn render(&self, request: &RenderRequest) -> Result<RenderOutput, RenderError>;

    /// The installed styles. Called from async code: must be cheap (a snapshot, no I/O).
    fn styles(&self) -> Vec<StyleInfo>;

    /// What identifies the weights `style` (`None`: the default style) resolves to now, such
    /// as a hash of them: results are shared only between requests with the same version,
    /// so a style deleted and published again under its name never serves the old style's
    /// results. `None` when the style resolves to nothing. Called from async code: cheap
    /// once a version is known (a file's metadata, no hashing).
    fn style_version(&self, style: Option<&str>) -> Option<String>;
}

/// Hex SHA-256 of the image bytes (what the jobs table and the cache key use).
pub fn image_hash(image: &[u8]) -> String {
    crate::sha256_hex(image)
}

/// Identifies identical requests: same image bytes, style weights and output options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// `style_version` is [`Renderer::style_version`] of the request's style: a style
    /// replaced under the same name gets new keys. Without one (the style resolves to
    /// nothing) the name stands in.
    pub fn of(request: &RenderRequest, style_version: Option<&str>) -> Self {
        let mut h = Sha256::new();
        h.update(Sha256::digest(&request.image));
        match style_version {
            Some(version) => {
                h.update([1]);
                h.update(version.as_bytes());
            }
            None => {
                h.update([0]);
                h.update(request.style.as_deref().unwrap_or("\0default").as_bytes());
            }
        }
        h.update([
            0,
            request.output as u8,
            request.outline as u8,
            request.round_avatar as u8,
        ]);
        Self(h.finalize().into())
    }

    /// Lowercase hex: the job's name in the broker.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The queue
// ---------------------------------------------------------------------------------------------

/// Queue settings (the `[bot]` config section carries them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Jobs that may wait (not counting running ones); more are refused with `QueueFull`.
    pub capacity: usize,
    /// Jobs one user may have queued or running at once.
    pub per_user_limit: usize,
    /// Worker threads running renders concurrently.
    pub workers: usize,
    /// Results kept for identical requests (0 disables the cache).
    pub cache_entries: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            capacity: 64,
            per_user_limit: 3,
            workers: 1,
            cache_entries: 64,
        }
    }
}

/// Why a job was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({capacity} jobs waiting)")]
    /// Already `capacity` jobs are waiting.
    QueueFull {
        /// The queue's capacity ([`QueueConfig::capacity`]).
        capacity: usize,
    },
    #[error("you already have {limit} jobs in progress")]
    /// The user already has `limit` jobs queued or running.
    UserLimit {
        /// Jobs one user may have in flight ([`QueueConfig::per_user_limit`]).
        limit: usize,
    },
    /// [`JobQueue::shutdown`] was called: no more jobs are taken.
    #[error("the queue is shutting down")]
    ShuttingDown,
    /// The broker ([`JetStreamQueue`]) could not be reached or refused the job.
    #[error("the job service is unavailable ({0})")]
    Unavailable(String),
}

/// A job's state, as seen through its [`JobHandle`].
#[derive(Debug, Clone)]
pub enum JobStatus {
    /// Waiting. `position` 1 means next to run; `waiting` is the number of jobs waiting.
    Queued {
        /// Place in the dispatch order, from 1.
        position: usize,
        /// Jobs waiting in the whole queue, this one included.
        waiting: usize,
    },
    /// A worker is rendering it.
    Running,
    /// Finished, successfully or not.
    Done(JobOutcome),
    /// Cancelled before it ran, or dropped by a shutdown.
    Cancelled,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    /// The render's output (shared with the cache and coalesced jobs), or why it failed.
    pub result: Result<Arc<RenderOutput>, RenderError>,
    /// Served from the cache or shared with an identical job: no render of its own.
    pub cached: bool,
    /// Time from submission until a worker took it.
    pub wait_ms: f64,
    /// Time the renderer took (0 when cached).
    pub render_ms: f64,
}

/// Counters, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Jobs waiting for a worker.
    pub waiting: usize,
    /// Jobs being rendered now.
    pub running: usize,
    /// Renderer calls since start, failed ones included.
    pub renders: u64,
    /// Requests answered from the result cache.
    pub cache_hits: u64,
    /// Requests attached to an identical job that was queued or running.
    pub coalesced: u64,
    /// Renders that ended in an error or a panic.
    pub failed: u64,
}

/// A bounded, fair render queue with worker threads. Cheap to clone.
#[derive(Clone)]
pub struct JobQueue {
    inner: Arc<Inner>,
}

struct Inner {
    config: QueueConfig,
    renderer: Arc<dyn Renderer>,
    sched: Mutex<Sched>,
    work: Condvar,
    cache: DashMap<CacheKey, CacheEntry>,
    /// Jobs queued or running, by key, for coalescing identical requests.
    pending: DashMap<CacheKey, watch::Receiver<JobStatus>>,
    tick: AtomicU64,
    renders: AtomicU64,
    cache_hits: AtomicU64,
    coalesced: AtomicU64,
    failed: AtomicU64,
    running: AtomicUsize,
}

struct CacheEntry {
    output: Arc<RenderOutput>,
    last_used: AtomicU64,
}

struct Job {
    id: u64,
    user: u64,
    key: CacheKey,
    request: RenderRequest,
    tx: watch::Sender<JobStatus>,
    submitted: Instant,
}

#[derive(Default)]
struct Sched {
    /// Waiting jobs per user, oldest first.
    waiting: HashMap<u64, VecDeque<Job>>,
    /// Total waiting jobs.
    len: usize,
    /// Queued + running jobs per user.
    in_flight: HashMap<u64, usize>,
    /// Dispatch sequence number at which each user was last served.
    last_served: HashMap<u64, u64>,
    seq: u64,
    next_id: u64,
    shutdown: bool,
}

impl Sched {
    /// The user to serve next: least recently served, then oldest waiting job.
    fn next_user(&self, served: &HashMap<u64, u64>, taken: &HashMap<u64, usize>) -> Option<u64> {
        self.waiting
            .iter()
            .filter(|(u, q)| q.len() > taken.get(u).copied().unwrap_or(0))
            .min_by_key(|(u, q)| {
                let first = &q[taken.get(u).copied().unwrap_or(0)];
                (served.get(u).copied().unwrap_or(0), first.id)
            })
            .map(|(u, _)| *u)
    }

    fn pop(&mut self) -> Option<Job> {
        let user = self.next_user(&self.last_served, &HashMap::new())?;
        let queue = self.waiting.get_mut(&user)?;
        let job = queue.pop_front()?;
        if queue.is_empty() {
            self.waiting.remove(&user);
        }
        self.len -= 1;
        self.seq += 1;
        self.last_served.insert(user, self.seq);
        Some(job)
    }

    /// Publishes every waiting job's position by simulating the dispatch order.
    fn publish_positions(&self) {
        let mut served = self.last_served.clone();
        let mut taken: HashMap<u64, usize> = HashMap::new();
        let mut seq = self.seq;
        for position in 1..=self.len {
            let Some(user) = self.next_user(&served, &taken) else {
                break;
            };
            let index = taken.entry(user).or_insert(0);
            let job = &self.waiting[&user][*index];
            *index += 1;
            seq += 1;
            served.insert(user, seq);
            let status = JobStatus::Queued {
                position,
                waiting: self.len,
            };
            job.tx.send_if_modified(|s| match s {
                JobStatus::Queued {
                    position: p,
                    waiting: w,
                } if *p == position && *w == self.len => false,
                _ => {
                    *s = status;
                    true
                }
            });
        }
    }

    fn release(&mut self, user: u64) {
        if let Some(n) = self.in_flight.get_mut(&user) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(&user);
            }
        }
        // Forget service history once idle, or when it grows large (users gone for good).
        if self.len == 0 && self.in_flight.is_empty() {
            self.last_served.clear();
        } else if self.last_served.len() > 4096 {
            let waiting = &self.waiting;
            let in_flight = &self.in_flight;
            self.last_served
                .retain(|u, _| waiting.contains_key(u) || in_flight.contains_key(u));
        }
    }
}

/// A submitted job: watch its status, wait for its outcome, or cancel it.
pub struct JobHandle {
    id: u64,
    rx: watch::Receiver<JobStatus>,
    /// Served from the cache or attached to an identical job.
    shared: bool,
    canceller: Canceller,
}

/// Where a job is cancelled.
enum Canceller {
    InProcess(Arc<Inner>),
    JetStream { queue: JetStreamQueue, key: String },
}

impl JobHandle {
    /// The queue's id for this job (0 for cache hits and shared jobs).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The job's key on the broker, for another process to follow it
    /// ([`JetStreamQueue::attach`]); `None` for the in-process queue.
    pub fn broker_key(&self) -> Option<&str> {
        match &self.canceller {
            Canceller::JetStream { key, .. } => Some(key),
            Canceller::InProcess(_) => None,
        }
    }

    /// Whether this handle did not start a render of its own (cache hit or coalesced).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// The current status.
    pub fn status(&self) -> JobStatus {
        self.rx.borrow().clone()
    }

    /// Waits for the next status change; `None` once the job can no longer change.
    pub async fn changed(&mut self) -> Option<JobStatus> {
        match self.rx.changed().await {
            Ok(()) => Some(self.rx.borrow_and_update().clone()),
            Err(_) => None,
        }
    }

    /// Waits until the job is done; `None` if it was cancelled or the queue shut down.
    pub async fn wait(mut self) -> Option<JobOutcome> {
        loop {
            match self.rx.borrow_and_update().clone() {
                JobStatus::Done(mut outcome) => {
                    outcome.cached |= self.shared;
                    return Some(outcome);
                }
                JobStatus::Cancelled => return None,
                _ => {}
            }
            if self.rx.changed().await.is_err() {
                return match self.rx.borrow().clone() {
                    JobStatus::Done(mut outcome) => {
                        outcome.cached |= self.shared;
                        Some(outcome)
                    }
                    _ => None,
                };
            }
        }
    }

    /// Cancels the job if it is still waiting and was started by this handle. Returns whether
    /// it was removed from the queue.
    pub async fn cancel(&self) -> bool {
        if self.shared {
            return false;
        }
        match &self.canceller {
            Canceller::InProcess(queue) => self.cancel_in_process(queue),
            Canceller::JetStream { queue, key } => queue.cancel(key).await,
        }
    }

    fn cancel_in_process(&self, queue: &Inner) -> bool {
        let mut sched = queue.lock();
        let mut removed = None;
        for (user, queue) in sched.waiting.iter_mut() {
            if let Some(i) = queue.iter().position(|j| j.id == self.id) {
                removed = Some((*user, queue.remove(i).expect("index is valid")));
                break;
            }
        }
        let Some((user, job)) = removed else {
            return false;
        };
        if sched.waiting.get(&user).is_some_and(VecDeque::is_empty) {
            sched.waiting.remove(&user);
        }
        sched.len -= 1;
        sched.release(user);
        queue.pending.remove(&job.key);
        job.tx.send_replace(JobStatus::Cancelled);
        sched.publish_positions();
        true
    }
}

impl JobQueue {
    /// Starts `config.workers` worker threads (at least one).
    pub fn new(renderer: Arc<dyn Renderer>, config: QueueConfig) -> Self {
        let inner = Arc::new(Inner {
            config,
            renderer,
            sched: Mutex::new(Sched::default()),
            work: Condvar::new(),
            cache: DashMap::new(),
            pending: DashMap::new(),
            tick: AtomicU64::new(0),
            renders: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            running: AtomicUsize::new(0),
        });
        for i in 0..config.workers.max(1) {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name(format!("toonbot-render-{i}"))
                .spawn(move || inner.work_loop())
                .expect("spawning a render worker thread");
        }
        Self { inner }
    }

    /// The settings the queue was started with.
    pub fn config(&self) -> QueueConfig {
        self.inner.config
    }

    /// The renderer behind the queue, e.g. for its style list.
    pub fn renderer(&self) -> &Arc<dyn Renderer> {
        &self.inner.renderer
    }

    /// Whether `user` could submit a job now (a cheap pre-check before downloading a photo;
    /// [`submit`](Self::submit) decides).
    pub fn check_admission(&self, user: u64) -> Result<(), SubmitError> {
        let sched = self.inner.lock();
        self.inner.admit(&sched, user)
    }

    /// Submits a render for `user`. Never blocks on rendering: the result comes through the
    /// handle. Identical requests are answered from the cache, or attached to the identical
    /// job already queued or running.
    pub fn submit(&self, user: u64, request: RenderRequest) -> Result<JobHandle, SubmitError> {
        let inner = &self.inner;
        let version = inner.renderer.style_version(request.style.as_deref());
        let key = CacheKey::of(&request, version.as_deref());
        if let Some(entry) = inner.cache.get(&key) {
            entry.last_used.store(
                inner.tick.fetch_add(1, Ordering::Relaxed),
                Ordering::Relaxed,
            );
            inner.cache_hits.fetch_add(1, Ordering::Relaxed);
            let outcome = JobOutcome {
                result: Ok(Arc::clone(&entry.output)),
                cached: true,
                wait_ms: 0.0,
                render_ms: 0.0,
            };
            let (_tx, rx) = watch::channel(JobStatus::Done(outcome));
            return Ok(JobHandle {
                id: 0,
                rx,
                shared: true,
                canceller: Canceller::InProcess(Arc::clone(inner)),
            });
        }
        let mut sched = inner.lock();
        if sched.shutdown {
            return Err(SubmitError::ShuttingDown);
        }
        if let Some(rx) = inner.pending.get(&key) {
            inner.coalesced.fetch_add(1, Ordering::Relaxed);
            return Ok(JobHandle {
                id: 0,
                rx: rx.clone(),
                shared: true,
                canceller: Canceller::InProcess(Arc::clone(inner)),
            });
        }
        inner.admit(&sched, user)?;
        sched.next_id += 1;
        let id = sched.next_id;
        let (tx, rx) = watch::channel(JobStatus::Queued {
            position: sched.len + 1,
            waiting: 0,
        });
        inner.pending.insert(key, rx.clone());
        let job = Job {
            id,
            user,
            key,
            request,
            tx,
            submitted: Instant::now(),
        };
        sched.waiting.entry(user).or_default().push_back(job);
        sched.len += 1;
        *sched.in_flight.entry(user).or_insert(0) += 1;
        sched.publish_positions();
        drop(sched);
        inner.work.notify_one();
        Ok(JobHandle {
            id,
            rx,
            shared: false,
            canceller: Canceller::InProcess(Arc::clone(inner)),
        })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> QueueStats {
        let inner = &self.inner;
        QueueStats {
            waiting: inner.lock().len,
            running: inner.running.load(Ordering::Relaxed),
            renders: inner.renders.load(Ordering::Relaxed),
            cache_hits: inner.cache_hits.load(Ordering::Relaxed),
            coalesced: inner.coalesced.load(Ordering::Relaxed),
            failed: inner.failed.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting jobs, cancels the waiting ones and lets the workers exit after their
    /// current render (not joined: a render cannot be interrupted).
    pub fn shutdown(&self) {
        let mut sched = self.inner.lock();
        sched.shutdown = true;
        for (_, queue) in sched.waiting.drain() {
            for job in queue {
                self.inner.pending.remove(&job.key);
                job.tx.send_replace(JobStatus::Cancelled);
            }
        }
        sched.len = 0;
        drop(sched);
        self.inner.work.notify_all();
    }
}

/// The one queue interface the bot and the conformance suite use: the in-process queue (one
/// process, the default) or JetStream (several processes).
#[derive(Clone)]
pub enum RenderQueue {
    /// [`JobQueue`]: worker threads in this process.
    InProcess(JobQueue),
    /// [`JetStreamQueue`]: workers anywhere, through the broker.
    JetStream(JetStreamQueue),
}

impl RenderQueue {
    /// Whether `user` could submit a job now (a cheap pre-check before downloading a photo).
    pub async fn check_admission(&self, user: u64) -> Result<(), SubmitError> {
        match self {
            Self::InProcess(queue) => queue.check_admission(user),
            Self::JetStream(queue) => queue.check_admission(user).await,
        }
    }

    /// Submits a render for `user`; identical requests share one render.
    pub async fn submit(
        &self,
        user: u64,
        request: RenderRequest,
    ) -> Result<JobHandle, SubmitError> {
        match self {
            Self::InProcess(queue) => queue.submit(user, request),
            Self::JetStream(queue) => queue.submit(user, request).await,
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Sched> {
        // A panic while holding the lock cannot leave Sched inconsistent in a way that matters
        // more than stopping the bot would: keep going.
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn admit(&self, sched: &Sched, user: u64) -> Result<(), SubmitError> {
        if sched.shutdown {
            return Err(SubmitError::ShuttingDown);
        }
        let limit = self.config.per_user_limit.max(1);
        if sched.in_flight.get(&user).copied().unwrap_or(0) >= limit {
            return Err(SubmitError::UserLimit { limit });
        }
        if sched.len >= self.config.capacity {
            return Err(SubmitError::QueueFull {
                capacity: self.config.capacity,
            });
        }
        Ok(())
    }

    fn work_loop(&self) {
        loop {
            let job = {
                let mut sched = self.lock();
                loop {
                    if sched.shutdown {
                        return;
                    }
                    if let Some(job) = sched.pop() {
                        sched.publish_positions();
                        break job;
                    }
                    sched = self.work.wait(sched).unwrap_or_else(|e| e.into_inner());
                }
            };
            self.run(job);
        }
    }

    fn run(&self, job: Job) {
        let wait_ms = ms(job.submitted.elapsed());
        self.running.fetch_add(1, Ordering::Relaxed);
        job.tx.send_replace(JobStatus::Running);
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| self.renderer.render(&job.request)))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(RenderError::Internal(format!(
                    "the renderer panicked: {what}"
                )))
            })
            .map(Arc::new);
        let render_ms = ms(started.elapsed());
        self.running.fetch_sub(1, Ordering::Relaxed);
        self.renders.fetch_add(1, Ordering::Relaxed);
        match &result {
            Ok(output) => self.cache_insert(job.key, Arc::clone(output)),
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut sched = self.lock();
        sched.release(job.user);
        // Done is sent under the lock, after the release, so that a user whose job has ended
        // can submit the next one at once.
        job.tx.send_replace(JobStatus::Done(JobOutcome {
            result,
            cached: false,
            wait_ms,
            render_ms,
        }));
        self.pending.remove(&job.key);
    }

    fn cache_insert(&self, key: CacheKey, output: Arc<RenderOutput>) {
        let capacity = self.config.cache_entries;
        if capacity == 0 {
            return;
        }
        while self.cache.len() >= capacity {
            let oldest = self
                .cache
                .iter()
                .min_by_key(|e| e.last_used.load(Ordering::Relaxed))
                .map(|e| *e.key());
            match oldest {
                Some(k) => {
                    self.cache.remove(&k);
                }
                None => break,
            }
        }
        let last_used = AtomicU64::new(self.tick.fetch_add(1, Ordering::Relaxed));
        self.cache.insert(key, CacheEntry { output, last_used });
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_kind_round_trips() {
        for k in OutputKind::ALL {
            assert_eq!(k.as_str().parse::<OutputKind>().unwrap(), k);
        }
        assert!("gif".parse::<OutputKind>().is_err());
        assert_eq!(" Both ".parse::<OutputKind>().unwrap(), OutputKind::Both);
    }

    #[test]
    fn cache_key_depends_on_every_option() {
        let base = RenderRequest {
            image: vec![1, 2, 3],
            style: None,
            output: OutputKind::Both,
            outline: true,
            round_avatar: false,
        };
        let key = CacheKey::of(&base, None);
        assert_eq!(key, CacheKey::of(&base.clone(), None));
        let variants = [
            RenderRequest {
                image: vec![1, 2, 4],
                ..base.clone()
            },
            RenderRequest {
                style: Some("ink".into()),
                ..base.clone()
            },
            RenderRequest {
                output: OutputKind::Sticker,
                ..base.clone()
            },
            RenderRequest {
                outline: false,
                ..base.clone()
            },
            RenderRequest {
                round_avatar: true,
                ..base.clone()
            },
        ];
        for v in variants {
            assert_ne!(CacheKey::of(&v, None), key);
        }
    }

    #[test]
    fn cache_key_follows_the_style_weights_not_the_name() {
        let default = RenderRequest {
            image: vec![1, 2, 3],
            style: None,
            output: OutputKind::Both,
            outline: false,
            round_avatar: false,
        };
        let named = RenderRequest {
            style: Some("p2c".into()),
            ..default.clone()
        };
        assert_eq!(
            CacheKey::of(&default, Some("v1")),
            CacheKey::of(&named, Some("v1")),
            "the default style named or not is the same weights"
        );
        assert_ne!(
            CacheKey::of(&named, Some("v1")),
            CacheKey::of(&named, Some("v2")),
            "a style published again under its name"
        );
        assert_ne!(CacheKey::of(&named, Some("v1")), CacheKey::of(&named, None));
    }
}
