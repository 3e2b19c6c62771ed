//! The object model: file manifests, trees and snapshot commits, their versioned binary
//! codec, and sealing under the volume key.
//!
//! ```text
//! encoded object = "FO" | version:u8=2 | kind:u8 | postcard(body)
//! stored object  = seal(volume key, encoded object, aad = "forge-vault object v1")
//! object cid     = BLAKE3(stored object)
//! ```
//!
//! Sealing is deterministic, so an unchanged subtree seals to the same bytes and keeps its
//! cid across snapshots; only the path from a change up to the root is new. Decoding checks
//! the structural invariants (sorted unique names, sizes that add up), so a decoded object
//! can be trusted by the code that walks it.
//!
//! Format 2 (this one) adds what a local file system keeps beside names and bytes (owners,
//! extended attributes, hard-link groups, special files, holes), small files' bytes inline
//! in their directory, and index objects: a directory or a file manifest too large for one
//! object is a [`TreeIndex`] or [`ManifestIndex`] over parts of bounded size, cut by
//! content so a small change re-stores one part. Format 1 objects still decode (into the
//! format 2 types, with the new fields empty); they are never written again.

use std::collections::BTreeMap;

use forge_crypto::seal::{self, Compression};
use forge_crypto::{Cid, CryptoError, VolumeKey};
use serde::{Deserialize, Serialize};

/// Version of the object encoding written.
pub const OBJECT_FORMAT_VERSION: u8 = 2;
/// The first object encoding: still read, never written.
const OBJECT_FORMAT_V1: u8 = 1;
/// Version of the signed commit encoding (unchanged since format 1: signatures cover it).
pub const COMMIT_FORMAT_VERSION: u8 = 1;
const MAGIC: &[u8; 2] = b"FO";
const SEAL_AAD: &[u8] = b"forge-vault object v1";
/// Objects larger than this are refused on decode (a tree of ~100k entries fits).
pub const OBJECT_BYTES_MAX: usize = 64 << 20;
/// Files with at most this many chunks keep their manifest inline in the tree.
pub const INLINE_MANIFEST_CHUNKS_MAX: usize = 4;
/// Files of at most this many bytes keep their bytes inline in the tree (compressed with
/// their neighbours, no chunk of their own).
pub const INLINE_DATA_BYTES_MAX: usize = 16 << 10;
/// The most bytes of extended attributes one entry carries (names and values).
pub const XATTR_BYTES_MAX: usize = 64 << 10;
/// How many index levels a tree or manifest may have (each level multiplies the reach by
/// hundreds of parts, so this is far more than any file or directory needs).
pub const INDEX_DEPTH_MAX: usize = 8;

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

/// One run of a file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Extent {
    /// Bytes stored as a chunk.
    Chunk(ChunkRef),
    /// A hole: `len` zero bytes that are not stored (sparse files, truncates that grow).
    Hole {
        /// Bytes of zeros.
        len: u64,
    },
}

impl Extent {
    /// Bytes of content the extent covers.
    #[must_use]
    pub fn len(&self) -> u64 {
        match self {
            Self::Chunk(chunk) => u64::from(chunk.len),
            Self::Hole { len } => *len,
        }
    }

    /// Whether it covers no bytes (never true of a valid manifest's extents).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A file's content: its extents in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileManifest {
    /// Total plaintext length (the sum of the extents' lengths).
    pub size: u64,
    /// The extents, in file order; adjacent holes are merged.
    pub extents: Vec<Extent>,
}

impl FileManifest {
    /// The stored chunks, in file order (holes left out).
    pub fn chunks(&self) -> impl Iterator<Item = &ChunkRef> {
        self.extents.iter().filter_map(|extent| match extent {
            Extent::Chunk(chunk) => Some(chunk),
            Extent::Hole { .. } => None,
        })
    }

    /// How many chunks it names.
    #[must_use]
    pub fn chunk_count(&self) -> usize {
        self.chunks().count()
    }

    /// Appends a chunk.
    pub fn push_chunk(&mut self, chunk: ChunkRef) {
        self.size += u64::from(chunk.len);
        self.extents.push(Extent::Chunk(chunk));
    }

