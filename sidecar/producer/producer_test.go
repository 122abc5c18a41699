package producer_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/sidecar/producer"
	"github.com/pushrelay/pushrelay/sidecar/shard"
)

// brokerURL is the RabbitMQ the tests use; scripts/deps.sh starts it.
func brokerURL() string {
	if u := os.Getenv("PUSHRELAY_TEST_AMQP_URL"); u != "" {
		return u
	}
	return "amqp://guest:guest@127.0.0.1:5672/"
}

func dial(t *testing.T) *amqp.Connection {
	t.Helper()
	conn, err := amqp.Dial(brokerURL())
	if err != nil {
		t.Skipf("RabbitMQ not reachable at %s (make deps starts it): %v", brokerURL(), err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// testExchange declares, as the relays' deployment would, a throwaway direct
// exchange and an exclusive queue bound to every shard key, so that a
// message on the wrong key still arrives and the test can name the key.
func testExchange(t *testing.T, conn *amqp.Connection, count int) (string, <-chan amqp.Delivery) {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("pushrelay.test.%s.%d", t.Name(), rand.Uint64())
	if err := ch.ExchangeDeclare(name, "direct", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ch.ExchangeDelete(name, false, false) })
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	for s := range count {
		if err := ch.QueueBind(q.Name, strconv.Itoa(s), name, false, nil); err != nil {
			t.Fatal(err)
		}
	}
	deliveries, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	return name, deliveries
}

func receive(t *testing.T, deliveries <-chan amqp.Delivery) amqp.Delivery {
	t.Helper()
	select {
	case d := <-deliveries:
		return d
	case <-time.After(5 * time.Second):
		t.Fatal("no message arrived within 5s")
		return amqp.Delivery{}
	}
}

func TestPublishSendsTheContractsKeyHeadersAndProperties(t *testing.T) {
	const count = 64
	conn := dial(t)
	exchange, deliveries := testExchange(t, conn, count)
	p, err := producer.New(conn, exchange, count)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	// The routing keys are fixed values, not shard.Of's: a bug in the shard
	// function must not move the expectation with it. thread:1 and x are
	// rows of shared/contract/shard-vectors.tsv (shard_of_64); the other is
	// FNV-1a-32 1072355795 mod 64, computed with the README's Python.
	wantKey := map[string]string{"thread:1": "32", "user:42@forum.example": "19", "x": "7"}
	for _, m := range []producer.Message{
		{Channel: "thread:1", Body: []byte(`{"text":"hi"}`), Type: "comment", ID: "c-17", ContentType: "application/json"},
		{Channel: "user:42@forum.example", Body: []byte("plain")},
		{Channel: "x", Body: nil},
	} {
		before := time.Now().UnixMicro()
		if err := p.Publish(context.Background(), m); err != nil {
			t.Fatalf("Publish(%q): %v", m.Channel, err)
		}
		after := time.Now().UnixMicro()
		d := receive(t, deliveries)

		if want := wantKey[m.Channel]; d.RoutingKey != want {
			t.Errorf("%s: routing key %q, want %q", m.Channel, d.RoutingKey, want)
		}
		if d.Exchange != exchange {
			t.Errorf("%s: exchange %q, want %q", m.Channel, d.Exchange, exchange)
		}
		if got := d.Headers["channel"]; got != m.Channel {
			t.Errorf("header channel = %#v, want %q", got, m.Channel)
		}
		if at, ok := d.Headers["published_at"].(int64); !ok || at < before || at > after {
			t.Errorf("%s: header published_at = %#v, want an int64 of Unix µs in [%d, %d]", m.Channel, d.Headers["published_at"], before, after)
		}
		if _, ok := d.Headers["x-pushrelay-publish-id"].(int64); !ok || len(d.Headers) != 3 {
			t.Errorf("%s: headers %v, want only channel, published_at and the publish id", m.Channel, d.Headers)
		}
		if d.MessageId != m.ID || d.Type != m.Type || d.ContentType != m.ContentType {
			t.Errorf("%s: message_id %q type %q content_type %q, want %q %q %q", m.Channel, d.MessageId, d.Type, d.ContentType, m.ID, m.Type, m.ContentType)
		}
		if d.DeliveryMode != amqp.Persistent {
			t.Errorf("%s: delivery mode %d, want persistent (2)", m.Channel, d.DeliveryMode)
		}
		if string(d.Body) != string(m.Body) {
			t.Errorf("%s: body %q, want %q", m.Channel, d.Body, m.Body)
		}
	}
}

func TestPublishRefusesInvalidMessagesWithoutSending(t *testing.T) {
	const count = 8
	conn := dial(t)
	exchange, deliveries := testExchange(t, conn, count)
	p, err := producer.New(conn, exchange, count, producer.WithMaxBody(10))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	for _, m := range []producer.Message{
		{Channel: "ALL"},
		{Channel: "thread.b3"},
		{Channel: "a/b"},
		{Channel: "ok", Body: []byte("eleven byte")},
		{Channel: "ok", Type: "a\r\nb"},
	} {
		if err := p.Publish(context.Background(), m); !errors.Is(err, producer.ErrInvalid) {
			t.Errorf("Publish(%+v) = %v, want ErrInvalid", m, err)
		}
	}
	if err := p.Publish(context.Background(), producer.Message{Channel: "last", Body: []byte("ten bytes!")}); err != nil {
		t.Fatal(err)
	}
	if d := receive(t, deliveries); d.Headers["channel"] != "last" {
		t.Errorf("first message to arrive is for %v; a refused message was sent", d.Headers["channel"])
	}
}

func TestPublisherDeclaresNothingAndRecoversFromAMissingExchange(t *testing.T) {
	conn := dial(t)
	missing := fmt.Sprintf("pushrelay.test.missing.%d", rand.Uint64())
	p, err := producer.New(conn, missing, 16)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	err = p.Publish(context.Background(), producer.Message{Channel: "thread:1"})
	var amqpErr *amqp.Error
	if !errors.As(err, &amqpErr) || amqpErr.Code != amqp.NotFound {
		t.Fatalf("Publish to a missing exchange = %v, want the broker's 404", err)
	}
	// A passive declare fails (and closes its channel) if the exchange is
	// absent: the publisher must not have created it.
	probe, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := probe.ExchangeDeclarePassive(missing, "direct", false, true, false, false, nil); err == nil {
		_ = probe.ExchangeDelete(missing, false, false)
		t.Fatal("the publisher declared the exchange")
	}

	// Once the deployment creates it, the same Publisher works again.
	setup, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := setup.ExchangeDeclare(missing, "direct", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	q, err := setup.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	key := strconv.Itoa(producer.Shard("thread:1", 16))
	if err := setup.QueueBind(q.Name, key, missing, false, nil); err != nil {
		t.Fatal(err)
	}
	deliveries, err := setup.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Publish(context.Background(), producer.Message{Channel: "thread:1", Body: []byte("again")}); err != nil {
		t.Fatalf("Publish after the exchange appeared: %v", err)
	}
	if d := receive(t, deliveries); string(d.Body) != "again" {
		t.Errorf("body %q, want %q", d.Body, "again")
	}
}

func TestPublishIsSafeForConcurrentUse(t *testing.T) {
	const count, senders, each = 32, 16, 25
	conn := dial(t)
	exchange, deliveries := testExchange(t, conn, count)
	p, err := producer.New(conn, exchange, count)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	var wg sync.WaitGroup
	for g := range senders {
		wg.Go(func() {
			for i := range each {
				m := producer.Message{Channel: fmt.Sprintf("thread:%d", g), ID: strconv.Itoa(i)}
				if err := p.Publish(context.Background(), m); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	seen := map[string]bool{}
	for range senders * each {
		d := receive(t, deliveries)
		seen[fmt.Sprint(d.Headers["channel"], "/", d.MessageId)] = true
	}
	if len(seen) != senders*each {
		t.Errorf("%d distinct messages arrived, want %d", len(seen), senders*each)
	}
}

func TestPublishAfterCloseFails(t *testing.T) {
	conn := dial(t)
	exchange, _ := testExchange(t, conn, 4)
	p, err := producer.New(conn, exchange, 4)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Publish(context.Background(), producer.Message{Channel: "x"}); err == nil {
		t.Error("Publish after Close succeeded")
	}
	if conn.IsClosed() {
		t.Error("Close closed a connection the Publisher does not own")
	}
}

func TestNewRefusesWhatCannotRoute(t *testing.T) {
	conn := dial(t)
	for _, c := range []struct {
		exchange string
		count    int
		opts     []producer.Option
	}{
		{"", 1024, nil},
		{"pushrelay", 0, nil},
		{"pushrelay", shard.MaxCount + 1, nil},
		{"pushrelay", 1024, []producer.Option{producer.WithMaxBody(0)}},
	} {
		if p, err := producer.New(conn, c.exchange, c.count, c.opts...); err == nil {
			p.Close()
			t.Errorf("New(%q, %d) accepted", c.exchange, c.count)
		}
	}
}

func TestDialPublishesAndCloseEndsTheConnection(t *testing.T) {
	conn := dial(t)
	exchange, deliveries := testExchange(t, conn, 4)
	p, err := producer.Dial(brokerURL(), exchange, 4)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Publish(context.Background(), producer.Message{Channel: "dialled", Body: []byte("b")}); err != nil {
		t.Fatal(err)
	}
	if d := receive(t, deliveries); d.Headers["channel"] != "dialled" {
		t.Errorf("channel %v, want dialled", d.Headers["channel"])
	}
	if err := p.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if _, err := producer.Dial("amqp://guest:guest@127.0.0.1:1/", exchange, 4); err == nil {
		t.Error("Dial to a closed port succeeded")
	}
}

// A shard no frontend's queue is bound to: the broker would confirm and drop
// the message; with mandatory it comes back, and Publish says so. Messages
// to bound shards, published concurrently beside it, still succeed.
func TestPublishToAnUnboundShardIsUnroutable(t *testing.T) {
	const count = 64
	conn := dial(t)
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	exchange := fmt.Sprintf("pushrelay.test.%s.%d", t.Name(), rand.Uint64())
	if err := ch.ExchangeDeclare(exchange, "direct", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	defer ch.ExchangeDelete(exchange, false, false)
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	// "x" is shard 7 of 64 and "thread:1" shard 32
	// (shared/contract/shard-vectors.tsv): bind every shard but 7.
	for s := range count {
		if s != 7 {
			if err := ch.QueueBind(q.Name, strconv.Itoa(s), exchange, false, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	p, err := producer.New(conn, exchange, count)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	var wg sync.WaitGroup
	errs := make([]error, 20)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			channel := "thread:1"
			if i%4 == 0 {
				channel = "x"
			}
			errs[i] = p.Publish(context.Background(), producer.Message{Channel: channel, Body: []byte("b")})
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if i%4 == 0 {
			if !errors.Is(err, producer.ErrUnroutable) {
				t.Errorf("publish %d to the unbound shard: %v, want ErrUnroutable", i, err)
			}
		} else if err != nil {
			t.Errorf("publish %d to a bound shard: %v", i, err)
		}
	}
	if got, err := ch.QueueDeclarePassive(q.Name, false, true, true, false, nil); err != nil || got.Messages != 15 {
		t.Errorf("queue holds %d messages (%v), want the 15 routable ones", got.Messages, err)
	}
}
