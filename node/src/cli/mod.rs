//! The `forge` command line: the arguments (here), what runs them (`run`: the typed
//! commands through the service, in this process or on the daemon) and the commands that
//! need no vault (`local`: version, init, node id and config).

mod local;
mod run;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{NodeConfig, parse_size};
use crate::datadir::DataDir;
use crate::error::{NodeError, Result};
pub use crate::output::Output;
use forge_store::erasure::ErasureLayout;
pub use run::render_run;

/// Forge Vault: deduplicated, encrypted, erasure-coded storage for edge sites.
///
/// With no cluster configured, forge runs as a single embedded vault in its data directory.
#[derive(Debug, Parser)]
#[command(
    name = "forge",
    version,
    propagate_version = true,
    disable_version_flag = false
)]
pub struct Cli {
    /// The data directory [default: $FORGE_DATA_DIR, else ~/.local/share/forge].
    #[arg(
        long,
        global = true,
        env = "FORGE_DATA_DIR",
        value_name = "DIR",
        hide_env = true
    )]
    pub data_dir: Option<PathBuf>,

    /// Machine-readable output: JSON on stdout; errors as one JSON line on stderr.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the version of forge and of the formats it reads and writes.
    Version,
    /// Create a new vault: the data directory, its format marker and this node's keys.
    Init(InitArgs),
    /// This node's identity.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Volumes: create, list, import, export, statistics.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Snapshots of a volume.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Transfer proofs: receipts of syncs, signed by both sides.
    #[command(subcommand)]
    Proof(ProofCommand),
    /// Other vaults: add them, list them, trust them with volumes.
    #[command(subcommand)]
    Peer(PeerCommand),
    /// The cluster of vaults at this site: form it, join it, see it, leave it.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Volume groups: Raft groups of cluster members that keep volumes together.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Volume contracts: the signed policy checked before every mount.
    #[command(subcommand)]
    Contract(ContractCommand),
    /// Run a command with volumes mounted where only it sees them (a private mount
    /// namespace), after checking their contracts against its digest; its DNA goes into
    /// each read-write volume's snapshot, and each is sealed when it ends. Exits with the
    /// command's exit status.
    Run(RunArgs),
    /// Statistics of the whole vault (bytes on disk).
    Stats,
    /// Verify every object, shard and reference (exit 3 when something is wrong).
    Fsck {
        /// List every problem (by default: a count per volume and snapshot, and the first
        /// few; --json always lists all).
        #[arg(long)]
        verbose: bool,
    },
    /// Remove chunks and objects no snapshot reaches; report the bytes freed.
    Gc,
    /// Verify every chunk; with --repair, rebuild damaged shards from parity.
    Scrub {
        /// Rewrite damaged shards rebuilt from parity.
        #[arg(long)]
        repair: bool,
    },
}

