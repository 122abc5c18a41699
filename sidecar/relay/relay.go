// Package relay runs the pipeline of one frontend: consume the host's
// queue, publish each message to the local Nginx in order per channel, and
// ack each message only after Nginx accepted it.
//
// One goroutine, Run's, owns the AMQP session, the ack tracker, the shard
// bindings and the config; the publisher lanes report back to it over one
// channel. Everything that changes relay state goes through that loop, so
// none of it needs a lock.
package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/sidecar/acker"
	"github.com/pushrelay/pushrelay/sidecar/config"
	"github.com/pushrelay/pushrelay/sidecar/consume"
	"github.com/pushrelay/pushrelay/sidecar/message"
	"github.com/pushrelay/pushrelay/sidecar/publish"
	"github.com/pushrelay/pushrelay/sidecar/telemetry"
)

const (
	// ackInterval bounds how long a published message waits for its ack;
	// ackBatch bounds how many wait. Batching keeps acks to a few frames
	// per thousand messages; the interval keeps redeliveries after a
	// crash to a few ms worth.
	ackInterval = 5 * time.Millisecond
	ackBatch    = 256
	// amqpTimeout bounds dial, handshake, channel open and each declare.
	amqpTimeout = 10 * time.Second
	// reconnectMax caps the AMQP reconnect backoff.
	reconnectMax = 30 * time.Second
	// minHealthySession: a session lost sooner counts as a failed connect.
	minHealthySession = 5 * time.Second
)

// errReconnect asks Run for a new AMQP session right away, after a reload
// changed something that a live session cannot.
var errReconnect = errors.New("config change needs a new AMQP session")

// Hooks let other parts of the daemon follow config reloads.
type Hooks struct {
	// OnReload runs in the relay loop after a new config is accepted.
	OnReload func(config.Config)
}

// Relay is one frontend's relay.
type Relay struct {
	log   *slog.Logger
	level *slog.LevelVar
	m     relayMetrics
	hooks Hooks

	settles chan publish.Settlement
	reloads chan config.Config

	// Read by /metrics and /readyz.
	inFlight       atomic.Int64
	unacked        atomic.Int64 // delivered on the current session, not yet acked or rejected
	consuming      atomic.Bool
	shardsOwned    atomic.Int64
	shardsDraining atomic.Int64
	lastReloadOK   atomic.Bool
	lastReloadAt   atomic.Int64
	pool           atomic.Pointer[publish.Pool]

	// Owned by the Run goroutine.
	cfg      config.Config
	gen      uint64
	bound    map[int]bool      // shards bound on the queue: owned + draining
	draining map[int]time.Time // shard → when its binding goes
	warn     *rateLimiter
}

// New prepares a relay for cfg, which must be valid. level is the logger's
// level, changed on reload.
func New(cfg config.Config, log *slog.Logger, level *slog.LevelVar, reg *telemetry.Registry, hooks Hooks) (*Relay, error) {
	r := &Relay{
		log:      log,
		level:    level,
		hooks:    hooks,
		reloads:  make(chan config.Config, 1),
		cfg:      cfg,
		bound:    map[int]bool{},
		draining: map[int]time.Time{},
		warn:     newRateLimiter(time.Second),
	}
	owned, err := ownedShards(cfg)
	if err != nil {
		return nil, err
	}
	for _, s := range owned {
		r.bound[s] = true
	}
	r.shardsOwned.Store(int64(len(owned)))
	r.lastReloadOK.Store(true)
	r.lastReloadAt.Store(time.Now().Unix())
	r.m = newMetrics(reg, r)
	return r, nil
}

func ownedShards(cfg config.Config) ([]int, error) {
	m, err := cfg.ShardMap()
	if err != nil {
		return nil, err
	}
	return m.Owned(cfg.Host), nil
}

func (r *Relay) publisherReachable() bool {
	p := r.pool.Load()
	return p != nil && p.Reachable()
}

