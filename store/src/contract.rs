//! Volume contracts: the policy a volume's owner signs (DESIGN.md, "Trust, seals,
//! behaviour"). What workloads may run on the volume, what they may do to it, until when,
//! and the thresholds of the behaviour detector that watches its writes.
//!
//! The contract is signed by a node (ML-DSA-65, domain `Contract`) over its encoding;
//! whether that node may sign for the volume (write rights) is the vault's decision, not
//! the format's. Both encodings are versioned, `"FK" | version | kind | postcard`, and the
//! decoder checks every field's range, so a stored or received contract that decodes is
//! one this code can act on.

use serde::{Deserialize, Serialize};

use crate::object::ObjectError;

/// The contract encoding's version.
pub const CONTRACT_FORMAT_VERSION: u8 = 1;
const MAGIC: &[u8; 2] = b"FK";
const KIND_CONTRACT: u8 = b'c';
const KIND_SIGNED: u8 = b's';

/// At most this many allowed workloads in one contract.
pub const WORKLOADS_MAX: usize = 256;
/// At most this many bytes of a volume name carried for display.
pub const NAME_BYTES_MAX: usize = 255;
/// A signed contract is never larger than this (an ML-DSA-65 signature is 3,309 bytes).
pub const SIGNED_CONTRACT_BYTES_MAX: usize = 64 * 1024;

/// What a mount or workload may do to the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessMode {
    /// Only read: read-write mounts and runs are refused.
    ReadOnly,
    /// Read and write.
    ReadWrite,
    /// Add, never take away: new files and appends, no overwrite, truncate, delete or
    /// rename over an existing name.
    AppendOnly,
}

impl AccessMode {
    /// The name the CLI and `contract show` use.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::ReadOnly => "ro",
            Self::ReadWrite => "rw",
            Self::AppendOnly => "append",
        }
    }

    /// Parses [`Self::name`]'s output (and the long forms).
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "ro" | "read-only" => Some(Self::ReadOnly),
            "rw" | "read-write" => Some(Self::ReadWrite),
            "append" | "append-only" => Some(Self::AppendOnly),
            _ => None,
        }
    }
}

/// A workload a contract allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Workload {
    /// A person at a plain `forge volume mount`.
    Interactive,
    /// A program run by `forge run`: BLAKE3 over its manifest file and executable.
    Digest([u8; 32]),
}

/// The name of the interactive workload.
pub const INTERACTIVE: &str = "interactive";

impl Workload {
    /// `interactive` or the digest as 64 lower-case hex characters.
    #[must_use]
    pub fn text(&self) -> String {
        match self {
            Self::Interactive => INTERACTIVE.to_owned(),
            Self::Digest(digest) => data_encoding::HEXLOWER.encode(digest),
        }
    }

    /// Parses [`Self::text`]'s output (hex in either case).
    ///
    /// # Errors
    /// A reason naming what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == INTERACTIVE {
            return Ok(Self::Interactive);
        }
        let digest = data_encoding::HEXLOWER_PERMISSIVE
            .decode(text.as_bytes())
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or_else(|| {
                format!(
                    "{text:?} is neither `{INTERACTIVE}` nor a workload digest (64 hex characters)"
                )
            })?;
        Ok(Self::Digest(digest))
    }
}

/// The behaviour detector's thresholds (documented defaults in [`Default`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DetectorThresholds {
    /// A written block at or above this Shannon entropy (bits per byte, 0–8) counts as
    /// high-entropy (encrypted or compressed).
    pub max_entropy_bits: f32,
    /// A high-entropy block is suspicious when it replaces content at least this many
    /// bits per byte lower (an already-compressed file rewritten is not).
    pub entropy_rise_bits: f32,
    /// This many files with suspicious rewrites (or deleted after a high-entropy copy)
    /// within `window_seconds` trip the detector.
    pub suspicious_files: u32,
    /// The window the suspicious files are counted in.
    pub window_seconds: u32,
    /// Overwrites, renames and deletes at this many times their running (EWMA) rate, while
    /// suspicious rewrites happen, trip it too.
    pub rate_factor: f32,
}

