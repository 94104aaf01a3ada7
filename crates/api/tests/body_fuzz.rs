//! Fuzzing the API body decoders (issue 4 test 2): every body type of the API decoded from random
//! bytes, arbitrary JSON trees, and valid bodies with values replaced by extreme ones. Decoding
//! must never panic, and every refusal is a 400 with the JSON error body. Runs for a time budget,
//! `FUZZ_SECONDS` (default 5; `scripts/test` gives it more).

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use tally_api::ApiError;
use tally_api::bodies::*;
use tally_api::body::parse_json;

fn budget() -> Duration {
    let secs = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    Duration::from_secs(secs)
}

fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) + Clone) {
    let deadline = Instant::now() + budget();
    let mut cases = 0u64;
    while Instant::now() < deadline {
        let mut runner = TestRunner::new(Config {
            cases: 256,
            failure_persistence: None,
            ..Config::default()
        });
        let t = test.clone();
        if let Err(e) = runner.run(&strategy, move |v| {
            t(v);
            Ok(())
        }) {
            panic!("{name}: {e}");
        }
        cases += 256;
    }
    println!("{name}: {cases} cases");
}

fn one<T: serde::de::DeserializeOwned>(bytes: &[u8]) {
    match parse_json::<T>(bytes) {
        Ok(_) => {}
        Err(e @ ApiError::Invalid { .. }) => {
            let body = e.body();
            assert_eq!(body["error"]["code"], "invalid_request");
            assert!(body["error"]["message"].is_string());
        }
        Err(other) => panic!("a body decoder answered {other:?}"),
    }
}

/// Every decoder on the same bytes.
fn all(bytes: &[u8]) {
    one::<AdmitIn>(bytes);
    one::<SettleIn>(bytes);
    one::<ReleaseIn>(bytes);
    one::<SubjectIn>(bytes);
    one::<ModelGroupIn>(bytes);
    one::<PolicyIn>(bytes);
    one::<ResetIn>(bytes);
    one::<GrantIn>(bytes);
    one::<CreditsIn>(bytes);
}

fn seeds() -> Vec<Value> {
    vec![
        json!({"request_id": "r", "subject": "key:k", "model": "m", "estimate": {"requests": 1, "cost": 5}, "at": "2026-11-22T10:00:00Z"}),
        json!({"request_id": "r", "usage": {"input_tokens": 3}, "success": true, "final": false, "seq": 2, "subject": "key:k"}),
        json!({"parent": "team:t", "groups": ["a"], "disabled": null}),
        json!({"subject": "key:k", "metric": "cost", "limit": 5, "window": {"kind": "calendar", "unit": "day", "timezone": "UTC", "reset_at": "04:00"}, "boundary": "strict"}),
        json!({"subject": "key:k", "metric": "cost", "limit": 5, "window": {"kind": "periodic", "every": "90m", "anchor": "2026-01-01T00:00:00Z"}}),
        json!({"subject": "key:k", "metric": "tokens", "amount": 5, "window_kind": "rolling", "expires_at": "2027-01-01T00:00:00Z"}),
        json!({"id": "w", "op": "set", "amount": 5, "refill": {"amount": 5, "interval": "monthly", "day": 31}}),
        json!({"models": ["a", "b"]}),
    ]
}

#[test]
fn random_bytes_never_panic() {
    fuzz(
        "random bytes",
        proptest::collection::vec(any::<u8>(), 0..2048),
        |b| all(&b),
    );
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("request_id".to_owned()),
        Just("subject".to_owned()),
        Just("estimate".to_owned()),
        Just("usage".to_owned()),
        Just("window".to_owned()),
        Just("kind".to_owned()),
        Just("limit".to_owned()),
        Just("metric".to_owned()),
        Just("op".to_owned()),
        Just("amount".to_owned()),
        Just("refill".to_owned()),
        Just("at".to_owned()),
        "[a-z]{1,6}",
    ]
}

fn json_tree() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        "[a-z_:.0-9+-]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn arbitrary_json_never_panics() {
    fuzz("json trees", json_tree(), |v| {
        all(&serde_json::to_vec(&v).unwrap())
    });
}

fn replace(v: &mut Value, pick: usize, with: &Value) {
    if let Value::Object(m) = v
        && !m.is_empty()
    {
        let n = m.len();
        let k = m.keys().nth(pick % n).cloned().unwrap();
        let child = m.get_mut(&k).unwrap();
        if (pick / n).is_multiple_of(2) || !child.is_object() {
            *child = with.clone();
        } else {
            replace(child, pick / n / 2, with);
        }
    }
}

#[test]
fn valid_bodies_with_extreme_values_never_panic() {
    let seeds = seeds();
    let extreme = prop_oneof![
        Just(json!(i64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
        Just(json!(1.5)),
        Just(json!("+262143-12-31T23:59:59Z")),
        Just(json!("0001-01-01T00:00:00Z")),
        Just(json!("99999999999h")),
        Just(json!("+4:00")),
        Just(json!("group:g")),
        Just(json!("")),
        Just(json!(null)),
        Just(json!([1, 2])),
        Just(json!({"kind": "lifetime", "x": 1})),
    ];
    let strategy = (0..seeds.len(), any::<usize>(), extreme);
    fuzz("extreme values", strategy, move |(i, pick, value)| {
        let mut d = seeds[i].clone();
        replace(&mut d, pick, &value);
        all(&serde_json::to_vec(&d).unwrap());
    });
}
