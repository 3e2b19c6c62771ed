//! Calls on zero-trust volumes (`forge.v1.Trust`): contracts (new, sign, attach, show),
//! trust-check, seal and unfreeze. Served in this process or by the daemon, the same.

use forge_crypto::NodeId;
use forge_proto::v1::{
    AnomalyInfo, AttachContractRequest, ContractHistoryEntry, ContractInfo, ContractText,
    NewContractRequest, SealVolumeReply, SealVolumeRequest, ShowContractRequest, TrustCheckItem,
    TrustCheckReply, TrustCheckRequest, UnfreezeVolumeReply, UnfreezeVolumeRequest,
};
use serde_json::json;

use super::LocalApi;
use crate::clock::format_utc_time;
use crate::error::{NodeError, Result};
use crate::output::Output;
use crate::vault::DEFAULT_BRANCH;
use crate::vault::trust::{ContractFile, NewContract};
use forge_store::contract::Workload;

/// Calls on volumes' contracts, seals and flags (`forge.v1.Trust`).
pub trait TrustService {
    /// A new unsigned contract file for a volume.
    ///
    /// # Errors
    /// Unknown volume; a bad mode, workload, date or bound.
    fn new_contract(&self, request: NewContractRequest) -> Result<ContractText>;

    /// The contract file signed by this node.
    ///
    /// # Errors
    /// A file that does not parse.
    fn sign_contract(&self, request: ContractText) -> Result<ContractText>;

    /// Attaches a signed contract to a volume (replacing its contract).
    ///
    /// # Errors
    /// The clause that refuses it (unsigned, bad signature, signer without write rights,
    /// expired, another volume's).
    fn attach_contract(&self, request: AttachContractRequest) -> Result<ContractInfo>;

    /// A volume's contract and its history.
    ///
    /// # Errors
    /// Unknown volume.
    fn show_contract(&self, request: ShowContractRequest) -> Result<ContractInfo>;

    /// Every trust check of a volume; lifts its seal when all pass.
    ///
    /// # Errors
    /// Unknown volume, keys that do not open (a failing check is in the reply).
    fn trust_check(&self, request: TrustCheckRequest) -> Result<TrustCheckReply>;

    /// Seals a volume at its branch's head.
    ///
    /// # Errors
    /// Unknown volume.
    fn seal(&self, request: SealVolumeRequest) -> Result<SealVolumeReply>;

    /// Resolves a frozen volume's anomaly flags.
    ///
    /// # Errors
    /// Unknown volume.
    fn unfreeze(&self, request: UnfreezeVolumeRequest) -> Result<UnfreezeVolumeReply>;
}

