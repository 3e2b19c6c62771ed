//! Known answers for what other vaults depend on: a chunk's cut points, an object's
//! encoding, the reference index's boundaries, a shard record. Two vaults must cut, encode
//! and index the same bytes the same way forever, or dedup, sync and audits break across
//! versions; a dependency upgrade that changes any of these fails here (then it needs a
//! new format version, never a silent change).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use forge_crypto::Cid;
use forge_store::chunker::{Chunker, ChunkerParams};
use forge_store::erasure::{ErasureLayout, ShardRecord};
use forge_store::ids::ShardIdx;
use forge_store::object::{
    ChunkRef, EntryContent, EntryMeta, Extent, FileManifest, ManifestIndex, ManifestPart, Object,
    Tree, TreeEntry, TreeIndex, TreePart, Xattr,
};
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

/// Format 1, as it was written: mirrored here field for field (postcard encodes fields in
/// order and enum variants by index), so these bytes are the ones format 1 vaults hold.
mod v1 {
    use forge_store::object::ChunkRef;
    use serde::Serialize;

    #[derive(Serialize, Clone)]
    pub struct FileManifest {
        pub size: u64,
        pub chunks: Vec<ChunkRef>,
    }

    #[derive(Serialize)]
    #[allow(dead_code)]
    pub enum EntryContent {
        InlineFile(FileManifest),
        File { manifest: [u8; 32] },
        Directory { tree: [u8; 32] },
        Symlink { target: Vec<u8> },
    }

    #[derive(Serialize)]
    pub struct TreeEntry {
        pub name: Vec<u8>,
        pub mode: u32,
        pub mtime_ns: i64,
        pub size: u64,
        pub content: EntryContent,
    }

    #[derive(Serialize)]
    pub struct Tree {
        pub entries: Vec<TreeEntry>,
    }

    pub fn encode<T: Serialize>(kind: u8, body: &T) -> Vec<u8> {
        let mut bytes = vec![b'F', b'O', 1, kind];
        bytes.extend_from_slice(&postcard::to_stdvec(body).unwrap());
        bytes
    }
}

fn sample_chunks() -> Vec<ChunkRef> {
    vec![
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
    ]
}

/// Format 1 objects (written before format 2) are still read, as the format 2 values they
/// mean: the same bytes as the pinned format 1 digests, decoded with empty new fields.
#[test]
fn format_1_objects_still_decode() {
    let v1_manifest = v1::FileManifest {
        size: 70_000,
        chunks: sample_chunks(),
    };
    let v1_tree = v1::Tree {
        entries: vec![
            v1::TreeEntry {
                name: b"a".to_vec(),
                mode: 0o644,
                mtime_ns: 1_700_000_000_123_456_789,
                size: 70_000,
                content: v1::EntryContent::InlineFile(v1_manifest.clone()),
            },
            v1::TreeEntry {
                name: b"d".to_vec(),
                mode: 0o755,
                mtime_ns: -5,
                size: 0,
                content: v1::EntryContent::Directory { tree: [9; 32] },
            },
            v1::TreeEntry {
                name: b"l".to_vec(),
                mode: 0o777,
                mtime_ns: 0,
                size: 3,
                content: v1::EntryContent::Symlink {
                    target: b"../".to_vec(),
                },
            },
        ],
    };
    let manifest_bytes = v1::encode(1, &v1_manifest);
    let tree_bytes = v1::encode(2, &v1_tree);
    assert_eq!(digest(&manifest_bytes), V1_MANIFEST_DIGEST);
    assert_eq!(digest(&tree_bytes), V1_TREE_DIGEST);

    let manifest = FileManifest {
        size: 70_000,
        extents: sample_chunks().into_iter().map(Extent::Chunk).collect(),
    };
    assert_eq!(
        Object::decode(&manifest_bytes).unwrap(),
        Object::Manifest(manifest.clone())
    );
    let Object::Tree(tree) = Object::decode(&tree_bytes).unwrap() else {
        panic!("a tree");
    };
    assert_eq!(tree.entries.len(), 3);
    assert_eq!(tree.entries[0].content, EntryContent::InlineFile(manifest));
    assert_eq!(
        tree.entries[1].content,
        EntryContent::Directory { tree: [9; 32] }
    );
    assert_eq!(tree.entries[2].mtime_ns, 0);
    assert!(tree.entries.iter().all(|entry| entry.meta.is_empty()));
}

