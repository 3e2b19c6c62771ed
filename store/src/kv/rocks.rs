//! `RocksKv`: the production `KvEngine` on RocksDB.
//!
//! Shards and objects live in column families with blob files: values of at least
//! `min_blob_size_bytes` go to append-only blob files, so compaction rewrites only the small
//! keys and chunk bytes are not copied again and again. Bulk writes use
//! [`Durability::Unlogged`] plus [`KvEngine::flush`], so chunk bytes reach the disk once
//! (in a blob file) instead of twice (write-ahead log, then blob file).

use std::path::{Path, PathBuf};

use librocksdb_sys as ffi;
use rocksdb::{
    BlockBasedOptions, BottommostLevelCompaction, ColumnFamilyDescriptor, CompactOptions,
    DBCompressionType, ErrorKind, FlushOptions, Options, ReadOptions, WriteOptions,
};

use super::{
    BatchOp, Column, ColumnUsage, Durability, KeyValue, KvEngine, KvError, KvView, ViewReader,
    WriteBatch, in_range,
};

/// Tuning knobs of [`RocksKv`], with defaults for a single edge node.
#[derive(Debug, Clone)]
pub struct RocksKvOptions {
    /// Values at least this long go to blob files.
    pub min_blob_size_bytes: u64,
    /// Target size of one blob file.
    pub blob_file_size_bytes: u64,
    /// Memtable size per column family before a flush.
    pub write_buffer_size_bytes: usize,
    /// Background flush and compaction threads.
    pub background_jobs: i32,
}

impl Default for RocksKvOptions {
    fn default() -> Self {
        Self {
            min_blob_size_bytes: 4096,
            blob_file_size_bytes: 256 << 20,
            write_buffer_size_bytes: 64 << 20,
            background_jobs: 2,
        }
    }
}

/// RocksDB behind the `KvEngine` trait.
pub struct RocksKv {
    db: rocksdb::DB,
    path: PathBuf,
}

impl Drop for RocksKv {
    fn drop(&mut self) {
        // Let running flushes and compactions finish before the process exits, so no half
        // written output files are left behind to be cleaned up (and counted) later.
        self.db.cancel_all_background_work(true);
    }
}

impl std::fmt::Debug for RocksKv {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RocksKv")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RocksKv {
    /// Opens (creating if needed) the database at `path` with every [`Column`].
    ///
    /// # Errors
    /// [`KvError::Busy`] when another process has it open; other engine failures.
    pub fn open(path: &Path, options: &RocksKvOptions) -> Result<Self, KvError> {
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_max_background_jobs(options.background_jobs);
        // Small sync steps keep write-back smooth instead of one long stall at flush time.
        db_options.set_bytes_per_sync(8 << 20);
        // Every forge command opens the store; at the default info level each open would
        // leave ~100 KiB of RocksDB LOG behind. Warnings and errors are what an operator needs.
        db_options.set_log_level(rocksdb::LogLevel::Warn);
        db_options.set_keep_log_file_num(2);
        // Unlogged writes (chunk shards and the dedup index entries naming them) live only in
        // memtables until flushed. Atomic flush persists every column family together, so a
        // crash never keeps shards whose index entries were lost, or the reverse.
        db_options.set_atomic_flush(true);
        // Flushes and compactions write every chunk once, in bulk: through the page cache
        // that is a kernel copy of each byte (a third of a large import's CPU, measured) and
        // pages evicted later anyway. Direct I/O skips it where the file system has it
        // (not tmpfs: probed).
        if supports_direct_io(path) {
            db_options.set_use_direct_io_for_flush_and_compaction(true);
        }
        // Chunks are read back in the order they were written (an export, a mount reading a
        // file): let the kernel read ahead in blob files instead of RocksDB's default advice
        // that every file is read at random.
        db_options.set_advise_random_on_open(false);
        let descriptors = Column::ALL.iter().map(|column| {
            ColumnFamilyDescriptor::new(column.name(), column_options(*column, options))
        });
        let db = rocksdb::DB::open_cf_descriptors(&db_options, path, descriptors)
            .map_err(|error| map_error(&error, path))?;
        Ok(Self {
            db,
            path: path.to_owned(),
        })
    }

