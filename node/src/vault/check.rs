//! fsck (verify everything) and scrub (find damaged shards, rebuild them from parity).

use std::collections::BTreeSet;

use forge_crypto::Cid;
use forge_store::chunkstore::{ChunkRead, ChunkStoreError, has_chunk, read_chunk, shard_key};
use forge_store::erasure::ShardRecord;
use forge_store::ids::ShardIdx;
use forge_store::kv::{Column, Durability, KeyValue, KvEngine, WriteBatch};

use super::{OpenVolume, PassphraseSource, Vault, no_passphrase};
use crate::error::{IntegrityFault, NodeError, Result};
use crate::progress::Progress;

/// Entries read per scan page, so a large store is walked in bounded memory.
const SCAN_PAGE_ENTRIES: usize = 512;

/// What fsck found.
#[derive(Debug, Clone, Default)]
pub struct FsckReport {
    /// Objects checked against their cids.
    pub objects_checked: u64,
    /// Chunks read back and verified.
    pub chunks_checked: u64,
    /// Snapshots whose commit, trees and chunk references were walked.
    pub snapshots_checked: u64,
    /// Every problem, sorted by volume, snapshot and detail.
    pub problems: Vec<FsckProblem>,
    /// Damaged shards that parity can rebuild (`forge scrub --repair`).
    pub repairable_shards: u64,
    /// Volumes not walked (encrypted, no passphrase given).
    pub skipped_volumes: Vec<String>,
    /// Volumes whose keys the passphrase given did not open, with the reason. Their data
    /// was still checked keylessly through the reference index; this is not damage.
    pub keys_not_opened: Vec<(String, String)>,
}

/// One problem fsck found, and where.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FsckProblem {
    /// The volume it concerns (None: the store as a whole).
    pub volume: Option<String>,
    /// The snapshot it concerns.
    pub snapshot: Option<String>,
    /// What is wrong.
    pub detail: String,
}

impl FsckProblem {
    fn store(detail: String) -> Self {
        Self {
            volume: None,
            snapshot: None,
            detail,
        }
    }

    fn volume(volume: &str, detail: String) -> Self {
        Self {
            volume: Some(volume.to_owned()),
            snapshot: None,
            detail,
        }
    }

    fn snapshot(volume: &str, snapshot: &Cid, detail: String) -> Self {
        Self {
            volume: Some(volume.to_owned()),
            snapshot: Some(snapshot.to_hex()),
            detail,
        }
    }
}

impl std::fmt::Display for FsckProblem {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.volume, &self.snapshot) {
            (Some(volume), Some(snapshot)) => {
                write!(formatter, "volume {volume} snapshot {snapshot}: ")?;
            }
            (Some(volume), None) => write!(formatter, "volume {volume}: ")?,
            _ => {}
        }
        write!(formatter, "{}", self.detail)
    }
}

/// What scrub found and did.
#[derive(Debug, Clone, Default)]
pub struct ScrubReport {
    /// Chunks verified.
    pub chunks_checked: u64,
    /// Shards found damaged or missing.
    pub damaged_shards: u64,
    /// Shards rewritten from parity.
    pub repaired_shards: u64,
    /// Chunks that cannot be rebuilt, with the reason.
    pub unrecoverable: Vec<String>,
}

