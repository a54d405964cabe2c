package gateway_test

import (
	"log"
	"net/http"
	"strings"
	"testing"
	"time"

	tally "github.com/tally-engine/tally/ffi/go"
	"github.com/tally-engine/tally/ffi/go/gateway"
)

// tokensOnlyPolicy meters its text model by tokens alone: "m2.7" has no requests unit.
const tokensOnlyPolicy = `
time_zone = "UTC"
[resources."m2.7"]
units = ["tokens"]
required = ["tokens"]
price_micros = { tokens = 1 }
[plans.Starter]
limits = [{ resource = "m2.7", unit = "tokens", amount = 100000, window = "rolling:5h" }]
`

// A chat call on a model whose resource meters tokens alone holds its tokens only (the
// gateway holds only the units the resource meters), and is settled at the tokens the
// upstream reported, as the Python middleware settles it: the settle must not add a request
// the resource does not meter (the engine refuses it, and the reservation stays open until
// its lease ends, when its hold is given back: the call is never charged).
func TestAChatCallOnAModelMeteredByTokensAloneIsSettledAtItsUsage(t *testing.T) {
	engine, err := tally.OpenInMemory(tally.WithPolicyTOML(tokensOnlyPolicy), unbounded)
	if err != nil {
		t.Fatal(err)
	}
	var logged strings.Builder
	h := startOn(t, engine, func(config *gateway.Config) { config.Logger = log.New(&logged, "", 0) })
	h.user(t, "ada", "tp-ada-1", "Starter")
	a := h.post(t, false, "/v1/chat/completions", "tp-ada-1",
		`{"model":"m2.7","max_tokens":16,"messages":[{"role":"user","content":"hello"}]}`)
	if a.status != http.StatusOK {
		t.Fatalf("a chat call on a model metered by tokens: %d %s", a.status, a.raw)
	}
	usage, err := engine.Usage("tp-ada-1", t0.Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	// The fake upstream reports 30 tokens (total_tokens).
	if len(usage.Limits) != 1 || usage.Limits[0].Used != 30 {
		t.Fatalf("counted: %+v (the upstream reported 30 tokens); logged: %s", usage.Limits, logged.String())
	}
}
