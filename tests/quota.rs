//! Quota semantics end to end (issue 2), one scenario per source document in `../shared/seeds/`,
//! on real NATS and Postgres, moving through time with `at`. Each scenario prints what it saw.

mod common;

use chrono::{DateTime, Datelike, DurationRound, TimeDelta, Utc};
use common::{Stack, TestEnv};
use serde_json::{Value, json};

/// Scenarios reach months back (monthly windows, a February refill); widen the backfill bound.
const BACKFILL: &[&str] = &["--max-backfill", "400d"];

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// UTC midnight `days` days ago.
fn day_start(days_ago: i64) -> DateTime<Utc> {
    (Utc::now() - TimeDelta::days(days_ago))
        .duration_trunc(TimeDelta::days(1))
        .unwrap()
}

struct S<'a> {
    stack: &'a Stack,
    n: std::cell::Cell<u32>,
}

impl S<'_> {
    async fn put(&self, path: &str, body: Value) -> Value {
        let (status, b) = self.stack.admin("PUT", path, Some(body)).await;
        assert!(status == 200, "PUT {path}: {status} {b}");
        b
    }

    async fn policy(&self, id: &str, body: Value) {
        self.put(&format!("/v1/policies/{id}"), body).await;
    }

    /// Admit with `estimate` at `at`; returns the decision.
    async fn admit(
        &self,
        subject: &str,
        model: &str,
        estimate: Value,
        at: DateTime<Utc>,
    ) -> (String, Value) {
        self.n.set(self.n.get() + 1);
        let rid = format!("r{}-{}", self.n.get(), subject.replace(':', "_"));
        let (status, body) = self
            .stack
            .post(
                "/v1/admit",
                json!({"request_id": rid, "subject": subject, "model": model, "estimate": estimate, "at": ts(at)}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        (rid, body)
    }

    async fn settle(&self, rid: &str, usage: Value) {
        let (status, body) = self
            .stack
            .post("/v1/settle", json!({"request_id": rid, "usage": usage}))
            .await;
        assert_eq!(status, 202, "{body}");
    }

    /// Admit and settle the estimate as actual usage; the admission must pass.
    async fn spend(&self, subject: &str, model: &str, usage: Value, at: DateTime<Utc>) {
        let (rid, d) = self.admit(subject, model, usage.clone(), at).await;
        assert_eq!(
            d["admitted"], true,
            "spend {usage} on {subject} at {at}: {d}"
        );
        self.settle(&rid, usage).await;
    }

    async fn expect(
        &self,
        subject: &str,
        model: &str,
        estimate: Value,
        at: DateTime<Utc>,
        admitted: bool,
    ) -> Value {
        let (_, d) = self.admit(subject, model, estimate.clone(), at).await;
        println!(
            "{subject} {model} {estimate} at {} -> admitted {} reason {} retry {}",
            ts(at),
            d["admitted"],
            d["reason"],
            d["retry_after_seconds"]
        );
        assert_eq!(d["admitted"], admitted, "{subject} {estimate} at {at}: {d}");
        d
    }
}

fn failing(d: &Value) -> Vec<(String, String)> {
    d["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["outcome"] == "fail")
        .map(|c| {
            (
                c["policy_id"].as_str().unwrap().to_owned(),
                c["subject"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn day_window(unit: &str) -> Value {
    json!({"kind": "calendar", "unit": unit})
}

/// 000 (Bifrost): key → team → customer with token and request limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hierarchy_team_and_customer_limits_are_shared_pools() {
    let env = TestEnv::new(BACKFILL).await;
    let stack = Stack::start(&env).await;
    let s = S {
        stack: &stack,
        n: Default::default(),
    };
    s.put("/v1/subjects/team:t1", json!({"parent": "customer:c1"}))
        .await;
    s.put("/v1/subjects/team:t2", json!({"parent": "customer:c1"}))
        .await;
    for (k, t) in [
        ("key:a1", "team:t1"),
        ("key:a2", "team:t1"),
        ("key:b1", "team:t2"),
    ] {
        s.put(&format!("/v1/subjects/{k}"), json!({"parent": t}))
            .await;
    }
    let (st, b) = stack
        .admin(
            "PUT",
            "/v1/subjects/customer:c1",
            Some(json!({"parent": "key:a1"})),
        )
        .await;
    assert_eq!(
        (st, b["error"]["field"].as_str()),
        (409, Some("parent")),
        "cycle refused: {b}"
    );
    // Its own parent: the shortest cycle, refused the same way.
    let (st, b) = stack
        .admin(
            "PUT",
            "/v1/subjects/team:t1",
            Some(json!({"parent": "team:t1"})),
        )
        .await;
    assert_eq!(
        (st, b["error"]["field"].as_str()),
        (409, Some("parent")),
        "self-parent refused as a cycle: {b}"
    );
    s.policy("team-tokens", json!({"subject": "team:t1", "metric": "tokens", "limit": 1000, "window": day_window("day")})).await;
    s.policy("team2-requests", json!({"subject": "team:t2", "metric": "requests", "limit": 2, "window": day_window("day")})).await;
    s.policy("customer-tokens", json!({"subject": "customer:c1", "metric": "tokens", "limit": 1500, "window": day_window("day")})).await;

    let d = day_start(3);
    let at = |h: i64| d + TimeDelta::hours(h);
    s.spend("key:a1", "m", json!({"input_tokens": 600}), at(1))
        .await;
    let r = s
        .expect("key:a2", "m", json!({"input_tokens": 500}), at(2), false)
        .await;
    assert_eq!(
        failing(&r),
        vec![("team-tokens".into(), "team:t1".into())],
        "{r}"
    );
    assert_eq!(r["reason"], "limit_exceeded");
    assert_eq!(r["retry_after_seconds"], 22 * 3600, "until the day resets");
    s.spend("key:a2", "m", json!({"input_tokens": 400}), at(2))
        .await; // exactly the limit: strict admits
    for k in ["key:a1", "key:a2"] {
        let r = s
            .expect(k, "m", json!({"input_tokens": 1}), at(3), false)
            .await;
        assert!(
            failing(&r).contains(&("team-tokens".into(), "team:t1".into())),
            "team limit refuses both keys"
        );
    }
    // The customer pool is shared by both teams: t2 may use only what t1 left.
    let r = s
        .expect("key:b1", "m", json!({"input_tokens": 501}), at(4), false)
        .await;
    assert_eq!(
        failing(&r),
        vec![("customer-tokens".into(), "customer:c1".into())]
    );
    s.spend("key:b1", "m", json!({"input_tokens": 500}), at(4))
        .await;
    let r = s
        .expect("key:b1", "m", json!({"input_tokens": 1}), at(5), false)
        .await;
    assert_eq!(
        failing(&r),
        vec![("customer-tokens".into(), "customer:c1".into())]
    );
    // Each pool is checked once, whatever the path to it.
    let mut pools: Vec<_> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["policy_id"].clone(), c["subject"].clone()))
        .collect();
    let n = pools.len();
    pools.dedup();
    assert_eq!(pools.len(), n, "no pool checked twice: {r}");
    // Request limits: team t2 allows two requests a day; one was used. A new day recovers.
    s.put("/v1/subjects/key:b2", json!({"parent": "team:t2"}))
        .await;
    let next = d + TimeDelta::days(1);
    s.spend(
        "key:b2",
        "m",
        json!({"input_tokens": 1}),
        next + TimeDelta::hours(1),
    )
    .await;
    s.spend(
        "key:b1",
        "m",
        json!({"input_tokens": 1}),
        next + TimeDelta::hours(1),
    )
    .await;
    let r = s
        .expect(
            "key:b2",
            "m",
            json!({"input_tokens": 1}),
            next + TimeDelta::hours(2),
            false,
        )
        .await;
    assert_eq!(
        failing(&r),
        vec![("team2-requests".into(), "team:t2".into())]
    );
    let (_, q) = stack
        .get(&format!(
            "/v1/quota?subject=key:b2&at={}",
            ts(next + TimeDelta::hours(2))
        ))
        .await;
    println!("quota key:b2: {q}");
    let c = q["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["policy_id"] == "customer-tokens")
        .unwrap();
    assert_eq!(
        (c["used"].as_i64(), c["remaining"].as_i64()),
        (Some(2), Some(1498))
    );
    stack.stop().await;
    env.cleanup().await;
}

/// 001 (claude-code-hub): rolling 5 h, daily in a time zone with a reset time, weekly, monthly
/// and lifetime cost windows, each refusing at its own boundary and recovering when it should.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_windows_refuse_at_their_boundary_and_recover() {
    let env = TestEnv::new(BACKFILL).await;
    let stack = Stack::start(&env).await;
    let s = S {
        stack: &stack,
        n: Default::default(),
    };
    let windows = [
        ("u-rolling", json!({"kind": "rolling", "duration": "5h"})),
        (
            "u-daily",
            json!({"kind": "calendar", "unit": "day", "timezone": "Asia/Shanghai", "reset_at": "04:00"}),
        ),
        ("u-weekly", json!({"kind": "calendar", "unit": "week"})),
        ("u-monthly", json!({"kind": "calendar", "unit": "month"})),
        ("u-lifetime", json!({"kind": "lifetime"})),
    ];
    for (u, w) in &windows {
        s.put(
            &format!("/v1/subjects/key:{u}"),
            json!({"parent": format!("user:{u}")}),
        )
        .await;
        s.policy(
            u,
            json!({"subject": format!("user:{u}"), "metric": "cost", "limit": 100, "window": w}),
        )
        .await;
    }
    // Rolling 5 h: 60 at 10:00 and 40 at 12:00 fill it; at 14:59 nothing has aged out; at 15:00
    // the 60 have, and 50 fit again.
    let d = day_start(5) + TimeDelta::hours(10);
    s.spend("key:u-rolling", "m", json!({"cost": 60}), d).await;
    s.spend(
        "key:u-rolling",
        "m",
        json!({"cost": 40}),
        d + TimeDelta::hours(2),
    )
    .await;
    let r = s
        .expect(
            "key:u-rolling",
            "m",
            json!({"cost": 50}),
            d + TimeDelta::minutes(299),
            false,
        )
        .await;
    assert_eq!(
        r["retry_after_seconds"], 60,
        "the 60 age out one minute later"
    );
    s.expect(
        "key:u-rolling",
        "m",
        json!({"cost": 50}),
        d + TimeDelta::hours(5),
        true,
    )
    .await;

    // Daily in Asia/Shanghai resetting at 04:00 local = 20:00 UTC.
    let reset = day_start(5) + TimeDelta::hours(20);
    s.spend(
        "key:u-daily",
        "m",
        json!({"cost": 100}),
        reset - TimeDelta::hours(3),
    )
    .await;
    let r = s
        .expect(
            "key:u-daily",
            "m",
            json!({"cost": 1}),
            reset - TimeDelta::seconds(1),
            false,
        )
        .await;
    assert_eq!(r["retry_after_seconds"], 1);
    s.expect("key:u-daily", "m", json!({"cost": 100}), reset, true)
        .await;

    // Weekly (Monday 00:00 UTC): the most recent Monday at least two days ago.
    let mut monday = day_start(2);
    while monday.weekday() != chrono::Weekday::Mon {
        monday -= TimeDelta::days(1);
    }
    s.spend(
        "key:u-weekly",
        "m",
        json!({"cost": 100}),
        monday - TimeDelta::days(2),
    )
    .await;
    let r = s
        .expect(
            "key:u-weekly",
            "m",
            json!({"cost": 1}),
            monday - TimeDelta::minutes(1),
            false,
        )
        .await;
    assert_eq!(r["retry_after_seconds"], 60);
    s.expect("key:u-weekly", "m", json!({"cost": 100}), monday, true)
        .await;

    // Monthly (day 1, 00:00 UTC): the latest month start at least two days ago.
    let mut month = day_start(2).with_day(1).unwrap();
    if month > day_start(2) {
        month = (month - TimeDelta::days(1)).with_day(1).unwrap();
    }
    s.spend(
        "key:u-monthly",
        "m",
        json!({"cost": 100}),
        month - TimeDelta::days(3),
    )
    .await;
    s.expect(
        "key:u-monthly",
        "m",
        json!({"cost": 1}),
        month - TimeDelta::hours(1),
        false,
    )
    .await;
    s.expect("key:u-monthly", "m", json!({"cost": 100}), month, true)
        .await;

    // Lifetime: never recovers, and cannot say when it would.
    s.spend("key:u-lifetime", "m", json!({"cost": 100}), day_start(300))
        .await;
    let r = s
        .expect(
            "key:u-lifetime",
            "m",
            json!({"cost": 1}),
            day_start(0),
            false,
        )
        .await;
    assert_eq!(r["retry_after_seconds"], Value::Null);
    stack.stop().await;
    env.cleanup().await;
}

async fn ledger_flags(env: &TestEnv, request_id: &str) -> Vec<(String, bool, bool)> {
    sqlx::query_as("SELECT event_type, counted_in_key_global, counted_in_user_global FROM ledger WHERE request_id = $1 ORDER BY pos")
        .bind(request_id)
        .fetch_all(env.pool())
        .await
        .unwrap()
}

/// 001 (claude-code-hub): user group × model group, max-merge per person, billing isolation,
/// requests limits always apply, no silent bypass, boosts until they expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_and_model_group_limits_with_billing_isolation_and_boosts() {
    let env = TestEnv::new(BACKFILL).await;
    let stack = Stack::start(&env).await;
    let s = S {
        stack: &stack,
        n: Default::default(),
    };
    s.put(
        "/v1/model-groups/claude",
        json!({"models": ["claude-sonnet", "claude-opus"]}),
    )
    .await;
    let (st, b) = stack
        .admin(
            "PUT",
            "/v1/model-groups/other",
            Some(json!({"models": ["claude-opus"]})),
        )
        .await;
    assert_eq!(
        (st, b["error"]["field"].as_str()),
        (409, Some("models")),
        "a model in two groups: {b}"
    );
    for u in ["alice", "bob"] {
        s.put(
            &format!("/v1/subjects/user:{u}"),
            json!({"groups": ["team_a"]}),
        )
        .await;
        s.put(
            &format!("/v1/subjects/key:k_{u}"),
            json!({"parent": format!("user:{u}")}),
        )
        .await;
    }
    let daily = day_window("day");
    s.policy("group-claude", json!({"subject": "group:team_a", "model_group": "claude", "metric": "cost", "limit": 100, "window": daily})).await;
    s.policy("alice-claude", json!({"subject": "user:alice", "model_group": "claude", "metric": "cost", "limit": 150, "window": daily})).await;
    s.policy(
        "alice-global",
        json!({"subject": "user:alice", "metric": "cost", "limit": 50, "window": daily}),
    )
    .await;
    s.policy(
        "alice-requests",
        json!({"subject": "user:alice", "metric": "requests", "limit": 4, "window": daily}),
    )
    .await;
    for (body, field) in [
        (
            json!({"subject": "user:alice", "metric": "cost", "limit": 0, "window": daily}),
            "limit",
        ),
        (
            json!({"subject": "user:alice", "metric": "cost", "window": daily}),
            "limit",
        ),
        (
            json!({"subject": "user:alice", "metric": "cost", "limit": 5, "window": {"kind": "calendar", "unit": "day", "timezone": "Nowhere/City"}}),
            "window.timezone",
        ),
        (
            json!({"subject": "user:alice", "metric": "watts", "limit": 5, "window": daily}),
            "metric",
        ),
    ] {
        let (st, b) = stack.admin("PUT", "/v1/policies/bad", Some(body)).await;
        assert_eq!(
            (st, b["error"]["field"].as_str()),
            (400, Some(field)),
            "{b}"
        );
    }
    let t = day_start(2) + TimeDelta::hours(9);
    // Alice: personal 150 beats the group's 100 (one merged check); her global 50 is skipped.
    let (rid, d) = s
        .admit("key:k_alice", "claude-sonnet", json!({"cost": 120}), t)
        .await;
    assert_eq!(d["admitted"], true, "{d}");
    assert_eq!(
        (
            d["counted_in_key_global"].as_bool(),
            d["counted_in_user_global"].as_bool()
        ),
        (Some(true), Some(false))
    );
    let claude: Vec<_> = d["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["metric"] == "cost")
        .collect();
    assert_eq!(
        claude.len(),
        1,
        "max-merged into one check, global skipped: {d}"
    );
    assert_eq!(claude[0]["limit"], 150);
    s.settle(&rid, json!({"cost": 120})).await;
    // Bob: the group template is per member, and Alice's spend is not his.
    let r = s
        .expect("key:k_bob", "claude-opus", json!({"cost": 120}), t, false)
        .await;
    assert_eq!(
        failing(&r),
        vec![("group-claude".into(), "user:bob".into())]
    );
    s.expect("key:k_bob", "claude-opus", json!({"cost": 100}), t, true)
        .await;
    // Alice's global limit has not seen her claude spend.
    s.spend("key:k_alice", "gpt-4o", json!({"cost": 40}), t)
        .await;
    let r = s
        .expect("key:k_alice", "gpt-4o", json!({"cost": 20}), t, false)
        .await;
    assert_eq!(
        failing(&r),
        vec![("alice-global".into(), "user:alice".into())]
    );
    // Requests limits apply to model-group traffic too: four settled requests (120 and two more
    // on claude, 40 on gpt-4o) reach the limit of 4, the fifth is refused.
    s.spend("key:k_alice", "claude-sonnet", json!({"cost": 1}), t)
        .await;
    s.spend("key:k_alice", "claude-sonnet", json!({"cost": 1}), t)
        .await;
    let r = s
        .expect("key:k_alice", "claude-sonnet", json!({"cost": 1}), t, false)
        .await;
    assert_eq!(
        failing(&r),
        vec![("alice-requests".into(), "user:alice".into())]
    );
    // Billing isolation is frozen on every ledger row of the request.
    env.eventually("ledger rows", || async {
        ledger_flags(&env, &rid).await.len() == 2
    })
    .await;
    let rows = ledger_flags(&env, &rid).await;
    println!("ledger flags of {rid}: {rows:?}");
    assert!(rows.iter().all(|(_, key, user)| *key && !*user));
    // A boost raises Bob's claude limit by 50 until it expires.
    let (st, g) = stack.admin("POST", "/v1/grants", Some(json!({"id": "boost-bob", "subject": "user:bob", "model_group": "claude", "metric": "cost", "amount": 50, "starts_at": ts(t), "expires_at": ts(t + TimeDelta::hours(2))}))).await;
    assert_eq!(st, 201, "{g}");
    s.expect(
        "key:k_bob",
        "claude-opus",
        json!({"cost": 1}),
        t + TimeDelta::minutes(59),
        true,
    )
    .await;
    let r = s
        .expect(
            "key:k_bob",
            "claude-opus",
            json!({"cost": 50}),
            t + TimeDelta::hours(2),
            false,
        )
        .await;
    assert_eq!(r["checks"][0]["limit"], 100, "boost expired: {r}");
    let (st, _) = stack.admin("DELETE", "/v1/grants/boost-bob", None).await;
    assert_eq!(st, 204, "grant revoked");
    let (st, b) = stack.admin("DELETE", "/v1/grants/boost-bob", None).await;
    assert_eq!((st, b["error"]["field"].as_str()), (404, Some("id")));
    stack.stop().await;
    env.cleanup().await;
}

/// 002 (new-api): a periodic 90-minute window with an anchor; strict, graceful, disable with
/// automatic recovery, and manual reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_window_boundary_modes_disable_and_reset() {
    let env = TestEnv::new(BACKFILL).await;
    let stack = Stack::start(&env).await;
    let s = S {
        stack: &stack,
        n: Default::default(),
    };
    let anchor = day_start(4) + TimeDelta::minutes(15);
    let w = json!({"kind": "periodic", "every": "90m", "anchor": ts(anchor)});
    s.policy(
        "strict",
        json!({"subject": "key:p_strict", "metric": "cost", "limit": 100, "window": w}),
    )
    .await;
    s.policy("graceful", json!({"subject": "key:p_graceful", "metric": "cost", "limit": 100, "window": w, "boundary": "graceful"})).await;
    s.policy("disable", json!({"subject": "key:p_disable", "metric": "cost", "limit": 100, "window": w, "on_exhausted": "disable"})).await;
    let at = |m: i64| anchor + TimeDelta::minutes(m);
    // Strict: the request that would cross is refused; reaching the limit exactly is allowed.
    s.spend("key:p_strict", "m", json!({"cost": 80}), at(5))
        .await;
    let r = s
        .expect("key:p_strict", "m", json!({"cost": 30}), at(10), false)
        .await;
    assert_eq!(r["retry_after_seconds"], 80 * 60);
    s.spend("key:p_strict", "m", json!({"cost": 20}), at(10))
        .await;
    s.expect("key:p_strict", "m", json!({"cost": 1}), at(11), false)
        .await;
    // Graceful: the crossing request goes through, the next does not.
    s.spend("key:p_graceful", "m", json!({"cost": 80}), at(5))
        .await;
    let (rid, r) = s
        .admit("key:p_graceful", "m", json!({"cost": 30}), at(10))
        .await;
    assert_eq!(r["admitted"], true);
    assert_eq!(r["checks"][0]["outcome"], "soft_exceeded");
    s.settle(&rid, json!({"cost": 30})).await;
    s.expect("key:p_graceful", "m", json!({"cost": 1}), at(11), false)
        .await;
    s.expect("key:p_graceful", "m", json!({"cost": 1}), at(90), true)
        .await;
    // Disable: exhausted at exactly the limit; every admission refused until the next window.
    s.spend("key:p_disable", "m", json!({"cost": 100}), at(5))
        .await;
    let r = s
        .expect(
            "key:p_disable",
            "other-model",
            json!({"cost": 0}),
            at(30),
            false,
        )
        .await;
    assert_eq!(r["reason"], "subject_disabled");
    assert_eq!(r["retry_after_seconds"], 60 * 60);
    s.spend("key:p_disable", "m", json!({"cost": 1}), at(90))
        .await;
    // Exhaust the second window, then a manual reset lifts the disable at once.
    s.spend("key:p_disable", "m", json!({"cost": 99}), at(95))
        .await;
    let r = s
        .expect("key:p_disable", "m", json!({"cost": 1}), at(100), false)
        .await;
    assert_eq!(r["reason"], "subject_disabled");
    let (st, b) = stack
        .admin(
            "POST",
            "/v1/policies/disable/reset",
            Some(json!({"subject": "key:p_disable", "at": ts(at(101))})),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    let r = s
        .expect("key:p_disable", "m", json!({"cost": 100}), at(102), true)
        .await;
    assert_eq!(
        r["checks"][0]["used"], 0,
        "usage before the reset no longer counts"
    );
    // Alert: never refuses; "exhausted" is settled used ≥ limit (SPEC v2 §4), so the settlement
    // that crosses the limit emits one threshold.crossed for the window, and later ones none.
    s.policy("alert", json!({"subject": "key:p_alert", "metric": "cost", "limit": 100, "window": w, "on_exhausted": "alert"})).await;
    s.spend("key:p_alert", "m", json!({"cost": 80}), at(5))
        .await;
    let alerts = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM ledger WHERE event_type = 'threshold.crossed'",
        )
        .fetch_one(env.pool())
        .await
        .unwrap()
    };
    for _ in 0..2 {
        let (rid, r) = s
            .admit("key:p_alert", "m", json!({"cost": 30}), at(10))
            .await;
        assert_eq!(r["admitted"], true);
        assert_eq!(r["checks"][0]["outcome"], "soft_exceeded");
        s.settle(&rid, json!({"cost": 30})).await;
    }
    env.eventually("one threshold.crossed in the ledger", || async {
        alerts().await == 1
    })
    .await;
    s.spend("key:p_alert", "m", json!({"cost": 1}), at(20))
        .await;
    env.eventually("the ledger caught up", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM ledger WHERE request_id LIKE 'r%key_p_alert'",
        )
        .fetch_one(env.pool())
        .await
        .unwrap()
            >= 8
    })
    .await;
    assert_eq!(alerts().await, 1, "once per window");
    let (st, b) = stack
        .admin(
            "POST",
            "/v1/policies/nope/reset",
            Some(json!({"subject": "key:p_disable"})),
        )
        .await;
    assert_eq!(st, 404, "{b}");
    // The quota projection in Postgres shows the same windows and exhaustion states.
    env.eventually("quota projection caught up", || async {
        tally_projector::runner::lag_rows(env.pool(), "quota", tally_projector::Order::StreamSeq)
            .await
            .unwrap()
            == Some(0)
    })
    .await;
    type WindowRow = (DateTime<Utc>, i64, i64, Option<DateTime<Utc>>);
    let rows: Vec<WindowRow> = sqlx::query_as(
        "SELECT window_start, \"limit\", used, exhausted_at FROM quota_windows \
         WHERE policy_id = 'disable' AND subject = 'key:p_disable' ORDER BY window_start",
    )
    .fetch_all(env.pool())
    .await
    .unwrap();
    println!("quota_windows of `disable`: {rows:?}");
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0].0, rows[0].1, rows[0].2), (anchor, 100, 100));
    assert_eq!(
        rows[0].3,
        Some(at(5)),
        "exhausted by the usage admitted at +5m"
    );
    assert_eq!(
        (rows[1].0, rows[1].2, rows[1].3),
        (at(90), 0, None),
        "reset lifted it"
    );
    let policies: i64 = sqlx::query_scalar("SELECT count(*) FROM cfg_policies")
        .fetch_one(env.pool())
        .await
        .unwrap();
    assert_eq!(policies, 4, "strict, graceful, disable, alert");
    stack.stop().await;
    env.cleanup().await;
}

