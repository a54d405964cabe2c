//! The operator commands, run as the built binary in a temporary working directory, on the
//! default database (`./tally-data`): set a key up, consume until it is denied, read its usage,
//! export the events with a cursor that survives, verify and compact the database, and refuse
//! bad command lines without changing anything.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tally_engine::{Engine, EngineOptions, ManualClock, OpenOptions, Policy, SystemClock};

const HOUR_MS: u64 = 60 * 60 * 1_000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// Three chat requests an hour on Small, then credits at 1,000 micro-credits a request.
const POLICY: &str = r#"
time_zone = "UTC"

[resources.chat]
units = ["requests", "tokens"]
required = ["requests"]
price_micros = { requests = 1000, tokens = 1 }

[plans.Small]
limits = [{ resource = "chat", unit = "requests", amount = 3, window = "rolling:1h" }]

[plans.Large]
limits = [{ resource = "chat", unit = "requests", amount = 30, window = "rolling:1h" }]
"#;

/// A working directory holding the policy file, removed when dropped.
struct Workspace {
    directory: PathBuf,
    policy: String,
}

impl Workspace {
    fn new() -> Workspace {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let number = NEXT.fetch_add(1, Ordering::Relaxed);
        let directory =
            std::env::temp_dir().join(format!("tally-operator-{}-{number}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).expect("the workspace is created");
        let policy = directory.join("policy.toml");
        std::fs::write(&policy, POLICY).expect("the policy is written");
        Workspace {
            directory,
            policy: policy.to_str().expect("a UTF-8 path").to_string(),
        }
    }

    fn database(&self) -> PathBuf {
        self.directory.join("tally-data")
    }

    /// Runs `tally` here, without `--policy`.
    fn bare(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .current_dir(&self.directory)
            .output()
            .expect("the tally binary runs")
    }

    /// Runs `tally ARGS --policy POLICY` here.
    fn run(&self, args: &[&str]) -> Output {
        let mut args = args.to_vec();
        args.extend(["--policy", &self.policy]);
        self.bare(&args)
    }

    /// Runs `tally verify ARGS` here (it takes no `--policy`); it must find the database sound.
    fn verify(&self, args: &[&str]) -> String {
        let mut all = vec!["verify"];
        all.extend_from_slice(args);
        let output = self.bare(&all);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{all:?}: {}{}",
            stdout_of(&output),
            stderr_of(&output)
        );
        stdout_of(&output)
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{args:?}: {}{}",
            stdout_of(&output),
            stderr_of(&output)
        );
        stdout_of(&output)
    }

    fn events(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["events", "--json"];
        all.extend_from_slice(args);
        self.ok(&all)
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
            .collect()
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("stderr is UTF-8")
}

fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970");
    since.as_millis() as u64
}

fn seq(event: &Value) -> u64 {
    event["seq"].as_u64().expect("a sequence number")
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|event| event["kind"].as_str().expect("a kind"))
        .collect()
}

/// A user with a Small seat and 2,000 micro-credits: three requests from quota, two from
/// credits, then denied.
fn set_up_ada(workspace: &Workspace) {
    set_up_ada_with(workspace, &[]);
}

/// `set_up_ada`, each command stamped `at_ms`: a history that happened a while ago, delivered
/// late (the commands run on the system clock, which a test cannot move on, nor may they stamp
/// more than a day ahead of it, the default `max_ahead_of_clock_ms`), in a database made then
/// (its policy logged then, on its first open's clock) whose owner keeps events for its
/// readers `retention_ms` past the longest window (and after they were logged).
fn set_up_ada_at(workspace: &Workspace, at_ms: u64, retention_ms: u64) {
    let policy = Policy::from_toml_str(POLICY).expect("the test policy");
    let clock = Arc::new(ManualClock::new(at_ms));
    let options = OpenOptions {
        retention_ms,
        ..OpenOptions::default()
    };
    let engine =
        Engine::open(workspace.database(), policy, clock, options).expect("the database is made");
    engine.close().expect("close");
    set_up_ada_with(workspace, &["--at", &at_ms.to_string()]);
}

fn set_up_ada_with(workspace: &Workspace, extra: &[&str]) {
    let with = |args: &[&'static str]| -> Vec<&str> { args.iter().chain(extra).copied().collect() };
    let created = workspace.ok(&with(&["user", "ada", "tp-ada"]));
    assert!(created.contains("tp-ada"), "{created}");
    workspace.ok(&with(&["seat", "@ada", "ada", "Small"]));
    let topped = workspace.ok(&with(&["topup", "@ada", "2,000"]));
    assert!(topped.contains("balance 2,000 micro-credits"), "{topped}");
}

fn consume(workspace: &Workspace, at_ms: u64, extra: &[&str]) -> Output {
    let at = at_ms.to_string();
    let mut args = vec!["consume", "tp-ada", "chat", "requests=1", "--at", &at];
    args.extend(extra);
    workspace.run(&args)
}

#[test]
fn a_key_set_up_from_the_command_line_consumes_until_denied_and_its_usage_shows_it() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let at_ms = now_ms();
    let mut charged = Vec::new();
    for _ in 0..5 {
        let output = consume(&workspace, at_ms, &["--json"]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
        let decision: Value = serde_json::from_slice(&output.stdout).expect("JSON");
        assert_eq!(decision["decision"], "admitted");
        charged.push(decision["charged_to"]["kind"].as_str().map(String::from));
    }
    let expected: Vec<Option<String>> = ["plan_quota", "plan_quota", "plan_quota"]
        .iter()
        .chain(&["credits", "credits"])
        .map(|kind| Some(kind.to_string()))
        .collect();
    assert_eq!(charged, expected);

    let denied = consume(&workspace, at_ms, &[]);
    assert_eq!(denied.status.code(), Some(1), "denied exits 1");
    let text = stdout_of(&denied);
    assert!(text.starts_with("denied: quota exhausted"), "{text}");
    assert!(text.contains("retry in"), "{text}");
    assert!(text.contains("what would help"), "{text}");

    let usage = workspace.ok(&["usage", "tp-ada", "--at", &at_ms.to_string()]);
    assert!(usage.contains("seat on Small"), "{usage}");
    assert!(usage.contains("[##########]"), "a full bar: {usage}");
    assert!(usage.contains("3/3"), "{usage}");
    assert!(
        usage.contains("0 micro-credits (0.00 credits) left"),
        "{usage}"
    );
    let report: Value =
        serde_json::from_str(&workspace.ok(&["usage", "tp-ada", "--json"])).expect("JSON");
    assert_eq!(report["limits"][0]["used"], 3);
    assert_eq!(report["credits_charged_micros"], 2_000);
}

#[test]
fn events_come_in_order_and_a_named_cursor_survives_between_invocations() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let at_ms = now_ms();
    for _ in 0..4 {
        assert_eq!(consume(&workspace, at_ms, &[]).status.code(), Some(0));
    }
    let all = workspace.events(&[]);
    assert_eq!(
        kinds(&all),
        [
            "policy_swapped",
            "user_created",
            "seat_changed",
            "credits_topped_up",
            "usage_admitted",
            "usage_admitted",
            "usage_admitted",
            "usage_admitted",
        ]
    );
    let sequence: Vec<u64> = all.iter().map(seq).collect();
    assert_eq!(sequence, (1..=8).collect::<Vec<u64>>());
    assert_eq!(all[7]["charged_to"], "credits");
    assert_eq!(all[7]["micros"], 1_000);
    assert_eq!(all[4]["quantities"]["requests"], 1);
    // Each event names the team it concerns (billing by team needs no record of the event
    // that made the key); a policy swap concerns none.
    assert_eq!(all[4]["team"], "@ada");
    assert_eq!(all[7]["team"], "@ada");
    assert_eq!(all[0]["team"], Value::Null);

    let first = workspace.events(&["--cursor", "billing", "--limit", "5"]);
    assert_eq!(first.iter().map(seq).collect::<Vec<u64>>(), [1, 2, 3, 4, 5]);
    let second = workspace.events(&["--cursor", "billing"]);
    assert_eq!(second.iter().map(seq).collect::<Vec<u64>>(), [6, 7, 8]);
    assert!(workspace.events(&["--cursor", "billing"]).is_empty());
    assert_eq!(consume(&workspace, at_ms, &[]).status.code(), Some(0));
    let third = workspace.events(&["--cursor", "billing"]);
    assert_eq!(third.iter().map(seq).collect::<Vec<u64>>(), [9]);

    // The operator lists the readers that hold the database's places, and where each is.
    let _ = workspace.events(&["--cursor", "audit", "--limit", "2"]);
    let listed = workspace.ok(&["events", "--cursors"]);
    assert!(
        listed.starts_with("cursors: 2 of 1,024 places\n"),
        "{listed}"
    );
    assert!(
        listed.contains("  \"audit\"    after event 2\n"),
        "{listed}"
    );
    assert!(
        listed.contains("  \"billing\"  after event 9\n"),
        "{listed}"
    );
    let listed: Value = serde_json::from_str(&workspace.ok(&["events", "--cursors", "--json"]))
        .expect("one JSON object");
    assert_eq!(
        listed,
        serde_json::json!({"cursors": [{"name": "audit", "after": 2}, {"name": "billing", "after": 9}], "capacity": 1024})
    );
    assert_eq!(
        workspace
            .ok(&["events", "--delete-cursor", "audit"])
            .lines()
            .count(),
        1
    );

    // A reader that is done deletes its cursor; read again, it starts from the beginning.
    let deleted = workspace.ok(&["events", "--delete-cursor", "billing"]);
    assert!(
        deleted.contains("deleted cursor \"billing\" (it was after event 9)"),
        "{deleted}"
    );
    let none = workspace.ok(&["events", "--delete-cursor", "billing"]);
    assert!(
        none.contains("no cursor \"billing\"; nothing changed"),
        "{none}"
    );
    let anew = workspace.events(&["--cursor", "billing", "--limit", "2"]);
    assert_eq!(anew.iter().map(seq).collect::<Vec<u64>>(), [1, 2]);

    let text = workspace.ok(&["events", "--after", "8"]);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("usage_admitted"), "{text}");
    assert!(
        text.contains("key=tp-ada team=@ada resource=chat requests=1"),
        "{text}"
    );
}

