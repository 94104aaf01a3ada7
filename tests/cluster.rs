//! Issue 13 (the distributed engine, for real): three `nats-server` processes clustered on
//! loopback, Tally with `--stream-replicas 3` and `NATS_URL` listing all three. Under load, a
//! node is killed with SIGKILL (the stream's leader in one round, a follower in the other) and
//! restarted: every admission answered 200 and every settlement answered 202 is in the ledger
//! exactly once, no request has two admissions, and `/readyz` recovers.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Stack, TestEnv, load};

/// Clients of the load: enough to keep publishes in flight at the kill.
const CLIENTS: usize = 8;
/// How long a killed node stays down.
const DOWN: Duration = Duration::from_secs(3);
/// How long a cluster may take to form or elect.
const ELECTION: Duration = Duration::from_secs(60);

/// A three-node JetStream cluster on loopback, each node with its own store directory.
struct Cluster {
    dir: std::path::PathBuf,
    client_ports: [u16; 3],
    route_ports: [u16; 3],
    nodes: [Option<Child>; 3],
}

impl Cluster {
    fn start() -> Cluster {
        let dir = std::env::temp_dir().join(format!("tally-cluster-{}", uuid::Uuid::new_v4()));
        let ports = || [0; 3].map(|_| common::free_port());
        let mut c = Cluster {
            dir,
            client_ports: ports(),
            route_ports: ports(),
            nodes: [None, None, None],
        };
        for i in 0..3 {
            c.spawn(i);
        }
        c
    }

    fn name(i: usize) -> String {
        format!("n{}", i + 1)
    }

    fn spawn(&mut self, i: usize) {
        let routes = self
            .route_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let store = self.dir.join(Self::name(i));
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.client_ports[i].to_string())
            .args([
                "--server_name",
                &Self::name(i),
                "--cluster_name",
                "tally-test",
            ])
            .arg("--cluster")
            .arg(format!("nats://127.0.0.1:{}", self.route_ports[i]))
            .args(["--routes", &routes, "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server on PATH (scripts/test installs it)");
        self.nodes[i] = Some(child);
        common::wait_for_port(self.client_ports[i], ELECTION, &format!("node {i}"));
    }

