package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/integration/stack"
	"github.com/pushrelay/pushrelay/sidecar/shard"
)

// Issue 9: reloads and reconnects that converge. Each defect the issue
// reproduced gets a test here, against real RabbitMQ, real Nginx and the
// relay binary; the network faults are in netns_test.go.

// launchRelay starts a relay without waiting for it to be ready: one meant
// to stand by or to start broken. It stops at cleanup.
func launchRelay(t *testing.T, o RelayOptions) *RelayProc {
	t.Helper()
	if o.AMQPURL == "" && !strings.Contains(o.AMQP, "url_file") {
		o.AMQPURL = amqpURL
	}
	sr, err := stack.NewRelay(relayBin, t.TempDir(), o)
	if err != nil {
		t.Fatal(err)
	}
	r := &RelayProc{Relay: sr, t: t}
	if err := sr.Launch(); err != nil {
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

// closedURL is a publish URL nobody listens on.
func closedURL(t *testing.T) string {
	port, err := stack.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("http://127.0.0.1:%d/pub?id={channel}", port)
}

// Defect 1: started with push.url on a closed port, then reloaded with the
// right one: every message arrives, and the config is applied.
func TestReloadFixesAWrongPublisherURL(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		p := newPipeline(t, m, "it-fix-url", RelayOptions{})
		o := RelayOptions{Host: p.host, Exchange: p.broker.Exchange, Publish: closedURL(t), Dialect: m.Dialect()}
		p.relay.WriteConfig(o)
		p.relay.Reload()
		waitFor(t, "the wrong URL applied", 20*time.Second, func() bool {
			return p.relay.Metric(`pushrelay_config_reloads_total{result="success"}`) == 1 &&
				p.relay.Metric("pushrelay_config_applied") == 1
		})
		chans := channels("fixurl", 20)
		subs := subscribeAll(t, p.nginx, chans, EventSource)
		const perChannel = 10
		publishRounds(p.broker, chans, perChannel)
		waitFor(t, "/readyz to say the publisher is unreachable", 15*time.Second, func() bool {
			code, body := readyz(t, p.relay)
			return code == 503 && strings.Contains(body, "unreachable")
		})
		o.Publish = p.nginx.PublishURL()
		p.relay.WriteConfig(o)
		p.relay.Reload()
		if dups := waitAll(t, subs, perChannel, 60*time.Second); dups != 0 {
			t.Logf("%d duplicates (redelivered after the abandoned publisher)", dups)
		}
		waitFor(t, "config applied and ready", 30*time.Second, func() bool {
			code, _ := readyz(t, p.relay)
			return code == 200 && p.relay.Metric("pushrelay_config_applied") == 1
		})
	})
}

// Defect 2: a URL change, then at once a second reload that changes only
// the heartbeat. The second must not cancel the first: the new URL wins.
func TestSecondReloadKeepsTheFirstOnesWork(t *testing.T) {
	p := newPipeline(t, stack.Nchan, "it-two-reloads", RelayOptions{})
	o := RelayOptions{Host: p.host, Exchange: p.broker.Exchange, Publish: closedURL(t), Dialect: "nchan"}
	p.relay.WriteConfig(o)
	p.relay.Reload()
	chans := channels("tworeloads", 10)
	subs := subscribeAll(t, p.nginx, chans, EventSource)
	p.broker.MustPublish(seqMsgs(chans, 1)...)
	waitFor(t, "messages stuck on the wrong URL", 15*time.Second, func() bool {
		return p.relay.Metric("pushrelay_messages_in_flight") > 0
	})

	o.Publish = p.nginx.PublishURL()
	p.relay.WriteConfig(o)
	p.relay.Reload()
	time.Sleep(200 * time.Millisecond)
	o.AMQP = `heartbeat = "7s"`
	p.relay.WriteConfig(o)
	p.relay.Reload()
	for seq := 2; seq <= 5; seq++ {
		p.broker.MustPublish(seqMsgs(chans, seq)...)
	}
	waitAll(t, subs, 5, 60*time.Second)
	waitFor(t, "config applied", 30*time.Second, func() bool { return p.relay.Metric("pushrelay_config_applied") == 1 })
}

