//! `PeerNet`: the one door to other nodes. Request/response per protocol, with a deadline
//! per call, size caps per protocol, and a bounded inbound queue per protocol (a full queue
//! answers "busy" instead of growing). Raft, shard transfer and sync all ride it; the
//! production implementation is libp2p over QUIC, the test one [`crate::memory`].
//!
//! Peers are named by [`NodeId`]: an implementation hands a request to the application only
//! from a connection whose Hello verified ([`crate::hello`]), so `from` is never taken on
//! trust.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use forge_crypto::NodeId;
use tokio::sync::{mpsc, oneshot};

/// A boxed future, so [`PeerNet`] stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A protocol's name and limits. Both sides must agree on the name; the limits are each
/// side's own (a receiver refuses a request over its cap without reading it into memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Protocol {
    /// Versioned name, e.g. `/forge/sync/1`.
    pub name: &'static str,
    /// Largest request body accepted or sent.
    pub max_request_bytes: usize,
    /// Largest response body accepted or sent.
    pub max_response_bytes: usize,
    /// Inbound requests waiting for the application before new ones are answered "busy".
    pub inbound_queue: usize,
}

/// What went wrong with a request, in terms a caller can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// No connection to the peer could be made (unknown address, down, partitioned): the
    /// request was not delivered.
    #[error("peer {peer} is unreachable: {reason}")]
    Unreachable {
        /// The peer.
        peer: NodeId,
        /// Why, as the transport said it.
        reason: String,
    },
    /// No answer before the deadline: the peer may or may not have acted on the request.
    #[error(
        "no answer from peer {peer} on {protocol} within {after:?}: the request may or may \
         not have been carried out; retry only if it is idempotent"
    )]
    Timeout {
        /// The peer.
        peer: NodeId,
        /// The protocol.
        protocol: &'static str,
        /// The deadline that passed.
        after: Duration,
    },
    /// The connection broke after the request was sent (the peer restarted, a link died
    /// unnoticed until now): the peer may or may not have acted on it.
    #[error(
        "the connection to peer {peer} broke during {protocol} ({reason}): the request may \
         or may not have been carried out; retry only if it is idempotent"
    )]
    ConnectionLost {
        /// The peer.
        peer: NodeId,
        /// The protocol.
        protocol: &'static str,
        /// What the transport said.
        reason: String,
    },
    /// The peer does not serve the protocol, or refused this node (not trusted, no Hello).
    #[error("peer {peer} refused {protocol}: {reason}")]
    Refused {
        /// The peer.
        peer: NodeId,
        /// The protocol.
        protocol: &'static str,
        /// The rule that refused it.
        reason: String,
    },
    /// The peer's inbound queue for the protocol is full: nothing was done; retry later.
    #[error("peer {peer} is busy on {protocol} (its queue of requests is full); retry later")]
    Busy {
        /// The peer.
        peer: NodeId,
        /// The protocol.
        protocol: &'static str,
    },
    /// A request or response over the protocol's size cap.
    #[error("{what} of {bytes} bytes exceeds {protocol}'s limit of {limit} bytes")]
    TooLarge {
        /// The protocol.
        protocol: &'static str,
        /// "request" or "response".
        what: &'static str,
        /// Its size.
        bytes: usize,
        /// The cap.
        limit: usize,
    },
    /// The peer handled the request and failed it.
    #[error("peer {peer} failed the {protocol} request: {message}")]
    Remote {
        /// The peer.
        peer: NodeId,
        /// The protocol.
        protocol: &'static str,
        /// Its one-line error.
        message: String,
    },
    /// The Hello exchange failed: the peer is not who it claims, or its Hello is garbage.
    #[error("the peer's hello is refused: {reason}")]
    Handshake {
        /// What failed.
        reason: String,
    },
    /// An announcement of a head that does not verify (garbage, another author's keys).
    #[error("invalid announcement: {reason}")]
    InvalidAnnouncement {
        /// The first thing found wrong.
        reason: String,
    },
    /// A transfer proof or receipt that does not verify.
    #[error("invalid transfer proof: {reason}")]
    InvalidProof {
        /// The first thing found wrong.
        reason: String,
    },
    /// This node already serves the protocol, or serves nothing any more.
    #[error("{what}")]
    Local {
        /// What is wrong.
        what: String,
    },
}

/// How often [`request_idempotent`] sends a request whose connection broke.
pub const IDEMPOTENT_ATTEMPTS: u32 = 3;

/// Sends a request that is safe to repeat (a read, an offer that only opens a session)
/// and sends it again when the connection it went out on turned out to be dead, or none
/// could be made: a peer that restarted leaves this node a connection (sometimes two, one
/// dialed from each side) that fails only when used or when its idle timeout passes, and
/// the next attempt dials afresh. A deadline that passed is not repeated: the peer may be
/// working on it.
///
/// # Errors
/// The last attempt's error.
pub async fn request_idempotent(
    net: &dyn PeerNet,
    peer: NodeId,
    protocol: Protocol,
    body: Vec<u8>,
    deadline: Duration,
) -> Result<Vec<u8>, MeshError> {
    let mut attempt = 1;
    loop {
        match net.request(peer, protocol, body.clone(), deadline).await {
            Err(MeshError::ConnectionLost { .. } | MeshError::Unreachable { .. })
                if attempt < IDEMPOTENT_ATTEMPTS =>
            {
                attempt += 1;
                // Lets the transport see the other dead connections close before the redial.
                tokio::time::sleep(Duration::from_millis(100) * attempt).await;
            }
            other => return other,
        }
    }
}

