//! Whole vaults under faults: 2–4 single-node sites on one simulated network, each a real
//! [`forge_node::vault::Vault`] on [`MemKv`] (seeded keys and nonces, a stepping clock,
//! one thread), serving volume syncs over [`MemoryNetwork`] with the production protocol
//! code. Each site owns a volume, imports trees into it (branches `main` and `side`),
//! deletes old snapshots, runs gc and scrub, unshares its volume from a site or shares it
//! again, and sends `main` to the other sites, which trust it and hold its keys; their
//! clocks are skewed by up to two hours. Meanwhile the nemesis loses, delays, duplicates
//! and corrupts messages, partitions sites (both ways and one way), crashes a site (its
//! disk keeps only what was synced: MemKv's power cut) and restarts it, and damages at
//! most `m` shards of a chunk at rest.
//!
//! Checked at the end, after every fault is healed and every site is back:
//! - every snapshot whose import was acknowledged (and not deleted since) exports
//!   byte-exact, and every branch is where its last acknowledged import left it;
//! - a final sync from every site to every other converges: the receiver's `main` is the
//!   sender's, and exports byte-exact there (a site the volume was unshared from before
//!   that head was made must fail to read it);
//! - every site passes audits of every other site's head (each sampled range proves
//!   against its chunk's cid);
//! - fsck finds nothing wrong anywhere, once scrub has repaired the damaged shards (no
//!   chunk is stored that fails its cid).
//!
//! Imports, gc and scrub are synchronous vault calls: they run to completion at one
//! instant of simulated time; sends are tasks that interleave with them at every message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use forge_crypto::{Cid, NodeId, NodeIdentity, NodeSecrets};
use forge_mesh::memory::{FaultPlan, MemoryNetwork, MemoryPeer};
use forge_mesh::net::PeerNet;
use forge_mesh::sync::{Incoming, TransferConfig, send_volume, serve_volumes};
use forge_node::clock::{SeededRandomness, SteppingClock};
use forge_node::datadir::DataDir;
use forge_node::progress::Progress;
use forge_node::vault::export::SnapshotSelector;
use forge_node::vault::transfer::VaultVolumeHost;
use forge_node::vault::trust::NewContract;
use forge_node::vault::{
    CreateVolumeOptions, ExportOptions, ImportOptions, Vault, VaultParts, no_passphrase,
};
use forge_store::erasure::ErasureLayout;
use forge_store::kv::{Column, Durability, KvEngine, MemKv, WriteBatch};

use crate::SimRng;

/// The faults a run may inject (`--faults`), all by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultSet {
    /// Message loss, delay (reordering), duplication.
    pub network: bool,
    /// Messages with a byte flipped.
    pub corruption: bool,
    /// Partitions, both ways and one way.
    pub partitions: bool,
    /// Crashes that lose unsynced writes, and restarts.
    pub crashes: bool,
    /// Shards damaged at rest (at most m of a chunk).
    pub disk: bool,
    /// A group member's vault disk that acknowledges fsyncs it never did (groups).
    pub lost_fsyncs: bool,
    /// A node's wall clock stepped forward or back (an operator's or NTP's correction)
    /// (groups).
    pub clock_jumps: bool,
    /// A node's disk that takes seconds to answer (groups).
    pub slow_disks: bool,
}

impl FaultSet {
    /// Every fault.
    pub const ALL: Self = Self {
        network: true,
        corruption: true,
        partitions: true,
        crashes: true,
        disk: true,
        lost_fsyncs: true,
        clock_jumps: true,
        slow_disks: true,
    };

    /// Parses `--faults`: a comma-separated list of `network`, `corruption`,
    /// `partitions`, `crashes`, `disk`, `lost-fsyncs`, `clock-jumps`, `slow-disks`, or
    /// `all` / `none`.
    ///
    /// # Errors
    /// An unknown name.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut set = Self {
            network: false,
            corruption: false,
            partitions: false,
            crashes: false,
            disk: false,
            lost_fsyncs: false,
            clock_jumps: false,
            slow_disks: false,
        };
        for name in text
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
        {
            match name {
                "all" => set = Self::ALL,
                "none" => {}
                "network" => set.network = true,
                "corruption" => set.corruption = true,
                "partitions" => set.partitions = true,
                "crashes" => set.crashes = true,
                "disk" => set.disk = true,
                "lost-fsyncs" => set.lost_fsyncs = true,
                "clock-jumps" => set.clock_jumps = true,
                "slow-disks" => set.slow_disks = true,
                other => {
                    return Err(format!(
                        "unknown fault {other:?}: use network, corruption, partitions, crashes, disk, lost-fsyncs, clock-jumps, slow-disks, all or none"
                    ));
                }
            }
        }
        Ok(set)
    }
}

/// What a seed chose, and what the command line fixed.
#[derive(Debug, Clone, PartialEq)]
pub struct SitesConfig {
    /// Sites (one vault each).
    pub nodes: usize,
    /// Simulated length of the workload phase.
    pub duration: Duration,
    /// The faults allowed.
    pub faults: FaultSet,
    /// The network's per-message faults.
    pub plan: FaultPlan,
    /// Chance per step that the nemesis acts (percent).
    pub nemesis_percent: u64,
}

