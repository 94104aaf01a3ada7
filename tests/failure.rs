//! Failure modes (issue 3): NATS stopped in the middle of load and restarted. Runs its own
//! nats-server (the shared one must keep serving the other tests).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Stack, TestEnv, free_port, load};
use serde_json::json;

/// How many of the event ids `ids` the ledger holds.
async fn ledger_rows_with_ids(env: &TestEnv, ids: &[String]) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ledger WHERE event_id::text = ANY($1)")
        .bind(ids)
        .fetch_one(env.pool())
        .await
        .unwrap()
}

fn nats_server(port: u16, dir: &std::path::Path) -> Child {
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server on PATH (scripts/test installs it)");
    common::wait_for_port(port, Duration::from_secs(20), "private nats-server");
    child
}

async fn admit(stack: &Stack, rid: &str) -> (u16, serde_json::Value) {
    stack
        .post(
            "/v1/admit",
            json!({"request_id": rid, "subject": "key:f", "estimate": {"cost": 10}}),
        )
        .await
}

/// Fail-closed (the default): while NATS is down admissions answer 503 {"reason":"unavailable"}
/// and nothing is recorded for them; everything admitted before is in the ledger; after NATS
/// returns, admissions resume and a refused request id gets a fresh decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_fails_closed_and_loses_nothing() {
    let dir = std::env::temp_dir().join(format!("tally-nats-{}", uuid::Uuid::new_v4().simple()));
    let port = free_port();
    let mut nats = nats_server(port, &dir);
    let env = TestEnv::new_with_nats(&format!("nats://127.0.0.1:{port}"), &[]).await;
    let stack = Stack::start(&env).await;
    for i in 0..50 {
        let (st, d) = admit(&stack, &format!("before-{i}")).await;
        assert_eq!((st, d["admitted"].as_bool()), (200, Some(true)), "{d}");
    }
    nats.kill().unwrap();
    nats.wait().unwrap();
    let t = Instant::now();
    let (st, d) = admit(&stack, "during").await;
    println!("with NATS down: {st} {d} after {:?}", t.elapsed());
    assert_eq!(
        (st, d["reason"].as_str()),
        (503, Some("unavailable")),
        "{d}"
    );
    let (st, _) = stack
        .post(
            "/v1/settle",
            json!({"request_id": "before-0", "usage": {"cost": 5}}),
        )
        .await;
    assert_eq!(
        st, 503,
        "a settlement that cannot be recorded is refused, not lost"
    );
    let (_, ready) = stack.get("/readyz").await;
    println!("readyz with NATS down: {ready}");
    assert_eq!(ready["ready"], false, "{ready}");

    let mut nats = nats_server(port, &dir);
    let start = Instant::now();
    loop {
        let (st, d) = admit(&stack, "during").await;
        if st == 200 {
            // The refused attempt's event is kept in doubt (its publish may have been on the
            // wire): the retry re-sends that same event, so the stream and the ledger hold one
            // admission for the request whether or not the first copy landed.
            assert_eq!(
                (d["admitted"].as_bool(), d["replayed"].as_bool()),
                (Some(true), Some(true)),
                "{d}"
            );
            let ids: Vec<String> =
                sqlx::query_scalar("SELECT event_id::text FROM ledger WHERE request_id = 'during'")
                    .fetch_all(env.pool())
                    .await
                    .unwrap();
            println!("retry after the restart: {d}; ledger ids so far {ids:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "admissions never resumed: {st} {d}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "admissions resumed {:?} after NATS restarted",
        start.elapsed()
    );
    // 50 before, 1 for "during": one admission however the refused attempt ended.
    env.eventually("every admitted request in the ledger, once", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM ledger WHERE event_type = 'admission.decided'",
        )
        .fetch_one(env.pool())
        .await
        .unwrap();
        n == 51
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger WHERE event_type = 'admission.decided'")
            .fetch_one(env.pool())
            .await
            .unwrap();
    assert_eq!(
        rows, 51,
        "one admission for the refused-then-retried request"
    );
    stack.stop().await;
    env.cleanup().await;
    nats.kill().unwrap();
    let _ = nats.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A private nats-server that a drill can kill and restart on the same port and store.
struct Drill {
    port: u16,
    dir: std::path::PathBuf,
    nats: Option<Child>,
}

impl Drill {
    fn start() -> Drill {
        let dir =
            std::env::temp_dir().join(format!("tally-nats-{}", uuid::Uuid::new_v4().simple()));
        let port = free_port();
        let nats = Some(nats_server(port, &dir));
        Drill { port, dir, nats }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let mut n = self.nats.take().expect("running");
        n.kill().unwrap();
        n.wait().unwrap();
    }

    fn restart(&mut self) {
        self.nats = Some(nats_server(self.port, &self.dir));
    }
}

impl Drop for Drill {
    fn drop(&mut self) {
        if let Some(mut n) = self.nats.take() {
            let _ = n.kill();
            let _ = n.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const DRILL_CLIENTS: usize = 8;

/// A test env on the drill's NATS with `--fail-open` and a private spool directory.
async fn fail_open_env(drill: &Drill) -> (TestEnv, std::path::PathBuf) {
    let spool_dir =
        std::env::temp_dir().join(format!("tally-spool-{}", uuid::Uuid::new_v4().simple()));
    let spool_arg = spool_dir.to_str().unwrap().to_owned();
    let env =
        TestEnv::new_with_nats(&drill.url(), &["--fail-open", "--spool-dir", &spool_arg]).await;
    (env, spool_dir)
}

/// Load for a second, NATS killed for `down`, restarted, load until admissions have run for a
/// second again. Returns every outcome and the kill/restart instants.
async fn load_through_outage(
    stack: &Arc<Stack>,
    drill: &mut Drill,
    down: Duration,
) -> (Vec<load::Outcome>, Instant, Instant) {
    let stop = Arc::new(AtomicBool::new(false));
    let runner = tokio::spawn(load::run(
        stack.clone(),
        &["key:a", "key:b"],
        DRILL_CLIENTS,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    drill.kill();
    let killed = Instant::now();
    tokio::time::sleep(down).await;
    // The outage ends when the server is started again, not when the port is seen to answer:
    // `restart` polls the port every 20 ms, and a request sent in between may find NATS back.
    let restarted = Instant::now();
    drill.restart();
    // Let the load run on until admissions have been answered 200 for a second after the restart.
    stack
        .wait_ready_within(Duration::from_secs(60))
        .await
        .expect("ready again after NATS returned");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    (runner.await.unwrap(), killed, restarted)
}

/// Issue 3, test 5 (fail-closed): NATS killed in the middle of concurrent load and restarted.
/// While it is down admissions answer 503 unavailable; everything answered 200/202 is in the
/// ledger exactly once; the only ledger rows of requests answered 503 are the publishes that were
/// already in flight when NATS died (at most one per client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_under_load_fails_closed_and_loses_nothing() {
    let mut drill = Drill::start();
    let env = TestEnv::new_with_nats(&drill.url(), &[]).await;
    let stack = Arc::new(Stack::start(&env).await);
    let (outcomes, killed, restarted) =
        load_through_outage(&stack, &mut drill, Duration::from_secs(2)).await;
    let ok = |o: &&load::Outcome| o.admit_status == 200;
    let refused = outcomes.iter().filter(|o| o.admit_status == 503).count();
    let during = outcomes
        .iter()
        .filter(|o| o.sent > killed + Duration::from_millis(200) && o.sent < restarted)
        .collect::<Vec<_>>();
    let before = outcomes
        .iter()
        .filter(|o| o.sent < killed)
        .filter(ok)
        .count();
    let after = outcomes
        .iter()
        .filter(|o| o.sent > restarted)
        .filter(ok)
        .count();
    println!(
        "fail-closed drill: {} requests, {before} admitted before the kill, {} sent while down \
         ({} answered 503), {after} admitted after the restart, {refused} refused in all",
        outcomes.len(),
        during.len(),
        during.iter().filter(|o| o.admit_status == 503).count()
    );
    assert!(
        before > 0 && after > 0,
        "load ran on both sides of the outage"
    );
    assert!(!during.is_empty(), "requests were sent while NATS was down");
    assert!(
        during.iter().all(|o| o.admit_status == 503),
        "nothing is admitted while NATS is down (fail-closed)"
    );
    env.eventually("the ledger holds every acknowledged event", || async {
        load::acknowledged_missing(&load::ledger_rows(env.pool()).await, &outcomes) == 0
    })
    .await;
    let rows = load::ledger_rows(env.pool()).await;
    let mut in_flight = 0;
    for o in &outcomes {
        let (adm, set) = rows.get(&o.request_id).copied().unwrap_or((0, 0));
        if o.admit_status == 200 {
            assert_eq!(adm, 1, "admission of {} in the ledger once", o.request_id);
        } else if adm > 0 {
            in_flight += 1;
        }
        match o.settle_status {
            Some(202) => assert_eq!(set, 1, "settlement of {} in the ledger once", o.request_id),
            Some(_) => in_flight += set,
            None => assert_eq!(set, 0),
        }
    }
    println!("ledger rows of requests answered 503 (publishes in flight at the kill): {in_flight}");
    assert!(
        in_flight <= DRILL_CLIENTS as i64,
        "only publishes already in flight at the kill may land: {in_flight}"
    );
    let settled: i64 = outcomes
        .iter()
        .filter(|o| o.settle_status == Some(202))
        .map(|o| o.cost)
        .sum();
    let ledger_cost: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(cost), 0)::bigint FROM ledger WHERE event_type = 'usage.settled'",
    )
    .fetch_one(env.pool())
    .await
    .unwrap();
    println!("settled cost acknowledged {settled}, in the ledger {ledger_cost}");
    assert!(ledger_cost >= settled);
    stack_stop(stack).await;
    env.cleanup().await;
}

/// Issue 3, test 5 (fail-open): the same drill with `--fail-open`. Every request is answered
/// 200/202 while NATS is down; the events are spooled (fsync) and published in order once it
/// returns; the ledger holds every spooled event exactly once, and every acknowledged request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_under_load_fails_open_and_spools_exactly_once() {
    let mut drill = Drill::start();
    let (env, spool_dir) = fail_open_env(&drill).await;
    let stack = Arc::new(Stack::start(&env).await);
    let (outcomes, killed, restarted) =
        load_through_outage(&stack, &mut drill, Duration::from_secs(2)).await;
    let during = outcomes
        .iter()
        .filter(|o| o.sent > killed && o.sent < restarted)
        .count();
    println!(
        "fail-open drill: {} requests, {during} sent while NATS was down",
        outcomes.len()
    );
    for o in outcomes
        .iter()
        .filter(|o| o.took > Duration::from_millis(500))
    {
        println!(
            "slow: {} sent {:?} after the kill, took {:?}",
            o.request_id,
            o.sent.checked_duration_since(killed),
            o.took
        );
    }
    assert!(during > 0, "requests were sent while NATS was down");
    assert!(
        outcomes
            .iter()
            .all(|o| o.admit_status == 200 && o.settle_status == Some(202)),
        "fail-open answers every request"
    );
    env.eventually("the spool drained", || async {
        let (_, r) = stack.get("/readyz").await;
        r["checks"]["spool_pending_events"] == 0
    })
    .await;
    let expected = (outcomes.len() * 2) as i64;
    env.eventually("the ledger holds every event", || async {
        env.ledger_count().await >= expected
    })
    .await;
    let mut spooled = Vec::new();
    for f in tally_ledger::spool::drained_files(&spool_dir) {
        spooled.extend(tally_ledger::spool::ids_in(&f).unwrap());
    }
    spooled.extend(tally_ledger::spool::ids_in(&spool_dir.join("spool.log")).unwrap());
    let unique: std::collections::HashSet<&String> = spooled.iter().collect();
    let in_ledger = ledger_rows_with_ids(&env, &spooled).await;
    println!(
        "spooled {} events ({} distinct); {in_ledger} of them in the ledger; ledger rows {}",
        spooled.len(),
        unique.len(),
        env.ledger_count().await
    );
    assert!(!spooled.is_empty(), "the outage spooled events");
    assert_eq!(unique.len(), spooled.len(), "each event spooled once");
    assert_eq!(
        in_ledger,
        spooled.len() as i64,
        "every spooled event in the ledger"
    );
    let rows = load::ledger_rows(env.pool()).await;
    for o in &outcomes {
        assert_eq!(
            rows.get(&o.request_id).copied(),
            Some((1, 1)),
            "{} admitted and settled once in the ledger",
            o.request_id
        );
    }
    assert_eq!(
        env.ledger_count().await,
        expected,
        "nothing else, nothing twice"
    );
    // In order: each request's settlement follows its admission in the stream.
    let misordered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger a JOIN ledger s USING (request_id) \
         WHERE a.event_type = 'admission.decided' AND s.event_type = 'usage.settled' \
           AND s.stream_seq < a.stream_seq",
    )
    .fetch_one(env.pool())
    .await
    .unwrap();
    assert_eq!(misordered, 0, "spooled events published in order");
    let settled: i64 = outcomes.iter().map(|o| o.cost).sum();
    let ledger_cost: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(cost), 0)::bigint FROM ledger WHERE event_type = 'usage.settled'",
    )
    .fetch_one(env.pool())
    .await
    .unwrap();
    assert_eq!(
        ledger_cost, settled,
        "settled cost equals what clients were told"
    );
    stack_stop(stack).await;
    env.cleanup().await;
    let _ = std::fs::remove_dir_all(&spool_dir);
}

