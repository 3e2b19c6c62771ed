//! One Raft group on one node: start it, form it, write and read its records, change its
//! members, see its health. Writes and reads on a follower are forwarded to the leader.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use forge_crypto::NodeId;
use forge_mesh::net::{MeshError, PeerNet};
use forge_store::kv::{KvEngine, Syncer};
use forge_store::metadata::RecordUpdate;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::ClientWriteResponse;
use openraft::{ChangeMembers, Config, ReadPolicy, ServerState};

use crate::error::ConsensusError;
use crate::log_store::KvLogStore;
use crate::network::{GroupTable, LinkFactory, RaftReply, RaftRequest, ask};
use crate::state_machine::KvStateMachine;
use crate::types::{Command, GroupId, Member, Outcome, Raft, TypeConfig, Update, raft_id};

/// How a group runs: timing (milliseconds; an election needs several heartbeats'
/// silence) and log compaction.
#[derive(Debug, Clone, Copy)]
pub struct GroupOptions {
    /// Leader heartbeat period.
    pub heartbeat_ms: u64,
    /// Election timeout range.
    pub election_ms: (u64, u64),
    /// Deadline of one forwarded write or read.
    pub forward_deadline: Duration,
    /// A state-machine snapshot is taken after this many entries since the last one.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind a snapshot (a follower that lags less catches up by
    /// log, one further behind by snapshot).
    pub entries_kept_after_snapshot: u64,
    /// The seed of the group's random choices (election timeouts): set by the simulator
    /// so a run replays; None draws them from the OS.
    pub seed: Option<u64>,
}

impl Default for GroupOptions {
    fn default() -> Self {
        Self {
            heartbeat_ms: 200,
            election_ms: (1000, 2000),
            forward_deadline: Duration::from_secs(10),
            snapshot_after_entries: 5000,
            entries_kept_after_snapshot: 1000,
            seed: None,
        }
    }
}

/// What a group looks like from this node (for `cluster status` and /metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    /// The group.
    pub group: GroupId,
    /// Whether this node leads it.
    pub leading: bool,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// The current term.
    pub term: u64,
    /// The last committed log index.
    pub committed: Option<u64>,
    /// The last applied log index.
    pub applied: Option<u64>,
    /// The last log index the current state-machine snapshot covers.
    pub snapshot: Option<u64>,
    /// The last log index purged from the log (compacted behind a snapshot).
    pub purged: Option<u64>,
    /// The voters.
    pub voters: Vec<NodeId>,
    /// On the leader: each follower's lag in entries behind the leader's last log index.
    pub lag: BTreeMap<NodeId, u64>,
}

/// A running group on this node. Cheap to clone.
#[derive(Clone)]
pub struct GroupHandle {
    group: GroupId,
    raft: Raft,
    state: KvStateMachine,
    net: Arc<dyn PeerNet>,
    options: GroupOptions,
    /// Ids of the writes this member forwards: a random base, then counted.
    next_write_id: Arc<std::sync::atomic::AtomicU64>,
    write_id_base: u64,
    /// Forwarded writes this member answered as leader, by id (see [`ForwardedWrites`]).
    forwarded: Arc<std::sync::Mutex<ForwardedWrites>>,
}

/// How many answered forwarded writes a leader remembers: copies of a request arrive
/// within its deadline, long before this many others.
const FORWARDED_WRITES_KEPT: usize = 4096;

/// The answer to a forwarded write, kept for its copies.
#[derive(Debug, Clone)]
enum WriteAnswer {
    Written(Outcome),
    NotLeader(Option<Member>),
    Failed(String),
}

/// Forwarded writes answered (or being answered) here, by id: a copy of a request is
/// answered with the first delivery's answer, never applied again (found by the
/// simulator: a copy applied the compare-and-swap first, and the original, finding its
/// own write, answered the client with a conflict).
#[derive(Debug, Default)]
struct ForwardedWrites {
    answers: BTreeMap<[u8; 16], tokio::sync::watch::Receiver<Option<WriteAnswer>>>,
    order: std::collections::VecDeque<[u8; 16]>,
}

