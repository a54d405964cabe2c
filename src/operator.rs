//! The operator commands: open the database, do one thing, say what happened.
//!
//! An error names the option or argument at fault (`KEY`, `TEAM`, `--id`, `--db`, ...) and
//! changes nothing: the engine validates before it logs, and a database this command created
//! for a change that then failed is removed again.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use serde_json::Value;
use tally_engine::{
    AdjustmentDirection, ChargedTo, Decision, Engine, Error, Policy, SystemClock, UsageRequest,
};

use crate::cli::{
    Action, AdjustArgs, ConsumeArgs, Database, EventsArgs, EventsStart, Operation, UsageError,
};
use crate::describe;
use crate::format::{credits_exact, grouped, utc_iso8601_ms};
use crate::help::HelpTopic;
use crate::store;

/// What a command printed and its exit status.
pub struct Outcome {
    pub text: String,
    pub status: u8,
}

/// `consume` was denied, `verify` found the database unsound, or `events` could not write out
/// what it read (its cursor then stays where it was).
pub const EXIT_NO: u8 = 1;

impl Outcome {
    fn success(text: String) -> Outcome {
        Outcome { text, status: 0 }
    }
}

pub fn run(operation: &Operation) -> Result<Outcome, UsageError> {
    let fail =
        |(culprit, problem): (String, String)| UsageError::new(culprit, problem, operation.topic);
    let database = &operation.database;
    if let Action::Verify { json } = operation.action {
        return verify(database, json).map_err(fail);
    }
    let policy = load_policy(database).map_err(fail)?;
    if policy.is_some() && matches!(operation.action, Action::Policy { .. }) {
        return Err(fail((
            "--policy".into(),
            "`tally policy` takes the new policy as its PATH; drop --policy".into(),
        )));
    }
    let created = store::check_openable(&database.path, operation.action.creates_database())
        .map_err(|problem| fail(("--db".into(), problem)))?;
    // What a failure is to remove: only what the command made (not an empty directory the
    // operator made for the database, nor anything above it).
    let before = store::Before::look(&database.path);
    // An existing database runs with the policy it last ran with (a gateway's, say), and the
    // options it recorded; the command records none of its own. Only `tally policy` swaps.
    let given = policy.as_ref().map(|policy| policy.document().clone());
    let opened = store::open_as_recorded(
        &database.path,
        policy,
        Arc::new(SystemClock),
        database.durability,
    );
    let engine = match opened {
        Ok(engine) => engine,
        Err(error) => {
            if created {
                store::remove_made_database(&database.path, &before, &error);
            }
            return Err(fail(opening_culprit(&error)));
        }
    };
    if let (false, Some(given)) = (created, given) {
        // A --policy that differs is refused before the command does anything: swapping it in
        // first would change the database even when the command is then refused.
        let runs = engine.policy();
        if *runs.document() != given {
            return Err(fail((
                "--policy".into(),
                format!(
                    "the database runs another policy (generation {}); swap this one in with \
                     `tally policy PATH` first, or drop --policy",
                    runs.generation()
                ),
            )));
        }
    }
    let result = act_durably(&engine, &operation.action);
    drop(engine);
    if let (Err(error), true) = (&result, created) {
        // The change failed: leave no database behind that the command made for it.
        store::remove_made_database(&database.path, &before, error);
    }
    result.map_err(|error| {
        let (mut argument, problem) = culprit(&error);
        // `refund` takes the request id as its argument, not as `--id`; `policy` its policy.
        if operation.topic == HelpTopic::Refund && argument == "--id" {
            argument = "REQUEST_ID".into();
        }
        if operation.topic == HelpTopic::Policy && argument == "--policy" {
            argument = "PATH".into();
        }
        // `events --delete-cursor NAME` names its cursor with that option, not `--cursor`.
        if matches!(operation.action, Action::DeleteCursor { .. }) && argument == "--cursor" {
            argument = "--delete-cursor".into();
        }
        fail((argument, problem))
    })
}

