// Package acker decides what to acknowledge to RabbitMQ, and when.
//
// Deliveries on one AMQP channel carry consecutive tags from 1, and lanes
// finish them out of order. The broker only learns of a completion through
// an ack; one ack(multiple=true) for tag N settles every tag ≤ N. So the
// Tracker acks the highest tag below which everything is published, in one
// frame per batch, and never lets a multiple-ack cover a tag that is still
// being published or that must be rejected instead.
//
// One message may stay unpublished for minutes (its channel refused, its
// retry budget not spent). Every later tag would then wait behind it, the
// broker's prefetch window would fill, and the whole host would stop. So
// when the lowest tag has not moved since the previous flush, the settled
// tags above it are acked one by one, and the window keeps moving.
package acker

import "fmt"

// Outcome is how a delivery ended.
type Outcome uint8

const (
	// Pending means not finished yet.
	Pending Outcome = iota
	// Done means Nginx accepted it (or a dead-lettered copy was confirmed):
	// ack it.
	Done
	// Rejected means it has been rejected on its own (basic.reject or
	// nack without requeue); it must not be covered by a multiple-ack.
	Rejected
	// acked means it was acked on its own, past a stalled lower tag.
	acked
)

// Tracker holds the outcome of every outstanding delivery tag of one AMQP
// channel. It is not safe for concurrent use: its owner is the goroutine
// that owns the channel.
type Tracker struct {
	base    uint64 // lowest tag not yet acked or rejected
	next    uint64 // the tag the next delivery must carry
	ring    []slot // ring[tag % len(ring)] for base <= tag < next
	pending int    // settled tags ≥ base waiting for the next Flush
	gone    int    // tags above base acked on their own
	singles []uint64
}

type slot struct {
	outcome Outcome
	at      int64 // when it was delivered, in the caller's clock
}

// NewTracker returns a tracker for a fresh channel, whose first delivery
// tag is 1. capacity is a hint: the prefetch count.
func NewTracker(capacity int) *Tracker {
	n := 64
	for n < capacity {
		n <<= 1
	}
	return &Tracker{base: 1, next: 1, ring: make([]slot, n)}
}

// Track records a new delivery, received at at (any monotonic clock the
// caller reads Oldest with). Tags must arrive in order with no gaps, which
// the AMQP protocol guarantees within one channel.
func (t *Tracker) Track(tag uint64, at int64) error {
	if tag != t.next {
		return fmt.Errorf("delivery tag %d out of sequence, expected %d", tag, t.next)
	}
	if int(t.next-t.base) == len(t.ring) {
		t.grow()
	}
	t.ring[tag&uint64(len(t.ring)-1)] = slot{Pending, at}
	t.next++
	return nil
}

func (t *Tracker) grow() {
	ring := make([]slot, 2*len(t.ring))
	for tag := t.base; tag < t.next; tag++ {
		ring[tag&uint64(len(ring)-1)] = t.ring[tag&uint64(len(t.ring)-1)]
	}
	t.ring = ring
}

func (t *Tracker) slot(tag uint64) *slot { return &t.ring[tag&uint64(len(t.ring)-1)] }

// Settle records the outcome of a tracked tag. Settling a tag that is not
// outstanding is an error: it would mean acking something twice, which
// closes the channel.
func (t *Tracker) Settle(tag uint64, o Outcome) error {
	if tag < t.base || tag >= t.next {
		return fmt.Errorf("settle of tag %d outside outstanding range [%d,%d)", tag, t.base, t.next)
	}
	s := t.slot(tag)
	if s.outcome != Pending {
		return fmt.Errorf("tag %d settled twice", tag)
	}
	s.outcome = o
	t.pending++
	return nil
}

// Flush advances past every settled tag at the head and returns the tag to
// ack with multiple=true, or 0 when there is nothing to ack. Rejected and
// individually acked tags are already gone from the broker, so the
// returned tag is always a Done tag: acking a tag the broker no longer
// knows would close the channel.
//
// With stalled set, the Done tags above a pending head are returned too,
// each to be acked on its own (multiple=false), and are marked so that no
// later Flush acks them again. The slice is reused by the next Flush.
func (t *Tracker) Flush(stalled bool) (ackUpTo uint64, singles []uint64) {
	for t.base < t.next {
		s := t.slot(t.base)
		if s.outcome == Pending {
			break
		}
		if s.outcome == Done {
			ackUpTo = t.base
		}
		if s.outcome == acked {
			t.gone--
		} else {
			t.pending--
		}
		t.base++
	}
	t.singles = t.singles[:0]
	if !stalled || t.pending == 0 {
		return ackUpTo, nil
	}
	for tag := t.base + 1; tag < t.next; tag++ {
		s := t.slot(tag)
		switch s.outcome {
		case Done:
			t.singles = append(t.singles, tag)
		case Rejected: // gone from the broker already
		default:
			continue
		}
		s.outcome = acked
		t.pending--
		t.gone++
	}
	return ackUpTo, t.singles
}

// Head is the lowest tag not yet acked or rejected (the next tag when
// nothing is outstanding). A head that stays put between two flushes is
// what Flush's stalled means.
func (t *Tracker) Head() uint64 { return t.base }

// Oldest is when the lowest outstanding delivery was received, and false
// when nothing is outstanding.
func (t *Tracker) Oldest() (int64, bool) {
	if t.base == t.next {
		return 0, false
	}
	return t.slot(t.base).at, true
}

// Settled is the number of settled tags that the next Flush may release.
func (t *Tracker) Settled() int { return t.pending }

// Outstanding is the number of tracked tags not yet acked or rejected.
func (t *Tracker) Outstanding() int { return int(t.next-t.base) - t.gone }
