use std::collections::BTreeSet;

use super::*;
use crate::mount::working::commit_with;
use crate::mount::{WorkTarget, commit};
use crate::test_support::{new_vault, no_passphrase};
use crate::vault::CreateVolumeOptions;

fn mounted(temp: &Path) -> MountedFs {
    mounted_on(Arc::new(new_vault(temp)), temp)
}

fn mounted_on(vault: Arc<Vault>, temp: &Path) -> MountedFs {
    vault
        .create_volume("v", &CreateVolumeOptions::default(), &no_passphrase)
        .unwrap();
    let volume = Arc::new(vault.open_volume("v", &no_passphrase).unwrap());
    let session = vault.open_write_session("mount", volume.id).unwrap();
    MountedFs::new(
        vault,
        volume,
        None,
        FsConfig {
            read_only: false,
            append_only: false,
            dna: std::collections::BTreeMap::new(),
            detector: None,
            cache_bytes: 1 << 20,
            staging_dir: temp.join("staging"),
            metrics: Default::default(),
        },
        Some(Mutex::new(WorkTarget {
            branch: "main".into(),
            base: None,
        })),
        session,
    )
    .unwrap()
}

/// A second mount of the head of `main` of `fs`'s volume, as a later `forge volume
/// mount` makes it.
fn mount_head(fs: &MountedFs, temp: &Path) -> MountedFs {
    let head = fs
        .vault()
        .refs()
        .get_ref(&fs.volume().id, "main")
        .unwrap()
        .unwrap();
    let root = Cid::from_bytes(fs.vault().read_commit(fs.volume(), &head).unwrap().root);
    MountedFs::new(
        fs.vault.clone(),
        fs.volume.clone(),
        Some(root),
        FsConfig {
            read_only: false,
            append_only: false,
            dna: std::collections::BTreeMap::new(),
            detector: None,
            cache_bytes: 1 << 20,
            staging_dir: temp.join("staging-2"),
            metrics: Default::default(),
        },
        Some(Mutex::new(WorkTarget {
            branch: "main".into(),
            base: Some(head),
        })),
        fs.vault()
            .open_write_session("mount 2", fs.volume().id)
            .unwrap(),
    )
    .unwrap()
}

fn mkdir(fs: &MountedFs, name: &str) {
    let kind = NodeKind::Directory(Directory {
        tree: None,
        children: Some(BTreeMap::new()),
        stored: None,
    });
    fs.insert(ROOT, OsStr::new(name), (0o755, 0), kind, (0, 0))
        .unwrap();
}

/// The names at the root of the branch head.
fn committed_names(fs: &MountedFs) -> BTreeSet<String> {
    head_names(fs.vault(), fs.volume())
}

/// The names at the root of the head of `main`.
fn head_names(vault: &Vault, volume: &OpenVolume) -> BTreeSet<String> {
    let head = vault.refs().get_ref(&volume.id, "main").unwrap().unwrap();
    let root = Cid::from_bytes(vault.read_commit(volume, &head).unwrap().root);
    vault
        .read_object(volume, &root)
        .unwrap()
        .into_tree()
        .unwrap()
        .entries
        .into_iter()
        .map(|entry| String::from_utf8(entry.name).unwrap())
        .collect()
}