#[test]
fn a_retried_request_id_gets_its_first_decision_and_counts_nothing() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let at_ms = now_ms();
    let first = consume(&workspace, at_ms, &["--id", "req-1", "--json"]);
    let again = consume(&workspace, at_ms + 1_000, &["--id", "req-1", "--json"]);
    assert_eq!(first.status.code(), Some(0));
    assert_eq!(stdout_of(&first), stdout_of(&again));
    assert_eq!(workspace.events(&["--after", "4"]).len(), 1);
    let conflict = workspace.run(&["consume", "tp-ada", "chat", "requests=2", "--id", "req-1"]);
    assert_eq!(conflict.status.code(), Some(2));
    assert!(
        stderr_of(&conflict).contains("--id"),
        "{}",
        stderr_of(&conflict)
    );
}

/// A database the commands make runs with the engine's default bound on how far ahead of the
/// clock a time may be, a day: a consume stamped two days ahead is refused naming `--at` and
/// counts nothing; one an hour ahead is taken.
#[test]
fn a_time_more_than_a_day_ahead_of_the_clock_is_refused_naming_at() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let refused = consume(&workspace, now_ms() + 2 * DAY_MS, &[]);
    let stderr = stderr_of(&refused);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--at: ") && stderr.contains("max_ahead_of_clock_ms"),
        "{stderr}"
    );
    let usage: Value =
        serde_json::from_str(&workspace.ok(&["usage", "tp-ada", "--json"])).expect("JSON");
    assert_eq!(usage["limits"][0]["used"], 0, "the refused request counted");
    let taken = consume(&workspace, now_ms() + HOUR_MS, &[]);
    assert_eq!(taken.status.code(), Some(0), "{}", stderr_of(&taken));
}

#[test]
fn verify_reports_a_sound_database_and_compact_removes_what_is_past_the_retention() {
    let workspace = Workspace::new();
    // The history is 30 days old, logged now; the owner keeps events an hour for its readers.
    let now = now_ms();
    let at_ms = now - 30 * DAY_MS;
    let at = at_ms.to_string();
    set_up_ada_at(&workspace, at_ms, HOUR_MS);
    consume(&workspace, at_ms, &[]);
    let verified = workspace.verify(&[]);
    assert!(
        verified.contains("events:   5 (sequence numbers 1 to 5)"),
        "{verified}"
    );
    assert!(verified.contains("sound:    yes"), "{verified}");

    // Compacting as of the day the history happened removes nothing.
    let compacted = workspace.ok(&["compact", "--at", &at]);
    assert!(
        compacted.contains("snapshot of the whole state at event 5"),
        "{compacted}"
    );
    assert!(compacted.contains("removed:    0 events"), "{compacted}");
    consume(&workspace, at_ms, &[]);
    // Now, 30 days on: the policy logged when the database was made goes; the history,
    // logged just now, stays the retention for a reader.
    let compacted = workspace.ok(&["compact"]);
    assert!(compacted.contains("removed:    1 events"), "{compacted}");
    assert!(compacted.contains("starts at event 2"), "{compacted}");
    assert_eq!(seq(&workspace.events(&[])[0]), 2);
    // Past the retention after it was logged, it goes too.
    let past_retention = (now + 2 * HOUR_MS).to_string();
    let compacted = workspace.ok(&["compact", "--at", &past_retention]);
    assert!(compacted.contains("removed:    4 events"), "{compacted}");
    assert!(compacted.contains("starts at event 6"), "{compacted}");

    let report: Value = serde_json::from_str(&workspace.verify(&["--json"])).expect("JSON");
    assert_eq!(report["sound"], true, "{report}");
    assert_eq!(report["first_seq"], 6);
    assert_eq!(report["snapshot_matches_replay"], true);
    assert_eq!(seq(&workspace.events(&[])[0]), 6);
    let usage: Value =
        serde_json::from_str(&workspace.ok(&["usage", "tp-ada", "--json", "--at", &at]))
            .expect("JSON");
    assert_eq!(
        usage["limits"][0]["used"], 2,
        "usage lives on in the snapshot"
    );
}

