//! Whether Raft's fsyncs queue behind an import: three nodes in this process on loopback
//! QUIC, each with its RocksDB and a Syncer, one group; a client commits ref updates one
//! after another and the commit latency is measured quiet, then while every node's main
//! engine takes an import's load (8 MiB unlogged batches of chunk shards, a flush of the
//! shard column every 64 MiB, as an import stages and publishes). Twice: Raft on the
//! main engine (as before), then on an engine of its own (as the daemon runs it now).
//!
//!   cargo run --release -p forge-consensus --example raft_under_import -- [COMMITS]

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_precision_loss
)] // A measurement: figures for a person, loud failures.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod common;

use forge_consensus::GroupHandle;
use forge_store::kv::{Column, Durability, WriteBatch};
use forge_store::metadata::{Change, Expected, RecordSpace, RecordUpdate};

async fn commit_latencies(leader: &GroupHandle, commits: usize, round: &str) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(commits);
    for index in 0..commits {
        let update = RecordUpdate::new(
            RecordSpace::REFS,
            format!("{round}/{index}").into_bytes(),
            Expected::Any,
            Change::Put(vec![7; 32]),
        );
        let started = Instant::now();
        leader.apply(&[update]).await.unwrap();
        latencies.push(started.elapsed());
    }
    latencies.sort();
    latencies
}

/// The `per_mille`-th per mille of `sorted` (nearest rank).
fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    let index = (sorted.len() - 1) * per_mille / 1000;
    sorted[index.min(sorted.len() - 1)]
}

fn show(label: &str, sorted: &[Duration]) -> (f64, f64) {
    let (p50, p99) = (percentile(sorted, 500), percentile(sorted, 990));
    println!(
        "{label:<52} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        sorted.last().unwrap().as_secs_f64() * 1e3
    );
    (p50.as_secs_f64(), p99.as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let commits: usize = std::env::args()
        .nth(1)
        .map_or(400, |value| value.parse().unwrap());
    println!(
        "{commits} sequential ref commits on a 3-node loopback group (RocksDB, one Syncer per node):"
    );
    let shared = measure(commits, false).await;
    let separate = measure(commits, true).await;
    println!(
        "p99 beside an import, Raft on its own engine / on the main one: {:.2}x",
        separate / shared
    );
    std::process::exit(0);
}

/// Quiet and loaded latencies with Raft on its own engine or not; the loaded p99.
async fn measure(commits: usize, raft_engine_of_its_own: bool) -> f64 {
    let seed = if raft_engine_of_its_own { 29 } else { 23 };
    let nodes = common::loopback_nodes_with(3, seed, raft_engine_of_its_own).await;
    let engine = if raft_engine_of_its_own {
        "Raft on its own engine"
    } else {
        "Raft on the main engine"
    };
    let members: Vec<_> = nodes.iter().map(|node| node.net.local_id()).collect();
    let mut replicas = Vec::new();
    for node in &nodes {
        replicas.push(node.start_group(1).await);
    }
    replicas[0].initialize(&members).await.unwrap();
    let leader = loop {
        if let Some(leader) = replicas.iter().find(|replica| replica.status().leading) {
            break leader.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    commit_latencies(&leader, 50, "warm").await;
    let quiet = commit_latencies(&leader, commits, "quiet").await;

    // The import's load on every node's engine, on threads of its own.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let loaders: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(node_index, node)| {
            let (kv, stop, written) = (node.kv(), stop.clone(), written.clone());
            std::thread::spawn(move || {
                let shard = vec![0x5a_u8; 256 * 1024];
                let mut since_flush = 0usize;
                let mut next = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut batch = WriteBatch::new();
                    for _ in 0..32 {
                        next += 1;
                        // A chunk id's 32 bytes, then the shard index.
                        let mut key = [0u8; 33];
                        key[..8].copy_from_slice(&next.to_be_bytes());
                        key[8] = u8::try_from(node_index).unwrap();
                        batch.put(Column::Shards, key.to_vec(), shard.clone());
                    }
                    kv.write(batch, Durability::Unlogged).unwrap();
                    written.fetch_add(8 << 20, Ordering::Relaxed);
                    since_flush += 8 << 20;
                    if since_flush >= 64 << 20 {
                        kv.flush(&[Column::Shards]).unwrap();
                        since_flush = 0;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let load_started = Instant::now();
    let written_before = written.load(Ordering::Relaxed);
    let loaded = commit_latencies(&leader, commits, "loaded").await;
    let rate = (written.load(Ordering::Relaxed) - written_before) as f64
        / load_started.elapsed().as_secs_f64()
        / 1e6;
    stop.store(true, Ordering::Relaxed);
    for loader in loaders {
        loader.join().unwrap();
    }
    let (quiet_p50, quiet_p99) = show(&format!("{engine}, quiet"), &quiet);
    let (loaded_p50, loaded_p99) = show(
        &format!("{engine}, beside an import ({rate:.0} MB/s)"),
        &loaded,
    );
    println!(
        "  under import / quiet: p50 {:.2}x, p99 {:.2}x",
        loaded_p50 / quiet_p50,
        loaded_p99 / quiet_p99
    );
    loaded_p99
}
