package gateway

import (
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net/http"
	"strconv"
	"strings"
	"sync"

	tally "github.com/tally-engine/tally/ffi/go"
)

// checkHealthPath refuses a Config.HealthPath that is no clean path (as a PassThrough entry's
// path is checked), or that is a metered route's path or matched by a route that passes
// through, with any method: the health path would answer that route's calls itself.
func checkHealthPath(health string, passThrough []passRoute) error {
	bad := func(why string) error {
		return fmt.Errorf("gateway: HealthPath %q: %s", health, why)
	}
	if !strings.HasPrefix(health, "/") || routePath(health) != health || strings.ContainsAny(health, "?#%") {
		return bad("the path must start with / and be clean: no doubled or trailing slash, no . or .. segment, no ?, # or %")
	}
	if _, metered := meteredRoutes[health]; metered {
		return bad("it is the metered route POST " + health + ", which the health path would hide")
	}
	for _, pass := range passThrough {
		if pass.matches(pass.method, health) {
			return bad("the route " + pass.method + " /" + strings.Join(pass.segments, "/") +
				" passes through there (PassThrough), which the health path would hide")
		}
	}
	return nil
}

// healthBody is the health path's answer, as the Python middleware writes it.
type healthBody struct {
	Healthy  bool     `json:"healthy"`
	Failures []string `json:"failures"`
	Error    *string  `json:"error"`
}

// healthFailures are the failures health reports, in its fields' order: each by its field's
// JSON name, and that name with its detail.
func healthFailures(health tally.Health) (names, details []string) {
	for _, failure := range []struct{ name, detail string }{{"log_failure", health.LogFailure},
		{"checkpoint_failure", health.CheckpointFailure}, {"compaction_failure", health.CompactionFailure}} {
		if failure.detail != "" {
			names = append(names, failure.name)
			details = append(details, failure.name+": "+failure.detail)
		}
	}
	return names, details
}

// healthAnswer is the status and body answering what Engine.Health returned: 200 when it
// reports nothing; 503 naming each failure it reports, or saying why it could not be read.
func healthAnswer(health tally.Health, err error) (int, []byte) {
	body := healthBody{Failures: []string{}}
	if err != nil {
		message := "the engine's health could not be read (" + tally.StatusOf(err).String() + ")"
		if errors.Is(err, tally.ErrClosed) {
			message = "the engine is closed (" + tally.StatusOf(err).String() + ")"
		}
		body.Error = &message
	} else {
		names, _ := healthFailures(health)
		body.Failures = append(body.Failures, names...)
		body.Healthy = len(names) == 0
	}
	encoded, _ := json.Marshal(body) // strings and a bool: it cannot fail
	status := http.StatusOK
	if !body.Healthy {
		status = http.StatusServiceUnavailable
	}
	return status, append(encoded, '\n')
}

// serveHealth answers a call on the health path: GET and HEAD with the engine's health,
// any other method 405.
func (g *Gateway) serveHealth(w http.ResponseWriter, api API, method, path string) {
	w.Header().Set("Cache-Control", "no-store")
	if method != http.MethodGet && method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		methodNotAllowed(api, method+" "+path+" is the gateway's health path: it answers GET and HEAD only.").write(w, api)
		return
	}
	health, err := g.config.Engine.Health()
	g.health.report(g.config.Logger, health, err)
	status, body := healthAnswer(health, err)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	if method != http.MethodHead {
		_, _ = w.Write(body)
	}
}

// healthLog logs what the health path found each time it changes (a probe comes every few
// seconds; the same failure is logged once), with the detail its answer leaves out.
type healthLog struct {
	mutex sync.Mutex
	last  string // "" while healthy
}

func (l *healthLog) report(logger *log.Logger, health tally.Health, err error) {
	var found string
	if err != nil {
		found = err.Error()
	} else {
		_, details := healthFailures(health)
		found = strings.Join(details, "; ")
	}
	l.mutex.Lock()
	defer l.mutex.Unlock()
	if found == l.last {
		return
	}
	if found == "" {
		logger.Printf("tally-gateway: health: healthy again")
	} else {
		logger.Printf("tally-gateway: health: unhealthy: %s", found)
	}
	l.last = found
}
