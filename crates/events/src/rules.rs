//! One validator per configuration rule (SPEC v2 §3, §6). The API calls them with the field names
//! the client sent (`prefix` = ""), the event validator with `data` (so a hand-made event on the
//! stream is refused naming `data.window.reset_at`). Both therefore accept and refuse exactly the
//! same values, and a value the API accepted can never be refused later by a stricter reader.

use chrono::{DateTime, Timelike, Utc};

use crate::Error;
use crate::envelope::{CreditsAdjusted, GrantIssued, PolicyUpserted, SubjectUpserted};
use crate::model::*;
use crate::window::WindowSpec;

/// Earliest event time, anchor or grant bound accepted. Every window computation is defined far
/// beyond this range, so no instant that passes validation can overflow date arithmetic.
pub const MIN_INSTANT_YEAR: i32 = 1970;
/// Latest year accepted (exclusive upper bound: instants before 2200-01-01).
pub const MAX_INSTANT_YEAR: i32 = 2199;
/// Deepest chain (SPEC v2 §4): a `parent` that would make any chain longer is refused with 409
/// naming `parent`, so a chain is never silently cut. Real hierarchies are key → user → team →
/// customer; 16 leaves room and bounds the pools one request touches.
pub const MAX_CHAIN_LEN: usize = 16;
/// Most policies written for one subject (or one `group:`): bounds the checks of an admission.
pub const MAX_POLICIES_PER_SUBJECT: usize = 256;
/// Most checks one admission may carry: an admission event must fit in one stream message (each
/// check is about 300 bytes encoded; see `MAX_EVENT_BYTES`). A configuration that would apply
/// more to one request is refused at admission time with 409, never recorded half.
pub const MAX_CHECKS: usize = 1024;
/// Most groups one subject may carry.
pub const MAX_GROUPS_PER_SUBJECT: usize = 32;
/// Most models in one model group.
pub const MAX_MODELS_PER_GROUP: usize = 1024;
/// Longest policy, grant, model-group or credit-write id (a path segment or a key in memory).
pub const MAX_ID_LEN: usize = 128;

/// `prefix.name`, or `name` when the prefix is empty.
pub fn field(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

/// An instant Tally computes windows for: within years 1970..=2199.
pub fn validate_instant(field: &str, t: DateTime<Utc>) -> Result<(), Error> {
    use chrono::Datelike;
    if (MIN_INSTANT_YEAR..=MAX_INSTANT_YEAR).contains(&t.year()) {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("must lie between {MIN_INSTANT_YEAR} and {MAX_INSTANT_YEAR}"),
        ))
    }
}

/// An id (policy, grant, model group, credit write): a name of at most [`MAX_ID_LEN`] bytes.
pub fn validate_id(field: &str, id: &str) -> Result<(), Error> {
    validate_name(field, id)?;
    if id.len() > MAX_ID_LEN {
        return Err(Error::invalid(
            field,
            format!("longer than {MAX_ID_LEN} bytes"),
        ));
    }
    Ok(())
}

/// A limit or grant amount: an integer in `1..=MAX_AMOUNT` (a policy without a positive limit
/// would enforce nothing).
pub fn validate_positive(field: &str, v: i64) -> Result<(), Error> {
    if (1..=MAX_AMOUNT).contains(&v) {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("must be an integer in 1..={MAX_AMOUNT}"),
        ))
    }
}

/// A credit amount: an integer in `0..=MAX_AMOUNT`.
pub fn validate_amount(field: &str, v: i64) -> Result<(), Error> {
    if (0..=MAX_AMOUNT).contains(&v) {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("must be an integer in 0..={MAX_AMOUNT}"),
        ))
    }
}

/// A group label: it is addressed as the subject `group:<label>`, so it must be a valid subject
/// id, `[A-Za-z0-9._:@-]{1,128}`.
pub fn validate_group_label(field: &str, g: &str) -> Result<(), Error> {
    let ok = !g.is_empty()
        && g.len() <= MAX_SUBJECT_ID_LEN
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("must be 1..={MAX_SUBJECT_ID_LEN} of [A-Za-z0-9._:@-]"),
        ))
    }
}

/// A subject that configuration is written for: never a `group:` (groups are labels; a group
/// policy is written for `group:<label>` through its `subject` field, never as a subject).
pub fn validate_chain_subject(field: &str, s: &Subject) -> Result<(), Error> {
    if s.kind() == "group" {
        return Err(Error::invalid(
            field,
            "a group is a label on subjects (a per-member template), never a chain subject",
        ));
    }
    Ok(())
}

