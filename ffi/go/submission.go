package tally

/*
#include "shim.h"
*/
import "C"

import (
	"sync"
)

// Submission is a consume made by Submit: decided and applied at once, acknowledged only when
// Complete returns its decision. Complete it once, from any goroutine, or Discard it: the
// library's side of a Submission (about 1 KiB) is freed by one of the two, not by the garbage
// collector. (A finalizer per Submission cost 40% of a Submit and Complete with 1,000 in
// flight: 1.96-2.11 against 1.21-1.27 µs.) `defer submission.Discard()` is safe: after
// Complete it does nothing.
type Submission struct {
	engine *Engine
	// mu guards handle: Durable reads it during its C call, Complete and Discard take it (nil
	// afterwards), so the handle is never used after the library freed it.
	mu     sync.Mutex
	handle *C.tally_submission
	// discarded says why handle is nil once it is: Discard, not Complete (guarded by mu).
	discarded bool
}

// Submit decides the request as Consume does and applies it at once, without waiting for
// its event to be durable: one goroutine keeps many requests in flight, and with
// DurabilitySync one fdatasync makes them all durable (Consume holds an OS thread per
// request until its own). The decision stands only once Complete returns it. Bad input is an
// error here, with nothing changed.
//
// Complete or Discard every Submission (see Submission).
func (e *Engine) Submit(request Request) (*Submission, error) {
	at, err := milliseconds("Submit", request.At)
	if err != nil {
		return nil, err
	}
	key, keyLen := text(request.Key)
	resource, resourceLen := text(request.Resource)
	requestID, requestIDLen := optionalText(request.RequestID)
	quantities, quantitiesLen := quantitiesOf(request.Quantities)
	var handle *C.tally_submission
	err = e.call("Submit", func(engine *C.tally_engine) C.uint32_t {
		return C.tally_go_submit(engine, key, keyLen, resource, resourceLen, quantities,
			quantitiesLen, at, requestID, requestIDLen, &handle)
	})
	if err != nil {
		return nil, err
	}
	return &Submission{engine: e, handle: handle}, nil
}

// Durable reports whether Complete would return at once: the event is durable, or the log
// failed and Complete would return the error.
func (s *Submission) Durable() (bool, error) {
	if s == nil {
		return false, nilSubmission("Durable")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.handle == nil {
		return false, s.finished("Durable")
	}
	var durable C.bool
	err := s.engine.call("Durable", func(engine *C.tally_engine) C.uint32_t {
		return C.tally_engine_submission_durable(engine, s.handle, &durable)
	})
	return bool(durable), err
}

// Complete waits until the event is durable as the engine's durability mode says (fsynced
// with DurabilitySync; with the other modes it was acknowledged once queued, and Complete
// returns at once) and returns the decision (Replayed for a repeated request id). If it never will be durable, the effect is given back and the log's
// error returned (ErrLogFailed): the request was not admitted. After a Close that returned nil
// (it flushed the event), the decision too; after one that failed, ErrClosed. A second
// Complete is ErrInvalidArgument; Complete on a nil Submission, ErrNullPointer.
func (s *Submission) Complete() (Decision, error) {
	if s == nil {
		return Decision{}, nilSubmission("Complete")
	}
	s.mu.Lock()
	handle := s.handle
	s.handle = nil
	var finished error
	if handle == nil {
		finished = s.finished("Complete")
	}
	s.mu.Unlock()
	if finished != nil {
		return Decision{}, finished
	}
	// The library frees the submission whatever this returns.
	var out C.tally_decision
	err := s.engine.call("Complete", func(engine *C.tally_engine) C.uint32_t {
		return C.tally_engine_complete(engine, handle, &out)
	})
	if err != nil {
		return Decision{}, err
	}
	return decisionFrom(&out), nil
}

// Discard frees a submission without completing it: its effect stays applied and its event
// on its way to the log, unacknowledged (should the flush fail, nothing gives the effect back;
// the log is failed then, and the engine admits nothing more until reopened). After Complete,
// or a Discard before, it does nothing; so it does on a nil Submission (a `defer s.Discard()`
// written before Submit's error is looked at).
func (s *Submission) Discard() {
	if s == nil {
		return
	}
	s.mu.Lock()
	handle := s.handle
	s.handle = nil
	if handle != nil {
		s.discarded = true
	}
	s.mu.Unlock()
	if handle != nil {
		C.tally_submission_free(handle)
	}
}

// finished is the error for a call on a submission already completed or discarded, or one
// Submit did not make (a zero Submission); the caller holds mu.
// nilSubmission is the error for op on a nil *Submission (what Submit returns with an error):
// ErrNullPointer, as on a zero one, where a nil pointer's method would panic.
func nilSubmission(op string) error {
	return newError(op, C.TALLY_NULL_POINTER,
		"submission: nil (Submit returned an error, not a submission)")
}

func (s *Submission) finished(op string) error {
	if s.engine == nil {
		return newError(op, C.TALLY_NULL_POINTER,
			"submission: not made by Submit (a zero Submission; use Engine.Submit)")
	}
	if s.discarded {
		return newError(op, C.TALLY_INVALID_ARGUMENT, "submission: was discarded")
	}
	return newError(op, C.TALLY_INVALID_ARGUMENT, "submission: was completed already")
}
