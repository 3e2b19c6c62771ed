//! The object model: file manifests, trees and snapshot commits, their versioned binary
//! codec, and sealing under the volume key.
//!
//! ```text
//! encoded object = "FO" | version:u8=1 | kind:u8 | postcard(body)
//! stored object  = seal(volume key, encoded object, aad = "forge-vault object v1")
//! object cid     = BLAKE3(stored object)
//! ```
//!
//! Sealing is deterministic, so an unchanged subtree seals to the same bytes and keeps its
//! cid across snapshots; only the path from a change up to the root is new. Decoding checks
//! the structural invariants (sorted unique names, sizes that add up), so a decoded object
//! can be trusted by the code that walks it.

use std::collections::BTreeMap;

use forge_crypto::seal::{self, Compression};
use forge_crypto::{Cid, CryptoError, VolumeKey};
use serde::{Deserialize, Serialize};

/// Version of the object encoding.
pub const OBJECT_FORMAT_VERSION: u8 = 1;
const MAGIC: &[u8; 2] = b"FO";
const SEAL_AAD: &[u8] = b"forge-vault object v1";
/// Objects larger than this are refused on decode (a tree of ~100k entries fits).
pub const OBJECT_BYTES_MAX: usize = 64 << 20;
/// Files with at most this many chunks keep their manifest inline in the tree.
pub const INLINE_MANIFEST_CHUNKS_MAX: usize = 4;

/// Errors of the object codec.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    /// Bytes that are not an object of this format.
    #[error("object does not decode: {reason}")]
    Malformed { reason: String },
    /// An object of another kind than the caller expected.
    #[error("expected a {expected} object, found a {found}")]
    WrongKind {
        expected: &'static str,
        found: &'static str,
    },
    /// The seal did not open (wrong volume key, or the object was modified).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// An object too large to be read back: refused when written, never stored.
    #[error("a {kind} object of {bytes} bytes is over the {limit}-byte object limit")]
    TooLarge {
        kind: &'static str,
        bytes: usize,
        limit: usize,
    },
}

/// One chunk of a file, with what a reader needs to fetch and open it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// BLAKE3 of the chunk's ciphertext.
    pub cid: [u8; 32],
    /// Plaintext length.
    pub len: u32,
    /// The chunk key (from the domain key; carried so readers need only the volume key).
    pub key: [u8; 32],
}

impl ChunkRef {
    /// The chunk's cid.
    #[must_use]
    pub fn cid(&self) -> Cid {
        Cid::from_bytes(self.cid)
    }
}

/// A file's content: its chunks in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileManifest {
    /// Total plaintext length (the sum of the chunks' lengths).
    pub size: u64,
    /// The chunks, in file order.
    pub chunks: Vec<ChunkRef>,
}

/// What a tree entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryContent {
    /// A regular file whose manifest is inline.
    InlineFile(FileManifest),
    /// A regular file whose manifest is a separate object.
    File { manifest: [u8; 32] },
    /// A directory and its tree object.
    Directory { tree: [u8; 32] },
    /// A symbolic link and its target (raw bytes, never followed).
    Symlink { target: Vec<u8> },
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// The name, as raw bytes (any byte but `/` and NUL; not `.` or `..`).
    pub name: Vec<u8>,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// File size (0 for directories; target length for symlinks).
    pub size: u64,
    /// The content.
    pub content: EntryContent,
}

/// A directory: entries sorted by name, names unique.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    /// The entries.
    pub entries: Vec<TreeEntry>,
}

/// A snapshot commit (what is signed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCommit {
    /// The volume it belongs to.
    pub volume: [u8; 16],
    /// The root tree's cid.
    pub root: [u8; 32],
    /// Parent snapshots' cids (none for the first).
    pub parents: Vec<[u8; 32]>,
    /// The node that made it.
    pub author: [u8; 32],
    /// When, in nanoseconds since the Unix epoch (from the caller's clock).
    pub time_ns: i64,
    /// The user's message.
    pub message: String,
    /// DNA fingerprint of the workload that produced it (`--dna KEY=VALUE`).
    pub dna: BTreeMap<String, String>,
    /// File bytes in the snapshot.
    pub logical_bytes: u64,
    /// Regular files in the snapshot.
    pub file_count: u64,
}

