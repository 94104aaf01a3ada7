//! Configuration as a fold of configuration events: subjects (parent, groups, disabled), model
//! groups, policies and grants. Admin writes are validated against this state before they are
//! published (cycles, depth, a model in two groups, a model group in use), and admissions resolve
//! chains and policies from it.
//!
//! The fold keeps its invariants even against events the API would never publish (a hand-made
//! event on the stream, a history written by an older build): a parent that would make a cycle
//! or a chain deeper than [`MAX_CHAIN_DEPTH`] is not taken (the rest of the upsert is), so
//! [`Config::chain`] never has to cut a chain.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};

use crate::envelope::{Envelope, EventData, GrantIssued, PolicyUpserted, SubjectUpserted};
use crate::model::{Metric, Subject};
use crate::window::WindowSpec;

pub use crate::rules::{
    MAX_CHAIN_LEN as MAX_CHAIN_DEPTH, MAX_GROUPS_PER_SUBJECT, MAX_MODELS_PER_GROUP,
    MAX_POLICIES_PER_SUBJECT,
};

/// A configured subject.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubjectConf {
    /// Parent in the chain.
    pub parent: Option<Subject>,
    /// Group labels.
    pub groups: Vec<String>,
    /// Disabled by an operator.
    pub disabled: bool,
}

/// A policy as configured, with its compiled window.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyConf {
    /// The upsert event's data.
    pub data: PolicyUpserted,
    /// Its window, ready to evaluate.
    pub spec: WindowSpec,
    /// When it was first created (the default periodic anchor of older events).
    pub created_at: DateTime<Utc>,
}

impl PolicyConf {
    /// Whether the window is counted per window instance (calendar, periodic): its pools and
    /// reservations are keyed by the window start.
    pub fn windowed(&self) -> bool {
        matches!(
            self.spec,
            WindowSpec::Calendar { .. } | WindowSpec::Periodic { .. }
        )
    }
}

/// Why a `parent` cannot be taken (SPEC v2 §4: 409 naming `parent`, saying which).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParentConflict {
    /// The parent is the subject or one of its descendants.
    Cycle,
    /// Some chain through the subject would be longer than [`MAX_CHAIN_DEPTH`].
    TooDeep {
        /// The length the longest chain would have.
        depth: usize,
    },
}

impl std::fmt::Display for ParentConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParentConflict::Cycle => f.write_str("would make a cycle"),
            ParentConflict::TooDeep { depth } => write!(
                f,
                "would make a chain {depth} subjects deep (at most {MAX_CHAIN_DEPTH})"
            ),
        }
    }
}

/// The configuration fold.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub(super) subjects: HashMap<Subject, SubjectConf>,
    pub(super) children: HashMap<Subject, BTreeSet<Subject>>,
    pub(super) model_groups: BTreeMap<String, Vec<String>>,
    pub(super) group_of_model: HashMap<String, String>,
    pub(super) policies: BTreeMap<String, PolicyConf>,
    pub(super) policies_of: HashMap<Subject, Vec<String>>,
    pub(super) grants: BTreeMap<String, (Subject, GrantIssued)>,
    /// Grant ids by the subject they were written for: every check of every decision asks for
    /// the grants of its pool, which must not cost a scan of every grant in the deployment.
    pub(super) grants_of: HashMap<Subject, BTreeSet<String>>,
}

impl Config {
    /// Fold one event (events that are not configuration are ignored).
    pub fn apply(&mut self, env: &Envelope) {
        match &env.data {
            EventData::SubjectUpserted(d) => {
                if let Some(s) = &env.subject {
                    self.upsert_subject(s, d);
                }
            }
            EventData::SubjectDeleted(_) => {
                if let Some(s) = &env.subject {
                    self.delete_subject(s);
                }
            }
            EventData::ModelGroupUpserted(d) => self.set_model_group(&d.name, &d.models),
            EventData::ModelGroupDeleted(d) => self.set_model_group(&d.name, &[]),
            EventData::PolicyUpserted(d) => self.upsert_policy(d, env.occurred_at),
            EventData::PolicyDeleted(d) => self.delete_policy(&d.id),
            EventData::GrantIssued(d) => self.insert_grant(d.subject.clone(), d.clone()),
            EventData::GrantRevoked(d) => self.remove_grant(&d.id),
            _ => {}
        }
    }

