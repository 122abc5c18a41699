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
	modules []moduleResult
	blocked time.Duration // RabbitMQ blocked the producer this long during (a)-(e)
}

func newReport(o options) *report { return &report{o: o} }

func (r *report) String() string {
	var b strings.Builder
	host, _ := os.Hostname()
	fmt.Fprintf(&b, "\n### make bench — %s, %s, %d CPUs (%s)\n\n", time.Now().UTC().Format("2006-01-02 15:04 MST"), host, runtime.NumCPU(), runtime.GOARCH)
	if r.blocked > 0 {
		fmt.Fprintf(&b, "**RabbitMQ blocked publishers (a resource alarm) for %.1f s during (a)-(e): the runs it overlapped measure the alarm, rerun them.**\n\n", r.blocked.Seconds())
	}
	if r.o.parts["drain"] {
		r.drains(&b)
	}
	if r.o.parts["latency"] {
		r.latencies(&b)
	}
	if r.o.parts["allocs"] {
		fmt.Fprintf(&b, "(e) publish path: `%s`\n\n", r.allocs)
	}
	if len(r.modules) > 0 {
		r.moduleParts(&b)
	}
	return b.String()
}

func (r *report) drains(b *strings.Builder) {
	fmt.Fprintf(b, "Backlog %d messages of 200 B over %d channels; prefetch %d; relay: %d lanes, pipeline %d, Nchan dialect; Nginx: %d workers.\n\n",
		r.o.backlog, r.o.channels, r.o.prefetch, r.o.lanes, r.o.pipeline, r.o.workers)
	fmt.Fprintf(b, "| | msg/s | CPU µs/msg |\n|---|---:|---:|\n")
	fmt.Fprintf(b, "| (a) raw AMQP consumer (batch acks), the ceiling | %.0f | %.1f |\n", r.raw.rate(), us(r.raw.cpuPerMsg()))
	fmt.Fprintf(b, "| (b) pushrelay → Nginx + Nchan | %.0f | %.1f |\n\n", r.relay.rate(), us(r.relay.cpuPerMsg()))
	fmt.Fprintf(b, "- (b/a) throughput ratio: **%.2f** (target ≥ 0.9)\n", r.relay.rate()/r.raw.rate())
	fmt.Fprintf(b, "- (c) CPU per message, relay / raw consumer: **%.2f** (target ≤ 1.5)\n\n",
		float64(r.relay.cpuPerMsg())/float64(r.raw.cpuPerMsg()))
}

func (r *report) latencies(b *strings.Builder) {
	fmt.Fprintf(b, "(d) publish → EventSource subscriber, %d live subscribers, %s per rate:\n\n", r.o.channels, r.o.duration)
	fmt.Fprintf(b, "| offered msg/s | sent | received | p50 ms | p99 ms | max ms | publish→Nginx p50 / p99 ms (relay histogram) | relay CPU (cores) |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, l := range r.latency {
		fmt.Fprintf(b, "| %d | %d | %d | %.2f | %.2f | %.2f | ≤ %g / ≤ %g | %.2f |\n", l.rate, l.sent, l.received,
			ms(l.p50), ms(l.p99), ms(l.max), l.lagP50*1000, l.lagP99*1000, l.relayCPU)
	}
	b.WriteString("\n")
}

