//! The first projection: settled usage in minute, hour and day buckets per chain subject, model,
//! model group and counted flags; and the read behind `GET /v1/usage`.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tally_events::{Envelope, Usage, UsageKey, UsageTotals, fold_usage};

use crate::Error;
use crate::claims::{Claim, ClaimsFuture, DayRange};
use crate::runner::{ApplyFuture, Projection};
use crate::tables::Tables;

/// Most buckets one usage read returns: a week of minutes, a year of hours. Bounds the response
/// and the query.
pub const MAX_SERIES_BUCKETS: i64 = 10_080;

/// Bucket size of a usage table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// `usage_minute`
    Minute,
    /// `usage_hour`
    Hour,
    /// `usage_day` (UTC days)
    Day,
}

impl Granularity {
    const ALL: [Granularity; 3] = [Granularity::Minute, Granularity::Hour, Granularity::Day];

    fn table(self) -> &'static str {
        match self {
            Granularity::Minute => "usage_minute",
            Granularity::Hour => "usage_hour",
            Granularity::Day => "usage_day",
        }
    }

    /// Bucket length.
    pub fn step(self) -> TimeDelta {
        match self {
            Granularity::Minute => TimeDelta::minutes(1),
            Granularity::Hour => TimeDelta::hours(1),
            Granularity::Day => TimeDelta::days(1),
        }
    }

    /// Start of the bucket containing `t` (floor, on whole seconds: no nanosecond range limit).
    pub fn bucket_of(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let step = self.step().num_seconds();
        DateTime::from_timestamp(t.timestamp().div_euclid(step) * step, 0).unwrap_or(t)
    }
}

/// The usage projection (name `usage`).
pub struct UsageProjection;

impl Projection for UsageProjection {
    fn name(&self) -> &'static str {
        "usage"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["usage_minute", "usage_hour", "usage_day"]
    }

    fn schema(&self) -> &'static str {
        include_str!("usage.sql")
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
            let minutes = events.iter().fold(UsageTotals::new(), fold_usage);
            if minutes.is_empty() {
                return Ok(());
            }
            if tables != Tables::LIVE {
                // A rebuild writes minutes only; `finish_rebuild` derives hours and days.
                return upsert(tx, &tables.name(Granularity::Minute.table()), &minutes).await;
            }
            for g in Granularity::ALL {
                upsert(tx, &tables.name(g.table()), &rollup(&minutes, g)).await?;
            }
            Ok(())
        })
    }

    fn finish_rebuild<'a>(&'a self, tx: &'a mut PgConnection, tables: Tables) -> ApplyFuture<'a> {
        Box::pin(async move {
            let minute = tables.name(Granularity::Minute.table());
            // The same totals the live runner reaches by adding batch after batch: sums of
            // non-negative amounts, saturated once at the largest bigint.
            let sums = USAGE_COLUMNS.map(saturating_sum).join(", ");
            for (g, unit) in [(Granularity::Hour, "hour"), (Granularity::Day, "day")] {
                let sql = format!(
                    "INSERT INTO {t} (subject, model, model_group, counted_in_key_global,                        counted_in_user_global, bucket, {cols})                      SELECT subject, model, model_group, counted_in_key_global,                        counted_in_user_global, date_trunc('{unit}', bucket, 'UTC'), {sums}                      FROM {minute} GROUP BY 1, 2, 3, 4, 5, 6",
                    t = tables.name(g.table()),
                    cols = USAGE_COLUMNS.join(", "),
                );
                sqlx::Executor::execute(&mut *tx, sql.as_str()).await?;
            }
            Ok(())
        })
    }

    fn claims<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        tables: Tables,
        range: DayRange,
    ) -> ClaimsFuture<'a> {
        Box::pin(async move {
            let mut claims = Vec::new();
            for g in Granularity::ALL {
                let table = tables.name(g.table());
                let rows = daily_sums(tx, &table, "bucket", chrono_tz::UTC, range).await?;
                claims.push(Claim::UsageByDay {
                    table,
                    tz: chrono_tz::UTC,
                    rows,
                });
            }
            Ok(claims)
        })
    }
}

/// One row of a per-day sum: subject, model, day and the five amounts.
type DayRow = (String, String, chrono::NaiveDate, i64, i64, i64, i64, i64);