/// A mount's commit stored directories recursing once per level on the calling (FUSE)
/// thread: a deep tree made through a mount overflowed its stack. Now the walk is
/// iterative (here on a 256 KiB stack, 2,000 levels down) and a tree past the depth
/// limit is refused saying so, with nothing committed.
#[test]
fn a_deep_tree_commits_on_a_small_stack_and_one_past_the_limit_is_refused() {
    let temp = tempfile::tempdir().unwrap();
    let mut vault = new_vault(temp.path());
    vault.set_limits(crate::vault::VaultLimits {
        tree_depth_max: 3_000,
        ..crate::vault::VaultLimits::default()
    });
    let fs = Arc::new(mounted_on(Arc::new(vault), temp.path()));
    let chain = |fs: &MountedFs, top: &str, levels: usize| {
        let mut parent = ROOT;
        for level in 0..levels {
            let name = if level == 0 { top } else { "d" };
            let kind = NodeKind::Directory(Directory {
                tree: None,
                children: Some(BTreeMap::new()),
                stored: None,
            });
            parent = fs
                .insert(parent, OsStr::new(name), (0o755, 0), kind, (0, 0))
                .unwrap()
                .0;
        }
    };
    chain(&fs, "deep", 2_000);
    let on_small_stack = |fs: Arc<MountedFs>, message: &'static str| {
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || commit(&fs, message).map(|outcome| outcome.is_some()))
            .unwrap()
            .join()
            .expect("the commit overflowed its stack")
    };
    assert!(on_small_stack(fs.clone(), "deep").unwrap());
    let vault = fs.vault();
    let volume = fs.volume();
    let head = vault.refs().get_ref(&volume.id, "main").unwrap().unwrap();
    let mut tree = Cid::from_bytes(vault.read_commit(volume, &head).unwrap().root);
    let mut levels = 0;
    while let Some(entry) = vault.read_tree(volume, &tree).unwrap().into_iter().next() {
        let EntryContent::Directory { tree: below } = entry.content else {
            panic!("{entry:?}");
        };
        tree = Cid::from_bytes(below);
        levels += 1;
    }
    assert_eq!(levels, 2_000);

    chain(&fs, "too-deep", 3_002);
    let error = on_small_stack(fs.clone(), "too deep").unwrap_err();
    assert!(matches!(error, NodeError::TooLarge { .. }), "{error}");
    assert!(
        error.to_string().contains("nested deeper than 3000"),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("/too-deep/d/d/... 2995 levels .../d/d/d"),
        "{error}"
    );
    assert_eq!(
        vault.refs().get_ref(&volume.id, "main").unwrap(),
        Some(head),
        "nothing committed"
    );
    assert!(fs.has_changes(), "the change stays in the working tree");
}

