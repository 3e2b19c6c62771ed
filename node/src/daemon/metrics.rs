//! Prometheus metrics of a daemon: one registry, served as text on `GET /metrics` by
//! [`serve`] (only `forge node start` opens the listener; a mount host started by
//! `forge volume mount` opens no port). Counters are updated where the work happens;
//! gauges of volumes and of the vault are read from the vault at each scrape (a volume's
//! statistics walk its snapshots, so they are kept until its snapshot list changes).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use forge_crypto::Cid;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::daemon::host::Host;
use crate::error::{NodeError, Result};
use crate::mount::requests::FuseMetrics;
use crate::vault::Vault;
use crate::vault::VolumeStats;

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    volume_logical_bytes: Family<Labels, Gauge>,
    volume_stored_bytes: Family<Labels, Gauge>,
    volume_unique_chunks: Family<Labels, Gauge>,
    volume_snapshots: Family<Labels, Gauge>,
    volume_dedup_ratio: Family<Labels, FloatGauge>,
    volume_compression_ratio: Family<Labels, FloatGauge>,
    vault_physical_bytes: Gauge,
    vault_table_bytes: Family<Labels, Gauge>,
    vault_blob_bytes: Family<Labels, Gauge>,
    vault_pending_compaction_bytes: Family<Labels, Gauge>,
    import_files: Counter,
    import_bytes: Counter,
    export_files: Counter,
    export_bytes: Counter,
    mounts: Gauge,
    process_resident_memory_bytes: Gauge,
    process_open_fds: Gauge,
    api_calls: Family<Labels, Counter>,
    api_call_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    scrape_errors: Counter,
    sync_chunks: Family<Labels, Counter>,
    sync_bytes: Family<Labels, Counter>,
    sync_errors: Family<Labels, Counter>,
    audit_samples: Family<Labels, Counter>,
    peers_known: Gauge,
    peers_connected: Gauge,
    cluster_members: Gauge,
    raft_leader: Family<Labels, Gauge>,
    raft_term: Family<Labels, Gauge>,
    raft_committed_index: Family<Labels, Gauge>,
    raft_applied_index: Family<Labels, Gauge>,
    raft_follower_lag: Family<Labels, Gauge>,
    repair_running: Family<Labels, Gauge>,
    repair_backlog: Family<Labels, Gauge>,
    repair_rebuilt: Family<Labels, Gauge>,
    /// Each volume's statistics with the snapshot list they were computed for.
    volume_cache: Mutex<BTreeMap<String, (Vec<Cid>, VolumeStats)>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(&FuseMetrics::default())
    }
}

/// Buckets of an API call: 100 µs (a small call) to about 7 minutes (a large import), a
/// factor of 4 apart.
fn api_call_histogram() -> Histogram {
    Histogram::new(exponential_buckets(100e-6, 4.0, 12))
}

