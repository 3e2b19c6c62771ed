//! Who is on the other end of a connection. The transport (libp2p) authenticates a
//! transport key (ed25519); a node's identity is its ML-DSA-65 key. A **certificate** binds
//! the two (signed in the Certificate domain by the node's key), and a **Hello**, sent
//! right after connecting, carries the certificate and signs both sides' transport
//! identities and a nonce the *receiver* chose, so a recorded Hello cannot be replayed on
//! another connection. The NodeId is computed from the certificate's public keys, never
//! taken from the wire.
//!
//! Sans-IO: [`Handshake`] consumes and produces bytes; the driver moves them.
//!
//! ```text
//! certificate = "FGCT" | version:u8=1 | keys_len:u32le | NodePublicKeys
//!               | transport_len:u16le | transport identity | issued_at_ns:i64le
//!               | signature (ML-DSA-65, Certificate domain, over everything before it)
//! hello       = "FGHL" | version:u8=1 | cert_len:u32le | certificate | signature
//! hello signs   "FGHL" | version | BLAKE3(certificate) | len:u16le | sender's transport id
//!               | len:u16le | receiver's transport id | receiver's nonce[32]
//! ```

use forge_crypto::{NodeId, NodeIdentity, NodePublicKeys, Signature, SignatureDomain};

use crate::bytes::Reader;
use crate::net::MeshError;

/// Version of the certificate and Hello encodings.
pub const HELLO_FORMAT_VERSION: u8 = 1;
const CERTIFICATE_MAGIC: &[u8; 4] = b"FGCT";
const HELLO_MAGIC: &[u8; 4] = b"FGHL";
/// Transport identities are short (a libp2p PeerId is 38 bytes for ed25519).
const TRANSPORT_ID_BYTES_MAX: usize = 256;

fn refused(reason: impl Into<String>) -> MeshError {
    MeshError::Handshake {
        reason: reason.into(),
    }
}

fn push_short(bytes: &mut Vec<u8>, field: &[u8]) -> Result<(), MeshError> {
    let length = u16::try_from(field.len())
        .ok()
        .filter(|_| field.len() <= TRANSPORT_ID_BYTES_MAX)
        .ok_or_else(|| refused("a transport identity is too long"))?;
    bytes.extend_from_slice(&length.to_le_bytes());
    bytes.extend_from_slice(field);
    Ok(())
}

/// A node's certificate for its transport identity.
#[derive(Debug, Clone)]
pub struct Certificate {
    /// The node's public keys (its NodeId is their hash).
    pub node_keys: NodePublicKeys,
    /// The transport identity this node uses (libp2p: its PeerId's bytes).
    pub transport_id: Vec<u8>,
    /// When it was issued (ns since the epoch; informative).
    pub issued_at_ns: i64,
    signature: Signature,
}

impl Certificate {
    fn signed_part(
        node_keys: &NodePublicKeys,
        transport_id: &[u8],
        issued_at_ns: i64,
    ) -> Result<Vec<u8>, MeshError> {
        let keys = node_keys.encode();
        let mut bytes = Vec::with_capacity(keys.len() + transport_id.len() + 32);
        bytes.extend_from_slice(CERTIFICATE_MAGIC);
        bytes.push(HELLO_FORMAT_VERSION);
        let keys_len = u32::try_from(keys.len()).map_err(|_| refused("keys too long"))?;
        bytes.extend_from_slice(&keys_len.to_le_bytes());
        bytes.extend_from_slice(&keys);
        push_short(&mut bytes, transport_id)?;
        bytes.extend_from_slice(&issued_at_ns.to_le_bytes());
        Ok(bytes)
    }

