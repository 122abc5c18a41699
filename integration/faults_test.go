package integration

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// Issue 8: the publish path under the faults a big site meets every week,
// each driven through real Nginx (both modules), real RabbitMQ and the relay
// binary. The publisher under test is a server{} of its own whose /pub
// location runs the fault's directives before the module's publisher; the
// subscribers use the project's shipped snippet on the same instance.

// faultPublisher renders a publisher server on listen for module m, with
// extra directives in its /pub location and the given keepalive_timeout.
func faultPublisher(m stack.Module, listen, keepalive, extra string) string {
	module := `nchan_publisher http;
            nchan_channel_id $arg_id;
            nchan_message_buffer_length 200;
            nchan_message_timeout 10m;`
	if m == stack.PushStream {
		module = `push_stream_publisher normal;
            push_stream_channels_path $arg_id;
            push_stream_store_messages on;`
	}
	return fmt.Sprintf(`server {
        listen %s;
        location = /pub {
            %s
            %s
            keepalive_requests 1000000;
            keepalive_timeout %s;
            client_max_body_size 32k;
            client_body_buffer_size 32k;
        }
    }`, listen, extra, module, keepalive)
}

// faultPipeline is newPipeline with the relay publishing through a
// faultPublisher; it returns that publisher's URL template too.
func faultPipeline(t *testing.T, m stack.Module, host, keepalive, extra string, o RelayOptions) (*pipeline, string) {
	t.Helper()
	port, err := stack.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	listen := fmt.Sprintf("127.0.0.1:%d", port)
	n := startNginxWith(t, stack.NginxOptions{Module: m, HTTP: faultPublisher(m, listen, keepalive, extra)})
	url := "http://" + listen + "/pub?id={channel}"
	return pipelineTo(t, m, n, host, url, o), url
}

// ownDeadLetters drains pushrelay.dead and keeps the copies from queue:
// the dead-letter queue is shared, and other tests' copies are not ours.
func ownDeadLetters(b *Broker, queue string) []amqp.Delivery {
	var mine []amqp.Delivery
	for _, d := range b.Drain("pushrelay.dead") {
		if q, _ := d.Headers["x-pushrelay-queue"].(string); q == queue {
			mine = append(mine, d)
		}
	}
	return mine
}

// deadLettersOf drains pushrelay.dead until it has n copies from queue,
// and returns them; copies from other queues are dropped.
func deadLettersOf(t *testing.T, b *Broker, queue string, n int, timeout time.Duration) []amqp.Delivery {
	t.Helper()
	var mine []amqp.Delivery
	waitFor(t, fmt.Sprintf("%d dead letters from %s", n, queue), timeout, func() bool {
		for _, d := range b.Drain("pushrelay.dead") {
			if q, _ := d.Headers["x-pushrelay-queue"].(string); q == queue {
				mine = append(mine, d)
			}
		}
		return len(mine) >= n
	})
	return mine
}

// brokerUnacked is what RabbitMQ counts unacknowledged on queue.
func brokerUnacked(t *testing.T, queue string) int {
	t.Helper()
	out, err := exec.Command("rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name", "messages_unacknowledged").Output()
	if err != nil {
		t.Fatalf("rabbitmqctl list_queues: %v", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == queue {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	t.Fatalf("queue %s not listed", queue)
	return 0
}

// readyz returns the relay's /readyz status and body.
func readyz(t *testing.T, r *RelayProc) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + r.MetricsAddr + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b))
}

