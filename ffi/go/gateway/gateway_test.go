package gateway_test

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	tally "github.com/tally-engine/tally/ffi/go"
	"github.com/tally-engine/tally/ffi/go/gateway"
)

// t0 is 2030-03-17T17:46:40Z; each call advances the gateway's clock by a millisecond.
var t0 = time.UnixMilli(1_900_000_000_000)

// unbounded opens an engine on a clock of its own at t0 (the engine forgets reservations
// relative to its clock, so what it does must not depend on the day the tests run), with no
// bound on how far ahead of it the gateway's clock may run.
var unbounded = tally.WithOptions(tally.Options{MaxAheadOfClock: -1, ManualClock: t0})

const upstreamKey = "sk-upstream-secret"

// fakeUpstream answers like the OpenAI and Anthropic APIs, with token usage, streamed when
// asked; while fail is set it answers 500. It counts the calls it served.
type fakeUpstream struct {
	fail   atomic.Bool
	served atomic.Int64
	hits   atomic.Int64 // every request that reached the upstream, on any route
	wrong  atomic.Int64 // calls that arrived without the upstream's key
	// usage, if set, is the "usage" object of non-streamed OpenAI answers.
	usage atomic.Pointer[string]
	// streamType, if set, is the Content-Type of streamed answers.
	streamType atomic.Pointer[string]
	// gzip: answers are gzip-compressed for a request that accepts gzip, as many HTTP
	// servers compress what clients accept.
	gzip atomic.Bool
}

func (f *fakeUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+upstreamKey && r.Header.Get("x-api-key") != upstreamKey {
		f.wrong.Add(1)
	}
	f.hits.Add(1)
	var body struct {
		Model  string `json:"model"`
		Stream bool   `json:"stream"`
	}
	if r.Method == http.MethodGet || r.URL.Path == "/v1/messages/count_tokens" {
		// A model list, a model, a token count, or whatever else a test opens: answered with
		// the operator's account limits, as the real APIs answer every call.
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("x-ratelimit-limit-requests", "99999")
		w.Header().Set("anthropic-ratelimit-tokens-limit", "2000000")
		switch {
		case r.URL.Path == "/v1/models":
			fmt.Fprint(w, `{"object":"list","data":[{"id":"MiniMax-M2.7"}]}`)
		case r.URL.Path == "/v1/messages/count_tokens":
			fmt.Fprint(w, `{"input_tokens":5}`)
		default:
			fmt.Fprintf(w, `{"path":%q}`, r.URL.Path)
		}
		return
	}
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil || body.Model == "" {
		http.Error(w, "the gateway must pass the body through", http.StatusBadRequest)
		return
	}
	if f.fail.Load() {
		http.Error(w, `{"error":{"message":"boom","type":"server_error"}}`, http.StatusInternalServerError)
		return
	}
	f.served.Add(1)
	if f.gzip.Load() && strings.Contains(r.Header.Get("Accept-Encoding"), "gzip") {
		w.Header().Set("Content-Encoding", "gzip")
		compressed := gzip.NewWriter(w)
		defer compressed.Close()
		w = gzipResponseWriter{ResponseWriter: w, Writer: compressed}
	}
	// The operator's account limits upstream, which are not the caller's.
	w.Header().Set("x-ratelimit-limit-requests", "99999")
	w.Header().Set("x-ratelimit-limit-tokens", "2000000")
	w.Header().Set("anthropic-ratelimit-tokens-limit", "2000000")
	anthropic := r.URL.Path == "/v1/messages"
	if body.Stream {
		w.Header().Set("Content-Type", "text/event-stream")
		if streamType := f.streamType.Load(); streamType != nil {
			w.Header().Set("Content-Type", *streamType)
		}
		if anthropic {
			fmt.Fprint(w, "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n")
			fmt.Fprint(w, "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n")
			fmt.Fprint(w, "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":20}}\n\n")
			fmt.Fprint(w, "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
		} else {
			fmt.Fprint(w, "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n")
			fmt.Fprint(w, "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":18,\"total_tokens\":30}}\n\n")
			fmt.Fprint(w, "data: [DONE]\n\n")
		}
		return
	}
	w.Header().Set("Content-Type", "application/json")
	if anthropic {
		fmt.Fprint(w, `{"type":"message","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":10,"output_tokens":20}}`)
	} else {
		usage := `{"prompt_tokens":12,"completion_tokens":18,"total_tokens":30}`
		if set := f.usage.Load(); set != nil {
			usage = *set
		}
		fmt.Fprint(w, `{"object":"chat.completion","choices":[],"usage":`+usage+`}`)
	}
}

// gzipResponseWriter writes the body through a gzip.Writer.
type gzipResponseWriter struct {
	http.ResponseWriter
	io.Writer
}

func (g gzipResponseWriter) Write(p []byte) (int, error) { return g.Writer.Write(p) }

type harness struct {
	engine   *tally.Engine
	upstream *fakeUpstream
	gateway  *httptest.Server
	policy   policyDocument
}

type policyDocument struct {
	Resources map[string]struct {
		PriceMicros map[string]uint64 `json:"price_micros"`
	} `json:"resources"`
	Plans map[string]struct {
		Limits []struct {
			Resource string `json:"resource"`
			Unit     string `json:"unit"`
			Amount   uint64 `json:"amount"`
		} `json:"limits"`
	} `json:"plans"`
}

// start runs a fake upstream and the gateway in front of it on loopback, on a fresh engine
// with the shipped policy.
func start(t *testing.T) *harness {
	t.Helper()
	return startWith(t, nil)
}

// startWith is start with the gateway's Config changed by configure (if not nil) first.
func startWith(t *testing.T, configure func(*gateway.Config)) *harness {
	t.Helper()
	engine, err := tally.OpenInMemory(unbounded)
	if err != nil {
		t.Fatal(err)
	}
	return startOn(t, engine, configure)
}

// startOn is startWith on engine, which the test's end closes.
func startOn(t *testing.T, engine *tally.Engine, configure func(*gateway.Config)) *harness {
	t.Helper()
	h := &harness{engine: engine, upstream: &fakeUpstream{}}
	upstream := httptest.NewServer(h.upstream)
	upstreamURL, _ := url.Parse(upstream.URL)
	var tick atomic.Int64
	config := gateway.Config{Engine: engine, Upstream: upstreamURL, UpstreamKey: upstreamKey,
		Clock:  func() time.Time { return t0.Add(time.Duration(tick.Add(1)) * time.Millisecond) },
		Logger: log.New(io.Discard, "", 0)}
	if configure != nil {
		configure(&config)
	}
	g, err := gateway.New(config)
	if err != nil {
		t.Fatal(err)
	}
	h.gateway = httptest.NewServer(g)
	t.Cleanup(func() {
		h.gateway.Close()
		upstream.Close()
		if err := engine.Close(); err != nil {
			t.Error(err)
		}
	})
	document, err := engine.PolicyJSON()
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(document), &h.policy); err != nil {
		t.Fatal(err)
	}
	return h
}

// limit reads a plan's limit on a resource's unit from the engine's policy.
func (h *harness) limit(t *testing.T, plan, resource, unit string) uint64 {
	for _, limit := range h.policy.Plans[plan].Limits {
		if limit.Resource == resource && limit.Unit == unit {
			return limit.Amount
		}
	}
	t.Fatalf("plan %s has no %s %s limit", plan, resource, unit)
	return 0
}

func (h *harness) user(t *testing.T, user, key, plan string) {
	t.Helper()
	addUser(t, h.engine, user, key, plan)
}

// addUser creates user with key in their Default Team at t0, seated on plan unless it is "".
func addUser(t *testing.T, engine *tally.Engine, user, key, plan string) {
	t.Helper()
	if err := engine.CreateUser(user, key, t0); err != nil {
		t.Fatal(err)
	}
	if plan == "" {
		return
	}
	if err := engine.AssignSeat("@"+user, user, plan, t0); err != nil {
		t.Fatal(err)
	}
}

type answer struct {
	status int
	header http.Header
	body   map[string]interface{}
	raw    string
}

// call sends one chat call the way the API's clients do: OpenAI with a Bearer key to
// /v1/chat/completions, Anthropic with x-api-key to /v1/messages.
func (h *harness) call(t *testing.T, anthropic bool, key, model string, stream bool) answer {
	path := "/v1/chat/completions"
	if anthropic {
		path = "/v1/messages"
	}
	body := fmt.Sprintf(`{"model":%q,"max_tokens":256,"stream":%t,"messages":[{"role":"user","content":"hello"}]}`, model, stream)
	return h.post(t, anthropic, path, key, body)
}

// post sends body to path as the API's clients do (see call).
func (h *harness) post(t *testing.T, anthropic bool, path, key, body string) answer {
	return h.send(t, http.MethodPost, path, key, anthropic, body, nil)
}

// openAIError and anthropicError check an error body's shape and return its message.
func openAIError(t *testing.T, a answer, wantType string) string {
	t.Helper()
	inner, ok := a.body["error"].(map[string]interface{})
	_, hasCode := inner["code"] // null for a malformed request
	if !ok || inner["type"] != wantType || inner["message"] == "" || !hasCode {
		t.Fatalf("not an OpenAI %s error: %d %s", wantType, a.status, a.raw)
	}
	return inner["message"].(string)
}

func anthropicError(t *testing.T, a answer, wantType string) string {
	t.Helper()
	inner, ok := a.body["error"].(map[string]interface{})
	if a.body["type"] != "error" || !ok || inner["type"] != wantType || inner["message"] == "" {
		t.Fatalf("not an Anthropic %s error: %d %s", wantType, a.status, a.raw)
	}
	return inner["message"].(string)
}

