//! Reports made while the device is offline wait in the on-disk outbox, survive a restart of
//! the agent process, and reach the hub later, complete and in order.

use std::fs;

use drover_protocol::device::{Module, UpdatePhase};
use drover_test_support::{CuttingProxy, wait_until};

use crate::common::{Device, Fleet, PATIENCE, script_release};

#[tokio::test]
async fn reports_made_offline_are_delivered_later_in_order_across_a_restart() {
    let fleet = Fleet::sqlite().await;
    let proxy = CuttingProxy::forward(fleet.hub.hub.addr).await.unwrap();
    let device = Device::via(&fleet, &proxy);
    let (started, go, first_done) = (
        device.path("started"),
        device.path("go"),
        device.path("first-done"),
    );
    // The first try waits for the test to take the network away, then fails; the second
    // (after the retry backoff, still offline) succeeds.
    let body = format!(
        "#!/bin/sh\n\
         if [ ! -f {first_done} ]; then\n\
           touch {started}\n\
           while [ ! -f {go} ]; do sleep 0.02; done\n\
           touch {first_done}\n\
           echo the meter did not answer; exit 1\n\
         fi\n\
         echo second try fine\n",
        first_done = first_done.display(),
        started = started.display(),
        go = go.display(),
    );
    fleet
        .deploy("2", Module::Script, &script_release(&body))
        .await;
    let mut agent = device.spawn(None);
    let id = device.wait_enrolled().await;
    wait_until(PATIENCE, "update.sh to start", || async {
        started.exists().then_some(())
    })
    .await;

    proxy.set_offline(true);
    fs::write(&go, b"").unwrap();
    let offline = wait_until(PATIENCE, "the install to finish offline", || async {
        let status = device.status();
        (status.current_release.as_deref() == Some("2") && status.update.phase == UpdatePhase::Idle)
            .then_some(status)
    })
    .await;
    // At least the failure, and the second attempt's downloading, installing and success.
    assert!(offline.pending_reports >= 4, "{offline:?}");
    let seen = fleet.attempts(&id).await;
    assert!(
        seen.iter().all(|a| a.attempt == 1 && a.state != "failure"),
        "the hub heard nothing since going offline: {seen:?}"
    );

    // Restarted while still offline: the reports stay queued.
    agent.kill().await.unwrap();
    let starts_before = device.log().matches("drover-agent starting").count();
    let mut agent = device.spawn(None);
    wait_until(
        PATIENCE,
        "the restarted agent to fail a check-in",
        || async {
            let log = device.log();
            let after_restart = log
                .rsplit("drover-agent starting")
                .next()
                .unwrap_or_default()
                .to_string();
            (log.matches("drover-agent starting").count() > starts_before
                && after_restart.contains("check-in failed"))
            .then_some(())
        },
    )
    .await;
    assert_eq!(device.status().pending_reports, offline.pending_reports);

    proxy.set_offline(false);
    fleet.wait_current(&id, "2").await;
    let attempts = fleet
        .wait_attempts(&id, "the whole history", |a| {
            a.len() == 2 && a[1].state == "success"
        })
        .await;
    wait_until(PATIENCE, "an empty outbox", || async {
        (device.status().pending_reports == 0).then_some(())
    })
    .await;
    agent.kill().await.unwrap();

    let summary: Vec<(u32, Vec<&str>)> = attempts.iter().map(|a| (a.attempt, a.states())).collect();
    assert_eq!(
        summary,
        vec![
            (1, vec!["downloading", "installing", "failure"]),
            (2, vec!["downloading", "installing", "success"]),
        ]
    );
    assert_eq!(
        attempts[0].output.as_deref(),
        Some("the meter did not answer\n")
    );
    assert_eq!(attempts[1].output.as_deref(), Some("second try fine\n"));
    // In order by the device's clock and by when the hub received them.
    let events: Vec<_> = attempts.iter().flat_map(|a| a.events.iter()).collect();
    for pair in events.windows(2) {
        assert!(pair[0].at <= pair[1].at, "{events:?}");
        assert!(pair[0].received_at <= pair[1].received_at, "{events:?}");
    }
    let failure = &attempts[0].events[2];
    let success = &attempts[1].events[2];
    assert!(
        failure.received_at > failure.at && success.received_at >= failure.received_at,
        "delivered after going online"
    );
}
