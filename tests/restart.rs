//! History at scale (issue 5) on the real stack: a restart over a history many rebuild pages long
//! is exact, from a snapshot and without one (deleted or corrupted: the instance falls back and
//! says so); a snapshot writer killed half way leaves nothing behind and the next start is right;
//! a background task that dies is noticed.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Stack, TestEnv};
use serde_json::{Value, json};
use tally::history::{self, HistorySpec};

/// The instant every comparison in a test evaluates at (windows move with time).
fn fixed_at() -> String {
    let t = chrono::Utc::now() - chrono::TimeDelta::seconds(30);
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Every check of every subject's `/v1/quota` at `at`, keyed by subject: what an admission would
/// see. Sixteen reads at a time.
async fn quotas(stack: &Stack, subjects: &[String], at: &str) -> BTreeMap<String, Value> {
    use futures::StreamExt;
    futures::stream::iter(subjects)
        .map(|s| async move {
            let (st, q) = stack.get(&format!("/v1/quota?subject={s}&at={at}")).await;
            assert_eq!(st, 200, "{q}");
            let checks: Vec<Value> = q["checks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    json!([
                        c["policy_id"],
                        c["subject"],
                        c["window"],
                        c["limit"],
                        c["used"],
                        c["reserved"],
                        c["remaining"],
                        c["outcome"]
                    ])
                })
                .collect();
            (
                s.clone(),
                json!({"disabled": q["disabled"], "checks": checks}),
            )
        })
        .buffer_unordered(16)
        .collect()
        .await
}

/// Equal, or a panic naming the first subject that differs (not thousands of them).
fn assert_same(got: &BTreeMap<String, Value>, want: &BTreeMap<String, Value>, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    if let Some((k, v)) = got.iter().find(|(k, v)| want.get(*k) != Some(*v)) {
        panic!("{what}: {k} differs\n got  {v}\n want {}", want[k]);
    }
}

fn spec(events: u64, keys: usize) -> HistorySpec {
    HistorySpec {
        events,
        keys,
        users: keys / 10,
        teams: keys / 100,
        customers: 5,
        days: 30,
        seed: 11,
    }
}

async fn stream_last_seq(env: &TestEnv) -> u64 {
    tally_ledger::stream::last_sequence(&env.conns.js, &env.stream)
        .await
        .unwrap()
}

/// Wait until the ledger holds the whole stream and `stack` has folded all of it.
async fn settle_all(env: &TestEnv, stack: &Stack) {
    let last = stream_last_seq(env).await;
    env.eventually("the ledger has the whole stream", || async {
        tally_ledger::reader::contiguous_seq(env.pool())
            .await
            .unwrap()
            >= last
    })
    .await;
    env.eventually("the instance folded the whole stream", || async {
        let (_, q) = stack.get("/v1/quota?subject=key:k0").await;
        q["as_of"]["stream_seq"].as_u64().unwrap_or(0) >= last
    })
    .await;
}

async fn snapshots(env: &TestEnv) -> Vec<(i64, i64)> {
    sqlx::query_as("SELECT id, stream_seq FROM quota_snapshots ORDER BY stream_seq DESC")
        .fetch_all(env.pool())
        .await
        .unwrap()
}

async fn start_and_watch(env: &TestEnv) -> (Stack, Value) {
    let stack = Stack::start_opts(env, true, false).await;
    let ready = stack.readyz().await;
    (stack, ready)
}

