// Package gateway is a quota-enforcing reverse proxy in front of an OpenAI- or
// Anthropic-compatible upstream, as coding tools (Claude Code, Cursor, Cline) call them.
//
// For each metered call it takes the key from "Authorization: Bearer" or "x-api-key", the
// resource from the route and the body's "model" (DefaultModels), and reserves on a tally
// engine one request plus, on chat, completions, responses, embeddings and messages, an
// estimate of the tokens (the prompt's, a token per 4 bytes of body, and the most the model may
// write times "n", or a legacy completion's "best_of" if more; an embedding writes nothing, so
// only its input is held); on speech the characters of "input"; on images "n"; of these,
// only the units the model's resource meters (a model metered by calls alone holds one request;
// none of them: 400), read from the engine's policy, and read again after Engine.SwapPolicy
// (Engine.PolicyVersion). Admitted calls
// are proxied; the upstream's reported token usage settles the reservation (speech and images:
// what was held), and an upstream error voids it. An answer the upstream began and broke off
// (the connection, or a gzip body cut short, which the transport decodes) is passed on as far
// as it arrived, then ended short, not replaced by a 502, and charged the usage that arrived or
// else its estimate, as the Python middleware charges it. A response that outlives the reservation's
// Lease (the engine has no way to extend one) finds it expired (ErrReservationExpired), its
// hold given back: its usage is then added as a usage correction (AdjustUsage, AdjustAdd) at
// the reservation's time, once, and logged; a hold on credits or pay-as-you-go, which a
// correction cannot charge, is logged as not recorded. The routes, the models and the counting are
// the Python middleware's (tally.asgi) defaults. Admitted calls' responses carry the same
// x-ratelimit-* (and on /v1/messages anthropic-ratelimit-*) headers in place of the
// upstream's own, which are the operator's account limits, not the caller's, and the
// x-tally-* the decision has (setRateLimitHeaders); every x-tally-* header the upstream sent
// is dropped from every answer, so none passes for the gateway's. Denied calls are answered
// 429 with Retry-After and x-ratelimit-* headers and an error body in the proxied API's
// shape whose message says which quota ran out and when it resets (OpenAI's "type" is the
// limit's unit: "requests", "tokens", ...). A denial waiting cannot help is no 429 to retry:
// larger than the whole limit, 400; no seat, a plan that does not cover the model, credits
// short: 429 insufficient_quota on OpenAI's routes (the API's own answer), 403
// permission_error on Anthropic's. A call without a key, with an unknown one, with one no key
// can be (longer than tally.MaxIDBytes, not UTF-8) or with two different keys in the two
// headers is answered 401, on every route, whatever the request's body. A model the policy has
// no resource for is answered 404 (model_not_found; Anthropic's not_found_error).
//
// Only the metered routes and the routes that pass through reach the upstream. A route passes
// through, unmetered and for a key the engine knows, when Config.PassThrough lists it; by
// default (DefaultPassThrough) GET /v1/models, GET /v1/models/{id} and POST
// /v1/messages/count_tokens, which cost nothing and show nothing of other users. Their answers
// lose the upstream's rate-limit headers too. Every other route (another path, or a metered
// path with a method other than POST) is refused before the upstream with 403, naming the
// route, in the API's shape (OpenAI's invalid_request_error, code route_not_served;
// Anthropic's permission_error), a websocket's upgrade too: proxied, it would spend the
// operator's account uncounted (message batches, Anthropic's legacy /v1/complete, OpenAI's
// batches and files, transcriptions, image edits, moderations, fine-tuning, assistants' runs,
// realtime) or show other users' data (files, batches). An unknown key is 401 there as
// everywhere, before the route is looked at. The Python middleware (tally.asgi) answers
// alike.
//
// With Config.HealthPath set, a GET or HEAD on that path needs no key and is answered by the
// gateway itself, never by the upstream, with the engine's health for a load balancer: 200
// while Engine.Health reports nothing, 503 naming each failure it reports or saying that the
// engine is closed (another method: 405), as the Python middleware's health_path answers.
package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"math"
	"net/http"
	"net/http/httputil"
	"net/url"
	"path"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	tally "github.com/tally-engine/tally/ffi/go"
)