#[test]
fn object_encodings_are_frozen() {
    let mut manifest = FileManifest::default();
    for chunk in sample_chunks() {
        manifest.push_chunk(chunk);
    }
    manifest.push_hole(1 << 40);
    let tree = Tree {
        entries: vec![
            TreeEntry {
                name: b"a".to_vec(),
                mode: 0o644,
                mtime_ns: 1_700_000_000_123_456_789,
                size: manifest.size,
                content: EntryContent::InlineFile(manifest.clone()),
                meta: EntryMeta::default(),
            },
            TreeEntry {
                name: b"d".to_vec(),
                mode: 0o1777,
                mtime_ns: -5,
                size: 0,
                content: EntryContent::Directory { tree: [9; 32] },
                meta: EntryMeta {
                    uid: Some(0),
                    gid: Some(0),
                    user: Some("root".into()),
                    group: Some("root".into()),
                    atime_ns: Some(1),
                    ctime_ns: Some(2),
                    xattrs: vec![Xattr {
                        name: b"user.k".to_vec(),
                        value: b"v".to_vec(),
                    }],
                    link_group: Some(3),
                },
            },
            TreeEntry {
                name: b"dev".to_vec(),
                mode: 0o600,
                mtime_ns: 0,
                size: 0,
                content: EntryContent::BlockDevice { major: 8, minor: 1 },
                meta: EntryMeta::default(),
            },
            TreeEntry {
                name: b"l".to_vec(),
                mode: 0o777,
                mtime_ns: 0,
                size: 3,
                content: EntryContent::Symlink {
                    target: b"../".to_vec(),
                },
                meta: EntryMeta::default(),
            },
            TreeEntry {
                name: b"s".to_vec(),
                mode: 0o644,
                mtime_ns: 0,
                size: 2,
                content: EntryContent::InlineData(b"hi".to_vec()),
                meta: EntryMeta::default(),
            },
        ],
    };
    let indexes = [
        Object::TreeIndex(TreeIndex {
            parts: vec![TreePart {
                first: b"a".to_vec(),
                cid: [5; 32],
                entries: 2,
            }],
        }),
        Object::ManifestIndex(ManifestIndex {
            size: 7,
            parts: vec![ManifestPart {
                cid: [6; 32],
                size: 7,
            }],
        }),
    ];
    let manifest_bytes = Object::Manifest(manifest).encode();
    let tree_bytes = Object::Tree(tree).encode();
    let index_bytes: Vec<u8> = indexes.iter().flat_map(Object::encode).collect();
    assert_eq!(
        digest(&manifest_bytes),
        MANIFEST_DIGEST,
        "manifest encoding changed"
    );
    assert_eq!(digest(&tree_bytes), TREE_DIGEST, "tree encoding changed");
    assert_eq!(
        digest(&index_bytes),
        INDEXES_DIGEST,
        "index encodings changed"
    );
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
const V1_MANIFEST_DIGEST: &str = "4532abea044d04155c4b502dd60c7795ae2d87dec0a2d575c0358b22cb716e0c";
const V1_TREE_DIGEST: &str = "fac024f869b04965020d000f780ea91c67ac710c1eb7e9bed096d9cbc145b2fd";
const MANIFEST_DIGEST: &str = "ffea932b840f4e5c3b98f0f2882ebfd87c5052db5e7ed142be49f19fa6b253b1";
const TREE_DIGEST: &str = "d657ae39c410769558b98c2d332a41faad6b110d18d30bd0293477f59ee29b06";
const INDEXES_DIGEST: &str = "23f26c4392625135f58be692869c4d266d1080e3ac725900c166ddfab6dcc1e9";
const INDEX_ROOT: &str = "a67e200786a37767571c6792135335e36240601235754da57e82385ba43d9913";
const SINGLE_SHARD_DIGEST: &str =
    "d03b8f9b9f1033e7baa5aa0bc5e9437cddebec73d26eca694e6ba31cc943dd44";
const CODED_SHARD_DIGEST: &str = "dd6a5a62c75f9a715fc16ba7936b63757ddf04eb2f9fff41dfaa97311b3a277e";