func TestAStarterKeyGetsExactlyItsLimitThen429sInEachAPIsShape(t *testing.T) {
	h := start(t)
	h.user(t, "ada", "tp-ada", "Starter")
	limit := h.limit(t, "Starter", "m2.7", "requests")
	total := int(limit) + 40
	var next atomic.Int64
	var admitted, limited atomic.Int64
	var mutex sync.Mutex
	denials := map[bool]answer{} // the last 429 by API (true: Anthropic)
	var wg sync.WaitGroup
	for worker := 0; worker < 8; worker++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1)
				if i > int64(total) {
					return
				}
				anthropic := i%2 == 0
				a := h.call(t, anthropic, "tp-ada", "MiniMax-M2.7", i%3 == 0)
				switch a.status {
				case http.StatusOK:
					admitted.Add(1)
				case http.StatusTooManyRequests:
					limited.Add(1)
					mutex.Lock()
					denials[anthropic] = a
					mutex.Unlock()
				default:
					t.Errorf("call %d: %d %s", i, a.status, a.raw)
					return
				}
			}
		}()
	}
	wg.Wait()
	if admitted.Load() != int64(limit) || limited.Load() != int64(total)-int64(limit) ||
		h.upstream.served.Load() != int64(limit) || h.upstream.wrong.Load() != 0 {
		t.Fatalf("admitted %d, 429 %d, upstream served %d (%d without its key); limit %d",
			admitted.Load(), limited.Load(), h.upstream.served.Load(), h.upstream.wrong.Load(), limit)
	}
	for anthropic, a := range denials {
		retryAfter, err := strconv.Atoi(a.header.Get("Retry-After"))
		if err != nil || retryAfter < 4*3600 || retryAfter > 5*3600+600 {
			t.Fatalf("Retry-After %q", a.header.Get("Retry-After"))
		}
		if a.header.Get("x-ratelimit-limit-requests") != fmt.Sprint(limit) ||
			a.header.Get("x-ratelimit-remaining-requests") != "0" ||
			a.header.Get("x-ratelimit-reset-requests") != (time.Duration(retryAfter)*time.Second).String() {
			t.Fatalf("headers %v", a.header)
		}
		var message string
		if anthropic {
			message = anthropicError(t, a, "rate_limit_error")
		} else {
			message = openAIError(t, a, "requests")
		}
		if !strings.Contains(message, "m2.7") || !strings.Contains(message, "resets at 2030-03-17T2") ||
			!strings.Contains(message, fmt.Sprintf("retry after %d seconds", retryAfter)) {
			t.Fatalf("message %q", message)
		}
	}
	if len(denials) != 2 {
		t.Fatalf("429s seen for %d APIs", len(denials))
	}
	usage, err := h.engine.Usage("tp-ada", t0.Add(time.Minute))
	if err != nil || usage.Limits[0].Used != limit || usage.OpenReservations != 0 {
		t.Fatalf("usage %+v %v", usage, err)
	}
}

