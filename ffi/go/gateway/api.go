package gateway

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
)

// API is the wire dialect of a route: how a client sends its key and how errors look.
type API int

const (
	// OpenAI: /v1/chat/completions and friends; errors {"error": {"message", "type", "code"}}.
	OpenAI API = iota
	// Anthropic: /v1/messages; errors {"type": "error", "error": {"type", "message"}}.
	Anthropic
)

// metering is what a route's call is counted in, as the Python middleware counts it.
type metering int

const (
	byTokens      metering = iota // 1 request + tokens: an estimate reserved, the usage settled
	byInputTokens                 // byTokens for a call that writes no output (embeddings): its input held
	byCharacters                  // the characters of "input" (+ 1 request)
	byImages                      // "n" images, default 1 (+ 1 request)
)

// tokens says whether a route's call is counted in tokens: held at an estimate and settled
// from the usage its answer reports.
func (m metering) tokens() bool { return m == byTokens || m == byInputTokens }

// route is a metered route: its API and what it is counted in.
type route struct {
	api      API
	metering metering
}

// meteredRoutes are the POST routes the gateway counts, the Python middleware's
// DEFAULT_ROUTES. A call on any other route is proxied only if it passes through
// (Config.PassThrough); otherwise it is refused (routeRefused).
var meteredRoutes = map[string]route{
	"/v1/chat/completions":   {OpenAI, byTokens},
	"/v1/completions":        {OpenAI, byTokens},
	"/v1/responses":          {OpenAI, byTokens},
	"/v1/embeddings":         {OpenAI, byInputTokens},
	"/v1/messages":           {Anthropic, byTokens},
	"/v1/audio/speech":       {OpenAI, byCharacters},
	"/v1/images/generations": {OpenAI, byImages},
}

// DefaultPassThrough are the routes proxied unmetered when Config.PassThrough is nil, the
// Python middleware's DEFAULT_PASS_THROUGH: the model list, one model, and Anthropic's token
// count, which cost nothing upstream and show nothing of other users. Everything else the
// upstream serves either spends the operator's account (batches, files for batches,
// Anthropic's legacy /v1/complete, transcriptions, image edits, moderations, fine-tuning,
// assistants' runs, realtime websockets) or shows what other users left there (files,
// batches), so it is refused unless an operator opens it.
var DefaultPassThrough = []string{
	"GET /v1/models",
	"GET /v1/models/*",
	"POST /v1/messages/count_tokens",
}

// passRoute is one entry of Config.PassThrough: "METHOD /path", the method in upper case, the
// path clean (no doubled or trailing slash, no dot segment, no "?", "#" or "%"), a segment
// "*" matching any one segment ("GET /v1/models/*" is GET /v1/models/m2.7, not GET /v1/models
// nor GET /v1/models/a/b). A call matches by its method (in upper case) and its path cleaned,
// which is the path passed on: the upstream serves exactly the route the entry names.
type passRoute struct {
	method   string
	segments []string
}

// parsePassThrough reads the entries, refusing one that is no route as said above or that
// would match a metered route (POST on a metered path): that call would be metered and free
// at once.
func parsePassThrough(entries []string) ([]passRoute, error) {
	routes := make([]passRoute, 0, len(entries))
	for _, entry := range entries {
		bad := func(why string) error {
			return fmt.Errorf("gateway: PassThrough %q: %s", entry, why)
		}
		fields := strings.Fields(entry)
		if len(fields) != 2 {
			return nil, bad(`want "METHOD /path", e.g. "GET /v1/models"`)
		}
		method, path := fields[0], fields[1]
		if strings.IndexFunc(method, func(c rune) bool { return c < 'A' || c > 'Z' }) >= 0 {
			return nil, bad("the method must be in upper case letters, e.g. GET")
		}
		if !strings.HasPrefix(path, "/") || routePath(path) != path || strings.ContainsAny(path, "?#%") {
			return nil, bad("the path must start with / and be clean: no doubled or trailing slash, no . or .. segment, no ?, # or %")
		}
		pass := passRoute{method: method, segments: strings.Split(path[1:], "/")}
		for _, segment := range pass.segments {
			if segment != "*" && strings.Contains(segment, "*") {
				return nil, bad(`"*" stands for a whole segment only`)
			}
		}
		for metered := range meteredRoutes {
			if pass.matches(http.MethodPost, metered) {
				return nil, bad("it matches the metered route POST " + metered + ", which cannot also pass through unmetered")
			}
		}
		routes = append(routes, pass)
	}
	return routes, nil
}

