package tally

/*
#include "tally.h"
*/
import "C"

import "time"

// Options are the engine's and the database's options, given to Open, OpenInMemory or
// Verify (which without them reads those the database recorded) with WithOptions. The zero
// value is the library's defaults: a field left at its zero value keeps its default, so only
// what differs needs saying:
//
//	tally.Open("tally-data", tally.WithOptions(tally.Options{MaxKeys: 100_000}))
//
// Where the library gives 0 a meaning of its own, that meaning is asked for another way, as
// net.Dialer's KeepAlive does: a negative ReclaimIdleEvery never reclaims on its own, a
// negative Retention keeps no usage events beyond the longest window, a negative
// MaxAheadOfClock sets no bound ahead of the clock, and DisableLeaseExpiry turns the
// engine's own lease expiry off. (A zero IdempotencyHorizon is the library's default
// and its 0 alike: the policy's longest window.)
//
// Every value is checked by the library against its range before anything is opened; one out
// of range fails the open with ErrInvalidArgument, its message naming the option and the
// range, and nothing is created. A duration must be whole milliseconds (ErrInvalidArgument).
// The ranges are the header's: tables 1 to 2^32, DefaultLease up to 24 h, IdempotencyHorizon
// up to 366 days, MaxPolicyGenerations 2 to 65,536, ReclaimIdleEvery and Retention up to the
// span of timestamps (to 2100), MaxAheadOfClock too.
type Options struct {
	// Keys at most (default 16,000,000). Open refuses a table bound (this one, MaxTeams,
	// MaxUsers, IdempotencyCapacity, MaxOpenReservations) below what the database holds:
	// ErrInvalidArgument naming the option, the bound and how many it holds; nothing changed.
	MaxKeys  uint64
	MaxTeams uint64 // teams at most, each user's Default Team included (default 4,000,000)
	MaxUsers uint64 // users at most (default 8,000,000)
	// Request ids remembered at once (default 1,000,000).
	IdempotencyCapacity uint64
	// How long a request id is remembered; zero: the policy's longest window.
	IdempotencyHorizon time.Duration
	// Reservations open at once (default 1,000,000); also how many closed ones are remembered
	// (the most recently closed) so a repeated settle or void is idempotent. An open with a lower
	// bound than the database ran with keeps the closed ones it restores until its first close.
	MaxOpenReservations uint64
	DefaultLease        time.Duration // lease of a reservation made without one (default 10 min)
	// Policies kept so requests from before a swap are refunded exactly (default 1,024).
	MaxPolicyGenerations uint64
	// How often idle keys' window memory is freed on its own (default 10 minutes); negative:
	// never (ReclaimIdle still works).
	ReclaimIdleEvery time.Duration
	// The engine does not expire reservations whose lease ended on its own; only Reserve, a
	// late Settle, SwapPolicy and ExpireReservations do.
	DisableLeaseExpiry bool
	// How far ahead of the engine's clock an operation's time may be; one further ahead is
	// refused (ErrBadTimestamp) and changes nothing (default 24 h). Negative: no bound, for
	// tests and replays that run ahead of the clock; without one, a request stamped months
	// ahead moves its key's windows there (for requests made now its usage does not age out
	// until the clock reaches that time) and keeps its log segment, and every later one, from
	// being compacted until the clock passes it by the longest window and the retention. The
	// log's own times are never refused at Open.
	MaxAheadOfClock time.Duration
	// A checkpoint every this many events (default 1,000,000); one whose work took 10 ms
	// or more holds the next back until four times that has passed, or twice this many
	// events came. Open only.
	CheckpointEveryEvents uint64
	// How long an export reader has (default 7 days): Compact, and each periodic checkpoint
	// on its own, drop an event only once its timestamp is this long past the longest window
	// and it was logged at least this long ago on the engine's clock (a request delivered late stays this long after it was
	// logged); negative: none. Open only.
	Retention time.Duration
	// A clock of the engine's own, standing at this time (to the millisecond) until SetClock
	// moves it, instead of the system clock: for tests, simulations and replays, which then
	// control every time the engine reads (a zero `at`, the bound ahead of the clock, how
	// long request ids are remembered, when leases end and idle keys are freed). Each engine
	// opened gets a clock of its own. Zero: the system clock. Verify reads no clock.
	ManualClock time.Time
	// Open as a tool: an existing database runs with the options its owner recorded (an open
	// without UseRecorded records its own) instead of these, which then apply only to a
	// database that recorded none (a new one), and nothing is recorded. For tools on a
	// gateway's database. Open and Verify only.
	UseRecorded bool
}

// WithOptions sets the engine's and the database's options (see Options). Even the zero
// Options are given: Verify then replays with the defaults, not the recorded options.
func WithOptions(settings Options) Option {
	return func(o *options) { o.settings = &settings }
}

// setter is one tally_options_set_* call with its value.
type setter func(*C.tally_options) C.uint32_t

// optionCalls are the setter calls of the Options given WithOptions (none for the zero
// Options). A nil *optionCalls, without WithOptions, passes NULL: Open's defaults, Verify's
// recorded options.
type optionCalls struct{ calls []setter }

