//! The `tally` binary, run as a user would: exit statuses, error messages, and properties of
//! the simulation's report that must hold whatever the numbers turn out to be.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use serde_json::Value;

const SMALL_RUN: &[&str] = &["simulate", "--keys", "60", "--days", "1", "--seed", "7"];

/// A fresh directory under the system's temporary directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let number = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("tally-cli-{}-run-{number}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("the scratch directory is created");
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tally_in(directory: &Scratch, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .current_dir(&directory.0)
        .output()
        .expect("the tally binary runs")
}

/// Runs the binary in a fresh working directory of its own, so `simulate` writes its default
/// database (`./tally-data-simulate`) there and runs in parallel do not meet.
fn tally(args: &[&str]) -> Output {
    tally_in(&Scratch::new(), args)
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("stderr is UTF-8")
}

fn json_run(args: &[&str]) -> (String, Value) {
    let mut args = args.to_vec();
    args.push("--json");
    let output = tally(&args);
    assert!(output.status.success(), "{args:?}: {}", stderr_of(&output));
    let text = stdout_of(&output);
    let value = serde_json::from_str(&text).expect("the summary is JSON");
    (text, value)
}

/// The small run most tests read, made once.
fn small_run() -> &'static Value {
    static RUN: OnceLock<Value> = OnceLock::new();
    RUN.get_or_init(|| json_run(SMALL_RUN).1)
}

fn number(value: &Value, path: &str) -> u64 {
    let mut current = value;
    for part in path.split('.') {
        current = &current[part];
    }
    current
        .as_u64()
        .unwrap_or_else(|| panic!("{path} is not a number: {current}"))
}

fn array<'a>(value: &'a Value, field: &str) -> &'a Vec<Value> {
    value[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} is not an array"))
}

#[test]
fn every_request_sent_is_admitted_or_denied_and_none_errs() {
    let run = small_run();
    let requests = &run["requests"];
    let sent = number(requests, "sent");
    assert!(sent > 1_000, "a day of 60 keys sends more than {sent}");
    let admitted = number(requests, "plan_quota")
        + number(requests, "credits")
        + number(requests, "pay_as_you_go");
    assert_eq!(admitted, number(requests, "admitted"));
    assert_eq!(admitted + number(requests, "denied"), sent);
    assert_eq!(
        number(requests, "errors"),
        0,
        "engine errors: {}",
        run["errors"]
    );
    let by_reason: u64 = requests["denied_by_reason"]
        .as_object()
        .expect("denials by reason")
        .values()
        .map(|count| count.as_u64().expect("a count"))
        .sum();
    assert_eq!(by_reason, number(requests, "denied"));
}

#[test]
fn the_plan_rows_add_up_to_the_totals() {
    let run = small_run();
    for field in [
        "sent",
        "plan_quota",
        "credits",
        "credits_micros",
        "pay_as_you_go",
        "denied",
    ] {
        let rows: u64 = array(run, "plans")
            .iter()
            .map(|row| number(&row["requests"], field))
            .sum();
        assert_eq!(rows, number(&run["requests"], field), "{field}");
    }
    let keys: u64 = array(run, "plans")
        .iter()
        .map(|row| number(row, "keys"))
        .sum();
    assert_eq!(keys, number(&run["parameters"], "keys"));
}

#[test]
fn credits_charged_equal_the_decrease_of_the_teams_balances() {
    let run = small_run();
    let teams = array(run, "teams");
    let topped_up: u64 = teams
        .iter()
        .map(|team| number(team, "topped_up_micros"))
        .sum();
    let left: u64 = teams.iter().map(|team| number(team, "end_micros")).sum();
    let charged = number(&run["requests"], "credits_micros");
    assert!(charged > 0, "some requests were charged to credits");
    assert_eq!(topped_up - left, charged);
    for team in teams {
        assert_eq!(
            number(team, "topped_up_micros") - number(team, "end_micros"),
            number(team, "charged_micros"),
            "{team}"
        );
    }
}

