//! The projector crate's one error type.

/// What can go wrong while projecting or reading projections.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A database call failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Reading the ledger or the snapshot store failed.
    #[error(transparent)]
    Ledger(#[from] tally_ledger::Error),
    /// A ledger row's payload no longer decodes (the ledger only holds validated events, so this
    /// means the reader is older than the writer).
    #[error("ledger row at pos {pos} does not decode: {source}")]
    Undecodable {
        /// `ledger.pos` of the row.
        pos: i64,
        /// The decode error.
        source: tally_events::Error,
    },
    /// The thread decoding ledger pages ahead of a rebuild died (a panic in the decoder).
    #[error("decoding ledger pages ahead of the fold failed")]
    ReadAhead(#[source] tokio::task::JoinError),
    /// Another process holds what this needed (e.g. a rebuild of the same projection runs).
    #[error("busy: {0}")]
    Busy(String),
    /// A projection's tables are being built; reads of them are not yet possible.
    #[error("projection `{0}` is being built")]
    Building(&'static str),
    /// A read asked for something out of bounds (e.g. too many buckets).
    #[error("invalid `{field}`: {message}")]
    InvalidQuery {
        /// Offending query parameter.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl Error {
    /// `e` from reading projection `name`'s live tables: [`Error::Building`] when a table does
    /// not exist (SQLSTATE 42P01: the projection was just attached and is being built), so the
    /// reader answers 503 with Retry-After rather than an internal error.
    pub fn reading(name: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
        move |e| match &e {
            sqlx::Error::Database(d) if d.code().as_deref() == Some("42P01") => {
                Error::Building(name)
            }
            _ => Error::Database(e),
        }
    }
}
