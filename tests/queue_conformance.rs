//! One conformance suite for both render queues: the in-process queue, and JetStream against
//! a real `nats-server` (Debian's 2.9, started here on a free loopback port with its own
//! store). Without `nats-server` on the PATH the JetStream runs are skipped with a message;
//! `.ci/run` installs it.
//!
//! Common properties: the per-user cap, a light user served within the cap, identical
//! requests rendered once, cancelling a waiting job, positions, a faulty render ending with
//! a clear error, a 10 MiB photo. JetStream only: a worker killed mid-job, a broker
//! restart, the dead-letter subject, a job longer than the lease; and the training stream: a
//! training job longer than the lease, a trainer killed mid-run, one job per server, failing
//! trainings set aside, renders served while a pack trains, training news in order.

mod common;
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::renderer::{photo, png, tag_of, TestRenderer, Trigger};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use toonbot::jobs::loadtest::LocalNatsServer;
use toonbot::jobs::{
    JetStreamConfig, JetStreamQueue, JetStreamWorker, JobHandle, JobOutcome, JobQueue, JobStatus,
    OutputKind, QueueConfig, RenderError, RenderQueue, RenderRequest, Renderer, SubmitError,
    TrainingJob, TrainingJobEnd, TrainingJobs, TrainingQueue, TrainingSubmitError,
};

const T: Duration = Duration::from_secs(20);
const PER_USER: usize = 2;

fn request(image: Vec<u8>) -> RenderRequest {
    RenderRequest {
        image,
        style: None,
        output: OutputKind::Sticker,
        outline: false,
        round_avatar: false,
    }
}

fn tagged(tag: u32) -> RenderRequest {
    request(photo(1, Trigger::Normal, tag))
}

/// The library's local `nats-server`, or `None` (and a message) where it is not installed.
fn nats_server() -> Option<LocalNatsServer> {
    if Command::new("nats-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIPPED the JetStream runs: nats-server is not on the PATH (.ci/run installs it)"
        );
        return None;
    }
    Some(LocalNatsServer::start(Path::new("nats-server")).expect("starting nats-server"))
}

/// A queue under test, with its renderer and (for JetStream) its broker and workers.
struct Setup {
    queue: RenderQueue,
    renderer: Arc<TestRenderer>,
    broker: Option<LocalNatsServer>,
    config: Option<JetStreamConfig>,
    workers: Vec<(JoinHandle<()>, watch::Sender<bool>)>,
}

#[derive(Debug, Clone, Copy)]
enum Backend {
    InProcess,
    JetStream,
}

impl Setup {
    /// `None` for JetStream without a `nats-server`.
    async fn new(backend: Backend, tune: impl FnOnce(&mut JetStreamConfig)) -> Option<Self> {
        let renderer = Arc::new(TestRenderer::new());
        match backend {
            Backend::InProcess => {
                let queue = JobQueue::new(
                    Arc::clone(&renderer) as Arc<dyn Renderer>,
                    QueueConfig {
                        capacity: 64,
                        per_user_limit: PER_USER,
                        workers: 1,
                        cache_entries: 16,
                    },
                );
                Some(Self {
                    queue: RenderQueue::InProcess(queue),
                    renderer,
                    broker: None,
                    config: None,
                    workers: Vec::new(),
                })
            }
            Backend::JetStream => {
                let broker = nats_server()?;
                let mut config = JetStreamConfig::new(broker.url());
                config.per_user_limit = PER_USER;
                config.ack_wait = Duration::from_secs(2);
                tune(&mut config);
                let versions = Arc::clone(&renderer);
                let queue = JetStreamQueue::connect(
                    &config,
                    Arc::new(move |style: Option<&str>| versions.style_version(style)),
                )
                .await
                .expect("connecting to nats-server");
                let mut setup = Self {
                    queue: RenderQueue::JetStream(queue),
                    renderer,
                    broker: Some(broker),
                    config: Some(config),
                    workers: Vec::new(),
                };
                setup.start_worker().await;
                Some(setup)
            }
        }
    }

