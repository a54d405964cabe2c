package gateway

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	tally "github.com/tally-engine/tally/ffi/go"
)

// The most bytes of a non-streamed response read to find its usage; a longer one is
// streamed through and charged at the estimate.
const maxUsageBodyBytes = 32 << 20

// modifyResponse settles the call's reservation from the upstream's reported usage, or
// voids it when the upstream failed. Streamed responses (server-sent events) are settled
// when their body ends, from the usage their events carry.
func (g *Gateway) modifyResponse(response *http.Response) error {
	// The upstream's rate-limit headers are the operator's account's, not the caller's (and
	// would leak it): dropped on every answer, a pass-through's too; a metered call's carry the
	// gateway's in their place, as in the Python middleware. So is every x-tally-* of the
	// upstream's, whichever the gateway sets: one the decision sets none of (a pay-as-you-go
	// key's x-tally-plan) would pass for the gateway's own.
	for name := range response.Header {
		lower := strings.ToLower(name)
		if strings.HasPrefix(lower, "x-ratelimit-") || strings.HasPrefix(lower, "anthropic-ratelimit-") ||
			strings.HasPrefix(lower, "x-tally-") {
			response.Header.Del(name)
		}
	}
	c, ok := response.Request.Context().Value(callKey{}).(*call)
	if !ok {
		return nil
	}
	setRateLimitHeaders(response.Header, c.api, c.decision, g.wallNow())
	if response.StatusCode >= http.StatusBadRequest {
		c.void()
		return nil
	}
	if c.fixed != nil {
		c.settle(tokenCounter{}) // speech, images: charged what was held, whatever the body
		return nil
	}
	// A media type is case-insensitive ("Text/Event-Stream"), as the Python middleware reads it.
	if strings.HasPrefix(strings.ToLower(response.Header.Get("Content-Type")), "text/event-stream") {
		response.Body = &streamedBody{body: response.Body, call: c}
		return nil
	}
	body, err := io.ReadAll(io.LimitReader(response.Body, maxUsageBodyBytes+1))
	var counter tokenCounter
	if len(body) <= maxUsageBodyBytes {
		counter.observe(body)
	}
	// An answer that broke off (the connection, or a gzip body cut short, which the transport
	// decodes) was served upstream on the operator's account: it is charged the usage that
	// arrived, or its estimate when the usage went with the rest, as a stream broken off is
	// settled and as the Python middleware charges it.
	c.settle(counter)
	rest := io.Reader(response.Body)
	if err != nil {
		// The client gets what arrived, as from the Python middleware, not a 502 in its place;
		// then the error, which the proxy answers by ending the answer short (the client sees
		// it broken off, as the upstream's was), not as if it were whole.
		rest = failingReader{err}
	}
	response.Body = struct {
		io.Reader
		io.Closer
	}{io.MultiReader(bytes.NewReader(body), rest), response.Body}
	return nil
}

// failingReader fails every read with err: what follows the part of an answer that arrived.
type failingReader struct{ err error }

func (f failingReader) Read([]byte) (int, error) { return 0, f.err }

// upstreamError voids the reservation and answers 502 in the API's shape.
func (g *Gateway) upstreamError(w http.ResponseWriter, r *http.Request, err error) {
	// r is the request as sent upstream: its path has the upstream's own in front.
	api := apiOf(strings.TrimPrefix(r.URL.Path, strings.TrimSuffix(g.config.Upstream.Path, "/")))
	if c, ok := r.Context().Value(callKey{}).(*call); ok {
		c.void()
		api = c.api
	}
	// The detail (the upstream's address, a TLS error) is the operator's to log, not the
	// caller's to read.
	g.config.Logger.Printf("tally-gateway: upstream: %v", err)
	upstreamFailed(api, "the upstream could not be reached or failed").write(w, api)
}

