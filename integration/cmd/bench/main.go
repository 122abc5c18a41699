// Command bench measures the relay against the limit of this machine, in
// one run, and prints figures and ratios (it asserts nothing):
//
//	(a) a minimal batch-acking AMQP consumer draining a 200k backlog: the
//	    rate RabbitMQ can deliver here, the ceiling for any relay;
//	(b) the relay draining the same backlog into Nginx + Nchan, and b/a;
//	(c) CPU seconds per message of the relay process and of the raw
//	    consumer (from /proc), and their ratio;
//	(d) end-to-end latency, publish → EventSource subscriber, with 1000
//	    live subscribers, at 2k, 5k and 10k msg/s: p50, p99, max;
//	(e) allocations per message on the publish path (go test -bench).
//
// Bodies are 200 bytes over 1000 channels. Then, on each module of
// -modules (Nchan, Push Stream), issue 8's parts, over 100 channels on a
// vhost of their own (modules.go):
//
//	(f) poison storm: the valid messages' p99 with and without poison
//	    messages beside them;
//	(g) a latency ladder: the relay's p50/p99 at each rate beside the AMQP
//	    floor and the Nginx floor measured in the same run (floors.go);
//	(h) TCP loopback against a Unix socket between relay and Nginx: CPU
//	    per message of the relay and of Nginx draining the same backlog;
//	(hot) one hot channel against the same rate spread over 100 channels.
//
// Then the queues part (queues.go: classic against quorum), the dedupe
// part (dedupe.go: the guard against duplicates on and off) and the
// failover part (failover.go: what broker faults cost on a cluster).
//
// -parts selects what runs. Run it with `make bench`.
package main

import (
	"cmp"
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/pushrelay/pushrelay/integration/stack"
)

type options struct {
	amqpURL  string
	bin      string
	backlog  int
	channels int
	rates    []int
	duration time.Duration
	prefetch int
	lanes    int
	pipeline int
	workers  int
	// publisher replaces Nginx in the drain, to see what bounds it.
	publisher string
	out       string
	parts     map[string]bool
	modules   []stack.Module
	perModule moduleOptions
}

// allParts are -parts' names, in the order they run.
const allParts = "drain,latency,allocs,socket,ladder,poison,hot,queues,dedupe,failover"