/// Reading after events that compaction removed is refused naming the option that pointed
/// there: `--after`, or `--cursor` for a saved cursor (it named `--db`, as if the database
/// were at fault).
#[test]
fn reading_events_compaction_removed_names_the_after_or_the_cursor() {
    let workspace = Workspace::new();
    // A history 30 days old logged now, compacted as of then (nothing goes), then past the
    // hour the owner keeps events for its readers.
    let now = now_ms();
    let at_ms = now - 30 * DAY_MS;
    set_up_ada_at(&workspace, at_ms, HOUR_MS);
    consume(&workspace, at_ms, &[]);
    let read = workspace.events(&["--cursor", "billing", "--limit", "2"]);
    assert_eq!(read.iter().map(seq).collect::<Vec<u64>>(), [1, 2]);
    workspace.ok(&["compact", "--at", &at_ms.to_string()]);
    consume(&workspace, at_ms, &[]);
    let past_retention = (now + 2 * HOUR_MS).to_string();
    let compacted = workspace.ok(&["compact", "--at", &past_retention]);
    assert!(compacted.contains("starts at event 6"), "{compacted}");
    for (args, option) in [
        (&["events", "--after", "2"][..], "--after"),
        (&["events", "--cursor", "billing"][..], "--cursor"),
    ] {
        let output = workspace.run(args);
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("compacted away"), "{args:?}: {stderr}");
        assert!(
            stderr.contains(option) && !stderr.contains("--db"),
            "{args:?} should name {option}: {stderr}"
        );
    }
    // Nothing moved: the cursor is where it was.
    let output = workspace.run(&["events", "--cursor", "billing"]);
    assert_eq!(output.status.code(), Some(2));
    // The way on the refusal gives works for the cursor: `--after` reads without moving it
    // (it stays stuck, every run refused), so it names `--delete-cursor`, after which the
    // cursor reads from the oldest event kept. Before, it said only "read after 5".
    let stderr = stderr_of(&output);
    assert!(
        stderr.contains("tally events --delete-cursor \"billing\""),
        "{stderr}"
    );
    workspace.ok(&["events", "--delete-cursor", "billing"]);
    let read = workspace.events(&["--cursor", "billing", "--limit", "1"]);
    assert_eq!(read.iter().map(seq).collect::<Vec<u64>>(), [6]);
}

/// `--after` past the log's last event is refused naming it: answered "no events", a reader
/// polling with it would later skip, unseen, the events that take those numbers.
#[test]
fn reading_events_after_a_sequence_number_past_the_end_is_refused_naming_after() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let last = event_count(&workspace) as u64;
    assert!(workspace.events(&["--after", &last.to_string()]).is_empty());
    let past = (last + 1).to_string();
    let output = workspace.run(&["events", "--after", &past]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("tally: --after: ") && stderr.contains(&format!("event {last}")),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}

/// A reader's first `events --cursor NAME` on a database whose old segment is damaged (the
/// open does not read it: a snapshot covers it) is refused naming the segment, and leaves no
/// cursor behind. Before, the name was saved at 0 (to claim its place under the bound) before
/// the read failed: the refused command took one of the database's cursor places for good.
#[test]
fn reading_a_damaged_segment_with_a_new_cursor_is_refused_and_saves_no_cursor() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    // A snapshot, and the events before it in a sealed segment of their own.
    workspace.ok(&["compact"]);
    let first = workspace.database().join("events/00000000000000000001.seg");
    let mut bytes = std::fs::read(&first).expect("the first segment");
    // Inside the first record's payload (after the 32-byte header and the 8-byte frame).
    bytes[48] ^= 0xff;
    std::fs::write(&first, &bytes).expect("the first segment is damaged");
    let cursors_before = workspace.ok(&["events", "--cursors", "--json"]);
    let output = workspace.run(&["events", "--cursor", "fresh-reader"]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("00000000000000000001.seg") && stderr.contains("crc"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "{}", stdout_of(&output));
    let cursors_after = workspace.ok(&["events", "--cursors", "--json"]);
    assert_eq!(cursors_after, cursors_before);
    assert!(!cursors_after.contains("fresh-reader"), "{cursors_after}");
}

/// A cursor whose saved value is damaged (not a sequence number's 8 bytes), which `verify`
/// reports, can be deleted: `events --delete-cursor` is the operator's way to free it. Before,
/// the command read the cursor's position first (for its message) and was refused on the
/// damage it was meant to remove, so only editing sled by hand got the database sound again.
#[test]
fn a_damaged_cursor_that_verify_reports_can_be_deleted() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    workspace.events(&["--cursor", "billing", "--limit", "2"]);
    workspace.events(&["--cursor", "audit", "--limit", "1"]);
    {
        let db = sled::open(workspace.database()).expect("sled opens the database");
        let cursors = db.open_tree("cursors").expect("the cursors tree");
        cursors.insert("billing", &[0u8; 3]).expect("damaged");
        db.flush().expect("flushed");
    }
    let output = workspace.bare(&["verify"]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout_of(&output));
    assert!(
        stdout_of(&output).contains("cursor \"billing\" holds 3 bytes"),
        "{}",
        stdout_of(&output)
    );
    // Another reader is not held up by it: a new one starts.
    let read = workspace.events(&["--cursor", "fresh", "--limit", "1"]);
    assert_eq!(read.iter().map(seq).collect::<Vec<u64>>(), [1]);
    workspace.ok(&["events", "--delete-cursor", "fresh"]);
    let deleted = workspace.ok(&["events", "--delete-cursor", "billing"]);
    assert!(
        deleted.contains("deleted cursor \"billing\"") && deleted.contains("damaged"),
        "{deleted}"
    );
    workspace.verify(&[]);
    // The other reader's cursor is where it was.
    let listed: Value =
        serde_json::from_str(&workspace.ok(&["events", "--cursors", "--json"])).expect("JSON");
    assert_eq!(
        listed["cursors"],
        serde_json::json!([{"name": "audit", "after": 1}]),
        "{listed}"
    );
}

/// A new cursor name past the bound on cursors is refused (exit 2) before any event is
/// printed: printed first, then refused, a script that read them read them again next time.
#[test]
fn a_new_cursor_past_the_bound_prints_nothing() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    {
        let policy = Policy::from_toml_str(POLICY).expect("the test policy");
        let engine = Engine::open(
            workspace.database(),
            policy,
            Arc::new(SystemClock),
            OpenOptions::default(),
        )
        .expect("open");
        for number in 0..tally_engine::log::MAX_CURSORS {
            engine
                .save_cursor(&format!("reader-{number}"), 1)
                .expect("a cursor");
        }
        engine.close().expect("close");
    }
    let output = workspace.run(&["events", "--cursor", "one-too-many"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr_of(&output));
    assert!(output.stdout.is_empty(), "{}", stdout_of(&output));
    assert!(
        stderr_of(&output).contains("cursors"),
        "{}",
        stderr_of(&output)
    );
    // A saved one still reads.
    assert!(!workspace.events(&["--cursor", "reader-7"]).is_empty());
}

