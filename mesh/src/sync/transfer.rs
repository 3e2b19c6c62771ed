//! A volume sync end to end (`/forge/volume/1` around `/forge/sync/1`): the sender offers
//! the volume's history, the receiver checks it against its rules (nothing is stored from
//! a peer it refuses), the sender pushes each snapshot's reference index and commit (only
//! what the receiver lacks), then asks it to finish: the receiver checks that it holds
//! everything, publishes the history and moves its branch (fast-forward only), and signs a
//! receipt; the sender countersigns it and both keep the proof. A pull asks the peer to
//! run that push towards the asker.
//!
//! The vault-specific decisions (trust rules, records, the ref move) sit behind
//! [`VolumeHost`]; this module is only the protocol, so the in-process network carries it
//! in tests and the simulator exactly as QUIC does in production.
//!
//! ```text
//! message  = "FV" | version:u8=1 | kind:u8 | body | check[16]     (BLAKE3 of the rest)
//! Offer    (1)   = offer (see offer.rs)
//! Finish   (2)   = nonce[32]
//! Proof    (3)   = proof file
//! Pull     (4)   = name:str16 | branch:str16 | as_name:str16
//! Follow   (5)   = on:u8 (1 follow, 0 unfollow) | name:str16 | branch:str16
//! Accepted (129) = (empty)
//! Finished (130) = move:u8 | branch:str16 | receipt:blob | signature:blob | keys:blob
//! Kept     (131) = (empty)
//! Following (133) = volume[16]
//! Pulled   (132) = move:u8 | branch:str16 | chunks_sent:u64 | bytes_sent:u64
//!                  | chunks_skipped:u64 | proof:blob
//! blob     = len:u32le | bytes
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forge_crypto::{Cid, NodeId, NodeIdentity, NodePublicKeys, Signature};

use super::offer::{Offer, RefMove};
use super::session::{ProgressFn, PushConfig, SYNC_PROTOCOL, SyncStore, push_with_progress};
use super::walker::Item;
use super::wire::{DataKind, Message, PutOutcome};
use crate::bytes::{Reader, put_blob32, put_str16};
use crate::net::{Inbound, InboundRequest, MeshError, PeerNet, Protocol, request_idempotent};
use crate::proof::{Receipt, TransferProof};

/// The volume protocol: offers carry a volume's history (a few KiB per snapshot).
pub const VOLUME_PROTOCOL: Protocol = Protocol {
    name: "/forge/volume/1",
    max_request_bytes: 16 << 20,
    max_response_bytes: 1 << 20,
    inbound_queue: 16,
};

/// Version of the volume messages.
pub const VOLUME_WIRE_VERSION: u8 = 1;
const MAGIC: &[u8; 2] = b"FV";
const CHECK_BYTES: usize = 16;

/// A volume message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeMessage {
    /// The start of a push.
    Offer(Offer),
    /// Everything is sent: publish and sign a receipt (the offer's nonce).
    Finish([u8; 32]),
    /// The countersigned proof, for the receiver to keep.
    Proof(Vec<u8>),
    /// Push this volume's branch to me.
    Pull {
        /// The volume's name at the peer.
        name: String,
        /// The branch.
        branch: String,
        /// The name it gets here if it is new here.
        as_name: String,
    },
    /// Announce this volume's branch to me from now on (or stop).
    Follow {
        /// Follow (true) or stop (false).
        on: bool,
        /// The volume's name at the peer.
        name: String,
        /// The branch.
        branch: String,
    },
    /// The offer is taken: send.
    Accepted,
    /// Followed (or no longer): the volume's id.
    Following([u8; 16]),
    /// Published: what happened to the branch, and the signed receipt.
    Finished {
        /// The ref move.
        moved: RefMove,
        /// The branch the head is on at the receiver (a new one when diverged).
        branch: String,
        /// The receipt's encoding.
        receipt: Vec<u8>,
        /// The receiver's signature over it.
        signature: Vec<u8>,
        /// The receiver's public keys (they must hash to its NodeId).
        keys: Vec<u8>,
    },
    /// The proof is kept.
    Kept,
    /// The pull's push is done.
    Pulled(TransferSummary),
}

/// What a sync did, for the side that asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferSummary {
    /// What happened to the receiver's branch.
    pub moved: RefMove,
    /// The branch the head is on at the receiver.
    pub branch: String,
    /// Chunks and objects sent.
    pub chunks_sent: u64,
    /// Bytes of requests sent (retries included).
    pub bytes_sent: u64,
    /// Chunks of the head's index the receiver already held.
    pub chunks_skipped: u64,
    /// The countersigned proof file.
    pub proof: Vec<u8>,
}

fn malformed(reason: impl Into<String>) -> MeshError {
    let reason = reason.into();
    MeshError::Local {
        what: format!("a malformed volume message: {reason}"),
    }
}

