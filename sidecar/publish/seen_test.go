package publish

import (
	"math/rand/v2"
	"strconv"
	"testing"

	"github.com/pushrelay/pushrelay/sidecar/message"
)

// Against a plain model: per stripe, the last perStripe distinct messages
// added are remembered, and nothing else.
func TestSeenRemembersTheLatestPerStripe(t *testing.T) {
	const perStripe = 64
	s := NewSeen(perStripe)
	type model struct {
		order []uint64
		set   map[uint64]bool
	}
	models := map[*seenStripe]*model{}
	msgs := make([]message.Message, 0, 20000)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 20000 {
		m := message.Message{Channel: "ch" + strconv.Itoa(rng.IntN(40))}
		switch i % 3 {
		case 0:
			m.ID = strconv.Itoa(rng.IntN(5000)) // repeats: Add of a known id
		case 1:
			m.Body = []byte("body" + strconv.Itoa(i))
			m.PublishedAt = int64(i)
		default:
			m.ID = "id" + strconv.Itoa(i)
		}
		msgs = append(msgs, m)
		st, id := s.identify(&m)
		md := models[st]
		if md == nil {
			md = &model{set: map[uint64]bool{}}
			models[st] = md
		}
		if !md.set[id] {
			md.order = append(md.order, id)
			md.set[id] = true
			if len(md.order) > perStripe {
				delete(md.set, md.order[0])
				md.order = md.order[1:]
			}
		}
		s.Add(&m)
		if i%97 == 0 { // check every message seen so far
			for k := range msgs {
				st, id := s.identify(&msgs[k])
				if got, want := s.Has(&msgs[k]), models[st].set[id]; got != want {
					t.Fatalf("after %d adds, Has(%+v) = %v, want %v", i+1, msgs[k], got, want)
				}
			}
		}
	}
}

func TestSeenTellsMessagesApart(t *testing.T) {
	s := NewSeen(128)
	a := message.Message{Channel: "a", ID: "1"}
	s.Add(&a)
	for _, m := range []message.Message{
		{Channel: "b", ID: "1"},                           // same id, other channel
		{Channel: "a", ID: "2"},                           // other id
		{Channel: "a", Body: []byte("x"), PublishedAt: 1}, // no id
	} {
		if s.Has(&m) {
			t.Errorf("%+v counts as seen after only %+v", m, a)
		}
	}
	b := message.Message{Channel: "a", Body: []byte("x"), PublishedAt: 1}
	s.Add(&b)
	if !s.Has(&a) || !s.Has(&message.Message{Channel: "a", Body: []byte("x"), PublishedAt: 1}) {
		t.Error("an added message is not remembered")
	}
	if s.Has(&message.Message{Channel: "a", Body: []byte("x"), PublishedAt: 2}) {
		t.Error("another published_at counts as the same message")
	}
}

func TestSeenAllocatesNothingPerMessage(t *testing.T) {
	s := NewSeen(2048)
	m := message.Message{Channel: "thread:1", ID: "m-1", Body: []byte("hello")}
	n := 0
	allocs := testing.AllocsPerRun(1000, func() {
		n++
		m.PublishedAt = int64(n)
		s.Add(&m)
		s.Has(&m)
	})
	if allocs != 0 {
		t.Errorf("%v allocations per Add+Has", allocs)
	}
}

// BenchmarkSeenAdd is the guard's cost per accepted message.
func BenchmarkSeenAdd(b *testing.B) {
	s := NewSeen(2048)
	msgs := make([]message.Message, 4096)
	for i := range msgs {
		msgs[i] = message.Message{Channel: "thread:" + strconv.Itoa(i%100), ID: "m-" + strconv.Itoa(i)}
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		m := &msgs[i%len(msgs)]
		m.PublishedAt = int64(i)
		s.Add(m)
	}
}

// A message with neither message_id nor published_at has no identity: two
// comments "+1" on one thread are two messages. Remembering it would make
// the second one, redelivered after a reconnect, look like the first.
func TestSeenNeverRemembersAMessageWithoutIdentity(t *testing.T) {
	s := NewSeen(64)
	plus := message.Message{Channel: "thread:1", Body: []byte("+1")}
	s.Add(&plus)
	if s.Has(&plus) {
		t.Error("a message without message_id or published_at counts as seen")
	}
}

func TestSeenGrowKeepsWhatItRemembers(t *testing.T) {
	s := NewSeen(32)
	var msgs []message.Message
	for i := range 200 {
		msgs = append(msgs, message.Message{Channel: "ch" + strconv.Itoa(i%7), ID: strconv.Itoa(i)})
		s.Add(&msgs[i])
	}
	var had []bool
	for i := range msgs {
		had = append(had, s.Has(&msgs[i]))
	}
	g := s.Grow(128)
	for i := range msgs {
		if had[i] && !g.Has(&msgs[i]) {
			t.Fatalf("message %d was remembered before Grow, not after", i)
		}
	}
	for i := 200; i < 300; i++ { // the grown one has room for more
		m := message.Message{Channel: "ch" + strconv.Itoa(i%7), ID: strconv.Itoa(i)}
		g.Add(&m)
	}
	for i := range msgs {
		if had[i] && !g.Has(&msgs[i]) {
			t.Errorf("message %d forgotten after 100 more adds to a memory four times larger", i)
		}
	}
}

// The bound the shipped config states: 0.75 MiB at prefetch 2048.
func TestSeenMemoryAtTheShippedPrefetch(t *testing.T) {
	if got, want := NewSeen(2048).Bytes(), 768<<10; got != want {
		t.Errorf("Seen at prefetch 2048 holds %d bytes of identities, want %d (0.75 MiB, packaging/pushrelay.toml)", got, want)
	}
}
