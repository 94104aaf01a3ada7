//! Issue 13 (metrics): `/metrics` is what an operator graphs, through the `prometheus` crate and
//! valid for `promtool check metrics`: histograms in seconds for admission, settlement,
//! JetStream publish+ack, ledger batch commit and projection batch; HTTP requests by route and
//! status; refusals by reason; ledger and projection lag in events and seconds; the ledger
//! consumer's pending and redelivered messages; snapshot age; spool.

mod common;

use std::collections::{BTreeMap, HashMap};

use common::TestEnv;
use serde_json::json;

/// One metric family as scraped: its TYPE and its samples (`name{labels}` → value).
#[derive(Debug, Default)]
struct Family {
    kind: String,
    samples: BTreeMap<String, f64>,
}

/// Parse the text exposition strictly: every sample belongs to a family declared (HELP and
/// TYPE, once each) before it; histogram samples are `_bucket`, `_sum`, `_count`.
fn parse(text: &str) -> HashMap<String, Family> {
    let mut families: HashMap<String, Family> = HashMap::new();
    let mut helped = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(helped.insert(name.to_owned()), "second HELP for {name}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap().to_owned();
            let kind = parts.next().unwrap().to_owned();
            assert!(helped.contains(&name), "TYPE before HELP for {name}");
            let old = families.insert(
                name.clone(),
                Family {
                    kind,
                    ..Family::default()
                },
            );
            assert!(old.is_none(), "second TYPE for {name}");
        } else if !line.is_empty() {
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|s| name.strip_suffix(s))
                .find(|base| families.get(*base).is_some_and(|f| f.kind == "histogram"))
                .unwrap_or(name);
            let f = families
                .get_mut(family)
                .unwrap_or_else(|| panic!("sample before its TYPE: {line}"));
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
            f.samples.insert(series.to_owned(), v);
        }
    }
    families
}