fn take_move(reader: &mut Reader<'_>) -> Result<RefMove, MeshError> {
    let code = reader.u8()?;
    RefMove::from_code(code).ok_or_else(|| reader.fail(format!("ref move {code}")))
}

impl VolumeMessage {
    /// The message's encoding, check included.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        bytes.push(VOLUME_WIRE_VERSION);
        match self {
            Self::Offer(offer) => {
                bytes.push(1);
                bytes.extend_from_slice(&offer.encode());
            }
            Self::Finish(nonce) => {
                bytes.push(2);
                bytes.extend_from_slice(nonce);
            }
            Self::Proof(proof) => {
                bytes.push(3);
                bytes.extend_from_slice(proof);
            }
            Self::Pull {
                name,
                branch,
                as_name,
            } => {
                bytes.push(4);
                put_str16(&mut bytes, name);
                put_str16(&mut bytes, branch);
                put_str16(&mut bytes, as_name);
            }
            Self::Follow { on, name, branch } => {
                bytes.push(5);
                bytes.push(u8::from(*on));
                put_str16(&mut bytes, name);
                put_str16(&mut bytes, branch);
            }
            Self::Following(volume) => {
                bytes.push(133);
                bytes.extend_from_slice(volume);
            }
            Self::Accepted => bytes.push(129),
            Self::Finished {
                moved,
                branch,
                receipt,
                signature,
                keys,
            } => {
                bytes.push(130);
                bytes.push(moved.code());
                put_str16(&mut bytes, branch);
                put_blob32(&mut bytes, receipt);
                put_blob32(&mut bytes, signature);
                put_blob32(&mut bytes, keys);
            }
            Self::Kept => bytes.push(131),
            Self::Pulled(summary) => {
                bytes.push(132);
                bytes.push(summary.moved.code());
                put_str16(&mut bytes, &summary.branch);
                for count in [
                    summary.chunks_sent,
                    summary.bytes_sent,
                    summary.chunks_skipped,
                ] {
                    bytes.extend_from_slice(&count.to_le_bytes());
                }
                put_blob32(&mut bytes, &summary.proof);
            }
        }
        let check = blake3::hash(&bytes);
        bytes.extend_from_slice(&check.as_bytes()[..CHECK_BYTES]);
        bytes
    }

    /// Decodes a message, refusing garbage, another version and a failed check.
    ///
    /// # Errors
    /// A malformed message ([`MeshError::Local`] naming what is wrong).
    pub fn decode(bytes: &[u8]) -> Result<Self, MeshError> {
        let Some(body_len) = bytes.len().checked_sub(CHECK_BYTES) else {
            return Err(malformed("shorter than its check"));
        };
        let (body, check) = bytes.split_at(body_len);
        if &blake3::hash(body).as_bytes()[..CHECK_BYTES] != check {
            return Err(malformed("its check does not match (damaged)"));
        }
        let mut reader = Reader::new(body, malformed);
        reader.header(MAGIC, VOLUME_WIRE_VERSION)?;
        let message = match reader.u8()? {
            1 => Self::Offer(Offer::decode(reader.take(reader.remaining())?)?),
            2 => Self::Finish(reader.array32()?),
            3 => Self::Proof(reader.take(reader.remaining())?.to_vec()),
            4 => Self::Pull {
                name: reader.str16("name")?,
                branch: reader.str16("name")?,
                as_name: reader.str16("name")?,
            },
            5 => Self::Follow {
                on: match reader.u8()? {
                    0 => false,
                    1 => true,
                    other => return Err(reader.fail(format!("follow flag {other}"))),
                },
                name: reader.str16("name")?,
                branch: reader.str16("name")?,
            },
            133 => Self::Following(reader.array16()?),
            129 => Self::Accepted,
            130 => Self::Finished {
                moved: take_move(&mut reader)?,
                branch: reader.str16("name")?,
                receipt: reader.blob32()?,
                signature: reader.blob32()?,
                keys: reader.blob32()?,
            },
            131 => Self::Kept,
            132 => Self::Pulled(TransferSummary {
                moved: take_move(&mut reader)?,
                branch: reader.str16("name")?,
                chunks_sent: reader.u64()?,
                bytes_sent: reader.u64()?,
                chunks_skipped: reader.u64()?,
                proof: reader.blob32()?,
            }),
            kind => return Err(reader.fail(format!("unknown kind {kind}"))),
        };
        reader.end()?;
        Ok(message)
    }
}

/// What a sender pushes: its offer and where the bytes come from.
pub struct Outgoing {
    /// The offer (the volume's history and keys that travel).
    pub offer: Offer,
    /// The sender's store.
    pub store: Arc<dyn SyncStore>,
    /// Chunks the head's index names (for the skipped count).
    pub head_chunks: u64,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Outgoing")
            .field("offer", &self.offer)
            .field("head_chunks", &self.head_chunks)
            .finish_non_exhaustive()
    }
}

/// What a receiver did when a sync finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The ref move.
    pub moved: RefMove,
    /// The branch the head is on now.
    pub branch: String,
}