    /// Issues this node's certificate for `transport_id`.
    ///
    /// # Errors
    /// An over-long transport identity; the OS RNG failing.
    pub fn issue(
        identity: &NodeIdentity,
        transport_id: &[u8],
        issued_at_ns: i64,
    ) -> Result<Self, MeshError> {
        let message = Self::signed_part(identity.public_keys(), transport_id, issued_at_ns)?;
        let signature = identity
            .sign(SignatureDomain::Certificate, &message)
            .map_err(|error| refused(format!("signing the certificate: {error}")))?;
        Ok(Self {
            node_keys: identity.public_keys().clone(),
            transport_id: transport_id.to_vec(),
            issued_at_ns,
            signature,
        })
    }

    /// The node it certifies (computed from its keys).
    #[must_use]
    pub fn node_id(&self) -> NodeId {
        self.node_keys.node_id()
    }

    /// The versioned encoding.
    ///
    /// # Errors
    /// Only for a certificate that could not have been issued (over-long fields).
    pub fn encode(&self) -> Result<Vec<u8>, MeshError> {
        let mut bytes = Self::signed_part(&self.node_keys, &self.transport_id, self.issued_at_ns)?;
        bytes.extend_from_slice(self.signature.as_bytes());
        Ok(bytes)
    }

    /// Decodes a certificate and checks its signature against the keys it carries.
    ///
    /// # Errors
    /// [`MeshError::Handshake`] naming what is wrong.
    pub fn decode_verified(bytes: &[u8]) -> Result<Self, MeshError> {
        let mut reader = Reader::new(bytes, |reason| {
            refused(format!("the certificate: {reason}"))
        });
        reader.header(CERTIFICATE_MAGIC, HELLO_FORMAT_VERSION)?;
        let keys_len = reader.u32_len()?;
        let node_keys = NodePublicKeys::decode(reader.take(keys_len)?)
            .map_err(|error| refused(format!("the certificate's keys: {error}")))?;
        let transport_len = reader.u16_len()?;
        if transport_len > TRANSPORT_ID_BYTES_MAX {
            return Err(refused("the certificate's transport identity is too long"));
        }
        let transport_id = reader.take(transport_len)?.to_vec();
        let issued_at_ns = reader.i64()?;
        let signed_len = bytes.len() - reader.remaining();
        let signature = Signature::from_bytes(reader.take(Signature::BYTES)?)
            .map_err(|error| refused(format!("the certificate's signature: {error}")))?;
        reader.end()?;
        node_keys
            .verify(
                SignatureDomain::Certificate,
                &bytes[..signed_len],
                &signature,
            )
            .map_err(|_| {
                refused(format!(
                    "the certificate of node {} is not signed by that node's key",
                    node_keys.node_id()
                ))
            })?;
        Ok(Self {
            node_keys,
            transport_id,
            issued_at_ns,
            signature,
        })
    }
}

/// What a verified Hello proves: the peer's node and keys, bound to this connection.
#[derive(Debug, Clone)]
pub struct VerifiedPeer {
    /// BLAKE3 of the peer's ML-DSA public key.
    pub node_id: NodeId,
    /// Its public keys (for verifying what it signs, wrapping keys to it).
    pub node_keys: NodePublicKeys,
}

fn hello_message(
    certificate: &[u8],
    sender_transport: &[u8],
    receiver_transport: &[u8],
    receiver_nonce: &[u8; 32],
) -> Result<Vec<u8>, MeshError> {
    let mut message = Vec::with_capacity(128);
    message.extend_from_slice(HELLO_MAGIC);
    message.push(HELLO_FORMAT_VERSION);
    message.extend_from_slice(blake3::hash(certificate).as_bytes());
    push_short(&mut message, sender_transport)?;
    push_short(&mut message, receiver_transport)?;
    message.extend_from_slice(receiver_nonce);
    Ok(message)
}

/// One side of the Hello exchange on one connection.
///
/// Each side sends [`Handshake::challenge`] (its nonce), answers the other's challenge with
/// [`Handshake::hello`], and checks the other's Hello with [`Handshake::verify`]. Until that
/// succeeds the connection carries nothing else.
#[derive(Debug)]
pub struct Handshake {
    certificate: Vec<u8>,
    local_transport: Vec<u8>,
    remote_transport: Vec<u8>,
    nonce: [u8; 32],
}