// Defect 6: a reload that changes a queue argument is refused with the
// reason; the relay stays up and consuming on the running config.
func TestQueueArgumentReloadIsRefused(t *testing.T) {
	p := newPipeline(t, stack.Nchan, "it-queue-args", RelayOptions{})
	chans := channels("qargs", 5)
	subs := subscribeAll(t, p.nginx, chans, EventSource)
	p.broker.MustPublish(seqMsgs(chans, 1)...)
	waitAll(t, subs, 1, 20*time.Second)

	o := RelayOptions{Host: p.host, Exchange: p.broker.Exchange, Publish: p.nginx.PublishURL(), Dialect: "nchan",
		AMQP: `message_ttl = "1m"`}
	p.relay.WriteConfig(o)
	p.relay.Reload()
	waitFor(t, "the reload refused", 10*time.Second, func() bool {
		return p.relay.Metric(`pushrelay_config_reloads_total{result="failure"}`) == 1
	})
	if log := p.relay.Log(); !strings.Contains(log, "x-message-ttl cannot change on the live queue") {
		t.Errorf("the refusal does not say why:\n%s", log)
	}
	if got := p.relay.Metric("pushrelay_config_last_reload_successful"); got != 0 {
		t.Errorf("last_reload_successful = %v, want 0", got)
	}
	p.broker.MustPublish(seqMsgs(chans, 2)...)
	waitAll(t, subs, 2, 20*time.Second)
	if code, body := readyz(t, p.relay); code != 200 {
		t.Errorf("/readyz %d %q after a refused reload", code, body)
	}
	if got := p.relay.Metric("pushrelay_amqp_reconnects_total"); got != 0 {
		t.Errorf("%v reconnects: a refused reload must not touch the session", got)
	}
}

// Defect 7: two relays with the same host (a cloned VM) never split the
// queue: the second stands by, not ready and saying why, and takes over
// when the first goes away.
func TestTwoRelaysWithOneHostNeverSplitTheQueue(t *testing.T) {
	p := newPipeline(t, stack.Nchan, "it-clone", RelayOptions{})
	clone := launchRelay(t, RelayOptions{Host: p.host, Exchange: p.broker.Exchange, Publish: p.nginx.PublishURL(), Dialect: "nchan"})
	waitFor(t, "the clone to say it stands by", 15*time.Second, func() bool {
		code, body := readyz(t, clone)
		return code == 503 && strings.Contains(body, "same host")
	})
	chans := channels("clone", 10)
	subs := subscribeAll(t, p.nginx, chans, EventSource)
	const perChannel = 50
	publishRounds(p.broker, chans, perChannel)
	waitAll(t, subs, perChannel, 30*time.Second)
	if got := clone.Metric("pushrelay_messages_received_total"); got != 0 {
		t.Fatalf("the clone took %v messages: the queue was split", got)
	}
	if got := p.relay.Metric("pushrelay_messages_received_total"); got < 10*perChannel {
		t.Fatalf("the first relay took %v of %d", got, 10*perChannel)
	}

	p.relay.Stop()
	waitFor(t, "the clone to take over", 20*time.Second, func() bool {
		code, _ := readyz(t, clone)
		return code == 200
	})
	p.broker.MustPublish(seqMsgs(chans, perChannel+1)...)
	waitAll(t, subs, perChannel+1, 20*time.Second)
}

