//! Real FUSE mounts through the `forge` binary: a tarball of real files extracted inside a
//! mount, git inside a mount, rename storms, concurrent readers with a writer, persistence
//! across unmount and mount, read-only refusal, crash recovery of fsynced data.
//!
//! These need /dev/fuse and fusermount3. Without them they fail, unless a person sets
//! FORGE_SKIP_FUSE=1 (CI never does).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;

use assert_cmd::Command;

mod common;

/// A vault with a volume `v`, which unmounts whatever its test mounted when dropped.
struct Vault {
    inner: common::Vault,
    mounts: std::cell::RefCell<Vec<PathBuf>>,
}

impl std::ops::Deref for Vault {
    type Target = common::Vault;

    fn deref(&self) -> &common::Vault {
        &self.inner
    }
}

impl Drop for Vault {
    fn drop(&mut self) {
        // Never leave a mount behind, whatever the test did.
        for mountpoint in self.mounts.borrow().iter() {
            let _ = StdCommand::new("fusermount3")
                .arg("-uz")
                .arg(mountpoint)
                .output();
        }
    }
}

impl Vault {
    fn new() -> Self {
        let inner = common::Vault::new();
        inner.ok(&["volume", "create", "v"]);
        Self {
            inner,
            mounts: std::cell::RefCell::new(Vec::new()),
        }
    }

    /// Mounts volume `v` in the background; returns the mount point.
    fn mount(&self, name: &str, extra: &[&str]) -> PathBuf {
        self.mount_volume("v", name, extra)
    }

    /// Mounts `volume` in the background at `name` under the test directory.
    fn mount_volume(&self, volume: &str, name: &str, extra: &[&str]) -> PathBuf {
        let mountpoint = self.path(name);
        fs::create_dir_all(&mountpoint).unwrap();
        self.mounts.borrow_mut().push(mountpoint.clone());
        let mut args = vec![
            "volume",
            "mount",
            volume,
            mountpoint.to_str().unwrap(),
            "--background",
        ];
        args.extend_from_slice(extra);
        let printed = self.ok(&args);
        assert!(printed.starts_with("mounted"), "{printed}");
        mountpoint
    }

    fn unmount(&self, mountpoint: &Path) -> String {
        self.ok(&["volume", "unmount", mountpoint.to_str().unwrap()])
    }
}

/// Every file, directory and symlink under `root`, with mode and content (or target).
fn tree_of(root: &Path) -> Vec<(PathBuf, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let metadata = fs::symlink_metadata(&path).unwrap();
            let relative = path.strip_prefix(root).unwrap().to_owned();
            let mode = metadata.mode() & 0o7777;
            if metadata.file_type().is_symlink() {
                let target = fs::read_link(&path).unwrap();
                out.push((relative, 0, target.as_os_str().as_encoded_bytes().to_vec()));
            } else if metadata.is_dir() {
                out.push((relative, mode, Vec::new()));
                stack.push(path);
            } else {
                out.push((relative, mode, fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Real files: a part of /usr/share (documentation, many small files, symlinks).
fn real_source(vault: &Vault) -> PathBuf {
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    let status = StdCommand::new("cp")
        .args(["-a", "/usr/share/doc", source.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    // A larger file spanning many chunks.
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(source.join("big.bin"), big).unwrap();
    fs::set_permissions(source.join("big.bin"), fs::Permissions::from_mode(0o640)).unwrap();
    source
}

#[test]
fn a_tarball_extracted_in_a_mount_survives_unmount_and_mount_byte_for_byte() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let source = real_source(&vault);
    let tarball = vault.path("source.tar");
    let status = StdCommand::new("tar")
        .args([
            "-cf",
            tarball.to_str().unwrap(),
            "-C",
            source.to_str().unwrap(),
            ".",
        ])
        .status()
        .unwrap();
    assert!(status.success());

    let mountpoint = vault.mount("mnt", &[]);
    let status = StdCommand::new("tar")
        .args([
            "-xpf",
            tarball.to_str().unwrap(),
            "-C",
            mountpoint.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(tree_of(&mountpoint), tree_of(&source), "inside the mount");

    // A rename storm: files across directories and back, over existing targets.
    fs::create_dir(mountpoint.join("storm")).unwrap();
    for round in 0..200 {
        let name = mountpoint.join("storm").join(format!("f{}", round % 7));
        fs::write(&name, format!("round {round}")).unwrap();
        fs::rename(&name, mountpoint.join(format!("moved{}", round % 5))).unwrap();
    }
    for index in 0..5 {
        fs::remove_file(mountpoint.join(format!("moved{index}"))).unwrap();
    }
    fs::remove_dir(mountpoint.join("storm")).unwrap();

    let summary = vault.unmount(&mountpoint);
    assert!(summary.contains("committed to main"), "{summary}");
    // Persistence: a new mount shows the same tree, and so does an export.
    let mountpoint = vault.mount("mnt", &["--read-only"]);
    assert_eq!(
        tree_of(&mountpoint),
        tree_of(&source),
        "after mounting again"
    );
    vault.unmount(&mountpoint);
    let exported = vault.path("exported");
    vault.ok(&["volume", "export", "v", exported.to_str().unwrap()]);
    assert_eq!(tree_of(&exported), tree_of(&source), "exported");
    let fsck = vault.ok(&["fsck"]);
    assert!(fsck.contains("no problems"), "{fsck}");
}

#[test]
fn errors_have_the_right_errno_and_snapshots_are_read_only() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let source = vault.path("source");
    fs::create_dir_all(source.join("dir")).unwrap();
    fs::write(source.join("dir/file"), b"content").unwrap();
    vault.ok(&["volume", "import", "v", source.to_str().unwrap()]);
    let mountpoint = vault.mount("mnt", &[]);
    let error = fs::remove_dir(mountpoint.join("dir")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc_errno::ENOTEMPTY));
    let error = fs::create_dir(mountpoint.join("dir")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc_errno::EEXIST));
    let error = fs::read(mountpoint.join("absent")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc_errno::ENOENT));
    let error = fs::hard_link(mountpoint.join("dir"), mountpoint.join("link")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc_errno::EPERM), "a directory");
    let error = fs::hard_link(mountpoint.join("dir/file"), mountpoint.join("dir")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc_errno::EEXIST));
    // Past the maximum file size: EFBIG at once, not hours of hashing zeros at commit.
    let huge = fs::OpenOptions::new()
        .write(true)
        .open(mountpoint.join("dir/file"))
        .unwrap();
    let error = huge.set_len(999_999_999_999_999).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc_errno::EFBIG));
    drop(huge);

    // A second read-write mount of the branch is refused, with the reason.
    let other = vault.path("other");
    fs::create_dir_all(&other).unwrap();
    let output = vault.run(&[
        "volume",
        "mount",
        "v",
        other.to_str().unwrap(),
        "--background",
    ]);
    assert_eq!(output.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&output.stderr).contains("already mounted read-write"));
    let summary = vault.unmount(&mountpoint);
    assert!(summary.contains("nothing changed"), "{summary}");

    let snapshot = vault.ok(&["snapshot", "list", "v"]);
    let id = snapshot.split_whitespace().next().unwrap().to_owned();
    let mountpoint = vault.mount("snap", &["--snapshot", &id]);
    assert_eq!(fs::read(mountpoint.join("dir/file")).unwrap(), b"content");
    let error = fs::write(mountpoint.join("dir/file"), b"x").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc_errno::EROFS));
    let error = fs::create_dir(mountpoint.join("new")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc_errno::EROFS));
    vault.unmount(&mountpoint);

    // Without a mount there is nothing to commit.
    let output = vault.run(&["snapshot", "create", "v"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("forge volume import"));
}

