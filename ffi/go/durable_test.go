package tally_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	tally "github.com/tally-engine/tally/ffi/go"
)

func TestADurableEngineKeepsUsageAcrossCloseAndReopen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "db")
	engine, err := tally.Open(dir, tally.WithDurability(tally.DurabilityInterval(5*time.Millisecond)), unbounded)
	must(t, err)
	seated(t, engine, "qi", "tp-qi", "Starter")
	request := tally.Request{Key: "tp-qi", Resource: "m2.7", Quantities: one(tally.Requests)}
	for i := 0; i < 10; i++ {
		request.At = at(int64(i))
		consume(t, engine, request)
	}
	if _, err := tally.Open(dir, unbounded); !errors.Is(err, tally.ErrDatabaseLocked) {
		t.Fatalf("a second open: %v", err)
	}
	must(t, engine.Sync())
	events, err := engine.EventsAfter(0, 1000)
	must(t, err)
	if len(events) < 10 || events[0].Seq != 1 || events[len(events)-1].Kind != "usage_admitted" ||
		!events[len(events)-1].At().Equal(at(9)) {
		t.Fatalf("%d events: %+v", len(events), events)
	}
	// The team each event concerns; a policy swap concerns none.
	if events[len(events)-1].Team != "@qi" || events[0].Kind != "policy_swapped" || events[0].Team != "" {
		t.Fatalf("teams: %+v, %+v", events[0], events[len(events)-1])
	}
	last := events[len(events)-1].Seq
	must(t, engine.SaveCursor("billing", last))
	must(t, engine.SaveCursor("gone", 1))
	cursors, err := engine.Cursors()
	if err != nil || len(cursors) != 2 || cursors[0] != (tally.SavedCursor{Name: "billing", After: last}) ||
		cursors[1] != (tally.SavedCursor{Name: "gone", After: 1}) {
		t.Fatalf("Cursors: %+v %v", cursors, err)
	}
	for _, want := range []bool{true, false} {
		if existed, err := engine.DeleteCursor("gone"); err != nil || existed != want {
			t.Fatalf("DeleteCursor: %v %v (want %v)", existed, err, want)
		}
	}
	if seq, err := engine.Cursor("gone"); err != nil || seq != 0 {
		t.Fatalf("a deleted cursor: %d %v", seq, err)
	}
	if cursors, err = engine.Cursors(); err != nil || len(cursors) != 1 || cursors[0].Name != "billing" {
		t.Fatalf("Cursors after a delete: %+v %v", cursors, err)
	}
	seq, err := engine.Checkpoint()
	if err != nil || seq != last {
		t.Fatalf("checkpoint at %d: %v", seq, err)
	}
	if _, err := engine.Compact(at(20)); err != nil {
		t.Fatal(err)
	}
	must(t, engine.Close())
	report, err := tally.Verify(dir)
	if err != nil || !report.Sound || len(report.Problems) != 0 {
		t.Fatalf("verify: %+v %v", report, err)
	}

	reopened, err := tally.Open(dir, tally.WithDurability(tally.DurabilitySync), unbounded)
	must(t, err)
	defer func() { must(t, reopened.Close()) }()
	usage, err := reopened.Usage("tp-qi", at(100))
	must(t, err)
	if usage.Limits[0].Used != 10 || usage.Plan != "Starter" {
		t.Fatalf("after reopening: %+v", usage)
	}
	cursor, err := reopened.Cursor("billing")
	if err != nil || cursor != last {
		t.Fatalf("cursor %d (want %d): %v", cursor, last, err)
	}
	if _, err := tally.Verify(dir); !errors.Is(err, tally.ErrDatabaseLocked) {
		t.Fatalf("verify while open: %v", err)
	}
}

func TestOpeningADirectoryOfOtherFilesIsErrDatabaseForeign(t *testing.T) {
	dir := t.TempDir()
	must(t, os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("not a database"), 0o600))
	if _, err := tally.Open(dir, unbounded); !errors.Is(err, tally.ErrDatabaseForeign) {
		t.Fatalf("open: %v", err)
	}
	if _, err := tally.Open("", unbounded); err == nil {
		t.Fatal("an empty path opened")
	}
}

