//! The help texts: `tally --help`, and one per command (`tally COMMAND --help`).

/// Which help to print, or to point an error at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelpTopic {
    Main,
    Simulate,
    User,
    Team,
    Member,
    Revoke,
    Seat,
    TopUp,
    Consume,
    Refund,
    Adjust,
    Usage,
    Events,
    Verify,
    Compact,
    Policy,
}

const COMMANDS: [(&str, HelpTopic); 15] = [
    ("simulate", HelpTopic::Simulate),
    ("user", HelpTopic::User),
    ("team", HelpTopic::Team),
    ("member", HelpTopic::Member),
    ("revoke", HelpTopic::Revoke),
    ("seat", HelpTopic::Seat),
    ("topup", HelpTopic::TopUp),
    ("consume", HelpTopic::Consume),
    ("refund", HelpTopic::Refund),
    ("adjust", HelpTopic::Adjust),
    ("usage", HelpTopic::Usage),
    ("events", HelpTopic::Events),
    ("verify", HelpTopic::Verify),
    ("compact", HelpTopic::Compact),
    ("policy", HelpTopic::Policy),
];

impl HelpTopic {
    /// The topic of a command's name (`simulate`, `usage`, ...).
    pub fn of_command(name: &str) -> Option<HelpTopic> {
        COMMANDS
            .iter()
            .find(|(command, _)| *command == name)
            .map(|(_, topic)| *topic)
    }

    /// The command's name; `None` for the main help.
    pub fn command(self) -> Option<&'static str> {
        COMMANDS
            .iter()
            .find(|(_, topic)| *topic == self)
            .map(|(command, _)| *command)
    }

    pub fn text(self) -> String {
        let body = match self {
            HelpTopic::Main => return MAIN_HELP.to_string(),
            HelpTopic::Simulate => return SIMULATE_HELP.to_string(),
            HelpTopic::User => USER_HELP,
            HelpTopic::Team => TEAM_HELP,
            HelpTopic::Member => MEMBER_HELP,
            HelpTopic::Revoke => REVOKE_HELP,
            HelpTopic::Seat => SEAT_HELP,
            HelpTopic::TopUp => TOPUP_HELP,
            HelpTopic::Consume => CONSUME_HELP,
            HelpTopic::Refund => REFUND_HELP,
            HelpTopic::Adjust => ADJUST_HELP,
            HelpTopic::Usage => USAGE_HELP,
            HelpTopic::Events => EVENTS_HELP,
            HelpTopic::Verify => return format!("{VERIFY_HELP}{READ_ONLY_DATABASE_OPTIONS_HELP}"),
            HelpTopic::Compact => COMPACT_HELP,
            HelpTopic::Policy => {
                return format!("{POLICY_HELP}{POLICY_DATABASE_OPTIONS_HELP}{EXIT_STATUS_HELP}")
            }
        };
        // `consume` and `events` state their own exit statuses (1: denied, not written out).
        let exit_status = if body.contains("Exit status") {
            ""
        } else {
            EXIT_STATUS_HELP
        };
        format!("{body}{DATABASE_OPTIONS_HELP}{exit_status}")
    }
}

pub const MAIN_HELP: &str = "\
tally: an embedded quota-accounting engine for AI subscription plans

Usage: tally <COMMAND> [ARGUMENTS] [OPTIONS]

The main job:
  simulate                       Run simulated gateway traffic through the engine on a database
                                 and print each plan's usage bars, what was admitted from quota,
                                 charged to credits or pay-as-you-go, and denied

