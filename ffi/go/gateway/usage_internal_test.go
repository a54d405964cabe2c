package gateway

import (
	"strings"
	"testing"
	"unicode/utf16"
)

// usageCases are answers and the tokens they report, the same table as the Python middleware's
// test_the_usage_reader_counts_what_each_api_reports: both gateways must settle the same
// answer alike. notSeen: no usage read, settled at the estimate.
var usageCases = []struct {
	name, contentType, body string
	tokens                  uint64
	notSeen                 bool
}{
	// Anthropic's input_tokens leaves out the tokens read from or written to its prompt cache
	// (cache_read_input_tokens, cache_creation_input_tokens), which the upstream processed and
	// bills: a coding agent's prompt is mostly cached.
	{name: "Anthropic JSON with cached tokens", contentType: "application/json",
		body:   `{"type":"message","usage":{"input_tokens":5,"cache_creation_input_tokens":100,"cache_read_input_tokens":1000,"output_tokens":20}}`,
		tokens: 1125},
	{name: "Anthropic stream with cached tokens", contentType: "text/event-stream",
		body: "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":1000,\"output_tokens\":1}}}\n\n" +
			"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":20}}\n\n",
		tokens: 1125},
	{name: "Anthropic stream repeating its cumulative usage", contentType: "text/event-stream",
		body: "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":1000,\"output_tokens\":1}}}\n\n" +
			"data: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":5,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":1000,\"output_tokens\":20}}\n\n",
		tokens: 1125},
	// Reports are cumulative: a later 0 (an Anthropic-compatible upstream's message_delta) does
	// not take back the input tokens message_start reported.
	{name: "a later event reporting 0 input tokens", contentType: "text/event-stream",
		body: "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n" +
			"data: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":0,\"output_tokens\":7}}\n\n",
		tokens: 17},
	// Usage split across events is added up, not the last event's part alone.
	{name: "OpenAI usage split across events", contentType: "text/event-stream",
		body:   "data: {\"usage\":{\"prompt_tokens\":10}}\n\ndata: {\"usage\":{\"completion_tokens\":5}}\n\ndata: [DONE]\n\n",
		tokens: 15},
	// OpenAI's cached tokens are part of prompt_tokens (and the Responses API's of
	// input_tokens): not counted twice.
	{name: "OpenAI JSON with cached tokens", contentType: "application/json",
		body:   `{"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":8}}}`,
		tokens: 15},
	{name: "Responses JSON with cached tokens", contentType: "application/json",
		body:   `{"usage":{"input_tokens":10,"output_tokens":5,"total_tokens":15,"input_tokens_details":{"cached_tokens":8}}}`,
		tokens: 15},
	{name: "Responses stream", contentType: "text/event-stream",
		body:   "data: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":5,\"total_tokens\":15}}}\n\n",
		tokens: 15},
	{name: "OpenAI stream", contentType: "text/event-stream",
		body:   "data: {\"choices\":[],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":18,\"total_tokens\":30}}\n\ndata: [DONE]\n\n",
		tokens: 30},
	// An event line too long to be usage (a large content or tool-call delta) is skipped, and
	// the usage after it still read.
	{name: "a stream with a line longer than MAX_EVENT_LINE_BYTES", contentType: "text/event-stream",
		body: "data: {\"choices\":[{\"delta\":{\"content\":\"" + strings.Repeat("x", 2*maxEventLineBytes) + "\"}}]}\n\n" +
			"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":18,\"total_tokens\":30}}\n\ndata: [DONE]\n\n",
		tokens: 30},
	// Each count is read by its exact name and on its own: a field of another type leaves the
	// rest read, and a "Usage" beside "usage" is not the usage.
	{name: "a field of another type beside the counts", contentType: "application/json",
		body:   `{"message":"done","usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":"15","input_tokens":-1}}`,
		tokens: 15},
	{name: "a usage named in another case", contentType: "application/json",
		body:   `{"usage":{"total_tokens":15},"Usage":{"total_tokens":99}}`,
		tokens: 15},
	{name: "an event whose message is no object", contentType: "text/event-stream",
		body:   "data: {\"type\":\"message_start\",\"message\":\"start\"}\n\ndata: {\"usage\":{\"output_tokens\":7,\"input_tokens\":3.0}}\n\n",
		tokens: 7},
	// A document that is no JSON by RFC 8259 is not read: NaN or Infinity anywhere in it, a
	// byte order mark, UTF-16. Nor is one nested past maxJSONNesting levels (the object
	// itself is one). Bytes that are not UTF-8 inside a string are no reason to drop the usage
	// beside them (read as U+FFFD). As the Python middleware's UsageReader reads them.
	{name: "NaN beside the usage", contentType: "application/json",
		body: `{"usage":{"total_tokens":15},"logprob":NaN}`, notSeen: true},
	{name: "-Infinity in an event", contentType: "text/event-stream",
		body: "data: {\"usage\":{\"total_tokens\":15},\"x\":-Infinity}\n\n", notSeen: true},
	{name: "a byte order mark", contentType: "application/json",
		body: "\xef\xbb\xbf{\"usage\":{\"total_tokens\":15}}", notSeen: true},
	{name: "UTF-16", contentType: "application/json", body: utf16WithBOM(`{"usage":{"total_tokens":15}}`),
		notSeen: true},
	{name: "nesting at maxJSONNesting levels", contentType: "application/json",
		body:   `{"usage":{"total_tokens":15},"deep":` + strings.Repeat("[", 511) + strings.Repeat("]", 511) + `}`,
		tokens: 15},
	{name: "nesting past maxJSONNesting levels", contentType: "application/json",
		body:    `{"usage":{"total_tokens":15},"deep":` + strings.Repeat("[", 512) + strings.Repeat("]", 512) + `}`,
		notSeen: true},
	{name: "nesting past encoding/json's own bound", contentType: "application/json",
		body:    `{"usage":{"total_tokens":15},"deep":` + strings.Repeat("[", 20_000) + strings.Repeat("]", 20_000) + `}`,
		notSeen: true},
	{name: "brackets in strings are no nesting", contentType: "application/json",
		body:   `{"usage":{"total_tokens":15},"text":"` + strings.Repeat(`[{\"`, 600) + `"}`,
		tokens: 15},
	{name: "bytes not UTF-8 in a string", contentType: "application/json",
		body: "{\"usage\":{\"total_tokens\":15},\"text\":\"\xff\xfe\"}", tokens: 15},
	{name: "a cut UTF-8 sequence in an event's string", contentType: "text/event-stream",
		body: "data: {\"text\":\"\xc3\",\"usage\":{\"total_tokens\":15}}\n\n", tokens: 15},
	// An event line is trimmed of Unicode spaces as bytes.TrimSpace trims them (a no-break
	// space, U+0085), not of other control characters: the Python middleware trims alike.
	{name: "a no-break space after an event's data", contentType: "text/event-stream",
		body: "data: {\"usage\":{\"total_tokens\":15}}\xc2\xa0\n\n", tokens: 15},
	{name: "U+0085 before an event line", contentType: "text/event-stream",
		body: "\xc2\x85data:\xe3\x80\x80{\"usage\":{\"total_tokens\":15}}\n\n", tokens: 15},
	{name: "a file separator after an event's data", contentType: "text/event-stream",
		body: "data: {\"usage\":{\"total_tokens\":15}}\x1c\n\n", notSeen: true},
	// A name written with JSON escapes is the same name: both gateways read it.
	{name: "an event's usage named with an escape", contentType: "text/event-stream",
		body: "data: {\"\\u0075sage\":{\"total_tokens\":15}}\n\n", tokens: 15},
	{name: "an event's count named with an escape", contentType: "text/event-stream",
		body: "data: {\"usage\":{\"total\\u005ftokens\":15}}\n\n", tokens: 15},
	// Nothing used is no report a successful answer can make: settled at the estimate.
	{name: "a usage of zeros", contentType: "application/json",
		body: `{"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}}`, notSeen: true},
	{name: "no usage", contentType: "application/json", body: `{"choices":[]}`, notSeen: true},
	{name: "a stream without usage", contentType: "text/event-stream",
		body: "data: {\"choices\":[]}\n\ndata: [DONE]\n\n", notSeen: true},
}