impl std::fmt::Debug for GroupHandle {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GroupHandle")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

fn raft_error<E: std::fmt::Display>(error: E) -> ConsensusError {
    ConsensusError::Raft {
        detail: error.to_string(),
    }
}

impl GroupHandle {
    /// Starts (or restarts, from what `kv` holds) group `group` on this node and adds it
    /// to `table`, which the node's Raft server dispatches from.
    ///
    /// # Errors
    /// Stored state that does not decode; an invalid timing.
    pub async fn start(
        table: &GroupTable,
        group: GroupId,
        kv: Arc<dyn KvEngine>,
        syncer: Option<Arc<Syncer>>,
        net: Arc<dyn PeerNet>,
        options: GroupOptions,
    ) -> Result<Self, ConsensusError> {
        if group == u64::MAX {
            return Err(ConsensusError::InvalidGroup { group });
        }
        let config = Config {
            cluster_name: format!("forge-group-{group}"),
            heartbeat_interval: options.heartbeat_ms,
            election_timeout_min: options.election_ms.0,
            election_timeout_max: options.election_ms.1,
            enable_pre_vote: Some(true),
            // A restarted leader must win an election (and commit a fresh blank entry)
            // before it serves reads: it applies and records its commit index without
            // syncing, so after a power cut its state machine and commit index may be
            // behind what it acknowledged; restored at once (openraft's default) it
            // answered read-index reads from that stale state (found by the simulator,
            // raft scenario seed 13: a read after an acknowledged swap saw the old value).
            enable_leader_restore: Some(false),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(
                options.snapshot_after_entries,
            ),
            max_in_snapshot_log_to_keep: options.entries_kept_after_snapshot,
            ..Config::default()
        }
        .validate()
        .map_err(raft_error)?;
        let log = KvLogStore::new(kv.clone(), group, syncer);
        let state = KvStateMachine::new(kv, group);
        let created = Raft::new(
            raft_id(&net.local_id()),
            Arc::new(config),
            LinkFactory::batched(net.clone(), group, table),
            log,
            state.clone(),
        );
        // The tasks Raft::new spawns inherit the seed: every later choice follows from it.
        let raft = match options.seed {
            Some(seed) => crate::runtime::seeded(seed, created).await,
            None => created.await,
        }
        .map_err(raft_error)?;
        // Ids only need to be unique (copies compare equal): a random base, so a restarted
        // member never reuses an id a leader still remembers.
        let base = u64::from_le_bytes(forge_crypto::random_array().map_err(|error| {
            ConsensusError::Raft {
                detail: format!("no randomness for write ids: {error}"),
            }
        })?);
        let handle = Self {
            group,
            raft,
            state,
            net,
            options,
            next_write_id: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            write_id_base: base,
            forwarded: Arc::default(),
        };
        table.insert(group, handle.clone());
        Ok(handle)
    }

    /// The group's id.
    #[must_use]
    pub fn id(&self) -> GroupId {
        self.group
    }

    /// Forms the group with `members` as its voters (once, on one node; the others learn
    /// of it from the leader).
    ///
    /// # Errors
    /// Two members whose Raft ids collide; the group was formed already.
    pub async fn initialize(&self, members: &[NodeId]) -> Result<(), ConsensusError> {
        let mut nodes = BTreeMap::new();
        for member in members {
            if let Some(existing) = nodes.insert(raft_id(member), Member::of(member))
                && existing.node_id() != *member
            {
                return Err(ConsensusError::IdCollision {
                    node: member.to_hex(),
                    other: existing.node_id().to_hex(),
                });
            }
        }
        self.raft.initialize(nodes).await.map_err(raft_error)
    }

    /// Applies `updates` through the group's log: all of them, or (a condition failed)
    /// none, naming the first record that did not hold. Forwarded to the leader.
    ///
    /// # Errors
    /// [`ConsensusError::Conflict`]; no leader reachable; the outcome unknown (a leader
    /// change while it was in flight: [`ConsensusError::Unknown`]).
    pub async fn apply(&self, updates: &[RecordUpdate]) -> Result<(), ConsensusError> {
        let command = Command::Apply(updates.iter().map(Update::from).collect());
        match self.write(command).await? {
            Outcome::Conflict { space, key } => Err(ConsensusError::Conflict { space, key }),
            Outcome::Applied | Outcome::None => Ok(()),
        }
    }

