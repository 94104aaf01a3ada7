//! Issue 13 (OpenAPI): `/openapi.json` is generated from the router's handlers (utoipa). Every
//! route of SPEC §6 and §8 is in it with its request and response schemas and the error schema;
//! every documented operation is served by `app()` (none answers the unknown-route 404 or a 405).

mod common;

use common::TestEnv;
use serde_json::Value;

/// The routes `app()` serves (SPEC §6 data plane and admin, §8 reports, operations).
const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/admit"),
    ("post", "/v1/settle"),
    ("post", "/v1/release"),
    ("get", "/v1/usage"),
    ("get", "/v1/requests/{request_id}"),
    ("get", "/v1/quota"),
    ("get", "/v1/reports/daily-usage"),
    ("get", "/v1/subjects"),
    ("put", "/v1/subjects/{subject}"),
    ("get", "/v1/subjects/{subject}"),
    ("delete", "/v1/subjects/{subject}"),
    ("put", "/v1/model-groups/{name}"),
    ("delete", "/v1/model-groups/{name}"),
    ("get", "/v1/policies"),
    ("put", "/v1/policies/{id}"),
    ("delete", "/v1/policies/{id}"),
    ("post", "/v1/policies/{id}/reset"),
    ("post", "/v1/grants"),
    ("delete", "/v1/grants/{id}"),
    ("post", "/v1/credits/{subject}"),
    ("post", "/v1/admin/pool-usage"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/ui"),
];

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_covers_every_route_and_only_served_ones() {
    let env = TestEnv::new(&[]).await;
    let stack = common::Stack::start(&env).await;
    let doc: Value = serde_json::from_str(&stack.text("/openapi.json").await).unwrap();
    let paths = doc["paths"].as_object().expect("paths");
    let mut documented = Vec::new();
    for (path, item) in paths {
        for m in METHODS {
            if item.get(m).is_some() {
                documented.push((m.to_owned(), path.clone()));
            }
        }
    }
    println!("{} operations documented", documented.len());
    for (m, p) in ROUTES {
        assert!(
            documented.iter().any(|(dm, dp)| dm == m && dp == p),
            "{} {p} is served but missing from /openapi.json",
            m.to_uppercase()
        );
    }
    assert_eq!(documented.len(), ROUTES.len(), "{documented:?}");
    let http = reqwest::Client::new();
    for (m, p) in &documented {
        let op = &paths[p][m];
        check_operation(m, p, op);
        // Served: the router knows the route (path parameters filled with a valid name).
        let filled = p
            .replace("{subject}", "key:x")
            .replace("{request_id}", "r1")
            .replace("{name}", "g1")
            .replace("{id}", "p1");
        let url = stack.url(&filled);
        let method = reqwest::Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
        let r = http
            .request(method, url)
            .bearer_auth(common::ADMIN)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        let unknown_route = status == 404
            && body["error"]["message"]
                .as_str()
                .is_some_and(|s| s.contains("route"));
        assert!(
            !unknown_route && status != 405,
            "{m} {p} documented but not served: {status} {body}"
        );
    }
    stack.stop().await;
    env.cleanup().await;
}

/// An operation has a success response with a schema (or a content type), its request body (if
/// any) a schema, and every non-operations route the error schema for its 4xx answers.
fn check_operation(method: &str, path: &str, op: &Value) {
    let responses = op["responses"].as_object().expect("responses");
    assert!(
        responses.keys().any(|s| s.starts_with('2')),
        "{method} {path}: no success response"
    );
    if let Some(body) = op.get("requestBody") {
        assert!(
            body["content"]["application/json"]["schema"].is_object(),
            "{method} {path}: request body without a schema"
        );
    }
    let operations = op["tags"][0] == "operations";
    if !operations {
        for status in ["400", "401"] {
            let schema = &responses[status]["content"]["application/json"]["schema"]["$ref"];
            assert_eq!(
                schema, "#/components/schemas/ErrorBody",
                "{method} {path}: {status} has the error schema"
            );
        }
        assert_eq!(
            op["security"][0]["bearer"],
            serde_json::json!([]),
            "{method} {path}"
        );
    }
}