/// A commit with its ML-DSA-65 signature (domain `Snapshot`) over the commit's encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCommit {
    /// The encoded [`SnapshotCommit`] (the exact bytes signed).
    pub commit: Vec<u8>,
    /// The signature.
    pub signature: Vec<u8>,
}

/// Any object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// A file manifest.
    Manifest(FileManifest),
    /// A directory.
    Tree(Tree),
    /// A signed snapshot commit.
    Commit(SignedCommit),
}

const KIND_MANIFEST: u8 = 1;
const KIND_TREE: u8 = 2;
const KIND_COMMIT: u8 = 3;

impl Object {
    fn kind_name(kind: u8) -> &'static str {
        match kind {
            KIND_MANIFEST => "manifest",
            KIND_TREE => "tree",
            KIND_COMMIT => "commit",
            _ => "unknown",
        }
    }

    /// The versioned encoding.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let (kind, body) = match self {
            Self::Manifest(manifest) => (KIND_MANIFEST, postcard::to_stdvec(manifest)),
            Self::Tree(tree) => (KIND_TREE, postcard::to_stdvec(tree)),
            Self::Commit(commit) => (KIND_COMMIT, postcard::to_stdvec(commit)),
        };
        // postcard only fails on types it cannot represent; ours are all plain data.
        let body = body.expect("object types serialize with postcard");
        let mut bytes = Vec::with_capacity(4 + body.len());
        bytes.extend_from_slice(MAGIC);
        bytes.push(OBJECT_FORMAT_VERSION);
        bytes.push(kind);
        bytes.extend_from_slice(&body);
        bytes
    }

    /// Decodes and validates an encoded object.
    ///
    /// # Errors
    /// [`ObjectError::Malformed`] for anything that is not a valid object.
    pub fn decode(bytes: &[u8]) -> Result<Self, ObjectError> {
        let malformed = |reason: String| ObjectError::Malformed { reason };
        if bytes.len() < 4 || &bytes[..2] != MAGIC {
            return Err(malformed("missing object header".into()));
        }
        if bytes[2] != OBJECT_FORMAT_VERSION {
            return Err(malformed(format!(
                "unsupported object version {}",
                bytes[2]
            )));
        }
        let body = &bytes[4..];
        let object = match bytes[3] {
            KIND_MANIFEST => Self::Manifest(exact(body)?),
            KIND_TREE => Self::Tree(exact(body)?),
            KIND_COMMIT => Self::Commit(exact(body)?),
            other => return Err(malformed(format!("unknown object kind {other}"))),
        };
        object.validate()?;
        Ok(object)
    }

    fn validate(&self) -> Result<(), ObjectError> {
        let malformed = |reason: String| Err(ObjectError::Malformed { reason });
        match self {
            Self::Manifest(manifest) => validate_manifest(manifest),
            Self::Tree(tree) => {
                for pair in tree.entries.windows(2) {
                    if pair[0].name >= pair[1].name {
                        return malformed("tree entries not sorted and unique".into());
                    }
                }
                for entry in &tree.entries {
                    let name = &entry.name;
                    if name.is_empty()
                        || name == b"."
                        || name == b".."
                        || name.contains(&b'/')
                        || name.contains(&0)
                    {
                        return malformed(format!(
                            "invalid entry name {:?}",
                            String::from_utf8_lossy(name)
                        ));
                    }
                    if let EntryContent::InlineFile(manifest) = &entry.content {
                        validate_manifest(manifest)?;
                        if manifest.size != entry.size {
                            return malformed(
                                "inline manifest size differs from the entry's".into(),
                            );
                        }
                    }
                }
                Ok(())
            }
            Self::Commit(signed) => {
                SnapshotCommit::decode(&signed.commit)?;
                Ok(())
            }
        }
    }

    /// Seals the object under `volume_key`, returning (cid, stored bytes).
    #[must_use]
    pub fn seal(&self, volume_key: &VolumeKey) -> (Cid, Vec<u8>) {
        let sealed = seal::seal(
            volume_key.as_bytes(),
            &self.encode(),
            SEAL_AAD,
            Compression::WhenSmaller,
        );
        (Cid::of(&sealed), sealed)
    }

    /// [`Object::seal`], refusing an object that could not be read back: an encoding over
    /// `limit_bytes` (at most [`OBJECT_BYTES_MAX`], what every reader accepts).
    ///
    /// # Errors
    /// [`ObjectError::TooLarge`].
    pub fn seal_within(
        &self,
        volume_key: &VolumeKey,
        limit_bytes: usize,
    ) -> Result<(Cid, Vec<u8>), ObjectError> {
        let encoded = self.encode();
        let limit = limit_bytes.min(OBJECT_BYTES_MAX);
        if encoded.len() > limit {
            return Err(ObjectError::TooLarge {
                kind: self.description(),
                bytes: encoded.len(),
                limit,
            });
        }
        let sealed = seal::seal(
            volume_key.as_bytes(),
            &encoded,
            SEAL_AAD,
            Compression::WhenSmaller,
        );
        Ok((Cid::of(&sealed), sealed))
    }

    fn description(&self) -> &'static str {
        match self {
            Self::Manifest(_) => "file manifest",
            Self::Tree(_) => "tree",
            Self::Commit(_) => "commit",
        }
    }

    /// Opens and decodes a stored object, checking it against `cid` first.
    ///
    /// # Errors
    /// [`ObjectError::Malformed`] when the bytes do not hash to `cid`; crypto errors when the
    /// seal does not open; decode errors.
    pub fn open(volume_key: &VolumeKey, cid: &Cid, stored: &[u8]) -> Result<Self, ObjectError> {
        if !cid.matches(stored) {
            return Err(ObjectError::Malformed {
                reason: format!("object {cid} does not match its id (corrupted on disk)"),
            });
        }
        let encoded = seal::open(volume_key.as_bytes(), stored, SEAL_AAD, OBJECT_BYTES_MAX)?;
        Self::decode(&encoded)
    }

    /// The object as a tree, or an error naming what it is.
    ///
    /// # Errors
    /// [`ObjectError::WrongKind`].
    pub fn into_tree(self) -> Result<Tree, ObjectError> {
        match self {
            Self::Tree(tree) => Ok(tree),
            other => Err(ObjectError::WrongKind {
                expected: "tree",
                found: other.name(),
            }),
        }
    }

    /// The object as a manifest.
    ///
    /// # Errors
    /// [`ObjectError::WrongKind`].
    pub fn into_manifest(self) -> Result<FileManifest, ObjectError> {
        match self {
            Self::Manifest(manifest) => Ok(manifest),
            other => Err(ObjectError::WrongKind {
                expected: "manifest",
                found: other.name(),
            }),
        }
    }

    /// The object as a signed commit.
    ///
    /// # Errors
    /// [`ObjectError::WrongKind`].
    pub fn into_commit(self) -> Result<SignedCommit, ObjectError> {
        match self {
            Self::Commit(commit) => Ok(commit),
            other => Err(ObjectError::WrongKind {
                expected: "commit",
                found: other.name(),
            }),
        }
    }

    fn name(&self) -> &'static str {
        Self::kind_name(match self {
            Self::Manifest(_) => KIND_MANIFEST,
            Self::Tree(_) => KIND_TREE,
            Self::Commit(_) => KIND_COMMIT,
        })
    }
}

