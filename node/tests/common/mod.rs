//! What the end-to-end test binaries share: a fresh vault in a temporary directory and
//! the `forge` binary run against it.

// Each test binary uses a part of this.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;
use serde_json::Value;

/// A vault initialised in a temporary directory (removed on drop).
pub struct Vault {
    _temp: tempfile::TempDir,
    /// The temporary directory; the vault is its `vault/` subdirectory.
    pub root: PathBuf,
}

impl Vault {
    /// A new, initialised vault.
    pub fn new() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().to_owned();
        let vault = Self { _temp: temp, root };
        vault.ok(&["init"]);
        vault
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("vault")
    }

    /// `forge ARGS` on this vault, with no passphrase and no log settings inherited.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::cargo_bin("forge").unwrap();
        command
            .env_remove("FORGE_PASSPHRASE")
            .env_remove("RUST_LOG")
            .env("FORGE_DATA_DIR", self.data_dir())
            .args(args);
        command
    }

    /// Runs `forge ARGS`, whatever its outcome.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs `forge ARGS`, which must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "forge {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Runs `forge ARGS --json`, which must succeed; returns the parsed output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        serde_json::from_str(&self.ok(&args)).unwrap()
    }

    /// A path in the temporary directory, beside the vault.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

/// A seeded xorshift stream: test data that is the same on every run.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// The pid in a `forge node start` line (`started node ID (pid N), socket ...`).
pub fn started_pid(line: &str) -> u32 {
    line.split("(pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

/// Kills a daemon a test started, whatever the test did (SIGKILL: a test that failed
/// half-way must not leave it running).
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .output();
    }
}

/// Reads `http://ADDRESS/metrics` and returns the sample lines by series (name and labels).
pub fn scrape(address: &str) -> std::collections::BTreeMap<String, f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Runs forge `args` on `vault`, kills the daemon `pid` with SIGKILL `after` the command
/// started, and returns the command's output once the daemon is gone (or a zombie, which
/// no command counts as alive). A command the kill interrupted must say the process ended
/// and nothing was acknowledged, not print a transport error.
pub fn kill_daemon_during(
    vault: &Vault,
    args: &[&str],
    pid: u32,
    after: std::time::Duration,
) -> Output {
    let command = std::process::Command::new(assert_cmd::cargo::cargo_bin("forge"))
        .args(args)
        .env("FORGE_DATA_DIR", vault.data_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let output = command.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!(
        "{args:?} interrupted: {}, {stderr}",
        !output.status.success()
    );
    if !output.status.success() {
        assert!(
            stderr.contains(&format!("forge process {pid} owning"))
                && stderr.contains("ended before the command finished"),
            "{stderr}"
        );
    }
    while std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.contains(") Z "))
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    output
}

/// A channel to a daemon's control socket, as a raw gRPC client (not the CLI) opens one.
pub async fn control_channel(socket: &std::path::Path) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("unix://{}", socket.display()))
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|error| panic!("connecting to {}: {error}", socket.display()))
}

/// `message` as a request carrying this forge's version, as every call must.
pub fn versioned<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        forge_proto::VERSION_METADATA,
        tonic::metadata::MetadataValue::from_static(env!("CARGO_PKG_VERSION")),
    );
    request
}

/// Every event of a streamed call, in order, until the stream ends (a status fails the
/// test).
pub async fn drain<T>(response: tonic::Response<tonic::Streaming<T>>) -> Vec<T> {
    let mut stream = response.into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        events.push(event);
    }
    events
}

