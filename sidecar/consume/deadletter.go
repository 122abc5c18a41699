package consume

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// CopyResult says how the dead-letter copy of delivery Tag ended. Err nil:
// the broker confirmed the copy, so the original may be acked. Otherwise
// the original must be rejected, and the queue's own dead-lettering keeps
// it (without the reason header).
type CopyResult struct {
	Tag uint64
	Err error
}

type copyReq struct {
	tag uint64
	key string
	p   amqp.Publishing
	// probe: not a copy but a probe for the host queue (watch.go); its
	// fate is nobody's business.
	probe bool
}

type pendingCopy struct {
	tag      uint64
	deadline time.Time
	probe    bool
}

// deadLetters publishes dead-letter copies on a connection of its own, as
// RabbitMQ advises for publishers and consumers: while a resource alarm
// blocks it (connection.blocked), copies wait, and the consuming
// connection goes on delivering and acking. Confirms arrive
// asynchronously, so the relay loop never waits for one.
//
// The connection is the copies' alone: when the broker closes it (a copy
// it cannot take, such as one whose headers no longer fit in a frame), the
// copies it had not confirmed fail, their originals are rejected to the
// queue's own dead-lettering, and the next copy opens a new connection.
// The consuming session goes on.
type deadLetters struct {
	opts    Options
	conn    *amqp.Connection
	ch      *amqp.Channel
	reqs    chan copyReq
	results chan CopyResult
	blocked atomic.Bool
	// failures counts the connections in a row that closed or did not
	// open; the next one waits a backoff that grows with it.
	failures int
	stop     chan struct{}
	done     chan struct{}
}

// link is one dead-letter connection's notifications.
type link struct {
	confirms <-chan amqp.Confirmation
	closed   <-chan *amqp.Error
	blocked  <-chan bool
}

func openDeadLetters(ctx context.Context, o Options) (*deadLetters, error) {
	// Room for every delivery the broker may have handed us: each copy
	// stands for one unacked delivery, so the relay never blocks on it.
	room := o.Prefetch + 64
	d := &deadLetters{
		opts:    o,
		reqs:    make(chan copyReq, room),
		results: make(chan CopyResult, room),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	l, err := d.connect(ctx)
	if err != nil {
		return nil, err
	}
	go d.run(l)
	return d, nil
}

// connect opens the connection and its confirming channel.
func (d *deadLetters) connect(ctx context.Context) (link, error) {
	o := d.opts
	conn, err := dial(ctx, o, o.Consumer+"-deadletter", nil)
	if err != nil {
		return link{}, fmt.Errorf("dead-letter connection: %w", err)
	}
	closed := make(chan *amqp.Error, 2)
	conn.NotifyClose(forward(closed))
	blocked := make(chan bool, 1)
	conn.NotifyBlocked(forwardBlocked(&d.blocked, blocked))
	ch, err := openChannel(ctx, conn, o.Timeout)
	if err != nil {
		conn.Close()
		return link{}, fmt.Errorf("dead-letter channel: %w", err)
	}
	ch.NotifyClose(forward(closed))
	if err := ch.Confirm(false); err != nil {
		conn.Close()
		return link{}, fmt.Errorf("dead-letter confirm mode: %w", err)
	}
	d.conn, d.ch = conn, ch
	d.blocked.Store(false)
	// amqp091-go delivers confirms synchronously: the buffer must hold
	// every outstanding one, or its reader would stall the connection.
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 4*cap(d.reqs)))
	return link{confirms: confirms, closed: closed, blocked: blocked}, nil
}

// forwardBlocked follows connection.blocked/unblocked without ever making
// amqp091-go wait: the state goes to flag, a change signal to changed.
func forwardBlocked(flag *atomic.Bool, changed chan bool) chan amqp.Blocking {
	c := make(chan amqp.Blocking, 1)
	go func() {
		// Exits when the library closes c, on connection shutdown.
		for b := range c {
			flag.Store(b.Active)
			select {
			case changed <- b.Active:
			default:
				select { // replace the unread state with the newest
				case <-changed:
				default:
				}
				changed <- b.Active
			}
		}
	}()
	return c
}