/// Hard links were refused (ENOTSUP) and an imported group was served as separate
/// files with `st_nlink` 1. Now a link made through a mount is one inode with several
/// names, committed as a link group, and a later mount serves it as one inode again
/// (all names, even one in a directory not yet opened, counted in `st_nlink`).
#[test]
fn hard_links_are_one_inode_through_commits_and_later_mounts() {
    let temp = tempfile::tempdir().unwrap();
    let fs = Arc::new(mounted(temp.path()));
    let adapter = FuseAdapter(fs.clone());
    mkdir(&fs, "a");
    mkdir(&fs, "b");
    let a = fs.child(&mut fs.lock(), ROOT, b"a").unwrap().unwrap();
    let b = fs.child(&mut fs.lock(), ROOT, b"b").unwrap().unwrap();
    let kind = NodeKind::Directory(Directory {
        tree: None,
        children: Some(BTreeMap::new()),
        stored: None,
    });
    let deep = fs
        .insert(b, OsStr::new("deep"), (0o755, 0), kind, (0, 0))
        .unwrap()
        .0;
    let kind = NodeKind::File(file_node(BaseContent::inline(b"shared bytes".to_vec())));
    let file = fs
        .insert(a, OsStr::new("x"), (0o644, 0), kind, (0, 0))
        .unwrap()
        .0;
    let (linked, attr) = fs.link(file, deep, OsStr::new("y")).unwrap();
    assert_eq!((linked, attr.nlink), (file, 2));
    assert_eq!(fs.link(a, b, OsStr::new("dir")).unwrap_err(), Errno::EPERM);
    assert_eq!(
        fs.link(file, a, OsStr::new("x")).unwrap_err(),
        Errno::EEXIST
    );
    commit(&fs, "linked").unwrap().unwrap();

    // A second mount of the committed tree: only `a` is opened, yet x knows of y.
    let again = Arc::new(mount_head(&fs, temp.path()));
    let lookup = |fs: &MountedFs, path: &[&str]| {
        let mut inodes = fs.lock();
        let mut ino = ROOT;
        for name in path {
            ino = fs
                .child(&mut inodes, ino, name.as_bytes())
                .unwrap()
                .unwrap();
        }
        let attr = fs.attr(ino, inodes.nodes.get(&ino).unwrap());
        (ino, attr.nlink)
    };
    let (x, x_links) = lookup(&again, &["a", "x"]);
    assert_eq!(
        x_links, 2,
        "the name in b/deep is counted before b is opened"
    );
    let (y, y_links) = lookup(&again, &["b", "deep", "y"]);
    assert_eq!((y, y_links), (x, 2), "one inode");
    let again_adapter = FuseAdapter(again.clone());
    again
        .change_content(x, |staged, state, size| {
            staged
                .file
                .write_all_at(b"SHARED", 0)
                .map_err(Errno::from)?;
            state.dirty.insert(0, 6);
            *size = (*size).max(6);
            Ok(())
        })
        .unwrap();
    assert_eq!(again_adapter.do_read(y, 0, 100).unwrap(), b"SHARED bytes");
    commit(&again, "changed through one name").unwrap().unwrap();
    drop(adapter);

    // Both names hold the new bytes, in one group; after an unlink the other name is
    // a plain file again.
    let read_entry = |fs: &MountedFs, path: &[&str]| {
        let head = fs
            .vault()
            .refs()
            .get_ref(&fs.volume().id, "main")
            .unwrap()
            .unwrap();
        let mut tree = Cid::from_bytes(fs.vault().read_commit(fs.volume(), &head).unwrap().root);
        let (last, directories) = path.split_last().unwrap();
        for name in directories {
            let entry = fs
                .vault()
                .read_tree(fs.volume(), &tree)
                .unwrap()
                .into_iter()
                .find(|entry| entry.name == name.as_bytes())
                .unwrap();
            let EntryContent::Directory { tree: below } = entry.content else {
                panic!("{entry:?}");
            };
            tree = Cid::from_bytes(below);
        }
        fs.vault()
            .read_tree(fs.volume(), &tree)
            .unwrap()
            .into_iter()
            .find(|entry| entry.name == last.as_bytes())
            .unwrap()
    };
    let (first, second) = (
        read_entry(&again, &["a", "x"]),
        read_entry(&again, &["b", "deep", "y"]),
    );
    assert_eq!(
        first.content,
        EntryContent::InlineData(b"SHARED bytes".to_vec())
    );
    assert_eq!(first.content, second.content);
    assert!(first.meta.link_group.is_some());
    assert_eq!(first.meta.link_group, second.meta.link_group);
    again_adapter.remove(a, OsStr::new("x"), false).unwrap();
    assert_eq!(lookup(&again, &["b", "deep", "y"]).1, 1);
    commit(&again, "one name left").unwrap().unwrap();
    assert_eq!(
        read_entry(&again, &["b", "deep", "y"]).meta.link_group,
        None
    );
}

