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
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
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
	// standbyRetry caps the retries of a relay whose queue another relay
	// holds: it takes over within this long once that one goes away.
	standbyRetry = 5 * time.Second
	// minHealthySession: a session lost sooner counts as a failed connect.
	minHealthySession = 5 * time.Second
	// queueCheck: how often a session checks that its queue still exists,
	// against a broker that deleted it without a basic.cancel.
	queueCheck = 5 * time.Second
	// quorumAckGrace: how long a session on a quorum queue waits between
	// its last ack and a deliberate close.
	quorumAckGrace = 500 * time.Millisecond
	// pingEvery and hangAfter: the session asks its node a local question
	// every pingEvery, and drops a node that takes hangAfter to answer
	// (consume/ping.go). A loaded node answers in milliseconds; the
	// heartbeat (amqp.heartbeat) would take two to three intervals.
	pingEvery = time.Second
	hangAfter = 3 * time.Second
	// standbyLog: a session that is not the queue's active consumer this
	// long after it began logs why (its probe takes milliseconds).
	standbyLog = 2 * time.Second
)

// errReconnect asks Run for a new AMQP session right away, after a reload
// changed something that a live session cannot.
var errReconnect = errors.New("config change needs a new AMQP session")

// errCancelled: the broker cancelled the consumer (the queue was deleted, or
// the node holding it went away). A new session redeclares the queue and
// binds it again, on whichever node answers.
var errCancelled = errors.New("the broker cancelled the consumer")

// errQueueGone: the queue was deleted and the broker said nothing (see
// consume.Options.QueueCheck). The same cure as errCancelled.
var errQueueGone = errors.New("the host queue is gone, and the broker sent no basic.cancel")

// errNodeHung: the session's node stopped answering (consume/ping.go).
var errNodeHung = errors.New("the broker node stopped answering")