    /// Appends `len` bytes of hole, merged into a hole just before it.
    pub fn push_hole(&mut self, len: u64) {
        if len == 0 {
            return;
        }
        self.size += len;
        if let Some(Extent::Hole { len: last }) = self.extents.last_mut() {
            *last += len;
        } else {
            self.extents.push(Extent::Hole { len });
        }
    }

    /// Appends an extent (merging holes).
    pub fn push(&mut self, extent: Extent) {
        match extent {
            Extent::Chunk(chunk) => self.push_chunk(chunk),
            Extent::Hole { len } => self.push_hole(len),
        }
    }
}

/// One part of a [`ManifestIndex`]: a manifest (or a lower index) and the bytes it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestPart {
    /// The part's object: a [`FileManifest`] or a [`ManifestIndex`].
    pub cid: [u8; 32],
    /// Bytes of file content in the part.
    pub size: u64,
}

/// A file manifest too large for one object, as consecutive parts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestIndex {
    /// Total plaintext length (the sum of the parts' sizes).
    pub size: u64,
    /// The parts, in file order.
    pub parts: Vec<ManifestPart>,
}

/// What a tree entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryContent {
    /// A regular file whose manifest is inline.
    InlineFile(FileManifest),
    /// A regular file whose manifest is a separate object (a [`FileManifest`] or a
    /// [`ManifestIndex`]).
    File { manifest: [u8; 32] },
    /// A directory and its tree object (a [`Tree`] or a [`TreeIndex`]).
    Directory { tree: [u8; 32] },
    /// A symbolic link and its target (raw bytes, never followed).
    Symlink { target: Vec<u8> },
    /// A small regular file whose bytes are inline (at most [`INLINE_DATA_BYTES_MAX`]).
    InlineData(Vec<u8>),
    /// A named pipe.
    Fifo,
    /// A Unix domain socket (recorded as an entry; it has no content).
    Socket,
    /// A character device.
    CharDevice { major: u32, minor: u32 },
    /// A block device.
    BlockDevice { major: u32, minor: u32 },
}

impl EntryContent {
    /// Whether this is a regular file.
    #[must_use]
    pub fn is_file(&self) -> bool {
        matches!(
            self,
            Self::InlineFile(_) | Self::File { .. } | Self::InlineData(_)
        )
    }
}

/// One extended attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    /// The full name with its namespace (`user.`, `trusted.`, `security.`, `system.`).
    pub name: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
}

/// What an entry keeps beside its name, mode, time and content (all optional: empty when
/// the source did not have it or it was not read).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMeta {
    /// Owner's numeric id.
    pub uid: Option<u32>,
    /// Group's numeric id.
    pub gid: Option<u32>,
    /// Owner's name on the source machine, to map by name on restore.
    pub user: Option<String>,
    /// Group's name on the source machine.
    pub group: Option<String>,
    /// Access time, nanoseconds since the Unix epoch (kept only when asked for).
    pub atime_ns: Option<i64>,
    /// Status change time, nanoseconds since the Unix epoch.
    pub ctime_ns: Option<i64>,
    /// Extended attributes, sorted by name, names unique.
    pub xattrs: Vec<Xattr>,
    /// Entries of one tree walk sharing a source inode (hard links) share this number.
    pub link_group: Option<u64>,
}

impl EntryMeta {
    /// Whether nothing is recorded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// The name, as raw bytes (any byte but `/` and NUL; not `.` or `..`).
    pub name: Vec<u8>,
    /// Permission bits with setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// File size (0 for directories and special files; target length for symlinks).
    pub size: u64,
    /// The content.
    pub content: EntryContent,
    /// Owners, extended attributes, hard-link group, more times.
    pub meta: EntryMeta,
}

/// A directory: entries sorted by name, names unique.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    /// The entries.
    pub entries: Vec<TreeEntry>,
}

/// One part of a [`TreeIndex`]: a tree (or a lower index) holding a run of entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreePart {
    /// The name of the part's first entry.
    pub first: Vec<u8>,
    /// The part's object: a [`Tree`] or a [`TreeIndex`].
    pub cid: [u8; 32],
    /// Entries in the part.
    pub entries: u64,
}