impl Vault {
    /// Verifies every object, every chunk, every ref and (for volumes whose keys are at
    /// hand) every snapshot's reachable objects and chunks. `passphrase` is None when none
    /// was given: encrypted volumes are then checked keylessly only.
    ///
    /// # Errors
    /// Engine errors only: what is wrong with the data is reported, not returned.
    pub fn fsck(
        &self,
        passphrase: Option<PassphraseSource<'_>>,
        progress: &Progress,
    ) -> Result<FsckReport> {
        let mut report = FsckReport::default();
        for_each_entry(self.kv(), Column::Objects, |key, value| {
            report.objects_checked += 1;
            progress.file_done(value.len() as u64);
            match Cid::from_slice(key) {
                Ok(cid) if cid.matches(value) => {}
                Ok(cid) => report.problems.push(FsckProblem::store(format!(
                    "object {cid} does not match its id (corrupted)"
                ))),
                Err(_) => report.problems.push(FsckProblem::store(format!(
                    "object key of {} bytes is not a cid",
                    key.len()
                ))),
            }
        })?;
        for cid in chunk_ids(self.kv())? {
            report.chunks_checked += 1;
            let read = self.check_chunk(&cid)?;
            progress.file_done(read.as_ref().map_or(0, |read| read.ciphertext.len() as u64));
            match read {
                Ok(read) if read.rebuilt.is_empty() => {}
                Ok(read) => {
                    report.repairable_shards += read.rebuilt.len() as u64;
                    report.problems.push(FsckProblem::store(format!(
                        "chunk {cid}: {} damaged shard(s), repairable with `forge scrub --repair`",
                        read.rebuilt.len()
                    )));
                }
                Err(error) => report.problems.push(FsckProblem::store(error.to_string())),
            }
        }
        for record in self.list_volumes()? {
            let volume_id = forge_store::VolumeId::from_bytes(record.id);
            let listed: BTreeSet<Cid> = self
                .snapshot_listings(&record)?
                .into_iter()
                .map(|(cid, _)| cid)
                .collect();
            for (branch, head) in self.refs().list_refs(&volume_id)? {
                if !listed.contains(&head)
                    || self.kv().get(Column::Objects, head.as_bytes())?.is_none()
                {
                    report.problems.push(FsckProblem::volume(
                        &record.name,
                        format!("branch {branch} points at missing snapshot {head}"),
                    ));
                }
            }
            // Keyless check through each snapshot's signed reference index: every cid it
            // names must be stored (as an object or as a chunk).
            for snapshot in &listed {
                match self.walk_index(&record, snapshot) {
                    Ok((cids, _)) => {
                        for cid in cids {
                            if self.kv().get(Column::Objects, cid.as_bytes())?.is_none()
                                && !has_chunk(self.kv(), &cid)?
                                && !self.is_grouped(&cid)?
                            {
                                report.problems.push(FsckProblem::snapshot(
                                    &record.name,
                                    snapshot,
                                    format!("{cid} is missing"),
                                ));
                            }
                        }
                    }
                    Err(error) => report.problems.push(FsckProblem::snapshot(
                        &record.name,
                        snapshot,
                        error.to_string(),
                    )),
                }
            }
            if !self.holds_volume_keys(&record)? {
                // A zero-knowledge copy: the keyless check above is all there is to do.
                continue;
            }
            let volume = match passphrase {
                None if record.encrypted => {
                    report.skipped_volumes.push(record.name.clone());
                    continue;
                }
                _ => {
                    let source = passphrase.unwrap_or(&no_passphrase);
                    match self.open_volume(&record.name, source) {
                        Ok(volume) => volume,
                        // A passphrase that does not open the keys is the user's mistake,
                        // not damage: the keyless check above already ran on its data.
                        Err(error @ NodeError::Crypto(_)) if record.encrypted => {
                            report
                                .keys_not_opened
                                .push((record.name.clone(), error.to_string()));
                            continue;
                        }
                        Err(error) => {
                            report.problems.push(FsckProblem::volume(
                                &record.name,
                                format!("keys do not open: {error}"),
                            ));
                            continue;
                        }
                    }
                }
            };
            let mut walked = BTreeSet::new();
            for snapshot in &listed {
                report.snapshots_checked += 1;
                progress.file_done(0);
                match self.check_snapshot(&volume, snapshot, &mut walked) {
                    Ok(()) => {}
                    // Sealed with a key this node was not given (made after the volume was
                    // unshared from it; its bytes hash to its cid, so this is not damage):
                    // the keyless check above covered it (found by the simulator).
                    Err(NodeError::Integrity(IntegrityFault::UnreadableObject { .. })) => {}
                    Err(error) => report.problems.push(FsckProblem::snapshot(
                        &record.name,
                        snapshot,
                        error.to_string(),
                    )),
                }
            }
        }
        report.problems.sort();
        Ok(report)
    }

    fn check_snapshot(
        &self,
        volume: &OpenVolume,
        snapshot: &Cid,
        walked: &mut BTreeSet<Cid>,
    ) -> Result<()> {
        let commit = self.read_commit(volume, snapshot)?;
        self.walk_tree(
            volume,
            Cid::from_bytes(commit.root),
            walked,
            &mut |name, chunk| {
                if has_chunk(self.kv(), &chunk.cid())? || self.is_grouped(&chunk.cid())? {
                    return Ok(());
                }
                Err(IntegrityFault::MissingChunk {
                    cid: chunk.cid(),
                    file: String::from_utf8_lossy(name).into_owned(),
                }
                .into())
            },
        )
    }

    /// Verifies every chunk; with `repair`, rewrites damaged shards rebuilt from parity.
    ///
    /// # Errors
    /// Engine errors.
    pub fn scrub(&self, repair: bool, progress: &Progress) -> Result<ScrubReport> {
        let mut report = ScrubReport::default();
        let chunks = chunk_ids(self.kv())?;
        progress.set_expected(chunks.len() as u64, 0);
        for cid in chunks {
            report.chunks_checked += 1;
            let read = self.check_chunk(&cid)?;
            progress.file_done(read.as_ref().map_or(0, |read| read.ciphertext.len() as u64));
            match read {
                Ok(read) => {
                    report.damaged_shards += read.rebuilt.len() as u64;
                    if repair && !read.rebuilt.is_empty() {
                        let mut batch = WriteBatch::new();
                        for (index, record) in read.rebuilt {
                            batch.put(Column::Shards, shard_key(&cid, index), record);
                            report.repaired_shards += 1;
                        }
                        self.kv().write(batch, Durability::Synced)?;
                    }
                }
                Err(ChunkStoreError::Kv(error)) => return Err(error.into()),
                Err(error) => report.unrecoverable.push(error.to_string()),
            }
        }
        Ok(report)
    }
}

