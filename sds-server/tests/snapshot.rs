//! What the Workload API sends, turned into a snapshot: served as sent (not
//! yet valid included), withdrawn exactly at expiry, refused whole when it
//! cannot be served; the single owner never loses a rotation; metrics read the
//! snapshot at scrape.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use tokio::sync::watch;
use trustweave_sds::metrics::Metrics;
use trustweave_sds::published::Published;
use trustweave_sds::render::SecretNames;
use trustweave_sds::snapshot::{IdentitySnapshot, PrivateKeyDer, SnapshotError, Svid, TrustBundle};
use trustweave_sds::source::IdentityOwner;

const ID: &str = "spiffe://gcp.company.com/ns/a/sa/w";

/// A self-signed leaf for `id`, valid from `from` to `until` (seconds from now).
fn leaf(id: &str, from: i64, until: i64) -> (Vec<u8>, Vec<u8>) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.try_into().expect("uri"))];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::seconds(from);
    params.not_after = now + time::Duration::seconds(until);
    let cert = params.self_signed(&key).expect("cert");
    (cert.der().to_vec(), key.serialize_der())
}

fn svid(id: &str, from: i64, until: i64) -> Svid {
    let (der, key) = leaf(id, from, until);
    Svid::new(id.into(), vec![der], PrivateKeyDer::new(key)).expect("valid SVID")
}

fn bundles(domains: &[&str]) -> BTreeMap<String, TrustBundle> {
    domains
        .iter()
        .map(|td| {
            let (root, _) = leaf(&format!("spiffe://{td}"), -60, 3600);
            (
                td.to_string(),
                TrustBundle {
                    roots_der: vec![root],
                },
            )
        })
        .collect()
}

#[test]
fn a_not_yet_valid_svid_is_served_as_sent() {
    // Thirty seconds of clock skew between agent and node must not be an outage.
    let s = IdentitySnapshot::from_parts(
        vec![svid(ID, 30, 3600)],
        bundles(&["gcp.company.com"]),
        SystemTime::now(),
    )
    .expect("served");
    assert_eq!(s.default_svid().map(|d| d.spiffe_id.as_str()), Some(ID));
}

#[test]
fn unservable_material_is_refused_whole() {
    let (der, _) = leaf(ID, -60, 3600);
    let (_, other_key) = leaf(ID, -60, 3600);
    let mismatch = Svid::new(ID.into(), vec![der.clone()], PrivateKeyDer::new(other_key));
    assert_eq!(
        mismatch.expect_err("key of another certificate"),
        SnapshotError::KeyMismatch {
            spiffe_id: ID.into()
        }
    );
    let garbage = Svid::new(
        ID.into(),
        vec![b"not a certificate".to_vec()],
        PrivateKeyDer::new(vec![1]),
    );
    assert!(matches!(garbage, Err(SnapshotError::BadCertificate { .. })));
    let no_bundle = IdentitySnapshot::from_parts(
        vec![svid(ID, -60, 3600)],
        bundles(&["aws.company.com"]),
        SystemTime::now(),
    );
    assert!(matches!(no_bundle, Err(SnapshotError::NoBundle { .. })));
    let mut bad_root = bundles(&["gcp.company.com"]);
    bad_root.insert(
        "aws.company.com".into(),
        TrustBundle {
            roots_der: vec![b"junk".to_vec()],
        },
    );
    let bad = IdentitySnapshot::from_parts(vec![svid(ID, -60, 3600)], bad_root, SystemTime::now());
    assert!(
        matches!(bad, Err(SnapshotError::BadCertificate { ref owner, .. }) if owner == "aws.company.com")
    );
    assert_eq!(
        IdentitySnapshot::from_parts(vec![], bundles(&["gcp.company.com"]), SystemTime::now()),
        Err(SnapshotError::NoSvid)
    );
}

fn owner() -> (IdentityOwner, watch::Receiver<Arc<Published>>, Arc<Metrics>) {
    let names = SecretNames::default();
    let (tx, rx) = watch::channel(Arc::new(Published::now(
        IdentitySnapshot::default(),
        &names,
    )));
    let metrics = Arc::new(Metrics::new(rx.clone()));
    (
        IdentityOwner::new(tx, names, Arc::clone(&metrics)),
        rx,
        metrics,
    )
}

#[tokio::test]
async fn the_single_owner_never_loses_a_rotation_and_withdraws_at_expiry() {
    let (owner, rx, metrics) = owner();
    assert!(
        !metrics.encode().contains("svid_expiry_seconds"),
        "absent, not zero, without an SVID"
    );
    let short = svid(ID, -60, 2);
    owner.on_context(IdentitySnapshot::from_parts(
        vec![short],
        bundles(&["gcp.company.com"]),
        SystemTime::now(),
    ));
    assert!(metrics
        .encode()
        .contains("trustweave_sds_svid_expiry_seconds"));
    // A rotation arrives; then the old SVID's expiry passes: the rotation stays.
    let rotated = svid(ID, -60, 3600);
    let serial = rotated.leaf.serial_hex.clone();
    owner.on_context(IdentitySnapshot::from_parts(
        vec![rotated],
        bundles(&["gcp.company.com"]),
        SystemTime::now(),
    ));
    owner.expire(SystemTime::now() + Duration::from_secs(3));
    assert_eq!(
        rx.borrow()
            .snapshot
            .default_svid()
            .map(|s| s.leaf.serial_hex.clone()),
        Some(serial)
    );
    // Refused material keeps the last good identity and is counted.
    owner.on_context(Err(SnapshotError::KeyMismatch {
        spiffe_id: ID.into(),
    }));
    assert!(rx.borrow().snapshot.default_svid().is_some());
    assert!(metrics
        .encode()
        .contains("trustweave_sds_workload_api_rejected_total{reason=\"key_mismatch\"} 1"));
    // At expiry the default is withdrawn.
    owner.expire(SystemTime::now() + Duration::from_secs(7200));
    assert!(rx.borrow().snapshot.default_svid().is_none());
    assert!(!metrics.encode().contains("svid_expiry_seconds"));
}
