//! `forge run`: a workload run with volumes mounted where only it sees them.
//!
//! The process that owns the data directory (a daemon, or the `forge run` process itself
//! when none does) checks each volume (a sealed one runs trust-check first, and is
//! refused only if it fails; then the contract, with the workload's digest as the
//! workload), enters a private mount namespace on a thread of its own (`unshare`, then
//! `/` made recursively private, so nothing mounted there propagates to the host), mounts
//! each volume there, and starts the command from that thread: the child inherits the
//! namespace, the host sees no mount. The command runs as the client's user and group,
//! in its working directory, with its environment. When it ends, each read-write volume's
//! changes are committed with the workload's DNA, unmounted in the namespace, and the
//! volume is sealed.
//!
//! The workload digest is BLAKE3 over the manifest file's bytes followed by the
//! executable's (`cat app.toml "$(command -v prog)" | b3sum` gives it; with no manifest,
//! the executable's alone).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use forge_crypto::Cid;
use forge_store::contract::Workload;
use serde::Deserialize;

use crate::clock::format_utc_time;
use crate::daemon::host::{Host, MountOptions, MountUse, Mounted};
use crate::error::{NodeError, Result};
use crate::mount::working::commit_with_dna;
use crate::vault::trust::DNA_WORKLOAD;
use crate::vault::{DEFAULT_BRANCH, PassphraseSource};

/// One volume of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMount {
    /// The volume.
    pub volume: String,
    /// Where the workload sees it (absolute; created for the run when missing).
    pub path: PathBuf,
    /// The branch (default `main`).
    pub branch: Option<String>,
    /// Mounted read-only: not committed, not sealed.
    pub read_only: bool,
}

impl RunMount {
    /// Parses `NAME[@BRANCH]:/PATH[:ro]` (`forge run --mount`).
    ///
    /// # Errors
    /// [`NodeError::InvalidArgument`] naming what is wrong.
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = |reason: &str| NodeError::InvalidArgument {
            what: "--mount",
            value: text.to_owned(),
            reason: format!("{reason} (expected NAME[@BRANCH]:/PATH[:ro])"),
        };
        let (volume, rest) = text.split_once(':').ok_or_else(|| invalid("no ':'"))?;
        let (path, read_only) = match rest.strip_suffix(":ro") {
            Some(path) => (path, true),
            None => (rest, false),
        };
        let (volume, branch) = match volume.split_once('@') {
            Some((volume, branch)) => (volume, Some(branch.to_owned())),
            None => (volume, None),
        };
        crate::vault::validate_name("volume name", volume)?;
        if let Some(branch) = &branch {
            crate::vault::validate_name("branch name", branch)?;
        }
        if !path.starts_with('/') {
            return Err(invalid("the path must be absolute"));
        }
        Ok(Self {
            volume: volume.to_owned(),
            path: PathBuf::from(path),
            branch,
            read_only,
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The volumes and where the workload sees them.
    pub mounts: Vec<RunMount>,
    /// The command line; the first is the program (looked up in the environment's PATH
    /// when it has no '/').
    pub command: Vec<OsString>,
    /// The workload's environment (the client's, whole).
    pub environment: Vec<(OsString, OsString)>,
    /// Its working directory (the client's).
    pub working_directory: PathBuf,
    /// The manifest file's bytes.
    pub manifest: Option<Vec<u8>>,
    /// Bytes of decrypted chunks each mount keeps in memory.
    pub cache_bytes: usize,
    /// Who it runs as: the client's user and group (the socket's peer credentials, or
    /// this process's own).
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
}

/// A workload manifest (`--manifest app.toml`): part of the workload's identity (its bytes
/// are in the digest) and of its DNA.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// A name for people (recorded as `workload.name`).
    #[serde(default)]
    pub name: Option<String>,
    /// Environment variables whose values the DNA records (`env.NAME`); the workload gets
    /// the whole environment either way.
    #[serde(default)]
    pub env: Vec<String>,
}

impl Manifest {
    /// Parses a manifest.
    ///
    /// # Errors
    /// [`NodeError::InvalidArgument`] with the TOML error.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(bytes).map_err(|_| NodeError::InvalidArgument {
            what: "manifest",
            value: String::new(),
            reason: "not UTF-8 text".into(),
        })?;
        toml::from_str(text).map_err(|error| NodeError::InvalidArgument {
            what: "manifest",
            value: String::new(),
            reason: error.to_string().trim().replace('\n', " "),
        })
    }
}