// Config configures a Gateway. Engine and Upstream are required.
type Config struct {
	Engine   *tally.Engine
	Upstream *url.URL
	// UpstreamKey, if set, replaces the caller's key towards the upstream (Bearer for OpenAI
	// routes, x-api-key for Anthropic ones), so tally keys never leave the gateway.
	UpstreamKey string
	// Resource maps a request's model to a tally resource; nil: DefaultResource.
	Resource func(model string) string
	// EstimateTokens is the output tokens reserved when the body gives no max_tokens. 0 (the
	// zero value) is the default, 4096, never 0: there is no holding none of what the model
	// writes (the command's -estimate-tokens 0 and the Python middleware's
	// default_max_tokens=0 are refused). Less than tally.MaxQuantity, else New fails: the
	// estimate adds the prompt's tokens (at least one), and one past the largest quantity fails
	// every call.
	EstimateTokens uint64
	// Lease bounds a reservation whose response never finishes (default 30 minutes, at most a
	// day in whole milliseconds, else New fails, as the Python middleware's lease_ms). The engine cannot extend a lease: a response
	// that outlives it is charged by a usage correction at the reservation's time instead
	// (plan quota only; credits and pay-as-you-go holds are logged as not recorded), and its
	// hold was free for other calls meanwhile. Set it above the longest stream served.
	Lease time.Duration
	// Clock gives the time of each call; nil: the engine's clock.
	Clock func() time.Time
	// MaxBodyBytes bounds a request body (default 32 MiB).
	MaxBodyBytes int64
	Logger       *log.Logger
	// PassThrough lists the routes proxied unmetered, for a key the engine knows, as
	// "METHOD /path" entries: the method in upper case, the path clean, a segment "*" standing
	// for any one segment ("GET /v1/models/*"). A call matches by its method and its path
	// cleaned (no doubled or trailing slash, no dot segment), and is passed on with that path.
	// nil: DefaultPassThrough; a list replaces it (append to DefaultPassThrough to add to it;
	// empty, nothing passes through). An entry that is no such route, or that matches a
	// metered route (POST /v1/messages, POST /v1/*), fails New. List only routes that cost
	// nothing upstream and show nothing of other users: a route neither metered nor listed is
	// refused with 403 before the upstream (a websocket's upgrade too: list "GET /path").
	PassThrough []string
	// HealthPath, if set, is a path the gateway answers itself, for a load balancer or an
	// orchestrator: a GET or HEAD on it (its path cleaned as a route's is, whatever its query)
	// needs no key and never reaches the upstream. It is 200 with
	// {"healthy":true,"failures":[],"error":null} while the engine's Health reports nothing,
	// and 503 otherwise: "failures" names each it reports ("log_failure",
	// "checkpoint_failure", "compaction_failure"), "error" says when the engine is closed or
	// its health could not be read. The failures' detail (a path, an OS error) goes to the
	// Logger each time it changes, not to a caller who needs no key. Another method is 405
	// with "Allow: GET, HEAD"; every answer has "Cache-Control: no-store". The path must start
	// with / and be clean, as a PassThrough entry's (no doubled or trailing slash, no dot
	// segment, no "?", "#" or "%"), and be neither a metered route's path nor one a
	// PassThrough entry matches with any method, which it would hide; else New fails. ""
	// (the default): no health path, so no route is answered without a key. The 200 and 503
	// answers are the Python middleware's (health_path), byte for byte; a 405 has the same
	// fields as the middleware's, not the same bytes, as every refusal of the two.
	HealthPath string
}

// DefaultModels are model names as clients send them -> resources of the shipped Token Plan
// policy, the Python middleware's DEFAULT_MODELS. A model that is itself the name of a
// resource needs no entry.
var DefaultModels = map[string]string{
	"MiniMax-M2.7":           "m2.7",
	"MiniMax-M2.7-highspeed": "m2.7-highspeed",
	"speech-2.8-hd":          "speech-2.8",
	"speech-2.8-turbo":       "speech-2.8",
}

// DefaultResource maps a model to a resource of the default policy by DefaultModels (a model
// not there is taken as a resource's name), as the Python middleware maps it: "MiniMax-M2.7"
// -> "m2.7", "speech-2.8-hd" -> "speech-2.8", "m2.7" -> "m2.7".
func DefaultResource(model string) string {
	if resource, ok := DefaultModels[model]; ok {
		return resource
	}
	return model
}

// Gateway is the http.Handler.
type Gateway struct {
	config      Config
	passThrough []passRoute
	proxy       *httputil.ReverseProxy
	health      healthLog
	units       atomic.Pointer[policyUnits] // read on the first metered call, and after a swap
}

// policyUnits is what the gateway read of the engine's policy: the units each resource meters,
// at the engine's PolicyVersion it was read at.
type policyUnits struct {
	version uint64
	units   map[string]map[string]bool // resource -> the names of its units ("requests")
}

// resourceUnits is the units the policy's resource meters (known is false for a resource the
// policy does not have), read from the engine's policy again once a swap changed it
// (tally.Engine.PolicyVersion), as the Python middleware reads them.
func (g *Gateway) resourceUnits(resource string) (units map[string]bool, known bool, err error) {
	// The version before the document: a swap in between only makes the next call read again.
	version := g.config.Engine.PolicyVersion()
	read := g.units.Load()
	if read == nil || read.version != version {
		if read, err = readPolicyUnits(g.config.Engine, version); err != nil {
			return nil, false, err
		}
		g.units.Store(read)
	}
	units, known = read.units[resource]
	return units, known, nil
}