// Test 1: Nginx answers 500 for ever on one channel. Every message of the
// other 100 channels arrives in order and is acked (prefetch 100, so a
// stuck head that held the window would stop the host after ~100); the
// stuck channel's messages wait, in order, then spend their retry budget
// and go to pushrelay.dead as nginx_5xx_budget with their bodies.
func TestStuckChannelHoldsUpOnlyItself(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		p, _ := faultPipeline(t, m, "it-stuck", "300s", `if ($arg_id = "stuck") { return 500; }`,
			RelayOptions{Prefetch: 100, Push: `retry_budget = "8s"`})
		p.broker.Drain("pushrelay.dead")
		chans := channels("stuck-others", 100)
		subs := subscribeAll(t, p.nginx, chans, EventSource)

		const perChannel = 30
		p.broker.MustPublish(Msg{Channel: "stuck", Body: []byte("stuck-1"), ID: "s1"}, Msg{Channel: "stuck", Body: []byte("stuck-2"), ID: "s2"})
		publishRounds(p.broker, chans, perChannel)
		if dups := waitAll(t, subs, perChannel, 60*time.Second); dups != 0 {
			t.Errorf("%d duplicates", dups)
		}
		// The others are acked although the stuck head is older than them.
		waitFor(t, "every other message acked", 10*time.Second, func() bool {
			return p.relay.Metric("pushrelay_messages_unacked") <= 2
		})
		if got := p.relay.Metric("pushrelay_messages_in_flight"); got < 1 {
			t.Errorf("in flight %v while the stuck channel waits, want ≥ 1", got)
		}
		// The broker's own count: an ack past the stuck head must never
		// cover it, or a crash now would lose it.
		if got := brokerUnacked(t, "pushrelay."+p.host); got != 2 {
			t.Errorf("the broker holds %d messages unacked while the stuck channel waits, want its 2", got)
		}
		if got := p.relay.Metric("pushrelay_publish_oldest_pending_seconds"); got <= 0 {
			t.Errorf("oldest pending %v s while the stuck channel waits, want > 0", got)
		}
		if code, body := readyz(t, p.relay); code != 200 {
			t.Errorf("/readyz %d %q while other channels publish, want 200", code, body)
		}

		// The budget is spent only while the publisher demonstrably works
		// for other channels: on a quiet host a channel failing alone
		// cannot be told from the start of an outage, and it waits. So
		// keep a busy site's traffic flowing on other channels.
		stop := make(chan struct{})
		trickled := make(chan struct{})
		go func() {
			defer close(trickled)
			for seq := perChannel + 1; ; seq++ {
				select {
				case <-stop:
					return
				case <-time.After(50 * time.Millisecond):
					p.broker.Publish(seqMsgs(chans[:5], seq)...)
				}
			}
		}()
		dead := deadLettersOf(t, p.broker, "pushrelay."+p.host, 2, 30*time.Second)
		close(stop)
		<-trickled
		for i, d := range dead {
			want := fmt.Sprintf("stuck-%d", i+1)
			if string(d.Body) != want || d.Headers["x-pushrelay-reason"] != "nginx_5xx_budget" ||
				d.Headers["x-pushrelay-status"] != int32(500) || d.Headers["channel"] != "stuck" {
				t.Errorf("dead letter %d: body %q headers %v, want %q nginx_5xx_budget 500 in order", i, d.Body, d.Headers, want)
			}
		}
		waitFor(t, "the queue empty and nothing in flight", 10*time.Second, func() bool {
			return p.relay.Metric("pushrelay_messages_in_flight") == 0 && p.relay.Metric("pushrelay_messages_unacked") == 0 &&
				p.broker.QueueDepth("pushrelay."+p.host) == 0
		})
		if got := p.relay.Metric(`pushrelay_messages_dead_lettered_total{reason="nginx_5xx_budget"}`); got != 2 {
			t.Errorf("dead-lettered{nginx_5xx_budget} = %v, want 2", got)
		}
	})
}

// Test 2: a publisher that answers 403 to everything (the allow list
// leaves the relay out). Nothing is dead-lettered, /readyz names the
// fault; a reload with the right URL delivers every message, in order.
func TestRefusingPublisherDeadLettersNothing(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		o := RelayOptions{Push: `retry_budget = "2s"`}
		p, _ := faultPipeline(t, m, "it-refusing", "300s", "deny all;", o)
		p.broker.Drain("pushrelay.dead")
		chans := channels("refusing", 30)
		subs := subscribeAll(t, p.nginx, chans, EventSource)

		const perChannel = 10
		publishRounds(p.broker, chans, perChannel)
		waitFor(t, "/readyz to name the 403", 15*time.Second, func() bool {
			code, body := readyz(t, p.relay)
			return code == 503 && strings.Contains(body, "403") && strings.Contains(body, "allow list")
		})
		if got := p.relay.Metric(`pushrelay_publisher_state{state="misconfigured"}`); got != 1 {
			t.Errorf("publisher_state{misconfigured} = %v, want 1", got)
		}
		time.Sleep(4 * time.Second) // twice the retry budget: still nothing may go
		if dead := ownDeadLetters(p.broker, "pushrelay."+p.host); len(dead) != 0 {
			t.Fatalf("%d messages dead-lettered while the publisher was misconfigured (first: %v)", len(dead), dead[0].Headers)
		}
		if !strings.Contains(p.relay.Log(), "publisher fault") {
			t.Error("no log line names the publisher fault")
		}

		o.Publish = p.nginx.PublishURL()
		o.Host, o.Exchange, o.Dialect = p.host, p.broker.Exchange, m.Dialect()
		p.relay.WriteConfig(o)
		p.relay.Reload()
		if dups := waitAll(t, subs, perChannel, 60*time.Second); dups != 0 {
			t.Errorf("%d duplicates", dups)
		}
		waitFor(t, "/readyz 200 after the fix", 30*time.Second, func() bool {
			code, _ := readyz(t, p.relay)
			return code == 200
		})
		if dead := ownDeadLetters(p.broker, "pushrelay."+p.host); len(dead) != 0 {
			t.Errorf("%d messages dead-lettered", len(dead))
		}
	})
}

