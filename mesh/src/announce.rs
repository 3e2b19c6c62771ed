//! Announcements of new snapshot heads: a vault that commits to a followed branch tells its
//! followers, who then pull. An announcement is signed by the node that announces (the
//! head's author, or a vault serving the volume onward) in the Announcement domain, so a
//! follower acts only on heads announced by a node it trusts (the one it follows);
//! it rides `PeerNet::publish` on the volume's topic ([`topic`]), so the in-process network
//! and the simulator carry it like anything else (gossipsub is the libp2p
//! implementation's transport for it).
//!
//! ```text
//! announcement = "FGAN" | version:u8=1 | volume[16] | branch_len:u8 | branch
//!                | head[32] | index_root[32] | author[32] | sequence:u64le | time_ns:i64le
//!                | signature (ML-DSA-65, Announcement domain, over everything before it)
//! ```
//! `sequence` grows with each announcement of a (volume, branch) by its author: a follower
//! ignores one not newer than the last it acted on (a replay, or a late duplicate). An
//! author takes it from its wall clock but never lets it go back ([`SequenceClock`]):
//! a clock set back, or a restart, would otherwise silence it until the clock caught up.

use forge_crypto::{Cid, NodeId, NodeIdentity, NodePublicKeys, Signature, SignatureDomain};

use crate::bytes::Reader;
use crate::net::{MeshError, PeerNet, Subscription};

/// Version of the announcement encoding.
pub const ANNOUNCEMENT_FORMAT_VERSION: u8 = 1;
const MAGIC: &[u8; 4] = b"FGAN";

fn invalid(reason: impl Into<String>) -> MeshError {
    MeshError::InvalidAnnouncement {
        reason: reason.into(),
    }
}

/// A new head of a branch, as its author signs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The volume (its VolumeId's bytes).
    pub volume: [u8; 16],
    /// The branch that moved.
    pub branch: String,
    /// Its new head (a snapshot commit).
    pub head: Cid,
    /// The head's reference-index root.
    pub index_root: Cid,
    /// Who made the head (and signs).
    pub author: NodeId,
    /// Grows with each announcement of this branch by this author.
    pub sequence: u64,
    /// When it was made (ns since the epoch).
    pub time_ns: i64,
}

impl Announcement {
    fn signed_part(&self) -> Result<Vec<u8>, MeshError> {
        let branch_len =
            u8::try_from(self.branch.len()).map_err(|_| invalid("a branch name over 255 bytes"))?;
        let mut bytes = Vec::with_capacity(4 + 1 + 16 + 1 + self.branch.len() + 32 * 3 + 16);
        bytes.extend_from_slice(MAGIC);
        bytes.push(ANNOUNCEMENT_FORMAT_VERSION);
        bytes.extend_from_slice(&self.volume);
        bytes.push(branch_len);
        bytes.extend_from_slice(self.branch.as_bytes());
        bytes.extend_from_slice(self.head.as_bytes());
        bytes.extend_from_slice(self.index_root.as_bytes());
        bytes.extend_from_slice(self.author.as_bytes());
        bytes.extend_from_slice(&self.sequence.to_le_bytes());
        bytes.extend_from_slice(&self.time_ns.to_le_bytes());
        Ok(bytes)
    }

    /// The signed announcement's bytes.
    ///
    /// # Errors
    /// `identity` is not the author; an over-long branch name; the OS RNG failing.
    pub fn sign(&self, identity: &NodeIdentity) -> Result<Vec<u8>, MeshError> {
        if identity.node_id() != self.author {
            return Err(invalid("only the head's author announces it"));
        }
        let mut bytes = self.signed_part()?;
        let signature = identity
            .sign(SignatureDomain::Announcement, &bytes)
            .map_err(|error| invalid(format!("signing: {error}")))?;
        bytes.extend_from_slice(signature.as_bytes());
        Ok(bytes)
    }

