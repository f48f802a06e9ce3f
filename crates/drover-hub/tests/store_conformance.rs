//! The store conformance suite: the same cases against SQLite (always) and PostgreSQL (when
//! `DROVER_TEST_POSTGRES_URL` is set; CI always sets it), so that both engines keep exactly the
//! same behaviour behind the one `Store` interface.

#![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]

use drover_hub::store::SeriesFilter;
use drover_hub::store::{
    DeviceFilter, FleetPatch, Lander, NewDevice, NewFleet, NewRelease, Presence, Reported,
    SeedCheckin, SiteChange, SitePatch, SiteSpan, Store, StoreError,
};
use drover_hub::telemetry::energy::Anomaly;
use drover_hub::telemetry::fold::{FoldOutcome, IngestJob, IngestOutcome, Point, SeriesPoints};
use drover_hub::telemetry::rollup::{Resolution, aggregate};
use drover_protocol::artifact::ArtifactFormat;
use drover_protocol::device::{
    DeviceStatus, Facts, Module, ReportState, UpdatePhase, UpdateReport, UpdateStatus,
};
use drover_protocol::ids::{DeviceId, token_hash};
use drover_protocol::reading::{Channel, MeterId};
use drover_test_support::TestDatabase;

/// Holds whatever keeps a store's database alive for the test.
enum Guard {
    Dir(#[allow(dead_code, reason = "held for its Drop")] tempfile::TempDir),
    Db(#[allow(dead_code, reason = "held for its Drop")] TestDatabase),
}

async fn sqlite() -> (Store, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(dir.path()).await.unwrap();
    (store, Guard::Dir(dir))
}

async fn postgres() -> Option<(Store, Guard)> {
    let db = TestDatabase::create().await.unwrap()?;
    let store = Store::connect(&db.url).await.unwrap();
    Some((store, Guard::Db(db)))
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let (store, _guard) = super::sqlite().await;
                    super::cases::$case(&store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some((store, _guard)) = super::postgres().await else { return };
                    super::cases::$case(&store).await;
                    store.close().await;
                }
            )*
        }
    };
}

conformance!(
    migrations_are_recorded_and_device_types_counted,
    tokens_are_found_by_hash_and_revocable,
    fleet_names_are_unique_per_organization,
    fleet_settings_change_and_seed_secrets_come_and_go,
    devices_enrol_list_and_change_standing,
    reported_state_facts_and_presence_are_stored,
    releases_are_numbered_per_fleet_and_targets_resolve,
    reports_are_applied_once_in_order,
    seed_devices_appear_and_outcomes_are_recorded,
    organizations_cannot_reach_each_others_rows,
    sites_hold_devices_and_stay_in_their_organization,
    batches_fold_into_chunks_and_rollups_exactly_once,
    registers_going_backwards_are_flagged,
    series_are_filtered_and_kept_apart,
    small_batches_are_appended_then_recoded_into_the_same_data,
    landed_batches_wait_until_folded_then_fold_together,
    seed_readings_past_a_frames_limits_land_in_parts,
    landers_that_race_on_a_device_store_each_batch_once,
);

mod cases {
    use super::*;

    async fn org(store: &Store, name: &str) -> i64 {
        store.create_org(name).await.unwrap().id
    }

    async fn fleet(store: &Store, org_id: i64, name: &str) -> drover_hub::store::Fleet {
        let new = NewFleet {
            name: name.into(),
            auto_accept: true,
            release_key: None,
            poll_interval_s: 60,
        };
        store.create_fleet(org_id, &new).await.unwrap().0
    }

    fn new_device(fleet_id: i64, key: &str, credential: &str) -> NewDevice {
        NewDevice {
            fleet_id,
            device_type: "rpi4".into(),
            status: DeviceStatus::Pending,
            public_key: key.into(),
            credential_hash: token_hash(credential),
            agent_version: "0.1.0".into(),
            facts: Facts {
                os: "Debian 12".into(),
                arch: "aarch64".into(),
                tags: vec!["shop".into()],
                ..Facts::default()
            },
        }
    }

    fn new_release(version: &str, device_type: Option<&str>) -> NewRelease {
        NewRelease {
            version: version.into(),
            device_type: device_type.map(String::from),
            module: Module::App,
            sha256: "a".repeat(64),
            size: 10,
            format: ArtifactFormat::TarGz,
            signature: Some("sig".into()),
            notes: String::new(),
        }
    }

    pub async fn migrations_are_recorded_and_device_types_counted(store: &Store) {
        let a = org(store, "a").await;
        let f = fleet(store, a, "solar").await;
        store
            .create_device(a, &new_device(f.id, "k1", "c1"))
            .await
            .unwrap();
        store
            .record_device_type(a, "rpi4", "aarch64")
            .await
            .unwrap();
        store.record_device_type(a, "rpi4", "").await.unwrap();
        store
            .record_device_type(a, "x86-box", "x86_64")
            .await
            .unwrap();
        let types = store.list_device_types(a).await.unwrap();
        assert_eq!(
            types
                .iter()
                .map(|t| (t.name.as_str(), t.arch.as_str(), t.devices))
                .collect::<Vec<_>>(),
            vec![("rpi4", "aarch64", 1), ("x86-box", "x86_64", 0)]
        );
        let latest = drover_hub::store::migrations::MIGRATIONS
            .last()
            .unwrap()
            .version;
        assert_eq!(store.schema_version().await.unwrap(), latest);
    }

    pub async fn tokens_are_found_by_hash_and_revocable(store: &Store) {
        let org_id = org(store, "acme").await;
        let (token, text) = store.create_api_token(org_id, "ci", "admin").await.unwrap();
        assert!(text.starts_with("drv_o_"));
        let found = store.api_token_by_hash(&token_hash(&text)).await.unwrap();
        assert_eq!(found, Some(token.clone()));
        assert_eq!(store.api_token_by_hash("nope").await.unwrap(), None);
        let other = org(store, "other").await;
        assert!(!store.revoke_api_token(other, token.id).await.unwrap());
        assert!(store.revoke_api_token(org_id, token.id).await.unwrap());
        assert_eq!(
            store.api_token_by_hash(&token_hash(&text)).await.unwrap(),
            None
        );
    }