/// Tests 1 and 2: 220,000 events (44 rebuild pages); restart from the newest snapshot, then with
/// the newest snapshot corrupted, then with none at all. Every subject's quota is what it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_over_a_large_history_from_a_snapshot_or_without() {
    let env = TestEnv::new(&["--snapshot-every", "50000"]).await;
    let live = Stack::start(&env).await;
    let started = Instant::now();
    let stats = history::write(&live_publisher(&env), &spec(220_000, 5_000), |_| {})
        .await
        .unwrap();
    println!(
        "history: {} events ({} admissions, {} refused, {} settlements) in {:?}",
        stats.events,
        stats.admissions,
        stats.refused,
        stats.settlements,
        started.elapsed()
    );
    assert!(stats.events >= 220_000 && stats.refused > 0);
    settle_all(&env, &live).await;
    env.eventually("a snapshot covering most of the history", || async {
        snapshots(&env)
            .await
            .first()
            .is_some_and(|(_, seq)| *seq > 150_000)
    })
    .await;
    let subjects: Vec<String> = (0..5_000).map(|k| format!("key:k{k}")).collect();
    let at = fixed_at();
    let before = quotas(&live, &subjects, &at).await;
    live.stop().await;

    let (stack, ready) = start_and_watch(&env).await;
    println!("restart from a snapshot: {}", ready["checks"]["startup"]);
    assert!(
        ready["checks"]["startup"]["snapshot"]["stream_seq"]
            .as_i64()
            .unwrap()
            > 150_000
    );
    assert!(
        ready["checks"]["startup"]["fallbacks"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_same(
        &quotas(&stack, &subjects, &at).await,
        &before,
        "state after restart equals before",
    );
    stack.stop().await;

    // The newest snapshot corrupted: skipped for the next one, loudly.
    let newest = snapshots(&env).await[0].0;
    sqlx::query("UPDATE quota_snapshot_chunks SET data = overlay(data placing '\\xdeadbeef'::bytea from 100) WHERE snapshot_id = $1 AND idx = 0")
        .bind(newest)
        .execute(env.pool())
        .await
        .unwrap();
    let (stack, ready) = start_and_watch(&env).await;
    let startup = &ready["checks"]["startup"];
    println!("restart with the newest snapshot corrupted: {startup}");
    assert!(
        startup["fallbacks"][0]
            .as_str()
            .unwrap()
            .contains("checksum"),
        "{startup}"
    );
    assert_ne!(startup["snapshot"]["id"], newest);
    assert_same(
        &quotas(&stack, &subjects, &at).await,
        &before,
        "after a fallback to an older snapshot",
    );
    stack.stop().await;

    // No snapshot at all: a full rebuild, shown on /readyz while it runs.
    sqlx::query("DELETE FROM quota_snapshots")
        .execute(env.pool())
        .await
        .unwrap();
    let stack = Stack::start_opts(&env, true, false).await;
    let startup = stack.readyz().await["checks"]["startup"].clone();
    println!("restart without snapshots: {startup}");
    assert_eq!(startup["snapshot"], Value::Null);
    assert!(
        startup["fallbacks"][0]
            .as_str()
            .unwrap()
            .contains("full rebuild"),
        "{startup}"
    );
    assert!(startup["rows_folded"].as_u64().unwrap() >= 220_000);
    assert_same(
        &quotas(&stack, &subjects, &at).await,
        &before,
        "after a full rebuild",
    );
    stack.stop().await;
    env.cleanup().await;
}

fn live_publisher(env: &TestEnv) -> tally_ledger::Publisher {
    tally_ledger::Publisher::new(env.conns.js.clone(), env.conns.stream.clone())
}

/// While rebuilding, `/readyz` answers 503 and says what it is doing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_shows_the_rebuild_while_it_runs() {
    let env = TestEnv::new(&["--snapshot-every", "0"]).await;
    let live = Stack::start_opts(&env, true, false).await;
    history::write(&live_publisher(&env), &spec(120_000, 2_000), |_| {})
        .await
        .unwrap();
    settle_all(&env, &live).await;
    live.stop().await;
    let shutdown = tally::stack::Shutdown::default();
    let tokens = tally_api::Tokens::from_lists(common::ADMIN, common::API);
    let (state, tasks) = tally::stack::api_state(
        &env.conns,
        &env.common,
        tokens,
        Default::default(),
        &shutdown,
    )
    .unwrap();
    let (addr, api) = tally::stack::spawn_api("127.0.0.1:0".parse().unwrap(), state, &shutdown)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = http
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let b: Value = r.json().await.unwrap();
        let phase = b["checks"]["startup"]["phase"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        if status == 503 && !seen.iter().any(|(p, _)| *p == phase) {
            println!("readyz while starting: {status} {}", b["checks"]["startup"]);
            seen.push((phase.clone(), b["checks"]["startup"]["fallbacks"].clone()));
        }
        if status == 200 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rebuilding = seen.iter().find(|(p, _)| p == "rebuilding");
    assert!(
        rebuilding.is_some(),
        "a 503 naming the rebuild was seen: {seen:?}"
    );
    assert!(
        rebuilding.unwrap().1[0]
            .as_str()
            .unwrap()
            .contains("full rebuild")
    );
    shutdown.trigger();
    let _ = tasks.await;
    let _ = api.await;
    env.cleanup().await;
}

/// Test 4: a tail task that dies is noticed: `/readyz` says which and why, admissions answer 503
/// instead of being decided on a frozen state, and the supervised handle ends with the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_tail_task_is_noticed() {
    let env = TestEnv::new(&[]).await;
    let stack = Stack::start(&env).await;
    let (st, _) = stack
        .post(
            "/v1/admit",
            json!({"request_id": "before", "subject": "key:k"}),
        )
        .await;
    assert_eq!(st, 200);
    fail::cfg("tail-apply", "panic").unwrap();
    // Any event makes the tail fold, and panic.
    let (st, _) = stack
        .admin("PUT", "/v1/subjects/key:k", Some(json!({})))
        .await;
    assert_eq!(st, 200);
    env.eventually("the dead task is noticed", || async {
        stack.tasks.is_finished()
    })
    .await;
    fail::remove("tail-apply");
    let ready = stack.readyz().await;
    println!("readyz after the tail died: {}", ready);
    assert_eq!(ready["ready"], false);
    assert_eq!(ready["checks"]["failed_task"]["task"], "follow");
    assert!(
        ready["degraded"]
            .as_array()
            .unwrap()
            .contains(&json!("state_broken"))
    );
    let (st, b) = stack
        .post(
            "/v1/admit",
            json!({"request_id": "after", "subject": "key:k"}),
        )
        .await;
    println!("admission after the tail died: {st} {b}");
    assert_eq!((st, b["reason"].as_str()), (503, Some("unavailable")));
    let Stack {
        tasks,
        handles,
        shutdown,
        ..
    } = stack;
    let ended = tasks.await.unwrap();
    assert!(
        ended.unwrap_err().to_string().contains("follow"),
        "the handle ends with the task's name"
    );
    shutdown.trigger();
    for h in handles {
        let _ = h.await;
    }
    env.cleanup().await;
}

