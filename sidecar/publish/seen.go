package publish

import (
	"hash/maphash"
	"math/bits"
	"sync"

	"github.com/pushrelay/pushrelay/sidecar/message"
)

// Seen remembers which messages Nginx took lately, so that a redelivered
// copy of one (its ack was lost with an AMQP session, while the relay
// lived) is acked without being pushed to browsers a second time.
//
// It holds the identities of the last few messages accepted per stripe,
// and forgets the oldest first. A stripe is chosen by the channel, so a
// channel's messages are remembered together: a hot channel evicts its own
// history before a quiet channel's. Memory is fixed when it is made.
//
// An identity is a 64-bit digest of the channel and the producer's
// message_id, or of the channel, body and published_at when there is no
// id. A message with neither has no identity: two comments "+1" on one
// thread are two messages, so it is never remembered nor skipped (a copy
// of it after a reconnect reaches browsers twice). A digest can collide;
// at 2^-64 per pair among a few thousand remembered messages that is
// never, in practice.
//
// Seen is safe for concurrent use; it outlives the publisher pools that
// use it, so that a [push] reload forgets nothing.
type Seen struct {
	seed    maphash.Seed
	stripes []seenStripe
}

// seenStripes is a power of two: enough that eight lanes rarely meet on
// one lock, few enough that a stripe's share of the history stays large.
const seenStripes = 16

type seenStripe struct {
	mu sync.Mutex
	// ring holds the identities in the order they were added;
	// ring[next] is the oldest once the ring is full.
	ring []uint64
	next int
	// slots is an open-addressing set of what ring holds (0: empty),
	// probed linearly, at most half full.
	slots []uint64
	mask  uint64
	_     [40]byte // keep neighbouring stripes' locks off one cache line
}

// NewSeen remembers up to perStripe messages in each of 16 stripes. Give
// it at least the prefetch: every message that can come back is among the
// unacked ones of a lost session, at most a prefetch of them, and a
// channel can have them all.
func NewSeen(perStripe int) *Seen {
	perStripe = max(perStripe, 16)
	size := 1 << bits.Len(uint(2*perStripe-1)) // ≥ 2·perStripe
	s := &Seen{seed: maphash.MakeSeed(), stripes: make([]seenStripe, seenStripes)}
	for i := range s.stripes {
		st := &s.stripes[i]
		st.ring = make([]uint64, perStripe)
		st.slots = make([]uint64, size)
		st.mask = uint64(size - 1)
	}
	return s
}

// Grow returns a Seen of perStripe identities per stripe that remembers
// what s does, oldest first; s is not used afterwards. A larger prefetch
// (a reload) needs a larger memory, and must not forget what Nginx took.
func (s *Seen) Grow(perStripe int) *Seen {
	g := NewSeen(perStripe)
	g.seed = s.seed // the same digests, so the same stripes
	for i := range s.stripes {
		from, to := &s.stripes[i], &g.stripes[i]
		from.mu.Lock()
		for k := range from.ring {
			if id := from.ring[(from.next+k)%len(from.ring)]; id != 0 {
				to.add(id)
			}
		}
		from.mu.Unlock()
	}
	return g
}

// Bytes is the memory the identities take.
func (s *Seen) Bytes() int {
	st := &s.stripes[0]
	return len(s.stripes) * 8 * (len(st.ring) + len(st.slots))
}

// Identified reports whether m has an identity Seen can remember.
func Identified(m *message.Message) bool { return m.ID != "" || m.PublishedAt != 0 }

func (s *Seen) identify(m *message.Message) (*seenStripe, uint64) {
	ch := maphash.String(s.seed, m.Channel)
	var rest uint64
	if m.ID != "" {
		rest = maphash.String(s.seed, m.ID)
	} else {
		rest = maphash.Bytes(s.seed, m.Body) ^ uint64(m.PublishedAt)*0x9e3779b97f4a7c15
	}
	id := ch ^ bits.RotateLeft64(rest*0xbf58476d1ce4e5b9, 31)
	if id == 0 {
		id = 1 // 0 marks an empty slot
	}
	return &s.stripes[ch%seenStripes], id
}

// Add records that Nginx took m, if m has an identity.
func (s *Seen) Add(m *message.Message) {
	if !Identified(m) {
		return
	}
	st, id := s.identify(m)
	st.mu.Lock()
	st.add(id)
	st.mu.Unlock()
}

// Has reports whether Nginx took m lately; never for a message without
// an identity.
func (s *Seen) Has(m *message.Message) bool {
	if !Identified(m) {
		return false
	}
	st, id := s.identify(m)
	st.mu.Lock()
	_, ok := st.find(id)
	st.mu.Unlock()
	return ok
}

func (st *seenStripe) add(id uint64) {
	i, ok := st.find(id)
	if ok {
		return // already remembered; a second ring entry would outlive it
	}
	if old := st.ring[st.next]; old != 0 {
		st.remove(old)
		i, _ = st.find(id) // the removal may have shifted the free slot
	}
	st.slots[i] = id
	st.ring[st.next] = id
	st.next++
	if st.next == len(st.ring) {
		st.next = 0
	}
}

// find returns id's slot, or the empty slot where it would go.
func (st *seenStripe) find(id uint64) (uint64, bool) {
	for i := id & st.mask; ; i = (i + 1) & st.mask {
		switch st.slots[i] {
		case id:
			return i, true
		case 0:
			return i, false
		}
	}
}

// remove deletes id by shifting back the entries probed past it, so that
// no tombstone is left and lookups stay short.
func (st *seenStripe) remove(id uint64) {
	i, ok := st.find(id)
	if !ok {
		return
	}
	for j := (i + 1) & st.mask; st.slots[j] != 0; j = (j + 1) & st.mask {
		home := st.slots[j] & st.mask
		// The entry at j may move to i unless its home lies in (i, j].
		if (i < j && i < home && home <= j) || (i > j && (home > i || home <= j)) {
			continue
		}
		st.slots[i] = st.slots[j]
		i = j
	}
	st.slots[i] = 0
}