#[test]
fn heavy_users_exhaust_quotas_and_every_kind_of_outcome_occurs() {
    let run = small_run();
    let requests = &run["requests"];
    for field in ["plan_quota", "credits", "pay_as_you_go"] {
        assert!(number(requests, field) > 0, "{field}");
    }
    for reason in [
        "quota_exhausted",
        "unknown_key",
        "no_resources",
        "resource_not_covered",
        "over_request_maximum",
        "insufficient_credits",
    ] {
        let count = number(&requests["denied_by_reason"], reason);
        assert!(count > 0, "no {reason} denials in {requests}");
    }
    assert!(
        number(run, "daily_resets_seen") > 0,
        "a daily quota reset after midnight"
    );
}

#[test]
fn retried_requests_get_their_first_decision_back() {
    let run = small_run();
    let replays = number(run, "replays");
    assert!(replays > 0);
    assert!(number(run, "request_ids") >= replays);
    assert_eq!(number(run, "replays_matching_first_decision"), replays);
}

#[test]
fn seat_changes_move_the_limit_and_keep_the_usage() {
    let run = small_run();
    let changes = array(run, "seat_changes");
    let find = |kind: &str| {
        changes
            .iter()
            .find(|change| change["kind"] == kind)
            .unwrap_or_else(|| panic!("a {kind} in {changes:?}"))
    };
    let upgrade = find("upgrade");
    assert_eq!(
        number(upgrade, "before.used"),
        number(upgrade, "after.used")
    );
    assert!(number(upgrade, "after.amount") > number(upgrade, "before.amount"));
    assert!(number(upgrade, "before.used") >= number(upgrade, "before.amount"));
    assert!(number(upgrade, "next_5h.plan_quota") > 0);
    let downgrade = find("downgrade");
    assert_eq!(
        number(downgrade, "before.used"),
        number(downgrade, "after.used")
    );
    assert!(number(downgrade, "after.used") > number(downgrade, "after.amount"));
    assert!(number(downgrade, "next_5h.denied_by_reason.quota_exhausted") > 0);
}

/// Halfway through, a team member's key leaks: revoked, every request on it is denied "key
/// revoked" and nothing else is; the member goes on with a new key on the same seat, which is
/// never refused as revoked; and those denials are all the run's key-revoked ones.
#[test]
fn a_leaked_key_is_revoked_and_its_member_goes_on_with_a_new_one() {
    let run = small_run();
    let rotation = &run["key_rotation"];
    let leaked = number(rotation, "leaked.sent");
    assert!(leaked > 0, "{rotation}");
    assert_eq!(
        number(rotation, "leaked.denied_by_reason.key_revoked"),
        leaked
    );
    assert_eq!(number(rotation, "leaked.admitted"), 0);
    assert_eq!(
        number(rotation, "member_next_5h.denied_by_reason.key_revoked"),
        0
    );
    assert!(
        number(rotation, "member_next_5h.admitted") > 0,
        "{rotation}"
    );
    assert_eq!(
        number(&run["requests"], "denied_by_reason.key_revoked"),
        leaked
    );
    let new_key = rotation["new_key"].as_str().expect("a new key");
    let old_key = rotation["old_key"].as_str().expect("the old key");
    assert_ne!(new_key, old_key);
}

#[test]
fn the_same_seed_prints_the_same_json_and_another_seed_does_not() {
    let (first, _) = json_run(SMALL_RUN);
    let (second, _) = json_run(SMALL_RUN);
    assert_eq!(first, second);
    let other_seed = ["simulate", "--keys", "60", "--days", "1", "--seed", "8"];
    let (third, _) = json_run(&other_seed);
    assert_ne!(first, third);
}