/// `forge volume ...`
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume.
    Create {
        /// Its name: letters, digits, '.', '_', '-'.
        name: String,
        /// Erasure layout K+M: K data and M parity shards per chunk (default 1+0).
        #[arg(long, value_name = "K+M")]
        ec: Option<ErasureLayout>,
        /// Dedup domain (default: the vault's default domain; a new name creates one;
        /// "public" is the shared public domain).
        #[arg(long, value_name = "D")]
        domain: Option<String>,
        /// Average chunk size of a new domain (e.g. 64K, 1M).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        chunk_avg: Option<u32>,
        /// Wrap the volume's keys to a passphrase (FORGE_PASSPHRASE or prompted), in a
        /// dedup domain of its own: the host cannot read it without you.
        #[arg(long)]
        encrypted: bool,
        /// Create it in this volume group (`forge group create`): its records replicated by
        /// the group's Raft, each chunk's shards spread over the group's members by the
        /// group's layout. Needs the daemon.
        #[arg(long, value_name = "GROUP", conflicts_with_all = ["ec", "domain", "chunk_avg", "encrypted"])]
        group: Option<String>,
    },
    /// List volumes.
    List,
    /// Import a directory as a new snapshot.
    Import {
        /// The volume.
        name: String,
        /// The directory to import.
        source: PathBuf,
        /// Snapshot message.
        #[arg(short = 'm', long = "message", default_value = "")]
        message: String,
        /// Branch to move (default main).
        #[arg(long, default_value = "main")]
        branch: String,
        /// DNA fingerprint of the producing workload, KEY=VALUE (repeatable).
        #[arg(long, value_name = "KEY=VALUE", value_parser = parse_key_value)]
        dna: Vec<(String, String)>,
        /// Keep access times too (reading the source changes them, so a re-import stores
        /// every directory read since anew).
        #[arg(long)]
        atime: bool,
    },
    /// Export a snapshot into an empty or absent directory.
    Export {
        /// The volume.
        name: String,
        /// Destination directory (empty or absent).
        destination: PathBuf,
        /// Snapshot id (or unique prefix of 8+ characters).
        #[arg(long, conflicts_with = "branch")]
        snapshot: Option<String>,
        /// Branch whose head to export (default main).
        #[arg(long)]
        branch: Option<String>,
        /// Restore owners by their recorded ids, not by the user and group names this
        /// machine has (as root; a normal user's export leaves files its own).
        #[arg(long)]
        numeric_owner: bool,
    },
    /// Statistics of a volume.
    Stats {
        /// The volume.
        name: String,
    },
    /// Mount a branch read-write (default main), or a snapshot read-only, with FUSE.
    ///
    /// In the foreground it stays until unmounted (Ctrl-C or SIGTERM unmount cleanly);
    /// unmounting commits the changes as a snapshot.
    Mount {
        /// The volume.
        name: String,
        /// An existing directory to mount on.
        mountpoint: PathBuf,
        /// The branch to mount (read-write unless --read-only).
        #[arg(long, conflicts_with = "snapshot")]
        branch: Option<String>,
        /// A snapshot to mount read-only (id or unique prefix).
        #[arg(long)]
        snapshot: Option<String>,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// Return once mounted; a background process serves it until unmounted.
        #[arg(long)]
        background: bool,
        /// Memory for decrypted chunks (e.g. 256M; default: forge.toml's
        /// mount.cache_size, 256M without one).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        cache_size: Option<u32>,
    },
    /// Unmount a forge mount, waiting until its changes are committed.
    Unmount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Sync a volume with a peer: push it (default) or pull it, sending only what the
    /// receiver lacks; both sides keep a signed transfer proof. Needs the daemon.
    Sync {
        /// The volume (its name here; with --pull, its name at the peer).
        name: String,
        /// The peer: a name from `forge peer list`, a NodeId, or a multiaddr.
        #[arg(long)]
        peer: String,
        /// Pull from the peer instead of pushing to it.
        #[arg(long)]
        pull: bool,
        /// The branch (default main).
        #[arg(long, default_value = "main")]
        branch: String,
        /// The volume's name at the receiver if it is new there.
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
    },
    /// Follow a peer's branch: pulled now, then each time the peer announces a new head
    /// (and when the daemon starts). The peer must trust this node to read the volume.
    Follow {
        /// The volume's name at the peer.
        name: String,
        /// The peer: a name from `forge peer list` or a NodeId.
        #[arg(long)]
        peer: String,
        /// The branch (default main).
        #[arg(long, default_value = "main")]
        branch: String,
        /// Its name here if it is new here.
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
    },
    /// Stop sharing a volume with a node: its envelope is dropped and the volume key
    /// rotated, so snapshots made from now on are sealed with a key it does not get. It
    /// keeps what it could read before (older snapshots; for a writer, the domain key).
    Unshare {
        /// The volume.
        name: String,
        /// The node: a peer's name or NodeId.
        #[arg(long)]
        from: String,
    },
    /// Challenge a peer to prove it holds the volume: random byte ranges of random chunks
    /// of the branch's head, proved against their cids without downloading them (exit 3
    /// when a chunk fails).
    Audit {
        /// The volume.
        name: String,
        /// The peer.
        #[arg(long)]
        peer: String,
        /// Chunks to sample (all of them when at least their number).
        #[arg(long, default_value_t = 32)]
        samples: u32,
        /// The branch whose head is audited (default main).
        #[arg(long, default_value = "main")]
        branch: String,
    },
    /// Stop following a peer's branch.
    Unfollow {
        /// The volume's name at the peer.
        name: String,
        /// The peer.
        #[arg(long)]
        peer: String,
        /// The branch (default main).
        #[arg(long, default_value = "main")]
        branch: String,
    },
    /// Verify a volume: the signature chain of every snapshot, its contract (signature,
    /// signer's write rights, expiry, the DNA of every snapshot made under it), its seal
    /// and its anomaly flags. Prints each check; exit 3 naming the first failure. Passing
    /// lifts the seal.
    TrustCheck {
        /// The volume.
        name: String,
    },
    /// Seal a volume at its branch's head: read-write mounts are refused until
    /// `forge volume trust-check` passes (read-only mounts stay possible).
    Seal {
        /// The volume.
        name: String,
        /// The branch whose head is sealed (default main).
        #[arg(long)]
        branch: Option<String>,
        /// Why (kept in the seal).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Lift a freeze after reviewing what the behaviour detector flagged (its flags stay
    /// in the volume's history, resolved).
    Unfreeze {
        /// The volume.
        name: String,
    },
    /// Wrap a volume's key to a node (a peer), so that it can read the volume (and, with
    /// --write, write it) once the volume's next sync brings it the envelope.
    Share {
        /// The volume.
        name: String,
        /// The node: a peer's name or NodeId.
        #[arg(long)]
        to: String,
        /// Let it write too (its envelope carries the dedup domain's key as well).
        #[arg(long)]
        write: bool,
    },
}