// readPolicyUnits reads each resource's units from the engine's policy (PolicyJSON).
func readPolicyUnits(engine *tally.Engine, version uint64) (*policyUnits, error) {
	document, err := engine.PolicyJSON()
	if err != nil {
		return nil, err
	}
	var policy struct {
		Resources map[string]struct {
			Units []string `json:"units"`
		} `json:"resources"`
	}
	if err := json.Unmarshal([]byte(document), &policy); err != nil {
		return nil, fmt.Errorf("the engine's policy document: %w", err)
	}
	read := &policyUnits{version: version, units: make(map[string]map[string]bool, len(policy.Resources))}
	for name, resource := range policy.Resources {
		units := make(map[string]bool, len(resource.Units))
		for _, unit := range resource.Units {
			units[unit] = true
		}
		read.units[name] = units
	}
	return read, nil
}

// New builds a Gateway.
func New(config Config) (*Gateway, error) {
	if config.Engine == nil || config.Upstream == nil {
		return nil, errors.New("gateway: Engine and Upstream are required")
	}
	if config.Resource == nil {
		config.Resource = DefaultResource
	}
	if config.EstimateTokens == 0 {
		config.EstimateTokens = 4096
	}
	// Checked here, as the lease is: refused by the engine, it would fail every call that names
	// no maximum (400).
	if config.EstimateTokens >= tally.MaxQuantity {
		return nil, fmt.Errorf("gateway: EstimateTokens %d: want less than %d, the engine's largest quantity, which the prompt's tokens are added to",
			config.EstimateTokens, uint64(tally.MaxQuantity))
	}
	if config.PassThrough == nil {
		config.PassThrough = DefaultPassThrough
	}
	passThrough, err := parsePassThrough(config.PassThrough)
	if err != nil {
		return nil, err
	}
	if config.HealthPath != "" {
		if err := checkHealthPath(config.HealthPath, passThrough); err != nil {
			return nil, err
		}
	}
	if config.Lease <= 0 {
		config.Lease = 30 * time.Minute
	}
	// Checked here, so a lease the engine would refuse fails the start, not every reserved
	// request (with a 503).
	if config.Lease > 24*time.Hour || config.Lease%time.Millisecond != 0 {
		return nil, fmt.Errorf("gateway: Lease %v: whole milliseconds, at most a day", config.Lease)
	}
	if config.MaxBodyBytes <= 0 {
		config.MaxBodyBytes = 32 << 20
	}
	if config.Logger == nil {
		config.Logger = log.Default()
	}
	g := &Gateway{config: config, passThrough: passThrough}
	g.proxy = &httputil.ReverseProxy{
		Director:       g.direct,
		ModifyResponse: g.modifyResponse,
		ErrorHandler:   g.upstreamError,
		FlushInterval:  -1,            // stream server-sent events as they come
		ErrorLog:       config.Logger, // an answer broken off while passed on, say
	}
	return g, nil
}

// now is the time to pass the engine: the zero time (the engine's clock) without a Clock.
func (g *Gateway) now() time.Time {
	if g.config.Clock == nil {
		return time.Time{}
	}
	return g.config.Clock()
}

// wallNow is the time for headers and messages.
func (g *Gateway) wallNow() time.Time {
	if g.config.Clock == nil {
		return time.Now()
	}
	return g.config.Clock()
}

// call is one metered request in flight: its reservation and what to settle.
type call struct {
	gateway     *Gateway
	api         API
	key         string
	resource    string
	reservation tally.ReservationID
	estimate    uint64
	fixed       []tally.Quantity // what a call not counted in tokens is charged (nil for tokens)
	requests    bool             // a token call's hold counts the call: its resource meters requests
	decision    tally.Decision
	mutex       sync.Mutex
	done        bool // settled or voided
}

type callKey struct{}

