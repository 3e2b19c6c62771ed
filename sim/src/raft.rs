//! A Raft group of 3–5 nodes under seeded faults: message loss, delay and reordering,
//! duplication, partitions (symmetric and one-way), crashes that lose what the disk had
//! not synced, and restarts, a voter taken out and put back (four or more nodes); a client
//! writing through random members meanwhile.
//!
//! Checked while it runs: at most one leader per term (election safety). Checked at the
//! end, once everything is healed and back (liveness within a simulated deadline): a
//! leader exists and a new write commits, every replica applied the same records, and
//! every write the client saw acknowledged is among them. Meanwhile: replicas at the same
//! applied index hold the same records (sampled every step), and three clients share a
//! compare-and-swap register whose recorded history must be linearizable (Wing–Gong).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forge_consensus::history::{Event, Op};
use forge_consensus::{
    ConsensusError, GroupHandle, GroupOptions, GroupTable, RAFT_PROTOCOL, serve_raft,
};
use forge_crypto::NodeId;
use forge_mesh::memory::{FaultPlan, MemoryNetwork, MemoryPeer};
use forge_mesh::net::PeerNet;
use forge_store::kv::{KvEngine, MemKv};
use forge_store::metadata::{Change, Expected, RecordSpace, RecordUpdate};

use crate::SimRng;

/// The group every run forms.
const GROUP: u64 = 1;
/// The compare-and-swap register the clients share (its history is checked).
const REGISTER: &[u8] = b"reg";
/// Register clients, and the rounds (a read, then a swap) each runs at most: bounded so
/// the Wing–Gong search stays fast.
const REGISTER_CLIENTS: u64 = 3;
const REGISTER_ROUNDS: u64 = 25;

/// What a seed chose.
#[derive(Debug, Clone, PartialEq)]
pub struct RaftSimConfig {
    /// Members.
    pub nodes: usize,
    /// The network's faults.
    pub faults: FaultPlan,
    /// Writes the client attempts.
    pub writes: usize,
    /// Nemesis actions (partition, heal, crash, restart).
    pub nemesis_actions: usize,
}

impl RaftSimConfig {
    /// The configuration `seed` chooses.
    #[must_use]
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = SimRng::new(seed ^ 0x00c0_ffee);
        let nodes = usize::try_from(rng.range(3, 6)).unwrap_or(3);
        let delay_max = Duration::from_millis(rng.range(0, 40));
        Self {
            nodes,
            faults: FaultPlan {
                loss: rng.range(0, 8) as f64 / 100.0,
                delay_min: Duration::ZERO,
                delay_max,
                duplicate: rng.range(0, 5) as f64 / 100.0,
                corrupt_request: 0.0,
                corrupt_response: 0.0,
            },
            writes: 60,
            nemesis_actions: usize::try_from(rng.range(3, 10)).unwrap_or(3),
        }
    }
}

/// How a run went.
#[derive(Debug, Clone)]
pub struct RaftSimReport {
    /// The seed.
    pub seed: u64,
    /// What it chose.
    pub config: RaftSimConfig,
    /// BLAKE3 of the run's event log and the network's own trace: equal for equal seeds.
    pub trace: [u8; 32],
    /// Writes acknowledged to the client.
    pub acknowledged: usize,
    /// Leaders seen, by term.
    pub leaders: BTreeMap<u64, NodeId>,
    /// The event log (simulated milliseconds, event), for a failing seed's report.
    pub events: Vec<String>,
}

/// A run that broke an invariant.
#[derive(Debug, Clone)]
pub struct RaftSimFailure {
    /// The seed.
    pub seed: u64,
    /// What broke.
    pub reason: String,
    /// The event log up to the failure.
    pub events: Vec<String>,
}

impl std::fmt::Display for RaftSimFailure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(formatter, "seed {} failed: {}", self.seed, self.reason)?;
        writeln!(
            formatter,
            "replay: FORGE_SIM_SEED={} cargo nextest run -p forge-sim --test raft_group replay_one_seed --no-capture",
            self.seed
        )?;
        for event in self.events.iter().rev().take(40).rev() {
            writeln!(formatter, "  {event}")?;
        }
        Ok(())
    }
}

