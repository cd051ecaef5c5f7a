//! Where a job's progress, errors and results go: an interaction's response, or a DM. A
//! [`ReplyTarget`] is plain data: a gateway hands it to a responder process, which answers.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serenity::all::{
    Builder, ChannelId, CreateAttachment, CreateInteractionResponse,
    CreateInteractionResponseFollowup, CreateInteractionResponseMessage, CreateMessage,
    EditInteractionResponse, EditMessage, Http, InteractionId, MessageId, UserId,
};

use super::texts;
use crate::jobs::RenderedFile;
use crate::store::{now_ms, ReplyRef};

/// An interaction token's lifetime (15 minutes), less a margin.
pub const TOKEN_LIFETIME_MS: i64 = 14 * 60 * 1000;

/// Where a reply goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyTarget {
    /// A slash command or the message menu: deferred, then the original response is edited.
    /// Errors go to the user only (ephemeral). Once the token has expired, the answer goes to
    /// the user in a DM, else to the channel.
    Interaction {
        /// The interaction's id.
        id: u64,
        /// The bot's application id.
        application_id: u64,
        /// The interaction token, which the response is edited with.
        token: String,
        /// Who asked.
        user: u64,
        /// Where they asked.
        channel: u64,
        /// When the bot received the interaction (unix ms): the token lasts 15 minutes.
        received_ms: i64,
    },
    /// A photo sent in DM: a progress message replying to it is edited.
    Dm {
        /// The DM channel.
        channel: u64,
        /// The user's message with the photo.
        source: u64,
        /// The bot's progress message, once posted.
        progress: Option<u64>,
    },
}

pub struct Reply {
    http: Arc<Http>,
    target: ReplyTarget,
    deferred: bool,
}

impl Reply {
    /// The reply to an interaction just received.
    pub fn interaction(http: Arc<Http>, cmd: &serenity::all::CommandInteraction) -> Self {
        Self {
            http,
            target: ReplyTarget::Interaction {
                id: cmd.id.get(),
                application_id: cmd.application_id.get(),
                token: cmd.token.clone(),
                user: cmd.user.id.get(),
                channel: cmd.channel_id.get(),
                received_ms: now_ms(),
            },
            deferred: false,
        }
    }

    /// The reply to a photo sent in DM.
    pub fn dm(http: Arc<Http>, channel: ChannelId, source: MessageId) -> Self {
        Self {
            http,
            target: ReplyTarget::Dm {
                channel: channel.get(),
                source: source.get(),
                progress: None,
            },
            deferred: false,
        }
    }

    /// A reply acknowledged elsewhere ([`Reply::defer`] done by a gateway), continued here.
    pub fn resume(http: Arc<Http>, target: ReplyTarget) -> Self {
        Self {
            http,
            target,
            deferred: true,
        }
    }

    /// Where this reply goes, to hand over.
    pub fn target(&self) -> &ReplyTarget {
        &self.target
    }

    /// Acknowledges the request: defers the interaction (Discord shows "thinking"), or posts
    /// the DM progress message.
    pub async fn defer(&mut self) -> serenity::Result<()> {
        match &mut self.target {
            ReplyTarget::Interaction { id, token, .. } => {
                CreateInteractionResponse::Defer(CreateInteractionResponseMessage::new())
                    .execute(self.http.as_ref(), (InteractionId::new(*id), token))
                    .await?;
            }
            ReplyTarget::Dm {
                channel,
                source,
                progress,
            } => {
                let channel = ChannelId::new(*channel);
                let message = CreateMessage::new()
                    .content("⏳ Got it, working on it…")
                    .reference_message((channel, MessageId::new(*source)));
                *progress = Some(
                    channel
                        .send_message(self.http.as_ref(), message)
                        .await?
                        .id
                        .get(),
                );
            }
        }
        self.deferred = true;
        Ok(())
    }

    /// How to reach this reply after a restart.
    pub fn reply_ref(&self) -> Option<ReplyRef> {
        match &self.target {
            ReplyTarget::Interaction {
                application_id,
                token,
                ..
            } => Some(ReplyRef::Interaction {
                application_id: *application_id,
                token: token.clone(),
            }),
            ReplyTarget::Dm { progress, .. } => {
                progress.map(|message_id| ReplyRef::Message { message_id })
            }
        }
    }

