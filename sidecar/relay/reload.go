package relay

import (
	"log/slog"
	"reflect"
	"time"

	"github.com/pushrelay/pushrelay/sidecar/config"
	"github.com/pushrelay/pushrelay/sidecar/consume"
)

// apply takes a validated config into use. Shard moves and the log level
// apply at once; it returns an action to run once nothing is in flight
// when the publisher or the AMQP session must be rebuilt. sess is nil
// while disconnected: bindings then happen at the next connect.
//
// The action is told whether messages were still in flight (abandoned):
// a wrong publisher URL keeps them in flight for ever, and the reload that
// fixes it must not wait for them. Their tags are then never acked, so
// the action asks for a new AMQP session, and the broker delivers them
// again to the new publisher.
func (r *Relay) apply(sess *consume.Session, next config.Config) (afterQuiesce func(abandoned bool) error, err error) {
	prev := r.cfg
	r.cfg = next
	r.level.Set(ParseLevel(next.Log.Level))

	owned, err := ownedShards(next)
	if err != nil { // Validate already built this map; this cannot fail
		return nil, err
	}
	if err := r.moveShards(sess, owned, next.Shards.Drain.D()); err != nil {
		return nil, err
	}
	if r.hooks.OnReload != nil {
		r.hooks.OnReload(next)
	}

	sessionChanged := !reflect.DeepEqual(prev.AMQP, next.AMQP) || prev.Host != next.Host ||
		prev.Shards.Count != next.Shards.Count
	poolChanged := prev.Push != next.Push || prev.AMQP.Prefetch != next.AMQP.Prefetch
	r.log.Info("config reloaded", "shards_owned", len(owned), "shards_draining", len(r.draining),
		"rebuild_publisher", poolChanged, "new_session", sessionChanged)
	if prev.Metrics != next.Metrics {
		r.log.Warn("metrics.listen changes only on restart", "listening", prev.Metrics.Listen)
	}
	if !sessionChanged && !poolChanged {
		return nil, nil
	}
	return func(abandoned bool) error {
		if poolChanged {
			if err := r.rebuildPool(); err != nil {
				return err
			}
		}
		if sessionChanged || abandoned {
			return errReconnect
		}
		return nil
	}, nil
}

// rebuildPool starts a publisher for the current config, then stops the
// old one. Jobs the old pool still held are dropped: their settlements
// never come, so the in-flight count starts again from zero.
func (r *Relay) rebuildPool() error {
	old := r.pool.Load()
	if err := r.startPool(); err != nil {
		return err // the old pool keeps running
	}
	old.Stop()
	for { // what the old pool settled but the loop has not read
		select {
		case <-r.settles:
		default:
			r.inFlight.Store(0)
			return nil
		}
	}
}

// moveShards binds gained shards at once and schedules lost ones to be
// unbound after the drain, so the old and new owner both publish a moving
// shard while its subscribers reconnect. A shard that comes back before
// its drain ends simply stays bound.
func (r *Relay) moveShards(sess *consume.Session, owned []int, drain time.Duration) error {
	want := make(map[int]bool, len(owned))
	for _, s := range owned {
		want[s] = true
		delete(r.draining, s)
		if !r.bound[s] {
			if sess != nil {
				if err := sess.Bind(s); err != nil {
					return err
				}
			}
			r.bound[s] = true
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
	r.shardsOwned.Store(int64(len(owned)))
	r.shardsDraining.Store(int64(len(r.draining)))
	return r.expireDrains(sess)
}

// expireDrains unbinds the shards whose drain has ended.
func (r *Relay) expireDrains(sess *consume.Session) error {
	if len(r.draining) == 0 {
		return nil
	}
	now := time.Now()
	for s, until := range r.draining {
		if now.Before(until) {
			continue
		}
		if sess != nil {
			if err := sess.Unbind(s); err != nil {
				return err
			}
		}
		delete(r.bound, s)
		delete(r.draining, s)
	}
	r.shardsDraining.Store(int64(len(r.draining)))
	return nil
}

// ParseLevel maps the config's log.level to a slog level.
func ParseLevel(s string) slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return slog.LevelInfo
	}
	return l
}