// moduleParts prints the per-module parts, one table per part, a row per module.
func (r *report) moduleParts(b *strings.Builder) {
	o := r.o.perModule
	fmt.Fprintf(b, "Per module: %d channels with one EventSource subscriber each, 200 B bodies, vhost %s; relay: %d lanes, pipeline %d, prefetch %d; Nginx: %d workers. Each latency figure is %d rounds of %s with the conditions compared in rotation (ABC, BCA, …): p50 and p99 are the round with the median p99, \"worst\" the worst round's p99, received/sent over all rounds.\n\n",
		o.spread, o.vhost, r.o.lanes, r.o.pipeline, r.o.prefetch, r.o.workers, max(1, o.rounds), (r.o.duration / time.Duration(max(1, o.rounds))).Round(time.Millisecond))
	for _, m := range r.modules {
		if m.skipped != "" {
			fmt.Fprintf(b, "- %s: skipped: %s\n\n", m.module, m.skipped)
		}
		if m.blocked > 0 {
			fmt.Fprintf(b, "- **%s: RabbitMQ blocked publishers (a resource alarm) for %.1f s during these parts: the runs it overlapped measure the alarm, rerun them.**\n\n", m.module, m.blocked.Seconds())
		}
	}
	r.socketTable(b)
	r.ladderTable(b)
	r.poisonTable(b)
	r.hotTable(b)
}

func (r *report) socketTable(b *strings.Builder) {
	if !r.o.parts["socket"] {
		return
	}
	fmt.Fprintf(b, "(h) relay → Nginx over TCP loopback and over a Unix socket, %d × %d messages drained per transport (ABBA), no subscribers; CPU from /proc (Nginx: master + workers):\n\n", r.o.perModule.socketRounds, r.o.perModule.socketBacklog)
	fmt.Fprintf(b, "| module | transport | msg/s | relay CPU µs/msg | Nginx CPU µs/msg | sum µs/msg |\n|---|---|---:|---:|---:|---:|\n")
	for _, m := range r.modules {
		for _, d := range m.socket {
			fmt.Fprintf(b, "| %s | %s | %.0f | %.1f | %.1f | %.1f |\n", m.module, d.transport, d.rate(),
				us(d.cpuPerMsg()), us(d.nginxCPUPerMsg()), us(d.cpuPerMsg()+d.nginxCPUPerMsg()))
		}
	}
	b.WriteString("\n")
	for _, m := range r.modules {
		if len(m.socket) == 2 {
			tcp, unix := m.socket[0], m.socket[1]
			fmt.Fprintf(b, "- %s, Unix / TCP: relay CPU %.2f, Nginx CPU %.2f, throughput %.2f\n", m.module,
				ratio(unix.cpuPerMsg(), tcp.cpuPerMsg()), ratio(unix.nginxCPUPerMsg(), tcp.nginxCPUPerMsg()), unix.rate()/tcp.rate())
		}
	}
	b.WriteString("\n")
}

func (r *report) ladderTable(b *strings.Builder) {
	if !r.o.parts["ladder"] {
		return
	}
	fmt.Fprintf(b, "(g) latency ladder, ms, p50 / p99 (worst): the relay (publish → RabbitMQ → relay → Nginx → EventSource subscriber) beside the AMQP floor (publish → RabbitMQ → bare consumer) and the Nginx floor (HTTP publish over %d keep-alive connections → Nginx → the same subscribers):\n\n", r.o.lanes)
	fmt.Fprintf(b, "| module | msg/s | relay | AMQP floor | Nginx floor | floors' p99 summed | relay p99 − sum | received relay / AMQP / Nginx |\n|---|---:|---:|---:|---:|---:|---:|---|\n")
	for _, m := range r.modules {
		for _, s := range m.ladder {
			relay, sum := s.relay.median().p99, s.floorAMQP.median().p99+s.floorNginx.median().p99
			fmt.Fprintf(b, "| %s | %d | %s | %s | %s | %.2f | %+.2f | %s / %s / %s |\n", m.module, s.rate,
				s.relay.quantiles(), s.floorAMQP.quantiles(), s.floorNginx.quantiles(),
				ms(sum), ms(relay-sum), s.relay.got(), s.floorAMQP.got(), s.floorNginx.got())
		}
	}
	b.WriteString("\nTarget: relay p99 ≤ the floors summed + 2 ms at 2k msg/s; as close as measured at 5k.\n\n")
}

