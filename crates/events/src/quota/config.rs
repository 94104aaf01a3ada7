//! Configuration as a fold of configuration events: subjects (parent, groups, disabled), model
//! groups, policies and grants. Admin writes are validated against this state before they are
//! published (cycles, a model in two groups), and admissions resolve chains and policies from it.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use crate::envelope::{Envelope, EventData, GrantIssued, PolicyUpserted};
use crate::model::{Metric, Subject};
use crate::window::WindowSpec;

/// Longest chain followed. Real hierarchies are key → user → team → customer; a longer chain is
/// a configuration mistake, and the bound keeps a resolution from walking without end.
pub const MAX_CHAIN_DEPTH: usize = 16;
/// Most groups one subject may carry.
pub const MAX_GROUPS_PER_SUBJECT: usize = 32;
/// Most models in one model group.
pub const MAX_MODELS_PER_GROUP: usize = 1024;

/// A configured subject.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
    /// When it was first created (the default periodic anchor).
    pub created_at: DateTime<Utc>,
}

/// The configuration fold.
#[derive(Clone, Debug, Default)]
pub struct Config {
    subjects: HashMap<Subject, SubjectConf>,
    model_groups: BTreeMap<String, Vec<String>>,
    group_of_model: HashMap<String, String>,
    policies: BTreeMap<String, PolicyConf>,
    policies_of: HashMap<Subject, Vec<String>>,
    grants: BTreeMap<String, (Subject, GrantIssued)>,
}

impl Config {
    /// Fold one event (events that are not configuration are ignored).
    pub fn apply(&mut self, env: &Envelope) {
        match &env.data {
            EventData::SubjectUpserted(d) => {
                if let Some(s) = &env.subject {
                    self.subjects.insert(
                        s.clone(),
                        SubjectConf {
                            parent: d.parent.clone(),
                            groups: d.groups.clone(),
                            disabled: d.disabled,
                        },
                    );
                }
            }
            EventData::ModelGroupUpserted(d) => self.set_model_group(&d.name, &d.models),
            EventData::ModelGroupDeleted(d) => self.set_model_group(&d.name, &[]),
            EventData::PolicyUpserted(d) => self.upsert_policy(d, env.occurred_at),
            EventData::PolicyDeleted(d) => self.delete_policy(&d.id),
            EventData::GrantIssued(d) => {
                self.grants
                    .insert(d.grant_id.clone(), (d.subject.clone(), d.clone()));
            }
            EventData::GrantRevoked(d) => {
                self.grants.remove(&d.id);
            }
            _ => {}
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
        }
    }

    /// A configured subject.
    pub fn subject(&self, s: &Subject) -> Option<&SubjectConf> {
        self.subjects.get(s)
    }

    /// The leaf and its ancestors, leaf first. Stops (defensively) at a repeated subject or at
    /// [`MAX_CHAIN_DEPTH`]; writes that would create a cycle are refused before publishing.
    pub fn chain(&self, leaf: &Subject) -> Vec<Subject> {
        let mut chain = vec![leaf.clone()];
        let mut at = leaf;
        while let Some(parent) = self.subjects.get(at).and_then(|c| c.parent.as_ref()) {
            if chain.contains(parent) || chain.len() >= MAX_CHAIN_DEPTH {
                break;
            }
            chain.push(parent.clone());
            at = parent;
        }
        chain
    }

    /// Whether giving `subject` the parent `parent` would make a cycle (or exceed the depth).
    pub fn would_cycle(&self, subject: &Subject, parent: &Subject) -> bool {
        let up = self.chain(parent);
        up.contains(subject) || up.len() + 1 > MAX_CHAIN_DEPTH
    }

    /// The group of `model`, if any.
    pub fn model_group_of(&self, model: &str) -> Option<&str> {
        self.group_of_model.get(model).map(String::as_str)
    }

    /// Members of a model group.
    pub fn model_group(&self, name: &str) -> Option<&[String]> {
        self.model_groups.get(name).map(Vec::as_slice)
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
        let p = &policy.data;
        self.grants
            .values()
            .filter(|(s, g)| {
                (s == pool || *s == p.subject)
                    && g.metric == p.metric
                    && g.model_group == p.model_group
                    && g.window_kind
                        .as_deref()
                        .is_none_or(|k| k == policy.spec.kind())
                    && g.starts_at <= t
                    && t < g.expires_at
            })
            .fold(0i64, |acc, (_, g)| acc.saturating_add(g.amount))
    }

    /// A grant by id.
    pub fn grant(&self, id: &str) -> Option<&GrantIssued> {
        self.grants.get(id).map(|(_, g)| g)
    }

    /// Whether `subject` on its billing axis has an enabled spend policy with a positive limit
    /// scoped to `model_group`, its own or through one of its groups (SPEC §4.3).
    pub fn isolates(&self, subject: &Subject, model_group: &str) -> bool {
        let groups = self.subjects.get(subject).map(|c| c.groups.clone());
        let group_subjects = groups
            .into_iter()
            .flatten()
            .filter_map(|g| Subject::parse(&format!("group:{g}")).ok());
        std::iter::once(subject.clone())
            .chain(group_subjects)
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
