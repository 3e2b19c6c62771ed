//! The in-process [`PeerNet`]: many nodes in one process, for tests and the simulator, with
//! seeded faults: loss, delay (and so reordering), duplication, corruption of responses,
//! one-way and two-way partitions, crashed nodes. Every random choice comes from one
//! seeded generator, drawn in the order requests reach the hub, so on a single-threaded
//! runtime with paused time the same seed gives the same events (see [`MemoryNetwork::trace`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use forge_crypto::NodeId;
use tokio::sync::{mpsc, oneshot};

use crate::net::{
    Answer, BoxFuture, Inbound, InboundRequest, MeshError, PeerNet, Protocol, check_size,
};

/// How long a request whose peer went silent (crashed, cut off, its request or answer
/// lost) waits before failing, when its deadline is longer: the QUIC transport's idle
/// timeout (libp2p-quic's default `max_idle_timeout`), after which a real connection to a
/// peer that stopped answering is closed and the request fails. A peer that is alive
/// but slow keeps its connection (keep-alives): the request waits its whole deadline.
pub const SILENT_PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// The faults the network injects, each drawn per message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultPlan {
    /// Probability that a request, or its response, is lost.
    pub loss: f64,
    /// Delay of each message, uniform in `[delay_min, delay_max]`.
    pub delay_min: Duration,
    /// See `delay_min`.
    pub delay_max: Duration,
    /// Probability that a request is delivered twice (the second answer is discarded).
    pub duplicate: f64,
    /// Probability that a request has one byte flipped on its way (a test-only fault: a
    /// real transport's integrity checks would catch it; the application must too).
    pub corrupt_request: f64,
    /// The same for a successful response.
    pub corrupt_response: f64,
}

impl FaultPlan {
    /// No faults: every message arrives at once, intact.
    pub const NONE: Self = Self {
        loss: 0.0,
        delay_min: Duration::ZERO,
        delay_max: Duration::ZERO,
        duplicate: 0.0,
        corrupt_request: 0.0,
        corrupt_response: 0.0,
    };
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self::NONE
    }
}

/// What the network did, for tests and the simulator's summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Requests sent.
    pub requests: u64,
    /// Requests or responses lost (loss or partition).
    pub lost: u64,
    /// Requests delivered twice.
    pub duplicated: u64,
    /// Requests and responses corrupted.
    pub corrupted: u64,
    /// Requests answered "busy".
    pub busy: u64,
}

/// SplitMix64: small, fast, and the same on every platform (the simulator replays seeds).
#[derive(Debug, Clone)]
struct SeededRng(u64);

impl SeededRng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    #[allow(clippy::cast_precision_loss)]
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, probability: f64) -> bool {
        probability > 0.0 && self.unit() < probability
    }

    fn between(&mut self, low: Duration, high: Duration) -> Duration {
        if high <= low {
            return low;
        }
        let span = u64::try_from((high - low).as_nanos()).unwrap_or(u64::MAX);
        low + Duration::from_nanos(self.next_u64() % span.saturating_add(1))
    }
}

#[derive(Debug, Default)]
struct NodeEntry {
    up: bool,
    protocols: BTreeMap<&'static str, mpsc::Sender<InboundRequest>>,
    topics: BTreeMap<String, mpsc::Sender<crate::net::Gossip>>,
}

#[derive(Debug)]
struct Hub {
    nodes: BTreeMap<NodeId, NodeEntry>,
    rng: SeededRng,
    faults: FaultPlan,
    /// Directed links that carry nothing: (from, to).
    blocked: BTreeSet<(NodeId, NodeId)>,
    stats: NetStats,
    trace: blake3::Hasher,
}

impl Hub {
    fn record(&mut self, event: &str, from: &NodeId, to: &NodeId, detail: u64) {
        self.trace.update(event.as_bytes());
        self.trace.update(from.as_bytes());
        self.trace.update(to.as_bytes());
        self.trace.update(&detail.to_le_bytes());
    }
}

/// The shared network many [`MemoryPeer`]s join.
#[derive(Debug, Clone)]
pub struct MemoryNetwork {
    hub: Arc<Mutex<Hub>>,
}