impl SitesConfig {
    /// The configuration `seed` chooses; `nodes` fixes the site count when given.
    #[must_use]
    pub fn from_seed(
        seed: u64,
        nodes: Option<usize>,
        faults: FaultSet,
        duration: Duration,
    ) -> Self {
        let mut rng = SimRng::new(seed ^ 0x5173_5173);
        let chosen = usize::try_from(rng.range(2, 5)).unwrap_or(2);
        let plan = FaultPlan {
            loss: if faults.network {
                rng.range(0, 6) as f64 / 100.0
            } else {
                0.0
            },
            delay_min: Duration::ZERO,
            delay_max: if faults.network {
                Duration::from_millis(rng.range(0, 50))
            } else {
                Duration::ZERO
            },
            duplicate: if faults.network {
                rng.range(0, 4) as f64 / 100.0
            } else {
                0.0
            },
            corrupt_request: if faults.corruption {
                rng.range(0, 4) as f64 / 100.0
            } else {
                0.0
            },
            corrupt_response: if faults.corruption {
                rng.range(0, 3) as f64 / 100.0
            } else {
                0.0
            },
        };
        Self {
            nodes: nodes.unwrap_or(chosen).clamp(2, 9),
            duration,
            faults,
            plan,
            nemesis_percent: rng.range(10, 35),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct SitesReport {
    /// The seed.
    pub seed: u64,
    /// BLAKE3 of the event log and the network's trace: equal for equal seeds.
    pub trace: [u8; 32],
    /// Simulated time the run covered (workload, heal, checks).
    pub simulated: Duration,
    /// Operations the workload started (imports, sends, deletes, gc, scrub).
    pub operations: u64,
    /// Faults the nemesis injected (partitions, crashes, damaged shards; not per-message).
    pub faults: u64,
    /// Imports acknowledged.
    pub imports: u64,
    /// Sends that completed.
    pub sends: u64,
    /// Messages the network lost, duplicated or corrupted.
    pub message_faults: u64,
    /// The event log.
    pub events: Vec<String>,
}

/// A run that broke an invariant.
#[derive(Debug, Clone)]
pub struct SitesFailure {
    /// The seed.
    pub seed: u64,
    /// What broke.
    pub reason: String,
    /// The event log up to the failure.
    pub events: Vec<String>,
}

/// A file tree as the workload wrote it: relative path to contents.
pub(crate) type Tree = BTreeMap<String, Vec<u8>>;

/// One site: its disk survives crashes; its vault and serving tasks do not.
struct Site {
    index: usize,
    id: NodeId,
    secrets: NodeSecrets,
    kv: Arc<MemKv>,
    clock: Arc<SteppingClock>,
    dir: PathBuf,
    peer: Arc<MemoryPeer>,
    /// None while crashed.
    running: Option<Running>,
    boots: u64,
    /// The tree of each branch's last acknowledged import, and its snapshot.
    branches: BTreeMap<String, (Cid, Tree)>,
    /// Every acknowledged snapshot not deleted since.
    kept: BTreeMap<Cid, Tree>,
    /// Shards damaged at rest and not yet scrubbed, per chunk.
    damaged: BTreeMap<Vec<u8>, u32>,
    /// Sites this one's volume is shared with now.
    shared_with: std::collections::BTreeSet<usize>,
    /// Imports into `main` so far, and, per site it unshared from, the count then: a
    /// `main` head imported after that must stay unreadable there.
    main_imports: u64,
    unshared_at: BTreeMap<usize, u64>,
    /// The `main` import count of each `main` head.
    main_head_import: u64,
    /// The contract last attached to its volume here (its encoding): every other site
    /// must hold it after the final sends (they trust this site to write the volume).
    contract: Option<Vec<u8>>,
}

struct Running {
    vault: Arc<Vault>,
    host: Arc<VaultVolumeHost>,
    /// One push at a time to a peer, as the daemon does.
    incoming: Incoming,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The run's event log, stamped with simulated time (the groups scenario's too).
#[derive(Clone)]
pub(crate) struct Log {
    pub(crate) started: tokio::time::Instant,
    events: Arc<Mutex<Vec<String>>>,
}

impl Log {
    /// An empty log whose times count from now.
    pub(crate) fn starting_now() -> Self {
        Self {
            started: tokio::time::Instant::now(),
            events: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub(crate) fn note(&self, event: impl AsRef<str>) {
        let millis = self.started.elapsed().as_millis();
        let line = format!("{millis:>7} ms {}", event.as_ref());
        // A seed that runs long shows where it is as it goes.
        if std::env::var_os("FORGE_SIM_LIVE").is_some() {
            eprintln!("{line}");
        }
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line);
    }

    pub(crate) fn snapshot(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn volume_name(index: usize) -> String {
    format!("v{index}")
}

fn transfer_config() -> TransferConfig {
    let mut config = TransferConfig {
        control_deadline: Duration::from_secs(10),
        receive_workers: 1,
        ..TransferConfig::default()
    };
    // Reads on the runtime's thread: a blocking thread would race it.
    config.push.blocking_reads = false;
    config.push.deadline = Duration::from_secs(2);
    config.push.attempts = 6;
    config
}

impl Site {
    fn new(index: usize, seed: u64, network: &MemoryNetwork, root: &Path) -> Result<Self, String> {
        let mut secret = [0u8; 128];
        let mut rng = SimRng::new(seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9));
        for byte in &mut secret {
            *byte = rng.next_u64().to_le_bytes()[0];
        }
        let secrets = NodeSecrets::from_seed_bytes(secret);
        let id = NodeIdentity::from_secrets(&secrets).node_id();
        let dir = root.join(format!("site-{index}"));
        std::fs::create_dir_all(&dir).map_err(|error| error.to_string())?;
        Ok(Self {
            index,
            id,
            secrets,
            kv: Arc::new(MemKv::new()),
            // Clock skew: each site's clock is up to two hours off, and runs at its own pace.
            clock: Arc::new(SteppingClock::new(
                1_800_000_000_000_000_000
                    + (i64::try_from(rng.range(0, 4 * 3600)).unwrap_or(0) - 2 * 3600)
                        * 1_000_000_000,
                i64::try_from(rng.range(100_000, 10_000_000)).unwrap_or(1_000_000),
            )),
            dir,
            peer: network.join(id),
            running: None,
            boots: 0,
            branches: BTreeMap::new(),
            kept: BTreeMap::new(),
            damaged: BTreeMap::new(),
            shared_with: std::collections::BTreeSet::new(),
            main_imports: 0,
            contract: None,
            unshared_at: BTreeMap::new(),
            main_head_import: 0,
        })
    }

    fn start(&mut self, seed: u64) -> Result<(), String> {
        self.boots += 1;
        let parts = VaultParts {
            kv: self.kv.clone(),
            metadata: None,
            clock: self.clock.clone(),
            // A new stream per boot: nonces are never drawn twice from one stream.
            randomness: Arc::new(SeededRandomness::new(
                seed ^ (self.index as u64) << 32 ^ self.boots << 48,
            )),
            threads: 1,
        };
        let vault = Arc::new(
            Vault::from_parts(
                &DataDir::new(self.dir.clone()),
                NodeIdentity::from_secrets(&self.secrets),
                parts,
            )
            .map_err(|error| format!("site {} did not open: {error}", self.index))?,
        );
        let incoming = Incoming::default();
        let host = Arc::new(VaultVolumeHost::new(vault.clone(), incoming.clone(), None));
        let net: Arc<dyn PeerNet> = self.peer.clone();
        let mut tasks: Vec<tokio::task::JoinHandle<()>> = serve_volumes(
            net.clone(),
            host.clone(),
            incoming.clone(),
            transfer_config(),
        )
        .map_err(|error| error.to_string())?
        .into();
        // Audits are answered from what the vault holds, verified (the daemon's rule:
        // any peer it knows may ask; here every site is known).
        let audits = net
            .serve(forge_mesh::audit::AUDIT_PROTOCOL)
            .map_err(|error| error.to_string())?;
        let reader: Arc<dyn forge_mesh::sync::SyncStore> =
            Arc::new(forge_node::vault::sync::VaultReader::new(vault.clone()));
        tasks.push(tokio::spawn(forge_mesh::audit::serve_audits(
            audits,
            reader,
            |_| Ok(()),
        )));
        self.running = Some(Running {
            vault,
            host,
            incoming,
            tasks,
        });
        Ok(())
    }

    fn vault(&self) -> Result<&Arc<Vault>, String> {
        self.running
            .as_ref()
            .map(|running| &running.vault)
            .ok_or_else(|| format!("site {} is down", self.index))
    }

    fn crash(&mut self, network: &MemoryNetwork, surviving: usize) {
        network.crash(self.id);
        if let Some(running) = self.running.take() {
            for task in running.tasks {
                task.abort();
            }
        }
        self.kv.crash(surviving);
    }
}

/// A tree of 1–6 files: some carried over from `previous`, some changed, some new.
pub(crate) fn next_tree(rng: &mut SimRng, previous: Option<&Tree>) -> Tree {
    let mut tree = previous.cloned().unwrap_or_default();
    let changes = rng.range(1, 4);
    for _ in 0..changes {
        let name = format!("d{}/f{}", rng.range(0, 3), rng.range(0, 6));
        let len = usize::try_from(rng.range(0, 160_000)).unwrap_or(0);
        let mut bytes = vec![0u8; len];
        let mut state = rng.next_u64() | 1;
        for byte in &mut bytes {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state.to_le_bytes()[0];
        }
        tree.insert(name, bytes);
    }
    if tree.len() > 1 && rng.chance(20) {
        let victim = tree
            .keys()
            .nth(usize::try_from(rng.range(0, tree.len() as u64)).unwrap_or(0))
            .cloned();
        if let Some(victim) = victim {
            tree.remove(&victim);
        }
    }
    tree
}

/// Writes `tree` under `root` with fixed mtimes (an import records them: the same seed
/// must store the same snapshot).
pub(crate) fn write_tree(root: &Path, tree: &Tree) -> Result<(), String> {
    let fixed = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let io = |error: std::io::Error| format!("writing the workload's tree: {error}");
    std::fs::create_dir_all(root).map_err(io)?;
    for (name, bytes) in tree {
        let path = root.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&path, bytes).map_err(io)?;
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_modified(fixed))
            .map_err(io)?;
    }
    let mut directories: Vec<PathBuf> = tree
        .keys()
        .filter_map(|name| root.join(name).parent().map(Path::to_path_buf))
        .collect();
    directories.push(root.to_path_buf());
    directories.sort();
    directories.dedup();
    for directory in directories.iter().rev() {
        std::fs::File::open(directory)
            .and_then(|file| file.set_modified(fixed))
            .map_err(io)?;
    }
    Ok(())
}

/// The regular files under `root`, by relative path.
pub(crate) fn read_tree(root: &Path) -> Result<Tree, String> {
    let mut tree = Tree::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(directory) = stack.pop() {
        let entries = std::fs::read_dir(&directory).map_err(|error| error.to_string())?;
        for entry in entries {
            let path = entry.map_err(|error| error.to_string())?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let name = path
                    .strip_prefix(root)
                    .map_err(|error| error.to_string())?
                    .to_string_lossy()
                    .into_owned();
                tree.insert(
                    name,
                    std::fs::read(&path).map_err(|error| error.to_string())?,
                );
            }
        }
    }
    Ok(tree)
}

pub(crate) fn describe_difference(expected: &Tree, found: &Tree) -> String {
    for (name, bytes) in expected {
        match found.get(name) {
            None => return format!("{name} is missing"),
            Some(other) if other != bytes => {
                return format!(
                    "{name} differs ({} bytes, expected {})",
                    other.len(),
                    bytes.len()
                );
            }
            Some(_) => {}
        }
    }
    match found.keys().find(|name| !expected.contains_key(*name)) {
        Some(name) => format!("{name} should not be there"),
        None => "no difference".into(),
    }
}

/// Exports `selector` of volume `volume` from `vault` and compares it with `expected`.
fn export_matches(
    vault: &Vault,
    volume: &str,
    selector: &SnapshotSelector,
    expected: &Tree,
    scratch: &Path,
) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(scratch);
    vault
        .export(
            volume,
            scratch,
            selector,
            &ExportOptions::default(),
            &no_passphrase,
            &Progress::new("export", false),
        )
        .map_err(|error| format!("export failed: {error}"))?;
    let found = read_tree(scratch)?;
    let _ = std::fs::remove_dir_all(scratch);
    if &found == expected {
        Ok(())
    } else {
        Err(format!(
            "export differs: {}",
            describe_difference(expected, &found)
        ))
    }
}

/// Outcomes of sends running as tasks: (from, to, result).
type SendLog = Arc<Mutex<Vec<(usize, usize, Result<String, String>)>>>;

/// Runs the scenario `seed` chooses under `config`, on its own deterministic runtime.
///
/// # Errors
/// The invariant it broke, with the event log.
pub fn run(seed: u64, config: &SitesConfig) -> Result<SitesReport, SitesFailure> {
    let failure = |reason: String, events: Vec<String>| SitesFailure {
        seed,
        reason,
        events,
    };
    let runtime = crate::runtime(seed).map_err(|error| failure(error.to_string(), Vec::new()))?;
    let scratch = crate::scratch_dir()
        .map_err(|error| failure(format!("no scratch directory: {error}"), Vec::new()))?;
    // Fault points inside the node code, on this thread (the run's).
    if config.faults.corruption {
        forge_store::faults::points::arm(seed, &[("sync-sender-bitflip", 2)]);
    }
    let outcome = runtime.block_on(async {
        let log = Log::starting_now();
        let mut world = World::new(seed, config, scratch.path(), log.clone())
            .map_err(|reason| failure(reason, log.snapshot()))?;
        let outcome = world.run().await;
        let mut report = world.report;
        report.seed = seed;
        report.simulated = log.started.elapsed();
        let stats = world.network.stats();
        report.message_faults = stats.lost + stats.duplicated + stats.corrupted;
        report.events = log.snapshot();
        let mut hasher = blake3::Hasher::new();
        for event in &report.events {
            hasher.update(event.as_bytes());
            hasher.update(b"\n");
        }
        hasher.update(&world.network.trace());
        report.trace = *hasher.finalize().as_bytes();
        // Tasks still holding vaults end with the runtime.
        for site in &mut world.sites {
            if let Some(running) = site.running.take() {
                for task in running.tasks {
                    task.abort();
                }
            }
        }
        match outcome {
            Ok(()) => Ok(report),
            Err(reason) => Err(failure(reason, report.events)),
        }
    });
    let fired = forge_store::faults::points::disarm();
    outcome.map(|mut report| {
        report.faults += fired;
        report
    })
}

struct World<'a> {
    seed: u64,
    config: &'a SitesConfig,
    rng: SimRng,
    network: MemoryNetwork,
    sites: Vec<Site>,
    scratch: PathBuf,
    log: Log,
    sends: SendLog,
    in_flight: Vec<(usize, usize, tokio::task::JoinHandle<()>)>,
    /// Crashed sites and when they come back.
    down_until: BTreeMap<usize, tokio::time::Instant>,
    partitioned: bool,
    /// Whether a partition flaps, and how fast (a stream of its own).
    flap_rng: SimRng,
    /// The flapping partition, if one flaps (dropping it stops it).
    flapping: Option<crate::Flapping>,
    report: SitesReport,
    trees_written: u64,
}

