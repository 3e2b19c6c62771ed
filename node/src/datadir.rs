//! The data directory: its layout, format marker, and the node's keys.
//!
//! ```text
//! <data-dir>/                     mode 0700
//!   FORMAT                        "forge-vault-data-dir <version>\n", written last by init
//!   node/                         mode 0700; created atomically, so two inits cannot race
//!     public.key                  NodePublicKeys encoding (readable without a passphrase)
//!     secret.key                  NodeSecrets encoding, mode 0600           (or, instead:)
//!     secret.key.protected        the same, Argon2id passphrase-protected, mode 0600
//! ```

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use forge_crypto::passphrase::{self, KdfParams};
use forge_crypto::{NodeIdentity, NodePublicKeys, NodeSecrets};
use zeroize::Zeroizing;

use crate::error::{NodeError, Result};

/// The data-directory format version this build writes and reads.
pub const DATA_FORMAT_VERSION: u32 = 1;

const FORMAT_FILE: &str = "FORMAT";
const FORMAT_MAGIC: &str = "forge-vault-data-dir";
const NODE_DIR: &str = "node";
const PUBLIC_KEY_FILE: &str = "public.key";
const SECRET_KEY_FILE: &str = "secret.key";
const PROTECTED_SECRET_KEY_FILE: &str = "secret.key.protected";
/// Key files are tiny; refuse to read anything that is obviously not one.
const KEY_FILE_BYTES_MAX: u64 = 64 * 1024;

/// How `init` stores the node's secrets.
#[derive(Debug, Clone, Default)]
pub enum SecretProtection {
    /// Plain, readable by the owning user only (mode 0600).
    #[default]
    FileMode,
    /// Encrypted under a passphrase (Argon2id), and mode 0600 as well.
    Passphrase {
        passphrase: Zeroizing<String>,
        params: KdfParams,
    },
}

/// What `init` created.
#[derive(Debug)]
pub struct InitReport {
    /// The node's public keys (and so its id).
    pub public_keys: NodePublicKeys,
    /// Whether the secrets are passphrase-protected.
    pub passphrase_protected: bool,
}