/// Before `forget`, every inode a mount ever made or loaded stayed in its table for as
/// long as it ran (a long mount that creates and deletes millions of files grew without
/// bound). Now an unlinked, closed, forgotten file leaves at once, and an unchanged
/// directory's entries leave once none is referenced, to be reloaded from its tree.
#[test]
fn forgotten_inodes_leave_the_table() {
    let temp = tempfile::tempdir().unwrap();
    let fs = Arc::new(mounted(temp.path()));
    let adapter = FuseAdapter(fs.clone());
    mkdir(&fs, "d");
    let directory = fs.child(&mut fs.lock(), ROOT, b"d").unwrap().unwrap();
    for index in 0..200 {
        let kind = NodeKind::File(file_node(BaseContent::inline(
            format!("content {index}").into_bytes(),
        )));
        fs.insert(
            directory,
            OsStr::new(&format!("f{index}")),
            (0o644, 0),
            kind,
            (0, 0),
        )
        .unwrap();
    }
    commit(&fs, "two hundred files").unwrap().unwrap();
    assert_eq!(fs.inode_count(), 202);

    // The kernel looks every file up, reads some, and forgets them all.
    let mut looked_up = Vec::new();
    for index in 0..200 {
        let ino = fs
            .child(&mut fs.lock(), directory, format!("f{index}").as_bytes())
            .unwrap()
            .unwrap();
        fs.remember(ino);
        looked_up.push(ino);
    }
    assert_eq!(adapter.do_read(looked_up[7], 0, 100).unwrap(), b"content 7");
    for ino in &looked_up[..199] {
        fs.forget(*ino, 1);
    }
    assert_eq!(fs.inode_count(), 202, "one entry still referenced");
    fs.forget(looked_up[199], 1);
    assert_eq!(fs.inode_count(), 2, "the root and the directory remain");
    // Loaded again from the tree when next needed.
    let again = fs
        .child(&mut fs.lock(), directory, b"f123")
        .unwrap()
        .unwrap();
    assert_eq!(adapter.do_read(again, 0, 100).unwrap(), b"content 123");

    // Create and delete, many times: the table does not grow.
    let before = fs.inode_count();
    for round in 0..1_000 {
        let name = format!("scratch-{round}");
        let kind = NodeKind::File(file_node(BaseContent::default()));
        let (ino, _) = fs
            .insert(ROOT, OsStr::new(&name), (0o644, 0), kind, (0, 0))
            .unwrap();
        fs.remember(ino);
        adapter.remove(ROOT, OsStr::new(&name), false).unwrap();
        fs.forget(ino, 1);
    }
    assert_eq!(fs.inode_count(), before);
}

/// Before, loading a directory made an inode for every entry (with its manifest read
/// and its bytes held): a read-only mount listing 300,000 entries peaked at 406 MB,
/// ~1.35 KB per entry. Now a listing numbers the entries and an inode is made from its
/// stored entry at first lookup; a commit stores the untouched entries as they were.
#[test]
fn a_listed_directory_makes_inodes_only_for_entries_looked_up() {
    let temp = tempfile::tempdir().unwrap();
    let fs = Arc::new(mounted(temp.path()));
    let adapter = FuseAdapter(fs.clone());
    mkdir(&fs, "d");
    let directory = fs.child(&mut fs.lock(), ROOT, b"d").unwrap().unwrap();
    for index in 0..2_000 {
        let kind = NodeKind::File(file_node(BaseContent::inline(
            format!("content {index}").into_bytes(),
        )));
        fs.insert(
            directory,
            OsStr::new(&format!("f{index:04}")),
            (0o644, 0),
            kind,
            (0, 0),
        )
        .unwrap();
    }
    mkdir(&fs, "e");
    commit(&fs, "two thousand files").unwrap().unwrap();
    let again = Arc::new(mount_head(&fs, temp.path()));
    let adapter_again = FuseAdapter(again.clone());
    let directory = again.child(&mut again.lock(), ROOT, b"d").unwrap().unwrap();
    again.ensure_loaded(&mut again.lock(), directory).unwrap();
    // The root and `d`: no inode for `e` nor for any of the 2,000 listed files.
    assert_eq!(again.inode_count(), 2);
    // A listing names each entry with the inode a lookup then gives it.
    let listed: BTreeMap<Vec<u8>, u64> = children(&again.lock(), directory).unwrap().clone();
    assert_eq!(listed.len(), 2_000);
    let ino = again
        .child(&mut again.lock(), directory, b"f1234")
        .unwrap()
        .unwrap();
    assert_eq!(ino, listed[b"f1234".as_slice()]);
    assert_eq!(adapter_again.do_read(ino, 0, 100).unwrap(), b"content 1234");
    assert_eq!(again.inode_count(), 3);
    // Change one entry and move another out: the commit keeps all the others as
    // they were.
    adapter_again
        .do_rename(
            directory,
            OsStr::new("f0007"),
            ROOT,
            OsStr::new("moved"),
            RenameFlags::empty(),
        )
        .unwrap();
    adapter_again
        .remove(directory, OsStr::new("f0008"), false)
        .unwrap();
    commit(&again, "one moved, one removed").unwrap().unwrap();
    assert!(again.inode_count() < 10, "{}", again.inode_count());
    let out = temp.path().join("out");
    fs.vault()
        .export(
            "v",
            &out,
            &crate::vault::export::SnapshotSelector::Branch("main".into()),
            &crate::vault::ExportOptions::default(),
            &no_passphrase,
            &crate::progress::Progress::new("test", false),
        )
        .unwrap();
    assert_eq!(std::fs::read_dir(out.join("d")).unwrap().count(), 1_998);
    assert_eq!(std::fs::read(out.join("d/f1999")).unwrap(), b"content 1999");
    assert_eq!(std::fs::read(out.join("moved")).unwrap(), b"content 7");
    assert!(!out.join("d/f0008").exists());
    assert!(out.join("e").is_dir());
    drop(adapter);
}

