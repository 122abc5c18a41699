package main

import (
	"cmp"
	"context"
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// Issue 8's parts run on each module against one Nginx, one relay and 100
// EventSource subscribers. They use a RabbitMQ vhost of their own: the
// poison storm dead-letters thousands of messages into pushrelay.dead,
// which the integration tests, sharing the broker, expect to hold only
// their own.

type moduleOptions struct {
	vhost         string
	spread        int // channels, and subscribers
	poisonRate    int // valid msg/s
	poisonStorm   int // poison msg/s beside them
	hotRate       int
	hotBacklog    int
	socketBacklog int
	socketRounds  int
	rounds        int
	relayLog      bool
}

func (o *moduleOptions) flags() {
	flag.StringVar(&o.vhost, "vhost", "pushrelay-bench", "RabbitMQ vhost of the per-module parts (created with rabbitmqctl if missing)")
	flag.IntVar(&o.spread, "spread", 100, "channels (and subscribers) of the per-module parts")
	flag.IntVar(&o.poisonRate, "poison-rate", 3000, "(f) valid msg/s")
	flag.IntVar(&o.poisonStorm, "poison-storm", 600, "(f) poison msg/s beside them")
	flag.IntVar(&o.hotRate, "hot-rate", 1000, "(hot) msg/s on the one channel, and over -spread channels")
	flag.IntVar(&o.hotBacklog, "hot-backlog", 20_000, "(hot) messages in the backlog drained")
	flag.IntVar(&o.socketBacklog, "socket-backlog", 50_000, "(h) messages in each backlog drained")
	flag.BoolVar(&o.relayLog, "relay-log", false, "diagnostic: print each module's relay log to stderr at the end")
	flag.IntVar(&o.socketRounds, "socket-rounds", 2, "(h) drains per transport, in ABBA order")
	flag.IntVar(&o.rounds, "rounds", 3, "(f), (g), (hot): each latency run is this many rounds of -duration/rounds, its conditions in rotation; figures are the median round's")
}

// moduleResult is one module's figures; skipped says why there are none.
type moduleResult struct {
	module  stack.Module
	skipped string
	blocked time.Duration // RabbitMQ blocked the producer this long during the parts
	socket  []socketDrain
	ladder  []ladderStep
	poison  *poisonResult
	hot     *hotResult
}

type socketDrain struct {
	transport, url string
	drain
}

type ladderStep struct {
	rate                         int
	relay, floorAMQP, floorNginx rounds
}

type poisonResult struct {
	clean, storm rounds
	deadLettered float64 // by the relay during the storm
}

type hotResult struct {
	hot, spread           rounds
	hotDrain, spreadDrain drain
}

// moduleBench is what the parts share on one module.
type moduleBench struct {
	o        options
	ngx      *stack.Nginx
	b        *broker
	amqpURL  string // the vhost's
	exchange string
	relay    *stack.Relay
	cfg      stack.RelayConfig
	sock     string // the Unix-socket publisher
	spread   workload
}

func runModule(ctx context.Context, o options, m stack.Module) (res moduleResult, err error) {
	res.module = m
	if _, err := m.Nginx(); err != nil {
		progress("%s: skipped: %v", m, err)
		res.skipped = err.Error()
		return res, nil
	}
	mb, cleanup, err := startModule(o, m)
	if err != nil {
		return res, err
	}
	defer cleanup()
	// res is the named result, so this lands in what is returned.
	defer func() { res.blocked = mb.b.blockedFor() }()
	if o.perModule.relayLog {
		defer func() { fmt.Fprint(os.Stderr, mb.relay.Log()) }()
	}
	if o.parts["socket"] {
		if res.socket, err = mb.socketDrains(ctx); err != nil {
			return res, err
		}
	}
	if !o.parts["ladder"] && !o.parts["poison"] && !o.parts["hot"] {
		return res, nil
	}
	if err := mb.live(ctx, &res); err != nil {
		return res, err
	}
	if o.parts["hot"] {
		err = mb.hotDrains(ctx, res.hot)
	}
	return res, err
}

// live runs the latency parts with the relay running and the subscribers
// connected.
func (mb *moduleBench) live(ctx context.Context, res *moduleResult) error {
	if err := mb.relay.Start(); err != nil {
		return err
	}
	defer mb.relay.Stop()
	subs, err := subscribeAll(ctx, mb.ngx, mb.spread.channels)
	if err != nil {
		return err
	}
	defer subs.close()
	// Warm up: the first messages create the module's channels and the
	// relay's connections; no part should pay for that.
	if _, err := latencyRun(ctx, mb.traffic(mb.spread), subs, 1000, time.Second, mb.relay); err != nil {
		return err
	}
	if mb.o.parts["ladder"] {
		if res.ladder, err = mb.ladder(ctx, subs); err != nil {
			return err
		}
	}
	if mb.o.parts["poison"] {
		if res.poison, err = mb.poisonStorm(ctx, subs); err != nil {
			return err
		}
	}
	if mb.o.parts["hot"] {
		res.hot, err = mb.hotLatency(ctx, subs)
	}
	return err
}

func startModule(o options, m stack.Module) (*moduleBench, func(), error) {
	var undo []func()
	cleanup := func() {
		for _, f := range slices.Backward(undo) {
			f()
		}
	}
	fail := func(err error) (*moduleBench, func(), error) { cleanup(); return nil, func() {}, err }
	dir, err := os.MkdirTemp("", "pushrelay-bench-"+string(m))
	if err != nil {
		return fail(err)
	}
	undo = append(undo, func() { os.RemoveAll(dir) })
	mb := &moduleBench{o: o, sock: filepath.Join(dir, "pub.sock"), spread: newWorkload(o.perModule.spread, 200)}
	port, err := stack.FreePort()
	if err != nil {
		return fail(err)
	}
	// The shipped publisher server, listening on both transports (h): the
	// first address is the one PublishURL names.
	publisher := []string{fmt.Sprintf("127.0.0.1:%d", port), "unix:" + mb.sock}
	if mb.ngx, err = stack.StartNginx(stack.NginxOptions{Module: m, Dir: dir, Workers: o.workers, Publisher: publisher}); err != nil {
		return fail(err)
	}
	undo = append(undo, mb.ngx.Stop)
	if mb.amqpURL, err = benchVhost(o.amqpURL, o.perModule.vhost); err != nil {
		return fail(err)
	}
	if mb.b, err = dialBroker(mb.amqpURL); err != nil {
		return fail(err)
	}
	undo = append(undo, mb.b.close)
	mb.exchange = fmt.Sprintf("pushrelay.bench.%s.%d", m, time.Now().Unix())
	mb.cfg = stack.RelayConfig{
		Host: "bench-" + string(m), AMQPURL: mb.amqpURL, Exchange: mb.exchange, Publish: mb.ngx.PublishURL(),
		Dialect: m.Dialect(), Prefetch: o.prefetch, Connections: o.lanes, Pipeline: o.pipeline,
	}
	undo = append(undo, func() {
		mb.b.cleanup(mb.exchange, "pushrelay."+mb.cfg.Host, floorQueue, "pushrelay.dead")
	})
	if mb.relay, err = stack.NewRelay(o.bin, dir, mb.cfg); err != nil {
		return fail(err)
	}
	return mb, cleanup, nil
}

// floorQueue is the AMQP floor's queue, in the bench vhost.
const floorQueue = "pushrelay.bench-floor"

// (h): the same backlog over TCP loopback and over a Unix socket, in ABBA
// order (TCP, Unix, Unix, TCP, …) so that neither gets the warmer or the
// quieter machine; each transport's figures are over all its rounds.
func (mb *moduleBench) socketDrains(ctx context.Context) ([]socketDrain, error) {
	out := []socketDrain{
		{transport: "TCP loopback", url: mb.ngx.PublishURL()},
		{transport: "Unix socket", url: "http://unix:" + mb.sock + ":/pub?id={channel}"},
	}
	n := mb.o.perModule.socketBacklog
	for round := 0; round < mb.o.perModule.socketRounds; round++ {
		for i := range out {
			t := &out[(i+round)%2]
			progress("(h) %s: relay draining a %d-message backlog over %s", mb.ngx.Module, n, t.transport)
			d, err := mb.drain(ctx, t.url, mb.spread, n)
			if err != nil {
				return nil, fmt.Errorf("(h) %s: %w", t.transport, err)
			}
			t.drain = t.drain.plus(d)
		}
	}
	return out, nil
}

// drain has the relay, publishing to url, drain a backlog of n messages of
// w, counting Nginx's CPU too. The relay goes back to the TCP URL after.
func (mb *moduleBench) drain(ctx context.Context, url string, w workload, n int) (drain, error) {
	cfg := mb.cfg
	cfg.Publish = url
	if err := mb.relay.WriteConfig(cfg); err != nil {
		return drain{}, err
	}
	defer mb.relay.WriteConfig(mb.cfg)
	return drainBacklog(ctx, mb.relay, mb.b, mb.exchange, w, n, nginxPids(mb.ngx.Pid()))
}

// (g): at each rate, the relay, the AMQP floor and the Nginx floor.
func (mb *moduleBench) ladder(ctx context.Context, subs *subscribers) ([]ladderStep, error) {
	amqpFloor, err := startAMQPFloor(mb.b, mb.amqpURL, floorQueue, mb.o.prefetch)
	if err != nil {
		return nil, err
	}
	defer amqpFloor.close()
	nginxFloor := newNginxFloor(mb.ngx, mb.o.lanes)
	var out []ladderStep
	for _, rate := range mb.o.rates {
		progress("(g) %s: %d msg/s, %s: relay, AMQP floor, Nginx floor", mb.ngx.Module, rate, mb.roundsText())
		d := mb.roundLength()
		r, err := mb.rotate(
			func() (latencyResult, error) {
				return latencyRun(ctx, mb.traffic(mb.spread), subs, rate, d, mb.relay)
			},
			func() (latencyResult, error) { return floorResult(amqpFloor.run(ctx, mb.b, mb.spread, rate, d)) },
			func() (latencyResult, error) { return floorResult(nginxFloor.run(ctx, subs, mb.spread, rate, d)) },
		)
		if err != nil {
			return nil, err
		}
		out = append(out, ladderStep{rate: rate, relay: r[0], floorAMQP: r[1], floorNginx: r[2]})
	}
	return out, nil
}

// floorResult is a floor's run as a latencyResult, with no relay figures.
func floorResult(s stream, err error) (latencyResult, error) { return latencyResult{stream: s}, err }

func (mb *moduleBench) traffic(w workload) traffic {
	return traffic{b: mb.b, exchange: mb.exchange, w: w}
}

// (f): the valid traffic alone, and with poison beside it.
func (mb *moduleBench) poisonStorm(ctx context.Context, subs *subscribers) (*poisonResult, error) {
	o := mb.o.perModule
	clean := mb.traffic(mb.spread)
	storm := clean
	storm.poisonEvery = o.poisonRate / max(1, o.poisonStorm)
	progress("(f) %s: %d valid msg/s, alone and with %d poison msg/s, %s", mb.ngx.Module, o.poisonRate, o.poisonStorm, mb.roundsText())
	dead0 := mb.relay.Metric(deadLetteredInvalid)
	r, err := mb.rotate(mb.latencyRun(ctx, clean, subs, o.poisonRate), mb.latencyRun(ctx, storm, subs, o.poisonRate))
	if err != nil {
		return nil, err
	}
	return &poisonResult{clean: r[0], storm: r[1], deadLettered: mb.relay.Metric(deadLetteredInvalid) - max(0, dead0)}, nil
}

const deadLetteredInvalid = `pushrelay_messages_dead_lettered_total{reason="invalid_channel"}`

// (hot), live: the rate on one channel, and spread over the subscribers'.
func (mb *moduleBench) hotLatency(ctx context.Context, subs *subscribers) (*hotResult, error) {
	rate := mb.o.perModule.hotRate
	progress("(hot) %s: %d msg/s on one channel, and over %d, %s", mb.ngx.Module, rate, len(mb.spread.channels), mb.roundsText())
	r, err := mb.rotate(mb.latencyRun(ctx, mb.traffic(newWorkload(1, 200)), subs, rate), mb.latencyRun(ctx, mb.traffic(mb.spread), subs, rate))
	if err != nil {
		return nil, err
	}
	return &hotResult{hot: r[0], spread: r[1]}, nil
}

// latencyRun is one round of t through the relay.
func (mb *moduleBench) latencyRun(ctx context.Context, t traffic, subs *subscribers, rate int) func() (latencyResult, error) {
	return func() (latencyResult, error) { return latencyRun(ctx, t, subs, rate, mb.roundLength(), mb.relay) }
}

func (mb *moduleBench) roundLength() time.Duration {
	return (mb.o.duration / time.Duration(max(1, mb.o.perModule.rounds))).Round(time.Millisecond)
}

func (mb *moduleBench) roundsText() string {
	return fmt.Sprintf("%d rounds of %s", max(1, mb.o.perModule.rounds), mb.roundLength())
}

// rounds are one condition's runs, sorted by p99.
type rounds []latencyResult

func (r rounds) median() latencyResult { return r[len(r)/2] }

func (r rounds) worst() latencyResult { return r[len(r)-1] }

// got is "received/sent" over all rounds.
func (r rounds) got() string {
	var all stream
	for _, l := range r {
		all.received += l.received
		all.sent += l.sent
	}
	return all.got()
}

// rotate runs each condition -rounds times, round i starting at condition
// i mod len(runs) (ABC, BCA, CAB, …): a stall of the shared machine then
// spoils one round of a condition, which the median leaves out, and no
// condition always runs first. Each condition's rounds come back sorted by
// p99.
func (mb *moduleBench) rotate(runs ...func() (latencyResult, error)) ([]rounds, error) {
	out := make([]rounds, len(runs))
	for i := 0; i < max(1, mb.o.perModule.rounds); i++ {
		for j := range runs {
			k := (i + j) % len(runs)
			l, err := runs[k]()
			if err != nil {
				return nil, err
			}
			out[k] = append(out[k], l)
		}
	}
	for _, r := range out {
		slices.SortFunc(r, func(a, b latencyResult) int { return cmp.Compare(a.p99, b.p99) })
	}
	return out, nil
}

// (hot), drained: a one-channel backlog, then one spread over the channels.
func (mb *moduleBench) hotDrains(ctx context.Context, res *hotResult) error {
	n := mb.o.perModule.hotBacklog
	progress("(hot) %s: relay draining a %d-message backlog on one channel, then over %d", mb.ngx.Module, n, len(mb.spread.channels))
	var err error
	if res.hotDrain, err = mb.drain(ctx, mb.cfg.Publish, newWorkload(1, 200), n); err != nil {
		return err
	}
	res.spreadDrain, err = mb.drain(ctx, mb.cfg.Publish, mb.spread, n)
	return err
}

// benchVhost creates vhost, if missing, with the URL's user allowed
// everything on it, and returns the URL pointing at it.
func benchVhost(amqpURL, vhost string) (string, error) {
	u, err := url.Parse(amqpURL)
	if err != nil {
		return "", err
	}
	out, err := exec.Command("rabbitmqctl", "-q", "list_vhosts", "name").Output()
	if err != nil {
		return "", fmt.Errorf("rabbitmqctl list_vhosts (the per-module parts need a vhost of their own, -vhost): %w", err)
	}
	if !slices.Contains(strings.Fields(string(out)), vhost) {
		progress("creating RabbitMQ vhost %s", vhost)
		if out, err := exec.Command("rabbitmqctl", "add_vhost", vhost).CombinedOutput(); err != nil {
			return "", fmt.Errorf("rabbitmqctl add_vhost %s: %v\n%s", vhost, err, out)
		}
	}
	user := u.User.Username()
	if out, err := exec.Command("rabbitmqctl", "set_permissions", "-p", vhost, user, ".*", ".*", ".*").CombinedOutput(); err != nil {
		return "", fmt.Errorf("rabbitmqctl set_permissions -p %s %s: %v\n%s", vhost, user, err, out)
	}
	u.Path, u.RawPath = "/"+vhost, ""
	return u.String(), nil
}