impl Vault {
    /// Reads chunk `cid` to check it: whole from this node's shards, or, for a chunk
    /// spread over a volume group (this node holds only its own shards), by checking each
    /// local shard's checksum; a damaged one is rebuilt from the chunk gathered from the
    /// group (`rebuilt` then names it, as for a local chunk).
    fn check_chunk(&self, cid: &Cid) -> Result<std::result::Result<ChunkRead, ChunkStoreError>> {
        if !self.is_grouped(cid)? {
            return Ok(read_chunk(self.kv(), cid));
        }
        let end = forge_store::kv::prefix_end(cid.as_bytes());
        let stored = self
            .kv()
            .scan(Column::Shards, cid.as_bytes(), end.as_deref(), 256)?;
        let mut damaged = Vec::new();
        let mut layout = None;
        for (key, value) in &stored {
            match (ShardRecord::decode(value), key.get(32..34)) {
                (Ok(record), Some([high, low]))
                    if record.index.get() == usize::from(u16::from_be_bytes([*high, *low])) =>
                {
                    layout = Some(record.layout);
                }
                (_, Some([high, low])) => {
                    damaged.push(usize::from(u16::from_be_bytes([*high, *low])))
                }
                _ => {}
            }
        }
        if damaged.is_empty() {
            return Ok(Ok(ChunkRead {
                ciphertext: Vec::new(),
                rebuilt: Vec::new(),
            }));
        }
        let ciphertext = match self.fetch_grouped_chunk(cid) {
            Ok(Some(ciphertext)) => ciphertext,
            Ok(None) => return Ok(Err(ChunkStoreError::Missing { cid: *cid })),
            Err(error) => {
                tracing::warn!(%error, %cid, "gathering a grouped chunk to rebuild a shard");
                return Ok(Err(ChunkStoreError::Unrecoverable {
                    cid: *cid,
                    intact: stored.len() - damaged.len(),
                    needed: layout.map_or(1, forge_store::erasure::ErasureLayout::data_shards),
                    damaged: damaged.len(),
                }));
            }
        };
        let volume_layout = match layout {
            Some(layout) => layout,
            // Every local shard damaged: the group's layout from any of its volumes.
            None => match self.grouped_layout(cid)? {
                Some(layout) => layout,
                None => return Ok(Err(ChunkStoreError::Missing { cid: *cid })),
            },
        };
        let coder = forge_store::erasure::ErasureCoder::new(volume_layout)?;
        let payloads = coder.encode(&ciphertext)?;
        let ciphertext_len = u32::try_from(ciphertext.len()).unwrap_or(u32::MAX);
        let mut rebuilt = Vec::new();
        for index in damaged {
            if let Some(payload) = payloads.get(index) {
                let index = ShardIdx::new(index).map_err(ChunkStoreError::from)?;
                rebuilt.push((
                    index,
                    ShardRecord {
                        layout: volume_layout,
                        index,
                        ciphertext_len,
                        payload: payload.clone(),
                    }
                    .encode(),
                ));
            }
        }
        Ok(Ok(ChunkRead {
            ciphertext,
            rebuilt,
        }))
    }
}

/// Every chunk id in the shard column, in order.
fn chunk_ids(kv: &dyn KvEngine) -> Result<Vec<Cid>> {
    let mut ids: Vec<Cid> = Vec::new();
    for_each_entry(kv, Column::Shards, |key, _| {
        if let Ok(cid) = Cid::from_slice(&key[..key.len().min(32)])
            && ids.last() != Some(&cid)
        {
            ids.push(cid);
        }
    })?;
    Ok(ids)
}

/// Visits every entry of a column, a page at a time.
pub(super) fn for_each_entry(
    kv: &dyn KvEngine,
    column: Column,
    mut visit: impl FnMut(&[u8], &[u8]),
) -> Result<()> {
    for_each_page(kv, column, &[], None, &mut |page| {
        for (key, value) in page {
            visit(key, value);
        }
        Ok(())
    })
}

/// Calls `visit` with each page (up to [`SCAN_PAGE_ENTRIES`] entries) of `column` from
/// `start` to `end`; an error from `visit` stops the walk.
pub(super) fn for_each_page(
    kv: &dyn KvEngine,
    column: Column,
    start: &[u8],
    end: Option<&[u8]>,
    visit: &mut dyn FnMut(&[KeyValue]) -> Result<()>,
) -> Result<()> {
    let mut from = start.to_vec();
    loop {
        let page = kv.scan(column, &from, end, SCAN_PAGE_ENTRIES)?;
        visit(&page)?;
        match page.last() {
            Some((last, _)) if page.len() == SCAN_PAGE_ENTRIES => {
                from.clone_from(last);
                from.push(0); // the smallest key after `last`
            }
            _ => return Ok(()),
        }
    }
}
