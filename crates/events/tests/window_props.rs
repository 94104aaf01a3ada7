//! Properties of the window math over many pseudo-random windows and instants (a fixed-seed
//! generator, so a failure is reproducible): every instant lies in exactly one window, windows
//! are contiguous, and each kind has the length it should (DST shifts included). Instants carry
//! fractions of a second, and periodic windows are probed on both sides of their anchor (SPEC v2
//! §3: the window reported for t always contains t, floor division on the exact instant).

use chrono::{DateTime, Duration, TimeZone, Utc};
use tally_events::window::WindowSpec;
use tally_events::{CalendarUnit, Window};

/// Zones with DST (including Lord Howe's 30-minute shift), odd offsets and none.
const ZONES: [&str; 8] = [
    "UTC",
    "America/New_York",
    "Europe/London",
    "Australia/Lord_Howe",
    "Asia/Kathmandu",
    "Pacific/Chatham",
    "Asia/Shanghai",
    "America/Santiago",
];
const WEEKDAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];
const CASES: usize = 4000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn instant(&mut self) -> DateTime<Utc> {
        // 2000-01-01 .. 2100-01-01, with nanosecond fractions (a quarter of them whole seconds).
        let from = Utc
            .with_ymd_and_hms(2000, 1, 1, 0, 0, 0)
            .unwrap()
            .timestamp();
        let span = 100 * 365 * 86_400;
        let nanos = match self.below(4) {
            0 => 0,
            _ => self.below(1_000_000_000) as u32,
        };
        DateTime::from_timestamp(from + self.below(span) as i64, nanos).unwrap()
    }

    fn minute(&mut self) -> DateTime<Utc> {
        let t = self.instant();
        DateTime::from_timestamp(t.timestamp().div_euclid(60) * 60, 0).unwrap()
    }
}

fn random_window(r: &mut Rng) -> Window {
    match r.below(4) {
        0 => Window::Rolling {
            duration: format!("{}m", 1 + r.below(60 * 24 * 40)),
        },
        1 => {
            let unit =
                [CalendarUnit::Day, CalendarUnit::Week, CalendarUnit::Month][r.below(3) as usize];
            Window::Calendar {
                unit,
                timezone: Some(ZONES[r.below(ZONES.len() as u64) as usize].into()),
                reset_at: Some(format!("{:02}:{:02}", r.below(24), r.below(60))),
                week_start: (unit == CalendarUnit::Week)
                    .then(|| WEEKDAYS[r.below(7) as usize].into()),
            }
        }
        2 => Window::Periodic {
            every: format!("{}m", 1 + r.below(60 * 24 * 60)),
            anchor: Some(r.minute()),
        },
        _ => Window::Lifetime {},
    }
}

/// Longest DST shift of the zones above (Lord Howe shifts 30 min, the others at most 1 h).
const MAX_SHIFT: Duration = Duration::hours(1);

fn assert_length(spec: &WindowSpec, w: &Window, len: Duration) {
    match (spec, w) {
        (WindowSpec::Rolling { minutes }, _)
        | (
            WindowSpec::Periodic {
                every_minutes: minutes,
                ..
            },
            _,
        ) => {
            assert_eq!(len, Duration::minutes(*minutes), "{w:?}")
        }
        (WindowSpec::Calendar { unit, .. }, _) => {
            let (lo, hi) = match unit {
                CalendarUnit::Day => (Duration::hours(24), Duration::hours(24)),
                CalendarUnit::Week => (Duration::days(7), Duration::days(7)),
                CalendarUnit::Month => (Duration::days(28), Duration::days(31)),
            };
            assert!(
                len >= lo - MAX_SHIFT && len <= hi + MAX_SHIFT,
                "{w:?}: {len}"
            );
        }
        (WindowSpec::Lifetime, _) => unreachable!(),
    }
}

#[test]
fn every_instant_lies_in_exactly_one_contiguous_window() {
    let mut r = Rng(0x7a11_7a11_dead_beef);
    for _ in 0..CASES {
        let w = random_window(&mut r);
        let spec = WindowSpec::compile(&w, r.instant()).expect("random windows are valid");
        let t = r.instant();
        let Some(b) = spec.bounds(t) else {
            assert_eq!(spec.kind(), "lifetime");
            assert_eq!(spec.next_reset(t), None);
            continue;
        };
        assert!(b.start <= t && t < b.end, "{w:?} at {t}: {b:?}");
        assert_eq!(b.start.timestamp() % 60, 0, "minute-aligned start: {w:?}");
        assert_length(&spec, &w, b.end - b.start);
        if spec.kind() == "rolling" {
            continue; // rolling windows slide; contiguity is a property of resetting windows
        }
        assert_eq!(spec.next_reset(t), Some(b.end));
        let next = spec.bounds(b.end).unwrap();
        assert_eq!(next.start, b.end, "contiguous forward: {w:?} at {t}");
        let prev = spec.bounds(b.start - Duration::nanoseconds(1)).unwrap();
        assert_eq!(prev.end, b.start, "contiguous backward: {w:?} at {t}");
        // Any instant inside the window maps to the same window.
        let inside = b.start + (b.end - b.start) / 2;
        assert_eq!(spec.bounds(inside).unwrap(), b, "{w:?}");
    }
}

#[test]
fn rolling_windows_age_out_minute_by_minute() {
    let mut r = Rng(42);
    for _ in 0..CASES {
        let minutes = 1 + r.below(10_000) as i64;
        let spec = WindowSpec::Rolling { minutes };
        let t = r.instant();
        let a = spec.bounds(t).unwrap();
        let b = spec.bounds(t + Duration::minutes(1)).unwrap();
        assert_eq!(b.start - a.start, Duration::minutes(1));
        assert!(a.start > t - Duration::minutes(minutes), "(t − d, t]");
    }
}

#[test]
fn periodic_windows_contain_instants_on_both_sides_of_the_anchor() {
    let mut r = Rng(0x0a9c_4041);
    for _ in 0..CASES {
        let every = 1 + r.below(60 * 24 * 3) as i64;
        let anchor = r.minute();
        let spec = WindowSpec::compile(
            &Window::Periodic {
                every: format!("{every}m"),
                anchor: Some(anchor),
            },
            anchor,
        )
        .unwrap();
        // Offsets up to three periods either way, in nanoseconds, plus the exact edges.
        let span = 3 * every * 60_000_000_000;
        let offset = r.below(2 * span as u64) as i64 - span;
        for d in [offset, -1, -500_000_000, -999_999_999, 0, 1, 500_000_000] {
            let t = anchor + Duration::nanoseconds(d);
            let b = spec.bounds(t).unwrap();
            assert!(
                b.start <= t && t < b.end,
                "every {every}m, anchor {anchor}, t {t}: {b:?}"
            );
            assert_eq!((b.end - b.start).num_minutes(), every);
            let k = (b.start - anchor).num_minutes();
            assert_eq!(k.rem_euclid(every), 0, "on the anchor's grid");
            assert_eq!(k < 0, t < anchor, "windows before the anchor have k < 0");
        }
    }
}
