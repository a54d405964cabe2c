//! Reports and the event log: the usage report, the policy, billing export (events after a
//! cursor, named cursors), checkpoints, sync, compaction and verify; memory: what the keys
//! hold, and reclaiming the windows of idle ones. Larger answers are JSON
//! in a caller-owned buffer with the size-query convention (see `tally_last_error`).

use std::ffi::c_char;

use ::tally_engine::{Engine, Event};
use serde_json::{json, Map, Value};

use crate::checks::{
    text, write_text, Out, OutBuffer, TALLY_MAX_DOCUMENT_BYTES, TALLY_MAX_ID_BYTES,
};
use crate::decision::at;
use crate::handle::{tally_engine, try_ref};
use crate::options::{tally_options, verify_options};
use crate::panic::boundary;
use crate::status::{tally_status, Failure};

/// The most events one `tally_engine_events_after` returns.
pub const TALLY_MAX_EVENTS_PER_CALL: u32 = 65_536;
/// The most export cursors a database keeps (`tally_engine_save_cursor`).
pub const TALLY_MAX_CURSORS: u64 = 1_024;

const _: () = assert!(TALLY_MAX_CURSORS == ::tally_engine::log::MAX_CURSORS);

/// Writes the key's usage report as JSON into `buf`: `{"key", "kind": "plan" |
/// "pay_as_you_go", "revoked" (`tally_engine_revoke_key`: every request on the key is
/// denied), "user", "team", "plan": name or null, "at_ms", "limits": [{"name",
/// "meter", "window", "used", "amount", "remaining", "reset_at_ms": ms or null}],
/// "credits_balance_micros", "credits_charged_micros", "open_reservations",
/// "pay_as_you_go_micros"}`. Size query: `*needed` = the JSON's length + 1 (NUL); a NULL or
/// short `buf` answers `TALLY_BUFFER_TOO_SMALL` and copies nothing. The report can grow between
/// two calls: loop until `TALLY_OK`. An unknown key is `TALLY_UNKNOWN_KEY`.
#[no_mangle]
pub extern "C" fn tally_engine_usage(
    engine: *const tally_engine,
    key: *const c_char,
    key_len: usize,
    at_ms: u64,
    buf: *mut c_char,
    buf_len: usize,
    needed: *mut usize,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = OutBuffer::new(buf, buf_len, needed)?;
        let key = text("key", key, key_len, TALLY_MAX_ID_BYTES)?;
        let report = handle.with(|open| Ok(open.engine.usage(key, at(at_ms))?))?;
        write_text(&report.to_json().to_string(), out)
    })
}

/// Writes the current policy document as JSON into `buf` (size query as for usage), as the
/// database logs it: a rolling window under 210 s that named no bucket names the one it got
/// (e.g. `"bucket":"250ms"` on `rolling:1m`).
#[no_mangle]
pub extern "C" fn tally_engine_policy_json(
    engine: *const tally_engine,
    buf: *mut c_char,
    buf_len: usize,
    needed: *mut usize,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = OutBuffer::new(buf, buf_len, needed)?;
        let document = handle.with(|open| Ok(::tally_engine::policy_json(&open.policy)))?;
        write_text(&document, out)
    })
}