impl MemoryNetwork {
    /// A network whose every random choice derives from `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self {
            hub: Arc::new(Mutex::new(Hub {
                nodes: BTreeMap::new(),
                rng: SeededRng(seed),
                faults: FaultPlan::NONE,
                blocked: BTreeSet::new(),
                stats: NetStats::default(),
                trace: blake3::Hasher::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds node `id` (up, serving nothing yet) and returns its view of the network.
    #[must_use]
    pub fn join(&self, id: NodeId) -> Arc<MemoryPeer> {
        self.lock().nodes.entry(id).or_default().up = true;
        Arc::new(MemoryPeer {
            id,
            network: self.clone(),
        })
    }

    /// Sets the faults injected from now on.
    pub fn set_faults(&self, faults: FaultPlan) {
        self.lock().faults = faults;
    }

    /// Cuts every link between the two sides, both ways.
    pub fn partition(&self, side_a: &[NodeId], side_b: &[NodeId]) {
        let mut hub = self.lock();
        for a in side_a {
            for b in side_b {
                hub.blocked.insert((*a, *b));
                hub.blocked.insert((*b, *a));
            }
        }
    }

    /// Cuts the link from `from` to `to` only (`to` still reaches `from`).
    pub fn block_one_way(&self, from: NodeId, to: NodeId) {
        self.lock().blocked.insert((from, to));
    }

    /// Heals every partition.
    pub fn heal(&self) {
        self.lock().blocked.clear();
    }

    /// Crashes node `id`: its queued requests are dropped (their senders time out), its
    /// protocols are gone, and it is unreachable until [`Self::restart`].
    pub fn crash(&self, id: NodeId) {
        if let Some(node) = self.lock().nodes.get_mut(&id) {
            node.up = false;
            node.protocols.clear();
            node.topics.clear();
        }
    }

    /// Brings a crashed node back (serving nothing until it calls `serve` again).
    pub fn restart(&self, id: NodeId) {
        self.lock().nodes.entry(id).or_default().up = true;
    }

    /// What the network has done so far.
    #[must_use]
    pub fn stats(&self) -> NetStats {
        self.lock().stats
    }

    /// A hash of every event so far (sends, losses, deliveries, answers, in order): equal
    /// for two runs of the same seed on a deterministic executor.
    #[must_use]
    pub fn trace(&self) -> [u8; 32] {
        *self.lock().trace.clone().finalize().as_bytes()
    }
}

/// One node's view of a [`MemoryNetwork`].
#[derive(Debug)]
pub struct MemoryPeer {
    id: NodeId,
    network: MemoryNetwork,
}

/// What the hub decided for one request, drawn under its lock.
struct Route {
    queue: mpsc::Sender<InboundRequest>,
    delay: Duration,
    lost: bool,
    duplicate: bool,
    /// Where to flip a byte of the request, if anywhere.
    corrupt_at: Option<usize>,
}

impl MemoryPeer {
    fn route(&self, peer: NodeId, protocol: &Protocol, bytes: usize) -> Result<Route, MeshError> {
        let mut hub = self.network.lock();
        hub.stats.requests += 1;
        hub.record("send", &self.id, &peer, bytes as u64);
        let queue = match hub.nodes.get(&peer) {
            Some(node) if node.up => node.protocols.get(protocol.name).cloned(),
            _ => {
                return Err(MeshError::Unreachable {
                    peer,
                    reason: "no such node is up".into(),
                });
            }
        };
        let Some(queue) = queue else {
            return Err(MeshError::Refused {
                peer,
                protocol: protocol.name,
                reason: "it does not serve this protocol".into(),
            });
        };
        let faults = hub.faults;
        let lost = hub.blocked.contains(&(self.id, peer)) || hub.rng.chance(faults.loss);
        let delay = hub.rng.between(faults.delay_min, faults.delay_max);
        let duplicate = hub.rng.chance(faults.duplicate);
        if lost {
            hub.stats.lost += 1;
            hub.record("lost", &self.id, &peer, 0);
        }
        if duplicate {
            hub.stats.duplicated += 1;
        }
        let corrupt_at = (bytes > 0 && hub.rng.chance(faults.corrupt_request)).then(|| {
            let at = usize::try_from(hub.rng.next_u64() % bytes as u64).unwrap_or(0);
            hub.stats.corrupted += 1;
            at
        });
        if let Some(at) = corrupt_at {
            hub.record("request-corrupted", &self.id, &peer, at as u64);
        }
        Ok(Route {
            queue,
            delay,
            lost,
            duplicate,
            corrupt_at,
        })
    }

    /// The response's fate: lost on the way back, corrupted, or delivered.
    fn answer_back(&self, peer: NodeId, answer: &mut Answer) -> Option<Duration> {
        let mut hub = self.network.lock();
        let faults = hub.faults;
        let lost = hub.blocked.contains(&(peer, self.id)) || hub.rng.chance(faults.loss);
        let delay = hub.rng.between(faults.delay_min, faults.delay_max);
        if lost {
            hub.stats.lost += 1;
            hub.record("answer-lost", &peer, &self.id, 0);
            return None;
        }
        if let Answer::Ok(body) = answer
            && !body.is_empty()
            && hub.rng.chance(faults.corrupt_response)
        {
            let at = usize::try_from(hub.rng.next_u64() % body.len() as u64).unwrap_or(0);
            body[at] ^= 0x5A;
            hub.stats.corrupted += 1;
            hub.record("corrupted", &peer, &self.id, at as u64);
        }
        hub.record("answer", &peer, &self.id, 0);
        Some(delay)
    }

    fn busy(&self, peer: NodeId, protocol: &Protocol) -> MeshError {
        let mut hub = self.network.lock();
        hub.stats.busy += 1;
        hub.record("busy", &self.id, &peer, 0);
        MeshError::Busy {
            peer,
            protocol: protocol.name,
        }
    }

    async fn exchange(
        &self,
        peer: NodeId,
        protocol: Protocol,
        body: Vec<u8>,
        deadline: Duration,
    ) -> Result<Vec<u8>, MeshError> {
        check_size(&protocol, "request", body.len())?;
        let mut body = body;
        let started = tokio::time::Instant::now();
        let timeout = MeshError::Timeout {
            peer,
            protocol: protocol.name,
            after: deadline,
        };
        let route = self.route(peer, &protocol, body.len())?;
        if let Some(at) = route.corrupt_at {
            body[at] ^= 0x5A;
        }
        // When a request that can no longer be answered fails: at its deadline, or when
        // the connection's idle timeout closes it, whichever comes first.
        let given_up_at = started + deadline.min(SILENT_PEER_TIMEOUT);
        let silent = MeshError::Timeout {
            peer,
            protocol: protocol.name,
            after: deadline.min(SILENT_PEER_TIMEOUT),
        };
        if route.lost {
            tokio::time::sleep_until(given_up_at).await;
            return Err(silent);
        }
        if tokio::time::timeout(deadline, tokio::time::sleep(route.delay))
            .await
            .is_err()
        {
            return Err(timeout);
        }
        let (reply, answer) = oneshot::channel();
        if route.duplicate {
            let (spare, _discarded) = oneshot::channel();
            let copy = InboundRequest::new(self.id, body.clone(), spare);
            if route.queue.try_send(copy).is_err() {
                // A full queue drops the copy as a real one would drop a retransmission.
            }
        }
        match route
            .queue
            .try_send(InboundRequest::new(self.id, body, reply))
        {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(self.busy(peer, &protocol)),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(MeshError::Unreachable {
                    peer,
                    reason: "it stopped serving".into(),
                });
            }
        }
        let remaining = deadline.saturating_sub(started.elapsed());
        let mut answer = match tokio::time::timeout(remaining, answer).await {
            Ok(Ok(answer)) => answer,
            // Dropped unanswered (a crash): the connection goes silent.
            Ok(Err(_)) => {
                tokio::time::sleep_until(given_up_at).await;
                return Err(silent);
            }
            // Alive but no answer in time.
            Err(_) => return Err(timeout),
        };
        let Some(delay) = self.answer_back(peer, &mut answer) else {
            tokio::time::sleep_until(given_up_at).await;
            return Err(silent);
        };
        let remaining = deadline.saturating_sub(started.elapsed());
        if delay > remaining {
            tokio::time::sleep(remaining).await;
            return Err(timeout);
        }
        tokio::time::sleep(delay).await;
        match answer {
            Answer::Ok(body) => {
                check_size(&protocol, "response", body.len())?;
                Ok(body)
            }
            Answer::Failed(message) => Err(MeshError::Remote {
                peer,
                protocol: protocol.name,
                message,
            }),
            Answer::Refused(reason) => Err(MeshError::Refused {
                peer,
                protocol: protocol.name,
                reason,
            }),
        }
    }
}

impl PeerNet for MemoryPeer {
    fn local_id(&self) -> NodeId {
        self.id
    }

    fn request(
        &self,
        peer: NodeId,
        protocol: Protocol,
        body: Vec<u8>,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<Vec<u8>, MeshError>> {
        Box::pin(self.exchange(peer, protocol, body, deadline))
    }

    fn publish(&self, topic: &str, message: Vec<u8>) -> BoxFuture<'_, Result<(), MeshError>> {
        let topic = topic.to_owned();
        Box::pin(async move {
            // Drawn under the hub's lock in node order: the same seed, the same deliveries.
            let deliveries: Vec<_> = {
                let mut hub = self.network.lock();
                let subscribers: Vec<(NodeId, mpsc::Sender<crate::net::Gossip>)> = hub
                    .nodes
                    .iter()
                    .filter(|(id, node)| **id != self.id && node.up)
                    .filter_map(|(id, node)| node.topics.get(&topic).map(|tx| (*id, tx.clone())))
                    .collect();
                let mut deliveries = Vec::new();
                for (id, sender) in subscribers {
                    let loss = hub.faults.loss;
                    if hub.blocked.contains(&(self.id, id)) || hub.rng.chance(loss) {
                        hub.record("gossip-lost", &self.id, &id, message.len() as u64);
                        continue;
                    }
                    hub.record("gossip", &self.id, &id, message.len() as u64);
                    deliveries.push(sender);
                }
                deliveries
            };
            if deliveries.is_empty() {
                return Err(MeshError::Unreachable {
                    peer: self.id,
                    reason: format!("no node subscribed to {topic} is reachable"),
                });
            }
            for sender in deliveries {
                let _ = sender.try_send(crate::net::Gossip {
                    from: self.id,
                    message: message.clone(),
                });
            }
            Ok(())
        })
    }

    fn subscribe(&self, topic: &str) -> Result<crate::net::Subscription, MeshError> {
        let (sender, receiver) = mpsc::channel(crate::net::GOSSIP_QUEUE);
        self.network
            .lock()
            .nodes
            .entry(self.id)
            .or_default()
            .topics
            .insert(topic.to_owned(), sender);
        Ok(crate::net::Subscription::new(receiver))
    }

    fn serve(&self, protocol: Protocol) -> Result<Inbound, MeshError> {
        let mut hub = self.network.lock();
        let node = hub.nodes.entry(self.id).or_default();
        if !node.up {
            return Err(MeshError::Local {
                what: format!("node {} is crashed: it serves nothing", self.id),
            });
        }
        if node
            .protocols
            .get(protocol.name)
            .is_some_and(|queue| !queue.is_closed())
        {
            return Err(MeshError::Local {
                what: format!("{} is served already on this node", protocol.name),
            });
        }
        let (sender, receiver) = mpsc::channel(protocol.inbound_queue.max(1));
        node.protocols.insert(protocol.name, sender);
        Ok(Inbound::new(receiver))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ECHO: Protocol = Protocol {
        name: "/forge/test-echo/1",
        max_request_bytes: 1024,
        max_response_bytes: 2048,
        inbound_queue: 4,
    };

    fn node(byte: u8) -> NodeId {
        NodeId::from_bytes([byte; 32])
    }

    /// Serves ECHO on `peer`: answers each request with its body twice.
    fn echo(peer: &Arc<MemoryPeer>) {
        let mut inbound = peer.serve(ECHO).expect("serve");
        tokio::spawn(async move {
            while let Some(request) = inbound.next().await {
                let body = [request.body.as_slice(), request.body.as_slice()].concat();
                request.respond(body);
            }
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_gets_its_answer_and_every_limit_has_its_own_error() {
        let network = MemoryNetwork::new(1);
        let (a, b) = (network.join(node(1)), network.join(node(2)));
        echo(&b);
        let second = Duration::from_secs(1);
        assert_eq!(
            a.request(node(2), ECHO, b"hi".to_vec(), second).await,
            Ok(b"hihi".to_vec())
        );
        assert!(matches!(
            a.request(node(2), ECHO, vec![0; 1025], second).await,
            Err(MeshError::TooLarge {
                what: "request",
                ..
            })
        ));
        // 1,024 bytes in, 2,048 out: at the cap; 1,025 bytes would answer 2,050.
        assert!(
            a.request(node(2), ECHO, vec![0; 1024], second)
                .await
                .is_ok()
        );
        assert!(matches!(
            a.request(node(3), ECHO, vec![], second).await,
            Err(MeshError::Unreachable { .. })
        ));
        let other = Protocol {
            name: "/forge/other/1",
            ..ECHO
        };
        assert!(matches!(
            a.request(node(2), other, vec![], second).await,
            Err(MeshError::Refused { .. })
        ));
        assert!(matches!(b.serve(ECHO), Err(MeshError::Local { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_answers_busy_and_an_unanswered_request_times_out() {
        let network = MemoryNetwork::new(2);
        let (a, b) = (network.join(node(1)), network.join(node(2)));
        // Nobody takes requests off b's queue: the first four wait, the fifth is busy.
        let _inbound = b.serve(ECHO).expect("serve");
        let a = Arc::new(a);
        let mut waiting = Vec::new();
        for _ in 0..4 {
            let a = a.clone();
            waiting.push(tokio::spawn(async move {
                a.request(node(2), ECHO, vec![1], Duration::from_secs(5))
                    .await
            }));
        }
        tokio::task::yield_now().await;
        assert!(matches!(
            a.request(node(2), ECHO, vec![1], Duration::from_secs(5))
                .await,
            Err(MeshError::Busy { .. })
        ));
        for task in waiting {
            assert!(matches!(
                task.await.expect("task"),
                Err(MeshError::Timeout { .. })
            ));
        }
        assert_eq!(network.stats().busy, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn partitions_cut_links_one_or_both_ways_until_healed() {
        let network = MemoryNetwork::new(3);
        let (a, b) = (network.join(node(1)), network.join(node(2)));
        echo(&a);
        echo(&b);
        let deadline = Duration::from_millis(500);
        network.block_one_way(node(1), node(2));
        assert!(matches!(
            a.request(node(2), ECHO, vec![1], deadline).await,
            Err(MeshError::Timeout { .. })
        ));
        // b reaches a, but a's answer to b goes over the blocked link.
        assert!(matches!(
            b.request(node(1), ECHO, vec![1], deadline).await,
            Err(MeshError::Timeout { .. })
        ));
        network.heal();
        assert!(a.request(node(2), ECHO, vec![1], deadline).await.is_ok());
        network.partition(&[node(1)], &[node(2)]);
        assert!(b.request(node(1), ECHO, vec![1], deadline).await.is_err());
        network.heal();
        network.crash(node(2));
        assert!(matches!(
            a.request(node(2), ECHO, vec![1], deadline).await,
            Err(MeshError::Unreachable { .. })
        ));
        network.restart(node(2));
        echo(&b);
        assert!(a.request(node(2), ECHO, vec![1], deadline).await.is_ok());
    }

    /// Runs many requests under every fault on a fresh network; returns its trace and stats.
    async fn faulty_run(seed: u64) -> ([u8; 32], NetStats, usize) {
        let network = MemoryNetwork::new(seed);
        network.set_faults(FaultPlan {
            loss: 0.1,
            delay_min: Duration::from_millis(1),
            delay_max: Duration::from_millis(40),
            duplicate: 0.05,
            corrupt_request: 0.0,
            corrupt_response: 0.05,
        });
        let peers: Vec<_> = (1..=3).map(|byte| network.join(node(byte))).collect();
        for peer in &peers {
            echo(peer);
        }
        let mut tasks = Vec::new();
        for round in 0u8..60 {
            let from = peers[usize::from(round % 3)].clone();
            let to = node((round + 1) % 3 + 1);
            tasks.push(tokio::spawn(async move {
                from.request(to, ECHO, vec![round; 8], Duration::from_millis(200))
                    .await
            }));
        }
        let mut intact = 0;
        for (round, task) in tasks.into_iter().enumerate() {
            if let Ok(Ok(body)) = task.await {
                let byte = u8::try_from(round).expect("60 rounds");
                intact += usize::from(body == vec![byte; 16]);
            }
        }
        (network.trace(), network.stats(), intact)
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_seed_gives_the_same_trace_and_faults_show_in_the_stats() {
        let (trace, stats, intact) = faulty_run(7).await;
        assert_eq!(faulty_run(7).await, (trace, stats, intact));
        assert_ne!(faulty_run(8).await.0, trace);
        assert!(stats.lost > 0 && stats.duplicated > 0, "{stats:?}");
        assert!(intact > 30 && intact < 60, "{intact} of 60 intact");
    }
}
