package gateway

import (
	"encoding/json"
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
	byTokens     metering = iota // 1 request + tokens: an estimate reserved, the usage settled
	byCharacters                 // the characters of "input" (+ 1 request)
	byImages                     // "n" images, default 1 (+ 1 request)
)

// route is a metered route: its API and what it is counted in.
type route struct {
	api      API
	metering metering
}

// meteredRoutes are the POST routes the gateway counts, the Python middleware's
// DEFAULT_ROUTES. Other paths are proxied unmetered once the key is known (model lists,
// token counting).
var meteredRoutes = map[string]route{
	"/v1/chat/completions":   {OpenAI, byTokens},
	"/v1/completions":        {OpenAI, byTokens},
	"/v1/responses":          {OpenAI, byTokens},
	"/v1/embeddings":         {OpenAI, byTokens},
	"/v1/messages":           {Anthropic, byTokens},
	"/v1/audio/speech":       {OpenAI, byCharacters},
	"/v1/images/generations": {OpenAI, byImages},
}

// apiOf is the dialect of a path: Anthropic for /v1/messages..., OpenAI otherwise.
func apiOf(path string) API {
	if strings.HasPrefix(path, "/v1/messages") {
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
	authorization := strings.TrimSpace(r.Header.Get("Authorization"))
	if len(authorization) > 7 && strings.EqualFold(authorization[:7], "bearer ") {
		bearer = strings.TrimSpace(authorization[7:])
	}
	xAPIKey := strings.TrimSpace(r.Header.Get("x-api-key"))
	if bearer != "" && xAPIKey != "" && bearer != xAPIKey {
		return "", true
	}
	if bearer != "" {
		return bearer, false
	}
	return xAPIKey, false
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
