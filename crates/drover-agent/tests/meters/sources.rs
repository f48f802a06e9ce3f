//! Several sources started together through `meters::start`.

use std::time::Duration;

use drover_agent::meters::MetersConfig;
use drover_agent::meters::config::{CommandSourceConfig, SimulatedSourceConfig};
use drover_protocol::reading::Channel;

use crate::{Running, meters_in};

#[tokio::test]
async fn a_failing_source_does_not_stop_the_others_and_shutdown_saves_state() {
    let config = MetersConfig {
        command: vec![
            CommandSourceConfig {
                name: "broken".into(),
                command: "echo nonsense; exit 2".into(),
                interval: Duration::from_millis(100),
                ..CommandSourceConfig::default()
            },
            CommandSourceConfig {
                name: "inverter".into(),
                command: "echo 'inverter-7 power 1500'".into(),
                interval: Duration::from_millis(100),
                ..CommandSourceConfig::default()
            },
        ],
        simulated: vec![SimulatedSourceConfig {
            name: "roof".into(),
            interval: Duration::from_millis(100),
            ..SimulatedSourceConfig::default()
        }],
        ..MetersConfig::default()
    };
    let mut running = Running::start(&config);
    let mut seen = Vec::new();
    while !(seen.contains(&"inverter-7".to_string()) && seen.contains(&"sim-roof".to_string())) {
        let batch = running.next().await;
        if meters_in(&batch) == ["sim-roof"] {
            let channels: Vec<Channel> = batch.iter().map(|r| r.channel).collect();
            assert_eq!(
                channels,
                [Channel::EnergyImport, Channel::Power, Channel::VoltageL1]
            );
        }
        seen.extend(meters_in(&batch));
    }
    running.stop().await;
    let anchor = running.dir.path().join("meters").join("sim-roof.json");
    assert!(
        anchor.exists(),
        "the simulated register is saved at shutdown"
    );
}
