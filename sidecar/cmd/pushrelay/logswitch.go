package main

import (
	"context"
	"io"
	"log/slog"
	"slices"
	"sync/atomic"
)

// switchable is a slog.Handler whose output format a reload can change:
// every logger derived from it (With, WithGroup) follows the handler set
// last, so the lanes' and the probes' loggers switch with the rest.
// Attributes and groups are replayed on the current handler per record;
// log lines are rare enough for that.
type switchable struct {
	cur *atomic.Pointer[slog.Handler]
	ops []func(slog.Handler) slog.Handler
}

func newSwitchable(h slog.Handler) *switchable {
	s := &switchable{cur: new(atomic.Pointer[slog.Handler])}
	s.cur.Store(&h)
	return s
}

// set replaces the handler for every logger made from s.
func (s *switchable) set(h slog.Handler) { s.cur.Store(&h) }

func (s *switchable) handler() slog.Handler {
	h := *s.cur.Load()
	for _, op := range s.ops {
		h = op(h)
	}
	return h
}

func (s *switchable) Enabled(ctx context.Context, l slog.Level) bool {
	return (*s.cur.Load()).Enabled(ctx, l)
}

func (s *switchable) Handle(ctx context.Context, r slog.Record) error {
	return s.handler().Handle(ctx, r)
}

func (s *switchable) WithAttrs(as []slog.Attr) slog.Handler {
	return &switchable{cur: s.cur, ops: append(slices.Clip(s.ops), func(h slog.Handler) slog.Handler { return h.WithAttrs(as) })}
}

func (s *switchable) WithGroup(name string) slog.Handler {
	return &switchable{cur: s.cur, ops: append(slices.Clip(s.ops), func(h slog.Handler) slog.Handler { return h.WithGroup(name) })}
}

// formatHandler is the handler for log.format.
func formatHandler(w io.Writer, format string, level *slog.LevelVar) slog.Handler {
	opts := &slog.HandlerOptions{Level: level}
	if format == "text" {
		return slog.NewTextHandler(w, opts)
	}
	return slog.NewJSONHandler(w, opts)
}
