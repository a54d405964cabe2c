//! Where the `tally` commands keep their data: a database directory (log segments, snapshots and
//! a small sled store, through `Engine::open`), how durable its writes are, and the checks before
//! a command opens, creates or wipes one, so a mistyped path never turns into a new empty
//! database or a deleted folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tally_engine::log::{holds_only_database_entries, holds_sled_files, lost_sled_files};
use tally_engine::{Clock, Durability, Engine, EngineOptions, Error, OpenOptions, Policy};

/// The operator commands' database, in the working directory.
pub const DEFAULT_DB: &str = "tally-data";
/// `tally simulate`'s own database, wiped at the start of each run (unless `--keep`).
pub const DEFAULT_SIMULATE_DB: &str = "tally-data-simulate";
/// For a database that recorded no options (one the operator commands made): the engine takes
/// a checkpoint once this many events were logged since the last one, and on opening when more
/// than half of this is left to replay, so a command replays about this many events before it
/// can answer, and about twice this many at most (a checkpoint whose work took 10 ms or more
/// holds the next back until the tail is twice the interval at most:
/// `OpenOptions::checkpoint_every_events`). A database that recorded options runs with its
/// owner's interval (a gateway's default is 1,000,000 events, about a quarter of a second to
/// replay, and up to twice that).
pub const CHECKPOINT_EVERY_EVENTS: u64 = 20_000;
/// `Durability::Interval` bounds, as the engine checks them.
pub const MIN_INTERVAL_MS: u64 = 1;
pub const MAX_INTERVAL_MS: u64 = tally_engine::log::MAX_FLUSH_INTERVAL_MS;

/// `sync`, `none` or `interval:MS`.
pub fn parse_durability(value: &str) -> Result<Durability, String> {
    match value {
        "sync" => Ok(Durability::Sync),
        "none" => Ok(Durability::None),
        _ => {
            let Some(ms) = value.strip_prefix("interval:") else {
                return Err(format!(
                    "{value:?} is not a durability; use sync, interval:MS or none"
                ));
            };
            // Read as every other number on the command line is: digits, grouped in threes or
            // not (`1,000`), no sign.
            crate::cli::parse_count(
                "--durability",
                ms,
                MIN_INTERVAL_MS,
                MAX_INTERVAL_MS,
                crate::cli::HelpTopic::Main,
            )
            .map(|ms| Durability::Interval { ms })
            .map_err(|_| {
                format!(
                    "{value:?}: the interval is whole milliseconds, {MIN_INTERVAL_MS} to {}",
                    crate::format::grouped(MAX_INTERVAL_MS)
                )
            })
        }
    }
}

/// The spelling `parse_durability` reads.
pub fn durability_words(durability: Durability) -> String {
    match durability {
        Durability::Sync => "sync".into(),
        Durability::Interval { ms } => format!("interval:{ms}"),
        Durability::None => "none".into(),
    }
}

/// Whether `path` is a directory sled has written: its `db` and `conf` files both in it. Either
/// name alone is not enough: a project folder with a `db` directory, or a folder of the
/// operator's files with a `conf` in it, was taken for a database, opened, and written into
/// (sled overwrote that `conf` with its own).
pub fn is_database(path: &Path) -> bool {
    path.is_dir() && holds_sled_files(path)
}

/// Whether `path` is missing or an empty directory: a database may be created there. A
/// symbolic link whose target is missing is not missing: it is the operator's.
fn is_vacant(path: &Path) -> bool {
    match std::fs::read_dir(path) {
        Ok(mut entries) => entries.next().is_none(),
        Err(_) => std::fs::symlink_metadata(path).is_err(),
    }
}

