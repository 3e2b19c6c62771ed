//! Raft's messages over `PeerNet` (`/forge/raft/2`): every group of a node shares the
//! node's one network, each message naming its group. A follower forwards a client's
//! write or linearizable read to the leader over the same protocol.
//!
//! Wire: a request is [`crate::keys::encode`] of (group, [`RaftRequest`]), a response of
//! [`RaftReply`]: a format byte, then postcard; anything else is refused.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forge_crypto::NodeId;
use forge_mesh::net::{Inbound, MeshError, PeerNet, Protocol};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use serde::{Deserialize, Serialize};

use crate::keys::{decode, encode};
use crate::types::{Command, GroupId, Member, Outcome, TypeConfig};

/// The Raft protocol. Appends carry up to `max_payload_entries` entries; snapshots of a
/// group's metadata go whole.
pub const RAFT_PROTOCOL: Protocol = Protocol {
    name: "/forge/raft/2",
    max_request_bytes: 64 << 20,
    max_response_bytes: 64 << 20,
    inbound_queue: 1024,
};

/// A message to one group on a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RaftRequest {
    /// Replication (and heartbeats).
    Append(AppendEntriesRequest<TypeConfig>),
    /// An election.
    Vote(VoteRequest<TypeConfig>),
    /// Would the node vote (pre-vote: a node back from a partition asks before it bumps
    /// its term, so it does not depose a healthy leader).
    PreVote(VoteRequest<TypeConfig>),
    /// A whole state-machine snapshot.
    Snapshot {
        /// The sender's vote.
        vote: VoteOf<TypeConfig>,
        /// What it covers.
        meta: SnapshotMetaOf<TypeConfig>,
        /// The encoded state.
        #[serde(with = "forge_store::byte_fields")]
        data: Vec<u8>,
    },
    /// A client's write, forwarded to the leader. `id` (random per forwarding member,
    /// then counted) makes a copy of the request (a duplicating network, a retry) get the
    /// first delivery's answer instead of being applied again.
    Write {
        /// Unique per forwarded write (fixed-size on the wire: its value never changes a
        /// message's length, which the simulator's trace records).
        id: [u8; 16],
        /// The write.
        command: Command,
    },
    /// Adds a voter (learner first, then joint consensus), forwarded to the leader.
    AddMember(Member),
    /// Removes a voter, forwarded to the leader.
    RemoveMember(Member),
    /// A linearizable read of one record, forwarded to the leader.
    Read {
        /// The record's space.
        space: String,
        /// Its key.
        #[serde(with = "forge_store::byte_fields")]
        key: Vec<u8>,
    },
    /// The leader's read index (confirmed with a quorum): a follower that has applied
    /// that far has seen every write acknowledged before it asked.
    ReadIndex,
    /// Heartbeats of several groups to one node in one message (sent under the reserved
    /// group id `u64::MAX`): with many idle groups, one request per peer per window
    /// instead of one per group.
    Batch(Vec<(GroupId, RaftRequest)>),
}

/// One answer of a [`RaftRequest::Batch`].
#[derive(Debug, Serialize, Deserialize)]
pub enum BatchAnswer {
    /// The group answered.
    Reply(RaftReply),
    /// It failed (or does not run on the node).
    Failed(String),
}

/// The group id a batch travels under (never a real group's: `GroupHandle::start`
/// refuses it).
pub const BATCH_GROUP: GroupId = u64::MAX;

/// How long a heartbeat waits for others to the same node to share its message.
pub const HEARTBEAT_WINDOW: Duration = Duration::from_millis(20);

/// A group's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    /// To an append.
    Appended(AppendEntriesResponse<TypeConfig>),
    /// To a vote or pre-vote.
    Voted(VoteResponse<TypeConfig>),
    /// To a snapshot.
    Installed(SnapshotResponse<TypeConfig>),
    /// To a write: how it applied.
    Written(Outcome),
    /// To a read.
    Value(Option<Vec<u8>>),
    /// To a read-index request: the log index to have applied.
    Index(u64),
    /// To a batch: one answer per request, in order.
    Batch(Vec<BatchAnswer>),
    /// To a membership change: done.
    Changed,
    /// This node does not lead the group (the leader it knows of, if any).
    NotLeader(Option<Member>),
}