#[test]
fn failures_keep_their_errno() {
    let io = |code| NodeError::Io {
        action: "writing",
        path: "staging".into(),
        source: std::io::Error::from_raw_os_error(code),
    };
    assert_eq!(errno_of(&io(libc::ENOSPC)), Errno::ENOSPC);
    assert_eq!(errno_of(&io(libc::EMFILE)), Errno::EMFILE);
    assert_eq!(errno_of(&io(libc::EDQUOT)), Errno::EDQUOT);
    let kind_only = NodeError::Io {
        action: "writing",
        path: "staging".into(),
        source: std::io::ErrorKind::StorageFull.into(),
    };
    assert_eq!(errno_of(&kind_only), Errno::ENOSPC);
    let full = NodeError::Kv(forge_store::KvError::NoSpace { path: "db".into() });
    assert_eq!(errno_of(&full), Errno::ENOSPC);
    assert_eq!(
        errno_of(&NodeError::Integrity(
            crate::IntegrityFault::MissingObject {
                cid: Cid::from_bytes([0; 32])
            }
        )),
        Errno::EIO
    );
}

#[test]
fn a_change_made_while_a_commit_builds_its_root_stays_uncommitted() {
    let temp = tempfile::tempdir().unwrap();
    let fs = mounted(temp.path());
    mkdir(&fs, "before");
    // The mkdir lands after the commit captured its tree, as a FUSE request running
    // beside `forge snapshot create` does.
    let outcome = commit_with(
        &fs,
        "first",
        &std::collections::BTreeMap::new(),
        &mut || mkdir(&fs, "during"),
    )
    .unwrap();
    assert!(outcome.is_some());
    assert_eq!(committed_names(&fs), BTreeSet::from(["before".to_owned()]));
    assert!(
        fs.has_changes(),
        "the mkdir made during the commit was marked committed"
    );
    commit(&fs, "second")
        .unwrap()
        .expect("the mkdir is committed next");
    assert_eq!(
        committed_names(&fs),
        BTreeSet::from(["before".to_owned(), "during".to_owned()])
    );
    assert!(!fs.has_changes());
    assert!(commit(&fs, "third").unwrap().is_none(), "nothing left");
}

