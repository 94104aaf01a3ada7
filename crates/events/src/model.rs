//! Value types that events carry: subjects, amounts, metrics, windows, checks.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::Error;

/// Longest id part of a subject (SPEC §1).
pub const MAX_SUBJECT_ID_LEN: usize = 128;
/// Longest subject kind; kinds are short words like `customer`.
pub const MAX_SUBJECT_KIND_LEN: usize = 32;
/// Longest `request_id`, `model`, model-group name or other free identifier we store. Bounded so a
/// client cannot grow an index row or a log line without limit.
pub const MAX_NAME_LEN: usize = 256;

/// A limited party, `kind:id` (e.g. `key:k_1`). Validated on construction and on decode.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Subject(String);

impl Subject {
    /// Parse and validate `kind:id`: kind `[a-z_]+`, id `[A-Za-z0-9._:@-]{1,128}`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (kind, id) = text
            .split_once(':')
            .ok_or_else(|| format!("`{text}` is not of the form kind:id"))?;
        if kind.is_empty()
            || kind.len() > MAX_SUBJECT_KIND_LEN
            || !kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            return Err(format!(
                "subject kind `{kind}` must be 1..={MAX_SUBJECT_KIND_LEN} of [a-z_]"
            ));
        }
        let id_ok = |b: u8| b.is_ascii_alphanumeric() || b".:_@-".contains(&b);
        if id.is_empty() || id.len() > MAX_SUBJECT_ID_LEN || !id.bytes().all(id_ok) {
            return Err(format!(
                "subject id must be 1..={MAX_SUBJECT_ID_LEN} of [A-Za-z0-9._:@-]"
            ));
        }
        Ok(Subject(text.to_owned()))
    }

    /// The whole `kind:id` text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `:`.
    pub fn kind(&self) -> &str {
        self.0.split_once(':').map_or("", |(k, _)| k)
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Subject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Subject::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Check a free-form identifier (request id, model, group name): non-empty, bounded, printable.
pub fn validate_name(field: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(Error::invalid(
            field,
            format!("must be 1..={MAX_NAME_LEN} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// Amounts of every metric, integers in minor units (`cost` in micro-units). Absent means 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Usage {
    /// Number of requests.
    pub requests: i64,
    /// Prompt tokens.
    pub input_tokens: i64,
    /// Completion tokens.
    pub output_tokens: i64,
    /// Cost in micro-units of the operator's currency (1 USD = 1 000 000).
    pub cost: i64,
    /// Credits.
    pub credits: i64,
}

/// Largest single amount accepted in one event: 10^15 micro-units is a billion dollars, far
/// beyond any one request, and keeps sums of millions of events far from `i64::MAX`.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

impl Usage {
    /// Every amount must be within `0..=MAX_AMOUNT`; `prefix` names the field (`estimate`, `usage`).
    pub fn validate(&self, prefix: &str) -> Result<(), Error> {
        for (name, v) in self.fields() {
            if !(0..=MAX_AMOUNT).contains(&v) {
                return Err(Error::invalid(
                    format!("{prefix}.{name}"),
                    format!("must be within 0..={MAX_AMOUNT}"),
                ));
            }
        }
        Ok(())
    }

    /// The amounts in [`Usage::fields`] order: requests, input tokens, output tokens, cost,
    /// credits.
    pub fn from_amounts([requests, input_tokens, output_tokens, cost, credits]: [i64; 5]) -> Usage {
        Usage {
            requests,
            input_tokens,
            output_tokens,
            cost,
            credits,
        }
    }

    /// `(name, amount)` for each metric, in a fixed order.
    pub fn fields(&self) -> [(&'static str, i64); 5] {
        [
            ("requests", self.requests),
            ("input_tokens", self.input_tokens),
            ("output_tokens", self.output_tokens),
            ("cost", self.cost),
            ("credits", self.credits),
        ]
    }

    /// `input_tokens + output_tokens`, saturating at `i64::MAX` (SPEC v2 §4: totals saturate).
    pub fn tokens(&self) -> i64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// Component-wise sum, saturating at `i64::MAX`: each amount is bounded per event, but a
    /// total over enough events is not, and a saturated total must read as "exhausted", never
    /// wrap negative or panic (SPEC v2 §4, §10.10).
    pub fn plus(&self, o: &Usage) -> Usage {
        self.zip(o, i64::saturating_add)
    }

    /// Component-wise difference, saturating (never wraps).
    pub fn minus(&self, o: &Usage) -> Usage {
        self.zip(o, i64::saturating_sub)
    }

    fn zip(&self, o: &Usage, f: fn(i64, i64) -> i64) -> Usage {
        Usage {
            requests: f(self.requests, o.requests),
            input_tokens: f(self.input_tokens, o.input_tokens),
            output_tokens: f(self.output_tokens, o.output_tokens),
            cost: f(self.cost, o.cost),
            credits: f(self.credits, o.credits),
        }
    }

    /// True when every amount is zero.
    pub fn is_zero(&self) -> bool {
        self.fields().iter().all(|(_, v)| *v == 0)
    }
}

/// What a policy counts (SPEC §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Requests.
    Requests,
    /// Input tokens.
    InputTokens,
    /// Output tokens.
    OutputTokens,
    /// Input + output tokens.
    Tokens,
    /// Cost in micro-units.
    Cost,
    /// Credits.
    Credits,
}

impl Metric {
    /// Every metric, in a fixed order.
    pub const ALL: [Metric; 6] = [
        Metric::Requests,
        Metric::InputTokens,
        Metric::OutputTokens,
        Metric::Tokens,
        Metric::Cost,
        Metric::Credits,
    ];

    /// The wire name (what serde writes).
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Requests => "requests",
            Metric::InputTokens => "input_tokens",
            Metric::OutputTokens => "output_tokens",
            Metric::Tokens => "tokens",
            Metric::Cost => "cost",
            Metric::Credits => "credits",
        }
    }

    /// This metric's position in [`Metric::ALL`].
    pub fn index(self) -> usize {
        match self {
            Metric::Requests => 0,
            Metric::InputTokens => 1,
            Metric::OutputTokens => 2,
            Metric::Tokens => 3,
            Metric::Cost => 4,
            Metric::Credits => 5,
        }
    }

    /// The amount of this metric in `u`.
    pub fn of(self, u: &Usage) -> i64 {
        match self {
            Metric::Requests => u.requests,
            Metric::InputTokens => u.input_tokens,
            Metric::OutputTokens => u.output_tokens,
            Metric::Tokens => u.tokens(),
            Metric::Cost => u.cost,
            Metric::Credits => u.credits,
        }
    }

    /// Spend metrics are the ones billing isolation applies to (everything but `requests`).
    pub fn is_spend(self) -> bool {
        self != Metric::Requests
    }
}

/// A policy's window (SPEC §3). Durations are text like `90m`, `5h`, `1d`, `2w`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Window {
    /// Usage in `(t - duration, t]`, minute resolution.
    Rolling {
        /// Length, e.g. `5h`.
        duration: String,
    },
    /// Local calendar periods.
    Calendar {
        /// `day`, `week` or `month`.
        unit: CalendarUnit,
        /// IANA time zone name; UTC when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timezone: Option<String>,
        /// Local `HH:MM` at which periods start; 00:00 when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reset_at: Option<String>,
        /// First day of a week; monday when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        week_start: Option<String>,
    },
    /// `[anchor + k·every, anchor + (k+1)·every)`.
    Periodic {
        /// Period length, at least `1m`.
        every: String,
        /// Start of window 0; the policy's creation time when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        anchor: Option<DateTime<Utc>>,
    },
    /// Never resets. A struct variant so that unknown fields beside `kind` are refused like
    /// every other window's (`{"kind":"lifetime","duration":"5h"}` is a mistake, not a lifetime).
    Lifetime {},
}

/// Calendar window unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CalendarUnit {
    /// A local day.
    Day,
    /// A local week.
    Week,
    /// A local month.
    Month,
}

