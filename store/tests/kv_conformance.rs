//! One conformance suite for every `KvEngine`: the same behaviour from RocksDB and from the
//! in-memory engine, checked against a model. Plus the in-memory crash model's own rules.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests and benches fail loudly by design.

use std::collections::BTreeMap;

use forge_store::kv::{
    Column, Durability, KvEngine, KvError, MemKv, RocksKv, RocksKvOptions, UnfinishedBlobFiles,
    WriteBatch, prefix_end, remove_unfinished_blob_files,
};
use proptest::prelude::*;

/// Runs `check` against a fresh engine of each kind.
fn for_each_engine(check: impl Fn(&dyn KvEngine)) {
    check(&MemKv::new());
    let dir = tempfile::tempdir().unwrap();
    let rocks = RocksKv::open(dir.path(), &RocksKvOptions::default()).unwrap();
    check(&rocks);
}

fn put(engine: &dyn KvEngine, column: Column, key: &[u8], value: &[u8]) {
    let mut batch = WriteBatch::new();
    batch.put(column, key, value);
    engine.write(batch, Durability::Logged).unwrap();
}

#[test]
fn get_put_delete_and_column_isolation() {
    for_each_engine(|engine| {
        assert_eq!(engine.get(Column::Meta, b"k").unwrap(), None);
        put(engine, Column::Meta, b"k", b"v1");
        put(engine, Column::Objects, b"k", b"other column");
        assert_eq!(
            engine.get(Column::Meta, b"k").unwrap().as_deref(),
            Some(&b"v1"[..])
        );
        put(engine, Column::Meta, b"k", b"v2");
        assert_eq!(
            engine.get(Column::Meta, b"k").unwrap().as_deref(),
            Some(&b"v2"[..])
        );
        let mut batch = WriteBatch::new();
        batch.delete(Column::Meta, b"k");
        batch.delete(Column::Meta, b"never-existed");
        engine.write(batch, Durability::Synced).unwrap();
        assert_eq!(engine.get(Column::Meta, b"k").unwrap(), None);
        assert!(!engine.contains(Column::Meta, b"k").unwrap());
        assert!(engine.contains(Column::Objects, b"k").unwrap());
        assert_eq!(
            engine.get(Column::Objects, b"k").unwrap().as_deref(),
            Some(&b"other column"[..])
        );
    });
}

#[test]
fn scans_are_ordered_bounded_and_limited() {
    for_each_engine(|engine| {
        let mut batch = WriteBatch::new();
        for key in [&b"a"[..], b"ab", b"abc", b"b", b"b\xff", b"c"] {
            batch.put(Column::Refs, key, key);
        }
        engine.write(batch, Durability::Unlogged).unwrap();
        let keys = |pairs: Vec<(Vec<u8>, Vec<u8>)>| {
            pairs.into_iter().map(|(key, _)| key).collect::<Vec<_>>()
        };
        assert_eq!(
            keys(engine.scan(Column::Refs, b"", None, 100).unwrap()).len(),
            6
        );
        assert_eq!(
            keys(engine.scan(Column::Refs, b"ab", Some(b"b"), 100).unwrap()),
            vec![b"ab".to_vec(), b"abc".to_vec()]
        );
        assert_eq!(
            keys(
                engine
                    .scan(Column::Refs, b"a", prefix_end(b"a").as_deref(), 100)
                    .unwrap()
            )
            .len(),
            3
        );
        assert_eq!(
            keys(
                engine
                    .scan(Column::Refs, b"b", prefix_end(b"b").as_deref(), 100)
                    .unwrap()
            ),
            vec![b"b".to_vec(), b"b\xff".to_vec()]
        );
        assert_eq!(engine.scan(Column::Refs, b"a", None, 2).unwrap().len(), 2);
        assert!(
            engine
                .scan(Column::Refs, b"c", Some(b"a"), 10)
                .unwrap()
                .is_empty()
        );
        assert!(engine.scan(Column::Refs, b"", None, 0).unwrap().is_empty());
        assert!(
            engine
                .scan(Column::Shards, b"", None, 10)
                .unwrap()
                .is_empty()
        );
    });
}

#[test]
fn large_values_round_trip() {
    for_each_engine(|engine| {
        let value: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut batch = WriteBatch::new();
        batch.put(Column::Shards, b"big", value.clone());
        engine.write(batch, Durability::Unlogged).unwrap();
        engine.flush(&[Column::Shards]).unwrap();
        assert_eq!(engine.get(Column::Shards, b"big").unwrap(), Some(value));
        assert!(engine.contains(Column::Shards, b"big").unwrap());
        assert!(!engine.contains(Column::Shards, b"bif").unwrap());
        let usage = engine.usage(Column::Shards).unwrap();
        assert!(usage.blob_bytes >= 300_000, "{usage:?}");
        engine.compact(Column::Shards).unwrap();
    });
}

