package relay

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"time"

	"github.com/pushrelay/pushrelay/sidecar/publish"
	"github.com/pushrelay/pushrelay/sidecar/telemetry"
)

// Handler serves /metrics, /healthz (the process is up) and /readyz
// (consuming, and the publisher takes messages; else why not).
func (r *Relay) Handler(reg *telemetry.Registry) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		reg.WritePrometheus(w)
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !r.consuming.Load() {
			why := "no AMQP session"
			if e := r.connectErr.Load(); e != nil {
				why = *e
			}
			http.Error(w, "not consuming: "+why, http.StatusServiceUnavailable)
			return
		}
		if r.standby.Load() && r.deadBlocked.Load() {
			http.Error(w, "not consuming: cannot tell whether this relay is the active consumer of queue "+r.accepted.Load().AMQP.Queue+
				": the broker blocks publishing (a resource alarm), so its probe waits", http.StatusServiceUnavailable)
			return
		}
		if r.standby.Load() {
			http.Error(w, "not consuming: standing by: no probe or message has reached this consumer of queue "+r.accepted.Load().AMQP.Queue+
				", so another one is active (another relay with the same host, or this relay's own earlier session on a broker node that hangs)",
				http.StatusServiceUnavailable)
			return
		}
		if why := r.persistErr.Load(); why != nil {
			http.Error(w, "config not yet applied: "+*why, http.StatusServiceUnavailable)
			return
		}
		if why := r.unapplied.Load(); why != nil {
			http.Error(w, "config not yet applied: "+*why, http.StatusServiceUnavailable)
			return
		}
		if p := r.pool.Load(); p != nil {
			if state, advice := p.Judge(); state != publish.OK {
				http.Error(w, "publisher "+state.String()+": "+advice, http.StatusServiceUnavailable)
				return
			}
		}
		fmt.Fprintln(w, "ready")
	})
	if os.Getenv("PUSHRELAY_PPROF") == "1" {
		// Profiling on the metrics listener, for benchmarks and incidents;
		// off by default because the listener may face the network.
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// Serve listens on addr and serves h until ctx ends.
func Serve(ctx context.Context, addr string, h http.Handler) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics listen: %w", err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		<-ctx.Done()
		shut, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(shut)
	}()
	err = srv.Serve(ln)
	<-stopped
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}
