//! File content inside a mount: the committed chunks of a file (its base), the bytes written
//! since (staged in a file on local disk, never only in RAM), and how the two are read as
//! one, and turned back into chunks.
//!
//! Re-chunking after a write starts at the chunk holding the first changed byte (every
//! chunk before it is unchanged, because a content-defined boundary depends only on the
//! bytes since the previous one) and stops as soon as a new boundary lands on an old one
//! past the last changed byte: from there on the old chunks are reused as they are.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use forge_crypto::Cid;
use forge_store::object::FileManifest;

use crate::error::{NodeError, Result};
use crate::vault::Vault;
use crate::vault::import::Importer;

/// A committed file content with the start offset of every chunk.
#[derive(Debug, Default)]
pub struct BaseContent {
    /// The chunks.
    pub manifest: FileManifest,
    /// `offsets[i]` is where chunk `i` starts; one extra entry holds the size.
    offsets: Vec<u64>,
}

impl BaseContent {
    /// Indexes a manifest.
    #[must_use]
    pub fn new(manifest: FileManifest) -> Self {
        let mut offsets = Vec::with_capacity(manifest.chunks.len() + 1);
        let mut at = 0u64;
        offsets.push(0);
        for chunk in &manifest.chunks {
            at += u64::from(chunk.len);
            offsets.push(at);
        }
        Self { manifest, offsets }
    }

    /// Bytes of content.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// The chunk holding byte `offset` (None past the end).
    #[must_use]
    pub fn chunk_at(&self, offset: u64) -> Option<usize> {
        if offset >= self.size() {
            return None;
        }
        // The last offset <= `offset`.
        Some(self.offsets.partition_point(|start| *start <= offset) - 1)
    }
}

/// Sorted, disjoint, non-adjacent byte ranges `[start, end)`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeSet {
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Adds `[start, end)`, merging with what it touches.
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        let touching: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .rev()
            .take_while(|(_, range_end)| **range_end >= start)
            .map(|(range_start, range_end)| (*range_start, *range_end))
            .collect();
        for (range_start, range_end) in touching {
            self.ranges.remove(&range_start);
            start = start.min(range_start);
            end = end.max(range_end);
        }
        self.ranges.insert(start, end);
    }

    /// Drops everything at or past `limit`.
    pub fn truncate(&mut self, limit: u64) {
        let beyond: Vec<u64> = self
            .ranges
            .range(limit..)
            .map(|(start, _)| *start)
            .collect();
        for start in beyond {
            self.ranges.remove(&start);
        }
        if let Some((_, end)) = self.ranges.range_mut(..limit).next_back() {
            *end = (*end).min(limit);
        }
    }

    /// The ranges, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(start, end)| (*start, *end))
    }

    /// The first changed byte.
    #[must_use]
    pub fn first(&self) -> Option<u64> {
        self.ranges.keys().next().copied()
    }

    /// One past the last changed byte.
    #[must_use]
    pub fn end(&self) -> Option<u64> {
        self.ranges.values().next_back().copied()
    }
}

/// Bytes written to a file since its last chunking, in a staging file on local disk.
#[derive(Debug)]
pub struct Staged {
    /// The staging file (sparse: only written ranges hold data).
    pub file: File,
    /// Where it is, to delete it once chunked.
    pub path: PathBuf,
    state: Mutex<StagedState>,
}

/// What a staging file holds. Writers, truncation and chunking hold this lock, so chunking
/// sees a still file.
#[derive(Debug, Default)]
pub struct StagedState {
    /// Ranges written (their bytes are in the staging file).
    pub dirty: RangeSet,
    /// Base bytes at or past this offset were cut off by a truncation (read as zeros
    /// unless written again).
    pub base_limit: u64,
    /// Set once the content was chunked and this staging file is discarded: a writer that
    /// finds it set starts over with the file's new state.
    pub retired: bool,
}

