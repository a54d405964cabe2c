package tally

/*
#include "tally.h"
*/
import "C"

import (
	"fmt"
	"time"
)

// Unit is what a quantity counts.
type Unit uint32

const (
	Requests   Unit = C.TALLY_UNIT_REQUESTS
	Characters Unit = C.TALLY_UNIT_CHARACTERS
	Images     Unit = C.TALLY_UNIT_IMAGES
	Videos     Unit = C.TALLY_UNIT_VIDEOS
	Songs      Unit = C.TALLY_UNIT_SONGS
	Seconds    Unit = C.TALLY_UNIT_SECONDS
	Tokens     Unit = C.TALLY_UNIT_TOKENS
)

var unitNames = [...]string{"requests", "characters", "images", "videos", "songs", "seconds", "tokens"}

// String is the unit's name in policies ("requests").
func (u Unit) String() string {
	if int(u) < len(unitNames) {
		return unitNames[u]
	}
	return fmt.Sprintf("Unit(%d)", uint32(u))
}

// ChargedTo says where an admitted request was charged.
type ChargedTo uint32

const (
	ChargedToNone       ChargedTo = C.TALLY_CHARGED_TO_NONE          // denied
	ChargedToPlanQuota  ChargedTo = C.TALLY_CHARGED_TO_PLAN_QUOTA    // within the plan's quota
	ChargedToCredits    ChargedTo = C.TALLY_CHARGED_TO_CREDITS       // the team's credits paid
	ChargedToPayAsYouGo ChargedTo = C.TALLY_CHARGED_TO_PAY_AS_YOU_GO // a pay-as-you-go key
)

var chargedToNames = [...]string{"none", "plan_quota", "credits", "pay_as_you_go"}

func (c ChargedTo) String() string {
	if int(c) < len(chargedToNames) {
		return chargedToNames[c]
	}
	return fmt.Sprintf("ChargedTo(%d)", uint32(c))
}

// Denial says why a request was denied.
type Denial uint32

const (
	DenialNone                Denial = C.TALLY_DENIAL_NONE
	DenialUnknownKey          Denial = C.TALLY_DENIAL_UNKNOWN_KEY
	DenialNoResources         Denial = C.TALLY_DENIAL_NO_RESOURCES          // no seat, no credits
	DenialResourceNotCovered  Denial = C.TALLY_DENIAL_RESOURCE_NOT_COVERED  // plan lacks it, credits cannot pay
	DenialOverRequestMaximum  Denial = C.TALLY_DENIAL_OVER_REQUEST_MAXIMUM  // Unit, Requested, Maximum
	DenialQuotaExhausted      Denial = C.TALLY_DENIAL_QUOTA_EXHAUSTED       // RetryAfter, RetryAt
	DenialExceedsLimit        Denial = C.TALLY_DENIAL_EXCEEDS_LIMIT         // waiting cannot help
	DenialInsufficientCredits Denial = C.TALLY_DENIAL_INSUFFICIENT_CREDITS  // Requested = price
	DenialTooManyReservations Denial = C.TALLY_DENIAL_TOO_MANY_RESERVATIONS // Requested = open
	DenialKeyRevoked          Denial = C.TALLY_DENIAL_KEY_REVOKED           // nothing lets it through
)

var denialNames = [...]string{"none", "unknown_key", "no_resources", "resource_not_covered",
	"over_request_maximum", "quota_exhausted", "exceeds_limit", "insufficient_credits",
	"too_many_reservations", "key_revoked"}

func (d Denial) String() string {
	if int(d) < len(denialNames) {
		return denialNames[d]
	}
	return fmt.Sprintf("Denial(%d)", uint32(d))
}

// Quantity is one amount of a request (1 to MaxQuantity, 2^40).
type Quantity struct {
	Unit   Unit
	Amount uint64
}

// Request is a usage request.
type Request struct {
	Key        string     // the API key
	Resource   string     // the resource's name in the policy, e.g. "m2.7"
	Quantities []Quantity // 1 to MaxQuantities, no unit twice
	At         time.Time  // zero: the engine's clock; else floored to the millisecond
	// RequestID is an optional idempotency id: a repeat within the horizon answers the first
	// decision (Replayed) and counts nothing, unless that was a denial for want of a valid
	// key (DenialUnknownKey, DenialKeyRevoked), which is not remembered: decided anew, and
	// denied so even where a new id would be refused (stamped before the horizon, the table
	// full: ErrBadTimestamp, ErrCapacityExceeded). "" is none (Go's zero value; Python, whose
	// none is None, refuses an empty id).
	RequestID string
}

// LimitStatus is one limit as a decision saw it.
type LimitStatus struct {
	LimitIndex int // index into the plan's limits
	Used       uint64
	Amount     uint64
	Remaining  uint64
	ResetAt    time.Time // zero when nothing is counted in a rolling window
}

