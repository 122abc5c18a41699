package integration

import (
	"bufio"
	"fmt"
	"maps"
	"math/rand/v2"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pushrelay/pushrelay/sidecar/config"
	"github.com/pushrelay/pushrelay/sidecar/shard"
)

// Issue 3: five frontends on one machine.
//
// Each frontend is its own Nginx + Nchan on its own loopback port and its own
// relay process, with its own queue, all sharing one map and one exchange.
// Loopback ports rather than network namespaces: the relays must reach
// RabbitMQ on 127.0.0.1:5672 and their Nginx's loopback-only /pub, which in
// namespaces takes veth pairs, routes and NAT set up as root, for no gain in
// what is tested: what separates frontends here is queues and processes,
// not addresses.

const (
	shardsDrain    = 5 * time.Second
	shardsChannels = 1000
	shardsRate     = 1000 // messages/s over all channels: one round a second
	shardsChunk    = 100  // channels per confirmed publish batch
	shardsMaxRound = 180  // bounds the publisher if the test stalls
)

// shardsExtra is the [shards] section every frontend carries; mapTOML is a
// [shards.map] table, possibly with comments (plan's output is one).
func shardsExtra(mapTOML string) string {
	return fmt.Sprintf("[shards]\ncount = %d\ndrain = %q\n%s", shard.DefaultCount, shardsDrain.String(), mapTOML)
}

// shardsQueue is host's queue, unique to the run: the hosts are named fe1..fe6
// as in the issue, and a concurrent run elsewhere on the same broker must
// not share, or delete, this run's queues.
func shardsQueue(run, host string) string { return "pushrelay.it-" + run + "." + host }

type frontend struct {
	host  string
	nginx *Nginx
	relay *RelayProc
	opts  RelayOptions
}

// metric reads one sample, failing the test when the relay does not
// export it: a missing gauge must not read as a value.
func (f *frontend) metric(t *testing.T, sample string) float64 {
	t.Helper()
	v := f.relay.Metric(sample)
	if v < 0 {
		t.Fatalf("%s: no %s in /metrics", f.host, sample)
	}
	return v
}

func (f *frontend) writeMap(mapTOML string) {
	f.opts.Extra = shardsExtra(mapTOML)
	f.relay.WriteConfig(f.opts)
}

// pubSpan is when one confirmed batch was sent: the broker routed each of
// its messages somewhere between start and end.
type pubSpan struct{ start, end time.Time }

// shardPublisher is the web tier: it publishes round after round, message
// seq to every channel in round seq, and remembers when.
type shardPublisher struct {
	b     *Broker
	chans []string

	mu     sync.Mutex
	spans  [][]pubSpan // [seq-1][chunk]; end is zero while in flight
	rounds int         // rounds fully confirmed
	stop   chan struct{}
	done   chan struct{}
	err    error
}

func startShardPublisher(b *Broker, chans []string) *shardPublisher {
	p := &shardPublisher{b: b, chans: chans, stop: make(chan struct{}), done: make(chan struct{})}
	go p.run()
	return p
}

func (p *shardPublisher) run() {
	defer close(p.done)
	chunks := (len(p.chans) + shardsChunk - 1) / shardsChunk
	interval := shardsChunk * time.Second / shardsRate
	next := time.Now()
	for seq := 1; seq <= shardsMaxRound; seq++ {
		select {
		case <-p.stop:
			return
		default:
		}
		p.mu.Lock()
		p.spans = append(p.spans, make([]pubSpan, chunks))
		p.mu.Unlock()
		for c := range chunks {
			batch := p.chans[c*shardsChunk : min((c+1)*shardsChunk, len(p.chans))]
			start := time.Now()
			p.mu.Lock()
			p.spans[seq-1][c].start = start
			p.mu.Unlock()
			if err := p.b.Publish(seqMsgs(batch, seq)...); err != nil {
				p.err = err
				return
			}
			p.mu.Lock()
			p.spans[seq-1][c].end = time.Now()
			p.mu.Unlock()
			next = next.Add(interval)
			time.Sleep(time.Until(next))
		}
		p.mu.Lock()
		p.rounds = seq
		p.mu.Unlock()
	}
}

// finish stops at the end of the current round and returns the number of
// messages every channel got.
func (p *shardPublisher) finish(t *testing.T) int {
	t.Helper()
	close(p.stop)
	<-p.done
	if p.err != nil {
		t.Fatalf("publisher: %v", p.err)
	}
	return p.rounds
}

func (p *shardPublisher) startedRounds() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.spans)
}