#[test]
fn rocks_keeps_flushed_and_synced_writes_across_reopen_and_refuses_a_second_opener() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = RocksKv::open(dir.path(), &RocksKvOptions::default()).unwrap();
        let mut shards = WriteBatch::new();
        shards.put(Column::Shards, b"chunk", vec![7u8; 10_000]);
        engine.write(shards, Durability::Unlogged).unwrap();
        engine.flush(&[Column::Shards]).unwrap();
        let mut reference = WriteBatch::new();
        reference.put(Column::Refs, b"main", b"snapshot-1");
        engine.write(reference, Durability::Synced).unwrap();
        let second = RocksKv::open(dir.path(), &RocksKvOptions::default()).unwrap_err();
        assert!(matches!(second, KvError::Busy { .. }), "{second:?}");
    }
    let engine = RocksKv::open(dir.path(), &RocksKvOptions::default()).unwrap();
    assert_eq!(
        engine.get(Column::Shards, b"chunk").unwrap(),
        Some(vec![7u8; 10_000])
    );
    assert_eq!(
        engine.get(Column::Refs, b"main").unwrap().as_deref(),
        Some(&b"snapshot-1"[..])
    );
}

#[test]
fn unfinished_blob_files_are_removed_and_finished_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let value: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    {
        let engine = RocksKv::open(dir.path(), &RocksKvOptions::default()).unwrap();
        let mut batch = WriteBatch::new();
        batch.put(Column::Shards, b"chunk", value.clone());
        engine.write(batch, Durability::Unlogged).unwrap();
        engine.flush(&[Column::Shards]).unwrap();
    }
    let blob_files = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                path.extension()
                    .is_some_and(|extension| extension == "blob")
            })
            .collect()
    };
    let finished = blob_files();
    assert_eq!(finished.len(), 1, "the flush wrote one blob file");
    // What an interrupted compaction leaves: a header and some records, no footer; and an
    // empty file from a job stopped right after creating it.
    let mut torn = std::fs::read(&finished[0]).unwrap();
    torn.truncate(torn.len() - 32);
    std::fs::write(dir.path().join("999999.blob"), &torn).unwrap();
    std::fs::write(dir.path().join("999998.blob"), b"").unwrap();

    let removed = remove_unfinished_blob_files(dir.path()).unwrap();
    assert_eq!(
        removed,
        UnfinishedBlobFiles {
            files: 2,
            bytes: torn.len() as u64
        }
    );
    assert_eq!(blob_files(), finished);
    assert_eq!(
        remove_unfinished_blob_files(dir.path()).unwrap(),
        UnfinishedBlobFiles::default(),
        "a second sweep finds nothing"
    );
    let engine = RocksKv::open(dir.path(), &RocksKvOptions::default()).unwrap();
    assert_eq!(engine.get(Column::Shards, b"chunk").unwrap(), Some(value));
    drop(engine);
    assert_eq!(
        remove_unfinished_blob_files(&dir.path().join("absent")).unwrap(),
        UnfinishedBlobFiles::default()
    );
}

#[test]
fn mem_crash_drops_exactly_what_was_not_durable() {
    let engine = MemKv::new();
    put(&engine, Column::Meta, b"logged-unsynced", b"1");
    let mut unlogged = WriteBatch::new();
    unlogged.put(Column::Shards, b"unlogged-flushed", b"2");
    unlogged.put(Column::Objects, b"unlogged-unflushed", b"3");
    engine.write(unlogged, Durability::Unlogged).unwrap();
    engine.flush(&[Column::Shards]).unwrap();
    engine.crash(0);
    assert_eq!(engine.get(Column::Meta, b"logged-unsynced").unwrap(), None);
    assert_eq!(
        engine
            .get(Column::Shards, b"unlogged-flushed")
            .unwrap()
            .as_deref(),
        Some(&b"2"[..])
    );
    assert_eq!(
        engine.get(Column::Objects, b"unlogged-unflushed").unwrap(),
        None
    );

    // A synced write makes every earlier logged write durable, but not unlogged ones.
    put(&engine, Column::Meta, b"a", b"1");
    let mut unlogged = WriteBatch::new();
    unlogged.put(Column::Objects, b"b", b"2");
    engine.write(unlogged, Durability::Unlogged).unwrap();
    let mut synced = WriteBatch::new();
    synced.put(Column::Refs, b"c", b"3");
    engine.write(synced, Durability::Synced).unwrap();
    engine.crash(0);
    assert!(engine.get(Column::Meta, b"a").unwrap().is_some());
    assert!(engine.get(Column::Objects, b"b").unwrap().is_none());
    assert!(engine.get(Column::Refs, b"c").unwrap().is_some());
}

