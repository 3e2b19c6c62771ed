//! How the CLI shows each typed reply: human text and `--json`, the same whichever
//! process answered (the reply is the same typed message either way).

use super::*;

/// What `forge snapshot create` prints: a line per read-write mount of the volume.
///
/// # Errors
/// A reply whose snapshot id is not 32 bytes.
pub fn render_commit(volume: &str, reply: &CommitReply) -> Result<Output> {
    let mut human = Vec::new();
    let mut rows = Vec::new();
    for outcome in &reply.outcomes {
        if outcome.nothing_changed {
            human.push(format!(
                "nothing changed in {volume} since its last snapshot"
            ));
            rows.push(json!({"snapshot": null}));
            continue;
        }
        let snapshot = reply_cid(&outcome.snapshot)?;
        human.push(if outcome.conflict && outcome.branch.contains("-frozen-") {
            format!(
                "the volume is frozen: snapshot {snapshot} committed beside, to branch {}, for review",
                outcome.branch
            )
        } else if outcome.conflict {
            format!(
                "the branch moved meanwhile: snapshot {snapshot} committed to a new branch {}",
                outcome.branch
            )
        } else {
            format!("snapshot {snapshot} committed to {}", outcome.branch)
        });
        rows.push(json!({"snapshot": snapshot.to_hex(), "branch": outcome.branch, "conflict": outcome.conflict}));
    }
    Ok(Output {
        human: human.join("\n"),
        json: serde_json::Value::Array(rows),
    })
}

/// A path as a message carries it (raw bytes: any file name).
pub(super) fn wire_path(bytes: &[u8]) -> &Path {
    Path::new(std::ffi::OsStr::from_bytes(bytes))
}

/// A mount as `--json` shows it: its registry record's fields.
pub(super) fn mount_json(mount: &MountInfo) -> serde_json::Value {
    json!({
        "pid": mount.pid,
        "id": mount.id,
        "volume": mount.volume,
        "branch": mount.branch,
        "mountpoint": wire_path(&mount.mountpoint),
        "read_only": mount.read_only,
        "cache_bytes": mount.cache_bytes,
        "private": mount.private,
    })
}

/// What `forge node status` prints.
#[must_use]
pub fn render_node_status(reply: &NodeStatusReply) -> Output {
    let socket = wire_path(&reply.socket);
    let mut human = format!(
        "node {} (forge {}), pid {}, up {} s\nsocket {}\nmetrics: {}\nvolumes: {}\nmounts: {}",
        reply.node_id,
        reply.version,
        reply.pid,
        reply.uptime_seconds,
        socket.display(),
        reply.metrics_address.as_ref().map_or_else(
            || "off".to_owned(),
            |address| format!("http://{address}/metrics")
        ),
        reply.volumes.len(),
        reply.mounts.len()
    );
    for mount in &reply.mounts {
        human.push_str(&format!(
            "\n  {} <- {} {}{}{}",
            wire_path(&mount.mountpoint).display(),
            mount.volume,
            mount.branch.as_deref().map_or_else(
                || "(snapshot)".to_owned(),
                |branch| format!("branch {branch}")
            ),
            if mount.read_only { ", read-only" } else { "" },
            if mount.private {
                " (a forge run's, in its own mount namespace)"
            } else {
                ""
            }
        ));
    }
    Output {
        human,
        json: json!({
            "node_id": reply.node_id,
            "pid": reply.pid,
            "version": reply.version,
            "uptime_seconds": reply.uptime_seconds,
            "volumes": reply.volumes,
            "mounts": reply.mounts.iter().map(mount_json).collect::<Vec<_>>(),
            "socket": socket,
            "metrics_address": reply.metrics_address,
        }),
    }
}

/// What a stop reply says it is doing, for `forge node stop`'s line.
#[must_use]
pub fn describe_stop(reply: &StopNodeReply) -> String {
    if reply.mounts.is_empty() {
        "no mounts".to_owned()
    } else {
        let names: Vec<String> = reply
            .mounts
            .iter()
            .map(|mount| wire_path(&mount.mountpoint).display().to_string())
            .collect();
        format!("unmounted {}", names.join(", "))
    }
}

