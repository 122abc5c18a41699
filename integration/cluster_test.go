package integration

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// Issue 10: the relay on a three-node RabbitMQ cluster of the test's own
// (cluster_harness_test.go), with amqp.urls naming every node and a quorum
// queue. One cluster serves every subtest: starting it takes ~25 s.
//
//	NodeKill:      SIGKILL the node the relay consumes from, mid-stream,
//	               and start it again 5 s later;
//	LeaderKill:    the same for the quorum queue's leader, on another node
//	               than the relay's;
//	DeliveryLimit: a relay SIGKILLed with a message in flight, again and
//	               again, spends amqp.delivery_limit and the queue itself
//	               dead-letters the message (x-death reason delivery_limit);
//	Cancel:        the queue deleted under the relay: basic.cancel (or the
//	               queue watch, when the broker sends none), then one new
//	               session that redeclares it, no reconnect storm.
//
// Both kills check every message arrives once at least, in order per
// channel, and print what the failover cost: duplicates, and the time the
// relay consumed nothing.
func TestCluster(t *testing.T) {
	c := startCluster(t, 3)
	// The first relay creates pushrelay.dead, and NodeKill then kills the
	// node it was connected to: a classic pushrelay.dead would live there
	// alone and fail every session setup until the node is back.
	defer func() {
		if typ := queueTypeOf(c, "pushrelay.dead"); typ != "quorum" {
			t.Errorf("pushrelay.dead is %q, want quorum like the host queues", typ)
		}
	}()
	var figures []string
	for _, run := range []struct {
		name   string
		victim func(t *testing.T, c *rabbitCluster, relay *rabbitNode, queue string) *rabbitNode
	}{
		{"NodeKill", func(t *testing.T, c *rabbitCluster, relay *rabbitNode, queue string) *rabbitNode { return relay }},
		{"LeaderKill", leaderAwayFrom},
	} {
		t.Run(run.name, func(t *testing.T) {
			eachModule(t, func(t *testing.T, m stack.Module) {
				// A queue per module: the second run must not find the first's.
				f := clusterFailover(t, c.on(t), m, "it-cl-"+strings.ToLower(run.name)+"-"+string(m), run.victim)
				figures = append(figures, fmt.Sprintf("%s on %s: %s", run.name, m, f))
			})
		})
	}
	t.Run("DeliveryLimit", func(t *testing.T) { testDeliveryLimit(t, c.on(t)) })
	t.Run("Cancel", func(t *testing.T) { testQueueDeletedUnderRelay(t, c.on(t)) })
	for _, f := range figures {
		t.Log(f)
	}
}

// queueTypeOf is queue's type as the cluster lists it, or "".
func queueTypeOf(c *rabbitCluster, queue string) string {
	for _, n := range c.Nodes {
		out, err := c.ctlErr(n, 30*time.Second, "list_queues", "name", "type")
		if err != nil {
			continue
		}
		for _, line := range strings.Split(out, "\n") {
			if f := strings.Fields(line); len(f) == 2 && f[0] == queue {
				return f[1]
			}
		}
	}
	return ""
}

// clusterRelay is a relay on the test cluster.
type clusterRelay struct {
	*RelayProc
	queue    string
	exchange string
}

// startClusterRelay starts the relay with every node in amqp.urls and a
// quorum queue; launch only, without waiting for /readyz 200, if standby.
func startClusterRelay(t *testing.T, c *rabbitCluster, o RelayOptions, standby bool) *clusterRelay {
	t.Helper()
	o.AMQPURL = c.URLs()
	if o.Exchange == "" {
		o.Exchange = fmt.Sprintf("pushrelay.test.%s.%d", strings.ReplaceAll(t.Name(), "/", "."), time.Now().UnixNano())
	}
	o.AMQP = `queue_type = "quorum"` + "\n" + o.AMQP
	sr, err := stack.NewRelay(relayBin, t.TempDir(), o)
	if err != nil {
		t.Fatal(err)
	}
	r := &clusterRelay{RelayProc: &RelayProc{Relay: sr, t: t}, queue: "pushrelay." + o.Host, exchange: o.Exchange}
	start := sr.Start
	if standby {
		start = sr.Launch
	}
	if err := start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r.Stop()
		if t.Failed() {
			t.Logf("relay %s log:\n%s", o.Host, r.Log())
		}
	})
	return r
}

var consumingNode = regexp.MustCompile(`msg=consuming .*node=(\S+)`)