#[test]
fn mem_power_cut_hands_the_disk_to_the_next_boot_and_the_old_process_writes_nothing() {
    let engine = MemKv::new();
    let mut synced = WriteBatch::new();
    synced.put(Column::Refs, b"kept", b"1");
    engine.write(synced, Durability::Synced).unwrap();
    put(&engine, Column::Meta, b"unsynced", b"2");
    let next = engine.power_cut(0);
    assert_eq!(
        next.get(Column::Refs, b"kept").unwrap().as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(next.get(Column::Meta, b"unsynced").unwrap(), None);
    // The dead process's late write fails, and the next boot never sees it.
    let mut late = WriteBatch::new();
    late.put(Column::Refs, b"late", b"3");
    assert!(matches!(
        engine.write(late, Durability::Synced),
        Err(KvError::Crashed)
    ));
    assert!(matches!(
        engine.get(Column::Refs, b"kept"),
        Err(KvError::Crashed)
    ));
    assert_eq!(next.get(Column::Refs, b"late").unwrap(), None);
    put(&next, Column::Meta, b"after", b"4");
    assert!(next.get(Column::Meta, b"after").unwrap().is_some());
}

#[test]
fn mem_crash_keeps_a_prefix_of_the_unsynced_log_and_batches_stay_atomic() {
    let engine = MemKv::new();
    for index in 0..5u8 {
        let mut batch = WriteBatch::new();
        batch.put(Column::Meta, [b'x', index], [index]);
        batch.put(Column::Meta, [b'y', index], [index]);
        engine.write(batch, Durability::Logged).unwrap();
    }
    engine.crash(2);
    for index in 0..5u8 {
        let x = engine.get(Column::Meta, &[b'x', index]).unwrap();
        let y = engine.get(Column::Meta, &[b'y', index]).unwrap();
        assert_eq!(x.is_some(), index < 2);
        assert_eq!(x, y, "batch {index} is all or nothing");
    }
}

#[test]
fn mem_a_disk_that_ignores_log_syncs_keeps_only_what_was_durable_and_a_prefix_of_the_log() {
    let engine = MemKv::new();
    let mut before = WriteBatch::new();
    before.put(Column::Meta, b"before", b"1");
    engine.write(before, Durability::Synced).unwrap();
    engine.ignore_fsyncs();
    for index in 0..4u8 {
        let mut batch = WriteBatch::new();
        batch.put(Column::Shards, [b's', index], [index]);
        engine.write(batch, Durability::Synced).unwrap();
    }
    let mut unlogged = WriteBatch::new();
    unlogged.put(Column::Objects, b"o", b"x");
    engine.write(unlogged, Durability::Unlogged).unwrap();
    engine.flush(&[Column::Objects]).unwrap();
    engine.sync().unwrap();
    // What the copy's power cut shows is what the store's own leaves.
    let preview = engine.fork().power_cut(1);
    let disk = engine.power_cut(1);
    for store in [&preview, &disk] {
        assert!(store.get(Column::Meta, b"before").unwrap().is_some());
        let kept: Vec<bool> = (0..4u8)
            .map(|index| store.get(Column::Shards, &[b's', index]).unwrap().is_some())
            .collect();
        assert_eq!(kept, [true, false, false, false]);
        // A flushed column's files still land.
        assert!(store.get(Column::Objects, b"o").unwrap().is_some());
    }
    // The same drive after the restart: still no fsync.
    let mut batch = WriteBatch::new();
    batch.put(Column::Meta, b"after", b"2");
    disk.write(batch, Durability::Synced).unwrap();
    assert_eq!(disk.power_cut(0).get(Column::Meta, b"after").unwrap(), None);
}

#[test]
fn mem_flush_of_an_older_write_never_overrides_a_newer_durable_one() {
    let engine = MemKv::new();
    let mut old = WriteBatch::new();
    old.put(Column::Objects, b"k", b"old");
    engine.write(old, Durability::Unlogged).unwrap();
    let mut new = WriteBatch::new();
    new.put(Column::Objects, b"k", b"new");
    engine.write(new, Durability::Synced).unwrap();
    engine.flush(&[Column::Objects]).unwrap();
    engine.crash(0);
    assert_eq!(
        engine.get(Column::Objects, b"k").unwrap().as_deref(),
        Some(&b"new"[..])
    );
}

#[test]
fn a_view_sees_the_store_as_it_was_when_taken() {
    for_each_engine(|engine| {
        put(engine, Column::RaftState, b"a", b"1");
        put(engine, Column::RaftState, b"b", b"2");
        let mut seen = Vec::new();
        engine
            .read_view(&mut |view| {
                // Written while the view is open: invisible to it, visible to the engine.
                let mut batch = WriteBatch::new();
                batch.put(Column::RaftState, b"a", b"changed");
                batch.put(Column::RaftState, b"c", b"3");
                batch.delete(Column::RaftState, b"b");
                engine.write(batch, Durability::Logged)?;
                seen = view.scan(Column::RaftState, b"", None, usize::MAX)?;
                assert_eq!(
                    view.get(Column::RaftState, b"a")?.as_deref(),
                    Some(&b"1"[..])
                );
                assert_eq!(view.get(Column::RaftState, b"c")?, None);
                Ok(())
            })
            .unwrap();
        assert_eq!(
            seen,
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec())
            ]
        );
        assert_eq!(
            engine.get(Column::RaftState, b"a").unwrap().as_deref(),
            Some(&b"changed"[..])
        );
        // What the reader fails with is what read_view returns.
        let failed = engine.read_view(&mut |_| {
            Err(KvError::Engine {
                detail: "stop".into(),
            })
        });
        assert!(matches!(failed, Err(KvError::Engine { .. })));
    });
}

