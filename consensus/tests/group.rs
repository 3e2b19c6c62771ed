//! Raft groups of several nodes on the in-process network: forming, writing through any
//! member, compare-and-swap, a killed leader, a minority partition, a node catching up
//! by log and by snapshot, and many groups sharing one engine and one network.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::sync::Arc;
use std::time::Duration;

use forge_consensus::{
    ConsensusError, GroupHandle, GroupOptions, GroupTable, RAFT_PROTOCOL, serve_raft,
};
use forge_crypto::NodeId;
use forge_mesh::memory::{FaultPlan, MemoryNetwork, MemoryPeer};
use forge_mesh::net::PeerNet;
use forge_store::kv::{KvEngine, MemKv, Syncer};
use forge_store::metadata::{Change, Expected, RecordSpace, RecordUpdate};

fn node_id(index: u8) -> NodeId {
    let mut bytes = [0u8; 32];
    bytes[0] = index;
    bytes[31] = 0xee;
    NodeId::from_bytes(bytes)
}

fn fast() -> GroupOptions {
    GroupOptions {
        heartbeat_ms: 50,
        election_ms: (300, 600),
        forward_deadline: Duration::from_secs(2),
        ..GroupOptions::default()
    }
}

/// One node: its engine (kept across restarts), network view and groups.
struct Node {
    id: NodeId,
    kv: Arc<MemKv>,
    peer: Arc<MemoryPeer>,
    table: GroupTable,
}

impl Node {
    fn new(network: &MemoryNetwork, index: u8) -> Self {
        let id = node_id(index);
        let peer = network.join(id);
        Self::serve(id, Arc::new(MemKv::new()), peer)
    }

    fn serve(id: NodeId, kv: Arc<MemKv>, peer: Arc<MemoryPeer>) -> Self {
        let table = GroupTable::new();
        let inbound = peer.serve(RAFT_PROTOCOL).unwrap();
        tokio::spawn(serve_raft(inbound, table.clone(), |_| Ok(())));
        Self {
            id,
            kv,
            peer,
            table,
        }
    }

    async fn start(&self, group: u64, options: GroupOptions) -> GroupHandle {
        let kv: Arc<dyn KvEngine> = self.kv.clone();
        let syncer = Arc::new(Syncer::start(kv.clone()).unwrap());
        let net: Arc<dyn PeerNet> = self.peer.clone();
        GroupHandle::start(&self.table, group, kv, Some(syncer), net, options)
            .await
            .unwrap()
    }

    /// Stops the node's groups, loses what its engine had not made durable (a power
    /// cut), and cuts it off the network.
    async fn kill(&self, network: &MemoryNetwork) {
        network.crash(self.id);
        for group in self.table.drain() {
            group.shutdown().await.unwrap();
        }
        self.kv.crash(0);
    }

    /// Back on the network with what survived on its engine.
    fn revive(&self, network: &MemoryNetwork) -> Self {
        network.restart(self.id);
        Self::serve(self.id, self.kv.clone(), self.peer.clone())
    }
}

fn put(key: &str, value: &str) -> RecordUpdate {
    RecordUpdate::new(
        RecordSpace::REFS,
        key.as_bytes().to_vec(),
        Expected::Any,
        Change::Put(value.as_bytes().to_vec()),
    )
}

fn swap(key: &str, from: Option<&str>, to: &str) -> RecordUpdate {
    RecordUpdate::new(
        RecordSpace::REFS,
        key.as_bytes().to_vec(),
        from.map_or(Expected::Absent, |value| {
            Expected::Value(value.as_bytes().to_vec())
        }),
        Change::Put(to.as_bytes().to_vec()),
    )
}