/// Rewrites a serde array of per-unit quantities (`[requests, characters, ...]`) as an object
/// of the non-zero ones, by unit name, wherever one appears.
fn name_quantities(value: &mut Value) {
    match value {
        Value::Object(object) => {
            for (field, inner) in object.iter_mut() {
                let is_quantities = matches!(
                    field.as_str(),
                    "quantities" | "estimate" | "actual" | "released"
                );
                match inner {
                    Value::Array(items) if is_quantities && items.len() == 7 => {
                        let named: Map<String, Value> = ::tally_engine::Unit::ALL
                            .iter()
                            .zip(items.iter())
                            .filter(|(_, amount)| amount.as_u64() != Some(0))
                            .map(|(unit, amount)| (unit.name().to_string(), amount.clone()))
                            .collect();
                        *inner = Value::Object(named);
                    }
                    _ => name_quantities(inner),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(name_quantities),
        _ => {}
    }
}

fn event_json(event: &Event, team: Option<String>) -> Value {
    let mut body = serde_json::to_value(&event.body).unwrap_or(Value::Null);
    // serde writes `{"VariantName": {fields}}`: keep the fields, named by `kind`.
    if let Value::Object(object) = &mut body {
        if object.len() == 1 {
            if let Some((_, inner)) = object.iter_mut().next() {
                body = inner.take();
            }
        }
    }
    name_quantities(&mut body);
    json!({
        "seq": event.seq,
        "at_ms": event.at_ms,
        "kind": event.body.kind(),
        "team": team,
        "body": body,
    })
}

/// Writes up to `limit` (1..=`TALLY_MAX_EVENTS_PER_CALL`) events with sequence numbers after
/// `after_seq` as a JSON array into `buf`, oldest first: `[{"seq", "at_ms", "kind":
/// "usage_admitted" | "credits_topped_up" | ..., "team", "body": {the event's fields;
/// quantities as {"unit": amount}}}]`; `[]` when there are none. `team` is the team the event
/// concerns (its key's, whose credits it draws on; a pay-as-you-go key's is its user's Default
/// Team), `null` for a policy swap and for a denial of a key unknown then: a reader that
/// started after compaction removed the event that made a key can still bill by team.
/// Sequence numbers start at 1 and have no gaps. Billing export: read after the saved cursor, process, then `tally_engine_save_cursor`
/// with the last `seq`. Size query as for usage (the events are read again on the second call).
/// After compaction the log starts later: `after_seq` 0 reads from the oldest event kept, and
/// any other `after_seq` older than that is `TALLY_INVALID_ARGUMENT` naming the events compacted
/// away (a cursor that fell behind the retention is told, never moved past them silently).
/// An `after_seq` past the last event is `TALLY_INVALID_ARGUMENT` too.
#[no_mangle]
pub extern "C" fn tally_engine_events_after(
    engine: *const tally_engine,
    after_seq: u64,
    limit: u32,
    buf: *mut c_char,
    buf_len: usize,
    needed: *mut usize,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = OutBuffer::new(buf, buf_len, needed)?;
        if limit == 0 || limit > TALLY_MAX_EVENTS_PER_CALL {
            return Err(Failure::new(
                tally_status::TALLY_INVALID_ARGUMENT,
                format!("limit: {limit}; between 1 and {TALLY_MAX_EVENTS_PER_CALL}"),
            ));
        }
        let array = handle.with(|open| {
            let events = open
                .engine
                .events_after(after_seq, limit as usize)
                .map_err(|error| Failure::naming(error, "after", "after_seq"))?;
            Ok(events
                .iter()
                .map(|event| event_json(event, open.engine.team_of_event(&event.body)))
                .collect::<Vec<Value>>())
        })?;
        write_text(&Value::Array(array).to_string(), out)
    })
}

/// An engine error of a cursor call: the engine calls the cursor's name `cursor` (a control
/// character in it, which the boundary's checks let through, is its error), the C argument is
/// `name`.
fn cursor_named(error: ::tally_engine::Error) -> Failure {
    Failure::naming(error, "cursor", "name")
}

/// Writes the named export cursor's sequence number (0 if never saved) to `*seq_out`.
#[no_mangle]
pub extern "C" fn tally_engine_cursor(
    engine: *const tally_engine,
    name: *const c_char,
    name_len: usize,
    seq_out: *mut u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = Out::new("seq_out", seq_out)?;
        let name = text("name", name, name_len, TALLY_MAX_ID_BYTES)?;
        out.set(handle.with(|open| open.engine.cursor(name).map_err(cursor_named))?);
        Ok(())
    })
}

/// Saves a named export cursor at `seq` (at most the last event's); it survives restarts.
///
/// Errors: `TALLY_CAPACITY_EXCEEDED` for a name not saved yet once `TALLY_MAX_CURSORS` are
/// (nothing is saved); an existing name is always saved.
#[no_mangle]
pub extern "C" fn tally_engine_save_cursor(
    engine: *const tally_engine,
    name: *const c_char,
    name_len: usize,
    seq: u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let name = text("name", name, name_len, TALLY_MAX_ID_BYTES)?;
        handle.with(|open| open.engine.save_cursor(name, seq).map_err(cursor_named))
    })
}

/// Deletes a named export cursor durably (a reader that is gone for good), freeing its place
/// under `TALLY_MAX_CURSORS`; writes whether it was saved to `*existed_out`. Reading it
/// afterwards gives 0, as for a name never saved.
#[no_mangle]
pub extern "C" fn tally_engine_delete_cursor(
    engine: *const tally_engine,
    name: *const c_char,
    name_len: usize,
    existed_out: *mut bool,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = Out::new("existed_out", existed_out)?;
        let name = text("name", name, name_len, TALLY_MAX_ID_BYTES)?;
        out.set(handle.with(|open| open.engine.delete_cursor(name).map_err(cursor_named))?);
        Ok(())
    })
}

