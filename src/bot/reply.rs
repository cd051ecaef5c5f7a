//! Where a job's progress, errors and results go: an interaction's response, or a DM.

use std::sync::Arc;

use serenity::all::{
    ChannelId, CommandInteraction, CreateAttachment, CreateInteractionResponse,
    CreateInteractionResponseFollowup, CreateInteractionResponseMessage, CreateMessage,
    EditInteractionResponse, EditMessage, Http, Message, MessageId,
};

use crate::jobs::RenderedFile;
use crate::store::ReplyRef;

pub enum Reply {
    /// A slash command or the message menu: deferred, then the original response is edited.
    /// Errors go to the user only (ephemeral).
    Interaction {
        http: Arc<Http>,
        cmd: Box<CommandInteraction>,
        deferred: bool,
    },
    /// A photo sent in DM: a progress message replying to it is edited.
    Dm {
        http: Arc<Http>,
        channel: ChannelId,
        source: MessageId,
        progress: Option<Box<Message>>,
    },
}

impl Reply {
    /// Acknowledges the request: defers the interaction (Discord shows "thinking"), or posts
    /// the DM progress message.
    pub async fn defer(&mut self) -> serenity::Result<()> {
        match self {
            Self::Interaction {
                http,
                cmd,
                deferred,
            } => {
                cmd.create_response(
                    http.as_ref(),
                    CreateInteractionResponse::Defer(CreateInteractionResponseMessage::new()),
                )
                .await?;
                *deferred = true;
            }
            Self::Dm {
                http,
                channel,
                source,
                progress,
            } => {
                let message = CreateMessage::new()
                    .content("⏳ Got it, working on it…")
                    .reference_message((*channel, *source));
                *progress = Some(Box::new(
                    channel.send_message(http.as_ref(), message).await?,
                ));
            }
        }
        Ok(())
    }

    /// How to reach this reply after a restart.
    pub fn reply_ref(&self) -> Option<ReplyRef> {
        match self {
            Self::Interaction { cmd, .. } => Some(ReplyRef::Interaction {
                application_id: cmd.application_id.get(),
                token: cmd.token.clone(),
            }),
            Self::Dm { progress, .. } => progress.as_ref().map(|m| ReplyRef::Message {
                message_id: m.id.get(),
            }),
        }
    }

    pub async fn progress(&mut self, text: &str) -> serenity::Result<()> {
        match self {
            Self::Interaction { http, cmd, .. } => {
                cmd.edit_response(http.as_ref(), EditInteractionResponse::new().content(text))
                    .await?;
            }
            Self::Dm {
                http,
                channel,
                progress: Some(message),
                ..
            } => {
                channel
                    .edit_message(http.as_ref(), message.id, EditMessage::new().content(text))
                    .await?;
            }
            Self::Dm { .. } => {}
        }
        Ok(())
    }

    /// Tells the user what went wrong: ephemeral for interactions (the public "thinking"
    /// response, if any, is deleted first).
    pub async fn error(&mut self, text: &str) -> serenity::Result<()> {
        match self {
            Self::Interaction {
                http,
                cmd,
                deferred: false,
            } => {
                let message = CreateInteractionResponseMessage::new()
                    .content(text)
                    .ephemeral(true);
                cmd.create_response(http.as_ref(), CreateInteractionResponse::Message(message))
                    .await?;
            }
            Self::Interaction {
                http,
                cmd,
                deferred: true,
            } => {
                // Best effort: the follow-up below is what matters.
                if let Err(e) = cmd.delete_response(http.as_ref()).await {
                    tracing::debug!(error = %e, "deleting the deferred response");
                }
                let followup = CreateInteractionResponseFollowup::new()
                    .content(text)
                    .ephemeral(true);
                cmd.create_followup(http.as_ref(), followup).await?;
            }
            Self::Dm {
                http,
                channel,
                progress: Some(message),
                ..
            } => {
                channel
                    .edit_message(http.as_ref(), message.id, EditMessage::new().content(text))
                    .await?;
            }
            Self::Dm {
                http,
                channel,
                source,
                progress: None,
            } => {
                let message = CreateMessage::new()
                    .content(text)
                    .reference_message((*channel, *source));
                channel.send_message(http.as_ref(), message).await?;
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
        let mut batches = batches.into_iter().map(|b| {
            b.into_iter()
                .map(|f| CreateAttachment::bytes(f.png.clone(), f.name.clone()))
                .collect::<Vec<_>>()
        });
        let first = batches.next().unwrap_or_default();
        match self {
            Self::Interaction { http, cmd, .. } => {
                let mut edit = EditInteractionResponse::new().content(text);
                for file in first {
                    edit = edit.new_attachment(file);
                }
                cmd.edit_response(http.as_ref(), edit).await?;
                for batch in batches {
                    cmd.create_followup(
                        http.as_ref(),
                        CreateInteractionResponseFollowup::new().add_files(batch),
                    )
                    .await?;
                }
            }
            Self::Dm {
                http,
                channel,
                source,
                progress,
            } => {
                match progress {
                    Some(message) => {
                        let mut edit = EditMessage::new().content(text);
                        for file in first {
                            edit = edit.new_attachment(file);
                        }
                        channel
                            .edit_message(http.as_ref(), message.id, edit)
                            .await?;
                    }
                    None => {
                        let message = CreateMessage::new()
                            .content(text)
                            .reference_message((*channel, *source))
                            .add_files(first);
                        channel.send_message(http.as_ref(), message).await?;
                    }
                }
                for batch in batches {
                    channel
                        .send_message(http.as_ref(), CreateMessage::new().add_files(batch))
                        .await?;
                }
            }
        }
        Ok(())
    }
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
