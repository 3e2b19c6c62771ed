//! The production [`PeerNet`]: libp2p over QUIC (quic-v1), with request/response on one
//! stream protocol (`/forge/rpc/1`) and our own length-prefixed frames (not cbor's 1 MiB /
//! 10 MiB defaults: each [`Protocol`] caps its own bodies). Every connection starts with
//! the Hello of [`crate::hello`]: until both sides have verified each other's, every other
//! request on it is refused, and peers are named by the NodeId their certificate proves.
//!
//! One task owns the swarm; [`QuicNet`] is a handle that sends it commands.
//!
//! ```text
//! frame    = len:u32le | bytes                          (len <= FRAME_BYTES_MAX)
//! request  = name_len:u8 | protocol name | body
//! response = status:u8 | body    (0 ok, 1 failed: message, 2 refused: rule,
//!                                 3 busy, 4 too large: message)
//! hello    : 1 challenge(nonce[32]) -> 2 (nonce[32] | Hello over our nonce);
//!            3 finish(Hello over its nonce) -> 4 accepted
//! ```

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use forge_crypto::{NodeId, NodeIdentity, NodePublicKeys};
pub use libp2p::Multiaddr;
use libp2p::futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::request_response::{
    self, OutboundFailure, OutboundRequestId, ProtocolSupport, ResponseChannel,
};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{PeerId, StreamProtocol, Swarm};
use tokio::sync::{mpsc, oneshot};

use crate::hello::{Certificate, Handshake};
use crate::net::{Answer, BoxFuture, Inbound, InboundRequest, MeshError, PeerNet, Protocol};

/// The one stream protocol every request rides.
const RPC_PROTOCOL: StreamProtocol = StreamProtocol::new("/forge/rpc/1");
/// The Hello's own inner protocol name.
const HELLO: &str = "/forge/hello/1";
/// The largest frame read: above every protocol's cap, so a cap is reported as such.
const FRAME_BYTES_MAX: usize = 64 << 20;
/// How long a Hello may take before the connection counts as unusable.
const HELLO_DEADLINE: Duration = Duration::from_secs(20);

/// Length-prefixed frames.
#[derive(Debug, Clone, Copy, Default)]
struct FrameCodec;

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = usize::try_from(u32::from_le_bytes(len)).unwrap_or(usize::MAX);
    if len > FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (at most {FRAME_BYTES_MAX})"),
        ));
    }
    let mut bytes = vec![0u8; len];
    io.read_exact(&mut bytes).await?;
    Ok(bytes)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_le_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read_frame(io).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read_frame(io).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Vec<u8>,
    ) -> io::Result<()> {
        write_frame(io, &request).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Vec<u8>,
    ) -> io::Result<()> {
        write_frame(io, &response).await
    }
}

fn envelope(name: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(1 + name.len() + body.len());
    // Protocol names are short constants.
    bytes.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    bytes.extend_from_slice(name.as_bytes());
    bytes.extend_from_slice(body);
    bytes
}

fn open_envelope(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let (&len, rest) = bytes.split_first()?;
    let len = usize::from(len);
    if rest.len() < len {
        return None;
    }
    let name = std::str::from_utf8(&rest[..len]).ok()?;
    Some((name, &rest[len..]))
}

fn response(status: u8, body: &[u8]) -> Vec<u8> {
    [&[status][..], body].concat()
}

