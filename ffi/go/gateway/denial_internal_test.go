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