#[test]
fn git_works_inside_a_mount() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let mountpoint = vault.mount("mnt", &[]);
    let git = |args: &[&str]| {
        let output = StdCommand::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@example.com",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(&mountpoint)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    git(&["init", "-q"]);
    fs::write(mountpoint.join("README"), b"hello from a forge mount\n").unwrap();
    fs::create_dir(mountpoint.join("src")).unwrap();
    fs::write(mountpoint.join("src/lib.rs"), b"pub fn f() {}\n").unwrap();
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "first"]);
    fs::write(mountpoint.join("README"), b"changed\n").unwrap();
    git(&["commit", "-q", "-am", "second"]);
    git(&["fsck", "--strict"]);
    assert_eq!(git(&["log", "--format=%s"]), "second\nfirst\n");
    vault.unmount(&mountpoint);
    let mountpoint = vault.mount("mnt", &[]);
    let output = StdCommand::new("git")
        .args(["log", "--format=%s"])
        .current_dir(&mountpoint)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), "second\nfirst\n");
    vault.unmount(&mountpoint);
}

#[test]
fn concurrent_readers_see_whole_files_while_a_writer_works() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    fs::write(source.join("shared.bin"), &data).unwrap();
    vault.ok(&["volume", "import", "v", source.to_str().unwrap()]);
    let mountpoint = vault.mount("mnt", &[]);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..5 {
                    assert_eq!(fs::read(mountpoint.join("shared.bin")).unwrap(), data);
                }
            });
        }
        scope.spawn(|| {
            for index in 0..50 {
                let path = mountpoint.join(format!("w{index}"));
                let mut file = fs::File::create(&path).unwrap();
                file.write_all(&data[..(index + 1) * 1000]).unwrap();
            }
        });
    });
    for index in 0..50 {
        assert_eq!(
            fs::read(mountpoint.join(format!("w{index}"))).unwrap(),
            &data[..(index + 1) * 1000]
        );
    }
    vault.unmount(&mountpoint);
}

/// `kill -9` of the daemon while a `snapshot create` commits its mount: the client says
/// the process ended (or succeeded, if the commit was done first); afterwards no snapshot
/// is half visible (each listed one exports whole), fsck is clean, the dead mount is
/// cleared by `unmount`, a new daemon starts, and the next mount has every file that was
/// fsynced before the kill.
#[test]
fn a_daemon_killed_during_a_mount_commit_keeps_what_was_fsynced() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let started = vault.ok(&["node", "start", "--metrics-listen", "off"]);
    let pid = common::started_pid(&started);
    let _kill = common::KillOnDrop(pid);
    let mountpoint = vault.mount("mnt", &[]);
    fs::create_dir(mountpoint.join("d")).unwrap();
    let mut next = common::xorshift(11);
    let mut written = Vec::new();
    for index in 0..32 {
        let bytes: Vec<u8> = (0..256 << 10).map(|_| next() as u8).collect();
        let mut file = fs::File::create(mountpoint.join(format!("d/f{index:02}"))).unwrap();
        file.write_all(&bytes).unwrap();
        file.sync_all().unwrap();
        written.push(bytes);
    }
    // Written, closed, not fsynced: the commit chunks and seals these 32 MB, so the kill
    // lands while it works (if it does not, the commit was acknowledged: all must be there).
    let mut unsynced = Vec::new();
    for index in 0..64 {
        let bytes: Vec<u8> = (0..512 << 10).map(|_| next() as u8).collect();
        fs::write(mountpoint.join(format!("d/u{index:02}")), &bytes).unwrap();
        unsynced.push(bytes);
    }
    let output = common::kill_daemon_during(
        &vault,
        &["snapshot", "create", "v", "-m", "interrupted"],
        pid,
        std::time::Duration::from_millis(100),
    );
    assert_eq!(vault.run(&["node", "status"]).status.code(), Some(1));
    vault.unmount(&mountpoint);
    vault.ok(&["fsck"]);
    let snapshots = vault.json(&["snapshot", "list", "v"]);
    for snapshot in snapshots.as_array().unwrap() {
        let id = snapshot["id"].as_str().unwrap();
        let out = vault.path(&format!("export-{id}"));
        vault.ok(&["snapshot", "restore", "v", id, out.to_str().unwrap()]);
    }
    if output.status.success() {
        assert!(!snapshots.as_array().unwrap().is_empty());
    }
    let again = vault.ok(&["node", "start", "--metrics-listen", "off"]);
    let _kill_again = common::KillOnDrop(common::started_pid(&again));
    let mountpoint = vault.mount("mnt", &[]);
    for (index, bytes) in written.iter().enumerate() {
        assert_eq!(
            &fs::read(mountpoint.join(format!("d/f{index:02}"))).unwrap(),
            bytes,
            "f{index:02}"
        );
    }
    // A file never fsynced is there whole (the commit was acknowledged) or not at all.
    for (index, bytes) in unsynced.iter().enumerate() {
        match fs::read(mountpoint.join(format!("d/u{index:02}"))) {
            Ok(found) => assert_eq!(&found, bytes, "u{index:02}"),
            Err(error) => {
                assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
                assert!(
                    !output.status.success(),
                    "an acknowledged commit lost u{index:02}"
                );
            }
        }
    }
    // What the interrupted commit did not publish, the unmount commits. A kill that landed
    // after the commit published but before it answered leaves a working state naming the
    // committed tree: the remount mounts the head instead of recovering it (before, the
    // unmount then committed the same tree again, to a conflict branch).
    let summary = vault.unmount(&mountpoint);
    if output.status.success() {
        assert!(summary.contains("nothing changed"), "{summary}");
    } else {
        assert!(
            summary.contains("committed to main") || summary.contains("nothing changed"),
            "{summary}"
        );
    }
    assert!(!summary.contains("conflict"), "{summary}");
    vault.ok(&["node", "stop"]);
    let exported = vault.path("final");
    vault.ok(&["volume", "export", "v", exported.to_str().unwrap()]);
    for (index, bytes) in written.iter().enumerate() {
        assert_eq!(
            &fs::read(exported.join(format!("d/f{index:02}"))).unwrap(),
            bytes
        );
    }
}