// node is the broker node of the relay's latest session, from its log.
func (r *clusterRelay) node(c *rabbitCluster) *rabbitNode {
	r.t.Helper()
	m := consumingNode.FindAllStringSubmatch(r.Log(), -1)
	if len(m) == 0 {
		r.t.Fatalf("the relay logged no session:\n%s", r.Log())
	}
	n := c.Node(m[len(m)-1][1])
	if n == nil {
		r.t.Fatalf("the relay consumes from %s, not a node of the cluster", m[len(m)-1][1])
	}
	return n
}

// sessions counts the relay's "consuming" log lines: one per session.
func (r *clusterRelay) sessions() int { return len(consumingNode.FindAllString(r.Log(), -1)) }

// leaderAwayFrom returns the quorum queue's leader, first moving it off the
// relay's node if it is there (the queue is declared where the relay
// connects, so it usually is): a leader kill must not also be a kill of
// the relay's connection, which NodeKill covers. Removing the member there
// makes the other two elect a leader; it is then added back as a follower.
func leaderAwayFrom(t *testing.T, c *rabbitCluster, relay *rabbitNode, queue string) *rabbitNode {
	leader := c.Leader(queue)
	if leader == relay {
		other := c.Nodes[0]
		if other == relay {
			other = c.Nodes[1]
		}
		c.queues(other, "delete_member", queue, relay.Name)
		c.queues(other, "add_member", queue, relay.Name)
		leader = c.Leader(queue)
		if leader == relay {
			t.Fatalf("%s still leads %s after losing and regaining its member", relay.Name, queue)
		}
	}
	return leader
}

// failover is what one kill cost.
type failover struct {
	victim          string
	disconnected    time.Duration // pushrelay_amqp_connected 0, sampled every 100 ms
	stalled         time.Duration // longest time received_total did not grow
	browsersStalled time.Duration // longest gap between any two arrivals at subscribers
	dups, resent    int
	redelivered     float64
	sessions        int
}

func (f failover) String() string {
	return fmt.Sprintf("killed %s; not consuming %v (disconnected %v), browsers got nothing for %v; %d duplicates, %v redelivered, %d re-sent by the producer, %d sessions",
		f.victim, f.stalled, f.disconnected, f.browsersStalled, f.dups, f.redelivered, f.resent, f.sessions)
}

// clusterFailover streams 20,000 messages over 100 channels at 2,000 msg/s
// through a node that is neither the relay's nor the victim, SIGKILLs the
// victim 3 s in and starts it again 5 s later.
func clusterFailover(t *testing.T, c *rabbitCluster, m stack.Module, host string,
	victimOf func(t *testing.T, c *rabbitCluster, relay *rabbitNode, queue string) *rabbitNode) failover {
	host = uniqueHost(host)
	ngx := startNginxModule(t, m)
	r := startClusterRelay(t, c, RelayOptions{Host: host, Publish: ngx.PublishURL(), Dialect: m.Dialect()}, false)
	consuming := time.Now()
	relayNode := r.node(c)
	victim := victimOf(t, c, relayNode, r.queue)
	var producer *rabbitNode
	for _, n := range c.Nodes {
		if n != victim && (producer == nil || producer == relayNode) {
			producer = n
		}
	}
	t.Logf("relay on %s, leader %s, producer on %s, victim %s", relayNode.Name, c.Leader(r.queue).Name, producer.Name, victim.Name)
	b := newBrokerAt(t, producer.URL())
	b.Exchange = r.exchange

	chans := channels(host, 100)
	subs := subscribeAll(t, ngx, chans, kindsOn(m)...)
	// The session is older than the relay's minHealthySession (5 s) at
	// the kill, as in production: a younger one's loss backs off first.
	time.Sleep(time.Until(consuming.Add(3 * time.Second)))
	s := sampleRelay(r.RelayProc)
	const perChannel, rate = 200, 2000
	began := time.Now()
	wait := streamPublish(b, chans, perChannel, rate)
	time.Sleep(3 * time.Second)
	c.Kill(victim)
	killed := time.Now()
	time.Sleep(5 * time.Second)
	// Before the victim is back the relay must consume through a node
	// that survived, not wait for its own to return.
	if now := r.node(c); now == victim || r.Metric("pushrelay_amqp_connected") != 1 {
		t.Errorf("5 s after %s was killed the relay is not consuming through another node (its latest session: %s, amqp_connected %v)",
			victim.Name, now.Name, r.Metric("pushrelay_amqp_connected"))
	}
	c.Restart(victim)
	t.Logf("%s back %v after the kill", victim.Name, time.Since(killed).Round(100*time.Millisecond))
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	f := failover{victim: victim.Name, dups: waitAll(t, subs, perChannel, 90*time.Second), resent: b.Resent}
	ended := time.Now()
	s.stop()
	f.stalled, f.disconnected = s.stall(began, ended)
	f.browsersStalled = arrivalGap(subs, began, ended)
	f.redelivered = r.Metric("pushrelay_messages_redelivered_total")
	f.sessions = r.sessions()
	t.Logf("%s on %s: %s", host, m, f)
	logSessions(t, r)
	if float64(f.dups) > f.redelivered+float64(f.resent) {
		t.Errorf("%d duplicates, more than the %v redeliveries and %d producer resends: the relay published something twice on its own",
			f.dups, f.redelivered, f.resent)
	}
	if f.sessions > 4 {
		t.Errorf("%d sessions for one node kill: a reconnect storm", f.sessions)
	}
	return f
}

