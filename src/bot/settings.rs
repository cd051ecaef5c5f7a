//! `/preset`, `/styles`, `/sticker add` and `/server-settings`: short, ephemeral answers; and
//! what the admin commands share (who is an admin).

use std::sync::Arc;

use anyhow::Result;
use serenity::all::{
    CommandInteraction, CreateAttachment, CreateEmbed, CreateInteractionResponse,
    CreateInteractionResponseMessage, CreateSticker, EditInteractionResponse, Http, HttpError,
    Permissions, ResolvedOption, ResolvedValue,
};

use super::cartoon::{
    check_style, usable_styles, DEFAULT_OUTLINE, DEFAULT_OUTPUT, DEFAULT_ROUND_AVATAR,
};
use super::{texts, BotState};
use crate::jobs::OutputKind;
use crate::store::{GuildSettings, Preset};

/// Discord limits for guild stickers.
const STICKER_MAX_BYTES: usize = 512 * 1024;
/// JSON error codes Discord returns for sticker uploads.
const MAX_STICKERS_REACHED: isize = 30039;
const MISSING_PERMISSIONS: isize = 50013;

pub(super) async fn say(
    http: &Arc<Http>,
    cmd: &CommandInteraction,
    text: impl Into<String>,
) -> Result<()> {
    let message = CreateInteractionResponseMessage::new()
        .content(text)
        .ephemeral(true);
    cmd.create_response(http.as_ref(), CreateInteractionResponse::Message(message))
        .await?;
    Ok(())
}

pub(super) fn sub_command<'a>(
    cmd: &'a CommandInteraction,
) -> Option<(&'a str, Vec<ResolvedOption<'a>>)> {
    cmd.data.options().into_iter().find_map(|o| match o.value {
        ResolvedValue::SubCommand(options) => Some((o.name, options)),
        _ => None,
    })
}

fn describe(preset: &Preset) -> String {
    format!(
        "style **{}**, output **{}**, outline **{}**, round avatar **{}**",
        preset.style.as_deref().unwrap_or("default"),
        preset.output,
        if preset.outline { "on" } else { "off" },
        if preset.round_avatar { "on" } else { "off" },
    )
}

fn default_preset() -> Preset {
    Preset {
        style: None,
        output: DEFAULT_OUTPUT.as_str().into(),
        outline: DEFAULT_OUTLINE,
        round_avatar: DEFAULT_ROUND_AVATAR,
    }
}

pub async fn preset(state: &BotState, http: &Arc<Http>, cmd: &CommandInteraction) -> Result<()> {
    let user = cmd.user.id.get();
    let Some((name, options)) = sub_command(cmd) else {
        return say(
            http,
            cmd,
            "Use `/preset set`, `/preset show` or `/preset reset`.",
        )
        .await;
    };
    match name {
        "show" => {
            let text = match state.store.preset(user).await? {
                Some(p) => format!("Your defaults: {}.", describe(&p)),
                None => format!(
                    "You have no defaults yet, so I use: {}. Change them with `/preset set`.",
                    describe(&default_preset())
                ),
            };
            say(http, cmd, text).await
        }
        "reset" => {
            let text = if state.store.reset_preset(user).await? {
                format!(
                    "Your defaults are forgotten. Back to: {}.",
                    describe(&default_preset())
                )
            } else {
                "You had no defaults to forget.".to_string()
            };
            say(http, cmd, text).await
        }
        "set" => {
            let mut preset = state
                .store
                .preset(user)
                .await?
                .unwrap_or_else(default_preset);
            for option in options {
                match (option.name, option.value) {
                    ("style", ResolvedValue::String(s)) => {
                        let s = s.trim();
                        preset.style = (!s.is_empty() && s != "default").then(|| s.to_string());
                    }
                    ("output", ResolvedValue::String(s)) => match s.parse::<OutputKind>() {
                        Ok(kind) => preset.output = kind.as_str().into(),
                        Err(e) => return say(http, cmd, e).await,
                    },
                    ("outline", ResolvedValue::Boolean(b)) => preset.outline = b,
                    ("round_avatar", ResolvedValue::Boolean(b)) => preset.round_avatar = b,
                    _ => {}
                }
            }
            let guild = cmd.guild_id.map(|g| g.get());
            if let Err(e) = check_style(state, guild, preset.style.as_deref()).await {
                return say(http, cmd, texts::render_error(&e, None)).await;
            }
            state.store.set_preset(user, &preset).await?;
            say(
                http,
                cmd,
                format!("Saved. Your defaults: {}.", describe(&preset)),
            )
            .await
        }
        _ => {
            say(
                http,
                cmd,
                "Use `/preset set`, `/preset show` or `/preset reset`.",
            )
            .await
        }
    }
}

