//! The daemon: the process layer. `forge node start` and `forge node stop` (here): a
//! long-lived forge process that owns the data directory, hosts every mount and serves the
//! control socket until it is stopped (a mount started without one makes a host that exits
//! after its last unmount). Here: the detached start, the record other commands find it by
//! ([`crate::owner`]), readiness; [`host`]: the open vault and its mounts, signals;
//! [`control`]: the typed API served on the socket; [`metrics`]: /metrics.
//!
//! The API socket is `DATA_DIR/control.sock`, as for a mount host; the only network
//! listener is /metrics (`--metrics-listen`).

pub mod cluster;
pub mod control;
pub mod groups;
pub mod host;
pub mod mesh;
pub mod metrics;
pub mod run;

use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::datadir::DataDir;
use crate::error::{NodeError, Result};
use crate::owner::{owner, process_alive, record_path, write_record};
use crate::vault::PassphraseSource;
use host::Host;

/// Environment variable marking the detached child of `forge node start`.
const DAEMON_CHILD_ENV: &str = "FORGE_DAEMON_CHILD";
/// First word of the line the daemon prints once it serves.
const READY_WORD: &str = "started";

/// Where a daemon started in the background writes its log.
#[must_use]
pub fn log_path(data_dir: &DataDir) -> PathBuf {
    data_dir.path().join("logs").join("daemon.log")
}

/// Starts the daemon. In the foreground this process serves until stopped (`forge node
/// stop`, SIGINT, SIGTERM) and returns its last line; otherwise a detached child serves,
/// logging to [`log_path`], and this returns once it does.
///
/// # Errors
/// A forge process already owns the data directory; the vault cannot be opened; the
/// socket cannot be created.
pub fn start(
    data_dir: &DataDir,
    foreground: bool,
    metrics_listen: Option<std::net::SocketAddr>,
    listen: Option<&str>,
    passphrase: PassphraseSource<'_>,
) -> Result<String> {
    if let Some(pid) = owner(data_dir)? {
        return Err(NodeError::Busy {
            what: data_dir.path().display().to_string(),
            reason: format!(
                "forge process {pid} already owns it (`forge node status` shows it, `forge node stop` stops it)"
            ),
        });
    }
    if !foreground && std::env::var_os(DAEMON_CHILD_ENV).is_none() {
        let mut arguments = vec![
            OsString::from("node"),
            "start".into(),
            "--foreground".into(),
            "--metrics-listen".into(),
            metrics_listen
                .map_or_else(|| "off".to_owned(), |address| address.to_string())
                .into(),
        ];
        if let Some(listen) = listen {
            arguments.extend(["--listen".into(), listen.into()]);
        }
        return match spawn_detached(
            data_dir,
            &arguments,
            (DAEMON_CHILD_ENV, "1"),
            &log_path(data_dir),
            READY_WORD,
        )? {
            Detached::Ready(line) => Ok(line),
            Detached::Failed { status, reason } => Err(NodeError::DaemonFailed {
                status,
                reason,
                log: log_path(data_dir),
            }),
        };
    }
    // Before any thread starts: every thread inherits the mask, so the signals reach
    // only the thread that stops the host.
    host::block_termination_signals();
    let host = Arc::new(Host::open(data_dir, passphrase)?);
    host.keep_running();
    // Bound before anything is announced: a busy port fails the start, naming it.
    if let Some(address) = metrics_listen {
        let listener = metrics::bind(address)?;
        let bound = listener
            .local_addr()
            .map_err(NodeError::io("reading the address of", address.to_string()))?;
        host.set_metrics_address(bound);
        metrics::serve(listener, Arc::downgrade(&host));
    }
    // The peer listener: given on the command line, else forge.toml's (or the default).
    let (listen, configured) = match listen {
        Some(text) => (
            crate::config::parse_mesh_listen(text).map_err(|reason| {
                NodeError::InvalidArgument {
                    what: "--listen",
                    value: text.to_owned(),
                    reason,
                }
            })?,
            true,
        ),
        None => {
            let config = crate::config::NodeConfig::load(data_dir)?;
            (config.listen, config.listen_configured)
        }
    };
    if let Some(listen) = &listen {
        host.start_mesh(listen, configured)?;
    }
    let control = control::serve(host.clone())?;
    let pid = std::process::id();
    write_record(data_dir, pid)?;
    let node_id = host.vault().identity().node_id().to_hex();
    let socket = crate::owner::socket_path(data_dir);
    {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(
            stdout,
            "{READY_WORD} node {node_id} (pid {pid}), socket {}",
            socket.display()
        );
        let _ = stdout.flush();
    }
    notify_service_manager("READY=1");
    tracing::info!(pid, "daemon serving {}", data_dir.path().display());
    let signalled = host.clone();
    std::thread::spawn(move || {
        host::wait_for_termination_signal();
        signalled.stop();
    });
    let _ = host.wait_until_idle(control);
    notify_service_manager("STOPPING=1");
    let pending = host.take_pending_summaries();
    drop(host);
    // Commands stop forwarding here once the record is gone; the vault is released at
    // exit, as for a mount host.
    let _ = std::fs::remove_file(record_path(data_dir));
    for (id, text) in pending {
        host::publish_summary(data_dir, id, &text);
    }
    tracing::info!(pid, "daemon stopped");
    Ok(format!("stopped node {node_id} (pid {pid})"))
}