// matches says whether a call with method on path (cleaned) is this route.
func (p passRoute) matches(method, path string) bool {
	if method != p.method || !strings.HasPrefix(path, "/") {
		return false
	}
	segments := strings.Split(path[1:], "/")
	if len(segments) != len(p.segments) {
		return false
	}
	for i, segment := range segments {
		if (p.segments[i] == "*" && segment == "") || (p.segments[i] != "*" && p.segments[i] != segment) {
			return false
		}
	}
	return true
}

// apiOf is the dialect of a path: Anthropic for /v1/messages... and its legacy /v1/complete,
// OpenAI otherwise.
func apiOf(path string) API {
	if strings.HasPrefix(path, "/v1/messages") || path == "/v1/complete" {
		return Anthropic
	}
	return OpenAI
}

// keyOf reads the caller's key: "Authorization: Bearer KEY" (OpenAI clients, Cursor, Cline)
// or "x-api-key: KEY" (Anthropic clients, Claude Code). conflict is true when the two headers
// carry two different keys: whichever won would decide whose quota pays, and a client sending
// two credentials has mixed up its configuration (an SDK's key and a proxy's header), so the
// call is refused (401, as the Python middleware refuses it) rather than charged to a key it
// may not mean. The same key in both is one key.
func keyOf(r *http.Request) (key string, conflict bool) {
	var bearer string
	authorization := trimOWS(r.Header.Get("Authorization"))
	if len(authorization) > 7 && strings.EqualFold(authorization[:7], "bearer ") {
		bearer = trimOWS(authorization[7:])
	}
	xAPIKey := trimOWS(r.Header.Get("x-api-key"))
	if bearer != "" && xAPIKey != "" && bearer != xAPIKey {
		return "", true
	}
	if bearer != "" {
		return bearer, false
	}
	return xAPIKey, false
}

// trimOWS trims what HTTP lets surround a header's value and its parts: spaces and tabs
// (RFC 9110's optional whitespace), and nothing else. strings.TrimSpace trimmed every Unicode
// space too, so "tp-ada-1" followed by U+0085 or U+00A0 was taken for the key tp-ada-1: a
// credential that is not the key matched it. The key is now the bytes sent, so such a one
// is a key no key is (401).
func trimOWS(value string) string {
	return strings.Trim(value, " \t")
}

// apiError is one error answer: status, the API-specific type and code, and the message.
type apiError struct {
	status  int
	kind    string // OpenAI "type" / Anthropic "error.type"
	code    string // OpenAI "code", "" for null (Anthropic has none)
	message string
}

