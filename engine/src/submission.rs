//! Submitted consumes: decided and logged at once, acknowledged once durable.
//!
//! `Engine::consume` returns when its event is durable, so in `Sync` mode a thread has one
//! request in flight at a time, and group commit needs many threads (each a futex wake-up and
//! a context switch per request). A gateway with an event loop submits each request as it
//! arrives (`Engine::submit`: the decision is made and its event queued, and the writer is
//! asked to flush it) and completes it when its answer is due (`Submitted::complete`: waits
//! for the flush, usually long done). One thread keeps hundreds in flight, and one fdatasync
//! makes them all durable: what `consume_many` does for a batch the caller has gathered, for
//! requests that arrive one at a time.
//!
//! A submitted decision is not an acknowledgement: the effect is applied at once (the next
//! request sees it), but if its event never becomes durable (the log fails), `complete` gives
//! the effect back and returns the error, exactly as `consume` would have. A `Submitted` that is
//! dropped without completing leaves its effect applied, its event on its way to the log: if
//! the log then fails, nothing gives the effect back, and the engine counts in memory what the
//! log lost until it is reopened (the log is failed by then, so nothing more is admitted).
//!
//! `Submitted` borrows the engine and the request. A caller that can keep neither until it
//! completes (the C ABI, whose callers free their strings when a call returns) detaches it
//! into a `Submission`, which owns what a failed log needs to give the effect back, and
//! completes that with `Engine::complete`.

use crate::accounts::MAX_KEY_BYTES;
use crate::admission::{Decision, DenialReason, Mode, Quantities, Receipt, Verdict};
use crate::engine::{check_id, Awaits, Engine, UsageRequest};
use crate::error::Error;
use crate::idempotency::{ChunkSeq, Fingerprint, LoggedAs, MAX_REQUEST_ID_BYTES};
use crate::policy::Unit;

/// A consume decided and logged, whose decision stands only once `complete` returns it.
/// Borrows the engine and the request's strings (it keeps them to give the effect back should
/// the log fail).
#[must_use = "a submitted decision is acknowledged only by `complete`"]
#[derive(Debug)]
pub struct Submitted<'e, 'r> {
    engine: &'e Engine,
    request: UsageRequest<'r>,
    decision: Decision,
    replayed: bool,
    /// The effect this call made (none for a replay): what a failed log gives back.
    receipt: Option<Receipt>,
    awaits: Awaits,
}

impl Engine {
    /// Decides `request` as `consume` does and queues its event, without waiting for the event
    /// to be durable; the writer is asked to flush it now. Bad input is an error here, with
    /// nothing changed. The decision becomes an acknowledgement when `Submitted::complete`
    /// returns it.
    pub fn submit<'e, 'r>(
        &'e self,
        request: &UsageRequest<'r>,
    ) -> Result<Submitted<'e, 'r>, Error> {
        let at_ms = self.resolve_time(request.at_ms)?;
        let quantities = Quantities::new(request.quantities)?;
        if request.key.is_empty() || request.key.len() > MAX_KEY_BYTES {
            check_id("key", request.key, MAX_KEY_BYTES)?;
        }
        let mut decision = Decision::denied(DenialReason::UnknownKey);
        let mut verdict = Verdict::new(&mut decision);
        verdict.may_expire_leases = true;
        let mut outcome = self.submit_deciding(request, &quantities, at_ms, &mut verdict);
        if verdict.lease_ended_ms != 0 {
            // A denial an ended lease may explain: decided again once it is expired, or the
            // expiry's error answered (as `admit`).
            outcome = self
                .expire_before_deciding_again(&mut verdict)
                .and_then(|()| self.submit_deciding(request, &quantities, at_ms, &mut verdict));
        }
        let (receipt, replayed) = (verdict.receipt, verdict.replayed);
        // Outside every lock (a checkpoint takes them all).
        self.maybe_checkpoint();
        let awaits = outcome;
        if let (Ok(Awaits::Event(seq)), Some(journal)) = (&awaits, self.journal()) {
            journal.hurry(*seq);
        }
        // After the hurry, so housekeeping (a reclaim step, an expiry's fsync) does not delay
        // this submission's own flush.
        self.maybe_housekeep(1, || request.at_ms);
        let awaits = awaits?;
        Ok(Submitted {
            engine: self,
            request: *request,
            decision,
            replayed,
            receipt,
            awaits,
        })
    }

    /// `submit`'s decision, one pass.
    fn submit_deciding(
        &self,
        request: &UsageRequest<'_>,
        quantities: &Quantities,
        at_ms: u64,
        verdict: &mut Verdict<'_>,
    ) -> Result<Awaits, Error> {
        match request.request_id {
            None => {
                verdict.defer_wait = true;
                self.decide(
                    request.key,
                    request.resource,
                    quantities,
                    None,
                    at_ms,
                    Mode::Consume,
                    verdict,
                )
                .map(|()| match verdict.logged_seq {
                    0 => Awaits::Nothing,
                    seq => Awaits::Event(seq),
                })
            }
            Some(request_id) => {
                check_id("request_id", request_id, MAX_REQUEST_ID_BYTES).and_then(|()| {
                    let fingerprint = Fingerprint {
                        key: request.key,
                        resource: request.resource,
                        quantities: *quantities,
                    };
                    self.consume_once(request, request_id, fingerprint, quantities, at_ms, verdict)
                })
            }
        }
    }
}