/// Parse a duration like `90m`, `5h`, `1d`, `2w` into minutes (the window resolution).
pub fn parse_duration_minutes(field: &str, text: &str) -> Result<i64, Error> {
    let bad = || {
        Error::invalid(
            field,
            format!("`{text}` is not a duration like 90m, 5h, 1d or 2w"),
        )
    };
    let unit = text.chars().last().ok_or_else(bad)?;
    let per_unit = match unit {
        'm' => 1,
        'h' => 60,
        'd' => 24 * 60,
        'w' => 7 * 24 * 60,
        _ => return Err(bad()),
    };
    let digits = &text[..text.len() - unit.len_utf8()];
    // Digits only: `+5h`, `-5h`, ` 5h` and `5.0h` are refused here, where the client hears the
    // field it sent, not later by a stricter reader. Leading zeros are taken (`05h`, as every
    // build has: a stored history may hold them), however many: the document's pattern,
    // `DURATION_PATTERN`, then states the grammar exactly.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let significant = digits.trim_start_matches('0');
    let n: i64 = match significant.len() {
        0 => 0,
        1..=12 => significant.parse().map_err(|_| bad())?,
        _ => i64::MAX, // out of range below, whatever the unit
    };
    match n.checked_mul(per_unit) {
        Some(m) if (1..=MAX_DURATION_MINUTES).contains(&m) => Ok(m),
        _ => Err(Error::invalid(
            field,
            format!("must be between 1m and {MAX_DURATION_MINUTES}m"),
        )),
    }
}

