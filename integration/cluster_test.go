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

// Issues 10 and 16: the relay on a three-node RabbitMQ cluster of the
// test's own (cluster_harness_test.go), with amqp.urls naming every node,
// a quorum queue and the shipped prefetch (2048). The nodes run with
// net_ticktime 5 s, what the relay of issue 16 asks of a cluster (60 s is
// Erlang's default). One cluster serves every subtest: starting it takes
// ~20 s.
//
//	NodeKill:      SIGKILL the node the relay consumes from, mid-stream,
//	               start it again 5 s later; three times, each time the
//	               relay's node of the moment, one stream each;
//	LeaderKill:    the same, once, for the quorum queue's leader, on
//	               another node than the relay's;
//	NodeHang:      SIGSTOP the relay's node for 30 s, then SIGCONT;
//	DeliveryLimit: a relay SIGKILLed with a message in flight, again and
//	               again, spends amqp.delivery_limit and the queue itself
//	               dead-letters the message (x-death reason delivery_limit);
//	Cancel:        the queue deleted under the relay: basic.cancel (or the
//	               queue watch, when the broker sends none), then one new
//	               session that redeclares it, no reconnect storm.
//
// Every failover streams 2,000 msg/s over 100 channels through a node that
// is not the victim, and checks per channel at the subscribers (issue 16):
// 0 lost, 0 reordered (a message seen for the first time after a later one
// of its channel), 0 duplicates beyond the producer's own re-sends, and
// browsers without a message for at most 10 s (issue 16's target for a
// hung node: the quorum queue's own leader election plus 2 s, ≤ 10 s in
// all; a kill must not cost more). Each run prints the browsers' gap and
// the relay's time without consuming.
//
// Why the issue-10 version of this test passed while issue 16 measured
// broken order and duplicates. Read from its code, and from one run of this
// version against the relay of e89b89c (2026-12-08, 2 vCPUs shared with
// other sessions' tests; /tmp/cluster-old.log at the time):
//
//  1. Duplicates were excused. It failed only on dups > redelivered +
//     resent, so a redelivered copy of a message Nginx had taken was never
//     the relay's fault: on e89b89c, NodeKill/nchan run 1 had 37 duplicates
//     for 41 redelivered, NodeHang/pushstream 72 for 2,094; both passed that
//     rule. Now only the producer's own re-sends (Broker.Resent) are excused.
//  2. It had no hang. The relay's node SIGSTOPped for 30 s cost the browsers
//     15.8 s (Nchan) and 15.7 s (Push Stream) on e89b89c: the heartbeat
//     noticed after ~15 s. Now NodeHang asserts issue 16's 10 s.
//  3. The subscriber check was not the reason: CheckExcept fails on a
//     message first seen after a later one of its channel ("got 81 after
//     79: messages 80..80 missing or out of order") and counts as a
//     duplicate only a copy of one already seen, so a late redelivery of a
//     message never seen is a failure, not a duplicate. But it stops at a
//     channel's first fault and waitAll then waits its whole 90 s; this
//     test counts lost, reordered and duplicated messages on every channel
//     (cluster_order_test.go) and waits only while messages still come.
//  4. Little was in flight at its kill. The producer sends one message per
//     channel every 50 ms (a round of 100 at 2,000 msg/s), and the relay
//     publishes a message within milliseconds, so at the kill the relay held
//     at most the last round, one message per channel: redelivered was at
//     most 100 in every run in BENCHMARKS.md and 16-100 in the six kills of
//     the run above. A reorder needs the broker to hand the new session a
//     later message of a channel before it returns the one the dead session
//     held; issue 16's examples (75-80 redelivered after 81-84) had six
//     rounds held. Its kill was also always a kill of the queue's leader
//     (the queue is declared, and its leader placed, on the node the relay
//     connects to); here the second and third kills often hit the relay's
//     node with the leader elsewhere (three of the six in the run above).
//     In that run no message came out of order, on either module, in any
//     of the 10 failovers: the order checks are in place, but on a quiet
//     enough machine the old relay does not break order at this pace, and
//     the test then fails on e89b89c through 1 and 2 only. The prefetch is
//     now the shipped 2048 (it was the harness's 1024), which bounds what
//     can come back late, not what is in flight at this pace.
func TestCluster(t *testing.T) {
	c := startCluster(t, 3, clusterOptions{NetTicktime: clusterTicktime, PartitionHandling: "pause_minority"})
	// The first relay creates pushrelay.dead, and NodeKill then kills the
	// node it was connected to: a classic pushrelay.dead would live there
	// alone and fail every session setup until the node is back.
	defer func() {
		if typ := queueTypeOf(c, "pushrelay.dead"); typ != "quorum" {
			t.Errorf("pushrelay.dead is %q, want quorum like the host queues", typ)
		}
	}()
	var figures []string
	for _, run := range clusterRuns {
		t.Run(run.name, func(t *testing.T) {
			eachModule(t, func(t *testing.T, m stack.Module) {
				if run.modules != nil && !slices.Contains(run.modules, m) {
					t.Skipf("%s runs on %v only, to keep the test short", run.name, run.modules)
				}
				// A queue per module: the second run must not find the first's.
				for _, f := range clusterFailover(t, c.on(t), m, "it-cl-"+strings.ToLower(run.name)+"-"+string(m), run) {
					figures = append(figures, fmt.Sprintf("%s on %s: %s", run.name, m, f))
				}
			})
		})
	}
	t.Run("DeliveryLimit", func(t *testing.T) { testDeliveryLimit(t, c.on(t)) })
	t.Run("Cancel", func(t *testing.T) { testQueueDeletedUnderRelay(t, c.on(t)) })
	for _, f := range figures {
		t.Log(f)
	}
}

