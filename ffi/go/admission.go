package tally

/*
#include "shim.h"
*/
import "C"

import (
	"fmt"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
	"unsafe"
)

// ReservationID names an open reservation (never 0).
type ReservationID uint64

// Consume decides the request and, if admitted, counts it (all of it or nothing). A denial
// is a Decision with Admitted false, not an error; errors are for requests that could not be
// decided (bad input, an unknown resource, ErrRequestIDConflict, storage errors, ...).
func (e *Engine) Consume(request Request) (Decision, error) {
	decision, _, err := e.decide("Consume", C.TALLY_GO_CONSUME, request, 0)
	return decision, err
}

// Check is the decision Consume would make now, counting nothing. A request id already used
// answers its first decision (Replayed) once that decision is durable, as a repeated Consume
// waits; a new one Consume would refuse is refused alike.
func (e *Engine) Check(request Request) (Decision, error) {
	decision, _, err := e.decide("Check", C.TALLY_GO_CHECK, request, 0)
	return decision, err
}

// Reserve holds an estimate (a request without a request id) against every limit or the
// credits until Settle, Void or the end of the lease (0: Options.DefaultLease, 10 minutes
// unless set; at most 24 h; whole milliseconds). When admitted it returns the reservation;
// when denied, 0.
func (e *Engine) Reserve(request Request, lease time.Duration) (Decision, ReservationID, error) {
	if lease < 0 {
		return Decision{}, 0, newError("Reserve", C.TALLY_INVALID_ARGUMENT, "lease: must not be negative")
	}
	// Truncated, 0.5 ms would be 0: the default lease of 10 minutes, not what was asked.
	if lease%time.Millisecond != 0 {
		return Decision{}, 0, newError("Reserve", C.TALLY_INVALID_ARGUMENT,
			"lease: "+lease.String()+" is not a whole number of milliseconds")
	}
	return e.decide("Reserve", C.TALLY_GO_RESERVE, request, uint64(lease.Milliseconds()))
}

func (e *Engine) decide(op string, kind C.int, request Request, leaseMs uint64) (Decision, ReservationID, error) {
	at, err := milliseconds(op, request.At)
	if err != nil {
		return Decision{}, 0, err
	}
	key, keyLen := text(request.Key)
	resource, resourceLen := text(request.Resource)
	requestID, requestIDLen := optionalText(request.RequestID)
	quantities, quantitiesLen := quantitiesOf(request.Quantities)
	var out C.tally_decision
	var reservation C.uint64_t
	err = e.call(op, func(handle *C.tally_engine) C.uint32_t {
		return C.tally_go_decide(handle, kind, key, keyLen, resource, resourceLen,
			quantities, quantitiesLen, at, requestID, requestIDLen, C.uint64_t(leaseMs),
			&out, &reservation)
	})
	if err != nil {
		return Decision{}, 0, err
	}
	return decisionFrom(&out), ReservationID(reservation), nil
}

// quantitiesOf copies quantities into C's layout (Go memory without Go pointers, which cgo
// lets C read during the call). None is (NULL, 0).
func quantitiesOf(quantities []Quantity) (*C.tally_quantity, C.size_t) {
	if len(quantities) == 0 {
		return nil, 0
	}
	out := make([]C.tally_quantity, len(quantities))
	for i, quantity := range quantities {
		out[i] = C.tally_quantity{unit: C.uint32_t(quantity.Unit), amount: C.uint64_t(quantity.Amount)}
	}
	return &out[0], C.size_t(len(out))
}

// Settle charges a reservation's actual amount (none at all: nothing was used). Less than
// the estimate gives the rest back; more is admitted only if it still fits. Not admitted:
// nothing changed and the reservation stays open (settle with less, or Void it). A
// reservation already settled (with other amounts) or voided is ErrReservationClosed; one
// whose lease ended (expired by the engine, or by at) is ErrReservationExpired, its hold given
// back and nothing charged, and errors.Is matches ErrReservationClosed for it too.
func (e *Engine) Settle(reservation ReservationID, actual []Quantity, at time.Time) (Decision, error) {
	atMs, err := milliseconds("Settle", at)
	if err != nil {
		return Decision{}, err
	}
	quantities, quantitiesLen := quantitiesOf(actual)
	var out C.tally_decision
	err = e.call("Settle", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_settle(handle, C.uint64_t(reservation), quantities, quantitiesLen, atMs, &out)
	})
	if err != nil {
		return Decision{}, err
	}
	return decisionFrom(&out), nil
}

// Void frees everything a reservation holds. Voiding again, or voiding an expired one, is a
// no-op; voiding a settled one is ErrReservationClosed.
func (e *Engine) Void(reservation ReservationID, at time.Time) error {
	atMs, err := milliseconds("Void", at)
	if err != nil {
		return err
	}
	return e.call("Void", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_void(handle, C.uint64_t(reservation), atMs)
	})
}

