//! The `forge` binary: parses the command line, runs the command, and turns the outcome
//! into output and an exit code (0 ok, 1 error, 2 usage, 3 integrity, 4 conflict or busy).

use std::io::Write;

use clap::Parser;
use clap::error::ErrorKind;
use forge_node::cli::Cli;
use forge_node::config::NodeConfig;
use forge_node::{ExitCode, NodeError};

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    // forge.toml is checked before any command runs: a bad one fails every command
    // that has a data directory, naming the file and the key.
    let config = match cli.data_dir().map(|data_dir| NodeConfig::load(&data_dir)) {
        Ok(Ok(config)) => config,
        Ok(Err(error)) => {
            let code = error.exit_code();
            return report(&anyhow::Error::new(error), code, cli.json);
        }
        // No data directory: commands that need one say so.
        Err(_) => NodeConfig::default_for_no_data_dir(),
    };
    init_tracing(&config.log_level);
    raise_open_file_limit();
    // `forge run`: stdout and stderr are the workload's; how it ended goes to stderr,
    // and forge exits with the workload's status.
    if let Some(result) = cli.run_workload() {
        return match result {
            Ok(outcome) => {
                let output = forge_node::cli::render_run(&outcome);
                let text = if cli.json {
                    output.json.to_string()
                } else {
                    output.human
                };
                let _ = writeln!(std::io::stderr().lock(), "{text}");
                std::process::ExitCode::from(outcome.exit_code)
            }
            Err(error) => failed(error, cli.json),
        };
    }
    match cli.run() {
        Ok(output) => {
            let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
            // A closed pipe (`forge node id | head -c1`) is not an error worth a panic.
            // JSON is written as it is serialized: an output can be as long as a volume.
            let _ = if cli.json {
                serde_json::to_writer(&mut stdout, &output.json)
                    .map_err(std::io::Error::from)
                    .and_then(|()| writeln!(stdout))
            } else {
                writeln!(stdout, "{}", output.human)
            };
            let _ = stdout.flush();
            exit(ExitCode::Success)
        }
        Err(error) => failed(error, cli.json),
    }
}

/// A command that failed: a check that found damage prints its report, then the error
/// is one line.
fn failed(error: NodeError, json: bool) -> std::process::ExitCode {
    if let Some(output) = error.report() {
        let text = if json {
            output.json.to_string()
        } else {
            output.human.clone()
        };
        let _ = writeln!(std::io::stdout().lock(), "{text}");
    }
    let error = anyhow::Error::new(error);
    let code = error
        .downcast_ref::<NodeError>()
        .map_or(ExitCode::Error, NodeError::exit_code);
    report(&error, code, json)
}

/// Import and export hold one descriptor per directory level they are inside (they work
/// relative to it, never by full path), so a deep tree needs more than the usual soft
/// limit of 1,024: raise it to the hard limit, as a file server does.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// RUST_LOG if set, otherwise forge.toml's `log_level` (checked when it was loaded).
fn init_tracing(log_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn usage_error(error: &clap::Error) -> std::process::ExitCode {
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        let _ = error.print();
        return exit(ExitCode::Success);
    }
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = error.print();
        return exit(ExitCode::Usage);
    }
    let json = std::env::args().any(|argument| argument == "--json");
    let rendered = error.render().to_string();
    let first_line = rendered
        .lines()
        .next()
        .unwrap_or("error: invalid arguments");
    let message = first_line.strip_prefix("error: ").unwrap_or(first_line);
    let message = format!("{message} (see 'forge --help')");
    report(&anyhow::anyhow!(message), ExitCode::Usage, json)
}

fn report(error: &anyhow::Error, code: ExitCode, json: bool) -> std::process::ExitCode {
    // One line, whatever the error: the chain joined with ": ", each cause once (an
    // error whose message already quotes its source, as every I/O error does, would
    // otherwise print it twice).
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    let message = message.replace('\n', " ");
    let line = if json {
        serde_json::json!({ "error": message, "exit_code": code as u8 }).to_string()
    } else {
        format!("forge: {message}")
    };
    let _ = writeln!(std::io::stderr().lock(), "{line}");
    exit(code)
}

fn exit(code: ExitCode) -> std::process::ExitCode {
    std::process::ExitCode::from(code as u8)
}
