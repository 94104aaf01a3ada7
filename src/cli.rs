//! Command-line interface: every setting is a flag with an environment variable beside it, the
//! same for every subcommand that uses it (SPEC §9).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::services::ServicesMode;

/// Tally: event-sourced usage ledger and quota engine.
#[derive(Debug, Parser)]
#[command(name = "tally", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as text (coloured only on a terminal) or as JSON objects, one per line.
    #[arg(
        long,
        global = true,
        env = "TALLY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Everything in one process: API, ledger writer and projectors (finds or starts NATS/Postgres).
    Up(UpArgs),
    /// The HTTP API only.
    Api(CommonArgs),
    /// The ledger writer only.
    Ledger(WorkerArgs),
    /// The projection workers only.
    Project(WorkerArgs),
    /// Apply database migrations and create/update the stream, then exit.
    Migrate(CommonArgs),
    /// Load generator: admit + settle through the real stack, with raw baselines (SPEC §11).
    Bench(crate::bench::BenchArgs),
    /// Rebuild one projection from the first ledger row and swap it in (or, with --verify,
    /// compare it with the live tables and change nothing).
    Replay(crate::audit::ReplayArgs),
    /// Recompute every projection's totals from the ledger and report each difference; exit 0
    /// only when everything matches.
    Audit(crate::audit::AuditArgs),
    /// What candidate policies would have refused and blocked over the recorded history
    /// (writes nothing).
    Whatif(crate::whatif::WhatifArgs),
}

/// Settings of a worker process (`tally ledger`, `tally project`).
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Serve `GET /metrics` (and `/healthz`) of this process's workers on this address
    /// (default: none; an API process shows its metrics on the API's address).
    #[arg(long, env = "TALLY_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// Settings shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Address the API listens on.
    #[arg(long, env = "TALLY_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// How long a client may take to send a request's headers; also how long an idle
    /// keep-alive connection is kept open.
    #[arg(long, env = "TALLY_HTTP_HEADER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,
    /// NATS server URL; the nodes of a cluster separated by commas
    /// (`nats://n1:4222,nats://n2:4222,nats://n3:4222`).
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// Postgres URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// JetStream stream name; deployments with different names share nothing.
    #[arg(long, env = "TALLY_STREAM", default_value = "TALLY")]
    pub stream: String,
    /// Usage partitions (fixed when the stream is created).
    #[arg(long, env = "TALLY_PARTITIONS", default_value_t = tally_events::DEFAULT_PARTITIONS)]
    pub partitions: u16,
    /// How long the stream keeps events (Postgres is the system of record).
    #[arg(long, env = "TALLY_STREAM_MAX_AGE", default_value = "7d", value_parser = parse_duration)]
    pub stream_max_age: Duration,
    /// Stream byte cap (-1 = unlimited).
    #[arg(long, env = "TALLY_STREAM_MAX_BYTES", default_value_t = -1, allow_negative_numbers = true)]
    pub stream_max_bytes: i64,
    /// Stream replicas (3 in a NATS cluster).
    #[arg(long, env = "TALLY_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
    /// Reservation lifetime, on the server's clock.
    #[arg(long, env = "TALLY_RESERVATION_TTL", default_value = "15m", value_parser = parse_duration)]
    pub reservation_ttl: Duration,
    /// How far in the past a request's `at` may be.
    #[arg(long, env = "TALLY_MAX_BACKFILL", default_value = "35d", value_parser = parse_duration)]
    pub max_backfill: Duration,
    /// How far in the future a request's `at` may be.
    #[arg(long, env = "TALLY_MAX_CLOCK_SKEW", default_value = "5m", value_parser = parse_duration)]
    pub max_clock_skew: Duration,
    /// Admin tokens, comma-separated (all endpoints).
    #[arg(
        long,
        env = "TALLY_ADMIN_TOKENS",
        default_value = "",
        hide_env_values = true
    )]
    pub admin_tokens: String,
    /// API tokens, comma-separated (data plane and reads).
    #[arg(
        long,
        env = "TALLY_API_TOKENS",
        default_value = "",
        hide_env_values = true
    )]
    pub api_tokens: String,
    /// A subject nobody configured (no PUT /v1/subjects, no policy, no credits): admit it (no
    /// policies apply) or refuse it with reason `unknown_subject`.
    #[arg(
        long,
        env = "TALLY_UNKNOWN_SUBJECTS",
        value_enum,
        default_value = "admit"
    )]
    pub unknown_subjects: UnknownSubjectsArg,
    /// When NATS cannot take an event, admit anyway: count locally and spool the events durably
    /// (fsync) under --spool-dir until NATS is back (SPEC §4). Default: fail closed (503).
    #[arg(long, env = "TALLY_FAIL_OPEN")]
    pub fail_open: bool,
    /// The fail-open spool's directory (one per API instance; locked while in use).
    #[arg(long, env = "TALLY_SPOOL_DIR", default_value = "./.tally/spool")]
    pub spool_dir: PathBuf,
    /// The quota projection writes a snapshot of the quota state after this many events (0: no
    /// snapshots; every start then rebuilds from the first ledger row) …
    #[arg(long, env = "TALLY_SNAPSHOT_EVERY", default_value_t = 100_000)]
    pub snapshot_every: u64,
    /// … or after this long, whichever comes first. Also when traffic stops: once the ledger
    /// has been quiet for 2 s with events not in any snapshot (at most every 10 s), so an
    /// instance started after a burst folds nothing after its snapshot.
    #[arg(long, env = "TALLY_SNAPSHOT_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub snapshot_interval: Duration,
    /// Projections this process runs (`tally up`, `tally project`), comma-separated names from
    /// the registry; a projection not yet built is built from the first ledger row first.
    #[arg(long, env = "TALLY_PROJECTIONS", default_value = "usage,quota,daily_usage", value_parser = parse_projections)]
    pub projections: Projections,
    /// Days of the daily-usage report (`/v1/reports/daily-usage`) are in this IANA time zone.
    #[arg(long, env = "TALLY_REPORT_TIMEZONE", default_value = "UTC", value_parser = parse_time_zone)]
    pub report_timezone: chrono_tz::Tz,
    /// The URL other processes reach this API instance at, registered for `tally audit`
    /// (default: http:// and the bound address, loopback when bound to every interface).
    #[arg(long, env = "TALLY_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Serve without authentication (development only).
    #[arg(long)]
    pub insecure_no_auth: bool,
}

