package publish

import (
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// State is the publisher's condition as the whole pool sees it. It decides
// whether a refused message is the message's fault (dead-letter it) or the
// publisher's (keep it unacked and wait), and it is what /readyz reports.
type State uint8

const (
	// OK: Nginx takes messages.
	OK State = iota
	// Unreachable: a lane's last attempt got no HTTP answer (refused,
	// reset or timed out).
	Unreachable
	// Failing: Nginx answers, but with an error on every channel (5xx:
	// shared memory full, an upstream in front of /pub down).
	Failing
	// Misconfigured: several channels got 400/403/404/405 (or another 4xx
	// that is not the message's fault) in a short window: a wrong URL, an
	// allow list that leaves the relay out, or Push Stream's channel limit.
	Misconfigured
)

// States lists every state, for pre-registering the metric.
var States = []State{OK, Unreachable, Failing, Misconfigured}

func (s State) String() string {
	switch s {
	case Unreachable:
		return "unreachable"
	case Failing:
		return "failing"
	case Misconfigured:
		return "misconfigured"
	}
	return "ok"
}

const (
	// faultWindow is how far back answers count when judging the publisher.
	faultWindow = 10 * time.Second
	// misconfiguredChannels different channels refused with a 4xx inside
	// faultWindow make it the publisher's fault. Two could still be two bad
	// messages; three unrelated channels failing alike rarely are.
	misconfiguredChannels = 3
	// maxRefusals bounds the per-channel memory of refusals.
	maxRefusals = 64
)

// health is shared by the lanes. Successes are the hot path and touch one
// atomic; failures are rare and take the lock.
type health struct {
	lanes     int
	lastOK    atomic.Int64 // unix ns of the last 2xx
	unhealthy atomic.Int64 // lanes whose last attempt got no HTTP answer
	refused   atomic.Int64 // len(refusals), read without the lock

	mu          sync.Mutex
	refusals    map[string]refusal // channel → its last 4xx
	lastFailure time.Time          // the last non-2xx answer
	lastStatus  int
}

type refusal struct {
	status int
	at     time.Time
}

func newHealth(lanes int) *health {
	return &health{lanes: lanes, refusals: map[string]refusal{}}
}

func (h *health) ok(channel string, now time.Time) {
	h.lastOK.Store(now.UnixNano())
	if h.refused.Load() == 0 {
		return
	}
	h.mu.Lock()
	delete(h.refusals, channel) // that channel's refusal is over
	h.refused.Store(int64(len(h.refusals)))
	h.mu.Unlock()
}

func (h *health) failed(status int, now time.Time) {
	h.mu.Lock()
	h.lastFailure, h.lastStatus = now, status
	h.mu.Unlock()
}

func (h *health) refusedBy(channel string, status int, now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lastFailure, h.lastStatus = now, status
	if _, known := h.refusals[channel]; !known && len(h.refusals) >= maxRefusals {
		h.expireLocked(now)
		if len(h.refusals) >= maxRefusals {
			return // enough evidence already
		}
	}
	h.refusals[channel] = refusal{status, now}
	h.refused.Store(int64(len(h.refusals)))
}

func (h *health) expireLocked(now time.Time) {
	for ch, r := range h.refusals {
		if now.Sub(r.at) > faultWindow {
			delete(h.refusals, ch)
		}
	}
	h.refused.Store(int64(len(h.refusals)))
}

// othersOK reports whether some channel was published since t, and
// recently: the publisher works, so a channel failing alone is the
// channel's problem.
func (h *health) othersOK(t, now time.Time) bool {
	ok := h.lastOK.Load()
	return ok > t.UnixNano() && now.UnixNano()-ok < int64(faultWindow)
}

// state judges the publisher as of now, with the status behind a fault.
func (h *health) state(now time.Time) (State, int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.refusals) >= misconfiguredChannels {
		h.expireLocked(now)
		if len(h.refusals) >= misconfiguredChannels {
			return Misconfigured, h.lastRefusalLocked()
		}
	}
	if h.unhealthy.Load() > 0 {
		return Unreachable, 0
	}
	lastOK := time.Unix(0, h.lastOK.Load())
	if h.lastFailure.After(lastOK) && now.Sub(lastOK) > faultWindow {
		return Failing, h.lastStatus
	}
	return OK, 0
}

func (h *health) lastRefusalLocked() int {
	var last refusal
	for _, r := range h.refusals {
		if r.at.After(last.at) {
			last = r
		}
	}
	return last.status
}

// Advice says what a publisher fault most likely means, for /readyz and
// the log: the operator reading it at 3 a.m. should know where to look.
func Advice(s State, status int) string {
	switch s {
	case Unreachable:
		return "no answer from the publisher: is Nginx running, and does [push] url name its publisher server?"
	case Failing:
		if status == 500 {
			return "500 from /pub on every channel: Nginx's shared memory is likely full (push_stream_shared_memory_size / nchan_max_reserved_memory)"
		}
		return strconv.Itoa(status) + " from /pub on every channel: is something in front of the publisher failing?"
	case Misconfigured:
		switch status {
		case 403:
			return "403 from /pub on several channels: is the relay's address on the publisher's allow list, or is Push Stream's push_stream_max_number_of_channels reached?"
		case 404:
			return "404 from /pub on several channels: does [push] url name the publisher location?"
		case 400:
			return "400 from /pub on several channels: does [push] url carry the channel id where the publisher reads it (e.g. ?id={channel})?"
		case 405:
			return "405 from /pub on several channels: the location does not accept POST; is it a publisher location?"
		}
		return strconv.Itoa(status) + " from /pub on several channels: check the publisher's config and [push] url"
	}
	return "publishing"
}