/// Writes every saved export cursor as a JSON array into `buf`, by name (in byte order):
/// `[{"name", "after"}]`, `after` the sequence number the cursor is at; `[]` when none is.
/// At most `TALLY_MAX_CURSORS` entries: the readers holding the database's places, and how
/// far each has read. Size query as for usage.
#[no_mangle]
pub extern "C" fn tally_engine_cursors(
    engine: *const tally_engine,
    buf: *mut c_char,
    buf_len: usize,
    needed: *mut usize,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = OutBuffer::new(buf, buf_len, needed)?;
        let cursors = handle.with(|open| Ok(open.engine.cursors()?))?;
        let array = cursors
            .iter()
            .map(|(name, after)| json!({"name": name, "after": after}))
            .collect::<Vec<Value>>();
        write_text(&Value::Array(array).to_string(), out)
    })
}

/// Takes a checkpoint (a snapshot of the whole state, so opening replays only what follows);
/// writes the sequence number it covers to `*seq_out`.
#[no_mangle]
pub extern "C" fn tally_engine_checkpoint(
    engine: *const tally_engine,
    seq_out: *mut u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = Out::new("seq_out", seq_out)?;
        out.set(handle.with(|open| Ok(open.engine.checkpoint()?))?);
        Ok(())
    })
}

/// Makes everything logged so far durable, whatever the durability mode.
#[no_mangle]
pub extern "C" fn tally_engine_sync(engine: *const tally_engine) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        handle.with(|open| Ok(open.engine.sync()?))
    })
}

/// Checkpoints, then drops the events, before the snapshot before the latest, stamped more than
/// the policy's longest window plus the `retention_ms` option the engine was opened with (7
/// days by default) before `at_ms`, and logged at least `retention_ms` before it on the
/// engine's clock (a request delivered late stays that long after it was logged); writes how
/// many events were removed to `*removed_out`.
#[no_mangle]
pub extern "C" fn tally_engine_compact(
    engine: *const tally_engine,
    at_ms: u64,
    removed_out: *mut u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = Out::new("removed_out", removed_out)?;
        let report = handle.with(|open| Ok(open.engine.compact(at(at_ms))?))?;
        out.set(report.events_removed);
        Ok(())
    })
}

/// Checks the database in the directory `path`, which must not be open (`TALLY_DATABASE_LOCKED`
/// otherwise): every record decodes, sequence numbers have no gaps, the latest snapshot equals
/// a replay. Writes `*sound_out` and a JSON report into `buf`: `{"sound", "records", "events",
/// "first_seq", "last_seq", "snapshot_seq", "snapshot_matches_replay", "problems": [text],
/// "replayed_with_recorded_options", "torn_tail"}`. `torn_tail` is null, or says where the log
/// ends in a write a crash cut short (never acknowledged, so not a problem), which the next
/// open cuts off.
/// Size query as for usage; on `TALLY_BUFFER_TOO_SMALL` `*sound_out` is not written.
///
/// The replay must run with the options the database was opened with: the snapshot holds what
/// their bounds allow (keys, users, teams, request ids, open reservations), so a replay under
/// smaller ones may refuse or not equal it and a sound database is reported unsound (the
/// policy generations kept are compared on those the snapshot kept, whatever the bound). `options` NULL (the
/// usual choice) replays with the options the database recorded when its owner last opened
/// it, or the defaults if it recorded none (a database written before options were recorded).
/// Recorded options that do not decode or are out of range are one of the report's problems
/// (the database is unsound), and the replay then runs with the defaults.
/// Non-NULL `options` (`tally_options_new`) are used as given, recorded options only if
/// `tally_options_set_use_recorded` says so; they are read during the call only.
///
/// An option out of range is `TALLY_INVALID_ARGUMENT` (the last error names it), as for
/// `tally_engine_open`. A `path` that is a file, or a directory of other files, is
/// `TALLY_DATABASE_FOREIGN`; one where nothing is, `TALLY_STORAGE`.
#[no_mangle]
pub extern "C" fn tally_verify(
    path: *const c_char,
    path_len: usize,
    options: *const tally_options,
    sound_out: *mut bool,
    buf: *mut c_char,
    buf_len: usize,
    needed: *mut usize,
) -> tally_status {
    boundary(|| {
        let sound = Out::new("sound_out", sound_out)?;
        let out = OutBuffer::new(buf, buf_len, needed)?;
        let path = text("path", path, path_len, TALLY_MAX_DOCUMENT_BYTES)?;
        let directory = std::path::Path::new(path);
        if !directory.is_dir() {
            // A file is no database, as `tally_engine_open` answers; nothing there, storage.
            return Err(if directory.exists() {
                Failure::new(
                    tally_status::TALLY_DATABASE_FOREIGN,
                    format!("path: {path} is not a directory"),
                )
            } else {
                Failure::new(
                    tally_status::TALLY_STORAGE,
                    format!("path: no database at {path}: nothing is there"),
                )
            });
        }
        // The durability is the defaults' (no setter changes it): nothing is written.
        let report = Engine::verify(path, verify_options(options)?)?;
        let json = json!({
            "sound": report.is_sound(),
            "records": report.records,
            "events": report.events,
            "first_seq": report.first_seq,
            "last_seq": report.last_seq,
            "snapshot_seq": report.snapshot_seq,
            "snapshot_matches_replay": report.snapshot_matches_replay,
            "problems": report.problems,
            "replayed_with_recorded_options": report.replayed_with_recorded_options,
            "torn_tail": report.torn_tail,
        });
        write_text(&json.to_string(), out)?;
        sound.set(report.is_sound());
        Ok(())
    })
}