/// An input of a running workload (from a remote client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunInput {
    /// Bytes for its stdin.
    Stdin(Vec<u8>),
    /// Its stdin ended.
    StdinClosed,
    /// A signal for it.
    Signal(i32),
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Where the workload's stdio goes.
pub enum RunStdio {
    /// This process's own (a run in the CLI's process).
    Inherit,
    /// Pipes: inputs from a channel, outputs to a function (a run for a remote client).
    Streams {
        /// Stdin bytes, its end and signals.
        input: std::sync::mpsc::Receiver<RunInput>,
        /// Called with each piece of output, in order per stream.
        output: Arc<dyn Fn(RunStream, Vec<u8>) + Send + Sync>,
    },
}

impl std::fmt::Debug for RunStdio {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Self::Inherit => "Inherit",
            Self::Streams { .. } => "Streams",
        })
    }
}

/// What a run did to one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunVolumeOutcome {
    /// The volume.
    pub volume: String,
    /// The branch the run's changes went to (a conflict branch if the branch moved).
    pub branch: String,
    /// The snapshot of its changes (None: nothing changed, or mounted read-only).
    pub snapshot: Option<Cid>,
    /// Whether the volume was sealed.
    pub sealed: bool,
    /// The mount's summary.
    pub summary: String,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// The workload's exit code; 128 + the signal when one ended it.
    pub exit_code: u8,
    /// The signal that ended it (0: it exited).
    pub signal: i32,
    /// The workload digest (hex).
    pub workload: String,
    /// Per volume.
    pub volumes: Vec<RunVolumeOutcome>,
    /// The DNA recorded (without the per-volume I/O fingerprint).
    pub dna: BTreeMap<String, String>,
}

/// What a run says once everything is mounted and the workload started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStarted {
    /// The workload digest (hex).
    pub workload: String,
    /// What is mounted where.
    pub mounted: Vec<String>,
}

/// How the host stops a run (`forge node stop`, SIGTERM to the host): the workload gets
/// SIGTERM; its mounts are committed and unmounted when it ends.
#[derive(Debug, Default)]
pub struct RunStop {
    child: Mutex<Option<i32>>,
    stopping: AtomicBool,
}

impl RunStop {
    /// Asks the workload to end (SIGTERM), or not to start.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.signal(libc::SIGTERM);
    }

    /// Sends `signal` to the workload, if it runs.
    pub fn signal(&self, signal: i32) {
        let child = self
            .child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let (Some(pid), Ok(signal)) = (*child, nix::sys::signal::Signal::try_from(signal)) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    fn set_child(&self, pid: Option<i32>) {
        *self
            .child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = pid;
    }
}

fn run_error(reason: impl Into<String>) -> NodeError {
    NodeError::Run {
        reason: reason.into(),
    }
}

/// The program `program` names, as the workload's environment finds it: a path with '/'
/// relative to `cwd`, else the first executable file of that name in `path` (the
/// environment's PATH; a default when it has none).
///
/// # Errors
/// Not found, or not an executable file.
pub fn resolve_program(program: &OsStr, path: Option<&OsStr>, cwd: &Path) -> Result<PathBuf> {
    let executable = |candidate: &Path| {
        std::fs::metadata(candidate)
            .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
    };
    if program.is_empty() {
        return Err(run_error(
            "no command given (forge run ... -- COMMAND ARGS...)",
        ));
    }
    if program.as_bytes().contains(&b'/') {
        let candidate = cwd.join(program);
        if !executable(&candidate) {
            return Err(run_error(format!(
                "{} is not an executable file",
                candidate.display()
            )));
        }
        return Ok(candidate);
    }
    let path = path.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    for directory in path.as_bytes().split(|byte| *byte == b':') {
        let directory = if directory.is_empty() {
            cwd.to_owned()
        } else {
            cwd.join(OsStr::from_bytes(directory))
        };
        let candidate = directory.join(program);
        if executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(run_error(format!(
        "command {} not found in PATH (a program inside a volume the run mounts cannot be the \
         workload: its digest is checked before the volume is mounted)",
        program.to_string_lossy()
    )))
}

/// The workload digest: BLAKE3 over the manifest's bytes (if any) followed by the
/// executable's.
///
/// # Errors
/// The executable cannot be read.
pub fn workload_digest(manifest: Option<&[u8]>, executable: &Path) -> Result<[u8; 32]> {
    let mut hasher = forge_crypto::Digest256::new();
    if let Some(manifest) = manifest {
        hasher.update(manifest);
    }
    let mut file = std::fs::File::open(executable)
        .map_err(NodeError::io("reading the workload's program", executable))?;
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = file
            .read(&mut buffer)
            .map_err(NodeError::io("reading the workload's program", executable))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher.finalize())
}