func TestTokensTheUpstreamReportsAreSettled(t *testing.T) {
	h := start(t)
	// A shared-usage-bar plan counts tokens at their price, so the bar shows them.
	h.user(t, "bo", "tp-bo", "Bar-Plus")
	prices := h.policy.Resources["m2.7"].PriceMicros
	const tokensPerCall = 30 // the fake upstream's usage: 12 + 18, and 10 + 20
	for _, anthropic := range []bool{false, true} {
		for _, stream := range []bool{false, true} {
			a := h.call(t, anthropic, "tp-bo", "MiniMax-M2.7", stream)
			if a.status != http.StatusOK || a.header.Get("x-ratelimit-limit-usage") == "" {
				t.Fatalf("anthropic %t stream %t: %d %s %v", anthropic, stream, a.status, a.raw, a.header)
			}
		}
	}
	usage, err := h.engine.Usage("tp-bo", t0.Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	want := 4 * (prices["requests"] + tokensPerCall*prices["tokens"])
	if usage.Limits[0].Used != want || usage.OpenReservations != 0 {
		t.Fatalf("the bar shows %d (want %d), %d open reservations", usage.Limits[0].Used, want, usage.OpenReservations)
	}
}

// Clients ask for compressed answers (Go's and Python's HTTP clients send "Accept-Encoding:
// gzip" by default), and upstreams compress: the usage in a compressed answer is settled all the
// same, not the estimate, and the client still reads the answer.
func TestTokensInACompressedAnswerAreSettled(t *testing.T) {
	h := start(t)
	h.user(t, "gz", "tp-gz", "Bar-Plus")
	h.upstream.gzip.Store(true)
	prices := h.policy.Resources["m2.7"].PriceMicros
	const tokensPerCall = 30 // the fake upstream's usage: 12 + 18, and 10 + 20
	for _, anthropic := range []bool{false, true} {
		for _, stream := range []bool{false, true} {
			a := h.call(t, anthropic, "tp-gz", "MiniMax-M2.7", stream)
			if a.status != http.StatusOK || !strings.Contains(a.raw, "usage") {
				t.Fatalf("anthropic %t stream %t: %d %q %v", anthropic, stream, a.status, a.raw, a.header)
			}
		}
	}
	usage, err := h.engine.Usage("tp-gz", t0.Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	want := 4 * (prices["requests"] + tokensPerCall*prices["tokens"])
	if usage.Limits[0].Used != want || usage.OpenReservations != 0 {
		t.Fatalf("the bar shows %d (want %d, the usage the upstream reported), %d open reservations",
			usage.Limits[0].Used, want, usage.OpenReservations)
	}
}

func TestTokensPastTheLargestQuantityAreSettledNotLeftOpen(t *testing.T) {
	h := start(t)
	h.user(t, "bu", "tp-bu", "Bar-Plus")
	prices := h.policy.Resources["m2.7"].PriceMicros
	bar := func() uint64 {
		usage, err := h.engine.Usage("tp-bu", t0.Add(time.Minute))
		if err != nil {
			t.Fatal(err)
		}
		if usage.OpenReservations != 0 {
			t.Fatalf("%d reservations left open", usage.OpenReservations)
		}
		return usage.Limits[0].Used
	}
	// Past the largest quantity (2^40): the settle must still close the reservation.
	tooMany := `{"total_tokens":2199023255552}`
	h.upstream.usage.Store(&tooMany)
	if a := h.call(t, false, "tp-bu", "MiniMax-M2.7", false); a.status != http.StatusOK {
		t.Fatalf("%d %s", a.status, a.raw)
	}
	before := bar()
	// An input and output whose sum wraps around uint64 to 1 token must not charge 1 token.
	wrapping := `{"prompt_tokens":18446744073709551615,"completion_tokens":2}`
	h.upstream.usage.Store(&wrapping)
	if a := h.call(t, false, "tp-bu", "MiniMax-M2.7", false); a.status != http.StatusOK {
		t.Fatalf("%d %s", a.status, a.raw)
	}
	if charged, least := bar()-before, prices["requests"]+256*prices["tokens"]; charged < least {
		t.Fatalf("a wrapped-around token count charged %d, less than the estimate's %d", charged, least)
	}
}

func TestUnknownAndMissingKeysAre401InTheAPIsShape(t *testing.T) {
	h := start(t)
	a := h.call(t, false, "tp-nobody", "MiniMax-M2.7", false)
	if a.status != http.StatusUnauthorized {
		t.Fatalf("%d %s", a.status, a.raw)
	}
	openAIError(t, a, "invalid_request_error")
	a = h.call(t, true, "tp-nobody", "MiniMax-M2.7", false)
	if a.status != http.StatusUnauthorized {
		t.Fatalf("%d %s", a.status, a.raw)
	}
	anthropicError(t, a, "authentication_error")
	if a = h.call(t, false, "", "MiniMax-M2.7", false); a.status != http.StatusUnauthorized {
		t.Fatalf("no key: %d %s", a.status, a.raw)
	}
	if h.upstream.served.Load() != 0 {
		t.Fatal("the upstream served an unknown key")
	}
}

// A key no key can be (longer than any, or not UTF-8) is a credential that is not valid, as an
// unknown key is: 401, not 400, on metered and unmetered routes alike (as the Python
// middleware answers).
func TestAKeyNoKeyCanBeIs401LikeAnUnknownKey(t *testing.T) {
	h := start(t)
	h.user(t, "el", "tp-el", "Starter")
	// A key holding a control character the headers carry (a tab, U+0085) is no key either:
	// the engine refuses it as an argument (ErrInvalidArgument naming key), not a 503.
	for _, key := range []string{strings.Repeat("k", tally.MaxIDBytes+1), "tp-el\xff", "tp-el\tx", "tp-el\u0085x"} {
		a := h.call(t, false, key, "MiniMax-M2.7", false)
		if a.status != http.StatusUnauthorized {
			t.Fatalf("OpenAI, a %d-byte key: %d %s", len(key), a.status, a.raw)
		}
		openAIError(t, a, "invalid_request_error")
		a = h.call(t, true, key, "MiniMax-M2.7", false)
		if a.status != http.StatusUnauthorized {
			t.Fatalf("Anthropic, a %d-byte key: %d %s", len(key), a.status, a.raw)
		}
		anthropicError(t, a, "authentication_error")
		request, _ := http.NewRequest(http.MethodGet, h.gateway.URL+"/v1/models", nil)
		request.Header.Set("Authorization", "Bearer "+key)
		response, err := http.DefaultClient.Do(request)
		if err != nil {
			t.Fatal(err)
		}
		response.Body.Close()
		if response.StatusCode != http.StatusUnauthorized {
			t.Fatalf("unmetered, a %d-byte key: %d", len(key), response.StatusCode)
		}
	}
	// The longest key there can be is looked up: unknown, 401 as well.
	if a := h.call(t, false, strings.Repeat("k", tally.MaxIDBytes), "MiniMax-M2.7", false); a.status != http.StatusUnauthorized {
		t.Fatalf("the longest unknown key: %d %s", a.status, a.raw)
	}
	// A model no model can be is an unknown model: 404, as the Python middleware answers.
	for _, model := range []string{strings.Repeat("m", tally.MaxNameBytes+1), `m2.7\u0000`} {
		body := `{"model":"` + model + `","max_tokens":16,"messages":[]}`
		if a := h.post(t, false, "/v1/chat/completions", "tp-el", body); a.status != http.StatusNotFound {
			t.Fatalf("a model name no resource can have (%q): %d %s", model, a.status, a.raw)
		}
	}
	if h.upstream.served.Load() != 0 {
		t.Fatal("the upstream served a refused call")
	}
}

// A key is the bytes sent, trimmed of spaces and tabs only (what HTTP lets surround a value):
// one followed or led by another Unicode space (U+0085, U+00A0, U+2003, U+3000) is not the
// key and charges it nothing (as the Python middleware reads keys).
func TestAKeyIsTheBytesSentTrimmedOfSpacesAndTabsOnly(t *testing.T) {
	h := start(t)
	h.user(t, "el", "tp-el", "Starter")
	for _, anthropic := range []bool{false, true} {
		for _, key := range []string{"tp-el\u0085", "tp-el\u00a0", "\u2003tp-el", "\u3000tp-el"} {
			if a := h.call(t, anthropic, key, "MiniMax-M2.7", false); a.status != http.StatusUnauthorized {
				t.Fatalf("anthropic %t, key %q: %d %s", anthropic, key, a.status, a.raw)
			}
		}
	}
	if h.upstream.served.Load() != 0 {
		t.Fatal("the upstream served a call whose key is not tp-el")
	}
	for _, anthropic := range []bool{false, true} {
		if a := h.call(t, anthropic, " \ttp-el\t ", "MiniMax-M2.7", false); a.status != http.StatusOK {
			t.Fatalf("anthropic %t, tp-el between spaces and tabs: %d %s", anthropic, a.status, a.raw)
		}
	}
}

func TestAKeyWithoutASeatAndAnUnknownModelAreRefusedBeforeTheUpstream(t *testing.T) {
	h := start(t)
	h.user(t, "cy", "tp-cy", "")
	a := h.call(t, true, "tp-cy", "MiniMax-M2.7", false)
	if a.status != http.StatusForbidden || !strings.Contains(anthropicError(t, a, "permission_error"), "no Token Plan seat") {
		t.Fatalf("%d %s", a.status, a.raw)
	}
	a = h.call(t, false, "tp-cy", "MiniMax-M2.7", false)
	if a.status != http.StatusTooManyRequests || a.header.Get("Retry-After") != "" {
		t.Fatalf("%d %s", a.status, a.raw)
	}
	openAIError(t, a, "insufficient_quota")
	h.user(t, "di", "tp-di", "Starter")
	// 404, as the upstream answers a model it does not have (OpenAI's model_not_found,
	// Anthropic's not_found_error) and as the Python middleware answers.
	if a = h.call(t, false, "tp-di", "gpt-99", false); a.status != http.StatusNotFound || a.body["error"].(map[string]interface{})["code"] != "model_not_found" {
		t.Fatalf("unknown model: %d %s", a.status, a.raw)
	}
	openAIError(t, a, "invalid_request_error")
	if a = h.call(t, true, "tp-di", "gpt-99", false); a.status != http.StatusNotFound {
		t.Fatalf("unknown model, Anthropic: %d %s", a.status, a.raw)
	}
	anthropicError(t, a, "not_found_error")
	// Model names map by DefaultModels, exactly, as in the Python middleware: not by case.
	if a = h.call(t, false, "tp-di", "minimax-m2.7", false); a.status != http.StatusNotFound {
		t.Fatalf("a model spelled in another case: %d %s", a.status, a.raw)
	}
	if h.upstream.served.Load() != 0 {
		t.Fatal("the upstream served a refused call")
	}
}

func TestAMaxTokensPastTheLargestQuantityIsRefusedHoweverLarge(t *testing.T) {
	h := start(t)
	h.user(t, "fy", "tp-fy", "Starter")
	// 2^41 is past the largest quantity (2^40); 2^64 - 1 must not wrap around to a small
	// estimate when the prompt's tokens are added to it.
	for _, maxTokens := range []string{"2199023255552", "18446744073709551615"} {
		body := `{"model":"MiniMax-M2.7","max_tokens":` + maxTokens + `,"messages":[{"role":"user","content":"hello"}]}`
		a := h.post(t, false, "/v1/chat/completions", "tp-fy", body)
		if a.status != http.StatusBadRequest {
			t.Fatalf("max_tokens %s: %d %s", maxTokens, a.status, a.raw)
		}
		openAIError(t, a, "invalid_request_error")
	}
	if h.upstream.served.Load() != 0 {
		t.Fatal("the upstream served a call whose estimate could not be held")
	}
}

func TestAnUpstreamFailureVoidsTheReservation(t *testing.T) {
	h := start(t)
	h.user(t, "ed", "tp-ed", "Starter")
	h.upstream.fail.Store(true)
	a := h.call(t, false, "tp-ed", "MiniMax-M2.7", false)
	if a.status != http.StatusInternalServerError {
		t.Fatalf("%d %s", a.status, a.raw)
	}
	usage, err := h.engine.Usage("tp-ed", t0.Add(time.Minute))
	if err != nil || usage.Limits[0].Used != 0 || usage.OpenReservations != 0 {
		t.Fatalf("after an upstream error: %+v %v", usage, err)
	}
}

func TestAnUnreachableUpstreamIs502AndChargesNothing(t *testing.T) {
	engine, err := tally.OpenInMemory(unbounded)
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	addUser(t, engine, "fa", "tp-fa", "Starter")
	dead := httptest.NewServer(http.NotFoundHandler())
	deadURL, _ := url.Parse(dead.URL)
	dead.Close()
	g, err := gateway.New(gateway.Config{Engine: engine, Upstream: deadURL,
		Clock: func() time.Time { return t0 }, Logger: log.New(io.Discard, "", 0)})
	if err != nil {
		t.Fatal(err)
	}
	recorder := httptest.NewRecorder()
	request := httptest.NewRequest(http.MethodPost, "/v1/messages", strings.NewReader(`{"model":"MiniMax-M2.7","max_tokens":5}`))
	request.Header.Set("x-api-key", "tp-fa")
	g.ServeHTTP(recorder, request)
	a := answer{status: recorder.Code, raw: recorder.Body.String()}
	_ = json.Unmarshal(recorder.Body.Bytes(), &a.body)
	if a.status != http.StatusBadGateway {
		t.Fatalf("%d %s", a.status, a.raw)
	}
	// The failure's detail (the upstream's address) is the operator's to log, not the caller's
	// to read, as in the Python middleware.
	if message := anthropicError(t, a, "api_error"); strings.Contains(message, deadURL.Host) {
		t.Fatalf("the upstream's address leaked: %q", message)
	}
	usage, err := engine.Usage("tp-fa", t0)
	if err != nil || usage.Limits[0].Used != 0 || usage.OpenReservations != 0 {
		t.Fatalf("after an unreachable upstream: %+v %v", usage, err)
	}
}

// A revoked key is 401 on every route, metered or passed through, in the API's shape, and the
// upstream never sees its call, as in the Python middleware.
func TestARevokedKeyIs401OnEveryRoute(t *testing.T) {
	h := start(t)
	h.user(t, "rv", "tp-rv", "Max")
	if a := h.call(t, false, "tp-rv", "MiniMax-M2.7", false); a.status != http.StatusOK {
		t.Fatalf("before revoking: %d %s", a.status, a.raw)
	}
	if revoked, err := h.engine.RevokeKey("tp-rv", t0); err != nil || !revoked {
		t.Fatalf("RevokeKey: %v %v", revoked, err)
	}
	served := h.upstream.served.Load()
	hits := h.upstream.hits.Load()
	a := h.call(t, false, "tp-rv", "MiniMax-M2.7", false)
	if a.status != http.StatusUnauthorized || !strings.Contains(string(a.raw), "revoked") {
		t.Fatalf("OpenAI: %d %s", a.status, a.raw)
	}
	openAIError(t, a, "invalid_request_error")
	if a = h.call(t, true, "tp-rv", "MiniMax-M2.7", false); a.status != http.StatusUnauthorized {
		t.Fatalf("Anthropic: %d %s", a.status, a.raw)
	}
	anthropicError(t, a, "authentication_error")
	if a = h.send(t, http.MethodGet, "/v1/models", "tp-rv", false, "", nil); a.status != http.StatusUnauthorized {
		t.Fatalf("a route passed through: %d %s", a.status, a.raw)
	}
	if h.upstream.served.Load() != served || h.upstream.hits.Load() != hits {
		t.Fatal("the upstream served a revoked key")
	}
}

// The credential is judged before the request: a key the engine does not know, or one it
// revoked, is 401 whatever its body, never the 400 of a malformed body, the 404 of a model
// not served or the 413 of a body too large, which a known key still gets; as in the Python
// middleware.
func TestAnUnknownOrRevokedKeyIs401WhateverItsBody(t *testing.T) {
	engine, err := tally.OpenInMemory(unbounded)
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	addUser(t, engine, "rb", "tp-rb", "Max")
	addUser(t, engine, "rc", "tp-rc", "Max")
	if revoked, err := engine.RevokeKey("tp-rc", t0); err != nil || !revoked {
		t.Fatalf("RevokeKey: %v %v", revoked, err)
	}
	upstreamURL, _ := url.Parse("http://127.0.0.1:1")
	g, err := gateway.New(gateway.Config{Engine: engine, Upstream: upstreamURL, MaxBodyBytes: 64,
		Clock: func() time.Time { return t0 }, Logger: log.New(io.Discard, "", 0)})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		body string
		want int
	}{
		{`{not json`, http.StatusBadRequest},
		{`{"model":"no-such-model","messages":[]}`, http.StatusNotFound},
		{`{"model":"speech-2.8-hd","messages":[]}`, http.StatusBadRequest},
		{`{"model":"MiniMax-M2.7","messages":[{"role":"user","content":"` + strings.Repeat("x", 100) + `"}]}`, http.StatusRequestEntityTooLarge},
	} {
		for _, key := range []string{"tp-rb", "tp-nobody", "tp-rc"} {
			want := c.want
			if key != "tp-rb" {
				want = http.StatusUnauthorized
			}
			recorder := httptest.NewRecorder()
			request := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", strings.NewReader(c.body))
			request.Header.Set("Authorization", "Bearer "+key)
			g.ServeHTTP(recorder, request)
			if recorder.Code != want {
				t.Fatalf("%s, %.20s: %d (want %d) %s", key, c.body, recorder.Code, want, recorder.Body.String())
			}
			if want == http.StatusUnauthorized {
				a := answer{status: recorder.Code, raw: recorder.Body.String()}
				_ = json.Unmarshal(recorder.Body.Bytes(), &a.body)
				openAIError(t, a, "invalid_request_error")
			}
		}
	}
}

// A route that costs nothing and shows nothing of other users (a model list, a model, token
// counting: DefaultPassThrough) reaches the upstream unmetered on the operator's key: only for
// a key the engine knows, as in the Python middleware; the refusal is in the shape of the API
// the path belongs to. Every other route that is not metered is refused (see
// TestRoutesNeitherMeteredNorFreeAreRefusedBeforeTheUpstream).
func TestUnmeteredRoutesAreProxiedForKnownKeys(t *testing.T) {
	h := start(t)
	h.user(t, "gu", "tp-gu", "Starter")
	for key, want := range map[string]int{"tp-gu": http.StatusOK, "tp-nobody": http.StatusUnauthorized, "": http.StatusUnauthorized} {
		for _, path := range []string{"/v1/models", "/v1/models/MiniMax-M2.7"} {
			if a := h.send(t, http.MethodGet, path, key, false, "", nil); a.status != want {
				t.Fatalf("GET %s, %q: %d %s", path, key, a.status, a.raw)
			}
		}
	}
	a := h.post(t, true, "/v1/messages/count_tokens", "tp-nobody", `{"model":"MiniMax-M2.7","messages":[]}`)
	if a.status != http.StatusUnauthorized {
		t.Fatalf("count_tokens, an unknown key: %d %s", a.status, a.raw)
	}
	anthropicError(t, a, "authentication_error")
	if a := h.postTwoKeys(t, "/v1/models", "tp-gu", "tp-nobody"); a.status != http.StatusUnauthorized {
		t.Fatalf("two keys: %d %s", a.status, a.raw)
	}
	hits := h.upstream.hits.Load()
	a = h.post(t, true, "/v1/messages/count_tokens", "tp-gu", `{"model":"MiniMax-M2.7","messages":[]}`)
	if a.status != http.StatusOK || a.body["input_tokens"] != 5.0 {
		t.Fatalf("count_tokens: %d %s", a.status, a.raw)
	}
	if h.upstream.hits.Load() != hits+1 || h.upstream.wrong.Load() != 0 {
		t.Fatalf("the upstream saw %d calls (%d without its key)", h.upstream.hits.Load()-hits, h.upstream.wrong.Load())
	}
	usage, err := h.engine.Usage("tp-gu", t0.Add(time.Minute))
	if err != nil || usage.Limits[0].Used != 0 {
		t.Fatalf("passed through, yet charged: %+v %v", usage, err)
	}
}

// send sends a call with method to path, keyed as the API's clients do (see post), with the
// extra headers; body "" sends none.
func (h *harness) send(t *testing.T, method, path, key string, anthropic bool, body string, extra http.Header) answer {
	t.Helper()
	var reader io.Reader
	if body != "" {
		reader = strings.NewReader(body)
	}
	request, err := http.NewRequest(method, h.gateway.URL+path, reader)
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		request.Header.Set("Content-Type", "application/json")
	}
	if anthropic && key != "" {
		request.Header.Set("x-api-key", key)
		request.Header.Set("anthropic-version", "2023-06-01")
	} else if key != "" {
		request.Header.Set("Authorization", "Bearer "+key)
	}
	for name, values := range extra {
		request.Header[name] = values
	}
	response, err := http.DefaultClient.Do(request)
	if err != nil {
		t.Fatal(err)
	}
	defer response.Body.Close()
	raw, err := io.ReadAll(response.Body)
	if err != nil {
		t.Fatal(err)
	}
	a := answer{status: response.StatusCode, header: response.Header, raw: string(raw)}
	_ = json.Unmarshal(raw, &a.body)
	return a
}