impl Handshake {
    /// A handshake on a connection from `local_transport` to `remote_transport` (the
    /// identities the transport authenticated), with a fresh `nonce`.
    ///
    /// # Errors
    /// A certificate for another transport identity than `local_transport`.
    pub fn new(
        certificate: &Certificate,
        local_transport: &[u8],
        remote_transport: &[u8],
        nonce: [u8; 32],
    ) -> Result<Self, MeshError> {
        if certificate.transport_id != local_transport {
            return Err(refused(
                "this node's certificate is for another transport identity",
            ));
        }
        Ok(Self {
            certificate: certificate.encode()?,
            local_transport: local_transport.to_vec(),
            remote_transport: remote_transport.to_vec(),
            nonce,
        })
    }

    /// The challenge to send: this side's nonce.
    #[must_use]
    pub fn challenge(&self) -> [u8; 32] {
        self.nonce
    }

    /// This side's Hello, answering the other side's challenge.
    ///
    /// # Errors
    /// The OS RNG failing while signing.
    pub fn hello(
        &self,
        identity: &NodeIdentity,
        remote_nonce: &[u8; 32],
    ) -> Result<Vec<u8>, MeshError> {
        let message = hello_message(
            &self.certificate,
            &self.local_transport,
            &self.remote_transport,
            remote_nonce,
        )?;
        let signature = identity
            .sign(SignatureDomain::Certificate, &message)
            .map_err(|error| refused(format!("signing the hello: {error}")))?;
        let mut bytes = Vec::with_capacity(self.certificate.len() + Signature::BYTES + 9);
        bytes.extend_from_slice(HELLO_MAGIC);
        bytes.push(HELLO_FORMAT_VERSION);
        let length = u32::try_from(self.certificate.len()).map_err(|_| refused("cert length"))?;
        bytes.extend_from_slice(&length.to_le_bytes());
        bytes.extend_from_slice(&self.certificate);
        bytes.extend_from_slice(signature.as_bytes());
        Ok(bytes)
    }

