//! The cartoon flow shared by `/cartoon`, the Cartoonize menu and DMs.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::sleep_until;

use super::download::PhotoRef;
use super::reply::{batch_files, Reply, ReplyTarget};
use super::{texts, BotConfig, BotState};
use crate::jobs::{
    image_hash, FileKind, JobHandle, JobStatus, OutputKind, RenderError, RenderRequest, StyleInfo,
    SubmitError,
};
use crate::store::{now_ms, JobEnd, JobSource, NewJob, Store};
use crate::stylepack::styles_for_guild;

/// Options given with the request itself (they override the user's preset).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Overrides {
    /// The style asked for.
    pub style: Option<String>,
    /// The files asked for.
    pub output: Option<OutputKind>,
}

/// Who asked, and where.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CartoonRequest {
    /// Who asked.
    pub user_id: u64,
    /// The guild it was asked in; `None` in DMs.
    pub guild_id: Option<u64>,
    /// The channel it was asked in.
    pub channel_id: u64,
    /// Which command or message asked.
    pub source: JobSource,
    /// Options given with the request.
    pub overrides: Overrides,
}

/// The options a render uses: request overrides, else the user's preset, else the guild's
/// default style, else the built-in defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    /// The style (`None`: the renderer's default).
    pub style: Option<String>,
    /// Which files to make.
    pub output: OutputKind,
    /// A white outline around stickers.
    pub outline: bool,
    /// Avatars cropped to a circle.
    pub round_avatar: bool,
}

pub const DEFAULT_OUTPUT: OutputKind = OutputKind::Both;
pub const DEFAULT_OUTLINE: bool = true;
pub const DEFAULT_ROUND_AVATAR: bool = false;

async fn resolve(state: &BotState, request: &CartoonRequest) -> anyhow::Result<Resolved> {
    let preset = state.store.preset(request.user_id).await?;
    let guild_style = match request.guild_id {
        Some(guild) => state.store.guild_settings(guild).await?.default_style,
        None => None,
    };
    let preset_output = preset
        .as_ref()
        .and_then(|p| p.output.parse::<OutputKind>().ok());
    Ok(Resolved {
        style: request
            .overrides
            .style
            .clone()
            .or_else(|| preset.as_ref().and_then(|p| p.style.clone()))
            .or(guild_style),
        output: request
            .overrides
            .output
            .or(preset_output)
            .unwrap_or(DEFAULT_OUTPUT),
        outline: preset.as_ref().map_or(DEFAULT_OUTLINE, |p| p.outline),
        round_avatar: preset
            .as_ref()
            .map_or(DEFAULT_ROUND_AVATAR, |p| p.round_avatar),
    })
}

/// The styles members of `guild_id` (or a DM's user, `None`) may use: the installed styles less
/// other servers' style packs, plus the server's own published packs.
pub async fn usable_styles(
    state: &BotState,
    guild_id: Option<u64>,
) -> anyhow::Result<Vec<StyleInfo>> {
    styles_for_guild(&state.store, state.styles.styles(), guild_id).await
}

/// Checks a style name against the styles usable in `guild_id`.
pub async fn check_style(
    state: &BotState,
    guild_id: Option<u64>,
    style: Option<&str>,
) -> Result<(), RenderError> {
    let installed: Vec<String> = usable_styles(state, guild_id)
        .await
        .map_err(|e| RenderError::Internal(format!("{e:#}")))?
        .into_iter()
        .map(|s| s.name)
        .collect();
    if installed.is_empty() {
        return Err(RenderError::NoStyleInstalled);
    }
    match style {
        Some(name) if !installed.iter().any(|s| s == name) => Err(RenderError::StyleMissing {
            name: name.to_string(),
            available: installed,
        }),
        _ => Ok(()),
    }
}