func main() {
	if len(os.Args) > 1 && os.Args[1] == "rawconsume" {
		os.Exit(rawConsumeMain(os.Args[2:]))
	}
	var o options
	var rates, parts, modules string
	flag.StringVar(&o.amqpURL, "amqp", "amqp://guest:guest@127.0.0.1:5672/", "RabbitMQ URL")
	flag.StringVar(&o.bin, "bin", envOr("PUSHRELAY_BIN", "bin/pushrelay"), "pushrelay binary")
	flag.IntVar(&o.backlog, "backlog", 200_000, "messages in the drain backlog")
	flag.IntVar(&o.channels, "channels", 1000, "channels (and live subscribers)")
	flag.StringVar(&rates, "rates", "2000,5000,10000", "offered rates for the latency runs, msg/s")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "length of each latency run")
	flag.IntVar(&o.prefetch, "prefetch", 2048, "prefetch of both the relay and the raw consumer")
	flag.IntVar(&o.lanes, "connections", 8, "the relay's publisher connections (lanes); 8 as shipped")
	flag.IntVar(&o.pipeline, "pipeline", 16, "the relay's requests in flight per connection")
	flag.IntVar(&o.workers, "nginx-workers", 2, "Nginx worker processes")
	flag.StringVar(&o.publisher, "publisher", "", "diagnostic: drain into this publish URL instead of the bench's Nginx")
	flag.StringVar(&o.out, "out", "", "also write the report (markdown) to this file")
	flag.StringVar(&parts, "parts", allParts, "what to run: drain (a-c), latency (d), allocs (e), and on each module socket (h), ladder (g), poison (f), hot, queues (classic vs quorum, one node) and dedupe (push.dedupe on vs off), failover (TestCluster's figures)")
	flag.StringVar(&modules, "modules", "nchan,pushstream", "modules for socket, ladder, poison and hot")
	o.perModule.flags()
	flag.Parse()
	for _, r := range list(rates) {
		var v int
		fmt.Sscan(r, &v)
		o.rates = append(o.rates, v)
	}
	o.parts = map[string]bool{}
	for _, p := range list(parts) {
		if !slices.Contains(list(allParts), p) {
			fmt.Fprintf(os.Stderr, "bench: -parts: unknown part %q (want some of %s)\n", p, allParts)
			os.Exit(2)
		}
		o.parts[p] = true
	}
	for _, m := range list(modules) {
		o.modules = append(o.modules, stack.Module(m))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// list splits a comma-separated flag value, skipping empty items.
func list(s string) []string {
	var out []string
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return out
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func run(ctx context.Context, o options) error {
	rep := newReport(o)
	if o.parts["drain"] || o.parts["latency"] || o.parts["allocs"] {
		if err := runRelayParts(ctx, o, rep); err != nil {
			return err
		}
	}
	if o.parts["socket"] || o.parts["ladder"] || o.parts["poison"] || o.parts["hot"] {
		for _, m := range o.modules {
			res, err := runModule(ctx, o, m)
			if err != nil {
				return fmt.Errorf("%s: %w", m, err)
			}
			rep.modules = append(rep.modules, res)
		}
	}
	text := rep.String()
	if o.parts["queues"] { // queues.go
		q, err := queueTypesPart(ctx, o)
		if err != nil {
			return fmt.Errorf("queues: %w", err)
		}
		text += q
	}
	if o.parts["dedupe"] { // dedupe.go
		d, err := dedupePart(ctx, o)
		if err != nil {
			return fmt.Errorf("dedupe: %w", err)
		}
		text += d
	}
	if o.parts["failover"] { // failover.go
		f, err := failoverPart(ctx, o)
		if err != nil {
			return fmt.Errorf("failover: %w", err)
		}
		text += f
	}
	fmt.Print(text)
	if o.out != "" {
		return os.WriteFile(o.out, []byte(text), 0o644)
	}
	return nil
}

// runRelayParts is (a) to (e), on Nginx + Nchan.
func runRelayParts(ctx context.Context, o options, rep *report) error {
	dir, err := os.MkdirTemp("", "pushrelay-bench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	ngx, err := stack.StartNginx(stack.NginxOptions{Dir: dir, Workers: o.workers})
	if err != nil {
		return err
	}
	defer ngx.Stop()

	b, err := dialBroker(o.amqpURL)
	if err != nil {
		return err
	}
	defer b.close()
	defer func() { rep.blocked = b.blockedFor() }()
	exchange := fmt.Sprintf("pushrelay.bench.%d", time.Now().Unix())
	const host = "bench"
	relayQueue, rawQueue := "pushrelay."+host, "pushrelay.bench-raw"
	defer b.cleanup(exchange, relayQueue, rawQueue)
	msgs := newWorkload(o.channels, 200)

	if o.backlog == 0 {
		return latencyOnly(ctx, o, ngx, b, exchange, dir, msgs)
	}
	relay, err := stack.NewRelay(o.bin, dir, stack.RelayConfig{
		Host: host, AMQPURL: o.amqpURL, Exchange: exchange, Publish: cmp.Or(o.publisher, ngx.PublishURL()),
		Prefetch: o.prefetch, Connections: o.lanes, Pipeline: o.pipeline,
	})
	if err != nil {
		return err
	}
	if o.parts["drain"] {
		if err := drainParts(ctx, o, b, relay, exchange, rawQueue, msgs, rep); err != nil {
			return err
		}
	}

	// (d) latency with live subscribers; the relay keeps running.
	if o.parts["latency"] {
		if err := relay.Start(); err != nil {
			return err
		}
		defer relay.Stop()
		subs, err := subscribeAll(ctx, ngx, msgs.channels)
		if err != nil {
			return err
		}
		defer subs.close()
		for _, rate := range o.rates {
			progress("(d) %d msg/s for %s with %d EventSource subscribers", rate, o.duration, len(msgs.channels))
			lr, err := latencyRun(ctx, traffic{b: b, exchange: exchange, w: msgs}, subs, rate, o.duration, relay)
			if err != nil {
				return err
			}
			rep.latency = append(rep.latency, lr)
		}
	}

	// (e) allocations on the publish path.
	if o.parts["allocs"] {
		progress("(e) go test -bench BenchmarkPublish -benchmem ./sidecar/publish/")
		rep.allocs = benchAllocs()
	}
	return nil
}

// drainParts are (a) the raw consumer, on a queue with the same arguments
// as the relay's and the same messages, and (b) the relay draining the
// same backlog.
func drainParts(ctx context.Context, o options, b *broker, relay *stack.Relay, exchange, rawQueue string, msgs workload, rep *report) error {
	progress("(a) publishing a %d-message backlog for the raw consumer", o.backlog)
	if err := b.declareLike(rawQueue); err != nil {
		return err
	}
	if err := b.publishBacklog(ctx, "", func(string) string { return rawQueue }, msgs, o.backlog); err != nil {
		return err
	}
	progress("(a) raw consumer draining it")
	raw, err := runRawConsumer(ctx, o, rawQueue)
	if err != nil {
		return err
	}
	rep.raw = raw
	progress("(b) relay draining a %d-message backlog into Nginx", o.backlog)
	rep.relay, err = drainBacklog(ctx, relay, b, exchange, msgs, o.backlog, nil)
	return err
}

func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s  "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}

// benchAllocs runs the publish-path micro-benchmark and returns its line.
func benchAllocs() string {
	cmd := exec.Command("go", "test", "-run", "^$", "-bench", "BenchmarkPublish$", "-benchmem", "-count", "1", "./sidecar/publish/")
	cmd.Dir = stack.RepoRoot()
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Sprintf("go test failed: %v\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "BenchmarkPublish") {
			return strings.Join(strings.Fields(line), " ")
		}
	}
	return string(out)
}

// selfPath is this binary, for re-running it as the raw consumer.
func selfPath() string {
	p, err := os.Executable()
	if err != nil {
		return os.Args[0]
	}
	return filepath.Clean(p)
}

// latencyOnly is -backlog 0: just the latency runs, for quick iterations.
func latencyOnly(ctx context.Context, o options, ngx *stack.Nginx, b *broker, exchange, dir string, w workload) error {
	relay, err := stack.NewRelay(o.bin, dir, stack.RelayConfig{
		Host: "bench", AMQPURL: o.amqpURL, Exchange: exchange, Publish: ngx.PublishURL(),
		Prefetch: o.prefetch, Connections: o.lanes, Pipeline: o.pipeline,
	})
	if err != nil {
		return err
	}
	if err := relay.Start(); err != nil {
		return err
	}
	defer relay.Stop()
	defer b.cleanup(exchange, "pushrelay.bench")
	subs, err := subscribeAll(ctx, ngx, w.channels)
	if err != nil {
		return err
	}
	defer subs.close()
	for _, rate := range o.rates {
		l, err := latencyRun(ctx, traffic{b: b, exchange: exchange, w: w}, subs, rate, o.duration, relay)
		if err != nil {
			return err
		}
		fmt.Printf("%d msg/s: sent %d received %d p50 %.2f ms p99 %.2f ms max %.2f ms relay %.2f cores; publish→Nginx p50 ≤ %g ms p99 ≤ %g ms\n",
			rate, l.sent, l.received, ms(l.p50), ms(l.p99), ms(l.max), l.relayCPU, l.lagP50*1000, l.lagP99*1000)
	}
	return nil
}