    fn upsert_subject(&mut self, s: &Subject, d: &SubjectUpserted) {
        let old = self.subjects.get(s).and_then(|c| c.parent.clone());
        let parent = match &d.parent {
            Some(p) if p.kind() == "group" || self.parent_conflict(s, p).is_some() => old.clone(),
            other => other.clone(),
        };
        if old != parent {
            self.unlink(s, old.as_ref());
            if let Some(p) = &parent {
                self.children
                    .entry(p.clone())
                    .or_default()
                    .insert(s.clone());
            }
        }
        let conf = SubjectConf {
            parent,
            groups: d.groups.clone(),
            disabled: d.disabled,
        };
        self.subjects.insert(s.clone(), conf);
    }

    fn unlink(&mut self, s: &Subject, parent: Option<&Subject>) {
        if let Some(p) = parent
            && let Some(kids) = self.children.get_mut(p)
        {
            kids.remove(s);
            if kids.is_empty() {
                self.children.remove(p);
            }
        }
    }

    /// Retire a subject: its configuration, its policies and the grants written for it.
    fn delete_subject(&mut self, s: &Subject) {
        if let Some(conf) = self.subjects.remove(s) {
            self.unlink(s, conf.parent.as_ref());
        }
        let ids: Vec<String> = self.policies_of.get(s).cloned().unwrap_or_default();
        for id in ids {
            self.delete_policy(&id);
        }
        for id in self.grants_of.remove(s).unwrap_or_default() {
            self.grants.remove(&id);
        }
    }

    /// Add (or replace) a grant, keeping the index by subject.
    pub(super) fn insert_grant(&mut self, subject: Subject, g: GrantIssued) {
        self.remove_grant(&g.grant_id);
        self.grants_of
            .entry(subject.clone())
            .or_default()
            .insert(g.grant_id.clone());
        self.grants.insert(g.grant_id.clone(), (subject, g));
    }

    fn remove_grant(&mut self, id: &str) {
        let Some((subject, _)) = self.grants.remove(id) else {
            return;
        };
        if let Some(ids) = self.grants_of.get_mut(&subject) {
            ids.remove(id);
            if ids.is_empty() {
                self.grants_of.remove(&subject);
            }
        }
    }

    fn set_model_group(&mut self, name: &str, models: &[String]) {
        if let Some(old) = self.model_groups.remove(name) {
            for m in old {
                if self.group_of_model.get(&m).map(String::as_str) == Some(name) {
                    self.group_of_model.remove(&m);
                }
            }
        }
        if models.is_empty() {
            return;
        }
        for m in models {
            self.group_of_model.insert(m.clone(), name.to_owned());
        }
        self.model_groups.insert(name.to_owned(), models.to_vec());
    }

    fn upsert_policy(&mut self, d: &PolicyUpserted, at: DateTime<Utc>) {
        let created_at = self.policies.get(&d.policy_id).map_or(at, |p| p.created_at);
        // Events were validated before publishing and again on decode; a window that still does
        // not compile (a time zone unknown to this build) leaves the policy out rather than
        // guessing, and the API refuses to write such a policy in the first place.
        let Ok(spec) = WindowSpec::compile(&d.window, created_at) else {
            return;
        };
        self.delete_policy(&d.policy_id);
        self.policies_of
            .entry(d.subject.clone())
            .or_default()
            .push(d.policy_id.clone());
        self.policies.insert(
            d.policy_id.clone(),
            PolicyConf {
                data: d.clone(),
                spec,
                created_at,
            },
        );
    }

    fn delete_policy(&mut self, id: &str) {
        if let Some(p) = self.policies.remove(id)
            && let Some(ids) = self.policies_of.get_mut(&p.data.subject)
        {
            ids.retain(|i| i != id);
            if ids.is_empty() {
                self.policies_of.remove(&p.data.subject);
            }
        }
    }