    /// Starts one more JetStream worker on the same renderer.
    async fn start_worker(&mut self) {
        let config = self.config.clone().expect("a JetStream setup");
        let renderer = Arc::clone(&self.renderer) as Arc<dyn Renderer>;
        let worker = JetStreamWorker::connect(&config, renderer)
            .await
            .expect("a worker connects");
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            worker.run(stopped).await.expect("the worker runs");
        });
        self.workers.push((task, stop));
    }

    async fn submit(&self, user: u64, request: RenderRequest) -> Result<JobHandle, SubmitError> {
        self.queue.submit(user, request).await
    }
}

/// Waits (bounded) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn done(h: JobHandle) -> JobOutcome {
    tokio::time::timeout(T, h.wait())
        .await
        .expect("job finished in time")
        .expect("job not cancelled")
}

fn rendered_tags(r: &TestRenderer) -> Vec<Option<u32>> {
    r.log().iter().map(|c| c.tag).collect()
}

macro_rules! both {
    ($name:ident, $body:ident) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn in_process() {
                $body(Backend::InProcess).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn jetstream() {
                $body(Backend::JetStream).await;
            }
        }
    };
}

both!(
    per_user_cap_and_a_light_user,
    per_user_cap_and_a_light_user_body
);
both!(
    identical_requests_render_once,
    identical_requests_render_once_body
);
both!(
    waiting_jobs_can_be_cancelled,
    waiting_jobs_can_be_cancelled_body
);
both!(positions_count_down, positions_count_down_body);
both!(faulty_renders_end_with_a_clear_error, faulty_renders_body);
both!(a_ten_mib_photo_round_trip, ten_mib_photo_body);

/// A user gets `PER_USER` jobs in flight and no more; another user's job is served within
/// the first user's cap; the first user may submit again once a job ends.
async fn per_user_cap_and_a_light_user_body(backend: Backend) {
    let Some(s) = Setup::new(backend, |_| {}).await else {
        return;
    };
    s.renderer.close_gate();
    let mut heavy = Vec::new();
    for tag in 1..=PER_USER as u32 {
        heavy.push(s.submit(1, tagged(tag)).await.expect("under the cap"));
    }
    let refused = s.submit(1, tagged(99)).await;
    assert!(
        matches!(refused, Err(SubmitError::UserLimit { limit }) if limit == PER_USER),
        "{:?}",
        refused.err()
    );
    let light = s
        .submit(2, tagged(50))
        .await
        .expect("another user is admitted");
    s.renderer.open_gate();
    let outcome = done(light).await;
    assert!(outcome.result.is_ok());
    for h in heavy {
        assert!(done(h).await.result.is_ok());
    }
    let order = rendered_tags(&s.renderer);
    let light_at = order.iter().position(|t| *t == Some(50)).expect("rendered");
    assert!(
        light_at <= PER_USER,
        "the light user waited behind {light_at}: {order:?}"
    );
    assert!(
        s.submit(1, tagged(3)).await.is_ok(),
        "free again after the jobs ended"
    );
}

/// The same photo and options from two users while the first is queued: one render, two
/// answers; asked again after it ended: answered without rendering.
async fn identical_requests_render_once_body(backend: Backend) {
    let Some(s) = Setup::new(backend, |_| {}).await else {
        return;
    };
    s.renderer.close_gate();
    let first = s.submit(1, tagged(7)).await.unwrap();
    let second = s.submit(2, tagged(7)).await.unwrap();
    assert!(!first.is_shared() && second.is_shared());
    s.renderer.open_gate();
    let (a, b) = (done(first).await, done(second).await);
    let (a, b) = (a.result.unwrap(), b.result.unwrap());
    assert_eq!(a.files, b.files);
    assert!(!a.files.is_empty());
    let again = done(s.submit(3, tagged(7)).await.unwrap()).await;
    assert_eq!(again.result.unwrap().files, a.files);
    assert!(again.cached);
    assert_eq!(s.renderer.calls(), 1, "rendered once");
}