    pub async fn fleet_names_are_unique_per_organization(store: &Store) {
        let a = org(store, "a").await;
        let b = org(store, "b").await;
        fleet(store, a, "solar").await;
        let dup = NewFleet {
            name: "solar".into(),
            auto_accept: false,
            release_key: None,
            poll_interval_s: 60,
        };
        assert!(matches!(
            store.create_fleet(a, &dup).await,
            Err(StoreError::Conflict(_))
        ));
        store.create_fleet(b, &dup).await.unwrap();
        assert_eq!(store.list_fleets(a).await.unwrap().len(), 1);
        assert!(matches!(
            store.create_org("a").await,
            Err(StoreError::Conflict(_))
        ));
    }

    pub async fn fleet_settings_change_and_seed_secrets_come_and_go(store: &Store) {
        let a = org(store, "a").await;
        let (f, key) = store
            .create_fleet(
                a,
                &NewFleet {
                    name: "solar".into(),
                    auto_accept: false,
                    release_key: None,
                    poll_interval_s: 60,
                },
            )
            .await
            .unwrap();
        assert_eq!(
            store
                .fleet_by_provisioning_key(&key)
                .await
                .unwrap()
                .map(|f| f.id),
            Some(f.id)
        );
        let patch = FleetPatch {
            auto_accept: Some(true),
            poll_interval_s: Some(5),
            config: Some(serde_json::json!({"meter": {"name": "x"}})),
            seed_protocol: Some(true),
            ..FleetPatch::default()
        };
        let updated = store.update_fleet(a, f.id, &patch).await.unwrap();
        assert!(updated.auto_accept);
        assert_eq!(updated.poll_interval_s, 5);
        let secret = updated.seed_secret.clone().unwrap();
        assert_eq!(
            store
                .fleet_by_seed_secret(&secret)
                .await
                .unwrap()
                .map(|f| f.id),
            Some(f.id)
        );
        let again = store
            .update_fleet(
                a,
                f.id,
                &FleetPatch {
                    seed_protocol: Some(true),
                    ..FleetPatch::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(
            again.seed_secret,
            Some(secret.clone()),
            "turning on twice keeps the URL"
        );
        store
            .update_fleet(
                a,
                f.id,
                &FleetPatch {
                    seed_protocol: Some(false),
                    ..FleetPatch::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(store.fleet_by_seed_secret(&secret).await.unwrap(), None);
        let new_key = store.rotate_provisioning_key(a, f.id).await.unwrap();
        assert_eq!(store.fleet_by_provisioning_key(&key).await.unwrap(), None);
        assert!(
            store
                .fleet_by_provisioning_key(&new_key)
                .await
                .unwrap()
                .is_some()
        );
    }

    pub async fn devices_enrol_list_and_change_standing(store: &Store) {
        let a = org(store, "a").await;
        let f = fleet(store, a, "solar").await;
        let d1 = store
            .create_device(a, &new_device(f.id, "k1", "c1"))
            .await
            .unwrap();
        let d2 = store
            .create_device(a, &new_device(f.id, "k2", "c2"))
            .await
            .unwrap();
        assert_ne!(d1.id, d2.id);
        assert_eq!(d1.status, DeviceStatus::Pending);
        assert_eq!(d1.facts.tags, vec!["shop".to_string()]);
        assert!(matches!(
            store.create_device(a, &new_device(f.id, "k1", "c3")).await,
            Err(StoreError::Conflict(_))
        ));
        let by_cred = store.device_by_credential(&token_hash("c1")).await.unwrap();
        assert_eq!(by_cred.map(|d| d.id), Some(d1.id.clone()));
        assert!(
            store
                .set_device_status(a, &d1.id, DeviceStatus::Accepted)
                .await
                .unwrap()
        );
        let pending = DeviceFilter {
            status: Some(DeviceStatus::Pending),
            ..DeviceFilter::default()
        };
        let listed = store.list_devices(a, &pending).await.unwrap();
        assert_eq!(
            listed.iter().map(|d| &d.id).collect::<Vec<_>>(),
            vec![&d2.id]
        );
        assert!(
            store
                .set_device_status(a, &d2.id, DeviceStatus::Revoked)
                .await
                .unwrap()
        );
        let revoked = store.device(a, &d2.id).await.unwrap().unwrap();
        assert_eq!(revoked.status, DeviceStatus::Revoked);
        store
            .replace_credential(&d1.id, &token_hash("c9"))
            .await
            .unwrap();
        assert_eq!(
            store.device_by_credential(&token_hash("c1")).await.unwrap(),
            None
        );
        assert!(
            store
                .device_by_credential(&token_hash("c9"))
                .await
                .unwrap()
                .is_some()
        );
    }

    pub async fn reported_state_facts_and_presence_are_stored(store: &Store) {
        let a = org(store, "a").await;
        let f = fleet(store, a, "solar").await;
        let d = store
            .create_device(a, &new_device(f.id, "k1", "c1"))
            .await
            .unwrap();
        let reported = Reported {
            current_release: Some("1.0".into()),
            agent_version: "0.2.0".into(),
            update: UpdateStatus {
                phase: UpdatePhase::Held,
                release: Some("2.0".into()),
                failures: 3,
                message: Some("update.sh exited 1".into()),
            },
        };
        store.record_reported(&d.id, &reported).await.unwrap();
        let facts = Facts {
            os: "Debian 13".into(),
            ip: Some("192.168.1.7".into()),
            ..Facts::default()
        };
        store.record_facts(&d.id, &facts).await.unwrap();
        let presence = |at, ip: Option<&str>| Presence {
            at,
            remote_ip: ip.map(String::from),
            uptime_s: Some(77),
        };
        store
            .flush_presence(&[(d.id.clone(), presence(2_000, Some("10.0.0.1")))])
            .await
            .unwrap();
        // An older time arriving later (from another replica, say) never moves last_seen back.
        store
            .flush_presence(&[(d.id.clone(), presence(1_000, None))])
            .await
            .unwrap();
        let got = store.device(a, &d.id).await.unwrap().unwrap();
        assert_eq!(got.current_release.as_deref(), Some("1.0"));
        assert_eq!(got.update, reported.update);
        assert_eq!(got.facts.os, "Debian 13");
        assert_eq!(got.facts.ip.as_deref(), Some("192.168.1.7"));
        assert_eq!(got.facts.uptime_s, 77);
        assert_eq!(got.last_seen, Some(2_000));
        assert_eq!(got.remote_ip.as_deref(), Some("10.0.0.1"));
        let config = serde_json::json!({"x": 1});
        assert!(store.set_device_config(a, &d.id, &config).await.unwrap());
        assert!(store.bump_retry_generation(a, &d.id).await.unwrap());
        let got = store.device(a, &d.id).await.unwrap().unwrap();
        assert_eq!(got.config, config);
        assert_eq!(got.retry_generation, 1);
        assert!(got.retry_requested_at.is_some());
    }

    pub async fn releases_are_numbered_per_fleet_and_targets_resolve(store: &Store) {
        let a = org(store, "a").await;
        let f = fleet(store, a, "solar").await;
        let g = fleet(store, a, "wind").await;
        let r1 = store
            .create_release(a, f.id, &new_release("1.0", None))
            .await
            .unwrap();
        let r2 = store
            .create_release(a, f.id, &new_release("2.0", Some("rpi4")))
            .await
            .unwrap();
        let w1 = store
            .create_release(a, g.id, &new_release("1.0", None))
            .await
            .unwrap();
        assert_eq!((r1.seq, r2.seq, w1.seq), (1, 2, 1));
        assert!(matches!(
            store
                .create_release(a, f.id, &new_release("1.0", None))
                .await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(
            store.release_by_seq(a, f.id, 2).await.unwrap(),
            Some(r2.clone())
        );
        assert_eq!(
            store
                .list_releases(a, f.id)
                .await
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>(),
            vec![2, 1]
        );
        assert!(
            store
                .fleet_has_artifact(a, f.id, &"a".repeat(64))
                .await
                .unwrap()
        );
        assert!(
            !store
                .fleet_has_artifact(a, f.id, &"b".repeat(64))
                .await
                .unwrap()
        );

        store.set_fleet_target(a, &r1).await.unwrap();
        assert_eq!(
            store.target_for(a, f.id, "rpi3").await.unwrap(),
            Some(r1.clone())
        );
        store.set_fleet_target(a, &r2).await.unwrap();
        assert_eq!(
            store.target_for(a, f.id, "rpi4").await.unwrap(),
            Some(r2.clone())
        );
        assert_eq!(
            store.target_for(a, f.id, "rpi3").await.unwrap(),
            Some(r1.clone())
        );
        let f_now = store.fleet_by_id(a, f.id).await.unwrap().unwrap();
        assert_eq!(f_now.deploy_generation, 2);

        let err = store
            .update_fleet(
                a,
                f.id,
                &FleetPatch {
                    next_release_seq: Some(2),
                    ..FleetPatch::default()
                },
            )
            .await;
        assert!(matches!(err, Err(StoreError::Conflict(_))));
        store
            .update_fleet(
                a,
                f.id,
                &FleetPatch {
                    next_release_seq: Some(27),
                    ..FleetPatch::default()
                },
            )
            .await
            .unwrap();
        let r27 = store
            .create_release(a, f.id, &new_release("3.0", None))
            .await
            .unwrap();
        assert_eq!(r27.seq, 27);
        store
            .record_artifact(a, &"c".repeat(64), 5, Some(ArtifactFormat::Zip))
            .await
            .unwrap();
        assert_eq!(
            store.org_artifact(a, &"c".repeat(64)).await.unwrap(),
            Some((5, Some(ArtifactFormat::Zip)))
        );
    }

    fn report(seq: u64, release: &str, attempt: u32, state: ReportState) -> UpdateReport {
        UpdateReport {
            seq,
            at_ms: 1_000 + i64::try_from(seq).unwrap(),
            release: release.into(),
            attempt,
            state,
            message: Some(format!("step {seq}")),
            output: (state == ReportState::Failure).then(|| "boom".to_string()),
        }
    }

    pub async fn reports_are_applied_once_in_order(store: &Store) {
        let a = org(store, "a").await;
        let f = fleet(store, a, "solar").await;
        let d = store
            .create_device(a, &new_device(f.id, "k1", "c1"))
            .await
            .unwrap();
        let batch = vec![
            report(1, "2.0", 1, ReportState::Downloading),
            report(2, "2.0", 1, ReportState::Installing),
            report(3, "2.0", 1, ReportState::Failure),
        ];
        assert_eq!(store.apply_reports(a, &d.id, &batch).await.unwrap(), 3);
        // The same batch again (its answer was lost) changes nothing.
        assert_eq!(store.apply_reports(a, &d.id, &batch).await.unwrap(), 3);
        let more = vec![
            report(3, "2.0", 1, ReportState::Failure),
            report(4, "2.0", 2, ReportState::Success),
        ];
        assert_eq!(store.apply_reports(a, &d.id, &more).await.unwrap(), 4);
        let attempts = store.list_attempts(a, &d.id, 10).await.unwrap();
        assert_eq!(attempts.len(), 2);
        assert_eq!(attempts[0].attempt, 2);
        assert_eq!(attempts[0].state, "success");
        assert_eq!(attempts[1].state, "failure");
        assert_eq!(attempts[1].output.as_deref(), Some("boom"));
        assert_eq!(
            attempts[1]
                .events
                .iter()
                .map(|e| e.state.as_str())
                .collect::<Vec<_>>(),
            vec!["downloading", "installing", "failure"]
        );
        let (failures, last) = store.failures_since(a, &d.id, "2.0", 0).await.unwrap();
        assert_eq!(failures, 1);
        assert!(last.is_some());
    }

    pub async fn seed_devices_appear_and_outcomes_are_recorded(store: &Store) {
        let a = org(store, "a").await;
        let f = fleet(store, a, "solar").await;
        let g = fleet(store, a, "wind").await;
        let poll = SeedCheckin {
            device_id: DeviceId::parse("abcdefghjk").unwrap(),
            updater_version: "v1.8.1".into(),
            snapshot: 26,
            current_release: None,
            remote_ip: Some("203.0.113.9".into()),
        };
        let d = store.seed_checkin(a, f.id, false, &poll).await.unwrap();
        assert_eq!(d.status, DeviceStatus::Pending);
        assert_eq!(d.protocol, "seed");
        assert_eq!(d.seed_snapshot, Some(26));
        let again = store.seed_checkin(a, f.id, true, &poll).await.unwrap();
        assert_eq!(
            again.status,
            DeviceStatus::Pending,
            "the first answer sticks"
        );
        assert!(matches!(
            store.seed_checkin(a, g.id, true, &poll).await,
            Err(StoreError::Conflict(_))
        ));
        store
            .record_seed_outcome(a, &d.id, "3.0", false, "npm ERR!")
            .await
            .unwrap();
        store
            .record_seed_outcome(a, &d.id, "3.0", true, "ok")
            .await
            .unwrap();
        let attempts = store.list_attempts(a, &d.id, 10).await.unwrap();
        assert_eq!(
            attempts
                .iter()
                .map(|t| (t.attempt, t.state.as_str()))
                .collect::<Vec<_>>(),
            vec![(2, "success"), (1, "failure")]
        );
        let got = store.device(a, &d.id).await.unwrap().unwrap();
        assert_eq!(got.current_release.as_deref(), Some("3.0"));
    }

    pub async fn organizations_cannot_reach_each_others_rows(store: &Store) {
        let a = org(store, "a").await;
        let b = org(store, "b").await;
        let f = fleet(store, a, "solar").await;
        let d = store
            .create_device(a, &new_device(f.id, "k1", "c1"))
            .await
            .unwrap();
        let r = store
            .create_release(a, f.id, &new_release("1.0", None))
            .await
            .unwrap();
        assert_eq!(store.fleet_by_id(b, f.id).await.unwrap(), None);
        assert_eq!(store.fleet_by_name(b, "solar").await.unwrap(), None);
        assert_eq!(store.device(b, &d.id).await.unwrap(), None);
        assert!(
            store
                .list_devices(b, &DeviceFilter::default())
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.release_by_id(b, r.id).await.unwrap(), None);
        assert!(store.list_releases(b, f.id).await.unwrap().is_empty());
        assert!(
            !store
                .set_device_status(b, &d.id, DeviceStatus::Revoked)
                .await
                .unwrap()
        );
        assert!(
            !store
                .set_device_config(b, &d.id, &serde_json::json!({}))
                .await
                .unwrap()
        );
        assert!(store.list_attempts(b, &d.id, 10).await.unwrap().is_empty());
        assert!(store.apply_reports(b, &d.id, &[]).await.is_err());
        assert_eq!(store.org_artifact(b, &"a".repeat(64)).await.unwrap(), None);
        let still = store.device(a, &d.id).await.unwrap().unwrap();
        assert_eq!(still.status, DeviceStatus::Pending);
    }

    pub async fn sites_hold_devices_and_stay_in_their_organization(store: &Store) {
        let a = org(store, "a").await;
        let b = org(store, "b").await;
        let f = fleet(store, a, "solar").await;
        let d = store
            .create_device(a, &new_device(f.id, "k1", "c1"))
            .await
            .unwrap();
        let site = store
            .create_site(
                a,
                "kristinas-house",
                "Storgatan 1, Nyköping",
                "Kristina",
                Some(1_000),
            )
            .await
            .unwrap();
        assert!(matches!(
            store.create_site(a, "kristinas-house", "", "", None).await,
            Err(StoreError::Conflict(_))
        ));
        store
            .create_site(b, "kristinas-house", "", "", None)
            .await
            .unwrap();
        assert_eq!(
            store
                .set_device_site(a, &d.id, Some(site.id), Some(1_000))
                .await
                .unwrap(),
            SiteChange::Done
        );
        assert_eq!(
            store.device_site(a, &d.id).await.unwrap(),
            Some(site.clone())
        );
        assert_eq!(
            store.site_devices(a, site.id).await.unwrap(),
            vec![d.id.clone()]
        );
        assert_eq!(
            store.device(a, &d.id).await.unwrap().unwrap().site_id,
            Some(site.id)
        );
        assert_eq!(
            store
                .site_by_name(b, "kristinas-house")
                .await
                .unwrap()
                .map(|s| s.org_id),
            Some(b)
        );
        assert_eq!(store.site_by_id(b, site.id).await.unwrap(), None);
        assert_eq!(
            store
                .set_device_site(b, &d.id, None, Some(2_000))
                .await
                .unwrap(),
            SiteChange::NoDevice,
            "another organization's device"
        );
        // The site history: off the site at 5 000, back at 9 000; a change before the last
        // one is refused, one at the same instant replaces it.
        let span = |from, to| SiteSpan {
            device: d.id.to_string(),
            from,
            to,
        };
        assert_eq!(
            store.site_spans(a, site.id).await.unwrap(),
            vec![span(1_000, i64::MAX)]
        );
        let change = async |site_id, since| {
            store
                .set_device_site(a, &d.id, site_id, Some(since))
                .await
                .unwrap()
        };
        assert_eq!(change(None, 5_000).await, SiteChange::Done);
        assert_eq!(change(Some(site.id), 9_000).await, SiteChange::Done);
        assert_eq!(change(None, 8_000).await, SiteChange::BeforeLast(9_000));
        assert_eq!(
            store.site_spans(a, site.id).await.unwrap(),
            vec![span(1_000, 5_000), span(9_000, i64::MAX)]
        );
        let other = store.create_site(a, "shop", "", "", None).await.unwrap();
        assert_eq!(change(Some(other.id), 9_000).await, SiteChange::Done);
        assert_eq!(
            store.site_spans(a, site.id).await.unwrap(),
            vec![span(1_000, 5_000)]
        );
        assert_eq!(
            store.device(a, &d.id).await.unwrap().unwrap().site_id,
            Some(other.id)
        );
        assert_eq!(change(Some(site.id), 9_500).await, SiteChange::Done);
        assert!(store.site_spans(b, site.id).await.unwrap().is_empty());
        let patched = store
            .update_site(
                a,
                &site,
                &SitePatch {
                    customer: Some("Kristina K".into()),
                    reporting_start: Some(None),
                    ..SitePatch::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(patched.customer, "Kristina K");
        assert_eq!(patched.reporting_start, None);
        assert_eq!(
            store.list_sites(a, Some("Kristina K")).await.unwrap().len(),
            1
        );
        assert!(
            store
                .list_sites(a, Some("nobody"))
                .await
                .unwrap()
                .is_empty()
        );
    }

    fn job(org_id: i64, device: &DeviceId, seq: u64, series: Vec<SeriesPoints>) -> IngestJob {
        IngestJob {
            org_id,
            device: device.clone(),
            seq: Some(seq),
            series,
            bytes: 100,
            frame: None,
        }
    }

    fn energy(meter: &str, points: &[(i64, i64)]) -> SeriesPoints {
        SeriesPoints {
            meter: MeterId::parse(meter).unwrap(),
            channel: Channel::EnergyImport,
            scale: 0,
            points: points
                .iter()
                .map(|&(ts, value)| Point {
                    ts,
                    value,
                    clock: 0,
                })
                .collect(),
        }
    }

    async fn enrolled(store: &Store, name: &str) -> (i64, DeviceId) {
        let a = org(store, name).await;
        let f = fleet(store, a, "solar").await;
        let d = store
            .create_device(
                a,
                &new_device(f.id, &format!("k-{name}"), &format!("c-{name}")),
            )
            .await
            .unwrap();
        (a, d.id)
    }

    /// All points of a device's one series, as `(ts, value)`.
    async fn stored_points(store: &Store, org_id: i64) -> Vec<(i64, i64)> {
        let mut out = Vec::new();
        for s in store
            .list_series(org_id, &SeriesFilter::default())
            .await
            .unwrap()
        {
            let points = store.points(org_id, s.id, 0, i64::MAX).await.unwrap();
            out.extend(points.iter().map(|p| (p.ts, p.value)));
        }
        out.sort_unstable();
        out
    }

    pub async fn landed_batches_wait_until_folded_then_fold_together(store: &Store) {
        let (a, d) = enrolled(store, "a").await;
        let start = 3_600_000 * 10;
        let points: Vec<(i64, i64)> = (0..120).map(|i| (start + i * 2_000, 5_000 + i)).collect();
        let batch = |seq: u64| {
            let from = (seq as usize - 1) * 30;
            job(
                a,
                &d,
                seq,
                vec![energy("modbus-1", &points[from..from + 30])],
            )
        };
        // Landing acknowledges: sequence numbers are claimed, duplicates found, nothing folded.
        let outcomes = store
            .land_batches(&[batch(1), batch(2), batch(2), batch(3)])
            .await
            .unwrap();
        let landed = IngestOutcome::Landed { points: 30 };
        assert_eq!(
            outcomes,
            vec![
                landed,
                landed,
                IngestOutcome::Duplicate { last_seq: 2 },
                landed
            ]
        );
        assert_eq!(
            store.land_batches(&[batch(1)]).await.unwrap(),
            vec![IngestOutcome::Duplicate { last_seq: 3 }]
        );
        assert_eq!(store.landed_rows().await.unwrap(), 3);
        assert!(stored_points(store, a).await.is_empty());
        // A fold up to a row leaves what landed after it.
        let upto = store.newest_landed().await.unwrap().unwrap();
        assert_eq!(store.land_batches(&[batch(4)]).await.unwrap(), vec![landed]);
        let folded = store.fold_landed(Some(upto), usize::MAX).await.unwrap();
        assert_eq!(folded.rows, 3);
        assert_eq!(folded.live.len(), 90);
        assert_eq!(
            folded.outcomes,
            vec![
                FoldOutcome::Stored {
                    points: 30,
                    flags: 0
                };
                3
            ]
        );
        assert_eq!(store.landed_rows().await.unwrap(), 1);
        assert_eq!(stored_points(store, a).await, points[..90]);
        assert_eq!(store.fold_landed(Some(upto), 10).await.unwrap().rows, 0);
        assert_eq!(store.fold_landed(None, 10).await.unwrap().rows, 1);
        assert_eq!(store.fold_landed(None, 10).await.unwrap().rows, 0);
        assert_eq!(store.newest_landed().await.unwrap(), None);
        assert_eq!(stored_points(store, a).await, points);

        // Twenty small batches folded at once store what twenty separate folds would, in as
        // few rows: one appended piece per chunk and rollup row.
        let (b, e) = enrolled(store, "b").await;
        let many: Vec<(i64, i64)> = (0..600).map(|i| (start + i * 2_000, i)).collect();
        let jobs: Vec<IngestJob> = (0..20)
            .map(|k| {
                job(
                    b,
                    &e,
                    k + 1,
                    vec![energy(
                        "modbus-2",
                        &many[k as usize * 30..(k as usize + 1) * 30],
                    )],
                )
            })
            .collect();
        for j in &jobs {
            store.land_batches(std::slice::from_ref(j)).await.unwrap();
        }
        let folded = store.fold_landed(None, usize::MAX).await.unwrap();
        assert_eq!(folded.rows, 20);
        assert_eq!(stored_points(store, b).await, many);
        let s = store
            .list_series(b, &SeriesFilter::default())
            .await
            .unwrap()
            .remove(0);
        assert_eq!(s.points, 600);
        let rows = store.stored_rows(b, s.id, None).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].pieces, 1, "{rows:?}");
        // Each organization sees only its own.
        assert_eq!(stored_points(store, a).await, points);
    }

    pub async fn landers_that_race_on_a_device_store_each_batch_once(store: &Store) {
        // Two landers (two hub replicas' writers) remember what they claimed; each finds out
        // when the other claimed since, reads the device again, and no batch is stored twice.
        let (a, d) = enrolled(store, "a").await;
        let start = 3_600_000 * 10;
        let points: Vec<(i64, i64)> = (0..90).map(|i| (start + i * 2_000, 100 + i)).collect();
        let batch = |seq: u64| {
            let from = (seq as usize - 1) * 30;
            job(a, &d, seq, vec![energy("m", &points[from..from + 30])])
        };
        let outcomes = |landed: Vec<(IngestOutcome, usize)>| -> Vec<IngestOutcome> {
            landed.into_iter().map(|(o, _)| o).collect()
        };
        let landed = IngestOutcome::Landed { points: 30 };
        let duplicate = |last_seq| IngestOutcome::Duplicate { last_seq };
        let mut one = Lander::new(store.clone());
        let mut two = Lander::new(store.clone());
        assert_eq!(outcomes(one.land(&[batch(1)]).await.unwrap()), [landed]);
        assert_eq!(
            outcomes(two.land(&[batch(1)]).await.unwrap()),
            [duplicate(1)]
        );
        // `two` still knows the device at 1 when `one` claims 2.
        assert_eq!(outcomes(one.land(&[batch(2)]).await.unwrap()), [landed]);
        assert_eq!(
            outcomes(two.land(&[batch(2), batch(3)]).await.unwrap()),
            [duplicate(2), landed]
        );
        assert_eq!(
            outcomes(one.land(&[batch(3)]).await.unwrap()),
            [duplicate(3)]
        );
        // A batch without a number (the seed's JSON) lands whatever the claims do.
        let seed = IngestJob {
            seq: None,
            ..job(a, &d, 0, vec![energy("seed", &[(start, 1)])])
        };
        assert_eq!(
            outcomes(one.land(&[batch(3), seed]).await.unwrap()),
            [duplicate(3), IngestOutcome::Landed { points: 1 }]
        );
        assert_eq!(store.landed_rows().await.unwrap(), 4);
        while store.fold_landed(None, usize::MAX).await.unwrap().rows > 0 {}
        let mut stored = stored_points(store, a).await;
        stored.retain(|&(ts, value)| (ts, value) != (start, 1));
        assert_eq!(stored, points, "every batch once");
        let device = store.device(a, &d).await.unwrap().unwrap();
        assert_eq!(
            device.telemetry_bytes, 300,
            "three batches' bytes, each once"
        );
        assert_eq!(device.duplicate_points, 0);
        // Batch 3's readings again under a new number: stored once, and counted, since a
        // device should never do that. The seed's resends (no numbers) are not counted.
        let again = job(a, &d, 4, vec![energy("m", &points[60..])]);
        let seed_again = IngestJob {
            seq: None,
            ..job(a, &d, 0, vec![energy("seed", &[(start, 1)])])
        };
        one.land(&[again, seed_again]).await.unwrap();
        while store.fold_landed(None, usize::MAX).await.unwrap().rows > 0 {}
        let device = store.device(a, &d).await.unwrap().unwrap();
        assert_eq!(device.duplicate_points, 30);
        assert_eq!(stored_points(store, a).await.len(), 91);
        // A device that is not there: nothing is stored.
        let stranger = job(a, &DeviceId::parse("nobodyhere").unwrap(), 1, vec![]);
        assert_eq!(
            outcomes(one.land(&[stranger]).await.unwrap()),
            [duplicate(0)]
        );
    }

    pub async fn seed_readings_past_a_frames_limits_land_in_parts(store: &Store) {
        let (a, d) = enrolled(store, "a").await;
        let start = 3_600_000 * 10;
        // More meters than a frame holds, and one series with more readings than a frame.
        let mut series: Vec<SeriesPoints> = (0..300)
            .map(|m| energy(&format!("seed-{m}"), &[(start, m)]))
            .collect();
        let long: Vec<(i64, i64)> = (0..70_000).map(|i| (start + i * 1_000, i)).collect();
        series.push(energy("seed-long", &long));
        let seed = IngestJob {
            seq: None,
            ..job(a, &d, 0, series)
        };
        assert_eq!(
            store
                .land_batches(std::slice::from_ref(&seed))
                .await
                .unwrap(),
            vec![IngestOutcome::Landed { points: 70_300 }]
        );
        assert!(store.landed_rows().await.unwrap() >= 3);
        while store.fold_landed(None, usize::MAX).await.unwrap().rows > 0 {}
        let all = store
            .list_series(a, &SeriesFilter::default())
            .await
            .unwrap();
        assert_eq!(all.len(), 301);
        assert_eq!(all.iter().map(|s| s.points).sum::<i64>(), 70_300);
        // The same readings again (the seed resends) are deduplicated on meter and time.
        store.land_batches(&[seed]).await.unwrap();
        while store.fold_landed(None, usize::MAX).await.unwrap().rows > 0 {}
        let again = store
            .list_series(a, &SeriesFilter::default())
            .await
            .unwrap();
        assert_eq!(again.iter().map(|s| s.points).sum::<i64>(), 70_300);
    }

    pub async fn batches_fold_into_chunks_and_rollups_exactly_once(store: &Store) {
        let (a, d) = enrolled(store, "a").await;
        // Two minutes of 2-second readings, across an hour boundary (two chunks).
        let start = 3_600_000 * 10 - 60_000;
        let points: Vec<(i64, i64)> = (0..60).map(|i| (start + i * 2_000, 1_000 + i)).collect();
        let first = job(a, &d, 1, vec![energy("modbus-1", &points[..40])]);
        let (outcomes, live) = store
            .fold_batches(std::slice::from_ref(&first))
            .await
            .unwrap();
        assert_eq!(
            outcomes,
            vec![FoldOutcome::Stored {
                points: 40,
                flags: 0
            }]
        );
        assert_eq!(live.len(), 40);
        // The same batch again (its acknowledgement was lost) changes nothing.
        let (outcomes, _) = store.fold_batches(&[first]).await.unwrap();
        assert_eq!(outcomes, vec![FoldOutcome::Duplicate { last_seq: 1 }]);
        // A later batch overlapping the first (a resend with a new number) stores only the
        // new points; two batches in one group are both applied.
        let second = job(a, &d, 2, vec![energy("modbus-1", &points[30..50])]);
        let third = job(a, &d, 3, vec![energy("modbus-1", &points[50..])]);
        let (outcomes, _) = store.fold_batches(&[second, third]).await.unwrap();
        assert_eq!(
            outcomes,
            vec![
                FoldOutcome::Stored {
                    points: 10,
                    flags: 0
                },
                FoldOutcome::Stored {
                    points: 10,
                    flags: 0
                }
            ]
        );
        let series = store
            .list_series(a, &SeriesFilter::default())
            .await
            .unwrap();
        assert_eq!(series.len(), 1);
        let s = &series[0];
        assert_eq!(
            (s.points, s.first_ts, s.last_ts, s.last_value),
            (60, Some(start), Some(start + 118_000), Some(1_059))
        );
        assert_eq!(
            (s.channel.as_str(), s.unit.as_str()),
            ("energy_import", "Wh")
        );
        let stored = store.points(a, s.id, 0, i64::MAX).await.unwrap();
        assert_eq!(
            stored.iter().map(|p| (p.ts, p.value)).collect::<Vec<_>>(),
            points
        );
        let window = store
            .points(a, s.id, start + 60_000, start + 70_000)
            .await
            .unwrap();
        assert_eq!(window.len(), 5);
        let minutes = store
            .buckets(a, s.id, Resolution::Minute, 0, i64::MAX)
            .await
            .unwrap();
        assert_eq!(minutes, aggregate(&points, Resolution::Minute));
        let hours = store
            .buckets(a, s.id, Resolution::Hour, 0, i64::MAX)
            .await
            .unwrap();
        assert_eq!(hours.iter().map(|b| b.count).sum::<i64>(), 60);
        let (rows, stored_points, _bytes) = store.chunk_bytes().await.unwrap();
        assert_eq!((rows, stored_points), (2, 60));
        assert_eq!(
            store
                .point_before(a, s.id, start + 3_000, 60_000)
                .await
                .unwrap()
                .map(|p| p.ts),
            Some(start + 2_000)
        );
        // Retention removes whole windows only.
        assert_eq!(
            store.delete_older_than(None, 3_600_000 * 10).await.unwrap(),
            1
        );
        assert_eq!(store.points(a, s.id, 0, i64::MAX).await.unwrap().len(), 30);
        // Each resolution's rollups go by their own windows (a day of minutes, 30 days of
        // hours, 1000 days of days), and only that resolution's.
        let count =
            async |r: Resolution| store.buckets(a, s.id, r, 0, i64::MAX).await.unwrap().len();
        let (minutes, hours, days) = (
            count(Resolution::Minute).await,
            count(Resolution::Hour).await,
            count(Resolution::Day).await,
        );
        assert!(minutes > 0 && hours > 0 && days > 0);
        let far = 4_000 * 86_400_000;
        assert!(
            store
                .delete_older_than(Some(Resolution::Hour), far)
                .await
                .unwrap()
                > 0
        );
        assert_eq!(count(Resolution::Hour).await, 0);
        assert_eq!(count(Resolution::Minute).await, minutes);
        assert_eq!(count(Resolution::Day).await, days);
        assert!(
            store
                .delete_older_than(Some(Resolution::Day), far)
                .await
                .unwrap()
                > 0
        );
        assert_eq!(count(Resolution::Day).await, 0);
        assert_eq!(count(Resolution::Minute).await, minutes);
        let device = store.device(a, &d).await.unwrap().unwrap();
        assert_eq!(device.id, d);
    }

    pub async fn registers_going_backwards_are_flagged(store: &Store) {
        let (a, d) = enrolled(store, "a").await;
        let max = (1i64 << 32) - 1;
        store
            .fold_batches(&[job(
                a,
                &d,
                1,
                vec![energy("m", &[(0, 50_000), (2_000, 50_010)])],
            )])
            .await
            .unwrap();
        let (outcomes, _) = store
            .fold_batches(&[job(
                a,
                &d,
                2,
                vec![energy(
                    "m",
                    &[(4_000, 3), (6_000, 9), (8_000, max - 1), (10_000, 2)],
                )],
            )])
            .await
            .unwrap();
        assert_eq!(
            outcomes,
            vec![FoldOutcome::Stored {
                points: 4,
                flags: 2
            }]
        );
        let s = store
            .list_series(a, &SeriesFilter::default())
            .await
            .unwrap()
            .remove(0);
        let flags = store.flags(a, s.id, 0, i64::MAX).await.unwrap();
        assert_eq!(
            flags
                .iter()
                .map(|f| (f.kind, f.from_ts, f.to_ts))
                .collect::<Vec<_>>(),
            vec![
                (Anomaly::Reset, 2_000, 4_000),
                (Anomaly::Rollover, 8_000, 10_000)
            ]
        );
        // Instantaneous channels are never flagged.
        let power = SeriesPoints {
            channel: Channel::Power,
            ..energy("m", &[(12_000, 500), (14_000, -20)])
        };
        let (outcomes, _) = store
            .fold_batches(&[job(a, &d, 3, vec![power])])
            .await
            .unwrap();
        assert_eq!(
            outcomes,
            vec![FoldOutcome::Stored {
                points: 2,
                flags: 0
            }]
        );
    }

    pub async fn series_are_filtered_and_kept_apart(store: &Store) {
        let (a, d) = enrolled(store, "a").await;
        let (b, e) = enrolled(store, "b").await;
        store
            .fold_batches(&[
                job(
                    a,
                    &d,
                    1,
                    vec![energy("m1", &[(0, 1)]), energy("m2", &[(0, 1)])],
                ),
                job(b, &e, 1, vec![energy("m1", &[(0, 1)])]),
            ])
            .await
            .unwrap();
        let mine = store
            .list_series(a, &SeriesFilter::default())
            .await
            .unwrap();
        assert_eq!(mine.len(), 2);
        let filtered = SeriesFilter {
            meter: Some("m2".into()),
            ..SeriesFilter::default()
        };
        assert_eq!(store.list_series(a, &filtered).await.unwrap().len(), 1);
        let tagged = SeriesFilter {
            tag: Some("shop".into()),
            ..SeriesFilter::default()
        };
        assert_eq!(store.list_series(a, &tagged).await.unwrap().len(), 2);
        let untagged = SeriesFilter {
            tag: Some("home".into()),
            ..SeriesFilter::default()
        };
        assert!(store.list_series(a, &untagged).await.unwrap().is_empty());
        // A tag is matched exactly: `_` is no wildcard, case counts, no partial words.
        let facts = Facts {
            tags: vec!["shop".into(), "pv_roof".into()],
            ..Facts::default()
        };
        store.record_facts(&d, &facts).await.unwrap();
        let tag = |t: &str| SeriesFilter {
            tag: Some(t.into()),
            ..SeriesFilter::default()
        };
        assert_eq!(
            store.list_series(a, &tag("pv_roof")).await.unwrap().len(),
            2
        );
        for other in ["pvXroof", "Shop", "sho", "pv"] {
            assert!(
                store.list_series(a, &tag(other)).await.unwrap().is_empty(),
                "{other}"
            );
        }
        let theirs = store
            .list_series(b, &SeriesFilter::default())
            .await
            .unwrap();
        assert_eq!(theirs.len(), 1);
        assert_eq!(store.series_by_id(b, mine[0].id).await.unwrap(), None);
        assert!(
            store
                .points(b, mine[0].id, 0, i64::MAX)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .buckets(b, mine[0].id, Resolution::Minute, 0, i64::MAX)
                .await
                .unwrap()
                .is_empty()
        );
        // A batch claiming another organization's device stores nothing.
        let (outcomes, _) = store
            .fold_batches(&[job(b, &d, 9, vec![energy("m9", &[(0, 1)])])])
            .await
            .unwrap();
        assert_eq!(outcomes, vec![FoldOutcome::Duplicate { last_seq: 0 }]);
    }

    pub async fn small_batches_are_appended_then_recoded_into_the_same_data(store: &Store) {
        use drover_hub::store::{CHUNK_MAX_PIECES, CHUNK_WINDOW_MS, ROLLUP_MAX_PIECES};
        use drover_hub::telemetry::rollup::RESOLUTIONS;
        let (a, d) = enrolled(store, "a").await;
        let power = |points: &[(i64, i64)]| SeriesPoints {
            channel: Channel::Power,
            ..energy("m", points)
        };
        // Three hours and fifty minutes of a 2-second power reading, in one-minute batches of 30.
        let start = CHUNK_WINDOW_MS * 100;
        let all: Vec<(i64, i64)> = (0..6900)
            .map(|i| (start + i * 2_000, (i * 7_919) % 1_000 - 300))
            .collect();
        let batches: Vec<&[(i64, i64)]> = all.chunks(30).collect();
        let mut seq = 0;
        let mut next = |points: &[(i64, i64)]| {
            seq += 1;
            job(a, &d, seq, vec![power(points)])
        };
        // In the second hour every tenth batch is held back and comes last (out of order: the
        // slow path), and some pairs of batches are stored in one group. The first hour is
        // only ever appended to, and the third stays open.
        let mut late = Vec::new();
        let mut i = 0;
        while i < batches.len() {
            if i % 10 == 5 && (60..120).contains(&i) {
                late.push(batches[i]);
                i += 1;
            } else if i % 10 == 7 && i + 1 < batches.len() {
                let group = [next(batches[i]), next(batches[i + 1])];
                let (outcomes, _) = store.fold_batches(&group).await.unwrap();
                assert_eq!(outcomes.len(), 2);
                i += 2;
            } else {
                let (outcomes, live) = store.fold_batches(&[next(batches[i])]).await.unwrap();
                assert_eq!(
                    outcomes,
                    vec![FoldOutcome::Stored {
                        points: 30,
                        flags: 0
                    }]
                );
                assert_eq!(live.len(), 30);
                i += 1;
            }
        }
        let group: Vec<IngestJob> = late.iter().map(|points| next(points)).collect();
        let (outcomes, _) = store.fold_batches(&group).await.unwrap();
        assert!(
            outcomes.iter().all(|o| *o
                == FoldOutcome::Stored {
                    points: 30,
                    flags: 0
                }),
            "{outcomes:?}"
        );
        // The open hour, appended to 45 times, was re-coded on the way.
        let s = store
            .list_series(a, &SeriesFilter::default())
            .await
            .unwrap()
            .remove(0);
        let open = store.stored_rows(a, s.id, None).await.unwrap().remove(3);
        assert!((2..CHUNK_MAX_PIECES).contains(&open.pieces), "{open:?}");
        // A resend under a new number, and one overlapping the end, add only what is new.
        let mut overlap = all[6_880..].to_vec();
        overlap.push((start + 6_900 * 2_000, 7));
        let (outcomes, _) = store
            .fold_batches(&[next(batches[40]), next(&overlap)])
            .await
            .unwrap();
        assert_eq!(
            outcomes,
            vec![
                FoldOutcome::Stored {
                    points: 0,
                    flags: 0
                },
                FoldOutcome::Stored {
                    points: 1,
                    flags: 0
                }
            ]
        );
        let mut expected = all.clone();
        expected.push((start + 6_900 * 2_000, 7));
        let s = store
            .list_series(a, &SeriesFilter::default())
            .await
            .unwrap()
            .remove(0);
        assert_eq!(
            (s.points, s.first_ts, s.last_ts, s.last_value),
            (6_901, Some(start), Some(start + 13_800_000), Some(7))
        );
        let stored = store.points(a, s.id, 0, i64::MAX).await.unwrap();
        assert_eq!(
            stored.iter().map(|p| (p.ts, p.value)).collect::<Vec<_>>(),
            expected
        );
        for resolution in RESOLUTIONS {
            assert_eq!(
                store
                    .buckets(a, s.id, resolution, 0, i64::MAX)
                    .await
                    .unwrap(),
                aggregate(&expected, resolution),
                "{resolution:?}"
            );
            for row in store.stored_rows(a, s.id, Some(resolution)).await.unwrap() {
                assert!(row.pieces < ROLLUP_MAX_PIECES, "{resolution:?} {row:?}");
            }
        }
        // The closed hours are stored as one chunk each, as compact as coding them at once.
        let rows = store.stored_rows(a, s.id, None).await.unwrap();
        assert_eq!(rows.len(), 4, "{rows:?}");
        for (hour, row) in rows.iter().enumerate().take(3) {
            let from = start + hour as i64 * CHUNK_WINDOW_MS;
            let points = store
                .points(a, s.id, from, from + CHUNK_WINDOW_MS)
                .await
                .unwrap();
            assert_eq!(points.len(), 1_800);
            let one = drover_hub::telemetry::chunk::encode_points(&points);
            assert_eq!((row.pieces, row.bytes), (1, one.len() as i64), "{row:?}");
        }
        assert_eq!(
            rows[3].pieces, 1,
            "the overlap went down the slow path: {:?}",
            rows[3]
        );
    }
}