// An engine dropped without Close is freed by its finalizer, which closes it and releases the
// database's lock.
func TestAnEngineDroppedWithoutCloseIsFreedByItsFinalizer(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "db")
	func() {
		engine, err := tally.Open(dir, tally.WithDurability(tally.DurabilityNone), unbounded)
		must(t, err)
		must(t, engine.CreateUser("ra", "tp-ra", t0))
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		runtime.GC()
		engine, err := tally.Open(dir, unbounded)
		if err == nil {
			must(t, engine.Close())
			return
		}
		if !errors.Is(err, tally.ErrDatabaseLocked) || time.Now().After(deadline) {
			t.Fatalf("reopen: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestVerifyReplaysWithTheOptionsTheDatabaseWasOpenedWith(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "db")
	options := tally.WithOptions(tally.Options{MaxPolicyGenerations: 2, MaxAheadOfClock: -1})
	engine, err := tally.Open(dir, tally.WithDurability(tally.DurabilityNone), options)
	must(t, err)
	for swap := int64(0); swap < 4; swap++ {
		must(t, engine.SwapPolicy(nil, at(swap)))
	}
	if _, err := engine.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	must(t, engine.Close())

	report, err := tally.Verify(dir, options)
	if err != nil || !report.Sound || len(report.Problems) != 0 ||
		report.SnapshotMatchesReplay == nil || !*report.SnapshotMatchesReplay {
		t.Fatalf("verify with the options it was opened with: %+v %v", report, err)
	}
	// Without options: those the database recorded when it was opened (2 generations).
	report, err = tally.Verify(dir)
	if err != nil || !report.Sound || len(report.Problems) != 0 || !report.ReplayedWithRecordedOptions ||
		report.SnapshotMatchesReplay == nil || !*report.SnapshotMatchesReplay {
		t.Fatalf("verify with the recorded options: %+v %v", report, err)
	}
	// The zero Options given are the defaults (1,024 generations), not the recorded ones: the
	// replay keeps every generation and is compared on those the snapshot kept, so the
	// database is sound under them too.
	report, err = tally.Verify(dir, tally.WithOptions(tally.Options{}))
	if err != nil || !report.Sound || report.ReplayedWithRecordedOptions ||
		report.SnapshotMatchesReplay == nil || !*report.SnapshotMatchesReplay {
		t.Fatalf("verify with the defaults: %+v %v", report, err)
	}
	_, err = tally.Verify(dir, tally.WithOptions(tally.Options{MaxPolicyGenerations: 1}))
	if !errors.Is(err, tally.ErrInvalidArgument) || !strings.Contains(err.Error(), "max_policy_generations") {
		t.Fatalf("verify with a bad option: %v", err)
	}
}

// Verify says where the log ends in a write a crash cut short (never acknowledged, so the
// database is sound), and the next open cuts it off.
func TestVerifySaysWhereATornTailIsAndTheNextOpenCutsIt(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "db")
	engine, err := tally.Open(dir, tally.WithDurability(tally.DurabilitySync), unbounded)
	must(t, err)
	must(t, engine.CreateTeam("acme", at(0)))
	if _, err := engine.TopUp("acme", 1000, at(0)); err != nil {
		t.Fatal(err)
	}
	must(t, engine.Close())
	segments, err := os.ReadDir(filepath.Join(dir, "events"))
	if err != nil || len(segments) == 0 {
		t.Fatalf("%v %v", segments, err)
	}
	last := segments[len(segments)-1].Name()
	file, err := os.OpenFile(filepath.Join(dir, "events", last), os.O_APPEND|os.O_WRONLY, 0)
	must(t, err)
	if _, err := file.Write([]byte(strings.Repeat("Z", 100))); err != nil {
		t.Fatal(err)
	}
	must(t, file.Close())
	report, err := tally.Verify(dir)
	if err != nil || !report.Sound || !strings.Contains(report.TornTail, "ends in 100 bytes") ||
		!strings.Contains(report.TornTail, last) {
		t.Fatalf("a torn tail: %+v %v", report, err)
	}
	engine, err = tally.Open(dir, tally.WithDurability(tally.DurabilitySync), unbounded)
	must(t, err)
	if credits, err := engine.Credits("acme"); err != nil || credits != 1000 {
		t.Fatalf("credits %d %v", credits, err)
	}
	must(t, engine.Close())
	if report, err = tally.Verify(dir); err != nil || !report.Sound || report.TornTail != "" {
		t.Fatalf("after the open cut it off: %+v %v", report, err)
	}
}

// Health reports a compaction that failed in the background (each periodic checkpoint
// compacts what the retention lets go), which no call's answer reports; it clears once one
// succeeds.
func TestHealthReportsACompactionThatFailedInTheBackground(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "db")
	engine, err := tally.Open(dir, tally.WithDurability(tally.DurabilitySync),
		tally.WithOptions(tally.Options{Retention: time.Second, CheckpointEveryEvents: 4,
			MaxAheadOfClock: -1, ManualClock: t0}))
	must(t, err)
	defer func() { must(t, engine.Close()) }()
	seated(t, engine, "he", "tp-he", "Max")
	if health, err := engine.Health(); err != nil || !health.Healthy() {
		t.Fatalf("a fresh engine: %+v %v", health, err)
	}
	consumeSome := func(at time.Time) {
		for i := 0; i < 12; i++ {
			decision, err := engine.Consume(tally.Request{Key: "tp-he", Resource: "m2.7",
				Quantities: []tally.Quantity{{Unit: tally.Requests, Amount: 1}},
				At:         at.Add(time.Duration(i) * time.Millisecond)})
			if err != nil || !decision.Admitted {
				t.Fatalf("consume: %+v %v", decision, err)
			}
		}
		if _, err := engine.Checkpoint(); err != nil { // the last periodic one ends first
			t.Fatal(err)
		}
	}
	consumeSome(t0)
	segments, err := filepath.Glob(filepath.Join(dir, "events", "*.seg"))
	if err != nil || len(segments) < 2 {
		t.Fatalf("segments %v %v", segments, err)
	}
	oldest := segments[0]
	must(t, os.Rename(oldest, oldest+".kept"))
	must(t, os.Mkdir(oldest, 0o700))     // unreadable: a directory where the segment was
	later := t0.Add(40 * 24 * time.Hour) // past the longest window (a month) and the retention
	must(t, engine.SetClock(later))
	consumeSome(later)
	health, err := engine.Health()
	if err != nil || health.Healthy() || health.CompactionFailure == "" || health.LogFailure != "" {
		t.Fatalf("after the failed compaction: %+v %v", health, err)
	}
	must(t, os.Remove(oldest))
	must(t, os.Rename(oldest+".kept", oldest))
	consumeSome(later.Add(time.Second))
	if health, err = engine.Health(); err != nil || !health.Healthy() {
		t.Fatalf("after one that succeeded: %+v %v", health, err)
	}
}