/// What a request asked of the swarm task.
enum Command {
    Request {
        peer: NodeId,
        protocol: Protocol,
        body: Vec<u8>,
        deadline: Duration,
        reply: oneshot::Sender<Result<Vec<u8>, MeshError>>,
        /// Sent again after dialing the peer's remembered address (never dials twice).
        redialed: bool,
    },
    /// Remember where `node` was reached, to dial it again when a request finds no
    /// connection to it.
    Remember {
        node: NodeId,
        address: Multiaddr,
    },
    Connect {
        address: Multiaddr,
        reply: oneshot::Sender<Result<NodeId, MeshError>>,
    },
    /// Answer an inbound request (`None`: it was dropped unanswered; close its stream
    /// without an answer, so the requester sees an unknown outcome, as after a crash).
    Respond {
        channel: u64,
        response: Option<Vec<u8>>,
    },
    Addresses {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    PeerKeys {
        node: NodeId,
        reply: oneshot::Sender<Option<NodePublicKeys>>,
    },
    Connected {
        reply: oneshot::Sender<Vec<NodeId>>,
    },
    Publish {
        topic: String,
        message: Vec<u8>,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    Subscribe {
        topic: String,
        queue: mpsc::Sender<crate::net::Gossip>,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
}

/// The protocols a node serves and their inbound queues, shared by the handle (which
/// registers them) and the swarm task (which feeds them).
type Served =
    Arc<std::sync::Mutex<BTreeMap<&'static str, (Protocol, mpsc::Sender<InboundRequest>)>>>;

fn served_entry(served: &Served, name: &str) -> Option<(Protocol, mpsc::Sender<InboundRequest>)> {
    served
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(name)
        .map(|(protocol, queue)| (*protocol, queue.clone()))
}

/// What an outbound request was for.
enum Outbound {
    User {
        peer: NodeId,
        protocol: Protocol,
        deadline: Duration,
        /// When it was handed to the swarm (a transport timeout well before the deadline
        /// is a dead connection, not a slow peer).
        sent: std::time::Instant,
        reply: oneshot::Sender<Result<Vec<u8>, MeshError>>,
    },
    /// Our challenge to a peer we dialed, with our side of that handshake: each
    /// connection's own (two connections to one peer, or both sides dialing at once, must
    /// not answer each other's challenges).
    HelloChallenge(PeerId, Box<Handshake>),
    HelloFinish(PeerId, NodeId),
}

/// What the swarm runs: request/response (every protocol, the Hello first), gossipsub
/// (announcements: `PeerNet::publish`), identify (so peers learn each other's listen
/// addresses).
#[derive(libp2p::swarm::NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
struct Behaviour {
    rpc: request_response::Behaviour<FrameCodec>,
    gossip: libp2p::gossipsub::Behaviour,
    identify: libp2p::identify::Behaviour,
}

/// The swarm task's state.
struct Driver {
    swarm: Swarm<Behaviour>,
    /// Subscribed topics and where their messages go.
    topics: BTreeMap<libp2p::gossipsub::TopicHash, mpsc::Sender<crate::net::Gossip>>,
    identity: Arc<NodeIdentity>,
    certificate: Certificate,
    local_peer: PeerId,
    commands: mpsc::Receiver<Command>,
    /// Weak, so that the task stops once every handle is gone (a strong sender here would
    /// keep the swarm, and its port, alive for ever).
    responses: mpsc::WeakSender<Command>,
    protocols: Served,
    /// Where each node was last reached (dialed again when a request finds no connection).
    book: BTreeMap<NodeId, Multiaddr>,
    /// The public keys each verified Hello proved, by node.
    keys: BTreeMap<NodeId, NodePublicKeys>,
    /// Peers whose Hello verified (both ways for peers we dialed).
    verified: BTreeMap<PeerId, NodeId>,
    /// The connection to use for each verified node.
    nodes: BTreeMap<NodeId, PeerId>,
    /// Our side of each Hello a peer opened (we answered its challenge, and wait for its
    /// finish), several per peer when it opened several.
    handshakes: BTreeMap<PeerId, Vec<Handshake>>,
    /// `connect` calls waiting for their dial, then for the Hello.
    dials: BTreeMap<ConnectionId, oneshot::Sender<Result<NodeId, MeshError>>>,
    hellos: BTreeMap<PeerId, Vec<oneshot::Sender<Result<NodeId, MeshError>>>>,
    outbound: BTreeMap<OutboundRequestId, Outbound>,
    channels: BTreeMap<u64, ResponseChannel<Vec<u8>>>,
    next_channel: u64,
    listening: Vec<Multiaddr>,
}

impl Driver {
    async fn run(mut self) {
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.command(command),
                    // Every handle is gone: stop serving.
                    None => return,
                },
                event = self.swarm.select_next_some() => self.event(event),
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Remember { node, address } => {
                self.book.insert(node, address);
            }
            Command::Request {
                peer,
                protocol,
                body,
                deadline,
                reply,
                redialed,
            } => {
                let Some(peer_id) = self.nodes.get(&peer).copied() else {
                    match self.book.get(&peer).cloned() {
                        // Reconnect: dial where it was reached, then send (nothing was
                        // sent yet, so this is safe for any request).
                        Some(address) if !redialed => {
                            let (dialed, dial_result) = oneshot::channel();
                            self.dial(address, dialed);
                            let commands = self.responses.clone();
                            tokio::spawn(async move {
                                let reason = match dial_result.await {
                                    Ok(Ok(node)) if node == peer => {
                                        let Some(commands) = commands.upgrade() else {
                                            return;
                                        };
                                        let again = Command::Request {
                                            peer,
                                            protocol,
                                            body,
                                            deadline,
                                            reply,
                                            redialed: true,
                                        };
                                        let _ = commands.send(again).await;
                                        return;
                                    }
                                    Ok(Ok(other)) => {
                                        format!("its last address now leads to node {other}")
                                    }
                                    Ok(Err(error)) => error.to_string(),
                                    Err(_) => "the network task stopped".to_owned(),
                                };
                                let _ = reply.send(Err(MeshError::Unreachable { peer, reason }));
                            });
                        }
                        _ => {
                            let _ = reply.send(Err(MeshError::Unreachable {
                                peer,
                                reason: "no verified connection to it (connect to its address \
                                         first)"
                                    .into(),
                            }));
                        }
                    }
                    return;
                };
                let id = self
                    .swarm
                    .behaviour_mut()
                    .rpc
                    .send_request(&peer_id, envelope(protocol.name, &body));
                self.outbound.insert(
                    id,
                    Outbound::User {
                        peer,
                        protocol,
                        deadline,
                        sent: std::time::Instant::now(),
                        reply,
                    },
                );
            }
            Command::Connect { address, reply } => self.dial(address, reply),
            Command::Respond { channel, response } => {
                if let (Some(channel), Some(response)) = (self.channels.remove(&channel), response)
                {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .rpc
                        .send_response(channel, response);
                }
            }
            Command::Publish {
                topic,
                message,
                reply,
            } => {
                let published = self
                    .swarm
                    .behaviour_mut()
                    .gossip
                    .publish(libp2p::gossipsub::IdentTopic::new(&topic), message)
                    .map(|_| ())
                    .map_err(|error| MeshError::Unreachable {
                        peer: self.identity.node_id(),
                        reason: format!("publishing on {topic}: {error}"),
                    });
                let _ = reply.send(published);
            }
            Command::Subscribe {
                topic,
                queue,
                reply,
            } => {
                let ident = libp2p::gossipsub::IdentTopic::new(&topic);
                let subscribed = self
                    .swarm
                    .behaviour_mut()
                    .gossip
                    .subscribe(&ident)
                    .map(|_| ())
                    .map_err(|error| MeshError::Local {
                        what: format!("subscribing to {topic}: {error}"),
                    });
                if subscribed.is_ok() {
                    self.topics.insert(ident.hash(), queue);
                }
                let _ = reply.send(subscribed);
            }
            Command::Connected { reply } => {
                let _ = reply.send(self.nodes.keys().copied().collect());
            }
            Command::PeerKeys { node, reply } => {
                let _ = reply.send(self.keys.get(&node).cloned());
            }
            Command::Addresses { reply } => {
                let peer = self.local_peer;
                let _ = reply.send(
                    self.listening
                        .iter()
                        .map(|address| address.clone().with_p2p(peer).unwrap_or_else(|a| a))
                        .collect(),
                );
            }
        }
    }

    fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => self.listening.push(address),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                if let Some(waiter) = self.dials.remove(&connection_id) {
                    match self.verified.get(&peer_id) {
                        // Already verified on another connection (it dialed us first).
                        Some(node) => {
                            let _ = waiter.send(Ok(*node));
                        }
                        None => self.hellos.entry(peer_id).or_default().push(waiter),
                    }
                }
                // The dialer opens the Hello; the listener answers it.
                if endpoint.is_dialer() && !self.verified.contains_key(&peer_id) {
                    self.start_hello(peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
                if let Some(waiter) = self.dials.remove(&connection_id) {
                    let _ = waiter.send(Err(MeshError::Local {
                        what: format!("cannot connect: {error}"),
                    }));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                if let Some(node) = self.verified.remove(&peer_id) {
                    self.nodes.remove(&node);
                }
                self.handshakes.remove(&peer_id);
                self.fail_hellos(peer_id, "the connection closed during the hello");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(event)) => self.rpc_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(libp2p::gossipsub::Event::Message {
                propagation_source,
                message,
                ..
            })) => self.gossip(propagation_source, message),
            _ => {}
        }
    }

