//! Power cuts on `MemKv`'s crash model (a `kill -9` keeps the page cache; these do not):
//! the real vault runs on an in-memory engine that dies at a seeded write point during an
//! import, a gc or a scrub repair, then loses everything that was not durable (and keeps a
//! seeded prefix of the unsynced log). After reopening, every acknowledged snapshot
//! exports byte-exact and fsck is clean. A failure prints its seed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use forge_node::NodeError;
use forge_node::clock::{SeededRandomness, SteppingClock};
use forge_node::datadir::{DataDir, SecretProtection};
use forge_node::error::Result;
use forge_node::progress::Progress;
use forge_node::vault::export::SnapshotSelector;
use forge_node::vault::{CreateVolumeOptions, ImportOptions, Vault, VaultParts};
use forge_store::kv::MemKv;

mod common;

const SEEDS: u64 = 60;

fn no_passphrase(_: &str, _: bool) -> Result<zeroize::Zeroizing<String>> {
    Err(NodeError::PassphraseUnavailable)
}

fn open(data_dir: &DataDir, kv: &Arc<MemKv>, seed: u64) -> Vault {
    open_with_threads(data_dir, kv, seed, 1)
}

fn open_with_threads(data_dir: &DataDir, kv: &Arc<MemKv>, seed: u64, threads: usize) -> Vault {
    let identity = data_dir
        .load_identity(|| Err(NodeError::PassphraseUnavailable))
        .unwrap();
    Vault::from_parts(
        data_dir,
        identity,
        VaultParts {
            kv: kv.clone(),
            metadata: None,
            clock: Arc::new(SteppingClock::new(1_700_000_000_000_000_000, 1_000)),
            randomness: Arc::new(SeededRandomness::new(seed)),
            threads,
        },
    )
    .unwrap()
}

fn write_source(root: &Path, seed: u64) {
    let mut next = common::xorshift(seed);
    for file in 0..12 {
        let len = usize::try_from(next() % 90_000).unwrap();
        let content: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[2]).collect();
        let dir = root.join(format!("d{}", file % 3));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(format!("f{file}")), content).unwrap();
    }
}

fn import(vault: &Vault, source: &Path) -> Result<String> {
    let options = ImportOptions {
        message: String::new(),
        branch: "main".into(),
        dna: BTreeMap::new(),
        atime: false,
    };
    Ok(vault
        .import(
            "v",
            source,
            &options,
            &no_passphrase,
            &Progress::new("test", false),
        )?
        .snapshot
        .to_hex())
}

fn files_of(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(
                    path.strip_prefix(root).unwrap().to_owned(),
                    fs::read(&path).unwrap(),
                );
            }
        }
    }
    files
}

#[test]
fn acknowledged_snapshots_survive_a_power_cut_at_any_write_point() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = DataDir::new(temp.path().join("vault"));
    data_dir.init(&SecretProtection::FileMode).unwrap();
    let sources: Vec<PathBuf> = (0..3)
        .map(|index| {
            let source = temp.path().join(format!("source{index}"));
            write_source(&source, index);
            source
        })
        .collect();
    let expected: Vec<_> = sources.iter().map(|source| files_of(source)).collect();
    let mut died = 0;
    for seed in 0..SEEDS {
        let kv = Arc::new(MemKv::new());
        let vault = open(&data_dir, &kv, seed);
        vault
            .create_volume("v", &CreateVolumeOptions::default(), &no_passphrase)
            .unwrap();
        // Acknowledged before the cut: two snapshots, the first of them deleted (gc work).
        let mut acknowledged: Vec<(String, usize)> = Vec::new();
        let first = import(&vault, &sources[0]).unwrap();
        acknowledged.push((import(&vault, &sources[1]).unwrap(), 1));
        vault.delete_snapshot("v", &first).unwrap();
        // The operation the power cut interrupts, and where.
        let operation = seed % 3;
        kv.die_after_writes(usize::try_from(seed / 3 % 8).unwrap());
        let outcome = match operation {
            0 => import(&vault, &sources[2]).map(|snapshot| acknowledged.push((snapshot, 2))),
            1 => vault
                .gc(&no_passphrase, &Progress::new("test", false))
                .map(|_| ()),
            _ => vault.scrub(true, &Progress::new("test", false)).map(|_| ()),
        };
        if outcome.is_err() {
            assert!(kv.died(), "seed {seed}: failed without dying: {outcome:?}");
            died += 1;
        }
        drop(vault);
        kv.crash(usize::try_from(seed % 4).unwrap());
        let vault = open(&data_dir, &kv, seed + 1_000);
        let report = vault.fsck(None, &Progress::new("test", false)).unwrap();
        assert!(
            report.problems.is_empty(),
            "seed {seed} (replay: this test, seed {seed}): fsck after the cut: {:?}",
            report.problems
        );
        for (snapshot, source) in &acknowledged {
            let out = temp.path().join(format!("out-{seed}-{source}"));
            vault
                .export(
                    "v",
                    &out,
                    &SnapshotSelector::Id(snapshot.clone()),
                    &forge_node::vault::ExportOptions::default(),
                    &no_passphrase,
                    &Progress::new("test", false),
                )
                .unwrap_or_else(|error| panic!("seed {seed}: export of {snapshot}: {error}"));
            assert_eq!(files_of(&out), expected[*source], "seed {seed}: {snapshot}");
            fs::remove_dir_all(&out).unwrap();
        }
        // The vault keeps working after the cut: gc and a new import.
        vault
            .gc(&no_passphrase, &Progress::new("test", false))
            .unwrap();
        import(&vault, &sources[2]).unwrap();
        assert!(
            vault
                .fsck(None, &Progress::new("test", false))
                .unwrap()
                .problems
                .is_empty(),
            "seed {seed}"
        );
    }
    // The crash points fall inside the operations, and some operations finish first.
    assert!(
        died > SEEDS / 4 && died < SEEDS,
        "{died} of {SEEDS} operations died"
    );
}

/// With the same parts (seeded randomness, stepping clock, one thread), two vaults write
/// the same bytes: the same volume id, keys, signatures and so the same snapshot id. This
/// is what the simulator's replay of a seed rests on.
#[test]
fn the_same_seed_gives_the_same_snapshot() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = DataDir::new(temp.path().join("vault"));
    data_dir.init(&SecretProtection::FileMode).unwrap();
    let source = temp.path().join("source");
    write_source(&source, 7);
    // A large file too: its chunks are sealed in parallel batches.
    let large: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    fs::write(source.join("large.bin"), large).unwrap();
    let run = |seed: u64, threads: usize| {
        let kv = Arc::new(MemKv::new());
        let vault = open_with_threads(&data_dir, &kv, seed, threads);
        vault
            .create_volume("v", &CreateVolumeOptions::default(), &no_passphrase)
            .unwrap();
        import(&vault, &source).unwrap()
    };
    assert_eq!(run(5, 1), run(5, 1));
    assert_ne!(run(5, 1), run(6, 1));
    // The thread count changes the order of work, never what is written.
    assert_eq!(run(5, 1), run(5, 2));
}