/// `revoke KEY` revokes a key for good: `consume` on it is then denied (exit 1) saying so, its
/// usage report says so, revoking it again changes nothing, and `member` gives the member a
/// new key in its place. An unknown key is refused naming KEY (exit 2).
#[test]
fn revoke_denies_the_key_from_then_on_and_member_gives_a_new_one() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    assert!(workspace
        .ok(&["revoke", "tp-ada"])
        .contains("revoked key tp-ada"));
    let output = workspace.run(&["consume", "tp-ada", "chat", "requests=1"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr_of(&output));
    assert!(
        stdout_of(&output).contains("denied: the key was revoked"),
        "{}",
        stdout_of(&output)
    );
    let before = event_count(&workspace);
    assert!(workspace
        .ok(&["revoke", "tp-ada"])
        .contains("revoked already"));
    assert_eq!(event_count(&workspace), before, "nothing logged again");
    let usage: Value =
        serde_json::from_str(&workspace.ok(&["usage", "tp-ada", "--json"])).expect("JSON");
    assert_eq!(usage["revoked"], Value::Bool(true));
    assert!(workspace
        .ok(&["usage", "tp-ada"])
        .contains("revoked: every request"));
    let logged = workspace.events(&[]);
    let revoked: Vec<&Value> = logged
        .iter()
        .filter(|event| event["kind"] == "key_revoked")
        .collect();
    assert_eq!(revoked.len(), 1, "{logged:?}");
    assert_eq!(revoked[0]["key"], "tp-ada");
    let output = workspace.run(&["revoke", "tp-nobody"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr_of(&output).contains("KEY"), "{}", stderr_of(&output));
    workspace.ok(&["member", "@ada", "ada", "tp-ada-2"]);
    let usage: Value =
        serde_json::from_str(&workspace.ok(&["usage", "tp-ada-2", "--json"])).expect("JSON");
    assert_eq!(usage["revoked"], Value::Bool(false));
    assert!(stdout_of(&workspace.bare(&["help"])).contains("revoke KEY"));
}

/// `consume` on an unknown key is a denial (exit 1, logged nothing), as the engine answers a
/// gateway; the help says so rather than listing an unknown key among the arguments refused
/// with exit 2.
#[test]
fn consume_on_an_unknown_key_is_denied_as_the_help_says() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let before = event_count(&workspace);
    let output = workspace.run(&["consume", "tp-nobody", "chat", "requests=1"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr_of(&output));
    assert!(
        stdout_of(&output).contains("denied: unknown key"),
        "{}",
        stdout_of(&output)
    );
    assert_eq!(event_count(&workspace), before);
    for help in [&["help"][..], &["consume", "--help"][..]] {
        let text = stdout_of(&workspace.bare(help))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(text.contains("an unknown key is"), "{help:?}: {text}");
        assert!(
            !text.contains("such as an unknown key or team"),
            "{help:?}: {text}"
        );
    }
}

/// An exported event names the plan it was charged to in the policy it was logged under: a
/// later swap that renumbers the plans (one added before them) does not rename it. Before,
/// every event was named with the current policy, so the request charged to Small below was
/// exported as charged to Large once "Aaa" was swapped in.
#[test]
fn an_event_names_its_plan_as_its_own_policy_did_after_a_swap() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    assert_eq!(consume(&workspace, now_ms(), &[]).status.code(), Some(0));
    let before = workspace.events(&[]);
    let charged = before.last().expect("the consume's event").clone();
    assert_eq!(charged["plan"], "Small", "{charged}");
    let renumbered = workspace.directory.join("renumbered.toml");
    let with_aaa = format!(
        "{POLICY}\n[plans.Aaa]\nlimits = [{{ resource = \"chat\", unit = \"requests\", \
         amount = 1, window = \"rolling:1h\" }}]\n"
    );
    std::fs::write(&renumbered, with_aaa).expect("the policy is written");
    workspace.bare(&["policy", renumbered.to_str().expect("a UTF-8 path")]);
    assert_eq!(policy_swaps(&workspace).len(), 2, "swapped");
    // Without --policy: the database runs the new one now.
    let before_it = (seq(&charged) - 1).to_string();
    let json = workspace.bare(&["events", "--json", "--after", &before_it, "--limit", "1"]);
    let exported: Value = serde_json::from_str(stdout_of(&json).trim()).expect("one event");
    assert_eq!(exported["plan"], "Small", "{exported}");
    let line = workspace.bare(&["events", "--after", &before_it, "--limit", "1"]);
    assert!(
        stdout_of(&line).contains("plan=Small"),
        "{}",
        stdout_of(&line)
    );
}

/// A new cursor past the bound of saved cursors is refused naming `--cursor` (it named `--db`).
#[test]
fn a_new_cursor_past_the_bound_is_refused_naming_the_cursor() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let policy = Policy::from_toml_str(POLICY).expect("the test policy");
    let options = OpenOptions {
        use_recorded: true,
        ..OpenOptions::default()
    };
    let engine = Engine::open_with_stored_policy(
        workspace.database(),
        policy,
        Arc::new(SystemClock),
        options,
    )
    .expect("open");
    for reader in 0..tally_engine::log::MAX_CURSORS {
        engine
            .save_cursor(&format!("reader-{reader}"), 0)
            .expect("room for it");
    }
    drop(engine);
    let output = workspace.run(&["events", "--cursor", "one-too-many"]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--cursor") && !stderr.contains("--db"),
        "should name --cursor: {stderr}"
    );
}

/// A cursor name the engine refuses is named as the option it was given with: `--delete-cursor`
/// when deleting (not `--cursor`, which the command line did not hold).
#[test]
fn a_bad_cursor_name_to_delete_is_refused_naming_delete_cursor() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let before = event_count(&workspace);
    let long = "c".repeat(300);
    let cases: [(&[&str], &str); 3] = [
        (&["events", "--delete-cursor", &long], "--delete-cursor"),
        (&["events", "--delete-cursor", "a\tb"], "--delete-cursor"),
        (&["events", "--cursor", &long], "--cursor"),
    ];
    refused_naming(&workspace, &cases);
    assert_eq!(event_count(&workspace), before);
}

/// What `usage --json` reports for ada: (requests used on Small's limit, credits charged).
fn ada_usage(workspace: &Workspace, at_ms: u64) -> (u64, u64) {
    let at = at_ms.to_string();
    let report: Value =
        serde_json::from_str(&workspace.ok(&["usage", "tp-ada", "--json", "--at", &at]))
            .expect("JSON");
    let used = report["limits"][0]["used"].as_u64().expect("used");
    let charged = report["credits_charged_micros"].as_u64().expect("charged");
    (used, charged)
}

#[test]
fn a_refund_and_a_correction_from_the_command_line_move_the_usage_and_are_events_of_their_own() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let at_ms = now_ms();
    for id in ["q1", "q2", "q3", "q4"] {
        let output = consume(&workspace, at_ms, &["--id", id]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    }
    assert_eq!(
        ada_usage(&workspace, at_ms),
        (3, 1_000),
        "q4 was paid by credits"
    );
    let before = event_count(&workspace);

    let at = (at_ms + 1_000).to_string();
    let refunded = workspace.ok(&["refund", "q4", "--at", &at]);
    assert!(
        refunded.contains("gave back 1,000 micro-credits"),
        "{refunded}"
    );
    let refunded: Value =
        serde_json::from_str(&workspace.ok(&["refund", "q1", "--at", &at, "--json"]))
            .expect("JSON");
    assert_eq!(refunded["charged_to"], "plan_quota");
    assert_eq!(
        refunded["quota_given_back"],
        serde_json::json!({"chat:requests per rolling:1h": 1}),
        "{refunded}"
    );
    assert_eq!(ada_usage(&workspace, at_ms + 1_000), (2, 0));

    // 5 requests that happened at `at_ms` and were never counted: counted whatever the limit.
    let usage_at = at_ms.to_string();
    let added = workspace.ok(&[
        "adjust",
        "tp-ada",
        "chat",
        "requests=5",
        "--usage-at",
        &usage_at,
        "--add",
        "--at",
        &at,
    ]);
    assert!(
        added.contains("chat:requests per rolling:1h: added 5"),
        "{added}"
    );
    assert_eq!(ada_usage(&workspace, at_ms + 1_000).0, 7);
    // Removing 10 gives back the 7 that count, no more.
    let removed: Value = serde_json::from_str(&workspace.ok(&[
        "adjust",
        "tp-ada",
        "chat",
        "requests=10",
        "--usage-at",
        &usage_at,
        "--remove",
        "--at",
        &at,
        "--json",
    ]))
    .expect("JSON");
    assert_eq!(removed["limits"][0]["moved"], 7, "{removed}");
    assert_eq!(ada_usage(&workspace, at_ms + 1_000).0, 0);

    let events = workspace.events(&["--after", &before.to_string()]);
    assert_eq!(
        kinds(&events),
        ["refunded", "refunded", "usage_adjusted", "usage_adjusted"]
    );

    // Each refused the same way as any other bad argument: exit 2, naming it, nothing changed.
    let after = event_count(&workspace);
    let cases: [(&[&str], &str); 6] = [
        (&["refund", "q1"], "REQUEST_ID"),
        (&["refund", "q-never"], "REQUEST_ID"),
        (
            &["adjust", "tp-ada", "chat", "requests=1", "--add"],
            "--usage-at",
        ),
        (
            &[
                "adjust",
                "tp-ada",
                "chat",
                "requests=1",
                "--usage-at",
                &usage_at,
            ],
            "--add",
        ),
        (
            &[
                "adjust",
                "tp-ada",
                "chat",
                "requests=1",
                "--usage-at",
                &usage_at,
                "--add",
                "--remove",
            ],
            "--remove",
        ),
        (
            &[
                "adjust",
                "tp-nobody",
                "chat",
                "requests=1",
                "--usage-at",
                &usage_at,
                "--add",
            ],
            "KEY",
        ),
    ];
    refused_naming(&workspace, &cases);
    assert_eq!(event_count(&workspace), after);
}