// clusterTicktime is the test cluster's net_ticktime (s), with
// cluster_partition_handling pause_minority: what the README asks of a
// production cluster, so that a member that hangs costs seconds.
const clusterTicktime = 5

// clusterRun is one kind of failover.
type clusterRun struct {
	name       string
	faults     int // how many, one stream each, in one test
	perChannel int // messages per channel in each stream, at 2,000 msg/s over 100 channels
	victim     func(t *testing.T, c *rabbitCluster, relay *rabbitNode, queue string) *rabbitNode
	inject     func(t *testing.T, c *rabbitCluster, r *clusterRelay, victim *rabbitNode, ngx *Nginx, run int)
	// maxGap, if set, bounds the time the browsers get nothing; every run
	// must get them messages again before a hung node resumes.
	maxGap time.Duration
	// modules it runs on; nil: every module.
	modules []stack.Module
}

var clusterRuns = []clusterRun{
	{name: "NodeKill", faults: 3, perChannel: 200, victim: relaysNode, inject: killFor5s, maxGap: maxBrowserGap},
	{name: "LeaderKill", faults: 1, perChannel: 200, victim: leaderAwayFrom, inject: killFor5s, maxGap: maxBrowserGap},
	// 900 rounds are 45 s: the hang and 12 s after it. What a hang costs
	// depends on where the queue's leader is, so three runs:
	//	NodeHang:          the relay's node, the leader elsewhere: what the
	//	                   relay itself adds (issue 16's target, 10 s);
	//	LeaderHang:        the leader, the relay elsewhere: the quorum
	//	                   queue's own election, which the relay cannot beat;
	//	NodeAndLeaderHang: the relay's node leading the queue: both.
	{name: "NodeHang", faults: 1, perChannel: 900, victim: relaysNodeNotLeading, inject: hangFor30s, maxGap: maxBrowserGap},
	{name: "LeaderHang", faults: 1, perChannel: 900, victim: leaderAwayFrom, inject: hangFor30s,
		modules: []stack.Module{stack.Nchan}},
	{name: "NodeAndLeaderHang", faults: 1, perChannel: 900, victim: relaysNodeLeading, inject: hangFor30s,
		modules: []stack.Module{stack.Nchan}},
}

func relaysNode(t *testing.T, c *rabbitCluster, relay *rabbitNode, queue string) *rabbitNode {
	return relay
}

// relaysNodeNotLeading is the relay's node, once the queue's leader is on
// another one.
func relaysNodeNotLeading(t *testing.T, c *rabbitCluster, relay *rabbitNode, queue string) *rabbitNode {
	leaderAwayFrom(t, c, relay, queue)
	return relay
}

// relaysNodeLeading is the relay's node, which leads the queue: the queue
// is declared, and its leader placed, on the node the relay first
// connects to. A test whose leader moved says so and skips.
func relaysNodeLeading(t *testing.T, c *rabbitCluster, relay *rabbitNode, queue string) *rabbitNode {
	if leader := c.Leader(queue); leader != relay {
		t.Skipf("the relay is on %s and %s leads %s: not the case this run is for", relay.Name, leader.Name, queue)
	}
	return relay
}