// utf16WithBOM is text in UTF-16, little-endian with its byte order mark, as Python's
// str.encode("utf-16") writes it.
func utf16WithBOM(text string) string {
	encoded := []byte{0xff, 0xfe}
	for _, unit := range utf16.Encode([]rune(text)) {
		encoded = append(encoded, byte(unit), byte(unit>>8))
	}
	return string(encoded)
}

func TestTheUsageCountsWhatEachAPIReports(t *testing.T) {
	for _, c := range usageCases {
		var counter tokenCounter
		if strings.HasPrefix(c.contentType, "text/event-stream") {
			// In pieces of 64 KiB, as a stream arrives.
			stream := &streamedBody{}
			for body := []byte(c.body); len(body) > 0; {
				n := len(body)
				if n > 1<<16 {
					n = 1 << 16
				}
				stream.scan(body[:n])
				body = body[n:]
			}
			stream.endLine()
			counter = stream.counter
		} else {
			counter.observe([]byte(c.body))
		}
		tokens, seen := counter.tokens()
		if seen == c.notSeen || (seen && tokens != c.tokens) {
			t.Errorf("%s: %d tokens (seen %t), want %d (seen %t)", c.name, tokens, seen, c.tokens, !c.notSeen)
		}
	}
}

// An event line longer than maxEventLineBytes is skipped whole, however it arrives: its pieces
// that still fit after one was dropped (the line's end, arriving in a piece of its own) are
// no line to read. Spliced to the line's start, they made a document the line never was,
// here one reporting 15 tokens, while the Python middleware skips the line (it is content,
// not usage) and charges the estimate.
func TestAnEventLineTooLongIsSkippedWholeWhateverItsPieces(t *testing.T) {
	line := "data: {\"usage\":{\"total_tokens\":15},\"text\":\"" + strings.Repeat("x", maxEventLineBytes) + "\"}\n\n"
	start := maxEventLineBytes - 100 // fits
	pieces := []string{line[:start], line[start : len(line)-4], line[len(line)-4:]}
	stream := &streamedBody{}
	for _, piece := range pieces {
		stream.scan([]byte(piece))
	}
	stream.endLine()
	if tokens, seen := stream.counter.tokens(); seen {
		t.Fatalf("a line of %d bytes was read for usage (%d tokens): want it skipped", len(line)-2, tokens)
	}
	// The usage on the next line is still read.
	stream.scan([]byte("data: {\"usage\":{\"total_tokens\":30}}\n"))
	if tokens, seen := stream.counter.tokens(); !seen || tokens != 30 {
		t.Fatalf("the line after the long one: %d tokens (seen %t), want 30", tokens, seen)
	}
}