/// The vault behind the protocol: its rules, its records, its identity.
pub trait VolumeHost: Send + Sync {
    /// This node's identity (receipts are signed with it).
    fn identity(&self) -> &NodeIdentity;

    /// The time now, ns since the epoch (receipts carry it).
    fn now_ns(&self) -> i64;

    /// The sender side: an offer of `name`'s `branch` to `peer` (the receiver calls the
    /// volume `as_name` if it does not have it yet), with the store to read from.
    ///
    /// # Errors
    /// Unknown volume or branch, a store failing.
    fn outgoing(
        &self,
        peer: NodeId,
        name: &str,
        branch: &str,
        as_name: &str,
    ) -> Result<Outgoing, MeshError>;

    /// The receiver side: checks an offer from `from` against this vault's rules (trust,
    /// names, authors); the store to receive into, or the rule that refuses it.
    ///
    /// # Errors
    /// The refusal, naming the rule (nothing is stored).
    fn accept(&self, from: NodeId, offer: &Offer) -> Result<Arc<dyn SyncStore>, String>;

    /// The receiver side, when the sender says everything is sent: checks that the whole
    /// history is held, publishes it and moves the branch.
    ///
    /// # Errors
    /// Something is missing or does not verify; the store failing.
    fn publish(&self, from: NodeId, offer: &Offer) -> Result<Published, MeshError>;

    /// Keeps a proof (both sides do).
    ///
    /// # Errors
    /// The store failing.
    fn keep_proof(&self, proof: &TransferProof) -> Result<(), MeshError>;

    /// The sync from `from` of the offer with `nonce` ended without a proof (its publish
    /// failed, or it lay idle for [`SESSION_IDLE`]): what the host holds for it goes, and
    /// only for that offer (the sender may have offered anew meanwhile). Called off the
    /// async threads.
    fn end(&self, from: NodeId, nonce: &[u8; 32]) {
        let _ = (from, nonce);
    }

    /// Whether `from` may pull volume `name` (read trust); the rule that refuses it.
    ///
    /// # Errors
    /// The refusal.
    fn may_pull(&self, from: NodeId, name: &str) -> Result<(), String>;

    /// `from` follows volume `name`'s `branch` here from now on (or stops, `on` false):
    /// it must be trusted to read it. The volume's id.
    ///
    /// # Errors
    /// The refusal.
    fn follow(&self, from: NodeId, name: &str, branch: &str, on: bool) -> Result<[u8; 16], String>;

    /// The sync with `peer` moved data: chunks and bytes, sent (true) or received.
    fn count(&self, _peer: NodeId, _sent: bool, _chunks: u64, _bytes: u64) {}
}

/// How a transfer paces itself.
#[derive(Clone)]
pub struct TransferConfig {
    /// The push's pacing.
    pub push: PushConfig,
    /// Deadline of the offer, finish and proof requests.
    pub control_deadline: Duration,
    /// Deadline of a whole pull (the peer pushes meanwhile).
    pub pull_deadline: Duration,
    /// Sync requests a receiver answers at once (1: in order, deterministic).
    pub receive_workers: usize,
    /// Called as data goes out: (chunks, bytes) so far.
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for TransferConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TransferConfig")
            .field("push", &self.push)
            .field("control_deadline", &self.control_deadline)
            .field("pull_deadline", &self.pull_deadline)
            .field("receive_workers", &self.receive_workers)
            .finish_non_exhaustive()
    }
}

impl Default for TransferConfig {
    fn default() -> Self {
        Self {
            push: PushConfig {
                blocking_reads: true,
                ..PushConfig::default()
            },
            control_deadline: Duration::from_secs(120),
            pull_deadline: Duration::from_secs(24 * 3600),
            receive_workers: 4,
            progress: None,
        }
    }
}

async fn ask(
    net: &dyn PeerNet,
    peer: NodeId,
    message: &VolumeMessage,
    deadline: Duration,
) -> Result<VolumeMessage, MeshError> {
    let answer = net
        .request(peer, VOLUME_PROTOCOL, message.encode(), deadline)
        .await?;
    VolumeMessage::decode(&answer)
}

/// [`ask`] for a message that is safe to send twice (an offer only opens a session, a
/// follow sets a flag): sent again when its connection turns out dead.
async fn ask_idempotent(
    net: &dyn PeerNet,
    peer: NodeId,
    message: &VolumeMessage,
    deadline: Duration,
) -> Result<VolumeMessage, MeshError> {
    let answer = request_idempotent(net, peer, VOLUME_PROTOCOL, message.encode(), deadline).await?;
    VolumeMessage::decode(&answer)
}

fn broke_protocol(peer: NodeId, what: impl Into<String>) -> MeshError {
    MeshError::Remote {
        peer,
        protocol: VOLUME_PROTOCOL.name,
        message: what.into(),
    }
}

