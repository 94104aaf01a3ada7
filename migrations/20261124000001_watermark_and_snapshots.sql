-- The ledger writer's contiguous watermark: every stream sequence at or below it is final in the
-- ledger (a row, a reject, or a duplicate of a row). Stream-ordered readers (the quota
-- projection, snapshots) read up to it, never past a sequence that could still arrive.
ALTER TABLE consumer_checkpoints ADD COLUMN contiguous_seq bigint NOT NULL DEFAULT 0
    CHECK (contiguous_seq >= 0);

-- Snapshots of the quota state (SPEC v2 §7, ADR 0005): one row per snapshot, its bytes in chunks
-- written in the same transaction, so a writer killed mid-way leaves nothing behind.
CREATE TABLE quota_snapshots (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream      text        NOT NULL,
    stream_seq  bigint      NOT NULL CHECK (stream_seq >= 0),
    format      integer     NOT NULL,
    checksum    bigint      NOT NULL,
    size_bytes  bigint      NOT NULL,
    taken_at    timestamptz NOT NULL,
    written_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX quota_snapshots_newest ON quota_snapshots (stream, stream_seq DESC);

CREATE TABLE quota_snapshot_chunks (
    snapshot_id bigint  NOT NULL REFERENCES quota_snapshots (id) ON DELETE CASCADE,
    idx         integer NOT NULL,
    data        bytea   NOT NULL,
    PRIMARY KEY (snapshot_id, idx)
);
-- The body is already compact binary: skip pglz on write and read.
ALTER TABLE quota_snapshot_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
