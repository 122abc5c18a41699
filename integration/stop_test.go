package integration

import (
	"strconv"
	"testing"
	"time"

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
