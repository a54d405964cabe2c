package tally

/*
#include "tally.h"
*/
import "C"

import (
	"errors"
	"fmt"
)

// Status is a tally_status: what a C call did. 0 is OK; every other value is an error, and
// each has a sentinel ErrX below. Codes are stable and never reused.
type Status uint32

// String is the status's name as the header spells it ("TALLY_CLOSED").
func (s Status) String() string {
	return C.GoString(C.tally_status_name(C.uint32_t(s)))
}

// One sentinel per status: test with errors.Is(err, tally.ErrClosed). The errors the package
// returns are *Error values that wrap these and carry the library's detail message. A status
// that narrows an older one matches that one's sentinel too: an ErrReservationExpired error
// is also an ErrReservationClosed (see Error.Is).
var (
	ErrNullPointer         = errors.New("a required pointer was NULL")
	ErrInvalidUTF8         = errors.New("a string was not valid UTF-8")
	ErrEmptyString         = errors.New("a string that must not be empty was empty")
	ErrStringTooLong       = errors.New("a string was longer than its bound")
	ErrNulInString         = errors.New("a string contained a NUL byte")
	ErrInvalidArgument     = errors.New("an argument was malformed")
	ErrBadEnum             = errors.New("an enum value was out of range")
	ErrBadQuantity         = errors.New("a quantity was 0, above 2^40, repeated, missing or too many")
	ErrOverflow            = errors.New("an amount, balance or count would pass the most it can hold")
	ErrBadTimestamp        = errors.New("a timestamp is out of range")
	ErrBufferTooSmall      = errors.New("an output buffer was too small")
	ErrClosed              = errors.New("the engine is closed")
	ErrPoisoned            = errors.New("an earlier call panicked; the engine is poisoned")
	ErrPanic               = errors.New("the call panicked inside the library")
	ErrUnknownKey          = errors.New("unknown key")
	ErrUnknownTeam         = errors.New("unknown team")
	ErrUnknownUser         = errors.New("unknown user")
	ErrUnknownResource     = errors.New("unknown resource")
	ErrUnknownPlan         = errors.New("unknown plan")
	ErrUnknownReservation  = errors.New("unknown reservation")
	ErrUnknownRequest      = errors.New("unknown request id")
	ErrAlreadyExists       = errors.New("already exists")
	ErrNotAMember          = errors.New("not a member of the team")
	ErrRequestIDConflict   = errors.New("the request id was used with a different request")
	ErrCapacityExceeded    = errors.New("a bounded table is full")
	ErrReservationClosed   = errors.New("the reservation is already settled, voided or expired")
	ErrInsufficientCredits = errors.New("insufficient credits")
	ErrPolicyInvalid       = errors.New("the policy is invalid")
	ErrStorage             = errors.New("the database could not be read or written")
	ErrLogFailed           = errors.New("the event log failed; reopen the engine")
	ErrDatabaseLocked      = errors.New("the database is open in another engine")
	ErrDatabaseDamaged     = errors.New("the database is damaged")
	ErrDatabaseForeign     = errors.New("the directory is not a tally database")
	ErrDatabaseNewerFormat = errors.New("the database was written by a newer tally")
	ErrNotDurable          = errors.New("the engine is in memory; the call needs an event log")
	// ErrReservationExpired: the reservation's lease ended before the settle; the engine gave
	// its hold back and charged nothing. errors.Is(err, ErrReservationClosed) holds for it
	// too, as the library answered that status for it before this one existed.
	ErrReservationExpired = errors.New("the reservation's lease ended; it is expired")
)

// statusErrors maps each status (by index) to its sentinel; index 0 (OK) is nil.
var statusErrors = [...]error{
	nil,
	ErrNullPointer, ErrInvalidUTF8, ErrEmptyString, ErrStringTooLong, ErrNulInString,
	ErrInvalidArgument, ErrBadEnum, ErrBadQuantity, ErrOverflow, ErrBadTimestamp,
	ErrBufferTooSmall, ErrClosed, ErrPoisoned, ErrPanic, ErrUnknownKey,
	ErrUnknownTeam, ErrUnknownUser, ErrUnknownResource, ErrUnknownPlan, ErrUnknownReservation,
	ErrUnknownRequest, ErrAlreadyExists, ErrNotAMember, ErrRequestIDConflict, ErrCapacityExceeded,
	ErrReservationClosed, ErrInsufficientCredits, ErrPolicyInvalid, ErrStorage, ErrLogFailed,
	ErrDatabaseLocked, ErrDatabaseDamaged, ErrDatabaseForeign, ErrDatabaseNewerFormat, ErrNotDurable,
	ErrReservationExpired,
}

