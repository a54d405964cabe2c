package gateway_test

import (
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path"
	"strings"
	"sync"
	"testing"
	"time"

	tally "github.com/tally-engine/tally/ffi/go"
	"github.com/tally-engine/tally/ffi/go/gateway"
)

// refusedRoutes are routes the gateway neither meters nor passes through by default, each
// with whether its error is in Anthropic's shape: routes that make the operator's account pay
// for tokens (batches, Anthropic's legacy completions, transcriptions, image edits,
// moderations, fine-tuning, assistants' runs), that show other users' data (files, batches),
// a metered path with another method than POST (OpenAI's GET /v1/chat/completions lists stored
// completions), paths the gateway does not know, and one that cleans to such a path.
var refusedRoutes = []struct {
	method, path string
	anthropic    bool
}{
	{http.MethodPost, "/v1/messages/batches", true},
	{http.MethodGet, "/v1/messages/batches", true},
	{http.MethodPost, "/v1/complete", true},
	{http.MethodPost, "/v1/batches", false},
	{http.MethodGet, "/v1/batches", false},
	{http.MethodPost, "/v1/files", false},
	{http.MethodGet, "/v1/files", false},
	{http.MethodGet, "/v1/files/file-abc/content", false},
	{http.MethodPost, "/v1/audio/transcriptions", false},
	{http.MethodPost, "/v1/images/edits", false},
	{http.MethodPost, "/v1/moderations", false},
	{http.MethodPost, "/v1/fine_tuning/jobs", false},
	{http.MethodPost, "/v1/threads/runs", false},
	{http.MethodGet, "/v1/chat/completions", false},
	{http.MethodGet, "/v1/messages", true},
	{http.MethodPost, "/v1/models", false},
	{http.MethodGet, "/v1/models/a/b", false},
	{http.MethodGet, "/health", false},
	{http.MethodGet, "//v1/files/", false},
	{http.MethodDelete, "/v1/models/ft-mine", false},
}

// A route that is neither metered nor known to cost nothing is refused before the upstream,
// for a key with quota as for one without: 403 in the API's shape (OpenAI's
// invalid_request_error, code route_not_served; Anthropic's permission_error), naming the
// route. Before, every such route was proxied on the operator's key, unmetered. An unknown key
// is still 401 there, so it learns nothing about routes; as the Python middleware answers.
func TestRoutesNeitherMeteredNorFreeAreRefusedBeforeTheUpstream(t *testing.T) {
	h := start(t)
	h.user(t, "ro", "tp-ro", "Starter")
	h.user(t, "rn", "tp-rn", "") // no seat, no credits
	body := `{"model":"MiniMax-M2.7","max_tokens":16,"messages":[{"role":"user","content":"hello"}]}`
	for _, route := range refusedRoutes {
		for _, key := range []string{"tp-ro", "tp-rn"} {
			a := h.send(t, route.method, route.path, key, route.anthropic, body, nil)
			if a.status != http.StatusForbidden {
				t.Fatalf("%s %s, %s: %d %s", route.method, route.path, key, a.status, a.raw)
			}
			var message string
			if route.anthropic {
				message = anthropicError(t, a, "permission_error")
			} else {
				message = openAIError(t, a, "invalid_request_error")
				if code := a.body["error"].(map[string]interface{})["code"]; code != "route_not_served" {
					t.Fatalf("%s %s: code %v", route.method, route.path, code)
				}
			}
			named := route.method + " " + path.Clean(route.path)
			if !strings.Contains(message, named) || !strings.Contains(message, "not metered") {
				t.Fatalf("%s %s: the message does not name the route: %q", route.method, route.path, message)
			}
		}
		a := h.send(t, route.method, route.path, "tp-nobody", route.anthropic, body, nil)
		if a.status != http.StatusUnauthorized {
			t.Fatalf("%s %s, an unknown key: %d %s", route.method, route.path, a.status, a.raw)
		}
	}
	if hits := h.upstream.hits.Load(); hits != 0 {
		t.Fatalf("the upstream was called %d times for refused routes", hits)
	}
	usage, err := h.engine.Usage("tp-ro", t0.Add(time.Minute))
	if err != nil || usage.Limits[0].Used != 0 || usage.OpenReservations != 0 {
		t.Fatalf("a refused route charged or held: %+v %v", usage, err)
	}
}