// ExpireReservations ends every reservation whose lease ended by at, returning how many.
func (e *Engine) ExpireReservations(at time.Time) (uint64, error) {
	atMs, err := milliseconds("ExpireReservations", at)
	if err != nil {
		return 0, err
	}
	var expired C.uint64_t
	err = e.call("ExpireReservations", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_expire_reservations(handle, atMs, &expired)
	})
	return uint64(expired), err
}

// Refund gives back in full what a request admitted under requestID was charged. Twice, or
// for an id whose request was denied, is ErrInvalidArgument; for an id no request used within
// the horizon (after its request's timestamp, by the engine's clock, not at: past it the id is
// forgotten, the same whenever the table drops it and after a reopen), ErrUnknownRequest.
func (e *Engine) Refund(requestID string, at time.Time) error {
	atMs, err := milliseconds("Refund", at)
	if err != nil {
		return err
	}
	id, idLen := text(requestID)
	return e.call("Refund", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_refund(handle, id, idLen, atMs)
	})
}

// AdjustUsage corrects the usage key's plan counted at usageAt, when it happened (required;
// not after at, whose zero is now): AdjustAdd counts usage that was not counted (whatever the
// limit), AdjustRemove gives back usage that should not have been counted (only where its
// window still counts it). Every limit of the plan that counts the resource moves, or none;
// the correction is logged as its own event, except an addition every window has moved past
// (it moves 0 and logs nothing). A key without a seat (a pay-as-you-go key too), or a
// resource its plan does not limit, is ErrInvalidArgument; units none of the plan's limits on
// the resource count ErrBadQuantity; an unknown key ErrUnknownKey.
func (e *Engine) AdjustUsage(key, resource string, quantities []Quantity, usageAt time.Time,
	direction AdjustmentDirection, at time.Time) (Adjustment, error) {
	const op = "AdjustUsage"
	if usageAt.IsZero() {
		return Adjustment{}, newError(op, C.TALLY_BAD_TIMESTAMP,
			"usageAt: required, when the usage happened (the zero time does not mean now here)")
	}
	usageMs, err := milliseconds(op, usageAt)
	if err != nil {
		return Adjustment{}, newError(op, C.TALLY_BAD_TIMESTAMP, "usageAt: "+err.(*Error).Message)
	}
	atMs, err := milliseconds(op, at)
	if err != nil {
		return Adjustment{}, newError(op, C.TALLY_BAD_TIMESTAMP, "at: "+err.(*Error).Message)
	}
	keyText, keyLen := text(key)
	resourceText, resourceLen := text(resource)
	quantitiesPointer, quantitiesLen := quantitiesOf(quantities)
	var out C.tally_adjustment
	err = e.call(op, func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_adjust_usage(handle, keyText, keyLen, resourceText, resourceLen,
			quantitiesPointer, quantitiesLen, usageMs, C.uint32_t(direction), atMs, &out)
	})
	if err != nil {
		return Adjustment{}, err
	}
	return adjustmentFrom(&out), nil
}

// Result is one entry of ConsumeMany: its decision, or why it could not be decided.
type Result struct {
	Decision Decision
	Err      error
}

// ConsumeMany consumes up to MaxBatch requests with one wait for durability. Each is decided
// on its own (its Result; an entry's error names it, "requests[3]", and a string refused in
// it, "requests[3].key: holds a NUL byte at offset 2"); the error is for a batch that could
// not run at all. A crash before the call returns may keep the events of the batch's first
// requests and lose the rest's: retry the batch with the same request IDs and each request
// counts once (the kept ones return their decisions); without IDs, a retry counts the kept
// ones again.
func (e *Engine) ConsumeMany(requests []Request) ([]Result, error) {
	const op = "ConsumeMany"
	if len(requests) == 0 || len(requests) > MaxBatch {
		return nil, newError(op, C.TALLY_INVALID_ARGUMENT,
			fmt.Sprintf("requests: %d given; 1 to MaxBatch (%d) at a time", len(requests), MaxBatch))
	}
	batch, err := newBatch(op, requests)
	if err != nil {
		return nil, err
	}
	statuses := make([]C.uint32_t, len(requests))
	decisions := make([]C.tally_decision, len(requests))
	var ran C.uint32_t
	// What the library said of each refused entry, read on the batch's own thread.
	messages := make(map[int]string)
	err = e.call(op, func(handle *C.tally_engine) C.uint32_t {
		ran = C.tally_go_consume_many(handle, (*C.char)(unsafe.Pointer(&batch.text[0])), batch.quantitiesPointer(),
			&batch.requests[0], C.size_t(len(requests)), &statuses[0], &decisions[0])
		if ran == C.TALLY_GO_OUT_OF_MEMORY {
			return C.TALLY_OK
		}
		if ran == C.TALLY_OK {
			for i, status := range statuses {
				if status != C.TALLY_OK {
					messages[i] = batchEntryError(i)
				}
			}
		}
		return ran
	})
	if ran == C.TALLY_GO_OUT_OF_MEMORY {
		panic("tally: ConsumeMany: out of C memory")
	}
	if err != nil {
		return nil, err
	}
	results := make([]Result, len(requests))
	for i := range results {
		if statuses[i] == C.TALLY_OK {
			results[i].Decision = decisionFrom(&decisions[i])
		} else {
			status := Status(statuses[i])
			results[i].Err = newError(op, status, entryDetail(i, status, &requests[i], messages[i]))
		}
	}
	return results, nil
}

