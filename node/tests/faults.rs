//! Fault tests with real processes and real filesystems: `kill -9` in the middle of an
//! import, a full disk (a small tmpfs), and an unreadable file met by an unprivileged user.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn forge_bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("forge")
}

fn forge(data_dir: &Path, args: &[&str]) -> std::process::Output {
    Process::new(forge_bin())
        .env("FORGE_DATA_DIR", data_dir)
        .env_remove("FORGE_PASSPHRASE")
        .args(args)
        .output()
        .unwrap()
}

fn forge_json(data_dir: &Path, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let output = forge(data_dir, &args);
    assert!(
        output.status.success(),
        "forge {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Writes `len` bytes of seeded pseudo-random data, a few MiB at a time.
fn write_random(path: &Path, len: usize, seed: u8) {
    let mut file = fs::File::create(path).unwrap();
    let mut reader = blake3::Hasher::new().update(&[seed]).finalize_xof();
    let mut buffer = vec![0u8; 4 << 20];
    let mut left = len;
    while left > 0 {
        let take = left.min(buffer.len());
        reader.fill(&mut buffer[..take]);
        file.write_all(&buffer[..take]).unwrap();
        left -= take;
    }
}

/// Bytes in RocksDB blob files: chunk data reaches them only when a memtable is flushed.
fn blob_bytes(db: &Path) -> u64 {
    fs::read_dir(db).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|entry| {
                entry
                    .path()
                    .extension()
                    .is_some_and(|extension| extension == "blob")
            })
            .map(|entry| entry.metadata().map_or(0, |metadata| metadata.len()))
            .sum()
    })
}

fn is_root() -> bool {
    // SAFETY-free check: root owns /proc/self/status's Uid line as "0".
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|line| line.starts_with("Uid:") && line.split_whitespace().nth(1) == Some("0"))
    })
}

