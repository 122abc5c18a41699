package consume

import (
	"context"
	"errors"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// queueWatch asks the broker, every interval, whether the host queue still
// exists. RabbitMQ is meant to send basic.cancel when a consumed queue is
// deleted, but 3.10.8 sometimes does not (seen in about 1 of 4 deletes,
// with a plain amqp091-go client too): the channel goes on counting a
// consumer of a queue that is gone, and a relay that waits for the cancel
// consumes nothing, forever. A passive declare answers NOT_FOUND then.
// probeEvery and probeMax: a possibly waiting consumer probes after
// probeEvery, then at doubling intervals up to probeMax: a standby on a
// quiet queue beside a live relay costs one message every probeMax.
const (
	probeEvery = time.Second
	probeMax   = 30 * time.Second
)

type queueWatch struct {
	gone chan struct{}
	stop chan struct{}
	done chan struct{}
}

// On a single-active-consumer queue, a consumer that has received nothing
// may be the one waiting, or the active one on a quiet queue: the watch
// puts a probe message in the queue, which only the active consumer
// receives (Session.Standby), at once and then at growing intervals
// (probeEvery doubling to probeMax) until one comes. Only into an empty
// queue, and on the dead-letter connection (deadLetters.probe). A probe
// never expires: one put in while no consumer is active (a hung one) goes
// to whichever is active next, which acks it, instead of into
// pushrelay.dead.
//
// watchQueue starts the watch on a channel of its own: the broker closes
// the channel it answers NOT_FOUND on, and the session's are watched.
// Only NOT_FOUND counts: a slow or failing broker is the ping's and the
// session's business, not the watch's.
func watchQueue(ctx context.Context, s *Session, interval time.Duration) (*queueWatch, error) {
	ch, err := openChannel(ctx, s.conn, s.opts.Timeout)
	if err != nil {
		return nil, err
	}
	w := &queueWatch{gone: make(chan struct{}), stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		// The first check at once, for the first probe; then every
		// interval, or sooner while this consumer may be the waiting one.
		next := time.NewTimer(0)
		defer next.Stop()
		probeWait := probeEvery
		for {
			select {
			case <-w.stop:
				return
			case <-next.C:
			}
			if s.Standby() {
				next.Reset(min(interval, probeWait))
				probeWait = min(2*probeWait, probeMax)
			} else {
				next.Reset(interval)
			}
			// Returns when the broker answers or the connection closes,
			// which Close does before waiting for this goroutine.
			q, err := ch.QueueDeclarePassive(s.opts.Queue, true, false, false, false, nil)
			var ae *amqp.Error
			if errors.As(err, &ae) && ae.Code == amqp.NotFound {
				close(w.gone)
				return
			}
			if err != nil {
				return // the connection is gone: Closed says so
			}
			// Only into an empty queue: messages ready there reach the
			// active consumer anyway, and a full queue (x-overflow
			// drop-head) would drop its oldest for the probe.
			if s.Standby() && q.Messages == 0 {
				s.dead.probe(s.opts.Queue, s.opts.Consumer)
			}
		}
	}()
	return w, nil
}

func (w *queueWatch) close() {
	close(w.stop)
	<-w.done
}