impl<'a> World<'a> {
    fn new(seed: u64, config: &'a SitesConfig, scratch: &Path, log: Log) -> Result<Self, String> {
        let network = MemoryNetwork::new(seed);
        network.set_faults(config.plan);
        let mut sites = Vec::with_capacity(config.nodes);
        for index in 0..config.nodes {
            let mut site = Site::new(index, seed, &network, scratch)?;
            site.start(seed)?;
            sites.push(site);
        }
        // Every site owns a volume, trusts every other to send it new volumes and shares
        // its own with them (they hold its keys, so they can export what they receive).
        let mut shared_with = Vec::new();
        for site in &sites {
            let vault = site.vault()?;
            let layout = ErasureLayout::new(4, 2).map_err(|error| error.to_string())?;
            vault
                .create_volume(
                    &volume_name(site.index),
                    &CreateVolumeOptions {
                        layout: Some(layout),
                        chunk_avg_bytes: Some(16 * 1024),
                        ..CreateVolumeOptions::default()
                    },
                    &no_passphrase,
                )
                .map_err(|error| format!("creating a volume: {error}"))?;
            for other in &sites {
                if other.index == site.index {
                    continue;
                }
                let keys = NodeIdentity::from_secrets(&other.secrets)
                    .public_keys()
                    .clone();
                vault
                    .add_peer(&keys, None, Some(&format!("site-{}", other.index)))
                    .map_err(|error| format!("adding a peer: {error}"))?;
                vault
                    .trust_peer(&other.id, None, false, true)
                    .map_err(|error| format!("trusting a peer: {error}"))?;
                vault
                    .share_volume(&volume_name(site.index), &other.id, false, &no_passphrase)
                    .map_err(|error| format!("sharing a volume: {error}"))?;
                shared_with.push((site.index, other.index));
            }
        }
        for (owner, other) in shared_with {
            sites[owner].shared_with.insert(other);
        }
        Ok(Self {
            seed,
            config,
            rng: SimRng::new(seed ^ 0x0005_17e5),
            network,
            sites,
            scratch: scratch.to_path_buf(),
            log,
            sends: Arc::new(Mutex::new(Vec::new())),
            in_flight: Vec::new(),
            down_until: BTreeMap::new(),
            partitioned: false,
            flap_rng: SimRng::new(seed ^ 0xf1a9_f1a9),
            flapping: None,
            report: SitesReport::default(),
            trees_written: 0,
        })
    }

