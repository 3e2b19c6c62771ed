//! What the unit tests of forge-node share: a fresh vault in a temporary directory.

use std::path::Path;

use crate::datadir::{DataDir, SecretProtection};
use crate::error::NodeError;
use crate::vault::Vault;

/// The passphrase source of a test that has none to give.
pub(crate) use crate::vault::no_passphrase;

/// A vault initialised in `root/vault` and opened (RocksDB, this process's lock).
pub(crate) fn new_vault(root: &Path) -> Vault {
    let data_dir = DataDir::new(root.join("vault"));
    data_dir.init(&SecretProtection::FileMode).unwrap();
    Vault::open(&data_dir, &no_passphrase).unwrap()
}

/// A vault over `kv` (MemKv, say) with this data directory's identity, seeded randomness,
/// a stepping clock and one thread. `root/vault` is initialised on first use.
pub(crate) fn vault_on(
    root: &Path,
    kv: std::sync::Arc<dyn forge_store::kv::KvEngine>,
    seed: u64,
) -> Vault {
    use std::sync::Arc;
    let data_dir = DataDir::new(root.join("vault"));
    if data_dir.check_format().is_err() {
        data_dir.init(&SecretProtection::FileMode).unwrap();
    }
    let identity = data_dir
        .load_identity(|| Err(NodeError::PassphraseUnavailable))
        .unwrap();
    Vault::from_parts(
        &data_dir,
        identity,
        crate::vault::VaultParts {
            kv,
            metadata: None,
            clock: Arc::new(crate::clock::SteppingClock::new(
                1_700_000_000_000_000_000,
                1_000,
            )),
            randomness: Arc::new(crate::clock::SeededRandomness::new(seed)),
            threads: 1,
        },
    )
    .unwrap()
}

/// `len` deterministic, incompressible bytes (xorshift from `seed`).
pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}
