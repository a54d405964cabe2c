package tally

/*
#include "tally.h"
*/
import "C"

import (
	"encoding/json"
	"runtime"
	"time"
	"unsafe"
)

// Usage is a key's usage report (the console's usage bars).
type Usage struct {
	Key                  string
	Kind                 string // "plan" or "pay_as_you_go"
	Revoked              bool   // RevokeKey: every request on the key is denied
	User                 string
	Team                 string
	Plan                 string // "" if the key has no seat
	At                   time.Time
	Limits               []UsageLimit
	CreditsBalanceMicros uint64
	CreditsChargedMicros uint64
	OpenReservations     uint64
	PayAsYouGoMicros     uint64
}

// UsageLimit is one limit of the key's plan.
type UsageLimit struct {
	Name      string // "m2.7:requests per rolling:5h"
	Meter     string
	Window    string // "rolling:5h", "daily", ...
	Used      uint64
	Amount    uint64
	Remaining uint64
	ResetAt   time.Time // zero if nothing is counted
}

type usageJSON struct {
	Key     string  `json:"key"`
	Kind    string  `json:"kind"`
	Revoked bool    `json:"revoked"`
	User    string  `json:"user"`
	Team    string  `json:"team"`
	Plan    *string `json:"plan"`
	AtMs    uint64  `json:"at_ms"`
	Limits  []struct {
		Name      string  `json:"name"`
		Meter     string  `json:"meter"`
		Window    string  `json:"window"`
		Used      uint64  `json:"used"`
		Amount    uint64  `json:"amount"`
		Remaining uint64  `json:"remaining"`
		ResetAtMs *uint64 `json:"reset_at_ms"`
	} `json:"limits"`
	CreditsBalanceMicros uint64 `json:"credits_balance_micros"`
	CreditsChargedMicros uint64 `json:"credits_charged_micros"`
	OpenReservations     uint64 `json:"open_reservations"`
	PayAsYouGoMicros     uint64 `json:"pay_as_you_go_micros"`
}

// Usage reports the key's usage at a time (zero: now). An unknown key is ErrUnknownKey.
func (e *Engine) Usage(key string, at time.Time) (Usage, error) {
	atMs, err := milliseconds("Usage", at)
	if err != nil {
		return Usage{}, err
	}
	keyText, keyLen := text(key)
	document, err := e.readText("Usage", func(handle *C.tally_engine, buf *C.char, bufLen C.size_t, needed *C.size_t) C.uint32_t {
		return C.tally_engine_usage(handle, keyText, keyLen, atMs, buf, bufLen, needed)
	})
	if err != nil {
		return Usage{}, err
	}
	var raw usageJSON
	if err := json.Unmarshal(document, &raw); err != nil {
		return Usage{}, newError("Usage", C.TALLY_PANIC, "the library's usage JSON did not parse: "+err.Error())
	}
	usage := Usage{Key: raw.Key, Kind: raw.Kind, Revoked: raw.Revoked, User: raw.User, Team: raw.Team,
		At: fromMilliseconds(raw.AtMs), CreditsBalanceMicros: raw.CreditsBalanceMicros,
		CreditsChargedMicros: raw.CreditsChargedMicros, OpenReservations: raw.OpenReservations,
		PayAsYouGoMicros: raw.PayAsYouGoMicros, Limits: make([]UsageLimit, len(raw.Limits))}
	if raw.Plan != nil {
		usage.Plan = *raw.Plan
	}
	for i, limit := range raw.Limits {
		usage.Limits[i] = UsageLimit{Name: limit.Name, Meter: limit.Meter, Window: limit.Window,
			Used: limit.Used, Amount: limit.Amount, Remaining: limit.Remaining}
		if limit.ResetAtMs != nil {
			usage.Limits[i].ResetAt = fromMilliseconds(*limit.ResetAtMs)
		}
	}
	return usage, nil
}

// PolicyJSON is the current policy document as JSON.
func (e *Engine) PolicyJSON() (string, error) {
	document, err := e.readText("PolicyJSON", func(handle *C.tally_engine, buf *C.char, bufLen C.size_t, needed *C.size_t) C.uint32_t {
		return C.tally_engine_policy_json(handle, buf, bufLen, needed)
	})
	return string(document), err
}