// settle charges one request (if held) and the tokens the upstream reported (the estimate if it
// reported none); a call not counted in tokens, what it held. If more tokens than reserved no
// longer fit, the estimate is charged: the tokens were spent either way. A call that outlived
// its reservation's lease is charged by a usage correction (recordLate).
func (c *call) settle(counter tokenCounter) {
	if !c.end() {
		return
	}
	engine, at, logger := c.gateway.config.Engine, c.gateway.now(), c.gateway.config.Logger
	if c.fixed != nil {
		decision, err := engine.Settle(c.reservation, c.fixed, at)
		if leaseEnded(err) {
			c.recordLate(c.fixed, at)
		} else if err != nil || !decision.Admitted {
			logger.Printf("tally-gateway: settle reservation %d: %v %+v", c.reservation, err, decision.Denial)
		}
		return
	}
	// A stream that ended before its report of the whole call (broken off, or a client gone
	// before Anthropic's message_delta, having read the text) used more than its input: it is
	// charged at least its estimate, as the Python middleware charges it.
	tokens, seen := counter.tokens()
	if !seen || (!counter.final && tokens < c.estimate) {
		tokens = c.estimate
	}
	// A count past the engine's bound on a quantity would fail the settle and leave the
	// reservation open until its lease ends.
	if tokens > tally.MaxQuantity {
		tokens = tally.MaxQuantity
	}
	// One request if the hold counted it (a model metered by tokens alone holds none, and the
	// engine refuses a unit its resource does not meter), as the Python middleware settles
	// only the units it held.
	var used []tally.Quantity
	if c.requests {
		used = append(used, tally.Quantity{Unit: tally.Requests, Amount: 1})
	}
	if tokens > 0 {
		used = append(used, tally.Quantity{Unit: tally.Tokens, Amount: tokens})
	}
	decision, err := engine.Settle(c.reservation, used, at)
	if err == nil && !decision.Admitted && tokens > 0 {
		logger.Printf("tally-gateway: %d tokens beyond the estimate did not fit (%s); charging the estimate",
			tokens, decision.Denial)
		held := append([]tally.Quantity(nil), used...)
		held[len(held)-1].Amount = c.estimate
		decision, err = engine.Settle(c.reservation, held, at)
	}
	if leaseEnded(err) {
		c.recordLate(used, at)
		return
	}
	if err != nil || !decision.Admitted {
		logger.Printf("tally-gateway: settle reservation %d: %v %+v", c.reservation, err, decision.Denial)
	}
}

// leaseEnded says whether a settle found its reservation closed because its lease ended (the
// engine expired it and gave its hold back), not because it was already settled or voided:
// only then is the call's usage counted nowhere. Told by the status
// (TALLY_RESERVATION_EXPIRED), as the Python middleware tells it, not by the message's wording.
func leaseEnded(err error) bool {
	return errors.Is(err, tally.ErrReservationExpired)
}

// recordLate records the usage of a call whose reservation's lease ended before its settle (a
// stream longer than Lease): the engine expired it and gave its hold back, so the usage is
// added as a usage correction at the reservation's time, where a settle would have counted
// it, whatever the limit now (it really happened), as the Python middleware does. Only
// settle leads here, once per call (end). A correction counts plan quota only: a hold on
// credits or pay-as-you-go cannot be charged after it, and is logged as not recorded.
func (c *call) recordLate(used []tally.Quantity, at time.Time) {
	logger, reservedAt := c.gateway.config.Logger, c.decision.At
	if c.decision.ChargedTo != tally.ChargedToPlanQuota {
		logger.Printf("tally-gateway: reservation %d outlived its lease; its usage %v on %s, held on %s, was not recorded (a usage correction counts plan quota only)",
			c.reservation, used, c.resource, c.decision.ChargedTo)
		return
	}
	if reservedAt.IsZero() {
		reservedAt = c.gateway.wallNow() // not expected of an admitted reservation
	}
	if _, err := c.gateway.config.Engine.AdjustUsage(c.key, c.resource, used, reservedAt, tally.AdjustAdd, at); err != nil {
		logger.Printf("tally-gateway: reservation %d outlived its lease; recording its usage %v on %s failed: %v",
			c.reservation, used, c.resource, err)
		return
	}
	logger.Printf("tally-gateway: reservation %d outlived its lease; its usage %v on %s was recorded as a usage correction at %s",
		c.reservation, used, c.resource, reservedAt.UTC().Format(time.RFC3339))
}