/// A waiting job can be cancelled by its handle and is never rendered; a running one
/// cannot.
async fn waiting_jobs_can_be_cancelled_body(backend: Backend) {
    let Some(s) = Setup::new(backend, |_| {}).await else {
        return;
    };
    s.renderer.close_gate();
    let running = s.submit(1, tagged(1)).await.unwrap();
    until("the first job to start", || s.renderer.active() == 1).await;
    let waiting = s.submit(2, tagged(2)).await.unwrap();
    assert!(waiting.cancel().await, "a waiting job is cancelled");
    assert!(!running.cancel().await, "a running job is not");
    let mut waiting = waiting;
    tokio::time::timeout(T, async {
        while !matches!(waiting.status(), JobStatus::Cancelled) {
            if waiting.changed().await.is_none() {
                break;
            }
        }
    })
    .await
    .expect("the cancellation shows");
    assert!(matches!(waiting.status(), JobStatus::Cancelled));
    s.renderer.open_gate();
    assert!(done(running).await.result.is_ok());
    let after = s.submit(3, tagged(3)).await.unwrap();
    assert!(done(after).await.result.is_ok());
    assert_eq!(rendered_tags(&s.renderer), vec![Some(1), Some(3)]);
}

/// Jobs waiting behind a running one see positions 1 and 2.
async fn positions_count_down_body(backend: Backend) {
    let Some(s) = Setup::new(backend, |_| {}).await else {
        return;
    };
    s.renderer.close_gate();
    let running = s.submit(1, tagged(1)).await.unwrap();
    until("the first job to start", || s.renderer.active() == 1).await;
    let next = s.submit(2, tagged(2)).await.unwrap();
    let last = s.submit(3, tagged(3)).await.unwrap();
    let position = |h: &JobHandle| match h.status() {
        JobStatus::Queued { position, .. } => Some(position),
        _ => None,
    };
    until("positions 1 and 2", || {
        position(&next) == Some(1) && position(&last) == Some(2)
    })
    .await;
    s.renderer.open_gate();
    for h in [running, next, last] {
        assert!(done(h).await.result.is_ok());
    }
}

