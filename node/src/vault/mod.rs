//! The single-node vault: one data directory, one RocksDB, this node's identity. Volumes,
//! dedup domains, import, export, snapshots and statistics live here.
//!
//! One process owns a data directory at a time (RocksDB admits one): `Vault::open` takes an
//! exclusive lock on `<data-dir>/lock`, and waits, saying so on stderr, while another
//! short-lived forge command holds it.

pub mod check;
pub mod cluster;
pub mod export;
pub mod fence;
pub mod groups;
pub(crate) mod import;
pub mod peers;
pub(crate) mod posix;
mod post_order;
pub mod records;
pub mod snapshots;
mod stats;
pub mod sync;
pub mod transfer;
pub(crate) mod trees;
pub mod trust;

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use forge_crypto::passphrase::{self, KdfParams};
use forge_crypto::{
    Cid, DomainKey, EnvelopeContents, NodeIdentity, NodePublicKeys, VolumeKey, envelope,
};
use forge_store::VolumeId;
use forge_store::chunker::{Chunker, ChunkerParams};
use forge_store::erasure::{ErasureCoder, ErasureLayout};
use forge_store::kv::{Column, KvEngine, RocksKv, RocksKvOptions, remove_unfinished_blob_files};
use forge_store::metadata::{
    Change, Expected, LocalMetadataStore, MetadataError, MetadataStore, RecordSpace, RecordUpdate,
};
use forge_store::object::{ChunkRef, EntryContent, Object, SnapshotCommit};
use zeroize::Zeroizing;

pub use export::{ExportOptions, ExportReport};
use fence::{GcFence, WriteSession};
pub use import::{ImportOptions, ImportReport};
pub use stats::{VaultStats, VolumeStats};

use crate::clock::{Clock, OsRandomness, Randomness, SystemClock};
use crate::datadir::DataDir;
use crate::error::{IntegrityFault, NodeError, Result};
use records::{DomainRecord, SnapshotListing, VolumeKeys, VolumeRecord, keys};

/// Stack of the vault's worker threads. No walk over a tree recurses (import and export
/// are post-order jobs, post_order.rs; gc, fsck, stats, diff and mount commits keep
/// explicit stacks), so the depth of a tree never meets it; it is room for rayon running a
/// few jobs nested while one waits (a large file's sealing scope).
const VAULT_THREAD_STACK_BYTES: usize = 16 << 20;

/// The record space of trusted node keys: NodeId → its `NodePublicKeys` encoding.
pub const KEYRING: RecordSpace = RecordSpace::new("keyring");

/// The name of the default dedup domain.
pub const DEFAULT_DOMAIN: &str = "default";
/// The opt-in shared public domain (a publicly known key: dedup across tenants).
pub const PUBLIC_DOMAIN: &str = "public";
/// The default branch.
pub const DEFAULT_BRANCH: &str = "main";
/// Associated data of sealed chunks.
pub const CHUNK_AAD: &[u8] = b"forge-vault chunk v1";

/// Supplies a passphrase when one is needed (prompt, environment, test value).
pub type PassphraseSource<'a> = &'a dyn Fn(&str, bool) -> Result<Zeroizing<String>>;

/// The passphrase source of work that cannot ask anyone (a check, the daemon's own
/// work): volumes whose keys need a passphrase do not open, saying so.
///
/// # Errors
/// Always [`NodeError::PassphraseUnavailable`].
pub fn no_passphrase(_: &str, _: bool) -> Result<Zeroizing<String>> {
    Err(NodeError::PassphraseUnavailable)
}

/// What a vault is built from. `forge` passes RocksDB, the local metadata store, the
/// system clock, the OS random number generator and every core; tests and the simulator
/// pass `MemKv`, a stepping clock, seeded randomness and one thread.
#[derive(Debug, Clone)]
pub struct VaultParts {
    /// The storage engine.
    pub kv: Arc<dyn KvEngine>,
    /// The replicated records (refs, pins, gc state); None: a `LocalMetadataStore` on `kv`.
    pub metadata: Option<Arc<dyn MetadataStore>>,
    /// Where time comes from.
    pub clock: Arc<dyn Clock>,
    /// Where random bytes come from.
    pub randomness: Arc<dyn Randomness>,
    /// Threads for parallel work (import); 1 makes it sequential and repeatable.
    pub threads: usize,
}

impl VaultParts {
    /// The production parts around `kv`: system clock, OS randomness, every core.
    #[must_use]
    pub fn system(kv: Arc<dyn KvEngine>) -> Self {
        Self {
            kv,
            metadata: None,
            clock: Arc::new(SystemClock),
            randomness: Arc::new(OsRandomness),
            threads: std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
        }
    }
}

/// Work a vault did since it opened, counted as it goes (the daemon's /metrics reads them).
#[derive(Debug, Default)]
pub struct OperationCounters {
    /// Files imports stored.
    pub import_files: AtomicU64,
    /// Their bytes.
    pub import_bytes: AtomicU64,
    /// Files exports and restores wrote.
    pub export_files: AtomicU64,
    /// Their bytes.
    pub export_bytes: AtomicU64,
    /// Objects of grouped volumes this node lacked and fetched from its group.
    pub group_objects_fetched: AtomicU64,
}

