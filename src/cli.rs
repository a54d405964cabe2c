//! The command line: hand-parsed `std::env::args` (the root package takes no parsing crate).
//!
//! Parsing is pure: it turns the arguments into a `Command` or a `UsageError` naming the option
//! at fault, and touches nothing else, so a bad command line changes nothing.

use std::fmt;
use std::path::PathBuf;

use crate::format::grouped;

pub const MIN_KEYS: u64 = 20;
pub const MAX_KEYS: u64 = 1_000_000;
pub const DEFAULT_KEYS: u64 = 2_000;
pub const MIN_DAYS: u64 = 1;
pub const MAX_DAYS: u64 = 60;
pub const DEFAULT_DAYS: u64 = 3;
pub const DEFAULT_SEED: u64 = 1;

// The scripted scenario needs a few keys of each kind; fewer than this leaves plans empty.
const _: () = assert!(MIN_KEYS <= DEFAULT_KEYS && DEFAULT_KEYS <= MAX_KEYS);
const _: () = assert!(MIN_DAYS <= DEFAULT_DAYS && DEFAULT_DAYS <= MAX_DAYS);

pub const MAIN_HELP: &str = "\
tally: an embedded quota-accounting engine for AI subscription plans

Usage: tally <COMMAND> [OPTIONS]

Commands:
  simulate   Run simulated gateway traffic through the engine and print each plan's usage bars,
             what was admitted from quota, charged to credits or pay-as-you-go, and denied
  help       Print this help (or `tally help simulate`)

Options:
  -h, --help     Print help
  -V, --version  Print the version

Run `tally simulate --help` for the simulation's options.
";

pub const SIMULATE_HELP: &str = "\
Run a simulated stretch of gateway traffic through the engine, days compressed into seconds.

Usage: tally simulate [OPTIONS]

Keys on every plan of the policy (and some with no seat), named teams sharing credits, a few
pay-as-you-go keys, bursty heavy users that exhaust their windows, a seat upgrade and a
downgrade mid-window, retried requests with request ids, and traffic across local midnight.
The same seed prints the same report.

Options:
  --keys N        Keys sending traffic, 20 to 1,000,000 [default: 2,000]
  --days D        Simulated days, 1 to 60 [default: 3]
  --seed S        Seed of the deterministic random generator, 0 to 2^64-1 [default: 1]
  --policy PATH   Policy file (.toml or .json) [default: the shipped Token Plan policy]
  --json          Print a machine-readable JSON summary instead of the report
                  (the run's wall time then goes to stderr, so the JSON depends only on the seed)
  -h, --help      Print this help

Exit status: 0 on success, 2 on a bad command line or policy, 1 if the engine refuses the setup.
";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help(HelpTopic),
    Version,
    Simulate(SimulateOptions),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelpTopic {
    Main,
    Simulate,
}

impl HelpTopic {
    pub fn text(self) -> &'static str {
        match self {
            HelpTopic::Main => MAIN_HELP,
            HelpTopic::Simulate => SIMULATE_HELP,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulateOptions {
    pub keys: u64,
    pub days: u64,
    pub seed: u64,
    /// `None`: the policy shipped with the engine.
    pub policy: Option<PathBuf>,
    pub json: bool,
}

impl Default for SimulateOptions {
    fn default() -> SimulateOptions {
        SimulateOptions {
            keys: DEFAULT_KEYS,
            days: DEFAULT_DAYS,
            seed: DEFAULT_SEED,
            policy: None,
            json: false,
        }
    }
}

/// A command line that cannot run: `option` names the argument at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError {
    pub option: String,
    pub problem: String,
    /// Which help to point at.
    pub topic: HelpTopic,
}

impl UsageError {
    pub fn new(option: impl Into<String>, problem: impl Into<String>, topic: HelpTopic) -> Self {
        UsageError {
            option: option.into(),
            problem: problem.into(),
            topic,
        }
    }

    pub fn hint(&self) -> &'static str {
        match self.topic {
            HelpTopic::Main => "Run `tally --help` for usage.",
            HelpTopic::Simulate => "Run `tally simulate --help` for the options.",
        }
    }
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.option, self.problem)
    }
}

