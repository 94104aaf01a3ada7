-- The `quota` projection's tables (see quota.rs). Written `{schema}.<table>`: the runner creates
-- them in the live schema or in the rebuild schema.
CREATE TABLE {schema}.cfg_subjects (
    subject     text        PRIMARY KEY,
    parent      text,
    groups      text[]      NOT NULL DEFAULT '{}',
    disabled    boolean     NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL
);
CREATE TABLE {schema}.cfg_model_groups (
    name        text        PRIMARY KEY,
    models      text[]      NOT NULL,
    updated_at  timestamptz NOT NULL
);
CREATE TABLE {schema}.cfg_policies (
    policy_id    text        PRIMARY KEY,
    subject      text        NOT NULL,
    model_group  text,
    metric       text        NOT NULL,
    "limit"      bigint      NOT NULL CHECK ("limit" > 0),
    "window"     jsonb       NOT NULL,
    boundary     text        NOT NULL,
    on_exhausted text        NOT NULL,
    enabled      boolean     NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);
CREATE INDEX ON {schema}.cfg_policies (subject);
CREATE TABLE {schema}.cfg_grants (
    grant_id    text        PRIMARY KEY,
    subject     text        NOT NULL,
    model_group text,
    metric      text        NOT NULL,
    amount      bigint      NOT NULL CHECK (amount > 0),
    window_kind text,
    starts_at   timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);
CREATE TABLE {schema}.credit_balances (
    subject     text        PRIMARY KEY,
    balance     bigint      NOT NULL CHECK (balance >= 0),
    refill      jsonb,
    last_refill timestamptz,
    updated_at  timestamptz NOT NULL
);
-- One row per pool and window. `window_key` is the window start for calendar and periodic
-- windows and -infinity for rolling and lifetime ones (one row, showing the latest bounds).
CREATE TABLE {schema}.quota_windows (
    policy_id    text        NOT NULL,
    subject      text        NOT NULL,
    window_key   timestamptz NOT NULL,
    window_start timestamptz,
    window_end   timestamptz,
    metric       text        NOT NULL,
    "limit"      bigint      NOT NULL,
    used         bigint      NOT NULL CHECK (used >= 0),
    on_exhausted text        NOT NULL,
    exhausted_at timestamptz,
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (policy_id, subject, window_key)
);
CREATE INDEX ON {schema}.quota_windows (subject) WHERE exhausted_at IS NOT NULL;
