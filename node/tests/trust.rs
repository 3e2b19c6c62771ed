//! Zero-trust volumes through the `forge` binary: contracts made, signed and attached;
//! each refusal a mount meets, with its clause; append-only enforced on a real FUSE
//! mount; seals lifted by trust-check.
//!
//! These need /dev/fuse and fusermount3. Without them they fail, unless a person sets
//! FORGE_SKIP_FUSE=1 (CI never does).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;

mod common;

/// A vault with volume `v` (two files imported), unmounting what it mounted when dropped.
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
        for mountpoint in self.mounts.borrow().iter() {
            let _ = StdCommand::new("fusermount3")
                .arg("-uz")
                .arg(mountpoint)
                .output();
        }
        let _ = self.inner.run(&["node", "stop"]);
    }
}

impl Vault {
    fn new() -> Self {
        let inner = common::Vault::new();
        inner.ok(&["volume", "create", "v"]);
        let source = inner.path("source");
        fs::create_dir_all(&source).unwrap();
        fs::write(source.join("a.txt"), b"first line\n").unwrap();
        fs::write(source.join("b.txt"), b"keep me\n").unwrap();
        inner.ok(&["volume", "import", "v", source.to_str().unwrap()]);
        Self {
            inner,
            mounts: std::cell::RefCell::new(Vec::new()),
        }
    }

    fn mount_args(&self, name: &str, extra: &[&str]) -> (PathBuf, Vec<String>) {
        let mountpoint = self.path(name);
        fs::create_dir_all(&mountpoint).unwrap();
        self.mounts.borrow_mut().push(mountpoint.clone());
        let mut args: Vec<String> = ["volume", "mount", "v", mountpoint.to_str().unwrap()]
            .iter()
            .map(|arg| (*arg).to_owned())
            .collect();
        args.push("--background".into());
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        (mountpoint, args)
    }