fn sample(f: &HashMap<String, Family>, family: &str, series: &str) -> f64 {
    let fam = f
        .get(family)
        .unwrap_or_else(|| panic!("family {family} missing"));
    *fam.samples
        .get(series)
        .unwrap_or_else(|| panic!("{series} missing in {family}: {:?}", fam.samples))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_every_family_an_operator_graphs() {
    let env = TestEnv::new(&[]).await;
    let stack = common::Stack::start(&env).await;
    let (st, b) = stack
        .admin(
            "PUT",
            "/v1/policies/small",
            Some(json!({"subject": "key:m", "metric": "cost", "limit": 100, "window": {"kind": "lifetime"}})),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    let mut admitted = 0;
    for i in 0..5 {
        let rid = format!("m-{i}");
        let (st, d) = stack
            .post(
                "/v1/admit",
                json!({"request_id": rid, "subject": "key:m", "estimate": {"cost": 40}}),
            )
            .await;
        assert_eq!(st, 200, "{d}");
        if d["admitted"] == true {
            admitted += 1;
            let (st, d) = stack
                .post(
                    "/v1/settle",
                    json!({"request_id": rid, "usage": {"cost": 40}}),
                )
                .await;
            assert_eq!(st, 202, "{d}");
        }
    }
    assert_eq!(admitted, 2, "cost 40 twice fits in 100, a third does not");
    let (st, _) = stack.get("/v1/nowhere").await;
    assert_eq!(st, 404);
    // Wait until the ledger and every projection have the events, so lags read 0.
    let events = 1 + 5 + 2;
    env.eventually("the ledger has every event", || async {
        env.ledger_count().await >= events
    })
    .await;
    env.eventually("projections caught up", || async {
        let text = stack.text("/metrics").await;
        let f = parse(&text);
        tally_projector::registry::REGISTRY.iter().all(|e| {
            f.get("tally_projection_lag_events").and_then(|fam| {
                fam.samples.get(&format!(
                    "tally_projection_lag_events{{projection=\"{}\"}}",
                    e.name
                ))
            }) == Some(&0.0)
        })
    })
    .await;
    let text = stack.text("/metrics").await;
    promtool_accepts(&text);
    let f = parse(&text);
    for (family, kind) in [
        ("tally_admission_seconds", "histogram"),
        ("tally_settlement_seconds", "histogram"),
        ("tally_jetstream_publish_seconds", "histogram"),
        ("tally_ledger_batch_commit_seconds", "histogram"),
        ("tally_projection_batch_seconds", "histogram"),
        ("tally_http_request_seconds", "histogram"),
        ("tally_http_requests_total", "counter"),
        ("tally_admission_rejections_total", "counter"),
        ("tally_ledger_lag_events", "gauge"),
        ("tally_ledger_lag_seconds", "gauge"),
        ("tally_projection_lag_events", "gauge"),
        ("tally_projection_lag_seconds", "gauge"),
        ("tally_ledger_consumer_pending_messages", "gauge"),
        ("tally_ledger_consumer_redelivered_messages", "gauge"),
        ("tally_snapshot_age_seconds", "gauge"),
        ("tally_spool_pending_events", "gauge"),
    ] {
        let fam = f
            .get(family)
            .unwrap_or_else(|| panic!("{family} missing:\n{text}"));
        assert_eq!(fam.kind, kind, "{family}");
    }
    println!("families: {}", f.len());
    dashboard_reads_only_exposed_families(&f);
    assert_eq!(
        sample(
            &f,
            "tally_admissions_admitted_total",
            "tally_admissions_admitted_total"
        ),
        2.0
    );
    assert_eq!(
        sample(
            &f,
            "tally_admission_rejections_total",
            "tally_admission_rejections_total{reason=\"limit_exceeded\"}"
        ),
        3.0
    );
    assert_eq!(
        sample(
            &f,
            "tally_admission_seconds",
            "tally_admission_seconds_count"
        ),
        5.0
    );
    assert_eq!(
        sample(
            &f,
            "tally_settlement_seconds",
            "tally_settlement_seconds_count"
        ),
        2.0
    );
    assert!(
        sample(
            &f,
            "tally_jetstream_publish_seconds",
            "tally_jetstream_publish_seconds_count"
        ) >= 8.0
    );
    assert!(
        sample(
            &f,
            "tally_ledger_batch_commit_seconds",
            "tally_ledger_batch_commit_seconds_count"
        ) >= 1.0
    );
    assert_eq!(
        sample(
            &f,
            "tally_http_requests_total",
            "tally_http_requests_total{method=\"POST\",route=\"/v1/admit\",status=\"200\"}"
        ),
        5.0
    );
    assert_eq!(
        sample(
            &f,
            "tally_http_requests_total",
            "tally_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"}"
        ),
        1.0
    );
    for e in tally_projector::registry::REGISTRY {
        let series = format!(
            "tally_projection_batch_seconds_count{{projection=\"{}\"}}",
            e.name
        );
        assert!(
            sample(&f, "tally_projection_batch_seconds", &series) >= 1.0,
            "{series}"
        );
        let lag = format!("tally_projection_lag_seconds{{projection=\"{}\"}}", e.name);
        assert_eq!(sample(&f, "tally_projection_lag_seconds", &lag), 0.0);
    }
    assert_eq!(
        sample(&f, "tally_ledger_lag_events", "tally_ledger_lag_events"),
        0.0
    );
    assert_eq!(
        sample(
            &f,
            "tally_ledger_consumer_pending_messages",
            "tally_ledger_consumer_pending_messages"
        ),
        0.0
    );
    // No snapshot yet (the first is written after 100,000 events or 5 minutes).
    assert_eq!(
        sample(
            &f,
            "tally_snapshot_age_seconds",
            "tally_snapshot_age_seconds"
        ),
        -1.0
    );
    let errors = &f["tally_metrics_scrape_errors_total"].samples;
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(errors.values().all(|v| *v == 0.0), "{errors:?}");
    let reasons = &f["tally_admission_rejections_total"].samples;
    assert_eq!(reasons.len(), 5, "every reason from 0: {reasons:?}");
    stack.stop().await;
    env.cleanup().await;
}

/// `promtool check metrics` (Debian's `prometheus` package; scripts/test installs it) accepts
/// the exposition: no errors and no lint problems.
fn promtool_accepts(text: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "promtool check metrics: exit {:?} {said:?}",
        out.status.code()
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}\n{text}"
    );
}