func (p *shardPublisher) span(seq, channel int) pubSpan {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.spans[seq-1][channel/shardsChunk]
}

// lastSeq is the last seq of channel whose batch satisfies ok.
func (p *shardPublisher) lastSeq(channel int, ok func(pubSpan) bool) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	seq := 0
	for i, round := range p.spans {
		if sp := round[channel/shardsChunk]; !sp.start.IsZero() && ok(sp) {
			seq = i + 1
		}
	}
	return seq
}

// contiguous is the highest seq n such that 1..n all arrived.
func contiguous(got []int) int {
	seen := make(map[int]bool, len(got))
	for _, v := range got {
		seen[v] = true
	}
	n := 0
	for seen[n+1] {
		n++
	}
	return n
}

// window is one rebalance: from just before the first SIGHUP until every
// relay reported its drains over. Only messages the broker routed inside
// it can reach a subscriber twice.
type window struct {
	start, end time.Time
	moved      map[int]bool // channel indexes whose owner changed
}

type shardCluster struct {
	t     *testing.T
	b     *Broker
	run   string // names this run's queues
	fes   map[string]*frontend
	chans []string
	subs  []*Subscriber
	owner []string // host of each channel's subscriber
	pub   *shardPublisher
	rng   *rand.Rand
}

func (c *shardCluster) start(host, mapTOML string) *frontend {
	c.t.Helper()
	f := &frontend{host: host, nginx: startNginx(c.t)}
	f.opts = RelayOptions{Host: host, Exchange: c.b.Exchange, Publish: f.nginx.PublishURL(),
		Queue: shardsQueue(c.run, host), Extra: shardsExtra(mapTOML)}
	f.relay = startRelay(c.t, f.opts)
	c.fes[host] = f
	return f
}

