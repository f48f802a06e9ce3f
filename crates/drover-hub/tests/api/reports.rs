//! Energy reports through the API: resets, replacements, freezing, CSV, and sites whose boxes
//! change.

use drover_protocol::reading::Reading;

use super::*;

pub(crate) fn register(meter: &str, ts: i64, value: i64) -> Reading {
    Reading {
        meter: drover_protocol::reading::MeterId::parse(meter).unwrap(),
        channel: drover_protocol::reading::Channel::EnergyImport,
        ts_ms: ts,
        value,
        scale: 0,
        clock: drover_protocol::reading::ClockState::Synced,
    }
}

pub(crate) async fn energy_reports_handle_resets_replacements_and_freeze(hub: &TestHub) {
    let api = hub.api();
    let (pk, _) = api.create_fleet("solar", true, 60).await.unwrap();
    let (_, _, device) = TestDevice::enroll(hub, &pk).await;
    let (month_start, _) = drover_hub_month("2026-10");
    let (status, _) = api
        .post(
            "/api/v1/sites",
            json!({"name": "house", "customer": "Kristina", "reporting_start": month_start + 86_400_000}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201);
    api.patch(
        &format!("/api/v1/devices/{}", device.id),
        json!({"site": "house"}),
    )
    .await
    .unwrap();
    // Day 2 of the month, 10:00: meter 1 counts 1 Wh per 2 s for 5 minutes, is reset to 0 and
    // counts on for 5 minutes; then nothing for 5 minutes; then meter 2 (the replacement)
    // counts 2 Wh per 2 s for 5 minutes.
    let t0 = month_start + 86_400_000 + 10 * 3_600_000;
    let mut readings = Vec::new();
    for i in 0..150 {
        readings.push(register("modbus-1", t0 + i * 2_000, 50_000 + i));
    }
    for i in 0..150 {
        readings.push(register("modbus-1", t0 + 300_000 + i * 2_000, i));
    }
    for i in 0..150 {
        readings.push(register(
            "modbus-2",
            t0 + 900_000 + i * 2_000,
            7_000 + 2 * i,
        ));
    }
    assert_eq!(device.send_batch(device.frame(1, readings)).await.0, 204);
    // 149 before the reset, 0 counted at the reset itself, 149 after; 298 from meter 2.
    let expected = 149 + 149 + 298;
    // The bridge flagged the reset as it stored it; the flag can be read back.
    let (_, m1_series) = api
        .get(&format!(
            "/api/v1/series?device={}&meter=modbus-1&channel=energy_import",
            device.id
        ))
        .await
        .unwrap();
    let (status, flags) = api
        .get(&format!("/api/v1/series/{}/flags", m1_series[0]["id"]))
        .await
        .unwrap();
    assert_eq!(status, 200, "{flags}");
    assert_eq!(flags.as_array().unwrap().len(), 1, "{flags}");
    assert_eq!(flags[0]["kind"], "reset");
    assert_eq!(
        (
            flags[0]["from_value"].as_f64(),
            flags[0]["to_value"].as_f64()
        ),
        (Some(50_149.0), Some(0.0))
    );
    assert_eq!(flags[0]["to_ts"], t0 + 300_000);
    let (_, none) = api
        .get(&format!(
            "/api/v1/series/{}/flags?to={}",
            m1_series[0]["id"],
            t0 + 298_000
        ))
        .await
        .unwrap();
    assert_eq!(
        none,
        json!([]),
        "a period that ends before the step has none"
    );

    let (status, report) = api
        .post(
            "/api/v1/reports",
            json!({"scope": "site", "subject": "house", "month": "2026-10"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{report}");
    let content = &report["content"];
    assert_eq!(
        content["energy_wh"].as_f64(),
        Some(f64::from(expected)),
        "{content}"
    );
    let meters = content["meters"].as_array().unwrap();
    assert_eq!(meters.len(), 2);
    let m1 = meters.iter().find(|m| m["meter"] == "modbus-1").unwrap();
    assert_eq!(m1["flags"][0]["kind"], "reset", "{m1}");
    assert_eq!(content["replacements"][0]["old_meter"], "modbus-1");
    assert_eq!(content["replacements"][0]["new_meter"], "modbus-2");
    // A month with 15 minutes of data is far from complete, and the silences are listed.
    let completeness = content["completeness_pct"].as_f64().unwrap();
    assert!(completeness < 1.0, "{completeness}");
    let m2_gaps = meters.iter().find(|m| m["meter"] == "modbus-2").unwrap()["gaps"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(m2_gaps, 2, "before and after its readings");
    assert_eq!(m1["gaps"].as_array().unwrap().len(), 2);

    // Since the reporting start (day 2): the same energy.
    let (_, since) = api
        .post(
            "/api/v1/reports",
            json!({"scope": "customer", "subject": "Kristina", "since_start": true}),
        )
        .await
        .unwrap();
    assert_eq!(
        since["content"]["energy_wh"].as_f64(),
        Some(f64::from(expected))
    );
    assert_eq!(since["content"]["from"], month_start + 86_400_000);

    // Freeze the month report; later data (a late batch for the same month) does not change it.
    let id = report["id"].as_i64().unwrap();
    let (status, frozen) = api
        .post(&format!("/api/v1/reports/{id}/freeze"), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{frozen}");
    let hash = frozen["sha256"].as_str().unwrap().to_string();
    assert_eq!(hash.len(), 64);
    assert_eq!(frozen["verified"], true);
    let late = vec![register("modbus-2", t0 + 1_200_000, 7_500)];
    assert_eq!(device.send_batch(device.frame(2, late)).await.0, 204);
    let (_, again) = api.get(&format!("/api/v1/reports/{id}")).await.unwrap();
    assert_eq!(
        again["content"]["energy_wh"].as_f64(),
        Some(f64::from(expected))
    );
    assert_eq!(again["sha256"], hash.as_str());
    assert_eq!(again["verified"], true);
    let (status, body) = api
        .post(&format!("/api/v1/reports/{id}/freeze"), json!({}))
        .await
        .unwrap();
    assert_eq!((status, body["error"].as_str()), (409, Some("conflict")));
    // A new report sees the late data.
    let (_, fresh) = api
        .post(
            "/api/v1/reports",
            json!({"scope": "site", "subject": "house", "month": "2026-10"}),
        )
        .await
        .unwrap();
    assert_eq!(
        fresh["content"]["energy_wh"].as_f64(),
        Some(f64::from(expected + (7_500 - 7_298)))
    );

    let response = api
        .client
        .get(format!("{}/api/v1/reports/{id}/csv", hub.url))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let csv = response.text().await.unwrap();
    assert!(csv.contains(&hash), "{csv}");
    assert!(csv.contains(&format!("total,,,{month_start},")), "{csv}");
    assert!(csv.contains("# gaps") && csv.contains("Reset"), "{csv}");

    let (status, body) = api
        .post(
            "/api/v1/reports",
            json!({"scope": "site", "subject": "house"}),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_period"))
    );
    let (status, body) = api
        .post(
            "/api/v1/reports",
            json!({"scope": "planet", "subject": "earth", "month": "2026-10"}),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_scope"))
    );
    let (status, _) = api.get("/api/v1/reports/99999").await.unwrap();
    assert_eq!(status, 404);
}

fn drover_hub_month(month: &str) -> (i64, i64) {
    let (y, m) = month.split_once('-').unwrap();
    let date = time::Date::from_calendar_date(
        y.parse().unwrap(),
        time::Month::try_from(m.parse::<u8>().unwrap()).unwrap(),
        1,
    )
    .unwrap();
    let start = date.midnight().assume_utc().unix_timestamp() * 1000;
    (start, start + 31 * 86_400_000)
}

/// Months of 2026-10: day 2 of the month at 10:00 UTC.
fn day_two(month_start: i64) -> i64 {
    month_start + 86_400_000 + 10 * 3_600_000
}

pub(crate) async fn a_site_report_counts_each_box_for_the_time_it_was_there(hub: &TestHub) {
    let api = hub.api();
    let (pk, _) = api.create_fleet("solar", true, 60).await.unwrap();
    let (_, _, old_box) = TestDevice::enroll(hub, &pk).await;
    let (_, _, new_box) = TestDevice::enroll(hub, &pk).await;
    for site in ["house", "workshop"] {
        let (status, _) = api
            .post(
                "/api/v1/sites",
                json!({"name": site, "customer": "Kristina"}),
            )
            .await
            .unwrap();
        assert_eq!(status, 201);
    }
    let (month_start, _) = drover_hub_month("2026-10");
    let t0 = day_two(month_start);
    let hour = 3_600_000;
    let set_site = async |device: &TestDevice, site: &str, since: i64| {
        api.patch(
            &format!("/api/v1/devices/{}", device.id),
            json!({"site": site, "site_since": since.to_string()}),
        )
        .await
        .unwrap()
    };
    // The old box is at the house from t0 (assigned later, backdated), fails after an hour
    // and goes to the workshop; the new box takes over at the house from t0 + 2 h. (A first
    // assignment without site_since counts from the device's first reading; see
    // energy_reports_handle_resets_replacements_and_freeze.)
    assert_eq!(set_site(&old_box, "house", t0).await.0, 200);
    assert_eq!(set_site(&old_box, "workshop", t0 + hour).await.0, 200);
    let (status, shown) = set_site(&new_box, "house", t0 + 2 * hour).await;
    assert_eq!((status, shown["site"].as_str()), (200, Some("house")));
    // Each box counts 1 Wh every 2 s for 30 minutes of each hour it reads.
    let counting = |meter: &str, from: i64, start_value: i64| -> Vec<Reading> {
        (0..900)
            .map(|i| register(meter, from + i * 2_000, start_value + i))
            .collect()
    };
    // (The old box's meter counts nothing between its two stretches.)
    let mut old_readings = counting("modbus-1", t0, 10_000);
    old_readings.extend(counting("modbus-1", t0 + 3 * hour, 10_899));
    assert_eq!(
        old_box.send_batch(old_box.frame(1, old_readings)).await.0,
        204
    );
    let new_readings = counting("modbus-2", t0 + 2 * hour, 500);
    assert_eq!(
        new_box.send_batch(new_box.frame(1, new_readings)).await.0,
        204
    );

    let (status, report) = api
        .post(
            "/api/v1/reports",
            json!({"scope": "site", "subject": "house", "month": "2026-10"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{report}");
    let content = &report["content"];
    // 899 Wh from each box while it was at the house; none of what the old box counted at
    // the workshop.
    assert_eq!(content["energy_wh"].as_f64(), Some(1_798.0), "{content}");
    assert_eq!(content["from"], month_start);
    let meters = content["meters"].as_array().unwrap();
    assert_eq!(meters.len(), 2, "{meters:?}");
    let part = |meter: &str| meters.iter().find(|m| m["meter"] == meter).unwrap();
    assert_eq!(
        (
            part("modbus-1")["from"].as_i64(),
            part("modbus-1")["to"].as_i64()
        ),
        (Some(t0), Some(t0 + hour))
    );
    assert_eq!(part("modbus-2")["from"].as_i64(), Some(t0 + 2 * hour));
    assert_eq!(part("modbus-1")["site"], "house");
    // The workshop gets the old box's second stretch.
    let (_, workshop) = api
        .post(
            "/api/v1/reports",
            json!({"scope": "site", "subject": "workshop", "month": "2026-10"}),
        )
        .await
        .unwrap();
    assert_eq!(workshop["content"]["energy_wh"].as_f64(), Some(899.0));
    // The customer's report is both sites.
    let (_, customer) = api
        .post(
            "/api/v1/reports",
            json!({"scope": "customer", "subject": "Kristina", "month": "2026-10"}),
        )
        .await
        .unwrap();
    assert_eq!(customer["content"]["energy_wh"].as_f64(), Some(2_697.0));

    // History is not rewritten: a change before the last one is refused, and so is a change
    // in the future or a site_since without a site.
    let (status, body) = set_site(&old_box, "house", t0 + 30 * 60_000).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("conflict")),
        "{body}"
    );
    let (status, body) = set_site(&old_box, "house", 4_102_444_800_000).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_site_since"))
    );
    let (status, body) = api
        .patch(
            &format!("/api/v1/devices/{}", old_box.id),
            json!({"site_since": "2026-10-01T00:00:00Z"}),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_site_since"))
    );
}