// Event is one event of the log, for billing export.
type Event struct {
	Seq  uint64 `json:"seq"`
	AtMs uint64 `json:"at_ms"`
	Kind string `json:"kind"` // "usage_admitted", "credits_topped_up", ...
	// Team is the team the event concerns (its key's, whose credits it draws on), "" for a
	// policy swap and for a denial of a key unknown then: billing by team needs no record of
	// the event that made the key.
	Team string          `json:"team"`
	Body json.RawMessage `json:"body"` // the event's fields; quantities as {"unit": amount}
}

// At is the event's time.
func (event Event) At() time.Time { return fromMilliseconds(event.AtMs) }

// EventsAfter returns up to limit (1 to MaxEventsPerCall) events after sequence number
// afterSeq, oldest first. Read after a saved cursor, process, then SaveCursor the last Seq.
// After compaction, 0 reads from the oldest event kept; an older afterSeq is ErrInvalidArgument
// naming the events compacted away (a cursor that fell behind the retention is told, never
// moved past them silently). An afterSeq past the last event is ErrInvalidArgument too (a
// reader polling from there would skip the events that later take those numbers).
func (e *Engine) EventsAfter(afterSeq uint64, limit uint32) ([]Event, error) {
	document, err := e.readText("EventsAfter", func(handle *C.tally_engine, buf *C.char, bufLen C.size_t, needed *C.size_t) C.uint32_t {
		return C.tally_engine_events_after(handle, C.uint64_t(afterSeq), C.uint32_t(limit), buf, bufLen, needed)
	})
	if err != nil {
		return nil, err
	}
	var events []Event
	if err := json.Unmarshal(document, &events); err != nil {
		return nil, newError("EventsAfter", C.TALLY_PANIC, "the library's events JSON did not parse: "+err.Error())
	}
	return events, nil
}

// Cursor is the named export cursor's sequence number (0 if never saved).
func (e *Engine) Cursor(name string) (uint64, error) {
	nameText, nameLen := text(name)
	var seq C.uint64_t
	err := e.call("Cursor", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_cursor(handle, nameText, nameLen, &seq)
	})
	return uint64(seq), err
}

// SaveCursor saves a named export cursor at seq (at most the last event's). A name not saved
// yet is refused with ErrCapacityExceeded once MaxCursors are; an existing one always saves.
func (e *Engine) SaveCursor(name string, seq uint64) error {
	nameText, nameLen := text(name)
	return e.call("SaveCursor", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_save_cursor(handle, nameText, nameLen, C.uint64_t(seq))
	})
}

// SavedCursor is one saved export cursor: its name and the sequence number it is after.
type SavedCursor struct {
	Name  string `json:"name"`
	After uint64 `json:"after"`
}

// Cursors lists every saved export cursor, by name (in the names' byte order): the readers
// holding the database's places under MaxCursors, and how far each has read.
func (e *Engine) Cursors() ([]SavedCursor, error) {
	document, err := e.readText("Cursors", func(handle *C.tally_engine, buf *C.char, bufLen C.size_t, needed *C.size_t) C.uint32_t {
		return C.tally_engine_cursors(handle, buf, bufLen, needed)
	})
	if err != nil {
		return nil, err
	}
	cursors := []SavedCursor{}
	if err := json.Unmarshal(document, &cursors); err != nil {
		return nil, newError("Cursors", C.TALLY_PANIC, "the library's cursors JSON did not parse: "+err.Error())
	}
	return cursors, nil
}

// DeleteCursor deletes a named export cursor (a reader that is gone for good), freeing its
// place under MaxCursors, and says whether it was saved. Reading it afterwards gives 0.
func (e *Engine) DeleteCursor(name string) (bool, error) {
	nameText, nameLen := text(name)
	var existed C.bool
	err := e.call("DeleteCursor", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_delete_cursor(handle, nameText, nameLen, &existed)
	})
	return bool(existed), err
}

