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

// sink collects the latency of each message received, measured from the
// send time the producer stamped on it.
type sink struct {
	mu        sync.Mutex
	latencies []time.Duration
	received  int
}

func (s *sink) add(sent time.Time) {
	lat := time.Since(sent)
	s.mu.Lock()
	s.latencies = append(s.latencies, lat)
	s.received++
	s.mu.Unlock()
}

// reset starts a new measurement and returns the previous one's figures.
func (s *sink) reset() (lat []time.Duration, received int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	lat, received = s.latencies, s.received
	s.latencies, s.received = make([]time.Duration, 0, 1<<17), 0
	return lat, received
}

// await returns once n messages arrived, or after timeout.
func (s *sink) await(n int, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		s.mu.Lock()
		got := s.received
		s.mu.Unlock()
		if got >= n {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// subscribers are the live EventSource connections, one per channel.
type subscribers struct {
	sink
	cancel context.CancelFunc
	wg     sync.WaitGroup
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

// record reads the send time the workload wrote at the start of the body.
func (s *subscribers) record(ev stack.Event) {
	sent, _, ok := strings.Cut(ev.Data, " ")
	if !ok {
		return
	}
	us, err := strconv.ParseInt(sent, 10, 64)
	if err != nil {
		return
	}
	s.add(time.UnixMicro(us))
}

func (s *subscribers) close() {
	s.cancel()
	s.wg.Wait()
}

// stream is one paced run's figures: what was sent, what the sink got,
// and the latency quantiles.
type stream struct {
	rate     int // offered, msg/s
	sent     int
	received int
	elapsed  time.Duration
	p50, p99 time.Duration
	max      time.Duration
}

// offer sends rate msg/s for d through send(seq), paced in 5 ms batches;
// settle then waits until the far end accepted everything sent, and the
// sink gets up to 10 s more to receive it all.
func offer(ctx context.Context, s *sink, rate int, d time.Duration, send func(seq int) error, settle func() error) (stream, error) {
	s.reset()
	res := stream{rate: rate}
	total := int(float64(rate) * d.Seconds())
	start := time.Now()
	const tick = 5 * time.Millisecond
	for res.sent < total && ctx.Err() == nil {
		due := min(total, int(float64(rate)*time.Since(start).Seconds())+1)
		for ; res.sent < due; res.sent++ {
			if err := send(res.sent); err != nil {
				return res, err
			}
		}
		time.Sleep(tick)
	}
	if err := settle(); err != nil {
		return res, err
	}
	s.await(res.sent, 10*time.Second)
	res.elapsed = time.Since(start)
	lat, received := s.reset()
	res.received = received
	slices.Sort(lat)
	if len(lat) > 0 {
		res.p50 = lat[len(lat)*50/100]
		res.p99 = lat[min(len(lat)-1, len(lat)*99/100)]
		res.max = lat[len(lat)-1]
	}
	return res, nil
}

// traffic is what a paced run publishes to the broker: the workload's
// messages round robin over its channels and, if poisonEvery > 0, one
// poison message (an invalid channel id the relay must dead-letter) after
// every poisonEvery-th.
type traffic struct {
	b        *broker
	exchange string
	w        workload
	// key is the routing key of a channel; nil means its shard.
	key         func(channel string) string
	poisonEvery int
}

// poisonChannel breaks the contract (a space), so the relay dead-letters it.
const poisonChannel = "bad id"

func (t traffic) routingKey(channel string) string {
	if t.key == nil {
		return routingKey(channel)
	}
	return t.key(channel)
}

// publishes is how many messages, poison included, sending valid ones takes.
func (t traffic) publishes(valid int) int {
	if t.poisonEvery == 0 {
		return valid
	}
	return valid + valid/t.poisonEvery
}

func (t traffic) send(ctx context.Context) func(seq int) error {
	return func(seq int) error {
		ch := t.w.channels[seq%len(t.w.channels)]
		if err := t.b.publish(ctx, t.exchange, t.routingKey(ch), ch, t.w.body(seq, time.Now())); err != nil {
			return err
		}
		if t.poisonEvery > 0 && seq%t.poisonEvery == t.poisonEvery-1 {
			return t.b.publish(ctx, t.exchange, t.routingKey(poisonChannel), poisonChannel, t.w.body(seq, time.Now()))
		}
		return nil
	}
}

// offerTo runs offer with t's messages into s, settling on the broker's
// confirms. They are awaited while publishing: the confirm buffer is
// smaller than a long run.
func (t traffic) offerTo(ctx context.Context, s *sink, rate int, d time.Duration) (stream, error) {
	confirmed := make(chan error, 1)
	total := int(float64(rate) * d.Seconds())
	go func() { confirmed <- t.b.awaitConfirms(t.publishes(total)) }()
	return offer(ctx, s, rate, d, t.send(ctx), func() error { return <-confirmed })
}

// latencyResult is one offered rate's figures through the relay.
type latencyResult struct {
	stream
	relayCPU float64 // relay CPU, fraction of one core, over the run
	// The relay's own histogram: producer publish → Nginx accepted, as the
	// upper bound of the bucket holding p50 and p99, in seconds.
	lagP50, lagP99 float64
	retries        float64 // publish attempts the relay had to retry
}

// latencyRun publishes t at rate msg/s for d through the relay to the
// subscribers, then waits for them to receive everything (up to 10 s more).
func latencyRun(ctx context.Context, t traffic, subs *subscribers, rate int, d time.Duration, relay *stack.Relay) (latencyResult, error) {
	relayPid := relay.Pid()
	lag0 := lagBuckets(relay)
	cpu0 := procCPU(relayPid)
	retries0 := relay.Metric("pushrelay_publish_retries_total")
	s, err := t.offerTo(ctx, &subs.sink, rate, d)
	res := latencyResult{stream: s}
	if err != nil {
		return res, err
	}
	res.relayCPU = (procCPU(relayPid) - cpu0).Seconds() / res.elapsed.Seconds()
	lag1 := lagBuckets(relay)
	res.lagP50, res.lagP99 = lagQuantile(lag0, lag1, 0.5), lagQuantile(lag0, lag1, 0.99)
	res.retries = relay.Metric("pushrelay_publish_retries_total") - retries0
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
