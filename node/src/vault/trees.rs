//! Directories and file manifests of any size: reading a tree or manifest through its index
//! objects, and writing one split into parts of bounded size.
//!
//! A tree or manifest whose encoding is over [`VaultLimits::part_bytes_max`] is stored as
//! parts under a [`TreeIndex`] / [`ManifestIndex`] (an index over the limit is split the
//! same way, up to [`INDEX_DEPTH_MAX`] levels). Parts are cut by content, like chunks: after
//! at least `part_bytes_min` bytes, at an entry whose name (or a chunk whose cid) hashes to a
//! boundary (with a probability that grows with the item's size, so a part holds about
//! twice the minimum), so inserting one entry re-stores one part and the index, not the
//! directory.
//!
//! [`VaultLimits::part_bytes_max`]: super::VaultLimits::part_bytes_max

use std::ops::Range;

use forge_crypto::Cid;
use forge_store::object::{
    EntryContent, FileManifest, INDEX_DEPTH_MAX, INLINE_MANIFEST_CHUNKS_MAX, ManifestIndex,
    ManifestPart, Object, Tree, TreeEntry, TreeIndex, TreePart,
};

use super::import::Importer;
use super::{OpenVolume, Vault};
use crate::error::{IntegrityFault, NodeError, Result};

/// What an object adds around its items' encodings: the header and the item count.
const PART_OVERHEAD_BYTES: usize = 32;

impl Vault {
    /// A directory's entries, sorted: a tree's, or a tree index's parts' in order.
    ///
    /// # Errors
    /// Integrity errors for missing, damaged or misplaced objects.
    pub(crate) fn read_tree(&self, volume: &OpenVolume, cid: &Cid) -> Result<Vec<TreeEntry>> {
        self.read_tree_with(volume, cid, &mut |_| {})
    }

    /// [`Vault::read_tree`], calling `on_object` with every object read (the tree, or the
    /// index and all its parts), for walks that must reach every object.
    ///
    /// # Errors
    /// As [`Vault::read_tree`].
    pub(crate) fn read_tree_with(
        &self,
        volume: &OpenVolume,
        cid: &Cid,
        on_object: &mut dyn FnMut(Cid),
    ) -> Result<Vec<TreeEntry>> {
        let mut entries = Vec::new();
        // Depth-first over the index, parts in order, so entries come out sorted.
        let mut pending = vec![(*cid, 0usize)];
        while let Some((cid, depth)) = pending.pop() {
            on_object(cid);
            match self.read_object(volume, &cid)? {
                Object::Tree(tree) => entries.extend(tree.entries),
                Object::TreeIndex(index) if depth < INDEX_DEPTH_MAX => {
                    pending.extend(
                        index
                            .parts
                            .iter()
                            .rev()
                            .map(|part| (Cid::from_bytes(part.cid), depth + 1)),
                    );
                }
                other => return Err(misplaced(&cid, &other, "tree", depth)),
            }
        }
        if entries.windows(2).any(|pair| pair[0].name >= pair[1].name) {
            return Err(IntegrityFault::TreeOutOfOrder { cid: *cid }.into());
        }
        Ok(entries)
    }

    /// A file's manifest stored as an object: a manifest, or a manifest index's parts
    /// joined.
    ///
    /// # Errors
    /// Integrity errors for missing, damaged or misplaced objects.
    pub(crate) fn read_manifest(&self, volume: &OpenVolume, cid: &Cid) -> Result<FileManifest> {
        self.read_manifest_with(volume, cid, &mut |_| {})
    }