    /// The database directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn handle(&self, column: Column) -> Result<&rocksdb::ColumnFamily, KvError> {
        self.db
            .cf_handle(column.name())
            .ok_or_else(|| KvError::Engine {
                detail: format!("column family {} missing", column.name()),
            })
    }

    fn error(&self, error: &rocksdb::Error) -> KvError {
        map_error(error, &self.path)
    }
}

/// Blob files that RocksDB will never delete on its own, found and removed by
/// [`remove_unfinished_blob_files`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnfinishedBlobFiles {
    /// Files removed.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// RocksDB's blob log magic number, the first field of every blob file's footer.
const BLOB_LOG_MAGIC: u32 = 0x0024_8f37;
/// A blob file's header and footer sizes (RocksDB's `BlobLogHeader`/`BlobLogFooter`).
const BLOB_LOG_HEADER_BYTES: u64 = 30;
const BLOB_LOG_FOOTER_BYTES: u64 = 32;

/// Removes the blob files that a flush or compaction began but never finished (the process
/// exited or crashed first) from the database at `path`.
///
/// RocksDB writes a blob file's footer before the file joins the database, so a file
/// without one is referenced by nothing. Since version 11 RocksDB keeps such files forever
/// (for its blob direct write recovery, which forge does not use), so without this sweep
/// every interrupted compaction would leak disk space.
///
/// Call it only while no process has the database open: forge calls it holding the data
/// directory's lock, before [`RocksKv::open`]. A missing directory is an empty result.
///
/// # Errors
/// [`KvError::Engine`] naming the file that could not be listed, read or removed.
pub fn remove_unfinished_blob_files(path: &Path) -> Result<UnfinishedBlobFiles, KvError> {
    let io_error = |what: &str, file: &Path, error: std::io::Error| KvError::Engine {
        detail: format!("{what} {}: {error}", file.display()),
    };
    let mut removed = UnfinishedBlobFiles::default();
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(error) => return Err(io_error("listing", path, error)),
    };
    for entry in entries {
        let entry = entry.map_err(|error| io_error("listing", path, error))?;
        let file = entry.path();
        if file.extension().is_none_or(|extension| extension != "blob") {
            continue;
        }
        let finished =
            blob_file_has_footer(&file).map_err(|error| io_error("reading", &file, error))?;
        if !finished {
            let bytes = entry.metadata().map_or(0, |metadata| metadata.len());
            std::fs::remove_file(&file).map_err(|error| io_error("removing", &file, error))?;
            removed.files += 1;
            removed.bytes += bytes;
        }
    }
    Ok(removed)
}

/// Whether the blob file ends with a footer (its magic number where the footer starts).
/// Conservative: a finished file always passes, so only files no footer was written to
/// are ever removed.
fn blob_file_has_footer(file: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut handle = std::fs::File::open(file)?;
    let len = handle.metadata()?.len();
    if len < BLOB_LOG_HEADER_BYTES + BLOB_LOG_FOOTER_BYTES {
        return Ok(false);
    }
    handle.seek(SeekFrom::Start(len - BLOB_LOG_FOOTER_BYTES))?;
    let mut magic = [0u8; 4];
    handle.read_exact(&mut magic)?;
    Ok(u32::from_le_bytes(magic) == BLOB_LOG_MAGIC)
}

/// Read options per column. Shard values verify themselves (each read checks the cid, or
/// the shard's own BLAKE3), so RocksDB's CRC32C over them is skipped: built without SSE4.2,
/// it cost half of a sequential read's CPU (200 MB/s through a mount).
fn read_options(column: Column) -> ReadOptions {
    let mut options = ReadOptions::default();
    if column == Column::Shards {
        options.set_verify_checksums(false);
    }
    options
}

