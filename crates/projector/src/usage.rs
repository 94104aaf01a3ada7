//! The first projection: settled usage in minute, hour and day buckets per chain subject, model,
//! model group and counted flags; and the read behind `GET /v1/usage`.

use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tally_events::{Envelope, Usage, UsageKey, UsageTotals, fold_usage};

use crate::Error;
use crate::runner::{ApplyFuture, Projection};

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

    /// Start of the bucket containing `t`.
    pub fn bucket_of(self, t: DateTime<Utc>) -> DateTime<Utc> {
        t.duration_trunc(self.step())
            .expect("bucket truncation of a valid time")
    }
}

/// The usage projection (name `usage`).
pub struct UsageProjection;

impl Projection for UsageProjection {
    fn name(&self) -> &'static str {
        "usage"
    }

    fn apply<'a>(&'a self, tx: &'a mut PgConnection, events: &'a [Envelope]) -> ApplyFuture<'a> {
        Box::pin(async move {
            let minutes = events.iter().fold(UsageTotals::new(), fold_usage);
            if minutes.is_empty() {
                return Ok(());
            }
            for g in Granularity::ALL {
                upsert(tx, g, &rollup(&minutes, g)).await?;
            }
            Ok(())
        })
    }
}

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

async fn upsert(tx: &mut PgConnection, g: Granularity, totals: &UsageTotals) -> Result<(), Error> {
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
    let sql = format!(
        "INSERT INTO {t} AS t (subject, model, model_group, counted_in_key_global, counted_in_user_global, bucket, \
           requests, input_tokens, output_tokens, cost, credits) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bool[], $5::bool[], $6::timestamptz[], \
           $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[]) \
         ON CONFLICT (subject, bucket, model, model_group, counted_in_key_global, counted_in_user_global) DO UPDATE SET \
           requests = t.requests + EXCLUDED.requests, input_tokens = t.input_tokens + EXCLUDED.input_tokens, \
           output_tokens = t.output_tokens + EXCLUDED.output_tokens, cost = t.cost + EXCLUDED.cost, \
           credits = t.credits + EXCLUDED.credits",
        t = g.table()
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
    let sql = format!(
        "SELECT bucket, sum(requests)::int8, sum(input_tokens)::int8, sum(output_tokens)::int8, sum(cost)::int8, \
           sum(credits)::int8 FROM {t} WHERE subject = $1 AND bucket >= $2 AND bucket < $3 \
           AND ($4::text IS NULL OR model = $4) GROUP BY bucket ORDER BY bucket",
        t = g.table()
    );
    let rows: Vec<SumRow> = sqlx::query_as(&sql)
        .bind(subject)
        .bind(from)
        .bind(to)
        .bind(model)
        .fetch_all(pool)
        .await?;
    let found: BTreeMap<_, _> = rows
        .into_iter()
        .map(
            |(b, requests, input_tokens, output_tokens, cost, credits)| {
                (
                    b,
                    Usage {
                        requests,
                        input_tokens,
                        output_tokens,
                        cost,
                        credits,
                    },
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