/// Problems fsck lists by default, before "... and N more".
pub const FSCK_PROBLEMS_SHOWN: usize = 5;

/// What `forge fsck` prints: a count per volume and snapshot and the first few problems
/// (all with `verbose`; `--json` always lists all). Problems fail it (exit 3) and a
/// passphrase that did not open a volume's keys fails it (exit 1), each with the report.
///
/// # Errors
/// [`NodeError::Damaged`], [`NodeError::PassphraseDidNotOpen`], carrying the report.
pub fn render_fsck(reply: &FsckReply, verbose: bool) -> Result<Output> {
    let report = fsck_report(reply);
    let mut human = format!(
        "checked {} objects, {} chunks, {} snapshots: {}",
        report.objects_checked,
        report.chunks_checked,
        report.snapshots_checked,
        if report.problems.is_empty() {
            "no problems".to_owned()
        } else {
            format!("{} problem(s)", report.problems.len())
        }
    );
    // Counts per volume and snapshot, so a million missing chunks read as one line each.
    let mut groups: BTreeMap<(String, String), usize> = BTreeMap::new();
    for problem in &report.problems {
        *groups
            .entry((
                problem.volume.clone().unwrap_or_default(),
                problem.snapshot.clone().unwrap_or_default(),
            ))
            .or_default() += 1;
    }
    let group_summary: Vec<String> = groups
        .iter()
        .map(
            |((volume, snapshot), count)| match (volume.is_empty(), snapshot.is_empty()) {
                (true, _) => format!("store: {count}"),
                (false, true) => format!("volume {volume}: {count}"),
                (false, false) => format!("volume {volume} snapshot {snapshot}: {count}"),
            },
        )
        .collect();
    if groups.len() > 1 || (!verbose && report.problems.len() > FSCK_PROBLEMS_SHOWN) {
        for group in &group_summary {
            let _ = write!(human, "\n  {group}");
        }
    }
    let shown = if verbose {
        report.problems.len()
    } else {
        FSCK_PROBLEMS_SHOWN
    };
    for problem in report.problems.iter().take(shown) {
        let _ = write!(human, "\n  {problem}");
    }
    if report.problems.len() > shown {
        let _ = write!(
            human,
            "\n  ... and {} more (all of them: forge fsck --verbose, or --json)",
            report.problems.len() - shown
        );
    }
    for volume in &report.skipped_volumes {
        let _ = write!(
            human,
            "\n  volume {volume} is encrypted: checked without its keys only (set FORGE_PASSPHRASE to check its snapshots too)"
        );
    }
    for (volume, reason) in &report.keys_not_opened {
        let _ = write!(
            human,
            "\n  volume {volume}: the passphrase given did not open its keys ({reason}); checked without its keys only"
        );
    }
    let problems: Vec<serde_json::Value> = report
        .problems
        .iter()
        .map(|problem| {
            json!({
                "volume": problem.volume,
                "snapshot": problem.snapshot,
                "detail": problem.detail,
                "message": problem.to_string(),
            })
        })
        .collect();
    let json = json!({
        "objects_checked": report.objects_checked,
        "chunks_checked": report.chunks_checked,
        "snapshots_checked": report.snapshots_checked,
        "repairable_shards": report.repairable_shards,
        "problems": problems,
        "skipped_volumes": report.skipped_volumes,
        "keys_not_opened": report.keys_not_opened.iter().map(|(volume, reason)| json!({"volume": volume, "reason": reason})).collect::<Vec<_>>(),
    });
    let output = Output { human, json };
    if let Some(first) = report.problems.first() {
        return Err(NodeError::Damaged {
            summary: format!(
                "fsck found {} problem(s) ({}); first: {first}",
                report.problems.len(),
                group_summary.join(", ")
            ),
            report: Box::new(output),
        });
    }
    if let Some((volume, _)) = report.keys_not_opened.first() {
        return Err(NodeError::PassphraseDidNotOpen {
            volume: volume.clone(),
            report: Box::new(output),
        });
    }
    Ok(output)
}

