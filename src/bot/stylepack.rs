//! `/stylepack upload|cancel|resume|publish|delete|list` (server admins; ephemeral answers), and
//! the public progress message of a training run: one message in the channel where it
//! started, edited with the step, losses, images/s and time left, with the preview grids and the
//! evaluation posted beside it.

use std::sync::Arc;

use anyhow::Result;
use serenity::all::{
    ChannelId, CommandInteraction, CreateAttachment, CreateInteractionResponse,
    CreateInteractionResponseMessage, CreateMessage, EditInteractionResponse, EditMessage, Http,
    MessageId, ResolvedOption, ResolvedValue,
};
use std::time::Duration;

use tokio::time::{sleep_until, Instant};

use super::download::PhotoRef;
use super::settings::{is_server_admin, say, sub_command};
use super::{texts, BotState};
use crate::config::StylePackConfig;
use crate::jobs::TrainingQueue;
use crate::store::{GuildStyle, Store, TrainingRun};
use crate::stylepack::{
    Milestone, PackError, PackEvent, PackIntake, PackNews, PackWarning, QueuedPack, Requester,
    RunEnd, RunEvents, StylePacks,
};

pub async fn command(
    state: &Arc<BotState>,
    http: &Arc<Http>,
    cmd: &CommandInteraction,
) -> Result<()> {
    let Some(guild) = cmd.guild_id.map(|g| g.get()) else {
        return say(http, cmd, texts::STYLEPACK_IN_SERVER).await;
    };
    if state.stylepacks.is_none() && state.pack_intake.is_none() {
        return say(http, cmd, texts::STYLEPACKS_OFF).await;
    }
    if !is_server_admin(state, cmd) {
        return say(http, cmd, texts::admins_only("manage style packs")).await;
    }
    let Some((sub, options)) = sub_command(cmd) else {
        return say(http, cmd, texts::STYLEPACK_USAGE).await;
    };
    let Some(packs) = state.stylepacks.clone() else {
        let intake = state.pack_intake.clone().expect("checked above");
        return queued_command(state, http, cmd, &intake, guild, (sub, &options)).await;
    };
    let user = cmd.user.id.get();
    let name = string_option(&options, "name").map(|n| n.to_lowercase());
    let refusal = |e: PackError| {
        if let PackError::Internal(detail) = &e {
            tracing::error!(error = %format!("{detail:#}"), "style pack action failed");
        }
        texts::pack_error(&e, guild, packs.config())
    };
    let text = match (sub, name) {
        ("upload", name) => {
            return upload(state, http, cmd, &packs, guild, &options, name).await;
        }
        ("cancel", _) => match packs.cancel(guild, user).await {
            Ok(name) => texts::cancelling(&name),
            Err(e) => refusal(e),
        },
        ("resume", Some(name)) => {
            let by = requester(cmd);
            match packs.resume(guild, &name, by).await {
                Ok(events) => {
                    tokio::spawn(follow_run(Arc::clone(state), Arc::clone(http), events));
                    texts::resumed(&name)
                }
                Err(e) => refusal(e),
            }
        }
        ("publish", Some(name)) => match packs.publish(guild, user, &name).await {
            Ok(_) => texts::published(&name),
            Err(e) => refusal(e),
        },
        ("delete", Some(name)) => match packs.delete(guild, user, &name).await {
            Ok(()) => texts::deleted(&name),
            Err(e) => refusal(e),
        },
        ("list", _) => match packs.list(guild).await {
            Ok(list) => texts::pack_list(&list),
            Err(e) => refusal(e),
        },
        _ => texts::STYLEPACK_USAGE.to_string(),
    };
    say(http, cmd, text).await
}

