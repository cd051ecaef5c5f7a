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
use tokio::time::{sleep_until, Instant};

use super::download::PhotoRef;
use super::settings::{is_server_admin, say, sub_command};
use super::{texts, BotState};
use crate::stylepack::{Milestone, PackError, Requester, RunEnd, RunEvents, StylePacks};

pub async fn command(
    state: &Arc<BotState>,
    http: &Arc<Http>,
    cmd: &CommandInteraction,
) -> Result<()> {
    let Some(guild) = cmd.guild_id.map(|g| g.get()) else {
        return say(http, cmd, texts::STYLEPACK_IN_SERVER).await;
    };
    let Some(packs) = state.stylepacks.clone() else {
        return say(http, cmd, texts::STYLEPACKS_OFF).await;
    };
    if !is_server_admin(state, cmd) {
        return say(http, cmd, texts::admins_only("manage style packs")).await;
    }
    let Some((sub, options)) = sub_command(cmd) else {
        return say(http, cmd, texts::STYLEPACK_USAGE).await;
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
            let by = Requester {
                user_id: user,
                channel_id: cmd.channel_id.get(),
            };
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
    let file = options.iter().find_map(|o| match o.value {
        ResolvedValue::Attachment(a) if o.name == "file" => Some(PhotoRef::from_attachment(a)),
        _ => None,
    });
    let (Some(file), Some(name)) = (file, name) else {
        return say(http, cmd, texts::STYLEPACK_NO_FILE).await;
    };
    let base = string_option(options, "base").filter(|b| !b.is_empty());
    let reservation = match packs.reserve(guild, &name, base.as_deref()).await {
        Ok(r) => r,
        Err(e) => return say(http, cmd, texts::pack_error(&e, guild, packs.config())).await,
    };
    let max_bytes = packs.config().max_zip_bytes;
    if let Err(e) = state.downloader.check_file(&file, max_bytes) {
        return say(http, cmd, texts::pack_download_error(&e)).await;
    }
    let defer =
        CreateInteractionResponse::Defer(CreateInteractionResponseMessage::new().ephemeral(true));
    cmd.create_response(http.as_ref(), defer).await?;
    let answer = |text: String| async move {
        cmd.edit_response(http.as_ref(), EditInteractionResponse::new().content(text))
            .await
            .map(drop)
    };
    let zip = match state.downloader.fetch_file(&file, max_bytes).await {
        Ok(zip) => zip,
        Err(e) => return Ok(answer(texts::pack_download_error(&e)).await?),
    };
    answer(texts::STYLEPACK_CHECKING.to_string()).await?;
    let by = Requester {
        user_id: cmd.user.id.get(),
        channel_id: cmd.channel_id.get(),
    };
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

/// Follows a run to its end: posts (or, after a restart, reuses) the progress message and
/// edits it at most once per interval; posts each preview grid, then the end.
pub async fn follow_run(state: Arc<BotState>, http: Arc<Http>, mut events: RunEvents) {
    let channel = ChannelId::new(events.run.channel_id);
    let style = events.style.clone();
    let started = texts::training_started(&style, &events.run);
    let message = match events.run.message_id {
        Some(id) => {
            let id = MessageId::new(id);
            edit(&http, channel, id, &started).await;
            Some(id)
        }
        None => match channel
            .send_message(http.as_ref(), CreateMessage::new().content(started))
            .await
        {
            Ok(m) => {
                if let Some(packs) = &state.stylepacks {
                    if let Err(e) = packs.set_progress_message(events.run.id, m.id.get()).await {
                        tracing::warn!(error = %e, "recording the progress message");
                    }
                }
                Some(m.id)
            }
            Err(e) => {
                tracing::warn!(error = %e, "posting a training progress message failed");
                None
            }
        },
    };
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
                    let post = CreateMessage::new()
                        .content(texts::preview_caption(&style, step, total))
                        .add_file(CreateAttachment::bytes(png, format!("{}-step{step}.png", style.name)));
                    if let Err(e) = channel.send_message(http.as_ref(), post).await {
                        tracing::warn!(error = %e, "posting a preview failed");
                    }
                }
                Some(Milestone::Warning(warning)) => {
                    let post = CreateMessage::new().content(texts::pack_warning(&style, &warning));
                    if let Err(e) = channel.send_message(http.as_ref(), post).await {
                        tracing::warn!(error = %e, "posting a pack warning failed");
                    }
                }
                Some(Milestone::Finished(end)) => {
                    if let Some(id) = message {
                        edit(&http, channel, id, &texts::training_ended(&style, &end)).await;
                    }
                    if let RunEnd::Trained { faces_found, eval, preview, .. } = &end {
                        let text = texts::trained(&style, *faces_found, eval);
                        let mut post = CreateMessage::new().content(text);
                        if let Some(png) = preview {
                            post = post.add_file(CreateAttachment::bytes(png.clone(), format!("{}-preview.png", style.name)));
                        }
                        if let Err(e) = channel.send_message(http.as_ref(), post).await {
                            tracing::warn!(error = %e, "posting the evaluation failed");
                        }
                    }
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

async fn edit(http: &Http, channel: ChannelId, message: MessageId, text: &str) {
    if let Err(e) = channel
        .edit_message(http, message, EditMessage::new().content(text))
        .await
    {
        tracing::debug!(error = %e, "training progress edit failed");
    }
}
