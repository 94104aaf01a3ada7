//! Publishing events: `Nats-Msg-Id` = event id, the ack awaited, in-flight publishes bounded.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::Publish};
use tally_events::Envelope;
use tokio::sync::Semaphore;

use crate::{Error, StreamSettings};

/// Most publishes awaiting their ack at once per process. Without a bound, a slow or partitioned
/// server lets unacked publishes pile up in memory without limit (async-nats#1285); 4096 keeps a
/// 2-core machine's pipeline full (raw acked publish ≈ 100k/s at 0.5 ms p99) with room to spare.
pub const MAX_IN_FLIGHT_PUBLISHES: usize = 4096;
/// How long one publish may wait for its ack before the caller is told it failed. A caller that
/// then retries with the same event id is deduplicated by the stream's duplicate window.
pub const PUBLISH_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// The context of a publish whose ack did not come within [`PUBLISH_ACK_TIMEOUT`].
const NO_ACK: &str = "no ack within the publish timeout";

/// Publishes validated events to the stream.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    settings: Arc<StreamSettings>,
    in_flight: Arc<Semaphore>,
    publish_seconds: prometheus::Histogram,
}

impl Publisher {
    /// A publisher on an existing stream.
    pub fn new(js: jetstream::Context, settings: StreamSettings) -> Self {
        Publisher {
            js,
            settings: Arc::new(settings),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT_PUBLISHES)),
            publish_seconds: crate::metrics::seconds_histogram(
                "tally_jetstream_publish_seconds",
                "One event published to JetStream until its ack (acknowledged publishes), in seconds.",
                &[],
            ),
        }
    }

    /// Latency of every acknowledged single publish (for `/metrics`).
    pub fn publish_seconds(&self) -> &prometheus::Histogram {
        &self.publish_seconds
    }

    /// The stream settings.
    pub fn settings(&self) -> &StreamSettings {
        &self.settings
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Validate, publish and wait for the ack. Returns the stream sequence (the original one if
    /// the stream recognised a duplicate).
    #[tracing::instrument(skip_all, fields(event_id = %env.id, event_type = env.event_type().as_str()))]
    pub async fn publish(&self, env: &Envelope) -> Result<u64, Error> {
        env.validate()?;
        let subject = self.settings.subject_for(env);
        self.publish_raw(subject, env.id.to_string(), env.encode().into())
            .await
    }

    /// Publish raw bytes with a message id (used for dead letters and by tests that inject
    /// malformed messages).
    pub async fn publish_raw(
        &self,
        subject: String,
        msg_id: String,
        payload: bytes::Bytes,
    ) -> Result<u64, Error> {
        let publish = Publish::build().message_id(msg_id).payload(payload);
        self.send(subject, publish).await
    }
}

impl Publisher {
    /// The stream sequence of the last message on `subject`; 0 when the stream holds none (never
    /// written, or aged out).
    pub async fn last_sequence_on(&self, subject: &str) -> Result<u64, Error> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind as Kind;
        let stream = self
            .js
            .get_stream_no_info(&self.settings.name)
            .await
            .map_err(|e| Error::jetstream(format!("stream {}", self.settings.name), e))?;
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == Kind::NoMessageFound => Ok(0),
            Err(e) => Err(Error::jetstream(format!("last message on {subject}"), e)),
        }
    }

    /// Publish `env` only if the last message on its subject is still the one at `expected`
    /// (0: none): JetStream's optimistic concurrency (`Nats-Expected-Last-Subject-Sequence`).
    /// Returns the new sequence, or [`Error::ConcurrentWrite`] when another writer got there first.
    #[tracing::instrument(skip_all, fields(event_id = %env.id, expected))]
    pub async fn publish_if_last(&self, env: &Envelope, expected: u64) -> Result<u64, Error> {
        env.validate()?;
        let subject = self.settings.subject_for(env);
        let publish = Publish::build()
            .message_id(env.id.to_string())
            .expected_last_subject_sequence(expected)
            .payload(env.encode().into());
        self.send(subject, publish).await
    }

    /// Send one publish within the in-flight bound and wait for its ack (at most
    /// [`PUBLISH_ACK_TIMEOUT`]); a stale expected-last-sequence header is
    /// [`Error::ConcurrentWrite`]. Returns the stream sequence.
    async fn send(&self, subject: String, publish: Publish) -> Result<u64, Error> {
        use async_nats::jetstream::context::PublishErrorKind as Kind;
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|e| Error::publish("the in-flight limit was closed", e))?;
        let started = std::time::Instant::now();
        let ack = tokio::time::timeout(PUBLISH_ACK_TIMEOUT, async {
            let fut = self
                .js
                .send_publish(subject.clone(), publish)
                .await
                .map_err(|e| Error::publish("sending", e))?;
            fut.await.map_err(|e| match e.kind() {
                Kind::WrongLastSequence => Error::ConcurrentWrite { subject },
                _ => Error::publish("awaiting the ack", e),
            })
        })
        .await
        .map_err(|e| Error::publish(NO_ACK, e))??;
        self.publish_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(ack.sequence)
    }

    /// Publish `(subject, msg_id, payload)` records in order, pipelined on the one connection (so
    /// the server stores them in the order given), then await the acks in order. Returns how many
    /// leading records are acknowledged; on error also how many were before the failure (the
    /// caller resends from there; later ones that did land are deduplicated by their id). A record
    /// with an empty subject is an unreadable spool line: it is skipped and counts as done.
    pub async fn publish_ordered(
        &self,
        records: Vec<(String, String, bytes::Bytes)>,
    ) -> Result<usize, (usize, Error)> {
        let mut acks = Vec::with_capacity(records.len());
        for (subject, msg_id, payload) in records {
            if subject.is_empty() {
                acks.push(None);
                continue;
            }
            let publish = Publish::build().message_id(msg_id).payload(payload);
            match self.js.send_publish(subject, publish).await {
                Ok(fut) => acks.push(Some(fut)),
                Err(e) => {
                    let sent = acks.len();
                    return match await_in_order(acks).await {
                        Ok(n) if n == sent => Err((n, Error::publish("sending", e))),
                        Ok(n) => Err((
                            n,
                            Error::Publish {
                                context: "an ack before the failed send is missing",
                                source: None,
                            },
                        )),
                        Err(failed) => Err(failed),
                    };
                }
            }
        }
        await_in_order(acks).await
    }
}

/// Await acks in order; the count of leading successes, or it with the first failure.
async fn await_in_order(
    acks: Vec<Option<jetstream::context::PublishAckFuture>>,
) -> Result<usize, (usize, Error)> {
    let mut done = 0;
    for ack in acks {
        if let Some(fut) = ack {
            match tokio::time::timeout(PUBLISH_ACK_TIMEOUT, fut.into_future()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err((done, Error::publish("awaiting the ack", e))),
                Err(e) => return Err((done, Error::publish(NO_ACK, e))),
            }
        }
        done += 1;
    }
    Ok(done)
}