// Checkpoint snapshots the whole state and returns the sequence number it covers.
func (e *Engine) Checkpoint() (uint64, error) {
	var seq C.uint64_t
	err := e.call("Checkpoint", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_checkpoint(handle, &seq)
	})
	return uint64(seq), err
}

// Sync makes everything logged so far durable, whatever the durability mode.
func (e *Engine) Sync() error {
	return e.call("Sync", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_sync(handle)
	})
}

// Compact checkpoints, then drops the events stamped more than the policy's longest window
// plus the Retention option (7 days by default) before at and logged at least Retention
// before it on the engine's clock (a request delivered late stays that long after it was
// logged), before the snapshot before the latest, returning how many it removed.
func (e *Engine) Compact(at time.Time) (uint64, error) {
	atMs, err := milliseconds("Compact", at)
	if err != nil {
		return 0, err
	}
	var removed C.uint64_t
	err = e.call("Compact", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_compact(handle, atMs, &removed)
	})
	return uint64(removed), err
}

// MemoryStats is what the engine's keys hold in memory.
type MemoryStats struct {
	Keys          uint64 // keys of every kind
	KeysWithUsage uint64 // keys holding window memory (they counted usage, not reclaimed since)
	UsageBytes    uint64 // bytes of those windows
	TableBytes    uint64 // bytes of the key table itself
}

// MemoryStats reports what the engine's keys hold in memory.
func (e *Engine) MemoryStats() (MemoryStats, error) {
	var out C.tally_memory_stats
	err := e.call("MemoryStats", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_memory_stats(handle, &out)
	})
	if err != nil {
		return MemoryStats{}, err
	}
	return MemoryStats{Keys: uint64(out.keys), KeysWithUsage: uint64(out.keys_with_usage),
		UsageBytes: uint64(out.usage_bytes), TableBytes: uint64(out.table_bytes)}, nil
}

// Health is what has gone wrong where no call's answer reports it, each a message or "".
// For a monitor: Check and Usage never learn of them.
type Health struct {
	// The log failed (with DurabilityInterval or DurabilityNone its writer may fail after the
	// calls returned): every call that logs fails until the database is reopened.
	LogFailure string `json:"log_failure"`
	// The last periodic checkpoint could not store its snapshot, or its thread could not
	// start or panicked (cleared by one that stores).
	CheckpointFailure string `json:"checkpoint_failure"`
	// The last automatic compaction failed (cleared by one that succeeds, or by Compact).
	CompactionFailure string `json:"compaction_failure"`
}

// Healthy says whether nothing went wrong.
func (h Health) Healthy() bool {
	return h.LogFailure == "" && h.CheckpointFailure == "" && h.CompactionFailure == ""
}

// Health reports what has gone wrong where no call's answer reports it: the log's failure,
// the last periodic checkpoint's and the last automatic compaction's.
func (e *Engine) Health() (Health, error) {
	document, err := e.readText("Health", func(handle *C.tally_engine, buf *C.char, bufLen C.size_t, needed *C.size_t) C.uint32_t {
		var healthy C.bool
		return C.tally_engine_health(handle, &healthy, buf, bufLen, needed)
	})
	if err != nil {
		return Health{}, err
	}
	var health Health
	if err := json.Unmarshal(document, &health); err != nil {
		return Health{}, newError("Health", C.TALLY_PANIC, "the library's health JSON did not parse: "+err.Error())
	}
	return health, nil
}

// ReclaimIdle frees the window memory of every key with nothing counted in any window as of
// at (zero: now) and no open reservation, returning how many keys it freed. Their next
// request starts from empty windows, exactly as if they had been kept. The engine also does
// this on its own, a bounded step at a time from the admission path, in a round every 10
// minutes of its clock; call this to free memory at once (for example before measuring it).
func (e *Engine) ReclaimIdle(at time.Time) (uint64, error) {
	atMs, err := milliseconds("ReclaimIdle", at)
	if err != nil {
		return 0, err
	}
	var reclaimed C.uint64_t
	err = e.call("ReclaimIdle", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_reclaim_idle(handle, atMs, &reclaimed)
	})
	return uint64(reclaimed), err
}