#[test]
fn the_engine_frees_idle_keys_windows_on_its_own_during_a_run() {
    let memory = &small_run()["memory"];
    let number = |field: &str| {
        memory[field]
            .as_u64()
            .unwrap_or_else(|| panic!("memory.{field} in {memory}"))
    };
    // A day of traffic: the engine's rounds (every 10 minutes of its clock) ran and freed the
    // windows of keys that had gone quiet; the busy ones still hold theirs.
    assert!(number("reclaim_rounds") >= 1, "{memory}");
    assert!(number("idle_keys_reclaimed") >= 1, "{memory}");
    assert!(number("keys_with_usage") > 0, "{memory}");
}

#[test]
fn the_report_shows_every_plan_s_usage_bars_counts_and_timing() {
    let output = tally(SMALL_RUN);
    assert!(output.status.success(), "{}", stderr_of(&output));
    let report = stdout_of(&output);
    for section in [
        "Requests",
        "quota exhausted",
        "Usage bars",
        "Team credits",
        "decisions/s",
    ] {
        assert!(report.contains(section), "no {section:?} in:\n{report}");
    }
    for row in array(small_run(), "plans") {
        if row["busiest_key_at_end"].is_null() {
            continue;
        }
        let key = row["busiest_key_at_end"]["key"].as_str().expect("a key");
        let heading = format!("  {} ({key}", row["plan"].as_str().expect("a plan"));
        assert!(report.contains(&heading), "no {heading:?} in:\n{report}");
    }
    assert!(
        report.contains("%  resets in"),
        "usage bars with reset times"
    );
    assert!(
        report.lines().all(|line| line.chars().count() <= 120),
        "{report}"
    );
}

#[test]
fn a_bad_command_line_exits_with_status_2_naming_the_culprit() {
    let cases: [(&[&str], &str); 6] = [
        (&["simulate", "--kees", "10"], "--kees"),
        (&["simulate", "--keys", "many"], "--keys"),
        (&["simulate", "--days", "0"], "--days"),
        (&["simulate", "--seed"], "--seed"),
        (&["simulat"], "simulat"),
        (&[], "<COMMAND>"),
    ];
    for (args, culprit) in cases {
        let output = tally(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            stderr_of(&output).contains(culprit),
            "{args:?}: {}",
            stderr_of(&output)
        );
        assert!(output.stdout.is_empty(), "{args:?} printed a report");
    }
}

/// An argument that is not UTF-8 (a stray byte in a key or a path) is a bad command line
/// naming it, exit status 2, not a panic: and nothing is made on disk.
#[test]
fn an_argument_that_is_not_utf8_is_refused_naming_it() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt as _;

    let scratch = Scratch::new();
    let odd = OsStr::from_bytes(b"tp-\xffada");
    for args in [
        vec![OsStr::new("usage"), odd],
        vec![OsStr::new("user"), OsStr::new("ada"), odd],
        vec![OsStr::new("verify"), OsStr::new("--db"), odd],
        vec![odd],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(&args)
            .current_dir(&scratch.0)
            .output()
            .expect("the tally binary runs");
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("tp-\u{fffd}ada"), "{args:?}: {stderr}");
        assert!(stderr.contains("UTF-8"), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
    let left: Vec<_> = std::fs::read_dir(&scratch.0)
        .expect("the scratch directory")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A stderr that cannot be written (here `/dev/full`) is no panic: a bad command line still
/// exits 2, and `simulate --json` still writes its report to stdout and exits 0 (it panicked
/// with 101 after the whole run and wrote nothing).
#[test]
fn a_stderr_that_cannot_be_written_changes_no_exit_status_and_loses_no_output() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        return; // no /dev/full here
    };
    let scratch = Scratch::new();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .current_dir(&scratch.0)
            .stderr(full.try_clone().expect("a second handle"))
            .output()
            .expect("the tally binary runs")
    };
    let output = run(&["usage", "tp-nobody"]);
    assert_eq!(output.status.code(), Some(2));
    let output = run(&["simulat"]);
    assert_eq!(output.status.code(), Some(2));
    let mut args = SMALL_RUN.to_vec();
    args.push("--json");
    let output = run(&args);
    assert_eq!(output.status.code(), Some(0));
    let report: Value = serde_json::from_str(&stdout_of(&output)).expect("the JSON report");
    assert!(number(&report, "requests.sent") > 0, "{report}");
}

