package main

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	tally "github.com/tally-engine/tally/ffi/go"
)

// TestMain runs main itself, with the arguments in TALLY_GATEWAY_ARGS, when the tests start this
// test binary as the command (TALLY_GATEWAY_RUN_MAIN=1).
func TestMain(m *testing.M) {
	if os.Getenv("TALLY_GATEWAY_RUN_MAIN") == "1" {
		os.Args = append([]string{"tally-gateway"}, strings.Fields(os.Getenv("TALLY_GATEWAY_ARGS"))...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// The upstream's key from UPSTREAM_API_KEY is a secret: the usage the command prints for -help,
// or for a mistyped flag (into a terminal, a service's log), names where it comes from and
// never shows it.
func TestTheUsageNeverShowsTheUpstreamKey(t *testing.T) {
	const secret = "sk-upstream-secret-for-the-test"
	for _, args := range []string{"-help", "-upstrem http://127.0.0.1:1"} {
		command := exec.Command(os.Args[0], "-test.run=^$")
		command.Env = append(os.Environ(), "TALLY_GATEWAY_RUN_MAIN=1", "TALLY_GATEWAY_ARGS="+args,
			"UPSTREAM_API_KEY="+secret)
		output, _ := command.CombinedOutput()
		if !strings.Contains(string(output), "-upstream-key") {
			t.Fatalf("%s: no usage printed: %s", args, output)
		}
		if strings.Contains(string(output), secret) {
			t.Fatalf("%s: the usage shows the upstream's key:\n%s", args, output)
		}
	}
}

// A SIGTERM while a call is in flight waits for it: the caller gets the upstream's answer and
// its reservation is settled before the engine closes. (Before, the process closed the
// engine and exited at once: an empty reply, and a reservation left open to its lease's end.)
func TestAStopDrainsTheCallsInFlightBeforeTheEngineCloses(t *testing.T) {
	// Told when the call reaches the upstream (it has its reservation then): the stop comes
	// after. (A 200 ms sleep stood for that; on a loaded machine the call had not arrived, the
	// stop came first, and the call found the gateway gone.)
	arrived := make(chan struct{}, 1)
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		time.Sleep(700 * time.Millisecond)
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"object":"chat.completion","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":18,"total_tokens":30}}`)
	}))
	defer upstream.Close()
	db := filepath.Join(t.TempDir(), "db")
	stop := make(chan os.Signal, 1)
	addresses := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- run("127.0.0.1:0", upstream.URL, "", db, "", 256, 30*time.Minute, nil, "", demoKeys{"tp-demo:Starter"}, stop,
			func(addr string) { addresses <- addr })
	}()
	address := <-addresses
	answered := make(chan *http.Response, 1)
	go func() {
		body := `{"model":"MiniMax-M2.7","max_tokens":256,"messages":[{"role":"user","content":"hello"}]}`
		request, _ := http.NewRequest(http.MethodPost, "http://"+address+"/v1/chat/completions", strings.NewReader(body))
		request.Header.Set("Authorization", "Bearer tp-demo")
		request.Header.Set("Content-Type", "application/json")
		response, err := http.DefaultClient.Do(request)
		if err != nil {
			t.Errorf("the call in flight: %v", err)
			answered <- nil
			return
		}
		answered <- response
	}()
	select {
	case <-arrived:
	case <-time.After(time.Minute):
		t.Fatal("the call never reached the upstream")
	}
	stop <- syscall.SIGTERM
	response := <-answered
	if response == nil {
		t.FailNow()
	}
	payload, _ := io.ReadAll(response.Body)
	response.Body.Close()
	if response.StatusCode != http.StatusOK || !strings.Contains(string(payload), "chat.completion") {
		t.Fatalf("the call in flight got %d %q", response.StatusCode, payload)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	engine, err := tally.Open(db)
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	usage, err := engine.Usage("tp-demo", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if usage.OpenReservations != 0 {
		t.Fatalf("%d reservations left open", usage.OpenReservations)
	}
	if len(usage.Limits) == 0 || usage.Limits[0].Used != 1 {
		t.Fatalf("the call was not charged: %+v", usage.Limits)
	}
}

// A lease the engine cannot hold (none, past a day, a part of a millisecond) is refused when the gateway starts,
// not answered 503 at every call.
func TestALeaseTheEngineCannotHoldIsRefusedAtStart(t *testing.T) {
	for _, lease := range []time.Duration{0, -time.Second, 24*time.Hour + time.Millisecond, 1500 * time.Microsecond} {
		err := run("127.0.0.1:0", "http://127.0.0.1:1", "", "", "", 256, lease, nil, "", nil, nil, nil)
		if err == nil || !strings.Contains(err.Error(), "-lease") {
			t.Errorf("%s: %v", lease, err)
		}
	}
}

// An estimate the engine cannot hold (the prompt adds at least a token to it) is refused when
// the gateway starts, not answered 400 at every call without a max_tokens; so is 0, which
// Config reads as its default (4096) and the Python middleware's default_max_tokens refuses:
// it would hold none of what the model writes.
func TestAnEstimateTheEngineCannotHoldIsRefusedAtStart(t *testing.T) {
	for _, estimate := range []uint64{0, tally.MaxQuantity, 1 << 63} {
		// Stopped at once should it start: the test fails rather than serving on.
		stop := make(chan os.Signal, 1)
		stop <- os.Interrupt
		err := run("127.0.0.1:0", "http://127.0.0.1:1", "", "", "", estimate, 30*time.Minute, nil, "", nil, stop, nil)
		if err == nil || !strings.Contains(err.Error(), "-estimate-tokens") {
			t.Errorf("%d: %v", estimate, err)
		}
	}
}

// serve runs the command's gateway in front of upstream with the -pass-through entries, the
// -health path and a Starter key tp-demo, until the test ends; it returns the address it
// listens on.
func serve(t *testing.T, upstream string, passThrough []string, health string) string {
	t.Helper()
	stop := make(chan os.Signal, 1)
	addresses := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- run("127.0.0.1:0", upstream, "", "", "", 256, 30*time.Minute, passThrough, health,
			demoKeys{"tp-demo:Starter"}, stop, func(addr string) { addresses <- addr })
	}()
	select {
	case address := <-addresses:
		t.Cleanup(func() {
			stop <- syscall.SIGTERM
			if err := <-done; err != nil {
				t.Error(err)
			}
		})
		return address
	case err := <-done:
		t.Fatalf("the gateway did not start: %v", err)
		return ""
	}
}

// The command's startup line names the upstream, but never the password its URL may carry
// (https://user:password@host): the log is often read by more people than the secret is.
func TestTheStartupLogNeverShowsTheUpstreamsPassword(t *testing.T) {
	var logged bytes.Buffer
	log.SetOutput(&logged)
	t.Cleanup(func() { log.SetOutput(os.Stderr) })
	upstream := httptest.NewServer(http.NotFoundHandler())
	defer upstream.Close()
	withPassword := strings.Replace(upstream.URL, "http://", "http://operator:hunter2-secret@", 1)
	stop := make(chan os.Signal, 1)
	done := make(chan error, 1)
	go func() {
		done <- run("127.0.0.1:0", withPassword, "", "", "", 256, 30*time.Minute, nil, "", nil, stop,
			func(string) { stop <- syscall.SIGTERM })
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logged.String(), "proxying to") || strings.Contains(logged.String(), "hunter2-secret") {
		t.Fatalf("the startup log: %q", logged.String())
	}
}

// -pass-through opens a route (repeatable, "METHOD /path") on top of the default list; an
// entry that is no route, or a metered one, fails the start naming it.
func TestAPassThroughFlagOpensARouteAndABadOneFailsTheStart(t *testing.T) {
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"path":%q}`, r.URL.Path)
	}))
	defer upstream.Close()
	address := serve(t, upstream.URL, []string{"GET /v1/files/*"}, "")
	for path, want := range map[string]int{"/v1/files/file-1": http.StatusOK, "/v1/models": http.StatusOK,
		"/v1/files": http.StatusForbidden, "/v1/batches": http.StatusForbidden} {
		request, _ := http.NewRequest(http.MethodGet, "http://"+address+path, nil)
		request.Header.Set("Authorization", "Bearer tp-demo")
		response, err := http.DefaultClient.Do(request)
		if err != nil {
			t.Fatal(err)
		}
		payload, _ := io.ReadAll(response.Body)
		response.Body.Close()
		if response.StatusCode != want {
			t.Errorf("GET %s: %d %s", path, response.StatusCode, payload)
		}
	}
	for _, entry := range []string{"POST /v1/messages", "GET v1/files"} {
		err := run("127.0.0.1:0", upstream.URL, "", "", "", 256, 30*time.Minute, []string{entry}, "", nil, nil, nil)
		if err == nil || !strings.Contains(err.Error(), "-pass-through") || !strings.Contains(err.Error(), entry) {
			t.Errorf("%q: %v", entry, err)
		}
	}
}

