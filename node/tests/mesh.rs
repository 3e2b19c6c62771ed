//! Vaults syncing over the real network: `forge` daemons on loopback QUIC, each in its own
//! data directory, driven through the CLI as a user would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Site, same_tree, scrape, xorshift};
use serde_json::Value;

/// `files` files of pseudo-random bytes (half of each compressible text) under `root`,
/// `file_bytes` each.
fn write_tree(root: &Path, files: usize, file_bytes: usize, seed: u64) {
    let mut next = xorshift(seed);
    for file in 0..files {
        let dir = root.join(format!("d{}", file % 7));
        std::fs::create_dir_all(&dir).unwrap();
        let mut bytes = Vec::with_capacity(file_bytes);
        while bytes.len() < file_bytes / 2 {
            bytes.extend_from_slice(&next().to_le_bytes());
        }
        while bytes.len() < file_bytes {
            bytes.extend_from_slice(format!("line {} of file {file}\n", bytes.len()).as_bytes());
        }
        bytes.truncate(file_bytes);
        std::fs::write(dir.join(format!("f{file}.bin")), bytes).unwrap();
    }
}

fn number(value: &Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {value}"))
}

#[test]
fn two_vaults_sync_a_tree_its_change_and_a_sibling_volume_sending_only_what_is_missing() {
    let (a, b) = (Site::start(), Site::start());
    let source = a.vault.path("source");
    write_tree(&source, 100, 1 << 20, 1);
    a.vault.ok(&["volume", "create", "data"]);
    a.vault
        .ok(&["volume", "import", "data", source.to_str().unwrap()]);
    a.meet(&b, "b");

    // b trusts nobody yet: refused, naming the rule, and nothing is stored.
    let refused = a.vault.run(&["volume", "sync", "data", "--peer", "b"]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("--new-volumes"), "{message}");
    assert_eq!(b.vault.json(&["volume", "list"]), serde_json::json!([]));

    b.vault.ok(&["peer", "trust", &a.id, "--new-volumes"]);
    let first = a.sync("data", "b");
    assert_eq!(first["moved"], "created");
    let first_bytes = number(&first, "bytes_sent");
    // 100 MiB, half of it text that compresses.
    assert!(first_bytes > 40 << 20, "{first}");
    assert!(number(&first, "chunks_sent") > 100, "{first}");

    // A zero-knowledge copy: stored and listed, not readable.
    let out = b.vault.path("out");
    let refused = b
        .vault
        .run(&["volume", "export", "data", out.to_str().unwrap()]);
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("no key for volume data on this node"),
        "{message}"
    );
    // It still counts what it holds (from the reference index), and fsck checks it.
    let stats = b.vault.json(&["volume", "stats", "data"]);
    assert!(number(&stats, "stored_bytes") > 40 << 20, "{stats}");
    b.vault.ok(&["fsck"]);

    // One file in a hundred changes: about that much goes.
    let changed = source.join("d3/f3.bin");
    let mut bytes = std::fs::read(&changed).unwrap();
    let mut next = xorshift(99);
    for byte in bytes.iter_mut().step_by(4096) {
        *byte ^= u8::try_from(next() % 255 + 1).unwrap();
    }
    std::fs::write(&changed, bytes).unwrap();
    a.vault
        .ok(&["volume", "import", "data", source.to_str().unwrap()]);
    let second = a.sync("data", "b");
    assert_eq!(second["moved"], "fast-forwarded");
    let second_bytes = number(&second, "bytes_sent");
    assert!(second_bytes < first_bytes / 20, "{second} after {first}");
    assert!(number(&second, "chunks_skipped") > 100, "{second}");

    // A sibling volume sharing most of its chunks with `data`: only the difference goes.
    std::fs::write(source.join("extra.txt"), "one more file\n".repeat(1000)).unwrap();
    a.vault.ok(&["volume", "create", "sibling"]);
    a.vault
        .ok(&["volume", "import", "sibling", source.to_str().unwrap()]);
    let sibling = a.sync("sibling", "b");
    assert_eq!(sibling["moved"], "created");
    assert!(
        number(&sibling, "bytes_sent") < first_bytes / 20,
        "{sibling} after {first}"
    );

    // Shared with b: the envelope travels with the next sync, and b reads it byte for byte.
    a.vault.ok(&["volume", "share", "data", "--to", "b"]);
    let third = a.sync("data", "b");
    assert_eq!(third["moved"], "up to date");
    assert_eq!(number(&third, "chunks_sent"), 0);
    b.vault
        .ok(&["volume", "export", "data", out.to_str().unwrap()]);
    std::fs::remove_file(source.join("extra.txt")).unwrap();
    same_tree(&source, &out);

    // Both keep every proof; one verifies offline, and a changed byte does not.
    let proofs = a.vault.json(&["proof", "list"]);
    assert_eq!(proofs.as_array().unwrap().len(), 4);
    assert_eq!(
        b.vault
            .json(&["proof", "list", "--volume", "data"])
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let id = third["proof"].as_str().unwrap();
    let file = a.vault.path("proof.bin");
    a.vault.ok(&["proof", "export", id, file.to_str().unwrap()]);
    let valid = a.vault.ok(&["proof", "verify", file.to_str().unwrap()]);
    assert!(valid.starts_with("valid"), "{valid}");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[200] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let tampered = a.vault.run(&["proof", "verify", file.to_str().unwrap()]);
    assert_eq!(tampered.status.code(), Some(3));

    // Both daemons count the bytes per peer.
    let sent = scrape(&a.metrics);
    let key = format!(
        "forge_sync_bytes_total{{peer=\"{}\",direction=\"sent\"}}",
        b.id
    );
    assert!(
        sent.get(&key).copied().unwrap_or(0.0) >= first_bytes as f64,
        "{key}: {sent:?}"
    );
    let received = scrape(&b.metrics);
    let key = format!(
        "forge_sync_bytes_total{{peer=\"{}\",direction=\"received\"}}",
        a.id
    );
    assert!(received.get(&key).copied().unwrap_or(0.0) > 0.0, "{key}");
    assert_eq!(received.get("forge_peers_connected"), Some(&1.0));
}