/// What a command is as a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadIdentity {
    /// Its program, resolved.
    pub program: PathBuf,
    /// Its manifest (empty without one).
    pub manifest: Manifest,
    /// Its digest.
    pub digest: [u8; 32],
}

/// The workload `program` (with the manifest's bytes, if any) is, as an environment with
/// `path` as PATH, in `cwd`, runs it.
///
/// # Errors
/// As [`resolve_program`] and [`workload_digest`]; a manifest that does not parse.
pub fn identify_workload(
    program: &OsStr,
    path: Option<&OsStr>,
    cwd: &Path,
    manifest: Option<&[u8]>,
) -> Result<WorkloadIdentity> {
    let program = resolve_program(program, path, cwd)?;
    let parsed = manifest
        .map(Manifest::parse)
        .transpose()?
        .unwrap_or_default();
    let digest = workload_digest(manifest, &program)?;
    Ok(WorkloadIdentity {
        program,
        manifest: parsed,
        digest,
    })
}

/// The DNA a run starts with: what is known before the workload runs.
fn starting_dna(
    host: &Host,
    request: &RunRequest,
    manifest: &Manifest,
    digest: &str,
    program: &Path,
    started_ns: i64,
) -> BTreeMap<String, String> {
    let mut dna = BTreeMap::new();
    dna.insert(DNA_WORKLOAD.to_owned(), digest.to_owned());
    if let Some(name) = &manifest.name {
        dna.insert("workload.name".to_owned(), name.clone());
    }
    let command: Vec<String> = request
        .command
        .iter()
        .map(|argument| argument.to_string_lossy().into_owned())
        .collect();
    dna.insert(
        "command".to_owned(),
        serde_json::to_string(&command).unwrap_or_default(),
    );
    dna.insert("program".to_owned(), program.display().to_string());
    for name in &manifest.env {
        if let Some((_, value)) = request
            .environment
            .iter()
            .find(|(key, _)| key.as_bytes() == name.as_bytes())
        {
            dna.insert(format!("env.{name}"), value.to_string_lossy().into_owned());
        }
    }
    dna.insert(
        "node".to_owned(),
        host.vault().identity().node_id().to_hex(),
    );
    dna.insert(
        "user".to_owned(),
        format!("{}:{}", request.uid, request.gid),
    );
    dna.insert("start".to_owned(), format_utc_time(started_ns));
    dna
}

/// Mounts made for a run, unmounted (in the run's namespace) however the run ends.
struct RunMounts {
    mounted: Vec<(RunMount, Mounted)>,
    /// Mount points created for the run, removed after it.
    created: Vec<PathBuf>,
}

impl RunMounts {
    /// Unmounts each (the host's serving thread then commits what is left and ends), and
    /// waits for them.
    fn unmount(&mut self) {
        for (_, mounted) in self.mounted.drain(..) {
            let path = mounted.mountpoint.as_path();
            // Busy (a process the workload left holds a file there): detach it; it ends
            // once that process lets go.
            if nix::mount::umount(path).is_err() {
                let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
            }
            let _ = mounted.served.join();
        }
        for path in self.created.drain(..).rev() {
            let _ = std::fs::remove_dir(path);
        }
    }
}

