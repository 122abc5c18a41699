package integration

import (
	"fmt"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// What a run of TestCluster's failovers counts at the subscribers, per
// channel, for the run's own messages lo..hi of every channel:
//
//	lost:      never seen;
//	reordered: seen for the first time after a later one of its channel
//	           (any later one, from this run or an earlier one);
//	dups:      seen again after its first arrival.
//
// Unlike Subscriber.CheckExcept, which stops at the first message out of
// order and makes waitAll wait for its whole timeout, it counts every
// kind on every channel and never waits for a message it already knows
// came late.
type orderCount struct {
	lost, reordered, dups, foreign int
	examples                       []string // "ch14: 105 after 107", a few
}

func (o orderCount) String() string {
	return fmt.Sprintf("%d lost, %d reordered, %d duplicates", o.lost, o.reordered, o.dups)
}

func (o *orderCount) add(p orderCount) {
	o.lost += p.lost
	o.reordered += p.reordered
	o.dups += p.dups
	o.foreign += p.foreign
	for _, e := range p.examples {
		if len(o.examples) < 8 {
			o.examples = append(o.examples, e)
		}
	}
}

// countChannel counts what got, one subscriber's arrivals in order, holds
// of messages lo..hi.
func countChannel(channel string, got []int, lo, hi int) (c orderCount) {
	seen := make(map[int]bool, hi-lo+1)
	latest := 0 // the highest message seen so far, of any run
	for _, v := range got {
		switch {
		case v == 0: // warm-up
			continue
		case v < 0:
			c.foreign++
			continue
		case v < lo || v > hi:
			latest = max(latest, v)
			continue
		case seen[v]:
			c.dups++
			continue
		}
		seen[v] = true
		if v < latest {
			c.reordered++
			if len(c.examples) < 3 {
				c.examples = append(c.examples, fmt.Sprintf("%s: %d after %d", channel, v, latest))
			}
		}
		latest = max(latest, v)
	}
	c.lost = hi - lo + 1 - len(seen)
	return c
}

// complete reports whether got holds every message lo..hi.
func complete(got []int, lo, hi int) bool {
	seen := make(map[int]bool, hi-lo+1)
	for _, v := range got {
		if v >= lo && v <= hi {
			seen[v] = true
		}
	}
	return len(seen) == hi-lo+1
}

// waitRun waits until every subscriber saw messages lo..hi of its channel,
// or nothing arrived anywhere for quiet, or timeout; then counts them. A
// message that never comes costs quiet, not timeout.
func waitRun(subs []*Subscriber, lo, hi int, timeout, quiet time.Duration) (total orderCount) {
	deadline := time.Now().Add(timeout)
	lastCount, lastChange := -1, time.Now()
	for time.Now().Before(deadline) {
		all, n := true, 0
		for _, s := range subs {
			got := s.Got()
			n += len(got)
			if all && !complete(got, lo, hi) {
				all = false
			}
		}
		if all {
			break
		}
		if n != lastCount {
			lastCount, lastChange = n, time.Now()
		} else if time.Since(lastChange) > quiet {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	// A copy on its way when the last one arrived would be missed.
	time.Sleep(500 * time.Millisecond)
	for _, s := range subs {
		total.add(countChannel(s.Channel, s.Got(), lo, hi))
	}
	return total
}

// streamRange publishes messages lo..hi of every channel, round by round,
// at about rate messages/s in total, from its own goroutine; the returned
// function waits for it to finish and reports its error. Starting past 1,
// one set of subscribers serves several runs.
func streamRange(b *Broker, chans []string, lo, hi int, rate int) (wait func() error) {
	var (
		wg  sync.WaitGroup
		err error
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		interval := time.Duration(len(chans)) * time.Second / time.Duration(rate)
		next := time.Now()
		for seq := lo; seq <= hi; seq++ {
			if err = b.Publish(seqMsgs(chans, seq)...); err != nil {
				return
			}
			next = next.Add(interval)
			time.Sleep(time.Until(next))
		}
	}()
	return func() error { wg.Wait(); return err }
}

var sessionLine = regexp.MustCompile(`(?m)^time=(\S+) level=INFO msg=consuming `)

// sessionStart is when the relay logged its latest session; zero if none.
func sessionStart(r *clusterRelay) time.Time {
	m := sessionLine.FindAllStringSubmatch(r.Log(), -1)
	if len(m) == 0 {
		return time.Time{}
	}
	at, _ := time.Parse(time.RFC3339Nano, m[len(m)-1][1])
	return at
}

// waitSessionAge waits until the relay's session is older than age, as a
// production session is when a node fails: a younger one's loss backs off
// first (the relay's minHealthySession, 5 s).
func waitSessionAge(t *testing.T, r *clusterRelay, age, timeout time.Duration) {
	t.Helper()
	waitFor(t, fmt.Sprintf("a relay session %v old", age), timeout, func() bool {
		at := sessionStart(r)
		return !at.IsZero() && time.Since(at) >= age && r.Metric("pushrelay_amqp_connected") == 1
	})
}

// warnings are the relay's WARN lines since it started, at most n, as one
// string for a failure message.
func warnings(r *clusterRelay, n int) string {
	var out []string
	for _, line := range strings.Split(r.Log(), "\n") {
		if strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") {
			out = append(out, line)
		}
	}
	if len(out) > n {
		out = out[len(out)-n:]
	}
	return strings.Join(out, "\n")
}
