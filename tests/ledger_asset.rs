//! Issue 11: the ledger as the asset. `tally audit` recomputes every projection from the ledger
//! and names differences; `tally replay` rebuilds a projection beside the live one (under load)
//! and swaps it in or verifies it; a projection attached to a running deployment builds itself
//! and serves its report; `tally whatif` answers what candidate policies would have done. All on
//! real NATS JetStream and Postgres, with the real binary for the operator commands.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{Stack, TestEnv};
use serde_json::{Value, json};

const SUBJECTS: [&str; 3] = ["key:k0", "key:k1", "key:k2"];
const MODELS: [&str; 2] = ["gpt-4o", "claude-3"];

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Run the `tally` binary against `env`; (exit code, stdout).
async fn tally(env: &TestEnv, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .envs(env.child_env())
        .env("TALLY_ADMIN_TOKENS", common::ADMIN)
        .output()
        .await
        .expect("run tally");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("$ tally {}\n{stdout}{stderr}", args.join(" "));
    (out.status.code().unwrap_or(-1), stdout)
}

/// Subjects under one team with a daily cost policy (so the quota projection has pools).
async fn configure(stack: &Stack) {
    for s in SUBJECTS {
        let (st, b) = stack
            .admin(
                "PUT",
                &format!("/v1/subjects/{s}"),
                Some(json!({"parent": "team:t"})),
            )
            .await;
        assert_eq!(st, 200, "{b}");
    }
    let policy = json!({"subject": "team:t", "metric": "cost", "limit": 1_000_000_000_000i64,
        "window": {"kind": "calendar", "unit": "day"}});
    let (st, b) = stack
        .admin("PUT", "/v1/policies/team-cost", Some(policy))
        .await;
    assert_eq!(st, 200, "{b}");
}

/// Admit and settle request `i` (deterministic subject, model, day and cost); returns the
/// settled cost, or None when it was refused.
async fn spend(stack: &Stack, tag: &str, i: usize, at: DateTime<Utc>) -> Option<i64> {
    let rid = format!("{tag}-{i}");
    let subject = SUBJECTS[i % SUBJECTS.len()];
    let model = MODELS[i % MODELS.len()];
    let cost = 100 + (i as i64 * 37) % 1000;
    let (st, d) = stack
        .post(
            "/v1/admit",
            json!({"request_id": rid, "subject": subject, "model": model,
                   "estimate": {"cost": cost}, "at": ts(at)}),
        )
        .await;
    assert_eq!(st, 200, "{d}");
    if d["admitted"] != json!(true) {
        return None;
    }
    let (st, b) = stack
        .post(
            "/v1/settle",
            json!({"request_id": rid, "usage": {"cost": cost, "input_tokens": i, "output_tokens": 2 * i}}),
        )
        .await;
    assert_eq!(st, 202, "{b}");
    Some(cost)
}

/// `n` requests spread over the last three days.
async fn history(stack: &Stack, tag: &str, n: usize) {
    let now = Utc::now();
    for i in 0..n {
        let at = now - chrono::Duration::minutes((i as i64 * 53) % (3 * 24 * 60));
        spend(stack, tag, i, at).await;
    }
}

/// Every other kind of request: streamed in chunks, released, left to expire, direct usage.
async fn other_kinds(stack: &Stack, n: usize) {
    let now = Utc::now();
    for i in 0..n {
        let rid = format!("x-{i}");
        let subject = SUBJECTS[i % SUBJECTS.len()];
        let at = ts(now - chrono::Duration::minutes((i as i64 * 97) % (3 * 24 * 60)));
        if i % 4 == 3 {
            let body = json!({"request_id": rid, "subject": subject, "model": MODELS[i % 2],
                "at": at, "usage": {"cost": 11, "input_tokens": 3}});
            let (st, b) = stack.post("/v1/settle", body).await;
            assert_eq!(st, 202, "direct usage: {b}");
            continue;
        }
        let (st, d) = stack
            .post(
                "/v1/admit",
                json!({"request_id": rid, "subject": subject,
                "model": MODELS[i % 2], "estimate": {"cost": 50}, "at": at}),
            )
            .await;
        assert_eq!(st, 200, "{d}");
        match i % 4 {
            0 => {
                for seq in 0..3 {
                    let chunk = json!({"request_id": rid, "usage": {"cost": 5, "output_tokens": 7},
                        "final": seq == 2, "seq": seq});
                    let (st, b) = stack.post("/v1/settle", chunk).await;
                    assert_eq!(st, 202, "chunk: {b}");
                }
            }
            1 => {
                let (st, b) = stack.post("/v1/release", json!({"request_id": rid})).await;
                assert_eq!(st, 202, "release: {b}");
            }
            _ => {} // left to expire
        }
    }
}

