//! The application commands the bot registers.

use serenity::all::{
    CommandOptionType, CommandType, CreateCommand, CreateCommandOption, InteractionContext,
    Permissions,
};

use crate::jobs::OutputKind;

pub const CARTOON: &str = "cartoon";
pub const CARTOONIZE: &str = "Cartoonize";
pub const PRESET: &str = "preset";
pub const STYLES: &str = "styles";
pub const STICKER: &str = "sticker";
pub const SERVER_SETTINGS: &str = "server-settings";
pub const STYLEPACK: &str = "stylepack";

fn style_option(description: &str) -> CreateCommandOption {
    CreateCommandOption::new(CommandOptionType::String, "style", description)
        .set_autocomplete(true)
        .max_length(64)
}

/// A style pack of this server, by name.
fn pack_name_option(description: &str) -> CreateCommandOption {
    CreateCommandOption::new(CommandOptionType::String, "name", description)
        .required(true)
        .set_autocomplete(true)
        .max_length(32)
}

fn output_option(description: &str) -> CreateCommandOption {
    let mut option = CreateCommandOption::new(CommandOptionType::String, "output", description);
    for (kind, label) in OutputKind::ALL.into_iter().zip([
        "sticker (320x320, transparent)",
        "avatar (512x512)",
        "both sticker and avatar",
        "the whole photo, cartoonised",
    ]) {
        option = option.add_string_choice(label, kind.as_str());
    }
    option
}

/// Every command, as registered (globally, or in `commands_guild_id`).
pub fn all() -> Vec<CreateCommand> {
    let everywhere = vec![InteractionContext::Guild, InteractionContext::BotDm];
    vec![
        CreateCommand::new(CARTOON)
            .description("Turn the faces in a photo into cartoon stickers and avatars")
            .contexts(everywhere.clone())
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::Attachment,
                    "photo",
                    "A photo with one or more faces (PNG, JPEG or WebP)",
                )
                .required(true),
            )
            .add_option(style_option(
                "Cartoon style (default: your preset, see /styles)",
            ))
            .add_option(output_option(
                "What to make (default: your preset, or both)",
            )),
        CreateCommand::new(CARTOONIZE)
            .kind(CommandType::Message)
            .contexts(everywhere.clone()),
        CreateCommand::new(PRESET)
            .description("Your defaults for /cartoon, Cartoonize and photos sent in DM")
            .contexts(everywhere.clone())
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::SubCommand,
                    "set",
                    "Change your defaults (options you leave out stay as they are)",
                )
                .add_sub_option(style_option("Default cartoon style"))
                .add_sub_option(output_option("Default output"))
                .add_sub_option(CreateCommandOption::new(
                    CommandOptionType::Boolean,
                    "outline",
                    "White outline around stickers",
                ))
                .add_sub_option(CreateCommandOption::new(
                    CommandOptionType::Boolean,
                    "round_avatar",
                    "Round avatars (transparent corners)",
                )),
            )
            .add_option(CreateCommandOption::new(
                CommandOptionType::SubCommand,
                "show",
                "Show your defaults",
            ))
            .add_option(CreateCommandOption::new(
                CommandOptionType::SubCommand,
                "reset",
                "Forget your defaults",
            )),
        CreateCommand::new(STYLES)
            .description("List the installed cartoon styles")
            .contexts(everywhere),
        CreateCommand::new(STICKER)
            .description("Server stickers from your cartoons")
            .contexts(vec![InteractionContext::Guild])
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::SubCommand,
                    "add",
                    "Add a sticker from your latest cartoon to this server",
                )
                .add_sub_option(
                    CreateCommandOption::new(
                        CommandOptionType::String,
                        "name",
                        "Sticker name (2-30 characters)",
                    )
                    .required(true)
                    .min_length(2)
                    .max_length(30),
                )
                .add_sub_option(
                    CreateCommandOption::new(
                        CommandOptionType::String,
                        "emoji",
                        "An emoji that suggests the sticker (default 🙂)",
                    )
                    .max_length(32),
                )
                .add_sub_option(
                    CreateCommandOption::new(
                        CommandOptionType::Integer,
                        "face",
                        "Which face of your latest result (default 1)",
                    )
                    .min_int_value(1)
                    .max_int_value(50),
                ),
            ),
        CreateCommand::new(SERVER_SETTINGS)
            .description("Server defaults for the cartoon bot (Manage Server)")
            .contexts(vec![InteractionContext::Guild])
            .default_member_permissions(Permissions::MANAGE_GUILD)
            .add_option(style_option(
                "Default style on this server (`default` to clear)",
            ))
            .add_option(CreateCommandOption::new(
                CommandOptionType::Boolean,
                "stickers",
                "Allow /sticker add on this server",
            )),
        CreateCommand::new(STYLEPACK)
            .description(
                "This server's own cartoon styles, trained from cartoon faces (Manage Server)",
            )
            .contexts(vec![InteractionContext::Guild])
            .default_member_permissions(Permissions::MANAGE_GUILD)
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::SubCommand,
                    "upload",
                    "Train a new style from a .zip of cartoon faces",
                )
                .add_sub_option(
                    CreateCommandOption::new(
                        CommandOptionType::Attachment,
                        "file",
                        "A .zip of cartoon face images (PNG, JPEG or WebP)",
                    )
                    .required(true),
                )
                .add_sub_option(
                    CreateCommandOption::new(
                        CommandOptionType::String,
                        "name",
                        "The new style's name: lowercase letters, digits, - or _",
                    )
                    .required(true)
                    .min_length(1)
                    .max_length(32),
                )
                .add_sub_option(
                    style_option("The style to start from (default: the bot's default style)")
                        .name("base"),
                ),
            )
            .add_option(CreateCommandOption::new(
                CommandOptionType::SubCommand,
                "cancel",
                "Stop this server's training (its checkpoint is kept)",
            ))
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::SubCommand,
                    "resume",
                    "Continue a cancelled or failed training from its checkpoint",
                )
                .add_sub_option(pack_name_option("The style pack to continue")),
            )
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::SubCommand,
                    "publish",
                    "Let this server's members use a trained style",
                )
                .add_sub_option(pack_name_option("The style pack to publish")),
            )
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::SubCommand,
                    "delete",
                    "Delete a style pack and its files",
                )
                .add_sub_option(pack_name_option("The style pack to delete")),
            )
            .add_option(CreateCommandOption::new(
                CommandOptionType::SubCommand,
                "list",
                "This server's style packs",
            )),
    ]
}