impl Drop for RunMounts {
    fn drop(&mut self) {
        self.unmount();
    }
}

impl Host {
    /// Runs a workload (see the module's documentation). `started` is told once the
    /// workload started. Returns how it ended; a workload that fails is not an error.
    /// The calling thread enters the run's mount namespace and stays there: call it on a
    /// thread of its own (or the main thread of a process that does nothing else after).
    ///
    /// # Errors
    /// A bad request; a sealed volume whose trust-check fails; a contract refusing the
    /// workload; mount, commit and seal failures.
    pub fn run(
        self: &Arc<Self>,
        request: &RunRequest,
        passphrase: PassphraseSource<'_>,
        stdio: RunStdio,
        started: &dyn Fn(&RunStarted),
    ) -> Result<RunOutcome> {
        // The host serves (a daemon being stopped waits) until this run committed and
        // sealed.
        let _hold = self.hold_for_run();
        if self.stopping() {
            return Err(run_error("the forge process owning the vault is stopping"));
        }
        let vault = self.vault().clone();
        let Some(program) = request.command.first() else {
            return Err(run_error(
                "no command given (forge run ... -- COMMAND ARGS...)",
            ));
        };
        if request.mounts.is_empty() {
            return Err(run_error("no volume to mount (--mount NAME:/PATH)"));
        }
        for (index, mount) in request.mounts.iter().enumerate() {
            if request.mounts[..index]
                .iter()
                .any(|other| other.path == mount.path)
            {
                return Err(run_error(format!(
                    "two volumes mounted at {}",
                    mount.path.display()
                )));
            }
        }
        let path_variable = request
            .environment
            .iter()
            .find(|(name, _)| name == "PATH")
            .map(|(_, value)| value.as_os_str());
        let WorkloadIdentity {
            program,
            manifest,
            digest,
        } = identify_workload(
            program,
            path_variable,
            &request.working_directory,
            request.manifest.as_deref(),
        )?;
        let workload = Workload::Digest(digest);
        let digest_text = workload.text();

        // A sealed volume is trusted again only by a passing trust-check (which lifts the
        // seal); a failing one refuses the run with its report.
        for mount in request.mounts.iter().filter(|mount| !mount.read_only) {
            let record = vault.require_volume(&mount.volume)?;
            if vault.seal_of(&record)?.is_some() {
                let report = vault.trust_check(&mount.volume, passphrase)?;
                crate::service::trust::render_trust_check(
                    &crate::service::trust::trust_check_reply(report),
                )?;
            }
        }

        enter_private_mount_namespace()?;
        let stop = Arc::new(RunStop::default());
        let started_ns = vault.now_ns();
        let base_dna = starting_dna(self, request, &manifest, &digest_text, &program, started_ns);
        let mut mounts = RunMounts {
            mounted: Vec::new(),
            created: Vec::new(),
        };
        for mount in &request.mounts {
            create_mount_point(&mount.path, &mut mounts.created)?;
            let options = MountOptions {
                volume: mount.volume.clone(),
                mountpoint: mount.path.clone(),
                branch: mount.branch.clone(),
                snapshot: None,
                read_only: mount.read_only,
                background: false,
                cache_bytes: request.cache_bytes,
            };
            let mounted = self.mount_as(
                &options,
                passphrase,
                MountUse::Run {
                    workload,
                    dna: base_dna.clone(),
                    stop: stop.clone(),
                },
            )?;
            mounts.mounted.push((mount.clone(), mounted));
        }

        let mut command = std::process::Command::new(&program);
        command
            .arg0(&request.command[0])
            .args(&request.command[1..])
            .env_clear()
            .envs(
                request
                    .environment
                    .iter()
                    .map(|(name, value)| (name, value)),
            )
            .current_dir(&request.working_directory);
        switch_user(&mut command, request.uid, request.gid)?;
        let streams = match stdio {
            RunStdio::Inherit => None,
            RunStdio::Streams { input, output } => {
                command
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped());
                Some((input, output))
            }
        };
        if stop.stopping.load(Ordering::SeqCst) || self.stopping() {
            return Err(run_error("the forge process owning the vault is stopping"));
        }
        let mut child = command
            .spawn()
            .map_err(|error| run_error(format!("starting {}: {error}", program.display())))?;
        stop.set_child(i32::try_from(child.id()).ok());
        started(&RunStarted {
            workload: digest_text.clone(),
            mounted: mounts
                .mounted
                .iter()
                .map(|(_, mounted)| mounted.ready.clone())
                .collect(),
        });
        let status = std::thread::scope(|scope| {
            if let Some((input, output)) = streams {
                let stdin = child.stdin.take();
                let stop = stop.clone();
                // Not scoped: it waits on the client, which may keep its stream open.
                std::thread::spawn(move || feed_input(&input, stdin, &stop));
                if let Some(stdout) = child.stdout.take() {
                    let output = output.clone();
                    scope.spawn(move || pump_output(stdout, RunStream::Stdout, &*output));
                }
                if let Some(stderr) = child.stderr.take() {
                    scope.spawn(move || pump_output(stderr, RunStream::Stderr, &*output));
                }
            }
            child.wait()
        });
        stop.set_child(None);
        let status =
            status.map_err(|error| run_error(format!("waiting for the workload: {error}")))?;
        let (exit_code, signal) = match (status.code(), status.signal()) {
            (Some(code), _) => (u8::try_from(code).unwrap_or(u8::MAX), 0),
            (None, Some(signal)) => (u8::try_from(128 + signal).unwrap_or(u8::MAX), signal),
            (None, None) => (u8::MAX, 0),
        };
        let ended_ns = vault.now_ns();

