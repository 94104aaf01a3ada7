//! Round trips of every event type and rejection of unknown or invalid payloads.

use chrono::{TimeZone, Utc};
use tally_events::*;
use uuid::Uuid;

fn subj(s: &str) -> Subject {
    Subject::parse(s).unwrap()
}

fn t0() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap()
}

fn admission() -> Envelope {
    let mut env = Envelope::new(
        EventData::PolicyDeleted(IdOnly { id: "x".into() }),
        t0(),
        Some("req-1".into()),
        Some(subj("key:k_1")),
    );
    env.data = EventData::AdmissionDecided(AdmissionDecided {
        admission_id: env.id,
        admitted: true,
        reason: None,
        retry_after_seconds: None,
        model: Some("gpt-4o".into()),
        model_group: None,
        chain: vec![subj("key:k_1"), subj("user:u_7")],
        estimate: Usage {
            requests: 1,
            cost: 1500,
            ..Usage::default()
        },
        counted_in_key_global: true,
        counted_in_user_global: false,
        checks: vec![],
        received_at: t0(),
    });
    env
}

fn settled(final_: bool) -> EventData {
    EventData::UsageSettled(UsageSettled {
        settlement_id: "req-1:0".into(),
        usage: Usage {
            input_tokens: 10,
            output_tokens: 5,
            cost: 900,
            ..Usage::default()
        },
        success: true,
        is_final: final_,
        seq: 0,
        matched_admission: true,
        admission_id: Some(Uuid::now_v7()),
        model: Some("gpt-4o".into()),
        model_group: Some("openai".into()),
        chain: vec![subj("key:k_1")],
        counted_in_key_global: false,
        counted_in_user_global: true,
        window_at: t0(),
    })
}

fn every_event() -> Vec<Envelope> {
    let rid = || Some("req-1".to_string());
    let key = || Some(subj("key:k_1"));
    let ended = || ReservationEnded {
        admission_id: Uuid::now_v7(),
    };
    let mg = |models: Vec<&str>| ModelGroupChanged {
        name: "openai".into(),
        models: models.into_iter().map(String::from).collect(),
    };
    let datas: Vec<(EventData, Option<String>, Option<Subject>)> = vec![
        (settled(true), rid(), key()),
        (EventData::ReservationReleased(ended()), rid(), key()),
        (EventData::ReservationExpired(ended()), rid(), key()),
        (
            EventData::SubjectUpserted(SubjectUpserted {
                parent: Some(subj("team:t_2")),
                groups: vec!["pro".into()],
                disabled: false,
            }),
            None,
            key(),
        ),
        (
            EventData::SubjectDeleted(SubjectDeleted {}),
            None,
            Some(subj("key:k_old")),
        ),
        (
            EventData::ModelGroupUpserted(mg(vec!["gpt-4o"])),
            None,
            None,
        ),
        (EventData::ModelGroupDeleted(mg(vec![])), None, None),
        (
            EventData::PolicyUpserted(PolicyUpserted {
                policy_id: "p1".into(),
                subject: subj("group:pro"),
                model_group: None,
                metric: Metric::Cost,
                limit: 5_000_000,
                window: Window::Calendar {
                    unit: CalendarUnit::Day,
                    timezone: Some("Asia/Shanghai".into()),
                    reset_at: Some("04:00".into()),
                    week_start: None,
                },
                boundary: Boundary::Graceful,
                on_exhausted: OnExhausted::Disable,
                enabled: true,
            }),
            None,
            None,
        ),
        (
            EventData::PolicyDeleted(IdOnly { id: "p1".into() }),
            None,
            None,
        ),
        (
            EventData::WindowReset(WindowReset {
                policy_id: "p1".into(),
                subject: subj("user:u_7"),
                at: t0(),
            }),
            None,
            None,
        ),
        (
            EventData::GrantIssued(GrantIssued {
                grant_id: "g1".into(),
                subject: subj("user:u_7"),
                model_group: None,
                metric: Metric::Tokens,
                amount: 1000,
                window_kind: None,
                starts_at: t0(),
                expires_at: t0() + chrono::Duration::hours(1),
            }),
            None,
            None,
        ),
        (
            EventData::GrantRevoked(IdOnly { id: "g1".into() }),
            None,
            None,
        ),
        (
            EventData::CreditsAdjusted(CreditsAdjusted {
                id: Some("w-1".into()),
                op: CreditOp::Set,
                amount: 10,
                refill: Some(Refill {
                    amount: 10,
                    interval: RefillInterval::Monthly,
                    day: Some(31),
                }),
            }),
            None,
            key(),
        ),
        (
            EventData::ThresholdCrossed(ThresholdCrossed {
                policy_id: "p1".into(),
                subject: subj("user:u_7"),
                window: None,
                limit: 5,
                used: 6,
            }),
            rid(),
            key(),
        ),
    ];
    let mut out = vec![admission()];
    out.extend(
        datas
            .into_iter()
            .map(|(d, r, s)| Envelope::new(d, t0(), r, s)),
    );
    out
}