/// The policy given with --policy; `None` without one (the database's stored policy).
fn load_policy(database: &Database) -> Result<Option<Policy>, (String, String)> {
    database
        .policy
        .as_ref()
        .map(|path| Policy::load(path).map_err(|error| ("--policy".into(), error.to_string())))
        .transpose()
}

/// `act`, then everything it logged made durable before its report is given, whatever the
/// durability mode: with `--durability interval` or `none` a change may still be queued when
/// `act` returns, and the engine's drop (which closes the log) cannot report a write or
/// fdatasync that fails then, so the command would say it did what the database never got.
fn act_durably(engine: &Engine, action: &Action) -> Result<Outcome, Error> {
    let outcome = act(engine, action)?;
    engine.sync()?;
    Ok(outcome)
}

fn act(engine: &Engine, action: &Action) -> Result<Outcome, Error> {
    let text = match action {
        Action::User { user, key, at_ms } => {
            engine.create_user(user, key, *at_ms)?;
            format!("created user {user}, their Default Team @{user} and key {key}\n")
        }
        Action::Team { team, at_ms } => {
            engine.create_team(team, *at_ms)?;
            format!("created team {team}\n")
        }
        Action::Member {
            team,
            user,
            key,
            at_ms,
        } => {
            engine.add_member(team, user, key, *at_ms)?;
            format!("added {user} to team {team} with key {key}\n")
        }
        Action::Revoke { key, at_ms } => {
            if engine.revoke_key(key, *at_ms)? {
                format!("revoked key {key}\n")
            } else {
                format!("key {key} was revoked already: nothing changed\n")
            }
        }
        Action::Seat {
            team,
            user,
            plan,
            at_ms,
        } => seat(engine, team, user, plan.as_deref(), *at_ms)?,
        Action::TopUp {
            team,
            micros,
            at_ms,
        } => {
            let balance = engine.top_up(team, *micros, *at_ms)?;
            format!(
                "team {team}: +{} micro-credits ({} credits); balance {} micro-credits ({} credits)\n",
                grouped(*micros),
                credits_exact(*micros),
                grouped(balance),
                credits_exact(balance)
            )
        }
        Action::Consume(args) => return consume(engine, args),
        Action::Refund {
            request_id,
            at_ms,
            json,
        } => refund(engine, request_id, *at_ms, *json)?,
        Action::Adjust(args) => adjust(engine, args)?,
        Action::Usage { key, at_ms, json } => {
            let report = engine.usage(key, *at_ms)?;
            if *json {
                json_text(&describe::usage_json(&report))
            } else {
                describe::usage_text(&report)
            }
        }
        Action::Events(args) => return events(engine, args),
        Action::DeleteCursor { name } => {
            // A cursor whose value is damaged (`verify` reports it) is deleted all the same:
            // this is how the operator frees it.
            let at = match engine.cursor(name) {
                Ok(at) => format!("it was after event {at}"),
                Err(Error::Storage { problem }) => format!("its value was damaged: {problem}"),
                Err(error) => return Err(error),
            };
            if engine.delete_cursor(name)? {
                format!("deleted cursor {name:?} ({at})\n")
            } else {
                format!("no cursor {name:?}; nothing changed\n")
            }
        }
        Action::ListCursors { json } => {
            let cursors = engine.cursors()?;
            if *json {
                json_text(&describe::cursors_json(&cursors))
            } else {
                describe::cursors_text(&cursors)
            }
        }
        Action::Compact { at_ms } => describe::compact_text(&engine.compact(*at_ms)?),
        Action::Policy { path, at_ms } => {
            let policy = Policy::load(path).map_err(Error::Policy)?;
            let runs = engine.policy();
            if runs.document() == policy.document() {
                format!(
                    "the database already runs this policy (generation {}); nothing changed\n",
                    runs.generation()
                )
            } else {
                engine.swap_policy(policy, *at_ms)?;
                format!(
                    "swapped in {} as policy generation {} (usage carried over)\n",
                    path.display(),
                    engine.policy().generation()
                )
            }
        }
        Action::Verify { .. } => unreachable!("verify reads the database without an engine"),
    };
    Ok(Outcome::success(text))
}

