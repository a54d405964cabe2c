//! Submitted consumes at the C boundary: `tally_engine_submit` decides and logs a consume
//! without waiting for its flush, `tally_engine_complete` waits and acknowledges it. With
//! durability SYNC one thread keeps many requests in flight, and one fdatasync makes them all
//! durable (group commit without a thread per request).
//!
//! A `tally_submission` owns what it needs (a copy of the request's strings, only while its
//! own event is in flight, and the decision already converted for C), so the caller's strings
//! may be freed as soon as `tally_engine_submit` returns.

use ::tally_engine::Submission;

use crate::checks::Out;
use crate::decision::{tally_decision, tally_request, Request};
use crate::handle::{free_boxed, take_boxed, tally_engine, to_boxed_ptr, try_ref, Castable};
use crate::panic::boundary;
use crate::status::{tally_status, Failure};

/// A consume submitted by `tally_engine_submit`, not yet acknowledged. Opaque. Owned by the
/// caller until passed to `tally_engine_complete` (which frees it) or `tally_submission_free`.
/// May be completed from any thread, once.
#[allow(non_camel_case_types)]
pub struct tally_submission {
    _private: [u8; 0],
}

impl Castable for tally_submission {
    type RustType = SubmissionHandle;
    const NAME: &'static str = "submission";
}

pub(crate) struct SubmissionHandle {
    submission: Submission,
    /// The decision as C sees it, converted when it was made (with the policy it was made by).
    decision: tally_decision,
}

/// Decides `*request` exactly as `tally_engine_consume` does, applies it at once (the next request
/// sees it) and queues its event, asking the log to flush it, without waiting; writes a new
/// submission to `*submission_out`. The decision is not an acknowledgement until
/// `tally_engine_complete` returns it: should the flush fail, that call gives the effect back and
/// returns the log's error (`TALLY_LOG_FAILED`). Bad input is its status here, with nothing changed
/// and nothing written. `request`'s strings are read during the call only.
///
/// Ownership: the caller owns `*submission_out` and must pass it to `tally_engine_complete`
/// (or `tally_submission_free`) exactly once. A submission freed uncompleted keeps its
/// effect, unacknowledged. Allocates (the submission, and a copy of the request's strings
/// while its event is in flight).
#[no_mangle]
pub extern "C" fn tally_engine_submit(
    engine: *const tally_engine,
    request: *const tally_request,
    submission_out: *mut *mut tally_submission,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = Out::new("submission_out", submission_out)?;
        let request = Request::from_c(request)?;
        let submitted = handle.with(|open| {
            let submitted = open.engine.submit(&request.engine_request())?;
            let decision = tally_decision::from_engine(
                submitted.decision(),
                &open.policy,
                submitted.replayed(),
            );
            Ok(SubmissionHandle {
                submission: submitted.detach(),
                decision,
            })
        })?;
        out.set(to_boxed_ptr::<tally_submission>(submitted));
        Ok(())
    })
}

/// Writes to `*durable_out` whether `tally_engine_complete` of `submission` would return at
/// once (its event is durable, or the log has failed and it would return the error). Does not
/// take `submission`, and must not run while another thread passes it to
/// `tally_engine_complete` or `tally_submission_free` (which free it): a submission, unlike an
/// engine, is not guarded against that. `TALLY_INVALID_ARGUMENT` if it was submitted to
/// another engine. After a `tally_engine_close` that returned `TALLY_OK` (which flushed every
/// event the engine had queued), `true`, as `tally_engine_complete` answers its decision then;
/// after a close that failed, or for another engine's submission, `TALLY_CLOSED`.
#[no_mangle]
pub extern "C" fn tally_engine_submission_durable(
    engine: *const tally_engine,
    submission: *const tally_submission,
    durable_out: *mut bool,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let submission = try_ref(submission)?;
        let out = Out::new("durable_out", durable_out)?;
        let durable =
            match handle.with(|open| Ok(open.engine.is_durable(&submission.submission)?)) {
                Ok(durable) => durable,
                // The close flushed its event: `tally_engine_complete` answers its decision at once
                // (an error here read as "not admitted", as it would there).
                Err(failure)
                    if failure.status == tally_status::TALLY_CLOSED
                        && handle.closed_cleanly() == submission.submission.instance_id() =>
                {
                    true
                }
                Err(failure) => return Err(failure),
            };
        out.set(durable);
        Ok(())
    })
}

/// Waits until `submission`'s event is durable (as the engine's durability mode says) and writes
/// its decision to `*decision_out` (`replayed` set for a repeated request id), or, if the event
/// never will be durable, gives the effect back, forgets the request id and returns the log's error
/// (`TALLY_LOG_FAILED`): then the request was not admitted. `TALLY_INVALID_ARGUMENT` if it was
/// submitted to another engine (which keeps its effect, unacknowledged). After a
/// `tally_engine_close` that returned `TALLY_OK`, which flushed every event the engine had
/// queued, its decision (the request stands, counted once); after a close that failed, or for
/// another engine's submission, `TALLY_CLOSED`.
///
/// Ownership: takes `submission` and frees it, whatever the status (also when `engine` or
/// `decision_out` is NULL); do not use it again. NULL is `TALLY_NULL_POINTER`.
#[no_mangle]
pub extern "C" fn tally_engine_complete(
    engine: *const tally_engine,
    submission: *mut tally_submission,
    decision_out: *mut tally_decision,
) -> tally_status {
    // Taken before anything can fail, so every path frees it.
    let submission = take_boxed(submission);
    boundary(move || {
        let submission = submission.ok_or_else(|| {
            Failure::new(
                tally_status::TALLY_NULL_POINTER,
                "submission: the handle is NULL",
            )
        })?;
        let handle = try_ref(engine)?;
        let out = Out::new("decision_out", decision_out)?;
        let SubmissionHandle {
            submission,
            mut decision,
        } = *submission;
        let mut pending = Some(submission);
        let completed = handle.with(|open| {
            let submission = pending.take().expect("taken once, here");
            open.engine.complete(submission).map_err(Failure::from)
        });
        let replayed = match (completed, pending) {
            (Ok((_, replayed)), _) => replayed,
            // The close flushed its event: the decision stands (an error here read as "not
            // admitted", and a retry without a request id counted it twice).
            (Err(failure), Some(submission))
                if failure.status == tally_status::TALLY_CLOSED
                    && handle.closed_cleanly() == submission.instance_id() =>
            {
                submission.replayed()
            }
            (Err(failure), _) => return Err(failure),
        };
        debug_assert_eq!(decision.replayed, replayed);
        decision.replayed = replayed;
        out.set(decision);
        Ok(())
    })
}

/// Frees a submission without completing it: its effect stays applied and its event on its way
/// to the log, unacknowledged (should the flush fail, nothing gives the effect back; the log
/// is failed then, and the engine admits nothing more until reopened). NULL is a no-op. Never
/// fails.
#[no_mangle]
pub extern "C" fn tally_submission_free(submission: *mut tally_submission) {
    let _ = boundary(|| {
        free_boxed(submission);
        Ok(())
    });
}
