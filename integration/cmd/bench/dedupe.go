package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// The dedupe part (issue 16) prices the guard against duplicates after a
// reconnect (push.dedupe): every message Nginx takes is remembered, so
// its cost is paid on every message, redelivered or not.
//
//	dedupe: the relay draining the same backlog with push.dedupe on and
//	        off, twice each, interleaved (on, off, on, off) so that the
//	        machine's drift falls on both: drain rate and relay CPU per
//	        message, and their ratios.

// dedupeRun is one drain.
type dedupeRun struct {
	on bool
	d  drain
}

// dedupePart runs the dedupe part and returns its report section.
func dedupePart(ctx context.Context, o options) (string, error) {
	dir, err := os.MkdirTemp("", "pushrelay-bench-dedupe")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(dir)
	ngx, err := stack.StartNginx(stack.NginxOptions{Dir: dir, Workers: o.workers})
	if err != nil {
		return "", err
	}
	defer ngx.Stop()
	b, err := dialBroker(o.amqpURL)
	if err != nil {
		return "", err
	}
	defer b.close()
	msgs := newWorkload(o.channels, 200)
	n := max(o.backlog/2, 1000)
	var runs []dedupeRun
	for i, on := range []bool{true, false, true, false} {
		host := fmt.Sprintf("bench-dedupe-%d", i)
		exchange := fmt.Sprintf("pushrelay.bench.dedupe.%d.%d", i, time.Now().Unix())
		relay, err := stack.NewRelay(o.bin, dir, stack.RelayConfig{
			Host: host, AMQPURL: o.amqpURL, Exchange: exchange, Publish: ngx.PublishURL(),
			Prefetch: o.prefetch, Connections: o.lanes, Pipeline: o.pipeline,
			Push: fmt.Sprintf("dedupe = %v", on),
		})
		if err != nil {
			return "", err
		}
		progress("(dedupe) push.dedupe = %v: relay draining a %d-message backlog", on, n)
		d, err := drainBacklog(ctx, relay, b, exchange, msgs, n, nil)
		b.cleanup(exchange, "pushrelay."+host)
		if err != nil {
			return "", err
		}
		runs = append(runs, dedupeRun{on: on, d: d})
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "(dedupe) the guard against duplicates after a reconnect (push.dedupe), %d messages of 200 B over %d channels per drain, prefetch %d, Nginx + Nchan:\n\n",
		n, o.channels, o.prefetch)
	fmt.Fprintf(&sb, "| push.dedupe | drain msg/s | relay CPU µs/msg |\n|---|---:|---:|\n")
	var on, off drain
	for _, r := range runs {
		fmt.Fprintf(&sb, "| %v | %.0f | %.2f |\n", r.on, r.d.rate(), us(r.d.cpuPerMsg()))
		if r.on {
			on = on.plus(r.d)
		} else {
			off = off.plus(r.d)
		}
	}
	if on.messages > 0 && off.messages > 0 {
		fmt.Fprintf(&sb, "\n- on / off, both runs of each summed: drain rate **%.3f**, relay CPU per message **%.3f**\n\n",
			on.rate()/off.rate(), float64(on.cpuPerMsg())/float64(off.cpuPerMsg()))
	}
	return sb.String(), nil
}
