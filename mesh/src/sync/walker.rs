//! The sender's walk of a reference index during a sync, as a sans-IO state machine: no
//! sockets, no storage, no clocks. The driver asks [`SyncWalker::next_step`] what to do,
//! does it (ask the receiver, read a node from its own store, send), and reports back.
//!
//! The walk goes top-down: it asks the receiver which of a batch of index nodes and data
//! cids it already holds, in its whole store (so chunks shared with another volume are
//! not sent). A held index node stands for its whole subtree: the receiver stores a node
//! only after everything under it is durable, and the walker keeps that rule on its side
//! by sending a node only once every child is held or stored. That makes an interrupted
//! sync resumable (a rerun skips every subtree already complete) and makes the walk work
//! across indexes of different heights: nothing is compared level by level, every id is
//! asked about on its own.

use std::collections::{BTreeMap, VecDeque};

use forge_crypto::Cid;

use crate::net::MeshError;

/// What the walker talks about: an index node (expanded when missing) or a data cid (a
/// chunk or an object: sent when missing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Item {
    /// A reference-index node.
    Node(Cid),
    /// A chunk or object the index lists.
    Data(Cid),
}

impl Item {
    /// Its id.
    #[must_use]
    pub fn cid(&self) -> Cid {
        match self {
            Self::Node(cid) | Self::Data(cid) => *cid,
        }
    }
}

/// The next thing the driver should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Ask the receiver which of these it holds; report with [`SyncWalker::answered`].
    Ask(Vec<Item>),
    /// Read this index node from the local store; report with [`SyncWalker::loaded`].
    Load(Cid),
    /// Send these chunks or objects; report with [`SyncWalker::stored`] once the receiver
    /// has them durably.
    Send(Vec<Cid>),
    /// Send this index node (its whole subtree is at the receiver); report with
    /// [`SyncWalker::stored`].
    SendNode(Cid),
    /// Nothing to start until an answer arrives.
    Wait,
    /// The receiver holds the whole index.
    Done,
}

/// What the walk did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// Items asked about.
    pub asked: u64,
    /// Items the receiver already held (each held node skips its whole subtree).
    pub held: u64,
    /// Chunks and objects sent.
    pub data_sent: u64,
    /// Index nodes sent.
    pub nodes_sent: u64,
}

/// Where an item is in the walk.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Waiting to be asked about.
    Queued,
    /// Asked; no answer yet.
    Asked,
    /// A node the receiver lacks, being read locally.
    Loading,
    /// A node the receiver lacks whose children are outstanding (this many).
    Expanded { outstanding: usize },
    /// Missing at the receiver and due to be sent (data), or sent and not yet confirmed.
    Sending,
}

/// The sender's walk of one index (see the module documentation).
#[derive(Debug)]
pub struct SyncWalker {
    root: Cid,
    batch: usize,
    /// Items in the walk and not yet complete at the receiver.
    states: BTreeMap<Item, State>,
    /// Parents waiting on each item (an index lists each id once, but be robust).
    parents: BTreeMap<Item, Vec<Cid>>,
    to_ask: VecDeque<Item>,
    to_load: VecDeque<Cid>,
    to_send: VecDeque<Cid>,
    nodes_to_send: VecDeque<Cid>,
    done: bool,
    stats: WalkStats,
}

fn protocol_error(what: String) -> MeshError {
    MeshError::Local { what }
}

impl SyncWalker {
    /// A walk of the index rooted at `root`, asking and sending at most `batch` items at a
    /// time.
    #[must_use]
    pub fn new(root: Cid, batch: usize) -> Self {
        let root_item = Item::Node(root);
        Self {
            root,
            batch: batch.max(1),
            states: BTreeMap::from([(root_item, State::Queued)]),
            parents: BTreeMap::new(),
            to_ask: VecDeque::from([root_item]),
            to_load: VecDeque::new(),
            to_send: VecDeque::new(),
            nodes_to_send: VecDeque::new(),
            done: false,
            stats: WalkStats::default(),
        }
    }

    /// What the walk did so far.
    #[must_use]
    pub fn stats(&self) -> WalkStats {
        self.stats
    }