impl Metrics {
    /// A registry with every series forge reports, the mounts' `fuse` among them.
    #[must_use]
    pub fn new(fuse: &FuseMetrics) -> Self {
        let mut registry = Registry::with_prefix("forge");
        let metrics = Self {
            volume_logical_bytes: Family::default(),
            volume_stored_bytes: Family::default(),
            volume_unique_chunks: Family::default(),
            volume_snapshots: Family::default(),
            volume_dedup_ratio: Family::default(),
            volume_compression_ratio: Family::default(),
            vault_physical_bytes: Gauge::default(),
            vault_table_bytes: Family::default(),
            vault_blob_bytes: Family::default(),
            vault_pending_compaction_bytes: Family::default(),
            import_files: Counter::default(),
            import_bytes: Counter::default(),
            export_files: Counter::default(),
            export_bytes: Counter::default(),
            mounts: Gauge::default(),
            process_resident_memory_bytes: Gauge::default(),
            process_open_fds: Gauge::default(),
            api_calls: Family::default(),
            api_call_seconds: Family::new_with_constructor(api_call_histogram),
            scrape_errors: Counter::default(),
            sync_chunks: Family::default(),
            sync_bytes: Family::default(),
            sync_errors: Family::default(),
            audit_samples: Family::default(),
            peers_known: Gauge::default(),
            peers_connected: Gauge::default(),
            cluster_members: Gauge::default(),
            raft_leader: Family::default(),
            raft_term: Family::default(),
            repair_running: Family::default(),
            repair_backlog: Family::default(),
            repair_rebuilt: Family::default(),
            raft_committed_index: Family::default(),
            raft_applied_index: Family::default(),
            raft_follower_lag: Family::default(),
            volume_cache: Mutex::new(BTreeMap::new()),
            registry: Registry::default(),
        };
        registry.register(
            "volume_logical_bytes",
            "File bytes over all snapshots of a volume",
            metrics.volume_logical_bytes.clone(),
        );
        registry.register(
            "volume_stored_bytes",
            "Bytes on disk of the distinct shards and objects a volume's snapshots reach",
            metrics.volume_stored_bytes.clone(),
        );
        registry.register(
            "volume_unique_chunks",
            "Distinct data chunks of a volume",
            metrics.volume_unique_chunks.clone(),
        );
        registry.register(
            "volume_snapshots",
            "Snapshots of a volume",
            metrics.volume_snapshots.clone(),
        );
        registry.register(
            "volume_dedup_ratio",
            "Logical bytes over the plaintext bytes of a volume's unique chunks",
            metrics.volume_dedup_ratio.clone(),
        );
        registry.register(
            "volume_compression_ratio",
            "Plaintext over stored bytes of a volume's unique chunks",
            metrics.volume_compression_ratio.clone(),
        );
        registry.register(
            "vault_physical_bytes",
            "Bytes of the files under the data directory",
            metrics.vault_physical_bytes.clone(),
        );
        registry.register(
            "vault_table_bytes",
            "Bytes in the storage engine's table files, by column",
            metrics.vault_table_bytes.clone(),
        );
        registry.register(
            "vault_blob_bytes",
            "Bytes in the storage engine's blob files, by column",
            metrics.vault_blob_bytes.clone(),
        );
        registry.register(
            "vault_pending_compaction_bytes",
            "Bytes the storage engine estimates its compactions must still rewrite, by column",
            metrics.vault_pending_compaction_bytes.clone(),
        );
        registry.register(
            "import_files",
            "Files stored by imports since the daemon started",
            metrics.import_files.clone(),
        );
        registry.register(
            "import_bytes",
            "File bytes stored by imports since the daemon started",
            metrics.import_bytes.clone(),
        );
        registry.register(
            "export_files",
            "Files written by exports and restores since the daemon started",
            metrics.export_files.clone(),
        );
        registry.register(
            "export_bytes",
            "File bytes written by exports and restores since the daemon started",
            metrics.export_bytes.clone(),
        );
        registry.register(
            "mounts",
            "Mounts this process serves",
            metrics.mounts.clone(),
        );
        registry.register(
            "fuse_request_seconds",
            "Time to serve a FUSE request of a mount, by operation (its count: the requests)",
            fuse.request_seconds.clone(),
        );
        registry.register(
            "mount_cache_hits",
            "Chunk reads of mounts served from their cache",
            fuse.cache_hits.clone(),
        );
        registry.register(
            "mount_cache_misses",
            "Chunk reads of mounts that read and decrypted the chunk",
            fuse.cache_misses.clone(),
        );
        registry.register(
            "anomalies",
            "Ransomware-like behaviour the detector froze a volume for, by volume and kind",
            fuse.anomalies.clone(),
        );
        registry.register(
            "mount_read_ahead_chunks",
            "Chunks mounts read and decrypted ahead of a sequential reader",
            fuse.read_ahead_chunks.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the forge process",
            metrics.process_resident_memory_bytes.clone(),
        );
        registry.register(
            "process_open_fds",
            "Open file descriptors of the forge process",
            metrics.process_open_fds.clone(),
        );
        registry.register(
            "api_calls",
            "Calls on the control socket, by method (the command) and exit code",
            metrics.api_calls.clone(),
        );
        registry.register(
            "api_call_seconds",
            "Time to answer a call on the control socket, by method",
            metrics.api_call_seconds.clone(),
        );
        registry.register(
            "scrape_errors",
            "Scrapes that could not read a number (the rest of the scrape is served)",
            metrics.scrape_errors.clone(),
        );
        registry.register(
            "sync_chunks",
            "Chunks and objects syncs moved, by peer (NodeId) and direction (sent, received)",
            metrics.sync_chunks.clone(),
        );
        registry.register(
            "sync_bytes",
            "Bytes syncs moved, by peer (NodeId) and direction (sent, received)",
            metrics.sync_bytes.clone(),
        );
        registry.register(
            "sync_errors",
            "Syncs this node started that failed, by direction (push, pull)",
            metrics.sync_errors.clone(),
        );
        registry.register(
            "audit_samples",
            "Chunks this node audited at peers, by peer and result (passed, failed)",
            metrics.audit_samples.clone(),
        );
        registry.register(
            "peers_known",
            "Peers in `forge peer list`",
            metrics.peers_known.clone(),
        );
        registry.register(
            "peers_connected",
            "Nodes with a verified connection to this one",
            metrics.peers_connected.clone(),
        );
        registry.register(
            "cluster_members",
            "Members of this node's cluster, as its cluster group records them (0: no cluster)",
            metrics.cluster_members.clone(),
        );
        registry.register(
            "raft_leader",
            "1 when this node leads the Raft group, by group name (\"cluster\" for the cluster's)",
            metrics.raft_leader.clone(),
        );
        registry.register(
            "repair_running",
            "1 while this node repairs the volume group, by group",
            metrics.repair_running.clone(),
        );
        registry.register(
            "repair_backlog_shards",
            "Shards placement gives this node that its last repair of the group could not rebuild, by group",
            metrics.repair_backlog.clone(),
        );
        registry.register(
            "repair_rebuilt_shards",
            "Shards this node's repairs of the group rebuilt since the daemon started, by group",
            metrics.repair_rebuilt.clone(),
        );
        registry.register(
            "raft_term",
            "The Raft group's current term as this node sees it, by group",
            metrics.raft_term.clone(),
        );
        registry.register(
            "raft_committed_index",
            "The Raft group's last committed log index on this node, by group",
            metrics.raft_committed_index.clone(),
        );
        registry.register(
            "raft_applied_index",
            "The Raft group's last applied log index on this node, by group",
            metrics.raft_applied_index.clone(),
        );
        registry.register(
            "raft_follower_lag_entries",
            "On a group's leader: each follower's entries behind its last log index, by group and follower",
            metrics.raft_follower_lag.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The cluster's size and each Raft group this node runs. A group no longer run here
    /// leaves its series.
    fn set_groups(&self, members: usize, groups: &[super::cluster::GroupMetrics]) {
        self.cluster_members.set(gauge_value(members as u64));
        for family in [
            &self.raft_leader,
            &self.raft_term,
            &self.raft_committed_index,
            &self.raft_applied_index,
            &self.raft_follower_lag,
            &self.repair_running,
            &self.repair_backlog,
            &self.repair_rebuilt,
        ] {
            family.clear();
        }
        for super::cluster::GroupMetrics {
            name,
            status,
            repair,
        } in groups
        {
            let labels = vec![("group", name.clone())];
            if let Some(repair) = repair {
                self.repair_running
                    .get_or_create(&labels)
                    .set(i64::from(repair.running));
                self.repair_backlog.get_or_create(&labels).set(gauge_value(
                    repair.last.as_ref().map_or(0, |last| last.backlog),
                ));
                self.repair_rebuilt
                    .get_or_create(&labels)
                    .set(gauge_value(repair.rebuilt_total));
            }
            self.raft_leader
                .get_or_create(&labels)
                .set(i64::from(status.leading));
            self.raft_term
                .get_or_create(&labels)
                .set(gauge_value(status.term));
            self.raft_committed_index
                .get_or_create(&labels)
                .set(gauge_value(status.committed.unwrap_or(0)));
            self.raft_applied_index
                .get_or_create(&labels)
                .set(gauge_value(status.applied.unwrap_or(0)));
            for (follower, entries) in &status.lag {
                let labels = vec![("group", name.clone()), ("follower", follower.to_hex())];
                self.raft_follower_lag
                    .get_or_create(&labels)
                    .set(gauge_value(*entries));
            }
        }
    }

    /// Counts what a sync with `peer` moved.
    pub fn count_sync(&self, peer: &forge_crypto::NodeId, sent: bool, chunks: u64, bytes: u64) {
        let labels = vec![
            ("peer", peer.to_hex()),
            (
                "direction",
                if sent { "sent" } else { "received" }.to_owned(),
            ),
        ];
        self.sync_chunks.get_or_create(&labels).inc_by(chunks);
        self.sync_bytes.get_or_create(&labels).inc_by(bytes);
    }

    /// Counts a sync that failed.
    pub fn count_sync_error(&self, pull: bool) {
        self.sync_errors
            .get_or_create(&vec![(
                "direction",
                if pull { "pull" } else { "push" }.to_owned(),
            )])
            .inc();
    }

    /// Counts an audit's samples.
    pub fn count_audit(&self, peer: &forge_crypto::NodeId, passed: u64, failed: u64) {
        for (result, count) in [("passed", passed), ("failed", failed)] {
            self.audit_samples
                .get_or_create(&vec![
                    ("peer", peer.to_hex()),
                    ("result", result.to_owned()),
                ])
                .inc_by(count);
        }
    }

    /// Sets the peer gauges.
    pub fn set_peers(&self, known: usize, connected: usize) {
        self.peers_known.set(gauge_value(known as u64));
        self.peers_connected.set(gauge_value(connected as u64));
    }

    /// Counts a call on the control socket that took `seconds`.
    pub fn count_call(&self, method: &str, exit_code: u32, seconds: f64) {
        self.api_calls
            .get_or_create(&vec![
                ("method", method.to_owned()),
                ("code", exit_code.to_string()),
            ])
            .inc();
        self.api_call_seconds
            .get_or_create(&vec![("method", method.to_owned())])
            .observe(seconds);
    }

    /// Reads the gauges from `host` and renders the registry (OpenMetrics text).
    ///
    /// # Errors
    /// Only a formatting failure; a number that cannot be read is left out and counted
    /// in `forge_scrape_errors_total`.
    pub fn render(&self, host: &Host) -> Result<String> {
        self.update(host);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).map_err(|error| {
            NodeError::io("rendering", "the metrics")(std::io::Error::other(error.to_string()))
        })?;
        Ok(text)
    }

    fn update(&self, host: &Host) {
        let vault = host.vault();
        if let Some(mesh) = host.mesh() {
            match (vault.peers(), mesh.connected()) {
                (Ok(known), Ok(connected)) => self.set_peers(known.len(), connected.len()),
                (Err(error), _) | (_, Err(error)) => self.failed("peers", &error),
            }
            match mesh.group_statuses() {
                Ok((members, groups)) => self.set_groups(members, &groups),
                Err(error) => self.failed("Raft groups", &error),
            }
        }
        let (_, mounts) = host.status();
        self.mounts.set(gauge_value(mounts.len() as u64));
        if let Some(bytes) = resident_memory_bytes() {
            self.process_resident_memory_bytes.set(gauge_value(bytes));
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            self.process_open_fds
                .set(gauge_value(entries.count() as u64));
        }
        match vault.vault_stats() {
            Ok(stats) => {
                self.vault_physical_bytes
                    .set(gauge_value(stats.physical_bytes));
                for (column, usage) in stats.columns {
                    let labels = vec![("column", column.to_owned())];
                    self.vault_table_bytes
                        .get_or_create(&labels)
                        .set(gauge_value(usage.table_bytes));
                    self.vault_blob_bytes
                        .get_or_create(&labels)
                        .set(gauge_value(usage.blob_bytes));
                    self.vault_pending_compaction_bytes
                        .get_or_create(&labels)
                        .set(gauge_value(usage.pending_compaction_bytes));
                }
            }
            Err(error) => self.failed("vault statistics", &error),
        }
        let counters = vault.counters();
        for (counter, total) in [
            (&self.import_files, &counters.import_files),
            (&self.import_bytes, &counters.import_bytes),
            (&self.export_files, &counters.export_files),
            (&self.export_bytes, &counters.export_bytes),
        ] {
            catch_up(counter, total.load(std::sync::atomic::Ordering::Relaxed));
        }
        self.update_volumes(vault);
    }

    fn update_volumes(&self, vault: &Vault) {
        let records = match vault.list_volumes() {
            Ok(records) => records,
            Err(error) => return self.failed("the volume list", &error),
        };
        let mut cache = self
            .volume_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Volumes deleted since the last scrape leave their series.
        cache.retain(|name, _| records.iter().any(|record| &record.name == name));
        for family in [
            &self.volume_logical_bytes,
            &self.volume_stored_bytes,
            &self.volume_unique_chunks,
            &self.volume_snapshots,
        ] {
            family.clear();
        }
        self.volume_dedup_ratio.clear();
        self.volume_compression_ratio.clear();
        // A daemon cannot prompt: a volume whose keys need a passphrase is counted keylessly.
        let no_passphrase = |_: &str, _: bool| -> Result<zeroize::Zeroizing<String>> {
            Err(NodeError::InvalidArgument {
                what: "passphrase",
                value: String::new(),
                reason: "metrics are read without one".into(),
            })
        };
        for record in records {
            let snapshots = match vault.snapshot_listings(&record) {
                Ok(listings) => listings.into_iter().map(|(cid, _)| cid).collect::<Vec<_>>(),
                Err(error) => {
                    self.failed("a snapshot list", &error);
                    continue;
                }
            };
            let cached = cache
                .get(&record.name)
                .filter(|(ids, _)| *ids == snapshots)
                .map(|(_, stats)| stats.clone());
            let stats = match cached {
                Some(stats) => stats,
                None => {
                    // Its keys need a passphrase, or this vault holds none (a zero-knowledge
                    // copy): what the reference indexes tell, keylessly.
                    let (what, computed) =
                        if record.encrypted || !vault.holds_volume_keys(&record).unwrap_or(true) {
                            (
                                "keyless volume statistics",
                                vault.volume_stats_keyless(&record.name),
                            )
                        } else {
                            (
                                "volume statistics",
                                vault.volume_stats(&record.name, &no_passphrase),
                            )
                        };
                    match computed {
                        Ok(stats) => {
                            cache.insert(record.name.clone(), (snapshots, stats.clone()));
                            stats
                        }
                        Err(error) => {
                            self.failed(what, &error);
                            continue;
                        }
                    }
                }
            };
            let labels = vec![("volume", record.name.clone())];
            self.volume_logical_bytes
                .get_or_create(&labels)
                .set(gauge_value(stats.logical_bytes));
            self.volume_stored_bytes
                .get_or_create(&labels)
                .set(gauge_value(stats.stored_bytes));
            self.volume_unique_chunks
                .get_or_create(&labels)
                .set(gauge_value(stats.unique_chunks));
            self.volume_snapshots
                .get_or_create(&labels)
                .set(gauge_value(stats.snapshots));
            // Ratios need plaintext lengths: none for a volume counted without its keys.
            if !record.encrypted {
                self.volume_dedup_ratio
                    .get_or_create(&labels)
                    .set(stats.dedup_ratio);
                self.volume_compression_ratio
                    .get_or_create(&labels)
                    .set(stats.compression_ratio);
            }
        }
    }

    fn failed(&self, what: &str, error: &NodeError) {
        tracing::warn!(%error, "metrics: reading {what}");
        self.scrape_errors.inc();
    }
}

/// Moves `counter` up to `total`, the vault's own count (a counter only goes up: scrapes
/// are serialized, and the vault's counts never go down).
fn catch_up(counter: &Counter, total: u64) {
    let shown = counter.get();
    if total > shown {
        counter.inc_by(total - shown);
    }
}

fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// VmRSS of this process, from /proc/self/status.
fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Binds the metrics listener (port 0: any free port).
///
/// # Errors
/// The address is taken or not ours to bind, naming it.
pub fn bind(address: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(address).map_err(|error| NodeError::MetricsListen {
        address,
        reason: error.to_string(),
    })
}

/// Serves `GET /metrics` on `listener`, one connection at a time, on a thread of its own,
/// for as long as the host lives (it holds only a weak reference: the vault closes when
/// the daemon drops its host).
pub fn serve(listener: TcpListener, host: Weak<Host>) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let Some(host) = host.upgrade() else { break };
            if let Err(error) = answer(stream, &host) {
                tracing::debug!(%error, "metrics request");
            }
        }
    });
}

/// Reads one HTTP/1.x request and answers it (then closes the connection).
fn answer(mut stream: TcpStream, host: &Host) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    // The request head only; a body (none is expected) is ignored.
    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = stream.read(&mut buffer)?;
        if read == 0 || request.len() > 8 << 10 {
            break;
        }
        request.extend_from_slice(&buffer[..read]);
    }
    let head = String::from_utf8_lossy(&request);
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => match host.metrics().render(host) {
            Ok(text) => (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(error) => (
                "500 Internal Server Error",
                "text/plain",
                format!("{error}\n"),
            ),
        },
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}
