package tally_test

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	tally "github.com/tally-engine/tally/ffi/go"
)

// t0 is 2030-03-17T17:46:40Z, where the tests' engines' own clocks stand.
var t0 = time.UnixMilli(1_900_000_000_000)

// unbounded opens an engine on a clock of its own at t0 (the engine forgets request ids and
// closed reservations, ends leases and frees idle keys relative to its clock, so what it does
// must not depend on the day the tests run), with no bound on how far ahead of it a time may
// be (some tests stamp days after t0).
var unbounded = tally.WithOptions(tally.Options{MaxAheadOfClock: -1, ManualClock: t0})

func at(ms int64) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }

func one(unit tally.Unit) []tally.Quantity { return []tally.Quantity{{Unit: unit, Amount: 1}} }

func openMemory(t *testing.T) *tally.Engine {
	t.Helper()
	engine, err := tally.OpenInMemory(unbounded)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := engine.Close(); err != nil {
			t.Error(err)
		}
	})
	return engine
}

// seated creates user with key on plan in their Default Team.
func seated(t *testing.T, engine *tally.Engine, user, key, plan string) {
	t.Helper()
	must(t, engine.CreateUser(user, key, t0))
	if plan != "" {
		must(t, engine.AssignSeat("@"+user, user, plan, t0))
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func consume(t *testing.T, engine *tally.Engine, request tally.Request) tally.Decision {
	t.Helper()
	decision, err := engine.Consume(request)
	if err != nil {
		t.Fatal(err)
	}
	return decision
}

// limitAmount reads a limit's amount from the key's usage report, so tests follow the
// shipped policy instead of repeating its numbers.
func limitAmount(t *testing.T, engine *tally.Engine, key, namePrefix string) uint64 {
	t.Helper()
	usage, err := engine.Usage(key, t0)
	must(t, err)
	for _, limit := range usage.Limits {
		if strings.HasPrefix(limit.Name, namePrefix) {
			return limit.Amount
		}
	}
	t.Fatalf("no limit %q in %+v", namePrefix, usage.Limits)
	return 0
}

func TestTheLinkedLibraryHasTheHeadersVersion(t *testing.T) {
	if tally.LibraryVersion() != tally.Version {
		t.Fatalf("library %s, header %s", tally.LibraryVersion(), tally.Version)
	}
}

func TestAStarterKeyGetsItsFiveHourRequestQuotaThenARetryAfter(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "ada", "tp-ada", "Starter")
	limit := limitAmount(t, engine, "tp-ada", "m2.7:requests")
	request := tally.Request{Key: "tp-ada", Resource: "m2.7", Quantities: one(tally.Requests)}
	for i := uint64(0); i < limit; i++ {
		request.At = at(int64(i))
		decision := consume(t, engine, request)
		if !decision.Admitted || decision.ChargedTo != tally.ChargedToPlanQuota {
			t.Fatalf("request %d: %+v", i, decision)
		}
		if decision.Remaining != limit-i-1 || decision.Plan != "Starter" {
			t.Fatalf("request %d: remaining %d plan %q", i, decision.Remaining, decision.Plan)
		}
	}
	request.At = at(int64(limit))
	denied := consume(t, engine, request)
	if denied.Admitted || denied.Denial != tally.DenialQuotaExhausted {
		t.Fatalf("over the quota: %+v", denied)
	}
	// The first requests age out of the rolling window about 5 hours after they were counted
	// (the window counts in buckets, so up to a bucket later).
	if denied.RetryAt.Sub(request.At) != denied.RetryAfter ||
		denied.RetryAt.Before(t0.Add(5*time.Hour)) || denied.RetryAt.After(t0.Add(5*time.Hour+5*time.Minute)) {
		t.Fatalf("retry after %v at %v", denied.RetryAfter, denied.RetryAt)
	}
	if !strings.Contains(denied.LimitName, "m2.7") || denied.LimitIndex < 0 || denied.UpgradePlan == "" {
		t.Fatalf("denial names %q (index %d), upgrade %q", denied.LimitName, denied.LimitIndex, denied.UpgradePlan)
	}
	request.At = denied.RetryAt.Add(-time.Millisecond)
	if early := consume(t, engine, request); early.Admitted {
		t.Fatalf("just before the retry time: %+v", early)
	}
	request.At = denied.RetryAt
	if again := consume(t, engine, request); !again.Admitted {
		t.Fatalf("at the retry time: %+v", again)
	}
}

func TestADailyQuotaResetsAtLocalMidnight(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "bo", "tp-bo", "Starter")
	songs := limitAmount(t, engine, "tp-bo", "music-2.6:songs")
	request := tally.Request{Key: "tp-bo", Resource: "music-2.6",
		Quantities: []tally.Quantity{{Unit: tally.Songs, Amount: 1}, {Unit: tally.Seconds, Amount: 200}}}
	for i := uint64(0); i < songs; i++ {
		request.At = at(int64(i))
		if decision := consume(t, engine, request); !decision.Admitted {
			t.Fatalf("song %d: %+v", i, decision)
		}
	}
	request.At = at(int64(songs))
	denied := consume(t, engine, request)
	if denied.Admitted || denied.Denial != tally.DenialQuotaExhausted {
		t.Fatalf("over the daily quota: %+v", denied)
	}
	shanghai := time.FixedZone("UTC+8", 8*3600) // the shipped policy's zone, Asia/Shanghai
	local := denied.ResetAt.In(shanghai)
	if local.Hour() != 0 || local.Minute() != 0 || !denied.ResetAt.After(t0) || denied.ResetAt.Sub(t0) > 24*time.Hour {
		t.Fatalf("resets at %v", local)
	}
	request.At = denied.ResetAt
	if next := consume(t, engine, request); !next.Admitted {
		t.Fatalf("after midnight: %+v", next)
	}
	// One song is at most 300 seconds: over the per-request maximum, whatever the quota.
	long := tally.Request{Key: "tp-bo", Resource: "music-2.6", At: denied.ResetAt,
		Quantities: []tally.Quantity{{Unit: tally.Songs, Amount: 1}, {Unit: tally.Seconds, Amount: 301}}}
	over := consume(t, engine, long)
	if over.Denial != tally.DenialOverRequestMaximum || over.Unit != tally.Seconds || over.Maximum != 300 {
		t.Fatalf("a 301-second song: %+v", over)
	}
}

