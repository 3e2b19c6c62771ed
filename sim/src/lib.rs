//! forge-sim: deterministic simulation. Every random choice of a run (the network's loss,
//! delay, duplication and reordering, the nemesis's partitions and crashes, openraft's
//! election timeouts, tokio's `select!` order) derives from one `u64` seed, on a
//! single-threaded tokio runtime whose clock is simulated (paused, advanced only when
//! every task waits). The same seed gives the same run, byte for byte: the run's trace
//! hash says so, and a failing seed replays with the command it prints.
//!
//! Why not turmoil: forge's protocols already sit behind the `PeerNet` seam, whose
//! in-process network ([`forge_mesh::memory::MemoryNetwork`]) injects seeded faults and
//! partitions and hashes a trace; turmoil's value is simulating sockets, which nothing
//! here opens (libp2p cannot run in a simulator anyway: its timers use real threads).
//! Disks are [`forge_store::kv::MemKv`] with its power-cut model.
//!
//! [`raft`]: a 3–5 node Raft group under faults. [`groups`]: whole nodes with their
//! cluster (Raft groups, shards) forming a volume group (a first scenario). [`sites`]:
//! whole vaults (import, snapshots, gc, scrub) syncing volumes between sites under
//! faults and crashes.

pub mod groups;
pub mod raft;
pub mod sites;

/// SplitMix64: the harness's own random numbers (seeded, portable, no dependency).
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator whose sequence follows from `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `[low, high)` (`low` when the range is empty).
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        low + self.next_u64() % (high - low)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.range(0, 100) < percent
    }
}

/// Builds the single-threaded, paused-clock runtime a run executes on, its scheduler's
/// own randomness seeded too.
///
/// # Errors
/// The runtime could not be built.
pub fn runtime(seed: u64) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()))
        .build()
}

/// Where a run's scratch files go (the trees it imports, the snapshots it exports to
/// compare): `FORGE_SIM_SCRATCH` when set, else `/dev/shm` when it takes a directory,
/// else the system's temporary directory.
///
/// A seed writes and deletes a few thousand files; on ext4 their inodes' allocation
/// took a fifth of a groups run's time (sys 9 s of 31 on 24 seeds, 4.8 s on tmpfs).
/// What a seed checks does not depend on where: the same seed gives the same trace.
///
/// # Errors
/// No directory could be made in any of them.
pub fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    let make = |base: &std::path::Path| {
        tempfile::Builder::new()
            .prefix("forge-sim-")
            .tempdir_in(base)
    };
    if let Some(base) = std::env::var_os("FORGE_SIM_SCRATCH") {
        return make(std::path::Path::new(&base));
    }
    let memory = std::path::Path::new("/dev/shm");
    if memory.is_dir()
        && let Ok(dir) = make(memory)
    {
        return Ok(dir);
    }
    make(&std::env::temp_dir())
}

/// A partition the nemesis makes (and a flapping one makes again).
#[derive(Debug, Clone)]
pub(crate) enum Cut {
    /// Messages from the first to the second are lost; the other way works.
    OneWay(forge_crypto::NodeId, forge_crypto::NodeId),
    /// The two sides cannot reach each other.
    Apart(Vec<forge_crypto::NodeId>, Vec<forge_crypto::NodeId>),
}

impl Cut {
    pub(crate) fn apply(&self, network: &forge_mesh::memory::MemoryNetwork) {
        match self {
            Self::OneWay(from, to) => network.block_one_way(*from, *to),
            Self::Apart(first, second) => network.partition(first, second),
        }
    }
}

/// Makes `cut` on `network`, flapping three times in ten (drawn from `flap_rng`, a stream
/// of its own: a seed whose partitions do not flap draws as it did before they could).
/// Returns the flapping, if it flaps, and the line to log (`what`, with the period).
pub(crate) fn make_partition(
    network: &forge_mesh::memory::MemoryNetwork,
    flap_rng: &mut SimRng,
    cut: Cut,
    what: String,
) -> (Option<Flapping>, String) {
    cut.apply(network);
    if !flap_rng.chance(30) {
        return (None, what);
    }
    let period = flap_rng.range(100, 800);
    let flapping = Flapping::start(
        network.clone(),
        cut,
        std::time::Duration::from_millis(period),
    );
    (
        Some(flapping),
        format!("{what}, flapping every {period} ms"),
    )
}

/// A flapping partition: a task heals its cut and puts it back every period of
/// simulated time, until this is dropped (the nemesis healing it, or heal).
#[derive(Debug)]
pub(crate) struct Flapping(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Flapping {
    /// Starts flapping `cut` (already made) on `network`, on the current runtime.
    pub(crate) fn start(
        network: forge_mesh::memory::MemoryNetwork,
        cut: Cut,
        period: std::time::Duration,
    ) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        tokio::spawn(async move {
            let mut cut_now = true;
            loop {
                tokio::time::sleep(period).await;
                // Checked before each toggle: nothing flaps once dropped.
                if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                if cut_now {
                    network.heal();
                } else {
                    cut.apply(&network);
                }
                cut_now = !cut_now;
            }
        });
        Self(stop)
    }
}

impl Drop for Flapping {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