    /// Decodes an announcement and checks it was signed by `author_keys`, whose NodeId
    /// must be the author it names.
    ///
    /// # Errors
    /// Garbage, another version, another author's keys, a signature that does not verify.
    pub fn decode_verified(bytes: &[u8], author_keys: &NodePublicKeys) -> Result<Self, MeshError> {
        if bytes.len() < MAGIC.len() + 1 + 16 + 1 + 32 * 3 + 16 + Signature::BYTES
            || &bytes[..4] != MAGIC
        {
            return Err(invalid("not an announcement"));
        }
        let mut reader = Reader::new(bytes, invalid);
        reader.header(MAGIC, ANNOUNCEMENT_FORMAT_VERSION)?;
        let volume = reader.array16()?;
        let branch_len = usize::from(reader.u8()?);
        let branch = std::str::from_utf8(reader.take(branch_len)?)
            .map_err(|_| invalid("a branch name that is not UTF-8"))?
            .to_owned();
        let head = Cid::from_bytes(reader.array32()?);
        let index_root = Cid::from_bytes(reader.array32()?);
        let author = NodeId::from_bytes(reader.array32()?);
        let sequence = reader.u64()?;
        let time_ns = reader.i64()?;
        let signed_len = bytes.len() - reader.remaining();
        let signature = Signature::from_bytes(reader.take(Signature::BYTES)?)
            .map_err(|error| invalid(error.to_string()))?;
        reader.end()?;
        if author_keys.node_id() != author {
            return Err(invalid(format!(
                "signed for author {author}, checked with the keys of {}",
                author_keys.node_id()
            )));
        }
        author_keys
            .verify(
                SignatureDomain::Announcement,
                &bytes[..signed_len],
                &signature,
            )
            .map_err(|_| invalid(format!("the signature of {author} does not verify")))?;
        Ok(Self {
            volume,
            branch,
            head,
            index_root,
            author,
            sequence,
            time_ns,
        })
    }

    /// The author a signed announcement names, read without checking (to find the keys
    /// to check it with).
    #[must_use]
    pub fn claimed_author(bytes: &[u8]) -> Option<NodeId> {
        let branch_len = usize::from(*bytes.get(21)?);
        let at = 22 + branch_len + 64;
        let mut array = [0u8; 32];
        array.copy_from_slice(bytes.get(at..at + 32)?);
        Some(NodeId::from_bytes(array))
    }
}

/// The topic a volume's heads are announced on.
#[must_use]
pub fn topic(volume: &[u8; 16]) -> String {
    let hex: String = volume.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("/forge/heads/1/{hex}")
}

/// Publishes a signed announcement of a head of `volume` to its followers (gossip: best
/// effort; the announcer publishes again while it matters, a follower pulls on
/// reconnect).
///
/// # Errors
/// No follower reachable now.
pub async fn announce(
    net: &dyn PeerNet,
    volume: &[u8; 16],
    signed: &[u8],
) -> Result<(), MeshError> {
    if signed.len() > ANNOUNCE_BYTES_MAX {
        return Err(MeshError::TooLarge {
            protocol: "gossip",
            what: "announcement",
            bytes: signed.len(),
            limit: ANNOUNCE_BYTES_MAX,
        });
    }
    net.publish(&topic(volume), signed.to_vec()).await
}

/// An author's announcement sequences: its wall clock in nanoseconds, but always more
/// than any sequence it gave before, also after its clock was set back and across
/// restarts. Sans-IO: sequences are reserved ahead in blocks of [`SEQUENCE_RESERVATION_NS`]
/// through a callback that persists the new floor, so a restart resumes above anything
/// given out, at one write per block rather than one per announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceClock {
    /// The last sequence given out.
    last: u64,
    /// Sequences up to here are reserved (persisted): one above needs a new reservation.
    reserved: u64,
}

/// How far ahead an author reserves its sequences: an hour of its clock.
pub const SEQUENCE_RESERVATION_NS: u64 = 3_600 * 1_000_000_000;

impl SequenceClock {
    /// Resumes from the floor persisted last (0 for an author that never announced).
    #[must_use]
    pub fn resume(floor: u64) -> Self {
        Self {
            last: floor,
            reserved: floor,
        }
    }

