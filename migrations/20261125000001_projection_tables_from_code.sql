-- Projections own their tables (issue 6, SPEC v2 §8): each creates them from its code and records
-- the version it built them with beside its checkpoint, so a new projection or a changed one is
-- built (from the first ledger row, in the tally_rebuild schema, then swapped in) without a
-- migration. The tables the earlier migrations made are dropped here and rebuilt from the ledger
-- by the projector at its next start: they hold nothing the ledger does not.
ALTER TABLE projection_checkpoints ADD COLUMN version text NOT NULL DEFAULT '';

DROP TABLE IF EXISTS usage_minute, usage_hour, usage_day;
DROP TABLE IF EXISTS cfg_subjects, cfg_model_groups, cfg_policies, cfg_grants, credit_balances, quota_windows;
DELETE FROM projection_checkpoints;

CREATE SCHEMA IF NOT EXISTS tally_rebuild;
CREATE SCHEMA IF NOT EXISTS tally_retired;

-- API instances announce themselves so `tally audit` can compare their live state.
CREATE TABLE api_instances (
    instance     uuid        PRIMARY KEY,
    stream       text        NOT NULL,
    address      text        NOT NULL,
    started_at   timestamptz NOT NULL,
    last_seen    timestamptz NOT NULL
);
