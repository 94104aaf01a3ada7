//! Shared harness of the end-to-end tests: each test gets its own JetStream stream and its own
//! Postgres database on the real servers, so tests run in parallel and never share state.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use sqlx::{Connection, PgPool};
use tally::cli::{Cli, Command, CommonArgs};
use tally::stack::{self, Connections, Shutdown};
use tokio::task::JoinHandle;

pub mod load;

/// Admin token of test stacks.
pub const ADMIN: &str = "test-admin-token";
/// API token of test stacks.
pub const API: &str = "test-api-token";
/// Longest any test waits for the pipeline to settle; far above the expected milliseconds, so
/// only a real failure hits it.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Block until something accepts connections on 127.0.0.1:`port` (a server just spawned), at
/// most `limit`; `what` names it in the failure.
pub fn wait_for_port(port: u16, limit: Duration, what: &str) {
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < limit, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `server_url` with its database replaced by `db`.
pub fn database_url(db: &str) -> String {
    database_url_on(&server_url(), db)
}

/// `base` with its database replaced by `db`.
pub fn database_url_on(base: &str, db: &str) -> String {
    let (head, tail) = base
        .rsplit_once('/')
        .expect("DATABASE_URL has a database part");
    let query = tail
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("{head}/{db}{query}")
}

/// A private stream and database.
pub struct TestEnv {
    pub server: String,
    pub stream: String,
    pub db_name: String,
    pub db_url: String,
    pub common: CommonArgs,
    pub conns: Connections,
}

impl TestEnv {
    pub async fn new(extra: &[&str]) -> TestEnv {
        Self::new_with_nats(&nats_url(), extra).await
    }

    /// A private stream and database on the NATS server at `nats`.
    pub async fn new_with_nats(nats: &str, extra: &[&str]) -> TestEnv {
        Self::new_on(nats, &server_url(), extra).await
    }

    /// A private stream on `nats` and a private database on the Postgres server of `server`.
    pub async fn new_on(nats: &str, server: &str, extra: &[&str]) -> TestEnv {
        init_logs();
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let stream = format!("T_{id}");
        let db_name = format!("tally_t_{id}");
        let mut admin = sqlx::PgConnection::connect(server)
            .await
            .expect("connect to Postgres");
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let db_url = database_url_on(server, &db_name);
        let mut args = vec![
            "tally",
            "api",
            "--stream",
            &stream,
            "--admin-tokens",
            ADMIN,
            "--api-tokens",
            API,
            "--partitions",
            "4",
        ];
        args.extend_from_slice(extra);
        let Command::Api(common) = Cli::parse_from(args).command else {
            unreachable!()
        };
        let conns = stack::connect(&common, nats, &db_url)
            .await
            .expect("connect test stack");
        TestEnv {
            server: server.to_owned(),
            stream,
            db_name,
            db_url,
            common,
            conns,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.conns.pool
    }

    /// Environment for a `tally` child process pointed at this env.
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("NATS_URL", nats_url()),
            ("DATABASE_URL", self.db_url.clone()),
            ("TALLY_STREAM", self.stream.clone()),
            ("TALLY_PARTITIONS", "4".into()),
            ("TALLY_LOG", "warn".into()),
        ]
    }

    pub async fn ledger_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM ledger")
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    /// Wait until `f` returns true, panicking after [`SETTLE_TIMEOUT`].
    pub async fn eventually<F, Fut>(&self, what: &str, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        while !f().await {
            assert!(
                start.elapsed() < SETTLE_TIMEOUT,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Delete the streams and drop the database.
    pub async fn cleanup(self) {
        let (dlq, _) = self.conns.stream.dead_letter();
        let _ = self.conns.js.delete_stream(&self.stream).await;
        let _ = self.conns.js.delete_stream(&dlq).await;
        self.conns.pool.close().await;
        if let Ok(mut admin) = sqlx::PgConnection::connect(&self.server).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.db_name
            ))
            .execute(&mut admin)
            .await;
        }
    }
}

/// The whole stack (API, ledger writer, usage projector) in this process, on a free port.
pub struct Stack {
    pub addr: SocketAddr,
    pub shutdown: Shutdown,
    pub handles: Vec<JoinHandle<anyhow::Result<()>>>,
    /// The API's supervised background tasks (stream tail, expiry, sweep, compaction).
    pub tasks: JoinHandle<anyhow::Result<()>>,
    pub http: reqwest::Client,
}

impl Stack {
    pub async fn start(env: &TestEnv) -> Stack {
        Self::start_with(env, true).await
    }

    /// `with_ledger = false` runs the API and projectors only (the test runs its own writer).
    pub async fn start_with(env: &TestEnv, with_ledger: bool) -> Stack {
        Self::start_opts(env, with_ledger, true).await
    }

    /// The API, with or without the ledger writer and the projectors in this process.
    pub async fn start_opts(env: &TestEnv, with_ledger: bool, with_projectors: bool) -> Stack {
        let shutdown = Shutdown::default();
        let (mut workers, mut handles) = if with_projectors {
            stack::spawn_projectors(&env.conns, &env.common, &shutdown)
        } else {
            Default::default()
        };
        if with_ledger {
            let (stats, h) = stack::spawn_ledger(&env.conns, &shutdown);
            workers.ledger = Some(stats);
            handles.push(h);
        }
        let tokens = tally_api::Tokens::from_lists(ADMIN, API);
        let (state, tasks) =
            stack::api_state(&env.conns, &env.common, tokens, workers, &shutdown).unwrap();
        let (addr, api) = stack::spawn_api("127.0.0.1:0".parse().unwrap(), state, &shutdown)
            .await
            .unwrap();
        handles.push(api);
        let stack = Stack {
            addr,
            shutdown,
            handles,
            tasks,
            // Pooled connections are dropped before the server closes idle keep-alive ones
            // (--http-header-timeout, 30 s): reusing one the server is closing at that moment
            // fails the request ("connection closed before message completed").
            http: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        };
        stack.wait_ready().await;
        stack
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The body of `GET path` as text (no token: open routes).
    #[allow(dead_code)]
    pub async fn text(&self, path: &str) -> String {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `/readyz`'s body.
    pub async fn readyz(&self) -> serde_json::Value {
        self.http
            .get(self.url("/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or_default()
    }

    pub async fn wait_ready(&self) {
        self.wait_ready_within(SETTLE_TIMEOUT)
            .await
            .expect("stack never became ready");
    }

    /// Wait for `/readyz` 200 with NATS connected; Err after `limit`.
    pub async fn wait_ready_within(&self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Ok(r) = self.http.get(self.url("/readyz")).send().await
                && r.status() == 200
                && let Ok(b) = r.json::<serde_json::Value>().await
                && b["checks"]["nats"] == "ok"
            {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(format!("not ready within {limit:?}"));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(API)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// An admin call (`PUT`, `POST`, `DELETE`, `GET`) with the admin token.
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, self.url(path)).bearer_auth(ADMIN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(API)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn stop(self) {
        self.shutdown.trigger();
        let _ = self.tasks.await;
        for h in self.handles {
            let _ = h.await;
        }
    }
}

/// The in-process stack's warnings and errors in the test's captured output (shown when a test
/// fails), so a failure on CI says what the services saw. `TALLY_TEST_LOG` overrides the filter.
fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("TALLY_TEST_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .with_ansi(false)
            .try_init();
    });
}