    /// Whether the receiver holds the whole index.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The next step. Several may be in flight at once (a window of requests): call this
    /// until it says [`Step::Wait`], then report answers as they come, in any order.
    pub fn next_step(&mut self) -> Step {
        if self.done {
            return Step::Done;
        }
        // Completing subtrees first keeps the set of half-done nodes small.
        if let Some(node) = self.nodes_to_send.pop_front() {
            self.stats.nodes_sent += 1;
            return Step::SendNode(node);
        }
        if !self.to_send.is_empty() {
            let count = self.batch.min(self.to_send.len());
            let cids: Vec<Cid> = self.to_send.drain(..count).collect();
            self.stats.data_sent += cids.len() as u64;
            return Step::Send(cids);
        }
        if let Some(node) = self.to_load.pop_front() {
            return Step::Load(node);
        }
        if !self.to_ask.is_empty() {
            let count = self.batch.min(self.to_ask.len());
            let items: Vec<Item> = self.to_ask.drain(..count).collect();
            for item in &items {
                self.states.insert(*item, State::Asked);
            }
            self.stats.asked += items.len() as u64;
            return Step::Ask(items);
        }
        Step::Wait
    }

    /// The receiver's answer to an [`Step::Ask`]: `held[i]` for `asked[i]`.
    ///
    /// # Errors
    /// An answer of the wrong length or about items not asked (a confused driver or peer).
    pub fn answered(&mut self, asked: &[Item], held: &[bool]) -> Result<(), MeshError> {
        if asked.len() != held.len() {
            return Err(protocol_error(format!(
                "the receiver answered {} of {} questions",
                held.len(),
                asked.len()
            )));
        }
        for (item, held) in asked.iter().zip(held) {
            if self.states.get(item) != Some(&State::Asked) {
                return Err(protocol_error(format!(
                    "an answer about {item:?}, which was not asked"
                )));
            }
            if *held {
                self.stats.held += 1;
                self.complete(*item);
            } else {
                match item {
                    Item::Node(node) => {
                        self.states.insert(*item, State::Loading);
                        self.to_load.push_back(*node);
                    }
                    Item::Data(cid) => {
                        self.states.insert(*item, State::Sending);
                        self.to_send.push_back(*cid);
                    }
                }
            }
        }
        Ok(())
    }

    /// A node read locally after [`Step::Load`]: its level and entries (level 0: data
    /// cids; above: the ids of nodes one level down).
    ///
    /// # Errors
    /// A node not being loaded.
    pub fn loaded(&mut self, node: Cid, level: u8, entries: &[Cid]) -> Result<(), MeshError> {
        let item = Item::Node(node);
        if self.states.get(&item) != Some(&State::Loading) {
            return Err(protocol_error(format!(
                "node {node} loaded but not asked for"
            )));
        }
        let mut outstanding = 0;
        for entry in entries {
            let child = if level == 0 {
                Item::Data(*entry)
            } else {
                Item::Node(*entry)
            };
            self.parents.entry(child).or_default().push(node);
            outstanding += 1;
            // An id met again while still in the walk waits with its first occurrence.
            if let std::collections::btree_map::Entry::Vacant(entry) = self.states.entry(child) {
                entry.insert(State::Queued);
                self.to_ask.push_back(child);
            }
        }
        self.states.insert(item, State::Expanded { outstanding });
        if outstanding == 0 {
            self.children_complete(node);
        }
        Ok(())
    }

    /// The receiver stored these items durably (after [`Step::Send`] or
    /// [`Step::SendNode`]).
    ///
    /// # Errors
    /// An item that was not being sent.
    pub fn stored(&mut self, items: &[Item]) -> Result<(), MeshError> {
        for item in items {
            if self.states.get(item) != Some(&State::Sending) {
                return Err(protocol_error(format!(
                    "{item:?} reported stored but was not being sent"
                )));
            }
            self.complete(*item);
        }
        Ok(())
    }