/// Pushes volume `name`'s `branch` to `peer` (named `as_name` there if new): offer, data,
/// finish, receipt, countersigned proof (kept by both). Rerun after an interruption, it
/// sends nothing the peer already holds.
///
/// # Errors
/// The peer refused (naming its rule), the network failed, a store failed, the peer broke
/// the protocol or its receipt does not check.
pub async fn send_volume(
    net: Arc<dyn PeerNet>,
    host: Arc<dyn VolumeHost>,
    peer: NodeId,
    name: &str,
    branch: &str,
    as_name: &str,
    config: &TransferConfig,
) -> Result<TransferSummary, MeshError> {
    let Outgoing {
        offer,
        store,
        head_chunks,
    } = host.outgoing(peer, name, branch, as_name)?;
    let head_entry = offer
        .head_entry()
        .cloned()
        .ok_or_else(|| MeshError::Local {
            what: "an offer without its head".into(),
        })?;
    let offered = VolumeMessage::Offer(offer.clone());
    let answer = ask_idempotent(&*net, peer, &offered, config.control_deadline).await?;
    match answer {
        VolumeMessage::Accepted => {}
        other => {
            return Err(broke_protocol(
                peer,
                format!("answered an offer with {other:?}"),
            ));
        }
    }
    let (mut chunks_sent, mut bytes_sent, mut head_sent) = (0, 0, 0);
    // Oldest first: an interrupted sync leaves whole older snapshots behind it.
    for entry in &offer.snapshots {
        // Each snapshot's push counts from zero: progress adds what earlier ones sent.
        let (chunks_before, bytes_before) = (chunks_sent, bytes_sent);
        let progress = config.progress.clone().map(|progress| -> ProgressFn {
            Arc::new(move |chunks, bytes| progress(chunks_before + chunks, bytes_before + bytes))
        });
        let report = push_with_progress(
            net.clone(),
            peer,
            store.clone(),
            entry.index_root,
            config.push,
            progress,
        )
        .await?;
        chunks_sent += report.walk.data_sent;
        bytes_sent += report.bytes_sent;
        if entry.id == offer.head {
            head_sent = report.walk.data_sent;
        }
    }
    let commits: Vec<Cid> = offer.snapshots.iter().map(|entry| entry.id).collect();
    let (sent, bytes) = put_objects(&*net, &*store, peer, &commits, &config.push).await?;
    chunks_sent += sent;
    bytes_sent += bytes;
    host.count(peer, true, chunks_sent, bytes_sent);

    let (moved, receiver_branch, receipt, signature, keys) = match ask(
        &*net,
        peer,
        &VolumeMessage::Finish(offer.nonce),
        config.control_deadline,
    )
    .await?
    {
        VolumeMessage::Finished {
            moved,
            branch,
            receipt,
            signature,
            keys,
        } => (moved, branch, receipt, signature, keys),
        other => {
            return Err(broke_protocol(
                peer,
                format!("answered finish with {other:?}"),
            ));
        }
    };
    let receipt = Receipt::decode(&receipt)?;
    let receiver_keys = NodePublicKeys::decode(&keys)
        .map_err(|error| broke_protocol(peer, format!("its keys: {error}")))?;
    let identity = host.identity();
    let expected = (
        offer.volume,
        offer.head,
        head_entry.index_root,
        identity.node_id(),
        peer,
        offer.nonce,
    );
    let got = (
        receipt.volume,
        receipt.snapshot,
        receipt.index_root,
        receipt.sender,
        receipt.receiver,
        receipt.nonce,
    );
    if got != expected {
        return Err(broke_protocol(peer, "its receipt names another transfer"));
    }
    let receiver_signature = Signature::from_bytes(&signature)
        .map_err(|error| broke_protocol(peer, format!("its receipt signature: {error}")))?;
    // Checks the receiver's keys (they must be the peer's) and signature before signing.
    let sender_signature = receipt.countersign(identity, &receiver_keys, &receiver_signature)?;
    let proof = TransferProof {
        receipt,
        receiver_signature,
        sender_signature,
        receiver_keys,
        sender_keys: identity.public_keys().clone(),
    };
    host.keep_proof(&proof)?;
    let encoded = proof.encode();
    match ask(
        &*net,
        peer,
        &VolumeMessage::Proof(encoded.clone()),
        config.control_deadline,
    )
    .await?
    {
        VolumeMessage::Kept => {}
        other => {
            return Err(broke_protocol(
                peer,
                format!("answered the proof with {other:?}"),
            ));
        }
    }
    Ok(TransferSummary {
        moved,
        branch: receiver_branch,
        chunks_sent,
        bytes_sent,
        chunks_skipped: head_chunks.saturating_sub(head_sent),
        proof: encoded,
    })
}