fn seat(
    engine: &Engine,
    team: &str,
    user: &str,
    plan: Option<&str>,
    at_ms: Option<u64>,
) -> Result<String, Error> {
    match plan {
        Some(plan) => {
            engine.assign_seat(team, user, plan, at_ms)?;
            Ok(format!("{user} in team {team}: seat on {plan}\n"))
        }
        None => {
            engine.unassign_seat(team, user, at_ms)?;
            Ok(format!("{user} in team {team}: no seat\n"))
        }
    }
}

fn consume(engine: &Engine, args: &ConsumeArgs) -> Result<Outcome, Error> {
    let mut request = UsageRequest::new(&args.key, &args.resource, &args.quantities);
    if let Some(at_ms) = args.at_ms {
        request = request.at(at_ms);
    }
    if let Some(id) = &args.request_id {
        request = request.id(id);
    }
    let now_ms = args.at_ms.unwrap_or_else(|| engine.now_ms());
    let decision = engine.consume(&request)?;
    let policy = engine.policy();
    let text = if args.json {
        json_text(&describe::decision_json(&policy, &decision))
    } else {
        describe::decision_text(&policy, &decision, now_ms)
    };
    let status = match decision {
        Decision::Admitted(_) => 0,
        Decision::Denied(_) => EXIT_NO,
    };
    Ok(Outcome { text, status })
}

fn refund(
    engine: &Engine,
    request_id: &str,
    at_ms: Option<u64>,
    json: bool,
) -> Result<String, Error> {
    let refund = engine.refund(request_id, at_ms)?;
    let given = &refund.given_back;
    // Per counter, in its own units: a request's counters (a 5-hour and a weekly window, a
    // bar counting at prices) measure different things, so they are not added up.
    let policy_of = |generation| engine.policy_of_generation(generation);
    let quota = describe::per_counter(&policy_of, given.generation, &given.counters);
    if json {
        let charged_to = match refund.charged_to {
            ChargedTo::PlanQuota { .. } => "plan_quota",
            ChargedTo::Credits { .. } => "credits",
            ChargedTo::PayAsYouGo { .. } => "pay_as_you_go",
        };
        return Ok(json_text(&json!({
            "request_id": request_id,
            "charged_to": charged_to,
            "quota_given_back": quota,
            "credits_micros_given_back": given.credits_micros,
            "pay_as_you_go_micros_given_back": given.payg_micros,
        })));
    }
    let counters: Vec<String> = quota
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, amount)| amount.as_u64() != Some(0))
        .map(|(counter, amount)| match amount.as_u64() {
            Some(amount) => format!("{} on {counter}", grouped(amount)),
            None => format!("{} on {counter}", amount.as_str().unwrap_or_default()),
        })
        .collect();
    let what = match refund.charged_to {
        ChargedTo::PlanQuota { .. } if counters.is_empty() => {
            "nothing: its usage no longer counts in any window".to_string()
        }
        ChargedTo::PlanQuota { .. } => format!("plan quota: {}", counters.join(", ")),
        ChargedTo::Credits { .. } => format!(
            "{} micro-credits ({} credits)",
            grouped(given.credits_micros),
            credits_exact(given.credits_micros)
        ),
        ChargedTo::PayAsYouGo { .. } => {
            format!("{} pay-as-you-go micro-credits", grouped(given.payg_micros))
        }
    };
    Ok(format!("refunded {request_id}: gave back {what}\n"))
}

