//! What the bot says to people: each error says what happened and what to do.

use std::time::Duration;

use serenity::all::{ChannelId, UserId};

use crate::config::StylePackConfig;
use crate::jobs::{JobStatus, OutputKind, RenderError, RenderOutput, SubmitError};
use crate::store::{GuildStyle, StyleStatus, TrainingRun};
use crate::stylepack::{
    Accepted, ArchiveError, EvalReport, PackError, PackWarning, QueuedUpload, RunEnd, RunProgress,
    Skipped,
};

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
        SubmitError::Unavailable(_) => {
            "I can't reach my render service right now. Send the photo again in a minute.".into()
        }
    }
}

pub fn photo_error(e: &PhotoError) -> String {
    match e {
        PhotoError::NotAnImage(what) => {
            format!("That file ({what}) isn't a photo I can use. Send a PNG, JPEG or WebP picture.")
        }
        PhotoError::TooLarge { size, max } => format!(
            "That photo is too large ({}). Send a smaller one: resize \
             it, or take a screenshot of it.",
            over_limit(*size, *max)
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

/// An interaction's answer sent after its 15-minute token expired: by DM (`mention`
/// `None`), else in the channel with a mention.
pub fn late_reply(channel: ChannelId, mention: Option<UserId>, text: &str) -> String {
    let lead = match mention {
        Some(user) => format!("<@{user}>, here is the answer to your request in this channel"),
        None => format!("Here is the answer to your request in <#{channel}>"),
    };
    format!("{lead} (it took longer than Discord keeps a reply open):\n{text}")
}

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
    let faces = match (output.faces, output.faces_found) {
        (1, 1) => "1 face".to_string(),
        (n, found) if found > n => format!("the {n} largest of the {found} faces I found"),
        (n, _) => format!("{n} faces"),
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

/// "21.3 MB; the limit is 20.0 MB": the size rounded up and the limit down, so that a file
/// just over the limit never reads as the same size.
fn over_limit(size: u64, max: u64) -> String {
    let tenths = |bytes: u64, round: fn(f64) -> f64| round(bytes as f64 / 100_000.0) / 10.0;
    format!(
        "{:.1} MB; the limit is {:.1} MB",
        tenths(size, f64::ceil),
        tenths(max, f64::floor)
    )
}

// --- style packs -------------------------------------------------------------------------------

/// Entries listed at most when telling what was skipped.
const SKIPPED_SHOWN: usize = 10;

pub fn admins_only(what: &str) -> String {
    format!("Only members with **Manage Server** (or the bot's admin role) can {what}.")
}

pub const STYLEPACKS_OFF: &str = "Style packs aren't enabled on this bot.";

pub const STYLEPACK_IN_SERVER: &str =
    "Style packs belong to a server: use `/stylepack` in the server that should get the style.";

pub const STYLEPACK_USAGE: &str = "Use `/stylepack upload`, `cancel`, `resume`, `publish`, \
    `delete` or `list`.";

pub const STYLEPACK_NO_FILE: &str =
    "Attach the style pack: a .zip of cartoon faces (PNG, JPEG or WebP).";

pub const STYLEPACK_CHECKING: &str = "📦 Checking the archive…";

/// An entry name as shown in Discord: no formatting characters, at most 60 characters.
fn entry(name: &str) -> String {
    let clean: String = name
        .chars()
        .filter(|c| !c.is_control() && *c != '`')
        .collect();
    let n = clean.chars().count();
    if n > 60 {
        format!("…{}", clean.chars().skip(n - 59).collect::<String>())
    } else {
        clean
    }
}

/// "Skipped N files:" and a bulleted list (empty when nothing was skipped).
pub fn skipped_files(skipped: &[Skipped]) -> String {
    if skipped.is_empty() {
        return String::new();
    }
    let mut text = format!(
        "Skipped {} file{}:",
        skipped.len(),
        if skipped.len() == 1 { "" } else { "s" }
    );
    for s in skipped.iter().take(SKIPPED_SHOWN) {
        text.push_str(&format!("\n• `{}`: {}", entry(&s.entry), s.reason));
    }
    if skipped.len() > SKIPPED_SHOWN {
        text.push_str(&format!("\n• … and {} more", skipped.len() - SKIPPED_SHOWN));
    }
    text
}

pub fn archive_error(e: &ArchiveError, config: &StylePackConfig) -> String {
    match e {
        ArchiveError::TooLarge { bytes, max } => format!(
            "That archive is too large ({}). Upload fewer or smaller \
             images.",
            over_limit(*bytes, *max)
        ),
        ArchiveError::NotAZip => "That file isn't a zip archive. Put the cartoon faces (PNG, \
             JPEG or WebP) in a .zip and upload that."
            .into(),
        ArchiveError::Corrupt(_) => "That zip archive is damaged. Zip the images again and \
             upload the new archive."
            .into(),
        ArchiveError::TooManyEntries { count, max } => format!(
            "That archive has {count} files; a style pack may have at most {max} files and {} \
             images. Pick your best cartoon faces and upload again.",
            config.max_images
        ),
        ArchiveError::DuplicateNames => "That archive has several files with the same name. \
             Zip the images again and upload the new archive."
            .into(),
        ArchiveError::UnsafePath(name) => format!(
            "That archive is refused: `{}` has a path that leads outside the archive's folder \
             (`..`, an absolute path, a backslash or a drive letter). Zip the images again \
             from a plain folder.",
            entry(name)
        ),
        ArchiveError::Link(name) => format!(
            "That archive is refused: `{}` is a symbolic link, not an image. Zip the image \
             files themselves.",
            entry(name)
        ),
        ArchiveError::Encrypted(name) => format!(
            "That archive is encrypted (`{}`). Upload a zip without a password.",
            entry(name)
        ),
        ArchiveError::EntryExpandsTooMuch { entry: name, max } => format!(
            "That archive is refused: `{}` expands to more than {} MB, far more than any \
             cartoon face (a zip bomb?). Upload just the images.",
            entry(name),
            mb(*max)
        ),
        ArchiveError::ArchiveExpandsTooMuch { max } => format!(
            "That archive is refused: it expands to more than {} MB. Upload fewer or smaller \
             images.",
            mb(*max)
        ),
        ArchiveError::TooManyImages { max } => format!(
            "That archive has more than {max} images; a style pack may have at most {max}. \
             Pick your best cartoon faces and upload again."
        ),
        ArchiveError::TooFewImages {
            found,
            min,
            skipped,
        } => {
            let mut text = format!(
                "That archive has {found} usable image{}; a style pack needs at least {min} \
                 different cartoon faces (PNG, JPEG or WebP).",
                if *found == 1 { "" } else { "s" }
            );
            let skipped = skipped_files(skipped);
            if !skipped.is_empty() {
                text.push('\n');
                text.push_str(&skipped);
            }
            text
        }
    }
}

/// What to do about a style pack in its current state.
fn status_hint(name: &str, status: StyleStatus) -> String {
    match status {
        StyleStatus::Training => {
            "Wait for it to finish, or stop it with `/stylepack cancel`.".to_string()
        }
        StyleStatus::Cancelled | StyleStatus::Failed => format!(
            "Continue it with `/stylepack resume name:{name}`, or remove it with \
             `/stylepack delete name:{name}`."
        ),
        StyleStatus::Draft => format!("Publish it with `/stylepack publish name:{name}`."),
        StyleStatus::Published => "This server's members can already use it.".to_string(),
    }
}

/// A refused style-pack action, as told to an admin of `guild_id`.
pub fn pack_error(e: &PackError, guild_id: u64, config: &StylePackConfig) -> String {
    match e {
        PackError::NoTrainer => "This bot can't train styles on its host yet (no trainer is \
             installed). Ask the bot's admin."
            .into(),
        PackError::InvalidName(name) => format!(
            "`{}` can't be a style name: use 1 to 32 lowercase letters, digits, `-` or `_`.",
            entry(name)
        ),
        PackError::NameTaken(name) => format!(
            "There's already a style called `{name}`. Pick another name (see `/styles` and \
             `/stylepack list`)."
        ),
        PackError::BaseMissing { name, available } => format!(
            "There's no style called `{}` to start from. Available: {}.",
            entry(name),
            available
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        PackError::Busy {
            guild_id: owner,
            name,
        } if *owner == guild_id => format!(
            "**{name}** is still being trained on this server, and the bot trains one style at \
             a time. Wait for it to finish, or stop it with `/stylepack cancel`."
        ),
        PackError::Busy { .. } => "The bot is training another server's style right now, and \
             it trains one at a time. Try again later."
            .into(),
        PackError::Archive(e) => archive_error(e, config),
        PackError::NotFound(name) => format!(
            "This server has no style pack called `{}` (see `/stylepack list`).",
            entry(name)
        ),
        PackError::WrongStatus { name, status } => format!(
            "**{name}** is {status}, so that can't be done now. {}",
            status_hint(name, *status)
        ),
        PackError::NothingTraining => "Nothing is training on this server.".into(),
        PackError::Queued => "This server already has a style pack waiting or training, and \
             the bot trains one per server at a time. Wait for it to finish, or stop it with \
             `/stylepack cancel`."
            .into(),
        PackError::Internal(_) => "Something went wrong on my side with that style pack. \
             Please try again; if it keeps happening, tell the bot's admin."
            .into(),
    }
}

/// A style-pack archive that could not be downloaded.
pub fn pack_download_error(e: &PhotoError) -> String {
    match e {
        PhotoError::TooLarge { size, max } => format!(
            "That archive is too large ({}). Upload fewer or smaller \
             images.",
            over_limit(*size, *max)
        ),
        PhotoError::HostNotAllowed(_) => {
            "Attach the .zip itself to the command rather than a link.".into()
        }
        PhotoError::NotAnImage(_) | PhotoError::Download(_) => {
            "I couldn't download that archive from Discord. Try uploading it again.".into()
        }
    }
}

pub fn pack_accepted(name: &str, accepted: &Accepted) -> String {
    let counts = (accepted.train, accepted.held_out);
    let mut text = pack_summary(name, counts, &accepted.skipped);
    text.push_str(&format!(
        "\nPreparing the faces and training from **{}** now: follow it in this channel, stop \
         it with `/stylepack cancel`.",
        accepted.base()
    ));
    text
}

/// An upload a gateway queued for the trainers.
pub fn pack_queued(name: &str, queued: &QueuedUpload) -> String {
    let mut text = pack_summary(name, (queued.train, queued.held_out), &queued.skipped);
    text.push_str(&format!(
        "\nQueued to train from **{}**: the progress will be posted in this channel; stop it \
         with `/stylepack cancel`.",
        queued.base
    ));
    text
}

/// The images accepted from an archive, and those skipped.
fn pack_summary(name: &str, (train, held_out): (usize, usize), skipped: &[Skipped]) -> String {
    let mut text = format!(
        "📦 **{name}**: {} images accepted, {train} to train on and {held_out} kept aside to \
         evaluate the style.",
        train + held_out,
    );
    let skipped = skipped_files(skipped);
    if !skipped.is_empty() {
        text.push('\n');
        text.push_str(&skipped);
    }
    text
}

/// A queued pack its trainer would not train (told in the channel: the upload's reply may
/// be past its 15 minutes).
pub fn pack_refused_by_trainer(user_id: u64, name: &str, why: &str) -> String {
    format!("<@{user_id}> Your style pack **{name}** couldn't be trained: {why}.")
}

/// "40 s", "9 min", "2 h 05 min".
fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s.div_ceil(60)),
        _ => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
    }
}

pub fn training_started(style: &GuildStyle, run: &TrainingRun) -> String {
    if run.step > 0 {
        format!(
            "🧪 Training **{}** resumes at step {}/{}…",
            style.name, run.step, run.total_steps
        )
    } else {
        format!(
            "🧪 Training **{}** from **{}** on {} images…",
            style.name, style.base, style.images
        )
    }
}

pub fn training_progress(style: &GuildStyle, progress: &RunProgress) -> String {
    let (step, total, losses, images_per_sec, eta) = match progress {
        RunProgress::Preparing { done, total } => {
            return format!(
                "🧑‍🎨 Preparing the cartoon faces of **{}**: {done}/{total}…",
                style.name
            )
        }
        RunProgress::Training {
            step,
            total,
            losses,
            images_per_sec,
            eta,
        } => (step, total, losses, images_per_sec, eta),
    };
    let percent = u64::from(*step) * 100 / u64::from((*total).max(1));
    let mut text = format!(
        "🧪 Training **{}** from **{}**: step {step}/{total} ({percent}%)",
        style.name, style.base
    );
    if !losses.is_empty() {
        let losses: Vec<String> = losses
            .iter()
            .take(6)
            .map(|(name, value)| format!("{name} {value:.3}"))
            .collect();
        text.push_str(&format!(" · losses {}", losses.join(", ")));
    }
    text.push_str(&format!(" · {images_per_sec:.1} images/s"));
    if let Some(eta) = eta {
        text.push_str(&format!(" · about {} left", duration(*eta)));
    }
    text
}

pub fn preview_caption(style: &GuildStyle, step: u32, total: u32) -> String {
    format!("🖼️ **{}** at step {step}/{total}", style.name)
}

/// The progress message's final text.
pub fn training_ended(style: &GuildStyle, end: &RunEnd) -> String {
    let name = &style.name;
    match end {
        RunEnd::Trained { steps, .. } => {
            format!(
                "✅ **{name}** trained from **{}**: {steps} steps.",
                style.base
            )
        }
        RunEnd::Cancelled { step, total } => format!(
            "⏹️ Training **{name}** was cancelled at step {step}/{total}. The checkpoint is \
             kept: `/stylepack resume name:{name}` continues from it, `/stylepack delete \
             name:{name}` removes it."
        ),
        RunEnd::Refused(refusal) => format!(
            "❌ **{name}** was not trained: {refusal}. A style pack needs cartoon faces, one \
             face to an image and facing the viewer, in most of its images. \
             `/stylepack delete name:{name}` removes it; then upload a pack of faces."
        ),
        RunEnd::Failed(_) => format!(
            "❌ Training **{name}** failed. `/stylepack resume name:{name}` tries again from the \
             last checkpoint; if it keeps failing, tell the bot's admin."
        ),
    }
}

/// Posted in the run's channel before the first step: what the pack trains despite.
pub fn pack_warning(style: &GuildStyle, warning: &PackWarning) -> String {
    let name = &style.name;
    match warning {
        PackWarning::MixedStyles { spread, limit } => format!(
            "⚠️ The images of **{name}** look drawn in several different styles (style spread \
             {spread:.2}, over {limit:.2} for one artist's faces). It trains anyway, but a mix \
             learns none of the styles well: for a clearer style, cancel (`/stylepack cancel`) \
             and upload faces drawn one way."
        ),
    }
}

/// The evaluation, posted with the last preview once a style is trained.
pub fn trained(style: &GuildStyle, faces_found: u32, eval: &Result<EvalReport, String>) -> String {
    let name = &style.name;
    let images = style.images + style.held_out;
    let numbers = match eval {
        Ok(e) => format!(
            "Evaluation on the {} held-out image{}: **KID×100 {:.2} ± {:.2}** (lower is closer \
             to the pack's style), **identity {:.2}** (cosine, higher keeps faces \
             recognisable).",
            style.held_out,
            if style.held_out == 1 { "" } else { "s" },
            e.kid_x100_mean,
            e.kid_x100_std,
            e.identity_cosine
        ),
        Err(why) => format!(
            "The evaluation failed ({}), so there are no numbers; judge by the preview.",
            why.chars().take(300).collect::<String>()
        ),
    };
    format!(
        "🎨 **{name}** is ready as a draft. A face was found and aligned in {faces_found} of its \
         {images} images, the others were centre-cropped. {numbers}\nPublish it for this \
         server's members with `/stylepack publish name:{name}`, or remove it with \
         `/stylepack delete name:{name}`."
    )
}

pub fn published(name: &str) -> String {
    format!(
        "Published **{name}**: this server's members can now pick it with `/cartoon style:{name}` \
         (and `/preset set`)."
    )
}

pub fn deleted(name: &str) -> String {
    format!("Deleted the style pack **{name}** and its files.")
}

pub fn cancelling(name: &str) -> String {
    format!(
        "Stopping **{name}** at its next step; the checkpoint is kept (`/stylepack resume \
         name:{name}` continues from it)."
    )
}

/// A queued pack taken out of the queue before a trainer ran it.
pub fn withdrawn(name: &str) -> String {
    format!("Took **{name}** out of the training queue; nothing was trained.")
}

/// A resume queued for the trainers.
pub fn resume_queued(name: &str) -> String {
    format!(
        "Queued **{name}** to train again (from its last checkpoint where the trainer has \
         it): follow it in this channel."
    )
}

pub fn resumed(name: &str) -> String {
    format!("Training **{name}** again from its last checkpoint: follow it in this channel.")
}

pub fn pack_list(packs: &[(GuildStyle, Option<TrainingRun>)]) -> String {
    if packs.is_empty() {
        return "This server has no style packs yet. Upload one with `/stylepack upload`.".into();
    }
    let mut text = String::from("Style packs on this server:");
    for (style, run) in packs {
        text.push_str(&format!(
            "\n• **{}** — {}, from **{}** on {} images",
            style.name, style.status, style.base, style.images
        ));
        if let (StyleStatus::Training | StyleStatus::Cancelled | StyleStatus::Failed, Some(run)) =
            (style.status, run)
        {
            text.push_str(&format!(", step {}/{}", run.step, run.total_steps));
        }
        if let Some(e) = style.eval {
            text.push_str(&format!(
                " · KID×100 {:.2} ± {:.2}, identity {:.2}",
                e.kid_x100_mean, e.kid_x100_std, e.identity_cosine
            ));
        }
        if style.status != StyleStatus::Published {
            text.push_str(&format!(" · {}", status_hint(&style.name, style.status)));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_just_over_the_limit_never_reads_as_the_limit() {
        assert_eq!(
            over_limit(20_000_001, 20_000_000),
            "20.1 MB; the limit is 20.0 MB"
        );
        assert_eq!(
            over_limit(30_000_000, 20_000_000),
            "30.0 MB; the limit is 20.0 MB"
        );
        assert_eq!(
            over_limit(10_485_761, 10_485_760),
            "10.5 MB; the limit is 10.4 MB"
        );
    }
}