    /// Whether the interaction's token has expired (never for DMs).
    fn expired(&self) -> bool {
        match &self.target {
            ReplyTarget::Interaction { received_ms, .. } => {
                now_ms() - received_ms > TOKEN_LIFETIME_MS
            }
            ReplyTarget::Dm { .. } => false,
        }
    }

    /// Shows how the job goes (nothing once an interaction's token has expired).
    pub async fn progress(&mut self, text: &str) -> serenity::Result<()> {
        if self.expired() {
            return Ok(());
        }
        match &self.target {
            ReplyTarget::Interaction { token, .. } => {
                EditInteractionResponse::new()
                    .content(text)
                    .execute(self.http.as_ref(), token)
                    .await?;
            }
            ReplyTarget::Dm {
                channel,
                progress: Some(message),
                ..
            } => {
                ChannelId::new(*channel)
                    .edit_message(
                        self.http.as_ref(),
                        MessageId::new(*message),
                        EditMessage::new().content(text),
                    )
                    .await?;
            }
            ReplyTarget::Dm { .. } => {}
        }
        Ok(())
    }

    /// Tells the user what went wrong: ephemeral for interactions (the public "thinking"
    /// response, if any, is deleted first).
    pub async fn error(&mut self, text: &str) -> serenity::Result<()> {
        if self.expired() {
            // By DM only: an error is not for the channel to see.
            return self.post_late(text, Vec::new(), false).await;
        }
        let http = self.http.as_ref();
        match &self.target {
            ReplyTarget::Interaction { id, token, .. } if !self.deferred => {
                let message = CreateInteractionResponseMessage::new()
                    .content(text)
                    .ephemeral(true);
                CreateInteractionResponse::Message(message)
                    .execute(http, (InteractionId::new(*id), token))
                    .await?;
            }
            ReplyTarget::Interaction { token, .. } => {
                // Best effort: the follow-up below is what matters.
                if let Err(e) = http.delete_original_interaction_response(token).await {
                    tracing::debug!(error = %e, "deleting the deferred response");
                }
                CreateInteractionResponseFollowup::new()
                    .content(text)
                    .ephemeral(true)
                    .execute(http, (None, token))
                    .await?;
            }
            ReplyTarget::Dm {
                channel,
                progress: Some(message),
                ..
            } => {
                ChannelId::new(*channel)
                    .edit_message(
                        http,
                        MessageId::new(*message),
                        EditMessage::new().content(text),
                    )
                    .await?;
            }
            ReplyTarget::Dm {
                channel,
                source,
                progress: None,
            } => {
                let channel = ChannelId::new(*channel);
                let message = CreateMessage::new()
                    .content(text)
                    .reference_message((channel, MessageId::new(*source)));
                channel.send_message(http, message).await?;
            }
        }
        Ok(())
    }

    /// Sends the results: the first batch of files in the response (or progress message), the
    /// rest in follow-up messages.
    pub async fn results(
        &mut self,
        text: &str,
        batches: Vec<Vec<&RenderedFile>>,
    ) -> serenity::Result<()> {
        let batches: Vec<Vec<CreateAttachment>> = batches
            .into_iter()
            .map(|b| {
                b.into_iter()
                    .map(|f| CreateAttachment::bytes(f.png.clone(), f.name.clone()))
                    .collect()
            })
            .collect();
        if self.expired() {
            return self.post_late(text, batches, true).await;
        }
        let http = self.http.as_ref();
        let mut batches = batches.into_iter();
        let first = batches.next().unwrap_or_default();
        match &self.target {
            ReplyTarget::Interaction { token, .. } => {
                let mut edit = EditInteractionResponse::new().content(text);
                for file in first {
                    edit = edit.new_attachment(file);
                }
                edit.execute(http, token).await?;
                for batch in batches {
                    CreateInteractionResponseFollowup::new()
                        .add_files(batch)
                        .execute(http, (None, token))
                        .await?;
                }
            }
            ReplyTarget::Dm {
                channel,
                source,
                progress,
            } => {
                let channel = ChannelId::new(*channel);
                match progress {
                    Some(message) => {
                        let mut edit = EditMessage::new().content(text);
                        for file in first {
                            edit = edit.new_attachment(file);
                        }
                        channel
                            .edit_message(http, MessageId::new(*message), edit)
                            .await?;
                    }
                    None => {
                        let message = CreateMessage::new()
                            .content(text)
                            .reference_message((channel, MessageId::new(*source)))
                            .add_files(first);
                        channel.send_message(http, message).await?;
                    }
                }
                send_batches(http, channel, batches).await?;
            }
        }
        Ok(())
    }