// The last status the header defines; the table above must end there.
const lastStatus = Status(C.TALLY_RESERVATION_EXPIRED)

// broaderStatus maps a status that narrows an older one to that one: errors of the narrow
// status match the broad one's sentinel too, so code written before the split keeps working.
var broaderStatus = map[Status]Status{
	C.TALLY_RESERVATION_EXPIRED: C.TALLY_RESERVATION_CLOSED,
}

var _ [len(statusErrors) - 1 - int(lastStatus)]struct{} // statusErrors covers every status
var _ [int(lastStatus) + 1 - len(statusErrors)]struct{} // ... and no more

// Error is a failed call: the operation, the status and the library's detail message.
// errors.Is(err, ErrX) matches its status's sentinel. A status newer than this package (a
// newer library) is an Error too, matching no sentinel: StatusOf gives its number.
type Error struct {
	Op      string // the Go method, e.g. "Consume"
	Status  Status
	Message string // tally_last_error's text for the call ("" if none)
}

func (e *Error) Error() string {
	detail := e.Message
	if detail == "" {
		if sentinel := statusSentinel(e.Status); sentinel != nil {
			detail = sentinel.Error()
		} else {
			detail = "failed"
		}
	}
	return fmt.Sprintf("tally: %s: %s (%s)", e.Op, detail, e.Status.described())
}

// Unwrap returns the status's sentinel (nil for a status this package does not know).
func (e *Error) Unwrap() error { return statusSentinel(e.Status) }

// statusSentinel is the sentinel of a status, nil for OK and for a status newer than this
// package.
func statusSentinel(s Status) error {
	if s > lastStatus {
		return nil
	}
	return statusErrors[s]
}

// described is the status's name, with its number for one this package does not know (which
// the library names TALLY_UNKNOWN_STATUS if it is older still).
func (s Status) described() string {
	if s > lastStatus {
		return fmt.Sprintf("status %d, unknown to this package: the library is newer", uint32(s))
	}
	return s.String()
}

// Is reports whether target is the sentinel of a status e's status narrows (an expired
// reservation is a closed one): errors.Is then matches both. Its own sentinel it reaches
// through Unwrap.
func (e *Error) Is(target error) bool {
	broader, ok := broaderStatus[e.Status]
	return ok && target == statusErrors[broader]
}

// StatusOf returns the status behind err (0 if err is nil or not from this package).
func StatusOf(err error) Status {
	var tallyError *Error
	if errors.As(err, &tallyError) {
		return tallyError.Status
	}
	return 0
}

// newError builds the error for a status with a message; status 0 gives nil. A status this
// package does not know (the header adds new ones at the end: the library is newer) is an
// Error matching no sentinel, never a panic: the call may have taken effect by then (a batch
// counted, a submission completed), and its caller needs an error to log, not a crash.
func newError(op string, status Status, message string) error {
	if status == 0 {
		return nil
	}
	return &Error{Op: op, Status: status, Message: message}
}

// lastError reads the calling thread's detail message. The caller must hold the OS thread
// (runtime.LockOSThread) since the failed call, so the message is that call's.
func lastError() string {
	return readMessage(func(buf *C.char, size C.size_t, needed *C.size_t) C.uint32_t {
		return C.tally_last_error(buf, size, needed)
	})
}

// batchEntryError reads what the library said was wrong with entry index of the calling
// thread's last batch ("" if it was decided). The caller must hold the OS thread since the
// batch's call, as for lastError.
func batchEntryError(index int) string {
	return readMessage(func(buf *C.char, size C.size_t, needed *C.size_t) C.uint32_t {
		return C.tally_batch_entry_error(C.size_t(index), buf, size, needed)
	})
}

// readMessage reads a message with a size query (tally_last_error's buffer protocol).
func readMessage(read func(buf *C.char, size C.size_t, needed *C.size_t) C.uint32_t) string {
	var small [256]C.char
	var needed C.size_t
	status := read(&small[0], C.size_t(len(small)), &needed)
	if status == C.TALLY_OK {
		return C.GoString(&small[0])
	}
	for attempt := 0; attempt < 4 && status == C.TALLY_BUFFER_TOO_SMALL; attempt++ {
		buffer := make([]C.char, needed)
		status = read(&buffer[0], C.size_t(len(buffer)), &needed)
		if status == C.TALLY_OK {
			return C.GoString(&buffer[0])
		}
	}
	return ""
}
