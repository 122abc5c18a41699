package main

import (
	"context"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/sidecar/shard"
)

// workload is the benchmark's traffic: 200-byte bodies over channels.
type workload struct {
	channels []string
	size     int
}

func newWorkload(channels, size int) workload {
	w := workload{size: size}
	for i := 0; i < channels; i++ {
		w.channels = append(w.channels, "thread:"+strconv.Itoa(100000+i))
	}
	return w
}

// body is size bytes starting with "<sent µs> <seq> ", which subscribers
// read back to measure latency.
func (w workload) body(seq int, sent time.Time) []byte {
	b := make([]byte, w.size)
	n := copy(b, strconv.FormatInt(sent.UnixMicro(), 10)+" "+strconv.Itoa(seq)+" ")
	for i := n; i < len(b); i++ {
		b[i] = 'x'
	}
	return b
}

func routingKey(channel string) string { return strconv.Itoa(shard.Of(channel, shard.DefaultCount)) }

type broker struct {
	conn *amqp.Connection
	ch   *amqp.Channel
	acks chan amqp.Confirmation
	// blocked is how long, in ns, RabbitMQ has blocked this publisher
	// (connection.blocked: a memory or disk alarm, such as the one another
	// session's fault test raises on this shared broker). Any of it during
	// a run makes that run's figures the alarm's, not the relay's.
	blocked atomic.Int64
}

func dialBroker(url string) (*broker, error) {
	conn, err := amqp.Dial(url)
	if err != nil {
		return nil, fmt.Errorf("RabbitMQ: %w", err)
	}
	ch, err := conn.Channel()
	if err != nil {
		return nil, err
	}
	if err := ch.Confirm(false); err != nil {
		return nil, err
	}
	b := &broker{conn: conn, ch: ch, acks: ch.NotifyPublish(make(chan amqp.Confirmation, 1<<16))}
	go b.watchBlocked(conn.NotifyBlocked(make(chan amqp.Blocking, 4)))
	return b, nil
}

func (b *broker) watchBlocked(blockings <-chan amqp.Blocking) {
	var since time.Time
	for bl := range blockings {
		switch {
		case bl.Active && since.IsZero():
			since = time.Now()
			progress("RabbitMQ blocks publishers: %s", bl.Reason)
		case !bl.Active && !since.IsZero():
			b.blocked.Add(int64(time.Since(since)))
			since = time.Time{}
			progress("RabbitMQ unblocked publishers")
		}
	}
}

func (b *broker) blockedFor() time.Duration { return time.Duration(b.blocked.Load()) }

func (b *broker) close() { b.conn.Close() }

// declareLike declares queue with the arguments the relay gives its own.
func (b *broker) declareLike(queue string) error {
	_, err := b.ch.QueueDeclare(queue, true, false, false, false, amqp.Table{
		"x-queue-type": "classic", "x-dead-letter-exchange": "pushrelay.dlx",
		"x-message-ttl": int64(300000), "x-max-length": int64(1000000), "x-overflow": "drop-head",
	})
	return err
}

func (b *broker) cleanup(exchange string, queues ...string) {
	ch, err := b.conn.Channel()
	if err != nil {
		return
	}
	defer ch.Close()
	for _, q := range queues {
		ch.QueueDelete(q, false, false, false)
	}
	ch.ExchangeDelete(exchange, false, false)
}

func (b *broker) publish(ctx context.Context, exchange, key, channel string, body []byte) error {
	return b.ch.PublishWithContext(ctx, exchange, key, false, false, amqp.Publishing{
		Headers:     amqp.Table{"channel": channel, "published_at": time.Now().UnixMicro()},
		ContentType: "text/plain", Type: "comment", Body: body,
	})
}

// publishBacklog publishes n messages round-robin over the channels, in
// windows confirmed by the broker, and returns once all are confirmed.
func (b *broker) publishBacklog(ctx context.Context, exchange string, key func(channel string) string, w workload, n int) error {
	const window = 5000
	for sent := 0; sent < n; {
		batch := min(window, n-sent)
		for i := 0; i < batch; i++ {
			seq := sent + i
			ch := w.channels[seq%len(w.channels)]
			if err := b.publish(ctx, exchange, key(ch), ch, w.body(seq, time.Now())); err != nil {
				return err
			}
		}
		if err := b.awaitConfirms(batch); err != nil {
			return err
		}
		sent += batch
	}
	return nil
}

func (b *broker) awaitConfirms(n int) error {
	for i := 0; i < n; i++ {
		select {
		case c := <-b.acks:
			if !c.Ack {
				return fmt.Errorf("broker nacked %d", c.DeliveryTag)
			}
		case <-time.After(60 * time.Second):
			return fmt.Errorf("no confirm in 60s")
		}
	}
	return nil
}
