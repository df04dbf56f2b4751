//! The node-mode workload state machine driven directly (no I/O, no waiting):
//! a table of event sequences with what is served after each, and a property
//! test against a naive model that recomputes what SPIRE grants from the whole
//! history of events.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use trustweave_sds::snapshot::{CertFacts, IdentitySnapshot, PrivateKeyDer, Svid, TrustBundle};
use trustweave_sds::workload::{
    served, BundleSet, Delegation, Event, Note, WorkloadState, WorkloadUpdate,
};

const AWS: &str = "aws.company.com";
const GCP: &str = "gcp.company.com";

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000 + secs)
}

/// An SVID of `id` with serial `serial`, valid until `t(until)`.
fn svid(id: &str, serial: u8, until: u64) -> Svid {
    Svid {
        spiffe_id: id.into(),
        chain_der: vec![vec![serial]],
        private_key: PrivateKeyDer::new(vec![serial]),
        leaf: CertFacts {
            serial_hex: format!("{serial:02x}"),
            not_before: t(0),
            not_after: t(until),
        },
    }
}

fn update(svids: Vec<Svid>, federates_with: &[&str]) -> WorkloadUpdate {
    WorkloadUpdate {
        svids,
        federates_with: federates_with.iter().map(|s| s.to_string()).collect(),
    }
}

fn bundles(domains: &[(&str, u8)]) -> Delegation {
    Delegation::Granted(Arc::new(
        domains
            .iter()
            .map(|(td, root)| {
                (
                    td.to_string(),
                    TrustBundle {
                        roots_der: vec![vec![*root]],
                    },
                )
            })
            .collect::<BundleSet>(),
    ))
}

/// (default serial, trusted domains with their root byte) of a snapshot.
fn shape(snapshot: &IdentitySnapshot) -> (Option<String>, Vec<(String, u8)>) {
    (
        snapshot.default.as_ref().map(|s| s.leaf.serial_hex.clone()),
        snapshot
            .bundles
            .iter()
            .map(|(td, b)| (td.clone(), b.roots_der[0][0]))
            .collect(),
    )
}

fn served_shape(
    state: &mut WorkloadState,
    event: Event,
    now: u64,
) -> (Option<String>, Vec<(String, u8)>) {
    shape(&state.handle(event, t(now)).publish)
}

fn trusts(domains: &[(&str, u8)]) -> Vec<(String, u8)> {
    domains.iter().map(|(td, r)| (td.to_string(), *r)).collect()
}

#[test]
fn an_empty_update_after_svids_withdraws_the_identity_and_its_federation() {
    let mut state = WorkloadState::new(bundles(&[(AWS, 1), (GCP, 2)]));
    let id = "spiffe://aws.company.com/ns/a/sa/w";
    assert_eq!(
        served_shape(
            &mut state,
            Event::Svids(update(vec![svid(id, 7, 100)], &[GCP])),
            1
        ),
        (Some("07".into()), trusts(&[(AWS, 1), (GCP, 2)]))
    );
    let outcome = state.handle(Event::Svids(update(vec![], &[])), t(2));
    assert_eq!(shape(&outcome.publish), (None, vec![]));
    assert!(outcome.publish.svids.is_empty());
    assert_eq!(outcome.notes, vec![Note::Withdrawn]);
    // A stream failure afterwards does not bring it back; a new grant does.
    assert_eq!(
        served_shape(&mut state, Event::StreamFailed, 3),
        (None, vec![])
    );
    assert_eq!(
        served_shape(
            &mut state,
            Event::Svids(update(vec![svid(id, 8, 100)], &[])),
            4
        ),
        (Some("08".into()), trusts(&[(AWS, 1)]))
    );
}

