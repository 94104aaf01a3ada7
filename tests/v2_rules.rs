//! SPEC v2 on the real stack (issue 4): one test per defect class the review found — chains cut
//! at 16, `group:` parents, max-merge applied too widely, resets, periodic windows before their
//! anchor, late settlements, restarts forgetting backfilled requests, and the v2 features. Each
//! prints what it saw. HTTP edges live in `tests/http_edges.rs`, saturation in
//! `tests/saturation.rs`.

mod common;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use common::{Stack, TestEnv};
use serde_json::{Value, json};

const BACKFILL: &[&str] = &["--max-backfill", "40d"];

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

fn minute_now() -> DateTime<Utc> {
    Utc::now().duration_trunc(TimeDelta::minutes(1)).unwrap()
}

fn day_start(days_ago: i64) -> DateTime<Utc> {
    (Utc::now() - TimeDelta::days(days_ago))
        .duration_trunc(TimeDelta::days(1))
        .unwrap()
}

async fn put(stack: &Stack, path: &str, body: Value) -> (u16, Value) {
    stack.admin("PUT", path, Some(body)).await
}

async fn ok_put(stack: &Stack, path: &str, body: Value) -> Value {
    let (st, b) = put(stack, path, body).await;
    assert_eq!(st, 200, "PUT {path}: {b}");
    b
}

async fn admit(
    stack: &Stack,
    rid: &str,
    subject: &str,
    estimate: Value,
    at: DateTime<Utc>,
) -> Value {
    let (st, b) = stack
        .post(
            "/v1/admit",
            json!({"request_id": rid, "subject": subject, "estimate": estimate, "at": ts(at)}),
        )
        .await;
    assert_eq!(st, 200, "admit {rid}: {b}");
    b
}

async fn settle(stack: &Stack, body: Value) -> Value {
    let (st, b) = stack.post("/v1/settle", body.clone()).await;
    assert_eq!(st, 202, "settle {body}: {b}");
    b
}

async fn spend(stack: &Stack, rid: &str, subject: &str, usage: Value, at: DateTime<Utc>) {
    let d = admit(stack, rid, subject, usage.clone(), at).await;
    assert_eq!(d["admitted"], true, "spend {rid}: {d}");
    settle(stack, json!({"request_id": rid, "usage": usage})).await;
}

fn check<'a>(d: &'a Value, policy: &str) -> &'a Value {
    d["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["policy_id"] == policy)
        .unwrap_or_else(|| panic!("no check of {policy} in {d}"))
}

fn policy_ids(d: &Value) -> Vec<String> {
    let mut ids: Vec<String> = d["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["policy_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Class 2: a chain is never cut. Built from the leaf upwards or downwards, the link that would
/// make it 17 deep is a 409 naming `parent` and saying "deep"; a policy on the 16th subject
/// applies to the leaf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_are_refused_beyond_sixteen_never_cut() {
    let env = TestEnv::new(&[]).await;
    let stack = Stack::start(&env).await;
    for i in 0..15 {
        ok_put(
            &stack,
            &format!("/v1/subjects/key:up{i}"),
            json!({"parent": format!("key:up{}", i + 1)}),
        )
        .await;
    }
    let (st, b) = put(
        &stack,
        "/v1/subjects/key:up15",
        json!({"parent": "key:up16"}),
    )
    .await;
    println!("upwards, 17th link: {st} {b}");
    assert_eq!((st, b["error"]["field"].as_str()), (409, Some("parent")));
    assert!(
        b["error"]["message"].as_str().unwrap().contains("deep"),
        "{b}"
    );
    // Downwards: top0 ← top1 ← … each new leaf lengthens the chain by one.
    for i in 1..16 {
        ok_put(
            &stack,
            &format!("/v1/subjects/key:down{i}"),
            json!({"parent": format!("key:down{}", i - 1)}),
        )
        .await;
    }
    let (st, b) = put(
        &stack,
        "/v1/subjects/key:down16",
        json!({"parent": "key:down15"}),
    )
    .await;
    println!("downwards, 17th link: {st} {b}");
    assert_eq!((st, b["error"]["field"].as_str()), (409, Some("parent")));
    assert!(
        b["error"]["message"].as_str().unwrap().contains("deep"),
        "{b}"
    );
    let (st, b) = put(
        &stack,
        "/v1/subjects/key:down0",
        json!({"parent": "key:down9"}),
    )
    .await;
    assert_eq!(st, 409);
    assert!(
        b["error"]["message"].as_str().unwrap().contains("cycle"),
        "{b}"
    );
    // The 16th subject's policy is checked for the leaf.
    ok_put(&stack, "/v1/policies/top", json!({"subject": "key:up15", "metric": "requests", "limit": 1, "window": {"kind": "lifetime"}})).await;
    let (_, q) = stack.get("/v1/quota?subject=key:up0").await;
    assert_eq!(q["chain"].as_array().unwrap().len(), 16, "{q}");
    assert_eq!(policy_ids(&q), vec!["top"], "{q}");
    stack.stop().await;
    env.cleanup().await;
}

/// Class 3: a `group:` subject is never a parent (a per-capita template must not become a pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_is_never_a_parent() {
    let env = TestEnv::new(&[]).await;
    let stack = Stack::start(&env).await;
    let (st, b) = put(
        &stack,
        "/v1/subjects/user:u1",
        json!({"parent": "group:pro"}),
    )
    .await;
    println!("group parent: {st} {b}");
    assert_eq!((st, b["error"]["field"].as_str()), (400, Some("parent")));
    let (st, b) = put(&stack, "/v1/subjects/group:pro", json!({})).await;
    assert_eq!((st, b["error"]["field"].as_str()), (400, Some("subject")));
    stack.stop().await;
    env.cleanup().await;
}