/// `forge contract ...`
#[derive(Debug, Subcommand)]
pub enum ContractCommand {
    /// Write a new contract for a volume to a file, to review and sign.
    New {
        /// The volume it governs.
        #[arg(long)]
        volume: String,
        /// An allowed workload: its digest (64 hex: BLAKE3 over the workload's manifest and
        /// executable, what an import's `--dna workload=DIGEST` names) or `interactive` (a
        /// plain `forge volume mount`, or an import without one). Repeatable; none allows
        /// any.
        #[arg(long = "workload", value_name = "DIGEST")]
        workloads: Vec<String>,
        /// What mounts and workloads may do: ro, rw or append (no overwrite, truncate,
        /// delete or rename over an existing name).
        #[arg(long, default_value = "rw")]
        mode: String,
        /// When it stops being valid: YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC).
        #[arg(long, value_name = "DATE")]
        expires: Option<String>,
        /// The behaviour detector's entropy bound: written blocks at or above it (bits per
        /// byte, 1-8; default 7.2) count as encrypted-looking.
        #[arg(long, value_name = "F")]
        max_entropy: Option<f64>,
        /// The file to write (refused if it exists).
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: PathBuf,
    },
    /// Sign a contract file with this node's key, in place.
    Sign {
        /// The contract file.
        file: PathBuf,
    },
    /// Attach a signed contract to a volume, replacing its contract (recorded in its
    /// contract history; through the group's Raft for a grouped volume).
    Attach {
        /// The volume.
        name: String,
        /// The signed contract file.
        file: PathBuf,
    },
    /// Show a volume's contract, whether it is valid here, and its history.
    Show {
        /// The volume.
        name: String,
    },
}

impl VolumeCommand {
    /// The options of a `mount` command (None for any other).
    #[must_use]
    pub fn mount_options(&self, config: &NodeConfig) -> Option<crate::daemon::host::MountOptions> {
        let Self::Mount {
            name,
            mountpoint,
            branch,
            snapshot,
            read_only,
            background,
            cache_size,
        } = self
        else {
            return None;
        };
        Some(crate::daemon::host::MountOptions {
            volume: name.clone(),
            mountpoint: mountpoint.clone(),
            branch: branch.clone(),
            snapshot: snapshot.clone(),
            read_only: *read_only,
            background: *background,
            cache_bytes: cache_size.map_or(config.mount_cache_bytes, |size| size as usize),
        })
    }
}