func TestCreditsPayOnceThePlanQuotaIsExhausted(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "cy", "tp-cy", "Starter")
	limit := limitAmount(t, engine, "tp-cy", "m2.7:requests")
	request := tally.Request{Key: "tp-cy", Resource: "m2.7", Quantities: one(tally.Requests), At: t0}
	for i := uint64(0); i < limit; i++ {
		consume(t, engine, request)
	}
	denied := consume(t, engine, request)
	if denied.Admitted || denied.CreditsNeededMicros == 0 {
		t.Fatalf("before the top-up: %+v", denied)
	}
	balance, err := engine.TopUp("@cy", 1_000_000, t0)
	must(t, err)
	if balance != 1_000_000 {
		t.Fatalf("balance %d", balance)
	}
	paid := consume(t, engine, request)
	if !paid.Admitted || paid.ChargedTo != tally.ChargedToCredits || paid.ChargedMicros != denied.CreditsNeededMicros {
		t.Fatalf("after the top-up: %+v (needed %d)", paid, denied.CreditsNeededMicros)
	}
	left, err := engine.Credits("@cy")
	must(t, err)
	if left != balance-paid.ChargedMicros || !paid.HasCreditsBalance || paid.CreditsBalanceMicros != left {
		t.Fatalf("credits %d after paying %d: %+v", left, paid.ChargedMicros, paid)
	}
	usage, err := engine.Usage("tp-cy", t0)
	must(t, err)
	if usage.CreditsChargedMicros != paid.ChargedMicros || usage.CreditsBalanceMicros != left {
		t.Fatalf("usage %+v", usage)
	}
	left, err = engine.WithdrawCredits("@cy", left, t0)
	if err != nil || left != 0 {
		t.Fatalf("withdraw: %d %v", left, err)
	}
	if _, err := engine.WithdrawCredits("@cy", 1, t0); !errors.Is(err, tally.ErrInsufficientCredits) {
		t.Fatalf("withdraw from nothing: %v", err)
	}
}

func TestAKeyBeforeAnySeatHasNoResourcesUntilOneIsAssigned(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "di", "tp-di", "")
	request := tally.Request{Key: "tp-di", Resource: "m2.7", Quantities: one(tally.Requests), At: t0}
	if decision := consume(t, engine, request); decision.Admitted || decision.Denial != tally.DenialNoResources {
		t.Fatalf("no seat: %+v", decision)
	}
	must(t, engine.AssignSeat("@di", "di", "Plus", t0))
	if decision := consume(t, engine, request); !decision.Admitted || decision.Plan != "Plus" {
		t.Fatalf("seated: %+v", decision)
	}
	must(t, engine.UnassignSeat("@di", "di", t0))
	if decision := consume(t, engine, request); decision.Denial != tally.DenialNoResources {
		t.Fatalf("unseated: %+v", decision)
	}
	unknown := tally.Request{Key: "tp-nobody", Resource: "m2.7", Quantities: one(tally.Requests), At: t0}
	if decision := consume(t, engine, unknown); decision.Denial != tally.DenialUnknownKey {
		t.Fatalf("unknown key: %+v", decision)
	}
}

func TestAPayAsYouGoKeyIsAdmittedAndBilled(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "ed", "tp-ed", "")
	must(t, engine.CreatePaygKey("ed", "pg-ed", t0))
	request := tally.Request{Key: "pg-ed", Resource: "m2.7", At: t0,
		Quantities: []tally.Quantity{{Unit: tally.Requests, Amount: 1}, {Unit: tally.Tokens, Amount: 1000}}}
	decision := consume(t, engine, request)
	if !decision.Admitted || decision.ChargedTo != tally.ChargedToPayAsYouGo || decision.ChargedMicros == 0 {
		t.Fatalf("pay as you go: %+v", decision)
	}
	usage, err := engine.Usage("pg-ed", t0)
	must(t, err)
	if usage.Kind != "pay_as_you_go" || usage.PayAsYouGoMicros != decision.ChargedMicros || usage.User != "ed" {
		t.Fatalf("usage %+v", usage)
	}
}

func TestARequestIDIsCountedOnceAndRefundedOnce(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "fa", "tp-fa", "Plus")
	request := tally.Request{Key: "tp-fa", Resource: "m2.7", Quantities: one(tally.Requests), At: t0, RequestID: "req-1"}
	first := consume(t, engine, request)
	second := consume(t, engine, request)
	if !first.Admitted || first.Replayed || !second.Replayed || second.Remaining != first.Remaining {
		t.Fatalf("first %+v second %+v", first, second)
	}
	conflict := request
	conflict.Quantities = []tally.Quantity{{Unit: tally.Requests, Amount: 2}}
	if _, err := engine.Consume(conflict); !errors.Is(err, tally.ErrRequestIDConflict) {
		t.Fatalf("same id, other amount: %v", err)
	}
	must(t, engine.Refund("req-1", t0))
	usage, err := engine.Usage("tp-fa", t0)
	must(t, err)
	if usage.Limits[0].Used != 0 {
		t.Fatalf("after the refund: %+v", usage.Limits[0])
	}
	if err := engine.Refund("req-1", t0); !errors.Is(err, tally.ErrInvalidArgument) {
		t.Fatalf("second refund: %v", err)
	}
	if err := engine.Refund("req-none", t0); !errors.Is(err, tally.ErrUnknownRequest) {
		t.Fatalf("unknown id: %v", err)
	}
}