        let mut dna = base_dna;
        dna.insert("end".to_owned(), format_utc_time(ended_ns));
        dna.insert(
            "exit".to_owned(),
            if signal == 0 {
                exit_code.to_string()
            } else {
                format!("signal {signal}")
            },
        );
        let message = format!(
            "forge run {} ({})",
            dna.get("command").map_or("", String::as_str),
            dna.get("exit").map_or("", String::as_str)
        );
        // Commit each read-write mount with the whole DNA and its own I/O fingerprint
        // before unmounting (what a straggler writes after is committed at unmount with
        // the DNA the mount started with).
        // One per mount, in the request's order (a read-only one commits nothing).
        let mut commits = Vec::with_capacity(mounts.mounted.len());
        for (spec, mounted) in &mounts.mounted {
            if spec.read_only {
                commits.push(None);
                continue;
            }
            let mut volume_dna = dna.clone();
            volume_dna.extend(mounted.fs.io().dna());
            commits.push(commit_with_dna(&mounted.fs, &message, &volume_dna)?);
        }
        mounts.unmount();
        let mut volumes = Vec::new();
        for (spec, outcome) in request.mounts.iter().zip(commits) {
            let branch = spec
                .branch
                .clone()
                .unwrap_or_else(|| DEFAULT_BRANCH.to_owned());
            if spec.read_only {
                volumes.push(RunVolumeOutcome {
                    volume: spec.volume.clone(),
                    branch,
                    snapshot: None,
                    sealed: false,
                    summary: format!("{} was mounted read-only", spec.volume),
                });
                continue;
            }
            let committed_branch = outcome
                .as_ref()
                .map_or(branch.clone(), |outcome| outcome.branch.clone());
            vault.seal_volume(
                &spec.volume,
                &committed_branch,
                &format!(
                    "forge run of workload {digest_text} ended ({})",
                    dna["exit"]
                ),
            )?;
            let summary = match &outcome {
                Some(outcome) => format!(
                    "{}: snapshot {} on branch {}{}, sealed",
                    spec.volume,
                    outcome.snapshot,
                    outcome.branch,
                    if outcome.conflict {
                        " (the branch moved meanwhile: a conflict branch)"
                    } else {
                        ""
                    }
                ),
                None => format!("{}: nothing changed, sealed", spec.volume),
            };
            volumes.push(RunVolumeOutcome {
                volume: spec.volume.clone(),
                branch: committed_branch,
                snapshot: outcome.map(|outcome| outcome.snapshot),
                sealed: true,
                summary,
            });
        }
        Ok(RunOutcome {
            exit_code,
            signal,
            workload: digest_text,
            volumes,
            dna,
        })
    }
}

