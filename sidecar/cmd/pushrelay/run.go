package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"github.com/pushrelay/pushrelay/sidecar/config"
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
	level := new(slog.LevelVar)
	level.Set(relay.ParseLevel(cfg.Log.Level))
	log := newLogger(stderr, cfg.Log.Format, level)
	if err := serve(cfg, *path, log, level); err != nil {
		log.Error("pushrelay stopped", "err", err)
		return 1
	}
	return 0
}

func newLogger(w io.Writer, format string, level *slog.LevelVar) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if format == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// serve wires the daemon's parts and owns their goroutines.
func serve(cfg config.Config, path string, log *slog.Logger, level *slog.LevelVar) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	notify := sdnotify.FromEnv()
	url, err := cfg.AMQPURL()
	if err != nil {
		return err
	}
	log.Info("starting", "version", version.Version, "host", cfg.Host, "amqp", config.Redact(url),
		"queue", cfg.AMQP.Queue, "publisher", cfg.Push.URL, "dialect", cfg.Push.Dialect)

	reg := telemetry.New()
	r, err := relay.New(cfg, log, level, reg, relay.Hooks{})
	if err != nil {
		return err
	}

	var wg sync.WaitGroup
	errs := make(chan error, 2)
	wg.Add(2)
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

func collect(errs <-chan error) []error {
	var out []error
	for err := range errs {
		out = append(out, err)
	}
	return out
}
