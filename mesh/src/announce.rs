//! Announcements of new snapshot heads: a vault that commits to a followed branch tells its
//! followers, who then pull. An announcement is signed by the head's author in the
//! Announcement domain, so a follower acts only on heads a trusted author really made;
//! it rides `PeerNet` (`/forge/announce/1`), so the in-process network and the simulator
//! carry it like any other request (gossipsub is the libp2p implementation's business).
//!
//! ```text
//! announcement = "FGAN" | version:u8=1 | volume[16] | branch_len:u8 | branch
//!                | head[32] | index_root[32] | author[32] | sequence:u64le | time_ns:i64le
//!                | signature (ML-DSA-65, Announcement domain, over everything before it)
//! ```
//! `sequence` grows with each announcement of a (volume, branch) by its author: a follower
//! ignores one not newer than the last it acted on (a replay, or a late duplicate).

use std::time::Duration;

use forge_crypto::{Cid, NodeId, NodeIdentity, NodePublicKeys, Signature, SignatureDomain};

use crate::bytes::Reader;
use crate::net::{Inbound, MeshError, PeerNet, Protocol};

/// Version of the announcement encoding.
pub const ANNOUNCEMENT_FORMAT_VERSION: u8 = 1;
const MAGIC: &[u8; 4] = b"FGAN";

/// The announcement protocol: small messages, a short queue.
pub const ANNOUNCE_PROTOCOL: Protocol = Protocol {
    name: "/forge/announce/1",
    max_request_bytes: 8 << 10,
    max_response_bytes: 64,
    inbound_queue: 64,
};

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

/// Sends a signed announcement to each of `followers`; the ones that did not take it (to
/// try again on reconnect).
pub async fn announce(
    net: &dyn PeerNet,
    followers: &[NodeId],
    signed: &[u8],
    deadline: Duration,
) -> Vec<(NodeId, MeshError)> {
    let mut failed = Vec::new();
    for follower in followers {
        if let Err(error) = net
            .request(*follower, ANNOUNCE_PROTOCOL, signed.to_vec(), deadline)
            .await
        {
            failed.push((*follower, error));
        }
    }
    failed
}

/// Receives announcements on `inbound` until the node stops serving: each one whose author
/// `keys_of` knows (a trusted author's keys), whose signature verifies, and whose sequence
/// is newer than the last taken for its (volume, branch, author) goes to `deliver`; the
/// sender hears "taken" or why not.
pub async fn serve_announcements(
    mut inbound: Inbound,
    keys_of: impl Fn(&NodeId) -> Option<NodePublicKeys>,
    mut deliver: impl FnMut(Announcement),
) {
    let mut newest: std::collections::BTreeMap<([u8; 16], String, NodeId), u64> =
        std::collections::BTreeMap::new();
    while let Some(request) = inbound.next().await {
        let Some(author) = Announcement::claimed_author(&request.body) else {
            request.refuse("not an announcement");
            continue;
        };
        let Some(keys) = keys_of(&author) else {
            request.refuse(format!("author {author} is not trusted here"));
            continue;
        };
        match Announcement::decode_verified(&request.body, &keys) {
            Ok(announcement) => {
                let key = (announcement.volume, announcement.branch.clone(), author);
                if newest
                    .get(&key)
                    .is_some_and(|last| *last >= announcement.sequence)
                {
                    request.respond(b"stale".to_vec());
                    continue;
                }
                newest.insert(key, announcement.sequence);
                request.respond(b"taken".to_vec());
                deliver(announcement);
            }
            Err(error) => request.refuse(error.to_string()),
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
        tokio::spawn(serve_announcements(
            follower.serve(ANNOUNCE_PROTOCOL).expect("serve"),
            move |id| (*id == trusted_id).then(|| trusted.clone()),
            move |announcement| sink.lock().unwrap().push(announcement.sequence),
        ));
        let second = Duration::from_secs(1);
        let first = head(&author, 1).sign(&author).unwrap();
        assert!(
            announce(&*announcer, &[follower_id], &first, second)
                .await
                .is_empty()
        );
        // Partitioned: not taken, and the announcer knows whom to tell again.
        network.partition(&[author.node_id()], &[follower_id]);
        let later = head(&author, 2).sign(&author).unwrap();
        let failed = announce(&*announcer, &[follower_id], &later, second).await;
        assert_eq!(failed.len(), 1);
        network.heal();
        assert!(
            announce(&*announcer, &[follower_id], &later, second)
                .await
                .is_empty()
        );
        // A replay of the first is stale; an untrusted author is refused.
        assert!(
            announce(&*announcer, &[follower_id], &first, second)
                .await
                .is_empty()
        );
        let stranger_net = network.join(stranger.node_id());
        let forged = head(&stranger, 9).sign(&stranger).unwrap();
        let refused = announce(&*stranger_net, &[follower_id], &forged, second).await;
        assert!(
            matches!(&refused[..], [(_, MeshError::Refused { reason, .. })] if reason.contains("not trusted")),
            "{refused:?}"
        );
        assert_eq!(*taken.lock().unwrap(), vec![1, 2]);
    }
}