func mustParseMap(t *testing.T, entries map[string][]string) *shard.Map {
	t.Helper()
	m, err := shard.ParseMap(shard.DefaultCount, entries)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// rebalance puts next into every frontend's file, reloads those in order,
// and moves the subscriber of every channel whose owner changes to its new
// owner at a random moment of the drain. Hosts that started with the new
// map are in bound, with the time their relay was consuming; begun is when
// the first of them started (zero: none did). It returns the window and the
// sum of the shards the reloaded relays reported draining.
func (c *shardCluster) rebalance(next *shard.Map, mapTOML string, order []string, begun time.Time, bound map[string]time.Time) (w window, draining int) {
	t := c.t
	t.Helper()
	for _, h := range order {
		c.fes[h].writeMap(mapTOML)
	}
	if begun.IsZero() {
		begun = time.Now()
	}
	w = window{start: begun, moved: map[int]bool{}}
	reloaded := map[string]time.Time{} // the old owner's drain begins later
	applied := maps.Clone(bound)       // a gained shard is bound by then
	if applied == nil {
		applied = map[string]time.Time{}
	}
	for _, h := range order {
		f := c.fes[h]
		ok := f.metric(t, `pushrelay_config_reloads_total{result="success"}`)
		reloaded[h] = time.Now()
		f.relay.Reload()
		want := float64(len(next.Owned(h)))
		// Generous: a gained shard is one bind RPC, which a busy broker
		// can make slow.
		// Owned says the new map at once; applied waits for the binds.
		waitFor(t, h+" to apply the new map", 60*time.Second, func() bool {
			return f.relay.Metric(`pushrelay_config_reloads_total{result="success"}`) == ok+1 &&
				f.relay.Metric("pushrelay_shards_owned") == want && f.relay.Metric("pushrelay_config_applied") == 1
		})
		applied[h] = time.Now()
		// Read at once: the gauge falls back to 0 when the drain ends.
		draining += int(f.metric(t, "pushrelay_shards_draining"))
	}
	everywhere := time.Now()

	var wg sync.WaitGroup
	defer wg.Wait() // a failing test must not leave movers behind
	atOnce := 0
	failed := make(chan string, len(c.chans))
	for i, ch := range c.chans {
		from, to := c.owner[i], next.Owner(shard.Of(ch, shard.DefaultCount))
		if to == from {
			continue
		}
		w.moved[i] = true
		c.owner[i] = to
		// A random moment between the new map being in force everywhere
		// and the end of the old owner's drain, which began no earlier
		// than its SIGHUP.
		drainEnd := reloaded[from].Add(shardsDrain)
		leave := everywhere
		if span := drainEnd.Add(-500 * time.Millisecond).Sub(everywhere); span > 0 {
			leave = everywhere.Add(time.Duration(c.rng.Int64N(int64(span))))
		} else {
			atOnce++
		}
		wg.Add(1)
		since, gained := w.start, applied[to]
		go func(i int, s *Subscriber, n *Nginx) {
			defer wg.Done()
			time.Sleep(time.Until(leave))
			// Until it leaves, the old owner must deliver everything the
			// broker confirmed while its drain lasts: that is what the
			// drain is for. That includes what was routed before the new
			// owner bound, which no one else has: a browser that left
			// earlier would miss it.
			need := max(
				c.pub.lastSeq(i, func(sp pubSpan) bool {
					return !sp.end.IsZero() && sp.end.Before(leave) && sp.end.Before(drainEnd)
				}),
				c.pub.lastSeq(i, func(sp pubSpan) bool { return sp.start.Before(gained) }))
			deadline := time.Now().Add(30 * time.Second)
			for contiguous(s.Got()) < need && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			if got := contiguous(s.Got()); got < need {
				failed <- fmt.Sprintf("%s %s on %s: has 1..%d, but 1..%d were confirmed before it left, %v after the move began, inside the drain",
					s.Kind, s.Channel, from, got, need, leave.Sub(since).Round(time.Millisecond))
			}
			s.Move(n, since)
		}(i, c.subs[i], c.fes[to].nginx)
	}
	if atOnce > 0 {
		t.Logf("the reloads outlasted the drain of the old owner of %d channels: they moved at once", atOnce)
	}
	waitFor(t, "every drain to end", shardsDrain+60*time.Second, func() bool {
		for _, f := range c.fes {
			if f.relay.Metric("pushrelay_shards_draining") != 0 {
				return false
			}
		}
		return true
	})
	w.end = time.Now()
	wg.Wait()
	close(failed)
	for msg := range failed {
		t.Error(msg)
	}
	for h, f := range c.fes {
		if got, want := f.metric(t, "pushrelay_shards_owned"), len(next.Owned(h)); got != float64(want) {
			t.Errorf("%s: pushrelay_shards_owned %v after the drain, want %d", h, got, want)
		}
	}
	return w, draining
}

// waitProgress waits until every subscriber has every message up to a
// round that begins after the call: messages keep flowing.
func (c *shardCluster) waitProgress(what string) {
	c.t.Helper()
	c.waitAllHave(c.pub.startedRounds()+1, 60*time.Second, what)
}

// waitAllHave waits until every subscriber has messages 1..want, and names
// those that do not when it gives up.
func (c *shardCluster) waitAllHave(want int, timeout time.Duration, what string) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var behind []string
		for i, s := range c.subs {
			if got := contiguous(s.Got()); got < want {
				behind = append(behind, fmt.Sprintf("%s %s on %s has 1..%d", s.Kind, s.Channel, c.owner[i], got))
			}
		}
		if len(behind) == 0 {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s: after %v, %d subscribers still miss some of 1..%d: %s",
				what, timeout, len(behind), want, strings.Join(behind[:min(len(behind), 10)], "; "))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// bindings returns the routing keys bound from exchange, by queue, as
// RabbitMQ itself sees them.
func bindings(t *testing.T, exchange string) map[string][]int {
	t.Helper()
	out, err := exec.Command("rabbitmqctl", "list_bindings", "-q", "--no-table-headers",
		"source_name", "destination_name", "routing_key").Output()
	if err != nil {
		t.Fatalf("rabbitmqctl list_bindings: %v", err)
	}
	by := map[string][]int{}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		f := strings.Split(sc.Text(), "\t")
		if len(f) != 3 || f[0] != exchange {
			continue
		}
		k, err := strconv.Atoi(f[2])
		if err != nil {
			t.Errorf("binding %q: routing key is not a shard", sc.Text())
			continue
		}
		by[f[1]] = append(by[f[1]], k)
	}
	return by
}

