//! Gateway events: ready (register commands, report interrupted jobs, follow resumed training
//! runs), interactions, DMs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serenity::all::{
    Builder, ChannelId, Command, CommandInteraction, Context, CreateAutocompleteResponse,
    CreateInteractionResponse, CreateMessage, EditInteractionResponse, EditMessage, EventHandler,
    GuildId, Http, Interaction, Message, MessageId, Ready, ResolvedValue,
};

use super::cartoon::{self, usable_styles, CartoonRequest, Overrides};
use super::download::PhotoRef;
use super::reply::{Reply, TOKEN_LIFETIME_MS};
use super::{commands, settings, stylepack, texts, BotState};
use crate::jobs::OutputKind;
use crate::store::{now_ms, JobSource, ReplyRef};

/// Photos taken from one DM message at most.
const MAX_DM_PHOTOS: usize = 4;
const TELL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Handler {
    pub state: Arc<BotState>,
}

#[serenity::async_trait]
impl EventHandler for Handler {
    async fn ready(&self, ctx: Context, ready: Ready) {
        tracing::info!(user = %ready.user.name, guilds = ready.guilds.len(), "connected to Discord");
        if !self.state.commands_registered.swap(true, Ordering::SeqCst) {
            let registered = match self.state.config.commands_guild_id {
                Some(guild) => {
                    GuildId::new(guild)
                        .set_commands(&ctx.http, commands::all())
                        .await
                }
                None => Command::set_global_commands(&ctx.http, commands::all()).await,
            };
            match registered {
                Ok(_) => tracing::info!("application commands registered"),
                Err(e) => {
                    self.state
                        .commands_registered
                        .store(false, Ordering::SeqCst);
                    tracing::error!(error = %e, "registering the application commands failed");
                }
            }
        }
        let interrupted = std::mem::take(
            &mut *self
                .state
                .interrupted
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for job in interrupted {
            tell_interrupted(&ctx.http, &job).await;
        }
        let resumed = self
            .state
            .resumed_run
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(run) = resumed {
            tokio::spawn(stylepack::follow_run(
                Arc::clone(&self.state),
                Arc::clone(&ctx.http),
                run,
            ));
        }
    }

    async fn interaction_create(&self, ctx: Context, interaction: Interaction) {
        match interaction {
            Interaction::Command(cmd) => self.command(&ctx, cmd).await,
            Interaction::Autocomplete(cmd) => self.autocomplete(&ctx, cmd).await,
            _ => {}
        }
    }

    async fn message(&self, ctx: Context, message: Message) {
        if message.guild_id.is_some() || message.author.bot || message.author.system {
            return;
        }
        self.direct_message(&ctx, message).await;
    }
}

impl Handler {
    async fn command(&self, ctx: &Context, cmd: CommandInteraction) {
        let name = cmd.data.name.clone();
        let state = &self.state;
        let result = match name.as_str() {
            commands::CARTOON => {
                self.slash_cartoon(ctx, cmd).await;
                Ok(())
            }
            commands::CARTOONIZE => {
                self.menu_cartoon(ctx, cmd).await;
                Ok(())
            }
            commands::PRESET => settings::preset(state, &ctx.http, &cmd).await,
            commands::STYLES => settings::styles(state, &ctx.http, &cmd).await,
            commands::STICKER => settings::sticker(state, &ctx.http, &cmd).await,
            commands::SERVER_SETTINGS => settings::server_settings(state, &ctx.http, &cmd).await,
            commands::STYLEPACK => stylepack::command(state, &ctx.http, &cmd).await,
            other => {
                tracing::warn!(command = other, "unknown command");
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::warn!(command = %name, error = %e, "answering a command failed");
        }
    }

    async fn slash_cartoon(&self, ctx: &Context, cmd: CommandInteraction) {
        let mut photo = None;
        let mut overrides = Overrides::default();
        for option in cmd.data.options() {
            match (option.name, option.value) {
                ("photo", ResolvedValue::Attachment(a)) => {
                    photo = Some(PhotoRef::from_attachment(a))
                }
                ("style", ResolvedValue::String(s)) => overrides.style = Some(s.trim().to_string()),
                ("output", ResolvedValue::String(s)) => {
                    overrides.output = s.parse::<OutputKind>().ok()
                }
                _ => {}
            }
        }
        self.cartoon(ctx, cmd, photo, JobSource::Slash, overrides)
            .await;
    }

    /// The "Cartoonize" menu: the first image attached to the message it was used on.
    async fn menu_cartoon(&self, ctx: &Context, cmd: CommandInteraction) {
        let photo = cmd
            .data
            .target_id
            .and_then(|target| cmd.data.resolved.messages.get(&target.to_message_id()))
            .and_then(|message| {
                message
                    .attachments
                    .iter()
                    .map(PhotoRef::from_attachment)
                    .find(PhotoRef::is_image)
            });
        self.cartoon(ctx, cmd, photo, JobSource::Menu, Overrides::default())
            .await;
    }

    /// Cartoonises `photo` in answer to an interaction, or says that there is none.
    async fn cartoon(
        &self,
        ctx: &Context,
        cmd: CommandInteraction,
        photo: Option<PhotoRef>,
        source: JobSource,
        overrides: Overrides,
    ) {
        let request = CartoonRequest {
            user_id: cmd.user.id.get(),
            guild_id: cmd.guild_id.map(GuildId::get),
            channel_id: cmd.channel_id.get(),
            source,
            overrides,
        };
        let mut reply = Reply::interaction(Arc::clone(&ctx.http), &cmd);
        match photo {
            Some(photo) => cartoon::run(&self.state, request, photo, reply).await,
            None => {
                if let Err(e) = reply.error(texts::NO_PHOTO_IN_MESSAGE).await {
                    tracing::warn!(error = %e, "answering a cartoon request without a photo failed");
                }
            }
        }
    }

    /// Style options offer the styles usable here; `/stylepack`'s `name` options offer the
    /// server's style packs (to its admins).
    async fn autocomplete(&self, ctx: &Context, cmd: CommandInteraction) {
        let Some(focused) = cmd.data.autocomplete() else {
            return;
        };
        let typed = focused.value.to_lowercase();
        let guild = cmd.guild_id.map(GuildId::get);
        let names: Vec<String> =
            if cmd.data.name == commands::STYLEPACK && focused.name == "name" {
                match guild {
                    Some(guild) if settings::is_server_admin(&self.state, &cmd) => self
                        .state
                        .store
                        .guild_styles(guild)
                        .await
                        .map(|packs| packs.into_iter().map(|p| p.name).collect()),
                    _ => Ok(Vec::new()),
                }
            } else {
                usable_styles(&self.state, guild)
                    .await
                    .map(|styles| styles.into_iter().map(|s| s.name).collect())
            }
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "listing autocomplete choices");
                Vec::new()
            });
        let mut response = CreateAutocompleteResponse::new();
        for name in names
            .into_iter()
            .filter(|n| n.to_lowercase().contains(&typed))
            .take(25)
        {
            response = response.add_string_choice(name.clone(), name);
        }
        if let Err(e) = cmd
            .create_response(&ctx.http, CreateInteractionResponse::Autocomplete(response))
            .await
        {
            tracing::debug!(error = %e, "answering autocomplete failed");
        }
    }

    async fn direct_message(&self, ctx: &Context, message: Message) {
        let photos: Vec<PhotoRef> = message
            .attachments
            .iter()
            .map(PhotoRef::from_attachment)
            .filter(PhotoRef::is_image)
            .collect();
        if photos.is_empty() {
            let text = if message.attachments.is_empty() {
                texts::DM_HELP.to_string()
            } else {
                let first = PhotoRef::from_attachment(&message.attachments[0]);
                texts::photo_error(&super::download::PhotoError::NotAnImage(
                    first.content_type.unwrap_or(first.filename),
                ))
            };
            let reply = CreateMessage::new()
                .content(text)
                .reference_message(&message);
            if let Err(e) = message.channel_id.send_message(&ctx.http, reply).await {
                tracing::warn!(error = %e, "answering a DM failed");
            }
            return;
        }
        let mut tasks = Vec::new();
        for photo in photos.into_iter().take(MAX_DM_PHOTOS) {
            let request = CartoonRequest {
                user_id: message.author.id.get(),
                guild_id: None,
                channel_id: message.channel_id.get(),
                source: JobSource::Dm,
                overrides: Overrides::default(),
            };
            let reply = Reply::dm(Arc::clone(&ctx.http), message.channel_id, message.id);
            let state = Arc::clone(&self.state);
            tasks.push(tokio::spawn(async move {
                cartoon::run(&state, request, photo, reply).await
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// Tells a user that their job was lost in a restart, where the reply can still be reached.
async fn tell_interrupted(http: &Arc<Http>, job: &crate::store::JobRecord) {
    let sent = match &job.reply {
        Some(ReplyRef::Interaction {
            application_id,
            token,
        }) => {
            // Only this application's tokens, and only while they are valid (15 minutes).
            if now_ms() - job.created_at > TOKEN_LIFETIME_MS
                || http.application_id().map(|a| a.get()) != Some(*application_id)
            {
                return;
            }
            let edit = EditInteractionResponse::new().content(texts::INTERRUPTED);
            tokio::time::timeout(TELL_TIMEOUT, edit.execute(http.as_ref(), token))
                .await
                .map(|r| r.map(drop).map_err(|e| e.to_string()))
        }
        Some(ReplyRef::Message { message_id }) => {
            let edit = EditMessage::new().content(texts::INTERRUPTED);
            let channel = ChannelId::new(job.channel_id);
            tokio::time::timeout(
                TELL_TIMEOUT,
                channel.edit_message(http.as_ref(), MessageId::new(*message_id), edit),
            )
            .await
            .map(|r| r.map(drop).map_err(|e| e.to_string()))
        }
        None => return,
    };
    match sent {
        Ok(Ok(())) => {
            tracing::info!(
                job = job.id,
                user = job.user_id,
                "told the user their job was lost"
            )
        }
        Ok(Err(e)) => tracing::warn!(job = job.id, error = %e, "telling about a lost job failed"),
        Err(_) => tracing::warn!(job = job.id, "telling about a lost job timed out"),
    }
}