// end marks the call finished; only the first of settle and void does anything.
func (c *call) end() bool {
	c.mutex.Lock()
	defer c.mutex.Unlock()
	first := !c.done
	c.done = true
	return first
}

// void gives back everything the reservation held.
func (c *call) void() {
	if !c.end() {
		return
	}
	if err := c.gateway.config.Engine.Void(c.reservation, c.gateway.now()); err != nil {
		c.gateway.config.Logger.Printf("tally-gateway: void reservation %d: %v", c.reservation, err)
	}
}

// streamedBody passes server-sent events through, reading the usage their "data:" lines
// carry, and settles the call when the stream ends or is closed.
type streamedBody struct {
	body    io.ReadCloser
	call    *call
	line    []byte
	long    bool // the line being read is longer than maxEventLineBytes: skipped to its end
	counter tokenCounter
	once    sync.Once
}

// The longest event line kept for usage (longer ones are content, not usage).
const maxEventLineBytes = 1 << 20

// A JSON document nested deeper than this many levels of brackets is not read, as in the Python
// middleware (whose decoder recurses once per level, within the interpreter's recursion
// limit): a request body is refused (400), an upstream's answer or event is read for no usage
// (a usage is a few levels deep). encoding/json alone reads up to 10,000 levels.
const maxJSONNesting = 512

func (s *streamedBody) Read(p []byte) (int, error) {
	n, err := s.body.Read(p)
	s.scan(p[:n])
	if err != nil {
		s.finish()
	}
	return n, err
}

func (s *streamedBody) Close() error {
	s.finish()
	return s.body.Close()
}

func (s *streamedBody) finish() {
	s.once.Do(func() {
		s.endLine()
		s.call.settle(s.counter)
	})
}

// scan reads the lines chunk ends. A line longer than maxEventLineBytes is skipped whole, to
// its end, as the Python middleware skips it: kept, the pieces of it that still fit after one
// was dropped were read as a line, its start spliced to its end.
func (s *streamedBody) scan(chunk []byte) {
	for len(chunk) > 0 {
		end := bytes.IndexByte(chunk, '\n')
		piece := chunk
		if end >= 0 {
			piece = chunk[:end]
		}
		if !s.long && len(s.line)+len(piece) > maxEventLineBytes {
			s.long = true
			s.line = s.line[:0]
		}
		if !s.long {
			s.line = append(s.line, piece...)
		}
		if end < 0 {
			return
		}
		if s.long {
			s.long = false // the long line ends here
		} else {
			s.endLine()
		}
		chunk = chunk[end+1:]
	}
}

func (s *streamedBody) endLine() {
	line := bytes.TrimSpace(s.line)
	s.line = s.line[:0]
	if data := bytes.TrimPrefix(line, []byte("data:")); len(data) < len(line) {
		s.counter.observe(bytes.TrimSpace(data))
	}
}

// tokenCounter collects token usage from response JSON: OpenAI's usage.total_tokens (or
// prompt + completion), the Responses API's response.usage, Anthropic's usage.input_tokens +
// cache_creation_input_tokens + cache_read_input_tokens + output_tokens (its input_tokens
// leaves out the tokens read from or written to its prompt cache, which the upstream processed;
// OpenAI's cached tokens are part of prompt_tokens, and not added again), and in Anthropic
// streams message_start's message.usage and message_delta's cumulative usage. Reports are
// cumulative, so each field keeps the largest count reported: a later event's 0 takes nothing
// back, and fields reported in different events add up. As the Python middleware's UsageReader
// counts them.
//
// final says whether a report of the whole call was seen: a usage at the top of the answer or
// event (OpenAI's last chunk, Anthropic's message_delta, a JSON answer) or the Responses API's
// response.usage. Anthropic's message_start (message.usage) is not: it carries the input and 1
// output token, the output coming at the stream's end.
type tokenCounter struct {
	total, prompt, completion, input, output, cacheCreation, cacheRead uint64
	final                                                              bool
}

