package integration

import (
	"bytes"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// pipeline is one frontend: Nginx with module m, the relay speaking its
// dialect, and a broker connection for the test's web tier.
type pipeline struct {
	nginx  *Nginx
	broker *Broker
	relay  *RelayProc
	host   string
	// lostByNginx: channel → messages Nginx answered 2xx for while
	// stopping, which its subscribers may never get (nginxOutage).
	lostByNginx map[string]map[int]bool
}

func newPipeline(t *testing.T, m stack.Module, host string, o RelayOptions) *pipeline {
	t.Helper()
	p := &pipeline{host: host}
	p.nginx = startNginxModule(t, m)
	p.broker = newBroker(t, "pushrelay."+host)
	o.Host, o.Exchange, o.Publish, o.Dialect = host, p.broker.Exchange, p.nginx.PublishURL(), m.Dialect()
	p.relay = startRelay(t, o)
	return p
}

func channels(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s:%d", prefix, i)
	}
	return out
}

// kindsOn are the subscriber kinds a test checks on module m. Push
// Stream's long-poll answers every message pending since the last poll in
// one response, joined by the shipped snippet's template (~text~) with no
// separator ("234", publisher-protocols.md §2), so no client can tell the
// messages apart: it is left out there.
func kindsOn(m stack.Module) []Kind {
	if m == stack.PushStream {
		return []Kind{EventSource, WebSocket}
	}
	return []Kind{EventSource, WebSocket, LongPoll}
}

// subscribeAll gives every channel one subscriber, cycling through kinds.
func subscribeAll(t *testing.T, n *Nginx, chans []string, kinds ...Kind) []*Subscriber {
	t.Helper()
	subs := make([]*Subscriber, len(chans))
	for i, ch := range chans {
		subs[i] = subscribe(t, n, ch, kinds[i%len(kinds)])
	}
	waitSubscribed(t, n, subs)
	return subs
}

// seqMsgs returns message seq of every channel: body and message_id are
// the sequence number, so subscribers can check order and completeness.
func seqMsgs(chans []string, seq int) []Msg {
	msgs := make([]Msg, len(chans))
	for i, ch := range chans {
		s := strconv.Itoa(seq)
		msgs[i] = Msg{Channel: ch, Body: []byte(s), ID: s, Type: "comment"}
	}
	return msgs
}

// publishRounds publishes messages 1..rounds of every channel, round by
// round, each round confirmed before the next.
func publishRounds(b *Broker, chans []string, rounds int) {
	for seq := 1; seq <= rounds; seq++ {
		b.MustPublish(seqMsgs(chans, seq)...)
	}
}

// waitAll waits until every subscriber saw message want of its channel,
// then checks each for loss and order, and returns the duplicates seen.
func waitAll(t *testing.T, subs []*Subscriber, want int, timeout time.Duration) (dups int) {
	t.Helper()
	return waitAllExcept(t, subs, want, timeout, nil)
}

// waitAllExcept is waitAll with, per channel, messages allowed to be
// missing (Subscriber.CheckExcept).
func waitAllExcept(t *testing.T, subs []*Subscriber, want int, timeout time.Duration, excused map[string]map[int]bool) (dups int) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for _, s := range subs {
		for {
			if _, err := s.CheckExcept(want, excused[s.Channel]); err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		d, err := s.CheckExcept(want, excused[s.Channel])
		if err != nil {
			t.Error(err)
		}
		dups += d
	}
	return dups
}

// streamPublish publishes perChannel messages to every channel at about
// rate messages/s in total, from its own goroutine; the returned function
// waits for it to finish and reports its error.
func streamPublish(b *Broker, chans []string, perChannel int, rate int) (wait func() error) {
	return streamRange(b, chans, 1, perChannel, rate)
}

// Issue 2, test 1: 10,000 messages over 100 channels reach EventSource,
// WebSocket and long-poll subscribers, every one, in order.
// The SSE id differs by module: Push Stream sends the publisher's Event-Id
// (the message_id) and no id line without one; Nchan ignores Event-Id and
// always numbers messages itself as <unix-sec>:<n>.
func TestEveryMessageArrivesInOrder(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		p := newPipeline(t, m, "it-order", RelayOptions{})
		chans := channels("order", 100)
		subs := subscribeAll(t, p.nginx, chans, kindsOn(m)...)

		const perChannel = 100
		publishRounds(p.broker, chans, perChannel)
		if dups := waitAll(t, subs, perChannel, 90*time.Second); dups != 0 {
			t.Errorf("%d duplicates in a run without failures", dups)
		}
		waitFor(t, "every message acked", 10*time.Second, func() bool {
			return p.relay.Metric("pushrelay_messages_in_flight") == 0 && p.broker.QueueDepth("pushrelay."+p.host) == 0
		})
		if got := p.relay.Metric("pushrelay_messages_published_total"); got != 100*perChannel {
			t.Errorf("pushrelay_messages_published_total = %v, want %d", got, 100*perChannel)
		}
		checkSSEIDs(t, m, subs)
	})
}