#[test]
fn help_lists_the_options_and_exits_0() {
    let output = tally(&["simulate", "--help"]);
    assert_eq!(output.status.code(), Some(0));
    let help = stdout_of(&output);
    for option in ["--keys", "--days", "--seed", "--policy", "--json"] {
        assert!(help.contains(option), "{option} missing from:\n{help}");
    }
    assert!(stdout_of(&tally(&["--help"])).contains("simulate"));
}

/// A file in the temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("tally-cli-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("the temporary file is written");
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("a UTF-8 path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const TWO_PLAN_POLICY: &str = r#"
time_zone = "UTC"

[resources.chat]
units = ["requests"]
price_micros = { requests = 1000 }

[plans.Small]
limits = [{ resource = "chat", unit = "requests", amount = 40, window = "rolling:1h" }]

[plans.Large]
limits = [{ resource = "chat", unit = "requests", amount = 400, window = "rolling:1h" }]
"#;

#[test]
fn a_policy_file_replaces_the_shipped_plans() {
    let policy = TempFile::new("two-plans.toml", TWO_PLAN_POLICY);
    let (_, run) = json_run(&[
        "simulate",
        "--keys",
        "30",
        "--days",
        "1",
        "--policy",
        policy.path(),
    ]);
    let plans: Vec<&str> = array(&run, "plans")
        .iter()
        .map(|row| row["plan"].as_str().expect("a plan name"))
        .collect();
    assert_eq!(&plans[..2], ["Large", "Small"]);
    assert_eq!(number(&run["requests"], "errors"), 0, "{}", run["errors"]);
    assert!(number(&run["requests"], "denied_by_reason.quota_exhausted") > 0);
    assert_eq!(run["parameters"]["time_zone"], "UTC");
}

#[test]
fn a_policy_that_does_not_load_is_a_bad_policy_option() {
    let broken = TempFile::new("broken.toml", "time_zone = \"Mars/Olympus\"\n");
    let missing = std::env::temp_dir().join("tally-cli-no-such-policy.toml");
    for path in [broken.path(), missing.to_str().expect("a UTF-8 path")] {
        let output = tally(&["simulate", "--policy", path]);
        assert_eq!(output.status.code(), Some(2), "{path}");
        assert!(
            stderr_of(&output).contains("--policy"),
            "{}",
            stderr_of(&output)
        );
        assert!(output.stdout.is_empty());
    }
}

/// `N` from the line `Database: PATH holds N events (...)`.
fn events_held(text: &str) -> u64 {
    let line = text
        .lines()
        .find(|line| line.contains("Database: tally-data-simulate holds "))
        .unwrap_or_else(|| panic!("no database line in:\n{text}"));
    let count = line
        .split(" holds ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .expect("a count");
    count.replace(',', "").parse().expect("a number")
}

#[test]
fn simulate_logs_every_admitted_request_once_in_the_default_database() {
    let directory = Scratch::new();
    let mut args = SMALL_RUN.to_vec();
    args.push("--json");
    let output = tally_in(&directory, &args);
    assert!(output.status.success(), "{}", stderr_of(&output));
    let run: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let events = events_held(&stderr_of(&output));
    let admitted = number(&run["requests"], "admitted");
    assert!(events > admitted, "{events} events, {admitted} admitted");
    let listed = tally_in(
        &directory,
        &[
            "events",
            "--db",
            "tally-data-simulate",
            "--limit",
            "100000",
            "--json",
        ],
    );
    assert!(listed.status.success(), "{}", stderr_of(&listed));
    let lines: Vec<Value> = stdout_of(&listed)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len() as u64, events);
    for (index, event) in lines.iter().enumerate() {
        assert_eq!(number(event, "seq"), index as u64 + 1, "{event}");
    }
    let usage = lines
        .iter()
        .filter(|event| event["kind"] == "usage_admitted")
        .count() as u64;
    assert_eq!(usage, admitted, "one usage event per admitted request");
    let verified = tally_in(&directory, &["verify", "--db", "tally-data-simulate"]);
    assert_eq!(verified.status.code(), Some(0), "{}", stdout_of(&verified));
    assert!(stdout_of(&verified).contains("matches a replay"));
}

#[test]
fn a_second_run_starts_from_a_wiped_database_and_keep_will_not_mix_two_runs() {
    let directory = Scratch::new();
    let first = tally_in(&directory, SMALL_RUN);
    assert!(first.status.success(), "{}", stderr_of(&first));
    let second = tally_in(&directory, SMALL_RUN);
    assert_eq!(
        events_held(&stdout_of(&first)),
        events_held(&stdout_of(&second))
    );
    let mut keep = SMALL_RUN.to_vec();
    keep.push("--keep");
    let kept = tally_in(&directory, &keep);
    assert_eq!(kept.status.code(), Some(1));
    assert!(
        stderr_of(&kept).contains("drop --keep"),
        "{}",
        stderr_of(&kept)
    );
}

#[test]
fn simulate_never_wipes_a_folder_that_is_not_a_database() {
    let directory = Scratch::new();
    let folder = directory.0.join("tally-data-simulate");
    std::fs::create_dir_all(&folder).expect("created");
    std::fs::write(folder.join("notes.txt"), "mine").expect("written");
    let output = tally_in(&directory, SMALL_RUN);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr_of(&output).contains("--db"),
        "{}",
        stderr_of(&output)
    );
    assert!(folder.join("notes.txt").exists());
}