/// A render that fails with an internal error ends with that error for the user (after the
/// broker's retries); the queue goes on with the next job.
async fn faulty_renders_body(backend: Backend) {
    let Some(s) = Setup::new(backend, |c| c.max_failures = 2).await else {
        return;
    };
    let faulty = s
        .submit(1, request(photo(1, Trigger::Internal, 1)))
        .await
        .unwrap();
    let outcome = done(faulty).await;
    assert!(
        matches!(&outcome.result, Err(RenderError::Internal(_))),
        "{:?}",
        outcome.result
    );
    let panicking = done(
        s.submit(1, request(photo(1, Trigger::Panic, 2)))
            .await
            .unwrap(),
    )
    .await;
    assert!(matches!(panicking.result, Err(RenderError::Internal(_))));
    let user_error = done(
        s.submit(1, request(photo(0, Trigger::Normal, 3)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(user_error.result.unwrap_err(), RenderError::NoFace);
    assert!(done(s.submit(1, tagged(4)).await.unwrap())
        .await
        .result
        .is_ok());
    if let Backend::JetStream = backend {
        let tags = rendered_tags(&s.renderer);
        let attempts = tags.iter().filter(|t| **t == Some(1)).count();
        assert_eq!(attempts, 2, "tried max_failures times: {tags:?}");
        let config = s.config.as_ref().unwrap();
        let dead = dead_letters(&config.url).await;
        assert_eq!(dead, 2, "both faulty jobs are on the dead-letter subject");
        match outcome.result {
            Err(RenderError::Internal(m)) => assert!(m.contains("set aside"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}

/// Messages on the dead-letter stream.
async fn dead_letters(url: &str) -> u64 {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("TOONBOT_DEAD").await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// A photo of more than 10 MiB goes to the renderer intact and its result comes back.
async fn ten_mib_photo_body(backend: Backend) {
    let Some(s) = Setup::new(backend, |_| {}).await else {
        return;
    };
    let side = 1700u32;
    let mut state = 0x9e37_79b9_u32;
    let mut img = image::RgbaImage::from_fn(side, side, |_, _| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        image::Rgba(state.to_le_bytes())
    });
    // The test renderer's header pixels: one face, no trigger, tag 77.
    img.put_pixel(0, 0, image::Rgba([1, 0, 0, 255]));
    img.put_pixel(1, 0, image::Rgba([0, 0, 77, 255]));
    let big = png(&img);
    assert!(big.len() > 10 << 20, "{} bytes", big.len());
    assert_eq!(tag_of(&big), Some(77));
    let outcome = done(s.submit(1, request(big)).await.unwrap()).await;
    let output = outcome.result.expect("rendered");
    assert_eq!(output.faces, 1);
    assert_eq!(rendered_tags(&s.renderer), vec![Some(77)]);
}

/// A worker that dies holding a job: the job goes to another worker after the lease, and
/// its user gets one answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_a_killed_worker_s_job_is_redelivered_and_answered_once() {
    let Some(mut s) = Setup::new(Backend::JetStream, |c| c.ack_wait = Duration::from_secs(1)).await
    else {
        return;
    };
    s.renderer.close_gate();
    let mut handle = s.submit(1, tagged(1)).await.unwrap();
    until("the job to start", || s.renderer.active() == 1).await;
    let (killed, _stop) = s.workers.remove(0);
    killed.abort();
    s.start_worker().await;
    until("the job to be delivered again", || s.renderer.active() == 2).await;
    s.renderer.open_gate();
    let mut answers = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let JobStatus::Done(outcome) = handle.status() {
            assert!(outcome.result.is_ok());
            answers += 1;
        }
        match tokio::time::timeout_at(deadline, handle.changed()).await {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    assert_eq!(answers, 1, "one answer");
    until("both renders to end", || s.renderer.active() == 0).await;
    assert_eq!(s.renderer.calls(), 2);
}

/// Jobs queued when the broker stops are all rendered once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_jobs_survive_a_broker_restart() {
    let Some(mut s) = Setup::new(Backend::JetStream, |_| {}).await else {
        return;
    };
    for (_, stop) in &s.workers {
        stop.send_replace(true);
    }
    for (task, _) in s.workers.drain(..) {
        task.await.unwrap();
    }
    let mut handles = Vec::new();
    for user in 1..=3 {
        handles.push(s.submit(user, tagged(user as u32)).await.unwrap());
    }
    s.broker
        .as_mut()
        .unwrap()
        .restart()
        .expect("restarting nats-server");
    s.start_worker().await;
    for h in handles {
        assert!(done(h).await.result.is_ok());
    }
    let mut tags = rendered_tags(&s.renderer);
    tags.sort();
    assert_eq!(tags, vec![Some(1), Some(2), Some(3)]);
}

/// A render longer than the lease keeps its job: no second delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_a_job_longer_than_the_lease_is_not_redelivered() {
    let Some(s) = Setup::new(Backend::JetStream, |c| c.ack_wait = Duration::from_secs(1)).await
    else {
        return;
    };
    s.renderer.set_delay(Duration::from_millis(3500));
    let outcome = done(s.submit(1, tagged(1)).await.unwrap()).await;
    assert!(outcome.result.is_ok());
    assert_eq!(s.renderer.calls(), 1);
}

/// The dead-letter stream is where a job set aside can be read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_dead_letters_carry_the_job() {
    let Some(s) = Setup::new(Backend::JetStream, |c| c.max_failures = 1).await else {
        return;
    };
    let outcome = done(
        s.submit(5, request(photo(1, Trigger::Internal, 9)))
            .await
            .unwrap(),
    )
    .await;
    assert!(outcome.result.is_err());
    let client = async_nats::connect(s.config.as_ref().unwrap().url.as_str())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("TOONBOT_DEAD").await.unwrap();
    let message = stream.get_raw_message(1).await.unwrap();
    let text = String::from_utf8_lossy(&message.payload).to_string();
    assert!(text.contains("\"photo\""), "{text}");
    assert_eq!(message.subject.as_str(), "toonbot.dead.render");
}

/// The real binary as a worker process (`serve --role worker`) renders a real photo; killed
/// with SIGKILL mid-render, its job goes to the next worker process and is answered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_worker_processes_render_and_a_kill_9_loses_nothing() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let Some(broker) = nats_server() else {
        return;
    };
    let mut config = JetStreamConfig::new(broker.url());
    config.ack_wait = Duration::from_secs(2);
    let queue = JetStreamQueue::connect(&config, Arc::new(|_: Option<&str>| Some("p2c".into())))
        .await
        .expect("connecting");
    let worker = || {
        Command::new(env!("CARGO_BIN_EXE_toonbot"))
            .args(["serve", "--role", "worker", "--nats", broker.url()])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting a worker process")
    };
    let mut first = worker();
    let photo = std::fs::read(data.join("samples/groups/sample1.jpg")).unwrap();
    let mut handle = queue.submit(1, request(photo)).await.expect("queued");
    tokio::time::timeout(Duration::from_secs(120), async {
        while !matches!(handle.status(), JobStatus::Running) {
            handle.changed().await.expect("the job goes on");
        }
    })
    .await
    .expect("the first worker takes the job");
    first.kill().expect("SIGKILL");
    first.wait().unwrap();
    let mut second = worker();
    let mut answers = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        if let JobStatus::Done(outcome) = handle.status() {
            answers.push(outcome);
        }
        match tokio::time::timeout_at(deadline, handle.changed()).await {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    second.kill().unwrap();
    second.wait().unwrap();
    assert_eq!(answers.len(), 1, "one answer");
    let output = answers.remove(0).result.expect("rendered");
    assert!(output.faces >= 1);
    let sticker = image::load_from_memory(&output.files[0].png).unwrap();
    assert_eq!((sticker.width(), sticker.height()), (320, 320));
}

/// The load test's own bookkeeping on a small run: every job answered once, a figure per
/// round. (Its throughput targets are measured by `toonbot loadtest`, not here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_answers_every_job_once() {
    if nats_server().is_none() {
        return;
    }
    let plan = toonbot::jobs::loadtest::LoadPlan {
        workers: vec![1, 2],
        jobs: 40,
        users: 7,
        stub: Duration::from_millis(5),
        nats_server: "nats-server".into(),
        worker_exe: env!("CARGO_BIN_EXE_toonbot").into(),
        flood: Some(toonbot::jobs::loadtest::FloodPlan {
            workers: 2,
            per_user_limit: 2,
            heavy_jobs: 30,
            light_users: 3,
        }),
        chaos: true,
    };
    let report = toonbot::jobs::loadtest::run(&plan)
        .await
        .expect("the load test runs");
    assert_eq!((report.lost, report.duplicated), (0, 0));
    assert_eq!(report.jobs_per_s.len(), 2);
    assert_eq!(report.p99_wait_ms.len(), 2);
    assert!(report.jobs_per_s.iter().all(|r| *r > 0.0), "{report:?}");
    assert!(report.p50_wait_ms[0] <= report.p99_wait_ms[0]);
    assert!(
        report.broker_peak_mib.iter().all(|m| *m > 1.0),
        "{report:?}"
    );
}

/// A training queue on the setup's broker.
async fn training_queue(s: &Setup) -> TrainingQueue {
    TrainingQueue::connect(s.config.as_ref().expect("a JetStream setup"))
        .await
        .expect("connecting the training queue")
}

/// The next training job, waiting (bounded) for one.
async fn take_training(jobs: &mut TrainingJobs) -> TrainingJob {
    let deadline = Instant::now() + T;
    loop {
        if let Some(job) = jobs.next(Duration::from_millis(300)).await {
            return job;
        }
        assert!(Instant::now() < deadline, "no training job came");
    }
}

/// Messages on a stream (training jobs, dead letters).
async fn stream_messages(url: &str, stream: &str) -> u64 {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(stream).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// A training job that runs past its lease stays with its trainer; a file kept beside it (an
/// archive of 3 MB) comes back intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_a_training_job_longer_than_the_lease_is_not_redelivered() {
    let Some(s) = Setup::new(Backend::JetStream, |c| c.ack_wait = Duration::from_secs(1)).await
    else {
        return;
    };
    let url = s.config.as_ref().unwrap().url.clone();
    let queue = training_queue(&s).await;
    let archive: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    queue.put_file("archive.7.one", &archive).await.unwrap();
    queue.submit(7, b"pack one".to_vec()).await.expect("queued");
    let mut first = queue.jobs().await.unwrap();
    let mut second = queue.jobs().await.unwrap();
    let job = take_training(&mut first).await;
    assert_eq!(job.payload(), b"pack one");
    assert_eq!(job.attempt(), 1);
    assert_eq!(queue.file("archive.7.one").await.unwrap(), archive);
    let other = tokio::spawn(async move { second.next(Duration::from_millis(3500)).await });
    let end = job
        .hold(async {
            tokio::time::sleep(Duration::from_millis(3500)).await;
            TrainingJobEnd::Finished
        })
        .await;
    assert_eq!(end, TrainingJobEnd::Finished);
    assert!(other.await.unwrap().is_none(), "delivered a second time");
    assert_eq!(stream_messages(&url, "TOONBOT_TRAINING").await, 0);
    assert!(queue
        .file(&format!(
            "archive.7.{}",
            toonbot::jobs::image_hash(&archive)
        ))
        .await
        .is_err());
}

/// A trainer that dies holding a job leaves it to another after the lease (an attempt
/// counted); a trainer that stops hands it on at once (not counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_a_killed_trainer_s_job_goes_to_another() {
    let Some(s) = Setup::new(Backend::JetStream, |c| c.ack_wait = Duration::from_secs(1)).await
    else {
        return;
    };
    let queue = training_queue(&s).await;
    queue.submit(3, b"pack".to_vec()).await.unwrap();
    let mut jobs = queue.jobs().await.unwrap();
    let job = take_training(&mut jobs).await;
    let (started, mut running) = watch::channel(false);
    let dying = tokio::spawn(async move {
        job.hold(async move {
            started.send_replace(true);
            std::future::pending::<()>().await;
            TrainingJobEnd::Finished
        })
        .await
    });
    running.wait_for(|r| *r).await.unwrap();
    dying.abort();
    let mut others = queue.jobs().await.unwrap();
    let again = take_training(&mut others).await;
    assert_eq!(again.attempt(), 2, "the dead trainer's attempt counts");
    assert_eq!(again.payload(), b"pack");
    let stopped = Instant::now();
    let end = again.hold(async { TrainingJobEnd::Interrupted }).await;
    assert_eq!(end, TrainingJobEnd::Interrupted);
    let third = take_training(&mut others).await;
    assert!(
        stopped.elapsed() < Duration::from_millis(900),
        "waited for the lease"
    );
    assert_eq!(third.attempt(), 2, "a clean stop is not an attempt");
    third.hold(async { TrainingJobEnd::Finished }).await;
}

/// A server has one pack queued or training at a time; other servers are not held up, and
/// the server may queue again once its job ends; a waiting job can be withdrawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_one_training_job_per_server() {
    let Some(s) = Setup::new(Backend::JetStream, |_| {}).await else {
        return;
    };
    let queue = training_queue(&s).await;
    queue.submit(1, b"a".to_vec()).await.unwrap();
    assert!(queue.is_busy(1).await.unwrap());
    assert!(!queue.is_busy(2).await.unwrap());
    let again = queue.submit(1, b"b".to_vec()).await;
    assert!(matches!(again, Err(TrainingSubmitError::Busy)), "{again:?}");
    queue.submit(2, b"c".to_vec()).await.unwrap();
    let mut jobs = queue.jobs().await.unwrap();
    let first = take_training(&mut jobs).await;
    assert_eq!(first.payload(), b"a");
    assert!(queue.is_busy(1).await.unwrap(), "busy while it trains");
    first.hold(async { TrainingJobEnd::Finished }).await;
    assert!(!queue.is_busy(1).await.unwrap());
    queue.submit(1, b"d".to_vec()).await.unwrap();
    let mut payloads = Vec::new();
    for _ in 0..2 {
        let job = take_training(&mut jobs).await;
        payloads.push(job.payload().to_vec());
        job.hold(async { TrainingJobEnd::Finished }).await;
    }
    assert_eq!(payloads, vec![b"c".to_vec(), b"d".to_vec()]);
    // A job no trainer has started can be taken out of the queue.
    queue.submit(5, b"e".to_vec()).await.unwrap();
    assert_eq!(queue.withdraw(5).await.unwrap(), Some(b"e".to_vec()));
    assert_eq!(queue.withdraw(5).await.unwrap(), None);
    assert!(!queue.is_busy(5).await.unwrap());
    assert!(jobs.next(Duration::from_millis(500)).await.is_none());
}