var nchanSSEID = regexp.MustCompile(`^[0-9]+:[0-9]+$`)

// checkSSEIDs checks the id line of every message the EventSource
// subscribers got: the warm-up (published without Event-Id) and the
// relay's messages (message_id = the body).
func checkSSEIDs(t *testing.T, m stack.Module, subs []*Subscriber) {
	t.Helper()
	for _, s := range subs {
		if s.Kind != EventSource {
			continue
		}
		got, ids := s.Got(), s.IDs()
		for i, v := range got {
			var want string
			switch {
			case m == stack.Nchan && !nchanSSEID.MatchString(ids[i]):
				t.Errorf("nchan %s: message %d has id %q, want <sec>:<n>", s.Channel, v, ids[i])
			case m == stack.PushStream && v == 0:
				want = "" // no Event-Id, no id line
			case m == stack.PushStream:
				want = strconv.Itoa(v)
			}
			if m == stack.PushStream && ids[i] != want {
				t.Errorf("pushstream %s: message %d has id %q, want %q", s.Channel, v, ids[i], want)
			}
		}
	}
}

// Issue 2, test 2: poison messages land in pushrelay.dead with their
// reason, and every valid message around them arrives, including the one
// pipelined right behind a request Nginx refused.
//
// On Push Stream an empty body is poison too: the module answers 400 ("Empty
// post requests are not allowed") to every one, so the relay dead-letters
// it as empty_body without sending it (alone on a quiet host, a 400 would
// look like a misconfigured publisher and hold the channel). Nchan stores
// and delivers an empty message, so it is not sent there.
func TestPoisonIsDeadLetteredWithReason(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) { testPoison(t, m) })
}

func testPoison(t *testing.T, m stack.Module) {
	// max_body above Nginx's client_max_body_size (32k), so that a 40 KiB
	// body reaches Nginx and gets its 413, while 70 KiB is caught by the
	// relay itself.
	p := newPipeline(t, m, "it-poison", RelayOptions{MaxBody: 64 << 10})
	p.broker.Drain("pushrelay.dead")
	const ch = "poison:1"
	subs := subscribeAll(t, p.nginx, []string{ch}, EventSource)

	valid := func(seq int) Msg { return seqMsgs([]string{ch}, seq)[0] }
	msgs := []Msg{
		valid(1),
		{Body: []byte("no channel header")},
		valid(2),
		{Channel: "has space", Body: []byte("invalid channel")},
		valid(3),
		{Channel: "ALL", Body: []byte("reserved channel")},
		valid(4),
		{Channel: ch, Body: bytes.Repeat([]byte("x"), 40<<10)},
		valid(5),
		{Channel: ch, Body: []byte("header injection"), Type: "comment\r\nX-Injected: 1"},
		valid(6),
		{Channel: ch, Body: bytes.Repeat([]byte("y"), 70<<10)},
		valid(7),
	}
	last := 7
	if m == stack.PushStream {
		last = 8
		msgs = append(msgs, Msg{Channel: ch, Body: []byte{}}, valid(last))
	}
	p.broker.MustPublish(msgs...)
	waitAll(t, subs, last, 30*time.Second)

	want := map[string]string{
		"no_channel":       "no channel header",
		"invalid_channel":  "invalid channel",
		"reserved_channel": "reserved channel",
		"nginx_413":        "40 KiB body",
		"invalid_header":   "header injection",
		"body_too_large":   "70 KiB body",
	}
	if m == stack.PushStream {
		want["empty_body"] = "empty body"
	}
	var dead []amqp.Delivery
	waitFor(t, "6 dead letters", 10*time.Second, func() bool {
		dead = append(dead, p.broker.Drain("pushrelay.dead")...)
		return len(dead) >= len(want)
	})
	got := map[string]bool{}
	for _, d := range dead {
		reason, _ := d.Headers["x-pushrelay-reason"].(string)
		if _, ok := want[reason]; !ok {
			t.Errorf("dead letter with unexpected reason %q (body %.40q)", reason, d.Body)
		}
		got[reason] = true
	}
	for reason, what := range want {
		if !got[reason] {
			t.Errorf("%s: no dead letter with reason %q", what, reason)
		}
		if v := p.relay.Metric(`pushrelay_messages_dead_lettered_total{reason="` + reason + `"}`); v != 1 {
			t.Errorf("dead-lettered{reason=%q} = %v, want 1", reason, v)
		}
	}
	if len(dead) != len(want) {
		t.Errorf("%d dead letters, want %d", len(dead), len(want))
	}
}