/// Sums of `table` per subject × model × day of `day_col` in `tz` (a `date` column is taken as
/// is), within `range`.
pub(crate) async fn daily_sums(
    tx: &mut PgConnection,
    table: &str,
    day_col: &str,
    tz: chrono_tz::Tz,
    range: DayRange,
) -> Result<BTreeMap<crate::claims::DayKey, Usage>, Error> {
    let sums = USAGE_COLUMNS.map(saturating_sum).join(", ");
    let day = if day_col == "day" {
        "day".to_owned()
    } else {
        format!("({day_col} AT TIME ZONE $1)::date")
    };
    let sql = format!(
        "SELECT subject, model, d, {sums} FROM (SELECT *, {day} AS d FROM {table}) x \
         WHERE ($2::date IS NULL OR d >= $2) AND ($3::date IS NULL OR d <= $3) \
         GROUP BY subject, model, d"
    );
    let rows: Vec<DayRow> = sqlx::query_as(&sql)
        .bind(tz.name())
        .bind(range.from)
        .bind(range.to)
        .fetch_all(&mut *tx)
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |(s, m, d, requests, input_tokens, output_tokens, cost, credits)| {
                let u = Usage {
                    requests,
                    input_tokens,
                    output_tokens,
                    cost,
                    credits,
                };
                ((s, m, d), u)
            },
        )
        .filter(|(_, u)| !u.is_zero())
        .collect())
}

/// The amount columns of every usage table, in [`Usage::fields`] order.
pub(crate) const USAGE_COLUMNS: [&str; 5] = [
    "requests",
    "input_tokens",
    "output_tokens",
    "cost",
    "credits",
];

/// Re-bucket minute totals to `g` (identity for minutes).
fn rollup(minutes: &UsageTotals, g: Granularity) -> UsageTotals {
    let mut out = BTreeMap::new();
    for (k, u) in minutes {
        let key = UsageKey {
            minute: g.bucket_of(k.minute),
            ..k.clone()
        };
        let slot: &mut Usage = out.entry(key).or_default();
        *slot = slot.plus(u);
    }
    out
}

/// `a + b` for non-negative bigints, saturating at the largest bigint instead of failing the
/// statement with "bigint out of range" (SPEC v2 §4: totals saturate; a projection never stops).
pub fn saturating_add(a: &str, b: &str) -> String {
    format!(
        "CASE WHEN {a} > {max} - {b} THEN {max} ELSE {a} + {b} END",
        max = i64::MAX
    )
}

/// `SET` of an upsert adding the excluded row's amounts to the stored ones, saturating.
pub(crate) fn add_usage_on_conflict() -> String {
    USAGE_COLUMNS
        .map(|c| {
            format!(
                "{c} = {}",
                saturating_add(&format!("t.{c}"), &format!("EXCLUDED.{c}"))
            )
        })
        .join(", ")
}

/// `sum(col)` as a bigint, saturating (the sum itself is numeric and cannot overflow).
pub fn saturating_sum(col: &str) -> String {
    format!("LEAST(sum({col}), {max})::int8", max = i64::MAX)
}

async fn upsert(tx: &mut PgConnection, table: &str, totals: &UsageTotals) -> Result<(), Error> {
    // Column arrays for UNNEST: names (subject, model, model group), flags (key, user), buckets.
    let mut names: [Vec<&str>; 3] = Default::default();
    let mut flags: [Vec<bool>; 2] = Default::default();
    let mut buckets: Vec<DateTime<Utc>> = Vec::with_capacity(totals.len());
    let mut amounts: [Vec<i64>; 5] = Default::default();
    for (k, u) in totals {
        names[0].push(&k.subject);
        names[1].push(&k.model);
        names[2].push(&k.model_group);
        flags[0].push(k.counted_in_key_global);
        flags[1].push(k.counted_in_user_global);
        buckets.push(k.minute);
        for (slot, (_, v)) in amounts.iter_mut().zip(u.fields()) {
            slot.push(v);
        }
    }
    let sets = add_usage_on_conflict();
    let sql = format!(
        "INSERT INTO {table} AS t (subject, model, model_group, counted_in_key_global, counted_in_user_global, bucket, \
           requests, input_tokens, output_tokens, cost, credits) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bool[], $5::bool[], $6::timestamptz[], \
           $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[]) \
         ON CONFLICT (subject, bucket, model, model_group, counted_in_key_global, counted_in_user_global) DO UPDATE SET {sets}"
    );
    let [requests, input, output, cost, credits] = amounts;
    let [subjects, models, model_groups] = names;
    let [key_global, user_global] = flags;
    sqlx::query(&sql)
        .bind(subjects)
        .bind(models)
        .bind(model_groups)
        .bind(key_global)
        .bind(user_global)
        .bind(buckets)
        .bind(requests)
        .bind(input)
        .bind(output)
        .bind(cost)
        .bind(credits)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// One bucket of a usage series.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Bucket {
    /// Bucket start.
    pub start: DateTime<Utc>,
    /// Amounts.
    #[serde(flatten)]
    pub usage: Usage,
}

