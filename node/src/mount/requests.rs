//! What a mount's FUSE requests cost, for the daemon's /metrics: a latency histogram per
//! operation (its count is the number of requests of that kind) and the chunk cache's hits
//! and misses. The types are prometheus-client's shared handles: a host registers one set
//! (metrics.rs) and every mount it serves records into it, so the series outlive a mount
//! and stay monotonic; a mount made elsewhere (tests) records into a set nobody reads.

use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Labels of a request series: the operation (`read`, `lookup`, ...).
pub type OperationLabels = Vec<(&'static str, &'static str)>;

/// The request series of the mounts of one host.
#[derive(Debug, Clone)]
pub struct FuseMetrics {
    /// Seconds to serve a request, by operation.
    pub request_seconds: Family<OperationLabels, Histogram, fn() -> Histogram>,
    /// Chunk reads served from a mount's cache (a read that waited for a read-ahead in
    /// flight counts here: the chunk was not read twice).
    pub cache_hits: Counter,
    /// Chunk reads that had to read and decrypt the chunk.
    pub cache_misses: Counter,
    /// Chunks read and decrypted ahead of a sequential reader (its later reads of them
    /// are hits).
    pub read_ahead_chunks: Counter,
    /// Behaviour-detector trips, by volume and kind.
    pub anomalies: Family<Vec<(String, String)>, Counter>,
}

impl Default for FuseMetrics {
    fn default() -> Self {
        Self {
            request_seconds: Family::new_with_constructor(request_histogram),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            read_ahead_chunks: Counter::default(),
            anomalies: Family::default(),
        }
    }
}

/// Buckets from 10 µs (a cached getattr) to about 2.6 s (a read that waits on a cold disk
/// or a commit), a factor of 4 apart.
fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(10e-6, 4.0, 10))
}

impl FuseMetrics {
    /// Times one request of `operation` until the guard drops.
    #[must_use]
    pub fn time(&self, operation: &'static str) -> RequestTimer<'_> {
        RequestTimer {
            metrics: self,
            operation,
            started: Instant::now(),
        }
    }
}

/// Records a request's time when dropped (whatever way the handler returns).
#[derive(Debug)]
pub struct RequestTimer<'a> {
    metrics: &'a FuseMetrics,
    operation: &'static str,
    started: Instant,
}

impl Drop for RequestTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .request_seconds
            .get_or_create(&vec![("operation", self.operation)])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// The operations a mount's I/O fingerprint counts, in the order its DNA lists them.
const FINGERPRINT_OPERATIONS: [&str; 16] = [
    "read",
    "write",
    "create",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "rename",
    "link",
    "symlink",
    "setattr",
    "setxattr",
    "removexattr",
    "fsync",
    "open",
    "readdir",
];
/// Size classes of a read or write: class i holds sizes in [2^i, 2^(i+1)) (0 in class 0),
/// the last everything from 1 MiB up.
const SIZE_CLASSES: usize = 21;

/// What one mount's workload did, by kind of operation (a run's DNA records it): how many
/// requests of each kind, and for reads and writes their bytes and a histogram of their
/// sizes. Atomics only: the request path never waits on it.
#[derive(Debug)]
pub struct IoFingerprint {
    operations: [std::sync::atomic::AtomicU64; FINGERPRINT_OPERATIONS.len()],
    /// Bytes and size classes of reads (0) and writes (1).
    bytes: [std::sync::atomic::AtomicU64; 2],
    sizes: [[std::sync::atomic::AtomicU64; SIZE_CLASSES]; 2],
}

impl Default for IoFingerprint {
    fn default() -> Self {
        Self {
            operations: std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(0)),
            bytes: std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(0)),
            sizes: std::array::from_fn(|_| {
                std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(0))
            }),
        }
    }
}

impl IoFingerprint {
    /// Counts one request of `operation` (kinds it does not fingerprint are ignored).
    pub fn count(&self, operation: &str) {
        if let Some(index) = FINGERPRINT_OPERATIONS
            .iter()
            .position(|op| *op == operation)
        {
            self.operations[index].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Records the size of a read (`write` false) or write.
    pub fn transfer(&self, write: bool, bytes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let kind = usize::from(write);
        self.bytes[kind].fetch_add(bytes as u64, Relaxed);
        let class = (usize::BITS - bytes.leading_zeros()).saturating_sub(1) as usize;
        self.sizes[kind][class.min(SIZE_CLASSES - 1)].fetch_add(1, Relaxed);
    }

    /// The fingerprint as DNA entries: `io.OPERATION` = `ops=N` for each kind seen, and
    /// for reads and writes `ops=N bytes=B sizes=2^C:N,...` (size classes seen).
    #[must_use]
    pub fn dna(&self) -> Vec<(String, String)> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut entries = Vec::new();
        for (index, operation) in FINGERPRINT_OPERATIONS.iter().enumerate() {
            let count = self.operations[index].load(Relaxed);
            if count == 0 {
                continue;
            }
            let mut value = format!("ops={count}");
            let kind = match *operation {
                "read" => Some(0),
                "write" => Some(1),
                _ => None,
            };
            if let Some(kind) = kind {
                value.push_str(&format!(" bytes={}", self.bytes[kind].load(Relaxed)));
                let classes: Vec<String> = self.sizes[kind]
                    .iter()
                    .enumerate()
                    .filter_map(|(class, count)| {
                        let count = count.load(Relaxed);
                        (count > 0).then(|| format!("2^{class}:{count}"))
                    })
                    .collect();
                value.push_str(&format!(" sizes={}", classes.join(",")));
            }
            entries.push((format!("io.{operation}"), value));
        }
        entries
    }
}

#[cfg(test)]
mod tests {
    use super::IoFingerprint;

    #[test]
    fn a_fingerprint_counts_operations_and_classes_transfer_sizes() {
        let io = IoFingerprint::default();
        assert!(io.dna().is_empty());
        for size in [0, 1, 4095, 4096, 131_072, 8 << 20] {
            io.count("write");
            io.transfer(true, size);
        }
        io.count("read");
        io.transfer(false, 100);
        io.count("unlink");
        io.count("getattr");
        assert_eq!(
            io.dna(),
            vec![
                (
                    "io.read".to_owned(),
                    "ops=1 bytes=100 sizes=2^6:1".to_owned()
                ),
                (
                    "io.write".to_owned(),
                    format!(
                        "ops=6 bytes={} sizes=2^0:2,2^11:1,2^12:1,2^17:1,2^20:1",
                        1 + 4095 + 4096 + 131_072 + (8 << 20)
                    )
                ),
                ("io.unlink".to_owned(), "ops=1".to_owned()),
            ]
        );
    }
}