#[test]
fn fsynced_data_survives_a_killed_mount() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let mountpoint = vault.mount("mnt", &[]);
    let mut file = fs::File::create(mountpoint.join("durable.txt")).unwrap();
    file.write_all(b"fsynced before the crash").unwrap();
    file.sync_all().unwrap();
    drop(file);
    // Kill the serving process the hard way.
    let registry = vault.root.join("vault/mounts");
    let record = fs::read_dir(&registry)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| {
            path.extension()
                .is_some_and(|extension| extension == "json")
        })
        .unwrap();
    let record: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&record).unwrap()).unwrap();
    let pid = record["pid"].as_u64().unwrap().to_string();
    assert!(
        StdCommand::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success()
    );
    while Path::new(&format!("/proc/{pid}")).exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The dead mount is refused with a hint, and `unmount` clears it.
    let refused = vault.run(&[
        "volume",
        "mount",
        "v",
        mountpoint.to_str().unwrap(),
        "--background",
    ]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("forge volume unmount"),
        "{refused:?}"
    );
    vault.unmount(&mountpoint);
    // gc keeps what the recoverable working state reaches.
    vault.ok(&["gc"]);

    let printed = vault.ok(&[
        "volume",
        "mount",
        "v",
        mountpoint.to_str().unwrap(),
        "--background",
    ]);
    assert!(printed.contains("recovered"), "{printed}");
    // The dead host's staging files are cleared by the new one.
    let staging: Vec<_> = fs::read_dir(vault.root.join("vault/staging"))
        .unwrap()
        .collect();
    assert_eq!(staging.len(), 1, "only the new host's staging directory");
    assert_eq!(
        fs::read(mountpoint.join("durable.txt")).unwrap(),
        b"fsynced before the crash"
    );
    let summary = vault.unmount(&mountpoint);
    assert!(summary.contains("committed to main"), "{summary}");
}

