//! The ledger crate's one error type. Foreign errors are kept as `#[source]` causes, never
//! flattened into strings; [`Chain`] prints an error with its causes for a log line.

/// A foreign error kept as the cause of one of ours: async-nats has one error type per call, so
/// the JetStream, publish and spool variants box theirs.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Displays an error followed by its `source()` chain, `outer: inner: innermost`: what a log line
/// needs, since an error's own message names only its level. A cause whose text the level above
/// already ends with (errors that print their source themselves) is not repeated.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut above = self.0.to_string();
        f.write_str(&above)?;
        let mut next = self.0.source();
        // Bounded: a cyclic chain (a bug elsewhere) must not hang a log call.
        for _ in 0..MAX_CHAIN_DEPTH {
            let Some(e) = next else { return Ok(()) };
            let text = e.to_string();
            if !above.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            above = text;
            next = e.source();
        }
        Ok(())
    }
}

/// Most causes [`Chain`] prints; real chains are 2-4 deep.
pub const MAX_CHAIN_DEPTH: usize = 16;

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
    #[error("jetstream: {context}")]
    JetStream {
        /// What was being done (names the stream or consumer).
        context: String,
        /// The client's error.
        #[source]
        source: Cause,
    },
    /// Publishing an event failed or its ack did not arrive.
    #[error("publish failed: {context}")]
    Publish {
        /// What failed.
        context: &'static str,
        /// The client's error, when there is one (not for a disconnect noticed while waiting).
        #[source]
        source: Option<Cause>,
    },
    /// The event is invalid and was not published.
    #[error("invalid event: {0}")]
    InvalidEvent(#[from] tally_events::Error),
    /// A database call failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying migrations failed.
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
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
    #[error("spool: {context}")]
    Spool {
        /// What failed, naming the file.
        context: String,
        /// The I/O error or the dead task's, when there is one.
        #[source]
        source: Option<Cause>,
    },
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

impl Error {
    /// A failed JetStream request: `context` says what was asked.
    pub fn jetstream(context: impl Into<String>, source: impl Into<Cause>) -> Self {
        Error::JetStream {
            context: context.into(),
            source: source.into(),
        }
    }

    /// A failed publish, with the client's error.
    pub fn publish(context: &'static str, source: impl Into<Cause>) -> Self {
        Error::Publish {
            context,
            source: Some(source.into()),
        }
    }

    /// A spool failure with no foreign cause (a limit, a lock held elsewhere, a bad cursor).
    pub fn spool(context: impl Into<String>) -> Self {
        Error::Spool {
            context: context.into(),
            source: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Chain, Error};

    #[test]
    fn chain_prints_every_cause() {
        let io = std::io::Error::other("disk on fire");
        let e = Error::Spool {
            context: "appending to /x/spool.log".into(),
            source: Some(io.into()),
        };
        assert_eq!(e.to_string(), "spool: appending to /x/spool.log");
        assert_eq!(
            Chain(&e).to_string(),
            "spool: appending to /x/spool.log: disk on fire"
        );
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn chain_does_not_repeat_a_cause_the_message_already_carries() {
        let e = Error::Database(sqlx::Error::Protocol("bad frame".into()));
        assert_eq!(
            Chain(&e).to_string(),
            "database: encountered unexpected or invalid data: bad frame"
        );
    }
}
