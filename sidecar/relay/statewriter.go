package relay

import (
	"maps"
	"time"

	"github.com/pushrelay/pushrelay/sidecar/drainstate"
)

// stateWriter writes the drain state file off the relay loop: a write
// fsyncs, and the loop must not hold acks and deliveries while it does.
// The loop hands it each new set of drains (Save), only when the set
// changes; the writer keeps the newest, writes it, and retries a failed
// write every stateRetry until it succeeds or a newer set replaces it.
//
// What the writer has not written is not applied: a restart would unbind
// those shards at once. Its error is on /readyz and in
// pushrelay_config_applied (Relay.persistErr), and the draining gauge
// moves only once the file says so.
type stateWriter struct {
	r     *Relay
	path  string
	queue string
	next  chan map[int]time.Time
	stop  chan struct{}
	done  chan struct{}
}

// stateRetry: how often a failed state write is tried again.
const stateRetry = time.Second

func newStateWriter(r *Relay, path, queue string) *stateWriter {
	return &stateWriter{r: r, path: path, queue: queue,
		next: make(chan map[int]time.Time, 1), stop: make(chan struct{}), done: make(chan struct{})}
}

// Save hands the writer a copy of draining, replacing any set it has not
// taken yet. It never blocks.
func (w *stateWriter) Save(draining map[int]time.Time) {
	set := maps.Clone(draining)
	for {
		select {
		case w.next <- set:
			return
		default:
			select {
			case <-w.next: // superseded
			default:
			}
		}
	}
}

func (w *stateWriter) run() {
	defer close(w.done)
	var (
		pending map[int]time.Time
		retry   <-chan time.Time
	)
	for {
		select {
		case pending = <-w.next:
		case <-retry:
		case <-w.stop:
			select { // a stop writes what it was handed last
			case pending = <-w.next:
			default:
			}
			if pending != nil {
				w.write(pending)
			}
			return
		}
		retry = nil
		if pending == nil {
			continue
		}
		if w.write(pending) {
			pending = nil
		} else {
			retry = time.After(stateRetry)
		}
	}
}

func (w *stateWriter) write(set map[int]time.Time) bool {
	r := w.r
	r.m.stateWrites.Inc()
	if err := drainstate.Save(w.path, w.queue, set); err != nil {
		why := "the drain state is not saved, so a restart would unbind the draining shards at once: " + err.Error()
		if old := r.persistErr.Swap(&why); old == nil {
			r.log.Error("drains will not survive a restart", "err", err, "retry_every", stateRetry)
		}
		return false
	}
	if r.persistErr.Swap(nil) != nil {
		r.log.Info("drain state saved again")
	}
	r.shardsDraining.Store(int64(len(set)))
	return true
}

func (w *stateWriter) close() {
	close(w.stop)
	<-w.done
}
