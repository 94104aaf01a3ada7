//! Failure modes (issue 3, test 6): Postgres stopped in the middle of load and started again.
//! Runs its own private Postgres (through `tally up`'s own service code) so the shared server
//! keeps serving the other tests.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Stack, TestEnv, load};
use serde_json::json;
use tally::services::{Services, ServicesMode, ServicesOptions};
use tally_events::Envelope;
use tally_events::quota::{AdmitRequest, QuotaState};

const SUBJECTS: [&str; 2] = ["key:pa", "key:pb"];
/// High enough never to refuse: the drill is about recording, not limits.
const LIMIT: i64 = 1_000_000_000;

async fn private_postgres(dir: &std::path::Path) -> Services {
    Services::ensure(&ServicesOptions {
        mode: ServicesMode::Private,
        nats_url: Some(common::nats_url()),
        database_url: None,
        data_dir: dir.to_owned(),
        install_missing: false,
    })
    .await
    .expect("private Postgres (scripts/test installs postgresql)")
}

/// The lifetime-cost check of `subject` as `/v1/quota` shows it: (used, reserved).
async fn live_quota(stack: &Stack, subject: &str) -> (i64, i64) {
    let (st, q) = stack.get(&format!("/v1/quota?subject={subject}")).await;
    assert_eq!(st, 200, "{q}");
    let c = &q["checks"][0];
    (c["used"].as_i64().unwrap(), c["reserved"].as_i64().unwrap())
}

/// The same check from a fresh fold of every ledger row, in stream order: a replay.
async fn replayed_quota(env: &TestEnv, subject: &str) -> (i64, i64) {
    let rows: Vec<(serde_json::Value,)> =
        sqlx::query_as("SELECT payload FROM ledger ORDER BY stream_seq")
            .fetch_all(env.pool())
            .await
            .unwrap();
    let mut state = QuotaState::default();
    for (payload,) in rows {
        let env = Envelope::decode(&serde_json::to_vec(&payload).unwrap()).unwrap();
        state.apply(&env);
    }
    let leaf = tally_events::Subject::parse(subject).unwrap();
    let d = state.decide(&AdmitRequest {
        leaf: &leaf,
        model: None,
        estimate: tally_events::Usage {
            requests: 1,
            ..Default::default()
        },
        credits: Some(0),
        at: chrono::Utc::now(),
    });
    let c = serde_json::to_value(&d.checks[0]).unwrap();
    (c["used"].as_i64().unwrap(), c["reserved"].as_i64().unwrap())
}

/// Postgres stopped for three seconds under 8-client load: every admission and settlement is
/// still answered (the API decides on its in-memory state), the ledger catches up once Postgres
/// is back, and the live totals equal a replay of the ledger, the Postgres projections and what
/// the clients were told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_load_loses_nothing() {
    let dir = std::env::temp_dir().join(format!("tally-pg-{}", uuid::Uuid::new_v4().simple()));
    let services = private_postgres(&dir).await;
    let server = common::database_url_on(&services.database_url, "postgres");
    let env = TestEnv::new_on(&common::nats_url(), &server, &[]).await;
    let stack = Arc::new(Stack::start(&env).await);
    for s in SUBJECTS {
        let (st, b) = stack
            .admin(
                "PUT",
                &format!("/v1/policies/life-{}", &s[4..]),
                Some(json!({"subject": s, "metric": "cost", "limit": LIMIT, "window": {"kind": "lifetime"}})),
            )
            .await;
        assert_eq!(st, 200, "{b}");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let runner = tokio::spawn(load::run(stack.clone(), &SUBJECTS, 8, stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    services.stop_private_postgres().unwrap();
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (st, ready) = stack.get("/readyz").await;
    println!("readyz with Postgres down: {st} {ready}");
    assert_eq!(st, 200, "admissions still work: {ready}");
    assert_eq!(ready["checks"]["postgres"], "unreachable", "{ready}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    services.start_private_postgres().unwrap();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let outcomes = runner.await.unwrap();

    let during = outcomes
        .iter()
        .filter(|o| o.sent > stopped && o.sent < started)
        .count();
    println!(
        "Postgres drill: {} requests, {during} sent while Postgres was down",
        outcomes.len()
    );
    assert!(during > 100, "load ran while Postgres was down");
    assert!(
        outcomes
            .iter()
            .all(|o| o.admit_status == 200 && o.admitted && o.settle_status == Some(202)),
        "every admission and settlement answered while Postgres was away"
    );
    let expected = (outcomes.len() * 2 + SUBJECTS.len()) as i64;
    let t = Instant::now();
    env.eventually("the ledger catches up", || async {
        env.ledger_count().await >= expected
    })
    .await;
    println!("ledger caught up {:?} after the load stopped", t.elapsed());
    assert_eq!(env.ledger_count().await, expected, "nothing twice");
    let rows = load::ledger_rows(env.pool()).await;
    for o in &outcomes {
        assert_eq!(
            rows.get(&o.request_id).copied(),
            Some((1, 1)),
            "{}",
            o.request_id
        );
    }
    for s in SUBJECTS {
        check_totals(&env, &stack, &outcomes, s).await;
    }
    match Arc::try_unwrap(stack) {
        Ok(s) => s.stop().await,
        Err(_) => panic!("load still holds the stack"),
    }
    env.cleanup().await;
    drop(services);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Live (in-memory) = replay of the ledger = quota projection = usage projection = clients.
async fn check_totals(env: &TestEnv, stack: &Stack, outcomes: &[load::Outcome], subject: &str) {
    let told: i64 = outcomes
        .iter()
        .filter(|o| o.subject == subject)
        .map(|o| o.cost)
        .sum();
    let live = live_quota(stack, subject).await;
    let replay = replayed_quota(env, subject).await;
    env.eventually("the projections catch up", || async {
        let mut caught_up = true;
        for e in tally_projector::registry::REGISTRY {
            let lag = tally_projector::runner::lag_rows(env.pool(), e.name, e.order).await;
            caught_up &= matches!(lag, Ok(Some(0)));
        }
        caught_up
    })
    .await;
    let projected: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(used), 0)::bigint FROM quota_windows WHERE subject = $1 AND metric = 'cost'",
    )
    .bind(subject)
    .fetch_one(env.pool())
    .await
    .unwrap();
    let (st, usage) = stack
        .get(&format!("/v1/usage?subject={subject}&granularity=day"))
        .await;
    assert_eq!(st, 200, "{usage}");
    let usage_cost = usage["totals"]["cost"].as_i64().expect("usage totals");
    println!(
        "{subject}: clients {told}, live {live:?}, replay {replay:?}, quota projection {projected}, usage projection {usage_cost}"
    );
    assert_eq!(
        live,
        (told, 0),
        "live used = settled, nothing left reserved"
    );
    assert_eq!(replay, live, "replay of the ledger equals live");
    assert_eq!(projected, told, "quota projection");
    assert_eq!(usage_cost, told, "usage projection");
}
