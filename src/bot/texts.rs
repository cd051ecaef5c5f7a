//! What the bot says to people: each error says what happened and what to do.

use crate::jobs::{JobStatus, OutputKind, RenderError, RenderOutput, SubmitError};

use super::download::PhotoError;

pub fn render_error(e: &RenderError, job_id: Option<i64>) -> String {
    match e {
        RenderError::NotAnImage => {
            "That file isn't a photo I can read. Send a PNG, JPEG or WebP picture.".into()
        }
        RenderError::TooLarge(detail) => format!(
            "That photo is too large ({detail}). Send a smaller one: resize it, or take a \
             screenshot of it."
        ),
        RenderError::NoFace => "I couldn't find a face in that photo. Try one where the faces \
             are clearly visible, facing the camera and not too small."
            .into(),
        RenderError::StyleMissing { name, available } => style_missing(name, available),
        RenderError::NoStyleInstalled => "No cartoon style is installed yet, so I can't draw \
             anything. Ask the bot's admin to install one."
            .into(),
        RenderError::Internal(_) => format!(
            "Something went wrong on my side while drawing your cartoon{}. Please try again; \
             if it keeps happening, tell the bot's admin.",
            job_id.map(|id| format!(" (job {id})")).unwrap_or_default()
        ),
    }
}

pub fn style_missing(name: &str, available: &[String]) -> String {
    if available.is_empty() {
        return format!("There's no style called `{name}`, and no style is installed yet.");
    }
    format!(
        "There's no style called `{name}`. Installed styles: {}. Pick one of them (see \
         `/styles`), or change your default with `/preset set`.",
        available
            .iter()
            .map(|s| format!("`{s}`"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

pub fn submit_error(e: &SubmitError) -> String {
    match e {
        SubmitError::QueueFull { .. } => "I'm busy: the queue is full right now. Try again in a \
             minute or two."
            .into(),
        SubmitError::UserLimit { limit } => format!(
            "You already have {limit} photo{} in progress. Wait for {} to finish, then send \
             this one again.",
            if *limit == 1 { "" } else { "s" },
            if *limit == 1 { "it" } else { "them" }
        ),
        SubmitError::ShuttingDown => {
            "I'm restarting right now. Send the photo again in a minute.".into()
        }
    }
}

pub fn photo_error(e: &PhotoError) -> String {
    match e {
        PhotoError::NotAnImage(what) => {
            format!("That file ({what}) isn't a photo I can use. Send a PNG, JPEG or WebP picture.")
        }
        PhotoError::TooLarge { size, max } => format!(
            "That photo is too large ({} MB; the limit is {} MB). Send a smaller one: resize \
             it, or take a screenshot of it.",
            mb(*size),
            mb(*max)
        ),
        PhotoError::HostNotAllowed(_) => "I can only use photos uploaded to Discord. Attach \
             the photo itself rather than a link."
            .into(),
        PhotoError::Download(_) => "I couldn't download that photo from Discord. Try \
             uploading it again."
            .into(),
    }
}

pub const NO_PHOTO_IN_MESSAGE: &str = "That message has no photo attached. Use **Cartoonize** \
    on a message with a PNG, JPEG or WebP picture, or use `/cartoon` and attach one.";

pub const DM_HELP: &str = "Hi! Send me a photo (PNG, JPEG or WebP) and I'll turn the faces in \
    it into cartoon stickers and avatars. Set your defaults (style, output, outline) with \
    `/preset set`, and see the styles with `/styles`.";

pub const INTERRUPTED: &str = "Sorry, I restarted before your cartoon was ready, so it was \
    lost. Please send the photo again.";

pub fn progress(status: &JobStatus) -> Option<String> {
    match status {
        JobStatus::Queued { position: 1, .. } => Some("⏳ You're next in the queue…".into()),
        JobStatus::Queued { position, waiting } => Some(format!(
            "⏳ Waiting in the queue: position {position} of {waiting}."
        )),
        JobStatus::Running => Some("🎨 Drawing your cartoon…".into()),
        _ => None,
    }
}

pub fn result_summary(
    output: &RenderOutput,
    kind: OutputKind,
    cached: bool,
    seconds: f64,
    sticker_hint: bool,
    skipped: &[String],
) -> String {
    let faces = match output.faces {
        1 => "1 face".to_string(),
        n => format!("{n} faces"),
    };
    let what = match kind {
        OutputKind::Sticker => "stickers",
        OutputKind::Avatar => "avatars",
        OutputKind::Both => "stickers and avatars",
        OutputKind::Photo => "cartoon photo",
    };
    let mut text = format!("Here are your {what}: {faces}, style **{}**", output.style);
    if cached {
        text.push_str(" (ready-made: same photo and options as before)");
    } else {
        text.push_str(&format!(", {seconds:.1} s"));
    }
    text.push('.');
    for name in skipped {
        text.push_str(&format!(
            "\n`{name}` is too large to upload here, so it was left out."
        ));
    }
    if sticker_hint {
        text.push_str("\nAdd one to this server's stickers with `/sticker add`.");
    }
    text
}

fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1_000_000.0)
}