/// A training that keeps failing is retried, then set aside on `{prefix}.dead.train` with
/// its payload; clean stops before do not count; nothing is left queued or counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_failing_trainings_are_set_aside() {
    let Some(s) = Setup::new(Backend::JetStream, |c| c.max_failures = 2).await else {
        return;
    };
    let url = s.config.as_ref().unwrap().url.clone();
    let queue = training_queue(&s).await;
    queue.submit(9, b"bad pack".to_vec()).await.unwrap();
    let mut jobs = queue.jobs().await.unwrap();
    for _ in 0..3 {
        let stopped = take_training(&mut jobs).await;
        assert_eq!(stopped.attempt(), 1);
        stopped.hold(async { TrainingJobEnd::Interrupted }).await;
    }
    for attempt in 1..=2 {
        let job = take_training(&mut jobs).await;
        assert_eq!(job.attempt(), attempt);
        assert!(!job.failed_too_often());
        assert_eq!(job.is_last_attempt(), attempt == 2);
        job.hold(async { TrainingJobEnd::Failed("out of memory".into()) })
            .await;
        if job.is_last_attempt() {
            // The caller records the failure, then sets the job aside.
            job.set_aside().await;
        }
    }
    assert!(jobs.next(Duration::from_millis(1500)).await.is_none());
    assert_eq!(stream_messages(&url, "TOONBOT_TRAINING").await, 0);
    assert!(queue.file_keys("attempts.").await.unwrap().is_empty());
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let dead = js.get_stream("TOONBOT_DEAD").await.unwrap();
    let message = dead
        .get_last_raw_message_by_subject("toonbot.dead.train")
        .await
        .unwrap();
    assert_eq!(&message.payload[..], b"bad pack");
    assert!(!queue.is_busy(9).await.unwrap());
}