/// Whether waiting for `awaits` would return at once: the event is durable, or the log has
/// failed (or will never log it).
fn settled(engine: &Engine, awaits: &Awaits) -> bool {
    let Some(journal) = engine.journal() else {
        return true;
    };
    match awaits {
        Awaits::Nothing => true,
        Awaits::Event(seq) => journal.is_settled(*seq),
        Awaits::FirstDecision(LoggedAs::Durable) => true,
        Awaits::FirstDecision(LoggedAs::Event(seq)) => journal.is_settled(*seq),
        Awaits::FirstDecision(LoggedAs::Chunk(chunk)) => match chunk.get() {
            None => false,
            Some(ChunkSeq::NEVER) => true,
            Some(seq) => journal.is_settled(seq),
        },
    }
}

impl Submitted<'_, '_> {
    /// Whether `complete` would return at once (its event is durable, or the log has failed).
    pub fn is_durable(&self) -> bool {
        settled(self.engine, &self.awaits)
    }

    /// The decision `complete` will return if the event becomes durable. Not an
    /// acknowledgement: should the log fail, `complete` returns the error instead.
    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    /// Whether the decision is a replay (the one remembered for the request's id).
    pub fn replayed(&self) -> bool {
        self.replayed
    }

    /// This submission, owning what it borrowed: completed by `Engine::complete` on the same
    /// engine. Copies the request's strings only when its own event is in flight (what a
    /// failed log gives back needs them); a replay or an engine without a log copies nothing.
    pub fn detach(self) -> Submission {
        let give_back = match self.awaits {
            Awaits::Event(_) => Some(Box::new(GiveBack {
                key: self.request.key.into(),
                resource: self.request.resource.into(),
                quantities: self.request.quantities.into(),
                request_id: self.request.request_id.map(Into::into),
                receipt: self.receipt,
            })),
            Awaits::Nothing | Awaits::FirstDecision(_) => None,
        };
        Submission {
            engine: self.engine.instance,
            decision: self.decision,
            replayed: self.replayed,
            awaits: self.awaits,
            give_back,
        }
    }

    /// Waits until the decision's event is durable (as the durability mode says) and returns
    /// the decision and whether it is a replay (the one remembered for the request's id). If
    /// the event never will be durable, the effect is given back (and the request id
    /// forgotten), and the log's error returned: the request was not admitted.
    pub fn complete(self) -> Result<(Decision, bool), Error> {
        self.engine
            .acknowledge(&self.request, self.awaits, self.receipt.as_ref(), true)?;
        Ok((self.decision, self.replayed))
    }
}

/// A submitted consume that owns what it needs (see `Submitted::detach`); its decision stands
/// once `Engine::complete` returns it. Dropping one without completing leaves its effect
/// applied, as with `Submitted`.
#[must_use = "a submitted decision is acknowledged only by `Engine::complete`"]
#[derive(Debug)]
pub struct Submission {
    /// The `instance` of the engine that made it.
    engine: u64,
    decision: Decision,
    replayed: bool,
    awaits: Awaits,
    /// What a failed log gives back; present exactly when `awaits` is the submission's own
    /// event.
    give_back: Option<Box<GiveBack>>,
}

/// The request and the effect of a submission whose own event is in flight.
#[derive(Debug)]
struct GiveBack {
    key: Box<str>,
    resource: Box<str>,
    quantities: Box<[(Unit, u64)]>,
    request_id: Option<Box<str>>,
    receipt: Option<Receipt>,
}

impl Submission {
    /// The decision `Engine::complete` will return if the event becomes durable (see
    /// `Submitted::decision`).
    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    /// Whether the decision is a replay.
    pub fn replayed(&self) -> bool {
        self.replayed
    }

    /// The engine that made it (`Engine::instance_id`). After that engine's `close` returned
    /// `Ok`, which flushed every event it had queued, the submission's `decision` stands:
    /// the C ABI's `tally_engine_complete` then answers it on the closed handle.
    pub fn instance_id(&self) -> u64 {
        self.engine
    }
}

impl Engine {
    fn check_owner(&self, submission: &Submission) -> Result<(), Error> {
        if submission.engine != self.instance {
            return Err(Error::invalid(
                "submission",
                "was submitted to another engine; complete it on the engine that made it",
            ));
        }
        Ok(())
    }

    /// `Submitted::is_durable` for a detached submission. A submission of another engine is
    /// an error.
    pub fn is_durable(&self, submission: &Submission) -> Result<bool, Error> {
        self.check_owner(submission)?;
        Ok(settled(self, &submission.awaits))
    }

    /// `Submitted::complete` for a detached submission: waits until its event is durable and
    /// returns the decision and whether it is a replay, or gives the effect back and returns
    /// the log's error. A submission of another engine is an error, and is dropped (its
    /// effect stays applied in the engine that made it).
    pub fn complete(&self, submission: Submission) -> Result<(Decision, bool), Error> {
        self.check_owner(&submission)?;
        let Submission {
            decision,
            replayed,
            awaits,
            give_back,
            ..
        } = submission;
        // Only a submission's own event needs the request (to give its effect back should the
        // log fail): `give_back` is there exactly then.
        debug_assert_eq!(give_back.is_some(), matches!(awaits, Awaits::Event(_)));
        let request = give_back
            .as_deref()
            .map_or(UsageRequest::new("", "", &[]), |kept| UsageRequest {
                key: &kept.key,
                resource: &kept.resource,
                quantities: &kept.quantities,
                at_ms: None,
                request_id: kept.request_id.as_deref(),
            });
        let receipt = give_back.as_deref().and_then(|kept| kept.receipt.as_ref());
        self.acknowledge(&request, awaits, receipt, true)?;
        Ok((decision, replayed))
    }
}