/// The groups a node runs, by id: what the server dispatches to.
#[derive(Debug, Default, Clone)]
pub struct GroupTable {
    groups: Arc<Mutex<BTreeMap<GroupId, crate::group::GroupHandle>>>,
    /// The node's heartbeat batcher (every group's links share it), made on first use.
    batcher: Arc<Mutex<Option<Arc<HeartbeatBatcher>>>>,
}

impl GroupTable {
    /// An empty table.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The node's heartbeat batcher over `net`.
    pub(crate) fn batcher(&self, net: &Arc<dyn PeerNet>) -> Arc<HeartbeatBatcher> {
        self.batcher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert_with(|| {
                Arc::new(HeartbeatBatcher {
                    net: net.clone(),
                    queues: Mutex::new(BTreeMap::new()),
                })
            })
            .clone()
    }

    pub(crate) fn insert(&self, group: GroupId, handle: crate::group::GroupHandle) {
        self.lock().insert(group, handle);
    }

    /// The group `group`, if this node runs it.
    #[must_use]
    pub fn get(&self, group: GroupId) -> Option<crate::group::GroupHandle> {
        self.lock().get(&group).cloned()
    }

    /// Removes and returns group `group` (to shut it down: this node left it).
    #[must_use]
    pub fn remove(&self, group: GroupId) -> Option<crate::group::GroupHandle> {
        self.lock().remove(&group)
    }

    /// Removes and returns every group (to shut them down).
    #[must_use]
    pub fn drain(&self) -> Vec<crate::group::GroupHandle> {
        std::mem::take(&mut *self.lock()).into_values().collect()
    }

