// Command tally-gateway enforces tally quotas in front of an OpenAI- or Anthropic-compatible
// upstream. Point a coding tool's base URL at it and use a tally key as its API key.
//
//	tally-gateway -upstream https://api.example.com -db ./tally-data -demo-key tp-demo:Starter
//
// The upstream's own key comes from the UPSTREAM_API_KEY environment variable (or
// -upstream-key); without one, callers' credentials are forwarded as they are.
//
// Besides the metered routes, only the routes of gateway.DefaultPassThrough (GET /v1/models,
// GET /v1/models/*, POST /v1/messages/count_tokens) reach the upstream, unmetered; every other
// route is refused (403). -pass-through "METHOD /path" (repeatable; a segment "*" stands for
// any one segment) opens one more, for a route the operator knows costs nothing:
//
//	tally-gateway -upstream https://api.example.com -pass-through "GET /v1/files/*"
//
// -health PATH has the gateway answer GET and HEAD on PATH itself, without a key, for a load
// balancer or an orchestrator: 200 while the engine reports nothing wrong, 503 naming what
// failed (its log, the last periodic checkpoint or automatic compaction, which no call
// reports) or saying the engine is closed (see gateway.Config.HealthPath). Off by default, so
// no upstream route is hidden; a path that is a metered route or passes through is refused:
//
//	tally-gateway -upstream https://api.example.com -db ./tally-data -health /healthz
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	tally "github.com/tally-engine/tally/ffi/go"
	"github.com/tally-engine/tally/ffi/go/gateway"
)

// maxLease is the engine's longest lease (TALLY_MAX_LEASE_MS).
const maxLease = 24 * time.Hour

// demoKeys collects repeated -demo-key KEY:PLAN flags (PLAN "payg" for pay-as-you-go).
type demoKeys []string

func (d *demoKeys) String() string     { return strings.Join(*d, ",") }
func (d *demoKeys) Set(v string) error { *d = append(*d, v); return nil }

// routes collects repeated -pass-through "METHOD /path" flags.
type routes []string

func (r *routes) String() string     { return strings.Join(*r, ", ") }
func (r *routes) Set(v string) error { *r = append(*r, v); return nil }

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "address to listen on")
	upstream := flag.String("upstream", "", "upstream base URL, e.g. https://api.minimax.io/anthropic (required)")
	// Not the flag's default: the usage (-help, a mistyped flag) prints defaults, and the key
	// is a secret.
	upstreamKey := flag.String("upstream-key", "", "the upstream's API key (default $UPSTREAM_API_KEY)")
	db := flag.String("db", "", "database directory (default: in memory, lost on exit)")
	policy := flag.String("policy", "", "policy file, .toml or .json (default: the shipped Token Plan)")
	estimate := flag.Uint64("estimate-tokens", 4096, "output tokens reserved when a request gives no max_tokens (at least 1)")
	lease := flag.Duration("lease", 30*time.Minute, "how long a reservation holds (at most 24h): above the longest stream served, which is otherwise charged by a usage correction")
	var passThrough routes
	flag.Var(&passThrough, "pass-through", `a route to proxy unmetered besides the default ones (`+
		strings.Join(gateway.DefaultPassThrough, ", ")+`), "METHOD /path", a segment "*" for any one segment: only one that costs nothing upstream and shows nothing of other users; repeatable`)
	health := flag.String("health", "", "a path answered without a key with the engine's health (200, or 503 naming what failed), for a load balancer, e.g. /healthz; not a metered or pass-through route (default: none)")
	var keys demoKeys
	flag.Var(&keys, "demo-key", "create a key for the demo, KEY:PLAN (e.g. tp-demo:Starter; PLAN payg for pay-as-you-go); repeatable")
	flag.Parse()
	if *upstreamKey == "" {
		*upstreamKey = os.Getenv("UPSTREAM_API_KEY")
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	if err := run(*listen, *upstream, *upstreamKey, *db, *policy, *estimate, *lease, passThrough, *health, keys, stop, nil); err != nil {
		log.Fatalf("tally-gateway: %v", err)
	}
}

