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
	// Failing: Nginx answers, but with 5xx to a large share of what it is
	// sent (shared memory full, an upstream in front of /pub down).
	Failing
	// Misconfigured: several channels got 400/403/404/405 (or another 4xx
	// that is not the message's fault) in a short window, or nothing but
	// such answers came back: a wrong URL, an allow list that leaves the
	// relay out, or Push Stream's channel limit.
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
	// maxTracked bounds the per-channel memory of failures.
	maxTracked = 64
	// healthyShare: the publisher works while it answers 2xx at least this
	// many times in the window for every channel that keeps getting 5xx.
	// Channels, not answers, are counted on the failing side, because one
	// stuck channel retries every few seconds: it must not outweigh a quiet
	// host's few good answers. A shared memory zone that frees now and then
	// lets a 2xx through for a few of many failing channels, and stays far
	// below it.
	healthyShare = 6
)

// health is shared by the lanes. Successes are the hot path and touch a
// few atomics; failures are rare and take the lock.
type health struct {
	unhealthy atomic.Int64 // lanes whose last attempt got no HTTP answer
	tracked   atomic.Int64 // len(refusals)+len(failing), read without the lock
	ok        window       // 2xx answers

	mu         sync.Mutex
	refusals   map[string]answer // channel → its last 4xx
	failing    map[string]answer // channel → its last 5xx
	lastStatus int               // the last 5xx
}

type answer struct {
	status int
	at     time.Time
}

// window counts events per second over the last ten seconds. Concurrent
// adds at a second's turn may lose a few counts; a judgement needs no more.
type window struct {
	sec [10]atomic.Int64
	n   [10]atomic.Int64
}

func (w *window) add(now time.Time) {
	s := now.Unix()
	i := s % 10
	if w.sec[i].Load() != s {
		w.sec[i].Store(s)
		w.n[i].Store(0)
	}
	w.n[i].Add(1)
}

func (w *window) sum(now time.Time) (total int64) {
	s := now.Unix()
	for i := range w.sec {
		if s-w.sec[i].Load() < 10 {
			total += w.n[i].Load()
		}
	}
	return total
}

func newHealth() *health {
	return &health{refusals: map[string]answer{}, failing: map[string]answer{}}
}

func (h *health) succeeded(channel string, now time.Time) {
	h.ok.add(now)
	if h.tracked.Load() == 0 {
		return
	}
	h.mu.Lock()
	delete(h.refusals, channel) // that channel's trouble is over
	delete(h.failing, channel)
	h.tracked.Store(int64(len(h.refusals) + len(h.failing)))
	h.mu.Unlock()
}

func (h *health) failed(channel string, status int, now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lastStatus = status
	h.trackLocked(h.failing, channel, answer{status, now})
}

func (h *health) refusedBy(channel string, status int, now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.trackLocked(h.refusals, channel, answer{status, now})
}

func (h *health) trackLocked(m map[string]answer, channel string, a answer) {
	if _, known := m[channel]; !known && len(m) >= maxTracked {
		h.expireLocked(a.at)
		if len(m) >= maxTracked {
			return // enough evidence already
		}
	}
	m[channel] = a
	h.tracked.Store(int64(len(h.refusals) + len(h.failing)))
}

func (h *health) expireLocked(now time.Time) {
	for _, m := range []map[string]answer{h.refusals, h.failing} {
		for ch, a := range m {
			if now.Sub(a.at) > faultWindow {
				delete(m, ch)
			}
		}
	}
	h.tracked.Store(int64(len(h.refusals) + len(h.failing)))
}

// works reports whether the publisher takes what it is sent: healthyShare
// 2xx answers in the window per channel failing with 5xx. Only then is a
// channel that keeps failing the channel's problem.
func (h *health) works(now time.Time) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.expireLocked(now)
	return worksLocked(h.ok.sum(now), len(h.failing))
}

func worksLocked(ok int64, failing int) bool {
	return ok > 0 && int64(failing)*healthyShare <= ok
}

// refusedAlone reports whether channel is the only one refused with a 4xx
// in the window: then the refusal is about the message. With two or more
// refused, it may be the publisher (a channel limit, an allow list), and
// waiting costs nothing.
func (h *health) refusedAlone(channel string, now time.Time) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.expireLocked(now)
	_, mine := h.refusals[channel]
	return mine && len(h.refusals) == 1
}

// fault is the publisher's state as of now, with what an operator needs to
// read it: the status behind it and how many channels show it.
type fault struct {
	state    State
	status   int
	channels int
}

func (h *health) judge(now time.Time) fault {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.expireLocked(now)
	ok := h.ok.sum(now)
	switch {
	case len(h.refusals) >= misconfiguredChannels,
		len(h.refusals) > 0 && ok == 0 && len(h.failing) == 0: // nothing but 4xx
		return fault{Misconfigured, lastOf(h.refusals), len(h.refusals)}
	case h.unhealthy.Load() > 0:
		return fault{state: Unreachable}
	case len(h.failing) > 0 && !worksLocked(ok, len(h.failing)):
		return fault{Failing, h.lastStatus, len(h.failing)}
	}
	return fault{state: OK}
}

func lastOf(m map[string]answer) int {
	var last answer
	for _, a := range m {
		if a.at.After(last.at) {
			last = a
		}
	}
	return last.status
}

// advice says what a publisher fault most likely means, for /readyz and
// the log: the operator reading it at 3 a.m. should know where to look.
func (f fault) advice() string {
	s := strconv.Itoa(f.status)
	switch f.state {
	case Unreachable:
		return "no answer from the publisher: is Nginx running, and does [push] url name its publisher server?"
	case Failing:
		if f.channels <= 1 {
			return s + " from /pub, on the only channel publishing now: that channel fails (it waits; it is dead-lettered " +
				"after push.retry_budget once other channels publish), or it is the start of an outage"
		}
		if f.status == 500 || f.status == 507 {
			return s + " from /pub on " + strconv.Itoa(f.channels) + " channels: Nginx's shared memory is likely full " +
				"(push_stream_shared_memory_size / nchan_max_reserved_memory); messages wait"
		}
		return s + " from /pub on " + strconv.Itoa(f.channels) + " channels: is something in front of the publisher failing?"
	case Misconfigured:
		switch f.status {
		case 403:
			return "403 from /pub on several channels: is the relay's address on the publisher's allow list, or is Push Stream's push_stream_max_number_of_channels reached?"
		case 404:
			return "404 from /pub: does [push] url name the publisher location?"
		case 400:
			return "400 from /pub: does [push] url carry the channel id where the publisher reads it (e.g. ?id={channel})?"
		case 405:
			return "405 from /pub: the location does not accept POST; is it a publisher location?"
		}
		return s + " from /pub: check the publisher's config and [push] url"
	}
	return "publishing"
}