    /// A gossip message: handed to its topic's subscriber, if it came through a peer whose
    /// Hello verified (as every request must).
    fn gossip(&mut self, source: PeerId, message: libp2p::gossipsub::Message) {
        let Some(from) = self.verified.get(&source).copied() else {
            return;
        };
        let closed = match self.topics.get(&message.topic) {
            Some(queue) => matches!(
                queue.try_send(crate::net::Gossip {
                    from,
                    message: message.data,
                }),
                Err(mpsc::error::TrySendError::Closed(_))
            ),
            None => false,
        };
        if closed {
            self.topics.remove(&message.topic);
            let _ = self
                .swarm
                .behaviour_mut()
                .gossip
                .unsubscribe(&libp2p::gossipsub::IdentTopic::new(message.topic.as_str()));
        }
    }

    fn fail_hellos(&mut self, peer: PeerId, reason: &str) {
        for waiter in self.hellos.remove(&peer).unwrap_or_default() {
            let _ = waiter.send(Err(MeshError::Handshake {
                reason: reason.to_owned(),
            }));
        }
    }

    fn new_handshake(&self, peer: PeerId) -> Result<Handshake, MeshError> {
        let nonce = forge_crypto::random_array().map_err(|error| MeshError::Local {
            what: format!("no randomness for a hello: {error}"),
        })?;
        Handshake::new(
            &self.certificate,
            &self.local_peer.to_bytes(),
            &peer.to_bytes(),
            nonce,
        )
    }

    /// Dials `address`; `reply` hears the NodeId its Hello proves (or why not).
    fn dial(&mut self, address: Multiaddr, reply: oneshot::Sender<Result<NodeId, MeshError>>) {
        let shown = address.to_string();
        let options = DialOpts::unknown_peer_id().address(address).build();
        let connection = options.connection_id();
        match self.swarm.dial(options) {
            Ok(()) => {
                self.dials.insert(connection, reply);
            }
            Err(error) => {
                let _ = reply.send(Err(MeshError::Local {
                    what: format!("cannot dial {shown}: {error}"),
                }));
            }
        }
    }

    fn start_hello(&mut self, peer: PeerId) {
        match self.new_handshake(peer) {
            Ok(handshake) => {
                let challenge = [&[1u8][..], &handshake.challenge()].concat();
                let id = self
                    .swarm
                    .behaviour_mut()
                    .rpc
                    .send_request(&peer, envelope(HELLO, &challenge));
                self.outbound
                    .insert(id, Outbound::HelloChallenge(peer, Box::new(handshake)));
            }
            Err(error) => self.fail_hellos(peer, &error.to_string()),
        }
    }