// ServeHTTP meters the metered routes, proxies the routes that pass through for known keys, and
// refuses every other route.
func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// "/v1/chat/completions/" and "//v1/chat/completions" are the metered route too (an
	// upstream may serve them): metered, and passed on, as the route they clean to; so is a
	// route that passes through. The method is read in upper case, as the Python middleware
	// reads it.
	path, method := routePath(r.URL.Path), strings.ToUpper(r.Method)
	api := apiOf(path)
	if g.config.HealthPath != "" && path == g.config.HealthPath {
		g.serveHealth(w, api, method, path) // before the key: a probe has none
		return
	}
	key, conflict := keyOf(r)
	if conflict {
		unauthorized(api, "the call carries two different API keys (Authorization: Bearer and x-api-key): send one").write(w, api)
		return
	}
	if key == "" {
		unauthorized(api, "missing API key: send Authorization: Bearer <key> or x-api-key").write(w, api)
		return
	}
	if !couldBeKey(key) {
		unauthorized(api, "invalid API key").write(w, api)
		return
	}
	route, metered := meteredRoutes[path]
	if !metered || method != http.MethodPost {
		g.proxyUnmetered(w, r, api, key, method, path)
		return
	}
	r.URL.Path, r.URL.RawPath = path, ""
	body, request, failure := g.readRequest(w, r, api, key, route.metering)
	if failure != nil {
		// The credential is judged before the request: a key the engine does not know, or
		// revoked, is 401 whatever its body (as the Python middleware answers), and learns
		// nothing of the routes' models or bounds. Looked up only here, off the path of a
		// well-formed request, whose reservation judges its key.
		if failure.status == http.StatusUnauthorized || !g.keyRefused(w, api, key) {
			failure.write(w, api)
		}
		return
	}
	c := &call{gateway: g, api: api, key: key, resource: request.Resource}
	if estimate, ok := amountOf(request.Quantities, tally.Tokens); ok && route.metering.tokens() {
		c.estimate = estimate
		_, c.requests = amountOf(request.Quantities, tally.Requests)
	} else {
		// Speech, images, and a token call on a model that meters no tokens: charged what
		// was held, whatever the answer reports.
		c.fixed = request.Quantities
	}
	decision, reservation, err := g.config.Engine.Reserve(request, g.config.Lease)
	if err != nil {
		// The engine judges the model before the key: a model not served (404) is answered
		// only to a key that may call, as above.
		if status := engineError(api, err).status; status == http.StatusUnauthorized ||
			status >= http.StatusInternalServerError || !g.keyRefused(w, api, key) {
			g.answerEngineError(w, api, err)
		}
		return
	}
	c.decision, c.reservation = decision, reservation
	if !decision.Admitted {
		setRateLimitHeaders(w.Header(), api, decision, g.wallNow())
		denied(w, api, request.Resource, decision)
		return
	}
	// An admitted call's headers go on the upstream's response (modifyResponse): set here as
	// well, the proxy added the response's to them and every header came twice.
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	g.proxy.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), callKey{}, c)))
}

// amountOf is the amount of unit among quantities, if they hold it.
func amountOf(quantities []tally.Quantity, unit tally.Unit) (uint64, bool) {
	for _, quantity := range quantities {
		if quantity.Unit == unit {
			return quantity.Amount, true
		}
	}
	return 0, false
}

// couldBeKey says whether the engine could hold key: not longer than tally.MaxIDBytes, UTF-8
// and without a control character (NUL, or a tab or U+0085, which a header carries inside a
// value; the engine's rule is Rust's char::is_control, the same set as unicode.IsControl). One
// it could not is not a valid credential, as an unknown key is not, and is answered the same
// (401) rather than as a malformed request (the engine's ErrStringTooLong, ErrInvalidUTF8,
// ErrNulInString, which the model name can still earn: 400) or as the engine failing (its
// ErrInvalidArgument naming key, which engineError answers 401 too).
func couldBeKey(key string) bool {
	return len(key) <= tally.MaxIDBytes && utf8.ValidString(key) &&
		strings.IndexFunc(key, unicode.IsControl) < 0
}

// readRequest reads (and bounds) the body, finds the model and builds what the call holds:
// for tokens one request and the tokens it may use; for speech the characters of "input"; for
// images "n" (default 1); each with one request, as the Python middleware counts them.
func (g *Gateway) readRequest(w http.ResponseWriter, r *http.Request, api API, key string, metering metering) ([]byte, tally.Request, *apiError) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, g.config.MaxBodyBytes))
	if err != nil {
		// Only a body past MaxBodyBytes is too large; one that broke off (a client gone, a
		// malformed chunked encoding, a read timeout) is a bad request.
		failure := invalidRequest(api, "", "request body: could not be read: "+err.Error())
		var tooLong *http.MaxBytesError
		if errors.As(err, &tooLong) {
			failure = tooLarge(api, "request body: "+err.Error())
		}
		return nil, tally.Request{}, &failure
	}
	var fields struct {
		Model               string          `json:"model"`
		MaxTokens           json.RawMessage `json:"max_tokens"`
		MaxCompletionTokens json.RawMessage `json:"max_completion_tokens"`
		MaxOutputTokens     json.RawMessage `json:"max_output_tokens"`
		Input               json.RawMessage `json:"input"`
		N                   json.RawMessage `json:"n"`
		BestOf              json.RawMessage `json:"best_of"`
	}
	if nestedDeeperThan(body, maxJSONNesting) {
		failure := invalidRequest(api, "", fmt.Sprintf("the body is nested deeper than %d levels", maxJSONNesting))
		return nil, tally.Request{}, &failure
	}
	// Not UTF-8 is no JSON (RFC 8259), as the Python middleware reads it: encoding/json alone
	// reads such bytes as U+FFFD and goes on.
	if err := unmarshalExact(body, &fields); err != nil || fields.Model == "" || !utf8.Valid(body) {
		failure := invalidRequest(api, "", "the body must be a JSON object with a \"model\"")
		return nil, tally.Request{}, &failure
	}
	// The model is judged before the quantities, which are a model's (an image call's "n": 0
	// on a model not served is 404, not 400), as the Python middleware judges it.
	resource := g.config.Resource(fields.Model)
	units, known, err := g.resourceUnits(resource)
	if err != nil {
		g.config.Logger.Printf("tally-gateway: engine: %v", err)
		failure := engineError(api, err)
		return nil, tally.Request{}, &failure
	}
	if !known {
		failure := modelNotFound(api, fmt.Sprintf("the model %q does not exist or is not served here", fields.Model))
		return nil, tally.Request{}, &failure
	}
	var quantities []tally.Quantity
	var failure *apiError
	switch metering {
	case byCharacters:
		quantities, failure = characters(api, fields.Input)
	case byImages:
		quantities, failure = images(api, fields.N)
	case byInputTokens:
		quantities = inputTokens(len(body))
	default:
		quantities = g.tokens(len(body), completions(fields.N, fields.BestOf), fields.MaxTokens,
			fields.MaxCompletionTokens, fields.MaxOutputTokens)
	}
	if failure != nil {
		return nil, tally.Request{}, failure
	}
	// Only the units the resource meters are held (a model metered by calls alone holds no
	// tokens), as the Python middleware holds them; none of them: the route cannot meter it.
	counted := make([]tally.Quantity, 0, len(quantities))
	for _, quantity := range quantities {
		if units[quantity.Unit.String()] {
			counted = append(counted, quantity)
		}
	}
	if len(counted) == 0 {
		failure := invalidRequest(api, "", fmt.Sprintf("the model maps to %s, which this route cannot meter", resource))
		return nil, tally.Request{}, &failure
	}
	request := tally.Request{Key: key, Resource: resource, At: g.now(), Quantities: counted}
	return body, request, nil
}