// Each rate-limit header comes once on an admitted call: set before proxying and again on the
// upstream's response, the proxy sent both (and clients that join repeats read "1499, 1499").
func TestAnAdmittedCallsRateLimitHeadersComeOnce(t *testing.T) {
	h := start(t)
	h.user(t, "ho", "tp-ho", "Starter")
	for _, anthropic := range []bool{false, true} {
		for _, stream := range []bool{false, true} {
			a := h.call(t, anthropic, "tp-ho", "MiniMax-M2.7", stream)
			if a.status != http.StatusOK {
				t.Fatalf("anthropic %v stream %v: %d %s", anthropic, stream, a.status, a.raw)
			}
			names := []string{"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"}
			if anthropic {
				names = append(names, "anthropic-ratelimit-requests-remaining")
			}
			for _, name := range names {
				if values := a.header.Values(name); len(values) != 1 {
					t.Errorf("anthropic %v stream %v: %s = %q", anthropic, stream, name, values)
				}
			}
			// The upstream's own rate-limit headers are the operator's account's, not the
			// caller's: the gateway's replace them all, as in the Python middleware.
			if a.header.Get("x-ratelimit-limit-requests") != "1500" || a.header.Get("x-ratelimit-limit-tokens") != "" ||
				a.header.Get("anthropic-ratelimit-tokens-limit") != "" {
				t.Errorf("anthropic %v stream %v: the upstream's headers came through: %v", anthropic, stream, a.header)
			}
		}
	}
}

// A shared usage bar counts micro-credits at each endpoint's price, not requests: its headers
// say "usage".
func TestAUsageBarsHeadersAreNamedForWhatItCounts(t *testing.T) {
	h := start(t)
	h.user(t, "ub", "tp-ub", "Bar-Plus")
	a := h.call(t, false, "tp-ub", "MiniMax-M2.7", false)
	if a.status != http.StatusOK {
		t.Fatalf("%d %s", a.status, a.raw)
	}
	if a.header.Get("x-ratelimit-limit-usage") == "" || a.header.Get("x-ratelimit-limit-requests") != "" {
		t.Fatalf("usage-bar headers: %v", a.header)
	}
}

// A metered route's path with a trailing or doubled slash is metered (and passed on cleaned),
// not proxied free of charge.
func TestAMeteredRoutesPathSpelledOtherwiseIsStillMetered(t *testing.T) {
	h := start(t)
	h.user(t, "pa", "tp-pa", "Starter")
	for i, route := range []string{"/v1/chat/completions/", "//v1/chat/completions", "/v1/./chat/completions"} {
		body := `{"model":"MiniMax-M2.7","max_tokens":16,"messages":[{"role":"user","content":"hello"}]}`
		request, _ := http.NewRequest(http.MethodPost, h.gateway.URL+route, strings.NewReader(body))
		request.Header.Set("Authorization", "Bearer tp-pa")
		request.Header.Set("Content-Type", "application/json")
		response, err := http.DefaultClient.Do(request)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, response.Body)
		response.Body.Close()
		if response.StatusCode != http.StatusOK {
			t.Fatalf("%s: %d", route, response.StatusCode)
		}
		usage, err := h.engine.Usage("tp-pa", t0.Add(time.Minute))
		if err != nil || usage.Limits[0].Used != uint64(i+1) {
			t.Fatalf("%s: not metered: %+v %v", route, usage.Limits, err)
		}
	}
}