#[test]
fn a_zero_knowledge_vault_serves_onward_and_a_killed_sender_resumes_without_resending() {
    let (mut a, b, c) = (Site::start(), Site::start(), Site::start());
    let source = a.vault.path("source");
    write_tree(&source, 12, 256 << 10, 7);
    a.vault.ok(&["volume", "create", "data"]);
    a.vault
        .ok(&["volume", "import", "data", source.to_str().unwrap()]);
    a.meet(&b, "b");
    b.meet(&c, "c");
    b.vault.ok(&["peer", "trust", &a.id, "--new-volumes"]);
    // c takes new volumes from b, and snapshots written by a (met only through b).
    c.vault.ok(&["peer", "trust", &b.id, "--new-volumes"]);
    c.vault.ok(&["peer", "trust", &a.id, "--new-volumes"]);
    a.sync("data", "b");
    let onward = b.sync("data", "c");
    assert_eq!(onward["moved"], "created");

    // a shares with c through b, which cannot read what it carries.
    a.vault.ok(&["peer", "trust", &c.id, "--volume", "data"]);
    let unknown = a.vault.run(&["volume", "share", "data", "--to", &c.id]);
    assert!(!unknown.status.success(), "a has never met c's keys");
    a.meet(&c, "c");
    a.vault.ok(&["volume", "share", "data", "--to", "c"]);
    a.sync("data", "b");
    let out = c.vault.path("before");
    let refused = c
        .vault
        .run(&["volume", "export", "data", out.to_str().unwrap()]);
    assert!(!refused.status.success(), "the envelope is still at b");
    b.sync("data", "c");
    c.vault
        .ok(&["volume", "export", "data", out.to_str().unwrap()]);
    same_tree(&source, &out);

    // A large change; the sender is killed (SIGKILL) half-way through its push.
    let big = a.vault.path("big");
    write_tree(&big, 60, 1 << 20, 11);
    a.vault
        .ok(&["volume", "import", "data", big.to_str().unwrap()]);
    let before = b.dir_bytes();
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("forge"))
        .env("FORGE_DATA_DIR", a.vault.data_dir())
        .args(["volume", "sync", "data", "--peer", "b", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while b.dir_bytes() < before + (15 << 20) {
        assert!(Instant::now() < deadline, "nothing arrived at b");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(a.daemon.take());
    let interrupted = child.wait_with_output().unwrap();
    assert!(!interrupted.status.success(), "the sync was cut off");

    // Rerun: what b holds is not sent again; the result is byte for byte.
    a.restart();
    let resumed = a.sync("data", "b");
    assert_eq!(resumed["moved"], "fast-forwarded");
    // What a push from scratch would send: the volume's stored bytes. At least 15 MiB of
    // it had arrived before the kill, and is not sent again.
    let whole = number(&a.vault.json(&["volume", "stats", "data"]), "stored_bytes");
    let resent = number(&resumed, "bytes_sent");
    assert!(
        resent > 0 && resent + (12 << 20) < whole,
        "{resumed}, volume {whole} bytes"
    );
    let again = a.sync("data", "b");
    assert_eq!(number(&again, "chunks_sent"), 0, "{again}");
    a.vault.ok(&["volume", "share", "data", "--to", "b"]);
    a.sync("data", "b");
    let out = b.vault.path("after");
    b.vault
        .ok(&["volume", "export", "data", out.to_str().unwrap()]);
    same_tree(&big, &out);
}

/// Polls `check` for up to 30 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_follower_pulls_each_announced_head_and_what_it_missed_while_down() {
    let (a, mut b) = (Site::start(), Site::start());
    let source = a.vault.path("source");
    write_tree(&source, 6, 64 << 10, 3);
    a.vault.ok(&["volume", "create", "data"]);
    a.vault
        .ok(&["volume", "import", "data", source.to_str().unwrap()]);
    b.meet(&a, "a");
    a.meet(&b, "b");
    a.vault.ok(&["volume", "share", "data", "--to", "b"]);

    // Not trusted to read: refused.
    let refused = b.vault.run(&["volume", "follow", "data", "--peer", "a"]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("not trusted to read volume data"),
        "{message}"
    );

    a.vault
        .ok(&["peer", "trust", "b", "--volume", "data", "--read"]);
    let followed = b.vault.json(&["volume", "follow", "data", "--peer", "a"]);
    assert_eq!(followed["following"], true);
    assert_eq!(followed["pulled"]["moved"], "created");
    let snapshots = |site: &Site| {
        site.vault
            .json(&["snapshot", "list", "data"])
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(snapshots(&b), 1);

    // A new head at a is announced, and b pulls it.
    std::fs::write(source.join("new.txt"), "announced\n").unwrap();
    a.vault
        .ok(&["volume", "import", "data", source.to_str().unwrap()]);
    eventually("the pull of the announced head", || snapshots(&b) == 2);

    // b is down while a moves on; b pulls what it missed when it starts again.
    b.vault.ok(&["node", "stop"]);
    std::fs::write(source.join("missed.txt"), "while down\n").unwrap();
    a.vault
        .ok(&["volume", "import", "data", source.to_str().unwrap()]);
    b.restart();
    eventually("the pull at start", || snapshots(&b) == 3);
    let out = b.vault.path("out");
    b.vault
        .ok(&["volume", "export", "data", out.to_str().unwrap()]);
    same_tree(&source, &out);

    // Unfollowed: a's next head stays at a.
    let stopped = b.vault.json(&["volume", "unfollow", "data", "--peer", "a"]);
    assert_eq!(stopped["following"], false);
    std::fs::write(source.join("later.txt"), "not followed\n").unwrap();
    a.vault
        .ok(&["volume", "import", "data", source.to_str().unwrap()]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(snapshots(&b), 3);
}

#[test]
fn an_audit_passes_on_a_faithful_peer_and_fails_once_it_lost_a_chunk() {
    let (a, mut b) = (Site::start(), Site::start());
    let source = a.vault.path("source");
    write_tree(&source, 5, 200 << 10, 21);
    a.vault.ok(&["volume", "create", "data"]);
    a.vault
        .ok(&["volume", "import", "data", source.to_str().unwrap()]);
    a.meet(&b, "b");
    b.vault.ok(&["peer", "trust", &a.id, "--new-volumes"]);
    a.sync("data", "b");

    // Every chunk sampled (more samples than chunks): all proved, none downloaded whole.
    let passed = a.vault.json(&[
        "volume",
        "audit",
        "data",
        "--peer",
        "b",
        "--samples",
        "1000",
    ]);
    let samples = passed["samples"].as_array().unwrap().len() as u64;
    assert!(samples >= 10, "{passed}");
    assert_eq!(
        (number(&passed, "passed"), number(&passed, "failed")),
        (samples, 0)
    );

    // b loses one chunk (every shard of it), as a disk would.
    b.vault.ok(&["node", "stop"]);
    let lost = {
        use forge_store::kv::{Column, Durability, KvEngine, RocksKv, RocksKvOptions, WriteBatch};
        let kv = RocksKv::open(&b.vault.data_dir().join("db"), &RocksKvOptions::default()).unwrap();
        let shards = kv.scan(Column::Shards, b"", None, usize::MAX).unwrap();
        let cid = shards[0].0[..32].to_vec();
        let mut batch = WriteBatch::new();
        for (key, _) in shards.iter().filter(|(key, _)| key[..32] == cid[..]) {
            batch.delete(Column::Shards, key.clone());
        }
        kv.write(batch, Durability::Synced).unwrap();
        cid.iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    };
    b.restart();
    let failed = a.vault.run(&[
        "volume",
        "audit",
        "data",
        "--peer",
        "b",
        "--samples",
        "1000",
    ]);
    assert_eq!(
        failed.status.code(),
        Some(3),
        "an integrity failure: {}",
        String::from_utf8_lossy(&failed.stderr)
    );
    let report = String::from_utf8_lossy(&failed.stdout);
    assert!(report.contains(&format!("missing {lost}")), "{report}");
    assert_eq!(
        report.matches("\nmissing ").count() + usize::from(report.starts_with("missing ")),
        1,
        "{report}"
    );
    let metrics = scrape(&a.metrics);
    let key = format!(
        "forge_audit_samples_total{{peer=\"{}\",result=\"failed\"}}",
        b.id
    );
    assert_eq!(metrics.get(&key), Some(&1.0), "{key}");
}