/// Moves the calling thread into a mount namespace of its own, with every mount private
/// (nothing mounted in it reaches the host's namespace).
fn enter_private_mount_namespace() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(|error| {
        run_error(format!(
            "creating a private mount namespace: {error} (forge run needs root or CAP_SYS_ADMIN in the process that owns the vault)"
        ))
    })?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|error| run_error(format!("making the run's mounts private: {error}")))
}

/// Creates `path` and its missing parents, recording each directory created.
fn create_mount_point(path: &Path, created: &mut Vec<PathBuf>) -> Result<()> {
    let mut missing = Vec::new();
    let mut cursor = Some(path);
    while let Some(directory) = cursor {
        if directory.exists() {
            break;
        }
        missing.push(directory.to_owned());
        cursor = directory.parent();
    }
    for directory in missing.into_iter().rev() {
        std::fs::create_dir(&directory)
            .map_err(NodeError::io("creating the mount point", &directory))?;
        created.push(directory);
    }
    Ok(())
}

/// Makes `command` run as `uid`:`gid` with that user's supplementary groups, when that
/// is not who this process is.
fn switch_user(command: &mut std::process::Command, uid: u32, gid: u32) -> Result<()> {
    if nix::unistd::getuid().as_raw() == uid && nix::unistd::getgid().as_raw() == gid {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(run_error(format!(
            "the workload would run as {uid}:{gid}, and this process is not root"
        )));
    }
    let groups: Vec<libc::gid_t> = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .and_then(|user| {
            let name = std::ffi::CString::new(user.name).ok()?;
            nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid)).ok()
        })
        .map(|groups| groups.into_iter().map(nix::unistd::Gid::as_raw).collect())
        .unwrap_or_else(|| vec![gid]);
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe system calls (setgroups, setgid, setuid) on data prepared before
    // the fork; it allocates nothing. The standard library's own uid switch would drop
    // the supplementary groups (and runs after pre_exec closures could set them).
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Gives the workload a remote client's stdin and signals until the client's stream ends.
fn feed_input(
    input: &std::sync::mpsc::Receiver<RunInput>,
    mut stdin: Option<std::process::ChildStdin>,
    stop: &RunStop,
) {
    while let Ok(message) = input.recv() {
        match message {
            RunInput::Stdin(bytes) => {
                if let Some(pipe) = &mut stdin
                    && pipe.write_all(&bytes).is_err()
                {
                    // The workload closed its stdin: the rest is dropped.
                    stdin = None;
                }
            }
            RunInput::StdinClosed => stdin = None,
            RunInput::Signal(signal) => stop.signal(signal),
        }
    }
}

