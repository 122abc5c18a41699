package publish

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/pushrelay/pushrelay/sidecar/message"
	"github.com/pushrelay/pushrelay/sidecar/shard"
)

// Job is one delivery to publish. Gen and Tag identify it to the acker: tags
// restart on every AMQP channel, so a settlement whose Gen is not the
// current one is ignored.
type Job struct {
	Gen uint64
	Tag uint64
	Msg message.Message
}

// Outcome is how a Job ended.
type Outcome uint8

const (
	// Accepted: Nginx took the message. Ack it.
	Accepted Outcome = iota
	// Refused: Nginx refused it for good (400, 403, 413). Dead-letter it.
	Refused
	// Stale: the job belongs to an AMQP channel that is gone; the broker
	// has requeued it already, so it was not published.
	Stale
)

// Settlement reports a finished Job. Every submitted Job is settled
// exactly once, unless the pool is stopped first.
type Settlement struct {
	Job     Job
	Outcome Outcome
	Status  int // HTTP status, for Refused
}

// Options configure a Pool.
type Options struct {
	Target   Target
	Lanes    int
	Pipeline int           // requests in flight per connection
	Timeout  time.Duration // per request batch, write to last response
	RetryMax time.Duration // cap of the exponential retry backoff
	QueueLen int           // jobs buffered per lane; ≥ prefetch so Submit never blocks
}

// Metrics are the publisher's figures. Fields may be nil in tests.
type Metrics struct {
	Published *metrics.Counter
	Retries   *metrics.Counter
	Refused   *metrics.Counter
	Duration  *metrics.PrometheusHistogram // seconds from write to response
	Lag       *metrics.PrometheusHistogram // seconds from published_at to accepted
}

// Pool is a set of lanes. Submit is called by one goroutine (the
// consumer); lanes send settlements to the channel given to NewPool.
type Pool struct {
	opts    Options
	lanes   []*lane
	gen     atomic.Uint64
	stop    context.CancelFunc
	wg      sync.WaitGroup
	healthy atomic.Int64 // lanes whose last attempt reached Nginx
}

// NewPool starts the lanes; they run until Stop.
func NewPool(opts Options, out chan<- Settlement, m Metrics, log *slog.Logger) *Pool {
	ctx, cancel := context.WithCancel(context.Background())
	p := &Pool{opts: opts, stop: cancel}
	p.lanes = make([]*lane, opts.Lanes)
	for i := range p.lanes {
		p.lanes[i] = newLane(i, p, out, m, log)
	}
	p.healthy.Store(int64(opts.Lanes))
	p.wg.Add(len(p.lanes))
	for _, l := range p.lanes {
		go func() {
			defer p.wg.Done()
			l.run(ctx)
		}()
	}
	return p
}

// SetGen declares the current AMQP channel generation; jobs of older ones
// still queued in lanes are settled Stale rather than published.
func (p *Pool) SetGen(gen uint64) { p.gen.Store(gen) }

// Submit queues j on its channel's lane.
func (p *Pool) Submit(j Job) {
	p.lanes[shard.FNV1a32(j.Msg.Channel)%uint32(len(p.lanes))].in <- j
}

// Reachable reports whether every lane's last attempt got an HTTP answer.
func (p *Pool) Reachable() bool { return p.healthy.Load() == int64(len(p.lanes)) }

// Stop ends every lane and closes its connection. Jobs not yet settled are
// dropped: the caller must not ack them.
func (p *Pool) Stop() {
	p.stop()
	p.wg.Wait()
}