/// What the engine's keys hold in memory (`tally_engine_memory_stats`).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct tally_memory_stats {
    /// Keys of every kind.
    pub keys: u64,
    /// Keys holding window memory (they counted usage and were not reclaimed since).
    pub keys_with_usage: u64,
    /// Bytes of those windows.
    pub usage_bytes: u64,
    /// Bytes of the key table itself.
    pub table_bytes: u64,
}

/// What has gone wrong where no call's answer reports it, for a monitor: writes whether all
/// is well to `*healthy_out` and a JSON object into `buf`: `{"healthy", "log_failure",
/// "checkpoint_failure", "compaction_failure"}`, each failure a message or null.
/// `log_failure`: the log failed (in `TALLY_DURABILITY_INTERVAL` and `_NONE` modes its writer
/// may fail after the calls returned, and only the next call that logs is refused; `check`
/// and `usage` never are): every call that logs is refused until the database is reopened.
/// `checkpoint_failure`: the last periodic checkpoint could not store its snapshot, or its
/// thread could not start or panicked (an open replays more until one does; cleared by one
/// that stores). `compaction_failure`: the last
/// automatic compaction, run after each periodic checkpoint, failed (the segments it would
/// have removed stay; cleared by one that succeeds, or by `tally_engine_compact`). Size query
/// as for usage; on `TALLY_BUFFER_TOO_SMALL` `*healthy_out` is not written.
#[no_mangle]
pub extern "C" fn tally_engine_health(
    engine: *const tally_engine,
    healthy_out: *mut bool,
    buf: *mut c_char,
    buf_len: usize,
    needed: *mut usize,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let healthy = Out::new("healthy_out", healthy_out)?;
        let out = OutBuffer::new(buf, buf_len, needed)?;
        let health = handle.with(|open| Ok(open.engine.health()))?;
        let json = json!({
            "healthy": health.is_healthy(),
            "log_failure": health.log_failure,
            "checkpoint_failure": health.checkpoint_failure,
            "compaction_failure": health.compaction_failure,
        });
        write_text(&json.to_string(), out)?;
        healthy.set(health.is_healthy());
        Ok(())
    })
}

/// Writes what the engine's keys hold in memory to `*stats_out`.
#[no_mangle]
pub extern "C" fn tally_engine_memory_stats(
    engine: *const tally_engine,
    stats_out: *mut tally_memory_stats,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = Out::new("stats_out", stats_out)?;
        let stats = handle.with(|open| Ok(open.engine.memory_stats()))?;
        out.set(tally_memory_stats {
            keys: stats.keys,
            keys_with_usage: stats.keys_with_usage,
            usage_bytes: stats.usage_bytes,
            table_bytes: stats.table_bytes,
        });
        Ok(())
    })
}

/// Frees the window memory of every key with nothing counted in any window as of `at_ms` (or
/// now) and no open reservation, and writes how many keys it freed to `*reclaimed_out`. Their
/// next request starts from empty windows, exactly as if they had been kept (one stamped before
/// `at_ms` is counted at `at_ms`, so an emptied period is never used twice). The engine also
/// does this on its own, a bounded step at a time from the admission path, in a round every
/// 10 minutes of its clock; call this to free memory at once (for example before measuring it).
#[no_mangle]
pub extern "C" fn tally_engine_reclaim_idle(
    engine: *const tally_engine,
    at_ms: u64,
    reclaimed_out: *mut u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = Out::new("reclaimed_out", reclaimed_out)?;
        let reclaimed = handle.with(|open| Ok(open.engine.reclaim_idle(at(at_ms))?))?;
        out.set(reclaimed);
        Ok(())
    })
}