// Test 4: a proxy or limit_req in front of /pub answers 503 to one request
// in ten and keeps the connection open, so what was pipelined behind was
// processed. Subscribers see every channel in order, nothing twice.
func TestRetryableAnswerOnKeepAliveKeepsOrder(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		p, _ := faultPipeline(t, m, "it-keepalive-503", "300s", `if ($connection_requests ~ "7$") { return 503; }`,
			RelayOptions{Connections: 2})
		chans := channels("ka503", 20)
		subs := subscribeAll(t, p.nginx, chans, EventSource)
		const perChannel = 50
		publishRounds(p.broker, chans, perChannel)
		// Order is checked by waitAll. On Nchan nothing repeats: the relay
		// trusts the answers after a 503 on an open connection. On Push
		// Stream it may not (its early rejections leave the body unread),
		// so what was behind is resent: other channels may repeat there.
		if dups := waitAll(t, subs, perChannel, 60*time.Second); dups != 0 && m == stack.Nchan {
			t.Errorf("%d duplicates: a request behind a 503 was published again", dups)
		}
		if got := p.relay.Metric("pushrelay_publish_retries_total"); got == 0 {
			t.Error("no retries counted: the 503s never happened, so the test tested nothing")
		}
	})
}

// Test 5: Nginx closes the relay's idle connection after keepalive_timeout
// (1 s). The next publish redials at once: no retry, no WARN, ready.
func TestIdleCloseIsNotAnOutage(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		p, _ := faultPipeline(t, m, "it-idle", "1s", "", RelayOptions{Connections: 1})
		subs := subscribeAll(t, p.nginx, []string{"idle"}, EventSource)
		p.broker.MustPublish(seqMsgs([]string{"idle"}, 1)...)
		waitAll(t, subs, 1, 10*time.Second)
		time.Sleep(2500 * time.Millisecond) // past keepalive_timeout: Nginx closed it
		p.broker.MustPublish(seqMsgs([]string{"idle"}, 2)...)
		waitAll(t, subs, 2, 10*time.Second)
		if got := p.relay.Metric("pushrelay_publish_retries_total"); got != 0 {
			t.Errorf("publish_retries_total = %v after an idle close, want 0", got)
		}
		for _, line := range strings.Split(p.relay.Log(), "\n") {
			// The stats scrape warns on its own: this publisher server has
			// no /channels-stats.
			if strings.Contains(line, "level=WARN") && !strings.Contains(line, "nginx stats") {
				t.Errorf("an idle close logged a warning: %s", line)
			}
		}
		if code, body := readyz(t, p.relay); code != 200 {
			t.Errorf("/readyz %d %q after an idle close", code, body)
		}
	})
}

