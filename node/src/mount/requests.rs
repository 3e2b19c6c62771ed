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