// unmarshalExact decodes a JSON object into the struct fields, each by its exact JSON name, as
// the upstream (and the Python middleware) reads the body: encoding/json alone matches names
// case-insensitively, the last match winning, so a "Model" or "MAX_TOKENS" beside "model" and
// "max_tokens" would choose what is metered (a cheaper model than the one served, a smaller
// hold). A key of the object named otherwise is left alone.
func unmarshalExact(body []byte, fields interface{}) error {
	var object map[string]json.RawMessage
	if err := json.Unmarshal(body, &object); err != nil {
		return err
	}
	if object == nil {
		return errors.New("not a JSON object")
	}
	value := reflect.ValueOf(fields).Elem()
	for i := 0; i < value.NumField(); i++ {
		name, _, _ := strings.Cut(value.Type().Field(i).Tag.Get("json"), ",")
		raw, ok := object[name]
		if !ok {
			continue
		}
		if err := json.Unmarshal(raw, value.Field(i).Addr().Interface()); err != nil {
			return err
		}
	}
	return nil
}

// tokens is a token call's estimate: one request, about one token per 4 bytes of body, plus
// one, and the most the model may write: the first maximum the body names as a positive
// integer (max_tokens, then max_completion_tokens, then max_output_tokens), or EstimateTokens,
// times the completions the model writes (see completions); as the Python middleware
// estimates it. A maximum that is no positive integer (-1, "100", 100.0, true, null) is
// passed over: the upstream judges the body.
func (g *Gateway) tokens(bodyBytes int, choices uint64, maximums ...json.RawMessage) []tally.Quantity {
	estimate := g.config.EstimateTokens
	for _, raw := range maximums {
		if limit, ok := positiveInteger(raw); ok {
			estimate = limit
			break
		}
	}
	if choices > 1 {
		if estimate > math.MaxUint64/choices {
			estimate = math.MaxUint64
		} else {
			estimate *= choices
		}
	}
	// Saturating: a max_tokens near 2^64 must stay past the largest quantity (ErrBadQuantity),
	// not wrap to a small estimate.
	if prompt := uint64(bodyBytes)/4 + 1; estimate > math.MaxUint64-prompt {
		estimate = math.MaxUint64
	} else {
		estimate += prompt
	}
	return []tally.Quantity{{Unit: tally.Requests, Amount: 1}, {Unit: tally.Tokens, Amount: estimate}}
}

// completions is how many completions a token call has the model write: n (chat
// completions' choices), or a legacy completion's best_of, the candidates it writes and bills
// whatever n returns, whichever is more; 1 when neither is a positive integer (one that is
// not is passed over: the upstream judges the body).
func completions(n, bestOf json.RawMessage) uint64 {
	choices := uint64(1)
	for _, raw := range []json.RawMessage{n, bestOf} {
		if count, ok := positiveInteger(raw); ok && count > choices {
			choices = count
		}
	}
	return choices
}

// inputTokens is the estimate of a call that writes no output (an embedding): one request
// and the input's tokens, about one per 4 bytes of body, plus one.
func inputTokens(bodyBytes int) []tally.Quantity {
	return []tally.Quantity{{Unit: tally.Requests, Amount: 1}, {Unit: tally.Tokens, Amount: uint64(bodyBytes)/4 + 1}}
}

