//! Latency of a small call on a daemon's control socket: one connection, `CALLS` typed
//! calls of `forge.v1.Volume/Stats` (what `forge volume stats VOLUME` sends), then p50, p99
//! and max. Used by
//! `scripts/bench-daemon.sh`; run it against a started daemon:
//!
//!     cargo run --release -p forge-node --example api_latency -- DATA_DIR VOLUME [CALLS]

#![allow(clippy::unwrap_used, clippy::expect_used)] // A benchmark tool: fail loudly.

use std::time::{Duration, Instant};

use forge_proto::v1::VolumeStatsRequest;
use forge_proto::v1::volume_client::VolumeClient;

fn main() {
    let mut arguments = std::env::args().skip(1);
    let (Some(data_dir), Some(volume)) = (arguments.next(), arguments.next()) else {
        eprintln!("usage: api_latency DATA_DIR VOLUME [CALLS]");
        std::process::exit(2);
    };
    let calls: usize = arguments
        .next()
        .map_or(10_000, |text| text.parse().unwrap());
    let socket = std::path::Path::new(&data_dir).join("control.sock");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut latencies: Vec<Duration> = runtime.block_on(async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("unix://{}", socket.display()))
                .unwrap()
                .connect()
                .await
                .unwrap_or_else(|error| panic!("connecting to {}: {error}", socket.display()));
        let mut client = VolumeClient::new(channel);
        let mut latencies = Vec::with_capacity(calls);
        for _ in 0..calls {
            let mut request = tonic::Request::new(VolumeStatsRequest {
                name: volume.clone(),
            });
            request.metadata_mut().insert(
                forge_proto::VERSION_METADATA,
                tonic::metadata::MetadataValue::from_static(env!("CARGO_PKG_VERSION")),
            );
            let start = Instant::now();
            let reply = client.stats(request).await.unwrap().into_inner();
            latencies.push(start.elapsed());
            assert!(reply.logical_bytes > 0);
        }
        latencies
    });
    latencies.sort();
    // The call at or above `per_mille` thousandths of all (nearest rank).
    let at = |per_mille: usize| {
        let index = (latencies.len() * per_mille)
            .div_ceil(1000)
            .clamp(1, latencies.len())
            - 1;
        latencies[index].as_secs_f64() * 1e3
    };
    println!(
        "{calls} calls of Volume.Stats {volume}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        at(500),
        at(990),
        at(1000)
    );
}