func TestAdjustingUsageMovesItInEveryLimitAndReclaimingFreesIdleKeys(t *testing.T) {
	engine := openMemory(t) // its own: a reclaim moves idle keys' time forward
	seated(t, engine, "ju", "tp-ju", "Starter")
	seated(t, engine, "ko", "tp-ko", "")
	request := tally.Request{Key: "tp-ju", Resource: "m2.7", Quantities: one(tally.Requests)}
	for i := int64(0); i < 10; i++ {
		request.At = at(i)
		consume(t, engine, request)
	}
	requests := func(n uint64) []tally.Quantity { return []tally.Quantity{{Unit: tally.Requests, Amount: n}} }
	const name = "m2.7:requests per rolling:5h"

	added, err := engine.AdjustUsage("tp-ju", "m2.7", requests(30), t0, tally.AdjustAdd, at(1000))
	must(t, err)
	if len(added.Limits) != 1 || added.Limits[0] != (tally.AdjustedLimit{LimitIndex: 0, Name: name, Moved: 30}) {
		t.Fatalf("added: %+v", added)
	}
	request.At = at(2000)
	checked, err := engine.Check(request)
	must(t, err)
	if checked.Limits[0].Used != 10+30+1 { // the checked request counts itself
		t.Fatalf("check after adding 30: %+v", checked.Limits)
	}
	if reclaimed, err := engine.ReclaimIdle(at(2000)); err != nil || reclaimed != 0 {
		t.Fatalf("reclaim while usage counts: %d, %v", reclaimed, err)
	}
	stats, err := engine.MemoryStats()
	must(t, err)
	if stats.Keys != 2 || stats.KeysWithUsage != 1 || stats.UsageBytes == 0 || stats.TableBytes == 0 {
		t.Fatalf("stats with usage: %+v", stats)
	}

	removed, err := engine.AdjustUsage("tp-ju", "m2.7", requests(50), t0, tally.AdjustRemove, at(3000))
	must(t, err)
	if len(removed.Limits) != 1 || removed.Limits[0].Moved != 40 || removed.Limits[0].Name != name {
		t.Fatalf("removing 50 of 40: %+v", removed)
	}
	usage, err := engine.Usage("tp-ju", at(3000))
	must(t, err)
	if usage.Limits[0].Used != 0 {
		t.Fatalf("after removing: %+v", usage.Limits[0])
	}

	bad := []struct {
		name      string
		key       string
		direction tally.AdjustmentDirection
		usageAt   time.Time
		want      error
		mentions  string
	}{
		{"an unknown key", "tp-nobody", tally.AdjustAdd, t0, tally.ErrUnknownKey, "tp-nobody"},
		{"an invalid direction", "tp-ju", 7, t0, tally.ErrBadEnum, "direction"},
		{"usage after at", "tp-ju", tally.AdjustAdd, at(3001), tally.ErrInvalidArgument, "usage_at"},
		{"a key without a seat", "tp-ko", tally.AdjustAdd, t0, tally.ErrInvalidArgument, "no seat"},
		{"no usage time", "tp-ju", tally.AdjustAdd, time.Time{}, tally.ErrBadTimestamp, "usageAt"},
		{"usage before 1970", "tp-ju", tally.AdjustAdd, time.Unix(-1, 0), tally.ErrBadTimestamp, "usageAt"},
	}
	for _, c := range bad {
		_, err := engine.AdjustUsage(c.key, "m2.7", requests(5), c.usageAt, c.direction, at(3000))
		var tallyError *tally.Error
		if !errors.Is(err, c.want) || !errors.As(err, &tallyError) || !strings.Contains(tallyError.Message, c.mentions) {
			t.Errorf("%s: got %v, want %v mentioning %q", c.name, err, c.want, c.mentions)
		}
	}
	// Two times: a bad one says which.
	_, err = engine.AdjustUsage("tp-ju", "m2.7", requests(5), t0, tally.AdjustAdd, time.Unix(-1, 0))
	var atError *tally.Error
	if !errors.Is(err, tally.ErrBadTimestamp) || !errors.As(err, &atError) ||
		!strings.HasPrefix(atError.Message, "at: ") {
		t.Errorf("at before 1970: got %v, want ErrBadTimestamp naming at", err)
	}

	request.At = at(3000)
	consume(t, engine, request)
	if reclaimed, err := engine.ReclaimIdle(at(3000)); err != nil || reclaimed != 0 {
		t.Fatalf("reclaim while a request counts: %d, %v", reclaimed, err)
	}
	later := t0.Add(6 * time.Hour)
	if reclaimed, err := engine.ReclaimIdle(later); err != nil || reclaimed != 1 {
		t.Fatalf("reclaim once the usage aged out: %d, %v", reclaimed, err)
	}
	stats, err = engine.MemoryStats()
	must(t, err)
	if stats.Keys != 2 || stats.KeysWithUsage != 0 || stats.UsageBytes != 0 {
		t.Fatalf("stats after the reclaim: %+v", stats)
	}
	request.At = later
	next := consume(t, engine, request)
	if !next.Admitted || next.Limits[0].Used != 1 || next.Remaining != next.LimitAmount-1 {
		t.Fatalf("the first request after the reclaim: %+v", next)
	}
}

func TestCheckCountsNothing(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "gu", "tp-gu", "Starter")
	request := tally.Request{Key: "tp-gu", Resource: "m2.7", Quantities: one(tally.Requests), At: t0}
	for i := 0; i < 3; i++ {
		decision, err := engine.Check(request)
		must(t, err)
		if !decision.Admitted || decision.Remaining != decision.LimitAmount-1 {
			t.Fatalf("check: %+v", decision)
		}
	}
	usage, err := engine.Usage("tp-gu", t0)
	must(t, err)
	if usage.Limits[0].Used != 0 {
		t.Fatalf("after checks: %+v", usage.Limits[0])
	}
}

func TestBadInputIsAnErrorWithItsOwnSentinelAndTheLibrarysMessage(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "ha", "tp-ha", "Starter")
	good := tally.Request{Key: "tp-ha", Resource: "m2.7", Quantities: one(tally.Requests), At: t0}
	cases := []struct {
		name   string
		change func(*tally.Request)
		want   error
	}{
		{"an empty key", func(r *tally.Request) { r.Key = "" }, tally.ErrEmptyString},
		{"a NUL in the key", func(r *tally.Request) { r.Key = "tp\x00ha" }, tally.ErrNulInString},
		{"a key that is not UTF-8", func(r *tally.Request) { r.Key = "tp-\xff" }, tally.ErrInvalidUTF8},
		{"a key over the bound", func(r *tally.Request) { r.Key = strings.Repeat("k", tally.MaxIDBytes+1) }, tally.ErrStringTooLong},
		{"an unknown resource", func(r *tally.Request) { r.Resource = "gpt-9" }, tally.ErrUnknownResource},
		{"no quantities", func(r *tally.Request) { r.Quantities = nil }, tally.ErrBadQuantity},
		{"a zero quantity", func(r *tally.Request) { r.Quantities[0].Amount = 0 }, tally.ErrBadQuantity},
		{"the largest quantity", func(r *tally.Request) { r.Quantities[0].Amount = ^uint64(0) }, tally.ErrBadQuantity},
		{"a unit twice", func(r *tally.Request) { r.Quantities = append(r.Quantities, r.Quantities[0]) }, tally.ErrBadQuantity},
		{"an unknown unit", func(r *tally.Request) { r.Quantities[0].Unit = 99 }, tally.ErrBadEnum},
		{"a time before 1970", func(r *tally.Request) { r.At = time.Unix(-1, 0) }, tally.ErrBadTimestamp},
		{"the year 2100", func(r *tally.Request) { r.At = time.Date(2100, 1, 1, 0, 0, 0, 0, time.UTC) }, tally.ErrBadTimestamp},
		// Times whose milliseconds overflow int64 must not wrap around into tally's range:
		// this one, 584 million years ahead, wraps to t0 + 384 ms, and the other to t0 + 616 ms.
		{"a time whose milliseconds wrap", func(r *tally.Request) { r.At = time.Unix(18_446_745_973_709_552, 0) }, tally.ErrBadTimestamp},
		{"a time before 1970 whose milliseconds wrap", func(r *tally.Request) { r.At = time.Unix(-18_446_742_173_709_551, 0) }, tally.ErrBadTimestamp},
		{"an empty request id", func(r *tally.Request) { r.RequestID = "" }, nil},
		{"a NUL in the request id", func(r *tally.Request) { r.RequestID = "a\x00" }, tally.ErrNulInString},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			request := good
			request.Quantities = append([]tally.Quantity(nil), good.Quantities...)
			c.change(&request)
			_, err := engine.Check(request)
			if !errors.Is(err, c.want) || (c.want == nil) != (err == nil) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
			var tallyError *tally.Error
			if err != nil && (!errors.As(err, &tallyError) || tallyError.Message == "" ||
				!strings.HasPrefix(tallyError.Status.String(), "TALLY_")) {
				t.Fatalf("no detail: %#v", err)
			}
		})
	}
	if _, _, err := engine.Reserve(good, -time.Second); !errors.Is(err, tally.ErrInvalidArgument) {
		t.Fatalf("negative lease: %v", err)
	}
	// Half a millisecond must not become 0, the default 10-minute lease; nothing is held.
	for _, lease := range []time.Duration{500 * time.Microsecond, time.Second + time.Nanosecond} {
		decision, reservation, err := engine.Reserve(good, lease)
		if !errors.Is(err, tally.ErrInvalidArgument) || !strings.Contains(err.Error(), "lease") {
			t.Fatalf("lease %v: %v, %v, %v", lease, decision, reservation, err)
		}
	}
}