// A websocket's upgrade is a route like any other: refused (403, before the upstream) unless
// PassThrough opens it ("GET /path", its handshake's method), as the Python middleware closes a
// websocket before accepting it (which its server answers 403).
func TestAWebsocketUpgradeIsRefusedUnlessItsRoutePassesThrough(t *testing.T) {
	upgrade := http.Header{"Connection": {"Upgrade"}, "Upgrade": {"websocket"},
		"Sec-Websocket-Version": {"13"}, "Sec-Websocket-Key": {"dGhlIHNhbXBsZSBub25jZQ=="}}
	h := start(t)
	h.user(t, "ws", "tp-ws", "Starter")
	if a := h.send(t, http.MethodGet, "/v1/realtime", "tp-ws", false, "", upgrade); a.status != http.StatusForbidden {
		t.Fatalf("a websocket on a route not passed through: %d %s", a.status, a.raw)
	}
	if a := h.send(t, http.MethodGet, "/v1/realtime", "tp-nobody", false, "", upgrade); a.status != http.StatusUnauthorized {
		t.Fatalf("a websocket with an unknown key: %d %s", a.status, a.raw)
	}
	if hits := h.upstream.hits.Load(); hits != 0 {
		t.Fatalf("the upstream was called %d times", hits)
	}
	open := startWith(t, func(config *gateway.Config) {
		config.PassThrough = append(append([]string(nil), gateway.DefaultPassThrough...), "GET /v1/realtime")
	})
	open.user(t, "ws", "tp-ws", "Starter")
	// The fake upstream does not upgrade: its answer comes back as it is.
	if a := open.send(t, http.MethodGet, "/v1/realtime", "tp-ws", false, "", upgrade); a.status != http.StatusOK {
		t.Fatalf("a websocket on a route passed through: %d %s", a.status, a.raw)
	}
	if hits := open.upstream.hits.Load(); hits != 1 {
		t.Fatalf("the upstream was called %d times", hits)
	}
}

// An operator opens more routes to pass through (ones they know cost nothing) with
// PassThrough: "METHOD /path", a "*" segment matching any one segment. It replaces the
// default list; empty, nothing passes through.
func TestPassThroughOpensTheRoutesItNamesOnly(t *testing.T) {
	h := startWith(t, func(config *gateway.Config) {
		config.PassThrough = append(append([]string(nil), gateway.DefaultPassThrough...),
			"POST /v1/moderations", "GET /v1/files/*/content")
	})
	h.user(t, "op", "tp-op", "Starter")
	for _, route := range []struct {
		method, path string
		want         int
	}{
		{http.MethodPost, "/v1/moderations", http.StatusOK},
		{http.MethodGet, "/v1/files/file-abc/content", http.StatusOK},
		{http.MethodGet, "/v1/files//file-abc/content/", http.StatusOK}, // passed on cleaned
		{http.MethodGet, "/v1/models", http.StatusOK},
		{http.MethodGet, "/v1/moderations", http.StatusForbidden},
		{http.MethodGet, "/v1/files/content", http.StatusForbidden},
		{http.MethodGet, "/v1/files/a/b/content", http.StatusForbidden},
		{http.MethodGet, "/v1/files", http.StatusForbidden},
	} {
		a := h.send(t, route.method, route.path, "tp-op", false, `{"model":"MiniMax-M2.7","input":"hi"}`, nil)
		if a.status != route.want {
			t.Fatalf("%s %s: %d %s", route.method, route.path, a.status, a.raw)
		}
		if route.method == http.MethodGet && a.status == http.StatusOK && route.path != "/v1/models" &&
			a.body["path"] != "/v1/files/file-abc/content" {
			t.Fatalf("%s %s reached the upstream as %v", route.method, route.path, a.body["path"])
		}
	}
	closed := startWith(t, func(config *gateway.Config) { config.PassThrough = []string{} })
	closed.user(t, "cl", "tp-cl", "Starter")
	if a := closed.send(t, http.MethodGet, "/v1/models", "tp-cl", false, "", nil); a.status != http.StatusForbidden {
		t.Fatalf("an empty PassThrough: GET /v1/models %d %s", a.status, a.raw)
	}
	if a := closed.call(t, false, "tp-cl", "MiniMax-M2.7", false); a.status != http.StatusOK {
		t.Fatalf("an empty PassThrough: a metered call %d %s", a.status, a.raw)
	}
}