fn adjust(engine: &Engine, args: &AdjustArgs) -> Result<String, Error> {
    let outcome = engine.adjust_usage(
        &args.key,
        &args.resource,
        &args.quantities,
        args.usage_at_ms,
        args.direction,
        args.at_ms,
    )?;
    if args.json {
        let limits: Vec<Value> = outcome
            .limits
            .iter()
            .map(|limit| json!({"limit": limit.name, "index": limit.index, "moved": limit.moved}))
            .collect();
        let direction = match args.direction {
            AdjustmentDirection::Add => "add",
            AdjustmentDirection::Remove => "remove",
        };
        return Ok(json_text(&json!({
            "key": args.key,
            "direction": direction,
            "usage_at_ms": args.usage_at_ms,
            "limits": limits,
        })));
    }
    let verb = match args.direction {
        AdjustmentDirection::Add => "added",
        AdjustmentDirection::Remove => "removed",
    };
    let mut text = format!(
        "{}: usage at {} corrected\n",
        args.key,
        utc_iso8601_ms(args.usage_at_ms)
    );
    for limit in &outcome.limits {
        text.push_str(&format!(
            "  {}: {verb} {}\n",
            limit.name,
            grouped(limit.moved)
        ));
    }
    Ok(text)
}

/// Prints the events itself, before moving a cursor past them: a cursor only ever moves past
/// events that were written out (a closed pipe leaves it where it was).
fn events(engine: &Engine, args: &EventsArgs) -> Result<Outcome, Error> {
    // A cursor at 0 (perhaps a new name), to save once the read has succeeded.
    let (after, at_start) = match &args.start {
        EventsStart::After(seq) => (*seq, None),
        EventsStart::Cursor(name) => {
            let at = engine.cursor(name)?;
            (at, (at == 0).then_some(name))
        }
    };
    let limit = usize::try_from(args.limit).unwrap_or(usize::MAX);
    let events = engine
        .events_after(after, limit)
        .map_err(|error| match (&args.start, error) {
            // Events compacted away before a saved cursor's reader read them: the cursor is
            // what points there, not a `--after` the command line was not given.
            (
                EventsStart::Cursor(name),
                Error::InvalidArgument {
                    field: "after",
                    problem,
                },
            ) => {
                // Past events compacted away, `--after` reads without moving the cursor: it
                // would stay stuck there, every run refused.
                let way_on = if problem.contains("compacted away") {
                    format!(
                        "; to go on without them, delete the cursor (`tally events \
                         --delete-cursor {name:?}`): read again, it starts from the oldest \
                         event kept"
                    )
                } else {
                    String::new()
                };
                Error::InvalidArgument {
                    field: "cursor",
                    problem: format!("{name:?} is at event {after}: {problem}{way_on}"),
                }
            }
            (_, error) => error,
        })?;
    if let Some(name) = at_start {
        // Saved where it is before any event is printed, so a new name past the cursors'
        // bound is refused with nothing printed, not after the events went out (a script that
        // read them would read them again); and after the read, so a refused read saves none.
        engine.save_cursor(name, 0)?;
    }
    let Some(last) = events.last() else {
        // Nothing new: say so where a script reading stdout will not trip on it.
        crate::print_err(&format!("tally: no events after {after}"));
        return Ok(Outcome::success(String::new()));
    };
    let policy_of = |generation| engine.policy_of_generation(generation);
    let mut text = String::new();
    for event in &events {
        let team = engine.team_of_event(&event.body);
        let line = if args.json {
            describe::event_json(&policy_of, event, team.as_deref()).to_string()
        } else {
            describe::event_line(&policy_of, event, team.as_deref())
        };
        text.push_str(&line);
        text.push('\n');
    }
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        crate::print_err(&format!(
            "tally: cannot write the events ({error}); no cursor was moved"
        ));
        return Ok(Outcome {
            text: String::new(),
            status: EXIT_NO,
        });
    }
    if let EventsStart::Cursor(name) = &args.start {
        engine.save_cursor(name, last.seq)?;
    }
    Ok(Outcome::success(String::new()))
}

