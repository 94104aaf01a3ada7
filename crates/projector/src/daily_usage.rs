//! The `daily_usage` projection: settled usage per chain subject × model × day, days in the
//! report time zone (`--report-timezone`, default UTC), and the read behind
//! `GET /v1/reports/daily-usage`.
//!
//! It is the example of attaching a projection (issue 6): this file and one registry line. Its
//! version names its time zone, so changing the zone rebuilds it from the first ledger row (the
//! old rows keep serving until the new ones are swapped in; reads answer "building" meanwhile,
//! since the old rows are in the wrong zone).

use chrono::NaiveDate;
use chrono_tz::Tz;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tally_events::{DailyTotals, Envelope, Usage, fold_daily};

use crate::Error;
use crate::claims::{Claim, ClaimsFuture, DayRange};
use crate::runner::{ApplyFuture, Projection};
use crate::tables::Tables;
use crate::usage::{add_usage_on_conflict, daily_sums};

/// Most rows one report page returns (the caller pages on with `cursor`): bounds the response
/// and the query.
pub const MAX_REPORT_ROWS: i64 = 10_000;
/// Longest range one report may span: a year and a day (leap years).
pub const MAX_REPORT_DAYS: i64 = 366;

const SCHEMA: &str = "
CREATE TABLE {schema}.daily_usage (
    subject       text   NOT NULL,
    model         text   NOT NULL,
    day           date   NOT NULL,
    requests      bigint NOT NULL CHECK (requests >= 0),
    input_tokens  bigint NOT NULL CHECK (input_tokens >= 0),
    output_tokens bigint NOT NULL CHECK (output_tokens >= 0),
    cost          bigint NOT NULL CHECK (cost >= 0),
    credits       bigint NOT NULL CHECK (credits >= 0),
    PRIMARY KEY (day, subject, model)
);
CREATE INDEX ON {schema}.daily_usage (subject, day);
";

/// The daily-usage projection (name `daily_usage`).
pub struct DailyUsageProjection {
    tz: Tz,
}

impl DailyUsageProjection {
    /// Days in `tz`.
    pub fn new(tz: Tz) -> Self {
        DailyUsageProjection { tz }
    }
}

impl Projection for DailyUsageProjection {
    fn name(&self) -> &'static str {
        "daily_usage"
    }

    fn version(&self) -> String {
        version(self.tz)
    }

    fn tables(&self) -> &'static [&'static str] {
        &["daily_usage"]
    }

    fn schema(&self) -> &'static str {
        SCHEMA
    }

    fn event_types(&self) -> Option<&'static [&'static str]> {
        Some(&["usage.settled"])
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        tables: Tables,
        events: &'a [Envelope],
    ) -> ApplyFuture<'a> {
        Box::pin(async move {
            let mut totals = DailyTotals::new();
            for env in events {
                fold_daily(&mut totals, env, self.tz);
            }
            if totals.is_empty() {
                return Ok(());
            }
            upsert(tx, &tables.name("daily_usage"), &totals).await
        })
    }

    fn claims<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        tables: Tables,
        range: DayRange,
    ) -> ClaimsFuture<'a> {
        Box::pin(async move {
            let table = tables.name("daily_usage");
            let rows = daily_sums(tx, &table, "day", self.tz, range).await?;
            Ok(vec![Claim::UsageByDay {
                table,
                tz: self.tz,
                rows,
            }])
        })
    }
}

/// The projection's version for days in `tz`.
fn version(tz: Tz) -> String {
    format!("1/{}", tz.name())
}

async fn upsert(tx: &mut PgConnection, table: &str, totals: &DailyTotals) -> Result<(), Error> {
    let mut subjects = Vec::with_capacity(totals.len());
    let mut models = Vec::with_capacity(totals.len());
    let mut days = Vec::with_capacity(totals.len());
    let mut amounts: [Vec<i64>; 5] = Default::default();
    for ((subject, model, day), u) in totals {
        subjects.push(subject.as_str());
        models.push(model.as_str());
        days.push(*day);
        for (slot, (_, v)) in amounts.iter_mut().zip(u.fields()) {
            slot.push(v);
        }
    }
    let sets = add_usage_on_conflict();
    let sql = format!(
        "INSERT INTO {table} AS t (subject, model, day, requests, input_tokens, output_tokens, cost, credits) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::date[], $4::int8[], $5::int8[], $6::int8[], $7::int8[], $8::int8[]) \
         ON CONFLICT (day, subject, model) DO UPDATE SET {sets}"
    );
    let [requests, input, output, cost, credits] = amounts;
    sqlx::query(&sql)
        .bind(subjects)
        .bind(models)
        .bind(days)
        .bind(requests)
        .bind(input)
        .bind(output)
        .bind(cost)
        .bind(credits)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// One row of the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DailyRow {
    /// Local day.
    pub day: NaiveDate,
    /// Chain subject.
    pub subject: String,
    /// Model (`""`: settled without a model).
    pub model: String,
    /// Amounts.
    #[serde(flatten)]
    pub usage: Usage,
}

/// Where a report page starts: after this (day, subject, model).
pub type ReportCursor = (NaiveDate, String, String);

/// What a report asks for.
#[derive(Clone, Debug)]
pub struct ReportQuery {
    /// First day (inclusive).
    pub from: NaiveDate,
    /// Last day (inclusive).
    pub to: NaiveDate,
    /// Only this subject.
    pub subject: Option<String>,
    /// Only this model.
    pub model: Option<String>,
    /// Continue after this row.
    pub cursor: Option<ReportCursor>,
    /// Rows per page (at most [`MAX_REPORT_ROWS`]).
    pub limit: i64,
}

