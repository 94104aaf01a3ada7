//! The bench's configurations (SPEC v2 §11). `realistic`: keys → users → teams → customers
//! (10 : 1 at each level), users in 3 groups with per-capita templates, 2 isolated model groups,
//! policies on every chain across rolling, calendar (in a time zone and by month), periodic and
//! lifetime windows, credits on customers; traffic skewed over the keys (a few hot ones) with a
//! share of streamed settlements. `empty`: 32 keys and no configuration (the earlier bench).

use serde_json::{Value, json};

/// Users, teams, customers per key count: one per ten below.
pub const FAN_OUT: usize = 10;
/// Groups users belong to (per-capita templates).
pub const USER_GROUPS: usize = 3;
/// One request in this many is settled as a stream of chunks.
pub const STREAMED_ONE_IN: u64 = 5;
/// Chunks of a streamed settlement.
pub const STREAM_CHUNKS: u64 = 3;
/// Limits high enough that the load is admitted (the bench measures deciding, not refusing),
/// low enough to be real numbers the checks compute against.
const HIGH: i64 = 1_000_000_000_000;
/// Keys of the `empty` configuration.
pub const EMPTY_KEYS: usize = 32;

/// `--config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchConfig {
    /// The configuration of SPEC v2 §11.
    Realistic,
    /// No policies, 32 keys.
    Empty,
}

/// The shape of the realistic configuration for `keys` keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Shape {
    /// Keys.
    pub keys: usize,
    /// Users (a tenth of the keys, at least one).
    pub users: usize,
    /// Teams.
    pub teams: usize,
    /// Customers.
    pub customers: usize,
}

impl Shape {
    /// 10,000 keys → 1,000 users → 100 teams → 10 customers, scaled.
    pub fn of(keys: usize) -> Shape {
        let users = (keys / FAN_OUT).max(1);
        let teams = (users / FAN_OUT).max(1);
        Shape {
            keys,
            users,
            teams,
            customers: (teams / FAN_OUT).max(1),
        }
    }
}

/// Model groups: (name, models). Policies scoped to one never count the other's usage.
pub const MODEL_GROUPS: [(&str, [&str; 2]); 2] = [
    ("gpt", ["gpt-4o", "gpt-4o-mini"]),
    ("claude", ["claude-3-5-sonnet", "claude-3-haiku"]),
];

/// Every admin write of the realistic configuration, in order: (method, path, body).
pub fn admin_writes(shape: Shape) -> Vec<(&'static str, String, Value)> {
    let mut w: Vec<(&'static str, String, Value)> = Vec::new();
    for (name, models) in MODEL_GROUPS {
        w.push((
            "PUT",
            format!("/v1/model-groups/{name}"),
            json!({"models": models}),
        ));
    }
    for c in 0..shape.customers {
        w.push(("PUT", format!("/v1/subjects/customer:c{c}"), json!({})));
    }
    for t in 0..shape.teams {
        let parent = format!("customer:c{}", t % shape.customers);
        w.push((
            "PUT",
            format!("/v1/subjects/team:t{t}"),
            json!({"parent": parent}),
        ));
    }
    for u in 0..shape.users {
        let body = json!({"parent": format!("team:t{}", u % shape.teams),
            "groups": [format!("g{}", u % USER_GROUPS)]});
        w.push(("PUT", format!("/v1/subjects/user:u{u}"), body));
    }
    for k in 0..shape.keys {
        let parent = format!("user:u{}", k % shape.users);
        w.push((
            "PUT",
            format!("/v1/subjects/key:k{k}"),
            json!({"parent": parent}),
        ));
    }
    w.extend(policies(shape));
    for c in 0..shape.customers {
        w.push((
            "POST",
            format!("/v1/credits/customer:c{c}"),
            json!({"op": "set", "amount": HIGH}),
        ));
    }
    w
}

/// The policies: on every chain a rolling 5 h, a calendar day in a time zone, a calendar
/// month, a periodic and a lifetime window, plus per-capita group templates, one of them
/// scoped to a model group.
fn policies(shape: Shape) -> Vec<(&'static str, String, Value)> {
    let mut w = Vec::new();
    let mut put = |id: String, body: Value| w.push(("PUT", format!("/v1/policies/{id}"), body));
    for t in 0..shape.teams {
        put(
            format!("team{t}-tokens-5h"),
            json!({"subject": format!("team:t{t}"),
            "metric": "tokens", "limit": HIGH, "window": {"kind": "rolling", "duration": "5h"}}),
        );
        put(
            format!("team{t}-cost-day"),
            json!({"subject": format!("team:t{t}"),
            "metric": "cost", "limit": HIGH,
            "window": {"kind": "calendar", "unit": "day", "timezone": "Asia/Shanghai"}}),
        );
    }
    for c in 0..shape.customers {
        put(
            format!("customer{c}-cost-month"),
            json!({"subject": format!("customer:c{c}"),
            "metric": "cost", "limit": HIGH, "window": {"kind": "calendar", "unit": "month"}}),
        );
        put(
            format!("customer{c}-requests-6h"),
            json!({"subject": format!("customer:c{c}"),
            "metric": "requests", "limit": HIGH,
            "window": {"kind": "periodic", "every": "6h", "anchor": "2026-01-01T00:00:00Z"}}),
        );
        put(
            format!("customer{c}-cost-lifetime"),
            json!({"subject": format!("customer:c{c}"),
            "metric": "cost", "limit": HIGH, "window": {"kind": "lifetime"}}),
        );
    }
    for g in 0..USER_GROUPS {
        put(
            format!("group{g}-requests-day"),
            json!({"subject": format!("group:g{g}"),
            "metric": "requests", "limit": HIGH, "window": {"kind": "calendar", "unit": "day"}}),
        );
        put(
            format!("group{g}-claude-cost-day"),
            json!({"subject": format!("group:g{g}"),
            "model_group": "claude", "metric": "cost", "limit": HIGH,
            "window": {"kind": "calendar", "unit": "day"}}),
        );
    }
    w
}

/// A small, fast generator (xorshift64*) per client: the traffic needs a skew, not secrecy.
#[derive(Debug, Clone)]
pub struct Traffic {
    state: u64,
    keys: usize,
    realistic: bool,
}

/// One request of the traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Leaf subject.
    pub subject: String,
    /// Model.
    pub model: &'static str,
    /// Settled in chunks.
    pub streamed: bool,
}

