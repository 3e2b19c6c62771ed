//! Where a group's Raft state lives in the `KvEngine`, and how values are encoded.
//!
//! Many groups share one engine, each under its own 8-byte group prefix:
//! - `RaftLog`: group ‖ index (8 bytes, big-endian) → entry
//! - `RaftState`: one byte naming the record ‖ group (‖ record key):
//!   `v` vote, `c` committed log id, `p` last purged log id, `a` last applied log id and
//!   membership, `s` the current state-machine snapshot, `r` ‖ space ‖ 0 ‖ key a record.
//!
//! Every value is a format byte then postcard; a value with another format byte, or that
//! does not decode, is an error naming the key, never a default.

use std::io;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::types::GroupId;

/// The format byte of every value this crate stores or sends.
pub const FORMAT: u8 = 1;

/// Encodes a value: the format byte, then postcard.
///
/// # Errors
/// A value postcard cannot encode (none of ours).
pub fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let mut bytes = vec![FORMAT];
    let body = postcard::to_allocvec(value)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// Decodes what [`encode`] wrote; `what` names it in the error.
///
/// # Errors
/// Another format, or bytes that do not decode.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> io::Result<T> {
    match bytes.split_first() {
        Some((&FORMAT, body)) => {
            let (value, rest) = postcard::take_from_bytes(body).map_err(|error| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{what} does not decode: {error}"),
                )
            })?;
            if rest.is_empty() {
                Ok(value)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{what} has {} bytes of garbage after it", rest.len()),
                ))
            }
        }
        Some((format, _)) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} has unknown format {format} (written by a newer forge?)"),
        )),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} is empty"),
        )),
    }
}

/// The key of log entry `index` of `group`.
#[must_use]
pub fn log_key(group: GroupId, index: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&group.to_be_bytes());
    key[8..].copy_from_slice(&index.to_be_bytes());
    key
}

/// The end (exclusive) of `group`'s log keys.
#[must_use]
pub fn log_end(group: GroupId) -> Vec<u8> {
    // Group ids stop below u64::MAX (checked when a group is created), so group + 1 is
    // the next group's first key.
    group.saturating_add(1).to_be_bytes().to_vec()
}

/// The log index in a log key.
///
/// # Errors
/// A key that is not 16 bytes.
pub fn index_of(key: &[u8]) -> io::Result<u64> {
    let bytes: [u8; 8] = key
        .get(8..16)
        .and_then(|slice| slice.try_into().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a log key is not 16 bytes"))?;
    Ok(u64::from_be_bytes(bytes))
}

/// A state key: `kind` ‖ group.
#[must_use]
pub fn state_key(kind: u8, group: GroupId) -> Vec<u8> {
    let mut key = vec![kind];
    key.extend_from_slice(&group.to_be_bytes());
    key
}

/// The vote.
pub const VOTE: u8 = b'v';
/// The committed log id.
pub const COMMITTED: u8 = b'c';
/// The last purged log id.
pub const PURGED: u8 = b'p';
/// The last applied log id and membership.
pub const APPLIED: u8 = b'a';
/// The current snapshot.
pub const SNAPSHOT: u8 = b's';
/// Records.
pub const RECORD: u8 = b'r';

/// The key of record `key` of `space` in `group`.
#[must_use]
pub fn record_key(group: GroupId, space: &str, key: &[u8]) -> Vec<u8> {
    let mut bytes = state_key(RECORD, group);
    bytes.extend_from_slice(space.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(key);
    bytes
}

/// The first key of every record of `group` (all spaces).
#[must_use]
pub fn records_start(group: GroupId) -> Vec<u8> {
    state_key(RECORD, group)
}

/// The end (exclusive) of `group`'s records.
#[must_use]
pub fn records_end(group: GroupId) -> Vec<u8> {
    let mut key = vec![RECORD];
    key.extend_from_slice(&group.saturating_add(1).to_be_bytes());
    key
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn values_round_trip_and_garbage_is_refused() {
        let value = (7u64, "seven".to_owned());
        let bytes = encode(&value).unwrap();
        assert_eq!(decode::<(u64, String)>(&bytes, "x").unwrap(), value);
        assert!(decode::<(u64, String)>(&[], "x").is_err());
        assert!(decode::<(u64, String)>(&[2, 1, 2], "x").is_err());
        assert!(decode::<(u64, String)>(&bytes[..bytes.len() - 1], "x").is_err());
        let trailing = [bytes.as_slice(), &[0]].concat();
        assert!(
            decode::<(u64, String)>(&trailing, "x").is_err(),
            "trailing garbage"
        );
    }

    #[test]
    fn groups_keep_to_their_own_key_ranges() {
        assert!(log_key(3, u64::MAX).as_slice() < log_end(3).as_slice());
        assert!(log_end(3).as_slice() <= log_key(4, 0).as_slice());
        assert!(record_key(3, "zzz", &[0xff; 40]) < records_end(3));
        assert!(records_start(4) >= records_end(3));
        assert_eq!(index_of(&log_key(9, 42)).unwrap(), 42);
    }
}