/// A directory too large for one object, as parts sorted by their first names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeIndex {
    /// The parts: first names strictly increasing.
    pub parts: Vec<TreePart>,
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
    /// A large file manifest's index.
    ManifestIndex(ManifestIndex),
    /// A large directory's index.
    TreeIndex(TreeIndex),
}

const KIND_MANIFEST: u8 = 1;
const KIND_TREE: u8 = 2;
const KIND_COMMIT: u8 = 3;
const KIND_MANIFEST_INDEX: u8 = 4;
const KIND_TREE_INDEX: u8 = 5;

/// The format 1 types, decoded and converted; never written.
mod v1 {
    use serde::Deserialize;

    use super::ChunkRef;

    #[derive(Deserialize)]
    pub(super) struct FileManifest {
        pub size: u64,
        pub chunks: Vec<ChunkRef>,
    }

    #[derive(Deserialize)]
    pub(super) enum EntryContent {
        InlineFile(FileManifest),
        File { manifest: [u8; 32] },
        Directory { tree: [u8; 32] },
        Symlink { target: Vec<u8> },
    }

    #[derive(Deserialize)]
    pub(super) struct TreeEntry {
        pub name: Vec<u8>,
        pub mode: u32,
        pub mtime_ns: i64,
        pub size: u64,
        pub content: EntryContent,
    }

    #[derive(Deserialize)]
    pub(super) struct Tree {
        pub entries: Vec<TreeEntry>,
    }

    impl From<FileManifest> for super::FileManifest {
        fn from(old: FileManifest) -> Self {
            Self {
                size: old.size,
                extents: old.chunks.into_iter().map(super::Extent::Chunk).collect(),
            }
        }
    }

    impl From<Tree> for super::Tree {
        fn from(old: Tree) -> Self {
            let entries = old
                .entries
                .into_iter()
                .map(|entry| super::TreeEntry {
                    name: entry.name,
                    mode: entry.mode,
                    mtime_ns: entry.mtime_ns,
                    size: entry.size,
                    content: match entry.content {
                        EntryContent::InlineFile(manifest) => {
                            super::EntryContent::InlineFile(manifest.into())
                        }
                        EntryContent::File { manifest } => super::EntryContent::File { manifest },
                        EntryContent::Directory { tree } => super::EntryContent::Directory { tree },
                        EntryContent::Symlink { target } => super::EntryContent::Symlink { target },
                    },
                    meta: super::EntryMeta::default(),
                })
                .collect();
            Self { entries }
        }
    }
}

