//! `Syncer`: one thread that makes logged writes durable for many waiters at once.
//!
//! A Raft log appends with [`Durability::Logged`](super::Durability::Logged) and must not
//! report an append durable before it is. Syncing inline would block the group's task for
//! an fsync per append; a thread per group would fsync once per group. The syncer takes
//! every waiter queued since its last [`KvEngine::sync`], syncs once, and completes them
//! all: N groups appending at once cost one fsync, and no Raft task waits on the disk.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::{KvEngine, KvError};

/// What a waiter runs once its writes are durable (or the sync failed).
pub type SyncDone = Box<dyn FnOnce(Result<(), KvError>) + Send>;

#[derive(Default)]
struct Queue {
    waiters: Vec<SyncDone>,
    stopping: bool,
    syncs: u64,
    completed: u64,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing is left half-changed under this lock: a poisoned one is still consistent.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The batching syncer of one engine. Dropping the last handle completes what is queued
/// and stops the thread.
pub struct Syncer {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (syncs, completed) = self.counts();
        formatter
            .debug_struct("Syncer")
            .field("syncs", &syncs)
            .field("completed", &completed)
            .finish()
    }
}

impl Syncer {
    /// Starts the syncing thread for `engine`.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn start(engine: Arc<dyn KvEngine>) -> Result<Self, KvError> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("forge-syncer".into())
            .spawn(move || run(&*engine, &worker))
            .map_err(|error| KvError::Engine {
                detail: format!("starting the syncer thread: {error}"),
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Runs `done` once every write logged before this call is durable.
    pub fn after_sync(&self, done: SyncDone) {
        let mut queue = self.shared.lock();
        queue.waiters.push(done);
        drop(queue);
        self.shared.wake.notify_one();
    }

    /// (fsyncs made, waiters completed): their ratio is how well syncs are shared.
    #[must_use]
    pub fn counts(&self) -> (u64, u64) {
        let queue = self.shared.lock();
        (queue.syncs, queue.completed)
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(engine: &dyn KvEngine, shared: &Shared) {
    loop {
        let waiters = {
            let mut queue = shared.lock();
            while queue.waiters.is_empty() && !queue.stopping {
                queue = shared
                    .wake
                    .wait(queue)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if queue.waiters.is_empty() {
                return;
            }
            std::mem::take(&mut queue.waiters)
        };
        let outcome = engine.sync();
        let count = waiters.len() as u64;
        for done in waiters {
            done(match &outcome {
                Ok(()) => Ok(()),
                Err(error) => Err(KvError::Engine {
                    detail: format!("syncing the log: {error}"),
                }),
            });
        }
        let mut queue = shared.lock();
        queue.syncs += 1;
        queue.completed += count;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::kv::{Column, Durability, MemKv, WriteBatch};

    #[test]
    fn every_waiter_completes_after_its_write_is_durable_and_syncs_are_shared() {
        let engine = Arc::new(MemKv::new());
        let syncer = Syncer::start(engine.clone()).unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        for index in 0..100u8 {
            let mut batch = WriteBatch::new();
            batch.put(Column::RaftLog, [index], [index]);
            engine.write(batch, Durability::Logged).unwrap();
            let sender = sender.clone();
            syncer.after_sync(Box::new(move |outcome| {
                sender.send((index, outcome.is_ok())).unwrap();
            }));
        }
        let mut done: Vec<_> = (0..100).map(|_| receiver.recv().unwrap()).collect();
        done.sort_unstable();
        assert!(done.iter().all(|(_, ok)| *ok));
        // Everything acknowledged survives a power cut.
        engine.crash(0);
        for index in 0..100u8 {
            assert!(engine.get(Column::RaftLog, &[index]).unwrap().is_some());
        }
        let (syncs, completed) = syncer.counts();
        assert_eq!(completed, 100);
        assert!((1..=100).contains(&syncs), "{syncs}");
    }

    #[test]
    fn a_failed_sync_fails_its_waiters() {
        let engine = Arc::new(MemKv::new());
        engine.die_after_writes(0);
        let syncer = Syncer::start(engine).unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        syncer.after_sync(Box::new(move |outcome| sender.send(outcome).unwrap()));
        assert!(receiver.recv().unwrap().is_err());
    }
}
