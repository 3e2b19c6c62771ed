//! Zero-trust volumes (DESIGN.md, "Trust, seals, behaviour"): a volume's signed contract,
//! its seal, and its anomaly flags, as records of the volume (in its group's Raft state
//! when it is in a group, so every member sees the same), and the checks made of them:
//! before every mount ([`Vault::check_mount`]) and by `forge volume trust-check`.
//!
//! Records (keys start with the volume id, so a group's members mirror them):
//! - `contracts`: volume → the attached contract ([`AttachedContract`]);
//! - `contract-history`: volume ‖ attach time → every contract attached, in order;
//! - `seals`: volume → the signed seal ([`SignedSeal`]);
//! - `anomalies`: volume ‖ flag time → an [`AnomalyFlag`] (frozen while one is unresolved).
//!
//! A contract travels as a TOML file a person can read before signing
//! ([`ContractFile`]); what is signed is the canonical binary encoding of the fields
//! (`forge_store::contract`), so formatting the file differently never breaks a signature,
//! and changing any field does.

use std::collections::{BTreeMap, BTreeSet};

use forge_crypto::{Cid, NodeId, Signature, SignatureDomain};
use forge_store::VolumeId;
use forge_store::contract::{
    AccessMode, DetectorThresholds, SignedContract, VolumeContract, Workload,
};
use forge_store::metadata::{Change, Expected, RecordSpace, RecordUpdate};
use serde::{Deserialize, Serialize};

use super::records::{self, VolumeRecord};
use super::{PassphraseSource, Vault};
use crate::clock::{format_utc_time, parse_utc_time};
use crate::error::{NodeError, Result};

/// The attached contract of each volume.
pub const CONTRACTS: RecordSpace = RecordSpace::new("contracts");
/// Every contract attached to a volume, by attach time.
pub const CONTRACT_HISTORY: RecordSpace = RecordSpace::new("contract-history");
/// The seal of each sealed volume.
pub const SEALS: RecordSpace = RecordSpace::new("seals");
/// The behaviour detector's flags, by volume and time (the history, resolved or not).
pub const ANOMALIES: RecordSpace = RecordSpace::new("anomalies");
/// Each frozen volume's first unresolved flag: one key per volume, so a mount's check
/// reads it linearizably through a group (a scan of the mirror may lag).
pub const FREEZES: RecordSpace = RecordSpace::new("freezes");

/// The behaviour detector's learned rate of destructive operations per volume (this
/// node's: what its mounts saw), kept from one mount to the next.
pub const DETECTOR_BASELINES: RecordSpace = RecordSpace::new("detector-baselines");
/// The version byte of a detector baseline record.
const DETECTOR_BASELINE_FORMAT: u8 = 1;

/// The DNA key naming the workload that made a snapshot (a digest, or `interactive`).
pub const DNA_WORKLOAD: &str = "workload";

/// A detector baseline record: its version, then the rate (f64, little-endian), finite
/// and not negative.
fn decode_baseline(value: &[u8]) -> Option<f64> {
    let (&version, rate) = value.split_first()?;
    let rate = f64::from_le_bytes(rate.try_into().ok()?);
    (version == DETECTOR_BASELINE_FORMAT && rate.is_finite() && rate >= 0.0).then_some(rate)
}

/// The version written in a contract file's `format` field.
pub const CONTRACT_FILE_FORMAT: u8 = 1;

/// A contract as attached to a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedContract {
    /// The [`SignedContract`] encoding.
    pub signed: Vec<u8>,
    /// When it was attached, ns since the epoch.
    pub attached_ns: i64,
    /// The node that attached it.
    pub attached_by: [u8; 32],
}

/// What a seal states: the volume's branch stood at `head` when its workload detached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    /// The volume.
    pub volume: [u8; 16],
    /// The branch the workload wrote.
    pub branch: String,
    /// Its head then (None: the branch was empty).
    pub head: Option<[u8; 32]>,
    /// When, ns since the epoch.
    pub sealed_ns: i64,
    /// The node that sealed it (and signs the seal).
    pub node: [u8; 32],
    /// Why (what detached).
    pub reason: String,
}

/// A seal with its signature (domain `Seal`) over the seal's encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedSeal {
    /// `records::encode` of the [`Seal`].
    pub seal: Vec<u8>,
    /// The signature.
    pub signature: Vec<u8>,
}

/// A behaviour-detector flag: the volume is frozen while one is unresolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnomalyFlag {
    /// What tripped (`entropy-burst`, `rename-burst`, ...).
    pub kind: String,
    /// The evidence, for a person to review.
    pub evidence: String,
    /// When, ns since the epoch.
    pub flagged_ns: i64,
    /// The node whose mount saw it.
    pub node: [u8; 32],
    /// The branch holding the state before the suspicious writes.
    pub quarantine_branch: Option<String>,
    /// When `forge volume unfreeze` resolved it.
    pub resolved_ns: Option<i64>,
}

/// What a mount (or a run) asks of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountIntent<'a> {
    /// Whether it writes.
    pub read_only: bool,
    /// The workload (`interactive` for a plain mount).
    pub workload: &'a Workload,
}

/// What the contract lets a mount do once the checks passed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MountPolicy {
    /// Committed bytes are never changed or removed (append-only contract).
    pub append_only: bool,
    /// The detector's thresholds (the contract's, or the defaults).
    pub detector: DetectorThresholds,
}

/// One line of a trust-check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustCheckItem {
    /// The check's name (`signatures`, `contract`, `dna`, `seal`, `anomalies`).
    pub check: &'static str,
    /// Whether it passed.
    pub passed: bool,
    /// What was found.
    pub detail: String,
}

/// A trust-check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustReport {
    /// The volume.
    pub volume: String,
    /// Every check, in order.
    pub checks: Vec<TrustCheckItem>,
    /// Whether the check lifted a seal.
    pub unsealed: bool,
}

impl TrustReport {
    /// The first failed check.
    #[must_use]
    pub fn first_failure(&self) -> Option<&TrustCheckItem> {
        self.checks.iter().find(|item| !item.passed)
    }
}

/// The contract file a person reads, signs and attaches (TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractFile {
    /// [`CONTRACT_FILE_FORMAT`].
    pub format: u8,
    /// The volume's name where the contract was made.
    pub volume: String,
    /// The volume's id (hex): what the contract binds.
    pub volume_id: String,
    /// `ro`, `rw` or `append`.
    pub mode: String,
    /// Allowed workloads: digests (hex) or `interactive`; empty allows any.
    pub workloads: Vec<String>,
    /// `YYYY-MM-DDTHH:MM:SSZ`, or absent: never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// When it was made, ns since the epoch.
    pub created_ns: i64,
    /// The signing node (hex); set by `forge contract sign`.
    pub signer: String,
    /// The ML-DSA-65 signature (base64), absent until signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// The behaviour detector's thresholds.
    pub detector: DetectorFile,
}

/// The detector's thresholds as the file writes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorFile {
    /// Bits per byte at or above which a written block is high-entropy.
    pub max_entropy_bits: f64,
    /// How much higher than what it replaces a block must be to be suspicious.
    pub entropy_rise_bits: f64,
    /// Suspicious files within the window that freeze the volume.
    pub suspicious_files: u32,
    /// The window, in seconds.
    pub window_seconds: u32,
    /// Overwrite/rename/delete rate over its running average that counts as a burst.
    pub rate_factor: f64,
}