    fn rpc_event(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.inbound(peer, &request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => self.answered(request_id, &response),
            },
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => self.outbound_failed(request_id, &error),
            _ => {}
        }
    }

    fn reply_now(&mut self, channel: ResponseChannel<Vec<u8>>, bytes: Vec<u8>) {
        let _ = self.swarm.behaviour_mut().rpc.send_response(channel, bytes);
    }

    fn inbound(&mut self, peer: PeerId, request: &[u8], channel: ResponseChannel<Vec<u8>>) {
        let Some((name, body)) = open_envelope(request) else {
            return self.reply_now(channel, response(2, b"a malformed request"));
        };
        if name == HELLO {
            let answer = self.hello_request(peer, body);
            return self.reply_now(channel, answer);
        }
        let Some(from) = self.verified.get(&peer).copied() else {
            let refusal = response(
                2,
                b"no verified hello on this connection: every request is refused",
            );
            return self.reply_now(channel, refusal);
        };
        let Some((protocol, queue)) = served_entry(&self.protocols, name) else {
            let refusal = response(2, b"this node does not serve the protocol");
            return self.reply_now(channel, refusal);
        };
        if body.len() > protocol.max_request_bytes {
            let message = format!(
                "a request of {} bytes exceeds {}'s limit of {} bytes",
                body.len(),
                protocol.name,
                protocol.max_request_bytes
            );
            return self.reply_now(channel, response(4, message.as_bytes()));
        }
        let max_response = protocol.max_response_bytes;
        let (answer_sender, answer) = oneshot::channel();
        match queue.try_send(InboundRequest::new(from, body.to_vec(), answer_sender)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return self.reply_now(channel, response(3, b""));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                let refusal = response(2, b"this node stopped serving the protocol");
                return self.reply_now(channel, refusal);
            }
        }
        let id = self.next_channel;
        self.next_channel += 1;
        self.channels.insert(id, channel);
        let responses = self.responses.clone();
        tokio::spawn(async move {
            // Dropped unanswered: the stream closes with no answer, and the requester sees
            // an unknown outcome (`ConnectionLost`), as the PeerNet contract says.
            let answer = answer.await;
            let Some(responses) = responses.upgrade() else {
                return;
            };
            let Ok(answer) = answer else {
                let _ = responses
                    .send(Command::Respond {
                        channel: id,
                        response: None,
                    })
                    .await;
                return;
            };
            let bytes = match answer {
                Answer::Ok(body) if body.len() > max_response => response(
                    4,
                    format!("a response of {} bytes exceeds the limit", body.len()).as_bytes(),
                ),
                Answer::Ok(body) => response(0, &body),
                Answer::Failed(message) => response(1, message.as_bytes()),
                Answer::Refused(reason) => response(2, reason.as_bytes()),
            };
            let _ = responses
                .send(Command::Respond {
                    channel: id,
                    response: Some(bytes),
                })
                .await;
        });
    }

    /// The listener's side of a Hello: answers a challenge with ours and our Hello;
    /// checks the dialer's Hello.
    fn hello_request(&mut self, peer: PeerId, body: &[u8]) -> Vec<u8> {
        match body.split_first() {
            Some((1, nonce)) if nonce.len() == 32 => {
                let mut their_nonce = [0u8; 32];
                their_nonce.copy_from_slice(nonce);
                let handshake = match self.new_handshake(peer) {
                    Ok(handshake) => handshake,
                    Err(error) => return response(1, error.to_string().as_bytes()),
                };
                match handshake.hello(&self.identity, &their_nonce) {
                    Ok(hello) => {
                        let answer = [&[2u8][..], &handshake.challenge(), &hello].concat();
                        self.handshakes.entry(peer).or_default().push(handshake);
                        response(0, &answer)
                    }
                    Err(error) => response(1, error.to_string().as_bytes()),
                }
            }
            Some((3, hello)) => {
                let pending = self.handshakes.remove(&peer).unwrap_or_default();
                if pending.is_empty() {
                    return response(2, b"a hello finish without a challenge");
                }
                // The finish answers one of the challenges we sent this peer: the one
                // whose nonce it signs.
                let mut outcome = None;
                let mut left = Vec::new();
                for handshake in pending {
                    if matches!(outcome, Some(Ok(_))) {
                        left.push(handshake);
                        continue;
                    }
                    match handshake.verify(hello) {
                        Ok(verified) => outcome = Some(Ok(verified)),
                        Err(error) => {
                            outcome = Some(Err(error));
                            left.push(handshake);
                        }
                    }
                }
                if !left.is_empty() {
                    self.handshakes.insert(peer, left);
                }
                match outcome.unwrap_or_else(|| {
                    Err(MeshError::Handshake {
                        reason: "no challenge matched".into(),
                    })
                }) {
                    Ok(verified) => {
                        self.verified.insert(peer, verified.node_id);
                        self.nodes.insert(verified.node_id, peer);
                        self.keys.insert(verified.node_id, verified.node_keys);
                        response(0, &[4])
                    }
                    Err(error) => response(2, error.to_string().as_bytes()),
                }
            }
            _ => response(2, b"a malformed hello"),
        }
    }

    fn answered(&mut self, request_id: OutboundRequestId, answer: &[u8]) {
        let Some(outbound) = self.outbound.remove(&request_id) else {
            return;
        };
        let (status, body) = answer
            .split_first()
            .map_or((255, &[][..]), |(s, b)| (*s, b));
        match outbound {
            Outbound::User {
                peer,
                protocol,
                reply,
                ..
            } => {
                let message = || String::from_utf8_lossy(body).into_owned();
                let result = match status {
                    0 if body.len() > protocol.max_response_bytes => Err(MeshError::TooLarge {
                        protocol: protocol.name,
                        what: "response",
                        bytes: body.len(),
                        limit: protocol.max_response_bytes,
                    }),
                    0 => Ok(body.to_vec()),
                    1 | 4 => Err(MeshError::Remote {
                        peer,
                        protocol: protocol.name,
                        message: message(),
                    }),
                    2 => Err(MeshError::Refused {
                        peer,
                        protocol: protocol.name,
                        reason: message(),
                    }),
                    3 => Err(MeshError::Busy {
                        peer,
                        protocol: protocol.name,
                    }),
                    _ => Err(MeshError::Remote {
                        peer,
                        protocol: protocol.name,
                        message: "a malformed response".into(),
                    }),
                };
                let _ = reply.send(result);
            }
            Outbound::HelloChallenge(peer, handshake) => {
                let verified = match (status, body.split_first()) {
                    (0, Some((2, rest))) if rest.len() > 32 => {
                        let mut their_nonce = [0u8; 32];
                        their_nonce.copy_from_slice(&rest[..32]);
                        handshake.verify(&rest[32..]).and_then(|node| {
                            let finish = handshake.hello(&self.identity, &their_nonce)?;
                            Ok((node, finish))
                        })
                    }
                    _ => Err(MeshError::Handshake {
                        reason: format!(
                            "the peer refused our hello: {}",
                            String::from_utf8_lossy(body)
                        ),
                    }),
                };
                match verified {
                    Ok((verified, finish)) => {
                        let node = verified.node_id;
                        self.keys.insert(node, verified.node_keys);
                        let finish = [&[3u8][..], &finish].concat();
                        let id = self
                            .swarm
                            .behaviour_mut()
                            .rpc
                            .send_request(&peer, envelope(HELLO, &finish));
                        self.outbound.insert(id, Outbound::HelloFinish(peer, node));
                    }
                    Err(error) => {
                        self.fail_hellos(peer, &error.to_string());
                        let _ = self.swarm.disconnect_peer_id(peer);
                    }
                }
            }
            Outbound::HelloFinish(peer, node) => {
                if status == 0 && body == [4] {
                    self.verified.insert(peer, node);
                    self.nodes.insert(node, peer);
                    for waiter in self.hellos.remove(&peer).unwrap_or_default() {
                        let _ = waiter.send(Ok(node));
                    }
                } else {
                    let reason = format!(
                        "the peer refused our hello: {}",
                        String::from_utf8_lossy(body)
                    );
                    self.fail_hellos(peer, &reason);
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
        }
    }

    fn outbound_failed(&mut self, request_id: OutboundRequestId, error: &OutboundFailure) {
        let Some(outbound) = self.outbound.remove(&request_id) else {
            return;
        };
        match outbound {
            Outbound::User {
                peer,
                protocol,
                deadline,
                sent,
                reply,
            } => {
                let error = match error {
                    // The transport gave up on a stream of a connection that stopped
                    // answering (a peer that restarted: QUIC notices only at its idle
                    // timeout), long before our deadline: the connection is lost.
                    OutboundFailure::Timeout if sent.elapsed() < deadline => {
                        // Closed, so that the next request dials afresh instead of
                        // waiting on the same dead connection.
                        if let Some(peer_id) = self.nodes.get(&peer).copied() {
                            let _ = self.swarm.disconnect_peer_id(peer_id);
                        }
                        MeshError::ConnectionLost {
                            peer,
                            protocol: protocol.name,
                            reason: format!(
                                "the connection stopped answering after {:?}",
                                sent.elapsed()
                            ),
                        }
                    }
                    OutboundFailure::DialFailure => MeshError::Unreachable {
                        peer,
                        reason: error.to_string(),
                    },
                    OutboundFailure::UnsupportedProtocols => MeshError::Refused {
                        peer,
                        protocol: protocol.name,
                        reason: error.to_string(),
                    },
                    OutboundFailure::Timeout => MeshError::Timeout {
                        peer,
                        protocol: protocol.name,
                        after: deadline,
                    },
                    // Sent, and then the stream or connection failed (or the peer dropped
                    // it unanswered): the outcome is unknown, as after a timeout.
                    _ => MeshError::ConnectionLost {
                        peer,
                        protocol: protocol.name,
                        reason: error.to_string(),
                    },
                };
                let _ = reply.send(Err(error));
            }
            Outbound::HelloChallenge(peer, _) | Outbound::HelloFinish(peer, _) => {
                self.fail_hellos(peer, &format!("the hello failed: {error}"));
            }
        }
    }
}

/// A handle on the QUIC network of one node. Cloning shares it; the swarm stops when the
/// last handle is dropped.
#[derive(Clone)]
pub struct QuicNet {
    local: NodeId,
    commands: mpsc::Sender<Command>,
    protocols: Served,
}

impl std::fmt::Debug for QuicNet {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("QuicNet")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl QuicNet {
    /// Starts this node's network on the current tokio runtime, listening on `listen`
    /// (e.g. `/ip4/0.0.0.0/udp/7946/quic-v1`; port 0 picks one), with the ed25519
    /// transport key from `transport_seed` (see `NodeSecrets::transport_seed`), certified
    /// by `identity` as of `now_ns`.
    ///
    /// # Errors
    /// A bad seed; the address cannot be listened on (naming it).
    pub fn start(
        identity: &Arc<NodeIdentity>,
        transport_seed: [u8; 32],
        listen: &Multiaddr,
        now_ns: i64,
    ) -> Result<Self, MeshError> {
        let mut seed = transport_seed;
        let keypair =
            libp2p::identity::Keypair::ed25519_from_bytes(&mut seed).map_err(|error| {
                MeshError::Local {
                    what: format!("the transport key: {error}"),
                }
            })?;
        let local_peer = keypair.public().to_peer_id();
        let certificate = Certificate::issue(identity, &local_peer.to_bytes(), now_ns)?;
        let behaviour = request_response::Behaviour::with_codec(
            FrameCodec,
            [(RPC_PROTOCOL, ProtocolSupport::Full)],
            // Our own deadlines apply per call; this only reaps what nobody waits for.
            request_response::Config::default()
                // (A pull's request waits for the whole push it starts: up to a day.)
                .with_request_timeout(Duration::from_secs(24 * 3600))
                .with_max_concurrent_streams(256),
        );
        let gossip = libp2p::gossipsub::Behaviour::new(
            libp2p::gossipsub::MessageAuthenticity::Signed(keypair.clone()),
            libp2p::gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .max_transmit_size(64 << 10)
                .build()
                .map_err(|error| MeshError::Local {
                    what: format!("configuring gossip: {error}"),
                })?,
        )
        .map_err(|error| MeshError::Local {
            what: format!("configuring gossip: {error}"),
        })?;
        let identify = libp2p::identify::Behaviour::new(libp2p::identify::Config::new(
            "/forge/1".into(),
            keypair.public(),
        ));
        let behaviour = Behaviour {
            rpc: behaviour,
            gossip,
            identify,
        };
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_quic()
            .with_behaviour(|_| behaviour)
            .map_err(|error| MeshError::Local {
                what: format!("building the network: {error}"),
            })?
            .with_swarm_config(|config| {
                config.with_idle_connection_timeout(Duration::from_secs(300))
            })
            .build();
        swarm
            .listen_on(listen.clone())
            .map_err(|error| MeshError::Local {
                what: format!("cannot listen on {listen}: {error}"),
            })?;
        let (commands, receiver) = mpsc::channel(1024);
        let protocols = Served::default();
        let driver = Driver {
            swarm,
            identity: identity.clone(),
            certificate,
            local_peer,
            commands: receiver,
            responses: commands.downgrade(),
            protocols: protocols.clone(),
            verified: BTreeMap::new(),
            topics: BTreeMap::new(),
            keys: BTreeMap::new(),
            book: BTreeMap::new(),
            nodes: BTreeMap::new(),
            handshakes: BTreeMap::new(),
            dials: BTreeMap::new(),
            hellos: BTreeMap::new(),
            outbound: BTreeMap::new(),
            channels: BTreeMap::new(),
            next_channel: 0,
            listening: Vec::new(),
        };
        tokio::spawn(driver.run());
        Ok(Self {
            local: identity.node_id(),
            commands,
            protocols,
        })
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, MeshError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || MeshError::Local {
            what: "the network task stopped".into(),
        };
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }

    /// Connects to `address` and completes the Hello; the NodeId it proved.
    ///
    /// # Errors
    /// Unreachable address, a Hello that does not verify, or `deadline` passing.
    pub async fn connect(
        &self,
        address: Multiaddr,
        deadline: Duration,
    ) -> Result<NodeId, MeshError> {
        let shown = address.to_string();
        let dialed = address.clone();
        match tokio::time::timeout(
            deadline.min(HELLO_DEADLINE),
            self.ask(|reply| Command::Connect { address, reply }),
        )
        .await
        {
            Ok(result) => {
                let node = result??;
                self.remember(node, dialed).await?;
                Ok(node)
            }
            Err(_) => Err(MeshError::Local {
                what: format!("no verified connection to {shown} within {deadline:?}"),
            }),
        }
    }

    /// The public keys a verified Hello of `node` proved (None: never verified here).
    ///
    /// # Errors
    /// The network task stopped.
    pub async fn peer_keys(&self, node: NodeId) -> Result<Option<NodePublicKeys>, MeshError> {
        self.ask(|reply| Command::PeerKeys { node, reply }).await
    }

    /// Remembers that `node` is reached at `address`: a request to it that finds no
    /// connection dials there first (a reconnect).
    ///
    /// # Errors
    /// The network task stopped.
    pub async fn remember(&self, node: NodeId, address: Multiaddr) -> Result<(), MeshError> {
        self.commands
            .send(Command::Remember { node, address })
            .await
            .map_err(|_| MeshError::Local {
                what: "the network task stopped".into(),
            })
    }

    /// The nodes this one has a verified connection with.
    ///
    /// # Errors
    /// The network task stopped.
    pub async fn connected(&self) -> Result<Vec<NodeId>, MeshError> {
        self.ask(|reply| Command::Connected { reply }).await
    }

    /// The addresses this node listens on, each ending in `/p2p/PEER_ID` (dialable).
    ///
    /// # Errors
    /// The network task stopped.
    pub async fn addresses(&self) -> Result<Vec<Multiaddr>, MeshError> {
        self.ask(|reply| Command::Addresses { reply }).await
    }
}

impl PeerNet for QuicNet {
    fn local_id(&self) -> NodeId {
        self.local
    }

    fn request(
        &self,
        peer: NodeId,
        protocol: Protocol,
        body: Vec<u8>,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<Vec<u8>, MeshError>> {
        Box::pin(async move {
            crate::net::check_size(&protocol, "request", body.len())?;
            let asked = self.ask(|reply| Command::Request {
                peer,
                protocol,
                body,
                deadline,
                reply,
                redialed: false,
            });
            match tokio::time::timeout(deadline, asked).await {
                Ok(result) => result?,
                Err(_) => Err(MeshError::Timeout {
                    peer,
                    protocol: protocol.name,
                    after: deadline,
                }),
            }
        })
    }

    fn publish(&self, topic: &str, message: Vec<u8>) -> BoxFuture<'_, Result<(), MeshError>> {
        let topic = topic.to_owned();
        Box::pin(async move {
            self.ask(|reply| Command::Publish {
                topic,
                message,
                reply,
            })
            .await?
        })
    }

    fn subscribe(&self, topic: &str) -> Result<crate::net::Subscription, MeshError> {
        let (queue, receiver) = mpsc::channel(crate::net::GOSSIP_QUEUE);
        let (reply, _answer) = oneshot::channel();
        // Sent without waiting (this is not async): the subscription starts as soon as
        // the network task reads it; a failure is logged by nobody, as gossip is best
        // effort (a missed announcement is made up by a pull).
        self.commands
            .try_send(Command::Subscribe {
                topic: topic.to_owned(),
                queue,
                reply,
            })
            .map_err(|_| MeshError::Local {
                what: "the network task is not taking commands".into(),
            })?;
        Ok(crate::net::Subscription::new(receiver))
    }

    fn serve(&self, protocol: Protocol) -> Result<Inbound, MeshError> {
        let mut served = self
            .protocols
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if served
            .get(protocol.name)
            .is_some_and(|(_, queue)| !queue.is_closed())
        {
            return Err(MeshError::Local {
                what: format!("{} is served already on this node", protocol.name),
            });
        }
        let (queue, receiver) = mpsc::channel(protocol.inbound_queue.max(1));
        served.insert(protocol.name, (protocol, queue));
        Ok(Inbound::new(receiver))
    }
}

#[cfg(test)]
mod tests {
    use forge_crypto::NodeSecrets;

    use super::*;

    const ECHO: Protocol = Protocol {
        name: "/forge/test-echo/1",
        max_request_bytes: 4 << 20,
        max_response_bytes: 8 << 20,
        inbound_queue: 8,
    };

    fn node(byte: u8) -> (Arc<NodeIdentity>, [u8; 32]) {
        let secrets = NodeSecrets::from_seed_bytes([byte; 128]);
        (
            Arc::new(NodeIdentity::from_secrets(&secrets)),
            secrets.transport_seed(),
        )
    }

    fn loopback() -> Multiaddr {
        "/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("address")
    }

    async fn listening(net: &QuicNet) -> Multiaddr {
        for _ in 0..100 {
            if let Some(address) = net.addresses().await.expect("addresses").first() {
                return address.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the node never listened");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_verify_each_other_over_quic_and_exchange_requests() {
        let (a_identity, a_seed) = node(1);
        let (b_identity, b_seed) = node(2);
        let a = QuicNet::start(&a_identity, a_seed, &loopback(), 1).expect("a");
        let b = QuicNet::start(&b_identity, b_seed, &loopback(), 1).expect("b");
        let mut inbound = b.serve(ECHO).expect("serve");
        let a_id = a_identity.node_id();
        tokio::spawn(async move {
            while let Some(request) = inbound.next().await {
                assert_eq!(request.from, a_id, "requests name the verified sender");
                if request.body == b"drop" {
                    // Dropped unanswered, as by a crash.
                    continue;
                }
                let body = [request.body.as_slice(), request.body.as_slice()].concat();
                request.respond(body);
            }
        });
        let b_address = listening(&b).await;
        assert!(b_address.to_string().contains("/p2p/"), "{b_address}");
        let learned = a
            .connect(b_address, Duration::from_secs(10))
            .await
            .expect("connect");
        assert_eq!(
            learned,
            b_identity.node_id(),
            "the NodeId comes from b's certificate"
        );
        let second = Duration::from_secs(10);
        let answer = a
            .request(b_identity.node_id(), ECHO, b"over quic".to_vec(), second)
            .await
            .expect("echo");
        assert_eq!(answer, b"over quicover quic");
        // Megabytes, past cbor's defaults.
        let big = vec![7u8; 3 << 20];
        let answer = a
            .request(b_identity.node_id(), ECHO, big.clone(), second)
            .await
            .expect("big echo");
        assert_eq!(answer.len(), 6 << 20);
        assert!(matches!(
            a.request(b_identity.node_id(), ECHO, vec![0; (4 << 20) + 1], second)
                .await,
            Err(MeshError::TooLarge { .. })
        ));
        let other = Protocol {
            name: "/forge/other/1",
            ..ECHO
        };
        assert!(matches!(
            a.request(b_identity.node_id(), other, vec![1], second)
                .await,
            Err(MeshError::Refused { .. })
        ));
        // b reaches a over the same verified connection, a serves nothing: refused.
        assert!(matches!(
            b.request(a_identity.node_id(), ECHO, vec![1], second).await,
            Err(MeshError::Refused { .. })
        ));
        // Dropped unanswered: an unknown outcome (not an answer), at once.
        assert!(matches!(
            a.request(b_identity.node_id(), ECHO, b"drop".to_vec(), second)
                .await,
            Err(MeshError::ConnectionLost { .. })
        ));
        // A node nobody connected to is unreachable, at once.
        let (c_identity, _) = node(3);
        assert!(matches!(
            a.request(c_identity.node_id(), ECHO, vec![1], second).await,
            Err(MeshError::Unreachable { .. })
        ));
    }

    /// Two nodes that first reach each other at the same moment dial each other: each is
    /// then the dialer of one Hello and the listener of another on the same peer, and
    /// each must answer the challenge of the connection it came on (they once shared one
    /// slot per peer, and the second challenge overwrote the first: "does not sign this
    /// connection's challenge"). Several rounds, each with fresh nodes and many requests
    /// from both sides at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_dialing_each_other_at_once_both_verify() {
        for round in 0..6u8 {
            let (a_identity, a_seed) = node(20 + 2 * round);
            let (b_identity, b_seed) = node(21 + 2 * round);
            let a = QuicNet::start(&a_identity, a_seed, &loopback(), 1).expect("a");
            let b = QuicNet::start(&b_identity, b_seed, &loopback(), 1).expect("b");
            for net in [&a, &b] {
                let mut inbound = net.serve(ECHO).expect("serve");
                tokio::spawn(async move {
                    while let Some(request) = inbound.next().await {
                        let body = request.body.clone();
                        request.respond(body);
                    }
                });
            }
            let (a_address, b_address) = (listening(&a).await, listening(&b).await);
            a.remember(b_identity.node_id(), b_address)
                .await
                .expect("remember b");
            b.remember(a_identity.node_id(), a_address)
                .await
                .expect("remember a");
            let mut calls = Vec::new();
            for index in 0..8u8 {
                for (from, to) in [(&a, b_identity.node_id()), (&b, a_identity.node_id())] {
                    let from = from.clone();
                    calls.push(tokio::spawn(async move {
                        from.request(to, ECHO, vec![index; 64], Duration::from_secs(10))
                            .await
                    }));
                }
            }
            for call in calls {
                let answer = call.await.expect("task");
                assert!(answer.is_ok(), "round {round}: {answer:?}");
            }
        }
    }

    /// A restarted peer leaves this node its old connections (here two, one dialed from
    /// each side, as `forge peer add` on both sites makes), which fail only when used or
    /// idle for long: an idempotent request outlives all of them and reaches the new process.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idempotent_request_reaches_a_peer_restarted_behind_its_dead_connections() {
        let (a_identity, a_seed) = node(7);
        let (b_identity, b_seed) = node(8);
        let a = QuicNet::start(&a_identity, a_seed, &loopback(), 1).expect("a");
        let b = QuicNet::start(&b_identity, b_seed, &loopback(), 1).expect("b");
        let a_address = listening(&a).await;
        let b_address = listening(&b).await;
        a.connect(b_address.clone(), Duration::from_secs(10))
            .await
            .expect("a dials b");
        b.connect(a_address, Duration::from_secs(10))
            .await
            .expect("b dials a");
        drop(b);
        // The swarm task notices its last handle is gone and releases the port.
        let listen: Multiaddr = b_address
            .iter()
            .filter(|part| !matches!(part, libp2p::multiaddr::Protocol::P2p(_)))
            .collect();
        let restarted = loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Ok(net) = QuicNet::start(&b_identity, b_seed, &listen, 2)
                && !net.addresses().await.expect("addresses").is_empty()
            {
                break net;
            }
        };
        let mut inbound = restarted.serve(ECHO).expect("serve");
        tokio::spawn(async move {
            while let Some(request) = inbound.next().await {
                let body = request.body.clone();
                request.respond(body);
            }
        });
        let answer = crate::net::request_idempotent(
            &a,
            b_identity.node_id(),
            ECHO,
            b"after a restart".to_vec(),
            Duration::from_secs(60),
        )
        .await
        .expect("the request reaches the restarted peer");
        assert_eq!(answer, b"after a restart");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gossip_reaches_a_connected_subscriber_named_by_its_verified_node() {
        let (a_identity, a_seed) = node(5);
        let (b_identity, b_seed) = node(6);
        let a = QuicNet::start(&a_identity, a_seed, &loopback(), 1).expect("a");
        let b = QuicNet::start(&b_identity, b_seed, &loopback(), 1).expect("b");
        let mut heads = b.subscribe("/forge/heads/1/test").expect("subscribe");
        let b_address = listening(&b).await;
        a.connect(b_address, Duration::from_secs(10))
            .await
            .expect("connect");
        // The gossip mesh forms on a heartbeat: publish until b has it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let received = loop {
            let _ = a.publish("/forge/heads/1/test", b"new head".to_vec()).await;
            if let Ok(Some(gossip)) =
                tokio::time::timeout(Duration::from_millis(300), heads.next()).await
            {
                break gossip;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no gossip within 20 s"
            );
        };
        assert_eq!(received.message, b"new head");
        assert_eq!(
            received.from,
            a_identity.node_id(),
            "named by its verified node"
        );
        // Nobody subscribed to another topic: publishing there reaches no one.
        assert!(
            a.publish("/forge/heads/1/other", b"x".to_vec())
                .await
                .is_err()
        );
    }
}