// usageNames are the counts a usage holds, in tokenCounter's order.
var usageNames = [...]string{"total_tokens", "prompt_tokens", "completion_tokens", "input_tokens",
	"output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"}

// observe keeps the counts of the "usage", "message.usage" and "response.usage" of one JSON
// document (an answer, or one event), each read by its exact name and on its own, as the Python
// middleware's UsageReader reads them: a field of another type ("message" a string, a count of
// -1 or "15") leaves the rest read (encoding/json alone dropped the whole document), and a
// "Usage" beside "usage" is not the usage (it matched case-insensitively, the last one winning).
func (t *tokenCounter) observe(document []byte) {
	if nestedDeeperThan(document, maxJSONNesting) {
		return
	}
	event := jsonObject(document)
	if event == nil {
		return
	}
	usage := jsonObject(event["usage"])
	messageUsage := jsonObject(jsonObject(event["message"])["usage"])
	responseUsage := jsonObject(jsonObject(event["response"])["usage"])
	if usage != nil || responseUsage != nil {
		t.final = true
	}
	counts := [...]*uint64{&t.total, &t.prompt, &t.completion, &t.input, &t.output, &t.cacheCreation, &t.cacheRead}
	for _, usage := range [...]map[string]json.RawMessage{usage, messageUsage, responseUsage} {
		for i, name := range usageNames {
			if count := tokenCount(usage[name]); count > *counts[i] {
				*counts[i] = count
			}
		}
	}
}

// nestedDeeperThan reports whether the brackets of the JSON document (outside its strings) open
// past bound levels.
func nestedDeeperThan(document []byte, bound int) bool {
	if bytes.Count(document, []byte("["))+bytes.Count(document, []byte("{")) <= bound {
		return false
	}
	depth := 0
	inString, escaped := false, false
	for _, b := range document {
		switch {
		case inString && escaped:
			escaped = false
		case inString && b == '\\':
			escaped = true
		case inString && b == '"':
			inString = false
		case inString:
		case b == '"':
			inString = true
		case b == '[' || b == '{':
			depth++
			if depth > bound {
				return true
			}
		case b == ']' || b == '}':
			depth--
		}
	}
	return false
}

// jsonObject is raw as a JSON object's fields by name, nil if it is no object (null, a string,
// absent, malformed).
func jsonObject(raw json.RawMessage) map[string]json.RawMessage {
	var object map[string]json.RawMessage
	if len(raw) == 0 || json.Unmarshal(raw, &object) != nil {
		return nil
	}
	return object
}

// tokenCount is raw as a count of tokens: a JSON integer above 0 (saturated at the largest
// uint64), else 0 (a negative, a fraction, a string, true, null), as the Python middleware
// counts it.
func tokenCount(raw json.RawMessage) uint64 {
	digits := bytes.TrimSpace(raw)
	if len(digits) == 0 {
		return 0
	}
	for _, digit := range digits {
		if digit < '0' || digit > '9' {
			return 0
		}
	}
	count, err := strconv.ParseUint(string(digits), 10, 64)
	if err != nil {
		return math.MaxUint64 // only digits: too large
	}
	return count
}

// tokens is the usage seen: the total if reported, else prompt + completion (OpenAI), else
// input + cache creation + cache read + output (Anthropic, the Responses API). Nothing but
// zeros is no usage seen (a successful answer used something): the call is charged its
// estimate.
func (t *tokenCounter) tokens() (uint64, bool) {
	if t.total > 0 {
		return t.total, true
	}
	sum := saturatingSum(t.prompt, t.completion)
	if sum == 0 {
		sum = saturatingSum(t.input, t.cacheCreation, t.cacheRead, t.output)
	}
	return sum, sum > 0
}

// saturatingSum adds counts, saturated rather than wrapped around to a few tokens.
func saturatingSum(counts ...uint64) uint64 {
	var sum uint64
	for _, count := range counts {
		if sum > math.MaxUint64-count {
			return math.MaxUint64
		}
		sum += count
	}
	return sum
}
