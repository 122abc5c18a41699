package integration

import (
	"strconv"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// slowPublisher throttles every request to the publish location (its URI
// is one limit_req key) to slowRate a second, delaying rather than
// refusing. The relay then always has messages handed to Nginx and not yet
// answered, deterministically, which is what a stop must deal with.
// Subscriber URIs are keys of their own and are not slowed.
const slowRate = 40

func slowPublisher() (http, server string) {
	// limit_req at http level: the shipped /pub is in a server of its own.
	return "limit_req_zone $uri zone=pr_slow:1m rate=" + strconv.Itoa(slowRate) + "r/s;\n" +
		"limit_req zone=pr_slow burst=100000;", ""
}

// Issue 12: a clean stop (SIGTERM, as `systemctl stop` and every package
// upgrade do) in the middle of a stream. What was delivered but not yet
// published must stay unacked and arrive after the restart (not acked and
// lost), and what Nginx took must be acked before the exit (not redelivered
// and shown twice): after the restart the queue holds nothing, RabbitMQ
// redelivers nothing, and the subscriber sees every message once, in order.
func TestCleanStopLosesNothingAndRepeatsNothing(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		host := uniqueHost("it-clean-stop-" + string(m))
		queue := "pushrelay." + host
		slowHTTP, slowServer := slowPublisher()
		n := startNginxExtra(t, m, slowHTTP, slowServer)
		p := pipelineOn(t, m, n, host, "/pub", RelayOptions{})
		const ch = "stop:1"
		sub := subscribe(t, n, ch, EventSource)
		waitSubscribed(t, n, []*Subscriber{sub})

		// 120 messages, all within one prefetch window: every one is
		// delivered to the relay before the stop, none still in the queue.
		const total = 120
		for seq := 1; seq <= total; seq++ {
			p.broker.MustPublish(seqMsgs([]string{ch}, seq)...)
		}
		waitFor(t, "the first messages published", 10*time.Second, func() bool {
			return p.relay.Metric("pushrelay_messages_published_total") >= 10
		})
		inFlight := p.relay.Metric("pushrelay_messages_in_flight")
		// At slowRate/s, 110 or so are still waiting for Nginx: the stop
		// must not be a no-op for this test to mean anything.
		if inFlight < 20 {
			t.Fatalf("only %v messages in flight at the stop; the test needs a backlog", inFlight)
		}
		stopAt := time.Now()
		p.relay.Stop()
		t.Logf("SIGTERM with %v in flight; stopped in %v", inFlight, time.Since(stopAt).Round(time.Millisecond))

		// Everything delivered was either acked after Nginx took it, or is
		// back in the queue unpublished; nothing published is left unacked.
		published := sub.Got()
		if depth := p.broker.QueueDepth(queue); depth != 0 {
			t.Errorf("%d messages back in the queue after a clean stop (the subscriber had %d): "+
				"delivered messages were left unacked, and will be redelivered", depth, len(published))
		}

		p.relay.Start()
		dups, err := waitCheck(sub, total, 30*time.Second)
		if err != nil {
			t.Error(err)
		}
		if dups != 0 {
			t.Errorf("%d duplicates after a clean stop", dups)
		}
		waitFor(t, "the queue to drain", 10*time.Second, func() bool {
			return p.relay.Metric("pushrelay_messages_in_flight") == 0 && p.broker.QueueDepth(queue) == 0
		})
		if r := p.relay.Metric("pushrelay_messages_redelivered_total"); r != 0 {
			t.Errorf("pushrelay_messages_redelivered_total = %v after a clean stop, want 0", r)
		}
	})
}

// Issue 12: a clean stop while Nginx is down. Nothing can be published
// before the shutdown deadline, so everything delivered must be left
// unacked for the next start; acking it on the way out loses it all.
func TestCleanStopWithNginxDownLosesNothing(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		host := uniqueHost("it-stop-nginx-down-" + string(m))
		queue := "pushrelay." + host
		p := newPipeline(t, m, host, RelayOptions{})
		const ch, total = "stopdown:1", 50
		p.nginx.Quit()
		for seq := 1; seq <= total; seq++ {
			p.broker.MustPublish(seqMsgs([]string{ch}, seq)...)
		}
		waitFor(t, "every message delivered to the relay", 10*time.Second, func() bool {
			return p.relay.Metric("pushrelay_messages_in_flight") == total
		})
		p.relay.Stop()
		if depth := p.broker.QueueDepth(queue); depth != total {
			t.Errorf("%d of %d messages back in the queue after a stop with Nginx down: the rest were acked unpublished", depth, total)
		}

		p.nginx.Start()
		sub := subscribe(t, p.nginx, ch, EventSource)
		waitSubscribed(t, p.nginx, []*Subscriber{sub})
		p.relay.Start()
		dups, err := waitCheck(sub, total, 30*time.Second)
		if err != nil {
			t.Error(err)
		}
		if dups != 0 {
			t.Errorf("%d duplicates: nothing was published before the stop", dups)
		}
		if r := p.relay.Metric("pushrelay_messages_redelivered_total"); r != total {
			t.Errorf("pushrelay_messages_redelivered_total = %v, want %d: all of them were left unacked", r, total)
		}
	})
}

// Issue 10: clean stops in the middle of a drain, on a quorum queue with
// a strict delivery_limit (2). Two RabbitMQ 3.10 behaviours meet here: its
// quorum queue channel drops acks it has not sent yet when it closes, so
// the next session publishes those messages again; and it hands back what
// is on the way to a consumer that basic.cancel ended, so the next session
// gets it after later messages. Six stops, then every message arrives
// once, in order, and pushrelay.dead holds none of this queue's.
func TestCleanStopsOnAQuorumQueue(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		host := uniqueHost("it-stop-limit-" + string(m))
		queue := "pushrelay." + host
		p := newPipeline(t, m, host, RelayOptions{AMQP: "queue_type = \"quorum\"\ndelivery_limit = 2"})
		chans := channels("stoplimit", 50)
		subs := subscribeAll(t, p.nginx, chans, EventSource)
		p.relay.Stop()
		p.broker.Drain("pushrelay.dead")
		const rounds = 400
		publishRounds(p.broker, chans, rounds)

		for stop := 1; stop <= 6; stop++ {
			if err := p.relay.Launch(); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the relay to receive", 20*time.Second, func() bool {
				return p.relay.Metric("pushrelay_messages_received_total") >= 1
			})
			p.relay.Stop()
		}
		p.relay.Start()
		dups := waitAll(t, subs, rounds, 30*time.Second)
		dead := 0
		for _, d := range p.broker.Drain("pushrelay.dead") {
			if deaths, _ := d.Headers["x-death"].([]any); len(deaths) > 0 {
				if x, ok := deaths[0].(amqp.Table); ok && x["queue"] == queue {
					dead++
				}
			}
		}
		t.Logf("6 clean stops in a drain of %d messages: %d dead-lettered by the queue, %d duplicates", rounds*len(chans), dead, dups)
		if dead != 0 {
			t.Errorf("%d messages dead-lettered by %s (delivery_limit 2) after clean stops with a working Nginx", dead, queue)
		}
		if dups != 0 {
			t.Errorf("%d duplicates after clean stops: acks were lost", dups)
		}
	})
}