/// Class 4: max-merge only between a subject's own policy and group templates of one shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_merge_only_where_v2_says() {
    let env = TestEnv::new(BACKFILL).await;
    let stack = Stack::start(&env).await;
    let t = day_start(1) + TimeDelta::hours(1);
    let day = json!({"kind": "calendar", "unit": "day"});
    // Two own policies of one shape are two checks: the smaller limit is enforced.
    ok_put(
        &stack,
        "/v1/policies/own-10",
        json!({"subject": "key:m1", "metric": "cost", "limit": 10, "window": day}),
    )
    .await;
    ok_put(
        &stack,
        "/v1/policies/own-20",
        json!({"subject": "key:m1", "metric": "cost", "limit": 20, "window": day}),
    )
    .await;
    spend(&stack, "m1-a", "key:m1", json!({"cost": 10}), t).await;
    let d = admit(&stack, "m1-b", "key:m1", json!({"cost": 1}), t).await;
    println!("two own policies: {}", d["checks"]);
    assert_eq!(d["admitted"], false, "{d}");
    assert_eq!(check(&d, "own-10")["outcome"], "fail");
    assert_eq!(check(&d, "own-20")["outcome"], "pass");
    // An alert beside a reject policy of the same shape stays a check, and alerts.
    ok_put(&stack, "/v1/policies/warn", json!({"subject": "key:m2", "metric": "cost", "limit": 5, "window": day, "on_exhausted": "alert"})).await;
    ok_put(
        &stack,
        "/v1/policies/hard",
        json!({"subject": "key:m2", "metric": "cost", "limit": 10, "window": day}),
    )
    .await;
    spend(&stack, "m2-a", "key:m2", json!({"cost": 6}), t).await;
    let d = admit(&stack, "m2-b", "key:m2", json!({"cost": 1}), t).await;
    println!("alert beside reject: {}", d["checks"]);
    assert_eq!(policy_ids(&d), vec!["hard", "warn"]);
    assert_eq!(check(&d, "warn")["outcome"], "soft_exceeded");
    env.eventually("threshold.crossed of `warn`", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM ledger WHERE event_type = 'threshold.crossed' AND payload->'data'->>'policy_id' = 'warn'")
            .fetch_one(env.pool()).await.unwrap() == 1
    }).await;
    // A group `disable` template that lost the merge to the member's own larger policy neither
    // checks nor disables.
    ok_put(&stack, "/v1/subjects/user:m3", json!({"groups": ["basic"]})).await;
    ok_put(&stack, "/v1/policies/basic-disable", json!({"subject": "group:basic", "metric": "cost", "limit": 50, "window": day, "on_exhausted": "disable"})).await;
    ok_put(
        &stack,
        "/v1/policies/m3-own",
        json!({"subject": "user:m3", "metric": "cost", "limit": 100, "window": day}),
    )
    .await;
    spend(&stack, "m3-a", "user:m3", json!({"cost": 60}), t).await;
    let d = admit(&stack, "m3-b", "user:m3", json!({"cost": 1}), t).await;
    println!(
        "losing disable template: admitted {} {}",
        d["admitted"], d["checks"]
    );
    assert_eq!(d["admitted"], true, "{d}");
    assert_eq!(policy_ids(&d), vec!["m3-own"]);
    stack.stop().await;
    env.cleanup().await;
}