func (r *report) poisonTable(b *strings.Builder) {
	if !r.o.parts["poison"] {
		return
	}
	o := r.o.perModule
	fmt.Fprintf(b, "(f) poison storm: %d valid msg/s, alone and with %d poison msg/s (channel %q, on a shard the relay owns) beside them; latency of the valid ones, ms:\n\n", o.poisonRate, o.poisonStorm, poisonChannel)
	fmt.Fprintf(b, "| module | poison msg/s | received | p50 | p99 | worst p99 | publish→Nginx p50 / p99 (relay histogram) | relay CPU (cores) | dead-lettered | relay retries |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, m := range r.modules {
		if p := m.poison; p != nil {
			fmt.Fprintf(b, "| %s | 0 | %s | %s | %.2f | – | %.0f |\n", m.module, p.clean.cells(), p.clean.lag(), p.clean.median().relayCPU, p.clean.retries())
			fmt.Fprintf(b, "| %s | %d | %s | %s | %.2f | %.0f | %.0f |\n", m.module, o.poisonStorm, p.storm.cells(), p.storm.lag(), p.storm.median().relayCPU, p.deadLettered, p.storm.retries())
		}
	}
	b.WriteString("\n")
	for _, m := range r.modules {
		if p := m.poison; p != nil {
			fmt.Fprintf(b, "- %s: p99 with poison / without: **%.2f** (target ≤ 2)\n", m.module, ratio(p.storm.median().p99, p.clean.median().p99))
		}
	}
	b.WriteString("\n")
}

func (r *report) hotTable(b *strings.Builder) {
	if !r.o.parts["hot"] {
		return
	}
	o := r.o.perModule
	fmt.Fprintf(b, "(hot) one channel against %d, at %d msg/s in all (ms), and draining a %d-message backlog:\n\n", o.spread, o.hotRate, o.hotBacklog)
	fmt.Fprintf(b, "| module | channels | received | p50 | p99 | worst p99 | publish→Nginx p50 / p99 (relay histogram) | drain msg/s | relay CPU µs/msg (drain) |\n|---|---:|---|---:|---:|---:|---:|---:|---:|\n")
	for _, m := range r.modules {
		if h := m.hot; h != nil {
			fmt.Fprintf(b, "| %s | 1 | %s | %s | %.0f | %.1f |\n", m.module, h.hot.cells(), h.hot.lag(), h.hotDrain.rate(), us(h.hotDrain.cpuPerMsg()))
			fmt.Fprintf(b, "| %s | %d | %s | %s | %.0f | %.1f |\n", m.module, o.spread, h.spread.cells(), h.spread.lag(), h.spreadDrain.rate(), us(h.spreadDrain.cpuPerMsg()))
		}
	}
	b.WriteString("\n")
}

// cells are "received | p50 | p99 | worst p99" table cells, in ms.
func (r rounds) cells() string {
	return fmt.Sprintf("%s | %.2f | %.2f | %.2f", r.got(), ms(r.median().p50), ms(r.median().p99), ms(r.worst().p99))
}

// quantiles is "p50 / p99 (worst p99)", in ms.
func (r rounds) quantiles() string {
	return fmt.Sprintf("%.2f / %.2f (%.2f)", ms(r.median().p50), ms(r.median().p99), ms(r.worst().p99))
}

// lag is the median round's "≤ p50 / ≤ p99" of the relay's own histogram
// (published_at → Nginx accepted), in ms: where the latency is spent.
func (r rounds) lag() string {
	return fmt.Sprintf("≤ %g / ≤ %g", r.median().lagP50*1000, r.median().lagP99*1000)
}

func (r rounds) retries() float64 {
	var n float64
	for _, l := range r {
		n += l.retries
	}
	return n
}

// got is "received/sent".
func (s stream) got() string { return fmt.Sprintf("%d/%d", s.received, s.sent) }

func ratio(a, b time.Duration) float64 { return float64(a) / float64(b) }

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1e3 }
