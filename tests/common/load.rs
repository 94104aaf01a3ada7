//! A small load generator for failure drills: clients admit and settle against a stack until told
//! to stop, and every answer is kept so the test can compare it with the ledger.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use super::Stack;

/// One request and what the API answered.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub request_id: String,
    pub subject: String,
    /// Status of the admission.
    pub admit_status: u16,
    /// Whether it was admitted (status 200 and `admitted: true`).
    pub admitted: bool,
    /// Status of the settlement, when one was sent.
    pub settle_status: Option<u16>,
    /// The settled cost.
    pub cost: i64,
    /// When the admission was sent.
    pub sent: Instant,
    /// How long admission and settlement took together.
    pub took: Duration,
}

/// Pause between a client's requests: keeps the drill's load steady without saturating two cores
/// that also run NATS and Postgres.
const THINK: Duration = Duration::from_millis(2);

/// `clients` tasks admitting and settling on `subjects` until `stop` is set. Every answer must be
/// 200/202 or a 503 with `"reason":"unavailable"`; anything else fails the test.
pub async fn run(
    stack: Arc<Stack>,
    subjects: &[&str],
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<Outcome> {
    run_tagged(stack, "", subjects, clients, stop).await
}

/// [`run`] with request ids prefixed by `tag` (several runs on one stack never share an id).
pub async fn run_tagged(
    stack: Arc<Stack>,
    tag: &str,
    subjects: &[&str],
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<Outcome> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (stack, stop) = (stack.clone(), stop.clone());
        let subject = subjects[c % subjects.len()].to_owned();
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let rid = format!("{tag}c{c}-{i}");
                let cost = 1 + (i as i64 * 7 + c as i64) % 50;
                let sent = Instant::now();
                let (st, d) = stack
                    .post(
                        "/v1/admit",
                        json!({"request_id": rid, "subject": subject, "estimate": {"cost": 50}}),
                    )
                    .await;
                check(st, &d, 200);
                let admitted = st == 200 && d["admitted"] == true;
                let mut settle_status = None;
                if admitted {
                    let (st, b) = stack
                        .post(
                            "/v1/settle",
                            json!({"request_id": rid, "usage": {"cost": cost}}),
                        )
                        .await;
                    check(st, &b, 202);
                    settle_status = Some(st);
                }
                out.push(Outcome {
                    request_id: rid,
                    subject: subject.clone(),
                    admit_status: st,
                    admitted,
                    settle_status,
                    cost,
                    sent,
                    took: sent.elapsed(),
                });
                tokio::time::sleep(THINK).await;
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn check(status: u16, body: &serde_json::Value, ok: u16) {
    assert!(
        status == ok || (status == 503 && body["reason"] == "unavailable"),
        "unexpected answer {status} {body}"
    );
}

/// Admission and settlement rows per request id in the ledger: (admissions, settlements).
/// How many admissions answered 200 and settlements answered 202 are not in `rows` yet. Wait on
/// this, not on a row count: publishes in flight when a request was answered 503 may land too,
/// so a count can be reached while acknowledged rows are still on their way.
pub fn acknowledged_missing(
    rows: &std::collections::HashMap<String, (i64, i64)>,
    outcomes: &[Outcome],
) -> usize {
    outcomes
        .iter()
        .filter(|o| {
            let (adm, set) = rows.get(&o.request_id).copied().unwrap_or((0, 0));
            (o.admit_status == 200 && adm == 0) || (o.settle_status == Some(202) && set == 0)
        })
        .count()
}

pub async fn ledger_rows(pool: &sqlx::PgPool) -> std::collections::HashMap<String, (i64, i64)> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT request_id, \
                count(*) FILTER (WHERE event_type = 'admission.decided'), \
                count(*) FILTER (WHERE event_type = 'usage.settled') \
         FROM ledger WHERE request_id IS NOT NULL GROUP BY request_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(r, a, s)| (r, (a, s))).collect()
}
