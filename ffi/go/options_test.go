package tally_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	tally "github.com/tally-engine/tally/ffi/go"
)

func openMemoryWith(t *testing.T, options tally.Options) *tally.Engine {
	t.Helper()
	engine, err := tally.OpenInMemory(tally.WithOptions(options))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { must(t, engine.Close()) })
	return engine
}

func TestTheZeroOptionsAreTheDefaults(t *testing.T) {
	engine := openMemoryWith(t, tally.Options{})
	now := time.Now()
	must(t, engine.CreateUser("ada", "tp-ada-1", now))
	must(t, engine.AssignSeat("@ada", "ada", "Plus", now))
	request := tally.Request{Key: "tp-ada-1", Resource: "m2.7", Quantities: one(tally.Requests), At: now}
	if decision := consume(t, engine, request); !decision.Admitted {
		t.Fatalf("denied with the default options: %+v", decision)
	}
	// The default bound ahead of the (system) clock, a day: two days ahead is refused.
	request.At = now.Add(48 * time.Hour)
	if _, err := engine.Consume(request); !errors.Is(err, tally.ErrBadTimestamp) ||
		!strings.Contains(err.Error(), "max_ahead_of_clock_ms") {
		t.Fatalf("a time two days ahead with the default options: %v", err)
	}
	clock, err := engine.Clock()
	must(t, err)
	if clock.Before(now.Truncate(time.Millisecond)) || clock.After(time.Now()) {
		t.Fatalf("the default clock reads %v, not the system's (%v)", clock, now)
	}
}

func TestABoundSetInOptionsReachesTheEngine(t *testing.T) {
	engine := openMemoryWith(t, tally.Options{MaxKeys: 1, MaxAheadOfClock: -1})
	must(t, engine.CreateUser("ada", "tp-ada-1", t0))
	err := engine.CreateUser("bo", "tp-bo-1", t0)
	if !errors.Is(err, tally.ErrCapacityExceeded) {
		t.Fatalf("a second key with MaxKeys 1: %v", err)
	}
}

func TestADefaultLeaseSetInOptionsIsTheLeaseOfAReservationWithoutOne(t *testing.T) {
	engine := openMemoryWith(t, tally.Options{DefaultLease: time.Second, DisableLeaseExpiry: true,
		MaxAheadOfClock: -1})
	seated(t, engine, "ada", "tp-ada-1", "Plus")
	request := tally.Request{Key: "tp-ada-1", Resource: "m2.7", Quantities: one(tally.Requests), At: t0}
	decision, _, err := engine.Reserve(request, 0)
	must(t, err)
	if !decision.Admitted {
		t.Fatalf("reserve denied: %+v", decision)
	}
	expired, err := engine.ExpireReservations(at(999))
	must(t, err)
	if expired != 0 {
		t.Fatalf("expired %d before the lease of a second ended", expired)
	}
	expired, err = engine.ExpireReservations(at(1_000))
	must(t, err)
	if expired != 1 {
		t.Fatalf("expired %d when the lease of a second ended", expired)
	}
}

func TestAnOptionOutOfRangeIsErrInvalidArgumentNamingIt(t *testing.T) {
	const day = 24 * time.Hour
	cases := []struct {
		option  string
		options tally.Options
	}{
		{"max_keys", tally.Options{MaxKeys: 1<<32 + 1}},
		{"max_teams", tally.Options{MaxTeams: 1<<32 + 1}},
		{"max_users", tally.Options{MaxUsers: 1<<32 + 1}},
		{"idempotency_capacity", tally.Options{IdempotencyCapacity: 1<<32 + 1}},
		{"idempotency_horizon_ms", tally.Options{IdempotencyHorizon: 367 * day}},
		{"max_open_reservations", tally.Options{MaxOpenReservations: 1<<32 + 1}},
		{"default_lease_ms", tally.Options{DefaultLease: day + time.Millisecond}},
		{"max_policy_generations", tally.Options{MaxPolicyGenerations: 1}},
		{"max_policy_generations", tally.Options{MaxPolicyGenerations: 65_537}},
		{"reclaim_idle_every_ms", tally.Options{ReclaimIdleEvery: 200 * 366 * day}},
		{"retention_ms", tally.Options{Retention: 200 * 366 * day}},
		{"max_ahead_of_clock_ms", tally.Options{MaxAheadOfClock: 200 * 366 * day}},
		{"manual_clock_ms", tally.Options{ManualClock: time.UnixMilli(4_102_444_800_000)}},
	}
	for _, c := range cases {
		engine, err := tally.OpenInMemory(tally.WithOptions(c.options))
		if engine != nil {
			engine.Close()
		}
		if !errors.Is(err, tally.ErrInvalidArgument) {
			t.Errorf("%s: %v", c.option, err)
			continue
		}
		if !strings.Contains(err.Error(), c.option+": ") || !strings.Contains(err.Error(), "out of range") {
			t.Errorf("%s: the message does not name the option and its range: %v", c.option, err)
		}
	}
}