/// A report page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DailyReport {
    /// The zone the days are in.
    pub time_zone: String,
    /// Rows ordered by day, subject, model.
    pub rows: Vec<DailyRow>,
    /// Pass as `cursor` for the next page; None on the last one.
    pub next_cursor: Option<ReportCursor>,
}

type ReportRow = (NaiveDate, String, String, i64, i64, i64, i64, i64);

/// Read a report page, days in `tz`. [`Error::Building`] while the table is being built (or
/// rebuilt for another zone).
#[tracing::instrument(skip(pool))]
pub async fn daily_report(pool: &PgPool, tz: Tz, q: &ReportQuery) -> Result<DailyReport, Error> {
    check_range(q)?;
    let mut conn = pool.acquire().await?;
    let live: Option<String> =
        sqlx::query_scalar("SELECT version FROM projection_checkpoints WHERE projection = $1")
            .bind("daily_usage")
            .fetch_optional(&mut *conn)
            .await?;
    if live.as_deref() != Some(version(tz).as_str()) {
        return Err(Error::Building("daily_usage"));
    }
    let (after_day, after_subject, after_model) = q.cursor.clone().unzip3();
    let rows: Vec<ReportRow> = sqlx::query_as(
        "SELECT day, subject, model, requests, input_tokens, output_tokens, cost, credits \
         FROM daily_usage WHERE day >= $1 AND day <= $2 \
           AND ($3::text IS NULL OR subject = $3) AND ($4::text IS NULL OR model = $4) \
           AND ($5::date IS NULL OR (day, subject, model) > ($5, $6, $7)) \
         ORDER BY day, subject, model LIMIT $8",
    )
    .bind(q.from)
    .bind(q.to)
    .bind(&q.subject)
    .bind(&q.model)
    .bind(after_day)
    .bind(after_subject)
    .bind(after_model)
    .bind(q.limit + 1)
    .fetch_all(&mut *conn)
    .await
    .map_err(Error::reading("daily_usage"))?;
    Ok(page(tz, rows, q.limit))
}

fn check_range(q: &ReportQuery) -> Result<(), Error> {
    let invalid = |field, message: String| Err(Error::InvalidQuery { field, message });
    if q.to < q.from {
        return invalid("to", "must not be before from".into());
    }
    let days = (q.to - q.from).num_days() + 1;
    if days > MAX_REPORT_DAYS {
        return invalid(
            "to",
            format!("{days} days requested, at most {MAX_REPORT_DAYS}"),
        );
    }
    if !(1..=MAX_REPORT_ROWS).contains(&q.limit) {
        return invalid("limit", format!("must be between 1 and {MAX_REPORT_ROWS}"));
    }
    Ok(())
}

fn page(tz: Tz, mut rows: Vec<ReportRow>, limit: i64) -> DailyReport {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit.max(0) as usize);
    let next_cursor = more
        .then(|| rows.last().map(|r| (r.0, r.1.clone(), r.2.clone())))
        .flatten();
    let rows = rows
        .into_iter()
        .map(
            |(day, subject, model, requests, input_tokens, output_tokens, cost, credits)| {
                DailyRow {
                    day,
                    subject,
                    model,
                    usage: Usage {
                        requests,
                        input_tokens,
                        output_tokens,
                        cost,
                        credits,
                    },
                }
            },
        )
        .collect();
    DailyReport {
        time_zone: tz.name().to_owned(),
        rows,
        next_cursor,
    }
}

trait Unzip3<A, B, C> {
    fn unzip3(self) -> (Option<A>, Option<B>, Option<C>);
}

impl<A, B, C> Unzip3<A, B, C> for Option<(A, B, C)> {
    fn unzip3(self) -> (Option<A>, Option<B>, Option<C>) {
        match self {
            Some((a, b, c)) => (Some(a), Some(b), Some(c)),
            None => (None, None, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(day: u32, s: &str) -> ReportRow {
        (
            NaiveDate::from_ymd_opt(2026, 11, day).unwrap_or_default(),
            s.into(),
            "m".into(),
            1,
            0,
            0,
            0,
            0,
        )
    }

    #[test]
    fn a_page_past_the_limit_names_where_the_next_starts() {
        let p = page(
            chrono_tz::UTC,
            vec![row(1, "a"), row(1, "b"), row(2, "a")],
            2,
        );
        assert_eq!(p.rows.len(), 2);
        let c = p.next_cursor.expect("more rows");
        assert_eq!(c.1, "b");
        let last = page(chrono_tz::UTC, vec![row(1, "a")], 2);
        assert_eq!(last.next_cursor, None);
    }

    #[test]
    fn ranges_are_bounded() {
        let d = |m, day| NaiveDate::from_ymd_opt(2026, m, day).unwrap_or_default();
        let q = |from, to, limit| ReportQuery {
            from,
            to,
            subject: None,
            model: None,
            cursor: None,
            limit,
        };
        assert!(check_range(&q(d(1, 1), d(12, 31), 10)).is_ok());
        assert!(matches!(
            check_range(&q(d(2, 1), d(1, 1), 10)),
            Err(Error::InvalidQuery { field: "to", .. })
        ));
        assert!(matches!(
            check_range(&q(d(1, 1), d(1, 1), MAX_REPORT_ROWS + 1)),
            Err(Error::InvalidQuery { field: "limit", .. })
        ));
        let far = NaiveDate::from_ymd_opt(2028, 1, 1).unwrap_or_default();
        assert!(matches!(
            check_range(&q(d(1, 1), far, 10)),
            Err(Error::InvalidQuery { field: "to", .. })
        ));
    }
}