/// `--projections`: registered names, each at most once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projections(pub Vec<&'static str>);

/// Parse `--projections`.
pub fn parse_projections(text: &str) -> Result<Projections, String> {
    let mut out: Vec<&'static str> = Vec::new();
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let entry = tally_projector::registry::find(name).ok_or_else(|| {
            format!(
                "unknown projection `{name}`; registered: {}",
                tally_projector::registry::names()
            )
        })?;
        if !out.contains(&entry.name) {
            out.push(entry.name);
        }
    }
    Ok(Projections(out))
}

/// Parse `--report-timezone`.
pub fn parse_time_zone(text: &str) -> Result<chrono_tz::Tz, String> {
    text.parse::<chrono_tz::Tz>()
        .map_err(|_| format!("`{text}` is not an IANA time zone like UTC or Europe/Berlin"))
}

/// `--unknown-subjects`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnknownSubjectsArg {
    /// Admitted; no policies apply.
    Admit,
    /// Refused with reason `unknown_subject`.
    Reject,
}

impl From<UnknownSubjectsArg> for tally_events::quota::UnknownSubjects {
    fn from(a: UnknownSubjectsArg) -> Self {
        match a {
            UnknownSubjectsArg::Admit => Self::Admit,
            UnknownSubjectsArg::Reject => Self::Reject,
        }
    }
}

/// `tally up` settings.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Shared settings.
    #[command(flatten)]
    pub common: CommonArgs,
    /// auto: use given URLs, else local NATS/Postgres if they answer, else start private ones;
    /// private: always start private ones; external: require both URLs.
    #[arg(long, env = "TALLY_SERVICES", value_enum, default_value = "auto")]
    pub services: ServicesMode,
    /// Where private NATS/Postgres keep their data.
    #[arg(long, env = "TALLY_DATA_DIR", default_value = "./.tally")]
    pub data_dir: PathBuf,
    /// Install a missing `nats-server` / `postgresql` Debian package with apt-get (as root).
    #[arg(long, env = "TALLY_INSTALL_MISSING", default_value_t = true, action = clap::ArgAction::Set)]
    pub install_missing: bool,
}

/// Parse `90s`, `15m`, `5h`, `35d`, `2w` (and `0`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let bad = || format!("`{text}` is not a duration like 90s, 15m, 5h, 35d or 2w");
    let (n, unit) = text.split_at(text.len().checked_sub(1).ok_or_else(bad)?);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(bad()),
    };
    n.checked_mul(secs).map(Duration::from_secs).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("35d"), Ok(Duration::from_secs(35 * 86_400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("15").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1.5h").is_err());
    }

    #[test]
    fn projections_and_zones() {
        let p = parse_projections("usage, daily_usage,usage").expect("registered names");
        assert_eq!(p.0, vec!["usage", "daily_usage"]);
        let e = parse_projections("usage,nope").expect_err("unknown name");
        assert!(e.contains("`nope`") && e.contains("quota"), "{e}");
        assert_eq!(parse_projections("").expect("none").0.len(), 0);
        assert_eq!(
            parse_time_zone("Asia/Shanghai"),
            Ok(chrono_tz::Asia::Shanghai)
        );
        assert!(parse_time_zone("Mars/Olympus").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