// logSessions logs the relay's sessions and warnings.
func logSessions(t *testing.T, r *clusterRelay) {
	for _, line := range strings.Split(r.Log(), "\n") {
		if strings.Contains(line, "level=WARN") || strings.Contains(line, "msg=consuming") || strings.Contains(line, "msg=starting") {
			t.Log("relay: " + line)
		}
	}
}

// relaySampler reads the relay's metrics every 100 ms.
type relaySampler struct {
	mu      sync.Mutex
	samples []relaySample
	done    chan struct{}
	wg      sync.WaitGroup
}

type relaySample struct {
	at        time.Time
	connected bool
	received  float64
}

func sampleRelay(r *RelayProc) *relaySampler {
	s := &relaySampler{done: make(chan struct{})}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-s.done:
				return
			case now := <-tick.C:
				text, _ := r.Metrics()
				sm := relaySample{at: now, received: metricIn(text, "pushrelay_messages_received_total")}
				sm.connected = metricIn(text, "pushrelay_amqp_connected") == 1
				s.mu.Lock()
				s.samples = append(s.samples, sm)
				s.mu.Unlock()
			}
		}
	}()
	return s
}

func (s *relaySampler) stop() { close(s.done); s.wg.Wait() }

// stall returns the longest time between from and to in which the relay
// received nothing, and how long it was without an AMQP session.
func (s *relaySampler) stall(from, to time.Time) (stalled, disconnected time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	last, lastAt := -1.0, from
	for _, sm := range s.samples {
		if sm.at.Before(from) || sm.at.After(to) {
			continue
		}
		if !sm.connected {
			disconnected += 100 * time.Millisecond
		}
		if sm.received != last {
			stalled = max(stalled, sm.at.Sub(lastAt))
			last, lastAt = sm.received, sm.at
		}
	}
	return stalled, disconnected
}

// metricIn is the value of sample in a /metrics text, or -1.
func metricIn(text, sample string) float64 {
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, sample+" "); ok {
			var f float64
			fmt.Sscan(v, &f)
			return f
		}
	}
	return -1
}

// arrivalGap is the longest time between from and the last arrival before
// to in which no subscriber got any message.
func arrivalGap(subs []*Subscriber, from, to time.Time) time.Duration {
	var all []time.Time
	for _, s := range subs {
		s.mu.Lock()
		for _, at := range s.arrivals {
			if at.After(from) && at.Before(to) {
				all = append(all, at)
			}
		}
		s.mu.Unlock()
	}
	slices.SortFunc(all, func(a, b time.Time) int { return a.Compare(b) })
	var gap time.Duration
	prev := from
	for _, at := range all {
		gap = max(gap, at.Sub(prev))
		prev = at
	}
	return gap
}