/// Load in the background until the flag is set.
fn background_load(
    stack: Arc<Stack>,
    tag: &'static str,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<usize>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = tokio::spawn(async move {
        let mut i = 0;
        while !flag.load(Ordering::Relaxed) {
            spend(&stack, tag, i, Utc::now()).await;
            i += 1;
        }
        i
    });
    (stop, handle)
}

/// Every running projection has folded everything the ledger writer committed.
async fn caught_up(env: &TestEnv, names: &[&str]) {
    let expected_rows = env.ledger_count().await;
    env.eventually("the projections catch up", || async {
        let mut ok = env.ledger_count().await >= expected_rows;
        for e in tally_projector::registry::REGISTRY
            .iter()
            .filter(|e| names.contains(&e.name))
        {
            let lag = tally_projector::runner::lag_rows(env.pool(), e.name, e.order).await;
            ok &= matches!(lag, Ok(Some(0)));
        }
        ok
    })
    .await;
}

async fn table_digest(env: &TestEnv, table: &str) -> String {
    sqlx::query_scalar(&format!(
        "SELECT COALESCE(md5(string_agg(x::text, ',' ORDER BY x::text)), '') FROM {table} x"
    ))
    .fetch_one(env.pool())
    .await
    .unwrap()
}

/// Tests 1 and 2: audit passes, a tampered row is named with both values, `replay --verify`
/// changes nothing and names it too, `replay` repairs it and the audit passes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_names_a_tampered_row_and_replay_repairs_it() {
    let env = TestEnv::new(&["--reservation-ttl", "2s"]).await;
    let stack = Stack::start(&env).await;
    configure(&stack).await;
    history(&stack, "h", 3_000).await;
    other_kinds(&stack, 200).await;
    env.eventually("the unsettled reservations expire", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM ledger WHERE event_type = 'reservation.expired'",
        )
        .fetch_one(env.pool())
        .await
        .unwrap();
        n >= 50
    })
    .await;
    caught_up(&env, &["usage", "quota", "daily_usage"]).await;

    let (code, out) = tally(&env, &["audit"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("every projection matches the ledger"), "{out}");
    let instance = out
        .lines()
        .find(|l| l.starts_with("audit instance "))
        .unwrap_or_else(|| panic!("the running API instance is audited: {out}"));
    assert!(
        instance.contains(" 4 keys compared") && instance.ends_with(" 0 differences"),
        "{instance}"
    );

    let before = table_digest(&env, "usage_day").await;
    let (code, out) = tally(&env, &["replay", "--projection", "usage", "--verify"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(" 0 differences"), "{out}");
    assert_eq!(
        table_digest(&env, "usage_day").await,
        before,
        "verify changed nothing"
    );

    let (bucket, day, model): (DateTime<Utc>, chrono::NaiveDate, String) = sqlx::query_as(
        "SELECT bucket, (bucket AT TIME ZONE 'UTC')::date, model FROM usage_day \
         WHERE subject = 'key:k1' ORDER BY bucket, model LIMIT 1",
    )
    .fetch_one(env.pool())
    .await
    .unwrap();
    let cost: i64 = sqlx::query_scalar(
        "SELECT sum(cost)::bigint FROM usage_day WHERE subject = 'key:k1' AND bucket = $1 AND model = $2",
    )
    .bind(bucket)
    .bind(&model)
    .fetch_one(env.pool())
    .await
    .unwrap();
    sqlx::query(
        "UPDATE usage_day SET cost = cost + 7 WHERE ctid = (SELECT ctid FROM usage_day \
         WHERE subject = 'key:k1' AND bucket = $1 AND model = $2 LIMIT 1)",
    )
    .bind(bucket)
    .bind(&model)
    .execute(env.pool())
    .await
    .unwrap();
    let (code, out) = tally(&env, &["audit", "--json"]).await;
    assert_eq!(code, 1, "{out}");
    let report: Value = serde_json::from_str(&out).expect("audit --json prints JSON");
    assert_eq!(report["ok"], json!(false));
    let usage = report["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["projection"] == "usage")
        .unwrap();
    assert_eq!(usage["difference_count"], json!(1), "{usage}");
    let d = &usage["differences"][0];
    assert_eq!(d["table"], json!("public.usage_day"));
    assert_eq!(d["key"], json!([day.to_string(), "key:k1", model]));
    assert_eq!(d["projection_value"]["cost"], json!(cost + 7));
    assert_eq!(d["ledger_value"]["cost"], json!(cost));
    for p in report["projections"].as_array().unwrap() {
        if p["projection"] != "usage" {
            assert_eq!(
                p["difference_count"],
                json!(0),
                "only usage was tampered: {p}"
            );
        }
    }
    let (code, out) = tally(&env, &["replay", "--projection", "usage", "--verify"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("1 differences") && out.contains("key:k1"),
        "{out}"
    );

    let (code, out) = tally(&env, &["replay", "--projection", "usage"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("swapped in"), "{out}");
    let (code, out) = tally(&env, &["audit"]).await;
    assert_eq!(code, 0, "after the replay: {out}");

    // A pool total tampered with is named as well, and the quota projection is replayed.
    sqlx::query("UPDATE quota_windows SET used = used + 1 WHERE policy_id = 'team-cost'")
        .execute(env.pool())
        .await
        .unwrap();
    let (code, out) = tally(&env, &["audit"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("DIFFERENCE quota public.quota_windows key [\"team-cost\",\"team:t\""),
        "{out}"
    );
    let (code, out) = tally(&env, &["replay", "--projection", "quota"]).await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = tally(&env, &["audit"]).await;
    assert_eq!(code, 0, "{out}");

    let (code, out) = tally(&env, &["replay", "--projection", "nope"]).await;
    assert_eq!(code, 2, "{out}");
    stack.stop().await;
    env.cleanup().await;
}

/// Test 3: a replay while admissions and settlements keep coming ends equal to a
/// recomputation from the ledger, in the windows of all its history: the history reaches back
/// 90 days, past `--max-backfill` (35 days), so a rebuild that compacted usage by the wall clock
/// instead of the stream's would write its old windows short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_under_load_equals_the_ledger() {
    let env = TestEnv::new(&["--snapshot-every", "20000"]).await;
    let stack = Arc::new(Stack::start(&env).await);
    // 60,000 events over 90 days (2,000 keys, users, teams, customers, policies), then live
    // traffic over HTTP while both projections are rebuilt beside the live ones.
    let spec = tally::history::HistorySpec {
        events: 60_000,
        keys: 2_000,
        users: 200,
        teams: 20,
        customers: 5,
        days: 90,
        seed: 7,
    };
    let publisher = tally_ledger::Publisher::new(env.conns.js.clone(), env.conns.stream.clone());
    tally::history::write(&publisher, &spec, |_| {})
        .await
        .unwrap();
    configure(&stack).await;
    history(&stack, "h", 300).await;
    caught_up(&env, &["usage", "quota", "daily_usage"]).await;
    let (stop, load) = background_load(stack.clone(), "live");
    for projection in ["usage", "quota"] {
        let (code, out) = tally(&env, &["replay", "--projection", projection]).await;
        assert_eq!(code, 0, "{out}");
    }
    stop.store(true, Ordering::Relaxed);
    let during = load.await.unwrap();
    println!("{during} requests while replaying");
    assert!(during > 0, "load ran during the replay");
    caught_up(&env, &["usage", "quota", "daily_usage"]).await;
    let (code, out) = tally(&env, &["audit"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("audit snapshot "),
        "the newest snapshot is audited too: {out}"
    );
    match Arc::try_unwrap(stack) {
        Ok(s) => s.stop().await,
        Err(_) => panic!("load still holds the stack"),
    }
    env.cleanup().await;
}

async fn report(
    stack: &Stack,
    query: &str,
    csv: bool,
) -> (u16, String, reqwest::header::HeaderMap) {
    let mut req = reqwest::Client::new()
        .get(stack.url(&format!("/v1/reports/daily-usage?{query}")))
        .bearer_auth(common::API);
    if csv {
        req = req.header("accept", "text/csv");
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.text().await.unwrap(), headers)
}

/// Test 4: `daily_usage` attached to a deployment running only `usage,quota`: 503 with
/// Retry-After until it is built, then it folds live traffic, equals the ledger, and its JSON
/// and CSV say the same; paging walks every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_projection_builds_itself_and_serves_its_report() {
    let env = TestEnv::new(&["--projections", "usage,quota"]).await;
    let stack = Arc::new(Stack::start(&env).await);
    configure(&stack).await;
    history(&stack, "h", 200).await;
    let today = Utc::now().date_naive();
    let range = format!("from={}&to={today}", today - chrono::Duration::days(4));
    let (st, body, headers) = report(&stack, &range, false).await;
    assert_eq!(st, 503, "{body}");
    assert!(headers.get("retry-after").is_some(), "{headers:?}");
    assert!(body.contains("\"building\""), "{body}");

    let (stop, load) = background_load(stack.clone(), "live");
    let mut project = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["project", "--projections", "daily_usage"])
        .envs(env.child_env())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tally project");
    env.eventually("daily_usage is built", || async {
        report(&stack, &range, false).await.0 == 200
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let during = load.await.unwrap();
    println!("{during} requests while daily_usage was attached");
    caught_up(&env, &["usage", "quota", "daily_usage"]).await;

    let (code, out) = tally(&env, &["audit"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("audit daily_usage: checkpoint"), "{out}");

    let (st, json_text, _) = report(&stack, &format!("{range}&limit=10000"), false).await;
    assert_eq!(st, 200, "{json_text}");
    let body: Value = serde_json::from_str(&json_text).unwrap();
    let rows = body["rows"].as_array().unwrap().clone();
    assert!(rows.len() > 6, "rows for several days, subjects and models");
    let (st, csv_text, _) = report(&stack, &format!("{range}&limit=10000"), true).await;
    assert_eq!(st, 200, "{csv_text}");
    let mut lines = csv_text.lines();
    assert_eq!(
        lines.next(),
        Some("day,subject,model,requests,input_tokens,output_tokens,cost,credits")
    );
    let from_json: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{},{},{},{},{},{},{},{}",
                r["day"].as_str().unwrap(),
                r["subject"].as_str().unwrap(),
                r["model"].as_str().unwrap(),
                r["requests"],
                r["input_tokens"],
                r["output_tokens"],
                r["cost"],
                r["credits"]
            )
        })
        .collect();
    assert_eq!(
        lines.map(str::to_owned).collect::<Vec<_>>(),
        from_json,
        "CSV = JSON"
    );

    // Pages of 5 walk the same rows in the same order.
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("{range}&limit=5&cursor={c}"),
            None => format!("{range}&limit=5"),
        };
        let (st, text, _) = report(&stack, &q, false).await;
        assert_eq!(st, 200, "{text}");
        let page: Value = serde_json::from_str(&text).unwrap();
        paged.extend(page["rows"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(paged, rows, "paging returns every row once");

    for (query, field) in [
        (format!("to={today}"), "from"),
        (format!("from={today}&to=2020-01-01"), "to"),
        (format!("{range}&limit=0"), "limit"),
        (format!("{range}&cursor=zz"), "cursor"),
        (format!("{range}&subject=nope"), "subject"),
        (format!("{range}&bogus=1"), "bogus"),
    ] {
        let (st, text, _) = report(&stack, &query, false).await;
        assert_eq!(st, 400, "{query}: {text}");
        let b: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(b["error"]["field"], json!(field), "{query}: {text}");
    }
    let _ = project.kill().await;
    match Arc::try_unwrap(stack) {
        Ok(s) => s.stop().await,
        Err(_) => panic!("load still holds the stack"),
    }
    env.cleanup().await;
}

/// Test 5: what-if of a 5-requests-a-day limit on key:k0 against an independent count; it
/// writes nothing (ledger rows and /v1/quota unchanged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatif_matches_an_independent_count_and_writes_nothing() {
    let env = TestEnv::new(&[]).await;
    let stack = Stack::start(&env).await;
    configure(&stack).await;
    // Sequential requests: stream order is sending order. key:k0 is every third request.
    let base = Utc::now() - chrono::Duration::days(3);
    let mut per_day: std::collections::BTreeMap<chrono::NaiveDate, Vec<i64>> = Default::default();
    for i in 0..240 {
        let at = base + chrono::Duration::minutes(i as i64 * 17);
        let cost = spend(&stack, "w", i, at).await.expect("admitted");
        if SUBJECTS[i % SUBJECTS.len()] == "key:k0" {
            per_day.entry(at.date_naive()).or_default().push(cost);
        }
    }
    let (mut refused, mut blocked) = (0u64, 0i64);
    for costs in per_day.values() {
        refused += costs.len().saturating_sub(5) as u64;
        blocked += costs.iter().skip(5).sum::<i64>();
    }
    assert!(refused > 0);
    let dir = std::env::temp_dir().join(format!("whatif-{}", env.db_name));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policies.json");
    std::fs::write(
        &file,
        json!([{"id": "k0-daily", "subject": "key:k0", "metric": "requests", "limit": 5,
                "window": {"kind": "calendar", "unit": "day"}}])
        .to_string(),
    )
    .unwrap();
    env.eventually("the ledger has everything", || async {
        env.ledger_count().await >= 3 + 1 + 240 * 2
    })
    .await;
    let rows_before = env.ledger_count().await;
    let (_, quota_before) = stack.get("/v1/quota?subject=key:k0").await;
    let (code, out) = tally(
        &env,
        &["whatif", "--policies", file.to_str().unwrap(), "--json"],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let r: Value = serde_json::from_str(&out).unwrap();
    let impacts = r["impacts"].as_array().unwrap();
    assert_eq!(impacts.len(), 1, "{r}");
    assert_eq!(impacts[0]["subject"], json!("key:k0"));
    assert_eq!(impacts[0]["policy_id"], json!("k0-daily"));
    assert_eq!(impacts[0]["refused"], json!(refused));
    assert_eq!(impacts[0]["blocked_usage"]["cost"], json!(blocked));
    assert_eq!(impacts[0]["blocked_usage"]["requests"], json!(refused));
    assert_eq!(
        env.ledger_count().await,
        rows_before,
        "whatif wrote nothing"
    );
    let (_, quota_after) = stack.get("/v1/quota?subject=key:k0").await;
    assert_eq!(quota_after["checks"], quota_before["checks"]);

    // A candidate clashing with a ledger policy needs --replace; a bad file names the field.
    std::fs::write(
        &file,
        json!([{"id": "team-cost", "subject": "team:t", "metric": "cost", "limit": 1,
                "window": {"kind": "calendar", "unit": "day"}}])
        .to_string(),
    )
    .unwrap();
    let (code, _) = tally(&env, &["whatif", "--policies", file.to_str().unwrap()]).await;
    assert_eq!(code, 2);
    let (code, out) = tally(
        &env,
        &["whatif", "--replace", "--policies", file.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("team:t team-cost: "), "{out}");
    std::fs::write(&file, r#"[{"id": "x", "subject": "key:k0", "metric": "requests", "limit": 0, "window": {"kind": "calendar", "unit": "day"}}]"#).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["whatif", "--policies", file.to_str().unwrap()])
        .envs(env.child_env())
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("[0].limit"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    stack.stop().await;
    env.cleanup().await;
}
