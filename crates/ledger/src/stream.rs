//! The JetStream stream Tally's events live on, and the subjects events are published to.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tally_events::{Envelope, MAX_PARTITIONS, partition_of};

use crate::Error;

/// JetStream's duplicate window: a publish retried within it with the same `Nats-Msg-Id` is stored
/// once. Two minutes covers client retries and a NATS failover (SPEC asks for at least 2 min).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Largest message the stream accepts; events are far smaller (see `MAX_EVENT_BYTES`).
pub const MAX_MESSAGE_BYTES: i32 = 1024 * 1024;

/// Everything that defines the stream. Two deployments with different names share nothing: the
/// subject prefix is derived from the name (`TALLY` keeps the documented `tally.v1`).
#[derive(Clone, Debug)]
pub struct StreamSettings {
    /// Stream name, e.g. `TALLY`.
    pub name: String,
    /// Usage partitions, fixed when the stream is created.
    pub partitions: u16,
    /// How long the stream keeps events (Postgres is the system of record). Zero = unlimited.
    pub max_age: Duration,
    /// Byte cap of the stream; -1 = unlimited.
    pub max_bytes: i64,
    /// Replicas (1 on a single server; 3 in a cluster).
    pub replicas: usize,
}

impl StreamSettings {
    /// Settings with the given name and defaults for the rest.
    pub fn named(name: &str) -> Self {
        StreamSettings {
            name: name.to_owned(),
            partitions: tally_events::DEFAULT_PARTITIONS,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: -1,
            replicas: 1,
        }
    }

    /// Subject prefix: `tally.v1` for the default stream, `tally.<name>.v1` otherwise.
    pub fn prefix(&self) -> String {
        if self.name == "TALLY" {
            "tally.v1".to_owned()
        } else {
            format!("tally.{}.v1", self.name.to_lowercase())
        }
    }

    /// The subject an event is published to: `<prefix>.usage.<partition>.<type>` for request
    /// events (partitioned by leaf subject), `<prefix>.config.<type>` otherwise.
    pub fn subject_for(&self, env: &Envelope) -> String {
        let t = env.event_type();
        match (&env.subject, t.is_usage()) {
            (Some(s), true) => format!(
                "{}.usage.{}.{}",
                self.prefix(),
                partition_of(s, self.partitions),
                t.as_str()
            ),
            (None, true) => format!("{}.usage.0.{}", self.prefix(), t.as_str()),
            _ => format!("{}.config.{}", self.prefix(), t.as_str()),
        }
    }

    /// Name of the dead-letter stream and its subject.
    pub fn dead_letter(&self) -> (String, String) {
        (
            format!("{}_DLQ", self.name),
            format!("tally-dlq.{}", self.name.to_lowercase()),
        )
    }

    fn description(&self) -> String {
        format!("tally events; partitions={}", self.partitions)
    }

    fn config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            description: Some(self.description()),
            subjects: vec![format!("{}.>", self.prefix())],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: self.max_age,
            max_bytes: self.max_bytes,
            max_messages: -1,
            max_message_size: MAX_MESSAGE_BYTES,
            num_replicas: self.replicas,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        }
    }

    fn dlq_config(&self) -> stream::Config {
        let (name, subject) = self.dead_letter();
        stream::Config {
            name,
            description: Some(format!("dead letters of {}", self.name)),
            subjects: vec![subject],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: Duration::ZERO,
            max_bytes: -1,
            max_messages: -1,
            max_message_size: MAX_MESSAGE_BYTES * 2,
            num_replicas: self.replicas,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        }
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |m: &str| {
            Err(Error::StreamConfig {
                stream: self.name.clone(),
                message: m.to_owned(),
            })
        };
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return bad("stream name must be 1..=64 of [A-Za-z0-9_-]");
        }
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return bad("partitions must be within 1..=1024");
        }
        Ok(())
    }
}

/// Create the stream and its dead-letter stream, or update them to these settings. Idempotent.
/// Refuses to change the partition count of an existing stream.
#[tracing::instrument(skip_all, fields(stream = %settings.name))]
pub async fn ensure_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<(), Error> {
    settings.validate()?;
    for config in [settings.config(), settings.dlq_config()] {
        ensure_one(js, settings, config).await?;
    }
    Ok(())
}

async fn ensure_one(
    js: &jetstream::Context,
    settings: &StreamSettings,
    config: stream::Config,
) -> Result<(), Error> {
    let context = format!("stream {}", config.name);
    match js.get_stream(&config.name).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| Error::jetstream(context.clone(), e))?;
            let old = info.config.description.clone().unwrap_or_default();
            if config.name == settings.name
                && old.contains("partitions=")
                && old != settings.description()
            {
                return Err(Error::StreamConfig {
                    stream: settings.name.clone(),
                    message: format!("exists as `{old}`; the partition count is fixed at creation"),
                });
            }
            js.update_stream(config.clone())
                .await
                .map_err(|e| Error::jetstream(context.clone(), e))?;
            tracing::info!(stream = %config.name, "stream updated");
        }
        Err(e) if is_not_found(&e) => {
            js.create_stream(config.clone())
                .await
                .map_err(|e| Error::jetstream(context.clone(), e))?;
            tracing::info!(stream = %config.name, "stream created");
        }
        Err(e) => return Err(Error::jetstream(context, e)),
    }
    Ok(())
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    use jetstream::context::GetStreamErrorKind as K;
    matches!(e.kind(), K::JetStream(j) if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// The stream's last sequence now.
pub async fn last_sequence(js: &jetstream::Context, name: &str) -> Result<u64, Error> {
    let context = || format!("stream {name}");
    let mut s = js
        .get_stream(name)
        .await
        .map_err(|e| Error::jetstream(context(), e))?;
    let info = s.info().await.map_err(|e| Error::jetstream(context(), e))?;
    Ok(info.state.last_sequence)
}
