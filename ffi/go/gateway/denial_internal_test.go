package gateway

import (
	"strings"
	"testing"

	tally "github.com/tally-engine/tally/ffi/go"
)

// A key without a seat, its team holding credits, asking for a model credits cannot pay for
// (no price) is denied "resource not covered" (the engine's 7fa4722): the message must not
// name a plan the key does not have ("Plan no plan does not cover ...").
func TestANotCoveredDenialOfASeatlessKeyNamesNoPlan(t *testing.T) {
	message := denialMessage("free-model", tally.Decision{Denial: tally.DenialResourceNotCovered})
	if strings.Contains(message, "no plan does") || strings.Contains(message, "Plan no plan") {
		t.Fatalf("%q", message)
	}
	if !strings.Contains(message, "free-model") {
		t.Fatalf("%q", message)
	}
	seated := denialMessage("free-model", tally.Decision{Denial: tally.DenialResourceNotCovered, Plan: "Plus"})
	if !strings.Contains(seated, "Plan Plus does not cover free-model") {
		t.Fatalf("%q", seated)
	}
}

// Credits short: the message says the price, the balance and what to top up in credits with
// six decimals, exactly (as the Python middleware says it), not in micro-credits.
func TestAnInsufficientCreditsDenialSaysTheAmountsInCredits(t *testing.T) {
	message := denialMessage("m2.7", tally.Decision{
		Denial: tally.DenialInsufficientCredits, Plan: "Plus", Requested: 2_500_000_001,
		HasCreditsBalance: true, CreditsBalanceMicros: 1, CreditsNeededMicros: 2_500_000_000,
	})
	want := "The plan's quota for m2.7 cannot take this request and the team's credits are short: " +
		"it costs 2500.000001 credits, the balance is 0.000001. Or top up at least 2500.000000 credits to pay for it."
	if message != want {
		t.Fatalf("got  %q\nwant %q", message, want)
	}
	// The largest balance is written exactly (a float64 would round it).
	if got := credits(1<<64 - 1); got != "18446744073709.551615" {
		t.Fatalf("%q", got)
	}
	seatless := denialMessage("m2.7", tally.Decision{Denial: tally.DenialNoResources, CreditsNeededMicros: 1_000})
	if !strings.HasSuffix(seatless, "Assign a seat or top up credits (at least 0.001000 for this request).") {
		t.Fatalf("%q", seatless)
	}
	unpriced := denialMessage("m2.7", tally.Decision{Denial: tally.DenialNoResources})
	if !strings.HasSuffix(unpriced, "Assign a seat or top up credits.") {
		t.Fatalf("%q", unpriced)
	}
}
