-- Style packs: styles fine-tuned from an admin's upload, owned by a guild.

-- One row per pack. Names are unique on the host: a published style is installed in the style
-- registry under its name. Drafts stay in the packs folder until published.
CREATE TABLE guild_styles (
    name            TEXT    PRIMARY KEY,
    guild_id        INTEGER NOT NULL,
    base            TEXT    NOT NULL,          -- the style it was fine-tuned from
    status          TEXT    NOT NULL,          -- training | cancelled | failed | draft | published
    images          INTEGER NOT NULL,          -- training images
    held_out        INTEGER NOT NULL,          -- images kept for the evaluation
    faces_found     INTEGER,                   -- images aligned on a face (once prepared)
    created_by      INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    published_at    INTEGER,
    kid_x100_mean   REAL,
    kid_x100_std    REAL,
    identity_cosine REAL,
    eval_error      TEXT
);
CREATE INDEX guild_styles_guild ON guild_styles (guild_id);

-- Every training run of a pack (the upload's, and one per resume after a cancel). A restart
-- resumes a run left `running`.
CREATE TABLE training_runs (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    style          TEXT    NOT NULL REFERENCES guild_styles (name) ON DELETE CASCADE,
    user_id        INTEGER NOT NULL,           -- who started it
    channel_id     INTEGER NOT NULL,
    message_id     INTEGER,                    -- the progress message the bot edits
    status         TEXT    NOT NULL,           -- running | done | cancelled | failed
    step           INTEGER NOT NULL DEFAULT 0,
    total_steps    INTEGER NOT NULL,
    losses         TEXT,                       -- JSON object of the latest losses
    images_per_sec REAL,
    error          TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    finished_at    INTEGER,
    train_ms       REAL    NOT NULL DEFAULT 0, -- time spent training, summed over restarts
    eval_ms        REAL
);
CREATE INDEX training_runs_style ON training_runs (style);
CREATE INDEX training_runs_status ON training_runs (status);