// entryDetail is the message of a ConsumeMany entry the library refused with status: the
// entry and, if a string was refused, which one, in the library's words; else message, what
// the library said of the entry (tally_batch_entry_error), naming its field as a single
// call's error does.
func entryDetail(index int, status Status, request *Request, message string) string {
	type argument struct {
		name, value string
		maximum     int
	}
	texts := []argument{{"key", request.Key, MaxIDBytes}, {"resource", request.Resource, MaxNameBytes}}
	if request.RequestID != "" { // "" is none
		texts = append(texts, argument{"request_id", request.RequestID, MaxIDBytes})
	}
	for _, s := range texts {
		if problem, detail := textProblem(s.value, s.maximum); problem != 0 {
			if problem == status {
				return fmt.Sprintf("requests[%d].%s: %s", index, s.name, detail)
			}
			break
		}
	}
	if message != "" {
		if field, _, found := strings.Cut(message, ":"); found && isIdentifier(field) {
			return fmt.Sprintf("requests[%d].%s", index, message)
		}
		return fmt.Sprintf("requests[%d]: %s", index, message)
	}
	if sentinel := statusSentinel(status); sentinel != nil {
		return fmt.Sprintf("requests[%d]: %s", index, sentinel)
	}
	return fmt.Sprintf("requests[%d]: refused", index)
}

// isIdentifier says whether s is a field's name as the library's messages start with one
// ("quantities", "request_id"): letters, digits and underscores, not starting with a digit.
func isIdentifier(s string) bool {
	for i, r := range s {
		if !(r == '_' || unicode.IsLetter(r) || (i > 0 && unicode.IsDigit(r))) {
			return false
		}
	}
	return s != ""
}

// textProblem is the status and detail the library answers for a string argument it refuses,
// checked in its order (ffi/src/checks.rs), or 0 if it takes the string.
func textProblem(s string, maximum int) (Status, string) {
	if len(s) == 0 {
		return C.TALLY_EMPTY_STRING, "must not be empty"
	}
	if len(s) > maximum {
		return C.TALLY_STRING_TOO_LONG, fmt.Sprintf("is %d bytes; at most %d", len(s), maximum)
	}
	if at := strings.IndexByte(s, 0); at >= 0 {
		return C.TALLY_NUL_IN_STRING, fmt.Sprintf("holds a NUL byte at offset %d", at)
	}
	for at := 0; at < len(s); {
		r, size := utf8.DecodeRuneInString(s[at:])
		if r == utf8.RuneError && size <= 1 {
			return C.TALLY_INVALID_UTF8, fmt.Sprintf("is not valid UTF-8 (at byte %d)", at)
		}
		at += size
	}
	return 0, ""
}

// batch is ConsumeMany's requests as pointer-free arrays: one text buffer, one quantity array
// and per request the offsets into them (shim.h turns them into tally_requests in C memory).
type batch struct {
	text       []byte
	quantities []C.tally_quantity
	requests   []C.tally_go_request
}

func newBatch(op string, requests []Request) (*batch, error) {
	b := &batch{text: make([]byte, 0, 64*len(requests)+1), requests: make([]C.tally_go_request, len(requests))}
	for i, request := range requests {
		at, err := milliseconds(op, request.At)
		if err != nil {
			return nil, newError(op, StatusOf(err), fmt.Sprintf("requests[%d].At: %s", i, err.(*Error).Message))
		}
		to := &b.requests[i]
		to.key_offset, to.key_len = b.add(request.Key)
		to.resource_offset, to.resource_len = b.add(request.Resource)
		to.request_id_offset, to.request_id_len = b.add(request.RequestID)
		to.quantities_offset = C.size_t(len(b.quantities))
		to.quantities_len = C.size_t(len(request.Quantities))
		for _, quantity := range request.Quantities {
			b.quantities = append(b.quantities, C.tally_quantity{unit: C.uint32_t(quantity.Unit), amount: C.uint64_t(quantity.Amount)})
		}
		to.at_ms = at
	}
	// A non-empty buffer, so even empty strings point somewhere (empty, not NULL).
	b.text = append(b.text, 0)
	return b, nil
}

func (b *batch) add(s string) (C.size_t, C.size_t) {
	offset := len(b.text)
	b.text = append(b.text, s...)
	return C.size_t(offset), C.size_t(len(s))
}

func (b *batch) quantitiesPointer() *C.tally_quantity {
	if len(b.quantities) == 0 {
		return nil
	}
	return &b.quantities[0]
}
