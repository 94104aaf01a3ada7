-- The `usage` projection's tables (see usage.rs): settled usage per chain subject, model, model
-- group and frozen counted flags, in minute, hour and UTC-day buckets. Written `{schema}.<table>`.
CREATE TABLE {schema}.usage_minute (
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
CREATE TABLE {schema}.usage_hour (LIKE {schema}.usage_minute INCLUDING ALL);
CREATE TABLE {schema}.usage_day (LIKE {schema}.usage_minute INCLUDING ALL);
