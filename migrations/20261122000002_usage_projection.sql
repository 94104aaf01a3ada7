-- Projection checkpoints: each projection's position in the ledger (`ledger.pos`), written
-- in the same transaction as its rows so it can be dropped and rebuilt alone.
CREATE TABLE projection_checkpoints (
    projection  text        PRIMARY KEY,
    last_pos    bigint      NOT NULL CHECK (last_pos >= 0),
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Settled usage per chain subject, model and model group, keeping the counted flags so global
-- totals (flag true) and model-group totals (model_group = G) can both be derived. One table per
-- bucket size so hour and day sums are single index range scans. '' stands for "none".
CREATE TABLE usage_minute (
    subject      text        NOT NULL,
    model        text        NOT NULL,
    model_group  text        NOT NULL,
    counted_in_key_global  boolean NOT NULL,
    counted_in_user_global boolean NOT NULL,
    bucket       timestamptz NOT NULL,
    requests      bigint NOT NULL CHECK (requests >= 0),
    input_tokens  bigint NOT NULL CHECK (input_tokens >= 0),
    output_tokens bigint NOT NULL CHECK (output_tokens >= 0),
    cost          bigint NOT NULL CHECK (cost >= 0),
    credits       bigint NOT NULL CHECK (credits >= 0),
    PRIMARY KEY (subject, bucket, model, model_group, counted_in_key_global, counted_in_user_global)
);
CREATE TABLE usage_hour (LIKE usage_minute INCLUDING ALL);
CREATE TABLE usage_day (LIKE usage_minute INCLUDING ALL);
