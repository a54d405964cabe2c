package gateway

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	tally "github.com/tally-engine/tally/ffi/go"
)

// A string the engine refuses is answered for the argument its message names, as the Python
// middleware answers it: the key's is 401 (a credential no key can be), the resource's 404 (a
// model no model can be), any other string the gateway's own: 500, its fault, not the client's.
// A key the engine refuses for its characters (ErrInvalidArgument naming key) is 401 as well.
func TestAStringErrorIsAnsweredForTheArgumentItNames(t *testing.T) {
	for _, test := range []struct {
		status  tally.Status
		message string
		want    int
		code    string
	}{
		{4, "key: is 300 bytes; at most 256", http.StatusUnauthorized, "invalid_api_key"},
		{5, "key: contains a NUL at byte 3", http.StatusUnauthorized, "invalid_api_key"},
		{4, "resource: is 65 bytes; at most 64", http.StatusNotFound, "model_not_found"},
		{2, "resource: is not valid UTF-8 (at byte 0)", http.StatusNotFound, "model_not_found"},
		{4, "request_id: is 300 bytes; at most 256", http.StatusInternalServerError, "internal_error"},
		{5, "request_id: contains a NUL at byte 0", http.StatusInternalServerError, "internal_error"},
		// A key with a control character the engine refuses as an argument, not as a string.
		{6, "key: must not contain control characters (NUL, newline, ...)", http.StatusUnauthorized, "invalid_api_key"},
		{6, "engine: something else", http.StatusServiceUnavailable, "service_unavailable"},
	} {
		err := error(&tally.Error{Op: "Reserve", Status: test.status, Message: test.message})
		answer := engineError(OpenAI, fmt.Errorf("wrapped: %w", err))
		if answer.status != test.want || answer.code != test.code {
			t.Errorf("%s: %d %s, want %d %s", test.message, answer.status, answer.code, test.want, test.code)
		}
	}
}

// An engine that cannot decide (closed, storage failed, poisoned) is the quota service being
// unavailable: 503 with code service_unavailable, in each API's shape, as the Python
// middleware answers; a client may retry later.
func TestAnEngineThatCannotDecideIs503(t *testing.T) {
	for _, sentinel := range []error{tally.ErrClosed, tally.ErrStorage, tally.ErrLogFailed, tally.ErrPoisoned} {
		err := error(&tally.Error{Op: "Reserve", Status: statusOf(sentinel), Message: "it failed"})
		for _, api := range []API{OpenAI, Anthropic} {
			answer := engineError(api, err)
			want := "server_error"
			if api == Anthropic {
				want = "api_error"
			}
			if answer.status != http.StatusServiceUnavailable || answer.kind != want ||
				(api == OpenAI && answer.code != "service_unavailable") {
				t.Errorf("%v, api %d: %d %s %s", sentinel, api, answer.status, answer.kind, answer.code)
			}
			// The detail (a path, a disk error) is the operator's to log; the caller reads the
			// status's name, as from the Python middleware.
			if strings.Contains(answer.message, "it failed") || !strings.Contains(answer.message, statusOf(sentinel).String()) {
				t.Errorf("%v: message %q", sentinel, answer.message)
			}
		}
	}
}

// statusOf finds the status whose sentinel is err.
func statusOf(sentinel error) tally.Status {
	for status := tally.Status(1); status < 64; status++ {
		if errors.Is(&tally.Error{Status: status}, sentinel) {
			return status
		}
	}
	panic("no status for " + sentinel.Error())
}

