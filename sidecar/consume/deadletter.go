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
}

type pendingCopy struct {
	tag      uint64
	deadline time.Time
}

// deadLetters publishes dead-letter copies on a connection of its own, as
// RabbitMQ advises for publishers and consumers: while a resource alarm
// blocks it (connection.blocked), copies wait, and the consuming
// connection goes on delivering and acking. Confirms arrive
// asynchronously, so the relay loop never waits for one.
type deadLetters struct {
	conn    *amqp.Connection
	ch      *amqp.Channel
	timeout time.Duration
	reqs    chan copyReq
	results chan CopyResult
	blocked atomic.Bool
	stop    chan struct{}
	done    chan struct{}
}

func openDeadLetters(ctx context.Context, s *Session, closed chan *amqp.Error) (*deadLetters, error) {
	o := s.opts
	conn, err := dial(ctx, o, o.Consumer+"-deadletter")
	if err != nil {
		return nil, fmt.Errorf("dead-letter connection: %w", err)
	}
	conn.NotifyClose(forward(closed))
	// Room for every delivery the broker may have handed us: each copy
	// stands for one unacked delivery, so the relay never blocks on it.
	room := o.Prefetch + 64
	d := &deadLetters{
		conn:    conn,
		timeout: o.Timeout,
		reqs:    make(chan copyReq, room),
		results: make(chan CopyResult, room),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	blocked := make(chan bool, 1)
	conn.NotifyBlocked(forwardBlocked(&d.blocked, blocked))
	if d.ch, err = openChannel(ctx, conn, o.Timeout); err != nil {
		conn.Close()
		return nil, fmt.Errorf("dead-letter channel: %w", err)
	}
	d.ch.NotifyClose(forward(closed))
	if err := d.ch.Confirm(false); err != nil {
		conn.Close()
		return nil, fmt.Errorf("dead-letter confirm mode: %w", err)
	}
	// amqp091-go delivers confirms synchronously: the buffer must hold
	// every outstanding one, or its reader would stall the connection.
	confirms := d.ch.NotifyPublish(make(chan amqp.Confirmation, 4*room))
	go d.run(confirms, blocked)
	return d, nil
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

func (d *deadLetters) run(confirms <-chan amqp.Confirmation, blockedC <-chan bool) {
	defer close(d.done)
	pending := map[uint64]pendingCopy{} // publish sequence number → copy
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	blocked := d.blocked.Load()
	for {
		var reqs <-chan copyReq
		if !blocked {
			reqs = d.reqs // while blocked, copies wait in the buffer
		}
		select {
		case r := <-reqs:
			seq := d.ch.GetNextPublishSeqNo()
			ctx, cancel := context.WithTimeout(context.Background(), d.timeout)
			err := d.ch.PublishWithContext(ctx, DeadLetterExchange, r.key, false, false, r.p)
			cancel()
			if err != nil {
				// The channel is gone; the session ends with it, and the
				// broker redelivers the original.
				d.report(CopyResult{Tag: r.tag, Err: fmt.Errorf("publish dead letter: %w", err)})
				continue
			}
			pending[seq] = pendingCopy{tag: r.tag, deadline: time.Now().Add(d.timeout)}
		case c, ok := <-confirms:
			if !ok {
				return
			}
			p, known := pending[c.DeliveryTag]
			if !known {
				continue // timed out already
			}
			delete(pending, c.DeliveryTag)
			var err error
			if !c.Ack {
				err = errors.New("broker nacked the dead letter")
			}
			d.report(CopyResult{Tag: p.tag, Err: err})
		case blocked = <-blockedC:
			if !blocked { // time spent blocked does not count
				for seq, p := range pending {
					p.deadline = time.Now().Add(d.timeout)
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
					d.report(CopyResult{Tag: p.tag, Err: errors.New("no confirm for the dead letter in time")})
				}
			}
		case <-d.stop:
			return
		}
	}
}

func (d *deadLetters) report(r CopyResult) {
	select {
	case d.results <- r:
	case <-d.stop:
	}
}

func (d *deadLetters) close() {
	close(d.stop)
	d.conn.Close()
	<-d.done
}
