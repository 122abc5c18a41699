package publish

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"strconv"
	"time"

	"github.com/valyala/fasthttp"
)

// lane publishes its jobs in order over one pipelined keep-alive connection.
//
// After any non-2xx answer the connection is closed and everything written
// behind that request is sent again on a new one: Push Stream's early
// rejections leave the request body unread, so the next request on the
// connection is parsed from garbage and lost. Nginx answers pipelined
// requests strictly in order and stops after a response that closes the
// connection (413, 500), so re-sending the tail keeps per-channel order.
type lane struct {
	id   int
	pool *Pool
	in   chan Job
	out  chan<- Settlement
	m    Metrics
	log  *slog.Logger

	conn net.Conn
	br   *bufio.Reader
	bw   *bufio.Writer
	req  fasthttp.Request
	resp fasthttp.Response
	uri  []byte
	// reachable is what this lane last told pool.healthy.
	reachable bool
	// done is the pool's stop signal: a lane never blocks on out after it.
	done <-chan struct{}
}

func newLane(id int, p *Pool, out chan<- Settlement, m Metrics, log *slog.Logger) *lane {
	l := &lane{
		id:        id,
		pool:      p,
		in:        make(chan Job, p.opts.QueueLen),
		out:       out,
		m:         m,
		log:       log.With("lane", id),
		uri:       make([]byte, 0, 256),
		reachable: true,
	}
	l.req.Header.DisableNormalizing()
	l.req.Header.SetMethod(fasthttp.MethodPost)
	l.req.Header.SetHost(p.opts.Target.host)
	return l
}

func (l *lane) run(ctx context.Context) {
	defer l.closeConn()
	l.done = ctx.Done()
	depth := l.pool.opts.Pipeline
	batch := make([]Job, 0, depth)
	var failures int
	for {
		if len(batch) == 0 {
			select {
			case j := <-l.in:
				batch = append(batch, j)
			case <-ctx.Done():
				return
			}
		}
	fill:
		for len(batch) < depth {
			select {
			case j := <-l.in:
				batch = append(batch, j)
			default:
				break fill
			}
		}
		batch = l.settleStale(batch)
		if len(batch) == 0 {
			continue
		}

		done, err := l.send(batch)
		batch = batch[:copy(batch, batch[done:])]
		l.setReachable(err == nil || !isUnreachable(err))
		if err == nil {
			failures = 0
			continue
		}
		failures++
		if l.m.Retries != nil {
			l.m.Retries.Inc()
		}
		wait := backoff(failures, l.pool.opts.RetryMax)
		if failures == 1 || failures%20 == 0 { // one line per outage, then a reminder
			l.log.Warn("publish failed, retrying", "err", err, "attempt", failures, "backoff", wait, "pending", len(batch))
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return
		}
	}
}

// settleStale drops, in place, jobs of an AMQP channel that no longer exists.
func (l *lane) settleStale(batch []Job) []Job {
	gen := l.pool.gen.Load()
	kept := batch[:0]
	for _, j := range batch {
		if j.Gen != gen {
			l.emit(Settlement{Job: j, Outcome: Stale})
			continue
		}
		kept = append(kept, j)
	}
	return kept
}

// errStatus is a retryable HTTP answer.
type errStatus int

func (e errStatus) Error() string { return "publisher answered " + strconv.Itoa(int(e)) }

// send writes the batch pipelined and reads the answers in order. It
// returns how many jobs from the front are settled; the rest must be sent
// again, after a backoff when err is not nil.
func (l *lane) send(batch []Job) (settled int, err error) {
	if l.conn == nil {
		if err := l.dial(); err != nil {
			return 0, err
		}
	}
	start := time.Now()
	if err := l.conn.SetDeadline(start.Add(l.pool.opts.Timeout)); err != nil {
		l.closeConn()
		return 0, fmt.Errorf("set deadline: %w", err)
	}
	for i := range batch {
		l.buildRequest(&batch[i])
		if err := l.req.Write(l.bw); err != nil {
			l.closeConn()
			return 0, fmt.Errorf("write request: %w", err)
		}
	}
	if err := l.bw.Flush(); err != nil {
		l.closeConn()
		return 0, fmt.Errorf("write requests: %w", err)
	}
	l.req.SetBodyRaw(nil) // do not pin the last message's body

	dialect := l.pool.opts.Target.Dialect
	for i := range batch {
		l.resp.Reset()
		if err := l.resp.Read(l.br); err != nil {
			l.closeConn()
			return i, fmt.Errorf("read response: %w", err)
		}
		status := l.resp.StatusCode()
		if dialect.accepted(status) {
			l.accepted(&batch[i], start)
			if l.resp.ConnectionClose() {
				// keepalive_requests reached: nothing after this one was
				// read by Nginx. Resend the rest at once on a new connection.
				l.closeConn()
				return i + 1, nil
			}
			continue
		}
		l.closeConn()
		if refused(status) {
			if l.m.Refused != nil {
				l.m.Refused.Inc()
			}
			l.emit(Settlement{Job: batch[i], Outcome: Refused, Status: status})
			return i + 1, nil
		}
		return i, errStatus(status)
	}
	return len(batch), nil
}

