//! The `forge` command line: argument definitions and the commands behind them.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use forge_crypto::KdfParams;
use serde_json::json;

use crate::datadir::{DATA_FORMAT_VERSION, DataDir, SecretProtection};
use crate::error::Result;
use crate::passphrase;

/// Forge Vault: deduplicated, encrypted, erasure-coded storage for edge sites.
///
/// With no cluster configured, forge runs as a single embedded vault in its data directory.
#[derive(Debug, Parser)]
#[command(
    name = "forge",
    version,
    propagate_version = true,
    disable_version_flag = false
)]
pub struct Cli {
    /// The data directory [default: $FORGE_DATA_DIR, else ~/.local/share/forge].
    #[arg(
        long,
        global = true,
        env = "FORGE_DATA_DIR",
        value_name = "DIR",
        hide_env = true
    )]
    pub data_dir: Option<PathBuf>,

    /// Machine-readable output: JSON on stdout; errors as one JSON line on stderr.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the version of forge and of the formats it reads and writes.
    Version,
    /// Create a new vault: the data directory, its format marker and this node's keys.
    Init(InitArgs),
    /// This node's identity.
    #[command(subcommand)]
    Node(NodeCommand),
}

/// Arguments of `forge init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Protect the node's secret keys with a passphrase (from FORGE_PASSPHRASE, or prompted).
    #[arg(long)]
    pub passphrase: bool,
}

/// `forge node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Print this node's id (with --json, also its public keys).
    Id,
}

/// What a successful command prints: a human text and a JSON value.
#[derive(Debug)]
pub struct Output {
    /// For a terminal or a log.
    pub human: String,
    /// For `--json`.
    pub json: serde_json::Value,
}

impl Cli {
    /// The data directory this invocation works on.
    ///
    /// # Errors
    /// [`crate::NodeError::NoDataDir`] when neither flag, variable nor `HOME` gives one.
    pub fn data_dir(&self) -> Result<DataDir> {
        match &self.data_dir {
            Some(path) => Ok(DataDir::new(path)),
            None => DataDir::default_path().map(DataDir::new),
        }
    }

    /// Runs the command.
    ///
    /// # Errors
    /// Whatever the command fails with; the binary maps it to an exit code.
    pub fn run(&self) -> Result<Output> {
        match &self.command {
            Command::Version => Ok(version()),
            Command::Init(args) => init(&self.data_dir()?, args),
            Command::Node(NodeCommand::Id) => node_id(&self.data_dir()?),
        }
    }
}

fn version() -> Output {
    let version = env!("CARGO_PKG_VERSION");
    Output {
        human: format!(
            "forge {version}\ndata directory format {DATA_FORMAT_VERSION}, seal format {}, envelope format {}",
            forge_crypto::seal::SEAL_FORMAT_VERSION,
            forge_crypto::envelope::ENVELOPE_FORMAT_VERSION,
        ),
        json: json!({
            "version": version,
            "data_format_version": DATA_FORMAT_VERSION,
            "seal_format_version": forge_crypto::seal::SEAL_FORMAT_VERSION,
            "envelope_format_version": forge_crypto::envelope::ENVELOPE_FORMAT_VERSION,
        }),
    }
}

fn init(data_dir: &DataDir, args: &InitArgs) -> Result<Output> {
    let protection = if args.passphrase {
        SecretProtection::Passphrase {
            passphrase: passphrase::obtain("New passphrase for this node's keys", true)?,
            params: KdfParams::DEFAULT,
        }
    } else {
        SecretProtection::FileMode
    };
    let report = data_dir.init(&protection)?;
    let node_id = report.public_keys.node_id().to_hex();
    let mut human = format!(
        "Initialized Forge vault in {}\nnode id: {node_id}",
        data_dir.path().display()
    );
    if report.passphrase_protected {
        let _ = write!(human, "\nsecret keys are passphrase-protected");
    }
    Ok(Output {
        human,
        json: json!({
            "data_dir": data_dir.path(),
            "node_id": node_id,
            "data_format_version": DATA_FORMAT_VERSION,
            "passphrase_protected": report.passphrase_protected,
        }),
    })
}

fn node_id(data_dir: &DataDir) -> Result<Output> {
    let keys = data_dir.public_keys()?;
    let hex = data_encoding::HEXLOWER;
    Ok(Output {
        human: keys.node_id().to_hex(),
        json: json!({
            "node_id": keys.node_id().to_hex(),
            "ml_dsa_65_public_key": hex.encode(keys.ml_dsa_public_key()),
            "ml_kem_768_public_key": hex.encode(keys.ml_kem_public_key()),
            "x25519_public_key": hex.encode(keys.x25519_public_key()),
            "passphrase_protected": data_dir.secrets_are_protected(),
        }),
    })
}
