// Package tally is the Go binding of tally, an embedded quota-accounting engine, over its C
// ABI (ffi/include/tally.h). It uses only the standard library and cgo.
//
// An Engine is safe to use from many goroutines at once. Close it when done; a finalizer frees
// (and closes) an engine that is dropped without Close, but finalizers do not run when the
// program exits: exiting without Close is a crash to the database, which with
// DurabilityInterval or DurabilityNone loses what a crash loses. Every failed call returns an
// *Error that wraps one sentinel per status (errors.Is(err, tally.ErrClosed)) and carries the
// library's detail message; a status newer than this package wraps none (StatusOf gives its
// number). A denial is not an error: it is a Decision with Admitted false.
//
// Time: tally counts whole milliseconds since the Unix epoch. A time.Time argument (Request.At,
// `at`, Options.ManualClock) is passed floored to its millisecond, its fraction dropped, as
// time.Time.UnixMilli does: the usage counts in the millisecond the time falls in (a time in
// the epoch's first millisecond, which would floor to 0, the library's "now", is refused). A
// time.Duration (a lease, Options' durations, DurabilityInterval) must be whole
// milliseconds, else ErrInvalidArgument naming it: rounded, 1.5 ms would be another
// duration, and 0.5 ms would be 0, the default.
//
// Linking: the package links libtally statically from the repository's cargo target
// directory (../../target/release, built by `cargo build -p tally-ffi --release`). With
// another CARGO_TARGET_DIR, point the linker at it:
//
//	CGO_LDFLAGS="-L$CARGO_TARGET_DIR/release" go test ./...
package tally

/*
#cgo CFLAGS: -I${SRCDIR}/../include
#cgo LDFLAGS: -L${SRCDIR}/../../target/release
#cgo linux LDFLAGS: -Wl,-Bstatic -ltally -Wl,-Bdynamic -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
#cgo darwin LDFLAGS: -ltally -Wl,-rpath,${SRCDIR}/../../target/release -framework CoreFoundation -framework Security -liconv -lc -lm
#include <stdlib.h>
#include "tally.h"

// A non-NULL empty string: Go's "" for a required string must reach the library as an empty
// string (TALLY_EMPTY_STRING), not as NULL.
static const char tally_go_empty_text[1] = "";
static const char *tally_go_empty(void) { return tally_go_empty_text; }
*/
import "C"

import (
	"math"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
)

// Version is the header's version; LibraryVersion() is the linked library's.
const Version = C.TALLY_VERSION

// Bounds from the header.
const (
	MaxBatch         = C.TALLY_MAX_BATCH           // requests per ConsumeMany
	MaxIDBytes       = C.TALLY_MAX_ID_BYTES        // key, user, team, request id, cursor name (a Default Team, "@" + user, one more)
	MaxNameBytes     = C.TALLY_MAX_NAME_BYTES      // resource or plan name
	MaxDocumentBytes = C.TALLY_MAX_DOCUMENT_BYTES  // path or inline policy
	MaxQuantities    = C.TALLY_MAX_QUANTITIES      // quantities per request (one per unit)
	MaxQuantity      = C.TALLY_MAX_QUANTITY        // the amount of one quantity, 2^40 (ErrBadQuantity past it)
	MaxEventsPerCall = C.TALLY_MAX_EVENTS_PER_CALL // events per EventsAfter
	MaxCursors       = C.TALLY_MAX_CURSORS         // export cursors a database keeps
)

// LibraryVersion is the version of the linked library (compare with Version).
func LibraryVersion() string { return C.GoString(C.tally_version()) }

// Durability says when an acknowledged change is on disk (Open only).
type Durability struct {
	mode     uint32
	interval time.Duration
}

var (
	// DurabilitySync: a call returns after its event is fsynced; a crash loses nothing
	// acknowledged. The default.
	DurabilitySync = Durability{mode: C.TALLY_DURABILITY_SYNC}
	// DurabilityNone: no fsync of events (only when a log segment is sealed, on Sync and on
	// Close): a process crash loses what it loses with DurabilityInterval, a power loss
	// whatever the kernel had not written back (tests, benchmarks).
	DurabilityNone = Durability{mode: C.TALLY_DURABILITY_NONE}
)

