-- The stickers of each user's latest result, for /sticker add: kept across restarts, for 30
-- minutes (the bot deletes older rows, and keeps at most 256 users' results).
CREATE TABLE recent_stickers (
    user_id    INTEGER NOT NULL,
    face       INTEGER NOT NULL,              -- 1-based, as /sticker add's face option
    guild_id   INTEGER NOT NULL,              -- where the result was made
    png        BLOB    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, face)
);
CREATE INDEX recent_stickers_created ON recent_stickers (created_at);