/// Longest rolling or periodic window, ten years: longer ones are lifetime windows in disguise.
pub const MAX_DURATION_MINUTES: i64 = 10 * 366 * 24 * 60;

/// Exactly the durations [`parse_duration_minutes`] takes, as a regular expression (for the API
/// document): per unit, the numbers 1..=[`MAX_DURATION_MINUTES`] in that unit (5,270,400 m,
/// 87,840 h, 3,660 d, 522 w), after any leading zeros. A unit test holds it to the parser.
pub const DURATION_PATTERN: &str = concat!(
    "^0*(?:",
    "(?:[1-9][0-9]{0,5}|[1-4][0-9]{6}|5[01][0-9]{5}|52[0-6][0-9]{4}|5270[0-3][0-9]{2}|5270400)m",
    "|(?:[1-9][0-9]{0,3}|[1-7][0-9]{4}|8[0-6][0-9]{3}|87[0-7][0-9]{2}|878[0-3][0-9]|87840)h",
    "|(?:[1-9][0-9]{0,2}|[12][0-9]{3}|3[0-5][0-9]{2}|36[0-5][0-9]|3660)d",
    "|(?:[1-9][0-9]?|[1-4][0-9]{2}|5[01][0-9]|52[0-2])w",
    ")$"
);

/// How a check treats the request that crosses the limit (SPEC §4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Boundary {
    /// Pass iff `used + reserved + estimate <= limit`.
    #[default]
    Strict,
    /// Pass iff `used + reserved < limit`.
    Graceful,
}

/// What happens when a policy is exhausted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    /// Refuse the request.
    #[default]
    Reject,
    /// Refuse the subject until the window resets.
    Disable,
    /// Never refuse; emit `threshold.crossed` once per window.
    Alert,
}

impl OnExhausted {
    /// Every mode.
    pub const ALL: [OnExhausted; 3] = [
        OnExhausted::Reject,
        OnExhausted::Disable,
        OnExhausted::Alert,
    ];

    /// The wire name (what serde writes).
    pub fn as_str(self) -> &'static str {
        match self {
            OnExhausted::Reject => "reject",
            OnExhausted::Disable => "disable",
            OnExhausted::Alert => "alert",
        }
    }
}

/// Why an admission was refused (or could not be decided).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A limit would be exceeded.
    LimitExceeded,
    /// A subject in the chain is disabled.
    SubjectDisabled,
    /// The credit balance is exhausted.
    CreditsExhausted,
    /// Tally could not record the decision.
    Unavailable,
    /// The subject is unknown and `--unknown-subjects reject` is set.
    UnknownSubject,
}

