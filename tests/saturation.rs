//! Poison-proof (SPEC v2 §4, §10.10; issue 4 test 3): one subject's totals pushed past `i64::MAX`
//! on every metric through `POST /v1/settle` (9,300 direct settlements of the per-request
//! maximum). The stack keeps answering; restarted on the same stream and database it starts,
//! refuses that subject, admits others, and the ledger writer and every projection advance.

mod common;

use std::sync::Arc;

use common::{Stack, TestEnv};
use serde_json::json;

const MAX: i64 = 1_000_000_000_000_000;
const SETTLEMENTS: usize = 9_300;
const CLIENTS: usize = 24;

async fn flood(stack: Arc<Stack>, subject: &str) {
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (stack, subject) = (stack.clone(), subject.to_owned());
        tasks.push(tokio::spawn(async move {
            for i in (c..SETTLEMENTS).step_by(CLIENTS) {
                let usage = json!({"requests": MAX, "input_tokens": MAX, "output_tokens": MAX, "cost": MAX, "credits": MAX});
                let (st, b) = stack
                    .post("/v1/settle", json!({"request_id": format!("flood-{i}"), "subject": subject, "usage": usage}))
                    .await;
                assert_eq!(st, 202, "settlement {i}: {b}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn decide(stack: &Stack, rid: &str, subject: &str) -> serde_json::Value {
    let (st, d) = stack
        .post("/v1/admit", json!({"request_id": rid, "subject": subject, "estimate": {"input_tokens": 1, "output_tokens": 1, "cost": 1, "credits": 1}}))
        .await;
    assert_eq!(st, 200, "{d}");
    d
}

async fn projections_caught_up(env: &TestEnv) -> bool {
    let head: i64 = sqlx::query_scalar("SELECT COALESCE(max(pos), 0) FROM ledger")
        .fetch_one(env.pool())
        .await
        .unwrap();
    let behind: i64 =
        sqlx::query_scalar("SELECT count(*) FROM projection_checkpoints WHERE last_pos < $1")
            .bind(head)
            .fetch_one(env.pool())
            .await
            .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_checkpoints")
        .fetch_one(env.pool())
        .await
        .unwrap();
    n >= 2 && behind == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_totals_survive_a_restart_and_stop_nothing() {
    let env = TestEnv::new(&[]).await;
    let stack = Arc::new(Stack::start(&env).await);
    for (i, metric) in [
        "requests",
        "input_tokens",
        "output_tokens",
        "tokens",
        "cost",
        "credits",
    ]
    .iter()
    .enumerate()
    {
        let (st, b) = stack
            .admin("PUT", &format!("/v1/policies/sat-{i}"), Some(json!({"subject": "key:hot", "metric": metric, "limit": MAX, "window": {"kind": "lifetime"}})))
            .await;
        assert_eq!(st, 200, "{b}");
    }
    flood(stack.clone(), "key:hot").await;
    let d = decide(&stack, "after-flood", "key:hot").await;
    println!(
        "after {SETTLEMENTS} settlements of 10^15: admitted {} used {:?}",
        d["admitted"],
        d["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["used"].clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(d["admitted"], false);
    for c in d["checks"].as_array().unwrap() {
        assert_eq!(c["used"], i64::MAX, "saturated, never wrapped: {c}");
        assert_eq!(c["outcome"], "fail");
    }
    env.eventually("the ledger has the flood", || async {
        env.ledger_count().await >= SETTLEMENTS as i64 + 7
    })
    .await;
    env.eventually("projections caught up", || projections_caught_up(&env))
        .await;
    Arc::into_inner(stack).unwrap().stop().await;

    // Restart on the same stream and database: the rebuild folds the saturating history.
    let stack = Stack::start(&env).await;
    let d = decide(&stack, "after-restart", "key:hot").await;
    assert_eq!(d["admitted"], false, "still refused after the restart: {d}");
    assert!(
        d["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["used"] == i64::MAX)
    );
    let d = decide(&stack, "other", "key:cool").await;
    assert_eq!(d["admitted"], true, "others are admitted: {d}");
    let (st, _) = stack
        .post(
            "/v1/settle",
            json!({"request_id": "other", "usage": {"cost": 5}}),
        )
        .await;
    assert_eq!(st, 202);
    let before = env.ledger_count().await;
    env.eventually("the ledger writer advances", || async {
        env.ledger_count().await > before || env.ledger_count().await >= SETTLEMENTS as i64 + 10
    })
    .await;
    env.eventually("every projection advances to the head", || {
        projections_caught_up(&env)
    })
    .await;
    let (_, u) = stack.get("/v1/usage?subject=key:hot&granularity=day").await;
    println!("usage projection totals of key:hot: {}", u["totals"]);
    assert_eq!(u["totals"]["cost"], i64::MAX, "{u}");
    let used: i64 =
        sqlx::query_scalar("SELECT max(used) FROM quota_windows WHERE subject = 'key:hot'")
            .fetch_one(env.pool())
            .await
            .unwrap();
    assert_eq!(used, i64::MAX, "the quota projection saturates too");
    stack.stop().await;
    env.cleanup().await;
}