    /// Appends `command`, here if this node leads, else at the leader.
    async fn write(&self, command: Command) -> Result<Outcome, ConsensusError> {
        match self.raft.client_write(command.clone()).await {
            Ok(ClientWriteResponse { data, .. }) => Ok(data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                let leader = forward
                    .leader_node
                    .map(|member| member.node_id())
                    .ok_or(ConsensusError::NoLeader { group: self.group })?;
                let id = ((u128::from(self.write_id_base) << 64)
                    | u128::from(
                        self.next_write_id
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    ))
                .to_le_bytes();
                match self
                    .forward(leader, &RaftRequest::Write { id, command })
                    .await?
                {
                    RaftReply::Written(outcome) => Ok(outcome),
                    RaftReply::NotLeader(_) => Err(ConsensusError::NoLeader { group: self.group }),
                    other => Err(ConsensusError::Raft {
                        detail: format!("the leader answered a write with {other:?}"),
                    }),
                }
            }
            Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_))) => {
                Err(ConsensusError::Unknown { group: self.group })
            }
            Err(error) => Err(raft_error(error)),
        }
    }

    /// One record, linearizably (read index: the leader confirms with a quorum that it
    /// still leads, then waits until it has applied that far, so no write acknowledged
    /// before the read began is missed; a lease would save the round trip but trusts
    /// clocks, and edge nodes' clocks are not ours to trust). Forwarded to the leader.
    ///
    /// # Errors
    /// No leader reachable; engine failures.
    pub async fn read_record(
        &self,
        space: &str,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, ConsensusError> {
        match self.leader_for_read().await? {
            None => self.state.record(space, key).map_err(ConsensusError::from),
            Some(leader) => {
                let request = RaftRequest::Read {
                    space: space.to_owned(),
                    key: key.to_vec(),
                };
                match self.forward(leader, &request).await? {
                    RaftReply::Value(value) => Ok(value),
                    _ => Err(ConsensusError::NoLeader { group: self.group }),
                }
            }
        }
    }

    /// Confirms a read index here when this node leads (None: its state machine has
    /// applied through it), else names the leader to ask.
    async fn leader_for_read(&self) -> Result<Option<NodeId>, ConsensusError> {
        match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(_) => Ok(None),
            Err(error) => {
                let Some(forward) = error.forward_to_leader() else {
                    return Err(raft_error(error));
                };
                forward
                    .leader_node
                    .clone()
                    .map(|member| Some(member.node_id()))
                    .ok_or(ConsensusError::NoLeader { group: self.group })
            }
        }
    }

    /// Waits until this node has applied every write acknowledged before the call (a
    /// read-index barrier: confirmed by the leader with a quorum, asked of it when this
    /// node follows). After it, [`GroupHandle::local_records`] reads are as fresh as
    /// linearizable ones.
    ///
    /// # Errors
    /// No leader reachable; not applied within `deadline`.
    pub async fn barrier(&self, deadline: Duration) -> Result<(), ConsensusError> {
        let Some(leader) = self.leader_for_read().await? else {
            return Ok(());
        };
        match self.forward(leader, &RaftRequest::ReadIndex).await? {
            RaftReply::Index(index) => self.wait_applied(index, deadline).await,
            _ => Err(ConsensusError::NoLeader { group: self.group }),
        }
    }

    /// Every record of `space` starting with `prefix` as applied on this node (may lag
    /// the leader: for listings, not for compare-and-swap decisions).
    ///
    /// # Errors
    /// Engine failures.
    pub fn local_records(
        &self,
        space: &str,
        prefix: &[u8],
    ) -> Result<forge_store::metadata::Records, ConsensusError> {
        Ok(self.state.records(space, prefix)?)
    }

    /// This replica's applied log index and every record it holds, read at one point in
    /// time: two replicas at the same applied index must hold the same records (the
    /// simulator checks it while faults run).
    ///
    /// # Errors
    /// Engine failures.
    pub fn replica_state(&self) -> Result<crate::state_machine::ReplicaState, ConsensusError> {
        Ok(self.state.applied_view()?)
    }

    /// Answers forwarded write `id`: the first delivery writes, a copy waits for and
    /// returns the first's answer.
    async fn write_once(&self, id: [u8; 16], command: Command) -> WriteAnswer {
        let first = {
            let mut forwarded = self
                .forwarded
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(answer) = forwarded.answers.get(&id) {
                Err(answer.clone())
            } else {
                let (sender, receiver) = tokio::sync::watch::channel(None);
                forwarded.answers.insert(id, receiver);
                forwarded.order.push_back(id);
                while forwarded.order.len() > FORWARDED_WRITES_KEPT {
                    if let Some(oldest) = forwarded.order.pop_front() {
                        forwarded.answers.remove(&oldest);
                    }
                }
                Ok(sender)
            }
        };
        match first {
            Ok(sender) => {
                let answer = match self.raft.client_write(command).await {
                    Ok(response) => WriteAnswer::Written(response.data),
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                        WriteAnswer::NotLeader(forward.leader_node)
                    }
                    Err(error) => WriteAnswer::Failed(error.to_string()),
                };
                let _ = sender.send(Some(answer.clone()));
                answer
            }
            Err(mut copy) => match copy.wait_for(Option::is_some).await {
                Ok(answer) => answer.clone().unwrap_or_else(|| {
                    WriteAnswer::Failed("a forwarded write's answer went missing".into())
                }),
                // The first delivery's task ended without answering: its outcome is
                // unknown here too.
                Err(_) => WriteAnswer::Failed(
                    "the first delivery of this forwarded write did not finish".into(),
                ),
            },
        }
    }

    async fn forward(
        &self,
        leader: NodeId,
        request: &RaftRequest,
    ) -> Result<RaftReply, ConsensusError> {
        ask(
            &*self.net,
            leader,
            self.group,
            request,
            self.options.forward_deadline,
        )
        .await
        .map_err(ConsensusError::from)
    }

    /// Answers a request from another member (the server's dispatch).
    pub(crate) async fn answer(&self, request: RaftRequest) -> Result<RaftReply, ConsensusError> {
        Ok(match request {
            RaftRequest::Append(rpc) => {
                RaftReply::Appended(self.raft.append_entries(rpc).await.map_err(raft_error)?)
            }
            RaftRequest::Vote(rpc) => {
                RaftReply::Voted(self.raft.vote(rpc).await.map_err(raft_error)?)
            }
            RaftRequest::PreVote(rpc) => {
                RaftReply::Voted(self.raft.pre_vote(rpc).await.map_err(raft_error)?)
            }
            RaftRequest::Snapshot { vote, meta, data } => {
                let snapshot = openraft::type_config::alias::SnapshotOf::<
                    TypeConfig,
                    std::io::Cursor<Vec<u8>>,
                > {
                    meta,
                    snapshot: std::io::Cursor::new(data),
                };
                RaftReply::Installed(
                    self.raft
                        .install_full_snapshot(vote, snapshot)
                        .await
                        .map_err(raft_error)?,
                )
            }
            RaftRequest::Write { id, command } => {
                return match self.write_once(id, command).await {
                    WriteAnswer::Written(outcome) => Ok(RaftReply::Written(outcome)),
                    WriteAnswer::NotLeader(leader) => Ok(RaftReply::NotLeader(leader)),
                    WriteAnswer::Failed(detail) => Err(ConsensusError::Raft { detail }),
                };
            }
            request @ (RaftRequest::AddMember(_) | RaftRequest::RemoveMember(_)) => {
                return self.change_here(request).await;
            }
            // Batches are taken apart by the server before they reach a group.
            RaftRequest::Batch(_) => {
                return Err(ConsensusError::Raft {
                    detail: "a batch inside a batch".into(),
                });
            }
            RaftRequest::ReadIndex => {
                match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
                    Ok(read) => RaftReply::Index(read.log_id().index),
                    Err(error) => match error.forward_to_leader() {
                        Some(forward) => RaftReply::NotLeader(forward.leader_node.clone()),
                        None => return Err(raft_error(error)),
                    },
                }
            }
            RaftRequest::Read { space, key } => {
                match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
                    Ok(_) => RaftReply::Value(self.state.record(&space, &key)?),
                    Err(error) => match error.forward_to_leader() {
                        Some(forward) => RaftReply::NotLeader(forward.leader_node.clone()),
                        None => return Err(raft_error(error)),
                    },
                }
            }
        })
    }

    /// Adds `node` as a voter: first as a learner that catches up (by log or snapshot),
    /// then through joint consensus. Forwarded to the leader.
    ///
    /// # Errors
    /// No leader; its Raft id collides with a member's; the change failed.
    pub async fn add_member(&self, node: &NodeId) -> Result<(), ConsensusError> {
        self.change(RaftRequest::AddMember(Member::of(node))).await
    }

    /// Removes `node` from the voters and the group. Forwarded to the leader.
    ///
    /// # Errors
    /// No leader; the change failed.
    pub async fn remove_member(&self, node: &NodeId) -> Result<(), ConsensusError> {
        self.change(RaftRequest::RemoveMember(Member::of(node)))
            .await
    }

    /// A membership change, here if this node leads, else at the leader; followed to
    /// the leader a refusal names, and retried for a few seconds while none is known (a
    /// group in the middle of an election).
    async fn change(&self, request: RaftRequest) -> Result<(), ConsensusError> {
        let me = self.net.local_id();
        let mut target = self.status().leader;
        for _ in 0..50 {
            let reply = match target {
                Some(leader) if leader != me => self.forward(leader, &request).await,
                _ => self.answer(request.clone()).await,
            };
            match reply {
                Ok(RaftReply::Changed) => return Ok(()),
                Ok(RaftReply::NotLeader(Some(leader))) => target = Some(leader.node_id()),
                Ok(RaftReply::NotLeader(None))
                | Err(ConsensusError::Network(
                    MeshError::Unreachable { .. }
                    | MeshError::Timeout { .. }
                    | MeshError::ConnectionLost { .. }
                    | MeshError::Busy { .. },
                )) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    target = self.status().leader;
                }
                Ok(other) => {
                    return Err(ConsensusError::Raft {
                        detail: format!("a membership change was answered with {other:?}"),
                    });
                }
                Err(error) => return Err(error),
            }
        }
        Err(ConsensusError::NoLeader { group: self.group })
    }

    /// Applies a membership change on this node, which must lead.
    async fn change_here(&self, request: RaftRequest) -> Result<RaftReply, ConsensusError> {
        let not_leader = |error: &RaftError<TypeConfig, ClientWriteError<TypeConfig>>| {
            error
                .forward_to_leader()
                .map(|forward| RaftReply::NotLeader(forward.leader_node.clone()))
        };
        match request {
            RaftRequest::AddMember(member) => {
                let node = member.node_id();
                let id = raft_id(&node);
                let metrics = self.raft.metrics().borrow_watched().clone();
                if let Some(existing) = metrics
                    .membership_config
                    .nodes()
                    .find(|(member_id, _)| **member_id == id)
                    .map(|(_, member)| member.node_id())
                    && existing != node
                {
                    return Err(ConsensusError::IdCollision {
                        node: node.to_hex(),
                        other: existing.to_hex(),
                    });
                }
                if let Err(error) = self.raft.add_learner(id, member, true).await {
                    return not_leader(&error).ok_or_else(|| raft_error(error));
                }
                if let Err(error) = self
                    .raft
                    .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
                    .await
                {
                    return not_leader(&error).ok_or_else(|| raft_error(error));
                }
            }
            RaftRequest::RemoveMember(member) => {
                let id = raft_id(&member.node_id());
                if let Err(error) = self
                    .raft
                    .change_membership(ChangeMembers::RemoveVoters([id].into()), false)
                    .await
                {
                    return not_leader(&error).ok_or_else(|| raft_error(error));
                }
            }
            other => {
                return Err(ConsensusError::Raft {
                    detail: format!("not a membership change: {other:?}"),
                });
            }
        }
        Ok(RaftReply::Changed)
    }

    /// The group as this node sees it.
    #[must_use]
    pub fn status(&self) -> GroupStatus {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership();
        let node_of = |id: &u64| membership.get_node(id).map(Member::node_id);
        let voters = membership
            .voter_ids()
            .filter_map(|id| node_of(&id))
            .collect();
        let last = metrics.last_log_index.unwrap_or(0);
        let lag = metrics
            .replication
            .iter()
            .flatten()
            .filter_map(|(id, matched)| {
                let matched = matched.as_ref().map_or(0, |log_id| log_id.index + 1);
                node_of(id).map(|node| (node, (last + 1).saturating_sub(matched)))
            })
            .collect();
        GroupStatus {
            group: self.group,
            leading: metrics.state == ServerState::Leader,
            leader: metrics.current_leader.and_then(|id| node_of(&id)),
            term: metrics.current_term,
            committed: metrics.local_committed.map(|log_id| log_id.index),
            applied: metrics.last_applied.map(|log_id| log_id.index),
            snapshot: metrics.snapshot.map(|log_id| log_id.index),
            purged: metrics.purged.map(|log_id| log_id.index),
            voters,
            lag,
        }
    }

    /// Waits until this node has applied up to `index` (or `deadline` passes).
    ///
    /// # Errors
    /// The deadline passed.
    pub async fn wait_applied(&self, index: u64, deadline: Duration) -> Result<(), ConsensusError> {
        self.raft
            .wait(Some(deadline))
            .applied_index_at_least(Some(index), "wait_applied")
            .await
            .map(|_| ())
            .map_err(raft_error)
    }

    /// Stops the group on this node (its state stays in the engine).
    ///
    /// # Errors
    /// The Raft task panicked.
    pub async fn shutdown(&self) -> Result<(), ConsensusError> {
        self.raft.shutdown().await.map_err(raft_error)
    }
}
