//! Compaction keeps every window's sums exact (issue 5 test 5): the same usage folded with and
//! without compaction (run between events, with the horizons the configuration implies) gives the
//! same `used` for every policy and pool at every time an admission may still name — across
//! rolling, calendar (whole-hour, half-hour and DST zones, odd reset times), periodic (odd
//! anchors) and lifetime windows, and usage from minutes to months old, some of it arriving late.
//! A snapshot round trip of the compacted state gives the same sums too.

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use tally_events::quota::{QuotaState, horizons};
use tally_events::*;

const SUBJECTS: [&str; 3] = ["key:a", "user:b", "team:c"];
const ZONES: [&str; 5] = [
    "UTC",
    "Asia/Kolkata",
    "America/New_York",
    "Asia/Kathmandu",
    "Asia/Shanghai",
];

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 24, 13, 37, 0).unwrap()
}

fn backfill() -> Duration {
    Duration::days(35)
}

#[derive(Clone, Debug)]
enum W {
    Rolling(u32),
    Calendar(u8, u8, u8, u8),
    Periodic(u32, u32),
    Lifetime,
}

fn window(w: &W) -> Window {
    match w {
        W::Rolling(m) => Window::Rolling {
            duration: format!("{}m", 1 + m % (14 * 1440)),
        },
        W::Calendar(unit, zone, h, m) => Window::Calendar {
            unit: [CalendarUnit::Day, CalendarUnit::Week, CalendarUnit::Month][*unit as usize % 3],
            timezone: Some(ZONES[*zone as usize % ZONES.len()].into()),
            reset_at: Some(format!(
                "{:02}:{:02}",
                h % 24,
                [0, 0, 30, 45, 17][*m as usize % 5]
            )),
            week_start: None,
        },
        W::Periodic(every, anchor) => Window::Periodic {
            every: format!(
                "{}m",
                [60, 90, 300, 1440, 10080, 7][*every as usize % 6] * (1 + every % 3)
            ),
            anchor: Some(now() - Duration::minutes(i64::from(*anchor % 500_000))),
        },
        W::Lifetime => Window::Lifetime {},
    }
}

fn w() -> impl Strategy<Value = W> {
    prop_oneof![
        any::<u32>().prop_map(W::Rolling),
        (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>())
            .prop_map(|(a, b, c, d)| W::Calendar(a, b, c, d)),
        (any::<u32>(), any::<u32>()).prop_map(|(a, b)| W::Periodic(a, b)),
        Just(W::Lifetime),
    ]
}

/// (subject, minutes ago, cost, model group, key flag)
type Use = (usize, u32, i64, bool, bool);

fn usage() -> impl Strategy<Value = Use> {
    let age = prop_oneof![
        0..600u32,
        0..(3 * 1440u32),
        0..(40 * 1440u32),
        0..(200 * 1440u32)
    ];
    (
        0..SUBJECTS.len(),
        age,
        1..1_000i64,
        any::<bool>(),
        any::<bool>(),
    )
}

fn policy_event(i: usize, w: &W, subject: usize, mg: bool) -> Envelope {
    let data = PolicyUpserted {
        policy_id: format!("p{i}"),
        subject: Subject::parse(SUBJECTS[subject % SUBJECTS.len()]).unwrap(),
        model_group: mg.then(|| "g".to_owned()),
        metric: Metric::Cost,
        limit: 1_000_000,
        window: window(w),
        boundary: Boundary::Strict,
        on_exhausted: OnExhausted::Reject,
        enabled: true,
    };
    Envelope::new(
        EventData::PolicyUpserted(data),
        now() - Duration::days(300),
        None,
        None,
    )
}

fn usage_event(n: usize, (s, ago, cost, mg, key_global): &Use) -> Envelope {
    let chain: Vec<Subject> = SUBJECTS[*s..]
        .iter()
        .map(|x| Subject::parse(x).unwrap())
        .collect();
    let at = now() - Duration::minutes(i64::from(*ago)) - Duration::seconds(i64::from(*ago % 60));
    let data = UsageSettled {
        settlement_id: format!("s{n}"),
        usage: Usage {
            cost: *cost,
            ..Usage::default()
        },
        success: true,
        is_final: true,
        seq: 0,
        matched_admission: false,
        admission_id: None,
        model: None,
        model_group: mg.then(|| "g".to_owned()),
        chain: chain.clone(),
        counted_in_key_global: *key_global,
        counted_in_user_global: true,
        window_at: at,
    };
    Envelope::new(
        EventData::UsageSettled(data),
        at,
        Some(format!("r{n}")),
        Some(chain[0].clone()),
    )
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn compaction_keeps_every_window_exact(
        policies in proptest::collection::vec((w(), 0..SUBJECTS.len(), any::<bool>()), 1..8),
        uses in proptest::collection::vec(usage(), 1..300),
        probes in proptest::collection::vec(0..(35 * 1440u32 + 1), 12),
        compact_every in 1..50usize,
    ) {
        let mut plain = QuotaState::default();
        let mut compacted = QuotaState::default();
        for (i, (w, s, mg)) in policies.iter().enumerate() {
            let e = policy_event(i, w, *s, *mg);
            plain.apply(&e);
            compacted.apply(&e);
        }
        let h = horizons(&compacted.config, now(), backfill());
        for (n, u) in uses.iter().enumerate() {
            let e = usage_event(n, u);
            plain.apply(&e);
            compacted.apply(&e);
            if n % compact_every == 0 {
                compacted.compact(&h, now() - backfill(), usize::MAX);
            }
        }
        compacted.compact(&h, now() - backfill(), usize::MAX);
        let bytes = compacted.encode_snapshot(7, now());
        let (_, restored) = QuotaState::decode_snapshot(&bytes).expect("round trip");
        prop_assert!(compacted.usage_entries() <= plain.usage_entries());
        for m in probes {
            let t = now() - Duration::minutes(i64::from(m)) + Duration::milliseconds(123);
            for p in plain.config.policies() {
                for s in SUBJECTS {
                    let s = Subject::parse(s).unwrap();
                    let q = compacted.config.policy(&p.data.policy_id).unwrap();
                    let r = restored.config.policy(&p.data.policy_id).unwrap();
                    let want = plain.used(p, &s, t);
                    prop_assert_eq!(compacted.used(q, &s, t), want, "{:?} for {} at {}", p.data.window, s, t);
                    prop_assert_eq!(restored.used(r, &s, t), want, "after a snapshot round trip");
                }
            }
        }
    }
}

/// The horizons do compact: usage months old leaves the minute and hour maps.
#[test]
fn old_usage_is_compacted() {
    let mut q = QuotaState::default();
    q.apply(&policy_event(0, &W::Calendar(0, 0, 0, 0), 0, false));
    for n in 0..5_000 {
        q.apply(&usage_event(
            n,
            &(0, (n as u32) * 97 % (200 * 1440), 1, false, true),
        ));
    }
    let before = q.usage_entries();
    let h = horizons(&q.config, now(), backfill());
    q.compact(&h, now() - backfill(), usize::MAX);
    let after = q.usage_entries();
    println!("usage entries: {before} before, {after} after compaction ({h:?})");
    assert!(after * 2 < before, "{before} → {after}");
}
