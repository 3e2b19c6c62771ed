//! Who owns a data directory: the records a daemon or mount host leaves there (the daemon
//! record, one file per running mount), the control socket's place, and whether their
//! processes still run. Both sides read these: the client to find the owner, the daemon to
//! register itself. Nothing here opens the vault.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::datadir::DataDir;
use crate::error::{NodeError, Result};

/// The socket's file name in the data directory.
pub const SOCKET_FILE: &str = "control.sock";

/// Where the control socket of `data_dir` is.
#[must_use]
pub fn socket_path(data_dir: &DataDir) -> PathBuf {
    data_dir.path().join(SOCKET_FILE)
}

/// What a running daemon leaves in the data directory for other commands to find it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonRecord {
    /// Format of this record.
    pub version: u32,
    /// The daemon's process id.
    pub pid: u32,
}

const DAEMON_RECORD_VERSION: u32 = 1;

pub(crate) fn record_path(data_dir: &DataDir) -> PathBuf {
    data_dir.path().join("daemon.json")
}

/// The daemon serving `data_dir`, if one runs. A record left by a process that died (or
/// one this version cannot read) is removed.
#[must_use]
pub fn running(data_dir: &DataDir) -> Option<DaemonRecord> {
    let path = record_path(data_dir);
    let text = std::fs::read_to_string(&path).ok()?;
    match serde_json::from_str::<DaemonRecord>(&text) {
        Ok(record) if record.version == DAEMON_RECORD_VERSION && process_alive(record.pid) => {
            Some(record)
        }
        _ => {
            let _ = std::fs::remove_file(&path);
            None
        }
    }
}

/// The pid of the process that owns `data_dir` (daemon or mount host), if one runs.
pub(crate) fn owner(data_dir: &DataDir) -> Result<Option<u32>> {
    if let Some(record) = running(data_dir) {
        return Ok(Some(record.pid));
    }
    Ok(running_mounts(data_dir)?.first().map(|mount| mount.pid))
}

pub(crate) fn write_record(data_dir: &DataDir, pid: u32) -> Result<()> {
    let path = record_path(data_dir);
    let partial = path.with_extension("json.partial");
    let text = serde_json::json!({"version": DAEMON_RECORD_VERSION, "pid": pid}).to_string();
    std::fs::write(&partial, text).map_err(NodeError::io("writing", &partial))?;
    std::fs::rename(&partial, &path).map_err(NodeError::io("writing", &path))
}

/// A registered running mount.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountRecord {
    /// The serving process.
    pub pid: u32,
    /// The mount's number within that process.
    pub id: u64,
    /// Volume name.
    pub volume: String,
    /// Branch (None for a snapshot mount).
    pub branch: Option<String>,
    /// Mount point (absolute).
    pub mountpoint: PathBuf,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Bytes of decrypted chunks it keeps in memory (0 in records of older versions).
    #[serde(default)]
    pub cache_bytes: usize,
    /// A `forge run`'s mount: in that run's mount namespace, not the host's (`forge volume
    /// unmount` never means it; it ends with its run).
    #[serde(default)]
    pub private: bool,
}

pub(crate) fn registry_dir(data_dir: &DataDir) -> PathBuf {
    data_dir.path().join("mounts")
}

/// Whether process `pid` runs. A zombie does not: a killed daemon whose parent has not
/// reaped it (an init that never waits) would otherwise own its data directory forever.
pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // Signal "none" only checks that the process exists (EPERM: it does, as another
    // user's).
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => {}
        Err(_) => return false,
    }
    // /proc/PID/stat: "PID (COMMAND) STATE ...", COMMAND may hold spaces and parentheses.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z" && state != "X")
    })
}

/// Running mounts of this data directory (stale records of dead processes are removed).
///
/// # Errors
/// I/O errors reading the registry.
pub fn running_mounts(data_dir: &DataDir) -> Result<Vec<MountRecord>> {
    let dir = registry_dir(data_dir);
    let mut mounts = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(mounts);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|extension| extension != "json") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        match serde_json::from_str::<MountRecord>(&text) {
            Ok(record) if process_alive(record.pid) => mounts.push(record),
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(mounts)
}
