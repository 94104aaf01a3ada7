//! The validation rules of the API written into its OpenAPI document, so a client (or a fuzzer
//! such as Schemathesis) can tell valid input from invalid before sending it: the subject form,
//! name and id lengths without control characters, metric and mode enums, amount ranges, list
//! bounds. Each rule is taken from the constant the validator uses, and each states no more than
//! the validator refuses: a value the document calls invalid is always answered 400 (so the
//! document never claims a limit the API does not keep). Rules the document cannot state (an `at`
//! within `--max-backfill`, `from` ≤ `to`, names that must exist) are left to the 400s.
//!
//! Applied once to the generated document ([`crate::docs::publish`]), by parameter name and by
//! `(schema, property)`: the handlers' derive attributes only take literals, and one table here
//! keeps the rules beside each other and beside the constants they come from.

use chrono::Weekday;
use serde_json::{Value, json};
use tally_events::rules::{
    MAX_GROUPS_PER_SUBJECT, MAX_ID_LEN, MAX_INSTANT_YEAR, MAX_MODELS_PER_GROUP, MIN_INSTANT_YEAR,
    WINDOW_KINDS,
};
use tally_events::window::WEEKDAYS;
use tally_events::{MAX_AMOUNT, MAX_NAME_LEN, MAX_SUBJECT_ID_LEN, MAX_SUBJECT_KIND_LEN, Metric};

/// Characters `validate_name` refuses: Unicode category Cc (C0, DEL, C1).
const NO_CONTROL: &str = r"^[^\x00-\x1f\x7f-\x9f]*$";

fn subject() -> Value {
    json!({
        "type": "string",
        "pattern": format!(
            "^[a-z_]{{1,{MAX_SUBJECT_KIND_LEN}}}:[A-Za-z0-9._:@-]{{1,{MAX_SUBJECT_ID_LEN}}}$"
        ),
    })
}

/// A free name (request id, model): 1..=256 bytes, so at most 256 characters.
fn name() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": MAX_NAME_LEN, "pattern": NO_CONTROL})
}

/// An id (policy, grant, model group, credit write): 1..=128 bytes.
fn id() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": MAX_ID_LEN, "pattern": NO_CONTROL})
}

/// One of `values`, written as they serialize (a `&str`, or an enum such as `Metric` whose
/// serde names are its wire names).
fn one_of<T: serde::Serialize>(values: &[T]) -> Value {
    json!({"type": "string", "enum": values})
}

fn amount(min: i64) -> Value {
    json!({"type": "integer", "format": "int64", "minimum": min, "maximum": MAX_AMOUNT})
}

/// A periodic anchor: an RFC 3339 instant on a whole minute (seconds `00`, any fraction zero) in
/// the years `validate_instant` takes. Exact but for one day at either end of the range, where an
/// offset moves the UTC year (the API judges the UTC instant).
const WHOLE_MINUTE: &str = concat!(
    r"^(?:19[7-9][0-9]|2[01][0-9]{2})-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])",
    r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:00(?:\.0+)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$",
);
const _: () = assert!(MIN_INSTANT_YEAR == 1970 && MAX_INSTANT_YEAR == 2199);

/// A calendar `reset_at` as `parse_reset_at` takes it: `HH:MM`, 24-hour.
const RESET_AT: &str = "^(?:[01][0-9]|2[0-3]):[0-5][0-9]$";

/// A window: one shape per kind (and, for calendar windows, weekly or not: only weeks start on
/// another day than monday), unknown fields refused (`Window` is `deny_unknown_fields`);
/// durations exactly as `parse_duration_minutes` takes them (`DURATION_PATTERN`), time zones by
/// their IANA names, `reset_at` as `parse_reset_at` takes it.
fn window() -> Value {
    let shape = |kind: &str, required: &[&str], mut props: Value| {
        props["kind"] = json!({"const": kind});
        let mut req = vec!["kind"];
        req.extend_from_slice(required);
        json!({"type": "object", "required": req, "properties": props, "additionalProperties": false})
    };
    let duration = json!({"type": "string", "pattern": tally_events::DURATION_PATTERN});
    let mut zones: Vec<Value> = chrono_tz::TZ_VARIANTS
        .iter()
        .map(|z| z.name().into())
        .collect();
    zones.push(Value::Null);
    let calendar = |units: &[&str], week_starts: &[(&str, Weekday)]| {
        let mut starts: Vec<Value> = week_starts.iter().map(|&(d, _)| d.into()).collect();
        starts.push(Value::Null);
        shape(
            "calendar",
            &["unit"],
            json!({
                "unit": one_of(units),
                "timezone": {"type": ["string", "null"], "enum": zones},
                "reset_at": {"type": ["string", "null"], "pattern": RESET_AT},
                "week_start": {"type": ["string", "null"], "enum": starts},
            }),
        )
    };
    json!({
        "type": "object",
        "oneOf": [
            shape("rolling", &["duration"], json!({"duration": duration})),
            calendar(&["week"], &WEEKDAYS),
            calendar(&["day", "month"], &WEEKDAYS[..1]),
            shape("periodic", &["every"], json!({
                "every": duration,
                "anchor": {"type": ["string", "null"], "format": "date-time", "pattern": WHOLE_MINUTE},
            })),
            shape("lifetime", &[], json!({})),
        ],
    })
}

