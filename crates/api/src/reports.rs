//! Reports read from projections: `GET /v1/reports/daily-usage`, as JSON or CSV.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::NaiveDate;
use tally_projector::daily_usage::{
    DailyReport, MAX_REPORT_ROWS, ReportCursor, ReportQuery, daily_report,
};

use crate::AppState;
use crate::body::Params;
use crate::error::ApiError;
use crate::handlers::{name_field, subject_field};

/// Rows per page when `limit` is not given.
pub const DEFAULT_REPORT_ROWS: i64 = 1_000;
/// Longest cursor accepted (a hex-encoded day, subject and model; names are bounded).
const MAX_CURSOR_CHARS: usize = 2_048;
/// Header carrying the next page's cursor on a CSV answer (JSON has it in the body).
pub const NEXT_CURSOR_HEADER: &str = "x-next-cursor";

/// `GET /v1/reports/daily-usage?from=&to=&subject=&model=&cursor=&limit=&format=`: settled
/// usage per local day (the zone `--report-timezone` names), chain subject and model, ordered
/// by day, subject, model and paged by `cursor`. CSV with `Accept: text/csv` or `format=csv`.
/// 503 with `Retry-After` while the projection is being built.
#[utoipa::path(get, path = "/v1/reports/daily-usage", tag = "data plane", security(("bearer" = [])),
    params(("from" = String, Query, description = "First day, YYYY-MM-DD"),
        ("to" = String, Query, description = "Last day, YYYY-MM-DD"),
        ("subject" = Option<String>, Query, description = "Only this subject"),
        ("model" = Option<String>, Query, description = "Only this model"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
        ("limit" = Option<u32>, Query, description = "Rows per page"),
        ("format" = Option<String>, Query, description = "`json` or `csv` (else by `Accept`)")),
    responses((status = 200, description = "Rows per subject × model × day: JSON, or CSV with `Accept: text/csv`",
        content((serde_json::Value = "application/json"), (String = "text/csv"))), crate::docs::DataPlaneErrors))]
pub async fn daily_usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Params,
) -> Result<Response, ApiError> {
    let params = params.only(&[
        "from", "to", "subject", "model", "cursor", "limit", "format",
    ])?;
    let csv = wants_csv(&headers, params.get("format"))?;
    let query = report_query(&params)?;
    let report = daily_report(&state.0.db, state.0.config.report_tz, &query).await?;
    let next = report.next_cursor.as_ref().map(encode_cursor);
    if !csv {
        let mut body = serde_json::to_value(&report).map_err(|e| ApiError::Internal(e.into()))?;
        body["next_cursor"] = next.into();
        return Ok(Json(body).into_response());
    }
    let text = to_csv(&report)?;
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        )],
        text,
    )
        .into_response();
    if let Some(next) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        response.headers_mut().insert(NEXT_CURSOR_HEADER, next);
    }
    Ok(response)
}

fn wants_csv(headers: &HeaderMap, format: Option<&str>) -> Result<bool, ApiError> {
    match format {
        Some("csv") => return Ok(true),
        Some("json") => return Ok(false),
        Some(_) => return Err(ApiError::invalid("format", "must be json or csv")),
        None => {}
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Ok(accept
        .split(',')
        .any(|part| part.trim().starts_with("text/csv")))
}

fn report_query(params: &Params) -> Result<ReportQuery, ApiError> {
    let from = date(params, "from")?;
    let to = date(params, "to")?;
    let subject = match params.get("subject") {
        Some(s) => Some(subject_field("subject", s)?.as_str().to_owned()),
        None => None,
    };
    name_field("model", params.get("model"))?;
    let limit = match params.get("limit") {
        None => DEFAULT_REPORT_ROWS,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_REPORT_ROWS).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(
                    "limit",
                    format!("must be an integer from 1 to {MAX_REPORT_ROWS}"),
                )
            })?,
    };
    let cursor = params.get("cursor").map(decode_cursor).transpose()?;
    Ok(ReportQuery {
        from,
        to,
        subject,
        model: params.get("model").map(str::to_owned),
        cursor,
        limit,
    })
}

fn date(params: &Params, name: &str) -> Result<NaiveDate, ApiError> {
    let text = params.required(name)?;
    // Exactly RFC 3339's full-date (the document's `format: date`): chrono alone would also take
    // `2026-1-5` or a five-digit year.
    let shaped = text.len() == 10
        && text.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    shaped
        .then(|| NaiveDate::parse_from_str(text, "%Y-%m-%d").ok())
        .flatten()
        .ok_or_else(|| ApiError::invalid(name, "must be a date like 2026-11-24"))
}

/// A cursor is opaque to clients: the hex of a JSON `[day, subject, model]`.
fn encode_cursor(c: &ReportCursor) -> String {
    let json = serde_json::json!([c.0, c.1, c.2]).to_string();
    json.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(text: &str) -> Result<ReportCursor, ApiError> {
    let bad = || ApiError::invalid("cursor", "is not a cursor this API returned");
    if text.len() > MAX_CURSOR_CHARS || !text.len().is_multiple_of(2) || !text.is_ascii() {
        return Err(bad());
    }
    let bytes = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad())?;
    let (day, subject, model): (NaiveDate, String, String) =
        serde_json::from_slice(&bytes).map_err(|_| bad())?;
    Ok((day, subject, model))
}

fn to_csv(report: &DailyReport) -> Result<String, ApiError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let failed = |e: csv::Error| ApiError::Internal(e.into());
    w.write_record([
        "day",
        "subject",
        "model",
        "requests",
        "input_tokens",
        "output_tokens",
        "cost",
        "credits",
    ])
    .map_err(failed)?;
    for r in &report.rows {
        let u = &r.usage;
        w.write_record([
            r.day.to_string(),
            r.subject.clone(),
            r.model.clone(),
            u.requests.to_string(),
            u.input_tokens.to_string(),
            u.output_tokens.to_string(),
            u.cost.to_string(),
            u.credits.to_string(),
        ])
        .map_err(failed)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| ApiError::Internal(e.into_error().into()))?;
    String::from_utf8(bytes).map_err(|e| ApiError::Internal(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_a_400_naming_cursor() {
        let c: ReportCursor = (
            NaiveDate::from_ymd_opt(2026, 11, 24).expect("a date"),
            "key:a,\"b\"".into(),
            "gpt-4o".into(),
        );
        assert_eq!(decode_cursor(&encode_cursor(&c)).expect("round trip"), c);
        for bad in ["", "zz", "abc", "00", &"ab".repeat(2_000), "é1"] {
            let e = decode_cursor(bad).expect_err(bad);
            assert!(matches!(e, ApiError::Invalid { field: Some(ref f), .. } if f == "cursor"));
        }
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let report = DailyReport {
            time_zone: "UTC".into(),
            rows: vec![tally_projector::daily_usage::DailyRow {
                day: NaiveDate::from_ymd_opt(2026, 1, 2).expect("a date"),
                subject: "team:a,b".into(),
                model: String::new(),
                usage: tally_events::Usage {
                    requests: 1,
                    input_tokens: 2,
                    output_tokens: 3,
                    cost: i64::MAX,
                    credits: 0,
                },
            }],
            next_cursor: None,
        };
        let text = to_csv(&report).expect("csv");
        assert_eq!(
            text,
            "day,subject,model,requests,input_tokens,output_tokens,cost,credits\n\
             2026-01-02,\"team:a,b\",,1,2,3,9223372036854775807,0\n"
        );
    }
}
