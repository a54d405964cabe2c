package gateway_test

import (
	"log"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	tally "github.com/tally-engine/tally/ffi/go"
	"github.com/tally-engine/tally/ffi/go/gateway"
)

// The health path's answers, byte for byte, as the Python middleware's tests expect them too.
const (
	healthyBody    = `{"healthy":true,"failures":[],"error":null}` + "\n"
	compactionBody = `{"healthy":false,"failures":["compaction_failure"],"error":null}` + "\n"
	closedBody     = `{"healthy":false,"failures":[],"error":"the engine is closed (TALLY_CLOSED)"}` + "\n"
)

// withHealth sets the health path to /healthz.
func withHealth(config *gateway.Config) { config.HealthPath = "/healthz" }

// checkHealthAnswer checks a health answer's status, body and headers: JSON, never cached.
func checkHealthAnswer(t *testing.T, what string, a answer, status int, body string) {
	t.Helper()
	if a.status != status || a.raw != body {
		t.Fatalf("%s: %d %q, want %d %q", what, a.status, a.raw, status, body)
	}
	if a.header.Get("Content-Type") != "application/json" || a.header.Get("Cache-Control") != "no-store" {
		t.Fatalf("%s: headers %v", what, a.header)
	}
}

// A load balancer's probe needs no key, and the gateway answers it itself: a GET or HEAD on
// the health path (cleaned as a route is, whatever its query) is 200 while the engine reports
// nothing wrong, and never reaches the upstream. Before, no path told a monitor that the
// engine behind a gateway had failed.
func TestTheHealthPathAnswersAProbeWithoutAKeyAndNeverReachesTheUpstream(t *testing.T) {
	h := startWith(t, withHealth)
	h.user(t, "hp", "tp-hp", "Starter")
	for _, path := range []string{"/healthz", "//healthz/", "/v1/../healthz", "/healthz?verbose=1"} {
		for _, key := range []string{"", "tp-nobody", "tp-hp"} {
			checkHealthAnswer(t, "GET "+path+" "+key, h.send(t, http.MethodGet, path, key, false, "", nil),
				http.StatusOK, healthyBody)
		}
	}
	head := h.send(t, http.MethodHead, "/healthz", "", false, "", nil)
	checkHealthAnswer(t, "HEAD", head, http.StatusOK, "")
	if head.header.Get("Content-Length") != strconv.Itoa(len(healthyBody)) {
		t.Fatalf("HEAD: Content-Length %q", head.header.Get("Content-Length"))
	}
	if hits := h.upstream.hits.Load(); hits != 0 {
		t.Fatalf("the upstream saw %d health probes", hits)
	}
	// Only that path: one below it is an ordinary route (a key first).
	if a := h.send(t, http.MethodGet, "/healthz/deeper", "", false, "", nil); a.status != http.StatusUnauthorized {
		t.Fatalf("a path below the health path: %d %s", a.status, a.raw)
	}
}

// Another method on the health path is 405 with Allow, in the API's error shape, and the
// upstream never sees it.
func TestAnotherMethodOnTheHealthPathIs405WithAllow(t *testing.T) {
	h := startWith(t, withHealth)
	h.user(t, "hm", "tp-hm", "Starter")
	for _, method := range []string{http.MethodPost, http.MethodPut, http.MethodDelete, http.MethodOptions} {
		a := h.send(t, method, "/healthz", "tp-hm", false, `{"model":"m2.7"}`, nil)
		if a.status != http.StatusMethodNotAllowed || a.header.Get("Allow") != "GET, HEAD" ||
			a.header.Get("Cache-Control") != "no-store" {
			t.Fatalf("%s: %d %v %s", method, a.status, a.header, a.raw)
		}
		message := openAIError(t, a, "invalid_request_error")
		if code := a.body["error"].(map[string]interface{})["code"]; code != "method_not_allowed" ||
			!strings.Contains(message, method+" /healthz") {
			t.Fatalf("%s: code %v, message %q", method, code, message)
		}
	}
	if hits := h.upstream.hits.Load(); hits != 0 {
		t.Fatalf("the upstream saw %d calls", hits)
	}
}

// An engine closed under the gateway is 503, and the body says so.
func TestTheHealthPathIs503OnceTheEngineIsClosed(t *testing.T) {
	h := startWith(t, withHealth)
	if err := h.engine.Close(); err != nil {
		t.Fatal(err)
	}
	checkHealthAnswer(t, "closed", h.send(t, http.MethodGet, "/healthz", "", false, "", nil),
		http.StatusServiceUnavailable, closedBody)
}