#[test]
fn simulate_neither_wipes_nor_adds_to_a_database_it_did_not_make() {
    let directory = Scratch::new();
    // A database the operator commands made, at simulate's default path.
    let created = tally_in(
        &directory,
        &["user", "ada", "tp-ada", "--db", "tally-data-simulate"],
    );
    assert!(created.status.success(), "{}", stderr_of(&created));
    let mut keep = SMALL_RUN.to_vec();
    keep.push("--keep");
    for args in [SMALL_RUN, &keep] {
        let output = tally_in(&directory, args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = stderr_of(&output);
        assert!(
            stderr.contains("--db") && stderr.contains("did not make"),
            "{args:?}: {stderr}"
        );
    }
    let usage = tally_in(
        &directory,
        &["usage", "tp-ada", "--db", "tally-data-simulate"],
    );
    assert!(
        usage.status.success(),
        "ada is still there: {}",
        stderr_of(&usage)
    );
    let events = tally_in(&directory, &["events", "--db", "tally-data-simulate"]);
    assert_eq!(
        stdout_of(&events).lines().count(),
        2,
        "the policy and ada, nothing simulated: {}",
        stdout_of(&events)
    );

    // What simulate made, it marks, and a later run wipes.
    let other = directory.0.join("other");
    let other = other.to_str().expect("a UTF-8 path");
    let mut first = SMALL_RUN.to_vec();
    first.extend(["--db", other]);
    let made = tally_in(&directory, &first);
    assert!(made.status.success(), "{}", stderr_of(&made));
    assert!(std::path::Path::new(other)
        .join("made-by-tally-simulate")
        .is_file());
    let again = tally_in(&directory, &first);
    assert!(again.status.success(), "{}", stderr_of(&again));
}

/// Each command's help states its exit statuses once: `consume` (1: denied) and `events` (1:
/// the events could not be written out) have their own, which a generic "0 on success; 2 ..."
/// line after them contradicted. The main help lists every command that can exit 1.
#[test]
fn every_help_states_its_exit_statuses_once_and_the_main_help_names_every_status_1() {
    let commands = [
        "simulate", "user", "team", "member", "seat", "topup", "consume", "refund", "adjust",
        "usage", "events", "verify", "compact", "policy",
    ];
    for command in commands {
        let output = tally(&[command, "--help"]);
        assert_eq!(output.status.code(), Some(0), "{command}");
        let help = stdout_of(&output);
        assert_eq!(
            help.matches("Exit status").count(),
            1,
            "`tally {command} --help` states its exit statuses more than once:\n{help}"
        );
    }
    let main = stdout_of(&tally(&["help"]));
    let status = &main[main
        .find("Exit status")
        .expect("the main help has exit statuses")..];
    for command in ["consume", "verify", "events", "simulate"] {
        assert!(
            status.contains(&format!("`{command}`")),
            "the main help's exit statuses do not say when `{command}` exits 1:\n{status}"
        );
    }
}

/// `--keep` on a database that already holds a run's accounts is refused: refused, it logs
/// nothing, not even the swap to a `--policy` that differs from the one the run used.
#[test]
fn a_refused_keep_logs_nothing_not_even_its_policy() {
    let directory = Scratch::new();
    let first = tally_in(&directory, SMALL_RUN);
    assert!(first.status.success(), "{}", stderr_of(&first));
    let held = events_held(&stdout_of(&first));
    let shipped = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("engine/policy/token-plan.toml"),
    )
    .expect("the shipped policy is read");
    let changed = shipped.replacen("amount = 1500,", "amount = 1600,", 1);
    assert_ne!(changed, shipped, "the shipped policy has a limit of 1,500");
    let policy = TempFile::new("keep-changed.toml", &changed);
    let mut keep = SMALL_RUN.to_vec();
    keep.extend(["--keep", "--policy", policy.path()]);
    let kept = tally_in(&directory, &keep);
    assert_eq!(kept.status.code(), Some(1), "{}", stderr_of(&kept));
    assert!(
        stderr_of(&kept).contains("drop --keep"),
        "{}",
        stderr_of(&kept)
    );
    let after = held.to_string();
    let listed = tally_in(
        &directory,
        &["events", "--db", "tally-data-simulate", "--after", &after],
    );
    assert!(listed.status.success(), "{}", stderr_of(&listed));
    assert_eq!(
        stdout_of(&listed),
        "",
        "the refused run logged events after the first run's {held}"
    );
}

