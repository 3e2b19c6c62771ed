//! Bugs the simulator re-introduces on purpose, to show it finds them (`forge-sim
//! --inject-bug NAME`). Compiled only with the `simulation` feature; production code asks
//! through [`crate::injected_bug!`], which is the constant `false` without it.
//!
//! The switch is process-wide: the simulator runs one configuration per process (its
//! determinism check runs seeds in separate processes anyway), and the code that consults
//! it runs on the vault's own threads as well as the runtime's.

use std::sync::{Mutex, PoisonError};

/// A bug the simulator can switch on: its name and what it breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownBug {
    /// The name `--inject-bug` takes.
    pub name: &'static str,
    /// What the code does wrong while it is on.
    pub effect: &'static str,
}

/// Every bug the code can be told to have.
pub const KNOWN_BUGS: &[KnownBug] = &[
    KnownBug {
        name: "ack-before-fsync",
        effect: "an import acknowledges its snapshot without flushing its unlogged chunk \
                 data first (a power cut then loses chunks of an acknowledged snapshot)",
    },
    KnownBug {
        name: "gc-ignores-branch",
        effect: "gc traces only the snapshots reachable from branch main (the heads of \
                 other branches are swept)",
    },
    KnownBug {
        name: "apply-uncommitted",
        effect: "a Raft member applies an entry's writes to its state machine when the \
                 entry is appended, before it is committed (forge-sim --scenario raft)",
    },
    KnownBug {
        name: "repair-wrong-node",
        effect: "a volume group's repair rebuilds each shard on the member placed after \
                 its owner, not on the owner (forge-sim --scenario groups)",
    },
    KnownBug {
        name: "sync-skips-cid-check",
        effect: "a sync receiver stores chunks without checking that their bytes hash to \
                 their cid",
    },
];

static ACTIVE: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// Switches bug `name` on for the rest of the process.
///
/// # Errors
/// No such bug: the known names.
pub fn inject(name: &str) -> Result<(), String> {
    let Some(bug) = KNOWN_BUGS.iter().find(|bug| bug.name == name) else {
        let names: Vec<&str> = KNOWN_BUGS.iter().map(|bug| bug.name).collect();
        return Err(format!(
            "no bug is named {name:?}; known: {}",
            names.join(", ")
        ));
    };
    let mut active = ACTIVE.lock().unwrap_or_else(PoisonError::into_inner);
    if !active.contains(&bug.name) {
        active.push(bug.name);
    }
    Ok(())
}

/// Whether bug `name` is switched on.
#[must_use]
pub fn active(name: &str) -> bool {
    debug_assert!(
        KNOWN_BUGS.iter().any(|bug| bug.name == name),
        "an injected bug must be listed in KNOWN_BUGS: {name}"
    );
    ACTIVE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .contains(&name)
}

/// Fault points (BUGGIFY): places in production code where the simulator may make
/// something go wrong that the code must survive, each firing with the odds the run
/// armed it with. Per thread (a seed's run is on one thread, and seeds run side by side),
/// drawn from the run's seed, so a replay fires at the same moments.
pub mod points {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// Every fault point, for the simulator's listing.
    pub const KNOWN_POINTS: &[(&str, &str)] = &[(
        "sync-sender-bitflip",
        "a sync sender's chunk bytes are damaged after it read and verified them (memory), \
         beneath the wire's integrity check: the receiver's cid check must refuse them",
    )];

    struct Armed {
        state: u64,
        odds_percent: BTreeMap<&'static str, u64>,
        fired: u64,
    }

    thread_local! {
        static ARMED: RefCell<Option<Armed>> = const { RefCell::new(None) };
    }

    /// Arms the fault points on this thread: each of `odds` (name, percent) fires with
    /// that chance, drawn from `seed`.
    pub fn arm(seed: u64, odds: &[(&'static str, u64)]) {
        ARMED.with(|armed| {
            *armed.borrow_mut() = Some(Armed {
                state: seed ^ 0xb066_1f1e_d000_0001,
                odds_percent: odds.iter().copied().collect(),
                fired: 0,
            });
        });
    }

    /// Disarms this thread's fault points; how many times they fired.
    pub fn disarm() -> u64 {
        ARMED.with(|armed| armed.borrow_mut().take().map_or(0, |armed| armed.fired))
    }

    /// Whether fault point `name` fires now (never when unarmed).
    pub fn fire(name: &str) -> bool {
        ARMED.with(|armed| {
            let mut armed = armed.borrow_mut();
            let Some(armed) = armed.as_mut() else {
                return false;
            };
            let Some(&percent) = armed.odds_percent.get(name) else {
                return false;
            };
            // SplitMix64.
            armed.state = armed.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = armed.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            let fires = (z ^ (z >> 31)) % 100 < percent;
            armed.fired += u64::from(fires);
            fires
        })
    }
}