#[test]
fn a_range_delete_survives_reopen_and_leaves_its_bounds() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = RocksKv::open(dir.path(), &RocksKvOptions::default()).unwrap();
        for index in 0..10u8 {
            put(&engine, Column::RaftLog, &[index], &[index]);
        }
        let mut batch = WriteBatch::new();
        batch.delete_range(Column::RaftLog, [3u8], [7u8]);
        engine.write(batch, Durability::Synced).unwrap();
    }
    let engine = RocksKv::open(dir.path(), &RocksKvOptions::default()).unwrap();
    let keys: Vec<u8> = engine
        .scan(Column::RaftLog, b"", None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(key, _)| key[0])
        .collect();
    assert_eq!(keys, [0, 1, 2, 7, 8, 9]);
    assert_eq!(
        engine
            .last_in_range(Column::RaftLog, &[0], Some(&[7]))
            .unwrap(),
        Some((vec![2], vec![2]))
    );
}

#[test]
fn mem_a_durable_range_delete_is_not_undone_by_flushing_an_older_write() {
    let engine = MemKv::new();
    let mut old = WriteBatch::new();
    old.put(Column::Objects, b"k", b"old");
    engine.write(old, Durability::Unlogged).unwrap();
    let mut range = WriteBatch::new();
    range.delete_range(Column::Objects, b"a".to_vec(), b"z".to_vec());
    engine.write(range, Durability::Synced).unwrap();
    assert_eq!(engine.get(Column::Objects, b"k").unwrap(), None);
    engine.flush(&[Column::Objects]).unwrap();
    engine.crash(0);
    assert_eq!(engine.get(Column::Objects, b"k").unwrap(), None);

    // Unsynced, a range delete is lost in a crash with the rest of the unsynced log.
    put(&engine, Column::RaftLog, b"1", b"x");
    engine.sync().unwrap();
    let mut range = WriteBatch::new();
    range.delete_range(Column::RaftLog, b"0".to_vec(), b"9".to_vec());
    engine.write(range, Durability::Logged).unwrap();
    engine.crash(0);
    assert_eq!(
        engine.get(Column::RaftLog, b"1").unwrap().as_deref(),
        Some(&b"x"[..])
    );
    assert_eq!(engine.live_bytes(), 2);
}