/// Power cuts during a mount's commit and fsync (MemKv's crash model): after
/// reopening, the store is consistent, and the branch holds at least every commit
/// acknowledged before the cut.
#[test]
fn a_power_cut_during_a_mount_commit_loses_nothing_acknowledged() {
    use forge_store::kv::MemKv;
    let temp = tempfile::tempdir().unwrap();
    let mut died = 0;
    for seed in 0..30u64 {
        let kv = Arc::new(MemKv::new());
        let vault = Arc::new(crate::test_support::vault_on(temp.path(), kv.clone(), seed));
        let fs = mounted_on(vault.clone(), &temp.path().join(format!("m{seed}")));
        mkdir(&fs, "acknowledged");
        commit(&fs, "first").unwrap().unwrap();
        mkdir(&fs, "fsynced");
        kv.die_after_writes(usize::try_from(seed / 2 % 15).unwrap());
        let fsynced = crate::mount::persist_working(&fs).is_ok();
        mkdir(&fs, "late");
        let committed = fsynced && commit(&fs, "second").is_ok();
        if !committed {
            assert!(kv.died(), "seed {seed}: failed without dying");
            died += 1;
        }
        drop(fs);
        drop(vault);
        kv.crash(usize::try_from(seed % 3).unwrap());
        let vault = crate::test_support::vault_on(temp.path(), kv.clone(), seed + 100);
        let report = vault
            .fsck(Some(&no_passphrase), &Progress::new("test", false))
            .unwrap();
        assert!(
            report.problems.is_empty(),
            "seed {seed}: {:?}",
            report.problems
        );
        let volume = vault.open_volume("v", &no_passphrase).unwrap();
        let names = head_names(&vault, &volume);
        assert!(names.contains("acknowledged"), "seed {seed}: {names:?}");
        // What fsync acknowledged comes back at the next mount: the recorded working
        // tree reads whole.
        match crate::mount::working::working_state(&vault, &volume, "main").unwrap() {
            Some(state) => {
                // Never behind the head: the commit that moved the branch forgot it in the
                // same update (else the next unmount commits it again, beside the head).
                let head = vault.refs().get_ref(&volume.id, "main").unwrap();
                assert_eq!(
                    state.base,
                    head.map(|head| *head.as_bytes()),
                    "seed {seed}: a working state behind the head"
                );
                let root = Cid::from_bytes(state.root);
                vault
                    .walk_tree(&volume, root, &mut BTreeSet::new(), &mut |_, chunk| {
                        vault.read_chunk_plaintext(chunk).map(|_| ())
                    })
                    .unwrap_or_else(|error| panic!("seed {seed}: working state: {error}"));
                let names = vault
                    .read_object(&volume, &root)
                    .unwrap()
                    .into_tree()
                    .unwrap();
                assert!(
                    names.entries.iter().any(|entry| entry.name == b"fsynced"),
                    "seed {seed}"
                );
            }
            None => assert!(
                !fsynced || committed,
                "seed {seed}: the fsynced state is gone"
            ),
        }
        if committed {
            assert!(
                names.contains("late") && names.contains("fsynced"),
                "seed {seed}"
            );
        }
    }
    assert!(
        died > 5 && died < 30,
        "{died} of 30 cuts fell inside the work (none or all: move the cut points)"
    );
}

/// An unmount whose commit fails (a full disk, here a dead engine) says what the next
/// mount starts from, and the working state of the last fsync is really there.
#[test]
fn an_unmount_whose_commit_fails_keeps_the_working_state_and_says_so() {
    use forge_store::kv::MemKv;
    let temp = tempfile::tempdir().unwrap();
    let kv = Arc::new(MemKv::new());
    let vault = Arc::new(crate::test_support::vault_on(temp.path(), kv.clone(), 3));
    let fs = mounted_on(vault.clone(), &temp.path().join("m"));
    mkdir(&fs, "fsynced");
    crate::mount::persist_working(&fs).unwrap();
    mkdir(&fs, "late");
    kv.die_after_writes(0);
    let summary = crate::mount::working::unmount_commit(&fs, Path::new("/mnt/point")).unwrap_err();
    assert!(summary.contains("the commit failed"), "{summary}");
    assert!(summary.contains("mount branch main again"), "{summary}");
    assert!(summary.contains("Nothing is lost"), "{summary}");
    drop(fs);
    drop(vault);
    kv.crash(0);
    let vault = crate::test_support::vault_on(temp.path(), kv.clone(), 4);
    let volume = vault.open_volume("v", &no_passphrase).unwrap();
    let state = crate::mount::working::working_state(&vault, &volume, "main")
        .unwrap()
        .expect("the working state is kept");
    let names: Vec<Vec<u8>> = vault
        .read_tree(&volume, &Cid::from_bytes(state.root))
        .unwrap()
        .into_iter()
        .map(|entry| entry.name)
        .collect();
    assert!(names.contains(&b"fsynced".to_vec()), "{names:?}");
}