impl Object {
    fn kind_name(kind: u8) -> &'static str {
        match kind {
            KIND_MANIFEST => "manifest",
            KIND_TREE => "tree",
            KIND_COMMIT => "commit",
            KIND_MANIFEST_INDEX => "manifest index",
            KIND_TREE_INDEX => "tree index",
            _ => "unknown",
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Self::Manifest(_) => KIND_MANIFEST,
            Self::Tree(_) => KIND_TREE,
            Self::Commit(_) => KIND_COMMIT,
            Self::ManifestIndex(_) => KIND_MANIFEST_INDEX,
            Self::TreeIndex(_) => KIND_TREE_INDEX,
        }
    }

    /// The versioned encoding.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let body = match self {
            Self::Manifest(manifest) => postcard::to_stdvec(manifest),
            Self::Tree(tree) => postcard::to_stdvec(tree),
            Self::Commit(commit) => postcard::to_stdvec(commit),
            Self::ManifestIndex(index) => postcard::to_stdvec(index),
            Self::TreeIndex(index) => postcard::to_stdvec(index),
        };
        // postcard only fails on types it cannot represent; ours are all plain data.
        let body = body.expect("object types serialize with postcard");
        let mut bytes = Vec::with_capacity(4 + body.len());
        bytes.extend_from_slice(MAGIC);
        bytes.push(OBJECT_FORMAT_VERSION);
        bytes.push(self.kind());
        bytes.extend_from_slice(&body);
        bytes
    }

    /// Decodes and validates an encoded object (format 2, or format 1 converted).
    ///
    /// # Errors
    /// [`ObjectError::Malformed`] for anything that is not a valid object.
    pub fn decode(bytes: &[u8]) -> Result<Self, ObjectError> {
        let malformed = |reason: String| ObjectError::Malformed { reason };
        if bytes.len() < 4 || &bytes[..2] != MAGIC {
            return Err(malformed("missing object header".into()));
        }
        let body = &bytes[4..];
        let object = match (bytes[2], bytes[3]) {
            (OBJECT_FORMAT_VERSION, KIND_MANIFEST) => Self::Manifest(exact(body)?),
            (OBJECT_FORMAT_VERSION, KIND_TREE) => Self::Tree(exact(body)?),
            (OBJECT_FORMAT_VERSION | OBJECT_FORMAT_V1, KIND_COMMIT) => Self::Commit(exact(body)?),
            (OBJECT_FORMAT_VERSION, KIND_MANIFEST_INDEX) => Self::ManifestIndex(exact(body)?),
            (OBJECT_FORMAT_VERSION, KIND_TREE_INDEX) => Self::TreeIndex(exact(body)?),
            (OBJECT_FORMAT_V1, KIND_MANIFEST) => {
                Self::Manifest(exact::<v1::FileManifest>(body)?.into())
            }
            (OBJECT_FORMAT_V1, KIND_TREE) => Self::Tree(exact::<v1::Tree>(body)?.into()),
            (OBJECT_FORMAT_VERSION | OBJECT_FORMAT_V1, other) => {
                return Err(malformed(format!("unknown object kind {other}")));
            }
            (version, _) => return Err(malformed(format!("unsupported object version {version}"))),
        };
        object.validate()?;
        Ok(object)
    }

    fn validate(&self) -> Result<(), ObjectError> {
        match self {
            Self::Manifest(manifest) => validate_manifest(manifest),
            Self::Tree(tree) => validate_tree(tree),
            Self::Commit(signed) => {
                SnapshotCommit::decode(&signed.commit)?;
                Ok(())
            }
            Self::ManifestIndex(index) => {
                let total = index
                    .parts
                    .iter()
                    .try_fold(0u64, |total, part| total.checked_add(part.size));
                if index.parts.is_empty() || total != Some(index.size) {
                    return Err(ObjectError::Malformed {
                        reason: "manifest index parts do not add up to its size".into(),
                    });
                }
                Ok(())
            }
            Self::TreeIndex(index) => {
                if index.parts.is_empty() {
                    return Err(ObjectError::Malformed {
                        reason: "tree index without parts".into(),
                    });
                }
                for pair in index.parts.windows(2) {
                    if pair[0].first >= pair[1].first {
                        return Err(ObjectError::Malformed {
                            reason: "tree index parts not sorted and unique".into(),
                        });
                    }
                }
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
            Self::ManifestIndex(_) => "manifest index",
            Self::TreeIndex(_) => "tree index",
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
            other => Err(other.wrong_kind("tree")),
        }
    }

    /// The object as a manifest.
    ///
    /// # Errors
    /// [`ObjectError::WrongKind`].
    pub fn into_manifest(self) -> Result<FileManifest, ObjectError> {
        match self {
            Self::Manifest(manifest) => Ok(manifest),
            other => Err(other.wrong_kind("manifest")),
        }
    }

    /// The object as a signed commit.
    ///
    /// # Errors
    /// [`ObjectError::WrongKind`].
    pub fn into_commit(self) -> Result<SignedCommit, ObjectError> {
        match self {
            Self::Commit(commit) => Ok(commit),
            other => Err(other.wrong_kind("commit")),
        }
    }

    /// The kind's name, for messages.
    #[must_use]
    pub fn name(&self) -> &'static str {
        Self::kind_name(self.kind())
    }

    /// The error for finding this object where `expected` was wanted.
    #[must_use]
    pub fn wrong_kind(&self, expected: &'static str) -> ObjectError {
        ObjectError::WrongKind {
            expected,
            found: self.name(),
        }
    }
}