/// The run's event log, stamped with simulated time.
#[derive(Debug, Clone)]
struct Log {
    started: tokio::time::Instant,
    events: Arc<Mutex<Vec<String>>>,
}

impl Log {
    fn new() -> Self {
        Self {
            started: tokio::time::Instant::now(),
            events: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn note(&self, event: impl AsRef<str>) {
        let millis = self.started.elapsed().as_millis();
        self.lock()
            .push(format!("{millis:>7} ms {}", event.as_ref()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn snapshot(&self) -> Vec<String> {
        self.lock().clone()
    }
}

struct SimNode {
    id: NodeId,
    kv: Arc<MemKv>,
    peer: Arc<MemoryPeer>,
    table: GroupTable,
    handle: Option<GroupHandle>,
}

fn node_id(index: usize) -> NodeId {
    let mut bytes = [0u8; 32];
    bytes[0] = u8::try_from(index + 1).unwrap_or(u8::MAX);
    bytes[31] = 0x5a;
    NodeId::from_bytes(bytes)
}

impl SimNode {
    async fn start(&mut self, options: GroupOptions) -> Result<(), String> {
        self.table = GroupTable::new();
        let inbound = self
            .peer
            .serve(RAFT_PROTOCOL)
            .map_err(|error| error.to_string())?;
        tokio::spawn(serve_raft(inbound, self.table.clone(), |_| Ok(())));
        let kv: Arc<dyn KvEngine> = self.kv.clone();
        let net: Arc<dyn PeerNet> = self.peer.clone();
        // No syncer: its thread would make timing depend on the OS; appends sync inline.
        let handle = GroupHandle::start(&self.table, GROUP, kv, None, net, options)
            .await
            .map_err(|error| error.to_string())?;
        self.handle = Some(handle);
        Ok(())
    }

    async fn crash(&mut self, network: &MemoryNetwork, surviving_batches: usize) {
        network.crash(self.id);
        if let Some(handle) = self.handle.take() {
            let _ = handle.shutdown().await;
        }
        self.kv.crash(surviving_batches);
    }
}

fn write(index: usize) -> RecordUpdate {
    RecordUpdate::new(
        RecordSpace::REFS,
        format!("w{index:04}").into_bytes(),
        Expected::Any,
        Change::Put(format!("value-{index}").into_bytes()),
    )
}

/// Runs the scenario `seed` chooses, on its own deterministic runtime.
///
/// # Errors
/// The invariant it broke, with the event log.
pub fn run(seed: u64) -> Result<RaftSimReport, RaftSimFailure> {
    let failure = |reason: String, events: Vec<String>| RaftSimFailure {
        seed,
        reason,
        events,
    };
    let runtime = crate::runtime(seed).map_err(|error| failure(error.to_string(), Vec::new()))?;
    let outcome = runtime.block_on(scenario(seed));
    // Tasks still parked (servers, a client's lost request) go with the runtime.
    drop(runtime);
    outcome.map_err(|(reason, events)| failure(reason, events))
}

type Failed = (String, Vec<String>);

#[allow(clippy::too_many_lines)] // One scenario, read top to bottom.
async fn scenario(seed: u64) -> Result<RaftSimReport, Failed> {
    let config = RaftSimConfig::from_seed(seed);
    let log = Log::new();
    let fail = |reason: String| (reason, log.snapshot());
    log.note(format!("config {config:?}"));
    let network = MemoryNetwork::new(seed);
    let mut rng = SimRng::new(seed);
    let options = |index: usize| GroupOptions {
        heartbeat_ms: 50,
        election_ms: (300, 600),
        forward_deadline: Duration::from_secs(1),
        snapshot_after_entries: 25,
        entries_kept_after_snapshot: 5,
        seed: Some(seed.wrapping_mul(31).wrapping_add(index as u64)),
    };
    let mut nodes: Vec<SimNode> = (0..config.nodes)
        .map(|index| {
            let id = node_id(index);
            SimNode {
                id,
                kv: Arc::new(MemKv::new()),
                peer: network.join(id),
                table: GroupTable::new(),
                handle: None,
            }
        })
        .collect();
    for (index, node) in nodes.iter_mut().enumerate() {
        node.start(options(index)).await.map_err(&fail)?;
    }
    let ids: Vec<NodeId> = nodes.iter().map(|node| node.id).collect();
    if let Some(handle) = &nodes[0].handle {
        handle
            .initialize(&ids)
            .await
            .map_err(|error| fail(format!("initialize: {error}")))?;
    }
    network.set_faults(config.faults);

    // Election safety, sampled: a term never has two leaders.
    let leaders: Arc<Mutex<BTreeMap<u64, NodeId>>> = Arc::default();
    let violation: Arc<Mutex<Option<String>>> = Arc::default();
    let handles_now = |nodes: &[SimNode]| -> Vec<(NodeId, GroupHandle)> {
        nodes
            .iter()
            .filter_map(|node| node.handle.clone().map(|handle| (node.id, handle)))
            .collect()
    };
    let observe = {
        let leaders = leaders.clone();
        let violation = violation.clone();
        let log = log.clone();
        move |handles: &[(NodeId, GroupHandle)]| {
            // Replicas at the same applied index hold the same records.
            // Applied index → (the first replica seen there, its records).
            let mut at_index: BTreeMap<u64, (NodeId, forge_consensus::ReplicaState)> =
                BTreeMap::new();
            for (me, handle) in handles {
                let Ok(state) = handle.replica_state() else {
                    continue;
                };
                let Some(applied) = state.0 else { continue };
                let records = state;
                let me = *me;
                match at_index.get(&applied) {
                    Some((other, theirs)) if theirs.1 != records.1 => {
                        *violation
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(format!(
                            "replicas {} and {} differ at applied index {applied}: {} and {} records",
                            &other.to_hex()[..2],
                            &me.to_hex()[..2],
                            theirs.1.len(),
                            records.1.len()
                        ));
                    }
                    Some(_) => {}
                    None => {
                        at_index.insert(applied, (me, records));
                    }
                }
            }
            for (_, handle) in handles {
                let status = handle.status();
                if std::env::var_os("FORGE_SIM_DEBUG").is_some() {
                    log.note(format!("status {status:?}"));
                }
                if !status.leading {
                    continue;
                }
                let Some(me) = status.leader else { continue };
                let mut leaders = leaders
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match leaders.get(&status.term) {
                    Some(other) if *other != me => {
                        *violation
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(format!(
                            "two leaders in term {}: {} and {}",
                            status.term,
                            other.to_hex(),
                            me.to_hex()
                        ));
                    }
                    Some(_) => {}
                    None => {
                        leaders.insert(status.term, me);
                        log.note(format!("term {} leader {}", status.term, &me.to_hex()[..2]));
                    }
                }
            }
        }
    };

    // The client: writes through random members, each acknowledged one remembered.
    let acknowledged: Arc<Mutex<BTreeSet<usize>>> = Arc::default();

    // Register clients: each reads the ref "reg" (read index) and tries to move it on by
    // compare-and-swap, through a member it picks; every operation is recorded with its
    // simulated invocation and response times for the Wing–Gong check at the end.
    let members: Arc<Mutex<Vec<Option<GroupHandle>>>> = Arc::new(Mutex::new(
        nodes.iter().map(|node| node.handle.clone()).collect(),
    ));
    let history: Arc<Mutex<Vec<Event>>> = Arc::default();
    let clients_stop = Arc::new(AtomicBool::new(false));
    let started = tokio::time::Instant::now();
    let micros = move || u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
    let mut clients = Vec::new();
    for client in 0..REGISTER_CLIENTS {
        let (members, history, stop) = (members.clone(), history.clone(), clients_stop.clone());
        let log = log.clone();
        let mut client_rng = SimRng::new(rng.next_u64());
        clients.push(tokio::spawn(async move {
            for round in 0..REGISTER_ROUNDS {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(client_rng.range(20, 300))).await;
                let (at, picked) = {
                    let members = members
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let at =
                        usize::try_from(client_rng.range(0, members.len() as u64)).unwrap_or(0);
                    (at, members.get(at).cloned().flatten())
                };
                let Some(handle) = picked else { continue };
                let invoked = micros();
                let read = tokio::time::timeout(
                    Duration::from_secs(2),
                    handle.read_record("refs", REGISTER),
                )
                .await;
                // A read that failed had no effect: not part of the history.
                let Ok(Ok(seen)) = read else { continue };
                let seen = seen.map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
                log.note(format!("register c{client} via {at}: read {seen:?}"));
                history
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(Event {
                        op: Op::Read(seen.clone()),
                        invoked,
                        returned: micros(),
                    });
                let new = format!("c{client}-{round}");
                let update = RecordUpdate::new(
                    RecordSpace::REFS,
                    REGISTER.to_vec(),
                    seen.clone().map_or(Expected::Absent, |value| {
                        Expected::Value(value.into_bytes())
                    }),
                    Change::Put(new.clone().into_bytes()),
                );
                let invoked = micros();
                let outcome =
                    tokio::time::timeout(Duration::from_secs(2), handle.apply(&[update])).await;
                let (applied, returned, why) = match outcome {
                    Ok(Ok(())) => (Some(true), micros(), "applied".to_owned()),
                    Ok(Err(ConsensusError::Conflict { .. })) => {
                        (Some(false), micros(), "conflict".to_owned())
                    }
                    // Refused before it was appended anywhere: no effect, so not part of
                    // the history (recording it as a failed swap would claim its
                    // expectation did not hold).
                    Ok(Err(ConsensusError::NoLeader { .. })) => {
                        log.note(format!(
                            "register c{client} via {at}: swap {seen:?} -> {new}: no leader"
                        ));
                        continue;
                    }
                    // Lost in flight, or the member went down: it may have applied.
                    Ok(Err(error)) => (None, u64::MAX, format!("unknown ({error})")),
                    Err(_) => (None, u64::MAX, "unknown (timed out)".to_owned()),
                };
                log.note(format!(
                    "register c{client} via {at}: swap {seen:?} -> {new}: {why}"
                ));
                history
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(Event {
                        op: Op::Swap {
                            expected: seen,
                            new,
                            applied,
                        },
                        invoked,
                        returned,
                    });
            }
        }));
    }
    let mut nemesis_rng = SimRng::new(rng.next_u64());
    let mut client_rng = SimRng::new(rng.next_u64());
    let mut next_write = 0;
    let mut next_nemesis = 0;
    let mut nemesis_at = tokio::time::Instant::now() + Duration::from_millis(300);
    let mut down: BTreeSet<usize> = BTreeSet::new();
    // Voters taken out of the group by the nemesis (joint consensus), put back at heal.
    let mut removed: BTreeSet<usize> = BTreeSet::new();
    while next_write < config.writes || next_nemesis < config.nemesis_actions {
        *members.lock().map_err(|_| fail("poisoned".into()))? =
            nodes.iter().map(|node| node.handle.clone()).collect();
        observe(&handles_now(&nodes));
        if let Some(reason) = violation
            .lock()
            .map_err(|_| fail("poisoned".into()))?
            .clone()
        {
            return Err(fail(reason));
        }
        if next_nemesis < config.nemesis_actions && tokio::time::Instant::now() >= nemesis_at {
            next_nemesis += 1;
            nemesis_at += Duration::from_millis(nemesis_rng.range(300, 1500));
            let target = usize::try_from(nemesis_rng.range(0, config.nodes as u64)).unwrap_or(0);
            match nemesis_rng.range(0, 7) {
                // Membership changes during load: a voter out (only with four or more,
                // none down, none out already: a live quorum stays), or back in.
                5 if config.nodes >= 4 && down.is_empty() && removed.is_empty() => {
                    let through = (target + 1) % config.nodes;
                    if let Some(handle) = nodes[through].handle.clone() {
                        let outcome = tokio::time::timeout(
                            Duration::from_secs(5),
                            handle.remove_member(&ids[target]),
                        )
                        .await;
                        // Unknown outcomes count as out: heal puts it back either way.
                        removed.insert(target);
                        log.note(format!(
                            "nemesis: remove {target} via {through}: {}",
                            match outcome {
                                Ok(Ok(())) => "done".to_owned(),
                                Ok(Err(error)) => format!("failed ({error})"),
                                Err(_) => "unknown (timed out)".to_owned(),
                            }
                        ));
                    }
                }
                6 if !removed.is_empty() => {
                    let back = removed.iter().next().copied().unwrap_or(0);
                    let through = (back + 1) % config.nodes;
                    if let Some(handle) = nodes[through].handle.clone() {
                        let outcome = tokio::time::timeout(
                            Duration::from_secs(5),
                            handle.add_member(&ids[back]),
                        )
                        .await;
                        if matches!(outcome, Ok(Ok(()))) {
                            removed.remove(&back);
                        }
                        log.note(format!(
                            "nemesis: add {back} back via {through}: {}",
                            match outcome {
                                Ok(Ok(())) => "done".to_owned(),
                                Ok(Err(error)) => format!("failed ({error})"),
                                Err(_) => "unknown (timed out)".to_owned(),
                            }
                        ));
                    }
                }
                0 => {
                    let cut: Vec<NodeId> = vec![ids[target]];
                    let rest: Vec<NodeId> = ids
                        .iter()
                        .copied()
                        .filter(|id| *id != ids[target])
                        .collect();
                    network.partition(&cut, &rest);
                    log.note(format!("nemesis: isolate {target}"));
                }
                1 => {
                    let other = (target + 1) % config.nodes;
                    network.block_one_way(ids[target], ids[other]);
                    log.note(format!("nemesis: block {target} -> {other}"));
                }
                2 => {
                    network.heal();
                    log.note("nemesis: heal");
                }
                3 if !down.contains(&target) && down.len() + 1 < config.nodes.div_ceil(2) => {
                    let surviving = usize::try_from(nemesis_rng.range(0, 3)).unwrap_or(0);
                    nodes[target].crash(&network, surviving).await;
                    down.insert(target);
                    log.note(format!(
                        "nemesis: crash {target} keeping {surviving} unsynced batches"
                    ));
                }
                _ => {
                    if let Some(back) = down.iter().next().copied() {
                        down.remove(&back);
                        network.restart(ids[back]);
                        nodes[back].start(options(back)).await.map_err(&fail)?;
                        log.note(format!("nemesis: restart {back}"));
                    }
                }
            }
        }
        if next_write < config.writes {
            let through = usize::try_from(client_rng.range(0, config.nodes as u64)).unwrap_or(0);
            if let Some(handle) = nodes[through].handle.clone() {
                let index = next_write;
                next_write += 1;
                let outcome =
                    tokio::time::timeout(Duration::from_secs(2), handle.apply(&[write(index)]))
                        .await;
                match outcome {
                    Ok(Ok(())) => {
                        acknowledged
                            .lock()
                            .map_err(|_| fail("poisoned".into()))?
                            .insert(index);
                        log.note(format!("write {index} via {through}: acknowledged"));
                    }
                    Ok(Err(ConsensusError::NoLeader { .. })) => {
                        log.note(format!("write {index} via {through}: no leader"));
                    }
                    Ok(Err(error)) => {
                        log.note(format!("write {index} via {through}: unknown ({error})"));
                    }
                    Err(_) => log.note(format!("write {index} via {through}: unknown (timed out)")),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(client_rng.range(20, 120))).await;
    }

    // Liveness: heal, bring everyone back, and within 30 simulated seconds a write
    // commits and every replica applies it.
    network.heal();
    network.set_faults(FaultPlan::NONE);
    for back in std::mem::take(&mut down) {
        network.restart(ids[back]);
        nodes[back].start(options(back)).await.map_err(&fail)?;
        log.note(format!("final: restart {back}"));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // Every voter the nemesis took out goes back in (a learner first, then a voter).
    for back in std::mem::take(&mut removed) {
        let through = (back + 1) % config.nodes;
        loop {
            let handle = nodes[through]
                .handle
                .clone()
                .ok_or_else(|| fail("a node is down after heal".into()))?;
            if let Ok(Ok(())) =
                tokio::time::timeout(Duration::from_secs(5), handle.add_member(&ids[back])).await
            {
                log.note(format!("final: {back} is a voter again"));
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(fail(format!(
                    "node {back} could not be added back after heal"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let final_write = config.writes;
    loop {
        observe(&handles_now(&nodes));
        let handle = nodes[final_write % config.nodes]
            .handle
            .clone()
            .ok_or_else(|| fail("a node is still down".into()))?;
        if let Ok(Ok(())) =
            tokio::time::timeout(Duration::from_secs(2), handle.apply(&[write(final_write)])).await
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(fail("no write committed within 30 s of healing".into()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    log.note("final write committed");
    // The register's history: clients stop, a last read closes it, then Wing–Gong.
    clients_stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }
    let mut register = history.lock().map_err(|_| fail("poisoned".into()))?.clone();
    let closing = nodes[0]
        .handle
        .clone()
        .ok_or_else(|| fail("a node is down".into()))?;
    let invoked = micros();
    let last = tokio::time::timeout(
        Duration::from_secs(10),
        closing.read_record("refs", REGISTER),
    )
    .await
    .map_err(|_| fail("the register's closing read timed out after heal".into()))?
    .map_err(|error| fail(format!("the register's closing read failed: {error}")))?;
    register.push(Event {
        op: Op::Read(last.map(|bytes| String::from_utf8_lossy(&bytes).into_owned())),
        invoked,
        returned: micros(),
    });
    if !forge_consensus::history::check(&register) {
        return Err(fail(format!(
            "the register's history is not linearizable ({} operations): {register:?}",
            register.len()
        )));
    }
    log.note(format!(
        "register: {} operations, linearizable",
        register.len()
    ));
    let mut replicas = Vec::new();
    for (index, node) in nodes.iter().enumerate() {
        let handle = node
            .handle
            .clone()
            .ok_or_else(|| fail("a node is down".into()))?;
        let target = loop {
            let status = handle.status();
            if let Some(committed) = status.committed {
                break committed;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let leader_committed = handles_now(&nodes)
            .iter()
            .filter_map(|(_, handle)| {
                let status = handle.status();
                status.leading.then_some(status.committed).flatten()
            })
            .max()
            .unwrap_or(target);
        handle
            .wait_applied(
                leader_committed,
                deadline.saturating_duration_since(tokio::time::Instant::now()),
            )
            .await
            .map_err(|error| fail(format!("node {index} did not catch up: {error}")))?;
        let records = handle
            .local_records("refs", b"w")
            .map_err(|error| fail(error.to_string()))?;
        replicas.push(records);
    }
    if let Some(reason) = violation
        .lock()
        .map_err(|_| fail("poisoned".into()))?
        .clone()
    {
        return Err(fail(reason));
    }
    for (index, records) in replicas.iter().enumerate().skip(1) {
        if *records != replicas[0] {
            return Err(fail(format!(
                "replica {index} applied {} records, replica 0 {}",
                records.len(),
                replicas[0].len()
            )));
        }
    }
    let applied: BTreeSet<Vec<u8>> = replicas[0].iter().map(|(key, _)| key.clone()).collect();
    let acknowledged = acknowledged
        .lock()
        .map_err(|_| fail("poisoned".into()))?
        .clone();
    for index in &acknowledged {
        if !applied.contains(format!("w{index:04}").as_bytes()) {
            return Err(fail(format!("acknowledged write {index} was lost")));
        }
    }
    log.note(format!(
        "end: {} acknowledged, {} applied",
        acknowledged.len(),
        applied.len()
    ));
    for node in &mut nodes {
        if let Some(handle) = node.handle.take() {
            let _ = handle.shutdown().await;
        }
    }
    let events = log.snapshot();
    let mut hasher = blake3::Hasher::new();
    for event in &events {
        hasher.update(event.as_bytes());
        hasher.update(b"\n");
    }
    hasher.update(&network.trace());
    let leaders = leaders.lock().map_err(|_| fail("poisoned".into()))?.clone();
    Ok(RaftSimReport {
        seed,
        config,
        trace: *hasher.finalize().as_bytes(),
        acknowledged: acknowledged.len(),
        leaders,
        events,
    })
}