/// `GET /v1/usage` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UsageSeries {
    /// Every bucket in `[from, to)`, zero-filled.
    pub series: Vec<Bucket>,
    /// Sum of the series.
    pub totals: Usage,
}

type SumRow = (DateTime<Utc>, i64, i64, i64, i64, i64);

/// Settled usage of `subject` (optionally one model) per bucket in `[from, to)`.
#[tracing::instrument(skip(pool))]
pub async fn usage_series(
    pool: &PgPool,
    subject: &str,
    model: Option<&str>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    g: Granularity,
) -> Result<UsageSeries, Error> {
    let from = g.bucket_of(from);
    if to <= from {
        return Err(Error::InvalidQuery {
            field: "to",
            message: "must be after from".into(),
        });
    }
    let step = g.step().num_seconds();
    let buckets = ((to - from).num_seconds() + step - 1) / step;
    if buckets > MAX_SERIES_BUCKETS {
        return Err(Error::InvalidQuery {
            field: "granularity",
            message: format!(
                "{buckets} buckets requested, at most {MAX_SERIES_BUCKETS}; use a coarser granularity or a shorter range"
            ),
        });
    }
    let sums = USAGE_COLUMNS.map(saturating_sum).join(", ");
    let sql = format!(
        "SELECT bucket, {sums} FROM {t} WHERE subject = $1 AND bucket >= $2 AND bucket < $3 \
           AND ($4::text IS NULL OR model = $4) GROUP BY bucket ORDER BY bucket",
        t = g.table()
    );
    let rows: Vec<SumRow> = sqlx::query_as(&sql)
        .bind(subject)
        .bind(from)
        .bind(to)
        .bind(model)
        .fetch_all(pool)
        .await
        .map_err(Error::reading("usage"))?;
    let found: BTreeMap<_, _> = rows
        .into_iter()
        .map(
            |(b, requests, input_tokens, output_tokens, cost, credits)| {
                (
                    b,
                    Usage::from_amounts([requests, input_tokens, output_tokens, cost, credits]),
                )
            },
        )
        .collect();
    let series: Vec<Bucket> = (0..buckets)
        .map(|i| from + g.step() * i as i32)
        .map(|start| Bucket {
            start,
            usage: found.get(&start).copied().unwrap_or_default(),
        })
        .collect();
    let totals = series
        .iter()
        .fold(Usage::default(), |acc, b| acc.plus(&b.usage));
    Ok(UsageSeries { series, totals })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn rollup_sums_minutes_into_hours_and_days() {
        let key = |m: DateTime<Utc>| UsageKey {
            subject: "key:k".into(),
            model: String::new(),
            model_group: String::new(),
            counted_in_key_global: true,
            counted_in_user_global: true,
            minute: m,
        };
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 23, 59, 0).unwrap();
        let u = Usage {
            cost: 5,
            ..Usage::default()
        };
        let minutes: UsageTotals = [
            (key(t), u),
            (key(t - TimeDelta::minutes(1)), u),
            (key(t + TimeDelta::minutes(1)), u),
        ]
        .into();
        let hours = rollup(&minutes, Granularity::Hour);
        assert_eq!(hours.len(), 2);
        assert_eq!(
            hours[&key(Utc.with_ymd_and_hms(2026, 1, 1, 23, 0, 0).unwrap())].cost,
            10
        );
        let days = rollup(&minutes, Granularity::Day);
        assert_eq!(
            days[&key(Utc.with_ymd_and_hms(2026, 1, 2, 0, 0, 0).unwrap())].cost,
            5
        );
        let total: i64 = days.values().map(|u| u.cost).sum();
        assert_eq!(total, 15);
    }
}