// An f32 through its shortest decimal form, so the file shows 7.2, not 7.199999809.
fn wide(value: f32) -> f64 {
    value.to_string().parse().unwrap_or(f64::from(value))
}

#[allow(clippy::cast_possible_truncation)]
fn narrow(value: f64) -> f32 {
    value as f32
}

const FILE_HEADER: &str = "# A Forge Vault volume contract. Review it, then `forge contract sign FILE` and\n\
# `forge contract attach VOLUME FILE`. Any change after signing voids the signature.\n";

impl ContractFile {
    /// The file for `contract`, with its signature if signed.
    #[must_use]
    pub fn new(contract: &VolumeContract, signature: Option<&[u8]>) -> Self {
        let detector = &contract.detector;
        Self {
            format: CONTRACT_FILE_FORMAT,
            volume: contract.volume_name.clone(),
            volume_id: VolumeId::from_bytes(contract.volume).to_string(),
            mode: contract.mode.name().to_owned(),
            workloads: contract.workloads.iter().map(Workload::text).collect(),
            expires: contract.expires_ns.map(format_utc_time),
            created_ns: contract.created_ns,
            signer: NodeId::from_bytes(contract.signer).to_hex(),
            signature: signature.map(|signature| data_encoding::BASE64.encode(signature)),
            detector: DetectorFile {
                max_entropy_bits: wide(detector.max_entropy_bits),
                entropy_rise_bits: wide(detector.entropy_rise_bits),
                suspicious_files: detector.suspicious_files,
                window_seconds: detector.window_seconds,
                rate_factor: wide(detector.rate_factor),
            },
        }
    }

    /// The TOML text.
    ///
    /// # Errors
    /// None in practice (every field serializes).
    pub fn to_text(&self) -> Result<String> {
        let body = toml::to_string(self).map_err(|error| NodeError::InvalidArgument {
            what: "contract",
            value: self.volume.clone(),
            reason: error.to_string(),
        })?;
        Ok(format!("{FILE_HEADER}{body}"))
    }

    /// Parses a contract file.
    ///
    /// # Errors
    /// [`NodeError::InvalidArgument`] naming the field.
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = |reason: String| NodeError::InvalidArgument {
            what: "contract file",
            value: String::new(),
            reason,
        };
        let file: Self = toml::from_str(text).map_err(|error| invalid(error.to_string()))?;
        if file.format != CONTRACT_FILE_FORMAT {
            return Err(invalid(format!(
                "format {}; this forge reads format {CONTRACT_FILE_FORMAT}",
                file.format
            )));
        }
        Ok(file)
    }

    /// The contract it describes and its signature, if any.
    ///
    /// # Errors
    /// [`NodeError::InvalidArgument`] naming the field that is wrong.
    pub fn contract(&self) -> Result<(VolumeContract, Option<Vec<u8>>)> {
        let invalid = |reason: String| NodeError::InvalidArgument {
            what: "contract file",
            value: self.volume.clone(),
            reason,
        };
        let volume = self
            .volume_id
            .parse::<VolumeId>()
            .map_err(|error| invalid(format!("volume_id: {error}")))?;
        let mode = AccessMode::parse(&self.mode)
            .ok_or_else(|| invalid(format!("mode {:?}: write ro, rw or append", self.mode)))?;
        let mut workloads = self
            .workloads
            .iter()
            .map(|text| Workload::parse(text).map_err(&invalid))
            .collect::<Result<Vec<_>>>()?;
        workloads.sort();
        workloads.dedup();
        let expires_ns = self
            .expires
            .as_deref()
            .map(parse_utc_time)
            .transpose()
            .map_err(|reason| invalid(format!("expires: {reason}")))?;
        let signer =
            NodeId::parse(&self.signer).map_err(|error| invalid(format!("signer: {error}")))?;
        let signature = self
            .signature
            .as_deref()
            .map(|text| data_encoding::BASE64.decode(text.as_bytes()))
            .transpose()
            .map_err(|error| invalid(format!("signature: {error}")))?;
        let contract = VolumeContract {
            volume: *volume.as_bytes(),
            volume_name: self.volume.clone(),
            workloads,
            mode,
            expires_ns,
            detector: DetectorThresholds {
                max_entropy_bits: narrow(self.detector.max_entropy_bits),
                entropy_rise_bits: narrow(self.detector.entropy_rise_bits),
                suspicious_files: self.detector.suspicious_files,
                window_seconds: self.detector.window_seconds,
                rate_factor: narrow(self.detector.rate_factor),
            },
            signer: *signer.as_bytes(),
            created_ns: self.created_ns,
        };
        contract
            .validate()
            .map_err(|error| invalid(error.to_string()))?;
        Ok((contract, signature))
    }
}

/// What `forge contract new` asks for.
#[derive(Debug, Clone, Default)]
pub struct NewContract {
    /// Allowed workloads (digests or `interactive`); empty: any.
    pub workloads: Vec<String>,
    /// `ro`, `rw` or `append` (default `rw`).
    pub mode: Option<String>,
    /// `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SSZ`.
    pub expires: Option<String>,
    /// The detector's entropy bound, bits per byte.
    pub max_entropy: Option<f64>,
}

fn refused(volume: &str, clause: String) -> NodeError {
    NodeError::ContractRefused {
        volume: volume.to_owned(),
        clause,
        integrity: false,
    }
}

fn untrusted(volume: &str, clause: String) -> NodeError {
    NodeError::ContractRefused {
        volume: volume.to_owned(),
        clause,
        integrity: true,
    }
}

/// The workload a snapshot's DNA names (a snapshot without one was made by a person).
///
/// # Errors
/// A DNA workload that is neither `interactive` nor a digest.
pub fn snapshot_workload(dna: &BTreeMap<String, String>) -> std::result::Result<Workload, String> {
    dna.get(DNA_WORKLOAD)
        .map_or(Ok(Workload::Interactive), |text| Workload::parse(text))
}

