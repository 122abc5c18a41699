// Package acker decides what to acknowledge to RabbitMQ, and when.
//
// Deliveries on one AMQP channel carry consecutive tags from 1, and lanes
// finish them out of order. The broker only learns of a completion through
// an ack; one ack(multiple=true) for tag N settles every tag ≤ N. So the
// Tracker acks the highest tag below which everything is published, in one
// frame per batch, and never lets a multiple-ack cover a tag that is still
// being published or that must be rejected instead.
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
)

// Tracker holds the outcome of every outstanding delivery tag of one AMQP
// channel. It is not safe for concurrent use: its owner is the goroutine
// that owns the channel.
type Tracker struct {
	base    uint64    // lowest tag not yet acked or rejected
	next    uint64    // the tag the next delivery must carry
	ring    []Outcome // ring[tag % len(ring)] for base <= tag < next
	pending int       // settled tags ≥ base waiting for the next Flush
}

// NewTracker returns a tracker for a fresh channel, whose first delivery
// tag is 1. capacity is a hint: the prefetch count.
func NewTracker(capacity int) *Tracker {
	n := 64
	for n < capacity {
		n <<= 1
	}
	return &Tracker{base: 1, next: 1, ring: make([]Outcome, n)}
}

// Track records a new delivery. Tags must arrive in order with no gaps,
// which the AMQP protocol guarantees within one channel.
func (t *Tracker) Track(tag uint64) error {
	if tag != t.next {
		return fmt.Errorf("delivery tag %d out of sequence, expected %d", tag, t.next)
	}
	if int(t.next-t.base) == len(t.ring) {
		t.grow()
	}
	t.ring[tag&uint64(len(t.ring)-1)] = Pending
	t.next++
	return nil
}

func (t *Tracker) grow() {
	ring := make([]Outcome, 2*len(t.ring))
	for tag := t.base; tag < t.next; tag++ {
		ring[tag&uint64(len(ring)-1)] = t.ring[tag&uint64(len(t.ring)-1)]
	}
	t.ring = ring
}

// Settle records the outcome of a tracked tag. Settling a tag that is not
// outstanding is an error: it would mean acking something twice, which
// closes the channel.
func (t *Tracker) Settle(tag uint64, o Outcome) error {
	if tag < t.base || tag >= t.next {
		return fmt.Errorf("settle of tag %d outside outstanding range [%d,%d)", tag, t.base, t.next)
	}
	slot := &t.ring[tag&uint64(len(t.ring)-1)]
	if *slot != Pending {
		return fmt.Errorf("tag %d settled twice", tag)
	}
	*slot = o
	t.pending++
	return nil
}

// Flush advances past every settled tag at the head and returns the tag to
// ack with multiple=true, or 0 when there is nothing to ack. Rejected tags
// were already rejected individually by the caller, so the returned tag is
// always a Done tag: acking a tag the broker no longer knows would close
// the channel.
func (t *Tracker) Flush() (ackUpTo uint64) {
	for t.base < t.next {
		o := t.ring[t.base&uint64(len(t.ring)-1)]
		if o == Pending {
			break
		}
		if o == Done {
			ackUpTo = t.base
		}
		t.base++
		t.pending--
	}
	return ackUpTo
}

// Settled is the number of settled tags that the next Flush may release.
func (t *Tracker) Settled() int { return t.pending }

// Outstanding is the number of tracked tags not yet acked or rejected.
func (t *Tracker) Outstanding() int { return int(t.next - t.base) }
