-- The ledger keeps each event's payload as the bytes that were published (`json`), not as `jsonb`
-- (ADR 0007). Nothing reads the payload through jsonb operators: every reader asks for its text and
-- decodes it. As jsonb, each row paid a parse on insert and a re-serialization on every read (a
-- third of Postgres' CPU in a quota replay), and took more room than the compact text (816 against
-- 659 bytes per event on the bench's realistic traffic; admissions past 2 kB are also compressed).
-- `->` and `->>` work on json as they did. Rows written before keep jsonb's rendering of their text.
ALTER TABLE ledger ALTER COLUMN payload TYPE json USING payload::text::json;
