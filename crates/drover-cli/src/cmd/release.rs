//! `drover keys`, `drover release` and `drover deploy`: signing keys, signed uploads, deploys.
//!
//! Signing happens here, on the operator's machine; the secret key never goes to the hub.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use drover_protocol::device::Module;
use drover_protocol::signing::{ReleaseManifest, ReleaseSigningKey};
use drover_protocol::validate;
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::field;
use crate::Ctx;
use crate::client::HubClient;
use crate::table;

/// The release key file used when none is named.
pub const DEFAULT_KEY_FILE: &str = "release.key";

/// `drover keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a release signing key: the secret half goes to a 0600 file, the public half is
    /// printed for 'drover fleet create/set --release-key'.
    Generate {
        /// Where to write the secret key.
        #[arg(long, default_value = DEFAULT_KEY_FILE)]
        out: PathBuf,
        /// Overwrite an existing key file (releases signed with the old key stop verifying).
        #[arg(long)]
        force: bool,
    },
    /// Print the public key of a key file.
    Public {
        /// The secret key file.
        #[arg(long, default_value = DEFAULT_KEY_FILE, env = "DROVER_RELEASE_KEY")]
        key: PathBuf,
    },
}

/// `app` or `script`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModuleArg {
    /// Unpacked into releases/<version>, switched by an atomic symlink, health-checked, rolled
    /// back on failure.
    App,
    /// An archive with update.sh (or a bare script), run with a timeout.
    Script,
}

impl From<ModuleArg> for Module {
    fn from(m: ModuleArg) -> Module {
        match m {
            ModuleArg::App => Module::App,
            ModuleArg::Script => Module::Script,
        }
    }
}

/// `drover release ...`.
#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Sign an artifact, upload it (with progress) and create a release.
    Create(CreateArgs),
    /// List a fleet's releases.
    List {
        /// The fleet.
        #[arg(long)]
        fleet: String,
    },
}

/// `drover release create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The fleet.
    #[arg(long)]
    pub fleet: String,
    /// The release version (unique in the fleet).
    #[arg(long)]
    pub version: String,
    /// The install module.
    #[arg(long, value_enum)]
    pub module: ModuleArg,
    /// The device type it is for (default: any).
    #[arg(long)]
    pub device_type: Option<String>,
    /// Release notes.
    #[arg(long, default_value = "")]
    pub notes: String,
    /// The secret release key file.
    #[arg(long, default_value = DEFAULT_KEY_FILE, env = "DROVER_RELEASE_KEY")]
    pub key: PathBuf,
    /// Do not show a progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// The artifact: a .tar.gz or .zip archive, or a shell script (script module).
    pub file: PathBuf,
}

/// `drover deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The fleet.
    #[arg(long)]
    pub fleet: String,
    /// The release version.
    #[arg(long)]
    pub release: String,
    /// Deploy to this device only (pins the release to it).
    #[arg(long)]
    pub device: Option<String>,
}

/// Runs `drover keys ...`.
pub async fn keys(ctx: &Ctx, command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::Generate { out, force } => {
            if out.exists() && !force {
                bail!(
                    "{} already exists; releases signed with it would stop verifying if it were replaced (use --force to replace it anyway)",
                    out.display()
                );
            }
            let key = ReleaseSigningKey::generate();
            write_secret(&out, key.to_text().as_bytes())?;
            let public = key.public().to_string();
            if ctx.json() {
                ctx.print_json(&json!({"key_file": out, "public_key": public}))?;
            } else {
                println!(
                    "Wrote the secret release key to {} (mode 0600). Keep it safe and off the hub.",
                    out.display()
                );
                println!("Public key (give it to your fleet with --release-key):");
                println!("  {public}");
            }
        }
        KeysCommand::Public { key } => {
            println!("{}", load_key(&key)?.public());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_secret(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    drover_hub::files::write_file(path, bytes, true)
        .with_context(|| format!("writing {}", path.display()))
}

/// Reads a secret release key file.
pub fn load_key(path: &Path) -> anyhow::Result<ReleaseSigningKey> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading the release key {} (make one with 'drover keys generate', or pass --key)",
            path.display()
        )
    })?;
    ReleaseSigningKey::from_text(&text).with_context(|| format!("in {}", path.display()))
}