/// `subject.upserted` / `PUT /v1/subjects/{subject}`: the parent is a chain subject, and the
/// groups are valid and few. Cycles (a subject as its own parent included) and depth need the stored
/// configuration and are checked by [`crate::quota::Config::parent_conflict`].
pub fn validate_subject_upsert(
    prefix: &str,
    subject: &Subject,
    d: &SubjectUpserted,
) -> Result<(), Error> {
    validate_chain_subject(&field(prefix, "subject"), subject)?;
    if let Some(p) = &d.parent {
        // A subject as its own parent is the shortest cycle: refused with the other cycles
        // (409, SPEC §4) by `parent_conflict`, which the fold applies too.
        if p.kind() == "group" {
            return Err(Error::invalid(
                field(prefix, "parent"),
                "a group is a per-member template, never a parent (a shared pool is a chain subject)",
            ));
        }
    }
    if d.groups.len() > MAX_GROUPS_PER_SUBJECT {
        return Err(Error::invalid(
            field(prefix, "groups"),
            format!("at most {MAX_GROUPS_PER_SUBJECT}"),
        ));
    }
    for (i, g) in d.groups.iter().enumerate() {
        validate_group_label(&field(prefix, &format!("groups[{i}]")), g)?;
    }
    Ok(())
}

/// A model group write: a valid name and 1..=[`MAX_MODELS_PER_GROUP`] valid model names.
pub fn validate_model_group(prefix: &str, name: &str, models: &[String]) -> Result<(), Error> {
    validate_id(&field(prefix, "name"), name)?;
    if models.is_empty() || models.len() > MAX_MODELS_PER_GROUP {
        return Err(Error::invalid(
            field(prefix, "models"),
            format!("must list 1..={MAX_MODELS_PER_GROUP} models"),
        ));
    }
    for (i, m) in models.iter().enumerate() {
        validate_name(&field(prefix, &format!("models[{i}]")), m)?;
    }
    Ok(())
}

/// A window as written: it compiles, and a periodic `anchor` is a whole minute within range
/// (SPEC v2 §3: usage is counted in whole minutes, so every boundary is one).
pub fn validate_window(prefix: &str, w: &Window) -> Result<WindowSpec, Error> {
    let wf = field(prefix, "window");
    if let Window::Periodic {
        anchor: Some(a), ..
    } = w
    {
        let af = format!("{wf}.anchor");
        validate_instant(&af, *a)?;
        if a.second() != 0 || a.nanosecond() != 0 {
            return Err(Error::invalid(
                af,
                "must be a whole minute (usage is counted per minute, so every boundary is one)",
            ));
        }
    }
    WindowSpec::compile_in(&wf, w, Utc::now())
}

/// `policy.upserted` / `PUT /v1/policies/{id}` (the id is checked by the caller, who knows where
/// the client wrote it).
pub fn validate_policy(prefix: &str, p: &PolicyUpserted) -> Result<WindowSpec, Error> {
    if let Some(g) = &p.model_group {
        validate_id(&field(prefix, "model_group"), g)?;
    }
    validate_positive(&field(prefix, "limit"), p.limit)?;
    validate_window(prefix, &p.window)
}

/// The window kinds a grant may be restricted to.
pub const WINDOW_KINDS: [&str; 4] = ["rolling", "calendar", "periodic", "lifetime"];

/// `grant.issued` / `POST /v1/grants` (the id is checked by the caller). The subject may be a
/// chain subject or `group:<label>` (raising every member's template pool).
pub fn validate_grant(prefix: &str, g: &GrantIssued) -> Result<(), Error> {
    if let Some(mg) = &g.model_group {
        validate_id(&field(prefix, "model_group"), mg)?;
    }
    validate_positive(&field(prefix, "amount"), g.amount)?;
    if let Some(k) = &g.window_kind
        && !WINDOW_KINDS.contains(&k.as_str())
    {
        return Err(Error::invalid(
            field(prefix, "window_kind"),
            "must be rolling, calendar, periodic or lifetime",
        ));
    }
    validate_instant(&field(prefix, "starts_at"), g.starts_at)?;
    validate_instant(&field(prefix, "expires_at"), g.expires_at)?;
    if g.expires_at <= g.starts_at {
        return Err(Error::invalid(
            field(prefix, "expires_at"),
            "must be after starts_at",
        ));
    }
    Ok(())
}