func (d *deadLetters) run(l link) {
	defer close(d.done)
	defer func() {
		if d.conn != nil {
			d.conn.CloseDeadline(time.Now().Add(closeWait)) // its node may hang
		}
	}()
	pending := map[uint64]pendingCopy{} // publish sequence number → copy
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	blocked := false
	var reconnect <-chan time.Time // set while the connection is down
	for {
		var reqs <-chan copyReq
		if d.conn != nil && !blocked {
			reqs = d.reqs // while blocked or down, copies wait in the buffer
		}
		select {
		case r := <-reqs:
			seq := d.ch.GetNextPublishSeqNo()
			exchange := DeadLetterExchange
			if r.probe {
				exchange = "" // the default exchange: straight to the host queue
			}
			ctx, cancel := context.WithTimeout(context.Background(), d.opts.Timeout)
			err := d.ch.PublishWithContext(ctx, exchange, r.key, false, false, r.p)
			cancel()
			if err != nil {
				if !r.probe {
					d.report(CopyResult{Tag: r.tag, Err: fmt.Errorf("publish dead letter: %w", err)})
				}
				continue // the close notification follows
			}
			pending[seq] = pendingCopy{tag: r.tag, deadline: time.Now().Add(d.opts.Timeout), probe: r.probe}
		case c, ok := <-l.confirms:
			if !ok {
				l.confirms = nil // the close notification follows
				continue
			}
			p, known := pending[c.DeliveryTag]
			if !known {
				continue // timed out already
			}
			delete(pending, c.DeliveryTag)
			if p.probe {
				continue
			}
			var err error
			if !c.Ack {
				err = errors.New("broker nacked the dead letter")
			}
			d.failures = 0
			d.report(CopyResult{Tag: p.tag, Err: err})
		case e := <-l.closed:
			// Whatever was not confirmed is lost with the connection.
			for seq, p := range pending {
				delete(pending, seq)
				if !p.probe {
					d.report(CopyResult{Tag: p.tag, Err: fmt.Errorf("dead-letter connection closed before the confirm: %v", e)})
				}
			}
			d.conn.Close()
			d.conn, d.ch, blocked = nil, nil, false
			d.blocked.Store(false)
			l = link{}
			d.failures++
			reconnect = time.After(backoff(d.failures))
		case <-reconnect:
			reconnect = nil
			var err error
			if l, err = d.connect(context.Background()); err != nil {
				d.failures++
				reconnect = time.After(backoff(d.failures))
			}
		case blocked = <-l.blocked:
			if !blocked { // time spent blocked does not count
				for seq, p := range pending {
					p.deadline = time.Now().Add(d.opts.Timeout)
					pending[seq] = p
				}
			}
		case now := <-tick.C:
			if blocked {
				continue
			}
			for seq, p := range pending {
				if now.After(p.deadline) {
					delete(pending, seq)
					if !p.probe {
						d.report(CopyResult{Tag: p.tag, Err: errors.New("no confirm for the dead letter in time")})
					}
				}
			}
		case <-d.stop:
			return
		}
	}
}

// probe queues a probe for the host queue on this publishing connection:
// on the consuming one, a resource alarm would block the consuming
// connection with it (connection.blocked stops reading a connection that
// publishes). It drops the probe when copies fill the queue.
func (d *deadLetters) probe(queue, consumer string) {
	select {
	case d.reqs <- copyReq{key: queue, probe: true, p: amqp.Publishing{Headers: amqp.Table{ProbeHeader: consumer}}}:
	default:
	}
}

// backoff is the wait before the n-th dead-letter reconnect in a row:
// 100 ms doubling to 5 s.
func backoff(n int) time.Duration {
	return min(100*time.Millisecond<<min(n-1, 6), 5*time.Second)
}

func (d *deadLetters) report(r CopyResult) {
	select {
	case d.results <- r:
	case <-d.stop:
	}
}

func (d *deadLetters) close() {
	close(d.stop)
	<-d.done
}