/// Runs `drover release ...`.
pub async fn run(ctx: &Ctx, command: ReleaseCommand) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    match command {
        ReleaseCommand::Create(args) => {
            let key = load_key(&args.key)?;
            let release = create_release(&client, &args, &key).await?;
            if ctx.json() {
                ctx.print_json(&release)?;
            } else {
                println!(
                    "Created release {} in {} (#{}, {} bytes, sha256 {}).",
                    field(&release, "version"),
                    args.fleet,
                    field(&release, "seq"),
                    field(&release, "size"),
                    field(&release, "sha256")
                );
                println!(
                    "Deploy it with: drover deploy --fleet {} --release {}",
                    args.fleet, args.version
                );
            }
        }
        ReleaseCommand::List { fleet } => {
            let releases: Value = client
                .get(&format!("/api/v1/fleets/{fleet}/releases"))
                .await?;
            if ctx.json() {
                return ctx.print_json(&releases).map(|()| ExitCode::SUCCESS);
            }
            let now = table::now_ms();
            let rows: Vec<Vec<String>> = releases
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        field(r, "version"),
                        format!("#{}", field(r, "seq")),
                        field(r, "module"),
                        field(r, "device_type"),
                        field(r, "size"),
                        table::ago(r["created_at"].as_i64(), now),
                        field(r, "notes"),
                    ]
                })
                .collect();
            print!(
                "{}",
                table::render(
                    &[
                        "VERSION", "SEQ", "MODULE", "TYPE", "BYTES", "CREATED", "NOTES"
                    ],
                    &rows
                )
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Hashes a file: (sha256 hex, size).
fn hash_file(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((drover_protocol::ids::to_hex(&hasher.finalize()), size))
}

/// Signs, uploads (unless the hub has it) and creates a release; returns the hub's view of it.
pub async fn create_release(
    client: &HubClient,
    args: &CreateArgs,
    key: &ReleaseSigningKey,
) -> anyhow::Result<Value> {
    validate::release_version(&args.version)?;
    if let Some(t) = &args.device_type {
        validate::device_type(t)?;
    }
    let fleet: Value = client
        .get(&format!("/api/v1/fleets/{}", args.fleet))
        .await?;
    let ours = key.public().to_string();
    match fleet["release_key"].as_str() {
        None => bail!(
            "fleet {} has no release key yet; set it first: drover fleet set {} --release-key {ours}",
            args.fleet,
            args.fleet
        ),
        Some(theirs) if theirs != ours => bail!(
            "{} is not the fleet's release key (the fleet expects {theirs}); pass the right one with --key",
            args.key.display()
        ),
        Some(_) => {}
    }
    let (sha256, size) = hash_file(&args.file)?;
    let known: Option<Value> = client
        .get_optional(&format!("/api/v1/artifacts/{sha256}"))
        .await?;
    if known.is_none() {
        upload(client, &args.file, &sha256, size, args.quiet).await?;
    }
    let module: Module = args.module.into();
    let manifest = ReleaseManifest {
        version: &args.version,
        module,
        device_type: args.device_type.as_deref(),
        sha256: &sha256,
        size,
    };
    client
        .post(
            &format!("/api/v1/fleets/{}/releases", args.fleet),
            &json!({
                "version": args.version,
                "module": module.as_str(),
                "device_type": args.device_type,
                "sha256": sha256,
                "signature": manifest.sign(key),
                "notes": args.notes,
            }),
        )
        .await
}

async fn upload(
    client: &HubClient,
    path: &Path,
    sha256: &str,
    size: u64,
    quiet: bool,
) -> anyhow::Result<()> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(size)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress = bar.clone();
    let stream =
        tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024).inspect(move |chunk| {
            if let Ok(chunk) = chunk {
                progress.inc(chunk.len() as u64);
            }
        });
    let result: anyhow::Result<Value> = client
        .put_body(
            &format!("/api/v1/artifacts/{sha256}"),
            reqwest::Body::wrap_stream(stream),
            size,
        )
        .await;
    bar.finish_and_clear();
    result.map(|_| ())
}

/// Runs `drover deploy`.
pub async fn deploy(ctx: &Ctx, args: DeployArgs) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let deployed: Value = client
        .post(
            &format!("/api/v1/fleets/{}/deploy", args.fleet),
            &json!({"release": args.release, "device": args.device}),
        )
        .await?;
    if ctx.json() {
        ctx.print_json(&deployed)?;
    } else if let Some(device) = &args.device {
        println!(
            "Pinned {} to {device}; it installs at its next check-in.",
            args.release
        );
    } else {
        println!(
            "Deployed {} to fleet {} (device type {}). Follow it with: drover status --fleet {} --watch",
            args.release,
            args.fleet,
            field(&deployed, "device_type"),
            args.fleet
        );
    }
    Ok(ExitCode::SUCCESS)
}
