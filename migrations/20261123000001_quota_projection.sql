-- The `quota` projection (SPEC §7): configuration as tables, and per-window totals and
-- exhaustion states of every pool, folded from the ledger by the same code the API decides with.
-- Every table here can be dropped and rebuilt from the ledger (delete the checkpoint row).

CREATE TABLE cfg_subjects (
    subject     text        PRIMARY KEY,
    parent      text,
    groups      text[]      NOT NULL DEFAULT '{}',
    disabled    boolean     NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL
);

CREATE TABLE cfg_model_groups (
    name        text        PRIMARY KEY,
    models      text[]      NOT NULL,
    updated_at  timestamptz NOT NULL
);

CREATE TABLE cfg_policies (
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
CREATE INDEX cfg_policies_subject ON cfg_policies (subject);

CREATE TABLE cfg_grants (
    grant_id    text        PRIMARY KEY,
    subject     text        NOT NULL,
    model_group text,
    metric      text        NOT NULL,
    amount      bigint      NOT NULL CHECK (amount > 0),
    window_kind text,
    starts_at   timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);

CREATE TABLE credit_balances (
    subject     text        PRIMARY KEY,
    balance     bigint      NOT NULL CHECK (balance >= 0),
    refill      jsonb,
    last_refill timestamptz,
    updated_at  timestamptz NOT NULL
);

-- One row per pool and window. `window_key` is the window start for calendar and periodic
-- windows and -infinity for rolling and lifetime ones (one row, showing the latest bounds).
CREATE TABLE quota_windows (
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
CREATE INDEX quota_windows_exhausted ON quota_windows (subject) WHERE exhausted_at IS NOT NULL;
