//! End-to-end tests of volumes through the real `forge` binary: round trips that keep every
//! kind of entry and its metadata, dedup across imports, repair from parity, refusal to
//! return damaged data, encrypted volumes, skipped entries, and concurrent imports.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use serde_json::Value;

mod common;
use common::Vault;

fn pseudo_random(len: usize, seed: u8) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    blake3::Hasher::new()
        .update(&[seed])
        .finalize_xof()
        .fill(&mut bytes);
    bytes
}

/// A source tree with every kind of entry the issue lists.
fn make_source(root: &Path) {
    fs::create_dir_all(root.join("dir/nested")).unwrap();
    fs::create_dir_all(root.join("empty dir")).unwrap();
    fs::write(root.join("small.txt"), b"hello forge\n").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("dir/nested/big.bin"), pseudo_random(3 << 20, 1)).unwrap();
    fs::write(root.join("dir/text.py"), "print('x')\n".repeat(20_000)).unwrap();
    fs::write(root.join("name with spaces\nand a newline"), b"odd").unwrap();
    fs::write(
        root.join(OsStr::from_bytes(b"latin1-\xe9t\xe9")),
        b"not utf-8",
    )
    .unwrap();
    std::os::unix::fs::symlink("small.txt", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    fs::set_permissions(root.join("small.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(root.join("dir/text.py"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(root.join("dir/nested"), fs::Permissions::from_mode(0o750)).unwrap();
    let old = filetime::FileTime::from_unix_time(1_000_000_000, 123_456_789);
    filetime::set_file_mtime(root.join("small.txt"), old).unwrap();
    filetime::set_file_mtime(root.join("dir/nested"), old).unwrap();
    filetime::set_symlink_file_times(root.join("link"), old, old).unwrap();
}

/// `directories` directories of 16 files of `file_bytes` pseudo-random bytes each (every
/// file different) under `root`.
fn random_tree(root: &Path, directories: u8, file_bytes: usize) {
    for directory in 0..directories {
        let path = root.join(format!("d{directory}"));
        fs::create_dir_all(&path).unwrap();
        for file in 0u8..16 {
            fs::write(
                path.join(format!("f{file}")),
                pseudo_random(file_bytes, directory * 16 + file),
            )
            .unwrap();
        }
    }
}

/// Asserts two trees are equal: kinds, contents, link targets, permission bits, mtimes.
fn assert_same_tree(expected: &Path, actual: &Path) {
    let mut names: Vec<_> = fs::read_dir(expected)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    let mut actual_names: Vec<_> = fs::read_dir(actual)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    names.sort();
    actual_names.sort();
    assert_eq!(names, actual_names, "entries of {}", actual.display());
    for name in names {
        let (left, right) = (expected.join(&name), actual.join(&name));
        let (left_meta, right_meta) = (
            fs::symlink_metadata(&left).unwrap(),
            fs::symlink_metadata(&right).unwrap(),
        );
        assert_eq!(
            left_meta.file_type(),
            right_meta.file_type(),
            "{}",
            right.display()
        );
        assert_eq!(
            left_meta.mode() & 0o7777,
            right_meta.mode() & 0o7777,
            "mode of {}",
            right.display()
        );
        assert_eq!(
            (left_meta.mtime(), left_meta.mtime_nsec()),
            (right_meta.mtime(), right_meta.mtime_nsec()),
            "mtime of {}",
            right.display()
        );
        if left_meta.is_dir() {
            assert_same_tree(&left, &right);
        } else if left_meta.file_type().is_symlink() {
            assert_eq!(
                fs::read_link(&left).unwrap(),
                fs::read_link(&right).unwrap()
            );
        } else {
            assert!(
                fs::read(&left).unwrap() == fs::read(&right).unwrap(),
                "content of {}",
                right.display()
            );
        }
    }
}

#[test]
fn import_export_round_trip_keeps_everything_and_dedups_the_second_time() {
    let vault = Vault::new();
    let source = vault.path("source");
    make_source(&source);
    vault.ok(&["volume", "create", "docs"]);
    let first = vault.json(&[
        "volume",
        "import",
        "docs",
        source.to_str().unwrap(),
        "-m",
        "first",
    ]);
    assert_eq!(first["files"], 6);
    assert!(
        first["new_chunks"].as_u64().unwrap() >= 12,
        "3 MiB of random data is at least 12 chunks of at most 256 KiB: {first}"
    );
    assert!(first["skipped"].as_array().unwrap().is_empty());

    let second = vault.json(&[
        "volume",
        "import",
        "docs",
        source.to_str().unwrap(),
        "-m",
        "second",
    ]);
    assert_eq!(
        second["new_chunks"], 0,
        "an unchanged tree stores no new chunk: {second}"
    );
    assert_ne!(first["snapshot"], second["snapshot"]);

    let out = vault.path("out");
    vault.ok(&["volume", "export", "docs", out.to_str().unwrap()]);
    assert_same_tree(&source, &out);
    let older = vault.path("older");
    let first_id = first["snapshot"].as_str().unwrap();
    vault.ok(&[
        "volume",
        "export",
        "docs",
        older.to_str().unwrap(),
        "--snapshot",
        &first_id[..10],
    ]);
    assert_same_tree(&source, &older);

    let snapshots = vault.json(&["snapshot", "list", "docs"]);
    let snapshots = snapshots.as_array().unwrap();
    assert_eq!(snapshots.len(), 2);
    assert_eq!(snapshots[0]["id"], first["snapshot"]);
    assert_eq!(
        snapshots[1]["parents"][0], first["snapshot"],
        "linear history"
    );
    assert_eq!(snapshots[1]["branches"][0], "main");
    assert_eq!(snapshots[0]["message"], "first");

    let stats = vault.json(&["volume", "stats", "docs"]);
    assert_eq!(stats["snapshots"], 2);
    let logical = stats["logical_bytes"].as_u64().unwrap();
    assert_eq!(logical, 2 * first["logical_bytes"].as_u64().unwrap());
    assert!(
        (stats["dedup_ratio"].as_f64().unwrap() - 2.0).abs() < 0.01,
        "{stats}"
    );
    assert!(
        stats["stored_bytes"].as_u64().unwrap() < logical / 2 + 100_000,
        "{stats}"
    );
    assert!(
        stats["compression_ratio"].as_f64().unwrap() > 1.0,
        "the text file compresses: {stats}"
    );
    assert!(vault.json(&["stats"])["physical_bytes"].as_u64().unwrap() > 0);
    let fsck = vault.json(&["fsck"]);
    assert!(fsck["problems"].as_array().unwrap().is_empty(), "{fsck}");
    assert_eq!(fsck["snapshots_checked"], 2);
}

#[test]
fn erasure_coded_volume_repairs_a_damaged_shard_and_plain_volume_refuses_wrong_bytes() {
    let vault = Vault::new();
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("data.bin"), pseudo_random(200_000, 9)).unwrap();
    vault.ok(&["volume", "create", "parity", "--ec", "2+1"]);
    vault.ok(&["volume", "create", "plain", "--domain", "other"]);
    vault.ok(&["volume", "import", "parity", source.to_str().unwrap()]);
    vault.ok(&["volume", "import", "plain", source.to_str().unwrap()]);

    // Flip a byte in shard 0 of every chunk, as bit rot on disk would.
    {
        use forge_store::kv::{Column, Durability, KvEngine, RocksKv, RocksKvOptions, WriteBatch};
        let kv = RocksKv::open(&vault.data_dir().join("db"), &RocksKvOptions::default()).unwrap();
        let mut batch = WriteBatch::new();
        for (key, mut value) in kv.scan(Column::Shards, b"", None, usize::MAX).unwrap() {
            if key[32..] == [0, 0] {
                let last = value.len() - 1;
                value[last] ^= 0x01;
                batch.put(Column::Shards, key, value);
            }
        }
        kv.write(batch, Durability::Synced).unwrap();
    }
    let fsck = vault.run(&["fsck", "--verbose"]);
    assert_eq!(fsck.status.code(), Some(3), "fsck finds the damage");
    assert!(
        String::from_utf8_lossy(&fsck.stdout).contains("damaged shard"),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let repaired = vault.path("repaired");
    vault.ok(&["volume", "export", "parity", repaired.to_str().unwrap()]);
    assert_eq!(
        fs::read(repaired.join("data.bin")).unwrap(),
        fs::read(source.join("data.bin")).unwrap()
    );

    let refused = vault.run(&[
        "volume",
        "export",
        "plain",
        vault.path("refused").to_str().unwrap(),
    ]);
    assert_eq!(
        refused.status.code(),
        Some(3),
        "integrity failure exit code"
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("chunk ") && stderr.contains("unreadable"),
        "names the chunk: {stderr}"
    );
    let partial = vault.path("refused/data.bin");
    assert!(
        !partial.exists() || fs::read(&partial).unwrap().len() < 200_000,
        "never the wrong bytes in full"
    );

    // Scrub rebuilds what parity can, and names what it cannot.
    let scrub = vault.run(&["scrub", "--repair", "--json"]);
    assert_eq!(
        scrub.status.code(),
        Some(3),
        "the plain volume's chunks are unrecoverable"
    );
    assert!(String::from_utf8_lossy(&scrub.stderr).contains("unreadable"));
    assert_eq!(
        vault.run(&["scrub"]).status.code(),
        Some(3),
        "still unrecoverable: nothing to rebuild from"
    );
    let parity_export = vault.path("after-repair");
    vault.ok(&[
        "volume",
        "export",
        "parity",
        parity_export.to_str().unwrap(),
    ]);
}

#[test]
fn scrub_repairs_and_fsck_is_clean_afterwards() {
    let vault = Vault::new();
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("data.bin"), pseudo_random(300_000, 4)).unwrap();
    vault.ok(&["volume", "create", "v", "--ec", "3+2"]);
    vault.ok(&["volume", "import", "v", source.to_str().unwrap()]);
    assert!(
        vault.json(&["fsck"])["problems"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let damaged = {
        use forge_store::kv::{Column, Durability, KvEngine, RocksKv, RocksKvOptions, WriteBatch};
        let kv = RocksKv::open(&vault.data_dir().join("db"), &RocksKvOptions::default()).unwrap();
        let mut batch = WriteBatch::new();
        let mut damaged = 0;
        for (key, mut value) in kv.scan(Column::Shards, b"", None, usize::MAX).unwrap() {
            if key[32..] == [0, 1] || key[32..] == [0, 4] {
                value[50] ^= 0xff;
                batch.put(Column::Shards, key, value);
                damaged += 1;
            }
        }
        kv.write(batch, Durability::Synced).unwrap();
        damaged
    };
    assert_eq!(vault.run(&["fsck"]).status.code(), Some(3));
    let scrub = vault.json(&["scrub", "--repair"]);
    assert_eq!(scrub["damaged_shards"], damaged);
    assert_eq!(scrub["repaired_shards"], damaged);
    assert_eq!(vault.json(&["scrub"])["damaged_shards"], 0);
    let fsck = vault.json(&["fsck"]);
    assert!(fsck["problems"].as_array().unwrap().is_empty(), "{fsck}");
    assert!(fsck["chunks_checked"].as_u64().unwrap() >= 2);
    assert_eq!(fsck["snapshots_checked"], 1);
}

#[test]
fn clear_errors_for_unknown_names_and_bad_arguments() {
    let vault = Vault::new();
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    let unknown = vault.run(&["volume", "import", "nope", source.to_str().unwrap()]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no volume named \"nope\""));
    vault.ok(&["volume", "create", "v"]);
    assert_eq!(
        vault.run(&["volume", "create", "v"]).status.code(),
        Some(4),
        "exists: conflict"
    );
    assert_eq!(
        vault.run(&["volume", "create", "bad/name"]).status.code(),
        Some(1)
    );
    assert_eq!(
        vault
            .run(&["volume", "create", "w", "--ec", "0+1"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        vault
            .run(&["volume", "create", "w", "--ec", "200+57"])
            .status
            .code(),
        Some(2)
    );
    let missing_snapshot = vault.run(&[
        "volume",
        "export",
        "v",
        vault.path("x").to_str().unwrap(),
        "--snapshot",
        "deadbeefdeadbeef",
    ]);
    assert!(String::from_utf8_lossy(&missing_snapshot.stderr).contains("no snapshot"));
    let missing_branch = vault.run(&[
        "volume",
        "export",
        "v",
        vault.path("y").to_str().unwrap(),
        "--branch",
        "dev",
    ]);
    assert!(String::from_utf8_lossy(&missing_branch.stderr).contains("no branch \"dev\""));
    vault.ok(&["volume", "import", "v", source.to_str().unwrap()]);
    let occupied = vault.path("occupied");
    fs::create_dir_all(&occupied).unwrap();
    fs::write(occupied.join("keep.txt"), b"mine").unwrap();
    let refused = vault.run(&["volume", "export", "v", occupied.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not empty"));
    assert_eq!(fs::read(occupied.join("keep.txt")).unwrap(), b"mine");
}

#[test]
fn encrypted_volume_needs_its_passphrase() {
    let vault = Vault::new();
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("secret.txt"), b"for my eyes only").unwrap();
    let created = vault
        .command(&["volume", "create", "private", "--encrypted", "--json"])
        .env("FORGE_PASSPHRASE", "right")
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let record: Value = serde_json::from_slice(&created.stdout).unwrap();
    assert_eq!(record["encrypted"], true);
    assert!(
        record["domain"].as_str().unwrap().starts_with("private-"),
        "a domain of its own"
    );

    let without = vault.run(&["volume", "import", "private", source.to_str().unwrap()]);
    assert_eq!(
        without.status.code(),
        Some(1),
        "no passphrase, no terminal: a clear error"
    );
    let wrong = vault
        .command(&["volume", "import", "private", source.to_str().unwrap()])
        .env("FORGE_PASSPHRASE", "wrong")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("wrong passphrase"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    vault
        .command(&["volume", "import", "private", source.to_str().unwrap()])
        .env("FORGE_PASSPHRASE", "right")
        .assert()
        .success();
    let out = vault.path("out");
    vault
        .command(&["volume", "export", "private", out.to_str().unwrap()])
        .env("FORGE_PASSPHRASE", "right")
        .assert()
        .success();
    assert_eq!(
        fs::read(out.join("secret.txt")).unwrap(),
        b"for my eyes only"
    );
}

/// Sockets and FIFOs were skipped (reported) before the POSIX issue: now they are
/// entries of the volume, restored as what they were.
#[test]
fn sockets_and_fifos_are_stored_and_restored() {
    use std::os::unix::fs::FileTypeExt;
    let vault = Vault::new();
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("file"), b"kept").unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(source.join("control.sock")).unwrap();
    nix::unistd::mkfifo(
        &source.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    // mkfifo applies the umask: set the mode the assertion below expects.
    fs::set_permissions(source.join("pipe"), fs::Permissions::from_mode(0o640)).unwrap();
    vault.ok(&["volume", "create", "v"]);
    let output = vault.run(&["volume", "import", "v", source.to_str().unwrap(), "--json"]);
    assert!(output.status.success());
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["skipped"].as_array().unwrap().len(), 0, "{report}");
    assert_eq!(report["files"], 1);
    let out = vault.path("out");
    vault.ok(&["volume", "export", "v", out.to_str().unwrap()]);
    let socket = fs::symlink_metadata(out.join("control.sock")).unwrap();
    assert!(socket.file_type().is_socket());
    let pipe = fs::symlink_metadata(out.join("pipe")).unwrap();
    assert!(pipe.file_type().is_fifo());
    assert_eq!(pipe.permissions().mode() & 0o7777, 0o640);
    assert_eq!(fs::read(out.join("file")).unwrap(), b"kept");
}

#[test]
fn two_imports_started_together_give_a_linear_history() {
    let vault = Vault::new();
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("data.bin"), pseudo_random(5 << 20, 3)).unwrap();
    vault.ok(&["volume", "create", "v"]);
    let spawn = || {
        std::process::Command::new(assert_cmd::cargo::cargo_bin("forge"))
            .env("FORGE_DATA_DIR", vault.data_dir())
            .args(["volume", "import", "v", source.to_str().unwrap(), "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (spawn(), spawn());
    let (first, second) = (
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    );
    assert!(
        first.status.success() && second.status.success(),
        "{} / {}",
        String::from_utf8_lossy(&first.stderr),
        String::from_utf8_lossy(&second.stderr)
    );
    let snapshots = vault.json(&["snapshot", "list", "v"]);
    let snapshots = snapshots.as_array().unwrap();
    assert_eq!(snapshots.len(), 2);
    assert_eq!(
        snapshots[1]["parents"][0], snapshots[0]["id"],
        "the second builds on the first"
    );
    assert!(snapshots[0]["parents"].as_array().unwrap().is_empty());
}

#[test]
fn diff_branch_restore_delete_and_gc_that_really_frees_space() {
    let vault = Vault::new();
    let (one, two) = (vault.path("one"), vault.path("two"));
    for dir in [&one, &two] {
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("same.txt"), b"unchanged").unwrap();
        fs::write(dir.join("sub/edit.txt"), b"version 1").unwrap();
        // Equal metadata too: a different mtime alone is a modification.
        filetime::set_file_mtime(
            dir.join("same.txt"),
            filetime::FileTime::from_unix_time(1_700_000_000, 0),
        )
        .unwrap();
    }
    fs::write(one.join("gone.bin"), pseudo_random(4 << 20, 7)).unwrap();
    fs::write(two.join("sub/edit.txt"), b"version 2").unwrap();
    fs::write(two.join("new.txt"), b"added").unwrap();
    vault.ok(&["volume", "create", "v"]);
    let a = vault.json(&["volume", "import", "v", one.to_str().unwrap()])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = vault.json(&["volume", "import", "v", two.to_str().unwrap()])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();

    let diff = vault.json(&["snapshot", "diff", "v", &a[..8], &b[..8]]);
    assert_eq!(diff["added"], serde_json::json!(["new.txt"]));
    assert_eq!(diff["removed"], serde_json::json!(["gone.bin"]));
    assert_eq!(diff["modified"], serde_json::json!(["sub/edit.txt"]));

    vault.ok(&["snapshot", "branch", "v", "dev", "--from", &a]);
    let exists = vault.run(&["snapshot", "branch", "v", "dev"]);
    assert_eq!(exists.status.code(), Some(4), "branch exists");
    let stderr = String::from_utf8_lossy(&exists.stderr);
    assert!(stderr.contains("already has a branch \"dev\""), "{stderr}");
    assert!(!stderr.contains("importing"), "{stderr}");
    let restored = vault.path("restored");
    vault.ok(&["snapshot", "restore", "v", &a, restored.to_str().unwrap()]);
    assert_same_tree(&one, &restored);

    let refused = vault.run(&["snapshot", "delete", "v", &a]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("head of branch dev"));

    // Nothing is collectable while dev holds snapshot A.
    let idle = vault.json(&["gc"]);
    assert_eq!(idle["chunks_removed"], 0, "{idle}");

    // Move dev to B, drop A: the 4 MiB file only A had is garbage now.
    let dev_out = vault.path("dev-b");
    vault.ok(&[
        "volume",
        "import",
        "v",
        two.to_str().unwrap(),
        "--branch",
        "dev",
    ]);
    vault.ok(&["snapshot", "delete", "v", &a]);
    let listed: Vec<String> = vault
        .json(&["snapshot", "list", "v"])
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!listed.contains(&a));
    let gc = vault.json(&["gc"]);
    assert!(gc["chunks_removed"].as_u64().unwrap() >= 16, "{gc}");
    assert!(gc["bytes_freed"].as_u64().unwrap() >= 4 << 20, "{gc}");
    assert!(
        gc["disk_bytes_after"].as_u64().unwrap() + (3 << 20)
            < gc["disk_bytes_before"].as_u64().unwrap(),
        "space really returned: {gc}"
    );
    assert!(
        vault.json(&["fsck"])["problems"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    vault.ok(&[
        "volume",
        "export",
        "v",
        dev_out.to_str().unwrap(),
        "--branch",
        "dev",
    ]);
    assert_same_tree(&two, &dev_out);
    // Importing A's content again stores the collected chunks anew, correctly.
    let again = vault.json(&["volume", "import", "v", one.to_str().unwrap()]);
    assert!(again["new_chunks"].as_u64().unwrap() >= 16, "{again}");
    let back = vault.path("back");
    vault.ok(&["volume", "export", "v", back.to_str().unwrap()]);
    assert_same_tree(&one, &back);
}

#[test]
fn a_corrupted_object_fails_the_read_naming_its_cid() {
    let vault = Vault::new();
    let source = vault.path("source");
    fs::create_dir_all(source.join("dir")).unwrap();
    fs::write(source.join("dir/file.txt"), b"content").unwrap();
    vault.ok(&["volume", "create", "v"]);
    vault.ok(&["volume", "import", "v", source.to_str().unwrap()]);
    let damaged_cids: Vec<String> = {
        use forge_store::kv::{Column, Durability, KvEngine, RocksKv, RocksKvOptions, WriteBatch};
        let kv = RocksKv::open(&vault.data_dir().join("db"), &RocksKvOptions::default()).unwrap();
        let mut batch = WriteBatch::new();
        let mut cids = Vec::new();
        for (key, mut value) in kv.scan(Column::Objects, b"", None, usize::MAX).unwrap() {
            let middle = value.len() / 2;
            value[middle] ^= 0x20;
            cids.push(data_encoding::HEXLOWER.encode(&key));
            batch.put(Column::Objects, key, value);
        }
        kv.write(batch, Durability::Synced).unwrap();
        cids
    };
    let export = vault.run(&["volume", "export", "v", vault.path("out").to_str().unwrap()]);
    assert_eq!(export.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&export.stderr);
    assert!(
        damaged_cids.iter().any(|cid| stderr.contains(cid.as_str())),
        "names the object: {stderr}"
    );
    assert!(
        !vault.path("out/dir/file.txt").exists(),
        "nothing read from a damaged tree"
    );
    let fsck = vault.run(&["fsck"]);
    assert_eq!(fsck.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&fsck.stderr).contains("does not match its id"));
}

#[test]
fn fsck_checks_an_encrypted_volume_through_its_reference_index_without_the_passphrase() {
    let vault = Vault::new();
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("a.bin"), pseudo_random(100_000, 5)).unwrap();
    let create = vault
        .command(&["volume", "create", "sealed", "--encrypted"])
        .env("FORGE_PASSPHRASE", "pw")
        .output()
        .unwrap();
    assert!(create.status.success());
    let import = vault
        .command(&["volume", "import", "sealed", source.to_str().unwrap()])
        .env("FORGE_PASSPHRASE", "pw")
        .output()
        .unwrap();
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
    let clean = vault.json(&["fsck"]);
    assert!(clean["problems"].as_array().unwrap().is_empty(), "{clean}");
    assert_eq!(
        clean["skipped_volumes"][0], "sealed",
        "not walked with keys"
    );
    // Another volume's passphrase is not corruption: exit 1, saying so.
    let wrong = vault
        .command(&["fsck"])
        .env("FORGE_PASSPHRASE", "another volume's")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("did not open"), "{stderr}");
    assert!(String::from_utf8_lossy(&wrong.stdout).contains("checked without its keys"));

    // Remove every shard: the keyless index walk still notices the missing chunks.
    {
        use forge_store::kv::{Column, Durability, KvEngine, RocksKv, RocksKvOptions, WriteBatch};
        let kv = RocksKv::open(&vault.data_dir().join("db"), &RocksKvOptions::default()).unwrap();
        let mut batch = WriteBatch::new();
        for (key, _) in kv.scan(Column::Shards, b"", None, usize::MAX).unwrap() {
            batch.delete(Column::Shards, key);
        }
        kv.write(batch, Durability::Synced).unwrap();
    }
    let broken = vault.run(&["fsck"]);
    assert_eq!(broken.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(stderr.contains("is missing"), "{stderr}");
    // One short line with the count, not every problem (the review saw 676 KB).
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.len() < 600, "{stderr}");
    assert!(
        stderr.contains("problem(s) (volume sealed snapshot"),
        "{stderr}"
    );
    // Every problem under --json, grouped by volume and snapshot.
    let json = vault.run(&["fsck", "--json"]);
    assert_eq!(json.status.code(), Some(3));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let problems = report["problems"].as_array().unwrap();
    assert!(!problems.is_empty(), "{report}");
    assert!(
        problems.iter().all(|problem| problem["volume"] == "sealed"),
        "{report}"
    );
}

/// A normal user's export cannot give files other owners, make devices or set trusted.*
/// attributes: it restores the rest and says what it did not, never silently.
#[test]
fn a_normal_users_export_says_what_only_root_could_restore() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to build the source and act as another user");
        return;
    }
    let vault = Vault::new();
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("owned-by-root"), b"data").unwrap();
    nix::sys::stat::mknod(
        &source.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    rustix::fs::lsetxattr(
        source.join("owned-by-root").as_path(),
        "trusted.k",
        b"v",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::lsetxattr(
        source.join("owned-by-root").as_path(),
        "user.k",
        b"kept",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    vault.ok(&["volume", "create", "v"]);
    vault.ok(&["volume", "import", "v", source.to_str().unwrap()]);
    // The vault and a place to export to, handed to user 1000.
    fs::set_permissions(&vault.root, fs::Permissions::from_mode(0o755)).unwrap();
    let out = vault.path("out");
    fs::create_dir(&out).unwrap();
    for path in [vault.data_dir(), out.clone()] {
        let status = std::process::Command::new("chown")
            .args(["-R", "1000:1000"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let forge = assert_cmd::cargo::cargo_bin("forge");
    let output = std::process::Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups"])
        .arg(&forge)
        .args(["--json", "volume", "export", "v"])
        .arg(&out)
        .env("FORGE_DATA_DIR", vault.data_dir())
        .env("HOME", &vault.root)
        .env_remove("FORGE_PASSPHRASE")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    // (The device was not made at all: only the file is left owned by the exporter.)
    assert_eq!(report["owners_not_restored"], 1, "{report}");
    let not_restored: Vec<String> = report["not_restored"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| format!("{} {}", item["path"], item["what"]))
        .collect();
    assert_eq!(not_restored.len(), 2, "{not_restored:?}");
    assert!(not_restored[0].contains("null") && not_restored[0].contains("only root"));
    assert!(not_restored[1].contains("owned-by-root") && not_restored[1].contains("trusted"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not restored"),
        "said on stderr too: {stderr}"
    );
    assert_eq!(fs::read(out.join("owned-by-root")).unwrap(), b"data");
    let kept = rustix::fs::lgetxattr(
        out.join("owned-by-root").as_path(),
        "user.k",
        rustix::buffer::spare_capacity(&mut Vec::with_capacity(16)),
    );
    assert!(kept.is_ok(), "user.* restored: {kept:?}");
    assert!(!out.join("null").exists());
    assert_eq!(fs::metadata(out.join("owned-by-root")).unwrap().uid(), 1000);
}

/// A daemon started with `--metrics-listen` serves Prometheus metrics whose volume numbers
/// are `volume stats --json`'s, counts its API calls by command and exit code, and follows
/// the vault as it changes; a port already taken fails the start, naming it; `off` opens
/// none (before, there was no /metrics).
#[test]
fn a_daemon_serves_metrics_that_match_volume_stats() {
    let vault = Vault::new();
    vault.ok(&["volume", "create", "photos"]);
    vault.ok(&["volume", "create", "empty"]);
    let source = vault.path("source");
    make_source(&source);
    vault.ok(&["volume", "import", "photos", source.to_str().unwrap()]);
    // An encrypted volume: the daemon cannot prompt for its keys, so it counts what the
    // reference indexes tell (the ratios need plaintext lengths: none).
    let with_passphrase = |args: &[&str]| -> Value {
        let output = vault
            .command(&[args, &["--json"]].concat())
            .env("FORGE_PASSPHRASE", "sesame")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };
    with_passphrase(&["volume", "create", "secret", "--encrypted"]);
    let secret_source = vault.path("secret source");
    make_source(&secret_source);
    with_passphrase(&[
        "volume",
        "import",
        "secret",
        secret_source.to_str().unwrap(),
    ]);
    fs::write(
        secret_source.join("one more.txt"),
        b"a second snapshot of the secret",
    )
    .unwrap();
    with_passphrase(&[
        "volume",
        "import",
        "secret",
        secret_source.to_str().unwrap(),
    ]);
    let secret_stats = with_passphrase(&["volume", "stats", "secret"]);
    let started = vault.ok(&["node", "start", "--metrics-listen", "127.0.0.1:0"]);
    let pid = common::started_pid(&started);
    let _kill = common::KillOnDrop(pid);
    let address = vault.json(&["node", "status"])["metrics_address"]
        .as_str()
        .unwrap()
        .to_owned();
    let stats = vault.json(&["volume", "stats", "photos"]);
    let metrics = common::scrape(&address);
    let series = |name: &str, volume: &str| {
        metrics
            .get(&format!("{name}{{volume=\"{volume}\"}}"))
            .copied()
            .unwrap_or_else(|| panic!("no {name} for {volume}: {metrics:#?}"))
    };
    for (metric, field) in [
        ("forge_volume_logical_bytes", "logical_bytes"),
        ("forge_volume_stored_bytes", "stored_bytes"),
        ("forge_volume_unique_chunks", "unique_chunks"),
        ("forge_volume_snapshots", "snapshots"),
        ("forge_volume_dedup_ratio", "dedup_ratio"),
        ("forge_volume_compression_ratio", "compression_ratio"),
    ] {
        let expected = stats[field].as_f64().unwrap();
        let actual = series(metric, "photos");
        assert!(
            (actual - expected).abs() <= expected.abs() * 1e-9,
            "{metric}: {actual} vs {expected}"
        );
    }
    assert_eq!(series("forge_volume_snapshots", "empty"), 0.0);
    for (metric, field) in [
        ("forge_volume_logical_bytes", "logical_bytes"),
        ("forge_volume_stored_bytes", "stored_bytes"),
        ("forge_volume_unique_chunks", "unique_chunks"),
        ("forge_volume_snapshots", "snapshots"),
    ] {
        assert_eq!(
            series(metric, "secret"),
            secret_stats[field].as_f64().unwrap(),
            "{metric} of the encrypted volume"
        );
    }
    assert!(!metrics.contains_key("forge_volume_dedup_ratio{volume=\"secret\"}"));
    assert!(metrics["forge_vault_physical_bytes"] > 0.0);
    assert!(metrics["forge_process_resident_memory_bytes"] > 1e6);
    assert!(metrics["forge_process_open_fds"] > 0.0);
    assert_eq!(metrics["forge_mounts"], 0.0);
    assert_eq!(
        metrics["forge_api_calls_total{method=\"Volume.Stats\",code=\"0\"}"],
        1.0
    );
    // The numbers follow the vault: a second snapshot, a failed call.
    let second = vault.json(&["volume", "import", "photos", source.to_str().unwrap()]);
    assert_eq!(
        vault.run(&["volume", "stats", "absent"]).status.code(),
        Some(1)
    );
    let later = common::scrape(&address);
    assert_eq!(later["forge_volume_snapshots{volume=\"photos\"}"], 2.0);
    assert_eq!(
        later["forge_volume_logical_bytes{volume=\"photos\"}"],
        2.0 * series("forge_volume_logical_bytes", "photos")
    );
    assert_eq!(
        later["forge_api_calls_total{method=\"Volume.Stats\",code=\"1\"}"],
        1.0
    );
    assert_eq!(
        later["forge_api_calls_total{method=\"Volume.Import\",code=\"0\"}"],
        1.0
    );
    // What the daemon did, counted as it went: the second import's files and bytes (the
    // first ran before it started), an export's, and each call's time.
    assert_eq!(
        later["forge_import_files_total"],
        second["files"].as_f64().unwrap()
    );
    assert_eq!(
        later["forge_import_bytes_total"],
        second["logical_bytes"].as_f64().unwrap()
    );
    assert_eq!(later["forge_export_files_total"], 0.0);
    let exported = vault.json(&[
        "volume",
        "export",
        "photos",
        vault.path("exported").to_str().unwrap(),
    ]);
    let after_export = common::scrape(&address);
    assert_eq!(
        after_export["forge_export_files_total"],
        exported["files"].as_f64().unwrap()
    );
    assert_eq!(
        after_export["forge_export_bytes_total"],
        exported["bytes"].as_f64().unwrap()
    );
    assert_eq!(
        after_export["forge_api_call_seconds_count{method=\"Volume.Import\"}"],
        1.0
    );
    assert!(after_export["forge_api_call_seconds_sum{method=\"Volume.Import\"}"] > 0.0);
    for column in ["shards", "objects", "meta"] {
        let key = format!("forge_vault_pending_compaction_bytes{{column=\"{column}\"}}");
        assert!(
            after_export.contains_key(&key),
            "no {key}: {after_export:#?}"
        );
    }

    // The same port for another vault's daemon: refused, naming the address.
    let other = Vault::new();
    let busy = other.run(&["node", "start", "--metrics-listen", &address]);
    assert_eq!(busy.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert!(
        stderr.contains(&format!("cannot listen for metrics on {address}")),
        "{stderr}"
    );
    assert_eq!(other.run(&["node", "status"]).status.code(), Some(1));
    let quiet = other.ok(&["node", "start", "--metrics-listen", "off"]);
    let quiet_pid = common::started_pid(&quiet);
    let _kill_other = common::KillOnDrop(quiet_pid);
    assert!(other.json(&["node", "status"])["metrics_address"].is_null());
}

/// `forge node start --foreground` (what dist/forge.service runs, `Type=notify`) tells the
/// service manager READY=1 on `$NOTIFY_SOCKET` once it serves and STOPPING=1 when
/// `forge node stop` reaches it, then exits 0.
#[test]
fn a_foreground_daemon_notifies_the_service_manager() {
    let vault = Vault::new();
    let notify_path = vault.path("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let daemon = std::process::Command::new(assert_cmd::cargo::cargo_bin("forge"))
        .args(["node", "start", "--foreground", "--metrics-listen", "off"])
        .env("FORGE_DATA_DIR", vault.data_dir())
        .env_remove("FORGE_PASSPHRASE")
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut message = [0u8; 64];
    let length = notify.recv(&mut message).unwrap();
    assert_eq!(&message[..length], b"READY=1");
    // Ready means serving.
    assert_eq!(
        vault.json(&["node", "status"])["pid"],
        u64::from(daemon.id())
    );
    vault.ok(&["node", "stop"]);
    let length = notify.recv(&mut message).unwrap();
    assert_eq!(&message[..length], b"STOPPING=1");
    let output = daemon.wait_with_output().unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("stopped node"), "{printed}");
}

/// The control socket is a gRPC server a client can explore without the .proto files
/// (reflection lists the services and serves their descriptors) and probe (health says
/// SERVING); a request without the client's version, of another version, oversized or
/// not gRPC at all gets a clear error, and the daemon keeps serving.
#[test]
fn the_control_socket_serves_reflection_and_health_and_refuses_bad_requests() {
    use forge_proto::v1::control_client::ControlClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let vault = Vault::new();
    let started = vault.ok(&["node", "start", "--metrics-listen", "off"]);
    let _kill = common::KillOnDrop(common::started_pid(&started));
    let socket = vault.data_dir().join("control.sock");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let channel = common::control_channel(&socket).await;
        let mut reflection = ServerReflectionClient::new(channel.clone());
        let ask = |request: MessageRequest| {
            tokio_stream::iter([ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            }])
        };
        let mut answers = reflection
            .server_reflection_info(ask(MessageRequest::ListServices(String::new())))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            answers.message().await.unwrap().unwrap().message_response
        else {
            panic!("no service list");
        };
        let names: Vec<String> = list
            .service
            .into_iter()
            .map(|service| service.name)
            .collect();
        for expected in [
            "forge.v1.Control",
            "forge.v1.Volume",
            "grpc.health.v1.Health",
        ] {
            assert!(names.iter().any(|name| name == expected), "{names:?}");
        }
        let mut answers = reflection
            .server_reflection_info(ask(MessageRequest::FileContainingSymbol(
                "forge.v1.Control".into(),
            )))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::FileDescriptorResponse(files)) =
            answers.message().await.unwrap().unwrap().message_response
        else {
            panic!("no descriptor for forge.v1.Control");
        };
        assert!(!files.file_descriptor_proto.is_empty());

        let health = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: "forge.v1.Control".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(health.status, 1, "SERVING");
        let health = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: "forge.v1.Volume".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(health.status, 1, "SERVING");

        // A typed call's failure: a status by kind, forge's line, the exit code in metadata.
        let mut volumes = forge_proto::v1::volume_client::VolumeClient::new(channel.clone());
        let request = common::versioned(forge_proto::v1::VolumeStatsRequest {
            name: "absent".into(),
        });
        let absent = volumes.stats(request).await.unwrap_err();
        assert_eq!(absent.code(), tonic::Code::NotFound, "{absent:?}");
        assert!(absent.message().contains("absent"), "{absent:?}");
        assert_eq!(
            absent
                .metadata()
                .get(forge_proto::EXIT_CODE_METADATA)
                .unwrap(),
            "1"
        );

        let mut control = ControlClient::new(channel.clone());
        let version = control
            .version(common::versioned(forge_proto::v1::VersionRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(version.version, env!("CARGO_PKG_VERSION"));
        // A typed call of another version, of none, too large, or with a name no volume
        // has: each a clear status, and the daemon keeps serving.
        let stats = |version: Option<&'static str>, name: String| {
            let mut request = tonic::Request::new(forge_proto::v1::VolumeStatsRequest { name });
            if let Some(version) = version {
                request.metadata_mut().insert(
                    forge_proto::VERSION_METADATA,
                    tonic::metadata::MetadataValue::from_static(version),
                );
            }
            request
        };
        let unversioned = volumes.stats(stats(None, "v".into())).await.unwrap_err();
        assert_eq!(unversioned.code(), tonic::Code::FailedPrecondition);
        assert!(
            unversioned.message().contains("forge-version"),
            "{unversioned:?}"
        );
        let other = volumes
            .stats(stats(Some("0.0.0-other"), "v".into()))
            .await
            .unwrap_err();
        assert_eq!(other.code(), tonic::Code::FailedPrecondition);
        assert!(
            other.message().contains("0.0.0-other")
                && other.message().contains(env!("CARGO_PKG_VERSION")),
            "{other:?}"
        );
        let oversized = volumes
            .stats(stats(Some(env!("CARGO_PKG_VERSION")), "x".repeat(5 << 20)))
            .await
            .unwrap_err();
        assert!(
            matches!(
                oversized.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ),
            "{oversized:?}"
        );
        let bad_name = volumes
            .stats(stats(
                Some(env!("CARGO_PKG_VERSION")),
                "no/such volume".into(),
            ))
            .await
            .unwrap_err();
        assert_eq!(
            bad_name
                .metadata()
                .get(forge_proto::EXIT_CODE_METADATA)
                .unwrap(),
            "1",
            "{bad_name:?}"
        );
    });
    // Not gRPC at all.
    {
        use std::io::{Read, Write};
        let mut raw = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        raw.write_all(b"GET / HTTP/1.0\r\n\r\nthis is not a gRPC request\x00\xff")
            .unwrap();
        raw.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut answer = Vec::new();
        let _ = raw.read_to_end(&mut answer);
    }
    // And the daemon still serves.
    assert!(vault.json(&["node", "status"])["pid"].is_u64());
    assert!(vault.ok(&["volume", "list"]).starts_with("no volumes yet"));
}

/// `kill -9` of the daemon in the middle of an import: the client says the process ended
/// rather than hanging or printing a transport error; afterwards no snapshot is half
/// visible (each listed one exports whole), fsck is clean, the leftovers (record, socket)
/// are cleaned up and a new daemon starts.
#[test]
fn a_daemon_killed_during_an_import_leaves_a_clean_vault() {
    let vault = Vault::new();
    vault.ok(&["volume", "create", "v"]);
    let source = vault.path("source");
    random_tree(&source, 8, 512 << 10);
    let started = vault.ok(&["node", "start", "--metrics-listen", "off"]);
    let pid = common::started_pid(&started);
    let _kill = common::KillOnDrop(pid);
    let output = common::kill_daemon_during(
        &vault,
        &["volume", "import", "v", source.to_str().unwrap()],
        pid,
        std::time::Duration::from_millis(300),
    );
    assert_eq!(vault.run(&["node", "status"]).status.code(), Some(1));
    vault.ok(&["fsck"]);
    let snapshots = vault.json(&["snapshot", "list", "v"]);
    let snapshots = snapshots.as_array().unwrap();
    assert!(snapshots.len() <= 1, "{snapshots:?}");
    if output.status.success() {
        assert_eq!(snapshots.len(), 1);
    }
    if !snapshots.is_empty() {
        let exported = vault.path("exported");
        vault.ok(&["volume", "export", "v", exported.to_str().unwrap()]);
        assert_same_tree(&source, &exported);
    }
    let again = vault.ok(&["node", "start", "--metrics-listen", "off"]);
    assert!(again.starts_with("started"), "{again}");
    vault.ok(&["node", "stop"]);
}

/// The typed calls (`forge.v1.Volume`: list, create, stats; `forge.v1.Snapshot`: list,
/// branch, delete, diff; `forge.v1.Maintenance`: fsck, scrub, gc, stats) answer the same in the CLI's own process and through a daemon's control
/// socket. Two copies of one data directory (same keys, same snapshots): each command of the
/// table runs in-process on one and through the other's daemon, and the outputs (`--json`
/// and human), exit codes and error lines are compared; only a new volume's random id may
/// differ. The daemon's /metrics shows it served them as typed calls (before, every command
/// went over `Control.Run` as a command line to parse again).
#[test]
fn typed_calls_answer_the_same_in_process_and_through_a_daemon() {
    let (local, remote) = (Vault::new(), Vault::new());
    let source = local.path("source");
    make_source(&source);
    local.ok(&["volume", "create", "a"]);
    local.ok(&["volume", "import", "a", source.to_str().unwrap()]);
    fs::write(source.join("small.txt"), b"second version\n").unwrap();
    local.ok(&[
        "volume",
        "import",
        "a",
        source.to_str().unwrap(),
        "-m",
        "second",
    ]);
    fs::write(source.join("small.txt"), b"third version\n").unwrap();
    let path = source.to_str().unwrap();
    local.ok(&["volume", "import", "a", path, "-m", "third"]);
    fs::remove_dir_all(remote.data_dir()).unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(local.data_dir())
        .arg(remote.data_dir())
        .status()
        .unwrap();
    assert!(copied.success());
    let started = remote.ok(&["node", "start", "--metrics-listen", "127.0.0.1:0"]);
    let _kill = common::KillOnDrop(common::started_pid(&started));
    let snapshots = local.json(&["snapshot", "list", "a"]);
    let first = snapshots[0]["id"].as_str().unwrap().to_owned();
    let second = snapshots[1]["id"].as_str().unwrap().to_owned();
    let without_ids = |mut value: serde_json::Value| {
        let strip = |entry: &mut serde_json::Value| {
            if let Some(object) = entry.as_object_mut() {
                object.remove("id");
            }
        };
        match value.as_array_mut() {
            Some(entries) => entries.iter_mut().for_each(strip),
            None => strip(&mut value),
        }
        value
    };
    // (exit code, what it printed: stdout, with volume ids removed under --json (new ones
    // are random), or stderr)
    let outcome = |vault: &Vault, row: &[&str]| {
        let output = vault.run(row);
        let shown = if !output.status.success() {
            String::from_utf8_lossy(&output.stderr).into_owned()
        } else if row.contains(&"--json") && row[0] == "volume" {
            without_ids(serde_json::from_slice(&output.stdout).unwrap()).to_string()
        } else {
            String::from_utf8_lossy(&output.stdout).into_owned()
        };
        (output.status.code(), shown)
    };
    let table: &[&[&str]] = &[
        &["volume", "list"],
        &["volume", "list", "--json"],
        &["volume", "create", "b", "--json"],
        &["volume", "create", "c", "--ec", "2+1"],
        &["volume", "create", "d", "--domain", "shared", "--json"],
        &["volume", "create", "a"],
        &["volume", "create", "a", "--json"],
        &["volume", "create", "bad/name"],
        &["volume", "create", "e", "--ec", "0+1", "--json"],
        &["volume", "list"],
        &["volume", "list", "--json"],
        &["volume", "stats", "a"],
        &["volume", "stats", "a", "--json"],
        &["volume", "stats", "b", "--json"],
        &["volume", "stats", "absent"],
        &["volume", "stats", "absent", "--json"],
        &["snapshot", "list", "a"],
        &["snapshot", "list", "a", "--json"],
        &["snapshot", "list", "b"],
        &["snapshot", "list", "absent", "--json"],
        &["snapshot", "diff", "a", &first, &second],
        &["snapshot", "diff", "a", &first, &second, "--json"],
        &["snapshot", "diff", "a", &second, &second],
        &["snapshot", "diff", "a", &first, "ffff"],
        &["snapshot", "branch", "a", "old", "--from", &first],
        &["snapshot", "branch", "a", "dev", "--json"],
        &["snapshot", "branch", "a", "dev"],
        &["snapshot", "branch", "a", "x", "--from", "ffff"],
        &["snapshot", "list", "a", "--json"],
        &["snapshot", "delete", "a", &first],
        &[
            "snapshot",
            "branch",
            "a",
            "old2",
            "--from",
            &first[..12],
            "--json",
        ],
        &["snapshot", "delete", "a", "main"],
        &["snapshot", "delete", "a", &second, "--json"],
        &["snapshot", "delete", "a", &second],
        &["snapshot", "list", "a"],
        &["scrub"],
        &["scrub", "--json"],
        &["scrub", "--repair", "--json"],
        &["fsck"],
        &["fsck", "--json"],
        &["fsck", "--verbose"],
    ];
    // The diff the daemon streamed is the real one: the one file the second import changed.
    let diff = remote.json(&["snapshot", "diff", "a", &first, &second]);
    assert_eq!(diff["modified"], serde_json::json!(["small.txt"]), "{diff}");
    assert_eq!(diff["added"], serde_json::json!([]), "{diff}");
    for row in table {
        let (here, there) = (outcome(&local, row), outcome(&remote, row));
        assert_eq!(here, there, "{row:?}");
    }
    // gc and vault stats count bytes of files whose sizes differ between two copies (the
    // storage engine's logs and compactions): the same fields, the same removals.
    for row in [&["gc", "--json"][..], &["stats", "--json"][..]] {
        let (here, there) = (local.json(&row[..1]), remote.json(&row[..1]));
        let keys = |value: &serde_json::Value| {
            value
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&here), keys(&there), "{row:?}");
        for field in ["chunks_removed", "objects_removed", "volumes"] {
            assert_eq!(here.get(field), there.get(field), "{row:?} {field}");
        }
    }
    let address = remote.json(&["node", "status"])["metrics_address"]
        .as_str()
        .unwrap()
        .to_owned();
    let metrics = common::scrape(&address);
    for (method, code, calls) in [
        ("Volume.List", 0, 4.0),
        ("Volume.Create", 0, 3.0),
        ("Volume.Create", 4, 2.0),
        ("Volume.Create", 1, 1.0),
        ("Volume.Stats", 0, 3.0),
        ("Volume.Stats", 1, 2.0),
        ("Snapshot.List", 0, 5.0),
        ("Snapshot.Branch", 0, 3.0),
        ("Snapshot.Delete", 0, 1.0),
        ("Snapshot.Diff", 0, 4.0),
        ("Snapshot.Diff", 1, 1.0),
        ("Maintenance.Scrub", 0, 3.0),
        ("Maintenance.Fsck", 0, 3.0),
        ("Maintenance.Gc", 0, 1.0),
        ("Maintenance.Stats", 0, 1.0),
    ] {
        let key = format!("forge_api_calls_total{{method=\"{method}\",code=\"{code}\"}}");
        assert_eq!(
            metrics.get(&key).copied().unwrap_or(0.0),
            calls,
            "{key}: {metrics:#?}"
        );
    }
    remote.ok(&["node", "stop"]);
}

/// `Volume.Import` streams while it works: progress events (files and bytes so far, never
/// going back), the totals once counted when asked for, and the reply last; a relative
/// source is refused by the service (the CLI makes paths absolute before calling). Before,
/// an import through a daemon was a command line run there, silent until it ended.
#[test]
fn an_import_through_the_daemon_streams_progress_then_its_reply() {
    use forge_proto::v1::import_event::Event;
    use forge_proto::v1::volume_client::VolumeClient;
    use forge_proto::v1::{ImportEvent, ImportRequest};

    let vault = Vault::new();
    vault.ok(&["volume", "create", "v"]);
    let source = vault.path("source");
    random_tree(&source, 4, 1 << 20);
    let started = vault.ok(&["node", "start", "--metrics-listen", "off"]);
    let _kill = common::KillOnDrop(common::started_pid(&started));
    let socket = vault.data_dir().join("control.sock");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let request = |source: &std::path::Path| {
        common::versioned(ImportRequest {
            volume: "v".into(),
            source: source.as_os_str().as_encoded_bytes().to_vec(),
            count_totals: true,
            ..ImportRequest::default()
        })
    };
    let (events, relative): (Vec<ImportEvent>, tonic::Status) = runtime.block_on(async {
        let channel = common::control_channel(&socket).await;
        let mut client = VolumeClient::new(channel);
        let events = common::drain(client.import(request(&source)).await.unwrap()).await;
        let mut refused = client
            .import(request(std::path::Path::new("relative/dir")))
            .await
            .unwrap()
            .into_inner();
        // (A progress event with the final counts may come before the error.)
        let error = loop {
            match refused.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the refused import's stream ended without an error"),
                Err(status) => break status,
            }
        };
        (events, error)
    });
    let Some(Event::Done(reply)) = events.last().and_then(|event| event.event.clone()) else {
        panic!("the stream did not end with the reply: {events:?}");
    };
    assert_eq!(reply.files, 64);
    assert_eq!(reply.logical_bytes, 64 << 20);
    assert_eq!(reply.branch, "main");
    let progress: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|event| match &event.event {
            Some(Event::Progress(done)) => Some((done.files, done.bytes)),
            _ => None,
        })
        .collect();
    assert!(!progress.is_empty(), "no progress in {events:?}");
    assert!(
        progress.windows(2).all(|pair| pair[0] <= pair[1]),
        "{progress:?}"
    );
    assert!(
        progress
            .iter()
            .all(|&(files, bytes)| files <= 64 && bytes <= 64 << 20)
    );
    assert_eq!(
        progress.last(),
        Some(&(64, 64 << 20)),
        "the final count comes last"
    );
    let totals: Vec<_> = events
        .iter()
        .filter_map(|event| match &event.event {
            Some(Event::Totals(totals)) => Some((totals.files, totals.bytes)),
            _ => None,
        })
        .collect();
    assert!(totals.len() <= 1, "{totals:?}");
    if let Some(&(files, bytes)) = totals.first() {
        assert_eq!((files, bytes), (64, 64 << 20));
    }
    assert_eq!(
        relative.code(),
        tonic::Code::InvalidArgument,
        "{relative:?}"
    );
    assert!(relative.message().contains("absolute"), "{relative:?}");
    // Export streams too: the totals (from the snapshot's commit) before any progress,
    // then progress, the reply last; the tree is whole.
    let exported = vault.path("exported");
    let export_events = runtime.block_on(async {
        use forge_proto::v1::ExportRequest;
        let channel = common::control_channel(&socket).await;
        let request = common::versioned(ExportRequest {
            volume: "v".into(),
            destination: exported.as_os_str().as_encoded_bytes().to_vec(),
            ..ExportRequest::default()
        });
        common::drain(VolumeClient::new(channel).export(request).await.unwrap())
            .await
            .into_iter()
            .map(|event| event.event.unwrap())
            .collect::<Vec<_>>()
    });
    use forge_proto::v1::export_event::Event as ExportEvent;
    // Totals, when sampled (an export faster than the first sample sends none), come
    // before any progress; the last progress is the final count.
    let first_progress = export_events
        .iter()
        .position(|event| matches!(event, ExportEvent::Progress(_)));
    for (at, event) in export_events.iter().enumerate() {
        if let ExportEvent::Totals(totals) = event {
            assert_eq!((totals.files, totals.bytes), (64, 64 << 20));
            assert!(
                first_progress.is_none_or(|first| at < first),
                "{export_events:?}"
            );
        }
    }
    let Some(ExportEvent::Progress(last)) = export_events.iter().rev().nth(1) else {
        panic!("no final progress before the reply: {export_events:?}");
    };
    assert_eq!((last.files, last.bytes), (64, 64 << 20));
    let Some(ExportEvent::Done(reply)) = export_events.last() else {
        panic!("no reply last: {export_events:?}");
    };
    assert_eq!((reply.files, reply.bytes), (64, 64 << 20));
    assert_same_tree(&source, &exported);
    // The client's connection is still open (its runtime lives, idle): the stop does not
    // wait for it (it did, until `node stop` gave up after 120 s).
    let stopping = std::time::Instant::now();
    vault.ok(&["node", "stop", "--timeout", "30"]);
    eprintln!(
        "stopped in {:?} with a client connected",
        stopping.elapsed()
    );
    drop(runtime);
}

/// Fsck, gc and scrub through a daemon stream their progress as import does: counts that
/// never go back (scrub's against the chunk total, sent before any progress), the final
/// count just before the reply, the reply last. Before, they were unary: silent until done.
#[test]
fn maintenance_calls_through_the_daemon_stream_progress_then_their_reply() {
    use forge_proto::v1::maintenance_client::MaintenanceClient;
    use forge_proto::v1::{FsckRequest, GcRequest, Progress, ScrubRequest};

    let vault = Vault::new();
    vault.ok(&["volume", "create", "v"]);
    let source = vault.path("source");
    make_source(&source);
    let imported = vault.json(&["volume", "import", "v", source.to_str().unwrap()]);
    let chunks = vault.json(&["volume", "stats", "v"])["unique_chunks"]
        .as_u64()
        .unwrap();
    assert!(chunks > 1, "{imported}");
    let started = vault.ok(&["node", "start", "--metrics-listen", "off"]);
    let _kill = common::KillOnDrop(common::started_pid(&started));
    let socket = vault.data_dir().join("control.sock");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    /// A stream's events as (kind, files, bytes) rows, the reply as kind "done".
    fn rows<E>(
        events: Vec<E>,
        read: impl Fn(E) -> (&'static str, Option<Progress>),
    ) -> Vec<(&'static str, u64, u64)> {
        events
            .into_iter()
            .map(|event| {
                let (kind, progress) = read(event);
                let progress = progress.unwrap_or_default();
                (kind, progress.files, progress.bytes)
            })
            .collect()
    }
    let (scrub, fsck, gc) = runtime.block_on(async {
        use forge_proto::v1::{fsck_event, gc_event, scrub_event};
        let channel = common::control_channel(&socket).await;
        let mut client = MaintenanceClient::new(channel);
        let scrub = common::drain(
            client
                .scrub(common::versioned(ScrubRequest { repair: false }))
                .await
                .unwrap(),
        )
        .await;
        let fsck = common::drain(
            client
                .fsck(common::versioned(FsckRequest {
                    use_passphrase: false,
                }))
                .await
                .unwrap(),
        )
        .await;
        let gc = common::drain(client.gc(common::versioned(GcRequest {})).await.unwrap()).await;
        (
            rows(scrub, |event| match event.event {
                Some(scrub_event::Event::Progress(done)) => ("progress", Some(done)),
                Some(scrub_event::Event::Totals(totals)) => ("totals", Some(totals)),
                Some(scrub_event::Event::Done(reply)) => {
                    assert_eq!(reply.chunks_checked, chunks);
                    assert!(reply.unrecoverable.is_empty());
                    ("done", None)
                }
                None => ("none", None),
            }),
            rows(fsck, |event| match event.event {
                Some(fsck_event::Event::Progress(done)) => ("progress", Some(done)),
                Some(fsck_event::Event::Totals(totals)) => ("totals", Some(totals)),
                Some(fsck_event::Event::Done(reply)) => {
                    assert!(reply.problems.is_empty(), "{:?}", reply.problems);
                    assert_eq!(reply.chunks_checked, chunks);
                    ("done", None)
                }
                None => ("none", None),
            }),
            rows(gc, |event| match event.event {
                Some(gc_event::Event::Progress(done)) => ("progress", Some(done)),
                Some(gc_event::Event::Totals(totals)) => ("totals", Some(totals)),
                Some(gc_event::Event::Done(reply)) => {
                    assert_eq!(reply.chunks_removed, 0, "everything is reachable");
                    ("done", None)
                }
                None => ("none", None),
            }),
        )
    });
    for (call, events) in [("scrub", &scrub), ("fsck", &fsck), ("gc", &gc)] {
        assert_eq!(
            events.last().map(|row| row.0),
            Some("done"),
            "{call}: {events:?}"
        );
        let progress: Vec<(u64, u64)> = events
            .iter()
            .filter(|row| row.0 == "progress")
            .map(|row| (row.1, row.2))
            .collect();
        assert!(!progress.is_empty(), "{call}: {events:?}");
        assert!(
            progress.windows(2).all(|pair| pair[0] <= pair[1]),
            "{call}: {progress:?}"
        );
        assert_eq!(
            events[events.len() - 2].0,
            "progress",
            "{call}: the final count comes just before the reply"
        );
    }
    // Scrub: its chunks, all counted, against the total listed first.
    let scrub_totals: Vec<_> = scrub.iter().filter(|row| row.0 == "totals").collect();
    assert!(scrub_totals.len() <= 1, "{scrub:?}");
    if let Some(totals) = scrub_totals.first() {
        assert_eq!(totals.1, chunks);
    }
    assert_eq!(scrub[scrub.len() - 2].1, chunks);
    // Fsck counted every object, chunk and snapshot it checked.
    assert!(fsck[fsck.len() - 2].1 > chunks, "{fsck:?}");
    // Gc swept at least every chunk's shards.
    assert!(gc[gc.len() - 2].1 >= chunks, "{gc:?}");
}

/// Two `forge node start` at once: one serves, the other fails at once saying another
/// process owns the data directory (before, the second waited on the lock for the first
/// to stop, then started as if nothing had happened).
#[test]
fn two_daemons_started_together_give_one_owner_and_a_clear_refusal() {
    let vault = Vault::new();
    vault.ok(&["volume", "create", "v"]);
    for round in 0..3 {
        let starts: Vec<_> = (0..2)
            .map(|_| {
                std::process::Command::new(assert_cmd::cargo::cargo_bin("forge"))
                    .args(["node", "start", "--metrics-listen", "off"])
                    .env_remove("FORGE_PASSPHRASE")
                    .env("FORGE_DATA_DIR", vault.data_dir())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outputs: Vec<_> = starts
            .into_iter()
            .map(|child| child.wait_with_output().unwrap())
            .collect();
        let served: Vec<_> = outputs
            .iter()
            .filter(|output| output.status.success())
            .collect();
        assert_eq!(served.len(), 1, "round {round}: {outputs:?}");
        let pid = common::started_pid(&String::from_utf8_lossy(&served[0].stdout));
        let _kill = common::KillOnDrop(pid);
        let refused = outputs
            .iter()
            .find(|output| !output.status.success())
            .unwrap();
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains("already owns it") || stderr.contains("another forge process"),
            "round {round}: {stderr}"
        );
        assert_eq!(vault.json(&["node", "status"])["pid"], pid);
        vault.ok(&["node", "stop"]);
        assert_eq!(vault.run(&["node", "status"]).status.code(), Some(1));
    }
}
