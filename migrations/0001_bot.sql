-- toonbot bot storage. Discord snowflakes (u64) are stored as INTEGER (i64, bit-cast).
-- Times are unix milliseconds.

-- A user's defaults for /cartoon, the Cartoonize menu and DMs.
CREATE TABLE presets (
    user_id      INTEGER PRIMARY KEY,
    style        TEXT,                        -- NULL: the server's or the renderer's default
    output       TEXT    NOT NULL,            -- sticker | avatar | both | photo
    outline      INTEGER NOT NULL,            -- 0 | 1
    round_avatar INTEGER NOT NULL,            -- 0 | 1
    updated_at   INTEGER NOT NULL
);

-- Per-guild settings, changed by members with Manage Server (or the configured admin role).
CREATE TABLE guild_settings (
    guild_id         INTEGER PRIMARY KEY,
    default_style    TEXT,
    stickers_enabled INTEGER NOT NULL DEFAULT 1,
    updated_at       INTEGER NOT NULL
);

-- Every render request, with its outcome and timings.
CREATE TABLE jobs (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id        INTEGER NOT NULL,
    guild_id       INTEGER,
    channel_id     INTEGER NOT NULL,
    source         TEXT    NOT NULL,          -- slash | menu | dm
    image_sha256   TEXT,
    style          TEXT,
    output         TEXT    NOT NULL,
    status         TEXT    NOT NULL,          -- queued | running | done | failed | interrupted
    cached         INTEGER NOT NULL DEFAULT 0,
    faces          INTEGER,
    error          TEXT,                      -- error code, e.g. no_face
    created_at     INTEGER NOT NULL,
    started_at     INTEGER,
    finished_at    INTEGER,
    queue_ms       REAL,
    render_ms      REAL,
    total_ms       REAL,
    -- How to tell the user if the bot restarts before the job ends; cleared when it ends.
    -- An interaction token is valid for 15 minutes only.
    reply_app_id   INTEGER,
    reply_token    TEXT,
    reply_message_id INTEGER
);
CREATE INDEX jobs_status ON jobs (status);
CREATE INDEX jobs_user ON jobs (user_id, created_at);

-- Admin actions.
CREATE TABLE audit_log (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    guild_id INTEGER,
    user_id  INTEGER NOT NULL,
    action   TEXT    NOT NULL,
    detail   TEXT    NOT NULL,
    at       INTEGER NOT NULL
);
