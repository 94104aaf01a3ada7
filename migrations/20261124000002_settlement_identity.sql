-- A settlement is identified by its request, its admission and its settlement id (SPEC §5: a
-- request id reused after its idempotency window is a new request). Before, the identity left the
-- admission out: a reused request id's settlements were dropped from the ledger as duplicates
-- while the live state counted them, so the ledger and the quota state disagreed.
ALTER TABLE ledger ADD COLUMN admission_id uuid;

ALTER TABLE ledger DISABLE TRIGGER ledger_no_update_delete;
UPDATE ledger SET admission_id = (payload->'data'->>'admission_id')::uuid
    WHERE payload->'data'->>'admission_id' IS NOT NULL;
ALTER TABLE ledger ENABLE TRIGGER ledger_no_update_delete;

DROP INDEX ledger_settlement_once;
CREATE UNIQUE INDEX ledger_settlement_once
    ON ledger (request_id, COALESCE(admission_id, '00000000-0000-0000-0000-000000000000'::uuid), settlement_id)
    WHERE event_type = 'usage.settled';