/// A run on a path where an earlier run left its database wipes it: the report says so (on
/// stderr beside the database line with --json), and a run on a new path does not.
#[test]
fn a_run_says_when_it_wiped_an_earlier_run_s_database() {
    let directory = Scratch::new();
    let first = tally_in(&directory, SMALL_RUN);
    assert!(first.status.success(), "{}", stderr_of(&first));
    assert!(
        !stdout_of(&first).contains("wiped"),
        "{}",
        stdout_of(&first)
    );
    let second = tally_in(&directory, SMALL_RUN);
    assert!(second.status.success(), "{}", stderr_of(&second));
    assert!(
        stdout_of(&second).contains("an earlier run's database there was wiped first"),
        "{}",
        stdout_of(&second)
    );
    let mut json = SMALL_RUN.to_vec();
    json.push("--json");
    let third = tally_in(&directory, &json);
    assert!(third.status.success(), "{}", stderr_of(&third));
    assert!(
        stderr_of(&third).contains("an earlier run's database there was wiped first"),
        "{}",
        stderr_of(&third)
    );
}

/// `tally policy PATH` refuses a --policy ("drop --policy"): its help does not offer one.
#[test]
fn the_policy_command_s_help_offers_no_policy_option_it_would_refuse() {
    let help = stdout_of(&tally(&["policy", "--help"]));
    assert!(help.contains("--db PATH"), "{help}");
    assert!(!help.contains("--policy PATH"), "{help}");
    let directory = Scratch::new();
    let created = tally_in(&directory, &["team", "acme"]);
    assert!(created.status.success(), "{}", stderr_of(&created));
    let policy = TempFile::new("policy-option.toml", TWO_PLAN_POLICY);
    let refused = tally_in(
        &directory,
        &["policy", policy.path(), "--policy", policy.path()],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr_of(&refused).contains("--policy"),
        "{}",
        stderr_of(&refused)
    );
}