/// Every metric the Grafana dashboard in `deploy/grafana/tally.json` queries is a family the
/// server exposes (a renamed metric would leave a panel empty without a word).
fn dashboard_reads_only_exposed_families(f: &HashMap<String, Family>) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/tally.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("tally_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                queried.insert(name.strip_suffix("_bucket").unwrap_or(&name).to_owned());
            }
        }
    }
    assert!(queried.len() >= 15, "{queried:?}");
    for name in &queried {
        assert!(
            f.contains_key(name),
            "the dashboard queries {name}, which /metrics lacks"
        );
    }
    println!("dashboard queries {} families, all exposed", queried.len());
}

/// `tally ledger` and `tally project` with `--metrics-addr` serve their workers' batch
/// histograms, counters and checkpoints (the processes of the systemd deployment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_processes_serve_their_metrics() {
    let env = TestEnv::new(&[]).await;
    let stack = common::Stack::start_opts(&env, false, false).await;
    let spawn = |role: &str, port: u16| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args([role, "--metrics-addr", &format!("127.0.0.1:{port}")])
            .envs(env.child_env())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tally")
    };
    let (ledger_port, project_port) = (common::free_port(), common::free_port());
    let mut ledger = spawn("ledger", ledger_port);
    let mut project = spawn("project", project_port);
    for i in 0..3 {
        let (st, d) = stack
            .post(
                "/v1/admit",
                json!({"request_id": format!("w-{i}"), "subject": "key:w"}),
            )
            .await;
        assert_eq!(st, 200, "{d}");
    }
    env.eventually("the ledger has the admissions", || async {
        env.ledger_count().await >= 3
    })
    .await;
    let scrape = |port: u16| async move {
        reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()
    };
    let mut texts = Vec::new();
    for (port, family, series) in [
        (
            ledger_port,
            "tally_ledger_batch_commit_seconds",
            "tally_ledger_batch_commit_seconds_count".to_owned(),
        ),
        (
            project_port,
            "tally_projection_batch_seconds",
            "tally_projection_batch_seconds_count{projection=\"usage\"}".to_owned(),
        ),
    ] {
        let mut last = String::new();
        let start = std::time::Instant::now();
        let mut more = 0;
        loop {
            if let Some(text) = scrape(port).await {
                let f = parse(&text);
                if f.get(family)
                    .and_then(|fam| fam.samples.get(&series))
                    .is_some_and(|v| *v >= 1.0)
                {
                    promtool_accepts(&text);
                    println!("{series} = {}", sample(&f, family, &series));
                    texts.push(text);
                    break;
                }
                last = text;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "{series}:\n{last}"
            );
            // A projection built at start (its tables were missing) folds in a rebuild; its
            // live runner counts the batches of rows that arrive after: keep some arriving.
            more += 1;
            let rid = format!("w-more-{port}-{more}");
            let body = json!({"request_id": rid, "subject": "key:w", "usage": {"cost": 1}});
            let (st, _) = stack.post("/v1/settle", body).await;
            assert_eq!(st, 202);
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    assert!(
        texts[0].contains("tally_ledger_rows_appended_total "),
        "{}",
        texts[0]
    );
    let _ = ledger.kill().await;
    let _ = project.kill().await;
    stack.stop().await;
    env.cleanup().await;
}