/// Runs one request to the end, telling the user how it goes (or, on a gateway, until it is
/// queued and handed to the responders). Logs one line per job.
pub async fn run(state: &BotState, request: CartoonRequest, photo: PhotoRef, mut reply: Reply) {
    let started_ms = now_ms();
    // Checks that need no download answer at once (ephemerally), without a "thinking" response.
    if let Err((text, code)) = early_checks(state, &request, &photo).await {
        log_refused(&request, code, started_ms);
        send_error(&mut reply, &text).await;
        return;
    }
    if let Err(e) = reply.defer().await {
        tracing::warn!(error = %e, user = request.user_id, "acknowledging a request failed");
        return;
    }
    if let Err(refusal) = work(state, &request, &photo, &mut reply, started_ms).await {
        if let Some(code) = refusal.unlogged {
            log_refused(&request, code, started_ms);
        }
        send_error(&mut reply, &refusal.text).await;
    }
}

/// What can be checked before a download: the declared file, the queue, the style.
async fn early_checks(
    state: &BotState,
    request: &CartoonRequest,
    photo: &PhotoRef,
) -> Result<(), (String, &'static str)> {
    state
        .downloader
        .check(photo)
        .map_err(|e| (texts::photo_error(&e), e.code()))?;
    state
        .queue
        .check_admission(request.user_id)
        .await
        .map_err(|e| (texts::submit_error(&e), submit_code(&e)))?;
    check_style(state, request.guild_id, request.overrides.style.as_deref())
        .await
        .map_err(|e| (texts::render_error(&e, None), e.code()))
}

/// An error to tell the user.
struct Refusal {
    text: String,
    /// The error code, when the request has not been logged as a job yet.
    unlogged: Option<&'static str>,
}

impl Refusal {
    fn before_job(text: String, code: &'static str) -> Self {
        Self {
            text,
            unlogged: Some(code),
        }
    }

    fn of_job(text: String) -> Self {
        Self {
            text,
            unlogged: None,
        }
    }
}

/// A job on its way to its user: what following it and answering needs, in this process
/// or, handed over through the broker, in a responder's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    /// The jobs table's row.
    pub job_id: i64,
    /// Who asked, and where.
    pub request: CartoonRequest,
    /// The options the render uses.
    pub options: Resolved,
    /// Where the answer goes.
    pub target: ReplyTarget,
    /// The job's key on the broker (empty for the in-process queue).
    pub key: String,
    /// Whether the job was attached to an identical one.
    pub shared: bool,
    /// When the request arrived (unix ms).
    pub started_ms: i64,
    /// The photo's size.
    pub bytes: usize,
}

impl Delivery {
    /// Names this hand-off (the broker drops a repeat): the job and the interaction or
    /// message it answers, both unique.
    pub fn handoff_id(&self) -> String {
        let answers = match &self.target {
            ReplyTarget::Interaction { id, .. } => *id,
            ReplyTarget::Dm { source, .. } => *source,
        };
        format!("{}.{answers}", self.key)
    }
}

/// After the acknowledgement: options, download, queue, then the answer here or a hand-off
/// to the responders.
async fn work(
    state: &BotState,
    request: &CartoonRequest,
    photo: &PhotoRef,
    reply: &mut Reply,
    started_ms: i64,
) -> Result<(), Refusal> {
    let internal = |e: anyhow::Error| {
        tracing::error!(error = %format!("{e:#}"), "storage error");
        Refusal::before_job(
            texts::render_error(&RenderError::Internal(String::new()), None),
            "storage",
        )
    };
    let options = resolve(state, request).await.map_err(internal)?;
    check_style(state, request.guild_id, options.style.as_deref())
        .await
        .map_err(|e| Refusal::before_job(texts::render_error(&e, None), e.code()))?;
    let image = state
        .downloader
        .fetch(photo)
        .await
        .map_err(|e| Refusal::before_job(texts::photo_error(&e), e.code()))?;
    let bytes = image.len();
    let hash = image_hash(&image);
    let job_id = state
        .store
        .insert_job(&NewJob {
            user_id: request.user_id,
            guild_id: request.guild_id,
            channel_id: request.channel_id,
            source: request.source,
            image_sha256: Some(hash),
            style: options.style.clone(),
            output: options.output.as_str().to_string(),
            reply: reply.reply_ref(),
        })
        .await
        .map_err(internal)?;
    let render = RenderRequest {
        image,
        style: options.style.clone(),
        output: options.output,
        outline: options.outline,
        round_avatar: options.round_avatar,
    };
    let submitted = state.queue.submit(request.user_id, render).await;
    let mut delivery = Delivery {
        job_id,
        request: request.clone(),
        options,
        target: reply.target().clone(),
        key: String::new(),
        shared: false,
        started_ms,
        bytes,
    };
    let handle = match submitted {
        Ok(handle) => handle,
        Err(e) => return Err(refuse_submission(&state.store, &delivery, &e).await),
    };
    delivery.key = handle.broker_key().unwrap_or_default().to_string();
    delivery.shared = handle.is_shared();
    match &state.responders {
        Some(responders) => {
            let payload = serde_json::to_vec(&delivery).expect("a delivery serialises");
            if let Err(e) = responders.hand_off(&delivery.handoff_id(), payload).await {
                tracing::error!(job = job_id, error = %format!("{e:#}"), "handing a reply over failed");
                // Nobody would answer it: do not render it for nobody.
                handle.cancel().await;
                let e = SubmitError::Unavailable(format!("{e:#}"));
                return Err(refuse_submission(&state.store, &delivery, &e).await);
            }
            Ok(())
        }
        None => {
            deliver(&state.store, &state.config, &delivery, handle, reply).await;
            Ok(())
        }
    }
}