/// The reply as the vault's report (the same problems, so the same lines).
pub(super) fn fsck_report(reply: &FsckReply) -> crate::vault::check::FsckReport {
    crate::vault::check::FsckReport {
        objects_checked: reply.objects_checked,
        chunks_checked: reply.chunks_checked,
        snapshots_checked: reply.snapshots_checked,
        problems: reply
            .problems
            .iter()
            .map(|problem| crate::vault::check::FsckProblem {
                volume: problem.volume.clone(),
                snapshot: problem.snapshot.clone(),
                detail: problem.detail.clone(),
            })
            .collect(),
        repairable_shards: reply.repairable_shards,
        skipped_volumes: reply.skipped_volumes.clone(),
        keys_not_opened: reply
            .keys_not_opened
            .iter()
            .map(|keys| (keys.volume.clone(), keys.reason.clone()))
            .collect(),
    }
}

/// What `forge gc` prints.
#[must_use]
pub fn render_gc(reply: &GcReply) -> Output {
    Output {
        human: format!(
            "removed {} chunks and {} objects, {} freed ({} -> {} on disk)",
            reply.chunks_removed,
            reply.objects_removed,
            human_bytes(reply.bytes_freed),
            human_bytes(reply.disk_bytes_before),
            human_bytes(reply.disk_bytes_after)
        ),
        json: json!({
            "chunks_removed": reply.chunks_removed,
            "objects_removed": reply.objects_removed,
            "bytes_freed": reply.bytes_freed,
            "disk_bytes_before": reply.disk_bytes_before,
            "disk_bytes_after": reply.disk_bytes_after,
        }),
    }
}

/// What `forge scrub` prints, or its failure (exit 3) when a chunk cannot be rebuilt.
///
/// # Errors
/// [`IntegrityFault::Unrecoverable`] listing those chunks.
pub fn render_scrub(reply: &ScrubReply) -> Result<Output> {
    let human = format!(
        "scrubbed {} chunks: {} damaged shard(s), {} repaired, {} unrecoverable chunk(s)",
        reply.chunks_checked,
        reply.damaged_shards,
        reply.repaired_shards,
        reply.unrecoverable.len()
    );
    if !reply.unrecoverable.is_empty() {
        return Err(IntegrityFault::Unrecoverable {
            summary: human,
            chunks: reply.unrecoverable.clone(),
        }
        .into());
    }
    Ok(Output {
        human,
        json: json!({
            "chunks_checked": reply.chunks_checked,
            "damaged_shards": reply.damaged_shards,
            "repaired_shards": reply.repaired_shards,
            "unrecoverable": reply.unrecoverable,
        }),
    })
}

/// What `forge stats` prints (columns holding nothing are left out).
#[must_use]
pub fn render_vault_stats(reply: &VaultStatsReply) -> Output {
    let mut human = format!(
        "{} volumes, {} on disk",
        reply.volumes,
        human_bytes(reply.physical_bytes)
    );
    let mut columns = serde_json::Map::new();
    for column in &reply.columns {
        if column.keys == 0 && column.table_bytes == 0 && column.blob_bytes == 0 {
            continue;
        }
        human.push_str(&format!(
            "\n  {:<10} ~{} keys, {} in tables, {} in blob files",
            column.name,
            column.keys,
            human_bytes(column.table_bytes),
            human_bytes(column.blob_bytes)
        ));
        columns.insert(
            column.name.clone(),
            json!({"keys": column.keys, "table_bytes": column.table_bytes, "blob_bytes": column.blob_bytes}),
        );
    }
    Output {
        human,
        json: json!({"physical_bytes": reply.physical_bytes, "volumes": reply.volumes, "columns": columns}),
    }
}

