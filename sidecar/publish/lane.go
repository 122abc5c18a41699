package publish

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/valyala/fasthttp"
)

// lane publishes the channels hashed to it over one pipelined keep-alive
// connection.
//
// Each channel has a FIFO of its own inside the lane, and a batch carries
// at most one request per channel. So a channel that Nginx keeps refusing
// waits alone (its FIFO backs off) while the lane's other channels go on,
// and a retryable answer on a connection that stays open can never reorder
// a channel: nothing of the same channel was pipelined behind it.
//
// After an answer that closes the connection (413, 500) or one of Push
// Stream's early rejections (they leave the request body unread, so the
// next request on the connection is parsed from garbage), the requests
// written behind it were not processed: they are sent again at once. Any
// other answer on an open connection is trusted, so only unanswered
// requests are ever resent.
type lane struct {
	id   int
	pool *Pool
	in   chan Job
	out  chan<- Settlement
	m    Metrics
	log  *slog.Logger

	conn   net.Conn
	reused bool // conn has answered a request: a failure may be an idle close
	br     *bufio.Reader
	bw     *bufio.Writer
	req    fasthttp.Request
	resp   fasthttp.Response
	uri    []byte

	queues  map[string]*chanQueue // channels with jobs
	ready   []*chanQueue          // their heads may be sent now, oldest first
	waiting []*chanQueue          // backing off after a failed answer
	free    []*chanQueue          // empty FIFOs kept for reuse
	batch   []*chanQueue

	failures  int  // consecutive attempts with no HTTP answer
	reachable bool // what this lane last told the pool's health
	// done is the pool's stop signal: a lane never blocks on out after it.
	done <-chan struct{}
	// unread are the settlements made after done, for Handover.
	unread []Settlement
}

// chanQueue is one channel's FIFO and its retry state.
type chanQueue struct {
	channel  string
	jobs     []Job // jobs[head:] are pending, oldest first
	head     int
	attempts int       // failed answers in a row
	since    time.Time // first failed answer of this run; zero when none
	retryAt  time.Time
}

func (q *chanQueue) empty() bool { return q.head == len(q.jobs) }

func (q *chanQueue) pop() {
	q.jobs[q.head] = Job{} // do not pin the delivery's body
	q.head++
	if q.empty() {
		q.jobs, q.head = q.jobs[:0], 0
	}
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
		queues:    map[string]*chanQueue{},
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
	var timer *time.Timer
	for {
		// A stopped pool's jobs are the caller's to hand over or to
		// leave to the broker: publishing them now would only make
		// duplicates, and run past the stop's deadline while a backlog
		// drains.
		if ctx.Err() != nil || !l.take(ctx, &timer) {
			return
		}
		l.promote(time.Now())
		if !l.fillBatch() {
			continue
		}
		err := l.sendBatch()
		if err == nil {
			l.failures = 0
			l.setReachable(true)
			l.pool.tested()
			continue
		}
		l.failures++
		l.setReachable(false)
		if l.m.Retries != nil {
			l.m.Retries.Inc()
		}
		wait := backoff(l.failures, l.pool.opts.RetryMax)
		if l.failures == 1 || l.failures%20 == 0 { // one line per outage, then a reminder
			l.log.Warn("publisher unreachable, retrying", "err", err, "attempt", l.failures,
				"backoff", wait, "channels_waiting", len(l.queues))
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return
		}
	}
}

// take moves submitted jobs into their channels' FIFOs. It blocks only
// when nothing can be sent: until a job arrives or a backoff ends.
func (l *lane) take(ctx context.Context, timer **time.Timer) bool {
	if len(l.ready) == 0 {
		var wake <-chan time.Time
		if len(l.waiting) > 0 {
			d := time.Until(l.earliestRetry())
			if *timer == nil {
				*timer = time.NewTimer(d)
			} else {
				(*timer).Reset(d)
			}
			wake = (*timer).C
		}
		select {
		case j := <-l.in:
			l.enqueue(j)
		case <-wake:
			return true
		case <-ctx.Done():
			return false
		}
		if *timer != nil {
			(*timer).Stop()
		}
	}
	for {
		select {
		case j := <-l.in:
			l.enqueue(j)
		default:
			return true
		}
	}
}

func (l *lane) enqueue(j Job) {
	q := l.queues[j.Msg.Channel]
	if q == nil {
		if n := len(l.free); n > 0 {
			q, l.free = l.free[n-1], l.free[:n-1]
		} else {
			q = &chanQueue{}
		}
		q.channel = j.Msg.Channel
		l.queues[q.channel] = q
		l.ready = append(l.ready, q)
	}
	q.jobs = append(q.jobs, j)
}

func (l *lane) release(q *chanQueue) {
	delete(l.queues, q.channel)
	*q = chanQueue{jobs: q.jobs[:0]}
	l.free = append(l.free, q)
}

