//! The command line: hand-parsed `std::env::args` (the root package takes no parsing crate).
//!
//! Parsing is pure: it turns the arguments into a `Command` or a `UsageError` naming the option
//! or argument at fault, and touches nothing else, so a bad command line changes nothing. Every
//! command is described by a `Spec` (its arguments and options) and read by one scanner, so
//! `--opt value`, `--opt=value`, `--help` anywhere, "given twice" and "needs a value" behave
//! the same in every command.

use std::fmt;
use std::path::PathBuf;

use tally_engine::calendar::MAX_TIMESTAMP_MS;
use tally_engine::policy::MAX_QUANTITY;
use tally_engine::{AdjustmentDirection, Durability, Unit};

use crate::format::grouped;
pub use crate::help::HelpTopic;
use crate::store;

pub const MIN_KEYS: u64 = 20;
pub const MAX_KEYS: u64 = 1_000_000;
pub const DEFAULT_KEYS: u64 = 2_000;
pub const MIN_DAYS: u64 = 1;
pub const MAX_DAYS: u64 = 60;
pub const DEFAULT_DAYS: u64 = 3;
pub const DEFAULT_SEED: u64 = 1;
/// `tally simulate` makes its writes durable this often by default: fast, and a crash of the
/// process loses nothing it was told (see `SIMULATE_HELP`).
pub const DEFAULT_SIMULATE_DURABILITY: Durability = Durability::Interval { ms: 100 };
/// `tally events` prints at most this many events per call by default, and never more than
/// `MAX_EVENTS_LIMIT` (they are held in memory before printing).
pub const DEFAULT_EVENTS_LIMIT: u64 = 1_000;
pub const MAX_EVENTS_LIMIT: u64 = 100_000;
/// The crash test's child runs this many consuming threads by default.
pub const DEFAULT_CRASH_THREADS: u64 = 4;
pub const MAX_CRASH_THREADS: u64 = 16;

// The scripted scenario needs a few keys of each kind; fewer than this leaves plans empty.
const _: () = assert!(MIN_KEYS <= DEFAULT_KEYS && DEFAULT_KEYS <= MAX_KEYS);
const _: () = assert!(MIN_DAYS <= DEFAULT_DAYS && DEFAULT_DAYS <= MAX_DAYS);
const _: () = assert!(1 <= DEFAULT_EVENTS_LIMIT && DEFAULT_EVENTS_LIMIT <= MAX_EVENTS_LIMIT);

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help(HelpTopic),
    Version,
    Simulate(SimulateOptions),
    /// An operator command on a database.
    Operate(Operation),
    /// The crash test's child (hidden): consumes on a database until it is killed.
    CrashChild(CrashChildOptions),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulateOptions {
    pub keys: u64,
    pub days: u64,
    pub seed: u64,
    /// `None`: the policy shipped with the engine.
    pub policy: Option<PathBuf>,
    pub json: bool,
    pub db: PathBuf,
    pub durability: Durability,
    /// Keep what the database holds instead of wiping it first.
    pub keep: bool,
}

impl Default for SimulateOptions {
    fn default() -> SimulateOptions {
        SimulateOptions {
            keys: DEFAULT_KEYS,
            days: DEFAULT_DAYS,
            seed: DEFAULT_SEED,
            policy: None,
            json: false,
            db: PathBuf::from(store::DEFAULT_SIMULATE_DB),
            durability: DEFAULT_SIMULATE_DURABILITY,
            keep: false,
        }
    }
}

/// The database an operator command works on, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Database {
    pub path: PathBuf,
    /// `None`: the policy the database last ran with (the one shipped with the engine for a
    /// new database).
    pub policy: Option<PathBuf>,
    pub durability: Durability,
}

