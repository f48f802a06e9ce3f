//! Every JSON message a device (or a seed updater) sends the hub: decoding arbitrary bytes must
//! never panic, and whatever decodes must survive a round trip unchanged.
#![no_main]

use drover_protocol::device::{CheckinRequest, EnrollRequest, ReportBatch};
use drover_protocol::seed::HowItWorkedOut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = serde_json::from_slice::<CheckinRequest>(data) {
        let again: CheckinRequest =
            serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(again, m);
    }
    if let Ok(m) = serde_json::from_slice::<EnrollRequest>(data) {
        let _ = drover_protocol::validate::device_type(&m.device_type);
        if let Ok(key) = drover_protocol::signing::ReleasePublicKey::parse(&m.public_key) {
            let message =
                drover_protocol::signing::enrolment_message(&m.public_key, &m.device_type);
            let _ = key.verify_raw(&message, &m.proof);
        }
    }
    if let Ok(m) = serde_json::from_slice::<ReportBatch>(data) {
        for r in &m.reports {
            let _ = drover_protocol::validate::release_version(&r.release);
            if let Some(output) = &r.output {
                let cut = drover_protocol::device::truncate_output(output, 1000);
                assert!(cut.len() <= 1000);
            }
        }
    }
    let _ = serde_json::from_slice::<HowItWorkedOut>(data);
});