func TestByDefaultATimeOverADayAheadIsRefusedAndOneWithinItIsTaken(t *testing.T) {
	// Two days ahead of the engine's (system) clock is refused by the default bound of a day
	// (the zero Options and an explicit 24 h alike), and nothing is created.
	for _, options := range []tally.Options{{}, {MaxAheadOfClock: 24 * time.Hour}} {
		engine := openMemoryWith(t, options)
		now := time.Now()
		err := engine.CreateUser("ada", "tp-ada-1", now.Add(48*time.Hour))
		if !errors.Is(err, tally.ErrBadTimestamp) || !strings.Contains(err.Error(), "ahead of the engine's clock") {
			t.Fatalf("%+v: a time two days ahead: %v", options, err)
		}
		must(t, engine.CreateUser("ada", "tp-ada-1", now.Add(time.Hour)))
		must(t, engine.AssignSeat("@ada", "ada", "Plus", now))
		request := tally.Request{Key: "tp-ada-1", Resource: "m2.7", Quantities: one(tally.Requests),
			At: now.Add(48 * time.Hour)}
		if _, err := engine.Consume(request); !errors.Is(err, tally.ErrBadTimestamp) {
			t.Fatalf("%+v: two days ahead: %v", options, err)
		}
		request.At = now
		if decision := consume(t, engine, request); !decision.Admitted {
			t.Fatalf("%+v: now, after a refused request: %+v", options, decision)
		}
	}
	// Opted out (negative: the library's 0, no bound): a year ahead is taken.
	engine := openMemoryWith(t, tally.Options{MaxAheadOfClock: -1})
	must(t, engine.CreateUser("ada", "tp-ada-1", time.Now().Add(366*24*time.Hour)))
}

func TestANegativeDurationIsTheLibrarysZeroWhereZeroHasAMeaning(t *testing.T) {
	openMemoryWith(t, tally.Options{ReclaimIdleEvery: -1, Retention: -1})
	for _, options := range []tally.Options{{DefaultLease: -time.Second}, {IdempotencyHorizon: -time.Second}} {
		_, err := tally.OpenInMemory(tally.WithOptions(options))
		if !errors.Is(err, tally.ErrInvalidArgument) || !strings.Contains(err.Error(), "negative") {
			t.Errorf("%+v: %v", options, err)
		}
	}
}

func TestADurationOptionIsWholeMilliseconds(t *testing.T) {
	_, err := tally.OpenInMemory(tally.WithOptions(tally.Options{DefaultLease: 1500 * time.Microsecond}))
	if !errors.Is(err, tally.ErrInvalidArgument) || !strings.Contains(err.Error(), "DefaultLease") {
		t.Fatalf("a lease of 1.5 ms: %v", err)
	}
}

func TestOpenWithBadOptionsCreatesNoDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "db")
	_, err := tally.Open(dir, tally.WithDurability(tally.DurabilityNone),
		tally.WithOptions(tally.Options{MaxPolicyGenerations: 1}))
	if !errors.Is(err, tally.ErrInvalidArgument) || !strings.Contains(err.Error(), "max_policy_generations") {
		t.Fatalf("open with one policy generation: %v", err)
	}
	if _, statErr := os.Stat(dir); !os.IsNotExist(statErr) {
		t.Fatalf("the directory exists after a refused open: %v", statErr)
	}
}

func TestOpenTakesTheDatabaseOptions(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "db")
	options := tally.Options{CheckpointEveryEvents: 1, Retention: time.Hour, MaxUsers: 1, MaxAheadOfClock: -1}
	engine, err := tally.Open(dir, tally.WithDurability(tally.DurabilityNone), tally.WithOptions(options))
	must(t, err)
	defer engine.Close()
	must(t, engine.CreateUser("ada", "tp-ada-1", t0))
	if err := engine.CreateUser("bo", "tp-bo-1", t0); !errors.Is(err, tally.ErrCapacityExceeded) {
		t.Fatalf("a second user with MaxUsers 1: %v", err)
	}
}