// customPolicy gives Starter 7 m2.7 requests per 5 hours (the shipped Token Plan: 1,500).
const customPolicy = `
time_zone = "UTC"
[resources."m2.7"]
units = ["requests"]
required = ["requests"]
price_micros = { requests = 1 }
[plans.Starter]
limits = [{ resource = "m2.7", unit = "requests", amount = 7, window = "rolling:5h" }]
`

func limitAmounts(t *testing.T, engine *tally.Engine, key string) []uint64 {
	t.Helper()
	usage, err := engine.Usage(key, t0)
	must(t, err)
	amounts := make([]uint64, len(usage.Limits))
	for i, limit := range usage.Limits {
		amounts[i] = limit.Amount
	}
	return amounts
}

func TestTheStoredPolicyKeepsADatabasesOwnPolicyAndLogsNothing(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "db")
	none := tally.WithDurability(tally.DurabilityNone)
	engine, err := tally.Open(dir, none, tally.WithPolicyTOML(customPolicy), unbounded)
	must(t, err)
	if err := engine.SwapPolicy(tally.WithStoredPolicy(), t0); !errors.Is(err, tally.ErrInvalidArgument) ||
		!strings.Contains(err.Error(), "policy_source") {
		t.Fatalf("a swap to the stored policy: %v", err)
	}
	seated(t, engine, "ada", "tp-ada-1", "Starter")
	last, err := engine.Checkpoint()
	must(t, err)
	must(t, engine.Close())

	engine, err = tally.Open(dir, none, tally.WithStoredPolicy(), unbounded)
	must(t, err)
	if amounts := limitAmounts(t, engine, "tp-ada-1"); len(amounts) != 1 || amounts[0] != 7 {
		t.Fatalf("reopened with the stored policy: limits %v", amounts)
	}
	events, err := engine.EventsAfter(last, 100)
	must(t, err)
	if len(events) != 0 {
		t.Fatalf("reopened with the stored policy: logged %+v", events)
	}
	// Past the last event is an error, not an empty page a poller would skip ahead from.
	if _, err := engine.EventsAfter(last+1, 100); !errors.Is(err, tally.ErrInvalidArgument) ||
		!strings.Contains(err.Error(), "past the end of the log") {
		t.Fatalf("events after the end: %v", err)
	}
	must(t, engine.Close())

	// The shipped policy given instead is swapped in, and the swap logged.
	engine, err = tally.Open(dir, none, unbounded)
	must(t, err)
	defer func() { must(t, engine.Close()) }()
	if amounts := limitAmounts(t, engine, "tp-ada-1"); len(amounts) == 0 || amounts[0] != 1500 {
		t.Fatalf("reopened with the shipped policy: limits %v", amounts)
	}
	events, err = engine.EventsAfter(last, 100)
	must(t, err)
	if len(events) == 0 || events[0].Kind != "policy_swapped" {
		t.Fatalf("reopened with the shipped policy: events %+v", events)
	}
}