Operator commands, on the database at --db (default: ./tally-data):
  user USER KEY                  Create a user, their Default Team @USER and their key in it
  team TEAM                      Create a named team
  member TEAM USER KEY           Add a user to a team, with their key for that team
  revoke KEY                     Revoke a key for good: every later request on it is denied
  seat TEAM USER PLAN|--none     Give the user's key in the team a seat on a plan, or take it
  topup TEAM MICROS              Add credits to a team (1 credit = 1,000,000 micro-credits)
  consume KEY RESOURCE UNIT=N..  Admit or deny one request, and say where it was charged or why
  refund REQUEST_ID              Give back in full what a request admitted with --id took
  adjust KEY RESOURCE UNIT=N..   Correct a key's counted usage: --add what was not counted, or
                                 --remove what should not have been
  usage KEY                      A key's usage bars, reset times and credits
  events                         The event log, one event per line, after a sequence number or
                                 a named export cursor
  verify                         Check the database; exit status 1 if it is not sound
  compact                        Checkpoint, then drop events past the retention
  policy PATH                    Swap the database's policy for the one in PATH (usage carries
                                 over; refused if it drops a plan someone holds a seat on, or
                                 moves a plan's limit to another window)
  help [COMMAND]                 Print this help, or a command's

Options:
  -h, --help     Print help (`tally COMMAND --help` for a command's arguments and options)
  -V, --version  Print the version

Exit status: 0 on success (`consume`: admitted); 1 when `consume` is denied (an unknown key is a
denial), `verify` finds the database unsound, `events` cannot write the events out (the cursor
does not move), `usage` cannot write its report (a closed pipe is no failure: 0) or `simulate`'s
engine refuses the scenario; 2 when the command could not run (a bad command line or policy, an
argument the engine refuses such as an unknown team, or an unknown key given to another command,
a database that cannot be opened): nothing changed. A command that made its change exits as it
did even when its report cannot be written (stderr says so).
";

pub const SIMULATE_HELP: &str = "\
Run a simulated stretch of gateway traffic through the engine, days compressed into seconds.

Usage: tally simulate [OPTIONS]

Keys on every plan of the policy (and some with no seat), named teams sharing credits, a few
pay-as-you-go keys, bursty heavy users that exhaust their windows, a seat upgrade and a
downgrade mid-window, a team member's key that leaks halfway through (revoked, the member
given a new one; whoever holds the old one goes on sending), retried requests with request
ids, requests on keys that never existed, and traffic across local midnight.
Every decision is written to a real database (the embedded event log), as a gateway's would be.
The same seed prints the same report.