    /// The ids of the groups this node runs.
    #[must_use]
    pub fn ids(&self) -> Vec<GroupId> {
        self.lock().keys().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<GroupId, crate::group::GroupHandle>> {
        self.groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Decodes a request as [`serve_raft`] receives it: its group and message.
///
/// # Errors
/// Another format, or bytes that do not decode.
pub fn decode_request(bytes: &[u8]) -> std::io::Result<(GroupId, RaftRequest)> {
    decode(bytes, "a Raft request")
}

/// Decodes a reply as a requester receives it.
///
/// # Errors
/// Another format, or bytes that do not decode.
pub fn decode_reply(bytes: &[u8]) -> std::io::Result<RaftReply> {
    decode(bytes, "a Raft reply")
}

/// Answers Raft requests from nodes `allowed` accepts, dispatching each to its group, until
/// the network stops serving.
pub async fn serve_raft(
    mut inbound: Inbound,
    groups: GroupTable,
    allowed: impl Fn(&NodeId) -> Result<(), String> + Send + Sync + 'static,
) {
    while let Some(request) = inbound.next().await {
        if let Err(reason) = allowed(&request.from) {
            request.refuse(reason);
            continue;
        }
        let groups = groups.clone();
        tokio::spawn(async move {
            let (group, message) = match decode_request(&request.body) {
                Ok(decoded) => decoded,
                Err(error) => return request.fail(error.to_string()),
            };
            // A batch of heartbeats: each to its group, answered together.
            let items = match (group, message) {
                (BATCH_GROUP, RaftRequest::Batch(items)) => items,
                (_, message) => {
                    let Some(handle) = groups.get(group) else {
                        return request.fail(format!("group {group} does not run on this node"));
                    };
                    return match handle.answer(message).await {
                        Ok(reply) => match encode(&reply) {
                            Ok(bytes) => request.respond(bytes),
                            Err(error) => request.fail(error.to_string()),
                        },
                        Err(error) => request.fail(error.to_string()),
                    };
                }
            };
            let answers = futures_util::future::join_all(items.into_iter().map(|(group, item)| {
                let groups = groups.clone();
                async move {
                    match groups.get(group) {
                        Some(handle) => match handle.answer(item).await {
                            Ok(reply) => BatchAnswer::Reply(reply),
                            Err(error) => BatchAnswer::Failed(error.to_string()),
                        },
                        None => {
                            BatchAnswer::Failed(format!("group {group} does not run on this node"))
                        }
                    }
                }
            }))
            .await;
            match encode(&RaftReply::Batch(answers)) {
                Ok(bytes) => request.respond(bytes),
                Err(error) => request.fail(error.to_string()),
            }
        });
    }
}

/// Sends `message` to `group` on `target`; its reply.
pub(crate) async fn ask(
    net: &dyn PeerNet,
    target: NodeId,
    group: GroupId,
    message: &RaftRequest,
    deadline: Duration,
) -> Result<RaftReply, MeshError> {
    let body = encode(&(group, message)).map_err(|error| MeshError::Local {
        what: error.to_string(),
    })?;
    let answer = net.request(target, RAFT_PROTOCOL, body, deadline).await?;
    decode_reply(&answer).map_err(|error| MeshError::Remote {
        peer: target,
        protocol: RAFT_PROTOCOL.name,
        message: error.to_string(),
    })
}

fn rpc_error(error: &MeshError) -> RPCError<TypeConfig> {
    match error {
        MeshError::Remote { .. } | MeshError::Refused { .. } | MeshError::TooLarge { .. } => {
            RPCError::Network(NetworkError::new(error))
        }
        _ => RPCError::Unreachable(Unreachable::new(error)),
    }
}

fn unexpected(reply: &RaftReply) -> RPCError<TypeConfig> {
    let error = MeshError::Local {
        what: format!("an unexpected Raft reply: {reply:?}"),
    };
    RPCError::Network(NetworkError::new(&error))
}

/// Heartbeats waiting to share one message to their node.
struct Queued {
    group: GroupId,
    request: RaftRequest,
    deadline: Duration,
    reply: tokio::sync::oneshot::Sender<Result<RaftReply, MeshError>>,
}

/// Coalesces the heartbeats of all of a node's groups to one peer: the first heartbeat
/// to a peer opens a window of [`HEARTBEAT_WINDOW`]; whatever heartbeats to that peer
/// queue up meanwhile go as one [`RaftRequest::Batch`]. Entries (writes) never wait: they
/// go at once, alone.
pub(crate) struct HeartbeatBatcher {
    net: Arc<dyn PeerNet>,
    queues: Mutex<BTreeMap<NodeId, Vec<Queued>>>,
}

impl std::fmt::Debug for HeartbeatBatcher {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("HeartbeatBatcher")
            .finish_non_exhaustive()
    }
}

impl HeartbeatBatcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Vec<Queued>>> {
        self.queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn send(
        self: &Arc<Self>,
        target: NodeId,
        group: GroupId,
        request: RaftRequest,
        deadline: Duration,
    ) -> Result<RaftReply, MeshError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let opens_window = {
            let mut queues = self.lock();
            let queue = queues.entry(target).or_default();
            queue.push(Queued {
                group,
                request,
                deadline,
                reply,
            });
            queue.len() == 1
        };
        if opens_window {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(HEARTBEAT_WINDOW).await;
                this.flush(target).await;
            });
        }
        answer.await.unwrap_or_else(|_| {
            Err(MeshError::Local {
                what: "a batched heartbeat was dropped".into(),
            })
        })
    }

    async fn flush(&self, target: NodeId) {
        let queued = self.lock().remove(&target).unwrap_or_default();
        if queued.len() == 1 {
            for Queued {
                group,
                request,
                deadline,
                reply,
            } in queued
            {
                let _ = reply.send(ask(&*self.net, target, group, &request, deadline).await);
            }
            return;
        }
        let deadline = queued
            .iter()
            .map(|queued| queued.deadline)
            .min()
            .unwrap_or(Duration::from_secs(1));
        let (items, replies): (Vec<_>, Vec<_>) = queued
            .into_iter()
            .map(|queued| ((queued.group, queued.request), queued.reply))
            .unzip();
        match ask(
            &*self.net,
            target,
            BATCH_GROUP,
            &RaftRequest::Batch(items),
            deadline,
        )
        .await
        {
            Ok(RaftReply::Batch(answers)) if answers.len() == replies.len() => {
                for (answer, reply) in answers.into_iter().zip(replies) {
                    let _ = reply.send(match answer {
                        BatchAnswer::Reply(reply) => Ok(reply),
                        BatchAnswer::Failed(message) => Err(MeshError::Remote {
                            peer: target,
                            protocol: RAFT_PROTOCOL.name,
                            message,
                        }),
                    });
                }
            }
            Ok(other) => {
                for reply in replies {
                    let _ = reply.send(Err(MeshError::Remote {
                        peer: target,
                        protocol: RAFT_PROTOCOL.name,
                        message: format!("answered a batch with {other:?}"),
                    }));
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Makes one [`RaftLink`] per target for a group.
#[derive(Clone)]
pub struct LinkFactory {
    net: Arc<dyn PeerNet>,
    group: GroupId,
    batcher: Option<Arc<HeartbeatBatcher>>,
}

impl std::fmt::Debug for LinkFactory {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LinkFactory")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl LinkFactory {
    /// Links of `group` over `net`.
    #[must_use]
    pub fn new(net: Arc<dyn PeerNet>, group: GroupId) -> Self {
        Self {
            net,
            group,
            batcher: None,
        }
    }

    /// Links whose heartbeats share `table`'s batcher with the node's other groups.
    pub(crate) fn batched(net: Arc<dyn PeerNet>, group: GroupId, table: &GroupTable) -> Self {
        Self {
            batcher: Some(table.batcher(&net)),
            net,
            group,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for LinkFactory {
    type Network = RaftLink;

    async fn new_client(&mut self, _target: u64, node: &Member) -> Self::Network {
        RaftLink {
            net: self.net.clone(),
            group: self.group,
            target: node.node_id(),
            batcher: self.batcher.clone(),
        }
    }
}

/// One group's link to one member.
pub struct RaftLink {
    net: Arc<dyn PeerNet>,
    group: GroupId,
    target: NodeId,
    batcher: Option<Arc<HeartbeatBatcher>>,
}

impl std::fmt::Debug for RaftLink {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RaftLink")
            .field("group", &self.group)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl RaftLink {
    async fn send(
        &self,
        message: &RaftRequest,
        option: &RPCOption,
    ) -> Result<RaftReply, RPCError<TypeConfig>> {
        ask(
            &*self.net,
            self.target,
            self.group,
            message,
            option.hard_ttl(),
        )
        .await
        .map_err(|error| rpc_error(&error))
    }
}

impl RaftNetworkV2<TypeConfig> for RaftLink {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        if rpc.entries.is_empty()
            && let Some(batcher) = &self.batcher
        {
            // A heartbeat (or an empty probe): it may wait a moment for company.
            let reply = batcher
                .send(
                    self.target,
                    self.group,
                    RaftRequest::Append(rpc),
                    option.hard_ttl(),
                )
                .await
                .map_err(|error| rpc_error(&error))?;
            return match reply {
                RaftReply::Appended(response) => Ok(response),
                other => Err(unexpected(&other)),
            };
        }
        match self.send(&RaftRequest::Append(rpc), &option).await? {
            RaftReply::Appended(response) => Ok(response),
            other => Err(unexpected(&other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.send(&RaftRequest::Vote(rpc), &option).await? {
            RaftReply::Voted(response) => Ok(response),
            other => Err(unexpected(&other)),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.send(&RaftRequest::PreVote(rpc), &option).await? {
            RaftReply::Voted(response) => Ok(response),
            other => Err(unexpected(&other)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, Cursor<Vec<u8>>>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let message = RaftRequest::Snapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot.into_inner(),
        };
        let sent = self.send(&message, &option);
        tokio::select! {
            biased;
            closed = cancel => Err(StreamingError::Closed(closed)),
            reply = sent => match reply {
                Ok(RaftReply::Installed(response)) => Ok(response),
                Ok(other) => Err(StreamingError::Network(NetworkError::new(&MeshError::Local {
                    what: format!("an unexpected Raft reply: {other:?}"),
                }))),
                Err(RPCError::Unreachable(error)) => Err(StreamingError::Unreachable(error)),
                Err(RPCError::Network(error)) => Err(StreamingError::Network(error)),
                Err(other) => Err(StreamingError::Network(NetworkError::new(&other))),
            },
        }
    }
}
