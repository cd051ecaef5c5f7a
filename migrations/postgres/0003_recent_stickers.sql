-- The stickers of each user's latest result, for /sticker add (PostgreSQL twin of
-- migrations/0003_recent_stickers.sql): kept across restarts, for 30 minutes (the bot deletes
-- older rows, and keeps at most 256 users' results).
CREATE TABLE recent_stickers (
    user_id    BIGINT NOT NULL,
    face       BIGINT NOT NULL,               -- 1-based, as /sticker add's face option
    guild_id   BIGINT NOT NULL,               -- where the result was made
    png        BYTEA  NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, face)
);
CREATE INDEX recent_stickers_created ON recent_stickers (created_at);