// A compaction that fails in the background (each periodic checkpoint compacts what the
// retention lets go) reaches no call's answer: the health path is 503 naming it, its detail
// (a path, an OS error) goes to the gateway's log once, not to the caller, and the path is
// 200 again once a compaction succeeds.
func TestTheHealthPathIs503NamingAFailureInTheBackground(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "db")
	engine, err := tally.Open(dir, tally.WithDurability(tally.DurabilitySync),
		tally.WithOptions(tally.Options{Retention: time.Second, CheckpointEveryEvents: 4,
			MaxAheadOfClock: -1, ManualClock: t0}))
	if err != nil {
		t.Fatal(err)
	}
	logged := &lockedBuffer{}
	h := startOn(t, engine, func(config *gateway.Config) {
		withHealth(config)
		config.Clock = nil // the engine's own clock, which the test moves
		config.Logger = log.New(logged, "", 0)
	})
	h.user(t, "hf", "tp-hf", "Max")
	consumeSome := func(at time.Time) {
		t.Helper()
		for i := 0; i < 12; i++ {
			decision, err := engine.Consume(tally.Request{Key: "tp-hf", Resource: "m2.7",
				Quantities: []tally.Quantity{{Unit: tally.Requests, Amount: 1}},
				At:         at.Add(time.Duration(i) * time.Millisecond)})
			if err != nil || !decision.Admitted {
				t.Fatalf("consume: %+v %v", decision, err)
			}
		}
		if _, err := engine.Checkpoint(); err != nil { // the last periodic one ends first
			t.Fatal(err)
		}
	}
	consumeSome(t0)
	checkHealthAnswer(t, "before", h.send(t, http.MethodGet, "/healthz", "", false, "", nil), http.StatusOK, healthyBody)
	segments, err := filepath.Glob(filepath.Join(dir, "events", "*.seg"))
	if err != nil || len(segments) < 2 {
		t.Fatalf("segments %v %v", segments, err)
	}
	oldest := segments[0]
	if err := os.Rename(oldest, oldest+".kept"); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(oldest, 0o700); err != nil { // unreadable: a directory where the segment was
		t.Fatal(err)
	}
	later := t0.Add(40 * 24 * time.Hour) // past the longest window (a month) and the retention
	if err := engine.SetClock(later); err != nil {
		t.Fatal(err)
	}
	consumeSome(later)
	health, err := engine.Health()
	if err != nil || health.CompactionFailure == "" {
		t.Fatalf("no compaction failed: %+v %v", health, err)
	}
	for i := 0; i < 3; i++ {
		checkHealthAnswer(t, "failed", h.send(t, http.MethodGet, "/healthz", "", false, "", nil),
			http.StatusServiceUnavailable, compactionBody)
	}
	if text := logged.String(); strings.Count(text, health.CompactionFailure) != 1 {
		t.Fatalf("the failure's detail is not logged once: %q", text)
	}
	if err := os.Remove(oldest); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(oldest+".kept", oldest); err != nil {
		t.Fatal(err)
	}
	consumeSome(later.Add(time.Second))
	checkHealthAnswer(t, "after", h.send(t, http.MethodGet, "/healthz", "", false, "", nil), http.StatusOK, healthyBody)
	if text := logged.String(); !strings.Contains(text, "healthy again") {
		t.Fatalf("the recovery is not logged: %q", text)
	}
}

// A health path that is no clean path, or that would shadow a metered route or one that
// passes through (with any method), fails New naming the option: the probe would hide the
// route from its callers.
func TestAHealthPathThatIsNoPathOrShadowsARouteFailsNew(t *testing.T) {
	engine, err := tally.OpenInMemory(unbounded)
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	upstream, _ := url.Parse("http://127.0.0.1:1")
	for _, test := range []struct {
		path        string
		passThrough []string
		why         string
	}{
		{"healthz", nil, "clean"},
		{"/healthz/", nil, "clean"},
		{"//healthz", nil, "clean"},
		{"/a/../healthz", nil, "clean"},
		{"/healthz?x=1", nil, "clean"},
		{"/healthz#x", nil, "clean"},
		{"/health%7A", nil, "clean"},
		{"/v1/chat/completions", nil, "metered route POST /v1/chat/completions"},
		{"/v1/messages", nil, "metered route POST /v1/messages"},
		{"/v1/models", nil, "GET /v1/models"},
		{"/v1/models/health", nil, "GET /v1/models/*"},
		{"/v1/messages/count_tokens", nil, "POST /v1/messages/count_tokens"},
		{"/status", []string{"DELETE /status"}, "DELETE /status"},
	} {
		_, err := gateway.New(gateway.Config{Engine: engine, Upstream: upstream,
			PassThrough: test.passThrough, HealthPath: test.path})
		if err == nil || !strings.Contains(err.Error(), "HealthPath") ||
			!strings.Contains(err.Error(), test.path) || !strings.Contains(err.Error(), test.why) {
			t.Errorf("%q: %v", test.path, err)
		}
	}
	// A route no list passes through is free to take.
	if _, err := gateway.New(gateway.Config{Engine: engine, Upstream: upstream, PassThrough: []string{},
		HealthPath: "/v1/models"}); err != nil {
		t.Fatal(err)
	}
}

// Without a health path (the default) the gateway answers none: /healthz is an ordinary
// route, refused without a key as before and with one as not served, so no upstream route is
// shadowed unless the operator names it.
func TestWithoutAHealthPathNoPathIsAnsweredWithoutAKey(t *testing.T) {
	h := start(t)
	h.user(t, "hd", "tp-hd", "Starter")
	if a := h.send(t, http.MethodGet, "/healthz", "", false, "", nil); a.status != http.StatusUnauthorized {
		t.Fatalf("without a key: %d %s", a.status, a.raw)
	}
	if a := h.send(t, http.MethodGet, "/healthz", "tp-hd", false, "", nil); a.status != http.StatusForbidden {
		t.Fatalf("with a key: %d %s", a.status, a.raw)
	}
	if hits := h.upstream.hits.Load(); hits != 0 {
		t.Fatalf("the upstream saw %d calls", hits)
	}
}