/// The first missing directory of `path` that a `..` follows (`x` of `x/../data`), if any:
/// opening would make `x` and then put the database beside it, where a failed command's
/// clean-up (which removes what the path says it made) would not find it.
fn missing_before_parent(path: &Path) -> Option<PathBuf> {
    let mut walked = PathBuf::new();
    for component in path.components() {
        if component == std::path::Component::ParentDir
            && !walked.as_os_str().is_empty()
            && std::fs::symlink_metadata(&walked).is_err()
        {
            return Some(walked);
        }
        walked.push(component);
    }
    None
}

/// The symbolic link at `path` or at the nearest of its ancestors that is there at all, if its
/// target does not exist, and that target: no database can be made through it (the open
/// fails, "File exists"), and it is the operator's, never to be removed as one the command
/// made.
fn dangling_link(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let nearest = path
        .ancestors()
        .filter(|ancestor| !ancestor.as_os_str().is_empty())
        .find(|ancestor| std::fs::symlink_metadata(ancestor).is_ok())?;
    let is_link =
        std::fs::symlink_metadata(nearest).is_ok_and(|meta| meta.file_type().is_symlink());
    if !is_link || nearest.exists() {
        return None;
    }
    let target = std::fs::read_link(nearest).unwrap_or_default();
    Some((nearest.to_path_buf(), target))
}

/// The file `tally simulate` leaves in a database it made. Only such a database is wiped or
/// added to by a later run: `--db` pointing at a gateway's database (or the operator commands'
/// `tally-data`) must neither delete it nor fill it with simulated users.
pub const SIMULATE_MARK: &str = "made-by-tally-simulate";

/// Marks the database at `path` (just opened by `simulate`) as one `simulate` made, durably
/// (the file and the directory entry are fsynced: a finished run's database stays wipeable
/// after a power loss).
pub fn mark_simulated(path: &Path) -> Result<(), String> {
    let fail =
        |error: std::io::Error| format!("cannot mark {} as simulate's: {error}", path.display());
    let mut mark = std::fs::File::create(path.join(SIMULATE_MARK)).map_err(fail)?;
    std::io::Write::write_all(
        &mut mark,
        b"This tally database was made by `tally simulate`: a later run may wipe it.\n",
    )
    .map_err(fail)?;
    mark.sync_all().map_err(fail)?;
    std::fs::File::open(path)
        .and_then(|directory| directory.sync_all())
        .map_err(fail)
}

/// Whether `path` is missing, empty, or a database `simulate` made: what a run may wipe or
/// (with `--keep`) add to. Otherwise says why not.
pub fn check_simulate_may_use(path: &Path) -> Result<(), String> {
    if is_vacant(path) {
        return Ok(());
    }
    if !is_database(path) {
        return Err(format!(
            "{} exists and is not a tally database; choose another path",
            path.display()
        ));
    }
    if !path.join(SIMULATE_MARK).is_file() {
        return Err(format!(
            "{} is a tally database that `tally simulate` did not make (no {SIMULATE_MARK} file \
             in it): it is neither wiped nor added to. Give --db another path, or, if it is \
             only an old simulation (made by a build before the mark, or a run killed while \
             it opened), remove it yourself",
            path.display()
        ));
    }
    Ok(())
}

/// Removes the database at `path` so a run starts from nothing. Refuses anything that is not a
/// database `simulate` made (a typo must not delete a folder of someone's files, nor a
/// gateway's database).
/// A database open in another process (a run still going) is refused too: removing its files
/// under it would leave that run writing into a directory that is gone, or into the next
/// run's. Returns whether there was a database to wipe.
pub fn wipe(path: &Path) -> Result<bool, String> {
    check_simulate_may_use(path)?;
    if is_vacant(path) {
        return Ok(false);
    }
    // Reading the recorded options takes the database's lock for a moment: the check.
    if let Err(Error::Storage { problem }) = Engine::recorded_options(path) {
        if problem.contains("is locked") {
            return Err(format!(
                "{} is open in another process (a run still going?): not wiped; wait for it, \
                 or give --db another path",
                path.display()
            ));
        }
    }
    std::fs::remove_dir_all(path)
        .map(|()| true)
        .map_err(|error| format!("cannot remove the old database {}: {error}", path.display()))
}