fn string_option(options: &[ResolvedOption<'_>], name: &str) -> Option<String> {
    options.iter().find_map(|o| match o.value {
        ResolvedValue::String(s) if o.name == name => Some(s.trim().to_string()),
        _ => None,
    })
}

/// Who asks, and where the run's news goes.
fn requester(cmd: &CommandInteraction) -> Requester {
    Requester {
        user_id: cmd.user.id.get(),
        channel_id: cmd.channel_id.get(),
    }
}

/// The archive attached to an upload.
fn attached_file(options: &[ResolvedOption<'_>]) -> Option<PhotoRef> {
    options.iter().find_map(|o| match o.value {
        ResolvedValue::Attachment(a) if o.name == "file" => Some(PhotoRef::from_attachment(a)),
        _ => None,
    })
}

/// Checks an upload's archive size (answered at once when too large), defers the answer
/// (ephemeral) and downloads it; `None` once a failure has been answered.
async fn download_archive(
    state: &BotState,
    http: &Arc<Http>,
    cmd: &CommandInteraction,
    file: &PhotoRef,
    config: &StylePackConfig,
) -> Result<Option<Vec<u8>>> {
    let max_bytes = config.max_zip_bytes;
    if let Err(e) = state.downloader.check_file(file, max_bytes) {
        say(http, cmd, texts::pack_download_error(&e)).await?;
        return Ok(None);
    }
    let defer =
        CreateInteractionResponse::Defer(CreateInteractionResponseMessage::new().ephemeral(true));
    cmd.create_response(http.as_ref(), defer).await?;
    match state.downloader.fetch_file(file, max_bytes).await {
        Ok(zip) => Ok(Some(zip)),
        Err(e) => {
            let text = texts::pack_download_error(&e);
            cmd.edit_response(http.as_ref(), EditInteractionResponse::new().content(text))
                .await?;
            Ok(None)
        }
    }
}

/// Checks before downloading (answered at once), then an ephemeral deferral: download, check
/// the archive, start preparing and training it, and say what was accepted and skipped.
async fn upload(
    state: &Arc<BotState>,
    http: &Arc<Http>,
    cmd: &CommandInteraction,
    packs: &StylePacks,
    guild: u64,
    options: &[ResolvedOption<'_>],
    name: Option<String>,
) -> Result<()> {
    let (Some(file), Some(name)) = (attached_file(options), name) else {
        return say(http, cmd, texts::STYLEPACK_NO_FILE).await;
    };
    let base = string_option(options, "base").filter(|b| !b.is_empty());
    let reservation = match packs.reserve(guild, &name, base.as_deref()).await {
        Ok(r) => r,
        Err(e) => return say(http, cmd, texts::pack_error(&e, guild, packs.config())).await,
    };
    let Some(zip) = download_archive(state, http, cmd, &file, packs.config()).await? else {
        return Ok(());
    };
    let answer = |text: String| async move {
        cmd.edit_response(http.as_ref(), EditInteractionResponse::new().content(text))
            .await
            .map(drop)
    };
    answer(texts::STYLEPACK_CHECKING.to_string()).await?;
    let by = requester(cmd);
    let accepted = match reservation.upload(zip, by).await {
        Ok(accepted) => accepted,
        Err(e) => {
            if let PackError::Internal(detail) = &e {
                tracing::error!(error = %format!("{detail:#}"), "preparing a style pack failed");
            }
            return Ok(answer(texts::pack_error(&e, guild, packs.config())).await?);
        }
    };
    let summary = texts::pack_accepted(&name, &accepted);
    match packs.start(accepted).await {
        Ok(events) => {
            tokio::spawn(follow_run(Arc::clone(state), Arc::clone(http), events));
            answer(summary).await?;
        }
        Err(e) => answer(texts::pack_error(&e, guild, packs.config())).await?,
    }
    Ok(())
}

/// `/stylepack` on a gateway: uploads and resumes are checked here and trained by the
/// trainers (`serve --role worker --work train`); cancels reach the trainer that runs the
/// pack; published styles reach the render workers through the broker.
async fn queued_command(
    state: &Arc<BotState>,
    http: &Arc<Http>,
    cmd: &CommandInteraction,
    intake: &PackIntake,
    guild: u64,
    (sub, options): (&str, &[ResolvedOption<'_>]),
) -> Result<()> {
    let refusal = |e: PackError| {
        if let PackError::Internal(detail) = &e {
            tracing::error!(error = %format!("{detail:#}"), "style pack action failed");
        }
        texts::pack_error(&e, guild, intake.config())
    };
    let text = match (
        sub,
        string_option(options, "name").map(|n| n.to_lowercase()),
    ) {
        ("upload", name) => {
            return queue_upload(state, http, cmd, intake, guild, options, name).await
        }
        ("cancel", _) => match intake.cancel(guild, cmd.user.id.get()).await {
            Ok((name, true)) => texts::cancelling(&name),
            Ok((name, false)) => texts::withdrawn(&name),
            Err(e) => refusal(e),
        },
        ("list", _) => match intake.list(guild).await {
            Ok(list) => texts::pack_list(&list),
            Err(e) => refusal(e),
        },
        ("resume", Some(name)) => {
            let by = requester(cmd);
            match intake.resume(guild, &name, by).await {
                Ok(()) => texts::resume_queued(&name),
                Err(e) => refusal(e),
            }
        }
        ("publish", Some(name)) => match intake.publish(guild, cmd.user.id.get(), &name).await {
            Ok(_) => texts::published(&name),
            Err(e) => refusal(e),
        },
        ("delete", Some(name)) => {
            // Waiting for the workers to uninstall a published style takes seconds.
            let defer = CreateInteractionResponse::Defer(
                CreateInteractionResponseMessage::new().ephemeral(true),
            );
            cmd.create_response(http.as_ref(), defer).await?;
            let uninstalled = until_not_offered(state, &name);
            let text = match intake
                .delete(guild, cmd.user.id.get(), &name, uninstalled)
                .await
            {
                Ok(()) => texts::deleted(&name),
                Err(e) => refusal(e),
            };
            cmd.edit_response(http.as_ref(), EditInteractionResponse::new().content(text))
                .await?;
            return Ok(());
        }
        _ => texts::STYLEPACK_USAGE.to_string(),
    };
    say(http, cmd, text).await
}

/// Waits until the workers' catalog no longer lists `name` (at most 30 s).
async fn until_not_offered(state: &BotState, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && state.styles.styles().iter().any(|s| s.name == name) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// An upload on a gateway: the checks that need no archive (answered at once), then an
/// ephemeral deferral: download, check the archive, queue it, and say what was accepted.
async fn queue_upload(
    state: &Arc<BotState>,
    http: &Arc<Http>,
    cmd: &CommandInteraction,
    intake: &PackIntake,
    guild: u64,
    options: &[ResolvedOption<'_>],
    name: Option<String>,
) -> Result<()> {
    let (Some(file), Some(name)) = (attached_file(options), name) else {
        return say(http, cmd, texts::STYLEPACK_NO_FILE).await;
    };
    let base = string_option(options, "base").filter(|b| !b.is_empty());
    let installed: Vec<String> = state.styles.styles().into_iter().map(|s| s.name).collect();
    let base = match intake
        .check(&installed, guild, &name, base.as_deref())
        .await
    {
        Ok(base) => base,
        Err(e) => return say(http, cmd, texts::pack_error(&e, guild, intake.config())).await,
    };
    let Some(zip) = download_archive(state, http, cmd, &file, intake.config()).await? else {
        return Ok(());
    };
    let pack = QueuedPack::upload(guild, &name, Some(base), requester(cmd));
    let text = match intake.queue(pack, zip).await {
        Ok(queued) => texts::pack_queued(&name, &queued),
        Err(e) => {
            if let PackError::Internal(detail) = &e {
                tracing::error!(error = %format!("{detail:#}"), "queueing a style pack failed");
            }
            texts::pack_error(&e, guild, intake.config())
        }
    };
    cmd.edit_response(http.as_ref(), EditInteractionResponse::new().content(text))
        .await?;
    Ok(())
}

/// Follows a run to its end: posts (or, after a restart, reuses) the progress message and
/// edits it at most once per interval; posts each preview grid, then the end.
pub async fn follow_run(state: Arc<BotState>, http: Arc<Http>, mut events: RunEvents) {
    let channel = ChannelId::new(events.run.channel_id);
    let style = events.style.clone();
    let message = open_progress(&http, &state.store, &style, &events.run).await;
    let interval = state.progress_interval();
    let mut next_edit = Instant::now();
    let mut changed = false;
    let mut progress_open = true;
    loop {
        tokio::select! {
            next = events.progress.changed(), if progress_open => match next {
                Ok(()) => changed = true,
                Err(_) => progress_open = false,
            },
            milestone = events.milestones.recv() => match milestone {
                Some(Milestone::Preview { step, total, png }) => {
                    post(&http, channel, preview_post(&style, step, total, png)).await;
                }
                Some(Milestone::Warning(warning)) => {
                    post(&http, channel, warning_post(&style, &warning)).await;
                }
                Some(Milestone::Finished(mut end)) => {
                    let preview = match &mut end {
                        RunEnd::Trained { preview, .. } => preview.take(),
                        _ => None,
                    };
                    announce_end(&http, channel, message, &style, &end, preview).await;
                    return;
                }
                // A shutdown: the next start resumes the run.
                None => return,
            },
            _ = sleep_until(next_edit), if changed => {}
        }
        if changed && Instant::now() >= next_edit {
            let progress = events.progress.borrow_and_update().clone();
            if let (Some(id), Some(progress)) = (message, progress) {
                edit(
                    &http,
                    channel,
                    id,
                    &texts::training_progress(&style, &progress),
                )
                .await;
            }
            changed = false;
            next_edit = Instant::now() + interval;
        }
    }
}

/// Tells the channel what a trainer reported about a queued pack (`serve --role responder`):
/// the same messages as [`follow_run`], from the run's rows in the shared database.
pub async fn relay_news(http: &Http, store: &Store, training: &TrainingQueue, news: PackNews) {
    let channel = ChannelId::new(news.by.channel_id);
    let style = match store.guild_style(&news.name).await {
        Ok(style) => style.filter(|s| s.guild_id == news.guild_id),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "reading a pack's row");
            None
        }
    };
    let run = |run_id: i64| async move {
        match store.training_run(run_id).await {
            Ok(run) => run,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading a training run's row");
                None
            }
        }
    };
    match (news.event, style) {
        (PackEvent::Refused(why), _) => {
            let text = texts::pack_refused_by_trainer(news.by.user_id, &news.name, &why);
            post(http, channel, CreateMessage::new().content(text)).await;
        }
        (PackEvent::Started { run_id }, Some(style)) => {
            if let Some(run) = run(run_id).await {
                open_progress(http, store, &style, &run).await;
            }
        }
        (PackEvent::Progress { run_id, progress }, Some(style)) => {
            if let Some(id) = run(run_id).await.and_then(|r| r.message_id) {
                let text = texts::training_progress(&style, &progress);
                edit(http, channel, MessageId::new(id), &text).await;
            }
        }
        (PackEvent::Preview { step, total, file }, style) => {
            match (training.preview(&file).await, style) {
                (Ok(png), Some(style)) => {
                    post(http, channel, preview_post(&style, step, total, png)).await;
                }
                (Err(e), _) => tracing::warn!(error = %e, "fetching a preview"),
                (Ok(_), None) => {}
            }
            training.remove_preview(&file).await;
        }
        (PackEvent::Warning(warning), Some(style)) => {
            post(http, channel, warning_post(&style, &warning)).await;
        }
        (
            PackEvent::Finished {
                run_id,
                end,
                preview,
            },
            style,
        ) => {
            let png = match &preview {
                Some(file) => training.preview(file).await.ok(),
                None => None,
            };
            if let Some(style) = style {
                let message = run(run_id)
                    .await
                    .and_then(|r| r.message_id)
                    .map(MessageId::new);
                announce_end(http, channel, message, &style, &end, png).await;
            }
            if let Some(file) = &preview {
                training.remove_preview(file).await;
            }
        }
        (event, None) => {
            tracing::warn!(pack = %news.name, ?event, "news of a pack without a row");
        }
    }
}

/// Posts a run's progress message, or edits the one it has (after a restart, or when another
/// trainer took the run over), and records it on the run; its id.
async fn open_progress(
    http: &Http,
    store: &Store,
    style: &GuildStyle,
    run: &TrainingRun,
) -> Option<MessageId> {
    let channel = ChannelId::new(run.channel_id);
    let started = texts::training_started(style, run);
    if let Some(id) = run.message_id {
        let id = MessageId::new(id);
        edit(http, channel, id, &started).await;
        return Some(id);
    }
    match channel
        .send_message(http, CreateMessage::new().content(started))
        .await
    {
        Ok(m) => {
            if let Err(e) = store.set_run_message(run.id, m.id.get()).await {
                tracing::warn!(error = %e, "recording the progress message");
            }
            Some(m.id)
        }
        Err(e) => {
            tracing::warn!(error = %e, "posting a training progress message failed");
            None
        }
    }
}

fn preview_post(style: &GuildStyle, step: u32, total: u32, png: Vec<u8>) -> CreateMessage {
    CreateMessage::new()
        .content(texts::preview_caption(style, step, total))
        .add_file(CreateAttachment::bytes(
            png,
            format!("{}-step{step}.png", style.name),
        ))
}

fn warning_post(style: &GuildStyle, warning: &PackWarning) -> CreateMessage {
    CreateMessage::new().content(texts::pack_warning(style, warning))
}

/// The progress message's last edit, and for a trained pack its evaluation and latest
/// preview grid.
async fn announce_end(
    http: &Http,
    channel: ChannelId,
    message: Option<MessageId>,
    style: &GuildStyle,
    end: &RunEnd,
    preview: Option<Vec<u8>>,
) {
    if let Some(id) = message {
        edit(http, channel, id, &texts::training_ended(style, end)).await;
    }
    if let RunEnd::Trained {
        faces_found, eval, ..
    } = end
    {
        let mut post_end = CreateMessage::new().content(texts::trained(style, *faces_found, eval));
        if let Some(png) = preview {
            post_end = post_end.add_file(CreateAttachment::bytes(
                png,
                format!("{}-preview.png", style.name),
            ));
        }
        post(http, channel, post_end).await;
    }
}

async fn post(http: &Http, channel: ChannelId, message: CreateMessage) {
    if let Err(e) = channel.send_message(http, message).await {
        tracing::warn!(error = %e, "posting in a style pack's channel failed");
    }
}

async fn edit(http: &Http, channel: ChannelId, message: MessageId, text: &str) {
    if let Err(e) = channel
        .edit_message(http, message, EditMessage::new().content(text))
        .await
    {
        tracing::debug!(error = %e, "training progress edit failed");
    }
}