// Only a settle that finds its reservation's lease ended is late usage: one already settled
// (retried with other amounts) or voided is not. All three are ErrReservationClosed; only the
// first is ErrReservationExpired.
func TestOnlyAnEndedLeaseMakesASettleLate(t *testing.T) {
	// On a clock of the engine's own, so the leases end when the test says, whatever the day.
	at := time.UnixMilli(1_900_000_000_000)
	engine, err := tally.OpenInMemory(tally.WithOptions(tally.Options{MaxAheadOfClock: -1, ManualClock: at}))
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	if err := engine.CreateUser("ol", "tp-ol", at); err != nil {
		t.Fatal(err)
	}
	if err := engine.AssignSeat("@ol", "ol", "Starter", at); err != nil {
		t.Fatal(err)
	}
	quantities := []tally.Quantity{{Unit: tally.Requests, Amount: 1}, {Unit: tally.Tokens, Amount: 10}}
	reserve := func() tally.ReservationID {
		request := tally.Request{Key: "tp-ol", Resource: "m2.7", At: at, Quantities: quantities}
		_, id, err := engine.Reserve(request, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	settled, voided, expired := reserve(), reserve(), reserve()
	if _, err := engine.Settle(settled, quantities, at.Add(time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if err := engine.Void(voided, at.Add(time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	var outcomes []bool
	for _, id := range []tally.ReservationID{settled, voided, expired} {
		_, err := engine.Settle(id, quantities[:1], at.Add(2*time.Minute))
		if !errors.Is(err, tally.ErrReservationClosed) {
			t.Fatalf("%d: %v", id, err)
		}
		outcomes = append(outcomes, leaseEnded(err))
	}
	if fmt.Sprint(outcomes) != "[false false true]" {
		t.Fatalf("%v", outcomes)
	}
}

// A late settle is told by its status, as the Python middleware tells it, not by the
// wording of the engine's message: expired whatever the message says, closed never.
func TestALateSettleIsToldByItsStatusNotByTheMessagesWording(t *testing.T) {
	expired, closed := statusOf(tally.ErrReservationExpired), statusOf(tally.ErrReservationClosed)
	for _, test := range []struct {
		err  error
		want bool
	}{
		{&tally.Error{Op: "Settle", Status: expired, Message: "reservation 7: its lease is over"}, true},
		{fmt.Errorf("wrapped: %w", &tally.Error{Op: "Settle", Status: expired}), true},
		{&tally.Error{Op: "Settle", Status: closed, Message: "reservation 7 is already expired"}, false},
		{nil, false},
	} {
		if leaseEnded(test.err) != test.want {
			t.Errorf("%v: leaseEnded is %v", test.err, !test.want)
		}
	}
}

// The health path's answer names every failure Health reports, in a fixed order, and not
// their detail (a path, an OS error: the operator's log has it); a health call that fails
// (a poisoned engine) is 503 naming its status, as the Python middleware answers.
func TestTheHealthAnswerNamesEachFailureAndNoDetail(t *testing.T) {
	for _, test := range []struct {
		health tally.Health
		err    error
		status int
		body   string
	}{
		{tally.Health{}, nil, http.StatusOK, `{"healthy":true,"failures":[],"error":null}`},
		{tally.Health{LogFailure: "write /db/events/1.seg: no space", CheckpointFailure: "x", CompactionFailure: "y"}, nil,
			http.StatusServiceUnavailable, `{"healthy":false,"failures":["log_failure","checkpoint_failure","compaction_failure"],"error":null}`},
		{tally.Health{CheckpointFailure: "snapshot /db/snapshots: EIO"}, nil,
			http.StatusServiceUnavailable, `{"healthy":false,"failures":["checkpoint_failure"],"error":null}`},
		{tally.Health{}, fmt.Errorf("wrapped: %w", &tally.Error{Op: "Health", Status: statusOf(tally.ErrPoisoned), Message: "panicked at /db"}),
			http.StatusServiceUnavailable, `{"healthy":false,"failures":[],"error":"the engine's health could not be read (TALLY_POISONED)"}`},
		{tally.Health{}, &tally.Error{Op: "Health", Status: statusOf(tally.ErrClosed), Message: "closed"},
			http.StatusServiceUnavailable, `{"healthy":false,"failures":[],"error":"the engine is closed (TALLY_CLOSED)"}`},
	} {
		status, body := healthAnswer(test.health, test.err)
		if status != test.status || string(body) != test.body+"\n" {
			t.Errorf("%+v %v: %d %s", test.health, test.err, status, body)
		}
	}
}