/// Class 5: resets follow stream order for every window kind and are void once the policy's
/// metric, model group or window changes (or it is deleted and re-created).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_follow_stream_order_and_die_with_their_policy() {
    let env = TestEnv::new(BACKFILL).await;
    let stack = Stack::start(&env).await;
    let t = minute_now() - TimeDelta::minutes(2);
    let day = json!({"kind": "calendar", "unit": "day"});
    // Rolling: usage recorded after the reset counts in full, even within the same minute.
    ok_put(&stack, "/v1/policies/roll", json!({"subject": "key:r1", "metric": "cost", "limit": 100, "window": {"kind": "rolling", "duration": "5h"}})).await;
    spend(&stack, "r1-a", "key:r1", json!({"cost": 50}), t).await;
    let (st, b) = stack
        .admin(
            "POST",
            "/v1/policies/roll/reset",
            Some(json!({"subject": "key:r1", "at": ts(t)})),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    spend(&stack, "r1-b", "key:r1", json!({"cost": 30}), t).await;
    let d = admit(&stack, "r1-c", "key:r1", json!({"cost": 1}), t).await;
    println!("rolling after reset: used {}", check(&d, "roll")["used"]);
    assert_eq!(check(&d, "roll")["used"], 30);
    // A reset is void once the metric changes: used is then in the new units, in full.
    ok_put(
        &stack,
        "/v1/policies/p",
        json!({"subject": "key:r2", "metric": "cost", "limit": 1000, "window": day}),
    )
    .await;
    spend(&stack, "r2-a", "key:r2", json!({"cost": 800}), t).await;
    spend(&stack, "r2-b", "key:r2", json!({"cost": 100}), t).await;
    let (st, _) = stack
        .admin(
            "POST",
            "/v1/policies/p/reset",
            Some(json!({"subject": "key:r2", "at": ts(t)})),
        )
        .await;
    assert_eq!(st, 200);
    ok_put(
        &stack,
        "/v1/policies/p",
        json!({"subject": "key:r2", "metric": "requests", "limit": 3, "window": day}),
    )
    .await;
    let d = admit(&stack, "r2-c", "key:r2", json!({"cost": 1}), t).await;
    println!(
        "after a metric change: used {} of {}",
        check(&d, "p")["used"],
        check(&d, "p")["limit"]
    );
    assert_eq!(
        check(&d, "p")["used"],
        2,
        "both requests count; the cost offset is void"
    );
    // Delete and re-create: void too.
    ok_put(
        &stack,
        "/v1/policies/q",
        json!({"subject": "key:r3", "metric": "cost", "limit": 1000, "window": day}),
    )
    .await;
    spend(&stack, "r3-a", "key:r3", json!({"cost": 500}), t).await;
    let (st, _) = stack
        .admin(
            "POST",
            "/v1/policies/q/reset",
            Some(json!({"subject": "key:r3", "at": ts(t)})),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = stack.admin("DELETE", "/v1/policies/q", None).await;
    assert_eq!(st, 204);
    ok_put(
        &stack,
        "/v1/policies/q",
        json!({"subject": "key:r3", "metric": "cost", "limit": 1000, "window": day}),
    )
    .await;
    let d = admit(&stack, "r3-b", "key:r3", json!({"cost": 1}), t).await;
    assert_eq!(
        check(&d, "q")["used"],
        500,
        "a re-created policy sees the window's usage"
    );
    stack.stop().await;
    env.cleanup().await;
}

/// Class 6: an instant before the anchor with a fraction of a second lies in the window before
/// it (k = −1), so a strict limit of one request holds there; a non-minute anchor is a 400, and
/// an omitted anchor is fixed at the first PUT and kept by later ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_windows_before_the_anchor_hold() {
    let env = TestEnv::new(BACKFILL).await;
    let stack = Stack::start(&env).await;
    let anchor = minute_now() - TimeDelta::hours(3);
    let w = json!({"kind": "periodic", "every": "60m", "anchor": ts(anchor)});
    ok_put(
        &stack,
        "/v1/policies/one",
        json!({"subject": "key:a1", "metric": "requests", "limit": 1, "window": w}),
    )
    .await;
    spend(
        &stack,
        "a1-a",
        "key:a1",
        json!({}),
        anchor - TimeDelta::seconds(30),
    )
    .await;
    let at = anchor - TimeDelta::milliseconds(500);
    let d = admit(&stack, "a1-b", "key:a1", json!({}), at).await;
    let win = &check(&d, "one")["window"];
    println!("at anchor − 0.5 s: admitted {} window {win}", d["admitted"]);
    assert_eq!(d["admitted"], false, "one request per window: {d}");
    let end: DateTime<Utc> = win["end"].as_str().unwrap().parse().unwrap();
    assert_eq!(end, anchor, "the window before the anchor: {win}");
    let (st, b) = put(&stack, "/v1/policies/bad", json!({"subject": "key:a1", "metric": "requests", "limit": 1, "window": {"kind": "periodic", "every": "60m", "anchor": ts(anchor + TimeDelta::seconds(7))}})).await;
    assert_eq!(
        (st, b["error"]["field"].as_str()),
        (400, Some("window.anchor")),
        "{b}"
    );
    let first = ok_put(&stack, "/v1/policies/auto", json!({"subject": "key:a1", "metric": "requests", "limit": 5, "window": {"kind": "periodic", "every": "90m"}})).await;
    let fixed = first["window"]["anchor"].clone();
    assert!(
        fixed.is_string(),
        "the default anchor is written and echoed: {first}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let again = ok_put(&stack, "/v1/policies/auto", json!({"subject": "key:a1", "metric": "requests", "limit": 6, "window": {"kind": "periodic", "every": "90m"}})).await;
    assert_eq!(
        again["window"]["anchor"], fixed,
        "a later PUT without anchor keeps it"
    );
    stack.stop().await;
    env.cleanup().await;
}

/// Class 7: a settlement after the request left memory (2 × TTL) is matched through the ledger
/// and counted in the admission's window with its frozen flags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_settlements_match_their_admission_through_the_ledger() {
    let env = TestEnv::new(&["--max-backfill", "40d", "--reservation-ttl", "1s"]).await;
    let stack = Stack::start(&env).await;
    let yesterday = day_start(1) + TimeDelta::hours(12);
    let day = json!({"kind": "calendar", "unit": "day"});
    ok_put(
        &stack,
        "/v1/policies/daily",
        json!({"subject": "key:l1", "metric": "cost", "limit": 1000, "window": day}),
    )
    .await;
    let d = admit(&stack, "late-1", "key:l1", json!({"cost": 10}), yesterday).await;
    assert_eq!(d["admitted"], true);
    // The sweep runs every 10 s and forgets requests untouched for 2 × TTL.
    tokio::time::sleep(std::time::Duration::from_secs(13)).await;
    let b = settle(
        &stack,
        json!({"request_id": "late-1", "usage": {"cost": 70}}),
    )
    .await;
    println!("late settlement: {b}");
    assert_eq!(b["matched_admission"], true);
    let (_, q) = stack
        .get(&format!("/v1/quota?subject=key:l1&at={}", ts(yesterday)))
        .await;
    assert_eq!(
        check(&q, "daily")["used"],
        70,
        "counted in the admission's day: {q}"
    );
    let (_, q) = stack.get("/v1/quota?subject=key:l1").await;
    assert_eq!(check(&q, "daily")["used"], 0, "not in today's: {q}");
    stack.stop().await;
    env.cleanup().await;
}

