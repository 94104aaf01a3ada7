//! Finding or starting NATS and Postgres for `tally up` (SPEC §9, the embedded default).
//!
//! Each service is settled on its own: a URL given by the operator is used as is; otherwise, in
//! `auto` mode, the local server on its standard port is used when it answers; otherwise a private
//! server is started from the system binaries under the data directory and stopped when `tally up`
//! exits. A missing binary is installed with apt-get when allowed (and when running as root), or
//! named by its Debian package in the error.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

/// Which services `tally up` may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServicesMode {
    /// Given URLs, else local servers that answer on the standard ports, else private ones.
    Auto,
    /// Always start private servers under the data directory (given URLs still win).
    Private,
    /// Only the given URLs; never start anything.
    External,
}

/// What `tally up` was told.
#[derive(Clone, Debug)]
pub struct ServicesOptions {
    /// Mode.
    pub mode: ServicesMode,
    /// `NATS_URL`, if set.
    pub nats_url: Option<String>,
    /// `DATABASE_URL`, if set.
    pub database_url: Option<String>,
    /// Private servers' data directory.
    pub data_dir: PathBuf,
    /// Whether a missing Debian package may be installed.
    pub install_missing: bool,
}

/// The database `tally up` uses on a local or private Postgres.
pub const DATABASE_NAME: &str = "tally";
/// Standard local ports probed in `auto` mode.
const LOCAL_NATS: &str = "127.0.0.1:4222";
const LOCAL_POSTGRES: &str = "127.0.0.1:5432";
/// A local server that does not accept a TCP connection within this is taken as absent.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Bound on a private server becoming ready (initdb on a slow disk takes several seconds).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound on a private server stopping before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Where Debian keeps the Postgres server binaries (they are not on PATH).
const POSTGRES_LIB: &str = "/usr/lib/postgresql";

/// The services in use, and the private ones to stop.
#[derive(Debug)]
pub struct Services {
    /// NATS URL to connect to.
    pub nats_url: String,
    /// Postgres URL to connect to.
    pub database_url: String,
    /// One line per service saying where it came from, for the start-up banner.
    pub origin: Vec<String>,
    nats: Option<PrivateNats>,
    postgres: Option<PrivatePostgres>,
}

#[derive(Debug)]
struct PrivateNats {
    child: Child,
}

#[derive(Debug)]
struct PrivatePostgres {
    pg_ctl: PathBuf,
    data: PathBuf,
    as_postgres_user: bool,
    port: u16,
}

impl Services {
    /// Settle both services, starting private ones as needed.
    pub async fn ensure(opts: &ServicesOptions) -> anyhow::Result<Services> {
        let mut s = Services {
            nats_url: String::new(),
            database_url: String::new(),
            origin: Vec::new(),
            nats: None,
            postgres: None,
        };
        if let Some(url) = &opts.nats_url {
            s.nats_url = url.clone();
            s.origin.push(format!("NATS: given ({url})"));
        } else if opts.mode == ServicesMode::External {
            bail!("--services external needs --nats-url / NATS_URL");
        } else if opts.mode == ServicesMode::Auto && answers(LOCAL_NATS) {
            s.nats_url = format!("nats://{LOCAL_NATS}");
            s.origin.push(format!("NATS: local server at {LOCAL_NATS}"));
        } else {
            let (url, nats) = start_nats(opts).await?;
            s.origin.push(format!("NATS: private server at {url}"));
            s.nats_url = url;
            s.nats = Some(nats);
        }
        if let Some(url) = &opts.database_url {
            s.database_url = url.clone();
            s.origin.push("Postgres: given".into());
        } else if opts.mode == ServicesMode::External {
            bail!("--services external needs --database-url / DATABASE_URL");
        } else if let Some(url) = local_postgres(opts.mode).await {
            s.database_url = url;
            s.origin
                .push(format!("Postgres: local server at {LOCAL_POSTGRES}"));
        } else {
            let (url, pg) = start_postgres(opts).await?;
            s.origin.push(format!(
                "Postgres: private server, data in {}",
                pg.data.display()
            ));
            s.database_url = url;
            s.postgres = Some(pg);
        }
        Ok(s)
    }

    /// Stop the private servers (gracefully, then by force).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut nats) = self.nats.take() {
            terminate(&mut nats.child, "nats-server").await;
        }
        if let Some(pg) = self.postgres.take() {
            pg.stop().context("stopping the private Postgres")?;
        }
        Ok(())
    }
}

