//! `tally`: the command-line program. Its main job is `tally simulate`, which runs days of
//! simulated gateway traffic through the engine in seconds and reports what happened.

mod cli;
mod format;
mod outcome;
mod report;
mod rng;
mod scenario;
mod simulate;
mod traffic;

use std::io::Write as _;
use std::process::ExitCode;

use tally_engine::Policy;

use crate::cli::{Command, HelpTopic, SimulateOptions, UsageError};

/// A bad command line or policy: nothing ran.
const EXIT_USAGE: u8 = 2;
/// The engine refused the scenario's setup (a policy it cannot serve).
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match cli::parse(&args) {
        Ok(Command::Help(topic)) => print_out(topic.text()),
        Ok(Command::Version) => print_out(&format!("tally {}\n", env!("CARGO_PKG_VERSION"))),
        Ok(Command::Simulate(options)) => simulate(&options),
        Err(error) => usage_error(&error),
    }
}

fn simulate(options: &SimulateOptions) -> ExitCode {
    let (policy, policy_name) = match load_policy(options) {
        Ok(loaded) => loaded,
        Err(error) => return usage_error(&error),
    };
    let shape = scenario::Shape {
        keys: options.keys,
        days: options.days,
        seed: options.seed,
        start_ms: simulate::START_MS,
        slot_ms: simulate::SLOT_MS,
    };
    let summary = match simulate::run(shape, policy, &policy_name) {
        Ok(summary) => summary,
        Err(error) => {
            eprintln!("tally: simulate: the engine refused the scenario: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    if !options.json {
        return print_out(&report::text(&summary));
    }
    let json = serde_json::to_string_pretty(&report::json(&summary))
        .unwrap_or_else(|error| unreachable!("a JSON value always serialises: {error}"));
    // The wall time is not in the JSON, so the same seed prints the same JSON: say it here.
    eprintln!(
        "tally: simulated {} requests in {:.2} s",
        format::grouped(summary.totals.sent),
        summary.wall.as_secs_f64()
    );
    print_out(&format!("{json}\n"))
}

fn load_policy(options: &SimulateOptions) -> Result<(Policy, String), UsageError> {
    match &options.policy {
        None => Ok((Policy::token_plan(), "the shipped Token Plan policy".into())),
        Some(path) => Policy::load(path)
            .map(|policy| (policy, path.display().to_string()))
            .map_err(|error| UsageError::new("--policy", error.to_string(), HelpTopic::Simulate)),
    }
}

fn usage_error(error: &UsageError) -> ExitCode {
    eprintln!("tally: {error}\n{}", error.hint());
    ExitCode::from(EXIT_USAGE)
}

/// Prints to stdout; a closed pipe (`tally simulate | head`) is not an error worth a panic.
fn print_out(text: &str) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tally: cannot write the output: {error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
