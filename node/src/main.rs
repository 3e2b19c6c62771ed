//! The `forge` binary: parses the command line, runs the command, and turns the outcome
//! into output and an exit code (0 ok, 1 error, 2 usage, 3 integrity, 4 conflict or busy).

use std::io::Write;

use clap::Parser;
use clap::error::ErrorKind;
use forge_node::cli::Cli;
use forge_node::{ExitCode, NodeError};

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    init_tracing();
    raise_open_file_limit();
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
        Err(error) => {
            // A check that found damage prints its report, then fails with one line.
            if let Some(output) = error.report() {
                let text = if cli.json {
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
            report(&error, code, cli.json)
        }
    }
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

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // fuser warns about every optional operation a file system leaves out (xattrs).
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,fuser=error"));
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
    // One line, whatever the error: the chain joined with ": ".
    let message = format!("{error:#}").replace('\n', " ");
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