// refused reports whether status means the message itself is bad, so that
// retrying it can never succeed. 404 and 405 are not here: they mean the
// publish URL or Nginx config is wrong, and dead-lettering every message
// until an operator notices would lose them all.
func refused(status int) bool {
	return status == 400 || status == 403 || status == 413 || status == 414
}

func (l *lane) accepted(j *Job, start time.Time) {
	now := time.Now()
	if l.m.Published != nil {
		l.m.Published.Inc()
		l.m.Duration.Update(now.Sub(start).Seconds())
		if j.Msg.PublishedAt > 0 {
			l.m.Lag.Update(float64(now.UnixMicro()-j.Msg.PublishedAt) / 1e6)
		}
	}
	l.emit(Settlement{Job: *j, Outcome: Accepted})
}

// emit reports a settlement unless the pool is stopping, when nobody reads
// them any more and the unacked message will be redelivered anyway.
func (l *lane) emit(s Settlement) {
	select {
	case l.out <- s:
	case <-l.done:
	}
}

func (l *lane) buildRequest(j *Job) {
	m := &j.Msg
	h := &l.req.Header
	h.ResetConnectionClose()
	l.uri = l.pool.opts.Target.AppendURI(l.uri[:0], m.Channel)
	h.SetRequestURIBytes(l.uri)
	h.Del("Event-Id")
	h.Del(l.pool.opts.Target.Dialect.typeHeader())
	if m.ID != "" && l.pool.opts.Target.Dialect == PushStream {
		h.Set("Event-Id", m.ID)
	}
	if m.Type != "" {
		h.Set(l.pool.opts.Target.Dialect.typeHeader(), m.Type)
	}
	if m.ContentType != "" {
		h.SetContentType(m.ContentType)
	} else {
		// Nchan stores the type with the message and passes it on: an
		// octet-stream message reaches WebSocket clients as a binary frame,
		// and fasthttp's own default would be a form encoding.
		h.SetContentType("text/plain")
	}
	l.req.SetBodyRaw(m.Body)
}

func (l *lane) dial() error {
	c, err := net.DialTimeout(l.pool.opts.Target.Network, l.pool.opts.Target.Addr, l.pool.opts.Timeout)
	if err != nil {
		return fmt.Errorf("connect publisher: %w", err)
	}
	l.conn = c
	if l.br == nil {
		l.br = bufio.NewReaderSize(c, 16<<10)
		l.bw = bufio.NewWriterSize(c, 64<<10)
	} else {
		l.br.Reset(c)
		l.bw.Reset(c)
	}
	return nil
}

func (l *lane) closeConn() {
	if l.conn != nil {
		l.conn.Close()
		l.conn = nil
	}
}

func (l *lane) setReachable(ok bool) {
	if ok == l.reachable {
		return
	}
	l.reachable = ok
	if ok {
		l.pool.healthy.Add(1)
	} else {
		l.pool.healthy.Add(-1)
	}
}

// isUnreachable tells a dead publisher (refused, timed out) from one that
// answers with an error status.
func isUnreachable(err error) bool {
	var s errStatus
	return !errors.As(err, &s)
}

// backoff is capped exponential with full jitter, so lanes that failed
// together do not retry in lockstep.
func backoff(attempt int, max time.Duration) time.Duration {
	d := 20 * time.Millisecond << min(attempt-1, 16)
	if d > max || d <= 0 {
		d = max
	}
	return d/2 + rand.N(d/2+1)
}