// A time is passed to the millisecond, its fraction dropped (floored, as time.Time.UnixMilli
// does): the usage is counted at the millisecond the time falls in. A time within the first
// millisecond after the epoch would floor to 0, which the library reads as "now" (TALLY_NOW):
// refused, not sent as the engine's clock.
func TestATimesFractionOfAMillisecondIsDroppedNeverMakingItNow(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "fl", "tp-fl", "Starter")
	at := t0.Add(999*time.Microsecond + 999*time.Nanosecond)
	decision, err := engine.Consume(tally.Request{Key: "tp-fl", Resource: "m2.7", Quantities: one(tally.Requests), At: at})
	if err != nil || !decision.Admitted || !decision.At.Equal(t0) {
		t.Fatalf("at %v: %+v, %v; want admitted at %v", at, decision, err, t0)
	}
	for _, early := range []time.Time{time.Unix(0, 1), time.Unix(0, int64(time.Millisecond)-1)} {
		request := tally.Request{Key: "tp-fl", Resource: "m2.7", Quantities: one(tally.Requests), At: early}
		if _, err := engine.Check(request); !errors.Is(err, tally.ErrBadTimestamp) {
			t.Fatalf("at %v: %v, want ErrBadTimestamp", early, err)
		}
		if err := engine.SetClock(early); !errors.Is(err, tally.ErrInvalidArgument) {
			t.Fatalf("SetClock(%v): %v, want ErrInvalidArgument", early, err)
		}
	}
}

// A time far past 2100 is refused as past 2100, whatever its milliseconds do in an int64: the
// last second whose milliseconds fit, with its last milliseconds, overflows into the negative.
func TestATimeFarAheadIsRefusedAsAfter2100NotAsBefore1970(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "fa", "tp-fa", "Starter")
	const lastSecond = (1<<63 - 1) / 1000
	for _, far := range []time.Time{
		time.Date(2100, 1, 1, 0, 0, 0, 0, time.UTC),
		time.Unix(lastSecond, 0),
		time.Unix(lastSecond, 807_000_000),
		time.Unix(lastSecond, 808_000_000),
		time.Unix(lastSecond, 999_999_999),
		time.Unix(lastSecond+1, 0),
	} {
		request := tally.Request{Key: "tp-fa", Resource: "m2.7", Quantities: one(tally.Requests), At: far}
		_, err := engine.Consume(request)
		_, adjustErr := engine.AdjustUsage("tp-fa", "m2.7", one(tally.Requests), far, tally.AdjustAdd, t0)
		_, expireErr := engine.ExpireReservations(far)
		for _, err := range []error{err, adjustErr, expireErr} {
			if !errors.Is(err, tally.ErrBadTimestamp) || !strings.Contains(err.Error(), "2100") ||
				strings.Contains(err.Error(), "1970") {
				t.Errorf("%s: %v", far.UTC().Format(time.RFC3339Nano), err)
			}
		}
	}
}

func TestAdminCallsReportWhatIsWrong(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "io", "tp-io", "Starter")
	checks := []struct {
		name string
		err  error
		want error
	}{
		{"the same user again", engine.CreateUser("io", "tp-io-2", t0), tally.ErrAlreadyExists},
		{"the same key again", engine.CreateUser("jo", "tp-io", t0), tally.ErrAlreadyExists},
		{"an unknown plan", engine.AssignSeat("@io", "io", "Gold", t0), tally.ErrUnknownPlan},
		{"an unknown team", engine.AssignSeat("@nobody", "io", "Plus", t0), tally.ErrUnknownTeam},
		{"an unknown user", engine.AddMember("@io", "nobody", "tp-x", t0), tally.ErrUnknownUser},
		{"a new team", engine.CreateTeam("acme", t0), nil},
		{"a member of it", engine.AddMember("acme", "io", "tp-io-acme", t0), nil},
		{"a seat in it", engine.AssignSeat("acme", "io", "Max", t0), nil},
		{"a seat for a non-member", engine.UnassignSeat("acme", "jo", t0), tally.ErrUnknownUser},
		{"an empty team", engine.CreateTeam("", t0), tally.ErrEmptyString},
	}
	for _, c := range checks {
		if !errors.Is(c.err, c.want) || (c.want == nil) != (c.err == nil) {
			t.Errorf("%s: got %v, want %v", c.name, c.err, c.want)
		}
	}
	if _, err := engine.Credits("nowhere"); !errors.Is(err, tally.ErrUnknownTeam) {
		t.Errorf("credits of an unknown team: %v", err)
	}
	// A balance and everything charged add up to at most 2^63 - 1 micro-credits.
	if _, err := engine.TopUp("acme", ^uint64(0), t0); !errors.Is(err, tally.ErrOverflow) {
		t.Errorf("a top-up of 2^64 - 1: %v", err)
	}
	_, err := engine.TopUp("acme", 1<<63-1, t0)
	must(t, err)
	if _, err := engine.TopUp("acme", 1, t0); !errors.Is(err, tally.ErrOverflow) {
		t.Errorf("a top-up past 2^63 - 1: %v", err)
	}
	if _, err := engine.Usage("tp-nobody", t0); !errors.Is(err, tally.ErrUnknownKey) {
		t.Errorf("usage of an unknown key: %v", err)
	}
	if _, err := engine.EventsAfter(0, 10); !errors.Is(err, tally.ErrNotDurable) {
		t.Errorf("events of an in-memory engine: %v", err)
	}
}