    /// An interaction's answer after its token expired: in a DM to the user, else (their DMs
    /// closed), when `in_channel`, in the channel, mentioning them.
    async fn post_late(
        &self,
        text: &str,
        batches: Vec<Vec<CreateAttachment>>,
        in_channel: bool,
    ) -> serenity::Result<()> {
        let ReplyTarget::Interaction { user, channel, .. } = &self.target else {
            unreachable!("only interaction tokens expire");
        };
        let http = self.http.as_ref();
        let user = UserId::new(*user);
        let channel = ChannelId::new(*channel);
        let mut batches = batches.into_iter();
        let first = batches.next().unwrap_or_default();
        let by_dm = match user.create_dm_channel(http).await {
            Ok(dm) => {
                let message = CreateMessage::new()
                    .content(texts::late_reply(channel, None, text))
                    .add_files(first.clone());
                dm.id.send_message(http, message).await.map(|_| dm.id)
            }
            Err(e) => Err(e),
        };
        // Only when the first message could not go by DM: the rest follow where it went.
        let to = match by_dm {
            Ok(dm) => dm,
            Err(e) if !in_channel => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "a late reply by DM failed");
                let message = CreateMessage::new()
                    .content(texts::late_reply(channel, Some(user), text))
                    .add_files(first);
                channel.send_message(http, message).await?;
                channel
            }
        };
        send_batches(http, to, batches).await
    }
}

async fn send_batches(
    http: &Http,
    channel: ChannelId,
    batches: impl Iterator<Item = Vec<CreateAttachment>>,
) -> serenity::Result<()> {
    for batch in batches {
        channel
            .send_message(http, CreateMessage::new().add_files(batch))
            .await?;
    }
    Ok(())
}

/// Splits files into messages of at most 10 files and `max_bytes` bytes; files larger than
/// `max_bytes` on their own are returned separately (they cannot be uploaded).
pub fn batch_files(
    files: &[RenderedFile],
    max_bytes: u64,
) -> (Vec<Vec<&RenderedFile>>, Vec<&RenderedFile>) {
    const MAX_FILES: usize = 10;
    let mut batches: Vec<Vec<&RenderedFile>> = Vec::new();
    let mut too_large = Vec::new();
    let mut size = 0u64;
    for file in files {
        let len = file.png.len() as u64;
        if len > max_bytes {
            too_large.push(file);
            continue;
        }
        match batches.last_mut() {
            Some(batch) if batch.len() < MAX_FILES && size + len <= max_bytes => {
                batch.push(file);
                size += len;
            }
            _ => {
                batches.push(vec![file]);
                size = len;
            }
        }
    }
    (batches, too_large)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::FileKind;

    #[test]
    fn batches_respect_count_and_size() {
        let file = |n: usize| RenderedFile {
            name: format!("f{n}.png"),
            kind: FileKind::Sticker,
            png: vec![0; 100],
        };
        let files: Vec<_> = (0..23).map(file).collect();
        let (batches, big) = batch_files(&files, 10_000);
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            [10, 10, 3]
        );
        assert!(big.is_empty());
        let (batches, _) = batch_files(&files[..5], 250);
        assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
        let (batches, big) = batch_files(&files[..2], 50);
        assert!(batches.is_empty());
        assert_eq!(big.len(), 2);
    }
}