/// Query and path parameters, by path and name.
fn parameter_rule(path: &str, name: &str) -> Option<Value> {
    Some(match (path, name) {
        ("/v1/reports/daily-usage", "limit") => json!({
            "type": "integer", "minimum": 1, "maximum": tally_projector::daily_usage::MAX_REPORT_ROWS,
        }),
        ("/v1/reports/daily-usage", "from" | "to") => json!({"type": "string", "format": "date"}),
        (_, "at" | "from" | "to") => json!({"type": "string", "format": "date-time"}),
        (_, "subject") => subject(),
        (_, "request_id" | "model") => self::name(),
        (_, "id" | "name") => id(),
        (_, "granularity") => one_of(&["minute", "hour", "day"]),
        (_, "format") => one_of(&["json", "csv"]),
        _ => return None,
    })
}

/// Request body properties, by schema and property.
fn property_rule(schema: &str, property: &str) -> Option<Value> {
    Some(match (schema, property) {
        (_, "subject" | "parent") => subject(),
        (_, "request_id" | "settlement_id" | "model") | ("PoolIn", "policy_id") => name(),
        (_, "policy_id" | "model_group" | "id") => id(),
        (_, "metric") => one_of(&Metric::ALL),
        (_, "boundary") => one_of(&["strict", "graceful"]),
        (_, "on_exhausted") => one_of(&["reject", "disable", "alert"]),
        (_, "window_kind") => one_of(&WINDOW_KINDS),
        ("GrantIn", "amount") | ("PolicyIn", "limit") => amount(1),
        // A u32: utoipa writes `int32`, which tools read as at most 2^31 - 1.
        ("SettleIn", "seq") => {
            json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX})
        }
        ("CreditsIn", "amount") => amount(0),
        ("SubjectIn", "groups") => json!({
            "type": "array",
            "maxItems": MAX_GROUPS_PER_SUBJECT,
            "items": {"type": "string", "pattern": format!("^[A-Za-z0-9._:@-]{{1,{MAX_SUBJECT_ID_LEN}}}$")},
        }),
        ("CreditsIn", "refill") => json!({
            "type": "object",
            "required": ["amount", "interval"],
            "properties": {
                "amount": amount(1),
                "interval": one_of(&["daily", "monthly"]),
                "day": {"type": ["integer", "null"], "minimum": 1, "maximum": 31},
            },
        }),
        ("PolicyIn", "window") => window(),
        ("ModelGroupIn", "models") => json!({
            "type": "array", "minItems": 1, "maxItems": MAX_MODELS_PER_GROUP, "items": name(),
        }),
        _ => return None,
    })
}

/// Merge `rule` into the generated `schema`, keeping its description and its nullability.
fn merge(schema: &mut Value, rule: Value) {
    let nullable = match &schema["type"] {
        Value::Array(types) => types.iter().any(|t| t == "null"),
        _ => false,
    };
    let (Some(target), Value::Object(rule)) = (schema.as_object_mut(), rule) else {
        return;
    };
    for (k, mut v) in rule {
        if nullable && k == "type" {
            v = json!([v, "null"]);
        }
        if nullable
            && k == "enum"
            && let Value::Array(values) = &mut v
        {
            values.push(Value::Null);
        }
        target.insert(k, v);
    }
}