#[test]
fn last_good_survives_stream_failures_until_it_expires_and_trust_follows_bundles() {
    let mut state = WorkloadState::new(bundles(&[(AWS, 1), (GCP, 2)]));
    let id = "spiffe://aws.company.com/ns/a/sa/w";
    state.handle(Event::Svids(update(vec![svid(id, 7, 50)], &[GCP])), t(1));
    assert_eq!(state.next_expiry(t(1)), Some(t(50)));
    assert_eq!(
        served_shape(&mut state, Event::StreamFailed, 10),
        (Some("07".into()), trusts(&[(AWS, 1), (GCP, 2)]))
    );
    // A bundle change reaches the workload while its SVID stream is down.
    assert_eq!(
        served_shape(&mut state, Event::Node(bundles(&[(AWS, 1), (GCP, 3)])), 20),
        (Some("07".into()), trusts(&[(AWS, 1), (GCP, 3)]))
    );
    // Expiry is exact, and trust keeps following the bundles afterwards.
    let outcome = state.handle(Event::Tick, t(50));
    assert_eq!(
        shape(&outcome.publish),
        (None, trusts(&[(AWS, 1), (GCP, 3)]))
    );
    assert_eq!(outcome.notes, vec![Note::DefaultExpired]);
    assert_eq!(state.next_expiry(t(50)), None);
    assert_eq!(
        served_shape(&mut state, Event::Node(bundles(&[(AWS, 4), (GCP, 3)])), 60),
        (None, trusts(&[(AWS, 4), (GCP, 3)]))
    );
}

#[test]
fn expiry_is_rearmed_by_every_grant_not_read_once() {
    let mut state = WorkloadState::new(bundles(&[(AWS, 1)]));
    assert_eq!(state.next_expiry(t(0)), None);
    let id = "spiffe://aws.company.com/ns/a/sa/w";
    state.handle(Event::Svids(update(vec![svid(id, 1, 30)], &[])), t(1));
    assert_eq!(state.next_expiry(t(1)), Some(t(30)));
    state.handle(Event::Svids(update(vec![svid(id, 2, 60)], &[])), t(20));
    assert_eq!(state.next_expiry(t(20)), Some(t(60)));
}

#[test]
fn an_unregistered_workload_is_told_once_and_served_nothing_until_granted() {
    let mut state = WorkloadState::new(bundles(&[(AWS, 1)]));
    let first = state.handle(Event::Svids(update(vec![], &[])), t(1));
    assert_eq!(first.notes, vec![Note::Unregistered]);
    assert!(first.settled);
    assert_eq!(shape(&first.publish), (None, vec![]));
    let again = state.handle(Event::Svids(update(vec![], &[])), t(2));
    assert!(again.notes.is_empty());
    let id = "spiffe://aws.company.com/ns/a/sa/w";
    let granted = state.handle(Event::Svids(update(vec![svid(id, 3, 90)], &[])), t(3));
    assert_eq!(granted.notes, vec![Note::Attested(id.into())]);
}

#[test]
fn a_denied_or_revoked_delegation_serves_nothing_and_no_last_good() {
    let id = "spiffe://aws.company.com/ns/a/sa/w";
    let mut state = WorkloadState::new(bundles(&[(AWS, 1)]));
    state.handle(Event::Svids(update(vec![svid(id, 3, 90)], &[])), t(1));
    let denied = state.handle(Event::Denied, t(2));
    assert_eq!(shape(&denied.publish), (None, vec![]));
    assert_eq!(denied.notes, vec![Note::Denied]);

    let mut state = WorkloadState::new(bundles(&[(AWS, 1)]));
    state.handle(Event::Svids(update(vec![svid(id, 3, 90)], &[])), t(1));
    assert_eq!(
        served_shape(&mut state, Event::Node(Delegation::Revoked), 2),
        (None, vec![])
    );
    assert_eq!(
        served_shape(&mut state, Event::Node(bundles(&[(AWS, 1)])), 3),
        (Some("03".into()), trusts(&[(AWS, 1)]))
    );
}

#[test]
fn nothing_is_served_before_the_node_has_bundles_or_after_exit() {
    let id = "spiffe://aws.company.com/ns/a/sa/w";
    let mut state = WorkloadState::new(Delegation::Pending);
    assert_eq!(
        served_shape(
            &mut state,
            Event::Svids(update(vec![svid(id, 3, 90)], &[])),
            1
        ),
        (None, vec![])
    );
    assert_eq!(
        served_shape(&mut state, Event::Node(bundles(&[(AWS, 1)])), 2),
        (Some("03".into()), trusts(&[(AWS, 1)]))
    );
    let exited = state.handle(Event::Exited, t(3));
    assert_eq!(shape(&exited.publish), (None, vec![]));
    assert_eq!(exited.notes, vec![Note::Exited]);
    assert_eq!(
        served_shape(
            &mut state,
            Event::Svids(update(vec![svid(id, 4, 90)], &[])),
            4
        ),
        (None, vec![])
    );
}