    /// The next sequence at wall time `now_ns`. When it passes the reservation, `persist`
    /// is called with the new floor first; if that fails, no sequence is given (the
    /// error is returned) and the next call tries again.
    ///
    /// # Errors
    /// What `persist` returned.
    pub fn next<E>(
        &mut self,
        now_ns: i64,
        persist: impl FnOnce(u64) -> Result<(), E>,
    ) -> Result<u64, E> {
        let sequence = u64::try_from(now_ns)
            .unwrap_or(0)
            .max(self.last.saturating_add(1));
        if sequence > self.reserved {
            let floor = sequence.saturating_add(SEQUENCE_RESERVATION_NS);
            persist(floor)?;
            self.reserved = floor;
        }
        self.last = sequence;
        debug_assert!(
            self.last <= self.reserved,
            "a sequence given out unreserved"
        );
        Ok(sequence)
    }
}

/// The largest announcement (a branch name is at most 255 bytes).
pub const ANNOUNCE_BYTES_MAX: usize = 8 << 10;

/// What a follower made of one announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// Verified, newer: delivered.
    Delivered,
    /// Not newer than the last taken for its branch and author (a replay, a repeat).
    Stale,
    /// Not from a trusted author, or not verifying: why.
    Refused(String),
}

/// The announcements a follower has taken: each one whose author `keys_of` knows (a
/// trusted author's keys), whose signature verifies and whose sequence is newer than the
/// last taken for its (volume, branch, author). Sans-IO: [`serve_announcements`] feeds it.
#[derive(Debug, Default)]
pub struct Follower {
    newest: std::collections::BTreeMap<([u8; 16], String, NodeId), u64>,
}

impl Follower {
    /// Takes one announcement's bytes.
    pub fn take(
        &mut self,
        bytes: &[u8],
        keys_of: impl Fn(&NodeId) -> Option<NodePublicKeys>,
    ) -> (Taken, Option<Announcement>) {
        let Some(author) = Announcement::claimed_author(bytes) else {
            return (Taken::Refused("not an announcement".into()), None);
        };
        let Some(keys) = keys_of(&author) else {
            return (
                Taken::Refused(format!("author {author} is not trusted here")),
                None,
            );
        };
        match Announcement::decode_verified(bytes, &keys) {
            Ok(announcement) => {
                let key = (announcement.volume, announcement.branch.clone(), author);
                if self
                    .newest
                    .get(&key)
                    .is_some_and(|last| *last >= announcement.sequence)
                {
                    return (Taken::Stale, None);
                }
                self.newest.insert(key, announcement.sequence);
                (Taken::Delivered, Some(announcement))
            }
            Err(error) => (Taken::Refused(error.to_string()), None),
        }
    }
}