/// Stickers are served while a training job holds a trainer: the streams are separate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_renders_go_on_while_a_pack_trains() {
    let Some(s) = Setup::new(Backend::JetStream, |c| c.ack_wait = Duration::from_secs(1)).await
    else {
        return;
    };
    let queue = training_queue(&s).await;
    queue.submit(4, b"long pack".to_vec()).await.unwrap();
    let mut jobs = queue.jobs().await.unwrap();
    let job = take_training(&mut jobs).await;
    let (finish, finished) = tokio::sync::oneshot::channel::<()>();
    let training = tokio::spawn(async move {
        job.hold(async move {
            let _ = finished.await;
            TrainingJobEnd::Finished
        })
        .await
    });
    for user in 1..=3 {
        let outcome = done(s.submit(user, tagged(user as u32)).await.unwrap()).await;
        assert!(outcome.result.is_ok());
    }
    assert!(!training.is_finished(), "the training still runs");
    finish.send(()).unwrap();
    assert_eq!(training.await.unwrap(), TrainingJobEnd::Finished);
}

/// Training news reaches the responders in the order it was told, each piece once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_training_news_comes_in_order() {
    let Some(s) = Setup::new(Backend::JetStream, |_| {}).await else {
        return;
    };
    let queue = training_queue(&s).await;
    for n in 0..5u8 {
        queue.tell(u64::from(n % 2), vec![n]).await.unwrap();
    }
    // Two responders, each telling what it takes (slowly) before taking more.
    let told = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut responders = Vec::new();
    for _ in 0..2 {
        let mut feed = queue.news().await.unwrap();
        let told = Arc::clone(&told);
        responders.push(tokio::spawn(async move {
            while let Some(item) = feed.next().await {
                let n = item.payload()[0];
                let told = Arc::clone(&told);
                item.tell(async move {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    told.lock().unwrap().push(n);
                })
                .await;
            }
        }));
    }
    until("all the news told", || told.lock().unwrap().len() >= 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*told.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    for responder in responders {
        responder.abort();
    }
}
