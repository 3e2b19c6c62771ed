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

thread_local! {
    static RUNNER: Cell<Option<Runner>> = const { Cell::new(None) };
}

/// Makes [`run`] use `runner` for the tasks of this thread (a current-thread runtime's).
pub fn install_on_this_thread(runner: Runner) {
    RUNNER.with(|installed| installed.set(Some(runner)));
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
        Some(runner) => {
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