// positiveInteger reads a JSON integer above 0; one past 2^64 - 1 is 2^64 - 1, still past the
// largest quantity (ErrBadQuantity: 400), not wrapped to a small one.
func positiveInteger(raw json.RawMessage) (uint64, bool) {
	value, err := strconv.ParseUint(string(raw), 10, 64)
	if errors.Is(err, strconv.ErrRange) {
		return math.MaxUint64, true
	}
	return value, err == nil && value > 0
}

// characters counts speech: the characters (code points) of a non-empty "input".
func characters(api API, input json.RawMessage) ([]tally.Quantity, *apiError) {
	var text string
	if json.Unmarshal(input, &text) != nil || text == "" {
		failure := invalidRequest(api, "", "input must be a non-empty string")
		return nil, &failure
	}
	return []tally.Quantity{{Unit: tally.Characters, Amount: uint64(utf8.RuneCountInString(text))},
		{Unit: tally.Requests, Amount: 1}}, nil
}

// images counts an image call: "n", 1 to the largest quantity, default 1.
func images(api API, n json.RawMessage) ([]tally.Quantity, *apiError) {
	count := int64(1)
	if n != nil && string(n) != "null" {
		var err error
		if count, err = strconv.ParseInt(string(n), 10, 64); err != nil {
			count = 0
		}
	}
	if count < 1 || uint64(count) > tally.MaxQuantity {
		failure := invalidRequest(api, "", fmt.Sprintf("n must be a positive integer, at most %d", uint64(tally.MaxQuantity)))
		return nil, &failure
	}
	return []tally.Quantity{{Unit: tally.Images, Amount: uint64(count)}, {Unit: tally.Requests, Amount: 1}}, nil
}

// proxyUnmetered forwards a call on a route that passes through (PassThrough: a model list,
// token counting), for a key the engine knows, on the path it matched; it refuses any other
// route (403) without calling the upstream, which would serve it on the operator's account
// and charge nothing. The key is checked first, so an unknown key is 401 on every route and
// learns nothing about routes.
func (g *Gateway) proxyUnmetered(w http.ResponseWriter, r *http.Request, api API, key, method, path string) {
	if g.keyRefused(w, api, key) {
		return
	}
	for _, pass := range g.passThrough {
		if pass.matches(method, path) {
			r.URL.Path, r.URL.RawPath = path, ""
			g.proxy.ServeHTTP(w, r)
			return
		}
	}
	routeRefused(api, method, path).write(w, api)
}

// keyRefused answers a key the engine does not know or revoked (401), or an engine that
// cannot say (503), and reports whether it did; a key that may call is left unanswered.
func (g *Gateway) keyRefused(w http.ResponseWriter, api API, key string) bool {
	usage, err := g.config.Engine.Usage(key, g.now())
	if err != nil {
		g.answerEngineError(w, api, err)
		return true
	}
	if usage.Revoked {
		unauthorized(api, "This API key was revoked.").write(w, api)
		return true
	}
	return false
}

// direct points the request at the upstream and swaps in the upstream's key.
func (g *Gateway) direct(r *http.Request) {
	upstream := g.config.Upstream
	// The route's API, read before the upstream's own path (https://host/anthropic) is put in
	// front of it: no Anthropic route starts with that.
	api := apiOf(r.URL.Path)
	if _, metered := r.Context().Value(callKey{}).(*call); !metered && api == OpenAI &&
		r.Header.Get("Authorization") == "" && r.Header.Get("x-api-key") != "" {
		// A route both APIs serve (the model list) asked the Anthropic way: the key goes as
		// the client sent its own (an Anthropic upstream refuses a bearer key there).
		api = Anthropic
	}
	r.URL.Scheme, r.URL.Host = upstream.Scheme, upstream.Host
	r.URL.Path = strings.TrimSuffix(upstream.Path, "/") + r.URL.Path
	r.Host = upstream.Host
	if _, metered := r.Context().Value(callKey{}).(*call); metered {
		// The usage the settle reads is in the answer's body: without the client's
		// Accept-Encoding the transport asks for gzip itself and hands modifyResponse the
		// body decompressed (a compressed one would be charged at the estimate).
		r.Header.Del("Accept-Encoding")
	}
	if g.config.UpstreamKey == "" {
		return
	}
	r.Header.Del("Authorization")
	r.Header.Del("x-api-key")
	if api == Anthropic {
		r.Header.Set("x-api-key", g.config.UpstreamKey)
	} else {
		r.Header.Set("Authorization", "Bearer "+g.config.UpstreamKey)
	}
}