impl TrustService for LocalApi<'_> {
    fn new_contract(&self, request: NewContractRequest) -> Result<ContractText> {
        let file = self.vault.new_contract(
            &request.volume,
            &NewContract {
                workloads: request.workloads,
                mode: (!request.mode.is_empty()).then_some(request.mode),
                expires: (!request.expires.is_empty()).then_some(request.expires),
                max_entropy: request.max_entropy,
            },
        )?;
        Ok(ContractText {
            text: file.to_text()?,
        })
    }

    fn sign_contract(&self, request: ContractText) -> Result<ContractText> {
        let file = self
            .vault
            .sign_contract(&ContractFile::parse(&request.text)?)?;
        Ok(ContractText {
            text: file.to_text()?,
        })
    }

    fn attach_contract(&self, request: AttachContractRequest) -> Result<ContractInfo> {
        self.vault
            .attach_contract(&request.volume, &ContractFile::parse(&request.text)?)?;
        self.show_contract(ShowContractRequest {
            volume: request.volume,
        })
    }

    fn show_contract(&self, request: ShowContractRequest) -> Result<ContractInfo> {
        let record = self.vault.require_volume(&request.volume)?;
        let history = self
            .vault
            .contract_history(&record)?
            .into_iter()
            .map(|(attached, contract)| ContractHistoryEntry {
                attached_ns: attached.attached_ns,
                attached_by: attached.attached_by.to_vec(),
                signer: contract.signer.to_vec(),
                created_ns: contract.created_ns,
                mode: contract.mode.name().to_owned(),
            })
            .collect();
        let Some((attached, signed, contract)) = self.vault.attached_contract(&record)? else {
            return Ok(ContractInfo {
                volume: record.name,
                history,
                ..ContractInfo::default()
            });
        };
        let problem = self
            .vault
            .contract_problem(&record, &contract, &signed.signature)?
            .unwrap_or_default();
        let detector = contract.detector;
        Ok(ContractInfo {
            volume: record.name,
            attached: true,
            text: ContractFile::new(&contract, Some(&signed.signature)).to_text()?,
            mode: contract.mode.name().to_owned(),
            workloads: contract.workloads.iter().map(Workload::text).collect(),
            expires_ns: contract.expires_ns,
            signer: contract.signer.to_vec(),
            attached_ns: attached.attached_ns,
            problem,
            history,
            max_entropy_bits: f64::from(detector.max_entropy_bits),
            entropy_rise_bits: f64::from(detector.entropy_rise_bits),
            suspicious_files: detector.suspicious_files,
            window_seconds: detector.window_seconds,
            rate_factor: f64::from(detector.rate_factor),
        })
    }

    fn trust_check(&self, request: TrustCheckRequest) -> Result<TrustCheckReply> {
        let report = self.vault.trust_check(&request.volume, self.passphrase)?;
        Ok(trust_check_reply(report))
    }

    fn seal(&self, request: SealVolumeRequest) -> Result<SealVolumeReply> {
        let branch = if request.branch.is_empty() {
            DEFAULT_BRANCH.to_owned()
        } else {
            request.branch
        };
        let reason = if request.reason.is_empty() {
            "sealed by hand (forge volume seal)".to_owned()
        } else {
            request.reason
        };
        let seal = self.vault.seal_volume(&request.volume, &branch, &reason)?;
        Ok(SealVolumeReply {
            volume: request.volume,
            branch,
            head: seal.head.map(|head| head.to_vec()).unwrap_or_default(),
            sealed_ns: seal.sealed_ns,
        })
    }

    fn unfreeze(&self, request: UnfreezeVolumeRequest) -> Result<UnfreezeVolumeReply> {
        let resolved = self.vault.unfreeze_volume(&request.volume)?;
        Ok(UnfreezeVolumeReply {
            volume: request.volume,
            resolved: resolved
                .into_iter()
                .map(|flag| AnomalyInfo {
                    kind: flag.kind,
                    evidence: flag.evidence,
                    flagged_ns: flag.flagged_ns,
                    quarantine_branch: flag.quarantine_branch.unwrap_or_default(),
                })
                .collect(),
        })
    }
}

fn node_hex(bytes: &[u8]) -> String {
    NodeId::from_slice(bytes).map_or_else(|_| "(none)".to_owned(), |node| node.to_hex())
}

/// `forge contract show`.
#[must_use]
pub fn render_contract(reply: &ContractInfo) -> Output {
    let history: Vec<serde_json::Value> = reply
        .history
        .iter()
        .map(|entry| {
            json!({
                "attached": format_utc_time(entry.attached_ns),
                "attached_ns": entry.attached_ns,
                "attached_by": node_hex(&entry.attached_by),
                "signer": node_hex(&entry.signer),
                "created_ns": entry.created_ns,
                "mode": entry.mode,
            })
        })
        .collect();
    if !reply.attached {
        return Output {
            human: format!(
                "volume {} has no contract: any workload may mount it (forge contract new \
                 --volume {} -o FILE)",
                reply.volume, reply.volume
            ),
            json: json!({"volume": reply.volume, "attached": false, "history": history}),
        };
    }
    let expires = reply
        .expires_ns
        .map_or_else(|| "never".to_owned(), format_utc_time);
    let workloads = if reply.workloads.is_empty() {
        "any".to_owned()
    } else {
        reply.workloads.join(", ")
    };
    let mut human = format!(
        "volume {}\n  mode:       {}\n  workloads:  {workloads}\n  expires:    {expires}\n  \
         signer:     {}\n  attached:   {}\n  detector:   entropy >= {} bits/byte (rise {}), \
         {} files in {} s, rate x{}\n  valid:      {}",
        reply.volume,
        reply.mode,
        node_hex(&reply.signer),
        format_utc_time(reply.attached_ns),
        reply.max_entropy_bits,
        reply.entropy_rise_bits,
        reply.suspicious_files,
        reply.window_seconds,
        reply.rate_factor,
        if reply.problem.is_empty() {
            "yes".to_owned()
        } else {
            format!("NO: {}", reply.problem)
        }
    );
    if reply.history.len() > 1 {
        human.push_str(&format!(
            "\n  history:    {} contracts attached",
            reply.history.len()
        ));
    }
    Output {
        human,
        json: json!({
            "volume": reply.volume,
            "attached": true,
            "mode": reply.mode,
            "workloads": reply.workloads,
            "expires": reply.expires_ns.map(format_utc_time),
            "expires_ns": reply.expires_ns,
            "signer": node_hex(&reply.signer),
            "attached_at": format_utc_time(reply.attached_ns),
            "attached_ns": reply.attached_ns,
            "valid": reply.problem.is_empty(),
            "problem": (!reply.problem.is_empty()).then_some(&reply.problem),
            "detector": {
                "max_entropy_bits": reply.max_entropy_bits,
                "entropy_rise_bits": reply.entropy_rise_bits,
                "suspicious_files": reply.suspicious_files,
                "window_seconds": reply.window_seconds,
                "rate_factor": reply.rate_factor,
            },
            "history": history,
            "text": reply.text,
        }),
    }
}

