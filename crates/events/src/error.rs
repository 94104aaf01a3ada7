//! The crate's one error type.

/// Why an event or a value could not be accepted.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// The bytes are not JSON of the envelope's shape (or a field has the wrong type).
    #[error("malformed event: {message}")]
    Malformed {
        /// Path of the offending field, e.g. `data.usage.cost`, when known.
        field: Option<String>,
        /// What serde said.
        message: String,
    },
    /// The `type` is not one this version knows.
    #[error("unknown event type `{0}`")]
    UnknownType(String),
    /// The `schema` is newer than this reader supports (or zero).
    #[error("unsupported schema version {0} (this reader supports 1..={max})", max = crate::SCHEMA_VERSION)]
    UnsupportedSchema(u32),
    /// A quota snapshot could not be read.
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    /// A field is well-typed but its value is not allowed.
    #[error("invalid `{field}`: {message}")]
    Invalid {
        /// Path of the offending field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl Error {
    /// Build an [`Error::Invalid`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The field the error is about, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::Malformed { field, .. } => field.as_deref(),
            Error::Invalid { field, .. } => Some(field),
            Error::UnknownType(_) => Some("type"),
            Error::UnsupportedSchema(_) => Some("schema"),
            Error::Snapshot(_) => None,
        }
    }
}

/// Why a quota snapshot was refused (each a reason to fall back to an older one).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    /// Shorter than its header says (a torn or cut write).
    #[error("truncated ({0} bytes)")]
    Truncated(usize),
    /// Not a snapshot at all.
    #[error("bad magic")]
    Magic,
    /// Written in a format this build does not read.
    #[error("format {0} is not the format this build reads ({fmt})", fmt = crate::quota::SNAPSHOT_FORMAT)]
    Format(u32),
    /// The body does not match its checksum.
    #[error("checksum mismatch: header says {expected:08x}, body hashes to {found:08x}")]
    Checksum {
        /// In the header.
        expected: u32,
        /// Of the body.
        found: u32,
    },
    /// The body does not decode.
    #[error("body does not decode: {0}")]
    Body(#[source] postcard::Error),
    /// A policy in the body no longer compiles to a window.
    #[error("policy {policy_id}: {source}")]
    Policy {
        /// The policy.
        policy_id: String,
        /// Why its window does not compile.
        #[source]
        source: Box<Error>,
    },
}
