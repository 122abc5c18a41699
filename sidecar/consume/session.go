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
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// Names of the dead-letter topology, part of the operators' contract.
const (
	DeadLetterExchange = "pushrelay.dlx"
	DeadLetterQueue    = "pushrelay.dead"
	// ReasonHeader carries why a message was dead-lettered.
	ReasonHeader = "x-pushrelay-reason"
	// ProbeHeader marks a message a waiting relay puts in its own queue
	// to learn which consumer is active (watch.go). Whoever receives it
	// acks it; it never reaches Nginx.
	ProbeHeader = "x-pushrelay-probe"
)

// ErrQueueTaken: another consumer holds the host's queue.
var ErrQueueTaken = errors.New("another consumer holds the queue")

// Options configure a Session.
type Options struct {
	URL        string
	Exchange   string
	Queue      string
	QueueArgs  amqp.Table
	DeadMaxLen int
	// DeadQueueType is pushrelay.dead's x-queue-type when this relay is
	// the first to create it: quorum in a cluster, so that the dead
	// letters, and every relay's session setup, survive a node's loss.
	DeadQueueType string
	Prefetch      int
	Heartbeat     time.Duration
	// Timeout bounds the dial, the handshake and each channel open. A
	// declare or bind is not bounded: while a cluster member hangs, the
	// broker answers none until it declares the member down (net_ticktime),
	// and another node would answer no sooner.
	Timeout  time.Duration
	Consumer string // consumer tag
	// QueueCheck: how often to ask whether the queue still exists, for a
	// broker that deletes it without a basic.cancel (watch.go); 0: never.
	QueueCheck time.Duration
	// SingleActive: the queue has x-single-active-consumer, so the
	// consumer is not exclusive: a second one waits, and the broker
	// activates it once the first is gone and its messages are back.
	SingleActive bool
	// PingEvery and HangAfter: how often the session asks its node a
	// question that needs no other node, and how long an answer may take
	// before the node counts as hung and the connection is dropped
	// (ping.go); 0: never.
	PingEvery, HangAfter time.Duration
}

// Session is the relay's link to the broker: a consuming connection with a
// consuming channel, whose delivery tags start at 1, and a control
// channel for declarations and bindings; and a second connection for
// dead-letter copies, so that a publisher-side block never stops acks,
// and a copy the broker refuses never ends the session.
type Session struct {
	opts Options
	conn *amqp.Connection
	// sock is conn's socket: closing it ends a connection whose node no
	// longer answers, which conn.Close would wait on.
	sock   net.Conn
	ping   *nodePing
	active atomic.Bool // a delivery came: this consumer is the active one
	// shards and want say which shards must be bound (Open); bound says
	// whether BindAll has made it so on this session.
	shards int
	want   func(shard int) bool
	bound  bool
	// bindNow: the queue had no active consumer when this one came.
	bindNow    bool
	consume    *amqp.Channel
	ctl        *amqp.Channel
	dead       *deadLetters
	watch      *queueWatch
	Deliveries <-chan amqp.Delivery
	// DeadLettered reports each dead-letter copy's fate, in no set order.
	DeadLettered <-chan CopyResult
	// Closed receives once when the consuming connection or any of its
	// channels closes.
	Closed <-chan *amqp.Error
	// Mismatches says which queues exist with other arguments than asked
	// for, and are used as they are.
	Mismatches []string
	// QueueMismatch: the host queue itself is among Mismatches.
	QueueMismatch bool
	// Cancelled receives the consumer tag when the broker cancels the
	// consumer (the queue was deleted, or its node went away).
	Cancelled <-chan string
	// Gone is closed when the queue turns out deleted although the broker
	// sent no basic.cancel. Nil without Options.QueueCheck.
	Gone <-chan struct{}
	// Hung is closed when the node stopped answering (Options.HangAfter),
	// just before the session's socket is closed. Nil without PingEvery.
	Hung <-chan struct{}
	// Setup is how long Open's steps took: where a slow start waited.
	Setup struct{ Dial, Declare, Consume time.Duration }
}

