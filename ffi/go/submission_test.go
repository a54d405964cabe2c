package tally_test

import (
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	tally "github.com/tally-engine/tally/ffi/go"
)

// submissionMix is plan quota, a denial over a maximum, an unknown key, a repeated id and
// credits once the Starter window is short.
func submissionMix() []tally.Request {
	request := func(key, resource string, id string, quantities ...tally.Quantity) tally.Request {
		return tally.Request{Key: key, Resource: resource, Quantities: quantities, At: t0, RequestID: id}
	}
	return []tally.Request{
		request("tp-ada", "m2.7", "", tally.Quantity{Unit: tally.Requests, Amount: 1}),
		request("tp-ada", "m2.7", "a", tally.Quantity{Unit: tally.Requests, Amount: 2}),
		request("tp-ada", "music-2.6", "", tally.Quantity{Unit: tally.Songs, Amount: 1},
			tally.Quantity{Unit: tally.Seconds, Amount: 400}),
		request("tp-nobody", "m2.7", "", tally.Quantity{Unit: tally.Requests, Amount: 1}),
		request("tp-ada", "m2.7", "a", tally.Quantity{Unit: tally.Requests, Amount: 2}),
		request("tp-ada", "m2.7", "b", tally.Quantity{Unit: tally.Requests, Amount: 1490}),
		request("tp-ada", "m2.7", "", tally.Quantity{Unit: tally.Requests, Amount: 20}),
	}
}

func withCredits(t *testing.T, engine *tally.Engine) {
	t.Helper()
	seated(t, engine, "ada", "tp-ada", "Starter")
	if _, err := engine.TopUp("@ada", 10_000_000, t0); err != nil {
		t.Fatal(err)
	}
}

func TestSubmissionsDecideAsConsumeDoesAllInFlightAtOnce(t *testing.T) {
	engine, twin := openMemory(t), openMemory(t)
	withCredits(t, engine)
	withCredits(t, twin)
	mix := submissionMix()
	submissions := make([]*tally.Submission, len(mix))
	for i, request := range mix {
		submission, err := engine.Submit(request)
		must(t, err)
		submissions[i] = submission
	}
	kinds := map[string]bool{}
	for i, request := range mix {
		expected := consume(t, twin, request)
		decision, err := submissions[i].Complete()
		must(t, err)
		if !reflect.DeepEqual(decision, expected) {
			t.Fatalf("request %d %+v: submitted %+v, consumed %+v", i, request, decision, expected)
		}
		kinds[fmt.Sprint(decision.Admitted, decision.Replayed, decision.ChargedTo)] = true
	}
	if len(kinds) < 3 {
		t.Fatalf("the mix should hold several kinds of decision: %v", kinds)
	}
	usage, err := engine.Usage("tp-ada", t0)
	must(t, err)
	twinUsage, err := twin.Usage("tp-ada", t0)
	must(t, err)
	if !reflect.DeepEqual(usage, twinUsage) {
		t.Fatalf("usage %+v, twin %+v", usage, twinUsage)
	}
}

func TestSubmitKeepsManyInFlightOnASyncDatabase(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "db")
	engine, err := tally.Open(dir, tally.WithDurability(tally.DurabilitySync), unbounded)
	must(t, err)
	seated(t, engine, "ada", "tp-ada", "Plus")
	submissions := make([]*tally.Submission, 300)
	for i := range submissions {
		submissions[i], err = engine.Submit(tally.Request{Key: "tp-ada", Resource: "m2.7",
			Quantities: one(tally.Requests), At: t0, RequestID: fmt.Sprintf("s%d", i)})
		must(t, err)
	}
	usage, err := engine.Usage("tp-ada", t0)
	must(t, err)
	if usage.Limits[0].Used != 300 {
		t.Fatalf("applied at submission: used %d", usage.Limits[0].Used)
	}
	// Completed from a goroutine each.
	var wait sync.WaitGroup
	decisions := make([]tally.Decision, len(submissions))
	failures := make([]error, len(submissions))
	for i, submission := range submissions {
		wait.Add(1)
		go func(i int, submission *tally.Submission) {
			defer wait.Done()
			decisions[i], failures[i] = submission.Complete()
		}(i, submission)
	}
	wait.Wait()
	for i := range decisions {
		if failures[i] != nil || !decisions[i].Admitted || decisions[i].Replayed {
			t.Fatalf("submission %d: %+v %v", i, decisions[i], failures[i])
		}
	}
	must(t, engine.Close())

	reopened, err := tally.Open(dir, tally.WithDurability(tally.DurabilityNone), unbounded)
	must(t, err)
	defer func() { must(t, reopened.Close()) }()
	usage, err = reopened.Usage("tp-ada", t0)
	must(t, err)
	if usage.Limits[0].Used != 300 {
		t.Fatalf("after reopening: used %d", usage.Limits[0].Used)
	}
	replay, err := reopened.Submit(tally.Request{Key: "tp-ada", Resource: "m2.7",
		Quantities: one(tally.Requests), At: t0, RequestID: "s7"})
	must(t, err)
	durable, err := replay.Durable()
	if err != nil || !durable {
		t.Fatalf("a replay of a durable decision waits for nothing: %v %v", durable, err)
	}
	decision, err := replay.Complete()
	if err != nil || !decision.Replayed {
		t.Fatalf("replay: %+v %v", decision, err)
	}
}