// A relay SIGKILLed with a message in flight, over and over (a crash loop,
// or an OOM kill on one message), spends the message's deliveries: past
// amqp.delivery_limit the quorum queue dead-letters it itself, to
// pushrelay.dlx, with x-death reason delivery_limit. The publisher here is
// a port nothing listens on, so the message stays in flight until the kill.
func testDeliveryLimit(t *testing.T, c *rabbitCluster) {
	const limit = 2
	port, err := stack.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	host := uniqueHost("it-cl-limit")
	r := startClusterRelay(t, c, RelayOptions{
		Host: host, Publish: fmt.Sprintf("http://127.0.0.1:%d/pub?id={channel}", port),
		AMQP: fmt.Sprintf("delivery_limit = %d", limit),
	}, true)
	waitFor(t, "the relay to consume", 20*time.Second, func() bool { return r.Metric("pushrelay_amqp_connected") == 1 })
	b := newBrokerAt(t, r.node(c).URL())
	b.Exchange = r.exchange
	b.Drain("pushrelay.dead")
	b.MustPublish(Msg{Channel: "limit:1", Body: []byte("crash-loop"), ID: "crash-loop"})

	var dead []amqp.Delivery
	kills := 0
	for ; kills < 3*limit && len(dead) == 0; kills++ {
		waitFor(t, "the message in flight", 20*time.Second, func() bool { return r.Metric("pushrelay_messages_in_flight") == 1 })
		r.Kill()
		// The broker returns the message when the dead connection's
		// channel closes; past the limit it dead-letters it instead.
		time.Sleep(500 * time.Millisecond)
		for _, d := range b.Drain("pushrelay.dead") {
			if d.MessageId == "crash-loop" {
				dead = append(dead, d)
			}
		}
		if len(dead) == 0 {
			if err := r.Launch(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if len(dead) != 1 {
		t.Fatalf("%d kills with the message in flight, delivery_limit %d: %d copies in pushrelay.dead, want 1", kills, limit, len(dead))
	}
	deaths, _ := dead[0].Headers["x-death"].([]any)
	counted := 0
	for _, x := range deaths {
		if d, ok := x.(amqp.Table); ok && d["reason"] == "delivery_limit" && d["queue"] == r.queue {
			counted++
		}
	}
	t.Logf("dead-lettered after %d kills (delivery_limit %d): x-death %v, x-delivery-count %v",
		kills, limit, dead[0].Headers["x-death"], dead[0].Headers["x-delivery-count"])
	if counted != 1 {
		t.Errorf("x-death %v: want one entry with reason delivery_limit from %s", dead[0].Headers["x-death"], r.queue)
	}
	if kills != limit+1 {
		t.Errorf("dead-lettered after %d kills, want delivery_limit+1 = %d", kills, limit+1)
	}
	if got := b.QueueDepth(r.queue); got != 0 {
		t.Errorf("%d messages left in %s", got, r.queue)
	}
}

// The queue deleted under a consuming relay (an operator's mistake, or a
// policy change done by delete-and-recreate): RabbitMQ sends basic.cancel
// (or the relay's queue watch notices), the relay opens one new session that declares and binds the queue again,
// and messages flow; no reconnect storm.
func testQueueDeletedUnderRelay(t *testing.T, c *rabbitCluster) {
	ngx := startNginxModule(t, stack.Nchan)
	host := uniqueHost("it-cl-cancel")
	r := startClusterRelay(t, c, RelayOptions{Host: host, Publish: ngx.PublishURL(), Dialect: stack.Nchan.Dialect()}, false)
	b := newBrokerAt(t, r.node(c).URL())
	b.Exchange = r.exchange
	chans := channels("cancel", 10)
	subs := subscribeAll(t, ngx, chans, EventSource)
	b.MustPublish(seqMsgs(chans, 1)...)
	waitAll(t, subs, 1, 10*time.Second)
	// A session cancelled sooner than minHealthySession (5 s) backs off
	// as a failed connect; production queues are deleted later than that.
	time.Sleep(5 * time.Second)

	t.Logf("relay on %s, leader %s", r.node(c).Name, c.Leader(r.queue).Name)
	deleted := time.Now()
	c.ctl(r.node(c), "delete_queue", r.queue)
	// RabbitMQ 3.10.8 sometimes sends no basic.cancel (about 1 delete in
	// 4, with a plain amqp091-go client too): the relay's queue watch
	// finds the queue gone within 5 s then (cancel_test.go makes that case
	// certain).
	waitFor(t, "a second session", 25*time.Second, func() bool {
		return r.sessions() >= 2 && r.Metric("pushrelay_amqp_connected") == 1
	})
	t.Logf("consuming again %v after the delete", time.Since(deleted).Round(time.Millisecond))
	logSessions(t, r)
	switch log := r.Log(); {
	case strings.Contains(log, "the broker cancelled the consumer"):
		t.Log("the broker sent basic.cancel")
	case strings.Contains(log, "the host queue is gone"):
		t.Log("the broker sent no basic.cancel; the queue watch found the queue gone")
	default:
		t.Error("the relay did not say why it reconnected")
	}
	for seq := 2; seq <= 10; seq++ {
		b.MustPublish(seqMsgs(chans, seq)...)
	}
	if dups := waitAll(t, subs, 10, 30*time.Second); dups != 0 {
		t.Errorf("%d duplicates", dups)
	}
	time.Sleep(2 * time.Second) // time for a storm to show
	if n, rc := r.sessions(), r.Metric("pushrelay_amqp_reconnects_total"); n != 2 || rc != 1 {
		t.Errorf("%d sessions, reconnects_total %v after one cancel: want 2 and 1", n, rc)
	}
	if code, body := readyz(t, r.RelayProc); code != 200 {
		t.Errorf("/readyz %d %q after the cancel", code, body)
	}
}