/// Imports an 8 MB file, changes it through a mount with `change`, and checks that the
/// export holds the same change (`expect` applied to the original) while at most
/// `max_new_chunks` chunks were written: re-chunking starts at the first changed chunk
/// and rejoins the old boundaries after the last change.
fn rewrite_large_file(
    change: impl FnOnce(&Path),
    expect: impl FnOnce(&mut Vec<u8>),
    max_new_chunks: u64,
) {
    let vault = Vault::new();
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    let data: Vec<u8> = (0..8_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    fs::write(source.join("large.bin"), &data).unwrap();
    vault.ok(&["volume", "import", "v", source.to_str().unwrap()]);
    let chunks = || -> u64 {
        let stats: serde_json::Value =
            serde_json::from_str(&vault.ok(&["volume", "stats", "v", "--json"])).unwrap();
        stats["unique_chunks"].as_u64().unwrap()
    };
    let before = chunks();
    let mountpoint = vault.mount("mnt", &[]);
    change(&mountpoint.join("large.bin"));
    vault.unmount(&mountpoint);
    let new_chunks = chunks() - before;
    assert!(
        (1..=max_new_chunks).contains(&new_chunks),
        "{new_chunks} new chunks"
    );
    let exported = vault.path("exported");
    vault.ok(&["volume", "export", "v", exported.to_str().unwrap()]);
    let mut expected = data;
    expect(&mut expected);
    assert_eq!(fs::read(exported.join("large.bin")).unwrap(), expected);
}

#[test]
fn appending_to_a_large_file_rewrites_only_its_tail() {
    if !common::fuse_available() {
        return;
    }
    // One or two new chunks, not the ~120 of the whole file.
    rewrite_large_file(
        |path| {
            let mut file = fs::OpenOptions::new().append(true).open(path).unwrap();
            file.write_all(b"appended").unwrap();
        },
        |expected| expected.extend_from_slice(b"appended"),
        3,
    );
}

#[test]
fn a_small_write_inside_a_large_file_rewrites_only_the_chunks_around_it() {
    if !common::fuse_available() {
        return;
    }
    // A few new chunks, not the ~60 from the change to the end of the file.
    rewrite_large_file(
        |path| {
            use std::os::unix::fs::FileExt;
            let file = fs::OpenOptions::new().write(true).open(path).unwrap();
            file.write_all_at(b"0123456789", 4_000_000).unwrap();
        },
        |expected| expected[4_000_000..4_000_010].copy_from_slice(b"0123456789"),
        4,
    );
}

/// errno values (Linux).
mod libc_errno {
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const EEXIST: i32 = 17;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const ENOTEMPTY: i32 = 39;
    pub const EROFS: i32 = 30;
    pub const EPERM: i32 = 1;
}

#[test]
fn commands_run_through_the_control_socket_while_mounted() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let mountpoint = vault.mount("mnt", &[]);
    fs::write(mountpoint.join("first.txt"), b"one").unwrap();
    // The mount owns the data directory; these would otherwise wait for it forever.
    let listed = vault.ok(&["volume", "list"]);
    assert!(listed.starts_with('v'), "{listed}");
    let created = vault.ok(&["snapshot", "create", "v", "-m", "while mounted"]);
    assert!(created.contains("committed to main"), "{created}");
    let again = vault.ok(&["snapshot", "create", "v"]);
    assert!(again.contains("nothing changed"), "{again}");
    let snapshots: serde_json::Value =
        serde_json::from_str(&vault.ok(&["--json", "snapshot", "list", "v"])).unwrap();
    assert_eq!(snapshots[0]["message"], "while mounted");
    // gc runs beside a read-write mount and keeps what the mount is writing.
    fs::write(
        mountpoint.join("uncommitted.txt"),
        b"not in any snapshot yet",
    )
    .unwrap();
    vault.ok(&["gc"]);
    assert_eq!(
        fs::read(mountpoint.join("uncommitted.txt")).unwrap(),
        b"not in any snapshot yet"
    );
    // Paths are the client's: a relative source is resolved in its working directory.
    fs::create_dir_all(vault.path("src")).unwrap();
    fs::write(vault.path("src/x"), b"x").unwrap();
    vault.ok(&["volume", "create", "w"]);
    let output = Command::cargo_bin("forge")
        .unwrap()
        .env("FORGE_DATA_DIR", vault.root.join("vault"))
        .current_dir(&vault.root)
        .args(["volume", "import", "w", "src"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Errors keep their exit codes.
    let output = vault.run(&["snapshot", "list", "absent"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("absent"));
    fs::write(mountpoint.join("second.txt"), b"two").unwrap();
    let summary = vault.unmount(&mountpoint);
    assert!(summary.contains("committed to main"), "{summary}");
    assert!(!vault.root.join("vault/control.sock").exists());
    assert_eq!(vault.ok(&["snapshot", "list", "v"]).lines().count(), 2);
    let exported = vault.path("exported");
    vault.ok(&["volume", "export", "v", exported.to_str().unwrap()]);
    assert_eq!(
        fs::read(exported.join("uncommitted.txt")).unwrap(),
        b"not in any snapshot yet"
    );
}

/// `forge node status` asks the process that owns the data directory (today the mount
/// host) for its pid, version, uptime, volumes, mounts and socket; with none running it
/// exits 1 saying so (before, the command did not exist).
#[test]
fn node_status_describes_the_owning_process_and_says_when_none_runs() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let absent = vault.run(&["node", "status"]);
    assert_eq!(absent.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&absent.stderr).contains("no daemon running"),
        "{}",
        String::from_utf8_lossy(&absent.stderr)
    );
    vault.ok(&["volume", "create", "w"]);
    let first = vault.mount("mnt", &[]);
    let second = vault.mount_volume("w", "mnt-w", &["--read-only"]);
    let status = vault.json(&["node", "status"]);
    let registered: Vec<u64> = fs::read_dir(vault.root.join("vault/mounts"))
        .unwrap()
        .filter_map(|entry| {
            let name = entry.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".json")?.split('-').next()?.parse().ok()
        })
        .collect();
    assert_eq!(registered.len(), 2, "{registered:?}");
    assert!(
        registered.iter().all(|pid| status["pid"] == *pid),
        "{status}"
    );
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["node_id"], vault.ok(&["node", "id"]).trim());
    assert!(status["uptime_seconds"].is_u64(), "{status}");
    assert_eq!(status["volumes"], serde_json::json!(["v", "w"]));
    assert_eq!(
        status["socket"],
        vault.root.join("vault/control.sock").to_str().unwrap()
    );
    assert!(status["metrics_address"].is_null());
    let mounts = status["mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 2, "{status}");
    assert_eq!(mounts[0]["mountpoint"], first.to_str().unwrap());
    assert_eq!(mounts[0]["branch"], "main");
    assert_eq!(mounts[0]["read_only"], false);
    assert_eq!(mounts[1]["mountpoint"], second.to_str().unwrap());
    assert_eq!(mounts[1]["volume"], "w");
    assert_eq!(mounts[1]["read_only"], true);
    let human = vault.ok(&["node", "status"]);
    assert!(human.contains("mounts: 2"), "{human}");
    vault.unmount(&first);
    assert_eq!(
        vault.json(&["node", "status"])["mounts"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    vault.unmount(&second);
    assert_eq!(vault.run(&["node", "status"]).status.code(), Some(1));
}

/// `DATA_DIR/forge.toml` sets defaults a command line overrides, `forge node config`
/// prints what is in effect, and a key this version does not know fails every command,
/// naming the file and the key (before, there was no configuration file).
#[test]
fn forge_toml_sets_defaults_and_an_unknown_key_is_an_error() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let defaults = vault.json(&["node", "config"]);
    assert!(defaults["source"].is_null(), "{defaults}");
    assert_eq!(defaults["mount"]["cache_size_bytes"], 256 << 20);
    let config_path = vault.root.join("vault/forge.toml");
    fs::write(
        &config_path,
        "log_level = \"info\"\n[mount]\ncache_size = \"64K\"\n",
    )
    .unwrap();
    let effective = vault.json(&["node", "config"]);
    assert_eq!(effective["source"], config_path.to_str().unwrap());
    assert_eq!(effective["log_level"], "info");
    assert_eq!(effective["mount"]["cache_size_bytes"], 64 << 10);
    let printed = vault.ok(&["node", "config"]);
    assert!(printed.contains("cache_size = \"64K\""), "{printed}");
    // The mount host reads it; --cache-size overrides it.
    let first = vault.mount("mnt", &[]);
    let second = vault.mount("mnt-ro", &["--read-only", "--cache-size", "1M"]);
    let status = vault.json(&["node", "status"]);
    assert_eq!(status["mounts"][0]["cache_bytes"], 64 << 10, "{status}");
    assert_eq!(status["mounts"][1]["cache_bytes"], 1 << 20, "{status}");
    vault.unmount(&second);
    vault.unmount(&first);
    fs::write(&config_path, "[mount]\ncache_sise = \"1M\"\n").unwrap();
    for command in [
        &["node", "config"][..],
        &["volume", "list"],
        &["node", "status"],
    ] {
        let output = vault.run(command);
        assert_eq!(output.status.code(), Some(1), "{command:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("cache_sise") && stderr.contains(config_path.to_str().unwrap()),
            "{command:?}: {stderr}"
        );
    }
}

/// Through one daemon, two clients import into two volumes at the same time while a
/// third reads a mount: both imports succeed with their own content and the reader sees
/// the mounted file whole throughout.
#[test]
fn two_clients_import_concurrently_while_a_third_reads_a_mount() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let started = vault.ok(&["node", "start", "--metrics-listen", "off"]);
    let _kill = common::KillOnDrop(common::started_pid(&started));
    let mountpoint = vault.mount("mnt", &[]);
    let content: Vec<u8> = (0..4u32 << 20).map(|index| (index % 251) as u8).collect();
    fs::write(mountpoint.join("big.bin"), &content).unwrap();
    let mut sources = Vec::new();
    for name in ["one", "two"] {
        vault.ok(&["volume", "create", name]);
        let source = vault.path(&format!("source-{name}"));
        for index in 0..200 {
            let directory = source.join(format!("d{}", index % 10));
            fs::create_dir_all(&directory).unwrap();
            fs::write(
                directory.join(format!("{name}-{index}")),
                format!("{name} {index}\n").repeat(index + 1),
            )
            .unwrap();
        }
        sources.push((name, source));
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads == 0 {
                assert_eq!(fs::read(mountpoint.join("big.bin")).unwrap(), content);
                reads += 1;
            }
            reads
        });
        let imports: Vec<_> = sources
            .iter()
            .map(|(name, source)| {
                let inner: &common::Vault = &vault;
                scope.spawn(move || inner.ok(&["volume", "import", name, source.to_str().unwrap()]))
            })
            .collect();
        for import in imports {
            let printed = import.join().unwrap();
            assert!(printed.contains("snapshot"), "{printed}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    });
    for (name, source) in &sources {
        let exported = vault.path(&format!("exported-{name}"));
        vault.ok(&["volume", "export", name, exported.to_str().unwrap()]);
        assert_eq!(tree_of(source), tree_of(&exported), "{name}");
    }
    vault.ok(&["node", "stop"]);
}

/// A daemon's /metrics shows what its mounts serve: the time of each FUSE request by
/// operation (its count is the requests) and the chunk cache's misses and hits, which
/// outlive the mount (before, /metrics had no mount series).
#[test]
fn a_daemon_reports_fuse_requests_and_its_chunk_cache_on_metrics() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    let mut next = common::xorshift(7);
    let bytes: Vec<u8> = (0..3 << 20).map(|_| next() as u8).collect();
    fs::write(source.join("data.bin"), &bytes).unwrap();
    vault.ok(&["volume", "import", "v", source.to_str().unwrap()]);
    let started = vault.ok(&["node", "start", "--metrics-listen", "127.0.0.1:0"]);
    let _kill = common::KillOnDrop(common::started_pid(&started));
    let address = vault.json(&["node", "status"])["metrics_address"]
        .as_str()
        .unwrap()
        .to_owned();
    let mountpoint = vault.mount("mnt", &["--read-only"]);
    assert_eq!(fs::read(mountpoint.join("data.bin")).unwrap(), bytes);
    let metrics = common::scrape(&address);
    let requests = |operation: &str| {
        metrics
            .get(&format!(
                "forge_fuse_request_seconds_count{{operation=\"{operation}\"}}"
            ))
            .copied()
            .unwrap_or(0.0)
    };
    assert!(requests("lookup") >= 1.0, "{metrics:#?}");
    assert!(requests("open") >= 1.0, "{metrics:#?}");
    assert!(requests("read") >= 1.0, "{metrics:#?}");
    assert!(
        metrics["forge_fuse_request_seconds_sum{operation=\"read\"}"] > 0.0,
        "{metrics:#?}"
    );
    // A 3 MiB file is several chunks: the first read misses, and the read-ahead it starts
    // loads the next ones, which later reads find (hits) or load themselves (misses).
    let misses = metrics["forge_mount_cache_misses_total"];
    let hits = metrics["forge_mount_cache_hits_total"];
    let read_ahead = metrics["forge_mount_read_ahead_chunks_total"];
    assert!(misses >= 1.0, "{metrics:#?}");
    assert!(hits + misses >= 2.0, "{metrics:#?}");
    assert!(misses + read_ahead >= 2.0, "{metrics:#?}");
    vault.unmount(&mountpoint);
    let after = common::scrape(&address);
    assert_eq!(after["forge_mounts"], 0.0);
    assert_eq!(
        after["forge_mount_cache_misses_total"], misses,
        "counters outlive a mount"
    );
    vault.ok(&["node", "stop"]);
}