func TestUseRecordedReopensADatabaseWithTheOptionsItRecorded(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "db")
	none := tally.WithDurability(tally.DurabilityNone)
	engine, err := tally.Open(dir, none, tally.WithOptions(tally.Options{MaxUsers: 1, MaxAheadOfClock: -1}))
	must(t, err)
	must(t, engine.CreateUser("ada", "tp-ada-1", t0))
	must(t, engine.Close())

	// The recorded MaxUsers of 1 wins over the 5 given beside UseRecorded.
	engine, err = tally.Open(dir, none, tally.WithOptions(tally.Options{UseRecorded: true, MaxUsers: 5}))
	must(t, err)
	if err := engine.CreateUser("bo", "tp-bo-1", t0); !errors.Is(err, tally.ErrCapacityExceeded) {
		t.Fatalf("a second user with the recorded MaxUsers 1: %v", err)
	}
	must(t, engine.Close())

	// Without it, the options given apply (the defaults, unbounded ahead of the clock).
	engine, err = tally.Open(dir, none, unbounded)
	must(t, err)
	defer func() { must(t, engine.Close()) }()
	must(t, engine.CreateUser("bo", "tp-bo-1", t0))
}

func TestADurabilityIntervalIsWholeMillisecondsAndNotNegative(t *testing.T) {
	for _, interval := range []time.Duration{1500 * time.Microsecond, 500 * time.Microsecond, -time.Millisecond} {
		dir := filepath.Join(t.TempDir(), "db")
		engine, err := tally.Open(dir, tally.WithDurability(tally.DurabilityInterval(interval)), unbounded)
		if engine != nil {
			engine.Close()
		}
		if !errors.Is(err, tally.ErrInvalidArgument) || !strings.Contains(err.Error(), "DurabilityInterval: ") {
			t.Errorf("an interval of %v: %v", interval, err)
		}
		if _, statErr := os.Stat(dir); !os.IsNotExist(statErr) {
			t.Errorf("an interval of %v: the directory exists after a refused open: %v", interval, statErr)
		}
	}
	engine, err := tally.Open(filepath.Join(t.TempDir(), "db"),
		tally.WithDurability(tally.DurabilityInterval(2*time.Millisecond)), unbounded)
	must(t, err)
	must(t, engine.Close())
}

func TestAnEngineWithAClockOfItsOwnReadsTheTimeItWasSetTo(t *testing.T) {
	// Each engine opened with ManualClock reads a clock of its own: a zero `at`, the bound
	// ahead of the clock and the request-id horizon all follow it, in memory and on disk.
	const day = 24 * time.Hour
	options := tally.WithOptions(tally.Options{ManualClock: t0})
	inMemory, err := tally.OpenInMemory(options)
	must(t, err)
	defer func() { must(t, inMemory.Close()) }()
	onDisk, err := tally.Open(filepath.Join(t.TempDir(), "db"),
		tally.WithDurability(tally.DurabilityNone), options)
	must(t, err)
	defer func() { must(t, onDisk.Close()) }()
	for _, engine := range []*tally.Engine{inMemory, onDisk} {
		clock, err := engine.Clock()
		must(t, err)
		if !clock.Equal(t0) {
			t.Fatalf("the clock reads %v, not %v", clock, t0)
		}
		// A zero `at` is the clock's t0, which the system clock's default bound would refuse.
		must(t, engine.CreateUser("ada", "tp-ada-1", time.Time{}))
		must(t, engine.AssignSeat("@ada", "ada", "Max", t0))
		request := tally.Request{Key: "tp-ada-1", Resource: "m2.7", Quantities: one(tally.Requests),
			At: t0.Add(2 * day)}
		if _, err := engine.Consume(request); !errors.Is(err, tally.ErrBadTimestamp) {
			t.Fatalf("two days ahead of the clock: %v", err)
		}
		must(t, engine.SetClock(t0.Add(2*day)))
		if decision := consume(t, engine, request); !decision.Admitted {
			t.Fatalf("with the clock moved there: %+v", decision)
		}
		first := tally.Request{Key: "tp-ada-1", Resource: "m2.7", Quantities: one(tally.Requests),
			At: t0, RequestID: "r1"}
		if decision := consume(t, engine, first); !decision.Admitted {
			t.Fatalf("a request id at t0: %+v", decision)
		}
		must(t, engine.SetClock(t0.Add(400*day)))
		if _, err := engine.Consume(first); !errors.Is(err, tally.ErrBadTimestamp) ||
			!strings.Contains(err.Error(), "before the engine's clock") {
			t.Fatalf("its retry past every horizon: %v", err)
		}
		for _, bad := range []time.Time{{}, time.UnixMilli(-1), time.UnixMilli(4_102_444_800_000)} {
			if err := engine.SetClock(bad); !errors.Is(err, tally.ErrInvalidArgument) {
				t.Fatalf("SetClock(%v): %v", bad, err)
			}
		}
		if clock, _ := engine.Clock(); !clock.Equal(t0.Add(400 * day)) {
			t.Fatalf("a refused SetClock moved the clock to %v", clock)
		}
	}
	system := openMemoryWith(t, tally.Options{})
	if err := system.SetClock(t0); !errors.Is(err, tally.ErrInvalidArgument) ||
		!strings.Contains(err.Error(), "manual_clock") {
		t.Fatalf("SetClock on the system clock: %v", err)
	}
}

