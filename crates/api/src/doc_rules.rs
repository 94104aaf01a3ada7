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

use serde_json::{Value, json};
use tally_events::rules::{MAX_GROUPS_PER_SUBJECT, MAX_ID_LEN, MAX_MODELS_PER_GROUP, WINDOW_KINDS};
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

/// A window: one shape per kind, unknown fields refused (`Window` is `deny_unknown_fields`);
/// durations in `parse_duration_minutes`'s grammar (1..=12 digits and a unit; the range, 1 m
/// to ten years, is its own 400).
fn window() -> Value {
    let shape = |kind: &str, required: &[&str], mut props: Value| {
        props["kind"] = json!({"const": kind});
        let mut req = vec!["kind"];
        req.extend_from_slice(required);
        json!({"type": "object", "required": req, "properties": props, "additionalProperties": false})
    };
    let duration = json!({"type": "string", "pattern": "^[0-9]{1,12}[mhdw]$"});
    let opt_text = json!({"type": ["string", "null"]});
    json!({
        "type": "object",
        "oneOf": [
            shape("rolling", &["duration"], json!({"duration": duration})),
            shape("calendar", &["unit"], json!({
                "unit": one_of(&["day", "week", "month"]),
                "timezone": opt_text, "reset_at": opt_text, "week_start": opt_text,
            })),
            shape("periodic", &["every"], json!({
                "every": duration,
                "anchor": {"type": ["string", "null"], "format": "date-time"},
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
}