impl Staged {
    /// A new, empty staging file at `path` over a base of `base_size` bytes.
    ///
    /// # Errors
    /// I/O errors creating it.
    pub fn create(path: PathBuf, base_size: u64) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(NodeError::io("creating staging file", &path))?;
        Ok(Self {
            file,
            path,
            state: Mutex::new(StagedState {
                dirty: RangeSet::default(),
                base_limit: base_size,
                retired: false,
            }),
        })
    }

    /// Locks the staging state.
    pub fn lock(&self) -> MutexGuard<'_, StagedState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Decrypted chunks, bounded by bytes, least recently used evicted first.
#[derive(Debug)]
pub struct ChunkCache {
    capacity_bytes: usize,
    inner: Mutex<CacheInner>,
    /// Signalled whenever a load finishes, for readers waiting on one in flight.
    loaded: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct CacheInner {
    entries: BTreeMap<Cid, (Arc<Vec<u8>>, u64)>,
    by_age: BTreeMap<u64, Cid>,
    bytes: usize,
    clock: u64,
    /// Chunks some thread is reading and decrypting right now.
    loading: std::collections::BTreeSet<Cid>,
}

impl ChunkCache {
    /// A cache of at most `capacity_bytes` of plaintext.
    #[must_use]
    pub fn new(capacity_bytes: usize) -> Self {
        Self {
            capacity_bytes,
            inner: Mutex::new(CacheInner::default()),
            loaded: std::sync::Condvar::new(),
        }
    }

