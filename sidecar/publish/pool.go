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
// current one is ignored. A job outlives its session: what the relay holds
// is valid and is published in order, and the broker's redelivered copy
// is then skipped (Seen).
type Job struct {
	Gen uint64
	Tag uint64
	Msg message.Message
	// adopted: taken over from another pool (Adopt).
	adopted bool
}

// Outcome is how a Job ended.
type Outcome uint8

const (
	// Accepted: Nginx took the message. Ack it.
	Accepted Outcome = iota
	// Refused: the message itself cannot be published (Settlement.Reason
	// says why). Dead-letter it.
	Refused
)

// Reasons a lane gives up on a message, beside "nginx_<status>" for a
// status that is the message's fault. They label the dead-letter metric.
const (
	// ReasonBudget: Nginx answered 5xx for this channel for longer than
	// the retry budget while other channels were published.
	ReasonBudget = "nginx_5xx_budget"
	// ReasonExpired: the message is older than push.max_age.
	ReasonExpired = "expired"
)

// RefusedStatuses are the HTTP statuses a message may be dead-lettered for,
// for pre-registering metrics.
var RefusedStatuses = []int{400, 403, 404, 405, 413, 414}

// Settlement reports a finished Job. Every submitted Job is settled
// exactly once, unless the pool is stopped first.
type Settlement struct {
	Job     Job
	Outcome Outcome
	Status  int    // the last HTTP status, for Refused (0 for expired)
	Reason  string // for Refused: nginx_413, nginx_5xx_budget, expired, ...
	// Duplicate: Accepted without a publish, because Nginx took this
	// redelivered message before (Seen).
	Duplicate bool
}

// Options configure a Pool.
type Options struct {
	Target   Target
	Lanes    int
	Pipeline int           // requests in flight per connection
	Timeout  time.Duration // per request: from its write, or the previous answer, to its answer
	RetryMax time.Duration // cap of the exponential retry backoff
	// RetryBudget is how long a channel may keep getting 5xx while other
	// channels are published before its head message is dead-lettered.
	RetryBudget time.Duration
	// MaxAge, if positive, dead-letters a message whose published_at is
	// older, instead of pushing it to browsers as new.
	MaxAge   time.Duration
	QueueLen int // jobs buffered per lane; ≥ prefetch so Submit never blocks
	// Seen, if set, records every message Nginx takes, and a redelivered
	// message found there is settled Accepted without a publish.
	Seen *Seen
}

// refusalGrace is how long a 4xx that looks like the message's fault is
// retried before the message is dead-lettered: long enough for the same
// answer to show up on other channels when the publisher itself is wrong.
const refusalGrace = 5 * time.Second

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
	opts   Options
	lanes  []*lane
	stop   context.CancelFunc
	wg     sync.WaitGroup
	health *health
	// untested: jobs were adopted and the publisher has not answered
	// yet; adoptedLeft counts those jobs not yet settled.
	untested    atomic.Bool
	adoptedLeft atomic.Int64
}

// NewPool starts the lanes; they run until Stop.
func NewPool(opts Options, out chan<- Settlement, m Metrics, log *slog.Logger) *Pool {
	ctx, cancel := context.WithCancel(context.Background())
	p := &Pool{opts: opts, stop: cancel, health: newHealth()}
	p.lanes = make([]*lane, opts.Lanes)
	for i := range p.lanes {
		p.lanes[i] = newLane(i, p, out, m, log)
	}
	p.wg.Add(len(p.lanes))
	for _, l := range p.lanes {
		go func() {
			defer p.wg.Done()
			l.run(ctx)
		}()
	}
	return p
}

// Submit queues j on its channel's lane.
func (p *Pool) Submit(j Job) {
	p.lanes[shard.FNV1a32(j.Msg.Channel)%uint32(len(p.lanes))].in <- j
}

// Adopt submits the jobs another pool handed over (Handover). Until its
// publisher first answers, this pool counts as unreachable: it has not yet
// shown that it works, and /readyz must not say ready right after a
// [push] reload while the old messages wait on a publisher that says
// nothing. It stops counting so once the adopted jobs are all settled.
func (p *Pool) Adopt(jobs []Job) {
	if len(jobs) == 0 {
		return
	}
	p.adoptedLeft.Store(int64(len(jobs)))
	p.untested.Store(true)
	p.health.unhealthy.Add(1)
	for _, j := range jobs {
		j.adopted = true
		p.Submit(j)
	}
}

// tested ends the untested spell Adopt began. Every answered batch calls
// it: the plain load keeps lanes from contending for the cache line.
func (p *Pool) tested() {
	if p.untested.Load() && p.untested.CompareAndSwap(true, false) {
		p.health.unhealthy.Add(-1)
	}
}

// Reachable reports whether every lane's last attempt got an HTTP answer.
func (p *Pool) Reachable() bool { return p.health.unhealthy.Load() == 0 }

// State judges the publisher now.
func (p *Pool) State() State { return p.health.judge(time.Now()).state }

// Judge judges the publisher now, and says in words what a fault most
// likely means.
func (p *Pool) Judge() (State, string) {
	f := p.health.judge(time.Now())
	return f.state, f.advice()
}

// Stop ends every lane and closes its connection. Jobs not yet settled are
// dropped: the caller must not ack them.
func (p *Pool) Stop() {
	p.stop()
	p.wg.Wait()
}

// Handover stops the pool and returns what it had not finished: the
// settlements its lanes made while stopping, which nobody read, and the
// jobs without an answer, oldest first per channel. The publisher that
// replaces this one takes them over, so that a new [push] config hands
// back nothing to the broker: each return would spend one of a quorum
// queue's delivery_limit, and a publisher that is being fixed holds up to
// a prefetch of messages.
func (p *Pool) Handover() (settled []Settlement, unsent []Job) {
	p.Stop()
	for _, l := range p.lanes {
		settled = append(settled, l.unread...)
		// Every channel lives in one lane, where its FIFO is older than
		// what is still in the lane's inbox.
		for _, q := range l.queues {
			unsent = append(unsent, q.jobs[q.head:]...)
		}
		for len(l.in) > 0 {
			unsent = append(unsent, <-l.in)
		}
	}
	return settled, unsent
}
