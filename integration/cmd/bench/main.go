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
// Bodies are 200 bytes over 1000 channels. Run it with `make bench`.
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
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "rawconsume" {
		os.Exit(rawConsumeMain(os.Args[2:]))
	}
	var o options
	var rates string
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
	flag.Parse()
	for _, r := range strings.Split(rates, ",") {
		if r == "" {
			continue
		}
		var v int
		fmt.Sscan(r, &v)
		o.rates = append(o.rates, v)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func run(ctx context.Context, o options) error {
	dir, err := os.MkdirTemp("", "pushrelay-bench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	rep := newReport(o)

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
	exchange := fmt.Sprintf("pushrelay.bench.%d", time.Now().Unix())
	const host = "bench"
	relayQueue, rawQueue := "pushrelay."+host, "pushrelay.bench-raw"
	defer b.cleanup(exchange, relayQueue, rawQueue)
	msgs := newWorkload(o.channels, 200)

	if o.backlog == 0 {
		return latencyOnly(ctx, o, ngx, b, exchange, dir, msgs)
	}
	// (a) the raw consumer, on a queue with the same arguments as the
	// relay's and the same messages.
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

	// (b) the relay. A first start declares its queue and bindings; it is
	// stopped while the backlog is published and started again to drain.
	relay, err := stack.NewRelay(o.bin, dir, stack.RelayConfig{
		Host: host, AMQPURL: o.amqpURL, Exchange: exchange, Publish: cmp.Or(o.publisher, ngx.PublishURL()),
		Prefetch: o.prefetch, Connections: o.lanes, Pipeline: o.pipeline,
	})
	if err != nil {
		return err
	}
	if err := relay.Start(); err != nil {
		return err
	}
	relay.Stop()
	progress("(b) publishing a %d-message backlog for the relay", o.backlog)
	if err := b.publishBacklog(ctx, exchange, routingKey, msgs, o.backlog); err != nil {
		return err
	}
	progress("(b) relay draining it into Nginx")
	drained, err := drainWithRelay(ctx, relay, o.backlog)
	if err != nil {
		return err
	}
	rep.relay = drained

	// (d) latency with live subscribers; the relay keeps running.
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
		lr, err := latencyRun(ctx, b, exchange, msgs, subs, rate, o.duration, relay)
		if err != nil {
			return err
		}
		rep.latency = append(rep.latency, lr)
	}

	// (e) allocations on the publish path.
	progress("(e) go test -bench BenchmarkPublish -benchmem ./sidecar/publish/")
	rep.allocs = benchAllocs()

	text := rep.String()
	fmt.Print(text)
	if o.out != "" {
		return os.WriteFile(o.out, []byte(text), 0o644)
	}
	return nil
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
		l, err := latencyRun(ctx, b, exchange, w, subs, rate, o.duration, relay)
		if err != nil {
			return err
		}
		fmt.Printf("%d msg/s: sent %d received %d p50 %.2f ms p99 %.2f ms max %.2f ms relay %.2f cores; publish→Nginx p50 ≤ %g ms p99 ≤ %g ms\n",
			rate, l.sent, l.received, ms(l.p50), ms(l.p99), ms(l.max), l.relayCPU, l.lagP50*1000, l.lagP99*1000)
	}
	return nil
}