/// Whether `key` is in `column_family`, answered from keys alone: RocksDB's iterator with
/// `allow_unprepared_value` positions on a key without loading its value (for a blob
/// index, without reading the blob file). The Rust binding does not expose the option, so
/// this goes through RocksDB's C API. An error is its message and whether it is corruption.
#[allow(unsafe_code)]
fn key_exists_unprepared(
    db: &rocksdb::DB,
    column_family: &rocksdb::ColumnFamily,
    key: &[u8],
) -> Result<bool, (String, bool)> {
    use rocksdb::{AsColumnFamilyRef, AsRawPtr};
    use std::ffi::{CStr, c_char, c_void};

    /// Frees the C objects on every path out.
    struct Resources {
        options: *mut ffi::rocksdb_readoptions_t,
        iterator: *mut ffi::rocksdb_iterator_t,
    }
    impl Drop for Resources {
        fn drop(&mut self) {
            // SAFETY: both were created below and are destroyed once, iterator first
            // (it refers to the options' upper bound).
            unsafe {
                if !self.iterator.is_null() {
                    ffi::rocksdb_iter_destroy(self.iterator);
                }
                ffi::rocksdb_readoptions_destroy(self.options);
            }
        }
    }

    // The exclusive upper bound `key ++ [0]` admits `key` alone, so the iterator never
    // steps on to a neighbour. It must outlive the iterator: declared before `resources`.
    let mut upper_bound = Vec::with_capacity(key.len() + 1);
    upper_bound.extend_from_slice(key);
    upper_bound.push(0);
    // SAFETY: plain C calls on objects owned by `resources`; `db` and `column_family`
    // outlive this function, `key` and `upper_bound` outlive every call that reads them.
    unsafe {
        let mut resources = Resources {
            options: ffi::rocksdb_readoptions_create(),
            iterator: std::ptr::null_mut(),
        };
        ffi::rocksdb_readoptions_set_allow_unprepared_value(resources.options, 1);
        ffi::rocksdb_readoptions_set_iterate_upper_bound(
            resources.options,
            upper_bound.as_ptr().cast::<c_char>(),
            upper_bound.len(),
        );
        resources.iterator = ffi::rocksdb_create_iterator_cf(
            db.as_raw_ptr(),
            resources.options,
            column_family.inner(),
        );
        ffi::rocksdb_iter_seek(resources.iterator, key.as_ptr().cast::<c_char>(), key.len());
        let mut found = false;
        if ffi::rocksdb_iter_valid(resources.iterator) != 0 {
            let mut length = 0usize;
            let found_key = ffi::rocksdb_iter_key(resources.iterator, &raw mut length);
            found = !found_key.is_null()
                && std::slice::from_raw_parts(found_key.cast::<u8>(), length) == key;
        }
        let mut error: *mut c_char = std::ptr::null_mut();
        ffi::rocksdb_iter_get_error(resources.iterator, &raw mut error);
        if !error.is_null() {
            let detail = CStr::from_ptr(error).to_string_lossy().into_owned();
            ffi::rocksdb_free(error.cast::<c_void>());
            let corruption = detail.starts_with("Corruption");
            return Err((detail, corruption));
        }
        Ok(found)
    }
}

/// Whether files in `directory` (created if missing) can be opened with `O_DIRECT`.
fn supports_direct_io(directory: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::create_dir_all(directory).is_err() {
        return false;
    }
    let probe = directory.join("direct-io-probe");
    let supported = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    supported
}

fn column_options(column: Column, options: &RocksKvOptions) -> Options {
    let mut cf = Options::default();
    cf.set_write_buffer_size(options.write_buffer_size_bytes);
    let mut table = BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    cf.set_block_based_table_factory(&table);
    // A bloom filter over each memtable's keys. An import asks, for every new chunk,
    // whether its dedup entry and its first shard exist; the answer is almost always no,
    // and without the filter each no was a skip-list search of a 64 MiB memtable (5% of
    // an import's CPU).
    cf.set_memtable_whole_key_filtering(true);
    cf.set_memtable_prefix_bloom_ratio(0.05);
    if column.holds_large_values() {
        // Chunk data is already compressed and encrypted: compressing again wastes CPU.
        cf.set_compression_type(DBCompressionType::None);
        cf.set_enable_blob_files(true);
        cf.set_min_blob_size(options.min_blob_size_bytes);
        cf.set_blob_file_size(options.blob_file_size_bytes);
        cf.set_blob_compression_type(DBCompressionType::None);
        // Blob GC relocates live values out of old blob files during compaction. Routine
        // compactions leave blob files alone: chunk bytes are written once, and garbage only
        // appears when `forge gc` deletes chunks, so `compact` turns it on for that pass.
        // (It also matters for disk use: RocksDB keeps a blob file without a footer forever,
        // and a routine compaction cut short by the process exiting left one behind.)
        cf.set_enable_blob_gc(false);
        cf.set_blob_gc_age_cutoff(1.0);
    } else {
        cf.set_compression_type(DBCompressionType::Zstd);
    }
    cf
}