/// Runs each command line, which must exit 2 with an error naming its culprit and print
/// nothing on stdout.
fn refused_naming(workspace: &Workspace, cases: &[(&[&str], &str)]) {
    for (args, culprit) in cases {
        let output = workspace.run(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = stderr_of(&output);
        assert!(
            stderr.contains(&format!("tally: {culprit}: ")),
            "{args:?}: {stderr}"
        );
        assert!(output.stdout.is_empty(), "{args:?}");
    }
}

/// The number of events in the database, read without changing it.
fn event_count(workspace: &Workspace) -> usize {
    workspace.events(&[]).len()
}

#[test]
fn a_bad_command_line_or_argument_exits_2_naming_it_and_changes_nothing() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let before = event_count(&workspace);
    let cases: [(&[&str], &str); 9] = [
        (&["usage", "tp-ada", "--bogus"], "--bogus"),
        (&["usage", "tp-nobody"], "KEY"),
        (&["consume", "tp-ada", "chat", "requests=x"], "requests=x"),
        (&["consume", "tp-ada", "video", "requests=1"], "RESOURCE"),
        (&["consume", "tp-ada", "chat", "songs=1"], "UNIT=N"),
        (&["topup", "@nobody", "5"], "TEAM"),
        (&["seat", "@ada", "ada", "Huge"], "PLAN"),
        (&["user", "ada", "tp-ada-2"], "USER"),
        (&["events", "--limit", "0"], "--limit"),
    ];
    refused_naming(&workspace, &cases);
    assert_eq!(event_count(&workspace), before);
}

#[test]
fn a_policy_that_drops_a_seated_plan_is_refused_and_nothing_changes() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let before = event_count(&workspace);
    // The shipped policy: it has no plan "Small".
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/engine/policy/token-plan.toml");
    let output = workspace.bare(&["policy", shipped]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = stderr_of(&output);
    assert!(stderr.contains("tally: PATH: "), "{stderr}");
    assert!(stderr.contains("Small"), "{stderr}");
    assert_eq!(event_count(&workspace), before);
}

#[test]
fn a_command_given_another_policy_is_refused_before_it_changes_anything() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let before = event_count(&workspace);
    let larger = workspace.directory.join("larger.toml");
    std::fs::write(&larger, POLICY.replace("amount = 3,", "amount = 5,")).expect("written");
    let larger = larger.to_str().expect("a UTF-8 path");
    // Both a command that would fail anyway and one that would succeed: neither swaps, neither
    // does its work.
    for args in [
        &["usage", "tp-nobody", "--policy", larger][..],
        &["topup", "@ada", "5", "--policy", larger],
    ] {
        let output = workspace.bare(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = stderr_of(&output);
        assert!(
            stderr.contains("tally: --policy: the database runs another policy (generation 0)")
                && stderr.contains("tally policy PATH"),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(event_count(&workspace), before, "nothing changed");
    let both = workspace.bare(&["policy", larger, "--policy", larger]);
    assert_eq!(both.status.code(), Some(2));
    assert!(
        stderr_of(&both).contains("drop --policy"),
        "{}",
        stderr_of(&both)
    );
    assert_eq!(event_count(&workspace), before, "nothing changed");
}

/// The generations of the policy events in the log (read without --policy).
fn policy_swaps(workspace: &Workspace) -> Vec<u64> {
    let output = workspace.bare(&["events", "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    stdout_of(&output)
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).expect("one JSON object per line"))
        .filter(|event| event["kind"] == "policy_swapped")
        .map(|event| event["generation"].as_u64().expect("a generation"))
        .collect()
}

#[test]
fn without_policy_a_command_keeps_the_policy_the_database_runs_with() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let at = now_ms().to_string();
    assert_eq!(policy_swaps(&workspace), [0]);
    // A gateway's database looked at and used without --policy: the shipped policy (which has
    // no plan Small) is neither swapped in nor refused, and Small's 3 an hour still holds.
    for args in [
        &["usage", "tp-ada", "--at", &at][..],
        &["consume", "tp-ada", "chat", "requests=3", "--at", &at],
        &["topup", "@ada", "1"],
    ] {
        let output = workspace.bare(args);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{args:?}: {}",
            stderr_of(&output)
        );
    }
    let usage = stdout_of(&workspace.bare(&["usage", "tp-ada", "--at", &at]));
    assert!(usage.contains("seat on Small"), "{usage}");
    assert!(usage.contains("3/3"), "{usage}");
    let denied = workspace.bare(&["consume", "tp-ada", "chat", "requests=1", "--at", &at]);
    assert_eq!(
        denied.status.code(),
        Some(0),
        "credits pay: {}",
        stderr_of(&denied)
    );
    assert!(
        stdout_of(&denied).contains("credits"),
        "{}",
        stdout_of(&denied)
    );
    assert_eq!(policy_swaps(&workspace), [0], "nothing was swapped");

    // `tally policy` swaps, logged; later commands keep the new one, and the same one again
    // changes nothing.
    let larger = workspace.directory.join("larger.toml");
    std::fs::write(&larger, POLICY.replace("amount = 3,", "amount = 5,")).expect("written");
    let larger = larger.to_str().expect("a UTF-8 path");
    let output = workspace.bare(&["policy", larger]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    assert!(
        stdout_of(&output).contains("as policy generation 1"),
        "{}",
        stdout_of(&output)
    );
    assert_eq!(policy_swaps(&workspace), [0, 1]);
    let usage = stdout_of(&workspace.bare(&["usage", "tp-ada", "--at", &at]));
    assert!(usage.contains("3/5"), "the swapped policy stays: {usage}");
    let same = workspace.bare(&["usage", "tp-ada", "--at", &at, "--policy", larger]);
    assert_eq!(same.status.code(), Some(0), "{}", stderr_of(&same));
    let again = stdout_of(&workspace.bare(&["policy", larger]));
    assert!(again.contains("nothing changed"), "{again}");
    assert_eq!(policy_swaps(&workspace), [0, 1]);
}

#[test]
fn a_new_database_without_policy_starts_with_the_shipped_one() {
    let workspace = Workspace::new();
    workspace.bare(&["user", "bo", "tp-bo"]);
    let output = workspace.bare(&["seat", "@bo", "bo", "Starter"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    let usage = stdout_of(&workspace.bare(&["usage", "tp-bo"]));
    assert!(
        usage.contains("0/1,500"),
        "Starter's 5-hour requests: {usage}"
    );
}

#[test]
fn verify_refuses_the_options_it_would_ignore_and_leaves_the_database_as_it_was() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let before = workspace.events(&[]);
    for (args, option) in [
        (
            &["verify", "--policy", workspace.policy.as_str()][..],
            "--policy",
        ),
        (&["verify", "--durability", "none"], "--durability"),
        (&["verify", "--json", "--policy=p.toml"], "--policy"),
    ] {
        let output = workspace.bare(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = stderr_of(&output);
        assert!(
            stderr.contains(&format!(
                "tally: {option}: does not apply to `tally verify`: it only reads the database"
            )),
            "{args:?}: {stderr}"
        );
        assert!(stdout_of(&output).is_empty(), "{args:?}");
    }
    let help = stdout_of(&workspace.bare(&["verify", "--help"]));
    assert!(help.contains("--db PATH"), "{help}");
    assert!(!help.contains("--policy PATH"), "{help}");
    assert!(!help.contains("--durability MODE"), "{help}");
    // What the database holds is what it held before.
    assert_eq!(workspace.events(&[]), before);
    assert!(workspace.verify(&[]).contains("sound:    yes"));
}

#[test]
fn a_command_on_a_missing_database_creates_none() {
    let workspace = Workspace::new();
    for args in [
        &["usage", "tp-ada"][..],
        &["topup", "@ada", "5"],
        &["verify"],
        &["events"],
        &["team", "@bad"],
    ] {
        // `verify` takes no --policy.
        let output = if args[0] == "verify" {
            workspace.bare(args)
        } else {
            workspace.run(args)
        };
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(!workspace.database().exists(), "{args:?} left a database");
    }
    let missing = workspace.run(&["usage", "tp-ada"]);
    assert!(
        stderr_of(&missing).contains("tally: --db: no database at tally-data"),
        "{}",
        stderr_of(&missing)
    );
    assert!(Path::new(&workspace.policy).exists());
}

#[test]
fn a_cursor_does_not_move_past_events_that_could_not_be_written_out() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "events",
            "--cursor",
            "billing",
            "--policy",
            &workspace.policy,
        ])
        .current_dir(&workspace.directory)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the tally binary runs");
    // Close the reading end before the command writes: its write fails (a closed pipe).
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("the command ends");
    assert_eq!(output.status.code(), Some(1), "{}", stderr_of(&output));
    assert!(
        stderr_of(&output).contains("no cursor was moved"),
        "{}",
        stderr_of(&output)
    );
    let events = workspace.events(&["--cursor", "billing"]);
    assert_eq!(events.iter().map(seq).collect::<Vec<u64>>(), [1, 2, 3, 4]);
}