/// `forge node start` makes a process that owns the data directory with no mount at all:
/// commands run there, mounts come and go, and it serves until `forge node stop`, which
/// unmounts and commits every mount before it exits. A daemon killed with SIGKILL leaves
/// a record and a socket that the next commands clean up.
#[test]
fn a_started_daemon_serves_until_stopped_and_commits_its_mounts() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let started = vault.ok(&["node", "start"]);
    assert!(started.starts_with("started node "), "{started}");
    let pid = common::started_pid(&started);
    let _kill = common::KillOnDrop(pid);
    assert!(vault.root.join("vault/logs/daemon.log").exists());
    let status = vault.json(&["node", "status"]);
    assert_eq!(status["pid"], pid);
    assert_eq!(status["mounts"], serde_json::json!([]));
    // Another user is told it may not, naming what it may not use (the data directory is
    // 0700, the socket 0600 even where the directory is opened up).
    if nix::unistd::geteuid().is_root() {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&vault.root, fs::Permissions::from_mode(0o755)).unwrap();
        let data_dir = vault.root.join("vault");
        let as_other_user = || {
            let output = StdCommand::new("setpriv")
                .args(["--reuid", "1000", "--regid", "1000", "--clear-groups"])
                .arg(assert_cmd::cargo::cargo_bin("forge"))
                .args(["node", "status"])
                .env("FORGE_DATA_DIR", &data_dir)
                .output()
                .unwrap();
            assert_eq!(output.status.code(), Some(1));
            String::from_utf8_lossy(&output.stderr).into_owned()
        };
        let refused = as_other_user();
        assert!(
            refused.contains(&format!(
                "permission denied: {} belongs to uid 0",
                data_dir.display()
            )),
            "{refused}"
        );
        fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o755)).unwrap();
        let refused = as_other_user();
        assert!(
            refused.contains(&format!(
                "permission denied: the control socket {} belongs to uid 0",
                data_dir.join("control.sock").display()
            )),
            "{refused}"
        );
        fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o700)).unwrap();
    }
    // One owner at a time.
    let again = vault.run(&["node", "start"]);
    assert_eq!(again.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&again.stderr)
            .contains(&format!("forge process {pid} already owns it")),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // Commands run in the daemon, and mounts are its own: a mount returns at once.
    fs::create_dir_all(vault.path("src")).unwrap();
    fs::write(vault.path("src/imported.txt"), b"through the daemon").unwrap();
    vault.ok(&["volume", "import", "v", vault.path("src").to_str().unwrap()]);
    let mountpoint = vault.path("mnt");
    fs::create_dir_all(&mountpoint).unwrap();
    vault.mounts.borrow_mut().push(mountpoint.clone());
    let mounted = vault.ok(&["volume", "mount", "v", mountpoint.to_str().unwrap()]);
    assert!(mounted.starts_with("mounted"), "{mounted}");
    fs::write(mountpoint.join("first.txt"), b"one").unwrap();
    let summary = vault.unmount(&mountpoint);
    assert!(summary.contains("committed to main"), "{summary}");
    // The last unmount does not end a daemon.
    assert_eq!(vault.json(&["node", "status"])["pid"], pid);
    vault.ok(&["volume", "mount", "v", mountpoint.to_str().unwrap()]);
    fs::write(mountpoint.join("second.txt"), b"two").unwrap();
    let stopped = vault.ok(&["node", "stop"]);
    assert!(
        stopped.contains(&format!("stopped forge process {pid}")),
        "{stopped}"
    );
    assert!(stopped.contains(mountpoint.to_str().unwrap()), "{stopped}");
    assert_eq!(vault.run(&["node", "status"]).status.code(), Some(1));
    assert!(!vault.root.join("vault/daemon.json").exists());
    assert!(!vault.root.join("vault/control.sock").exists());
    let exported = vault.path("exported");
    vault.ok(&["volume", "export", "v", exported.to_str().unwrap()]);
    for (name, bytes) in [
        ("imported.txt", &b"through the daemon"[..]),
        ("first.txt", b"one"),
        ("second.txt", b"two"),
    ] {
        assert_eq!(fs::read(exported.join(name)).unwrap(), bytes, "{name}");
    }
    assert_eq!(vault.run(&["node", "stop"]).status.code(), Some(1));

    // SIGKILL: the record and socket stay behind; the next commands see no daemon, run
    // in-process, and a new daemon starts.
    let killed = common::started_pid(&vault.ok(&["node", "start"]));
    let _kill_second = common::KillOnDrop(killed);
    StdCommand::new("kill")
        .args(["-KILL", &killed.to_string()])
        .status()
        .unwrap();
    while fs::metadata(format!("/proc/{killed}")).is_ok_and(|_| {
        fs::read_to_string(format!("/proc/{killed}/stat")).is_ok_and(|stat| !stat.contains(") Z "))
    }) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let absent = vault.run(&["node", "status"]);
    assert_eq!(
        absent.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&absent.stderr)
    );
    assert!(!vault.root.join("vault/daemon.json").exists());
    assert_eq!(vault.ok(&["volume", "list"]).lines().count(), 1);
    let third = common::started_pid(&vault.ok(&["node", "start"]));
    let _kill_third = common::KillOnDrop(third);
    assert_eq!(vault.json(&["node", "status"])["pid"], third);
    // SIGTERM stops it as `node stop` does.
    StdCommand::new("kill")
        .args(["-TERM", &third.to_string()])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while vault.root.join("vault/daemon.json").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon ignored SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(vault.run(&["node", "status"]).status.code(), Some(1));
}