impl Reason {
    /// The wire name, e.g. `limit_exceeded` (also a metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::LimitExceeded => "limit_exceeded",
            Reason::SubjectDisabled => "subject_disabled",
            Reason::CreditsExhausted => "credits_exhausted",
            Reason::Unavailable => "unavailable",
            Reason::UnknownSubject => "unknown_subject",
        }
    }
}

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Within the limit.
    Pass,
    /// Over the limit.
    Fail,
    /// Over the limit, but the check does not refuse (graceful crossing, alert).
    SoftExceeded,
}

/// Bounds of the window a check read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowBounds {
    /// Inclusive start.
    pub start: DateTime<Utc>,
    /// Exclusive end.
    pub end: DateTime<Utc>,
}

/// One check of an admission, as decided and frozen in the event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// Policy that produced the check.
    pub policy_id: String,
    /// Pool subject.
    pub subject: Subject,
    /// Metric counted.
    pub metric: Metric,
    /// Window read; `None` for lifetime windows.
    pub window: Option<WindowBounds>,
    /// Limit including grants.
    pub limit: i64,
    /// Settled usage.
    pub used: i64,
    /// Outstanding reservations.
    pub reserved: i64,
    /// `limit - used - reserved`, not below zero.
    pub remaining: i64,
    /// Decision.
    pub outcome: Outcome,
}

/// Operation of a `credits.adjusted` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CreditOp {
    /// Replace the balance (a barrier).
    Set,
    /// Add to the balance.
    Increment,
    /// Subtract from the balance (never below zero).
    Decrement,
    /// Remove the balance: the subject is unlimited again (SPEC v2 §6). Also a barrier.
    Clear,
}

/// Refill schedule of a credit balance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refill {
    /// Balance after a refill.
    pub amount: i64,
    /// `daily` or `monthly`.
    pub interval: RefillInterval,
    /// Day of month for monthly refills (clamped to the month's end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<u8>,
}

/// Refill interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefillInterval {
    /// Every day at 00:00 UTC.
    Daily,
    /// Every month on `day`.
    Monthly,
}

#[cfg(test)]
mod reason_tests {
    use super::{DURATION_PATTERN, MAX_DURATION_MINUTES, Reason, parse_duration_minutes};

    #[test]
    fn metric_and_mode_names_are_the_wire_names() {
        for m in super::Metric::ALL {
            assert_eq!(serde_json::to_value(m).ok(), Some(m.as_str().into()));
        }
        for o in super::OnExhausted::ALL {
            assert_eq!(serde_json::to_value(o).ok(), Some(o.as_str().into()));
        }
    }

    #[test]
    fn reason_names_are_the_wire_names() {
        for r in [
            Reason::LimitExceeded,
            Reason::SubjectDisabled,
            Reason::CreditsExhausted,
            Reason::Unavailable,
            Reason::UnknownSubject,
        ] {
            assert_eq!(serde_json::to_value(r).ok(), Some(r.as_str().into()));
        }
    }

    /// `DURATION_PATTERN` states exactly what `parse_duration_minutes` takes: every number of
    /// every unit up to past the limit, leading zeros, signs and junk.
    #[test]
    fn the_duration_pattern_is_the_parser() {
        let re = regex::Regex::new(DURATION_PATTERN).expect("pattern compiles");
        let agree = |text: &str| {
            let parsed = parse_duration_minutes("d", text).is_ok();
            assert_eq!(re.is_match(text), parsed, "{text:?}: parser says {parsed}");
        };
        for (unit, per_unit) in [('m', 1), ('h', 60), ('d', 1440), ('w', 10_080)] {
            let max = MAX_DURATION_MINUTES / per_unit;
            let edges = (0..=20_000).chain(max - 20_000..max + 20_000);
            for n in edges.chain([10 * max, 999_999_999_999, 1_000_000_000_000]) {
                agree(&format!("{n}{unit}"));
            }
            let padded = [
                "0000000000000005",
                "0000000000000000",
                "00000000000001000000000",
            ];
            for text in ["0", "00", "01", "007", "+5", "-5", " 5", "5.0", "", "1_0"]
                .into_iter()
                .chain(padded)
            {
                agree(&format!("{text}{unit}"));
            }
        }
        for text in ["", "m", "5", "5s", "5M", "5mm", "5 m", "5m\n", "٣m"] {
            agree(text);
        }
    }
}