impl std::error::Error for UsageError {}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, UsageError> {
    let Some((command, rest)) = args.split_first() else {
        return Err(UsageError::new(
            "<COMMAND>",
            "missing; try `tally simulate`",
            HelpTopic::Main,
        ));
    };
    match command.as_str() {
        "-h" | "--help" => Ok(Command::Help(HelpTopic::Main)),
        "-V" | "--version" => Ok(Command::Version),
        "help" => parse_help(rest),
        "simulate" => parse_simulate(rest),
        other if other.starts_with('-') => Err(UsageError::new(
            other,
            "unknown option; a command comes first, e.g. `tally simulate`",
            HelpTopic::Main,
        )),
        other => Err(UsageError::new(
            other,
            "unknown command; the command is `simulate`",
            HelpTopic::Main,
        )),
    }
}

fn parse_help(rest: &[String]) -> Result<Command, UsageError> {
    match rest {
        [] => Ok(Command::Help(HelpTopic::Main)),
        [topic] if topic == "simulate" => Ok(Command::Help(HelpTopic::Simulate)),
        [topic, ..] => Err(UsageError::new(
            topic.as_str(),
            "no help on that; try `tally help simulate`",
            HelpTopic::Main,
        )),
    }
}

fn parse_simulate(args: &[String]) -> Result<Command, UsageError> {
    let mut options = SimulateOptions::default();
    let mut seen: Vec<&'static str> = Vec::new();
    let mut index = 0;
    while index < args.len() {
        let argument = args[index].as_str();
        index += 1;
        // `--keys=2000` and `--keys 2000` are the same option.
        let (name, inline_value) = match argument.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name, Some(value)),
            _ => (argument, None),
        };
        let option = canonical_option(name)?;
        if option == "--help" {
            return Ok(Command::Help(HelpTopic::Simulate));
        }
        if seen.contains(&option) {
            return Err(simulate_error(option, "given twice"));
        }
        seen.push(option);
        if option == "--json" {
            if inline_value.is_some() {
                return Err(simulate_error(option, "takes no value"));
            }
            options.json = true;
            continue;
        }
        let value = match inline_value {
            Some(value) => value,
            None => {
                let value = args
                    .get(index)
                    .ok_or_else(|| simulate_error(option, "needs a value"))?;
                index += 1;
                value.as_str()
            }
        };
        apply_value(&mut options, option, value)?;
    }
    Ok(Command::Simulate(options))
}

fn canonical_option(name: &str) -> Result<&'static str, UsageError> {
    match name {
        "-h" | "--help" => Ok("--help"),
        "--keys" => Ok("--keys"),
        "--days" => Ok("--days"),
        "--seed" => Ok("--seed"),
        "--policy" => Ok("--policy"),
        "--json" => Ok("--json"),
        other if other.starts_with('-') => Err(simulate_error(other, "unknown option")),
        other => Err(simulate_error(
            other,
            "unexpected argument; `simulate` takes only options",
        )),
    }
}

fn apply_value(
    options: &mut SimulateOptions,
    option: &'static str,
    value: &str,
) -> Result<(), UsageError> {
    match option {
        "--keys" => options.keys = parse_count(option, value, MIN_KEYS, MAX_KEYS)?,
        "--days" => options.days = parse_count(option, value, MIN_DAYS, MAX_DAYS)?,
        "--seed" => options.seed = parse_count(option, value, 0, u64::MAX)?,
        "--policy" => {
            if value.is_empty() {
                return Err(simulate_error(option, "needs a file path"));
            }
            options.policy = Some(PathBuf::from(value));
        }
        _ => unreachable!("every option taking a value is handled above"),
    }
    Ok(())
}

fn simulate_error(option: &str, problem: impl Into<String>) -> UsageError {
    UsageError::new(option, problem, HelpTopic::Simulate)
}