func TestReservationsHoldAnEstimateAndSettleTheActualTokens(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "ka", "tp-ka", "Starter")
	estimate := tally.Request{Key: "tp-ka", Resource: "m2.7", At: t0,
		Quantities: []tally.Quantity{{Unit: tally.Requests, Amount: 1}, {Unit: tally.Tokens, Amount: 4000}}}
	decision, reservation, err := engine.Reserve(estimate, time.Minute)
	must(t, err)
	if !decision.Admitted || reservation == 0 {
		t.Fatalf("reserve: %+v %d", decision, reservation)
	}
	usage, err := engine.Usage("tp-ka", t0)
	must(t, err)
	if usage.OpenReservations != 1 || usage.Limits[0].Used != 1 {
		t.Fatalf("while open: %+v", usage)
	}
	settled, err := engine.Settle(reservation, []tally.Quantity{{Unit: tally.Requests, Amount: 1}, {Unit: tally.Tokens, Amount: 1234}}, at(10))
	must(t, err)
	if !settled.Admitted {
		t.Fatalf("settle: %+v", settled)
	}
	if err := engine.Void(reservation, at(20)); !errors.Is(err, tally.ErrReservationClosed) {
		t.Fatalf("void after settle: %v", err)
	}
	_, second, err := engine.Reserve(estimate, 0)
	must(t, err)
	must(t, engine.Void(second, at(30)))
	must(t, engine.Void(second, at(31))) // voiding again is a no-op
	if _, err := engine.Settle(second, nil, at(40)); !errors.Is(err, tally.ErrReservationClosed) {
		t.Fatalf("settle after void: %v", err)
	}
	if _, err := engine.Settle(987654, nil, at(40)); !errors.Is(err, tally.ErrUnknownReservation) {
		t.Fatalf("unknown reservation: %v", err)
	}
	_, third, err := engine.Reserve(estimate, time.Second)
	must(t, err)
	expired, err := engine.ExpireReservations(at(10_000))
	if err != nil || expired != 1 || third == 0 {
		t.Fatalf("expired %d: %v", expired, err)
	}
	usage, err = engine.Usage("tp-ka", at(10_000))
	must(t, err)
	if usage.OpenReservations != 0 || usage.Limits[0].Used != 1 {
		t.Fatalf("after settle, void and expiry: %+v", usage)
	}
}

func TestConsumeManyDecidesEachRequestOnItsOwn(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "lu", "tp-lu", "Starter")
	requests := []tally.Request{
		{Key: "tp-lu", Resource: "m2.7", Quantities: one(tally.Requests), At: t0, RequestID: "a"},
		{Key: "tp-lu", Resource: "no-such-model", Quantities: one(tally.Requests), At: t0},
		{Key: "", Resource: "m2.7", Quantities: one(tally.Requests), At: t0},
		{Key: "tp-nobody", Resource: "m2.7", Quantities: one(tally.Requests), At: t0},
		{Key: "tp-lu", Resource: "m2.7", Quantities: one(tally.Requests), At: t0, RequestID: "a"},
	}
	results, err := engine.ConsumeMany(requests)
	must(t, err)
	if !results[0].Decision.Admitted || !errors.Is(results[1].Err, tally.ErrUnknownResource) ||
		!errors.Is(results[2].Err, tally.ErrEmptyString) || results[3].Decision.Denial != tally.DenialUnknownKey ||
		!results[4].Decision.Admitted {
		t.Fatalf("results %+v", results)
	}
	// The repeated request id counted once.
	usage, err := engine.Usage("tp-lu", t0)
	must(t, err)
	if usage.Limits[0].Used != 1 {
		t.Fatalf("usage %+v", usage.Limits[0])
	}
	if _, err := engine.ConsumeMany(nil); !errors.Is(err, tally.ErrInvalidArgument) {
		t.Fatalf("an empty batch: %v", err)
	}
	// Too many: the message says how many were given and the bound by the package's name.
	_, err = engine.ConsumeMany(make([]tally.Request, tally.MaxBatch+1))
	if !errors.Is(err, tally.ErrInvalidArgument) || !strings.Contains(err.Error(), "requests: 4097 given") ||
		!strings.Contains(err.Error(), "MaxBatch (4096)") {
		t.Fatalf("a batch of MaxBatch + 1: %v", err)
	}
}

// The package names the entry and, for a string the library refused, the argument, in the
// words the library uses for it alone.
func TestAConsumeManyEntrysErrorNamesTheRequestAndTheArgumentAtFault(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "mo", "tp-mo", "Starter")
	good := tally.Request{Key: "tp-mo", Resource: "m2.7", Quantities: one(tally.Requests), At: t0}
	bad := []func(*tally.Request){
		func(r *tally.Request) { r.Key = "tp\x00mo" },
		func(r *tally.Request) { r.Resource = "m2.\xff" },
		func(r *tally.Request) { r.Resource = "" },
		func(r *tally.Request) { r.RequestID = strings.Repeat("r", tally.MaxIDBytes+1) },
		func(r *tally.Request) { r.RequestID = "r\x00" },
	}
	requests := []tally.Request{good}
	for _, change := range bad {
		request := good
		change(&request)
		requests = append(requests, request)
	}
	results, err := engine.ConsumeMany(requests)
	must(t, err)
	if !results[0].Decision.Admitted {
		t.Fatalf("the good request: %+v", results[0])
	}
	for i, request := range requests[1:] {
		index := i + 1
		_, alone := engine.Check(request)
		var want, got *tally.Error
		if !errors.As(alone, &want) || !errors.As(results[index].Err, &got) {
			t.Fatalf("requests[%d]: %v, alone %v", index, results[index].Err, alone)
		}
		if got.Status != want.Status || got.Message != fmt.Sprintf("requests[%d].%s", index, want.Message) {
			t.Errorf("requests[%d]: %q (%s), alone %q (%s)", index, got.Message, got.Status, want.Message, want.Status)
		}
	}
	unknown := good
	unknown.Resource = "gpt-9"
	results, err = engine.ConsumeMany([]tally.Request{unknown})
	must(t, err)
	if !errors.Is(results[0].Err, tally.ErrUnknownResource) || !strings.Contains(results[0].Err.Error(), "requests[0]") {
		t.Errorf("an unknown resource: %v", results[0].Err)
	}
}