#[test]
fn kill_9_during_import_moves_no_ref_and_the_next_import_reuses_what_was_written() {
    let temp = tempfile::tempdir().unwrap();
    let (vault, source) = (temp.path().join("vault"), temp.path().join("source"));
    fs::create_dir_all(&source).unwrap();
    for index in 0..4u8 {
        write_random(&source.join(format!("part-{index}.bin")), 64 << 20, index);
    }
    assert!(forge(&vault, &["init"]).status.success());
    assert!(forge(&vault, &["volume", "create", "v"]).status.success());

    let mut child = Process::new(forge_bin())
        .env("FORGE_DATA_DIR", &vault)
        .args(["volume", "import", "v", source.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill once RocksDB has flushed its first 64 MiB memtable of chunk data (the blob file is
    // written, and a moment later the flush is recorded), with most of the import to go.
    let deadline = Instant::now() + Duration::from_secs(120);
    while blob_bytes(&vault.join("db")) < 60 << 20 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the import finished before it could be killed: make the data larger"
        );
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the import finished before it could be killed: make the data larger"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    assert_eq!(
        forge_json(&vault, &["snapshot", "list", "v"])
            .as_array()
            .unwrap()
            .len(),
        0,
        "no ref moved, nothing half-visible"
    );
    assert!(
        forge_json(&vault, &["fsck"])["problems"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let again = forge_json(&vault, &["volume", "import", "v", source.to_str().unwrap()]);
    assert!(
        again["reused_chunks"].as_u64().unwrap() > 0,
        "chunks written before the kill are reused: {again}"
    );
    let out = temp.path().join("out");
    assert!(
        forge(&vault, &["volume", "export", "v", out.to_str().unwrap()])
            .status
            .success()
    );
    for index in 0..4u8 {
        let name = format!("part-{index}.bin");
        assert!(
            fs::read(out.join(&name)).unwrap() == fs::read(source.join(&name)).unwrap(),
            "{name}"
        );
    }
}

/// A tmpfs mounted for the test's lifetime, unmounted on drop.
struct SmallDisk {
    mountpoint: PathBuf,
}

impl SmallDisk {
    fn mount(mountpoint: &Path, size: &str) -> Self {
        fs::create_dir_all(mountpoint).unwrap();
        let status = Process::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(mountpoint)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs needs root");
        Self {
            mountpoint: mountpoint.to_owned(),
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Process::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }
}

#[test]
fn disk_full_gives_a_clear_error_no_half_snapshot_and_a_usable_vault_after() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root (CI runs as root)");
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&temp.path().join("disk"), "48m");
    let vault = disk.mountpoint.join("vault");
    let filler = disk.mountpoint.join("filler");
    assert!(forge(&vault, &["init"]).status.success());
    assert!(forge(&vault, &["volume", "create", "v"]).status.success());
    write_random(&filler, 12 << 20, 1);
    let (big, small) = (temp.path().join("big"), temp.path().join("small"));
    fs::create_dir_all(&big).unwrap();
    fs::create_dir_all(&small).unwrap();
    write_random(&big.join("data.bin"), 64 << 20, 2);
    fs::write(small.join("note.txt"), b"fits").unwrap();

    let full = forge(&vault, &["volume", "import", "v", big.to_str().unwrap()]);
    assert_eq!(full.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&full.stderr);
    assert!(stderr.contains("no space left"), "a clear error: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");

    fs::remove_file(&filler).unwrap();
    assert_eq!(
        forge_json(&vault, &["snapshot", "list", "v"])
            .as_array()
            .unwrap()
            .len(),
        0,
        "no half snapshot visible"
    );
    let ok = forge_json(&vault, &["volume", "import", "v", small.to_str().unwrap()]);
    assert_eq!(ok["files"], 1);
    let out = temp.path().join("out");
    assert!(
        forge(&vault, &["volume", "export", "v", out.to_str().unwrap()])
            .status
            .success()
    );
    assert_eq!(fs::read(out.join("note.txt")).unwrap(), b"fits");
    // gc takes back what the failed import left behind.
    assert!(
        forge_json(&vault, &["gc"])["bytes_freed"]
            .as_u64()
            .is_some()
    );
    drop(disk);
}

#[test]
fn an_unreadable_file_is_reported_and_skipped_for_an_unprivileged_user() {
    if !is_root() {
        eprintln!("skipped: dropping privileges needs root (CI runs as root)");
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    fs::set_permissions(temp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (vault, source) = (temp.path().join("vault"), temp.path().join("source"));
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("readable.txt"), b"ok").unwrap();
    fs::write(source.join("secret.txt"), b"root only").unwrap();
    // Readable by others whatever the umask: only the secret is meant to be refused.
    fs::set_permissions(&source, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(
        source.join("readable.txt"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    fs::set_permissions(source.join("secret.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir_all(&vault).unwrap();
    // nobody:nogroup owns the vault; root keeps the secret file.
    assert!(
        Process::new("chown")
            .args(["-R", "65534:65534"])
            .arg(&vault)
            .status()
            .unwrap()
            .success()
    );
    let as_nobody = |args: &[&str]| {
        Process::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(forge_bin())
            .args(args)
            .env("FORGE_DATA_DIR", &vault)
            .env("HOME", temp.path())
            .output()
            .unwrap()
    };
    assert!(as_nobody(&["init"]).status.success());
    assert!(as_nobody(&["volume", "create", "v"]).status.success());
    let import = as_nobody(&["volume", "import", "v", source.to_str().unwrap(), "--json"]);
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
    let report: Value = serde_json::from_slice(&import.stdout).unwrap();
    assert_eq!(report["files"], 1);
    let skipped = report["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{report}");
    assert!(skipped[0]["path"].as_str().unwrap().ends_with("secret.txt"));
    assert!(
        skipped[0]["reason"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("permission denied")
    );
    assert!(
        String::from_utf8_lossy(&import.stderr).contains("secret.txt"),
        "reported on stderr too"
    );
}