/// Class 8: after a restart a retried admission whose `at` was in the past is recognised (the
/// TTL runs from `received_at`), not decided afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_remembers_backfilled_admissions() {
    let env = TestEnv::new(BACKFILL).await;
    let stack = Stack::start(&env).await;
    let past = day_start(2) + TimeDelta::hours(3);
    ok_put(&stack, "/v1/policies/one", json!({"subject": "key:b1", "metric": "requests", "limit": 1, "window": {"kind": "lifetime"}})).await;
    let first = admit(&stack, "back-1", "key:b1", json!({}), past).await;
    assert_eq!(first["admitted"], true);
    env.eventually("the admission in the ledger", || async {
        env.ledger_count().await >= 2
    })
    .await;
    stack.stop().await;
    let stack = Stack::start(&env).await;
    let again = admit(&stack, "back-1", "key:b1", json!({}), past).await;
    println!(
        "after restart: admitted {} replayed {}",
        again["admitted"], again["replayed"]
    );
    assert_eq!(again["replayed"], true, "{again}");
    assert_eq!(again["admission_id"], first["admission_id"]);
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger WHERE event_type = 'admission.decided'")
            .fetch_one(env.pool())
            .await
            .unwrap();
    assert_eq!(n, 1, "one admission in the ledger");
    stack.stop().await;
    env.cleanup().await;
}