// engineError maps an engine error to an answer. A string the engine refuses is answered for
// the argument its message names: the key's 401 (couldBeKey catches those first), the
// resource's 404, any other 500 (as the Python middleware answers them); an engine that
// cannot decide 503. A model the policy has no resource for is
// 404 (model_not_found, not_found_error), as the upstream answers a model it does not have
// and as the Python middleware answers: the client can only pick another model, and a 404
// says so where a 400 would say the request is malformed. A model name no resource can have
// (too long, a NUL) is such a model too.
func engineError(api API, err error) apiError {
	stringError := errors.Is(err, tally.ErrEmptyString) || errors.Is(err, tally.ErrStringTooLong) ||
		errors.Is(err, tally.ErrNulInString) || errors.Is(err, tally.ErrInvalidUTF8)
	switch {
	case errors.Is(err, tally.ErrUnknownKey), stringError && fieldOf(err) == "key",
		errors.Is(err, tally.ErrInvalidArgument) && fieldOf(err) == "key":
		return unauthorized(api, "invalid API key")
	case errors.Is(err, tally.ErrUnknownResource), stringError && fieldOf(err) == "resource":
		return modelNotFound(api, "this model does not exist or is not served here: "+err.Error())
	case stringError:
		// Not the client's key nor its model: a string of the gateway's own, its fault.
		return internal(api, "the gateway failed ("+tally.StatusOf(err).String()+")")
	case errors.Is(err, tally.ErrBadQuantity):
		return invalidRequest(api, "", err.Error())
	case errors.Is(err, tally.ErrClosed):
		return unavailable(api, "the gateway is shutting down ("+tally.StatusOf(err).String()+")")
	default:
		// The quota service could not decide (storage, its log, a poisoned engine): 503, which a
		// client may retry later, as the Python middleware answers. The detail (a path, a disk
		// error) is the operator's to log (ServeHTTP does), not the caller's to read.
		return unavailable(api, "the quota service failed ("+tally.StatusOf(err).String()+")")
	}
}

// answerEngineError answers an engine error; one that is the gateway's (5xx) is logged with
// its detail, which stays out of the answer.
func (g *Gateway) answerEngineError(w http.ResponseWriter, api API, err error) {
	answer := engineError(api, err)
	if answer.status >= http.StatusInternalServerError {
		g.config.Logger.Printf("tally-gateway: engine: %v", err)
	}
	answer.write(w, api)
}

// fieldOf is the argument an engine error names: its message starts "resource: ..." or
// "key: ..." ("" if it names none).
func fieldOf(err error) string {
	var tallyError *tally.Error
	if !errors.As(err, &tallyError) {
		return ""
	}
	field, _, found := strings.Cut(tallyError.Message, ": ")
	if !found || strings.ContainsAny(field, " \t") {
		return ""
	}
	return field
}

// denied answers a denial: 429 with Retry-After when waiting helps, in the API's shape.
func denied(w http.ResponseWriter, api API, resource string, d tally.Decision) {
	message := denialMessage(resource, d)
	switch d.Denial {
	case tally.DenialUnknownKey:
		unauthorized(api, "invalid API key").write(w, api)
	case tally.DenialKeyRevoked:
		unauthorized(api, "This API key was revoked.").write(w, api)
	case tally.DenialQuotaExhausted:
		w.Header().Set("Retry-After", fmt.Sprint(ceilSeconds(d.RetryAfter)))
		rateLimited(api, deniedUnit(d), message).write(w, api)
	case tally.DenialTooManyReservations:
		w.Header().Set("Retry-After", "1")
		rateLimited(api, deniedUnit(d), message).write(w, api)
	case tally.DenialExceedsLimit, tally.DenialOverRequestMaximum:
		invalidRequest(api, "request_too_large", message).write(w, api)
	default: // no resources, not covered, insufficient credits: waiting does not help
		noResources(api, message).write(w, api)
	}
}

// deniedUnit is what the limit that denied counts, as its x-ratelimit-*-<unit> headers name
// it ("requests" when the denial names no limit).
func deniedUnit(d tally.Decision) string {
	if d.LimitIndex < 0 {
		return "requests"
	}
	return limitUnit(d.LimitName)
}

// credits writes micro-credits as credits with six decimals, exactly: 2500000001 is
// "2500.000001". The Python middleware writes the same.
func credits(micros uint64) string {
	return fmt.Sprintf("%d.%06d", micros/1_000_000, micros%1_000_000)
}

