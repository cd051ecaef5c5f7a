//! `toonbot loadtest`: the JetStream queue under load with a stub renderer, for 1, 2, 4 and 8
//! worker processes on loopback. Each round starts its own `nats-server` (an empty store),
//! the worker processes (this binary, `loadtest --worker`), and submits jobs from many
//! users at once; it reports throughput, the queue wait's percentiles, the broker's CPU and
//! peak memory, and jobs lost or answered twice. A flood round then has one user submit as
//! fast as the per-user cap allows while others send one job each, and reports how long
//! those waited.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use tokio::task::JoinSet;

use super::{
    FileKind, JetStreamConfig, JetStreamQueue, JobStatus, OutputKind, RenderError, RenderOutput,
    RenderRequest, RenderedFile, Renderer, StyleInfo, SubmitError,
};

/// A renderer that takes `delay` per job and draws nothing: the queue's cost alone.
pub struct StubRenderer {
    /// Time each render takes.
    pub delay: Duration,
}

impl Renderer for StubRenderer {
    fn render(&self, request: &RenderRequest) -> Result<RenderOutput, RenderError> {
        std::thread::sleep(self.delay);
        Ok(RenderOutput {
            files: vec![RenderedFile {
                name: "face1-sticker.png".into(),
                kind: FileKind::Sticker,
                png: request.image.clone(),
            }],
            faces: 1,
            faces_found: 1,
            style: "stub".into(),
            timings_ms: Vec::new(),
        })
    }

    fn styles(&self) -> Vec<StyleInfo> {
        vec![StyleInfo {
            name: "stub".into(),
            description: "the load test's stub".into(),
            is_default: true,
            preview_png: None,
        }]
    }

    fn style_version(&self, _style: Option<&str>) -> Option<String> {
        Some("stub".into())
    }
}

/// What a load test runs.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// Worker process counts, one round each.
    pub workers: Vec<usize>,
    /// Jobs per round.
    pub jobs: usize,
    /// Users the jobs come from, in turn.
    pub users: usize,
    /// The stub renderer's time per job.
    pub stub: Duration,
    /// The `nats-server` binary.
    pub nats_server: PathBuf,
    /// This binary, run as `loadtest --worker`.
    pub worker_exe: PathBuf,
    /// The flood round (one user floods, light users send one job each), when set.
    pub flood: Option<FloodPlan>,
    /// In rounds of 2 workers or more, kill one worker process with SIGKILL halfway through
    /// the submissions and restart the broker (SIGKILL) at three quarters.
    pub chaos: bool,
}

/// The flood round: one user submits `heavy_jobs` as fast as the per-user cap lets them in,
/// while `light_users` others send one job each.
#[derive(Debug, Clone)]
pub struct FloodPlan {
    /// Worker processes.
    pub workers: usize,
    /// The per-user cap K.
    pub per_user_limit: usize,
    /// Jobs the flooding user gets through.
    pub heavy_jobs: usize,
    /// Users with one job each.
    pub light_users: usize,
}

/// What the flood round measured.
#[derive(Debug, Serialize)]
pub struct FloodReport {
    /// Worker processes.
    pub workers: usize,
    /// The per-user cap K.
    pub per_user_limit: usize,
    /// Jobs the flooding user got through.
    pub heavy_jobs: usize,
    /// Each light user's wait, from submission until a worker took the job.
    pub light_wait_ms: Vec<f64>,
    /// The longest of them.
    pub light_max_wait_ms: f64,
    /// The target: 2 x K x the stub's time.
    pub bound_ms: f64,
}

/// One line of JSON: a value per round, in `workers` order.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    /// Worker processes per round.
    pub workers: Vec<usize>,
    /// Answered jobs per second, from the first submission to the last answer.
    pub jobs_per_s: Vec<f64>,
    /// Median time from submission until a worker took the job.
    pub p50_wait_ms: Vec<f64>,
    /// 99th percentile of the same.
    pub p99_wait_ms: Vec<f64>,
    /// The broker's CPU time over the round's wall time, in percent of one core.
    pub broker_cpu_percent: Vec<f64>,
    /// The broker's peak resident memory.
    pub broker_peak_mib: Vec<f64>,
    /// Jobs never answered, over all rounds.
    pub lost: usize,
    /// Jobs answered more than once, over all rounds.
    pub duplicated: usize,
    /// The flood round, when run.
    pub flood: Option<FloodReport>,
}

/// A `nats-server -js` on a free loopback port with an empty store of its own; killed (and
/// its store removed) on drop. The load test's broker, and the conformance suite's.
pub struct LocalNatsServer {
    child: Child,
    url: String,
    binary: PathBuf,
    port: u16,
    store: PathBuf,
}

