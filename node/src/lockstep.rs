//! Lockstep: synchronous node code inside the single-threaded simulation, deterministically.
//!
//! The vault is synchronous; where it needs its volume group (a publish, a pin, a
//! linearizable read) it blocks on a future of the daemon's runtime (`daemon/groups.rs`'s
//! `wait`). The simulator runs every node on one current-thread runtime with a paused
//! clock, where blocking that thread would deadlock and running the vault on a second
//! thread would let the operating system choose the order of events.
//!
//! [`run`] runs a synchronous closure on a thread of its own (one of the lockstep
//! threads, kept for the next closure once it ends), in lockstep with the runtime:
//! exactly one of the two runs at any moment. The closure runs while the runtime
//! thread waits; when the closure blocks on a future ([`block_on`]), the closure's thread
//! polls it and, when it is pending, hands the turn back: the runtime runs its tasks (and
//! advances simulated time) until the future is woken, then hands the turn to the
//! closure's thread again, which polls once more. Every switch happens at a point the
//! runtime's own schedule decides, so a seed still gives one order of events. The future
//! may borrow from the closure's stack: it is polled there.
//!
//! Outside a lockstep closure, [`block_on`] is not available ([`current`] is `None`): the
//! daemon blocks on its multi-thread runtime as before.

use std::cell::RefCell;
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// Whose turn it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// The closure's thread runs; the runtime thread waits.
    Closure,
    /// The closure's future is pending: the runtime runs until it is woken.
    Parked,
    /// The closure returned (or panicked).
    Finished,
}

/// The turn, handed between the two threads.
#[derive(Debug)]
struct Baton {
    turn: Mutex<Turn>,
    changed: Condvar,
    /// Wakes the runtime side when the closure's future is woken.
    woken: tokio::sync::Notify,
}

impl Baton {
    fn set(&self, turn: Turn) {
        *self.turn.lock().unwrap_or_else(PoisonError::into_inner) = turn;
        self.changed.notify_all();
    }