// faultTest streams messages, runs fault in the middle, and checks that
// every subscriber still got every message in order.
// Each module runs it in its own subtest.
// Every duplicate must have a cause, a redelivery or a producer's resend
// (each channel has one subscriber, so one repeat shows once); check, if
// given, asserts what the fault may cost beyond that.
func faultTest(t *testing.T, host string, fault func(t *testing.T, p *pipeline), check ...func(t *testing.T, r faultResult)) {
	eachModule(t, func(t *testing.T, m stack.Module) { faultTestOn(t, m, host, defaultLoad, fault, check...) })
}

// faultResult is what a fault cost: duplicates the subscribers saw,
// messages the producer sent again, and deliveries RabbitMQ flagged
// redelivered to the relay running at the end.
type faultResult struct {
	dups, resent int
	redelivered  float64
}

// streamLoad is the traffic a fault test streams: messages per channel
// over 20 channels, at rate messages/s in all.
type streamLoad struct{ perChannel, rate int }

var defaultLoad = streamLoad{perChannel: 150, rate: 300} // 3000 messages over ~10 s

func faultTestOn(t *testing.T, m stack.Module, host string, load streamLoad, fault func(t *testing.T, p *pipeline), check ...func(t *testing.T, r faultResult)) {
	// The queue is named after the host: two runs of one fault test on the
	// same broker at once would otherwise consume each other's messages.
	p := newPipeline(t, m, uniqueHost(host), RelayOptions{})
	chans := channels(host, 20)
	subs := subscribeAll(t, p.nginx, chans, kindsOn(m)...)

	perChannel, rate := load.perChannel, load.rate
	wait := streamPublish(p.broker, chans, perChannel, rate)
	time.Sleep(3 * time.Second)
	fault(t, p)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	dups := waitAllExcept(t, subs, perChannel, 60*time.Second, p.lostByNginx)
	r := faultResult{dups: dups, resent: p.broker.Resent, redelivered: p.relay.Metric("pushrelay_messages_redelivered_total")}
	t.Logf("%s on %s: %d duplicates delivered, %d messages re-sent by the producer, %v redelivered by RabbitMQ",
		host, m, r.dups, r.resent, r.redelivered)
	if float64(r.dups) > r.redelivered+float64(r.resent) {
		t.Errorf("%d duplicates, more than the %v redeliveries and %d producer resends: the relay published something twice on its own",
			r.dups, r.redelivered, r.resent)
	}
	for _, c := range check {
		c(t, r)
	}
}

// Issue 2, test 3: Nginx down for 5 s mid-stream; nothing is lost. A
// restart empties both modules' stores; the subscribers resume on the new
// instance from what it stored since they lost the connection (Nchan: an id
// older than its buffer replays it all; Push Stream: by If-Modified-Since,
// see Subscriber.pushStreamResume).
func TestNginxOutageLosesNothing(t *testing.T) {
	// Nginx is stopped as systemd stops it, gracefully (QUIT): a fast stop
	// (TERM) may drop a message it has just answered 2xx for, which the
	// relay has rightly acked (README, "Failures"). The relay keeps its
	// AMQP session throughout, so nothing is redelivered or repeated.
	//
	// A restart empties the module's store, and the relay flushes what
	// waited for the outage into the new instance at once; a subscriber
	// that reconnects after that gets only what the store still holds:
	// Push Stream keeps 20 messages per channel in the shipped snippet
	// (Nchan 200). Push Stream never finishes a graceful stop while
	// subscribers are connected (killed after 5 s, as Debian's unit does),
	// so its outage is ~10 s: its stream is slowed to 1.5 messages/s per
	// channel to stay within the store. README, "Stopping Nginx".
	eachModule(t, func(t *testing.T, m stack.Module) {
		load := defaultLoad
		if m == stack.PushStream {
			load = streamLoad{perChannel: 30, rate: 30}
		}
		faultTestOn(t, m, "it-nginx-outage", load, nginxOutage, func(t *testing.T, r faultResult) {
			if r.redelivered != 0 || r.dups != 0 {
				t.Errorf("%v redelivered, %d duplicates: an Nginx outage must cost neither", r.redelivered, r.dups)
			}
		})
	})
}