impl Default for Database {
    fn default() -> Database {
        Database {
            path: PathBuf::from(store::DEFAULT_DB),
            policy: None,
            durability: Durability::Sync,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub database: Database,
    pub action: Action,
    /// Which help an error points at.
    pub topic: HelpTopic,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    User {
        user: String,
        key: String,
        at_ms: Option<u64>,
    },
    Team {
        team: String,
        at_ms: Option<u64>,
    },
    Member {
        team: String,
        user: String,
        key: String,
        at_ms: Option<u64>,
    },
    /// Revokes a key for good.
    Revoke {
        key: String,
        at_ms: Option<u64>,
    },
    /// `plan: None` takes the seat away.
    Seat {
        team: String,
        user: String,
        plan: Option<String>,
        at_ms: Option<u64>,
    },
    TopUp {
        team: String,
        micros: u64,
        at_ms: Option<u64>,
    },
    Consume(ConsumeArgs),
    Refund {
        request_id: String,
        at_ms: Option<u64>,
        json: bool,
    },
    Adjust(AdjustArgs),
    Usage {
        key: String,
        at_ms: Option<u64>,
        json: bool,
    },
    Events(EventsArgs),
    /// `tally events --delete-cursor NAME`.
    DeleteCursor {
        name: String,
    },
    /// `tally events --cursors`: the saved cursors and where each is.
    ListCursors {
        json: bool,
    },
    Verify {
        json: bool,
    },
    Compact {
        at_ms: Option<u64>,
    },
    /// Swaps the database's policy for the one at `path`.
    Policy {
        path: PathBuf,
        at_ms: Option<u64>,
    },
}

impl Action {
    /// Whether the command may create the database: only the ones that start filling one.
    pub fn creates_database(&self) -> bool {
        matches!(self, Action::User { .. } | Action::Team { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumeArgs {
    pub key: String,
    pub resource: String,
    pub quantities: Vec<(Unit, u64)>,
    pub request_id: Option<String>,
    pub at_ms: Option<u64>,
    pub json: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdjustArgs {
    pub key: String,
    pub resource: String,
    pub quantities: Vec<(Unit, u64)>,
    pub usage_at_ms: u64,
    pub direction: AdjustmentDirection,
    pub at_ms: Option<u64>,
    pub json: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsArgs {
    pub start: EventsStart,
    pub limit: u64,
    pub json: bool,
}

/// Where `tally events` starts: after a sequence number, or after a named cursor that it then
/// moves to the last event printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventsStart {
    After(u64),
    Cursor(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashChildOptions {
    pub db: PathBuf,
    pub seed: u64,
    pub policy: Option<PathBuf>,
    pub threads: u64,
    /// `Sync` (the default): the workload above. `Interval` or `None`: the flood (see
    /// `crash_child::flood`).
    pub durability: Durability,
}

/// A command line that cannot run: `option` names the option or argument at fault.
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

    pub fn hint(&self) -> String {
        match self.topic.command() {
            None => "Run `tally --help` for usage.".into(),
            Some(command) => format!("Run `tally {command} --help` for the options."),
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
        // `tally --help COMMAND` as `tally help COMMAND`.
        "-h" | "--help" => parse_help(rest),
        "-V" | "--version" => match rest.first() {
            None => Ok(Command::Version),
            Some(extra) => Err(UsageError::new(
                extra.as_str(),
                "unexpected argument; `tally --version` takes none",
                HelpTopic::Main,
            )),
        },
        "help" => parse_help(rest),
        "simulate" => parse_simulate(rest),
        "crash-child" => parse_crash_child(rest),
        other => match HelpTopic::of_command(other) {
            Some(topic) => parse_operation(topic, rest),
            None if other.starts_with('-') => Err(UsageError::new(
                other,
                "unknown option; a command comes first, e.g. `tally simulate`",
                HelpTopic::Main,
            )),
            None => Err(UsageError::new(
                other,
                "unknown command; the commands are simulate, user, team, member, revoke, seat, \
                 topup, consume, refund, adjust, usage, events, verify, compact and policy",
                HelpTopic::Main,
            )),
        },
    }
}

fn parse_help(rest: &[String]) -> Result<Command, UsageError> {
    match rest {
        [] => Ok(Command::Help(HelpTopic::Main)),
        [topic] => HelpTopic::of_command(topic)
            .map(Command::Help)
            .ok_or_else(|| {
                UsageError::new(
                    topic.as_str(),
                    "no help on that; try `tally help simulate`",
                    HelpTopic::Main,
                )
            }),
        [_, extra, ..] => Err(UsageError::new(
            extra.as_str(),
            "unexpected argument; `tally help` takes one command",
            HelpTopic::Main,
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// The scanner.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takes {
    Flag,
    Value,
}

/// What may follow a command's required arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rest {
    Nothing,
    /// At most one more argument, so named.
    Optional(&'static str),
    /// One or more arguments, so named.
    OneOrMore(&'static str),
}

/// A command's shape: required arguments in order, what may follow, and options.
struct Spec {
    name: &'static str,
    topic: HelpTopic,
    arguments: &'static [&'static str],
    rest: Rest,
    options: &'static [(&'static str, Takes)],
    /// Which of `--db`, `--policy` and `--durability` apply.
    database: &'static [(&'static str, Takes)],
}

const DATABASE_OPTIONS: &[(&str, Takes)] = &[
    ("--db", Takes::Value),
    ("--policy", Takes::Value),
    ("--durability", Takes::Value),
];

/// `verify` writes nothing and replays the policies the database recorded: only `--db`.
const READ_ONLY_DATABASE_OPTIONS: &[(&str, Takes)] = &[("--db", Takes::Value)];

/// A scanned command line: arguments in order, options as given.
#[derive(Debug, Default)]
struct Scanned {
    arguments: Vec<String>,
    options: Vec<(&'static str, Option<String>)>,
}

impl Scanned {
    fn value(&self, option: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(name, _)| *name == option)
            .and_then(|(_, value)| value.as_deref())
    }

    fn flag(&self, option: &str) -> bool {
        self.options.iter().any(|(name, _)| *name == option)
    }
}

impl Spec {
    fn error(&self, option: &str, problem: impl Into<String>) -> UsageError {
        UsageError::new(option, problem, self.topic)
    }

    fn option(&self, name: &str) -> Option<(&'static str, Takes)> {
        self.options
            .iter()
            .chain(self.database)
            .find(|(option, _)| *option == name)
            .copied()
    }

    fn synopsis(&self) -> String {
        let mut words = vec![format!("tally {}", self.name)];
        words.extend(self.arguments.iter().map(|name| name.to_string()));
        match self.rest {
            Rest::Nothing => {}
            Rest::Optional(name) => words.push(format!("[{name}]")),
            Rest::OneOrMore(name) => words.push(format!("{name} [{name} ...]")),
        }
        words.join(" ")
    }

    /// Reads `args`; `None` when help was asked for.
    fn scan(&self, args: &[String]) -> Result<Option<Scanned>, UsageError> {
        let mut scanned = Scanned::default();
        let mut only_arguments = false;
        let mut index = 0;
        while index < args.len() {
            let argument = args[index].as_str();
            index += 1;
            if !only_arguments && argument == "--" {
                only_arguments = true;
                continue;
            }
            // `-5` is no option (none starts with a digit): a negative number given as an
            // argument, which its parser refuses naming the argument (`MICROS`), not "unknown
            // option".
            let negative_number = argument
                .strip_prefix('-')
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
            if only_arguments || !argument.starts_with('-') || argument == "-" || negative_number {
                scanned.arguments.push(argument.to_string());
                continue;
            }
            // `--keys=2000` and `--keys 2000` are the same option.
            let (name, inline_value) = match argument.split_once('=') {
                Some((name, value)) if name.starts_with("--") => (name, Some(value)),
                _ => (argument, None),
            };
            if name == "-h" || name == "--help" {
                return Ok(None);
            }
            let (option, takes) = self.option(name).ok_or_else(|| {
                if !self.database.is_empty()
                    && self.database.len() < DATABASE_OPTIONS.len()
                    && DATABASE_OPTIONS.iter().any(|(option, _)| *option == name)
                {
                    self.error(
                        name,
                        format!(
                            "does not apply to `tally {}`: it only reads the database, with the \
                             policies recorded in it",
                            self.name
                        ),
                    )
                } else {
                    self.error(name, "unknown option")
                }
            })?;
            if scanned.options.iter().any(|(seen, _)| *seen == option) {
                return Err(self.error(option, "given twice"));
            }
            let value = match (takes, inline_value) {
                (Takes::Flag, Some(_)) => return Err(self.error(option, "takes no value")),
                (Takes::Flag, None) => None,
                (Takes::Value, Some(value)) => Some(value.to_string()),
                (Takes::Value, None) => {
                    let value = args
                        .get(index)
                        .ok_or_else(|| self.error(option, "needs a value"))?;
                    // `--help` asks for help wherever it stands, and another of the command's
                    // options is not this one's value (`--opt=VALUE` gives a value that looks
                    // like one).
                    if value == "-h" || value == "--help" {
                        return Ok(None);
                    }
                    let value_name = value
                        .split_once('=')
                        .map_or(value.as_str(), |(name, _)| name);
                    if self.option(value_name).is_some() {
                        return Err(self
                            .error(option, format!("needs a value ({value_name} is an option)")));
                    }
                    index += 1;
                    Some(value.clone())
                }
            };
            scanned.options.push((option, value));
        }
        self.check_arguments(&scanned.arguments)?;
        Ok(Some(scanned))
    }

    fn check_arguments(&self, arguments: &[String]) -> Result<(), UsageError> {
        let required = self.arguments.len();
        if let Some(missing) = self.arguments.get(arguments.len()) {
            return Err(self.error(missing, format!("missing; usage: {}", self.synopsis())));
        }
        let most = match self.rest {
            Rest::Nothing => required,
            Rest::Optional(_) => required + 1,
            Rest::OneOrMore(_) => usize::MAX,
        };
        if let Rest::OneOrMore(name) = self.rest {
            if arguments.len() == required {
                return Err(self.error(name, format!("missing; usage: {}", self.synopsis())));
            }
        }
        if let Some(extra) = arguments.get(most) {
            let problem = if self.arguments.is_empty() && self.rest == Rest::Nothing {
                format!("unexpected argument; `{}` takes only options", self.name)
            } else {
                format!("unexpected argument; usage: {}", self.synopsis())
            };
            return Err(self.error(extra, problem));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Values.

/// Parses a whole number, allowing `_` or `,` (one of them) to group its digits in threes
/// (`2,000`, `10_000`). A separator anywhere else (`1,5`: a decimal comma, `5,00`) is refused
/// rather than dropped, which would read a number ten or a hundred times off.
pub fn parse_count(
    option: &str,
    value: &str,
    min: u64,
    max: u64,
    topic: HelpTopic,
) -> Result<u64, UsageError> {
    let error = |problem: String| UsageError::new(option, problem, topic);
    let digits: String = value.chars().filter(|c| *c != '_' && *c != ',').collect();
    let well_formed = !digits.is_empty()
        && digits.bytes().all(|byte| byte.is_ascii_digit())
        && value.starts_with(|c: char| c.is_ascii_digit())
        && value.ends_with(|c: char| c.is_ascii_digit());
    if !well_formed {
        return Err(error(format!("{value:?} is not a whole number")));
    }
    let separators: Vec<char> = value.chars().filter(|c| *c == '_' || *c == ',').collect();
    if let Some(&separator) = separators.first() {
        let groups: Vec<&str> = value.split(separator).collect();
        let grouped_in_threes = separators.iter().all(|c| *c == separator)
            && groups[0].len() <= 3
            && groups[1..].iter().all(|group| group.len() == 3);
        if !grouped_in_threes {
            return Err(error(format!(
                "{value:?} is not a whole number: `{separator}` may only group its digits in \
                 threes (1{separator}000{separator}000)"
            )));
        }
    }
    let range = || format!("must be between {} and {}", grouped(min), grouped(max));
    let number: u64 = digits
        .parse()
        .map_err(|_| error(format!("{value} is too large; {}", range())))?;
    if !(min..=max).contains(&number) {
        return Err(error(format!("{value} {}", range())));
    }
    Ok(number)
}

/// A timestamp in milliseconds since the Unix epoch, before 2100 (the engine's range).
fn parse_at(option: &str, value: &str, topic: HelpTopic) -> Result<u64, UsageError> {
    parse_count(option, value, 0, MAX_TIMESTAMP_MS - 1, topic)
}

fn parse_path(option: &str, value: &str, topic: HelpTopic) -> Result<PathBuf, UsageError> {
    if value.is_empty() {
        return Err(UsageError::new(option, "needs a path", topic));
    }
    Ok(PathBuf::from(value))
}

/// A name given on the command line (user, team, key, request id, cursor): not empty.
fn parse_name(option: &str, value: &str, topic: HelpTopic) -> Result<String, UsageError> {
    if value.is_empty() {
        return Err(UsageError::new(option, "must not be empty", topic));
    }
    Ok(value.to_string())
}

/// `UNIT=N` arguments, e.g. `requests=1 tokens=1200`.
fn parse_quantities(
    arguments: &[String],
    topic: HelpTopic,
) -> Result<Vec<(Unit, u64)>, UsageError> {
    let mut quantities: Vec<(Unit, u64)> = Vec::with_capacity(arguments.len());
    for argument in arguments {
        let error = |problem: String| UsageError::new(argument.as_str(), problem, topic);
        let Some((name, amount)) = argument.split_once('=') else {
            return Err(error("a quantity is UNIT=N, e.g. requests=1".into()));
        };
        let unit = Unit::parse(name).ok_or_else(|| {
            let names: Vec<&str> = Unit::ALL.iter().map(|unit| unit.name()).collect();
            error(format!(
                "unknown unit {name:?}; the units are {}",
                names.join(", ")
            ))
        })?;
        if quantities.iter().any(|(seen, _)| *seen == unit) {
            return Err(error(format!("{unit} is given twice")));
        }
        let amount = parse_count(argument, amount, 1, MAX_QUANTITY, topic)?;
        quantities.push((unit, amount));
    }
    Ok(quantities)
}

fn optional_at(spec: &Spec, scanned: &Scanned) -> Result<Option<u64>, UsageError> {
    scanned
        .value("--at")
        .map(|value| parse_at("--at", value, spec.topic))
        .transpose()
}

fn parse_database(spec: &Spec, scanned: &Scanned) -> Result<Database, UsageError> {
    let mut database = Database::default();
    if let Some(value) = scanned.value("--db") {
        database.path = parse_path("--db", value, spec.topic)?;
    }
    if let Some(value) = scanned.value("--policy") {
        database.policy = Some(parse_path("--policy", value, spec.topic)?);
    }
    if let Some(value) = scanned.value("--durability") {
        database.durability = store::parse_durability(value)
            .map_err(|problem| spec.error("--durability", problem))?;
    }
    Ok(database)
}

// ---------------------------------------------------------------------------------------------
// Commands.

const SIMULATE: Spec = Spec {
    name: "simulate",
    topic: HelpTopic::Simulate,
    arguments: &[],
    rest: Rest::Nothing,
    options: &[
        ("--keys", Takes::Value),
        ("--days", Takes::Value),
        ("--seed", Takes::Value),
        ("--policy", Takes::Value),
        ("--json", Takes::Flag),
        ("--db", Takes::Value),
        ("--durability", Takes::Value),
        ("--keep", Takes::Flag),
    ],
    database: &[],
};

fn parse_simulate(args: &[String]) -> Result<Command, UsageError> {
    let spec = &SIMULATE;
    let Some(scanned) = spec.scan(args)? else {
        return Ok(Command::Help(spec.topic));
    };
    let topic = spec.topic;
    let mut options = SimulateOptions::default();
    if let Some(value) = scanned.value("--keys") {
        options.keys = parse_count("--keys", value, MIN_KEYS, MAX_KEYS, topic)?;
    }
    if let Some(value) = scanned.value("--days") {
        options.days = parse_count("--days", value, MIN_DAYS, MAX_DAYS, topic)?;
    }
    if let Some(value) = scanned.value("--seed") {
        options.seed = parse_count("--seed", value, 0, u64::MAX, topic)?;
    }
    if let Some(value) = scanned.value("--policy") {
        if value.is_empty() {
            return Err(spec.error("--policy", "needs a file path"));
        }
        options.policy = Some(PathBuf::from(value));
    }
    if let Some(value) = scanned.value("--db") {
        options.db = parse_path("--db", value, topic)?;
    }
    if let Some(value) = scanned.value("--durability") {
        options.durability = store::parse_durability(value)
            .map_err(|problem| spec.error("--durability", problem))?;
    }
    options.json = scanned.flag("--json");
    options.keep = scanned.flag("--keep");
    Ok(Command::Simulate(options))
}

const CRASH_CHILD: Spec = Spec {
    name: "crash-child",
    topic: HelpTopic::Main,
    arguments: &[],
    rest: Rest::Nothing,
    options: &[
        ("--db", Takes::Value),
        ("--seed", Takes::Value),
        ("--policy", Takes::Value),
        ("--threads", Takes::Value),
        ("--durability", Takes::Value),
    ],
    database: &[],
};

fn parse_crash_child(args: &[String]) -> Result<Command, UsageError> {
    let spec = &CRASH_CHILD;
    let Some(scanned) = spec.scan(args)? else {
        return Ok(Command::Help(HelpTopic::Main));
    };
    let topic = spec.topic;
    let db = scanned
        .value("--db")
        .ok_or_else(|| spec.error("--db", "missing; the child needs a database"))?;
    let seed = scanned.value("--seed").map_or(Ok(0), |value| {
        parse_count("--seed", value, 0, u64::MAX, topic)
    })?;
    let policy = scanned
        .value("--policy")
        .map(|value| parse_path("--policy", value, topic))
        .transpose()?;
    let threads = scanned
        .value("--threads")
        .map_or(Ok(DEFAULT_CRASH_THREADS), |value| {
            parse_count("--threads", value, 1, MAX_CRASH_THREADS, topic)
        })?;
    let durability = scanned
        .value("--durability")
        .map_or(Ok(Durability::Sync), store::parse_durability)
        .map_err(|problem| spec.error("--durability", problem))?;
    Ok(Command::CrashChild(CrashChildOptions {
        db: parse_path("--db", db, topic)?,
        seed,
        policy,
        threads,
        durability,
    }))
}

const AT: (&str, Takes) = ("--at", Takes::Value);
const JSON: (&str, Takes) = ("--json", Takes::Flag);

const fn operator_spec(
    name: &'static str,
    topic: HelpTopic,
    arguments: &'static [&'static str],
    rest: Rest,
    options: &'static [(&'static str, Takes)],
) -> Spec {
    Spec {
        name,
        topic,
        arguments,
        rest,
        options,
        database: DATABASE_OPTIONS,
    }
}

fn operator_spec_of(topic: HelpTopic) -> Spec {
    use HelpTopic as T;
    match topic {
        T::User => operator_spec("user", topic, &["USER", "KEY"], Rest::Nothing, &[AT]),
        T::Team => operator_spec("team", topic, &["TEAM"], Rest::Nothing, &[AT]),
        T::Member => operator_spec(
            "member",
            topic,
            &["TEAM", "USER", "KEY"],
            Rest::Nothing,
            &[AT],
        ),
        T::Revoke => operator_spec("revoke", topic, &["KEY"], Rest::Nothing, &[AT]),
        T::Seat => operator_spec(
            "seat",
            topic,
            &["TEAM", "USER"],
            Rest::Optional("PLAN"),
            &[("--none", Takes::Flag), AT],
        ),
        T::TopUp => operator_spec("topup", topic, &["TEAM", "MICROS"], Rest::Nothing, &[AT]),
        T::Consume => operator_spec(
            "consume",
            topic,
            &["KEY", "RESOURCE"],
            Rest::OneOrMore("UNIT=N"),
            &[("--id", Takes::Value), AT, JSON],
        ),
        T::Refund => operator_spec("refund", topic, &["REQUEST_ID"], Rest::Nothing, &[AT, JSON]),
        T::Adjust => operator_spec(
            "adjust",
            topic,
            &["KEY", "RESOURCE"],
            Rest::OneOrMore("UNIT=N"),
            &[
                ("--usage-at", Takes::Value),
                ("--add", Takes::Flag),
                ("--remove", Takes::Flag),
                AT,
                JSON,
            ],
        ),
        T::Usage => operator_spec("usage", topic, &["KEY"], Rest::Nothing, &[AT, JSON]),
        T::Events => operator_spec(
            "events",
            topic,
            &[],
            Rest::Nothing,
            &[
                ("--after", Takes::Value),
                ("--cursor", Takes::Value),
                ("--limit", Takes::Value),
                ("--delete-cursor", Takes::Value),
                ("--cursors", Takes::Flag),
                JSON,
            ],
        ),
        T::Verify => Spec {
            database: READ_ONLY_DATABASE_OPTIONS,
            ..operator_spec("verify", topic, &[], Rest::Nothing, &[JSON])
        },
        T::Compact => operator_spec("compact", topic, &[], Rest::Nothing, &[AT]),
        T::Policy => operator_spec("policy", topic, &["PATH"], Rest::Nothing, &[AT]),
        T::Main | T::Simulate => unreachable!("not an operator command"),
    }
}

fn parse_operation(topic: HelpTopic, args: &[String]) -> Result<Command, UsageError> {
    let spec = operator_spec_of(topic);
    let Some(scanned) = spec.scan(args)? else {
        return Ok(Command::Help(topic));
    };
    let database = parse_database(&spec, &scanned)?;
    let action = parse_action(&spec, &scanned)?;
    Ok(Command::Operate(Operation {
        database,
        action,
        topic,
    }))
}

fn parse_action(spec: &Spec, scanned: &Scanned) -> Result<Action, UsageError> {
    let topic = spec.topic;
    let argument = |index: usize| -> Result<String, UsageError> {
        parse_name(spec.arguments[index], &scanned.arguments[index], topic)
    };
    let at_ms = optional_at(spec, scanned)?;
    let json = scanned.flag("--json");
    let action = match topic {
        HelpTopic::User => Action::User {
            user: argument(0)?,
            key: argument(1)?,
            at_ms,
        },
        HelpTopic::Team => Action::Team {
            team: argument(0)?,
            at_ms,
        },
        HelpTopic::Member => Action::Member {
            team: argument(0)?,
            user: argument(1)?,
            key: argument(2)?,
            at_ms,
        },
        HelpTopic::Revoke => Action::Revoke {
            key: argument(0)?,
            at_ms,
        },
        HelpTopic::Seat => parse_seat(spec, scanned, at_ms)?,
        HelpTopic::TopUp => Action::TopUp {
            team: argument(0)?,
            micros: parse_count("MICROS", &scanned.arguments[1], 1, u64::MAX, topic)?,
            at_ms,
        },
        HelpTopic::Consume => Action::Consume(ConsumeArgs {
            key: argument(0)?,
            resource: argument(1)?,
            quantities: parse_quantities(&scanned.arguments[2..], topic)?,
            request_id: scanned
                .value("--id")
                .map(|value| parse_name("--id", value, topic))
                .transpose()?,
            at_ms,
            json,
        }),
        HelpTopic::Refund => Action::Refund {
            request_id: parse_name("REQUEST_ID", &scanned.arguments[0], topic)?,
            at_ms,
            json,
        },
        HelpTopic::Adjust => parse_adjust(spec, scanned, at_ms, json)?,
        HelpTopic::Usage => Action::Usage {
            key: argument(0)?,
            at_ms,
            json,
        },
        HelpTopic::Events => parse_events(spec, scanned)?,
        HelpTopic::Verify => Action::Verify { json },
        HelpTopic::Compact => Action::Compact { at_ms },
        HelpTopic::Policy => Action::Policy {
            path: parse_path("PATH", &scanned.arguments[0], topic)?,
            at_ms,
        },
        HelpTopic::Main | HelpTopic::Simulate => unreachable!("not an operator command"),
    };
    Ok(action)
}

fn parse_adjust(
    spec: &Spec,
    scanned: &Scanned,
    at_ms: Option<u64>,
    json: bool,
) -> Result<Action, UsageError> {
    let topic = spec.topic;
    let direction = match (scanned.flag("--add"), scanned.flag("--remove")) {
        (true, false) => AdjustmentDirection::Add,
        (false, true) => AdjustmentDirection::Remove,
        (true, true) => {
            return Err(spec.error("--remove", "given with --add; give one or the other"));
        }
        (false, false) => {
            return Err(spec.error(
                "--add",
                "missing; give --add (count usage that was not counted) or --remove (give back \
                 usage that should not have been)",
            ));
        }
    };
    let usage_at_ms = match scanned.value("--usage-at") {
        Some(value) => parse_at("--usage-at", value, topic)?,
        None => {
            return Err(spec.error(
                "--usage-at",
                "missing; give when the usage happened, in ms since 1970 UTC",
            ));
        }
    };
    Ok(Action::Adjust(AdjustArgs {
        key: parse_name("KEY", &scanned.arguments[0], topic)?,
        resource: parse_name("RESOURCE", &scanned.arguments[1], topic)?,
        quantities: parse_quantities(&scanned.arguments[2..], topic)?,
        usage_at_ms,
        direction,
        at_ms,
        json,
    }))
}

fn parse_seat(spec: &Spec, scanned: &Scanned, at_ms: Option<u64>) -> Result<Action, UsageError> {
    let plan = match (scanned.arguments.get(2), scanned.flag("--none")) {
        (Some(plan), false) => Some(parse_name("PLAN", plan, spec.topic)?),
        (None, true) => None,
        (Some(_), true) => {
            return Err(spec.error("--none", "given with a PLAN; give one or the other"));
        }
        (None, false) => {
            return Err(spec.error(
                "PLAN",
                "missing; give a plan name, or --none to take the seat away",
            ));
        }
    };
    Ok(Action::Seat {
        team: parse_name("TEAM", &scanned.arguments[0], spec.topic)?,
        user: parse_name("USER", &scanned.arguments[1], spec.topic)?,
        plan,
        at_ms,
    })
}

fn parse_events(spec: &Spec, scanned: &Scanned) -> Result<Action, UsageError> {
    let topic = spec.topic;
    if scanned.flag("--cursors") {
        if let Some(other) = ["--after", "--cursor", "--limit", "--delete-cursor"]
            .into_iter()
            .find(|option| scanned.value(option).is_some())
        {
            return Err(spec.error(other, "given with --cursors, which prints no events"));
        }
        return Ok(Action::ListCursors {
            json: scanned.flag("--json"),
        });
    }
    if let Some(name) = scanned.value("--delete-cursor") {
        if let Some(other) = ["--after", "--cursor", "--limit"]
            .into_iter()
            .find(|option| scanned.value(option).is_some())
        {
            return Err(spec.error(other, "given with --delete-cursor, which prints no events"));
        }
        if scanned.flag("--json") {
            return Err(spec.error(
                "--json",
                "given with --delete-cursor, which prints no events",
            ));
        }
        return Ok(Action::DeleteCursor {
            name: parse_name("--delete-cursor", name, topic)?,
        });
    }
    let start = match (scanned.value("--after"), scanned.value("--cursor")) {
        (Some(_), Some(_)) => {
            return Err(spec.error("--cursor", "give --after or --cursor, not both"));
        }
        (Some(after), None) => {
            EventsStart::After(parse_count("--after", after, 0, u64::MAX, topic)?)
        }
        (None, Some(name)) => EventsStart::Cursor(parse_name("--cursor", name, topic)?),
        (None, None) => EventsStart::After(0),
    };
    let limit = scanned
        .value("--limit")
        .map_or(Ok(DEFAULT_EVENTS_LIMIT), |value| {
            parse_count("--limit", value, 1, MAX_EVENTS_LIMIT, topic)
        })?;
    Ok(Action::Events(EventsArgs {
        start,
        limit,
        json: scanned.flag("--json"),
    }))
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

    fn operation(line: &str) -> Operation {
        match parse_words(line) {
            Ok(Command::Operate(operation)) => operation,
            other => panic!("{line:?} parsed as {other:?}"),
        }
    }

    fn action(line: &str) -> Action {
        operation(line).action
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
        let defaults = SimulateOptions::default();
        assert_eq!(defaults.db, PathBuf::from("tally-data-simulate"));
        assert_eq!(defaults.durability, Durability::Interval { ms: 100 });
        assert!(!defaults.keep);
    }

    #[test]
    fn every_option_is_read_in_both_spellings() {
        let options = simulate_options(
            "simulate --keys 500 --days=2 --seed 7 --policy p.json --json --db=/tmp/sim \
             --durability none --keep",
        );
        assert_eq!(
            options,
            SimulateOptions {
                keys: 500,
                days: 2,
                seed: 7,
                policy: Some(PathBuf::from("p.json")),
                json: true,
                db: PathBuf::from("/tmp/sim"),
                durability: Durability::None,
                keep: true,
            }
        );
    }

    #[test]
    fn numbers_may_carry_digit_separators() {
        assert_eq!(simulate_options("simulate --keys 2,000").keys, 2_000);
        assert_eq!(simulate_options("simulate --keys=10_000").keys, 10_000);
    }

    /// `--version` takes nothing after it, and `--help` what `help` takes: an argument they
    /// would ignore is refused rather than dropped.
    #[test]
    fn version_and_help_refuse_what_they_would_ignore() {
        assert_eq!(parse_words("--version").unwrap(), Command::Version);
        assert_eq!(error_of("--version extra").option, "extra");
        assert_eq!(error_of("-V --db x").option, "--db");
        assert_eq!(
            parse_words("--help").unwrap(),
            Command::Help(HelpTopic::Main)
        );
        assert_eq!(
            parse_words("-h simulate").unwrap(),
            Command::Help(HelpTopic::Simulate)
        );
        assert_eq!(error_of("--help simulat").option, "simulat");
    }

    /// An unknown command's error lists the commands there are: every one `tally --help` lists.
    #[test]
    fn an_unknown_command_s_error_lists_every_command() {
        let error = error_of("polcy x.toml");
        assert_eq!(error.option, "polcy");
        for command in [
            "simulate", "user", "team", "member", "revoke", "seat", "topup", "consume", "refund",
            "adjust", "usage", "events", "verify", "compact", "policy",
        ] {
            assert!(HelpTopic::of_command(command).is_some(), "{command}");
            assert!(
                error.problem.contains(&format!(" {command}")),
                "{command} is missing from: {error}"
            );
        }
    }

    /// A separator only groups digits in threes: `1,5` (a decimal comma) or `5,00` is a typo,
    /// not 15 or 500 micro-credits, units or milliseconds.
    #[test]
    fn a_separator_that_does_not_group_digits_in_threes_is_refused() {
        for value in [
            "1,5",
            "5,00",
            "1,0000",
            "10_00",
            "5,,000",
            "1,000,00",
            "1_000,000",
        ] {
            let error = error_of(&format!("topup @ada {value}"));
            assert_eq!(error.option, "MICROS", "{value}");
            assert!(error.problem.contains(value), "{value}: {error}");
            let error = error_of(&format!("consume tp-ada m2.7 requests={value}"));
            assert_eq!(error.option, format!("requests={value}"), "{value}");
        }
        assert_eq!(
            simulate_options("simulate --keys 1,000,000").keys,
            1_000_000
        );
        assert_eq!(simulate_options("simulate --keys 999_999").keys, 999_999);
        assert_eq!(simulate_options("simulate --keys 20").keys, 20);
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
        let error = error_of("simulate --durability fast");
        assert_eq!(error.option, "--durability");
        assert!(error.problem.contains("interval:MS"), "{error}");
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
    fn an_option_where_a_value_goes_is_no_value() {
        // `--help` where a value goes asks for help, as it does anywhere else: it was taken
        // for the value, and refused (or used) as one.
        assert_eq!(
            parse_words("simulate --seed --help"),
            Ok(Command::Help(HelpTopic::Simulate))
        );
        assert_eq!(
            parse_words("consume k m2.7 requests=1 --at -h"),
            Ok(Command::Help(HelpTopic::Consume))
        );
        // Another of the command's options where a value goes: the value is missing.
        for words in ["simulate --seed --json", "simulate --seed --keys=30"] {
            let error = error_of(words);
            assert_eq!(error.option, "--seed", "{words}");
            assert!(
                error.problem.starts_with("needs a value"),
                "{words}: {error}"
            );
        }
        assert!(error_of("simulate --seed --json")
            .problem
            .contains("--json is an option"));
        // A value that only looks like an option is taken when given with `=`.
        match parse_words("usage --db=--json k") {
            Ok(Command::Operate(operation)) => {
                assert_eq!(operation.database.path, PathBuf::from("--json"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_option_given_twice_is_refused() {
        assert_eq!(
            error_of("simulate --keys 30 --keys 40").problem,
            "given twice"
        );
        assert_eq!(error_of("usage k --json --json").option, "--json");
    }

    #[test]
    fn flags_take_no_value() {
        assert_eq!(error_of("simulate --json=yes").option, "--json");
        assert_eq!(error_of("simulate --keep=1").option, "--keep");
    }

    #[test]
    fn a_stray_argument_to_simulate_is_refused() {
        let error = error_of("simulate 100");
        assert_eq!(error.option, "100");
        assert!(error.problem.contains("takes only options"), "{error}");
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
        assert_eq!(
            parse_words("consume k m2.7 requests=1 -h"),
            Ok(Command::Help(HelpTopic::Consume))
        );
        assert_eq!(
            parse_words("help events"),
            Ok(Command::Help(HelpTopic::Events))
        );
        assert_eq!(parse_words("--version"), Ok(Command::Version));
    }

    #[test]
    fn an_unknown_command_or_none_is_an_error_pointing_at_the_main_help() {
        assert_eq!(error_of("simulat").option, "simulat");
        assert_eq!(error_of("simulat").topic, HelpTopic::Main);
        assert_eq!(error_of("--keys").topic, HelpTopic::Main);
        assert_eq!(error_of("help consumer").option, "consumer");
        assert_eq!(parse(&[]).expect_err("no command").option, "<COMMAND>");
    }

    #[test]
    fn operator_commands_default_to_the_local_store_the_stored_policy_and_sync() {
        let operation = operation("usage tp-ada");
        assert_eq!(operation.database, Database::default());
        assert_eq!(operation.database.path, PathBuf::from("tally-data"));
        assert_eq!(operation.database.policy, None);
        assert_eq!(operation.database.durability, Durability::Sync);
        assert_eq!(
            operation.action,
            Action::Usage {
                key: "tp-ada".into(),
                at_ms: None,
                json: false
            }
        );
    }

    #[test]
    fn database_options_are_read_by_every_operator_command() {
        let operation =
            operation("team acme --db /tmp/x --policy p.toml --durability interval:250 --at 5");
        assert_eq!(
            operation.database,
            Database {
                path: PathBuf::from("/tmp/x"),
                policy: Some(PathBuf::from("p.toml")),
                durability: Durability::Interval { ms: 250 },
            }
        );
        assert_eq!(
            operation.action,
            Action::Team {
                team: "acme".into(),
                at_ms: Some(5)
            }
        );
        assert_eq!(error_of("verify --db").option, "--db");
        assert_eq!(
            error_of("verify --durability interval:0").option,
            "--durability"
        );
    }

    #[test]
    fn admin_commands_take_their_arguments_in_order() {
        assert_eq!(
            action("user ada tp-ada"),
            Action::User {
                user: "ada".into(),
                key: "tp-ada".into(),
                at_ms: None
            }
        );
        assert_eq!(
            action("member acme ada tp-acme-ada --at 1,000"),
            Action::Member {
                team: "acme".into(),
                user: "ada".into(),
                key: "tp-acme-ada".into(),
                at_ms: Some(1_000)
            }
        );
        assert_eq!(
            action("topup @ada 5,000,000"),
            Action::TopUp {
                team: "@ada".into(),
                micros: 5_000_000,
                at_ms: None
            }
        );
        assert_eq!(error_of("topup @ada 0").option, "MICROS");
        assert_eq!(error_of("topup @ada lots").option, "MICROS");
    }

    #[test]
    fn a_missing_or_extra_argument_is_named() {
        let error = error_of("member acme ada");
        assert_eq!(error.option, "KEY");
        assert!(
            error.problem.contains("tally member TEAM USER KEY"),
            "{error}"
        );
        assert_eq!(error.topic, HelpTopic::Member);
        assert_eq!(error_of("team acme globex").option, "globex");
        assert_eq!(error_of("usage").option, "KEY");
        assert_eq!(error_of("consume k m2.7").option, "UNIT=N");
    }

    #[test]
    fn a_seat_names_a_plan_or_none_but_not_both() {
        assert_eq!(
            action("seat @ada ada Plus"),
            Action::Seat {
                team: "@ada".into(),
                user: "ada".into(),
                plan: Some("Plus".into()),
                at_ms: None
            }
        );
        assert_eq!(
            action("seat @ada ada --none"),
            Action::Seat {
                team: "@ada".into(),
                user: "ada".into(),
                plan: None,
                at_ms: None
            }
        );
        assert_eq!(error_of("seat @ada ada").option, "PLAN");
        assert_eq!(error_of("seat @ada ada Plus --none").option, "--none");
        assert_eq!(error_of("seat @ada ada Plus Max").option, "Max");
    }

    #[test]
    fn consume_reads_quantities_an_id_and_a_time() {
        assert_eq!(
            action("consume tp-ada m2.7 requests=1 tokens=1,200 --id req-1 --at 7 --json"),
            Action::Consume(ConsumeArgs {
                key: "tp-ada".into(),
                resource: "m2.7".into(),
                quantities: vec![(Unit::Requests, 1), (Unit::Tokens, 1_200)],
                request_id: Some("req-1".into()),
                at_ms: Some(7),
                json: true,
            })
        );
    }

    #[test]
    fn refund_and_adjust_read_their_arguments() {
        assert_eq!(
            action("refund req-1 --at 9 --json"),
            Action::Refund {
                request_id: "req-1".into(),
                at_ms: Some(9),
                json: true,
            }
        );
        assert_eq!(
            action("adjust tp-ada m2.7 requests=30 --usage-at 5 --remove --at 7"),
            Action::Adjust(AdjustArgs {
                key: "tp-ada".into(),
                resource: "m2.7".into(),
                quantities: vec![(Unit::Requests, 30)],
                usage_at_ms: 5,
                direction: AdjustmentDirection::Remove,
                at_ms: Some(7),
                json: false,
            })
        );
        assert_eq!(
            error_of("adjust tp-ada m2.7 requests=1 --add").option,
            "--usage-at"
        );
        assert_eq!(
            error_of("adjust tp-ada m2.7 requests=1 --usage-at 5").option,
            "--add"
        );
        assert_eq!(
            error_of("adjust tp-ada m2.7 requests=1 --usage-at 5 --add --remove").option,
            "--remove"
        );
        assert_eq!(
            error_of("adjust tp-ada m2.7 requests=1 --usage-at soon --add").option,
            "--usage-at"
        );
        assert_eq!(
            error_of("adjust tp-ada m2.7 --usage-at 5 --add").option,
            "UNIT=N"
        );
        assert_eq!(error_of("refund").option, "REQUEST_ID");
    }

    #[test]
    fn a_bad_quantity_names_the_argument() {
        for (line, culprit, words) in [
            ("consume k m2.7 requests", "requests", "UNIT=N"),
            ("consume k m2.7 request=1", "request=1", "unknown unit"),
            ("consume k m2.7 requests=0", "requests=0", "between 1 and"),
            (
                "consume k m2.7 requests=x",
                "requests=x",
                "not a whole number",
            ),
            (
                "consume k m2.7 requests=1 requests=2",
                "requests=2",
                "given twice",
            ),
        ] {
            let error = error_of(line);
            assert_eq!(error.option, culprit, "{line}");
            assert!(error.problem.contains(words), "{line}: {error}");
        }
        assert_eq!(
            error_of("consume k m2.7 requests=1099511627777").option,
            "requests=1099511627777"
        );
    }

    #[test]
    fn a_time_beyond_2100_is_refused_by_the_command_line() {
        let error = error_of("usage k --at 4102444800000");
        assert_eq!(error.option, "--at");
        assert!(error.problem.contains("between 0 and"), "{error}");
    }

    #[test]
    fn events_start_after_a_number_or_a_cursor_with_a_bounded_limit() {
        assert_eq!(
            action("events"),
            Action::Events(EventsArgs {
                start: EventsStart::After(0),
                limit: DEFAULT_EVENTS_LIMIT,
                json: false
            })
        );
        assert_eq!(
            action("events --after 41 --limit 5 --json"),
            Action::Events(EventsArgs {
                start: EventsStart::After(41),
                limit: 5,
                json: true
            })
        );
        assert_eq!(
            action("events --cursor billing"),
            Action::Events(EventsArgs {
                start: EventsStart::Cursor("billing".into()),
                limit: DEFAULT_EVENTS_LIMIT,
                json: false
            })
        );
        assert_eq!(error_of("events --after 1 --cursor b").option, "--cursor");
        assert_eq!(
            action("events --cursors"),
            Action::ListCursors { json: false }
        );
        assert_eq!(
            action("events --cursors --json"),
            Action::ListCursors { json: true }
        );
        assert_eq!(error_of("events --cursors --cursor b").option, "--cursor");
        assert_eq!(
            error_of("events --delete-cursor b --cursors").option,
            "--delete-cursor"
        );
        assert_eq!(
            action("events --delete-cursor billing"),
            Action::DeleteCursor {
                name: "billing".into()
            }
        );
        assert_eq!(
            error_of("events --delete-cursor b --cursor b").option,
            "--cursor"
        );
        assert_eq!(error_of("events --delete-cursor b --json").option, "--json");
        assert_eq!(
            error_of("events --delete-cursor=").option,
            "--delete-cursor"
        );
        assert_eq!(error_of("events --limit 0").option, "--limit");
        assert_eq!(error_of("events --limit 100001").option, "--limit");
        assert_eq!(error_of("events --after=").option, "--after");
    }

    #[test]
    fn a_double_dash_ends_the_options() {
        assert_eq!(
            action("usage -- --odd-key"),
            Action::Usage {
                key: "--odd-key".into(),
                at_ms: None,
                json: false
            }
        );
    }

    #[test]
    fn the_crash_child_needs_a_database() {
        assert_eq!(
            parse_words("crash-child --db /tmp/c --seed 9"),
            Ok(Command::CrashChild(CrashChildOptions {
                db: PathBuf::from("/tmp/c"),
                seed: 9,
                policy: None,
                threads: DEFAULT_CRASH_THREADS,
                durability: Durability::Sync,
            }))
        );
        assert_eq!(error_of("crash-child --seed 9").option, "--db");
        assert_eq!(
            error_of("crash-child --db d --threads 0").option,
            "--threads"
        );
    }
}