/// Records a job that could not be queued or handed over as failed; the refusal to tell.
async fn refuse_submission(store: &Store, delivery: &Delivery, e: &SubmitError) -> Refusal {
    let end = JobEnd {
        status: "failed".into(),
        error: Some(submit_code(e).into()),
        ..JobEnd::default()
    };
    record_end(store, delivery, &end).await;
    Refusal::of_job(texts::submit_error(e))
}

/// Answers a delivery handed over by a gateway: follows the job, shows its progress, sends
/// the results or the error. Logs the job's line.
pub async fn answer(
    store: &Store,
    config: &BotConfig,
    delivery: &Delivery,
    handle: JobHandle,
    http: std::sync::Arc<serenity::all::Http>,
) {
    let mut reply = Reply::resume(http, delivery.target.clone());
    deliver(store, config, delivery, handle, &mut reply).await;
}

/// From the queue to the user: progress (queue position and "drawing", at most one edit per
/// interval), then the results or the error. The job's end is recorded once the user has
/// been answered: a responder that takes the delivery again after a crash answers only jobs
/// not recorded as ended.
async fn deliver(
    store: &Store,
    config: &BotConfig,
    delivery: &Delivery,
    mut handle: JobHandle,
    reply: &mut Reply,
) {
    let job_id = delivery.job_id;
    let interval = Duration::from_millis(config.progress_interval_ms);
    let mut status = handle.status();
    let mut shown: Option<String> = None;
    let mut last_edit: Option<tokio::time::Instant> = None;
    let mut started_recorded = false;
    loop {
        if matches!(status, JobStatus::Done(_) | JobStatus::Cancelled) {
            break;
        }
        if matches!(status, JobStatus::Running) && !started_recorded {
            started_recorded = true;
            if let Err(e) = store.job_started(job_id).await {
                tracing::warn!(job = job_id, error = %e, "recording a job start failed");
            }
        }
        let wanted = texts::progress(&status).filter(|t| shown.as_ref() != Some(t));
        let due = last_edit.map(|t| t + interval);
        if let Some(text) = &wanted {
            if due.is_none_or(|d| tokio::time::Instant::now() >= d) {
                if let Err(e) = reply.progress(text).await {
                    tracing::debug!(error = %e, "progress edit failed");
                }
                shown = Some(text.clone());
                last_edit = Some(tokio::time::Instant::now());
                continue;
            }
        }
        let wake = match (&wanted, due) {
            (Some(_), Some(d)) => d,
            _ => tokio::time::Instant::now() + Duration::from_secs(3600),
        };
        tokio::select! {
            next = handle.changed() => match next {
                Some(next) => status = next,
                None => break,
            },
            _ = sleep_until(wake) => {}
        }
    }

    let Some(outcome) = handle.wait().await else {
        send_error(reply, &texts::submit_error(&SubmitError::ShuttingDown)).await;
        let end = JobEnd {
            status: "failed".into(),
            error: Some("cancelled".into()),
            ..JobEnd::default()
        };
        record_end(store, delivery, &end).await;
        return;
    };
    let total_ms = (now_ms() - delivery.started_ms) as f64;
    let mut end = JobEnd {
        status: "done".into(),
        cached: outcome.cached,
        queue_ms: Some(outcome.wait_ms),
        render_ms: Some(outcome.render_ms),
        total_ms: Some(total_ms),
        ..JobEnd::default()
    };
    let request = &delivery.request;
    match outcome.result {
        Ok(output) => {
            end.faces = Some(output.faces as u32);
            end.style = Some(output.style.clone());
            let (batches, too_large) = batch_files(&output.files, config.max_upload_bytes);
            let stickers: Vec<Vec<u8>> = output
                .files
                .iter()
                .filter(|f| f.kind == FileKind::Sticker)
                .map(|f| f.png.clone())
                .collect();
            let sticker_hint = request.guild_id.is_some() && !stickers.is_empty();
            let skipped: Vec<String> = too_large.iter().map(|f| f.name.clone()).collect();
            let text = texts::result_summary(
                &output,
                delivery.options.output,
                end.cached,
                total_ms / 1000.0,
                sticker_hint,
                &skipped,
            );
            if let (Some(guild), false) = (request.guild_id, stickers.is_empty()) {
                super::remember_stickers(store, request.user_id, guild, &stickers).await;
            }
            if let Err(e) = reply.results(&text, batches).await {
                tracing::warn!(job = job_id, error = %e, "sending the results failed");
                end.status = "failed".into();
                end.error = Some("discord".into());
            }
            record_end(store, delivery, &end).await;
        }
        Err(e) => {
            end.status = "failed".into();
            end.error = Some(e.code().into());
            if let RenderError::Internal(detail) = &e {
                tracing::error!(job = job_id, error = %detail, "render failed");
            }
            send_error(reply, &texts::render_error(&e, Some(job_id))).await;
            record_end(store, delivery, &end).await;
        }
    }
}