// postTwoKeys sends a chat call carrying bearer in Authorization and xAPIKey in x-api-key.
func (h *harness) postTwoKeys(t *testing.T, path, bearer, xAPIKey string) answer {
	t.Helper()
	body := `{"model":"MiniMax-M2.7","max_tokens":16,"messages":[{"role":"user","content":"hello"}]}`
	request, err := http.NewRequest(http.MethodPost, h.gateway.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	request.Header.Set("Content-Type", "application/json")
	request.Header.Set("Authorization", "Bearer "+bearer)
	request.Header.Set("x-api-key", xAPIKey)
	response, err := http.DefaultClient.Do(request)
	if err != nil {
		t.Fatal(err)
	}
	defer response.Body.Close()
	raw, err := io.ReadAll(response.Body)
	if err != nil {
		t.Fatal(err)
	}
	a := answer{status: response.StatusCode, header: response.Header, raw: string(raw)}
	_ = json.Unmarshal(raw, &a.body)
	return a
}

// Which header wins would decide whose quota pays (this gateway read x-api-key first, the
// Python middleware Authorization): a call with two different keys is refused, 401, as the
// Python middleware refuses it; the same key in both headers is one key.
func TestTwoDifferentKeysAre401AndChargeNeither(t *testing.T) {
	h := start(t)
	h.user(t, "ad", "tp-ad", "Starter")
	h.user(t, "bo", "tp-bo", "Starter")
	for _, path := range []string{"/v1/chat/completions", "/v1/messages"} {
		for _, keys := range [][2]string{{"tp-ad", "tp-bo"}, {"tp-bo", "tp-ad"}, {"tp-ad", "tp-nobody"}} {
			a := h.postTwoKeys(t, path, keys[0], keys[1])
			if a.status != http.StatusUnauthorized || !strings.Contains(a.raw, "two different API keys") {
				t.Fatalf("%s %v: %d %s", path, keys, a.status, a.raw)
			}
		}
	}
	if h.upstream.served.Load() != 0 {
		t.Fatal("the upstream served a call with two keys")
	}
	if a := h.postTwoKeys(t, "/v1/chat/completions", "tp-ad", "tp-ad"); a.status != http.StatusOK {
		t.Fatalf("the same key twice: %d %s", a.status, a.raw)
	}
	for key, want := range map[string]uint64{"tp-ad": 1, "tp-bo": 0} {
		usage, err := h.engine.Usage(key, t0.Add(time.Minute))
		if err != nil || usage.Limits[0].Used != want {
			t.Fatalf("%s: %+v %v", key, usage, err)
		}
	}
}

// An OpenAI 429's type is the unit of the limit that denied, as OpenAI's API says "requests"
// or "tokens" and as the x-ratelimit-*-<unit> headers name it (a shared usage bar: "usage"),
// as the Python middleware answers.
func TestAnOpenAI429sTypeIsTheUnitOfTheLimitThatDenied(t *testing.T) {
	h := start(t)
	h.user(t, "bu", "tp-bu", "Bar-Plus")
	fill := tally.Request{Key: "tp-bu", Resource: "m2.7", At: t0,
		Quantities: []tally.Quantity{{Unit: tally.Requests, Amount: 1}, {Unit: tally.Tokens, Amount: 1_997_000}}}
	if decision, err := h.engine.Consume(fill); err != nil || !decision.Admitted {
		t.Fatalf("%+v %v", decision, err)
	}
	a := h.call(t, false, "tp-bu", "MiniMax-M2.7", false)
	if a.status != http.StatusTooManyRequests || a.header.Get("x-ratelimit-limit-usage") == "" {
		t.Fatalf("%d %s %v", a.status, a.raw, a.header)
	}
	openAIError(t, a, "usage")
}

// The reset headers say when the limit is whole again (OpenAI: "resets to its initial state";
// Anthropic: "fully replenished"), not when this call would fit, which Retry-After says; and
// the x-tally-* headers say which plan and limit decided and where the call was charged, as
// the Python middleware answers.
func TestResetHeadersSayWhenTheLimitIsWholeAndXTallySaysWhere(t *testing.T) {
	h := start(t)
	if err := h.engine.CreateUser("re", "tp-re", t0.Add(-2*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := h.engine.AssignSeat("@re", "re", "Starter", t0.Add(-2*time.Hour)); err != nil {
		t.Fatal(err)
	}
	limit := h.limit(t, "Starter", "m2.7", "requests")
	// Most of the limit an hour ago, the rest (less the call below) now: the call fits again
	// in about 4 hours, the limit is whole in about 5.
	for _, spend := range []struct {
		at     time.Time
		amount uint64
	}{{t0.Add(-time.Hour), limit - 100}, {t0, 99}} {
		request := tally.Request{Key: "tp-re", Resource: "m2.7", At: spend.at,
			Quantities: []tally.Quantity{{Unit: tally.Requests, Amount: spend.amount}}}
		if decision, err := h.engine.Consume(request); err != nil || !decision.Admitted {
			t.Fatalf("%+v %v", decision, err)
		}
	}
	admitted := h.call(t, true, "tp-re", "MiniMax-M2.7", false)
	if admitted.status != http.StatusOK || admitted.header.Get("x-tally-plan") != "Starter" ||
		admitted.header.Get("x-tally-charged-to") != "plan_quota" ||
		admitted.header.Get("x-tally-limit") != "m2.7:requests per rolling:5h" {
		t.Fatalf("admitted: %d %v", admitted.status, admitted.header)
	}
	a := h.call(t, true, "tp-re", "MiniMax-M2.7", false)
	// What the engine says of the same call a moment later (its windows count in buckets of
	// whole seconds, so the gateway's few milliseconds past t0 round away).
	check, err := h.engine.Check(tally.Request{Key: "tp-re", Resource: "m2.7", At: t0.Add(100 * time.Millisecond),
		Quantities: []tally.Quantity{{Unit: tally.Requests, Amount: 1}}})
	if err != nil || check.Denial != tally.DenialQuotaExhausted || !check.RetryAt.Before(check.ResetAt) {
		t.Fatalf("check: %+v %v", check, err)
	}
	if a.status != http.StatusTooManyRequests || a.header.Get("Retry-After") != fmt.Sprint(int(check.RetryAt.Sub(t0).Seconds())) {
		t.Fatalf("%d %s %v", a.status, a.raw, a.header)
	}
	if a.header.Get("x-ratelimit-reset-requests") != check.ResetAt.Sub(t0).String() ||
		a.header.Get("anthropic-ratelimit-requests-reset") != check.ResetAt.UTC().Format(time.RFC3339) ||
		a.header.Get("x-tally-plan") != "Starter" || a.header.Get("x-tally-limit") != "m2.7:requests per rolling:5h" ||
		a.header.Get("x-tally-charged-to") != "" {
		t.Fatalf("denied: %v", a.header)
	}
}

// Speech is counted in characters of its "input" and images by "n" (one request each too), as
// the Python middleware counts them: these routes were proxied free of charge. An upstream
// error gives the charge back.
func TestSpeechAndImagesAreMeteredByWhatTheyMake(t *testing.T) {
	h := start(t)
	h.user(t, "sp", "tp-sp", "Plus")
	daily := h.limit(t, "Plus", "speech-2.8", "characters")
	speech := func(input string) answer {
		body, _ := json.Marshal(map[string]string{"model": "speech-2.8-hd", "input": input})
		return h.post(t, false, "/v1/audio/speech", "tp-sp", string(body))
	}
	if a := speech(strings.Repeat("é", int(daily)-1000)); a.status != http.StatusOK ||
		a.header.Get("x-ratelimit-remaining-characters") != "1000" {
		t.Fatalf("speech: %d %s %v", a.status, a.raw, a.header)
	}
	if a := speech(strings.Repeat("b", 1001)); a.status != http.StatusTooManyRequests {
		t.Fatalf("speech past the daily quota: %d %s", a.status, a.raw)
	}
	openAIError(t, speech(strings.Repeat("b", 1001)), "characters")
	if a := speech(""); a.status != http.StatusBadRequest {
		t.Fatalf("speech of nothing: %d %s", a.status, a.raw)
	}
	images := h.limit(t, "Plus", "image-01", "images")
	image := func(n string) answer {
		return h.post(t, false, "/v1/images/generations", "tp-sp", `{"model":"image-01","n":`+n+`}`)
	}
	if a := image(fmt.Sprint(images - 2)); a.status != http.StatusOK {
		t.Fatalf("images: %d %s", a.status, a.raw)
	}
	if a := image("3"); a.status != http.StatusTooManyRequests {
		t.Fatalf("images past the quota: %d %s", a.status, a.raw)
	}
	for _, n := range []string{"0", "-1", "2199023255552"} {
		if a := image(n); a.status != http.StatusBadRequest {
			t.Fatalf("n %s: %d %s", n, a.status, a.raw)
		}
	}
	h.upstream.fail.Store(true)
	if a := image("2"); a.status != http.StatusInternalServerError {
		t.Fatalf("a failed upstream: %d %s", a.status, a.raw)
	}
	h.upstream.fail.Store(false)
	if a := image("2"); a.status != http.StatusOK {
		t.Fatalf("the last 2 images after a failed call: %d %s", a.status, a.raw)
	}
	usage, err := h.engine.Usage("tp-sp", t0.Add(time.Minute))
	if err != nil || usage.OpenReservations != 0 {
		t.Fatalf("%+v %v", usage, err)
	}
}

// A body past MaxBodyBytes is 413 in each API's shape, as the Python middleware answers it:
// OpenAI's type invalid_request_error (code request_too_large), Anthropic's request_too_large.
func TestABodyTooLargeIs413InEachAPIsShape(t *testing.T) {
	engine, err := tally.OpenInMemory(unbounded)
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	addUser(t, engine, "la", "tp-la", "")
	upstreamURL, _ := url.Parse("http://127.0.0.1:1")
	g, err := gateway.New(gateway.Config{Engine: engine, Upstream: upstreamURL, MaxBodyBytes: 64,
		Clock: func() time.Time { return t0 }, Logger: log.New(io.Discard, "", 0)})
	if err != nil {
		t.Fatal(err)
	}
	body := `{"model":"MiniMax-M2.7","messages":[{"role":"user","content":"` + strings.Repeat("x", 100) + `"}]}`
	for _, anthropic := range []bool{false, true} {
		path := "/v1/chat/completions"
		if anthropic {
			path = "/v1/messages"
		}
		recorder := httptest.NewRecorder()
		request := httptest.NewRequest(http.MethodPost, path, strings.NewReader(body))
		request.Header.Set("x-api-key", "tp-la")
		g.ServeHTTP(recorder, request)
		a := answer{status: recorder.Code, raw: recorder.Body.String()}
		_ = json.Unmarshal(recorder.Body.Bytes(), &a.body)
		if a.status != http.StatusRequestEntityTooLarge {
			t.Fatalf("%s: %d %s", path, a.status, a.raw)
		}
		if anthropic {
			anthropicError(t, a, "request_too_large")
		} else {
			openAIError(t, a, "invalid_request_error")
		}
	}
}

// A body that could not be read whole (the client broke off, a malformed chunked encoding, a
// server's read timeout) is no body too large: 400, not a 413 telling the client to shrink it.
func TestABodyThatCouldNotBeReadIs400NotTooLarge(t *testing.T) {
	engine, err := tally.OpenInMemory(unbounded)
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	addUser(t, engine, "lb", "tp-lb", "")
	upstreamURL, _ := url.Parse("http://127.0.0.1:1")
	g, err := gateway.New(gateway.Config{Engine: engine, Upstream: upstreamURL,
		Clock: func() time.Time { return t0 }, Logger: log.New(io.Discard, "", 0)})
	if err != nil {
		t.Fatal(err)
	}
	for _, anthropic := range []bool{false, true} {
		path := "/v1/chat/completions"
		if anthropic {
			path = "/v1/messages"
		}
		broken := io.MultiReader(strings.NewReader(`{"model":"MiniMax-M2.7","mess`), iotest.ErrReader(io.ErrUnexpectedEOF))
		recorder := httptest.NewRecorder()
		request := httptest.NewRequest(http.MethodPost, path, broken)
		request.Header.Set("x-api-key", "tp-lb")
		g.ServeHTTP(recorder, request)
		a := answer{status: recorder.Code, raw: recorder.Body.String()}
		_ = json.Unmarshal(recorder.Body.Bytes(), &a.body)
		if a.status != http.StatusBadRequest {
			t.Fatalf("%s: %d %s", path, a.status, a.raw)
		}
		if anthropic {
			anthropicError(t, a, "invalid_request_error")
		} else {
			openAIError(t, a, "invalid_request_error")
		}
	}
}

// The estimate holds the first maximum the body names (max_tokens, then max_completion_tokens,
// then max_output_tokens) plus a token per 4 bytes of body and one, as the Python middleware
// estimates it.
func TestTheEstimateTakesTheFirstMaximumTheBodyNames(t *testing.T) {
	h := start(t)
	h.user(t, "es", "tp-es", "Bar-Plus")
	prices := h.policy.Resources["m2.7"].PriceMicros
	bar := h.limit(t, "Bar-Plus", "", "")
	body := `{"model":"MiniMax-M2.7","max_tokens":10,"max_completion_tokens":5000,"messages":[]}`
	a := h.post(t, false, "/v1/chat/completions", "tp-es", body)
	estimate := uint64(len(body))/4 + 1 + 10
	want := fmt.Sprint(bar - prices["requests"] - estimate*prices["tokens"])
	if a.status != http.StatusOK || a.header.Get("x-ratelimit-remaining-usage") != want {
		t.Fatalf("%d %s: remaining %q, want %s", a.status, a.raw, a.header.Get("x-ratelimit-remaining-usage"), want)
	}
}

// A legacy completion with best_of has the model write best_of candidates, all billed
// whatever n returns: the hold is the maximum times the larger of n and best_of (one that is
// no positive integer is passed over), as the Python middleware holds it. Held at one
// maximum, the output beyond the hold that did not fit was charged at the estimate.
func TestACompletionWithBestOfHoldsBestOfTimesItsMaximum(t *testing.T) {
	h := start(t)
	prices := h.policy.Resources["m2.7"].PriceMicros
	bar := h.limit(t, "Bar-Plus", "", "")
	for i, c := range []struct {
		extra  string
		output uint64
	}{{`"best_of":4`, 40}, {`"best_of":4,"n":2`, 40}, {`"best_of":1,"n":3`, 30},
		{`"best_of":"4"`, 10}, {`"best_of":0`, 10}} {
		key := fmt.Sprintf("tp-bo-%d", i)
		h.user(t, fmt.Sprintf("bo%d", i), key, "Bar-Plus")
		body := `{"model":"MiniMax-M2.7","prompt":"hello","max_tokens":10,` + c.extra + `}`
		a := h.post(t, false, "/v1/completions", key, body)
		estimate := uint64(len(body))/4 + 1 + c.output
		want := fmt.Sprint(bar - prices["requests"] - estimate*prices["tokens"])
		if a.status != http.StatusOK || a.header.Get("x-ratelimit-remaining-usage") != want {
			t.Fatalf("%s: %d %s: remaining %q, want %s", c.extra, a.status, a.raw,
				a.header.Get("x-ratelimit-remaining-usage"), want)
		}
	}
}

// A chat call asking for n completions may write n times its maximum: the hold is the
// maximum times n (an n that is no positive integer is passed over, as a maximum is), as the
// Python middleware holds it. Held at one maximum, a call with n = 8 whose output beyond the
// hold did not fit was charged an eighth of what it wrote.
func TestAChatCallForNCompletionsHoldsNTimesItsMaximum(t *testing.T) {
	h := start(t)
	prices := h.policy.Resources["m2.7"].PriceMicros
	bar := h.limit(t, "Bar-Plus", "", "")
	for i, c := range []struct {
		n      string
		output uint64
	}{{`3`, 30}, {`1`, 10}, {`-2`, 10}, {`"3"`, 10}, {`2.0`, 10}, {`null`, 10}} {
		key := fmt.Sprintf("tp-nn-%d", i)
		h.user(t, fmt.Sprintf("nn%d", i), key, "Bar-Plus")
		body := `{"model":"MiniMax-M2.7","max_tokens":10,"n":` + c.n + `,"messages":[]}`
		a := h.post(t, false, "/v1/chat/completions", key, body)
		estimate := uint64(len(body))/4 + 1 + c.output
		want := fmt.Sprint(bar - prices["requests"] - estimate*prices["tokens"])
		if a.status != http.StatusOK || a.header.Get("x-ratelimit-remaining-usage") != want {
			t.Fatalf("n %s: %d %s: remaining %q, want %s", c.n, a.status, a.raw,
				a.header.Get("x-ratelimit-remaining-usage"), want)
		}
	}
	// An n whose hold the engine cannot take is the client's error, not an outage.
	h.user(t, "nnx", "tp-nn-x", "Bar-Plus")
	body := `{"model":"MiniMax-M2.7","max_tokens":10,"n":1099511627776,"messages":[]}`
	if a := h.post(t, false, "/v1/chat/completions", "tp-nn-x", body); a.status != http.StatusBadRequest {
		t.Fatalf("a hold past the largest quantity: %d %s", a.status, a.raw)
	}
}

// An embedding writes no output: its hold is the input's estimate alone (a token per 4 bytes
// of body, and one), not EstimateTokens more, which turned a key with room for the embedding
// away (429) near its limit; as the Python middleware holds it.
func TestAnEmbeddingHoldsItsInputAlone(t *testing.T) {
	h := start(t)
	h.user(t, "em", "tp-em", "Bar-Plus")
	prices := h.policy.Resources["m2.7"].PriceMicros
	bar := h.limit(t, "Bar-Plus", "", "")
	body := `{"model":"MiniMax-M2.7","input":"the quick brown fox","max_tokens":10}`
	a := h.post(t, false, "/v1/embeddings", "tp-em", body)
	estimate := uint64(len(body))/4 + 1
	want := fmt.Sprint(bar - prices["requests"] - estimate*prices["tokens"])
	if a.status != http.StatusOK || a.header.Get("x-ratelimit-remaining-usage") != want {
		t.Fatalf("%d %s: remaining %q, want %s", a.status, a.raw, a.header.Get("x-ratelimit-remaining-usage"), want)
	}
}

// The body's fields are read by their exact names, as the upstream reads them: a "Model" or
// "Max_Tokens" beside "model" and "max_tokens" must not choose what is metered (a cheaper model
// than the one served, a smaller hold), as the Python middleware reads them.
func TestTheBodysFieldsAreReadByTheirExactNames(t *testing.T) {
	h := start(t)
	h.user(t, "ex", "tp-ex", "Bar-Plus")
	prices := h.policy.Resources["m2.7-highspeed"].PriceMicros
	bar := h.limit(t, "Bar-Plus", "", "")
	body := `{"model":"MiniMax-M2.7-highspeed","Model":"MiniMax-M2.7","max_tokens":10,"MAX_TOKENS":1,"messages":[]}`
	a := h.post(t, false, "/v1/chat/completions", "tp-ex", body)
	estimate := uint64(len(body))/4 + 1 + 10
	want := fmt.Sprint(bar - prices["requests"] - estimate*prices["tokens"])
	if a.status != http.StatusOK || a.header.Get("x-ratelimit-remaining-usage") != want {
		t.Fatalf("%d %s: remaining %q, want %s", a.status, a.raw, a.header.Get("x-ratelimit-remaining-usage"), want)
	}
}

// callsOnlyPolicy meters its text model by calls alone: "m2.7" has the unit requests and no
// tokens, as an operator with a flat price per call writes it.
const callsOnlyPolicy = `
time_zone = "UTC"
[resources."m2.7"]
units = ["requests"]
required = ["requests"]
price_micros = { requests = 1 }
[plans.Starter]
limits = [{ resource = "m2.7", unit = "requests", amount = 7, window = "rolling:5h" }]
`

// A chat call on a model whose resource meters requests alone is admitted and charged one
// request, as the Python middleware charges it: only the units the resource meters are held.
// It was 400 (the engine refusing the tokens the resource does not meter).
func TestAChatCallOnAModelMeteredByCallsAloneIsChargedOneRequest(t *testing.T) {
	engine, err := tally.OpenInMemory(tally.WithPolicyTOML(callsOnlyPolicy), unbounded)
	if err != nil {
		t.Fatal(err)
	}
	h := startOn(t, engine, nil)
	h.user(t, "ada", "tp-ada-1", "Starter")
	for _, anthropic := range []bool{false, true} {
		path := "/v1/chat/completions"
		if anthropic {
			path = "/v1/messages"
		}
		a := h.post(t, anthropic, path, "tp-ada-1",
			`{"model":"m2.7","max_tokens":16,"messages":[{"role":"user","content":"hello"}]}`)
		if a.status != http.StatusOK {
			t.Fatalf("%s on a model metered by calls: %d %s", path, a.status, a.raw)
		}
	}
	usage, err := engine.Usage("tp-ada-1", t0.Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if len(usage.Limits) != 1 || usage.Limits[0].Used != 2 {
		t.Fatalf("counted: %+v", usage.Limits)
	}
	if served := h.upstream.served.Load(); served != 2 {
		t.Fatalf("served %d calls", served)
	}
}

// A model the policy has no resource for is 404 model_not_found whatever else the body holds,
// as the Python middleware answers it: the model is judged before the quantities ("n": 0, an
// empty "input"), which are a model's. It was 400.
func TestAnUnknownModelIs404BeforeItsQuantitiesAreJudged(t *testing.T) {
	h := start(t)
	h.user(t, "ada", "tp-ada-1", "Plus")
	for _, c := range []struct{ path, body string }{
		{"/v1/images/generations", `{"model":"no-such-model","n":0}`},
		{"/v1/audio/speech", `{"model":"no-such-model","input":""}`},
	} {
		a := h.post(t, false, c.path, "tp-ada-1", c.body)
		if a.status != http.StatusNotFound || a.body["error"].(map[string]interface{})["code"] != "model_not_found" {
			t.Errorf("%s %s: %d %s", c.path, c.body, a.status, a.raw)
		}
	}
	// Still a key's answer first: an unknown key learns nothing of the models.
	if a := h.post(t, false, "/v1/images/generations", "tp-nobody", `{"model":"no-such-model","n":0}`); a.status != http.StatusUnauthorized {
		t.Errorf("an unknown key: %d %s", a.status, a.raw)
	}
}

// The units a resource meters are read again after a swap (Engine.PolicyVersion): a model the
// new policy adds is metered at once, and one it now meters by calls alone is charged so,
// without a new gateway.
func TestTheGatewayMetersWhatASwappedInPolicySays(t *testing.T) {
	engine, err := tally.OpenInMemory(unbounded)
	if err != nil {
		t.Fatal(err)
	}
	h := startOn(t, engine, nil)
	h.user(t, "ada", "tp-ada-1", "Plus")
	chat := `{"model":"m2.7","max_tokens":16,"messages":[]}`
	if a := h.post(t, false, "/v1/chat/completions", "tp-ada-1", chat); a.status != http.StatusOK {
		t.Fatalf("before the swap: %d %s", a.status, a.raw)
	}
	before := engine.PolicyVersion()
	// The shipped policy's plan Plus, refused: a swap must keep every plan with seats.
	if err := engine.SwapPolicy(tally.WithPolicyTOML(callsOnlyPolicy), t0.Add(time.Second)); err == nil {
		t.Fatal("a swap dropping a seated plan was accepted")
	}
	if engine.PolicyVersion() != before {
		t.Fatal("a refused swap changed the policy version")
	}
	if err := engine.UnassignSeat("@ada", "ada", t0.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := engine.SwapPolicy(tally.WithPolicyTOML(callsOnlyPolicy), t0.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if engine.PolicyVersion() == before {
		t.Fatal("a swap left the policy version as it was")
	}
	if err := engine.AssignSeat("@ada", "ada", "Starter", t0.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if a := h.post(t, false, "/v1/chat/completions", "tp-ada-1", chat); a.status != http.StatusOK {
		t.Fatalf("after the swap: %d %s", a.status, a.raw)
	}
	// speech-2.8-hd left the policy with the swap: not served any more.
	if a := h.post(t, false, "/v1/audio/speech", "tp-ada-1", `{"model":"speech-2.8-hd","input":"hi"}`); a.status != http.StatusNotFound {
		t.Fatalf("a model the swap removed: %d %s", a.status, a.raw)
	}
}

// A body that is not JSON (RFC 8259 asks for UTF-8; NaN and Infinity are no JSON numbers) is
// 400, neither metered nor passed on, as the Python middleware answers it: encoding/json alone
// would read bytes that are not UTF-8 as U+FFFD and go on.
func TestABodyThatIsNotJSONIs400(t *testing.T) {
	h := start(t)
	h.user(t, "nj", "tp-nj", "Plus")
	for _, body := range []string{
		"{\"model\":\"MiniMax-M2.7\",\"max_tokens\":16,\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}",
		`{"model":"MiniMax-M2.7","max_tokens":NaN,"messages":[]}`,
		"\xef\xbb\xbf{\"model\":\"MiniMax-M2.7\",\"max_tokens\":16,\"messages\":[]}",
	} {
		a := h.post(t, false, "/v1/chat/completions", "tp-nj", body)
		if a.status != http.StatusBadRequest {
			t.Errorf("%q: %d %s", body, a.status, a.raw)
		}
	}
	if h.upstream.served.Load() != 0 {
		t.Fatal("the upstream served a body that is not JSON")
	}
}

// A body nested past 512 levels (maxJSONNesting) is 400, neither metered nor passed on, as the Python
// middleware refuses it (its decoder recurses once per level): encoding/json alone read up to
// 10,000 levels and passed such a body on. At the bound, the body is read and passed on.
func TestABodyNestedTooDeepIs400(t *testing.T) {
	h := start(t)
	h.user(t, "dn", "tp-dn", "Plus")
	nested := func(depth int) string {
		return `{"model":"MiniMax-M2.7","max_tokens":16,"messages":` + strings.Repeat("[", depth) + strings.Repeat("]", depth) + `}`
	}
	for _, depth := range []int{600, 5_000, 20_000} {
		a := h.post(t, false, "/v1/chat/completions", "tp-dn", nested(depth))
		if a.status != http.StatusBadRequest || !strings.Contains(string(a.raw), "nested deeper than 512 levels") {
			t.Errorf("depth %d: %d %s", depth, a.status, a.raw)
		}
	}
	if h.upstream.served.Load() != 0 {
		t.Fatal("the upstream served a body nested too deep")
	}
	if a := h.post(t, false, "/v1/chat/completions", "tp-dn", nested(511)); a.status != http.StatusOK {
		t.Fatalf("at the bound: %d %s", a.status, a.raw)
	}
}

// A chat call on a model whose resource cannot take what the call is counted in (a speech
// model, which must carry characters) is the request's fault: 400 in the API's shape, not a 503
// outage a client would retry, as the Python middleware answers it.
func TestAModelThatCannotTakeTheCallIs400NotAnOutage(t *testing.T) {
	h := start(t)
	h.user(t, "sp", "tp-sp", "Bar-Plus")
	body := `{"model":"speech-2.8-hd","max_tokens":16,"messages":[]}`
	a := h.post(t, false, "/v1/chat/completions", "tp-sp", body)
	if a.status != http.StatusBadRequest {
		t.Fatalf("%d %s", a.status, a.raw)
	}
	openAIError(t, a, "invalid_request_error")
	if a = h.post(t, true, "/v1/messages", "tp-sp", body); a.status != http.StatusBadRequest {
		t.Fatalf("Anthropic: %d %s", a.status, a.raw)
	}
	anthropicError(t, a, "invalid_request_error")
	if h.upstream.served.Load() != 0 {
		t.Fatal("the upstream served a refused call")
	}
}

// An answer the upstream began with 200 and broke off (its body shorter than its
// Content-Length) was served upstream: the call is charged its estimate, as a stream broken off
// is charged what it reported, and as the Python middleware charges it, not voided as if the
// upstream had failed.
func TestAJSONAnswerBrokenOffIsChargedItsEstimate(t *testing.T) {
	broken := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", "1000")
		w.WriteHeader(http.StatusOK)
		fmt.Fprint(w, `{"object":"chat.completion","choices":[{"message":{"content":"hi`)
	}))
	t.Cleanup(broken.Close)
	h := startWith(t, func(config *gateway.Config) { config.Upstream, _ = url.Parse(broken.URL) })
	h.user(t, "bk", "tp-bk", "Bar-Plus")
	prices := h.policy.Resources["m2.7"].PriceMicros
	body := `{"model":"MiniMax-M2.7","max_tokens":100,"messages":[]}`
	// The client gets what arrived and sees it broken off, as from the Python middleware (its
	// app raising after the first piece), not a 502 in its place.
	status, got, readErr := h.postRaw(t, "/v1/chat/completions", "tp-bk", body)
	if status != http.StatusOK || got != `{"object":"chat.completion","choices":[{"message":{"content":"hi` || readErr == nil {
		t.Fatalf("%d %q %v", status, got, readErr)
	}
	usage, err := h.engine.Usage("tp-bk", t0.Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	estimate := uint64(len(body))/4 + 1 + 100
	want := prices["requests"] + estimate*prices["tokens"]
	if usage.Limits[0].Used != want || usage.OpenReservations != 0 {
		t.Fatalf("the bar shows %d (want %d), %d open reservations", usage.Limits[0].Used, want, usage.OpenReservations)
	}
}

// A key the engine holds is UTF-8, and so is a header carrying one that is not ASCII: the key
// as created is admitted in either header, as the Python middleware reads it.
func TestAKeyBeyondASCIIIsReadAsUTF8(t *testing.T) {
	h := start(t)
	h.user(t, "ut", "tp-clé-ü", "Starter")
	for _, anthropic := range []bool{false, true} {
		if a := h.call(t, anthropic, "tp-clé-ü", "MiniMax-M2.7", false); a.status != http.StatusOK {
			t.Fatalf("anthropic %t: %d %s", anthropic, a.status, a.raw)
		}
	}
}

// A maximum that is no positive integer (-1, "100", 100.0, true) is no maximum: the estimate
// takes the next one the body names, or EstimateTokens, and the upstream judges the body, as
// the Python middleware estimates it; not a 400 saying the body has no "model".
func TestAMaximumThatIsNoPositiveIntegerIsPassedOver(t *testing.T) {
	for _, c := range []struct {
		maximums string
		output   uint64
	}{
		{`"max_tokens":-1`, 4096},
		{`"max_tokens":"100"`, 4096},
		{`"max_tokens":100.0`, 4096},
		{`"max_tokens":true`, 4096},
		{`"max_tokens":"100","max_completion_tokens":10`, 10},
		{`"max_tokens":null,"max_output_tokens":12.5`, 4096},
	} {
		h := start(t)
		h.user(t, "mx", "tp-mx", "Bar-Plus")
		prices := h.policy.Resources["m2.7"].PriceMicros
		bar := h.limit(t, "Bar-Plus", "", "")
		body := `{"model":"MiniMax-M2.7",` + c.maximums + `,"messages":[]}`
		a := h.post(t, false, "/v1/chat/completions", "tp-mx", body)
		estimate := uint64(len(body))/4 + 1 + c.output
		want := fmt.Sprint(bar - prices["requests"] - estimate*prices["tokens"])
		if a.status != http.StatusOK || a.header.Get("x-ratelimit-remaining-usage") != want {
			t.Errorf("%s: %d %s: remaining %q, want %s", c.maximums, a.status, a.raw, a.header.Get("x-ratelimit-remaining-usage"), want)
		}
	}
}

// A speech or image call is in flight while the upstream makes it, as a chat call is: a key
// with as many calls in flight as its plan allows is answered 429 for it too, as the Python
// middleware answers it.
func TestSpeechAndImagesCountAmongTheCallsInFlight(t *testing.T) {
	h := start(t)
	h.user(t, "fl", "tp-fl", "Bar-Plus")
	for i := 0; i < 4; i++ { // Bar-Plus allows 4 at once
		quantities := []tally.Quantity{{Unit: tally.Requests, Amount: 1}, {Unit: tally.Tokens, Amount: 10}}
		decision, _, err := h.engine.Reserve(tally.Request{Key: "tp-fl", Resource: "m2.7", At: t0, Quantities: quantities}, time.Hour)
		if err != nil || !decision.Admitted {
			t.Fatal(decision, err)
		}
	}
	for path, body := range map[string]string{
		"/v1/audio/speech":       `{"model":"speech-2.8-hd","input":"hello"}`,
		"/v1/images/generations": `{"model":"image-01","n":1}`,
	} {
		a := h.post(t, false, path, "tp-fl", body)
		if a.status != http.StatusTooManyRequests || a.header.Get("Retry-After") != "1" {
			t.Fatalf("%s: %d %s", path, a.status, a.raw)
		}
		openAIError(t, a, "requests")
	}
	if h.upstream.hits.Load() != 0 {
		t.Fatal("the upstream was called")
	}
}

// A limit with nothing counted in its window is whole now: Anthropic's reset header says so as
// a time (RFC 3339, as Anthropic's clients parse it), on a denial too, as the Python middleware
// says it.
func TestAnAnthropicResetIsATimeWhenNothingIsCounted(t *testing.T) {
	h := start(t)
	h.user(t, "rz", "tp-rz", "Bar-Plus")
	body := `{"model":"MiniMax-M2.7","max_tokens":5000000,"messages":[]}`
	a := h.post(t, true, "/v1/messages", "tp-rz", body)
	if a.status != http.StatusBadRequest || a.header.Get("anthropic-ratelimit-usage-reset") != "2030-03-17T17:46:40Z" {
		t.Fatalf("%d %s: reset %q", a.status, a.raw, a.header.Get("anthropic-ratelimit-usage-reset"))
	}
}

// An Anthropic stream reports its output tokens in message_delta, at its end; message_start's
// usage (the input, 1 output token) is not the call's. A stream that ends without it (broken
// off, or a client that read the text and left before message_delta) is charged its estimate,
// not its input and 1 token, in both gateways (the Python middleware's test of the same name).
func TestAStreamEndedBeforeItsFinalUsageIsChargedItsEstimate(t *testing.T) {
	cut := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprint(w, "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n")
		fmt.Fprint(w, "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"the whole answer\"}}\n\n")
	}))
	t.Cleanup(cut.Close)
	h := startWith(t, func(config *gateway.Config) { config.Upstream, _ = url.Parse(cut.URL) })
	h.user(t, "cu", "tp-cu", "Bar-Plus")
	prices := h.policy.Resources["m2.7"].PriceMicros
	body := `{"model":"MiniMax-M2.7","max_tokens":100,"stream":true,"messages":[]}`
	if a := h.post(t, true, "/v1/messages", "tp-cu", body); a.status != http.StatusOK {
		t.Fatalf("%d %s", a.status, a.raw)
	}
	usage, err := h.engine.Usage("tp-cu", t0.Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	estimate := uint64(len(body))/4 + 1 + 100
	want := prices["requests"] + estimate*prices["tokens"]
	if usage.Limits[0].Used != want || usage.OpenReservations != 0 {
		t.Fatalf("the bar shows %d (want %d), %d open reservations", usage.Limits[0].Used, want, usage.OpenReservations)
	}
}

// A malformed request's OpenAI error has a null code, as OpenAI's API and the Python middleware
// answer (the code names a known condition: invalid_api_key, model_not_found, ...).
func TestAMalformedRequestsOpenAIErrorHasANullCode(t *testing.T) {
	h := start(t)
	h.user(t, "nc", "tp-nc", "Plus")
	for path, body := range map[string]string{
		"/v1/chat/completions":   `{not json`,
		"/v1/audio/speech":       `{"model":"speech-2.8-hd","input":""}`,
		"/v1/images/generations": `{"model":"image-01","n":0}`,
	} {
		a := h.post(t, false, path, "tp-nc", body)
		inner, _ := a.body["error"].(map[string]interface{})
		code, present := inner["code"]
		if a.status != http.StatusBadRequest || !present || code != nil || inner["type"] != "invalid_request_error" {
			t.Fatalf("%s: %d %s", path, a.status, a.raw)
		}
	}
}

// A media type is case-insensitive: "Text/Event-Stream; charset=utf-8" is a stream of events,
// whose usage is settled, as the Python middleware reads it (not the estimate).
func TestAnEventStreamIsKnownInAnyCase(t *testing.T) {
	h := start(t)
	h.user(t, "ca", "tp-ca", "Bar-Plus")
	streamType := "Text/Event-Stream; charset=utf-8"
	h.upstream.streamType.Store(&streamType)
	prices := h.policy.Resources["m2.7"].PriceMicros
	if a := h.call(t, false, "tp-ca", "MiniMax-M2.7", true); a.status != http.StatusOK {
		t.Fatalf("%d %s", a.status, a.raw)
	}
	usage, err := h.engine.Usage("tp-ca", t0.Add(time.Minute))
	if want := prices["requests"] + 30*prices["tokens"]; err != nil || usage.Limits[0].Used != want {
		t.Fatalf("charged %+v (want %d) %v", usage.Limits, want, err)
	}
}

// lockedBuffer is a log the gateway writes while a test reads it.
type lockedBuffer struct {
	mutex sync.Mutex
	text  strings.Builder
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mutex.Lock()
	defer b.mutex.Unlock()
	return b.text.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mutex.Lock()
	defer b.mutex.Unlock()
	return b.text.String()
}

// startOutlivingTheLease is start with an upstream that answers only after the gateway's lease
// (its default, 30 minutes) has ended, as a long stream does; the gateway logs to the buffer.
func startOutlivingTheLease(t *testing.T) (*harness, *lockedBuffer, func() time.Time) {
	t.Helper()
	engine, err := tally.OpenInMemory(unbounded)
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{engine: engine, upstream: &fakeUpstream{}}
	var tick atomic.Int64
	now := func() time.Time { return t0.Add(time.Duration(tick.Add(1)) * time.Millisecond) }
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tick.Add((31 * time.Minute).Milliseconds())
		h.upstream.ServeHTTP(w, r)
	}))
	upstreamURL, _ := url.Parse(upstream.URL)
	logged := &lockedBuffer{}
	g, err := gateway.New(gateway.Config{Engine: engine, Upstream: upstreamURL, UpstreamKey: upstreamKey,
		Clock: now, Logger: log.New(logged, "", 0)})
	if err != nil {
		t.Fatal(err)
	}
	h.gateway = httptest.NewServer(g)
	t.Cleanup(func() {
		h.gateway.Close()
		upstream.Close()
		if err := engine.Close(); err != nil {
			t.Error(err)
		}
	})
	return h, logged, now
}

