package main

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// subscribers are the live EventSource connections, one per channel.
type subscribers struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	latencies []time.Duration
	received  int
}

func subscribeAll(ctx context.Context, ngx *stack.Nginx, channels []string) (*subscribers, error) {
	ctx, cancel := context.WithCancel(ctx)
	s := &subscribers{cancel: cancel}
	opened := make(chan struct{}, len(channels))
	failed := make(chan error, len(channels))
	for _, ch := range channels {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			err := stack.ReadEventSource(ctx, ngx.URL("/ev/"+ch), "", func() { opened <- struct{}{} }, s.record)
			if ctx.Err() == nil {
				failed <- err
			}
		}()
	}
	for range channels {
		select {
		case <-opened:
		case err := <-failed:
			s.close()
			return nil, err
		case <-time.After(30 * time.Second):
			s.close()
			return nil, fmt.Errorf("subscribers did not connect in 30s")
		}
	}
	return s, nil
}

func (s *subscribers) record(ev stack.Event) {
	sent, _, ok := strings.Cut(ev.Data, " ")
	if !ok {
		return
	}
	us, err := strconv.ParseInt(sent, 10, 64)
	if err != nil {
		return
	}
	lat := time.Since(time.UnixMicro(us))
	s.mu.Lock()
	s.latencies = append(s.latencies, lat)
	s.received++
	s.mu.Unlock()
}

// reset starts a new measurement and returns the previous one's figures.
func (s *subscribers) reset() (lat []time.Duration, received int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	lat, received = s.latencies, s.received
	s.latencies, s.received = make([]time.Duration, 0, 1<<17), 0
	return lat, received
}

func (s *subscribers) close() {
	s.cancel()
	s.wg.Wait()
}

// latencyResult is one offered rate's figures.
type latencyResult struct {
	offered  int
	sent     int
	received int
	elapsed  time.Duration
	p50, p99 time.Duration
	max      time.Duration
	relayCPU float64 // relay CPU, fraction of one core, over the run
	// The relay's own histogram: producer publish → Nginx accepted, as the
	// upper bound of the bucket holding p50 and p99, in seconds.
	lagP50, lagP99 float64
}

// latencyRun publishes at rate msg/s for d, paced in 5 ms batches, then
// waits for the subscribers to receive everything (up to 10 s more).
func latencyRun(ctx context.Context, b *broker, exchange string, w workload, subs *subscribers, rate int, d time.Duration, relay *stack.Relay) (latencyResult, error) {
	subs.reset()
	relayPid := relay.Pid()
	lag0 := lagBuckets(relay)
	confirmed := make(chan error, 1)
	total := int(float64(rate) * d.Seconds())
	go func() { confirmed <- b.awaitConfirms(total) }()

	res := latencyResult{offered: rate}
	cpu0 := procCPU(relayPid)
	start := time.Now()
	const tick = 5 * time.Millisecond
	for res.sent < total && ctx.Err() == nil {
		due := min(total, int(float64(rate)*time.Since(start).Seconds())+1)
		for ; res.sent < due; res.sent++ {
			ch := w.channels[res.sent%len(w.channels)]
			if err := b.publish(ctx, exchange, routingKey(ch), ch, w.body(res.sent, time.Now())); err != nil {
				return res, err
			}
		}
		time.Sleep(tick)
	}
	if err := <-confirmed; err != nil {
		return res, err
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		subs.mu.Lock()
		n := subs.received
		subs.mu.Unlock()
		if n >= res.sent {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	res.elapsed = time.Since(start)
	res.relayCPU = (procCPU(relayPid) - cpu0).Seconds() / res.elapsed.Seconds()
	lag1 := lagBuckets(relay)
	res.lagP50, res.lagP99 = lagQuantile(lag0, lag1, 0.5), lagQuantile(lag0, lag1, 0.99)
	lat, received := subs.reset()
	res.received = received
	slices.Sort(lat)
	if len(lat) > 0 {
		res.p50 = lat[len(lat)*50/100]
		res.p99 = lat[min(len(lat)-1, len(lat)*99/100)]
		res.max = lat[len(lat)-1]
	}
	return res, nil
}

// lagBuckets reads the relay's pushrelay_message_lag_seconds histogram:
// cumulative counts by upper bound.
func lagBuckets(relay *stack.Relay) map[float64]float64 {
	text, err := relay.Metrics()
	if err != nil {
		return nil
	}
	out := map[float64]float64{}
	for _, line := range strings.Split(text, "\n") {
		rest, ok := strings.CutPrefix(line, `pushrelay_message_lag_seconds_bucket{le="`)
		if !ok {
			continue
		}
		le, count, ok := strings.Cut(rest, `"} `)
		if !ok {
			continue
		}
		ub, err1 := strconv.ParseFloat(le, 64)
		if le == "+Inf" {
			ub, err1 = math.Inf(1), nil
		}
		n, err2 := strconv.ParseFloat(count, 64)
		if err1 == nil && err2 == nil {
			out[ub] = n
		}
	}
	return out
}

// lagQuantile is the upper bound of the bucket holding quantile q of the
// observations between two readings: the relay's share of the latency
// (producer publish → Nginx accepted), to the histogram's resolution.
func lagQuantile(before, after map[float64]float64, q float64) float64 {
	bounds := make([]float64, 0, len(after))
	for ub := range after {
		bounds = append(bounds, ub)
	}
	slices.Sort(bounds)
	total := after[math.Inf(1)] - before[math.Inf(1)]
	for _, ub := range bounds {
		if after[ub]-before[ub] >= q*total {
			return ub
		}
	}
	return math.Inf(1)
}
