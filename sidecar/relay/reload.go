package relay

import (
	"log/slog"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pushrelay/pushrelay/sidecar/config"
	"github.com/pushrelay/pushrelay/sidecar/consume"
	"github.com/pushrelay/pushrelay/sidecar/drainstate"
)

// apply takes a validated config into use: the desired state. Shard moves
// and the log level apply at once; a publisher or AMQP session that must
// be rebuilt becomes the relay's pending work (r.pending), added to any
// work an earlier reload left, and run once nothing is in flight. sess is
// nil while disconnected: bindings then happen at the next connect.
//
// Everything but the binds is recorded first: a bind that fails (the
// connection dropped mid-reload) ends the session, and the pending work
// and the hooks must not be lost with it.
//
// The pending work may run with messages still in flight: a wrong
// publisher URL keeps them in flight for ever, and the reload that fixes it
// must not wait for them. The new publisher takes them over from the old
// one (rebuildPool), on the same session.
func (r *Relay) apply(sess *consume.Session, next config.Config) error {
	prev := r.cfg
	r.cfg = next
	r.level.Set(ParseLevel(next.Log.Level))
	if r.hooks.OnReload != nil {
		r.hooks.OnReload(prev, next)
	}
	owned, err := ownedShards(next)
	if err != nil { // Validate already built this map; this cannot fail
		return err
	}

	urlChanged := r.urlChanged(next)
	if !urlChanged {
		r.keepURLs(next) // the list may differ, yet holds the session's node
	}
	sessionChanged := !reflect.DeepEqual(withoutURLs(prev.AMQP), withoutURLs(next.AMQP)) || prev.Host != next.Host ||
		prev.Shards.Count != next.Shards.Count || urlChanged
	poolChanged := prev.Push != next.Push || prev.AMQP.Prefetch != next.AMQP.Prefetch
	r.log.Info("config reloaded", "shards_owned", len(owned), "rebuild_publisher", poolChanged, "new_session", sessionChanged)
	if sessionChanged || poolChanged {
		if sessionChanged {
			r.setUnapplied("a new AMQP session is due (queue, URL or shards changed)")
		} else {
			r.setUnapplied("the new publisher waits for in-flight messages (at most shutdown_timeout)")
		}
		work := func(s *session) error {
			if poolChanged {
				if err := r.rebuildPool(s); err != nil {
					return err
				}
			}
			if sessionChanged || s == nil {
				return errReconnect // applied when the next session opens
			}
			r.setUnapplied("")
			return nil
		}
		if r.pending != nil { // a second reload: do the first one's work too
			work = chain(r.pending, work)
		}
		r.pending = work
	}
	return r.moveShards(sess, owned, next.Shards.Drain.D())
}

// urlChanged reports whether next's broker URLs no longer hold the one the
// live session dialled: a new password in amqp.url_file changes nothing in
// the config itself. A node added, removed or moved in the list needs no
// new session while the session's own node stays.
func (r *Relay) urlChanged(next config.Config) bool {
	urls, err := next.AMQPURLs()
	return err == nil && (r.sessionURL == "" || !slices.Contains(urls, r.sessionURL))
}

// keepURLs records next's list as the one that works, for a list change
// that keeps the session: the next reload and the fallback compare with it.
func (r *Relay) keepURLs(next config.Config) {
	if urls, err := next.AMQPURLs(); err == nil {
		joined := strings.Join(urls, "\n")
		r.dialled.Store(&joined)
	}
}

// withoutURLs is a's settings but the broker URLs, which urlChanged judges.
func withoutURLs(a config.AMQP) config.AMQP {
	a.URL, a.URLs, a.URLFile = "", nil, ""
	return a
}

// rebuildPool starts a publisher for the current config, then stops the
// old one. The new publisher takes over what the old one had not
// finished, in order per channel (so a [push] fix returns nothing to the
// broker), and the loop settles what it had. Without a session (s nil)
// the messages are published all the same: they are valid, and the
// broker's redelivered copies are skipped once Nginx has them.
func (r *Relay) rebuildPool(s *session) error {
	old := r.pool.Load()
	if err := r.startPool(); err != nil {
		return err // the old pool keeps running
	}
	settled, unsent := old.Handover()
	r.pool.Load().Adopt(unsent)
	for i := range settled {
		if err := r.handleSettlement(s, &settled[i]); err != nil {
			return err
		}
	}
	return nil
}