/// What was at a path before a command that may create a database there ran: so that, should
/// it fail, it removes what it made and nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Before {
    /// The path was an empty directory (the operator's, perhaps a mount point or one with its
    /// own permissions): left in place, emptied.
    EmptyDirectory,
    /// Nothing was there: the highest directory the open will make on the way (the path
    /// itself, or a missing parent of it), removed whole.
    Missing(PathBuf),
}

impl Before {
    /// What is at `path` now; `path` is vacant (missing or an empty directory).
    pub fn look(path: &Path) -> Before {
        if path.is_dir() {
            return Before::EmptyDirectory;
        }
        let highest_missing = path
            .ancestors()
            // Nothing there at all: a dangling symbolic link is there, the operator's.
            .take_while(|ancestor| {
                !ancestor.as_os_str().is_empty() && std::fs::symlink_metadata(ancestor).is_err()
            })
            .last()
            .unwrap_or(path);
        Before::Missing(highest_missing.to_path_buf())
    }
}

/// Removes the database a command made at `path` for a change that then failed with
/// `failure`, and whatever directories it made for it, leaving what was there `before`.
/// Nothing is removed when the failure says the path is another's: another command that
/// found it vacant at the same moment made the database there first (this one found it
/// locked, or holding files it did not make), and holds it open with changes acknowledged.
pub fn remove_made_database(path: &Path, before: &Before, failure: &Error) {
    if made_by_another(failure) {
        return;
    }
    match before {
        Before::Missing(highest) => {
            let _ = std::fs::remove_dir_all(highest);
        }
        Before::EmptyDirectory => {
            let Ok(entries) = std::fs::read_dir(path) else {
                return;
            };
            for entry in entries.flatten() {
                let entry_path = entry.path();
                let _ = match entry.file_type() {
                    Ok(kind) if kind.is_dir() => std::fs::remove_dir_all(&entry_path),
                    _ => std::fs::remove_file(&entry_path),
                };
            }
        }
    }
}

/// Whether an open's error says another command has the database (the engine's words, as
/// `wipe` reads them): sled's lock is held, or the directory holds files that were not there
/// when this command found it vacant.
fn made_by_another(failure: &Error) -> bool {
    let Error::Storage { problem } = failure else {
        return false;
    };
    [
        "is locked by another process",
        "holds files that are not a tally database",
    ]
    .iter()
    .any(|phrase| problem.contains(phrase))
}

/// Checks that `path` may be opened: an existing database, or (when `create` is true) a path
/// that is missing, an empty directory, or a database whose creation was cut short. Returns
/// whether the database is new.
pub fn check_openable(path: &Path, create: bool) -> Result<bool, String> {
    if let Some(missing) = missing_before_parent(path) {
        return Err(format!(
            "{}: {} does not exist, so the `..` after it leads nowhere yet (making it would \
             put the database elsewhere); give the path without it",
            path.display(),
            missing.display()
        ));
    }
    if let Some((link, target)) = dangling_link(path) {
        return Err(format!(
            "{} is a symbolic link to {}, which does not exist: make that directory, or give \
             --db another path",
            link.display(),
            target.display()
        ));
    }
    if is_database(path) {
        return Ok(false);
    }
    // A database that lost sled's files is neither none nor one cut short: created over, a
    // refused command removed its log as what it had made.
    if let Some(problem) = lost_sled_files(path) {
        return Err(format!("{} {problem}", path.display()));
    }
    // A database whose creation was cut short (nothing but what a database holds, sled's
    // `db` or `conf` missing) holds nothing yet: made anew, as `Engine::open` makes it.
    if !is_vacant(path) && !holds_only_database_entries(path) {
        return Err(format!(
            "{} exists and is not a tally database",
            path.display()
        ));
    }
    if create {
        Ok(true)
    } else {
        Err(format!(
            "no database at {}; create one with `tally user` or `tally team` (or give --db)",
            path.display()
        ))
    }
}