/// Parses a whole number, allowing `_` or `,` between digits (`2,000`, `10_000`).
pub fn parse_count(option: &str, value: &str, min: u64, max: u64) -> Result<u64, UsageError> {
    let digits: String = value.chars().filter(|c| *c != '_' && *c != ',').collect();
    let well_formed = !digits.is_empty()
        && digits.bytes().all(|byte| byte.is_ascii_digit())
        && value.starts_with(|c: char| c.is_ascii_digit())
        && value.ends_with(|c: char| c.is_ascii_digit());
    if !well_formed {
        return Err(simulate_error(
            option,
            format!("{value:?} is not a whole number"),
        ));
    }
    let range = || format!("must be between {} and {}", grouped(min), grouped(max));
    let number: u64 = digits
        .parse()
        .map_err(|_| simulate_error(option, format!("{value} is too large; {}", range())))?;
    if !(min..=max).contains(&number) {
        return Err(simulate_error(option, format!("{value} {}", range())));
    }
    Ok(number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_words(line: &str) -> Result<Command, UsageError> {
        let args: Vec<String> = line.split_whitespace().map(String::from).collect();
        parse(&args)
    }

    fn simulate_options(line: &str) -> SimulateOptions {
        match parse_words(line) {
            Ok(Command::Simulate(options)) => options,
            other => panic!("{line:?} parsed as {other:?}"),
        }
    }

    fn error_of(line: &str) -> UsageError {
        match parse_words(line) {
            Err(error) => error,
            Ok(command) => panic!("{line:?} should fail but parsed as {command:?}"),
        }
    }

    #[test]
    fn simulate_without_options_uses_the_defaults() {
        assert_eq!(simulate_options("simulate"), SimulateOptions::default());
    }

    #[test]
    fn every_option_is_read_in_both_spellings() {
        let options =
            simulate_options("simulate --keys 500 --days=2 --seed 7 --policy p.json --json");
        assert_eq!(
            options,
            SimulateOptions {
                keys: 500,
                days: 2,
                seed: 7,
                policy: Some(PathBuf::from("p.json")),
                json: true,
            }
        );
    }

    #[test]
    fn numbers_may_carry_digit_separators() {
        assert_eq!(simulate_options("simulate --keys 2,000").keys, 2_000);
        assert_eq!(simulate_options("simulate --keys=10_000").keys, 10_000);
    }

    #[test]
    fn an_unknown_option_is_named_in_the_error() {
        let error = error_of("simulate --kees 10");
        assert_eq!(error.option, "--kees");
        assert!(error.to_string().contains("--kees"));
        assert_eq!(error.topic, HelpTopic::Simulate);
    }

    #[test]
    fn a_bad_value_names_its_option_and_the_value() {
        let error = error_of("simulate --days three");
        assert_eq!(error.option, "--days");
        assert!(error.problem.contains("three"), "{error}");
    }

    #[test]
    fn values_out_of_range_are_refused_with_the_range() {
        let error = error_of("simulate --keys 5");
        assert_eq!(error.option, "--keys");
        assert!(
            error.problem.contains("between 20 and 1,000,000"),
            "{error}"
        );
        assert_eq!(error_of("simulate --days 0").option, "--days");
        assert_eq!(error_of("simulate --days 61").option, "--days");
        assert_eq!(
            error_of("simulate --seed 18446744073709551616").option,
            "--seed"
        );
    }

    #[test]
    fn malformed_numbers_are_refused() {
        for value in ["-5", "1e3", ",100", "100_", "0x10", ""] {
            let args = vec!["simulate".to_string(), "--keys".into(), value.into()];
            let error = parse(&args).expect_err(value);
            assert_eq!(error.option, "--keys", "{value:?}");
        }
    }

    #[test]
    fn a_missing_value_is_named() {
        let error = error_of("simulate --seed");
        assert_eq!(
            (error.option.as_str(), error.problem.as_str()),
            ("--seed", "needs a value")
        );
    }

    #[test]
    fn an_option_given_twice_is_refused() {
        assert_eq!(
            error_of("simulate --keys 30 --keys 40").problem,
            "given twice"
        );
    }

    #[test]
    fn json_takes_no_value() {
        assert_eq!(error_of("simulate --json=yes").option, "--json");
    }

    #[test]
    fn a_stray_argument_to_simulate_is_refused() {
        assert_eq!(error_of("simulate 100").option, "100");
    }

    #[test]
    fn help_and_version_are_recognised_everywhere() {
        assert_eq!(parse_words("--help"), Ok(Command::Help(HelpTopic::Main)));
        assert_eq!(parse_words("-h"), Ok(Command::Help(HelpTopic::Main)));
        assert_eq!(parse_words("help"), Ok(Command::Help(HelpTopic::Main)));
        assert_eq!(
            parse_words("help simulate"),
            Ok(Command::Help(HelpTopic::Simulate))
        );
        assert_eq!(
            parse_words("simulate --keys 30 --help"),
            Ok(Command::Help(HelpTopic::Simulate))
        );
        assert_eq!(parse_words("--version"), Ok(Command::Version));
    }

    #[test]
    fn an_unknown_command_or_none_is_an_error_pointing_at_the_main_help() {
        assert_eq!(error_of("simulat").option, "simulat");
        assert_eq!(error_of("simulat").topic, HelpTopic::Main);
        assert_eq!(error_of("--keys").topic, HelpTopic::Main);
        assert_eq!(parse(&[]).expect_err("no command").option, "<COMMAND>");
    }
}