/// Sends the objects in `cids` the peer lacks (snapshot commits: outside any index).
async fn put_objects(
    net: &dyn PeerNet,
    store: &dyn SyncStore,
    peer: NodeId,
    cids: &[Cid],
    config: &PushConfig,
) -> Result<(u64, u64), MeshError> {
    let (mut sent, mut bytes_sent) = (0, 0);
    for batch in cids.chunks(config.batch_items.max(1)) {
        let items: Vec<Item> = batch.iter().map(|cid| Item::Data(*cid)).collect();
        let held = match request_sync(net, peer, &Message::Have(items), config).await? {
            (Message::Held(held), bytes) if held.len() == batch.len() => {
                bytes_sent += bytes;
                held
            }
            (other, _) => {
                return Err(broke_protocol(
                    peer,
                    format!("answered Have with {other:?}"),
                ));
            }
        };
        let mut missing = Vec::new();
        for (cid, held) in batch.iter().zip(held) {
            if !held {
                let (kind, bytes) = store.read(&Item::Data(*cid))?;
                missing.push((*cid, kind, bytes));
            }
        }
        if missing.is_empty() {
            continue;
        }
        let count = missing.len();
        match request_sync(net, peer, &Message::PutData(missing), config).await? {
            (Message::Stored(outcomes), bytes) if outcomes.len() == count => {
                bytes_sent += bytes;
                if outcomes
                    .iter()
                    .any(|outcome| *outcome != PutOutcome::Stored)
                {
                    return Err(broke_protocol(peer, "it did not store a commit sent whole"));
                }
                sent += count as u64;
            }
            (other, _) => {
                return Err(broke_protocol(
                    peer,
                    format!("answered a put with {other:?}"),
                ));
            }
        }
    }
    Ok((sent, bytes_sent))
}

