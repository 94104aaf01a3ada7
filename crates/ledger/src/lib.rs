//! Tally's IO edge towards the event log and the system of record.
//!
//! - [`stream`]: the JetStream stream, created or updated idempotently with every setting explicit.
//! - [`publish`]: publishing events with `Nats-Msg-Id` = event id, awaiting the ack, with bounded
//!   in-flight publishes.
//! - [`spool`]: the fail-open spool: events fsynced to local disk while NATS is away, published
//!   in order, exactly once, when it returns.
//! - [`writer`]: the ledger writer, a durable pull consumer that appends each batch to Postgres in
//!   one transaction with its checkpoint and acks only after commit.
//! - [`reader`]: every read of the ledger, decoded once; [`snapshots`]: the quota snapshot store.
//! - [`metrics`]: the latency histogram layout every worker uses.
//! - [`MIGRATOR`]: the schema, applied by `tally migrate` and at start-up.

pub mod error;
pub mod metrics;
pub mod publish;
pub mod reader;
pub mod snapshots;
pub mod spool;
pub mod stream;
pub mod watermark;
pub mod writer;

pub use error::Error;
pub use publish::Publisher;
pub use spool::Spool;
pub use stream::StreamSettings;
pub use writer::{LedgerWriter, WriterSettings};

/// Every migration in `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Apply pending migrations.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), Error> {
    MIGRATOR.run(pool).await.map_err(Error::Migrate)
}

/// True when a database error is a unique violation (SQLSTATE 23505), read from the error's code,
/// never from its message.
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).as_deref() == Some("23505")
}
