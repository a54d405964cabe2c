package tally_test

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	tally "github.com/tally-engine/tally/ffi/go"
)

// Benchmarks of SYNC durability from Go (not run by the tests; `go test -bench . -run '^$'`
// in ffi/go with CGO_LDFLAGS=-L<target>/release, as scripts/test-go.sh sets it):
// Consume from many goroutines (each cgo call holds an OS thread through its fdatasync)
// against Submit with many requests in flight from one goroutine. Every request is admitted
// and logged: the key's team holds credits for whatever its plan does not cover. ns/op is per
// request.

func syncEngine(b *testing.B) *tally.Engine {
	b.Helper()
	engine, err := tally.Open(filepath.Join(b.TempDir(), "db"),
		tally.WithDurability(benchDurability()), unbounded)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = engine.Close() })
	if err := engine.CreateUser("ada", "tp-ada", t0); err != nil {
		b.Fatal(err)
	}
	if err := engine.AssignSeat("@ada", "ada", "Plus", t0); err != nil {
		b.Fatal(err)
	}
	if _, err := engine.TopUp("@ada", 1<<60, t0); err != nil {
		b.Fatal(err)
	}
	return engine
}

var benchRequest = tally.Request{Key: "tp-ada", Resource: "m2.7",
	Quantities: []tally.Quantity{{Unit: tally.Requests, Amount: 1}}}

// fromGoroutines runs a sub-benchmark for each count in `goroutines`: `request` b.N times in
// all, shared among that many goroutines, on one fresh engine (syncEngine). An error stops its
// goroutine and fails the benchmark.
func fromGoroutines(b *testing.B, goroutines []int, request func(*tally.Engine) error) {
	for _, count := range goroutines {
		b.Run(fmt.Sprintf("goroutines=%d", count), func(b *testing.B) {
			engine := syncEngine(b)
			var next atomic.Int64
			var wait sync.WaitGroup
			b.ResetTimer()
			for g := 0; g < count; g++ {
				wait.Add(1)
				go func() {
					defer wait.Done()
					for next.Add(1) <= int64(b.N) {
						if err := request(engine); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wait.Wait()
		})
	}
}

func BenchmarkConsumeSync(b *testing.B) {
	fromGoroutines(b, []int{1, 16, 256}, func(engine *tally.Engine) error {
		decision, err := engine.Consume(benchRequest)
		if err == nil && !decision.Admitted {
			err = fmt.Errorf("consume: not admitted: %+v", decision)
		}
		return err
	})
}

func BenchmarkSubmitSync(b *testing.B) {
	for _, inFlight := range []int{16, 256, 1000} {
		b.Run(fmt.Sprintf("in-flight=%d", inFlight), func(b *testing.B) {
			engine := syncEngine(b)
			window := make([]*tally.Submission, 0, inFlight)
			complete := func(submission *tally.Submission) {
				decision, err := submission.Complete()
				if err != nil || !decision.Admitted {
					b.Fatalf("%+v %v", decision, err)
				}
			}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if len(window) == inFlight {
					complete(window[0])
					window = window[1:]
				}
				submission, err := engine.Submit(benchRequest)
				if err != nil {
					b.Fatal(err)
				}
				window = append(window, submission)
			}
			for _, submission := range window {
				complete(submission)
			}
		})
	}
}

// benchDurability is DurabilitySync, or DurabilityNone with TALLY_GO_BENCH_DURABILITY=none
// (what the calls cost without the disk).
func benchDurability() tally.Durability {
	if os.Getenv("TALLY_GO_BENCH_DURABILITY") == "none" {
		return tally.DurabilityNone
	}
	return tally.DurabilitySync
}

// BenchmarkReserveSettleSync: a reservation and its settlement per request (what a gateway
// billing by tokens does) from many goroutines. ns/op is per reserve-and-settle pair.
func BenchmarkReserveSettleSync(b *testing.B) {
	fromGoroutines(b, []int{1, 16, 64}, func(engine *tally.Engine) error {
		decision, reservation, err := engine.Reserve(benchRequest, 0)
		if err == nil && !decision.Admitted {
			err = fmt.Errorf("reserve: not admitted: %+v", decision)
		}
		if err != nil {
			return err
		}
		_, err = engine.Settle(reservation, benchRequest.Quantities, time.Time{})
		return err
	})
}