impl Services {
    /// Stop the private Postgres (fast shutdown), keeping its data: a failure drill for tests
    /// and operators. Errors when Postgres is not private.
    pub fn stop_private_postgres(&self) -> anyhow::Result<()> {
        let pg = self.postgres.as_ref().context("Postgres is not private")?;
        pg.stop()
    }

    /// Start the private Postgres again on the same port after [`Self::stop_private_postgres`].
    pub fn start_private_postgres(&self) -> anyhow::Result<()> {
        let pg = self.postgres.as_ref().context("Postgres is not private")?;
        pg.start()
    }
}

impl Drop for Services {
    /// A panic or early return still stops the private servers.
    fn drop(&mut self) {
        if let Some(nats) = &mut self.nats {
            let _ = nats.child.start_kill();
        }
        if let Some(pg) = self.postgres.take() {
            let _ = pg.stop();
        }
    }
}

fn answers(addr: &str) -> bool {
    let addr: SocketAddr = addr.parse().expect("constant address");
    TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).is_ok()
}

/// The local Postgres, if it answers and lets `postgres` in without a password; the `tally`
/// database is created on it when missing.
async fn local_postgres(mode: ServicesMode) -> Option<String> {
    if mode != ServicesMode::Auto || !answers(LOCAL_POSTGRES) {
        return None;
    }
    let admin = format!("postgres://postgres@{LOCAL_POSTGRES}/postgres");
    match create_database(&admin).await {
        Ok(()) => Some(format!(
            "postgres://postgres@{LOCAL_POSTGRES}/{DATABASE_NAME}"
        )),
        Err(e) => {
            tracing::warn!(error = %e, "local Postgres answers but cannot be used; starting a private one");
            None
        }
    }
}

/// `CREATE DATABASE tally` unless it exists (42P04 = duplicate_database, a race with another
/// `tally up`).
async fn create_database(admin_url: &str) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(DATABASE_NAME)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        let created = sqlx::query(&format!("CREATE DATABASE {DATABASE_NAME}"))
            .execute(&mut conn)
            .await;
        if let Err(sqlx::Error::Database(e)) = &created {
            if e.code().as_deref() != Some("42P04") {
                created?;
            }
        } else {
            created?;
        }
    }
    conn.close().await?;
    Ok(())
}