#[test]
fn a_foreground_mount_unmounts_and_commits_on_sigterm() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let mountpoint = vault.path("mnt");
    fs::create_dir_all(&mountpoint).unwrap();
    vault.mounts.borrow_mut().push(mountpoint.clone());
    let mut child = StdCommand::new(assert_cmd::cargo::cargo_bin("forge"))
        .env("FORGE_DATA_DIR", vault.root.join("vault"))
        .args(["volume", "mount", "v", mountpoint.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(line.starts_with("mounted"), "{line}");
    fs::write(mountpoint.join("note.txt"), b"written in the foreground").unwrap();
    assert!(
        StdCommand::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(status.success(), "{status}: {rest}");
    assert!(rest.contains("committed to main"), "{rest}");
    let exported = vault.path("exported");
    vault.ok(&["volume", "export", "v", exported.to_str().unwrap()]);
    assert_eq!(
        fs::read(exported.join("note.txt")).unwrap(),
        b"written in the foreground"
    );
}

#[test]
fn a_damaged_chunk_reads_as_eio_and_the_log_names_it() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("fine.txt"), b"this one is intact").unwrap();
    let damaged: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(40_503) >> 7) as u8)
        .collect();
    fs::write(source.join("damaged.bin"), &damaged).unwrap();
    vault.ok(&["volume", "import", "v", source.to_str().unwrap()]);
    // Flip a byte in every shard of the larger file (1+0: no parity to repair from).
    let cids: Vec<String> = {
        use forge_store::kv::{Column, Durability, KvEngine, RocksKv, RocksKvOptions, WriteBatch};
        let kv = RocksKv::open(&vault.root.join("vault/db"), &RocksKvOptions::default()).unwrap();
        let mut batch = WriteBatch::new();
        let mut cids = Vec::new();
        for (key, mut value) in kv.scan(Column::Shards, b"", None, usize::MAX).unwrap() {
            if value.len() < 1000 {
                continue;
            }
            let middle = value.len() / 2;
            value[middle] ^= 0x01;
            cids.push(data_encoding::HEXLOWER.encode(&key[..32]));
            batch.put(Column::Shards, key, value);
        }
        kv.write(batch, Durability::Synced).unwrap();
        cids
    };
    assert!(!cids.is_empty());
    let mountpoint = vault.mount("mnt", &["--read-only"]);
    assert_eq!(
        fs::read(mountpoint.join("fine.txt")).unwrap(),
        b"this one is intact"
    );
    let error = fs::read(mountpoint.join("damaged.bin")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc_errno::EIO));
    vault.unmount(&mountpoint);
    let log = fs::read_to_string(vault.root.join("vault/mounts/mount.log")).unwrap();
    assert!(
        cids.iter().any(|cid| log.contains(cid.as_str())),
        "the log names the chunk: {log}"
    );
}

#[test]
fn unmount_commits_to_a_conflict_branch_when_the_branch_moved() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let mountpoint = vault.mount("mnt", &[]);
    fs::write(mountpoint.join("from-the-mount.txt"), b"mine").unwrap();
    // Meanwhile an import moves main (through the mount's control socket).
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("imported.txt"), b"theirs").unwrap();
    vault.ok(&["volume", "import", "v", source.to_str().unwrap()]);
    let summary = vault.unmount(&mountpoint);
    assert!(summary.contains("new branch main-conflict-"), "{summary}");
    let snapshots: serde_json::Value =
        serde_json::from_str(&vault.ok(&["--json", "snapshot", "list", "v"])).unwrap();
    let branches: Vec<String> = snapshots
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|snapshot| snapshot["branches"].as_array().unwrap().clone())
        .map(|branch| branch.as_str().unwrap().to_owned())
        .collect();
    assert!(branches.contains(&"main".to_owned()), "{branches:?}");
    let conflict = branches
        .iter()
        .find(|branch| branch.starts_with("main-conflict-"))
        .unwrap();
    // Nothing lost: main has the import, the conflict branch has the mount's work.
    let main_out = vault.path("main-out");
    vault.ok(&["volume", "export", "v", main_out.to_str().unwrap()]);
    assert_eq!(fs::read(main_out.join("imported.txt")).unwrap(), b"theirs");
    let conflict_out = vault.path("conflict-out");
    vault.ok(&[
        "volume",
        "export",
        "v",
        conflict_out.to_str().unwrap(),
        "--branch",
        conflict,
    ]);
    assert_eq!(
        fs::read(conflict_out.join("from-the-mount.txt")).unwrap(),
        b"mine"
    );
}

#[test]
fn an_encrypted_volume_mounts_with_its_passphrase_only() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let forge = |args: &[&str], passphrase: &str| {
        Command::cargo_bin("forge")
            .unwrap()
            .env("FORGE_DATA_DIR", vault.root.join("vault"))
            .env("FORGE_PASSPHRASE", passphrase)
            .args(args)
            .output()
            .unwrap()
    };
    assert!(
        forge(&["volume", "create", "secret", "--encrypted"], "right one")
            .status
            .success()
    );
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("private.txt"), b"for my eyes").unwrap();
    assert!(
        forge(
            &["volume", "import", "secret", source.to_str().unwrap()],
            "right one"
        )
        .status
        .success()
    );
    let mountpoint = vault.path("mnt");
    fs::create_dir_all(&mountpoint).unwrap();
    vault.mounts.borrow_mut().push(mountpoint.clone());
    let mount = [
        "volume",
        "mount",
        "secret",
        mountpoint.to_str().unwrap(),
        "--background",
    ];
    let refused = forge(&mount, "wrong one");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("passphrase"),
        "{refused:?}"
    );
    let mounted = forge(&mount, "right one");
    assert!(
        mounted.status.success(),
        "{}",
        String::from_utf8_lossy(&mounted.stderr)
    );
    assert_eq!(
        fs::read(mountpoint.join("private.txt")).unwrap(),
        b"for my eyes"
    );
    vault.unmount(&mountpoint);
}