// Defect 8: a relay killed in the middle of a drain, and started again,
// keeps the drained shards bound until their deadline, so browsers still
// on this frontend miss nothing; then it unbinds them.
func TestDrainSurvivesARestart(t *testing.T) {
	const drain = 15 * time.Second
	all := fmt.Sprintf("[shards]\ncount = %d\ndrain = %q\n[shards.map]\nit-drain = [\"0-%d\"]\n",
		shard.DefaultCount, drain.String(), shard.DefaultCount-1)
	half := fmt.Sprintf("[shards]\ncount = %d\ndrain = %q\n[shards.map]\nit-drain = [\"0-511\"]\nother = [\"512-%d\"]\n",
		shard.DefaultCount, drain.String(), shard.DefaultCount-1)
	p := newPipeline(t, stack.Nchan, "it-drain", RelayOptions{Extra: all})
	queue := "pushrelay." + p.host
	o := RelayOptions{Host: p.host, Exchange: p.broker.Exchange, Publish: p.nginx.PublishURL(), Dialect: "nchan", Extra: half}
	p.relay.WriteConfig(o)
	p.relay.Reload()
	began := time.Now()
	waitFor(t, "512 shards draining", 10*time.Second, func() bool { return p.relay.Metric("pushrelay_shards_draining") == 512 })

	p.relay.Kill()
	p.relay.Start()
	if got := p.relay.Metric("pushrelay_shards_draining"); got != 512 {
		t.Fatalf("after the restart %v shards draining, want 512", got)
	}
	if n := len(bindings(t, p.broker.Exchange)[queue]); n != shard.DefaultCount {
		t.Fatalf("after the restart %d shards bound, want all %d until the drain ends", n, shard.DefaultCount)
	}
	// A channel of a drained shard still reaches this frontend's browsers.
	var moved string
	for i := 0; moved == ""; i++ {
		if ch := fmt.Sprintf("drained:%d", i); shard.Of(ch, shard.DefaultCount) >= 512 {
			moved = ch
		}
	}
	subs := subscribeAll(t, p.nginx, []string{moved}, EventSource)
	p.broker.MustPublish(seqMsgs([]string{moved}, 1)...)
	waitAll(t, subs, 1, 10*time.Second)
	if time.Since(began) >= drain {
		t.Fatalf("the checks took longer than the drain (%s); nothing was shown", drain)
	}

	waitFor(t, "the drain to end", drain+10*time.Second, func() bool {
		return len(bindings(t, p.broker.Exchange)[queue]) == 512
	})
	if time.Since(began) < drain {
		t.Errorf("drained shards unbound after %s, before the %s drain ended", time.Since(began), drain)
	}
}

// Defect 9: a password with an unencoded % (from url_file, which
// check-config cannot read ahead) never reaches the log.
func TestBrokerPasswordNeverReachesTheLog(t *testing.T) {
	const secret = "s3cr%zzet"
	file := filepath.Join(t.TempDir(), "amqp-url")
	if err := os.WriteFile(file, []byte("amqp://guest:"+secret+"@127.0.0.1:5672/\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := launchRelay(t, RelayOptions{Host: "it-secret", Exchange: "pushrelay.test.secret", Publish: closedURL(t), Dialect: "nchan",
		AMQP: fmt.Sprintf("url_file = %q", file)})
	waitFor(t, "two failed connects", 20*time.Second, func() bool {
		return strings.Count(r.Log(), "AMQP connect failed") >= 2
	})
	code, body := readyz(t, r)
	for _, where := range []string{r.Log(), body} {
		for _, piece := range []string{secret, "s3cr", "zzet"} {
			if strings.Contains(where, piece) {
				t.Fatalf("the password (%q) shows:\n%s", piece, where)
			}
		}
	}
	if code != 503 || !strings.Contains(body, "percent-encode") {
		t.Errorf("/readyz %d %q: want 503 saying how to fix the URL", code, body)
	}
}