/// Opens (or creates) a database the program owns (`simulate`'s, the crash test's child's):
/// `policy` is swapped in if it differs from the stored one, and the defaults with
/// `checkpoint_every_events` are what it runs with and records.
pub fn open(
    path: &Path,
    policy: Policy,
    clock: Arc<dyn Clock>,
    durability: Durability,
    checkpoint_every_events: u64,
) -> Result<Engine, Error> {
    let options = OpenOptions {
        durability,
        engine: EngineOptions::default(),
        checkpoint_every_events,
        ..OpenOptions::default()
    };
    Engine::open(path, policy, clock, options)
}

/// Whether the database `simulate` made at `path` already holds a run's accounts (so a
/// `--keep` run would be refused), looked at with its own policy: the run's `--policy` is
/// swapped in only once the run is known to go ahead, so a refused run logs nothing.
pub fn holds_simulation(
    path: &Path,
    clock: Arc<dyn Clock>,
    durability: Durability,
    checkpoint_every_events: u64,
) -> Result<bool, Error> {
    let options = OpenOptions {
        durability,
        engine: EngineOptions::default(),
        checkpoint_every_events,
        ..OpenOptions::default()
    };
    let engine = Engine::open_with_stored_policy(path, Policy::token_plan(), clock, options)?;
    let holds = crate::scenario::already_built(&engine);
    engine.close()?;
    Ok(holds)
}