// write answers the error in the shape of api, so coding tools show the message.
func (e apiError) write(w http.ResponseWriter, api API) {
	var body interface{}
	if api == Anthropic {
		body = map[string]interface{}{
			"type":  "error",
			"error": map[string]string{"type": e.kind, "message": e.message},
		}
	} else {
		// No code is null, as OpenAI's API writes it for a malformed request.
		var code interface{}
		if e.code != "" {
			code = e.code
		}
		body = map[string]interface{}{
			"error": map[string]interface{}{"message": e.message, "type": e.kind, "code": code, "param": nil},
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(e.status)
	_ = json.NewEncoder(w).Encode(body)
}

// The error kinds by API.
func invalidRequest(api API, code, message string) apiError {
	return apiError{status: http.StatusBadRequest, kind: "invalid_request_error", code: code, message: message}
}

// modelNotFound: the model is not one the policy meters (404, as the upstream answers a model
// it does not have).
func modelNotFound(api API, message string) apiError {
	if api == Anthropic {
		return apiError{status: http.StatusNotFound, kind: "not_found_error", message: message}
	}
	return apiError{status: http.StatusNotFound, kind: "invalid_request_error", code: "model_not_found", message: message}
}

// tooLarge: the request body is past MaxBodyBytes (413); OpenAI's type is
// invalid_request_error, Anthropic's request_too_large, as the Python middleware answers.
func tooLarge(api API, message string) apiError {
	if api == Anthropic {
		return apiError{status: http.StatusRequestEntityTooLarge, kind: "request_too_large", message: message}
	}
	return apiError{status: http.StatusRequestEntityTooLarge, kind: "invalid_request_error", code: "request_too_large", message: message}
}

// routeRefused: a route the gateway neither meters nor passes through. 403, a call this caller
// may not make here (Anthropic's permission_error; OpenAI's 403s are invalid_request_error,
// here with code route_not_served), rather than the 404 the upstreams give a route they do
// not have: the route may well exist upstream (batches, files), and it is this gateway that
// does not serve it, whatever the key's quota, which no retry or other model changes. A
// websocket refused before it is accepted is 403 too (as an ASGI server answers the Python
// middleware's refusal), so both gateways answer every refused route, websocket or not, alike.
func routeRefused(api API, method, path string) apiError {
	message := fmt.Sprintf("%s %s is not served by this gateway: the route is not metered, and only metered routes and the routes an operator lets pass through (costing nothing) reach the upstream.", method, path)
	if api == Anthropic {
		return apiError{status: http.StatusForbidden, kind: "permission_error", message: message}
	}
	return apiError{status: http.StatusForbidden, kind: "invalid_request_error", code: "route_not_served", message: message}
}

// methodNotAllowed: a method the path does not answer (405, with an Allow header the caller
// sets), invalid_request_error in both APIs' shapes.
func methodNotAllowed(api API, message string) apiError {
	return apiError{status: http.StatusMethodNotAllowed, kind: "invalid_request_error", code: "method_not_allowed", message: message}
}

func unauthorized(api API, message string) apiError {
	if api == Anthropic {
		return apiError{status: http.StatusUnauthorized, kind: "authentication_error", message: message}
	}
	return apiError{status: http.StatusUnauthorized, kind: "invalid_request_error", code: "invalid_api_key", message: message}
}

// rateLimited: waiting helps. OpenAI's type is the unit of the limit that denied, as OpenAI's
// API says "requests" or "tokens" (and as the x-ratelimit-*-<unit> headers name it).
func rateLimited(api API, unit, message string) apiError {
	if api == Anthropic {
		return apiError{status: http.StatusTooManyRequests, kind: "rate_limit_error", message: message}
	}
	return apiError{status: http.StatusTooManyRequests, kind: unit, code: "rate_limit_exceeded", message: message}
}

// noResources: waiting does not help (no seat, not covered, no credits).
func noResources(api API, message string) apiError {
	if api == Anthropic {
		return apiError{status: http.StatusForbidden, kind: "permission_error", message: message}
	}
	return apiError{status: http.StatusTooManyRequests, kind: "insufficient_quota", code: "insufficient_quota", message: message}
}

func upstreamFailed(api API, message string) apiError {
	if api == Anthropic {
		return apiError{status: http.StatusBadGateway, kind: "api_error", message: message}
	}
	return apiError{status: http.StatusBadGateway, kind: "server_error", code: "upstream_error", message: message}
}

// unavailable: the quota service could not decide; a client may retry later.
func unavailable(api API, message string) apiError {
	if api == Anthropic {
		return apiError{status: http.StatusServiceUnavailable, kind: "api_error", message: message}
	}
	return apiError{status: http.StatusServiceUnavailable, kind: "server_error", code: "service_unavailable", message: message}
}

// internal: the gateway's own fault (500).
func internal(api API, message string) apiError {
	if api == Anthropic {
		return apiError{status: http.StatusInternalServerError, kind: "api_error", message: message}
	}
	return apiError{status: http.StatusInternalServerError, kind: "server_error", code: "internal_error", message: message}
}