fn map_error(error: &rocksdb::Error, path: &Path) -> KvError {
    map_error_detail(
        error.to_string(),
        error.kind() == ErrorKind::Corruption,
        path,
    )
}

/// [`map_error`] for a message straight from RocksDB's C API.
fn map_error_detail(detail: String, corruption: bool, path: &Path) -> KvError {
    let path = path.display().to_string();
    if detail.contains("No space left on device") {
        return KvError::NoSpace { path };
    }
    if detail.contains("lock")
        && (detail.contains("Resource temporarily unavailable")
            || detail.contains("No locks available")
            || detail.contains("already held"))
    {
        return KvError::Busy { path };
    }
    if corruption {
        KvError::Corruption { detail }
    } else {
        KvError::Engine { detail }
    }
}

impl RocksKv {
    /// Up to `limit` pairs of `[start, end)`, read with `options` (a view's snapshot).
    fn scan_with(
        &self,
        mut options: ReadOptions,
        column: Column,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, KvError> {
        let mut pairs = Vec::new();
        if limit == 0 || end.is_some_and(|end| end <= start) {
            return Ok(pairs);
        }
        // The upper bound keeps the iterator from stepping onto the first key past the
        // range, which for a blob column would read that value from disk too (every
        // single-chunk read used to read two chunks). A raw iterator steps only when asked.
        if let Some(end) = end {
            options.set_iterate_upper_bound(end.to_vec());
        }
        let mut iterator = self.db.raw_iterator_cf_opt(self.handle(column)?, options);
        iterator.seek(start);
        while iterator.valid() {
            let (Some(key), Some(value)) = (iterator.key(), iterator.value()) else {
                break;
            };
            if !in_range(key, start, end) {
                break;
            }
            pairs.push((key.to_vec(), value.to_vec()));
            if pairs.len() == limit {
                return Ok(pairs);
            }
            iterator.next();
        }
        iterator.status().map_err(|error| self.error(&error))?;
        Ok(pairs)
    }
}

/// A RocksDB snapshot: reads through it see the sequence number it was taken at.
struct RocksView<'a> {
    kv: &'a RocksKv,
    snapshot: rocksdb::Snapshot<'a>,
}

impl RocksView<'_> {
    fn options(&self, column: Column) -> ReadOptions {
        let mut options = read_options(column);
        options.set_snapshot(&self.snapshot);
        options
    }
}

impl KvView for RocksView<'_> {
    fn get(&self, column: Column, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.kv
            .db
            .get_cf_opt(self.kv.handle(column)?, key, &self.options(column))
            .map_err(|error| self.kv.error(&error))
    }

    fn scan(
        &self,
        column: Column,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, KvError> {
        self.kv
            .scan_with(self.options(column), column, start, end, limit)
    }
}

impl KvEngine for RocksKv {
    fn get(&self, column: Column, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.db
            .get_cf_opt(self.handle(column)?, key, &read_options(column))
            .map_err(|error| self.error(&error))
    }

    fn contains(&self, column: Column, key: &[u8]) -> Result<bool, KvError> {
        let handle = self.handle(column)?;
        // Bloom filters and memtables answer "certainly not" without reading a value; only
        // a maybe pays for the lookup.
        if !self.db.key_may_exist_cf(handle, key) {
            return Ok(false);
        }
        // A get of a blob column's key reads the value from its blob file: every reused
        // chunk of a re-import read its shard from disk only to learn that it is there.
        // An iterator that leaves values unprepared answers from the keys alone.
        key_exists_unprepared(&self.db, handle, key)
            .map_err(|(detail, corruption)| map_error_detail(detail, corruption, &self.path))
    }