/// A Forge data directory at a path (which may not exist yet).
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// A handle on `root`; nothing is read or created.
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The default location, `~/.local/share/forge`, when no flag or variable gives one.
    ///
    /// # Errors
    /// [`NodeError::NoDataDir`] when `HOME` is unset.
    pub fn default_path() -> Result<PathBuf> {
        let home = std::env::var_os("HOME")
            .filter(|home| !home.is_empty())
            .ok_or(NodeError::NoDataDir)?;
        Ok(Path::new(&home).join(".local/share/forge"))
    }

    /// The directory's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Creates a new vault: directory, node keys, then the format marker.
    ///
    /// On a path that already holds a vault it changes nothing and returns
    /// [`NodeError::AlreadyInitialized`]; on a non-empty directory that is not a vault,
    /// [`NodeError::NotAVault`].
    ///
    /// # Errors
    /// As above, and I/O or randomness failures.
    pub fn init(&self, protection: &SecretProtection) -> Result<InitReport> {
        match self.public_keys() {
            Ok(keys) => {
                return Err(NodeError::AlreadyInitialized {
                    path: self.root.clone(),
                    node_id: keys.node_id().to_hex(),
                });
            }
            Err(NodeError::NotInitialized { .. }) => {}
            Err(error) => return Err(error),
        }
        if self.root.exists() && !is_empty_dir(&self.root)? {
            return Err(NodeError::NotAVault {
                path: self.root.clone(),
            });
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(NodeError::io("creating data directory", &self.root))?;
        // Creating node/ is the atomic step that claims the directory: a second init that
        // races us fails here instead of overwriting our keys.
        let node_dir = self.root.join(NODE_DIR);
        DirBuilder::new()
            .mode(0o700)
            .create(&node_dir)
            .map_err(|source| {
                if source.kind() == ErrorKind::AlreadyExists {
                    NodeError::NotAVault {
                        path: self.root.clone(),
                    }
                } else {
                    NodeError::io("creating", &node_dir)(source)
                }
            })?;

        let (identity, secrets) = NodeIdentity::generate()?;
        let encoded = secrets.encode();
        let passphrase_protected = match protection {
            SecretProtection::FileMode => {
                write_atomically(&node_dir.join(SECRET_KEY_FILE), &encoded, 0o600)?;
                false
            }
            SecretProtection::Passphrase { passphrase, params } => {
                let protected = passphrase::protect(passphrase.as_bytes(), &encoded, *params)?;
                write_atomically(&node_dir.join(PROTECTED_SECRET_KEY_FILE), &protected, 0o600)?;
                true
            }
        };
        let public_keys = identity.public_keys().clone();
        write_atomically(
            &node_dir.join(PUBLIC_KEY_FILE),
            &public_keys.encode(),
            0o644,
        )?;
        let marker = format!("{FORMAT_MAGIC} {DATA_FORMAT_VERSION}\n");
        write_atomically(&self.root.join(FORMAT_FILE), marker.as_bytes(), 0o644)?;
        Ok(InitReport {
            public_keys,
            passphrase_protected,
        })
    }

    /// Checks the format marker: the directory must be a vault of this build's version.
    ///
    /// # Errors
    /// [`NodeError::NotInitialized`], [`NodeError::NotAVault`] or
    /// [`NodeError::UnsupportedFormat`].
    pub fn check_format(&self) -> Result<()> {
        let marker_path = self.root.join(FORMAT_FILE);
        let marker = match fs::read(&marker_path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == ErrorKind::NotFound => {
                return Err(if self.root.exists() && !is_empty_dir(&self.root)? {
                    NodeError::NotAVault {
                        path: self.root.clone(),
                    }
                } else {
                    NodeError::NotInitialized {
                        path: self.root.clone(),
                    }
                });
            }
            Err(error) => return Err(NodeError::io("reading", marker_path)(error)),
        };
        let text = String::from_utf8_lossy(&marker);
        let mut words = text.split_whitespace();
        let is_ours = words.next() == Some(FORMAT_MAGIC);
        let version = words.next().and_then(|word| word.parse::<u32>().ok());
        if !is_ours || version != Some(DATA_FORMAT_VERSION) || words.next().is_some() {
            return Err(NodeError::UnsupportedFormat {
                path: self.root.clone(),
                found: text
                    .chars()
                    .take(80)
                    .collect::<String>()
                    .trim_end()
                    .to_owned(),
                supported: DATA_FORMAT_VERSION,
            });
        }
        Ok(())
    }

    /// The node's public keys, read without any passphrase.
    ///
    /// # Errors
    /// Format errors as [`Self::check_format`]; [`NodeError::Corrupt`] when the key file
    /// does not decode.
    pub fn public_keys(&self) -> Result<NodePublicKeys> {
        self.check_format()?;
        let path = self.root.join(NODE_DIR).join(PUBLIC_KEY_FILE);
        let bytes = read_key_file(&path)?;
        NodePublicKeys::decode(&bytes).map_err(|error| NodeError::Corrupt {
            path,
            reason: error.to_string(),
        })
    }

    /// Whether the node's secrets are passphrase-protected.
    #[must_use]
    pub fn secrets_are_protected(&self) -> bool {
        self.root
            .join(NODE_DIR)
            .join(PROTECTED_SECRET_KEY_FILE)
            .exists()
    }

    /// Loads the node's full identity, asking `passphrase` only if the secrets are protected,
    /// and checks it against the stored public keys.
    ///
    /// # Errors
    /// Format errors, [`forge_crypto::CryptoError::WrongPassphrase`], or
    /// [`NodeError::Corrupt`] when the secrets do not match the public keys.
    pub fn load_identity(
        &self,
        passphrase: impl FnOnce() -> Result<Zeroizing<String>>,
    ) -> Result<NodeIdentity> {
        let public_keys = self.public_keys()?;
        let node_dir = self.root.join(NODE_DIR);
        let (path, encoded) = if self.secrets_are_protected() {
            let path = node_dir.join(PROTECTED_SECRET_KEY_FILE);
            let protected = read_key_file(&path)?;
            let passphrase = passphrase()?;
            (
                path,
                passphrase::unprotect(passphrase.as_bytes(), &protected)?,
            )
        } else {
            let path = node_dir.join(SECRET_KEY_FILE);
            let bytes = Zeroizing::new(read_key_file(&path)?);
            (path, bytes)
        };
        let secrets = NodeSecrets::decode(&encoded).map_err(|error| NodeError::Corrupt {
            path: path.clone(),
            reason: error.to_string(),
        })?;
        let identity = NodeIdentity::from_secrets(&secrets);
        if identity.node_id() != public_keys.node_id() {
            return Err(NodeError::Corrupt {
                path,
                reason: format!(
                    "secret key belongs to node {}, but public.key names node {}",
                    identity.node_id(),
                    public_keys.node_id()
                ),
            });
        }
        Ok(identity)
    }
}

fn is_empty_dir(path: &Path) -> Result<bool> {
    if !path.is_dir() {
        return Ok(false);
    }
    let mut entries = fs::read_dir(path).map_err(NodeError::io("listing", path))?;
    Ok(entries.next().is_none())
}

fn read_key_file(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|error| {
        if error.kind() == ErrorKind::NotFound {
            NodeError::Corrupt {
                path: path.to_owned(),
                reason: "missing".into(),
            }
        } else {
            NodeError::io("opening", path)(error)
        }
    })?;
    let length = file
        .metadata()
        .map_err(NodeError::io("reading", path))?
        .len();
    if length > KEY_FILE_BYTES_MAX {
        return Err(NodeError::Corrupt {
            path: path.to_owned(),
            reason: format!("{length} bytes is too large for a key file"),
        });
    }
    fs::read(path).map_err(NodeError::io("reading", path))
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one:
/// write a temporary file with `mode`, fsync it, rename it over `path`, fsync the directory.
///
/// # Errors
/// [`NodeError::Io`] naming the failing step.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let directory = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy())
        .unwrap_or_default();
    let temporary = directory.join(format!(".{file_name}.tmp"));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .map_err(NodeError::io("creating", &temporary))?;
    file.write_all(bytes)
        .map_err(NodeError::io("writing", &temporary))?;
    file.sync_all()
        .map_err(NodeError::io("syncing", &temporary))?;
    drop(file);
    fs::rename(&temporary, path).map_err(NodeError::io("renaming into place", path))?;
    File::open(directory)
        .and_then(|directory| directory.sync_all())
        .map_err(NodeError::io("syncing directory", directory))
}