// Hooks let other parts of the daemon follow config reloads.
type Hooks struct {
	// OnReload runs in the relay loop after a new config is accepted.
	OnReload func(prev, next config.Config)
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
	inFlight      atomic.Int64
	oldestPending atomic.Int64           // unix ns the oldest unsettled delivery arrived; 0 when none
	unapplied     atomic.Pointer[string] // why the desired config is not yet in force; nil when it is
	connectErr    atomic.Pointer[string] // why the last connect failed, for /readyz
	// dialled is the broker URL the last connect used: amqp.url_file or
	// the environment may say something else by now (a new password).
	dialled atomic.Pointer[string]
	// nodesFailing counts the configured broker nodes the last check
	// could not open a connection to.
	nodesFailing atomic.Int64
	// queueMismatch: the live host queue's arguments differ from the config.
	queueMismatch atomic.Bool
	unacked       atomic.Int64 // delivered on the current session, not yet acked or rejected
	deadBlocked   atomic.Bool  // the broker blocks the dead-letter connection
	consuming     atomic.Bool
	// standby: the session consumes, but on a single-active-consumer
	// queue whose active consumer is another (consume.Session.Standby).
	standby        atomic.Bool
	shardsOwned    atomic.Int64
	shardsDraining atomic.Int64
	lastReloadOK   atomic.Bool
	lastReloadAt   atomic.Int64
	accepted       atomic.Pointer[config.Config] // the last valid config: the desired state
	pool           atomic.Pointer[publish.Pool]
	// seen remembers what Nginx took, across sessions and publishers; it
	// is sized for seenPrefetch.
	seen         *publish.Seen
	seenPrefetch int

	// Owned by the Run goroutine.
	cfg       config.Config
	gen       uint64
	bound     map[int]bool      // shards bound on the queue: owned + draining
	draining  map[int]time.Time // shard → when its binding goes
	statePath string            // the drain state file; "" keeps none
	state     *stateWriter      // writes it, while Run runs
	// persistErr: why the drain state is not saved; nil when it is.
	persistErr atomic.Pointer[string]
	warn       *rateLimiter
	now        int64 // unix ns, read at every tick: a delivery's arrival, to the tick
	pubState   publish.State
	// pending is the work a reload left to do once nothing is in flight
	// (a publisher rebuild, a reconnect). It outlives a session: a drop
	// before it ran must not lose it; it is then run with a nil session.
	pending func(s *session) error
	node    string // the broker node the session is on, redacted, for the log
	// sessionURL is the URL the session dialled: a reload that keeps it in
	// the node list needs no new session.
	sessionURL string
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
	if cfg.StateDir != "" {
		r.statePath = filepath.Join(cfg.StateDir, "drains.json")
		r.restoreDrains(owned)
	}
	r.shardsOwned.Store(int64(len(owned)))
	r.accepted.Store(&cfg)
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
	if err == nil {
		err = r.checkReload(*r.accepted.Load(), cfg)
	}
	if err != nil {
		// The reason first: whoever watches the metrics then finds it.
		r.log.Error("config reload refused; keeping the running config", "err", err)
		r.lastReloadOK.Store(false)
		r.m.reloadsFailed.Inc()
		return err
	}
	r.accepted.Store(&cfg)
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

// checkReload refuses what a live relay cannot apply, before anything is
// dropped: queue arguments RabbitMQ cannot change in place, and a broker
// URL that does not work (a typo must not end the working session).
func (r *Relay) checkReload(prev, next config.Config) error {
	p, n := prev.AMQP, next.AMQP
	if p.Queue != n.Queue {
		// Nothing would unbind the old queue: still bound to this host's
		// shards, it would keep a copy of every message, unconsumed.
		return fmt.Errorf("host / amqp.queue: this relay's queue %s cannot change on reload: restart it with the new name, "+
			"then delete %s, whose bindings would keep copying every message into it", p.Queue, p.Queue)
	}
	// When the live queue already differs from the config (a restart with
	// other arguments), any value may be tried: putting the old one back
	// is how an operator gets out.
	if !r.queueMismatch.Load() {
		var errs []error
		for _, c := range []struct {
			key, arg string
			changed  bool
		}{
			{"queue_type", "x-queue-type", p.QueueType != n.QueueType},
			{"message_ttl", "x-message-ttl", p.MessageTTL != n.MessageTTL},
			{"max_length", "x-max-length", p.MaxLength != n.MaxLength},
			{"delivery_limit", "x-delivery-limit", p.DeliveryLimit != n.DeliveryLimit},
		} {
			if c.changed {
				errs = append(errs, fmt.Errorf("amqp.%s: %s cannot change on the live queue %s: name a new amqp.queue "+
					"(and delete the old one), or use a policy (it can lower x-message-ttl and x-max-length, not raise them)",
					c.key, c.arg, n.Queue))
			}
		}
		if err := errors.Join(errs...); err != nil {
			return err
		}
	}
	if p.DeadLetterMaxLength != n.DeadLetterMaxLength {
		return fmt.Errorf("amqp.dead_letter_max_length: %s is shared by every frontend and keeps the length it was created with: use a policy",
			consume.DeadLetterQueue)
	}
	prevURLs, _ := prev.AMQPURLs()
	prevList := strings.Join(prevURLs, "\n")
	if d := r.dialled.Load(); d != nil {
		prevList = *d
	}
	nextURLs, err := next.AMQPURLs()
	if err != nil {
		return err
	}
	if strings.Join(nextURLs, "\n") != prevList {
		failed := tryNodes(context.Background(), nextURLs)
		var errs []error
		for node, err := range failed {
			errs = append(errs, fmt.Errorf("%s: %w", node, err))
		}
		if len(failed) == len(nextURLs) {
			return fmt.Errorf("no node of the new AMQP URLs answers, so the current ones stay: %w", errors.Join(errs...))
		}
		if len(errs) > 0 { // one node that answers is enough
			r.log.Warn("some nodes of the new AMQP URLs fail; the relay uses the others", "err", errors.Join(errs...))
		}
	}
	return nil
}

// Run relays until ctx is cancelled, then stops gracefully: it stops
// taking deliveries (on a classic queue by cancelling the consumer; see
// serve for why not on a quorum queue), lets in-flight publishes finish for
// up to shutdown_timeout, acks them and closes. What is unfinished stays
// unacked, and the broker delivers it again.
func (r *Relay) Run(ctx context.Context) error {
	r.settles = make(chan publish.Settlement, 4*r.cfg.AMQP.Prefetch)
	if r.statePath != "" {
		r.state = newStateWriter(r, r.statePath, r.cfg.AMQP.Queue)
		go r.state.run()
		defer r.state.close()
	}
	if err := r.startPool(); err != nil {
		return err
	}
	defer func() { r.pool.Load().Stop() }()
	var nodes sync.WaitGroup
	defer nodes.Wait()
	nodes.Add(1)
	go func() {
		defer nodes.Done()
		r.watchNodes(ctx)
	}()

	for failures := 0; ; {
		sess, err := r.open(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			failures++
			wait := jittered(failures, reconnectMax)
			if errors.Is(err, consume.ErrQueueTaken) {
				wait = jittered(failures, standbyRetry)
			}
			why := err.Error()
			r.connectErr.Store(&why)
			// A classic queue refuses a second exclusive consumer: this
			// relay stands by as a waiting one on a quorum queue does.
			r.standby.Store(errors.Is(err, consume.ErrQueueTaken))
			if errors.Is(err, consume.ErrQueueTaken) {
				if failures == 1 || failures%60 == 0 { // once, then every few minutes
					r.log.Error("not consuming: another relay holds this host's queue; standing by", "err", err, "retry_in", wait)
				}
			} else {
				r.log.Warn("AMQP connect failed", "err", err, "attempt", failures, "retry_in", wait)
			}
			if !r.waitApplyingReloads(ctx, wait) {
				return nil
			}
			continue
		}
		r.connectErr.Store(nil)
		if r.gen > 1 {
			r.m.reconnects.Inc()
		}
		r.queueMismatch.Store(sess.QueueMismatch)
		switch {
		case len(sess.Mismatches) > 0:
			for _, m := range sess.Mismatches {
				r.log.Warn("queue arguments differ from the config", "detail", m)
			}
			r.setUnapplied(strings.Join(sess.Mismatches, "; "))
		case r.pending == nil:
			// A fresh session binds every desired shard and carries the
			// desired AMQP settings: nothing is left to apply.
			r.setUnapplied("")
		}
		r.log.Info("consuming", "queue", r.cfg.AMQP.Queue, "node", r.node, "shards", len(r.bound), "gen", r.gen,
			"dial", sess.Setup.Dial.Round(time.Millisecond), "declare", sess.Setup.Declare.Round(time.Millisecond),
			"consume", sess.Setup.Consume.Round(time.Millisecond))
		began := time.Now()
		err = r.serve(ctx, sess)
		r.consuming.Store(false)
		if (err == nil || errors.Is(err, errReconnect)) && r.quorum(sess) {
			// The channel of a quorum queue (3.10) holds back acks while
			// 32 of its commands are unapplied (rabbit_fifo_client's
			// soft limit) and drops them if it closes first: the queue
			// then delivers published messages again. Measured: 800 to
			// 1,500 duplicates in six stops mid-drain without this wait,
			// none with 300 ms. No AMQP reply says when they have gone.
			time.Sleep(quorumAckGrace)
		}
		sess.Close()
		if err != nil && r.pending != nil {
			// The session is gone, so nothing in flight can be acked any
			// more: the broker delivers it again. Rebuild now.
			r.runPending()
		}
		switch {
		case err == nil:
			return nil
		case errors.Is(err, errReconnect):
			r.log.Info("reconnecting to apply the new config")
			continue
		case (errors.Is(err, errCancelled) || errors.Is(err, errQueueGone)) && time.Since(began) >= minHealthySession:
			r.log.Warn(err.Error()+"; redeclaring and consuming again", "node", r.node)
			failures = 0
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
	urls, err := r.cfg.AMQPURLs()
	if err != nil {
		return nil, err
	}
	// The nodes that last worked come after the configured ones: a new
	// password in url_file that a reload refused must not end the relay at
	// the next broker blip.
	var fallback []string
	if d := r.dialled.Load(); d != nil {
		for _, u := range strings.Split(*d, "\n") {
			if !slices.Contains(urls, u) {
				fallback = append(fallback, u)
			}
		}
	}
	r.gen++
	a := r.cfg.AMQP
	o := consume.Options{
		Exchange:   a.Exchange,
		Queue:      a.Queue,
		QueueArgs:  queueArgs(a),
		DeadMaxLen: a.DeadLetterMaxLength,
		// A quorum host queue means a cluster: its dead letters need a
		// quorum queue too, or one node's loss blocks every session.
		DeadQueueType: a.QueueType,
		Prefetch:      a.Prefetch,
		Heartbeat:     a.Heartbeat.D(),
		Timeout:       amqpTimeout,
		Consumer:      "pushrelay-" + r.cfg.Host + "-" + strconv.FormatUint(r.gen, 10),
		QueueCheck:    queueCheck,
		SingleActive:  a.QueueType == "quorum",
		PingEvery:     pingEvery,
		HangAfter:     hangAfter,
	}
	// Every node in a random order, so that five relays whose node died
	// spread over the survivors; a rotation from a random start would send
	// the dead node's successor twice its share.
	// The node of the session just lost goes last: if it hangs, each try
	// of it costs the whole dial timeout before the next node.
	order := make([]string, 0, len(urls)+len(fallback))
	for _, i := range rand.Perm(len(urls)) {
		order = append(order, urls[i])
	}
	if i := slices.Index(order, r.sessionURL); i >= 0 && len(order) > 1 {
		order = append(slices.Delete(order, i, i+1), r.sessionURL)
	}
	var errs []error
	for i, url := range append(order, fallback...) {
		o.URL = url
		sess, err := consume.Open(ctx, o, r.cfg.Shards.Count, func(s int) bool { return r.bound[s] })
		if err == nil {
			if len(errs) > 0 {
				r.log.Warn("AMQP nodes failed before one answered", "err", errors.Join(errs...), "node", config.Redact(url))
			}
			r.sessionURL = url
			if i >= len(order) {
				r.log.Warn("the configured AMQP URLs fail; connected with the ones that worked before", "node", config.Redact(url))
			} else {
				joined := strings.Join(urls, "\n")
				r.dialled.Store(&joined)
			}
			r.node = config.Redact(o.URL)
			r.consuming.Store(true)
			return sess, nil
		}
		err = fmt.Errorf("%s: %w", config.Redact(o.URL), err)
		if errors.Is(err, consume.ErrQueueTaken) || ctx.Err() != nil {
			return nil, err // not the node's fault: another node would say the same
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}

// queueArgs are the host queue's arguments. A quorum queue drops the oldest
// message when full, as a classic one does: for a realtime feed the newest
// comments matter most, and producers are never refused. That makes its
// dead-lettering at-most-once (at-least-once needs x-overflow
// reject-publish, which would push a full queue back onto the web tier).
func queueArgs(a config.AMQP) amqp.Table {
	args := amqp.Table{
		"x-queue-type":           a.QueueType,
		"x-dead-letter-exchange": consume.DeadLetterExchange,
	}
	if a.QueueType == "quorum" {
		// One consumer at a time, on a queue type that does not enforce
		// exclusive consumers; and order through a broker fault: a new
		// consumer gets nothing until the old one's messages are back,
		// and then those first (consume.Options.SingleActive).
		args["x-single-active-consumer"] = true
	}
	if a.MessageTTL > 0 {
		args["x-message-ttl"] = a.MessageTTL.D().Milliseconds()
	}
	if a.MaxLength > 0 {
		args["x-max-length"] = int64(a.MaxLength)
		args["x-overflow"] = "drop-head"
	}
	if a.DeliveryLimit > 0 {
		// Past it the queue dead-letters the message itself, with
		// x-death reason delivery_limit: a relay that crash-loops on a
		// message (or is SIGKILLed with it in flight) spends it.
		args["x-delivery-limit"] = int64(a.DeliveryLimit)
	}
	return args
}

// seenFor returns the memory of what Nginx took, grown when the prefetch,
// which bounds what can come back, has grown; nil if off.
func (r *Relay) seenFor(on bool, prefetch int) *publish.Seen {
	if !on {
		return nil
	}
	switch {
	case r.seen == nil:
		r.seen, r.seenPrefetch = publish.NewSeen(prefetch), prefetch
	case prefetch > r.seenPrefetch:
		r.seen, r.seenPrefetch = r.seen.Grow(prefetch), prefetch
	}
	return r.seen
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
		Target:      target,
		Lanes:       p.Connections,
		Pipeline:    p.Pipeline,
		Timeout:     p.Timeout.D(),
		RetryMax:    p.RetryMax.D(),
		RetryBudget: p.RetryBudget.D(),
		MaxAge:      p.MaxAge.D(),
		QueueLen:    r.cfg.AMQP.Prefetch,
		Seen:        r.seenFor(p.Dedupe, r.cfg.AMQP.Prefetch),
	}, r.settles, r.m.publish, r.log))
	return nil
}

// serve runs one AMQP session. It returns nil after a graceful stop, and
// an error when the session is lost or must be replaced.
func (r *Relay) serve(ctx context.Context, sess *consume.Session) error {
	s := &session{Session: sess, tracker: acker.NewTracker(r.cfg.AMQP.Prefetch), began: time.Now()}
	r.now = time.Now().UnixNano()
	ticker := time.NewTicker(ackInterval)
	defer ticker.Stop()
	defer r.oldestPending.Store(0)
	defer r.standby.Store(false)
	if err := r.watchStandby(s); err != nil {
		return err
	}

	deliveries := sess.Deliveries
	// amqp091-go also closes the cancel channel when the consuming channel
	// closes: that is a lost session (Closed says why), not a cancel.
	cancelled := sess.Cancelled
	var (
		// r.pending runs once nothing is in flight; deliveries are
		// paused until then, or until quiesceTimer: a publisher that
		// takes nothing must not keep its own fix from applying.
		quiesceTimer <-chan time.Time
		stopping     bool
		stopTimer    <-chan time.Time
		done         = ctx.Done()
	)
	runAction := func() error {
		if err := r.flushAcks(s, false); err != nil {
			return err
		}
		err := r.pending(s)
		r.pending, quiesceTimer = nil, nil
		deliveries = sess.Deliveries
		return err
	}
	for {
		if (r.pending != nil || (stopping && deliveries == nil)) && r.inFlight.Load() == 0 && s.deadPending == 0 {
			if stopping {
				if err := r.flushAcks(s, false); err != nil {
					return err
				}
				r.log.Info("stopped: every in-flight message published and acked")
				return nil
			}
			if err := runAction(); err != nil {
				return err
			}
		}

		select {
		case d, ok := <-deliveries:
			if !ok {
				if stopping { // the cancel is done: nothing more will come
					deliveries = nil
					continue
				}
				return errors.New("delivery channel closed")
			}
			if err := r.handleDelivery(s, &d); err != nil {
				return err
			}
		case st := <-r.settles:
			if err := r.handleSettlement(s, &st); err != nil {
				return err
			}
		case c := <-sess.DeadLettered:
			if err := r.handleCopy(s, c); err != nil {
				return err
			}
		case now := <-ticker.C:
			r.now = now.UnixNano()
			if err := r.tick(s); err != nil {
				return err
			}
		case next := <-r.reloads:
			hadPending := r.pending != nil
			err := r.apply(s.Session, next)
			if r.pending != nil && !stopping {
				if !hadPending {
					quiesceTimer = time.After(r.cfg.ShutdownTimeout.D())
				}
				deliveries = nil
			}
			if err != nil {
				return err // the pending work outlives the session
			}
		case <-quiesceTimer:
			r.log.Warn("config change applied with messages still in flight; the new publisher takes them over",
				"in_flight", r.inFlight.Load(), "waited", r.cfg.ShutdownTimeout.D())
			if err := runAction(); err != nil {
				return err
			}
		case e := <-sess.Closed:
			return fmt.Errorf("closed by broker or network: %w", e)
		case _, ok := <-cancelled:
			if !ok {
				cancelled = nil
				continue
			}
			return errCancelled
		case <-sess.Gone:
			return errQueueGone
		case <-sess.Hung:
			return errNodeHung
		case <-done:
			stopping, done = true, nil
			quiesceTimer = nil // a rebuild waits for the next start
			stopTimer = time.After(r.cfg.ShutdownTimeout.D())
			deliveries = nil
			if !r.quorum(sess) {
				// What the broker delivered before the cancel is published
				// too, until amqp091-go closes the channel. A quorum queue
				// (3.10) is not cancelled: its channel hands back what is
				// on the way to a cancelled consumer, which the next
				// session then gets out of order. It keeps delivering, and
				// what is unread goes back, in order, at the close.
				deliveries = sess.Deliveries
				if err := sess.Cancel(); err != nil {
					r.log.Warn("cancel consumer", "err", err)
					deliveries = nil
				}
			}
			r.log.Info("stopping: finishing in-flight publishes", "in_flight", r.inFlight.Load(),
				"dead_letters_unconfirmed", s.deadPending, "deadline", r.cfg.ShutdownTimeout.D())
		case <-stopTimer:
			err := r.flushAcks(s, true)
			r.log.Warn("shutdown deadline reached; unfinished messages stay unacked for redelivery",
				"in_flight", r.inFlight.Load(), "dead_letters_unconfirmed", s.deadPending)
			return err
		}
	}
}

// quorum says whether the session's queue may be a quorum queue: the
// config says so, or the live queue's arguments differ from the config's.
func (r *Relay) quorum(sess *consume.Session) bool {
	return r.cfg.AMQP.QueueType == "quorum" || sess.QueueMismatch
}

// chain runs the actions of two reloads in order, so that the second never
// cancels the first one's work. A reconnect either asks for comes last.
func chain(first, second func(s *session) error) func(s *session) error {
	return func(s *session) error {
		err := first(s)
		if err != nil && !errors.Is(err, errReconnect) {
			return err
		}
		if err2 := second(s); err2 != nil {
			return err2
		}
		return err
	}
}

// session is an AMQP session with the outcome of its delivery tags.
type session struct {
	*consume.Session
	tracker *acker.Tracker
	// deadPending counts dead-letter copies not yet confirmed or failed.
	deadPending int
	// lastHead is the tracker's head at the previous tick: a head that
	// has not moved since is a stalled message, and the settled tags
	// above it are acked one by one.
	lastHead uint64
	began    time.Time
	// standbyLogged: the session said it stands by (watchStandby).
	standbyLogged bool
}

// tick runs every ackInterval: acks, drains, and the figures that change
// with time.
func (r *Relay) tick(s *session) error {
	stalled := s.tracker.Head() == s.lastHead
	if err := r.flushAcks(s, stalled); err != nil {
		return err
	}
	s.lastHead = s.tracker.Head()
	if at, ok := s.tracker.Oldest(); ok {
		r.oldestPending.Store(at)
	} else {
		r.oldestPending.Store(0)
	}
	r.watchPublisher()
	if err := r.watchStandby(s); err != nil {
		return err
	}
	if blocked := s.DeadLetterBlocked(); blocked != r.deadBlocked.Swap(blocked) {
		if blocked {
			r.log.Warn("the broker blocks the dead-letter connection (resource alarm): copies wait, consuming goes on",
				"dead_letters_unconfirmed", s.deadPending)
		} else {
			r.log.Info("the broker unblocked the dead-letter connection")
		}
	}
	return r.expireDrains(s.Session)
}

// watchStandby follows whether the session is the queue's active consumer,
// says so when that changes, and binds the desired shards once it is.
func (r *Relay) watchStandby(s *session) error {
	standby := s.Standby()
	if !standby && !s.Bound() {
		if err := s.BindAll(); err != nil {
			return fmt.Errorf("bind shards: %w", err)
		}
	}
	r.standby.Store(standby)
	// Every session starts so until its first probe or delivery comes,
	// within milliseconds when it is the active consumer: say it only
	// when it lasts.
	switch {
	case standby && !s.standbyLogged && time.Since(s.began) >= standbyLog:
		s.standbyLogged = true
		r.log.Error("not consuming: another consumer is active on this host's queue; standing by", "queue", r.cfg.AMQP.Queue,
			"hint", "another relay with the same host, or this relay's own earlier session on a broker node that hangs")
	case !standby && s.standbyLogged:
		s.standbyLogged = false
		r.log.Info("the active consumer of this host's queue now", "queue", r.cfg.AMQP.Queue)
	}
	return nil
}

// watchPublisher logs the publisher's state when it changes: once, not
// per message, so that an outage is one line in the journal.
func (r *Relay) watchPublisher() {
	state, advice := r.pool.Load().Judge()
	if state == r.pubState {
		return
	}
	if state == publish.OK {
		r.log.Info("publisher works again", "was", r.pubState.String())
	} else {
		r.log.Warn("publisher fault: messages wait unacked, nothing is dead-lettered",
			"state", state.String(), "hint", advice)
	}
	r.pubState = state
}

func (r *Relay) handleDelivery(s *session, d *amqp.Delivery) error {
	r.m.received.Inc()
	if d.Redelivered {
		r.m.redelivered.Inc()
	}
	if err := s.tracker.Track(d.DeliveryTag, r.now); err != nil {
		return err
	}
	s.Delivered()
	if _, ok := d.Headers[consume.ProbeHeader]; ok {
		return s.tracker.Settle(d.DeliveryTag, acker.Done) // it only tells this relay it is active
	}
	msg, reason := message.Parse(d, r.cfg.Push.MaxBody)
	if reason == message.OK && len(msg.Body) == 0 && r.cfg.Push.Dialect == config.DialectPushStream {
		// Push Stream answers 400 to every empty publish; alone on a
		// quiet host that would look like a misconfigured publisher.
		reason = message.EmptyBody
	}
	msg.Redelivered = d.Redelivered
	if reason == message.OK && d.Redelivered && r.seen != nil && r.cfg.Push.Dedupe && r.seen.Has(&msg) {
		// Nginx took it before the session that held it was lost. Skipped
		// now, not only at its turn in the lane: a channel that Nginx
		// refuses for a while would keep it queued while other channels'
		// messages push it out of the memory.
		r.m.duplicates.Inc()
		return s.tracker.Settle(d.DeliveryTag, acker.Done)
	}
	if reason != message.OK {
		p := amqp.Publishing{
			Headers: d.Headers, ContentType: d.ContentType, ContentEncoding: d.ContentEncoding,
			MessageId: d.MessageId, Type: d.Type, Timestamp: d.Timestamp, AppId: d.AppId, Body: d.Body,
		}
		return r.deadLetter(s, d.DeliveryTag, p, d.RoutingKey, string(reason))
	}
	r.inFlight.Add(1)
	r.pool.Load().Submit(publish.Job{Gen: r.gen, Tag: d.DeliveryTag, Msg: msg})
	return nil
}

func (r *Relay) handleSettlement(s *session, st *publish.Settlement) error {
	r.inFlight.Add(-1)
	if st.Duplicate {
		r.m.duplicates.Inc()
	}
	if s == nil || st.Job.Gen != r.gen {
		// Its channel is gone, and the broker delivers it again: a copy
		// of a message Nginx took is then skipped, one it refused is
		// refused again and dead-lettered on the live session.
		return nil
	}
	switch st.Outcome {
	case publish.Accepted:
		if err := s.tracker.Settle(st.Job.Tag, acker.Done); err != nil {
			return err
		}
	case publish.Refused:
		m := &st.Job.Msg
		headers := make(amqp.Table, len(m.Headers)+1)
		for k, v := range m.Headers {
			headers[k] = v
		}
		if st.Status != 0 {
			headers["x-pushrelay-status"] = int32(st.Status)
		}
		p := amqp.Publishing{Headers: headers, ContentType: m.ContentType, ContentEncoding: m.ContentEncoding,
			MessageId: m.ID, Type: m.Type, Timestamp: m.Timestamp, AppId: m.AppID, Body: m.Body}
		if err := r.deadLetter(s, st.Job.Tag, p, "", st.Reason); err != nil {
			return err
		}
	}
	if s.tracker.Settled() >= ackBatch {
		return r.flushAcks(s, false)
	}
	return nil
}

// deadLetter moves a poison delivery to the dead-letter exchange: a copy
// carrying the reason goes out on the session's dead-letter connection,
// and the original is acked when the broker confirms the copy
// (handleCopy). The loop never waits for that confirm.
func (r *Relay) deadLetter(s *session, tag uint64, p amqp.Publishing, key, reason string) error {
	if c := r.m.dead[reason]; c != nil {
		c.Inc()
	}
	if r.warn.allow(reason) {
		r.log.Warn("dead-lettering poison message", "reason", reason, "message_id", p.MessageId,
			"suppressed_since_last", r.warn.suppressed(reason))
	}
	if s.DeadLetter(tag, p, key, reason) {
		s.deadPending++
		return nil
	}
	return r.reject(s, tag, reason, errors.New("too many dead-letter copies waiting"))
}

// handleCopy settles the original of a dead-letter copy: acked once the
// copy is confirmed, rejected if it was not (the queue's own
// dead-lettering then keeps it, without our reason header).
func (r *Relay) handleCopy(s *session, c consume.CopyResult) error {
	s.deadPending--
	if c.Err == nil {
		return s.tracker.Settle(c.Tag, acker.Done)
	}
	return r.reject(s, c.Tag, "copy_failed", c.Err)
}

func (r *Relay) reject(s *session, tag uint64, reason string, cause error) error {
	if r.warn.allow("reject:" + reason) {
		r.log.Warn("dead-letter copy failed; rejecting the original", "err", cause,
			"suppressed_since_last", r.warn.suppressed("reject:"+reason))
	}
	if err := s.Reject(tag); err != nil {
		return fmt.Errorf("reject: %w", err)
	}
	return s.tracker.Settle(tag, acker.Rejected)
}

func (r *Relay) flushAcks(s *session, stalled bool) error {
	up, singles := s.tracker.Flush(stalled)
	if up != 0 {
		if err := s.Ack(up, true); err != nil {
			return fmt.Errorf("ack: %w", err)
		}
	}
	for _, tag := range singles {
		if err := s.Ack(tag, false); err != nil {
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
		case st := <-r.settles: // what the lanes finish of the lost session
			r.handleSettlement(nil, &st)
		case next := <-r.reloads:
			if err := r.apply(nil, next); err != nil {
				r.log.Warn("applying config while disconnected", "err", err)
			}
			if r.pending != nil {
				// Nothing in flight can still be acked: its session is gone
				// and the broker will deliver it again. So rebuild now.
				r.runPending()
			}
		case <-t.C:
			return true
		case <-ctx.Done():
			return false
		}
	}
}

// setUnapplied records why the desired config is not fully in force yet,
// or with "" that it is. /readyz and pushrelay_config_applied show it.
func (r *Relay) setUnapplied(why string) {
	if why == "" {
		if r.unapplied.Swap(nil) != nil {
			r.log.Info("config applied")
		}
		return
	}
	if old := r.unapplied.Swap(&why); old == nil || *old != why {
		r.log.Info("config not yet applied", "reason", why)
	}
}

// runPending runs a reload's pending work while disconnected.
func (r *Relay) runPending() {
	err := r.pending(nil)
	r.pending = nil
	if err != nil && !errors.Is(err, errReconnect) { // about to connect anyway
		r.log.Warn("applying config while disconnected", "err", err)
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