    /// The cached chunk, or `load`'s result (cached). A chunk is loaded by one thread at a
    /// time: a reader that needs a chunk being read ahead waits for it instead of reading
    /// it a second time.
    ///
    /// # Errors
    /// `load`'s.
    pub fn get_or_load(
        &self,
        cid: &Cid,
        load: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Arc<Vec<u8>>> {
        {
            let mut inner = self.lock();
            loop {
                if inner.entries.contains_key(cid) {
                    drop(inner);
                    if let Some(data) = self.get(cid) {
                        return Ok(data);
                    }
                    // Evicted in between: load it below (unclaimed, harmlessly).
                    break;
                }
                if inner.loading.insert(*cid) {
                    break;
                }
                inner = self
                    .loaded
                    .wait(inner)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
        let result = load().map(Arc::new);
        self.complete(cid, result.as_ref().ok().cloned());
        result
    }

    /// Claims the loading of `cid` for a read-ahead: false if it is cached or some thread
    /// is loading it already. A claim must end with [`Self::complete`].
    pub fn claim(&self, cid: &Cid) -> bool {
        let mut inner = self.lock();
        !inner.entries.contains_key(cid) && inner.loading.insert(*cid)
    }

    /// Ends a load: caches the chunk (if it loaded) and wakes readers waiting for it.
    pub fn complete(&self, cid: &Cid, data: Option<Arc<Vec<u8>>>) {
        if let Some(data) = data {
            self.insert(*cid, data);
        }
        self.lock().loading.remove(cid);
        self.loaded.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, CacheInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A cached chunk, marked as just used.
    pub fn get(&self, cid: &Cid) -> Option<Arc<Vec<u8>>> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let (data, age) = inner.entries.get_mut(cid)?;
        let data = data.clone();
        let old = std::mem::replace(age, now);
        inner.by_age.remove(&old);
        inner.by_age.insert(now, *cid);
        Some(data)
    }

    /// Whether `cid` is cached (without touching its age).
    #[cfg(test)]
    fn contains(&self, cid: &Cid) -> bool {
        self.lock().entries.contains_key(cid)
    }

    /// Caches a chunk, evicting the oldest beyond capacity.
    pub fn insert(&self, cid: Cid, data: Arc<Vec<u8>>) {
        let mut inner = self.lock();
        if data.len() > self.capacity_bytes || inner.entries.contains_key(&cid) {
            return;
        }
        inner.clock += 1;
        let now = inner.clock;
        inner.bytes += data.len();
        inner.entries.insert(cid, (data, now));
        inner.by_age.insert(now, cid);
        while inner.bytes > self.capacity_bytes {
            let Some((_, oldest)) = inner.by_age.pop_first() else {
                break;
            };
            if let Some((evicted, _)) = inner.entries.remove(&oldest) {
                inner.bytes -= evicted.len();
            }
        }
    }
}

/// Reads and verifies chunk `index` of `base` (through the cache).
///
/// # Errors
/// [`NodeError::Integrity`] naming the cid when the chunk is missing, damaged beyond repair
/// or does not open; engine errors.
pub fn load_chunk(
    vault: &Vault,
    cache: &ChunkCache,
    base: &BaseContent,
    index: usize,
) -> Result<Arc<Vec<u8>>> {
    let chunk = &base.manifest.chunks[index];
    let cid = chunk.cid();
    cache.get_or_load(&cid, || vault.read_chunk_plaintext(chunk))
}

/// Fills `out` with the base bytes at `offset..offset + out.len()` (which must lie inside
/// the base).
///
/// # Errors
/// As [`load_chunk`].
pub fn read_base(
    vault: &Vault,
    cache: &ChunkCache,
    base: &BaseContent,
    offset: u64,
    out: &mut [u8],
) -> Result<()> {
    let mut done = 0usize;
    while done < out.len() {
        let at = offset + done as u64;
        let Some(index) = base.chunk_at(at) else {
            break;
        };
        let data = load_chunk(vault, cache, base, index)?;
        let within = usize::try_from(at - base.offsets[index]).unwrap_or(usize::MAX);
        let take = (data.len() - within).min(out.len() - done);
        out[done..done + take].copy_from_slice(&data[within..within + take]);
        done += take;
    }
    Ok(())
}

/// Reads `len` bytes at `offset` of a file of `size` bytes whose content is `base`
/// overlaid with `staged` (under its lock). Bytes past the base limit that were never
/// written read as zeros.
///
/// # Errors
/// As [`load_chunk`]; I/O errors reading the staging file.
#[allow(clippy::too_many_arguments)]
pub fn read_overlay(
    vault: &Vault,
    cache: &ChunkCache,
    base: &BaseContent,
    staged: Option<(&Staged, &StagedState)>,
    size: u64,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>> {
    if offset >= size {
        return Ok(Vec::new());
    }
    let end = size.min(offset.saturating_add(len as u64));
    let mut out = vec![0u8; usize::try_from(end - offset).unwrap_or(0)];
    let base_limit = staged.map_or(base.size(), |(_, state)| state.base_limit.min(base.size()));
    if offset < base_limit {
        let base_end = base_limit.min(end);
        let span = usize::try_from(base_end - offset).unwrap_or(0);
        read_base(vault, cache, base, offset, &mut out[..span])?;
    }
    if let Some((staged, state)) = staged {
        for (start, stop) in state.dirty.iter() {
            let (from, to) = (start.max(offset), stop.min(end));
            if from >= to {
                continue;
            }
            let at = usize::try_from(from - offset).unwrap_or(0);
            let span = usize::try_from(to - from).unwrap_or(0);
            staged
                .file
                .read_exact_at(&mut out[at..at + span], from)
                .map_err(NodeError::io("reading staging file", &staged.path))?;
        }
    }
    Ok(out)
}

/// Chunks a staged file into a new manifest, reusing every unchanged chunk of `base`.
///
/// # Errors
/// Storage errors; integrity errors reading base chunks.
pub(crate) fn rechunk(
    vault: &Vault,
    cache: &ChunkCache,
    importer: &Importer<'_>,
    base: &BaseContent,
    staged: &Staged,
    state: &StagedState,
    size: u64,
) -> Result<FileManifest> {
    let base_limit = state.base_limit.min(base.size());
    // The first byte that differs from the base: a write, a truncation, or growth.
    let mut first_change = state.dirty.first().unwrap_or(u64::MAX);
    if base_limit < base.size() || size != base.size() {
        first_change = first_change.min(base_limit).min(size);
    }
    if first_change == u64::MAX || (first_change >= size && size == base.size()) {
        return Ok(base.manifest.clone());
    }
    // Keep every chunk that ends before the first change. The base's last chunk was cut by
    // the end of the file, not by content, so a change at or past its end restarts it.
    let keep = base
        .chunk_at(first_change)
        .unwrap_or(base.manifest.chunks.len().saturating_sub(1));
    let mut manifest = FileManifest {
        size: 0,
        chunks: base.manifest.chunks[..keep].to_vec(),
    };
    manifest.size = base.offsets[keep.min(base.offsets.len() - 1)];
    for chunk in &manifest.chunks {
        importer.reach(chunk.cid());
    }
    // Old boundaries where chunking may rejoin the base: content-defined ones (not the end
    // of the file), past every change, while the tail is untouched and the size unchanged.
    let last_change = state.dirty.end().unwrap_or(0).max(first_change);
    let tail_intact = base_limit == base.size() && size == base.size();
    let mut rejoin = BTreeMap::new();
    if tail_intact {
        for (index, start) in base.offsets.iter().enumerate().skip(keep + 1) {
            if *start > last_change && *start < base.size() {
                rejoin.insert(*start, index);
            }
        }
    }
    let reader = OverlayReader {
        vault,
        cache,
        base,
        staged,
        state,
        size,
        position: manifest.size,
    };
    for chunk in importer.chunker().chunks(reader) {
        let chunk = chunk?;
        importer.add_chunk(&mut manifest, &chunk.data)?;
        if let Some(index) = rejoin.get(&manifest.size) {
            for reused in &base.manifest.chunks[*index..] {
                importer.reach(reused.cid());
                manifest.size += u64::from(reused.len);
                manifest.chunks.push(reused.clone());
            }
            break;
        }
    }
    debug_assert_eq!(manifest.size, size, "re-chunking covers the whole file");
    Ok(manifest)
}

/// The overlay as a reader, for the streaming chunker.
struct OverlayReader<'a> {
    vault: &'a Vault,
    cache: &'a ChunkCache,
    base: &'a BaseContent,
    staged: &'a Staged,
    state: &'a StagedState,
    size: u64,
    position: u64,
}

impl io::Read for OverlayReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let data = read_overlay(
            self.vault,
            self.cache,
            self.base,
            Some((self.staged, self.state)),
            self.size,
            self.position,
            buf.len().min(1 << 20),
        )
        .map_err(io::Error::other)?;
        buf[..data.len()].copy_from_slice(&data);
        self.position += data.len() as u64;
        Ok(data.len())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::datadir::{DataDir, SecretProtection};
    use crate::progress::Progress;
    use crate::vault::CreateVolumeOptions;
    use proptest::prelude::*;

    fn no_passphrase(_: &str, _: bool) -> Result<zeroize::Zeroizing<String>> {
        Err(NodeError::Mount("no passphrase in this test".into()))
    }

    /// What a test case does to the file after it was committed.
    #[derive(Debug, Clone)]
    enum Edit {
        Write { offset: usize, len: usize, byte: u8 },
        Truncate { len: usize },
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            3 => (0usize..40_000, 1usize..3_000, any::<u8>())
                .prop_map(|(offset, len, byte)| Edit::Write { offset, len, byte }),
            1 => (0usize..40_000).prop_map(|len| Edit::Truncate { len }),
        ]
    }

    /// The invariant behind incremental re-chunking: whatever was written or cut off, the
    /// chunks it produces are exactly those of chunking the final content from scratch,
    /// and they read back as that content.
    #[test]
    fn rechunking_gives_the_chunks_of_chunking_from_scratch() {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(temp.path().join("vault"));
        data_dir.init(&SecretProtection::FileMode).unwrap();
        let vault = Vault::open(&data_dir, &no_passphrase).unwrap();
        let options = CreateVolumeOptions {
            domain: Some("small".into()),
            chunk_avg_bytes: Some(1024),
            ..CreateVolumeOptions::default()
        };
        vault.create_volume("v", &options, &no_passphrase).unwrap();
        let volume = vault.open_volume("v", &no_passphrase).unwrap();
        let session = vault.open_write_session("test", volume.id).unwrap();
        let cache = ChunkCache::new(1 << 20);
        let progress = Progress::new("test", false);
        let chunk_all = |content: &[u8]| -> FileManifest {
            let importer = Importer::new(&vault, &volume, &session, &progress).unwrap();
            let mut manifest = FileManifest::default();
            for chunk in importer.chunker().chunks(content) {
                importer
                    .add_chunk(&mut manifest, &chunk.unwrap().data)
                    .unwrap();
            }
            importer.write_pending().unwrap();
            manifest
        };
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 48,
            ..ProptestConfig::default()
        });
        let strategy = (
            any::<u64>(),
            0usize..30_000,
            proptest::collection::vec(edit(), 0..5),
        );
        let case = std::sync::atomic::AtomicU64::new(0);
        runner
            .run(&strategy, |(seed, size, edits)| {
                let case = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let original: Vec<u8> = (0..size as u64)
                    .map(|i| (seed.wrapping_add(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
                    .collect();
                let base = BaseContent::new(chunk_all(&original));
                let staged =
                    Staged::create(temp.path().join(format!("staged-{case}")), base.size())
                        .unwrap();
                let mut expected = original.clone();
                let mut size = expected.len() as u64;
                {
                    let mut state = staged.lock();
                    for edit in &edits {
                        match *edit {
                            Edit::Write { offset, len, byte } => {
                                let data = vec![byte; len];
                                staged.file.write_all_at(&data, offset as u64).unwrap();
                                state.dirty.insert(offset as u64, (offset + len) as u64);
                                if expected.len() < offset + len {
                                    expected.resize(offset + len, 0);
                                }
                                expected[offset..offset + len].copy_from_slice(&data);
                                size = size.max((offset + len) as u64);
                            }
                            Edit::Truncate { len } => {
                                state.dirty.truncate(len as u64);
                                state.base_limit = state.base_limit.min(len as u64);
                                staged.file.set_len(len as u64).unwrap();
                                expected.resize(len, 0);
                                size = len as u64;
                            }
                        }
                    }
                }
                let state = staged.lock();
                let importer = Importer::new(&vault, &volume, &session, &progress).unwrap();
                let manifest =
                    rechunk(&vault, &cache, &importer, &base, &staged, &state, size).unwrap();
                importer.write_pending().unwrap();
                let from_scratch = chunk_all(&expected);
                prop_assert_eq!(&manifest, &from_scratch);
                let mut read_back = vec![0u8; expected.len()];
                read_base(
                    &vault,
                    &cache,
                    &BaseContent::new(manifest),
                    0,
                    &mut read_back,
                )
                .unwrap();
                prop_assert_eq!(read_back, expected);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn range_sets_merge_and_truncate() {
        let mut set = RangeSet::default();
        set.insert(10, 20);
        set.insert(30, 40);
        set.insert(20, 25);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![(10, 25), (30, 40)]);
        set.insert(5, 35);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![(5, 40)]);
        set.insert(50, 60);
        set.truncate(55);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![(5, 40), (50, 55)]);
        set.truncate(30);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![(5, 30)]);
        assert_eq!((set.first(), set.end()), (Some(5), Some(30)));
    }

    #[test]
    fn the_cache_stays_within_its_bytes() {
        let cache = ChunkCache::new(100);
        for index in 0..10u8 {
            cache.insert(Cid::of(&[index]), Arc::new(vec![index; 30]));
        }
        let kept = (0..10u8).filter(|index| cache.contains(&Cid::of(&[*index])));
        assert_eq!(kept.collect::<Vec<_>>(), vec![7, 8, 9]);
    }
}
