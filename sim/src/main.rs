//! `forge-sim`: runs seeds of the deterministic simulation and summarises them.
//!
//! ```text
//! cargo run -p forge-sim -- --seeds 200 [--seed S] [--nodes K]
//!     [--faults LIST] [--minutes M] [--sim-seconds T] [--scenario sites|groups|raft]
//!     [--inject-bug NAME] [--list-bugs] [--jobs J] [--stop-at-first]
//! ```
//!
//! Seeds run in parallel (one per thread, each on its own single-threaded runtime); each
//! seed's run is the same whatever else runs beside it. A failing seed prints the command
//! that replays it alone. The exit status is 1 when any seed failed.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use forge_sim::groups::GroupsConfig;
use forge_sim::sites::{FaultSet, SitesConfig};

#[derive(Debug, Clone)]
struct Options {
    seeds: u64,
    first_seed: Option<u64>,
    nodes: Option<usize>,
    faults: FaultSet,
    faults_text: Option<String>,
    minutes: Option<f64>,
    sim_seconds: u64,
    scenario: String,
    bugs: Vec<String>,
    jobs: usize,
    stop_at_first: bool,
    quiet: bool,
    verbose: bool,
}

const USAGE: &str = "usage: forge-sim [--seeds N] [--seed S] [--nodes K] [--faults LIST] \
[--minutes M] [--sim-seconds T] [--scenario sites|groups|raft] [--inject-bug NAME] [--list-bugs] \
[--jobs J] [--stop-at-first] [--quiet] [--verbose]

  --seeds N        seeds to run (default 1 with --seed, else 20)
  --seed S         the first seed (default: drawn from the clock); --seeds 1 replays S
  --nodes K        sites (2-9; default: the seed chooses 2-4), or group members
                   (groups: 3-7; default: the seed chooses 3 or 5)
  --faults LIST    network,corruption,partitions,crashes,disk,lost-fsyncs,clock-jumps,
                   slow-disks | all | none (default all; groups only: lost-fsyncs, a
                   member's disk ignores fsyncs; clock-jumps, a node's wall clock set
                   back or forward; slow-disks, a node's syncs take up to 1.5 s)
  --minutes M      stop starting seeds after M minutes of real time
  --sim-seconds T  simulated length of each seed's workload (default 60)
  --scenario NAME  sites (whole vaults syncing; default), groups (whole nodes in one
                   volume group: shards, repair, group gc) or raft (one Raft group)
  --inject-bug B   switch on a known bug (see --list-bugs): the run should fail
  --jobs J         seeds run at once (default: the cores)
  --stop-at-first  stop at the first failing seed
  --quiet          print failures and the summary only
  --verbose        print a failing seed's whole event log (else its last 30 events)";

fn parse() -> Result<Option<Options>, String> {
    let mut options = Options {
        seeds: 0,
        first_seed: None,
        nodes: None,
        faults: FaultSet::ALL,
        faults_text: None,
        minutes: None,
        sim_seconds: 60,
        scenario: "sites".into(),
        bugs: Vec::new(),
        jobs: std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
        stop_at_first: false,
        quiet: false,
        verbose: false,
    };
    let mut arguments = std::env::args().skip(1);
    let number = |flag: &str, value: Option<String>| -> Result<u64, String> {
        let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
        value
            .parse()
            .map_err(|_| format!("{flag}: {value:?} is not a whole number"))
    };
    while let Some(argument) = arguments.next() {
        match argument.as_str() {
            "--seeds" => options.seeds = number("--seeds", arguments.next())?,
            "--seed" => options.first_seed = Some(number("--seed", arguments.next())?),
            "--nodes" => {
                let nodes = number("--nodes", arguments.next())?;
                if !(2..=9).contains(&nodes) {
                    return Err(format!("--nodes {nodes}: between 2 and 9"));
                }
                options.nodes = Some(usize::try_from(nodes).map_err(|error| error.to_string())?);
            }
            "--faults" => {
                let text = arguments.next().ok_or("--faults needs a list")?;
                options.faults = FaultSet::parse(&text)?;
                options.faults_text = Some(text);
            }
            "--minutes" => {
                let value = arguments.next().ok_or("--minutes needs a value")?;
                let minutes: f64 = value
                    .parse()
                    .map_err(|_| format!("--minutes: {value:?} is not a number"))?;
                if !minutes.is_finite() || minutes <= 0.0 {
                    return Err("--minutes must be more than 0".into());
                }
                options.minutes = Some(minutes);
            }
            "--sim-seconds" => {
                options.sim_seconds = number("--sim-seconds", arguments.next())?.max(1);
            }
            "--scenario" => {
                let name = arguments.next().ok_or("--scenario needs a name")?;
                if !["sites", "groups", "raft"].contains(&name.as_str()) {
                    return Err(format!("--scenario {name:?}: sites, groups or raft"));
                }
                options.scenario = name;
            }
            "--inject-bug" => {
                let name = arguments.next().ok_or("--inject-bug needs a name")?;
                forge_store::faults::inject(&name)?;
                options.bugs.push(name);
            }
            "--list-bugs" => {
                for bug in forge_store::faults::KNOWN_BUGS {
                    println!("{:<22} {}", bug.name, bug.effect);
                }
                // Not bugs: faults the code must survive, armed by the seed (groups).
                println!("\nfault points inside the node code (armed by each seed, not bugs):");
                for (point, effect) in forge_store::faults::points::KNOWN_POINTS {
                    println!("{point:<22} {effect}");
                }
                return Ok(None);
            }
            "--jobs" => {
                options.jobs = usize::try_from(number("--jobs", arguments.next())?.max(1))
                    .map_err(|error| error.to_string())?;
            }
            "--stop-at-first" => options.stop_at_first = true,
            "--quiet" => options.quiet = true,
            "--verbose" => options.verbose = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if options.seeds == 0 {
        options.seeds = if options.first_seed.is_some() { 1 } else { 20 };
    }
    Ok(Some(options))
}

/// The command that replays `seed` alone, with the options that shaped it.
fn replay_command(options: &Options, seed: u64) -> String {
    let mut command = format!(
        "cargo run -p forge-sim -- --seed {seed} --scenario {}",
        options.scenario
    );
    if let Some(nodes) = options.nodes {
        command.push_str(&format!(" --nodes {nodes}"));
    }
    if let Some(faults) = &options.faults_text {
        command.push_str(&format!(" --faults {faults}"));
    }
    if options.sim_seconds != 60 {
        command.push_str(&format!(" --sim-seconds {}", options.sim_seconds));
    }
    for bug in &options.bugs {
        command.push_str(&format!(" --inject-bug {bug}"));
    }
    command
}

/// One seed's outcome for the summary.
struct SeedOutcome {
    seed: u64,
    trace: Option<[u8; 32]>,
    simulated: Duration,
    operations: u64,
    faults: u64,
    failure: Option<String>,
}

fn run_seed(options: &Options, seed: u64) -> SeedOutcome {
    if options.scenario == "raft" {
        return match forge_sim::raft::run(seed) {
            Ok(report) => SeedOutcome {
                seed,
                trace: Some(report.trace),
                simulated: Duration::ZERO,
                operations: report.acknowledged as u64,
                faults: report.config.nemesis_actions as u64,
                failure: None,
            },
            Err(failure) => SeedOutcome::failed(
                seed,
                failed_text(options, seed, &failure.reason, None, &failure.events),
            ),
        };
    }
    let sim_seconds = Duration::from_secs(options.sim_seconds);
    // Both whole-stack scenarios report alike; the configuration is printed on failure.
    let (outcome, config) = if options.scenario == "groups" {
        let config = GroupsConfig::from_seed(seed, options.nodes, options.faults, sim_seconds);
        (forge_sim::groups::run(seed, &config), format!("{config:?}"))
    } else {
        let config = SitesConfig::from_seed(seed, options.nodes, options.faults, sim_seconds);
        (forge_sim::sites::run(seed, &config), format!("{config:?}"))
    };
    match outcome {
        Ok(report) => SeedOutcome::passed(&report),
        Err(failure) => SeedOutcome::failed(
            seed,
            failed_text(
                options,
                seed,
                &failure.reason,
                Some(&config),
                &failure.events,
            ),
        ),
    }
}

impl SeedOutcome {
    fn passed(report: &forge_sim::sites::SitesReport) -> Self {
        Self {
            seed: report.seed,
            trace: Some(report.trace),
            simulated: report.simulated,
            operations: report.operations,
            faults: report.faults + report.message_faults,
            failure: None,
        }
    }

    fn failed(seed: u64, text: String) -> Self {
        Self {
            seed,
            trace: None,
            simulated: Duration::ZERO,
            operations: 0,
            faults: 0,
            failure: Some(text),
        }
    }
}

/// A failing seed's report: the reason, the configuration, and its last events (all of
/// them with `--verbose`).
fn failed_text(
    options: &Options,
    seed: u64,
    reason: &str,
    config: Option<&str>,
    events: &[String],
) -> String {
    let mut text = format!("seed {seed} failed: {reason}\n");
    if let Some(config) = config {
        text.push_str(&format!("  config: {config}\n"));
    }
    let events = collapse_repeats(events);
    let shown = if options.verbose { events.len() } else { 30 };
    for event in events.iter().rev().take(shown).rev() {
        text.push_str(&format!("  {event}\n"));
    }
    text
}

/// Runs of the same event (a retry loop saying the same thing every few seconds) as
/// their first line and a count, so the last lines shown are the history before it.
fn collapse_repeats(events: &[String]) -> Vec<String> {
    // An event is "<time> ms <what>": the same what at another time repeats it.
    fn what(event: &str) -> &str {
        event.split_once(" ms ").map_or(event, |(_, what)| what)
    }
    let mut collapsed: Vec<String> = Vec::new();
    let mut index = 0;
    while index < events.len() {
        let run = events[index..]
            .iter()
            .take_while(|event| what(event) == what(&events[index]))
            .count();
        collapsed.push(events[index].clone());
        if run > 1 {
            let last = events[index + run - 1]
                .split_once(" ms ")
                .map_or("", |(time, _)| time.trim());
            collapsed.push(format!(
                "{:>7}    (the same {} more times, the last at {last} ms)",
                "",
                run - 1
            ));
        }
        index += run;
    }
    collapsed
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn main() -> ExitCode {
    let options = match parse() {
        Ok(Some(options)) => options,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("forge-sim: {message}");
            return ExitCode::from(2);
        }
    };
    #[allow(clippy::disallowed_methods)] // The seed of seeds: printed, so it replays.
    let first = options.first_seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |elapsed| elapsed.as_nanos() as u64 % 1_000_000_000)
    });
    println!(
        "forge-sim: scenario {}, seeds {first}..{} ({} jobs){}",
        options.scenario,
        first + options.seeds,
        options.jobs,
        if options.bugs.is_empty() {
            String::new()
        } else {
            format!(", injected bugs: {}", options.bugs.join(", "))
        }
    );
    let started = Instant::now();
    let budget = options
        .minutes
        .map(|minutes| Duration::from_secs_f64(minutes * 60.0));
    let next = Arc::new(AtomicU64::new(first));
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<SeedOutcome>>> = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..options.jobs)
        .map(|_| {
            let (options, next, stop, outcomes) = (
                options.clone(),
                next.clone(),
                stop.clone(),
                outcomes.clone(),
            );
            std::thread::spawn(move || {
                loop {
                    if stop.load(Ordering::Relaxed)
                        || budget.is_some_and(|budget| started.elapsed() >= budget)
                    {
                        return;
                    }
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= first + options.seeds {
                        return;
                    }
                    let outcome = run_seed(&options, seed);
                    if let Some(failure) = &outcome.failure {
                        println!("{failure}");
                        println!("  replay: {}", replay_command(&options, seed));
                        if options.stop_at_first {
                            stop.store(true, Ordering::Relaxed);
                        }
                    } else if !options.quiet {
                        println!(
                            "seed {seed}: ok, trace {}",
                            hex(&outcome.trace.unwrap_or_default())
                        );
                    }
                    outcomes
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(outcome);
                }
            })
        })
        .collect();
    for worker in workers {
        if worker.join().is_err() {
            eprintln!("forge-sim: a worker panicked");
            return ExitCode::FAILURE;
        }
    }
    let outcomes = outcomes.lock().unwrap_or_else(PoisonError::into_inner);
    let elapsed = started.elapsed();
    let failed: Vec<u64> = outcomes
        .iter()
        .filter(|outcome| outcome.failure.is_some())
        .map(|outcome| outcome.seed)
        .collect();
    let simulated: Duration = outcomes.iter().map(|outcome| outcome.simulated).sum();
    let operations: u64 = outcomes.iter().map(|outcome| outcome.operations).sum();
    let faults: u64 = outcomes.iter().map(|outcome| outcome.faults).sum();
    let per_minute = outcomes.len() as f64 / elapsed.as_secs_f64().max(1e-9) * 60.0;
    println!(
        "summary: {} seeds in {:.1} s ({per_minute:.0} seeds/min), {:.2} simulated hours \
         ({:.0}x real time), {operations} operations, {faults} faults injected, {} failures{}",
        outcomes.len(),
        elapsed.as_secs_f64(),
        simulated.as_secs_f64() / 3600.0,
        simulated.as_secs_f64() / elapsed.as_secs_f64().max(1e-9),
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(" (seeds {failed:?})")
        }
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::collapse_repeats;

    #[test]
    fn a_run_of_the_same_event_shows_once_with_its_count() {
        let events: Vec<String> = [
            "     10 ms healed",
            "     20 ms member 2: retrying: busy",
            "     30 ms member 2: retrying: busy",
            "    400 ms member 2: retrying: busy",
            "    500 ms member 1: done",
            "    600 ms member 2: retrying: busy",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            collapse_repeats(&events),
            [
                "     10 ms healed",
                "     20 ms member 2: retrying: busy",
                "           (the same 2 more times, the last at 400 ms)",
                "    500 ms member 1: done",
                "    600 ms member 2: retrying: busy",
            ]
        );
    }
}