/// Tells systemd (a `Type=notify` unit sets `NOTIFY_SOCKET`) how the daemon is doing:
/// `READY=1` once it serves, `STOPPING=1` once its mounts are committed, just before it
/// closes and exits. Without the variable,
/// nothing. Best effort: a service manager that does not listen changes nothing here.
fn notify_service_manager(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sender) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = socket.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket (systemd's usual choice).
        <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            name,
        )
        .and_then(|address| sender.send_to_addr(state.as_bytes(), &address))
    } else {
        sender.send_to(state.as_bytes(), &socket)
    };
    if let Err(error) = sent {
        tracing::warn!(%error, "telling the service manager {state}");
    }
}

/// Stops the process that owns `data_dir` (a daemon, or a mount host): it unmounts and
/// commits every mount, closes the vault and exits; this waits for it up to `timeout`.
///
/// # Errors
/// None runs; it has not exited in time (naming what it was unmounting).
pub fn stop(data_dir: &DataDir, timeout: Duration) -> Result<String> {
    use crate::service::NodeService as _;
    let Some(connection) = crate::service::client::Connection::open(data_dir)? else {
        return Err(NodeError::NoDaemon {
            data_dir: data_dir.path().to_owned(),
        });
    };
    let reply = crate::service::remote::RemoteApi::new(&connection)
        .stop(forge_proto::v1::StopNodeRequest {})?;
    let doing = crate::service::describe_stop(&reply);
    let pid = reply.pid;
    let deadline = std::time::Instant::now() + timeout;
    while process_alive(pid) {
        if std::time::Instant::now() >= deadline {
            return Err(NodeError::StopTimedOut {
                pid,
                seconds: timeout.as_secs(),
                waiting_for: doing,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Gone, and its files closed: a process is seen exited (a zombie) while its last
    // threads may still hold the data directory's lock and its database's for a moment;
    // the next opener must not find them held. (Still held after a few seconds: another
    // process took the lock since, which is no business of this stop.)
    let released_by = std::time::Instant::now() + Duration::from_secs(5);
    while data_dir_locked(data_dir) && std::time::Instant::now() < released_by {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(format!("stopped forge process {pid}; {doing}"))
}

/// Whether some process holds the data directory's lock now.
fn data_dir_locked(data_dir: &DataDir) -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .open(data_dir.path().join("lock"))
        .is_ok_and(|lock| lock.try_lock().is_err())
}

/// How a detached child ended its start.
#[derive(Debug)]
pub(crate) enum Detached {
    /// Its ready line, with its pid appended.
    Ready(String),
    /// It exited first: its status and the last line of its log.
    Failed { status: String, reason: String },
}

/// Runs `forge ARGUMENTS` as a detached child (own process group, stdin closed, stderr
/// appended to `log`, `marker` set in its environment) and waits for its first line:
/// ready when it starts with `ready_word`.
pub(crate) fn spawn_detached(
    data_dir: &DataDir,
    arguments: &[OsString],
    marker: (&str, &str),
    log: &Path,
    ready_word: &str,
) -> Result<Detached> {
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent).map_err(NodeError::io("creating", parent))?;
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(NodeError::io("opening", log))?;
    let exe = std::env::current_exe().map_err(NodeError::io("finding", "the forge binary"))?;
    let mut command = Command::new(exe);
    command
        .args(arguments)
        .env(marker.0, marker.1)
        .env("FORGE_DATA_DIR", data_dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file));
    // Its own process group: a Ctrl-C in the shell that started it does not stop it.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command
        .spawn()
        .map_err(NodeError::io("starting", "a detached forge process"))?;
    let stdout = child.stdout.take().ok_or_else(|| {
        NodeError::io("reading", "a detached forge process's output")(std::io::Error::other(
            "its standard output is not a pipe",
        ))
    })?;
    let mut line = String::new();
    let _ = std::io::BufReader::new(stdout).read_line(&mut line);
    if line.starts_with(ready_word) {
        let line = line.trim_end();
        return Ok(Detached::Ready(if line.contains("(pid ") {
            line.to_owned()
        } else {
            format!("{line} (pid {})", child.id())
        }));
    }
    let status = child
        .wait()
        .map_err(NodeError::io("waiting for", "a detached forge process"))?;
    let log_text = std::fs::read_to_string(log).unwrap_or_default();
    let reason = log_text
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("no output")
        .trim_start_matches("forge: ")
        .to_owned();
    Ok(Detached::Failed {
        status: status.to_string(),
        reason,
    })
}