#[test]
fn one_process_serves_several_mounts_and_exits_after_the_last() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("a.txt"), b"first version").unwrap();
    vault.ok(&["volume", "import", "v", source.to_str().unwrap()]);
    vault.ok(&["snapshot", "branch", "v", "feature"]);
    vault.ok(&["volume", "create", "other"]);
    let main = vault.mount("main", &[]);
    // A second branch read-write, the same branch read-only, and another volume: all served
    // by the first mount's process (through its control socket).
    let feature = vault.mount("feature", &["--branch", "feature"]);
    let readonly = vault.mount("readonly", &["--read-only"]);
    let other = vault.mount_volume("other", "other", &[]);
    // A second read-write mount of a branch is refused, also inside the host.
    let twice = vault.path("twice");
    fs::create_dir_all(&twice).unwrap();
    let second = vault.run(&[
        "volume",
        "mount",
        "other",
        twice.to_str().unwrap(),
        "--background",
    ]);
    assert_eq!(second.status.code(), Some(4), "{second:?}");
    fs::write(main.join("a.txt"), b"changed on main").unwrap();
    fs::write(feature.join("b.txt"), b"on the feature branch").unwrap();
    fs::write(other.join("c.txt"), b"in another volume").unwrap();
    assert_eq!(fs::read(readonly.join("a.txt")).unwrap(), b"first version");
    let created = vault.ok(&["snapshot", "create", "v", "-m", "both branches"]);
    assert_eq!(created.matches("committed to").count(), 2, "{created}");
    for mountpoint in [&feature, &readonly, &other] {
        vault.unmount(mountpoint);
    }
    // The host still serves main; after its unmount the process exits and frees the vault.
    assert_eq!(fs::read(main.join("a.txt")).unwrap(), b"changed on main");
    vault.unmount(&main);
    let out = vault.path("feature-out");
    vault.ok(&[
        "volume",
        "export",
        "v",
        out.to_str().unwrap(),
        "--branch",
        "feature",
    ]);
    assert_eq!(
        fs::read(out.join("b.txt")).unwrap(),
        b"on the feature branch"
    );
    let out = vault.path("other-out");
    vault.ok(&["volume", "export", "other", out.to_str().unwrap()]);
    assert_eq!(fs::read(out.join("c.txt")).unwrap(), b"in another volume");
    assert!(!vault.root.join("vault/control.sock").exists());
}

#[test]
fn a_file_closed_after_another_files_fsync_is_committed_whole() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let mountpoint = vault.mount("mnt", &[]);
    fs::create_dir(mountpoint.join("dir")).unwrap();
    // A stays open while B is fsynced (which stores the working tree with A's old
    // content); A's close must still reach the commit.
    let mut a = fs::File::create(mountpoint.join("dir/a.txt")).unwrap();
    a.write_all(b"first half, second half").unwrap();
    let mut b = fs::File::create(mountpoint.join("dir/b.txt")).unwrap();
    b.write_all(b"fsynced").unwrap();
    b.sync_all().unwrap();
    drop(b);
    drop(a);
    vault.unmount(&mountpoint);
    let exported = vault.path("exported");
    vault.ok(&["volume", "export", "v", exported.to_str().unwrap()]);
    assert_eq!(
        fs::read(exported.join("dir/a.txt")).unwrap(),
        b"first half, second half"
    );
    assert_eq!(fs::read(exported.join("dir/b.txt")).unwrap(), b"fsynced");
}

/// Files of a source tree generated from `seed`: small text-like files, a few larger ones.
fn generated_source(root: &Path, seed: u64) {
    let mut next = common::xorshift(seed);
    for directory in 0..6 {
        let dir = root.join(format!("dir{directory}"));
        fs::create_dir_all(&dir).unwrap();
        for file in 0..40 {
            let len = usize::try_from(next() % 12_000).unwrap();
            let content: Vec<u8> = (0..len)
                .map(|_| b"abcdefgh \n"[(next() % 10) as usize])
                .collect();
            fs::write(dir.join(format!("f{file}.txt")), content).unwrap();
        }
    }
    let big: Vec<u8> = (0..1_500_000).map(|_| next().to_le_bytes()[3]).collect();
    fs::write(root.join("big.bin"), big).unwrap();
}

/// The review's reproduction, as a loop: imports into two volumes, `snapshot create` while
/// a script renames, creates and deletes files in a mount, and gc, all at once in one data
/// directory. After each round fsck is clean, every acknowledged snapshot exports
/// byte-exact, and the mount holds exactly what the script made.
#[test]
fn imports_commits_and_gc_run_together_and_lose_nothing() {
    if !common::fuse_available() {
        return;
    }
    const ROUNDS: u64 = 4;
    let vault = Vault::new();
    vault.ok(&["volume", "create", "a"]);
    vault.ok(&["volume", "create", "b"]);
    let mountpoint = vault.mount("mnt", &[]);
    // The threads share the plain test vault (the wrapper's mount list is not Sync).
    let shared: &common::Vault = &vault.inner;
    // What the mount must hold: name -> content.
    let mut model: std::collections::BTreeMap<String, Vec<u8>> = std::collections::BTreeMap::new();
    let mut acknowledged: Vec<(String, String, PathBuf)> = Vec::new();
    for round in 0..ROUNDS {
        let sources: Vec<(String, PathBuf)> = ["a", "b"]
            .iter()
            .map(|volume| {
                let source = vault.path(&format!("src-{volume}-{round}"));
                generated_source(&source, round * 2 + u64::from(*volume == "b"));
                ((*volume).to_owned(), source)
            })
            .collect();
        std::thread::scope(|scope| {
            let imports: Vec<_> = sources
                .iter()
                .map(|(volume, source)| {
                    let vault = shared;
                    scope.spawn(move || {
                        let report =
                            vault.json(&["volume", "import", volume, source.to_str().unwrap()]);
                        (
                            volume.clone(),
                            report["snapshot"].as_str().unwrap().to_owned(),
                            source.clone(),
                        )
                    })
                })
                .collect();
            let commits = scope.spawn(|| {
                for _ in 0..4 {
                    let output = shared.run(&["snapshot", "create", "v", "-m", "during the storm"]);
                    assert!(
                        output.status.success(),
                        "{}",
                        String::from_utf8_lossy(&output.stderr)
                    );
                }
            });
            let collector = scope.spawn(|| {
                for _ in 0..3 {
                    shared.ok(&["gc"]);
                }
            });
            // The script: create, overwrite, rename and delete through the mount.
            for step in 0..150u64 {
                let name = format!("r{round}-{}", step % 23);
                let path = mountpoint.join(&name);
                match step % 5 {
                    0 | 1 => {
                        let content = format!("round {round} step {step}")
                            .repeat(usize::try_from(step % 40 + 1).unwrap());
                        fs::write(&path, &content).unwrap();
                        model.insert(name, content.into_bytes());
                    }
                    2 if model.contains_key(&name) => {
                        let target = format!("moved-{}", step % 11);
                        fs::rename(&path, mountpoint.join(&target)).unwrap();
                        let content = model.remove(&name).unwrap();
                        model.insert(target, content);
                    }
                    3 if model.contains_key(&name) => {
                        fs::remove_file(&path).unwrap();
                        model.remove(&name);
                    }
                    _ => {
                        fs::create_dir_all(mountpoint.join(format!("d{round}"))).unwrap();
                        fs::write(mountpoint.join(format!("d{round}/s{step}")), b"x").unwrap();
                        model.insert(format!("d{round}/s{step}"), b"x".to_vec());
                    }
                }
            }
            commits.join().unwrap();
            collector.join().unwrap();
            for import in imports {
                acknowledged.push(import.join().unwrap());
            }
        });
        let fsck = vault.run(&["fsck"]);
        assert!(
            fsck.status.success(),
            "round {round}: {}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        for (index, (volume, snapshot, source)) in acknowledged.iter().enumerate() {
            let out = vault.path(&format!("out-{round}-{index}"));
            vault.ok(&[
                "volume",
                "export",
                volume,
                out.to_str().unwrap(),
                "--snapshot",
                snapshot,
            ]);
            assert_eq!(
                tree_of(&out),
                tree_of(source),
                "round {round}: {volume} {snapshot}"
            );
            fs::remove_dir_all(&out).unwrap();
        }
        for (name, content) in &model {
            assert_eq!(
                &fs::read(mountpoint.join(name)).unwrap(),
                content,
                "round {round}: {name}"
            );
        }
    }
    vault.unmount(&mountpoint);
    let exported = vault.path("exported-v");
    vault.ok(&["volume", "export", "v", exported.to_str().unwrap()]);
    let mut files = Vec::new();
    let mut stack = vec![exported.clone()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(
                    path.strip_prefix(&exported)
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_owned(),
                );
            }
        }
    }
    files.sort();
    assert_eq!(
        files,
        model.keys().cloned().collect::<Vec<_>>(),
        "the last commit holds every change"
    );
    for (name, content) in &model {
        assert_eq!(&fs::read(exported.join(name)).unwrap(), content, "{name}");
    }
    vault.ok(&["gc"]);
    vault.ok(&["fsck"]);
}

