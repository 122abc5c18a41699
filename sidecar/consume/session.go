// Package consume owns the RabbitMQ side: the topology the relay declares,
// one connection with a consuming channel and a control channel, and the
// dead-letter publishing.
//
// amqp091-go's traps are handled here so that the relay loop can treat a
// Session as a plain value: close notifications are buffered (the library
// sends them synchronously and would deadlock a shutdown), Channel() is
// bounded by a timeout (it waits forever for channel.open-ok while the
// network is down), and nothing is called on a connection known dead.
package consume

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// Names of the dead-letter topology, part of the operators' contract.
const (
	DeadLetterExchange = "pushrelay.dlx"
	DeadLetterQueue    = "pushrelay.dead"
	// ReasonHeader carries why a message was dead-lettered.
	ReasonHeader = "x-pushrelay-reason"
)

// Options configure a Session.
type Options struct {
	URL        string
	Exchange   string
	Queue      string
	QueueArgs  amqp.Table
	DeadMaxLen int
	Prefetch   int
	Heartbeat  time.Duration
	Timeout    time.Duration // dial, handshake, channel open, each declare
	Consumer   string        // consumer tag
}

// Session is one AMQP connection: a consuming channel whose delivery tags
// start at 1, and a control channel in confirm mode for declarations,
// bindings and dead-letter copies.
type Session struct {
	opts       Options
	conn       *amqp.Connection
	consume    *amqp.Channel
	ctl        *amqp.Channel
	Deliveries <-chan amqp.Delivery
	// Closed receives once when the connection or either channel closes.
	Closed <-chan *amqp.Error
}

// Open connects, declares the topology and starts consuming. bound lists
// the shards that must be bound; every other shard of count is unbound, so
// a relay that starts after a map change leaves no stale binding behind.
func Open(ctx context.Context, o Options, count int, bound func(shard int) bool) (*Session, error) {
	conn, err := amqp.DialConfig(o.URL, amqp.Config{
		Heartbeat: o.Heartbeat,
		Locale:    "en_US",
		Dial: func(network, addr string) (net.Conn, error) {
			d := net.Dialer{Timeout: o.Timeout}
			c, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			// Bounds the AMQP handshake; amqp091-go clears it afterwards.
			return c, c.SetDeadline(time.Now().Add(o.Timeout))
		},
		Properties: amqp.Table{"connection_name": o.Consumer},
	})
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	s := &Session{opts: o, conn: conn}
	if err := s.setUp(ctx, count, bound); err != nil {
		conn.Close()
		return nil, err
	}
	return s, nil
}

func (s *Session) setUp(ctx context.Context, count int, bound func(int) bool) error {
	closed := make(chan *amqp.Error, 3)
	s.Closed = closed
	s.conn.NotifyClose(forward(closed))

	var err error
	if s.ctl, err = s.channel(ctx); err != nil {
		return fmt.Errorf("open control channel: %w", err)
	}
	s.ctl.NotifyClose(forward(closed))
	if err := s.ctl.Confirm(false); err != nil {
		return fmt.Errorf("confirm mode: %w", err)
	}
	if err := s.declare(); err != nil {
		return err
	}
	for shard := 0; shard < count; shard++ {
		if err := s.setBinding(shard, bound(shard)); err != nil {
			return err
		}
	}

	if s.consume, err = s.channel(ctx); err != nil {
		return fmt.Errorf("open consume channel: %w", err)
	}
	s.consume.NotifyClose(forward(closed))
	if err := s.consume.Qos(s.opts.Prefetch, 0, false); err != nil {
		return fmt.Errorf("qos: %w", err)
	}
	s.Deliveries, err = s.consume.Consume(s.opts.Queue, s.opts.Consumer, false, false, false, false, nil)
	if err != nil {
		return fmt.Errorf("consume %s: %w", s.opts.Queue, err)
	}
	return nil
}

// forward returns a notification channel for amqp091-go that never blocks
// the library: it has room for the one error it may send.
func forward(closed chan *amqp.Error) chan *amqp.Error {
	c := make(chan *amqp.Error, 1)
	go func() {
		// Exits when the library closes c, which it does on every shutdown.
		for e := range c {
			if e == nil {
				e = amqp.ErrClosed
			}
			select {
			case closed <- e:
			default:
			}
		}
	}()
	return c
}