impl SnapshotCommit {
    /// The encoding that is signed: `"FC" | version | postcard(commit)`.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![b'F', b'C', OBJECT_FORMAT_VERSION];
        bytes.extend_from_slice(
            &postcard::to_stdvec(self).expect("commits serialize with postcard"),
        );
        bytes
    }

    /// Decodes [`Self::encode`]'s output.
    ///
    /// # Errors
    /// [`ObjectError::Malformed`].
    pub fn decode(bytes: &[u8]) -> Result<Self, ObjectError> {
        if bytes.len() < 3 || &bytes[..2] != b"FC" || bytes[2] != OBJECT_FORMAT_VERSION {
            return Err(ObjectError::Malformed {
                reason: "missing commit header".into(),
            });
        }
        exact(&bytes[3..])
    }
}

fn validate_manifest(manifest: &FileManifest) -> Result<(), ObjectError> {
    let total: u64 = manifest
        .chunks
        .iter()
        .map(|chunk| u64::from(chunk.len))
        .sum();
    if total != manifest.size {
        return Err(ObjectError::Malformed {
            reason: format!("manifest chunks add up to {total}, not {}", manifest.size),
        });
    }
    Ok(())
}

fn exact<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ObjectError> {
    let (value, rest) =
        postcard::take_from_bytes(body).map_err(|error| ObjectError::Malformed {
            reason: error.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(ObjectError::Malformed {
            reason: format!("{} trailing bytes", rest.len()),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_tree() -> Tree {
        Tree {
            entries: vec![
                TreeEntry {
                    name: b"a file".to_vec(),
                    mode: 0o644,
                    mtime_ns: 1,
                    size: 3,
                    content: EntryContent::InlineFile(FileManifest {
                        size: 3,
                        chunks: vec![ChunkRef {
                            cid: [1; 32],
                            len: 3,
                            key: [2; 32],
                        }],
                    }),
                },
                TreeEntry {
                    name: b"link".to_vec(),
                    mode: 0o777,
                    mtime_ns: 2,
                    size: 4,
                    content: EntryContent::Symlink {
                        target: b"a fi".to_vec(),
                    },
                },
                TreeEntry {
                    name: vec![b'z', 0xff, b'\n'],
                    mode: 0o755,
                    mtime_ns: -5,
                    size: 0,
                    content: EntryContent::Directory { tree: [3; 32] },
                },
            ],
        }
    }

    #[test]
    fn an_object_over_the_limit_is_refused_when_sealed() {
        let key = VolumeKey::from_bytes([9; 32]);
        let manifest = Object::Manifest(FileManifest {
            size: 100,
            chunks: vec![
                ChunkRef {
                    cid: [1; 32],
                    len: 50,
                    key: [2; 32],
                };
                2
            ],
        });
        let encoded = manifest.encode().len();
        assert!(manifest.seal_within(&key, encoded).is_ok());
        assert!(matches!(
            manifest.seal_within(&key, encoded - 1),
            Err(ObjectError::TooLarge {
                kind: "file manifest",
                ..
            })
        ));
    }

    #[test]
    fn objects_round_trip_and_seal_deterministically() {
        let key = VolumeKey::from_bytes([9; 32]);
        let tree = Object::Tree(sample_tree());
        assert_eq!(Object::decode(&tree.encode()).unwrap(), tree);
        let (cid, sealed) = tree.seal(&key);
        assert_eq!(tree.seal(&key).0, cid, "unchanged objects keep their cid");
        assert_eq!(Object::open(&key, &cid, &sealed).unwrap(), tree);
        assert!(Object::open(&VolumeKey::from_bytes([8; 32]), &cid, &sealed).is_err());
        let mut damaged = sealed.clone();
        damaged[10] ^= 1;
        assert!(Object::open(&key, &cid, &damaged).is_err());
    }

    #[test]
    fn invalid_objects_are_rejected() {
        let mut unsorted = sample_tree();
        unsorted.entries.swap(0, 1);
        assert!(Object::decode(&Object::Tree(unsorted).encode()).is_err());
        let mut dotdot = sample_tree();
        dotdot.entries[0].name = b"..".to_vec();
        assert!(Object::decode(&Object::Tree(dotdot).encode()).is_err());
        let bad_sum = FileManifest {
            size: 10,
            chunks: vec![ChunkRef {
                cid: [0; 32],
                len: 3,
                key: [0; 32],
            }],
        };
        assert!(Object::decode(&Object::Manifest(bad_sum).encode()).is_err());
        let mut trailing = Object::Tree(sample_tree()).encode();
        trailing.push(0);
        assert!(Object::decode(&trailing).is_err());
        assert!(Object::decode(b"FO\x02\x01").is_err());
        assert!(Object::decode(b"").is_err());
        assert!(Object::decode(b"FO\x01\x09").is_err());
    }
}