// Reload validates the config at path and hands it to the relay loop. An
// invalid config is refused and the running one stays.
func (r *Relay) Reload(path string) error {
	cfg, err := config.Load(path)
	if err != nil {
		r.lastReloadOK.Store(false)
		r.m.reloadsFailed.Inc()
		r.log.Error("config reload refused; keeping the running config", "err", err)
		return err
	}
	r.lastReloadOK.Store(true)
	r.lastReloadAt.Store(time.Now().Unix())
	r.m.reloadsOK.Inc()
	for { // keep only the newest config if the loop has not taken the last one
		select {
		case r.reloads <- cfg:
			return nil
		default:
			select {
			case <-r.reloads:
			default:
			}
		}
	}
}

// Run relays until ctx is cancelled, then stops gracefully: it cancels the
// consumer, lets in-flight publishes finish for up to shutdown_timeout,
// acks them and closes. What is unfinished stays unacked, and the broker
// delivers it again.
func (r *Relay) Run(ctx context.Context) error {
	r.settles = make(chan publish.Settlement, 4*r.cfg.AMQP.Prefetch)
	if err := r.startPool(); err != nil {
		return err
	}
	defer func() { r.pool.Load().Stop() }()

	for failures := 0; ; {
		sess, err := r.open(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			failures++
			wait := jittered(failures, reconnectMax)
			r.log.Warn("AMQP connect failed", "err", err, "attempt", failures, "retry_in", wait)
			if !r.waitApplyingReloads(ctx, wait) {
				return nil
			}
			continue
		}
		if r.gen > 1 {
			r.m.reconnects.Inc()
		}
		r.log.Info("consuming", "queue", r.cfg.AMQP.Queue, "shards", len(r.bound), "gen", r.gen)
		began := time.Now()
		err = r.serve(ctx, sess)
		r.consuming.Store(false)
		sess.Close()
		switch {
		case err == nil:
			return nil
		case errors.Is(err, errReconnect):
			r.log.Info("reconnecting to apply the new config")
			continue
		}
		r.log.Warn("AMQP session lost", "err", err)
		if time.Since(began) >= minHealthySession {
			failures = 0
			continue
		}
		// A session the broker ends at once (a queue deleted under us, a
		// bad binding) must not become a tight reconnect loop: it backs
		// off like a failed connect, growing until a session lasts.
		failures++
		if !r.waitApplyingReloads(ctx, jittered(failures, reconnectMax)) {
			return nil
		}
	}
}

func (r *Relay) open(ctx context.Context) (*consume.Session, error) {
	url, err := r.cfg.AMQPURL()
	if err != nil {
		return nil, err
	}
	r.gen++
	r.pool.Load().SetGen(r.gen)
	a := r.cfg.AMQP
	args := amqp.Table{
		"x-queue-type":           a.QueueType,
		"x-dead-letter-exchange": consume.DeadLetterExchange,
	}
	if a.MessageTTL > 0 {
		args["x-message-ttl"] = a.MessageTTL.D().Milliseconds()
	}
	if a.MaxLength > 0 {
		args["x-max-length"] = int64(a.MaxLength)
		args["x-overflow"] = "drop-head"
	}
	sess, err := consume.Open(ctx, consume.Options{
		URL:        url,
		Exchange:   a.Exchange,
		Queue:      a.Queue,
		QueueArgs:  args,
		DeadMaxLen: a.DeadLetterMaxLength,
		Prefetch:   a.Prefetch,
		Heartbeat:  a.Heartbeat.D(),
		Timeout:    amqpTimeout,
		Consumer:   "pushrelay-" + r.cfg.Host + "-" + strconv.FormatUint(r.gen, 10),
	}, r.cfg.Shards.Count, func(s int) bool { return r.bound[s] })
	if err != nil {
		return nil, fmt.Errorf("%s: %w", config.Redact(url), err)
	}
	r.consuming.Store(true)
	return sess, nil
}