/// Opens (or creates) the database as a tool, for the operator commands: with the options it
/// recorded (a gateway's request-id horizon, retention and bounds; for a database that recorded
/// none, the defaults with `CHECKPOINT_EVERY_EVENTS`), recording nothing, and with the policy it
/// runs; a new database starts with `policy` (`None`: the shipped one).
pub fn open_as_recorded(
    path: &Path,
    policy: Option<Policy>,
    clock: Arc<dyn Clock>,
    durability: Durability,
) -> Result<Engine, Error> {
    let options = OpenOptions {
        durability,
        engine: EngineOptions::default(),
        checkpoint_every_events: CHECKPOINT_EVERY_EVENTS,
        use_recorded: true,
        ..OpenOptions::default()
    };
    let new_database_policy = policy.unwrap_or_else(Policy::token_plan);
    Engine::open_with_stored_policy(path, new_database_policy, clock, options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durabilities_are_read_in_the_spelling_they_are_written() {
        for durability in [
            Durability::Sync,
            Durability::None,
            Durability::Interval { ms: 1 },
            Durability::Interval { ms: 60_000 },
        ] {
            assert_eq!(
                parse_durability(&durability_words(durability)),
                Ok(durability)
            );
        }
    }

    #[test]
    fn a_bad_durability_says_what_is_accepted() {
        for value in [
            "",
            "Sync",
            "interval",
            "interval:",
            "interval:0",
            "interval:60001",
        ] {
            let problem = parse_durability(value).expect_err(value);
            assert!(
                problem.contains("interval") && problem.contains(&format!("{value:?}")),
                "{value:?}: {problem}"
            );
        }
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("tally-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        path
    }

    #[test]
    fn only_a_database_or_nothing_is_wiped() {
        let folder = scratch("folder");
        std::fs::create_dir_all(&folder).expect("created");
        std::fs::write(folder.join("notes.txt"), "keep me").expect("written");
        assert!(wipe(&folder).is_err());
        assert!(folder.join("notes.txt").exists());
        assert!(check_openable(&folder, true).is_err());
        std::fs::remove_dir_all(&folder).expect("removed");

        let database = scratch("database");
        std::fs::create_dir_all(&database).expect("created");
        std::fs::write(database.join("conf"), "").expect("written");
        std::fs::write(database.join("db"), "").expect("written");
        assert_eq!(check_openable(&database, false), Ok(false));
        let problem = wipe(&database).expect_err("not simulate's");
        assert!(problem.contains("did not make"), "{problem}");
        assert!(database.join("conf").exists(), "left as it was");
        mark_simulated(&database).expect("marked");
        assert!(wipe(&database).expect("a database simulate made is wiped"));
        assert!(!database.exists());
        assert_eq!(wipe(&database), Ok(false), "nothing to wipe is fine");
    }

    #[test]
    fn a_database_simulate_made_is_not_wiped_while_it_is_open() {
        let path = scratch("open");
        let engine = open(
            &path,
            Policy::token_plan(),
            Arc::new(tally_engine::ManualClock::new(1_790_000_000_000)),
            Durability::None,
            CHECKPOINT_EVERY_EVENTS,
        )
        .expect("opened");
        mark_simulated(&path).expect("marked");
        let problem = wipe(&path).expect_err("open elsewhere");
        assert!(problem.contains("is open in another process"), "{problem}");
        assert!(path.join("db").exists() && path.join(SIMULATE_MARK).exists());
        engine.close().expect("closed");
        wipe(&path).expect("closed: wiped");
        assert!(!path.exists());
    }

    #[test]
    fn an_open_that_finds_the_database_held_by_another_removes_nothing() {
        // Two commands started at once on a new path both find it vacant; the one that then
        // finds the database locked must leave it to the other, which holds it open and has
        // acknowledged changes, not remove it as a database of its own that failed to open.
        let path = scratch("held");
        let before = Before::look(&path);
        let clock = Arc::new(tally_engine::ManualClock::new(1_790_000_000_000));
        let holder = open(
            &path,
            Policy::token_plan(),
            clock.clone(),
            Durability::Sync,
            CHECKPOINT_EVERY_EVENTS,
        )
        .expect("opened");
        holder
            .create_user("ada", "tp-ada", None)
            .expect("acknowledged");
        let Err(refused) = open(
            &path,
            Policy::token_plan(),
            clock.clone(),
            Durability::Sync,
            CHECKPOINT_EVERY_EVENTS,
        ) else {
            panic!("a database open elsewhere is refused");
        };
        remove_made_database(&path, &before, &refused);
        holder
            .create_user("bo", "tp-bo", None)
            .expect("acknowledged");
        holder.close().expect("closed");
        let reopened = open(
            &path,
            Policy::token_plan(),
            clock,
            Durability::Sync,
            CHECKPOINT_EVERY_EVENTS,
        )
        .expect("reopened");
        for key in ["tp-ada", "tp-bo"] {
            let usage = reopened.usage(key, None);
            assert!(usage.is_ok(), "{key}: {usage:?} ({refused})");
        }
        reopened.close().expect("closed");
        let _ = std::fs::remove_dir_all(&path);
    }

    #[test]
    fn an_open_that_finds_files_it_did_not_make_removes_nothing() {
        // Found empty, then another command's files appeared before the open.
        let path = scratch("appeared");
        std::fs::create_dir_all(&path).expect("created");
        let before = Before::look(&path);
        std::fs::write(path.join("notes.txt"), "keep me").expect("written");
        let Err(refused) = open(
            &path,
            Policy::token_plan(),
            Arc::new(tally_engine::ManualClock::new(1_790_000_000_000)),
            Durability::None,
            CHECKPOINT_EVERY_EVENTS,
        ) else {
            panic!("a folder of other files is refused");
        };
        remove_made_database(&path, &before, &refused);
        assert!(path.join("notes.txt").is_file(), "{refused}");
        std::fs::remove_dir_all(&path).expect("removed");
    }

    #[test]
    fn a_missing_database_is_created_only_when_asked() {
        let missing = scratch("missing");
        assert_eq!(check_openable(&missing, true), Ok(true));
        let problem = check_openable(&missing, false).expect_err("not created");
        assert!(problem.contains("no database"), "{problem}");
    }
}