impl SnapshotCommit {
    /// The encoding that is signed: `"FC" | version | postcard(commit)`.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![b'F', b'C', COMMIT_FORMAT_VERSION];
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
        if bytes.len() < 3 || &bytes[..2] != b"FC" || bytes[2] != COMMIT_FORMAT_VERSION {
            return Err(ObjectError::Malformed {
                reason: "missing commit header".into(),
            });
        }
        exact(&bytes[3..])
    }
}

fn validate_manifest(manifest: &FileManifest) -> Result<(), ObjectError> {
    let mut total = 0u64;
    for (index, extent) in manifest.extents.iter().enumerate() {
        if extent.is_empty() {
            return Err(ObjectError::Malformed {
                reason: format!("manifest extent {index} is empty"),
            });
        }
        if let (Extent::Hole { .. }, Some(Extent::Hole { .. })) =
            (extent, manifest.extents.get(index + 1))
        {
            return Err(ObjectError::Malformed {
                reason: "manifest has adjacent holes".into(),
            });
        }
        total = total
            .checked_add(extent.len())
            .ok_or_else(|| ObjectError::Malformed {
                reason: "manifest size overflows".into(),
            })?;
    }
    if total != manifest.size {
        return Err(ObjectError::Malformed {
            reason: format!("manifest extents add up to {total}, not {}", manifest.size),
        });
    }
    Ok(())
}