    fn pick(&mut self, count: usize) -> usize {
        usize::try_from(self.rng.range(0, count as u64)).unwrap_or(0)
    }

    async fn run(&mut self) -> Result<(), String> {
        let end = self.log.started + self.config.duration;
        while tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(self.rng.range(50, 1_500))).await;
            self.restart_due()?;
            self.collect_sends();
            if self.rng.chance(self.config.nemesis_percent) {
                self.nemesis();
            } else {
                self.operation()?;
            }
        }
        self.heal().await?;
        self.check().await
    }

    fn restart_due(&mut self) -> Result<(), String> {
        let now = tokio::time::Instant::now();
        let due: Vec<usize> = self
            .down_until
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(index, _)| *index)
            .collect();
        for index in due {
            self.down_until.remove(&index);
            self.network.restart(self.sites[index].id);
            self.sites[index].start(self.seed)?;
            self.log.note(format!("site {index} restarted"));
        }
        Ok(())
    }

    fn collect_sends(&mut self) {
        let finished: Vec<_> = self
            .sends
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        for (from, to, outcome) in finished {
            match outcome {
                Ok(summary) => {
                    self.report.sends += 1;
                    self.log.note(format!("send {from}->{to} done: {summary}"));
                }
                Err(reason) => self.log.note(format!("send {from}->{to} failed: {reason}")),
            }
        }
        self.in_flight.retain(|(_, _, task)| !task.is_finished());
    }

    fn nemesis(&mut self) {
        let faults = self.config.faults;
        let choice = self.rng.range(0, 4);
        match choice {
            0 if faults.partitions => {
                if self.partitioned {
                    self.flapping = None;
                    self.network.heal();
                    self.partitioned = false;
                    self.log.note("healed");
                } else {
                    let a = self.pick(self.sites.len());
                    let b = (a + 1 + self.pick(self.sites.len() - 1)) % self.sites.len();
                    let (cut, what) = if self.rng.chance(50) {
                        (
                            crate::Cut::OneWay(self.sites[a].id, self.sites[b].id),
                            format!("partition {a}->{b} one way"),
                        )
                    } else {
                        (
                            crate::Cut::Apart(vec![self.sites[a].id], vec![self.sites[b].id]),
                            format!("partition {a}|{b}"),
                        )
                    };
                    let (flapping, line) =
                        crate::make_partition(&self.network, &mut self.flap_rng, cut, what);
                    self.flapping = flapping;
                    self.log.note(line);
                    self.partitioned = true;
                    self.report.faults += 1;
                }
            }
            1 if faults.crashes => {
                let index = self.pick(self.sites.len());
                if self.down_until.contains_key(&index) {
                    return;
                }
                // Sends from it die with it.
                for (from, _, task) in &self.in_flight {
                    if *from == index {
                        task.abort();
                    }
                }
                let surviving = usize::try_from(self.rng.range(0, 3)).unwrap_or(0);
                self.sites[index].crash(&self.network, surviving);
                let back =
                    tokio::time::Instant::now() + Duration::from_millis(self.rng.range(200, 5_000));
                self.down_until.insert(index, back);
                self.report.faults += 1;
                self.log.note(format!(
                    "site {index} crashed ({surviving} unsynced batches survive)"
                ));
            }
            2 if faults.disk => self.damage_shard(),
            _ => {}
        }
    }

    /// Flips a byte of one shard at rest, keeping every chunk within m = 2 bad shards.
    fn damage_shard(&mut self) {
        let index = self.pick(self.sites.len());
        let kv = self.sites[index].kv.clone();
        let Ok(shards) = kv.scan(Column::Shards, &[], None, usize::MAX) else {
            return;
        };
        if shards.is_empty() {
            return;
        }
        let (key, mut value) = shards[self.pick(shards.len())].clone();
        let chunk = key[..key.len().min(32)].to_vec();
        let bad = self.sites[index].damaged.get(&chunk).copied().unwrap_or(0);
        if bad >= 2 || value.is_empty() {
            return;
        }
        let at = self.pick(value.len());
        value[at] ^= 0x40;
        let mut batch = WriteBatch::new();
        batch.put(Column::Shards, key, value);
        if kv.write(batch, Durability::Synced).is_ok() {
            *self.sites[index].damaged.entry(chunk).or_default() += 1;
            self.report.faults += 1;
            self.log
                .note(format!("site {index}: a shard damaged at rest"));
        }
    }

    fn operation(&mut self) -> Result<(), String> {
        let index = self.pick(self.sites.len());
        if self.sites[index].running.is_none() {
            return Ok(());
        }
        self.report.operations += 1;
        match self.rng.range(0, 10) {
            0..=3 => self.import(index, "main"),
            4 => self.import(index, "side"),
            5..=7 => {
                self.send(index);
                Ok(())
            }
            8 if self.rng.chance(70) => self.delete_old_snapshot(index),
            8 if self.rng.chance(60) => self.toggle_share(index),
            8 => self.attach_contract(index),
            _ => self.maintain(index),
        }
    }

    fn import(&mut self, index: usize, branch: &str) -> Result<(), String> {
        let previous = self.sites[index]
            .branches
            .get(branch)
            .map(|(_, tree)| tree.clone());
        let tree = next_tree(&mut self.rng, previous.as_ref());
        self.trees_written += 1;
        let source = self.scratch.join(format!("tree-{}", self.trees_written));
        write_tree(&source, &tree)?;
        let site = &self.sites[index];
        let vault = site.vault()?;
        let options = ImportOptions {
            message: String::new(),
            branch: branch.to_owned(),
            dna: BTreeMap::new(),
            atime: false,
        };
        let imported = vault.import(
            &volume_name(index),
            &source,
            &options,
            &no_passphrase,
            &Progress::new("import", false),
        );
        let _ = std::fs::remove_dir_all(&source);
        let report =
            imported.map_err(|error| format!("site {index}: an import failed: {error}"))?;
        self.log.note(format!(
            "site {index}: import to {branch}: {} ({} files)",
            report.snapshot,
            tree.len()
        ));
        self.report.imports += 1;
        let site = &mut self.sites[index];
        if branch == "main" {
            site.main_imports += 1;
            site.main_head_import = site.main_imports;
        }
        site.kept.insert(report.snapshot, tree.clone());
        site.branches
            .insert(branch.to_owned(), (report.snapshot, tree));
        Ok(())
    }

    fn send(&mut self, from: usize) {
        let to = (from + 1 + self.pick(self.sites.len() - 1)) % self.sites.len();
        let Some(running) = &self.sites[from].running else {
            return;
        };
        if !self.sites[from].branches.contains_key("main") {
            return;
        }
        let net: Arc<dyn PeerNet> = self.sites[from].peer.clone();
        let host = running.host.clone();
        let turns = running.incoming.clone();
        let peer = self.sites[to].id;
        let sends = self.sends.clone();
        let name = volume_name(from);
        self.log.note(format!("send {from}->{to} started"));
        let task = tokio::spawn(async move {
            let _turn = turns.push_turn(peer).await;
            let outcome = send_volume(net, host, peer, &name, "main", &name, &transfer_config())
                .await
                .map(|summary| format!("{:?}, {} chunks sent", summary.moved, summary.chunks_sent))
                .map_err(|error| error.to_string());
            sends
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((from, to, outcome));
        });
        self.in_flight.push((from, to, task));
    }

    /// Unshares the site's volume from another site (rotating its key), or shares it
    /// again.
    fn toggle_share(&mut self, index: usize) -> Result<(), String> {
        let other = (index + 1 + self.pick(self.sites.len() - 1)) % self.sites.len();
        let other_id = self.sites[other].id;
        let name = volume_name(index);
        let site = &self.sites[index];
        let vault = site.vault()?;
        if site.shared_with.contains(&other) {
            vault
                .unshare_volume(&name, &other_id, &no_passphrase)
                .map_err(|error| format!("site {index}: unsharing {name} from {other}: {error}"))?;
            let at = site.main_imports;
            let site = &mut self.sites[index];
            site.shared_with.remove(&other);
            site.unshared_at.insert(other, at);
            self.log
                .note(format!("site {index}: {name} unshared from site {other}"));
        } else {
            vault
                .share_volume(&name, &other_id, false, &no_passphrase)
                .map_err(|error| format!("site {index}: sharing {name} with {other}: {error}"))?;
            let site = &mut self.sites[index];
            site.shared_with.insert(other);
            site.unshared_at.remove(&other);
            self.log
                .note(format!("site {index}: {name} shared with site {other}"));
        }
        Ok(())
    }

    /// Attaches a new contract (signed here) to the site's volume: read-write or
    /// append-only, any workload or people only (the workload's imports stay allowed).
    fn attach_contract(&mut self, index: usize) -> Result<(), String> {
        let name = volume_name(index);
        let request = NewContract {
            workloads: if self.rng.chance(50) {
                Vec::new()
            } else {
                vec!["interactive".to_owned()]
            },
            mode: Some(if self.rng.chance(50) { "rw" } else { "append" }.to_owned()),
            expires: None,
            max_entropy: None,
        };
        let vault = self.sites[index].vault()?;
        let attached = vault
            .new_contract(&name, &request)
            .and_then(|file| vault.sign_contract(&file))
            .and_then(|signed| vault.attach_contract(&name, &signed))
            .map_err(|error| format!("site {index}: attaching a contract to {name}: {error}"))?;
        self.sites[index].contract = Some(attached.encode());
        self.log.note(format!(
            "site {index}: a {} contract attached to {name}",
            attached.mode.name()
        ));
        Ok(())
    }

    fn delete_old_snapshot(&mut self, index: usize) -> Result<(), String> {
        let site = &self.sites[index];
        let heads: Vec<Cid> = site.branches.values().map(|(cid, _)| *cid).collect();
        let old: Vec<Cid> = site
            .kept
            .keys()
            .filter(|cid| !heads.contains(cid))
            .copied()
            .collect();
        if old.is_empty() {
            return Ok(());
        }
        let victim = old[self.pick(old.len())];
        let vault = self.sites[index].vault()?;
        vault
            .delete_snapshot(&volume_name(index), &victim.to_string())
            .map_err(|error| format!("site {index}: deleting snapshot {victim} failed: {error}"))?;
        self.log
            .note(format!("site {index}: snapshot {victim} deleted"));
        self.sites[index].kept.remove(&victim);
        Ok(())
    }

    fn maintain(&mut self, index: usize) -> Result<(), String> {
        let vault = self.sites[index].vault()?.clone();
        if self.rng.chance(50) {
            let report = vault
                .gc(&no_passphrase, &Progress::new("gc", false))
                .map_err(|error| format!("site {index}: gc failed: {error}"))?;
            self.log.note(format!(
                "site {index}: gc removed {} chunks, {} objects",
                report.chunks_removed, report.objects_removed
            ));
        } else {
            let report = vault
                .scrub(true, &Progress::new("scrub", false))
                .map_err(|error| format!("site {index}: scrub failed: {error}"))?;
            self.sites[index].damaged.clear();
            self.log.note(format!(
                "site {index}: scrub checked {} chunks",
                report.chunks_checked
            ));
        }
        Ok(())
    }

    /// Everything back: partitions healed, per-message faults off, crashed sites restarted,
    /// sends in flight finished.
    async fn heal(&mut self) -> Result<(), String> {
        self.flapping = None;
        self.network.heal();
        self.network.set_faults(FaultPlan::NONE);
        let indexes: Vec<usize> = self.down_until.keys().copied().collect();
        for index in indexes {
            self.down_until.remove(&index);
            self.network.restart(self.sites[index].id);
            self.sites[index].start(self.seed)?;
        }
        self.log.note("healed: every site up, no faults");
        // Liveness: every send started completes (either way) within a bound.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while self
            .in_flight
            .iter()
            .any(|(_, _, task)| !task.is_finished())
        {
            if tokio::time::Instant::now() > deadline {
                return Err("sends still running 120 s (simulated) after heal".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.collect_sends();
        Ok(())
    }

    async fn check(&mut self) -> Result<(), String> {
        let scratch = self.scratch.join("check");
        // Acknowledged imports: every branch where its last import left it, every kept
        // snapshot restorable byte-exact.
        for site in &self.sites {
            let vault = site.vault()?;
            let name = volume_name(site.index);
            let branches: BTreeMap<String, Cid> = vault
                .branches(&name)
                .map_err(|error| error.to_string())?
                .into_iter()
                .collect();
            for (branch, (head, _)) in &site.branches {
                if branches.get(branch) != Some(head) {
                    return Err(format!(
                        "site {}: branch {branch} is at {:?}, but its last acknowledged import made it {head}",
                        site.index,
                        branches.get(branch)
                    ));
                }
            }
            for (snapshot, tree) in &site.kept {
                export_matches(
                    vault,
                    &name,
                    &SnapshotSelector::Id(snapshot.to_string()),
                    tree,
                    &scratch,
                )
                .map_err(|reason| {
                    format!(
                        "site {}: acknowledged snapshot {snapshot} of {name}: {reason}",
                        site.index
                    )
                })?;
            }
        }
        self.log
            .note("every acknowledged snapshot restores byte-exact");
        // Sync converges: one more send of every main to every other site, no faults.
        for from in 0..self.sites.len() {
            let Some((head, tree)) = self.sites[from].branches.get("main").cloned() else {
                continue;
            };
            let name = volume_name(from);
            for to in 0..self.sites.len() {
                if to == from {
                    continue;
                }
                let net: Arc<dyn PeerNet> = self.sites[from].peer.clone();
                let host = self.sites[from]
                    .running
                    .as_ref()
                    .map(|running| running.host.clone())
                    .ok_or("a site is down after heal")?;
                let summary = send_volume(
                    net,
                    host,
                    self.sites[to].id,
                    &name,
                    "main",
                    &name,
                    &transfer_config(),
                )
                .await
                .map_err(|error| format!("final send {from}->{to} of {name} failed: {error}"))?;
                let receiver = self.sites[to].vault()?;
                let at = receiver
                    .branches(&name)
                    .map_err(|error| error.to_string())?
                    .into_iter()
                    .find(|(branch, _)| branch == "main")
                    .map(|(_, cid)| cid);
                if at != Some(head) {
                    return Err(format!(
                        "sync did not converge: {name}'s main is {head} at site {from}, {at:?} at site {to} ({:?})",
                        summary.moved
                    ));
                }
                let owner = &self.sites[from];
                // The owner's contract travelled with the send.
                if let Some(expected) = &owner.contract {
                    let record = receiver
                        .volume_record(&name)
                        .map_err(|error| error.to_string())?
                        .ok_or_else(|| format!("site {to} has no volume {name}"))?;
                    let held = receiver
                        .attached_contract(&record)
                        .map_err(|error| format!("site {to}: {name}'s contract: {error}"))?
                        .map(|(_, _, contract)| contract.encode());
                    if held.as_ref() != Some(expected) {
                        return Err(format!(
                            "site {to} does not hold the contract site {from} attached to {name} last ({})",
                            if held.is_some() {
                                "it holds another"
                            } else {
                                "it holds none"
                            }
                        ));
                    }
                }
                if owner.shared_with.contains(&to) {
                    export_matches(
                        receiver,
                        &name,
                        &SnapshotSelector::Branch("main".into()),
                        &tree,
                        &scratch,
                    )
                    .map_err(|reason| format!("site {to}: received {name} at {head}: {reason}"))?;
                } else if owner
                    .unshared_at
                    .get(&to)
                    .is_some_and(|at| owner.main_head_import > *at)
                {
                    // Revoked before this head was made: it must stay unreadable there.
                    let _ = std::fs::remove_dir_all(&scratch);
                    let read = receiver.export(
                        &name,
                        &scratch,
                        &SnapshotSelector::Branch("main".into()),
                        &ExportOptions::default(),
                        &no_passphrase,
                        &Progress::new("export", false),
                    );
                    let _ = std::fs::remove_dir_all(&scratch);
                    if read.is_ok() {
                        return Err(format!(
                            "site {to} read {name} at {head}, made after the volume was unshared from it"
                        ));
                    }
                }
            }
        }
        self.log
            .note("every site's main converged at every other site");
        // Every site proves it holds what it received: each owner audits every other
        // site on its head's chunks, and every sample must verify.
        for from in 0..self.sites.len() {
            if !self.sites[from].branches.contains_key("main") {
                continue;
            }
            let name = volume_name(from);
            let (head, samples) = match self.sites[from].vault()?.audit_samples(&name, "main", 16) {
                Ok(chosen) => chosen,
                // A head of inline files and empty ones only: no chunk to audit.
                Err(forge_node::NodeError::InvalidArgument { what: "audit", .. }) => continue,
                Err(error) => {
                    return Err(format!("site {from}: no audit samples of {name}: {error}"));
                }
            };
            for to in (0..self.sites.len()).filter(|to| *to != from) {
                let verdicts = forge_mesh::audit::audit(
                    &*self.sites[from].peer,
                    self.sites[to].id,
                    &samples,
                    Duration::from_secs(10),
                )
                .await
                .map_err(|error| format!("site {from} could not audit site {to}: {error}"))?;
                for (sample, verdict) in samples.iter().zip(verdicts) {
                    if verdict != forge_mesh::audit::Verdict::Passed {
                        return Err(format!(
                            "site {to} failed the audit of {name} at {head} on chunk {}: {verdict:?}",
                            sample.cid
                        ));
                    }
                }
            }
        }
        self.log.note("every site passed its audits");
        // Nothing stored fails its cid: scrub repairs what the disk damaged, then fsck
        // must be clean everywhere.
        for site in &self.sites {
            let vault = site.vault()?;
            vault
                .scrub(true, &Progress::new("scrub", false))
                .map_err(|error| format!("site {}: scrub failed: {error}", site.index))?;
            let fsck = vault
                .fsck(None, &Progress::new("fsck", false))
                .map_err(|error| format!("site {}: fsck failed: {error}", site.index))?;
            if let Some(problem) = fsck.problems.first() {
                return Err(format!(
                    "site {}: fsck found {} problems, the first: {problem:?}",
                    site.index,
                    fsck.problems.len()
                ));
            }
        }
        self.log.note("fsck is clean at every site");
        Ok(())
    }
}