// DurabilityInterval: a call returns once its event is queued; the log starts its fsync at the
// latest `interval` (1 ms to 60 s, whole milliseconds) after the call returned (later only
// while an earlier write or fsync is still running then: a slow disk). A process crash loses the events not yet written (queued or being
// written: at most 32,768); a power loss also those written since the last completed fsync. A
// write or fsync that fails after its calls returned fails every later call (ErrLogFailed)
// until the engine is reopened; the events it carried may be missing from the database. Open
// refuses another interval with ErrInvalidArgument, as it does a duration in Options.
func DurabilityInterval(interval time.Duration) Durability {
	return Durability{mode: C.TALLY_DURABILITY_INTERVAL, interval: interval}
}

// intervalMilliseconds is the interval_ms argument of tally_engine_open (0 unless the mode is
// INTERVAL). A negative interval or a fraction of a millisecond is refused here, naming the
// option, rather than rounded to another interval; one past the library's range is passed on
// for the library to refuse with its range, unless a uint32 cannot hold it: then it is
// refused here too, as given (the library would name a value the caller never passed).
func (d Durability) intervalMilliseconds(op string) (uint32, error) {
	if d.mode != C.TALLY_DURABILITY_INTERVAL {
		return 0, nil
	}
	if d.interval < 0 {
		return 0, newError(op, C.TALLY_INVALID_ARGUMENT, "DurabilityInterval: must not be negative")
	}
	if d.interval%time.Millisecond != 0 {
		return 0, newError(op, C.TALLY_INVALID_ARGUMENT,
			"DurabilityInterval: "+d.interval.String()+" is not a whole number of milliseconds")
	}
	if d.interval.Milliseconds() > math.MaxUint32 {
		return 0, newError(op, C.TALLY_INVALID_ARGUMENT, "DurabilityInterval: "+d.interval.String()+
			" is out of range: allowed are 1ms to 1m0s (the interval)")
	}
	return uint32(d.interval.Milliseconds()), nil
}

// Option configures Open, OpenInMemory and Verify. A nil Option is no option (as SwapPolicy
// takes nil for the shipped default): the defaults stand.
type Option func(*options)

type options struct {
	policySource uint32
	policy       string
	durability   Durability
	settings     *Options // nil: the library's defaults
}

// WithPolicyFile loads the policy from a .toml or .json file (default: the shipped Token Plan).
func WithPolicyFile(path string) Option {
	return func(o *options) { o.policySource, o.policy = C.TALLY_POLICY_FILE, path }
}

// WithPolicyTOML uses a policy given as a TOML document.
func WithPolicyTOML(document string) Option {
	return func(o *options) { o.policySource, o.policy = C.TALLY_POLICY_TOML, document }
}

// WithPolicyJSON uses a policy given as a JSON document.
func WithPolicyJSON(document string) Option {
	return func(o *options) { o.policySource, o.policy = C.TALLY_POLICY_JSON, document }
}

// WithStoredPolicy (Open only) keeps the policy an existing database last ran with: nothing
// is swapped in or logged. A new database starts with the shipped Token Plan. For tools that
// look at or correct a gateway's database without changing its policy (with
// Options{UseRecorded: true} to keep the database's options too). OpenInMemory and
// SwapPolicy have no stored policy and refuse it with ErrInvalidArgument.
func WithStoredPolicy() Option {
	return func(o *options) { o.policySource, o.policy = C.TALLY_POLICY_STORED, "" }
}

// WithDurability sets the durability mode of Open (ignored by OpenInMemory).
func WithDurability(d Durability) Option {
	return func(o *options) { o.durability = d }
}