#[test]
fn an_svid_whose_trust_domain_has_no_bundle_is_left_out_and_counted() {
    let mut state = WorkloadState::new(bundles(&[(AWS, 1)]));
    let outcome = state.handle(
        Event::Svids(update(
            vec![
                svid("spiffe://gcp.company.com/w", 1, 90),
                svid("spiffe://aws.company.com/w", 2, 90),
            ],
            &[],
        )),
        t(1),
    );
    // The pinned default is the first SVID: never replaced by another one.
    assert_eq!(outcome.publish.default, None);
    assert_eq!(outcome.publish.svids.len(), 1);
    assert!(outcome.notes.contains(&Note::WithoutBundle(1)));
}

// ---- property: the state machine equals a model computed from the history ----

#[derive(Clone, Debug)]
enum Step {
    Grant(u8, u64, bool),
    Empty,
    Fail,
    Deny,
    Bundles(u8),
    Revoke,
    Exit,
    Wait(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u8..4, 1u64..200, any::<bool>()).prop_map(|(s, ttl, fed)| Step::Grant(s, ttl, fed)),
        2 => Just(Step::Empty),
        2 => Just(Step::Fail),
        1 => Just(Step::Deny),
        3 => (0u8..4).prop_map(Step::Bundles),
        1 => Just(Step::Revoke),
        1 => Just(Step::Exit),
        4 => (1u64..100).prop_map(Step::Wait),
    ]
}

/// What SPIRE grants now, from the history alone: the last word on the
/// identity (grant, empty update, denial), the last word on the node, exit.
fn model(history: &[(Event, SystemTime)], now: SystemTime) -> IdentitySnapshot {
    if history.iter().any(|(e, _)| *e == Event::Exited) {
        return IdentitySnapshot::default();
    }
    let node = history
        .iter()
        .rev()
        .find_map(|(e, _)| match e {
            Event::Node(d) => Some(d.clone()),
            _ => None,
        })
        .unwrap_or(Delegation::Pending);
    let word = history.iter().rev().find_map(|(e, _)| match e {
        Event::Svids(u) => Some(Some(u.clone())),
        Event::Denied => Some(None),
        _ => None,
    });
    match (node, word) {
        (Delegation::Granted(b), Some(Some(u))) if !u.svids.is_empty() => served(&u, &b, now).0,
        _ => IdentitySnapshot::default(),
    }
}

proptest! {
    #[test]
    fn the_state_machine_serves_what_the_history_grants(steps in proptest::collection::vec(step(), 1..40)) {
        let id = "spiffe://aws.company.com/ns/a/sa/w";
        let mut state = WorkloadState::new(Delegation::Pending);
        let mut history: Vec<(Event, SystemTime)> = Vec::new();
        let mut clock = 0u64;
        for step in steps {
            let event = match step {
                Step::Grant(serial, ttl, fed) => Event::Svids(update(
                    vec![svid(id, serial, clock + ttl)],
                    if fed { &[GCP] } else { &[] },
                )),
                Step::Empty => Event::Svids(update(vec![], &[])),
                Step::Fail => Event::StreamFailed,
                Step::Deny => Event::Denied,
                Step::Bundles(root) => Event::Node(bundles(&[(AWS, root), (GCP, root + 10)])),
                Step::Revoke => Event::Node(Delegation::Revoked),
                Step::Exit => Event::Exited,
                Step::Wait(secs) => {
                    clock += secs;
                    Event::Tick
                }
            };
            let now = t(clock);
            history.push((event.clone(), now));
            let outcome = state.handle(event, now);
            prop_assert_eq!(&outcome.publish, &model(&history, now));
            // Never serves an expired SVID, never trusts a domain it was not granted.
            prop_assert!(outcome.publish.svids.iter().all(|s| !s.leaf.is_expired_at(now)));
            let allowed: BTreeSet<&str> = [AWS, GCP].into();
            prop_assert!(outcome.publish.bundles.keys().all(|td| allowed.contains(td.as_str())));
            if let Some(at) = state.next_expiry(now) {
                prop_assert!(at > now);
            }
        }
    }
}