/// A command whose change was made but whose report could not be written out (stdout on
/// `/dev/full`) exits with the status of what it did, not 1: for `consume`, 1 says "denied"
/// of a request that was admitted and counted, and for `topup` a failure a script retries,
/// adding the credits twice. A pure report (`usage`, `events --cursors`) that could not be
/// written exits 1.
#[test]
fn a_change_whose_report_cannot_be_written_exits_with_what_it_did() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        return; // no /dev/full here
    };
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let run_to_full = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .args(["--policy", &workspace.policy])
            .current_dir(&workspace.directory)
            .stdout(full.try_clone().expect("a second handle"))
            .output()
            .expect("the tally binary runs");
        let stderr = stderr_of(&output);
        assert!(stderr.contains("cannot write"), "{args:?}: {stderr}");
        output.status.code()
    };
    let at_ms = now_ms();
    let at = at_ms.to_string();
    assert_eq!(
        run_to_full(&["consume", "tp-ada", "chat", "requests=1", "--at", &at]),
        Some(0),
        "admitted"
    );
    assert_eq!(ada_usage(&workspace, at_ms).0, 1, "counted once");
    assert_eq!(run_to_full(&["topup", "@ada", "1,000"]), Some(0));
    let balance = |workspace: &Workspace| {
        let report: Value =
            serde_json::from_str(&workspace.ok(&["usage", "tp-ada", "--json"])).expect("JSON");
        report["credits_balance_micros"].as_u64().expect("balance")
    };
    assert_eq!(balance(&workspace), 3_000);
    assert_eq!(
        run_to_full(&["usage", "tp-ada"]),
        Some(1),
        "nothing reported"
    );
    // The saved cursors are a report too (it exited 0).
    assert_eq!(
        run_to_full(&["events", "--cursors"]),
        Some(1),
        "no cursors reported"
    );
    // A denial is still 1: two more from quota, three from the 3,000 micro-credits.
    for _ in 0..5 {
        workspace.run(&["consume", "tp-ada", "chat", "requests=1", "--at", &at]);
    }
    assert_eq!(
        run_to_full(&["consume", "tp-ada", "chat", "requests=1", "--at", &at]),
        Some(1),
        "denied"
    );
}

#[test]
fn commands_run_a_database_with_the_options_its_gateway_recorded() {
    let workspace = Workspace::new();
    // A gateway's database: room for two users, and usage events kept 60 days past the
    // longest window for its billing export.
    let gateway = OpenOptions {
        engine: EngineOptions {
            max_users: 2,
            ..EngineOptions::default()
        },
        retention_ms: 60 * DAY_MS,
        ..OpenOptions::default()
    };
    let policy = Policy::from_toml_str(POLICY).expect("the test policy");
    // Its history is 30 days old, logged then on its clock (the commands run on the system
    // clock: compacting now is compacting 30 days on).
    let then_ms = now_ms() - 30 * DAY_MS;
    let then = then_ms.to_string();
    let clock = Arc::new(ManualClock::new(then_ms));
    let engine = Engine::open(workspace.database(), policy, clock, gateway)
        .expect("the gateway opens its database");
    engine.create_user("ada", "tp-ada", None).expect("a user");
    engine.close().expect("close");

    workspace.ok(&["user", "bo", "tp-bo"]);
    let refused = workspace.run(&["user", "cy", "tp-cy"]);
    assert_eq!(refused.status.code(), Some(2), "{}", stdout_of(&refused));
    assert!(
        stderr_of(&refused).contains("the bound of 2 is reached"),
        "the gateway's bound of 2 users: {}",
        stderr_of(&refused)
    );

    workspace.ok(&["seat", "@ada", "ada", "Small", "--at", &then]);
    consume(&workspace, then_ms, &[]);
    // 30 days on is within the gateway's retention: with the defaults (7 days) the events
    // it logged 30 days ago would go.
    let compacted = workspace.ok(&["compact"]);
    assert!(compacted.contains("removed:    0 events"), "{compacted}");
    let verified = workspace.verify(&[]);
    assert!(verified.contains("sound:    yes"), "{verified}");
    assert!(
        verified.contains("options:  replayed with the ones the database's owner recorded"),
        "{verified}"
    );
    let recorded = Engine::recorded_options(workspace.database())
        .expect("read")
        .expect("recorded");
    assert_eq!(recorded.max_users, 2);
    assert_eq!(recorded.retention_ms, 60 * DAY_MS);
}