/// 004 (Unkey): credits set / spend / decrement, zero-cost checks, monthly refill on day 31 in
/// February, and a user's credits charged instead of its key's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_balances_refills_and_identity_over_key() {
    let env = TestEnv::new(BACKFILL).await;
    let stack = Stack::start(&env).await;
    let s = S {
        stack: &stack,
        n: Default::default(),
    };
    s.put("/v1/subjects/key:ck", json!({"parent": "user:cu"}))
        .await;
    let stack_ref = &stack;
    let credits = |subject: &str, body: Value| {
        let path = format!("/v1/credits/{subject}");
        async move { stack_ref.admin("POST", &path, Some(body)).await }
    };
    // February of the current year if it is at most ~300 days back, else the previous year's.
    let now = Utc::now();
    let year = if now.month() >= 3 {
        now.year()
    } else {
        now.year() - 1
    };
    let feb = |d: u32| {
        chrono::NaiveDate::from_ymd_opt(year, 2, d)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
    };
    let (st, b) = credits(
        "key:ck",
        json!({"op": "set", "amount": 10, "at": ts(feb(1))}),
    )
    .await;
    assert_eq!((st, b["remaining"].as_i64()), (200, Some(10)), "{b}");
    let (st, b) = credits("user:cu", json!({"op": "set", "amount": 10, "refill": {"amount": 10, "interval": "monthly", "day": 31}, "at": ts(feb(1))})).await;
    assert_eq!((st, b["remaining"].as_i64()), (200, Some(10)), "{b}");
    let (st, b) = credits(
        "user:cu",
        json!({"op": "set", "amount": 1, "refill": {"amount": 10, "interval": "daily", "day": 3}}),
    )
    .await;
    assert_eq!(
        (st, b["error"]["field"].as_str()),
        (400, Some("refill.day")),
        "{b}"
    );
    // Spend 3 (the admission reserves 3, the settlement charges them): the user pays, not the key.
    let t = feb(10);
    s.spend("key:ck", "m", json!({"credits": 3}), t).await;
    let (_, q) = stack
        .get(&format!("/v1/quota?subject=key:ck&at={}", ts(t)))
        .await;
    let c = q["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["policy_id"] == "credits")
        .unwrap()
        .clone();
    assert_eq!(
        (c["subject"].as_str(), c["remaining"].as_i64()),
        (Some("user:cu"), Some(7)),
        "{q}"
    );
    // Decrement 2 (the refill schedule, not named, is kept).
    let (_, b) = credits(
        "user:cu",
        json!({"op": "decrement", "amount": 2, "at": ts(t)}),
    )
    .await;
    assert_eq!(
        (b["remaining"].as_i64(), b["refill"]["day"].as_i64()),
        (Some(5), Some(31)),
        "{b}"
    );
    // A zero-cost check reads without charging, and passes even at zero.
    let r = s
        .expect("key:ck", "m", json!({"credits": 0}), t, true)
        .await;
    assert_eq!(r["checks"][0]["remaining"], 5);
    s.spend("key:ck", "m", json!({"credits": 5}), t).await;
    let r = s
        .expect("key:ck", "m", json!({}), t + TimeDelta::hours(1), false)
        .await;
    assert_eq!(r["reason"], "credits_exhausted");
    let until_refill = (feb(28) - (t + TimeDelta::hours(1))).num_seconds();
    assert_eq!(
        r["retry_after_seconds"], until_refill,
        "refill on day 31 clamps to Feb 28"
    );
    s.expect(
        "key:ck",
        "m",
        json!({"credits": 0}),
        t + TimeDelta::hours(1),
        true,
    )
    .await;
    // February has no 31st: the refill happens on the 28th.
    s.expect(
        "key:ck",
        "m",
        json!({}),
        feb(27) + TimeDelta::hours(23),
        false,
    )
    .await;
    let r = s
        .expect("key:ck", "m", json!({"credits": 10}), feb(28), true)
        .await;
    assert_eq!(r["checks"][0]["limit"], 10, "refilled to 10: {r}");
    let (_, key) = stack.admin("GET", "/v1/subjects/key:ck", None).await;
    assert_eq!(
        key["credits"]["remaining"], 10,
        "the key's own credits were never charged: {key}"
    );
    stack.stop().await;
    env.cleanup().await;
}

