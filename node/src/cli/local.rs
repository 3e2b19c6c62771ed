//! The commands that need no open vault and no daemon: version, init, node id, node
//! config, proof verify.

use std::fmt::Write as _;

use serde_json::json;

use super::*;
use crate::datadir::{DATA_FORMAT_VERSION, SecretProtection};
use crate::passphrase;
use forge_crypto::KdfParams;

/// `forge node config`: the configuration in effect, as forge.toml text.
pub(super) fn node_config(data_dir: &DataDir) -> Result<Output> {
    let config = NodeConfig::load(data_dir)?;
    let source = config.source.as_ref().map_or_else(
        || {
            format!(
                "# no {}: the defaults",
                data_dir.path().join(crate::config::CONFIG_FILE).display()
            )
        },
        |path| format!("# {}", path.display()),
    );
    Ok(Output {
        human: format!("{source}\n{}", config.to_toml().trim_end()),
        json: json!({
            "source": config.source,
            "log_level": config.log_level,
            "metrics_listen": config.metrics_listen,
            "mount": {"cache_size_bytes": config.mount_cache_bytes},
        }),
    })
}

/// `forge version`: the versions of forge and of its on-disk formats.
pub(super) fn version() -> Output {
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

pub(super) fn init(data_dir: &DataDir, args: &InitArgs) -> Result<Output> {
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

pub(super) fn node_id(data_dir: &DataDir) -> Result<Output> {
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

/// `forge proof verify FILE`: the proof checked offline, and what it proves.
pub(super) fn proof_verify(file: &std::path::Path) -> Result<Output> {
    let bytes = std::fs::read(file).map_err(NodeError::io("reading", file))?;
    let proof = forge_mesh::TransferProof::decode_verified(&bytes)?;
    let receipt = &proof.receipt;
    let time = crate::clock::format_utc_time(receipt.time_ns);
    let volume = data_encoding::HEXLOWER.encode(&receipt.volume);
    Ok(Output {
        human: format!(
            "valid: node {} received {} chunks ({} bytes) of snapshot {} (index {}) of volume \
             {volume} from node {} at {time}",
            receipt.receiver,
            receipt.chunks,
            receipt.bytes,
            receipt.snapshot,
            receipt.index_root,
            receipt.sender,
        ),
        json: json!({
            "valid": true,
            "volume": volume,
            "snapshot": receipt.snapshot.to_hex(),
            "index_root": receipt.index_root.to_hex(),
            "chunks": receipt.chunks,
            "bytes": receipt.bytes,
            "sender": receipt.sender.to_hex(),
            "receiver": receipt.receiver.to_hex(),
            "time": time,
        }),
    })
}
