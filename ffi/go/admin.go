package tally

/*
#include "tally.h"
*/
import "C"

import (
	"time"
)

// CreateUser creates a user, their Default Team ("@" + user) and their plan key in it. The
// key has no resources until a seat is assigned or the team has credits.
func (e *Engine) CreateUser(user, key string, at time.Time) error {
	atMs, err := milliseconds("CreateUser", at)
	if err != nil {
		return err
	}
	userText, userLen := text(user)
	keyText, keyLen := text(key)
	return e.call("CreateUser", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_create_user(handle, userText, userLen, keyText, keyLen, atMs)
	})
}

// CreateTeam creates a team with no members and no credits.
func (e *Engine) CreateTeam(team string, at time.Time) error {
	atMs, err := milliseconds("CreateTeam", at)
	if err != nil {
		return err
	}
	teamText, teamLen := text(team)
	return e.call("CreateTeam", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_create_team(handle, teamText, teamLen, atMs)
	})
}

// AddMember adds an existing user to a team with their plan key for that team. A member
// whose key was revoked is given key in its place, with no seat; otherwise a member already
// is ErrAlreadyExists.
func (e *Engine) AddMember(team, user, key string, at time.Time) error {
	atMs, err := milliseconds("AddMember", at)
	if err != nil {
		return err
	}
	teamText, teamLen := text(team)
	userText, userLen := text(user)
	keyText, keyLen := text(key)
	return e.call("AddMember", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_add_member(handle, teamText, teamLen, userText, userLen, keyText, keyLen, atMs)
	})
}

// RevokeKey revokes key (a plan or pay-as-you-go key, say one that leaked) and says whether
// it was revoked now (false: it already was, and nothing was logged). Every later request on
// it is denied DenialKeyRevoked, whatever its seat or its team's credits; a repeat of a
// request id admitted before still returns its first decision. What it used still counts,
// its open reservations still settle or void (a settle's extra beyond the hold is denied)
// and its requests still refund. Revoking is for good: give the member a new key with
// AddMember. An unknown key is ErrUnknownKey.
func (e *Engine) RevokeKey(key string, at time.Time) (bool, error) {
	atMs, err := milliseconds("RevokeKey", at)
	if err != nil {
		return false, err
	}
	keyText, keyLen := text(key)
	var revoked C.bool
	err = e.call("RevokeKey", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_revoke_key(handle, keyText, keyLen, atMs, &revoked)
	})
	return bool(revoked), err
}

// CreatePaygKey issues a pay-as-you-go key to an existing user: admitted whenever the
// resource exists, its spend recorded for billing; it never touches plan quota or credits.
func (e *Engine) CreatePaygKey(user, key string, at time.Time) error {
	atMs, err := milliseconds("CreatePaygKey", at)
	if err != nil {
		return err
	}
	userText, userLen := text(user)
	keyText, keyLen := text(key)
	return e.call("CreatePaygKey", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_create_payg_key(handle, userText, userLen, keyText, keyLen, atMs)
	})
}

// AssignSeat gives the user's key in the team a seat on plan, or changes it at once (usage
// already counted stays counted).
func (e *Engine) AssignSeat(team, user, plan string, at time.Time) error {
	atMs, err := milliseconds("AssignSeat", at)
	if err != nil {
		return err
	}
	teamText, teamLen := text(team)
	userText, userLen := text(user)
	planText, planLen := text(plan)
	return e.call("AssignSeat", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_assign_seat(handle, teamText, teamLen, userText, userLen, planText, planLen, atMs)
	})
}

// UnassignSeat takes the seat away (the key falls back to the team's credits, if any).
func (e *Engine) UnassignSeat(team, user string, at time.Time) error {
	atMs, err := milliseconds("UnassignSeat", at)
	if err != nil {
		return err
	}
	teamText, teamLen := text(team)
	userText, userLen := text(user)
	return e.call("UnassignSeat", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_unassign_seat(handle, teamText, teamLen, userText, userLen, atMs)
	})
}

// TopUp adds micro-credits to the team's balance and returns the new balance. A team's
// balance and everything charged to it add up to at most 2^63 - 1 (ErrOverflow past it).
func (e *Engine) TopUp(team string, micros uint64, at time.Time) (uint64, error) {
	return e.moveCredits("TopUp", team, micros, at)
}

// WithdrawCredits takes micro-credits from the team's balance, never below zero
// (ErrInsufficientCredits), and returns the new balance.
func (e *Engine) WithdrawCredits(team string, micros uint64, at time.Time) (uint64, error) {
	return e.moveCredits("WithdrawCredits", team, micros, at)
}