/// An empty directory given as --db may hold a new database; a command that fails there leaves
/// it as it was, an empty directory, rather than removing the operator's directory with the
/// database it made in it.
#[test]
fn a_failed_command_leaves_an_empty_directory_it_was_given_as_it_was() {
    let workspace = Workspace::new();
    std::fs::create_dir(workspace.database()).expect("an empty directory");
    let long_team = "x".repeat(200);
    for args in [
        &["team", long_team.as_str()][..],
        &["user", "ada", "tp-ada", "--at", "x"],
    ] {
        let output = workspace.run(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            workspace.database().is_dir(),
            "{args:?} removed the directory it was given"
        );
        let left = std::fs::read_dir(workspace.database())
            .expect("readable")
            .count();
        assert_eq!(left, 0, "{args:?} left files in the directory");
    }
    workspace.ok(&["team", "acme"]);
    assert!(workspace.database().join("events").is_dir());
}

/// A command that fails on a new --db whose parent directories are missing too removes the
/// directories it made for it, not only the database's own.
#[test]
fn a_failed_command_on_a_new_nested_path_leaves_no_directory_behind() {
    let workspace = Workspace::new();
    let long_team = "x".repeat(200);
    let output = workspace.run(&["team", &long_team, "--db", "made/for/it"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr_of(&output));
    assert!(
        !workspace.directory.join("made").exists(),
        "the failed command left {:?} behind",
        workspace.directory.join("made")
    );
    workspace.ok(&["team", "acme", "--db", "made/for/it"]);
    assert!(workspace.directory.join("made/for/it/events").is_dir());
}

/// A reservation settled for more than its estimate charges the extra to the team's credits;
/// `events` must say so on the close, or a billing reader bills the estimate alone. Before,
/// the close showed the actual amount and what was given back, never the extra charge: a
/// team that held 1,100 micro-credits and was charged 400 more was billed 1,100.
#[test]
fn events_show_the_extra_a_settle_for_more_charged() {
    let workspace = Workspace::new();
    let at_ms = now_ms();
    let policy = Policy::from_toml_str(POLICY).expect("the test policy");
    let clock = Arc::new(ManualClock::new(at_ms));
    let engine = Engine::open(workspace.database(), policy, clock, OpenOptions::default())
        .expect("the gateway opens its database");
    engine.create_user("ada", "tp-ada", None).expect("a user");
    engine.top_up("@ada", 10_000, None).expect("credits");
    let estimate = [
        (tally_engine::Unit::Requests, 1),
        (tally_engine::Unit::Tokens, 100),
    ];
    let reserved = engine
        .reserve(
            &tally_engine::UsageRequest::new("tp-ada", "chat", &estimate),
            None,
        )
        .expect("reserve");
    let id = reserved.reservation.expect("held on credits");
    let actual = [
        (tally_engine::Unit::Requests, 1),
        (tally_engine::Unit::Tokens, 500),
    ];
    let settled = engine.settle(id, &actual, None).expect("settle");
    assert!(
        matches!(
            settled,
            tally_engine::SettleOutcome::Settled(tally_engine::Settlement {
                extra: Some(tally_engine::ChargedTo::Credits { micros: 400 }),
                ..
            })
        ),
        "{settled:?}"
    );
    assert_eq!(
        engine.credits_micros("@ada").expect("balance"),
        10_000 - 1_500
    );
    engine.close().expect("close");

    let events = workspace.events(&[]);
    let opened = events
        .iter()
        .find(|event| event["kind"] == "reservation_opened")
        .expect("the reservation's opening");
    assert_eq!(opened["charged_to"], "credits", "{opened}");
    assert_eq!(opened["micros"], 1_100, "{opened}");
    let closed = events
        .iter()
        .find(|event| event["kind"] == "reservation_closed")
        .expect("the reservation's close");
    assert_eq!(closed["end"], "settled", "{closed}");
    assert_eq!(closed["credits_micros_given_back"], 0, "{closed}");
    assert_eq!(closed["extra_charged_to"], "credits", "{closed}");
    assert_eq!(closed["extra_micros"], 400, "{closed}");
    let line = workspace.ok(&["events"]);
    let closed_line = line
        .lines()
        .find(|line| line.contains("reservation_closed"))
        .expect("a line for the close");
    assert!(
        closed_line.contains("extra_charged_to=credits extra_micros=400"),
        "{closed_line}"
    );
}

/// A denial under a request id is an event of its own (a retry gets the same answer); `events`
/// names its key, resource, quantities and request id as it does an admission's. Before, its
/// line was the kind alone: a reader could not tell whose request was denied.
#[test]
fn a_denied_request_with_an_id_is_exported_with_its_key_and_id() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let at_ms = now_ms();
    for _ in 0..5 {
        assert_eq!(consume(&workspace, at_ms, &[]).status.code(), Some(0));
    }
    let denied = consume(&workspace, at_ms, &["--id", "req-6"]);
    assert_eq!(denied.status.code(), Some(1), "{}", stdout_of(&denied));
    let events = workspace.events(&[]);
    let last = events.last().expect("events");
    assert_eq!(last["kind"], "request_denied", "{last}");
    assert_eq!(last["key"], "tp-ada", "{last}");
    assert_eq!(last["resource"], "chat", "{last}");
    assert_eq!(last["quantities"]["requests"], 1, "{last}");
    assert_eq!(last["request_id"], "req-6", "{last}");
    let text = workspace.ok(&["events"]);
    let line = text.lines().last().expect("a line");
    assert!(
        line.contains("key=tp-ada team=@ada resource=chat requests=1 request_id=req-6"),
        "{line}"
    );
}

/// Credits as printed (`1,234.5`, `0.001`) in micro-credits, exactly; `None` for a figure
/// finer than a micro-credit.
fn credits_in_micros(credits: &str) -> Option<u64> {
    let credits = credits.replace(',', "");
    let (whole, fraction) = credits.split_once('.').unwrap_or((&credits, ""));
    if fraction.len() > 6 {
        return None;
    }
    let whole: u64 = whole.parse().expect("whole credits");
    let fraction: u64 = format!("{fraction:0<6}")
        .parse()
        .expect("a fraction of a credit");
    Some(whole * 1_000_000 + fraction)
}

/// Every `N micro-credits (C credits)` of a text, as (N, C in micro-credits).
fn micros_and_credits(text: &str) -> Vec<(u64, Option<u64>)> {
    let mut pairs = Vec::new();
    let mut rest = text;
    while let Some((before, after)) = rest.split_once(" micro-credits (") {
        let micros = before
            .rsplit(|c: char| !c.is_ascii_digit() && c != ',')
            .next()
            .expect("N");
        let (credits, after) = after.split_once(" credits)").expect("C credits)");
        let micros: u64 = micros.replace(',', "").parse().expect("micro-credits");
        pairs.push((micros, credits_in_micros(credits)));
        rest = after;
    }
    pairs
}

