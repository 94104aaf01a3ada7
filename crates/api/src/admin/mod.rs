//! Admin handlers (SPEC §6): subjects, model groups, policies, resets, grants and credits, one
//! file per resource. Every write is validated by the shared rules (`tally_events::rules`, so the
//! client hears the field name it sent) and against the live configuration, published as an event
//! (awaiting the ack) and applied to this instance's quota state before the answer, so the next
//! admission here sees it at once and other instances within their tail lag.

pub(crate) mod credits;
pub(crate) mod grants;
pub(crate) mod model_groups;
pub(crate) mod policies;
pub(crate) mod pools;
pub(crate) mod subjects;

use std::sync::atomic::Ordering;

use serde::{Deserialize, Deserializer};
use tally_events::{Envelope, Subject};

use crate::AppState;
use crate::error::ApiError;

pub use credits::CreditsIn;
pub use grants::GrantIn;
pub use model_groups::ModelGroupIn;
pub use policies::{PolicyIn, ResetIn};
pub use pools::MAX_POOLS_PER_CALL;
pub use subjects::SubjectIn;

/// Distinguish an absent field (keep) from an explicit `null` (clear): the trap Bifrost's
/// reviewers found in "clear" semantics (SPEC v2 §6 "Absent vs null").
fn double_option<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

fn subject_param(field: &str, text: &str) -> Result<Subject, ApiError> {
    Subject::parse(text).map_err(|m| ApiError::invalid(field, m))
}

/// The admin lock, held from before validation until the write is applied, with the stream
/// sequence the state reflected when it was taken.
struct AdminGuard<'a> {
    _lock: tokio::sync::MutexGuard<'a, ()>,
    validated_at: u64,
}

impl AppState {
    /// Take the admin lock and note the stream sequence this instance's state reflects now,
    /// before the handler validates against that state.
    async fn admin_guard(&self) -> AdminGuard<'_> {
        let lock = self.0.admin_lock.lock().await;
        AdminGuard {
            _lock: lock,
            validated_at: self.0.tail_seq.load(Ordering::Acquire),
        }
    }

    /// Publish a configuration event and apply it here. Serialized by the admin lock so the
    /// validation a handler did still holds when the event is applied. Never spooled, even with
    /// `--fail-open`: every instance must see a configuration change.
    ///
    /// Instances validate against their own folded state, so two of them could each accept half
    /// of a conflict (the same model into two groups, the two halves of a cycle). The write is
    /// therefore conditional: it goes ahead only if this instance has folded the last event on
    /// its config subject, and JetStream refuses it if another lands there in between
    /// (`Nats-Expected-Last-Subject-Sequence`). Either way the loser gets a 409 and writes nothing.
    async fn write_config(&self, guard: &AdminGuard<'_>, env: Envelope) -> Result<(), ApiError> {
        env.validate()?;
        let publisher = &self.0.publisher;
        let subject = publisher.settings().subject_for(&env);
        if self.0.nats.connection_state() != async_nats::connection::State::Connected {
            return Err(ApiError::Unavailable("NATS is disconnected".into()));
        }
        let last = publisher.last_sequence_on(&subject).await?;
        let own = self.own_config_seq().get(&subject).copied();
        // What the handler validated against, not what the tail has folded since: an event the
        // tail applies after the validation was not checked against (the race of two instances
        // writing the two halves of a conflict at once).
        let folded = last <= guard.validated_at || own == Some(last);
        if !folded {
            return Err(ApiError::Conflict {
                field: None,
                message: crate::error::CONCURRENT_CONFIG_WRITE.into(),
            });
        }
        let seq = publisher.publish_if_last(&env, last).await?;
        self.own_config_seq().insert(subject, seq);
        self.quota().apply(&env);
        Ok(())
    }

    fn own_config_seq(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u64>> {
        self.0
            .own_config_seq
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}