impl Traffic {
    /// Client `client`'s traffic over `keys` keys.
    pub fn new(client: usize, keys: usize, config: BenchConfig) -> Self {
        Traffic {
            state: 0x9E37_79B9_7F4A_7C15 ^ (client as u64).wrapping_mul(0xA24B_AED4_963E_E407) | 1,
            keys: keys.max(1),
            realistic: config == BenchConfig::Realistic,
        }
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next request: a key drawn with a power-law skew (u⁴: the hottest 1 % of keys get
    /// about a third of the traffic), a model of either group, one in five streamed.
    pub fn next(&mut self) -> Request {
        if !self.realistic {
            let k = (self.next_u64() % EMPTY_KEYS as u64) as usize;
            return Request {
                subject: format!("key:bench_{k}"),
                model: "bench-model",
                streamed: false,
            };
        }
        let k = ((self.unit().powi(4)) * self.keys as f64) as usize;
        let draw = self.next_u64();
        let (_, models) = MODEL_GROUPS[(draw % 2) as usize];
        Request {
            subject: format!("key:k{}", k.min(self.keys - 1)),
            model: models[((draw >> 1) % 2) as usize],
            streamed: (draw >> 2).is_multiple_of(STREAMED_ONE_IN),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_scales_ten_to_one() {
        assert_eq!(
            Shape::of(10_000),
            Shape {
                keys: 10_000,
                users: 1_000,
                teams: 100,
                customers: 10
            }
        );
        assert_eq!(
            Shape::of(5),
            Shape {
                keys: 5,
                users: 1,
                teams: 1,
                customers: 1
            }
        );
    }

    #[test]
    fn every_chain_has_six_windowed_policies_of_five_kinds() {
        let writes = admin_writes(Shape::of(1_000));
        let policies: Vec<&Value> = writes
            .iter()
            .filter(|(_, p, _)| p.starts_with("/v1/policies/"))
            .map(|(_, _, b)| b)
            .collect();
        let kinds: std::collections::BTreeSet<String> = policies
            .iter()
            .map(|b| b["window"]["kind"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            kinds.len(),
            4,
            "rolling, calendar, periodic, lifetime: {kinds:?}"
        );
        // A chain key → user (group g) → team → customer meets 2 team, 3 customer and 2 group
        // policies (one of them only for claude models).
        let per_chain = 2 + 3 + 2;
        assert!(per_chain >= 6);
        assert_eq!(policies.len(), 2 * 10 + 3 + 2 * USER_GROUPS);
    }

    #[test]
    fn traffic_is_skewed_and_streams_a_share() {
        let mut t = Traffic::new(1, 10_000, BenchConfig::Realistic);
        let draws: Vec<Request> = (0..100_000).map(|_| t.next()).collect();
        let hot = draws
            .iter()
            .filter(|r| {
                r.subject
                    .trim_start_matches("key:k")
                    .parse::<usize>()
                    .unwrap_or(0)
                    < 100
            })
            .count();
        assert!(
            hot > 25_000,
            "the hottest 1 % of keys get a large share: {hot}"
        );
        let streamed = draws.iter().filter(|r| r.streamed).count();
        assert!((15_000..25_000).contains(&streamed), "{streamed}");
        let claude = draws
            .iter()
            .filter(|r| r.model.starts_with("claude"))
            .count();
        assert!((45_000..55_000).contains(&claude), "{claude}");
    }
}