    /// A configured subject.
    pub fn subject(&self, s: &Subject) -> Option<&SubjectConf> {
        self.subjects.get(s)
    }

    /// Every configured subject.
    pub fn subjects(&self) -> impl Iterator<Item = (&Subject, &SubjectConf)> {
        self.subjects.iter()
    }

    /// The subjects whose parent is `s`.
    pub fn children(&self, s: &Subject) -> impl Iterator<Item = &Subject> {
        self.children.get(s).into_iter().flatten()
    }

    /// The leaf and its ancestors, leaf first. The fold never takes a parent that would make a
    /// cycle or a chain longer than [`MAX_CHAIN_DEPTH`], so the walk ends by itself; the bound
    /// on the loop is a guard against a bug, not a rule.
    pub fn chain(&self, leaf: &Subject) -> Vec<Subject> {
        let mut chain = vec![leaf.clone()];
        let mut at = leaf;
        while let Some(parent) = self.subjects.get(at).and_then(|c| c.parent.as_ref()) {
            if chain.len() > MAX_CHAIN_DEPTH || chain.contains(parent) {
                debug_assert!(false, "the fold admitted a cycle or an over-deep chain");
                break;
            }
            chain.push(parent.clone());
            at = parent;
        }
        chain
    }

    /// Length of the longest chain from a descendant of `s` (or `s` itself) up to `s`, inclusive.
    fn depth_below(&self, s: &Subject) -> usize {
        let mut depth = 1;
        let mut level: Vec<&Subject> = vec![s];
        // Breadth first, one level per step; the fold's invariant bounds the levels.
        while !level.is_empty() && depth <= MAX_CHAIN_DEPTH + 1 {
            let next: Vec<&Subject> = level.iter().flat_map(|p| self.children(p)).collect();
            if next.is_empty() {
                break;
            }
            depth += 1;
            level = next;
        }
        depth
    }

    /// Whether `subject` may take `parent`: not if `parent` is `subject` or below it (a cycle),
    /// nor if some chain through `subject` would then be longer than [`MAX_CHAIN_DEPTH`]
    /// (counting the subjects below `subject` too, so building a chain from the leaf upwards is
    /// refused at the same depth as building it downwards).
    pub fn parent_conflict(&self, subject: &Subject, parent: &Subject) -> Option<ParentConflict> {
        let up = self.chain(parent);
        if up.contains(subject) {
            return Some(ParentConflict::Cycle);
        }
        let depth = self.depth_below(subject) + up.len();
        (depth > MAX_CHAIN_DEPTH).then_some(ParentConflict::TooDeep { depth })
    }

    /// The group of `model`, if any.
    pub fn model_group_of(&self, model: &str) -> Option<&str> {
        self.group_of_model.get(model).map(String::as_str)
    }

    /// Members of a model group.
    pub fn model_group(&self, name: &str) -> Option<&[String]> {
        self.model_groups.get(name).map(Vec::as_slice)
    }

    /// Every model group.
    pub fn model_groups(&self) -> impl Iterator<Item = (&String, &Vec<String>)> {
        self.model_groups.iter()
    }

    /// The first of `models` that already belongs to a group other than `name`.
    pub fn model_conflict(&self, name: &str, models: &[String]) -> Option<(String, String)> {
        models.iter().find_map(|m| {
            self.group_of_model
                .get(m)
                .filter(|g| g.as_str() != name)
                .map(|g| (m.clone(), g.clone()))
        })
    }

    /// What still names model group `name` (`policy <id>` or `grant <id>`): it cannot be deleted.
    pub fn model_group_user(&self, name: &str) -> Option<String> {
        let named = |g: &Option<String>| g.as_deref() == Some(name);
        let policy = self.policies.values().find(|p| named(&p.data.model_group));
        if let Some(p) = policy {
            return Some(format!("policy `{}`", p.data.policy_id));
        }
        self.grants
            .values()
            .find(|(_, g)| named(&g.model_group))
            .map(|(_, g)| format!("grant `{}`", g.grant_id))
    }

