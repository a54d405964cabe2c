package tally_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	tally "github.com/tally-engine/tally/ffi/go"
)

// The README's Go example (keep the two in step).
func Example() {
	dir, _ := os.MkdirTemp("", "tally-example")
	defer os.RemoveAll(dir)

	engine, err := tally.Open(filepath.Join(dir, "tally-data"), // shipped policy, fsync before acknowledging
		tally.WithOptions(tally.Options{MaxKeys: 100_000})) // zero fields keep their defaults
	if err != nil {
		panic(err)
	}
	defer engine.Close()                                      // idempotent; later calls return tally.ErrClosed
	_ = engine.CreateUser("ada", "tp-ada-1", time.Time{})     // zero time: the engine's clock
	_ = engine.AssignSeat("@ada", "ada", "Plus", time.Time{}) // a seat makes the key usable

	decision, err := engine.Consume(tally.Request{Key: "tp-ada-1", Resource: "m2.7",
		Quantities: []tally.Quantity{{Unit: tally.Requests, Amount: 1}}, RequestID: "req-42"})
	switch {
	case err != nil: // bad input, storage, ...: errors.Is(err, tally.ErrUnknownResource)
		panic(err)
	case !decision.Admitted: // e.g. tally.DenialQuotaExhausted: 429, Retry-After from RetryAfter
		fmt.Printf("denied by %s; retry in %v\n", decision.LimitName, decision.RetryAfter)
	default:
		fmt.Printf("%s: %d of %d left\n", decision.ChargedTo, decision.Remaining, decision.LimitAmount)
	}
	// Output: plan_quota: 4499 of 4500 left
}

// Options: only what differs from the defaults; a value out of range is ErrInvalidArgument.
func ExampleWithOptions() {
	engine, err := tally.OpenInMemory(tally.WithOptions(tally.Options{
		MaxKeys:          1,
		DefaultLease:     30 * time.Second,
		ReclaimIdleEvery: -1, // never on its own (the engine's 0)
	}))
	if err != nil {
		panic(err)
	}
	defer engine.Close()
	_ = engine.CreateUser("ada", "tp-ada-1", time.Time{})
	err = engine.CreateUser("bo", "tp-bo-1", time.Time{})
	fmt.Println(errors.Is(err, tally.ErrCapacityExceeded))

	_, err = tally.OpenInMemory(tally.WithOptions(tally.Options{MaxPolicyGenerations: 1}))
	fmt.Println(errors.Is(err, tally.ErrInvalidArgument))
	// Output:
	// true
	// true
}
