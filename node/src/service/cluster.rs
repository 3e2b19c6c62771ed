//! What `forge cluster ...` and `forge group ...` print.

use std::fmt::Write as _;

use forge_proto::v1::{ClusterStatusReply, GroupInfo};
use serde_json::json;

use crate::output::Output;

fn short(node: &str) -> &str {
    node.get(..16).unwrap_or(node)
}

fn group_json(group: &GroupInfo) -> serde_json::Value {
    json!({
        "name": group.name,
        "id": group.id,
        "layout": format!("{}+{}", group.data_shards, group.parity_shards),
        "nodes": group.nodes,
        "retiring": group.retiring,
        "running_here": group.running_here,
        "leader": group.leader,
        "term": group.term,
        "committed": group.committed,
        "applied": group.applied,
        "lag": group.lag.iter().map(|lag| json!({"node_id": lag.node_id, "entries": lag.entries})).collect::<Vec<_>>(),
        "repair": {
            "running": group.repair_running,
            "backlog_shards": group.repair_backlog,
            "rebuilt_shards": group.repair_rebuilt,
        },
    })
}

fn group_line(group: &GroupInfo) -> String {
    let mut line = format!("group {} (id {}", group.name, group.id);
    if group.data_shards > 0 {
        let _ = write!(line, ", {}+{}", group.data_shards, group.parity_shards);
    }
    let _ = write!(line, ", {} nodes)", group.nodes.len());
    if !group.running_here {
        line.push_str(": not run on this node");
        return line;
    }
    let _ = write!(
        line,
        ": leader {}, term {}, committed {}, applied {}",
        group.leader.as_deref().map_or("none (no quorum?)", short),
        group.term,
        group
            .committed
            .map_or_else(|| "-".to_owned(), |index| index.to_string()),
        group
            .applied
            .map_or_else(|| "-".to_owned(), |index| index.to_string()),
    );
    for lag in &group.lag {
        let _ = write!(
            line,
            "\n    follower {} {} behind",
            short(&lag.node_id),
            lag.entries
        );
    }
    if group.id != 0 {
        let _ = write!(
            line,
            "\n    repair: {}, {} shards of this node not rebuilt yet, {} rebuilt since start",
            if group.repair_running {
                "running"
            } else {
                "idle"
            },
            group.repair_backlog,
            group.repair_rebuilt
        );
    }
    line
}

/// What `forge group gc` prints.
#[must_use]
pub fn render_group_gc(reply: &forge_proto::v1::GroupGcReply) -> Output {
    let mut human = format!("group {}: swept (gc epoch {})", reply.group, reply.epoch);
    let (mut chunks, mut objects, mut bytes) = (0, 0, 0);
    for member in &reply.members {
        if member.error.is_empty() {
            chunks += member.chunks;
            objects += member.objects;
            bytes += member.bytes;
            let _ = write!(
                human,
                "\n  {}: {} chunks, {} objects, {} bytes removed",
                short(&member.node_id),
                member.chunks,
                member.objects,
                member.bytes
            );
        } else {
            let _ = write!(human, "\n  {}: {}", short(&member.node_id), member.error);
        }
    }
    Output {
        human,
        json: json!({
            "group": reply.group,
            "epoch": reply.epoch,
            "chunks_removed": chunks,
            "objects_removed": objects,
            "bytes_freed": bytes,
            "members": reply.members.iter().map(|member| json!({
                "node_id": member.node_id,
                "error": (!member.error.is_empty()).then_some(&member.error),
                "chunks": member.chunks,
                "objects": member.objects,
                "bytes": member.bytes,
            })).collect::<Vec<_>>(),
        }),
    }
}

/// What `forge group repair` prints.
#[must_use]
pub fn render_repair(reply: &forge_proto::v1::RepairGroupReply) -> Output {
    let width = u64::from(reply.data_shards + reply.parity_shards);
    let expected = reply.chunks * width;
    let members: Vec<serde_json::Value> = reply
        .members
        .iter()
        .map(|member| {
            json!({
                "node_id": member.node_id,
                "error": (!member.error.is_empty()).then_some(&member.error),
                "chunks": member.chunks,
                "held": member.held,
                "rebuilt": member.rebuilt,
                "rebuilt_bytes": member.rebuilt_bytes,
                "released": member.released,
                "backlog": member.backlog,
                "objects_fetched": member.objects_fetched,
            })
        })
        .collect();
    let whole = expected > 0 && reply.shards_held == expected;
    let mut human = format!(
        "group {}: {} chunks, {} of {} shards held by their owners{}",
        reply.group,
        reply.chunks,
        reply.shards_held,
        expected,
        if whole || reply.chunks == 0 {
            " (every chunk whole)"
        } else {
            ""
        }
    );
    for member in &reply.members {
        if member.error.is_empty() {
            let _ = write!(
                human,
                "\n  {}: {} held, {} rebuilt ({} bytes), {} released, {} not rebuilt",
                short(&member.node_id),
                member.held,
                member.rebuilt,
                member.rebuilt_bytes,
                member.released,
                member.backlog
            );
        } else {
            let _ = write!(human, "\n  {}: {}", short(&member.node_id), member.error);
        }
    }
    Output {
        human,
        json: json!({
            "group": reply.group,
            "layout": format!("{}+{}", reply.data_shards, reply.parity_shards),
            "chunks": reply.chunks,
            "shards_held": reply.shards_held,
            "shards_expected": expected,
            "whole": whole || reply.chunks == 0,
            "members": members,
        }),
    }
}

/// What `forge cluster init|join|status|leave` prints.
#[must_use]
pub fn render_cluster(reply: &ClusterStatusReply) -> Output {
    let json = json!({
        "member": reply.member,
        "members": reply.members.iter().map(|member| json!({
            "node_id": member.node_id,
            "addresses": member.addresses,
            "reachable": member.reachable,
            "this_node": member.this_node,
        })).collect::<Vec<_>>(),
        "groups": reply.groups.iter().map(group_json).collect::<Vec<_>>(),
    });
    if !reply.member {
        return Output {
            human: "not in a cluster: `forge cluster init` forms one, `forge cluster join PEER` joins one"
                .into(),
            json,
        };
    }
    let mut human = format!("{} members:", reply.members.len());
    for member in &reply.members {
        let state = if member.this_node {
            "this node"
        } else if member.reachable {
            "reachable"
        } else {
            "unreachable"
        };
        let _ = write!(human, "\n  {} {state}", member.node_id);
    }
    for group in &reply.groups {
        let _ = write!(human, "\n{}", group_line(group));
    }
    Output { human, json }
}

/// What `forge group create` prints.
#[must_use]
pub fn render_group(verb: &str, group: &GroupInfo) -> Output {
    Output {
        human: format!("{verb} {}", group_line(group)),
        json: group_json(group),
    }
}