func collect(opts []Option) options {
	o := options{policySource: C.TALLY_POLICY_DEFAULT, durability: DurabilitySync}
	for _, opt := range opts {
		if opt != nil { // a policy option left unset: the shipped default, not a panic
			opt(&o)
		}
	}
	return o
}

// setters lists the option setter calls; nil (NULL options) without WithOptions.
func (o *options) setters(op string) (*optionCalls, error) {
	if o.settings == nil {
		return nil, nil
	}
	return o.settings.setters(op)
}

// policyText is the policy argument: NULL for the default and the stored policy, else the
// path or document.
func (o *options) policyText() (*C.char, C.size_t) {
	if o.policySource == C.TALLY_POLICY_DEFAULT || o.policySource == C.TALLY_POLICY_STORED {
		return nil, 0
	}
	return text(o.policy)
}

// Engine is an open tally engine. Safe for concurrent use.
type Engine struct {
	handle *C.tally_engine
	// closing is held by a Close for its whole call, so a second one waits for the first to
	// have closed the database before it returns (the library answers it at once).
	closing sync.Mutex
	closed  bool // under closing: set by the first Close, so a second one is a no-op
	// policyVersion counts the policies SwapPolicy swapped in (PolicyVersion).
	policyVersion atomic.Uint64
}

// Open opens (or creates) the database in the directory path. On an existing database a
// different policy is swapped in (usage carries over), unless WithStoredPolicy keeps its own.
// Bad options (WithOptions) fail with ErrInvalidArgument and create nothing.
func Open(path string, opts ...Option) (*Engine, error) {
	o := collect(opts)
	settings, err := o.setters("Open")
	if err != nil {
		return nil, err
	}
	pathText, pathLen := text(path)
	policy, policyLen := o.policyText()
	interval, err := o.durability.intervalMilliseconds("Open")
	if err != nil {
		return nil, err
	}
	var handle *C.tally_engine
	err = withThread("Open", func() C.uint32_t {
		native, status := nativeOptions(settings)
		if status != C.TALLY_OK {
			return status
		}
		defer C.tally_options_free(native)
		return C.tally_engine_open(pathText, pathLen, C.uint32_t(o.policySource), policy, policyLen,
			C.uint32_t(o.durability.mode), C.uint32_t(interval), native, &handle)
	})
	if err != nil {
		return nil, err
	}
	return newEngine(handle), nil
}

// OpenInMemory creates an engine that keeps everything in memory (for tests and
// simulations). Calls that need the event log answer ErrNotDurable. The database's options
// (CheckpointEveryEvents, Retention, UseRecorded) are not used; WithStoredPolicy is
// ErrInvalidArgument.
func OpenInMemory(opts ...Option) (*Engine, error) {
	o := collect(opts)
	settings, err := o.setters("OpenInMemory")
	if err != nil {
		return nil, err
	}
	policy, policyLen := o.policyText()
	var handle *C.tally_engine
	err = withThread("OpenInMemory", func() C.uint32_t {
		native, status := nativeOptions(settings)
		if status != C.TALLY_OK {
			return status
		}
		defer C.tally_options_free(native)
		return C.tally_engine_open_in_memory(C.uint32_t(o.policySource), policy, policyLen, native,
			&handle)
	})
	if err != nil {
		return nil, err
	}
	return newEngine(handle), nil
}

func newEngine(handle *C.tally_engine) *Engine {
	engine := &Engine{handle: handle}
	// Free only when no goroutine can reach the engine any more: every method keeps it
	// alive (runtime.KeepAlive) until its C call has returned, so free never races a call.
	// Close alone does not free, which is what makes Close safe while others are calling.
	// Freeing an engine never closed closes it (a checkpoint and an fsync, seconds with
	// millions of keys): on a goroutine of its own, not on the runtime's one finalizer
	// goroutine, whose other finalizers would wait for it.
	runtime.SetFinalizer(engine, func(engine *Engine) {
		handle := engine.handle
		go C.tally_engine_free(handle)
	})
	return engine
}

