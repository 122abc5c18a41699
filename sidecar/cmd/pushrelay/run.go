package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"syscall"

	"github.com/pushrelay/pushrelay/ebpf/probe"
	"github.com/pushrelay/pushrelay/sidecar/config"
	"github.com/pushrelay/pushrelay/sidecar/nginxstats"
	"github.com/pushrelay/pushrelay/sidecar/relay"
	"github.com/pushrelay/pushrelay/sidecar/sdnotify"
	"github.com/pushrelay/pushrelay/sidecar/telemetry"
	"github.com/pushrelay/pushrelay/sidecar/version"
)

// runRelay is `pushrelay run -config FILE`: the daemon. SIGHUP reloads the
// config; SIGTERM and SIGINT stop it gracefully.
func runRelay(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "/etc/pushrelay/pushrelay.toml", "config file")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	cfg, err := config.Load(*path)
	if err != nil {
		fmt.Fprintln(stderr, "pushrelay: invalid config:", err)
		return 1
	}
	// One P by default: the relay needs a fraction of a core even at 20k
	// msg/s, and with one P its goroutine hand-offs stay in user space
	// instead of waking threads on other CPUs, which on a frontend are
	// Nginx's. Measured: ~20% less CPU per message (integration/BENCHMARKS.md).
	// An explicit GOMAXPROCS in the environment wins.
	setMaxProcs(cfg.MaxProcs)
	level := new(slog.LevelVar)
	level.Set(relay.ParseLevel(cfg.Log.Level))
	out := newSwitchable(formatHandler(stderr, cfg.Log.Format, level))
	log := slog.New(out)
	reformat := func(format string) { out.set(formatHandler(stderr, format, level)) }
	if err := serve(cfg, *path, log, level, reformat); err != nil {
		log.Error("pushrelay stopped", "err", err)
		return 1
	}
	return 0
}

// setMaxProcs applies max_procs; an explicit GOMAXPROCS in the
// environment wins.
func setMaxProcs(n int) {
	if os.Getenv("GOMAXPROCS") != "" {
		return
	}
	if n == 0 {
		n = runtime.NumCPU()
	}
	runtime.GOMAXPROCS(n)
}

// restartKeys names the keys whose change a reload cannot apply.
func restartKeys(prev, next config.Config) []string {
	var keys []string
	for _, k := range []struct {
		name    string
		changed bool
	}{
		{"metrics.listen", prev.Metrics != next.Metrics},
		{"state_dir", prev.StateDir != next.StateDir},
		{"probes.enabled", prev.Probes.Enabled != next.Probes.Enabled},
		{"probes.cgroup", prev.Probes.Cgroup != next.Probes.Cgroup},
		{"probes.interval", prev.Probes.Interval != next.Probes.Interval},
	} {
		if k.changed {
			keys = append(keys, k.name)
		}
	}
	return keys
}

// serve wires the daemon's parts and owns their goroutines.
func serve(cfg config.Config, path string, log *slog.Logger, level *slog.LevelVar, reformat func(format string)) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	notify := sdnotify.FromEnv()
	amqpURLs, err := cfg.AMQPURLs()
	if err != nil {
		return err
	}
	log.Info("starting", "version", version.Version, "host", cfg.Host, "amqp", config.RedactAll(amqpURLs),
		"queue", cfg.AMQP.Queue, "publisher", cfg.Push.URL, "dialect", cfg.Push.Dialect)

	reg := telemetry.New()
	var probes *probe.Probes
	if cfg.Probes.Enabled {
		// Start never fails for lack of privileges: it falls back to /proc
		// and says why, so the relay relays wherever it runs.
		if probes, err = probe.Start(ctx, probeConfig(cfg), reg, log); err != nil {
			return err
		}
		defer probes.Close()
	}
	stats := nginxstats.New(cfg.Push.Dialect, statsURL(cfg.Push), cfg.Probes.Interval.D(), reg, log)
	r, err := relay.New(cfg, log, level, reg, relay.Hooks{OnReload: func(prev, next config.Config) {
		reformat(next.Log.Format)
		stats.SetTarget(next.Push.Dialect, statsURL(next.Push))
		setMaxProcs(next.MaxProcs)
		if keys := restartKeys(prev, next); len(keys) > 0 {
			log.Warn("these keys changed but apply only on restart; the running values stay", "keys", strings.Join(keys, ", "))
		}
		if probes != nil {
			if err := probes.SetPorts(probeConfig(next).Ports); err != nil {
				log.Warn("probes: new ports", "err", err)
			}
		}
	}})
	if err != nil {
		return err
	}

	var wg sync.WaitGroup
	errs := make(chan error, 2)
	wg.Add(3)
	go func() {
		defer wg.Done()
		stats.Run(ctx)
	}()
	go func() {
		defer wg.Done()
		if err := relay.Serve(ctx, cfg.Metrics.Listen, r.Handler(reg)); err != nil {
			errs <- err
			stop()
		}
	}()
	go func() {
		defer wg.Done()
		if err := r.Run(ctx); err != nil {
			errs <- err
			stop()
		}
	}()

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	if err := notify.Ready(); err != nil {
		log.Warn("sd_notify", "err", err)
	}
	for done := false; !done; {
		select {
		case <-hup:
			notify.Reloading()
			if err := r.Reload(path); err == nil {
				log.Info("config reload accepted", "path", path)
			}
			notify.Ready()
		case <-ctx.Done():
			done = true
		}
	}
	notify.Stopping()
	wg.Wait()
	close(errs)
	return errors.Join(collect(errs)...)
}

func probeConfig(cfg config.Config) probe.Config {
	ports := make([]uint16, len(cfg.Probes.Ports))
	for i, p := range cfg.Probes.Ports {
		ports[i] = uint16(p) // Validate checked the range
	}
	return probe.Config{Ports: ports, Cgroup: cfg.Probes.Cgroup, Interval: cfg.Probes.Interval.D()}
}

// statsURL is push.stats_url, or the module's statistics location on the
// publisher's host: the project's Nginx snippets serve it at /channels-stats.
func statsURL(p config.Push) string {
	if p.StatsURL != "" {
		return p.StatsURL
	}
	if u, err := url.Parse(strings.Replace(p.URL, "{channel}", "x", 1)); err == nil {
		return u.Scheme + "://" + u.Host + "/channels-stats"
	}
	return ""
}

func collect(errs <-chan error) []error {
	var out []error
	for err := range errs {
		out = append(out, err)
	}
	return out
}