// killFor5s SIGKILLs victim and starts it again 5 s later. Before it is
// back the relay must consume through a node that survived, not wait for
// its own to return.
//
// The third kill comes while Nginx stalls for half a second (frozen with
// SIGSTOP): the relay then holds a whole prefetch window of messages it
// has not published, some of them already on their way to Nginx, and the
// broker holds more for it. This is where a relay that drops what it held
// and waits for the broker's redeliveries breaks order (the broker may
// hand the new session later messages first) and pushes duplicates (what
// the stalled Nginx took after all comes again).
func killFor5s(t *testing.T, c *rabbitCluster, r *clusterRelay, victim *rabbitNode, ngx *Nginx, run int) {
	if run == 3 {
		// Well within push.timeout (10 s here; see clusterFailover).
		thaw := freezeNginx(t, ngx)
		time.Sleep(500 * time.Millisecond)
		c.Kill(victim)
		time.Sleep(100 * time.Millisecond)
		thaw()
	} else {
		c.Kill(victim)
	}
	killed := time.Now()
	time.Sleep(5 * time.Second)
	if now := r.node(c); now == victim || r.Metric("pushrelay_amqp_connected") != 1 {
		t.Errorf("5 s after %s was killed the relay is not consuming through another node (its latest session: %s, amqp_connected %v)",
			victim.Name, now.Name, r.Metric("pushrelay_amqp_connected"))
	}
	c.Restart(victim)
	t.Logf("%s back %v after the kill", victim.Name, time.Since(killed).Round(100*time.Millisecond))
}