// nginxOutage stops Nginx gracefully and starts it 5 s later. A worker
// told to quit may still accept a new publisher connection and answer 2xx
// (Nchan: 201, "delivered") just before it exits, and its subscribers never
// get the message (seen about 1 run in 8; README, "Stopping Nginx"). The
// relay rightly acks such a message: those the publisher log shows answered
// 2xx after the QUIT are excused (p.lostByNginx). Any other gap fails.
func nginxOutage(t *testing.T, p *pipeline) {
	quitAt := time.Now()
	p.nginx.Quit()
	t.Logf("nginx quit gracefully in %v", time.Since(quitAt).Round(time.Millisecond))
	p.lostByNginx = answeredSince(p.nginx.PublisherLog(), quitAt)
	for ch, seqs := range p.lostByNginx {
		t.Logf("%s: Nginx answered 2xx for %v after the QUIT: they may never reach its subscribers", ch, slices.Sorted(maps.Keys(seqs)))
	}
	waitFor(t, "readyz to report the publisher down", 5*time.Second, func() bool {
		return p.relay.Metric("pushrelay_publisher_reachable") == 0
	})
	time.Sleep(5 * time.Second)
	p.nginx.Start()
}

// answeredSince reads a publisher access log (stack.Nginx.PublisherLog)
// and returns, per channel, the messages answered 2xx at or after since.
func answeredSince(log string, since time.Time) map[string]map[int]bool {
	out := map[string]map[int]bool{}
	for _, line := range strings.Split(log, "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || !strings.HasPrefix(f[1], "2") {
			continue
		}
		at, err := strconv.ParseFloat(f[0], 64)
		seq, err2 := strconv.Atoi(f[3])
		if err != nil || err2 != nil || at < float64(since.UnixMicro())/1e6 {
			continue
		}
		if out[f[2]] == nil {
			out[f[2]] = map[int]bool{}
		}
		out[f[2]][seq] = true
	}
	return out
}

// Issue 2, test 4: the relay is SIGKILLed mid-stream and restarted.
func TestRelayKillLosesNothing(t *testing.T) {
	faultTest(t, "it-relay-kill", func(t *testing.T, p *pipeline) {
		// Kill only with messages in flight: a kill between two bursts,
		// with everything acked, would test nothing.
		var inFlight float64
		waitFor(t, "messages in flight to kill the relay under", 10*time.Second, func() bool {
			inFlight = p.relay.Metric("pushrelay_messages_in_flight")
			return inFlight > 0
		})
		p.relay.Kill()
		t.Logf("SIGKILL with %v messages in flight", inFlight)
		time.Sleep(time.Second)
		p.relay.Start()
	}, func(t *testing.T, r faultResult) {
		// What was in flight was unacked at the kill, so the broker
		// redelivers it; nothing means the kill hit an idle relay after all.
		if r.redelivered < 1 {
			t.Errorf("nothing redelivered after a SIGKILL with messages in flight")
		}
	})
}

// Issue 2, test 5: every AMQP connection is closed by the broker
// mid-stream; the relay reconnects and nothing is lost.
func TestBrokerClosesConnections(t *testing.T) {
	faultTest(t, "it-amqp-close", func(t *testing.T, p *pipeline) {
		rabbitmqctl(t, "close_all_connections", "pushrelay integration test")
		waitFor(t, "the relay to reconnect", 30*time.Second, func() bool {
			return p.relay.Metric("pushrelay_amqp_reconnects_total") >= 1 &&
				p.relay.Metric("pushrelay_amqp_connected") == 1
		})
	})
}

// The excuse nginxOutage makes covers the messages the publisher log shows
// answered 2xx after the QUIT, and no other gap.
func TestLostByNginxExcusesOnlyWhatItAnswered(t *testing.T) {
	quit := time.Unix(1796232253, 634_000_000)
	log := "1796232253.568 201 c:1 2\n1796232253.637 201 c:1 3\n1796232253.640 503 c:1 4\n1796232258.691 202 c:1 4\n"
	lost := answeredSince(log, quit)
	if want := map[string]map[int]bool{"c:1": {3: true, 4: true}}; !maps.EqualFunc(lost, want, maps.Equal) {
		t.Fatalf("answeredSince = %v, want %v", lost, want)
	}
	s := &Subscriber{Kind: EventSource, Channel: "c:1", got: []int{0, 1, 2, 4, 5}}
	if _, err := s.CheckExcept(5, lost["c:1"]); err != nil {
		t.Errorf("3 excused, yet: %v", err)
	}
	if _, err := s.CheckExcept(5, map[int]bool{1: true}); err == nil {
		t.Error("3 missing and not excused, yet no error")
	}
}