    fn mount(&self, name: &str, extra: &[&str]) -> PathBuf {
        let (mountpoint, args) = self.mount_args(name, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let printed = self.ok(&args);
        assert!(printed.starts_with("mounted"), "{printed}");
        mountpoint
    }

    /// A refused mount: its exit code and message.
    fn refused_mount(&self, name: &str, extra: &[&str]) -> (i32, String) {
        let (_, args) = self.mount_args(name, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = self.run(&args);
        assert!(!output.status.success(), "mounted: {args:?}");
        (
            output.status.code().unwrap(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    fn unmount(&self, mountpoint: &Path) -> String {
        self.ok(&["volume", "unmount", mountpoint.to_str().unwrap()])
    }

    /// `forge contract new --volume v ARGS -o FILE`, signed unless `sign` is false.
    fn contract(&self, file: &str, args: &[&str], sign: bool) -> PathBuf {
        let path = self.path(file);
        let mut command = vec!["contract", "new", "--volume", "v"];
        command.extend_from_slice(args);
        command.extend_from_slice(&["-o", path.to_str().unwrap()]);
        self.ok(&command);
        if sign {
            self.ok(&["contract", "sign", path.to_str().unwrap()]);
        }
        path
    }

    fn attach(&self, file: &Path) -> std::process::Output {
        self.run(&["contract", "attach", "v", file.to_str().unwrap()])
    }
}

const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn errno(error: &std::io::Error) -> i32 {
    error.raw_os_error().unwrap_or(0)
}

#[test]
fn contracts_refuse_mounts_naming_the_clause_and_append_only_holds_on_a_real_mount() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();

    // Unsigned, then tampered after signing: refused at attach (exit 1, then 3).
    let unsigned = vault.contract("unsigned.toml", &[], false);
    let output = vault.attach(&unsigned);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not signed"));
    let tampered = vault.contract("tampered.toml", &["--mode", "append"], true);
    let text = fs::read_to_string(&tampered).unwrap();
    fs::write(
        &tampered,
        text.replace("mode = \"append\"", "mode = \"rw\""),
    )
    .unwrap();
    let output = vault.attach(&tampered);
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("does not verify"));
    // Bad arguments are named.
    let output = vault.run(&[
        "contract",
        "new",
        "--volume",
        "v",
        "--expires",
        "next week",
        "-o",
        vault.path("bad.toml").to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("YYYY-MM-DD"));

    // A workload list without `interactive`: a plain mount is refused, naming it.
    let workload_only = vault.contract("workload.toml", &["--workload", DIGEST], true);
    assert!(vault.attach(&workload_only).status.success());
    let (code, message) = vault.refused_mount("refused", &[]);
    assert_eq!(code, 1, "{message}");
    assert!(
        message.contains(&format!(
            "refused by its contract: workload interactive is not allowed (allowed: {DIGEST})"
        )),
        "{message}"
    );

    // Append-only.
    let append = vault.contract("append.toml", &["--mode", "append"], true);
    assert!(vault.attach(&append).status.success());
    let shown = vault.json(&["contract", "show", "v"]);
    assert_eq!(shown["mode"], "append");
    assert_eq!(shown["valid"], true);
    assert_eq!(shown["history"].as_array().unwrap().len(), 2);
    let mountpoint = vault.mount("mnt", &[]);
    // New files and appends are fine.
    fs::write(mountpoint.join("new.txt"), b"new\n").unwrap();
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(mountpoint.join("a.txt"))
        .unwrap();
    file.write_all(b"appended\n").unwrap();
    drop(file);
    // Overwriting committed bytes, truncating, deleting, renaming over: EPERM.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(mountpoint.join("b.txt"))
        .unwrap();
    file.seek(SeekFrom::Start(0)).unwrap();
    assert_eq!(errno(&file.write_all(b"X").unwrap_err()), libc_errno::EPERM);
    assert_eq!(errno(&file.set_len(2).unwrap_err()), libc_errno::EPERM);
    drop(file);
    let error = fs::File::create(mountpoint.join("b.txt")).unwrap_err();
    assert_eq!(errno(&error), libc_errno::EPERM, "O_TRUNC");
    let error = fs::remove_file(mountpoint.join("b.txt")).unwrap_err();
    assert_eq!(errno(&error), libc_errno::EPERM, "unlink");
    let error = fs::rename(mountpoint.join("new.txt"), mountpoint.join("b.txt")).unwrap_err();
    assert_eq!(errno(&error), libc_errno::EPERM, "rename over");
    // A rename to a new name adds one.
    fs::rename(mountpoint.join("new.txt"), mountpoint.join("added.txt")).unwrap();
    vault.unmount(&mountpoint);
    let export = vault.path("export");
    vault.ok(&["volume", "export", "v", export.to_str().unwrap()]);
    assert_eq!(
        fs::read(export.join("a.txt")).unwrap(),
        b"first line\nappended\n"
    );
    assert_eq!(fs::read(export.join("b.txt")).unwrap(), b"keep me\n");
    assert_eq!(fs::read(export.join("added.txt")).unwrap(), b"new\n");
    // The mount's snapshot names its workload.
    let snapshots = vault.json(&["snapshot", "list", "v"]);
    let last = snapshots.as_array().unwrap().last().unwrap();
    assert_eq!(last["dna"]["workload"], "interactive");

    // Read-only: a read-write mount is refused, a read-only one is not.
    let read_only = vault.contract("ro.toml", &["--mode", "ro"], true);
    assert!(vault.attach(&read_only).status.success());
    let (_, message) = vault.refused_mount("refused-ro", &[]);
    assert!(message.contains("read-only use only"), "{message}");
    let mountpoint = vault.mount("ro", &["--read-only"]);
    assert_eq!(fs::read(mountpoint.join("b.txt")).unwrap(), b"keep me\n");
    vault.unmount(&mountpoint);

    // Expired: attached while valid, refused once it expires.
    // The wall clock through date(1): this crate's code reads it only through its clock.
    let date = String::from_utf8(
        StdCommand::new("date")
            .args(["-u", "-d", "+3 seconds", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let expiring = vault.contract("expiring.toml", &["--expires", date.trim()], true);
    assert!(vault.attach(&expiring).status.success());
    std::thread::sleep(std::time::Duration::from_secs(4));
    let (_, message) = vault.refused_mount("refused-expired", &["--read-only"]);
    assert!(
        message.contains(&format!("the contract expired on {}", date.trim())),
        "{message}"
    );
    assert!(vault.json(&["contract", "show", "v"])["valid"] == false);
}

#[test]
fn a_sealed_volume_mounts_read_write_again_only_after_trust_check() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let sealed = vault.json(&["volume", "seal", "v", "--reason", "shipped to site B"]);
    assert_eq!(sealed["branch"], "main");
    let (code, message) = vault.refused_mount("refused", &[]);
    assert_eq!(code, 1);
    assert!(
        message.contains("is sealed since") && message.contains("shipped to site B"),
        "{message}"
    );
    // Imports are writes too.
    let output = vault.run(&[
        "volume",
        "import",
        "v",
        vault.path("source").to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("forge volume trust-check v"));
    // Read-only mounts stay possible.
    let mountpoint = vault.mount("ro", &["--read-only"]);
    assert_eq!(fs::read(mountpoint.join("a.txt")).unwrap(), b"first line\n");
    vault.unmount(&mountpoint);

    let report = vault.json(&["volume", "trust-check", "v"]);
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["unsealed"], true);
    let checks: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|check| check["check"].as_str().unwrap())
        .collect();
    assert_eq!(checks, ["signatures", "contract", "seal", "anomalies"]);
    let mountpoint = vault.mount("rw", &[]);
    fs::write(mountpoint.join("c.txt"), b"after the check\n").unwrap();
    vault.unmount(&mountpoint);
    // Passing twice is fine: nothing left to lift.
    let human = vault.ok(&["volume", "trust-check", "v"]);
    assert!(human.ends_with("trust-check passed\n"), "{human}");
}

#[test]
fn ransomware_on_a_mount_is_frozen_with_bounded_loss_and_the_quarantine_restores_every_file() {
    if !common::fuse_available() {
        return;
    }
    for (variant, rename, copy_then_delete) in [
        ("in-place", false, false),
        ("rename", true, false),
        ("copy-then-delete", false, true),
    ] {
        let vault = Vault::new();
        let documents = vault.path("documents");
        common::write_documents(&documents, 40);
        vault.ok(&["volume", "import", "v", documents.to_str().unwrap()]);
        let original = vault.path("original");
        vault.ok(&["volume", "export", "v", original.to_str().unwrap()]);
        let mountpoint = vault.mount("mnt", &[]);
        let damaged = common::ransomware(&mountpoint, rename, copy_then_delete);
        eprintln!("{variant}: {damaged} files damaged before the freeze");
        assert!(
            damaged <= 5,
            "{variant}: {damaged} files damaged before the freeze"
        );
        // Read-only at once, for every writer.
        let error = fs::write(mountpoint.join("another.txt"), b"x").unwrap_err();
        assert_eq!(errno(&error), libc_errno::EROFS, "{variant}");
        vault.unmount(&mountpoint);

        // Frozen: read-write mounts refused naming the quarantine; trust-check fails.
        let (_, message) = vault.refused_mount("refused", &[]);
        assert!(message.contains("is frozen since"), "{variant}: {message}");
        let quarantine = message
            .split("is on branch ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .unwrap()
            .to_owned();
        assert!(quarantine.starts_with("main-quarantine-"), "{quarantine}");
        let output = vault.run(&["volume", "trust-check", "v"]);
        assert_eq!(output.status.code(), Some(3));
        assert!(String::from_utf8_lossy(&output.stderr).contains("anomalies"));
        // The branch never moved; the pre-attack state is whole on the quarantine branch.
        let restored = vault.path("restored");
        vault.ok(&[
            "volume",
            "export",
            "v",
            restored.to_str().unwrap(),
            "--branch",
            &quarantine,
        ]);
        common::same_tree(&original, &restored);
        let head = vault.path("head");
        vault.ok(&["volume", "export", "v", head.to_str().unwrap()]);
        common::same_tree(&original, &head);
        // What the mount held went beside, for review.
        let branches = vault.json(&["snapshot", "list", "v"]);
        let beside = branches
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|snapshot| snapshot["branches"].as_array().unwrap().clone())
            .any(|branch| branch.as_str().unwrap().starts_with("main-frozen-"));
        assert!(beside, "{variant}: {branches}");
        // After review: unfrozen, writable again.
        let unfrozen = vault.json(&["volume", "unfreeze", "v"]);
        assert_eq!(
            unfrozen["resolved"].as_array().unwrap().len(),
            1,
            "{unfrozen}"
        );
        let mountpoint = vault.mount("after", &[]);
        fs::write(mountpoint.join("fine.txt"), b"fine").unwrap();
        vault.unmount(&mountpoint);
    }
}

#[test]
fn benign_work_on_a_mount_is_not_frozen() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let documents = vault.path("documents");
    common::write_documents(&documents, 30);
    vault.ok(&["volume", "import", "v", documents.to_str().unwrap()]);
    let mountpoint = vault.mount("mnt", &[]);
    // Media and archives copied in: new high-entropy files.
    for index in 0..40u64 {
        let mut next = common::xorshift(index + 7);
        let media: Vec<u8> = (0..64 * 1024).map(|_| next().to_le_bytes()[0]).collect();
        fs::write(mountpoint.join(format!("video-{index}.mp4")), media).unwrap();
    }
    // Documents edited, renamed, replaced through a temporary file (as editors and rsync
    // do), some deleted.
    for index in 0..30 {
        let path = mountpoint.join(format!("doc-{index:03}.txt"));
        let mut content = fs::read(&path).unwrap();
        content.extend_from_slice(b"An edit.\n");
        match index % 3 {
            0 => fs::write(&path, &content).unwrap(),
            1 => {
                let temporary = mountpoint.join(format!(".doc-{index:03}.txt.tmp"));
                fs::write(&temporary, &content).unwrap();
                fs::rename(&temporary, &path).unwrap();
            }
            _ => fs::rename(&path, path.with_extension("md")).unwrap(),
        }
    }
    for index in (0..30).step_by(7) {
        let _ = fs::remove_file(mountpoint.join(format!("doc-{index:03}.txt")));
    }
    // A database rewriting pages in place with low-entropy records.
    let database = mountpoint.join("app.db");
    fs::write(&database, vec![b'r'; 256 * 1024]).unwrap();
    for round in 0..50u64 {
        let mut file = fs::OpenOptions::new().write(true).open(&database).unwrap();
        file.seek(SeekFrom::Start((round * 4096) % (256 * 1024)))
            .unwrap();
        file.write_all(format!("record {round} ").repeat(300).as_bytes())
            .unwrap();
    }
    vault.unmount(&mountpoint);
    let report = vault.json(&["volume", "trust-check", "v"]);
    assert_eq!(report["passed"], true, "{report}");
}

/// errno values (libc is not a dependency of the test binaries).
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const EROFS: i32 = 30;
}

/// Whether this process's mount table has anything at `path`.
fn host_sees_mount_at(path: &Path) -> bool {
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_str().unwrap();
    table
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(path))
}

/// The last snapshot's DNA.
fn last_dna(vault: &Vault) -> serde_json::Value {
    let list = vault.json(&["snapshot", "list", "v"]);
    list.as_array().unwrap().last().unwrap()["dna"].clone()
}

#[test]
fn forge_run_mounts_where_only_the_workload_sees_records_its_dna_and_seals() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    let manifest = vault.path("app.toml");
    fs::write(&manifest, "name = \"report\"\nenv = [\"REPORT_LANG\"]\n").unwrap();
    let digest = vault
        .ok(&[
            "run",
            "--print-digest",
            "--manifest",
            manifest.to_str().unwrap(),
            "--",
            "sh",
        ])
        .trim()
        .to_owned();
    // The digest is BLAKE3 of the manifest's bytes then the program's.
    let mut bytes = fs::read(&manifest).unwrap();
    bytes.extend(fs::read(which("sh")).unwrap());
    assert_eq!(digest, blake3::hash(&bytes).to_hex().as_str());

    // The workload sees the volume at `inside`; the test's own mount table (the host's)
    // never does, checked while the workload runs.
    let inside = vault.path("inside");
    let (ready, checked) = (vault.path("ready"), vault.path("checked"));
    let script = format!(
        "cat {inside}/a.txt; echo written by the run > {inside}/out.txt; touch {ready}; \
         while [ ! -e {checked} ]; do sleep 0.05; done; exit 5",
        inside = inside.display(),
        ready = ready.display(),
        checked = checked.display(),
    );
    let run = spawn_forge(
        &vault,
        &[
            "run",
            "--manifest",
            manifest.to_str().unwrap(),
            "--mount",
            &format!("v:{}", inside.display()),
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
    .env("REPORT_LANG", "en_GB")
    .env("SECRET_TOKEN", "not in the dna")
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    wait_until_exists(&ready);
    assert!(
        !host_sees_mount_at(&inside),
        "the host sees the run's mount"
    );
    assert!(
        fs::read_dir(&inside).unwrap().next().is_none(),
        "the host sees the volume's files"
    );
    fs::write(&checked, b"").unwrap();
    let output = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(5), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "first line\n");
    assert!(
        stderr.contains(&format!("workload {digest} exited 5")),
        "{stderr}"
    );
    assert!(stderr.contains("sealed"), "{stderr}");
    assert!(!inside.exists(), "the mount point made for the run stays");

    let dna = last_dna(&vault);
    assert_eq!(dna["workload"], digest.as_str());
    assert_eq!(dna["workload.name"], "report");
    assert_eq!(dna["env.REPORT_LANG"], "en_GB");
    assert!(dna.get("env.SECRET_TOKEN").is_none(), "{dna}");
    assert_eq!(dna["exit"], "5");
    assert_eq!(dna["node"], vault.ok(&["node", "id"]).trim());
    let command: Vec<String> = serde_json::from_str(dna["command"].as_str().unwrap()).unwrap();
    assert_eq!(command, ["sh", "-c", script.as_str()]);
    assert!(dna["start"].as_str().unwrap() <= dna["end"].as_str().unwrap());
    assert!(
        dna["io.write"]
            .as_str()
            .unwrap()
            .starts_with("ops=1 bytes=19 "),
        "{dna}"
    );
    assert!(
        dna["io.read"].as_str().unwrap().contains("bytes=11"),
        "{dna}"
    );
    assert_eq!(dna["io.create"], "ops=1");

    // Sealed: a plain mount is refused; the next run runs trust-check itself, passes,
    // and sees what the first one wrote. The host's own read-only mount at the same path
    // is no obstacle: the run mounts in its namespace, over it.
    let (_, message) = vault.refused_mount("after", &[]);
    assert!(message.contains("is sealed since"), "{message}");
    let host_mount = vault.mount("inside", &["--read-only"]);
    assert_eq!(host_mount, inside);
    let output = vault.run(&[
        "run",
        "--mount",
        &format!("v:{}", inside.display()),
        "--",
        "sh",
        "-c",
        &format!(
            "cat {path}/out.txt && echo again > {path}/second.txt",
            path = inside.display()
        ),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "written by the run\n"
    );
    // The host's mount is untouched: it serves the snapshot it mounted.
    assert!(host_sees_mount_at(&inside));
    assert!(inside.join("out.txt").exists());
    assert!(!inside.join("second.txt").exists());
    vault.unmount(&inside);
    let second = vault.path("second");
    vault.ok(&["volume", "export", "v", second.to_str().unwrap()]);
    assert_eq!(fs::read(second.join("second.txt")).unwrap(), b"again\n");
}

#[test]
fn forge_run_through_a_daemon_streams_stdio_and_meets_the_contract_and_trust_check() {
    if !common::fuse_available() {
        return;
    }
    let vault = Vault::new();
    vault.ok(&["node", "start"]);
    let sh_digest = vault
        .ok(&["run", "--print-digest", "--", "sh"])
        .trim()
        .to_owned();
    let contract = vault.contract(
        "c.toml",
        &["--workload", &sh_digest, "--workload", "interactive"],
        true,
    );
    assert!(vault.attach(&contract).status.success());
    let inside = vault.path("inside");
    let mount = format!("v:{}", inside.display());

    // A workload the contract does not list is refused, naming it; nothing runs.
    let output = vault.run(&[
        "run",
        "--mount",
        &mount,
        "--",
        "touch",
        "/tmp/forge-run-never",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not allowed (allowed: "), "{stderr}");
    assert!(!Path::new("/tmp/forge-run-never").exists());

    // stdin in, stdout and stderr out, the exit status back, through the daemon.
    let mut run = run_script(
        &vault,
        &mount,
        &format!(
            "cat > {}/piped.txt; echo out; echo err >&2; exit 3",
            inside.display()
        ),
    )
    .stdin(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    run.stdin
        .take()
        .unwrap()
        .write_all(b"from the client\n")
        .unwrap();
    let output = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "out\n");
    assert!(stderr.starts_with("err\n"), "{stderr}");
    assert_eq!(last_dna(&vault)["workload"], sh_digest.as_str());
    assert_eq!(last_dna(&vault)["exit"], "3");

    // `forge node stop` during a run: the workload gets SIGTERM, and the daemon commits
    // and seals before it exits.
    let ready = vault.path("ready");
    let run = run_script(
        &vault,
        &mount,
        &format!(
            "trap 'exit 9' TERM; echo before the stop > {}/stopped.txt; touch {}; \
             while :; do sleep 0.05; done",
            inside.display(),
            ready.display()
        ),
    )
    .spawn()
    .unwrap();
    wait_until_exists(&ready);
    // The daemon lists the run's mount as private: the host has nothing at that path.
    let status = vault.json(&["node", "status"]);
    let mounts = status["mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 1, "{status}");
    assert_eq!(mounts[0]["private"], true);
    assert_eq!(mounts[0]["mountpoint"], inside.to_str().unwrap());
    assert!(!host_sees_mount_at(&inside));
    vault.ok(&["node", "stop"]);
    let output = run.wait_with_output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(last_dna(&vault)["exit"], "9");
    let (_, message) = vault.refused_mount("after-stop", &[]);
    assert!(message.contains("is sealed since"), "{message}");

    // A snapshot made by a workload the contract does not allow, then a seal: the next
    // run's own trust-check fails and refuses it with the report.
    vault.ok(&["volume", "trust-check", "v"]);
    let mountpoint = vault.mount("rw", &[]);
    fs::write(mountpoint.join("c.txt"), b"by someone else\n").unwrap();
    vault.ok(&[
        "snapshot",
        "create",
        "v",
        "--dna",
        &format!("workload={DIGEST}"),
    ]);
    vault.unmount(&mountpoint);
    vault.ok(&["volume", "seal", "v"]);
    let output = vault.run(&[
        "run",
        "--mount",
        &mount,
        "--",
        "sh",
        "-c",
        "echo the-workload-ran",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(!stdout.contains("the-workload-ran"), "{stdout}");
    assert!(
        stderr.contains("trust-check of volume \"v\" failed: dna"),
        "{stderr}"
    );
}

/// Waits (a minute at most) for the file a workload creates once it runs.
fn wait_until_exists(path: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the workload never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `forge ARGS` on the vault as a process the test drives (pipes, concurrency).
fn spawn_forge(vault: &Vault, args: &[&str]) -> StdCommand {
    let mut command = StdCommand::new(assert_cmd::cargo::cargo_bin("forge"));
    command
        .env_remove("FORGE_PASSPHRASE")
        .env_remove("RUST_LOG")
        .env("FORGE_DATA_DIR", vault.data_dir())
        .args(args);
    command
}

/// `forge run --mount MOUNT -- sh -c SCRIPT` with its output captured.
fn run_script(vault: &Vault, mount: &str, script: &str) -> StdCommand {
    let mut command = spawn_forge(vault, &["run", "--mount", mount, "--", "sh", "-c", script]);
    command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    command
}

/// Where `program` is on PATH.
fn which(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|directory| directory.join(program))
        .find(|candidate| candidate.is_file())
        .unwrap()
}