/// A denial's "what would help" said `1,000 micro-credits (0.00 credits) more in the team's
/// credits`: the shortfall rounded to the nearest cent, so a shortfall under half a cent read
/// as nothing, and any other one rounded down was a top-up that still left the request denied.
/// What is needed is rounded up: the credits it names are enough.
#[test]
fn the_credits_a_denial_says_would_help_are_enough() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let at_ms = now_ms();
    for _ in 0..5 {
        let output = consume(&workspace, at_ms, &[]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    }
    let denied = consume(&workspace, at_ms, &[]);
    assert_eq!(denied.status.code(), Some(1), "{}", stderr_of(&denied));
    let text = stdout_of(&denied);
    let help = &text[text.find("what would help: ").expect("what would help")..];
    let (micros, credits) = micros_and_credits(help)[0];
    assert!(micros > 0, "{text}");
    assert!(
        credits.is_some_and(|credits| credits >= micros),
        "the credits named are less than the {micros} micro-credits needed: {text}"
    );
}

/// A duration as `short_duration` prints it (`1h0m`, `59s`, `2d4h`), in milliseconds.
fn duration_ms(text: &str) -> u64 {
    let mut total = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let scale = match c {
            'd' => DAY_MS,
            'h' => HOUR_MS,
            'm' => 60_000,
            's' => 1_000,
            other => panic!("{other:?} in the duration {text:?}"),
        };
        total += number.parse::<u64>().expect("a number") * scale;
        number.clear();
    }
    total
}

/// A denial said `retry in 59m` when the engine's retry_after_ms was 59 minutes and some
/// seconds: the wait cut down to the minute, so a retry after the time it names is denied
/// again. The wait it names is at least the engine's.
#[test]
fn the_retry_a_denial_names_is_not_sooner_than_the_engines() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    // A time off the second, as a request's usually is: the wait is then no whole minute.
    let at_ms = now_ms() / 1_000 * 1_000 + 1;
    for _ in 0..5 {
        let output = consume(&workspace, at_ms, &[]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    }
    let json = consume(&workspace, at_ms, &["--json"]);
    assert_eq!(json.status.code(), Some(1), "{}", stderr_of(&json));
    let decision: Value = serde_json::from_slice(&json.stdout).expect("JSON");
    let retry_after_ms = decision["reason"]["retry_after_ms"]
        .as_u64()
        .expect("retry_after_ms");
    let text = stdout_of(&consume(&workspace, at_ms, &[]));
    let named = text
        .split_once("retry in ")
        .and_then(|(_, rest)| rest.split_once(' '))
        .map(|(duration, _)| duration_ms(duration))
        .unwrap_or_else(|| panic!("no retry in: {text}"));
    assert!(
        named >= retry_after_ms,
        "retry in {named} ms, sooner than the engine's {retry_after_ms} ms: {text}"
    );
}

/// `tally consume` said `charged to credits: 1,000 micro-credits (0.00 credits)` and `usage`
/// `11 micro-credits (0.00 credits) left`: the credits beside an exact figure of micro-credits
/// rounded to the cent, so a charge read as free, a balance as empty, and a 25,000 charge as
/// 0.03 credits. Beside the micro-credits, the credits are the same amount.
#[test]
fn the_credits_beside_micro_credits_are_the_same_amount() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    let at_ms = now_ms();
    let mut texts = Vec::new();
    for _ in 0..6 {
        texts.push(stdout_of(&consume(&workspace, at_ms, &[])));
    }
    texts.push(workspace.ok(&["usage", "tp-ada", "--at", &at_ms.to_string()]));
    let all = texts.concat();
    let pairs = micros_and_credits(&all);
    assert!(
        pairs.iter().any(|(micros, _)| micros % 10_000 != 0),
        "no figure off the cent: {all}"
    );
    for (micros, credits) in pairs {
        assert_eq!(Some(micros), credits, "{all}");
    }
}

/// Every file of the database's log and snapshots, by path, with its bytes (sled's own files
/// aside: sled may rewrite them whenever it opens).
fn log_and_snapshot_files(database: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    for folder in ["events", "snapshots"] {
        let Ok(entries) = std::fs::read_dir(database.join(folder)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("an entry").path();
            let bytes = std::fs::read(&path).expect("a readable file");
            files.insert(path, bytes);
        }
    }
    files
}

/// While a gateway holds the database, every command is refused with exit status 2, naming
/// `--db` and saying it is locked, and changes nothing: no event, no cursor, no snapshot, no
/// compaction, whether it would only read or change something.
#[test]
fn every_command_on_a_database_another_engine_holds_is_refused_naming_db_and_changes_nothing() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    workspace.ok(&["events", "--cursor", "billing", "--limit", "2"]);
    let policy = Policy::from_toml_str(POLICY).expect("the test policy");
    let gateway = Engine::open(
        workspace.database(),
        policy,
        Arc::new(SystemClock),
        OpenOptions::default(),
    )
    .expect("the gateway opens the database");
    let before = log_and_snapshot_files(&workspace.database());
    let commands: [&[&str]; 14] = [
        &["usage", "tp-ada"],
        &["events"],
        &["events", "--after", "1"],
        &["events", "--cursor", "billing"],
        &["events", "--cursor", "new-reader"],
        &["events", "--cursors"],
        &["events", "--delete-cursor", "billing"],
        &["consume", "tp-ada", "chat", "requests=1"],
        &["topup", "@ada", "5"],
        &["team", "acme"],
        &["compact"],
        &["verify"],
        &["revoke", "tp-ada"],
        &["policy", "policy.toml"],
    ];
    for args in commands {
        let output = workspace.bare(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}{}",
            stdout_of(&output),
            stderr_of(&output)
        );
        let stderr = stderr_of(&output);
        assert!(
            stderr.starts_with("tally: --db: ") && stderr.contains("is locked by another process"),
            "{args:?}: {stderr}"
        );
        assert_eq!(stdout_of(&output), "", "{args:?}");
    }
    assert!(
        log_and_snapshot_files(&workspace.database()) == before,
        "a refused command changed the log or the snapshots"
    );
    assert_eq!(
        gateway.cursors().expect("cursors"),
        vec![("billing".to_string(), 2)]
    );
    let events = gateway.events_after(0, 1_000).expect("events");
    drop(gateway);
    assert_eq!(workspace.events(&[]).len(), events.len());
    assert!(workspace.database().exists());
}

/// The commands that only read (`usage`, `events` without a cursor, `events --cursors`,
/// `verify`, and deleting a cursor that is not there) leave the log and the snapshots as they
/// were, byte for byte, and save no cursor.
#[test]
fn reading_commands_leave_the_log_and_the_snapshots_as_they_were() {
    let workspace = Workspace::new();
    set_up_ada(&workspace);
    assert_eq!(consume(&workspace, now_ms(), &[]).status.code(), Some(0));
    workspace.ok(&["compact"]);
    assert_eq!(consume(&workspace, now_ms(), &[]).status.code(), Some(0));
    let before = log_and_snapshot_files(&workspace.database());
    let reads: [&[&str]; 7] = [
        &["usage", "tp-ada"],
        &[
            "usage",
            "tp-ada",
            "--json",
            "--at",
            &(now_ms() + HOUR_MS).to_string(),
        ],
        &["events"],
        &["events", "--after", "3", "--limit", "1", "--json"],
        &["events", "--cursors"],
        &["events", "--delete-cursor", "nobody"],
        &["events", "--cursors", "--json"],
    ];
    for args in reads {
        workspace.ok(args);
    }
    workspace.verify(&[]);
    assert!(
        log_and_snapshot_files(&workspace.database()) == before,
        "a command that only reads changed the log or the snapshots"
    );
    let listed = workspace.ok(&["events", "--cursors", "--json"]);
    let listed: Value = serde_json::from_str(&listed).expect("JSON");
    assert_eq!(listed["cursors"], serde_json::json!([]), "{listed}");
}