fn spawn_project(env: &TestEnv, every: u32, failpoints: Option<&str>) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"));
    cmd.arg("project")
        .envs(env.child_env())
        .env("TALLY_SNAPSHOT_EVERY", every.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    if let Some(f) = failpoints {
        cmd.env("FAILPOINTS", f);
    }
    cmd.spawn().expect("spawn tally project")
}

/// Test 3: the process writing a snapshot is killed (SIGKILL) half way through it. Nothing of
/// that snapshot is left (one transaction), the previous snapshot is intact, a restarted projector
/// and a starting API instance are right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_writer_killed_half_way_leaves_nothing_behind() {
    let env = TestEnv::new(&[]).await;
    let live = Stack::start_opts(&env, true, false).await;
    let publisher = live_publisher(&env);
    // The first snapshot's chunk goes through; the next write stops after its first chunk, inside
    // its transaction, long enough to be killed there.
    let mut project = spawn_project(
        &env,
        20_000,
        Some("snapshot-write-chunk=1*off->sleep(60000)"),
    );
    let mut s = spec(25_000, 2_000);
    history::write(&publisher, &s, |_| {}).await.unwrap();
    env.eventually("the first snapshot", || async {
        snapshots(&env).await.len() == 1
    })
    .await;
    let first = snapshots(&env).await[0];
    s.seed = 12;
    history::write(&publisher, &s, |_| {}).await.unwrap();
    env.eventually("the second snapshot half written", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND state = 'idle in transaction' AND query LIKE 'INSERT INTO quota_snapshot_chunks%'",
        )
        .fetch_one(env.pool())
        .await
        .unwrap()
            == 1
    })
    .await;
    project.kill().await.unwrap();
    env.eventually("Postgres dropped the killed writer's transaction", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle in transaction'",
        )
        .fetch_one(env.pool())
        .await
        .unwrap()
            == 0
    })
    .await;
    let left: (i64, i64) = sqlx::query_as("SELECT (SELECT count(*) FROM quota_snapshots), (SELECT count(*) FROM quota_snapshot_chunks)")
        .fetch_one(env.pool())
        .await
        .unwrap();
    println!(
        "after the kill: snapshots {:?}, (rows, chunks) {left:?}",
        snapshots(&env).await
    );
    assert_eq!(
        snapshots(&env).await,
        vec![first],
        "nothing of the killed write is left"
    );
    settle_all(&env, &live).await;
    let subjects: Vec<String> = (0..2_000).map(|k| format!("key:k{k}")).collect();
    let at = fixed_at();
    let want = quotas(&live, &subjects, &at).await;
    // A start right after the kill: from the intact snapshot.
    let b = Stack::start_opts(&env, false, false).await;
    let startup = b.readyz().await["checks"]["startup"].clone();
    println!("start after the kill: {startup}");
    assert_eq!(startup["snapshot"]["id"], first.0);
    assert_same(
        &quotas(&b, &subjects, &at).await,
        &want,
        "a start right after the kill",
    );
    b.stop().await;
    // The projector restarted: it resumes from the intact snapshot and writes the next one.
    let mut project = spawn_project(&env, 2_000, None);
    env.eventually("a new snapshot past the killed one", || async {
        snapshots(&env)
            .await
            .first()
            .is_some_and(|(_, seq)| *seq > first.1)
    })
    .await;
    let c = Stack::start_opts(&env, false, false).await;
    assert_same(
        &quotas(&c, &subjects, &at).await,
        &want,
        "a start from the new snapshot",
    );
    c.stop().await;
    project.kill().await.unwrap();
    live.stop().await;
    env.cleanup().await;
}