#[test]
fn concurrent_commits_never_move_the_branch_to_an_older_root() {
    let temp = tempfile::tempdir().unwrap();
    let fs = Arc::new(mounted(temp.path()));
    std::thread::scope(|scope| {
        let writer = {
            let fs = fs.clone();
            scope.spawn(move || {
                for index in 0..300 {
                    mkdir(&fs, &format!("d{index:03}"));
                }
            })
        };
        for _ in 0..2 {
            let fs = fs.clone();
            scope.spawn(move || {
                for _ in 0..20 {
                    commit(&fs, "loop").unwrap();
                }
            });
        }
        writer.join().unwrap();
    });
    commit(&fs, "last").unwrap();
    let names = committed_names(&fs);
    assert_eq!(names.len(), 300, "lost {} directories", 300 - names.len());
    // Every snapshot's parent is the one before it: the branch only moved forward.
    let vault = fs.vault();
    let volume = fs.volume();
    let mut snapshot = vault.refs().get_ref(&volume.id, "main").unwrap();
    let mut previous_count = usize::MAX;
    while let Some(cid) = snapshot {
        let commit = vault.read_commit(volume, &cid).unwrap();
        let root = Cid::from_bytes(commit.root);
        let entries = vault
            .read_object(volume, &root)
            .unwrap()
            .into_tree()
            .unwrap()
            .entries
            .len();
        assert!(
            entries <= previous_count,
            "a later snapshot has fewer entries"
        );
        previous_count = entries;
        snapshot = commit
            .parents
            .first()
            .map(|parent| Cid::from_bytes(*parent));
    }
}

/// A mount killed after its commit was published but before it removed its working state
/// (the record then names the committed tree, on the old base): the next mount of the
/// branch mounts the head and drops the record, instead of recovering it and committing
/// the same tree to `main-conflict-...` at its unmount (found in stop 23's kill tests).
#[test]
fn a_working_state_already_committed_is_not_recovered_again() {
    let temp = tempfile::tempdir().unwrap();
    let fs = mounted(temp.path());
    mkdir(&fs, "kept");
    crate::mount::persist_working(&fs).unwrap();
    let (vault, volume) = (fs.vault(), fs.volume());
    let stale = crate::mount::working::working_state(vault, volume, "main")
        .unwrap()
        .expect("fsync recorded the working state");
    let committed = commit(&fs, "unmount").unwrap().expect("a change to commit");
    assert!(!committed.conflict);
    // The kill: the record the commit removed is back, as if it never was removed.
    vault
        .refs()
        .apply(&[forge_store::metadata::RecordUpdate::new(
            forge_store::metadata::RecordSpace::WORKING,
            [volume.id.as_bytes().as_slice(), b"main"].concat(),
            forge_store::metadata::Expected::Any,
            forge_store::metadata::Change::Put(crate::vault::records::encode(&stale)),
        )])
        .unwrap();
    let head = vault.refs().get_ref(&volume.id, "main").unwrap().unwrap();
    assert_eq!(head, committed.snapshot);
    let head_root = Cid::from_bytes(vault.read_commit(volume, &head).unwrap().root);
    assert_eq!(
        head_root.as_bytes(),
        &stale.root,
        "the record names the committed tree"
    );
    let recovered =
        crate::mount::working::recoverable_working_state(vault, volume, "main", Some(head_root))
            .unwrap();
    assert!(
        recovered.is_none(),
        "an already committed state is not recovered"
    );
    assert!(
        crate::mount::working::working_state(vault, volume, "main")
            .unwrap()
            .is_none(),
        "and its record is gone"
    );
    // A state with something new on top of the head is still recovered.
    mkdir(&fs, "after the commit");
    crate::mount::persist_working(&fs).unwrap();
    assert!(
        crate::mount::working::recoverable_working_state(vault, volume, "main", Some(head_root))
            .unwrap()
            .is_some()
    );
}