    /// Waits (blocking this thread) until the turn is no longer `turn`; returns the new one.
    fn wait_while(&self, turn: Turn) -> Turn {
        let guard = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        *self
            .changed
            .wait_while(guard, |current| *current == turn)
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Wakes the runtime side (the closure's future can make progress).
struct FutureWaker(Arc<Baton>);

impl Wake for FutureWaker {
    fn wake(self: Arc<Self>) {
        self.0.woken.notify_one();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.woken.notify_one();
    }
}

/// What a lockstep closure's thread knows: the baton and the runtime's handle.
#[derive(Debug, Clone)]
pub struct Lockstep {
    baton: Arc<Baton>,
    runtime: tokio::runtime::Handle,
    /// The run's armed fault points: a point on the closure's thread draws from the
    /// run's sequence (one thread runs at a time, so the order is the seed's).
    #[cfg(feature = "simulation")]
    faults: Option<forge_store::faults::points::Shared>,
    /// What the closure's slow disks cost it, paid when it ends (it holds no lock then;
    /// see `forge_store::faults::slow_disks`).
    #[cfg(feature = "simulation")]
    owed: forge_store::faults::slow_disks::Owed,
}

thread_local! {
    static CURRENT: RefCell<Option<Lockstep>> = const { RefCell::new(None) };
    /// This thread runs the simulator's runtime, or a lockstep closure of it.
    static SIMULATED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `work` on this thread as part of `lockstep`'s closure (a worker thread the
/// closure handed its work to and waits on, as the vault's pool: still one thread at a
/// time). With `None`, runs `work` as it is.
pub fn within<T>(lockstep: Option<Lockstep>, work: impl FnOnce() -> T) -> T {
    let Some(lockstep) = lockstep else {
        return work();
    };
    #[cfg(feature = "simulation")]
    let previous_faults = forge_store::faults::points::adopt(lockstep.faults.clone());
    #[cfg(feature = "simulation")]
    let previous_owed = forge_store::faults::slow_disks::adopt(Some(lockstep.owed.clone()));
    let previous = CURRENT.with(|current| current.borrow_mut().replace(lockstep));
    let was_simulated = SIMULATED.with(|simulated| simulated.replace(true));
    let restore = Restore {
        previous,
        was_simulated,
        #[cfg(feature = "simulation")]
        previous_faults,
        #[cfg(feature = "simulation")]
        previous_owed,
    };
    let output = work();
    drop(restore);
    output
}

/// Puts a thread's lockstep state back (also when the work panics).
struct Restore {
    previous: Option<Lockstep>,
    was_simulated: bool,
    #[cfg(feature = "simulation")]
    previous_faults: Option<forge_store::faults::points::Shared>,
    #[cfg(feature = "simulation")]
    previous_owed: Option<forge_store::faults::slow_disks::Owed>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        CURRENT.with(|current| *current.borrow_mut() = self.previous.take());
        SIMULATED.with(|simulated| simulated.set(self.was_simulated));
        #[cfg(feature = "simulation")]
        forge_store::faults::points::adopt(self.previous_faults.take());
        #[cfg(feature = "simulation")]
        forge_store::faults::slow_disks::adopt(self.previous_owed.take());
    }
}

/// Marks this thread as the simulator's: [`spawn_blocking`] runs its closures in
/// lockstep here. The simulator calls it on its runtime's thread before running it.
pub fn simulate_on_this_thread() {
    SIMULATED.with(|simulated| simulated.set(true));
    // The sync protocol's store work (a receiver's answers, a sender's reads) too: for a
    // grouped volume it waits on the group, which only a lockstep closure can.
    forge_mesh::blocking::install_on_this_thread(|job| Box::pin(run(job)), block_on);
}

/// Runs synchronous `closure` off the async tasks: on tokio's blocking pool in the
/// daemon; in lockstep with the runtime under the simulator (see
/// [`simulate_on_this_thread`]). Either way a task to await, whose panic is its error.
pub fn spawn_blocking<T: Send + 'static>(
    closure: impl FnOnce() -> T + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    if SIMULATED.with(std::cell::Cell::get) {
        tokio::spawn(run(closure))
    } else {
        tokio::task::spawn_blocking(closure)
    }
}

/// The lockstep of this thread, if it runs a lockstep closure.
#[must_use]
pub fn current() -> Option<Lockstep> {
    CURRENT.with(|current| current.borrow().clone())
}

impl Lockstep {
    /// Blocks this (closure's) thread on `future`, letting the runtime run whenever the
    /// future waits.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        let _entered = self.runtime.enter();
        let waker = Waker::from(Arc::new(FutureWaker(self.baton.clone())));
        let mut future = std::pin::pin!(future);
        loop {
            if let Poll::Ready(output) = self.poll_seeded(future.as_mut(), &waker) {
                return output;
            }
            self.baton.set(Turn::Parked);
            self.baton.wait_while(Turn::Parked);
        }
    }

    /// Polls `future` once with tokio's per-thread random generator seeded from the
    /// runtime's seed.
    ///
    /// tokio's `select!` picks the branch it polls first with that generator; on a thread
    /// that never entered the runtime it is seeded from the operating system, so an
    /// unbiased `select!` polled here (a shard read's hedged requests) chose differently
    /// from run to run. Entering the runtime (`Handle::block_on`) seeds it from the
    /// runtime's seed generator, which these polls (in lockstep order) advance in the
    /// same order every run. Unconstrained: tokio's task budget is the runtime thread's
    /// business, and a thread outside it had none before. A poll inside another (a
    /// future that blocks on one of its own) polls as it is: the outer one seeded the
    /// generator already, and a runtime cannot be entered twice.
    fn poll_seeded<F: Future>(
        &self,
        mut future: std::pin::Pin<&mut F>,
        waker: &Waker,
    ) -> Poll<F::Output> {
        thread_local! {
            static POLLING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        }
        let mut poll_once = || future.as_mut().poll(&mut Context::from_waker(waker));
        if POLLING.with(|polling| polling.replace(true)) {
            return poll_once();
        }
        struct Done;
        impl Drop for Done {
            fn drop(&mut self) {
                POLLING.with(|polling| polling.set(false));
            }
        }
        let _done = Done;
        self.runtime
            .block_on(tokio::task::unconstrained(std::future::poll_fn(|_| {
                Poll::Ready(poll_once())
            })))
    }
}

/// [`Lockstep::block_on`] on this thread's lockstep.
///
/// # Panics
/// Outside a lockstep closure (a caller checks [`current`] first).
pub fn block_on<F: Future>(future: F) -> F::Output {
    match current() {
        Some(lockstep) => lockstep.block_on(future),
        None => panic!("lockstep::block_on outside a lockstep closure"),
    }
}

/// Sleeps `duration`: in simulated time on a lockstep closure's thread, else this
/// thread's real sleep (the daemon).
pub fn sleep(duration: std::time::Duration) {
    match current() {
        Some(lockstep) => lockstep.block_on(tokio::time::sleep(duration)),
        None => std::thread::sleep(duration),
    }
}

/// Runs `closure` in lockstep with this runtime (see the module's documentation) and
/// returns what it returns. Called from a task of a current-thread runtime.
///
/// # Panics
/// When the closure panics (its panic is resumed here), or its thread cannot start.
pub async fn run<T: Send + 'static>(closure: impl FnOnce() -> T + Send + 'static) -> T {
    let baton = Arc::new(Baton {
        turn: Mutex::new(Turn::Closure),
        changed: Condvar::new(),
        woken: tokio::sync::Notify::new(),
    });
    let lockstep = Lockstep {
        baton: baton.clone(),
        runtime: tokio::runtime::Handle::current(),
        #[cfg(feature = "simulation")]
        faults: forge_store::faults::points::shared(),
        #[cfg(feature = "simulation")]
        owed: forge_store::faults::slow_disks::Owed::default(),
    };
    let result: Arc<Mutex<Option<std::thread::Result<T>>>> = Arc::new(Mutex::new(None));
    let slot = result.clone();
    let job = move || {
        // Declared first, dropped last: the runtime's thread goes on only once this
        // thread has put everything of the job away (also when the job panics).
        let done = JobDone(lockstep.baton.clone());
        let previous = CURRENT.with(|current| current.borrow_mut().replace(lockstep.clone()));
        debug_assert!(previous.is_none(), "a lockstep worker between two jobs");
        #[cfg(feature = "simulation")]
        forge_store::faults::points::adopt(lockstep.faults.clone());
        #[cfg(feature = "simulation")]
        forge_store::faults::slow_disks::adopt(Some(lockstep.owed.clone()));
        let outcome = {
            // The runtime's context for the whole closure: futures it makes (a timer, a
            // channel) belong to the simulated runtime.
            let _entered = lockstep.runtime.enter();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(closure));
            // Its slow disks' time, now that it holds nothing: what it did is done (and
            // seen by others), its caller learns so that much later.
            #[cfg(feature = "simulation")]
            {
                let owed = lockstep.owed.take();
                if !owed.is_zero() {
                    lockstep.block_on(tokio::time::sleep(owed));
                }
            }
            outcome
        };
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(outcome);
        drop(lockstep);
        drop(done);
    };
    let worker = IDLE_WORKERS
        .with(|idle| idle.borrow_mut().pop())
        .unwrap_or_else(Worker::start);
    worker.give(Box::new(job));
    loop {
        // The closure's turn: this thread waits for it to park or finish.
        match baton.wait_while(Turn::Closure) {
            Turn::Finished => break,
            Turn::Parked => {
                // The runtime's turn, until the closure's future is woken.
                baton.woken.notified().await;
                baton.set(Turn::Closure);
            }
            Turn::Closure => {}
        }
    }
    // Free again (the job's last act was to say so): the next closure run from this
    // thread takes it. Last in, first out, in the runtime's order: which thread runs
    // which closure follows from the seed too.
    IDLE_WORKERS.with(|idle| idle.borrow_mut().push(worker));
    let outcome = result
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
        .unwrap_or_else(|| panic!("a lockstep closure ended without a result"));
    match outcome {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// When a job ends, however it ends: puts its lockstep state on this thread away (the
/// thread's next job starts clean), then hands the turn back for good.
struct JobDone(Arc<Baton>);

impl Drop for JobDone {
    fn drop(&mut self) {
        CURRENT.with(|current| current.borrow_mut().take());
        #[cfg(feature = "simulation")]
        forge_store::faults::points::adopt(None);
        #[cfg(feature = "simulation")]
        forge_store::faults::slow_disks::adopt(None);
        self.0.set(Turn::Finished);
    }
}

thread_local! {
    /// The lockstep threads free to run a closure for this (runtime's) thread. Starting
    /// and joining a thread for each closure cost about 60 µs, thousands of times a
    /// simulated seed: a tenth of a groups run.
    static IDLE_WORKERS: RefCell<Vec<Worker>> = const { RefCell::new(Vec::new()) };
}

/// A job for a lockstep thread.
type Job = Box<dyn FnOnce() + Send>;

/// What a lockstep thread is told to do next.
enum Order {
    Wait,
    Run(Job),
    Stop,
}

/// A thread that runs lockstep closures, one after another. Dropping it tells it to stop
/// once its job (if any) ends, without waiting: a `run` dropped while its closure waits
/// (the runtime shut down, a task aborted) leaves that closure parked for good, as a
/// thread of its own did before.
struct Worker {
    order: Arc<(Mutex<Order>, Condvar)>,
}

impl Worker {
    /// A new lockstep thread, waiting for its first job.
    fn start() -> Self {
        let order = Arc::new((Mutex::new(Order::Wait), Condvar::new()));
        let orders = order.clone();
        std::thread::Builder::new()
            .name("forge-lockstep".into())
            .spawn(move || {
                simulate_on_this_thread();
                loop {
                    let next = {
                        let (order, changed) = &*orders;
                        let mut order = changed
                            .wait_while(
                                order.lock().unwrap_or_else(PoisonError::into_inner),
                                |order| matches!(order, Order::Wait),
                            )
                            .unwrap_or_else(PoisonError::into_inner);
                        std::mem::replace(&mut *order, Order::Wait)
                    };
                    match next {
                        // A job catches its closure's panic; one escaping past that
                        // (its bookkeeping) has run its `JobDone` while unwinding.
                        Order::Run(job) => {
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                        }
                        Order::Stop => return,
                        Order::Wait => {}
                    }
                }
            })
            .unwrap_or_else(|error| panic!("starting a lockstep thread: {error}"));
        Self { order }
    }

    fn give(&self, job: Job) {
        self.tell(Order::Run(job));
    }

    fn tell(&self, next: Order) {
        let (order, changed) = &*self.order;
        *order.lock().unwrap_or_else(PoisonError::into_inner) = next;
        changed.notify_one();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.tell(Order::Stop);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    fn paused_runtime(seed: u64) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()))
            .build()
            .unwrap()
    }

    /// Two closures blocking on simulated sleeps and a channel, beside runtime tasks: the
    /// order of everything they log is the same on every run, and simulated time passes
    /// as the sleeps say.
    fn trace(seed: u64) -> Vec<String> {
        let runtime = paused_runtime(seed);
        runtime.block_on(async {
            let log = Arc::new(Mutex::new(Vec::new()));
            let note = |log: &Arc<Mutex<Vec<String>>>, what: String| {
                log.lock().unwrap().push(what);
            };
            let (sender, mut receiver) = tokio::sync::mpsc::channel::<u32>(4);
            let start = tokio::time::Instant::now();
            let ticker = {
                let log = log.clone();
                tokio::spawn(async move {
                    for tick in 0..5u32 {
                        tokio::time::sleep(Duration::from_millis(7)).await;
                        log.lock().unwrap().push(format!("tick {tick}"));
                        let _ = sender.send(tick).await;
                    }
                })
            };
            let first = {
                let log = log.clone();
                tokio::spawn(run(move || {
                    let mut sum = 0;
                    for _ in 0..5 {
                        // Work that takes real time, then a wait on the runtime.
                        sum += (0..20_000u64).map(|n| n % 7).sum::<u64>();
                        let got = block_on(receiver.recv()).unwrap();
                        note(&log, format!("closure got {got}"));
                    }
                    sum
                }))
            };
            let second = {
                let log = log.clone();
                tokio::spawn(run(move || {
                    for step in 0..3 {
                        block_on(tokio::time::sleep(Duration::from_millis(10)));
                        note(&log, format!("sleeper woke {step}"));
                    }
                }))
            };
            assert!(first.await.unwrap() > 0);
            second.await.unwrap();
            ticker.await.unwrap();
            let trace = log.lock().unwrap().clone();
            assert_eq!(start.elapsed(), Duration::from_millis(35), "simulated time");
            trace
        })
    }

    #[test]
    fn lockstep_closures_interleave_the_same_way_on_every_run() {
        let expected = trace(7);
        assert_eq!(expected.len(), 13, "{expected:?}");
        for _ in 0..20 {
            assert_eq!(trace(7), expected);
        }
    }

    /// An unbiased `select!` a closure blocks on picks its branches from the runtime's
    /// seed: the same picks on every run (they were drawn from the operating system on
    /// the closure's thread, seed 1700032's two traces).
    #[test]
    fn select_in_a_closure_picks_the_same_branches_on_every_run() {
        let picks = |seed: u64| {
            paused_runtime(seed).block_on(run(|| {
                (0..64)
                    .map(|_| {
                        block_on(async {
                            tokio::select! {
                                () = std::future::ready(()) => 0u8,
                                () = std::future::ready(()) => 1u8,
                            }
                        })
                    })
                    .collect::<Vec<u8>>()
            }))
        };
        let first = picks(9);
        assert!(first.contains(&0) && first.contains(&1), "{first:?}");
        for _ in 0..5 {
            assert_eq!(picks(9), first);
        }
    }

    /// Under the simulator, spawn_blocking is a lockstep task: its work takes no simulated
    /// time and its order is the runtime's.
    #[test]
    fn spawn_blocking_runs_in_lockstep_under_the_simulator() {
        let trace = || {
            let runtime = paused_runtime(3);
            std::thread::spawn(move || {
                simulate_on_this_thread();
                runtime.block_on(async {
                    let log = Arc::new(Mutex::new(Vec::new()));
                    let tasks: Vec<_> = (0..3)
                        .map(|index| {
                            let log = log.clone();
                            spawn_blocking(move || {
                                for step in 0..3 {
                                    sleep(Duration::from_millis(5 * (index + 1)));
                                    log.lock().unwrap().push((index, step));
                                }
                                index
                            })
                        })
                        .collect();
                    for (index, task) in tasks.into_iter().enumerate() {
                        assert_eq!(task.await.unwrap(), index as u64);
                    }
                    log.lock().unwrap().clone()
                })
            })
            .join()
            .unwrap()
        };
        let first = trace();
        assert_eq!(first.len(), 9);
        // In simulated time order: task i's step s happens at 5 (i + 1) (s + 1) ms.
        let times: Vec<u64> = first
            .iter()
            .map(|(index, step)| 5 * (index + 1) * (step + 1))
            .collect();
        assert!(times.is_sorted(), "{first:?}");
        for _ in 0..10 {
            assert_eq!(trace(), first);
        }
        let panicked = paused_runtime(4).block_on(async {
            simulate_on_this_thread();
            spawn_blocking(|| -> u8 { panic!("in the blocking work") }).await
        });
        assert!(panicked.unwrap_err().is_panic());
    }

    #[test]
    fn a_closure_borrows_into_its_future_and_its_panic_reaches_the_caller() {
        let runtime = paused_runtime(1);
        runtime.block_on(async {
            let doubled = run(|| {
                let local = [1, 2, 3];
                block_on(async { local.iter().map(|n| n * 2).collect::<Vec<_>>() })
            })
            .await;
            assert_eq!(doubled, [2, 4, 6]);
            let before = tokio::time::Instant::now();
            run(|| sleep(std::time::Duration::from_secs(3600))).await;
            assert_eq!(before.elapsed(), std::time::Duration::from_secs(3600));
            assert!(current().is_none());
            let panicked = tokio::spawn(run(|| -> u32 { panic!("inside the closure") })).await;
            assert!(panicked.unwrap_err().is_panic());
        });
    }

    /// A slow disk's cost is paid when the lockstep job ends, holding nothing: a job that
    /// holds a std lock across its synced writes while another job waits on that lock
    /// still finishes (a sleep at the write would hand the turn to the waiter, which
    /// blocks the only thread that runs).
    #[cfg(feature = "simulation")]
    #[test]
    fn a_slow_disk_delays_the_job_that_used_it_after_it_let_go_of_its_locks() {
        use forge_store::kv::{Column, Durability, KvEngine, MemKv, WriteBatch};
        let runtime = paused_runtime(5);
        runtime.block_on(async {
            let kv = Arc::new(MemKv::new());
            kv.set_slow(Some(Duration::from_millis(300)));
            let lock = Arc::new(Mutex::new(0u32));
            let before = tokio::time::Instant::now();
            let writer = {
                let (kv, lock) = (kv.clone(), lock.clone());
                tokio::spawn(run(move || {
                    let mut held = lock.lock().unwrap();
                    for key in 0..3u8 {
                        let mut batch = WriteBatch::new();
                        batch.put(Column::Meta, vec![key], vec![key]);
                        kv.write(batch, Durability::Synced).unwrap();
                        *held += 1;
                    }
                    tokio::time::Instant::now()
                }))
            };
            let waiter = {
                let lock = lock.clone();
                tokio::spawn(run(move || *lock.lock().unwrap()))
            };
            let written_at = writer.await.unwrap();
            assert_eq!(waiter.await.unwrap(), 3, "the waiter ran after the writer");
            assert_eq!(written_at, before, "the writes themselves take no time");
            assert_eq!(
                before.elapsed(),
                Duration::from_millis(900),
                "three synced writes at 300 ms, paid at the end"
            );
            kv.set_slow(None);
            let before = tokio::time::Instant::now();
            run(move || kv.sync().unwrap()).await;
            assert_eq!(before.elapsed(), Duration::ZERO, "a fast disk again");
        });
    }
}
