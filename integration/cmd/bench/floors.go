package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// The floors are the two halves of the relay's path measured without the
// relay, in the same run: what the relay's latency cannot go below.

// amqpFloor is a bare consumer on a queue of its own: producer → RabbitMQ
// → consume, timed from the producer's published_at header. It acks with
// multiple=true every 256 deliveries, as the relay's acker does.
type amqpFloor struct {
	sink
	queue string
	conn  *amqp.Connection
	done  chan struct{}
}

func startAMQPFloor(b *broker, url, queue string, prefetch int) (*amqpFloor, error) {
	if err := b.declareLike(queue); err != nil {
		return nil, err
	}
	conn, err := amqp.Dial(url)
	if err != nil {
		return nil, err
	}
	ch, err := conn.Channel()
	if err == nil {
		err = ch.Qos(prefetch, 0, false)
	}
	var deliveries <-chan amqp.Delivery
	if err == nil {
		deliveries, err = ch.Consume(queue, "floor", false, false, false, false, nil)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("AMQP floor consumer: %w", err)
	}
	f := &amqpFloor{queue: queue, conn: conn, done: make(chan struct{})}
	go f.consume(deliveries)
	return f, nil
}

func (f *amqpFloor) consume(deliveries <-chan amqp.Delivery) {
	defer close(f.done)
	n := 0
	for d := range deliveries {
		if us, ok := d.Headers["published_at"].(int64); ok {
			f.add(time.UnixMicro(us))
		}
		if n++; n%256 == 0 {
			d.Ack(true)
		}
	}
}

func (f *amqpFloor) close() {
	f.conn.Close()
	<-f.done
}

// run offers rate msg/s of w to the floor's queue through the default
// exchange.
func (f *amqpFloor) run(ctx context.Context, b *broker, w workload, rate int, d time.Duration) (stream, error) {
	t := traffic{b: b, w: w, key: func(string) string { return f.queue }}
	return t.offerTo(ctx, &f.sink, rate, d)
}

// nginxFloor publishes straight to Nginx's publisher over HTTP keep-alive
// connections, as many as the relay has lanes, with no broker: producer →
// Nginx → the subscribers.
type nginxFloor struct {
	ngx    *stack.Nginx
	client *http.Client
	conns  int
}

func newNginxFloor(ngx *stack.Nginx, conns int) *nginxFloor {
	tr := &http.Transport{MaxIdleConnsPerHost: conns, MaxConnsPerHost: conns, DisableCompression: true}
	return &nginxFloor{ngx: ngx, client: &http.Client{Transport: tr, Timeout: 10 * time.Second}, conns: conns}
}

type pubJob struct {
	channel string
	body    []byte
}

// run offers rate msg/s of w to the subscribers. Sending hands each
// message to one of conns publishing goroutines, so a slow answer delays
// what queues behind it, as a lane's does.
func (f *nginxFloor) run(ctx context.Context, subs *subscribers, w workload, rate int, d time.Duration) (stream, error) {
	jobs := make(chan pubJob, 1<<16)
	var (
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	for i := 0; i < f.conns; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				if err := f.publish(ctx, j); err != nil {
					errOnce.Do(func() { firstErr = err })
				}
			}
		}()
	}
	send := func(seq int) error {
		ch := w.channels[seq%len(w.channels)]
		jobs <- pubJob{channel: ch, body: w.body(seq, time.Now())}
		return nil
	}
	settle := func() error {
		close(jobs)
		wg.Wait()
		return firstErr
	}
	return offer(ctx, &subs.sink, rate, d, send, settle)
}

func (f *nginxFloor) publish(ctx context.Context, j pubJob) error {
	req, err := http.NewRequestWithContext(ctx, "POST", f.ngx.PublisherURL("/pub?id="+j.channel), bytes.NewReader(j.body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "text/plain")
	resp, err := f.client.Do(req)
	if err != nil {
		return err
	}
	io.Copy(io.Discard, resp.Body) // read to the end, or the connection is not reused
	resp.Body.Close()
	if !f.ngx.Module.Accepted(resp.StatusCode) {
		return fmt.Errorf("Nginx floor: publish to %s: status %d", j.channel, resp.StatusCode)
	}
	return nil
}
