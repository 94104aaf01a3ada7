//! Bad HTTP input: every malformed request gets the right status and an error naming the field,
//! and nothing is published or written. Drives the router in-process (no socket).

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{API, TestEnv};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn admit(patch: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v =
        json!({"request_id": "r-1", "subject": "key:k_1", "model": "m", "estimate": {"cost": 10}});
    patch(&mut v);
    serde_json::to_vec(&v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_naming_the_field() {
    let env = TestEnv::new(&[]).await;
    let tokens = tally_api::Tokens::from_lists(common::ADMIN, API);
    let shutdown = tally::stack::Shutdown::default();
    let (state, tasks) = tally::stack::api_state(
        &env.conns,
        &env.common,
        tokens,
        Default::default(),
        &shutdown,
    )
    .unwrap();
    let app = tally_api::app(state);

    // Auth.
    let (s, b) = call(&app, "POST", "/v1/admit", None, admit(|_| {})).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    let (s, _) = call(&app, "POST", "/v1/admit", Some("wrong"), admit(|_| {})).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // An API token is valid but may not write configuration.
    let policy = serde_json::to_vec(
        &serde_json::json!({"subject": "key:k", "metric": "requests",
        "limit": 1, "window": {"kind": "lifetime"}}),
    )
    .unwrap();
    let (s, b) = call(&app, "PUT", "/v1/policies/p", Some(API), policy).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden")),
        "{b}"
    );

    // (body, expected status, expected field)
    let far_future = (chrono::Utc::now() + chrono::TimeDelta::hours(1)).to_rfc3339();
    let far_past = (chrono::Utc::now() - chrono::TimeDelta::days(40)).to_rfc3339();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "missing request_id",
            admit(|v| drop(v.as_object_mut().unwrap().remove("request_id"))),
            "request_id",
        ),
        (
            "missing subject",
            admit(|v| drop(v.as_object_mut().unwrap().remove("subject"))),
            "subject",
        ),
        (
            "subject not a string",
            admit(|v| v["subject"] = 5.into()),
            "subject",
        ),
        (
            "subject not kind:id",
            admit(|v| v["subject"] = "KEY k1".into()),
            "subject",
        ),
        (
            "empty request_id",
            admit(|v| v["request_id"] = "".into()),
            "request_id",
        ),
        (
            "cost as string",
            admit(|v| v["estimate"]["cost"] = "10".into()),
            "estimate.cost",
        ),
        (
            "cost negative",
            admit(|v| v["estimate"]["cost"] = (-1).into()),
            "estimate.cost",
        ),
        (
            "cost float",
            admit(|v| v["estimate"]["cost"] = 1.5.into()),
            "estimate.cost",
        ),
        (
            "unknown field",
            admit(|v| v["priority"] = 1.into()),
            "priority",
        ),
        (
            "unknown nested field",
            admit(|v| v["estimate"]["dollars"] = 1.into()),
            "estimate.dollars",
        ),
        (
            "at in the future",
            admit(|v| v["at"] = far_future.clone().into()),
            "at",
        ),
        (
            "at too far back",
            admit(|v| v["at"] = far_past.clone().into()),
            "at",
        ),
        (
            "at not a time",
            admit(|v| v["at"] = "yesterday".into()),
            "at",
        ),
        (
            "model too long",
            admit(|v| v["model"] = "m".repeat(300).into()),
            "model",
        ),
    ];
    for (what, body, field) in cases {
        let (s, b) = call(&app, "POST", "/v1/admit", Some(API), body).await;
        println!("{what}: {s} {b}");
        assert_eq!(s, StatusCode::BAD_REQUEST, "{what}: {b}");
        assert_eq!(b["error"]["code"], "invalid_request", "{what}");
        assert_eq!(b["error"]["field"], field, "{what}: {b}");
    }

    let (s, b) = call(&app, "POST", "/v1/admit", Some(API), b"{not json".to_vec()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, b) = call(&app, "POST", "/v1/admit", Some(API), Vec::new()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let big = admit(|v| v["model"] = "x".repeat(70 * 1024).into());
    let (s, b) = call(&app, "POST", "/v1/admit", Some(API), big).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{b}");
    assert_eq!(b["error"]["code"], "payload_too_large");

    // Settlement without admission must name its subject; wrong types name the field.
    let settle = |v: Value| serde_json::to_vec(&v).unwrap();
    let (s, b) = call(
        &app,
        "POST",
        "/v1/settle",
        Some(API),
        settle(json!({"request_id": "nope", "usage": {"cost": 1}})),
    )
    .await;
    assert_eq!(
        (s, b["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("subject")),
        "{b}"
    );
    let (s, b) = call(
        &app,
        "POST",
        "/v1/settle",
        Some(API),
        settle(json!({"request_id": "r", "final": "yes"})),
    )
    .await;
    assert_eq!(
        (s, b["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("final")),
        "{b}"
    );
    let (s, b) = call(
        &app,
        "POST",
        "/v1/settle",
        Some(API),
        settle(json!({"request_id": "r", "seq": -1})),
    )
    .await;
    assert_eq!(
        (s, b["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("seq")),
        "{b}"
    );
    let (s, b) = call(
        &app,
        "POST",
        "/v1/release",
        Some(API),
        settle(json!({"request_id": "never-admitted"})),
    )
    .await;
    assert_eq!(
        (s, b["error"]["field"].as_str()),
        (StatusCode::NOT_FOUND, Some("request_id")),
        "{b}"
    );

    // Query strings.
    for (path, field) in [
        ("/v1/usage", "subject"),
        ("/v1/usage?subject=key:k&granularity=week", "granularity"),
        ("/v1/usage?subject=key:k&form=2026-01-01T00:00:00Z", "form"),
        ("/v1/usage?subject=key:k&from=yesterday", "from"),
        (
            "/v1/usage?subject=key:k&from=2026-11-20T00:00:00Z&to=2026-11-10T00:00:00Z",
            "to",
        ),
        (
            "/v1/usage?subject=key:k&granularity=minute&from=2026-01-01T00:00:00Z&to=2026-11-01T00:00:00Z",
            "granularity",
        ),
    ] {
        let (s, b) = call(&app, "GET", path, Some(API), Vec::new()).await;
        assert_eq!(
            (s, b["error"]["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some(field)),
            "{path}: {b}"
        );
    }
    let (s, _) = call(&app, "GET", "/v1/requests/unknown", Some(API), Vec::new()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Nothing of the above reached the stream or the ledger.
    let mut stream = env.conns.js.get_stream(&env.stream).await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        0,
        "no event was published"
    );
    assert_eq!(env.ledger_count().await, 0);

    shutdown.trigger();
    let _ = tasks.await;
    env.cleanup().await;
}
