//! The sites scenario (whole vaults syncing under faults): regression seeds in process,
//! and, through the `forge-sim` binary, the determinism check across two processes and
//! the proof that the harness has teeth (each known bug, switched on, is found).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::process::Command;
use std::time::Duration;

use forge_sim::sites::{FaultSet, SitesConfig, run};

/// Seeds kept because of what they exercise (crashes, partitions, damaged shards).
const REGRESSION_SEEDS: [u64; 4] = [1, 2, 3, 17];

fn check(seed: u64) {
    let config = SitesConfig::from_seed(seed, None, FaultSet::ALL, Duration::from_secs(60));
    match run(seed, &config) {
        Ok(report) => {
            assert!(report.imports > 0, "seed {seed}: nothing was imported");
            println!(
                "seed {seed}: {} sites, {} imports, {} sends, {} faults, {} message faults",
                config.nodes, report.imports, report.sends, report.faults, report.message_faults
            );
        }
        Err(failure) => panic!(
            "seed {seed} failed: {}\nreplay: cargo run -p forge-sim -- --seed {seed}\n{}",
            failure.reason,
            failure.events.join("\n")
        ),
    }
}

#[test]
fn regression_seeds_keep_every_invariant() {
    for seed in REGRESSION_SEEDS {
        check(seed);
    }
}

fn forge_sim(arguments: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_forge-sim"))
        .args(arguments)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn trace_line(text: &str, seed: u64) -> String {
    let prefix = format!("seed {seed}: ok, trace ");
    text.lines()
        .find(|line| line.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no trace for seed {seed} in:\n{text}"))
        .to_owned()
}

#[test]
fn the_same_seed_gives_the_same_trace_in_two_processes() {
    let seed = 5;
    let first = forge_sim(&["--seed", "5", "--jobs", "1"]);
    let second = forge_sim(&["--seed", "5", "--jobs", "1"]);
    assert!(first.0 && second.0, "{}\n{}", first.1, second.1);
    assert_eq!(trace_line(&first.1, seed), trace_line(&second.1, seed));
    let other = forge_sim(&["--seed", "6", "--jobs", "1"]);
    assert!(other.0, "{}", other.1);
    assert_ne!(
        trace_line(&first.1, seed).rsplit(' ').next(),
        trace_line(&other.1, 6).rsplit(' ').next(),
        "different seeds, different runs"
    );
}

/// Runs seeds from 1 with `bug` switched on until one fails; the seeds it took.
fn seeds_to_failure(bug: &str, extra: &[&str]) -> String {
    let mut arguments = vec![
        "--inject-bug",
        bug,
        "--seed",
        "1",
        "--seeds",
        "40",
        "--stop-at-first",
        "--quiet",
    ];
    arguments.extend_from_slice(extra);
    let (passed, text) = forge_sim(&arguments);
    assert!(!passed, "bug {bug} was not found in 40 seeds:\n{text}");
    assert!(
        text.contains("replay: cargo run -p forge-sim -- --seed"),
        "{text}"
    );
    assert!(text.contains(&format!("--inject-bug {bug}")), "{text}");
    text
}

#[test]
fn the_simulator_finds_an_acknowledgement_before_fsync() {
    let text = seeds_to_failure("ack-before-fsync", &["--faults", "crashes"]);
    assert!(text.contains("acknowledged snapshot"), "{text}");
}

#[test]
fn the_simulator_finds_gc_ignoring_a_branch() {
    let text = seeds_to_failure("gc-ignores-branch", &["--faults", "none"]);
    assert!(text.contains("acknowledged snapshot"), "{text}");
}

#[test]
fn the_simulator_finds_a_sync_that_skips_cid_checks() {
    let text = seeds_to_failure("sync-skips-cid-check", &["--faults", "corruption"]);
    assert!(text.contains("failed"), "{text}");
}

#[test]
fn bad_arguments_are_refused_with_the_reason() {
    let (passed, text) = forge_sim(&["--inject-bug", "no-such-bug"]);
    assert!(!passed);
    assert!(text.contains("known: ack-before-fsync"), "{text}");
    let (passed, text) = forge_sim(&["--faults", "lightning"]);
    assert!(!passed);
    assert!(text.contains("unknown fault"), "{text}");
    let (passed, text) = forge_sim(&["--list-bugs"]);
    assert!(passed);
    assert!(text.contains("gc-ignores-branch"), "{text}");
}

#[test]
fn the_simulator_finds_a_member_applying_an_uncommitted_entry() {
    let text = seeds_to_failure("apply-uncommitted", &["--scenario", "raft"]);
    assert!(text.contains("replica"), "{text}");
}