// An entry the engine refuses, not for a string (a zero quantity, a unit the model does not
// meter, an unknown model), says what the same request alone is refused with, in the
// library's own words for the entry (tally_batch_entry_error), naming the entry.
func TestAConsumeManyEntryTheEngineRefusesSaysWhatTheCallAloneSays(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "mo", "tp-mo", "Starter")
	good := tally.Request{Key: "tp-mo", Resource: "m2.7", Quantities: one(tally.Requests), At: t0}
	zero, images, unknown := good, good, good
	zero.Quantities = []tally.Quantity{{Unit: tally.Requests, Amount: 0}}
	images.Quantities = []tally.Quantity{{Unit: tally.Requests, Amount: 1}, {Unit: tally.Images, Amount: 1}}
	unknown.Resource = "gpt-9"
	requests := []tally.Request{good, zero, images, unknown}
	results, err := engine.ConsumeMany(requests)
	must(t, err)
	if !results[0].Decision.Admitted {
		t.Fatalf("the good request: %+v", results[0])
	}
	for index := 1; index < len(requests); index++ {
		_, alone := engine.Check(requests[index])
		var want, got *tally.Error
		if !errors.As(alone, &want) || !errors.As(results[index].Err, &got) {
			t.Fatalf("requests[%d]: %v, alone %v", index, results[index].Err, alone)
		}
		named := ": "
		if field, _, found := strings.Cut(want.Message, ":"); found && !strings.ContainsAny(field, " \"") {
			named = "."
		}
		if got.Status != want.Status || got.Message != fmt.Sprintf("requests[%d]%s%s", index, named, want.Message) {
			t.Errorf("requests[%d]: %q (%s), alone %q (%s)", index, got.Message, got.Status, want.Message, want.Status)
		}
	}
	if !strings.Contains(results[1].Err.Error(), "quantities") || !strings.Contains(results[3].Err.Error(), "gpt-9") {
		t.Errorf("the field and the model named: %v; %v", results[1].Err, results[3].Err)
	}
}

func TestABatchRefusedBeforeTheCallNamesTheRequestAtFault(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "nu", "tp-nu", "Starter")
	good := tally.Request{Key: "tp-nu", Resource: "m2.7", Quantities: one(tally.Requests), At: t0}
	bad := good
	bad.At = time.Unix(-1, 0)
	_, err := engine.ConsumeMany([]tally.Request{good, bad})
	var tallyError *tally.Error
	if !errors.Is(err, tally.ErrBadTimestamp) || !errors.As(err, &tallyError) ||
		!strings.HasPrefix(tallyError.Message, "requests[1].At: ") {
		t.Fatalf("a time before 1970 in requests[1]: %v", err)
	}
}

func TestGoroutinesSharingOneEngineAreAdmittedExactlyTheLimit(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "mo", "tp-mo", "Starter")
	limit := limitAmount(t, engine, "tp-mo", "m2.7:requests")
	const goroutines = 16
	perGoroutine := int(limit)/goroutines*2 + 1
	var wg sync.WaitGroup
	counts := make([][2]int, goroutines)
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < perGoroutine; i++ {
				request := tally.Request{Key: "tp-mo", Resource: "m2.7", Quantities: one(tally.Requests), At: at(int64(i))}
				decision, err := engine.Consume(request)
				if err != nil {
					t.Error(err)
					return
				}
				if decision.Admitted {
					counts[g][0]++
				} else if decision.Denial == tally.DenialQuotaExhausted {
					counts[g][1]++
				}
				if _, err := engine.Usage("tp-mo", time.Time{}); err != nil {
					t.Error(err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	total, refused := 0, 0
	for _, count := range counts {
		total += count[0]
		refused += count[1]
	}
	if uint64(total) != limit || total+refused != goroutines*perGoroutine {
		t.Fatalf("admitted %d, denied %d of %d; limit %d", total, refused, goroutines*perGoroutine, limit)
	}
}

func TestCloseIsIdempotentAndLaterCallsAnswerErrClosed(t *testing.T) {
	engine, err := tally.OpenInMemory(unbounded)
	must(t, err)
	seated(t, engine, "no", "tp-no", "Starter")
	must(t, engine.Close())
	must(t, engine.Close())
	request := tally.Request{Key: "tp-no", Resource: "m2.7", Quantities: one(tally.Requests), At: t0}
	if _, err := engine.Consume(request); !errors.Is(err, tally.ErrClosed) {
		t.Fatalf("consume after close: %v", err)
	}
	if _, err := engine.Usage("tp-no", t0); !errors.Is(err, tally.ErrClosed) {
		t.Fatalf("usage after close: %v", err)
	}
	if err := engine.CreateTeam("late", t0); !errors.Is(err, tally.ErrClosed) {
		t.Fatalf("admin after close: %v", err)
	}
	if _, err := engine.PolicyJSON(); !errors.Is(err, tally.ErrClosed) {
		t.Fatalf("policy after close: %v", err)
	}
	if _, err := engine.MemoryStats(); !errors.Is(err, tally.ErrClosed) {
		t.Fatalf("memory stats after close: %v", err)
	}
	if _, err := engine.AdjustUsage("tp-no", "m2.7", one(tally.Requests), t0, tally.AdjustAdd, t0); !errors.Is(err, tally.ErrClosed) {
		t.Fatalf("adjust after close: %v", err)
	}
}

func TestCloseWhileGoroutinesAreCallingLetsThemFinishOrAnswerErrClosed(t *testing.T) {
	engine, err := tally.OpenInMemory(unbounded)
	must(t, err)
	seated(t, engine, "ob", "tp-ob", "Max")
	var wg sync.WaitGroup
	// Every goroutine has had a call answered before the Close: it races calls in flight.
	// (A 1 ms sleep stood for that; on a loaded machine the goroutines had not run by then,
	// and every call they made came after the Close.)
	var calling sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		calling.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 2000; i++ {
				request := tally.Request{Key: "tp-ob", Resource: "m2.7", Quantities: one(tally.Requests), At: t0}
				_, err := engine.Consume(request)
				if i == 0 {
					if err != nil {
						t.Errorf("a call before the Close: %v", err)
					}
					calling.Done()
				}
				if err != nil {
					if !errors.Is(err, tally.ErrClosed) {
						t.Error(err)
					}
					return
				}
			}
		}()
	}
	calling.Wait()
	var closers sync.WaitGroup
	for c := 0; c < 2; c++ {
		closers.Add(1)
		go func() {
			defer closers.Done()
			if err := engine.Close(); err != nil {
				t.Error(err)
			}
		}()
	}
	closers.Wait()
	wg.Wait()
}

