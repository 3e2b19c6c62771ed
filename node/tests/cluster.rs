//! A cluster of real `forge` daemons on loopback: formed, joined through a member that
//! trusts the joiner, a volume group created on its members, a leader killed and the
//! group going on, a node leaving; driven through the CLI as a user would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Site, same_tree, scrape};
use serde_json::Value;

fn status(site: &Site) -> Value {
    site.vault.json(&["cluster", "status"])
}

/// The group named `name` in a status (Null when it has none).
fn group<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["groups"]
        .as_array()
        .and_then(|groups| groups.iter().find(|group| group["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Waits until `check` holds of `site`'s status (or fails with the last one seen).
fn eventually(site: &Site, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = status(site);
        if check(&seen) {
            return seen;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(site.vault.data_dir().join("logs/daemon.log"))
                .unwrap_or_default();
            panic!("{what} within 30 s: {seen:#}\ndaemon log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Site `joiner` joins the cluster through `member`, which trusts it.
fn join(joiner: &Site, member: &Site, name: &str) {
    joiner.meet(member, name);
    member.meet(joiner, &format!("joiner-{}", &joiner.id[..8]));
    member.vault.ok(&["peer", "trust", &joiner.id, "--cluster"]);
    let joined = joiner.vault.json(&["cluster", "join", name]);
    assert_eq!(joined["member"], true, "{joined}");
}

#[test]
fn a_cluster_forms_grows_runs_a_group_through_a_leader_loss_and_a_node_leaves() {
    let sites: Vec<Site> = (0..4).map(|_| Site::start()).collect();

    // Without a daemon, or outside a cluster, it says what to do.
    let outside = status(&sites[0]);
    assert_eq!(outside["member"], false);
    let formed = sites[0].vault.json(&["cluster", "init"]);
    assert_eq!(formed["member"], true);
    assert_eq!(formed["members"].as_array().unwrap().len(), 1);
    let again = sites[0].vault.run(&["cluster", "init"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("in a cluster already"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // A node the member does not trust is refused, and stays outside.
    sites[1].meet(&sites[0], "first");
    let refused = sites[1].vault.run(&["cluster", "join", "first"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--cluster"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(status(&sites[1])["member"], false);

    // Trusted, three nodes join (one through a member that joined itself).
    sites[0]
        .vault
        .ok(&["peer", "trust", &sites[1].id, "--cluster"]);
    let joined = sites[1].vault.json(&["cluster", "join", "first"]);
    assert_eq!(joined["member"], true, "{joined}");
    join(&sites[2], &sites[0], "first");
    join(&sites[3], &sites[1], "second");
    let all = eventually(&sites[0], "four members, all voters", |seen| {
        seen["members"].as_array().unwrap().len() == 4
            && group(seen, "cluster")["nodes"].as_array().unwrap().len() == 4
    });
    assert!(group(&all, "cluster")["leader"].is_string(), "{all:#}");
    // /metrics says the same: members, and the cluster group's term and indexes here.
    let metrics = scrape(&sites[0].metrics);
    assert_eq!(
        metrics.get("forge_cluster_members"),
        Some(&4.0),
        "{metrics:?}"
    );
    assert!(
        metrics
            .get("forge_raft_committed_index{group=\"cluster\"}")
            .is_some_and(|index| *index > 0.0),
        "{metrics:?}"
    );
    let leaders: f64 = sites
        .iter()
        .map(|site| {
            scrape(&site.metrics)
                .get("forge_raft_leader{group=\"cluster\"}")
                .copied()
                .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(leaders, 1.0, "one leader of the cluster group");

    // A volume group on three of them; a layout wider than its nodes is refused.
    let ids: Vec<&str> = sites.iter().map(|site| site.id.as_str()).collect();
    let create = |site: &Site, name: &str, nodes: &[&str], layout: &str| {
        let nodes = nodes.join(",");
        site.vault.run(&[
            "group", "create", name, "--nodes", &nodes, "--ec", layout, "--json",
        ])
    };
    let too_wide = create(&sites[0], "wide", &ids[..3], "2+2");
    assert!(!too_wide.status.success());
    assert!(
        String::from_utf8_lossy(&too_wide.stderr).contains("at least 4"),
        "{}",
        String::from_utf8_lossy(&too_wide.stderr)
    );
    let created = create(&sites[0], "east", &ids[1..4], "2+1");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let created: Value = serde_json::from_slice(&created.stdout).unwrap();
    assert_eq!(created["layout"], "2+1");
    let taken = create(&sites[1], "east", &ids[1..4], "2+1");
    assert!(!taken.status.success(), "a second group named east");
    let running = eventually(&sites[2], "group east formed with a leader", |seen| {
        let east = group(seen, "east");
        east["running_here"] == true && east["leader"].is_string()
    });
    let leader = group(&running, "east")["leader"]
        .as_str()
        .unwrap()
        .to_owned();
    // The node outside the group sees it in the registry without running it.
    let outside_view = status(&sites[0]);
    assert_eq!(group(&outside_view, "east")["running_here"], false);

    // The group's leader is killed: the two others elect another.
    let mut sites = sites;
    let victim = sites.iter().position(|site| site.id == leader).unwrap();
    sites[victim].daemon.take();
    let witness = (1..4).find(|index| *index != victim).unwrap();
    eventually(&sites[witness], "a new leader of east", |seen| {
        let east = group(seen, "east");
        east["leader"].is_string() && east["leader"] != leader.as_str()
    });
    sites[victim].restart();
    eventually(&sites[victim], "the killed node back in east", |seen| {
        let east = group(seen, "east");
        east["running_here"] == true && east["leader"].is_string()
    });

    // A node in a volume group cannot leave (its data would go with it); one that is
    // not can, and the cluster goes on without it.
    let stuck = sites[1].vault.run(&["cluster", "leave"]);
    assert!(!stuck.status.success());
    let left = sites[0].vault.json(&["cluster", "leave"]);
    assert_eq!(left["member"], false, "{left}");
    eventually(&sites[1], "three members after one left", |seen| {
        seen["members"].as_array().unwrap().len() == 3
            && group(seen, "cluster")["nodes"].as_array().unwrap().len() == 3
            && group(seen, "cluster")["leader"].is_string()
    });
}

/// Writes `files` files of `file_bytes` incompressible bytes under `dir` (one file twice:
/// the copy dedups), seeded.
fn write_random_tree(dir: &std::path::Path, files: usize, file_bytes: usize, seed: u64) {
    let mut next = common::xorshift(seed);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let mut first = Vec::new();
    for file in 0..files {
        let mut bytes = Vec::with_capacity(file_bytes);
        while bytes.len() < file_bytes {
            bytes.extend_from_slice(&next().to_le_bytes());
        }
        bytes.truncate(file_bytes);
        let path = if file % 3 == 0 {
            dir.join("sub").join(format!("f{file}.bin"))
        } else {
            dir.join(format!("f{file}.bin"))
        };
        std::fs::write(path, &bytes).unwrap();
        if file == 0 {
            first = bytes;
        }
    }
    std::fs::write(dir.join("copy-of-f0.bin"), first).unwrap();
    std::fs::write(dir.join("small.txt"), b"a small file\n").unwrap();
}

/// Exports `volume` on `site` into a fresh directory named `name`, and checks it against
/// `expected` (retrying while the site's mirror of the group's ref catches up).
fn export_matches(
    site: &Site,
    volume: &str,
    name: &str,
    expected: &std::path::Path,
    snapshot: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // The volume itself may not be adopted here yet.
        let output = site.vault.run(&["snapshot", "list", volume, "--json"]);
        let listed: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        if output.status.success()
            && listed
                .as_array()
                .is_some_and(|list| list.iter().any(|entry| entry["id"] == snapshot))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "snapshot {snapshot} never reached {}: {listed}",
            site.id
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = site.vault.path(name);
    let exported = site.vault.run(&[
        "volume",
        "export",
        volume,
        out.to_str().unwrap(),
        "--snapshot",
        snapshot,
    ]);
    assert!(
        exported.status.success(),
        "export on {}: {}",
        site.id,
        String::from_utf8_lossy(&exported.stderr)
    );
    same_tree(expected, &out);
}

#[test]
fn a_volume_of_a_six_node_4_plus_2_group_is_spread_survives_two_killed_nodes_and_publishes_only_when_every_shard_lands()
 {
    let mut sites = cluster_with_group(6, 6, "g", "4+2");

    // A group volume takes the group's layout; its own is refused, as is an unknown group.
    let conflicting = sites[1]
        .vault
        .run(&["volume", "create", "data", "--group", "g", "--ec", "2+1"]);
    assert!(!conflicting.status.success());
    let unknown = sites[1]
        .vault
        .run(&["volume", "create", "data", "--group", "nope"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no volume group named nope"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    let created = sites[1]
        .vault
        .json(&["volume", "create", "data", "--group", "g"]);
    assert_eq!(created["ec"], "4+2", "{created}");
    let again = sites[2]
        .vault
        .run(&["volume", "create", "data", "--group", "g"]);
    assert!(!again.status.success(), "a second volume named data");

    // Imported on one member, exported byte-identical on another.
    let source = sites[1].vault.path("source");
    write_random_tree(&source, 24, 200_000, 7);
    let first = sites[1]
        .vault
        .json(&["volume", "import", "data", source.to_str().unwrap()]);
    let first_id = first["snapshot"].as_str().unwrap().to_owned();
    export_matches(&sites[4], "data", "out-4", &source, &first_id);
    let fsck = sites[4].vault.json(&["fsck"]);
    assert!(fsck["problems"].as_array().unwrap().is_empty(), "{fsck}");

    // The importer and the group's leader are killed (another member when they are the
    // same): every byte is still there, from the four left.
    let leader = group(&status(&sites[2]), "g")["leader"]
        .as_str()
        .unwrap()
        .to_owned();
    let second_victim = sites
        .iter()
        .position(|site| site.id == leader && site.id != sites[1].id)
        .unwrap_or(5);
    let victims = [1, second_victim];
    for victim in victims {
        sites[victim].daemon.take();
    }
    let survivor = (0..6).find(|index| !victims.contains(index)).unwrap();
    export_matches(
        &sites[survivor],
        "data",
        "out-after-kill",
        &source,
        &first_id,
    );

    // With two of six members down a 4+2 layout cannot put six shards on six nodes: the
    // publish fails, naming a missing member, and the branch does not move.
    let changed = sites[survivor].vault.path("changed");
    write_random_tree(&changed, 6, 100_000, 8);
    let refused =
        sites[survivor]
            .vault
            .run(&["volume", "import", "data", changed.to_str().unwrap()]);
    assert!(!refused.status.success(), "published without two members");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("not published")
            && victims
                .iter()
                .any(|victim| stderr.contains(&sites[*victim].id[..16])),
        "{stderr}"
    );

    // Back: the killed members catch up, and a publish from another member lands.
    for victim in victims {
        sites[victim].restart();
    }
    for victim in victims {
        eventually(&sites[victim], "back in group g", |seen| {
            let g = group(seen, "g");
            g["running_here"] == true && g["leader"].is_string()
        });
    }
    let second = sites[3]
        .vault
        .json(&["volume", "import", "data", changed.to_str().unwrap()]);
    let second_id = second["snapshot"].as_str().unwrap().to_owned();
    export_matches(&sites[1], "data", "out-restarted", &changed, &second_id);
    export_matches(&sites[5], "data", "out-first-again", &source, &first_id);

    // A branch made on one member is the group's: a second of that name is refused on
    // another member, and a delisted snapshot leaves every member's list.
    sites[2]
        .vault
        .ok(&["snapshot", "branch", "data", "old", "--from", &first_id]);
    let taken = sites[4]
        .vault
        .run(&["snapshot", "branch", "data", "old", "--from", &second_id]);
    assert!(!taken.status.success(), "branch old made twice");
    let listed = |site: &Site| -> Vec<String> {
        site.vault
            .json(&["snapshot", "list", "data"])
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| entry["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let until = |site: &Site, what: &str, check: &dyn Fn(&[String]) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check(&listed(site)) {
            assert!(Instant::now() < deadline, "{what}: {:?}", listed(site));
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // A third snapshot on main leaves the second heading no branch: it may be delisted,
    // on a member other than the one that published either.
    std::fs::write(changed.join("third.txt"), b"third\n").unwrap();
    let third = sites[0]
        .vault
        .json(&["volume", "import", "data", changed.to_str().unwrap()]);
    let third_id = third["snapshot"].as_str().unwrap().to_owned();
    until(&sites[3], "the third snapshot mirrored", &|ids| {
        ids.contains(&third_id)
    });
    let heading = sites[3]
        .vault
        .run(&["snapshot", "delete", "data", &first_id]);
    assert!(!heading.status.success(), "the head of branch old");
    sites[3]
        .vault
        .ok(&["snapshot", "delete", "data", &second_id]);
    until(
        &sites[5],
        "the second snapshot delisted everywhere",
        &|ids| !ids.contains(&second_id) && ids.contains(&third_id) && ids.contains(&first_id),
    );
    let fsck = sites[0].vault.json(&["fsck"]);
    assert!(fsck["problems"].as_array().unwrap().is_empty(), "{fsck}");
}

fn repair(site: &Site, group: &str) -> Value {
    site.vault.json(&["group", "repair", group])
}

#[test]
fn a_snapshot_published_while_a_member_was_down_uses_stand_ins_and_repair_moves_every_shard_home() {
    let mut sites = cluster_with_group(4, 4, "r", "2+1");
    sites[0]
        .vault
        .ok(&["volume", "create", "data", "--group", "r"]);
    // Nothing published yet: nothing to repair, and that is whole.
    let empty = repair(&sites[1], "r");
    assert_eq!(empty["whole"], true, "{empty:#}");

    // One of four members down: a 2+1 layout still finds three distinct members for each
    // chunk, standing in for the absent one.
    sites[3].daemon.take();
    let source = sites[0].vault.path("source");
    write_random_tree(&source, 8, 150_000, 11);
    let published = sites[0]
        .vault
        .json(&["volume", "import", "data", source.to_str().unwrap()]);
    let snapshot = published["snapshot"].as_str().unwrap().to_owned();
    let partial = repair(&sites[1], "r");
    assert_eq!(
        partial["whole"], false,
        "the absent member's shards: {partial:#}"
    );
    let chunks = partial["chunks"].as_u64().unwrap();
    assert!(chunks > 0, "{partial:#}");
    assert!(
        partial["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|member| member["node_id"] == sites[3].id.as_str() && member["error"].is_string()),
        "{partial:#}"
    );

    // Back: repair rebuilds its shards onto it and the stand-ins let theirs go.
    sites[3].restart();
    eventually(&sites[3], "back in group r", |seen| {
        group(seen, "r")["leader"].is_string()
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut released = 0;
    loop {
        let run = repair(&sites[2], "r");
        released += run["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|member| member["released"].as_u64().unwrap_or(0))
            .sum::<u64>();
        if run["whole"] == true && run["shards_held"] == chunks * 3 {
            let rebuilt_on_returner = eventually(&sites[3], "its repair counted", |seen| {
                group(seen, "r")["repair"]["rebuilt_shards"]
                    .as_u64()
                    .unwrap_or(0)
                    > 0
            });
            let rebuilt = group(&rebuilt_on_returner, "r")["repair"]["rebuilt_shards"]
                .as_u64()
                .unwrap();
            if released == rebuilt {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "never whole with every stand-in released: {run:#} (released {released})"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let metrics = scrape(&sites[3].metrics);
    assert!(
        metrics
            .get("forge_repair_rebuilt_shards{group=\"r\"}")
            .is_some_and(|rebuilt| *rebuilt > 0.0),
        "{metrics:?}"
    );

    // Every shard home: the returner exports it, and so does a member once the importer
    // is gone.
    export_matches(&sites[3], "data", "out-returner", &source, &snapshot);
    sites[0].daemon.take();
    export_matches(
        &sites[2],
        "data",
        "out-without-importer",
        &source,
        &snapshot,
    );
}

/// `count` sites formed into a cluster (all voters), and a volume group `name` with
/// `layout` on the first `in_group` of them, running with a leader on each.
fn cluster_with_group(count: usize, in_group: usize, name: &str, layout: &str) -> Vec<Site> {
    let sites: Vec<Site> = (0..count).map(|_| Site::start()).collect();
    sites[0].vault.json(&["cluster", "init"]);
    for index in 1..count {
        join(&sites[index], &sites[0], "first");
    }
    eventually(&sites[0], "every member a voter", |seen| {
        seen["members"].as_array().unwrap().len() == count
            && group(seen, "cluster")["nodes"].as_array().unwrap().len() == count
    });
    let nodes = sites[..in_group]
        .iter()
        .map(|site| site.id.as_str())
        .collect::<Vec<_>>()
        .join(",");
    sites[0]
        .vault
        .ok(&["group", "create", name, "--nodes", &nodes, "--ec", layout]);
    for site in &sites[..in_group] {
        eventually(site, "the group running with a leader", |seen| {
            let running = group(seen, name);
            running["running_here"] == true && running["leader"].is_string()
        });
    }
    sites
}

/// Three sites formed into a cluster with a 2+1 volume group named `group`.
/// Volume `name` as `site` lists it, once its watch loop adopted it (30 s at most).
fn volume_listed(site: &Site, name: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = site.vault.json(&["volume", "list"]);
        if let Some(volume) = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|volume| volume["name"] == name)
        {
            return volume.clone();
        }
        assert!(
            Instant::now() < deadline,
            "volume {name} never reached this member: {listed}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn three_node_group(group_name: &str) -> Vec<Site> {
    cluster_with_group(3, 3, group_name, "2+1")
}

#[test]
fn a_group_volume_syncs_between_two_three_node_sites_into_the_receivers_group() {
    let east = three_node_group("east");
    let mut west = three_node_group("west");
    east[0]
        .vault
        .ok(&["volume", "create", "data", "--group", "east"]);
    let source = east[0].vault.path("source");
    write_random_tree(&source, 8, 120_000, 21);
    let first = east[0]
        .vault
        .json(&["volume", "import", "data", source.to_str().unwrap()]);
    let first_id = first["snapshot"].as_str().unwrap().to_owned();

    // West's first member takes new volumes from east's second into its group; east's
    // second (not the importer: any member drives a sync) shares the keys and pushes.
    west[0].meet(&east[1], "east-1");
    east[1].meet(&west[0], "west-0");
    west[0].vault.ok(&[
        "peer",
        "trust",
        "east-1",
        "--new-volumes",
        "--group",
        "west",
    ]);
    // The snapshot's author (east's importer) is trusted as one too.
    west[0].vault.ok(&[
        "peer",
        "trust",
        &east[0].id,
        "--new-volumes",
        "--group",
        "west",
    ]);
    let no_group = west[0]
        .vault
        .run(&["peer", "trust", "east-1", "--group", "west"]);
    assert!(!no_group.status.success(), "--group without --new-volumes");
    export_matches(&east[1], "data", "east-1-out", &source, &first_id);
    east[1]
        .vault
        .ok(&["volume", "share", "data", "--to", "west-0", "--write"]);
    let synced = east[1].sync("data", "west-0");
    assert_eq!(synced["snapshot"], first_id.as_str(), "{synced}");

    // In west's group: its layout, on every member, spread so that it reads without the
    // member that received it.
    for member in &west[1..] {
        let data = volume_listed(member, "data");
        assert_eq!(data["ec"], "2+1", "{data}");
    }
    west[0].daemon.take();
    export_matches(&west[2], "data", "west-2-out", &source, &first_id);
    west[0].restart();

    // A change made on another east member goes to another west member's group copy
    // (that member trusted to write it), moving west's branch through its Raft.
    std::fs::write(source.join("later.txt"), b"written later\n").unwrap();
    let second = east[2]
        .vault
        .json(&["volume", "import", "data", source.to_str().unwrap()]);
    let second_id = second["snapshot"].as_str().unwrap().to_owned();
    west[1].meet(&east[2], "east-2");
    east[2].meet(&west[1], "west-1");
    west[1]
        .vault
        .ok(&["peer", "trust", "east-2", "--volume", "data", "--write"]);
    // Trust is each node's own (not the group's): the first snapshot's author too.
    west[1]
        .vault
        .ok(&["peer", "trust", &east[0].id, "--volume", "data", "--write"]);
    let pushed = east[2].sync("data", "west-1");
    assert_eq!(pushed["snapshot"], second_id.as_str(), "{pushed}");
    export_matches(&west[0], "data", "west-0-out", &source, &second_id);
    let fsck = west[0].vault.json(&["fsck"]);
    assert!(fsck["problems"].as_array().unwrap().is_empty(), "{fsck}");
}

#[test]
fn a_node_added_to_a_group_takes_its_shards_and_a_removed_one_hands_them_over() {
    let mut sites = cluster_with_group(4, 3, "m", "2+1");
    sites[0]
        .vault
        .ok(&["volume", "create", "data", "--group", "m"]);
    let source = sites[0].vault.path("source");
    write_random_tree(&source, 10, 100_000, 31);
    let imported = sites[0]
        .vault
        .json(&["volume", "import", "data", source.to_str().unwrap()]);
    let snapshot = imported["snapshot"].as_str().unwrap().to_owned();

    // Added: it runs the group, holds the volume's keys, and takes its shards.
    let too_many = sites[1]
        .vault
        .run(&["group", "remove-node", "m", &sites[2].id]);
    assert!(
        String::from_utf8_lossy(&too_many.stderr).contains("cannot go below 3"),
        "{}",
        String::from_utf8_lossy(&too_many.stderr)
    );
    let grown = sites[1]
        .vault
        .json(&["group", "add-node", "m", &sites[3].id]);
    assert_eq!(grown["nodes"].as_array().unwrap().len(), 4, "{grown}");
    eventually(&sites[3], "the new member in group m", |seen| {
        let m = group(seen, "m");
        m["running_here"] == true && m["leader"].is_string()
    });
    let whole = |site: &Site, what: &str, check: &dyn Fn(&Value) -> bool| -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let run = repair(site, "m");
            if run["whole"] == true && check(&run) {
                return run;
            }
            assert!(Instant::now() < deadline, "{what}: {run:#}");
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let newcomer = sites[3].id.clone();
    whole(&sites[2], "the newcomer holding its shards", &|run| {
        run["members"].as_array().unwrap().iter().any(|member| {
            member["node_id"] == newcomer.as_str() && member["held"].as_u64().unwrap_or(0) > 0
        })
    });
    export_matches(&sites[3], "data", "out-newcomer", &source, &snapshot);

    // Removed (the importer): its shards move to the others first; then it is out, and
    // the group reads without it.
    let shrunk = sites[2]
        .vault
        .json(&["group", "remove-node", "m", &sites[0].id]);
    assert_eq!(shrunk["nodes"].as_array().unwrap().len(), 3, "{shrunk}");
    assert!(
        !shrunk["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|node| node == sites[0].id.as_str()),
        "{shrunk}"
    );
    eventually(&sites[1], "three voters in m", |seen| {
        group(seen, "m")["nodes"].as_array().unwrap().len() == 3
    });
    sites[0].daemon.take();
    export_matches(&sites[1], "data", "out-after-removal", &source, &snapshot);
    let after = whole(&sites[3], "whole without the removed node", &|_| true);
    assert_eq!(after["members"].as_array().unwrap().len(), 3, "{after:#}");
}

/// Unmounts (lazily) whatever a test mounted, whatever the test did.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.0)
            .output();
    }
}

#[test]
fn group_gc_waits_for_writers_then_frees_a_delisted_snapshot_on_every_member() {
    let sites = three_node_group("g");
    sites[0]
        .vault
        .ok(&["volume", "create", "data", "--group", "g"]);
    let first = sites[0].vault.path("first");
    write_random_tree(&first, 6, 150_000, 41);
    let old = sites[0]
        .vault
        .json(&["volume", "import", "data", first.to_str().unwrap()]);
    let old_id = old["snapshot"].as_str().unwrap().to_owned();
    let second = sites[0].vault.path("second");
    write_random_tree(&second, 4, 100_000, 42);
    // Another member writes once its watch loop adopted the volume.
    volume_listed(&sites[1], "data");
    let kept = sites[1]
        .vault
        .json(&["volume", "import", "data", second.to_str().unwrap()]);
    let kept_id = kept["snapshot"].as_str().unwrap().to_owned();
    export_matches(&sites[1], "data", "before-gc", &second, &kept_id);

    // A mount of the group volume is a writer: the group's gc waits for it, saying so.
    let mountpoint = sites[2].vault.path("mnt");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let _unmount = Unmount(mountpoint.clone());
    export_matches(&sites[2], "data", "mirror-ready", &second, &kept_id);
    sites[2]
        .vault
        .ok(&["volume", "mount", "data", mountpoint.to_str().unwrap()]);
    std::fs::write(mountpoint.join("from-a-mount.txt"), b"written in a mount\n").unwrap();
    let refused = sites[0].vault.run(&["group", "gc", "g"]);
    assert!(!refused.status.success(), "gc ran beside a mount");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("mount on"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let unmounted = sites[2]
        .vault
        .ok(&["volume", "unmount", mountpoint.to_str().unwrap()]);
    assert!(unmounted.contains("committed"), "{unmounted}");

    // Nothing delisted yet: nothing live goes.
    let idle = sites[1].vault.json(&["group", "gc", "g"]);
    assert_eq!(idle["chunks_removed"], 0, "{idle:#}");
    // The first snapshot delisted: its chunks go from every member.
    sites[1].vault.ok(&["snapshot", "delete", "data", &old_id]);
    let swept = sites[1].vault.json(&["group", "gc", "g"]);
    assert!(swept["chunks_removed"].as_u64().unwrap() > 0, "{swept:#}");
    let members = swept["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{swept:#}");
    assert!(
        members
            .iter()
            .all(|member| member["error"].is_null() && member["chunks"].as_u64().unwrap() > 0),
        "{swept:#}"
    );
    // What is listed reads whole everywhere, the mount's commit with it.
    let head = sites[0].vault.json(&["snapshot", "list", "data"]);
    let head_id = head.as_array().unwrap().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(second.join("from-a-mount.txt"), b"written in a mount\n").unwrap();
    export_matches(&sites[0], "data", "after-gc", &second, &head_id);
    for site in &sites {
        let fsck = site.vault.json(&["fsck"]);
        assert!(fsck["problems"].as_array().unwrap().is_empty(), "{fsck}");
    }
}

/// Mounts `volume` on `site` (its daemon serves it) at `name`; the command's output.
fn mount_on(site: &Site, volume: &str, name: &str, extra: &[&str]) -> std::process::Output {
    let mountpoint = site.vault.path(name);
    std::fs::create_dir_all(&mountpoint).unwrap();
    let mut args = vec!["volume", "mount", volume, mountpoint.to_str().unwrap()];
    args.extend_from_slice(extra);
    site.vault.run(&args)
}

/// Retries `attempt` for a few seconds until it holds (a member's mirror of the group's
/// listings catches up within a refresh).
fn within_seconds(what: &str, attempt: impl Fn() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match attempt() {
            Ok(()) => return,
            Err(last) if Instant::now() > deadline => panic!("{what}: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

#[test]
fn a_seal_a_contract_and_a_freeze_made_on_one_member_hold_on_every_member() {
    let sites = three_node_group("g");
    sites[0]
        .vault
        .ok(&["volume", "create", "docs", "--group", "g"]);
    let documents = sites[0].vault.path("documents");
    common::write_documents(&documents, 30);
    sites[0]
        .vault
        .ok(&["volume", "import", "docs", documents.to_str().unwrap()]);
    let stderr =
        |output: &std::process::Output| String::from_utf8_lossy(&output.stderr).into_owned();

    // Sealed on one member: refused on another (once it adopted the volume); a
    // trust-check on a third lifts it.
    sites[0].vault.ok(&["volume", "seal", "docs"]);
    within_seconds("the sealed volume refused on a second member", || {
        let refused = mount_on(&sites[1], "docs", "sealed", &[]);
        if stderr(&refused).contains("is sealed since") {
            Ok(())
        } else {
            Err(stderr(&refused))
        }
    });
    within_seconds("trust-check on the third member", || {
        let output = sites[2]
            .vault
            .run(&["volume", "trust-check", "docs", "--json"]);
        if output.status.success() {
            let report: Value = serde_json::from_slice(&output.stdout).unwrap();
            assert_eq!(report["unsealed"], true, "{report}");
            Ok(())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                stderr(&output)
            ))
        }
    });

    // A read-only contract attached on one member binds the others.
    let contract = sites[0].vault.path("ro.toml");
    let contract_path = contract.to_str().unwrap();
    sites[0].vault.ok(&[
        "contract",
        "new",
        "--volume",
        "docs",
        "--mode",
        "ro",
        "-o",
        contract_path,
    ]);
    sites[0].vault.ok(&["contract", "sign", contract_path]);
    sites[0]
        .vault
        .ok(&["contract", "attach", "docs", contract_path]);
    let refused = mount_on(&sites[2], "docs", "read-only-contract", &[]);
    assert!(
        stderr(&refused).contains("read-only use only"),
        "{}",
        stderr(&refused)
    );
    let rw = sites[0].vault.path("rw.toml");
    let rw_path = rw.to_str().unwrap();
    sites[0]
        .vault
        .ok(&["contract", "new", "--volume", "docs", "-o", rw_path]);
    sites[0].vault.ok(&["contract", "sign", rw_path]);
    sites[0].vault.ok(&["contract", "attach", "docs", rw_path]);

    // Ransomware on a mount of one member freezes the volume on all of them.
    let mounted = mount_on(&sites[1], "docs", "attacked", &[]);
    assert!(mounted.status.success(), "{}", stderr(&mounted));
    let mountpoint = sites[1].vault.path("attacked");
    let damaged = common::ransomware(&mountpoint, false, false);
    assert!(damaged <= 5, "{damaged} files damaged");
    // Counted on the /metrics of the member whose mount saw it.
    let anomalies: f64 = scrape(&sites[1].metrics)
        .iter()
        .filter(|(series, _)| series.starts_with("forge_anomalies_total{volume=\"docs\""))
        .map(|(_, value)| value)
        .sum();
    assert_eq!(anomalies, 1.0);
    sites[1]
        .vault
        .ok(&["volume", "unmount", mountpoint.to_str().unwrap()]);
    for site in [&sites[0], &sites[2]] {
        let refused = mount_on(site, "docs", "frozen", &[]);
        assert!(
            stderr(&refused).contains("is frozen since"),
            "{}",
            stderr(&refused)
        );
    }
    let unfrozen = sites[2].vault.json(&["volume", "unfreeze", "docs"]);
    assert_eq!(
        unfrozen["resolved"].as_array().unwrap().len(),
        1,
        "{unfrozen}"
    );
    let mounted = mount_on(&sites[0], "docs", "after", &[]);
    assert!(mounted.status.success(), "{}", stderr(&mounted));
    sites[0].vault.ok(&[
        "volume",
        "unmount",
        sites[0].vault.path("after").to_str().unwrap(),
    ]);
}
