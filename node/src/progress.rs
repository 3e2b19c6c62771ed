//! Progress of long work: a live line on a terminal (files, bytes, rate), nothing otherwise
//! (the command prints a one-line summary when it ends).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Counters shared by the worker threads, and the terminal display if there is one.
#[derive(Debug)]
pub struct Progress {
    files: AtomicU64,
    bytes: AtomicU64,
    started: Instant,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A progress display labelled `verb` ("importing"), shown only when stderr is a
    /// terminal and `enabled`.
    #[must_use]
    pub fn new(verb: &'static str, enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(verb);
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self {
            files: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            started: Instant::now(),
            bar,
        }
    }

    /// Records one more file of `bytes` bytes.
    pub fn file_done(&self, bytes: u64) {
        let files = self.files.fetch_add(1, Ordering::Relaxed) + 1;
        let total = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(bar) = &self.bar
            && (files.is_multiple_of(64) || bytes > 1 << 20)
        {
            bar.set_message(self.describe(files, total));
        }
    }

    /// Files and bytes so far.
    #[must_use]
    pub fn totals(&self) -> (u64, u64) {
        (
            self.files.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// Time since the start.
    #[must_use]
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Clears the live line.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn describe(&self, files: u64, bytes: u64) -> String {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        #[allow(clippy::cast_precision_loss)] // A display rate needs no exactness.
        let rate = bytes as f64 / seconds / 1e6;
        format!("{files} files, {}, {rate:.1} MB/s", human_bytes(bytes))
    }
}

/// `1234567` → `"1.2 MB"`.
#[must_use]
#[allow(clippy::cast_precision_loss)]
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