/// `forge snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List a volume's snapshots, oldest first.
    List {
        /// The volume.
        name: String,
    },
    /// Paths added, removed and modified from snapshot A to snapshot B.
    Diff {
        /// The volume.
        name: String,
        /// The older snapshot (id or unique prefix).
        a: String,
        /// The newer snapshot.
        b: String,
    },
    /// Write a snapshot into an empty or absent directory.
    Restore {
        /// The volume.
        name: String,
        /// The snapshot (id or unique prefix).
        id: String,
        /// Destination directory.
        destination: PathBuf,
        /// Restore owners by their recorded ids, not by name.
        #[arg(long)]
        numeric_owner: bool,
    },
    /// Create a branch at a snapshot (default: the head of main).
    Branch {
        /// The volume.
        name: String,
        /// The new branch.
        new: String,
        /// The snapshot to start from.
        #[arg(long)]
        from: Option<String>,
    },
    /// Commit the working state of a mounted volume as a snapshot.
    Create {
        /// The volume.
        name: String,
        /// Snapshot message.
        #[arg(short = 'm', long = "message", default_value = "")]
        message: String,
        /// DNA of the workload that made the changes, KEY=VALUE (repeatable; `workload`
        /// names it: a digest or `interactive`), for workloads run outside forge.
        #[arg(long, value_name = "KEY=VALUE", value_parser = parse_key_value)]
        dna: Vec<(String, String)>,
    },
    /// Drop a snapshot from the volume's list (its data is freed by `forge gc`).
    Delete {
        /// The volume.
        name: String,
        /// The snapshot (id or unique prefix).
        id: String,
    },
}

/// Arguments of `forge run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A volume and where the command sees it: NAME[@BRANCH]:/PATH[:ro] (repeatable; a
    /// missing PATH is created for the run and removed after).
    #[arg(long = "mount", value_name = "NAME[@BRANCH]:/PATH[:ro]")]
    pub mounts: Vec<String>,
    /// The workload's manifest (TOML: `name`, and `env`, the variables whose values the
    /// DNA records). Its bytes are part of the workload digest.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Print the workload digest (BLAKE3 of the manifest's bytes then the program's:
    /// what a contract's --workload names) and exit without running anything.
    #[arg(long)]
    pub print_digest: bool,
    /// Bytes of decrypted chunks each mount keeps in memory (default: forge.toml's
    /// mount.cache_size, 256M without one).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub cache_size: Option<u32>,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<std::ffi::OsString>,
}

/// Arguments of `forge init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Protect the node's secret keys with a passphrase (from FORGE_PASSPHRASE, or prompted).
    #[arg(long)]
    pub passphrase: bool,
}

/// `forge peer ...`
#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Connect to a peer, verify its identity, and remember it (needs the daemon).
    Add {
        /// Its multiaddr (`forge node addr` there prints it).
        address: String,
        /// A name for it.
        #[arg(long)]
        name: Option<String>,
        /// Refuse it unless it proves this NodeId (or a prefix of it).
        #[arg(long, value_name = "NODE_ID")]
        expect: Option<String>,
    },
    /// List peers and what they are trusted with.
    List,
    /// Trust a peer with a volume (read: it may pull it; write: push it too), or with
    /// pushing new volumes.
    Trust {
        /// The peer: its name, NodeId or a unique prefix (or the NodeId of an author met
        /// through another peer).
        peer: String,
        /// The volume.
        #[arg(long, required_unless_present_any = ["new_volumes", "cluster"])]
        volume: Option<String>,
        /// Read only (the default).
        #[arg(long, conflicts_with = "write")]
        read: bool,
        /// Read and write.
        #[arg(long)]
        write: bool,
        /// It may push volumes this vault does not have yet.
        #[arg(long)]
        new_volumes: bool,
        /// It may join this node's cluster through this node (`forge cluster join`).
        #[arg(long)]
        cluster: bool,
        /// With --new-volumes: the volumes it pushes go into this volume group (its
        /// layout, replicated to its members; they must carry keys for this node).
        #[arg(long, value_name = "GROUP", requires = "new_volumes")]
        group: Option<String>,
    },
    /// Take every trust from a peer.
    Revoke {
        /// The peer.
        peer: String,
    },
}

