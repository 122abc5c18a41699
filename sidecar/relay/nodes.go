package relay

import (
	"context"
	"sync"
	"time"

	"github.com/pushrelay/pushrelay/sidecar/config"
	"github.com/pushrelay/pushrelay/sidecar/consume"
)

// nodeCheckInterval: how often every configured broker node is dialled.
const nodeCheckInterval = time.Minute

// tryNodes dials every URL at once, each with its own timeout, so that a
// hung node (it accepts TCP, then says nothing) costs no other node its
// chance. It returns the failures by redacted URL.
func tryNodes(ctx context.Context, urls []string) map[string]error {
	var (
		mu     sync.Mutex
		wg     sync.WaitGroup
		failed = map[string]error{}
	)
	for _, u := range urls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := consume.Try(ctx, u, amqpTimeout); err != nil {
				mu.Lock()
				failed[config.Redact(u)] = err
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return failed
}

// watchNodes dials every node of amqp.urls now and then once a minute, and
// says which fail: the relay needs one node, so a wrong password or a dead
// rmq2 would otherwise show only on the day rmq1 and rmq3 are down too.
func (r *Relay) watchNodes(ctx context.Context) {
	tick := time.NewTicker(nodeCheckInterval)
	defer tick.Stop()
	logged := map[string]string{} // node → the error last logged
	for {
		// One node needs no watch: the session itself says whether it works.
		urls, err := r.accepted.Load().AMQPURLs()
		if err == nil && len(urls) > 1 {
			failed := tryNodes(ctx, urls)
			if ctx.Err() != nil {
				return
			}
			for node, err := range failed {
				if logged[node] != err.Error() {
					r.log.Warn("AMQP node fails; the relay uses the others", "node", node, "err", err)
				}
			}
			for node := range logged {
				if failed[node] == nil {
					r.log.Info("AMQP node answers again", "node", node)
				}
			}
			logged = map[string]string{}
			for node, err := range failed {
				logged[node] = err.Error()
			}
			r.nodesFailing.Store(int64(len(failed)))
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}