func TestANewDatabaseOpenedWithTheStoredPolicyRunsTheTokenPlan(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "db")
	engine, err := tally.Open(dir, tally.WithDurability(tally.DurabilityNone), tally.WithStoredPolicy(), unbounded)
	must(t, err)
	defer func() { must(t, engine.Close()) }()
	seated(t, engine, "bo", "tp-bo-1", "Starter")
	if amounts := limitAmounts(t, engine, "tp-bo-1"); len(amounts) == 0 || amounts[0] != 1500 {
		t.Fatalf("a new database: limits %v", amounts)
	}
}

func TestAnInMemoryEngineHasNoStoredPolicy(t *testing.T) {
	engine, err := tally.OpenInMemory(tally.WithStoredPolicy(), unbounded)
	if engine != nil {
		engine.Close()
	}
	if !errors.Is(err, tally.ErrInvalidArgument) || !strings.Contains(err.Error(), "policy_source") {
		t.Fatalf("in memory with the stored policy: %v", err)
	}
}

// A Close that finds another one in progress waits for it: when it returns, the database is
// checkpointed, flushed and closed, as it is when any Close returns (the first takes a
// checkpoint of 20,000 keys meanwhile). A program that exits once its Close returns must not
// cut the first one short.
func TestASecondCloseReturnsOnlyOnceTheFirstHasClosedTheDatabase(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "db")
	engine, err := tally.Open(dir, tally.WithDurability(tally.DurabilityNone), unbounded)
	must(t, err)
	for i := 0; i < 20_000; i++ {
		key := fmt.Sprintf("tp-%d", i)
		must(t, engine.CreateUser(fmt.Sprintf("u%d", i), key, t0))
		consume(t, engine, tally.Request{Key: key, Resource: "m2.7", Quantities: one(tally.Requests), At: t0})
	}
	if snapshots, err := filepath.Glob(filepath.Join(dir, "snapshots", "*.snap")); err != nil || len(snapshots) != 0 {
		t.Fatalf("a checkpoint before the Close: %v %v", snapshots, err)
	}
	first := make(chan error, 1)
	go func() { first <- engine.Close() }()
	// The first Close is inside the library once calls answer ErrClosed, and busy with the
	// checkpoint until it returns.
	for {
		if _, err := engine.Credits("@u0"); errors.Is(err, tally.ErrClosed) {
			break
		}
		runtime.Gosched()
	}
	must(t, engine.Close())
	// The first one's checkpoint is stored by now (none was before it). Timing the first one's goroutine instead, its send allowed
	// 20 ms after this Close returned, failed on a loaded machine where that goroutine had not
	// run again yet.
	snapshots, err := filepath.Glob(filepath.Join(dir, "snapshots", "*.snap"))
	if err != nil || len(snapshots) == 0 {
		t.Fatalf("the second Close returned before the first stored its checkpoint: %v %v", snapshots, err)
	}
	must(t, <-first)
}