/// `forge volume trust-check`: every check with pass/fail; a failure is the error naming
/// the first failed check, carrying the whole report.
///
/// # Errors
/// [`NodeError::TrustCheckFailed`].
pub fn render_trust_check(reply: &TrustCheckReply) -> Result<Output> {
    let mut human = String::new();
    let mut checks = Vec::new();
    for item in &reply.checks {
        human.push_str(&format!(
            "{:<11} {}  {}\n",
            item.check,
            if item.passed { "pass" } else { "FAIL" },
            item.detail
        ));
        checks.push(json!({"check": item.check, "passed": item.passed, "detail": item.detail}));
    }
    let failed = reply.checks.iter().find(|item| !item.passed);
    if failed.is_none() {
        human.push_str(if reply.unsealed {
            "trust-check passed: the volume is unsealed"
        } else {
            "trust-check passed"
        });
    }
    let output = Output {
        human: human.trim_end().to_owned(),
        json: json!({
            "volume": reply.volume,
            "passed": failed.is_none(),
            "unsealed": reply.unsealed,
            "checks": checks,
        }),
    };
    match failed {
        Some(item) => Err(NodeError::TrustCheckFailed {
            volume: reply.volume.clone(),
            check: item.check.clone(),
            reason: item.detail.clone(),
            report: Box::new(output),
        }),
        None => Ok(output),
    }
}

/// A trust-check's report as the typed reply.
#[must_use]
pub fn trust_check_reply(report: crate::vault::trust::TrustReport) -> TrustCheckReply {
    TrustCheckReply {
        volume: report.volume,
        checks: report
            .checks
            .into_iter()
            .map(|item| TrustCheckItem {
                check: item.check.to_owned(),
                passed: item.passed,
                detail: item.detail,
            })
            .collect(),
        unsealed: report.unsealed,
    }
}

/// `forge volume seal`.
#[must_use]
pub fn render_seal(reply: &SealVolumeReply) -> Output {
    let head = forge_crypto::Cid::from_slice(&reply.head).ok();
    Output {
        human: format!(
            "volume {} sealed at branch {} ({}): read-write mounts wait for `forge volume \
             trust-check {}`",
            reply.volume,
            reply.branch,
            head.map_or_else(|| "empty".to_owned(), |head| head.to_hex()[..16].to_owned()),
            reply.volume
        ),
        json: json!({
            "volume": reply.volume,
            "branch": reply.branch,
            "head": head.map(|head| head.to_hex()),
            "sealed_ns": reply.sealed_ns,
        }),
    }
}

/// `forge volume unfreeze`.
#[must_use]
pub fn render_unfreeze(reply: &UnfreezeVolumeReply) -> Output {
    let human = if reply.resolved.is_empty() {
        format!("volume {} was not frozen", reply.volume)
    } else {
        format!(
            "volume {} unfrozen: {} flag(s) resolved ({})",
            reply.volume,
            reply.resolved.len(),
            reply
                .resolved
                .iter()
                .map(|flag| format!("{} at {}", flag.kind, format_utc_time(flag.flagged_ns)))
                .collect::<Vec<_>>()
                .join("; ")
        )
    };
    Output {
        human,
        json: json!({
            "volume": reply.volume,
            "resolved": reply.resolved.iter().map(|flag| json!({
                "kind": flag.kind,
                "evidence": flag.evidence,
                "flagged_ns": flag.flagged_ns,
                "quarantine_branch": flag.quarantine_branch,
            })).collect::<Vec<_>>(),
        }),
    }
}