/// Admin writes apply to the very next admission after the write returns plus 1 s, on every
/// API instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_reach_every_instance_within_a_second() {
    let env = TestEnv::new(&[]).await;
    let a = Stack::start(&env).await;
    let b = Stack::start_with(&env, false).await;
    let sa = S {
        stack: &a,
        n: Default::default(),
    };
    let sb = S {
        stack: &b,
        n: std::cell::Cell::new(1000),
    };
    let now = Utc::now();
    sb.expect("key:live", "m", json!({"cost": 500}), now, true)
        .await;
    sa.policy("live", json!({"subject": "key:live", "metric": "cost", "limit": 100, "window": {"kind": "lifetime"}})).await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    sb.expect("key:live", "m", json!({"cost": 101}), Utc::now(), false)
        .await;
    sa.policy("live", json!({"subject": "key:live", "metric": "cost", "limit": 1000, "window": {"kind": "lifetime"}})).await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    sb.expect("key:live", "m", json!({"cost": 101}), Utc::now(), true)
        .await;
    b.stop().await;
    a.stop().await;
    env.cleanup().await;
}

/// 003 (Bifrost usage tracker): streaming usage counts tokens on every chunk and the request
/// once, on the final chunk; a retried chunk counts once; the reservation is replaced, not
/// added to; and the counters survive a restart (rebuilt from the ledger, not kept in memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chunks_count_once_and_counters_survive_a_restart() {
    let env = TestEnv::new(&[]).await;
    let stack = Stack::start(&env).await;
    let s = S {
        stack: &stack,
        n: Default::default(),
    };
    s.policy("s-tokens", json!({"subject": "key:stream", "metric": "tokens", "limit": 1000, "window": day_window("day")})).await;
    s.policy("s-requests", json!({"subject": "key:stream", "metric": "requests", "limit": 2, "window": day_window("day")})).await;
    let t = Utc::now();
    let (rid, d) = s
        .admit("key:stream", "m", json!({"output_tokens": 300}), t)
        .await;
    assert_eq!(d["admitted"], true);
    assert_eq!(
        stream_quota(&stack).await,
        ((0, 300), (0, 1)),
        "reserved at admission"
    );
    let chunk = |seq: u32, tokens: i64, last: bool| json!({"request_id": rid, "seq": seq, "final": last, "usage": {"output_tokens": tokens}});
    for (seq, tokens, last) in [
        (0, 200, false),
        (1, 100, false),
        (1, 100, false),
        (2, 50, true),
    ] {
        let (st, b) = stack.post("/v1/settle", chunk(seq, tokens, last)).await;
        assert_eq!(st, 202, "{b}");
        if seq == 0 {
            assert_eq!(
                stream_quota(&stack).await,
                ((200, 100), (0, 1)),
                "a chunk replaces part of the reservation"
            );
        }
    }
    let live = stream_quota(&stack).await;
    println!(
        "after streaming: tokens (used, reserved) {:?}, requests {:?}",
        live.0, live.1
    );
    assert_eq!(
        live,
        ((350, 0), (1, 0)),
        "each chunk once, the request once, nothing left reserved"
    );
    // A new instance rebuilds the same counters from the ledger.
    env.eventually("ledger has the admission and three chunks", || async {
        env.ledger_count().await == 4 + 2
    })
    .await;
    stack.stop().await;
    let restarted = Stack::start(&env).await;
    let rebuilt = stream_quota(&restarted).await;
    println!("after restart: {rebuilt:?}");
    assert_eq!(rebuilt, live);
    restarted.stop().await;
    env.cleanup().await;
}