Options:
  --keys N             Keys sending traffic, 20 to 1,000,000 [default: 2,000]
  --days D             Simulated days, 1 to 60 [default: 3]
  --seed S             Seed of the deterministic random generator, 0 to 2^64-1 [default: 1]
  --policy PATH        Policy file (.toml or .json) [default: the shipped Token Plan policy]
  --json               Print a machine-readable JSON summary instead of the report
                       (the wall time and the database then go to stderr, so the JSON
                       depends only on the seed)
  --db PATH            The database the run writes [default: ./tally-data-simulate]; a database
                       an earlier run made there is wiped first (it holds a
                       made-by-tally-simulate file); any other database or folder there is
                       refused, never wiped or added to
  --keep               Do not wipe the database first (the run is refused if it already holds
                       the scenario's accounts; use a new --db)
  --durability MODE    When acknowledged decisions are durable [default: interval:100]:
                         sync         each batch of requests (one per 5 simulated minutes) and
                                      each account created waits for its fsync: nothing
                                      acknowledged is ever lost; slowest: the default run
                                      takes about 2.5 times as long as with interval:100
                         interval:MS  decisions return at once; the log's writer thread writes
                                      them behind and fsyncs at most MS ms (1 to 60,000)
                                      after its last fsync ended. A killed run loses what it
                                      had not written yet (up to 32,768 events: under a run's
                                      full load it falls behind), a power loss also what it
                                      wrote since its last fsync
                         none         like interval, with no fsync at all (the kernel
                                      writes back when it will): for benchmarks
                       In every mode the run ends by waiting for the writer to catch up, and
                       that wait, not the mode, is most of its time beyond the decisions.
  -h, --help           Print this help

Exit status: 0 on success, 2 on a bad command line, policy or database, 1 if the engine refuses
the setup.
";

const DATABASE_OPTIONS_HELP: &str = "
Database options:
  --db PATH            The database [default: ./tally-data]
  --policy PATH        The policy a new database starts with (.toml or .json) [default: the
                       shipped Token Plan policy]. An existing database runs with its own: a
                       --policy that differs from it is refused, changing nothing (swap it
                       with `tally policy PATH`).
  --durability MODE    sync, interval:MS or none [default: sync]: the log's mode while the
                       command runs (see `tally simulate --help`); whatever the mode, the
                       command reports only once its change is fsynced
  -h, --help           Print this help
";

/// `tally policy PATH` takes the new policy as PATH and refuses a --policy.
const POLICY_DATABASE_OPTIONS_HELP: &str = "
Database options:
  --db PATH            The database [default: ./tally-data]; it must exist
  --durability MODE    sync, interval:MS or none [default: sync]: the log's mode while the
                       command runs (see `tally simulate --help`); whatever the mode, the
                       command reports only once its change is fsynced
  -h, --help           Print this help
";

const EXIT_STATUS_HELP: &str = "
Exit status: 0 on success; 2 if the command could not run (it then changed nothing).
";

const READ_ONLY_DATABASE_OPTIONS_HELP: &str = "
Database options:
  --db PATH            The database [default: ./tally-data]. It is only read: the replay runs
                       the policies recorded in it, so --policy and --durability do not apply.
  -h, --help           Print this help
";

const USER_HELP: &str = "\
Create a user, their Default Team (@USER) and their plan key in it.

Usage: tally user USER KEY [OPTIONS]

The key exists at once but is usable only with a seat (`tally seat @USER USER PLAN`) or credits
(`tally topup @USER MICROS`). Creates the database if there is none.

Options:
  --at MS              The time of the change, in ms since 1970 UTC [default: now]
                       (at most a day ahead of now, the default max_ahead_of_clock_ms)
";

const TEAM_HELP: &str = "\
Create a named team (names starting with @ are Default Teams, made by `tally user`).

Usage: tally team TEAM [OPTIONS]

Creates the database if there is none.

Options:
  --at MS              The time of the change, in ms since 1970 UTC [default: now]
                       (at most a day ahead of now, the default max_ahead_of_clock_ms)
";

const MEMBER_HELP: &str = "\
Add an existing user to a team, with their plan key for that team (one key per user per team).
A member whose key was revoked (`tally revoke`) is given KEY in its place, with no seat.

Usage: tally member TEAM USER KEY [OPTIONS]

Options:
  --at MS              The time of the change, in ms since 1970 UTC [default: now]
                       (at most a day ahead of now, the default max_ahead_of_clock_ms)
";

const REVOKE_HELP: &str = "\
Revoke a key for good (say one that leaked): every later request on it is denied (\"key
revoked\"), whatever its seat or its team's credits. What it used still counts, its open
reservations still settle within their hold (nothing beyond it is charged) and its requests
still refund. Give the member a new key in its place with `tally member TEAM USER NEWKEY` (it
starts with no seat; `tally seat` then gives the new key a seat). Revoking a revoked key
changes nothing.

Usage: tally revoke KEY [OPTIONS]

Options:
  --at MS              The time of the change, in ms since 1970 UTC [default: now]
                       (at most a day ahead of now, the default max_ahead_of_clock_ms)
";

const SEAT_HELP: &str = "\
Give a user's key in a team a seat on a plan, change it (upgrade or downgrade at once), or take
it away with --none. Usage already counted in a window stays counted.

Usage: tally seat TEAM USER PLAN [OPTIONS]
       tally seat TEAM USER --none [OPTIONS]

Options:
  --none               Take the seat away (the key keeps drawing on the team's credits)
  --at MS              The time of the change, in ms since 1970 UTC [default: now]
                       (at most a day ahead of now, the default max_ahead_of_clock_ms)
";

const TOPUP_HELP: &str = "\
Add credits to a team: a prepaid balance that pays for usage once the plan's quota is used up.

Usage: tally topup TEAM MICROS [OPTIONS]

MICROS is in micro-credits: 1 credit = 1,000,000 (digits may be grouped: 5,000,000).

Options:
  --at MS              The time of the change, in ms since 1970 UTC [default: now]
                       (at most a day ahead of now, the default max_ahead_of_clock_ms)
";

const CONSUME_HELP: &str = "\
Admit or deny one request, as a gateway would: all of it or none. Prints where an admitted
request was charged (plan quota, credits or pay-as-you-go) and the limits it moved; a denied one
says why, when to retry and what would help (credits, a bigger plan).

Usage: tally consume KEY RESOURCE UNIT=N [UNIT=N ...] [OPTIONS]

UNIT is requests, characters, images, videos, songs, seconds or tokens; e.g.
  tally consume tp-ada m2.7 requests=1
  tally consume tp-ada music-2.6 songs=1 seconds=280

Options:
  --id REQUEST_ID      An idempotent request id: the same id again (same key, resource and
                       quantities) gets the first decision back and counts nothing
  --at MS              The time of the request, in ms since 1970 UTC [default: now]
                       (at most a day ahead of now, the default max_ahead_of_clock_ms)
  --json               Print the decision as JSON

Exit status: 0 admitted, 1 denied (an unknown key is denied too, as a gateway's request would be),
2 the request could not be decided (a bad command line, an unknown resource, a quantity the
resource does not take, ...).
";

const REFUND_HELP: &str = "\
Give back in full what a request admitted with an id (`tally consume ... --id REQUEST_ID`)
took: its plan quota where that still counts (not what has aged out of a rolling window or was
counted on a day, week or month since ended), its credits, or its pay-as-you-go spend. Logged
as an event of its own; the original stays as it was. A request is refunded once.

Usage: tally refund REQUEST_ID [OPTIONS]

Options:
  --at MS              The time of the refund, in ms since 1970 UTC [default: now]
                       (at most a day ahead of now, the default max_ahead_of_clock_ms)
  --json               Print what was given back as JSON
";

const ADJUST_HELP: &str = "\
Correct the usage a key's plan counted at a given time, on every limit of the plan that counts
the resource: --add usage that happened but was not counted (counted whatever the limit, where
its window still counts that time), or --remove usage that should not have been counted (given
back only where its window still counts it). Logged as an event of its own; the original events
stay as they were. An addition no window counts any more moves 0 and logs nothing.

Usage: tally adjust KEY RESOURCE UNIT=N [UNIT=N ...] --usage-at MS (--add | --remove) [OPTIONS]

Options:
  --usage-at MS        When the usage happened, in ms since 1970 UTC (required; not after --at)
  --add                Count the quantities
  --remove             Give the quantities back
  --at MS              The time of the correction, in ms since 1970 UTC [default: now]
                       (at most a day ahead of now, the default max_ahead_of_clock_ms)
  --json               Print what moved on each limit as JSON
";

const USAGE_HELP: &str = "\
A key's usage report: each limit of its plan as a usage bar (used / amount), when it resets,
and its team's credits.

Usage: tally usage KEY [OPTIONS]

Options:
  --at MS              Report as of this time, in ms since 1970 UTC [default: now]
                       (at most a day ahead of now, the default max_ahead_of_clock_ms)
  --json               Print the report as JSON
";

const EVENTS_HELP: &str = "\
The event log, oldest first, one event per line: sequence number, time, kind, and the key,
resource, quantities and where it was charged when relevant; a refund, a reservation's close
and a correction say what each usage counter got back or moved, by name, in its own units
(quota_given_back, quota_moved). For billing export.

Usage: tally events [OPTIONS]

Options:
  --after SEQ          Print the events after this sequence number [default: 0, from the start]
  --cursor NAME        Start after the named cursor (0 if new), then move it to the last event
                       printed: run again to get only what is new. It survives restarts.
  --limit N            At most this many events, 1 to 100,000 [default: 1,000]
  --json               One JSON object per line
  --delete-cursor NAME Forget the named cursor (a reader that is done, one stuck behind
                       compaction, or one whose value is damaged), printing no events:
                       a database keeps at most 1,024 cursors
  --cursors            List the saved cursors and the event each is after, printing no
                       events (with --json, as one JSON object)

Exit status: 0 when the events (or, with --cursors, the saved cursors) were written out (or
there were none) or the cursor deleted (or there was none); 1 when they could not be written
(events: a closed pipe too, and the cursor does not move; --cursors: a closed pipe is no
failure);
2 if the command could not run (a bad command line, an --after past the end of the log or
compacted away, a --cursor whose events were compacted away: delete it with --delete-cursor and
it reads from the oldest event kept, a database that cannot be opened): it then printed no
events and moved no cursor.
";

const VERIFY_HELP: &str = "\
Check a database: every record decodes, sequence numbers have no gaps, and the latest snapshot
equals a replay of the log. Prints the records, events, first and last sequence numbers, the
snapshot, whether it matches, and every problem found.

Usage: tally verify [OPTIONS]

Options:
  --json               Print the report as JSON

Exit status: 0 sound, 1 unsound, 2 the database cannot be opened.
";

const COMPACT_HELP: &str = "\
Take a checkpoint (a snapshot of the whole state), then drop events stamped more than the
longest window plus the retention before the compaction's time (the database owner's
`retention_ms`, 7 days by default) and logged at least the retention before it: a request
delivered late, stamped long ago, stays the retention after it was logged for a reader. Their
effect lives on in the snapshot. Events after the snapshot before the latest are kept, so
`verify` can still replay between the two. An engine that runs (a gateway) does the same after
each periodic checkpoint on its own; `simulate` takes none (it checkpoints once, at its end), so
its database keeps every event, and so does this until an event is logged after that
checkpoint: with one snapshot there is none before the latest, and every event stays.

Usage: tally compact [OPTIONS]

Options:
  --at MS              Compact as of this time, in ms since 1970 UTC [default: now]
                       (at most a day ahead of now, the default max_ahead_of_clock_ms);
                       the time the retention is counted to
";

const POLICY_HELP: &str = "\
Swap the database's policy for the one in PATH (.toml or .json), as a logged event: usage
carries over for every limit whose meter and window stay, and seats move to the plan of the
same name. Refused, changing nothing, if the new policy drops a plan someone holds a seat on
(a revoked key's seat aside: it is taken away with the plan), changes the time zone of daily,
weekly or monthly windows that carry over (or week_start, the first day of weekly ones),
counts another unit or another weighted sum under a meter's name (other terms or weights; a
usage bar may change its prices), or moves a plan's limit to another window
(rolling:5h to rolling:6h, daily to weekly: its count so far could not follow; remove the limit
in one swap, its count dropped, and add the new window in the next). A policy equal to the one
the database runs changes nothing. This is the one command that changes a database's policy:
any other command given a --policy that differs is refused.

Usage: tally policy PATH [OPTIONS]

Options:
  --at MS              The swap's time, in ms since 1970 UTC [default: now]
                       (at most a day ahead of now, the default max_ahead_of_clock_ms)
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_has_a_topic_and_back() {
        for (name, topic) in COMMANDS {
            assert_eq!(HelpTopic::of_command(name), Some(topic));
            assert_eq!(topic.command(), Some(name));
        }
        assert_eq!(HelpTopic::Main.command(), None);
        assert_eq!(HelpTopic::of_command("crash-child"), None);
    }

    #[test]
    fn every_command_is_in_the_main_help_and_its_own_help_fits_100_columns() {
        for (name, topic) in COMMANDS {
            assert!(MAIN_HELP.contains(&format!("  {name}")), "{name}");
            let text = topic.text();
            assert!(text.contains(&format!("tally {name}")), "{name}");
            for line in text.lines().chain(MAIN_HELP.lines()) {
                assert!(line.chars().count() <= 100, "{line}");
            }
        }
    }
}
