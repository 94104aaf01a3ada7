//! The ledger writer killed (SIGKILL) in the middle of a stream of thousands of events and
//! restarted: the ledger holds every acknowledged event exactly once.

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use chrono::Utc;
use common::TestEnv;
use futures::StreamExt;
use tally_events::*;
use tally_ledger::Publisher;
use tokio::process::{Child, Command};

const EVENTS: usize = 4000;
/// Publishes in flight from the test; enough to keep the writer busy while it is killed.
const CONCURRENCY: usize = 64;

fn spawn_writer(env: &TestEnv) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("ledger")
        .envs(env.child_env())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tally ledger")
}

fn event(i: usize) -> Envelope {
    let subject = Subject::parse(&format!("key:k_{}", i % 50)).unwrap();
    let data = UsageSettled {
        settlement_id: format!("c-{i}:0"),
        usage: Usage {
            requests: 1,
            cost: 10,
            ..Usage::default()
        },
        success: true,
        is_final: true,
        seq: 0,
        matched_admission: false,
        admission_id: None,
        model: Some("m".into()),
        model_group: None,
        chain: vec![subject.clone()],
        counted_in_key_global: true,
        counted_in_user_global: true,
        window_at: Utc::now(),
    };
    Envelope::new(
        EventData::UsageSettled(data),
        Utc::now(),
        Some(format!("c-{i}")),
        Some(subject),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_killed_mid_stream_loses_nothing_and_duplicates_nothing() {
    let env = TestEnv::new(&[]).await;
    let publisher = Publisher::new(env.conns.js.clone(), env.conns.stream.clone());
    let mut writer = spawn_writer(&env);
    let publisher = std::sync::Arc::new(publisher);

    let publish_all = futures::stream::iter(0..EVENTS)
        .map(move |i| {
            let p = std::sync::Arc::clone(&publisher);
            async move {
                let e = event(i);
                p.publish(&e).await.map(|_| e.id)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>();
    let publishing = tokio::spawn(publish_all);

    env.eventually("writer to commit some rows", || async {
        env.ledger_count().await >= 300
    })
    .await;
    writer.start_kill().unwrap(); // SIGKILL: no graceful stop
    let status = writer.wait().await.unwrap();
    let at_kill = env.ledger_count().await;
    println!("killed writer ({status}) with {at_kill} rows committed");
    assert!(!status.success());
    assert!((at_kill as usize) < EVENTS, "the kill must land mid-stream");

    let acked: HashSet<uuid::Uuid> = publishing
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.expect("publish acked"))
        .collect();
    assert_eq!(acked.len(), EVENTS);
    let mut writer = spawn_writer(&env);
    env.eventually("ledger to hold every acknowledged event", || async {
        env.ledger_count().await as usize >= EVENTS
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM ledger")
        .fetch_all(env.pool())
        .await
        .unwrap();
    let in_ledger: HashSet<uuid::Uuid> = ids.iter().copied().collect();
    println!(
        "acked {} events; ledger has {} rows, {} distinct ids",
        acked.len(),
        ids.len(),
        in_ledger.len()
    );
    assert_eq!(ids.len(), in_ledger.len(), "no event twice");
    assert_eq!(in_ledger, acked, "exactly the acknowledged events");
    let cost: i64 = sqlx::query_scalar("SELECT sum(cost)::int8 FROM ledger")
        .fetch_one(env.pool())
        .await
        .unwrap();
    assert_eq!(cost, 10 * EVENTS as i64);

    writer.start_kill().unwrap();
    let _ = writer.wait().await;
    env.cleanup().await;
}