func TestASubmissionCompletesOrIsDiscardedOnceAndBadInputChangesNothing(t *testing.T) {
	engine := openMemory(t)
	withCredits(t, engine)
	request := tally.Request{Key: "tp-ada", Resource: "m2.7", Quantities: one(tally.Requests),
		At: t0, RequestID: "x"}
	submission, err := engine.Submit(request)
	must(t, err)
	if _, err := submission.Complete(); err != nil {
		t.Fatal(err)
	}
	if _, err := submission.Complete(); !errors.Is(err, tally.ErrInvalidArgument) {
		t.Fatalf("a second Complete: %v", err)
	}
	if _, err := submission.Durable(); !errors.Is(err, tally.ErrInvalidArgument) {
		t.Fatalf("Durable after Complete: %v", err)
	}
	submission.Discard() // after Complete: nothing
	discarded, err := engine.Submit(tally.Request{Key: "tp-ada", Resource: "m2.7",
		Quantities: one(tally.Requests), At: t0})
	must(t, err)
	discarded.Discard()
	discarded.Discard()
	if _, err := discarded.Complete(); !errors.Is(err, tally.ErrInvalidArgument) ||
		!strings.Contains(err.Error(), "discarded") {
		t.Fatalf("Complete after Discard: %v", err)
	}
	if _, err := discarded.Durable(); !errors.Is(err, tally.ErrInvalidArgument) ||
		!strings.Contains(err.Error(), "discarded") {
		t.Fatalf("Durable after Discard: %v", err)
	}
	before, err := engine.Usage("tp-ada", t0)
	must(t, err)
	if before.Limits[0].Used != 2 {
		t.Fatalf("the completed and the discarded submission both count: %+v", before.Limits[0])
	}
	conflicting := request
	conflicting.Quantities = []tally.Quantity{{Unit: tally.Requests, Amount: 2}}
	unknown := request
	unknown.Resource, unknown.RequestID = "m9", ""
	zero := request
	zero.Quantities, zero.RequestID = []tally.Quantity{{Unit: tally.Requests, Amount: 0}}, ""
	for _, bad := range []struct {
		request tally.Request
		want    error
	}{
		{conflicting, tally.ErrRequestIDConflict},
		{unknown, tally.ErrUnknownResource},
		{zero, tally.ErrBadQuantity},
	} {
		if submission, err := engine.Submit(bad.request); !errors.Is(err, bad.want) || submission != nil {
			t.Fatalf("%+v: %v %v, want %v", bad.request, submission, err, bad.want)
		}
	}
	after, err := engine.Usage("tp-ada", t0)
	must(t, err)
	if !reflect.DeepEqual(before, after) {
		t.Fatalf("bad input changed the usage: %+v then %+v", before, after)
	}
}

// The close flushed the submission's event: completing it after answers its decision (an
// ErrClosed read as "not admitted", and a retry without a request ID counted it twice).
func TestCompletingAfterCloseAnswersTheDecisionTheCloseKept(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "db")
	engine, err := tally.Open(dir, tally.WithDurability(tally.DurabilitySync), unbounded)
	must(t, err)
	seated(t, engine, "ada", "tp-ada", "Plus")
	submission, err := engine.Submit(tally.Request{Key: "tp-ada", Resource: "m2.7",
		Quantities: []tally.Quantity{{Unit: tally.Requests, Amount: 4}}, At: t0, RequestID: "late"})
	must(t, err)
	must(t, engine.Close())
	// Durable says Complete would return at once, which it does (not ErrClosed).
	if durable, err := submission.Durable(); err != nil || !durable {
		t.Fatalf("Durable after Close: %v %v", durable, err)
	}
	if decision, err := submission.Complete(); err != nil || !decision.Admitted || decision.Replayed {
		t.Fatalf("Complete after Close: %+v %v", decision, err)
	}
	reopened, err := tally.Open(dir, tally.WithDurability(tally.DurabilityNone), unbounded)
	must(t, err)
	defer func() { must(t, reopened.Close()) }()
	usage, err := reopened.Usage("tp-ada", t0)
	must(t, err)
	if usage.Limits[0].Used != 4 {
		t.Fatalf("after reopening: used %d", usage.Limits[0].Used)
	}
}