    /// Checks the other side's Hello: its certificate, that it certifies the transport
    /// identity this connection authenticated, and its signature over both identities and
    /// *this side's* nonce.
    ///
    /// # Errors
    /// [`MeshError::Handshake`] naming what failed.
    pub fn verify(&self, hello: &[u8]) -> Result<VerifiedPeer, MeshError> {
        let mut reader = Reader::new(hello, |reason| refused(format!("the hello: {reason}")));
        reader.header(HELLO_MAGIC, HELLO_FORMAT_VERSION)?;
        let certificate_len = reader.u32_len()?;
        let certificate_bytes = reader.take(certificate_len)?;
        let certificate = Certificate::decode_verified(certificate_bytes)?;
        let signature = Signature::from_bytes(reader.take(Signature::BYTES)?)
            .map_err(|error| refused(format!("the hello's signature: {error}")))?;
        reader.end()?;
        let node_id = certificate.node_id();
        if certificate.transport_id != self.remote_transport {
            return Err(refused(format!(
                "node {node_id}'s certificate is for another transport identity than this \
                 connection's"
            )));
        }
        let message = hello_message(
            certificate_bytes,
            &self.remote_transport,
            &self.local_transport,
            &self.nonce,
        )?;
        certificate
            .node_keys
            .verify(SignatureDomain::Certificate, &message, &signature)
            .map_err(|_| {
                refused(format!(
                    "the hello of node {node_id} does not sign this connection's challenge \
                     (a replayed or forged hello)"
                ))
            })?;
        Ok(VerifiedPeer {
            node_id,
            node_keys: certificate.node_keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use forge_crypto::NodeSecrets;

    use super::*;

    fn identity(byte: u8) -> NodeIdentity {
        NodeIdentity::from_secrets(&NodeSecrets::from_seed_bytes([byte; 128]))
    }

    /// Both sides of a connection between transport identities "peer-a" and "peer-b".
    fn sides(a: &NodeIdentity, b: &NodeIdentity) -> (Handshake, Handshake) {
        let cert_a = Certificate::issue(a, b"peer-a", 1).expect("issue");
        let cert_b = Certificate::issue(b, b"peer-b", 1).expect("issue");
        (
            Handshake::new(&cert_a, b"peer-a", b"peer-b", [1; 32]).expect("a"),
            Handshake::new(&cert_b, b"peer-b", b"peer-a", [2; 32]).expect("b"),
        )
    }

    #[test]
    fn both_sides_learn_the_other_nodes_id_from_its_keys() {
        let (a, b) = (identity(1), identity(2));
        let (side_a, side_b) = sides(&a, &b);
        let hello_a = side_a.hello(&a, &side_b.challenge()).expect("hello");
        let hello_b = side_b.hello(&b, &side_a.challenge()).expect("hello");
        assert_eq!(
            side_b.verify(&hello_a).expect("a verified").node_id,
            a.node_id()
        );
        assert_eq!(
            side_a.verify(&hello_b).expect("b verified").node_id,
            b.node_id()
        );
    }

    #[test]
    fn a_replayed_hello_is_refused_on_a_new_connection() {
        let (a, b) = (identity(1), identity(2));
        let (side_a, side_b) = sides(&a, &b);
        let recorded = side_a.hello(&a, &side_b.challenge()).expect("hello");
        assert!(side_b.verify(&recorded).is_ok());
        // The same two transports connect again: b picks a new nonce.
        let cert_b = Certificate::issue(&b, b"peer-b", 2).expect("issue");
        let again = Handshake::new(&cert_b, b"peer-b", b"peer-a", [3; 32]).expect("b");
        let error = again.verify(&recorded).expect_err("replayed");
        assert!(error.to_string().contains("replayed"), "{error}");
    }

    #[test]
    fn a_forged_certificate_or_one_for_another_transport_is_refused() {
        let (a, b, mallory) = (identity(1), identity(2), identity(3));
        let (_, side_b) = sides(&a, &b);
        // Mallory claims a's keys but signs with her own: the certificate does not verify.
        let mut forged = Certificate::issue(&mallory, b"peer-a", 1).expect("issue");
        forged.node_keys = a.public_keys().clone();
        let handshake = Handshake::new(&forged, b"peer-a", b"peer-b", [9; 32]).expect("m");
        let hello = handshake
            .hello(&mallory, &side_b.challenge())
            .expect("hello");
        let error = side_b.verify(&hello).expect_err("forged");
        assert!(error.to_string().contains("not signed by"), "{error}");
        // Mallory's own valid certificate, presented on a's transport identity: refused.
        let own = Certificate::issue(&mallory, b"peer-m", 1).expect("issue");
        let handshake = Handshake::new(&own, b"peer-m", b"peer-b", [9; 32]).expect("m");
        let hello = handshake
            .hello(&mallory, &side_b.challenge())
            .expect("hello");
        let error = side_b.verify(&hello).expect_err("other transport");
        assert!(error.to_string().contains("another transport"), "{error}");
    }

    #[test]
    fn every_flipped_byte_of_a_hello_is_refused() {
        let (a, b) = (identity(1), identity(2));
        let (side_a, side_b) = sides(&a, &b);
        let hello = side_a.hello(&a, &side_b.challenge()).expect("hello");
        // Every 97th byte (the whole sweep verifies ~2,000 signatures: minutes unoptimised).
        for at in (0..hello.len()).step_by(97).chain([hello.len() - 1]) {
            let mut bad = hello.clone();
            bad[at] ^= 0x01;
            assert!(
                side_b.verify(&bad).is_err(),
                "byte {at} flipped was accepted"
            );
        }
        assert!(side_b.verify(&hello[..hello.len() - 1]).is_err());
        assert!(side_b.verify(&[hello.as_slice(), &[0]].concat()).is_err());
    }
}