// VerifyReport is what Verify found in a database.
type VerifyReport struct {
	Sound                 bool     `json:"sound"`
	Records               uint64   `json:"records"`
	Events                uint64   `json:"events"`
	FirstSeq              *uint64  `json:"first_seq"`
	LastSeq               *uint64  `json:"last_seq"`
	SnapshotSeq           *uint64  `json:"snapshot_seq"`
	SnapshotMatchesReplay *bool    `json:"snapshot_matches_replay"`
	Problems              []string `json:"problems"`
	// Whether the replay ran with the options the database's owner recorded.
	ReplayedWithRecordedOptions bool `json:"replayed_with_recorded_options"`
	// Where the log ends in a write a crash cut short (never acknowledged, so not a
	// problem), which the next open cuts off; "" if it does not.
	TornTail string `json:"torn_tail"`
}

// Verify checks the database in the directory path, which must not be open
// (ErrDatabaseLocked): every record decodes, sequence numbers have no gaps, the latest
// snapshot equals a replay.
//
// The replay must run with the options the database was opened with: the snapshot holds
// what their bounds allow (keys, users, teams, request ids, open reservations), so a replay
// under smaller ones may refuse or not match it and a sound database is reported unsound (the
// policy generations kept are compared on those the snapshot kept, whatever the bound). Without WithOptions
// (the usual choice) it runs with those the database recorded when its owner last opened
// it (the defaults if it recorded none); options given WithOptions are used as given (the zero
// Options: the defaults; UseRecorded: the recorded ones where there are any). Bad options
// fail with ErrInvalidArgument, as for Open. The other options (policy, durability) are not
// used.
func Verify(path string, opts ...Option) (VerifyReport, error) {
	o := collect(opts)
	settings, err := o.setters("Verify")
	if err != nil {
		return VerifyReport{}, err
	}
	pathText, pathLen := text(path)
	var sound C.bool
	// Each attempt runs on one locked OS thread (readText's withThread) and makes and frees
	// its own tally_options, so a refused value's message is the attempt's error.
	document, err := readText("Verify", func(buf *C.char, bufLen C.size_t, needed *C.size_t) C.uint32_t {
		native, status := nativeOptions(settings)
		if status != C.TALLY_OK {
			return status
		}
		defer C.tally_options_free(native)
		return C.tally_verify(pathText, pathLen, native, &sound, buf, bufLen, needed)
	})
	if err != nil {
		return VerifyReport{}, err
	}
	var report VerifyReport
	if err := json.Unmarshal(document, &report); err != nil {
		return VerifyReport{}, newError("Verify", C.TALLY_PANIC, "the library's verify JSON did not parse: "+err.Error())
	}
	report.Sound = bool(sound)
	return report, nil
}

type textCall func(buf *C.char, bufLen C.size_t, needed *C.size_t) C.uint32_t

// readText runs a size-query call: first into a small buffer, then again with the size the
// library asked for. A report can grow between two calls, so it loops, a bounded number of
// times. Returns the text without its NUL.
func readText(op string, f textCall) ([]byte, error) {
	const attempts = 8
	buffer := make([]byte, 4096)
	for attempt := 0; ; attempt++ {
		var needed C.size_t
		err := withThread(op, func() C.uint32_t {
			return f((*C.char)(unsafe.Pointer(&buffer[0])), C.size_t(len(buffer)), &needed)
		})
		if err == nil {
			if needed == 0 || int(needed) > len(buffer) {
				return nil, newError(op, C.TALLY_PANIC, "the library reported an impossible size")
			}
			return buffer[:needed-1], nil
		}
		if StatusOf(err) != C.TALLY_BUFFER_TOO_SMALL || attempt+1 == attempts {
			return nil, err
		}
		buffer = make([]byte, needed+needed/4)
	}
}

func (e *Engine) readText(op string, f func(*C.tally_engine, *C.char, C.size_t, *C.size_t) C.uint32_t) ([]byte, error) {
	if e.handle == nil {
		return nil, e.notOpened(op)
	}
	document, err := readText(op, func(buf *C.char, bufLen C.size_t, needed *C.size_t) C.uint32_t {
		return f(e.handle, buf, bufLen, needed)
	})
	runtime.KeepAlive(e)
	return document, err
}