func TestStatusesMapToDistinctSentinelsAndAnUnknownOneIsAnErrorNotAPanic(t *testing.T) {
	if tally.Status(12).String() != "TALLY_CLOSED" || tally.Status(1000).String() != "TALLY_UNKNOWN_STATUS" {
		t.Fatalf("names: %s %s", tally.Status(12), tally.Status(1000))
	}
	// The header adds new statuses at the end, and a newer library (a shared one swapped in,
	// or a libtally.a built ahead of this package) answers them: the call may have taken effect
	// (a ConsumeMany entry after the batch counted, a Complete), so a panic would take the
	// process down where the caller only needs an error it can log and retry on.
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("an unknown status panicked: %v", r)
		}
	}()
	err := tally.NewErrorForTest("Consume", 37, "the library's detail")
	var tallyError *tally.Error
	if !errors.As(err, &tallyError) || tallyError.Status != 37 || tally.StatusOf(err) != 37 ||
		tallyError.Message != "the library's detail" || tallyError.Op != "Consume" {
		t.Fatalf("unknown status: %#v", err)
	}
	for _, sentinel := range []error{tally.ErrPanic, tally.ErrInvalidArgument, tally.ErrReservationExpired, tally.ErrClosed} {
		if errors.Is(err, sentinel) {
			t.Fatalf("an unknown status matches %v", sentinel)
		}
	}
	if text := err.Error(); !strings.Contains(text, "the library's detail") || !strings.Contains(text, "37") {
		t.Fatalf("the message does not say which status: %q", text)
	}
	if text := tally.NewErrorForTest("Consume", 1000, "").Error(); !strings.Contains(text, "1000") {
		t.Fatalf("an unknown status without a message: %q", text)
	}
	// ConsumeMany's entries have no message from the library: Go writes one.
	request := tally.Request{Key: "tp-x", Resource: "m2.7", Quantities: one(tally.Requests)}
	if text := tally.ConsumeManyEntryErrorForTest(3, 40, request).Error(); !strings.Contains(text, "requests[3]") ||
		!strings.Contains(text, "40") {
		t.Fatalf("an entry's unknown status: %q", text)
	}
	// An Error a caller builds (a fake in its tests) prints too, whatever its status.
	for _, status := range []tally.Status{0, 12, 99} {
		if (&tally.Error{Op: "Fake", Status: status}).Error() == "" {
			t.Fatalf("status %d: no text", status)
		}
	}
}

// A settle after the lease ended is ErrReservationExpired, which is an ErrReservationClosed
// too (code written before it keeps working); one already settled or voided is only closed.
func TestASettleAfterTheLeaseEndedIsExpiredWhichIsStillClosed(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "ol", "tp-ol", "Starter")
	quantities := []tally.Quantity{{Unit: tally.Requests, Amount: 1}, {Unit: tally.Tokens, Amount: 10}}
	reserve := func() tally.ReservationID {
		_, id, err := engine.Reserve(tally.Request{Key: "tp-ol", Resource: "m2.7", At: t0, Quantities: quantities}, time.Minute)
		must(t, err)
		return id
	}
	settled, voided, expired := reserve(), reserve(), reserve()
	_, err := engine.Settle(settled, quantities, at(1))
	must(t, err)
	must(t, engine.Void(voided, at(1)))
	for _, c := range []struct {
		name        string
		reservation tally.ReservationID
		expired     bool
	}{{"settled", settled, false}, {"voided", voided, false}, {"expired", expired, true}, {"expired again", expired, true}} {
		_, err := engine.Settle(c.reservation, quantities[:1], at(120_000))
		if !errors.Is(err, tally.ErrReservationClosed) || errors.Is(err, tally.ErrReservationExpired) != c.expired {
			t.Errorf("%s: %v", c.name, err)
		}
		if errors.Is(err, tally.ErrUnknownReservation) || errors.Is(err, tally.ErrInvalidArgument) {
			t.Errorf("%s: matches an unrelated sentinel: %v", c.name, err)
		}
		if c.expired && (tally.StatusOf(err).String() != "TALLY_RESERVATION_EXPIRED" || !strings.Contains(err.Error(), "expired")) {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	must(t, engine.Void(expired, at(120_000))) // voiding an expired one is a no-op
	if errors.Is(tally.ErrReservationClosed, tally.ErrReservationExpired) {
		t.Error("closed is not expired")
	}
}

func TestPolicySwapKeepsUsageAndRefusesAnInvalidDocument(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "pa", "tp-pa", "Starter")
	consume(t, engine, tally.Request{Key: "tp-pa", Resource: "m2.7", Quantities: one(tally.Requests), At: t0})
	document, err := engine.PolicyJSON()
	must(t, err)
	must(t, engine.SwapPolicy(tally.WithPolicyJSON(document), t0))
	if err := engine.SwapPolicy(tally.WithPolicyTOML("time_zone = 7"), t0); !errors.Is(err, tally.ErrPolicyInvalid) {
		t.Fatalf("an invalid policy: %v", err)
	}
	must(t, engine.SwapPolicy(nil, t0))
	usage, err := engine.Usage("tp-pa", t0)
	must(t, err)
	if usage.Limits[0].Used != 1 {
		t.Fatalf("after the swaps: %+v", usage.Limits[0])
	}
	if _, err := tally.OpenInMemory(tally.WithPolicyFile("/nonexistent/policy.toml"), unbounded); err == nil {
		t.Fatal("a missing policy file opened")
	}
}

func TestSwapPolicyRefusesAnOptionThatNamesNoPolicyAndKeepsTheOneItHas(t *testing.T) {
	engine, err := tally.OpenInMemory(tally.WithPolicyTOML(customPolicy), unbounded)
	must(t, err)
	defer engine.Close()
	seated(t, engine, "ada", "tp-ada-1", "Starter")
	for _, option := range []tally.Option{
		tally.WithDurability(tally.DurabilityNone),
		tally.WithOptions(tally.Options{MaxKeys: 10}),
	} {
		if err := engine.SwapPolicy(option, t0); !errors.Is(err, tally.ErrInvalidArgument) ||
			!strings.Contains(err.Error(), "policy") {
			t.Fatalf("a swap to an option that is no policy: %v", err)
		}
	}
	if amounts := limitAmounts(t, engine, "tp-ada-1"); len(amounts) != 1 || amounts[0] != 7 {
		t.Fatalf("the policy after refused swaps: limits %v (the custom policy's Starter has 7)", amounts)
	}
}