    /// A policy by id.
    pub fn policy(&self, id: &str) -> Option<&PolicyConf> {
        self.policies.get(id)
    }

    /// Every policy, by id.
    pub fn policies(&self) -> impl Iterator<Item = &PolicyConf> {
        self.policies.values()
    }

    /// The policies written for `subject` (a chain subject or `group:<name>`).
    pub fn policies_of(&self, subject: &Subject) -> impl Iterator<Item = &PolicyConf> {
        self.policies_of
            .get(subject)
            .into_iter()
            .flatten()
            .filter_map(|id| self.policies.get(id))
    }

    /// Sum of the grants active at `t` that raise `policy` for `pool`: same subject (the pool, or
    /// the group the policy was written for), metric and model group, and window kind if named.
    pub fn grant_total(&self, policy: &PolicyConf, pool: &Subject, t: DateTime<Utc>) -> i64 {
        self.grants_for(policy, pool)
            .filter(|g| g.starts_at <= t && t < g.expires_at)
            .fold(0i64, |acc, g| acc.saturating_add(g.amount))
    }

    /// Every grant (active or not) that raises `policy` for `pool`.
    pub fn grants_for<'a>(
        &'a self,
        policy: &'a PolicyConf,
        pool: &'a Subject,
    ) -> impl Iterator<Item = &'a GrantIssued> {
        let p = &policy.data;
        let other = (p.subject != *pool).then_some(&p.subject);
        [Some(pool), other]
            .into_iter()
            .flatten()
            .filter_map(|s| self.grants_of.get(s))
            .flatten()
            .filter_map(|id| self.grants.get(id).map(|(_, g)| g))
            .filter(move |g| {
                g.metric == p.metric
                    && g.model_group == p.model_group
                    && g.window_kind
                        .as_deref()
                        .is_none_or(|k| k == policy.spec.kind())
            })
    }

    /// A grant by id.
    pub fn grant(&self, id: &str) -> Option<&GrantIssued> {
        self.grants.get(id).map(|(_, g)| g)
    }

    /// Every grant.
    pub fn grants(&self) -> impl Iterator<Item = &GrantIssued> {
        self.grants.values().map(|(_, g)| g)
    }

    /// The `group:<label>` subjects of `s`'s groups.
    pub fn group_subjects(&self, s: &Subject) -> Vec<Subject> {
        self.subjects
            .get(s)
            .map(|c| {
                c.groups
                    .iter()
                    .filter_map(|g| Subject::parse(&format!("group:{g}")).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `subject` on its billing axis has an enabled spend policy with a positive limit
    /// scoped to `model_group`, its own or through one of its groups (SPEC §4.3).
    pub fn isolates(&self, subject: &Subject, model_group: &str) -> bool {
        std::iter::once(subject.clone())
            .chain(self.group_subjects(subject))
            .any(|s| {
                self.policies_of(&s).any(|p| {
                    p.data.enabled
                        && p.data.limit > 0
                        && p.data.metric.is_spend()
                        && p.data.model_group.as_deref() == Some(model_group)
                })
            })
    }

    /// The metric a policy counts.
    pub fn metric_of(&self, id: &str) -> Option<Metric> {
        self.policies.get(id).map(|p| p.data.metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Subject {
        Subject::parse(x).unwrap()
    }

    fn link(c: &mut Config, child: &str, parent: &str) {
        let env = Envelope::new(
            EventData::SubjectUpserted(SubjectUpserted {
                parent: Some(s(parent)),
                groups: vec![],
                disabled: false,
            }),
            Utc::now(),
            None,
            Some(s(child)),
        );
        c.apply(&env);
    }

    #[test]
    fn depth_is_refused_whichever_way_the_chain_is_built() {
        // Upwards: k0 → k1, then k1 → k2, … (each new parent lengthens k0's chain).
        let mut up = Config::default();
        for i in 0..MAX_CHAIN_DEPTH - 1 {
            let (c, p) = (format!("key:k{i}"), format!("key:k{}", i + 1));
            assert_eq!(up.parent_conflict(&s(&c), &s(&p)), None, "{c} → {p}");
            link(&mut up, &c, &p);
        }
        assert_eq!(up.chain(&s("key:k0")).len(), MAX_CHAIN_DEPTH);
        let (last, next) = (format!("key:k{}", MAX_CHAIN_DEPTH - 1), s("key:top"));
        assert_eq!(
            up.parent_conflict(&s(&last), &next),
            Some(ParentConflict::TooDeep {
                depth: MAX_CHAIN_DEPTH + 1
            })
        );
        // The fold does not take it either: the chain stays whole at 16, never cut.
        link(&mut up, &last, "key:top");
        assert_eq!(up.chain(&s("key:k0")).len(), MAX_CHAIN_DEPTH);
        assert_eq!(
            up.parent_conflict(&s("key:top"), &s("key:k0")),
            Some(ParentConflict::TooDeep {
                depth: MAX_CHAIN_DEPTH + 1
            })
        );
        // Downwards: the cycle case is still a cycle.
        assert_eq!(
            up.parent_conflict(&s(&last), &s("key:k0")),
            Some(ParentConflict::Cycle)
        );
    }

    /// Grants are found through their subject, so a deployment's thousands of grants cost a
    /// check nothing; re-issuing an id under another subject, revoking it and retiring its
    /// subject keep the index exact.
    #[test]
    fn grants_are_found_by_subject_and_the_index_stays_exact() {
        use crate::envelope::{GrantIssued, IdOnly, PolicyUpserted};
        use crate::model::{Boundary, Metric, OnExhausted, Window};
        let t0 = Utc::now();
        let mut c = Config::default();
        let event = |data, subject: Option<Subject>| Envelope::new(data, t0, None, subject);
        c.apply(&event(
            EventData::PolicyUpserted(PolicyUpserted {
                policy_id: "p".into(),
                subject: s("key:k1"),
                model_group: None,
                metric: Metric::Cost,
                limit: 10,
                window: Window::Lifetime {},
                boundary: Boundary::Strict,
                on_exhausted: OnExhausted::Reject,
                enabled: true,
            }),
            Some(s("key:k1")),
        ));
        let grant = |id: &str, subject: &str, amount: i64| GrantIssued {
            grant_id: id.into(),
            subject: s(subject),
            model_group: None,
            metric: Metric::Cost,
            amount,
            window_kind: None,
            starts_at: t0 - chrono::Duration::hours(1),
            expires_at: t0 + chrono::Duration::hours(1),
        };
        for i in 0..5_000 {
            c.apply(&event(
                EventData::GrantIssued(grant(&format!("g{i}"), &format!("key:o{i}"), 1)),
                None,
            ));
        }
        c.apply(&event(
            EventData::GrantIssued(grant("mine", "key:k1", 7)),
            None,
        ));
        let k1 = s("key:k1");
        let total = |c: &Config| c.grant_total(c.policy("p").expect("policy"), &k1, t0);
        assert_eq!(total(&c), 7);
        // The same id again under another subject moves it.
        c.apply(&event(
            EventData::GrantIssued(grant("mine", "key:o1", 7)),
            None,
        ));
        assert_eq!(total(&c), 0);
        assert_eq!(c.grants_of.get(&s("key:o1")).map(BTreeSet::len), Some(2));
        c.apply(&event(
            EventData::GrantIssued(grant("back", "key:k1", 3)),
            None,
        ));
        assert_eq!(total(&c), 3);
        c.apply(&event(
            EventData::GrantRevoked(IdOnly { id: "back".into() }),
            None,
        ));
        assert_eq!(total(&c), 0);
        assert!(!c.grants_of.contains_key(&k1), "an empty entry is dropped");
        c.apply(&event(
            EventData::SubjectDeleted(Default::default()),
            Some(s("key:o1")),
        ));
        assert!(c.grant("mine").is_none() && c.grant("g1").is_none());
        assert!(!c.grants_of.contains_key(&s("key:o1")));
        assert_eq!(c.grants().count(), 4_999);
        let indexed: usize = c.grants_of.values().map(BTreeSet::len).sum();
        assert_eq!(indexed, 4_999);
    }
}