/// (used, reserved) of the streaming test's token and request policies.
async fn stream_quota(stack: &Stack) -> ((i64, i64), (i64, i64)) {
    let (_, q) = stack.get("/v1/quota?subject=key:stream").await;
    let pick = |id: &str| {
        let c = q["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["policy_id"] == id)
            .unwrap();
        (c["used"].as_i64().unwrap(), c["reserved"].as_i64().unwrap())
    };
    (pick("s-tokens"), pick("s-requests"))
}

/// SPEC §4.7 / §9: with `--unknown-subjects reject` a subject nobody configured is refused with
/// `unknown_subject` (and the refusal is recorded); once it is configured, as a subject or through
/// a policy on it, it is decided as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_subjects_rejected_when_configured_so() {
    let env = TestEnv::new(&["--unknown-subjects", "reject"]).await;
    let stack = Stack::start(&env).await;
    let admit = |rid: &'static str, subject: &'static str| {
        let stack = &stack;
        async move {
            let (st, d) = stack
                .post("/v1/admit", json!({"request_id": rid, "subject": subject}))
                .await;
            assert_eq!(st, 200, "{d}");
            d
        }
    };
    let d = admit("u1", "key:nobody").await;
    assert_eq!(
        (d["admitted"].as_bool(), d["reason"].as_str()),
        (Some(false), Some("unknown_subject")),
        "{d}"
    );
    let (st, b) = stack
        .admin("PUT", "/v1/subjects/key:known", Some(json!({})))
        .await;
    assert_eq!(st, 200, "{b}");
    let d = admit("u2", "key:known").await;
    assert_eq!(d["admitted"], true, "{d}");
    let (st, b) = stack
        .admin(
            "PUT",
            "/v1/policies/p-pol",
            Some(json!({"subject": "key:with-policy", "metric": "requests", "limit": 5, "window": {"kind": "lifetime"}})),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    let d = admit("u3", "key:with-policy").await;
    assert_eq!(d["admitted"], true, "{d}");
    env.eventually("the refusal recorded", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM ledger WHERE request_id = 'u1' AND event_type = 'admission.decided' \
             AND payload->'data'->>'reason' = 'unknown_subject'",
        )
        .fetch_one(env.pool())
        .await
        .unwrap()
            == 1
    })
    .await;
    stack.stop().await;
    env.cleanup().await;
}