fn verify(database: &Database, json: bool) -> Result<Outcome, (String, String)> {
    store::check_openable(&database.path, false).map_err(|problem| ("--db".into(), problem))?;
    let options = tally_engine::OpenOptions {
        use_recorded: true,
        ..tally_engine::OpenOptions::default()
    };
    let report =
        Engine::verify(&database.path, options).map_err(|error| opening_culprit(&error))?;
    let text = if json {
        json_text(&describe::verify_json(&report))
    } else {
        describe::verify_text(&display(&database.path), &report)
    };
    let status = if report.is_sound() { 0 } else { EXIT_NO };
    Ok(Outcome { text, status })
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

fn json_text(value: &Value) -> String {
    let text = serde_json::to_string_pretty(value)
        .unwrap_or_else(|error| unreachable!("a JSON value always serialises: {error}"));
    format!("{text}\n")
}

/// Why a database would not open: the policy given (a swap the engine refuses, a policy it
/// cannot read back), or the database itself.
fn opening_culprit(error: &Error) -> (String, String) {
    match error {
        Error::InvalidArgument {
            field: "policy",
            problem,
        } => ("--policy".into(), problem.clone()),
        Error::Policy(error) => ("--policy".into(), error.to_string()),
        Error::InvalidArgument {
            field: "durability",
            problem,
        } => ("--durability".into(), problem.clone()),
        Error::Storage { problem } => ("--db".into(), problem.clone()),
        other => ("--db".into(), other.to_string()),
    }
}

/// The argument an engine error is about, in the command line's words, and what went wrong
/// (without the engine's own field prefix).
pub fn culprit(error: &Error) -> (String, String) {
    let (culprit, problem) = match error {
        Error::InvalidArgument { field, problem } => (argument_of(field), problem.clone()),
        Error::UnknownResource { resource } => {
            ("RESOURCE", format!("unknown resource {resource:?}"))
        }
        Error::UnknownPlan { plan } => ("PLAN", format!("unknown plan {plan:?}")),
        Error::UnknownTeam { team } => ("TEAM", format!("unknown team {team:?}")),
        Error::UnknownUser { user } => ("USER", format!("unknown user {user:?}")),
        Error::UnknownKey { key } => ("KEY", format!("unknown key {key:?}")),
        Error::NotAMember { team, user } => {
            ("USER", format!("{user:?} is not a member of team {team:?}"))
        }
        Error::AlreadyExists { what, id } => {
            (argument_of(what), format!("{what} {id:?} already exists"))
        }
        Error::UnknownRequest { request_id, .. } => (
            "--id",
            format!("no admitted request used the id {request_id:?} within the horizon"),
        ),
        Error::RequestIdConflict { request_id } => (
            "--id",
            format!("{request_id:?} was already used for a different key, resource or quantities"),
        ),
        Error::CapacityExceeded { what, .. } if what.starts_with("request_id") => {
            ("--id", error.to_string())
        }
        Error::CapacityExceeded {
            what: "cursors", ..
        } => ("--cursor", error.to_string()),
        Error::Overflow { field: "micros" } => ("MICROS", "the balance would overflow".into()),
        Error::Overflow { .. } => ("UNIT=N", error.to_string()),
        Error::Policy(error) => ("--policy", error.to_string()),
        Error::Storage { problem } => ("--db", problem.clone()),
        other => ("--db", other.to_string()),
    };
    (culprit.to_string(), problem)
}

/// An engine field name as the command line spells it.
fn argument_of(field: &str) -> &'static str {
    match field {
        "user" => "USER",
        "team" => "TEAM",
        "key" => "KEY",
        "member" => "USER",
        "plan" => "PLAN",
        "resource" => "RESOURCE",
        "quantities" => "UNIT=N",
        "micros" => "MICROS",
        "at_ms" => "--at",
        "request_id" => "--id",
        "usage_at_ms" => "--usage-at",
        "cursor" => "--cursor",
        "seq" => "--after",
        "after" => "--after",
        "policy" => "--policy",
        "durability" => "--durability",
        _ => "--db",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_name_the_argument_they_are_about() {
        let cases = [
            (Error::UnknownKey { key: "k".into() }, "KEY"),
            (Error::UnknownTeam { team: "t".into() }, "TEAM"),
            (Error::UnknownUser { user: "u".into() }, "USER"),
            (Error::UnknownPlan { plan: "p".into() }, "PLAN"),
            (
                Error::UnknownResource {
                    resource: "r".into(),
                },
                "RESOURCE",
            ),
            (
                Error::AlreadyExists {
                    what: "key",
                    id: "k".into(),
                },
                "KEY",
            ),
            (
                Error::RequestIdConflict {
                    request_id: "r".into(),
                },
                "--id",
            ),
            (
                Error::Storage {
                    problem: "disk".into(),
                },
                "--db",
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(culprit(&error).0, expected, "{error}");
        }
    }

    /// A change made with a durability that acknowledges before the disk has it is reported
    /// only once it is durable: a failed fdatasync then is the command's error, not a success.
    #[test]
    fn a_change_whose_log_cannot_be_made_durable_is_an_error() {
        let dir = std::env::temp_dir().join(format!("tally-operator-sync-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let faults = tally_engine::Faults::new();
        let options = tally_engine::OpenOptions {
            durability: tally_engine::Durability::None,
            faults: Some(Arc::clone(&faults)),
            ..tally_engine::OpenOptions::default()
        };
        let engine = Engine::open(&dir, Policy::token_plan(), Arc::new(SystemClock), options)
            .expect("a new database");
        let top_up = |micros| Action::TopUp {
            team: "@ada".into(),
            micros,
            at_ms: None,
        };
        let user = Action::User {
            user: "ada".into(),
            key: "tp-ada".into(),
            at_ms: None,
        };
        assert!(act_durably(&engine, &user).is_ok());
        assert!(act_durably(&engine, &top_up(5)).is_ok());
        faults.fail_next_flushes(1);
        let failed = act_durably(&engine, &top_up(7));
        assert!(
            matches!(failed, Err(Error::Storage { .. })),
            "{:?}",
            failed.err()
        );
        drop(engine);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `tally refund` of one m2.7 request on the shared-bar plan (2,000 micro-credits of bar
    /// in its 5-hour window and in its weekly one) said "gave back 4,000 units of plan quota"
    /// and `units_given_back: 4000`: the two counters added up, twice what went back (and for
    /// a request paid by credits, the JSON's units were its micro-credits).
    #[test]
    fn a_refund_says_what_each_counter_got_back_not_their_sum() {
        let engine = Engine::new(
            Policy::token_plan(),
            Arc::new(tally_engine::ManualClock::new(1_772_456_400_000)),
            tally_engine::EngineOptions::default(),
        )
        .expect("an engine");
        engine.create_user("ada", "tp-ada", None).expect("created");
        engine
            .assign_seat("@ada", "ada", "Bar-Plus", None)
            .expect("seated");
        let pairs = [(tally_engine::Unit::Requests, 1)];
        for id in ["q1", "q2"] {
            let request = tally_engine::UsageRequest::new("tp-ada", "m2.7", &pairs).id(id);
            assert!(engine.consume(&request).expect("decided").is_admitted());
        }
        let price = engine
            .usage("tp-ada", None)
            .expect("usage")
            .limits
            .first()
            .map(|limit| limit.used / 2)
            .expect("a limit");
        let text = refund(&engine, "q1", None, false).expect("refunded");
        assert!(
            text.contains(&format!("{} on usage-bar per rolling:5h", grouped(price))),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} on usage-bar per weekly", grouped(price))),
            "{text}"
        );
        assert!(!text.contains(&grouped(2 * price)), "{text}");
        let json: Value =
            serde_json::from_str(&refund(&engine, "q2", None, true).expect("refunded"))
                .expect("JSON");
        assert_eq!(
            json["quota_given_back"],
            json!({"usage-bar per rolling:5h": price, "usage-bar per weekly": price}),
            "{json}"
        );
        assert!(json.get("units_given_back").is_none(), "{json}");
    }

    #[test]
    fn the_engine_field_prefix_is_not_repeated() {
        let error = Error::UnknownKey { key: "tp-x".into() };
        assert_eq!(
            culprit(&error),
            ("KEY".to_string(), "unknown key \"tp-x\"".to_string())
        );
    }
}