func (e *Engine) moveCredits(op, team string, micros uint64, at time.Time) (uint64, error) {
	atMs, err := milliseconds(op, at)
	if err != nil {
		return 0, err
	}
	teamText, teamLen := text(team)
	var balance C.uint64_t
	err = e.call(op, func(handle *C.tally_engine) C.uint32_t {
		if op == "TopUp" {
			return C.tally_engine_top_up(handle, teamText, teamLen, C.uint64_t(micros), atMs, &balance)
		}
		return C.tally_engine_withdraw_credits(handle, teamText, teamLen, C.uint64_t(micros), atMs, &balance)
	})
	return uint64(balance), err
}

// Credits is the team's balance in micro-credits.
func (e *Engine) Credits(team string) (uint64, error) {
	teamText, teamLen := text(team)
	var balance C.uint64_t
	err := e.call("Credits", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_credits(handle, teamText, teamLen, &balance)
	})
	return uint64(balance), err
}

// noPolicySource is no tally_policy_source: what SwapPolicy's option leaves unset if it
// names no policy.
const noPolicySource = ^uint32(0)

// SwapPolicy replaces the policy at run time (one of WithPolicyFile, WithPolicyTOML,
// WithPolicyJSON, or nil for the shipped default; WithStoredPolicy names no policy, nor does
// WithDurability or WithOptions: ErrInvalidArgument, changing nothing). Usage carries over; a
// swap that would drop a plan someone is seated on is refused (ErrInvalidArgument), and so is
// one whose usage could not carry over as it means: a meter kept by name that counts another
// unit or another weighted sum (other terms or weights; a usage bar may change its prices), a
// time zone changed under a calendar window that carries over (or the week's first
// day, week_start, under a weekly one), or a plan's limit moved to another window, rolling:5h
// to rolling:6h or daily to weekly, whose count so far would be dropped (ErrPolicyInvalid,
// naming the field).
func (e *Engine) SwapPolicy(policy Option, at time.Time) error {
	atMs, err := milliseconds("SwapPolicy", at)
	if err != nil {
		return err
	}
	o := collect(nil)
	if policy != nil {
		// An option that sets no policy (WithDurability, WithOptions) must not swap in the
		// shipped default: it leaves policySource as it found it.
		o.policySource = noPolicySource
		policy(&o)
		if o.policySource == noPolicySource {
			return newError("SwapPolicy", C.TALLY_INVALID_ARGUMENT,
				"policy: the option names no policy (WithPolicyFile, WithPolicyTOML or WithPolicyJSON; nil for the shipped default)")
		}
	}
	document, documentLen := o.policyText()
	err = e.call("SwapPolicy", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_swap_policy(handle, C.uint32_t(o.policySource), document, documentLen, atMs)
	})
	if err == nil {
		e.policyVersion.Add(1)
	}
	return err
}

// PolicyVersion changes each time SwapPolicy swaps in a policy (0 after Open): a cache of
// what the policy says (PolicyJSON), as the gateway keeps each resource's units, is current
// while the version it was read at is. A swap refused leaves it as it was.
func (e *Engine) PolicyVersion() uint64 {
	return e.policyVersion.Load()
}

// SetClock moves the engine's own clock (Options.ManualClock) to now, forward or back: from
// then on it is the time of a call with a zero `at`, and "now" for the bound ahead of the
// clock, how long request ids are remembered, and when leases end and idle keys are freed.
// Usage already counted stays counted: a clock moved back releases no quota early. An engine
// on the system clock, or a time outside tally's range, is ErrInvalidArgument and leaves the
// clock where it was.
func (e *Engine) SetClock(now time.Time) error {
	nowMs, err := milliseconds("SetClock", now)
	if err != nil || now.IsZero() {
		return newError("SetClock", C.TALLY_INVALID_ARGUMENT, "now: "+
			now.UTC().Format(time.RFC3339Nano)+" is not after 1970-01-01T00:00:00Z and before 2100")
	}
	return e.call("SetClock", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_set_clock(handle, nowMs)
	})
}

// Clock is the time the engine's clock reads now: the system clock's, or the engine's own
// (Options.ManualClock), to the millisecond, in UTC like every time the package returns.
func (e *Engine) Clock() (time.Time, error) {
	var nowMs C.uint64_t
	err := e.call("Clock", func(handle *C.tally_engine) C.uint32_t {
		return C.tally_engine_clock(handle, &nowMs)
	})
	if err != nil {
		return time.Time{}, err
	}
	return time.UnixMilli(int64(nowMs)).UTC(), nil
}