func TestASettlesBadQuantitiesAreNamedByItsArgumentActual(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "ro", "tp-ro", "Starter")
	_, reservation, err := engine.Reserve(tally.Request{Key: "tp-ro", Resource: "m2.7", At: t0,
		Quantities: one(tally.Requests)}, time.Minute)
	must(t, err)
	for _, actual := range [][]tally.Quantity{
		{{Unit: tally.Requests, Amount: 0}},
		{{Unit: tally.Requests, Amount: tally.MaxQuantity + 1}},
		{{Unit: tally.Requests, Amount: 1}, {Unit: tally.Requests, Amount: 1}},
		{{Unit: tally.Unit(99), Amount: 1}},
	} {
		_, err := engine.Settle(reservation, actual, at(1))
		var tallyError *tally.Error
		if !errors.As(err, &tallyError) || !strings.HasPrefix(tallyError.Message, "actual: ") {
			t.Errorf("settle %+v: %v", actual, err)
		}
	}
	if settled, err := engine.Settle(reservation, one(tally.Requests), at(2)); err != nil || !settled.Admitted {
		t.Fatalf("the reservation stayed open: %+v %v", settled, err)
	}
}

func TestMaxQuantityIsTheLargestAmountTheLibraryTakes(t *testing.T) {
	if tally.MaxQuantity != 1<<40 {
		t.Fatalf("MaxQuantity is %d", uint64(tally.MaxQuantity))
	}
	engine := openMemory(t)
	seated(t, engine, "mo", "tp-mo", "Starter")
	request := tally.Request{Key: "tp-mo", Resource: "m2.7", At: t0,
		Quantities: []tally.Quantity{{Unit: tally.Requests, Amount: tally.MaxQuantity}}}
	if decision, err := engine.Consume(request); err != nil || decision.Admitted {
		t.Fatalf("the largest amount is decided (and denied by the plan): %+v %v", decision, err)
	}
	request.Quantities[0].Amount++
	if _, err := engine.Consume(request); !errors.Is(err, tally.ErrBadQuantity) {
		t.Fatalf("one past the largest amount: %v", err)
	}
}

// An Engine not made by Open or OpenInMemory says so, for any call, and Close is harmless.
func TestAZeroEngineSaysItWasNotOpened(t *testing.T) {
	var engine tally.Engine
	_, err := engine.Usage("tp-ada", t0)
	var tallyError *tally.Error
	if !errors.Is(err, tally.ErrNullPointer) || !errors.As(err, &tallyError) ||
		!strings.Contains(tallyError.Message, "not opened") {
		t.Fatalf("Usage on a zero Engine: %v", err)
	}
	if _, err := engine.TopUp("@ada", 1, t0); !errors.Is(err, tally.ErrNullPointer) {
		t.Fatalf("TopUp on a zero Engine: %v", err)
	}
	// Every time: the first said so and the second answered nil, as if it had closed it.
	for round := 0; round < 2; round++ {
		if err := engine.Close(); !errors.Is(err, tally.ErrNullPointer) {
			t.Fatalf("Close %d of a zero Engine: %v", round+1, err)
		}
	}
}

// A Submission not made by Submit says so, as a zero Engine does, rather than that it was
// completed already; Discard does nothing. A nil one is ErrNullPointer too.
func TestAZeroSubmissionSaysSubmitDidNotMakeIt(t *testing.T) {
	var submission tally.Submission
	_, err := submission.Complete()
	var tallyError *tally.Error
	if !errors.Is(err, tally.ErrNullPointer) || !errors.As(err, &tallyError) ||
		!strings.Contains(tallyError.Message, "not made by Submit") {
		t.Fatalf("Complete on a zero Submission: %v", err)
	}
	if _, err := submission.Durable(); !errors.Is(err, tally.ErrNullPointer) {
		t.Fatalf("Durable on a zero Submission: %v", err)
	}
	submission.Discard()
	// A nil one too, as a `defer s.Discard()` before Submit's error is looked at meets it.
	var none *tally.Submission
	none.Discard()
	// Complete and Durable on a nil one are ErrNullPointer, not a panic.
	if _, err := none.Complete(); !errors.Is(err, tally.ErrNullPointer) ||
		!strings.Contains(err.Error(), "nil") {
		t.Fatalf("Complete on a nil Submission: %v", err)
	}
	if _, err := none.Durable(); !errors.Is(err, tally.ErrNullPointer) {
		t.Fatalf("Durable on a nil Submission: %v", err)
	}
}

// A revoked key is denied DenialKeyRevoked whatever its seat, its usage report says Revoked,
// and AddMember gives the member a new key in its place.
func TestARevokedKeyIsDeniedAndItsMemberGivenANewOne(t *testing.T) {
	engine := openMemory(t)
	seated(t, engine, "rk", "tp-rk", "Max")
	request := tally.Request{Key: "tp-rk", Resource: "m2.7", Quantities: one(tally.Requests), At: t0}
	if decision, err := engine.Consume(request); err != nil || !decision.Admitted {
		t.Fatalf("before: %+v %v", decision, err)
	}
	if revoked, err := engine.RevokeKey("tp-rk", t0); err != nil || !revoked {
		t.Fatalf("RevokeKey: %v %v", revoked, err)
	}
	if revoked, err := engine.RevokeKey("tp-rk", t0); err != nil || revoked {
		t.Fatalf("RevokeKey again: %v %v", revoked, err)
	}
	if _, err := engine.RevokeKey("tp-nobody", t0); !errors.Is(err, tally.ErrUnknownKey) {
		t.Fatalf("an unknown key: %v", err)
	}
	decision, err := engine.Consume(request)
	if err != nil || decision.Admitted || decision.Denial != tally.DenialKeyRevoked ||
		decision.Denial.String() != "key_revoked" {
		t.Fatalf("after: %+v %v", decision, err)
	}
	usage, err := engine.Usage("tp-rk", t0)
	if err != nil || !usage.Revoked || usage.Limits[0].Used != 1 {
		t.Fatalf("usage: %+v %v", usage, err)
	}
	must(t, engine.AddMember("@rk", "rk", "tp-rk-2", t0))
	if usage, err := engine.Usage("tp-rk-2", t0); err != nil || usage.Revoked || usage.Plan != "" {
		t.Fatalf("the new key: %+v %v", usage, err)
	}
}

// A nil Option is no option, as SwapPolicy takes nil for the shipped default: a policy option
// left nil (`var policy tally.Option; if file != "" { policy = tally.WithPolicyFile(file) }`)
// opens with the shipped policy, where collect called it and panicked.
func TestANilOptionIsNoOptionAsSwapPolicysNilIs(t *testing.T) {
	var policy tally.Option
	engine, err := tally.OpenInMemory(policy, unbounded)
	must(t, err)
	seated(t, engine, "ni", "tp-ni", "Starter")
	must(t, engine.SwapPolicy(policy, t0))
	must(t, engine.Close())
	path := t.TempDir() + "/db"
	durable, err := tally.Open(path, nil, tally.WithDurability(tally.DurabilityNone), nil)
	must(t, err)
	must(t, durable.Close())
	if report, err := tally.Verify(path, nil); err != nil || !report.Sound {
		t.Fatalf("Verify with a nil option: %+v %v", report, err)
	}
}