fn validate_tree(tree: &Tree) -> Result<(), ObjectError> {
    let malformed = |reason: String| Err(ObjectError::Malformed { reason });
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
        match &entry.content {
            EntryContent::InlineFile(manifest) => {
                validate_manifest(manifest)?;
                if manifest.size != entry.size {
                    return malformed("inline manifest size differs from the entry's".into());
                }
            }
            EntryContent::InlineData(data)
                if data.len() > INLINE_DATA_BYTES_MAX || data.len() as u64 != entry.size =>
            {
                return malformed("inline data size differs from the entry's".into());
            }
            _ => {}
        }
        if entry.mode & !0o7777 != 0 {
            return malformed(format!("entry mode {:o} has file type bits", entry.mode));
        }
        let xattrs = &entry.meta.xattrs;
        for pair in xattrs.windows(2) {
            if pair[0].name >= pair[1].name {
                return malformed("extended attributes not sorted and unique".into());
            }
        }
        let xattr_bytes: usize = xattrs
            .iter()
            .map(|xattr| xattr.name.len() + xattr.value.len())
            .sum();
        if xattr_bytes > XATTR_BYTES_MAX {
            return malformed(format!(
                "{xattr_bytes} bytes of extended attributes, over the {XATTR_BYTES_MAX}-byte bound"
            ));
        }
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
                        extents: vec![Extent::Chunk(ChunkRef {
                            cid: [1; 32],
                            len: 3,
                            key: [2; 32],
                        })],
                    }),
                    meta: EntryMeta::default(),
                },
                TreeEntry {
                    name: b"link".to_vec(),
                    mode: 0o777,
                    mtime_ns: 2,
                    size: 4,
                    content: EntryContent::Symlink {
                        target: b"a fi".to_vec(),
                    },
                    meta: EntryMeta {
                        uid: Some(1000),
                        gid: Some(100),
                        user: Some("ada".into()),
                        group: Some("users".into()),
                        atime_ns: None,
                        ctime_ns: Some(7),
                        xattrs: vec![Xattr {
                            name: b"user.origin".to_vec(),
                            value: b"lab".to_vec(),
                        }],
                        link_group: None,
                    },
                },
                TreeEntry {
                    name: b"pipe".to_vec(),
                    mode: 0o4755,
                    mtime_ns: 3,
                    size: 0,
                    content: EntryContent::Fifo,
                    meta: EntryMeta::default(),
                },
                TreeEntry {
                    name: b"small".to_vec(),
                    mode: 0o600,
                    mtime_ns: 4,
                    size: 5,
                    content: EntryContent::InlineData(b"hello".to_vec()),
                    meta: EntryMeta {
                        link_group: Some(1),
                        ..EntryMeta::default()
                    },
                },
                TreeEntry {
                    name: vec![b'z', 0xff, b'\n'],
                    mode: 0o755,
                    mtime_ns: -5,
                    size: 0,
                    content: EntryContent::Directory { tree: [3; 32] },
                    meta: EntryMeta::default(),
                },
            ],
        }
    }

    #[test]
    fn an_object_over_the_limit_is_refused_when_sealed() {
        let key = VolumeKey::from_bytes([9; 32]);
        let manifest = Object::Manifest(FileManifest {
            size: 100,
            extents: vec![
                Extent::Chunk(ChunkRef {
                    cid: [1; 32],
                    len: 50,
                    key: [2; 32],
                });
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
    fn holes_merge_and_count_no_chunks() {
        let mut manifest = FileManifest::default();
        manifest.push_hole(4);
        manifest.push_hole(6);
        manifest.push_chunk(ChunkRef {
            cid: [1; 32],
            len: 3,
            key: [2; 32],
        });
        manifest.push_hole(0);
        assert_eq!(manifest.size, 13);
        assert_eq!(manifest.extents.len(), 2);
        assert_eq!(manifest.chunk_count(), 1);
        let object = Object::Manifest(manifest);
        assert_eq!(Object::decode(&object.encode()).unwrap(), object);
    }

    #[test]
    fn indexes_round_trip() {
        let trees = Object::TreeIndex(TreeIndex {
            parts: vec![
                TreePart {
                    first: b"a".to_vec(),
                    cid: [1; 32],
                    entries: 10,
                },
                TreePart {
                    first: b"m".to_vec(),
                    cid: [2; 32],
                    entries: 7,
                },
            ],
        });
        assert_eq!(Object::decode(&trees.encode()).unwrap(), trees);
        let manifests = Object::ManifestIndex(ManifestIndex {
            size: 9,
            parts: vec![
                ManifestPart {
                    cid: [1; 32],
                    size: 4,
                },
                ManifestPart {
                    cid: [2; 32],
                    size: 5,
                },
            ],
        });
        assert_eq!(Object::decode(&manifests.encode()).unwrap(), manifests);
        assert!(matches!(
            manifests.into_tree(),
            Err(ObjectError::WrongKind {
                found: "manifest index",
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
            extents: vec![Extent::Chunk(ChunkRef {
                cid: [0; 32],
                len: 3,
                key: [0; 32],
            })],
        };
        assert!(Object::decode(&Object::Manifest(bad_sum).encode()).is_err());
        let two_holes = FileManifest {
            size: 10,
            extents: vec![Extent::Hole { len: 5 }, Extent::Hole { len: 5 }],
        };
        assert!(Object::decode(&Object::Manifest(two_holes).encode()).is_err());
        let mut long_inline = sample_tree();
        long_inline.entries[3].size = 6;
        assert!(Object::decode(&Object::Tree(long_inline).encode()).is_err());
        let mut type_bits = sample_tree();
        type_bits.entries[0].mode = 0o100_644;
        assert!(Object::decode(&Object::Tree(type_bits).encode()).is_err());
        let mut xattrs = sample_tree();
        xattrs.entries[1].meta.xattrs.push(Xattr {
            name: b"user.a".to_vec(),
            value: Vec::new(),
        });
        assert!(Object::decode(&Object::Tree(xattrs).encode()).is_err());
        let unsorted_index = TreeIndex {
            parts: vec![
                TreePart {
                    first: b"b".to_vec(),
                    cid: [1; 32],
                    entries: 1,
                },
                TreePart {
                    first: b"a".to_vec(),
                    cid: [2; 32],
                    entries: 1,
                },
            ],
        };
        assert!(Object::decode(&Object::TreeIndex(unsorted_index).encode()).is_err());
        let short_index = ManifestIndex {
            size: 3,
            parts: vec![ManifestPart {
                cid: [1; 32],
                size: 2,
            }],
        };
        assert!(Object::decode(&Object::ManifestIndex(short_index).encode()).is_err());
        let mut trailing = Object::Tree(sample_tree()).encode();
        trailing.push(0);
        assert!(Object::decode(&trailing).is_err());
        assert!(Object::decode(b"FO\x02\x01").is_err());
        assert!(Object::decode(b"FO\x03\x02\x00").is_err());
        assert!(Object::decode(b"").is_err());
        assert!(Object::decode(b"FO\x01\x09").is_err());
    }
}