impl Vault {
    /// A new contract for volume `name`, to be signed by this node.
    ///
    /// # Errors
    /// Unknown volume; a bad mode, workload, date or bound.
    pub fn new_contract(&self, name: &str, request: &NewContract) -> Result<ContractFile> {
        let record = self.require_volume(name)?;
        let invalid =
            |what: &'static str, value: &str, reason: String| NodeError::InvalidArgument {
                what,
                value: value.to_owned(),
                reason,
            };
        let mode = match request.mode.as_deref() {
            None => AccessMode::ReadWrite,
            Some(text) => AccessMode::parse(text)
                .ok_or_else(|| invalid("--mode", text, "write ro, rw or append".into()))?,
        };
        let mut workloads = request
            .workloads
            .iter()
            .map(|text| Workload::parse(text).map_err(|reason| invalid("--workload", text, reason)))
            .collect::<Result<Vec<_>>>()?;
        workloads.sort();
        workloads.dedup();
        let expires_ns = request
            .expires
            .as_deref()
            .map(|text| parse_utc_time(text).map_err(|reason| invalid("--expires", text, reason)))
            .transpose()?;
        let mut detector = DetectorThresholds::default();
        if let Some(bound) = request.max_entropy {
            detector.max_entropy_bits = narrow(bound);
        }
        let contract = VolumeContract {
            volume: record.id,
            volume_name: record.name.clone(),
            workloads,
            mode,
            expires_ns,
            detector,
            signer: *self.identity().node_id().as_bytes(),
            created_ns: self.now_ns(),
        };
        contract.validate().map_err(|error| {
            invalid(
                "contract",
                name,
                error.to_string().replace("object does not decode: ", ""),
            )
        })?;
        Ok(ContractFile::new(&contract, None))
    }

    /// Signs a contract file with this node's key (the node becomes its signer).
    ///
    /// # Errors
    /// A file that does not parse.
    pub fn sign_contract(&self, file: &ContractFile) -> Result<ContractFile> {
        let (mut contract, _) = file.contract()?;
        contract.signer = *self.identity().node_id().as_bytes();
        let signature = self.sign(SignatureDomain::Contract, &contract.encode())?;
        Ok(ContractFile::new(&contract, Some(signature.as_bytes())))
    }

    /// Whether `node` has write rights on the volume here: this node when it holds the
    /// volume's keys, a peer trusted to write it, a member of its volume group.
    ///
    /// # Errors
    /// Metadata errors; no quorum for a grouped volume.
    pub fn may_write_volume(&self, record: &VolumeRecord, node: &NodeId) -> Result<bool> {
        if *node == self.identity().node_id() {
            return self.holds_volume_keys(record);
        }
        if self
            .peer(node)?
            .and_then(|peer| peer.trust(&record.id))
            .is_some_and(|trust| trust.write)
        {
            return Ok(true);
        }
        let id = VolumeId::from_bytes(record.id);
        if let Some(group) = self.volume_group(&id)? {
            let storage = self.require_group_storage(group)?;
            if let Some(value) =
                storage.read(group, RecordSpace::VOLUMES, record.name.as_bytes())?
            {
                let volume = super::groups::GroupVolume::decode(&value)?;
                return Ok(volume
                    .envelopes
                    .iter()
                    .any(|(member, _)| member == node.as_bytes()));
            }
        }
        Ok(false)
    }

    /// Verifies a signed contract for `record`: it names the volume, its signature
    /// verifies with the signer's keys here, and the signer has write rights.
    ///
    /// # Errors
    /// [`NodeError::ContractRefused`] naming the clause.
    pub fn verify_contract(
        &self,
        record: &VolumeRecord,
        contract: &VolumeContract,
        signature: &[u8],
    ) -> Result<()> {
        let name = &record.name;
        if contract.volume != record.id {
            return Err(refused(
                name,
                format!(
                    "the contract is for volume {} ({}), not this one ({})",
                    contract.volume_name,
                    VolumeId::from_bytes(contract.volume),
                    VolumeId::from_bytes(record.id)
                ),
            ));
        }
        let signer = NodeId::from_bytes(contract.signer);
        let keys = match self.trusted_keys(&contract.signer, "contract") {
            Ok(keys) => keys,
            Err(NodeError::UntrustedSigner { .. }) => {
                return Err(untrusted(
                    name,
                    format!("signature by node {signer}, whose keys this vault does not have"),
                ));
            }
            Err(error) => return Err(error),
        };
        let signature = Signature::from_bytes(signature)
            .map_err(|error| untrusted(name, format!("the signature is malformed: {error}")))?;
        keys.verify(SignatureDomain::Contract, &contract.encode(), &signature)
            .map_err(|_| {
                untrusted(
                    name,
                    format!(
                        "the signature does not verify with node {signer}'s key (the contract \
                         was changed after signing, or signed by another key)"
                    ),
                )
            })?;
        if !self.may_write_volume(record, &signer)? {
            return Err(untrusted(
                name,
                format!("signature by node {signer}, which has no write rights on the volume"),
            ));
        }
        Ok(())
    }

    /// What keeps an attached contract from being valid here now, as a clause (the
    /// signature, the signer's rights, expiry), or None when it is valid.
    ///
    /// # Errors
    /// Metadata errors (no quorum for a grouped volume's rights).
    pub fn contract_problem(
        &self,
        record: &VolumeRecord,
        contract: &VolumeContract,
        signature: &[u8],
    ) -> Result<Option<String>> {
        match self.verify_contract(record, contract, signature) {
            Err(NodeError::ContractRefused { clause, .. }) => Ok(Some(clause)),
            Err(other) => Err(other),
            Ok(()) if contract.expired_at(self.now_ns()) => Ok(Some(format!(
                "expired on {}",
                format_utc_time(contract.expires_ns.unwrap_or_default())
            ))),
            Ok(()) => Ok(None),
        }
    }

    /// Attaches a signed contract file to volume `name`, replacing the one attached (and
    /// recording it in the volume's contract history). Through the group's Raft for a
    /// grouped volume.
    ///
    /// # Errors
    /// [`NodeError::ContractRefused`]: unsigned, signature or signer not valid here,
    /// another volume's, expired.
    pub fn attach_contract(&self, name: &str, file: &ContractFile) -> Result<VolumeContract> {
        let record = self.require_volume(name)?;
        let (contract, signature) = file.contract()?;
        let signature = signature.ok_or_else(|| {
            refused(
                name,
                "the contract is not signed: `forge contract sign FILE` first".into(),
            )
        })?;
        self.verify_contract(&record, &contract, &signature)?;
        let now = self.now_ns();
        if contract.expired_at(now) {
            return Err(refused(
                name,
                format!(
                    "the contract expired on {}",
                    format_utc_time(contract.expires_ns.unwrap_or_default())
                ),
            ));
        }
        let attached = AttachedContract {
            signed: SignedContract {
                contract: contract.encode(),
                signature,
            }
            .encode(),
            attached_ns: now,
            attached_by: *self.identity().node_id().as_bytes(),
        };
        let value = records::encode(&attached);
        let history_key = [record.id.as_slice(), &time_key(now)].concat();
        self.apply_volume_updates(
            &VolumeId::from_bytes(record.id),
            &[
                RecordUpdate::new(
                    CONTRACTS,
                    record.id.to_vec(),
                    Expected::Any,
                    Change::Put(value.clone()),
                ),
                RecordUpdate::new(
                    CONTRACT_HISTORY,
                    history_key,
                    Expected::Absent,
                    Change::Put(value),
                ),
            ],
        )?;
        Ok(contract)
    }

    /// A contract that came with a sync of `record`: attached here (with the sender's
    /// attach time, so both sites check the same snapshots' DNA) when it verifies here
    /// (its signer has write rights on the volume here) and was made after the one
    /// attached. Returns whether it was attached.
    ///
    /// # Errors
    /// [`NodeError::ContractRefused`] when it does not verify here; metadata errors.
    pub fn take_offered_contract(
        &self,
        record: &VolumeRecord,
        signed_bytes: &[u8],
        attached_ns: i64,
    ) -> Result<bool> {
        let (signed, contract) =
            SignedContract::decode(signed_bytes).map_err(|error| NodeError::CorruptRecord {
                what: "offered contract",
                reason: error.to_string(),
            })?;
        if let Some((_, _, current)) = self.attached_contract(record)?
            && current.created_ns >= contract.created_ns
        {
            return Ok(false);
        }
        self.verify_contract(record, &contract, &signed.signature)?;
        let value = records::encode(&AttachedContract {
            signed: signed_bytes.to_vec(),
            attached_ns,
            attached_by: *self.identity().node_id().as_bytes(),
        });
        self.apply_volume_updates(
            &VolumeId::from_bytes(record.id),
            &[
                RecordUpdate::new(
                    CONTRACTS,
                    record.id.to_vec(),
                    Expected::Any,
                    Change::Put(value.clone()),
                ),
                RecordUpdate::new(
                    CONTRACT_HISTORY,
                    [record.id.as_slice(), &time_key(attached_ns)].concat(),
                    Expected::Any,
                    Change::Put(value),
                ),
            ],
        )?;
        Ok(true)
    }

    /// A volume's record of `space` under `key`: as its group has it now for a grouped
    /// volume (a member's mirror may lag), else as recorded here.
    fn volume_record_now(
        &self,
        record: &VolumeRecord,
        space: RecordSpace,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        match self.volume_group(&VolumeId::from_bytes(record.id))? {
            Some(group) => self.require_group_storage(group)?.read(group, space, key),
            None => Ok(self.metadata.get_record(space, key)?),
        }
    }

    fn volume_records_mirrored(
        &self,
        record: &VolumeRecord,
        space: RecordSpace,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        // Scans read the mirror: a grouped volume's is current to within its refresh.
        Ok(self.metadata.scan_records(space, &record.id)?)
    }

    /// The contract attached to a volume, decoded (not verified), if any.
    ///
    /// # Errors
    /// Metadata errors; a corrupt record.
    pub fn attached_contract(
        &self,
        record: &VolumeRecord,
    ) -> Result<Option<(AttachedContract, SignedContract, VolumeContract)>> {
        let Some(value) = self.volume_record_now(record, CONTRACTS, &record.id)? else {
            return Ok(None);
        };
        decode_attached(&value).map(Some)
    }

    /// Every contract attached to a volume, oldest first.
    ///
    /// # Errors
    /// Metadata errors; a corrupt record.
    pub fn contract_history(
        &self,
        record: &VolumeRecord,
    ) -> Result<Vec<(AttachedContract, VolumeContract)>> {
        self.volume_records_mirrored(record, CONTRACT_HISTORY)?
            .into_iter()
            .map(|(_, value)| {
                decode_attached(&value).map(|(attached, _, contract)| (attached, contract))
            })
            .collect()
    }

    /// The volume's seal, if sealed (decoded, not verified).
    ///
    /// # Errors
    /// Metadata errors; a corrupt record.
    pub fn seal_of(&self, record: &VolumeRecord) -> Result<Option<(SignedSeal, Seal)>> {
        let Some(value) = self.volume_record_now(record, SEALS, &record.id)? else {
            return Ok(None);
        };
        let signed: SignedSeal = records::decode("seal", &value)?;
        let seal: Seal = records::decode("seal", &signed.seal)?;
        Ok(Some((signed, seal)))
    }

    /// The volume's unresolved anomaly flags, oldest first (with their record keys).
    ///
    /// # Errors
    /// Metadata errors; a corrupt record.
    pub fn open_anomalies(&self, record: &VolumeRecord) -> Result<Vec<(Vec<u8>, AnomalyFlag)>> {
        let mut open = Vec::new();
        for (key, value) in self.volume_records_mirrored(record, ANOMALIES)? {
            let flag: AnomalyFlag = records::decode("anomaly flag", &value)?;
            if flag.resolved_ns.is_none() {
                open.push((key, flag));
            }
        }
        Ok(open)
    }

    /// Seals volume `name`: its branch stood at its head when `reason` (a workload
    /// detaching). Read-write mounts are refused until trust-check passes.
    ///
    /// # Errors
    /// Unknown volume; metadata errors; no quorum.
    pub fn seal_volume(&self, name: &str, branch: &str, reason: &str) -> Result<Seal> {
        let record = self.require_volume(name)?;
        let id = VolumeId::from_bytes(record.id);
        let seal = Seal {
            volume: record.id,
            branch: branch.to_owned(),
            head: self.branch_head(&id, branch)?.map(|head| *head.as_bytes()),
            sealed_ns: self.now_ns(),
            node: *self.identity().node_id().as_bytes(),
            reason: reason.to_owned(),
        };
        let encoded = records::encode(&seal);
        let signature = self.sign(SignatureDomain::Seal, &encoded)?;
        let signed = SignedSeal {
            seal: encoded,
            signature: signature.as_bytes().to_vec(),
        };
        self.apply_volume_updates(
            &id,
            &[RecordUpdate::new(
                SEALS,
                record.id.to_vec(),
                Expected::Any,
                Change::Put(records::encode(&signed)),
            )],
        )?;
        Ok(seal)
    }

    /// Records an anomaly on volume `name`: it is frozen (read-write mounts and runs
    /// refused) until `forge volume unfreeze`.
    ///
    /// # Errors
    /// Unknown volume; metadata errors; no quorum.
    pub fn flag_anomaly(&self, name: &str, flag: &AnomalyFlag) -> Result<()> {
        let record = self.require_volume(name)?;
        let key = [record.id.as_slice(), &time_key(flag.flagged_ns)].concat();
        let mut updates = vec![RecordUpdate::new(
            ANOMALIES,
            key,
            Expected::Any,
            Change::Put(records::encode(flag)),
        )];
        if self.freeze_of(&record)?.is_none() {
            updates.push(RecordUpdate::new(
                FREEZES,
                record.id.to_vec(),
                Expected::Any,
                Change::Put(records::encode(flag)),
            ));
        }
        self.apply_volume_updates(&VolumeId::from_bytes(record.id), &updates)
    }

    /// The flag a volume is frozen for (read through its group for a grouped volume).
    ///
    /// # Errors
    /// Metadata errors; no quorum; a corrupt record.
    pub fn freeze_of(&self, record: &VolumeRecord) -> Result<Option<AnomalyFlag>> {
        self.volume_record_now(record, FREEZES, &record.id)?
            .map(|value| records::decode("freeze", &value))
            .transpose()
    }

    /// Resolves every open anomaly flag of volume `name` (after a person reviewed it):
    /// the flags stay in its history, resolved. Returns how many were open.
    ///
    /// # Errors
    /// Unknown volume; metadata errors; no quorum.
    pub fn unfreeze_volume(&self, name: &str) -> Result<Vec<AnomalyFlag>> {
        let record = self.require_volume(name)?;
        let now = self.now_ns();
        let mut open = self.open_anomalies(&record)?;
        // The flag frozen for, read through the group: this member's mirror of the flags
        // may not have it yet.
        if let Some(flag) = self.freeze_of(&record)? {
            let key = [record.id.as_slice(), &time_key(flag.flagged_ns)].concat();
            if !open.iter().any(|(known, _)| *known == key) {
                open.push((key, flag));
            }
        }
        let mut updates: Vec<RecordUpdate> = open
            .iter()
            .map(|(key, flag)| {
                let resolved = AnomalyFlag {
                    resolved_ns: Some(now),
                    ..flag.clone()
                };
                RecordUpdate::new(
                    ANOMALIES,
                    key.clone(),
                    Expected::Any,
                    Change::Put(records::encode(&resolved)),
                )
            })
            .collect();
        if let Some(frozen) = self.volume_record_now(&record, FREEZES, &record.id)? {
            updates.push(RecordUpdate::new(
                FREEZES,
                record.id.to_vec(),
                Expected::Value(frozen),
                Change::Delete,
            ));
        }
        if !updates.is_empty() {
            self.apply_volume_updates(&VolumeId::from_bytes(record.id), &updates)?;
        }
        Ok(open.into_iter().map(|(_, flag)| flag).collect())
    }

    /// The behaviour detector's learned rate of destructive operations per second for
    /// `volume` (0 before any mount taught it one). A record that does not decode is
    /// reported in the log and counts as none: it never blocks a mount.
    ///
    /// # Errors
    /// Metadata errors.
    pub fn detector_baseline(&self, volume: &VolumeId) -> Result<f64> {
        let Some(value) = self
            .metadata
            .get_record(DETECTOR_BASELINES, volume.as_bytes())?
        else {
            return Ok(0.0);
        };
        match decode_baseline(&value) {
            Some(rate) => Ok(rate),
            None => {
                tracing::warn!(
                    %volume,
                    "the behaviour detector's baseline record does not decode; starting from none"
                );
                Ok(0.0)
            }
        }
    }

    /// Keeps `per_second` as `volume`'s detector baseline for its next mount.
    ///
    /// # Errors
    /// Metadata errors.
    pub fn save_detector_baseline(&self, volume: &VolumeId, per_second: f64) -> Result<()> {
        let mut value = vec![DETECTOR_BASELINE_FORMAT];
        value.extend_from_slice(&per_second.to_le_bytes());
        self.metadata.apply(&[RecordUpdate::new(
            DETECTOR_BASELINES,
            volume.as_bytes().to_vec(),
            Expected::Any,
            Change::Put(value),
        )])?;
        Ok(())
    }

    /// The checks made before every mount and run: frozen, sealed, then the contract
    /// (signature and signer, expiry, workload, mode). Returns what the mount may do.
    ///
    /// # Errors
    /// [`NodeError::Frozen`], [`NodeError::Sealed`], [`NodeError::ContractRefused`]
    /// naming the clause.
    pub fn check_mount(
        &self,
        record: &VolumeRecord,
        intent: MountIntent<'_>,
    ) -> Result<MountPolicy> {
        let name = &record.name;
        if !intent.read_only {
            if let Some(flag) = self.freeze_of(record)? {
                return Err(NodeError::Frozen {
                    volume: name.clone(),
                    since: format_utc_time(flag.flagged_ns),
                    kind: flag.kind,
                    evidence: flag.evidence,
                    quarantine: flag.quarantine_branch.unwrap_or_else(|| "(none)".into()),
                });
            }
            if let Some((_, seal)) = self.seal_of(record)? {
                return Err(NodeError::Sealed {
                    volume: name.clone(),
                    since: format_utc_time(seal.sealed_ns),
                    reason: seal.reason,
                });
            }
        }
        let Some((_, signed, contract)) = self.attached_contract(record)? else {
            return Ok(MountPolicy {
                append_only: false,
                detector: DetectorThresholds::default(),
            });
        };
        self.verify_contract(record, &contract, &signed.signature)?;
        if contract.expired_at(self.now_ns()) {
            return Err(refused(
                name,
                format!(
                    "the contract expired on {}; attach a new one (forge contract new/sign/attach)",
                    format_utc_time(contract.expires_ns.unwrap_or_default())
                ),
            ));
        }
        if !contract.allows(intent.workload) {
            return Err(refused(
                name,
                format!(
                    "workload {} is not allowed (allowed: {})",
                    intent.workload.text(),
                    contract
                        .workloads
                        .iter()
                        .map(Workload::text)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if !intent.read_only && contract.mode == AccessMode::ReadOnly {
            return Err(refused(
                name,
                "it allows read-only use only: mount with --read-only (forge run: --mount NAME:/PATH:ro)".into(),
            ));
        }
        Ok(MountPolicy {
            append_only: !intent.read_only && contract.mode == AccessMode::AppendOnly,
            detector: contract.detector,
        })
    }

    /// `forge volume trust-check`: the signature chain of every snapshot back to its
    /// root, the contract, the DNA of every snapshot made since it was attached, the seal,
    /// the anomaly flags. When every check passes, a seal is lifted.
    ///
    /// # Errors
    /// Unknown volume, keys that do not open; a failed check is in the report, not an
    /// error.
    pub fn trust_check(&self, name: &str, passphrase: PassphraseSource<'_>) -> Result<TrustReport> {
        let volume = self.open_volume(name, passphrase)?;
        let record = volume.record.clone();
        let id = VolumeId::from_bytes(record.id);
        let mut checks = Vec::new();

        // Signatures: every listed snapshot's commit verifies, by a trusted author, and
        // its parents are listed snapshots (a parent deleted with `snapshot delete` is
        // pruned history, counted); every branch head is a listed snapshot.
        let listed: BTreeSet<Cid> = self
            .snapshot_listings(&record)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let mut commits = BTreeMap::new();
        let mut signature_failure = None;
        for snapshot in &listed {
            match self.read_commit(&volume, snapshot) {
                Ok(commit) => {
                    commits.insert(*snapshot, commit);
                }
                Err(error) => {
                    signature_failure = Some(format!("snapshot {snapshot}: {error}"));
                    break;
                }
            }
        }
        let mut pruned = BTreeSet::new();
        let mut roots = 0;
        for commit in commits.values() {
            if commit.parents.is_empty() {
                roots += 1;
            }
            for parent in &commit.parents {
                let parent = Cid::from_bytes(*parent);
                if !listed.contains(&parent) {
                    pruned.insert(parent);
                }
            }
        }
        if signature_failure.is_none() {
            for (branch, head) in self.refs().list_refs(&id)? {
                if !listed.contains(&head) {
                    signature_failure = Some(format!(
                        "branch {branch} points at {head}, which is not a snapshot of the volume"
                    ));
                    break;
                }
            }
        }
        checks.push(match signature_failure {
            Some(detail) => TrustCheckItem {
                check: "signatures",
                passed: false,
                detail,
            },
            None => TrustCheckItem {
                check: "signatures",
                passed: true,
                detail: format!(
                    "{} snapshot(s) signed by trusted authors, chained to {roots} root(s){}",
                    commits.len(),
                    if pruned.is_empty() {
                        String::new()
                    } else {
                        format!(" and {} deleted ancestor(s)", pruned.len())
                    }
                ),
            },
        });

        // The contract, and the DNA of what was made under it.
        match self.attached_contract(&record)? {
            None => {
                checks.push(TrustCheckItem {
                    check: "contract",
                    passed: true,
                    detail: "none attached (any workload may mount it)".into(),
                });
            }
            Some((attached, signed, contract)) => {
                let verdict = match self.contract_problem(&record, &contract, &signed.signature) {
                    Ok(None) => Ok(()),
                    Ok(Some(clause)) => Err(clause),
                    Err(error) => Err(error.to_string()),
                };
                checks.push(TrustCheckItem {
                    check: "contract",
                    passed: verdict.is_ok(),
                    detail: match verdict {
                        Ok(()) => format!(
                            "signed by node {} (write rights), mode {}, {}",
                            NodeId::from_bytes(contract.signer),
                            contract.mode.name(),
                            contract
                                .expires_ns
                                .map_or("never expires".into(), |expires| {
                                    format!("expires {}", format_utc_time(expires))
                                })
                        ),
                        Err(reason) => reason,
                    },
                });
                let mut dna_failure = None;
                let mut under = 0;
                for (snapshot, commit) in &commits {
                    if commit.time_ns < attached.attached_ns {
                        continue;
                    }
                    under += 1;
                    match snapshot_workload(&commit.dna) {
                        Ok(workload) if contract.allows(&workload) => {}
                        Ok(workload) => {
                            dna_failure = Some(format!(
                                "snapshot {snapshot} was made by workload {}, which the \
                                 contract does not allow",
                                workload.text()
                            ));
                            break;
                        }
                        Err(reason) => {
                            dna_failure = Some(format!("snapshot {snapshot}: DNA {reason}"));
                            break;
                        }
                    }
                }
                checks.push(match dna_failure {
                    Some(detail) => TrustCheckItem {
                        check: "dna",
                        passed: false,
                        detail,
                    },
                    None => TrustCheckItem {
                        check: "dna",
                        passed: true,
                        detail: format!(
                            "{under} snapshot(s) made since the contract was attached ({}), \
                             each by an allowed workload",
                            format_utc_time(attached.attached_ns)
                        ),
                    },
                });
            }
        }

        // The seal: signed by a trusted node, and what it sealed is still in the branch's
        // history.
        let seal = self.seal_of(&record)?;
        checks.push(match &seal {
            None => TrustCheckItem {
                check: "seal",
                passed: true,
                detail: "not sealed".into(),
            },
            Some((signed, seal)) => {
                let verdict = self.verify_seal(&record, signed, seal, &commits);
                TrustCheckItem {
                    check: "seal",
                    passed: verdict.is_ok(),
                    detail: verdict.unwrap_or_else(|reason| reason),
                }
            }
        });

        let mut open = self.open_anomalies(&record)?;
        if open.is_empty()
            && let Some(flag) = self.freeze_of(&record)?
        {
            // Frozen on another member whose flag this mirror has not caught up with yet.
            open.push((Vec::new(), flag));
        }
        checks.push(match open.first() {
            None => TrustCheckItem {
                check: "anomalies",
                passed: true,
                detail: "no unresolved anomaly flags".into(),
            },
            Some((_, flag)) => TrustCheckItem {
                check: "anomalies",
                passed: false,
                detail: format!(
                    "{} unresolved flag(s); first: {} at {} ({}): review, then `forge volume \
                     unfreeze {name}`",
                    open.len(),
                    flag.kind,
                    format_utc_time(flag.flagged_ns),
                    flag.evidence
                ),
            },
        });

        let mut report = TrustReport {
            volume: name.to_owned(),
            checks,
            unsealed: false,
        };
        if report.first_failure().is_none() && seal.is_some() {
            // Only the seal checked is lifted: one sealed again meanwhile stays.
            let current = self.volume_record_now(&record, SEALS, &record.id)?;
            if let Some(current) = current {
                self.apply_volume_updates(
                    &id,
                    &[RecordUpdate::new(
                        SEALS,
                        record.id.to_vec(),
                        Expected::Value(current),
                        Change::Delete,
                    )],
                )?;
                report.unsealed = true;
            }
        }
        Ok(report)
    }

    fn verify_seal(
        &self,
        record: &VolumeRecord,
        signed: &SignedSeal,
        seal: &Seal,
        commits: &BTreeMap<Cid, forge_store::object::SnapshotCommit>,
    ) -> std::result::Result<String, String> {
        let node = NodeId::from_bytes(seal.node);
        let keys = self
            .trusted_keys(&seal.node, "seal")
            .map_err(|_| format!("sealed by node {node}, whose keys this vault does not have"))?;
        let signature = Signature::from_bytes(&signed.signature)
            .map_err(|error| format!("the seal's signature is malformed: {error}"))?;
        keys.verify(SignatureDomain::Seal, &signed.seal, &signature)
            .map_err(|_| format!("the seal does not verify with node {node}'s key (tampered)"))?;
        if seal.volume != record.id {
            return Err("the seal is another volume's".into());
        }
        let head = self
            .refs()
            .get_ref(&VolumeId::from_bytes(record.id), &seal.branch)
            .map_err(|error| error.to_string())?;
        if let Some(sealed) = seal.head.map(Cid::from_bytes) {
            // What was sealed must still be in the branch's history.
            let mut reached = false;
            let mut stack: Vec<Cid> = head.into_iter().collect();
            let mut seen = BTreeSet::new();
            while let Some(snapshot) = stack.pop() {
                if snapshot == sealed {
                    reached = true;
                    break;
                }
                if !seen.insert(snapshot) {
                    continue;
                }
                if let Some(commit) = commits.get(&snapshot) {
                    stack.extend(commit.parents.iter().map(|parent| Cid::from_bytes(*parent)));
                }
            }
            if !reached {
                return Err(format!(
                    "the sealed head {sealed} of branch {} is no longer in its history",
                    seal.branch
                ));
            }
        }
        Ok(format!(
            "sealed {} by node {node} ({}), branch {} at {}",
            format_utc_time(seal.sealed_ns),
            seal.reason,
            seal.branch,
            seal.head
                .map_or("(empty)".into(), |head| Cid::from_bytes(head).to_hex()
                    [..16]
                    .to_owned())
        ))
    }
}

fn decode_attached(value: &[u8]) -> Result<(AttachedContract, SignedContract, VolumeContract)> {
    let attached: AttachedContract = records::decode("contract", value)?;
    let (signed, contract) =
        SignedContract::decode(&attached.signed).map_err(|error| NodeError::CorruptRecord {
            what: "contract",
            reason: error.to_string(),
        })?;
    Ok((attached, signed, contract))
}

/// A time as a key part that sorts in time order (sign bit flipped, big-endian).
fn time_key(ns: i64) -> [u8; 8] {
    (ns.cast_unsigned() ^ (1 << 63)).to_be_bytes()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use forge_store::kv::{Column, KvEngine, MemKv};

    use super::*;
    use crate::progress::Progress;
    use crate::test_support::{no_passphrase, pseudo_random, vault_on};
    use crate::vault::{CreateVolumeOptions, ImportOptions};

    #[test]
    fn a_detector_baseline_is_kept_per_volume_and_a_bad_record_counts_as_none() {
        let temp = tempfile::tempdir().unwrap();
        let vault = vault_on(temp.path(), Arc::new(MemKv::new()), 1);
        let (one, two) = (VolumeId::from_bytes([1; 16]), VolumeId::from_bytes([2; 16]));
        assert_eq!(vault.detector_baseline(&one).unwrap(), 0.0);
        vault.save_detector_baseline(&one, 7.25).unwrap();
        assert_eq!(vault.detector_baseline(&one).unwrap(), 7.25);
        assert_eq!(vault.detector_baseline(&two).unwrap(), 0.0);
        for garbage in [
            vec![],
            vec![1],
            vec![2, 0, 0, 0, 0, 0, 0, 0, 0],
            [vec![1], f64::NAN.to_le_bytes().to_vec()].concat(),
            [vec![1], (-1.0f64).to_le_bytes().to_vec()].concat(),
            [vec![1], 1.0f64.to_le_bytes().to_vec(), vec![0]].concat(),
        ] {
            vault
                .metadata
                .apply(&[RecordUpdate::new(
                    DETECTOR_BASELINES,
                    two.as_bytes().to_vec(),
                    Expected::Any,
                    Change::Put(garbage.clone()),
                )])
                .unwrap();
            assert_eq!(vault.detector_baseline(&two).unwrap(), 0.0, "{garbage:?}");
        }
    }

    fn import(vault: &Vault, root: &std::path::Path, seed: u64, dna: &[(&str, &str)]) -> Cid {
        let source = root.join(format!("source-{seed}"));
        std::fs::create_dir_all(&source).unwrap();
        std::fs::write(source.join("file"), pseudo_random(20_000, seed)).unwrap();
        vault
            .import(
                "v",
                &source,
                &ImportOptions {
                    message: format!("import {seed}"),
                    branch: "main".into(),
                    dna: dna
                        .iter()
                        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                        .collect(),
                    atime: false,
                },
                &no_passphrase,
                &Progress::new("import", false),
            )
            .unwrap()
            .snapshot
    }

    fn setup(seed: u64) -> (tempfile::TempDir, Arc<MemKv>, Vault) {
        let temp = tempfile::tempdir().unwrap();
        let kv = Arc::new(MemKv::new());
        let vault = vault_on(temp.path(), kv.clone(), seed);
        vault
            .create_volume("v", &CreateVolumeOptions::default(), &no_passphrase)
            .unwrap();
        (temp, kv, vault)
    }

    fn signed_file(vault: &Vault, request: &NewContract) -> ContractFile {
        let file = vault.new_contract("v", request).unwrap();
        vault.sign_contract(&file).unwrap()
    }

    /// A new contract for `v`, signed here and attached.
    fn attach_new(vault: &Vault, request: &NewContract) -> VolumeContract {
        vault
            .attach_contract("v", &signed_file(vault, request))
            .unwrap()
    }

    /// Writes a volume's record as if it had arrived so (tampering, a replicated record).
    fn put_record(vault: &Vault, space: RecordSpace, record: &VolumeRecord, value: Vec<u8>) {
        vault
            .metadata
            .apply(&[RecordUpdate::new(
                space,
                record.id.to_vec(),
                Expected::Any,
                Change::Put(value),
            )])
            .unwrap();
    }

    fn clause(error: &NodeError) -> String {
        match error {
            NodeError::ContractRefused { clause, .. } => clause.clone(),
            other => panic!("not a contract refusal: {other}"),
        }
    }

    const DIGEST: &str = "abababababababababababababababababababababababababababababababab";

    #[test]
    fn a_contract_file_survives_text_and_any_change_voids_its_signature() {
        let (_temp, _kv, vault) = setup(1);
        let file = signed_file(
            &vault,
            &NewContract {
                workloads: vec!["interactive".into(), DIGEST.into()],
                mode: Some("append".into()),
                expires: Some("2099-01-01".into()),
                max_entropy: Some(7.5),
            },
        );
        let text = file.to_text().unwrap();
        assert!(text.contains("mode = \"append\""), "{text}");
        assert!(text.contains("max_entropy_bits = 7.5"), "{text}");
        let parsed = ContractFile::parse(&text).unwrap();
        assert_eq!(parsed, file);
        let contract = vault.attach_contract("v", &parsed).unwrap();
        assert_eq!(contract.mode, AccessMode::AppendOnly);
        assert!(contract.allows(&Workload::Interactive));

        // Any field changed after signing: the signature no longer verifies.
        for (from, to) in [
            ("mode = \"append\"", "mode = \"rw\""),
            (
                "expires = \"2099-01-01T00:00:00Z\"",
                "expires = \"2199-01-01T00:00:00Z\"",
            ),
            ("suspicious_files = 4", "suspicious_files = 400"),
        ] {
            assert!(text.contains(from), "{from}");
            let tampered = ContractFile::parse(&text.replace(from, to)).unwrap();
            let error = vault.attach_contract("v", &tampered).unwrap_err();
            assert!(clause(&error).contains("does not verify"), "{error}");
            assert_eq!(error.exit_code(), crate::error::ExitCode::Integrity);
        }
        // Garbage and unknown keys are refused, naming why.
        assert!(ContractFile::parse("format = 1").is_err());
        let error = ContractFile::parse(&format!("{text}\nextra = 1")).unwrap_err();
        assert!(error.to_string().contains("extra"), "{error}");
        // Unsigned: refused.
        let unsigned = vault.new_contract("v", &NewContract::default()).unwrap();
        assert!(clause(&vault.attach_contract("v", &unsigned).unwrap_err()).contains("not signed"));
    }

    #[test]
    fn mounts_are_refused_with_the_clause_that_failed() {
        let (temp, _kv, vault) = setup(2);
        import(&vault, temp.path(), 1, &[]);
        let record = vault.require_volume("v").unwrap();
        let interactive = |read_only| MountIntent {
            read_only,
            workload: &Workload::Interactive,
        };
        // No contract: mounts as before.
        assert!(
            !vault
                .check_mount(&record, interactive(false))
                .unwrap()
                .append_only
        );

        // A workload list without `interactive`: a plain mount is refused, a listed
        // workload is not.
        attach_new(
            &vault,
            &NewContract {
                workloads: vec![DIGEST.into()],
                ..NewContract::default()
            },
        );
        let error = vault.check_mount(&record, interactive(false)).unwrap_err();
        assert_eq!(
            clause(&error),
            format!("workload interactive is not allowed (allowed: {DIGEST})")
        );
        assert!(
            error
                .to_string()
                .starts_with("volume \"v\": refused by its contract")
        );
        let digest = Workload::parse(DIGEST).unwrap();
        vault
            .check_mount(
                &record,
                MountIntent {
                    read_only: false,
                    workload: &digest,
                },
            )
            .unwrap();
        // An import is a write by a person unless its DNA names the workload.
        let source = temp.path().join("source-1");
        let error = vault
            .import(
                "v",
                &source,
                &ImportOptions {
                    message: String::new(),
                    branch: "main".into(),
                    dna: BTreeMap::new(),
                    atime: false,
                },
                &no_passphrase,
                &Progress::new("import", false),
            )
            .unwrap_err();
        assert!(clause(&error).contains("workload interactive is not allowed"));
        import(&vault, temp.path(), 2, &[(DNA_WORKLOAD, DIGEST)]);

        // Read-only: a read-write mount is refused, a read-only one is not.
        attach_new(
            &vault,
            &NewContract {
                mode: Some("ro".into()),
                ..NewContract::default()
            },
        );
        assert!(
            clause(&vault.check_mount(&record, interactive(false)).unwrap_err())
                .contains("read-only use only")
        );
        vault.check_mount(&record, interactive(true)).unwrap();

        // Append-only: the mount is told so.
        attach_new(
            &vault,
            &NewContract {
                mode: Some("append".into()),
                ..NewContract::default()
            },
        );
        assert!(
            vault
                .check_mount(&record, interactive(false))
                .unwrap()
                .append_only
        );
        assert!(
            !vault
                .check_mount(&record, interactive(true))
                .unwrap()
                .append_only
        );

        // Expired: refused at attach, and at every mount once it expires. (The stepping
        // clock starts in November 2023.)
        let expired = signed_file(
            &vault,
            &NewContract {
                expires: Some("2023-01-01".into()),
                ..NewContract::default()
            },
        );
        assert_eq!(
            clause(&vault.attach_contract("v", &expired).unwrap_err()),
            "the contract expired on 2023-01-01T00:00:00Z"
        );
        let soon = signed_file(
            &vault,
            &NewContract {
                expires: Some(format_utc_time(vault.now_ns() + 2_000_000_000)),
                ..NewContract::default()
            },
        );
        // Whole seconds: the expiry is the second after now at the latest.
        let contract = vault.attach_contract("v", &soon).unwrap();
        while vault.now_ns() < contract.expires_ns.unwrap() {}
        assert!(
            clause(&vault.check_mount(&record, interactive(true)).unwrap_err())
                .starts_with("the contract expired on ")
        );

        // The history keeps every contract attached.
        assert_eq!(vault.contract_history(&record).unwrap().len(), 4);
    }

    #[test]
    fn a_contract_signed_by_a_node_without_write_rights_is_refused() {
        let (temp, _kv, vault) = setup(3);
        let other_temp = tempfile::tempdir().unwrap();
        let other = vault_on(other_temp.path(), Arc::new(MemKv::new()), 4);
        let file = vault.new_contract("v", &NewContract::default()).unwrap();
        let signed_elsewhere = other.sign_contract(&file).unwrap();
        let other_node = other.identity().node_id();
        // Its keys unknown here.
        let error = vault.attach_contract("v", &signed_elsewhere).unwrap_err();
        assert!(
            clause(&error).contains("whose keys this vault does not have"),
            "{error}"
        );
        assert_eq!(error.exit_code(), crate::error::ExitCode::Integrity);
        // Known, but without write rights on the volume.
        vault.trust_node(other.identity().public_keys()).unwrap();
        assert_eq!(
            clause(&vault.attach_contract("v", &signed_elsewhere).unwrap_err()),
            format!("signature by node {other_node}, which has no write rights on the volume")
        );
        // A reader's trust is not enough; a writer's is.
        vault
            .trust_peer(&other_node, Some("v"), false, false)
            .unwrap();
        assert!(vault.attach_contract("v", &signed_elsewhere).is_err());
        vault
            .trust_peer(&other_node, Some("v"), true, false)
            .unwrap();
        vault.attach_contract("v", &signed_elsewhere).unwrap();
        // Rights taken away: the attached contract no longer verifies, so mounts stop.
        vault.revoke_peer(&other_node).unwrap();
        let record = vault.require_volume("v").unwrap();
        let error = vault
            .check_mount(
                &record,
                MountIntent {
                    read_only: true,
                    workload: &Workload::Interactive,
                },
            )
            .unwrap_err();
        assert!(clause(&error).contains("no write rights"), "{error}");
        drop(temp);
    }

    #[test]
    fn trust_check_passes_on_a_clean_history_and_fails_on_tampering() {
        let (temp, kv, vault) = setup(5);
        let first = import(&vault, temp.path(), 1, &[]);
        import(&vault, temp.path(), 2, &[(DNA_WORKLOAD, "interactive")]);
        attach_new(
            &vault,
            &NewContract {
                workloads: vec!["interactive".into()],
                ..NewContract::default()
            },
        );
        import(&vault, temp.path(), 3, &[]);
        let record = vault.require_volume("v").unwrap();
        let report = vault.trust_check("v", &no_passphrase).unwrap();
        assert_eq!(report.first_failure(), None, "{report:?}");
        assert!(!report.unsealed);
        let names: Vec<&str> = report.checks.iter().map(|item| item.check).collect();
        assert_eq!(
            names,
            ["signatures", "contract", "dna", "seal", "anomalies"]
        );
        assert!(
            report.checks[0].detail.starts_with("3 snapshot(s)"),
            "{report:?}"
        );
        assert!(
            report.checks[2]
                .detail
                .starts_with("1 snapshot(s) made since"),
            "{report:?}"
        );

        // Sealed: read-write mounts and imports refused until trust-check passes; the
        // check lifts the seal.
        vault.seal_volume("v", "main", "test").unwrap();
        let rw = MountIntent {
            read_only: false,
            workload: &Workload::Interactive,
        };
        let error = vault.check_mount(&record, rw).unwrap_err();
        assert!(matches!(error, NodeError::Sealed { .. }), "{error}");
        assert!(error.to_string().contains("forge volume trust-check v"));
        vault
            .check_mount(
                &record,
                MountIntent {
                    read_only: true,
                    workload: &Workload::Interactive,
                },
            )
            .unwrap();
        let report = vault.trust_check("v", &no_passphrase).unwrap();
        assert!(
            report.unsealed && report.first_failure().is_none(),
            "{report:?}"
        );
        vault.check_mount(&record, rw).unwrap();

        // A tampered seal fails the seal check (and stays sealed).
        vault.seal_volume("v", "main", "test").unwrap();
        let stored = vault
            .metadata
            .get_record(SEALS, &record.id)
            .unwrap()
            .unwrap();
        let mut signed: SignedSeal = records::decode("seal", &stored).unwrap();
        let mut seal: Seal = records::decode("seal", &signed.seal).unwrap();
        seal.head = Some(*first.as_bytes());
        signed.seal = records::encode(&seal);
        put_record(&vault, SEALS, &record, records::encode(&signed));
        let report = vault.trust_check("v", &no_passphrase).unwrap();
        let failure = report.first_failure().unwrap();
        assert_eq!(failure.check, "seal");
        assert!(failure.detail.contains("does not verify"), "{failure:?}");
        assert!(!report.unsealed);
        put_record(&vault, SEALS, &record, stored);
        assert!(vault.trust_check("v", &no_passphrase).unwrap().unsealed);

        // A tampered contract record fails the contract check.
        let stored = vault
            .metadata
            .get_record(CONTRACTS, &record.id)
            .unwrap()
            .unwrap();
        let (attached, signed, mut contract) = decode_attached(&stored).unwrap();
        contract.workloads.clear();
        let forged = AttachedContract {
            signed: SignedContract {
                contract: contract.encode(),
                signature: signed.signature,
            }
            .encode(),
            ..attached
        };
        put_record(&vault, CONTRACTS, &record, records::encode(&forged));
        let report = vault.trust_check("v", &no_passphrase).unwrap();
        let failure = report.first_failure().unwrap();
        assert_eq!(failure.check, "contract");
        assert!(failure.detail.contains("does not verify"), "{failure:?}");
        put_record(&vault, CONTRACTS, &record, stored);

        // A snapshot whose DNA the contract does not allow, made after it was attached
        // (as a sync from a site that ignored the contract would bring): the dna check
        // fails. Made here under a contract that allowed it, then a contract allowing
        // only people recorded as attached before it.
        let before = vault.now_ns();
        attach_new(
            &vault,
            &NewContract {
                workloads: vec!["interactive".into(), DIGEST.into()],
                ..NewContract::default()
            },
        );
        let stranger = import(&vault, temp.path(), 4, &[(DNA_WORKLOAD, DIGEST)]);
        let people_only = signed_file(
            &vault,
            &NewContract {
                workloads: vec!["interactive".into()],
                ..NewContract::default()
            },
        );
        let (contract, signature) = people_only.contract().unwrap();
        let backdated = AttachedContract {
            signed: SignedContract {
                contract: contract.encode(),
                signature: signature.unwrap(),
            }
            .encode(),
            attached_ns: before,
            attached_by: *vault.identity().node_id().as_bytes(),
        };
        put_record(&vault, CONTRACTS, &record, records::encode(&backdated));
        let report = vault.trust_check("v", &no_passphrase).unwrap();
        let failure = report.first_failure().unwrap();
        assert_eq!(failure.check, "dna");
        assert_eq!(
            failure.detail,
            format!(
                "snapshot {stranger} was made by workload {DIGEST}, which the contract does not allow"
            )
        );

        // A snapshot's commit damaged at rest fails the signature chain.
        let head = vault
            .refs()
            .get_ref(&VolumeId::from_bytes(record.id), "main")
            .unwrap()
            .unwrap();
        let mut bytes = kv.get(Column::Objects, head.as_bytes()).unwrap().unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let mut batch = forge_store::kv::WriteBatch::new();
        batch.put(Column::Objects, head.as_bytes().to_vec(), bytes);
        kv.write(batch, forge_store::kv::Durability::Synced)
            .unwrap();
        let report = vault.trust_check("v", &no_passphrase).unwrap();
        let failure = report.first_failure().unwrap();
        assert_eq!(failure.check, "signatures");
        assert!(failure.detail.contains(&head.to_hex()), "{failure:?}");
    }
}