impl Default for DetectorThresholds {
    fn default() -> Self {
        Self {
            max_entropy_bits: 7.2,
            entropy_rise_bits: 1.5,
            suspicious_files: 4,
            window_seconds: 120,
            rate_factor: 8.0,
        }
    }
}

/// A volume's contract: what is signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeContract {
    /// The volume it governs.
    pub volume: [u8; 16],
    /// The volume's name where the contract was made (for display; the id decides).
    pub volume_name: String,
    /// The workloads allowed (sorted, unique); empty: any workload.
    pub workloads: Vec<Workload>,
    /// What mounts and workloads may do.
    pub mode: AccessMode,
    /// When it stops being valid, ns since the epoch (None: never).
    pub expires_ns: Option<i64>,
    /// The behaviour detector's thresholds.
    pub detector: DetectorThresholds,
    /// The node that signs it.
    pub signer: [u8; 32],
    /// When it was made, ns since the epoch (a newer contract replaces an older one).
    pub created_ns: i64,
}

/// A contract with its ML-DSA-65 signature (domain `Contract`) over the contract's
/// encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedContract {
    /// The encoded [`VolumeContract`] (the exact bytes signed).
    pub contract: Vec<u8>,
    /// The signature.
    pub signature: Vec<u8>,
}

fn malformed(reason: impl Into<String>) -> ObjectError {
    ObjectError::Malformed {
        reason: reason.into(),
    }
}

fn header(bytes: &[u8], kind: u8, what: &str) -> Result<(), ObjectError> {
    if bytes.len() < 4 || &bytes[..2] != MAGIC {
        return Err(malformed(format!("not a {what} (no contract header)")));
    }
    if bytes[2] != CONTRACT_FORMAT_VERSION {
        return Err(malformed(format!(
            "a {what} of format {}; this forge reads format {CONTRACT_FORMAT_VERSION}",
            bytes[2]
        )));
    }
    if bytes[3] != kind {
        return Err(malformed(format!("not a {what} (kind {})", bytes[3])));
    }
    Ok(())
}

fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ObjectError> {
    let (value, rest) = postcard::take_from_bytes(bytes)
        .map_err(|error| malformed(format!("contract body: {error}")))?;
    if !rest.is_empty() {
        return Err(malformed(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

impl VolumeContract {
    /// The bytes that are signed: `"FK" | version | 'c' | postcard(contract)`.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![MAGIC[0], MAGIC[1], CONTRACT_FORMAT_VERSION, KIND_CONTRACT];
        bytes.extend_from_slice(
            &postcard::to_stdvec(self).expect("contracts serialize with postcard"),
        );
        bytes
    }

    /// Decodes [`Self::encode`]'s output and checks every field.
    ///
    /// # Errors
    /// [`ObjectError::Malformed`] naming what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, ObjectError> {
        header(bytes, KIND_CONTRACT, "contract")?;
        let contract: Self = body(&bytes[4..])?;
        contract.validate()?;
        // One encoding per contract (postcard also reads overlong varints): what was signed
        // is exactly what this code re-encodes and verifies.
        if contract.encode() != bytes {
            return Err(malformed("contract not in its canonical encoding"));
        }
        Ok(contract)
    }

    /// Checks what the types cannot say: sorted unique workloads, bounded sizes, and
    /// thresholds in their ranges.
    ///
    /// # Errors
    /// [`ObjectError::Malformed`] naming the field.
    pub fn validate(&self) -> Result<(), ObjectError> {
        if self.volume_name.len() > NAME_BYTES_MAX {
            return Err(malformed("volume name too long"));
        }
        if self.workloads.len() > WORKLOADS_MAX {
            return Err(malformed(format!(
                "{} workloads (at most {WORKLOADS_MAX})",
                self.workloads.len()
            )));
        }
        if self.workloads.windows(2).any(|pair| pair[0] >= pair[1]) {
            return Err(malformed("workloads not sorted and unique"));
        }
        let detector = &self.detector;
        let bits = |value: f32| value.is_finite() && (0.0..=8.0).contains(&value);
        if !bits(detector.max_entropy_bits) || detector.max_entropy_bits < 1.0 {
            return Err(malformed(format!(
                "entropy bound {} is not between 1 and 8 bits per byte",
                detector.max_entropy_bits
            )));
        }
        if !bits(detector.entropy_rise_bits) {
            return Err(malformed(format!(
                "entropy rise {} is not between 0 and 8 bits per byte",
                detector.entropy_rise_bits
            )));
        }
        if detector.suspicious_files == 0 || detector.suspicious_files > 1_000_000 {
            return Err(malformed(format!(
                "suspicious files {} is not between 1 and 1000000",
                detector.suspicious_files
            )));
        }
        if detector.window_seconds == 0 || detector.window_seconds > 7 * 86_400 {
            return Err(malformed(format!(
                "detector window {} s is not between 1 s and a week",
                detector.window_seconds
            )));
        }
        if !detector.rate_factor.is_finite() || !(1.0..=1e6).contains(&detector.rate_factor) {
            return Err(malformed(format!(
                "rate factor {} is not between 1 and 1000000",
                detector.rate_factor
            )));
        }
        Ok(())
    }

    /// Whether `workload` may run on the volume.
    #[must_use]
    pub fn allows(&self, workload: &Workload) -> bool {
        self.workloads.is_empty() || self.workloads.contains(workload)
    }

    /// Whether it has expired at `now_ns`.
    #[must_use]
    pub fn expired_at(&self, now_ns: i64) -> bool {
        self.expires_ns.is_some_and(|expires| now_ns >= expires)
    }
}

impl SignedContract {
    /// `"FK" | version | 's' | postcard(signed contract)`.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![MAGIC[0], MAGIC[1], CONTRACT_FORMAT_VERSION, KIND_SIGNED];
        bytes.extend_from_slice(
            &postcard::to_stdvec(self).expect("signed contracts serialize with postcard"),
        );
        bytes
    }

    /// Decodes [`Self::encode`]'s output; the contract inside must decode too. The
    /// signature is not checked here (that needs the signer's keys).
    ///
    /// # Errors
    /// [`ObjectError::Malformed`] naming what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<(Self, VolumeContract), ObjectError> {
        if bytes.len() > SIGNED_CONTRACT_BYTES_MAX {
            return Err(malformed(format!(
                "a signed contract of {} bytes (at most {SIGNED_CONTRACT_BYTES_MAX})",
                bytes.len()
            )));
        }
        header(bytes, KIND_SIGNED, "signed contract")?;
        let signed: Self = body(&bytes[4..])?;
        let contract = VolumeContract::decode(&signed.contract)?;
        if signed.encode() != bytes {
            return Err(malformed("signed contract not in its canonical encoding"));
        }
        Ok((signed, contract))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> VolumeContract {
        VolumeContract {
            volume: [7; 16],
            volume_name: "photos".into(),
            workloads: vec![Workload::Interactive, Workload::Digest([3; 32])],
            mode: AccessMode::AppendOnly,
            expires_ns: Some(1_900_000_000_000_000_000),
            detector: DetectorThresholds::default(),
            signer: [9; 32],
            created_ns: 1_800_000_000_000_000_000,
        }
    }

    #[test]
    fn contracts_round_trip_and_refuse_garbage() {
        let contract = sample();
        let bytes = contract.encode();
        assert_eq!(VolumeContract::decode(&bytes).unwrap(), contract);
        let signed = SignedContract {
            contract: bytes.clone(),
            signature: vec![1; 3309],
        };
        let (decoded, inner) = SignedContract::decode(&signed.encode()).unwrap();
        assert_eq!((decoded, inner), (signed.clone(), contract.clone()));
        // Another version, another kind, a trailing byte, a truncation: refused, naming it.
        let mut other_version = bytes.clone();
        other_version[2] = 2;
        assert!(
            VolumeContract::decode(&other_version)
                .unwrap_err()
                .to_string()
                .contains("format 2")
        );
        assert!(VolumeContract::decode(&signed.encode()).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(
            VolumeContract::decode(&trailing)
                .unwrap_err()
                .to_string()
                .contains("trailing")
        );
        assert!(VolumeContract::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn fields_out_of_range_are_refused() {
        type Change = Box<dyn Fn(&mut VolumeContract)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|c| c.workloads = vec![Workload::Digest([1; 32]), Workload::Interactive]),
                "sorted",
            ),
            (
                Box::new(|c| c.workloads = vec![Workload::Interactive, Workload::Interactive]),
                "unique",
            ),
            (
                Box::new(|c| c.detector.max_entropy_bits = 9.0),
                "entropy bound",
            ),
            (
                Box::new(|c| c.detector.max_entropy_bits = f32::NAN),
                "entropy bound",
            ),
            (
                Box::new(|c| c.detector.suspicious_files = 0),
                "suspicious files",
            ),
            (Box::new(|c| c.detector.window_seconds = 0), "window"),
            (Box::new(|c| c.detector.rate_factor = 0.5), "rate factor"),
            (Box::new(|c| c.volume_name = "x".repeat(300)), "name"),
        ];
        for (change, needle) in cases {
            let mut contract = sample();
            change(&mut contract);
            let error = VolumeContract::decode(&contract.encode()).unwrap_err();
            assert!(error.to_string().contains(needle), "{error} lacks {needle}");
        }
    }

    #[test]
    fn workloads_parse_and_print() {
        assert_eq!(
            Workload::parse("interactive").unwrap(),
            Workload::Interactive
        );
        let digest = Workload::Digest([0xab; 32]);
        assert_eq!(Workload::parse(&digest.text()).unwrap(), digest);
        assert_eq!(
            Workload::parse(&digest.text().to_uppercase()).unwrap(),
            digest
        );
        assert!(Workload::parse("abc").unwrap_err().contains("64 hex"));
        let contract = sample();
        assert!(contract.allows(&Workload::Interactive));
        assert!(!contract.allows(&Workload::Digest([4; 32])));
        let open = VolumeContract {
            workloads: Vec::new(),
            ..sample()
        };
        assert!(open.allows(&Workload::Digest([4; 32])));
        assert!(contract.expired_at(1_900_000_000_000_000_000));
        assert!(!contract.expired_at(1_899_999_999_999_999_999));
    }

    proptest! {
        #[test]
        fn any_valid_contract_round_trips(
            volume in any::<[u8; 16]>(),
            name in "[a-z0-9._-]{0,40}",
            digests in proptest::collection::btree_set(any::<[u8; 32]>(), 0..8),
            interactive in any::<bool>(),
            mode in 0u8..3,
            expires in proptest::option::of(any::<i64>()),
            entropy in 1.0f32..=8.0,
            files in 1u32..1000,
        ) {
            let mut workloads: Vec<Workload> = digests.into_iter().map(Workload::Digest).collect();
            if interactive {
                workloads.insert(0, Workload::Interactive);
            }
            let contract = VolumeContract {
                volume,
                volume_name: name,
                workloads,
                mode: [AccessMode::ReadOnly, AccessMode::ReadWrite, AccessMode::AppendOnly][usize::from(mode)],
                expires_ns: expires,
                detector: DetectorThresholds { max_entropy_bits: entropy, suspicious_files: files, ..DetectorThresholds::default() },
                signer: [1; 32],
                created_ns: 5,
            };
            prop_assert_eq!(VolumeContract::decode(&contract.encode()).unwrap(), contract);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = VolumeContract::decode(&bytes);
            let _ = SignedContract::decode(&bytes);
            let mut framed = b"FK\x01c".to_vec();
            framed.extend_from_slice(&bytes);
            let _ = VolumeContract::decode(&framed);
        }
    }
}