    /// [`Vault::read_manifest`], calling `on_object` with every object read.
    ///
    /// # Errors
    /// As [`Vault::read_manifest`].
    pub(crate) fn read_manifest_with(
        &self,
        volume: &OpenVolume,
        cid: &Cid,
        on_object: &mut dyn FnMut(Cid),
    ) -> Result<FileManifest> {
        let mut manifest = FileManifest::default();
        let mut pending = vec![(*cid, 0usize)];
        while let Some((cid, depth)) = pending.pop() {
            on_object(cid);
            match self.read_object(volume, &cid)? {
                Object::Manifest(part) => {
                    for extent in part.extents {
                        manifest.push(extent);
                    }
                }
                Object::ManifestIndex(index) if depth < INDEX_DEPTH_MAX => {
                    pending.extend(
                        index
                            .parts
                            .iter()
                            .rev()
                            .map(|part| (Cid::from_bytes(part.cid), depth + 1)),
                    );
                }
                other => return Err(misplaced(&cid, &other, "manifest", depth)),
            }
        }
        Ok(manifest)
    }

    /// The manifest of a regular file's entry: inline, or read from its object. `None`
    /// for inline data and for entries that are not regular files.
    ///
    /// # Errors
    /// As [`Vault::read_manifest`].
    pub(crate) fn entry_manifest(
        &self,
        volume: &OpenVolume,
        content: &EntryContent,
        on_object: &mut dyn FnMut(Cid),
    ) -> Result<Option<FileManifest>> {
        Ok(match content {
            EntryContent::InlineFile(manifest) => Some(manifest.clone()),
            EntryContent::File { manifest } => {
                Some(self.read_manifest_with(volume, &Cid::from_bytes(*manifest), on_object)?)
            }
            _ => None,
        })
    }
}

fn misplaced(cid: &Cid, found: &Object, expected: &'static str, depth: usize) -> NodeError {
    if depth >= INDEX_DEPTH_MAX {
        IntegrityFault::IndexTooDeep {
            cid: *cid,
            expected,
            levels: INDEX_DEPTH_MAX,
        }
        .into()
    } else {
        IntegrityFault::WrongKind {
            cid: *cid,
            found: found.name(),
            expected,
        }
        .into()
    }
}

