package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/pushrelay/pushrelay/ebpf/probe"
	"github.com/pushrelay/pushrelay/sidecar/config"
	"github.com/pushrelay/pushrelay/sidecar/telemetry"
)

// runProbes starts the socket probes of the [probes] section alone and
// prints their /metrics text after -for (or at SIGINT): a way for an
// operator to see which modes this host's kernel and this unit's
// capabilities allow, without a broker.
func runProbes(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("probes", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "", "config file (its [probes] section is used)")
	dur := fs.Duration("for", 5*time.Second, "how long to count before printing")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	cfg := config.Default()
	if *path != "" {
		var err error
		if cfg, err = config.Load(*path); err != nil {
			fmt.Fprintln(stderr, "pushrelay probes:", err)
			return 1
		}
	}
	ports := make([]uint16, 0, len(cfg.Probes.Ports))
	for _, p := range cfg.Probes.Ports {
		ports = append(ports, uint16(p))
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	reg := telemetry.New()
	p, err := probe.Start(ctx, probe.Config{Ports: ports, Cgroup: cfg.Probes.Cgroup, Interval: cfg.Probes.Interval.D()}, reg, log)
	if err != nil {
		fmt.Fprintln(stderr, "pushrelay probes:", err)
		return 1
	}
	select {
	case <-ctx.Done():
	case <-time.After(*dur):
	}
	// One more read so the figures cover the whole -for window.
	if err := p.SetPorts(ports); err != nil {
		fmt.Fprintln(stderr, "pushrelay probes:", err)
	}
	reg.WritePrometheus(stdout)
	if err := p.Close(); err != nil {
		fmt.Fprintln(stderr, "pushrelay probes: close:", err)
		return 1
	}
	return 0
}