async fn leader_of(handles: &[GroupHandle]) -> usize {
    for _ in 0..200 {
        if let Some(index) = handles.iter().position(|handle| handle.status().leading) {
            return index;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no leader within 5 s");
}

async fn read(handle: &GroupHandle, key: &str) -> Option<String> {
    handle
        .read_record("refs", key.as_bytes())
        .await
        .unwrap()
        .map(|bytes| String::from_utf8(bytes).unwrap())
}

/// Applies through `handles[from]`, retrying while the group elects a leader.
async fn apply_eventually(handle: &GroupHandle, updates: &[RecordUpdate]) {
    for _ in 0..100 {
        match handle.apply(updates).await {
            Ok(()) => return,
            Err(ConsensusError::NoLeader { .. } | ConsensusError::Network(_)) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("{error}"),
        }
    }
    panic!("no write within 5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_commits_through_any_member_and_outlives_its_leader() {
    let network = MemoryNetwork::new(1);
    let nodes: Vec<Node> = (1..=3).map(|index| Node::new(&network, index)).collect();
    let mut handles = Vec::new();
    for node in &nodes {
        handles.push(node.start(5, fast()).await);
    }
    let ids: Vec<NodeId> = nodes.iter().map(|node| node.id).collect();
    handles[0].initialize(&ids).await.unwrap();
    let leader = leader_of(&handles).await;
    let follower = (leader + 1) % 3;

    // A write through a follower is forwarded; a read anywhere sees it.
    apply_eventually(&handles[follower], &[swap("main", None, "a")]).await;
    for handle in &handles {
        assert_eq!(read(handle, "main").await.as_deref(), Some("a"));
    }
    // Compare-and-swap: a stale expectation changes nothing, and says which record.
    let stale = handles[follower]
        .apply(&[put("other", "x"), swap("main", None, "b")])
        .await
        .unwrap_err();
    assert!(
        matches!(&stale, ConsensusError::Conflict { key, .. } if key == b"main"),
        "{stale}"
    );
    assert_eq!(
        read(&handles[leader], "other").await,
        None,
        "all or nothing"
    );
    handles[leader]
        .apply(&[swap("main", Some("a"), "b")])
        .await
        .unwrap();

    // The leader dies: the other two elect one and go on.
    nodes[leader].kill(&network).await;
    let survivors: Vec<GroupHandle> = (0..3)
        .filter(|index| *index != leader)
        .map(|index| handles[index].clone())
        .collect();
    let new_leader = leader_of(&survivors).await;
    apply_eventually(&survivors[1 - new_leader], &[swap("main", Some("b"), "c")]).await;
    assert_eq!(
        read(&survivors[new_leader], "main").await.as_deref(),
        Some("c")
    );

    // It comes back with what it had made durable, and catches up by log.
    let revived = nodes[leader].revive(&network);
    let back = revived.start(5, fast()).await;
    let status = survivors[new_leader].status();
    let last = status.committed.unwrap();
    back.wait_applied(last, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        back.local_records("refs", b"main").unwrap(),
        vec![(b"main".to_vec(), b"c".to_vec())]
    );
    assert!(!back.status().leading || back.status().term > status.term);
}

/// Found by the simulator: a compare-and-swap forwarded by a follower and delivered twice
/// to the leader applied once (the copy) and answered the client with a conflict (the
/// original, finding its own write): the client was told its write failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_delivered_twice_is_applied_once_and_acknowledged() {
    let network = MemoryNetwork::new(8);
    let nodes: Vec<Node> = (1..=3).map(|index| Node::new(&network, index)).collect();
    let mut handles = Vec::new();
    for node in &nodes {
        handles.push(node.start(6, fast()).await);
    }
    let ids: Vec<NodeId> = nodes.iter().map(|node| node.id).collect();
    handles[0].initialize(&ids).await.unwrap();
    let leader = leader_of(&handles).await;
    let follower = (leader + 1) % 3;
    apply_eventually(&handles[follower], &[swap("main", None, "a")]).await;
    // Every message from now on arrives twice.
    network.set_faults(FaultPlan {
        duplicate: 1.0,
        ..FaultPlan::NONE
    });
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "d")] {
        handles[follower]
            .apply(&[swap("main", Some(from), to)])
            .await
            .unwrap_or_else(|error| panic!("{from} -> {to} through the follower: {error}"));
    }
    network.set_faults(FaultPlan::NONE);
    assert_eq!(read(&handles[leader], "main").await.as_deref(), Some("d"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_minority_side_of_a_partition_cannot_commit_and_the_majority_can() {
    let network = MemoryNetwork::new(2);
    let nodes: Vec<Node> = (1..=5).map(|index| Node::new(&network, index)).collect();
    let mut handles = Vec::new();
    for node in &nodes {
        handles.push(node.start(9, fast()).await);
    }
    let ids: Vec<NodeId> = nodes.iter().map(|node| node.id).collect();
    handles[0].initialize(&ids).await.unwrap();
    let leader = leader_of(&handles).await;
    apply_eventually(&handles[leader], &[put("k", "before")]).await;

    // The leader and one other on one side, three on the other.
    let minority = [leader, (leader + 1) % 5];
    let majority: Vec<usize> = (0..5).filter(|index| !minority.contains(index)).collect();
    network.partition(
        &minority.map(|index| ids[index]),
        &majority.iter().map(|index| ids[*index]).collect::<Vec<_>>(),
    );
    let cut_off = tokio::time::timeout(
        Duration::from_secs(3),
        handles[leader].apply(&[put("k", "minority")]),
    )
    .await;
    assert!(
        !matches!(cut_off, Ok(Ok(()))),
        "a minority leader must not commit"
    );
    let majority_handles: Vec<GroupHandle> = majority
        .iter()
        .map(|index| handles[*index].clone())
        .collect();
    let new_leader = leader_of(&majority_handles).await;
    apply_eventually(&majority_handles[new_leader], &[put("k", "majority")]).await;

    network.heal();
    // Everyone converges on the majority's value; the minority's write never applied.
    for handle in &handles {
        let mut value = None;
        for _ in 0..200 {
            value = handle.read_record("refs", b"k").await.ok().flatten();
            if value.as_deref() == Some(&b"majority"[..]) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(value.as_deref(), Some(&b"majority"[..]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_during_many_commits_catches_up_by_snapshot() {
    let network = MemoryNetwork::new(3);
    let options = GroupOptions {
        snapshot_after_entries: 20,
        entries_kept_after_snapshot: 0,
        ..fast()
    };
    let nodes: Vec<Node> = (1..=3).map(|index| Node::new(&network, index)).collect();
    let mut handles = Vec::new();
    for node in &nodes {
        handles.push(node.start(2, options).await);
    }
    let ids: Vec<NodeId> = nodes.iter().map(|node| node.id).collect();
    handles[0].initialize(&ids).await.unwrap();
    let leader = leader_of(&handles).await;
    let down = (leader + 1) % 3;
    nodes[down].kill(&network).await;
    for index in 0..100 {
        apply_eventually(
            &handles[leader],
            &[put(&format!("key-{index:03}"), &format!("value-{index}"))],
        )
        .await;
    }
    // The leader's log was compacted past what the down node has: only a snapshot helps.
    // (Snapshots and purges run in the background: wait for them.)
    let mut leader_status = handles[leader].status();
    for _ in 0..200 {
        if leader_status.purged.is_some_and(|purged| purged > 10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        leader_status = handles[leader].status();
    }
    assert!(
        leader_status.purged.is_some_and(|purged| purged > 10),
        "{leader_status:?}"
    );
    let last = leader_status.committed.unwrap();
    let revived = nodes[down].revive(&network);
    let back = revived.start(2, options).await;
    back.wait_applied(last, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(back.status().snapshot.is_some(), "{:?}", back.status());
    let records = back.local_records("refs", b"key-").unwrap();
    assert_eq!(records.len(), 100);
    assert_eq!(records[42], (b"key-042".to_vec(), b"value-42".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_groups_share_one_engine_and_one_network_without_mixing() {
    let network = MemoryNetwork::new(4);
    let nodes: Vec<Node> = (1..=3).map(|index| Node::new(&network, index)).collect();
    let ids: Vec<NodeId> = nodes.iter().map(|node| node.id).collect();
    let mut groups = Vec::new();
    for group in 10..16u64 {
        let mut handles = Vec::new();
        for node in &nodes {
            handles.push(node.start(group, fast()).await);
        }
        handles[0].initialize(&ids).await.unwrap();
        groups.push(handles);
    }
    for (offset, handles) in groups.iter().enumerate() {
        let leader = leader_of(handles).await;
        apply_eventually(&handles[leader], &[put("main", &format!("group-{offset}"))]).await;
    }
    for (offset, handles) in groups.iter().enumerate() {
        for handle in handles {
            assert_eq!(
                read(handle, "main").await,
                Some(format!("group-{offset}")),
                "each group sees only its own records"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_share_their_heartbeats_one_message_per_peer() {
    let network = MemoryNetwork::new(5);
    let nodes: Vec<Node> = (1..=3).map(|index| Node::new(&network, index)).collect();
    let ids: Vec<NodeId> = nodes.iter().map(|node| node.id).collect();
    let groups = 30u64;
    let mut all = Vec::new();
    for group in 1..=groups {
        let mut handles = Vec::new();
        for node in &nodes {
            handles.push(node.start(group, fast()).await);
        }
        handles[usize::try_from(group % 3).unwrap()]
            .initialize(&ids)
            .await
            .unwrap();
        all.push(handles);
    }
    for handles in &all {
        leader_of(handles).await;
    }
    // Idle: heartbeats only. One per group per follower each 50 ms would be
    // 30 groups x 2 followers x 20/s = 1,200 requests a second; shared, each node sends
    // at most one message per peer per window.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = network.stats().requests;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_second = (network.stats().requests - before) / 2;
    assert!(
        per_second < 400,
        "{per_second} Raft requests a second for {groups} idle groups"
    );
    for handles in &all {
        let leader = leader_of(handles).await;
        apply_eventually(&handles[leader], &[put("main", "still-live")]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ref_updates_stay_linearizable_while_the_leader_is_killed_and_comes_back() {
    use forge_consensus::history::{Event, Op};

    let network = MemoryNetwork::new(5);
    let nodes: Vec<Node> = (1..=3).map(|index| Node::new(&network, index)).collect();
    let mut handles = Vec::new();
    for node in &nodes {
        handles.push(node.start(3, fast()).await);
    }
    let ids: Vec<NodeId> = nodes.iter().map(|node| node.id).collect();
    handles[0].initialize(&ids).await.unwrap();
    let leader = leader_of(&handles).await;

    let started = std::time::Instant::now();
    let now = move || u64::try_from(started.elapsed().as_nanos()).unwrap();
    let history = Arc::new(std::sync::Mutex::new(Vec::<Event>::new()));
    let mut clients = Vec::new();
    // Three clients, one per node: each reads the ref and tries to move it on.
    for (client, handle) in handles.iter().enumerate() {
        let handle = handle.clone();
        let history = history.clone();
        clients.push(tokio::spawn(async move {
            // Until the leader has been killed and has come back, and a while after.
            for round in 0.. {
                if now() > 3_500_000_000 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                let invoked = now();
                let seen = tokio::time::timeout(
                    Duration::from_secs(2),
                    handle.read_record("refs", b"main"),
                )
                .await;
                let seen = match seen {
                    Ok(Ok(value)) => value.map(|bytes| String::from_utf8(bytes).unwrap()),
                    // A read that failed had no effect: not part of the history.
                    _ => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                history.lock().unwrap().push(Event {
                    op: Op::Read(seen.clone()),
                    invoked,
                    returned: now(),
                });
                let new = format!("c{client}-r{round}");
                let update = RecordUpdate::new(
                    RecordSpace::REFS,
                    b"main".to_vec(),
                    seen.clone().map_or(Expected::Absent, |value| {
                        Expected::Value(value.into_bytes())
                    }),
                    Change::Put(new.clone().into_bytes()),
                );
                let invoked = now();
                let outcome =
                    tokio::time::timeout(Duration::from_secs(2), handle.apply(&[update])).await;
                let (applied, returned) = match outcome {
                    Ok(Ok(())) => (Some(true), now()),
                    Ok(Err(ConsensusError::Conflict { .. })) => (Some(false), now()),
                    // Refused before it was appended anywhere: no effect, so not part of
                    // the history (a failed swap there means its expectation did not hold).
                    Ok(Err(ConsensusError::NoLeader { .. })) => continue,
                    // Lost in flight, or the node is down: it may have applied.
                    _ => (None, u64::MAX),
                };
                history.lock().unwrap().push(Event {
                    op: Op::Swap {
                        expected: seen,
                        new,
                        applied,
                    },
                    invoked,
                    returned,
                });
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let killed_at = now();
    nodes[leader].kill(&network).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let revived = nodes[leader].revive(&network);
    let back = revived.start(3, fast()).await;
    for client in clients {
        client.await.unwrap();
    }
    // A final read through the node that came back closes the history.
    let invoked = now();
    let mut last = None;
    for _ in 0..100 {
        if let Ok(value) = back.read_record("refs", b"main").await {
            last = Some(value.map(|bytes| String::from_utf8(bytes).unwrap()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut history = history.lock().unwrap().clone();
    history.push(Event {
        op: Op::Read(last.expect("a final read")),
        invoked,
        returned: now(),
    });
    let applied_after = |since: u64| {
        history
            .iter()
            .filter(|event| {
                event.invoked > since
                    && matches!(
                        event.op,
                        Op::Swap {
                            applied: Some(true),
                            ..
                        }
                    )
            })
            .count()
    };
    assert!(
        applied_after(0) > applied_after(killed_at) && applied_after(killed_at) > 0,
        "swaps applied before and after the kill: {} in all, {} after",
        applied_after(0),
        applied_after(killed_at)
    );
    assert!(
        forge_consensus::history::check(&history),
        "not linearizable: {history:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_through_a_follower_catches_up_and_another_leaves() {
    let network = MemoryNetwork::new(6);
    let nodes: Vec<Node> = (1..=3).map(|index| Node::new(&network, index)).collect();
    let first_two: Vec<GroupHandle> = vec![
        nodes[0].start(4, fast()).await,
        nodes[1].start(4, fast()).await,
    ];
    first_two[0]
        .initialize(&[nodes[0].id, nodes[1].id])
        .await
        .unwrap();
    let leader = leader_of(&first_two).await;
    apply_eventually(&first_two[leader], &[put("before", "join")]).await;
    // The newcomer runs the group unformed; a follower asks the leader to add it.
    let newcomer = nodes[2].start(4, fast()).await;
    first_two[1 - leader]
        .add_member(&nodes[2].id)
        .await
        .unwrap();
    let committed = first_two[leader].status().committed.unwrap();
    newcomer
        .wait_applied(committed, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(read(&newcomer, "before").await.as_deref(), Some("join"));
    assert_eq!(first_two[leader].status().voters.len(), 3);
    // The old leader leaves; the two others go on without it.
    first_two[leader]
        .remove_member(&nodes[leader].id)
        .await
        .unwrap();
    let remaining = vec![first_two[1 - leader].clone(), newcomer.clone()];
    let mut voters = Vec::new();
    for _ in 0..200 {
        voters = remaining[0].status().voters;
        if voters.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(!voters.contains(&nodes[leader].id), "{voters:?}");
    let new_leader = leader_of(&remaining).await;
    apply_eventually(&remaining[new_leader], &[put("after", "leave")]).await;
    assert_eq!(
        read(&remaining[1 - new_leader], "after").await.as_deref(),
        Some("leave")
    );
}
