//! A cluster of real `forge` daemons on loopback: formed, joined through a member that
//! trusts the joiner, a volume group created on its members, a leader killed and the
//! group going on, a node leaving; driven through the CLI as a user would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Site, scrape};
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
    member.meet(joiner, "joiner");
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
