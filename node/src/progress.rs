//! Progress of long work: a live line on a terminal (files, bytes, rate; once the totals
//! are known, as restic does: the share done and an ETA), nothing otherwise (the command
//! prints a one-line summary when it ends).

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Counters shared by the worker threads, and the terminal display if there is one.
#[derive(Debug)]
pub struct Progress {
    files: AtomicU64,
    bytes: AtomicU64,
    /// The totals the work will reach, once something has counted them.
    expected_files: AtomicU64,
    expected_bytes: AtomicU64,
    expected_known: AtomicBool,
    started: Instant,
    /// What `files` counts ("files"; "items" for a check or a sweep).
    unit: &'static str,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A progress display labelled `verb` ("importing"), shown only when stderr is a
    /// terminal and `enabled`.
    #[must_use]
    pub fn new(verb: &'static str, enabled: bool) -> Self {
        Self::counting(verb, "files", enabled)
    }

    /// [`Progress::new`] for work that counts `unit` rather than files (fsck checks
    /// objects, chunks and snapshots: "items").
    #[must_use]
    pub fn counting(verb: &'static str, unit: &'static str, enabled: bool) -> Self {
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
            expected_files: AtomicU64::new(0),
            expected_bytes: AtomicU64::new(0),
            expected_known: AtomicBool::new(false),
            started: Instant::now(),
            unit,
            bar,
        }
    }

    /// Whether anything is displayed (counting the totals is worth it only then).
    #[must_use]
    pub fn is_live(&self) -> bool {
        self.bar.is_some()
    }

    /// The totals the work will reach: from now on the line shows the share done and an
    /// ETA.
    pub fn set_expected(&self, files: u64, bytes: u64) {
        self.expected_files.store(files, Ordering::Relaxed);
        self.expected_bytes.store(bytes, Ordering::Relaxed);
        self.expected_known.store(true, Ordering::Release);
    }

    /// The totals set by [`Progress::set_expected`], if any.
    #[must_use]
    pub fn expected(&self) -> Option<(u64, u64)> {
        self.expected_known.load(Ordering::Acquire).then(|| {
            (
                self.expected_files.load(Ordering::Relaxed),
                self.expected_bytes.load(Ordering::Relaxed),
            )
        })
    }

    /// Sets what is done so far to `files` and `bytes` (work done elsewhere, reported by
    /// the process doing it).
    pub fn set_done(&self, files: u64, bytes: u64) {
        self.files.store(files, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_message(self.describe(files, bytes));
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

    /// Records `count` more items of `bytes` bytes in all (work counted a page at a time).
    pub fn add_done(&self, count: u64, bytes: u64) {
        let files = self.files.fetch_add(count, Ordering::Relaxed) + count;
        let total = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(bar) = &self.bar {
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
        describe_at(
            files,
            bytes,
            self.expected(),
            self.started.elapsed(),
            self.unit,
        )
    }
}

/// The live line: done so far, and against the expected totals when they are known.
#[allow(clippy::cast_precision_loss)] // A display needs no exactness.
fn describe_at(
    files: u64,
    bytes: u64,
    expected: Option<(u64, u64)>,
    elapsed: Duration,
    unit: &str,
) -> String {
    let seconds = elapsed.as_secs_f64().max(1e-3);
    let rate = bytes as f64 / seconds / 1e6;
    let Some((total_files, total_bytes)) = expected else {
        return format!("{files} {unit}, {}, {rate:.1} MB/s", human_bytes(bytes));
    };
    // By bytes (what takes the time), by files for a tree of empty files.
    let share = if total_bytes > 0 {
        bytes as f64 / total_bytes as f64
    } else if total_files > 0 {
        files as f64 / total_files as f64
    } else {
        1.0
    }
    .clamp(0.0, 1.0);
    let eta = if share > 0.0 && share < 1.0 {
        let remaining = seconds * (1.0 - share) / share;
        format!(", ETA {}", human_duration(remaining))
    } else {
        String::new()
    };
    format!(
        "{files}/{total_files} {unit}, {}/{} ({:.0}%), {rate:.1} MB/s{eta}",
        human_bytes(bytes),
        human_bytes(total_bytes),
        share * 100.0
    )
}

/// `75.0` -> `"1m15s"`, `3725.0` -> `"1h02m"`, `9.4` -> `"9s"`.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Non-negative, small.
fn human_duration(seconds: f64) -> String {
    let whole = seconds.max(0.0).round() as u64;
    match whole {
        0..60 => format!("{whole}s"),
        60..3600 => format!("{}m{:02}s", whole / 60, whole % 60),
        _ => format!("{}h{:02}m", whole / 3600, whole % 3600 / 60),
    }
}

/// Counts the regular files under `root` and their bytes, as an import will meet them
/// (symbolic links not followed, unreadable directories skipped), until `stop` is set;
/// `None` if stopped first.
#[must_use]
pub fn count_tree(root: &Path, stop: &AtomicBool) -> Option<(u64, u64)> {
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut directories = vec![root.to_owned()];
    while let Some(directory) = directories.pop() {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                directories.push(entry.path());
            } else if kind.is_file() {
                files += 1;
                bytes += entry.metadata().map_or(0, |metadata| metadata.len());
            }
        }
    }
    Some((files, bytes))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_the_share_done_and_an_eta_once_totals_are_known() {
        let ten_seconds = Duration::from_secs(10);
        assert_eq!(
            describe_at(5, 2_000_000, None, ten_seconds, "files"),
            "5 files, 2.0 MB, 0.2 MB/s"
        );
        // A quarter of the bytes in 10 s: 30 s to go.
        assert_eq!(
            describe_at(5, 2_000_000, Some((40, 8_000_000)), ten_seconds, "files"),
            "5/40 files, 2.0 MB/8.0 MB (25%), 0.2 MB/s, ETA 30s"
        );
        assert_eq!(
            describe_at(40, 8_000_000, Some((40, 8_000_000)), ten_seconds, "files"),
            "40/40 files, 8.0 MB/8.0 MB (100%), 0.8 MB/s"
        );
        // Empty files: by count.
        assert_eq!(
            describe_at(1, 0, Some((4, 0)), Duration::from_secs(100), "files"),
            "1/4 files, 0 B/0 B (25%), 0.0 MB/s, ETA 5m00s"
        );
        assert_eq!(human_duration(3725.0), "1h02m");
    }

    #[test]
    fn counting_a_tree_finds_its_files_and_bytes_and_stops_when_asked() {
        let temp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(temp.path().join("a/b")).unwrap();
        std::fs::write(temp.path().join("a/one"), b"12345").unwrap();
        std::fs::write(temp.path().join("a/b/two"), b"123").unwrap();
        std::os::unix::fs::symlink("a/one", temp.path().join("link")).unwrap();
        let running = AtomicBool::new(false);
        assert_eq!(count_tree(temp.path(), &running), Some((2, 8)));
        assert_eq!(count_tree(temp.path(), &AtomicBool::new(true)), None);
    }
}
