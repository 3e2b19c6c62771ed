//! Synchronous store work run off the async tasks.
//!
//! The daemon runs it on tokio's blocking pool. The simulator cannot: a pool thread
//! would race its one runtime thread and break determinism, and a vault call that waits
//! on its Raft group from there has no lockstep to wait in. So the simulator installs a
//! runner on its runtime's thread (`forge_node::lockstep` runs the work in lockstep with
//! the runtime), and every task on that thread uses it.

use std::cell::Cell;

use crate::net::BoxFuture;

/// Runs a job off the async tasks, resolving once it has run.
pub type Runner = fn(Box<dyn FnOnce() + Send>) -> BoxFuture<'static, ()>;

/// Blocks a job's thread on a future, the runner's way (the simulator's lockstep lets its
/// runtime run meanwhile).
pub type BlockOn = fn(BoxFuture<'static, ()>);

thread_local! {
    static RUNNER: Cell<Option<(Runner, BlockOn)>> = const { Cell::new(None) };
}

/// Makes [`run`] and [`run_future`] use `runner` (and `block_on` in its jobs) for the
/// tasks of this thread (a current-thread runtime's).
pub fn install_on_this_thread(runner: Runner, block_on: BlockOn) {
    RUNNER.with(|installed| installed.set(Some((runner, block_on))));
}

/// Runs `work` off the async tasks and returns what it returns: on this thread's
/// installed runner, else on tokio's blocking pool.
///
/// # Errors
/// The work panicked (its message).
pub async fn run<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    match RUNNER.with(Cell::get) {
        Some((runner, _)) => {
            let (sender, receiver) = tokio::sync::oneshot::channel();
            runner(Box::new(move || {
                let _ = sender.send(work());
            }))
            .await;
            receiver
                .await
                .map_err(|_| "the work ended without an answer (it panicked)".to_owned())
        }
        None => tokio::task::spawn_blocking(work)
            .await
            .map_err(|error| error.to_string()),
    }
}

/// Runs `future` to its end in a job off the async tasks (it does store work that may
/// block, such as a grouped volume's reads through its group) and returns its output: on
/// this thread's installed runner, else on tokio's blocking pool, blocking that pool
/// thread on the current runtime.
///
/// # Errors
/// The job panicked (its message).
pub async fn run_future<T: Send + 'static>(
    future: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, String> {
    match RUNNER.with(Cell::get) {
        Some((runner, block_on)) => {
            let (sender, receiver) = tokio::sync::oneshot::channel();
            runner(Box::new(move || {
                block_on(Box::pin(async move {
                    let _ = sender.send(future.await);
                }));
            }))
            .await;
            receiver
                .await
                .map_err(|_| "the work ended without an answer (it panicked)".to_owned())
        }
        None => {
            let runtime = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || runtime.block_on(future))
                .await
                .map_err(|error| error.to_string())
        }
    }
}
