//! The sync protocol's thin async drivers around the sans-IO [`SyncWalker`]: the sender's
//! [`push`] (a window of requests in flight, retries for what the network lost) and the
//! receiver's [`serve_sync`] (answers what it holds; stores a chunk or object only after
//! checking it against its cid, an index node only once all its children are held).
//! Both run over any [`PeerNet`], so the in-process network and the simulator carry them.

use std::sync::Arc;
use std::time::Duration;

use forge_crypto::{Cid, NodeId};
use forge_store::refindex::Node;
use tokio::task::JoinSet;

use super::walker::{Item, Step, SyncWalker, WalkStats};
use super::wire::{DataKind, Message, PutOutcome};
use crate::net::{Inbound, MeshError, PeerNet, Protocol};

/// The sync protocol: requests carry up to a batch of chunks (several MiB).
pub const SYNC_PROTOCOL: Protocol = Protocol {
    name: "/forge/sync/1",
    max_request_bytes: 24 << 20,
    max_response_bytes: 1 << 20,
    inbound_queue: 32,
};

/// A vault's store as a sync sees it: every chunk, object and index node it holds, by
/// cid, whatever volume they belong to (so what another volume shares is not sent).
pub trait SyncStore: Send + Sync {
    /// Whether the store holds `cid` whole (an object, an index node, or a chunk).
    ///
    /// # Errors
    /// The store failing ([`MeshError::Local`]).
    fn holds(&self, cid: &Cid) -> Result<bool, MeshError>;

    /// The bytes of an index node or object, or a chunk's ciphertext, and which it is
    /// (the sender's side).
    ///
    /// # Errors
    /// Not held; the store failing.
    fn read(&self, item: &Item) -> Result<(DataKind, Vec<u8>), MeshError>;

    /// Stores items already checked against their cids, durably and as one group (the
    /// receiver's side: one sync per request, not per chunk): an object or index node as
    /// it is, a chunk's ciphertext as shards of this vault's own erasure layout.
    ///
    /// # Errors
    /// The store failing (nothing of the group may be taken as stored then).
    fn store(&self, items: Vec<(Item, DataKind, Vec<u8>)>) -> Result<(), MeshError>;
}

/// Called as a push goes: (chunks and objects sent, bytes sent) so far.
pub type ProgressFn = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// How a push paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushConfig {
    /// Items asked about, or sent, per walker step.
    pub batch_items: usize,
    /// Bytes of chunks per request (a step's chunks may take several requests).
    pub batch_bytes: usize,
    /// Requests in flight at once.
    pub window: usize,
    /// Deadline of each request.
    pub deadline: Duration,
    /// Attempts of a request the network lost (timeouts, busy peer) before giving up.
    pub attempts: u32,
    /// Read chunks on blocking threads (production), not on the task that sends them
    /// (deterministic tests and the simulator, on one thread with paused time).
    pub blocking_reads: bool,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            batch_items: 256,
            batch_bytes: 8 << 20,
            window: 8,
            deadline: Duration::from_secs(30),
            attempts: 5,
            blocking_reads: false,
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushReport {
    /// The walk's counts (asked, held, sent).
    pub walk: WalkStats,
    /// Bytes of requests sent (retries included).
    pub bytes_sent: u64,
    /// Items the receiver refused as damaged and that were sent again.
    pub resent: u64,
    /// Requests repeated after the network lost them.
    pub retries: u64,
}

/// Whether a failed request is worth repeating: the network lost it or the peer was
/// busy. All sync requests are idempotent (questions, and puts of content-addressed
/// bytes), so a repeat after an unknown outcome is safe.
fn retryable(error: &MeshError) -> bool {
    matches!(
        error,
        MeshError::Timeout { .. }
            | MeshError::ConnectionLost { .. }
            | MeshError::Busy { .. }
            | MeshError::Unreachable { .. }
    )
}