/// How a request ended at the peer that received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The response body.
    Ok(Vec<u8>),
    /// Handled and failed: a one-line message for the requester.
    Failed(String),
    /// Not handled: the requester is not allowed (names the rule).
    Refused(String),
}

/// A request delivered to this node, to answer with [`InboundRequest::respond`] (or
/// [`InboundRequest::fail`], [`InboundRequest::refuse`]). Dropping it unanswered gives the
/// requester an unknown outcome: over QUIC the stream closes ([`MeshError::ConnectionLost`]
/// at once); the in-process network models a crashed peer ([`MeshError::Timeout`]).
#[derive(Debug)]
pub struct InboundRequest {
    /// The verified sender.
    pub from: NodeId,
    /// The request body (within the protocol's cap).
    pub body: Vec<u8>,
    reply: oneshot::Sender<Answer>,
}

impl InboundRequest {
    /// A request from `from` whose answer goes to `reply` (for implementations).
    #[must_use]
    pub fn new(from: NodeId, body: Vec<u8>, reply: oneshot::Sender<Answer>) -> Self {
        Self { from, body, reply }
    }

    /// Answers with a response body.
    pub fn respond(self, body: Vec<u8>) {
        let _ = self.reply.send(Answer::Ok(body));
    }

    /// Answers that handling it failed.
    pub fn fail(self, message: impl Into<String>) {
        let _ = self.reply.send(Answer::Failed(message.into()));
    }

    /// Answers that the sender is not allowed, naming the rule.
    pub fn refuse(self, reason: impl Into<String>) {
        let _ = self.reply.send(Answer::Refused(reason.into()));
    }
}

/// The inbound requests of one protocol, in arrival order.
#[derive(Debug)]
pub struct Inbound {
    receiver: mpsc::Receiver<InboundRequest>,
}

impl Inbound {
    /// A queue fed by `receiver` (for implementations).
    #[must_use]
    pub fn new(receiver: mpsc::Receiver<InboundRequest>) -> Self {
        Self { receiver }
    }

    /// The next request; `None` once the node stopped serving.
    pub async fn next(&mut self) -> Option<InboundRequest> {
        self.receiver.recv().await
    }
}

/// A message published on a topic, as a subscriber receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gossip {
    /// The node it came from (the verified node that forwarded it; a gossip message is
    /// not authenticated by the transport beyond that: its content must be).
    pub from: NodeId,
    /// The message.
    pub message: Vec<u8>,
}

/// The messages of one topic this node subscribed to.
#[derive(Debug)]
pub struct Subscription {
    receiver: mpsc::Receiver<Gossip>,
}

impl Subscription {
    /// A subscription fed by `receiver` (for implementations).
    #[must_use]
    pub fn new(receiver: mpsc::Receiver<Gossip>) -> Self {
        Self { receiver }
    }

    /// The next message; `None` once unsubscribed.
    pub async fn next(&mut self) -> Option<Gossip> {
        self.receiver.recv().await
    }
}

/// The most gossip messages waiting for a subscriber before new ones are dropped (gossip
/// is best effort: a lost message is a missed announcement, which a pull makes up for).
pub const GOSSIP_QUEUE: usize = 256;

/// The network as a node sees it.
pub trait PeerNet: Send + Sync {
    /// This node.
    fn local_id(&self) -> NodeId;

    /// Sends `body` to `peer` on `protocol` and waits up to `deadline` for its answer.
    fn request(
        &self,
        peer: NodeId,
        protocol: Protocol,
        body: Vec<u8>,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<Vec<u8>, MeshError>>;

    /// Starts serving `protocol`: its requests arrive on the returned queue.
    ///
    /// # Errors
    /// [`MeshError::Local`] when it is served already.
    fn serve(&self, protocol: Protocol) -> Result<Inbound, MeshError>;

    /// Publishes `message` on `topic` to the nodes subscribed to it, best effort: no
    /// acknowledgement, and a node not reachable now misses it (announcements ride this;
    /// a follower that missed one pulls when it reconnects).
    ///
    /// # Errors
    /// Too large, or no subscribed node reachable now ([`MeshError::Unreachable`]).
    fn publish(&self, topic: &str, message: Vec<u8>) -> BoxFuture<'_, Result<(), MeshError>>;

    /// Starts receiving what others publish on `topic` (a second subscription to the same
    /// topic replaces the first).
    ///
    /// # Errors
    /// The network stopped.
    fn subscribe(&self, topic: &str) -> Result<Subscription, MeshError>;
}

/// Checks a body against a protocol's cap.
///
/// # Errors
/// [`MeshError::TooLarge`].
pub fn check_size(protocol: &Protocol, what: &'static str, bytes: usize) -> Result<(), MeshError> {
    let limit = if what == "request" {
        protocol.max_request_bytes
    } else {
        protocol.max_response_bytes
    };
    if bytes > limit {
        return Err(MeshError::TooLarge {
            protocol: protocol.name,
            what,
            bytes,
            limit,
        });
    }
    Ok(())
}