async fn request_sync(
    net: &dyn PeerNet,
    peer: NodeId,
    message: &Message,
    config: &PushConfig,
) -> Result<(Message, u64), MeshError> {
    let body = message.encode();
    let len = body.len() as u64;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match net
            .request(peer, SYNC_PROTOCOL, body.clone(), config.deadline)
            .await
            .and_then(|answer| Message::decode(&answer))
        {
            Ok(answer) => return Ok((answer, len * u64::from(attempt))),
            Err(
                MeshError::Timeout { .. }
                | MeshError::ConnectionLost { .. }
                | MeshError::Busy { .. }
                | MeshError::Local { .. },
            ) if attempt < config.attempts => {
                tokio::time::sleep(Duration::from_millis(50) * attempt).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Asks `peer` to push its volume `name`'s `branch` here (named `as_name` here if new);
/// waits until it has (up to the pull deadline). The push is taken as asked for while
/// this runs (the authors must still be trusted).
///
/// # Errors
/// The peer refused, the network failed, this vault refused the push.
pub async fn pull_volume(
    net: &dyn PeerNet,
    incoming: &Incoming,
    peer: NodeId,
    names: [&str; 3],
    config: &TransferConfig,
) -> Result<TransferSummary, MeshError> {
    let [name, branch, as_name] = names;
    let message = VolumeMessage::Pull {
        name: name.to_owned(),
        branch: branch.to_owned(),
        as_name: as_name.to_owned(),
    };
    incoming.expect_pull(peer, as_name);
    let answer = ask(net, peer, &message, config.pull_deadline).await;
    incoming.pull_ended(peer, as_name);
    match answer? {
        VolumeMessage::Pulled(summary) => Ok(summary),
        other => Err(broke_protocol(
            peer,
            format!("answered a pull with {other:?}"),
        )),
    }
}

/// Asks `peer` to announce its volume `name`'s `branch` to this node from now on (`on`),
/// or to stop; the volume's id.
///
/// # Errors
/// The peer refused (not trusted to read it), the network failed.
pub async fn follow_volume(
    net: &dyn PeerNet,
    peer: NodeId,
    name: &str,
    branch: &str,
    on: bool,
    config: &TransferConfig,
) -> Result<[u8; 16], MeshError> {
    let message = VolumeMessage::Follow {
        on,
        name: name.to_owned(),
        branch: branch.to_owned(),
    };
    match ask_idempotent(net, peer, &message, config.control_deadline).await? {
        VolumeMessage::Following(volume) => Ok(volume),
        other => Err(broke_protocol(
            peer,
            format!("answered a follow with {other:?}"),
        )),
    }
}

/// One sync being received.
struct Session {
    offer: Offer,
    store: Arc<CountingStore>,
    /// The last request of this sync (an offer, a put, a finish).
    touched: tokio::time::Instant,
}

/// A sync session with no request for this long is taken as abandoned (its sender gone)
/// and ends: its claims and a grouped volume's pin would otherwise hold off gc until that
/// sender syncs again. A live sync puts a batch at least every push deadline.
pub const SESSION_IDLE: Duration = Duration::from_secs(300);

/// The receiver's open sessions, by sender: `/forge/sync/1` puts land only in the store of
/// an offer this vault accepted from that very peer.
#[derive(Clone, Default)]
pub struct Incoming {
    sessions: Arc<Mutex<BTreeMap<NodeId, Session>>>,
    /// Pulls this vault asked for: (peer, volume name at the peer) → when asked.
    expected: Arc<Mutex<BTreeMap<(NodeId, String), Instant>>>,
    /// One push at a time to each peer: a receiver keeps one session per sender.
    pushing: Arc<Mutex<BTreeMap<NodeId, Arc<tokio::sync::Mutex<()>>>>>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Incoming").finish_non_exhaustive()
    }
}

impl Incoming {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The store of the session open with `from`, or why there is none.
    ///
    /// # Errors
    /// No session: the rule that refuses the put.
    pub fn store_for(&self, from: &NodeId) -> Result<Arc<dyn SyncStore>, String> {
        self.lock()
            .get_mut(from)
            .map(|session| {
                session.touched = tokio::time::Instant::now();
                session.store.clone() as Arc<dyn SyncStore>
            })
            .ok_or_else(|| {
                format!("no sync from node {from} was accepted here: offer the volume first")
            })
    }

    /// Takes out the session open with `from` if it is the one of the offer with `nonce`
    /// (the sender may have offered anew since): dropped by the caller, outside the lock.
    fn take_session(&self, from: &NodeId, nonce: &[u8; 32]) -> Option<Session> {
        let mut sessions = self.lock();
        if sessions
            .get(from)
            .is_some_and(|session| &session.offer.nonce == nonce)
        {
            sessions.remove(from)
        } else {
            None
        }
    }

    /// Ends the sessions idle for over `idle` (see [`SESSION_IDLE`]) and returns them, to
    /// be dropped off the async threads and outside the lock (their stores' claims may
    /// release through a group).
    fn end_idle(&self, idle: Duration) -> BTreeMap<NodeId, Session> {
        let mut sessions = self.lock();
        let idle_senders: Vec<NodeId> = sessions
            .iter()
            .filter(|(_, session)| session.touched.elapsed() > idle)
            .map(|(sender, _)| *sender)
            .collect();
        idle_senders
            .iter()
            .filter_map(|sender| sessions.remove(sender).map(|session| (*sender, session)))
            .collect()
    }

    /// Waits for this node's turn to push to `peer` and holds it until the guard drops:
    /// the receiver keeps one session per sender, so two pushes to it at once (two
    /// volumes, or a pull it asked for beside a sync) would take each other's place.
    pub async fn push_turn(&self, peer: NodeId) -> tokio::sync::OwnedMutexGuard<()> {
        let turn = self
            .pushing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(peer)
            .or_default()
            .clone();
        turn.lock_owned().await
    }

    /// What the sync being received from `from` has stored so far: (items, bytes); zeros
    /// when none is open (a pull's progress, seen from the receiving side).
    #[must_use]
    pub fn received(&self, from: &NodeId) -> (u64, u64) {
        self.lock().get(from).map_or((0, 0), |session| {
            (
                session
                    .store
                    .chunks
                    .load(std::sync::atomic::Ordering::Relaxed),
                session
                    .store
                    .bytes
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
        })
    }

    /// Notes that this vault asked `peer` for volume `name`: its push of it is taken as
    /// asked for (the authors must still be trusted).
    pub fn expect_pull(&self, peer: NodeId, name: &str) {
        self.expected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((peer, name.to_owned()), Instant::now());
    }

    /// Whether a pull of `name` from `peer` is expected (asked for within a day).
    #[must_use]
    pub fn pull_expected(&self, peer: NodeId, name: &str) -> bool {
        self.expected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(peer, name.to_owned()))
            .is_some_and(|asked| asked.elapsed() < Duration::from_secs(24 * 3600))
    }

    /// The pull of `name` from `peer` ended (done or failed).
    pub fn pull_ended(&self, peer: NodeId, name: &str) {
        self.expected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(peer, name.to_owned()));
    }
}

/// A store that counts what it stored (the receipt's figures).
struct CountingStore {
    inner: Arc<dyn SyncStore>,
    chunks: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
}

impl SyncStore for CountingStore {
    fn holds(&self, cid: &Cid) -> Result<bool, MeshError> {
        self.inner.holds(cid)
    }

    fn read(&self, item: &Item) -> Result<(DataKind, Vec<u8>), MeshError> {
        self.inner.read(item)
    }

    fn store(&self, items: Vec<(Item, DataKind, Vec<u8>)>) -> Result<(), MeshError> {
        let (chunks, bytes) = items.iter().fold((0u64, 0u64), |(chunks, bytes), item| {
            (chunks + 1, bytes + item.2.len() as u64)
        });
        self.inner.store(items)?;
        self.chunks
            .fetch_add(chunks, std::sync::atomic::Ordering::Relaxed);
        self.bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// Serves the volume protocol and the sync protocol on `net` for `host` until the node
/// stops serving (the two loops run as tasks; the handle of each is returned).
///
/// # Errors
/// A protocol already served on this node.
pub fn serve_volumes(
    net: Arc<dyn PeerNet>,
    host: Arc<dyn VolumeHost>,
    incoming: Incoming,
    config: TransferConfig,
) -> Result<[tokio::task::JoinHandle<()>; 2], MeshError> {
    let volumes = net.serve(VOLUME_PROTOCOL)?;
    let sync = net.serve(SYNC_PROTOCOL)?;
    let resolver = incoming.clone();
    let sync_task = tokio::spawn(super::session::serve_sync_resolved(
        sync,
        move |from| resolver.store_for(from),
        config.receive_workers,
    ));
    let volume_task = tokio::spawn(volume_loop(volumes, net, host, incoming, config));
    Ok([volume_task, sync_task])
}

async fn volume_loop(
    mut inbound: Inbound,
    net: Arc<dyn PeerNet>,
    host: Arc<dyn VolumeHost>,
    incoming: Incoming,
    config: TransferConfig,
) {
    let mut idle_check = tokio::time::interval(SESSION_IDLE / 5);
    loop {
        let request = tokio::select! {
            request = inbound.next() => match request {
                Some(request) => request,
                None => break,
            },
            _ = idle_check.tick() => {
                let ended = incoming.end_idle(SESSION_IDLE);
                if !ended.is_empty() {
                    let host = host.clone();
                    let offers: Vec<(NodeId, [u8; 32])> = ended
                        .iter()
                        .map(|(sender, session)| (*sender, session.offer.nonce))
                        .collect();
                    tokio::spawn(crate::blocking::run(move || {
                        drop(ended);
                        for (sender, nonce) in offers {
                            host.end(sender, &nonce);
                        }
                    }));
                }
                continue;
            }
        };
        let Ok(message) = VolumeMessage::decode(&request.body) else {
            // Damaged: dropped, as the network drops a damaged packet; the sender repeats.
            continue;
        };
        match message {
            VolumeMessage::Pull {
                name,
                branch,
                as_name,
            } => {
                // A pull runs a whole push: on its own task, so other requests go on.
                let (net, host, config) = (net.clone(), host.clone(), config.clone());
                let names = [name, branch, as_name];
                let turn = incoming.clone();
                tokio::spawn(async move {
                    let _turn = turn.push_turn(request.from).await;
                    serve_pull(request, net, host, names, config).await;
                });
            }
            message => {
                // Offers and finishes touch the store: off the async threads, unless the
                // receiver answers one request at a time (a deterministic run: no thread
                // may race the runtime).
                let (host, incoming) = (host.clone(), incoming.clone());
                let from = request.from;
                let answered = if config.receive_workers <= 1 {
                    Ok(answer(&*host, &incoming, from, message))
                } else {
                    crate::blocking::run(move || answer(&*host, &incoming, from, message)).await
                };
                match answered {
                    Ok(Ok(reply)) => request.respond(reply.encode()),
                    Ok(Err(Refusal::Rule(rule))) => request.refuse(rule),
                    Ok(Err(Refusal::Failed(error))) => request.fail(error.to_string()),
                    Err(error) => request.fail(format!("the handler failed: {error}")),
                }
            }
        }
    }
}

/// Serves a pull: `names` are the volume's name here, the branch, its name at the puller.
async fn serve_pull(
    request: InboundRequest,
    net: Arc<dyn PeerNet>,
    host: Arc<dyn VolumeHost>,
    names: [String; 3],
    config: TransferConfig,
) {
    let from = request.from;
    let [name, branch, as_name] = names;
    if let Err(rule) = host.may_pull(from, &name) {
        request.refuse(rule);
        return;
    }
    // The whole push in a job off the async tasks: building the offer and reading what
    // it sends is store work, which for a grouped volume may wait on its group (a
    // daemon's async worker would be held for it; the simulator's one thread cannot
    // wait at all).
    let sent = crate::blocking::run_future(async move {
        send_volume(net, host, from, &name, &branch, &as_name, &config).await
    })
    .await;
    match sent {
        Ok(Ok(summary)) => request.respond(VolumeMessage::Pulled(summary).encode()),
        Ok(Err(MeshError::Refused { reason, .. })) => request.refuse(reason),
        Ok(Err(error)) => request.fail(error.to_string()),
        Err(panicked) => request.fail(format!("the push failed: {panicked}")),
    }
}

enum Refusal {
    Rule(String),
    Failed(MeshError),
}

fn answer(
    host: &dyn VolumeHost,
    incoming: &Incoming,
    from: NodeId,
    message: VolumeMessage,
) -> Result<VolumeMessage, Refusal> {
    match message {
        VolumeMessage::Offer(offer) => {
            let store = host.accept(from, &offer).map_err(Refusal::Rule)?;
            // A session this offer replaces ends after the lock is let go: its store's
            // claims may take a while to release (a grouped volume's pin goes through
            // its group), and every put from any sender looks up its session meanwhile
            // (the simulator deadlocked on it, seed 692461257).
            let replaced = incoming.lock().insert(
                from,
                Session {
                    offer,
                    store: Arc::new(CountingStore {
                        inner: store,
                        chunks: 0.into(),
                        bytes: 0.into(),
                    }),
                    touched: tokio::time::Instant::now(),
                },
            );
            drop(replaced);
            Ok(VolumeMessage::Accepted)
        }
        VolumeMessage::Finish(nonce) => {
            let (offer, store) = {
                let sessions = incoming.lock();
                let session = sessions
                    .get(&from)
                    .filter(|session| session.offer.nonce == nonce)
                    .ok_or_else(|| {
                        Refusal::Rule(format!("no sync from node {from} with this nonce is open"))
                    })?;
                (session.offer.clone(), session.store.clone())
            };
            let published = match host.publish(from, &offer) {
                Ok(published) => published,
                Err(error) => {
                    // Nothing of it went live: the session ends here (its claims and a
                    // grouped volume's pin would otherwise hold off gc until this sender
                    // syncs again; a retry offers anew).
                    drop(incoming.take_session(&from, &nonce));
                    host.end(from, &nonce);
                    return Err(Refusal::Failed(error));
                }
            };
            let head = offer.head_entry().ok_or_else(|| {
                Refusal::Failed(MeshError::Local {
                    what: "an accepted offer without its head".into(),
                })
            })?;
            let identity = host.identity();
            let receipt = Receipt {
                volume: offer.volume,
                snapshot: offer.head,
                index_root: head.index_root,
                chunks: store.chunks.load(std::sync::atomic::Ordering::Relaxed),
                bytes: store.bytes.load(std::sync::atomic::Ordering::Relaxed),
                sender: from,
                receiver: identity.node_id(),
                time_ns: host.now_ns(),
                nonce,
            };
            host.count(from, false, receipt.chunks, receipt.bytes);
            let signature = receipt
                .sign_as_receiver(identity)
                .map_err(Refusal::Failed)?;
            Ok(VolumeMessage::Finished {
                moved: published.moved,
                branch: published.branch,
                receipt: receipt.encode(),
                signature: signature.as_bytes().to_vec(),
                keys: identity.public_keys().encode(),
            })
        }
        VolumeMessage::Proof(bytes) => {
            let proof = TransferProof::decode_verified(&bytes).map_err(Refusal::Failed)?;
            let mine = host.identity().node_id();
            let open = incoming
                .lock()
                .get(&from)
                .is_some_and(|session| session.offer.nonce == proof.receipt.nonce);
            if proof.receipt.sender != from || proof.receipt.receiver != mine || !open {
                return Err(Refusal::Rule(
                    "a proof of a transfer that is not this one".into(),
                ));
            }
            host.keep_proof(&proof).map_err(Refusal::Failed)?;
            // The sync is over: its claims on the store go with the session (released
            // after the lock is let go, as above).
            drop(incoming.take_session(&from, &proof.receipt.nonce));
            Ok(VolumeMessage::Kept)
        }
        VolumeMessage::Follow { on, name, branch } => host
            .follow(from, &name, &branch, on)
            .map(VolumeMessage::Following)
            .map_err(Refusal::Rule),
        VolumeMessage::Pull { .. }
        | VolumeMessage::Following(_)
        | VolumeMessage::Accepted
        | VolumeMessage::Finished { .. }
        | VolumeMessage::Kept
        | VolumeMessage::Pulled(_) => Err(Refusal::Rule("not a request".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_messages_round_trip_and_refuse_damage() {
        let messages = [
            VolumeMessage::Finish([4; 32]),
            VolumeMessage::Proof(vec![1, 2, 3]),
            VolumeMessage::Pull {
                name: "photos".into(),
                branch: "main".into(),
                as_name: "pictures".into(),
            },
            VolumeMessage::Accepted,
            VolumeMessage::Finished {
                moved: RefMove::Diverged,
                branch: "main-from-x".into(),
                receipt: vec![9; 10],
                signature: vec![8; 4],
                keys: vec![7; 3],
            },
            VolumeMessage::Kept,
            VolumeMessage::Follow {
                on: true,
                name: "photos".into(),
                branch: "main".into(),
            },
            VolumeMessage::Following([6; 16]),
            VolumeMessage::Pulled(TransferSummary {
                moved: RefMove::FastForward,
                branch: "main".into(),
                chunks_sent: 3,
                bytes_sent: 4,
                chunks_skipped: 5,
                proof: vec![6; 7],
            }),
        ];
        for message in messages {
            let bytes = message.encode();
            assert_eq!(VolumeMessage::decode(&bytes).unwrap(), message);
            for at in 0..bytes.len() {
                let mut damaged = bytes.clone();
                damaged[at] ^= 0x10;
                assert!(VolumeMessage::decode(&damaged).is_err(), "byte {at}");
            }
            assert!(VolumeMessage::decode(&bytes[..bytes.len() - 1]).is_err());
        }
    }
}