/// Receives the announcements published on `subscription` until it ends: each one a
/// [`Follower`] takes goes to `deliver`.
pub async fn serve_announcements(
    mut subscription: Subscription,
    keys_of: impl Fn(&NodeId) -> Option<NodePublicKeys>,
    mut deliver: impl FnMut(Announcement),
) {
    let mut follower = Follower::default();
    while let Some(gossip) = subscription.next().await {
        if let (Taken::Delivered, Some(announcement)) = follower.take(&gossip.message, &keys_of) {
            deliver(announcement);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use forge_crypto::NodeSecrets;

    use super::*;
    use crate::memory::MemoryNetwork;

    fn identity(byte: u8) -> NodeIdentity {
        NodeIdentity::from_secrets(&NodeSecrets::from_seed_bytes([byte; 128]))
    }

    fn head(author: &NodeIdentity, sequence: u64) -> Announcement {
        Announcement {
            volume: [4; 16],
            branch: "main".into(),
            head: Cid::of(&sequence.to_le_bytes()),
            index_root: Cid::of(b"index"),
            author: author.node_id(),
            sequence,
            time_ns: 1_780_000_000_000_000_000,
        }
    }

    #[test]
    fn an_announcement_verifies_with_its_authors_keys_only_and_every_byte_counts() {
        let (author, other) = (identity(1), identity(2));
        let signed = head(&author, 7).sign(&author).expect("sign");
        let verified = Announcement::decode_verified(&signed, author.public_keys()).expect("valid");
        assert_eq!(verified, head(&author, 7));
        assert_eq!(
            Announcement::claimed_author(&signed),
            Some(author.node_id())
        );
        assert!(Announcement::decode_verified(&signed, other.public_keys()).is_err());
        assert!(
            head(&author, 7).sign(&other).is_err(),
            "only the author signs"
        );
        for at in 0..signed.len() {
            let mut tampered = signed.clone();
            tampered[at] ^= 0x01;
            assert!(
                Announcement::decode_verified(&tampered, author.public_keys()).is_err(),
                "byte {at} flipped: still valid"
            );
        }
    }

    #[test]
    fn sequences_grow_across_a_clock_set_back_and_a_restart() {
        let mut persisted = 0;
        let mut clock = SequenceClock::resume(persisted);
        let persist = |floor: u64, persisted: &mut u64| -> Result<(), ()> {
            *persisted = floor;
            Ok(())
        };
        let first = clock
            .next(5_000, |floor| persist(floor, &mut persisted))
            .unwrap();
        assert_eq!(first, 5_000, "the wall clock while it moves forward");
        assert_eq!(persisted, 5_000 + SEQUENCE_RESERVATION_NS);
        // The clock set back an hour, then a restart with the clock further back still.
        let second = clock
            .next(-3, |floor| persist(floor, &mut persisted))
            .unwrap();
        assert!(second > first);
        let mut restarted = SequenceClock::resume(persisted);
        let third = restarted
            .next(1, |floor| persist(floor, &mut persisted))
            .unwrap();
        assert!(third > second, "{third} after a restart, {second} before");
        // A reservation that cannot be persisted gives no sequence, and is tried again.
        let late: u64 = 10 * SEQUENCE_RESERVATION_NS;
        let late_ns = i64::try_from(late).unwrap();
        assert_eq!(
            restarted.next(late_ns, |_| Err("disk full")),
            Err("disk full")
        );
        let fourth = restarted
            .next(late_ns, |floor| persist(floor, &mut persisted))
            .unwrap();
        assert_eq!((fourth, persisted), (late, late + SEQUENCE_RESERVATION_NS));
    }

    #[tokio::test(start_paused = true)]
    async fn followers_take_newer_heads_of_trusted_authors_across_a_healed_partition() {
        let network = MemoryNetwork::new(9);
        let (author, stranger) = (identity(1), identity(3));
        let announcer = network.join(author.node_id());
        let follower_id = identity(2).node_id();
        let follower = network.join(follower_id);
        let taken = Arc::new(Mutex::new(Vec::new()));
        let sink = taken.clone();
        let trusted = author.public_keys().clone();
        let trusted_id = author.node_id();
        let volume = [4; 16];
        // Nobody follows yet: nobody to tell.
        let first = head(&author, 1).sign(&author).unwrap();
        assert!(announce(&*announcer, &volume, &first).await.is_err());
        tokio::spawn(serve_announcements(
            follower.subscribe(&topic(&volume)).expect("subscribe"),
            move |id| (*id == trusted_id).then(|| trusted.clone()),
            move |announcement| sink.lock().unwrap().push(announcement.sequence),
        ));
        announce(&*announcer, &volume, &first).await.unwrap();
        // Partitioned: not delivered, and the announcer hears so (it publishes again).
        network.partition(&[author.node_id()], &[follower_id]);
        let later = head(&author, 2).sign(&author).unwrap();
        assert!(announce(&*announcer, &volume, &later).await.is_err());
        network.heal();
        announce(&*announcer, &volume, &later).await.unwrap();
        // A replay of the first is stale; an untrusted author's is refused.
        announce(&*announcer, &volume, &first).await.unwrap();
        let stranger_net = network.join(stranger.node_id());
        let forged = head(&stranger, 9).sign(&stranger).unwrap();
        announce(&*stranger_net, &volume, &forged).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert_eq!(*taken.lock().unwrap(), vec![1, 2]);
        let mut alone = Follower::default();
        let keys = author.public_keys().clone();
        let known = |id: &NodeId| (*id == author.node_id()).then(|| keys.clone());
        assert_eq!(alone.take(&later, known).0, Taken::Delivered);
        assert_eq!(alone.take(&later, known).0, Taken::Stale);
        assert!(
            matches!(alone.take(&forged, known).0, Taken::Refused(reason) if reason.contains("not trusted"))
        );
        assert!(matches!(alone.take(b"junk", known).0, Taken::Refused(_)));
    }
}
