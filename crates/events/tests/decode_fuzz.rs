//! Fuzzing `Envelope::decode` (issue 4 test 2): random bytes, arbitrary JSON documents with the
//! envelope's keys, and valid events mutated byte by byte or with extreme values. Decoding must
//! never panic; whatever decodes must validate and round-trip. `cargo fuzz` needs a nightly
//! toolchain, so this is proptest over bytes, run for a time budget: `FUZZ_SECONDS` (default 5;
//! `scripts/test` gives it more).

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use tally_events::Envelope;

fn budget() -> Duration {
    let secs = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    Duration::from_secs(secs)
}

/// Run `test` on values of `strategy` until the time budget is spent.
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

fn check(bytes: &[u8]) {
    if let Ok(env) = Envelope::decode(bytes) {
        env.validate().expect("a decoded event validates");
        let again = Envelope::decode(&env.encode()).expect("a decoded event re-decodes");
        assert_eq!(again, env, "round trip");
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let t = "2026-11-22T10:00:00.123456Z";
    let id = "0192f0c4-8a3b-7c2d-9e1f-123456789abc";
    let docs = [
        json!({"id": id, "type": "admission.decided", "schema": 1, "occurred_at": t, "request_id": "r", "subject": "key:k",
            "data": {"admission_id": id, "admitted": true, "reason": null, "model": "m", "model_group": null, "chain": ["key:k", "user:u"],
                "estimate": {"requests": 1, "cost": 5}, "counted_in_key_global": true, "counted_in_user_global": true,
                "checks": [{"policy_id": "p", "subject": "key:k", "metric": "cost", "window": {"start": t, "end": t}, "limit": 9, "used": 1, "reserved": 0, "remaining": 8, "outcome": "pass"}],
                "received_at": t}}),
        json!({"id": id, "type": "usage.settled", "schema": 1, "occurred_at": t, "request_id": "r", "subject": "key:k",
            "data": {"settlement_id": "s", "usage": {"cost": 1000000000000000i64}, "success": true, "final": false, "seq": 3,
                "matched_admission": false, "admission_id": null, "model": null, "model_group": null, "chain": ["key:k"],
                "counted_in_key_global": true, "counted_in_user_global": false, "window_at": t}}),
        json!({"id": id, "type": "policy.upserted", "schema": 1, "occurred_at": t,
            "data": {"policy_id": "p", "subject": "group:pro", "model_group": null, "metric": "tokens", "limit": 5,
                "window": {"kind": "periodic", "every": "90m", "anchor": "2026-01-01T00:00:00Z"}, "boundary": "graceful", "on_exhausted": "alert", "enabled": true}}),
        json!({"id": id, "type": "credits.adjusted", "schema": 1, "occurred_at": t, "subject": "user:u",
            "data": {"id": "w", "op": "set", "amount": 7, "refill": {"amount": 3, "interval": "monthly", "day": 31}}}),
        json!({"id": id, "type": "subject.upserted", "schema": 1, "occurred_at": t, "subject": "key:k",
            "data": {"parent": "team:t", "groups": ["a", "b"], "disabled": false}}),
        json!({"id": id, "type": "grant.issued", "schema": 1, "occurred_at": t,
            "data": {"grant_id": "g", "subject": "user:u", "model_group": null, "metric": "cost", "amount": 5, "window_kind": "calendar", "starts_at": t, "expires_at": "2027-01-01T00:00:00Z"}}),
    ];
    docs.iter()
        .map(|d| serde_json::to_vec(d).unwrap())
        .collect()
}

#[test]
fn the_seeds_decode() {
    for s in seeds() {
        Envelope::decode(&s).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&s)));
    }
}

#[test]
fn random_bytes_never_panic() {
    fuzz(
        "random bytes",
        proptest::collection::vec(any::<u8>(), 0..4096),
        |b| check(&b),
    );
}

#[test]
fn mutated_events_never_panic() {
    let seeds = seeds();
    let strategy = (
        0..seeds.len(),
        proptest::collection::vec((any::<u16>(), any::<u8>(), 0..4u8), 1..12),
    );
    fuzz("byte mutations", strategy, move |(i, edits)| {
        let mut b = seeds[i].clone();
        for (pos, byte, how) in edits {
            let p = usize::from(pos) % (b.len() + 1);
            match how {
                0 if p < b.len() => b[p] = byte,
                1 => b.insert(p, byte),
                2 if p < b.len() => {
                    b.remove(p);
                }
                _ => b.truncate(p),
            }
        }
        check(&b);
    });
}

/// Values that stress numbers, times and strings.
fn extreme() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(i64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
        Just(json!(1e308)),
        Just(json!(0.5)),
        Just(json!("+262143-12-31T23:59:59Z")),
        Just(json!("-262143-01-01T00:00:00Z")),
        Just(json!("0000-01-01T00:00:00Z")),
        Just(json!("9999-12-31T23:59:59.999999999Z")),
        Just(json!("99999999999h")),
        Just(json!("+5h")),
        Just(json!("24:00")),
        Just(json!("group:g")),
        Just(json!("")),
        Just(json!("x".repeat(300))),
        Just(json!(null)),
        Just(json!([])),
        Just(json!({})),
        Just(json!({"kind": "lifetime", "x": 1})),
        Just(json!({"kind": "calendar", "unit": "month", "timezone": "Mars/Olympus"})),
    ]
}

/// Replace the value at a random path of a seed with an extreme one.
fn replace_somewhere(v: &mut Value, mut pick: usize, with: Value) -> bool {
    match v {
        Value::Object(m) => {
            let n = m.len();
            if n == 0 {
                return false;
            }
            let k = m.keys().nth(pick % n).cloned().unwrap();
            pick /= n;
            if pick.is_multiple_of(3)
                || !replace_somewhere(m.get_mut(&k).unwrap(), pick, with.clone())
            {
                m.insert(k, with);
            }
            true
        }
        Value::Array(a) if !a.is_empty() => {
            let n = a.len();
            replace_somewhere(&mut a[pick % n], pick / n, with)
        }
        _ => false,
    }
}

#[test]
fn extreme_values_never_panic() {
    let docs: Vec<Value> = seeds()
        .iter()
        .map(|s| serde_json::from_slice(s).unwrap())
        .collect();
    let strategy = (
        0..docs.len(),
        proptest::collection::vec((any::<usize>(), extreme()), 1..4),
    );
    fuzz("extreme values", strategy, move |(i, edits)| {
        let mut d = docs[i].clone();
        for (pick, value) in edits {
            replace_somewhere(&mut d, pick, value);
        }
        check(&serde_json::to_vec(&d).unwrap());
    });
}