func (r *Relay) startPool() error {
	p := r.cfg.Push
	dialect, err := publish.ParseDialect(p.Dialect)
	if err != nil {
		return err
	}
	target, err := publish.ParseTarget(dialect, p.URL)
	if err != nil {
		return err
	}
	r.pool.Store(publish.NewPool(publish.Options{
		Target:   target,
		Lanes:    p.Connections,
		Pipeline: p.Pipeline,
		Timeout:  p.Timeout.D(),
		RetryMax: p.RetryMax.D(),
		QueueLen: r.cfg.AMQP.Prefetch,
	}, r.settles, r.m.publish, r.log))
	r.pool.Load().SetGen(r.gen)
	return nil
}

// serve runs one AMQP session. It returns nil after a graceful stop, and
// an error when the session is lost or must be replaced.
func (r *Relay) serve(ctx context.Context, sess *consume.Session) error {
	s := &session{Session: sess, tracker: acker.NewTracker(r.cfg.AMQP.Prefetch)}
	ticker := time.NewTicker(ackInterval)
	defer ticker.Stop()

	deliveries := sess.Deliveries
	var (
		// afterQuiesce runs once nothing is in flight; deliveries are
		// paused until then. Reloads that rebuild the publisher or the
		// session use it so that nothing is published twice.
		afterQuiesce func() error
		stopping     bool
		stopTimer    <-chan time.Time
		done         = ctx.Done()
	)
	for {
		if (afterQuiesce != nil || stopping) && r.inFlight.Load() == 0 {
			if err := r.flushAcks(s); err != nil {
				return err
			}
			if stopping {
				r.log.Info("stopped: every in-flight message published and acked")
				return nil
			}
			err := afterQuiesce()
			afterQuiesce = nil
			if err != nil {
				return err
			}
			deliveries = sess.Deliveries
		}

		select {
		case d, ok := <-deliveries:
			if !ok {
				return errors.New("delivery channel closed")
			}
			if err := r.handleDelivery(ctx, s, &d); err != nil {
				return err
			}
		case st := <-r.settles:
			if err := r.handleSettlement(ctx, s, &st); err != nil {
				return err
			}
		case <-ticker.C:
			if err := r.flushAcks(s); err != nil {
				return err
			}
			if err := r.expireDrains(s.Session); err != nil {
				return err
			}
		case next := <-r.reloads:
			action, err := r.apply(s.Session, next)
			if err != nil {
				return err
			}
			if action != nil && !stopping {
				afterQuiesce = action
				deliveries = nil
			}
		case e := <-sess.Closed:
			return fmt.Errorf("closed by broker or network: %w", e)
		case <-done:
			stopping, done, deliveries = true, nil, nil
			stopTimer = time.After(r.cfg.ShutdownTimeout.D())
			if err := sess.Cancel(); err != nil {
				r.log.Warn("cancel consumer", "err", err)
			}
			r.log.Info("stopping: finishing in-flight publishes", "in_flight", r.inFlight.Load(),
				"deadline", r.cfg.ShutdownTimeout.D())
		case <-stopTimer:
			err := r.flushAcks(s)
			r.log.Warn("shutdown deadline reached; unfinished messages stay unacked for redelivery",
				"in_flight", r.inFlight.Load())
			return err
		}
	}
}

// session is an AMQP session with the outcome of its delivery tags.
type session struct {
	*consume.Session
	tracker *acker.Tracker
}

func (r *Relay) handleDelivery(ctx context.Context, s *session, d *amqp.Delivery) error {
	r.m.received.Inc()
	if d.Redelivered {
		r.m.redelivered.Inc()
	}
	if err := s.tracker.Track(d.DeliveryTag); err != nil {
		return err
	}
	msg, reason := message.Parse(d, r.cfg.Push.MaxBody)
	if reason != message.OK {
		p := amqp.Publishing{
			Headers: d.Headers, ContentType: d.ContentType, ContentEncoding: d.ContentEncoding,
			MessageId: d.MessageId, Type: d.Type, Timestamp: d.Timestamp, AppId: d.AppId, Body: d.Body,
		}
		return r.deadLetter(ctx, s, d.DeliveryTag, p, d.RoutingKey, string(reason))
	}
	r.inFlight.Add(1)
	r.pool.Load().Submit(publish.Job{Gen: r.gen, Tag: d.DeliveryTag, Msg: msg})
	return nil
}