impl OperationCounters {
    /// Adds one file of `bytes` to `files` and `total`.
    pub(crate) fn count_file(files: &AtomicU64, total: &AtomicU64, bytes: u64) {
        files.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        total.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An open vault.
pub struct Vault {
    data_dir: DataDir,
    kv: Arc<dyn KvEngine>,
    metadata: Arc<dyn MetadataStore>,
    fence: Arc<GcFence>,
    limits: VaultLimits,
    identity: Arc<NodeIdentity>,
    clock: Arc<dyn Clock>,
    randomness: Arc<dyn Randomness>,
    /// Where import's parallel work runs.
    pool: rayon::ThreadPool,
    counters: OperationCounters,
    /// The daemon's access to volume groups (None outside a daemon, or before its
    /// cluster starts): see groups.rs.
    group_storage: std::sync::RwLock<Option<Arc<dyn groups::GroupStorage>>>,
    /// Bumped by every local write of records a group decided (a publish's, an update's),
    /// under its lock: a mirror refresh that read the group's state before one skips its
    /// writes (it would put an older ref back; see `groups::mirror_group_records`).
    mirror_epoch: std::sync::Mutex<u64>,
    /// The data directory's lock (None when the caller guarantees exclusive use).
    _lock: Option<File>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Vault")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// Limits checked where data is written, so nothing stored is ever unreadable. Tests set
/// small ones to reach them with little data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaultLimits {
    /// Largest encoded object (tree, manifest) written; at most what readers accept.
    pub object_bytes_max: usize,
    /// The smallest part a large tree or manifest is split into; one over eight times this
    /// (or over the object limit) is split (see trees.rs).
    pub part_bytes_min: usize,
    /// The deepest directory nesting a volume holds (import and a mount's commit refuse
    /// deeper trees, saying so). Walks hold a descriptor per level, so the default stays
    /// well under the usual 20,000-descriptor hard limit.
    pub tree_depth_max: usize,
}

impl VaultLimits {
    /// The largest tree or manifest object written whole (and the largest part).
    #[must_use]
    pub fn part_bytes_max(&self) -> usize {
        self.part_bytes_min
            .saturating_mul(8)
            .min(self.object_bytes_max)
            .min(forge_store::object::OBJECT_BYTES_MAX)
    }
}

impl Default for VaultLimits {
    fn default() -> Self {
        Self {
            object_bytes_max: forge_store::object::OBJECT_BYTES_MAX,
            part_bytes_min: 16 << 10,
            tree_depth_max: import::TREE_DEPTH_MAX,
        }
    }
}

/// Options of `volume create`.
#[derive(Debug, Clone, Default)]
pub struct CreateVolumeOptions {
    /// Erasure layout (default 1+0).
    pub layout: Option<ErasureLayout>,
    /// Dedup domain name (default: [`DEFAULT_DOMAIN`]).
    pub domain: Option<String>,
    /// Average chunk size for a new domain.
    pub chunk_avg_bytes: Option<u32>,
    /// Keys wrapped to a passphrase, in a domain of the volume's own.
    pub encrypted: bool,
}

/// Whether opening a vault waits for the data directory's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LockWait {
    /// Wait (a short command queues behind another).
    Wait,
    /// Wait while no owner (daemon, mount host) is recorded; fail once one is.
    UnlessOwned,
}

/// A volume opened for reading or writing: its record and keys.
pub(crate) struct OpenVolume {
    pub record: VolumeRecord,
    pub id: VolumeId,
    /// The key new objects are sealed with (the newest this node holds).
    pub volume_key: VolumeKey,
    /// The keys before it, newest first (from the key chain: `unshare` rotates the key);
    /// objects sealed before a rotation open with one of them.
    pub older_keys: Vec<VolumeKey>,
    /// None for a reader's share: it reads, it cannot write (no convergent keys).
    pub domain_key: Option<DomainKey>,
    pub domain: DomainRecord,
}

impl Vault {
    /// Opens the vault in `data_dir`, waiting for the directory lock if another forge
    /// command holds it.
    ///
    /// # Errors
    /// Format, identity, lock and engine errors.
    pub fn open(data_dir: &DataDir, passphrase: PassphraseSource<'_>) -> Result<Self> {
        Self::open_locking(data_dir, passphrase, LockWait::Wait)
    }

    /// [`Vault::open`] for a process that will own the data directory (a daemon, a mount
    /// host): it waits for a short command holding the lock, but fails once another owner
    /// is recorded, so of two owners starting together one serves and the other is told
    /// (it would otherwise wait for the first to exit, then serve).
    ///
    /// # Errors
    /// [`NodeError::Busy`] naming the owner; as [`Vault::open`].
    pub fn open_owned(data_dir: &DataDir, passphrase: PassphraseSource<'_>) -> Result<Self> {
        Self::open_locking(data_dir, passphrase, LockWait::UnlessOwned)
    }

