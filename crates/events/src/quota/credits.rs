//! Credit balances (SPEC §4, §6): set / increment / decrement, charges from settled usage, and
//! refills that replace the balance daily at 00:00 UTC or monthly on a day clamped to the month's
//! last day. Refills are applied lazily: whenever the account is touched or read at time `t`,
//! every refill instant passed since the last one is caught up first.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::envelope::CreditsAdjusted;
use crate::model::{CreditOp, Refill, RefillInterval};

/// A subject's balance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Balance epoch: a new one at every `set` (and for a balance created after a `clear`). A
    /// request admitted in an older epoch neither holds credits nor is charged in this one
    /// (SPEC v2 §6: a `set` is a barrier).
    pub epoch: u64,
    /// Balance after the last event (before any refill due since).
    pub balance: i64,
    /// Credits held by open admissions.
    pub reserved: i64,
    /// Refill schedule.
    pub refill: Option<Refill>,
    /// The last refill instant accounted for.
    pub last_refill: Option<DateTime<Utc>>,
    /// Server time of the barrier that started this epoch (the `set`, or the balance's
    /// creation): a settlement charged from its event alone (its request already closed or
    /// forgotten) is charged only when its admission was decided at or after it.
    pub barrier_at: Option<DateTime<Utc>>,
}

impl Account {
    /// Whether a settlement of an admission decided at `decided_at` (None: direct usage) is
    /// charged in this epoch.
    pub fn admits_charge_of(&self, decided_at: Option<DateTime<Utc>>) -> bool {
        match (decided_at, self.barrier_at) {
            (Some(d), Some(b)) => d >= b,
            _ => true,
        }
    }

    /// Apply an operator's adjustment at `at`. The event always carries the schedule in force
    /// afterwards (the API copies the current one when the request leaves it out).
    pub fn adjust(&mut self, c: &CreditsAdjusted, at: DateTime<Utc>) {
        self.catch_up(at);
        self.balance = match c.op {
            CreditOp::Set | CreditOp::Clear => c.amount,
            CreditOp::Increment => self.balance.saturating_add(c.amount),
            CreditOp::Decrement => self.balance.saturating_sub(c.amount).max(0),
        };
        if c.refill != self.refill {
            self.refill = c.refill;
            self.last_refill = c.refill.map(|r| last_refill_at(&r, at));
        }
    }

    /// Draw settled credits. The balance never goes below zero: a request admitted on its
    /// estimate that then used more is not a debt (documented in the ADR).
    pub fn charge(&mut self, amount: i64, at: DateTime<Utc>) {
        self.catch_up(at);
        self.balance = self.balance.saturating_sub(amount).max(0);
    }

    /// What a request may still draw: the balance at `t` less what open admissions hold.
    pub fn remaining_at(&self, t: DateTime<Utc>) -> i64 {
        self.balance_at(t).saturating_sub(self.reserved).max(0)
    }

    fn catch_up(&mut self, t: DateTime<Utc>) {
        if let (Some(r), Some(last)) = (self.refill, self.last_refill) {
            let due = last_refill_at(&r, t);
            if due > last {
                self.balance = r.amount;
                self.last_refill = Some(due);
            }
        }
    }

    /// The balance as of `t` (refills due by then applied), before reservations.
    pub fn balance_at(&self, t: DateTime<Utc>) -> i64 {
        let mut a = self.clone();
        a.catch_up(t);
        a.balance
    }

    /// The next refill after `t`, if any.
    pub fn next_refill(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.refill.map(|r| next_refill_after(&r, t))
    }
}

fn midnight(d: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

fn last_day_of_month(year: i32, month: u32) -> u32 {
    let (ny, nm) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    NaiveDate::from_ymd_opt(ny, nm, 1)
        .and_then(|d| d.pred_opt())
        .map_or(28, |d| d.day())
}

fn monthly_instant(year: i32, month: u32, day: u8) -> DateTime<Utc> {
    let d = u32::from(day.max(1)).min(last_day_of_month(year, month));
    midnight(NaiveDate::from_ymd_opt(year, month, d).expect("clamped day exists"))
}

fn prev_month(year: i32, month: u32) -> (i32, u32) {
    if month == 1 {
        (year - 1, 12)
    } else {
        (year, month - 1)
    }
}

/// The latest refill instant at or before `t`.
pub fn last_refill_at(r: &Refill, t: DateTime<Utc>) -> DateTime<Utc> {
    match r.interval {
        RefillInterval::Daily => midnight(t.date_naive()),
        RefillInterval::Monthly => {
            let day = r.day.unwrap_or(1);
            let this = monthly_instant(t.year(), t.month(), day);
            if this <= t {
                this
            } else {
                let (y, m) = prev_month(t.year(), t.month());
                monthly_instant(y, m, day)
            }
        }
    }
}

/// The first refill instant strictly after `t`.
pub fn next_refill_after(r: &Refill, t: DateTime<Utc>) -> DateTime<Utc> {
    match r.interval {
        RefillInterval::Daily => midnight(t.date_naive()) + chrono::TimeDelta::days(1),
        RefillInterval::Monthly => {
            let day = r.day.unwrap_or(1);
            let this = monthly_instant(t.year(), t.month(), day);
            if this > t {
                this
            } else {
                let (y, m) = if t.month() == 12 {
                    (t.year() + 1, 1)
                } else {
                    (t.year(), t.month() + 1)
                };
                monthly_instant(y, m, day)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn monthly_refill_on_day_31_clamps_to_february_end() {
        let r = Refill {
            amount: 10,
            interval: RefillInterval::Monthly,
            day: Some(31),
        };
        assert_eq!(
            next_refill_after(&r, t("2026-02-10T00:00:00Z")),
            t("2026-02-28T00:00:00Z")
        );
        assert_eq!(
            next_refill_after(&r, t("2028-02-10T00:00:00Z")),
            t("2028-02-29T00:00:00Z")
        );
        assert_eq!(
            last_refill_at(&r, t("2026-03-15T00:00:00Z")),
            t("2026-02-28T00:00:00Z")
        );
        assert_eq!(
            next_refill_after(&r, t("2026-02-28T00:00:00Z")),
            t("2026-03-31T00:00:00Z")
        );
    }

    #[test]
    fn refill_replaces_the_balance_once_per_period() {
        let mut a = Account::default();
        let refill = Some(Refill {
            amount: 10,
            interval: RefillInterval::Daily,
            day: None,
        });
        let set = CreditsAdjusted {
            id: None,
            op: CreditOp::Set,
            amount: 3,
            refill,
        };
        a.adjust(&set, t("2026-05-01T10:00:00Z"));
        assert_eq!(a.balance_at(t("2026-05-01T23:59:59Z")), 3);
        a.charge(2, t("2026-05-01T12:00:00Z"));
        assert_eq!(a.balance_at(t("2026-05-01T12:00:00Z")), 1);
        assert_eq!(a.balance_at(t("2026-05-02T00:00:00Z")), 10);
        a.charge(4, t("2026-05-02T08:00:00Z"));
        assert_eq!(a.balance_at(t("2026-05-02T09:00:00Z")), 6);
        a.charge(100, t("2026-05-02T09:00:00Z"));
        assert_eq!(a.balance, 0, "never below zero");
    }
}