async fn stack_stop(stack: Arc<Stack>) {
    match Arc::try_unwrap(stack) {
        Ok(s) => s.stop().await,
        Err(_) => panic!("load still holds the stack"),
    }
}

/// Fail-open durability: events spooled while NATS is down survive the API stopping before they
/// were published (and a torn record left by a crash mid-append); the next API on the same spool
/// publishes them once NATS is back, exactly once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_events_survive_an_api_restart() {
    let mut drill = Drill::start();
    let (env, spool_dir) = fail_open_env(&drill).await;
    let stack = Stack::start(&env).await;
    drill.kill();
    for i in 0..20 {
        let (st, d) = admit(&stack, &format!("spooled-{i}")).await;
        assert_eq!((st, d["admitted"].as_bool()), (200, Some(true)), "{d}");
    }
    let (st, b) = stack
        .admin("PUT", "/v1/subjects/key:late", Some(json!({})))
        .await;
    assert_eq!(
        (st, b["reason"].as_str()),
        (503, Some("unavailable")),
        "configuration changes are never spooled: {b}"
    );
    let (_, ready) = stack.get("/readyz").await;
    println!("readyz while spooling: {ready}");
    assert_eq!(ready["checks"]["spool_pending_events"], 20, "{ready}");
    stack.stop().await;
    // A crash in the middle of an append leaves a line without its newline.
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .append(true)
        .open(spool_dir.join("spool.log"))
        .unwrap()
        .write_all(b"tally.v1.torn 0000 {\"id\":")
        .unwrap();
    let spooled = tally_ledger::spool::ids_in(&spool_dir.join("spool.log")).unwrap();
    assert_eq!(spooled.len(), 20, "the torn line is not a record");

    drill.restart();
    let stack = Stack::start(&env).await;
    env.eventually("the spooled admissions in the ledger", || async {
        env.ledger_count().await >= 20
    })
    .await;
    let in_ledger = ledger_rows_with_ids(&env, &spooled).await;
    assert_eq!(
        in_ledger, 20,
        "every spooled event published after the restart"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.ledger_count().await,
        20,
        "each exactly once, nothing from the torn line"
    );
    let (st, d) = admit(&stack, "spooled-3").await;
    assert_eq!((st, d["replayed"].as_bool()), (200, Some(true)), "{d}");
    stack.stop().await;
    env.cleanup().await;
    let _ = std::fs::remove_dir_all(&spool_dir);
}