/// `credits.adjusted` / `POST /v1/credits/{subject}` (SPEC v2 §6).
pub fn validate_credits(prefix: &str, c: &CreditsAdjusted) -> Result<(), Error> {
    if let Some(id) = &c.id {
        validate_id(&field(prefix, "id"), id)?;
    }
    validate_amount(&field(prefix, "amount"), c.amount)?;
    if let Some(r) = &c.refill {
        if c.op == CreditOp::Clear {
            return Err(Error::invalid(
                field(prefix, "refill"),
                "a cleared balance has no refill",
            ));
        }
        validate_refill(&field(prefix, "refill"), r)?;
    }
    Ok(())
}

/// A refill schedule: a positive amount; `day` only for monthly refills, within 1..=31 (clamped
/// to the month's last day); monthly without `day` refills on day 1.
pub fn validate_refill(prefix: &str, r: &Refill) -> Result<(), Error> {
    validate_positive(&field(prefix, "amount"), r.amount)?;
    match (r.interval, r.day) {
        (RefillInterval::Daily, Some(_)) => Err(Error::invalid(
            field(prefix, "day"),
            "only monthly refills have a day (daily refills happen at 00:00 UTC)",
        )),
        (RefillInterval::Monthly, Some(d)) if !(1..=31).contains(&d) => Err(Error::invalid(
            field(prefix, "day"),
            "must be 1..=31 (clamped to the month's last day)",
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn periodic(anchor: &str) -> Window {
        Window::Periodic {
            every: "90m".into(),
            anchor: Some(anchor.parse().unwrap()),
        }
    }

    #[test]
    fn anchors_must_be_whole_minutes() {
        assert!(validate_window("", &periodic("2026-01-01T00:15:00Z")).is_ok());
        for bad in ["2026-01-01T00:15:30Z", "2026-01-01T00:15:00.5Z"] {
            let e = validate_window("", &periodic(bad)).unwrap_err();
            assert_eq!(e.field(), Some("window.anchor"), "{bad}");
        }
        let e = validate_window("data", &periodic("2026-01-01T00:15:01Z")).unwrap_err();
        assert_eq!(e.field(), Some("data.window.anchor"));
    }

    #[test]
    fn reset_times_and_durations_are_digits_only() {
        let cal = |r: &str| Window::Calendar {
            unit: CalendarUnit::Day,
            timezone: None,
            reset_at: Some(r.into()),
            week_start: None,
        };
        for bad in [
            "+4:00", "4:00", "04:0", "24:00", "04:60", "04-00", "0a:00", "04:00:00",
        ] {
            let e = validate_window("", &cal(bad)).unwrap_err();
            assert_eq!(e.field(), Some("window.reset_at"), "{bad}");
        }
        assert!(validate_window("", &cal("23:59")).is_ok());
        for bad in [
            "+5h",
            "-5h",
            " 5h",
            "5.0h",
            "h",
            "5",
            "05x",
            "99999999999999h",
        ] {
            let w = Window::Rolling {
                duration: bad.into(),
            };
            let e = validate_window("", &w).unwrap_err();
            assert_eq!(e.field(), Some("window.duration"), "{bad}");
        }
    }

    #[test]
    fn refill_rules() {
        let r = |interval, day| Refill {
            amount: 5,
            interval,
            day,
        };
        assert!(validate_refill("refill", &r(RefillInterval::Monthly, None)).is_ok());
        assert!(validate_refill("refill", &r(RefillInterval::Monthly, Some(31))).is_ok());
        let e = validate_refill("refill", &r(RefillInterval::Daily, Some(3))).unwrap_err();
        assert_eq!(e.field(), Some("refill.day"));
        let e = validate_refill("refill", &r(RefillInterval::Monthly, Some(0))).unwrap_err();
        assert_eq!(e.field(), Some("refill.day"));
    }

    #[test]
    fn parents_are_chain_subjects() {
        let s = Subject::parse("user:u").unwrap();
        let up = |p: &str| SubjectUpserted {
            parent: Some(Subject::parse(p).unwrap()),
            groups: vec![],
            disabled: false,
        };
        let e = validate_subject_upsert("", &s, &up("group:pro")).unwrap_err();
        assert_eq!(e.field(), Some("parent"));
        assert!(validate_subject_upsert("", &s, &up("team:t")).is_ok());
        // Its own parent is a cycle, refused (409) by the configuration, like every cycle.
        assert!(validate_subject_upsert("", &s, &up("user:u")).is_ok());
        let config = crate::quota::Config::default();
        assert_eq!(
            config.parent_conflict(&s, &s),
            Some(crate::quota::ParentConflict::Cycle)
        );
    }
}
