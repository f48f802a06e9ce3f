//! The hub's HTTP APIs driven over real sockets against a real hub, on SQLite always and on
//! PostgreSQL when `DROVER_TEST_POSTGRES_URL` is set. The device side here is a small client
//! written from docs/protocol.md, not the agent, so that the protocol itself is what is tested.

#![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]

use drover_protocol::device::{
    CheckinRequest, DesiredState, EnrollRequest, Facts, Module, ReportBatch, ReportState,
    UpdateReport, UpdateStatus,
};
use drover_protocol::signing::{ReleaseSigningKey, enrolment_message};
use drover_test_support::{Api, Engine, TestHub, tar_gz, wait_until, zip};
use serde_json::{Value, json};
use std::time::Duration;

/// A device written from the protocol description.
struct TestDevice {
    http: reqwest::Client,
    base: String,
    key: ReleaseSigningKey,
    id: String,
    credential: String,
}

impl TestDevice {
    async fn enroll(hub: &TestHub, provisioning_key: &str) -> (u16, Value, TestDevice) {
        let key = ReleaseSigningKey::generate();
        let mut device = TestDevice {
            http: reqwest::Client::new(),
            base: hub.url.clone(),
            key,
            id: String::new(),
            credential: String::new(),
        };
        let (status, body) = device.enroll_again(provisioning_key).await;
        (status, body, device)
    }

    async fn enroll_again(&mut self, provisioning_key: &str) -> (u16, Value) {
        let public_key = self.key.public().to_string();
        let req = EnrollRequest {
            protocol: 1,
            provisioning_key: provisioning_key.into(),
            proof: self.key.sign_raw(&enrolment_message(&public_key, "rpi4")),
            public_key,
            device_type: "rpi4".into(),
            agent_version: "0.1.0".into(),
            facts: Facts {
                os: "Debian 12".into(),
                arch: "aarch64".into(),
                tags: vec!["shop".into()],
                ..Facts::default()
            },
        };
        let response = self
            .http
            .post(format!("{}/device/v1/enroll", self.base))
            .json(&req)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        if status == 200 {
            self.id = body["device_id"].as_str().unwrap().to_string();
            self.credential = body["credential"].as_str().unwrap().to_string();
        }
        (status, body)
    }

    async fn checkin(&self, etag: Option<&str>, current: Option<&str>) -> (u16, Value) {
        let req = CheckinRequest {
            protocol: 1,
            desired_etag: etag.map(String::from),
            current_release: current.map(String::from),
            agent_version: "0.1.0".into(),
            update: UpdateStatus::idle(),
            facts: None,
            telemetry: None,
        };
        let response = self
            .http
            .post(format!("{}/device/v1/checkin", self.base))
            .bearer_auth(&self.credential)
            .json(&req)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn desired(&self) -> DesiredState {
        let (status, body) = self.checkin(None, None).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).unwrap()
    }

    async fn report(&self, reports: Vec<UpdateReport>) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}/device/v1/reports", self.base))
            .bearer_auth(&self.credential)
            .json(&ReportBatch {
                protocol: 1,
                reports,
            })
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn download(&self, path: &str, range: Option<&str>) -> reqwest::Response {
        let mut request = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.credential);
        if let Some(range) = range {
            request = request.header("range", range);
        }
        request.send().await.unwrap()
    }
}

fn app_archive(version: &str) -> Vec<u8> {
    tar_gz(&[("app/VERSION", version.as_bytes(), 0o644)])
}

macro_rules! both_engines {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let hub = drover_test_support::TestHub::start(drover_test_support::Engine::Sqlite)
                        .await
                        .unwrap()
                        .unwrap();
                    super::$case(&hub).await;
                    hub.stop().await.unwrap();
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(hub) = drover_test_support::TestHub::start(drover_test_support::Engine::Postgres)
                        .await
                        .unwrap() else { return };
                    super::$case(&hub).await;
                    hub.stop().await.unwrap();
                }
            )*
        }
    };
}

mod auth_and_input;
mod device_protocol;
mod operators;
mod reports;
mod telemetry;

use auth_and_input::*;
use device_protocol::*;
use operators::*;
use reports::*;
use telemetry::*;

both_engines!(
    enrolment_accepted_and_pending,
    checkin_answers_204_until_something_changes,
    artifacts_download_with_ranges_and_only_to_their_fleet,
    reports_are_stored_once_and_shown_to_operators,
    requests_without_or_with_wrong_credentials_are_refused,
    bad_input_gets_clear_4xx_bodies,
    releases_must_be_signed_with_the_fleet_key,
    organizations_cannot_see_each_other,
    seed_protocol_devices_update_and_report,
    presence_and_fleet_status_follow_checkins,
    sites_answer_who_has_this_box,
    batches_are_stored_once_and_queryable,
    the_stream_stores_in_order_answers_when_asked_and_refuses_bad_messages,
    bad_frames_are_refused_and_nothing_is_stored,
    new_points_stream_live,
    energy_reports_handle_resets_replacements_and_freeze,
    a_site_report_counts_each_box_for_the_time_it_was_there,
    seed_meter_notifications_are_stored_once,
    telemetry_status_from_checkins_is_shown,
);