// hangFor30s freezes victim for 30 s (SIGSTOP), then resumes it. At the
// end of the subtest, pass or fail, the node is resumed (Stop's cleanup,
// which runs first) and, if the hang left the cluster partitioned,
// restarted (Heal).
func hangFor30s(t *testing.T, c *rabbitCluster, r *clusterRelay, victim *rabbitNode, _ *Nginx, _ int) {
	t.Cleanup(func() { c.Heal(victim) })
	relayOn := r.node(c)
	c.Stop(victim)
	stopped := time.Now()
	var moved, unready time.Time
	for time.Since(stopped) < 30*time.Second {
		if moved.IsZero() && r.sessions() > 0 && r.node(c) != victim && r.Metric("pushrelay_amqp_connected") == 1 &&
			r.Metric("pushrelay_amqp_standby") != 1 {
			moved = time.Now()
		}
		if code, _ := readyz(t, r.RelayProc); unready.IsZero() && code != 200 {
			unready = time.Now()
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.Cont(victim)
	switch {
	case victim != relayOn:
		// The relay's own node answers; it has nothing to do but wait.
	case unready.IsZero():
		t.Errorf("/readyz said 200 throughout the 30 s its node hung")
	case unready.Sub(stopped) > 5*time.Second:
		t.Errorf("/readyz said 200 for %v after its node hung (the ping drops a node silent for 3 s)", unready.Sub(stopped).Round(100*time.Millisecond))
	}
	if victim == relayOn && moved.IsZero() {
		t.Errorf("%s resumed after 30 s; the relay did not consume through another node meanwhile", victim.Name)
	} else if victim == relayOn {
		t.Logf("%s resumed after 30 s; /readyz 503 %v and the relay the active consumer through %s %v into the hang", victim.Name,
			unready.Sub(stopped).Round(100*time.Millisecond), r.node(c).Name, moved.Sub(stopped).Round(100*time.Millisecond))
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

// failover is what one fault cost.
type failover struct {
	run             int // 1.. within the test
	victim, leader  string
	relayOn         string
	disconnected    time.Duration // pushrelay_amqp_connected 0, sampled every 100 ms
	stalled         time.Duration // longest time received_total did not grow
	browsersStalled time.Duration // longest gap between any two arrivals at subscribers
	seen            orderCount    // at the subscribers
	resent          int
	redelivered     float64
	sessions        int // new sessions during the run
}

func (f failover) String() string {
	return fmt.Sprintf("run %d: relay on %s, leader %s, victim %s; %v (producer re-sent %d); browsers got nothing for %v, relay not consuming %v (disconnected %v); %v redelivered, %d new sessions",
		f.run, f.relayOn, f.leader, f.victim, f.seen, f.resent, f.browsersStalled.Round(10*time.Millisecond),
		f.stalled.Round(10*time.Millisecond), f.disconnected.Round(10*time.Millisecond), f.redelivered, f.sessions)
}

// maxBrowserGap is issue 16's target for what the relay adds when its own
// node hangs (the quorum queue's own leader election, when the leader
// hangs too, is the broker's: LeaderHang prints it).
const maxBrowserGap = 10 * time.Second

// clusterFailover starts Nginx with module m, 100 subscribers and a relay
// with the shipped prefetch, then run.faults times: streams run.perChannel
// messages per channel at 2,000 msg/s through a node that is not the
// victim, injects the fault 3 s in, and checks what the subscribers got.
func clusterFailover(t *testing.T, c *rabbitCluster, m stack.Module, host string, run clusterRun) []failover {
	host = uniqueHost(host)
	ngx := startNginxModule(t, m)
	// push.timeout 10 s: NodeKill's third run stalls Nginx, and a request
	// Nginx answers after push.timeout is sent again, reaching browsers
	// twice if Nginx took it after all (README, "Failures"): a source of
	// duplicates of its own, not the broker fault's.
	r := startClusterRelay(t, c, RelayOptions{Host: host, Publish: ngx.PublishURL(), Dialect: m.Dialect(), Prefetch: 2048,
		PushTimeout: "10s"}, false)
	chans := channels(host, 100)
	subs := subscribeAll(t, ngx, chans, kindsOn(m)...)
	s := sampleRelay(r.RelayProc)
	defer s.stop()
	const rate = 2000
	var out []failover
	last := 0 // the last message of every channel published so far
	for i := 1; i <= run.faults; i++ {
		relayNode := r.node(c)
		victim := run.victim(t, c, relayNode, r.queue)
		c.waitNotQuorumCritical(victim, 60*time.Second)
		var producer *rabbitNode
		for _, n := range c.Nodes {
			if n != victim && (producer == nil || producer == relayNode) {
				producer = n
			}
		}
		f := failover{run: i, victim: victim.Name, leader: c.Leader(r.queue).Name, relayOn: relayNode.Name}
		t.Logf("run %d: relay on %s, leader %s, producer on %s, victim %s", i, f.relayOn, f.leader, producer.Name, victim.Name)
		b := newBrokerAt(t, producer.URL())
		b.Exchange = r.exchange
		// The session is older than the relay's minHealthySession (5 s) at
		// the fault, as in production: a younger one's loss backs off first.
		waitSessionAge(t, r, 2*time.Second, 30*time.Second)
		sessions, redelivered := r.sessions(), r.Metric("pushrelay_messages_redelivered_total")
		lo, hi := last+1, last+run.perChannel
		began := time.Now()
		wait := streamRange(b, chans, lo, hi, rate)
		time.Sleep(3 * time.Second)
		if at := sessionStart(r); time.Since(at) < 5*time.Second {
			t.Logf("the relay's session is %v old at the fault", time.Since(at).Round(100*time.Millisecond))
		}
		run.inject(t, c, r, victim, ngx, i)
		if err := wait(); err != nil {
			t.Fatal(err)
		}
		f.seen = waitRun(subs, lo, hi, 90*time.Second, 15*time.Second)
		ended := time.Now()
		f.stalled, f.disconnected = s.stall(began, ended)
		f.browsersStalled = arrivalGap(subs, began, ended)
		f.resent = b.Resent
		f.redelivered = r.Metric("pushrelay_messages_redelivered_total") - redelivered
		f.sessions = r.sessions() - sessions
		last = hi
		t.Logf("%s on %s, %s", run.name, m, f)
		if f.seen.lost > 0 || f.seen.reordered > 0 || f.seen.foreign > 0 {
			t.Errorf("run %d (%s killed or hung; relay on %s, leader %s): %d lost, %d reordered, %d not ours, e.g. %s",
				i, f.victim, f.relayOn, f.leader, f.seen.lost, f.seen.reordered, f.seen.foreign, strings.Join(f.seen.examples, "; "))
		}
		if f.seen.dups > f.resent {
			t.Errorf("run %d: %d duplicates at the subscribers, more than the %d messages the producer re-sent (%v redelivered): the relay pushed a copy of what Nginx had taken",
				i, f.seen.dups, f.resent, f.redelivered)
		}
		if run.maxGap > 0 && f.browsersStalled > run.maxGap {
			t.Errorf("run %d: browsers got nothing for %v (the relay consumed nothing for %v), over issue 16's %v",
				i, f.browsersStalled.Round(10*time.Millisecond), f.stalled.Round(10*time.Millisecond), run.maxGap)
		}
		if f.browsersStalled > 25*time.Second {
			t.Errorf("run %d: browsers got nothing for %v: the relay waited for the fault to end",
				i, f.browsersStalled.Round(10*time.Millisecond))
		}
		if f.sessions > 3 {
			t.Errorf("run %d: %d new sessions for one fault: a reconnect storm\n%s", i, f.sessions, warnings(r, 20))
		}
		out = append(out, f)
	}
	logSessions(t, r)
	return out
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