// A response that outlives its reservation's lease (a long stream) finds the reservation
// expired at its settle, its hold given back: its usage is then recorded as a usage
// correction at the reservation's time, once, and logged, as in the Python middleware.
func TestAResponseThatOutlivesItsLeaseIsStillChargedWhatItUsed(t *testing.T) {
	for _, test := range []struct {
		anthropic, stream bool
	}{{false, false}, {false, true}, {true, false}, {true, true}} {
		t.Run(fmt.Sprintf("anthropic=%t,stream=%t", test.anthropic, test.stream), func(t *testing.T) {
			h, logged, now := startOutlivingTheLease(t)
			h.user(t, "lu", "tp-lu", "Bar-Plus")
			if a := h.call(t, test.anthropic, "tp-lu", "MiniMax-M2.7", test.stream); a.status != http.StatusOK {
				t.Fatalf("%d %s", a.status, a.raw)
			}
			usage, err := h.engine.Usage("tp-lu", now())
			if err != nil || usage.OpenReservations != 0 {
				t.Fatalf("%+v %v", usage, err)
			}
			// 1 request at 2,000 micros and 30 tokens at 1 on both bars: what the call used,
			// not the estimate, and not twice.
			for _, limit := range usage.Limits {
				if limit.Used != 2_030 {
					t.Errorf("%s: %d used, want 2030", limit.Name, limit.Used)
				}
			}
			if !strings.Contains(logged.String(), "outlived its lease") {
				t.Errorf("not logged: %q", logged.String())
			}
		})
	}
}

