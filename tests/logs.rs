//! Issue 13 (logs): one access-log line per request with route, status, latency and subject,
//! never a token; JSON lines with `--log-format json`; no ANSI colours when stderr is not a
//! terminal; `TALLY_LOG`, else `RUST_LOG`, sets the filter.

mod common;

use std::time::Duration;

use common::TestEnv;
use serde_json::{Value, json};

/// Run `tally api` on `env` with `envs`, make a few requests, stop it; its stderr.
async fn api_run(
    env: &TestEnv,
    args: &[&str],
    envs: &[(&str, &str)],
    drop_tally_log: bool,
) -> String {
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"));
    cmd.arg("api")
        .args(["--http-addr", &addr])
        .args(args)
        .envs(env.child_env())
        .env("TALLY_ADMIN_TOKENS", common::ADMIN)
        .env("TALLY_API_TOKENS", common::API)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if drop_tally_log {
        cmd.env_remove("TALLY_LOG");
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn tally api");
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");
    let mut ready = false;
    for _ in 0..300 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "tally api became ready");
    let r = http
        .post(format!("{base}/v1/admit"))
        .bearer_auth(common::API)
        .json(&json!({"request_id": "log-r1", "subject": "key:log-a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(format!("{base}/v1/quota?subject=key:log-a"))
        .bearer_auth(common::API)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(format!("{base}/v1/nowhere/secret-path"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .post(format!("{base}/v1/settle"))
        .bearer_auth("not-a-token")
        .json(&json!({"request_id": "log-r1", "usage": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let mut child = child;
    child.start_kill().unwrap();
    let out = child.wait_with_output().await.unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_in_json_without_tokens_or_colours() {
    let env = TestEnv::new(&[]).await;
    let stderr = api_run(
        &env,
        &["--log-format", "json"],
        &[("TALLY_LOG", "info,sqlx=warn,async_nats=warn")],
        false,
    )
    .await;
    assert!(
        !stderr.contains('\u{1b}'),
        "no ANSI escapes on a pipe: {stderr}"
    );
    assert!(
        !stderr.contains(common::API) && !stderr.contains("not-a-token"),
        "no token: {stderr}"
    );
    let access: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v| v["target"] == "tally::access")
        .collect();
    for line in &access {
        println!("{line}");
    }
    let find = |route: &str| {
        access
            .iter()
            .find(|v| v["route"] == route)
            .unwrap_or_else(|| panic!("an access line for {route}: {access:?}"))
    };
    let admit = find("/v1/admit");
    assert_eq!(admit["status"], 200);
    assert_eq!(admit["method"], "POST");
    assert_eq!(admit["subject"], "key:log-a");
    assert_eq!(admit["request_id"], "log-r1");
    assert!(
        admit["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{admit}"
    );
    assert_eq!(admit["level"], "INFO");
    let quota = find("/v1/quota");
    assert_eq!(quota["subject"], "key:log-a");
    let unknown = find("unmatched");
    assert_eq!(unknown["status"], 404);
    assert!(
        !stderr.contains("secret-path"),
        "an unknown path is not logged raw"
    );
    assert_eq!(find("/v1/settle")["status"], 401);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_is_honoured_when_tally_log_is_unset() {
    let env = TestEnv::new(&[]).await;
    let quiet = api_run(&env, &[], &[("RUST_LOG", "warn")], true).await;
    assert!(
        !quiet.contains("tally::access"),
        "info lines filtered out by RUST_LOG=warn: {quiet}"
    );
    let loud = api_run(&env, &[], &[("RUST_LOG", "tally::access=info")], true).await;
    let line = loud
        .lines()
        .find(|l| l.contains("tally::access") && l.contains("/v1/admit"))
        .unwrap_or_else(|| panic!("an access line in text: {loud}"));
    println!("{line}");
    assert!(
        line.contains("status=200") && line.contains("subject=\"key:log-a\""),
        "{line}"
    );
    assert!(!loud.contains('\u{1b}'), "no ANSI escapes on a pipe");
    env.cleanup().await;
}