// -health PATH has the gateway answer a probe on PATH without a key, never passed upstream;
// a path that is no clean path, a metered route or one that passes through fails the start
// naming -health.
func TestAHealthFlagServesAProbeAndABadPathFailsTheStart(t *testing.T) {
	var hits atomic.Int64
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		w.WriteHeader(http.StatusTeapot)
	}))
	defer upstream.Close()
	address := serve(t, upstream.URL, nil, "/healthz")
	response, err := http.Get("http://" + address + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	payload, _ := io.ReadAll(response.Body)
	response.Body.Close()
	if response.StatusCode != http.StatusOK || string(payload) != `{"healthy":true,"failures":[],"error":null}`+"\n" ||
		hits.Load() != 0 {
		t.Fatalf("GET /healthz: %d %q, the upstream saw %d", response.StatusCode, payload, hits.Load())
	}
	for _, test := range []struct {
		health      string
		passThrough []string
	}{{"healthz", nil}, {"/v1/messages", nil}, {"/v1/models", nil}, {"/status", []string{"POST /status"}}} {
		err := run("127.0.0.1:0", upstream.URL, "", "", "", 256, 30*time.Minute, test.passThrough, test.health, nil, nil, nil)
		if err == nil || !strings.HasPrefix(err.Error(), "-health: ") || !strings.Contains(err.Error(), test.health) {
			t.Errorf("%q: %v", test.health, err)
		}
	}
}