// An image call is reserved and settled too (what it held): one that outlives its lease is
// charged by a usage correction like a chat call. (The Python middleware consumes images at
// once, without a lease to outlive.)
func TestAnImageCallThatOutlivesItsLeaseIsStillCharged(t *testing.T) {
	h, logged, now := startOutlivingTheLease(t)
	h.user(t, "im", "tp-im", "Plus")
	if a := h.post(t, false, "/v1/images/generations", "tp-im", `{"model":"image-01","n":2}`); a.status != http.StatusOK {
		t.Fatalf("%d %s", a.status, a.raw)
	}
	usage, err := h.engine.Usage("tp-im", now())
	if err != nil || usage.OpenReservations != 0 {
		t.Fatalf("%+v %v", usage, err)
	}
	charged := ""
	for _, limit := range usage.Limits {
		if strings.HasPrefix(limit.Name, "image-01:") {
			charged += fmt.Sprint(limit.Used)
		}
	}
	if charged != "2" {
		t.Errorf("image-01 used %q, want 2: %+v", charged, usage.Limits)
	}
	if !strings.Contains(logged.String(), "outlived its lease") {
		t.Errorf("not logged: %q", logged.String())
	}
}

// A usage correction counts plan quota only: credits an expired reservation held cannot be
// charged after it, and the gateway logs the usage as not recorded rather than drop it
// silently, as the Python middleware does.
func TestALateSettleOnCreditsIsLoggedAsNotRecorded(t *testing.T) {
	h, logged, _ := startOutlivingTheLease(t)
	h.user(t, "cr", "tp-cr", "")
	if _, err := h.engine.TopUp("@cr", 1_000_000, t0); err != nil {
		t.Fatal(err)
	}
	if a := h.call(t, false, "tp-cr", "MiniMax-M2.7", false); a.status != http.StatusOK {
		t.Fatalf("%d %s", a.status, a.raw)
	}
	if credits, err := h.engine.Credits("@cr"); err != nil || credits != 1_000_000 {
		t.Fatalf("%d %v", credits, err)
	}
	if !strings.Contains(logged.String(), "not recorded") {
		t.Errorf("not logged: %q", logged.String())
	}
}