/// What `forge snapshot list NAME` prints.
///
/// # Errors
/// A reply whose ids are not 32 bytes.
pub fn render_snapshots(reply: &ListSnapshotsReply) -> Result<Output> {
    let mut human = String::new();
    let mut rows = Vec::new();
    for snapshot in &reply.snapshots {
        let id = reply_cid(&snapshot.id)?;
        let parents = snapshot
            .parents
            .iter()
            .map(|parent| reply_cid(parent).map(|cid| cid.to_hex()))
            .collect::<Result<Vec<_>>>()?;
        human.push_str(&format!(
            "{}  {}  {:>10}  {}{}\n",
            &id.to_hex()[..16],
            format_utc_time(snapshot.time_ns),
            human_bytes(snapshot.logical_bytes),
            snapshot.message,
            if snapshot.branches.is_empty() {
                String::new()
            } else {
                format!("  [{}]", snapshot.branches.join(", "))
            }
        ));
        rows.push(json!({
            "id": id.to_hex(),
            "parents": parents,
            "time": format_utc_time(snapshot.time_ns),
            "time_ns": snapshot.time_ns,
            "message": snapshot.message,
            "branches": snapshot.branches,
            "logical_bytes": snapshot.logical_bytes,
            "files": snapshot.files,
            "dna": snapshot.dna.iter().collect::<std::collections::BTreeMap<_, _>>(),
            "author": forge_crypto::NodeId::from_slice(&snapshot.author).ok().map(|node| node.to_hex()),
        }));
    }
    if reply.snapshots.is_empty() {
        human.push_str("no snapshots yet: forge volume import NAME DIR");
    }
    Ok(Output {
        human: human.trim_end().to_owned(),
        json: serde_json::Value::Array(rows),
    })
}

/// What `forge snapshot branch NAME NEW` prints.
///
/// # Errors
/// A reply whose id is not 32 bytes.
pub fn render_branch(volume: &str, branch: &str, reply: &CreateBranchReply) -> Result<Output> {
    let target = reply_cid(&reply.snapshot)?;
    Ok(Output {
        human: format!("branch {branch} of {volume} at {target}"),
        json: json!({"branch": branch, "snapshot": target.to_hex()}),
    })
}

/// What `forge snapshot delete NAME ID` prints.
///
/// # Errors
/// A reply whose id is not 32 bytes.
pub fn render_delete(volume: &str, reply: &DeleteSnapshotReply) -> Result<Output> {
    let snapshot = reply_cid(&reply.snapshot)?;
    Ok(Output {
        human: format!(
            "deleted snapshot {snapshot} from {volume}; run `forge gc` to free its data"
        ),
        json: json!({"deleted": snapshot.to_hex()}),
    })
}

pub(super) fn volume_json(volume: &VolumeInfo) -> serde_json::Value {
    json!({
        "name": volume.name,
        "id": data_encoding::HEXLOWER.encode(&volume.id),
        "ec": format!("{}+{}", volume.data_shards, volume.parity_shards),
        "domain": volume.domain,
        "encrypted": volume.encrypted,
    })
}

/// What `forge volume list` prints.
#[must_use]
pub fn render_list(reply: &ListVolumesReply) -> Output {
    let mut human = String::new();
    for volume in &reply.volumes {
        human.push_str(&format!(
            "{:<24} ec {:<6} domain {}{}\n",
            volume.name,
            format!("{}+{}", volume.data_shards, volume.parity_shards),
            volume.domain,
            if volume.encrypted { " (encrypted)" } else { "" }
        ));
    }
    if reply.volumes.is_empty() {
        human.push_str("no volumes yet: forge volume create NAME\n");
    }
    Output {
        human: human.trim_end().to_owned(),
        json: serde_json::Value::Array(reply.volumes.iter().map(volume_json).collect()),
    }
}

/// What `forge volume create` prints.
///
/// # Errors
/// A reply without its volume (a daemon that broke the API).
pub fn render_create(reply: &CreateVolumeReply) -> Result<Output> {
    let volume = reply
        .volume
        .as_ref()
        .ok_or_else(|| NodeError::InvalidArgument {
            what: "reply",
            value: "Volume.Create".into(),
            reason: "it names no volume".into(),
        })?;
    Ok(Output {
        human: format!(
            "created volume {} (ec {}+{}, domain {}{})",
            volume.name,
            volume.data_shards,
            volume.parity_shards,
            volume.domain,
            if volume.encrypted { ", encrypted" } else { "" }
        ),
        json: volume_json(volume),
    })
}