#[test]
fn every_type_round_trips() {
    let events = every_event();
    let types: std::collections::HashSet<_> = events.iter().map(|e| e.event_type()).collect();
    assert_eq!(
        types.len(),
        EventType::all().count(),
        "a type is missing from the round-trip set"
    );
    for env in events {
        let bytes = env.encode();
        let back = Envelope::decode(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", env.event_type().as_str()));
        assert_eq!(back, env);
        assert_eq!(
            EventType::parse(env.event_type().as_str()),
            Some(env.event_type())
        );
    }
}

fn mutate(f: impl FnOnce(&mut serde_json::Value)) -> Result<Envelope, Error> {
    let mut v: serde_json::Value = serde_json::from_slice(&admission().encode()).unwrap();
    f(&mut v);
    Envelope::decode(&serde_json::to_vec(&v).unwrap())
}

#[test]
fn rejects_unknown_type_and_schema() {
    assert_eq!(
        mutate(|v| v["type"] = "usage.invented".into()),
        Err(Error::UnknownType("usage.invented".into()))
    );
    assert_eq!(
        mutate(|v| v["schema"] = 2.into()),
        Err(Error::UnsupportedSchema(2))
    );
    assert_eq!(
        mutate(|v| v["schema"] = 0.into()),
        Err(Error::UnsupportedSchema(0))
    );
}

#[test]
fn rejects_unknown_fields_naming_them() {
    let e = mutate(|v| v["extra"] = 1.into()).unwrap_err();
    assert!(e.to_string().contains("extra"), "{e}");
    let e = mutate(|v| v["data"]["estimate"]["dollars"] = 1.into()).unwrap_err();
    assert!(e.to_string().contains("dollars"), "{e}");
    assert_eq!(e.field(), Some("data.estimate.dollars"));
}

#[test]
fn rejects_invalid_values_naming_the_field() {
    let e = mutate(|v| v["data"]["estimate"]["cost"] = (-5).into()).unwrap_err();
    assert_eq!(e.field(), Some("data.estimate.cost"));
    let e = mutate(|v| v["data"]["estimate"]["cost"] = "5".into()).unwrap_err();
    assert_eq!(e.field(), Some("data.estimate.cost"));
    let e = mutate(|v| v["data"]["estimate"]["cost"] = 1.5.into()).unwrap_err();
    assert_eq!(
        e.field(),
        Some("data.estimate.cost"),
        "floats are not amounts"
    );
    let e = mutate(|v| v["subject"] = "KEY k1".into()).unwrap_err();
    assert_eq!(e.field(), Some("subject"));
    let e = mutate(|v| v["data"]["reason"] = "limit_exceeded".into()).unwrap_err();
    assert_eq!(e.field(), Some("data.reason"));
    let e = mutate(|v| v["data"]["chain"] = serde_json::json!(["user:u_7"])).unwrap_err();
    assert_eq!(e.field(), Some("data.chain"));
    let e = mutate(|v| {
        v.as_object_mut()
            .unwrap()
            .remove("request_id")
            .map(drop)
            .unwrap()
    })
    .unwrap_err();
    assert_eq!(e.field(), Some("request_id"));
    assert!(matches!(
        Envelope::decode(b"not json"),
        Err(Error::Malformed { .. })
    ));
    assert!(matches!(
        Envelope::decode(b"{}"),
        Err(Error::Malformed { .. })
    ));
}

#[test]
fn policy_without_positive_limit_is_invalid() {
    let mut env = every_event()
        .into_iter()
        .find(|e| e.event_type() == EventType::PolicyUpserted)
        .unwrap();
    if let EventData::PolicyUpserted(p) = &mut env.data {
        p.limit = 0;
    }
    assert_eq!(
        Envelope::decode(&env.encode()).unwrap_err().field(),
        Some("data.limit")
    );
}

#[test]
fn request_fold_counts_each_settlement_once() {
    let adm = admission();
    let mut view = RequestView::new("req-1");
    view.apply(&adm);
    assert_eq!(view.state, RequestState::Reserved);
    let mut chunk = Envelope::new(
        settled(false),
        t0(),
        Some("req-1".into()),
        Some(subj("key:k_1")),
    );
    if let EventData::UsageSettled(d) = &mut chunk.data {
        d.admission_id = Some(adm.id);
    }
    view.apply(&chunk);
    view.apply(&chunk);
    assert_eq!(view.settled.cost, 900);
    let mut last = Envelope::new(
        settled(true),
        t0(),
        Some("req-1".into()),
        Some(subj("key:k_1")),
    );
    if let EventData::UsageSettled(d) = &mut last.data {
        d.settlement_id = "req-1:1".into();
        d.admission_id = Some(adm.id);
    }
    view.apply(&last);
    assert_eq!(view.settled.cost, 1800);
    assert_eq!(view.state, RequestState::Settled);
    view.apply(&adm);
    assert_eq!(view.settlements.len(), 2);
    // A settlement of another decision for the same id is not this request's.
    let mut other = last.clone();
    other.id = Uuid::now_v7();
    if let EventData::UsageSettled(d) = &mut other.data {
        d.settlement_id = "req-1:2".into();
        d.admission_id = Some(Uuid::now_v7());
    }
    view.apply(&other);
    assert_eq!(view.settlements.len(), 2);
}
