//! `tally`: the command-line program. Its main job is `tally simulate`, which runs days of
//! simulated gateway traffic through the engine on a database in seconds and reports what
//! happened; the operator commands (`user`, `seat`, `topup`, `consume`, `refund`, `adjust`,
//! `usage`, `events`, `verify`, `compact`, ...) work on a database one change or question at a
//! time.

mod cli;
mod crash_child;
mod describe;
mod format;
mod help;
mod operator;
mod outcome;
mod report;
mod rng;
mod scenario;
mod simulate;
mod store;
mod traffic;

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use tally_engine::{Error, ManualClock, Policy};

use crate::cli::{
    Action, Command, CrashChildOptions, HelpTopic, Operation, SimulateOptions, UsageError,
};

/// A bad command line, policy or database, or an argument the engine refused: nothing changed.
const EXIT_USAGE: u8 = 2;
/// The engine refused the scenario's setup (a policy it cannot serve), or the log failed.
const EXIT_FAILURE: u8 = 1;
/// `tally simulate` checkpoints once, at the end, rather than every so many events: a
/// checkpoint holds every lock while it copies the state, and the run only wants speed.
const SIMULATE_CHECKPOINT_EVERY_EVENTS: u64 = u64::MAX;

fn main() -> ExitCode {
    // `std::env::args` panics on an argument that is not UTF-8: read them raw and refuse one.
    let args = match utf8_arguments(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(error) => return usage_error(&error),
    };
    match cli::parse(&args) {
        Ok(Command::Help(topic)) => print_out(&topic.text()),
        Ok(Command::Version) => print_out(&format!("tally {}\n", env!("CARGO_PKG_VERSION"))),
        Ok(Command::Simulate(options)) => simulate(&options),
        Ok(Command::Operate(operation)) => operate(&operation),
        Ok(Command::CrashChild(options)) => crash_child(&options),
        Err(error) => usage_error(&error),
    }
}

/// The arguments as strings, or an error naming (lossily) the first that is not UTF-8.
fn utf8_arguments(
    args: impl Iterator<Item = std::ffi::OsString>,
) -> Result<Vec<String>, UsageError> {
    let mut strings: Vec<String> = Vec::new();
    for arg in args {
        match arg.into_string() {
            Ok(string) => strings.push(string),
            Err(raw) => {
                let topic = strings
                    .first()
                    .and_then(|command| HelpTopic::of_command(command))
                    .unwrap_or(HelpTopic::Main);
                return Err(UsageError::new(
                    raw.to_string_lossy(),
                    "is not valid UTF-8; every argument, paths included, must be",
                    topic,
                ));
            }
        }
    }
    Ok(strings)
}

fn operate(operation: &Operation) -> ExitCode {
    match operator::run(operation) {
        Ok(outcome) => {
            let printed = print_out(&outcome.text);
            match operation.action {
                // A report and nothing else: not written out, it did not happen.
                Action::Usage { .. } | Action::ListCursors { .. } if outcome.status == 0 => printed,
                // What the command did (a change made, a decision, a verdict) stands whether
                // or not its report could be written (stderr says when it could not): 1 would
                // say "denied" of an admitted request, or invite a retry of a top-up.
                _ => ExitCode::from(outcome.status),
            }
        }
        Err(error) => usage_error(&error),
    }
}