/// Fails unless the trees at `a` and `b` are the same (`diff -r`).
pub fn same_tree(a: &Path, b: &Path) {
    let output = std::process::Command::new("diff")
        .arg("-r")
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// A vault whose daemon listens on a loopback port of its own.
pub struct Site {
    pub vault: Vault,
    pub daemon: Option<KillOnDrop>,
    pub id: String,
    pub metrics: String,
    /// Its peer port (0 until it first listened).
    pub port: String,
}

impl Site {
    pub fn start() -> Self {
        let vault = Vault::new();
        let id = vault.json(&["node", "id"])["node_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut site = Self {
            vault,
            daemon: None,
            id,
            metrics: String::new(),
            port: "0".to_owned(),
        };
        site.restart();
        site
    }

    /// Starts (again) its daemon, on the port it had (peers remember it).
    pub fn restart(&mut self) {
        let _ = self.vault.run(&["node", "stop"]);
        let listen = format!("/ip4/127.0.0.1/udp/{}/quic-v1", self.port);
        let line = self.vault.ok(&[
            "node",
            "start",
            "--metrics-listen",
            "127.0.0.1:0",
            "--listen",
            &listen,
        ]);
        self.daemon = Some(KillOnDrop(started_pid(&line)));
        self.metrics = self.vault.json(&["node", "status"])["metrics_address"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.port = self
            .address()
            .split("/udp/")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap()
            .to_owned();
    }

    pub fn address(&self) -> String {
        self.vault.json(&["node", "addr"])["addresses"][0]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Adds `other` as a peer named `name`.
    pub fn meet(&self, other: &Site, name: &str) {
        let added = self.vault.json(&[
            "peer",
            "add",
            &other.address(),
            "--name",
            name,
            "--expect",
            &other.id,
        ]);
        assert_eq!(added["node_id"], other.id.as_str());
    }

    pub fn sync(&self, volume: &str, peer: &str) -> Value {
        self.vault.json(&["volume", "sync", volume, "--peer", peer])
    }

    pub fn dir_bytes(&self) -> u64 {
        fn walk(path: &Path) -> u64 {
            std::fs::read_dir(path).map_or(0, |entries| {
                entries
                    .flatten()
                    .map(|entry| match entry.metadata() {
                        Ok(meta) if meta.is_dir() => walk(&entry.path()),
                        Ok(meta) => meta.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
        }
        walk(&self.vault.data_dir())
    }
}

/// Documents: text of a few KiB each (what ransomware goes after).
pub fn write_documents(root: &Path, count: usize) {
    fs::create_dir_all(root).unwrap();
    for index in 0..count {
        let line = format!(
            "Document {index}: minutes of the meeting, budget line {}, notes and names.\n",
            index * 37
        );
        fs::write(
            root.join(format!("doc-{index:03}.txt")),
            line.repeat(100 + index % 50),
        )
        .unwrap();
    }
}

/// Bytes that look encrypted (a xorshift keystream over the content).
pub fn encrypt(content: &[u8], seed: u64) -> Vec<u8> {
    let mut next = xorshift(seed);
    content
        .iter()
        .map(|byte| byte ^ next().to_le_bytes()[0])
        .collect()
}

/// Encrypts every document under `root` as ransomware does, until the file system
/// refuses; returns the files it damaged (their content no longer the original).
pub fn ransomware(root: &Path, rename: bool, copy_then_delete: bool) -> usize {
    let mut names: Vec<PathBuf> = fs::read_dir(root)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    names.sort();
    let mut damaged = 0;
    for (index, path) in names.iter().enumerate() {
        let Ok(content) = fs::read(path) else { break };
        let locked = path.with_extension("txt.locked");
        let result = if copy_then_delete {
            fs::write(&locked, encrypt(&content, index as u64 + 1))
                .and_then(|()| fs::remove_file(path))
        } else {
            fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|mut file| file.write_all(&encrypt(&content, index as u64 + 1)))
                .and_then(|()| {
                    if rename {
                        fs::rename(path, &locked)
                    } else {
                        Ok(())
                    }
                })
        };
        match result {
            Ok(()) => damaged += 1,
            Err(error) => {
                // EROFS: the volume froze.
                assert_eq!(error.raw_os_error(), Some(30), "{error}");
                // An in-place write refused at its first block leaves the file whole.
                break;
            }
        }
    }
    damaged
}

/// Whether FUSE mounts can be tested here (/dev/fuse and fusermount3). Without them a
/// mount test fails, unless a person sets FORGE_SKIP_FUSE=1 (CI never does).
pub fn fuse_available() -> bool {
    let available = Path::new("/dev/fuse").exists()
        && std::process::Command::new("fusermount3")
            .arg("-V")
            .output()
            .is_ok();
    if !available && std::env::var("FORGE_SKIP_FUSE").as_deref() != Ok("1") {
        panic!(
            "FUSE is not available (need /dev/fuse and fusermount3); set FORGE_SKIP_FUSE=1 to skip"
        );
    }
    available
}