func (l *lane) earliestRetry() time.Time {
	t := l.waiting[0].retryAt
	for _, q := range l.waiting[1:] {
		if q.retryAt.Before(t) {
			t = q.retryAt
		}
	}
	return t
}

// promote moves the channels whose backoff has ended to the ready list.
func (l *lane) promote(now time.Time) {
	kept := l.waiting[:0]
	for _, q := range l.waiting {
		if now.Before(q.retryAt) {
			kept = append(kept, q)
		} else {
			l.ready = append(l.ready, q)
		}
	}
	clear(l.waiting[len(kept):])
	l.waiting = kept
}

// fillBatch takes up to Pipeline ready channels, one request each. It
// reports whether there is anything to send.
func (l *lane) fillBatch() bool {
	var tooOld int64 // published_at (µs) before which a message is expired
	if l.pool.opts.MaxAge > 0 {
		tooOld = time.Now().Add(-l.pool.opts.MaxAge).UnixMicro()
	}
	l.batch = l.batch[:0]
	n := 0
	for n < len(l.ready) && len(l.batch) < l.pool.opts.Pipeline {
		q := l.ready[n]
		n++
		if l.skipUnsendable(q, tooOld) {
			l.batch = append(l.batch, q)
		} else {
			l.release(q)
		}
	}
	l.ready = l.ready[:copy(l.ready, l.ready[n:])]
	return len(l.batch) > 0
}

// skipUnsendable settles the heads of q that must not be published:
// redelivered copies of what Nginx took already, and messages older than
// max_age. It reports whether a head is left to send.
//
// The copy of a message the lane still holds from a lost session waits
// behind it in the channel's FIFO, so it is checked only once that one has
// been answered: the guard cannot miss it.
func (l *lane) skipUnsendable(q *chanQueue, tooOld int64) bool {
	seen := l.pool.opts.Seen
	for !q.empty() {
		j := &q.jobs[q.head]
		switch {
		case j.Msg.Redelivered && seen != nil && seen.Has(&j.Msg):
			l.emit(Settlement{Job: *j, Outcome: Accepted, Duplicate: true})
		case j.Msg.PublishedAt > 0 && j.Msg.PublishedAt < tooOld:
			l.emit(Settlement{Job: *j, Outcome: Refused, Reason: ReasonExpired})
		default:
			return true
		}
		q.pop()
	}
	return false
}

// sendBatch publishes the batch's heads. Every channel of the batch ends
// up settled, backing off, or back at the front of the ready list (not
// answered). The error, if any, means the publisher gave no HTTP answer.
func (l *lane) sendBatch() error {
	answered, err := l.send()
	if err != nil && answered == 0 && l.reused && closedByPeer(err) {
		// Nginx closed the idle connection (keepalive_timeout, a reload)
		// as we wrote to it: not an outage. Once, on a new connection.
		l.closeConn()
		answered, err = l.send()
	}
	// Unanswered channels go back first, in their order: they are the
	// oldest ready work.
	l.ready = slices.Insert(l.ready, 0, l.batch[answered:]...)
	return err
}

// closedByPeer reports whether err means the other side closed the
// connection, as opposed to a timeout or a refused dial.
func closedByPeer(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET)
}

