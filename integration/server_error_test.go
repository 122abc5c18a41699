package integration

import (
	"testing"
	"time"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// flakyPublisher is a publish location that answers 500 to the 23rd
// request of each connection, before the module sees it, and hands every
// other request to the shipped /pub. 500 is what a publisher out of
// shared memory answers, and it closes the connection: whatever the relay
// pipelined behind it was never read and must be sent again, in order.
const flakyPublisher = `
location = /flaky {
    if ($pr_fail) {
        return 500;
    }
    rewrite ^ /pub last;
}
`

const flakyMap = `
map $connection_requests $pr_fail {
    23      1;
    default 0;
}
`

// Issue 12: Nginx answers 500 to about one publish request in 23 (the
// relay reconnects after each, so no connection gets further); every
// message still reaches every kind of subscriber exactly once, in order.
func TestServerErrorsLoseNothing(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		host := uniqueHost("it-5xx-" + string(m))
		n := startNginxExtra(t, m, flakyMap, flakyPublisher)
		p := pipelineOn(t, m, n, host, "/flaky", RelayOptions{})
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
		for seq := 1; seq <= perChannel; seq++ {
			p.broker.MustPublish(seqMsgs(chans, seq)...)
		}
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