async fn put(s: &Stack, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    s.admin("PUT", path, Some(body)).await
}

/// Admin writes racing across instances. B's stream tail is stopped, so B has not seen A's
/// writes: the widest race window there is. B's writes that conflict with A's (the same model into
/// a second group; the other half of a cycle) are refused with 409 instead of both landing; a
/// write on a config subject nobody touched meanwhile still goes through on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_admin_writes_on_two_instances_conflict() {
    let env = TestEnv::new(&[]).await;
    let a = Stack::start(&env).await;
    let b = Stack::start(&env).await;
    b.tasks.abort();
    let (st, r) = put(&a, "/v1/model-groups/g1", json!({"models": ["m1"]})).await;
    assert_eq!(st, 200, "{r}");
    let (st, r) = put(&b, "/v1/model-groups/g2", json!({"models": ["m1"]})).await;
    println!("B's racing model-group write: {st} {r}");
    assert_eq!(
        (st, r["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{r}"
    );
    let (st, r) = put(&a, "/v1/subjects/team:x", json!({"parent": "team:y"})).await;
    assert_eq!(st, 200, "{r}");
    let (st, r) = put(&b, "/v1/subjects/team:y", json!({"parent": "team:x"})).await;
    println!("B's racing half of a cycle: {st} {r}");
    assert_eq!(st, 409, "{r}");
    let (st, r) = put(
        &b,
        "/v1/policies/untouched",
        json!({"subject": "key:z", "metric": "requests", "limit": 3, "window": {"kind": "lifetime"}}),
    )
    .await;
    assert_eq!(st, 200, "a subject nobody raced on: {r}");
    let (st, r) = put(&b, "/v1/policies/second", json!({"subject": "key:z", "metric": "requests", "limit": 4, "window": {"kind": "lifetime"}})).await;
    assert_eq!(
        st, 200,
        "B's own earlier write does not block its next: {r}"
    );
    // What A (whose tail runs) ends with: m1 in g1 only, and no cycle.
    let (_, q) = a.get("/v1/quota?subject=key:any&model=m1").await;
    assert_eq!(q["model_group"], "g1", "{q}");
    env.eventually("A's two config writes in the ledger", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM ledger WHERE event_type IN ('model_group.upserted', 'subject.upserted')",
        )
        .fetch_one(env.pool())
        .await
        .unwrap()
            == 2
    })
    .await;
    b.stop().await;
    a.stop().await;
    env.cleanup().await;
}