impl Importer<'_> {
    /// Stores a directory's tree, split into parts under an index when it is too large for
    /// one object; returns the cid a directory entry names.
    ///
    /// # Errors
    /// Storage errors; [`NodeError::TooLarge`] for a directory beyond every index level.
    pub(crate) fn store_tree(&self, tree: Tree) -> Result<Cid> {
        let limits = self.vault().limits();
        let (min, max) = (
            limits.part_bytes_min,
            limits.part_bytes_max().max(2 * PART_OVERHEAD_BYTES),
        );
        let object = Object::Tree(tree);
        if let Some(cid) = self.store_object_if_within(&object, max)? {
            return Ok(cid);
        }
        let Object::Tree(tree) = object else {
            unreachable!("built as a tree above")
        };
        let total_entries = tree.entries.len();
        let sizes: Vec<usize> = tree.entries.iter().map(encoded_len).collect();
        let boundaries: Vec<bool> = tree
            .entries
            .iter()
            .zip(&sizes)
            .map(|(entry, size)| is_boundary(Cid::of(&entry.name).as_bytes(), *size, min))
            .collect();
        let mut parts = Vec::new();
        let mut entries = tree.entries.into_iter();
        for range in cut(&sizes, &boundaries, min, max - PART_OVERHEAD_BYTES) {
            let part: Vec<TreeEntry> = entries.by_ref().take(range.len()).collect();
            let first = part[0].name.clone();
            let count = part.len() as u64;
            let cid = self.store_part(&Object::Tree(Tree { entries: part }), total_entries)?;
            parts.push(TreePart {
                first,
                cid: *cid.as_bytes(),
                entries: count,
            });
        }
        for _level in 1..INDEX_DEPTH_MAX {
            let index = Object::TreeIndex(TreeIndex {
                parts: parts.clone(),
            });
            if let Some(cid) = self.store_object_if_within(&index, max)? {
                return Ok(cid);
            }
            let sizes: Vec<usize> = parts.iter().map(encoded_len).collect();
            let boundaries: Vec<bool> = parts
                .iter()
                .zip(&sizes)
                .map(|(part, size)| is_boundary(Cid::of(&part.first).as_bytes(), *size, min))
                .collect();
            let mut upper = Vec::new();
            let mut lower = parts.into_iter();
            for range in cut(&sizes, &boundaries, min, max - PART_OVERHEAD_BYTES) {
                let group: Vec<TreePart> = lower.by_ref().take(range.len()).collect();
                let first = group[0].first.clone();
                let count = group.iter().map(|part| part.entries).sum();
                let cid = self.store_part(
                    &Object::TreeIndex(TreeIndex { parts: group }),
                    total_entries,
                )?;
                upper.push(TreePart {
                    first,
                    cid: *cid.as_bytes(),
                    entries: count,
                });
            }
            parts = upper;
        }
        Err(too_many_levels(format!(
            "a directory of {total_entries} entries"
        )))
    }

    /// The entry content of a regular file with `manifest`: the manifest inline when it is
    /// small, else stored as an object (split under an index when too large for one).
    ///
    /// # Errors
    /// Storage errors; [`NodeError::TooLarge`] beyond every index level.
    pub(crate) fn file_content(&self, manifest: FileManifest) -> Result<EntryContent> {
        if manifest.chunk_count() <= INLINE_MANIFEST_CHUNKS_MAX
            && manifest.extents.len() <= INLINE_MANIFEST_CHUNKS_MAX
        {
            return Ok(EntryContent::InlineFile(manifest));
        }
        let cid = self.store_manifest(manifest)?;
        Ok(EntryContent::File {
            manifest: *cid.as_bytes(),
        })
    }

    fn store_manifest(&self, manifest: FileManifest) -> Result<Cid> {
        let limits = self.vault().limits();
        let (min, max) = (
            limits.part_bytes_min,
            limits.part_bytes_max().max(2 * PART_OVERHEAD_BYTES),
        );
        let file_size = manifest.size;
        let object = Object::Manifest(manifest);
        if let Some(cid) = self.store_object_if_within(&object, max)? {
            return Ok(cid);
        }
        let Object::Manifest(manifest) = object else {
            unreachable!("built as a manifest above")
        };
        let sizes: Vec<usize> = manifest.extents.iter().map(encoded_len).collect();
        let boundaries: Vec<bool> = manifest
            .extents
            .iter()
            .zip(&sizes)
            .map(|(extent, size)| match extent {
                forge_store::object::Extent::Chunk(chunk) => is_boundary(&chunk.cid, *size, min),
                forge_store::object::Extent::Hole { .. } => false,
            })
            .collect();
        let mut parts = Vec::new();
        let mut extents = manifest.extents.into_iter();
        for range in cut(&sizes, &boundaries, min, max - PART_OVERHEAD_BYTES) {
            let mut part = FileManifest::default();
            for extent in extents.by_ref().take(range.len()) {
                part.push(extent);
            }
            let size = part.size;
            let cid = self.store_object(&Object::Manifest(part))?;
            parts.push(ManifestPart {
                cid: *cid.as_bytes(),
                size,
            });
        }
        for _level in 1..INDEX_DEPTH_MAX {
            let index = Object::ManifestIndex(ManifestIndex {
                size: file_size,
                parts: parts.clone(),
            });
            if let Some(cid) = self.store_object_if_within(&index, max)? {
                return Ok(cid);
            }
            let sizes: Vec<usize> = parts.iter().map(encoded_len).collect();
            let boundaries: Vec<bool> = parts
                .iter()
                .zip(&sizes)
                .map(|(part, size)| is_boundary(&part.cid, *size, min))
                .collect();
            let mut upper = Vec::new();
            let mut lower = parts.into_iter();
            for range in cut(&sizes, &boundaries, min, max - PART_OVERHEAD_BYTES) {
                let group: Vec<ManifestPart> = lower.by_ref().take(range.len()).collect();
                let size = group.iter().map(|part| part.size).sum();
                let cid = self
                    .store_object(&Object::ManifestIndex(ManifestIndex { size, parts: group }))?;
                upper.push(ManifestPart {
                    cid: *cid.as_bytes(),
                    size,
                });
            }
            parts = upper;
        }
        Err(too_many_levels(format!("a file of {file_size} bytes")))
    }

    /// Stores one part; a single entry larger than a part is still stored whole when it
    /// fits the object limit.
    fn store_part(&self, object: &Object, total_entries: usize) -> Result<Cid> {
        self.store_object(object).map_err(|error| match error {
            NodeError::TooLarge { detail, .. } => NodeError::TooLarge {
                what: format!("a directory of {total_entries} entries"),
                detail,
            },
            other => other,
        })
    }
}