/// Class 10: the v2 features — subject deletion, model groups in use, credits clear / id / at /
/// barrier, refill rules, the `rejected` state, the API token's read scope and `as_of`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_features_exist() {
    let env = TestEnv::new(BACKFILL).await;
    let stack = Stack::start(&env).await;
    // DELETE /v1/subjects: 409 while a child names it; then its policies and credits go with it.
    ok_put(&stack, "/v1/subjects/key:d1", json!({"parent": "user:d"})).await;
    ok_put(&stack, "/v1/policies/d-pol", json!({"subject": "user:d", "metric": "requests", "limit": 9, "window": {"kind": "lifetime"}})).await;
    let (st, _) = stack
        .admin(
            "POST",
            "/v1/credits/user:d",
            Some(json!({"op": "set", "amount": 5})),
        )
        .await;
    assert_eq!(st, 200);
    let (st, b) = stack.admin("DELETE", "/v1/subjects/user:d", None).await;
    assert_eq!(
        (st, b["error"]["field"].as_str()),
        (409, Some("subject")),
        "{b}"
    );
    let (st, _) = stack.admin("DELETE", "/v1/subjects/key:d1", None).await;
    assert_eq!(st, 204);
    let (st, _) = stack.admin("DELETE", "/v1/subjects/user:d", None).await;
    assert_eq!(st, 204);
    let (_, p) = stack
        .admin("GET", "/v1/policies?subject=user:d", None)
        .await;
    assert_eq!(p["policies"], json!([]), "{p}");
    let (st, _) = stack.admin("GET", "/v1/subjects/user:d", None).await;
    assert_eq!(st, 404);
    // Model groups named by a policy or grant cannot be deleted.
    ok_put(
        &stack,
        "/v1/model-groups/gpt",
        json!({"models": ["gpt-4o"]}),
    )
    .await;
    ok_put(&stack, "/v1/policies/g-pol", json!({"subject": "key:g", "model_group": "gpt", "metric": "cost", "limit": 9, "window": {"kind": "lifetime"}})).await;
    let (st, b) = stack.admin("DELETE", "/v1/model-groups/gpt", None).await;
    println!("model group in use: {st} {b}");
    assert_eq!((st, b["error"]["field"].as_str()), (409, Some("name")));
    let (st, b) = stack.admin("POST", "/v1/grants", Some(json!({"subject": "key:g", "model_group": "nope", "metric": "cost", "amount": 5, "expires_at": ts(Utc::now() + TimeDelta::hours(1))}))).await;
    assert_eq!(
        (st, b["error"]["field"].as_str()),
        (400, Some("model_group")),
        "{b}"
    );
    // Credits: id makes a write idempotent; clear removes the balance; daily refills take no day.
    let (_, a) = stack
        .admin(
            "POST",
            "/v1/credits/key:c",
            Some(json!({"op": "set", "amount": 10})),
        )
        .await;
    assert_eq!(a["remaining"], 10);
    for _ in 0..2 {
        let (st, a) = stack
            .admin(
                "POST",
                "/v1/credits/key:c",
                Some(json!({"id": "w1", "op": "decrement", "amount": 3})),
            )
            .await;
        assert_eq!((st, a["remaining"].as_i64()), (200, Some(7)), "{a}");
    }
    let (st, b) = stack.admin("POST", "/v1/credits/key:c", Some(json!({"op": "set", "amount": 1, "refill": {"amount": 5, "interval": "daily", "day": 3}}))).await;
    assert_eq!(
        (st, b["error"]["field"].as_str()),
        (400, Some("refill.day")),
        "{b}"
    );
    // A set is a barrier: a request admitted before it is not charged against the new balance.
    let d = admit(&stack, "c-1", "key:c", json!({"credits": 2}), Utc::now()).await;
    assert_eq!(d["admitted"], true);
    let (_, a) = stack
        .admin(
            "POST",
            "/v1/credits/key:c",
            Some(json!({"op": "set", "amount": 5, "at": ts(Utc::now())})),
        )
        .await;
    assert_eq!(a["remaining"], 5, "{a}");
    settle(
        &stack,
        json!({"request_id": "c-1", "usage": {"credits": 2}}),
    )
    .await;
    let (_, q) = stack.get("/v1/quota?subject=key:c").await;
    assert_eq!(
        check(&q, "credits")["remaining"],
        5,
        "the old request's usage is not charged: {q}"
    );
    let (_, a) = stack
        .admin("POST", "/v1/credits/key:c", Some(json!({"op": "clear"})))
        .await;
    assert_eq!(a["remaining"], Value::Null, "{a}");
    let (_, q) = stack.get("/v1/quota?subject=key:c").await;
    assert!(
        q["checks"].as_array().unwrap().is_empty(),
        "unlimited again: {q}"
    );
    // A refused request reads as `rejected`.
    ok_put(
        &stack,
        "/v1/policies/none",
        json!({"subject": "key:rej", "metric": "cost", "limit": 1, "window": {"kind": "lifetime"}}),
    )
    .await;
    let d = admit(&stack, "rej-1", "key:rej", json!({"cost": 2}), Utc::now()).await;
    assert_eq!(d["admitted"], false);
    let (_, r) = stack.get("/v1/requests/rej-1").await;
    assert_eq!(r["state"], "rejected", "{r}");
    // API tokens read quota, usage, requests; configuration reads are admin-only.
    let (st, _) = stack.get("/v1/subjects/key:c").await;
    assert_eq!(st, 403);
    let (st, _) = stack.get("/v1/policies").await;
    assert_eq!(st, 403);
    // as_of on /v1/quota and on the admission answer.
    let (_, q) = stack.get("/v1/quota?subject=key:rej").await;
    println!("as_of: {} / {}", q["as_of"], d["as_of"]);
    assert!(q["as_of"]["stream_seq"].as_u64().unwrap() > 0, "{q}");
    assert!(q["as_of"]["lag_ms"].is_u64(), "{q}");
    assert!(d["as_of"]["stream_seq"].is_u64(), "{d}");
    stack.stop().await;
    env.cleanup().await;
}

