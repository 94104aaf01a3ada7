//! `tally up` starts from nothing, on free ports, with private NATS and Postgres under a private
//! data directory, answers `/readyz`, and stops what it started on SIGTERM.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::free_port;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Private Postgres needs initdb (several seconds on a slow disk) before it can answer.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_starts_private_services_and_becomes_ready() {
    let dir = std::env::temp_dir().join(format!("tally-up-{}", uuid::Uuid::new_v4().simple()));
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["up", "--services", "private", "--install-missing", "false"])
        .arg("--data-dir")
        .arg(&dir)
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .env_remove("NATS_URL")
        .env_remove("DATABASE_URL")
        .env("TALLY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let http = reqwest::Client::new();
    let start = Instant::now();
    let ready = loop {
        assert!(
            start.elapsed() < READY_TIMEOUT,
            "tally up never became ready; printed {printed:?}"
        );
        tokio::select! {
            line = lines.next_line() => match line.unwrap() {
                Some(l) => printed.push(l),
                None => panic!("tally up exited: {:?}; printed {printed:?}", child.wait().await),
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/readyz")).send().await
                    && r.status() == 200
                {
                    break r.json::<serde_json::Value>().await.unwrap();
                }
            }
        }
    };
    println!(
        "ready after {:?}: {ready}\nprinted: {printed:#?}",
        start.elapsed()
    );
    assert!(
        printed
            .iter()
            .any(|l| l.contains(&format!("API http://127.0.0.1:{port}")))
    );
    let token_line = printed
        .iter()
        .find(|l| l.contains("api token"))
        .expect("prints the API token");
    let token = token_line.rsplit(' ').next().unwrap();
    // Ready means admissions are decided; a projection just created on the empty database may
    // still be building for a moment, and its reads answer 503 `building` with Retry-After
    // (never a 500) until it is live.
    let usage_read = Instant::now();
    loop {
        let r = http
            .get(format!("http://127.0.0.1:{port}/v1/usage?subject=key:k"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        let retry_after = r.headers().get("retry-after").cloned();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        assert_eq!(
            body["error"]["code"], "building",
            "the printed token works: 200, or 503 while the usage projection is built: {body}"
        );
        assert!(retry_after.is_some(), "a 503 says when to retry");
        assert!(
            usage_read.elapsed() < READY_TIMEOUT,
            "the usage projection of an empty ledger never became live"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nats_line = printed.iter().find(|l| l.contains("NATS")).unwrap();
    assert!(
        !nats_line.contains(":4222"),
        "private NATS on a free port, not the system one: {nats_line}"
    );
    assert!(
        dir.join("pg").exists() && dir.join("nats").exists(),
        "private data under --data-dir"
    );

    // SIGTERM: graceful stop, private servers stopped.
    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("stops on SIGTERM")
        .unwrap();
    println!("tally up exited with {status}");
    assert!(status.success());
    assert!(
        !dir.join("pg").join("postmaster.pid").exists(),
        "private Postgres stopped"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