/// Passes one of the workload's output streams on until it ends.
fn pump_output(
    mut from: impl Read,
    stream: RunStream,
    output: &(dyn Fn(RunStream, Vec<u8>) + Sync),
) {
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => output(stream, buffer[..read].to_vec()),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// `forge run` in this process: the CLI's run when nothing owns the data directory. It
/// owns it for the run (other commands reach it through its control socket meanwhile).
///
/// # Errors
/// As [`Host::run`]; the data directory is busy.
pub fn run_here(
    data_dir: &crate::datadir::DataDir,
    request: &RunRequest,
    passphrase: PassphraseSource<'_>,
) -> Result<RunOutcome> {
    // Before any thread starts: SIGINT/SIGTERM/SIGHUP reach only the thread that hands
    // them to the workload (which gets its own from the terminal, too), so this process
    // always commits and seals.
    crate::daemon::host::block_termination_signals();
    let host = Arc::new(Host::open(data_dir, passphrase)?);
    let control = crate::daemon::control::serve(host.clone())?;
    let stop_on_signal = host.clone();
    std::thread::spawn(move || {
        loop {
            crate::daemon::host::wait_for_termination_signal();
            // The host forwards it as SIGTERM to the run (and unmounts anything else).
            stop_on_signal.unmount_all();
        }
    });
    let outcome = host.run(request, passphrase, RunStdio::Inherit, &|_| {});
    drop(control);
    outcome
}

/// `forge run` through the process that owns the data directory: the request goes over
/// its control socket, this process's stdin and the signals it gets (SIGINT, SIGTERM,
/// SIGHUP) go to the workload, the workload's output comes back here.
///
/// # Errors
/// The run's, as the owner reports them; the owner ending under the run.
pub fn run_remote(
    connection: &crate::service::client::Connection,
    request: &RunRequest,
) -> Result<RunOutcome> {
    use forge_proto::v1::run_input::Input;
    use forge_proto::v1::run_output::Output as Out;
    use forge_proto::v1::{EnvironmentVariable, RunStart};
    // Before any thread starts, so that only the forwarding thread receives them.
    crate::daemon::host::block_termination_signals();
    let start = RunStart {
        mounts: request
            .mounts
            .iter()
            .map(|mount| forge_proto::v1::RunMount {
                volume: mount.volume.clone(),
                path: os_bytes(mount.path.as_os_str()),
                branch: mount.branch.clone(),
                read_only: mount.read_only,
            })
            .collect(),
        command: request.command.iter().map(|part| os_bytes(part)).collect(),
        environment: request
            .environment
            .iter()
            .map(|(name, value)| EnvironmentVariable {
                name: os_bytes(name),
                value: os_bytes(value),
            })
            .collect(),
        working_directory: os_bytes(request.working_directory.as_os_str()),
        manifest: request.manifest.clone(),
        cache_bytes: request.cache_bytes as u64,
    };
    let (sender, inputs) = tokio::sync::mpsc::channel(16);
    let input = |input| forge_proto::v1::RunInput { input: Some(input) };
    sender
        .try_send(input(Input::Start(start)))
        .map_err(|_| run_error("queueing the run's start"))?;
    let stdin_sender = sender.clone();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            match stdin.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => {
                    if stdin_sender
                        .blocking_send(input(Input::Stdin(buffer[..read].to_vec())))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = stdin_sender.blocking_send(input(Input::StdinClosed(true)));
    });
    std::thread::spawn(move || {
        let signals = crate::daemon::host::termination_signals();
        while let Ok(signal) = signals.wait() {
            if sender
                .blocking_send(input(Input::Signal(signal as i32)))
                .is_err()
            {
                return;
            }
        }
    });
    let mut client = forge_proto::v1::run_client::RunClient::new(connection.channel());
    let call = connection.request(tokio_stream::wrappers::ReceiverStream::new(inputs));
    connection.block_on(async {
        let mut outputs = client
            .run(call)
            .await
            .map_err(|status| connection.error_of(&status))?
            .into_inner();
        while let Some(message) = outputs
            .message()
            .await
            .map_err(|status| connection.error_of(&status))?
        {
            match message.output {
                Some(Out::Stdout(bytes)) => {
                    let mut stdout = std::io::stdout().lock();
                    let _ = stdout.write_all(&bytes);
                    let _ = stdout.flush();
                }
                Some(Out::Stderr(bytes)) => {
                    let _ = std::io::stderr().lock().write_all(&bytes);
                }
                Some(Out::Started(_)) | None => {}
                Some(Out::Finished(finished)) => {
                    return Ok(RunOutcome {
                        exit_code: u8::try_from(finished.exit_code).unwrap_or(u8::MAX),
                        signal: finished.signal,
                        workload: finished.workload,
                        volumes: finished
                            .volumes
                            .into_iter()
                            .map(|volume| RunVolumeOutcome {
                                volume: volume.volume,
                                branch: volume.branch,
                                snapshot: Cid::from_slice(&volume.snapshot).ok(),
                                sealed: volume.sealed,
                                summary: volume.summary,
                            })
                            .collect(),
                        dna: finished.dna.into_iter().collect(),
                    });
                }
            }
        }
        Err(run_error(
            "the process owning the vault ended the run without saying how it ended",
        ))
    })
}

/// Reads `from` to its end for a manifest.
///
/// # Errors
/// The file cannot be read.
pub fn read_manifest(from: &Path) -> Result<Vec<u8>> {
    std::fs::read(from).map_err(NodeError::io("reading the manifest", from))
}

/// The command line as raw bytes, and back (what the control socket carries).
#[must_use]
pub fn os_bytes(text: &OsStr) -> Vec<u8> {
    text.as_bytes().to_vec()
}