#[test]
fn mem_capacity_refuses_writes_whole() {
    let engine = MemKv::with_capacity_bytes(100);
    let mut fits = WriteBatch::new();
    fits.put(Column::Meta, b"a", vec![0u8; 50]);
    engine.write(fits, Durability::Synced).unwrap();
    let mut too_big = WriteBatch::new();
    too_big.put(Column::Meta, b"b", vec![0u8; 30]);
    too_big.put(Column::Meta, b"c", vec![0u8; 30]);
    assert!(matches!(
        engine.write(too_big, Durability::Synced),
        Err(KvError::NoSpace { .. })
    ));
    assert_eq!(
        engine.get(Column::Meta, b"b").unwrap(),
        None,
        "nothing of the refused batch applied"
    );
    // Overwriting in place and deleting free space again.
    let mut delete = WriteBatch::new();
    delete.delete(Column::Meta, b"a");
    engine.write(delete, Durability::Synced).unwrap();
    assert_eq!(engine.live_bytes(), 0);
}

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u8, Vec<u8>),
    Delete(u8, u8),
    DeleteRange(u8, u8, u8),
    Scan(u8, u8),
    Last(u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            0u8..3,
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..3000)
        )
            .prop_map(|(c, k, v)| Op::Put(c, k, v)),
        (0u8..3, any::<u8>()).prop_map(|(c, k)| Op::Delete(c, k)),
        (0u8..3, any::<u8>(), any::<u8>()).prop_map(|(c, a, b)| Op::DeleteRange(c, a, b)),
        (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::Scan(a, b)),
        (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::Last(a, b)),
    ]
}

fn column(index: u8) -> Column {
    [Column::Meta, Column::Shards, Column::Objects][usize::from(index)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn engines_agree_with_a_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let rocks = RocksKv::open(dir.path(), &RocksKvOptions::default()).unwrap();
        let mem = MemKv::new();
        let mut model: BTreeMap<(u8, Vec<u8>), Vec<u8>> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Put(c, k, v) => {
                    for engine in [&rocks as &dyn KvEngine, &mem] {
                        let mut batch = WriteBatch::new();
                        batch.put(column(c), vec![k], v.clone());
                        engine.write(batch, Durability::Unlogged).unwrap();
                    }
                    model.insert((c, vec![k]), v);
                }
                Op::Delete(c, k) => {
                    for engine in [&rocks as &dyn KvEngine, &mem] {
                        let mut batch = WriteBatch::new();
                        batch.delete(column(c), vec![k]);
                        engine.write(batch, Durability::Logged).unwrap();
                    }
                    model.remove(&(c, vec![k]));
                }
                Op::DeleteRange(c, a, b) => {
                    let (start, end) = (a.min(b), a.max(b));
                    for engine in [&rocks as &dyn KvEngine, &mem] {
                        let mut batch = WriteBatch::new();
                        batch.delete_range(column(c), vec![start], vec![end]);
                        engine.write(batch, Durability::Logged).unwrap();
                    }
                    model.retain(|(column, key), _| *column != c || key[0] < start || key[0] >= end);
                }
                Op::Last(a, b) => {
                    let (start, end) = (vec![a.min(b)], vec![a.max(b)]);
                    let expected = model.range((0, start.clone())..(0, end.clone())).next_back().map(|((_, k), v)| (k.clone(), v.clone()));
                    for engine in [&rocks as &dyn KvEngine, &mem] {
                        prop_assert_eq!(engine.last_in_range(Column::Meta, &start, Some(&end)).unwrap(), expected.clone());
                        let unbounded = model.range((0, start.clone())..(1, Vec::new())).next_back().map(|((_, k), v)| (k.clone(), v.clone()));
                        prop_assert_eq!(engine.last_in_range(Column::Meta, &start, None).unwrap(), unbounded);
                    }
                }
                Op::Scan(a, b) => {
                    let (start, end) = (vec![a.min(b)], vec![a.max(b)]);
                    let expected: Vec<_> = model.range((0, start.clone())..(0, end.clone())).map(|((_, k), v)| (k.clone(), v.clone())).collect();
                    for engine in [&rocks as &dyn KvEngine, &mem] {
                        prop_assert_eq!(engine.scan(Column::Meta, &start, Some(&end), usize::MAX).unwrap(), expected.clone());
                    }
                }
            }
        }
        for ((c, key), value) in &model {
            prop_assert_eq!(rocks.get(column(*c), key).unwrap(), Some(value.clone()));
            prop_assert_eq!(mem.get(column(*c), key).unwrap(), Some(value.clone()));
        }
        for engine in [&rocks as &dyn KvEngine, &mem] {
            for c in 0..3u8 {
                let stored = engine.scan(column(c), b"", None, usize::MAX).unwrap();
                let expected: Vec<_> = model.range((c, Vec::new())..(c + 1, Vec::new())).map(|((_, k), v)| (k.clone(), v.clone())).collect();
                prop_assert_eq!(stored, expected, "nothing deleted comes back, nothing else goes");
            }
        }
    }
}