// Close waits for calls in flight, checkpoints and flushes the database and releases its
// lock. Later calls answer ErrClosed. Closing again does nothing and returns nil, once the
// first Close has returned (a Close racing another returns only when the database is closed).
// The engine is closed even when Close returns a storage error. Close of a zero Engine (not
// made by Open or OpenInMemory) returns ErrNullPointer, every time.
func (e *Engine) Close() error {
	e.closing.Lock()
	defer e.closing.Unlock()
	if e.handle == nil {
		// Every time: a zero Engine was never opened, and a second Close is no success.
		return e.notOpened("Close")
	}
	if e.closed {
		return nil
	}
	e.closed = true
	err := e.call("Close", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_close(handle)
	})
	if StatusOf(err) == C.TALLY_CLOSED {
		return nil
	}
	return err
}

// call runs one C call on the engine's handle with the OS thread held, so the thread's last
// error belongs to that call, and keeps the engine alive until the call has returned.
func (e *Engine) call(op string, f func(*C.tally_engine) C.uint32_t) error {
	if e.handle == nil {
		return e.notOpened(op)
	}
	err := withThread(op, func() C.uint32_t { return f(e.handle) })
	runtime.KeepAlive(e)
	return err
}

// notOpened is the error for a call on an Engine that Open or OpenInMemory did not make.
func (e *Engine) notOpened(op string) error {
	return newError(op, C.TALLY_NULL_POINTER, "engine: not opened (a zero Engine; use Open or OpenInMemory)")
}

func withThread(op string, f func() C.uint32_t) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	status := Status(f())
	if status == 0 {
		return nil
	}
	return newError(op, status, lastError())
}

// text passes a Go string to C for the duration of one call: a pointer to its bytes (the
// library reads them during the call only and never keeps them) and its length. "" becomes a
// non-NULL empty string, which the library rejects as empty where a value is required.
func text(s string) (*C.char, C.size_t) {
	if len(s) == 0 {
		return C.tally_go_empty(), 0
	}
	// The string header's first word is its data pointer (unsafe.StringData needs Go 1.20).
	return (*C.char)(*(*unsafe.Pointer)(unsafe.Pointer(&s))), C.size_t(len(s))
}

// optionalText is text, with "" passed as NULL: "not given".
func optionalText(s string) (*C.char, C.size_t) {
	if len(s) == 0 {
		return nil, 0
	}
	return text(s)
}

// milliseconds converts an optional time to at_ms, floored to the millisecond (the fraction
// is dropped: see the package's doc): the zero time is TALLY_NOW (the engine's clock), and
// a time that floors to 0 is refused rather than sent as TALLY_NOW. Times before 1970-01-01T00:00:00.001Z cannot be expressed and answer
// ErrBadTimestamp without calling the library, and so do times whose milliseconds do not fit
// in an int64 (UnixMilli would wrap them around, some into tally's range).
func milliseconds(op string, at time.Time) (C.uint64_t, error) {
	if at.IsZero() {
		return C.TALLY_NOW, nil
	}
	// At the last whole second that fits, the milliseconds past 807 overflow too: >=, not >.
	if seconds := at.Unix(); seconds >= math.MaxInt64/1000 {
		return 0, newError(op, C.TALLY_BAD_TIMESTAMP,
			"timestamp "+at.UTC().Format(time.RFC3339Nano)+" is after 2100-01-01T00:00:00Z, the end of tally's time range")
	}
	ms := at.UnixMilli()
	if ms <= 0 || at.Unix() < 0 {
		return 0, newError(op, C.TALLY_BAD_TIMESTAMP,
			"timestamp "+at.UTC().Format(time.RFC3339Nano)+" is not after 1970-01-01T00:00:00Z")
	}
	return C.uint64_t(ms), nil
}

// fromMilliseconds is the inverse of milliseconds for outputs: 0 is the zero time.
func fromMilliseconds(ms uint64) time.Time {
	if ms == 0 || ms > math.MaxInt64 {
		return time.Time{}
	}
	return time.UnixMilli(int64(ms)).UTC()
}