// An entry that is no route, or that is a metered route (it would be both metered and free),
// fails New with an error naming it, not the calls later.
func TestABadPassThroughEntryFailsNew(t *testing.T) {
	engine, err := tally.OpenInMemory()
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	upstream, _ := url.Parse("http://127.0.0.1:1")
	for _, entry := range []string{
		"POST /v1/messages", "POST /v1/chat/completions", "POST /v1/*", "POST /v1/images/*",
		"GET", "/v1/models", "GET v1/models", "GET /v1/models/", "GET /v1//models", "GET /v1/./models",
		"GET /v1/models/../files", "GET /v1/mod*", "get /v1/models", "GET /v1/models?limit=1",
		"GET /v1/models extra", "", "GET /v1/a%2Fb",
	} {
		_, err := gateway.New(gateway.Config{Engine: engine, Upstream: upstream,
			PassThrough: append(append([]string(nil), gateway.DefaultPassThrough...), entry)})
		if err == nil || !strings.Contains(err.Error(), "PassThrough") || !strings.Contains(err.Error(), `"`+entry+`"`) {
			t.Errorf("%q: %v", entry, err)
		}
	}
	for _, entry := range []string{"GET /v1/files/*", "GET /v1/chat/completions", "DELETE /v1/models/*", "GET /"} {
		if _, err := gateway.New(gateway.Config{Engine: engine, Upstream: upstream, PassThrough: []string{entry}}); err != nil {
			t.Errorf("%q: %v", entry, err)
		}
	}
}

// A pass-through answer does not carry the upstream's rate-limit headers: they are the
// operator's account limits (metered answers carry the key's in their place), as in the
// Python middleware.
func TestAPassThroughAnswerDropsTheUpstreamsRateLimitHeaders(t *testing.T) {
	h := start(t)
	h.user(t, "rl", "tp-rl", "Starter")
	for _, a := range []answer{
		h.send(t, http.MethodGet, "/v1/models", "tp-rl", false, "", nil),
		h.post(t, true, "/v1/messages/count_tokens", "tp-rl", `{"model":"MiniMax-M2.7","messages":[]}`),
	} {
		if a.status != http.StatusOK || a.header.Get("Content-Type") != "application/json" {
			t.Fatalf("%d %s %v", a.status, a.raw, a.header)
		}
		for name := range a.header {
			lower := strings.ToLower(name)
			if strings.HasPrefix(lower, "x-ratelimit-") || strings.HasPrefix(lower, "anthropic-ratelimit-") {
				t.Fatalf("the upstream's %s came through: %v", name, a.header)
			}
		}
	}
}

// An EstimateTokens the engine cannot hold fails New, as a bad Lease does, not every call
// without a max_tokens later (400): the estimate adds at least one token for the prompt, so
// one of tally.MaxQuantity or more never fits.
func TestAnEstimateTheEngineCannotHoldFailsNew(t *testing.T) {
	engine, err := tally.OpenInMemory()
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	upstream, _ := url.Parse("http://127.0.0.1:1")
	for _, estimate := range []uint64{tally.MaxQuantity, tally.MaxQuantity + 1, 1 << 63} {
		if _, err := gateway.New(gateway.Config{Engine: engine, Upstream: upstream, EstimateTokens: estimate}); err == nil ||
			!strings.Contains(err.Error(), "EstimateTokens") {
			t.Errorf("EstimateTokens %d: %v", estimate, err)
		}
	}
	if _, err := gateway.New(gateway.Config{Engine: engine, Upstream: upstream, EstimateTokens: tally.MaxQuantity - 1}); err != nil {
		t.Errorf("the largest estimate that fits: %v", err)
	}
}