    fn write(&self, batch: WriteBatch, durability: Durability) -> Result<(), KvError> {
        // Sized up front: an import's 8 MiB batches would otherwise grow by doubling, each
        // step a fresh allocation and copy.
        const RECORD_OVERHEAD_BYTES: usize = 16;
        let mut rocks_batch = rocksdb::WriteBatch::with_capacity_bytes(
            batch.payload_bytes() + batch.len() * RECORD_OVERHEAD_BYTES,
        );
        for op in batch.ops() {
            match op {
                BatchOp::Put { column, key, value } => {
                    rocks_batch.put_cf(self.handle(*column)?, key, value)
                }
                BatchOp::Delete { column, key } => {
                    rocks_batch.delete_cf(self.handle(*column)?, key)
                }
                BatchOp::DeleteRange { column, start, end } => {
                    rocks_batch.delete_range_cf(self.handle(*column)?, start, end)
                }
            }
        }
        let mut write_options = WriteOptions::default();
        match durability {
            Durability::Unlogged => write_options.disable_wal(true),
            Durability::Logged => {}
            Durability::Synced => write_options.set_sync(true),
        }
        self.db
            .write_opt(rocks_batch, &write_options)
            .map_err(|error| self.error(&error))
    }

    fn scan(
        &self,
        column: Column,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, KvError> {
        self.scan_with(read_options(column), column, start, end, limit)
    }

    fn last_in_range(
        &self,
        column: Column,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Result<Option<KeyValue>, KvError> {
        if end.is_some_and(|end| end <= start) {
            return Ok(None);
        }
        let mut options = read_options(column);
        options.set_iterate_lower_bound(start.to_vec());
        if let Some(end) = end {
            options.set_iterate_upper_bound(end.to_vec());
        }
        let mut iterator = self.db.raw_iterator_cf_opt(self.handle(column)?, options);
        iterator.seek_to_last();
        let last = match (iterator.valid(), iterator.key(), iterator.value()) {
            (true, Some(key), Some(value)) if in_range(key, start, end) => {
                Some((key.to_vec(), value.to_vec()))
            }
            _ => None,
        };
        iterator.status().map_err(|error| self.error(&error))?;
        Ok(last)
    }

    fn read_view(&self, read: &mut ViewReader<'_>) -> Result<(), KvError> {
        let view = RocksView {
            kv: self,
            snapshot: self.db.snapshot(),
        };
        read(&view)
    }

    fn flush(&self, columns: &[Column]) -> Result<(), KvError> {
        let handles = columns
            .iter()
            .map(|column| self.handle(*column))
            .collect::<Result<Vec<_>, _>>()?;
        let mut flush_options = FlushOptions::default();
        flush_options.set_wait(true);
        self.db
            .flush_cfs_opt(&handles, &flush_options)
            .map_err(|error| self.error(&error))?;
        // Flushed SST and blob files are synced by RocksDB; syncing the log as well makes
        // every logged write before this point durable too, as the trait promises.
        self.db.flush_wal(true).map_err(|error| self.error(&error))
    }

    fn sync(&self) -> Result<(), KvError> {
        self.db.flush_wal(true).map_err(|error| self.error(&error))
    }

    fn compact(&self, column: Column) -> Result<(), KvError> {
        let mut options = CompactOptions::default();
        // Rewrite the bottom level too, so blob garbage collection sees every file.
        options.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
        let handle = self.handle(column)?;
        let large = column.holds_large_values();
        let set_blob_gc = |enabled: &str| {
            self.db
                .set_options_cf(handle, &[("enable_blob_garbage_collection", enabled)])
                .map_err(|error| self.error(&error))
        };
        if large {
            set_blob_gc("true")?;
        }
        self.db
            .compact_range_cf_opt(handle, None::<&[u8]>, None::<&[u8]>, &options);
        if large {
            set_blob_gc("false")?;
        }
        Ok(())
    }

    fn usage(&self, column: Column) -> Result<ColumnUsage, KvError> {
        let handle = self.handle(column)?;
        let property = |name: &str| -> Result<u64, KvError> {
            Ok(self
                .db
                .property_int_value_cf(handle, name)
                .map_err(|error| self.error(&error))?
                .unwrap_or(0))
        };
        Ok(ColumnUsage {
            keys: property("rocksdb.estimate-num-keys")?,
            table_bytes: property("rocksdb.total-sst-files-size")?,
            blob_bytes: property("rocksdb.total-blob-file-size")?,
            pending_compaction_bytes: property("rocksdb.estimate-pending-compaction-bytes")?,
        })
    }
}
