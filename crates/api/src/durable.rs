//! Making an event durable before answering (SPEC §4.5): publish with the ack awaited, or spool
//! it under `--fail-open`; admissions whose publish is in doubt; threshold alerts; the stable ids
//! of facts several instances may publish at once.

use chrono::{DateTime, Utc};
use tally_events::{Envelope, EventData, ThresholdCrossed};
use tally_ledger::error::Chain;

use crate::AppState;
use crate::error::ApiError;

/// How often a publish awaiting its ack checks the connection: bounds how long a request waits
/// after NATS went away (instead of the whole ack timeout).
pub const CONNECTION_POLL: std::time::Duration = std::time::Duration::from_millis(10);
/// Most admissions kept in doubt at once: an outage with many clients retrying. Past it the
/// oldest is forgotten first (its retry is then decided afresh) rather than letting memory grow
/// without bound.
pub const MAX_IN_DOUBT: usize = 100_000;

impl AppState {
    /// Make `env` durable before the caller answers: published to JetStream with its ack, or,
    /// with `--fail-open`, fsynced to the local spool while NATS cannot take it (and while older
    /// spooled events still wait, so order holds). Fail-closed otherwise.
    pub(crate) async fn publish(&self, env: &Envelope) -> Result<(), ApiError> {
        let connected = self.0.nats.connection_state() == async_nats::connection::State::Connected;
        if let Some(spool) = &self.0.spool {
            if connected && spool.pending() == 0 {
                match self.publish_while_connected(env).await {
                    Ok(_) => return Ok(()),
                    Err(tally_ledger::Error::InvalidEvent(e)) => return Err(e.into()),
                    // The ack may still have been lost after the server stored it; the spooled
                    // copy then carries the same id and is deduplicated.
                    Err(e) => {
                        tracing::warn!(error = %Chain(&e), "publish failed; spooling")
                    }
                }
            }
            return spool.append(env).await.map_err(|e| {
                self.metrics().unavailable.inc();
                ApiError::from(e)
            });
        }
        self.publish_direct(env).await
    }

    /// Publish and await the ack, never spooling: fail-closed. Admin writes always take this
    /// path, since a configuration change held in one instance's spool would leave the instances
    /// deciding under different rules for the whole outage.
    pub(crate) async fn publish_direct(&self, env: &Envelope) -> Result<(), ApiError> {
        let connected = self.0.nats.connection_state() == async_nats::connection::State::Connected;
        // While the connection is down the client would buffer the message and send it after
        // reconnecting, possibly after we answered 503: refuse at once instead, so an event we
        // reported as not recorded does not appear later.
        if !connected {
            self.metrics().unavailable.inc();
            return Err(ApiError::Unavailable("NATS is disconnected".into()));
        }
        self.publish_while_connected(env).await.map_err(|e| {
            self.metrics().unavailable.inc();
            ApiError::from(e)
        })
    }

    /// Publish and await the ack, but stop waiting as soon as the connection drops: the client
    /// would otherwise hold the caller for the whole ack timeout. The message may still reach the
    /// stream after the reconnect; the answer then says 503 for an event that landed, and a retry
    /// with the same request id returns what was recorded (a spooled copy has the same id and is
    /// deduplicated).
    async fn publish_while_connected(&self, env: &Envelope) -> Result<(), tally_ledger::Error> {
        let nats = &self.0.nats;
        let dropped = async {
            loop {
                tokio::time::sleep(CONNECTION_POLL).await;
                if nats.connection_state() != async_nats::connection::State::Connected {
                    return;
                }
            }
        };
        tokio::select! {
            r = self.0.publisher.publish(env) => r.map(drop),
            _ = dropped => Err(tally_ledger::Error::Publish {
                context: "NATS disconnected before the ack arrived",
                source: None,
            }),
        }
    }

    /// Remember an admission whose publish failed: it may still land (see `in_doubt`).
    pub(crate) fn keep_in_doubt(&self, env: Envelope) {
        let Some(rid) = env.request_id.clone() else {
            return;
        };
        let mut m = self.0.in_doubt.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&rid);
        m.insert(rid, (std::time::Instant::now(), env));
    }

    pub(crate) fn take_in_doubt(&self, request_id: &str) -> Option<Envelope> {
        let mut m = self.0.in_doubt.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&request_id.to_owned()).map(|(_, env)| env)
    }

    /// Drop in-doubt admissions older than `horizon` (their reservations would have expired).
    pub fn sweep_in_doubt(&self, horizon: std::time::Duration) {
        let mut m = self.0.in_doubt.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, (at, _)| at.elapsed() < horizon);
    }

    /// Publish `threshold.crossed` for each alert due. The event id is derived from the pool and
    /// window, so instances that race on the same crossing publish one event (JetStream
    /// de-duplicates on the id, the ledger on its key). Best effort: a failure is logged (the
    /// next settlement or admission on that pool tries again), the request stands.
    pub(crate) async fn publish_alerts(&self, alerts: Vec<ThresholdCrossed>, at: DateTime<Utc>) {
        for a in alerts {
            let key = format!(
                "{}|{}|{:?}",
                a.policy_id,
                a.subject,
                a.window.map(|w| w.start)
            );
            let mut env = Envelope::new(
                EventData::ThresholdCrossed(a.clone()),
                at,
                None,
                Some(a.subject.clone()),
            );
            env.id = derived_id(&key);
            match self.publish(&env).await {
                Ok(()) => self.quota().apply(&env),
                Err(e) => {
                    tracing::warn!(error = %Chain(&e), policy_id = %a.policy_id, "threshold alert not published")
                }
            }
        }
    }
}

/// A stable event id for a fact several instances may publish at once (an alert, an expiry):
/// UUID v8 from two FNV-1a hashes of `key`, so JetStream and the ledger keep one copy.
pub(crate) fn derived_id(key: &str) -> uuid::Uuid {
    let h = |seed: u64| {
        key.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&h(0xcbf2_9ce4_8422_2325).to_be_bytes());
    bytes[8..].copy_from_slice(&h(0x8422_2325_cbf2_9ce4).to_be_bytes());
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// SPEC §4.5: an admission that could not be recorded answers `503 {"reason":"unavailable"}`.
pub(crate) fn unavailable_admission(e: ApiError, request_id: &str) -> ApiError {
    if let ApiError::Unavailable(cause) = &e {
        let detail = Chain(cause.as_ref());
        tracing::warn!(%detail, request_id, "admission not recorded");
    }
    e
}