// An upstream with a path of its own (https://api.minimax.io/anthropic, the command's example)
// gets the operator's key in the header of the route's API, x-api-key on Anthropic's routes,
// and an unreachable one is 502 in that API's shape: both were decided on the path with the
// upstream's prefix, which no Anthropic route starts with.
func TestAnUpstreamWithAPathGetsTheKeyInTheRoutesHeader(t *testing.T) {
	engine, err := tally.OpenInMemory(unbounded)
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	addUser(t, engine, "px", "tp-px", "Starter")
	var headers sync.Map // path -> the key headers it came with
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		headers.Store(r.URL.Path, [2]string{r.Header.Get("Authorization"), r.Header.Get("x-api-key")})
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"type":"message","usage":{"input_tokens":10,"output_tokens":20}}`)
	}))
	defer upstream.Close()
	for _, live := range []bool{true, false} {
		base, _ := url.Parse(upstream.URL + "/anthropic")
		if !live {
			base, _ = url.Parse("http://127.0.0.1:1/anthropic")
		}
		g, err := gateway.New(gateway.Config{Engine: engine, Upstream: base, UpstreamKey: upstreamKey,
			Clock: func() time.Time { return t0 }, Logger: log.New(io.Discard, "", 0)})
		if err != nil {
			t.Fatal(err)
		}
		for _, path := range []string{"/v1/messages", "/v1/messages/count_tokens"} {
			recorder := httptest.NewRecorder()
			request := httptest.NewRequest(http.MethodPost, path, strings.NewReader(`{"model":"MiniMax-M2.7","max_tokens":5}`))
			request.Header.Set("x-api-key", "tp-px")
			g.ServeHTTP(recorder, request)
			if !live {
				a := answer{status: recorder.Code, raw: recorder.Body.String()}
				_ = json.Unmarshal(recorder.Body.Bytes(), &a.body)
				if a.status != http.StatusBadGateway {
					t.Fatalf("%s, unreachable: %d %s", path, a.status, a.raw)
				}
				anthropicError(t, a, "api_error")
				continue
			}
			if recorder.Code != http.StatusOK {
				t.Fatalf("%s: %d %s", path, recorder.Code, recorder.Body)
			}
			got, _ := headers.Load("/anthropic" + path)
			if got != [2]string{"", upstreamKey} {
				t.Fatalf("%s reached the upstream with Authorization %q and x-api-key %q", path, got.([2]string)[0], got.([2]string)[1])
			}
		}
	}
}

// A route both APIs serve (the model list) carries the operator's key the way the client sent
// its own: an Anthropic client (x-api-key) to an Anthropic upstream, whose /v1/models refuses
// a bearer key, an OpenAI client (Authorization: Bearer) as OpenAI's. Metered routes and
// Anthropic's own paths keep their API's header whatever the client sent.
func TestAModelListCarriesTheKeyInTheHeaderTheClientUsed(t *testing.T) {
	engine, err := tally.OpenInMemory(unbounded)
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	addUser(t, engine, "pm", "tp-pm", "Starter")
	var got [2]string
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = [2]string{r.Header.Get("Authorization"), r.Header.Get("x-api-key")}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"data":[]}`)
	}))
	defer upstream.Close()
	base, _ := url.Parse(upstream.URL)
	g, err := gateway.New(gateway.Config{Engine: engine, Upstream: base, UpstreamKey: upstreamKey,
		Clock: func() time.Time { return t0 }, Logger: log.New(io.Discard, "", 0)})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		path, header, value string
		want                [2]string
	}{
		{"/v1/models", "x-api-key", "tp-pm", [2]string{"", upstreamKey}},
		{"/v1/models/MiniMax-M2.7", "x-api-key", "tp-pm", [2]string{"", upstreamKey}},
		{"/v1/models", "Authorization", "Bearer tp-pm", [2]string{"Bearer " + upstreamKey, ""}},
		{"/v1/messages/count_tokens", "Authorization", "Bearer tp-pm", [2]string{"", upstreamKey}},
	} {
		method := http.MethodGet
		if strings.HasPrefix(c.path, "/v1/messages") {
			method = http.MethodPost
		}
		recorder := httptest.NewRecorder()
		request := httptest.NewRequest(method, c.path, strings.NewReader(`{"model":"MiniMax-M2.7"}`))
		request.Header.Set(c.header, c.value)
		got = [2]string{}
		g.ServeHTTP(recorder, request)
		if recorder.Code != http.StatusOK {
			t.Fatalf("%s %s: %d %s", method, c.path, recorder.Code, recorder.Body)
		}
		if got != c.want {
			t.Fatalf("%s with %s: the upstream got Authorization %q and x-api-key %q", c.path, c.header, got[0], got[1])
		}
	}
}
