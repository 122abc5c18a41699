package main

import (
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

const testBroker = "amqp://guest:guest@127.0.0.1:5672/"

// publishTarget declares what a deployment would (a direct exchange, a queue
// bound to every shard key) and returns a config file pointing at it.
func publishTarget(t *testing.T, count, maxBody int) (string, <-chan amqp.Delivery) {
	t.Helper()
	conn, err := amqp.Dial(testBroker)
	if err != nil {
		t.Skipf("RabbitMQ not reachable at %s (make deps starts it): %v", testBroker, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	exchange := fmt.Sprintf("pushrelay.test.cli.%d", rand.Uint64())
	if err := ch.ExchangeDeclare(exchange, "direct", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	for s := range count {
		if err := ch.QueueBind(q.Name, strconv.Itoa(s), exchange, false, nil); err != nil {
			t.Fatal(err)
		}
	}
	deliveries, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	path := tempConfig(t, fmt.Sprintf("host = \"fe1\"\n[amqp]\nurl = %q\nexchange = %q\n[push]\nmax_body = %d\n[shards]\ncount = %d\n",
		testBroker, exchange, maxBody, count))
	return path, deliveries
}

func TestPublishSendsOneMessageFromStdin(t *testing.T) {
	path, deliveries := publishTarget(t, 16, 64)
	rc, out, errOut := invoke(`{"n":1}`, "publish", "-config", path, "-channel", "thread:7",
		"-type", "comment", "-id", "c-1", "-content-type", "application/json")
	if rc != 0 {
		t.Fatalf("rc %d: %s", rc, errOut)
	}
	// FNV-1a-32("thread:7") = 2605831122, and mod 16 that is 2 (the README's
	// Python); a fixed value, so that a wrong shard.Of cannot agree with itself.
	const wantShard = "2"
	if !strings.HasSuffix(out, ", shard "+wantShard+"\n") {
		t.Errorf("stdout %q, want the shard", out)
	}
	select {
	case d := <-deliveries:
		if d.RoutingKey != wantShard || d.Headers["channel"] != "thread:7" ||
			d.Type != "comment" || d.MessageId != "c-1" || d.ContentType != "application/json" || string(d.Body) != `{"n":1}` {
			t.Errorf("delivery key %q channel %v type %q id %q content type %q body %q; want what the flags and stdin said",
				d.RoutingKey, d.Headers["channel"], d.Type, d.MessageId, d.ContentType, d.Body)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("nothing arrived")
	}
}

func TestPublishRefusesWhatTheRelayWouldDeadLetter(t *testing.T) {
	path, deliveries := publishTarget(t, 16, 8)
	for _, c := range []struct {
		body, channel, want string
	}{
		{"123456789", "ok", "larger than 8"},
		{"", "a/b", `byte '/'`},
		{"", "ALL", "reserved"},
	} {
		if rc, _, errOut := invoke(c.body, "publish", "-config", path, "-channel", c.channel); rc != 1 || !strings.Contains(errOut, c.want) {
			t.Errorf("channel %q body %q: rc %d stderr %q; want 1 and %q", c.channel, c.body, rc, errOut, c.want)
		}
	}
	select {
	case d := <-deliveries:
		t.Errorf("a refused message arrived: %v %q", d.Headers, d.Body)
	case <-time.After(200 * time.Millisecond):
	}
	if rc, _, _ := invoke("", "publish", "-config", path); rc != 2 {
		t.Errorf("no -channel: rc %d, want 2", rc)
	}
}