    /// SIGKILL node `i`.
    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn urls(&self) -> String {
        self.client_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn node_of(name: &str) -> usize {
        name.trim_start_matches('n').parse::<usize>().unwrap() - 1
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A test env on the cluster, once its JetStream meta group has a leader and can place a
/// stream of three replicas (creating one fails until then).
async fn env_on(cluster: &Cluster) -> TestEnv {
    let urls = cluster.urls();
    let servers = tally::stack::nats_servers(&urls).unwrap();
    let client = async_nats::connect(servers.as_slice()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let start = Instant::now();
    let probe = async_nats::jetstream::stream::Config {
        name: "PROBE".into(),
        subjects: vec!["probe.x".into()],
        num_replicas: 3,
        ..Default::default()
    };
    while let Err(e) = js.get_or_create_stream(probe.clone()).await {
        assert!(start.elapsed() < ELECTION, "the cluster never formed: {e}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = js.delete_stream("PROBE").await;
    println!("cluster of 3 formed in {:?}", start.elapsed());
    TestEnv::new_with_nats(&urls, &["--stream-replicas", "3"]).await
}

/// The node leading the stream, by the stream's cluster info.
async fn stream_leader(env: &TestEnv) -> usize {
    let start = Instant::now();
    loop {
        let info = env.conns.js.get_stream(&env.stream).await;
        let leader = info.ok().and_then(|s| {
            s.cached_info()
                .cluster
                .as_ref()
                .and_then(|c| c.leader.clone())
        });
        if let Some(l) = leader {
            return Cluster::node_of(&l);
        }
        assert!(start.elapsed() < ELECTION, "the stream has no leader");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One round: load, kill `victim`, wait [`DOWN`], restart it, load on until ready again.
async fn round(
    stack: &Arc<Stack>,
    cluster: &mut Cluster,
    victim: usize,
    tag: &str,
) -> Vec<load::Outcome> {
    let stop = Arc::new(AtomicBool::new(false));
    let subjects = [format!("key:{tag}-a"), format!("key:{tag}-b")];
    let subjects: Vec<&str> = subjects.iter().map(String::as_str).collect();
    let runner = {
        let (stack, stop) = (stack.clone(), stop.clone());
        let subjects: Vec<String> = subjects.iter().map(|s| (*s).to_owned()).collect();
        let tag = format!("{tag}-");
        tokio::spawn(async move {
            let refs: Vec<&str> = subjects.iter().map(String::as_str).collect();
            load::run_tagged(stack, &tag, &refs, CLIENTS, stop).await
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.kill(victim);
    println!("{tag}: killed node n{} (SIGKILL)", victim + 1);
    tokio::time::sleep(DOWN).await;
    cluster.spawn(victim);
    stack
        .wait_ready_within(ELECTION)
        .await
        .expect("ready again after the node returned");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    runner.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_node_loses_nothing_and_duplicates_nothing() {
    let mut cluster = Cluster::start();
    let env = env_on(&cluster).await;
    let stack = Arc::new(Stack::start(&env).await);
    let leader = stream_leader(&env).await;
    let mut outcomes = round(&stack, &mut cluster, leader, "leader").await;
    let new_leader = stream_leader(&env).await;
    let follower = (0..3).find(|i| *i != new_leader).unwrap();
    outcomes.extend(round(&stack, &mut cluster, follower, "follower").await);
    let admitted = outcomes.iter().filter(|o| o.admit_status == 200).count();
    let settled = outcomes
        .iter()
        .filter(|o| o.settle_status == Some(202))
        .count();
    let unavailable = outcomes.iter().filter(|o| o.admit_status == 503).count();
    println!(
        "answers: {} admissions (200: {admitted}, 503: {unavailable}), settlements 202: {settled}",
        outcomes.len()
    );
    assert!(admitted > 100, "the load ran: {admitted}");
    // Everything answered is in the ledger once the writer has caught up (waited for by id:
    // publishes in flight at a kill may land too, so a row count proves nothing).
    let expected = (admitted + settled) as i64;
    let start = Instant::now();
    while start.elapsed() < ELECTION {
        let rows = load::ledger_rows(env.pool()).await;
        if load::acknowledged_missing(&rows, &outcomes) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let count = env.ledger_count().await;
    println!(
        "ledger rows: {count} (answered 200/202: {expected}) after {:?}; readyz {}",
        start.elapsed(),
        stack.readyz().await
    );
    let rows = load::ledger_rows(env.pool()).await;
    let mut landed_after_503 = 0;
    for o in &outcomes {
        let (adm, set) = rows.get(&o.request_id).copied().unwrap_or((0, 0));
        assert!(
            adm <= 1,
            "{} has {adm} admissions in the ledger",
            o.request_id
        );
        if o.admit_status == 200 {
            assert_eq!(adm, 1, "admission of {} in the ledger once", o.request_id);
        } else {
            landed_after_503 += adm;
        }
        match o.settle_status {
            Some(202) => assert_eq!(set, 1, "settlement of {} in the ledger once", o.request_id),
            Some(_) => landed_after_503 += set,
            None => assert_eq!(set, 0, "{} was never settled", o.request_id),
        }
    }
    println!("ledger rows of requests answered 503 (in flight at a kill): {landed_after_503}");
    let duplicates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT request_id FROM ledger WHERE event_type = 'admission.decided' \
         GROUP BY request_id HAVING count(*) > 1) d",
    )
    .fetch_one(env.pool())
    .await
    .unwrap();
    assert_eq!(duplicates, 0, "no request admitted twice");
    let ready = stack.readyz().await;
    assert_eq!(ready["ready"], true, "{ready}");
    println!("readyz after both rounds: {ready}");
    let Ok(stack) = Arc::try_unwrap(stack) else {
        panic!("the load's clients are done")
    };
    stack.stop().await;
    env.cleanup().await;
}
