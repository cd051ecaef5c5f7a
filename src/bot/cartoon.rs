//! The cartoon flow shared by `/cartoon`, the Cartoonize menu and DMs.

use std::time::{Duration, Instant};

use tokio::time::sleep_until;

use super::download::PhotoRef;
use super::reply::{batch_files, Reply};
use super::{texts, BotState};
use crate::jobs::{
    image_hash, FileKind, JobStatus, OutputKind, RenderError, RenderRequest, StyleInfo,
};
use crate::store::{JobEnd, JobSource, NewJob};
use crate::stylepack::styles_for_guild;

/// Options given with the request itself (they override the user's preset).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub style: Option<String>,
    pub output: Option<OutputKind>,
}

/// Who asked, and where.
#[derive(Debug, Clone)]
pub struct CartoonRequest {
    pub user_id: u64,
    pub guild_id: Option<u64>,
    pub channel_id: u64,
    pub source: JobSource,
    pub overrides: Overrides,
}

/// The options a render uses: request overrides, else the user's preset, else the guild's
/// default style, else the built-in defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub style: Option<String>,
    pub output: OutputKind,
    pub outline: bool,
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
    styles_for_guild(&state.store, state.renderer().styles(), guild_id).await
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

/// Runs one request to the end, telling the user how it goes. Logs one line per job.
pub async fn run(state: &BotState, request: CartoonRequest, photo: PhotoRef, mut reply: Reply) {
    let started = Instant::now();
    // Checks that need no download answer at once (ephemerally), without a "thinking" response.
    if let Err((text, code)) = early_checks(state, &request, &photo).await {
        log_refused(&request, code, started);
        if let Err(e) = reply.error(&text).await {
            tracing::warn!(error = %e, "sending an error reply failed");
        }
        return;
    }
    if let Err(e) = reply.defer().await {
        tracing::warn!(error = %e, user = request.user_id, "acknowledging a request failed");
        return;
    }
    if let Err(refusal) = work(state, &request, &photo, &mut reply, started).await {
        if let Some(code) = refusal.unlogged {
            log_refused(&request, code, started);
        }
        if let Err(e) = reply.error(&refusal.text).await {
            tracing::warn!(error = %e, "sending an error reply failed");
        }
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

/// After the acknowledgement: options, download, queue, progress, results.
async fn work(
    state: &BotState,
    request: &CartoonRequest,
    photo: &PhotoRef,
    reply: &mut Reply,
    started: Instant,
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
    let mut handle = match state.queue.submit(request.user_id, render) {
        Ok(handle) => handle,
        Err(e) => {
            let end = JobEnd {
                status: "failed".into(),
                error: Some(submit_code(&e).into()),
                ..JobEnd::default()
            };
            record_end(state, job_id, &end).await;
            log_job(request, job_id, &options, &end, bytes, started);
            return Err(Refusal::of_job(texts::submit_error(&e)));
        }
    };

    // Progress: queue position and "drawing", at most one edit per interval.
    let interval = Duration::from_millis(state.config.progress_interval_ms);
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
            if let Err(e) = state.store.job_started(job_id).await {
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
        let end = JobEnd {
            status: "failed".into(),
            error: Some("cancelled".into()),
            ..JobEnd::default()
        };
        record_end(state, job_id, &end).await;
        log_job(request, job_id, &options, &end, bytes, started);
        return Err(Refusal::of_job(texts::submit_error(
            &crate::jobs::SubmitError::ShuttingDown,
        )));
    };
    let total_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut end = JobEnd {
        status: "done".into(),
        cached: outcome.cached,
        queue_ms: Some(outcome.wait_ms),
        render_ms: Some(outcome.render_ms),
        total_ms: Some(total_ms),
        ..JobEnd::default()
    };
    match outcome.result {
        Ok(output) => {
            end.faces = Some(output.faces as u32);
            end.style = Some(output.style.clone());
            let (batches, too_large) = batch_files(&output.files, state.config.max_upload_bytes);
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
                options.output,
                outcome.cached,
                total_ms / 1000.0,
                sticker_hint,
                &skipped,
            );
            if let (Some(guild), false) = (request.guild_id, stickers.is_empty()) {
                state
                    .remember_stickers(request.user_id, guild, &stickers)
                    .await;
            }
            if let Err(e) = reply.results(&text, batches).await {
                tracing::warn!(job = job_id, error = %e, "sending the results failed");
                end.status = "failed".into();
                end.error = Some("discord".into());
            }
            record_end(state, job_id, &end).await;
            log_job(request, job_id, &options, &end, bytes, started);
            Ok(())
        }
        Err(e) => {
            end.status = "failed".into();
            end.error = Some(e.code().into());
            if let RenderError::Internal(detail) = &e {
                tracing::error!(job = job_id, error = %detail, "render failed");
            }
            record_end(state, job_id, &end).await;
            log_job(request, job_id, &options, &end, bytes, started);
            Err(Refusal::of_job(texts::render_error(&e, Some(job_id))))
        }
    }
}

async fn record_end(state: &BotState, job_id: i64, end: &JobEnd) {
    if let Err(e) = state.store.finish_job(job_id, end).await {
        tracing::warn!(job = job_id, error = %e, "recording a job's end failed");
    }
}

fn submit_code(e: &crate::jobs::SubmitError) -> &'static str {
    match e {
        crate::jobs::SubmitError::QueueFull { .. } => "queue_full",
        crate::jobs::SubmitError::UserLimit { .. } => "user_limit",
        crate::jobs::SubmitError::ShuttingDown => "shutting_down",
        crate::jobs::SubmitError::Unavailable(_) => "unavailable",
    }
}

/// The one log line of a job.
fn log_job(
    request: &CartoonRequest,
    job_id: i64,
    options: &Resolved,
    end: &JobEnd,
    bytes: usize,
    started: Instant,
) {
    tracing::info!(
        job = job_id,
        user = request.user_id,
        guild = request.guild_id,
        source = request.source.as_str(),
        status = %end.status,
        error = end.error.as_deref(),
        style = end.style.as_deref().or(options.style.as_deref()),
        output = options.output.as_str(),
        faces = end.faces,
        cached = end.cached,
        bytes,
        queue_ms = end.queue_ms.map(|v| v.round()),
        render_ms = end.render_ms.map(|v| v.round()),
        total_ms = (started.elapsed().as_secs_f64() * 1000.0).round(),
        "job"
    );
}

/// The log line of a request refused before it became a job.
fn log_refused(request: &CartoonRequest, code: &'static str, started: Instant) {
    tracing::info!(
        user = request.user_id,
        guild = request.guild_id,
        source = request.source.as_str(),
        status = "refused",
        error = code,
        total_ms = (started.elapsed().as_secs_f64() * 1000.0).round(),
        "job"
    );
}