func TestFiveFrontendsShareOneMap(t *testing.T) {
	hosts := []string{"fe1", "fe2", "fe3", "fe4", "fe5"}
	seed := uint64(time.Now().UnixNano())
	t.Logf("random seed %d", seed)
	run := strconv.FormatUint(seed, 36)
	queues := []string{}
	for _, h := range append(slices.Clone(hosts), "fe6") {
		queues = append(queues, shardsQueue(run, h))
	}
	c := &shardCluster{t: t, b: newBroker(t, queues...), run: run, fes: map[string]*frontend{},
		chans: channels("fleet", shardsChannels), rng: rand.New(rand.NewPCG(seed, seed))}

	initial := mustParseMap(t, map[string][]string{
		"fe1": {"0-204"}, "fe2": {"205-409"}, "fe3": {"410-614"}, "fe4": {"615-819"}, "fe5": {"820-1023"},
	})
	for _, h := range hosts {
		c.start(h, initial.TOML())
	}

	// Every channel's subscriber on its owner, mostly EventSource.
	byHost := map[string][]*Subscriber{}
	for i, ch := range c.chans {
		kind := EventSource
		switch {
		case i%10 == 3:
			kind = WebSocket
		case i%20 == 7:
			kind = LongPoll
		}
		h := initial.Owner(shard.Of(ch, shard.DefaultCount))
		s := subscribe(t, c.fes[h].nginx, ch, kind)
		c.subs = append(c.subs, s)
		c.owner = append(c.owner, h)
		byHost[h] = append(byHost[h], s)
	}
	for _, h := range hosts {
		if len(byHost[h]) == 0 {
			t.Fatalf("no channel hashes to %s: the test would not exercise it", h)
		}
		waitSubscribed(t, c.fes[h].nginx, byHost[h])
	}
	began := time.Now()
	c.pub = startShardPublisher(c.b, c.chans)
	defer func() {
		select {
		case <-c.pub.done:
		default:
			close(c.pub.stop)
			<-c.pub.done
		}
	}()

	// 1. Steady state: a few rounds through every owner.
	c.waitProgress("steady state")
	c.waitProgress("steady state")
	c.waitProgress("steady state")

	// 2. Move 200 shards from fe1 to fe2, reloading the gainer first as the
	// README says, then the loser, then the three others with the same
	// file, whose subscribers must not notice.
	moved200 := mustParseMap(t, map[string][]string{
		"fe1": {"200-204"}, "fe2": {"0-199", "205-409"}, "fe3": {"410-614"}, "fe4": {"615-819"}, "fe5": {"820-1023"},
	})
	if n := shard.Moved(initial, moved200); n != 200 {
		t.Fatalf("the test's own map moves %d shards, not 200", n)
	}
	w2, draining := c.rebalance(moved200, moved200.TOML(), []string{"fe2", "fe1", "fe3", "fe4", "fe5"}, time.Time{}, nil)
	if draining != 200 {
		t.Errorf("relays reported %d shards draining after the move, want 200", draining)
	}
	t.Logf("move fe1 -> fe2: %d channels moved, window %v", len(w2.moved), w2.end.Sub(w2.start).Round(time.Millisecond))
	c.waitProgress("after the move")

	// 3. An invalid map (fe3 and fe4 both claim 615-620) on every host.
	invalid := strings.Replace(moved200.TOML(), `fe3 = ["410-614"]`, `fe3 = ["410-620"]`, 1)
	if invalid == moved200.TOML() {
		t.Fatalf("could not make the map invalid:\n%s", invalid)
	}
	failures := map[string]float64{}
	for _, h := range hosts {
		f := c.fes[h]
		failures[h] = f.metric(t, `pushrelay_config_reloads_total{result="failure"}`)
		f.writeMap(invalid)
		f.relay.Reload()
	}
	for _, h := range hosts {
		f := c.fes[h]
		waitFor(t, h+" to refuse the invalid map", 15*time.Second, func() bool {
			return f.relay.Metric(`pushrelay_config_reloads_total{result="failure"}`) == failures[h]+1
		})
		if v := f.metric(t, "pushrelay_config_last_reload_successful"); v != 0 {
			t.Errorf("%s: pushrelay_config_last_reload_successful %v after a refused reload, want 0", h, v)
		}
		if log := f.relay.Log(); !strings.Contains(log, "615-620") || !strings.Contains(log, "claimed by fe3 and fe4") {
			t.Errorf("%s: the log does not name the overlap 615-620 of fe3 and fe4:\n%s", h, log)
		}
		if got, want := f.metric(t, "pushrelay_shards_owned"), len(moved200.Owned(h)); got != float64(want) {
			t.Errorf("%s: pushrelay_shards_owned %v after a refused reload, want the old map's %d", h, got, want)
		}
		if v := f.metric(t, "pushrelay_shards_draining"); v != 0 {
			t.Errorf("%s: %v shards draining after a refused reload", h, v)
		}
	}
	c.waitProgress("after the refused reload")
	// The fix, as an operator would apply it.
	for _, h := range hosts {
		f := c.fes[h]
		f.writeMap(moved200.TOML())
		f.relay.Reload()
		waitFor(t, h+" to accept the fixed map", 15*time.Second, func() bool {
			return f.relay.Metric("pushrelay_config_last_reload_successful") == 1
		})
	}

	// 4. A sixth host, planned from fe1's live file.
	old, err := config.LoadShardMap(c.fes["fe1"].relay.Config)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(relayBin, "plan", "-hosts", "fe1,fe2,fe3,fe4,fe5,fe6", "-from", c.fes["fe1"].relay.Config)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("pushrelay plan: %v\n%s", err, stderr.String())
	}
	plan := string(out)
	lines := strings.Split(strings.TrimSpace(plan), "\n")
	movedText, ok := strings.CutPrefix(lines[len(lines)-1], "# moved: ")
	planned, err := strconv.Atoi(movedText)
	if !ok || err != nil {
		t.Fatalf("plan's last line is not \"# moved: N\":\n%s", plan)
	}
	// A channel coming back to a frontend must not replay what that
	// frontend stored before it gave the channel away: the move's
	// subscribers resume from its start, to the second.
	time.Sleep(time.Until(w2.end.Add(2 * time.Second)))
	fe6Start := time.Now()
	fe6 := c.start("fe6", plan)
	fe6Bound := time.Now()
	next, err := config.LoadShardMap(fe6.relay.Config)
	if err != nil {
		t.Fatal(err)
	}
	changed := 0
	for s := range shard.DefaultCount {
		if old.Owner(s) != next.Owner(s) {
			changed++
		}
	}
	if changed != planned {
		t.Errorf("plan printed # moved: %d, but %d shards change owner between the maps", planned, changed)
	}
	if len(next.Owned("fe6")) == 0 {
		t.Fatalf("the plan gives fe6 nothing:\n%s", plan)
	}
	w4, draining := c.rebalance(next, plan, hosts, fe6Start, map[string]time.Time{"fe6": fe6Bound})
	if draining != planned {
		t.Errorf("relays reported %d shards draining after the reload, plan printed # moved: %d", draining, planned)
	}
	t.Logf("sixth host: plan moved %d shards, %d channels moved, window %v", planned, len(w4.moved), w4.end.Sub(w4.start).Round(time.Millisecond))
	total := 0.0
	for _, f := range c.fes {
		total += f.metric(t, "pushrelay_shards_owned")
	}
	if total != shard.DefaultCount {
		t.Errorf("pushrelay_shards_owned sums to %v over the six relays, want %d", total, shard.DefaultCount)
	}
	bound := bindings(t, c.b.Exchange)
	for h := range c.fes {
		q := shardsQueue(c.run, h)
		got := slices.Sorted(slices.Values(bound[q]))
		if want := next.Owned(h); !slices.Equal(got, want) {
			t.Errorf("RabbitMQ binds %s to %d shards %v, want the %d of the new map %v",
				q, len(got), shard.Ranges(got), len(want), shard.Ranges(want))
		}
	}
	// Rounds published after the last drain, when only the new owners
	// have the moved shards.
	c.waitProgress("after the sixth host's drain")
	c.waitProgress("after the sixth host's drain")

	// Every subscriber: every message from its first subscription on, in
	// order; a message twice only if the broker routed it inside the
	// window of a move of its channel.
	final := c.pub.finish(t)
	c.waitAllHave(final, 90*time.Second, "after the last round")
	windows := []window{w2, w4}
	dups, reconnects := 0, 0
	for i, s := range c.subs {
		seen := map[int]bool{}
		last := 0
		for _, v := range s.Got() {
			switch {
			case v == 0: // warm-up
			case v < 1 || v > final:
				t.Errorf("%s %s: got %d, not one of 1..%d", s.Kind, s.Channel, v, final)
			case seen[v]:
				dups++
				sp := c.pub.span(v, i)
				inside := false
				for _, w := range windows {
					inside = inside || w.moved[i] && !sp.start.After(w.end) && !sp.end.Before(w.start)
				}
				if !inside {
					t.Errorf("%s %s: message %d (sent %s..%s after the start) twice, outside any move of its channel",
						s.Kind, s.Channel, v, sp.start.Sub(began).Round(time.Millisecond), sp.end.Sub(began).Round(time.Millisecond))
				}
			case v != last+1:
				t.Errorf("%s %s: got %d after %d: lost or out of order", s.Kind, s.Channel, v, last)
				seen[v] = true
				last = max(last, v)
			default:
				seen[v] = true
				last = v
			}
		}
		s.mu.Lock()
		reconnects += s.reconnects
		s.mu.Unlock()
	}
	t.Logf("%d rounds = %d messages over %v; %d duplicates; %d subscriber reconnects, moves included",
		final, final*len(c.chans), time.Since(began).Round(time.Second), dups, reconnects)
}