/// See [`os_bytes`].
#[must_use]
pub fn os_string(bytes: Vec<u8>) -> OsString {
    OsString::from_vec(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The workload runs as the client: uid, gid and that user's groups (the tests run as
    /// root, as the daemon does; elsewhere there is nothing to switch).
    #[test]
    fn a_workload_runs_as_the_client_with_its_groups() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let id = |flag: &str, uid: u32, gid: u32| {
            let mut command = std::process::Command::new("id");
            command.arg(flag);
            switch_user(&mut command, uid, gid).unwrap();
            let output = command.output().unwrap();
            assert!(output.status.success(), "{output:?}");
            String::from_utf8(output.stdout).unwrap().trim().to_owned()
        };
        // nobody:nogroup, whose only group is nogroup.
        assert_eq!(id("-u", 65534, 65534), "65534");
        assert_eq!(id("-g", 65534, 65534), "65534");
        assert_eq!(id("-G", 65534, 65534), "65534");
        // A uid with no user: its group alone.
        assert_eq!(id("-G", 4242, 4343), "4343");
        // Who this process is: nothing switched.
        assert_eq!(id("-u", 0, 0), "0");
    }

    #[test]
    fn mount_arguments_parse_and_bad_ones_say_why() {
        assert_eq!(
            RunMount::parse("data:/data").unwrap(),
            RunMount {
                volume: "data".into(),
                path: "/data".into(),
                branch: None,
                read_only: false
            }
        );
        assert_eq!(
            RunMount::parse("data@nightly:/srv/in:ro").unwrap(),
            RunMount {
                volume: "data".into(),
                path: "/srv/in".into(),
                branch: Some("nightly".into()),
                read_only: true
            }
        );
        for bad in ["data", "data:relative", ":/x", "da ta:/x", "data@:/x"] {
            assert!(RunMount::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_manifest_parses_and_refuses_unknown_keys() {
        let manifest = Manifest::parse(b"name = \"etl\"\nenv = [\"LANG\", \"TZ\"]\n").unwrap();
        assert_eq!(manifest.name.as_deref(), Some("etl"));
        assert_eq!(manifest.env, vec!["LANG", "TZ"]);
        let error = Manifest::parse(b"nmae = \"etl\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("nmae"), "{error}");
        assert!(Manifest::parse(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn the_digest_covers_the_manifest_then_the_program() {
        let temp = tempfile::tempdir().unwrap();
        let program = temp.path().join("prog");
        std::fs::write(&program, b"#!/bin/sh\necho hi\n").unwrap();
        let bare = workload_digest(None, &program).unwrap();
        assert_eq!(bare, *blake3::hash(b"#!/bin/sh\necho hi\n").as_bytes());
        let with = workload_digest(Some(b"name = \"x\"\n"), &program).unwrap();
        assert_eq!(
            with,
            *blake3::hash(b"name = \"x\"\n#!/bin/sh\necho hi\n").as_bytes()
        );
        std::fs::write(&program, b"#!/bin/sh\necho ho\n").unwrap();
        assert_ne!(workload_digest(None, &program).unwrap(), bare);
    }

    #[test]
    fn programs_resolve_through_path_and_relative_to_the_working_directory() {
        let temp = tempfile::tempdir().unwrap();
        let bin = temp.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let tool = bin.join("tool");
        std::fs::write(&tool, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = bin.join("plain");
        std::fs::write(&plain, b"data").unwrap();
        let path = OsString::from(format!("/nonexistent:{}", bin.display()));
        assert_eq!(
            resolve_program(OsStr::new("tool"), Some(&path), temp.path()).unwrap(),
            tool
        );
        assert_eq!(
            resolve_program(OsStr::new("bin/tool"), None, temp.path()).unwrap(),
            tool
        );
        assert!(resolve_program(OsStr::new("plain"), Some(&path), temp.path()).is_err());
        assert!(resolve_program(OsStr::new("bin/plain"), None, temp.path()).is_err());
        let error = resolve_program(OsStr::new("nope"), Some(&path), temp.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("not found in PATH"), "{error}");
    }
}