/// What `forge volume import` prints: its summary, and on stderr each entry it skipped or
/// stored incomplete (the client's stderr, whichever process imported).
///
/// # Errors
/// A reply whose snapshot id is not 32 bytes.
pub fn render_import(reply: &ImportReply) -> Result<Output> {
    let snapshot = reply_cid(&reply.snapshot)?;
    let shown = |note: &EntryNote| wire_path(&note.path).display().to_string();
    for note in &reply.skipped {
        eprintln!("forge: skipped {}: {}", shown(note), note.reason);
    }
    for note in &reply.incomplete {
        eprintln!("forge: stored {} without its {}", shown(note), note.reason);
    }
    let human = format!(
        "snapshot {snapshot} on {}: {} files, {} in {:.1}s ({} new chunks, {} reused, {} written){}{}",
        reply.branch,
        reply.files,
        human_bytes(reply.logical_bytes),
        reply.elapsed_seconds,
        reply.new_chunks,
        reply.reused_chunks,
        human_bytes(reply.written_bytes),
        if reply.skipped.is_empty() {
            String::new()
        } else {
            format!(", {} skipped", reply.skipped.len())
        },
        if reply.incomplete.is_empty() {
            String::new()
        } else {
            format!(", {} stored incomplete", reply.incomplete.len())
        }
    );
    let notes = |notes: &[EntryNote]| {
        notes
            .iter()
            .map(|note| json!({"path": shown(note), "reason": note.reason}))
            .collect::<Vec<_>>()
    };
    Ok(Output {
        human,
        json: json!({
            "snapshot": snapshot.to_hex(),
            "branch": reply.branch,
            "files": reply.files,
            "logical_bytes": reply.logical_bytes,
            "new_chunks": reply.new_chunks,
            "reused_chunks": reply.reused_chunks,
            "written_bytes": reply.written_bytes,
            "elapsed_seconds": reply.elapsed_seconds,
            "skipped": notes(&reply.skipped),
            "incomplete": notes(&reply.incomplete),
        }),
    })
}

/// What `forge volume export` (and `snapshot restore`) prints: its summary, and on stderr
/// each entry not fully restored (the client's stderr, whichever process exported).
///
/// # Errors
/// A reply whose snapshot id is not 32 bytes.
pub fn render_export(reply: &ExportReply) -> Result<Output> {
    let snapshot = reply_cid(&reply.snapshot)?;
    let shown = |bytes: &[u8]| wire_path(bytes).display().to_string();
    for note in &reply.not_restored {
        eprintln!(
            "forge: not restored at {}: {}",
            shown(&note.path),
            note.reason
        );
    }
    let mut incomplete = String::new();
    if reply.owners_not_restored > 0 {
        incomplete.push_str(&format!(
            "; {} entries left owned by you: only root restores other owners",
            reply.owners_not_restored
        ));
    }
    if !reply.not_restored.is_empty() {
        incomplete.push_str(&format!(
            "; {} entries not fully restored (above)",
            reply.not_restored.len()
        ));
    }
    Ok(Output {
        human: format!(
            "exported snapshot {snapshot} to {}: {} files, {} in {:.1}s{incomplete}",
            shown(&reply.destination),
            reply.files,
            human_bytes(reply.bytes),
            reply.elapsed_seconds
        ),
        json: json!({
            "snapshot": snapshot.to_hex(),
            "destination": shown(&reply.destination),
            "files": reply.files,
            "bytes": reply.bytes,
            "elapsed_seconds": reply.elapsed_seconds,
            "owners_not_restored": reply.owners_not_restored,
            "not_restored": reply.not_restored.iter().map(|note| json!({"path": shown(&note.path), "what": note.reason})).collect::<Vec<_>>(),
        }),
    })
}

/// What `forge volume stats NAME` prints.
#[must_use]
pub fn render_stats(name: &str, stats: &VolumeStatsReply) -> Output {
    Output {
        human: format!(
            "volume {name}: {} snapshots, {} logical, {} stored, {} unique chunks, dedup {:.2}x, compression {:.2}x",
            stats.snapshots,
            human_bytes(stats.logical_bytes),
            human_bytes(stats.stored_bytes),
            stats.unique_chunks,
            stats.dedup_ratio,
            stats.compression_ratio
        ),
        json: json!({
            "logical_bytes": stats.logical_bytes,
            "stored_bytes": stats.stored_bytes,
            "unique_chunks": stats.unique_chunks,
            "dedup_ratio": stats.dedup_ratio,
            "compression_ratio": stats.compression_ratio,
            "snapshots": stats.snapshots,
        }),
    }
}
