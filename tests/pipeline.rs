//! End-to-end pipeline tests on real JetStream and Postgres: admit → settle → ledger → usage,
//! duplicates and redeliveries, dead letters.

mod common;

use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use common::{Stack, TestEnv};
use serde_json::json;
use tally_events::*;
use tally_ledger::Publisher;

fn minute_ago() -> DateTime<Utc> {
    (Utc::now() - TimeDelta::minutes(5))
        .duration_trunc(TimeDelta::minutes(1))
        .unwrap()
        + TimeDelta::seconds(17)
}

fn usage_path(subject: &str, at: DateTime<Utc>, granularity: &str) -> String {
    let from = (at - TimeDelta::days(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let to = (at + TimeDelta::days(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    format!("/v1/usage?subject={subject}&granularity={granularity}&from={from}&to={to}")
}

type Amounts = (i64, i64, i64, i64, i64);
type LedgerRow = (String, Amounts, bool, bool, Vec<String>, DateTime<Utc>);

async fn ledger_rows(env: &TestEnv, request_id: &str) -> Vec<LedgerRow> {
    type Row = (
        String,
        i64,
        i64,
        i64,
        i64,
        i64,
        bool,
        bool,
        Vec<String>,
        DateTime<Utc>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT event_type, requests, input_tokens, output_tokens, cost, credits, counted_in_key_global, \
         counted_in_user_global, chain, window_at FROM ledger WHERE request_id = $1 ORDER BY pos",
    )
    .bind(request_id)
    .fetch_all(env.pool())
    .await
    .unwrap();
    rows.into_iter()
        .map(|r| (r.0, (r.1, r.2, r.3, r.4, r.5), r.6, r.7, r.8, r.9))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admit_then_settle_lands_in_ledger_and_usage() {
    let env = TestEnv::new(&[]).await;
    let stack = Stack::start(&env).await;
    let at = minute_ago();
    let admit = json!({"request_id": "r-1", "subject": "key:k_1", "model": "gpt-4o",
        "estimate": {"cost": 5000, "input_tokens": 100}, "at": at});
    let (status, body) = stack.post("/v1/admit", admit.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["admitted"], true);
    assert_eq!(body["replayed"], false);
    assert_eq!(body["reason"], serde_json::Value::Null);
    assert_eq!(body["counted_in_key_global"], true);
    assert_eq!(body["counted_in_user_global"], true);
    assert_eq!(body["checks"], json!([]));
    let admission_id = body["admission_id"].clone();

    let settle = json!({"request_id": "r-1", "usage": {"input_tokens": 120, "output_tokens": 30, "cost": 4200}});
    let (status, body) = stack.post("/v1/settle", settle).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["matched_admission"], true);
    assert_eq!(body["settlement_id"], "r-1:0");

    env.eventually("two ledger rows", || async {
        env.ledger_count().await == 2
    })
    .await;
    let rows = ledger_rows(&env, "r-1").await;
    println!("ledger rows: {rows:?}");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].0, "admission.decided");
    assert_eq!(
        rows[0].1,
        (1, 100, 0, 5000, 0),
        "admission row carries the estimate"
    );
    assert_eq!(rows[1].0, "usage.settled");
    assert_eq!(
        rows[1].1,
        (1, 120, 30, 4200, 0),
        "settlement row carries actual usage; the final one counts the request"
    );
    for r in &rows {
        assert!(r.2 && r.3, "counted flags copied to every row");
        assert_eq!(r.4, vec!["key:k_1".to_string()]);
        assert_eq!(r.5, at, "usage belongs to the admission's window time");
    }

    for g in ["minute", "hour", "day"] {
        let path = usage_path("key:k_1", at, g);
        let want = json!({"requests": 1, "input_tokens": 120, "output_tokens": 30, "cost": 4200, "credits": 0});
        env.eventually(&format!("usage by {g}"), || async {
            stack.get(&path).await.1["totals"] == want
        })
        .await;
        let last = stack.get(&path).await.1["totals"].clone();
        println!("usage {g}: {last}");
    }
    let (_, minute) = stack.get(&usage_path("key:k_1", at, "minute")).await;
    let bucket = at.duration_trunc(TimeDelta::minutes(1)).unwrap();
    let hit: Vec<_> = minute["series"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["cost"] != 0)
        .collect();
    assert_eq!(hit.len(), 1);
    assert_eq!(
        hit[0]["start"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap(),
        bucket
    );

    // Idempotent admission: the first decision, replayed, nothing new published.
    let (status, body) = stack.post("/v1/admit", admit).await;
    assert_eq!(status, 200);
    assert_eq!(body["replayed"], true);
    assert_eq!(body["admission_id"], admission_id);
    let (status, view) = stack.get("/v1/requests/r-1").await;
    assert_eq!(status, 200);
    assert_eq!(view["state"], "settled");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        env.ledger_count().await,
        2,
        "a replayed admission publishes nothing"
    );

    stack.stop().await;
    env.cleanup().await;
}

fn direct_settlement(request_id: &str, settlement_id: &str, cost: i64) -> Envelope {
    let subject = Subject::parse("key:dup").unwrap();
    let data = UsageSettled {
        settlement_id: settlement_id.into(),
        usage: Usage {
            requests: 1,
            cost,
            ..Usage::default()
        },
        success: true,
        is_final: true,
        seq: 0,
        matched_admission: false,
        admission_id: None,
        model: None,
        model_group: None,
        chain: vec![subject.clone()],
        counted_in_key_global: true,
        counted_in_user_global: true,
        window_at: minute_ago(),
    };
    Envelope::new(
        EventData::UsageSettled(data),
        minute_ago(),
        Some(request_id.into()),
        Some(subject),
    )
}

async fn cost_total(stack: &Stack, subject: &str) -> i64 {
    let (_, body) = stack.get(&usage_path(subject, minute_ago(), "hour")).await;
    body["totals"]["cost"].as_i64().unwrap_or(-1)
}

async fn checkpoint_reaches(env: &TestEnv, seq: u64) {
    env.eventually("ledger checkpoint", || async {
        tally_ledger::writer::load_checkpoint(env.pool(), "tally-ledger")
            .await
            .unwrap()
            >= seq
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_redeliveries_change_nothing() {
    let env = TestEnv::new(&[]).await;
    let stack = Stack::start_with(&env, false).await;
    let publisher = Publisher::new(env.conns.js.clone(), env.conns.stream.clone());
    let mut ledger = tally::stack::Shutdown::default();
    let (_, mut writer) = tally::stack::spawn_ledger(&env.conns, &ledger);

    // Same event published twice: JetStream keeps one (same Nats-Msg-Id).
    let e1 = direct_settlement("dup-1", "dup-1:0", 700);
    let s1 = publisher.publish(&e1).await.unwrap();
    let s1_again = publisher.publish(&e1).await.unwrap();
    assert_eq!(s1, s1_again, "the stream deduplicates by Nats-Msg-Id");
    // Same event again outside the duplicate window (different msg id): a second stream message.
    let subject = env.conns.stream.subject_for(&e1);
    let s1_late = publisher
        .publish_raw(subject, format!("late-{}", e1.id), e1.encode().into())
        .await
        .unwrap();
    assert!(s1_late > s1);
    // The same settlement retried as a new event (new event id, same settlement id).
    let e1_retry = direct_settlement("dup-1", "dup-1:0", 700);
    let last = publisher.publish(&e1_retry).await.unwrap();
    checkpoint_reaches(&env, last).await;
    env.eventually("usage projected", || async {
        cost_total(&stack, "key:dup").await == 700
    })
    .await;
    assert_eq!(env.ledger_count().await, 1, "one fact, one row");
    // The row keeps the payload exactly as it was published (ADR 0007), not a re-rendering.
    let stored: String =
        sqlx::query_scalar("SELECT payload::text FROM ledger WHERE request_id = 'dup-1'")
            .fetch_one(env.pool())
            .await
            .unwrap();
    assert_eq!(
        stored,
        String::from_utf8(e1.encode()).unwrap(),
        "the raw payload, byte for byte"
    );

    // Lost acks: the consumer forgets everything it acked and redelivers the whole stream.
    ledger.trigger();
    writer.await.unwrap().unwrap();
    let stream = env.conns.js.get_stream(&env.stream).await.unwrap();
    stream.delete_consumer("tally-ledger").await.unwrap();
    ledger = tally::stack::Shutdown::default();
    let (stats, w) = tally::stack::spawn_ledger(&env.conns, &ledger);
    writer = w;
    env.eventually("all messages redelivered", || async {
        stats.duplicates.load(std::sync::atomic::Ordering::Relaxed) >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "redelivered duplicates: {}",
        stats.duplicates.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_eq!(env.ledger_count().await, 1);
    assert_eq!(
        cost_total(&stack, "key:dup").await,
        700,
        "totals unchanged by redelivery"
    );

    ledger.trigger();
    writer.await.unwrap().unwrap();
    stack.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_and_the_pipeline_continues() {
    let env = TestEnv::new(&[]).await;
    let stack = Stack::start(&env).await;
    let publisher = Publisher::new(env.conns.js.clone(), env.conns.stream.clone());
    let prefix = env.conns.stream.prefix();
    let bad_json = publisher
        .publish_raw(
            format!("{prefix}.usage.0.usage.settled"),
            "bad-1".into(),
            "{not json".into(),
        )
        .await
        .unwrap();
    let mut unknown: serde_json::Value =
        serde_json::from_slice(&direct_settlement("x", "x:0", 1).encode()).unwrap();
    unknown["type"] = "usage.invented".into();
    let bad_type = publisher
        .publish_raw(
            format!("{prefix}.usage.0.x"),
            "bad-2".into(),
            serde_json::to_vec(&unknown).unwrap().into(),
        )
        .await
        .unwrap();
    let mut negative: serde_json::Value =
        serde_json::from_slice(&direct_settlement("y", "y:0", 1).encode()).unwrap();
    negative["data"]["usage"]["cost"] = (-5).into();
    publisher
        .publish_raw(
            format!("{prefix}.usage.0.usage.settled"),
            "bad-3".into(),
            serde_json::to_vec(&negative).unwrap().into(),
        )
        .await
        .unwrap();
    let good = direct_settlement("after-bad", "after-bad:0", 900);
    let last = publisher.publish(&good).await.unwrap();
    checkpoint_reaches(&env, last).await;

    let rejects: Vec<(i64, String, Option<String>)> =
        sqlx::query_as("SELECT stream_seq, reason, field FROM ledger_rejects ORDER BY stream_seq")
            .fetch_all(env.pool())
            .await
            .unwrap();
    println!("rejects: {rejects:?}");
    assert_eq!(rejects.len(), 3);
    assert_eq!(rejects[0].0 as u64, bad_json);
    assert!(rejects[0].1.contains("malformed"), "{}", rejects[0].1);
    assert_eq!(rejects[1].0 as u64, bad_type);
    assert!(rejects[1].1.contains("unknown event type `usage.invented`"));
    assert_eq!(rejects[2].2.as_deref(), Some("data.usage.cost"));
    let (dlq, _) = env.conns.stream.dead_letter();
    let mut dlq = env.conns.js.get_stream(&dlq).await.unwrap();
    assert_eq!(
        dlq.info().await.unwrap().state.messages,
        3,
        "each bad message is on the dead-letter stream"
    );
    assert_eq!(
        env.ledger_count().await,
        1,
        "the event after the bad ones is written"
    );
    env.eventually("usage after bad messages", || async {
        cost_total(&stack, "key:dup").await == 900
    })
    .await;

    stack.stop().await;
    env.cleanup().await;
}

/// The conditional publish behind admin writes: JetStream refuses a config event when another
/// landed on its subject after the sequence the writer validated against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_config_publish_detects_a_concurrent_writer() {
    let env = TestEnv::new(&[]).await;
    let publisher = tally_ledger::Publisher::new(env.conns.js.clone(), env.conns.stream.clone());
    let upsert = |parent: Option<&str>| {
        Envelope::new(
            EventData::SubjectUpserted(tally_events::SubjectUpserted {
                parent: parent.map(|p| Subject::parse(p).unwrap()),
                groups: vec![],
                disabled: false,
            }),
            chrono::Utc::now(),
            None,
            Some(Subject::parse("team:t").unwrap()),
        )
    };
    let first = upsert(None);
    let subject = env.conns.stream.subject_for(&first);
    assert_eq!(publisher.last_sequence_on(&subject).await.unwrap(), 0);
    let s1 = publisher.publish_if_last(&first, 0).await.unwrap();
    assert_eq!(publisher.last_sequence_on(&subject).await.unwrap(), s1);
    let stale = publisher
        .publish_if_last(&upsert(Some("customer:c")), 0)
        .await;
    assert!(
        matches!(stale, Err(tally_ledger::Error::ConcurrentWrite { .. })),
        "{stale:?}"
    );
    let s2 = publisher
        .publish_if_last(&upsert(Some("customer:c")), s1)
        .await
        .unwrap();
    assert!(s2 > s1);
    env.cleanup().await;
}
