package consume

import (
	"context"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// nodePing notices a broker node that hangs (a GC pause, a disk stall, a
// frozen VM). Its TCP connections stay up, so only the heartbeat would
// notice, after two to three heartbeat intervals; and every call the relay
// makes meanwhile waits. Every PingEvery the ping asks the node whether
// the exchange exists: a passive declare, which the node answers from its
// own copy of the metadata, whatever the other nodes and the queue's
// leader are doing. No answer within HangAfter: the node hangs, and the
// socket is closed, which ends every call waiting on it and the session.
//
// The relay then consumes through another node. On a single-active-
// consumer queue it waits there until the cluster declares the hung node
// down (net_ticktime) and returns what the old consumer held, first.
type nodePing struct {
	hung chan struct{}
	stop chan struct{}
	done chan struct{}
}

func startPing(ctx context.Context, s *Session) (*nodePing, error) {
	ch, err := openChannel(ctx, s.conn, s.opts.Timeout)
	if err != nil {
		return nil, err
	}
	p := &nodePing{hung: make(chan struct{}), stop: make(chan struct{}), done: make(chan struct{})}
	go p.run(ch, s)
	return p, nil
}

func (p *nodePing) run(ch *amqp.Channel, s *Session) {
	defer close(p.done)
	tick := time.NewTicker(s.opts.PingEvery)
	defer tick.Stop()
	answers := make(chan error, 1)
	for {
		select {
		case <-p.stop:
			return
		case <-tick.C:
		}
		// The call returns when the node answers or the connection
		// closes; the goroutine never outlives the connection.
		go func() {
			answers <- ch.ExchangeDeclarePassive(s.opts.Exchange, amqp.ExchangeDirect, true, false, false, false, nil)
		}()
		timeout := time.NewTimer(s.opts.HangAfter)
		select {
		case err := <-answers:
			timeout.Stop()
			if err != nil {
				return // the connection is gone: Closed says so
			}
			continue
		case <-timeout.C:
			close(p.hung)
			s.sock.Close()
		case <-p.stop:
			timeout.Stop()
		}
		<-answers // ended by the closed socket or connection
		return
	}
}

func (p *nodePing) close() {
	close(p.stop)
	<-p.done
}
