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
/// armed it with. Armed per run, drawn from the run's seed so a replay fires at the same
/// moments: the run's runtime thread holds the state, and the threads that run in
/// lockstep with it (one at a time: `forge_node::lockstep`) share it, so a point on a
/// vault thread draws from the same sequence. Seeds running side by side on other
/// threads have their own.
pub mod points {
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex, PoisonError};

    /// Every fault point, for the simulator's listing.
    pub const KNOWN_POINTS: &[(&str, &str)] = &[
        (
            "sync-sender-bitflip",
            "a sync sender's chunk bytes are damaged after it read and verified them \
             (memory), beneath the wire's integrity check: the receiver's cid check must \
             refuse them",
        ),
        (
            "shard-store-fails",
            "a group member refuses to store the shards it was sent (its disk failed the \
             write): the publish or repair that sent them must not count them",
        ),
        (
            "shard-answer-slow",
            "a group member answers a shard request 3 s late (a slow disk, a busy node)",
        ),
        (
            "gather-fails",
            "reading a chunk back from the group's shards fails at once (as if no member \
             answered): an export retries, a repair leaves it in its backlog",
        ),
        (
            "publish-answer-lost",
            "a group publish commits, but its member is told it failed (the answer lost): \
             the import reports an error, and what the group committed must still be \
             whole and listed everywhere",
        ),
    ];

    struct Armed {
        state: u64,
        odds_percent: BTreeMap<&'static str, u64>,
        fired: u64,
    }

    /// A run's armed fault points, as handed to a thread that runs in lockstep with it.
    #[derive(Clone)]
    pub struct Shared(Arc<Mutex<Armed>>);

    impl std::fmt::Debug for Shared {
        fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str("armed fault points")
        }
    }

    thread_local! {
        static ARMED: RefCell<Option<Shared>> = const { RefCell::new(None) };
    }

    /// Arms the fault points on this thread: each of `odds` (name, percent) fires with
    /// that chance, drawn from `seed`.
    pub fn arm(seed: u64, odds: &[(&'static str, u64)]) {
        let armed = Armed {
            state: seed ^ 0xb066_1f1e_d000_0001,
            odds_percent: odds.iter().copied().collect(),
            fired: 0,
        };
        ARMED.with(|slot| *slot.borrow_mut() = Some(Shared(Arc::new(Mutex::new(armed)))));
    }

    /// Disarms this thread's fault points; how many times they fired.
    pub fn disarm() -> u64 {
        ARMED.with(|slot| {
            slot.borrow_mut().take().map_or(0, |shared| {
                shared
                    .0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .fired
            })
        })
    }

    /// Stops every armed point of this thread's run from firing again (the run heals:
    /// what follows checks liveness), on every thread that shares them.
    pub fn calm() {
        if let Some(shared) = shared() {
            shared
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .odds_percent
                .clear();
        }
    }

    /// This thread's armed points, to hand to a thread that runs in lockstep with it.
    #[must_use]
    pub fn shared() -> Option<Shared> {
        ARMED.with(|slot| slot.borrow().clone())
    }

    /// Makes `shared` this thread's armed points; returns what it had, to put back.
    pub fn adopt(shared: Option<Shared>) -> Option<Shared> {
        ARMED.with(|slot| std::mem::replace(&mut *slot.borrow_mut(), shared))
    }

    /// Whether fault point `name` fires now (never when unarmed).
    pub fn fire(name: &str) -> bool {
        debug_assert!(
            KNOWN_POINTS.iter().any(|(known, _)| *known == name),
            "a fault point must be listed in KNOWN_POINTS: {name}"
        );
        let Some(shared) = shared() else {
            return false;
        };
        let mut armed = shared.0.lock().unwrap_or_else(PoisonError::into_inner);
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
    }
}

/// Slow disks: a store the simulator made slow ([`crate::kv::MemKv::set_slow`]) does not
/// sleep where it is called (the caller may hold locks, and under the simulator's
/// lockstep only one thread runs: a sleep there hands the turn to code that may wait on
/// that lock). It adds its cost to what the work calling it owes, and the work pays it
/// where it holds nothing: a lockstep job when it ends, a Raft log write before it
/// reports the write done. Work that adopted no account (plain runtime tasks) pays
/// nothing.
pub mod slow_disks {
    use std::cell::RefCell;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// What a piece of work owes its slow disks, in nanoseconds; shared by the threads
    /// it runs on.
    #[derive(Debug, Clone, Default)]
    pub struct Owed(Arc<AtomicU64>);

    impl Owed {
        /// Takes what is owed (the account is then clear).
        #[must_use]
        pub fn take(&self) -> Duration {
            Duration::from_nanos(self.0.swap(0, Ordering::Relaxed))
        }
    }

    thread_local! {
        static ACCOUNT: RefCell<Option<Owed>> = const { RefCell::new(None) };
    }

    /// Makes `owed` this thread's account; returns the one it had, to put back.
    pub fn adopt(owed: Option<Owed>) -> Option<Owed> {
        ACCOUNT.with(|slot| std::mem::replace(&mut *slot.borrow_mut(), owed))
    }

    /// This thread's account, to hand to a thread that works for the same job.
    #[must_use]
    pub fn current() -> Option<Owed> {
        ACCOUNT.with(|slot| slot.borrow().clone())
    }

    /// Adds `cost` to this thread's account, if it has one.
    pub fn owe(cost: Duration) {
        ACCOUNT.with(|slot| {
            if let Some(owed) = &*slot.borrow() {
                let nanos = u64::try_from(cost.as_nanos()).unwrap_or(u64::MAX);
                owed.0.fetch_add(nanos, Ordering::Relaxed);
            }
        });
    }

    /// Runs synchronous `work` with an account of its own: what it returns, and what it
    /// owes (for the caller to pay once it holds nothing).
    pub fn collect<T>(work: impl FnOnce() -> T) -> (T, Duration) {
        /// Puts the thread's account back, also when the work panics.
        struct Restore(Option<Owed>);
        impl Drop for Restore {
            fn drop(&mut self) {
                adopt(self.0.take());
            }
        }
        let owed = Owed::default();
        let restore = Restore(adopt(Some(owed.clone())));
        let output = work();
        drop(restore);
        (output, owed.take())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn work_owes_what_its_slow_disks_cost_and_only_inside_its_account() {
            owe(Duration::from_secs(9));
            let ((), owed) = collect(|| {
                owe(Duration::from_millis(300));
                owe(Duration::from_millis(200));
            });
            assert_eq!(owed, Duration::from_millis(500));
            assert!(current().is_none(), "the account ends with its work");
            let ((), nothing) = collect(|| {});
            assert_eq!(
                nothing,
                Duration::ZERO,
                "owed outside an account is dropped"
            );
        }
    }
}