fn spawn_server(binary: &Path, port: u16, store: &Path) -> Result<Child> {
    let child = Command::new(binary)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nats-server did not start on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

impl LocalNatsServer {
    /// Starts `binary` and waits until it takes connections.
    pub fn start(binary: &Path) -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let store =
            std::env::temp_dir().join(format!("toonbot-nats-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&store)?;
        Ok(Self {
            child: spawn_server(binary, port, &store)?,
            url: format!("nats://127.0.0.1:{port}"),
            binary: binary.to_path_buf(),
            port,
            store,
        })
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and store.
    pub fn restart(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        self.child = spawn_server(&self.binary, self.port, &self.store)?;
        Ok(())
    }

    /// CPU seconds used so far (user + system), from `/proc`.
    fn cpu_s(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // Fields after the command name, which is in parentheses: utime is the 12th, stime
        // the 13th of them.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    }

    fn peak_mib(&self) -> Option<f64> {
        crate::peak_memory_mib(&self.child.id().to_string())
    }
}

impl Drop for LocalNatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// Worker processes, killed on drop.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The queue settings of a load test: room for every job, no per-user cap in the way, and a
/// 5 s lease, so that a killed worker's job comes back within the round.
fn queue_config(url: &str, jobs: usize) -> JetStreamConfig {
    JetStreamConfig {
        capacity: jobs.max(1),
        per_user_limit: jobs.max(1),
        ack_wait: Duration::from_secs(5),
        ..JetStreamConfig::new(url)
    }
}

/// `loadtest --worker`: `count` workers on the stub renderer until the process is killed.
pub async fn serve_stub_workers(url: &str, stub: Duration, count: usize) -> Result<()> {
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let renderer = Arc::new(StubRenderer { delay: stub });
    super::run_workers(&JetStreamConfig::new(url), renderer, count, stopped).await
}

/// Runs every round of `plan` and reports them.
pub async fn run(plan: &LoadPlan) -> Result<LoadReport> {
    let mut report = LoadReport {
        workers: plan.workers.clone(),
        jobs_per_s: Vec::new(),
        p50_wait_ms: Vec::new(),
        p99_wait_ms: Vec::new(),
        broker_cpu_percent: Vec::new(),
        broker_peak_mib: Vec::new(),
        lost: 0,
        duplicated: 0,
        flood: None,
    };
    for &workers in &plan.workers {
        let round = run_round(plan, workers).await?;
        tracing::info!(
            "{workers} workers: {:.1} jobs/s, p99 wait {:.0} ms",
            round.jobs_per_s,
            round.p99_wait_ms
        );
        report.jobs_per_s.push(round.jobs_per_s);
        report.p50_wait_ms.push(round.p50_wait_ms);
        report.p99_wait_ms.push(round.p99_wait_ms);
        report.broker_cpu_percent.push(round.broker_cpu_percent);
        report.broker_peak_mib.push(round.broker_peak_mib);
        report.lost += round.lost;
        report.duplicated += round.duplicated;
    }
    if let Some(flood) = &plan.flood {
        report.flood = Some(run_flood(plan, flood).await?);
    }
    Ok(report)
}

/// A broker, `workers` worker processes attached to it, and a queue with `config`.
async fn start_round(
    plan: &LoadPlan,
    workers: usize,
    config: impl FnOnce(&str) -> JetStreamConfig,
) -> Result<(LocalNatsServer, Workers, JetStreamQueue)> {
    let broker = LocalNatsServer::start(&plan.nats_server)?;
    let config = config(&broker.url);
    let queue =
        JetStreamQueue::connect(&config, Arc::new(|_: Option<&str>| Some("stub".into()))).await?;
    let processes = Workers(
        (0..workers)
            .map(|_| {
                Command::new(&plan.worker_exe)
                    .args(["loadtest", "--worker", "--nats", &broker.url])
                    .arg("--stub-ms")
                    .arg(plan.stub.as_millis().to_string())
                    .stdout(Stdio::null())
                    .spawn()
                    .context("starting a worker process")
            })
            .collect::<Result<_>>()?,
    );
    // Wait for the workers to be attached: one warm-up job per worker.
    for i in 0..workers as u64 {
        let user = u64::MAX - i;
        let handle = queue.submit(user, job_request(user)).await?;
        tokio::time::timeout(Duration::from_secs(60), handle.wait())
            .await
            .context("the workers did not start")?;
    }
    Ok((broker, processes, queue))
}

async fn run_flood(plan: &LoadPlan, flood: &FloodPlan) -> Result<FloodReport> {
    let (_broker, _workers, queue) = start_round(plan, flood.workers, |url| JetStreamConfig {
        capacity: flood.heavy_jobs + flood.light_users + flood.workers,
        per_user_limit: flood.per_user_limit,
        ..JetStreamConfig::new(url)
    })
    .await?;
    let heavy = {
        let queue = queue.clone();
        let jobs = flood.heavy_jobs;
        tokio::spawn(async move {
            let mut answers = JoinSet::new();
            for i in 0..jobs as u64 {
                let handle = loop {
                    match queue.submit(0, job_request(i)).await {
                        Ok(handle) => break handle,
                        Err(SubmitError::UserLimit { .. }) => {
                            tokio::time::sleep(Duration::from_millis(2)).await
                        }
                        Err(e) => return Err(anyhow::anyhow!(e)),
                    }
                };
                answers.spawn(handle.wait());
            }
            while answers.join_next().await.is_some() {}
            Ok(())
        })
    };
    // The light users arrive while the flood is under way, one every 100 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut light = JoinSet::new();
    for user in 1..=flood.light_users as u64 {
        let handle = queue.submit(user, job_request(1 << 40 | user)).await?;
        light.spawn(handle.wait());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut light_wait_ms = Vec::new();
    while let Some(outcome) = light.join_next().await {
        let outcome = outcome?.context("a light user's job was cancelled")?;
        light_wait_ms.push(outcome.wait_ms);
    }
    heavy.await??;
    Ok(FloodReport {
        workers: flood.workers,
        per_user_limit: flood.per_user_limit,
        heavy_jobs: flood.heavy_jobs,
        light_max_wait_ms: light_wait_ms.iter().copied().fold(0.0, f64::max),
        light_wait_ms,
        bound_ms: 2.0 * flood.per_user_limit as f64 * plan.stub.as_secs_f64() * 1000.0,
    })
}

struct Round {
    jobs_per_s: f64,
    p50_wait_ms: f64,
    p99_wait_ms: f64,
    broker_cpu_percent: f64,
    broker_peak_mib: f64,
    lost: usize,
    duplicated: usize,
}

async fn run_round(plan: &LoadPlan, workers: usize) -> Result<Round> {
    let (mut broker, mut processes, queue) =
        start_round(plan, workers, |url| queue_config(url, plan.jobs)).await?;
    let chaos = plan.chaos && workers >= 2;
    let cpu_before = broker.cpu_s().unwrap_or(0.0);
    let started = Instant::now();
    let mut answers = JoinSet::new();
    for i in 0..plan.jobs {
        if chaos && i == plan.jobs / 2 {
            processes.0[0].kill()?;
            processes.0[0].wait()?;
        }
        if chaos && i == plan.jobs * 3 / 4 {
            broker.restart()?;
        }
        let user = (i % plan.users.max(1)) as u64;
        let mut handle = submit_retrying(&queue, user, job_request(i as u64)).await?;
        answers.spawn(async move {
            // Every Done the handle shows, until it can change no more.
            let mut done = Vec::new();
            loop {
                if let JobStatus::Done(outcome) = handle.status() {
                    done.push(outcome.wait_ms);
                }
                match tokio::time::timeout(Duration::from_secs(120), handle.changed()).await {
                    Ok(Some(_)) => {}
                    outcome => {
                        if done.is_empty() {
                            let how = if outcome.is_err() {
                                "silent for 120 s"
                            } else {
                                "ended"
                            };
                            tracing::warn!(
                                "job {i} {how} without an answer: {:?}",
                                handle.status()
                            );
                        }
                        break;
                    }
                }
            }
            done
        });
    }
    let mut waits = Vec::new();
    let (mut lost, mut duplicated) = (0, 0);
    while let Some(done) = answers.join_next().await {
        let done = done?;
        match done.len() {
            0 => lost += 1,
            1 => {}
            _ => duplicated += 1,
        }
        waits.extend(done.first().copied());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = broker.cpu_s().unwrap_or(cpu_before) - cpu_before;
    waits.sort_by(f64::total_cmp);
    let percentile = |p: f64| {
        waits
            .get(((waits.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(Round {
        jobs_per_s: (plan.jobs - lost) as f64 / elapsed,
        p50_wait_ms: percentile(0.5),
        p99_wait_ms: percentile(0.99),
        broker_cpu_percent: 100.0 * cpu / elapsed,
        broker_peak_mib: broker.peak_mib().unwrap_or(f64::NAN),
        lost,
        duplicated,
    })
}

/// Submits, trying again for up to 30 s while the broker is unavailable (restarting).
async fn submit_retrying(
    queue: &JetStreamQueue,
    user: u64,
    request: RenderRequest,
) -> Result<super::JobHandle> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match queue.submit(user, request.clone()).await {
            Ok(handle) => return Ok(handle),
            Err(SubmitError::Unavailable(e)) if Instant::now() < deadline => {
                tracing::debug!("broker unavailable, trying again: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A request whose photo is unique to `tag`: the stub does not decode it.
fn job_request(tag: u64) -> RenderRequest {
    RenderRequest {
        image: tag.to_le_bytes().to_vec(),
        style: None,
        output: OutputKind::Sticker,
        outline: false,
        round_avatar: false,
    }
}