// A lease the engine would refuse fails New, not every reserved request with a 503.
func TestALeaseTheEngineWouldRefuseFailsNew(t *testing.T) {
	engine, err := tally.OpenInMemory()
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	upstream, _ := url.Parse("http://127.0.0.1:1")
	for _, lease := range []time.Duration{24*time.Hour + time.Millisecond, 1500 * time.Microsecond} {
		if _, err := gateway.New(gateway.Config{Engine: engine, Upstream: upstream, Lease: lease}); err == nil ||
			!strings.Contains(err.Error(), "Lease") {
			t.Errorf("lease %v: %v", lease, err)
		}
	}
	if _, err := gateway.New(gateway.Config{Engine: engine, Upstream: upstream, Lease: 24 * time.Hour}); err != nil {
		t.Errorf("a lease of a day: %v", err)
	}
}

// x-tally-* say where the gateway charged the call: an upstream's own would pass for the
// gateway's where the decision sets none (a pay-as-you-go key has no plan, a denial no charge),
// so every one the upstream sent is dropped, on a metered answer and a pass-through one alike,
// as the Python middleware drops them.
func TestNoXTallyHeaderOfTheUpstreamsReachesTheClient(t *testing.T) {
	forging := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Tally-Plan", "Max")
		w.Header().Set("x-tally-limit", "forged")
		w.Header().Set("x-tally-charged-to", "nothing")
		w.Header().Set("x-tally-note", "upstream")
		w.Header().Set("x-request-id", "req-1")
		fmt.Fprint(w, `{}`)
	}))
	t.Cleanup(forging.Close)
	h := startWith(t, func(config *gateway.Config) { config.Upstream, _ = url.Parse(forging.URL) })
	h.user(t, "sp", "tp-sp", "")
	if err := h.engine.CreatePaygKey("sp", "pg-sp", t0); err != nil {
		t.Fatal(err)
	}
	tallyHeaders := func(a answer) map[string][]string {
		found := map[string][]string{}
		for name, values := range a.header {
			if strings.HasPrefix(strings.ToLower(name), "x-tally-") {
				found[strings.ToLower(name)] = values
			}
		}
		return found
	}
	metered := h.post(t, false, "/v1/chat/completions", "pg-sp", `{"model":"MiniMax-M2.7","max_tokens":16,"messages":[]}`)
	if metered.status != http.StatusOK || metered.header.Get("x-request-id") != "req-1" {
		t.Fatalf("%d %v %s", metered.status, metered.header, metered.raw)
	}
	if found := tallyHeaders(metered); len(found) != 1 || metered.header.Get("x-tally-charged-to") != "pay_as_you_go" ||
		len(found["x-tally-charged-to"]) != 1 {
		t.Fatalf("metered: %v", found)
	}
	passed := h.send(t, http.MethodGet, "/v1/models", "pg-sp", false, "", nil)
	if passed.status != http.StatusOK || passed.header.Get("x-request-id") != "req-1" {
		t.Fatalf("%d %v %s", passed.status, passed.header, passed.raw)
	}
	if found := tallyHeaders(passed); len(found) != 0 {
		t.Fatalf("passed through: %v", found)
	}
}

// A gzip answer cut short (its trailer missing, or its deflate stream broken off) that the
// upstream sent whole, 200, was served upstream: the client gets what it decodes to, as the
// Python middleware passes on what arrived (not a 502 for the read that failed), the answer
// ending in an error it can see, and the call is charged the usage that arrived, or its
// estimate when the usage went with the rest.
func TestATruncatedGzipAnswerIsPassedOnAndChargedWhatArrived(t *testing.T) {
	answer := []byte(`{"object":"chat.completion","choices":[{"message":{"content":"` + strings.Repeat("hi ", 200) +
		`"}}],"usage":{"prompt_tokens":12,"completion_tokens":18,"total_tokens":30}}`)
	var compressed bytes.Buffer
	writer := gzip.NewWriter(&compressed)
	_, _ = writer.Write(answer)
	_ = writer.Close()
	whole := compressed.Bytes()
	for _, c := range []struct {
		name   string
		sent   []byte
		usage  bool // whether the usage arrived
		prefix int  // the answer's bytes the client must get, at least
	}{
		{"no trailer", whole[:len(whole)-8], true, len(answer)},
		{"half the stream", whole[:len(whole)/2], false, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			cut := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				_, _ = io.Copy(io.Discard, r.Body)
				w.Header().Set("Content-Type", "application/json")
				w.Header().Set("Content-Encoding", "gzip")
				w.Header().Set("Content-Length", strconv.Itoa(len(c.sent)))
				_, _ = w.Write(c.sent)
			}))
			t.Cleanup(cut.Close)
			h := startWith(t, func(config *gateway.Config) { config.Upstream, _ = url.Parse(cut.URL) })
			h.user(t, "tg", "tp-tg", "Bar-Plus")
			body := `{"model":"MiniMax-M2.7","max_tokens":100,"messages":[]}`
			status, got, readErr := h.postRaw(t, "/v1/chat/completions", "tp-tg", body)
			if status != http.StatusOK || len(got) < c.prefix || !bytes.HasPrefix(answer, []byte(got)) {
				t.Fatalf("%d, %d bytes %q (want at least %d of the answer)", status, len(got), got, c.prefix)
			}
			if readErr == nil {
				t.Fatalf("the answer cut short ended as if whole: %q", got)
			}
			prices := h.policy.Resources["m2.7"].PriceMicros
			tokens := uint64(len(body))/4 + 1 + 100
			if c.usage {
				tokens = 30
			}
			want := prices["requests"] + tokens*prices["tokens"]
			usage, err := h.engine.Usage("tp-tg", t0.Add(time.Minute))
			if err != nil {
				t.Fatal(err)
			}
			if usage.Limits[0].Used != want || usage.OpenReservations != 0 {
				t.Fatalf("the bar shows %d (want %d), %d open reservations", usage.Limits[0].Used, want, usage.OpenReservations)
			}
		})
	}
}

// postRaw posts body to path with a Bearer key and reads the answer as far as it goes: its
// status, its body, and the error that ended it early (nil for a whole answer).
func (h *harness) postRaw(t *testing.T, path, key, body string) (int, string, error) {
	t.Helper()
	request, err := http.NewRequest(http.MethodPost, h.gateway.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	request.Header.Set("Content-Type", "application/json")
	request.Header.Set("Authorization", "Bearer "+key)
	response, err := http.DefaultClient.Do(request)
	if err != nil {
		t.Fatal(err)
	}
	defer response.Body.Close()
	got, readErr := io.ReadAll(response.Body)
	return response.StatusCode, string(got), readErr
}
