//! HTTP edges of SPEC v2 §6 (issue 4, class 9) on a real server: every non-2xx answer has the
//! JSON error body; slow and idle connections are closed; an oversized `Content-Length` is
//! refused before the body is read; strict JSON; the client's own field names; auth details.

mod common;

use std::time::{Duration, Instant};

use common::{ADMIN, API, Stack, TestEnv};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The server's header/idle timeout in this test.
const HEADER_TIMEOUT: &str = "1s";

/// How long the connection stayed open before the server closed it (None: still open after
/// `within`).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(
            within.saturating_sub(start.elapsed()),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => continue, // a response (408 or similar); wait for the close
        }
    }
}

/// Send raw bytes and read whatever arrives within `within`.
async fn raw(stack: &Stack, bytes: &[u8], within: Duration) -> String {
    let mut s = TcpStream::connect(stack.addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    while let Ok(Ok(n)) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        s.read(&mut buf),
    )
    .await
    {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.windows(4).any(|w| w == b"\r\n\r\n")
            && String::from_utf8_lossy(&out).contains("\"error\"")
        {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A call whose transport may fail (the old server dropped the connection on a panic).
async fn call(
    stack: &Stack,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, reqwest::header::HeaderMap, Value), String> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = stack.http.request(method, stack.url(path));
    if let Some(t) = token {
        req = req.header("authorization", t);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    let r = req.send().await.map_err(|e| format!("no answer: {e}"))?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json().await.unwrap_or(Value::Null);
    Ok((status, headers, body))
}

fn field(b: &Value) -> Option<&str> {
    b["error"]["field"].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed() {
    let env = TestEnv::new(&["--http-header-timeout", HEADER_TIMEOUT]).await;
    let stack = Stack::start(&env).await;
    // A client that sends half its headers and stops.
    let mut slow = TcpStream::connect(stack.addr).await.unwrap();
    slow.write_all(b"POST /v1/admit HTTP/1.1\r\nHost: tally\r\n")
        .await
        .unwrap();
    let closed = closed_within(&mut slow, Duration::from_secs(5)).await;
    println!("slow headers: closed after {closed:?}");
    assert!(closed.is_some(), "a slow-header client is closed");
    // A socket that never sends anything.
    let mut idle = TcpStream::connect(stack.addr).await.unwrap();
    let closed = closed_within(&mut idle, Duration::from_secs(5)).await;
    println!("idle socket: closed after {closed:?}");
    assert!(closed.is_some(), "an idle socket is closed");
    // A keep-alive connection idle after a request.
    let mut kept = TcpStream::connect(stack.addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n")
        .await
        .unwrap();
    let closed = closed_within(&mut kept, Duration::from_secs(5)).await;
    println!("idle keep-alive: closed after {closed:?}");
    assert!(closed.is_some(), "an idle keep-alive connection is closed");
    stack.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_the_json_body_and_names_the_field() {
    let env = TestEnv::new(&[]).await;
    let stack = Stack::start(&env).await;
    let api = format!("Bearer {API}");
    let admin = format!("Bearer {ADMIN}");
    // 413 from Content-Length, before the body: the server answers while the body never comes.
    let started = Instant::now();
    let answer = raw(
        &stack,
        format!("POST /v1/admit HTTP/1.1\r\nHost: tally\r\nAuthorization: {api}\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\n\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    println!(
        "100 MB Content-Length: {:?} after {:?}",
        answer.lines().next(),
        started.elapsed()
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    // 404, 405 and a path segment that is not UTF-8: JSON bodies.
    let (st, _, b) = call(&stack, "GET", "/v1/nope", Some(&api), None)
        .await
        .unwrap();
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{b}"
    );
    let (st, _, b) = call(&stack, "GET", "/v1/admit", Some(&api), None)
        .await
        .unwrap();
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (405, Some("method_not_allowed")),
        "{b}"
    );
    let (st, _, b) = call(&stack, "GET", "/v1/requests/%FF%FE", Some(&api), None)
        .await
        .unwrap();
    println!("invalid UTF-8 path: {st} {b}");
    assert_eq!((st, field(&b)), (400, Some("request_id")), "{b}");
    // /v1/usage with times outside the supported range: a 400 naming the field, not a panic.
    let r = call(
        &stack,
        "GET",
        "/v1/usage?subject=key:k&from=0001-01-01T00:00:00Z",
        Some(&api),
        None,
    )
    .await;
    println!("usage from year 1: {r:?}");
    let (st, _, b) = r.unwrap();
    assert_eq!((st, field(&b)), (400, Some("from")), "{b}");
    let (st, _, b) = call(
        &stack,
        "GET",
        "/v1/usage?subject=key:k&to=9999-12-31T00:00:00Z",
        Some(&api),
        None,
    )
    .await
    .unwrap();
    assert_eq!((st, field(&b)), (400, Some("to")), "{b}");
    // Strict JSON: an array is not an object; a duplicate key is named.
    let (st, _, b) = call(
        &stack,
        "POST",
        "/v1/admit",
        Some(&api),
        Some(r#"["r1","key:k"]"#),
    )
    .await
    .unwrap();
    assert_eq!(st, 400, "array body: {b}");
    let (st, _, b) = call(
        &stack,
        "POST",
        "/v1/admit",
        Some(&api),
        Some(r#"{"request_id":"a","request_id":"b","subject":"key:k"}"#),
    )
    .await
    .unwrap();
    println!("duplicate key: {b}");
    assert_eq!((st, field(&b)), (400, Some("request_id")), "{b}");
    let (st, _, b) = call(
        &stack,
        "POST",
        "/v1/admit",
        Some(&api),
        Some(r#"{"request_id":"a","subject":"key:k","estimate":[1,2]}"#),
    )
    .await
    .unwrap();
    assert_eq!((st, field(&b)), (400, Some("estimate")), "{b}");
    // Windows: unknown fields of a lifetime window, `+4:00`, `+5h`: the client's field names.
    let pol = |w: Value| {
        json!({"subject": "key:k", "metric": "cost", "limit": 5, "window": w}).to_string()
    };
    let (st, _, b) = call(
        &stack,
        "PUT",
        "/v1/policies/p",
        Some(&admin),
        Some(&pol(json!({"kind": "lifetime", "duration": "5h"}))),
    )
    .await
    .unwrap();
    println!("lifetime with a duration: {st} {b}");
    assert_eq!(st, 400, "{b}");
    assert!(field(&b).is_some_and(|f| f.starts_with("window")), "{b}");
    let (st, _, b) = call(
        &stack,
        "PUT",
        "/v1/policies/p",
        Some(&admin),
        Some(&pol(
            json!({"kind": "calendar", "unit": "day", "reset_at": "+4:00"}),
        )),
    )
    .await
    .unwrap();
    assert_eq!((st, field(&b)), (400, Some("window.reset_at")), "{b}");
    let (st, _, b) = call(
        &stack,
        "PUT",
        "/v1/policies/p",
        Some(&admin),
        Some(&pol(json!({"kind": "rolling", "duration": "+5h"}))),
    )
    .await
    .unwrap();
    assert_eq!((st, field(&b)), (400, Some("window.duration")), "{b}");
    // A grant naming a model group that does not exist.
    let grant = json!({"subject": "key:k", "model_group": "ghost", "metric": "cost", "amount": 5, "expires_at": "2099-01-01T00:00:00Z"}).to_string();
    let (st, _, b) = call(&stack, "POST", "/v1/grants", Some(&admin), Some(&grant))
        .await
        .unwrap();
    assert_eq!((st, field(&b)), (400, Some("model_group")), "{b}");
    // Auth: 401 names the scheme; the scheme is case-insensitive.
    let (st, h, b) = call(&stack, "GET", "/v1/quota?subject=key:k", None, None)
        .await
        .unwrap();
    println!("401: {:?} {b}", h.get("www-authenticate"));
    assert_eq!(st, 401);
    assert_eq!(
        h.get("www-authenticate").map(|v| v.to_str().unwrap()),
        Some("Bearer")
    );
    let (st, _, b) = call(
        &stack,
        "GET",
        "/v1/quota?subject=key:k",
        Some(&format!("bearer {API}")),
        None,
    )
    .await
    .unwrap();
    assert_eq!(st, 200, "lower-case scheme: {b}");
    // `groups: null` clears the groups (absent keeps them).
    let (st, _, _) = call(
        &stack,
        "PUT",
        "/v1/subjects/user:g",
        Some(&admin),
        Some(r#"{"groups":["pro"]}"#),
    )
    .await
    .unwrap();
    assert_eq!(st, 200);
    let (_, _, b) = call(
        &stack,
        "PUT",
        "/v1/subjects/user:g",
        Some(&admin),
        Some(r#"{"disabled":true}"#),
    )
    .await
    .unwrap();
    assert_eq!(b["groups"], json!(["pro"]), "absent keeps: {b}");
    let (_, _, b) = call(
        &stack,
        "PUT",
        "/v1/subjects/user:g",
        Some(&admin),
        Some(r#"{"groups":null,"disabled":null}"#),
    )
    .await
    .unwrap();
    println!("groups: null, disabled: null → {b}");
    assert_eq!(
        (b["groups"].clone(), b["disabled"].clone()),
        (json!([]), json!(false)),
        "{b}"
    );
    stack.stop().await;
    env.cleanup().await;
}