// setters lists the calls that set the fields not at their zero value, or an error for a value
// Go cannot pass (a negative duration where none is meant, a fraction of a millisecond).
func (s *Options) setters(op string) (*optionCalls, error) {
	var calls []setter
	count := func(value uint64, set func(*C.tally_options, C.uint64_t) C.uint32_t) {
		if value != 0 {
			calls = append(calls, func(o *C.tally_options) C.uint32_t { return set(o, C.uint64_t(value)) })
		}
	}
	// duration: zero keeps the default; negative is the library's 0 where `negativeIsZero`.
	duration := func(name string, value time.Duration, negativeIsZero bool,
		set func(*C.tally_options, C.uint64_t) C.uint32_t) error {
		if value == 0 {
			return nil
		}
		if value < 0 {
			if !negativeIsZero {
				return newError(op, C.TALLY_INVALID_ARGUMENT, name+": must not be negative")
			}
			value = 0
		}
		if value%time.Millisecond != 0 {
			return newError(op, C.TALLY_INVALID_ARGUMENT,
				name+": "+value.String()+" is not a whole number of milliseconds")
		}
		ms := uint64(value / time.Millisecond)
		calls = append(calls, func(o *C.tally_options) C.uint32_t { return set(o, C.uint64_t(ms)) })
		return nil
	}
	count(s.MaxKeys, func(o *C.tally_options, v C.uint64_t) C.uint32_t {
		return C.tally_options_set_max_keys(o, v)
	})
	count(s.MaxTeams, func(o *C.tally_options, v C.uint64_t) C.uint32_t {
		return C.tally_options_set_max_teams(o, v)
	})
	count(s.MaxUsers, func(o *C.tally_options, v C.uint64_t) C.uint32_t {
		return C.tally_options_set_max_users(o, v)
	})
	count(s.IdempotencyCapacity, func(o *C.tally_options, v C.uint64_t) C.uint32_t {
		return C.tally_options_set_idempotency_capacity(o, v)
	})
	count(s.MaxOpenReservations, func(o *C.tally_options, v C.uint64_t) C.uint32_t {
		return C.tally_options_set_max_open_reservations(o, v)
	})
	count(s.MaxPolicyGenerations, func(o *C.tally_options, v C.uint64_t) C.uint32_t {
		return C.tally_options_set_max_policy_generations(o, v)
	})
	count(s.CheckpointEveryEvents, func(o *C.tally_options, v C.uint64_t) C.uint32_t {
		return C.tally_options_set_checkpoint_every_events(o, v)
	})
	for _, d := range []struct {
		name           string
		value          time.Duration
		negativeIsZero bool
		set            func(*C.tally_options, C.uint64_t) C.uint32_t
	}{
		{"IdempotencyHorizon", s.IdempotencyHorizon, false, func(o *C.tally_options, v C.uint64_t) C.uint32_t {
			return C.tally_options_set_idempotency_horizon_ms(o, v)
		}},
		{"DefaultLease", s.DefaultLease, false, func(o *C.tally_options, v C.uint64_t) C.uint32_t {
			return C.tally_options_set_default_lease_ms(o, v)
		}},
		{"ReclaimIdleEvery", s.ReclaimIdleEvery, true, func(o *C.tally_options, v C.uint64_t) C.uint32_t {
			return C.tally_options_set_reclaim_idle_every_ms(o, v)
		}},
		{"Retention", s.Retention, true, func(o *C.tally_options, v C.uint64_t) C.uint32_t {
			return C.tally_options_set_retention_ms(o, v)
		}},
		{"MaxAheadOfClock", s.MaxAheadOfClock, true, func(o *C.tally_options, v C.uint64_t) C.uint32_t {
			return C.tally_options_set_max_ahead_of_clock_ms(o, v)
		}},
	} {
		if err := duration(d.name, d.value, d.negativeIsZero, d.set); err != nil {
			return nil, err
		}
	}
	if !s.ManualClock.IsZero() {
		ms, err := milliseconds(op, s.ManualClock)
		if err != nil {
			return nil, newError(op, C.TALLY_INVALID_ARGUMENT, "ManualClock: "+
				s.ManualClock.UTC().Format(time.RFC3339Nano)+" is not after 1970-01-01T00:00:00Z and before 2100")
		}
		calls = append(calls, func(o *C.tally_options) C.uint32_t {
			return C.tally_options_set_manual_clock(o, ms)
		})
	}
	if s.DisableLeaseExpiry {
		calls = append(calls, func(o *C.tally_options) C.uint32_t {
			return C.tally_options_set_expire_leases_on_its_own(o, C.bool(false))
		})
	}
	if s.UseRecorded {
		calls = append(calls, func(o *C.tally_options) C.uint32_t {
			return C.tally_options_set_use_recorded(o, C.bool(true))
		})
	}
	return &optionCalls{calls: calls}, nil
}

// nativeOptions makes a tally_options with the calls applied, or returns nil (NULL) for nil
// calls (no WithOptions). The caller holds the OS thread, so a refused value's message is the
// thread's last error, and frees what is returned (tally_options_free(NULL) does nothing).
func nativeOptions(calls *optionCalls) (*C.tally_options, C.uint32_t) {
	if calls == nil {
		return nil, C.TALLY_OK
	}
	var native *C.tally_options
	if status := C.tally_options_new(&native); status != C.TALLY_OK {
		return nil, status
	}
	for _, call := range calls.calls {
		if status := call(native); status != C.TALLY_OK {
			C.tally_options_free(native)
			return nil, status
		}
	}
	return native, C.TALLY_OK
}