/// `forge cluster ...`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Form a cluster of this node alone (others join it). Needs the daemon.
    Init,
    /// Join the cluster of a peer (added with `forge peer add`, and trusting this node
    /// with `forge peer trust NODE --cluster`).
    Join {
        /// The peer: its name, NodeId or a unique prefix.
        peer: String,
    },
    /// Members and their reachability; each Raft group's leader, term, commit index and
    /// the lag of each follower.
    Status,
    /// Leave the cluster (its groups go on without this node).
    Leave,
}

/// `forge group ...`
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a volume group on cluster members.
    Create {
        /// Its name: letters, digits, '.', '_', '-'.
        name: String,
        /// The members that run it: NodeIds (or unique prefixes, or peer names), by commas.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// Erasure layout K+M of its volumes (K+M at most the number of nodes).
        #[arg(long, value_name = "K+M")]
        ec: ErasureLayout,
    },
    /// Add a cluster member to a volume group: it runs the group's Raft (a learner that
    /// catches up, then a voter), gets its volumes' keys, and takes its shards by repair
    /// in the background. Run it on a member of the group.
    AddNode {
        /// The group.
        name: String,
        /// The node: NodeId, unique prefix or peer name.
        node: String,
    },
    /// Take a member out of a volume group: out of placement at once, its shards moved to
    /// their new owners by repair (run now), then out of the Raft group. Refused below
    /// K+M members.
    RemoveNode {
        /// The group.
        name: String,
        /// The node: NodeId, unique prefix or peer name.
        node: String,
    },
    /// Collect a volume group's garbage: every member deletes its shards and objects of the
    /// group that no listed snapshot of its volumes reaches. Refused while a write into a
    /// group volume is in progress on any member (imports, syncs, mounts).
    Gc {
        /// The group.
        name: String,
    },
    /// Repair a volume group now: every member rebuilds the shards it owns and lacks
    /// (from any K others) and drops those it held for an absent owner; reports whether
    /// every chunk is back to K+M shards. Repair also runs in the background.
    Repair {
        /// The group.
        name: String,
    },
}

/// `forge proof ...`
#[derive(Debug, Subcommand)]
pub enum ProofCommand {
    /// The transfer proofs this vault keeps (of syncs it sent and received).
    List {
        /// Only those of this volume.
        #[arg(long)]
        volume: Option<String>,
    },
    /// Write a proof's file (for `forge proof verify` anywhere).
    Export {
        /// The proof's id (or a unique prefix).
        id: String,
        /// Where to write it.
        file: PathBuf,
    },
    /// Verify a transfer proof file offline: both nodes' keys must hash to the NodeIds
    /// its receipt names, and both signatures must verify (exit 0 and "valid", or 3
    /// naming what is wrong). Needs no vault.
    Verify {
        /// The proof file.
        file: PathBuf,
    },
}

/// `forge node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Print this node's id (with --json, also its public keys).
    Id,
    /// Show the forge process that owns this data directory (the daemon, or a mount
    /// host), its mounts and its socket; exit 1 when none runs.
    Status,
    /// Start the daemon: it owns the data directory, hosts every mount and serves the
    /// control socket until stopped. Returns once it serves (log in DATA_DIR/logs/).
    Start {
        /// Stay attached: serve in this process until SIGINT/SIGTERM or `node stop`.
        #[arg(long)]
        foreground: bool,
        /// Serve Prometheus metrics on this address (`off`: none; default: forge.toml's
        /// metrics_listen, 127.0.0.1:9464 without one).
        #[arg(long, value_name = "ADDR|off")]
        metrics_listen: Option<String>,
        /// Listen for peers on this QUIC multiaddr (`off`: no network; default:
        /// forge.toml's listen, /ip4/0.0.0.0/udp/4710/quic-v1 without one).
        #[arg(long, value_name = "MULTIADDR|off")]
        listen: Option<String>,
    },
    /// Print this node's dialable addresses (for `forge peer add` on another node).
    Addr,
    /// Print the configuration in effect (DATA_DIR/forge.toml over the defaults).
    Config,
    /// Stop the daemon (or mount host): unmount and commit every mount, close the vault,
    /// exit; waits for it.
    Stop {
        /// Seconds to wait for it to exit.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

fn parse_key_value(text: &str) -> std::result::Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    if key.is_empty() {
        return Err(format!("{text:?} has an empty key"));
    }
    Ok((key.to_owned(), value.to_owned()))
}
