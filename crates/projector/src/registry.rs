//! The one list of projections. The runner (`tally up`/`tally project`), `/readyz`, `/metrics`,
//! `tally replay` and `tally audit` all iterate it; adding a projection is its file plus one
//! line here.

use std::sync::Arc;

use chrono_tz::Tz;
use sqlx::PgPool;

use crate::daily_usage::DailyUsageProjection;
use crate::quota::{QuotaProjection, QuotaSettings};
use crate::runner::{Order, Projection};
use crate::usage::UsageProjection;

/// What projections are built from.
#[derive(Clone)]
pub struct Context {
    /// The database.
    pub pool: PgPool,
    /// The quota projection's settings.
    pub quota: QuotaSettings,
    /// Days of the daily-usage report are in this zone.
    pub report_tz: Tz,
    /// Build an instance for a rebuild (from the first ledger row, no snapshots) rather than
    /// the live one.
    pub rebuilding: bool,
}

/// One registered projection.
pub struct Entry {
    /// Its name (what [`Projection::name`] answers).
    pub name: &'static str,
    /// Its fold order (what [`Projection::order`] answers).
    pub order: Order,
    /// A new instance.
    pub make: fn(&Context) -> Arc<dyn Projection>,
}

/// Every projection.
pub const REGISTRY: &[Entry] = &[
    Entry {
        name: "usage",
        order: Order::Pos,
        make: |_| Arc::new(UsageProjection),
    },
    Entry {
        name: "quota",
        order: Order::StreamSeq,
        make: |c| {
            Arc::new(QuotaProjection::with(
                c.pool.clone(),
                c.quota.clone(),
                c.rebuilding,
            ))
        },
    },
    Entry {
        name: "daily_usage",
        order: Order::Pos,
        make: |c| Arc::new(DailyUsageProjection::new(c.report_tz)),
    },
];

/// The entry named `name`.
pub fn find(name: &str) -> Option<&'static Entry> {
    REGISTRY.iter().find(|e| e.name == name)
}

/// Every registered name, comma-separated (for messages).
pub fn names() -> String {
    REGISTRY
        .iter()
        .map(|e| e.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_describe_what_they_build() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://127.0.0.1/none")
            .expect("a lazy pool needs no server");
        let ctx = Context {
            pool,
            quota: QuotaSettings::for_stream("T"),
            report_tz: chrono_tz::UTC,
            rebuilding: false,
        };
        let mut tables = std::collections::BTreeSet::new();
        for e in REGISTRY {
            let p = (e.make)(&ctx);
            assert_eq!(p.name(), e.name);
            assert_eq!(p.order(), e.order);
            for t in p.event_types().unwrap_or_default() {
                assert!(tally_events::EventType::parse(t).is_some(), "{t} is a type");
            }
            for t in p.tables() {
                assert!(tables.insert(*t), "table {t} owned twice");
                assert!(
                    p.schema().contains(&format!("{{schema}}.{t} ")),
                    "{t} in DDL"
                );
            }
        }
    }
}
