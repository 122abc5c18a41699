package integration

import (
	"fmt"
	"testing"
	"time"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// flakyPublisher is a publisher server of the test's own, on addr, whose
// /flaky answers 500 to the 23rd request of each connection before the
// module sees it, and publishes every other request as the shipped /pub
// does. 500 is what a publisher out of shared memory answers, and it closes
// the connection: whatever the relay pipelined behind it was never read and
// must be sent again, in order. (A server of its own: the shipped /pub
// lives in the module's snippets, where a test cannot add a condition.)
func flakyPublisher(m stack.Module, addr string) string {
	// As the shipped /pub: Nchan's default buffer of 10 messages would
	// evict what a slow long-poll subscriber has not fetched yet.
	publish := "nchan_publisher http;\n        nchan_channel_id $arg_id;\n" +
		"        nchan_message_buffer_length 200;\n        nchan_message_timeout 10m;"
	if m == stack.PushStream {
		publish = "push_stream_publisher admin;\n        push_stream_channels_path $arg_id;\n        push_stream_store_messages on;"
	}
	return fmt.Sprintf(`
map $connection_requests $pr_fail {
    23      1;
    default 0;
}
server {
    listen %s;
    location = /flaky {
        if ($pr_fail) {
            return 500;
        }
        %s
        keepalive_requests 1000000;
        client_max_body_size 32k;
        client_body_buffer_size 32k;
    }
}
`, addr, publish)
}

// Issue 12: Nginx answers 500 to about one publish request in 23 (the
// relay reconnects after each, so no connection gets further); every
// message still reaches every kind of subscriber exactly once, in order.
func TestServerErrorsLoseNothing(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		host := uniqueHost("it-5xx-" + string(m))
		port, err := stack.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		n := startNginxExtra(t, m, flakyPublisher(m, addr), "")
		p := &pipeline{host: host, nginx: n, broker: newBroker(t, "pushrelay."+host)}
		p.relay = startRelay(t, RelayOptions{Host: host, Exchange: p.broker.Exchange, Dialect: m.Dialect(),
			Publish: "http://" + addr + "/flaky?id={channel}"})
		chans := channels("fivexx", 12)
		kinds := []Kind{EventSource, WebSocket, LongPoll}
		if m == stack.PushStream {
			// Push Stream's long-poll answers every pending message in one
			// body, joined with no separator under the shipped ~text~
			// template: "5" and "6" arrive as "56", which no client can
			// split, so the harness cannot check order there.
			kinds = kinds[:2]
		}
		subs := subscribeAll(t, n, chans, kinds...)

		const perChannel = 50
		publishRounds(p.broker, chans, perChannel)
		if dups := waitAll(t, subs, perChannel, 60*time.Second); dups != 0 {
			t.Errorf("%d duplicates: a 500 answered before the module ran was published anyway?", dups)
		}
		waitFor(t, "every message acked", 10*time.Second, func() bool {
			return p.relay.Metric("pushrelay_messages_in_flight") == 0 && p.broker.QueueDepth("pushrelay."+host) == 0
		})
		// The fault must have happened for the test to mean anything:
		// 600 requests over 4 connections, so about 25 answered 500.
		if r := p.relay.Metric("pushrelay_publish_retries_total"); r < 5 {
			t.Errorf("pushrelay_publish_retries_total = %v: Nginx did not answer 500 as planned", r)
		}
		if got := p.relay.Metric("pushrelay_messages_published_total"); got != float64(len(chans)*perChannel) {
			t.Errorf("pushrelay_messages_published_total = %v, want %d", got, len(chans)*perChannel)
		}
		if d := p.relay.Metric(`pushrelay_publish_refused_total`); d > 0 {
			t.Errorf("pushrelay_publish_refused_total = %v: a 500 must be retried, never dead-lettered", d)
		}
	})
}