// Issue 10, found on review: an operator fixing a wrong push.url, one try
// after another, on a quorum queue with delivery_limit. Each reload whose
// publisher takes nothing used to end in a new AMQP session, and the
// broker counted every message the old publisher held as delivered once
// more: at the fix, past delivery_limit (1 here), the queue dead-lettered
// them all. The new publisher takes them over instead: nothing goes back
// to the broker, nothing is dead-lettered, and every message arrives once,
// in order.
func TestPublisherFixesReturnNothingToTheBroker(t *testing.T) {
	eachModule(t, func(t *testing.T, m stack.Module) {
		host := uniqueHost("it-fix-limit-" + string(m))
		queue := "pushrelay." + host
		ngx := startNginxModule(t, m)
		b := newBroker(t, queue)
		o := RelayOptions{Host: host, Exchange: b.Exchange, Publish: closedURL(t), Dialect: m.Dialect(),
			AMQP: "queue_type = \"quorum\"\ndelivery_limit = 1"}
		r := launchRelay(t, o)
		waitFor(t, "the relay to consume", 20*time.Second, func() bool { return r.Metric("pushrelay_amqp_connected") == 1 })
		b.Drain("pushrelay.dead")
		chans := channels("fixlimit", 20)
		subs := subscribeAll(t, ngx, chans, kindsOn(m)...)
		const perChannel = 10
		publishRounds(b, chans, perChannel)
		waitFor(t, "every message held by the wrong publisher", 15*time.Second, func() bool {
			return r.Metric("pushrelay_messages_in_flight") == perChannel*float64(len(chans))
		})

		for _, url := range []string{closedURL(t), ngx.PublishURL()} { // another wrong try, then the fix
			o.Publish = url
			r.WriteConfig(o)
			r.Reload()
			// Each reload on its own: it waits for the held messages
			// (shutdown_timeout), then the new publisher takes them.
			waitFor(t, "the reload pending", 10*time.Second, func() bool {
				return r.Metric("pushrelay_config_applied") == 0
			})
			waitFor(t, "the new publisher applied", 30*time.Second, func() bool {
				return r.Metric("pushrelay_config_applied") == 1
			})
		}
		if dups := waitAll(t, subs, perChannel, 30*time.Second); dups != 0 {
			t.Errorf("%d duplicates", dups)
		}
		dead := 0
		for _, d := range b.Drain("pushrelay.dead") {
			if deaths, _ := d.Headers["x-death"].([]any); len(deaths) > 0 {
				if x, ok := deaths[0].(amqp.Table); ok && x["queue"] == queue {
					dead++
				}
			}
		}
		redelivered, reconnects := r.Metric("pushrelay_messages_redelivered_total"), r.Metric("pushrelay_amqp_reconnects_total")
		t.Logf("two [push] reloads with %d messages held: %d dead-lettered by the queue, %v redelivered, %v reconnects",
			perChannel*len(chans), dead, redelivered, reconnects)
		if dead != 0 || redelivered != 0 || reconnects != 0 {
			t.Errorf("a [push] reload returned messages to the broker: %d dead-lettered (delivery_limit 1), %v redelivered, %v reconnects",
				dead, redelivered, reconnects)
		}
	})
}

// Found on review: after a [push] reload the new publisher started with a
// clean record, so /readyz said 200 for a push.timeout or so while the
// messages it took over waited on a publisher that answers nothing (here a
// listener that accepts and stays silent, as a frozen Nginx does). It must
// stay 503 until the publisher answers.
func TestReadyzAfterAPushReloadWaitsForAnAnswer(t *testing.T) {
	silent := startSilentListener(t)
	b := newBroker(t)
	host := uniqueHost("it-ready-handover")
	o := RelayOptions{Host: host, Exchange: b.Exchange, Publish: "http://" + silent + "/pub?id={channel}", Dialect: "nchan"}
	r := launchRelay(t, o)
	waitFor(t, "the relay to consume", 20*time.Second, func() bool { return r.Metric("pushrelay_amqp_connected") == 1 })
	b.MustPublish(seqMsgs(channels("readyhandover", 20), 1)...)
	waitFor(t, "/readyz to say the publisher is unreachable", 20*time.Second, func() bool {
		code, _ := readyz(t, r)
		return code == 503
	})
	o.Connections = 3 // a [push] change: a new publisher takes the messages over
	r.WriteConfig(o)
	r.Reload()
	waitFor(t, "the reload applied", 30*time.Second, func() bool { return r.Metric("pushrelay_config_applied") == 1 })
	for deadline := time.Now().Add(4 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if code, body := readyz(t, r); code == 200 {
			t.Fatalf("/readyz 200 %q with %v messages waiting on a publisher that answers nothing",
				body, r.Metric("pushrelay_messages_in_flight"))
		}
	}
}