    fn open_locking(
        data_dir: &DataDir,
        passphrase: PassphraseSource<'_>,
        wait: LockWait,
    ) -> Result<Self> {
        data_dir.check_format()?;
        let lock_path = data_dir.path().join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(NodeError::io("opening", &lock_path))?;
        if lock.try_lock().is_err() {
            let _ = writeln!(
                std::io::stderr(),
                "forge: waiting for another forge process using {} ...",
                data_dir.path().display()
            );
            match wait {
                LockWait::Wait => lock.lock().map_err(NodeError::io("locking", &lock_path))?,
                // A short command ends on its own: wait for it. An owner (a daemon or mount
                // host, recorded once it serves) does not: refuse, naming it.
                LockWait::UnlessOwned => loop {
                    if let Some(pid) = crate::owner::owner(data_dir)? {
                        return Err(NodeError::Busy {
                            what: data_dir.path().display().to_string(),
                            reason: format!(
                                "forge process {pid} already owns it (`forge node status` \
                                 shows it, `forge node stop` stops it)"
                            ),
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    if lock.try_lock().is_ok() {
                        break;
                    }
                },
            }
        }
        let identity =
            data_dir.load_identity(|| passphrase("Passphrase for this node's keys", false))?;
        let db_path = data_dir.path().join("db");
        // Safe only now: the directory lock is held and the database not yet open.
        let unfinished = remove_unfinished_blob_files(&db_path)?;
        if unfinished.files > 0 {
            tracing::info!(
                files = unfinished.files,
                bytes = unfinished.bytes,
                "removed blob files an interrupted flush or compaction left behind"
            );
        }
        let kv: Arc<dyn KvEngine> = Arc::new(RocksKv::open(&db_path, &RocksKvOptions::default())?);
        let mut vault = Self::from_parts(data_dir, identity, VaultParts::system(kv))?;
        vault._lock = Some(lock);
        Ok(vault)
    }

    /// A vault over `parts`, with `identity` as this node. The caller guarantees that
    /// nothing else uses the store (no directory lock is taken): tests, the simulator.
    /// Pins and a gc sweep on record are taken to be an earlier process's, and cleared.
    ///
    /// # Errors
    /// Engine errors clearing them.
    pub fn from_parts(
        data_dir: &DataDir,
        identity: NodeIdentity,
        parts: VaultParts,
    ) -> Result<Self> {
        let metadata = parts
            .metadata
            .unwrap_or_else(|| Arc::new(LocalMetadataStore::new(parts.kv.clone())));
        let fence = Arc::new(GcFence::new(metadata.clone()));
        fence.recover()?;
        // A pool of its own even for one thread: parallel work inside it (import's
        // par_iter) then stays on that thread, in order, instead of rayon's global pool.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(parts.threads.max(1))
            .thread_name(|index| format!("forge-vault-{index}"))
            .stack_size(VAULT_THREAD_STACK_BYTES)
            .build()
            .map_err(|error| NodeError::Io {
                action: "starting the vault's threads",
                path: data_dir.path().to_owned(),
                source: std::io::Error::other(error.to_string()),
            })?;
        Ok(Self {
            data_dir: data_dir.clone(),
            kv: parts.kv,
            metadata,
            fence,
            limits: VaultLimits::default(),
            identity: Arc::new(identity),
            clock: parts.clock,
            randomness: parts.randomness,
            pool,
            counters: OperationCounters::default(),
            group_storage: std::sync::RwLock::new(None),
            mirror_epoch: std::sync::Mutex::new(0),
            _lock: None,
        })
    }

    /// The time now, from the vault's clock.
    #[must_use]
    pub fn now_ns(&self) -> i64 {
        self.clock.now_ns()
    }

    /// `N` random bytes from the vault's source.
    ///
    /// # Errors
    /// The source failed.
    pub(crate) fn random_array<const N: usize>(&self) -> Result<[u8; N]> {
        Ok(crate::clock::random_array(self.randomness.as_ref())?)
    }

    /// What this vault did since it opened.
    #[must_use]
    pub fn counters(&self) -> &OperationCounters {
        &self.counters
    }

    /// Runs `work` on the vault's threads (with one thread: sequentially, in order). A
    /// lockstep closure's work stays its (the simulator: see `lockstep::within`).
    pub(crate) fn in_pool<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        let lockstep = crate::lockstep::current();
        self.pool
            .install(move || crate::lockstep::within(lockstep, work))
    }

    /// Wraps `contents` to this node's keys, with randomness from the vault's source.
    fn wrap_to_node(&self, contents: &EnvelopeContents, binding: &[u8]) -> Result<Vec<u8>> {
        self.wrap_to(self.identity.public_keys(), contents, binding)
    }

    /// Wraps `contents` to `recipient`, with randomness from the vault's source.
    pub(crate) fn wrap_to(
        &self,
        recipient: &NodePublicKeys,
        contents: &EnvelopeContents,
        binding: &[u8],
    ) -> Result<Vec<u8>> {
        let randomness = forge_crypto::WrapRandomness {
            ml_kem_m: self.random_array()?,
            x25519_ephemeral: self.random_array()?,
        };
        Ok(envelope::wrap_with_randomness(
            recipient,
            contents,
            binding,
            &randomness,
        )?)
    }

    /// Signs `message` in `domain` as this node, with randomness from the vault's source.
    pub(crate) fn sign(
        &self,
        domain: forge_crypto::SignatureDomain,
        message: &[u8],
    ) -> Result<forge_crypto::Signature> {
        Ok(self
            .identity
            .sign_with_randomness(domain, message, self.random_array()?)?)
    }

    /// The data directory.
    #[must_use]
    pub fn data_dir(&self) -> &DataDir {
        &self.data_dir
    }

    /// The storage engine.
    pub(crate) fn kv(&self) -> &dyn KvEngine {
        self.kv.as_ref()
    }

    /// The storage engine, shared (the daemon's Raft groups keep their logs in it).
    pub(crate) fn shared_kv(&self) -> Arc<dyn KvEngine> {
        self.kv.clone()
    }

    /// The limits writes are checked against.
    #[must_use]
    pub fn limits(&self) -> VaultLimits {
        self.limits
    }

    /// Replaces the limits (tests use small ones).
    pub fn set_limits(&mut self, limits: VaultLimits) {
        self.limits = limits;
    }

    /// The metadata store (refs and every other replicated record).
    pub(crate) fn refs(&self) -> &dyn MetadataStore {
        self.metadata.as_ref()
    }

    /// The fence between gc and writers.
    pub(crate) fn fence(&self) -> &GcFence {
        &self.fence
    }

    /// Opens a write session on `volume` (an import, a mount): what it claims is safe
    /// from a concurrent gc until it is dropped.
    ///
    /// # Errors
    /// Metadata errors recording its pin.
    pub(crate) fn open_write_session(&self, kind: &str, volume: VolumeId) -> Result<WriteSession> {
        let mut session =
            self.fence
                .open_session(kind, volume, *self.identity.node_id().as_bytes())?;
        // A grouped volume's writer also pins the group, so that the group's gc (on any
        // member) never sweeps what this writer deduplicates against.
        session.group_pin = self.pin_group(&volume, kind)?;
        Ok(session)
    }

    /// This node's identity.
    pub(crate) fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// This node's identity, shared (the network signs its Hellos with it).
    #[must_use]
    pub fn shared_identity(&self) -> Arc<NodeIdentity> {
        self.identity.clone()
    }

    /// Creates a volume.
    ///
    /// # Errors
    /// [`NodeError::VolumeExists`], invalid names or sizes, engine errors.
    pub fn create_volume(
        &self,
        name: &str,
        options: &CreateVolumeOptions,
        passphrase: PassphraseSource<'_>,
    ) -> Result<VolumeRecord> {
        validate_name("volume name", name)?;
        if self.volume_record(name)?.is_some() {
            return Err(NodeError::VolumeExists {
                name: name.to_owned(),
            });
        }
        let id = VolumeId::from_bytes(self.random_array()?);
        let layout = options.layout.unwrap_or(ErasureLayout::SINGLE);
        let volume_key = VolumeKey::from_bytes(self.random_array()?);
        // One atomic update: the volume, its keys and a new domain appear together, and a
        // volume or domain created meanwhile by another writer makes it fail, not overwrite.
        let mut updates = Vec::new();

        let (domain_name, domain_key) = if options.encrypted {
            if options.domain.is_some() {
                return Err(NodeError::InvalidArgument {
                    what: "option",
                    value: "--domain".into(),
                    reason: "an --encrypted volume always gets a dedup domain of its own".into(),
                });
            }
            let name = format!("private-{id}");
            let params = chunker_params(options.chunk_avg_bytes)?;
            let key = DomainKey::from_bytes(self.random_array()?);
            let record = self.domain_record_new(params)?;
            updates.push(RecordUpdate::new(
                RecordSpace::DOMAINS,
                name.as_bytes().to_vec(),
                Expected::Absent,
                Change::Put(record.encode()),
            ));
            (name, key)
        } else {
            let name = options
                .domain
                .clone()
                .unwrap_or_else(|| DEFAULT_DOMAIN.to_owned());
            validate_name("domain name", &name)?;
            match self.domain_record(&name)? {
                Some(existing) => {
                    if let Some(avg) = options.chunk_avg_bytes
                        && avg != existing.chunk_avg_bytes
                    {
                        return Err(NodeError::InvalidArgument {
                            what: "--chunk-avg",
                            value: avg.to_string(),
                            reason: format!(
                                "chunk sizes belong to the domain; {name:?} uses {} bytes",
                                existing.chunk_avg_bytes
                            ),
                        });
                    }
                    let key = self.unwrap_domain_key(&name, &existing)?;
                    (name, key)
                }
                None => {
                    let key = if name == PUBLIC_DOMAIN {
                        DomainKey::shared_public()
                    } else {
                        DomainKey::from_bytes(self.random_array()?)
                    };
                    let mut record =
                        self.domain_record_new(chunker_params(options.chunk_avg_bytes)?)?;
                    let contents = EnvelopeContents::Domain {
                        domain_key: key.clone(),
                    };
                    record.key_envelope =
                        Some(self.wrap_to_node(&contents, &domain_binding(&record.id))?);
                    updates.push(RecordUpdate::new(
                        RecordSpace::DOMAINS,
                        name.as_bytes().to_vec(),
                        Expected::Absent,
                        Change::Put(record.encode()),
                    ));
                    (name, key)
                }
            }
        };

        let contents = EnvelopeContents::Writer {
            volume_key,
            domain_key,
        };
        let volume_keys = if options.encrypted {
            let secret = passphrase("New passphrase for this volume", true)?;
            VolumeKeys::Passphrase(passphrase::protect_with_randomness(
                secret.as_bytes(),
                &contents.to_bytes(),
                KdfParams::DEFAULT,
                self.random_array()?,
                self.random_array()?,
            )?)
        } else {
            VolumeKeys::WrappedToNode(self.wrap_to_node(&contents, &volume_binding(&id))?)
        };
        let record = VolumeRecord {
            id: *id.as_bytes(),
            name: name.to_owned(),
            data_shards: u16::try_from(layout.data_shards()).unwrap_or(u16::MAX),
            parity_shards: u16::try_from(layout.parity_shards()).unwrap_or(u16::MAX),
            domain: domain_name,
            encrypted: options.encrypted,
            created_ns: self.now_ns(),
        };
        updates.push(RecordUpdate::new(
            RecordSpace::VOLUME_KEYS,
            id.as_bytes().to_vec(),
            Expected::Absent,
            Change::Put(records::encode(&volume_keys)),
        ));
        updates.push(RecordUpdate::new(
            RecordSpace::VOLUMES,
            name.as_bytes().to_vec(),
            Expected::Absent,
            Change::Put(records::encode(&record)),
        ));
        match self.metadata.apply(&updates) {
            Ok(()) => Ok(record),
            Err(MetadataError::RecordConflict { space, .. })
                if space == RecordSpace::VOLUMES.name() =>
            {
                Err(NodeError::VolumeExists {
                    name: name.to_owned(),
                })
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Every volume, sorted by name.
    ///
    /// # Errors
    /// Engine errors or corrupt records.
    pub fn list_volumes(&self) -> Result<Vec<VolumeRecord>> {
        self.metadata
            .scan_records(RecordSpace::VOLUMES, b"")?
            .iter()
            .map(|(_, value)| records::decode("volume", value))
            .collect()
    }

    /// The branches of a volume with their heads.
    ///
    /// # Errors
    /// Unknown volume, engine errors.
    pub fn branches(&self, volume: &str) -> Result<Vec<(String, Cid)>> {
        let record = self.require_volume(volume)?;
        Ok(self.refs().list_refs(&VolumeId::from_bytes(record.id))?)
    }

    /// Whether `snapshot` is in its volume's listing.
    ///
    /// # Errors
    /// Engine errors.
    pub(crate) fn is_listed(&self, volume: &OpenVolume, snapshot: &Cid) -> Result<bool> {
        Ok(self
            .metadata
            .get_record(
                RecordSpace::SNAPSHOTS,
                &[volume.id.as_bytes().as_slice(), snapshot.as_bytes()].concat(),
            )?
            .is_some())
    }

    /// The snapshots of a volume (listing entries with their ids), oldest first.
    ///
    /// # Errors
    /// Unknown volume, engine errors.
    pub(crate) fn snapshot_listings(
        &self,
        record: &VolumeRecord,
    ) -> Result<Vec<(Cid, SnapshotListing)>> {
        let prefix = record.id;
        let mut listings = self
            .metadata
            .scan_records(RecordSpace::SNAPSHOTS, &prefix)?
            .into_iter()
            .map(|(key, value)| {
                let cid = Cid::from_slice(&key[prefix.len()..]).map_err(|error| {
                    NodeError::CorruptRecord {
                        what: "snapshot listing",
                        reason: error.to_string(),
                    }
                })?;
                Ok((
                    cid,
                    records::decode::<SnapshotListing>("snapshot listing", &value)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        listings.sort_by_key(|(cid, listing)| (listing.time_ns, *cid));
        Ok(listings)
    }

    /// Resolves a snapshot id or unique prefix (at least 8 characters) in a volume.
    ///
    /// # Errors
    /// [`NodeError::UnknownSnapshot`], [`NodeError::AmbiguousSnapshot`], invalid prefix.
    pub(crate) fn resolve_snapshot(&self, record: &VolumeRecord, id: &str) -> Result<Cid> {
        let lower = id.to_ascii_lowercase();
        if lower.len() < 8
            || lower.len() > 64
            || !lower.bytes().all(|byte| byte.is_ascii_hexdigit())
        {
            return Err(NodeError::InvalidArgument {
                what: "snapshot id",
                value: id.to_owned(),
                reason: "give 8 to 64 hex characters".into(),
            });
        }
        let matches: Vec<Cid> = self
            .snapshot_listings(record)?
            .into_iter()
            .map(|(cid, _)| cid)
            .filter(|cid| cid.to_hex().starts_with(&lower))
            .collect();
        match matches.as_slice() {
            [one] => Ok(*one),
            [] => Err(NodeError::UnknownSnapshot {
                volume: record.name.clone(),
                id: id.to_owned(),
            }),
            _ => Err(NodeError::AmbiguousSnapshot {
                volume: record.name.clone(),
                id: id.to_owned(),
            }),
        }
    }

    /// The public keys of node `node` if this vault trusts it: itself, or a node in the
    /// keyring ([`KEYRING`]). The NodeId is recomputed from the stored key, never taken on
    /// trust.
    ///
    /// # Errors
    /// [`NodeError::UntrustedSigner`]; a keyring record that does not decode or names
    /// another node.
    pub(crate) fn trusted_keys(&self, node: &[u8; 32], what: &str) -> Result<NodePublicKeys> {
        if node == self.identity.node_id().as_bytes() {
            return Ok(self.identity.public_keys().clone());
        }
        let Some(bytes) = self.metadata.get_record(KEYRING, node)? else {
            return Err(NodeError::UntrustedSigner {
                what: what.to_owned(),
                node: forge_crypto::NodeId::from_bytes(*node).to_hex(),
            });
        };
        let keys = NodePublicKeys::decode(&bytes)?;
        if keys.node_id().as_bytes() != node {
            return Err(NodeError::CorruptRecord {
                what: "keyring",
                reason: format!(
                    "the entry for node {} holds the keys of node {}",
                    forge_crypto::NodeId::from_bytes(*node),
                    keys.node_id()
                ),
            });
        }
        Ok(keys)
    }

    /// Adds a node's public keys to the keyring: snapshots and index heads it signed
    /// verify here from now on (a group member's, a peer's).
    ///
    /// # Errors
    /// Metadata errors.
    pub fn trust_node(&self, keys: &NodePublicKeys) -> Result<()> {
        self.metadata.apply(&[RecordUpdate::new(
            KEYRING,
            keys.node_id().as_bytes().to_vec(),
            Expected::Any,
            Change::Put(keys.encode()),
        )])?;
        Ok(())
    }

    /// Reads and verifies a snapshot commit.
    ///
    /// # Errors
    /// Integrity errors for a missing, undecodable or badly signed commit.
    pub(crate) fn read_commit(&self, volume: &OpenVolume, cid: &Cid) -> Result<SnapshotCommit> {
        let signed = self.read_object(volume, cid)?.into_commit()?;
        // Decoded first only to learn who signed it; nothing of it is used unverified.
        let commit = SnapshotCommit::decode(&signed.commit)?;
        self.trusted_keys(&commit.author, &format!("snapshot {cid}"))?
            .verify(
                forge_crypto::SignatureDomain::Snapshot,
                &signed.commit,
                &forge_crypto::Signature::from_bytes(&signed.signature)?,
            )
            .map_err(|error| IntegrityFault::BadSignature {
                what: format!("snapshot {cid}"),
                reason: error.to_string(),
            })?;
        if commit.volume != *volume.id.as_bytes() {
            return Err(IntegrityFault::ForeignSnapshot { cid: *cid }.into());
        }
        Ok(commit)
    }

    /// Reads, verifies and opens an object of a volume.
    ///
    /// # Errors
    /// Integrity errors naming the cid.
    pub(crate) fn read_object(&self, volume: &OpenVolume, cid: &Cid) -> Result<Object> {
        let stored = match self.kv.get(Column::Objects, cid.as_bytes())? {
            Some(stored) => stored,
            // A grouped volume's object published while this node was away.
            None => self
                .fetch_grouped_object(&volume.id, cid)?
                .ok_or(IntegrityFault::MissingObject { cid: *cid })?,
        };
        let opened = Object::open(&volume.volume_key, cid, &stored);
        let opened = match opened {
            // Sealed before the key was rotated: one of the older keys opens it.
            Err(error) => volume
                .older_keys
                .iter()
                .find_map(|key| Object::open(key, cid, &stored).ok())
                .ok_or(error),
            ok => ok,
        };
        opened.map_err(|error| {
            IntegrityFault::UnreadableObject {
                cid: *cid,
                reason: error.to_string(),
            }
            .into()
        })
    }

    /// Whether `cid` is stored here whole: an object (or index node), or a chunk (its
    /// first shard, written last). What a publish re-checks after a gc overlapped it.
    ///
    /// # Errors
    /// Engine errors.
    pub(crate) fn stores(&self, cid: &Cid) -> Result<bool> {
        Ok(self.kv.contains(Column::Objects, cid.as_bytes())? || self.chunk_stored(cid)?)
    }

    /// Whether this vault holds a volume's keys (wrapped to it or to a passphrase); a
    /// volume received without them is a zero-knowledge copy.
    ///
    /// # Errors
    /// Metadata errors.
    pub fn holds_volume_keys(&self, record: &VolumeRecord) -> Result<bool> {
        Ok(self
            .metadata
            .get_record(RecordSpace::VOLUME_KEYS, &record.id)?
            .is_some())
    }

    /// A volume's record, if it exists.
    ///
    /// # Errors
    /// Engine errors or a corrupt record.
    pub fn volume_record(&self, name: &str) -> Result<Option<VolumeRecord>> {
        self.metadata
            .get_record(RecordSpace::VOLUMES, name.as_bytes())?
            .map(|value| records::decode("volume", &value))
            .transpose()
    }

    pub(crate) fn require_volume(&self, name: &str) -> Result<VolumeRecord> {
        self.volume_record(name)?
            .ok_or_else(|| NodeError::UnknownVolume {
                name: name.to_owned(),
            })
    }

    /// A new domain's record (its key envelope is added by the caller).
    fn domain_record_new(&self, params: ChunkerParams) -> Result<DomainRecord> {
        Ok(DomainRecord {
            chunker_version: records::CHUNKER_VERSION,
            id: self.random_array()?,
            chunk_min_bytes: params.min_bytes,
            chunk_avg_bytes: params.avg_bytes,
            chunk_max_bytes: params.max_bytes,
            key_envelope: None,
        })
    }

    pub(crate) fn domain_record(&self, name: &str) -> Result<Option<DomainRecord>> {
        self.metadata
            .get_record(RecordSpace::DOMAINS, name.as_bytes())?
            .map(|value| DomainRecord::decode(&value))
            .transpose()
    }

    fn unwrap_domain_key(&self, name: &str, record: &DomainRecord) -> Result<DomainKey> {
        let Some(wrapped) = &record.key_envelope else {
            return Err(NodeError::InvalidArgument {
                what: "domain",
                value: name.to_owned(),
                reason: "it is private to an encrypted volume".into(),
            });
        };
        let contents = envelope::unwrap(&self.identity, wrapped, &domain_binding(&record.id))?;
        contents
            .domain_key()
            .cloned()
            .ok_or_else(|| NodeError::CorruptRecord {
                what: "domain",
                reason: "envelope carries no domain key".into(),
            })
    }

    /// Opens a volume's keys (asking for its passphrase if it is encrypted).
    pub(crate) fn open_volume(
        &self,
        name: &str,
        passphrase: PassphraseSource<'_>,
    ) -> Result<OpenVolume> {
        let record = self.require_volume(name)?;
        let id = VolumeId::from_bytes(record.id);
        // No keys: a volume received without an envelope for this node.
        let stored = self
            .metadata
            .get_record(RecordSpace::VOLUME_KEYS, &record.id)?
            .ok_or_else(|| NodeError::NoVolumeKey {
                name: name.to_owned(),
                node: self.identity.node_id().to_hex(),
            })?;
        let contents = match records::decode::<VolumeKeys>("volume keys", &stored)? {
            VolumeKeys::WrappedToNode(wrapped) => {
                envelope::unwrap(&self.identity, &wrapped, &volume_binding(&id))?
            }
            VolumeKeys::Passphrase(protected) => {
                let secret = passphrase(&format!("Passphrase for volume {name}"), false)?;
                EnvelopeContents::from_bytes(&passphrase::unprotect(
                    secret.as_bytes(),
                    &protected,
                )?)?
            }
        };
        let Some(volume_key) = contents.volume_key().cloned() else {
            return Err(NodeError::CorruptRecord {
                what: "volume keys",
                reason: "no volume key in them".into(),
            });
        };
        let domain_key = contents.domain_key().cloned();
        let domain =
            self.domain_record(&record.domain)?
                .ok_or_else(|| NodeError::CorruptRecord {
                    what: "domain",
                    reason: format!("domain {:?} missing", record.domain),
                })?;
        let older_keys = self.older_volume_keys(&id, &volume_key)?;
        Ok(OpenVolume {
            record,
            id,
            volume_key,
            older_keys,
            domain_key,
            domain,
        })
    }
}

impl OpenVolume {
    /// The dedup domain's key, which writing needs.
    ///
    /// # Errors
    /// A volume shared with this node for reading only.
    pub(crate) fn domain_key(&self) -> Result<&DomainKey> {
        self.domain_key
            .as_ref()
            .ok_or_else(|| NodeError::InvalidArgument {
                what: "volume",
                value: self.record.name.clone(),
                reason: "this node may only read it (it was shared without --write): it holds \
                         no domain key to write with"
                    .into(),
            })
    }

    pub(crate) fn chunker(&self) -> Result<Chunker> {
        if self.domain.chunker_version != records::CHUNKER_VERSION {
            return Err(NodeError::InvalidArgument {
                what: "dedup domain",
                value: self.record.domain.clone(),
                reason: format!(
                    "its chunks were cut by chunker version {}; this forge has version {}",
                    self.domain.chunker_version,
                    records::CHUNKER_VERSION
                ),
            });
        }
        let params = ChunkerParams {
            min_bytes: self.domain.chunk_min_bytes,
            avg_bytes: self.domain.chunk_avg_bytes,
            max_bytes: self.domain.chunk_max_bytes,
        };
        Ok(Chunker::new(params, self.domain_key()?.chunker_seed())?)
    }

    pub(crate) fn coder(&self) -> Result<ErasureCoder> {
        let layout = ErasureLayout::new(
            usize::from(self.record.data_shards),
            usize::from(self.record.parity_shards),
        )?;
        Ok(ErasureCoder::new(layout)?)
    }
}

fn chunker_params(avg_bytes: Option<u32>) -> Result<ChunkerParams> {
    Ok(match avg_bytes {
        Some(avg) => ChunkerParams::from_average(avg)?,
        None => ChunkerParams::DEFAULT,
    })
}

pub(crate) fn volume_binding(id: &VolumeId) -> Vec<u8> {
    keys::key(b"volume:", &[id.as_bytes()])
}

fn domain_binding(id: &[u8; 16]) -> Vec<u8> {
    keys::key(b"domain:", &[id])
}

/// Checks a user-chosen name: 1 to 128 characters from `A-Z a-z 0-9 . _ -`, not starting
/// with `.` or `-`.
///
/// # Errors
/// [`NodeError::InvalidArgument`].
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let reason = if name.is_empty() || name.len() > 128 {
        Some("use 1 to 128 characters")
    } else if name.starts_with('.') || name.starts_with('-') {
        Some("must not start with '.' or '-'")
    } else if !name
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
    {
        Some("use only letters, digits, '.', '_' and '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NodeError::InvalidArgument {
            what,
            value: name.to_owned(),
            reason: reason.to_owned(),
        }),
        None => Ok(()),
    }
}

/// One row of `forge snapshot list`.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// The snapshot id.
    pub id: Cid,
    /// Parent ids.
    pub parents: Vec<Cid>,
    /// Commit time, ns since the epoch.
    pub time_ns: i64,
    /// The message.
    pub message: String,
    /// Branches whose head it is.
    pub branches: Vec<String>,
    /// File bytes.
    pub logical_bytes: u64,
    /// Files.
    pub file_count: u64,
    /// The DNA of the workload that made it.
    pub dna: std::collections::BTreeMap<String, String>,
    /// The node that made (and signed) it.
    pub author: [u8; 32],
}

impl Vault {
    /// A volume's snapshots, oldest first, each with its verified commit.
    ///
    /// # Errors
    /// Unknown volume, integrity errors.
    pub fn list_snapshots(
        &self,
        name: &str,
        passphrase: PassphraseSource<'_>,
    ) -> Result<Vec<SnapshotInfo>> {
        let volume = self.open_volume(name, passphrase)?;
        let heads = self.refs().list_refs(&volume.id)?;
        self.snapshot_listings(&volume.record)?
            .into_iter()
            .map(|(id, listing)| {
                let commit = self.read_commit(&volume, &id)?;
                Ok(SnapshotInfo {
                    id,
                    parents: commit
                        .parents
                        .iter()
                        .map(|parent| Cid::from_bytes(*parent))
                        .collect(),
                    time_ns: commit.time_ns,
                    message: commit.message,
                    branches: heads
                        .iter()
                        .filter(|(_, head)| *head == id)
                        .map(|(branch, _)| branch.clone())
                        .collect(),
                    logical_bytes: listing.logical_bytes,
                    file_count: listing.file_count,
                    dna: commit.dna,
                    author: commit.author,
                })
            })
            .collect()
    }
}

impl Vault {
    /// The signed reference-index head of a snapshot, checked against this node's key.
    ///
    /// # Errors
    /// Integrity errors for a missing head, a bad record or a bad signature.
    pub(crate) fn index_head(
        &self,
        record: &VolumeRecord,
        snapshot: &Cid,
    ) -> Result<records::IndexHead> {
        let key = [record.id.as_slice(), snapshot.as_bytes()].concat();
        let stored = self
            .metadata
            .get_record(RecordSpace::INDEX_HEADS, &key)?
            .ok_or(IntegrityFault::MissingIndexHead {
                snapshot: *snapshot,
            })?;
        let head: records::IndexHead = records::decode("reference index head", &stored)?;
        let message =
            records::IndexHead::signed_message(&record.id, snapshot.as_bytes(), &head.root);
        self.trusted_keys(&head.author, &format!("snapshot {snapshot} index head"))?
            .verify(
                forge_crypto::SignatureDomain::Snapshot,
                &message,
                &forge_crypto::Signature::from_bytes(&head.signature)?,
            )
            .map_err(|error| IntegrityFault::BadSignature {
                what: format!("snapshot {snapshot} index head"),
                reason: error.to_string(),
            })?;
        Ok(head)
    }

    /// Walks a snapshot's reference index without any key: (cids reached, index node ids).
    ///
    /// # Errors
    /// Integrity errors for missing or damaged nodes.
    pub(crate) fn walk_index(
        &self,
        record: &VolumeRecord,
        snapshot: &Cid,
    ) -> Result<(Vec<Cid>, Vec<Cid>)> {
        let head = self.index_head(record, snapshot)?;
        let volume = VolumeId::from_bytes(record.id);
        forge_store::refindex::walk(&Cid::from_bytes(head.root), |id| {
            match self.kv.get(Column::Objects, id.as_bytes()).ok().flatten() {
                Some(node) => Some(node),
                // A grouped volume's index node published while this node was away.
                None => self.fetch_grouped_object(&volume, id).ok().flatten(),
            }
        })
        .map_err(|error| {
            IntegrityFault::BrokenIndex {
                snapshot: *snapshot,
                reason: error.to_string(),
            }
            .into()
        })
    }
}

impl Vault {
    /// Walks the tree under `root` for fsck, gc and stats alike. Each tree and manifest object
    /// is visited once: its cid goes into `visited`, and a subtree already there (shared with
    /// an earlier snapshot) is skipped. `visit_chunk` gets every chunk of every new file,
    /// with the file's name. Iterative (an explicit stack of trees), so the depth of a tree
    /// never meets the thread's stack.
    pub(crate) fn walk_tree(
        &self,
        volume: &OpenVolume,
        root: Cid,
        visited: &mut BTreeSet<Cid>,
        visit_chunk: &mut dyn FnMut(&[u8], &ChunkRef) -> Result<()>,
    ) -> Result<()> {
        let mut pending = vec![root];
        while let Some(tree) = pending.pop() {
            if !visited.insert(tree) {
                continue;
            }
            let entries = self.read_tree_with(volume, &tree, &mut |part| {
                visited.insert(part);
            })?;
            for entry in entries {
                let chunks = match entry.content {
                    EntryContent::Directory { tree } => {
                        pending.push(Cid::from_bytes(tree));
                        continue;
                    }
                    EntryContent::InlineFile(manifest) => manifest,
                    EntryContent::File { manifest } => {
                        let cid = Cid::from_bytes(manifest);
                        if visited.contains(&cid) {
                            continue;
                        }
                        self.read_manifest_with(volume, &cid, &mut |part| {
                            visited.insert(part);
                        })?
                    }
                    _ => continue,
                };
                for chunk in chunks.chunks() {
                    visit_chunk(&entry.name, chunk)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{new_vault, no_passphrase};
    use forge_store::kv::{Durability, WriteBatch};
    use forge_store::object::SignedCommit;

    /// A snapshot written by another group member (or synced from a peer) must verify
    /// against that node's key once it is trusted, and be refused before.
    #[test]
    fn snapshots_signed_by_another_node_verify_only_once_it_is_in_the_keyring() {
        let temp = tempfile::tempdir().unwrap();
        let vault = new_vault(temp.path());
        vault
            .create_volume("v", &CreateVolumeOptions::default(), &no_passphrase)
            .unwrap();
        let volume = vault.open_volume("v", &no_passphrase).unwrap();
        let (other, _) = NodeIdentity::generate().unwrap();
        let commit = SnapshotCommit {
            volume: *volume.id.as_bytes(),
            root: [0; 32],
            parents: Vec::new(),
            author: *other.node_id().as_bytes(),
            time_ns: 1,
            message: "from a peer".into(),
            dna: std::collections::BTreeMap::new(),
            logical_bytes: 0,
            file_count: 0,
        };
        let encoded = commit.encode();
        let signature = other
            .sign(forge_crypto::SignatureDomain::Snapshot, &encoded)
            .unwrap();
        let (cid, sealed) = Object::Commit(SignedCommit {
            commit: encoded,
            signature: signature.as_bytes().to_vec(),
        })
        .seal(&volume.volume_key);
        let mut batch = WriteBatch::new();
        batch.put(Column::Objects, cid.as_bytes().to_vec(), sealed);
        vault.kv().write(batch, Durability::Synced).unwrap();

        let error = vault.read_commit(&volume, &cid).unwrap_err();
        assert!(
            matches!(error, NodeError::UntrustedSigner { .. }),
            "{error}"
        );
        assert!(
            error.to_string().contains(&other.node_id().to_hex()),
            "{error}"
        );
        vault.trust_node(other.public_keys()).unwrap();
        assert_eq!(
            vault.read_commit(&volume, &cid).unwrap().message,
            "from a peer"
        );
        // A keyring entry under one node's id holding another's keys is refused.
        vault
            .refs()
            .apply(&[RecordUpdate::new(
                KEYRING,
                other.node_id().as_bytes().to_vec(),
                Expected::Any,
                Change::Put(vault.identity().public_keys().encode()),
            )])
            .unwrap();
        assert!(matches!(
            vault.read_commit(&volume, &cid),
            Err(NodeError::CorruptRecord {
                what: "keyring",
                ..
            })
        ));
    }
}
