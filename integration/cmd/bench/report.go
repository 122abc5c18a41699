package main

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"time"
)

type report struct {
	o       options
	raw     drain
	relay   drain
	latency []latencyResult
	allocs  string
}

func newReport(o options) *report { return &report{o: o} }

func (r *report) String() string {
	var b strings.Builder
	host, _ := os.Hostname()
	fmt.Fprintf(&b, "\n### make bench — %s, %s, %d CPUs (%s)\n\n", time.Now().UTC().Format("2006-01-02 15:04 MST"), host, runtime.NumCPU(), runtime.GOARCH)
	fmt.Fprintf(&b, "Backlog %d messages of 200 B over %d channels; prefetch %d; relay: %d lanes, pipeline %d, Nchan dialect; Nginx: %d workers.\n\n",
		r.o.backlog, r.o.channels, r.o.prefetch, r.o.lanes, r.o.pipeline, r.o.workers)
	fmt.Fprintf(&b, "| | msg/s | CPU µs/msg |\n|---|---:|---:|\n")
	fmt.Fprintf(&b, "| (a) raw AMQP consumer (batch acks), the ceiling | %.0f | %.1f |\n", r.raw.rate(), us(r.raw.cpuPerMsg()))
	fmt.Fprintf(&b, "| (b) pushrelay → Nginx + Nchan | %.0f | %.1f |\n\n", r.relay.rate(), us(r.relay.cpuPerMsg()))
	fmt.Fprintf(&b, "- (b/a) throughput ratio: **%.2f** (target ≥ 0.9)\n", r.relay.rate()/r.raw.rate())
	fmt.Fprintf(&b, "- (c) CPU per message, relay / raw consumer: **%.2f** (target ≤ 1.5)\n\n",
		float64(r.relay.cpuPerMsg())/float64(r.raw.cpuPerMsg()))
	fmt.Fprintf(&b, "(d) publish → EventSource subscriber, %d live subscribers, %s per rate:\n\n", r.o.channels, r.o.duration)
	fmt.Fprintf(&b, "| offered msg/s | sent | received | p50 ms | p99 ms | max ms | publish→Nginx p50 / p99 ms (relay histogram) | relay CPU (cores) |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, l := range r.latency {
		fmt.Fprintf(&b, "| %d | %d | %d | %.2f | %.2f | %.2f | ≤ %g / ≤ %g | %.2f |\n", l.offered, l.sent, l.received,
			ms(l.p50), ms(l.p99), ms(l.max), l.lagP50*1000, l.lagP99*1000, l.relayCPU)
	}
	fmt.Fprintf(&b, "\n(e) publish path: `%s`\n", r.allocs)
	return b.String()
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1e3 }
