//! Known answers for what other vaults depend on: a chunk's cut points, an object's
//! encoding, the reference index's boundaries, a shard record. Two vaults must cut, encode
//! and index the same bytes the same way forever, or dedup, sync and audits break across
//! versions; a dependency upgrade that changes any of these fails here (then it needs a
//! new format version, never a silent change).

use forge_crypto::Cid;
use forge_store::chunker::{Chunker, ChunkerParams};
use forge_store::erasure::{ErasureLayout, ShardRecord};
use forge_store::ids::ShardIdx;
use forge_store::object::{ChunkRef, EntryContent, FileManifest, Object, Tree, TreeEntry};
use forge_store::refindex;

/// Deterministic input: a xorshift stream.
fn input(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[5]
        })
        .collect()
}

fn digest(bytes: &[u8]) -> String {
    Cid::of(bytes).to_hex()
}

#[test]
fn chunker_v1_cut_points_are_frozen() {
    let data = input(3 << 20, 42);
    let chunker = Chunker::new(ChunkerParams::DEFAULT, 0x0123_4567_89AB_CDEF).unwrap();
    let cuts = chunker.cut_points(&data);
    let lengths: Vec<usize> = cuts.iter().map(|(_, len)| *len).collect();
    let encoded: Vec<u8> = lengths
        .iter()
        .flat_map(|len| (*len as u64).to_le_bytes())
        .collect();
    let small = Chunker::new(ChunkerParams::from_average(1024).unwrap(), 7).unwrap();
    let small_cuts: Vec<u8> = small
        .cut_points(&data[..200_000])
        .iter()
        .flat_map(|(offset, len)| {
            [(*offset as u64).to_le_bytes(), (*len as u64).to_le_bytes()].concat()
        })
        .collect();
    assert_eq!(
        digest(&encoded),
        CUTS_DIGEST,
        "chunker v1 cut points changed"
    );
    assert_eq!(
        digest(&small_cuts),
        SMALL_CUTS_DIGEST,
        "chunker v1 (1 KiB average) changed"
    );
}

#[test]
fn object_encodings_are_frozen() {
    let manifest = FileManifest {
        size: 70_000,
        chunks: vec![
            ChunkRef {
                cid: [1; 32],
                len: 30_000,
                key: [2; 32],
            },
            ChunkRef {
                cid: [3; 32],
                len: 40_000,
                key: [4; 32],
            },
        ],
    };
    let tree = Tree {
        entries: vec![
            TreeEntry {
                name: b"a".to_vec(),
                mode: 0o644,
                mtime_ns: 1_700_000_000_123_456_789,
                size: 70_000,
                content: EntryContent::InlineFile(manifest.clone()),
            },
            TreeEntry {
                name: b"d".to_vec(),
                mode: 0o755,
                mtime_ns: -5,
                size: 0,
                content: EntryContent::Directory { tree: [9; 32] },
            },
            TreeEntry {
                name: b"l".to_vec(),
                mode: 0o777,
                mtime_ns: 0,
                size: 3,
                content: EntryContent::Symlink {
                    target: b"../".to_vec(),
                },
            },
        ],
    };
    let manifest_bytes = Object::Manifest(manifest).encode();
    let tree_bytes = Object::Tree(tree).encode();
    assert_eq!(
        digest(&manifest_bytes),
        MANIFEST_DIGEST,
        "manifest encoding changed"
    );
    assert_eq!(digest(&tree_bytes), TREE_DIGEST, "tree encoding changed");
}

#[test]
fn reference_index_boundaries_are_frozen() {
    let cids: Vec<Cid> = (0u32..5_000)
        .map(|index| Cid::of(&index.to_le_bytes()))
        .collect();
    let mut nodes = 0;
    let root = refindex::build(&cids, |_, _| nodes += 1);
    assert_eq!(nodes, 81, "node count of 5,000 cids at fan-out 64");
    assert_eq!(
        root.to_hex(),
        INDEX_ROOT,
        "reference index v1 boundaries changed"
    );
}

#[test]
fn shard_records_are_frozen() {
    let layout: ErasureLayout = "1+0".parse().unwrap();
    let single = ShardRecord::encode_parts(layout, ShardIdx::FIRST, 5, b"hello");
    let layout: ErasureLayout = "3+2".parse().unwrap();
    let coded = ShardRecord {
        layout,
        index: ShardIdx::new(4).unwrap(),
        ciphertext_len: 10,
        payload: vec![7; 4],
    }
    .encode();
    assert_eq!(digest(&single), SINGLE_SHARD_DIGEST);
    assert_eq!(digest(&coded), CODED_SHARD_DIGEST);
}

const CUTS_DIGEST: &str = "d25bd492f1f16b7dfb5ebce5c55fadc8ebd96553239431ded5e1c53b6d967664";
const SMALL_CUTS_DIGEST: &str = "cb87a6f5684cb926c3b642064c15fdb180007981dda298484d7191929c9bcdc7";
const MANIFEST_DIGEST: &str = "4532abea044d04155c4b502dd60c7795ae2d87dec0a2d575c0358b22cb716e0c";
const TREE_DIGEST: &str = "fac024f869b04965020d000f780ea91c67ac710c1eb7e9bed096d9cbc145b2fd";
const INDEX_ROOT: &str = "a67e200786a37767571c6792135335e36240601235754da57e82385ba43d9913";
const SINGLE_SHARD_DIGEST: &str =
    "d03b8f9b9f1033e7baa5aa0bc5e9437cddebec73d26eca694e6ba31cc943dd44";
const CODED_SHARD_DIGEST: &str = "dd6a5a62c75f9a715fc16ba7936b63757ddf04eb2f9fff41dfaa97311b3a277e";
