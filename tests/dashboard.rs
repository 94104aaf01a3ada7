//! Issue 13 (dashboard): `/ui` rendered by a real headless Chromium (Debian's `chromium`,
//! installed by scripts/test) against a live stack with a hierarchy and traffic: the subject tree,
//! every pool's numbers equal to `/v1/quota`, the exhausted pool and the disabled subject marked,
//! a request looked up, freshness shown, the daily-usage chart drawn.

mod common;

use std::time::Duration;

use common::TestEnv;
use serde_json::json;

/// The value of attribute `name` in the HTML `fragment` (the first occurrence).
fn attr(fragment: &str, name: &str) -> Option<String> {
    let key = format!("{name}=\"");
    let start = fragment.find(&key)? + key.len();
    let end = fragment[start..].find('"')? + start;
    Some(fragment[start..end].to_owned())
}

/// The page as Chromium rendered it, once its scripts loaded everything (`data-loaded`).
async fn render(url: &str) -> String {
    for attempt in 0..3 {
        let out = tokio::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--virtual-time-budget=20000",
                "--dump-dom",
                url,
            ])
            .output()
            .await
            .expect("chromium (Debian package; scripts/test installs it)");
        let dom = String::from_utf8_lossy(&out.stdout).into_owned();
        if dom.contains("data-loaded=\"true\"") {
            return dom;
        }
        println!(
            "render attempt {attempt}: not loaded yet ({} bytes; stderr {})",
            dom.len(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("the dashboard never finished loading");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_what_the_api_says() {
    let env = TestEnv::new(&[]).await;
    let stack = common::Stack::start(&env).await;
    for (s, body) in [
        ("customer:acme", json!({})),
        ("team:core", json!({"parent": "customer:acme"})),
        ("user:alice", json!({"parent": "team:core"})),
        ("key:k1", json!({"parent": "user:alice"})),
        ("key:k2", json!({"parent": "user:alice", "disabled": true})),
    ] {
        let (st, b) = stack
            .admin("PUT", &format!("/v1/subjects/{s}"), Some(body))
            .await;
        assert_eq!(st, 200, "{s}: {b}");
    }
    for (id, subject, metric, limit) in [
        ("p-key", "key:k1", "cost", 100),
        ("p-team", "team:core", "requests", 1000),
        ("p-cust", "customer:acme", "cost", 5000),
    ] {
        let body = json!({"subject": subject, "metric": metric, "limit": limit, "window": {"kind": "lifetime"}});
        let (st, b) = stack
            .admin("PUT", &format!("/v1/policies/{id}"), Some(body))
            .await;
        assert_eq!(st, 200, "{id}: {b}");
    }
    // 60 then 40 of cost on key:k1: its pool of 100 is exhausted.
    for (rid, cost) in [("d-1", 60), ("d-2", 40)] {
        let (st, d) = stack
            .post(
                "/v1/admit",
                json!({"request_id": rid, "subject": "key:k1", "estimate": {"cost": cost}}),
            )
            .await;
        assert_eq!((st, &d["admitted"]), (200, &json!(true)), "{d}");
        let (st, d) = stack
            .post(
                "/v1/settle",
                json!({"request_id": rid, "usage": {"cost": cost}}),
            )
            .await;
        assert_eq!(st, 202, "{d}");
    }
    env.eventually("projections caught up", || async {
        let r = stack.readyz().await;
        r["checks"]["projection_lag_rows"]
            .as_object()
            .is_some_and(|m| m.values().all(|v| v == 0))
    })
    .await;
    let dom = render(&stack.url(&format!("/ui#token={}&request=d-1", common::ADMIN))).await;
    // The request lookup (`#request=` looks one up at load): its state, decision and checks.
    let table = &dom[dom
        .find("id=\"request-table\"")
        .expect("the request lookup rendered")..];
    assert_eq!(attr(table, "data-request").as_deref(), Some("d-1"));
    assert_eq!(attr(table, "data-state").as_deref(), Some("settled"));
    assert!(table.contains("data-admitted=\"true\""), "admitted shown");
    assert!(
        table.contains("p-key on key:k1: pass, used 0 / 100"),
        "its checks shown"
    );
    // The tree: every configured subject, nested by parent.
    for s in [
        "customer:acme",
        "team:core",
        "user:alice",
        "key:k1",
        "key:k2",
    ] {
        assert!(
            dom.contains(&format!("data-subject=\"{s}\"")),
            "{s} in the tree"
        );
    }
    let k2 = &dom[dom.find("data-subject=\"key:k2\"").unwrap()..];
    assert!(
        k2[..400.min(k2.len())].contains("badge disabled"),
        "key:k2 marked disabled"
    );
    // Every pool shown equals /v1/quota for its subject.
    let pools: Vec<&str> = dom
        .split("class=\"pool")
        .skip(1)
        .filter(|p| p.contains("data-policy"))
        .collect();
    let mut seen = 0;
    for s in ["customer:acme", "team:core", "key:k1"] {
        let (st, q) = stack.get(&format!("/v1/quota?subject={s}")).await;
        assert_eq!(st, 200, "{q}");
        for c in q["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["subject"] == s)
        {
            let policy = c["policy_id"].as_str().unwrap();
            let shown = pools
                .iter()
                .find(|p| {
                    attr(p, "data-policy").as_deref() == Some(policy)
                        && attr(p, "data-subject").as_deref() == Some(s)
                })
                .unwrap_or_else(|| panic!("pool {policy} of {s} on the page"));
            for field in ["used", "limit", "remaining"] {
                let want = c[field].as_i64().unwrap().to_string();
                assert_eq!(
                    attr(shown, &format!("data-{field}")),
                    Some(want.clone()),
                    "{policy} {field}"
                );
            }
            let text = format!("{} / {}", c["used"], c["limit"]);
            assert!(shown.contains(&text), "{policy} shows {text}");
            println!(
                "{s} {policy}: used {} limit {} remaining {} state {:?}",
                c["used"],
                c["limit"],
                c["remaining"],
                attr(shown, "data-state")
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 3, "three pools");
    let key_pool = pools
        .iter()
        .find(|p| attr(p, "data-policy").as_deref() == Some("p-key"))
        .unwrap();
    assert_eq!(attr(key_pool, "data-state").as_deref(), Some("exhausted"));
    assert!(
        key_pool.starts_with(" exhausted"),
        "the exhausted pool is styled so"
    );
    // Freshness and the daily-usage chart (one bar: today's 100 of cost at the chain's top).
    assert!(dom.contains("as of: stream seq "), "freshness shown");
    let bar = &dom[dom.find("data-cost=").expect("a bar in the chart")..];
    assert_eq!(
        attr(&format!(" {bar}"), "data-cost").as_deref(),
        Some("100")
    );
    let rows = dom.matches("class=\"report-row\"").count();
    let today = chrono::Utc::now().date_naive();
    let from = today - chrono::Days::new(29);
    let (_, report) = stack
        .get(&format!(
            "/v1/reports/daily-usage?from={from}&to={today}&limit=1000"
        ))
        .await;
    assert_eq!(
        rows,
        report["rows"].as_array().map_or(0, Vec::len),
        "{report}"
    );
    println!(
        "rendered {} bytes, {} pools, {rows} report rows",
        dom.len(),
        pools.len()
    );
    stack.stop().await;
    env.cleanup().await;
}

/// `GET /v1/subjects` (the dashboard's tree) pages through every subject in name order, each
/// page bounded; a bad `limit` is a 400 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_are_listed_in_pages() {
    let env = TestEnv::new(&[]).await;
    let stack = common::Stack::start(&env).await;
    let mut want = Vec::new();
    for i in 0..25 {
        let s = format!("key:s{i:02}");
        let (st, b) = stack
            .admin("PUT", &format!("/v1/subjects/{s}"), Some(json!({})))
            .await;
        assert_eq!(st, 200, "{b}");
        want.push(s);
    }
    let mut got = Vec::new();
    let mut after = String::new();
    let mut pages = 0;
    loop {
        let (st, page) = stack
            .admin("GET", &format!("/v1/subjects?limit=10&after={after}"), None)
            .await;
        assert_eq!(st, 200, "{page}");
        pages += 1;
        let names: Vec<String> = page["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["subject"].as_str().unwrap().to_owned())
            .collect();
        assert!(names.len() <= 10);
        got.extend(names);
        match page["next_after"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    assert_eq!((got, pages), (want, 3));
    for bad in ["0", "1001", "x"] {
        let (st, b) = stack
            .admin("GET", &format!("/v1/subjects?limit={bad}"), None)
            .await;
        assert_eq!(
            (st, b["error"]["field"].as_str()),
            (400, Some("limit")),
            "{b}"
        );
    }
    stack.stop().await;
    env.cleanup().await;
}