// Open connects, declares the topology and starts consuming. bound lists
// the shards that must be bound; every other shard of count is unbound, so
// a relay that starts after a map change leaves no stale binding behind.
// A consumer that may be waiting binds nothing yet (BindAll).
func Open(ctx context.Context, o Options, count int, bound func(shard int) bool) (*Session, error) {
	s := &Session{opts: o}
	began := time.Now()
	conn, err := dial(ctx, o, o.Consumer, &s.sock)
	if err != nil {
		return nil, err
	}
	s.conn = conn
	s.Setup.Dial = time.Since(began)
	if err := s.setUp(ctx, count, bound); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// Try connects to url and hangs up: whether a new broker URL works, tried
// before it replaces one that does.
func Try(ctx context.Context, url string, timeout time.Duration) error {
	conn, err := dial(ctx, Options{URL: url, Timeout: timeout}, "pushrelay-check", nil)
	if err != nil {
		return err
	}
	return conn.Close()
}

// dial connects; sock, if not nil, receives the connection's socket.
func dial(ctx context.Context, o Options, name string, sock *net.Conn) (*amqp.Connection, error) {
	conn, err := amqp.DialConfig(o.URL, amqp.Config{
		Heartbeat: o.Heartbeat,
		Locale:    "en_US",
		Dial: func(network, addr string) (net.Conn, error) {
			d := net.Dialer{Timeout: o.Timeout}
			c, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			if sock != nil {
				*sock = c
			}
			// Bounds the AMQP handshake; amqp091-go clears it afterwards.
			return c, c.SetDeadline(time.Now().Add(o.Timeout))
		},
		Properties: amqp.Table{"connection_name": name},
	})
	if err != nil {
		return nil, fmt.Errorf("dial: %w", SafeURLError(err))
	}
	return conn, nil
}

// SafeURLError replaces an error from parsing an AMQP URL, which quotes the
// URL and so the password (or a piece of it), with one that quotes nothing.
func SafeURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return errors.New("the AMQP URL does not parse (not shown: it holds the password); " +
			"percent-encode %, /, @, : and # in the user and password")
	}
	return err
}

func (s *Session) setUp(ctx context.Context, count int, bound func(int) bool) error {
	closed := make(chan *amqp.Error, 6)
	s.Closed = closed
	s.conn.NotifyClose(forward(closed))

	var err error
	if s.ctl, err = openChannel(ctx, s.conn, s.opts.Timeout); err != nil {
		return fmt.Errorf("open control channel: %w", err)
	}
	s.ctl.NotifyClose(forward(closed))
	began := time.Now()
	if err := s.declare(ctx); err != nil {
		return err
	}
	s.Setup.Declare = time.Since(began)
	began = time.Now()
	// Consume before binding: a second relay with the same host is
	// refused here, before it could rewrite the first one's bindings.
	if err := s.startConsuming(ctx, closed); err != nil {
		return err
	}
	s.Setup.Consume = time.Since(began)
	if s.opts.PingEvery > 0 {
		// Before the binds: they are what waits on a hung node.
		if s.ping, err = startPing(ctx, s); err != nil {
			return fmt.Errorf("open ping channel: %w", err)
		}
		s.Hung = s.ping.hung
	}
	s.shards, s.want = count, bound
	if !s.Standby() || s.bindNow {
		if err := s.BindAll(); err != nil {
			return err
		}
	}
	if s.dead, err = openDeadLetters(ctx, s.opts); err != nil {
		return err
	}
	s.DeadLettered = s.dead.results
	if s.opts.QueueCheck > 0 {
		if s.watch, err = watchQueue(ctx, s, s.opts.QueueCheck); err != nil {
			return fmt.Errorf("open queue watch channel: %w", err)
		}
		s.Gone = s.watch.gone
	}
	return nil
}

func (s *Session) startConsuming(ctx context.Context, closed chan *amqp.Error) error {
	var err error
	if s.consume, err = openChannel(ctx, s.conn, s.opts.Timeout); err != nil {
		return fmt.Errorf("open consume channel: %w", err)
	}
	s.consume.NotifyClose(forward(closed))
	// One consumer on the channel, so one cancel at most: the buffer keeps
	// amqp091-go, which sends it synchronously, from ever waiting.
	s.Cancelled = s.consume.NotifyCancel(make(chan string, 1))
	if err := s.consume.Qos(s.opts.Prefetch, 0, false); err != nil {
		return fmt.Errorf("qos: %w", err)
	}
	if s.opts.SingleActive {
		// A passive declare counts the active consumer only: none means
		// this one will be active, and binds at once (a producer's message
		// must not find the shards of a new queue unbound). It still
		// waits for its probe to say so: two relays started at the same
		// instant both see none, and the one that waits must not say it
		// consumes; both bind then, which is harmless for a clone.
		q, err := s.consume.QueueDeclarePassive(s.opts.Queue, true, false, false, false, nil)
		if err != nil {
			return fmt.Errorf("count the consumers of %s: %w", s.opts.Queue, err)
		}
		s.bindNow = q.Consumers == 0
	}
	// A second relay with the same host (a cloned VM, a copied config)
	// must not split the queue with the first, silently halving what each
	// frontend's browsers get. On a classic queue the consumer is
	// exclusive: the second is refused, stays not ready and keeps trying.
	// A quorum queue (3.10) does not enforce exclusive; there the queue's
	// x-single-active-consumer makes the second one wait, and the broker
	// hands it the queue, returned messages first, once the first is gone.
	exclusive := !s.opts.SingleActive
	s.Deliveries, err = s.consume.Consume(s.opts.Queue, s.opts.Consumer, false, exclusive, false, false, nil)
	var ae *amqp.Error
	if errors.As(err, &ae) && ae.Code == amqp.AccessRefused {
		return fmt.Errorf("%w: queue %s (%s): is another relay running with the same host?", ErrQueueTaken, s.opts.Queue, ae.Reason)
	}
	if err != nil {
		return fmt.Errorf("consume %s: %w", s.opts.Queue, err)
	}
	return nil
}

