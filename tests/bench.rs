//! Issue 12: the bench's realistic configuration is what it claims (read back from the database
//! it wrote), and `--json` carries every field the issue names. Performance itself is never
//! asserted here: it is measured by `tally bench`, not by a timed test.

mod common;

use serde_json::Value;
use sqlx::Connection as _;

/// Run a small realistic bench, keeping its stream and database; (report, kept (stream, db)).
async fn small_bench() -> (Value, Vec<(String, String)>) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "bench",
            "--config",
            "realistic",
            "--keys",
            "200",
            "--clients",
            "4",
            "--duration",
            "1s",
            "--warmup",
            "1s",
            "--baseline-duration",
            "1s",
            "--open-loop-duration",
            "1s",
            "--restart-events",
            "20000",
            "--restart-full-rebuild",
            "false",
            "--json",
            "--keep",
        ])
        .env("NATS_URL", common::nats_url())
        .env("DATABASE_URL", common::server_url())
        .env("TALLY_LOG", "warn")
        .output()
        .await
        .expect("run tally bench");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "bench failed: {stderr}");
    let kept = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("kept stream "))
        .filter_map(|l| l.split_once(" and database "))
        .map(|(s, d)| (s.trim().to_owned(), d.trim().to_owned()))
        .collect();
    let report = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    (report, kept)
}

fn field<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| &v[k])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_realistic_bench_is_what_it_claims_and_reports_every_field() {
    let (report, kept) = small_bench().await;
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    assert_eq!(report["config"], "realistic");
    for path in [
        "baselines.http_requests_per_s",
        "baselines.jetstream_ack_latency.p99_us",
        "baselines.postgres_rows_per_s",
        "load.http_requests_per_s",
        "load.admission_latency.p99_us",
        "open_loop.rate_per_s",
        "open_loop.admission_latency.p50_us",
        "open_loop.admission_latency.p99_us",
        "open_loop.admission_latency.p999_us",
        "ledger_bytes_per_event",
        "freshness_other_instance_ms.p99",
        "peak_rss_mib",
        "replay_rows_per_s",
        "restart_ready_ms",
    ] {
        let v = field(&report, path);
        assert!(v.as_f64().is_some_and(|x| x > 0.0), "{path} = {v}");
    }
    assert_eq!(report["shape"]["keys"], 200);

    let (_, db) = kept
        .iter()
        .find(|(s, _)| !s.ends_with("_R"))
        .cloned()
        .expect("the load's stream and database were kept");
    let url = common::database_url(&db);
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let count = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql);
    // 200 keys → 20 users → 2 teams → 1 customer.
    for (prefix, n) in [
        ("key:k", 200),
        ("user:u", 20),
        ("team:t", 2),
        ("customer:c", 1),
    ] {
        let got: i64 =
            sqlx::query_scalar("SELECT count(*) FROM cfg_subjects WHERE subject LIKE $1")
                .bind(format!("{prefix}%"))
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert_eq!(got, n, "{prefix}");
    }
    let parent: Option<String> =
        sqlx::query_scalar("SELECT parent FROM cfg_subjects WHERE subject = 'key:k57'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(parent.as_deref(), Some("user:u17"));
    let groups: i64 = count("SELECT count(DISTINCT g) FROM cfg_subjects, unnest(groups) g")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(groups, 3, "users in three groups");
    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT \"window\"->>'kind' FROM cfg_policies WHERE policy_id <> 'bench-freshness' ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(kinds, ["calendar", "lifetime", "periodic", "rolling"]);
    let scoped: i64 = count("SELECT count(*) FROM cfg_policies WHERE model_group = 'claude'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(scoped, 3, "a claude-scoped template per group");
    let mgs: i64 = count("SELECT count(*) FROM cfg_model_groups")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mgs, 2);
    let credits: i64 =
        count("SELECT count(*) FROM credit_balances WHERE subject LIKE 'customer:%'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(credits, 1, "credits on the customer");
    let streamed: i64 = count(
        "SELECT count(DISTINCT request_id) FROM ledger WHERE event_type = 'usage.settled' \
         AND (payload->'data'->>'seq')::int > 0",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(streamed > 0, "a share of requests is streamed in chunks");
    drop(conn);

    let nats = async_nats::connect(common::nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let mut admin = sqlx::PgConnection::connect(&common::server_url())
        .await
        .unwrap();
    for (s, d) in kept {
        let _ = js.delete_stream(&s).await;
        let _ = js.delete_stream(format!("{s}_DLQ")).await;
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {d} WITH (FORCE)"))
            .execute(&mut admin)
            .await;
    }
}