/// The review's full-disk case: `cp` into a mount fills the data directory's file system.
/// The copy fails with ENOSPC (not EIO), `rm` of the partial file gives its space back at
/// once, and later writes, a commit and the unmount work again.
#[test]
fn space_of_a_file_removed_after_enospc_is_released_at_once() {
    if !common::fuse_available() {
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let small = temp.path().join("small");
    fs::create_dir_all(&small).unwrap();
    let mounted = StdCommand::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=64m",
            "tmpfs",
            small.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "mounting a small tmpfs (tests run as root)"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = StdCommand::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _tmpfs = Unmount(small.clone());
    let data_dir = small.join("vault");
    let forge = |args: &[&str]| {
        Command::cargo_bin("forge")
            .unwrap()
            .env_remove("FORGE_PASSPHRASE")
            .env("FORGE_DATA_DIR", &data_dir)
            .args(args)
            .output()
            .unwrap()
    };
    assert!(forge(&["init"]).status.success());
    assert!(forge(&["volume", "create", "v"]).status.success());
    let mountpoint = temp.path().join("mnt");
    fs::create_dir_all(&mountpoint).unwrap();
    let output = forge(&[
        "volume",
        "mount",
        "v",
        mountpoint.to_str().unwrap(),
        "--background",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let _unmount = Unmount(mountpoint.clone());

    // Incompressible, so the staged bytes and their chunks both need their full size.
    let mut next = common::xorshift(1);
    let block: Vec<u8> = (0..1 << 20).map(|_| next().to_le_bytes()[0]).collect();
    let target = mountpoint.join("big.bin");
    let mut file = fs::File::create(&target).unwrap();
    let mut failure = None;
    for _ in 0..200 {
        if let Err(error) = file.write_all(&block) {
            failure = Some(error);
            break;
        }
    }
    let error = failure
        .or_else(|| file.sync_all().err())
        .expect("the disk fills up");
    assert_eq!(error.raw_os_error(), Some(libc_errno::ENOSPC), "{error}");
    drop(file);
    fs::remove_file(&target).unwrap();
    let staged: u64 = walk_sizes(&data_dir.join("staging"));
    assert!(
        staged < 1 << 20,
        "{staged} staged bytes of a removed file remain"
    );
    // The kernel sends RELEASE of the closed file asynchronously; once it arrives the
    // removed file's bytes are gone. Wait for the free space (bounded), never for a time.
    let free_bytes = || {
        let stats = nix::sys::statvfs::statvfs(&small).unwrap();
        stats.blocks_available() * stats.fragment_size()
    };
    for _ in 0..500 {
        if free_bytes() > 32 << 20 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        free_bytes() > 32 << 20,
        "{} bytes free after rm",
        free_bytes()
    );
    fs::write(mountpoint.join("after.txt"), b"there is room again").unwrap();
    let output = forge(&["snapshot", "create", "v"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = forge(&["volume", "unmount", mountpoint.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out = temp.path().join("out");
    let output = forge(&["volume", "export", "v", out.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        fs::read(out.join("after.txt")).unwrap(),
        b"there is room again"
    );
    assert!(!out.join("big.bin").exists());
}

/// Bytes of every file under `root` (0 if it does not exist).
fn walk_sizes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let metadata = entry.metadata().unwrap();
            if metadata.is_dir() {
                stack.push(entry.path());
            } else {
                total += metadata.len();
            }
        }
    }
    total
}

/// A sparse file keeps its holes through a mount: `st_blocks` counts its data only, and
/// SEEK_DATA / SEEK_HOLE find the data where the source had it (so `cp --sparse`, tar
/// --sparse and backup tools copy it sparse).
#[test]
fn a_sparse_file_is_served_with_its_holes() {
    use nix::unistd::{Whence, lseek};
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    let image = source.join("disk.img");
    let file = fs::File::create(&image).unwrap();
    file.set_len(1 << 30).unwrap();
    let mut next = common::xorshift(9);
    let data: Vec<u8> = (0..1 << 20).map(|_| next() as u8).collect();
    std::os::unix::fs::FileExt::write_all_at(&file, &data, 512 << 20).unwrap();
    drop(file);
    vault.ok(&["volume", "import", "v", source.to_str().unwrap()]);
    let mountpoint = vault.mount("mnt", &["--read-only"]);
    let served = fs::File::open(mountpoint.join("disk.img")).unwrap();
    let metadata = served.metadata().unwrap();
    assert_eq!(metadata.len(), 1 << 30);
    assert!(
        metadata.blocks() * 512 <= 2 << 20,
        "{} blocks for 1 MiB of data",
        metadata.blocks()
    );
    assert_eq!(lseek(&served, 0, Whence::SeekData).unwrap(), 512 << 20);
    assert_eq!(
        lseek(&served, 512 << 20, Whence::SeekHole).unwrap(),
        513 << 20
    );
    assert_eq!(
        lseek(&served, 513 << 20, Whence::SeekData),
        Err(nix::errno::Errno::ENXIO)
    );
    let mut read = vec![0u8; 1 << 20];
    std::os::unix::fs::FileExt::read_exact_at(&served, &mut read, 512 << 20).unwrap();
    assert_eq!(read, data);
    drop(served);
    vault.unmount(&mountpoint);
}
