//! Semantic validation of decoded events: the rules serde's types cannot express. Configuration
//! rules are the ones the API applies ([`crate::rules`]), named under `data.`; the rest bound
//! what a hostile or buggy publisher could put on the stream (times, chain length, names), so no
//! event that decodes can make a fold overflow a date or walk a chain without end.

use crate::Error;
use crate::envelope::*;
use crate::model::*;
use crate::rules::{self, MAX_CHAIN_LEN};

fn require<'a, T>(value: &'a Option<T>, field: &str) -> Result<&'a T, Error> {
    value
        .as_ref()
        .ok_or_else(|| Error::invalid(field, "is required for this event type"))
}

fn check_chain(chain: &[Subject], leaf: &Subject) -> Result<(), Error> {
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

impl Envelope {
    /// Check the rules of the event's type. Called by [`Envelope::decode`]; writers call it before
    /// publishing so nothing invalid reaches the stream from Tally itself.
    pub fn validate(&self) -> Result<(), Error> {
        check_opt_name("request_id", &self.request_id)?;
        rules::validate_instant("occurred_at", self.occurred_at)?;
        match &self.data {
            EventData::AdmissionDecided(d) => self.validate_admission(d),
            EventData::UsageSettled(d) => self.validate_settlement(d),
            EventData::ReservationReleased(_) | EventData::ReservationExpired(_) => {
                require(&self.request_id, "request_id").map(drop)
            }
            EventData::SubjectUpserted(d) => {
                let s = require(&self.subject, "subject")?;
                rules::validate_subject_upsert("data", s, d)
            }
            EventData::SubjectDeleted(_) => {
                let s = require(&self.subject, "subject")?;
                rules::validate_chain_subject("subject", s)
            }
            EventData::ModelGroupUpserted(d) => {
                rules::validate_model_group("data", &d.name, &d.models)
            }
            EventData::ModelGroupDeleted(d) => rules::validate_id("data.name", &d.name),
            EventData::PolicyUpserted(d) => {
                rules::validate_id("data.policy_id", &d.policy_id)?;
                rules::validate_policy("data", d).map(drop)
            }
            EventData::PolicyDeleted(d) | EventData::GrantRevoked(d) => {
                rules::validate_id("data.id", &d.id)
            }
            EventData::WindowReset(d) => {
                rules::validate_id("data.policy_id", &d.policy_id)?;
                rules::validate_instant("data.at", d.at)
            }
            EventData::GrantIssued(d) => {
                rules::validate_id("data.grant_id", &d.grant_id)?;
                rules::validate_grant("data", d)
            }
            EventData::CreditsAdjusted(d) => {
                let s = require(&self.subject, "subject")?;
                rules::validate_chain_subject("subject", s)?;
                rules::validate_credits("data", d)
            }
            EventData::ThresholdCrossed(d) => rules::validate_id("data.policy_id", &d.policy_id),
        }
    }

    fn validate_admission(&self, d: &AdmissionDecided) -> Result<(), Error> {
        require(&self.request_id, "request_id")?;
        check_chain(&d.chain, require(&self.subject, "subject")?)?;
        check_opt_name("data.model", &d.model)?;
        check_opt_name("data.model_group", &d.model_group)?;
        d.estimate.validate("data.estimate")?;
        rules::validate_instant("data.received_at", d.received_at)?;
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
        if d.checks.len() > rules::MAX_CHECKS {
            return Err(Error::invalid(
                "data.checks",
                format!("more than {}", rules::MAX_CHECKS),
            ));
        }
        Ok(())
    }

    fn validate_settlement(&self, d: &UsageSettled) -> Result<(), Error> {
        require(&self.request_id, "request_id")?;
        check_chain(&d.chain, require(&self.subject, "subject")?)?;
        validate_name("data.settlement_id", &d.settlement_id)?;
        check_opt_name("data.model", &d.model)?;
        check_opt_name("data.model_group", &d.model_group)?;
        d.usage.validate("data.usage")?;
        rules::validate_instant("data.window_at", d.window_at)?;
        if d.matched_admission != d.admission_id.is_some() {
            return Err(Error::invalid(
                "data.admission_id",
                "must be set exactly when matched_admission",
            ));
        }
        Ok(())
    }
}