fn simulate(options: &SimulateOptions) -> ExitCode {
    let (policy, policy_name) = match load_policy(options.policy.as_deref(), HelpTopic::Simulate) {
        Ok(loaded) => loaded,
        Err(error) => return usage_error(&error),
    };
    let prepared = if options.keep {
        store::check_simulate_may_use(&options.db).map(|()| false)
    } else {
        store::wipe(&options.db)
    };
    let wiped = match prepared {
        Ok(wiped) => wiped,
        Err(problem) => {
            return usage_error(&UsageError::new("--db", problem, HelpTopic::Simulate));
        }
    };
    // Whether this run makes the database (the path is vacant, or was wiped): if its open
    // fails, nothing is left behind, so no unmarked database blocks the next run.
    let vacant = !store::is_database(&options.db);
    // Should the open fail, only what it made goes (not an empty directory the operator gave
    // as --db, nor anything above it).
    let before = store::Before::look(&options.db);
    let shape = scenario::Shape {
        keys: options.keys,
        days: options.days,
        seed: options.seed,
        start_ms: simulate::START_MS,
        slot_ms: simulate::SLOT_MS,
    };
    let clock = Arc::new(ManualClock::new(shape.start_ms));
    if options.keep && !vacant {
        // Opening with the run's policy would swap it in (a logged event) before the
        // scenario's first account is refused: look first, with the database's own.
        match store::holds_simulation(
            &options.db,
            clock.clone(),
            options.durability,
            SIMULATE_CHECKPOINT_EVERY_EVENTS,
        ) {
            Ok(false) => {}
            Ok(true) => {
                print_err(&format!(
                    "tally: simulate: {} already holds a simulation's accounts: drop --keep or \
                     give a new --db (nothing was changed)",
                    options.db.display()
                ));
                return ExitCode::from(EXIT_FAILURE);
            }
            Err(error) => {
                let (culprit, problem) = operator::culprit(&error);
                return usage_error(&UsageError::new(culprit, problem, HelpTopic::Simulate));
            }
        }
    }
    let engine = match store::open(
        &options.db,
        policy,
        clock.clone(),
        options.durability,
        SIMULATE_CHECKPOINT_EVERY_EVENTS,
    ) {
        Ok(engine) => engine,
        Err(error) => {
            if vacant {
                store::remove_made_database(&options.db, &before, &error);
            }
            let (culprit, problem) = operator::culprit(&error);
            return usage_error(&UsageError::new(culprit, problem, HelpTopic::Simulate));
        }
    };
    if let Err(problem) = store::mark_simulated(&options.db) {
        return usage_error(&UsageError::new("--db", problem, HelpTopic::Simulate));
    }
    let summary = match simulate::run(shape, &engine, &clock, &policy_name) {
        Ok(summary) => summary,
        Err(error) => return simulate_failure(&error, options),
    };
    let closing = Instant::now();
    // A checkpoint at the end makes the next open of this database quick; it covers every
    // event, so its sequence number is how many the log holds.
    let events = match engine.checkpoint() {
        Ok(seq) => seq,
        Err(error) => return simulate_failure(&error, options),
    };
    drop(engine);
    let database = format!(
        "Database: {} holds {} events (durability {}; checkpoint and close {:.2} s){}\n",
        options.db.display(),
        format::grouped(events),
        store::durability_words(options.durability),
        closing.elapsed().as_secs_f64(),
        if wiped {
            "; an earlier run's database there was wiped first"
        } else if options.keep && !vacant {
            "; added to the database there (--keep)"
        } else {
            ""
        }
    );
    if !options.json {
        return print_out(&format!("{}\n{database}", report::text(&summary)));
    }
    let json = serde_json::to_string_pretty(&report::json(&summary))
        .unwrap_or_else(|error| unreachable!("a JSON value always serialises: {error}"));
    // The wall time and the path are not in the JSON, so the same seed prints the same JSON:
    // say them here.
    print_err(&format!(
        "tally: simulated {} requests in {:.2} s\ntally: {}",
        format::grouped(summary.totals.sent),
        summary.wall.as_secs_f64(),
        database.trim_end()
    ));
    print_out(&format!("{json}\n"))
}

fn simulate_failure(error: &Error, options: &SimulateOptions) -> ExitCode {
    let hint = match error {
        Error::AlreadyExists { .. } if options.keep => {
            " (the database already holds a simulation's accounts: drop --keep or give a new --db)"
        }
        _ => "",
    };
    print_err(&format!(
        "tally: simulate: the engine refused the scenario: {error}{hint}"
    ));
    ExitCode::from(EXIT_FAILURE)
}

fn crash_child(options: &CrashChildOptions) -> ExitCode {
    let (policy, _) = match load_policy(options.policy.as_deref(), HelpTopic::Main) {
        Ok(loaded) => loaded,
        Err(error) => return usage_error(&error),
    };
    if let Err(problem) = crash_child::check_path(&options.db) {
        return usage_error(&UsageError::new("--db", problem, HelpTopic::Main));
    }
    match crash_child::run(options, policy) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            print_err(&format!("tally: crash-child: {error}"));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn load_policy(
    path: Option<&std::path::Path>,
    topic: HelpTopic,
) -> Result<(Policy, String), UsageError> {
    match path {
        None => Ok((Policy::token_plan(), "the shipped Token Plan policy".into())),
        Some(path) => Policy::load(path)
            .map(|policy| (policy, path.display().to_string()))
            .map_err(|error| UsageError::new("--policy", error.to_string(), topic)),
    }
}

fn usage_error(error: &UsageError) -> ExitCode {
    print_err(&format!("tally: {error}\n{}", error.hint()));
    ExitCode::from(EXIT_USAGE)
}

/// Writes `text` and a newline to stderr. Unlike `eprintln!`, a stderr that cannot be written
/// (a closed pipe, `2>/dev/full`) is no panic: the exit status and stdout still say what
/// happened.
pub(crate) fn print_err(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
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
            print_err(&format!("tally: cannot write the output: {error}"));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