// moveShards binds gained shards at once and schedules lost ones to be
// unbound after the drain, so the old and new owner both publish a moving
// shard while its subscribers reconnect. A shard that comes back before
// its drain ends simply stays bound.
//
// Every gained shard is recorded as desired before the first bind: if a
// bind fails (a connection blip mid-reload), the session ends and the next
// one binds everything desired. Recording after each bind would leave the
// shards past the failure unbound for good, and their producers' messages
// routed to no queue.
func (r *Relay) moveShards(sess *consume.Session, owned []int, drain time.Duration) error {
	want := make(map[int]bool, len(owned))
	var gained []int
	for _, s := range owned {
		want[s] = true
		delete(r.draining, s)
		if !r.bound[s] {
			r.bound[s] = true
			gained = append(gained, s)
		}
	}
	until := time.Now().Add(drain)
	for s := range r.bound {
		if want[s] {
			continue
		}
		if _, ok := r.draining[s]; !ok {
			r.draining[s] = until
		}
	}
	// The draining gauge moves once the state file says so (saveDrains):
	// it must not say draining before a restart would still know it.
	r.saveDrains()
	r.shardsOwned.Store(int64(len(owned)))
	if sess != nil && sess.Bound() && len(gained) > 0 {
		// Owned already says the new map; until every bind is done the
		// broker routes the gained shards elsewhere: not applied yet.
		r.setUnapplied("binding " + strconv.Itoa(len(gained)) + " gained shards")
		for _, s := range gained {
			if err := sess.Bind(s); err != nil {
				r.setUnapplied("binding gained shards: " + err.Error())
				return err
			}
		}
		if r.pending == nil {
			r.setUnapplied("")
		}
	}
	return r.expireDrains(sess)
}

// expireDrains unbinds the shards whose drain has ended.
func (r *Relay) expireDrains(sess *consume.Session) error {
	if len(r.draining) == 0 {
		return nil
	}
	now := time.Now()
	ended := 0
	defer func() {
		if ended > 0 { // written once per change, not per tick
			r.saveDrains()
		}
	}()
	for s, until := range r.draining {
		if now.Before(until) {
			continue
		}
		if sess != nil && sess.Bound() {
			if err := sess.Unbind(s); err != nil {
				// Still bound and draining: the next session unbinds it.
				r.setUnapplied("unbinding drained shards: " + err.Error())
				return err
			}
		}
		delete(r.bound, s)
		delete(r.draining, s)
		ended++
	}
	return nil
}

// saveDrains has the state writer record the drains, so that a restart
// keeps them; without a state file a restart unbinds them at once. Called
// only when the drains changed.
func (r *Relay) saveDrains() {
	if r.state == nil {
		r.shardsDraining.Store(int64(len(r.draining)))
		return
	}
	r.state.Save(r.draining)
}

// restoreDrains keeps bound, until their deadlines, the shards a previous
// run of this relay was draining when it stopped.
func (r *Relay) restoreDrains(owned []int) {
	drains, err := drainstate.Load(r.statePath, r.cfg.AMQP.Queue, time.Now())
	if err != nil {
		r.log.Warn("drain state unreadable; shards a previous run was draining are unbound now", "err", err)
		return
	}
	isOwned := make(map[int]bool, len(owned))
	for _, s := range owned {
		isOwned[s] = true
	}
	for s, until := range drains {
		if s < r.cfg.Shards.Count && !isOwned[s] {
			r.bound[s], r.draining[s] = true, until
		}
	}
	if len(r.draining) > 0 {
		r.log.Info("still draining shards moved away before the restart", "shards", len(r.draining))
	}
	r.shardsDraining.Store(int64(len(r.draining)))
}

// ParseLevel maps the config's log.level to a slog level.
func ParseLevel(s string) slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return slog.LevelInfo
	}
	return l
}
