package consume

import (
	"context"
	"errors"
	"strconv"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// queueWatch asks the broker, every interval, whether the host queue still
// exists. RabbitMQ is meant to send basic.cancel when a consumed queue is
// deleted, but 3.10.8 sometimes does not (seen in about 1 of 4 deletes,
// with a plain amqp091-go client too): the channel goes on counting a
// consumer of a queue that is gone, and a relay that waits for the cancel
// consumes nothing, forever. A passive declare answers NOT_FOUND then.
// probeEvery: how often a possibly waiting consumer probes; its probes
// expire as soon, so that a hung active consumer gathers none.
const probeEvery = time.Second

type queueWatch struct {
	gone chan struct{}
	stop chan struct{}
	done chan struct{}
}

// The same declare counts the queue's consumers. On a single-active-
// consumer queue, a relay that has received nothing while others consume
// may be the one waiting, or the active one on a quiet queue: it puts a
// probe message in the queue, which only the active consumer receives
// (Session.Standby). The probe expires unread if no consumer is active.
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
		// Every interval; every probeEvery while this consumer may be the
		// waiting one, so that the active one learns it soon.
		next := time.NewTimer(interval)
		defer next.Stop()
		for {
			if s.Standby() {
				next.Reset(min(interval, probeEvery))
			}
			select {
			case <-w.stop:
				return
			case <-next.C:
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
			s.consumers.Store(int64(q.Consumers))
			if s.Standby() {
				err = ch.Publish("", s.opts.Queue, false, false, amqp.Publishing{
					Headers:    amqp.Table{ProbeHeader: s.opts.Consumer},
					Expiration: strconv.Itoa(int(probeEvery.Milliseconds())),
				})
				if err != nil {
					return
				}
			}
		}
	}()
	return w, nil
}

func (w *queueWatch) close() {
	close(w.stop)
	<-w.done
}