/// A ledger writer that starts while NATS is down (a restart at the wrong moment) neither dies
/// nor gives up: it retries subscribing with backoff and, once NATS is back, writes everything
/// that was published before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_started_while_nats_is_down_waits_and_then_writes() {
    let dir = std::env::temp_dir().join(format!("tally-nats-{}", uuid::Uuid::new_v4().simple()));
    let port = free_port();
    let mut nats = nats_server(port, &dir);
    let env = TestEnv::new_with_nats(&format!("nats://127.0.0.1:{port}"), &[]).await;
    let stack = Stack::start_with(&env, false).await;
    for i in 0..20 {
        let (st, d) = admit(&stack, &format!("early-{i}")).await;
        assert_eq!((st, d["admitted"].as_bool()), (200, Some(true)), "{d}");
    }
    nats.kill().unwrap();
    nats.wait().unwrap();
    let shutdown = tally::stack::Shutdown::default();
    let (stats, writer) = tally::stack::spawn_ledger(&env.conns, &shutdown);
    // Past JetStream's request timeout (5 s): the writer's first attempts have failed.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        !writer.is_finished(),
        "the writer outlives NATS being down at its start: {:?}",
        writer.await
    );
    assert_eq!(env.ledger_count().await, 0);
    let mut nats = nats_server(port, &dir);
    env.eventually("the writer writes what was published before", || async {
        env.ledger_count().await == 20
    })
    .await;
    println!(
        "ledger rows after NATS returned: {}, batches {}",
        env.ledger_count().await,
        stats.batches.load(Ordering::Relaxed)
    );
    shutdown.trigger();
    let ended = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("shutdown reaches the writer");
    assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
    stack.stop().await;
    env.cleanup().await;
    nats.kill().unwrap();
    let _ = nats.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