func (r *Relay) handleSettlement(ctx context.Context, s *session, st *publish.Settlement) error {
	r.inFlight.Add(-1)
	if st.Job.Gen != r.gen {
		return nil // its channel is gone; the broker redelivers it
	}
	switch st.Outcome {
	case publish.Accepted:
		if err := s.tracker.Settle(st.Job.Tag, acker.Done); err != nil {
			return err
		}
	case publish.Refused:
		m := &st.Job.Msg
		headers := amqp.Table{"channel": m.Channel, "x-pushrelay-status": int32(st.Status)}
		if m.PublishedAt != 0 {
			headers["published_at"] = m.PublishedAt
		}
		p := amqp.Publishing{Headers: headers, ContentType: m.ContentType, MessageId: m.ID, Type: m.Type, Body: m.Body}
		if err := r.deadLetter(ctx, s, st.Job.Tag, p, "", "nginx_"+strconv.Itoa(st.Status)); err != nil {
			return err
		}
	}
	if s.tracker.Settled() >= ackBatch {
		return r.flushAcks(s)
	}
	return nil
}

// deadLetter moves a poison delivery to the dead-letter exchange: a copy
// carrying the reason, then the original is acked with the next batch. If
// the copy cannot be confirmed, the original is rejected instead, and the
// queue's own dead-lettering keeps it (without our reason header).
func (r *Relay) deadLetter(ctx context.Context, s *session, tag uint64, p amqp.Publishing, key, reason string) error {
	if c := r.m.dead[reason]; c != nil {
		c.Inc()
	}
	if r.warn.allow(reason) {
		r.log.Warn("dead-lettering poison message", "reason", reason, "message_id", p.MessageId,
			"suppressed_since_last", r.warn.suppressed(reason))
	}
	err := s.DeadLetter(context.WithoutCancel(ctx), p, key, reason)
	if err == nil {
		return s.tracker.Settle(tag, acker.Done)
	}
	r.log.Warn("dead-letter copy failed; rejecting the original", "reason", reason, "err", err)
	if err := s.Reject(tag); err != nil {
		return fmt.Errorf("reject: %w", err)
	}
	return s.tracker.Settle(tag, acker.Rejected)
}

func (r *Relay) flushAcks(s *session) error {
	if up := s.tracker.Flush(); up != 0 {
		if err := s.Ack(up); err != nil {
			return fmt.Errorf("ack: %w", err)
		}
	}
	r.unacked.Store(int64(s.tracker.Outstanding()))
	return nil
}

// waitApplyingReloads sleeps for d while taking reloads, so that a fixed
// config reaches a relay that cannot connect. It reports false when ctx ends.
func (r *Relay) waitApplyingReloads(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case next := <-r.reloads:
			action, err := r.apply(nil, next)
			if err == nil && action != nil {
				// Nothing in flight can still be acked: its session is gone
				// and the broker will deliver it again. So rebuild now.
				if err = action(); errors.Is(err, errReconnect) {
					err = nil // about to connect anyway
				}
			}
			if err != nil {
				r.log.Warn("applying config while disconnected", "err", err)
			}
		case <-t.C:
			return true
		case <-ctx.Done():
			return false
		}
	}
}

// jittered is capped exponential backoff with jitter, from 100 ms.
func jittered(attempt int, max time.Duration) time.Duration {
	d := 100 * time.Millisecond << min(attempt-1, 20)
	if d > max || d <= 0 {
		d = max
	}
	return d/2 + rand.N(d/2+1)
}