// run serves until stop delivers a signal, then drains the calls in flight (up to 30 s) and
// closes the engine; ready, if not nil, is told the address it listens on. passThrough adds to
// gateway.DefaultPassThrough; health is the health path ("": none).
func run(listen, upstream, upstreamKey, db, policy string, estimate uint64, lease time.Duration,
	passThrough []string, health string, keys demoKeys, stop <-chan os.Signal, ready func(addr string)) error {
	// The engine's bound on a lease (TALLY_MAX_LEASE_MS), in whole milliseconds: refused here,
	// not at every reserve.
	if lease <= 0 || lease > maxLease || lease%time.Millisecond != 0 {
		return fmt.Errorf("-lease: want whole milliseconds, more than 0 and at most %s, got %s", maxLease, lease)
	}
	// The engine's bound on a quantity: the estimate has the prompt's tokens (at least one)
	// added to it, and one past the bound fails every call that names no maximum. 0 would hold
	// none of what the model writes (and Config reads it as its default, 4096, not as 0): refused,
	// as the Python middleware's default_max_tokens=0 is.
	if estimate == 0 || estimate >= tally.MaxQuantity {
		return fmt.Errorf("-estimate-tokens: want at least 1 and less than %d, the engine's largest quantity, got %d", uint64(tally.MaxQuantity), estimate)
	}
	upstreamURL, err := url.Parse(upstream)
	if err != nil || upstreamURL.Scheme == "" || upstreamURL.Host == "" {
		return fmt.Errorf("-upstream: want an absolute URL, got %q", upstream)
	}
	var options []tally.Option
	if policy != "" {
		options = append(options, tally.WithPolicyFile(policy))
	}
	var engine *tally.Engine
	if db == "" {
		engine, err = tally.OpenInMemory(options...)
	} else {
		engine, err = tally.Open(db, options...)
	}
	if err != nil {
		return err
	}
	defer func() {
		if err := engine.Close(); err != nil {
			log.Printf("tally-gateway: close: %v", err)
		}
	}()
	for _, key := range keys {
		if err := seedKey(engine, key); err != nil {
			return err
		}
	}
	handler, err := gateway.New(gateway.Config{Engine: engine, Upstream: upstreamURL,
		UpstreamKey: upstreamKey, EstimateTokens: estimate, Lease: lease,
		PassThrough: append(append([]string(nil), gateway.DefaultPassThrough...), passThrough...),
		HealthPath:  health})
	if err != nil {
		// The lease and the estimate are checked above: what is left is an entry, or the
		// health path (checked after the entries, and named by its error).
		option := "-pass-through"
		if strings.HasPrefix(err.Error(), "gateway: HealthPath ") {
			option = "-health"
		}
		return fmt.Errorf("%s: %w", option, err)
	}
	server := &http.Server{Addr: listen, Handler: handler, ReadHeaderTimeout: 30 * time.Second}
	listener, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	if ready != nil {
		ready(listener.Addr().String())
	}
	// Closed once Shutdown has drained the calls in flight (their reservations settled or
	// voided): Serve returns as soon as Shutdown starts, and the engine must not be closed
	// under calls still settling.
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		<-stop
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := server.Shutdown(ctx); err != nil {
			log.Printf("tally-gateway: shutdown: %v", err)
		}
	}()
	// Redacted: a password in the upstream's URL (https://user:password@host) stays out of the
	// log, which more people read than the secret is meant for.
	log.Printf("tally-gateway: listening on %s, proxying to %s (library %s)", listener.Addr(), upstreamURL.Redacted(), tally.LibraryVersion())
	if err := server.Serve(listener); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	<-drained
	return nil
}

// seedKey creates the user "demo-KEY" with KEY on PLAN in their Default Team. A user that
// exists (a reopened database) keeps their key, and is given PLAN's seat again: a changed flag
// changes the seat. A KEY that is another user's fails the seat, naming the flag.
func seedKey(engine *tally.Engine, spec string) error {
	key, plan, ok := strings.Cut(spec, ":")
	if !ok || key == "" || plan == "" {
		return fmt.Errorf("-demo-key: want KEY:PLAN, got %q", spec)
	}
	user := "demo-" + key
	if strings.EqualFold(plan, "payg") {
		if err := engine.CreateUser(user, key+"-plan", time.Time{}); err != nil && !errors.Is(err, tally.ErrAlreadyExists) {
			return err
		}
		if err := engine.CreatePaygKey(user, key, time.Time{}); err != nil && !errors.Is(err, tally.ErrAlreadyExists) {
			return err
		}
		return nil
	}
	if err := engine.CreateUser(user, key, time.Time{}); err != nil && !errors.Is(err, tally.ErrAlreadyExists) {
		return err
	}
	if err := engine.AssignSeat("@"+user, user, plan, time.Time{}); err != nil {
		return fmt.Errorf("-demo-key %s: %w", spec, err)
	}
	return nil
}