/// Write the rules into `doc` (an OpenAPI 3.1 document as JSON). Only `get_mut`: indexing a
/// JSON object mutably would insert `null` for a key it lacks.
pub(crate) fn apply(doc: &mut Value) {
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, ops) in paths.iter_mut() {
            let ops = ops.as_object_mut().into_iter().flat_map(|o| o.values_mut());
            for op in ops {
                let params = op.get_mut("parameters").and_then(Value::as_array_mut);
                for p in params.into_iter().flatten() {
                    let rule = p["name"].as_str().and_then(|n| parameter_rule(path, n));
                    if let (Some(rule), Some(schema)) = (rule, p.get_mut("schema")) {
                        merge(schema, rule);
                    }
                }
            }
        }
    }
    let schemas = doc
        .get_mut("components")
        .and_then(|c| c.get_mut("schemas"))
        .and_then(Value::as_object_mut);
    for (name, schema) in schemas.into_iter().flatten() {
        if !name.ends_with("In") {
            continue; // answers are described as written, not constrained
        }
        let props = schema.get_mut("properties").and_then(Value::as_object_mut);
        for (prop, s) in props.into_iter().flatten() {
            if let Some(rule) = property_rule(name, prop) {
                merge(s, rule);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_keys_stay_absent() {
        let mut doc = json!({"paths": {"/healthz": {"get": {"responses": {}}}}});
        apply(&mut doc);
        assert_eq!(
            doc,
            json!({"paths": {"/healthz": {"get": {"responses": {}}}}})
        );
    }

    #[test]
    fn nullable_fields_stay_nullable() {
        let mut s = json!({"type": ["string", "null"], "description": "d"});
        merge(&mut s, one_of(&["a", "b"]));
        assert_eq!(s["type"], json!(["string", "null"]));
        assert_eq!(s["enum"], json!(["a", "b", null]));
        assert_eq!(s["description"], "d");
    }

    fn matches(pattern: &str, text: &str) -> bool {
        regex::Regex::new(pattern).expect("pattern").is_match(text)
    }

    /// The window rules hold to the validators: every `HH:MM`-like text, every IANA name, and
    /// anchors on and off whole minutes, in and out of range, in every offset form.
    #[test]
    fn window_rules_are_the_validators() {
        use tally_events::Window;
        for h in 0..=99 {
            for m in 0..=99 {
                for text in [format!("{h:02}:{m:02}"), format!("{h}:{m:02}")] {
                    let ok = tally_events::window::parse_reset_at("r", &text).is_ok();
                    assert_eq!(matches(RESET_AT, &text), ok, "{text}");
                }
            }
        }
        let calendar = |tz: &str| Window::Calendar {
            unit: tally_events::CalendarUnit::Day,
            timezone: Some(tz.to_owned()),
            reset_at: None,
            week_start: None,
        };
        for z in chrono_tz::TZ_VARIANTS {
            assert!(tally_events::rules::validate_window("", &calendar(z.name())).is_ok());
        }
        let weekly = |day: &str| Window::Calendar {
            unit: tally_events::CalendarUnit::Week,
            timezone: None,
            reset_at: None,
            week_start: Some(day.to_owned()),
        };
        for (day, _) in WEEKDAYS {
            assert!(
                tally_events::rules::validate_window("", &weekly(day)).is_ok(),
                "{day}"
            );
        }
        for day in ["Monday", "mon", "", "funday"] {
            assert!(
                tally_events::rules::validate_window("", &weekly(day)).is_err(),
                "{day}"
            );
        }
        for anchor in [
            "2026-11-25T10:00:00Z",
            "2026-11-25T10:00:00.000Z",
            "2026-11-25T10:00:00+05:30",
            "1970-06-01T00:00:00Z",
            "2199-06-30T23:59:00-08:00",
            "2026-11-25T10:00:01Z",
            "2026-11-25T10:00:00.5Z",
            "2026-11-25T10:00:00.001+01:00",
            "1969-06-01T00:00:00Z",
            "2200-06-01T00:00:00Z",
            "0001-01-01T00:00:00Z",
        ] {
            let at: chrono::DateTime<chrono::Utc> = anchor.parse().expect(anchor);
            let w = Window::Periodic {
                every: "1h".into(),
                anchor: Some(at),
            };
            let ok = tally_events::rules::validate_window("", &w).is_ok();
            assert_eq!(matches(WHOLE_MINUTE, anchor), ok, "{anchor}");
        }
    }
}
