//! Semantic validation of decoded events: the rules serde's types cannot express.

use crate::Error;
use crate::envelope::*;
use crate::model::*;

fn require<'a, T>(value: &'a Option<T>, field: &str) -> Result<&'a T, Error> {
    value
        .as_ref()
        .ok_or_else(|| Error::invalid(field, "is required for this event type"))
}

fn check_chain(chain: &[Subject], leaf: &Subject) -> Result<(), Error> {
    /// Chains are key → user → team → customer in practice; 16 leaves room while bounding the
    /// per-request fan-out into pools.
    const MAX_CHAIN_LEN: usize = 16;
    if chain.first() != Some(leaf) {
        return Err(Error::invalid(
            "data.chain",
            "must start with the event's subject",
        ));
    }
    if chain.len() > MAX_CHAIN_LEN {
        return Err(Error::invalid(
            "data.chain",
            format!("longer than {MAX_CHAIN_LEN}"),
        ));
    }
    Ok(())
}

fn check_opt_name(field: &str, v: &Option<String>) -> Result<(), Error> {
    v.as_deref().map_or(Ok(()), |s| validate_name(field, s))
}

fn check_positive(field: &str, v: i64) -> Result<(), Error> {
    if v <= 0 || v > MAX_AMOUNT {
        return Err(Error::invalid(
            field,
            format!("must be an integer in 1..={MAX_AMOUNT}"),
        ));
    }
    Ok(())
}

/// Validate a window's durations (time zone names are checked where they are resolved).
pub fn validate_window(field: &str, w: &Window) -> Result<(), Error> {
    match w {
        Window::Rolling { duration } => {
            parse_duration_minutes(&format!("{field}.duration"), duration).map(drop)
        }
        Window::Periodic { every, .. } => {
            parse_duration_minutes(&format!("{field}.every"), every).map(drop)
        }
        Window::Calendar {
            reset_at,
            week_start,
            ..
        } => {
            if let Some(r) = reset_at {
                let ok = chrono::NaiveTime::parse_from_str(r, "%H:%M").is_ok();
                if !ok {
                    return Err(Error::invalid(format!("{field}.reset_at"), "must be HH:MM"));
                }
            }
            const DAYS: [&str; 7] = [
                "monday",
                "tuesday",
                "wednesday",
                "thursday",
                "friday",
                "saturday",
                "sunday",
            ];
            match week_start {
                Some(d) if !DAYS.contains(&d.as_str()) => Err(Error::invalid(
                    format!("{field}.week_start"),
                    "must be a lowercase weekday name",
                )),
                _ => Ok(()),
            }
        }
        Window::Lifetime => Ok(()),
    }
}

impl Envelope {
    /// Check the rules of the event's type. Called by [`Envelope::decode`]; writers call it before
    /// publishing so nothing invalid reaches the stream from Tally itself.
    pub fn validate(&self) -> Result<(), Error> {
        check_opt_name("request_id", &self.request_id)?;
        match &self.data {
            EventData::AdmissionDecided(d) => {
                require(&self.request_id, "request_id")?;
                check_chain(&d.chain, require(&self.subject, "subject")?)?;
                check_opt_name("data.model", &d.model)?;
                check_opt_name("data.model_group", &d.model_group)?;
                d.estimate.validate("data.estimate")?;
                if d.admitted == d.reason.is_some() {
                    return Err(Error::invalid(
                        "data.reason",
                        "must be null exactly when admitted",
                    ));
                }
                if d.admission_id != self.id {
                    return Err(Error::invalid(
                        "data.admission_id",
                        "must equal the event id",
                    ));
                }
                Ok(())
            }
            EventData::UsageSettled(d) => {
                require(&self.request_id, "request_id")?;
                check_chain(&d.chain, require(&self.subject, "subject")?)?;
                validate_name("data.settlement_id", &d.settlement_id)?;
                check_opt_name("data.model", &d.model)?;
                check_opt_name("data.model_group", &d.model_group)?;
                d.usage.validate("data.usage")?;
                if d.matched_admission != d.admission_id.is_some() {
                    return Err(Error::invalid(
                        "data.admission_id",
                        "must be set exactly when matched_admission",
                    ));
                }
                Ok(())
            }
            EventData::ReservationReleased(_) | EventData::ReservationExpired(_) => {
                require(&self.request_id, "request_id").map(drop)
            }
            EventData::SubjectUpserted(d) => {
                let s = require(&self.subject, "subject")?;
                if d.parent.as_ref() == Some(s) {
                    return Err(Error::invalid(
                        "data.parent",
                        "a subject cannot be its own parent",
                    ));
                }
                d.groups
                    .iter()
                    .try_for_each(|g| validate_name("data.groups", g))
            }
            EventData::ModelGroupUpserted(d) | EventData::ModelGroupDeleted(d) => {
                validate_name("data.name", &d.name)?;
                d.models
                    .iter()
                    .try_for_each(|m| validate_name("data.models", m))
            }
            EventData::PolicyUpserted(d) => {
                validate_name("data.policy_id", &d.policy_id)?;
                check_opt_name("data.model_group", &d.model_group)?;
                check_positive("data.limit", d.limit)?;
                validate_window("data.window", &d.window)
            }
            EventData::PolicyDeleted(d) | EventData::GrantRevoked(d) => {
                validate_name("data.id", &d.id)
            }
            EventData::WindowReset(d) => validate_name("data.policy_id", &d.policy_id),
            EventData::GrantIssued(d) => {
                validate_name("data.grant_id", &d.grant_id)?;
                check_positive("data.amount", d.amount)?;
                if d.expires_at <= d.starts_at {
                    return Err(Error::invalid("data.expires_at", "must be after starts_at"));
                }
                Ok(())
            }
            EventData::CreditsAdjusted(d) => {
                require(&self.subject, "subject")?;
                if !(0..=MAX_AMOUNT).contains(&d.amount) {
                    return Err(Error::invalid(
                        "data.amount",
                        format!("must be within 0..={MAX_AMOUNT}"),
                    ));
                }
                if let Some(r) = &d.refill {
                    check_positive("data.refill.amount", r.amount)?;
                    if matches!(r.day, Some(day) if !(1..=31).contains(&day)) {
                        return Err(Error::invalid("data.refill.day", "must be within 1..=31"));
                    }
                }
                Ok(())
            }
            EventData::ThresholdCrossed(d) => validate_name("data.policy_id", &d.policy_id),
        }
    }
}