// Test 3: a poison storm (bad ids, ALL, CR/LF in type, oversize) mixed into
// valid traffic: every valid message arrives in order, and every poison
// message is in pushrelay.dead with its reason and body.
func TestPoisonStormBesideValidTraffic(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		p := newPipeline(t, m, "it-storm", RelayOptions{})
		p.broker.Drain("pushrelay.dead")
		chans := channels("storm", 50)
		subs := subscribeAll(t, p.nginx, chans, EventSource)
		poison := []Msg{
			{Channel: "bad id", Body: []byte("p-invalid")},
			{Channel: "ALL", Body: []byte("p-reserved")},
			{Channel: "storm:x", Body: []byte("p-header"), Type: "a\r\nX-Injected: 1"},
			{Channel: "storm:y", Body: bytes.Repeat([]byte("z"), 40<<10)},
		}
		reasons := []string{"invalid_channel", "reserved_channel", "invalid_header", "body_too_large"}
		const perChannel = 20
		for seq := 1; seq <= perChannel; seq++ { // each round: valid, then one of each poison
			batch := seqMsgs(chans, seq)
			for j, pm := range poison {
				pm.ID = fmt.Sprintf("%s-%d", reasons[j], seq)
				batch = append(batch, pm)
			}
			p.broker.MustPublish(batch...)
		}
		if dups := waitAll(t, subs, perChannel, 60*time.Second); dups != 0 {
			t.Errorf("%d duplicates", dups)
		}
		n := perChannel * len(poison)
		dead := deadLettersOf(t, p.broker, "pushrelay."+p.host, n, 30*time.Second)
		count := map[string]int{}
		for _, d := range dead {
			reason, _ := d.Headers["x-pushrelay-reason"].(string)
			count[reason]++
			if !strings.HasPrefix(d.MessageId, reason+"-") {
				t.Errorf("dead letter %q has reason %q", d.MessageId, reason)
			}
			if len(d.Body) == 0 {
				t.Errorf("dead letter %q has no body", d.MessageId)
			}
		}
		for _, r := range reasons {
			if count[r] != perChannel {
				t.Errorf("%d dead letters with reason %s, want %d", count[r], r, perChannel)
			}
		}
		if len(dead) != n {
			t.Errorf("%d dead letters, want %d", len(dead), n)
		}
	})
}

// memoryAlarm raises a broker memory alarm (watermark far below use), and
// returns a function that restores the watermark it found; cleanup calls
// it too, pass or fail. Every connection that publishes is blocked until
// then, so the test's producer must have published before.
func memoryAlarm(t *testing.T) (restore func()) {
	t.Helper()
	out, err := exec.Command("rabbitmqctl", "-q", "eval", "vm_memory_monitor:get_vm_memory_high_watermark().").Output()
	if err != nil {
		t.Fatalf("read the memory watermark: %v", err)
	}
	was := strings.TrimSpace(string(out))
	if _, err := strconv.ParseFloat(was, 64); err != nil {
		t.Skipf("memory watermark %q is not a fraction; not touching it", was)
	}
	var once sync.Once
	restore = func() {
		once.Do(func() {
			if out, err := exec.Command("rabbitmqctl", "set_vm_memory_high_watermark", was).CombinedOutput(); err != nil {
				t.Errorf("restore the memory watermark to %s: %v\n%s", was, err, out)
			}
		})
	}
	t.Cleanup(restore)
	rabbitmqctl(t, "set_vm_memory_high_watermark", "0.000001")
	waitFor(t, "the memory alarm", 15*time.Second, func() bool {
		out, _ := exec.Command("rabbitmqctl", "-q", "eval", "rabbit_alarm:get_alarms().").Output()
		return strings.Contains(string(out), "memory")
	})
	return restore
}

// Test 6: a broker memory alarm while poison is being dead-lettered. The
// alarm blocks the relay's dead-letter connection; consuming, publishing
// to Nginx and acking the valid messages go on, on the other connection.
// When the alarm ends, the copies complete and the originals are acked.
func TestMemoryAlarmDuringPoisonStorm(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		p := newPipeline(t, m, "it-alarm", RelayOptions{})
		p.broker.Drain("pushrelay.dead")
		chans := channels("alarm", 10)
		subs := subscribeAll(t, p.nginx, chans, EventSource)
		p.relay.Stop() // the producer must publish before the alarm blocks it

		const perChannel, poison = 20, 30
		for seq := 1; seq <= perChannel; seq++ {
			batch := seqMsgs(chans, seq)
			if seq <= poison/3 {
				for i := 0; i < 3; i++ {
					batch = append(batch, Msg{Channel: "bad id", Body: []byte("poison"), ID: fmt.Sprintf("poison-%d-%d", seq, i)})
				}
			}
			p.broker.MustPublish(batch...)
		}
		restore := memoryAlarm(t)
		p.relay.Start()

		if dups := waitAll(t, subs, perChannel, 30*time.Second); dups != 0 {
			t.Errorf("%d duplicates", dups)
		}
		queue := "pushrelay." + p.host
		waitFor(t, "every valid message acked during the alarm", 20*time.Second, func() bool {
			return p.relay.Metric("pushrelay_messages_unacked") == poison
		})
		if dead := ownDeadLetters(p.broker, queue); len(dead) != 0 {
			t.Fatalf("%d dead letters went through during the alarm", len(dead))
		}
		restore()
		dead := deadLettersOf(t, p.broker, queue, poison, 60*time.Second)
		for _, d := range dead {
			if d.Headers["x-pushrelay-reason"] != "invalid_channel" || string(d.Body) != "poison" {
				t.Errorf("dead letter %s: reason %v body %q", d.MessageId, d.Headers["x-pushrelay-reason"], d.Body)
			}
		}
		waitFor(t, "the originals acked after the alarm", 20*time.Second, func() bool {
			return p.relay.Metric("pushrelay_messages_unacked") == 0 && p.broker.QueueDepth(queue) == 0
		})
	})
}