fn too_many_levels(what: String) -> NodeError {
    NodeError::TooLarge {
        what,
        detail: format!("it needs more than {INDEX_DEPTH_MAX} index levels"),
    }
}

/// Whether an item (known by a hash of what names it, and its encoded size) may end a part:
/// with probability `size / target`, so parts hold about `target` bytes past the minimum
/// whatever their items' sizes (many small entries or a few large inline files alike).
fn is_boundary(hash: &[u8; 32], size: usize, target: usize) -> bool {
    let draw = u64::from(u32::from_le_bytes([hash[0], hash[1], hash[2], hash[3]]));
    let target = target.max(1) as u128;
    u128::from(draw) * target < (size as u128) << 32
}

fn encoded_len<T: serde::Serialize>(value: &T) -> usize {
    postcard::to_stdvec(value).map_or(0, |bytes| bytes.len())
}

/// Cuts `sizes.len()` items into consecutive ranges: a range ends after an item marked a
/// boundary once it holds at least `min` bytes, and always before it would pass `max`.
/// Every range holds at least one item.
fn cut(sizes: &[usize], boundaries: &[bool], min: usize, max: usize) -> Vec<Range<usize>> {
    debug_assert_eq!(sizes.len(), boundaries.len());
    let mut ranges = Vec::new();
    let (mut start, mut bytes) = (0usize, 0usize);
    for (index, size) in sizes.iter().enumerate() {
        if index > start && bytes + size > max {
            ranges.push(start..index);
            (start, bytes) = (index, 0);
        }
        bytes += size;
        if bytes >= min && boundaries[index] {
            ranges.push(start..index + 1);
            (start, bytes) = (index + 1, 0);
        }
    }
    if start < sizes.len() {
        ranges.push(start..sizes.len());
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::cut;

    #[test]
    fn parts_are_cut_at_boundaries_past_the_minimum_and_never_past_the_maximum() {
        let sizes = vec![10; 20];
        let mut boundaries = vec![false; 20];
        boundaries[1] = true; // before the minimum: ignored
        boundaries[6] = true;
        let ranges = cut(&sizes, &boundaries, 50, 80);
        assert_eq!(ranges, vec![0..7, 7..15, 15..20]);
        for range in &ranges {
            assert!(range.len() * 10 <= 80);
        }
        // An item larger than the maximum still gets a range of its own.
        assert_eq!(
            cut(&[5, 100, 5], &[false; 3], 10, 50),
            vec![0..1, 1..2, 2..3]
        );
        assert!(cut(&[], &[], 1, 2).is_empty());
    }

    #[test]
    fn an_insertion_moves_only_nearby_boundaries() {
        // Boundaries come from the items themselves, so after one insertion the cut
        // points resynchronise.
        let items: Vec<u32> = (0..2_000).collect();
        let boundary = |item: &u32| {
            forge_crypto::Cid::of(&item.to_le_bytes()).as_bytes()[0].is_multiple_of(16)
        };
        let ranges_of = |items: &[u32]| {
            let sizes = vec![10; items.len()];
            let marks: Vec<bool> = items.iter().map(boundary).collect();
            cut(&sizes, &marks, 100, 2_000)
                .into_iter()
                .map(|range| items[range.start])
                .collect::<std::collections::BTreeSet<u32>>()
        };
        let before = ranges_of(&items);
        let mut changed = items.clone();
        changed.insert(1_000, 99_999);
        let after = ranges_of(&changed);
        let moved = before.symmetric_difference(&after).count();
        assert!(moved <= 4, "{moved} part starts moved");
    }
}
