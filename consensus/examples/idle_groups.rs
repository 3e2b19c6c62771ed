//! What idle Raft groups cost: three nodes in this process on loopback QUIC, each with its
//! own RocksDB and Syncer, run G groups (default 1,000) that commit nothing after they
//! formed; the process's CPU time over a quiet window, per node. Every idle group's
//! leader still heartbeats its followers (openraft has no quiescence), so the cost grows
//! with G: this measures it rather than assume it.
//!
//!   cargo run --release -p forge-consensus --example idle_groups -- [GROUPS] [SECONDS]

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_precision_loss
)] // A measurement: figures for a person, loud failures.

use std::time::{Duration, Instant};

mod common;

use forge_consensus::GroupOptions;

/// This process's user and system CPU seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let groups: u64 = args.next().map_or(1000, |value| value.parse().unwrap());
    let seconds: u64 = args.next().map_or(20, |value| value.parse().unwrap());
    let nodes = common::loopback_nodes(3, 11).await;
    let members: Vec<_> = nodes.iter().map(|node| node.net.local_id()).collect();
    let started = Instant::now();
    let mut handles = Vec::new();
    for group in 1..=groups {
        let mut replicas = Vec::new();
        for node in &nodes {
            replicas.push(node.start_group(group).await);
        }
        // Spread the leaders: group g is formed by node g % 3.
        let former = usize::try_from(group % 3).unwrap();
        replicas[former].initialize(&members).await.unwrap();
        handles.push(replicas);
    }
    loop {
        let led = handles
            .iter()
            .filter(|replicas| replicas.iter().any(|replica| replica.status().leading))
            .count();
        if led == handles.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "{groups} groups on 3 nodes formed, each with a leader, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Let the elections' traffic settle, then measure a quiet window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_before = cpu_seconds();
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let cpu = cpu_seconds() - cpu_before;
    let wall = window.elapsed().as_secs_f64();
    println!(
        "idle for {wall:.1} s: {:.1}% of one core per node ({:.2} CPU-seconds for the 3 nodes), heartbeat every {} ms",
        cpu / wall / 3.0 * 100.0,
        cpu,
        GroupOptions::default().heartbeat_ms
    );
    std::process::exit(0);
}