pub async fn styles(state: &BotState, http: &Arc<Http>, cmd: &CommandInteraction) -> Result<()> {
    let styles = usable_styles(state, cmd.guild_id.map(|g| g.get())).await?;
    if styles.is_empty() {
        return say(
            http,
            cmd,
            texts::render_error(&crate::jobs::RenderError::NoStyleInstalled, None),
        )
        .await;
    }
    let mut text = String::from(
        "Installed styles (use one with `/cartoon style:` or `/preset set style:`):\n",
    );
    for s in &styles {
        text.push_str(&format!(
            "• **{}**{} — {}\n",
            s.name,
            if s.is_default { " (default)" } else { "" },
            s.description
        ));
    }
    let mut message = CreateInteractionResponseMessage::new()
        .content(text)
        .ephemeral(true);
    // At most 10 embeds (and files) per message: previews of the first ten styles.
    for s in styles.iter().filter(|s| s.preview_png.is_some()).take(10) {
        let file = format!("preview-{}.png", sanitize(&s.name));
        let png = s.preview_png.clone().unwrap_or_default();
        message = message
            .add_file(CreateAttachment::bytes(png, file.clone()))
            .add_embed(
                CreateEmbed::new()
                    .title(&s.name)
                    .description(&s.description)
                    .image(format!("attachment://{file}")),
            );
    }
    cmd.create_response(http.as_ref(), CreateInteractionResponse::Message(message))
        .await?;
    Ok(())
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn can_add_stickers(permissions: Option<Permissions>) -> bool {
    permissions.is_some_and(|p| {
        p.intersects(
            Permissions::CREATE_GUILD_EXPRESSIONS
                | Permissions::MANAGE_GUILD_EXPRESSIONS
                | Permissions::ADMINISTRATOR,
        )
    })
}

pub async fn sticker(state: &BotState, http: &Arc<Http>, cmd: &CommandInteraction) -> Result<()> {
    let Some(guild) = cmd.guild_id else {
        return say(http, cmd, "Stickers can only be added in a server.").await;
    };
    let Some(("add", options)) = sub_command(cmd) else {
        return say(http, cmd, "Use `/sticker add name:<name>`.").await;
    };
    let (mut name, mut emoji, mut face) = (String::new(), "🙂".to_string(), 1usize);
    for option in options {
        match (option.name, option.value) {
            ("name", ResolvedValue::String(s)) => name = s.trim().to_string(),
            ("emoji", ResolvedValue::String(s)) if !s.trim().is_empty() => {
                emoji = s.trim().to_string()
            }
            ("face", ResolvedValue::Integer(i)) => face = i.max(1) as usize,
            _ => {}
        }
    }
    if !state
        .store
        .guild_settings(guild.get())
        .await?
        .stickers_enabled
    {
        return say(
            http,
            cmd,
            "Adding stickers is turned off on this server. An admin can turn it on with \
             `/server-settings stickers:True`.",
        )
        .await;
    }
    if !can_add_stickers(cmd.member.as_ref().and_then(|m| m.permissions)) {
        return say(
            http,
            cmd,
            "You need the **Create Expressions** (or Manage Expressions) permission on this \
             server to add stickers. Ask a server admin to add it for you.",
        )
        .await;
    }
    if !can_add_stickers(cmd.app_permissions) {
        return say(
            http,
            cmd,
            "I don't have the **Create Expressions** permission on this server, so I can't add \
             stickers. Ask a server admin to give it to my role.",
        )
        .await;
    }
    let count = name.chars().count();
    if !(2..=30).contains(&count) {
        return say(http, cmd, "A sticker name must be 2 to 30 characters long.").await;
    }
    let user = cmd.user.id.get();
    let stickers = state
        .store
        .recent_stickers(user, guild.get(), super::RECENT_TTL)
        .await?;
    if stickers.is_empty() {
        return say(
            http,
            cmd,
            "Make a sticker first: use `/cartoon` (output **sticker** or **both**) here, then \
             run `/sticker add` again.",
        )
        .await;
    }
    let n = stickers.len();
    let Some(png) = stickers.into_iter().nth(face - 1) else {
        return say(
            http,
            cmd,
            format!(
                "Your latest result has {n} sticker{}; pick face 1 to {n}.",
                if n == 1 { "" } else { "s" }
            ),
        )
        .await;
    };
    if png.len() > STICKER_MAX_BYTES {
        return say(
            http,
            cmd,
            "That sticker is over Discord's 512 KB limit; try another face or style.",
        )
        .await;
    }
    let defer =
        CreateInteractionResponse::Defer(CreateInteractionResponseMessage::new().ephemeral(true));
    cmd.create_response(http.as_ref(), defer).await?;
    let sticker = CreateSticker::new(name.clone(), CreateAttachment::bytes(png, "sticker.png"))
        .tags(emoji)
        .description(format!("Cartoon sticker made with {}", "toonbot"));
    let text = match guild.create_sticker(http.as_ref(), sticker).await {
        Ok(s) => format!("Added the sticker **{}** to this server.", s.name),
        Err(serenity::Error::Http(HttpError::UnsuccessfulRequest(r))) => match r.error.code {
            MAX_STICKERS_REACHED => "This server's sticker slots are full. Delete a sticker \
                 you no longer use (Server Settings → Stickers) or boost the server for more \
                 slots, then try again."
                .to_string(),
            MISSING_PERMISSIONS => "Discord says I'm missing the permission to add stickers \
                 here. Ask a server admin to give my role **Create Expressions**."
                .to_string(),
            _ => format!(
                "Discord refused the sticker: {}. Try another name or emoji.",
                r.error.message
            ),
        },
        Err(e) => {
            tracing::warn!(error = %e, "uploading a sticker failed");
            "I couldn't reach Discord to add the sticker. Please try again.".to_string()
        }
    };
    cmd.edit_response(http.as_ref(), EditInteractionResponse::new().content(text))
        .await?;
    Ok(())
}

/// Whether the member may administer the bot on this server: Manage Server (or
/// Administrator), or the configured admin role.
pub(super) fn is_server_admin(state: &BotState, cmd: &CommandInteraction) -> bool {
    let member = cmd.member.as_ref();
    member
        .and_then(|m| m.permissions)
        .is_some_and(|p| p.intersects(Permissions::MANAGE_GUILD | Permissions::ADMINISTRATOR))
        || state
            .config
            .admin_role_id
            .is_some_and(|role| member.is_some_and(|m| m.roles.iter().any(|r| r.get() == role)))
}

pub async fn server_settings(
    state: &BotState,
    http: &Arc<Http>,
    cmd: &CommandInteraction,
) -> Result<()> {
    let Some(guild) = cmd.guild_id else {
        return say(http, cmd, "Server settings only exist in a server.").await;
    };
    if !is_server_admin(state, cmd) {
        return say(http, cmd, texts::admins_only("change these settings")).await;
    }
    let mut settings: GuildSettings = state.store.guild_settings(guild.get()).await?;
    let mut changed = false;
    for option in cmd.data.options() {
        match (option.name, option.value) {
            ("style", ResolvedValue::String(s)) => {
                let s = s.trim();
                settings.default_style = (!s.is_empty() && s != "default").then(|| s.to_string());
                changed = true;
            }
            ("stickers", ResolvedValue::Boolean(b)) => {
                settings.stickers_enabled = b;
                changed = true;
            }
            _ => {}
        }
    }
    if let Err(e) = check_style(state, Some(guild.get()), settings.default_style.as_deref()).await {
        return say(http, cmd, texts::render_error(&e, None)).await;
    }
    if changed {
        state
            .store
            .set_guild_settings(guild.get(), &settings, cmd.user.id.get())
            .await?;
    }
    let text = format!(
        "{}Server defaults: style **{}**, `/sticker add` **{}**.",
        if changed { "Saved. " } else { "" },
        settings.default_style.as_deref().unwrap_or("default"),
        if settings.stickers_enabled {
            "allowed"
        } else {
            "off"
        }
    );
    say(http, cmd, text).await
}
