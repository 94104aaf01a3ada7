-- The ledger: one row per event, append-only, the system of record (SPEC §7).
CREATE TABLE ledger (
    -- Commit order. Writers serialize their transactions (advisory lock), so rows become visible
    -- in pos order and a projection tailing `pos > checkpoint` never skips one. Stream order can
    -- differ after a writer crash (unacked messages are redelivered after newer ones).
    pos                   bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    event_id              uuid        PRIMARY KEY,
    stream_seq            bigint      NOT NULL CHECK (stream_seq > 0),
    event_type            text        NOT NULL,
    schema_version        integer     NOT NULL,
    occurred_at           timestamptz NOT NULL,
    window_at             timestamptz NOT NULL,
    recorded_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    request_id            text,
    settlement_id         text,
    subject               text,
    chain                 text[]      NOT NULL DEFAULT '{}',
    model                 text,
    model_group           text,
    requests              bigint      NOT NULL DEFAULT 0,
    input_tokens          bigint      NOT NULL DEFAULT 0,
    output_tokens         bigint      NOT NULL DEFAULT 0,
    cost                  bigint      NOT NULL DEFAULT 0,
    credits               bigint      NOT NULL DEFAULT 0,
    counted_in_key_global  boolean    NOT NULL,
    counted_in_user_global boolean    NOT NULL,
    payload               jsonb       NOT NULL
);

CREATE INDEX ledger_stream_seq ON ledger (stream_seq);
CREATE INDEX ledger_request_id ON ledger (request_id) WHERE request_id IS NOT NULL;
-- A settlement is one fact however many times a client retries it: the second copy of the same
-- (request, settlement id) is not appended, so no projection can count it twice.
CREATE UNIQUE INDEX ledger_settlement_once ON ledger (request_id, settlement_id)
    WHERE event_type = 'usage.settled';

CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger is append-only: % rejected', TG_OP USING ERRCODE = 'restrict_violation';
END $$;

CREATE TRIGGER ledger_no_update_delete
    BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_no_truncate
    BEFORE TRUNCATE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

-- Messages that could not be decoded or violate the schema, with the reason (also dead-lettered).
CREATE TABLE ledger_rejects (
    stream         text        NOT NULL,
    stream_seq     bigint      NOT NULL,
    nats_subject   text        NOT NULL,
    reason         text        NOT NULL,
    field          text,
    payload        bytea       NOT NULL,
    rejected_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (stream, stream_seq)
);

-- Where each consumer of the stream has got to, written in the same transaction as its rows.
CREATE TABLE consumer_checkpoints (
    consumer    text        PRIMARY KEY,
    stream      text        NOT NULL,
    last_seq    bigint      NOT NULL CHECK (last_seq >= 0),
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