// Decision is the answer of Consume, Check, Reserve and Settle.
type Decision struct {
	Admitted  bool
	Replayed  bool // the stored first decision of an earlier request with the same id
	ChargedTo ChargedTo
	Denial    Denial
	// The limit that denied or, when admitted from quota, the tightest one; -1 if none.
	LimitIndex  int
	LimitName   string // "m2.7:requests per rolling:5h"; "" if none
	LimitAmount uint64
	LimitUsed   uint64
	Remaining   uint64
	ResetAt     time.Time     // when LimitIndex's limit resets; zero if none
	RetryAfter  time.Duration // DenialQuotaExhausted: how long until it would fit
	RetryAt     time.Time
	At          time.Time // when the usage was counted (admitted)
	Unit        Unit      // DenialOverRequestMaximum: the unit over its maximum
	// Micro-credits charged to credits or pay-as-you-go (0 from plan quota).
	ChargedMicros        uint64
	HasCreditsBalance    bool
	CreditsBalanceMicros uint64
	CreditsNeededMicros  uint64 // denied: credits that would let it through (0: cannot help)
	Requested            uint64 // see Denial: what was asked ...
	Maximum              uint64 // ... and the bound it hit
	Limits               []LimitStatus
	Plan                 string // the key's plan; "" if none
	UpgradePlan          string // denied: a plan with room or that covers the resource
}

func decisionFrom(d *C.tally_decision) Decision {
	decision := Decision{
		Admitted:             bool(d.admitted),
		Replayed:             bool(d.replayed),
		ChargedTo:            ChargedTo(d.charged_to),
		Denial:               Denial(d.denial),
		LimitIndex:           index(d.limit_index),
		LimitName:            C.GoString(&d.limit_name[0]),
		LimitAmount:          uint64(d.limit_amount),
		LimitUsed:            uint64(d.limit_used),
		Remaining:            uint64(d.remaining),
		ResetAt:              fromMilliseconds(uint64(d.reset_at_ms)),
		RetryAfter:           duration(uint64(d.retry_after_ms)),
		RetryAt:              fromMilliseconds(uint64(d.retry_at_ms)),
		At:                   fromMilliseconds(uint64(d.at_ms)),
		Unit:                 Unit(d.unit),
		ChargedMicros:        uint64(d.charged_micros),
		HasCreditsBalance:    bool(d.has_credits_balance),
		CreditsBalanceMicros: uint64(d.credits_balance_micros),
		CreditsNeededMicros:  uint64(d.credits_needed_micros),
		Requested:            uint64(d.requested),
		Maximum:              uint64(d.maximum),
		Plan:                 C.GoString(&d.plan[0]),
		UpgradePlan:          C.GoString(&d.upgrade_plan[0]),
	}
	count := int(d.limit_count)
	if count > len(d.limits) {
		count = len(d.limits)
	}
	decision.Limits = make([]LimitStatus, count)
	for i := range decision.Limits {
		limit := &d.limits[i]
		decision.Limits[i] = LimitStatus{
			LimitIndex: index(limit.limit_index),
			Used:       uint64(limit.used),
			Amount:     uint64(limit.amount),
			Remaining:  uint64(limit.remaining),
			ResetAt:    fromMilliseconds(uint64(limit.reset_at_ms)),
		}
	}
	return decision
}

func index(i C.uint32_t) int {
	if i == C.TALLY_NO_INDEX {
		return -1
	}
	return int(i)
}

func duration(ms uint64) time.Duration {
	const most = uint64(1<<63-1) / uint64(time.Millisecond)
	if ms > most {
		ms = most
	}
	return time.Duration(ms) * time.Millisecond
}

// AdjustmentDirection says which way AdjustUsage corrects.
type AdjustmentDirection uint32

const (
	// AdjustAdd counts usage that really happened but was not counted, whatever the limit.
	AdjustAdd AdjustmentDirection = C.TALLY_ADJUST_ADD
	// AdjustRemove gives back usage counted that should not have been, where its window
	// still counts it.
	AdjustRemove AdjustmentDirection = C.TALLY_ADJUST_REMOVE
)

func (d AdjustmentDirection) String() string {
	switch d {
	case AdjustAdd:
		return "add"
	case AdjustRemove:
		return "remove"
	}
	return fmt.Sprintf("AdjustmentDirection(%d)", uint32(d))
}

// Adjustment is what AdjustUsage moved: one entry per limit of the key's plan that counts
// the resource, in the plan's order.
type Adjustment struct {
	Limits []AdjustedLimit
}

// AdjustedLimit is one limit a usage correction touched.
type AdjustedLimit struct {
	LimitIndex int    // index into the plan's limits (as LimitStatus.LimitIndex)
	Name       string // "m2.7:requests per rolling:5h"
	// Units added, or removed (at most what still counted: nothing for usage whose window
	// has reset or aged out).
	Moved uint64
}

func adjustmentFrom(a *C.tally_adjustment) Adjustment {
	count := int(a.limit_count)
	if count > len(a.limits) {
		count = len(a.limits)
	}
	adjustment := Adjustment{Limits: make([]AdjustedLimit, count)}
	for i := range adjustment.Limits {
		limit := &a.limits[i]
		adjustment.Limits[i] = AdjustedLimit{LimitIndex: index(limit.limit_index),
			Name: C.GoString(&limit.name[0]), Moved: uint64(limit.moved)}
	}
	return adjustment
}
