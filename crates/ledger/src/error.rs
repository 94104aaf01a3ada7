//! The ledger crate's one error type.

/// What can go wrong at the log/ledger edge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The stream exists with settings we may not change (e.g. a different partition count).
    #[error("stream {stream}: {message}")]
    StreamConfig {
        /// Stream name.
        stream: String,
        /// What disagrees.
        message: String,
    },
    /// A JetStream request failed (stream/consumer management, fetch, ack).
    #[error("jetstream: {0}")]
    JetStream(String),
    /// Publishing an event failed or its ack did not arrive.
    #[error("publish failed: {0}")]
    Publish(String),
    /// The event is invalid and was not published.
    #[error("invalid event: {0}")]
    InvalidEvent(#[from] tally_events::Error),
    /// A database call failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migrate(String),
    /// A conditional publish lost the race: another writer published on `subject` after the
    /// sequence this one was validated against.
    #[error("{subject} changed concurrently")]
    ConcurrentWrite {
        /// The subject both wrote to.
        subject: String,
    },
    /// The thread decoding ledger pages ahead of a fold died (a panic in the decoder).
    #[error("decoding ledger pages ahead of the fold failed")]
    ReadAhead(#[source] tokio::task::JoinError),
    /// The fail-open spool could not take or give back an event (disk full, I/O error, spool
    /// at its size cap, unreadable cursor).
    #[error("spool: {0}")]
    Spool(String),
    /// The stream's last sequence is below the ledger checkpoint: the stream lost acknowledged
    /// history (restart without fsync, recreated stream). Continuing would mix two histories, so
    /// the writer stops and an operator must decide.
    #[error(
        "ALARM: stream {stream} last sequence {stream_last_seq} is below the ledger checkpoint {checkpoint}; \
         the stream lost history. The ledger writer stopped; Postgres holds the acknowledged events."
    )]
    StreamBehindCheckpoint {
        /// Stream name.
        stream: String,
        /// The stream's last sequence now.
        stream_last_seq: u64,
        /// The checkpoint in Postgres.
        checkpoint: u64,
    },
}
