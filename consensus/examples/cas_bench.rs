//! Compare-and-swap throughput and latency: a 3-node forge group on loopback QUIC (each
//! node its own RocksDB in a temporary directory, its own Syncer, the daemon's
//! components) against a 3-member etcd on loopback, driven by the same load generator:
//! N clients, each moving its own key by compare-and-swap as fast as it can for S
//! seconds (forge: a ref update through the group, spread over the three members;
//! etcd: a Txn comparing the key's mod_revision, then a put). Run by
//! scripts/bench-consensus.sh, which starts etcd.
//!
//!   cargo run --release -p forge-consensus --example cas_bench -- \
//!     --etcd 127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379 --seconds 30 --clients 1,16,256

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)] // A benchmark: figures for a person, loud failures.

use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use forge_consensus::{ConsensusError, GroupHandle};
use forge_store::metadata::{Change, Expected, RecordSpace, RecordUpdate};

struct Args {
    etcd: Vec<String>,
    seconds: u64,
    clients: Vec<usize>,
}

fn args() -> Args {
    let mut parsed = Args {
        etcd: Vec::new(),
        seconds: 30,
        clients: vec![1, 16, 256],
    };
    let mut words = std::env::args().skip(1);
    while let Some(word) = words.next() {
        let value = words.next().unwrap_or_default();
        match word.as_str() {
            "--etcd" => parsed.etcd = value.split(',').map(str::to_owned).collect(),
            "--seconds" => parsed.seconds = value.parse().expect("--seconds N"),
            "--clients" => {
                parsed.clients = value
                    .split(',')
                    .map(|count| count.parse().expect("--clients N,N"))
                    .collect();
            }
            other => panic!("unknown argument {other}"),
        }
    }
    parsed
}

/// What one run measured.
struct Measured {
    commits: u64,
    seconds: f64,
    latencies_us: Vec<u64>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.commits as f64 / self.seconds
    }

    fn percentile(&self, fraction: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        // The nearest rank: fraction of the last index, rounded.
        let last = self.latencies_us.len() - 1;
        let index = (last * (fraction * 1000.0) as usize)
            .div_ceil(1000)
            .min(last);
        self.latencies_us[index] as f64 / 1000.0
    }
}

/// Runs `clients` copies of `operation` (each returns one latency) for `seconds`.
async fn drive<F, Fut>(clients: usize, seconds: u64, operation: F) -> Measured
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<()>> + Send,
{
    let operation = Arc::new(operation);
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for client in 0..clients {
        let operation = operation.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < end {
                let began = Instant::now();
                if operation(client).await.is_some() {
                    latencies.push(u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX));
                }
            }
            latencies
        }));
    }
    let mut latencies_us = Vec::new();
    for task in tasks {
        latencies_us.extend(task.await.unwrap());
    }
    latencies_us.sort_unstable();
    Measured {
        commits: latencies_us.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
        latencies_us,
    }
}

/// Three forge nodes on loopback QUIC, one group.
async fn forge_group(nodes: &[common::LoopbackNode]) -> Vec<GroupHandle> {
    let mut handles = Vec::new();
    for node in nodes {
        handles.push(node.start_group(1).await);
    }
    let members: Vec<_> = nodes.iter().map(|node| node.net.local_id()).collect();
    handles[0].initialize(&members).await.unwrap();
    while !handles.iter().any(|handle| handle.status().leading) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handles
}

fn report(name: &str, clients: usize, measured: &Measured) {
    println!(
        "{name:>5} {clients:>4} clients: {:>8.0} commits/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({} commits in {:.1} s)",
        measured.rate(),
        measured.percentile(0.5),
        measured.percentile(0.99),
        measured.commits,
        measured.seconds
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    let nodes = common::loopback_nodes(3, 1).await;
    let handles = Arc::new(forge_group(&nodes).await);
    let etcd = if args.etcd.is_empty() {
        None
    } else {
        Some(
            etcd_client::Client::connect(&args.etcd, None)
                .await
                .unwrap(),
        )
    };
    println!(
        "compare-and-swap, each client on its own key, {} s per run; forge: 3 nodes on loopback QUIC in this process; etcd: 3 members on loopback",
        args.seconds
    );
    let mut rows = Vec::new();
    for &clients in &args.clients {
        // forge: client i writes through member i % 3; each remembers its key's value.
        let values: Arc<Vec<std::sync::Mutex<Option<Vec<u8>>>>> =
            Arc::new((0..clients).map(|_| std::sync::Mutex::new(None)).collect());
        let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let forge = {
            let handles = handles.clone();
            let values = values.clone();
            let counter = counter.clone();
            drive(clients, args.seconds, move |client| {
                let handles = handles.clone();
                let values = values.clone();
                let counter = counter.clone();
                async move {
                    let expected = values[client].lock().unwrap().clone();
                    let next = counter
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        .to_be_bytes()
                        .to_vec();
                    let update = RecordUpdate::new(
                        RecordSpace::REFS,
                        format!("bench/{clients}/{client}").into_bytes(),
                        expected.map_or(Expected::Absent, Expected::Value),
                        Change::Put(next.clone()),
                    );
                    match handles[client % handles.len()].apply(&[update]).await {
                        Ok(()) => {
                            *values[client].lock().unwrap() = Some(next);
                            Some(())
                        }
                        Err(ConsensusError::Conflict { .. }) => panic!("a client's own key moved"),
                        Err(_) => None,
                    }
                }
            })
            .await
        };
        report("forge", clients, &forge);
        let etcd_measured = match &etcd {
            Some(etcd) => {
                let revisions: Arc<Vec<std::sync::Mutex<i64>>> =
                    Arc::new((0..clients).map(|_| std::sync::Mutex::new(0)).collect());
                let etcd = etcd.clone();
                let measured = drive(clients, args.seconds, move |client| {
                    let mut etcd = etcd.clone();
                    let revisions = revisions.clone();
                    async move {
                        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                        let key = format!("bench/{clients}/{client}");
                        let revision = *revisions[client].lock().unwrap();
                        let txn = Txn::new()
                            .when([Compare::mod_revision(
                                key.clone(),
                                CompareOp::Equal,
                                revision,
                            )])
                            .and_then([TxnOp::put(key, client.to_be_bytes().to_vec(), None)]);
                        let response = etcd.txn(txn).await.ok()?;
                        assert!(response.succeeded(), "a client's own key moved");
                        let header = response.header()?;
                        *revisions[client].lock().unwrap() = header.revision();
                        Some(())
                    }
                })
                .await;
                report("etcd", clients, &measured);
                Some(measured)
            }
            None => None,
        };
        rows.push((clients, forge, etcd_measured));
    }
    println!("\nforge / etcd:");
    for (clients, forge, etcd) in &rows {
        match etcd {
            Some(etcd) => println!(
                "{clients:>4} clients: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x (forge p99 {:.2} ms)",
                forge.rate() / etcd.rate(),
                forge.percentile(0.5) / etcd.percentile(0.5),
                forge.percentile(0.99) / etcd.percentile(0.99),
                forge.percentile(0.99)
            ),
            None => println!("{clients:>4} clients: no etcd given"),
        }
    }
    std::process::exit(0);
}
