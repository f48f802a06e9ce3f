//! Downloads against the real hub: a download cut part-way resumes with `Range` (the whole
//! agent, through a proxy that cuts the connection), and the downloader on its own: a garbled
//! part file, error answers that must never be saved as the artifact, and a body longer than
//! the signed size.

use std::fs;

use drover_agent::client::HubClient;
use drover_agent::crash::CrashPoints;
use drover_agent::download::{DownloadError, Downloader, part_path};
use drover_agent::layout::StateDir;
use drover_protocol::device::{Module, ReleaseOffer};
use drover_test_support::CuttingProxy;
use tokio_util::sync::CancellationToken;

use crate::common::{Device, Fleet, final_states};

const DOWNLOADS: &str = "/device/v1/artifacts/";

#[tokio::test]
async fn a_cut_download_resumes_with_a_range_request() {
    let fleet = Fleet::sqlite().await;
    let proxy = CuttingProxy::start(fleet.hub.hub.addr, DOWNLOADS, 50_000, 1)
        .await
        .unwrap();
    let device = Device::via(&fleet, &proxy);
    // A bare script, large enough to be cut part-way.
    let mut script = b"#!/bin/sh\necho big\n".to_vec();
    script.extend(std::iter::repeat_n(b'#', 200_000));
    script.push(b'\n');
    fleet.deploy("1.1", Module::Script, &script).await;
    let agent = device.start();
    let id = device.wait_enrolled().await;
    fleet.wait_current(&id, "1.1").await;
    agent.stop().await;

    assert_eq!(proxy.cuts_done(), 1);
    assert!(proxy.saw_range_request());
    let ranges: Vec<Option<String>> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with(DOWNLOADS))
        .map(|r| r.range)
        .collect();
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert_eq!(
        ranges[0], None,
        "the first request is for the whole artifact"
    );
    let offset: u64 = ranges[1]
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(offset > 0 && offset <= 50_000, "{ranges:?}");
    let attempts = fleet.attempts(&id).await;
    assert_eq!(attempts.len(), 1, "a cut is not a failed attempt");
    assert_eq!(final_states(&attempts), vec!["success"]);
    assert_eq!(attempts[0].output.as_deref(), Some("big\n"));
}

/// An enrolled device (enrolled by the agent itself, then stopped) and a downloader for it.
struct Rig {
    fleet: Fleet,
    proxy: CuttingProxy,
    device: Device,
    credential: String,
    client: HubClient,
}

impl Rig {
    async fn new() -> Rig {
        let fleet = Fleet::sqlite().await;
        let proxy = CuttingProxy::forward(fleet.hub.hub.addr).await.unwrap();
        let device = Device::via(&fleet, &proxy);
        let agent = device.start();
        device.wait_enrolled().await;
        agent.stop().await;
        let paths = StateDir::new(&device.config.state_dir);
        let credential = drover_agent::identity::load_enrolment(&paths)
            .unwrap()
            .unwrap()
            .credential;
        let client = HubClient::new(&device.config).unwrap();
        Rig {
            fleet,
            proxy,
            device,
            credential,
            client,
        }
    }

    /// An offer for `bytes` as the hub makes them (the release exists in the fleet).
    async fn offer(&self, version: &str, bytes: &[u8]) -> ReleaseOffer {
        self.fleet.release(version, Module::Script, bytes).await;
        self.unstored_offer(version, bytes)
    }

    /// A signed offer for bytes the hub does not have.
    fn unstored_offer(&self, version: &str, bytes: &[u8]) -> ReleaseOffer {
        let sha256 = drover_protocol::ids::sha256_hex(bytes);
        let mut offer = ReleaseOffer {
            version: version.into(),
            module: Module::Script,
            device_type: None,
            artifact_url: format!("{DOWNLOADS}{sha256}"),
            size: bytes.len() as u64,
            sha256,
            signature: String::new(),
        };
        offer.signature = offer.manifest().sign(&self.fleet.key);
        offer
    }

    fn dir(&self) -> std::path::PathBuf {
        self.device.path("downloads")
    }

    async fn fetch(&self, offer: &ReleaseOffer, credential: &str) -> Result<(), DownloadError> {
        let dir = self.dir();
        fs::create_dir_all(&dir).unwrap();
        let crash = CrashPoints::none();
        let cancel = CancellationToken::new();
        let downloader = Downloader {
            client: &self.client,
            credential,
            dir: &dir,
            crash: &crash,
            cancel: &cancel,
        };
        downloader.fetch(offer).await.map(|_| ())
    }

    fn ranges(&self) -> Vec<Option<String>> {
        self.proxy
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with(DOWNLOADS))
            .map(|r| r.range)
            .collect()
    }
}

#[tokio::test]
async fn a_garbled_part_file_is_downloaded_again_from_the_start() {
    let rig = Rig::new().await;
    let mut bytes = b"#!/bin/sh\n".to_vec();
    bytes.extend((0..5000u32).map(|i| (i % 251) as u8));
    let offer = rig.offer("1.0", &bytes).await;
    fs::create_dir_all(rig.dir()).unwrap();
    // What a power cut can leave: bytes on disk that are not the artifact's.
    fs::write(part_path(&rig.dir(), &offer.sha256), vec![0u8; 1000]).unwrap();
    rig.fetch(&offer, &rig.credential).await.unwrap();
    assert_eq!(fs::read(rig.dir().join(&offer.sha256)).unwrap(), bytes);
    assert!(!part_path(&rig.dir(), &offer.sha256).exists());
    assert_eq!(rig.ranges(), vec![Some("bytes=1000-".to_string()), None]);
    // Found verified on disk, it is not fetched again.
    rig.fetch(&offer, &rig.credential).await.unwrap();
    assert_eq!(rig.ranges().len(), 2);
}

#[tokio::test]
async fn error_answers_are_never_saved_as_the_artifact() {
    let rig = Rig::new().await;
    // Not a release of this fleet: 404, the attempt fails.
    let missing = rig.unstored_offer("1.0", b"#!/bin/sh\necho hi\n");
    let err = rig.fetch(&missing, &rig.credential).await.unwrap_err();
    assert!(matches!(err, DownloadError::Rejected(_)), "{err}");
    // A refused credential: try again later, nothing counted.
    let offer = rig.offer("1.1", b"#!/bin/sh\necho hello\n").await;
    let err = rig.fetch(&offer, "drv_d_notacredential").await.unwrap_err();
    assert!(matches!(err, DownloadError::Transient(_)), "{err}");
    assert!(err.to_string().contains("invalid_credential"), "{err}");
    assert_eq!(
        fs::read_dir(rig.dir()).unwrap().count(),
        0,
        "nothing was saved"
    );
}

#[tokio::test]
async fn a_body_longer_than_signed_is_rejected() {
    let rig = Rig::new().await;
    let bytes = b"#!/bin/sh\necho hi\n".to_vec();
    let mut offer = rig.offer("1.0", &bytes).await;
    offer.size -= 4;
    let err = rig.fetch(&offer, &rig.credential).await.unwrap_err();
    assert!(matches!(err, DownloadError::Rejected(_)), "{err}");
    assert!(err.to_string().contains("more than"), "{err}");
    assert_eq!(fs::read_dir(rig.dir()).unwrap().count(), 0);
}
