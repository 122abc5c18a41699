package integration

import (
	"bytes"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// pipeline is one frontend: Nginx + Nchan, the relay, and a broker
// connection for the test's web tier.
type pipeline struct {
	nginx  *Nginx
	broker *Broker
	relay  *RelayProc
	host   string
}

func newPipeline(t *testing.T, host string, o RelayOptions) *pipeline {
	t.Helper()
	p := &pipeline{host: host}
	p.nginx = startNginx(t)
	p.broker = newBroker(t, "pushrelay."+host)
	o.Host, o.Exchange, o.Publish = host, p.broker.Exchange, p.nginx.PublishURL()
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

// waitAll waits until every subscriber saw message want of its channel,
// then checks each for loss and order, and returns the duplicates seen.
func waitAll(t *testing.T, subs []*Subscriber, want int, timeout time.Duration) (dups int) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for _, s := range subs {
		for {
			if _, err := s.Check(want); err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		d, err := s.Check(want)
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
	var (
		wg  sync.WaitGroup
		err error
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		interval := time.Duration(len(chans)) * time.Second / time.Duration(rate)
		next := time.Now()
		for seq := 1; seq <= perChannel; seq++ {
			if err = b.Publish(seqMsgs(chans, seq)...); err != nil {
				return
			}
			next = next.Add(interval)
			time.Sleep(time.Until(next))
		}
	}()
	return func() error { wg.Wait(); return err }
}

// Issue 2, test 1: 10,000 messages over 100 channels reach EventSource,
// WebSocket and long-poll subscribers, every one, in order.
func TestEveryMessageArrivesInOrder(t *testing.T) {
	p := newPipeline(t, "it-order", RelayOptions{})
	chans := channels("order", 100)
	subs := subscribeAll(t, p.nginx, chans, EventSource, WebSocket, LongPoll)

	const perChannel = 100
	for seq := 1; seq <= perChannel; seq++ {
		p.broker.MustPublish(seqMsgs(chans, seq)...)
	}
	if dups := waitAll(t, subs, perChannel, 90*time.Second); dups != 0 {
		t.Errorf("%d duplicates in a run without failures", dups)
	}
	waitFor(t, "every message acked", 10*time.Second, func() bool {
		return p.relay.Metric("pushrelay_messages_in_flight") == 0 && p.broker.QueueDepth("pushrelay.it-order") == 0
	})
	if got := p.relay.Metric("pushrelay_messages_published_total"); got != 100*perChannel {
		t.Errorf("pushrelay_messages_published_total = %v, want %d", got, 100*perChannel)
	}
}

// Issue 2, test 2: poison messages land in pushrelay.dead with their
// reason, and every valid message around them arrives, including the one
// pipelined right behind a request Nginx refused.
func TestPoisonIsDeadLetteredWithReason(t *testing.T) {
	// max_body above Nginx's client_max_body_size (32k), so that a 40 KiB
	// body reaches Nginx and gets its 413, while 70 KiB is caught by the
	// relay itself.
	p := newPipeline(t, "it-poison", RelayOptions{MaxBody: 64 << 10})
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
	p.broker.MustPublish(msgs...)
	waitAll(t, subs, 7, 30*time.Second)

	want := map[string]string{
		"no_channel":       "no channel header",
		"invalid_channel":  "invalid channel",
		"reserved_channel": "reserved channel",
		"nginx_413":        "40 KiB body",
		"invalid_header":   "header injection",
		"body_too_large":   "70 KiB body",
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
func faultTest(t *testing.T, host string, fault func(p *pipeline)) {
	p := newPipeline(t, host, RelayOptions{})
	chans := channels(host, 20)
	subs := subscribeAll(t, p.nginx, chans, EventSource, WebSocket, LongPoll)

	const perChannel, rate = 150, 300 // 3000 messages over ~10 s
	wait := streamPublish(p.broker, chans, perChannel, rate)
	time.Sleep(3 * time.Second)
	fault(p)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	dups := waitAll(t, subs, perChannel, 60*time.Second)
	t.Logf("%s: %d duplicates delivered, %d messages re-sent by the producer, %v redelivered by RabbitMQ",
		host, dups, p.broker.Resent, p.relay.Metric("pushrelay_messages_redelivered_total"))
}

// Issue 2, test 3: Nginx down for 5 s mid-stream; nothing is lost.
func TestNginxOutageLosesNothing(t *testing.T) {
	faultTest(t, "it-nginx-outage", func(p *pipeline) {
		p.nginx.Stop()
		waitFor(t, "readyz to report the publisher down", 5*time.Second, func() bool {
			return p.relay.Metric("pushrelay_publisher_reachable") == 0
		})
		time.Sleep(5 * time.Second)
		p.nginx.Start()
	})
}

// Issue 2, test 4: the relay is SIGKILLed mid-stream and restarted.
func TestRelayKillLosesNothing(t *testing.T) {
	faultTest(t, "it-relay-kill", func(p *pipeline) {
		p.relay.Kill()
		time.Sleep(time.Second)
		p.relay.Start()
	})
}

// Issue 2, test 5: every AMQP connection is closed by the broker
// mid-stream; the relay reconnects and nothing is lost.
func TestBrokerClosesConnections(t *testing.T) {
	faultTest(t, "it-amqp-close", func(p *pipeline) {
		rabbitmqctl(t, "close_all_connections", "pushrelay integration test")
		waitFor(t, "the relay to reconnect", 30*time.Second, func() bool {
			return p.relay.Metric("pushrelay_amqp_reconnects_total") >= 1 &&
				p.relay.Metric("pushrelay_amqp_connected") == 1
		})
	})
}