// channel opens a channel, giving up after the timeout: amqp091-go's
// Channel() blocks until the broker answers, which may be never.
func (s *Session) channel(ctx context.Context) (*amqp.Channel, error) {
	type result struct {
		ch  *amqp.Channel
		err error
	}
	done := make(chan result, 1)
	go func() {
		ch, err := s.conn.Channel()
		done <- result{ch, err}
	}()
	select {
	case r := <-done:
		return r.ch, r.err
	case <-time.After(s.opts.Timeout):
		s.conn.Close() // unblocks the goroutine above
		return nil, errors.New("channel open timed out")
	case <-ctx.Done():
		s.conn.Close()
		return nil, ctx.Err()
	}
}

func (s *Session) declare() error {
	o := s.opts
	if err := s.ctl.ExchangeDeclare(o.Exchange, amqp.ExchangeDirect, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare exchange %s: %w", o.Exchange, err)
	}
	if err := s.ctl.ExchangeDeclare(DeadLetterExchange, amqp.ExchangeFanout, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare exchange %s: %w", DeadLetterExchange, err)
	}
	deadArgs := amqp.Table{}
	if o.DeadMaxLen > 0 {
		deadArgs["x-max-length"] = int64(o.DeadMaxLen)
	}
	if _, err := s.ctl.QueueDeclare(DeadLetterQueue, true, false, false, false, deadArgs); err != nil {
		return fmt.Errorf("declare queue %s: %w", DeadLetterQueue, err)
	}
	if err := s.ctl.QueueBind(DeadLetterQueue, "", DeadLetterExchange, false, nil); err != nil {
		return fmt.Errorf("bind %s: %w", DeadLetterQueue, err)
	}
	if _, err := s.ctl.QueueDeclare(o.Queue, true, false, false, false, o.QueueArgs); err != nil {
		// PRECONDITION_FAILED here means the queue exists with other
		// arguments; RabbitMQ cannot change them in place.
		return fmt.Errorf("declare queue %s (if its arguments changed, delete or migrate it): %w", o.Queue, err)
	}
	return nil
}

// Bind binds one shard's routing key to the queue.
func (s *Session) Bind(shard int) error { return s.setBinding(shard, true) }

// Unbind removes one shard's binding; unbinding an absent binding is a
// no-op for RabbitMQ.
func (s *Session) Unbind(shard int) error { return s.setBinding(shard, false) }

func (s *Session) setBinding(shard int, bind bool) error {
	key := strconv.Itoa(shard)
	if bind {
		if err := s.ctl.QueueBind(s.opts.Queue, key, s.opts.Exchange, false, nil); err != nil {
			return fmt.Errorf("bind shard %d: %w", shard, err)
		}
		return nil
	}
	if err := s.ctl.QueueUnbind(s.opts.Queue, key, s.opts.Exchange, nil); err != nil {
		return fmt.Errorf("unbind shard %d: %w", shard, err)
	}
	return nil
}

// Ack acks every delivery up to tag.
func (s *Session) Ack(upTo uint64) error { return s.consume.Ack(upTo, true) }

// Reject drops one delivery; the queue's dead-letter exchange receives it.
func (s *Session) Reject(tag uint64) error { return s.consume.Nack(tag, false, false) }

// Cancel stops the broker from sending more deliveries; those already sent
// stay unacked until acked or the channel closes.
func (s *Session) Cancel() error { return s.consume.Cancel(s.opts.Consumer, false) }

// DeadLetter publishes a copy of a poison message to the dead-letter
// exchange, with reason in its headers, and waits for the broker's
// confirm. Only then may the original be acked.
func (s *Session) DeadLetter(ctx context.Context, p amqp.Publishing, routingKey, reason string) error {
	headers := make(amqp.Table, len(p.Headers)+2)
	for k, v := range p.Headers {
		headers[k] = v
	}
	headers[ReasonHeader] = reason
	headers["x-pushrelay-queue"] = s.opts.Queue
	p.Headers = headers
	p.DeliveryMode = amqp.Persistent
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	conf, err := s.ctl.PublishWithDeferredConfirmWithContext(ctx, DeadLetterExchange, routingKey, false, false, p)
	if err != nil {
		return fmt.Errorf("publish dead letter: %w", err)
	}
	ok, err := conf.WaitContext(ctx)
	if err != nil {
		return fmt.Errorf("confirm dead letter: %w", err)
	}
	if !ok {
		return errors.New("broker nacked the dead letter")
	}
	return nil
}

// Close closes the connection; the broker requeues every unacked delivery.
func (s *Session) Close() error { return s.conn.Close() }