async fn send_error(reply: &mut Reply, text: &str) {
    if let Err(e) = reply.error(text).await {
        tracing::warn!(error = %e, "sending an error reply failed");
    }
}

/// Records how the job ended and logs its line.
async fn record_end(store: &Store, delivery: &Delivery, end: &JobEnd) {
    if let Err(e) = store.finish_job(delivery.job_id, end).await {
        tracing::warn!(job = delivery.job_id, error = %e, "recording a job's end failed");
    }
    log_job(delivery, end);
}

fn submit_code(e: &SubmitError) -> &'static str {
    match e {
        SubmitError::QueueFull { .. } => "queue_full",
        SubmitError::UserLimit { .. } => "user_limit",
        SubmitError::ShuttingDown => "shutting_down",
        SubmitError::Unavailable(_) => "unavailable",
    }
}

/// The one log line of a job.
fn log_job(delivery: &Delivery, end: &JobEnd) {
    let request = &delivery.request;
    let options = &delivery.options;
    tracing::info!(
        job = delivery.job_id,
        user = request.user_id,
        guild = request.guild_id,
        source = request.source.as_str(),
        status = %end.status,
        error = end.error.as_deref(),
        style = end.style.as_deref().or(options.style.as_deref()),
        output = options.output.as_str(),
        faces = end.faces,
        cached = end.cached,
        bytes = delivery.bytes,
        queue_ms = end.queue_ms.map(|v| v.round()),
        render_ms = end.render_ms.map(|v| v.round()),
        total_ms = now_ms() - delivery.started_ms,
        "job"
    );
}

/// The log line of a request refused before it became a job.
fn log_refused(request: &CartoonRequest, code: &'static str, started_ms: i64) {
    tracing::info!(
        user = request.user_id,
        guild = request.guild_id,
        source = request.source.as_str(),
        status = "refused",
        error = code,
        total_ms = now_ms() - started_ms,
        "job"
    );
}