// Clock reads the same kind of time.Time as every other time the package returns (a
// decision's At, a usage report's, an event's): UTC, so it prints, compares with == and keys
// a map alike, whatever the machine's time zone.
func TestTheClockReadsInUTCAsTheDecisionsTimesDo(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "cl", "tp-cl", "Starter")
	decision := consume(t, engine, tally.Request{Key: "tp-cl", Resource: "m2.7", Quantities: one(tally.Requests)})
	clock, err := engine.Clock()
	must(t, err)
	if decision.At.Location() != time.UTC || clock.Location() != time.UTC || clock != decision.At {
		t.Fatalf("the clock reads %v (%v); the decision was counted at %v (%v)",
			clock, clock.Location(), decision.At, decision.At.Location())
	}
}

// An interval past what a uint32 of milliseconds holds is refused naming the interval given:
// clamped to 4294967295 ms before the call, the library's message named that number, which
// the caller never passed (50 days here).
func TestADurabilityIntervalPastAUint32OfMillisecondsIsNamedAsGiven(t *testing.T) {
	for _, interval := range []time.Duration{50 * 24 * time.Hour, time.Duration(1<<63 - 1).Truncate(time.Millisecond)} {
		dir := filepath.Join(t.TempDir(), "db")
		engine, err := tally.Open(dir, tally.WithDurability(tally.DurabilityInterval(interval)), unbounded)
		if engine != nil {
			engine.Close()
		}
		if !errors.Is(err, tally.ErrInvalidArgument) || !strings.Contains(err.Error(), "DurabilityInterval: "+interval.String()) ||
			strings.Contains(err.Error(), "4294967295") {
			t.Errorf("an interval of %v: %v", interval, err)
		}
		if _, statErr := os.Stat(dir); !os.IsNotExist(statErr) {
			t.Errorf("an interval of %v: the directory exists after a refused open: %v", interval, statErr)
		}
	}
}

func TestOpenWithMaxKeysBelowTheKeysHeldIsErrInvalidArgumentNamingIt(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "db")
	none := tally.WithDurability(tally.DurabilityNone)
	engine, err := tally.Open(dir, none, unbounded)
	must(t, err)
	must(t, engine.CreateUser("ada", "tp-ada-1", t0))
	must(t, engine.CreateUser("bo", "tp-bo-1", t0))
	must(t, engine.Close())

	_, err = tally.Open(dir, none, tally.WithOptions(tally.Options{MaxKeys: 1, MaxAheadOfClock: -1}))
	want := "max_keys: 1 is below the 2 keys the database holds"
	if !errors.Is(err, tally.ErrInvalidArgument) || !strings.Contains(err.Error(), want) {
		t.Fatalf("open with MaxKeys 1 on 2 keys: %v", err)
	}
	engine, err = tally.Open(dir, none, tally.WithOptions(tally.Options{MaxKeys: 2, MaxAheadOfClock: -1}))
	must(t, err)
	defer func() { must(t, engine.Close()) }()
	if err := engine.CreateUser("cy", "tp-cy-1", t0); !errors.Is(err, tally.ErrCapacityExceeded) {
		t.Fatalf("a third key with MaxKeys 2: %v", err)
	}
}