// Standby reports whether this consumer may be a waiting one: on a
// single-active-consumer queue only the active consumer gets anything, and
// nothing has come to this one yet. The broker does not say which one is
// active (a passive declare counts only the active consumer, whoever it
// is), so the queue watch puts a probe in the queue at once and every
// probeEvery while this holds: the active consumer receives it within
// milliseconds, and a waiting one never does (watch.go).
func (s *Session) Standby() bool {
	return s.opts.SingleActive && !s.active.Load()
}

// Delivered records that a delivery came: this consumer is the active one.
func (s *Session) Delivered() {
	if !s.active.Load() { // a load per delivery, a store once
		s.active.Store(true)
	}
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

// openChannel opens a channel, giving up after timeout: amqp091-go's
// Channel() blocks until the broker answers, which may be never.
func openChannel(ctx context.Context, conn *amqp.Connection, timeout time.Duration) (*amqp.Channel, error) {
	type result struct {
		ch  *amqp.Channel
		err error
	}
	done := make(chan result, 1)
	go func() {
		ch, err := conn.Channel()
		done <- result{ch, err}
	}()
	select {
	case r := <-done:
		return r.ch, r.err
	case <-time.After(timeout):
		conn.Close() // unblocks the goroutine above
		return nil, errors.New("channel open timed out")
	case <-ctx.Done():
		conn.Close()
		return nil, ctx.Err()
	}
}

func (s *Session) declare(ctx context.Context) error {
	o := s.opts
	if err := s.ctl.ExchangeDeclare(o.Exchange, amqp.ExchangeDirect, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare exchange %s: %w", o.Exchange, err)
	}
	if err := s.ctl.ExchangeDeclare(DeadLetterExchange, amqp.ExchangeFanout, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare exchange %s: %w", DeadLetterExchange, err)
	}
	deadArgs := amqp.Table{}
	if o.DeadQueueType != "" {
		deadArgs["x-queue-type"] = o.DeadQueueType
	}
	if o.DeadMaxLen > 0 {
		deadArgs["x-max-length"] = int64(o.DeadMaxLen)
	}
	// pushrelay.dead is shared by every frontend: the first to create it
	// sets its arguments, and the others use it as it is, so that two
	// frontends' dead_letter_max_length can never keep either offline.
	if exists, err := s.queueExists(ctx, DeadLetterQueue); err != nil {
		return err
	} else if !exists {
		if err := s.declareQueue(ctx, DeadLetterQueue, deadArgs); err != nil {
			return err
		}
	}
	if err := s.ctl.QueueBind(DeadLetterQueue, "", DeadLetterExchange, false, nil); err != nil {
		return fmt.Errorf("bind %s: %w", DeadLetterQueue, err)
	}
	return s.declareQueue(ctx, o.Queue, o.QueueArgs)
}

// declareQueue declares a durable queue. RabbitMQ cannot change a live
// queue's arguments and refuses a declare that differs (PRECONDITION_FAILED).
// Going offline over that would be worse than running with the arguments
// the queue has: so the queue is used as it is, and the difference goes to
// Mismatches. pushrelay.dead, shared by every frontend, meets this
// whenever two frontends' dead_letter_max_length differ.
//
// The declare runs on a channel of its own, because the refusal closes the
// channel it came on, and the session's channels are watched.
func (s *Session) declareQueue(ctx context.Context, name string, args amqp.Table) error {
	ch, err := openChannel(ctx, s.conn, s.opts.Timeout)
	if err != nil {
		return fmt.Errorf("open declare channel: %w", err)
	}
	_, err = ch.QueueDeclare(name, true, false, false, false, args)
	var ae *amqp.Error
	if errors.As(err, &ae) && ae.Code == amqp.PreconditionFailed {
		fix := "put the old value back (a reload may), delete the queue so that it is declared anew " +
			"(what it holds is lost), or name a new amqp.queue. A policy can lower x-message-ttl and x-max-length, not raise them"
		if strings.Contains(ae.Reason, "x-single-active-consumer") {
			// No config key sets it: the queue predates it.
			fix = "a quorum queue declared before x-single-active-consumer keeps neither order through a broker fault " +
				"nor a second relay with the same host from splitting it: move it (README, \"One relay per host queue\")"
		}
		s.Mismatches = append(s.Mismatches, fmt.Sprintf("queue %s exists with other arguments than the config's (%s): used as it is; %s",
			name, ae.Reason, fix))
		s.QueueMismatch = s.QueueMismatch || name == s.opts.Queue
		return nil // the broker closed ch
	}
	ch.Close()
	if err != nil {
		return fmt.Errorf("declare queue %s: %w", name, err)
	}
	return nil
}

// queueExists asks with a passive declare, on a channel of its own: the
// broker closes the channel when the queue does not exist.
func (s *Session) queueExists(ctx context.Context, name string) (bool, error) {
	ch, err := openChannel(ctx, s.conn, s.opts.Timeout)
	if err != nil {
		return false, fmt.Errorf("open declare channel: %w", err)
	}
	_, err = ch.QueueDeclarePassive(name, true, false, false, false, nil)
	var ae *amqp.Error
	if errors.As(err, &ae) && ae.Code == amqp.NotFound {
		return false, nil
	}
	ch.Close()
	if err != nil {
		return false, fmt.Errorf("look up queue %s: %w", name, err)
	}
	return true, nil
}

// BindAll binds every shard Open was told to and unbinds every other. A
// waiting consumer does not (Open skips it): the active relay's bindings
// are not its to rewrite, and on a node that hangs they would wait for
// the cluster. It binds once it is the active consumer.
func (s *Session) BindAll() error {
	for shard := 0; shard < s.shards; shard++ {
		if err := s.setBinding(shard, s.want(shard)); err != nil {
			return err
		}
	}
	s.bound = true
	return nil
}

// Bound reports whether BindAll has run on this session: until it has,
// Bind and Unbind are for later (BindAll does what they would).
func (s *Session) Bound() bool { return s.bound }

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

// Ack acks tag, or with multiple every delivery up to tag.
func (s *Session) Ack(tag uint64, multiple bool) error { return s.consume.Ack(tag, multiple) }

// Reject drops one delivery; the queue's dead-letter exchange receives it.
func (s *Session) Reject(tag uint64) error { return s.consume.Nack(tag, false, false) }

// Cancel stops the broker from sending more deliveries; those already sent
// stay unacked until acked or the channel closes.
func (s *Session) Cancel() error { return s.consume.Cancel(s.opts.Consumer, false) }

// DeadLetter queues a copy of a poison message, with reason in its
// headers, for the dead-letter exchange; its fate comes back on
// DeadLettered. Only a confirmed copy lets the original be acked. It
// reports false, having sent nothing, if the queue of copies is full.
func (s *Session) DeadLetter(tag uint64, p amqp.Publishing, routingKey, reason string) bool {
	headers := make(amqp.Table, len(p.Headers)+2)
	for k, v := range p.Headers {
		headers[k] = v
	}
	headers[ReasonHeader] = reason
	headers["x-pushrelay-queue"] = s.opts.Queue
	p.Headers = headers
	p.DeliveryMode = amqp.Persistent
	select {
	case s.dead.reqs <- copyReq{tag: tag, key: routingKey, p: p}:
		return true
	default:
		return false
	}
}

// DeadLetterBlocked reports whether the broker has blocked the dead-letter
// connection (a resource alarm): copies wait until it lifts.
func (s *Session) DeadLetterBlocked() bool { return s.dead != nil && s.dead.blocked.Load() }

// Close closes both connections; the broker requeues every unacked
// delivery.
func (s *Session) Close() error {
	if s.dead != nil {
		s.dead.close()
	}
	// A node that hangs never answers connection.close: the deadline
	// bounds the wait, then the socket closes all the same.
	err := s.conn.CloseDeadline(time.Now().Add(closeWait))
	if s.watch != nil {
		s.watch.close() // after the connection: that ends a declare in progress
	}
	if s.ping != nil {
		s.ping.close()
	}
	return err
}

// closeWait bounds the wait for a node's close-ok.
const closeWait = 2 * time.Second