// send writes the batch pipelined and reads the answers in order. It
// returns how many requests from the front were answered; each answered
// one has been handled.
func (l *lane) send() (answered int, err error) {
	if l.conn == nil {
		if err := l.dial(); err != nil {
			return 0, err
		}
	}
	timeout := l.pool.opts.Timeout
	start := time.Now()
	if err := l.conn.SetDeadline(start.Add(timeout)); err != nil {
		l.closeConn()
		return 0, fmt.Errorf("set deadline: %w", err)
	}
	for _, q := range l.batch {
		l.buildRequest(&q.jobs[q.head])
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

	last := start // the deadline runs per request: from the previous answer
	for i, q := range l.batch {
		l.resp.Reset()
		if err := l.resp.Read(l.br); err != nil {
			l.closeConn()
			if i > 0 && errors.Is(err, io.EOF) {
				// Closed after answering some (a reload, keepalive_requests
				// without Connection: close): resend the rest at once.
				return i, nil
			}
			return i, fmt.Errorf("read response: %w", err)
		}
		now := time.Now()
		l.reused = true
		keep := l.answer(q, now, start)
		if !keep {
			l.closeConn()
			return i + 1, nil
		}
		if now.Sub(last) > timeout/16 {
			if err := l.conn.SetReadDeadline(now.Add(timeout)); err != nil {
				l.closeConn()
				return i + 1, nil
			}
			last = now
		}
	}
	return len(l.batch), nil
}

// answer handles the response just read for q's head. It reports whether
// the connection may carry on: false when what was written behind this
// request was not (or not reliably) processed.
func (l *lane) answer(q *chanQueue, now, start time.Time) (keep bool) {
	status := l.resp.StatusCode()
	keep = !l.resp.ConnectionClose()
	if l.pool.opts.Target.Dialect.accepted(status) {
		l.accepted(q, now, start)
		return keep
	}
	explain := ""
	if l.pool.opts.Target.Dialect == PushStream {
		// Push Stream's early rejections leave the body unread, and not
		// only those with an explanation header: a 500 for a channel it
		// cannot allocate keeps the connection and parses the body as the
		// next request. No answer after a non-2xx can be trusted.
		keep = false
		explain = string(l.resp.Header.Peek("X-Nginx-PushStream-Explain"))
	}
	h := l.pool.health
	if status == 413 || status == 414 { // the message is too big: its fault
		l.refuse(q, status, "nginx_"+strconv.Itoa(status))
		return keep
	}
	if q.since.IsZero() {
		q.since = now
	}
	switch {
	case status >= 500 || status == 408 || status == 429:
		h.failed(q.channel, status, now)
		if now.Sub(q.since) >= l.pool.opts.RetryBudget && h.works(now) {
			l.refuse(q, status, ReasonBudget)
			return keep
		}
	case strings.HasPrefix(explain, "Number of channels"):
		// Push Stream's channel limit: the publisher is full, the
		// message is fine. It waits, as for any capacity fault.
		h.refusedBy(q.channel, status, now)
	default: // 400, 403, 404, 405, ...: the message's fault or the publisher's
		h.refusedBy(q.channel, status, now)
		grace := min(refusalGrace, l.pool.opts.RetryBudget)
		if now.Sub(q.since) >= grace && h.works(now) && h.refusedAlone(q.channel, now) {
			l.refuse(q, status, "nginx_"+strconv.Itoa(status))
			q.since = time.Time{} // the next message gets its own grace
			return keep
		}
	}
	if l.m.Retries != nil {
		l.m.Retries.Inc()
	}
	q.attempts++
	q.retryAt = now.Add(backoff(q.attempts, l.pool.opts.RetryMax))
	l.waiting = append(l.waiting, q)
	return keep
}

// accepted settles q's head and puts the channel back in line if it has
// more.
func (l *lane) accepted(q *chanQueue, now, start time.Time) {
	j := &q.jobs[q.head]
	if l.m.Published != nil {
		l.m.Published.Inc()
		l.m.Duration.Update(now.Sub(start).Seconds())
		if j.Msg.PublishedAt > 0 {
			l.m.Lag.Update(float64(now.UnixMicro()-j.Msg.PublishedAt) / 1e6)
		}
	}
	l.pool.health.succeeded(q.channel, now)
	if seen := l.pool.opts.Seen; seen != nil {
		seen.Add(&j.Msg)
	}
	l.emit(Settlement{Job: *j, Outcome: Accepted})
	q.attempts, q.since = 0, time.Time{}
	l.next(q)
}

// refuse gives up on q's head: the relay dead-letters it. The channel's
// failure run goes on, so that the next message of a channel refused
// for longer than its budget does not wait a whole budget again.
func (l *lane) refuse(q *chanQueue, status int, reason string) {
	if l.m.Refused != nil {
		l.m.Refused.Inc()
	}
	l.emit(Settlement{Job: q.jobs[q.head], Outcome: Refused, Status: status, Reason: reason})
	q.attempts = 0
	l.next(q)
}

func (l *lane) next(q *chanQueue) {
	q.pop()
	if q.empty() {
		l.release(q)
		return
	}
	l.ready = append(l.ready, q)
}

// emit reports a settlement; once the pool is stopping, when nobody may
// read them any more, it keeps it for Handover.
func (l *lane) emit(s Settlement) {
	if s.Job.adopted && l.pool.adoptedLeft.Add(-1) == 0 {
		l.pool.tested() // e.g. expired: nothing left to show
	}
	select {
	case l.out <- s:
	case <-l.done:
		l.unread = append(l.unread, s)
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
	t := &l.pool.opts.Target
	c, err := net.DialTimeout(t.Network, t.Addr, l.pool.opts.Timeout)
	if err != nil {
		return fmt.Errorf("connect publisher: %w", err)
	}
	l.conn, l.reused = c, false
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
		l.pool.health.unhealthy.Add(-1)
	} else {
		l.pool.health.unhealthy.Add(1)
	}
}

// backoff is capped exponential with full jitter, so channels and lanes
// that failed together do not retry in lockstep.
func backoff(attempt int, max time.Duration) time.Duration {
	d := 20 * time.Millisecond << min(attempt-1, 16)
	if d > max || d <= 0 {
		d = max
	}
	return d/2 + rand.N(d/2+1)
}