// push.max_age: after a long outage, a message older than it (by its
// published_at) is dead-lettered as expired, not pushed to browsers as new.
func TestStaleMessagesExpire(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		p := newPipeline(t, m, "it-max-age", RelayOptions{Push: `max_age = "1m"`})
		p.broker.Drain("pushrelay.dead")
		subs := subscribeAll(t, p.nginx, []string{"aged"}, EventSource)
		old := time.Now().Add(-2 * time.Minute).UnixMicro()
		stale := Msg{Channel: "aged", Body: []byte("99"), ID: "stale", Headers: amqp.Table{"published_at": old}}
		fresh := seqMsgs([]string{"aged"}, 1)[0]
		p.broker.MustPublish(stale, fresh, seqMsgs([]string{"aged"}, 2)[0])
		if dups := waitAll(t, subs, 2, 20*time.Second); dups != 0 {
			t.Errorf("%d duplicates", dups)
		}
		dead := deadLettersOf(t, p.broker, "pushrelay."+p.host, 1, 10*time.Second)
		if d := dead[0]; d.Headers["x-pushrelay-reason"] != "expired" || string(d.Body) != "99" || d.Headers["published_at"] != old {
			t.Errorf("dead letter: reason %v body %q published_at %v, want expired 99 %d", d.Headers["x-pushrelay-reason"], d.Body, d.Headers["published_at"], old)
		}
	})
}

// A publisher that refuses a few channels (a location rule, an allow list
// per channel) while it takes the others is misconfigured: those channels'
// messages wait, /readyz says so, nothing is dead-lettered. Three channels
// refused alike within 10 s make the fault the publisher's
// (publish.misconfiguredChannels); here four are.
func TestPublisherRefusingSomeChannelsIsMisconfigured(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		o := RelayOptions{Push: `retry_budget = "2s"`}
		p, _ := faultPipeline(t, m, "it-refusing-some", "300s", `if ($arg_id ~ "^refused") { return 403; }`, o)
		p.broker.Drain("pushrelay.dead")
		refused, taken := channels("refused", 4), channels("taken", 16)
		subs := subscribeAll(t, p.nginx, taken, EventSource)
		// The taken channels keep getting 2xx throughout (12 s): the
		// refusals must count as the publisher's fault beside them, not
		// only once nothing but 4xx is left.
		const perChannel, rate = 60, 80
		wait := streamPublish(p.broker, taken, perChannel, rate)
		publishRounds(p.broker, refused, 10)
		waitFor(t, "/readyz to name the 403 while other channels are published", 6*time.Second, func() bool {
			code, body := readyz(t, p.relay)
			return code == 503 && strings.Contains(body, "misconfigured") && strings.Contains(body, "403")
		})
		if err := wait(); err != nil {
			t.Fatal(err)
		}
		waitAll(t, subs, perChannel, 30*time.Second)
		if dead := ownDeadLetters(p.broker, "pushrelay."+p.host); len(dead) != 0 {
			t.Fatalf("%d messages of the refused channels dead-lettered while the publisher refused 4 channels alike (first: %v)",
				len(dead), dead[0].Headers)
		}
		if got := p.relay.Metric("pushrelay_messages_in_flight"); got != float64(len(refused)*10) {
			t.Errorf("%v messages in flight, want the refused channels' %d waiting", got, len(refused)*10)
		}
	})
}