/// When traffic stops, the quota projection snapshots the head (once `QUIET_AFTER` has passed,
/// at most every `QUIET_SNAPSHOT_MIN_GAP`), although neither the event count nor the interval
/// of the regular schedule was reached: an instance started after the burst folds nothing after
/// its snapshot. A quiet period with nothing new writes no further snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_ledger_gets_a_snapshot_of_its_head() {
    let env = TestEnv::new(&["--snapshot-every", "1000000", "--snapshot-interval", "1h"]).await;
    let live = Stack::start(&env).await;
    let stats = history::write(&live_publisher(&env), &spec(5_000, 500), |_| {})
        .await
        .unwrap();
    settle_all(&env, &live).await;
    let last = stream_last_seq(&env).await as i64;
    let waited = Instant::now();
    env.eventually(
        "a snapshot of the head once the ledger is quiet",
        || async {
            snapshots(&env)
                .await
                .first()
                .is_some_and(|(_, seq)| *seq == last)
        },
    )
    .await;
    println!(
        "{} events; snapshot at the head ({last}) {:?} after the ledger was absorbed",
        stats.events,
        waited.elapsed()
    );
    // Quiet again, nothing new: no further snapshot.
    let min_gap = tally_projector::quota::QUIET_SNAPSHOT_MIN_GAP;
    tokio::time::sleep(min_gap + tally_projector::runner::QUIET_AFTER * 2).await;
    assert_eq!(
        snapshots(&env).await.len(),
        1,
        "one snapshot per quiet period"
    );
    let subjects: Vec<String> = (0..500).map(|k| format!("key:k{k}")).collect();
    let at = fixed_at();
    let before = quotas(&live, &subjects, &at).await;
    live.stop().await;
    let (stack, ready) = start_and_watch(&env).await;
    let startup = &ready["checks"]["startup"];
    println!("restart after the quiet snapshot: {startup}");
    assert_eq!(startup["snapshot"]["stream_seq"], last, "{startup}");
    assert_eq!(startup["rows_folded"], 0, "{startup}");
    assert_same(
        &quotas(&stack, &subjects, &at).await,
        &before,
        "after the restart",
    );
    stack.stop().await;
    env.cleanup().await;
}