/// Sends one message, repeating it while the network loses it; the decoded answer and
/// (bytes sent, retries).
async fn exchange(
    net: &dyn PeerNet,
    peer: NodeId,
    message: &Message,
    config: &PushConfig,
) -> Result<(Message, u64, u64), MeshError> {
    let body = message.encode();
    let mut sent = 0;
    let mut attempt = 0;
    loop {
        attempt += 1;
        sent += body.len() as u64;
        let outcome = net
            .request(peer, SYNC_PROTOCOL, body.clone(), config.deadline)
            .await
            // A damaged answer is as good as lost.
            .and_then(|answer| Message::decode(&answer));
        match outcome {
            Ok(answer) => return Ok((answer, sent, u64::from(attempt - 1))),
            Err(error)
                if attempt < config.attempts
                    && (retryable(&error) || matches!(error, MeshError::Local { .. })) =>
            {
                tokio::time::sleep(Duration::from_millis(50) * attempt).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// What a step in flight came back with.
struct Answered {
    step: Step,
    answer: Result<(Message, u64, u64), MeshError>,
}

/// Runs one network step: a question, or a batch of chunks (in requests of at most
/// `batch_bytes`), or one index node.
async fn run_step(
    net: Arc<dyn PeerNet>,
    store: Arc<dyn SyncStore>,
    peer: NodeId,
    step: Step,
    config: PushConfig,
) -> Answered {
    let answer = match &step {
        Step::Ask(items) => exchange(&*net, peer, &Message::Have(items.clone()), &config).await,
        Step::SendNode(node) => match read_node(&store, *node, &config).await {
            Ok((_, bytes)) => exchange(&*net, peer, &Message::PutNode(*node, bytes), &config).await,
            Err(error) => Err(error),
        },
        Step::Send(cids) => send_data(&*net, &store, peer, cids, &config).await,
        Step::Load(_) | Step::Wait | Step::Done => Err(MeshError::Local {
            what: "a local step sent to the network".into(),
        }),
    };
    Answered { step, answer }
}

/// Reads index node `node` to send it: off the async threads when reads are
/// (`blocking_reads`: a grouped volume's node this member lacks is fetched from its group).
async fn read_node(
    store: &Arc<dyn SyncStore>,
    node: Cid,
    config: &PushConfig,
) -> Result<(DataKind, Vec<u8>), MeshError> {
    if !config.blocking_reads {
        return store.read(&Item::Node(node));
    }
    let store = store.clone();
    crate::blocking::run(move || store.read(&Item::Node(node)))
        .await
        .map_err(|error| MeshError::Local {
            what: format!("reading an index node to send: {error}"),
        })?
}

/// Items of a `PutData`: each cid, its kind and its bytes.
type DataBatch = Vec<(Cid, DataKind, Vec<u8>)>;

/// Reads the data of `cids[start..]` until `limit` bytes (at least one item); the items
/// and where the next read starts.
fn read_batch(
    store: &dyn SyncStore,
    cids: &[Cid],
    start: usize,
    limit: usize,
) -> Result<(DataBatch, usize), MeshError> {
    let (mut batch, mut bytes, mut next) = (Vec::new(), 0, start);
    while next < cids.len() && (batch.is_empty() || bytes < limit) {
        let (kind, data) = store.read(&Item::Data(cids[next]))?;
        bytes += data.len();
        batch.push((cids[next], kind, data));
        next += 1;
    }
    Ok((batch, next))
}

async fn send_data(
    net: &dyn PeerNet,
    store: &Arc<dyn SyncStore>,
    peer: NodeId,
    cids: &[Cid],
    config: &PushConfig,
) -> Result<(Message, u64, u64), MeshError> {
    let (mut outcomes, mut sent, mut retries) = (Vec::with_capacity(cids.len()), 0, 0);
    let mut start = 0;
    while start < cids.len() {
        let (batch, next) = if config.blocking_reads {
            // Reads (and verifies) chunks off the async threads, which also drive the
            // network.
            let (store, owned) = (store.clone(), cids.to_vec());
            let limit = config.batch_bytes;
            crate::blocking::run(move || read_batch(&*store, &owned, start, limit))
                .await
                .map_err(|error| MeshError::Local {
                    what: format!("reading chunks to send: {error}"),
                })??
        } else {
            read_batch(&**store, cids, start, config.batch_bytes)?
        };
        start = next;
        let count = batch.len();
        let (answer, bytes, repeats) =
            exchange(net, peer, &Message::PutData(batch), config).await?;
        sent += bytes;
        retries += repeats;
        match answer {
            Message::Stored(more) if more.len() == count => outcomes.extend(more),
            other => {
                return Err(MeshError::Local {
                    what: format!("the receiver answered a put with {other:?}"),
                });
            }
        }
    }
    Ok((Message::Stored(outcomes), sent, retries))
}

/// Pushes the index rooted at `root` (and everything it lists) to `peer`, sending only
/// what the peer lacks. Ends when the peer holds the whole index.
///
/// # Errors
/// The peer refused or failed a request; the network lost one `attempts` times; the local
/// store failed; the peer broke the protocol.
pub async fn push(
    net: Arc<dyn PeerNet>,
    peer: NodeId,
    store: Arc<dyn SyncStore>,
    root: Cid,
    config: PushConfig,
) -> Result<PushReport, MeshError> {
    push_with_progress(net, peer, store, root, config, None).await
}

/// [`push`], telling `progress` what went out as it goes.
///
/// # Errors
/// As [`push`].
pub async fn push_with_progress(
    net: Arc<dyn PeerNet>,
    peer: NodeId,
    store: Arc<dyn SyncStore>,
    root: Cid,
    config: PushConfig,
    progress: Option<ProgressFn>,
) -> Result<PushReport, MeshError> {
    let mut walker = SyncWalker::new(root, config.batch_items);
    let mut report = PushReport::default();
    let mut in_flight: JoinSet<Answered> = JoinSet::new();
    loop {
        while in_flight.len() < config.window.max(1) {
            match walker.next_step() {
                Step::Done | Step::Wait => break,
                Step::Load(node) => {
                    let (_, bytes) = store.read(&Item::Node(node))?;
                    let decoded =
                        Node::decode(&node, &bytes).map_err(|error| MeshError::Local {
                            what: format!("this vault's own index: {error}"),
                        })?;
                    walker.loaded(node, decoded.level, &decoded.entries)?;
                }
                step => {
                    in_flight.spawn(run_step(net.clone(), store.clone(), peer, step, config));
                }
            }
        }
        if walker.is_done() {
            break;
        }
        let Some(joined) = in_flight.join_next().await else {
            return Err(MeshError::Local {
                what: "the sync walk stalled with nothing in flight".into(),
            });
        };
        let Answered { step, answer } = joined.map_err(|error| MeshError::Local {
            what: format!("a sync request task failed: {error}"),
        })?;
        let (answer, bytes, retries) = answer?;
        report.bytes_sent += bytes;
        report.retries += retries;
        let unexpected = |answer: &Message| MeshError::Remote {
            peer,
            protocol: SYNC_PROTOCOL.name,
            message: format!("an answer that does not fit the request: {answer:?}"),
        };
        match (step, answer) {
            (Step::Ask(items), Message::Held(held)) => walker.answered(&items, &held)?,
            (Step::Send(cids), Message::Stored(outcomes)) if outcomes.len() == cids.len() => {
                for (cid, outcome) in cids.into_iter().zip(outcomes) {
                    settle(&mut walker, &mut report, peer, Item::Data(cid), outcome)?;
                }
            }
            (Step::SendNode(node), Message::Stored(outcomes)) if outcomes.len() == 1 => {
                settle(
                    &mut walker,
                    &mut report,
                    peer,
                    Item::Node(node),
                    outcomes[0],
                )?;
            }
            (_, answer) => return Err(unexpected(&answer)),
        }
        if let Some(progress) = &progress {
            progress(walker.stats().data_sent, report.bytes_sent);
        }
    }
    report.walk = walker.stats();
    Ok(report)
}

fn settle(
    walker: &mut SyncWalker,
    report: &mut PushReport,
    peer: NodeId,
    item: Item,
    outcome: PutOutcome,
) -> Result<(), MeshError> {
    match outcome {
        PutOutcome::Stored => walker.stored(&[item]),
        PutOutcome::WrongBytes => {
            report.resent += 1;
            walker.resend(item)
        }
        PutOutcome::ChildrenMissing => Err(MeshError::Remote {
            peer,
            protocol: SYNC_PROTOCOL.name,
            message: format!(
                "it lacks children of index node {} that it said it held",
                item.cid()
            ),
        }),
    }
}

/// The receiver's answer to one sync message (`None`: not a request; refuse it).
///
/// # Errors
/// The store failing.
pub fn answer(store: &dyn SyncStore, message: Message) -> Result<Option<Message>, MeshError> {
    Ok(Some(match message {
        Message::Have(items) => Message::Held(
            items
                .iter()
                .map(|item| store.holds(&item.cid()))
                .collect::<Result<_, _>>()?,
        ),
        Message::PutData(entries) => {
            let mut outcomes = Vec::with_capacity(entries.len());
            let mut verified = Vec::with_capacity(entries.len());
            for (cid, kind, bytes) in entries {
                // Never stored unverified: the bytes must hash to the cid they came under.
                let skip_check =
                    forge_store::injected_bug!("sync-skips-cid-check") && kind == DataKind::Chunk;
                if skip_check || cid.matches(&bytes) {
                    verified.push((Item::Data(cid), kind, bytes));
                    outcomes.push(PutOutcome::Stored);
                } else {
                    outcomes.push(PutOutcome::WrongBytes);
                }
            }
            if !verified.is_empty() {
                store.store(verified)?;
            }
            Message::Stored(outcomes)
        }
        Message::PutNode(id, bytes) => {
            let outcome = match Node::decode(&id, &bytes) {
                Err(_) => PutOutcome::WrongBytes,
                Ok(node) => {
                    let mut complete = true;
                    for child in &node.entries {
                        if !store.holds(child)? {
                            complete = false;
                            break;
                        }
                    }
                    // Holding a node means holding its subtree: stored only once it does.
                    if complete {
                        store.store(vec![(Item::Node(id), DataKind::Object, bytes)])?;
                        PutOutcome::Stored
                    } else {
                        PutOutcome::ChildrenMissing
                    }
                }
            };
            Message::Stored(vec![outcome])
        }
        Message::Held(_) | Message::Stored(_) => return Ok(None),
    }))
}

/// Serves the sync protocol on `inbound` until the node stops serving: each request from
/// a peer `allowed` accepts is answered from (and stored into) `store`. A damaged request
/// is dropped unanswered, as the network would drop a damaged packet: its sender repeats
/// it.
pub async fn serve_sync(
    inbound: Inbound,
    store: Arc<dyn SyncStore>,
    allowed: impl Fn(&NodeId) -> Result<(), String>,
) {
    serve_sync_resolved(
        inbound,
        move |from| allowed(from).map(|()| store.clone()),
        1,
    )
    .await;
}

/// [`serve_sync`] with the store chosen per sender: `resolve` gives the store of the sync
/// accepted from that peer, or the rule that refuses its request.
pub async fn serve_sync_resolved(
    mut inbound: Inbound,
    resolve: impl Fn(&NodeId) -> Result<Arc<dyn SyncStore>, String>,
    workers: usize,
) {
    // Requests answered at once, each on a blocking thread (hashing and synced writes):
    // puts of content-addressed bytes commute, and a sender puts an index node only after
    // its children were answered stored, so order within a sync does not matter. One
    // worker answers in arrival order on this task (deterministic: tests, the simulator).
    let permits = Arc::new(tokio::sync::Semaphore::new(workers.max(1)));
    while let Some(request) = inbound.next().await {
        let store = match resolve(&request.from) {
            Ok(store) => store,
            Err(rule) => {
                request.refuse(rule);
                continue;
            }
        };
        let Ok(message) = Message::decode(&request.body) else {
            continue;
        };
        let reply =
            move |request: crate::net::InboundRequest, store: Arc<dyn SyncStore>| match answer(
                &*store, message,
            ) {
                Ok(Some(reply)) => request.respond(reply.encode()),
                Ok(None) => request.refuse("an answer is not a request"),
                Err(error) => request.fail(error.to_string()),
            };
        if workers <= 1 {
            reply(request, store);
            continue;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        tokio::spawn(crate::blocking::run(move || {
            let _permit = permit;
            reply(request, store);
        }));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use forge_store::refindex;

    use super::*;
    use crate::memory::{FaultPlan, MemoryNetwork};

    /// A store in memory that checks, on every write, what the protocol promises: data
    /// matches its cid, a node's children are all held.
    #[derive(Debug, Default)]
    struct CheckedStore {
        items: Mutex<BTreeMap<Cid, Vec<u8>>>,
    }

    impl CheckedStore {
        fn insert(&self, cid: Cid, bytes: Vec<u8>) {
            self.items.lock().unwrap().insert(cid, bytes);
        }

        fn len(&self) -> usize {
            self.items.lock().unwrap().len()
        }

        fn holds_all(&self, root: Cid) -> bool {
            let items = self.items.lock().unwrap();
            let (cids, nodes) =
                refindex::walk(&root, |id| items.get(id).cloned()).expect("whole index");
            cids.iter().chain(&nodes).all(|id| items.contains_key(id))
        }
    }

    impl SyncStore for CheckedStore {
        fn holds(&self, cid: &Cid) -> Result<bool, MeshError> {
            Ok(self.items.lock().unwrap().contains_key(cid))
        }

        fn read(&self, item: &Item) -> Result<(DataKind, Vec<u8>), MeshError> {
            let bytes = self
                .items
                .lock()
                .unwrap()
                .get(&item.cid())
                .cloned()
                .ok_or_else(|| MeshError::Local {
                    what: format!("{item:?} not held"),
                })?;
            let kind = match item {
                Item::Node(_) => DataKind::Object,
                Item::Data(_) => DataKind::Chunk,
            };
            Ok((kind, bytes))
        }

        fn store(&self, items: Vec<(Item, DataKind, Vec<u8>)>) -> Result<(), MeshError> {
            for (item, kind, bytes) in items {
                assert!(item.cid().matches(&bytes), "stored unverified: {item:?}");
                if let Item::Node(id) = item {
                    assert_eq!(kind, DataKind::Object, "an index node is an object");
                    let node = Node::decode(&id, &bytes).expect("a valid node");
                    let held = self.items.lock().unwrap();
                    for child in &node.entries {
                        assert!(
                            held.contains_key(child),
                            "node {id} before its child {child}"
                        );
                    }
                }
                self.insert(item.cid(), bytes);
            }
            Ok(())
        }
    }

    /// `count` chunks of pseudo-random bytes derived from `seed`, and the index over them,
    /// in a new store; the chunks and the root.
    fn volume(store: &CheckedStore, seed: u64, count: u64) -> (Vec<Cid>, Cid) {
        let mut cids = Vec::new();
        for n in 0..count {
            let len = usize::try_from((seed.wrapping_mul(31) + n * 7919) % 3000 + 1).unwrap();
            let bytes: Vec<u8> = (0..len)
                .map(|i| u8::try_from((seed + n * 131 + i as u64 * 17) % 251).unwrap())
                .collect();
            let cid = Cid::of(&bytes);
            store.insert(cid, bytes);
            cids.push(cid);
        }
        let root = refindex::build(&cids, |id, bytes| store.insert(id, bytes));
        (cids, root)
    }

    /// A push from one node to another over a faulty in-process network; the report, the
    /// network's trace, and whether the receiver ended up with the whole index.
    async fn faulty_push(
        seed: u64,
        faults: FaultPlan,
        already: u64,
    ) -> (PushReport, [u8; 32], bool, usize) {
        let network = MemoryNetwork::new(seed);
        network.set_faults(faults);
        let (sender_id, receiver_id) = (NodeId::from_bytes([1; 32]), NodeId::from_bytes([2; 32]));
        let sender_net: Arc<dyn PeerNet> = network.join(sender_id);
        let receiver_net = network.join(receiver_id);
        let sender = Arc::new(CheckedStore::default());
        let (cids, root) = volume(&sender, seed, 600);
        let receiver = Arc::new(CheckedStore::default());
        // What an interrupted earlier sync got across: some chunks, no index nodes.
        for cid in cids.iter().take(usize::try_from(already).unwrap()) {
            receiver.insert(*cid, sender.read(&Item::Data(*cid)).unwrap().1);
        }
        let inbound = receiver_net.serve(SYNC_PROTOCOL).unwrap();
        let serving = receiver.clone();
        tokio::spawn(serve_sync(inbound, serving, move |from| {
            if *from == sender_id {
                Ok(())
            } else {
                Err("not trusted to write".into())
            }
        }));
        let config = PushConfig {
            batch_items: 64,
            batch_bytes: 40_000,
            window: 4,
            deadline: Duration::from_millis(500),
            attempts: 12,
            blocking_reads: false,
        };
        let report = push(sender_net, receiver_id, sender.clone(), root, config)
            .await
            .expect("the push converges");
        (
            report,
            network.trace(),
            receiver.holds_all(root),
            receiver.len(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_push_sends_only_what_the_receiver_lacks_and_nothing_twice() {
        let (report, _, whole, _) = faulty_push(1, FaultPlan::NONE, 0).await;
        assert!(whole);
        assert_eq!(report.walk.data_sent, 600);
        assert_eq!((report.retries, report.resent), (0, 0));
        // Resumed after an interruption that got 250 chunks across: those are not sent.
        let (resumed, _, whole, _) = faulty_push(1, FaultPlan::NONE, 250).await;
        assert!(whole);
        assert_eq!(resumed.walk.data_sent, 350);
        assert!(resumed.bytes_sent < report.bytes_sent);
    }

    #[tokio::test(start_paused = true)]
    async fn over_many_seeds_of_loss_delay_duplication_and_damage_the_push_converges() {
        let faults = FaultPlan {
            loss: 0.08,
            delay_min: Duration::from_millis(1),
            delay_max: Duration::from_millis(80),
            duplicate: 0.05,
            corrupt_request: 0.05,
            corrupt_response: 0.05,
        };
        let mut retried = 0;
        for seed in 0..24 {
            let (report, trace, whole, _) = faulty_push(seed, faults, seed * 20).await;
            assert!(whole, "seed {seed}: the receiver lacks part of the index");
            retried += report.retries;
            // The same seed, the same events.
            let (again, same_trace, _, _) = faulty_push(seed, faults, seed * 20).await;
            assert_eq!(
                (again, same_trace),
                (report, trace),
                "seed {seed} is not deterministic"
            );
        }
        assert!(retried > 0, "the faults never cost a retry");
    }

    #[tokio::test(start_paused = true)]
    async fn an_untrusted_sender_is_refused_and_nothing_is_stored() {
        let network = MemoryNetwork::new(5);
        let stranger: Arc<dyn PeerNet> = network.join(NodeId::from_bytes([9; 32]));
        let receiver_net = network.join(NodeId::from_bytes([2; 32]));
        let receiver = Arc::new(CheckedStore::default());
        tokio::spawn(serve_sync(
            receiver_net.serve(SYNC_PROTOCOL).unwrap(),
            receiver.clone(),
            |_| Err("peer is not trusted to write volume v".into()),
        ));
        let sender = Arc::new(CheckedStore::default());
        let (_, root) = volume(&sender, 3, 50);
        let error = push(
            stranger,
            NodeId::from_bytes([2; 32]),
            sender,
            root,
            PushConfig::default(),
        )
        .await
        .expect_err("refused");
        assert!(
            error.to_string().contains("not trusted to write volume v"),
            "{error}"
        );
        assert_eq!(receiver.len(), 0);
    }
}