// denialMessage says which quota ran out and when it resets.
func denialMessage(resource string, d tally.Decision) string {
	plan := d.Plan
	if plan == "" {
		plan = "no plan"
	}
	var message string
	switch d.Denial {
	case tally.DenialQuotaExhausted:
		message = fmt.Sprintf("Quota exhausted: %s (%d of %d used) on plan %s. It resets at %s; retry after %d seconds.",
			d.LimitName, d.LimitUsed, d.LimitAmount, plan, d.RetryAt.UTC().Format(time.RFC3339), ceilSeconds(d.RetryAfter))
	case tally.DenialNoResources:
		message = "This key has no usable resources: it has no Token Plan seat and its team has no credits. Assign a seat or top up credits"
		if d.CreditsNeededMicros > 0 {
			message += " (at least " + credits(d.CreditsNeededMicros) + " for this request)"
		}
		message += "."
	case tally.DenialResourceNotCovered:
		if d.Plan == "" { // a key without a seat (its team's credits cannot pay), or pay-as-you-go
			message = fmt.Sprintf("This key has no plan that covers %s and the team's credits cannot pay for it.", resource)
		} else {
			message = fmt.Sprintf("Plan %s does not cover %s and the team's credits cannot pay for it.", plan, resource)
		}
	case tally.DenialInsufficientCredits:
		// Worded as the Python middleware words it, in credits (Requested is the price, in micros).
		message = fmt.Sprintf("The plan's quota for %s cannot take this request and the team's credits are short: it costs %s credits, the balance is %s.",
			resource, credits(d.Requested), credits(d.CreditsBalanceMicros))
		if d.CreditsNeededMicros > 0 {
			message += " Or top up at least " + credits(d.CreditsNeededMicros) + " credits to pay for it."
		}
	case tally.DenialTooManyReservations:
		if d.Plan == "" {
			message = fmt.Sprintf("Too many calls in flight for this key (%d of %d allowed at once).", d.Requested, d.Maximum)
		} else {
			message = fmt.Sprintf("Too many calls in flight for this key (%d of %d allowed by plan %s).", d.Requested, d.Maximum, plan)
		}
	case tally.DenialExceedsLimit:
		message = fmt.Sprintf("The request (%d) is larger than the limit %s itself (%d).", d.Requested, d.LimitName, d.Maximum)
	case tally.DenialOverRequestMaximum:
		message = fmt.Sprintf("The request asks for %d %s; at most %d per request.", d.Requested, d.Unit, d.Maximum)
	default:
		message = "Denied: " + d.Denial.String() + "."
	}
	if d.UpgradePlan != "" {
		message += " Plan " + d.UpgradePlan + " has room for it."
	}
	return message
}

// setRateLimitHeaders reports the limit the decision names (the tightest or the one that
// denied) as OpenAI's x-ratelimit-* headers, plus Anthropic's for /v1/messages, and says
// where the call was charged in x-tally-plan, x-tally-charged-to (admitted) and x-tally-limit,
// as the Python middleware does. The reset is when the limit is whole again (OpenAI: "resets
// to its initial state"; Anthropic: "fully replenished"); when a denied call would fit is
// Retry-After's to say.
func setRateLimitHeaders(h http.Header, api API, d tally.Decision, now time.Time) {
	if d.Plan != "" {
		h.Set("x-tally-plan", d.Plan)
	}
	if d.Admitted {
		h.Set("x-tally-charged-to", d.ChargedTo.String())
	}
	if d.LimitIndex < 0 {
		return
	}
	reset := time.Duration(0)
	if !d.ResetAt.IsZero() && d.ResetAt.After(now) {
		reset = time.Duration(ceilSeconds(d.ResetAt.Sub(now))) * time.Second
	}
	unit := limitUnit(d.LimitName)
	h.Set("x-tally-limit", d.LimitName)
	h.Set("x-ratelimit-limit-"+unit, fmt.Sprint(d.LimitAmount))
	h.Set("x-ratelimit-remaining-"+unit, fmt.Sprint(d.Remaining))
	h.Set("x-ratelimit-reset-"+unit, reset.String())
	if api == Anthropic {
		resetAt := d.ResetAt
		if resetAt.IsZero() {
			resetAt = now
		}
		h.Set("anthropic-ratelimit-"+unit+"-limit", fmt.Sprint(d.LimitAmount))
		h.Set("anthropic-ratelimit-"+unit+"-remaining", fmt.Sprint(d.Remaining))
		h.Set("anthropic-ratelimit-"+unit+"-reset", resetAt.UTC().Format(time.RFC3339))
	}
}

// limitUnit is what a limit counts, for its headers' names, as the Python middleware names
// them: "m2.7:requests per rolling:5h" -> "requests"; a shared usage bar (micro-credits at
// each endpoint's price) -> "usage", never "requests".
func limitUnit(limitName string) string {
	meter, _, _ := strings.Cut(limitName, " per ")
	unit := "usage"
	if i := strings.LastIndex(meter, ":"); i >= 0 {
		unit = meter[i+1:]
	}
	unit = strings.Map(func(c rune) rune {
		if c == '-' || ('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z') || ('0' <= c && c <= '9') {
			return c
		}
		return '-'
	}, unit)
	if unit == "" {
		return "usage"
	}
	return unit
}

// routePath is path cleaned as a route: no doubled or trailing slashes, no dot segments.
func routePath(p string) string {
	return path.Clean("/" + p)
}

// ceilSeconds rounds a wait up to whole seconds (at least 1), as Retry-After needs.
func ceilSeconds(d time.Duration) int64 {
	seconds := int64((d + time.Second - 1) / time.Second)
	if seconds < 1 {
		seconds = 1
	}
	return seconds
}
