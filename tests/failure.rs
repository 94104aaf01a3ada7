//! Failure modes (issue 3): NATS stopped in the middle of load and restarted. Runs its own
//! nats-server (the shared one must keep serving the other tests).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Stack, TestEnv};
use serde_json::json;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nats_server(port: u16, dir: &std::path::Path) -> Child {
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server on PATH (scripts/test installs it)");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "private nats-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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
            assert_eq!(
                (d["admitted"].as_bool(), d["replayed"].as_bool()),
                (Some(true), Some(false)),
                "{d}"
            );
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
    // 50 before, 1 after: the refused attempt left nothing behind (no late copy either).
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
    assert_eq!(rows, 51, "no late copy of the refused admission");
    stack.stop().await;
    env.cleanup().await;
    nats.kill().unwrap();
    let _ = nats.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
