//! What the unit tests of forge-node share: a fresh vault in a temporary directory.

use std::path::Path;

use zeroize::Zeroizing;

use crate::datadir::{DataDir, SecretProtection};
use crate::error::{NodeError, Result};
use crate::vault::Vault;

/// The passphrase source of a test that has none to give.
pub(crate) fn no_passphrase(_: &str, _: bool) -> Result<Zeroizing<String>> {
    Err(NodeError::PassphraseUnavailable)
}

/// A vault initialised in `root/vault` and opened (RocksDB, this process's lock).
pub(crate) fn new_vault(root: &Path) -> Vault {
    let data_dir = DataDir::new(root.join("vault"));
    data_dir.init(&SecretProtection::FileMode).unwrap();
    Vault::open(&data_dir, &no_passphrase).unwrap()
}