/// A port nothing listens on right now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_until_answers(port: u16, what: &str, child: &mut Child) -> anyhow::Result<()> {
    let addr = format!("127.0.0.1:{port}");
    let start = Instant::now();
    while !answers(&addr) {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited with {status} before answering on {addr}");
        }
        if start.elapsed() > START_TIMEOUT {
            bail!("{what} did not answer on {addr} within {START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn start_nats(opts: &ServicesOptions) -> anyhow::Result<(String, PrivateNats)> {
    let bin = require_binary("nats-server", &[], "nats-server", opts.install_missing).await?;
    let dir = opts.data_dir.join("nats");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let pid_file = dir.join("nats-server.pid");
    kill_stale(&pid_file);
    let port = free_port()?;
    let mut child = Command::new(&bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
        .arg("-sd")
        .arg(&dir)
        .arg("-P")
        .arg(&pid_file)
        .arg("-l")
        .arg(dir.join("nats-server.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    wait_until_answers(port, "nats-server", &mut child)
        .await
        .with_context(|| format!("see {}", dir.join("nats-server.log").display()))?;
    Ok((format!("nats://127.0.0.1:{port}"), PrivateNats { child }))
}

/// A private nats-server left running by a `tally up` that was killed holds the store's lock;
/// stop it before starting a new one on the same directory.
fn kill_stale(pid_file: &Path) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains("nats-server") {
        tracing::warn!(pid, "stopping a private nats-server left by an earlier run");
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
        let start = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() && start.elapsed() < STOP_TIMEOUT {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

async fn terminate(child: &mut Child, what: &str) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
    }
    if tokio::time::timeout(STOP_TIMEOUT, child.wait())
        .await
        .is_err()
    {
        tracing::warn!("{what} did not stop within {STOP_TIMEOUT:?}; killing it");
        let _ = child.kill().await;
    }
}

async fn start_postgres(opts: &ServicesOptions) -> anyhow::Result<(String, PrivatePostgres)> {
    let lib = postgres_bin_dirs();
    let initdb = require_binary("initdb", &lib, "postgresql", opts.install_missing).await?;
    let lib = postgres_bin_dirs(); // the install may have added one
    let pg_ctl = require_binary("pg_ctl", &lib, "postgresql", false).await?;
    let data = std::path::absolute(opts.data_dir.join("pg"))?;
    let as_postgres_user = is_root();
    let pg = PrivatePostgres {
        pg_ctl,
        data: data.clone(),
        as_postgres_user,
        port: free_port()?,
    };
    if !data.join("PG_VERSION").exists() {
        pg.init(&initdb)?;
    }
    if data.join("postmaster.pid").exists() {
        tracing::warn!("stopping a private Postgres left by an earlier run");
        let _ = pg.stop();
    }
    let port = pg.port;
    pg.start()?;
    let url = format!("postgres://postgres@127.0.0.1:{port}/{DATABASE_NAME}");
    create_database(&format!("postgres://postgres@127.0.0.1:{port}/postgres"))
        .await
        .context("creating the tally database on the private Postgres")?;
    Ok((url, pg))
}

impl PrivatePostgres {
    /// Postgres refuses to run as root: when root, the data directory belongs to `postgres`.
    fn command(&self, bin: &Path) -> std::process::Command {
        if self.as_postgres_user {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            std::process::Command::new(bin)
        }
    }

    fn init(&self, initdb: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.data)
            .with_context(|| format!("creating {}", self.data.display()))?;
        if self.as_postgres_user {
            run(std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&self.data))?;
        }
        run(self.command(initdb).arg("-D").arg(&self.data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ]))
        .context("initdb for the private Postgres")
    }

    fn start(&self) -> anyhow::Result<()> {
        let port = self.port;
        // TCP on loopback only, and no Unix socket: the data directory's path may exceed the
        // 107-byte socket path limit, and nothing else should find this server by accident.
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=on"
        );
        let timeout_secs = START_TIMEOUT.as_secs().to_string();
        run(self
            .command(&self.pg_ctl)
            .arg("start")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", &timeout_secs, "-o", &options, "-l"])
            .arg(self.data.join("postgres.log")))
        .with_context(|| {
            format!(
                "starting Postgres; see {}",
                self.data.join("postgres.log").display()
            )
        })
    }

    fn stop(&self) -> anyhow::Result<()> {
        if !self.data.join("postmaster.pid").exists() {
            return Ok(());
        }
        let timeout_secs = STOP_TIMEOUT.as_secs().to_string();
        run(self
            .command(&self.pg_ctl)
            .arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "-t", &timeout_secs]))
    }
}

fn run(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Debian's versioned Postgres binary directories, newest first.
fn postgres_bin_dirs() -> Vec<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(POSTGRES_LIB)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    versions.into_iter().map(|(_, p)| p).collect()
}

fn find_binary(name: &str, extra_dirs: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra_dirs.iter().cloned())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The binary's path; when missing, apt-get installs `package` if allowed, else the error names it.
async fn require_binary(
    name: &str,
    extra_dirs: &[PathBuf],
    package: &str,
    install_missing: bool,
) -> anyhow::Result<PathBuf> {
    if let Some(p) = find_binary(name, extra_dirs) {
        return Ok(p);
    }
    if !install_missing {
        bail!(
            "`{name}` is not installed: install the Debian package `{package}` (apt-get install {package}), or set the URL of a running server"
        );
    }
    if !is_root() {
        bail!(
            "`{name}` is not installed and installing needs root: run `sudo apt-get install {package}`, or set the URL of a running server"
        );
    }
    tracing::warn!(
        package,
        "`{name}` is missing; installing the Debian package"
    );
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    let mut ok = install().await.map(|s| s.success()).unwrap_or(false);
    if !ok {
        let _ = Command::new("apt-get").arg("update").status().await;
        ok = install().await.map(|s| s.success()).unwrap_or(false);
    }
    let dirs = [extra_dirs.to_vec(), postgres_bin_dirs()].concat();
    match (ok, find_binary(name, &dirs)) {
        (true, Some(p)) => Ok(p),
        _ => bail!(
            "installing the Debian package `{package}` failed; install it by hand (apt-get install {package})"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_binary_names_the_package() {
        let err = require_binary("no-such-binary-tally", &[], "some-package", false)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("some-package"), "{err}");
        assert!(err.contains("no-such-binary-tally"), "{err}");
    }

    #[tokio::test]
    async fn external_mode_requires_urls() {
        let opts = ServicesOptions {
            mode: ServicesMode::External,
            nats_url: None,
            database_url: None,
            data_dir: std::env::temp_dir(),
            install_missing: false,
        };
        let err = Services::ensure(&opts).await.unwrap_err().to_string();
        assert!(err.contains("NATS_URL"), "{err}");
    }
}