/// A request id reused after its idempotency window (2 × TTL) is a new request — in the live
/// state, the ledger, the projections and after a restart alike. Before, the ledger dropped the
/// new request's settlement as a duplicate of the old one's (`rid:0`) while the live state counted
/// it, so the usage vanished from billing and from the quota at the next restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_request_id_is_a_new_request_everywhere() {
    let env = TestEnv::new(&["--reservation-ttl", "1s"]).await;
    let stack = Stack::start(&env).await;
    ok_put(&stack, "/v1/policies/life", json!({"subject": "key:reuse", "metric": "cost", "limit": 1000, "window": {"kind": "lifetime"}})).await;
    let first = admit(
        &stack,
        "same-id",
        "key:reuse",
        json!({"cost": 10}),
        Utc::now(),
    )
    .await;
    settle(
        &stack,
        json!({"request_id": "same-id", "usage": {"cost": 100}}),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let second = admit(
        &stack,
        "same-id",
        "key:reuse",
        json!({"cost": 10}),
        Utc::now(),
    )
    .await;
    println!(
        "second decision for the id: replayed {} ({} then {})",
        second["replayed"], first["admission_id"], second["admission_id"]
    );
    assert_eq!(second["replayed"], false);
    assert_ne!(second["admission_id"], first["admission_id"]);
    let b = settle(
        &stack,
        json!({"request_id": "same-id", "usage": {"cost": 50}}),
    )
    .await;
    assert_eq!(b["matched_admission"], true);
    let (_, q) = stack.get("/v1/quota?subject=key:reuse").await;
    assert_eq!(check(&q, "life")["used"], 150, "live: {q}");
    env.eventually("both settlements in the ledger", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM ledger WHERE request_id = 'same-id' AND event_type = 'usage.settled'")
            .fetch_one(env.pool()).await.unwrap() == 2
    }).await;
    env.eventually("the usage projection counts both", || async {
        let (_, u) = stack
            .get("/v1/usage?subject=key:reuse&granularity=day")
            .await;
        u["totals"]["cost"] == 150
    })
    .await;
    stack.stop().await;
    let stack = Stack::start(&env).await;
    let (_, q) = stack.get("/v1/quota?subject=key:reuse").await;
    println!("after a restart: used {}", check(&q, "life")["used"]);
    assert_eq!(check(&q, "life")["used"], 150, "after a restart: {q}");
    stack.stop().await;
    env.cleanup().await;
}