    /// A sent item the receiver did not take (it failed its cid check in transit, say):
    /// send it again.
    ///
    /// # Errors
    /// An item that was not being sent.
    pub fn resend(&mut self, item: Item) -> Result<(), MeshError> {
        if self.states.get(&item) != Some(&State::Sending) {
            return Err(protocol_error(format!(
                "{item:?} to resend but was not being sent"
            )));
        }
        match item {
            Item::Data(cid) => self.to_send.push_back(cid),
            Item::Node(node) => self.nodes_to_send.push_back(node),
        }
        Ok(())
    }

    /// A node's children are all at the receiver: the node itself can go.
    fn children_complete(&mut self, node: Cid) {
        self.states.insert(Item::Node(node), State::Sending);
        self.nodes_to_send.push_back(node);
    }

    /// `item` (and so its whole subtree) is at the receiver: tell its parents.
    fn complete(&mut self, item: Item) {
        self.states.remove(&item);
        if item == Item::Node(self.root) {
            debug_assert!(self.states.is_empty(), "the root completes last");
            self.done = true;
            return;
        }
        for parent in self.parents.remove(&item).unwrap_or_default() {
            let ready = match self.states.get_mut(&Item::Node(parent)) {
                Some(State::Expanded { outstanding }) => {
                    *outstanding -= 1;
                    *outstanding == 0
                }
                other => {
                    debug_assert!(false, "parent {parent} of {item:?} is {other:?}");
                    false
                }
            };
            if ready {
                self.children_complete(parent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use forge_store::refindex::{self, Node};
    use proptest::prelude::*;

    use super::*;

    /// A store of objects by id (index nodes as their encodings, data as empty values).
    type Store = BTreeMap<Cid, Vec<u8>>;

    fn cid(n: u32) -> Cid {
        Cid::of(&n.to_le_bytes())
    }

    fn index(cids: &[Cid], store: &mut Store) -> Cid {
        let root = refindex::build(cids, |id, bytes| {
            store.insert(id, bytes);
        });
        for data in cids {
            store.entry(*data).or_default();
        }
        root
    }

    /// Runs a whole walk against `receiver`, answering in a scrambled order chosen by
    /// `shuffle`; checks the receiver's rule (a node is stored only once its children are)
    /// at each store. Returns the stats.
    fn run(
        sender: &Store,
        root: Cid,
        receiver: &mut Store,
        batch: usize,
        shuffle: u64,
    ) -> WalkStats {
        let mut walker = SyncWalker::new(root, batch);
        let mut in_flight: Vec<Step> = Vec::new();
        let mut turn = shuffle;
        loop {
            match walker.next_step() {
                Step::Done => break,
                Step::Wait => {
                    assert!(!in_flight.is_empty(), "waiting with nothing in flight");
                    turn = turn.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let step = in_flight.swap_remove((turn >> 33) as usize % in_flight.len());
                    match step {
                        Step::Ask(items) => {
                            let held: Vec<bool> = items
                                .iter()
                                .map(|item| receiver.contains_key(&item.cid()))
                                .collect();
                            walker.answered(&items, &held).expect("answer");
                        }
                        Step::Load(node) => {
                            let decoded = Node::decode(&node, &sender[&node]).expect("node");
                            walker
                                .loaded(node, decoded.level, &decoded.entries)
                                .expect("loaded");
                        }
                        Step::Send(cids) => {
                            for data in &cids {
                                assert!(!receiver.contains_key(data), "{data} sent twice");
                                receiver.insert(*data, sender[data].clone());
                            }
                            let items: Vec<Item> = cids.into_iter().map(Item::Data).collect();
                            walker.stored(&items).expect("stored");
                        }
                        Step::SendNode(node) => {
                            let decoded = Node::decode(&node, &sender[&node]).expect("node");
                            for child in &decoded.entries {
                                assert!(
                                    receiver.contains_key(child),
                                    "{node} before its child {child}"
                                );
                            }
                            receiver.insert(node, sender[&node].clone());
                            walker.stored(&[Item::Node(node)]).expect("stored");
                        }
                        Step::Done | Step::Wait => unreachable!("never in flight"),
                    }
                }
                step => in_flight.push(step),
            }
        }
        assert!(in_flight.is_empty());
        walker.stats()
    }

    /// Every id of `root`'s index is at `store`.
    fn holds_all(store: &Store, root: Cid) -> bool {
        let (cids, nodes) = refindex::walk(&root, |id| store.get(id).cloned()).expect("walk");
        cids.iter().chain(&nodes).all(|id| store.contains_key(id))
    }

    #[test]
    fn an_empty_receiver_gets_everything_once_and_a_full_one_nothing() {
        let mut sender = Store::new();
        let cids: Vec<Cid> = (0..5_000).map(cid).collect();
        let root = index(&cids, &mut sender);
        let mut receiver = Store::new();
        let stats = run(&sender, root, &mut receiver, 64, 1);
        assert!(holds_all(&receiver, root));
        assert_eq!(stats.data_sent, 5_000);
        assert_eq!(receiver.len(), sender.len());
        let again = run(&sender, root, &mut receiver, 64, 2);
        assert_eq!((again.asked, again.held, again.data_sent), (1, 1, 0));
    }

    #[test]
    fn a_receiver_holding_an_older_index_of_another_height_gets_only_the_difference() {
        let mut sender = Store::new();
        let old: Vec<Cid> = (0..300).map(cid).collect();
        let mut receiver = Store::new();
        let old_root = index(&old, &mut receiver);
        // Many times larger: the new index is taller than the old one.
        let new: Vec<Cid> = (0..40_000).map(cid).collect();
        let root = index(&new, &mut sender);
        let stats = run(&sender, root, &mut receiver, 128, 3);
        assert!(holds_all(&receiver, root) && holds_all(&receiver, old_root));
        assert_eq!(stats.data_sent, 40_000 - 300);
    }

    #[test]
    fn an_interrupted_walk_resumes_without_resending_and_answers_are_checked() {
        let mut sender = Store::new();
        let cids: Vec<Cid> = (0..3_000).map(cid).collect();
        let root = index(&cids, &mut sender);
        // The first run got a random half of the data across, and no index node.
        let mut receiver: Store = cids
            .iter()
            .filter(|c| c.as_bytes()[0] % 2 == 0)
            .map(|c| (*c, Vec::new()))
            .collect();
        let already = receiver.len() as u64;
        let stats = run(&sender, root, &mut receiver, 50, 4);
        assert_eq!(stats.data_sent, 3_000 - already);
        assert!(holds_all(&receiver, root));
        let mut walker = SyncWalker::new(root, 8);
        let Step::Ask(items) = walker.next_step() else {
            panic!("asks first")
        };
        assert!(walker.answered(&items, &[]).is_err());
        assert!(walker.answered(&[Item::Data(cid(1))], &[true]).is_err());
        assert!(walker.stored(&[Item::Node(root)]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Whatever the receiver already holds (any consistent subset: held nodes with
        /// their subtrees, any loose data), in whatever order answers come, the walk ends
        /// with the receiver holding the whole index, never sends what was held, and never
        /// stores a node before its children (checked in `run`).
        #[test]
        fn the_walk_converges_from_any_consistent_receiver(
            sender_cids in proptest::collection::btree_set(0u32..20_000, 0..3_000),
            receiver_cids in proptest::collection::btree_set(0u32..20_000, 0..3_000),
            loose in proptest::collection::btree_set(0u32..20_000, 0..500),
            batch in 1usize..200,
            shuffle in any::<u64>(),
        ) {
            let sender_cids: Vec<Cid> = sender_cids.into_iter().map(cid).collect();
            let mut sender = Store::new();
            let root = index(&sender_cids, &mut sender);
            let mut receiver = Store::new();
            let receiver_cids: Vec<Cid> = receiver_cids.into_iter().map(cid).collect();
            index(&receiver_cids, &mut receiver);
            for extra in loose {
                receiver.entry(cid(extra)).or_default();
            }
            let before: BTreeSet<Cid> = receiver.keys().copied().collect();
            let stats = run(&sender, root, &mut receiver, batch, shuffle);
            prop_assert!(holds_all(&receiver, root));
            let wanted: BTreeSet<Cid> = sender_cids.iter().copied().collect();
            let missing = wanted.difference(&before).count() as u64;
            prop_assert_eq!(stats.data_sent, missing);
        }
    }
}
